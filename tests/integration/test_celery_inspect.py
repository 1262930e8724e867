"""Celery's remote control, inspect side (issue 8): sparkd answers the pidbox once per worker node, for
Debian's celery CLI (run as a subprocess) and the Python API, with a real redis-server."""

import json
import os
import socket
import subprocess
import textwrap

import pytest

from harness import PYTHON, t, wait_for

HOST = socket.gethostname()
NODES3 = [f"celery-{i}@{HOST}" for i in (1, 2, 3)]


def celery_cli(broker_url, tmp_path):
    """celery -A app ...: Debian's CLI (the `celery` package's script when present, else python3 -m celery)."""
    mod = tmp_path / "inspectapp.py"
    if not mod.exists():
        mod.write_text(textwrap.dedent(f"""
            from celery import Celery
            app = Celery("inspectapp", broker={broker_url!r})
            app.conf.accept_content = ["json"]
        """))
    prog = ["/usr/bin/celery"] if os.path.exists("/usr/bin/celery") else [PYTHON, "-m", "celery"]

    def run(*args, timeout=None):
        env = dict(os.environ, PYTHONPATH=str(tmp_path))
        if args and args[0] in ("inspect", "control", "status") and "--timeout" not in args:
            # the CLI waits this long for each next reply (1 s by default): too short on a loaded machine
            args = (*args, "--timeout", "3")
        return subprocess.run([*prog, "-A", "inspectapp", *args], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=timeout or t(60))
    return run


def cli_json(run, *args):
    cp = run(*args, "--json")
    assert cp.returncode == 0, f"{cp.stdout}\n{cp.stderr}"
    return json.loads(cp.stdout)


@pytest.fixture
def fleet3(spark, redis):
    sd = spark()
    sd.start(workers=3, concurrency=2)
    return sd


def test_every_node_once_for_ping_status_and_inspect(fleet3, redis, tmp_path):
    run = celery_cli(redis.url(0), tmp_path)
    pong = cli_json(run, "inspect", "ping")
    assert sorted(pong) == NODES3
    assert all(v == {"ok": "pong"} for v in pong.values())

    st = run("status")
    assert st.returncode == 0, st.stderr
    assert all(st.stdout.count(f"{n}: OK") == 1 for n in NODES3), st.stdout
    assert "3 nodes online" in st.stdout

    for method in ("active", "reserved", "scheduled", "registered", "active_queues", "revoked"):
        r = cli_json(run, "inspect", method)
        assert sorted(r) == NODES3, (method, r)
        assert all(isinstance(v, list) for v in r.values()), (method, r)

    stats = cli_json(run, "inspect", "stats")
    assert sorted(stats) == NODES3
    for node, s in stats.items():
        assert s["pid"] == fleet3.pid
        assert s["pool"]["max-concurrency"] == 2
        assert len(s["pool"]["processes"]) == 2
        assert set(s["pool"]["processes"]) <= fleet3.worker_pids()
        assert s["pool"]["max-tasks-per-child"] == 100
        assert s["pool"]["timeouts"] == [280.0, 300.0]
        assert s["broker"]["transport"] == "redis" and s["broker"]["port"] == redis.port
        assert s["prefetch_count"] == 2
        assert isinstance(s["total"], dict) and "utime" in s["rusage"] and s["uptime"] >= 0

    clock = cli_json(run, "inspect", "clock")
    assert sorted(clock) == NODES3 and all(v["clock"] > 0 for v in clock.values())


def test_destination_gets_exactly_one_reply(fleet3, redis, tmp_path, celery):
    run = celery_cli(redis.url(0), tmp_path)
    one = cli_json(run, "inspect", "ping", "--destination", NODES3[1])
    assert one == {NODES3[1]: {"ok": "pong"}}

    app = celery()
    # the Python API with a pattern: kombu's glob matcher on the node name
    got = app.control.inspect(timeout=t(10), limit=2, pattern="celery-[13]@*", matcher="glob").ping()
    assert sorted(got) == [NODES3[0], NODES3[2]]
    # kombu collects as many replies as there are destinations: the one node's, not another's
    replies = app.control.broadcast("ping", reply=True, timeout=t(10), destination=[NODES3[2]])
    assert replies == [{NODES3[2]: {"ok": "pong"}}]


def test_unknown_method_gets_an_error_reply(fleet3, redis, celery):
    app = celery()
    replies = app.control.broadcast("no_such_method", reply=True, timeout=t(10), limit=3)
    assert sorted(node for r in replies for node in r) == NODES3
    for r in replies:
        (node, value), = r.items()
        assert node in NODES3 and value == {"error": "KeyError('no_such_method')"}
    # a cast gets no reply: nothing is left in any reply queue
    app.control.broadcast("ping", reply=False)
    r = redis.client()
    assert wait_for(lambda: not [k for k in r.keys("*reply.celery.pidbox*") if r.type(k) == b"list"], t(5))


def test_health_check_sees_queues_and_registered_tasks(fleet3, celery):
    """automagik-spark's /health: control.inspect().active_queues() and registered() from every worker."""
    insp = celery().control.inspect(timeout=t(10), limit=3)
    queues = insp.active_queues()
    assert sorted(queues) == NODES3
    configured = fleet3.status()["supervisor"]["queues"]
    assert "celery" in configured
    for qs in queues.values():
        names = [q["name"] for q in qs]
        assert names == configured
        for q in qs:
            assert q["exchange"]["name"] == q["name"] and q["exchange"]["type"] == "direct"
            assert q["routing_key"] == q["name"] and q["durable"] is True
    registered = insp.registered()
    assert sorted(registered) == NODES3
    for names in registered.values():
        assert {"spark.noop", "spark.sleep", "spark.run_task",
                "automagik_spark.core.tasks.workflow_tasks.execute_workflow"} <= set(names)


def test_mailbox_bindings_and_reply_only_to_a_bound_queue(fleet3, redis, celery):
    r = redis.client()
    members = r.smembers("_kombu.binding.celery.pidbox")
    for n in NODES3:
        assert f"\x06\x16\x06\x16{n}.celery.pidbox".encode() in members
    assert r.sismember("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
    for q in fleet3.status()["supervisor"]["queues"]:
        assert r.sismember(f"_kombu.binding.{q}", f"{q}\x06\x16\x06\x16{q}")
    app = celery()
    assert len(app.control.inspect(timeout=t(10), limit=3).ping()) == 3
    # the client deleted its reply queue and binding; a late reply must not recreate it
    assert wait_for(lambda: not [k for k in r.keys("*reply.celery.pidbox") if r.type(k) == b"list"], t(5))


def test_active_shows_running_sleep_tasks(spark, redis, tmp_path, celery):
    sd = spark()
    sd.start(workers=3, concurrency=1)
    app = celery()
    results = [app.send_task("spark.sleep", args=[30]) for _ in range(3)]
    wait_for(lambda: sum(w["active"] for w in sd.status()["workers"]) == 3, t(20), what="3 tasks running")
    run = celery_cli(redis.url(0), tmp_path)
    active = cli_json(run, "inspect", "active")
    assert sorted(active) == NODES3
    tasks = [task for v in active.values() for task in v]
    assert sorted(task["id"] for task in tasks) == sorted(r.id for r in results)
    pids = sd.worker_pids()
    for task in tasks:
        assert task["name"] == "spark.sleep" and task["args"] == [30]
        assert task["time_start"] > 0 and task["worker_pid"] in pids
    q = cli_json(run, "inspect", "query_task", results[0].id)
    (state, info), = [v[results[0].id] for v in q.values() if results[0].id in v]
    assert state == "active" and info["id"] == results[0].id

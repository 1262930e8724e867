"""The worker engine (issue 3), with Python Celery as producer and result reader: values, STARTED/SUCCESS order,
unknown tasks, malformed messages, kill -9, cold stop, Redis restart, time limits, countdown/expires, and kombu's
unacked restore.

Retries (CELERY_TASK_MAX_RETRIES, RETRY meta, same task id) are covered through the workflow path in
test_workflow.py (the built-in tasks never ask for a retry), so they are not repeated here.
"""

import json
import os
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from engine_util import (DEADLETTER, MetaRecorder, PersistentRedisServer, deadletter_entries, envelope, meta,
                         parse_date_done, processing_lists)
from harness import pid_alive, t, wait_for

POOLS = {
    "prefork": dict(args=("--pool", "prefork"), workers=1, concurrency=2),
    "threads": dict(args=("--pool", "threads"), workers=1, concurrency=4),
    "solo": dict(args=("--pool", "solo"), workers=2, concurrency=1),
}

# JSON values of every kind, non-ASCII text included (Python's json.dumps sends it as \u escapes, surrogate
# pairs for the emoji)
VALUES = [
    "héllo wörld ✓ 日本",
    "emoji 😀 and 𝄞 outside the BMP",
    "quotes \" backslash \\ tab \t newline \n",
    "",
    None,
    True,
    False,
    0,
    -1,
    1234567890123,
    -(2 ** 62),
    1.5,
    -0.25,
    3.141592653589793,
    1e100,
    [],
    {},
    [1, "two", None, [3, [4, {"five": 5}]]],
    {"ключ": "значение", "nested": {"list": [1, 2.5, "x"], "none": None, "t": True}, "日本": ["語"]},
    [{"a": []}, {"b": {}}, {"c": [[], [[]]]}],
]


def start(sd, pool, **kw):
    p = POOLS[pool]
    return sd.start(*p["args"], workers=p["workers"], concurrency=p["concurrency"], **kw)


def canon(v):
    """Type-exact comparison form: 1 and 1.0 and True differ."""
    return json.dumps(v, sort_keys=True)


def running_pid(sd, task_id):
    """The pid of the process running task_id, per sparkctl status --json (None when none)."""
    for pid, p in status_pids(sd):
        if any(a.get("id") == task_id for a in p.get("active_tasks") or []):
            return pid


def status_pids(sd):
    st = sd.ctl_json("status")
    return [(p["pid"], p) for w in st["workers"] for p in (w.get("processes") or []) if p.get("pid")]


# ---------------------------------------------------------------------------------------------------------------
# 1-4: the same tests in every pool


@pytest.mark.parametrize("pool", list(POOLS))
def test_500_values_round_trip(spark, celery, pool):
    sd = spark()
    start(sd, pool)
    app = celery()
    values = [VALUES[i % len(VALUES)] for i in range(500)]
    values[7] = {"i": 7, "text": "héllo wörld ✓ 日本"}
    results = [app.send_task("spark.noop", args=[v]) for v in values]
    got = [r.get(timeout=t(30)) for r in results]
    bad = [(i, v, g) for i, (v, g) in enumerate(zip(values, got)) if canon(v) != canon(g)]
    assert not bad, f"{len(bad)} wrong values, first: {bad[:3]}"
    assert all(r.state == "SUCCESS" for r in results)


@pytest.mark.parametrize("pool", list(POOLS))
def test_started_before_success(spark, celery, redis, pool):
    sd = spark()
    start(sd, pool)
    app = celery()
    tid = str(uuid.uuid4())
    rec = MetaRecorder(redis.client(1), [tid])
    try:
        res = app.send_task("spark.sleep", args=[0.5], task_id=tid)
        # the first state other than PENDING that a reader sees must be STARTED (while it sleeps)
        seen = wait_for(lambda: (lambda st: st != "PENDING" and st)(res.state), t(10), interval=0.01,
                        what="a state other than PENDING")
        assert res.get(timeout=t(15)) == 0.5
        wait_for(lambda: rec.first(tid, "SUCCESS"), t(5), what="the SUCCESS message")
        states = rec.states(tid)
        assert states == ["STARTED", "SUCCESS"], states
        (t_started, m_started), (t_success, _) = rec.first(tid, "STARTED"), rec.first(tid, "SUCCESS")
        assert t_success - t_started >= 0.4, \
            f"STARTED was published {t_success - t_started:.3f}s before SUCCESS: it must go out before the task runs"
        assert seen == "STARTED", f"state {seen} seen first"
        info = m_started["result"]
        pids = {pid for pid, _ in status_pids(sd)}
        assert isinstance(info.get("pid"), int) and info["pid"] in pids, (info, pids)
        assert isinstance(info.get("hostname"), str) and "@" in info["hostname"], info
        assert m_started["task_id"] == tid and m_started["date_done"] is None
    finally:
        rec.close()


@pytest.mark.parametrize("pool", list(POOLS))
def test_unknown_task_fails_not_registered_and_worker_keeps_serving(spark, celery, redis, pool):
    sd = spark()
    start(sd, pool)
    app = celery()
    res = app.send_task("no.such.task", args=[1, "x"])
    with pytest.raises(Exception) as ei:
        res.get(timeout=t(15), propagate=True)
    assert type(ei.value).__name__ == "NotRegistered", repr(ei.value)
    assert "no.such.task" in str(ei.value)
    assert res.state == "FAILURE"
    # dead-lettered with its original bytes (issue 3, bad messages: unknown task name); the FAILURE result is
    # written first, the dead-letter entry right after it
    entries = wait_for(lambda: [e for e, raw in deadletter_entries(redis.client()) if res.id.encode() in raw],
                       t(5), what="the dead-letter entry")
    assert len(entries) == 1 and entries[0]["reason"], deadletter_entries(redis.client())
    assert json.loads(entries[0]["message"])["headers"]["task"] == "no.such.task"
    assert app.send_task("spark.noop", args=["still here"]).get(timeout=t(15)) == "still here"


@pytest.mark.parametrize("pool", list(POOLS))
def test_malformed_messages_are_dead_lettered(spark, celery, redis, pool):
    r = redis.client()
    no_headers = envelope(drop=("headers",))
    bad_b64 = envelope(body="!!!not base64***")
    args_not_list = envelope(body=json.dumps([{"a": 1}, {}, {"callbacks": None}]).encode())
    pickle = envelope(body=b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00]\x94K\x01a}\x94N\x87\x94.",
                      content_type="application/x-python-serialize")
    pickle["content-encoding"] = "binary"
    cases = [
        # (raw bytes, task id carried or None, words the reason must contain (any))
        (b"this is {not json", None, ("json",)),
        (b"\xff\xfe\x00binary \xc3 garbage", None, ("json", "utf-8", "utf8")),
        (json.dumps(no_headers).encode(), no_headers["properties"]["correlation_id"], ("header",)),
        (json.dumps(bad_b64).encode(), bad_b64["headers"]["id"], ("base64",)),
        (json.dumps(args_not_list).encode(), args_not_list["headers"]["id"], ("args", "list")),
        (json.dumps(pickle).encode(), pickle["headers"]["id"], ("content-type", "x-python-serialize")),
    ]
    sd = spark()
    start(sd, pool)
    app = celery()
    for raw, _, _ in cases:
        r.lpush("celery", raw)
    wait_for(lambda: r.llen(DEADLETTER) >= len(cases), t(15), what="every malformed message dead-lettered")
    entries = deadletter_entries(r)
    assert len(entries) == len(cases), entries
    for raw, tid, words in cases:
        match = [e for e, orig in entries if orig == raw]
        assert len(match) == 1, f"no dead-letter entry holding exactly {raw[:60]!r}: {[o for _, o in entries]}"
        reason = match[0].get("reason")
        assert isinstance(reason, str) and any(w in reason.lower() for w in words), (raw[:60], reason)
        if tid is not None:
            res = app.AsyncResult(tid)
            with pytest.raises(Exception):
                res.get(timeout=t(10), propagate=True)
            assert res.state == "FAILURE", (raw[:60], res.state)
    # nothing retried forever: the queue and the held-message records are empty
    assert r.llen("celery") == 0
    wait_for(lambda: r.hlen("unacked") == 0 and not any(processing_lists(r).values()), t(5),
             what="no malformed message still held")
    # every process still alive and serving
    assert app.send_task("spark.noop", args=["ok ✓"]).get(timeout=t(15)) == "ok ✓"
    assert all(p["state"] == "active" for _, p in status_pids(sd))
    assert all(p["restarts"] == 0 for _, p in status_pids(sd)), status_pids(sd)
    assert r.llen(DEADLETTER) == len(cases)


# ---------------------------------------------------------------------------------------------------------------
# 5-7: nothing lost


def test_kill_9_during_a_run_loses_nothing(spark, celery):
    # the kills may hit the same message again and again (it goes back to the front of the queue): here that is
    # not a poison message but the point of the test, so the threshold is out of reach (test_poison.py has it)
    sd = spark({"SPARK_POISON_DELIVERIES": "100"})
    sd.start("--pool", "prefork", workers=1, concurrency=3)
    app = celery()
    durations = [(0.2, 0.3, 0.4, 0.5)[i % 4] for i in range(60)]
    results = [app.send_task("spark.sleep", args=[d]) for d in durations]
    killed = []
    deadline = time.monotonic() + t(40)
    while len(killed) < 5 and not all(r.ready() for r in results) and time.monotonic() < deadline:
        # a process that is running a task right now, as sparkctl status --json shows it
        def busy():
            for pid, p in status_pids(sd):
                if p["state"] == "active" and p["active_tasks"] and pid not in killed and pid_alive(pid):
                    return pid
        try:
            pid = wait_for(busy, t(10), interval=0.05, what="a busy worker process")
        except AssertionError:
            break
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        # wait for its replacement before the next kill
        wait_for(lambda: sum(1 for p, st in status_pids(sd) if st["state"] == "active" and p not in killed) == 3,
                 t(15), interval=0.05, what="the killed process replaced")
    assert len(killed) >= 3, f"only {len(killed)} kills happened before the run ended: the test proves little"
    got = [r.get(timeout=t(60)) for r in results]
    assert got == durations
    assert all(r.state == "SUCCESS" for r in results)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_force_stop_then_start_completes_every_task(spark, celery, redis, pool):
    r = redis.client()
    sd = spark()
    sd.start("--pool", pool, workers=1, concurrency=3)
    app = celery()
    results = [app.send_task("spark.sleep", args=[1.5]) for _ in range(3)]
    results += [app.send_task("spark.sleep", args=[0.3]) for _ in range(4)]
    wait_for(lambda: sum(w["active"] for w in sd.status()["workers"]) == 3, t(15), what="3 tasks in flight")
    st = sd.stop("--force")
    assert st.rc == 0, st
    assert not sd.all_pids(), sd.all_pids()
    assert sum(1 for res in results if res.state == "SUCCESS") == 0, "the in-flight tasks were interrupted"
    # the interrupted messages are still in Redis (queue, a processing list or unacked)
    assert r.llen("celery") + sum(processing_lists(r).values()) >= len(results)
    sd.start("--pool", pool, workers=1, concurrency=3)
    got = [res.get(timeout=t(30)) for res in results]
    assert got == [1.5] * 3 + [0.3] * 4
    assert all(res.state == "SUCCESS" for res in results)
    wait_for(lambda: not any(processing_lists(r).values()) and r.hlen("unacked") == 0 and r.llen("celery") == 0,
             t(10), what="processing lists, unacked and queue empty")


@pytest.fixture
def aof_redis(tmp_path):
    srv = PersistentRedisServer(tmp_path / "aof-redis").start()
    yield srv
    srv.stop()


def test_redis_restart_mid_run_loses_nothing(spark, celery, aof_redis):
    srv = aof_redis
    sd = spark({"CELERY_BROKER_URL": srv.url(0), "CELERY_RESULT_BACKEND": srv.url(1)}, broker=False)
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    app = celery(srv.url(0), srv.url(1))
    ids = [app.send_task("spark.sleep", args=[0.05]).id for _ in range(100)]
    backend = srv.client(1)

    def done():
        return sum(1 for i in ids if (meta(backend, i) or {}).get("status") == "SUCCESS")
    wait_for(lambda: done() >= 20, t(20), what="20 tasks done before the restart")
    srv.restart(down_for=0.5)
    n_before = done()
    assert n_before < 100, "the run ended before Redis restarted: the test proves nothing"
    # after the restart: every result is there (the ones written before and after), with the right value
    backend = srv.client(1)
    wait_for(lambda: done() == 100, t(40), interval=0.1, what="all 100 results after the Redis restart")
    assert all(meta(backend, i)["result"] == 0.05 for i in ids)
    # and Python reads them as usual (a new client: the old one's subscription died with the server)
    app2 = celery(srv.url(0), srv.url(1))
    assert [app2.AsyncResult(i).get(timeout=t(10)) for i in ids] == [0.05] * 100
    broker = srv.client(0)
    wait_for(lambda: broker.llen("celery") == 0 and broker.hlen("unacked") == 0
             and not any(processing_lists(broker).values()), t(10), what="nothing left held")
    # the workers came through it without being restarted
    assert all(p["state"] == "active" for _, p in status_pids(sd))


# ---------------------------------------------------------------------------------------------------------------
# 8: time limits


def limit_failure(res):
    with pytest.raises(Exception) as ei:
        res.get(timeout=t(10), propagate=True)
    return type(ei.value).__name__


def test_time_limits_soft_1_hard_2(spark, celery, redis):
    # times are measured from sending (the workers are idle: the task starts at once), not from the STARTED
    # meta, so that these tests are about the limits only
    sd = spark({"CELERY_TASK_SOFT_TIME_LIMIT": "1", "CELERY_TASK_TIME_LIMIT": "2"})
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    app = celery()
    long_id = str(uuid.uuid4())
    rec = MetaRecorder(redis.client(1), [long_id])
    try:
        sent = time.monotonic()
        long = app.send_task("spark.sleep", args=[10], task_id=long_id)
        long_pid = wait_for(lambda: running_pid(sd, long_id), t(10), what="spark.sleep(10) running")
        # the neighbour runs in the other process, across the moment the limit hits
        neighbour = app.send_task("spark.sleep", args=[0.5])
        nb_pid = wait_for(lambda: running_pid(sd, neighbour.id), t(10), what="the neighbour running")
        assert nb_pid != long_pid
        name = limit_failure(long)
        assert name in ("SoftTimeLimitExceeded", "TimeLimitExceeded"), name
        assert long.state == "FAILURE"
        t_fail = wait_for(lambda: rec.first(long_id, "FAILURE"), t(5), what="FAILURE published")[0]
        assert 0.9 <= t_fail - sent <= t(3), f"failed {t_fail - sent:.2f}s after sending"
        assert neighbour.get(timeout=t(10)) == 0.5 and neighbour.state == "SUCCESS"
        # a per-message limit overrides the defaults: 2.5 s under soft 4 / hard 5 completes
        over = app.send_task("spark.sleep", args=[2.5], time_limit=5, soft_time_limit=4)
        assert over.get(timeout=t(15)) == 2.5
        # still serving in both processes
        assert [app.send_task("spark.noop", args=[i]).get(timeout=t(10)) for i in range(4)] == [0, 1, 2, 3]
    finally:
        rec.close()


def test_per_message_time_limit_overrides_defaults(spark, celery, redis):
    sd = spark()  # defaults: 300 s hard, 280 s soft
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    app = celery()
    tid = str(uuid.uuid4())
    rec = MetaRecorder(redis.client(1), [tid])
    try:
        sent = time.monotonic()
        res = app.send_task("spark.sleep", args=[10], task_id=tid, time_limit=2, soft_time_limit=1)
        name = limit_failure(res)
        assert name in ("SoftTimeLimitExceeded", "TimeLimitExceeded"), name
        t_fail = wait_for(lambda: rec.first(tid, "FAILURE"), t(5), what="FAILURE published")[0]
        assert 0.9 <= t_fail - sent <= t(3), f"failed {t_fail - sent:.2f}s after sending"
    finally:
        rec.close()
    assert app.send_task("spark.noop", args=["after"]).get(timeout=t(10)) == "after"


def test_hard_limit_alone_is_enforced_and_neighbour_unaffected(spark, celery, redis):
    # no soft limit: only the hard limit can end spark.sleep(10)
    sd = spark({"CELERY_TASK_SOFT_TIME_LIMIT": "0", "CELERY_TASK_TIME_LIMIT": "2"})
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    app = celery()
    tid = str(uuid.uuid4())
    rec = MetaRecorder(redis.client(1), [tid])
    try:
        sent = time.monotonic()
        res = app.send_task("spark.sleep", args=[10], task_id=tid)
        pid = wait_for(lambda: running_pid(sd, tid), t(10), what="spark.sleep(10) running")
        neighbour = app.send_task("spark.sleep", args=[1.5])  # spans the 2 s mark
        nb_pid = wait_for(lambda: running_pid(sd, neighbour.id), t(10), what="the neighbour running")
        assert nb_pid != pid
        assert limit_failure(res) == "TimeLimitExceeded"
        t_fail = wait_for(lambda: rec.first(tid, "FAILURE"), t(5), what="FAILURE published")[0]
        assert 1.9 <= t_fail - sent <= t(3), f"failed {t_fail - sent:.2f}s after sending"
        assert neighbour.get(timeout=t(10)) == 1.5
    finally:
        rec.close()
    assert app.send_task("spark.noop", args=[1]).get(timeout=t(10)) == 1


# ---------------------------------------------------------------------------------------------------------------
# 9: countdown and expires


def test_countdown_runs_no_earlier_than_2s(spark, celery, redis):
    sd = spark()
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    app = celery()
    tid = str(uuid.uuid4())
    rec = MetaRecorder(redis.client(1), [tid])
    try:
        sent_wall = datetime.now(timezone.utc)
        sent = time.monotonic()
        res = app.send_task("spark.noop", args=["later"], task_id=tid, countdown=2)
        assert res.get(timeout=t(10)) == "later"
        # the first meta published (STARTED, else SUCCESS) tells when it ran
        t_first = wait_for(lambda: rec.of(tid), t(5), what="a meta message")[0][0]
        assert t_first - sent >= 2.0, f"ran {t_first - sent:.3f}s after sending"
        assert t_first - sent <= t(5), f"ran only {t_first - sent:.3f}s after sending"
        done = parse_date_done(res.date_done.isoformat() if isinstance(res.date_done, datetime)
                               else res.date_done)
        assert (done - sent_wall).total_seconds() >= 2.0, (done, sent_wall)
    finally:
        rec.close()


def test_countdown_does_not_block_other_tasks(spark, celery):
    sd = spark()
    sd.start("--pool", "solo", workers=1, concurrency=1)
    app = celery()
    later = app.send_task("spark.noop", args=["later"], countdown=2)
    t0 = time.monotonic()
    assert app.send_task("spark.noop", args=["now"]).get(timeout=t(10)) == "now"
    assert time.monotonic() - t0 < 1.5, "a waiting countdown message must not hold a single-slot worker"
    assert later.state == "PENDING"
    assert later.get(timeout=t(10)) == "later"


def test_expires_in_the_past_ends_revoked(spark, celery, redis):
    sd = spark()
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    app = celery()
    tid = str(uuid.uuid4())
    rec = MetaRecorder(redis.client(1), [tid])
    try:
        res = app.send_task("spark.noop", args=[1], task_id=tid,
                            expires=datetime.now(timezone.utc) - timedelta(seconds=30))
        with pytest.raises(Exception) as ei:
            res.get(timeout=t(10), propagate=True)
        assert type(ei.value).__name__ == "TaskRevokedError", repr(ei.value)
        assert res.state == "REVOKED"
        wait_for(lambda: rec.states(tid), t(5), what="the REVOKED message")
        assert rec.states(tid) == ["REVOKED"], "an expired task must not start"
    finally:
        rec.close()
    assert app.send_task("spark.noop", args=[2]).get(timeout=t(10)) == 2


# ---------------------------------------------------------------------------------------------------------------
# 11: messages left by a dead Python consumer


def test_unacked_entries_of_a_dead_python_worker_are_restored(spark, celery, redis):
    r = redis.client()
    app = celery()
    # the exact envelopes Python Celery writes: send with no worker running and take them off the queue
    old = app.send_task("spark.noop", args=["restored ✓"])
    fresh = app.send_task("spark.noop", args=["held by a live consumer"])
    envs = {}
    for res in (old, fresh):
        raw = r.rpop("celery")
        env = json.loads(raw)
        assert env["headers"]["id"] == res.id
        envs[res.id] = env
    assert r.llen("celery") == 0
    now = time.time()
    for res, score in ((old, now - 3600), (fresh, now)):
        env = envs[res.id]
        tag = env["properties"]["delivery_tag"]
        # kombu's QoS.append: HSET unacked <tag> [envelope, exchange, routing_key]; ZADD unacked_index <time> <tag>
        r.hset("unacked", tag, json.dumps([env, "", "celery"]))
        r.zadd("unacked_index", {tag: score})
    sd = spark({"SPARK_VISIBILITY_TIMEOUT": "10"})
    sd.start("--pool", "prefork", workers=1, concurrency=2)
    assert old.get(timeout=t(15)) == "restored ✓"
    old_tag = envs[old.id]["properties"]["delivery_tag"]
    fresh_tag = envs[fresh.id]["properties"]["delivery_tag"]
    wait_for(lambda: not r.hexists("unacked", old_tag) and r.zscore("unacked_index", old_tag) is None, t(5),
             what="the restored entry acked")
    # the entry younger than the visibility timeout belongs to a live consumer: left alone
    assert r.hexists("unacked", fresh_tag) and r.zscore("unacked_index", fresh_tag) is not None
    assert fresh.state == "PENDING"

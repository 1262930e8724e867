"""sparkctl start/status and sparkd's supervision (issue 2: start, status, --verbose, --json, exit 3, SIGKILL
replacement, backoff)."""

import os
import re
import shutil
import signal
import socket
import time

from harness import SAN, t, wait_for, pid_alive

GUIDE_FIELDS = ("Worker", "Status", "Concurrency", "Tasks Processed", "Active Tasks", "Uptime")


def worker_names(n):
    host = socket.gethostname()
    return [f"celery@{host}"] if n == 1 else [f"celery-{i}@{host}" for i in range(1, n + 1)]


def blocks(text):
    """Split human status output into per-worker blocks of 'Field: value'."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z][A-Za-z ]*?):\s*(.*?)\s*$", line)
        if not m:
            continue
        k, v = m.group(1), m.group(2)
        if k == "Worker":
            cur = {}
            out.append(cur)
        if cur is not None and k not in cur:
            cur[k] = v
    return out


def run_tasks(app, name, args_list, timeout=None):
    res = [app.send_task(name, args=a) for a in args_list]
    return [r.get(timeout=timeout or t(20)) for r in res]


def test_start_two_by_two_returns_ready_and_status_shows_guide_fields(spark, celery):
    sd = spark()
    r = sd.ctl("start", "--workers", "2", "--concurrency", "2")
    assert r.rc == 0, r
    # start returned: every worker must already be ready, without waiting
    st = sd.status()
    names = [w["name"] for w in st["workers"]]
    assert names == worker_names(2)
    for w in st["workers"]:
        assert w["state"] == "active", w
        assert w["concurrency"] == 2
        assert w["pool"] == "prefork"
        procs = w["processes"]
        assert len(procs) == 2, "prefork: one single-slot process per unit of concurrency"
        assert all(p["state"] == "active" and pid_alive(p["pid"]) for p in procs), procs
    assert len({p["pid"] for p in sd.processes(st)}) == 4

    app = celery()
    assert run_tasks(app, "spark.noop", [[i] for i in range(6)]) == list(range(6))

    # results are published before the workers' reports of them reach sparkd: wait for the counts
    def counted():
        o = sd.ctl("status")
        return o if o.rc == 0 and sum(int(b.get("Tasks Processed", "0")) for b in blocks(o.out)) == 6 else None

    out = wait_for(counted, t(5), what="6 tasks counted")
    bl = blocks(out.out)
    assert [b.get("Worker") for b in bl] == worker_names(2), out.out
    for b in bl:
        for f in GUIDE_FIELDS:
            assert f in b, f"field {f!r} missing in:\n{out.out}"
        assert b["Status"] == "Active"
        assert b["Concurrency"] == "2"
        assert re.fullmatch(r"\d+", b["Tasks Processed"]), b
        assert re.fullmatch(r"\d+", b["Active Tasks"]), b
        assert re.fullmatch(r"(\d+[dhms] ?)+", b["Uptime"]), b
    assert sum(int(b["Tasks Processed"]) for b in bl) == 6


def test_status_verbose_and_json(spark, celery):
    sd = spark()
    sd.start(workers=1, concurrency=2)
    app = celery()
    res = app.send_task("spark.sleep", args=[3])
    wait_for(lambda: sd.status()["workers"][0]["active"] == 1, t(10), what="one active task")
    js = sd.ctl_json("status", "--verbose")
    assert [w["name"] for w in js["workers"]] == worker_names(1)
    sup = js["supervisor"]
    assert sup["pid"] == sd.pid
    assert isinstance(sup.get("version"), str) and sup["version"]
    w = js["workers"][0]
    for k in ("name", "state", "pool", "concurrency", "processed", "active", "uptime_s", "restarts", "processes"):
        assert k in w, k
    assert w["active"] == 1
    busy = [p for p in w["processes"] if p["active_tasks"]]
    assert len(busy) == 1
    p = busy[0]
    for k in ("pid", "state", "rss_kib", "processed", "active_tasks", "started_at"):
        assert k in p, k
    task = p["active_tasks"][0]
    assert task["id"] == res.id and task["name"] == "spark.sleep"
    assert task["runtime_s"] >= 0

    # RSS is measured by sparkd's memory timer (1 s) even before a process finishes a task
    wait_for(lambda: all(p["rss_kib"] > 0 for p in sd.processes()), t(3), what="RSS of every process")
    v = sd.ctl("status", "--verbose")
    assert v.rc == 0, v
    for p in w["processes"]:
        assert str(p["pid"]) in v.out
    assert res.id in v.out and "spark.sleep" in v.out
    assert re.search(r"(?i)rss", v.out) and re.search(r"(?i)restarts", v.out), v.out
    assert str(sd.pid) in v.out and str(sd.socket) in v.out
    # plain status does not list processes
    plain = sd.ctl("status")
    assert res.id not in plain.out
    assert res.get(timeout=t(10)) == 3


def test_status_exit_3_when_not_running(spark, tmp_path):
    sd = spark(broker=False)
    r = sd.ctl("status")
    assert r.rc == 3, r
    assert str(sd.socket) in r.err
    assert sd.ctl("status", "--json").rc == 3
    # a stale socket file left behind by a dead daemon is "not running" too
    sd.socket.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sd.socket))
    s.close()
    r = sd.ctl("status")
    assert r.rc == 3, r
    r = sd.ctl("--socket", str(tmp_path / "nothing.sock"), "status")
    assert r.rc == 3 and "nothing.sock" in r.err, r


def test_sigkill_replaced_within_one_second(spark):
    sd = spark()
    sd.start(workers=1, concurrency=2)
    before = sd.processes()
    victim = before[0]["pid"]
    others = {p["pid"] for p in before[1:]}
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()

    def replaced():
        ps = sd.processes()
        pids = {p["pid"] for p in ps}
        return victim not in pids and len(ps) == 2 and ps
    ps = wait_for(replaced, 2.0 if SAN else 1.0, interval=0.01, what="a replacement process")
    elapsed = time.monotonic() - t0
    assert elapsed < (2.0 if SAN else 1.0)
    assert others <= {p["pid"] for p in ps}, "the other process must not be touched"
    st = sd.wait_ready(1)
    reasons = [(p.get("last_exit") or {}).get("reason") for p in sd.processes(st)]
    assert "crashed (signal 9)" in reasons, reasons
    assert st["workers"][0]["restarts"] >= 1
    v = sd.ctl("status", "--verbose")
    assert "crashed (signal 9)" in v.out, v.out


def test_worker_failing_at_start_backs_off_and_keeps_retrying(spark, tmp_path):
    # A broken spark-worker binary (not executable) makes every start fail at once: a real failure operators meet.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    import harness
    for n in ("sparkd", "spark-worker", "sparkctl"):
        shutil.copy2(harness.binary(n), bindir / n)
    sd = spark(bin_dir=bindir)
    sd.start(workers=1, concurrency=1)
    (bindir / "spark-worker").chmod(0o644)
    os.kill(sd.processes()[0]["pid"], signal.SIGKILL)

    def in_backoff():
        st = sd.status()
        w = st["workers"][0]
        return (w["state"] == "backoff" or any(p["state"] == "backoff" for p in w["processes"])) and st
    st = wait_for(in_backoff, t(5), interval=0.01, what="state backoff")
    r1 = st["workers"][0]["restarts"]
    # keeps being retried (backoff grows from 100 ms: a few more attempts come within seconds)
    st = wait_for(lambda: (lambda s: s if s["workers"][0]["restarts"] >= r1 + 2 else None)(sd.status()), t(8),
                  what="further restart attempts")
    reasons = {(p.get("last_exit") or {}).get("reason") for p in sd.processes(st)}
    assert any(r and (r.startswith("exited (status") or r.startswith("crashed")) for r in reasons), reasons
    assert sd.running(), "sparkd must never give up or exit"
    # the state alternates between starting and backoff: the human output shows backoff while it waits
    wait_for(lambda: (lambda v: v.rc == 0 and "backoff" in v.out.lower())(sd.ctl("status", "--verbose")), t(5),
             interval=0.05, what="status --verbose to show backoff")
    # the fault is repaired: the next retry succeeds without any operator action
    (bindir / "spark-worker").chmod(0o755)
    sd.wait_ready(1, timeout=t(40))


def test_automagik_spark_guide_grammar(spark, celery):
    sd = spark()
    r = sd.ctl("workers", "start", "--workers", "1", "--concurrency", "2", prog="automagik-spark")
    assert r.rc == 0, r
    sd.pid = sd._read_pid()
    app = celery()
    assert app.send_task("spark.noop", args=["x"]).get(timeout=t(20)) == "x"
    s = wait_for(lambda: (lambda s: s if "Tasks Processed: 1" in s.out else None)(
        sd.ctl("workers", "status", prog="automagik-spark")), t(5), what="Tasks Processed: 1")
    assert s.rc == 0 and "Status: Active" in s.out, s
    v = sd.ctl("workers", "status", "--verbose", prog="automagik-spark")
    assert v.rc == 0 and all(str(p["pid"]) in v.out for p in sd.processes()), v
    lg = sd.ctl("workers", "logs", "--level", "error", prog="automagik-spark")
    assert lg.rc == 0, lg
    stop = sd.ctl("workers", "stop", prog="automagik-spark")
    assert stop.rc == 0, stop
    assert not sd.socket.exists()
    assert sd.ctl("workers", "status", prog="automagik-spark").rc == 3

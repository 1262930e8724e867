"""sparkctl logs: -n, --level, --worker, --follow; bounded followers (issue 2, and issue 4's RSS figure)."""

import json
import os
import queue
import re
import socket
import subprocess
import threading
import time

import pytest

from harness import SAN, RpcClient, proc_rss_kib, t, wait_for

LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def parse_json_lines(out):
    """logs --json: one JSON object per line (a single JSON document with "lines" is accepted too)."""
    out = out.strip()
    if not out:
        return []
    try:
        doc = json.loads(out)
        if isinstance(doc, dict) and "lines" in doc:
            return doc["lines"]
        if isinstance(doc, list):
            return doc
        return [doc]
    except json.JSONDecodeError:
        return [json.loads(l) for l in out.splitlines() if l.strip()]


def logs_json(sd, *args):
    r = sd.ctl("logs", *args, "--json")
    assert r.rc == 0, r
    return parse_json_lines(r.out)


def hostname():
    return socket.gethostname()


@pytest.fixture
def two_workers_with_history(spark, celery):
    sd = spark({"SPARK_LOGLEVEL": "info"})
    sd.start(workers=2, concurrency=1)
    app = celery()
    assert [r.get(timeout=t(20)) for r in [app.send_task("spark.noop", args=[i]) for i in range(20)]] == \
        list(range(20))
    bad = app.send_task("no.such.task", args=[1])
    try:
        bad.get(timeout=t(10), propagate=False)
    except Exception:
        pass
    wait_for(lambda: logs_json(sd, "--level", "error"), t(10), what="an error line for an unknown task")
    return sd, app


def test_lines_level_worker(two_workers_with_history):
    sd, _ = two_workers_with_history
    w1, w2 = f"celery-1@{hostname()}", f"celery-2@{hostname()}"

    all_lines = logs_json(sd, "-n", "10000")
    assert len(all_lines) > 10
    for e in all_lines:
        for k in ("ts", "level", "worker", "pid", "msg"):
            assert k in e, e
    ts = [e["ts"] for e in all_lines]
    assert ts == sorted(ts), "lines are merged in time order"
    assert {w1, w2} <= {e["worker"] for e in all_lines}

    five = logs_json(sd, "-n", "5")
    assert len(five) == 5
    assert [e["msg"] for e in five] == [e["msg"] for e in all_lines[-5:]], "the last 5 lines"
    assert len(logs_json(sd, "--lines", "3")) == 3
    default = logs_json(sd)
    assert len(default) == min(100, len(all_lines))

    human = sd.ctl("logs", "-n", "5")
    assert human.rc == 0, human
    hl = [l for l in human.out.splitlines() if l.strip()]
    assert len(hl) == 5, human.out
    for line, e in zip(hl, five):
        assert e["worker"] in line and e["level"].upper() in line.upper() and e["msg"] in line, (line, e)
        assert re.search(r"\d\d:\d\d:\d\d", line), line

    errors = logs_json(sd, "--level", "error", "-n", "10000")
    assert errors and all(e["level"].upper() in ("ERROR", "CRITICAL") for e in errors), errors
    warn = logs_json(sd, "--level", "warning", "-n", "10000")
    assert all(e["level"].upper() in ("WARNING", "ERROR", "CRITICAL") for e in warn)
    assert len(warn) >= len(errors)
    human_err = sd.ctl("logs", "--level", "error")
    assert human_err.rc == 0 and "INFO" not in human_err.out, human_err

    only2 = logs_json(sd, "--worker", w2, "-n", "10000")
    assert only2 and all(e["worker"] == w2 for e in only2)
    assert len(only2) == len([e for e in all_lines if e["worker"] == w2])
    assert len(logs_json(sd, "--worker", w1, "-n", "2")) == 2
    assert logs_json(sd, "--worker", "celery-9@nowhere") == []

    bad = sd.ctl("logs", "--level", "loud")
    assert bad.rc != 0 and len(bad.err_lines()) == 1 and "loud" in bad.err, bad


class Follower:
    """`sparkctl logs --follow …` in the background, its stdout lines in a queue."""

    def __init__(self, sd, *args):
        self.proc = subprocess.Popen([str(sd.bin_dir / "sparkctl"), "logs", "--follow", *args], env=sd.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.q = queue.Queue()
        self.th = threading.Thread(target=self._read, daemon=True)
        self.th.start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def lines_until(self, pred, timeout):
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            got.append(line)
            if pred(line):
                return got
        raise AssertionError(f"follower never printed the expected line; got {got[-20:]}; "
                             f"stderr: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=t(5))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def test_follow_streams_new_lines_and_filters(two_workers_with_history):
    sd, app = two_workers_with_history
    w1 = f"celery-1@{hostname()}"
    # -n 1: sparkd sends the newest matching line and subscribes the client in the same step, so a follower that
    # printed it is subscribed (the history holds an error line and lines of both workers)
    f_all = Follower(sd, "-n", "1", "--json")
    f_err = Follower(sd, "--level", "error", "-n", "1", "--json")
    f_w1 = Follower(sd, "--worker", w1, "-n", "1", "--json")
    try:
        first = {f: f.lines_until(lambda l: True, t(10)) for f in (f_all, f_err, f_w1)}
        res = app.send_task("spark.noop", args=["followed"])
        assert res.get(timeout=t(20)) == "followed"
        got = f_all.lines_until(lambda l: res.id in l, t(10))
        for l in got:
            json.loads(l)
        bad = app.send_task("another.unknown.task", args=[])
        try:
            bad.get(timeout=t(10), propagate=False)
        except Exception:
            pass
        errs = first[f_err] + f_err.lines_until(lambda l: "another.unknown.task" in l or bad.id in l, t(10))
        assert all(json.loads(l)["level"].upper() in ("ERROR", "CRITICAL") for l in errs), errs
        # work for both workers: two single-slot processes and two sleeps sent together, so the one that takes the
        # first sleep cannot take the second (noops alone may all go to whichever process is awake); the worker-1
        # follower sees only worker 1: everything it printed up to worker 1's newest line (lines reach a follower
        # in the ring's order)
        start = json.loads(first[f_w1][-1])
        sleeps = [app.send_task("spark.sleep", args=[2]) for _ in range(2)]
        for r in sleeps:
            r.get(timeout=t(20))
        newest = wait_for(lambda: (lambda l: l != start and l)(logs_json(sd, "--worker", w1, "-n", "1")[0]), t(10),
                          what="a line of worker 1 since the follower started")
        w1lines = first[f_w1] + f_w1.lines_until(lambda l: json.loads(l) == newest, t(10))
        assert all(json.loads(l)["worker"] == w1 for l in w1lines), w1lines
        # --follow runs until interrupted, and an interrupt ends it promptly
        assert f_all.proc.poll() is None
    finally:
        rcs = [f.stop() for f in (f_all, f_err, f_w1)]
    assert None not in rcs


def dropped_marker(msg):
    if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == 2):
        return None
    payload = msg[2][0] if isinstance(msg[2], list) and msg[2] else msg[2]
    if msg[1] == "dropped":
        return payload
    if msg[1] == "log" and isinstance(payload, dict) and "dropped" in payload:
        return payload
    return None


def log_volume(sd):
    total = 0
    for root, _, files in os.walk(sd.log_dir):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def test_followers_that_never_read_do_not_grow_sparkd(spark, celery, redis):
    # A small ring, so that the ring itself cannot account for growth; debug logging for volume.
    sd = spark({"SPARK_LOGLEVEL": "debug", "SPARK_LOG_LINES": "100"})
    sd.start(workers=1, concurrency=2)
    app = celery()
    payload = "x" * 2000
    long_name = "load." + "n" * 1500

    def burst(n):
        for i in range(n):
            app.send_task("spark.noop", args=[payload], ignore_result=True)
            app.send_task(long_name, args=[i], ignore_result=True)
        r = redis.client()
        wait_for(lambda: r.llen("celery") == 0, t(60), interval=0.05, what="the queue to drain")

    burst(100)  # warm up allocator and ring
    base = proc_rss_kib(sd.pid)
    followers = []
    for _ in range(20):
        c = RpcClient(sd.socket, timeout=t(10))
        c.send_request("logs", {"follow": True, "lines": 0})
        followers.append(c)
    try:
        start_vol = log_volume(sd)
        target = 3 * 1024 * 1024
        deadline = time.monotonic() + t(60)
        while log_volume(sd) - start_vol < target:
            assert time.monotonic() < deadline, \
                f"workers logged only {log_volume(sd) - start_vol} bytes; cannot load the followers"
            burst(200)
            assert sd.running()
        produced = log_volume(sd) - start_vol
        grown = proc_rss_kib(sd.pid) - base
        limit = (24 if SAN else 8) * 1024
        print(f"sparkd RSS {base} KiB -> +{grown} KiB with 20 stalled followers over {produced} bytes of logs")
        assert grown < limit, f"sparkd grew by {grown} KiB with 20 stalled followers ({produced} bytes of logs)"

        # the daemon keeps serving everyone else
        err, res = sd.rpc("ping")
        assert err is None and res["pid"] == sd.pid

        # a follower that starts reading again learns that lines were dropped
        c = followers[0]
        marker = None
        deadline = time.monotonic() + t(30)
        while marker is None and time.monotonic() < deadline:
            try:
                msg = c.recv(timeout=1.0)
            except socket.timeout:
                burst(5)
                continue
            if msg is None:
                break
            marker = dropped_marker(msg)
        assert marker is not None, "no dropped marker reached the slow follower"
        n = marker.get("dropped") if isinstance(marker, dict) else marker
        assert isinstance(n, int) and n > 0, marker
    finally:
        for c in followers:
            c.close()
    err, res = sd.rpc("ping")
    assert err is None

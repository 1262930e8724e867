"""Warm and cold stop (issue 2): in-flight tasks finish or go back, nothing is lost, the daemon cleans up."""

import signal
import time

import pytest

from harness import pid_alive, t, wait_for


def queue_state(redis):
    """(messages in the celery queue, list keys holding anything, unacked entries)."""
    r = redis.client()
    lists = sorted(k.decode(errors="replace") for k in r.keys("*") if r.type(k) == b"list")
    return r.llen("celery"), lists, r.hlen("unacked")


def wait_active(sd, n):
    return wait_for(lambda: (lambda s: s if sum(w["active"] for w in s["workers"]) == n else None)(sd.status()),
                    t(15), what=f"{n} active tasks")


def assert_all_gone(sd):
    assert not sd.socket.exists(), "socket must be removed"
    assert not sd.pid_file.exists(), "pid file must be removed"
    assert not sd.all_pids(), f"processes left: {sd.all_pids()}"


def test_warm_stop_finishes_in_flight_and_puts_back_the_rest(spark, celery, redis):
    sd = spark()
    sd.start(workers=1, concurrency=2, mode="fg")
    workers = {p["pid"] for p in sd.processes()}
    app = celery()
    running = [app.send_task("spark.sleep", args=[2]) for _ in range(2)]
    wait_active(sd, 2)
    queued = [app.send_task("spark.sleep", args=[1]) for _ in range(3)]
    t0 = time.monotonic()
    r = sd.stop()
    assert r.rc == 0, r
    # stop returns when the daemon is gone
    assert not pid_alive(sd.pid)
    assert sd.proc.wait(timeout=t(5)) == 0
    for p in workers:
        assert not pid_alive(p)
    assert time.monotonic() - t0 >= 1.0, "a warm stop waits for the running tasks"
    for res in running:
        assert res.state == "SUCCESS" and res.result == 2
    for res in queued:
        assert res.state == "PENDING"
    n, lists, unacked = queue_state(redis)
    assert n == 3, "every unstarted message is back in the queue"
    assert lists == ["celery"], f"no message may be left in a processing list: {lists}"
    assert unacked == 0
    assert_all_gone(sd)

    sd2 = spark(name="again")
    sd2.start(workers=1, concurrency=2)
    assert [res.get(timeout=t(20)) for res in queued] == [1, 1, 1]


def test_force_stop_is_cold_and_loses_nothing(spark, celery, redis):
    sd = spark()
    sd.start(workers=1, concurrency=2)
    app = celery()
    inflight = [app.send_task("spark.sleep", args=[4]) for _ in range(2)]
    wait_active(sd, 2)
    r = sd.stop("--force")
    assert r.rc == 0, r
    assert not pid_alive(sd.pid)
    # interrupted, not finished, and not recorded as failed
    for res in inflight:
        assert res.state not in ("SUCCESS", "FAILURE"), res.state
    assert_all_gone(sd)

    sd2 = spark(name="again")
    sd2.start(workers=1, concurrency=2)
    assert [res.get(timeout=t(30)) for res in inflight] == [4, 4]
    wait_for(lambda: queue_state(redis)[0] == 0 and queue_state(redis)[2] == 0, t(10),
             what="queue and unacked empty after the rerun")


def test_stop_timeout_escalates_to_cold(spark, celery, redis):
    sd = spark()
    sd.start(workers=1, concurrency=1)
    app = celery()
    res = app.send_task("spark.sleep", args=[30])
    wait_active(sd, 1)
    t0 = time.monotonic()
    r = sd.stop("--timeout", "1")
    assert r.rc == 0, r
    assert time.monotonic() - t0 < t(15), "--timeout must escalate long before the task ends"
    assert not pid_alive(sd.pid)
    assert res.state not in ("SUCCESS", "FAILURE")
    assert_all_gone(sd)
    # the interrupted message is not lost
    r = redis.client()
    held = r.llen("celery") + r.hlen("unacked") + sum(r.llen(k) for k in r.keys("*") if r.type(k) == b"list"
                                                       and k != b"celery")
    assert held >= 1, "the interrupted task must still be in Redis"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGQUIT", "SIGINT-twice"])
def test_signals(spark, celery, redis, how):
    sd = spark()
    sd.start(workers=1, concurrency=1, mode="fg")
    app = celery()
    # a cold stop must come while the task still runs: give it room on a loaded machine
    res = app.send_task("spark.sleep", args=[2 if how == "SIGTERM" else 6])
    wait_active(sd, 1)
    if how == "SIGTERM":
        sd.proc.send_signal(signal.SIGTERM)
    elif how == "SIGQUIT":
        sd.proc.send_signal(signal.SIGQUIT)
    else:
        sd.proc.send_signal(signal.SIGINT)
        # two pending SIGINTs merge into one: the second goes once sparkd has taken the first
        wait_for(lambda: "SIGINT: warm stop" in sd.tail(), t(10), what="sparkd's log of the first SIGINT")
        sd.proc.send_signal(signal.SIGINT)
    assert sd.proc.wait(timeout=t(20)) == 0
    assert_all_gone(sd)
    if how == "SIGTERM":
        assert res.state == "SUCCESS" and res.result == 2, "SIGTERM is a warm stop"
    else:
        assert res.state not in ("SUCCESS", "FAILURE"), f"{how} is a cold stop"
        sd2 = spark(name="again")
        sd2.start(workers=1, concurrency=1)
        assert res.get(timeout=t(20)) == 6

"""sparkd's other commands to a worker (common/command.h), sent on fd 3 to spark-worker run alone: `queues`
changes the consumed queues live, `time_limit` sets a task name's limits, and `query` answers what the process
holds as the dicts Celery's inspect returns (one `answer` report each, JSON, then `answered`)."""

import time

from engine_util import meta
from harness import t, wait_for
from worker_util import Worker

INFO_KEYS = {"id", "name", "args", "kwargs", "type", "hostname", "time_start", "acknowledged", "delivery_info",
             "worker_pid"}


def test_queues_command_consumes_a_new_queue(tmp_path, redis, celery):
    app = celery()
    w = Worker(tmp_path, redis)
    try:
        w.send("queues", "celery", "q2")
        r = app.send_task("spark.noop", args=["via q2"], queue="q2")
        assert r.get(timeout=t(10)) == "via q2"
        assert app.send_task("spark.noop", args=[1]).get(timeout=t(10)) == 1  # still the old one too
        assert redis.client(0).sismember("_kombu.binding.q2", b"q2\x06\x16\x06\x16q2")
        w.send("queues", "q2")  # celery dropped: a message there waits
        wait_for(lambda: "Consuming from queues q2" in w.text(), t(5), what="queue change logged")
        left = app.send_task("spark.noop", args=[2])
        assert app.send_task("spark.noop", args=[3], queue="q2").get(timeout=t(10)) == 3
        assert redis.client(0).llen("celery") == 1 and left.state == "PENDING"
    finally:
        assert w.stop() == 0


def test_time_limit_command(tmp_path, redis, celery):
    app = celery()
    w = Worker(tmp_path, redis)
    try:
        w.send("time_limit", "spark.sleep", "0.3", "5")
        r = app.send_task("spark.sleep", args=[30])
        wait_for(lambda: (meta(redis.client(1), r.id) or {}).get("status") == "FAILURE", t(10), what="soft limit")
        assert meta(redis.client(1), r.id)["result"]["exc_type"] == "SoftTimeLimitExceeded"
        assert app.send_task("spark.noop", args=[1]).get(timeout=t(10)) == 1  # other names keep the defaults
    finally:
        assert w.stop() == 0


def test_query_active_reserved_stats_query_task(tmp_path, redis, celery):
    app = celery()
    backend = redis.client(1)
    w = Worker(tmp_path, redis, env={"CELERY_WORKER_PREFETCH_MULTIPLIER": "2"}, name="celery@qhost")
    try:
        assert app.send_task("spark.noop", args=[0]).get(timeout=t(10)) == 0
        before = time.time()
        sleeper = app.send_task("spark.sleep", args=[30], kwargs={})
        wait_for(lambda: (meta(backend, sleeper.id) or {}).get("status") == "STARTED", t(10), what="sleep started")
        waiting = app.send_task("spark.noop", args=["x" * 5000])  # args beyond the cap: cut, still one datagram
        wait_for(lambda: w.query("reserved"), t(10), what="the noop prefetched")

        [active] = w.query("active")
        assert set(active) == INFO_KEYS
        assert active["id"] == sleeper.id and active["name"] == active["type"] == "spark.sleep"
        assert active["args"] == [30] and active["kwargs"] == {}
        assert active["hostname"] == "celery@qhost" and active["worker_pid"] == w.proc.pid
        assert before - 1 <= active["time_start"] <= time.time() and active["acknowledged"] is False
        assert active["delivery_info"] == {"exchange": "", "routing_key": "celery", "priority": 0,
                                           "redelivered": False}

        [reserved] = w.query("reserved")
        assert reserved["id"] == waiting.id and reserved["time_start"] is None and reserved["worker_pid"] is None
        assert reserved["args"].startswith('["xxx') and reserved["args"].endswith("...")
        assert len(reserved["args"]) < 1100

        [stats] = w.query("stats")
        assert stats["total"] == {"spark.noop": 1, "spark.sleep": 1}
        assert stats["pid"] == w.proc.pid and stats["rusage"]["maxrss"] > 0 and stats["rusage"]["utime"] >= 0

        got = w.query("query_task", sleeper.id, waiting.id, "no-such-id")
        states = {k: v[0] for item in got for k, v in item.items()}
        assert states == {sleeper.id: "active", waiting.id: "reserved"}
        assert w.query("scheduled") == [] and w.query("no-such-query") == []
        w.revoke([sleeper.id], terminate=True)
    finally:
        assert w.stop() == 0

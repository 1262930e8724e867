"""Poison messages end somewhere (issue 9, item 5): a message too large to decode, a message whose deliveries kill
their process, and malformed numeric fields each end in spark:deadletter with their reason (and a FAILURE result
when they name a task), within a bounded number of deliveries, while good messages behind them run; the
dead-letter list never exceeds SPARK_DEADLETTER_MAX and its entries are bounded in size."""

import json
import os
import signal

from engine_util import DEADLETTER, deadletter_entries, envelope, processing_lists
from harness import t, wait_for


def status_pids(sd):
    st = sd.ctl_json("status")
    return [(p["pid"], p) for w in st["workers"] for p in (w.get("processes") or []) if p.get("pid")]


def running_pid(sd, task_id):
    for pid, p in status_pids(sd):
        if any(a.get("id") == task_id for a in p.get("active_tasks") or []):
            return pid


def sparkd_log(sd):
    return "\n".join(f.read_text(errors="replace") for f in sorted(sd.log_dir.iterdir()) if f.is_file())


def nothing_held(r):
    return r.llen("celery") == 0 and not any(processing_lists(r).values()) and r.hlen("unacked") == 0


def test_50mb_message_is_dead_lettered_undecoded_and_the_next_runs(spark, celery, redis):
    r = redis.client()
    sd = spark()
    sd.start("--pool", "prefork", workers=1, concurrency=1)
    app = celery()
    # 37 MB of argument: 50 MB of envelope once the body is in base64
    big = envelope(task="spark.noop", args=["x" * (37 * 1024 * 1024)])
    raw = json.dumps(big).encode()
    tid = big["headers"]["id"]
    r.lpush("celery", raw)
    good = app.send_task("spark.noop", args=["behind it"])
    assert good.get(timeout=t(60)) == "behind it"

    # its entry keeps the head of the envelope (the body: the id comes after it): known by its size
    entries = wait_for(lambda: [e for e, _ in deadletter_entries(r) if e.get("message_bytes") == len(raw)], t(30),
                       what="the 50 MB message in spark:deadletter")
    assert len(entries) == 1, entries
    e = entries[0]
    assert "SPARK_MAX_MESSAGE_BYTES" in e["reason"], e["reason"]
    assert e["queue"] == "celery"
    assert e["truncated"] is True and e["message_bytes"] == len(raw)
    assert raw.startswith(e["message"].encode()) and len(e["message"]) == 65536
    res = app.AsyncResult(tid)
    assert res.state == "FAILURE"
    assert "SPARK_MAX_MESSAGE_BYTES" in str(res.result)
    wait_for(lambda: nothing_held(r), t(10), what="nothing left held")
    # one delivery, never decoded: the process was neither recycled for memory nor crashed by it
    assert all(p["restarts"] == 0 for _, p in status_pids(sd)), status_pids(sd)
    assert sparkd_log(sd).count("larger than SPARK_MAX_MESSAGE_BYTES") == 1


def test_message_that_kills_its_process_ends_as_poison(spark, celery, redis):
    r = redis.client()
    sd = spark()
    sd.start("--pool", "prefork", workers=1, concurrency=1)
    app = celery()
    # a task that crashes its process: every process that starts it is killed with SIGKILL while it runs (as
    # the OOM killer or a segfault would end it); the message behind it waits for the single slot
    poison = app.send_task("spark.sleep", args=[600])
    good = app.send_task("spark.noop", args=["after the poison"])
    killed = []

    def next_victim():
        pid = running_pid(sd, poison.id)
        # status may still show a killed process until sparkd has reaped it
        return (pid if pid not in killed else None) or r.llen(DEADLETTER) > 0
    while len(killed) < 10:
        pid = wait_for(next_victim, t(30), interval=0.05, what="the poison task running, or dead-lettered")
        if pid is True:
            break
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    # SPARK_POISON_DELIVERIES=3: the third death is the last
    assert len(killed) == 3, killed
    assert good.get(timeout=t(60)) == "after the poison"
    entries = [e for e, raw in deadletter_entries(r) if poison.id.encode() in raw]
    assert len(entries) == 1, deadletter_entries(r)
    assert "poison" in entries[0]["reason"] and "SPARK_POISON_DELIVERIES" in entries[0]["reason"], entries[0]
    assert poison.state == "FAILURE"
    assert type(poison.result).__name__ == "WorkerLostError", repr(poison.result)
    # the delivery count went with it; nothing is held or queued any more
    assert not list(r.scan_iter(match="spark:deliveries:*"))
    wait_for(lambda: nothing_held(r), t(10), what="nothing left held")


def test_one_death_is_not_poison_and_the_count_expires(spark, celery, redis):
    r = redis.client()
    sd = spark()
    sd.start("--pool", "prefork", workers=1, concurrency=1)
    app = celery()
    res = app.send_task("spark.sleep", args=[1.5])
    pid = wait_for(lambda: running_pid(sd, res.id), t(30), interval=0.05, what="the task running")
    os.kill(pid, signal.SIGKILL)
    assert res.get(timeout=t(60)) == 1.5
    assert r.llen(DEADLETTER) == 0
    counts = list(r.scan_iter(match="spark:deliveries:*"))
    assert len(counts) == 1 and r.get(counts[0]) == b"1"
    assert 0 < r.ttl(counts[0]) <= 86400


def test_malformed_numeric_fields_are_dead_lettered_with_their_reason(spark, celery, redis):
    r = redis.client()
    cases = []
    for field, value in [("retries", "3"), ("retries", -1), ("timelimit", [5]), ("timelimit", "30"),
                         ("eta", "tomorrow"), ("eta", -10), ("expires", {"at": 1})]:
        env = envelope(task="spark.noop", args=[1], headers={field: value})
        cases.append((field, env))
    for value in ["high", 300]:
        env = envelope(task="spark.noop", args=[1])
        env["properties"]["priority"] = value
        cases.append(("priority", env))
    sd = spark()
    sd.start("--pool", "threads", workers=1, concurrency=4)
    app = celery()
    for _, env in cases:
        r.lpush("celery", json.dumps(env))
    wait_for(lambda: r.llen(DEADLETTER) >= len(cases), t(20), what="every malformed message dead-lettered")
    entries = deadletter_entries(r)
    for field, env in cases:
        tid = env["headers"]["id"]
        match = [e for e, raw in entries if tid.encode() in raw]
        assert len(match) == 1, (field, entries)
        assert match[0]["reason"].startswith(field), (field, match[0]["reason"])
        res = app.AsyncResult(tid)
        assert res.state == "FAILURE", (field, res.state)
        assert field in str(res.result)
    assert app.send_task("spark.noop", args=["fine"]).get(timeout=t(15)) == "fine"
    wait_for(lambda: nothing_held(r), t(10), what="nothing left held")


def test_task_id_too_long_for_a_report_is_refused_at_decode(spark, celery, redis):
    r = redis.client()
    sd = spark()
    sd.start("--pool", "prefork", workers=1, concurrency=1)
    env = envelope(task="spark.noop", args=[1], task_id="i" * 20000)
    r.lpush("celery", json.dumps(env))
    wait_for(lambda: r.llen(DEADLETTER) == 1, t(20), what="the message dead-lettered")
    (e, raw), = deadletter_entries(r)
    assert "MESSAGE_MAX_ID" in e["reason"], e["reason"]
    assert "malformed report" not in sparkd_log(sd)


def test_deadletter_list_never_exceeds_its_cap_and_entries_are_bounded(spark, celery, redis):
    r = redis.client()
    sd = spark(env={"SPARK_DEADLETTER_MAX": "5"})
    sd.start("--pool", "threads", workers=1, concurrency=4)
    bad = [f"not json {i} {{".encode() for i in range(11)] + [b"{" * 100000]
    for raw in bad:
        r.lpush("celery", raw)  # taken from the right: the first one pushed is taken first
    sizes = []

    def drained():
        sizes.append(r.llen(DEADLETTER))
        return nothing_held(r)
    wait_for(drained, t(30), interval=0.01, what="every bad message handled")
    assert max(sizes) <= 5, sizes
    entries = deadletter_entries(r)
    assert len(entries) == 5
    kept = {raw for _, raw in entries}
    # the oldest went; the newest, 100 KB, stayed with its first 64 KiB and the cut named
    assert bad[0] not in kept and bad[1] not in kept
    (big,) = [e for e, raw in entries if raw.startswith(b"{{{")]
    assert big["truncated"] is True and big["message_bytes"] == 100000 and len(big["message"]) == 65536

#!/usr/bin/python3
"""Round-trip latency against an idle worker: one `send_task("spark.noop")` + `.get()` at a time, ours against
Python Celery, on the default queue `celery` and on a second queue `direct` (both systems consume both: ours with
SPARK_QUEUES=celery,direct, Celery with -Q celery,direct), so an engine that only watches its first queue closely
shows it here.

The client is the same Python Celery producer for both (send_task, then AsyncResult.get over the Redis result
backend), with a short gap between round trips so each message finds the worker idle in its wait.

Usage: bench/latency.py BIN_DIR [--count N] [--runs R] [--gap-ms G]
"""
import argparse
import gc
import shutil
import sys
import tempfile
import time

from common import BenchError, RedisServer, celery_client, fmt, percentile, table
from systems import Ours, PyCelery

QUEUES = ("celery", "direct")
WARMUP = 10


def make_systems(bindir, tmp, r):
    return [Ours(bindir, tmp, r, 1, 2, "prefork", env={"SPARK_QUEUES": ",".join(QUEUES)},
                 label="ours prefork W1 C2"),
            PyCelery(tmp, r, "celery_bench_app", "prefork", 2, queues=QUEUES, label="Celery prefork c2")]


def series(app, queue, count, gap):
    """Round-trip times in ms of `count` sequential tasks on queue; failures counted, never waited on forever."""
    times, failures = [], 0
    for i in range(WARMUP + count):
        t0 = time.perf_counter()
        try:
            app.send_task("spark.noop", args=[i], queue=queue).get(timeout=10)
        except Exception:  # a timeout or a lost result is a data point, not the end of the bench
            failures += 1
            continue
        if i >= WARMUP:
            times.append((time.perf_counter() - t0) * 1000.0)
        time.sleep(gap)
    return sorted(times), failures


def run(bindir, tmp, r, count, runs, gap_ms=10, log=print):
    app = celery_client(r.url(0), r.url(1))
    res = {}  # (label, queue) -> list of (p50, p99, failures)
    for i in range(runs):
        for system in make_systems(bindir, tmp, r):
            r.broker.flushall()
            try:
                system.start()
                for q in QUEUES:
                    times, fails = series(app, q, count, gap_ms / 1000.0)
                    p50, p99 = percentile(times, 50), percentile(times, 99)
                    res.setdefault((system.label, q), []).append((p50, p99, fails))
                    log(f"latency run {i + 1}: {system.label} queue {q}: p50 "
                        + (f"{p50:.2f} ms, p99 {p99:.2f} ms" if times else "—")
                        + f", {fails} failed of {count + WARMUP}")
            except BenchError as e:
                log(f"latency run {i + 1}: {system.label}: FAILED: {e}")
                for q in QUEUES:
                    res.setdefault((system.label, q), []).append((None, None, str(e)))
            finally:
                system.stop()
    gc.collect()  # AsyncResult.__del__ talks to Redis: run it while Redis is still up
    rows = []
    for (label, q), vals in res.items():
        fails = [f for _, _, f in vals]
        rows.append([label, f"`{q}`", fmt([v[0] for v in vals], 2, " ms"), fmt([v[1] for v in vals], 2, " ms"),
                     ", ".join(str(f) for f in fails)])
    lines = [f"### Round trip, idle worker: {count} sequential `spark.noop` send + get per queue "
             f"({runs} run(s), {gap_ms} ms between round trips)", ""]
    lines += table(["configuration", "queue", "p50", "p99", "failed per run"], rows)
    return lines, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gap-ms", type=int, default=10)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="spark-bench-")
    r = RedisServer(tmp)
    try:
        lines, _ = run(a.bindir, tmp, r, a.count, a.runs, a.gap_ms)
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Drain benchmark: N pre-enqueued spark.noop tasks with results stored, our workers against Python Celery.

Both sides run on the same private Redis, in the same run, alternately, RUNS times each. The tasks are written
to a staging list while the workers idle, then RENAMEd onto the queue in one atomic step, so start-up time is not
counted; the clock stops when the last result is stored. Idle RSS is read from /proc for every worker process.

Usage: bench/drain.py BIN_DIR [--tasks N] [--runs R] [--out docs/benchmarks.md]
"""
import argparse
import base64
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import redis

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def envelope(task_id, arg):
    """A Celery protocol-v2 message exactly as Celery 5.2 writes it (reference §1.3)."""
    body = json.dumps([[arg], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "spark.noop", "id": task_id, "shadow": None, "eta": None,
                    "expires": None, "group": None, "group_index": None, "retries": 0,
                    "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                    "argsrepr": repr((arg,)), "kwargsrepr": "{}", "origin": "gen0@bench",
                    "ignore_result": False},
        "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children(pid):
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


class Redis:
    def __init__(self, tmp):
        self.port = free_port()
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir)
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", self.dir, "--daemonize", "yes",
                        "--pidfile", os.path.join(self.dir, "redis.pid")], check=True, stdout=subprocess.DEVNULL)
        self.broker = redis.Redis(port=self.port, db=0)
        self.backend = redis.Redis(port=self.port, db=1)
        for _ in range(100):
            try:
                self.broker.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

    def stop(self):
        try:
            self.broker.shutdown(nosave=True)
        except redis.ConnectionError:
            pass


def stage(r, n):
    r.broker.flushall()
    pipe = r.broker.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush("bench:staging", envelope(str(uuid.uuid4()), i))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def release_and_time(r, n, timeout=600):
    t0 = time.monotonic()
    r.broker.rename("bench:staging", "celery")
    while True:
        done = r.backend.dbsize()
        if done >= n:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {done}/{n} results after {timeout}s")
        time.sleep(0.02)


def wait_idle_rss(pids, settle=2.0):
    time.sleep(settle)
    return [rss_kib(p) for p in pids if rss_kib(p) is not None]


class Ours:
    name = "spark-worker (C)"

    def __init__(self, bindir, r, tmp):
        self.bindir, self.r, self.tmp = bindir, r, tmp

    def start(self):
        sock = os.path.join(self.tmp, "sparkd.sock")
        env = dict(os.environ, CELERY_BROKER_URL=f"redis://127.0.0.1:{self.r.port}/0",
                   CELERY_RESULT_BACKEND=f"redis://127.0.0.1:{self.r.port}/1", SPARK_SOCKET=sock,
                   SPARK_LOG_DIR=os.path.join(self.tmp, "log"), SPARK_ENV_FILE="",
                   CELERY_WORKER_MAX_TASKS_PER_CHILD="0", SPARK_LOGLEVEL="warning")
        self.proc = subprocess.Popen([os.path.join(self.bindir, "sparkd"), "--workers", "1", "--concurrency", "2",
                                      "--pool", "prefork"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        ctl = os.path.join(self.bindir, "sparkctl")
        for _ in range(200):
            out = subprocess.run([ctl, "--socket", sock, "status", "--json"], capture_output=True, text=True)
            if out.returncode == 0:
                st = json.loads(out.stdout)
                procs = [p for w in st["workers"] for p in w["processes"]]
                if procs and all(p["state"] == "active" for p in procs) and len(procs) == 2:
                    self.pids = [p["pid"] for p in procs]
                    return
            time.sleep(0.1)
        raise RuntimeError("sparkd did not become ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class PyCelery:
    name = "Python Celery 5.2 prefork"

    def __init__(self, bindir, r, tmp):
        self.r, self.tmp = r, tmp

    def start(self):
        env = dict(os.environ, BENCH_BROKER=f"redis://127.0.0.1:{self.r.port}/0",
                   BENCH_BACKEND=f"redis://127.0.0.1:{self.r.port}/1", PYTHONPATH=HERE)
        self.proc = subprocess.Popen(["/usr/bin/python3", "-m", "celery", "-A", "celery_bench_app", "worker",
                                      "-P", "prefork", "-c", "2", "--without-heartbeat", "--without-gossip",
                                      "--without-mingle", "-Q", "celery", "-l", "warning"],
                                     env=env, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # ready when both pool children exist and the consumer is polling the queue
        for _ in range(300):
            kids = children(self.proc.pid)
            polling = any(c.get("cmd") == "brpop" for c in self.r.broker.client_list())
            if len(kids) >= 2 and polling:
                self.pids = kids
                return
            time.sleep(0.1)
        raise RuntimeError("celery worker did not become ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="spark-bench-")
    r = Redis(tmp)
    results = {Ours.name: [], PyCelery.name: []}
    rss = {Ours.name: [], PyCelery.name: []}
    try:
        for run in range(a.runs):
            for cls in (Ours, PyCelery):
                w = cls(a.bindir, r, tmp)
                stage(r, a.tasks)
                w.start()
                rss[cls.name].extend(wait_idle_rss(w.pids))
                secs = release_and_time(r, a.tasks)
                w.stop()
                results[cls.name].append(secs)
                print(f"run {run + 1}: {cls.name}: {a.tasks} tasks in {secs:.2f}s = {a.tasks / secs:.0f}/s",
                      flush=True)
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    mrss = {k: statistics.median(v) for k, v in rss.items()}
    ours, py = Ours.name, PyCelery.name
    lines = [
        "| | median drain time | tasks/s | idle RSS per worker process (median) |",
        "|---|---|---|---|",
        f"| {ours} | {med[ours]:.2f} s | {a.tasks / med[ours]:.0f} | {mrss[ours] / 1024:.1f} MiB |",
        f"| {py} | {med[py]:.2f} s | {a.tasks / med[py]:.0f} | {mrss[py] / 1024:.1f} MiB |",
        f"| ratio | | **{med[py] / med[ours]:.1f}×** throughput | **1/{mrss[py] / mrss[ours]:.1f}** RSS |",
        "",
        f"Runs ({a.runs} each, alternating): ours {', '.join(f'{x:.2f}' for x in results[ours])} s; "
        f"Celery {', '.join(f'{x:.2f}' for x in results[py])} s. "
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release().split('-')[0]}.",
    ]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

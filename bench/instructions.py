#!/usr/bin/python3
"""Instructions per no-op task of one spark-worker process under valgrind's callgrind: a figure that does not move
with whatever else the machine runs, beside the noisy CPU times of bench/events.py.

The worker (no sparkd) drains N and then 2N staged spark.noop messages with results stored; the difference of the
two instruction totals over N leaves start-up and shutdown out. Under valgrind the worker runs some fifty times
slower, so Redis always answers before it asks again: every tick takes the most messages it may (the slots), which
is the busy case of a real drain. User-space instructions only (the kernel's share is in bench/events.py's system
µs). Needs valgrind (not a dependency of the project).

Usage: bench/instructions.py BIN_DIR [BIN_DIR ...] [--slots 8,1] [--tasks N] [--events off,on]
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import BenchError, RedisServer, table, wait_until
from drain import STAGING, stage


def total_instructions(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(summary|totals):\s*(\d+)", line)
            if m:
                return int(m.group(2))
    raise BenchError(f"no totals in {path}")


def one_drain(bindir, tmp, r, slots, n, events):
    """Instructions of a worker that drained n messages (start-up and shutdown included)."""
    stage(r, n)
    r.broker.rename(STAGING, "celery")
    out = os.path.join(tmp, f"callgrind.{slots}.{n}.{events}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SPARK_", "AUTOMAGIK_"))}
    env.pop("DATABASE_URL", None)
    env.update(CELERY_BROKER_URL=r.url(0), CELERY_RESULT_BACKEND=r.url(1), SPARK_QUEUES="celery",
               CELERY_WORKER_MAX_TASKS_PER_CHILD="0", SPARK_LOGLEVEL="warning", SPARK_ENV_FILE="",
               CELERY_WORKER_SEND_TASK_EVENTS="True" if events == "on" else "False")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             os.path.join(bindir, "spark-worker"), "--slots", str(slots)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_until(lambda: r.backend.dbsize() >= n, max(120.0, n / 50.0), 0.1):
            raise BenchError(f"{r.backend.dbsize()}/{n} results")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return total_instructions(out)


def run(bindirs, slots_list, tasks, events_list, log=print):
    tmp = tempfile.mkdtemp(prefix="spark-instr-")
    r = RedisServer(tmp)
    rows = []
    try:
        for slots in slots_list:
            for events in events_list:
                for bindir in bindirs:
                    try:
                        a = one_drain(bindir, tmp, r, slots, tasks, events)
                        b = one_drain(bindir, tmp, r, slots, 2 * tasks, events)
                        per = (b - a) / tasks
                        cell = f"{per:,.0f}"
                    except BenchError as e:
                        cell = f"failed: {e}"
                    log(f"{bindir} --slots {slots} events {events}: {cell} instructions per task")
                    rows.append([bindir, str(slots), events, cell])
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return table(["bin dir", "slots", "events", "instructions per no-op task"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bindirs", nargs="+")
    ap.add_argument("--slots", default="8,1")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--events", default="off,on")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    start = time.monotonic()
    lines = run([os.path.abspath(b) for b in a.bindirs], [int(x) for x in a.slots.split(",")], a.tasks,
                a.events.split(","))
    print("\n".join(lines))
    print(f"({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

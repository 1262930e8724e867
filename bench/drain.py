#!/usr/bin/python3
"""No-op drain: N pre-enqueued spark.noop tasks with results stored, our workers against Python Celery.

Every configuration runs on the same private Redis, in the same run, alternately, R times each. The messages are
written to a staging list while the workers idle, then RENAMEd onto the queue in one atomic step, so start-up
time is not counted; the clock stops when the last messages' results read SUCCESS. Measured per run:

- tasks/s;
- worker CPU per task: utime+stime of the worker processes (/proc/PID/stat) before and after the drain, over N
  (ours: the spark-worker processes, and separately with sparkd added; Celery: its main process, which does the
  Redis work, and its pool children);
- Redis commands per task: the INFO commandstats delta over N, minus the bench's own commands in that window
  (the RENAME, its polling DBSIZE/MGET and one INFO, counted as they are sent; staging happens before the window);
- idle RSS per worker process, read from /proc after a settle second.

Usage: bench/drain.py BIN_DIR [--tasks N] [--runs R] [--out FILE]
"""
import argparse
import shutil
import sys
import tempfile
import time
import uuid

from common import CLK_TCK, BenchError, RedisServer, commands_delta, cpu_total, fmt, noop_envelope, rss_kib, summary, \
    table
from systems import Ours, PyCelery

STAGING = "bench:staging"
TAIL = 64  # the last messages staged, whose SUCCESS ends the clock (prefetch reorders at most a few)

# (label, kind, pool, workers, concurrency)
CONFIGS = [
    ("ours prefork W1 C2", "ours", "prefork", 1, 2),
    ("ours threads W1 C8", "ours", "threads", 1, 8),
    ("ours prefork W2 C2", "ours", "prefork", 2, 2),
    ("Celery threads c8", "celery", "threads", 1, 8),
    ("Celery prefork c2", "celery", "prefork", 1, 2),
]
PAIRS = [("ours threads W1 C8", "Celery threads c8"), ("ours prefork W1 C2", "Celery prefork c2")]


def stage(r, n):
    r.broker.flushall()
    ids = [str(uuid.uuid4()) for _ in range(n)]
    pipe = r.broker.pipeline(transaction=False)
    for i, tid in enumerate(ids):
        pipe.lpush(STAGING, noop_envelope(tid, i))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return ids


def cpu_split(pids):
    """(utime, stime) in seconds summed over the processes: where a task's CPU goes, the engine or the kernel."""
    user = system = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def make_system(cfg, bindir, tmp, r):
    label, kind, pool, workers, conc = cfg
    if kind == "ours":
        return Ours(bindir, tmp, r, workers, conc, pool, label=label)
    return PyCelery(tmp, r, "celery_bench_app", pool, conc, label=label)


def drain_once(system, r, n, ids, timeout):
    """One measured drain; returns a dict of figures (with 'error' when it did not finish)."""
    time.sleep(1.0)  # settle: idle RSS after start-up allocations, not during them
    pids = system.pids()
    idle = [x for x in (rss_kib(p) for p in pids) if x is not None]
    sup = system.supervisor_pids()
    cpu0, sup0, split0 = cpu_total(pids), cpu_total(sup), cpu_split(pids)
    own = {"info": 1, "rename": 1, "dbsize": 0, "mget": 0}
    cmd0 = r.command_calls()
    tail = [f"celery-task-meta-{t}" for t in ids[-TAIL:]]
    t0 = time.monotonic()
    r.broker.rename(STAGING, "celery")
    done, error = 0, None
    while True:
        done = r.backend.dbsize()
        own["dbsize"] += 1
        if done >= n:
            metas = r.backend.mget(tail)
            own["mget"] += 1
            if all(m is not None and b'"SUCCESS"' in m for m in metas):
                break
        if time.monotonic() - t0 > timeout:
            error = f"timeout: {done}/{n} results after {timeout:.0f} s"
            break
        time.sleep(0.005)
    secs = time.monotonic() - t0
    cmds = commands_delta(cmd0, r.command_calls(), own)
    cpu1, sup1, split1 = cpu_total(pids), cpu_total(sup), cpu_split(pids)
    out = {"secs": secs, "idle_rss": idle, "error": error}
    if error is None:
        out.update(rate=n / secs, cpu_us=(cpu1 - cpu0) / n * 1e6, cpu_all_us=(cpu1 - cpu0 + sup1 - sup0) / n * 1e6,
                   cpu_user_us=(split1[0] - split0[0]) / n * 1e6, cpu_sys_us=(split1[1] - split0[1]) / n * 1e6,
                   cmds=sum(cmds.values()) / n, cmd_detail={k: v / n for k, v in cmds.items()})
    return out


def run(bindir, tmp, r, tasks, runs, log=print):
    """All configurations, `runs` times each, alternating; returns (markdown lines, {label: [run figures]})."""
    res = {c[0]: [] for c in CONFIGS}
    for i in range(runs):
        for cfg in CONFIGS:
            ids = stage(r, tasks)
            system = make_system(cfg, bindir, tmp, r)
            try:
                system.start()
                out = drain_once(system, r, tasks, ids, timeout=max(60.0, tasks / 100.0))
            except BenchError as e:
                out = {"error": str(e), "idle_rss": []}
            finally:
                system.stop()
            res[cfg[0]].append(out)
            if out.get("error"):
                log(f"drain run {i + 1}: {cfg[0]}: FAILED: {out['error']}")
            else:
                log(f"drain run {i + 1}: {cfg[0]}: {tasks} tasks in {out['secs']:.2f} s = {out['rate']:,.0f}/s, "
                    f"worker CPU {out['cpu_us']:.1f} µs/task, Redis {out['cmds']:.1f} commands/task")
    return report(res, tasks, runs), res


def _vals(runs, key):
    return [x.get(key) for x in runs if not x.get("error")]


def report(res, tasks, runs):
    rows = []
    for label, *_ in CONFIGS:
        rs = res[label]
        fails = [x["error"] for x in rs if x.get("error")]
        idle = [k for x in rs for k in x.get("idle_rss", [])]
        s_idle = summary(idle)
        all_us = fmt(_vals(rs, "cpu_all_us"), 1) if label.startswith("ours") else "(same)"
        rows.append([label, fmt(_vals(rs, "rate")), fmt(_vals(rs, "cpu_us"), 1), all_us, fmt(_vals(rs, "cmds"), 1),
                     f"{s_idle[0] / 1024:.1f} MiB" if s_idle else "—",
                     f"{len(fails)}/{len(rs)}: {fails[0]}" if fails else "0"])
    lines = [f"### No-op drain: {tasks:,} `spark.noop` tasks, results stored ({runs} run(s) each, alternating)", ""]
    lines += table(["configuration", "tasks/s", "worker CPU µs/task", "with sparkd µs/task", "Redis cmds/task",
                    "idle RSS/process", "failed runs"], rows)
    lines += ["", "Ours against Celery (ratio of medians):", ""]
    prow = []
    for ours, py in PAIRS:
        if ours not in res or py not in res:
            continue
        o, p = res[ours], res[py]
        def med(rs, k):
            s = summary(_vals(rs, k))
            return s[0] if s else None
        ro, rp = med(o, "rate"), med(p, "rate")
        co, cp = med(o, "cpu_us"), med(p, "cpu_us")
        mo, mp = med(o, "cmds"), med(p, "cmds")
        prow.append([f"{ours} / {py}", f"**{ro / rp:.1f}×**" if ro and rp else "—",
                     f"1/{cp / co:.1f}" if co and cp else "—", f"{mo / mp:.2f}" if mo and mp else "—"])
    lines += table(["pair", "throughput", "CPU per task", "Redis commands per task"], prow)
    lines += ["", "Redis commands per task by command (medians over the runs):", ""]
    for label, *_ in CONFIGS:
        det = {}
        for x in res[label]:
            for k, v in (x.get("cmd_detail") or {}).items():
                det.setdefault(k, []).append(v)
        parts = sorted(((summary(v)[0], k) for k, v in det.items()), reverse=True)
        lines.append(f"- {label}: " + (", ".join(f"{k} {v:.2f}" for v, k in parts if v >= 0.01) or "—"))
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="spark-bench-")
    r = RedisServer(tmp)
    try:
        lines, _ = run(a.bindir, tmp, r, a.tasks, a.runs)
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

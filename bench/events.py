#!/usr/bin/python3
"""No-op drain with task events on and off, for one build or two (a "before" and an "after") in the same run.

Issue 8 asks that task events (CELERY_WORKER_SEND_TASK_EVENTS=True) slow the no-op drain by at most 10 %, and
issue 7 that a no-op task cost at most 20 µs of worker CPU. This measures both on ours only (Celery is in
bench/drain.py): threads W1 C8 and prefork W1 C2, events off and on, each build; every combination once per round,
the order rotated each round so that none always runs first on a machine that is getting busier or quieter,
R rounds. Each drain is bench/drain.py's (staged messages RENAMEd onto the queue, results stored); the figures per
drain: worker CPU µs per task (utime+stime of the worker processes from /proc, split into user and system), tasks/s,
Redis commands per task. No process subscribes to celeryev: the events cost Redis a PUBLISH without a receiver.

CPU per task is the primary figure: on a shared 2-core machine throughput moves with whatever else runs, CPU per
task much less.

Usage: bench/events.py BIN_DIR [--base-bin DIR | --base-rev REV] [--tasks N] [--runs R] [--out FILE]
  --base-rev REV builds that commit of this repository (git archive + make) in a temporary directory first.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from common import HERE, BenchError, RedisServer, fmt, summary, table
from drain import drain_once, stage
from systems import Ours

# (label, pool, workers, concurrency)
CONFIGS = [("threads W1 C8", "threads", 1, 8), ("prefork W1 C2", "prefork", 1, 2)]
EVENTS = [("off", {}), ("on", {"CELERY_WORKER_SEND_TASK_EVENTS": "True"})]


def build_rev(rev, tmp, log=print):
    """A build of commit rev of this repository in tmp; its bin dir."""
    src = os.path.join(tmp, "base-" + rev.replace("/", "_"))
    os.makedirs(src, exist_ok=True)
    root = os.path.dirname(HERE)
    archive = subprocess.run(["git", "-C", root, "archive", rev], capture_output=True, timeout=120)
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True, timeout=120)
    log(f"building {rev} in {src}")
    made = subprocess.run(["make", "-j2", "all"], cwd=src, capture_output=True, timeout=1200)
    if made.returncode != 0:
        raise BenchError(f"make of {rev} failed: {made.stderr.decode(errors='replace')[-500:]}")
    return os.path.join(src, "build", "bin")


def combos(builds):
    return [(cfg, build, ev) for cfg in CONFIGS for build in builds for ev in EVENTS]


def key(cfg, build, ev):
    return f"{build[0]} {cfg[0]} events {ev[0]}"


def run(builds, tmp, r, tasks, runs, log=print):
    """builds: [(label, bin dir)]; returns (markdown lines, {key: [run figures]})."""
    todo = combos(builds)
    res = {key(*c): [] for c in todo}
    for i in range(runs):
        shift = i % len(todo)
        for cfg, build, ev in todo[shift:] + todo[:shift]:
            label, pool, workers, conc = cfg
            ids = stage(r, tasks)
            system = Ours(build[1], tmp, r, workers, conc, pool, env=dict(ev[1]), label=key(cfg, build, ev))
            try:
                system.start()
                out = drain_once(system, r, tasks, ids, timeout=max(60.0, tasks / 100.0))
            except BenchError as e:
                out = {"error": str(e), "idle_rss": []}
            finally:
                system.stop()
            res[key(cfg, build, ev)].append(out)
            if out.get("error"):
                log(f"events run {i + 1}: {key(cfg, build, ev)}: FAILED: {out['error']}")
            else:
                log(f"events run {i + 1}: {key(cfg, build, ev)}: {out['rate']:,.0f}/s, "
                    f"worker CPU {out['cpu_us']:.1f} µs/task (user {out['cpu_user_us']:.1f}, "
                    f"system {out['cpu_sys_us']:.1f}), Redis {out['cmds']:.2f} commands/task")
    return report(res, builds, tasks, runs), res


def _med(runs, k):
    s = summary([x.get(k) for x in runs if not x.get("error")])
    return s[0] if s else None


def _ratio(a, b, digits=2):
    return f"{a / b:.{digits}f}" if a and b else "—"


def report(res, builds, tasks, runs):
    lines = [f"### No-op drain with task events off and on: {tasks:,} `spark.noop` tasks, results stored "
             f"({runs} round(s), every combination once per round, order rotated)", ""]
    rows = []
    for cfg, build, ev in combos(builds):
        rs = res[key(cfg, build, ev)]
        ok = [x for x in rs if not x.get("error")]
        fails = [x["error"] for x in rs if x.get("error")]
        v = lambda k, d=1: fmt([x.get(k) for x in ok], d)
        rows.append([build[0], cfg[0], ev[0], v("cpu_us"), v("cpu_user_us"), v("cpu_sys_us"), v("rate", 0),
                     v("cmds", 2), f"{len(fails)}/{len(rs)}: {fails[0]}" if fails else "0"])
    lines += table(["build", "configuration", "events", "worker CPU µs/task", "user µs", "system µs", "tasks/s",
                    "Redis cmds/task", "failed runs"], rows)
    lines += ["", "Events on against off, same build (ratio of medians; CPU above 1 and throughput below 1 are "
              "the events' cost):", ""]
    rows = []
    for build in builds:
        for cfg in CONFIGS:
            off, on = res[key(cfg, build, EVENTS[0])], res[key(cfg, build, EVENTS[1])]
            rows.append([build[0], cfg[0], _ratio(_med(on, "cpu_us"), _med(off, "cpu_us")),
                         _ratio(_med(on, "rate"), _med(off, "rate"))])
    lines += table(["build", "configuration", "CPU per task on/off", "tasks/s on/off"], rows)
    if len(builds) == 2:
        before, after = builds
        lines += ["", f"{after[0]} against {before[0]} (ratio of medians):", ""]
        rows = []
        for cfg in CONFIGS:
            for ev in EVENTS:
                a, b = res[key(cfg, after, ev)], res[key(cfg, before, ev)]
                rows.append([cfg[0], ev[0], _ratio(_med(a, "cpu_us"), _med(b, "cpu_us")),
                             _ratio(_med(a, "rate"), _med(b, "rate"))])
        lines += table(["configuration", "events", f"CPU per task {after[0]}/{before[0]}",
                        f"tasks/s {after[0]}/{before[0]}"], rows)
    return lines


def builds_from(bindir, base_bin, base_rev, tmp, log=print):
    """[(label, bin dir)]: the build under test, after the base when one is given."""
    after = ("after", os.path.abspath(bindir))
    if base_rev:
        return [(f"before ({base_rev})", build_rev(base_rev, tmp, log)), after]
    if base_bin:
        return [("before", os.path.abspath(base_bin)), after]
    return [("this build", after[1])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bindir")
    ap.add_argument("--base-bin", help="bin dir of the build to compare against")
    ap.add_argument("--base-rev", help="commit to build and compare against")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="spark-bench-")
    r = RedisServer(tmp)
    try:
        builds = builds_from(a.bindir, a.base_bin, a.base_rev, tmp)
        lines, _ = run(builds, tmp, r, a.tasks, a.runs)
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

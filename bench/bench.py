#!/usr/bin/python3
"""make bench: every benchmark of bench/ in one run, ours beside Python Celery, results into bench/results.md.

    bench/bench.py BIN_DIR                 # the full run: medians of 5 (about half an hour on 2 vCPUs)
    bench/bench.py BIN_DIR --quick         # 1 run of each with small task counts (under 3 minutes)
    bench/bench.py BIN_DIR --only drain,latency,workflow --runs 3 --drain-tasks 20000 --workflow-tasks 4000
    bench/bench.py BIN_DIR --only events --base-rev main   # task events off/on, this build against main's

One private Redis serves every benchmark (flushed between configurations); the workflow benchmark adds a private
PostgreSQL and the LangFlow fixture. A configuration that is refused, stalls or passes its deadline is reported in
the tables as such; the run goes on.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import drain
import events
import latency
import targets
import workflow
from common import HERE, RedisServer, machine

FULL = {"runs": 5, "drain_tasks": 20000, "latency_count": 500, "workflow_tasks": 4000, "workflow_tasks_slow": 4000}
QUICK = {"runs": 1, "drain_tasks": 2000, "latency_count": 100, "workflow_tasks": 400, "workflow_tasks_slow": 1200}


def git_describe():
    try:
        out = subprocess.run(["git", "-C", HERE, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip()[:100]
    except (OSError, subprocess.SubprocessError):
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bindir")
    ap.add_argument("--quick", action="store_true", help="one run, small task counts")
    ap.add_argument("--only", default="drain,latency,workflow")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--drain-tasks", type=int)
    ap.add_argument("--latency-count", type=int)
    ap.add_argument("--workflow-tasks", type=int, help="tasks per run at the 200 ms fixture")
    ap.add_argument("--workflow-tasks-slow", type=int, help="tasks per run at the 2 s fixture (C1024)")
    ap.add_argument("--schedules", type=int, default=workflow.SCHEDULES,
                    help="schedules the workflow tasks go round-robin over (1: every task on one schedule row)")
    ap.add_argument("--base-rev", help="events: also build this commit and measure it beside BIN_DIR's build")
    ap.add_argument("--base-bin", help="events: the bin dir of a build to measure beside BIN_DIR's")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    a = ap.parse_args()
    p = dict(QUICK if a.quick else FULL)
    for k in p:
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    only = set(a.only.split(","))
    bindir = os.path.abspath(a.bindir)

    t_start = time.monotonic()
    head = [f"## Benchmark run {time.strftime('%Y-%m-%d %H:%M %Z')}{' (quick)' if a.quick else ''}", "",
            f"Machine: {machine()}. Build: {git_describe()}.",
            f"Command: `{' '.join(['bench/bench.py'] + sys.argv[1:])}` ({p['runs']} run(s) per configuration).", ""]
    print("\n".join(head), flush=True)
    sections = []
    tmp = tempfile.mkdtemp(prefix="spark-bench-")
    os.chmod(tmp, 0o755)  # the postgres user reaches its data directory through it
    r = RedisServer(tmp)
    log = lambda s: print(s, flush=True)
    runs = {
        "drain": lambda: drain.run(bindir, tmp, r, p["drain_tasks"], p["runs"], log),
        "events": lambda: events.run(events.builds_from(bindir, a.base_bin, a.base_rev, tmp, log), tmp, r,
                                     p["drain_tasks"], p["runs"], log),
        "latency": lambda: latency.run(bindir, tmp, r, p["latency_count"], p["runs"], log=log),
        "workflow": lambda: workflow.run(bindir, tmp, r, p["workflow_tasks"], p["workflow_tasks_slow"], p["runs"],
                                         schedules=a.schedules, log=log),
    }
    got = {}
    try:
        for name in ("drain", "events", "latency", "workflow"):
            if name not in only:
                continue
            try:
                lines, got[name] = runs[name]()
            except Exception as e:  # one benchmark's broken set-up must not lose the others' figures
                lines = [f"### {name}: could not run", "", f"{type(e).__name__}: {e}"]
                log(f"{name}: could not run: {e!r}")
            sections.append(lines)
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    dres, wres = got.get("drain"), got.get("workflow")
    if dres is not None or wres is not None:
        sections.append(targets.check(dres, wres, a.quick))
    body = head + [l for s in sections for l in s + [""]]
    body.append(f"Total time {time.monotonic() - t_start:.0f} s.")
    print("\n" + "\n".join(body[len(head):]))
    with open(a.out, "w") as f:
        f.write("\n".join(body) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Workflow benchmark: N execute_workflow tasks against a local LangFlow that answers after a fixed delay, with
every task recorded in a private PostgreSQL, our workers against Python Celery running the same workflow
(bench/celery_workflow_app.py).

Per configuration and run: the tasks are sent with Python Celery's send_task while no worker runs, moved aside
(RENAME), the worker started, then the queue RENAMEd back in one step so start-up is not counted. Tasks go
round-robin over SCHEDULES interval schedules of one workflow (the beat sends one task per schedule per tick; one
schedule for thousands of concurrent tasks would make its row lock the subject). Sampled every 0.25 s (connections
every second) until every row is final, nothing has moved for a while (stalled), or the deadline passes (failures
are reported as data): worker RSS, PostgreSQL connections (pg_stat_activity by application_name), Redis
connections (CLIENT LIST entries from the worker processes' own sockets), row statuses. The fixture reports the
peak and mean of requests it held open, its loop lag and how late its replies left; its CPU is read from /proc.

tasks/s = rows completed / (last finished_at - release).

Usage: bench/workflow.py BIN_DIR [--tasks N] [--tasks-slow N] [--runs R] [--only LABEL,...] [--schedules K]
                         [--base-bin OTHER_BIN_DIR] [--perf PREFIX]
Per run it also prints the worker's CPU per task (utime + stime from /proc over the rows completed); with
BENCH_TIMELINE=K the rows claimed and finished in each 1/K s after the release; --perf records each run's workers
(PERF_CALL_GRAPH=dwarf for callers inside libraries without frame pointers, PERF_FREQ samples per second).
"""
import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from common import (BenchError, RedisServer, celery_client, cpu_seconds, fmt, raise_nofile, rss_kib, table,
                    tcp_local_ports)
from langflow_fixture import Fixture
from pg import PgServer
from systems import Ours, PyCelery

TASK = "automagik_spark.core.tasks.workflow_tasks.execute_workflow"
STAGING = "bench:staging"
SCHEDULES = 64
FAST, SLOW = 0.2, 2.0
CAPACITY_REQUESTS = 1100
TIMELINE_BINS = int(os.environ.get("BENCH_TIMELINE") or 4)  # bins per second of the printed timeline
FLOW = "bench-flow"

# (label, kind, pool, workers, concurrency, slow fixture)
CONFIGS = [
    ("ours threads W1 C16", "ours", "threads", 1, 16, False),
    ("ours threads W1 C64", "ours", "threads", 1, 64, False),
    ("ours threads W1 C256", "ours", "threads", 1, 256, False),
    ("ours threads W1 C1024", "ours", "threads", 1, 1024, True),
    ("ours prefork W4 C4", "ours", "prefork", 4, 4, False),
    ("Celery prefork c16", "celery", "prefork", 1, 16, False),
    ("Celery threads c64", "celery", "threads", 1, 64, False),
]
APP_NAME = {"ours": "spark-worker", "celery": "celery-bench"}


class Setup:
    """PostgreSQL with the schema applied by `spark-worker --migrate`, a source and a workflow; the fixture."""

    def __init__(self, bindir, tmp):
        from cryptography.fernet import Fernet
        self.key = Fernet.generate_key().decode()
        self.pg = PgServer(os.path.join(tmp, "pg")).start()
        self.fixture = self.db = None
        try:
            self._prepare(bindir)
        except BaseException:
            self.stop()
            raise

    def _prepare(self, bindir):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SPARK_", "AUTOMAGIK_"))}
        env.update(DATABASE_URL=self.pg.url, SPARK_ENV_FILE="")
        mig = subprocess.run([os.path.join(bindir, "spark-worker"), "--migrate"], env=env, capture_output=True,
                             text=True, timeout=120)
        if mig.returncode != 0:
            raise BenchError(f"spark-worker --migrate failed: {mig.stderr.strip()}")
        self.fixture = Fixture(FAST)
        self.db = self.pg.connect()
        self.source, self.workflow = str(uuid.uuid4()), str(uuid.uuid4())
        with self.db.cursor() as c:
            c.execute("INSERT INTO workflow_sources (id, name, source_type, url, encrypted_api_key)"
                      " VALUES (%s, 'bench', 'langflow', %s, '')", (self.source, self.fixture.url))
            c.execute("INSERT INTO workflows (id, name, source, remote_flow_id, workflow_source_id)"
                      " VALUES (%s, 'bench', 'langflow', %s, %s)", (self.workflow, FLOW, self.source))

    def schedules(self, n):
        return [r[0] for r in self.query(
            "INSERT INTO schedules (id, workflow_id, schedule_type, schedule_expr, params) SELECT gen_random_uuid(),"
            " %s, 'interval', '1m', '{\"value\": \"bench\"}' FROM generate_series(1, %s) RETURNING id::text",
            (self.workflow, n))]

    def query(self, sql, args=()):
        with self.db.cursor() as c:
            c.execute(sql, args)
            return c.fetchall()

    def stop(self):
        try:
            if self.fixture:
                self.fixture.stop()
            if self.db:
                self.db.close()
        finally:
            self.pg.stop()


def make_system(cfg, bindir, tmp, r, s):
    label, kind, pool, workers, conc, _ = cfg
    common_env = {"AUTOMAGIK_SPARK_ENCRYPTION_KEY": s.key}
    if kind == "ours":
        env = dict(common_env, DATABASE_URL=s.pg.url, CELERY_WORKER_MAX_MEMORY_PER_CHILD="0")
        return Ours(bindir, tmp, r, workers, conc, pool, env=env, label=label)
    env = dict(common_env, BENCH_DATABASE_URL=s.pg.url)
    return PyCelery(tmp, r, "celery_workflow_app", pool, conc, env=env, label=label)


def stage(r, app, schedules, n):
    """Send n tasks with Celery into `celery` (no worker runs yet), then move them aside."""
    r.broker.flushall()
    for i in range(n):
        app.send_task(TASK, args=[schedules[i % len(schedules)]], queue="celery")
    r.broker.rename("celery", STAGING)


def statuses(s, sched):
    return dict(s.query("SELECT status, count(*) FROM tasks WHERE schedule_id = ANY(%s::uuid[]) GROUP BY status",
                        (sched,)))


def measure(system, r, s, sched, n, delay, conc):
    """One run after the worker is ready; returns the figures (with 'error' when it did not finish)."""
    fx = s.fixture
    fx.set_delay(delay)
    fx.reset()
    fx_cpu0 = cpu_seconds(fx.proc.pid)
    ideal = math.ceil(n / conc) * delay
    deadline, stall_after = 3 * ideal + 60, max(30.0, 5 * delay)
    peak = {"rss": 0, "rss_max": 0, "pg": 0, "redis": 0}
    t_wall, t0 = time.time(), time.monotonic()
    cpu0 = {p: cpu_seconds(p) or 0.0 for p in system.pids()}
    cpu_last = dict(cpu0)
    r.broker.rename(STAGING, "celery")
    last_move, last_key, st, error, sample = t0, None, {}, None, 0
    while True:
        pids = system.pids()
        rss = [x for x in (rss_kib(p) for p in pids) if x]
        peak["rss"] = max(peak["rss"], sum(rss))
        peak["rss_max"] = max(peak["rss_max"], max(rss, default=0))
        if sample % 4 == 0:  # pooled connections change slowly; reading 2,000 sockets in /proc costs CPU
            peak["redis"] = max(peak["redis"], r.clients_from(tcp_local_ports(pids, r.port)))
            peak["pg"] = max(peak["pg"], s.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                                 (APP_NAME[system.kind],))[0][0])
        sample += 1
        for p in pids:  # the last reading of each worker process: its CPU until then
            c = cpu_seconds(p)
            if c is not None:
                cpu_last[p] = c
        st = statuses(s, sched)
        final = st.get("completed", 0) + st.get("failed", 0)
        if final >= n and not st.get("running") and not st.get("pending"):
            break
        now = time.monotonic()
        key = tuple(sorted(st.items()))
        if key != last_key:
            last_key, last_move = key, now
        if not pids:
            error = "worker processes gone"
            break
        if now - last_move > stall_after:
            error = f"stalled: no row changed for {stall_after:.0f} s"
            break
        if now - t0 > deadline:
            error = f"deadline of {deadline:.0f} s passed"
            break
        time.sleep(0.25)
    elapsed = time.monotonic() - t0
    fst = fx.stats()
    fx_cpu = cpu_seconds(fx.proc.pid) - fx_cpu0
    (last_done,), = s.query("SELECT extract(epoch FROM max(finished_at)) FROM tasks WHERE schedule_id ="
                            " ANY(%s::uuid[]) AND status = 'completed'", (sched,))
    errors = s.query("SELECT left(coalesce(error, status), 120), count(*) FROM tasks WHERE schedule_id ="
                     " ANY(%s::uuid[]) AND status <> 'completed' GROUP BY 1 ORDER BY 2 DESC LIMIT 2", (sched,))
    done = st.get("completed", 0)
    worker_cpu = sum(c - cpu0.get(p, 0.0) for p, c in cpu_last.items())
    # where a run's time goes: rows started (claimed) and finished in each 1/TIMELINE_BINS s after the release
    (tl,), = s.query("SELECT json_agg(json_build_array(b, st, fi) ORDER BY b) FROM (SELECT b,"
                     " count(*) FILTER (WHERE k = 's') AS st, count(*) FILTER (WHERE k = 'f') AS fi FROM ("
                     "SELECT 's' AS k, floor((extract(epoch FROM started_at) - %s) * %s) AS b FROM tasks WHERE"
                     " schedule_id = ANY(%s::uuid[]) UNION ALL SELECT 'f', floor((extract(epoch FROM finished_at) - %s)"
                     " * %s) FROM tasks WHERE schedule_id = ANY(%s::uuid[])) x GROUP BY b) y",
                     (t_wall, TIMELINE_BINS, sched, t_wall, TIMELINE_BINS, sched))
    span = (float(last_done) - t_wall) if last_done is not None else None
    return {"error": error, "completed": done, "statuses": st, "missing": max(0, n - sum(st.values())),
            "rate": done / span if span and span > 0 else None, "inflight_peak": fst["peak"],
            "inflight_mean": fst["area"] / elapsed if elapsed > 0 else None, "rss_mib": peak["rss"] / 1024,
            "rss_max_mib": peak["rss_max"] / 1024, "pg": peak["pg"], "redis": peak["redis"],
            "fx_lag_ms": fst["max_lag_ms"], "fx_late_p99_ms": fst["overshoot_ms_p99"],
            "fx_cpu_pct": 100.0 * fx_cpu / elapsed if elapsed > 0 else None, "row_errors": errors,
            "cpu_ms_per_task": 1000.0 * worker_cpu / done if done else None, "timeline": tl or []}


def perf_start(system, out):
    """perf record -g on the worker processes of one run (a profile of what the worker spends its CPU on)."""
    pids = ",".join(str(p) for p in system.pids())
    # PERF_CALL_GRAPH=dwarf for libraries built without frame pointers (jansson, curl: their callers)
    cg = os.environ.get("PERF_CALL_GRAPH", "fp")
    return subprocess.Popen(["perf", "record", "-q", "-F", os.environ.get("PERF_FREQ", "499"), "--call-graph", cg, "-o", out, "-p", pids],
                            stdout=subprocess.DEVNULL)


def run(bindir, tmp, r, tasks, tasks_slow, runs, only=None, schedules=SCHEDULES, log=print, base_bin=None,
        perf=None):
    raise_nofile()
    bindir = os.path.abspath(bindir)
    configs = [c for c in CONFIGS if not only or c[0] in only]
    # with a base build: its run and ours alternate within each round, so both see the same machine load
    builds = [("before: ", os.path.abspath(base_bin)), ("", bindir)] if base_bin else [("", bindir)]
    s = Setup(bindir, tmp)
    app = celery_client(r.url(0), r.url(1))
    res = {prefix + c[0]: [] for c in configs for prefix, _ in builds}
    try:
        cap = s.fixture.capacity(CAPACITY_REQUESTS, SLOW)
        log(f"fixture capacity: {cap['ok']}/{cap['requests']} requests answered, peak {cap['peak']} open at once, "
            f"in {cap['secs']:.2f} s at {cap['delay']} s delay (loop lag max {cap['max_lag_ms']:.0f} ms)")
        for i, cfg, (prefix, bd) in ((i, c, b) for i in range(runs) for c in configs for b in builds):
            n, delay = (tasks_slow, SLOW) if cfg[5] else (tasks, FAST)
            sched = s.schedules(schedules)
            stage(r, app, sched, n)
            system = make_system(cfg, bd, tmp, r, s)
            prof = None
            try:
                system.start()
                if perf:
                    prof = perf_start(system, f"{perf}.{prefix.strip(': ') or 'after'}.{i + 1}")
                out = measure(system, r, s, sched, n, delay, cfg[3] * cfg[4])
            except BenchError as e:
                out = {"error": f"start: {e}", "completed": 0}
            finally:
                if prof:
                    prof.send_signal(signal.SIGINT)
                    prof.wait(60)
                system.stop(30)
            out.update(n=n, delay=delay)
            res[prefix + cfg[0]].append(out)
            log(f"workflow run {i + 1}: {prefix}{cfg[0]}: " + describe(out))
    finally:
        s.stop()
    return report(res, cap, runs, schedules), res


def describe(o):
    if o["error"] and o["error"].startswith("start:"):
        return f"FAILED {o['error']}"
    rate = f"{o['rate']:,.0f}/s" if o.get("rate") else "—"
    txt = (f"{o['completed']}/{o['n']} completed, {rate}, in flight peak {o['inflight_peak']} mean "
           f"{o['inflight_mean']:.0f}, RSS {o['rss_mib']:.1f} MiB, PG {o['pg']}, Redis {o['redis']} conns; "
           f"fixture lag {o['fx_lag_ms']:.0f} ms, late p99 {o['fx_late_p99_ms']:.0f} ms, CPU {o['fx_cpu_pct']:.0f} %")
    if o.get("cpu_ms_per_task") is not None:
        txt += f"; worker CPU {o['cpu_ms_per_task']:.3f} ms/task"
    if os.environ.get("BENCH_TIMELINE"):
        txt += "\n  timeline (s after release: rows started, finished): " + ", ".join(
            f"{b / TIMELINE_BINS:g}: {st}/{fi}" for b, st, fi in o.get("timeline", []))
    if o["error"] or o["completed"] < o["n"]:
        txt += f"; NOT DONE: {o['error'] or ''} statuses {o['statuses']} missing {o['missing']} {o['row_errors']}"
    return txt


def report(res, cap, runs, schedules):
    rows, notes = [], []
    for label, rs in res.items():
        ok = [x for x in rs if not (x["error"] or "").startswith("start:")]
        first = rs[0]
        v = lambda k: [x.get(k) for x in ok]
        bad = [x for x in rs if x["error"] or x["completed"] < x["n"]]
        for x in bad:
            notes.append(f"- {label}: {x['error'] or 'incomplete'}"
                         + (f"; rows {x.get('statuses')}, {x.get('missing')} never written; {x.get('row_errors')}"
                            if "statuses" in x else ""))
        rows.append([label, f"{first['delay']:g} s", f"{first['n']:,}", fmt(v("rate")),
                     fmt(v("inflight_peak")), fmt(v("inflight_mean")), fmt(v("cpu_ms_per_task"), 3),
                     f"{fmt(v('rss_mib'), 1, ' MiB')}; largest {fmt(v('rss_max_mib'), 1, ' MiB')}" if ok else "—",
                     fmt(v("pg")), fmt(v("redis")), fmt(v("completed")), f"{len(bad)}/{len(rs)}",
                     f"{fmt(v('fx_lag_ms'))} / {fmt(v('fx_cpu_pct'))} %" if ok else "—"])
    lines = [f"### Workflow: execute_workflow against a local LangFlow ({runs} run(s) each, tasks spread over "
             f"{schedules} schedule(s))", "",
             f"Fixture capacity check: {cap['ok']}/{cap['requests']} concurrent requests answered, {cap['peak']} "
             f"open at once, in {cap['secs']:.2f} s at a {cap['delay']:g} s delay (event-loop lag max "
             f"{cap['max_lag_ms']:.0f} ms, replies late by {cap['overshoot_ms_p99']:.0f} ms at p99).", ""]
    lines += table(["configuration", "fixture delay", "tasks", "tasks/s", "in flight (peak)", "in flight (mean)",
                    "worker CPU ms/task",
                    "worker RSS peak (all processes)", "PostgreSQL conns", "Redis conns", "rows completed",
                    "runs not complete", "fixture lag ms / CPU"], rows)
    if notes:
        lines += ["", "Runs that did not complete (reported as measured):", ""] + notes
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bindir")
    ap.add_argument("--tasks", type=int, default=4000, help="tasks per run at the 200 ms fixture")
    ap.add_argument("--tasks-slow", type=int, default=4000, help="tasks per run at the 2 s fixture (C1024)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated configuration labels")
    ap.add_argument("--schedules", type=int, default=SCHEDULES, help="schedules the tasks go round-robin over")
    ap.add_argument("--base-bin", help="another build's bin dir, run alternately with BIN_DIR in each round")
    ap.add_argument("--perf", metavar="PREFIX", help="perf record the workers of each run into PREFIX.BUILD.RUN (PERF_CALL_GRAPH: fp or dwarf)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="spark-bench-")
    os.chmod(tmp, 0o755)
    r = RedisServer(tmp)
    try:
        lines, _ = run(a.bindir, tmp, r, a.tasks, a.tasks_slow, a.runs, [x for x in a.only.split(",") if x],
                       a.schedules, base_bin=a.base_bin, perf=a.perf)
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

"""Chaos run (issue 9 item 11): a fleet under faults, with Python Celery as producer and result reader.

    /usr/bin/python3 tests/chaos/chaos.py [--seconds 60] [--bin-dir build/bin] [--seed N] [--keep]
    make chaos [CHAOS_SECONDS=600]

Private servers (tests/integration/harness.py, pgserver.py, sources.py): a Redis with the append-only file on,
a PostgreSQL migrated by `spark-worker --migrate`, and the local LangFlow fixture. Two sparkctl-started fleets
consume the same queue: prefork (2 workers x 2) and threads (1 worker x 4 slots). For --seconds a producer sends
spark.noop, spark.sleep and execute_workflow (one schedule each, so its run is countable) while the chaos thread
kill -9s random worker processes and, once a minute (once in the 60 s run), kill -9s the prefork fleet's sparkd
and starts it again, restarts Redis (AOF: nothing is lost by the restart itself) and restarts PostgreSQL. Then
the fleets drain and it prints:

    sent        tasks send_task accepted
    completed   tasks whose stored result is SUCCESS
    wrong       workflow tasks whose SUCCESS result is not their schedule's row, completed in the database
    failed      tasks whose stored result is FAILURE (with the reasons)
    lost        tasks with no final result after the drain
    run twice   tasks whose SUCCESS was published more than once (completed twice)
    re-called   workflow tasks whose source saw more than one run request (a kill mid-call: at-least-once)
    stuck rows  tasks rows left `running`

and exits 1 on any loss, failure, wrong result, stuck row, message left held, or sanitizer report. The random
choices come from --seed (printed); the timing of a run still varies.
"""
import argparse
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

EXECUTE = "automagik_spark.core.tasks.workflow_tasks.execute_workflow"
META = "celery-task-meta-"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="how long the producer and the faults run")
    p.add_argument("--bin-dir", default=None, help="where sparkd, spark-worker and sparkctl are")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rate", type=float, default=15, help="tasks sent per second")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) at the end")
    return p.parse_args(argv)


args = parse_args(sys.argv[1:])
if args.bin_dir:
    os.environ["SPARK_BIN_DIR"] = str(Path(args.bin_dir).resolve())

import harness  # noqa: E402  (reads SPARK_BIN_DIR when imported)
import pgserver  # noqa: E402
import sources  # noqa: E402
from engine_util import PersistentRedisServer, processing_lists  # noqa: E402
from harness import t, wait_for  # noqa: E402


def log(msg):
    print(f"chaos {time.strftime('%H:%M:%S')} {msg}", flush=True)


class MetaCounter:
    """Counts every meta PUBLISHed on celery-task-meta-*, per task id and status, across Redis restarts.

    The count of SUCCESS publishes is how "completed twice" is seen: the worker PUBLISHes each result it
    writes. While Redis is down nothing can be published, and the subscription is back within a few tens of
    milliseconds after it returns, so a miss can only undercount, never invent a duplicate."""

    def __init__(self, redis_srv):
        self.srv = redis_srv
        self.counts = Counter()  # (task_id, status) -> publishes
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                ps = self.srv.client(1).pubsub(ignore_subscribe_messages=True)
                ps.psubscribe(META + "*")
                self.ready.set()
                while not self.stopping:
                    msg = ps.get_message(timeout=0.05)
                    if msg and msg.get("type") == "pmessage":
                        tid = msg["channel"].decode()[len(META):]
                        status = json.loads(msg["data"]).get("status")
                        with self.lock:
                            self.counts[(tid, status)] += 1
            except Exception:
                time.sleep(0.02)  # Redis restarting: subscribe again as soon as it answers

    def successes(self, tid):
        with self.lock:
            return self.counts[(tid, "SUCCESS")]

    def close(self):
        self.stopping = True
        self.thread.join(2)


class Fleet:
    """One sparkd (sparkctl start) and the way it was started, so it can be started again after a kill."""

    def __init__(self, work, env, name, pool, workers, concurrency):
        self.sd = harness.Sparkd(work, env, name=name)
        self.name, self.pool, self.workers, self.concurrency = name, pool, workers, concurrency

    def start(self):
        self.sd.start("--pool", self.pool, workers=self.workers, concurrency=self.concurrency, timeout=t(60))

    def processes(self):
        return [p for p in self.sd.processes() if p.get("pid")]


class Run:
    def __init__(self, work, rng):
        self.work = work
        self.rng = rng
        self.sent = {}  # task id -> (kind, schedule id or None)
        self.send_errors = 0
        self.events = Counter()
        self.broker_up = threading.Event()
        self.broker_up.set()
        self.stop_producing = threading.Event()
        self.problems = []

    # ---- setup

    def setup(self):
        self.redis = PersistentRedisServer(self.work / "redis").start()
        self.pg = pgserver.PgServer(base_dir=str(self.work / "pg"))
        self.pg.start()
        self.db_url = self.pg.url
        cp = subprocess.run([harness.binary("spark-worker"), "--migrate"], capture_output=True, text=True,
                            env=harness.base_env({"DATABASE_URL": self.db_url}), timeout=t(60))
        if cp.returncode != 0:
            raise RuntimeError(f"spark-worker --migrate failed: {cp.stderr}")
        self.conn = self.pg.connect()
        self.langflow = sources.LangFlowServer(flows=("flow-1",)).start()
        self.langflow.delay = 0.05
        # a worker killed mid-call resets its connection: expected here, not worth a traceback
        self.langflow.httpd.handle_error = lambda request, client_address: None
        self.key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        src = pgserver.seed_source(self.conn, "langflow", self.langflow.url, "chaos-key", self.key)
        self.workflow = pgserver.seed_workflow(self.conn, src, "flow-1")
        # one schedule per workflow task, made before the faults start (the database restarts during the run)
        n = int(args.seconds * args.rate / 3) + 10
        self.schedules = [(pgserver.seed_schedule(self.conn, self.workflow, params={"value": f"wf-{i}"}), f"wf-{i}")
                          for i in range(n)]
        env = {
            "CELERY_BROKER_URL": self.redis.url(0),
            "CELERY_RESULT_BACKEND": self.redis.url(1),
            "DATABASE_URL": self.db_url,
            "AUTOMAGIK_SPARK_ENCRYPTION_KEY": self.key,
            "AUTOMAGIK_SPARK_HTTP_TIMEOUT": "20",
            # a PostgreSQL restart fails the attempts in flight: retried, never failed for good
            "CELERY_TASK_MAX_RETRIES": "20",
            "CELERY_TASK_RETRY_BACKOFF": "False",
            "CELERY_TASK_DEFAULT_RETRY_DELAY": "0.5",
            "SPARK_HEARTBEAT_INTERVAL": "1",
        }
        self.fleets = [Fleet(self.work, env, "prefork", "prefork", 2, 2),
                       Fleet(self.work, env, "threads", "threads", 1, 4)]
        for f in self.fleets:
            f.start()
        self.meta = MetaCounter(self.redis)
        self.meta.ready.wait(t(10))
        self.app = harness.celery_app(self.redis.url(0), self.redis.url(1))

    # ---- the producer

    def send_one(self, i):
        kind = ("noop", "sleep", "workflow")[i % 3]
        tid = str(uuid.uuid4())
        sched = None
        if kind == "noop":
            name, targs = "spark.noop", [i]
        elif kind == "sleep":
            name, targs = "spark.sleep", [round(self.rng.uniform(0.05, 0.4), 2)]
        else:
            if not self.schedules:
                return
            sched, _token = self.schedules.pop()
            name, targs = EXECUTE, [sched]
        deadline = time.monotonic() + t(60)
        while True:
            self.broker_up.wait(t(60))
            try:
                self.app.send_task(name, args=targs, task_id=tid)
                break
            except Exception as e:  # the broker went away under the call: send the same id again
                self.send_errors += 1
                if time.monotonic() > deadline:
                    self.problems.append(f"send_task kept failing: {e!r}")
                    return
                time.sleep(0.1)  # a retry back-off while the broker restarts, not a wait for a condition
        self.sent[tid] = (kind, sched)

    def produce(self):
        i = 0
        start = time.monotonic()
        while not self.stop_producing.is_set():
            self.send_one(i)
            i += 1
            # pacing, not synchronisation: a steady rate the two fleets keep up with
            ahead = start + i / args.rate - time.monotonic()
            if ahead > 0:
                self.stop_producing.wait(ahead)

    # ---- the faults

    def kill_random_worker(self):
        fleet = self.rng.choice(self.fleets)
        try:
            procs = [p for p in fleet.processes() if p.get("state") == "active"]
        except Exception:
            return  # its sparkd is restarting
        if not procs:
            return
        p = self.rng.choice(procs)
        try:
            os.kill(p["pid"], signal.SIGKILL)
            self.events["worker kill -9"] += 1
        except ProcessLookupError:
            pass

    def kill_sparkd(self):
        fleet = self.fleets[0]
        pid = fleet.sd.pid
        log(f"kill -9 sparkd {pid} ({fleet.name})")
        os.kill(pid, signal.SIGKILL)
        if not harness.wait_pid_gone(pid, t(10)):
            self.problems.append(f"sparkd {pid} did not die")
        # its workers get SIGTERM (PR_SET_PDEATHSIG) and stop warm; a new sparkd takes over the fleet
        fleet.start()
        self.events["sparkd kill -9 + start"] += 1
        log(f"sparkd restarted as {fleet.sd.pid}")

    def restart_redis(self):
        log("restart Redis (AOF on)")
        self.broker_up.clear()
        try:
            self.redis.restart(down_for=0.5)
        finally:
            self.broker_up.set()
        self.events["redis restart"] += 1

    def restart_postgres(self):
        log("restart PostgreSQL")
        self.conn.close()
        # a fast (clean) stop: the private server runs with synchronous_commit=off, so an immediate stop would
        # lose commits the workers were told had happened, which no production setting does
        self.pg._run([os.path.join(self.pg.bindir, "pg_ctl"), "-D", self.pg.data, "-m", "fast", "-w", "stop"])
        time.sleep(0.5)  # the outage itself, not a wait for anything
        self.pg.resume()
        self.conn = self.pg.connect()
        self.events["postgres restart"] += 1

    def chaos(self):
        start = time.monotonic()
        end = start + args.seconds
        # each period of (at most) 60 s: sparkd at 30%, Redis at 50%, PostgreSQL at 70%, so a longer run
        # repeats the whole cycle rather than idling through kills alone
        period = min(args.seconds, 60.0)
        once = [(k * period + f * period, step) for k in range(int(args.seconds // period))
                for f, step in ((0.3, self.kill_sparkd), (0.5, self.restart_redis), (0.7, self.restart_postgres))]
        next_kill = start + self.rng.uniform(1.0, 3.0)
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if once and now >= start + once[0][0]:
                try:
                    once.pop(0)[1]()
                except Exception as e:
                    self.problems.append(f"fault step failed: {e!r}")
                continue
            if now >= next_kill:
                self.kill_random_worker()
                next_kill = now + self.rng.uniform(1.0, 3.0)
            time.sleep(0.05)  # the fault schedule's tick

    # ---- the verdict

    def final_states(self):
        backend = self.redis.client(1)
        out = {}
        ids = list(self.sent)
        for k in range(0, len(ids), 500):
            chunk = ids[k:k + 500]
            for tid, raw in zip(chunk, backend.mget([META + i for i in chunk])):
                out[tid] = json.loads(raw) if raw else None
        return out

    def drain(self):
        def all_final():
            st = self.final_states()
            return all(m and m.get("status") in ("SUCCESS", "FAILURE") for m in st.values())
        try:
            wait_for(all_final, t(120), interval=0.5, what="every task's final result")
        except AssertionError as e:
            self.problems.append(str(e))
        broker = self.redis.client(0)
        try:
            wait_for(lambda: broker.llen("celery") == 0 and broker.hlen("unacked") == 0
                     and not any(processing_lists(broker).values()) and broker.zcard("spark:eta") == 0,
                     t(30), interval=0.2, what="queue, unacked, processing lists and ETA set empty")
        except AssertionError as e:
            self.problems.append(f"{e}: queue {broker.llen('celery')}, unacked {broker.hlen('unacked')}, "
                                 f"processing {sum(processing_lists(broker).values())}, "
                                 f"eta {broker.zcard('spark:eta')}")

    def report(self):
        states = self.final_states()
        kinds = Counter(k for k, _ in self.sent.values())
        by_status = Counter((m or {}).get("status") for m in states.values())
        failed = {tid: m for tid, m in states.items() if m and m.get("status") == "FAILURE"}
        lost = [tid for tid, m in states.items() if not m or m.get("status") not in ("SUCCESS", "FAILURE")]
        twice = [tid for tid in self.sent if self.meta.successes(tid) > 1]
        calls = Counter()
        for r in self.langflow.runs():
            try:
                calls[r.json().get("input_value")] += 1
            except ValueError:
                pass
        # the schedule's params value is the run's input_value (wf-N)
        token_of = {s: tok for s, tok in self._all_schedules}
        recalled = [tid for tid, (k, s) in self.sent.items() if k == "workflow" and calls[token_of[s]] > 1]
        with self.conn.cursor() as cur:
            cur.execute("SELECT id::text FROM tasks WHERE status = 'completed'")
            completed_rows = {r[0] for r in cur.fetchall()}
        # a workflow task's SUCCESS must be its schedule's row, completed in the database (the result is the row)
        wrong = {tid: m for tid, m in states.items() if m and m.get("status") == "SUCCESS"
                 and self.sent[tid][0] == "workflow"
                 and not (isinstance(m.get("result"), dict) and m["result"].get("status") == "completed"
                          and m["result"].get("schedule_id") == self.sent[tid][1]
                          and m["result"].get("id") in completed_rows)}
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM tasks WHERE status = 'running'")
            stuck = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM (SELECT schedule_id FROM tasks GROUP BY schedule_id"
                        " HAVING count(*) > 1) d")
            dup_rows = cur.fetchone()[0]
            cur.execute("SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status")
            rows = dict(cur.fetchall())
        san = []
        for f in self.fleets:
            san += f.sd.cleanup()
        print(f"chaos summary ({args.seconds:g}s, seed {args.seed}, fleets: prefork 2x2 and threads 1x4)")
        print("  faults:      " + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items())))
        print(f"  sent:        {len(self.sent)} (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
              + f"; {self.send_errors} send_task calls retried)")
        print(f"  completed:   {by_status.get('SUCCESS', 0)}")
        print(f"  failed:      {len(failed)}")
        for tid, m in list(failed.items())[:10]:
            print(f"    {tid} {self.sent[tid][0]}: {json.dumps(m.get('result'))[:200]}")
        print(f"  lost:        {len(lost)}")
        for tid in lost[:10]:
            print(f"    {tid} {self.sent[tid][0]}: {states[tid]}")
        print(f"  wrong:       {len(wrong)} workflow SUCCESS results that are not their completed row")
        for tid, m in list(wrong.items())[:10]:
            print(f"    {tid} schedule {self.sent[tid][1]}: {json.dumps(m.get('result'))[:200]}")
        seen = sum(1 for tid in self.sent if self.meta.successes(tid) > 0)
        print(f"  run twice:   {len(twice)} (SUCCESS published more than once; a publish seen for {seen} of "
              f"{len(self.sent)} tasks)")
        print(f"  re-called:   {len(recalled)} workflow tasks whose source saw the run again after a kill")
        print(f"  task rows:   " + ", ".join(f"{k} {v}" for k, v in rows.items())
              + f"; schedules with more than one row: {dup_rows}")
        print(f"  stuck rows:  {stuck} (status running)")
        for p in self.problems:
            print(f"  problem:     {p}")
        for s in san:
            print(s)
        bad = lost or failed or wrong or stuck or dup_rows or self.problems or san
        print("chaos: FAILED" if bad else "chaos: ok")
        return 1 if bad else 0

    def teardown(self):
        for f in getattr(self, "fleets", []):
            f.sd.cleanup()
        if hasattr(self, "meta"):
            self.meta.close()
        if hasattr(self, "app"):
            try:
                rc = self.app.backend.result_consumer
                if getattr(rc, "_pubsub", None) is not None:
                    rc._pubsub.close()
            except Exception:
                pass
        if hasattr(self, "langflow"):
            self.langflow.stop()
        if hasattr(self, "conn"):
            try:
                self.conn.close()
            except Exception:
                pass
        if hasattr(self, "pg"):
            self.pg.stop(remove=False)
        if hasattr(self, "redis"):
            self.redis.stop()


def main():
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="spark-chaos-"))
    os.chmod(work, 0o755)  # the postgres user must reach its directory inside
    run = Run(work, rng)
    rc = 1
    try:
        log(f"setting up in {work} (seed {args.seed})")
        run.setup()
        run._all_schedules = list(run.schedules)
        log(f"running {args.seconds:g}s of faults under load")
        producer = threading.Thread(target=run.produce, daemon=True)
        producer.start()
        run.chaos()
        run.stop_producing.set()
        producer.join(t(90))
        log(f"sent {len(run.sent)}; draining")
        run.drain()
        rc = run.report()
    finally:
        run.teardown()
        if args.keep or rc != 0:
            print(f"chaos: work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())

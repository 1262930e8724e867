"""The workflow plugin on one event loop (ABI 2), driven by tests/driver/wf_async.c (build/tests/wf-async-driver):
hundreds of runs in flight in one thread against a real PostgreSQL (pgserver.py) and the local sources
(sources.py), through a small connection pool.

The driver prints one JSON line per finished run; these tests check the lines and the rows.
Set SPARK_WF_DRIVER to use another driver binary (default: $SPARK_BIN_DIR/../tests/wf-async-driver).
"""
import base64
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

import harness
import pgserver
import sources
from harness import t

KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()
EXECUTE = "execute_workflow"
DRIVER = os.environ.get("SPARK_WF_DRIVER") or str(harness.BIN_DIR.parent / "tests" / "wf-async-driver")


class BarrierLangFlow(sources.LangFlowServer):
    """LangFlow whose run replies wait until `hold` runs are in flight at once (or a deadline): reaching it proves
    that many calls were in flight together, without timing anything."""

    def __init__(self):
        super().__init__(flows=("flow-1",))
        self.httpd.socket.listen(1024)  # the stock backlog of 5 would make hundreds of connects retry
        self.cv = threading.Condition()
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold = 0

    def reset(self):
        super().reset()
        with self.cv:
            self.hold = 0
            self.max_in_flight = 0

    def answer(self, req):
        if not self.is_run(req) or not self.hold:
            return super().answer(req)
        with self.cv:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.max_in_flight >= self.hold, timeout=t(60))
        try:
            return super().answer(req)
        finally:
            with self.cv:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def langflow():
    with BarrierLangFlow() as s:
        yield s


@pytest.fixture(scope="module")
def agents():
    with sources.AgentsServer(agents=("simple",)) as s:
        yield s


@pytest.fixture(scope="module")
def hive():
    with sources.HiveServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_sources(request):
    for name in ("langflow", "agents", "hive"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


class Driver:
    def __init__(self, tmp_path, db_url):
        if not os.access(DRIVER, os.X_OK):
            pytest.fail(f"{DRIVER} missing (make {os.path.relpath(DRIVER, harness.REPO)})", pytrace=False)
        self.dir = tmp_path
        self.db_url = db_url
        self.n = 0
        self.reports = []

    def start(self, runs, env=None, **spec):
        self.n += 1
        path = self.dir / f"spec{self.n}.json"
        path.write_text(json.dumps(dict(spec, runs=runs)))
        e = {"DATABASE_URL": self.db_url, "AUTOMAGIK_SPARK_ENCRYPTION_KEY": KEY, "AUTOMAGIK_SPARK_HTTP_TIMEOUT": "60",
             "CELERY_TASK_MAX_RETRIES": "2", "SPARK_HEARTBEAT_INTERVAL": "0.5"}
        e.update(env or {})
        self.log = self.dir / f"driver{self.n}.log"
        self.out = self.dir / f"driver{self.n}.out"  # a file, not a pipe: nobody reads while it runs
        self.proc = subprocess.Popen([DRIVER, str(path)], env=harness.base_env(e, report_dir=self.dir),
                                     stdout=open(self.out, "wb"), stderr=open(self.log, "wb"))
        return self.proc

    def finish(self, timeout=60):
        self.proc.wait(timeout=t(timeout))
        out = self.out.read_text()
        lines = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
        assert self.proc.returncode == 0, (self.proc.returncode, out, self.stderr())
        assert not [ln for ln in lines if "error" in ln], lines
        assert lines[-1] == {"event": "shutdown"}, (lines[-3:], self.stderr())
        runs = sorted((ln for ln in lines if "i" in ln), key=lambda r: r["i"])
        return runs

    def run(self, runs, env=None, timeout=60, **spec):
        self.start(runs, env, **spec)
        return self.finish(timeout)

    def stderr(self):
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def db(postgres):
    """A fresh database for this module: migrated by the plugin itself (its first claim finds no tables)."""
    name = "wfa_" + uuid.uuid4().hex[:10]
    admin = psycopg2.connect(postgres.url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    yield type("Db", (), {"url": url, "name": name, "conn": None})
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def driver(tmp_path, db):
    d = Driver(tmp_path, db.url)
    yield d
    reports = harness.san_reports(tmp_path)
    if reports:
        pytest.fail("sanitizer reports:\n" + "\n".join(reports), pytrace=False)


@pytest.fixture(scope="module")
def migrated(db, tmp_path_factory):
    """The first run on an empty database applies the migrations (on the loop), then finds no schedule."""
    d = Driver(tmp_path_factory.mktemp("migrate"), db.url)
    (r,) = d.run([{"task": EXECUTE, "arg": str(uuid.uuid4())}])
    assert r["outcome"] == "success" and r["result"] is None, r
    assert "applying migrations" in d.stderr() and "schema at version" in d.stderr()
    db.conn = psycopg2.connect(db.url)
    db.conn.autocommit = True
    yield db
    db.conn.close()


_sources = {}


def schedule(db, server, kind="langflow", remote="flow-1", **kw):
    k = (server.url, kind)
    if k not in _sources:
        _sources[k] = pgserver.seed_source(db.conn, kind, server.url, "the-secret-key", KEY)
    wf = pgserver.seed_workflow(db.conn, _sources[k], remote, kind)
    return pgserver.seed_schedule(db.conn, wf, **kw)


def row(db, sched):
    (r,) = pgserver.task_rows(db.conn, schedule_id=sched)
    return r


def backends(db):
    with db.conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'spark-worker'",
                    (db.name,))
        return cur.fetchone()[0]


# ---------------------------------------------------------------------------------------------------------------


def test_many_runs_in_flight_through_a_small_pool(migrated, driver, langflow):
    """200 runs at once: all 200 calls in flight together (the source holds its replies until they are), never
    more than SPARK_DB_POOL_SIZE connections, every row completed with its log lines, one workers row."""
    db, n, pool = migrated, 200, 2
    scheds = [schedule(db, langflow, params={"value": f"n{i}"}) for i in range(n)]
    langflow.hold = n
    driver.start([{"task": EXECUTE, "arg": s} for s in scheds], env={"SPARK_DB_POOL_SIZE": pool})
    seen = 0
    deadline = time.monotonic() + t(90)
    while driver.proc.poll() is None and time.monotonic() < deadline:
        seen = max(seen, backends(db))
        time.sleep(0.02)  # sampling the connection count while the driver runs, not waiting for it
    runs = driver.finish()
    assert langflow.max_in_flight == n
    assert 1 <= seen <= pool, seen
    assert [r["outcome"] for r in runs] == ["success"] * n, [r for r in runs if r["outcome"] != "success"][:3]
    for i, (r, s) in enumerate(zip(runs, scheds)):
        assert r["result"]["status"] == "completed" and r["result"]["schedule_id"] == s and r["result"]["tries"] == 1
        assert r["result"]["input_data"] == f"n{i}"
    with db.conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM tasks WHERE schedule_id = ANY(%s::uuid[]) GROUP BY status",
                    (scheds,))
        assert cur.fetchall() == [("completed", n)]
        cur.execute("SELECT message, count(*) FROM task_logs l JOIN tasks t ON t.id = l.task_id"
                    " WHERE t.schedule_id = ANY(%s::uuid[]) GROUP BY message ORDER BY message", (scheds,))
        assert cur.fetchall() == [("Task completed", n), ("Task started (attempt 1)", n)]
        cur.execute("SELECT status, (stats->>'succeeded')::int, current_task_id FROM workers"
                    " WHERE pid = %s", (driver.proc.pid,))
        assert cur.fetchall() == [("stopped", n, None)]


def test_retry_then_success_on_the_same_row_and_404(migrated, driver, langflow):
    db = migrated
    sched = schedule(db, langflow)
    missing = schedule(db, langflow, remote="no-such-flow")
    tid = str(uuid.uuid4())
    langflow.fail(500, times=1)
    (r,) = driver.run([{"task": EXECUTE, "arg": sched, "task_id": tid}])
    assert r["outcome"] == "retry" and r["exc_type"] == "ConnectionError" and "500" in r["exc_message"], r
    pending = row(db, sched)
    assert pending["status"] == "pending" and pending["next_retry_at"] and "500" in pending["error"]
    r, f = driver.run([{"task": EXECUTE, "arg": sched, "task_id": tid, "retries": 1}, {"task": EXECUTE, "arg": missing}])
    assert f["outcome"] == "failure" and "404" in f["exc_message"], f
    failed = row(db, missing)
    assert failed["status"] == "failed" and failed["tries"] == 1 and failed["finished_at"]
    assert r["outcome"] == "success" and r["result"]["tries"] == 2 and r["result"]["error"] is None, r
    done = row(db, sched)
    assert done["status"] == "completed" and done["next_retry_at"] is None
    lines = pgserver.task_log_lines(db.conn, done["id"])
    assert [m for _, m in lines if m.startswith(("Task started", "Retry"))] == [
        "Task started (attempt 1)", "Retry 1/2 in 1.0 s: " + pending["error"], "Task started (attempt 2, retry)"]


def test_one_bad_row_costs_the_others_nothing(migrated, driver, langflow):
    """Runs that start together are claimed in one transaction and recorded in one: a row the database refuses
    (a test trigger) fails that claim or that record alone, the batch is redone run by run, and the others
    complete. Two messages of one one-time schedule in the same claim start it once."""
    db = migrated
    good = [schedule(db, langflow, params={"value": f"g{i}"}) for i in range(4)]
    bad_claim, bad_record = schedule(db, langflow), schedule(db, langflow)
    once = schedule(db, langflow, schedule_type="one-time")
    with db.conn.cursor() as cur:
        cur.execute(
            "CREATE FUNCTION spark_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.schedule_id = %s OR (TG_OP = 'UPDATE' AND NEW.schedule_id = %s AND NEW.status = 'completed')"
            " THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$", (bad_claim, bad_record))
        cur.execute("CREATE TRIGGER spark_test_refuse BEFORE INSERT OR UPDATE ON tasks FOR EACH ROW"
                    " EXECUTE FUNCTION spark_test_refuse()")
    try:
        runs = driver.run([{"task": EXECUTE, "arg": s} for s in good + [bad_claim, bad_record, once, once]])
    finally:
        with db.conn.cursor() as cur:
            cur.execute("DROP TRIGGER spark_test_refuse ON tasks")
            cur.execute("DROP FUNCTION spark_test_refuse()")
    *ok, claim_r, record_r, once_a, once_b = runs
    assert [r["outcome"] for r in ok] == ["success"] * 4, ok
    for i, (r, s) in enumerate(zip(ok, good)):
        assert r["result"]["status"] == "completed" and r["result"]["input_data"] == f"g{i}", r
        assert row(db, s)["status"] == "completed"
    assert claim_r["outcome"] == "failure" and "creating the task row" in claim_r["exc_message"], claim_r
    assert "refused by the test" in claim_r["exc_message"]
    assert pgserver.task_rows(db.conn, schedule_id=bad_claim) == []
    assert record_r["outcome"] == "failure" and "recording the result" in record_r["exc_message"], record_r
    assert row(db, bad_record)["status"] == "failed"  # never left running
    assert sorted([once_a["outcome"], once_b["outcome"]]) == ["success", "success"]
    assert sorted([bool(once_a["result"]), bool(once_b["result"])]) == [False, True], (once_a, once_b)
    assert len(pgserver.task_rows(db.conn, schedule_id=once)) == 1
    # whether the bad runs shared a batch with good ones depends on how the driver's submissions fall into loop
    # ticks (a loaded machine splits them): the outcomes above are the property, whatever the batching was


def test_cancel_mid_call(migrated, driver, langflow):
    """The engine's cancel aborts the HTTP call: soft limit -> SoftTimeLimitExceeded on the row; cold stop -> row
    back to pending and TASK_DEFER; hard limit -> TimeLimitExceeded."""
    db = migrated
    langflow.delay = 60
    scheds = [schedule(db, langflow) for _ in range(3)]
    kinds = ["soft", "shutdown", "hard"]
    runs = driver.run([{"task": EXECUTE, "arg": s, "cancel_after": 2.0, "cancel": k} for s, k in zip(scheds, kinds)])
    assert len(langflow.runs()) == 3  # each call was in flight when the cancel came
    soft, cold, hard = runs
    assert soft["outcome"] == "failure" and soft["exc_type"] == "SoftTimeLimitExceeded", soft
    assert row(db, scheds[0])["status"] == "failed"
    assert row(db, scheds[0])["error"] == "SoftTimeLimitExceeded: soft time limit exceeded"
    assert cold["outcome"] == "defer" and cold["exc_type"] == "WorkerLostError", cold
    assert row(db, scheds[1])["status"] == "pending"
    assert hard["outcome"] == "failure" and hard["exc_type"] == "TimeLimitExceeded", hard
    assert row(db, scheds[2])["status"] == "failed"


def test_database_down_defers(driver, tmp_path):
    """No server where DATABASE_URL points: every run ends TASK_DEFER at once, none waits or sticks."""
    driver.db_url = f"postgresql://postgres@127.0.0.1:{harness.free_port()}/none"
    runs = driver.run([{"task": EXECUTE, "arg": str(uuid.uuid4())} for _ in range(5)])
    assert {r["outcome"] for r in runs} == {"defer"}, runs
    assert all(r["exc_type"] == "ConnectionError" and "database unavailable" in r["exc_message"] for r in runs)


def test_agents_hive_and_run_task(migrated, driver, agents, hive, langflow):
    db = migrated
    s_agent = schedule(db, agents, "automagik-agents", "simple", params={"value": "ping"})
    s_team = schedule(db, hive, "automagik-hive", "hive-team", params={"value": "go"})
    s_wf = schedule(db, hive, "automagik-hive", "hive-wf", params={"value": "go"})
    s_nope = schedule(db, hive, "automagik-hive", "nope")
    wf = pgserver.seed_workflow(db.conn, _sources[(langflow.url, "langflow")], "flow-1")
    tid = pgserver.seed_pending_task(db.conn, wf, "manual input")
    a, team, w, nope, manual, again = driver.run(
        [{"task": EXECUTE, "arg": s} for s in (s_agent, s_team, s_wf, s_nope)]
        + [{"task": "run_task", "arg": tid}, {"task": "run_task", "arg": str(uuid.uuid4())}])
    assert json.loads(a["result"]["output_data"])["result"] == "agent reply: ping"
    assert team["result"]["output_data"] == "team lead: go\n\n**m1**: member one"
    assert w["result"]["output_data"] == "workflow output: go"
    assert nope["outcome"] == "failure" and "not found in AutoMagik Hive" in nope["exc_message"]
    # Hive's sequence: the listings until the id is found, then the run
    paths = [r.path for r in hive.requests]
    assert paths.count("/teams/hive-team/runs") == 1 and paths.count("/workflows/hive-wf/runs") == 1
    assert paths.count("/agents") == 3 and paths.count("/teams") == 3 and paths.count("/workflows") == 2
    assert manual["result"]["id"] == tid and manual["result"]["status"] == "completed"
    assert again["outcome"] == "failure" and "not found" in again["exc_message"]


def test_recovery_of_a_dead_workers_rows(migrated, driver, langflow):
    """The heartbeat (a timer on the loop) retires the workers row of a dead process on this host and fails the
    running rows it held ("worker lost")."""
    db = migrated
    sched = schedule(db, langflow)
    wf_id = pgserver.task_rows(db.conn, schedule_id=sched) or None
    with db.conn.cursor() as cur:
        cur.execute("SELECT workflow_id FROM schedules WHERE id = %s", (sched,))
        wf_id = cur.fetchone()[0]
        lost, dead = str(uuid.uuid4()), str(uuid.uuid4())
        cur.execute("INSERT INTO tasks (id, workflow_id, status, input_data, tries, max_retries, started_at,"
                    " updated_at) VALUES (%s, %s, 'running', '\"x\"', 1, 3, now(), now())", (lost, wf_id))
        # a pid that cannot be alive (above pid_max)
        cur.execute("INSERT INTO workers (id, hostname, pid, status, stats, created_at, updated_at, last_heartbeat)"
                    " VALUES (%s, %s, 99999999, 'active', %s, now(), now(), now())",
                    (dead, os.uname().nodename, json.dumps({"current_tasks": [lost]})))
    langflow.hold = 0
    langflow.delay = 0
    # a run whose call lasts until recovery has run: the source answers once the row is failed
    done = threading.Event()

    def release():
        harness.wait_for(lambda: pgserver.task_rows(db.conn, task_id=lost)[0]["status"] == "failed", t(30),
                         what="the lost row failed")
        done.set()
    threading.Thread(target=release, daemon=True).start()
    orig = langflow.route
    langflow.route = lambda req: (done.wait(t(30)), orig(req))[1]
    try:
        (r,) = driver.run([{"task": EXECUTE, "arg": sched}], env={"SPARK_HEARTBEAT_INTERVAL": "0.2"})
    finally:
        langflow.route = orig
    assert r["outcome"] == "success"
    (lr,) = pgserver.task_rows(db.conn, task_id=lost)
    assert lr["status"] == "failed" and lr["error"] == "worker lost"
    with db.conn.cursor() as cur:
        cur.execute("SELECT status FROM workers WHERE id = %s", (dead,))
        assert cur.fetchone()[0] == "stopped"
    assert "marked failed (worker lost)" in driver.stderr()


def test_database_lost_mid_call(tmp_path, langflow):
    """PostgreSQL goes away while the calls are in flight: every run ends TASK_DEFER (its message comes back and
    finds the row), none is left waiting, and the driver still shuts down."""
    with pgserver.PgServer() as pg:  # its own directory: the postgres user cannot reach tmp_path
        d = Driver(tmp_path, pg.url)
        (r,) = d.run([{"task": EXECUTE, "arg": str(uuid.uuid4())}])  # migrates
        conn = psycopg2.connect(pg.url)
        conn.autocommit = True
        db = type("Db", (), {"url": pg.url, "conn": conn})
        _sources.pop((langflow.url, "langflow"), None)
        scheds = [schedule(db, langflow) for _ in range(20)]
        _sources.pop((langflow.url, "langflow"), None)
        conn.close()
        langflow.hold = len(scheds)
        gate = threading.Event()
        orig = langflow.route
        langflow.route = lambda req: (gate.wait(t(30)), orig(req))[1]
        try:
            d.start([{"task": EXECUTE, "arg": s} for s in scheds], shutdown_timeout=5)
            harness.wait_for(lambda: langflow.max_in_flight == len(scheds), t(30), what="every call in flight")
            # the server runs with synchronous_commit=off and stops at once: make the claims durable first (one
            # claim transaction holds them all, so without this the stop may take every one of them)
            c = psycopg2.connect(pg.url)
            c.autocommit = True
            with c.cursor() as cur:
                cur.execute("CHECKPOINT")
            c.close()
            pg.pause()
            gate.set()
            runs = d.finish()
        finally:
            langflow.route = orig
        assert {r["outcome"] for r in runs} == {"defer"}, runs
        assert all("database unavailable" in r["exc_message"] for r in runs)
        assert "could not mark this worker stopped" in d.stderr()
        pg.resume()
        c = psycopg2.connect(pg.url)
        with c.cursor() as cur:
            # left running for the redelivered messages (or recovery)
            cur.execute("SELECT status, count(*) FROM tasks GROUP BY status")
            assert cur.fetchall() == [("running", len(scheds))]
        c.close()

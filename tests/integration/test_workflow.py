"""Workflow tasks end to end: Python Celery send_task -> real spark-worker -> real PostgreSQL rows and small local
LangFlow / automagik-agents / automagik-hive servers (sources.py).

Fixtures from conftest.py: postgres (session, pgserver.py), redis (the module's redis-server, flushed), celery.
"""
import base64
import json
import os
import signal
import subprocess
import uuid

import psycopg2
import pytest

import harness
import pgserver
import sources
from harness import t

EXECUTE = "automagik_spark.core.tasks.workflow_tasks.execute_workflow"
RUN_TASK = "spark.run_task"
KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()
MAX_RETRIES = 2  # keeps the 5xx tests short: 1 + 2 attempts


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def db(postgres):
    """A fresh database for this module, migrated by `spark-worker --migrate`."""
    name = "wf_" + uuid.uuid4().hex[:10]
    admin = psycopg2.connect(postgres.url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    cp = subprocess.run([harness.binary("spark-worker"), "--migrate"], capture_output=True, text=True,
                        env=harness.base_env({"DATABASE_URL": url}), timeout=t(30))
    assert cp.returncode == 0, cp.stderr
    conn = psycopg2.connect(url)
    conn.autocommit = True
    yield type("Db", (), {"url": url, "conn": conn, "migrate_out": cp.stdout})
    conn.close()
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


class Worker:
    """spark-worker run directly (no sparkd), stopped with SIGTERM so it marks its workers row stopped."""

    def __init__(self, tmp_path, env, name):
        self.dir = tmp_path / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "worker.log"
        self.env = harness.base_env(env, report_dir=self.dir)
        self.proc = None

    def start(self, *args):
        self.proc = subprocess.Popen([harness.binary("spark-worker"), *args], env=self.env, cwd=str(self.dir),
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout=None):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout or t(15))
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def workers(tmp_path, redis, db):
    """make(**env) -> a started spark-worker on the module's redis and database."""
    started = []

    def make(env=None, name=None, args=()):
        e = {
            "CELERY_BROKER_URL": redis.url(0),
            "CELERY_RESULT_BACKEND": redis.url(1),
            "DATABASE_URL": db.url,
            "AUTOMAGIK_SPARK_ENCRYPTION_KEY": KEY,
            "AUTOMAGIK_SPARK_HTTP_TIMEOUT": "20",
            "CELERY_TASK_MAX_RETRIES": str(MAX_RETRIES),
            "CELERY_TASK_RETRY_BACKOFF": "False",
            "CELERY_TASK_DEFAULT_RETRY_DELAY": "0.2",
            "SPARK_HEARTBEAT_INTERVAL": "0.5",
        }
        e.update(env or {})
        w = Worker(tmp_path, e, name or f"w{len(started)}").start(*args)
        started.append(w)
        return w
    yield make
    for w in started:
        w.stop()
    reports = []
    for w in started:
        reports += harness.san_reports(w.dir)
    if reports:
        pytest.fail("sanitizer reports:\n" + "\n".join(reports), pytrace=False)


@pytest.fixture
def app(celery):
    return celery()


@pytest.fixture(scope="module")
def langflow():
    with sources.LangFlowServer(flows=("flow-1",)) as s:
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


# ---------------------------------------------------------------------------------------------------------------
# helpers

SOURCE_TYPES = {"langflow": "langflow", "agents": "automagik-agents", "hive": "automagik-hive"}


_sources = {}  # (database, url, key) -> workflow_sources id: the url column is unique


def source_row(db, url, kind, api_key="the-secret-key", fernet_key=KEY):
    k = (db.url, url, api_key, fernet_key)
    if k not in _sources:
        _sources[k] = pgserver.seed_source(db.conn, SOURCE_TYPES[kind], url, api_key, fernet_key)
    return _sources[k]


def make_schedule(db, server, kind, remote_id, api_key="the-secret-key", **sched):
    src = source_row(db, server.url, kind, api_key)
    wf = pgserver.seed_workflow(db.conn, src, remote_id, SOURCE_TYPES[kind])
    return pgserver.seed_schedule(db.conn, wf, **sched)


def send(app, name, arg):
    return app.send_task(name, args=[arg])


def wait_result(res, timeout=20):
    """The task's final state (never raises for FAILURE)."""
    try:
        res.get(timeout=t(timeout), propagate=False)
    except Exception:
        pass
    return res.state


def rows(db, schedule_id):
    return pgserver.task_rows(db.conn, schedule_id=schedule_id)


def wait_rows(db, schedule_id, pred, timeout=10):
    return harness.wait_for(lambda: (lambda r: r if r and pred(r) else None)(rows(db, schedule_id)),
                            t(timeout), what="task rows")


# ---------------------------------------------------------------------------------------------------------------
# migrations


def test_migrate_creates_schema_once(db):
    assert "applied migration 1" in db.migrate_out
    with db.conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        tables = {r[0] for r in cur.fetchall()}
    assert {"workflow_sources", "workflows", "workflow_components", "schedules", "tasks", "task_logs",
            "workers", "spark_schema_migrations"} <= tables
    cp = subprocess.run([harness.binary("spark-worker"), "--migrate"], capture_output=True, text=True,
                        env=harness.base_env({"DATABASE_URL": db.url}), timeout=t(30))
    assert cp.returncode == 0 and "up to date" in cp.stdout


def test_existing_automagik_database_is_accepted(postgres):
    """Tables made by automagik-spark (here with an extra column) are used as they are, never altered."""
    name = "wf_old_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(postgres.url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    try:
        c = psycopg2.connect(url)
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute("CREATE TABLE tasks (id uuid PRIMARY KEY, status varchar NOT NULL, legacy_col text)")
        cp = subprocess.run([harness.binary("spark-worker"), "--migrate"], capture_output=True, text=True,
                            env=harness.base_env({"DATABASE_URL": url}), timeout=t(30))
        assert cp.returncode == 0, cp.stderr
        with c.cursor() as cur:
            cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'tasks'")
            assert {r[0] for r in cur.fetchall()} == {"id", "status", "legacy_col"}
            cur.execute("SELECT to_regclass('workers') IS NOT NULL")
            assert cur.fetchone()[0]
        c.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


# ---------------------------------------------------------------------------------------------------------------
# LangFlow


def test_langflow_completed(db, workers, app, langflow):
    workers()
    sched = make_schedule(db, langflow, "langflow", "flow-1", params={"value": "héllo wörld ✓"})
    res = send(app, EXECUTE, sched)
    value = res.get(timeout=t(20))
    assert value["status"] == "completed" and value["schedule_id"] == sched and value["tries"] == 1
    assert set(value) == {"id", "workflow_id", "schedule_id", "status", "input_data", "output_data", "error",
                          "tries", "max_retries", "next_retry_at", "created_at", "updated_at", "started_at",
                          "finished_at"}
    (row,) = rows(db, sched)
    assert row["status"] == "completed" and row["started_at"] and row["finished_at"] and row["error"] is None
    assert row["input_data"] == "héllo wörld ✓"
    # stored as automagik-spark stores it: a JSON string holding the serialized reply
    out = json.loads(row["output_data"])
    assert out["outputs"][0]["outputs"][0]["results"]["message"]["text"] == "echo: héllo wörld ✓"
    (run,) = langflow.runs()
    assert run.headers.get("x-api-key") == "the-secret-key"
    assert run.path == "/api/v1/run/flow-1" and run.query == {"stream": "false"}
    assert run.json() == {"input_value": "héllo wörld ✓", "output_type": "debug", "input_type": "chat",
                          "tweaks": {}}
    assert run.headers.get("content-type") == "application/json"
    lines = pgserver.task_log_lines(db.conn, row["id"])
    assert ("info", "Task started (attempt 1)") in lines and ("info", "Task completed") in lines


def test_input_selection_and_one_time_schedule(db, workers, app, langflow):
    workers()
    s1 = make_schedule(db, langflow, "langflow", "flow-1", schedule_type="one-time", input_data="from input_data")
    s2 = make_schedule(db, langflow, "langflow", "flow-1")
    assert wait_result(send(app, EXECUTE, s1)) == "SUCCESS"
    assert wait_result(send(app, EXECUTE, s2)) == "SUCCESS"
    assert rows(db, s1)[0]["input_data"] == "from input_data"
    assert rows(db, s2)[0]["input_data"] == "Hello World"
    with db.conn.cursor() as cur:
        cur.execute("SELECT status FROM schedules WHERE id = %s", (s1,))
        assert cur.fetchone()[0] == "completed"
    # a completed schedule (and a missing one) gives a null result and no row
    r = send(app, EXECUTE, s1)
    assert r.get(timeout=t(20)) is None
    assert len(rows(db, s1)) == 1
    assert send(app, EXECUTE, str(uuid.uuid4())).get(timeout=t(20)) is None


def test_langflow_404_fails_at_once(db, workers, app, langflow):
    workers()
    sched = make_schedule(db, langflow, "langflow", "no-such-flow")
    res = send(app, EXECUTE, sched)
    assert wait_result(res) == "FAILURE"
    assert "404" in str(res.result)
    (row,) = rows(db, sched)
    assert row["status"] == "failed" and row["tries"] == 1 and "404" in row["error"] and row["finished_at"]
    assert len(langflow.runs()) == 1
    assert any(lvl == "error" for lvl, _ in pgserver.task_log_lines(db.conn, row["id"]))


def test_langflow_500_retried_on_the_same_row(db, workers, app, langflow):
    """Needs the engine's retries (CELERY_TASK_MAX_RETRIES, same task id, retries+1)."""
    workers()
    langflow.fail(500)
    sched = make_schedule(db, langflow, "langflow", "flow-1")
    res = send(app, EXECUTE, sched)
    assert wait_result(res, timeout=30) == "FAILURE"
    (row,) = rows(db, sched)  # one row for every attempt
    assert row["status"] == "failed" and row["tries"] == MAX_RETRIES + 1 and "500" in row["error"]
    assert row["next_retry_at"] is None and row["finished_at"] is not None
    assert len(langflow.runs()) == MAX_RETRIES + 1
    lines = pgserver.task_log_lines(db.conn, row["id"])
    assert sum(1 for _, m in lines if m.startswith("Retry ")) == MAX_RETRIES
    assert sum(1 for _, m in lines if m.startswith("Task started")) == MAX_RETRIES + 1
    assert lines[-1][0] == "error"


def test_500_then_success_completes_same_row(db, workers, app, langflow):
    """Needs the engine's retries."""
    workers()
    langflow.fail(503, times=1)
    sched = make_schedule(db, langflow, "langflow", "flow-1")
    value = send(app, EXECUTE, sched).get(timeout=t(30))
    assert value["status"] == "completed" and value["tries"] == 2 and value["error"] is None
    (row,) = rows(db, sched)
    # next_retry_at is set only while the row waits for its retry
    assert row["status"] == "completed" and row["next_retry_at"] is None
    assert any(m.startswith("Retry 1/") for _, m in pgserver.task_log_lines(db.conn, row["id"]))


def test_bad_key_fails_without_calling(db, workers, app, langflow):
    workers()
    # another spelling of the same server (the url column is unique), key encrypted with a different Fernet key
    url = langflow.url.replace("127.0.0.1", "localhost")
    src = source_row(db, url, "langflow", "k", base64.urlsafe_b64encode(os.urandom(32)).decode())
    sched = pgserver.seed_schedule(db.conn, pgserver.seed_workflow(db.conn, src, "flow-1"))
    res = send(app, EXECUTE, sched)
    assert wait_result(res) == "FAILURE" and "decrypt" in str(res.result)
    assert rows(db, sched)[0]["status"] == "failed"
    assert langflow.runs() == []


def test_key_never_logged(db, workers, app, langflow):
    w = workers({"SPARK_LOGLEVEL": "debug"})
    src = source_row(db, langflow.url + "/", "langflow", "sk-VERY-SECRET-42")  # the url column is unique
    sched = pgserver.seed_schedule(db.conn, pgserver.seed_workflow(db.conn, src, "flow-1"))
    assert wait_result(send(app, EXECUTE, sched)) == "SUCCESS"
    w.stop()
    assert "sk-VERY-SECRET-42" not in w.output()


# ---------------------------------------------------------------------------------------------------------------
# automagik-agents and automagik-hive


def test_agents_completed(db, workers, app, agents):
    workers()
    sched = make_schedule(db, agents, "agents", "simple", params={"value": "ping"})
    value = send(app, EXECUTE, sched).get(timeout=t(20))
    assert value["status"] == "completed"
    out = json.loads(value["output_data"])
    assert out == {"result": "agent reply: ping", "session_id": "ag-session", "tool_calls": [],
                   "usage": {"total_tokens": 7}, "success": True}
    (run,) = agents.runs()
    assert run.path == "/api/v1/agent/simple/run" and run.headers.get("x-api-key") == "the-secret-key"
    assert run.headers.get("accept") == "application/json"
    assert run.json() == {"message_content": "ping", "session_name": None, "session_origin": "automagik-spark",
                          "user_id": "550e8400-e29b-41d4-a716-446655440000"}


@pytest.mark.parametrize("ident,kind,expect", [
    ("hive-agent", "agents", "hive agent: go"),
    ("hive-team", "teams", "team lead: go\n\n**m1**: member one"),
    ("hive-wf", "workflows", "workflow output: go"),
])
def test_hive_completed(db, workers, app, hive, ident, kind, expect):
    workers()
    sched = make_schedule(db, hive, "hive", ident, params={"value": "go"})
    value = send(app, EXECUTE, sched).get(timeout=t(20))
    assert value["status"] == "completed" and value["output_data"] == expect
    (run,) = hive.runs()
    assert run.path == f"/{kind}/{ident}/runs"
    assert run.headers.get("content-type") == "application/x-www-form-urlencoded"
    form = run.form()
    assert form["message"] == "go" and form["stream"] == "false" and form["session_id"] == value["id"]
    assert form.get("mode") == ("coordinate" if kind == "teams" else None)
    assert all(r.headers.get("x-api-key") == "the-secret-key" for r in hive.requests)
    assert [r.path for r in hive.requests if r.method == "GET"][0] == "/agents"


@pytest.mark.parametrize("kind", ["agents", "hive"])
def test_404_fails_at_once(db, workers, app, agents, hive, kind):
    workers()
    server = agents if kind == "agents" else hive
    server.fail(404)  # the run request answers 404 (Hive's listings still answer)
    sched = make_schedule(db, server, kind, "simple" if kind == "agents" else "hive-agent")
    res = send(app, EXECUTE, sched)
    assert wait_result(res) == "FAILURE" and "404" in str(res.result)
    (row,) = rows(db, sched)
    assert row["status"] == "failed" and row["tries"] == 1
    assert len(server.runs()) == 1


@pytest.mark.parametrize("kind", ["agents", "hive"])
def test_500_retried_then_failed(db, workers, app, agents, hive, kind):
    """Needs the engine's retries."""
    workers()
    server = agents if kind == "agents" else hive
    server.fail(500)
    sched = make_schedule(db, server, kind, "simple" if kind == "agents" else "hive-agent")
    assert wait_result(send(app, EXECUTE, sched), timeout=30) == "FAILURE"
    (row,) = rows(db, sched)
    assert row["status"] == "failed" and row["tries"] == MAX_RETRIES + 1
    assert len(server.runs()) == MAX_RETRIES + 1


def test_unknown_hive_id_fails(db, workers, app, hive):
    workers()
    sched = make_schedule(db, hive, "hive", "nope")
    res = send(app, EXECUTE, sched)
    assert wait_result(res) == "FAILURE" and "not found" in str(res.result)
    assert hive.runs() == []


# ---------------------------------------------------------------------------------------------------------------
# spark.run_task, connection errors, no database


def test_run_task_pending_row(db, workers, app, langflow):
    workers()
    wf = pgserver.seed_workflow(db.conn, source_row(db, langflow.url, "langflow"), "flow-1")
    tid = pgserver.seed_pending_task(db.conn, wf, "manual input")
    value = app.send_task(RUN_TASK, args=[tid]).get(timeout=t(20))
    assert value["id"] == tid and value["status"] == "completed" and value["tries"] == 1
    assert langflow.runs()[0].json()["input_value"] == "manual input"
    lines = pgserver.task_log_lines(db.conn, tid)
    assert lines[0] == ("info", "Task started (attempt 1)")
    res = app.send_task(RUN_TASK, args=[str(uuid.uuid4())])
    assert wait_result(res) == "FAILURE" and "not found" in str(res.result)


def test_ids_by_keyword(db, workers, app, langflow):
    """execute_workflow(schedule_id=...) and run_task(task_id=...) as Python calls them by keyword: the worker
    reads the id from kwargs when args is empty (the workflow tasks take no DOM of the message)."""
    workers()
    sched = make_schedule(db, langflow, "langflow", "flow-1", params={"value": "by keyword"})
    value = app.send_task(EXECUTE, kwargs={"schedule_id": sched}).get(timeout=t(20))
    assert value["status"] == "completed" and value["schedule_id"] == sched
    assert langflow.runs()[0].json()["input_value"] == "by keyword"
    wf = pgserver.seed_workflow(db.conn, source_row(db, langflow.url, "langflow"), "flow-1")
    tid = pgserver.seed_pending_task(db.conn, wf, "manual by keyword")
    value = app.send_task(RUN_TASK, kwargs={"task_id": tid}).get(timeout=t(20))
    assert value["id"] == tid and value["status"] == "completed"
    res = app.send_task(EXECUTE, kwargs={"schedule_id": "not-a-uuid"})
    assert wait_result(res) == "FAILURE" and "schedule_id must be a UUID string" in str(res.result)
    res = app.send_task(EXECUTE, kwargs={"other": sched})
    assert wait_result(res) == "FAILURE" and "schedule_id must be a UUID string" in str(res.result)


def test_connection_refused_is_retried(db, workers, app):
    """Needs the engine's retries."""
    workers()
    src = source_row(db, f"http://127.0.0.1:{harness.free_port()}", "langflow")
    wf = pgserver.seed_workflow(db.conn, src, "flow-1")
    sched = pgserver.seed_schedule(db.conn, wf)
    assert wait_result(send(app, EXECUTE, sched), timeout=30) == "FAILURE"
    (row,) = rows(db, sched)
    assert row["status"] == "failed" and row["tries"] == MAX_RETRIES + 1


def test_no_database_url(workers, app, db):
    workers({"DATABASE_URL": None})
    res = send(app, EXECUTE, str(uuid.uuid4()))
    assert wait_result(res) == "FAILURE" and "DATABASE_URL is not set" in str(res.result)


def mapped(pid, name):
    with open(f"/proc/{pid}/maps") as f:
        return name in f.read()


def test_workflow_libraries_loaded_only_with_a_database(db, workers, app):
    """The workflow stack (spark-workflow.so: libpq, libcurl, libcrypto) costs ~7 MiB per process: a worker
    without DATABASE_URL never loads it, not even for a workflow task; one with DATABASE_URL loads it at start."""
    plain = workers({"DATABASE_URL": None}, name="plain")
    res = send(app, EXECUTE, str(uuid.uuid4()))
    assert wait_result(res) == "FAILURE" and "DATABASE_URL is not set" in str(res.result)
    assert app.send_task("spark.noop", args=[1]).get(timeout=t(20)) == 1
    for lib in ("spark-workflow.so", "libpq", "libcurl", "libcrypto"):
        assert not mapped(plain.proc.pid, lib), f"{lib} loaded without DATABASE_URL"
    with_db = workers(name="with-db")
    harness.wait_for(lambda: mapped(with_db.proc.pid, "spark-workflow.so"), t(10), what="the plugin loaded")
    assert mapped(with_db.proc.pid, "libpq")


def test_plugin_unavailable(db, workers, app, tmp_path):
    """spark-workflow.so that cannot be loaded: workflow tasks fail with the reason (logged once, at error level),
    built-in tasks still run, and --migrate says why in one line and exits 1."""
    missing = str(tmp_path / "nowhere" / "spark-workflow.so")
    w = workers({"SPARK_WORKFLOW_PLUGIN": missing})
    for name, arg in ((EXECUTE, str(uuid.uuid4())), (RUN_TASK, str(uuid.uuid4()))):
        res = send(app, name, arg)
        assert wait_result(res) == "FAILURE"
        assert isinstance(res.result, RuntimeError), res.result
        assert str(res.result).startswith("workflow support unavailable: ") and missing in str(res.result)
    assert app.send_task("spark.noop", args=["alive"]).get(timeout=t(20)) == "alive"
    lines = [ln for ln in w.output().splitlines() if "] workflow support unavailable: " in ln]
    assert len(lines) == 1 and ": ERROR/" in lines[0], w.output()
    cp = subprocess.run([harness.binary("spark-worker"), "--migrate"], capture_output=True, text=True,
                        env=harness.base_env({"DATABASE_URL": db.url, "SPARK_WORKFLOW_PLUGIN": missing}),
                        timeout=t(30))
    assert cp.returncode == 1 and cp.stdout == ""
    err = cp.stderr.strip().splitlines()
    assert len(err) == 1 and "workflow support unavailable" in err[0] and missing in err[0], cp.stderr


# ---------------------------------------------------------------------------------------------------------------
# workers table, heartbeat, recovery


def worker_row(db, pid):
    with db.conn.cursor() as cur:
        cur.execute("SELECT status, last_heartbeat, stats, hostname FROM workers WHERE pid = %s"
                    " ORDER BY created_at DESC LIMIT 1", (pid,))
        return cur.fetchone()


def test_workers_row_heartbeat(db, workers):
    w = workers()
    first = harness.wait_for(lambda: worker_row(db, w.proc.pid), t(10), what="workers row")
    assert first[0] == "active" and first[2]["slots"] >= 1
    later = harness.wait_for(lambda: (lambda r: r if r and r[1] > first[1] else None)(worker_row(db, w.proc.pid)),
                             t(5), what="a newer heartbeat")
    assert later[0] == "active"
    w.stop()
    assert worker_row(db, w.proc.pid)[0] == "stopped"


def test_killed_worker_leaves_no_running_row(db, workers, app, langflow):
    """Kill -9 mid-workflow: recovery never leaves the row running; with the engine's redelivery the task
    completes on the same row (tries counts both attempts)."""
    langflow.delay = 3
    a = workers(name="victim")
    sched = make_schedule(db, langflow, "langflow", "flow-1")
    res = send(app, EXECUTE, sched)
    wait_rows(db, sched, lambda r: r[0]["status"] == "running")
    harness.wait_for(lambda: langflow.runs(), t(5), what="the source call")
    a.kill()
    langflow.delay = 0
    workers(name="rescuer")  # recovers the row and, with redelivery, runs the message again
    final = wait_rows(db, sched, lambda r: r[0]["status"] in ("completed", "failed"), timeout=30)
    assert len(final) == 1
    if final[0]["status"] == "completed":
        assert final[0]["tries"] == 2
        assert res.get(timeout=t(20))["status"] == "completed"
    else:
        assert final[0]["error"] == "worker lost"


def test_concurrent_slots_share_one_workers_row(db, workers, app, langflow):
    """Several slot threads in one process: each its own connection, one workers row, no deadlock."""
    langflow.delay = 0.5
    w = workers({"CELERY_WORKER_POOL": "threads", "CELERY_WORKER_CONCURRENCY": "3"}, args=("--slots", "3"))
    scheds = [make_schedule(db, langflow, "langflow", "flow-1", params={"value": f"n{i}"}) for i in range(6)]
    results = [send(app, EXECUTE, s) for s in scheds]
    for r in results:
        assert r.get(timeout=t(20))["status"] == "completed"
    for s in scheds:
        (row,) = rows(db, s)
        assert row["status"] == "completed" and row["tries"] == 1
    def row_stats():
        with db.conn.cursor() as cur:
            cur.execute("SELECT count(*), max((stats->>'succeeded')::int) FROM workers WHERE pid = %s",
                        (w.proc.pid,))
            n, succeeded = cur.fetchone()
        return (n, succeeded) if succeeded == 6 else None

    # the stats column is written by the heartbeat: wait for the beat after the last task
    n, succeeded = harness.wait_for(row_stats, t(10), interval=0.1, what="stats.succeeded == 6 in the workers row")
    assert n == 1 and succeeded == 6

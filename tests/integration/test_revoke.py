"""Revoke (issue 8, item 2) in spark-worker run alone: the revoked ids come from SPARK_REVOKED_KEY (read after
every connect) and from sparkd's `revoke` command on fd 3 (sent here by the test, as sparkd would). A revoked id
is never run, wherever its message is when the revoke comes (not fetched yet, prefetched, waiting for its ETA,
coming back as a retry): it gets Celery's REVOKED result and is acked. terminate stops a running task now."""

import base64
import json
import os
import subprocess
import time
import uuid

import psycopg2
import pytest
from celery.exceptions import TaskRevokedError

import pgserver
import sources
from engine_util import envelope, meta, processing_lists
from harness import base_env, binary, t, wait_for
from worker_util import Worker

REVOKED_KEY = "spark:revoked"


def revoked_meta(backend, task_id, reason="revoked"):
    """Wait for the REVOKED meta Celery's mark_as_revoked writes; return it."""
    m = wait_for(lambda: (lambda x: x if x and x["status"] == "REVOKED" else None)(meta(backend, task_id)), t(10),
                 what=f"REVOKED meta of {task_id}")
    assert m["result"] == {"exc_type": "TaskRevokedError", "exc_message": [reason],
                           "exc_module": "celery.exceptions"}, m
    assert m["traceback"] is None and m["date_done"], m
    return m


def nothing_held(broker):
    """Every message acked: no processing list holds one, kombu's unacked hash is empty."""
    return all(n == 0 for n in processing_lists(broker).values()) and broker.hlen("unacked") == 0


def test_revoked_before_fetch_and_after_restart(tmp_path, redis, celery):
    """An id revoked before its message is fetched is never run: REVOKED via the command; a worker started later
    refuses it from the sorted set alone (sparkd writes it; here the test does, as sparkd would)."""
    broker, backend = redis.client(0), redis.client(1)
    app = celery()
    gone = str(uuid.uuid4())
    w = Worker(tmp_path, redis)
    try:
        broker.zadd(REVOKED_KEY, {gone: time.time() + 3600})
        w.revoke([gone])
        app.send_task("spark.noop", args=[1], task_id=gone)
        ok = app.send_task("spark.noop", args=[2])
        assert ok.get(timeout=t(10)) == 2
        revoked_meta(backend, gone)
        r = app.AsyncResult(gone)
        assert r.state == "REVOKED"
        assert isinstance(r.result, TaskRevokedError)
        wait_for(lambda: nothing_held(broker), t(5), what="the revoked message acked")
    finally:
        assert w.stop() == 0

    backend.delete(f"celery-task-meta-{gone}")
    w2 = Worker(tmp_path, redis, name="celery@test2")  # knows the id only from Redis
    try:
        app.send_task("spark.noop", args=[3], task_id=gone)
        after = app.send_task("spark.noop", args=[4])
        assert after.get(timeout=t(10)) == 4
        revoked_meta(backend, gone)
        assert app.AsyncResult(gone).state == "REVOKED"
    finally:
        assert w2.stop() == 0
    # an expired entry no longer revokes: the same id runs once its score has passed
    broker.zadd(REVOKED_KEY, {gone: time.time() - 1})
    backend.delete(f"celery-task-meta-{gone}")
    w3 = Worker(tmp_path, redis, name="celery@test3")
    try:
        # (read from Redis: the client caches the REVOKED state it already saw for this id)
        app.send_task("spark.noop", args=[5], task_id=gone)
        wait_for(lambda: (meta(backend, gone) or {}).get("status") == "SUCCESS", t(10), what="the id run")
        assert meta(backend, gone)["result"] == 5
    finally:
        assert w3.stop() == 0


def test_revoke_prefetched_then_terminate_running(tmp_path, redis, celery):
    """One slot, prefetch 2: a sleep runs and a noop waits behind it. Revoking the waiting one ends it at once
    (REVOKED, acked) while the sleep runs on; revoke with terminate stops the 30 s sleep within a second,
    recorded REVOKED (terminated); the process goes on serving."""
    broker, backend = redis.client(0), redis.client(1)
    app = celery()
    w = Worker(tmp_path, redis, env={"CELERY_WORKER_PREFETCH_MULTIPLIER": "2"})
    try:
        sleeper = app.send_task("spark.sleep", args=[30])
        wait_for(lambda: (meta(backend, sleeper.id) or {}).get("status") == "STARTED", t(10), what="sleep started")
        waiting = app.send_task("spark.noop", args=[7])
        # prefetched: held in the process's processing list, not started
        wait_for(lambda: sum(processing_lists(broker).values()) == 2 and broker.llen("celery") == 0, t(10),
                 what="the noop prefetched")
        assert [i["id"] for i in w.query("reserved")] == [waiting.id]
        w.revoke([waiting.id])
        revoked_meta(backend, waiting.id)
        assert (meta(backend, sleeper.id) or {}).get("status") == "STARTED"  # the sleep was not touched
        wait_for(lambda: sum(processing_lists(broker).values()) == 1, t(5), what="the revoked one acked")

        began = time.monotonic()
        w.revoke([sleeper.id], terminate=True, sig="SIGTERM")
        revoked_meta(backend, sleeper.id, reason="terminated")
        assert time.monotonic() - began < t(1.0)
        wait_for(lambda: nothing_held(broker), t(5), what="the terminated one acked")
        w.wait_report("finish", t(5), lambda rep: rep[2] == sleeper.id and rep[3] == "revoked")
        assert app.send_task("spark.noop", args=[8]).get(timeout=t(10)) == 8
    finally:
        assert w.stop() == 0


def test_revoked_while_waiting_for_eta_or_retry(tmp_path, redis, celery):
    """A message parked in spark:eta (a countdown, or a retry: same id, retries + 1, an ETA) is refused when it
    comes due after its id was revoked: REVOKED, never run."""
    broker, backend = redis.client(0), redis.client(1)
    app = celery()
    w = Worker(tmp_path, redis)
    try:
        later = app.send_task("spark.noop", args=[1], countdown=1.5)
        wait_for(lambda: broker.zcard("spark:eta") == 1, t(10), what="the countdown parked in spark:eta")
        # a retry as the worker parks it: the envelope with retries 1 and an ETA, in spark:eta
        retry_id = str(uuid.uuid4())
        eta = time.time() + 1.5
        env = envelope("spark.noop", args=[2], task_id=retry_id,
                       headers={"retries": 1, "eta": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(eta)) +
                                "+00:00"})
        broker.zadd("spark:eta", {json.dumps({"queue": "celery", "envelope": json.dumps(env)}): eta})
        w.revoke([later.id, retry_id])
        revoked_meta(backend, later.id)
        revoked_meta(backend, retry_id)
        assert broker.zcard("spark:eta") == 0
        wait_for(lambda: nothing_held(broker), t(5), what="both acked")
        assert app.AsyncResult(later.id).state == "REVOKED"
    finally:
        assert w.stop() == 0


# ---------------------------------------------------------------------------------------------------------------
# workflow tasks: the tasks row leaves pending/running with the revocation named


@pytest.fixture(scope="module")
def wfdb(postgres):
    """A fresh database for this module, migrated by `spark-worker --migrate` (as test_workflow.py does)."""
    name = "rv_" + uuid.uuid4().hex[:10]
    admin = psycopg2.connect(postgres.url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    cp = subprocess.run([binary("spark-worker"), "--migrate"], capture_output=True, text=True,
                        env=base_env({"DATABASE_URL": url}), timeout=t(30))
    assert cp.returncode == 0, cp.stderr
    conn = psycopg2.connect(url)
    conn.autocommit = True
    yield type("Db", (), {"url": url, "conn": conn})
    conn.close()
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="module")
def langflow():
    with sources.LangFlowServer(flows=("flow-1",)) as s:
        yield s


def test_revoked_workflow_rows(tmp_path, redis, celery, wfdb, langflow):
    """spark.run_task of a pending row: revoked before it runs, the row ends failed naming the revocation and the
    source is never called; terminated during its HTTP call, the call is aborted and the row ends the same."""
    langflow.reset()
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    backend = redis.client(1)
    app = celery()
    src = pgserver.seed_source(wfdb.conn, "langflow", langflow.url, "k", key)
    wf = pgserver.seed_workflow(wfdb.conn, src, "flow-1")
    w = Worker(tmp_path, redis, env={"DATABASE_URL": wfdb.url, "AUTOMAGIK_SPARK_ENCRYPTION_KEY": key})
    try:
        row = pgserver.seed_pending_task(wfdb.conn, wf)
        celery_id = str(uuid.uuid4())
        w.revoke([celery_id])
        app.send_task("spark.run_task", args=[row], task_id=celery_id)
        revoked_meta(backend, celery_id)
        [r] = wait_for(lambda: (lambda x: x if x and x[0]["status"] == "failed" else None)(
            pgserver.task_rows(wfdb.conn, task_id=row)), t(10), what="the row failed")
        assert "revoked" in r["error"] and "TaskRevokedError" in r["error"], r
        assert langflow.runs() == []

        langflow.delay = 5.0
        row2 = pgserver.seed_pending_task(wfdb.conn, wf)
        running = app.send_task("spark.run_task", args=[row2])
        wait_for(lambda: langflow.requests, t(10), what="the source called")
        began = time.monotonic()
        w.revoke([running.id], terminate=True)
        revoked_meta(backend, running.id, reason="terminated")
        assert time.monotonic() - began < t(1.0)
        [r2] = wait_for(lambda: (lambda x: x if x and x[0]["status"] == "failed" else None)(
            pgserver.task_rows(wfdb.conn, task_id=row2)), t(10), what="the terminated row failed")
        assert "revoked" in r2["error"], r2
    finally:
        assert w.stop() == 0

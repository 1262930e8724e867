"""The Python Celery side of the workflow benchmark: execute_workflow(schedule_id) the way automagik-spark's own
task does it (reference/automagik-spark.md, "How the original executes"), without its ORM and async layers:

1. in one transaction: SELECT the schedule FOR UPDATE (missing or completed: nothing to do), complete a one-time
   schedule, take the input (params["value"], else input_data, else "Hello World"), INSERT a `running` tasks row;
2. read the workflow and its source, decrypt the API key when there is one (Fernet);
3. POST {url}/api/v1/run/{remote_flow_id}?stream=false with urllib, AUTOMAGIK_SPARK_HTTP_TIMEOUT as the timeout;
4. UPDATE the row `completed` with the reply as output_data (a JSON string holding the serialized JSON, as the
   original stores it), or `failed` with the error; retry as the original does (a new row, countdown 2**retries)
   when the error text names a connection or a timeout.

One psycopg2 connection per pool thread or process, opened on first use, application_name "celery-bench". It
writes no task_logs and no workers rows: the original does not.
"""
import json
import os
import threading
import urllib.request
import uuid

import psycopg2
from celery import Celery

app = Celery("bench_workflow", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_track_started=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)

_local = threading.local()
HTTP_TIMEOUT = float(os.environ.get("AUTOMAGIK_SPARK_HTTP_TIMEOUT", "600"))


def _db():
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg2.connect(os.environ["BENCH_DATABASE_URL"], application_name="celery-bench")
        _local.conn = conn
    return conn


def _input(params, input_data):
    value = params.get("value") if isinstance(params, dict) else None
    if value:
        return value if isinstance(value, str) else json.dumps(value)
    return input_data or "Hello World"


def _call_langflow(url, flow, key, text):
    body = json.dumps({"input_value": text, "output_type": "debug", "input_type": "chat", "tweaks": {}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["x-api-key"] = key
    req = urllib.request.Request(f"{url}/api/v1/run/{flow}?stream=false", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
        return json.loads(resp.read())


@app.task(name="automagik_spark.core.tasks.workflow_tasks.execute_workflow", bind=True, max_retries=3)
def execute_workflow(self, schedule_id):
    db = _db()
    with db, db.cursor() as cur:
        cur.execute("SELECT workflow_id, schedule_type, status, params, input_data FROM schedules WHERE id = %s"
                    " FOR UPDATE", (schedule_id,))
        row = cur.fetchone()
        if row is None or row[2] == "completed":
            return None
        workflow_id, schedule_type, _, params, input_data = row
        if schedule_type == "one-time":
            cur.execute("UPDATE schedules SET status = 'completed', updated_at = now() WHERE id = %s", (schedule_id,))
        text = _input(params, input_data)
        task_id = str(uuid.uuid4())
        cur.execute("INSERT INTO tasks (id, workflow_id, schedule_id, status, input_data, created_at, started_at,"
                    " updated_at) VALUES (%s, %s, %s, 'running', %s, now(), now(), now())",
                    (task_id, workflow_id, schedule_id, json.dumps(text)))
    with db, db.cursor() as cur:
        cur.execute("SELECT w.remote_flow_id, s.url, s.encrypted_api_key FROM workflows w"
                    " JOIN workflow_sources s ON s.id = w.workflow_source_id WHERE w.id = %s", (workflow_id,))
        flow, url, token = cur.fetchone()
    key = None
    if token:
        from cryptography.fernet import Fernet
        key = Fernet(os.environ["AUTOMAGIK_SPARK_ENCRYPTION_KEY"]).decrypt(token.encode()).decode()
    try:
        output = _call_langflow(url, flow, key, text)
        status, error = "completed", None
    except Exception as e:  # the original records any error text on the row
        output, status, error = None, "failed", str(e)
    with db, db.cursor() as cur:
        cur.execute("UPDATE tasks SET status = %s, output_data = %s::json, error = %s, finished_at = now(),"
                    " updated_at = now() WHERE id = %s",
                    (status, json.dumps(json.dumps(output)) if output is not None else None, error, task_id))
    if error and ("connection" in error.lower() or "timeout" in error.lower()):
        raise self.retry(countdown=2 ** self.request.retries)
    return {"id": task_id, "workflow_id": workflow_id, "schedule_id": schedule_id, "status": status,
            "error": error}

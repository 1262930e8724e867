"""Helpers for test_engine.py: a Redis server with persistence, a pub/sub recorder of Celery meta, raw kombu
envelopes, dead-letter and processing-list readers."""

import base64
import json
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone

from harness import RedisServer, wait_for

DEADLETTER = "spark:deadletter"


class PersistentRedisServer(RedisServer):
    """RedisServer with the append-only file on (fsync every write), so restart() keeps what was in Redis.

    The harness's RedisServer runs with `--save '' --appendonly no` (a restart empties it); a production Redis
    behind Celery keeps its data across restarts, which is what "a Redis restart loses nothing" is about."""

    def start(self, timeout=10):
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "yes", "--appendfsync", "always", "--dir", str(self.dir), "--daemonize", "yes", "--pidfile",
               str(self.pidfile), "--logfile", str(self.dir / "redis.log")]
        if self.pidfile.exists():
            self.pidfile.unlink()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"redis-server failed: {r.stderr or r.stdout}")
        wait_for(self._ping, timeout, what=f"redis on port {self.port}")
        # with AOF, PING answers while the file is still loading (-LOADING): wait for real commands
        wait_for(lambda: self.client().dbsize() is not None, timeout, what="redis loaded")
        return self._note_started()


class MetaRecorder:
    """Records every message PUBLISHed on celery-task-meta-<id> channels, with our monotonic arrival time.

    Subscribe before sending, so nothing is missed (the worker PUBLISHes each meta write)."""

    def __init__(self, client, task_ids):
        self.ps = client.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(*[f"celery-task-meta-{i}" for i in task_ids])
        self.events = []  # (monotonic, task_id, meta)
        self.lock = threading.Lock()
        self.stop_flag = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag:
            try:
                msg = self.ps.get_message(timeout=0.05)
            except Exception:
                return
            if msg and msg.get("type") == "message":
                now = time.monotonic()
                meta = json.loads(msg["data"])
                tid = msg["channel"].decode()[len("celery-task-meta-"):]
                with self.lock:
                    self.events.append((now, tid, meta))

    def of(self, task_id):
        with self.lock:
            return [(ts, m) for ts, i, m in self.events if i == task_id]

    def states(self, task_id):
        return [m["status"] for _, m in self.of(task_id)]

    def first(self, task_id, status):
        for ts, m in self.of(task_id):
            if m["status"] == status:
                return ts, m
        return None

    def close(self):
        self.stop_flag = True
        self.thread.join(2)
        try:
            self.ps.close()
        except Exception:
            pass


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def envelope(task="spark.noop", args=(1,), kwargs=None, task_id=None, headers=None, body=None,
             content_type="application/json", drop=()):
    """A protocol-v2 envelope as kombu 5.2 writes it (dict); body=raw bytes to put in base64 instead of the
    JSON [args, kwargs, embed]; headers=extra/overriding headers; drop=top-level keys to remove."""
    task_id = task_id or str(uuid.uuid4())
    h = {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
         "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
         "argsrepr": repr(tuple(args) if isinstance(args, list) else args), "kwargsrepr": "{}",
         "origin": "gen1@test", "ignore_result": False}
    h.update(headers or {})
    if body is None:
        body = json.dumps([list(args) if isinstance(args, (list, tuple)) else args, kwargs or {},
                           {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()
    env = {"body": body if isinstance(body, str) else b64(body), "content-encoding": "utf-8",
           "content-type": content_type, "headers": h,
           "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
                          "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                          "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}}
    for k in drop:
        env.pop(k, None)
    return env


def deadletter_entries(client):
    """The dead-letter list as (entry dict, original bytes) pairs."""
    out = []
    for raw in client.lrange(DEADLETTER, 0, -1):
        e = json.loads(raw)
        if "message_base64" in e:
            orig = base64.b64decode(e["message_base64"])
        else:
            orig = e["message"].encode("utf-8")
        out.append((e, orig))
    return out


def processing_lists(client):
    """{key: length} of every spark:processing:* list (the per-process lists of held messages)."""
    out = {}
    for k in client.scan_iter(match="spark:processing:*", count=1000):
        if client.type(k) == b"list":
            out[k.decode(errors="replace")] = client.llen(k)
    return out


def meta(client, task_id):
    """The stored Celery meta of a task (backend DB client), or None."""
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else None


def parse_date_done(s):
    """Celery's date_done (naive UTC up to 5.3, aware later) as an aware datetime."""
    d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)

"""Task events (issue 8, item 3) from spark-worker run alone, read by Python Celery's own event receiver and
state (app.events.Receiver + app.events.State, what `celery events` and Flower use): received -> started ->
succeeded with runtime and result, task-failed with the exception; on by CELERY_WORKER_SEND_TASK_EVENTS or by
sparkd's `events` command on fd 3, off by default."""

import threading

from harness import t, wait_for
from worker_util import Worker


class EventLog:
    """A Receiver on the test's broker feeding an events State, in a thread; every event kept in order."""

    def __init__(self, app):
        self.app = app
        self.state = app.events.State()
        self.events = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.conn = app.connection_for_read()
        self.recv = app.events.Receiver(self.conn, handlers={"*": self.on_event})
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        wait_for(self.ready.is_set, t(10), what="event receiver consuming")

    def on_event(self, ev):
        with self.lock:
            self.events.append(ev)
            self.state.event(ev)

    def run(self):
        try:
            it = self.recv.itercapture(limit=None, timeout=None, wakeup=False)
            next(it)  # consuming from here on
            self.ready.set()
            for _ in it:
                pass
        except Exception:
            self.ready.set()

    def of(self, task_id):
        with self.lock:
            return [e for e in self.events if e.get("uuid") == task_id]

    def types(self, task_id):
        return [e["type"] for e in self.of(task_id)]

    def close(self):
        self.recv.should_stop = True
        self.thread.join(t(5))
        self.conn.release()


def test_task_events_received_started_succeeded_failed(tmp_path, redis, celery):
    app = celery()
    log = EventLog(app)
    w = Worker(tmp_path, redis, env={"CELERY_WORKER_SEND_TASK_EVENTS": "True"}, name="celery@evhost")
    try:
        ok = app.send_task("spark.noop", args=[42])
        assert ok.get(timeout=t(10)) == 42
        wait_for(lambda: "task-succeeded" in log.types(ok.id), t(5), what="task-succeeded")
        assert log.types(ok.id) == ["task-received", "task-started", "task-succeeded"]
        received, started, succeeded = log.of(ok.id)
        assert received["name"] == "spark.noop" and received["hostname"] == "celery@evhost"
        assert received["retries"] == 0 and received["eta"] is None
        assert "42" in received["args"]
        assert succeeded["result"] == "42"
        assert isinstance(succeeded["runtime"], float) and succeeded["runtime"] >= 0
        assert received["clock"] < started["clock"] < succeeded["clock"]
        assert succeeded["pid"] == w.proc.pid
        with log.lock:
            task = log.state.tasks[ok.id]
            assert task.state == "SUCCESS" and task.name == "spark.noop" and task.result == "42"
            assert task.runtime == succeeded["runtime"]
            assert task.received and task.started and task.succeeded
            assert task.worker.hostname == "celery@evhost"

        bad = app.send_task("spark.sleep", args=["soon"])  # not a number: TypeError
        wait_for(lambda: "task-failed" in log.types(bad.id), t(10), what="task-failed")
        failed = log.of(bad.id)[-1]
        assert failed["exception"].startswith("TypeError(") and "seconds must be a number" in failed["exception"]
        assert "TypeError" in failed["traceback"]
        with log.lock:
            task = log.state.tasks[bad.id]
            assert task.state == "FAILURE" and task.exception == failed["exception"]
    finally:
        assert w.stop() == 0
        log.close()


def test_task_events_off_by_default_and_on_by_command(tmp_path, redis, celery):
    """Off: a task sends nothing. After `events 1` on fd 3 the next task's events flow; the first one's would
    have arrived before them (one connection, events before the task's result, pub/sub in order)."""
    app = celery()
    log = EventLog(app)
    w = Worker(tmp_path, redis)
    try:
        quiet = app.send_task("spark.noop", args=[1])
        assert quiet.get(timeout=t(10)) == 1
        w.send("events", "1")
        loud = app.send_task("spark.noop", args=[2])
        assert loud.get(timeout=t(10)) == 2
        wait_for(lambda: "task-succeeded" in log.types(loud.id), t(5), what="events after the command")
        assert log.types(quiet.id) == []
        w.send("events", "0")
        quiet2 = app.send_task("spark.noop", args=[3])
        assert quiet2.get(timeout=t(10)) == 3
        w.send("events", "1")
        last = app.send_task("spark.noop", args=[4])
        assert last.get(timeout=t(10)) == 4
        wait_for(lambda: "task-succeeded" in log.types(last.id), t(5), what="events on again")
        assert log.types(quiet2.id) == []
    finally:
        assert w.stop() == 0
        log.close()


def test_task_revoked_event(tmp_path, redis, celery):
    app = celery()
    log = EventLog(app)
    w = Worker(tmp_path, redis, env={"CELERY_WORKER_SEND_TASK_EVENTS": "1"})
    try:
        sleeper = app.send_task("spark.sleep", args=[30])
        wait_for(lambda: "task-started" in log.types(sleeper.id), t(10), what="sleep started")
        w.revoke([sleeper.id], terminate=True)
        wait_for(lambda: "task-revoked" in log.types(sleeper.id), t(5), what="task-revoked")
        ev = log.of(sleeper.id)[-1]
        assert ev["terminated"] is True and ev["signum"] == 15 and ev["expired"] is False
        with log.lock:
            assert log.state.tasks[sleeper.id].state == "REVOKED"
    finally:
        assert w.stop() == 0
        log.close()


def test_task_events_of_a_burst_each_once_in_order(tmp_path, redis, celery):
    """Eight slots draining a burst: a tick's events leave together (Celery's task.multi list when there are
    several); every task's three events arrive exactly once, in order, and State counts every one a success."""
    app = celery()
    log = EventLog(app)
    w = Worker(tmp_path, redis, slots=8, env={"CELERY_WORKER_SEND_TASK_EVENTS": "True"})
    try:
        rs = [app.send_task("spark.noop", args=[i]) for i in range(60)]
        assert [r.get(timeout=t(10)) for r in rs] == list(range(60))
        wait_for(lambda: all("task-succeeded" in log.types(r.id) for r in rs), t(10), what="every task's events")
        for r in rs:
            assert log.types(r.id) == ["task-received", "task-started", "task-succeeded"], r.id
        with log.lock:
            assert all(log.state.tasks[r.id].state == "SUCCESS" for r in rs)
            clocks = [e["clock"] for e in log.events if e["type"].startswith("task-")]
        assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks) == 180
    finally:
        assert w.stop() == 0
        log.close()


def test_task_events_carry_any_text(tmp_path, redis, celery):
    """The event body sits unencoded in the envelope's "body" string, so every string of it is escaped twice:
    quotes, backslashes, control characters and non-ASCII text in the task id, the arguments and the result
    must reach the receiver as sent, and an argument list over 1,024 bytes is cut as saferepr cuts it."""
    import json

    app = celery()
    log = EventLog(app)
    w = Worker(tmp_path, redis, slots=2, env={"CELERY_WORKER_SEND_TASK_EVENTS": "True"})
    try:
        text = 'q"uo\\te \n\ttab \x01 é ☃ 𝄞 </script>'
        tid = 'id "quoted" \\ back é ☃'
        r = app.send_task("spark.noop", args=[text], kwargs={"k\"ey": "v\\al"}, task_id=tid)
        assert r.get(timeout=t(10)) == text
        long = app.send_task("spark.noop", args=["x" * 3000])
        assert long.get(timeout=t(10)) == "x" * 3000
        wait_for(lambda: "task-succeeded" in log.types(tid) and "task-succeeded" in log.types(long.id), t(5),
                 what="both tasks' events")
        assert log.types(tid) == ["task-received", "task-started", "task-succeeded"]
        received, started, succeeded = log.of(tid)
        assert json.loads(received["args"]) == [text]
        assert json.loads(received["kwargs"]) == {"k\"ey": "v\\al"}
        assert received["root_id"] == tid and started["uuid"] == tid
        assert json.loads(succeeded["result"]) == text
        cut = log.of(long.id)[0]["args"]
        assert cut.startswith('["xxx') and cut.endswith("...") and len(cut) == 1024 + 3
        with log.lock:
            assert log.state.tasks[tid].state == "SUCCESS"
    finally:
        assert w.stop() == 0
        log.close()

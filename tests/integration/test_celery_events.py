"""Worker events from sparkd (issue 8): worker-online, worker-heartbeat every 2 s and worker-offline at stop, as
Celery's own event receiver and State see them."""

import socket
import threading
import time

import pytest

from harness import t, wait_for

HOST = socket.gethostname()


class EventLog:
    """app.events.Receiver feeding a celery.events.state.State, in a thread."""

    def __init__(self, app, redis):
        from celery.events.state import State
        self.state = State()
        self.events = []
        self.lock = threading.Lock()
        self.conn = app.connection()
        self.recv = app.events.Receiver(self.conn, handlers={"*": self.on_event})
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        # events published before the receiver subscribes are lost (pub/sub): wait for its PSUBSCRIBE
        r = redis.client()
        wait_for(lambda: r.execute_command("PUBSUB", "NUMPAT") >= 1, t(10), what="the receiver subscribed")

    def _run(self):
        try:
            self.recv.capture(limit=None, timeout=None, wakeup=False)
        except Exception:
            if not self.recv.should_stop:
                raise

    def on_event(self, ev):
        with self.lock:
            self.events.append(dict(ev, received=time.time()))
            self.state.event(ev)

    def of(self, etype, hostname=None):
        with self.lock:
            return [e for e in self.events if e["type"] == etype and (hostname is None or e["hostname"] == hostname)]

    def close(self):
        self.recv.should_stop = True
        self.thread.join(timeout=5)
        self.conn.release()


@pytest.fixture
def event_log(redis, celery):
    logs = []

    def make():
        log = EventLog(celery(), redis)
        logs.append(log)
        return log
    yield make
    for log in logs:
        log.close()


def test_online_heartbeats_offline(spark, event_log):
    log = event_log()
    sd = spark()
    sd.start(workers=2, concurrency=1)
    nodes = [f"celery-{i}@{HOST}" for i in (1, 2)]

    wait_for(lambda: all(log.of("worker-online", n) for n in nodes), t(10), what="worker-online of both nodes")
    wait_for(lambda: all(len(log.of("worker-heartbeat", n)) >= 4 for n in nodes), t(20), what="4 heartbeats each")
    for n in nodes:
        online = log.of("worker-online", n)
        assert len(online) == 1
        e = online[0]
        assert e["sw_ident"] == "spark-worker" and e["sw_ver"] and e["pid"] == sd.pid
        assert e["freq"] == 2.0 and len(e["loadavg"]) == 3 and "utcoffset" in e
        beats = log.of("worker-heartbeat", n)
        # the sender's clock at each heartbeat: every 2 s +- 0.5 s
        stamps = [b["timestamp"] for b in beats]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert all(1.5 <= g <= 2.5 for g in gaps), gaps
        clocks = [b["clock"] for b in beats]
        assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)
        assert all(b["active"] == 0 and b["processed"] >= 0 for b in beats)
        w = log.state.workers[n]
        assert w.alive and w.sw_ident == "spark-worker"

    r = sd.stop()
    assert r.rc == 0, r
    # worker-offline went out before sparkd exited (Redis acknowledged the PUBLISH); the receiver's thread may
    # read it a moment later
    wait_for(lambda: all(log.of("worker-offline", n) for n in nodes), t(5),
             what="worker-offline of both nodes")
    wait_for(lambda: not any(log.state.workers[n].alive for n in nodes), t(5), what="State sees them offline")


def test_heartbeat_counts_follow_the_tasks(spark, event_log, celery):
    log = event_log()
    sd = spark()
    sd.start(workers=1, concurrency=1)
    node = f"celery@{HOST}"
    app = celery()
    assert app.send_task("spark.noop", args=[1]).get(timeout=t(20)) == 1
    sleeping = app.send_task("spark.sleep", args=[5])
    wait_for(lambda: [b for b in log.of("worker-heartbeat", node) if b["active"] == 1 and b["processed"] >= 1],
             t(15), what="a heartbeat with the running task and the one processed")
    assert sleeping.get(timeout=t(30)) == 5

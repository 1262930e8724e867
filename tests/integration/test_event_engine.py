"""The event-loop engine (one libevent loop per spark-worker process, C event slots in it), with Python Celery as
producer and result reader: a thousand slots in one process on two Redis connections, lost replies survived
without losing or doubling a task, the prefetch bound, the idle wait on every queue without polling, and a warm
stop of a thousand running tasks.

Every test runs one `--pool threads --workers 1` process and watches it from outside: `sparkctl status --json`,
its TCP sockets in /proc matched against Redis's CLIENT LIST, its processing list, its CPU time.
"""

import collections
import json
import os
import re
import socket
import threading
import time
import uuid

from celery.result import ResultSet

from engine_util import MetaRecorder, envelope, processing_lists
from harness import SCALE, pid_alive, t, wait_for

THREADS = ("--pool", "threads")
# A recycle would replace the process a test is watching: no task or memory limit on it.
BASE_ENV = {"CELERY_WORKER_MAX_TASKS_PER_CHILD": "0", "CELERY_WORKER_MAX_MEMORY_PER_CHILD": "0"}
UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ---------------------------------------------------------------------------------------------------------------
# the watched process


def the_process(sd):
    """(pid, process entry) of the only worker process, per `sparkctl status --json`."""
    st = sd.ctl_json("status")
    procs = [p for w in st["workers"] for p in (w.get("processes") or []) if p.get("pid")]
    assert len(procs) == 1, f"one worker process expected: {procs}"
    return procs[0]["pid"], procs[0]


def process_entry(sd, pid):
    st = sd.ctl_json("status")
    for w in st["workers"]:
        for p in w.get("processes") or []:
            if p.get("pid") == pid:
                return p
    raise AssertionError(f"process {pid} is not in status any more: {st['workers']}")


def processing_key(pid):
    """The process's list of held messages (worker.h); spark-worker names it after gethostname(), as we do."""
    return f"spark:processing:{socket.gethostname()}:{pid}"


def tcp_ports_to(pid, remote_port):
    """Local ports of pid's established TCP connections to remote_port: its socket inodes (/proc/PID/fd) looked
    up in the connection table of its network namespace (/proc/PID/net/tcp, tcp6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:["):-1]))
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            col = row.split()
            local, remote, state, inode = col[1], col[2], col[3], int(col[9])
            if inode in inodes and state == "01" and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def clients_of(client, pid, redis_port):
    """The CLIENT LIST entries of pid's connections to this Redis server. The ports are read before and after
    CLIENT LIST, so a connection that a process holds is never missed (over-counting needs churn, itself a
    finding)."""
    before = tcp_ports_to(pid, redis_port)
    listed = client.client_list()
    ports = before | tcp_ports_to(pid, redis_port)
    return [c for c in listed if int(c["addr"].rsplit(":", 1)[1]) in ports]


def cpu_ticks(pid):
    """utime + stime of the whole process (every thread), in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5); the first after ")" is field 3


def wait_all_active(sd, pid, n, probe=None, timeout=None):
    """Wait until status shows n active tasks at once on pid. Fails as soon as a task has finished before that
    (the n would then never run together). probe() runs at every poll."""
    def state():
        if probe:
            probe()
        p = process_entry(sd, pid)
        if len(p["active_tasks"]) == n:
            return "all"
        if p["processed"] > 0:
            return f"late: a task finished while only {len(p['active_tasks'])} ran"
    got = wait_for(state, timeout or t(30), interval=0.05, what=f"{n} active tasks on process {pid}")
    assert got == "all", got


def results_of(results, timeout):
    """Every value, read as Celery's result readers do (ResultSet.join_native: one MGET, then pub/sub)."""
    return ResultSet(results).join_native(timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# observers


class PushMonitor:
    """Counts, per task id, the pushes of its envelope into a queue key, as Redis MONITOR shows them (commands run
    by Lua scripts and MULTI/EXEC included): the producer's LPUSH is the first delivery, every put-back (the
    engine's requeue marks the envelope redelivered and pushes it) one more. Moves into a queue that carry no
    envelope (LMOVE from another list) cannot be attributed to an id: they are only counted."""

    LINE = re.compile(rb'^\+\d+\.\d+ \[\d+ [^\]]*\] "([A-Za-z]+)" "((?:[^"\\]|\\.)*)"(?: "((?:[^"\\]|\\.)*)")?')

    def __init__(self, port, ids, queues=("celery",)):
        self.ids = set(ids)
        self.queues = [q.encode() for q in queues]
        self.pushes = collections.Counter()
        self.unattributed_moves = 0
        self.echoed = set()
        self.lock = threading.Lock()
        self.stop_flag = False
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.sock.sendall(b"MONITOR\r\n")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _is_queue(self, key):
        # MONITOR escapes kombu's priority separator: b"celery\\x06\\x169"
        return any(key == q or key.startswith(q + b"\\x06\\x16") for q in self.queues)

    def _run(self):
        buf = b""
        while not self.stop_flag:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            lines = (buf + data).split(b"\r\n")
            buf = lines.pop()
            for line in lines:
                self._line(line)

    def _line(self, line):
        m = self.LINE.match(line)
        if not m:
            return
        cmd, key, second = m.group(1).upper(), m.group(2), m.group(3)
        with self.lock:
            if cmd in (b"LPUSH", b"RPUSH") and self._is_queue(key):
                for tid in {u.decode() for u in UUID_RE.findall(line)} & self.ids:
                    self.pushes[tid] += 1
            elif cmd in (b"LMOVE", b"BLMOVE", b"RPOPLPUSH", b"BRPOPLPUSH") and second is not None \
                    and self._is_queue(second) and not self._is_queue(key):
                self.unattributed_moves += 1
            elif cmd == b"ECHO":
                self.echoed.add(key)

    def sync(self, client):
        """Return once every command Redis ran before this call has been read."""
        token = uuid.uuid4().hex
        client.echo(token)
        wait_for(lambda: token.encode() in self.echoed, t(30), what="the MONITOR stream to catch up")

    def close(self):
        self.stop_flag = True
        self.thread.join(2)
        self.sock.close()


class StatusTally:
    """Publishes per status and task id, read incrementally from a MetaRecorder (its events only grow)."""

    def __init__(self, rec):
        self.rec = rec
        self.pos = 0
        self.counts = collections.defaultdict(collections.Counter)  # status -> task id -> publishes

    def update(self):
        """The number of tasks with a SUCCESS publish."""
        with self.rec.lock:
            new = self.rec.events[self.pos:]
            self.pos += len(new)
        for _, tid, meta in new:
            self.counts[meta.get("status")][tid] += 1
        return len(self.counts["SUCCESS"])


# ---------------------------------------------------------------------------------------------------------------
# 1: a thousand slots in one process, on two connections


def test_thousand_slots_run_at_once_in_one_process_on_two_connections(spark, celery, redis):
    n, secs = 1000, t(3)
    r = redis.client()
    app = celery()
    # all queued before the process starts, so nothing finishes while the rest are still being sent
    results = [app.send_task("spark.sleep", args=[secs]) for _ in range(n)]
    sd = spark(dict(BASE_ENV, CELERY_WORKER_CONCURRENCY=n))
    sd.start(*THREADS, workers=1, concurrency=n, timeout=t(60))
    pid, _ = the_process(sd)
    counts = []  # connections of the process to the Redis server, sampled while its tasks run

    def sample():
        counts.append(len(clients_of(r, pid, redis.port)))
    wait_all_active(sd, pid, n, probe=sample)
    sample()
    at_peak = counts[-1]
    wait_for(lambda: sample() or process_entry(sd, pid)["processed"] >= n, t(60), interval=0.1,
             what=f"{n} tasks processed")
    assert 1 <= at_peak <= 2, f"{at_peak} Redis connections while {n} tasks ran (broker and backend are one server)"
    assert max(counts) <= 2, f"up to {max(counts)} Redis connections while the tasks ran: {counts}"
    assert min(counts) >= 1, f"a sample found no connection of process {pid}: the count is wrong ({counts})"
    assert results_of(results, t(60)) == [secs] * n
    assert all(res.state == "SUCCESS" for res in results)
    assert pid_alive(pid) and process_entry(sd, pid)["restarts"] == 0


# ---------------------------------------------------------------------------------------------------------------
# 2: lost replies


def test_killed_connections_lose_no_task_and_complete_none_twice(spark, celery, redis):
    n, slots, kills, every = 12000, 50, 5, 150
    r = redis.client()
    app = celery()
    ids = [str(uuid.uuid4()) for _ in range(n)]
    mon = PushMonitor(redis.port, ids)
    rec = MetaRecorder(redis.client(1), ids)
    tally = StatusTally(rec)
    try:
        # a backlog, so that every kill finds fetches and finishes in flight (their replies are lost). Each task
        # sleeps 50 ms (a distinct length, so that its result still names it): the drain takes seconds whatever
        # the machine, where 12,000 no-ops took well under one and could end before the kills did
        secs = [0.05 + i * 1e-7 for i in range(n)]
        results = [app.send_task("spark.sleep", args=[secs[i]], task_id=tid) for i, tid in enumerate(ids)]
        sd = spark(BASE_ENV)
        sd.start(*THREADS, workers=1, concurrency=slots)
        pid, _ = the_process(sd)
        key = processing_key(pid)
        backend = redis.client(1)
        dead = set()  # ids of the killed connections
        for k in range(1, kills + 1):
            # results that exist (a meta key per task, STARTED or SUCCESS), counted by Redis itself: a Python
            # subscriber would lag behind a fast engine
            wait_for(lambda: backend.dbsize() >= k * every, t(60), interval=0.005, what=f"{k * every} results")
            victims = clients_of(r, pid, redis.port)
            assert victims, f"process {pid} holds no Redis connection before kill {k}"
            left = r.llen("celery") + r.llen(key)
            assert left > 0, f"the queue drained before kill {k}: the kills prove nothing"
            killed = sum(int(r.execute_command("CLIENT", "KILL", "ID", c["id"])) for c in victims)
            assert killed >= 1, f"kill {k}: no connection of {victims} could be killed"
            dead |= {c["id"] for c in victims}
            # the engine reconnects: the same process opens a new connection
            wait_for(lambda: any(c["id"] not in dead for c in clients_of(r, pid, redis.port)), t(15),
                     interval=0.02, what=f"process {pid} reconnected after kill {k} ({left} messages left)")

        got = results_of(results, t(90))
        bad = [(i, g) for i, g in enumerate(got) if g != secs[i]]
        assert not bad, f"{len(bad)} wrong results, first: {bad[:5]}"
        # once drained: nothing held by the process, nothing left in kombu's records
        wait_for(lambda: r.llen("celery") == 0 and r.llen(key) == 0 and r.hlen("unacked") == 0
                 and r.zcard("unacked_index") == 0, t(15),
                 what=f"queue, {key}, unacked and unacked_index empty")
        assert not any(processing_lists(r).values()), processing_lists(r)
        wait_for(lambda: tally.update() == n, t(10), what="a SUCCESS message for every task")
        mon.sync(r)
        with mon.lock:
            pushes = dict(mon.pushes)
            moves = mon.unattributed_moves
        unseen = [i for i in ids if i not in pushes]
        assert not unseen, f"MONITOR saw no push of {len(unseen)} messages: the observer is broken"
        # at least once: a message put back (redelivered) may run again; within one delivery, never twice
        success, started = tally.counts["SUCCESS"], tally.counts["STARTED"]
        twice = {i: (c, started[i], pushes[i]) for i, c in success.items() if c > pushes[i]}
        redelivered = sum(c - 1 for c in pushes.values())
        assert not twice, (f"{len(twice)} tasks completed more often than they were delivered "
                           f"((SUCCESS publishes, STARTED publishes, deliveries), first: {list(twice.items())[:5]}; "
                           f"{redelivered} redeliveries in all, {moves} unattributed moves into the queue)")
        # the same process came through every kill
        p = process_entry(sd, pid)
        assert pid_alive(pid) and p["state"] == "active" and p["restarts"] == 0, p
        assert clients_of(r, pid, redis.port), f"process {pid} is not connected after the drain"
    finally:
        rec.close()
        mon.close()


# ---------------------------------------------------------------------------------------------------------------
# 3: prefetch


def test_prefetch_multiplier_2_holds_twice_the_slots(spark, celery, redis):
    secs = t(2)
    r = redis.client()
    sd = spark(dict(BASE_ENV, CELERY_WORKER_PREFETCH_MULTIPLIER="2"))
    sd.start(*THREADS, workers=1, concurrency=2)
    pid, _ = the_process(sd)
    key = processing_key(pid)
    app = celery()
    results = [app.send_task("spark.sleep", args=[secs]) for _ in range(4)]

    held = []

    def four_held_two_running():
        held.append(r.llen(key))
        p = process_entry(sd, pid)
        if held[-1] == 4 and len(p["active_tasks"]) == 2 and r.llen(key) == 4 and r.llen("celery") == 0:
            return "held"
        if p["processed"] > 0:  # the first two are done: the four can no longer be held at once
            return f"late: a task finished while the process held at most {max(held)} messages"
    got = wait_for(four_held_two_running, t(10), interval=0.02,
                   what=f"4 messages in {key} while 2 tasks run (2 slots x prefetch multiplier 2)")
    assert got == "held", got
    assert results_of(results, t(30)) == [secs] * 4


def test_default_prefetch_holds_no_more_than_the_slots(spark, celery, redis):
    secs = t(2)
    r = redis.client()
    sd = spark(BASE_ENV)  # CELERY_WORKER_PREFETCH_MULTIPLIER defaults to 1
    sd.start(*THREADS, workers=1, concurrency=2)
    pid, _ = the_process(sd)
    key = processing_key(pid)
    app = celery()
    results = [app.send_task("spark.sleep", args=[secs]) for _ in range(4)]
    held, waited = [], []

    def sample_until_done():
        held.append(r.llen(key))
        p = process_entry(sd, pid)
        if len(p["active_tasks"]) == 2 and r.llen("celery") == 2:
            waited.append(True)
        return p["processed"] >= 4
    wait_for(sample_until_done, t(30), interval=0.02, what="4 tasks processed")
    assert max(held) <= 2, f"the process held up to {max(held)} messages with 2 slots and multiplier 1: {held}"
    assert waited, "no sample saw 2 tasks running while the other 2 waited in the queue"
    assert results_of(results, t(10)) == [secs] * 4


# ---------------------------------------------------------------------------------------------------------------
# 4: the idle wait


def wait_cpu_idle(pid, window=2.0, timeout=None):
    """Wait until pid used at most a few clock ticks of CPU over `window` seconds: an idle process that polls
    nothing. Returns (seconds, ticks) of that window."""
    allow = int(5 * SCALE)  # housekeeping timers (leases, ETA moves) take a tick now and then
    samples, last = [], {}

    def idle():
        now, ticks = time.monotonic(), cpu_ticks(pid)
        samples.append((now, ticks))
        old = [s for s in samples if now - s[0] >= window]
        if not old:
            return None
        last["d"] = ticks - old[-1][1]
        return last["d"] <= allow and (now - old[-1][0], last["d"])
    try:
        return wait_for(idle, timeout or t(20), interval=0.1, what="an idle window")
    except AssertionError as e:
        raise AssertionError(f"process {pid} never stayed idle: {last.get('d')} ticks in the last {window}s "
                             f"window (allowed {allow}; {os.sysconf('SC_CLK_TCK')} ticks/s): busy polling?") from e


def test_idle_process_wakes_for_every_queue_and_priority(spark, celery, redis):
    r = redis.client()
    sd = spark(dict(BASE_ENV, SPARK_QUEUES="celery,direct"))
    sd.start(*THREADS, workers=1, concurrency=4)
    pid, _ = the_process(sd)
    app = celery()
    # each message arrives at a process with nothing to do
    direct = app.send_task("spark.noop", args=["direct ✓"], queue="direct")
    assert direct.get(timeout=t(15)) == "direct ✓"
    low = app.send_task("spark.noop", args=["priority 9"], priority=9)
    assert low.get(timeout=t(15)) == "priority 9"
    # idle for a while, without burning CPU, and still listening on the other queue
    wait_cpu_idle(pid)
    late = app.send_task("spark.noop", args=["after idle"], queue="direct")
    assert late.get(timeout=t(15)) == "after idle"
    assert r.llen("direct") == 0 and r.llen("celery\x06\x169") == 0
    p = wait_for(lambda: (lambda p: p["processed"] == 3 and p)(process_entry(sd, pid)), t(5),
                 what="3 tasks processed in status")
    assert p["restarts"] == 0, p


def test_a_backlog_does_not_starve_the_other_queue(spark, celery, redis):
    """Draining a backlog of no-ops the process keeps fetch batches in flight back to back (a tick starts half
    the slots, the next batch joins the one in flight); the probe of every queue, due every ~10 ms, waits for
    the batches in flight and is still made: a message on `direct` runs long before the `celery` backlog is
    gone, and every backlog task runs once."""
    r = redis.client()
    n = 40000
    sd = spark(dict(BASE_ENV, SPARK_QUEUES="celery,direct"))
    sd.start(*THREADS, workers=1, concurrency=8)
    pid, _ = the_process(sd)
    app = celery()
    ids = [str(uuid.uuid4()) for _ in range(n)]
    staged = "test:staged"
    for i in range(0, n, 2000):
        r.lpush(staged, *[json.dumps(envelope(args=[k], task_id=k)) for k in ids[i:i + 2000]])
    r.rename(staged, "celery")  # the whole backlog at once, as a burst of producers leaves it
    wait_for(lambda: r.llen("celery") < n - 500, t(15), interval=0.005, what="the backlog draining")
    direct = app.send_task("spark.noop", args=["direct"], queue="direct")
    assert direct.get(timeout=t(15)) == "direct"
    left = r.llen("celery")
    print(f"backlog left when the direct message had run: {left} of {n}")
    assert left > 0, "the direct message waited for the whole celery backlog"
    wait_for(lambda: r.llen("celery") == 0 and process_entry(sd, pid)["processed"] == n + 1, t(60),
             interval=0.1, what="the backlog drained")
    b = redis.client(1)
    assert sum(b.exists(*[f"celery-task-meta-{k}" for k in ids[i:i + 1000]]) for i in range(0, n, 1000)) == n
    wait_for(lambda: r.llen(processing_key(pid)) == 0, t(5), what="every ack")


# ---------------------------------------------------------------------------------------------------------------
# 5: warm stop with a thousand slots


def test_warm_stop_finishes_a_thousand_running_and_leaves_the_queued(spark, celery, redis):
    n, queued_n, secs = 1000, 500, t(2)
    r = redis.client()
    app = celery()
    # queued first: the process takes the oldest 1000 (multiplier 1: no more), the last 500 stay in the queue
    running = [app.send_task("spark.sleep", args=[secs]) for _ in range(n)]
    queued = [app.send_task("spark.sleep", args=[secs]) for _ in range(queued_n)]
    sd = spark(dict(BASE_ENV, CELERY_WORKER_CONCURRENCY=n))
    sd.start(*THREADS, workers=1, concurrency=n, timeout=t(60))
    pid, _ = the_process(sd)
    wait_all_active(sd, pid, n)
    st = sd.stop(timeout=t(90))
    assert st.rc == 0, st
    assert not pid_alive(pid) and not sd.all_pids(), sd.all_pids()
    assert results_of(running, t(10)) == [secs] * n
    assert all(res.state == "SUCCESS" for res in running)
    backend = redis.client(1)
    metas = backend.mget([f"celery-task-meta-{q.id}" for q in queued])
    started = [q.id for q, raw in zip(queued, metas) if raw is not None]
    assert not started, f"{len(started)} queued tasks have a result: they were taken"
    assert r.llen("celery") == queued_n
    in_queue = {json.loads(raw)["headers"]["id"] for raw in r.lrange("celery", 0, -1)}
    assert in_queue == {q.id for q in queued}
    assert not any(processing_lists(r).values()), processing_lists(r)
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0

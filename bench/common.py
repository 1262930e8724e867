"""What every benchmark in bench/ shares: a private Redis, /proc readings, deadlines, summaries and tables.

Nothing here waits without a deadline: a benchmark that cannot finish reports why, as data, and goes on.
"""
import base64
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import time
import uuid

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A configuration that could not be measured (refused, never ready, stuck): reported, never fatal."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile():
    """1,024 open HTTP requests need more descriptors than the usual soft limit; children inherit this one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def wait_until(pred, timeout, interval=0.05):
    """pred()'s first true value within timeout seconds, else None. Exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception:  # the system under test may be between states
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# ---- /proc ----

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    """utime + stime of every thread of pid, in seconds (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_total(pids):
    return sum(c for c in (cpu_seconds(p) for p in pids) if c is not None)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:data.rfind(b")") + 3] not in (b"Z", b"X")


def tcp_local_ports(pids, remote_port=None):
    """Local ports of the TCP sockets the processes hold (to pick their connections out of CLIENT LIST); with
    remote_port, only those connected to it: a worker's HTTP or PostgreSQL socket may share its local port number
    with another process's Redis client (Linux reuses ephemeral ports across destinations)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] in inodes and (
                            remote_port is None or int(cols[2].rsplit(":", 1)[1], 16) == remote_port):
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


# ---- Redis ----

class RedisServer:
    """A private redis-server on a free loopback port: broker in db 0, results in db 1."""

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.pidfile = os.path.join(self.dir, "redis.pid")
        for _ in range(5):
            self.port = free_port()
            subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", self.dir, "--daemonize", "yes", "--maxclients",
                            "10000", "--pidfile", self.pidfile, "--logfile", os.path.join(self.dir, "redis.log")],
                           check=True, stdout=subprocess.DEVNULL, timeout=30)
            self.broker = redis.Redis(port=self.port, db=0, socket_timeout=30)
            self.backend = redis.Redis(port=self.port, db=1, socket_timeout=30)
            if wait_until(self.broker.ping, 10):
                self.backend.ping()  # its SELECT now, not inside a measured window
                return
        raise BenchError("redis-server did not start")

    def url(self, db):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self):
        try:
            self.broker.shutdown(nosave=True)
        except redis.RedisError:
            pass

    def command_calls(self):
        """{command: calls} from INFO commandstats (this INFO call is not in it yet)."""
        return {k[len("cmdstat_"):]: v["calls"] for k, v in self.broker.info("commandstats").items()}

    def clients_from(self, ports):
        """CLIENT LIST entries whose peer port is one of ports."""
        n = 0
        for c in self.broker.client_list():
            try:
                if int(c["addr"].rsplit(":", 1)[1]) in ports:
                    n += 1
            except (KeyError, ValueError):
                pass
        return n


def commands_delta(before, after, own):
    """Per-command calls between two INFO snapshots, minus the bench's own calls (own: {command: calls})."""
    out = {}
    for k in set(before) | set(after):
        d = after.get(k, 0) - before.get(k, 0) - own.get(k, 0)
        if d:
            out[k] = d
    return out


def noop_envelope(task_id, arg, queue="celery"):
    """A spark.noop message exactly as Celery 5.2's send_task writes it (protocol v2, reference §1.3)."""
    body = json.dumps([[arg], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "spark.noop", "id": task_id, "shadow": None, "eta": None,
                    "expires": None, "group": None, "group_index": None, "retries": 0,
                    "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                    "argsrepr": repr((arg,)), "kwargsrepr": "{}", "origin": "gen0@bench",
                    "ignore_result": False},
        "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })


def celery_client(broker_url, backend_url):
    """A producer as automagik-spark's API and beat use it."""
    from celery import Celery
    app = Celery("bench-client", broker=broker_url, backend=backend_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True)
    return app


# ---- summaries ----

def summary(values):
    """(median, min, max) of the measured values, None when nothing was measured."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt(values, digits=0, unit=""):
    """'median (min–max)' for a table cell; one value alone when there was one run; '—' when none."""
    s = summary(values)
    if s is None:
        return "—"
    med, lo, hi = s
    f = f"{{:,.{digits}f}}"
    if len([v for v in values if v is not None]) == 1:
        return f.format(med) + unit
    return f"{f.format(med)}{unit} ({f.format(lo)}–{f.format(hi)})"


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def machine():
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release().split('-')[0]}, "
            f"load average at start {load[0]:.2f}")

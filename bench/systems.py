"""The two systems under test, started and stopped the same way by every benchmark.

Ours: `sparkd` in the foreground from the given bin dir (its workers are the measured processes; sparkd itself is
the supervisor). Python Celery: `python3 -m celery worker` with an app module from bench/ (its main process consumes
from Redis and, in prefork, hands tasks to its children: all of them are the measured processes).

A system that is refused, exits, or is not ready by its deadline raises BenchError with the reason.
"""
import json
import os
import signal
import subprocess
import uuid

from common import HERE, PYTHON, BenchError, alive, children, tcp_local_ports, wait_until


def _tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            lines = [l.rstrip() for l in f if l.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])


def _kill(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class Ours:
    kind = "ours"

    def __init__(self, bindir, tmp, r, workers, concurrency, pool, env=None, label=None):
        self.bindir, self.tmp, self.r = os.path.abspath(bindir), tmp, r
        self.workers, self.concurrency, self.pool = workers, concurrency, pool
        self.extra = env or {}
        self.label = label or f"ours {pool} W{workers} C{concurrency}"
        self.dir = os.path.join(tmp, "sparkd")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "sparkd.sock")
        self.errlog = os.path.join(self.dir, "sparkd.err")
        self.proc = None
        self.known = set()  # every worker pid seen, for the kill at the end
        self.marker = f"SPARK_BENCH_ID={uuid.uuid4().hex}"  # inherited by the workers: a reused pid lacks it

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SPARK_", "AUTOMAGIK_"))}
        env.pop("DATABASE_URL", None)
        env.update(CELERY_BROKER_URL=self.r.url(0), CELERY_RESULT_BACKEND=self.r.url(1), SPARK_SOCKET=self.sock,
                   SPARK_LOG_DIR=os.path.join(self.dir, "log"), SPARK_PID_FILE=os.path.join(self.dir, "pid"),
                   SPARK_ENV_FILE="", CELERY_WORKER_MAX_TASKS_PER_CHILD="0", SPARK_LOGLEVEL="warning",
                   SPARK_QUEUES="celery")
        env.update(self.extra)
        env.update([self.marker.split("=", 1)])
        return env

    def expected_processes(self):
        return self.workers * (self.concurrency if self.pool == "prefork" else 1)

    def status(self):
        out = subprocess.run([os.path.join(self.bindir, "sparkctl"), "--socket", self.sock, "status", "--json"],
                             capture_output=True, text=True, timeout=10)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def _ready(self):
        """The worker pids once every expected process is active; "failed" once sparkd has exited."""
        if self.proc.poll() is not None:
            return "failed"
        st = self.status()
        if not st:
            return None
        procs = [p for w in st["workers"] for p in (w.get("processes") or [])]
        self.known.update(p["pid"] for p in procs if p.get("pid"))
        if len(procs) == self.expected_processes() and all(p["state"] == "active" for p in procs):
            return [p["pid"] for p in procs]
        return None

    def start(self, timeout=60):
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen([os.path.join(self.bindir, "sparkd"), "--workers", str(self.workers),
                                          "--concurrency", str(self.concurrency), "--pool", self.pool],
                                         env=self.env(), cwd=self.dir, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        got = wait_until(self._ready, timeout, 0.1)
        if got == "failed" or not got:
            rc = self.proc.poll()
            self.stop(5)
            why = f"sparkd exited with {rc}" if rc is not None else f"not ready after {timeout:.0f} s"
            raise BenchError(f"{why}: {_tail(self.errlog)}")
        self._pids = got

    def pids(self):
        """The worker processes (sparkd excluded)."""
        return [p for p in self._pids if alive(p)]

    def supervisor_pids(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def _mine(self, pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return (self.marker.encode() + b"\0") in f.read()
        except OSError:
            return False

    def stop(self, timeout=60):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill([self.proc.pid], signal.SIGKILL)
                self.proc.wait(timeout=10)
        live = [p for p in self.known if alive(p) and self._mine(p)]
        _kill(live, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in live), 10)


class PyCelery:
    kind = "celery"

    def __init__(self, tmp, r, app, pool, concurrency, queues=("celery",), env=None, label=None):
        self.tmp, self.r, self.app = tmp, r, app
        self.pool, self.concurrency, self.queues = pool, concurrency, queues
        self.extra = env or {}
        self.label = label or f"Celery {pool} c{concurrency}"
        self.errlog = os.path.join(tmp, "celery.err")
        self.proc = None

    def start(self, timeout=90):
        env = dict(os.environ, BENCH_BROKER=self.r.url(0), BENCH_BACKEND=self.r.url(1), PYTHONPATH=HERE)
        env.update(self.extra)
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "celery", "-A", self.app, "worker", "-P", self.pool, "-c", str(self.concurrency),
                 "--without-heartbeat", "--without-gossip", "--without-mingle", "-Q", ",".join(self.queues),
                 "-l", "warning"], env=env, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                return "failed"
            if self.pool == "prefork" and len(children(self.proc.pid)) < self.concurrency:
                return None
            ports = tcp_local_ports([self.proc.pid], self.r.port)
            return any(c.get("cmd") == "brpop" and int(c["addr"].rsplit(":", 1)[1]) in ports
                       for c in self.r.broker.client_list())

        got = wait_until(ready, timeout, 0.1)
        if got is not True:
            rc = self.proc.poll()
            self.stop(5)
            why = f"exited with {rc}" if rc is not None else f"not ready after {timeout:.0f} s"
            raise BenchError(f"celery worker {why}: {_tail(self.errlog)}")

    def pids(self):
        """The main process (it consumes from Redis) and its pool children."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid] + children(self.proc.pid)

    def supervisor_pids(self):
        return []

    def stop(self, timeout=60):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started for it: its pool children
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

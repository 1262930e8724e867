"""Integration-test harness: private redis-server, sparkd launcher, sparkctl runner, msgpack-RPC client, Celery
producer.

Everything here runs real binaries (from $SPARK_BIN_DIR, default build/bin in the repository) against real servers
started in temporary directories on free loopback ports. Every process a test starts is tracked and killed at
teardown, including processes it did not start directly (daemonized sparkd, its workers): each Sparkd instance puts
a unique SPARK_TEST_ID into the environment it gives sparkd, workers inherit it, and teardown kills every process
whose environment carries it.

Under SPARK_SAN=1 the binaries are ASan/UBSan builds: timeouts are scaled, and sanitizer reports are written to
files that teardown turns into a test failure.

SPARK_TEST_REDIS_LOGLEVEL=verbose makes every private redis-server log each client's connect and close (redis.log
in its directory), which shows who closed a connection.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("SPARK_BIN_DIR") or (REPO / "build" / "bin")).resolve()
SAN = os.environ.get("SPARK_SAN", "") not in ("", "0")
# Sanitizer builds start and run several times slower.
SCALE = 4.0 if SAN else 1.0
PYTHON = "/usr/bin/python3"


def t(seconds):
    """A timeout scaled for sanitizer builds."""
    return seconds * SCALE


def binary(name, bin_dir=None):
    return str(Path(bin_dir or BIN_DIR) / name)


def have_binaries(*names):
    return all(os.access(binary(n), os.X_OK) for n in names)


# ---------------------------------------------------------------------------------------------------------------
# processes


def pid_alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2 : data.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def pid_start_time(pid):
    """The process's start time in clock ticks (field 22 of /proc/pid/stat), None when it is gone: with the pid it
    names one process, since a pid is soon reused on a busy machine (pid_max is 32768 here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rfind(b")") + 2 :].split()[19])


def same_process(pid, started):
    """True while pid is alive and still the process that had start time started."""
    return bool(pid) and started is not None and pid_start_time(pid) == started and pid_alive(pid)


def wait_pid_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def pids_with_env(marker):
    """Pids of live processes whose environment holds the exact entry marker ("KEY=value")."""
    needle = marker.encode() + b"\0"
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if (env.startswith(needle) or b"\0" + needle in env) and pid_alive(int(d)):
            out.append(int(d))
    return out


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def kill_pids(pids, sig=signal.SIGKILL):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for(pred, timeout, interval=0.02, what="condition"):
    """Poll pred() until it returns a true value; return that value. Raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # the system under test may be between states
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def san_env(report_dir):
    """Sanitizer options for spawned binaries; reports go to files in report_dir."""
    base = f"{report_dir}/san"
    return {
        "ASAN_OPTIONS": f"detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path={base}"
                        ":quarantine_size_mb=8:malloc_context_size=10",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={base}",
    }


def san_reports(report_dir):
    """Contents of sanitizer reports written so far (empty when none)."""
    out = []
    d = Path(report_dir)
    if d.is_dir():
        for p in sorted(d.glob("san.*")):
            try:
                out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[:4000])
            except OSError:
                pass
    return out


def base_env(extra=None, report_dir=None):
    """A clean environment for our binaries: no inherited CELERY_*/SPARK_*/AUTOMAGIK_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "SPARK_", "AUTOMAGIK_", "DATABASE_URL", "ASAN_", "UBSAN_",
                                "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "RUNTIME_DIRECTORY", "NO_COLOR"))}
    env["LC_ALL"] = "C.UTF-8"
    # never pick up an env file from the working directory by accident
    env["SPARK_ENV_FILE"] = ""
    if SAN and report_dir:
        env.update(san_env(report_dir))
    if extra:
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
    return env


# ---------------------------------------------------------------------------------------------------------------
# redis


class RedisServer:
    """A private redis-server on 127.0.0.1, daemonized with a pid file, in its own directory."""

    def __init__(self, workdir, port=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.pidfile = self.dir / "redis.pid"
        self.pid = None
        self.pid_started = None
        self.started = False

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout=10):
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--dir", str(self.dir), "--daemonize", "yes", "--pidfile", str(self.pidfile),
               "--logfile", str(self.dir / "redis.log"),
               "--loglevel", os.environ.get("SPARK_TEST_REDIS_LOGLEVEL", "notice")]
        for _ in range(5):
            if self.pidfile.exists():
                self.pidfile.unlink()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError(f"redis-server failed: {r.stderr or r.stdout}")
            try:
                wait_for(self._ping, timeout, what=f"redis on port {self.port}")
                return self._note_started()
            except AssertionError:
                log = (self.dir / "redis.log").read_text(errors="replace") if (self.dir / "redis.log").exists() else ""
                if "Address already in use" in log:
                    if self.started:  # clients know this port: moving would leave them on a dead one
                        raise RuntimeError(f"redis port {self.port} was taken while the server was down")
                    self.port = free_port()  # lost a race for the port: take another
                    continue
                raise
        raise RuntimeError("redis-server could not bind a port")

    def _note_started(self):
        self.pid = int(self.pidfile.read_text().strip())
        self.pid_started = pid_start_time(self.pid)
        self.started = True
        return self

    def _ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG") and self.pidfile.exists()
        except OSError:
            return False

    def running(self):
        return same_process(self.pid, self.pid_started)

    def stop(self, timeout=10):
        pid = self.pid
        if pid is not None and not same_process(pid, self.pid_started):
            pid = None  # it died already, and the pid may be another process's now
        elif pid is None and self.pidfile.exists():
            try:
                pid = int(self.pidfile.read_text().strip())
            except ValueError:
                pid = None
        if pid is None:
            return
        kill_pids([pid], signal.SIGTERM)
        if not wait_pid_gone(pid, timeout):
            kill_pids([pid], signal.SIGKILL)
            wait_pid_gone(pid, 5)
        self.pid = None

    def restart(self, down_for=0.0):
        """Stop and start again on the same port (data is lost: --save '')."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        port = self.port
        self.start()
        assert self.port == port, "redis could not get its port back"
        return self

    def client(self, db=0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# msgpack-RPC


class RpcClient:
    """A raw msgpack-RPC client for the control socket (DESIGN §4)."""

    def __init__(self, path, timeout=5.0):
        import msgpack
        self.msgpack = msgpack
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.msgid = 0
        self.pending = []  # messages read while waiting for something else

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_request(self, method, params=None, msgid=None):
        if msgid is None:
            self.msgid += 1
            msgid = self.msgid
        body = [params] if params is not None else []
        self.sock.sendall(self.msgpack.packb([0, msgid, method, body], use_bin_type=True))
        return msgid

    def recv(self, timeout=None):
        """Next message, or None at EOF. Raises socket.timeout."""
        if self.pending:
            return self.pending.pop(0)
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            for msg in self.unpacker:
                return msg
            data = self.sock.recv(65536)
            if not data:
                return None
            self.unpacker.feed(data)

    def call(self, method, params=None, timeout=None):
        """Send a request and wait for its response. Returns (error, result)."""
        msgid = self.send_request(method, params)
        while True:
            msg = self.recv(timeout)
            if msg is None:
                raise ConnectionError(f"connection closed while waiting for the reply to {method}")
            if isinstance(msg, list) and len(msg) == 4 and msg[0] == 1 and msg[1] == msgid:
                return msg[2], msg[3]


def rpc_call(path, method, params=None, timeout=5.0):
    with RpcClient(path, timeout) as c:
        return c.call(method, params)


# ---------------------------------------------------------------------------------------------------------------
# sparkd / sparkctl


class CtlResult:
    def __init__(self, cp):
        self.rc = cp.returncode
        self.out = cp.stdout
        self.err = cp.stderr
        self.args = cp.args

    def json(self):
        return json.loads(self.out)

    def err_lines(self):
        return [l for l in self.err.splitlines() if l.strip()]

    def __repr__(self):
        return f"<sparkctl {self.args[1:]} rc={self.rc} out={self.out[-2000:]!r} err={self.err[-2000:]!r}>"


class Sparkd:
    """One private supervisor: socket, log dir and pid file in its own directory, tracked processes.

    mode "ctl": `sparkctl start` (daemonizes); mode "fg": sparkd in the foreground as our child.
    """

    def __init__(self, workdir, env=None, bin_dir=None, name="spark"):
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin_dir = Path(bin_dir or BIN_DIR)
        self.socket = self.dir / "run" / "sparkd.sock"
        self.log_dir = self.dir / "log"
        self.pid_file = self.dir / "run" / "sparkd.pid"
        self.san_dir = self.dir / "san"
        self.san_dir.mkdir(exist_ok=True)
        self.test_id = uuid.uuid4().hex
        self.marker = f"SPARK_TEST_ID={self.test_id}"
        self.env = base_env(env, report_dir=self.san_dir)
        self.env.update({"SPARK_SOCKET": str(self.socket), "SPARK_LOG_DIR": str(self.log_dir),
                         "SPARK_PID_FILE": str(self.pid_file), "SPARK_TEST_ID": self.test_id})
        self.proc = None  # foreground sparkd
        self.pid = None
        self.seen_pids = {}  # pid -> its start time when status showed it
        self.stdout_path = self.dir / "sparkd.out"
        self.stderr_path = self.dir / "sparkd.err"

    # -- commands

    def ctl(self, *args, timeout=None, env=None, prog="sparkctl", input=None, check=False):
        e = dict(self.env)
        if env:
            for k, v in env.items():
                if v is None:
                    e.pop(k, None)
                else:
                    e[k] = str(v)
        cp = subprocess.run([str(self.bin_dir / prog), *map(str, args)], capture_output=True, text=True,
                            env=e, timeout=timeout or t(30), cwd=str(self.dir), input=input)
        r = CtlResult(cp)
        if check and r.rc != 0:
            raise AssertionError(f"sparkctl failed: {r!r}")
        return r

    def ctl_json(self, *args, **kw):
        r = self.ctl(*args, "--json", **kw)
        assert r.rc == 0, f"{r!r}"
        return r.json()

    def rpc(self, method, params=None, timeout=None):
        return rpc_call(self.socket, method, params, timeout or t(5))

    def status(self, verbose=True):
        """The status result over the socket (raises on error)."""
        err, res = self.rpc("status", {"verbose": verbose})
        assert err is None, f"status error: {err}"
        self._note(res)
        return res

    def _note(self, st):
        for w in st.get("workers", []):
            for p in w.get("processes", []) or []:
                if p.get("pid"):
                    self.seen_pids[p["pid"]] = pid_start_time(p["pid"])

    @property
    def pid(self):
        return self._pid

    @pid.setter
    def pid(self, pid):
        # sparkd's start time with its pid: once it has exited the pid may be any other process's
        self._pid = pid
        self._pid_started = pid_start_time(pid) if pid else None

    def processes(self, st=None):
        st = st or self.status()
        return [p for w in st["workers"] for p in (w.get("processes") or [])]

    # -- lifecycle

    def start(self, *args, workers=1, concurrency=1, mode="ctl", timeout=None, ready=True):
        argv = ["--workers", str(workers), "--concurrency", str(concurrency), *map(str, args)]
        timeout = timeout or t(30)
        if mode == "ctl":
            r = self.ctl("start", *argv, timeout=timeout)
            assert r.rc == 0, f"sparkctl start failed: {r!r}\n{self.tail()}"
            self.pid = self._read_pid()
            if ready:
                self.wait_ready(workers, timeout=timeout)
            return r
        self.proc = subprocess.Popen([str(self.bin_dir / "sparkd"), *argv], env=self.env, cwd=str(self.dir),
                                     stdout=open(self.stdout_path, "ab"), stderr=open(self.stderr_path, "ab"),
                                     start_new_session=True)
        self.pid = self.proc.pid
        if ready:
            self.wait_ready(workers, timeout=timeout)
        return self.proc

    def _read_pid(self):
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            try:
                err, res = self.rpc("ping")
                return res.get("pid") if err is None else None
            except OSError:
                return None

    def wait_ready(self, workers, timeout=None):
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sparkd exited with {self.proc.returncode}\n{self.tail()}")
            st = self.status()
            ws = st["workers"]
            return len(ws) == workers and all(w["state"] == "active" for w in ws) and st
        return wait_for(ready, timeout or t(30), interval=0.05, what=f"{workers} active workers")

    def stop(self, *args, timeout=None):
        return self.ctl("stop", *args, timeout=timeout or t(60))

    def running(self):
        return same_process(self._pid, self._pid_started)

    def all_pids(self):
        pids = set(pids_with_env(self.marker))
        for p, started in self.seen_pids.items():
            # a pid seen once and since reused by another process (another test's, another user's) is not ours
            if same_process(p, started):
                pids.add(p)
        if self.running():
            pids.add(self.pid)
        return pids

    def worker_pids(self):
        return {p for p in self.all_pids() if p != self.pid}

    def tail(self, n=40):
        parts = []
        for p in (self.stderr_path, self.stdout_path):
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                if lines:
                    parts.append(f"--- {p.name}\n" + "\n".join(lines))
        if self.log_dir.is_dir():
            for f in sorted(self.log_dir.iterdir()):
                if f.is_file():
                    lines = f.read_text(errors="replace").splitlines()[-n:]
                    parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def cleanup(self):
        """Kill everything this instance started; return sanitizer reports found (if any)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        for _ in range(3):
            pids = self.all_pids()
            if not pids:
                break
            kill_pids(pids)
            for p in pids:
                wait_pid_gone(p, 5)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return san_reports(self.san_dir)


# ---------------------------------------------------------------------------------------------------------------
# Celery producer / result reader


def celery_app(broker_url, backend_url=None):
    """A Python Celery app as automagik-spark's producers use it: send_task + AsyncResult.get()."""
    from celery import Celery
    app = Celery("t", broker=broker_url, backend=backend_url or broker_url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    return app


def inline_nobody_client():
    """Python source of a stand-alone msgpack-RPC client (for running as another uid, which cannot import this
    module). argv: socket method [params-json]; prints the response as JSON or CLOSED / CONNECT-ERROR."""
    return r'''
import json, socket, sys, msgpack
path, method = sys.argv[1], sys.argv[2]
params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(path)
except OSError as e:
    print("CONNECT-ERROR", e); sys.exit(2)
s.sendall(msgpack.packb([0, 1, method, [params] if params is not None else []], use_bin_type=True))
u = msgpack.Unpacker(raw=False)
while True:
    try:
        d = s.recv(65536)
    except OSError as e:
        print("CLOSED", e); sys.exit(0)
    if not d:
        print("CLOSED"); sys.exit(0)
    u.feed(d)
    for m in u:
        if m[0] == 1 and m[1] == 1:
            print(json.dumps({"error": m[2], "result": m[3]})); sys.exit(0)
'''


def make_public_tmpdir(prefix="spark-it-"):
    """A directory under the system temp dir that other uids can traverse (pytest's tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return Path(d)

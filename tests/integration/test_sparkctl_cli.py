"""sparkctl's own behaviour, without a real sparkd (issue 2 item 6, issue 4 items 5 and 7): usage errors (exit 2),
not running (exit 3), --help/--version, the automagik-spark grammar, config refused before any process starts,
the output formats and client robustness against a small fake daemon, the man pages and the bash completion."""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import msgpack
import pytest

import harness
from harness import base_env, t

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def run(*args, prog="sparkctl", env=None, cwd=None, timeout=None):
    e = base_env(env)
    cp = subprocess.run([harness.binary(prog), *map(str, args)], capture_output=True, text=True, env=e,
                        cwd=cwd, timeout=timeout or t(30))
    return harness.CtlResult(cp)


# ---------------------------------------------------------------------------------------------------------------
# usage


@pytest.mark.parametrize("args,needle", [
    ([], "missing command"),
    (["frobnicate"], "frobnicate"),
    (["status", "--bogus"], "--bogus"),
    (["status", "extra"], "extra"),
    (["logs", "--lines", "abc"], "abc"),
    (["logs", "-n", "-5"], "-5"),
    (["logs", "--lines"], "--lines"),
    (["logs", "--level", "loud"], "loud"),
    (["stop", "--timeout", "soon"], "soon"),
    (["stop", "--force=1"], "--force"),
    (["start", "--workers"], "--workers"),
    (["db"], "migrate"),
    (["db", "drop"], "drop"),
    (["--socket"], "--socket"),
    (["--frob", "status"], "--frob"),
])
def test_usage_errors_exit_2_with_one_line(args, needle):
    r = run(*args)
    assert r.rc == 2, r
    assert len(r.err_lines()) == 1 and needle in r.err, r
    assert r.out == ""


@pytest.mark.parametrize("args", [["workers"], ["workers", "frob"], ["start"], ["workers", "logs", "-n", "x"]])
def test_guide_grammar_usage_errors(args):
    r = run(*args, prog="automagik-spark")
    assert r.rc == 2 and len(r.err_lines()) == 1 and r.err.startswith("automagik-spark:"), r


def test_help_and_version():
    h = run("--help")
    assert h.rc == 0 and "sparkctl start" in h.out and "sparkctl logs" in h.out and h.err == "", h
    assert run("-h").out == h.out
    s = run("status", "--help")
    assert s.rc == 0 and "--verbose" in s.out and "--json" in s.out, s
    v = run("--version")
    assert v.rc == 0 and re.match(r"sparkctl \d+\.\d+\.\d+", v.out), v
    a = run("--help", prog="automagik-spark")
    assert a.rc == 0, a
    for cmd in ("workers start", "workers status", "workers stop", "workers logs"):
        assert f"automagik-spark {cmd}" in a.out, a.out
    w = run("workers", "logs", "--help", prog="automagik-spark")
    assert w.rc == 0 and "--follow" in w.out and "--level" in w.out, w


# ---------------------------------------------------------------------------------------------------------------
# not running


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["stop"], ["stop", "--force"], ["logs"],
                                  ["logs", "-f"]])
def test_not_running_exit_3(tmp_path, args):
    sock = tmp_path / "none.sock"
    r = run("--socket", sock, *args)
    assert r.rc == 3, r
    assert len(r.err_lines()) == 1 and "not running" in r.err and str(sock) in r.err, r
    # SPARK_SOCKET is honoured the same way, and the flag may follow the command
    r = run(*args, env={"SPARK_SOCKET": str(sock)})
    assert r.rc == 3 and str(sock) in r.err, r
    r = run(*args, "--socket", sock)
    assert r.rc == 3 and str(sock) in r.err, r


def test_guide_grammar_not_running(tmp_path):
    sock = tmp_path / "none.sock"
    for cmd in (["workers", "status", "--verbose"], ["workers", "stop", "--force"],
                ["workers", "logs", "--follow", "--level", "error"]):
        r = run(*cmd, prog="automagik-spark", env={"SPARK_SOCKET": str(sock)})
        assert r.rc == 3 and str(sock) in r.err and "automagik-spark workers start" in r.err, r


def test_stale_socket_is_not_running(tmp_path):
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()
    r = run("--socket", sock, "status")
    assert r.rc == 3 and str(sock) in r.err, r


# ---------------------------------------------------------------------------------------------------------------
# start: configuration refused before any process starts


@pytest.mark.parametrize("args,env,needle", [
    (["--workers", "-3"], {}, "SPARK_WORKERS"),
    (["--pool", "gevent"], {}, "gevent"),
    ([], {"CELERY_WORKER_POOL": "gevent"}, "CELERY_WORKER_POOL"),
    ([], {"CELERY_BROKER_URL": "nonsense"}, "CELERY_BROKER_URL"),
    ([], {"CELERY_TASK_TIME_LIMIT": "10", "CELERY_TASK_SOFT_TIME_LIMIT": "20"}, "CELERY_TASK_SOFT_TIME_LIMIT"),
    (["--env-file", "/nonexistent/spark.env"], {}, "/nonexistent/spark.env"),
])
def test_start_refuses_bad_config(tmp_path, args, env, needle):
    sock = tmp_path / "run" / "sparkd.sock"
    e = dict(env, SPARK_SOCKET=str(sock), SPARK_PID_FILE=str(tmp_path / "run" / "sparkd.pid"),
             SPARK_LOG_DIR=str(tmp_path / "log"))
    for prog, pre in (("sparkctl", ["start"]), ("automagik-spark", ["workers", "start"])):
        r = run(*pre, *args, prog=prog, env=e)
        assert r.rc == 1, r
        assert len(r.err_lines()) == 1 and needle in r.err, r
        assert not sock.exists() and not (tmp_path / "run" / "sparkd.pid").exists()


def test_start_without_sparkd_says_where_it_looked(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy2(harness.binary("sparkctl"), bindir / "sparkctl")
    e = base_env({"SPARK_SOCKET": str(tmp_path / "s.sock"), "PATH": "/nonexistent"})
    cp = subprocess.run([str(bindir / "sparkctl"), "start"], capture_output=True, text=True, env=e, timeout=t(10))
    assert cp.returncode == 1 and "cannot find sparkd" in cp.stderr, cp


# ---------------------------------------------------------------------------------------------------------------
# a fake daemon: the output formats and the client's robustness


class FakeDaemon:
    """Answers ping/status/logs/stop on a Unix socket the way DESIGN §4 says sparkd does, or misbehaves."""

    def __init__(self, path, mode="normal"):
        self.path, self.mode = str(path), mode
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.requests = []
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        for c in [self.srv, *self.conns]:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    STATUS = {
        "supervisor": {"pid": 4242, "version": "0.1.0", "uptime_s": 3700, "socket": "SOCK", "pool": "prefork",
                       "workers": 1, "concurrency": 2, "queues": ["celery"], "queue_lengths": {"celery": 3},
                       "limits": {"max_tasks_per_child": 100, "max_memory_kib": 200000, "time_limit": 300,
                                  "soft_time_limit": 280},
                       "log_file": "/var/log/spark/sparkd.log", "state": "running"},
        "workers": [{"name": "celery@host", "state": "active", "pool": "prefork", "concurrency": 2, "processed": 47,
                     "active": 1, "uptime_s": 3 * 3600 + 24 * 60, "restarts": 1,
                     "processes": [{"pid": 5001, "state": "active", "rss_kib": 3277, "processed": 40, "restarts": 0,
                                    "active_tasks": [{"id": "task-abc", "name": "spark.sleep", "runtime_s": 2.5}],
                                    "started_at": 1.0, "last_exit": None},
                                   {"pid": 5002, "state": "backoff", "processed": 7, "restarts": 1,
                                    "active_tasks": [], "last_exit": {"reason": "crashed (signal 9)", "status": -1,
                                                                      "signal": 9, "at": 2.0}}]}],
    }

    def _serve(self, c):
        unp = msgpack.Unpacker(raw=False)
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                return
            if not data:
                return
            unp.feed(data)
            for msg in unp:
                _, msgid, method, params = msg
                p = params[0] if params else {}
                self.requests.append((method, p))
                try:
                    self._answer(c, msgid, method, p)
                except OSError:
                    return

    def _answer(self, c, msgid, method, p):
        ok = lambda res: c.sendall(msgpack.packb([1, msgid, None, res]))  # noqa: E731
        if self.mode == "garbage":
            c.sendall(b"\xc1" * 8)
        elif self.mode == "huge":
            c.sendall(msgpack.packb([1, msgid, None, {"workers": [], "pad": "x" * (2 << 20)}]))
        elif method == "ping":
            ok({"protocol": 1, "version": "0.1.0", "pid": 4242})
        elif method == "status":
            ok(self.STATUS)
        elif method == "logs":
            lines = [{"ts": 1700000000.0 + i, "level": "error" if i == 2 else "info", "worker": "celery@host",
                      "pid": 5001, "msg": f"message {i}"} for i in range(p.get("lines", 100))][-3:]
            ok({"lines": lines})
            if p.get("follow"):
                c.sendall(msgpack.packb([2, "log", [{"ts": 1700000100.5, "level": "warning", "worker": "celery@host",
                                                     "pid": 5001, "msg": "followed"}]]))
                c.sendall(msgpack.packb([2, "log", [{"dropped": 12}]]))
                if self.mode == "exit-after-follow":
                    c.close()
        elif method == "stop":
            if self.mode == "deny":
                c.sendall(msgpack.packb([1, msgid, {"code": "permission_denied", "message": "no"}, None]))
            else:
                ok({"stopping": True})
                time.sleep(0.1)  # the fake daemon lingers as a stopping sparkd would; nothing waits on it
                c.close()


@pytest.fixture
def fake(tmp_path):
    daemons = []

    def make(mode="normal"):
        d = FakeDaemon(tmp_path / f"fake{len(daemons)}.sock", mode)
        daemons.append(d)
        return d
    yield make
    for d in daemons:
        d.close()


def blocks(text):
    out = []
    for chunk in text.strip().split("\n\n"):
        d = {}
        for line in chunk.splitlines():
            if ": " in line and not line.startswith(" "):
                k, v = line.split(": ", 1)
                d[k] = v
        out.append(d)
    return out


def test_status_formats(fake):
    d = fake()
    r = run("--socket", d.path, "status")
    assert r.rc == 0, r
    b = blocks(r.out)[0]
    assert b == {"Worker": "celery@host", "Status": "Active", "Concurrency": "2", "Tasks Processed": "47",
                 "Active Tasks": "1", "Uptime": "3h 24m"}, r.out
    assert "\x1b[" not in r.out, "no colour when stdout is not a TTY"
    v = run("--socket", d.path, "status", "--verbose")
    assert v.rc == 0, v
    for needle in ("5001", "5002", "3.2 MiB", "task-abc", "spark.sleep", "crashed (signal 9)", "Backoff", "4242",
                   "celery (3 waiting)", "max tasks per child 100", "/var/log/spark/sparkd.log"):
        assert needle in v.out, (needle, v.out)
    j = run("--socket", d.path, "status", "--json")
    assert j.rc == 0 and j.json() == FakeDaemon.STATUS, j
    assert ("status", {"verbose": True}) in d.requests


def test_logs_formats_and_follow(fake):
    d = fake("exit-after-follow")
    r = run("--socket", d.path, "logs", "-n", "3", "--level", "WARN", "--worker", "celery@host")
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} INFO celery@host\[5001\] message 0", lines[0]), lines
    assert " ERROR " in lines[2]
    assert ("logs", {"lines": 3, "follow": False, "level": "warning", "worker": "celery@host"}) in d.requests
    j = run("--socket", d.path, "logs", "--json")
    assert [json.loads(x)["msg"] for x in j.out.splitlines()] == ["message 97", "message 98", "message 99"], j
    f = run("--socket", d.path, "logs", "--follow", "-n", "1")
    assert f.rc == 0, f
    assert f.out.splitlines()[-2].endswith("WARNING celery@host[5001] followed"), f.out
    assert f.out.splitlines()[-1] == "-- 12 lines dropped (reader too slow) --", f.out
    fj = run("--socket", d.path, "logs", "-f", "-n", "0", "--json")
    assert json.loads(fj.out.splitlines()[-1]) == {"dropped": 12}, fj


def test_follow_ends_with_exit_0_on_sigint(fake):
    d = fake()
    p = subprocess.Popen([harness.binary("sparkctl"), "--socket", d.path, "logs", "-f"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=base_env())
    out = []
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    harness.wait_for(lambda: any("followed" in line for line in out), t(10), what="the followed line printed")
    p.send_signal(2)
    rc = p.wait(timeout=t(10))
    reader.join(t(10))
    assert rc == 0, (out, p.stderr.read())


def test_stop_waits_for_close_and_maps_errors(fake):
    d = fake()
    r = run("--socket", d.path, "stop", "--timeout", "5")
    assert r.rc == 0 and r.out == "" and r.err == "", r
    assert ("stop", {"force": False, "timeout_s": 5.0}) in d.requests
    r = run("--socket", d.path, "stop", "--force")
    assert r.rc == 0 and ("stop", {"force": True}) in d.requests, r
    deny = fake("deny")
    r = run("--socket", deny.path, "stop")
    assert r.rc == 1 and r.err.strip() == "sparkctl: permission denied: only root or the daemon's user may stop it", r


def test_start_refuses_when_already_running(fake, tmp_path):
    d = fake()
    r = run("start", env={"SPARK_SOCKET": d.path, "SPARK_LOG_DIR": str(tmp_path / "log")})
    assert r.rc == 1 and f"sparkd is already running (pid 4242) on {d.path}" in r.err, r


# ---------------------------------------------------------------------------------------------------------------
# commands that only talk to the socket read only the socket (issue 9 item 8)

MALFORMED_ENV = "this line is not a variable\nCELERY_WORKER_POOL = gevent\nCELERY_BROKER_URL = nonsense\n"


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["logs", "-n", "3"], ["stop", "--timeout", "5"],
                                  ["workers", "status", "--verbose"]])
def test_socket_commands_warn_on_a_malformed_env_file(fake, tmp_path, args):
    d = fake()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # the socket comes from the file's one good line: the file is read, its bad lines only warned about
    (cwd / ".env").write_text(MALFORMED_ENV + f"SPARK_SOCKET = {d.path}\n")
    prog = "automagik-spark" if args[0] == "workers" else "sparkctl"
    r = run(*args, prog=prog, env={"SPARK_ENV_FILE": None}, cwd=cwd)
    assert r.rc == 0, r
    assert len(r.err_lines()) == 1, r
    assert r.err.startswith(f"{prog}: warning: .env:1: expected KEY=value"), r
    assert "needs only the socket" in r.err, r
    method = args[1] if args[0] == "workers" else args[0]
    assert any(m == method for m, _ in d.requests), d.requests
    # given the socket by flag or environment, the file is not even read: no warning
    before = len(d.requests)
    for extra, env in ((["--socket", d.path], {}), ([], {"SPARK_SOCKET": d.path})):
        r = run(*extra, *args, prog=prog, env=dict(env, SPARK_ENV_FILE=None), cwd=cwd)
        assert r.rc == 0 and r.err == "", r
    assert len(d.requests) > before


def test_socket_commands_with_a_malformed_env_file_still_say_not_running(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    sock = tmp_path / "none.sock"
    (cwd / ".env").write_text(f"SPARK_SOCKET={sock}\n" + MALFORMED_ENV)
    for args in (["status"], ["logs"], ["stop"]):
        r = run(*args, env={"SPARK_ENV_FILE": None}, cwd=cwd)
        assert r.rc == 3, r
        assert "warning: .env:2: expected KEY=value" in r.err and f"no socket at {sock}" in r.err, r
    # an env file that cannot be read is a warning too, and the default socket is used
    r = run("status", env={"SPARK_ENV_FILE": str(tmp_path / "missing.env"), "SPARK_SOCKET": None,
                           "XDG_RUNTIME_DIR": str(tmp_path / "xdg"), "RUNTIME_DIRECTORY": str(tmp_path / "rt")},
            cwd=cwd)
    assert r.rc == 3 and "missing.env" in r.err and str(tmp_path / "rt" / "sparkd.sock") in r.err, r
    # where the whole configuration is read, the same file is refused before any process starts
    e = {"SPARK_ENV_FILE": None, "SPARK_LOG_DIR": str(tmp_path / "log")}
    for prog, pre in (("sparkctl", ["start"]), ("automagik-spark", ["workers", "start"])):
        r = run(*pre, prog=prog, env=e, cwd=cwd)
        assert r.rc == 1 and len(r.err_lines()) == 1 and ".env:2: expected KEY=value" in r.err, r
    assert not sock.exists()


@pytest.mark.parametrize("mode,needle", [("garbage", "malformed"), ("huge", "1024 KiB")])
def test_bad_replies_exit_1(fake, mode, needle):
    d = fake(mode)
    r = run("--socket", d.path, "status")
    assert r.rc == 1 and len(r.err_lines()) == 1 and needle in r.err, r


# ---------------------------------------------------------------------------------------------------------------
# man pages and completion


@pytest.mark.parametrize("page", ["sparkctl.1", "sparkd.8", "spark-worker.8"])
def test_man_pages_render_clean(page):
    if shutil.which("man") is None or shutil.which("groff") is None:
        pytest.skip("man/groff not installed")
    path = os.path.join(REPO, "docs", "man", page)
    cp = subprocess.run(["man", "-l", path], capture_output=True, text=True, env=dict(base_env(), MANWIDTH="100",
                                                                                    MANPAGER="cat", PAGER="cat"))
    assert cp.returncode == 0 and "NAME" in cp.stdout and "SEE ALSO" in cp.stdout, cp
    warn = subprocess.run(["groff", "-man", "-ww", "-z", path], capture_output=True, text=True)
    assert warn.returncode == 0 and warn.stderr == "", warn.stderr


def complete(words):
    script = os.path.join(REPO, "completion", "sparkctl.bash")
    arr = " ".join(f"'{w}'" for w in words)
    prog = f"""
source '{script}' || exit 9
COMP_WORDS=({arr}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
_sparkctl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    cp = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, timeout=10)
    assert cp.returncode == 0 and cp.stderr == "", cp
    return cp.stdout.split()


def test_bash_completion():
    assert complete(["sparkctl", ""]) == ["start", "status", "stop", "logs", "db"]
    assert complete(["sparkctl", "st"]) == ["start", "status", "stop"]
    assert complete(["sparkctl", "--socket", "/x", "lo"]) == ["logs"]
    assert "--follow" in complete(["sparkctl", "logs", "--f"])
    assert complete(["sparkctl", "start", "--pool", ""]) == ["prefork", "threads", "solo"]
    assert complete(["sparkctl", "db", ""]) == ["migrate"]
    assert complete(["automagik-spark", ""]) == ["workers", "db"]
    assert complete(["automagik-spark", "workers", ""]) == ["start", "status", "stop", "logs"]
    assert "--force" in complete(["automagik-spark", "workers", "stop", "--"])

"""The control socket over raw msgpack-RPC (issue 2): methods, hostile input, permissions."""

import json
import os
import random
import shutil
import socket
import subprocess

import msgpack
import pytest

from harness import PYTHON, RpcClient, Sparkd, inline_nobody_client, make_public_tmpdir, t, wait_for, wait_pid_gone


def test_methods_ping_status_logs_stop(spark, celery):
    sd = spark()
    sd.start(workers=1, concurrency=2)
    with RpcClient(sd.socket, timeout=t(5)) as c:
        err, res = c.call("ping")
        assert err is None
        assert res["protocol"] == 1 and isinstance(res["version"], str) and res["pid"] == sd.pid

        err, res = c.call("status", {"verbose": False})
        assert err is None and len(res["workers"]) == 1 and res["workers"][0]["state"] == "active"
        err, res = c.call("status", {"verbose": True})
        assert err is None and len(res["workers"][0]["processes"]) == 2
        assert all(isinstance(p["pid"], int) for p in res["workers"][0]["processes"])
        err, res = c.call("status")  # params may be omitted
        assert err is None

        # pipelined requests on one connection are answered with their own msgids
        a = c.send_request("ping")
        b = c.send_request("status", {"verbose": False})
        replies = {}
        while len(replies) < 2:
            m = c.recv(timeout=t(5))
            assert m is not None
            if m[0] == 1:
                replies[m[1]] = m
        assert replies[a][2] is None and replies[a][3]["pid"] == sd.pid
        assert replies[b][2] is None and "workers" in replies[b][3]

        err, res = c.call("logs", {"lines": 5})
        assert err is None and len(res["lines"]) <= 5
        for e in res["lines"]:
            assert {"ts", "level", "worker", "pid", "msg"} <= set(e), e

    # follow: a reply, then "log" notifications
    app = celery()
    with RpcClient(sd.socket, timeout=t(10)) as f:
        err, res = f.call("logs", {"lines": 0, "follow": True})
        assert err is None and res["lines"] == []
        r = app.send_task("spark.noop", args=[1])
        assert r.get(timeout=t(20)) == 1
        m = f.recv(timeout=t(10))
        assert m[0] == 2 and m[1] == "log", m
        assert {"ts", "level", "worker", "pid", "msg"} <= set(m[2][0])

        with RpcClient(sd.socket, timeout=t(10)) as s:
            err, res = s.call("stop", {"force": False})
            assert err is None and res.get("stopping") is True, (err, res)
            # the socket closes when the daemon exits
            wait_for(lambda: s.recv(timeout=t(30)) is None, t(30), what="the stop connection to close")
    assert wait_pid_gone(sd.pid, t(30))
    assert not sd.socket.exists() and not sd.pid_file.exists()
    assert not sd.worker_pids()


def reply_is_error_or_close(c, timeout):
    """After hostile input: an error reply (never a success) or a closed connection."""
    try:
        while True:
            m = c.recv(timeout=timeout)
            if m is None:
                return "closed"
            if isinstance(m, list) and len(m) == 4 and m[0] == 1:
                assert m[2] is not None, f"hostile input got a success reply: {m}"
                assert isinstance(m[2], dict) and isinstance(m[2].get("code"), str), m
                return m[2]["code"]
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    except socket.timeout:
        raise AssertionError("neither an error reply nor a close")


def hostile_inputs():
    rnd = random.Random(1234)
    filler = b"a" * int(1.1 * 1024 * 1024)
    return {
        "random-bytes": [rnd.randbytes(65536)],
        "str32-1GiB": [b"\xdb" + (1 << 30).to_bytes(4, "big"), filler],
        "bin32-1GiB": [b"\xc6" + (1 << 30).to_bytes(4, "big"), filler],
        "array32-huge": [b"\xdd" + (1 << 28).to_bytes(4, "big") + b"\xc0" * 1024],
        "map32-huge": [b"\xdf" + (1 << 28).to_bytes(4, "big") + b"\xc0" * 1024],
        "not-a-request": [msgpack.packb({"method": "ping"})],
        "response-type": [msgpack.packb([1, 1, None, None])],
        "msgid-not-int": [msgpack.packb([0, "one", "ping", []])],
        "method-not-str": [msgpack.packb([0, 1, 42, []])],
        "params-not-map": [msgpack.packb([0, 1, "status", ["verbose"]])],
        "params-scalar": [msgpack.packb([0, 1, "status", "x"])],
        "unknown-method": [msgpack.packb([0, 1, "shutdown_now", [{}]])],
        "method-empty": [msgpack.packb([0, 1, "", [{}]])],
        "status-verbose-str": [msgpack.packb([0, 1, "status", [{"verbose": "yes"}]])],
        "logs-lines-str": [msgpack.packb([0, 1, "logs", [{"lines": "ten"}]])],
        "logs-lines-negative": [msgpack.packb([0, 1, "logs", [{"lines": -5}]])],
        "logs-level-int": [msgpack.packb([0, 1, "logs", [{"level": 3}]])],
        "logs-worker-list": [msgpack.packb([0, 1, "logs", [{"worker": ["a"]}]])],
        "stop-force-str": [msgpack.packb([0, 1, "stop", [{"force": "yes"}]])],
        "stop-timeout-str": [msgpack.packb([0, 1, "stop", [{"timeout_s": "soon"}]])],
    }


@pytest.fixture(scope="module")
def control_daemon(redis_server, tmp_path_factory):
    """One supervisor for the hostile-input cases: each case must leave it serving."""
    sd = Sparkd(tmp_path_factory.mktemp("control"), {"CELERY_BROKER_URL": redis_server.url(0)})
    sd.start(workers=1, concurrency=1)
    yield sd
    reports = sd.cleanup()
    assert not reports, "\n".join(reports)


@pytest.mark.parametrize("case", list(hostile_inputs()))
def test_hostile_input_gets_error_or_close_and_others_are_served(control_daemon, case):
    sd = control_daemon
    assert sd.running(), "an earlier case took the daemon down"
    bystander = RpcClient(sd.socket, timeout=t(5))
    follower = RpcClient(sd.socket, timeout=t(5))
    try:
        err, _ = follower.call("logs", {"lines": 0, "follow": True})
        assert err is None
        c = RpcClient(sd.socket, timeout=t(5))
        chunks = hostile_inputs()[case]
        try:
            for ch in chunks:
                c.send_raw(ch)
                # served while the hostile connection is mid-stream
                err, res = bystander.call("ping")
                assert err is None and res["pid"] == sd.pid
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-send: allowed
        outcome = reply_is_error_or_close(c, t(5))
        if case in ("unknown-method", "method-empty"):
            assert outcome == "unknown_method"
        elif case.startswith(("status-", "logs-", "stop-", "params-")):
            assert outcome in ("bad_params", "bad_request", "closed"), outcome
        c.close()
        err, res = bystander.call("status", {"verbose": True})
        assert err is None and res["workers"][0]["state"] == "active"
        err, res = RpcClient(sd.socket, timeout=t(5)).call("ping")
        assert err is None
        assert sd.running(), "the daemon must not exit or stop on bad input"
    finally:
        bystander.close()
        follower.close()


def test_truncated_frame_does_not_block_others(control_daemon):
    sd = control_daemon
    frame = msgpack.packb([0, 9, "status", [{"verbose": True}]])
    c = RpcClient(sd.socket, timeout=t(5))
    c.send_raw(frame[: len(frame) // 2])
    # the daemon waits for the rest without blocking anyone
    err, res = sd.rpc("ping")
    assert err is None and res["pid"] == sd.pid
    c.sock.shutdown(socket.SHUT_WR)
    outcome = reply_is_error_or_close(c, t(5))
    assert outcome in ("closed", "bad_request"), outcome
    c.close()
    # a frame split in many tiny writes is still one good request
    with RpcClient(sd.socket, timeout=t(5)) as d:
        for i in range(len(frame)):
            d.send_raw(frame[i:i + 1])
        m = d.recv(timeout=t(5))
        assert m[0] == 1 and m[1] == 9 and m[2] is None and m[3]["workers"]
    assert sd.running()


def test_many_idle_connections_do_not_block(control_daemon):
    sd = control_daemon
    idle = [RpcClient(sd.socket, timeout=t(5)) for _ in range(50)]
    try:
        err, res = sd.rpc("status", {"verbose": False})
        assert err is None
    finally:
        for c in idle:
            c.close()
    assert sd.running()


def run_as_nobody(sock, method, params=None):
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", PYTHON, "-c", inline_nobody_client(),
           str(sock), method]
    if params is not None:
        cmd.append(json.dumps(params))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=t(20),
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, cwd="/")
    return r


def test_other_uid_cannot_stop(redis):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is required for this test", pytrace=False)
    workdir = make_public_tmpdir()
    sd = Sparkd(workdir, {"CELERY_BROKER_URL": redis.url(0)})
    try:
        sd.start(workers=1, concurrency=1)
        # let nobody reach the socket: the socket's group is nogroup, so the peer check admits it as a member
        import grp
        gid = grp.getgrnam("nogroup").gr_gid
        for p in (sd.socket.parent, sd.socket):
            os.chown(p, -1, gid)
        os.chmod(sd.socket.parent, 0o750)

        r = run_as_nobody(sd.socket, "ping")
        assert r.returncode == 0, r
        out = json.loads(r.stdout)
        assert out["error"] is None and out["result"]["pid"] == sd.pid, out

        r = run_as_nobody(sd.socket, "stop", {"force": True})
        assert r.returncode == 0, r
        assert r.stdout.startswith("{"), f"expected a refusal, got: {r.stdout!r} {r.stderr!r}"
        out = json.loads(r.stdout)
        assert out["error"] is not None and out["error"]["code"] == "permission_denied", out
        # nothing stopped
        err, res = sd.rpc("status", {"verbose": True})
        assert err is None and res["workers"][0]["state"] == "active"
        assert sd.running()
        # root (the daemon's uid) can
        assert sd.stop().rc == 0
        assert wait_pid_gone(sd.pid, t(30))
    finally:
        reports = sd.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    assert not reports, "\n".join(reports)

"""A control socket that cannot be starved (issue 9 item 2): request deadlines, per-uid caps with a reserve for root
and the daemon's uid, a descriptor reserve, and refusals that name their cause. Other uids are numeric ids made up
by the test (no account needed): children switch to them with setgid/setuid before they connect."""

import json
import os
import shutil
import socket
import subprocess
import time

import msgpack
import pytest

from harness import PYTHON, RpcClient, Sparkd, make_public_tmpdir, t, wait_for

DAEMON_UID = 20700  # sparkd's own (non-root) uid in the starvation test; its gid is the socket's group
GROUP_UIDS = [20701, 20702, 20703, 20704]
STRANGER_UID = 20705  # also in the socket's group: arrives when everything is full

# Holds N connections as whatever uid it runs as. Prints {"open": k, "refused": [codes]} once connected, then
# answers each "check" line on stdin with how many are still open, and exits at EOF.
HOLDER = r'''
import json, select, socket, sys, msgpack
path, n, settle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks, refused = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        refused.append("connect: %s" % e); s.close(); continue
    socks.append(s)
def closed(s):
    r, _, _ = select.select([s], [], [], 0)
    if not r:
        return None
    try:
        d = s.recv(65536)
    except OSError:
        return "reset"
    if not d:
        return "eof"
    m = msgpack.unpackb(d, raw=False)
    return (m[2] or {}).get("code", "?")
def still_open():
    keep = []
    for s in socks:
        why = closed(s)
        if why is None:
            keep.append(s)
        else:
            refused.append(why); s.close()
    socks[:] = keep
    return len(socks)
# refusals are answered at accept: give the daemon a moment to have answered the last ones
select.select([], [], [], settle)
still_open()
print(json.dumps({"open": len(socks), "refused": refused}), flush=True)
for line in sys.stdin:
    print(json.dumps({"open": still_open(), "refused": refused}), flush=True)
'''


def as_uid(uid, gid):
    def drop():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return drop


class Holder:
    def __init__(self, sock, n, uid, gid):
        self.p = subprocess.Popen([PYTHON, "-c", HOLDER, str(sock), str(n), str(t(0.3))], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, preexec_fn=as_uid(uid, gid),
                                  env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, cwd="/")
        self.first = self.read()

    def read(self):
        line = self.p.stdout.readline()
        assert line, "holder died"
        return json.loads(line)

    def check(self):
        self.p.stdin.write("check\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def ctl_as(sd, uid, gid, *args):
    env = dict(sd.env, HOME="/")
    return subprocess.run([str(sd.bin_dir / "sparkctl"), *args], capture_output=True, text=True, env=env,
                          timeout=t(30), cwd="/", preexec_fn=as_uid(uid, gid))


@pytest.fixture
def public_dir():
    d = make_public_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_full_socket_does_not_lock_out_root_or_the_daemons_user(redis, public_dir):
    sd = Sparkd(public_dir, {"CELERY_BROKER_URL": redis.url(0)})
    for root, dirs, files in os.walk(public_dir):
        for x in [root] + [os.path.join(root, f) for f in dirs + files]:
            os.chown(x, DAEMON_UID, DAEMON_UID)
    holders = []
    try:
        # sparkd as its own unprivileged user, in the foreground: its gid is the socket's group
        sd.proc = subprocess.Popen([str(sd.bin_dir / "sparkd"), "--workers", "1", "--concurrency", "1"],
                                   env=sd.env, cwd=str(sd.dir), stdout=open(sd.stdout_path, "ab"),
                                   stderr=open(sd.stderr_path, "ab"), start_new_session=True,
                                   preexec_fn=as_uid(DAEMON_UID, DAEMON_UID))
        sd.pid = sd.proc.pid
        sd.wait_ready(1, timeout=t(30))
        began = time.monotonic()
        # 64 idle connections of the daemon's own user, then socket-group users holding 64 each until full
        holders.append(Holder(sd.socket, 64, DAEMON_UID, DAEMON_UID))
        assert holders[0].first["open"] == 64, holders[0].first
        for uid in GROUP_UIDS:
            holders.append(Holder(sd.socket, 64, uid, DAEMON_UID))
        group_open = sum(h.first["open"] for h in holders[1:])
        refusals = [r for h in holders[1:] for r in h.first["refused"]]
        assert group_open == 192, [h.first for h in holders]  # 256 in all, the daemon's uid holding 64
        assert refusals and set(refusals) == {"too_many_connections"}, refusals

        # one more socket-group user: refused, and sparkctl says why
        r = ctl_as(sd, STRANGER_UID, DAEMON_UID, "status")
        assert r.returncode != 0 and "too many connections" in r.stderr, r
        assert "permission" not in r.stderr.lower(), r

        # root and the daemon's user are still served
        r = ctl_as(sd, 0, 0, "status", "--json")
        assert r.returncode == 0, r
        assert json.loads(r.stdout)["workers"][0]["state"] == "active"
        r = ctl_as(sd, DAEMON_UID, DAEMON_UID, "status")
        assert r.returncode == 0, r

        # all of that happened while every held connection was still open (inside the request deadline)
        if time.monotonic() - began < 4:
            assert holders[0].check()["open"] == 64
        r = ctl_as(sd, DAEMON_UID, DAEMON_UID, "stop")
        assert r.returncode == 0, r
        assert sd.proc.wait(timeout=t(30)) == 0
    finally:
        for h in holders:
            h.close()
        reports = sd.cleanup()
    assert not reports, "\n".join(reports)


def closed_with(c, deadline):
    """Read until the connection closes; the error code sparkd sent before closing, or 'eof'."""
    code = "eof"
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            m = c.recv(timeout=max(0.05, end - time.monotonic()))
        except socket.timeout:
            return None
        except ConnectionResetError:
            return code
        if m is None:
            return code
        if isinstance(m, list) and m[0] == 1 and m[2]:
            code = m[2]["code"]
    return None


def test_idle_and_trickling_connections_are_closed_followers_are_not(spark):
    sd = spark()
    sd.start(workers=1, concurrency=1)
    follower = RpcClient(sd.socket, timeout=t(5))
    err, _ = follower.call("logs", {"lines": 0, "follow": True})
    assert err is None
    idle = RpcClient(sd.socket, timeout=t(5))
    slow = RpcClient(sd.socket, timeout=t(5))
    frame = msgpack.packb([0, 1, "status", [{"verbose": True}]])
    sent = 0
    try:
        # one byte a second: never a whole request before the deadline
        slow.sock.settimeout(0.01)
        while sent < len(frame):
            try:
                slow.sock.send(frame[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            try:
                data = slow.sock.recv(65536)
                slow.unpacker.feed(data)
                break
            except socket.timeout:
                pass
            time.sleep(1)  # pacing the trickle, not waiting for a condition
        assert sent < len(frame), "a one-byte-a-second sender completed its request"
        assert closed_with(slow, t(10)) in ("timed_out", "eof")
        # the idle one is gone too, with the reason
        assert closed_with(idle, t(10)) == "timed_out"
        # the follower waited as long and is still there
        err, res = sd.rpc("ping")
        assert err is None
        follower.sock.settimeout(0.2)
        try:
            while True:
                data = follower.sock.recv(65536)
                assert data, "the follower was disconnected"
                follower.unpacker.feed(data)
        except socket.timeout:
            pass
        assert not [m for m in follower.unpacker if m[0] == 1], "the follower got an error"
        # sparkd is still fine
        err, res = sd.rpc("status", {"verbose": False})
        assert err is None and res["workers"][0]["state"] == "active"
    finally:
        for c in (follower, idle, slow):
            c.close()


def test_descriptor_reserve_keeps_owners_served(redis, public_dir):
    # RLIMIT_NOFILE 128: socket-group users are refused 32 descriptors short of it, root still gets in
    sd = Sparkd(public_dir, {"CELERY_BROKER_URL": redis.url(0)})
    holders = []
    try:
        sd.proc = subprocess.Popen(["prlimit", "--nofile=128:128", str(sd.bin_dir / "sparkd"), "--workers", "1",
                                    "--concurrency", "1"], env=sd.env, cwd=str(sd.dir),
                                   stdout=open(sd.stdout_path, "ab"), stderr=open(sd.stderr_path, "ab"),
                                   start_new_session=True)
        sd.pid = sd.proc.pid
        sd.wait_ready(1, timeout=t(30))
        for uid in GROUP_UIDS[:2]:
            holders.append(Holder(sd.socket, 64, uid, 0))
        held = sum(h.first["open"] for h in holders)
        refusals = [r for h in holders for r in h.first["refused"]]
        assert 0 < held < 96 and refusals and set(refusals) == {"too_many_connections"}, [h.first for h in holders]
        r = ctl_as(sd, STRANGER_UID, 0, "status")
        assert r.returncode != 0 and "file descriptors" in r.stderr, r
        # root: status and more connections of its own, up to the limit and past it; sparkd keeps serving
        r = ctl_as(sd, 0, 0, "status")
        assert r.returncode == 0, r
        mine = []
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sd.socket))
            mine.append(s)
        for s in mine:
            s.close()
        wait_for(lambda: sd.rpc("ping")[0] is None, t(10), what="sparkd serving after descriptor exhaustion")
        assert "out of file descriptors" in sd.tail(200), "the limit was never reached: the test proves nothing"
        assert sd.proc.poll() is None
    finally:
        for h in holders:
            h.close()
        reports = sd.cleanup()
    assert not reports, "\n".join(reports)

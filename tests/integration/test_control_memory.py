"""Decoding within a memory budget (issue 9 item 3): worst-case control frames, many at once, must not drive sparkd's
memory up, and status keeps answering."""

import select
import socket
import time

import msgpack
import pytest

from harness import SAN, RpcClient, t

MIB = 1024 * 1024
HEAD = b"\x94\x00\x01\xa6status\x91"  # [0, 1, "status", [ ...


def nil_pairs_frame():
    # a params map of 524,000 nil:nil pairs, just under 1 MiB: 24 bytes decoded for every byte on the wire
    n = 524000
    return HEAD + b"\xdf" + n.to_bytes(4, "big") + b"\xc0\xc0" * n


def long_string_frame():
    # few values, one string of almost 1 MiB: cheap to decode, but it must be buffered whole first
    body = msgpack.packb({"verbose": "x" * (MIB - 64)})
    return HEAD + body


def vm_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def flood(path, frame, n, deadline):
    """n connections each sending frame, interleaved; returns the error code (or 'closed') each one ended with."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.setblocking(False)
        socks.append(s)
    sent = [0] * n
    outcome = [None] * n
    unpackers = [msgpack.Unpacker(raw=False) for _ in range(n)]
    end = time.monotonic() + deadline
    while any(o is None for o in outcome) and time.monotonic() < end:
        live = [i for i in range(n) if outcome[i] is None]
        wr = [socks[i] for i in live if sent[i] < len(frame)]
        r, w, _ = select.select([socks[i] for i in live], wr, [], 0.1)
        for s in w:
            i = socks.index(s)
            try:
                sent[i] += s.send(frame[sent[i]:sent[i] + 65536])
            except (BlockingIOError, InterruptedError):
                pass
            except (BrokenPipeError, ConnectionResetError):
                outcome[i] = outcome[i] or "closed"
        for s in r:
            i = socks.index(s)
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                outcome[i] = outcome[i] or "closed"
                continue
            unpackers[i].feed(data)
            for m in unpackers[i]:
                if m[0] == 1 and outcome[i] is None:
                    outcome[i] = m[2]["code"] if m[2] else "answered"
    for s in socks:
        s.close()
    return outcome


@pytest.mark.parametrize("kind", ["nil-pairs", "long-string"])
def test_sixty_worst_case_frames_keep_sparkd_small(spark, kind):
    sd = spark()
    sd.start(workers=1, concurrency=1)
    base = vm_kib(sd.pid, "VmRSS")
    frame = nil_pairs_frame() if kind == "nil-pairs" else long_string_frame()
    assert MIB - 4096 < len(frame) <= MIB
    bystander = RpcClient(sd.socket, timeout=t(10))
    try:
        outcome = flood(sd.socket, frame, 60, t(30))
        assert None not in outcome, outcome
        err, res = bystander.call("status", {"verbose": True})
        assert err is None and res["workers"][0]["state"] == "active"
    finally:
        bystander.close()
    if kind == "nil-pairs":
        # refused as soon as the map's header announces more values than any request holds
        assert set(outcome) <= {"frame_too_large", "closed"} and "frame_too_large" in outcome, outcome
    else:
        # the ones that fit the shared budget are decoded and refused for their parameter, the rest for the budget
        assert set(outcome) <= {"bad_params", "overloaded", "closed"}, outcome
        assert "overloaded" in outcome and "bad_params" in outcome, outcome
    hwm = vm_kib(sd.pid, "VmHWM")
    # under sanitizers the baseline is inflated (shadow memory): what the flood adds is what counts there
    if SAN:
        assert hwm - base < 48 * 1024, (base, hwm)
    else:
        assert hwm < 64 * 1024, (base, hwm)
    err, res = sd.rpc("status", {"verbose": False})
    assert err is None
    assert sd.running()


def test_unknown_parameters_beyond_a_few_are_refused(spark):
    sd = spark()
    sd.start(workers=1, concurrency=1)
    # a newer client's extra names are ignored...
    err, res = sd.rpc("status", {"verbose": False, **{f"future{i}": i for i in range(8)}})
    assert err is None and res["workers"]
    # ...a heap of them is not a request
    err, res = sd.rpc("status", {"verbose": False, **{f"future{i}": i for i in range(9)}})
    assert err is not None and err["code"] == "bad_params" and "does not know" in err["message"], err
    # parameter names are strings
    with RpcClient(sd.socket, timeout=t(5)) as c:
        c.send_raw(msgpack.packb([0, 7, "logs", [{1: 2}]], strict_types=False))
        m = c.recv(timeout=t(5))
        assert m[1] == 7 and m[2]["code"] == "bad_params", m
        # the connection stays usable after a bad_params reply
        assert c.call("ping")[0] is None


def test_a_client_that_does_not_read_its_replies_cannot_pile_them_up(spark, celery):
    # 300 pipelined requests for the last 2000 log lines (some 100 KB each, 30 MB in all) from a client that reads
    # nothing for a while: sparkd stops taking its requests while 2 MiB of replies wait, and serves every one, in
    # order, once it reads
    sd = spark({"SPARK_LOGLEVEL": "debug"})
    sd.start(workers=1, concurrency=1)
    app = celery()
    results = [app.send_task("spark.noop", args=[i]) for i in range(300)]
    assert [r.get(timeout=t(30)) for r in results] == list(range(300))
    err, res = sd.rpc("logs", {"lines": 2000})
    size = len(msgpack.packb(res))
    assert size > 50 * 1024, size
    base = vm_kib(sd.pid, "VmRSS")
    n = 300
    c = RpcClient(sd.socket, timeout=t(20))
    try:
        c.send_raw(b"".join(msgpack.packb([0, i + 1, "logs", [{"lines": 2000}]]) for i in range(n)))
        # a window in which the client reads nothing (well inside its 5 s request deadline): without the pause the
        # daemon would answer every request at once and hold all the replies
        end = time.monotonic() + 2
        # sanitizers keep freed memory in quarantine: allow for it there (all the replies would be 30 MB and more)
        bound = (20 if SAN else 8) * 1024
        while time.monotonic() < end:
            grown = vm_kib(sd.pid, "VmRSS") - base
            assert grown < bound, f"sparkd grew by {grown} KiB for a client that reads nothing"
            err, _ = sd.rpc("ping")  # and it serves others meanwhile
            assert err is None
        got = 0
        while got < n:
            m = c.recv(timeout=t(20))
            assert m is not None, f"closed after {got} replies"
            assert m[0] == 1 and m[1] == got + 1 and m[2] is None, m[:3]
            got += 1
    finally:
        c.close()

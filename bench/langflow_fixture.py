#!/usr/bin/python3
"""A local LangFlow for the workflow benchmark: one asyncio process that answers LangFlow's run API after a fixed
delay and counts what it sees, so the benchmark can show the fixture is not the bottleneck.

    POST /api/v1/run/<flow>?stream=false  -> after `delay` s, the reply tests/integration/sources.py gives
    GET  /_bench/stats                    -> {"inflight", "peak", "served", "area", "conns", "conns_peak",
                                              "max_lag_ms", "overshoot_ms_p99", "overshoot_ms_max", ...}
    POST /_bench/reset                    -> zero the counters (peak, served, area, lag, overshoot)
    POST /_bench/delay?s=2.0              -> change the delay

HTTP/1.1 with keep-alive, Content-Length bodies, `Expect: 100-continue` honoured: what libcurl and urllib send.
The stdlib has no asyncio HTTP server and aiohttp is not installed here; this is the smallest parser that serves
those two clients. `peak` is the most run requests held open at once; `area` integrates open requests over time
(area / seconds = mean in flight); `max_lag_ms` is the event loop's worst lateness on a 50 ms tick, and
`overshoot_ms_*` how late replies left after their delay: both near zero mean the fixture kept up.

Run: bench/langflow_fixture.py --delay 0.2   (prints "READY <port>" once listening)
"""
import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import urllib.parse
import urllib.request

RUN_PREFIX = "/api/v1/run/"


class Counters:
    def __init__(self, delay):
        self.delay = delay
        self.reset()
        self.conns = 0
        self.inflight = 0

    def reset(self):
        self.peak = 0
        self.served = 0
        self.errors = 0
        self.area = 0.0
        self.last = time.monotonic()
        self.max_lag = 0.0
        self.overshoot = []
        self.conns_peak = getattr(self, "conns", 0)

    def change(self, d):
        now = time.monotonic()
        self.area += self.inflight * (now - self.last)
        self.last = now
        self.inflight += d
        self.peak = max(self.peak, self.inflight)

    def stats(self):
        self.change(0)
        ov = sorted(self.overshoot)
        p99 = ov[min(len(ov) - 1, int(0.99 * (len(ov) - 1) + 0.5))] if ov else 0.0
        return {"inflight": self.inflight, "peak": self.peak, "served": self.served, "errors": self.errors,
                "area": self.area, "conns": self.conns, "conns_peak": self.conns_peak, "delay": self.delay,
                "max_lag_ms": self.max_lag * 1000, "overshoot_ms_p99": p99 * 1000,
                "overshoot_ms_max": (ov[-1] if ov else 0.0) * 1000, "pid": os.getpid()}


def reply_for(body):
    try:
        text = json.loads(body or b"{}").get("input_value")
    except ValueError:
        return 400, {"detail": "bad JSON"}
    return 200, {"session_id": "lf-session", "outputs": [{"inputs": {"input_value": text}, "outputs": [
        {"results": {"message": {"text": f"echo: {text}"}}}]}]}


class RunServer(asyncio.Protocol):
    """One connection. Requests are parsed from the bytes as they arrive and a run request's reply is a timer:
    asyncio's streams with a coroutine and a sleeping task per request cost the fixture about 0.18 ms of CPU per
    call, most of what the worker under test spends on one, and at a thousand calls in flight on two CPUs that
    made the fixture part of what was measured."""

    def __init__(self, c):
        self.c = c
        self.buf = b""
        self.tr = None
        self.waiting = False  # a run request waits for its delay: HTTP/1.1 answers in order, parse no further
        self.continued = False

    def connection_made(self, transport):
        self.tr = transport
        self.c.conns += 1
        self.c.conns_peak = max(self.c.conns_peak, self.c.conns)

    def connection_lost(self, exc):
        self.c.conns -= 1
        self.tr = None

    def data_received(self, data):
        self.buf += data
        self.parse()

    def parse(self):
        while not self.waiting and self.tr is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 1 << 20:
                    self.tr.close()
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
            hdrs = {}
            for line in lines[1:]:
                k, sep, v = line.partition(":")
                if sep:
                    hdrs[k.strip().lower()] = v.strip()
            try:
                blen = int(hdrs.get("content-length") or 0)
            except ValueError:
                self.tr.close()
                return
            if len(self.buf) < end + 4 + blen:
                if hdrs.get("expect", "").lower() == "100-continue" and not self.continued:
                    self.tr.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self.continued = True
                return
            self.continued = False
            body = self.buf[end + 4:end + 4 + blen]
            self.buf = self.buf[end + 4 + blen:]
            self.request(method, target, body, hdrs.get("connection", "").lower() == "close")

    def request(self, method, target, body, close):
        c = self.c
        path, _, query = target.partition("?")
        if method == "POST" and path.startswith(RUN_PREFIX):
            c.change(+1)
            self.waiting = True
            asyncio.get_running_loop().call_later(c.delay, self.run_done, time.monotonic(), c.delay, body, close)
            return
        status, obj = 404, {"detail": "Not Found"}
        if path == "/_bench/stats":
            status, obj = 200, c.stats()
        elif method == "POST" and path == "/_bench/reset":
            c.reset()
            status, obj = 200, {"ok": True}
        elif method == "POST" and path == "/_bench/delay":
            c.delay = float(urllib.parse.parse_qs(query)["s"][0])
            status, obj = 200, {"delay": c.delay}
        self.reply(status, obj, close)

    def run_done(self, t0, delay, body, close):
        c = self.c
        c.change(-1)
        c.overshoot.append(time.monotonic() - t0 - delay)
        status, obj = reply_for(body)
        c.served += 1
        if status != 200:
            c.errors += 1
        self.waiting = False
        if self.tr is None:  # the client went away while it waited
            return
        self.reply(status, obj, close)
        self.parse()

    def reply(self, status, obj, close):
        data = json.dumps(obj).encode()
        extra = "Connection: close\r\n" if close else ""
        self.tr.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode() + data)
        if close:
            self.tr.close()
            self.tr = None


async def lag_probe(c):
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.05)
        c.max_lag = max(c.max_lag, time.monotonic() - t - 0.05)


async def serve(delay, port):
    c = Counters(delay)
    srv = await asyncio.get_running_loop().create_server(lambda: RunServer(c), "127.0.0.1", port, backlog=4096)
    asyncio.ensure_future(lag_probe(c))
    print(f"READY {srv.sockets[0].getsockname()[1]}", flush=True)
    async with srv:
        await srv.serve_forever()


# ---- the benchmark's side ----

class Fixture:
    """The fixture process, started and queried by bench/workflow.py."""

    def __init__(self, delay):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--delay", str(delay)],
                                     stdout=subprocess.PIPE, text=True)
        line = self._readline(10.0)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"fixture did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _readline(self, timeout):
        import select
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if r else ""

    def _call(self, method, path):
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self):
        return self._call("GET", "/_bench/stats")

    def reset(self):
        self._call("POST", "/_bench/reset")

    def set_delay(self, s):
        self._call("POST", f"/_bench/delay?s={s}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def capacity(self, n, delay, timeout=60.0):
        """Hold n run requests open at once from an asyncio client; the fixture's own peak and lateness."""
        self.set_delay(delay)
        self.reset()

        async def one(i):
            r, w = await asyncio.open_connection("127.0.0.1", self.port)
            body = json.dumps({"input_value": f"cap {i}"}).encode()
            w.write(f"POST {RUN_PREFIX}cap?stream=false HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await w.drain()
            data = await r.read()
            w.close()
            return data.startswith(b"HTTP/1.1 200")

        async def all_():
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True),
                                          timeout)

        t0 = time.monotonic()
        try:
            oks = asyncio.run(all_())
        except asyncio.TimeoutError:
            oks = []
        secs = time.monotonic() - t0
        st = self.stats()
        return {"requests": n, "ok": sum(1 for x in oks if x is True), "secs": secs, "peak": st["peak"],
                "max_lag_ms": st["max_lag_ms"], "overshoot_ms_p99": st["overshoot_ms_p99"], "delay": delay}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(serve(a.delay, a.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())

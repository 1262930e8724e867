"""One spark-worker run alone (no sparkd) with sparkd's end of its fd-3 socketpair held by the test: the test
sends commands (common/command.h) and reads reports (common/report.h) as sparkd would."""

import json
import os
import signal
import socket
import subprocess

from harness import SAN, base_env, binary, san_reports, t, wait_for


def escape(s):
    """A string field as report.h escapes it: %XX for '%', bytes below 0x21 and 0x7f; "" is "-"."""
    if s == "":
        return "-"
    if s == "-":
        return "%2D"
    out = []
    for b in s.encode():
        out.append(f"%{b:02X}" if b in (0x25, 0x7f) or b < 0x21 else chr(b))
    return "".join(out)


def unescape(w):
    if w == "-":
        return ""
    raw = bytearray()
    i, b = 0, w.encode()
    while i < len(b):
        if b[i] == 0x25:
            raw.append(int(b[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(b[i])
            i += 1
    return raw.decode()


class Worker:
    """spark-worker --slots N on the test's redis; fd 3 is a SOCK_SEQPACKET socketpair whose other end is
    self.sock. Reports read meanwhile are kept in self.reports (lists of fields, unescaped on demand)."""

    def __init__(self, tmp_path, redis, slots=1, env=None, name="celery@test"):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.reports = []
        self.reqid = 0
        self.report_dir = tmp_path
        e = {"CELERY_BROKER_URL": redis.url(0), "CELERY_RESULT_BACKEND": redis.url(1),
             "CELERY_WORKER_MAX_TASKS_PER_CHILD": "0", "CELERY_WORKER_MAX_MEMORY_PER_CHILD": "0"}
        e.update(env or {})
        cfd = child.fileno()

        def as_fd3():
            if cfd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(cfd, 3)  # dup2 leaves the copy inheritable

        self.log = open(tmp_path / f"worker-{len(os.listdir(tmp_path))}.log", "wb")
        self.proc = subprocess.Popen([binary("spark-worker"), "--name", name, "--slots", str(slots)],
                                     env=base_env(e, report_dir=tmp_path), stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=as_fd3, close_fds=True,
                                     pass_fds=(3,) if cfd != 3 else ())
        child.close()
        self.sock.settimeout(0.05)
        self.wait_report("ready", t(10))

    # ---- reports
    def poll(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                return
            except OSError:
                return
            if not data:
                return
            for line in data.decode().split("\n"):
                if line:
                    self.reports.append(line.split(" "))

    def wait_report(self, kind, timeout, pred=None):
        def found():
            self.poll()
            for r in self.reports:
                if r[0] == kind and (pred is None or pred(r)):
                    return r
            return None
        return wait_for(found, timeout, what=f"report {kind}")

    # ---- commands
    def send(self, *fields):
        self.sock.send(" ".join(fields).encode())

    def revoke(self, ids, terminate=False, sig=""):
        self.send("revoke", "1" if terminate else "0", escape(sig), *[escape(i) for i in ids])

    def query(self, what, *args, timeout=None):
        """The answers to a query, as parsed JSON items, once 'answered' came."""
        self.reqid += 1
        rid = str(self.reqid)
        self.send("query", rid, escape(what), *[escape(a) for a in args])
        done = self.wait_report("answered", timeout or t(5), lambda r: r[1] == rid)
        items = [json.loads(unescape(r[2])) for r in self.reports if r[0] == "answer" and r[1] == rid]
        assert len(items) == int(done[2]), (items, done)
        return items

    # ---- the end
    def stop(self, timeout=None):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout or t(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()
        if SAN:
            reports = san_reports(self.report_dir)
            assert not reports, "\n".join(reports)
        return self.proc.returncode

    def text(self):
        self.log.flush()
        return open(self.log.name, errors="replace").read()

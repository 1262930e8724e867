"""Small local HTTP servers that speak the workflow source APIs automagik-spark calls
(reference/automagik-spark.md): LangFlow, automagik-agents and automagik-hive (AgentOS v2).

Each server records every request it sees (method, path, query, headers, body) and can be told to answer an
error status or to be slow:

    with LangFlowServer() as lf:
        lf.fail(500)            # every run answers 500 from now on; lf.fail(500, times=2) for the next two only
        lf.delay = 3.0          # seconds before answering a run
        lf.url                  # http://127.0.0.1:PORT
        lf.runs()               # the recorded run requests
"""
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import time


class Request:
    def __init__(self, method, path, query, headers, body):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # dict with lower-case names
        self.body = body

    def json(self):
        return json.loads(self.body.decode())

    def form(self):
        return {k: v[0] for k, v in urllib.parse.parse_qs(self.body.decode(), keep_blank_values=True).items()}

    def __repr__(self):
        return f"<{self.method} {self.path}>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _handle(self, method):
        srv = self.server.owner
        u = urllib.parse.urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        req = Request(method, urllib.parse.unquote(u.path), dict(urllib.parse.parse_qsl(u.query)),
                      {k.lower(): v for k, v in self.headers.items()}, body)
        with srv.lock:
            srv.requests.append(req)
        status, reply = srv.answer(req)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


class SourceServer:
    """Base: override route(req) -> (status, json-able or bytes)."""

    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()
        self.delay = 0.0
        self._fail_status = None
        self._fail_times = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def fail(self, status, times=None):
        """Answer run requests with status (all of them, or the next `times`); fail(None) to stop."""
        with self.lock:
            self._fail_status = status
            self._fail_times = times

    def reset(self):
        with self.lock:
            self.requests.clear()
        self.fail(None)
        self.delay = 0.0

    def _failing(self):
        with self.lock:
            if self._fail_status is None:
                return None
            if self._fail_times is not None:
                if self._fail_times <= 0:
                    return None
                self._fail_times -= 1
            return self._fail_status

    def is_run(self, req):
        return req.method == "POST"

    def answer(self, req):
        if self.is_run(req):
            st = self._failing()
            if st is not None:
                return st, {"detail": f"simulated {st}"}
            if self.delay:
                time.sleep(self.delay)
        return self.route(req)

    def runs(self):
        with self.lock:
            return [r for r in self.requests if self.is_run(r)]


class LangFlowServer(SourceServer):
    """POST /api/v1/run/{flow}?stream=false -> a LangFlow run reply echoing the input."""

    def __init__(self, flows=("flow-1",), reply=None):
        super().__init__()
        self.flows = set(flows)
        self.reply = reply  # a fixed reply, or None for the default echo

    def route(self, req):
        p = "/api/v1/run/"
        if req.method == "POST" and req.path.startswith(p):
            flow = req.path[len(p):]
            if flow not in self.flows:
                return 404, {"detail": f"Flow {flow} not found"}
            if self.reply is not None:
                return 200, self.reply
            text = req.json().get("input_value")
            return 200, {"session_id": "lf-session", "outputs": [{"inputs": {"input_value": text}, "outputs": [
                {"results": {"message": {"text": f"echo: {text}"}}}]}]}
        return 404, {"detail": "Not Found"}


class AgentsServer(SourceServer):
    """POST /api/v1/agent/{name}/run -> {"message", "session_id", "success", "tool_calls", "usage"}."""

    def __init__(self, agents=("simple",)):
        super().__init__()
        self.agents = set(agents)

    def route(self, req):
        parts = req.path.strip("/").split("/")
        if req.method == "POST" and len(parts) == 5 and parts[:3] == ["api", "v1", "agent"] and parts[4] == "run":
            if parts[3] not in self.agents:
                return 404, {"detail": f"Agent {parts[3]} not found"}
            msg = req.json().get("message_content")
            return 200, {"message": f"agent reply: {msg}", "session_id": "ag-session", "success": True,
                         "tool_calls": [], "usage": {"total_tokens": 7}}
        return 404, {"detail": "Not Found"}


class HiveServer(SourceServer):
    """AgentOS v2: GET /agents /teams /workflows; form POST /{kind}/{id}/runs; GET /api/v1/health."""

    def __init__(self, agents=("hive-agent",), teams=("hive-team",), workflows=("hive-wf",)):
        super().__init__()
        self.agents, self.teams, self.workflows = list(agents), list(teams), list(workflows)

    def route(self, req):
        if req.method == "GET":
            if req.path == "/api/v1/health":
                return 200, {"status": "success", "utc": "2025-01-01T00:00:00Z"}
            if req.path == "/agents":
                return 200, [{"agent_id": a, "name": a.title()} for a in self.agents]
            if req.path == "/teams":
                return 200, [{"team_id": t, "name": t.title(), "members": []} for t in self.teams]
            if req.path == "/workflows":
                return 200, [{"workflow_id": w, "name": w.title()} for w in self.workflows]
            return 404, {"detail": "Not Found"}
        parts = req.path.strip("/").split("/")
        if len(parts) != 3 or parts[2] != "runs":
            return 404, {"detail": "Not Found"}
        kind, ident = parts[0], parts[1]
        msg = req.form().get("message")
        if kind == "agents" and ident in self.agents:
            return 200, {"run_id": "r1", "agent_id": ident, "session_id": req.form().get("session_id"),
                         "content": f"hive agent: {msg}", "status": "RUNNING"}
        if kind == "teams" and ident in self.teams:
            return 200, {"run_id": "r2", "team_id": ident, "status": "completed",
                         "coordinator_response": {"content": f"team lead: {msg}"},
                         "member_responses": [{"agent_id": "m1", "response": "member one"}]}
        if kind == "workflows" and ident in self.workflows:
            return 200, {"run_id": "r3", "workflow_id": ident, "status": "completed",
                         "final_output": f"workflow output: {msg}"}
        return 404, {"detail": f"{kind} {ident} not found"}

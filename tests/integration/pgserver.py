"""A private PostgreSQL server for tests and `make run`.

Debian's initdb and pg_ctl refuse to run as root, so when we are root they run as the `postgres` user
(runuser) in a data directory owned by it. The server listens on 127.0.0.1 and a Unix socket inside the data
directory, with trust authentication; nothing outside the temporary directory is touched.

    with PgServer() as pg:          # or pg = PgServer(); pg.start(); ...; pg.stop()
        print(pg.url)               # postgresql://postgres@127.0.0.1:PORT/spark

Command line (used by scripts/run.sh): python3 pgserver.py start DIR  -> prints the URL, leaves it running
                                       python3 pgserver.py stop DIR
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile

PG_USER = "postgres"


def pg_bindir():
    """The newest installed server's bin directory (Debian layout), or where pg_ctl is on PATH."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return env
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if dirs:
        return dirs[-1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return os.path.dirname(pg_ctl)
    raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, base_dir=None, dbname="spark", port=None):
        self.owned_dir = base_dir is None
        self.base = base_dir or tempfile.mkdtemp(prefix="spark-pg-")
        self.data = os.path.join(self.base, "data")
        self.sock = os.path.join(self.base, "sock")
        self.dbname = dbname
        self.port = port or free_port()
        self.bindir = pg_bindir()
        self.as_root = os.geteuid() == 0
        self.url = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, args, **kw):
        if self.as_root:
            args = ["runuser", "-u", PG_USER, "--"] + args
        return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)

    def _chown(self, path):
        if self.as_root:
            pw = pwd.getpwnam(PG_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self, timeout=30):
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)  # the postgres user must reach its directories
        for d in (self.data, self.sock):
            os.makedirs(d, exist_ok=True)
            self._chown(d)
        os.chmod(self.data, 0o700)
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            self._run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-A", "trust", "-U", PG_USER,
                       "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        log = os.path.join(self.base, "postgres.log")
        if not os.path.exists(log):
            open(log, "a").close()
            self._chown(log)
        opts = (f"-k {self.sock} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off")
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", log, "-o", opts, "-w",
                   "-t", str(timeout), "start"])
        self._createdb()
        return self

    def _createdb(self):
        psql = [os.path.join(self.bindir, "psql"), "-h", self.sock, "-p", str(self.port), "-U", PG_USER, "-d",
                "postgres", "-tAc"]
        out = self._run(psql + [f"SELECT 1 FROM pg_database WHERE datname = '{self.dbname}'"]).stdout
        if b"1" not in out:
            self._run([os.path.join(self.bindir, "createdb"), "-h", self.sock, "-p", str(self.port), "-U",
                       PG_USER, self.dbname])

    def stop(self, remove=True):
        try:
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass
        if remove and self.owned_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    # For tests of "database down": stop and start again on the same port and data.
    def pause(self):
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"])

    def resume(self):
        self.start()

    def connect(self):
        import psycopg2
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        return conn

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv):
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print("usage: pgserver.py start|stop DIR", file=sys.stderr)
        return 2
    base = os.path.abspath(argv[2])
    port_file = os.path.join(base, "port")
    if argv[1] == "start":
        port = int(open(port_file).read()) if os.path.exists(port_file) else None
        pg = PgServer(base_dir=base, port=port)
        pg.start()
        with open(port_file, "w") as f:
            f.write(str(pg.port))
        print(pg.url)
        return 0
    if not os.path.exists(port_file):
        return 0
    PgServer(base_dir=base, port=int(open(port_file).read())).stop(remove=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# ---- seeding automagik-spark rows for workflow tests ----

def seed_source(conn, source_type, url, api_key, fernet_key, name=None):
    """A workflow_sources row whose encrypted_api_key is a real Fernet token (Python cryptography)."""
    import uuid
    from cryptography.fernet import Fernet
    sid = str(uuid.uuid4())
    token = Fernet(fernet_key).encrypt(api_key.encode()).decode() if api_key is not None else ""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO workflow_sources (id, name, source_type, url, encrypted_api_key, status,"
                    " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, 'active', now(), now())",
                    (sid, name or source_type, source_type, url, token))
    return sid


def seed_workflow(conn, source_id, remote_flow_id, source_type="langflow", name="test flow"):
    import uuid
    wid = str(uuid.uuid4())
    with conn.cursor() as cur:
        cur.execute("INSERT INTO workflows (id, name, source, remote_flow_id, workflow_source_id, created_at,"
                    " updated_at) VALUES (%s, %s, %s, %s, %s, now(), now())",
                    (wid, name, source_type, remote_flow_id, source_id))
    return wid


def seed_schedule(conn, workflow_id, schedule_type="interval", expr="1m", params=None, input_data=None,
                  status="active"):
    import json
    import uuid
    sched = str(uuid.uuid4())
    with conn.cursor() as cur:
        cur.execute("INSERT INTO schedules (id, workflow_id, schedule_type, schedule_expr, params, input_data,"
                    " status, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now(), now())",
                    (sched, workflow_id, schedule_type, expr, json.dumps(params) if params is not None else None,
                     input_data, status))
    return sched


def seed_pending_task(conn, workflow_id, input_text="manual input"):
    import json
    import uuid
    tid = str(uuid.uuid4())
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (id, workflow_id, status, input_data, tries, max_retries, created_at,"
                    " updated_at) VALUES (%s, %s, 'pending', %s, 0, 3, now(), now())",
                    (tid, workflow_id, json.dumps(input_text)))
    return tid


def task_rows(conn, schedule_id=None, task_id=None):
    """Task rows as dicts (input_data/output_data as psycopg2 decodes json)."""
    q = ("SELECT id::text, workflow_id::text, schedule_id::text, status, input_data, output_data, error, tries,"
         " max_retries, next_retry_at, created_at, started_at, finished_at, updated_at FROM tasks")
    args = ()
    if schedule_id:
        q += " WHERE schedule_id = %s"
        args = (schedule_id,)
    elif task_id:
        q += " WHERE id = %s"
        args = (task_id,)
    with conn.cursor() as cur:
        cur.execute(q + " ORDER BY created_at", args)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def task_log_lines(conn, task_id):
    with conn.cursor() as cur:
        cur.execute("SELECT level, message FROM task_logs WHERE task_id = %s ORDER BY created_at", (task_id,))
        return cur.fetchall()

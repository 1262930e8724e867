"""A private PostgreSQL server for the workflow benchmark (the same recipe as tests/integration/pgserver.py, kept
here so bench/ does not depend on the test tree).

Debian's initdb and pg_ctl refuse to run as root, so as root they run as the `postgres` user in a data directory
owned by it. Loopback and a Unix socket in the data directory, trust authentication, durability off (fsync,
synchronous_commit, full_page_writes): the benchmark measures the workers, not the disk. max_connections is raised
so that the engine's own connection use shows, not the server's default cap of 100.
"""
import glob
import os
import pwd
import shutil
import subprocess

from common import free_port

PG_USER = "postgres"


def pg_bindir():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if dirs:
        return dirs[-1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return os.path.dirname(pg_ctl)
    raise RuntimeError("PostgreSQL server binaries not found (make deps installs them)")


class PgServer:
    def __init__(self, base, dbname="spark", max_connections=1200):
        self.base = base
        self.data = os.path.join(base, "data")
        self.sock = os.path.join(base, "sock")
        self.dbname = dbname
        self.port = free_port()
        self.bindir = pg_bindir()
        self.as_root = os.geteuid() == 0
        self.max_connections = max_connections
        self.url = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, args):
        if self.as_root:
            args = ["runuser", "-u", PG_USER, "--"] + args
        return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    def _chown(self, path):
        if self.as_root:
            pw = pwd.getpwnam(PG_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self):
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)  # the postgres user must reach its directories
        for d in (self.data, self.sock):
            os.makedirs(d, exist_ok=True)
            self._chown(d)
        os.chmod(self.data, 0o700)
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-A", "trust", "-U", PG_USER, "-E", "UTF8",
                   "--locale=C.UTF-8", "--no-sync"])
        log = os.path.join(self.base, "postgres.log")
        open(log, "a").close()
        self._chown(log)
        opts = (f"-k {self.sock} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections={self.max_connections}")
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", log, "-o", opts, "-w", "-t", "60",
                   "start"])
        try:
            self._run([os.path.join(self.bindir, "createdb"), "-h", self.sock, "-p", str(self.port), "-U", PG_USER,
                       self.dbname])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        try:
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass

    def connect(self):
        import psycopg2
        conn = psycopg2.connect(self.url, application_name="bench", options="-c statement_timeout=30000")
        conn.autocommit = True
        return conn

"""`make run` (scripts/run.sh): private Redis and PostgreSQL under the run directory, sparkd in the foreground,
the README's second-terminal check shows it Active (issue 2; the PostgreSQL part grows with issue 3)."""

import os
import shutil
import signal
import subprocess

import pytest

from harness import (REPO, BIN_DIR, CtlResult, base_env, free_port, kill_pids, make_public_tmpdir, pid_alive,
                     pids_with_env, san_reports, t, wait_for, wait_pid_gone)
import uuid


def read_environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(e.split("=", 1) for e in f.read().decode(errors="replace").split("\0") if "=" in e)


@pytest.fixture
def rundir():
    d = make_public_tmpdir("spark-run-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_make_run_private_servers_and_second_terminal_check(rundir, tmp_path):
    redis_port, pg_port = free_port(), free_port()
    test_id = uuid.uuid4().hex
    env = base_env({"SPARK_RUN_DIR": str(rundir / ".run"), "SPARK_RUN_REDIS_PORT": redis_port,
                    "SPARK_RUN_PG_PORT": pg_port, "SPARK_TEST_ID": test_id}, report_dir=tmp_path)
    env.pop("SPARK_ENV_FILE")  # as a user runs it: no env file in the working directory
    run = rundir / ".run"
    sock = run / "sparkd.sock"
    sparkctl = str(BIN_DIR / "sparkctl")

    def start():
        out = open(tmp_path / "run.out", "ab")
        return subprocess.Popen(["sh", str(REPO / "scripts" / "run.sh"), str(BIN_DIR)], env=env, cwd=str(rundir),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def status(*args, e=None):
        cp = subprocess.run([sparkctl, *args, "status"], capture_output=True, text=True, timeout=t(20),
                            env=e or base_env(report_dir=tmp_path))
        return CtlResult(cp)

    proc = start()
    try:
        def active():
            assert proc.poll() is None, (tmp_path / "run.out").read_text()
            r = status("--socket", str(sock))
            return r.rc == 0 and "Status: Active" in r.out
        wait_for(active, t(90), interval=0.2, what="make run to come up Active")
        log = (tmp_path / "run.out").read_text()
        assert "status" in log and "sparkctl" in log and "sparkd.sock" in log, log
        # the second-terminal check also works through $SPARK_SOCKET
        r = status(e=base_env({"SPARK_SOCKET": str(sock)}, report_dir=tmp_path))
        assert r.rc == 0 and "Status: Active" in r.out, r

        # the servers are private, under the run directory, and sparkd was given them
        redis_pid = int((run / "redis" / "redis.pid").read_text())
        assert pid_alive(redis_pid)
        assert (run / "pg" / "data" / "PG_VERSION").exists()
        denv = read_environ(proc.pid)  # run.sh exec'd sparkd: same pid
        assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath(BIN_DIR / "sparkd")
        assert denv["CELERY_BROKER_URL"] == f"redis://127.0.0.1:{redis_port}/0"
        assert f"127.0.0.1:{pg_port}/" in denv["DATABASE_URL"]
        import psycopg2
        with psycopg2.connect(denv["DATABASE_URL"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        assert (run / "log").is_dir()

        r = subprocess.run([sparkctl, "--socket", str(sock), "stop"], capture_output=True, text=True,
                           timeout=t(60), env=base_env(report_dir=tmp_path))
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=t(20)) == 0

        # a second run reuses the running Redis
        proc = start()
        wait_for(active, t(60), interval=0.2, what="the second make run")
        assert int((run / "redis" / "redis.pid").read_text()) == redis_pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=t(30)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["sh", str(REPO / "scripts" / "run.sh"), "--stop-servers"], env=env, cwd=str(rundir),
                       capture_output=True, timeout=t(60))
        for _ in range(3):
            left = pids_with_env(f"SPARK_TEST_ID={test_id}")
            if not left:
                break
            kill_pids(left)
            for p in left:
                wait_pid_gone(p, 5)
    reports = san_reports(tmp_path)
    assert not reports, "\n".join(reports)

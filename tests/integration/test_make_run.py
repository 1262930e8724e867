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


def end_run(proc, rundir, env, test_id):
    """A run's teardown: sparkd, the private servers, and every process carrying the test's marker."""
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
        end_run(proc, rundir, env, test_id)
    reports = san_reports(tmp_path)
    assert not reports, "\n".join(reports)


# ---------------------------------------------------------------------------------------------------------------
# what run.sh finds on its ports (issue 9 item 9): a server it did not start is named, never used


def run_sh(rundir, env, *args, timeout=None):
    return subprocess.run(["sh", str(REPO / "scripts" / "run.sh"), *args], env=env, cwd=str(rundir),
                          capture_output=True, text=True, timeout=timeout or t(120))


def redis_info(port, section="server"):
    import redis
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).info(section)


@pytest.fixture
def migrated_db(postgres):
    cp = subprocess.run([str(BIN_DIR / "spark-worker"), "--migrate"], capture_output=True, text=True,
                        env=base_env({"DATABASE_URL": postgres.url}), timeout=t(30))
    assert cp.returncode == 0, cp.stderr
    return postgres.url


def test_given_redis_port_held_by_a_foreign_redis_stops_the_run_naming_it(rundir, tmp_path, redis_factory):
    foreign = redis_factory()
    env = base_env({"SPARK_RUN_DIR": str(rundir / ".run"), "SPARK_RUN_REDIS_PORT": foreign.port,
                    "SPARK_RUN_PG_PORT": free_port()}, report_dir=tmp_path)
    try:
        r = run_sh(rundir, env, str(BIN_DIR))
        assert r.returncode == 1, r
        line = f"port {foreign.port} (SPARK_RUN_REDIS_PORT) is taken by another Redis (pid {foreign.pid}, " \
               "not started by this run)"
        assert line in r.stderr, r.stderr
        assert "started a private Redis" not in r.stderr and "sparkd" not in r.stderr.split(line)[1], r.stderr
        # nothing of ours runs, and the foreign server was not written to
        assert not (rundir / ".run" / "redis" / "redis.pid").exists() or not pid_alive(
            int((rundir / ".run" / "redis" / "redis.pid").read_text()))
        assert foreign.client().dbsize() == 0
    finally:
        run_sh(rundir, env, "--stop-servers", timeout=t(60))


def test_given_pg_port_held_by_a_foreign_postgresql_stops_the_run_naming_it(rundir, tmp_path, postgres):
    env = base_env({"SPARK_RUN_DIR": str(rundir / ".run"), "SPARK_RUN_REDIS_PORT": free_port(),
                    "SPARK_RUN_PG_PORT": postgres.port}, report_dir=tmp_path)
    try:
        r = run_sh(rundir, env, str(BIN_DIR))
        assert r.returncode == 1, r
        assert f"port {postgres.port} (SPARK_RUN_PG_PORT) is taken by another PostgreSQL (data directory " \
               f"{os.path.realpath(postgres.data)}, not started by this run)" in r.stderr, r.stderr
        assert "started a private PostgreSQL" not in r.stderr, r.stderr
    finally:
        run_sh(rundir, env, "--stop-servers", timeout=t(60))


def test_default_redis_port_6390_held_by_a_foreign_redis_is_named_and_a_free_port_used(rundir, tmp_path,
                                                                                      migrated_db):
    from harness import RedisServer
    try:
        foreign = RedisServer(tmp_path / "foreign", port=6390).start()
    except RuntimeError:
        pytest.skip("port 6390 is not free on this machine")
    if foreign.port != 6390:
        foreign.stop()
        pytest.skip("port 6390 is not free on this machine")
    test_id = uuid.uuid4().hex
    run = rundir / ".run"
    env = base_env({"SPARK_RUN_DIR": str(run), "DATABASE_URL": migrated_db, "SPARK_TEST_ID": test_id},
                   report_dir=tmp_path)
    env.pop("SPARK_ENV_FILE")
    out_path = tmp_path / "run.out"
    sock = run / "sparkd.sock"

    def start():
        return subprocess.Popen(["sh", str(REPO / "scripts" / "run.sh"), str(BIN_DIR)], env=env, cwd=str(rundir),
                                stdout=open(out_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def active(proc):
        assert proc.poll() is None, out_path.read_text()
        cp = subprocess.run([str(BIN_DIR / "sparkctl"), "--socket", str(sock), "status"], capture_output=True,
                            text=True, timeout=t(20), env=base_env(report_dir=tmp_path))
        return cp.returncode == 0 and "Status: Active" in cp.stdout

    proc = start()
    try:
        wait_for(lambda: active(proc), t(60), interval=0.2, what="make run Active beside the foreign Redis")
        log = out_path.read_text()
        assert f"port 6390 is taken by another Redis (pid {foreign.pid}, not started by this run): trying 6391" \
            in log, log
        port = int((run / "redis" / "port").read_text())
        assert port != 6390 and f"started a private Redis on 127.0.0.1:{port}" in log, log
        # the server sparkd was given is the one run.sh started: its process is the pid file's
        assert read_environ(proc.pid)["CELERY_BROKER_URL"] == f"redis://127.0.0.1:{port}/0"
        assert redis_info(port)["process_id"] == int((run / "redis" / "redis.pid").read_text())
        # and no worker talks to the foreign one: its only client is this check
        assert redis_info(6390, "clients")["connected_clients"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=t(30)) == 0

        # the next run finds its own server on the remembered port, the foreign one still on 6390
        proc = start()
        wait_for(lambda: active(proc), t(60), interval=0.2, what="the second make run")
        assert f"reusing the private Redis on 127.0.0.1:{port}" in out_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=t(30)) == 0
    finally:
        end_run(proc, rundir, env, test_id)
        foreign.stop()
    reports = san_reports(tmp_path)
    assert not reports, "\n".join(reports)

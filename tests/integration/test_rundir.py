"""Safe runtime directories (issue 9 item 4): the /tmp/spark-UID fallback is created 0700 and refused when it is a
symbolic link, another user's, or writable by group or others; the socket's and pid file's directories get the same
check. sparkd runs as a made-up uid (no account needed) so that the fallback is the one it uses."""

import os
import shutil
import signal
import stat
import subprocess

import pytest

from harness import base_env, make_public_tmpdir, t, wait_for

UID = 20710
FALLBACK = f"/tmp/spark-{UID}"


def as_uid():
    os.setgroups([])
    os.setgid(UID)
    os.setuid(UID)


@pytest.fixture
def env(redis):
    logs = make_public_tmpdir()
    os.chown(logs, UID, UID)
    e = base_env({"CELERY_BROKER_URL": redis.url(0), "SPARK_LOG_DIR": str(logs)})
    for k in ("SPARK_SOCKET", "SPARK_PID_FILE", "XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        e.pop(k, None)
    clear_fallback()
    yield e
    clear_fallback()
    shutil.rmtree(logs, ignore_errors=True)


def clear_fallback():
    if os.path.islink(FALLBACK) or os.path.isfile(FALLBACK):
        os.unlink(FALLBACK)
    elif os.path.isdir(FALLBACK):
        shutil.rmtree(FALLBACK)


def sparkd(env, timeout=None):
    """Run sparkd as UID; a refusal ends it at once: (exit code, stderr lines)."""
    from harness import binary
    p = subprocess.run([binary("sparkd"), "--workers", "1"], env=env, capture_output=True, text=True,
                       timeout=timeout or t(20), preexec_fn=as_uid, cwd="/")
    return p.returncode, [l for l in p.stderr.splitlines() if l.strip()]


def stop(p):
    """A warm stop of the sparkd we started (its workers go with it), SIGKILL only if it hangs."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=t(20))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=t(10))


def refused(env, *words):
    rc, lines = sparkd(env)
    assert rc == 1 and len(lines) == 1, (rc, lines)
    for w in words:
        assert w in lines[0], lines
    return lines[0]


def test_fallback_is_created_private(env):
    from harness import binary
    p = subprocess.Popen([binary("sparkd"), "--workers", "1"], env=env, preexec_fn=as_uid, cwd="/",
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(f"{FALLBACK}/sparkd.sock") or p.poll() is not None, t(20),
                 what="sparkd's socket in the fallback directory")
        assert p.poll() is None, p.stderr.read()
        st = os.lstat(FALLBACK)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == UID and stat.S_IMODE(st.st_mode) == 0o700
        assert os.path.exists(f"{FALLBACK}/sparkd.pid")
    finally:
        stop(p)


def test_fallback_symlink_is_refused(env, tmp_path):
    os.symlink(str(tmp_path), FALLBACK)
    refused(env, FALLBACK, "symbolic link")


def test_fallback_of_another_user_is_refused(env):
    os.mkdir(FALLBACK, 0o700)  # root's: another user to UID
    refused(env, FALLBACK, "owned by uid 0", f"not by uid {UID}")


def test_fallback_writable_by_others_is_refused(env):
    os.mkdir(FALLBACK)
    os.chown(FALLBACK, UID, UID)
    os.chmod(FALLBACK, 0o777)
    refused(env, FALLBACK, "writable by group or others", "0777")


@pytest.mark.parametrize("var", ["SPARK_SOCKET", "SPARK_PID_FILE"])
def test_socket_and_pid_file_directories_get_the_same_check(env, var):
    d = make_public_tmpdir()
    try:
        for name, mode in (("open", 0o777), ("group", 0o770)):
            sub = d / name
            sub.mkdir()
            os.chown(sub, UID, UID)
            os.chmod(sub, mode)
            e = dict(env, **{var: str(sub / ("sparkd.sock" if var == "SPARK_SOCKET" else "sparkd.pid"))})
            what = "socket" if var == "SPARK_SOCKET" else "pid file"
            refused(e, f"{what} directory {sub}", "writable by group or others")
        # a sticky, root-owned shared directory (like /tmp) is allowed
        shared = d / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        e = dict(env, **{var: str(shared / ("sparkd.sock" if var == "SPARK_SOCKET" else "sparkd.pid"))})
        from harness import binary
        p = subprocess.Popen([binary("sparkd"), "--workers", "1"], env=e, preexec_fn=as_uid, cwd="/",
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            made = shared / ("sparkd.sock" if var == "SPARK_SOCKET" else "sparkd.pid")
            wait_for(lambda: made.exists() or p.poll() is not None, t(20), what=f"{made}")
            assert p.poll() is None, p.stderr.read()
        finally:
            stop(p)
    finally:
        shutil.rmtree(d, ignore_errors=True)

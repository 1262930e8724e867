"""`make install PREFIX=DIR` installs the four names and they work from there (issue 2)."""

import os
import shutil
import subprocess

import pytest

from harness import REPO, SAN, Sparkd, t, wait_for


def test_make_install_prefix_and_run_from_there(tmp_path, redis, celery):
    if shutil.which("make") is None:
        pytest.fail("make is required", pytrace=False)
    prefix = tmp_path / "prefix"
    cmd = ["make", "-C", str(REPO), "--no-print-directory", "install", f"PREFIX={prefix}"]
    if SAN:
        cmd.append("SAN=1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=t(600))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    installed = {
        "sparkd": prefix / "sbin" / "sparkd",
        "spark-worker": prefix / "sbin" / "spark-worker",
        "sparkctl": prefix / "bin" / "sparkctl",
        "automagik-spark": prefix / "bin" / "automagik-spark",
    }
    for name, p in installed.items():
        assert p.exists() and os.access(p, os.X_OK), f"{name} not installed at {p}"
    assert os.path.realpath(installed["automagik-spark"]) == os.path.realpath(installed["sparkctl"])

    # run the installed programs, found the way an operator finds them: on PATH
    sd = Sparkd(tmp_path, {"CELERY_BROKER_URL": redis.url(0), "CELERY_RESULT_BACKEND": redis.url(1),
                           "PATH": f"{prefix / 'bin'}:{prefix / 'sbin'}:/usr/bin:/bin"}, bin_dir=prefix / "bin")
    try:
        v = sd.ctl("--version")
        assert v.rc == 0 and v.out.strip(), v
        r = sd.ctl("workers", "start", "--workers", "1", "--concurrency", "1", prog="automagik-spark")
        assert r.rc == 0, f"{r!r}\n{sd.tail()}"
        sd.pid = sd._read_pid()
        exe = os.path.realpath(f"/proc/{sd.pid}/exe")
        assert exe == os.path.realpath(installed["sparkd"]), f"the installed sparkd must run, not {exe}"
        worker = sd.processes()[0]["pid"]
        assert os.path.realpath(f"/proc/{worker}/exe") == os.path.realpath(installed["spark-worker"])
        app = celery()
        assert app.send_task("spark.noop", args=["installed"]).get(timeout=t(20)) == "installed"
        s = sd.ctl("status")
        assert s.rc == 0 and "Status: Active" in s.out, s
        # the result is published before the worker's report of it reaches sparkd: wait for the count
        s = wait_for(lambda: (lambda s: s if "Tasks Processed: 1" in s.out else None)(
            sd.ctl("workers", "status", prog="automagik-spark")), t(5), what="Tasks Processed: 1")
        assert s.rc == 0, s
        st = sd.ctl("stop")
        assert st.rc == 0, st
        assert sd.ctl("status").rc == 3
    finally:
        reports = sd.cleanup()
    assert not reports, "\n".join(reports)

"""Issue 4 item 7, operator details: colour only on a terminal and never with NO_COLOR; SIGHUP reopens the log."""

import os
import pty
import select
import signal
import subprocess

from harness import t, wait_for


def run_on_pty(argv, env, timeout):
    """Run argv with stdout on a pseudo-terminal; return what it printed."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, env=env, stdout=slave, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    try:
        while True:
            r, _, _ = select.select([master], [], [], timeout)
            if not r:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        p.wait(timeout=timeout)
    return p.returncode, out.decode("utf-8", "replace")


def test_colour_only_on_a_terminal_and_never_with_no_color(spark):
    sd = spark()
    sd.start(workers=1, concurrency=1)
    argv = [str(sd.bin_dir / "sparkctl"), "--socket", str(sd.socket), "status"]
    env = {k: v for k, v in sd.env.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm"
    rc, out = run_on_pty(argv, env, t(10))
    assert rc == 0 and "Status: " in out, out
    assert "\x1b[" in out, f"no colour on a terminal: {out!r}"
    rc, out = run_on_pty(argv, dict(env, NO_COLOR="1"), t(10))
    assert rc == 0 and "Status: " in out, out
    assert "\x1b[" not in out, f"colour despite NO_COLOR: {out!r}"
    piped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=t(10))
    assert piped.returncode == 0 and "Status: Active" in piped.stdout
    assert "\x1b[" not in piped.stdout, f"colour in a pipe: {piped.stdout!r}"


def test_sighup_reopens_the_log_file(spark, celery):
    sd = spark()
    sd.start(workers=1, concurrency=1)
    log = sd.log_dir / "sparkd.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 0, t(10), what="sparkd.log written")
    rotated = sd.log_dir / "sparkd.log.rotated"
    os.rename(log, rotated)  # what logrotate does before its postrotate HUP
    os.kill(sd.pid, signal.SIGHUP)
    wait_for(lambda: log.exists(), t(10), what="sparkd.log reopened after SIGHUP")
    size_rotated = rotated.stat().st_size
    app = celery()
    assert app.send_task("spark.noop", args=["after-hup"]).get(timeout=t(20)) == "after-hup"
    wait_for(lambda: "after-hup" in log.read_text(errors="replace"), t(10), what="new lines in the new file")
    assert rotated.stat().st_size == size_rotated, "the rotated file kept growing after SIGHUP"
    assert sd.running()

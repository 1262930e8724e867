"""Passwords in CELERY_BROKER_URL / CELERY_RESULT_BACKEND never show (issue 4, DESIGN §5): not in `sparkctl
status` (plain, --verbose, --json), not in `logs` (any level, --json), not in the log files, not on command lines
other users can read, not in configuration error messages.

The private redis gets its password with CONFIG SET requirepass right after it starts (the harness's RedisServer
takes no extra arguments); that is the same server state as `--requirepass`, and the test checks that a client
without the password is refused.
"""

import gc
import json
import os
import signal
import subprocess
import uuid
from urllib.parse import quote

import pytest

from harness import celery_app, t, wait_for


def make_password():
    # distinctive, and with a character that must be percent-encoded in the URL ("/" -> %2F)
    return f"Pw{uuid.uuid4().hex[:10]}/Sk{uuid.uuid4().hex[:6]}"


def forms(pw):
    """The forms a leak could take: as typed in the URL, decoded, and the distinctive pieces of each."""
    enc = quote(pw, safe="")
    return {pw, enc, pw.split("/")[0], pw.split("/")[1]}


def assert_clean(what, text, pw):
    for f in forms(pw):
        assert f not in text, f"the password ({f!r}) shows in {what}:\n{text[-3000:]}"


@pytest.fixture
def secured_redis(redis_factory):
    srv = redis_factory()
    pw = make_password()
    srv.client().config_set("requirepass", pw)
    import redis as redis_mod
    with pytest.raises(redis_mod.exceptions.AuthenticationError):
        srv.client().ping()  # no password: refused
    assert redis_mod.Redis(host="127.0.0.1", port=srv.port, password=pw).ping()
    return srv, pw


def url(srv, pw, db):
    return f"redis://:{quote(pw, safe='')}@127.0.0.1:{srv.port}/{db}"


def gather(sd, live=True):
    """Everything an operator (or another user) can see: sparkctl output, raw RPC replies, log files, argv."""
    seen = {}
    for args in (("status",), ("status", "--verbose"), ("status", "--json"), ("status", "--verbose", "--json"),
                 ("logs",), ("logs", "-n", "10000"), ("logs", "--level", "debug", "-n", "10000"),
                 ("logs", "--json", "-n", "10000"), ("logs", "--level", "error")):
        r = sd.ctl(*args)
        assert r.rc in (0, 3), r
        seen["sparkctl " + " ".join(args)] = r.out + r.err
    r = sd.ctl("workers", "status", prog="automagik-spark")
    seen["automagik-spark workers status"] = r.out + r.err
    for method, params in (("status", {"verbose": True}), ("logs", {"lines": 100000, "level": "debug"})):
        if not live:
            break
        seen[f"rpc {method}"] = json.dumps(sd.rpc(method, params))
    if sd.log_dir.is_dir():
        for f in sorted(sd.log_dir.rglob("*")):
            if f.is_file():
                seen[f"log file {f.name}"] = f.read_text(errors="replace")
    for p in (sd.stdout_path, sd.stderr_path):
        if p.exists():
            seen[p.name] = p.read_text(errors="replace")
    for pid in sd.all_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen[f"command line of {pid}"] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return seen


def test_password_never_shows_while_workers_run(spark, secured_redis):
    srv, pw = secured_redis
    sd = spark({"CELERY_BROKER_URL": url(srv, pw, 0), "CELERY_RESULT_BACKEND": url(srv, pw, 1),
                "SPARK_LOGLEVEL": "debug"}, broker=False)
    r = sd.start(workers=2, concurrency=1)
    assert_clean("sparkctl start", r.out + r.err, pw)

    # the workers really use the password: tasks round-trip through the secured redis
    app = celery_app(url(srv, pw, 0), url(srv, pw, 1))
    try:
        results = [app.send_task("spark.noop", args=[i]) for i in range(5)]
        assert [x.get(timeout=t(20)) for x in results] == list(range(5))
        bad = app.send_task("no.such.task", args=[1])
        try:
            bad.get(timeout=t(10), propagate=False)
        except Exception:
            pass
        del results, bad
        gc.collect()  # AsyncResults are in cycles: release them while this redis is up
    finally:
        app.close()
    # the results are published before the workers' reports of them reach sparkd: wait for the count
    wait_for(lambda: sum(w["processed"] for w in sd.status()["workers"]) >= 5, t(5), what="5 tasks processed")

    # a crash and restart logs the worker's startup (with its broker) again
    victim = sd.processes()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: all(w["state"] == "active" for w in sd.status()["workers"]) and
             victim not in [p["pid"] for p in sd.processes()], t(30), what="the killed worker replaced")

    seen = gather(sd)
    # the redacted broker is visible somewhere, so the check above is looking at the right text
    assert any(f"127.0.0.1:{srv.port}" in v for v in seen.values()), "the broker address shows nowhere"
    for what, text in seen.items():
        assert_clean(what, text, pw)

    st = sd.stop()
    assert st.rc == 0, st
    # what stays behind: the log files (sparkd's last lines included)
    for what, text in gather(sd, live=False).items():
        assert_clean(what, text, pw)


def test_wrong_password_is_reported_without_the_password(spark, secured_redis):
    srv, _ = secured_redis
    wrong = make_password()
    sd = spark({"CELERY_BROKER_URL": url(srv, wrong, 0), "CELERY_RESULT_BACKEND": url(srv, wrong, 1),
                "SPARK_LOGLEVEL": "debug"}, broker=False)
    sd.start(workers=1, concurrency=1, mode="fg", ready=False)

    def reported():
        st = sd.status()
        return any(p.get("problem") or p.get("last_exit") for p in sd.processes(st)) or \
            sd.ctl("logs", "--level", "warning").out.strip()
    wait_for(reported, t(20), what="the authentication failure reported")
    seen = gather(sd)
    assert any("auth" in v.lower() or "WRONGPASS" in v for v in seen.values()), \
        "the authentication failure is not reported anywhere"
    for what, text in seen.items():
        assert_clean(what, text, wrong)
    os.kill(sd.pid, signal.SIGTERM)
    sd.proc.wait(timeout=t(30))
    assert_clean("sparkd's stderr", sd.stderr_path.read_text(errors="replace"), wrong)


BAD_URLS = {
    "bad-port": "redis://:{pw}@127.0.0.1:notaport/0",
    "user-and-bad-port": "redis://spark:{pw}@127.0.0.1:notaport/0",
    "bad-db": "redis://:{pw}@127.0.0.1:6379/notadb",
    "tls": "rediss://:{pw}@127.0.0.1:6379/0",
    "unencoded-at": "redis://:{pw}@x@127.0.0.1:6379/0",
    "one-slash": "redis:/:{pw}@127.0.0.1:6379/0",
    "unix-query-password": "unix:///run/redis/redis.sock?db=0&password={pw}",
}


@pytest.mark.parametrize("case", sorted(BAD_URLS))
def test_config_errors_do_not_show_the_password(spark, tmp_path, case):
    pw = f"Pw{uuid.uuid4().hex[:12]}"
    bad = BAD_URLS[case].format(pw=pw)
    sd = spark(broker=False)
    env_file = tmp_path / "spark.env"
    env_file.write_text(f"CELERY_BROKER_URL = {bad}\n")
    runs = {
        "sparkctl start (environment)": ([str(sd.bin_dir / "sparkctl"), "start"], {"CELERY_BROKER_URL": bad}),
        "sparkd (environment)": ([str(sd.bin_dir / "sparkd")], {"CELERY_BROKER_URL": bad}),
        "sparkd (result backend)": ([str(sd.bin_dir / "sparkd")],
                                    {"CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "CELERY_RESULT_BACKEND": bad}),
        "spark-worker (environment)": ([str(sd.bin_dir / "spark-worker")], {"CELERY_BROKER_URL": bad}),
        "sparkctl start (env file)": ([str(sd.bin_dir / "sparkctl"), "start"], {"SPARK_ENV_FILE": str(env_file)}),
    }
    for what, (argv, extra) in runs.items():
        env = dict(sd.env)
        env.update(extra)
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(sd.dir), timeout=t(30))
        assert r.returncode != 0, f"{what} accepted {bad!r}: {r}"
        msg = (r.stdout + r.stderr).strip()
        assert "CELERY_" in msg, f"{what}: the error does not name the variable: {msg!r}"
        assert pw not in msg, f"{what} shows the password: {msg}"
    assert not sd.all_pids()

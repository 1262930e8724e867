"""Bad configuration is refused before any process starts, in one line naming variable, value and what is
accepted (issue 2)."""

import re

import pytest

from harness import t

ACCEPTED = re.compile(r"(?i)(expected|accepted|must|one of|allowed|use )")

CASES = {
    # name: (args, env, must contain (all), must not contain)
    "workers-negative": (["--workers", "-3"], {}, ["-3", "workers", ACCEPTED], []),
    "pool-gevent": ([], {"CELERY_WORKER_POOL": "gevent"},
                    ["CELERY_WORKER_POOL", "gevent", "prefork", "threads", "solo"], []),
    "pool-flag": (["--pool", "eventlet"], {}, ["eventlet", "pool", "prefork", "threads", "solo"], []),
    "broker-nonsense": ([], {"CELERY_BROKER_URL": "nonsense"}, ["CELERY_BROKER_URL", "nonsense", "redis://"], []),
    "broker-password": ([], {"CELERY_BROKER_URL": "redis://:s3cr3tpw@127.0.0.1:notaport/0"},
                        ["CELERY_BROKER_URL", ACCEPTED], ["s3cr3tpw"]),
    "backend-rediss": ([], {"CELERY_RESULT_BACKEND": "rediss://:s3cr3tpw@127.0.0.1:6379/0"},
                       ["CELERY_RESULT_BACKEND", "rediss"], ["s3cr3tpw"]),
    "soft-above-hard": ([], {"CELERY_TASK_TIME_LIMIT": "10", "CELERY_TASK_SOFT_TIME_LIMIT": "20"},
                        ["CELERY_TASK_SOFT_TIME_LIMIT", "20", "CELERY_TASK_TIME_LIMIT", "10"], []),
    "concurrency-zero": (["--concurrency", "0"], {}, ["concurrency", "0", ACCEPTED], []),
    "memory-units": ([], {"CELERY_WORKER_MAX_MEMORY_PER_CHILD": "lots"},
                     ["CELERY_WORKER_MAX_MEMORY_PER_CHILD", "lots", ACCEPTED], []),
    "serializer": ([], {"CELERY_TASK_SERIALIZER": "pickle"}, ["CELERY_TASK_SERIALIZER", "pickle", "json"], []),
    "loglevel": (["--loglevel", "chatty"], {}, ["chatty", ACCEPTED], []),
}


def check_refused(sd, r, must, must_not):
    assert r.rc not in (0, None), f"bad configuration accepted: {r!r}"
    lines = r.err_lines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines}"
    line = lines[0]
    for m in must:
        if isinstance(m, str):
            assert m.lower() in line.lower(), f"{m!r} not named in: {line}"
        else:
            assert m.search(line), f"no hint of what is accepted in: {line}"
    for m in must_not:
        assert m not in line and m not in r.out, f"{m!r} leaked in: {line}"
    # nothing was started: no process carries this instance's marker, no socket, no pid file, no log file
    assert not sd.all_pids(), f"processes were started: {sd.all_pids()}"
    assert not sd.socket.exists()
    assert not sd.pid_file.exists()
    assert not sd.log_dir.exists() or not any(sd.log_dir.iterdir())


@pytest.mark.parametrize("via", ["sparkctl", "sparkd"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_refused_before_start(spark, redis, case, via):
    args, env, must, must_not = CASES[case]
    sd = spark(env)
    if via == "sparkctl":
        r = sd.ctl("start", *args)
    else:
        r = sd.ctl(*args, prog="sparkd", timeout=t(20))
    check_refused(sd, r, must, must_not)


@pytest.mark.parametrize("kind", ["missing", "directory", "bad-line"])
def test_unreadable_env_file(spark, redis, tmp_path, kind):
    sd = spark()
    if kind == "missing":
        path = tmp_path / "no-such.env"
        must = [str(path)]
    elif kind == "directory":
        path = tmp_path / "adir.env"
        path.mkdir()
        must = [str(path)]
    else:
        path = tmp_path / "bad.env"
        path.write_text("CELERY_WORKER_CONCURRENCY = 2\nthis line is not an assignment\n")
        must = [f"{path}:2"]
    for r in (sd.ctl("start", "--env-file", str(path)), sd.ctl("--env-file", str(path), prog="sparkd")):
        check_refused(sd, r, must, [])
    # also through $SPARK_ENV_FILE
    r = sd.ctl("start", env={"SPARK_ENV_FILE": str(path)})
    check_refused(sd, r, must, [])


def test_env_file_values_apply_and_precedence(spark, redis, tmp_path):
    """flags > environment > env file > defaults, the env file written the way the guide writes it."""
    envf = tmp_path / "spark.env"
    envf.write_text("# guide style\n"
                    "CELERY_WORKER_CONCURRENCY = 3\n"
                    "export SPARK_WORKERS=2\n"
                    f"CELERY_BROKER_URL = \"{redis.url(0)}\"\n"
                    "CELERY_WORKER_POOL = solo\n")
    sd = spark(broker=False, env={"CELERY_WORKER_POOL": "threads"})
    r = sd.ctl("start", "--env-file", str(envf), "--workers", "1")
    assert r.rc == 0, r
    sd.pid = sd._read_pid()
    st = sd.wait_ready(1)
    w = st["workers"][0]
    assert w["pool"] == "threads", "environment beats the env file"
    assert w["concurrency"] == 3, "the env file beats the default"
    assert len(st["workers"]) == 1, "the flag beats the env file"
    assert sd.stop().rc == 0

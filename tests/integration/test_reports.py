"""Worker -> sparkd reports on fd 3 (common/report.h) with task ids of any length and bytes: Python Celery sends
spark.sleep tasks whose ids are 10 KB long, hold spaces, '%', '-' or a newline; each must show in `sparkctl status
--json` with its full id and hard limit while it runs, leave active_tasks when it finishes (the finish report
matched it), and sparkd must never log a malformed report."""

import pytest

from harness import free_port, t, wait_for

POOLS = {
    "prefork": dict(args=("--pool", "prefork"), workers=1, concurrency=4),
    "threads": dict(args=("--pool", "threads"), workers=1, concurrency=4),
}

IDS = [
    "x" * 10000,
    ("a b%c-" * 2000)[:10000],
    "-",
    "line one\nline two %2D " + "y" * 500,
]


def active_tasks(sd):
    st = sd.ctl_json("status")
    return [a for w in st["workers"] for p in (w.get("processes") or []) for a in (p.get("active_tasks") or [])]


def sparkd_log(sd):
    return "\n".join(f.read_text(errors="replace") for f in sorted(sd.log_dir.iterdir()) if f.is_file())


@pytest.mark.parametrize("pool", list(POOLS))
def test_long_and_odd_task_ids_reach_status(spark, celery, pool):
    sd = spark()
    p = POOLS[pool]
    sd.start(*p["args"], workers=p["workers"], concurrency=p["concurrency"])
    app = celery()
    results = [app.send_task("spark.sleep", args=[6], task_id=tid, time_limit=120, soft_time_limit=100)
               for tid in IDS]

    seen = {}

    def all_seen():
        for a in active_tasks(sd):
            seen[a["id"]] = a
        return all(tid in seen for tid in IDS)
    wait_for(all_seen, t(20), interval=0.1, what="every task id in active_tasks")
    for tid in IDS:
        a = seen[tid]
        assert a["name"] == "spark.sleep", a
        assert a["hard_limit"] == 120, a
    # the human view shows the whole id too (the tasks sleep 6 s: they still run)
    out = sd.ctl("status", "--verbose")
    assert out.rc == 0, out
    assert "x" * 10000 in out.out, out.out[:2000]

    assert [r.get(timeout=t(30)) for r in results] == [6] * len(IDS)
    # each finish report carried the full id: sparkd matched it and forgot the task
    wait_for(lambda: active_tasks(sd) == [], t(10), what="active_tasks empty once every task finished")
    log = sparkd_log(sd)
    assert "malformed report" not in log, [line for line in log.splitlines() if "malformed" in line][:3]


def test_problem_text_with_spaces_travels_whole(spark):
    # a broker nobody listens on: the worker reports the problem (spaces, ':' and '/' in it) until it connects
    port = free_port()
    sd = spark({"CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0", "CELERY_RESULT_BACKEND": ""}, broker=False)
    sd.start(mode="fg", ready=False)

    def problem():
        return [p["problem"] for p in sd.processes() if p.get("problem")]
    got = wait_for(problem, t(20), interval=0.1, what="a problem in status")
    assert any(f"redis://127.0.0.1:{port}/0 unreachable: " in text for text in got), got
    assert "malformed report" not in sparkd_log(sd) + sd.tail(200)

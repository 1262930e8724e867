"""Recycling on max tasks and max memory (issue 2), with Python Celery as producer and result reader."""

import re

from harness import t, wait_for, pid_alive


def last_reasons(sd, st=None):
    return [(p.get("last_exit") or {}).get("reason") for p in sd.processes(st)]


def test_max_tasks_per_child_recycles_and_counts_every_task(spark, celery):
    sd = spark({"CELERY_WORKER_MAX_TASKS_PER_CHILD": "5"})
    sd.start(workers=1, concurrency=2)
    first = {p["pid"] for p in sd.processes()}
    app = celery()
    args = [[i] for i in range(29)] + [["héllo wörld ✓"]]
    results = [app.send_task("spark.noop", args=a) for a in args]
    got = [r.get(timeout=t(30)) for r in results]
    assert got == [a[0] for a in args]

    # processed reaches 30 before the recycled processes are reaped and their exits recorded: wait for both
    def settled():
        s = sd.status()
        done = s["workers"][0]["processed"] == 30 and "max-tasks" in last_reasons(sd, s)
        return s if done and any(not pid_alive(pid) for pid in first) else None

    st = wait_for(settled, t(10), what="processed == 30 and a max-tasks exit recorded")
    w = st["workers"][0]
    # 30 tasks at most 5 per process: at least 6 process lifetimes, so at least 4 recycles
    assert w["restarts"] >= 4, w
    assert "max-tasks" in last_reasons(sd, st), last_reasons(sd, st)
    # how the 30 tasks spread over the two slots is up to the queue, but a slot that ran 5 was replaced
    gone = [pid for pid in first if not pid_alive(pid)]
    assert gone and not set(gone) & {p["pid"] for p in w["processes"]}, (first, w["processes"])
    assert all(p["processed"] <= 5 for p in w["processes"]), w["processes"]
    out = sd.ctl("status")
    assert re.search(r"Tasks Processed:\s*30\b", out.out), out.out
    v = sd.ctl("status", "--verbose")
    assert "max-tasks" in v.out, v.out


def test_memory_limit_below_rss_recycles_after_the_task(spark, celery):
    # 1 MiB is below any worker's resident size: the process is recycled after each task it finishes.
    sd = spark({"CELERY_WORKER_MAX_MEMORY_PER_CHILD": "1MB", "CELERY_WORKER_MAX_TASKS_PER_CHILD": "0"})
    sd.start(workers=1, concurrency=1)
    app = celery()
    res = app.send_task("spark.sleep", args=[1])

    def runner():
        for p in sd.processes():
            if any(a["id"] == res.id for a in p["active_tasks"]):
                return p["pid"]
    pid = wait_for(runner, t(10), interval=0.02, what="the task to start")
    # drained, not killed: the task completes with its value
    assert res.get(timeout=t(15)) == 1
    assert res.state == "SUCCESS"
    wait_for(lambda: not pid_alive(pid), t(10), what="the over-limit process to exit")
    wait_for(lambda: "max-memory" in last_reasons(sd), t(10), what="a max-memory exit")
    st = sd.wait_ready(1)
    assert st["workers"][0]["processed"] >= 1
    assert sd.running()
    # still serving
    assert app.send_task("spark.noop", args=[7]).get(timeout=t(20)) == 7

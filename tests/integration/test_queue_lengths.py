"""Issue 4 item 7: status shows the lengths of the consumed queues and the limits in force."""

import re

from harness import t, wait_for


def test_status_shows_queue_lengths_and_limits(spark, celery):
    sd = spark({"CELERY_TASK_TIME_LIMIT": "60", "CELERY_TASK_SOFT_TIME_LIMIT": "50",
                "CELERY_WORKER_MAX_TASKS_PER_CHILD": "0"})
    sd.start("--queues", "celery,other", workers=1, concurrency=1)
    app = celery()
    # one task runs, four wait behind it in "celery"; two wait in "other" at priority 5 (a sub-queue key)
    running = app.send_task("spark.sleep", args=[7])  # workers report queue lengths every 5 s
    waiting = [app.send_task("spark.noop", args=[i]) for i in range(4)]
    other = [app.send_task("spark.noop", args=[i], queue="other", priority=5) for i in range(2)]

    def lengths():
        sup = sd.status()["supervisor"]
        q = sup.get("queue_lengths") or {}
        return sup if q.get("celery") == 4 and q.get("other", 0) >= 1 else None

    sup = wait_for(lengths, t(15), interval=0.2, what="queue_lengths celery=4, other>=1 in status --json")
    assert set(sup["queue_lengths"]) == {"celery", "other"}, sup["queue_lengths"]
    assert sup["queue_lengths_at"] > 0
    assert sup["limits"]["time_limit"] == 60 and sup["limits"]["soft_time_limit"] == 50, sup["limits"]
    v = sd.ctl("status", "--verbose")
    assert v.rc == 0, v
    assert re.search(r"celery \(4 waiting\)", v.out), v.out
    # the queue drains and the figure follows
    assert running.get(timeout=t(20)) == 7
    assert [r.get(timeout=t(20)) for r in waiting + other] == [0, 1, 2, 3, 0, 1]
    wait_for(lambda: (sd.status()["supervisor"].get("queue_lengths") or {}).get("celery") == 0, t(15),
             interval=0.2, what="queue_lengths celery back to 0")

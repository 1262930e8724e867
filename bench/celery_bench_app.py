"""The Python Celery side of the benchmark: the same task name our workers serve, automagik-spark's settings."""
import os

from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_track_started=True,  # automagik-spark sets it; our workers write STARTED too
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


@app.task(name="spark.noop")
def noop(x=None):
    return x

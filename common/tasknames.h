/*
 * The names of the tasks spark-worker runs (DESIGN §6 "Tasks"), in one place: the worker's registry
 * (worker/tasks.c) and what sparkd answers to Celery's `inspect registered` (sparkd/inspect.c).
 */
#ifndef SPARK_TASKNAMES_H
#define SPARK_TASKNAMES_H

#define SPARK_TASK_NOOP             "spark.noop"
#define SPARK_TASK_SLEEP            "spark.sleep"
#define SPARK_TASK_EXECUTE_WORKFLOW "automagik_spark.core.tasks.workflow_tasks.execute_workflow"
#define SPARK_TASK_RUN_TASK         "spark.run_task"

/* Every name above, for a static array's initializer. */
#define SPARK_TASK_NAMES SPARK_TASK_NOOP, SPARK_TASK_SLEEP, SPARK_TASK_EXECUTE_WORKFLOW, SPARK_TASK_RUN_TASK

#endif

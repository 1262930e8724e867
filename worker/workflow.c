/* Placeholder until the workflow module lands: workflow tasks fail with a clear error. */
#include <stdio.h>

#include "task.h"

int
workflow_init(const struct spark_config *cfg, const char *node, int slots)
{
	(void)cfg;
	(void)node;
	(void)slots;
	return 0;
}

void
workflow_shutdown(void)
{
}

void
task_execute_workflow(struct task_run *run)
{
	task_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "workflow support is not available in this build");
}

void
task_run_task(struct task_run *run)
{
	task_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "workflow support is not available in this build");
}

int
workflow_migrate(const struct spark_config *cfg)
{
	(void)cfg;
	fprintf(stderr, "spark-worker: migrations are not available in this build\n");
	return 1;
}

/*
 * The entry point of spark-workflow.so: the one symbol workflow-loader.c looks up (ABI 2, task.h). Everything
 * else in the plugin is built with hidden visibility, so its own copies of common/ never meet the executable's.
 */
#include <stdbool.h>

#include "log.h"
#include "wf.h"

static void
wf_plugin_log_setup(const char *tag, int level, bool journal)
{
	log_init(tag, level);
	log_set_journal(journal);
}

__attribute__((visibility("default"))) const struct workflow_plugin spark_workflow_plugin = {
    .abi = WORKFLOW_PLUGIN_ABI,
    .run_size = sizeof(struct task_run),
    .config_size = sizeof(struct spark_config),
    .log_setup = wf_plugin_log_setup,
    .create = wf_create,
    .execute_workflow = wf_execute_workflow,
    .run_task = wf_run_task,
    .shutdown = wf_shutdown,
    .destroy = wf_destroy,
    .migrate = wf_migrate,
};

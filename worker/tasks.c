/* Task registry and the built-in tasks (DESIGN §6 "Tasks"). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "task.h"
#include "util.h"

static const struct {
	const char *name;
	task_fn fn;
} task_registry[] = {
    {"spark.noop", task_noop},
    {"spark.sleep", task_sleep},
    {"automagik_spark.core.tasks.workflow_tasks.execute_workflow", task_execute_workflow},
    {"spark.run_task", task_run_task},
};

task_fn
task_lookup(const char *name)
{
	if (name == NULL)
		return NULL;
	for (size_t i = 0; i < sizeof task_registry / sizeof task_registry[0]; i++)
		if (strcmp(task_registry[i].name, name) == 0)
			return task_registry[i].fn;
	return NULL;
}

void
task_fail(struct task_run *run, enum task_outcome outcome, const char *exc_module, const char *exc_type,
          const char *fmt, ...)
{
	run->outcome = outcome;
	spark_strlcpy(run->exc_module, exc_module, sizeof run->exc_module);
	spark_strlcpy(run->exc_type, exc_type, sizeof run->exc_type);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(run->exc_message, sizeof run->exc_message, fmt, ap);
	va_end(ap);
	/* one line: the message goes into logs that are parsed line by line */
	for (char *p = run->exc_message; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	if (run->result != NULL) {
		json_decref(run->result);
		run->result = NULL;
	}
}

/* The first positional argument, or the keyword argument of that name. */
static json_t *
task_arg(struct task_run *run, const char *name)
{
	json_t *v = json_array_get(run->args, 0);
	return v ? v : json_object_get(run->kwargs, name);
}

void
task_noop(struct task_run *run)
{
	json_t *x = task_arg(run, "x");
	if (x == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "TypeError",
		          "noop() missing 1 required positional argument: 'x'");
		return;
	}
	run->outcome = TASK_SUCCESS;
	run->result = json_incref(x);
}

void
task_sleep(struct task_run *run)
{
	json_t *s = task_arg(run, "seconds");
	if (s == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "TypeError",
		          "sleep() missing 1 required positional argument: 'seconds'");
		return;
	}
	if (!json_is_number(s)) {
		task_fail(run, TASK_FAILURE, "builtins", "TypeError", "sleep() seconds must be a number");
		return;
	}
	double secs = json_number_value(s);
	if (!(secs >= 0) || secs > 7 * 86400.0) {
		task_fail(run, TASK_FAILURE, "builtins", "ValueError", "sleep() seconds must be between 0 and 604800");
		return;
	}
	double end = now_mono() + secs;
	for (;;) {
		int c = run->cancel ? atomic_load(run->cancel) : TASK_CANCEL_NONE;
		if (c == TASK_CANCEL_SOFT_LIMIT) {
			task_fail(run, TASK_FAILURE, "celery.exceptions", "SoftTimeLimitExceeded",
			          "soft time limit exceeded");
			return;
		}
		if (c != TASK_CANCEL_NONE) {
			task_fail(run, TASK_FAILURE, "celery.exceptions", "WorkerLostError", "sleep interrupted");
			return;
		}
		double left = end - now_mono();
		if (left <= 0)
			break;
		double step = left < 0.1 ? left : 0.1;
		struct timespec ts = {(time_t)step, (long)((step - (double)(time_t)step) * 1e9)};
		nanosleep(&ts, NULL);
	}
	run->outcome = TASK_SUCCESS;
	run->result = json_incref(s);
}

/* Task registry and the built-in tasks (DESIGN §6 "Tasks"). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <stdlib.h>

#include "task.h"
#include "tasknames.h"
#include "util.h"

static const struct {
	const char *name;
	task_fn fn;
	bool needs_dom; /* reads run->args/kwargs/headers (the others take raw JSON spans) */
} task_registry[] = {
    {SPARK_TASK_NOOP, task_noop, false},
    {SPARK_TASK_SLEEP, task_sleep, true},
    {SPARK_TASK_EXECUTE_WORKFLOW, task_execute_workflow, false},
    {SPARK_TASK_RUN_TASK, task_run_task, false},
};

task_fn
task_lookup(const char *name, bool *needs_dom)
{
	if (name == NULL)
		return NULL;
	for (size_t i = 0; i < sizeof task_registry / sizeof task_registry[0]; i++)
		if (strcmp(task_registry[i].name, name) == 0) {
			*needs_dom = task_registry[i].needs_dom;
			return task_registry[i].fn;
		}
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
	/* the common case copies args[0]'s JSON through untouched: no DOM, no re-encoding */
	if (run->arg0_json != NULL) {
		run->outcome = TASK_SUCCESS;
		run->result_json = run->arg0_json;
		run->result_len = run->arg0_len;
		run->done(run);
		return;
	}
	json_t *kw = run->kwargs;
	json_t *kwargs_only = NULL;
	if (kw == NULL && run->kwargs_json != NULL)
		kw = kwargs_only = json_loadb(run->kwargs_json, run->kwargs_len, 0, NULL);
	json_t *x = json_object_get(kw, "x");
	if (x == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "TypeError",
		          "noop() missing 1 required positional argument: 'x'");
	} else {
		run->outcome = TASK_SUCCESS;
		run->result = json_incref(x);
	}
	json_decref(kwargs_only);
	run->done(run);
}

/* spark.sleep waits on a timer of the loop; a cancel ends it at once. */
struct sleep_state {
	struct event *ev;
	json_t *seconds;
};

static void
sleep_end(struct task_run *run)
{
	struct sleep_state *st = run->task;
	run->task = NULL;
	run->on_cancel = NULL;
	event_free(st->ev);
	free(st);
	run->done(run);
}

static void
sleep_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct task_run *run = arg;
	struct sleep_state *st = run->task;
	run->outcome = TASK_SUCCESS;
	run->result = json_incref(st->seconds);
	sleep_end(run);
}

static void
sleep_cancel(struct task_run *run)
{
	int c = atomic_load(run->cancel);
	if (c == TASK_CANCEL_SOFT_LIMIT)
		task_fail(run, TASK_FAILURE, "celery.exceptions", "SoftTimeLimitExceeded", "soft time limit exceeded");
	else
		task_fail(run, TASK_FAILURE, "celery.exceptions", "WorkerLostError", "sleep interrupted");
	sleep_end(run);
}

void
task_sleep(struct task_run *run)
{
	json_t *s = task_arg(run, "seconds");
	if (s == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "TypeError",
		          "sleep() missing 1 required positional argument: 'seconds'");
		run->done(run);
		return;
	}
	if (!json_is_number(s)) {
		task_fail(run, TASK_FAILURE, "builtins", "TypeError", "sleep() seconds must be a number");
		run->done(run);
		return;
	}
	double secs = json_number_value(s);
	if (!(secs >= 0) || secs > 7 * 86400.0) {
		task_fail(run, TASK_FAILURE, "builtins", "ValueError", "sleep() seconds must be between 0 and 604800");
		run->done(run);
		return;
	}
	if (atomic_load(run->cancel) != TASK_CANCEL_NONE) {
		task_fail(run, TASK_FAILURE, "celery.exceptions", "WorkerLostError", "sleep interrupted");
		run->done(run);
		return;
	}
	struct sleep_state *st = xcalloc(1, sizeof *st);
	st->seconds = s; /* borrowed from the message, which outlives the task */
	st->ev = evtimer_new(run->base, sleep_timer_cb, run);
	run->task = st;
	run->on_cancel = sleep_cancel;
	struct timeval tv = {(time_t)secs, (suseconds_t)((secs - (double)(time_t)secs) * 1e6)};
	evtimer_add(st->ev, &tv);
}

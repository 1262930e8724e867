/*
 * A stand-in engine for the workflow plugin (tests/integration/test_workflow_async.py): one libevent loop, the
 * plugin's ABI-2 struct (linked in, not dlopened), and every run of a JSON spec started at once. Each finished run
 * is printed as one JSON line; a run whose done comes twice is an error.
 *
 *   wf-async-driver SPEC.json      configuration from the environment (DATABASE_URL, SPARK_DB_POOL_SIZE, ...)
 *
 * SPEC: {"slots": N, "shutdown_timeout": S, "runs": [{"task": "execute_workflow"|"run_task", "arg": UUID,
 *        "task_id": ID, "retries": N, "redelivered": B, "cancel_after": S, "cancel": "soft"|"shutdown"|"hard"}]}
 * Output: {"event": "started", "pid"} ... {"i", "task_id", "outcome", "exc_type", "exc_module", "exc_message",
 *         "result"} ... {"event": "finished", "runs"}, {"event": "shutdown"}
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "config.h"
#include "log.h"
#include "store.h"
#include "task.h"
#include "util.h"

extern const struct workflow_plugin spark_workflow_plugin;

struct drv;

struct drv_run {
	struct task_run run;
	struct drv *d;
	int i;
	char task_id[64];
	char *arg0; /* args[0] as JSON text: what the engine hands a task registered without the message's DOM */
	int dones;
	int cancel_reason;
	struct event *cancel_ev;
};

struct drv {
	const struct workflow_plugin *p;
	struct wf_state *st;
	struct event_base *base;
	struct spark_config cfg;
	json_t *spec;
	struct drv_run *runs;
	int nruns, finished;
	double shutdown_timeout;
	int status;
};

static const char *
outcome_name(enum task_outcome o)
{
	switch (o) {
	case TASK_SUCCESS:
		return "success";
	case TASK_FAILURE:
		return "failure";
	case TASK_RETRY:
		return "retry";
	case TASK_DEFER:
		return "defer";
	}
	return "?";
}

static void
drv_print(json_t *o)
{
	char *s = json_dumps(o, JSON_COMPACT);
	printf("%s\n", s);
	fflush(stdout);
	free(s);
	json_decref(o);
}

static void
drv_on_shutdown(void *arg)
{
	struct drv *d = arg;
	drv_print(json_pack("{s:s}", "event", "shutdown"));
	event_base_loopbreak(d->base);
}

static void
drv_run_done(struct task_run *run)
{
	struct drv_run *r = (struct drv_run *)run;
	struct drv *d = r->d;
	if (++r->dones > 1) {
		drv_print(json_pack("{s:s, s:i}", "error", "done called twice", "i", r->i));
		d->status = 3;
		return;
	}
	if (r->cancel_ev)
		event_del(r->cancel_ev);
	/* a result comes as a tree or, copied through, as text (task.h: result_json), as the engine takes either */
	json_t *res = NULL;
	if (run->outcome == TASK_SUCCESS && run->result_json)
		res = json_loadb(run->result_json, run->result_len, JSON_DECODE_ANY, NULL);
	else if (run->outcome == TASK_SUCCESS && run->result)
		res = json_incref(run->result);
	if (!res)
		res = json_null();
	drv_print(json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:o}", "i", r->i, "task_id", r->task_id, "outcome",
	                    outcome_name(run->outcome), "exc_type", run->exc_type, "exc_module", run->exc_module,
	                    "exc_message", run->exc_message, "result", res));
	json_decref(run->result);
	run->result = NULL;
	if (++d->finished == d->nruns) {
		drv_print(json_pack("{s:s, s:i}", "event", "finished", "runs", d->nruns));
		d->p->shutdown(d->st, d->shutdown_timeout, drv_on_shutdown, d);
	}
}

static void
drv_on_cancel_timer(evutil_socket_t fd, short what, void *arg)
{
	struct drv_run *r = arg;
	if (r->dones)
		return;
	atomic_store(r->run.cancel, r->cancel_reason);
	if (r->run.on_cancel)
		r->run.on_cancel(&r->run);
}

/* Start every run in one loop turn, as an engine dispatching a full prefetch would. */
static void
drv_on_start(evutil_socket_t fd, short what, void *arg)
{
	struct drv *d = arg;
	json_t *runs = json_object_get(d->spec, "runs");
	for (int i = 0; i < d->nruns; i++) {
		struct drv_run *r = &d->runs[i];
		json_t *o = json_array_get(runs, (size_t)i);
		struct task_run *run = &r->run;
		const char *task = json_string_value(json_object_get(o, "task"));
		bool manual = task && strcmp(task, "run_task") == 0;
		const char *tid = json_string_value(json_object_get(o, "task_id"));
		if (tid)
			spark_strlcpy(r->task_id, tid, sizeof(r->task_id));
		else
			store_uuid4(r->task_id);
		r->d = d;
		r->i = i;
		run->task_id = r->task_id;
		run->task_name =
		    manual ? "spark.run_task" : "automagik_spark.core.tasks.workflow_tasks.execute_workflow";
		json_t *arg = json_object_get(o, "arg");
		r->arg0 = json_dumps(arg ? arg : json_null(), JSON_ENCODE_ANY | JSON_COMPACT);
		run->arg0_json = r->arg0;
		run->arg0_len = strlen(r->arg0);
		run->kwargs_json = "{}";
		run->kwargs_len = 2;
		run->retries = (int)json_integer_value(json_object_get(o, "retries"));
		run->max_retries = d->cfg.max_retries;
		run->last_attempt = run->retries >= run->max_retries;
		run->retry_countdown = 1.0;
		run->redelivered = json_is_true(json_object_get(o, "redelivered"));
		run->cfg = &d->cfg;
		run->slot = i;
		run->node = "celery@driver";
		run->base = d->base;
		run->done = drv_run_done;
		run->engine = d;
		run->cancel = &run->cancel_flag;
		atomic_init(&run->cancel_flag, TASK_CANCEL_NONE);
		json_t *ca = json_object_get(o, "cancel_after");
		if (json_is_number(ca)) {
			const char *why = json_string_value(json_object_get(o, "cancel"));
			r->cancel_reason = !why || strcmp(why, "soft") == 0 ? TASK_CANCEL_SOFT_LIMIT
			                   : strcmp(why, "shutdown") == 0   ? TASK_CANCEL_SHUTDOWN
			                                                    : TASK_CANCEL_HARD_LIMIT;
			double t = json_number_value(ca);
			struct timeval tv = {(time_t)t, (suseconds_t)((t - (double)(time_t)t) * 1e6)};
			r->cancel_ev = evtimer_new(d->base, drv_on_cancel_timer, r);
			evtimer_add(r->cancel_ev, &tv);
		}
		if (manual)
			d->p->run_task(d->st, run);
		else
			d->p->execute_workflow(d->st, run);
	}
}

int
main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: wf-async-driver SPEC.json\n");
		return 2;
	}
	struct drv d = {.p = &spark_workflow_plugin};
	char err[512];
	if (config_load(&d.cfg, NULL, 0, "", err, sizeof(err)) < 0) {
		fprintf(stderr, "wf-async-driver: %s\n", err);
		return 2;
	}
	d.p->log_setup("wf-driver", d.cfg.loglevel, false);
	json_error_t je;
	d.spec = json_load_file(argv[1], 0, &je);
	if (!d.spec) {
		fprintf(stderr, "wf-async-driver: %s: %s\n", argv[1], je.text);
		return 2;
	}
	d.nruns = (int)json_array_size(json_object_get(d.spec, "runs"));
	d.runs = xcalloc((size_t)(d.nruns ? d.nruns : 1), sizeof(*d.runs));
	json_t *t = json_object_get(d.spec, "shutdown_timeout");
	d.shutdown_timeout = json_is_number(t) ? json_number_value(t) : 10;
	int slots = (int)json_integer_value(json_object_get(d.spec, "slots"));
	d.base = event_base_new();
	if (!d.base)
		fatalx("event_base_new failed");
	d.st = d.p->create(&d.cfg, "celery@driver", slots > 0 ? slots : d.nruns, d.base);
	if (!d.st)
		fatalx("the plugin's create failed");
	drv_print(json_pack("{s:s, s:i}", "event", "started", "pid", (int)getpid()));
	struct event *start = evtimer_new(d.base, drv_on_start, &d);
	struct timeval zero = {0, 0};
	evtimer_add(start, &zero);
	if (d.nruns == 0)
		d.p->shutdown(d.st, d.shutdown_timeout, drv_on_shutdown, &d);
	event_base_dispatch(d.base);
	d.p->destroy(d.st);
	for (int i = 0; i < d.nruns; i++) {
		free(d.runs[i].arg0);
		if (d.runs[i].cancel_ev)
			event_free(d.runs[i].cancel_ev);
	}
	event_free(start);
	event_base_free(d.base);
	free(d.runs);
	json_decref(d.spec);
	config_free(&d.cfg);
	return d.status;
}

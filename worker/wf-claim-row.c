/*
 * What a claim (wf-claim.c) decides for one run from its task row or its schedule, read under their locks in
 * the claim's transaction, and the answer of a run it does not start. The rules are automagik-spark's: a
 * final row is answered again, a running or lost row runs again, a missing or completed schedule runs nothing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "util.h"
#include "wf.h"

void
wf_claim_refuse(struct wf_job *j, char *msg)
{
	j->act = WF_ACT_REFUSED;
	j->claim_text = msg;
}

/* Input text from a JSON value the way automagik-spark reads it: a string as is, {"value": x} -> x, else JSON. */
static char *
wf_input_text(const json_t *v)
{
	if (json_is_object(v) && json_object_get(v, "value"))
		v = json_object_get(v, "value");
	if (!v || json_is_null(v))
		return xstrdup("");
	if (json_is_string(v))
		return xstrdup(json_string_value(v));
	char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
	if (!s)
		fatalx("workflow: out of memory");
	return s;
}

/* The existing row (tuple r of statement 1: id, status, error, workflow_id, input_data, tries, the row as JSON)
 * decides: final rows are answered again (a redelivered message), others run again. */
void
wf_claim_existing(struct wf_job *j, const struct pg_unit *u, int r)
{
	struct task_run *run = j->run;
	const char *v = pg_value(u, 1, r, 1);
	spark_strlcpy(j->status, v ? v : "", sizeof(j->status));
	j->error = (v = pg_value(u, 1, r, 2)) ? xstrdup(v) : NULL;
	const char *status = j->status, *error = j->error;
	if (strcmp(status, "completed") == 0 ||
	    (strcmp(status, "failed") == 0 && (!error || strcmp(error, WF_ERR_WORKER_LOST) != 0))) {
		j->act = WF_ACT_FINAL;
		j->claim_text = (v = pg_value(u, 1, r, 6)) ? xstrdup(v) : NULL;
		return;
	}
	if (j->manual && strcmp(status, "running") == 0 && run->retries == 0 && !run->redelivered) {
		/* a second run_task for a row another worker is running: never run it twice at once */
		wf_claim_refuse(j, xasprintf("Task %s is already running", j->row));
		return;
	}
	j->why = strcmp(status, "running") == 0 || (error && strcmp(error, WF_ERR_WORKER_LOST) == 0)
	             ? "after a lost worker"
	         : strcmp(status, "pending") == 0 && run->retries > 0 ? "retry"
	                                                              : NULL;
	v = pg_value(u, 1, r, 3);
	spark_strlcpy(j->workflow_id, v ? v : "", sizeof(j->workflow_id));
	v = pg_value(u, 1, r, 4);
	json_t *in = v ? json_loads(v, JSON_DECODE_ANY, NULL) : NULL;
	free(j->input);
	j->input = wf_input_text(in);
	json_decref(in);
	v = pg_value(u, 1, r, 5);
	j->tries = (v ? atoi(v) : 0) + 1; /* the row is locked: the UPDATE's COALESCE(tries, 0) + 1 */
	j->act = WF_ACT_RESTART;
}

/* An earlier run of this batch (decided before j, in arrival order) starts the one-time schedule: it is
 * completed for the others. */
static bool
wf_claim_one_time_taken(const struct wf_job *j)
{
	for (const struct wf_job *o = TAILQ_PREV(j, wf_jobq, qentry); o; o = TAILQ_PREV(o, wf_jobq, qentry))
		if (o->act == WF_ACT_INSERT && o->one_time && strcasecmp(o->schedule_id, j->schedule_id) == 0)
			return true;
	return false;
}

/* The schedule (tuple r of statement at: id, workflow_id, schedule_type, status, params, input_data; -1: none)
 * says what to run. */
void
wf_claim_schedule(struct wf_job *j, const struct pg_unit *u, int at, int r)
{
	const char *status = r >= 0 ? pg_value(u, at, r, 3) : NULL;
	bool taken = r >= 0 && wf_claim_one_time_taken(j);
	if (r < 0 || taken || (status && strcmp(status, "completed") == 0)) {
		log_info("task %s: schedule %s is %s: nothing to run", j->run->task_id, j->schedule_id,
		         r < 0 ? "missing" : "completed");
		j->act = WF_ACT_NOTHING;
		return;
	}
	const char *v = pg_value(u, at, r, 1);
	spark_strlcpy(j->workflow_id, v ? v : "", sizeof(j->workflow_id));
	v = pg_value(u, at, r, 2);
	j->one_time = v && strcmp(v, "one-time") == 0;
	/* input: params["value"], else input_data, else "Hello World" (empty counts as absent, as in Python) */
	v = pg_value(u, at, r, 4);
	json_t *params = v ? json_loads(v, JSON_DECODE_ANY, NULL) : NULL;
	json_t *value = json_is_object(params) ? json_object_get(params, "value") : NULL;
	free(j->input);
	j->input = value ? wf_input_text(value) : xstrdup("");
	json_decref(params);
	if (!*j->input && (v = pg_value(u, at, r, 5))) {
		free(j->input);
		j->input = xstrdup(v);
	}
	if (!*j->input) {
		free(j->input);
		j->input = xstrdup(WF_DEFAULT_INPUT);
	}
	json_t *in = json_string(j->input);
	json_decref(in);
	if (!in) {
		j->one_time = false;
		wf_claim_refuse(j, xasprintf("schedule %s: input is not valid UTF-8", j->schedule_id));
		return;
	}
	j->tries = 1;
	j->act = WF_ACT_INSERT;
}

/* A run the claim answered without running it. */
void
wf_claim_answer(struct wf_job *j)
{
	struct task_run *run = j->run;
	switch (j->act) {
	case WF_ACT_FINAL:
		if (strcmp(j->status, "completed") == 0) {
			run->outcome = TASK_SUCCESS;
			run->result = j->claim_text ? json_loads(j->claim_text, 0, NULL) : NULL;
		} else if (j->manual && run->retries == 0 && !run->redelivered) {
			wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s is failed, not pending", j->row);
		} else {
			wf_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "%s", j->error ? j->error : "failed");
		}
		break;
	case WF_ACT_REFUSED:
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "%s", j->claim_text);
		break;
	default: /* WF_ACT_NOTHING */
		run->outcome = TASK_SUCCESS;
		run->result = NULL;
		break;
	}
	wf_job_end(j);
}

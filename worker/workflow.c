/*
 * Workflow tasks: automagik-spark's execute_workflow(schedule_id) and spark.run_task(task_row_id), recorded in
 * PostgreSQL (reference/automagik-spark.md). One run is a state machine on the loop: claim the row and load the
 * workflow and its source (grouped with other runs' claims, wf-claim.c), decrypt the key, call the source, then
 * record the outcome (wf-record.c).
 *
 * Row identity: execute_workflow's row id is a name-based UUID of the Celery task id, so a retry (same task id)
 * or a redelivery after a crash finds and updates the SAME row instead of inserting a new one; each attempt
 * increments `tries`. Between retries a row is `pending` with next_retry_at and the last error.
 *
 * Recovery (worker lost): a row still `running` whose worker process is gone is marked `failed` with error
 * "worker lost" (wf-beat.c). When our engine does redeliver the message, the new attempt finds the row by its
 * id, sees "worker lost", and runs it again (tries counts both attempts, the final status is that of the last).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "log.h"
#include "store.h"
#include "util.h"
#include "wf.h"

void
wf_fail(struct task_run *run, enum task_outcome outcome, const char *module, const char *type, const char *fmt, ...)
{
	va_list ap;
	run->outcome = outcome;
	spark_strlcpy(run->exc_module, module, sizeof(run->exc_module));
	spark_strlcpy(run->exc_type, type, sizeof(run->exc_type));
	va_start(ap, fmt);
	vsnprintf(run->exc_message, sizeof(run->exc_message), fmt, ap);
	va_end(ap);
	for (char *p = run->exc_message; *p; p++) /* one line */
		if (*p == '\n' || *p == '\r')
			*p = ' ';
}

static bool
uuid_valid(const char *s)
{
	if (!s || strlen(s) != 36)
		return false;
	for (int i = 0; i < 36; i++) {
		char c = s[i];
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (c != '-')
				return false;
		} else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
			return false;
		}
	}
	return true;
}

static void
wf_wipe_free(char *s, size_t n)
{
	if (s) {
		OPENSSL_cleanse(s, n);
		free(s);
	}
}

void
wf_job_free(struct wf_job *j)
{
	free(j->call.url); /* set only while a call is in flight (destroy abandons it) */
	pg_unit_release(&j->unit);
	wf_record_free(j);
	wf_wipe_free(j->api_key, j->keylen);
	wf_wipe_free(j->token, j->token ? strlen(j->token) : 0);
	free(j->remote);
	free(j->type);
	free(j->url);
	free(j->input);
	free(j->error);
	free(j->claim_text);
	wf_set_current(j, false);
	free(j);
}

void
wf_job_end(struct wf_job *j)
{
	struct wf_state *st = j->st;
	struct task_run *run = j->run;
	TAILQ_REMOVE(&st->jobs, j, entry);
	st->njobs--;
	char *result = j->row_json; /* run->result_json may point at it */
	j->row_json = NULL;
	wf_job_free(j);
	run->on_cancel = NULL;
	run->task = NULL;
	run->done(run);
	free(result);
	wf_shutdown_check(st);
}

/* ---- the source call ---- */

static void
wf_on_cancel(struct task_run *run)
{
	struct wf_job *j = run->task;
	if (j && j->phase == WF_CALL)
		source_abort(&j->call); /* wf_call_done runs: the outcome follows the reason in *run->cancel */
}

static void
wf_call_done(struct source_call *c)
{
	struct wf_job *j = c->arg;
	struct source_result *res = &c->res;
	switch (res->status) {
	case SOURCE_OK:
		wf_finish_ok(j, res->output);
		break;
	case SOURCE_RETRY:
		wf_finish_retry(j, res->error, strstr(res->error, "imed out") || strstr(res->error, "imeout"));
		break;
	case SOURCE_FAIL:
		wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", res->error);
		break;
	case SOURCE_CANCELLED:
		wf_finish_cancelled(j);
		break;
	}
	json_decref(res->output);
	res->output = NULL;
}

/* Decrypt the key, then call the source (the workflow row has been read into j). */
void
wf_call_start(struct wf_job *j)
{
	struct wf_state *st = j->st;
	if (*j->token) {
		char kerr[256];
		if (!st->key_ok)
			snprintf(kerr, sizeof(kerr), "%s", st->key_err);
		else if (fernet_decrypt(st->key, j->token, &j->api_key, &j->keylen, kerr, sizeof(kerr)) < 0)
			j->api_key = NULL;
		if (!j->api_key) {
			char *m = xasprintf("Failed to decrypt API key: %s", kerr);
			wf_finish_failed(j, TASK_FAILURE, "builtins", "ValueError", m);
			free(m);
			return;
		}
	}
	if (atomic_load(j->run->cancel)) {
		wf_finish_cancelled(j);
		return;
	}
	j->req = (struct source_request){
	    .source_type = j->type,
	    .url = j->url,
	    .api_key = j->api_key,
	    .remote_id = j->remote,
	    .input = j->input,
	    .session_id = j->row,
	    .timeout = st->http_timeout,
	};
	log_info("task %s: row %s: calling %s flow %s (attempt %d)", j->run->task_id, j->row, j->type, j->remote,
	         j->tries);
	j->phase = WF_CALL;
	source_start(&st->http, &j->call, &j->req, wf_call_done, j);
}

/* ---- entry points ---- */

/* The run's UUID argument (args[0], else kwargs[what]); NULL with the failure set. */
static bool
wf_arg_uuid(struct task_run *run, const char *what, char out[37])
{
	/* the workflow tasks are registered without the message's DOM: one UUID is all they read */
	json_t *own = NULL;
	json_t *a = NULL;
	if (run->arg0_json != NULL)
		a = own = json_loadb(run->arg0_json, run->arg0_len, JSON_DECODE_ANY, NULL);
	else if (run->kwargs_json != NULL && (own = json_loadb(run->kwargs_json, run->kwargs_len, 0, NULL)) != NULL)
		a = json_object_get(own, what);
	const char *s = json_string_value(a);
	bool ok = uuid_valid(s);
	if (ok)
		spark_strlcpy(out, s, 37);
	else
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "%s must be a UUID string", what);
	json_decref(own);
	return ok;
}

static void
wf_start(struct wf_state *st, struct task_run *run, bool manual)
{
	run->outcome = TASK_SUCCESS;
	run->result = NULL;
	run->result_json = NULL;
	run->on_cancel = NULL;
	if (!st || !st->enabled) {
		wf_fail(run, TASK_FAILURE, "builtins", "RuntimeError", WORKFLOW_ERR_NO_DATABASE);
		run->done(run);
		return;
	}
	char id[37];
	if (!wf_arg_uuid(run, manual ? "task_id" : "schedule_id", id)) {
		run->done(run);
		return;
	}
	struct wf_job *j = xcalloc(1, sizeof(*j));
	j->st = st;
	j->run = run;
	j->manual = manual;
	if (manual) {
		spark_strlcpy(j->row, id, sizeof(j->row));
		for (char *c = j->row; *c; c++) /* the row id is compared as text in recovery */
			if (*c >= 'A' && *c <= 'F')
				*c = (char)(*c - 'A' + 'a');
	} else {
		spark_strlcpy(j->schedule_id, id, sizeof(j->schedule_id));
		/* one row per Celery task id: retries and redeliveries land on it */
		char *name = xasprintf("execute_workflow:%s", run->task_id ? run->task_id : "");
		store_uuid5(name, j->row);
		free(name);
	}
	TAILQ_INSERT_TAIL(&st->jobs, j, entry);
	st->njobs++;
	run->task = j;
	run->on_cancel = wf_on_cancel;
	wf_schema_need(j);
}

void
wf_execute_workflow(struct wf_state *st, struct task_run *run)
{
	wf_start(st, run, false);
}

void
wf_run_task(struct wf_state *st, struct task_run *run)
{
	wf_start(st, run, true);
}

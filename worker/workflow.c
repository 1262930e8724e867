/*
 * Workflow tasks: automagik-spark's execute_workflow(schedule_id) and spark.run_task(task_row_id), recorded in
 * PostgreSQL (reference/automagik-spark.md). One run is a state machine on the loop: claim the row (one
 * transaction with the workers-row update), load the workflow and its source, decrypt the key, call the source,
 * then record the outcome (wf-record.c).
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
	free(j);
}

void
wf_job_end(struct wf_job *j)
{
	struct wf_state *st = j->st;
	struct task_run *run = j->run;
	TAILQ_REMOVE(&st->jobs, j, entry);
	st->njobs--;
	wf_job_free(j);
	run->on_cancel = NULL;
	run->task = NULL;
	run->done(run);
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
static void
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

/* ---- load the workflow and its source (after the claim's COMMIT, on the same connection) ---- */

static void
wf_load_send(struct wf_job *j)
{
	j->phase = WF_LOAD;
	const char *p[] = {j->workflow_id};
	pg_send(&j->unit,
	        "SELECT w.remote_flow_id, s.id, s.source_type, s.url, s.encrypted_api_key FROM workflows w"
	        " LEFT JOIN workflow_sources s ON s.id = w.workflow_source_id WHERE w.id = $1",
	        1, p);
	pg_sync(&j->unit);
}

static void
wf_load_done(struct wf_job *j)
{
	struct pg_unit *u = &j->unit;
	if (!u->ok) {
		spark_strlcpy(j->err, u->err, sizeof(j->err));
		pg_end(u);
		if (u->lost) {
			/* the row is running and the database is gone: leave it to the redelivered message */
			j->current = false;
			wf_db_error(j, "reading the workflow", true);
		} else {
			char *m = xasprintf("reading the workflow: %s", j->err);
			wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", m);
			free(m);
		}
		return;
	}
	if (pg_ntuples(u, 0) == 0 || !pg_value(u, 0, 0, 1)) {
		char *m = pg_ntuples(u, 0) == 0 ? xasprintf("Workflow %s not found", j->workflow_id)
		                                : xasprintf("No source found for workflow %s", j->workflow_id);
		pg_end(u);
		wf_finish_failed(j, TASK_FAILURE, "builtins", "ValueError", m);
		free(m);
		return;
	}
	const char *v;
	j->remote = xstrdup((v = pg_value(u, 0, 0, 0)) ? v : "");
	j->type = xstrdup((v = pg_value(u, 0, 0, 2)) ? v : "");
	j->url = xstrdup((v = pg_value(u, 0, 0, 3)) ? v : "");
	j->token = xstrdup((v = pg_value(u, 0, 0, 4)) ? v : "");
	pg_end(u);
	wf_call_start(j);
}

/* ---- the claim: find or create the row, mark it running, note it in the workers row, in one transaction ---- */

static void
wf_claim_send(struct pg_unit *u)
{
	struct wf_job *j = u->arg;
	j->phase = WF_CLAIM_ROW;
	const char *rp[] = {j->row};
	pg_send(u, "BEGIN", 0, NULL);
	pg_send(u, "SELECT status, error FROM tasks WHERE id = $1 FOR UPDATE", 1, rp);
	pg_sync(u);
}

/* Mark the existing row running for a new attempt; the log line reads the attempt number from the row. */
static void
wf_restart_send(struct wf_job *j, const char *why)
{
	struct pg_unit *u = &j->unit;
	j->phase = WF_CLAIM_RESTART;
	char id[37];
	store_uuid4(id);
	char *suffix = why ? xasprintf(", %s", why) : xstrdup("");
	const char *p[] = {j->row};
	const char *lp[] = {id, j->row, suffix};
	pg_send(
	    u,
	    "UPDATE tasks SET status = 'running', tries = COALESCE(tries, 0) + 1, started_at = now(), finished_at = "
	    "NULL,"
	    " next_retry_at = NULL, updated_at = now() WHERE id = $1 RETURNING tries, workflow_id, input_data::text",
	    1, p);
	pg_send(u,
	        "INSERT INTO task_logs (id, task_id, level, message, created_at) SELECT $1, $2, 'info',"
	        " 'Task started (attempt ' || tries || $3::text || ')', now() FROM tasks WHERE id = $2",
	        3, lp);
	free(suffix);
	/* the workers row names the task in the same transaction, so recovery never mistakes it for an orphan */
	j->current = true;
	wf_send_worker_upsert(j->st, u, true, j->row);
	pg_send(u, "COMMIT", 0, NULL);
	pg_sync(u);
}

/* The existing row decides: final rows are answered again (a redelivered message), others run again. */
static void
wf_claim_existing(struct wf_job *j)
{
	struct task_run *run = j->run;
	struct pg_unit *u = &j->unit;
	const char *status = j->status, *error = j->error;
	if (strcmp(status, "completed") == 0 ||
	    (strcmp(status, "failed") == 0 && (!error || strcmp(error, WF_ERR_WORKER_LOST) != 0))) {
		j->phase = WF_CLAIM_FINAL;
		const char *p[] = {j->row};
		pg_send(u, "SELECT " WF_ROW_JSON " FROM tasks WHERE id = $1", 1, p);
		pg_send(u, "COMMIT", 0, NULL);
		pg_sync(u);
		return;
	}
	if (j->manual && strcmp(status, "running") == 0 && run->retries == 0 && !run->redelivered) {
		/* a second run_task for a row another worker is running: never run it twice at once */
		pg_end(u);
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s is already running", j->row);
		wf_job_end(j);
		return;
	}
	const char *why = strcmp(status, "running") == 0 || (error && strcmp(error, WF_ERR_WORKER_LOST) == 0)
	                      ? "after a lost worker"
	                  : strcmp(status, "pending") == 0 && run->retries > 0 ? "retry"
	                                                                       : NULL;
	wf_restart_send(j, why);
}

/* The schedule (locked) says what to run: insert the row running. */
static void
wf_claim_schedule(struct wf_job *j)
{
	struct task_run *run = j->run;
	struct pg_unit *u = &j->unit;
	const char *status = pg_value(u, 0, 0, 2);
	if (pg_ntuples(u, 0) == 0 || (status && strcmp(status, "completed") == 0)) {
		log_info("task %s: schedule %s is %s: nothing to run", run->task_id, j->schedule_id,
		         pg_ntuples(u, 0) == 0 ? "missing" : "completed");
		j->phase = WF_CLAIM_NOTHING;
		pg_send(u, "COMMIT", 0, NULL);
		pg_sync(u);
		return;
	}
	const char *v = pg_value(u, 0, 0, 0);
	spark_strlcpy(j->workflow_id, v ? v : "", sizeof(j->workflow_id));
	v = pg_value(u, 0, 0, 1);
	bool one_time = v && strcmp(v, "one-time") == 0;
	/* input: params["value"], else input_data, else "Hello World" (empty counts as absent, as in Python) */
	v = pg_value(u, 0, 0, 3);
	json_t *params = v ? json_loads(v, JSON_DECODE_ANY, NULL) : NULL;
	json_t *value = json_is_object(params) ? json_object_get(params, "value") : NULL;
	free(j->input);
	j->input = value ? wf_input_text(value) : xstrdup("");
	json_decref(params);
	if (!*j->input && (v = pg_value(u, 0, 0, 4))) {
		free(j->input);
		j->input = xstrdup(v);
	}
	if (!*j->input) {
		free(j->input);
		j->input = xstrdup(WF_DEFAULT_INPUT);
	}
	json_t *in = json_string(j->input);
	char *in_json = in ? json_dumps(in, JSON_ENCODE_ANY) : NULL;
	json_decref(in);
	if (!in_json) {
		pg_end(u);
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "schedule %s: input is not valid UTF-8",
		        j->schedule_id);
		wf_job_end(j);
		return;
	}
	j->phase = WF_CLAIM_INSERT;
	const char *sp[] = {j->schedule_id};
	if (one_time)
		pg_send(u, "UPDATE schedules SET status = 'completed', updated_at = now() WHERE id = $1", 1, sp);
	char maxr[16], id[37];
	snprintf(maxr, sizeof(maxr), "%d", run->max_retries);
	const char *ip[] = {j->row, j->workflow_id, j->schedule_id, in_json, maxr};
	pg_send(u,
	        "INSERT INTO tasks (id, workflow_id, schedule_id, status, input_data, tries, max_retries, "
	        "created_at,"
	        " started_at, updated_at) VALUES ($1, $2, $3, 'running', $4::json, 1, $5, now(), now(), now())",
	        5, ip);
	free(in_json);
	store_uuid4(id);
	const char *lp[] = {id, j->row, "info", "Task started (attempt 1)"};
	pg_send(u, "INSERT INTO task_logs (id, task_id, level, message, created_at) VALUES ($1, $2, $3, $4, now())", 4,
	        lp);
	j->tries = 1;
	j->current = true;
	wf_send_worker_upsert(j->st, u, true, j->row);
	pg_send(u, "COMMIT", 0, NULL);
	pg_sync(u);
}

/* The claim committed: the row is ours and running. */
static void
wf_claimed(struct wf_job *j)
{
	j->committed = true;
	j->claimed = true;
	j->st->processed++;
	wf_load_send(j);
}

static void
wf_claim_step(struct pg_unit *u)
{
	struct wf_job *j = u->arg;
	struct task_run *run = j->run;
	if (j->phase == WF_LOAD) {
		wf_load_done(j);
		return;
	}
	if (!u->ok) {
		static const char *const what[] = {
		    [WF_CLAIM_ROW] = "reading the task row",      [WF_CLAIM_FINAL] = "reading the task row",
		    [WF_CLAIM_RESTART] = "starting the task row", [WF_CLAIM_SCHEDULE] = "reading the schedule",
		    [WF_CLAIM_NOTHING] = "reading the schedule",  [WF_CLAIM_INSERT] = "creating the task row",
		};
		const char *w = j->phase < (int)(sizeof(what) / sizeof(what[0])) && what[j->phase]
		                    ? what[j->phase]
		                    : "claiming the task row";
		if (j->phase == WF_CLAIM_INSERT) {
			/* which statement failed names the step, as the statements of a blocking claim did */
			int tasks_at = u->nres - 4; /* [schedules,] tasks, task_logs, workers, COMMIT */
			if (u->failed_at >= 0 && u->failed_at < tasks_at)
				w = "completing the one-time schedule";
			else if (u->failed_at >= tasks_at + 2)
				w = "starting the task row";
		}
		spark_strlcpy(j->err, u->err, sizeof(j->err));
		j->current = false;
		bool lost = u->lost;
		pg_end(u);
		wf_db_error(j, w, lost);
		return;
	}
	switch (j->phase) {
	case WF_CLAIM_ROW:
		if (pg_ntuples(u, 1) > 0) {
			const char *s = pg_value(u, 1, 0, 0), *e = pg_value(u, 1, 0, 1);
			spark_strlcpy(j->status, s ? s : "", sizeof(j->status));
			j->error = e ? xstrdup(e) : NULL;
			wf_claim_existing(j);
		} else if (j->manual) {
			pg_end(u);
			wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s not found", j->row);
			wf_job_end(j);
		} else {
			j->phase = WF_CLAIM_SCHEDULE;
			const char *sp[] = {j->schedule_id};
			pg_send(u,
			        "SELECT workflow_id, schedule_type, status, params::text, input_data FROM schedules "
			        "WHERE id = $1"
			        " FOR UPDATE",
			        1, sp);
			pg_sync(u);
		}
		return;
	case WF_CLAIM_FINAL:
		if (strcmp(j->status, "completed") == 0) {
			const char *row = pg_value(u, 0, 0, 0);
			run->outcome = TASK_SUCCESS;
			run->result = row ? json_loads(row, 0, NULL) : NULL;
		} else if (j->manual && run->retries == 0 && !run->redelivered) {
			wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s is failed, not pending", j->row);
		} else {
			wf_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "%s", j->error ? j->error : "failed");
		}
		pg_end(u);
		wf_job_end(j);
		return;
	case WF_CLAIM_RESTART: {
		const char *v = pg_value(u, 0, 0, 0);
		j->tries = v ? atoi(v) : 1;
		v = pg_value(u, 0, 0, 1);
		spark_strlcpy(j->workflow_id, v ? v : "", sizeof(j->workflow_id));
		v = pg_value(u, 0, 0, 2);
		json_t *in = v ? json_loads(v, JSON_DECODE_ANY, NULL) : NULL;
		free(j->input);
		j->input = wf_input_text(in);
		json_decref(in);
		wf_claimed(j);
		return;
	}
	case WF_CLAIM_SCHEDULE:
		wf_claim_schedule(j);
		return;
	case WF_CLAIM_NOTHING:
		run->outcome = TASK_SUCCESS;
		run->result = NULL;
		pg_end(u);
		wf_job_end(j);
		return;
	case WF_CLAIM_INSERT:
		wf_claimed(j);
		return;
	case WF_WAIT_SCHEMA:
	case WF_LOAD:
	case WF_CALL:
	case WF_RECORD:
		fatalx("workflow: claim step in phase %d", (int)j->phase);
	}
}

void
wf_claim_start(struct wf_job *j)
{
	/* BEGIN and a locking read: safe to send again on a fresh connection */
	pgpool_run(&j->st->pool, &j->unit, wf_claim_send, wf_claim_step, j, 1);
}

/* ---- entry points ---- */

/* The run's UUID argument (args[0], else kwargs[what]); NULL with the failure set. */
static bool
wf_arg_uuid(struct task_run *run, const char *what, char out[37])
{
	json_t *own = NULL;
	json_t *a = json_is_array(run->args) ? json_array_get(run->args, 0) : NULL;
	if (!a && !run->args && run->arg0_json)
		a = own = json_loadb(run->arg0_json, run->arg0_len, JSON_DECODE_ANY, NULL);
	if (!a && json_is_object(run->kwargs))
		a = json_object_get(run->kwargs, what);
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

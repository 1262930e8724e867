/*
 * The end of an attempt: its row transition, task_logs line and workers-row update, committed before the
 * outcome goes to the engine.
 *
 * Group commit: attempts that end wait in st->recq; the next batch takes them all (up to WF_BATCH_MAX, on as
 * many connections at once as wf_batch_most allows) as one transaction on one connection: BEGIN, one UPDATE of all
 * their rows and one INSERT of all their log lines (each reads the batch from a JSON parameter with json_to_recordset:
 * one statement per attempt cost the server a parse and a plan each, three times the work of the rows), one workers-row
 * update, COMMIT, pipelined in one round trip (synchronous_commit as the server sets it, so one WAL flush serves the
 * whole batch). A batch that fails on a statement (not on the connection) is written
 * again attempt by attempt, so one bad row never costs the others their record. A batch whose connection was
 * lost may or may not have committed: each attempt defers (its message comes back and finds the row), as a
 * single lost write did before.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "store.h"
#include "util.h"
#include "wf.h"

/* Up to WF_BATCH_MAX queued attempts join the batch. */
static void
wf_rec_take(struct wf_batch *b)
{
	struct wf_job *j;
	for (int n = 0; n < WF_BATCH_MAX && (j = TAILQ_FIRST(&b->st->recq)); n++) {
		TAILQ_REMOVE(&b->st->recq, j, qentry);
		TAILQ_INSERT_TAIL(&b->jobs, j, qentry);
	}
}

void
wf_record_free(struct wf_job *j)
{
	json_decref(j->rec_output);
	free(j->rec_error);
	free(j->rec_msg);
	free(j->out_msg);
	free(j->row_json);
	j->rec_output = NULL;
	j->rec_error = j->rec_msg = j->out_msg = j->row_json = NULL;
}

/* ---- the database let us down ---- */

static void
wf_mark_failed_send(struct pg_unit *u)
{
	struct wf_job *j = u->arg;
	const char *p[] = {j->row, j->run->exc_message};
	pg_send(u,
	        "UPDATE tasks SET status = 'failed', error = $2, finished_at = now(), "
	        "updated_at = now()"
	        " WHERE id = $1 AND status = 'running'",
	        2, p);
	pg_sync(u);
}

static void
wf_mark_failed_done(struct pg_unit *u)
{
	struct wf_job *j = u->arg;
	if (!u->ok)
		log_errorx("task %s: row %s could not be marked failed: %s", j->run->task_id, j->row, u->err);
	pg_end(u);
	wf_job_end(j);
}

void
wf_db_error(struct wf_job *j, const char *what, bool lost)
{
	pg_end(&j->unit);
	if (lost) {
		log_warnx("task %s: %s: %s; the message will be delivered again", j->run->task_id, what, j->err);
		wf_fail(j->run, TASK_DEFER, "builtins", "ConnectionError", "database unavailable: %s", j->err);
		wf_job_end(j);
		return;
	}
	log_errorx("task %s: %s: %s", j->run->task_id, what, j->err);
	wf_fail(j->run, TASK_FAILURE, "builtins", "RuntimeError", "%s: %s", what, j->err);
	if (!j->claimed) {
		wf_job_end(j);
		return;
	}
	/* the database answers but refused the full record: still never leave the row running */
	pgpool_run(&j->st->pool, &j->unit, wf_mark_failed_send, wf_mark_failed_done, j, 1);
}

/* ---- applying a committed record ---- */

static void
wf_rec_apply(struct wf_job *j)
{
	struct task_run *run = j->run;
	const char *row_json = j->row_json;
	switch (j->end) {
	case WF_END_OK:
		log_info("task %s: row %s completed", run->task_id, j->row);
		run->outcome = TASK_SUCCESS;
		/* PostgreSQL's JSON copied through: parsing it into a tree for the engine to dump it again was a tenth
		 * of the worker's CPU per run (wf_job_end keeps it until run->done returns) */
		run->result_json = row_json;
		run->result_len = row_json ? strlen(row_json) : 0;
		break;
	case WF_END_FAILED:
		log_warnx("task %s: row %s failed: %s", run->task_id, j->row, j->out_msg);
		wf_fail(run, j->out_outcome, j->out_module, j->out_type, "%s", j->out_msg);
		break;
	case WF_END_RETRY:
		log_warnx("task %s: row %s will be retried: %s", run->task_id, j->row, j->out_msg);
		wf_fail(run, TASK_RETRY, "builtins", j->out_type, "%s", j->out_msg);
		break;
	case WF_END_INTERRUPTED:
		wf_fail(run, TASK_DEFER, "celery.exceptions", "WorkerLostError", "interrupted by a worker shutdown");
		break;
	}
	wf_job_end(j);
}

/* ---- the statements ---- */

/* The attempt's row UPDATE (RETURNING the row) and its log line: two statements of u's step. */
static void
wf_rec_send_job(struct pg_unit *u, struct wf_job *j)
{
	char retry[32], id[37];
	snprintf(retry, sizeof(retry), "%.3f", j->rec_retry_in);
	char *out = j->rec_output ? json_dumps(j->rec_output, JSON_ENCODE_ANY) : NULL;
	if (j->rec_output && !out)
		fatalx("workflow: out of memory");
	const char *p[] = {j->row, j->rec_status, out, j->rec_error,
	                   strcmp(j->rec_status, "pending") == 0 ? retry : NULL};
	pg_send(
	    u,
	    "UPDATE tasks SET status = $2::varchar, output_data = COALESCE($3::json, output_data), error = $4::varchar,"
	    " next_retry_at = now() + make_interval(secs => $5::float8),"
	    " finished_at = CASE WHEN $2::varchar IN ('completed', 'failed') THEN now() END, updated_at = now()"
	    " WHERE id = $1 RETURNING " WF_ROW_JSON,
	    5, p);
	free(out);
	store_uuid4(id);
	const char *lp[] = {id, j->row, j->rec_level, j->rec_msg};
	pg_send(u, "INSERT INTO task_logs (id, task_id, level, message, created_at) VALUES ($1, $2, $3, $4, now())", 4,
	        lp);
}

/* ---- task_logs lines, many in one statement ---- */

/* Text as a JSON string: a message cut at a byte limit (snprintf) may end inside a UTF-8 sequence, which JSON
 * cannot carry; the longest valid start is kept. */
static json_t *
wf_json_text(const char *s)
{
	json_t *v = NULL;
	for (size_t n = strlen(s); !v && n > 0; n--)
		v = json_stringn(s, n);
	if (!v)
		v = json_string(*s ? "(text not valid UTF-8)" : "");
	if (!v)
		fatalx("workflow: out of memory");
	return v;
}

json_t *
wf_logs_new(void)
{
	json_t *a = json_array();
	if (!a)
		fatalx("workflow: out of memory");
	return a;
}

void
wf_logs_add(json_t *logs, const char *task_row, const char *level, const char *msg)
{
	char id[37];
	store_uuid4(id);
	json_t *o =
	    json_pack("{s:s, s:s, s:s, s:o}", "lid", id, "tid", task_row, "lvl", level, "msg", wf_json_text(msg));
	if (!o || json_array_append_new(logs, o) != 0)
		fatalx("workflow: out of memory");
}

void
wf_logs_send(struct pg_unit *u, json_t *logs)
{
	char *doc = json_dumps(logs, JSON_COMPACT);
	if (!doc)
		fatalx("workflow: out of memory");
	const char *p[] = {doc};
	pg_send(u,
	        "INSERT INTO task_logs (id, task_id, level, message, created_at) SELECT lid, tid, lvl, msg, now()"
	        " FROM json_to_recordset($1::json) AS v(lid uuid, tid uuid, lvl varchar, msg varchar)",
	        1, p);
	free(doc);
	json_decref(logs);
}

/* ---- one attempt on its own (after a failed batch) ---- */

static void
wf_rec_single_send(struct pg_unit *u)
{
	struct wf_job *j = u->arg;
	pg_send(u, "BEGIN", 0, NULL);
	wf_rec_send_job(u, j);
	wf_send_worker_upsert(j->st, u, true, NULL);
	pg_send(u, "COMMIT", 0, NULL);
	pg_sync(u);
}

static void
wf_rec_single_done(struct pg_unit *u)
{
	struct wf_job *j = u->arg;
	if (!u->ok) {
		spark_strlcpy(j->err, u->err, sizeof(j->err));
		wf_db_error(j, j->rec_what, u->lost);
		return;
	}
	const char *v = pg_value(u, 1, 0, 0);
	j->row_json = v ? xstrdup(v) : NULL;
	pg_end(u);
	wf_rec_apply(j);
}

static void
wf_rec_single(struct wf_job *j)
{
	/* not sent again on a fresh connection: it holds a COMMIT */
	pgpool_run(&j->st->pool, &j->unit, wf_rec_single_send, wf_rec_single_done, j, 0);
}

/* ---- the batch ---- */

/* The attempt as an element of the batch's rows (the recordset of the batch UPDATE). */
static json_t *
wf_rec_row(const struct wf_job *j)
{
	json_t *out = j->rec_output ? json_incref(j->rec_output) : NULL;
	json_t *err = j->rec_error ? wf_json_text(j->rec_error) : NULL;
	bool pending = strcmp(j->rec_status, "pending") == 0;
	json_t *o = json_pack("{s:s, s:s, s:o, s:o, s:o}", "rid", j->row, "rstatus", j->rec_status, "routput",
	                      out ? out : json_null(), "rerror", err ? err : json_null(), "rretry",
	                      pending ? json_real(j->rec_retry_in) : json_null());
	if (!o)
		fatalx("workflow: out of memory");
	return o;
}

static void
wf_rec_batch_send(struct pg_unit *u)
{
	struct wf_batch *b = u->arg;
	struct wf_state *st = b->st;
	wf_batch_attached(b);
	wf_rec_take(b);
	if (TAILQ_EMPTY(&b->jobs)) {
		/* another batch took them */
		pg_end(u);
		wf_batch_free(b);
		return;
	}
	wf_rec_kick(st); /* more were queued than one batch takes */
	json_t *rows = json_array(), *logs = wf_logs_new();
	if (!rows)
		fatalx("workflow: out of memory");
	for (struct wf_job *j = TAILQ_FIRST(&b->jobs); j; j = TAILQ_NEXT(j, qentry)) {
		if (json_array_append_new(rows, wf_rec_row(j)) != 0)
			fatalx("workflow: out of memory");
		wf_logs_add(logs, j->row, j->rec_level, j->rec_msg);
	}
	char *doc = json_dumps(rows, JSON_COMPACT);
	json_decref(rows);
	if (!doc)
		fatalx("workflow: out of memory");
	const char *p[] = {doc};
	pg_send(u, "BEGIN", 0, NULL);
	/* the recordset's names are its own, so the row's columns in WF_ROW_JSON stay unambiguous */
	pg_send(u,
	        "UPDATE tasks SET status = v.rstatus, output_data = COALESCE(v.routput, output_data), error = v.rerror,"
	        " next_retry_at = now() + make_interval(secs => v.rretry),"
	        " finished_at = CASE WHEN v.rstatus IN ('completed', 'failed') THEN now() END, updated_at = now()"
	        " FROM json_to_recordset($1::json) AS v(rid uuid, rstatus varchar, routput json, rerror varchar,"
	        " rretry float8) WHERE id = v.rid RETURNING id::text, " WF_ROW_JSON,
	        1, p);
	free(doc);
	wf_logs_send(u, logs);
	wf_send_worker_upsert(st, u, true, NULL);
	pg_send(u, "COMMIT", 0, NULL);
	pg_sync(u);
}

static void
wf_rec_batch_done(struct pg_unit *u)
{
	struct wf_batch *b = u->arg;
	struct wf_state *st = b->st;
	struct wf_jobq batch = TAILQ_HEAD_INITIALIZER(batch);
	struct wf_job *j;
	bool attached = !b->waiting;
	if (!attached)
		wf_rec_take(b); /* no connection came: the database is unreachable for every attempt waiting */
	while ((j = TAILQ_FIRST(&b->jobs))) {
		TAILQ_REMOVE(&b->jobs, j, qentry);
		TAILQ_INSERT_TAIL(&batch, j, qentry);
	}
	int k = 0, n = u->ok ? pg_ntuples(u, 1) : 0; /* BEGIN, then the UPDATE: (id, row) per row updated */
	for (j = TAILQ_FIRST(&batch); j; j = TAILQ_NEXT(j, qentry)) {
		/* the UPDATE returns its rows in no promised order, but usually in the batch's: try that row first
		 * (a batch of 256 would otherwise compare 32,000 ids) */
		const char *v = NULL;
		for (int i = 0; i < n && !v; i++) {
			int r = (k + i) % n;
			const char *id = pg_value(u, 1, r, 0);
			if (id && strcmp(id, j->row) == 0)
				v = pg_value(u, 1, r, 1);
		}
		j->row_json = v ? xstrdup(v) : NULL;
		k++;
	}
	bool ok = u->ok, conn_lost = u->conn_lost || !attached;
	char err[sizeof(u->err)];
	spark_strlcpy(err, u->err, sizeof(err));
	pg_end(u);
	wf_batch_free(b);
	if (!ok && !conn_lost)
		log_warnx("database: group commit of %d rows failed (%s): writing them one by one", k, err);
	while ((j = TAILQ_FIRST(&batch))) {
		TAILQ_REMOVE(&batch, j, qentry);
		if (ok)
			wf_rec_apply(j);
		else if (conn_lost) {
			spark_strlcpy(j->err, err, sizeof(j->err));
			wf_db_error(j, j->rec_what, true);
		} else {
			wf_rec_single(j);
		}
	}
	wf_rec_kick(st);
	wf_claim_kick(st); /* its share may have grown */
}

/* Group commits on up to wf_batch_most connections at once: the rows of a thousand calls ending together are
 * written on several connections, not queued behind one. */
void
wf_rec_kick(struct wf_state *st)
{
	if (st->recs.waiting || TAILQ_EMPTY(&st->recq) || st->recs.n >= wf_batch_most(st, &st->claims, &st->claimq))
		return;
	struct wf_batch *b = xcalloc(1, sizeof(*b));
	wf_batch_add(st, &st->recs, b, true);
	/* not sent again on a fresh connection: it holds a COMMIT */
	pgpool_run(&st->pool, &b->unit, wf_rec_batch_send, wf_rec_batch_done, b, 0);
}

/* ---- the ends of an attempt ---- */

static void
wf_rec_queue(struct wf_job *j, enum wf_end end, const char *status, json_t *output, const char *error, double retry_in,
             const char *level, char *msg, const char *what)
{
	j->end = end;
	j->rec_status = status;
	j->rec_output = output;
	j->rec_error = error ? xstrdup(error) : NULL;
	j->rec_retry_in = retry_in;
	j->rec_level = level;
	j->rec_msg = msg;
	j->rec_what = what;
	/* out of current_tasks before the write that ends it, as the row leaves `running` there */
	wf_set_current(j, false);
	j->committed = false;
	j->phase = WF_RECORD;
	TAILQ_INSERT_TAIL(&j->st->recq, j, qentry);
	wf_rec_kick(j->st);
}

void
wf_finish_failed(struct wf_job *j, enum task_outcome outcome, const char *module, const char *type, const char *msg)
{
	j->st->failed++;
	j->out_outcome = outcome;
	j->out_module = module;
	j->out_type = type;
	j->out_msg = xstrdup(msg);
	wf_rec_queue(j, WF_END_FAILED, "failed", NULL, msg, 0, "error", xasprintf("Task failed: %s", msg),
	             "recording the failure");
}

/* Empty output in automagik-spark's sense: nothing, "", {} or []. */
static bool
output_empty(const json_t *o)
{
	return !o || json_is_null(o) || (json_is_string(o) && json_string_length(o) == 0) ||
	       (json_is_object(o) && json_object_size(o) == 0) || (json_is_array(o) && json_array_size(o) == 0);
}

void
wf_finish_ok(struct wf_job *j, json_t *output)
{
	if (output_empty(output)) {
		wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", "No output from workflow");
		return;
	}
	/* stored as automagik-spark does: a JSON string holding json.dumps(output) (or the text itself) */
	json_t *s = NULL;
	if (json_is_string(output)) {
		s = json_incref(output);
	} else {
		/* jansson's own output is valid UTF-8: no second check of it */
		char *text = json_dumps(output, JSON_ENCODE_ANY);
		s = text ? json_stringn_nocheck(text, strlen(text)) : NULL;
		free(text);
	}
	if (!s)
		fatalx("workflow: out of memory");
	j->st->succeeded++;
	wf_rec_queue(j, WF_END_OK, "completed", s, NULL, 0, "info", xstrdup("Task completed"), "recording the result");
}

void
wf_finish_retry(struct wf_job *j, const char *msg, bool timeout)
{
	struct task_run *run = j->run;
	const char *type = timeout ? "TimeoutError" : "ConnectionError";
	if (run->last_attempt) {
		char *m = xasprintf("%s (gave up after %d attempts)", msg, j->tries);
		wf_finish_failed(j, TASK_RETRY, "builtins", type, m);
		free(m);
		return;
	}
	j->st->retried++;
	j->out_type = type;
	j->out_msg = xstrdup(msg);
	char *line =
	    xasprintf("Retry %d/%d in %.1f s: %s", run->retries + 1, run->max_retries, run->retry_countdown, msg);
	wf_rec_queue(j, WF_END_RETRY, "pending", NULL, msg, run->retry_countdown, "warning", line,
	             "recording the retry");
}

void
wf_finish_cancelled(struct wf_job *j)
{
	int why = atomic_load(j->run->cancel);
	if (why == TASK_CANCEL_SHUTDOWN) {
		/* cold stop: the message goes back to the queue and the next attempt reuses this row */
		wf_rec_queue(j, WF_END_INTERRUPTED, "pending", NULL, "interrupted by a worker shutdown; will run again",
		             0, "warning", xstrdup("Task interrupted by a worker shutdown; it will run again"),
		             "recording the interruption");
		return;
	}
	if (why == TASK_CANCEL_HARD_LIMIT)
		wf_finish_failed(j, TASK_FAILURE, "celery.exceptions", "TimeLimitExceeded", "TimeLimitExceeded");
	else if (why == TASK_CANCEL_REVOKED)
		wf_finish_failed(j, TASK_FAILURE, "celery.exceptions", "TaskRevokedError", "TaskRevokedError: revoked");
	else
		wf_finish_failed(j, TASK_FAILURE, "celery.exceptions", "SoftTimeLimitExceeded",
		                 "SoftTimeLimitExceeded: soft time limit exceeded");
}

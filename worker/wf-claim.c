/*
 * The claim, grouped: runs that want their task row wait in st->claimq, and one claim transaction takes them
 * all (up to WF_CLAIM_MAX) on one connection, in two round trips whatever their number:
 *
 *   1. BEGIN; their task rows FOR UPDATE, and the schedules of the scheduled runs FOR UPDATE (two statements;
 *      a run whose row exists does not need its schedule, but asking for it only once the rows are known cost
 *      a third round trip, about a third of every claim, for the rare redelivery)
 *   2. per run its writes (the row running again and its log line, or the new row and its log line, with the
 *      one-time schedule completed), one workers-row update listing them all, COMMIT; then the workflows and
 *      sources they call (one read, after the COMMIT: a read that fails never undoes a claim)
 *
 * One interactive transaction per run capped the claims at a few hundred per second on a pool of 4 (each held
 * its connection for four round trips); a batch costs the same round trips as one run.
 *
 * Locks: both reads lock in id order, so claims on several connections never deadlock each other, and the
 * workers row, which every claim and every record writes, comes last. The decisions are those of one claim at
 * a time, taken in arrival order: a final row is answered again, a running or lost row runs again, and a
 * one-time schedule starts one run even when several of its messages share a batch. The same row is never
 * twice in a batch (a duplicate message waits for the next one, which finds the row).
 *
 * Failures: a batch that fails on a statement is claimed again run by run, so one bad row never costs the
 * others; a batch whose connection was lost may or may not have committed, so each run defers (its message
 * comes back and finds the row), as a lost single claim did.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "store.h"
#include "util.h"
#include "wf.h"

enum { CLAIM_ROWS = 1, CLAIM_WRITE };

struct wf_claim {
	struct wf_batch b; /* in st->claims */
	bool solo;         /* given one run at creation (after a failed batch): takes nothing from the queue */
	int phase;
	int sched_at;                               /* the schedules' statement in the first step (-1: not sent) */
	int insert_at, logs_at, commit_at, load_at; /* statement indexes in the write step (-1: not sent) */
};

static void wf_claim_step(struct pg_unit *u);

/* ---- batches ---- */

static struct wf_claim *
wf_claim_new(struct wf_state *st, bool waiting)
{
	struct wf_claim *c = xcalloc(1, sizeof(*c));
	wf_batch_add(st, &st->claims, &c->b, waiting);
	return c;
}

/* A run joins the batch with nothing decided yet (again, after a failed batch). */
static void
wf_claim_add(struct wf_claim *c, struct wf_job *j)
{
	j->act = WF_ACT_ROW;
	j->one_time = false;
	wf_set_current(j, false);
	j->status[0] = '\0';
	j->workflow_id[0] = '\0';
	free(j->error);
	free(j->claim_text);
	j->error = j->claim_text = NULL;
	j->stmt_at = j->nstmt = 0;
	TAILQ_INSERT_TAIL(&c->b.jobs, j, qentry);
	c->b.njobs++;
}

static bool
wf_claim_holds_row(const struct wf_claim *c, const char *row)
{
	for (const struct wf_job *j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry))
		if (strcmp(j->row, row) == 0)
			return true;
	return false;
}

static void
wf_claim_take(struct wf_claim *c)
{
	struct wf_job *j, *next;
	for (j = TAILQ_FIRST(&c->b.st->claimq); j && c->b.njobs < WF_CLAIM_MAX; j = next) {
		next = TAILQ_NEXT(j, qentry);
		if (wf_claim_holds_row(c, j->row))
			continue;
		TAILQ_REMOVE(&c->b.st->claimq, j, qentry);
		wf_claim_add(c, j);
	}
}

/* The batch's runs, out of it, for the caller to end or start. */
static void
wf_claim_drain(struct wf_claim *c, struct wf_jobq *out)
{
	struct wf_job *j;
	while ((j = TAILQ_FIRST(&c->b.jobs))) {
		TAILQ_REMOVE(&c->b.jobs, j, qentry);
		TAILQ_INSERT_TAIL(out, j, qentry);
	}
	c->b.njobs = 0;
}

static bool
wf_claim_act_claims(enum wf_claim_act a)
{
	return a == WF_ACT_RESTART || a == WF_ACT_INSERT;
}

/* The ids a statement of the claim asks for. */
enum wf_claim_ids {
	IDS_ROWS,      /* every run's row */
	IDS_SCHEDULED, /* every scheduled run's schedule */
	IDS_WORKFLOWS, /* the workflows of the runs claimed */
};

/* A PostgreSQL array literal of ids. Built by hand: every id is a checked UUID (36 characters; a run without a
 * schedule has none). */
static char *
wf_claim_ids(const struct wf_claim *c, enum wf_claim_ids want)
{
	size_t cap = 3 + (size_t)c->b.njobs * 37, len = 0;
	char *s = xmalloc(cap);
	s[len++] = '{';
	for (const struct wf_job *j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry)) {
		const char *id = want == IDS_ROWS ? j->row : want == IDS_WORKFLOWS ? j->workflow_id : j->schedule_id;
		bool take = want != IDS_WORKFLOWS || wf_claim_act_claims(j->act);
		if (!take || strlen(id) != 36)
			continue;
		if (len > 1)
			s[len++] = ',';
		memcpy(s + len, id, 36);
		len += 36;
	}
	s[len++] = '}';
	s[len] = '\0';
	return s;
}

/* ---- the steps ---- */

static void wf_claim_send_writes(struct wf_claim *c);
static void wf_claim_schedules_read(struct wf_claim *c, int at);

static void
wf_claim_send_rows(struct pg_unit *u)
{
	struct wf_claim *c = u->arg;
	struct wf_state *st = c->b.st;
	if (c->b.waiting) {
		wf_batch_attached(&c->b);
		wf_claim_take(c);
		wf_claim_kick(st); /* more were queued than one batch takes */
	}
	if (c->b.njobs == 0) {
		/* another batch took them */
		pg_end(u);
		wf_batch_free(&c->b);
		return;
	}
	c->phase = CLAIM_ROWS;
	char *ids = wf_claim_ids(c, IDS_ROWS);
	const char *p[] = {ids};
	pg_send(u, "BEGIN", 0, NULL);
	pg_send(u,
	        "SELECT id::text, status, error, workflow_id::text, input_data::text, COALESCE(tries, 0), (" WF_ROW_JSON
	        ")::text FROM tasks WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
	        1, p);
	free(ids);
	/* the schedules, locked in id order as the rows are */
	c->sched_at = -1;
	ids = wf_claim_ids(c, IDS_SCHEDULED);
	if (strcmp(ids, "{}") != 0) {
		const char *sp[] = {ids};
		c->sched_at = 2;
		pg_send(
		    u,
		    "SELECT id::text, workflow_id::text, schedule_type, status, params::text, input_data FROM schedules"
		    " WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
		    1, sp);
	}
	free(ids);
	pg_sync(u);
}

static void
wf_claim_rows_read(struct wf_claim *c)
{
	struct pg_unit *u = &c->b.unit;
	struct wf_job *j;
	for (j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry)) {
		int r, n = pg_ntuples(u, 1);
		for (r = 0; r < n; r++) {
			const char *id = pg_value(u, 1, r, 0);
			if (id && strcmp(id, j->row) == 0)
				break;
		}
		if (r < n)
			wf_claim_existing(j, u, r);
		else if (j->manual)
			wf_claim_refuse(j, xasprintf("Task %s not found", j->row));
		else
			j->act = WF_ACT_SCHEDULE;
	}
	for (j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry))
		if (j->act == WF_ACT_SCHEDULE)
			break;
	if (!j) {
		wf_claim_send_writes(c);
		return;
	}
	/* read with the rows (every run without a row is a scheduled one: a manual run's row must exist) */
	wf_claim_schedules_read(c, c->sched_at);
}

/* The schedules the runs without a row start from: statement at of the step. */
static void
wf_claim_schedules_read(struct wf_claim *c, int at)
{
	struct pg_unit *u = &c->b.unit;
	for (struct wf_job *j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry)) {
		if (j->act != WF_ACT_SCHEDULE)
			continue;
		int r, n = pg_ntuples(u, at);
		for (r = 0; r < n; r++) {
			const char *id = pg_value(u, at, r, 0);
			if (id && strcasecmp(id, j->schedule_id) == 0)
				break;
		}
		wf_claim_schedule(j, u, at, r < n ? r : -1);
	}
	wf_claim_send_writes(c);
}

/* A restart's row update or a one-time schedule's completion (both rare: one statement each, before the batch's
 * set statements); returns how many statements. */
static int
wf_claim_send_own(struct pg_unit *u, struct wf_job *j)
{
	const char *p[] = {j->act == WF_ACT_RESTART ? j->row : j->schedule_id};
	if (j->act == WF_ACT_RESTART)
		pg_send(u,
		        "UPDATE tasks SET status = 'running', tries = COALESCE(tries, 0) + 1, started_at = now(),"
		        " finished_at = NULL, next_retry_at = NULL, updated_at = now() WHERE id = $1",
		        1, p);
	else if (j->one_time)
		pg_send(u, "UPDATE schedules SET status = 'completed', updated_at = now() WHERE id = $1", 1, p);
	else
		return 0;
	return 1;
}

/* A statement of the write step that reads the batch's rows from a JSON recordset (rows is consumed). */
static void
wf_claim_send_set(struct pg_unit *u, const char *sql, json_t *rows)
{
	char *doc = json_dumps(rows, JSON_COMPACT);
	json_decref(rows);
	if (!doc)
		fatalx("workflow: out of memory");
	const char *p[] = {doc};
	pg_send(u, sql, 1, p);
	free(doc);
}

static void
wf_claim_send_writes(struct wf_claim *c)
{
	struct pg_unit *u = &c->b.unit;
	c->phase = CLAIM_WRITE;
	json_t *rows = json_array(), *logs = wf_logs_new();
	if (!rows)
		fatalx("workflow: out of memory");
	const char *own = NULL;
	int n = 0; /* statements of the step so far */
	for (struct wf_job *j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry)) {
		j->stmt_at = n;
		j->nstmt = 0;
		if (!wf_claim_act_claims(j->act))
			continue;
		j->nstmt = wf_claim_send_own(u, j);
		n += j->nstmt;
		if (j->act == WF_ACT_INSERT) {
			json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:i}", "rid", j->row, "wid", j->workflow_id, "sid",
			                      j->schedule_id, "input", j->input, "maxr", j->run->max_retries);
			if (!o || json_array_append_new(rows, o) != 0)
				fatalx("workflow: out of memory");
			wf_logs_add(logs, j->row, "info", "Task started (attempt 1)");
		} else {
			char *msg = xasprintf("Task started (attempt %d%s%s)", j->tries, j->why ? ", " : "",
			                      j->why ? j->why : "");
			wf_logs_add(logs, j->row, "info", msg);
			free(msg);
		}
		/* listed in the workers row in the same transaction: recovery never takes it for an orphan */
		wf_set_current(j, true);
		own = own ? own : j->row;
	}
	c->insert_at = c->logs_at = -1;
	if (json_array_size(rows) > 0) {
		c->insert_at = n++;
		wf_claim_send_set(
		    u,
		    "INSERT INTO tasks (id, workflow_id, schedule_id, status, input_data, tries, max_retries,"
		    " created_at, started_at, updated_at) SELECT rid, wid, sid, 'running', input, 1, maxr,"
		    " now(), now(), now() FROM json_to_recordset($1::json) AS v(rid uuid, wid uuid, sid uuid,"
		    " input json, maxr int)",
		    rows);
	} else {
		json_decref(rows);
	}
	if (own) {
		c->logs_at = n++;
		wf_logs_send(u, logs);
		wf_send_worker_upsert(c->b.st, u, true, own);
		n++;
	} else {
		json_decref(logs);
	}
	c->commit_at = n++;
	pg_send(u, "COMMIT", 0, NULL);
	c->load_at = -1;
	if (own) {
		char *ids = wf_claim_ids(c, IDS_WORKFLOWS);
		const char *p[] = {ids};
		c->load_at = n;
		pg_send(u,
		        "SELECT w.id::text, w.remote_flow_id, s.id, s.source_type, s.url, s.encrypted_api_key FROM "
		        "workflows"
		        " w LEFT JOIN workflow_sources s ON s.id = w.workflow_source_id WHERE w.id = ANY($1::uuid[])",
		        1, p);
		free(ids);
	}
	pg_sync(u);
}

/* ---- the ends ---- */

/* What the failed step was doing, for the run's error (as the statements of a single claim named it). */
static const char *
wf_claim_what(const struct wf_claim *c, const struct wf_job *j, int failed_at)
{
	if (c->phase == CLAIM_ROWS)
		return c->sched_at >= 0 && failed_at == c->sched_at ? "reading the schedule" : "reading the task row";
	if (c->phase != CLAIM_WRITE)
		return "claiming the task row";
	switch (j->act) {
	case WF_ACT_INSERT:
		if (j->one_time && failed_at >= j->stmt_at && failed_at < j->stmt_at + j->nstmt)
			return "completing the one-time schedule";
		if (failed_at < 0 || failed_at == c->insert_at || failed_at == c->logs_at)
			return "creating the task row";
		return "starting the task row"; /* the workers row or the COMMIT */
	case WF_ACT_RESTART:
		return "starting the task row";
	case WF_ACT_NOTHING:
		return "reading the schedule";
	default:
		return "reading the task row";
	}
}

/* Nothing committed (or it is unknown): runs of a batch that failed on a statement are claimed again one by
 * one; otherwise each ends by the database's error (deferred when it may pass). */
static void
wf_claim_failed(struct wf_claim *c)
{
	struct wf_state *st = c->b.st;
	struct pg_unit *u = &c->b.unit;
	bool attached = !c->b.waiting, lost = u->lost;
	bool again = attached && !u->conn_lost && u->failed_at >= 0 && c->b.njobs > 1;
	char err[sizeof(u->err)];
	spark_strlcpy(err, u->err, sizeof(err));
	if (!attached)
		wf_claim_take(c); /* no connection came: the database is unreachable for the runs waiting */
	struct wf_jobq runs = TAILQ_HEAD_INITIALIZER(runs);
	for (struct wf_job *j = TAILQ_FIRST(&c->b.jobs); j; j = TAILQ_NEXT(j, qentry)) {
		wf_set_current(j, false);
		j->claim_what = wf_claim_what(c, j, u->failed_at);
	}
	wf_claim_drain(c, &runs);
	pg_end(u);
	wf_batch_free(&c->b);
	if (again)
		log_warnx("database: a claim of several runs failed (%s): claiming them one by one", err);
	struct wf_job *j;
	while ((j = TAILQ_FIRST(&runs))) {
		TAILQ_REMOVE(&runs, j, qentry);
		if (again) {
			struct wf_claim *one = wf_claim_new(st, false);
			one->solo = true;
			wf_claim_add(one, j);
			pgpool_run(&st->pool, &one->b.unit, wf_claim_send_rows, wf_claim_step, one, 1);
			continue;
		}
		spark_strlcpy(j->err, err, sizeof(j->err));
		wf_db_error(j, j->claim_what, lost);
	}
}

/* The write step came back: the claims committed (a failed load after the COMMIT fails the runs it served). */
static void
wf_claim_written(struct wf_claim *c)
{
	struct wf_state *st = c->b.st;
	struct pg_unit *u = &c->b.unit;
	if (!u->ok && (u->conn_lost || u->failed_at <= c->commit_at)) {
		wf_claim_failed(c);
		return;
	}
	bool loaded = u->ok, lost = u->lost;
	char err[sizeof(u->err)];
	spark_strlcpy(err, u->err, sizeof(err));
	struct wf_job *j;
	for (j = TAILQ_FIRST(&c->b.jobs); j && loaded; j = TAILQ_NEXT(j, qentry)) {
		if (!wf_claim_act_claims(j->act))
			continue;
		int r, n = pg_ntuples(u, c->load_at);
		for (r = 0; r < n; r++) {
			const char *id = pg_value(u, c->load_at, r, 0);
			if (id && strcmp(id, j->workflow_id) == 0)
				break;
		}
		if (r == n)
			continue; /* no such workflow: remote stays NULL */
		const char *v;
		j->remote = xstrdup((v = pg_value(u, c->load_at, r, 1)) ? v : "");
		if (!pg_value(u, c->load_at, r, 2))
			continue; /* no source: type stays NULL */
		j->type = xstrdup((v = pg_value(u, c->load_at, r, 3)) ? v : "");
		j->url = xstrdup((v = pg_value(u, c->load_at, r, 4)) ? v : "");
		j->token = xstrdup((v = pg_value(u, c->load_at, r, 5)) ? v : "");
	}
	struct wf_jobq runs = TAILQ_HEAD_INITIALIZER(runs);
	wf_claim_drain(c, &runs);
	pg_end(u);
	wf_batch_free(&c->b);
	while ((j = TAILQ_FIRST(&runs))) {
		TAILQ_REMOVE(&runs, j, qentry);
		if (!wf_claim_act_claims(j->act)) {
			wf_claim_answer(j);
			continue;
		}
		/* the row is ours and running */
		j->committed = true;
		j->claimed = true;
		st->processed++;
		if (!loaded && lost) {
			/* the row is running and the database is gone: leave it to the redelivered message */
			wf_set_current(j, false);
			spark_strlcpy(j->err, err, sizeof(j->err));
			wf_db_error(j, "reading the workflow", true);
		} else if (!loaded) {
			char *m = xasprintf("reading the workflow: %s", err);
			wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", m);
			free(m);
		} else if (!j->remote || !j->type) {
			char *m = !j->remote ? xasprintf("Workflow %s not found", j->workflow_id)
			                     : xasprintf("No source found for workflow %s", j->workflow_id);
			wf_finish_failed(j, TASK_FAILURE, "builtins", "ValueError", m);
			free(m);
		} else {
			wf_call_start(j);
		}
	}
	wf_claim_kick(st);
	wf_rec_kick(st); /* its share may have grown */
}

static void
wf_claim_step(struct pg_unit *u)
{
	struct wf_claim *c = u->arg;
	struct wf_state *st = c->b.st;
	if (!u->ok && c->phase != CLAIM_WRITE) {
		wf_claim_failed(c);
		wf_claim_kick(st);
		wf_rec_kick(st);
		return;
	}
	if (c->phase == CLAIM_ROWS)
		wf_claim_rows_read(c);
	else
		wf_claim_written(c);
}

/* A batch waits for a connection while the claims hold fewer than wf_batch_most allows; the one waiting takes
 * every run queued by the time it gets its connection. */
void
wf_claim_kick(struct wf_state *st)
{
	int most = wf_batch_most(st, &st->recs, &st->recq);
	if (st->claims.waiting || TAILQ_EMPTY(&st->claimq) || st->claims.n >= most)
		return;
	struct wf_claim *c = wf_claim_new(st, true);
	/* BEGIN and locking reads: safe to send again on a fresh connection */
	pgpool_run(&st->pool, &c->b.unit, wf_claim_send_rows, wf_claim_step, c, 1);
}

void
wf_claim_start(struct wf_job *j)
{
	j->phase = WF_CLAIM;
	TAILQ_INSERT_TAIL(&j->st->claimq, j, qentry);
	wf_claim_kick(j->st);
}

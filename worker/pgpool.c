/* The PostgreSQL pool on libevent; see pgpool.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "log.h"
#include "pgpool.h"
#include "util.h"

#define PG_CONNECT_TIMEOUT_S 10.0
#define PG_BACKOFF_MIN_S     0.5
#define PG_BACKOFF_MAX_S     10.0

static void pg_conn_fail(struct pg_conn *c, const char *what, const char *msg);
static void pg_kick(struct pgpool *p);
static void pg_conn_flush(struct pg_conn *c);

/* libpq's messages end with a newline and may span lines: keep the first line only. */
static void
pg_errline(char *err, size_t errlen, const char *what, const char *msg)
{
	char line[400];
	spark_strlcpy(line, msg ? msg : "", sizeof(line));
	line[strcspn(line, "\r\n")] = '\0';
	snprintf(err, errlen, "%s: %s", what, line[0] ? line : "unknown error");
}

/* NOTICEs (CREATE TABLE IF NOT EXISTS "skipping", ...) are not errors: keep them out of stderr. */
static void
pg_notice(void *arg, const char *msg)
{
	char line[400];
	spark_strlcpy(line, msg ? msg : "", sizeof(line));
	line[strcspn(line, "\r\n")] = '\0';
	log_debug("database: %s", line);
}

/* ---- units ---- */

static void
pg_unit_clear_results(struct pg_unit *u)
{
	for (int i = 0; i < u->nres; i++)
		PQclear(u->res[i]);
	u->nres = 0;
}

static void
pg_unit_reset_outcome(struct pg_unit *u)
{
	u->ok = true;
	u->lost = false;
	u->conn_lost = false;
	u->failed_at = -1;
	u->err[0] = '\0';
}

/* Fail a unit that has no connection (any more); the callback ends it. */
static void
pg_unit_fail_detached(struct pg_unit *u, bool conn_lost, const char *err)
{
	pg_unit_clear_results(u);
	u->conn = NULL;
	u->step_open = false;
	u->ok = false;
	u->lost = true;
	u->conn_lost = conn_lost;
	u->failed_at = -1;
	spark_strlcpy(u->err, err, sizeof(u->err));
	u->on_step(u);
}

void
pgpool_run(struct pgpool *p, struct pg_unit *u, pg_unit_fn on_conn, pg_unit_fn on_step, void *arg, int resend)
{
	u->on_conn = on_conn;
	u->on_step = on_step;
	u->arg = arg;
	u->resend = resend;
	pgpool_submit(p, u);
}

void
pgpool_submit(struct pgpool *p, struct pg_unit *u)
{
	u->pool = p;
	u->conn = NULL;
	u->steps = 0;
	u->step_open = false;
	u->nres = 0;
	pg_unit_reset_outcome(u);
	u->queued = true;
	u->queued_at = now_mono();
	TAILQ_INSERT_TAIL(&p->queue, u, entry);
	p->nqueued++;
	event_active(p->kick_ev, EV_TIMEOUT, 0);
}

void
pg_unit_release(struct pg_unit *u)
{
	pgpool_withdraw(u);
	pg_unit_clear_results(u);
	free(u->res);
	u->res = NULL;
	u->cap = 0;
}

bool
pgpool_withdraw(struct pg_unit *u)
{
	if (!u->queued)
		return false;
	TAILQ_REMOVE(&u->pool->queue, u, entry);
	u->pool->nqueued--;
	u->queued = false;
	return true;
}

void
pg_send(struct pg_unit *u, const char *sql, int nparams, const char *const *params)
{
	struct pg_conn *c = u->conn;
	if (!u->step_open) {
		pg_unit_clear_results(u);
		pg_unit_reset_outcome(u);
		u->step_open = true;
		c->nsent = 0;
	}
	if (u->nres == u->cap) {
		u->cap = u->cap ? u->cap * 2 : 8;
		u->res = xrealloc(u->res, (size_t)u->cap * sizeof(*u->res));
	}
	u->res[u->nres++] = NULL;
	c->nsent++;
	/* a refusal here is the connection's (out of memory, connection gone): pg_sync notices it */
	PQsendQueryParams(c->pc, sql, nparams, NULL, params, NULL, NULL, 0);
}

static void
pg_conn_start_sync(struct pg_conn *c)
{
	c->cur = 0;
	c->got = false;
	c->syncing = true;
	c->step_at = now_mono();
	if (PQpipelineSync(c->pc) != 1) {
		pg_conn_fail(c, "database connection lost", PQerrorMessage(c->pc));
		return;
	}
	pg_conn_flush(c);
}

void
pg_sync(struct pg_unit *u)
{
	pg_conn_start_sync(u->conn);
}

void
pg_end(struct pg_unit *u)
{
	struct pg_conn *c = u->conn;
	pg_unit_clear_results(u);
	u->step_open = false;
	u->conn = NULL;
	if (!c)
		return;
	c->u = NULL;
	PGTransactionStatusType ts = PQtransactionStatus(c->pc);
	if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
		c->state = PGC_CLEANUP;
		c->nsent = 1;
		PQsendQueryParams(c->pc, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0);
		pg_conn_start_sync(c);
		return;
	}
	c->state = PGC_IDLE;
	event_active(c->p->kick_ev, EV_TIMEOUT, 0);
}

PGresult *
pg_result(const struct pg_unit *u, int i)
{
	return i >= 0 && i < u->nres ? u->res[i] : NULL;
}

int
pg_ntuples(const struct pg_unit *u, int i)
{
	PGresult *r = pg_result(u, i);
	return r ? PQntuples(r) : 0;
}

const char *
pg_value(const struct pg_unit *u, int i, int r, int c)
{
	PGresult *res = pg_result(u, i);
	if (!res || r >= PQntuples(res) || c >= PQnfields(res) || PQgetisnull(res, r, c))
		return NULL;
	return PQgetvalue(res, r, c);
}

/* ---- connections ---- */

static void
pg_conn_close(struct pg_conn *c)
{
	if (c->rev)
		event_free(c->rev);
	if (c->wev)
		event_free(c->wev);
	if (c->cev)
		event_free(c->cev);
	c->rev = c->wev = c->cev = NULL;
	if (c->pc)
		PQfinish(c->pc);
	c->pc = NULL;
	c->flushing = false;
	c->syncing = false;
	c->state = PGC_DOWN;
}

/*
 * The connection failed (a connect that did not succeed, or an established one that dropped). Its unit fails
 * with lost, or goes back to the head of the queue when its first step may be sent again.
 */
static void
pg_conn_fail(struct pg_conn *c, const char *what, const char *msg)
{
	struct pgpool *p = c->p;
	char err[512];
	pg_errline(err, sizeof(err), what, msg);
	bool was_connect = c->state == PGC_CONNECTING || c->state == PGC_SETUP;
	struct pg_unit *u = c->u;
	c->u = NULL;
	pg_conn_close(c);
	double now = now_mono();
	if (was_connect) {
		spark_strlcpy(p->last_err, err, sizeof(p->last_err));
		c->backoff = c->backoff > 0 ? c->backoff * 2 : PG_BACKOFF_MIN_S;
		if (c->backoff > PG_BACKOFF_MAX_S)
			c->backoff = PG_BACKOFF_MAX_S;
		c->retry_at = now + c->backoff;
	} else {
		c->retry_at = now; /* a server restart: try again at the next demand */
		log_warnx("%s", err);
	}
	if (u) {
		if (u->steps == 0 && u->resend > 0) {
			u->resend--;
			pg_unit_clear_results(u);
			u->step_open = false;
			u->conn = NULL;
			u->queued = true;
			TAILQ_INSERT_HEAD(&p->queue, u, entry);
			p->nqueued++;
		} else {
			pg_unit_fail_detached(u, true, err);
		}
	}
	event_active(p->kick_ev, EV_TIMEOUT, 0);
}

/* The step's sync came back: judge it and hand it to the unit. */
static void
pg_conn_step_done(struct pg_conn *c)
{
	c->syncing = false;
	struct pg_unit *u = c->u;
	if (c->state == PGC_SETUP || c->state == PGC_CLEANUP) {
		bool ok = PQtransactionStatus(c->pc) == PQTRANS_IDLE;
		if (!ok) {
			pg_conn_fail(c, "database setup failed", PQerrorMessage(c->pc));
			return;
		}
		if (c->state == PGC_SETUP) {
			c->backoff = 0;
			c->p->connects++;
		}
		c->state = PGC_IDLE;
		pg_kick(c->p);
		return;
	}
	if (!u)
		return;
	u->step_open = false;
	u->steps++;
	for (int i = 0; i < u->nres; i++) {
		PGresult *r = u->res[i];
		ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
		if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
			continue;
		if (st == PGRES_PIPELINE_ABORTED && !u->ok)
			continue;
		u->ok = false;
		u->failed_at = i;
		const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
		/* 08: connection exception; 57P0x: shutdown or cannot connect now; 40: deadlock or serialization
		 * failure; 55P03: lock not available. Worth running again later. */
		bool conn = state && (strncmp(state, "08", 2) == 0 || strncmp(state, "57P0", 4) == 0);
		u->lost = conn || (state && (strncmp(state, "40", 2) == 0 || strcmp(state, "55P03") == 0));
		pg_errline(u->err, sizeof(u->err), conn ? "database connection lost" : "database error",
		           r ? PQresultErrorMessage(r) : "statement not run");
		break;
	}
	u->on_step(u);
}

/* Read what came, and pass each result to the statement it answers. */
static void
pg_conn_read(struct pg_conn *c)
{
	if (PQconsumeInput(c->pc) != 1) {
		pg_conn_fail(c, "database connection lost", PQerrorMessage(c->pc));
		return;
	}
	if (c->flushing)
		pg_conn_flush(c);
	while (c->pc && c->syncing && !PQisBusy(c->pc)) {
		PGresult *r = PQgetResult(c->pc);
		if (!r) {
			if (!c->got)
				break; /* nothing more yet */
			c->cur++;
			c->got = false;
			continue;
		}
		if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
			PQclear(r);
			pg_conn_step_done(c); /* may free or reuse c's step: stop reading here */
			return;
		}
		c->got = true;
		struct pg_unit *u = c->u;
		if (u && c->cur < u->nres && !u->res[c->cur])
			u->res[c->cur] = r;
		else
			PQclear(r);
	}
	if (c->pc && PQstatus(c->pc) == CONNECTION_BAD)
		pg_conn_fail(c, "database connection lost", PQerrorMessage(c->pc));
}

static void
pg_conn_on_read(evutil_socket_t fd, short what, void *arg)
{
	pg_conn_read(arg);
}

static void
pg_conn_flush(struct pg_conn *c)
{
	int r = PQflush(c->pc);
	if (r < 0) {
		pg_conn_fail(c, "database connection lost", PQerrorMessage(c->pc));
		return;
	}
	c->flushing = r == 1;
	if (c->flushing)
		event_add(c->wev, NULL);
}

static void
pg_conn_on_write(evutil_socket_t fd, short what, void *arg)
{
	struct pg_conn *c = arg;
	if (c->flushing)
		pg_conn_flush(c);
}

/* Connected: non-blocking, pipeline mode, session settings. */
static void
pg_conn_ready(struct pg_conn *c)
{
	struct pgpool *p = c->p;
	event_free(c->cev);
	c->cev = NULL;
	if (PQsetnonblocking(c->pc, 1) != 0 || PQenterPipelineMode(c->pc) != 1) {
		pg_conn_fail(c, "database connection failed", PQerrorMessage(c->pc));
		return;
	}
	PQsetNoticeProcessor(c->pc, pg_notice, NULL);
	int fd = PQsocket(c->pc);
	c->rev = event_new(p->base, fd, EV_READ | EV_PERSIST, pg_conn_on_read, c);
	c->wev = event_new(p->base, fd, EV_WRITE, pg_conn_on_write, c);
	if (!c->rev || !c->wev || event_add(c->rev, NULL) < 0)
		fatalx("database: cannot watch a connection");
	c->state = PGC_SETUP;
	/* timestamps in task rows returned to Celery read like Python's isoformat() of UTC datetimes */
	c->nsent = 1;
	PQsendQueryParams(c->pc, "SET TIME ZONE 'UTC'", 0, NULL, NULL, NULL, NULL, 0);
	pg_conn_start_sync(c);
}

static void pg_conn_on_connect(evutil_socket_t fd, short what, void *arg);

/* Wait for what PQconnectPoll asked for (the socket may change between polls). */
static void
pg_conn_connect_wait(struct pg_conn *c, PostgresPollingStatusType ps)
{
	if (c->cev)
		event_free(c->cev);
	double left = c->connect_deadline - now_mono();
	if (left < 0.001)
		left = 0.001;
	struct timeval tv = {.tv_sec = (time_t)left, .tv_usec = (suseconds_t)((left - (double)(time_t)left) * 1e6)};
	c->cev = event_new(c->p->base, PQsocket(c->pc), ps == PGRES_POLLING_READING ? EV_READ : EV_WRITE,
	                   pg_conn_on_connect, c);
	if (!c->cev || event_add(c->cev, &tv) < 0)
		fatalx("database: cannot watch a connection");
}

static void
pg_conn_on_connect(evutil_socket_t fd, short what, void *arg)
{
	struct pg_conn *c = arg;
	if (what & EV_TIMEOUT) {
		pg_conn_fail(c, "database connection failed", "timeout expired");
		return;
	}
	PostgresPollingStatusType ps = PQconnectPoll(c->pc);
	if (ps == PGRES_POLLING_FAILED)
		pg_conn_fail(c, "database connection failed", PQerrorMessage(c->pc));
	else if (ps == PGRES_POLLING_OK)
		pg_conn_ready(c);
	else
		pg_conn_connect_wait(c, ps);
}

static void
pg_conn_connect(struct pg_conn *c)
{
	/* defaults first: a value given in the URL, expanded from dbname after them, wins */
	const char *keys[] = {"application_name", "keepalives_idle", "keepalives_interval",
	                      "keepalives_count", "dbname",          NULL};
	const char *vals[] = {"spark-worker", "30", "10", "3", c->p->url, NULL};
	c->state = PGC_CONNECTING;
	c->connect_deadline = now_mono() + PG_CONNECT_TIMEOUT_S;
	c->pc = PQconnectStartParams(keys, vals, 1);
	if (!c->pc) {
		pg_conn_fail(c, "database connection failed", "out of memory");
		return;
	}
	if (PQstatus(c->pc) == CONNECTION_BAD) {
		pg_conn_fail(c, "database connection failed", PQerrorMessage(c->pc));
		return;
	}
	pg_conn_connect_wait(c, PGRES_POLLING_WRITING);
}

/* ---- the queue ---- */

/* Fail the units queued for longer than min_wait seconds; a callback may queue new ones (not failed here). */
static void
pg_fail_queue(struct pgpool *p, double min_wait, const char *err)
{
	struct pg_unitq failing = TAILQ_HEAD_INITIALIZER(failing);
	double now = now_mono();
	struct pg_unit *u, *next;
	for (u = TAILQ_FIRST(&p->queue); u; u = next) {
		next = TAILQ_NEXT(u, entry);
		if (now - u->queued_at < min_wait)
			continue;
		pgpool_withdraw(u);
		TAILQ_INSERT_TAIL(&failing, u, entry);
	}
	while ((u = TAILQ_FIRST(&failing))) {
		TAILQ_REMOVE(&failing, u, entry);
		pg_unit_fail_detached(u, false, err);
	}
}

/* Give idle connections to queued units, open more when needed, fail the queue when none can come. */
static void
pg_kick(struct pgpool *p)
{
	for (int i = 0; i < p->size && p->nqueued > 0; i++) {
		struct pg_conn *c = &p->conns[i];
		if (c->state != PGC_IDLE)
			continue;
		struct pg_unit *u = TAILQ_FIRST(&p->queue);
		pgpool_withdraw(u);
		c->state = PGC_BUSY;
		c->u = u;
		u->conn = c;
		u->on_conn(u);
	}
	if (p->nqueued == 0)
		return;
	/* open more connections while fewer are on their way than units wait (busy ones free up too, but a
	 * pool is there to be used) */
	int coming = 0;
	for (int i = 0; i < p->size; i++) {
		enum pg_cstate st = p->conns[i].state;
		coming += st == PGC_CONNECTING || st == PGC_SETUP || st == PGC_CLEANUP;
	}
	double now = now_mono();
	for (int i = 0; i < p->size && coming < p->nqueued; i++) {
		struct pg_conn *c = &p->conns[i];
		if (c->state == PGC_DOWN && c->retry_at <= now) {
			pg_conn_connect(c);
			coming += c->state != PGC_DOWN;
		}
	}
	bool any = false;
	for (int i = 0; i < p->size; i++)
		any = any || p->conns[i].state != PGC_DOWN;
	if (any)
		return;
	/* the database cannot be reached now: callers defer instead of waiting for the backoff */
	char err[512];
	snprintf(err, sizeof(err), "%s", p->last_err[0] ? p->last_err : "database connection failed");
	pg_fail_queue(p, 0, err);
}

static void
pg_on_kick(evutil_socket_t fd, short what, void *arg)
{
	pg_kick(arg);
}

/* Once a second: no unit waits for a connection, and no step for a reply, beyond their limits. */
static void
pg_on_watch(evutil_socket_t fd, short what, void *arg)
{
	struct pgpool *p = arg;
	double now = now_mono();
	for (int i = 0; i < p->size; i++) {
		struct pg_conn *c = &p->conns[i];
		if (c->syncing && now - c->step_at > PG_STEP_LIMIT_S)
			pg_conn_fail(c, "database connection lost", "no reply within the step limit");
	}
	pg_fail_queue(p, PG_QUEUE_WAIT_S, "database busy: no connection became free in time");
}

int
pgpool_init(struct pgpool *p, struct event_base *base, const char *url, int size)
{
	memset(p, 0, sizeof(*p));
	TAILQ_INIT(&p->queue);
	p->base = base;
	p->url = xstrdup(url);
	p->size = size < 1 ? 1 : size > PG_POOL_MAX_SIZE ? PG_POOL_MAX_SIZE : size;
	p->conns = xcalloc((size_t)p->size, sizeof(*p->conns));
	for (int i = 0; i < p->size; i++)
		p->conns[i].p = p;
	p->kick_ev = event_new(base, -1, 0, pg_on_kick, p);
	p->watch_ev = event_new(base, -1, EV_PERSIST, pg_on_watch, p);
	struct timeval sec = {1, 0};
	if (!p->kick_ev || !p->watch_ev || event_add(p->watch_ev, &sec) < 0) {
		pgpool_free(p);
		return -1;
	}
	return 0;
}

void
pgpool_free(struct pgpool *p)
{
	for (int i = 0; p->conns && i < p->size; i++) {
		struct pg_unit *u = p->conns[i].u;
		if (u) {
			pg_unit_clear_results(u);
			u->conn = NULL;
		}
		pg_conn_close(&p->conns[i]);
	}
	struct pg_unit *u;
	while ((u = TAILQ_FIRST(&p->queue)))
		pgpool_withdraw(u);
	if (p->kick_ev)
		event_free(p->kick_ev);
	if (p->watch_ev)
		event_free(p->watch_ev);
	free(p->conns);
	free(p->url);
	memset(p, 0, sizeof(*p));
}

int
pgpool_open_count(const struct pgpool *p)
{
	int n = 0;
	for (int i = 0; i < p->size; i++)
		n += p->conns[i].state != PGC_DOWN;
	return n;
}

/*
 * PostgreSQL on the process's event loop: a small pool of non-blocking libpq connections in pipeline mode.
 *
 * Work is a unit: it waits in the pool's queue for a connection, then sends steps. A step is a batch of
 * statements sent back to back and closed by a pipeline sync, so it costs one round trip whatever its size; the
 * unit reads the step's results and sends the next step (an interactive transaction keeps its connection between
 * steps) or ends. Statements of a step without BEGIN run as one implicit transaction.
 *
 * Connections are opened on demand (up to the pool size) and kept. One dropped while established is reopened at
 * the next demand; a failed connect backs off (0.5 s doubling to 10 s). While no connection is open or coming,
 * queued units fail at once (lost): the database is down and callers defer rather than wait. A unit also fails
 * when no connection came within PG_QUEUE_WAIT_S, and a step without a reply for PG_STEP_LIMIT_S drops its
 * connection: nothing waits forever.
 */
#ifndef SPARK_PGPOOL_H
#define SPARK_PGPOOL_H

#include <stdbool.h>
#include <sys/queue.h>

#include <libpq-fe.h>

struct event_base;
struct event;

#define PG_QUEUE_WAIT_S  30.0
#define PG_STEP_LIMIT_S  120.0
#define PG_POOL_MAX_SIZE 64

struct pgpool;
struct pg_conn;
struct pg_unit;
TAILQ_HEAD(pg_unitq, pg_unit);

typedef void (*pg_unit_fn)(struct pg_unit *u);

struct pg_unit {
	TAILQ_ENTRY(pg_unit) entry;
	struct pgpool *pool;
	struct pg_conn *conn; /* while attached */
	/* a connection is attached: send the first step (pg_send ..., pg_sync) */
	pg_unit_fn on_conn;
	/* the step ended (ok), or it failed, or the unit could not get a connection (conn NULL): send the next
	 * step or call pg_end (after a failure: pg_end) */
	pg_unit_fn on_step;
	void *arg;
	/* how many times the first step may go again on another connection when its connection drops (only for a
	 * first step whose effect is nothing, or is safe to repeat: on_conn is then called again) */
	int resend;

	/* ---- the pool's ---- */
	bool queued;
	double queued_at;
	bool step_open; /* statements sent for the current step */
	int steps;      /* steps completed */

	/* ---- the step's outcome ---- */
	bool ok;
	bool lost;      /* may pass later: connection lost or database unreachable, deadlock, serialization, lock */
	bool conn_lost; /* the connection failed under the step (whether its COMMIT ran is unknown) */
	int failed_at;  /* index of the statement that failed, -1 */
	char err[512];  /* one line */
	PGresult **res; /* one per statement of the step; NULL for those not run */
	int nres, cap;
};

enum pg_cstate {
	PGC_DOWN = 0,
	PGC_CONNECTING,
	PGC_SETUP, /* connected, session settings on their way */
	PGC_IDLE,
	PGC_BUSY,    /* a unit is attached */
	PGC_CLEANUP, /* rolling back what a unit left open */
};

struct pg_conn {
	struct pgpool *p;
	PGconn *pc;
	enum pg_cstate state;
	struct event *rev, *wev; /* read (persistent) and write-ready (flush) once connected */
	struct event *cev;       /* the connect poll */
	double connect_deadline;
	double retry_at; /* monotonic: no connect before this (backoff after a failed connect) */
	double backoff;
	bool flushing;
	struct pg_unit *u;
	int nsent; /* statements of the step in flight */
	int cur;   /* the statement whose results are being read */
	bool got;  /* cur has its result */
	bool syncing;
	double step_at;
};

struct pgpool {
	struct event_base *base;
	char *url;
	int size;
	struct pg_conn *conns;
	struct pg_unitq queue;
	int nqueued;
	struct event *kick_ev;  /* run the queue on the next loop turn */
	struct event *watch_ev; /* deadlines of queued units and of steps */
	char last_err[512];     /* why the last connect failed */
	long connects;          /* successful connects so far */
};

/* A pool of size connections (1..PG_POOL_MAX_SIZE) to url; nothing connects until a unit needs it. */
int pgpool_init(struct pgpool *p, struct event_base *base, const char *url, int size);
/* Close every connection; units still queued or attached are abandoned (no callback). */
void pgpool_free(struct pgpool *p);
/* Queue u (its callbacks and arg set); on_conn or on_step run from the loop, never from here. Never free the
 * pool from a unit's callback. */
void pgpool_submit(struct pgpool *p, struct pg_unit *u);
/* Set u's callbacks, arg and resend rule, then submit it: what every caller does. */
void pgpool_run(struct pgpool *p, struct pg_unit *u, pg_unit_fn on_conn, pg_unit_fn on_step, void *arg, int resend);
/* Take a unit out of the queue if it waits there (a unit attached to a connection cannot be withdrawn). */
bool pgpool_withdraw(struct pg_unit *u);
/* Free what the unit holds (it must not be attached to a connection); withdraws it when queued. */
void pg_unit_release(struct pg_unit *u);
/* Connections open or opening. */
int pgpool_open_count(const struct pgpool *p);

/* Add a statement to the unit's step (text parameters, NULL = SQL NULL; copied at once). */
void pg_send(struct pg_unit *u, const char *sql, int nparams, const char *const *params);
/* Close the step: its results come back in one on_step. */
void pg_sync(struct pg_unit *u);
/* The unit is done: its connection goes back to the pool (rolled back first when a transaction is open). */
void pg_end(struct pg_unit *u);

/* Results of the last step: statement i's, or NULL when it did not run. */
PGresult *pg_result(const struct pg_unit *u, int i);
int pg_ntuples(const struct pg_unit *u, int i);
/* Row r, column c of statement i's result; NULL for SQL NULL or when absent. */
const char *pg_value(const struct pg_unit *u, int i, int r, int c);

#endif

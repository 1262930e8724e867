/*
 * The workflow plugin's insides (spark-workflow.so), all on the process's event loop:
 *
 *   wf-state.c    create, destroy, migrate (blocking, one-shot), the Fernet key
 *   workflow.c    one run: its entry points and the source call (source.c over http.c)
 *   wf-claim.c    the start of runs, grouped: claim their rows, load their workflows and sources
 *   wf-record.c   the end of an attempt: outcome, group-committed row writes, the database-error paths
 *   wf-beat.c     the schema check, the workers row (heartbeat, final write), recovery of dead workers' rows
 *
 * Every piece of state is in struct wf_state (one per process) or struct wf_job (one per run).
 */
#ifndef SPARK_WF_H
#define SPARK_WF_H

#include <stdbool.h>
#include <sys/queue.h>

#include "fernet.h"
#include "http.h"
#include "pgpool.h"
#include "source.h"
#include "task.h"

/* automagik-spark's key when AUTOMAGIK_SPARK_ENCRYPTION_KEY is unset (a public test key: tokens it made must
 * still decrypt, but it protects nothing, hence the warning) */
#define WF_TEST_KEY          "5aQaTalKCAOAgOPFV_xZrQVzWgE80mseLFW-x_sa06o="
#define WF_HEARTBEAT_DEFAULT 5.0
#define WF_ERR_WORKER_LOST   "worker lost"
#define WF_DEFAULT_INPUT     "Hello World"
#define WF_BATCH_MAX         256 /* attempts recorded by one group commit */
#define WF_CLAIM_MAX         256 /* runs claimed by one transaction */

/* The task row as execute_workflow returns it (automagik-spark's Task.to_dict, same key order). */
#define WF_ROW_JSON                                                                                                    \
	"json_build_object('id', id, 'workflow_id', workflow_id, 'schedule_id', schedule_id, 'status', status,"        \
	" 'input_data', input_data, 'output_data', output_data, 'error', error, 'tries', tries,"                       \
	" 'max_retries', max_retries, 'next_retry_at', next_retry_at, 'created_at', created_at,"                       \
	" 'updated_at', updated_at, 'started_at', started_at, 'finished_at', finished_at)"

struct wf_job;
TAILQ_HEAD(wf_jobq, wf_job);

/* A group of runs on one pool unit: a claim (wf-claim.c) or a group commit (wf-record.c); the first member of
 * what holds it. */
struct wf_batch {
	struct wf_state *st;
	struct wf_batches *set;
	TAILQ_ENTRY(wf_batch) entry;
	struct pg_unit unit;
	struct wf_jobq jobs; /* linked by qentry, in arrival order */
	int njobs;
	bool waiting; /* for a connection: takes what is queued when it gets one */
};
TAILQ_HEAD(wf_batchq, wf_batch);

/* The batches of one kind, waiting for a connection (at most one) or in flight. */
struct wf_batches {
	struct wf_batchq q;
	int n;
	bool waiting;
};

/* Where a run is (workflow.c, wf-claim.c, wf-record.c). */
enum wf_phase {
	WF_WAIT_SCHEMA = 0,
	WF_CLAIM,  /* queued for, or in, a claim transaction with its workflow and source (wf-claim.c) */
	WF_CALL,   /* the source call */
	WF_RECORD, /* the end of the attempt (wf-record.c) */
};

/* What the claim decided for a run (wf-claim.c). */
enum wf_claim_act {
	WF_ACT_ROW = 0,  /* its row is being read */
	WF_ACT_SCHEDULE, /* no row: its schedule is being read */
	WF_ACT_FINAL,    /* a final row: answered again */
	WF_ACT_REFUSED,  /* not run (claim_text says why) */
	WF_ACT_NOTHING,  /* missing or completed schedule: a null result */
	WF_ACT_RESTART,  /* the existing row runs again */
	WF_ACT_INSERT,   /* a new row runs */
};

/* How an attempt ends once its row write is committed (wf-record.c). */
enum wf_end {
	WF_END_OK = 0,      /* TASK_SUCCESS with the row */
	WF_END_FAILED,      /* row failed; out_* describe the Celery outcome */
	WF_END_RETRY,       /* row pending for the retry */
	WF_END_INTERRUPTED, /* cold stop: row pending, TASK_DEFER */
};

struct wf_job {
	struct wf_state *st;
	struct task_run *run;
	TAILQ_ENTRY(wf_job) entry;  /* st->jobs */
	TAILQ_ENTRY(wf_job) qentry; /* st->schema_wait, st->claimq, a claim, st->recq or a record */
	enum wf_phase phase;
	bool manual; /* spark.run_task: the row exists already */
	char schedule_id[37];
	char row[37];
	char workflow_id[37];
	char status[16]; /* the row's status when claimed */
	char *error;     /* the row's error when claimed */
	char *input;
	int tries;
	bool current;   /* listed in the workers row's current_tasks (set by wf_set_current) */
	int cur_at;     /* while current: its index in st->cur_rows */
	bool committed; /* ... and its claim committed: may be named in current_task_id */
	bool claimed;   /* the row is ours and running */
	struct pg_unit unit;

	/* the claim (wf-claim.c) */
	enum wf_claim_act act;
	bool one_time;          /* it completes its one-time schedule */
	const char *why;        /* a restart's reason in its log line, or NULL */
	const char *claim_what; /* what the failed claim was doing */
	char *claim_text;       /* FINAL: the row as JSON; REFUSED: why */
	int stmt_at, nstmt;     /* its own statements in the claim's write step */

	/* the source call */
	char *remote, *type, *url, *token;
	char *api_key;
	size_t keylen;
	struct source_request req;
	struct source_call call;

	/* the row write of the attempt's end */
	enum wf_end end;
	const char *rec_status; /* completed, failed, pending */
	json_t *rec_output;     /* output_data (a JSON string), or NULL */
	char *rec_error;        /* error column, or NULL */
	double rec_retry_in;
	const char *rec_level;
	char *rec_msg;        /* the task_logs line */
	const char *rec_what; /* "recording the result", ...: for errors */
	enum task_outcome out_outcome;
	const char *out_module, *out_type;
	char *out_msg;
	char *row_json; /* the row as committed */
	char err[1024];
};

struct wf_state {
	const struct spark_config *cfg;
	struct event_base *base;
	bool enabled; /* DATABASE_URL set */
	char *node;
	char *node_json; /* node as a JSON string literal */
	char pid[16];
	char worker_id[37];
	double http_timeout;
	double orphan_age; /* a running row untouched this long, in no live worker, is lost */
	double hb_interval;
	double started;
	int nslots;

	unsigned char key[FERNET_KEY_LEN];
	bool key_ok;
	char key_err[200];

	struct pgpool pool;
	struct http http;

	struct wf_jobq jobs; /* every run in progress */
	int njobs;
	/* the rows of the current runs, packed: the workers row lists them with every batch, and walking a thousand
	 * runs for it cost more than the batch's own statements */
	char (*cur_rows)[36];
	struct wf_job **cur_jobs;
	int ncur, cur_cap;
	long processed, succeeded, failed, retried;

	/* wf-beat.c: the schema check, once per process */
	bool schema_ready;
	bool schema_busy;
	struct pg_unit schema_unit;
	struct wf_jobq schema_wait; /* runs waiting for it */
	bool schema_hb_wait;        /* the heartbeat waits for it */
	int schema_phase;           /* wf-beat.c's SCHEMA_* */

	/* wf-beat.c: heartbeat and recovery */
	struct event *hb_ev;
	struct pg_unit hb_unit;
	bool hb_busy;
	bool hb_warned; /* one warning per outage, not one per beat */

	/* wf-claim.c: grouped claims */
	struct wf_jobq claimq; /* runs waiting for a claim */
	struct wf_batches claims;

	/* wf-record.c: group commit */
	struct wf_jobq recq; /* attempts waiting for the next batch */
	struct wf_batches recs;

	/* wf-beat.c: shutdown */
	bool stopping;
	bool stop_final_sent;
	bool stop_called;
	void (*stop_done)(void *arg);
	void *stop_arg;
	struct event *stop_deadline_ev;
	struct event *stop_done_ev;
	struct pg_unit stop_unit;
};

/* wf-state.c */
struct wf_state *wf_create(const struct spark_config *cfg, const char *node, int slots, struct event_base *base);
void wf_destroy(struct wf_state *st);
int wf_migrate(const struct spark_config *cfg);
/* b (zeroed, the first member of an allocation) joins set; its end takes it out and frees the allocation */
void wf_batch_add(struct wf_state *st, struct wf_batches *set, struct wf_batch *b, bool waiting);
void wf_batch_attached(struct wf_batch *b); /* it has its connection: no longer the one waiting */
void wf_batch_free(struct wf_batch *b);
/* How many connections one kind of batch may hold, given the other kind's batches and queue. */
int wf_batch_most(const struct wf_state *st, const struct wf_batches *other, const struct wf_jobq *other_q);
void wf_claim_kick(struct wf_state *st);
void wf_rec_kick(struct wf_state *st);
void wf_set_current(struct wf_job *j, bool on); /* in or out of the workers row's current_tasks */
void wf_batches_free(struct wf_batches *set);

/* workflow.c */
void wf_execute_workflow(struct wf_state *st, struct task_run *run);
void wf_run_task(struct wf_state *st, struct task_run *run);
void wf_fail(struct task_run *run, enum task_outcome outcome, const char *module, const char *type, const char *fmt,
             ...) __attribute__((format(printf, 5, 6)));
void wf_call_start(struct wf_job *j); /* after the claim: decrypt the key, call the source */
void wf_job_end(struct wf_job *j);    /* run->done, and the job is freed */
void wf_job_free(struct wf_job *j);   /* what the job holds, and the job (not its run) */

/* wf-claim.c */
void wf_claim_start(struct wf_job *j); /* after the schema check */

/* wf-claim-row.c: a run's decision in its claim (j->act and what goes with it) */
/* from its row: tuple r of the rows read (id, status, error, workflow_id, input_data, tries, the row as JSON) */
void wf_claim_existing(struct wf_job *j, const struct pg_unit *u, int r);
/* from its schedule: tuple r of statement 0 (id, workflow_id, schedule_type, status, params, input_data), -1:
 * none; j is in its claim's list, after the runs decided before it */
void wf_claim_schedule(struct wf_job *j, const struct pg_unit *u, int at, int r);
void wf_claim_refuse(struct wf_job *j, char *msg); /* not run: msg (taken) says why */
void wf_claim_answer(struct wf_job *j);            /* the result of a run not started; ends it */

/* wf-record.c */
/* End the attempt with a row write (fields rec_* and out_* set by the finish helpers). */
void wf_finish_ok(struct wf_job *j, json_t *output);
void wf_finish_failed(struct wf_job *j, enum task_outcome outcome, const char *module, const char *type,
                      const char *msg);
void wf_finish_retry(struct wf_job *j, const char *msg, bool timeout);
void wf_finish_cancelled(struct wf_job *j);
/* The database let us down (j->err says how): TASK_DEFER when it may pass later, else a failure (and the row
 * marked failed when it is ours). Ends the job. */
void wf_db_error(struct wf_job *j, const char *what, bool lost);
void wf_record_free(struct wf_job *j);
/* task_logs lines gathered in a JSON array, then sent as one statement of u's step (logs is consumed). */
json_t *wf_logs_new(void);
void wf_logs_add(json_t *logs, const char *task_row, const char *level, const char *msg);
void wf_logs_send(struct pg_unit *u, json_t *logs);

/* wf-beat.c */
void wf_schema_need(struct wf_job *j); /* claim once the schema is known to be there */
/* The workers-row upsert as a statement of u's step: task_path as in the DEADLOCK note (wf-beat.c). */
void wf_send_worker_upsert(struct wf_state *st, struct pg_unit *u, bool task_path, const char *own_row);
void wf_beat_start(struct wf_state *st);
void wf_shutdown(struct wf_state *st, double timeout_s, void (*done)(void *arg), void *arg);
void wf_shutdown_check(struct wf_state *st); /* a run ended: the shutdown may go on */
void wf_beat_free(struct wf_state *st);

#endif

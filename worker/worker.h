/*
 * spark-worker: one process, one libevent loop. A slot is a state machine, not a thread.
 *
 *   main.c      command line, configuration, process start and exit
 *   loop.c      the process: event base, signals, stops, recycling, limits, the per-tick flush
 *   rpipe.c     an async Redis connection (hiredis + libevent) that reconnects, loads scripts and reports down/up
 *   rpipe-glue.c its loop events and pooled reply objects
 *   scripts.c   the Lua scripts (one definition each) and their ids
 *   fetch.c     batched reliable fetch, the idle wait (CLIENT TRACKING invalidations), reconcile after reconnect
 *   job.c       a held message from fetch to its end: decode, dispatch to a slot, time limits, task completion
 *   job-pool.c  jobs' memory, reused;  job-tick.c  what held jobs send at the end of a tick
 *   outcome.c   "record, then ack": the one place that writes a job's outcome and confirms it
 *   sweep.c     housekeeping: ETA moves, lease refresh, dead-process recovery, kombu sweep, queue lengths
 *   message.c   Celery envelope scan (jsmn, no DOM on the hot path), retry envelopes, key naming
 *   meta.c      Celery result metas built into a reused buffer
 *   tasks.c     task registry and the built-in tasks
 *   commands.c  sparkd's commands on fd 3 (common/command.h): read on the loop, dispatched
 *   revoke.c    the revoked ids (SPARK_REVOKED_KEY, loaded on every connect, extended by commands)
 *   events.c    Celery task events on the celeryev fanout, in the tick's pipeline
 *   query.c     answers to sparkd's queries: what the process holds, as Celery's request-info dicts
 *
 * Redis keys owned by spark-worker (besides Celery's queues and kombu's unacked records):
 *   spark:processing                 SET of the processing lists of live processes
 *   spark:processing:<host>:<pid>    LIST: messages this process holds (kombu's unacked records follow them)
 *   spark:processing:<host>:<pid>:landing
 *                                    LIST: unused by this engine; still recovered for processes of older builds
 *   spark:alive:<host>:<pid>         STRING with a TTL, refreshed while the process lives
 *   spark:eta                        ZSET: messages waiting for their ETA (score = epoch seconds)
 *   spark:revoked                    ZSET: revoked task ids (score = expiry), written by sparkd (command.h)
 *   spark:deadletter                 LIST: bad messages with the reason, newest first, SPARK_DEADLETTER_MAX entries
 *   spark:deliveries:<delivery tag>  STRING with a TTL: deaths of the processes that held the message, in a row
 */
#ifndef SPARK_WORKER_H
#define SPARK_WORKER_H

#include <event2/event_struct.h>
#include <hiredis.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/queue.h>

#include "codec.h"
#include "config.h"
#include "report.h"
#include "task.h"

struct event_base;
struct event;
struct redisAsyncContext;

#define KEY_UNACKED           "unacked"
#define KEY_UNACKED_INDEX     "unacked_index"
#define KEY_UNACKED_MUTEX     "unacked_mutex"
#define KEY_PROCESSING_SET    "spark:processing"
#define KEY_PROCESSING_PREFIX "spark:processing:"
#define KEY_LANDING_SUFFIX    ":landing"
#define KEY_ALIVE_PREFIX      "spark:alive:"
#define KEY_ETA               "spark:eta"
#define KEY_DEADLETTER        "spark:deadletter"
#define KEY_DELIVERIES_PREFIX "spark:deliveries:"
#define KEY_INVALIDATE        "__redis__:invalidate"
#define KOMBU_SEP             "\x06\x16"
#define RESULT_KEY_PREFIX     "celery-task-meta-"
#define RESULT_EXPIRES        86400
#define ALIVE_TTL_S           30
#define DEFER_DELAY_S         5.0
/* the longest task id and name a message may carry (longer ones are dead-lettered with the reason) */
#define MESSAGE_MAX_ID      16384
#define MESSAGE_MAX_NAME    1024
#define MESSAGE_MAX_RETRIES 1000000
/* a dead-letter entry keeps at most this much of its message ("truncated" and "message_bytes" say so) */
#define DEADLETTER_MESSAGE_MAX 65536
/* how long a delivery count waits for the message's next delivery */
#define DELIVERIES_TTL_S 86400

/* ---- sbuf (meta.c): a growable byte buffer, reused across tasks ---- */

struct sbuf {
	char *p;
	size_t len, cap;
};
void sbuf_reset(struct sbuf *b);
void sbuf_grow(struct sbuf *b, size_t n); /* room for n more bytes and the NUL */
static inline void
sbuf_reserve(struct sbuf *b, size_t n)
{
	if (b->len + n >= b->cap)
		sbuf_grow(b, n);
}
/* Inline: the RESP encoder and the meta builder append a few bytes at a time. The text stays NUL-terminated
 * after every append, so b->p is a C string too. */
static inline void
sbuf_add(struct sbuf *b, const void *p, size_t n)
{
	sbuf_reserve(b, n);
	if (n > 0)
		memcpy(b->p + b->len, p, n);
	b->len += n;
	b->p[b->len] = '\0';
}
void sbuf_adds(struct sbuf *b, const char *s);
/* s as a JSON string literal (quotes, escapes); bytes that are not UTF-8 become U+FFFD */
void sbuf_add_json_string(struct sbuf *b, const char *s, size_t n);
void sbuf_free(struct sbuf *b);
/* Numbers as the hot path writes them, without printf (a snprintf cost more than the rest of a meta): decimal, and
 * v with 1 to 9 decimals as "%.*f" (snprintf's for values outside [0, 1e15)) into out, NUL-terminated; its length */
void sbuf_add_uint(struct sbuf *b, unsigned long long v);
size_t sbuf_digits(unsigned long long v, char *out); /* into out (20 bytes), not terminated; the count */
#define SBUF_FIXED_MAX 48
size_t sbuf_fixed(double v, int decimals, char out[SBUF_FIXED_MAX]);

/* ---- message.c ---- */

/*
 * A decoded Celery task message. The hot path scans the envelope with jsmn and keeps raw JSON spans; strings
 * that needed unescaping and the decoded body live in m->store. Everything stays valid until message_free.
 */
struct message {
	char *store;      /* owned: unescaped strings and the decoded body text */
	const char *body; /* the decoded body text (JSON), in store */
	size_t body_len;
	const char *task_name;            /* NULL when unreadable */
	const char *task_id;              /* NULL when unreadable */
	const char *parent_id, *group_id; /* for the result meta; NULL when absent */
	const char *args_json;            /* raw JSON of args (an array), in body */
	size_t args_len;
	const char *kwargs_json; /* raw JSON of kwargs (an object), in body */
	size_t kwargs_len;
	const char *arg0_json; /* raw JSON of args[0]; NULL when args is empty */
	size_t arg0_len;
	int retries;
	double eta, expires;           /* epoch seconds; 0 = none */
	double hard_limit, soft_limit; /* from timelimit; -1 = not given */
	bool ignore_result;
	bool redelivered;
	bool v1; /* protocol v1: task fields live in the body */
	int priority;
	const char *exchange, *routing_key, *delivery_tag; /* "" when absent */
	/* DOM of args, kwargs and headers, built only by message_dom (tasks that need values) */
	json_t *args, *kwargs, *headers;
	/* why the message is bad (message_decode returned -1) */
	char exc_type[32];
	char reason[256];
};

/* Decode an envelope. 0 = runnable; -1 = bad (m->reason, m->exc_type; m->task_id may still be set).
 * Always call message_free afterwards. */
int message_decode(const char *raw, size_t len, struct message *m);
/* Build m->args, m->kwargs, m->headers with jansson (idempotent). 0, or -1 with m->reason set. */
int message_dom(struct message *m, const char *raw, size_t len);
void message_free(struct message *m);

/* What the sweeps need of an envelope, read from its tokens only (the body is never decoded: cheap for a message
 * too large to decode). Strings are copies (NULL when absent or not strings); free with message_peek_free. */
struct message_peek {
	char *id; /* headers.id, else properties.correlation_id */
	char *tag, *routing_key;
	int priority; /* 0 when absent or malformed */
	bool ignore_result;
};
/* 0, or -1 when raw is not a JSON object (pk is then all empty). */
int message_peek(const char *raw, size_t len, struct message_peek *pk);
void message_peek_free(struct message_peek *pk);

/* ISO 8601 as Celery writes it (fraction optional, Z, +HH:MM, or naive = UTC) -> epoch seconds. */
int message_parse_iso(const char *s, double *out);
/* aware: "2026-11-26T18:46:22.400551+00:00"; naive (Celery 5.2's date_done): "2026-11-26T18:46:05.338234" */
void message_format_iso(double t, bool aware, char *buf, size_t len);

/* kombu's priority step (0, 3, 6, 9) and the Redis key of a queue at a priority (caller frees). */
int message_priority_step(int priority);
char *message_queue_key(const char *queue, int priority);
/* The queue name of a priority key ("celery\x06\x163" -> "celery"); caller frees. */
char *message_queue_of_key(const char *key);

/* A retry of the message raw (decoded as m): same id, retries, eta, a new delivery_tag; caller frees. */
char *message_build_retry(const char *raw, size_t len, const struct message *m, int retries, double eta);
/* The same envelope with kombu's redelivered flags set; NULL when raw is not a JSON object. */
char *message_mark_redelivered(const char *raw, size_t len);
/* The spark:deadletter entry: {"reason", "queue", "at", "message"} (plus "message_base64" for non-UTF-8); a message
 * longer than DEADLETTER_MESSAGE_MAX keeps its head, with "truncated": true and "message_bytes". */
char *message_deadletter_entry(const char *reason, const char *queue, double at, const char *raw, size_t len);
/* The spark:eta member: {"queue": key, "envelope": raw}. */
char *message_eta_member(const char *qkey, const char *raw, size_t len);
/* Seconds until a retry: Celery's exponential backoff with equal jitter, or the fixed default delay. */
double message_retry_countdown(const struct spark_config *cfg, int retries, double rand01);

/* ---- meta.c: Celery result metas (reference §3), what AsyncResult.get() in Python reads ---- */

/* The meta of task_id into b (reset first): {"status", "result", "traceback", "children", "date_done",
 * ["parent_id", "group_id",] "task_id"}. result_json is raw JSON (NULL = null); m may be NULL. */
void meta_build(struct sbuf *b, const char *task_id, const char *status, const char *result_json, size_t result_len,
                const char *traceback, const struct message *m);
/* message_format_iso's text without printf, NUL-terminated; its length. */
#define META_ISO_MAX 40
size_t meta_iso(double t, bool aware, char out[META_ISO_MAX]);
/* {"exc_type", "exc_message": [message], "exc_module"} as raw JSON into b (reset first). */
void meta_exception(struct sbuf *b, const char *module, const char *type, const char *message);

/* ---- scripts.c ---- */

enum script_id {
	SCRIPT_FETCH = 0, /* up to N messages over every queue key, recorded in kombu's unacked */
	SCRIPT_DEADLETTER,
	SCRIPT_PARK,
	SCRIPT_REQUEUE,
	SCRIPT_DUE,
	SCRIPT_SWEEP_ONE,
	SCRIPT_UNLOCK,
	SCRIPT_UNREGISTER,
	SCRIPT_STORE,
	SCRIPT_FINISH,
	SCRIPT_OVERSIZE, /* a message too large to decode, from a list to the dead letters, found by its size and head
	                  */
	SCRIPT_RECOVER,  /* a dead process's message back to its queue, or to the dead letters as poison */
	SCRIPT_COUNT,
};
extern const char *const script_src[SCRIPT_COUNT];

/* ---- rpipe.c: an async Redis connection ---- */

struct worker;
struct rpipe;

/* A command's reply; r is NULL when the connection was lost before the reply came: whether the command ran is
 * unknown. The reply is freed by hiredis after the callback returns. */
typedef void (*rpipe_cb)(struct rpipe *p, redisReply *r, void *arg);

enum rpipe_kind {
	RPIPE_COMMANDS, /* pipelined commands; scripts loaded on connect */
	RPIPE_NOTIFY,   /* SUBSCRIBEd to __redis__:invalidate; the command connection's tracking redirects here */
};

struct rpipe {
	struct worker *w;
	enum rpipe_kind kind;
	const struct redis_url *url;
	const char *what;                    /* "broker", "result backend": for logs */
	struct redisAsyncContext *ac;        /* NULL while disconnected */
	bool ready;                          /* connected, AUTH/SELECT (and SCRIPT LOAD) done */
	bool down;                           /* counted in w->down */
	double backoff;                      /* next reconnect delay */
	struct event *retry_ev;              /* reconnect timer */
	unsigned gen;                        /* successful connects */
	long long client_id;                 /* CLIENT ID of this connection */
	int inflight;                        /* replies outstanding */
	double last_progress;                /* monotonic: last reply seen, or when inflight went from 0 to 1 */
	unsigned long replies, replies_seen; /* replies counted, and as of the last hang check */
	char sha[SCRIPT_COUNT][41];
	struct rcall *free_calls;   /* spare command records */
	struct rnode *free_replies; /* spare reply objects (rpipe.c's reply functions) */
	int nfree_replies;
	struct sbuf fmt; /* the command being encoded */
	/* called once ready after each (re)connect, and when the connection is lost */
	void (*on_up)(struct rpipe *p);
	void (*on_down)(struct rpipe *p);
	/* RPIPE_NOTIFY: each invalidated key (NULL key: flush of everything) */
	void (*on_invalidate)(struct rpipe *p, const char *key, size_t len);
};

void rpipe_init(struct rpipe *p, struct worker *w, enum rpipe_kind kind, const struct redis_url *url, const char *what);
void rpipe_start(struct rpipe *p); /* connect now (asynchronously) */
void rpipe_close(struct rpipe *p);
/* Queue one command (written with everything else queued in this loop tick). -1 when not ready: nothing sent
 * and cb not called. */
int rpipe_send(struct rpipe *p, rpipe_cb cb, void *arg, int argc, const char **argv, const size_t *lens);
/* EVALSHA of a loaded script: argv holds nkeys keys then nargs args. -1 when not ready. */
int rpipe_eval(struct rpipe *p, enum script_id id, rpipe_cb cb, void *arg, int nkeys, int nargs, const char **argv,
               const size_t *lens);
/* Give up on the connection (an error reply where success was needed, a hung server): every outstanding
 * callback gets NULL, on_down runs, and a reconnect follows after the backoff. */
void rpipe_fail(struct rpipe *p, const char *why);
/* Write what is queued at once (end of tick). */
void rpipe_flush(struct rpipe *p);
/* Drop a connection whose oldest outstanding reply is older than the limit (a hung server). */
void rpipe_check_hung(struct rpipe *p, double limit_s);
/* rpipe-glue.c: the connection's loop events and reply objects (set on each new context), and their free list */
void rpipe_glue_attach(struct rpipe *p, struct redisAsyncContext *ac);
void rpipe_glue_free(struct rpipe *p);

/* ---- the process ---- */

enum job_state {
	JOB_RESERVED = 0, /* fetched, decoded, waiting for a free slot (prefetch) */
	JOB_RUNNING,      /* its task runs in a slot */
	JOB_WRITING,      /* its end is being written (outcome.c); freed when Redis confirms it */
	JOB_ABANDONED,    /* the task still runs but its outcome was already written (hard limit, cold stop) */
};

/* How a job ends: what outcome.c writes. */
enum outcome_kind {
	OUT_NONE = 0,
	OUT_RESULT,     /* the result meta (when stored) and the ack: success, failure, revoked */
	OUT_RETRY,      /* the retry envelope into spark:eta, then RETRY meta and the ack */
	OUT_PARK,       /* into spark:eta as it is (ETA in the future, deferred) */
	OUT_REQUEUE,    /* back to its queue, marked redelivered (stopping, cold stop) */
	OUT_DEADLETTER, /* FAILURE meta when it has an id, then spark:deadletter */
};

struct job {
	TAILQ_ENTRY(job) entry;  /* w->jobs */
	TAILQ_ENTRY(job) rentry; /* w->reserved, while in_reserved */
	bool in_reserved;
	struct worker *w;
	enum job_state state;
	char *raw; /* the envelope exactly as in the processing list */
	size_t len;
	size_t raw_cap;   /* bytes allocated at raw (kept when the job is reused) */
	const char *qkey; /* the queue key it came from (one of w->qkeys) */
	bool unrecorded;  /* kombu's unacked records are still to be written */
	const char *tag;  /* kombu delivery tag, "" when none: the message's own, or owned (tag_owned) */
	bool tag_owned;
	struct message m;
	bool decoded; /* m holds a decoded message (message_free due) */
	int slot;     /* slot index while running, else -1 */
	task_fn fn;
	struct task_run run;
	struct event soft_ev, hard_ev; /* embedded: a job's timers cost no allocation */
	bool timers_assigned;
	bool record_sent;    /* kombu's records went out (else the ack has nothing of kombu's to remove) */
	bool record_queued;  /* its kombu records wait in w->to_record for the end of the tick */
	bool started_queued; /* its STARTED meta waits there too */
	bool report_queued;  /* its start report waits in w->unreported for the next report flush */
	double hard_s;       /* the hard limit it runs under (for the start report) */
	double started_mono;
	bool store_result;   /* outcome metas go to the result backend */
	bool started_report; /* a start report went to sparkd */
	/* the end: written by outcome.c, kept until confirmed and written again after a reconnect */
	enum outcome_kind out;
	const char *report_outcome; /* success failure retry revoked requeued */
	bool counted;               /* counts as processed */
	char *out_meta;             /* the meta to store (NULL: none), in meta_buf */
	struct sbuf meta_buf;       /* kept when the job is reused */
	char *out_env;              /* OUT_RETRY: the retry envelope; OUT_REQUEUE: the marked one */
	double out_at;              /* OUT_RETRY, OUT_PARK: the ETA score */
	char *out_reason;           /* OUT_DEADLETTER */
	int out_phase;              /* outcome.c's phase being written */
	int out_pending;            /* replies outstanding for the phase */
	bool out_exec;              /* the phase ends with EXEC */
	bool out_lost;              /* a reply was lost: write the phase again once reconnected */
	bool out_resent;            /* written again after a lost reply: the guarded writer from now on */
	bool out_confirmed;         /* every phase confirmed */
	bool ack_queued;            /* its plain end waits in w->acks for the end of the tick */
	bool task_ended;            /* an abandoned job's task has called done */
	int record_pending;         /* replies of kombu's records outstanding */
	int slot_reported;          /* the slot in its start report */
	double soft_s;              /* the soft limit it runs under */
	double started_wall;        /* epoch seconds it started (query active's time_start) */
	bool revoked;               /* run only so the workflow plugin records the revocation (cancel preset) */
	bool terminated;            /* revoked with terminate while running */
};
TAILQ_HEAD(jobq, job);

/* ---- revoke.c: the process's revoked ids, bounded (SPARK_REVOKED_MAX, oldest dropped) and expiring ---- */

struct revoke_entry;
TAILQ_HEAD(revoke_ageq, revoke_entry);
struct revoke_set {
	struct revoke_entry **buckets;
	size_t nbuckets;        /* a power of two */
	struct revoke_ageq age; /* oldest first: the one dropped when the set is full */
	int count;
};
/* Per-task-name time limits from the time_limit command (replace the process-wide ones for that name). */
struct name_limit {
	char *name;
	double soft, hard;
};
struct name_count {
	char *name;
	long n;
};

/* ---- events.c: task events (Celery's task-* on the celeryev fanout) ---- */

struct task_events {
	bool on;
	unsigned long clock; /* Lamport clock, as Celery's dispatcher forwards it */
	uint64_t rng;        /* delivery tags */
	struct sbuf head;    /* the body's fields every event repeats: hostname, utcoffset, pid */
	struct sbuf mid;     /* the envelope between the body and the routing key */
	struct sbuf env;     /* the envelope up to the end of the body: '{"body": "[' and the tick's events */
	struct sbuf chan;
	struct sbuf tmp;  /* a value escaped for JSON, before it is escaped for the body */
	time_t stamp_sec; /* the second whose digits are in stamp */
	char stamp[24];
	size_t stamp_len;
	int nbatch;
	const char *batch_type; /* the only event's type while nbatch is 1 */
};

struct worker {
	const struct spark_config *cfg;
	const char *node;
	int nslots;
	char host[256];
	long pid;
	struct event_base *base;
	struct reporter rep;
	char *proc_key, *landing_key, *alive_key;
	char **queues; /* the queues consumed now (cfg's, until a queues command replaces them) */
	int nqueues;
	char **qkeys; /* every priority key of every queue, priority-major (kombu's order) */
	char **qnames;
	int nqkeys;
	char **old_qkeys; /* keys of replaced queue sets: jobs and replies in flight still point at them */
	int nold_qkeys;

	struct rpipe broker;  /* every broker command */
	struct rpipe notify;  /* invalidations of the queue keys: the idle wait */
	struct rpipe backend; /* only when the result backend is another server */
	bool backend_on_broker;
	int down;          /* connections currently down (for the "problem" report) */
	char problem[400]; /* why the last one went down */

	struct jobq jobs;      /* every message this process holds */
	struct job *free_jobs; /* ended jobs kept for reuse, with their buffers (job.c) */
	int nfree_jobs;
	struct job **to_record; /* jobs fetched this tick whose kombu records wait for the tick's end */
	int nto_record, to_record_cap;
	struct job **acks; /* jobs whose plain end waits for the tick's shared MULTI/EXEC (outcome_flush) */
	int nacks, acks_cap;
	struct job **unreported; /* jobs started since the last report flush */
	int nunreported, unreported_cap;
	bool progress_dirty; /* tasks counted since the last flush without a report of their own */
	int njobs;
	int running;          /* jobs in a slot */
	struct job **slots;   /* nslots entries: the job in each slot, or NULL */
	int slot_hint;        /* no free slot below this index */
	struct jobq reserved; /* jobs that were JOB_RESERVED when queued: job_dispatch's work, not every job */
	int max_held;         /* nslots x prefetch multiplier */

	/* fetch.c */
	int fetching;         /* fetch commands outstanding */
	int writing;          /* jobs in JOB_WRITING */
	long long *probe_len; /* nqkeys: the last LLEN of each key */
	bool batch_probe;     /* the batch in flight carries a probe */
	bool batch_dry;       /* an LMOVE of the batch found its key empty */
	double next_probe;    /* monotonic; 0 = probe with the next batch, alone */
	bool fetch_idle;      /* the last fetch found nothing: wait for an invalidation */
	bool tracking;        /* CLIENT TRACKING is on for the current broker and notify connections */
	bool reconciling;     /* after a reconnect: no fetch until the processing list is reconciled */
	unsigned fetch_gen;   /* broker generation the last reconcile ran for */
	int fast_key;         /* the priority-0 key plain LMOVEs take from */
	struct event *poll_ev;

	/* loop.c */
	bool stop;      /* no more fetching: warm stop, recycle, hard limit */
	bool cold;      /* cold stop: cancel running tasks, put them back */
	bool recycling; /* "recycle" reported */
	bool draining_sent;
	bool ready_sent;
	bool started; /* start-up sweeps done, consuming */
	double cold_at;
	int sigints;
	long processed;
	long rss_kib;
	long rss_checked_at; /* processed when memory was last checked */
	double rss_read_at;
	size_t heap_at_read;  /* mallinfo2's bytes in use when the resident size was last read */
	long heap_checked_at; /* processed when mallinfo2 was last read */
	uint64_t rng;
	double reports_at; /* monotonic: the last report flush */
	struct event *report_ev;
	struct event *tick_ev; /* end of tick: flush reports, check memory */
	struct event *sig_ev[4];
	struct event *housekeeping_ev;
	struct event *exit_ev;
	int exit_status;
	struct wf_loader workflow; /* the workflow plugin, loaded with DATABASE_URL */
	bool leaving;
	struct sbuf meta;         /* reused meta buffer */
	struct sbuf keybuf;       /* reused key buffer */
	struct sbuf started_json; /* STARTED's result: {"pid": N, "hostname": node} */
	char ttl_str[16];         /* RESULT_EXPIRES */
	char db_str[2][16];       /* the broker's and the result backend's database numbers */
	struct sbuf scratch;

	/* sweep*.c */
	double next_due, next_refresh, next_recover, next_sweep, next_queues;
	bool due_running, refresh_running, queues_running, recover_running, unacked_running;
	long long *qlen_acc; /* nqueues: lengths summed over priority keys */
	struct dead_scan *dead_scan;
	void (*startup_done)(struct worker *w, bool ok);

	/* commands.c, revoke.c, events.c, query.c */
	struct event *cmd_ev; /* fd 3 readable: sparkd's commands */
	char *cmd_buf;        /* one datagram */
	struct revoke_set revoked;
	struct task_events events;
	struct name_limit *limits;
	int nlimits;
	double started_at;         /* epoch seconds the process started */
	struct name_count *totals; /* tasks started per name (query stats) */
	int ntotals, totals_cap;
};

/* loop.c */
void engine_set_queues(struct worker *w, int n, const char *const *names); /* replace the consumed queues */
int engine_init(struct worker *w, const struct spark_config *cfg, const char *node, int nslots);
int engine_run(struct worker *w); /* until stopped; the exit status */
void engine_free(struct worker *w);
void engine_recycle(struct worker *w, const char *reason);
void engine_tick(struct worker *w);       /* ask for an end-of-tick flush */
void engine_maybe_exit(struct worker *w); /* stopping and nothing held: unregister and leave */
void engine_conn_state(struct worker *w); /* a connection went down or up: report it */
void engine_flush_reports(struct worker *w, bool now);

/* fetch.c */
void fetch_kick(struct worker *w);         /* fetch for free capacity, if any */
void fetch_on_broker_up(struct worker *w); /* reconcile, tracking, then fetch */
void fetch_on_broker_down(struct worker *w);
void fetch_on_notify_up(struct worker *w);
void fetch_on_notify_down(struct worker *w);
void fetch_on_invalidate(struct worker *w, const char *key, size_t len);

/* job.c */
struct job *job_new(struct worker *w, const char *qkey, const char *raw, size_t len, const char *tag, bool unrecorded);
/* job-pool.c: a zeroed job (its buffers kept when reused; raw has room for len + 1), its end, the spare ones */
struct job *job_alloc(struct worker *w, size_t len);
void job_free(struct job *j);
void job_free_pool(struct worker *w); /* the jobs kept for reuse (engine_free) */
void job_dispatch(struct worker *w);  /* start reserved jobs in free slots */
void job_cancel_all(struct worker *w, enum task_cancel why);
void job_abandon_running(struct worker *w);  /* cold stop, grace over: put back what still runs */
void job_requeue_reserved(struct worker *w); /* warm stop: put back what has not started */
void job_list_add(struct job ***list, int *n, int *cap, struct job *j); /* append to a growable list of the tick */
void job_queue_record(struct job *j);
void job_unqueue_record(struct job *j);
void job_flush_records(struct worker *w); /* end of tick: kombu's records of the jobs still held */
void job_queue_report(struct job *j);
void job_report_starts(struct worker *w); /* report flush: the starts of jobs still running */
/* A revoke came (or the revoked set was loaded): end the held messages it names now; terminate: also stop the
 * running ones (signal: Celery's name, for the event). */
void job_revoke_held(struct worker *w, bool terminate, const char *signal);
bool job_is_workflow(const struct job *j);

/* outcome.c */
void outcome_write(struct job *j);     /* write j's end (j->out set); frees j once confirmed */
void outcome_resend(struct worker *w); /* after a reconnect: write again every end whose reply was lost */
void outcome_flush(struct worker *w);  /* end of tick: the plain ends queued in it, in one MULTI/EXEC */
/* The meta store for a job's start (STARTED), on the right connection, without waiting. */
void outcome_started(struct job *j);
/* kombu's unacked records for a job taken by a plain LMOVE (no round trip of its own). */
void outcome_record(struct job *j);

/* sweep.c: a chain of async commands whose replies are all needed before the next step */
struct chain {
	struct worker *w;
	void (*done)(struct worker *w, bool ok);
	int pending;
	bool failed;
	bool *running; /* the flag of the chain kind, cleared at the end */
	int step;      /* callbacks of a multi-reply step count themselves here */
};
struct chain *chain_new(struct worker *w, void (*done)(struct worker *w, bool ok), bool *running);
void chain_end(struct chain *c);
bool chain_reply(struct chain *c, redisReply *r); /* true when it was the step's last reply */
int chain_send(struct chain *c, rpipe_cb cb, int argc, const char **argv, const size_t *lens);
int chain_eval(struct chain *c, rpipe_cb cb, enum script_id id, int nkeys, int nargs, const char **argv,
               const size_t *lens);
void chain_last_cb(struct rpipe *p, redisReply *r, void *arg);
void chain_end_if_idle(struct chain *c);

void sweep_register(struct worker *w, void (*done)(struct worker *w, bool ok));
void sweep_startup(struct worker *w, void (*done)(struct worker *w, bool ok)); /* recover dead, restore unacked */
void sweep_tick(struct worker *w);                                             /* the periodic chains that are due */
void sweep_unregister(struct worker *w, void (*done)(struct worker *w, bool ok));
/* Reconcile the process's processing list with the jobs it holds: put back what no job holds. */
void sweep_reconcile(struct worker *w, void (*done)(struct worker *w, bool ok));

/* revoke.c, events.c, commands.c, query.c: what sparkd and Celery's tools ask of the process */
#include "worker-celery.h"

/* sweep-recover.c, sweep-unacked.c */
struct dead_scan;
/* Put back a message of this live process's own list (reconcile): not a death, so not counted as a delivery. */
int sweep_requeue_raw(struct chain *c, const char *list, bool landing, const char *raw, size_t len);
/* A message larger than SPARK_MAX_MESSAGE_BYTES, in list (taken from qkey, or NULL), to the dead letters without
 * sending it back to Redis, with a FAILURE meta when it names a task; part of chain c when not NULL. */
int sweep_deadletter_oversized(struct worker *w, struct chain *c, const char *list, bool landing, const char *qkey,
                               const char *raw, size_t len);
void sweep_recover_dead(struct worker *w, void (*done)(struct worker *w, bool ok));
void sweep_recover_member(struct worker *w, struct dead_scan *d);
void sweep_restore_unacked(struct worker *w, void (*done)(struct worker *w, bool ok));

#endif

/*
 * spark-worker engine: one process, N slot threads, each with its own blocking hiredis connections.
 *
 *   main.c     command line, configuration, process start and exit
 *   engine.c   process state, slot threads, limits, signals, the housekeeper thread
 *   broker.c   Redis connections with reconnect, Lua scripts, fetch/ack/requeue/ETA/dead-letter/recovery
 *   message.c  Celery envelope/body decoding, retry envelopes, key naming (pure functions)
 *   result.c   Celery result meta (celery-task-meta-<id>)
 *   tasks.c    task registry and the built-in tasks
 *
 * Redis keys owned by spark-worker (besides Celery's queues and kombu's unacked records):
 *   spark:processing                 SET of the processing lists of live processes
 *   spark:processing:<host>:<pid>    LIST: messages this process holds (always also in kombu's unacked)
 *   spark:processing:<host>:<pid>:landing
 *                                    LIST: messages taken by BLMOVE, not yet recorded in unacked
 *   spark:alive:<host>:<pid>         STRING with a TTL, refreshed while the process lives
 *   spark:eta                        ZSET: messages waiting for their ETA (score = epoch seconds)
 *   spark:deadletter                 LIST: bad messages with the reason
 */
#ifndef SPARK_WORKER_H
#define SPARK_WORKER_H

#include <hiredis.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "task.h"

#define KEY_UNACKED           "unacked"
#define KEY_UNACKED_INDEX     "unacked_index"
#define KEY_UNACKED_MUTEX     "unacked_mutex"
#define KEY_PROCESSING_SET    "spark:processing"
#define KEY_PROCESSING_PREFIX "spark:processing:"
#define KEY_LANDING_SUFFIX    ":landing"
#define KEY_ALIVE_PREFIX      "spark:alive:"
#define KEY_ETA               "spark:eta"
#define KEY_DEADLETTER        "spark:deadletter"
#define KOMBU_SEP             "\x06\x16"
#define RESULT_KEY_PREFIX     "celery-task-meta-"
#define RESULT_EXPIRES        86400
#define ALIVE_TTL_S           30
#define DEFER_DELAY_S         5.0
#define FETCH_BLOCK_S         "0.2"
/* several queues (automagik-spark consumes celery and direct): the others are polled more often */
#define FETCH_BLOCK_MULTI_S "0.05"

/* ---- message.c ---- */

/* A decoded Celery task message. Strings are borrowed from env/body and live as long as the message. */
struct message {
	json_t *env;  /* the envelope (owned) */
	json_t *body; /* the decoded body (owned) */
	json_t *headers;
	const char *task_name; /* NULL when unreadable */
	const char *task_id;   /* NULL when unreadable */
	json_t *args, *kwargs;
	int retries;
	double eta, expires;           /* epoch seconds; 0 = none */
	double hard_limit, soft_limit; /* from headers.timelimit; -1 = not given */
	bool ignore_result;
	bool redelivered;
	bool v1; /* protocol v1: task fields live in the body */
	int priority;
	const char *exchange, *routing_key, *delivery_tag; /* "" when absent */
	/* why the message is bad (message_decode returned -1) */
	char exc_type[32];
	char reason[256];
};

/* Decode an envelope. 0 = runnable; -1 = bad (m->reason, m->exc_type; m->task_id may still be set).
 * Always call message_free afterwards. */
int message_decode(const char *raw, size_t len, struct message *m);
void message_free(struct message *m);

/* ISO 8601 as Celery writes it (fraction optional, Z, +HH:MM, or naive = UTC) -> epoch seconds. */
int message_parse_iso(const char *s, double *out);
/* aware: "2026-11-26T18:46:22.400551+00:00"; naive (Celery 5.2's date_done): "2026-11-26T18:46:05.338234" */
void message_format_iso(double t, bool aware, char *buf, size_t len);

/* Standard base64 (RFC 4648, padding required; whitespace at the ends ignored) of a body_encoding "base64" body.
 * decode: a NUL-terminated copy, or NULL for anything malformed; encode: NUL-terminated. Caller frees. */
unsigned char *message_b64_decode(const char *s, size_t len, size_t *outlen);
char *message_b64_encode(const unsigned char *p, size_t len);

void message_uuid4(char out[37]);
/* kombu's priority step (0, 3, 6, 9) and the Redis key of a queue at a priority (caller frees). */
int message_priority_step(int priority);
char *message_queue_key(const char *queue, int priority);
/* The queue name of a priority key ("celery\x06\x163" -> "celery"); caller frees. */
char *message_queue_of_key(const char *key);

/* A retry of m: same id, retries, eta, a new delivery_tag; caller frees. NULL on failure. */
char *message_build_retry(const struct message *m, int retries, double eta);
/* The same envelope with kombu's redelivered flags set; NULL when raw is not a JSON object. */
char *message_mark_redelivered(const char *raw, size_t len);
/* The spark:deadletter entry: {"reason", "queue", "at", "message"} (plus "message_base64" for non-UTF-8). */
char *message_deadletter_entry(const char *reason, const char *queue, double at, const char *raw, size_t len);
/* The spark:eta member: {"queue": key, "envelope": raw}. */
char *message_eta_member(const char *qkey, const char *raw, size_t len);
/* Seconds until a retry: Celery's exponential backoff with equal jitter, or the fixed default delay. */
double message_retry_countdown(const struct spark_config *cfg, int retries, double rand01);

/* ---- broker.c ---- */

enum script_id {
	SCRIPT_FETCH = 0,
	SCRIPT_RECORD,
	SCRIPT_ACK,
	SCRIPT_DEADLETTER,
	SCRIPT_PARK,
	SCRIPT_REQUEUE,
	SCRIPT_DUE,
	SCRIPT_SWEEP_ONE,
	SCRIPT_UNLOCK,
	SCRIPT_UNREGISTER,
	SCRIPT_STORE,
	SCRIPT_FINISH,
	SCRIPT_COUNT,
};

struct worker;

/* A blocking Redis connection that reconnects with backoff. */
struct rconn {
	redisContext *c;
	const struct redis_url *url;
	const char *what; /* "broker" or "result backend", for logs */
	struct worker *w;
	bool down; /* counted in w->down */
	double backoff;
	unsigned gen;               /* counts successful connects: a change means replies may have been lost */
	int pending;                /* replies of commands sent without waiting, read before the next command */
	bool queued_lost;           /* the connection closed with commands queued: whether they ran is unknown */
	char sha[SCRIPT_COUNT][41]; /* EVALSHA names, from SCRIPT LOAD on each new connection */
};

/* A message this process holds: in its processing list and in kombu's unacked records. */
struct held {
	char *raw;
	size_t len;
	char *tag;       /* delivery_tag, "" when the envelope had none */
	char *qkey;      /* the Redis key it came from: where it goes back */
	bool unrecorded; /* taken with a plain LMOVE: kombu's unacked records are still to be written */
};

void rconn_init(struct rconn *rc, struct worker *w, const struct redis_url *url, const char *what);
void rconn_close(struct rconn *rc);
/* Connect until it works or *abort becomes nonzero (abort may be NULL: at most max_wait seconds, <0 = forever).
 * 0 when connected. */
int rconn_ensure(struct rconn *rc, const atomic_int *abort, double max_wait);
/* Run a command; NULL when the connection failed (it is dropped, reconnect with rconn_ensure). */
redisReply *rconn_command(struct rconn *rc, const char *fmt, ...);
redisReply *rconn_argv(struct rconn *rc, int argc, const char **argv, const size_t *lens);
/* Send an EVALSHA without reading its reply; rconn_collect() reads it later. 0 or -1 (connection dropped). */
int rconn_eval_send(struct rconn *rc, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens);
/* Read one pending reply: 0 for a non-error reply, -1 otherwise (the connection is dropped). */
int rconn_collect(struct rconn *rc);
/* Send one plain command without waiting (counted in rc->pending). 0 or -1. */
int rconn_send(struct rconn *rc, int argc, const char **argv, const size_t *lens);
/* Write what was queued now, without reading replies (hiredis writes only when a reply is read). 0 or -1. */
int rconn_flush(struct rconn *rc);
redisReply *rconn_eval(struct rconn *rc, enum script_id id, int nkeys, int nargs, const char **argv,
                       const size_t *lens);

void held_free(struct held *h);
/* 1 = a message is held in h, 0 = nothing arrived, -1 = connection failed. */
/* Take one message (1), none (0) or -1 (connection). Commands queued on rc (a finish) go out with the fetch;
 * *queued_ok tells whether they were all carried out (their last reply, EXEC's, an array). */
int broker_fetch(struct rconn *rc, struct held *h, bool *queued_ok);
/* Only the first step of a fetch, for a slot with a queued finish: the finish and a plain LMOVE of the first key
 * in one round trip, so the finish is confirmed before any blocking wait. 1, 0 or -1 as broker_fetch. */
int broker_fetch_queued(struct rconn *rc, struct held *h, bool *queued_ok);
/* Read the replies of queued commands: 0 when all were carried out, -1 otherwise. */
int broker_read_queued(struct rconn *rc);
/* After a reconnect: put back what this process's lists hold beyond keep[] (a fetch whose reply was lost left it
 * there, unknown to every slot). Call with the fetch lock held for writing. Messages put back, or -1. */
int broker_reconcile(struct rconn *rc, const struct held *keep, int nkeep);
int broker_finish_plain_send(struct rconn *rc, const struct held *h, const char *task_id, const char *meta,
                             int backend_db);
/* Each returns 0 when done, -1 when the connection failed (retry after rconn_ensure). */
int broker_ack(struct rconn *rc, const struct held *h);
/* Store the result meta (in backend_db) and ack, atomically, on the broker connection: for a result backend on
 * the broker's own server. 0 or -1 (connection). */
int broker_finish(struct rconn *rc, const struct held *h, const char *task_id, const char *meta, int backend_db);
/* The same as one MULTI/EXEC of plain commands, without the SUCCESS guard: for a first delivery, where the only
 * meta that can exist is this run's STARTED. meta NULL: the ack alone. 0 or -1 (connection). */
int broker_finish_plain(struct rconn *rc, const struct held *h, const char *task_id, const char *meta, int backend_db);
/* Queue kombu's unacked records of a message taken by the plain LMOVE (no round trip of its own). */
int broker_record_send(struct rconn *rc, struct held *h, const char *tag, const char *exchange,
                       const char *routing_key);
int broker_deadletter(struct rconn *rc, const struct held *h, const char *reason);
int broker_park(struct rconn *rc, const struct held *h, double at);
int broker_requeue(struct rconn *rc, const struct held *h);
int broker_publish_eta(struct rconn *rc, const char *qkey, const char *raw, double at);
int broker_register(struct rconn *rc);
int broker_refresh(struct rconn *rc);
int broker_move_due(struct rconn *rc);
int broker_recover_dead(struct rconn *rc);
int broker_restore_unacked(struct rconn *rc);
int broker_unregister(struct rconn *rc);

/* ---- result.c ---- */

/* {"exc_type", "exc_message": [message], "exc_module"} (new reference). */
json_t *result_exception(const char *module, const char *type, const char *message);
/* Store Celery meta unless a SUCCESS is already there. result is stolen (NULL = null). 0 or -1 (connection). */
int result_store(struct rconn *rc, const char *task_id, const char *status, json_t *result, const char *traceback,
                 const struct message *m);
/* The meta JSON text (caller frees; NULL only on OOM). result is stolen. */
char *result_meta_text(const char *task_id, const char *status, json_t *result, const char *traceback,
                       const struct message *m);
int result_store_text(struct rconn *rc, const char *task_id, const char *text);
/* Queue the store on the connection without waiting for its reply (rconn_collect reads it). 0 or -1. */
int result_store_send(struct rconn *rc, const char *task_id, const char *text);
/* SETEX + PUBLISH as plain commands, without the SUCCESS guard: for a message's first delivery, where nothing
 * but this run's own STARTED can be stored yet. _send queues them; the other waits for the replies. */
int result_store_plain_send(struct rconn *rc, const char *task_id, const char *text);
int result_store_plain(struct rconn *rc, const char *task_id, const char *text);
/* The same on another connection to the backend's server, in database db (SELECTed there and back). */
int result_store_plain_send_in(struct rconn *rc, const char *task_id, const char *text, int db);

/* ---- engine.c ---- */

enum slot_state {
	SLOT_IDLE = 0,
	SLOT_HELD,      /* fetched, not started */
	SLOT_RUNNING,   /* the task function runs */
	SLOT_FINISHING, /* the slot records the outcome */
	SLOT_CLAIMED,   /* the main thread took the message over (hard limit, cold stop): the slot must not touch it */
};

/* A finished task whose result and ack were queued on the broker connection: they go out with the next fetch
 * (one round trip for both) and are confirmed by it, or written again synchronously. */
struct finishing {
	bool active;
	struct held h;
	char *task_id;
	char *meta; /* NULL: the ack alone */
	int backend_db;
	const char *outcome;
};

struct slot {
	struct worker *w;
	int idx;
	pthread_t thread;
	bool started;
	struct rconn broker, backend;
	pthread_mutex_t mu; /* guards everything below except cancel */
	enum slot_state state;
	struct held held;
	char task_id[128];
	char task_name[256];
	double started_at, soft_at, hard_at; /* monotonic; 0 = none */
	double soft_s, hard_s;
	bool soft_fired;
	bool store_result; /* the running task's outcome goes to the result backend */
	atomic_int cancel; /* enum task_cancel, seen by the task through task_run.cancel */
	struct finishing fin;
	char deferred_report[256]; /* a finish report that travels with the next start */
};

struct worker {
	const struct spark_config *cfg;
	const char *node;
	int nslots;
	char host[256];
	long pid;
	char *proc_key, *landing_key, *alive_key;
	char **qkeys; /* every priority key of every queue, priority-major (kombu's order) */
	char **qnames;
	int nqkeys;
	struct slot *slots;
	struct rconn ctl, ctl_backend; /* main thread: start-up, hard limit, cold stop */

	atomic_int stop; /* stop fetching: warm stop or recycle */
	atomic_int cold; /* cold stop: cancel running tasks, put them back */
	atomic_int hk_stop;
	atomic_int live_slots;
	atomic_int down; /* connections currently down (for the "problem" report) */
	atomic_int recycle_sent;
	atomic_int draining_sent;
	atomic_long processed;
	pthread_t housekeeper;
	bool hk_started;
	bool backend_on_broker; /* result backend on the broker's server: result + ack in one call */
	/* fetches hold it for reading from the command to the slot's held record; a slot that reconnected takes
	 * it for writing to find messages a lost reply left in the process's lists */
	pthread_rwlock_t fetch_lock;
};

int engine_init(struct worker *w, const struct spark_config *cfg, const char *node, int nslots);
/* Run until stopped; returns the exit status. */
int engine_run(struct worker *w);
void engine_free(struct worker *w);
/* Stop fetching and exit once in-flight tasks are done ("recycle <reason>" is reported once). */
void engine_recycle(struct worker *w, const char *reason);

#endif

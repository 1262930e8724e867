/*
 * sparkd's side of a Celery deployment (DESIGN §2): one broker connection (and one subscribed connection) on
 * sparkd's loop, the remote-control mailbox answered once per worker node with the aggregate of its processes,
 * worker events, and the per-node settings that control commands change and that processes started later get.
 *
 *   broker.c       the two hiredis connections, reconnect with backoff, the state shown in status
 *   envelope.c     kombu envelopes: base64 bodies, delivery tags, properties (requests in, replies and events out)
 *   pidbox.c       the mailbox: decode, address (destination, pattern/matcher), dispatch, reply (§5.4)
 *   inspect.c      the inspect methods (ping, active, stats, ...)
 *   control-cmd.c  the control methods (revoke, shutdown, pool_grow, add_consumer, ...)
 *   fleet-query.c  queries to a node's processes (fd-3 "query" commands, "answer" reports) with a deadline
 *   node-state.c   what control commands changed per node (queues, events, time limits), sent to new processes
 *   node-events.c  worker-online, worker-heartbeat every 2 s, worker-offline (§5.6)
 *   celery.c       init, start, stop and free of the above; the status fields
 */
#ifndef SPARKD_CELERY_H
#define SPARKD_CELERY_H

#include <hiredis/async.h>
#include <jansson.h>

#include "sparkd.h"

/* Celery's names (reference §5.1, §5.6) */
#define CEL_MAILBOX_EXCHANGE "celery.pidbox"
#define CEL_BINDING_PREFIX   "_kombu.binding."
#define CEL_SEP              "\x06\x16"
#define CEL_EVENT_EXCHANGE   "celeryev"
#define CEL_SW_IDENT         "spark-worker"
#define CEL_HEARTBEAT_FREQ   2.0
/* Collect answers from a node's processes for this long: well under the 1 s a Celery client waits. */
#define CEL_QUERY_DEADLINE 0.3
/* worker-offline: how long a stop waits for the PUBLISH reply before sparkd exits anyway */
#define CEL_OFFLINE_WAIT 1.0
/* revoked ids listed by status --verbose (the newest; the count is always given) */
#define CEL_STATUS_REVOKED_MAX 100

/* ---- broker.c ---- */

enum broker_state {
	BROKER_CONNECTING = 0,
	BROKER_UP,
	BROKER_DOWN,
};

struct broker_conn {
	struct sd_broker *b;
	redisAsyncContext *ac; /* NULL when not connected */
	bool subscriber;
	int setup_left; /* setup replies still expected */
	bool ready;
};

struct sd_broker {
	struct sparkd *sd;
	struct broker_conn cmd, sub;
	enum broker_state state;
	char error[256]; /* why it is down ("" when up or never tried) */
	double since;    /* wall clock of the last state change */
	double backoff;  /* the next reconnect delay */
	struct event *retry_ev, *connect_timeout_ev;
	char pidbox_channel[64]; /* "/<db>.celery.pidbox" */
	bool closing;
};

void broker_init(struct sparkd *sd, struct sd_broker *b);
void broker_start(struct sd_broker *b);
void broker_free(struct sd_broker *b);
bool broker_up(const struct sd_broker *b);
const char *broker_state_name(enum broker_state s);
/* A command on the command connection: -1 when the broker is not up (cb is never called then). cb gets a NULL
 * reply when the connection is lost before the answer. */
int broker_cmd(struct sd_broker *b, redisCallbackFn *cb, void *priv, int argc, const char **argv, const size_t *lens);
/* "/<db>.<exchange>[/<routing key>]": kombu's fanout channel (reference §5.2) */
void broker_fanout_channel(const struct sd_broker *b, const char *exchange, const char *rk, char *buf, size_t len);

/* ---- envelope.c ---- */

/* The JSON body of a kombu envelope (base64 or raw per properties.body_encoding); *headers borrowed from env. */
json_t *envelope_body(json_t *env, json_t **headers);
/* A kombu envelope around body (stolen): delivery_mode 1, priority 0, base64 body, a fresh delivery tag.
 * headers is stolen too. Returns the JSON text (caller frees). */
char *envelope_build(json_t *body, json_t *headers, const char *exchange, const char *rk);

/* ---- pidbox.c ---- */

struct pb_req { /* one request from a client; shared by the nodes that handle it */
	int refs;
	char *method;
	json_t *args;   /* an object, never NULL */
	char *ticket;   /* NULL when none */
	char *reply_ex; /* NULL for a cast */
	char *reply_rk;
	bool shared_done; /* a fleet-wide side effect (revoke's ZADD) ran once for all nodes */
};

struct pb_call { /* one node handling one request */
	struct sparkd *sd;
	struct sd_worker *w;
	struct pb_req *req;
};

/* A handler returns the node's reply (a new reference), or NULL after arranging pb_call_done() later (or to
 * send no reply at all: then it frees the call with pb_call_done(c, NULL)). */
typedef json_t *(*pb_handler)(struct pb_call *c);

void pidbox_message(struct sparkd *sd, const char *data, size_t len);
void pidbox_bind(struct sparkd *sd); /* SADD the nodes' mailbox bindings */
void pb_call_done(struct pb_call *c, json_t *reply);
json_t *pb_ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
json_t *pb_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int pb_arg_ids(json_t *args, const char *key, const char ***ids);
int pidbox_match(const char *node, const char *pattern, const char *matcher, char *err, size_t errlen);

/* ---- inspect.c, control-cmd.c ---- */

pb_handler inspect_lookup(const char *method);
pb_handler control_lookup(const char *method);
/* the task names spark-worker runs (one definition: common/tasknames.h) as a JSON array */
json_t *inspect_registered_list(void);

/* ---- node-state.c ---- */

struct cel_time_limit {
	char *name;
	double soft, hard;
};

struct cel_node {      /* per worker node, what control commands changed */
	char **queues; /* the node's queues (starts as SPARK_QUEUES) */
	int nqueues;
	int task_events; /* 1 on, 0 off */
	bool events_changed;
	struct cel_time_limit *limits;
	int nlimits;
	bool online_sent, offline_sent;
};

void node_init(struct sparkd *sd, struct cel_node *n);
void node_free(struct cel_node *n);
bool node_has_queue(const struct cel_node *n, const char *q);
void node_bind_queue(struct sparkd *sd, const char *q); /* SADD _kombu.binding.<q>, as a consumer does */
void node_add_queue(struct sparkd *sd, struct sd_worker *w, const char *q);
bool node_cancel_queue(struct sparkd *sd, struct sd_worker *w, const char *q);
void node_set_events(struct sparkd *sd, struct sd_worker *w, bool on);
void node_set_time_limit(struct sparkd *sd, struct sd_worker *w, const char *name, double soft, double hard);
void node_send_revoke(struct sparkd *sd, struct sd_worker *w, int terminate, const char *signal, int nids,
                      const char *const *ids);
/* Everything changed since the start, to a process that has just started. */
void node_send_state(struct sparkd *sd, struct sd_proc *p);
void node_flush(struct sd_proc *p);

/* ---- fleet-query.c ---- */

struct fq_result {
	json_t *items;  /* every "answer" of every process, in arrival order */
	pid_t *missing; /* processes asked that did not answer in time (some may have exited since) */
	int nmissing;
};

typedef void (*fq_done_fn)(struct pb_call *c, const struct fq_result *r);

/* Ask every process of c->w; done runs once (within CEL_QUERY_DEADLINE) with what arrived. */
void fq_start(struct pb_call *c, const char *what, int nargs, const char *const *args, fq_done_fn done);
void fq_answer(struct sd_proc *p, unsigned long reqid, const char *json);
void fq_answered(struct sd_proc *p, unsigned long reqid, int count);
void fq_free_all(struct sparkd *sd);

/* ---- node-events.c ---- */

void node_events_start(struct sparkd *sd);
void node_events_online(struct sparkd *sd, struct sd_worker *w);
/* worker-offline for every node not yet offline; done runs on the last PUBLISH reply or after
 * CEL_OFFLINE_WAIT, or at once when nothing was sent */
void node_events_all_offline(struct sparkd *sd, void (*done)(struct sparkd *));
void node_events_offline(struct sparkd *sd, struct sd_worker *w);
void node_events_free(struct sparkd *sd);

/* ---- celery.c ---- */

struct fq;
TAILQ_HEAD(fq_list, fq);

struct sd_celery {
	struct sd_broker broker;
	struct cel_node *nodes; /* one per sd->workers[i] */
	unsigned long clock;    /* Lamport clock (reference §5.6) */
	unsigned long next_reqid;
	struct fq_list queries;
	char **revoked; /* newest last, bounded by SPARK_REVOKED_MAX: a cache of SPARK_REVOKED_KEY */
	double *revoked_exp;
	int nrevoked, caprevoked;
	struct event *heartbeat_ev, *offline_ev;
	int offline_pending;
	void (*offline_done)(struct sparkd *);
	bool heartbeats; /* worker events on (always, as Celery's default) */
};

struct cel_node *celery_node(struct sparkd *sd, struct sd_worker *w);
unsigned long celery_tick(struct sparkd *sd); /* advance the Lamport clock */
void celery_adjust_clock(struct sparkd *sd, unsigned long seen);
void celery_broker_up(struct sparkd *sd);
void celery_revoked_add(struct sparkd *sd, const char *id, double expires);

#endif

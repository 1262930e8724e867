/*
 * Recovery of messages nobody will finish: the processing lists of dead spark-worker processes, and kombu's
 * unacked entries older than the visibility timeout (a dead Python consumer's, restored as kombu's
 * restore_by_tag does). Rare work: each message costs a few round trips, taken one message at a time.
 *
 * Also the dead letters decided without a job: a message too large to decode (from the fetch or from a list), and
 * a poison message, one whose holders died SPARK_POISON_DELIVERIES times in a row (counted here, in Redis, each
 * time a dead process's list is recovered).
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

/* The queue key a message goes back to: its routing key (or our first queue) at its priority. */
static char *
route_of(const struct worker *w, const struct message_peek *pk)
{
	const char *rk = pk->routing_key;
	return message_queue_key(rk && rk[0] ? rk : w->queues[0], pk->priority);
}

static void
requeue_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	if (chain_reply(c, r))
		chain_end(c);
}

static void
ignore_cb(struct rpipe *p, redisReply *r, void *arg)
{
}

/*
 * A move to the dead letters decided without a job (a message too large to decode, a poison message). Its
 * FAILURE meta goes in the same script when the result backend is the broker's server; on another server it is
 * written once the move is confirmed (a process that dies in between leaves the dead letter without its meta).
 */
struct dl_op {
	struct worker *w;
	struct chain *c;  /* NULL outside a chain */
	long long moved;  /* the script's reply when the message went to the dead letters */
	char *meta_key;   /* celery-task-meta-<id>, or NULL */
	char *meta;       /* the FAILURE meta, or NULL */
	char *poison_log; /* logged when the message turned out poison, or NULL */
};

static void
dl_op_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct dl_op *op = arg;
	struct worker *w = op->w;
	if (r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer == op->moved) {
		if (op->poison_log != NULL)
			log_errorx("%s", op->poison_log);
		if (op->meta != NULL && !w->backend_on_broker) {
			const char *argv[] = {op->meta_key, op->meta, w->ttl_str};
			rpipe_eval(&w->backend, SCRIPT_STORE, ignore_cb, NULL, 1, 2, argv, NULL);
		}
	}
	if (op->c != NULL) {
		if (chain_reply(op->c, r))
			chain_end(op->c);
	} else if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		/* still in the processing list: the reconcile after the reconnect, or the next worker, moves it */
		log_warnx("moving a message to " KEY_DEADLETTER ": %.200s", r ? r->str : "connection lost");
	}
	free(op->meta_key);
	free(op->meta);
	free(op->poison_log);
	free(op);
}

/* EVALSHA on the broker with a dl_op (freed here when nothing could be sent). */
static int
dl_op_eval(struct dl_op *op, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens)
{
	struct worker *w = op->w;
	if (rpipe_eval(&w->broker, id, dl_op_cb, op, nkeys, nargs, argv, lens) < 0) {
		if (op->c != NULL)
			op->c->failed = true;
		free(op->meta_key);
		free(op->meta);
		free(op->poison_log);
		free(op);
		return -1;
	}
	if (op->c != NULL)
		op->c->pending++;
	return 0;
}

/* The FAILURE meta of a dead letter that names a task (NULL when results are not stored for it). */
static char *
dl_failure_meta(struct worker *w, const struct message_peek *pk, const char *module, const char *type, const char *msg)
{
	if (w->cfg->result_backend == NULL || pk->id == NULL || pk->ignore_result || strlen(pk->id) > MESSAGE_MAX_ID)
		return NULL;
	char tb[600];
	snprintf(tb, sizeof tb, "%s.%s: %s", module, type, msg);
	meta_exception(&w->scratch, module, type, msg);
	meta_build(&w->meta, pk->id, "FAILURE", w->scratch.p, w->scratch.len, tb, NULL);
	return xstrndup(w->meta.p, w->meta.len);
}

/* meta (owned from now on) goes in the script when the backend is the broker's server (dl_op_script_meta). */
static struct dl_op *
dl_op_new(struct worker *w, struct chain *c, long long moved, const char *id, char *meta, char *poison_log)
{
	struct dl_op *op = xcalloc(1, sizeof *op);
	op->w = w;
	op->c = c;
	op->moved = moved;
	op->meta = meta;
	op->meta_key = meta != NULL ? xasprintf(RESULT_KEY_PREFIX "%s", id) : xstrdup(KEY_DEADLETTER);
	op->poison_log = poison_log;
	return op;
}

/* The script's meta argument: '' when there is none or it is written afterwards on the backend's own server. */
static const char *
dl_op_script_meta(const struct dl_op *op)
{
	return op->meta != NULL && op->w->backend_on_broker ? op->meta : "";
}

int
sweep_deadletter_oversized(struct worker *w, struct chain *c, const char *list, bool landing, const char *qkey,
                           const char *raw, size_t len)
{
	struct message_peek pk;
	message_peek(raw, len, &pk);
	char *queue = qkey != NULL ? message_queue_of_key(qkey) : NULL;
	char reason[160];
	snprintf(reason, sizeof reason, "message of %zu bytes is larger than SPARK_MAX_MESSAGE_BYTES (%ld)", len,
	         w->cfg->max_message_bytes);
	log_errorx("Rejecting message from queue %s (task ?[%.200s]): %s; moved to " KEY_DEADLETTER,
	           queue ? queue : "?", pk.id ? pk.id : "?", reason);
	char *entry = message_deadletter_entry(reason, queue, now_wall(), raw, len);
	struct dl_op *op = dl_op_new(w, c, 1, pk.id, dl_failure_meta(w, &pk, "builtins", "ValueError", reason), NULL);
	const char *in_script = dl_op_script_meta(op);
	char size[32], cap[32];
	snprintf(size, sizeof size, "%zu", len);
	snprintf(cap, sizeof cap, "%ld", w->cfg->deadletter_max);
	/* the head and the size find it in the list: the message itself never goes back to Redis */
	size_t head = len < 4096 ? len : 4096;
	const char *tag = landing || pk.tag == NULL ? "" : pk.tag;
	const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_DEADLETTER, op->meta_key, size, raw, tag, entry,
	                      cap,  in_script,   w->ttl_str,        w->db_str[1],   w->db_str[0]};
	size_t lens[] = {strlen(list),
	                 strlen(KEY_UNACKED),
	                 strlen(KEY_UNACKED_INDEX),
	                 strlen(KEY_DEADLETTER),
	                 strlen(op->meta_key),
	                 strlen(size),
	                 head,
	                 strlen(tag),
	                 strlen(entry),
	                 strlen(cap),
	                 strlen(in_script),
	                 strlen(w->ttl_str),
	                 strlen(w->db_str[1]),
	                 strlen(w->db_str[0])};
	int rv = dl_op_eval(op, SCRIPT_OVERSIZE, 5, 9, argv, lens);
	free(entry);
	free(queue);
	message_peek_free(&pk);
	return rv;
}
/* FNV-1a: a name for the delivery count of a message that has neither a delivery tag nor an id (it cannot run,
 * but it may still kill a decoder); no linked library offers a small non-cryptographic hash. */
static uint64_t
fnv1a(const char *p, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
	return h;
}

/* A message of a dead process, through RECOVER: back to its queue, or to the dead letters as poison. */
static int
recover_eval(struct chain *c, const char *list, bool landing, const char *raw, size_t len,
             const struct message_peek *pk, const char *dest, const char *newm)
{
	struct worker *w = c->w;
	int n = w->cfg->poison_deliveries;
	char *queue = message_queue_of_key(dest);
	char reason[200], exc[200];
	snprintf(reason, sizeof reason,
	         "poison message: the process holding it died %d time%s in a row (SPARK_POISON_DELIVERIES=%d)", n,
	         n == 1 ? "" : "s", n);
	snprintf(exc, sizeof exc, "Worker exited prematurely %d time%s in a row while holding this task", n,
	         n == 1 ? "" : "s");
	char *entry = message_deadletter_entry(reason, queue, now_wall(), raw, len);
	char *poison_log = xasprintf("Rejecting message from queue %s (task ?[%.200s]): %s; moved to " KEY_DEADLETTER,
	                             queue, pk->id ? pk->id : "?", reason);
	struct dl_op *op = dl_op_new(w, c, 2, pk->id,
	                             dl_failure_meta(w, pk, "billiard.exceptions", "WorkerLostError", exc), poison_log);
	char *count = pk->tag != NULL || pk->id != NULL
	                  ? xasprintf(KEY_DELIVERIES_PREFIX "%s", pk->tag ? pk->tag : pk->id)
	                  : xasprintf(KEY_DELIVERIES_PREFIX "fnv:%016llx", (unsigned long long)fnv1a(raw, len));
	const char *tag = landing || pk->tag == NULL ? "" : pk->tag;
	const char *in_script = dl_op_script_meta(op);
	char threshold[16], cap[32], ttl[16];
	snprintf(threshold, sizeof threshold, "%d", n);
	snprintf(cap, sizeof cap, "%ld", w->cfg->deadletter_max);
	snprintf(ttl, sizeof ttl, "%d", DELIVERIES_TTL_S);
	const char *argv[] = {list,
	                      KEY_UNACKED,
	                      KEY_UNACKED_INDEX,
	                      dest,
	                      KEY_DEADLETTER,
	                      count,
	                      op->meta_key,
	                      raw,
	                      newm,
	                      tag,
	                      landing ? "landing" : "list",
	                      threshold,
	                      entry,
	                      cap,
	                      in_script,
	                      w->ttl_str,
	                      w->db_str[1],
	                      w->db_str[0],
	                      ttl};
	size_t lens[19];
	for (int i = 0; i < 19; i++)
		lens[i] = strlen(argv[i]);
	lens[7] = len;
	int rv = dl_op_eval(op, SCRIPT_RECOVER, 7, 12, argv, lens);
	free(count);
	free(entry);
	free(queue);
	return rv;
}

/* Put back a message of list; counted as a death of its holder when the list is a dead process's (recover). */
static int
requeue_raw(struct chain *c, const char *list, bool landing, const char *raw, size_t len, bool recover)
{
	struct worker *w = c->w;
	if (len > (size_t)w->cfg->max_message_bytes)
		return sweep_deadletter_oversized(w, c, list, landing, NULL, raw, len);
	struct message_peek pk;
	int rv;
	if (message_peek(raw, len, &pk) < 0) {
		char *entry = message_deadletter_entry("unreadable message left in a processing list", NULL, now_wall(),
		                                       raw, len);
		char cap[32];
		snprintf(cap, sizeof cap, "%ld", w->cfg->deadletter_max);
		const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_DEADLETTER, raw, "", entry, cap};
		size_t lens[] = {strlen(list),  strlen(argv[1]), strlen(argv[2]), strlen(argv[3]), len, 0,
		                 strlen(entry), strlen(cap)};
		rv = chain_eval(c, requeue_cb, SCRIPT_DEADLETTER, 4, 4, argv, lens);
		free(entry);
		return rv;
	}
	char *dest = route_of(w, &pk);
	const char *tag = landing || pk.tag == NULL ? "" : pk.tag;
	char *marked = message_mark_redelivered(raw, len);
	const char *newm = marked ? marked : raw;
	if (recover) {
		rv = recover_eval(c, list, landing, raw, len, &pk, dest, newm);
	} else {
		const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX,           dest, raw,
		                      newm, tag,         landing ? "landing" : "list"};
		size_t lens[] = {strlen(list), strlen(argv[1]), strlen(argv[2]), strlen(dest),
		                 len,          strlen(newm),    strlen(tag),     strlen(argv[7])};
		rv = chain_eval(c, requeue_cb, SCRIPT_REQUEUE, 4, 4, argv, lens);
	}
	free(marked);
	free(dest);
	message_peek_free(&pk);
	return rv;
}

int
sweep_requeue_raw(struct chain *c, const char *list, bool landing, const char *raw, size_t len)
{
	return requeue_raw(c, list, landing, raw, len, false);
}

/* ---- dead processes: one member of spark:processing at a time ---- */

struct dead_scan {
	struct worker *w;
	void (*done)(struct worker *w, bool ok);
	char **members;
	size_t n, next;
	char *member; /* the one being recovered */
	bool failed;
};

static void dead_next(struct dead_scan *d);

static void
dead_finish(struct dead_scan *d)
{
	struct worker *w = d->w;
	void (*done)(struct worker *, bool) = d->done;
	bool ok = !d->failed;
	for (size_t i = 0; i < d->n; i++)
		free(d->members[i]);
	free(d->members);
	free(d);
	w->recover_running = false;
	if (done != NULL)
		done(w, ok);
}

static void
dead_lists_done(struct worker *w, bool ok)
{
	struct dead_scan *d = w->dead_scan;
	if (!ok) {
		d->failed = true;
		dead_finish(d);
		return;
	}
	dead_next(d);
}

static void
dead_lrange_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	struct worker *w = c->w;
	struct dead_scan *d = w->dead_scan;
	bool landing = c->step++ == 0; /* sent: landing LRANGE, list LRANGE, UNREGISTER */
	const char *list = d->member;
	char *landing_key = landing ? xasprintf("%s" KEY_LANDING_SUFFIX, d->member) : NULL;
	int n = 0;
	if (r != NULL && r->type == REDIS_REPLY_ARRAY)
		for (size_t i = 0; i < r->elements; i++)
			if (r->element[i]->type == REDIS_REPLY_STRING &&
			    requeue_raw(c, landing ? landing_key : list, landing, r->element[i]->str,
			                r->element[i]->len, true) == 0)
				n++;
	if (n > 0)
		log_warnx("Restoring %d message(s) held by dead worker %s", n,
		          d->member + strlen(KEY_PROCESSING_PREFIX));
	free(landing_key);
	if (chain_reply(c, r))
		chain_end(c);
}

/* The owner of a processing list is dead: on this host its pid is gone; elsewhere its alive key expired. */
static void
dead_exists_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct dead_scan *d = arg;
	struct worker *w = d->w;
	if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		d->failed = true;
		dead_finish(d);
		return;
	}
	if (r->type == REDIS_REPLY_INTEGER && r->integer == 0)
		sweep_recover_member(w, d);
	else
		dead_next(d);
}

void
sweep_recover_member(struct worker *w, struct dead_scan *d)
{
	struct chain *c = chain_new(w, dead_lists_done, NULL);
	char *landing = xasprintf("%s" KEY_LANDING_SUFFIX, d->member);
	char *alive = xasprintf(KEY_ALIVE_PREFIX "%s", d->member + strlen(KEY_PROCESSING_PREFIX));
	const char *a[] = {"LRANGE", landing, "0", "-1"};
	chain_send(c, dead_lrange_cb, 4, a, NULL);
	const char *b[] = {"LRANGE", d->member, "0", "-1"};
	chain_send(c, dead_lrange_cb, 4, b, NULL);
	/* sent after the LRANGEs but run after the requeues only if they came first: UNREGISTER checks the lists
	 * are empty, so an early run leaves the member for the next scan */
	const char *argv[] = {KEY_PROCESSING_SET, d->member, landing, alive, d->member};
	chain_eval(c, chain_last_cb, SCRIPT_UNREGISTER, 4, 1, argv, NULL);
	free(landing);
	free(alive);
	chain_end_if_idle(c);
}

static void
dead_next(struct dead_scan *d)
{
	struct worker *w = d->w;
	while (d->next < d->n) {
		d->member = d->members[d->next++];
		const char *rest = d->member + strlen(KEY_PROCESSING_PREFIX);
		const char *colon = strrchr(rest, ':');
		if (colon == NULL) {
			sweep_recover_member(w, d); /* not ours to judge, but nothing can ever refresh it */
			return;
		}
		long pid = strtol(colon + 1, NULL, 10);
		size_t hostlen = (size_t)(colon - rest);
		if (hostlen == strlen(w->host) && strncmp(rest, w->host, hostlen) == 0 && pid > 0 &&
		    kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
			sweep_recover_member(w, d);
			return;
		}
		char *alive = xasprintf(KEY_ALIVE_PREFIX "%s", rest);
		const char *a[] = {"EXISTS", alive};
		int rv = rpipe_send(&w->broker, dead_exists_cb, d, 2, a, NULL);
		free(alive);
		if (rv < 0)
			break;
		return;
	}
	if (d->next < d->n)
		d->failed = true;
	dead_finish(d);
}

static void
dead_members_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct dead_scan *d = arg;
	struct worker *w = d->w;
	if (r == NULL || r->type != REDIS_REPLY_ARRAY) {
		d->failed = true;
		dead_finish(d);
		return;
	}
	d->members = xcalloc(r->elements + 1, sizeof *d->members);
	for (size_t i = 0; i < r->elements; i++) {
		const char *m = r->element[i]->str;
		if (m == NULL || strcmp(m, w->proc_key) == 0 ||
		    strncmp(m, KEY_PROCESSING_PREFIX, strlen(KEY_PROCESSING_PREFIX)) != 0)
			continue;
		d->members[d->n++] = xstrdup(m);
	}
	dead_next(d);
}

void
sweep_recover_dead(struct worker *w, void (*done)(struct worker *w, bool ok))
{
	struct dead_scan *d = xcalloc(1, sizeof *d);
	d->w = w;
	d->done = done;
	w->dead_scan = d;
	w->recover_running = true;
	const char *a[] = {"SMEMBERS", KEY_PROCESSING_SET};
	if (rpipe_send(&w->broker, dead_members_cb, d, 2, a, NULL) < 0) {
		d->failed = true;
		dead_finish(d);
	}
}

/*
 * kombu's visibility-timeout sweep (QoS.restore_visible): unacked entries older than the timeout go back to
 * their queue, under kombu's own `unacked_mutex` so that Python consumers and we never restore the same entry
 * twice. One tag at a time: HGET, the binding lookup for a named exchange, then SWEEP_ONE, which moves the entry
 * only if it is still the value read.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

struct unacked_scan {
	struct worker *w;
	void (*done)(struct worker *w, bool ok);
	char token[37];
	char **tags;
	size_t n, next;
	char *value; /* HGET of the current tag */
	size_t value_len;
	char *newm, *exchange, *rk;
	int priority;
	bool failed;
};

static void unacked_next(struct unacked_scan *u);

static void
unacked_finish_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct unacked_scan *u = arg;
	struct worker *w = u->w;
	void (*done)(struct worker *, bool) = u->done;
	bool ok = !u->failed && r != NULL && r->type != REDIS_REPLY_ERROR;
	for (size_t i = 0; i < u->n; i++)
		free(u->tags[i]);
	free(u->tags);
	free(u->value);
	free(u->newm);
	free(u->exchange);
	free(u->rk);
	free(u);
	w->unacked_running = false;
	if (done != NULL)
		done(w, ok);
}

/* Release kombu's mutex (only if it is still ours) and end. */
static void
unacked_finish(struct unacked_scan *u)
{
	struct worker *w = u->w;
	const char *argv[] = {KEY_UNACKED_MUTEX, u->token};
	if (rpipe_eval(&w->broker, SCRIPT_UNLOCK, unacked_finish_cb, u, 1, 1, argv, NULL) < 0) {
		u->failed = true;
		unacked_finish_cb(&w->broker, NULL, u); /* the mutex expires by itself */
	}
}

static void
unacked_moved_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct unacked_scan *u = arg;
	if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		u->failed = true;
		unacked_finish_cb(p, r, u);
		return;
	}
	if (r->type == REDIS_REPLY_INTEGER && r->integer == 1 && u->newm != NULL)
		log_warnx("Restored unacknowledged message %s (visibility timeout passed)", u->tags[u->next - 1]);
	unacked_next(u);
}

/* SWEEP_ONE for the current tag: push to dest (NULL: drop the entry, as kombu does for an unknown queue). */
static void
unacked_move(struct unacked_scan *u, const char *queue)
{
	struct worker *w = u->w;
	const char *tag = u->tags[u->next - 1];
	char *dest = queue != NULL && u->newm != NULL ? message_queue_key(queue, u->priority) : NULL;
	if (dest == NULL && u->value != NULL)
		log_warnx("Could not restore unacked message %s: no queue for it; dropped as kombu does", tag);
	const char *argv[] = {
	    KEY_UNACKED,         KEY_UNACKED_INDEX, dest ? dest : KEY_UNACKED, tag, u->value ? u->value : "",
	    dest ? u->newm : "", dest ? "1" : "0"};
	size_t lens[] = {strlen(argv[0]),
	                 strlen(argv[1]),
	                 strlen(argv[2]),
	                 strlen(tag),
	                 u->value ? u->value_len : 0,
	                 strlen(argv[5]),
	                 1};
	if (rpipe_eval(&w->broker, SCRIPT_SWEEP_ONE, unacked_moved_cb, u, 3, 4, argv, lens) < 0) {
		u->failed = true;
		unacked_finish_cb(&w->broker, NULL, u);
	}
	free(dest);
}

/* kombu's binding lookup for a named exchange: the queue of the member whose routing key matches. */
static void
unacked_binding_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct unacked_scan *u = arg;
	if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		u->failed = true;
		unacked_finish_cb(p, r, u);
		return;
	}
	char *queue = NULL;
	for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements && queue == NULL; i++) {
		const char *m = r->element[i]->str;
		const char *s1 = m ? strstr(m, KOMBU_SEP) : NULL;
		const char *s2 = s1 ? strstr(s1 + 2, KOMBU_SEP) : NULL;
		if (s2 != NULL && (size_t)(s1 - m) == strlen(u->rk) && strncmp(m, u->rk, strlen(u->rk)) == 0)
			queue = xstrdup(s2 + 2);
	}
	unacked_move(u, queue);
	free(queue);
}

static void
unacked_value_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct unacked_scan *u = arg;
	struct worker *w = u->w;
	if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		u->failed = true;
		unacked_finish_cb(p, r, u);
		return;
	}
	free(u->value);
	free(u->newm);
	free(u->exchange);
	free(u->rk);
	u->value = u->newm = u->exchange = u->rk = NULL;
	u->priority = 0;
	if (r->type != REDIS_REPLY_STRING) {
		unacked_move(u, NULL); /* gone meanwhile: drop its index entry */
		return;
	}
	u->value = xstrndup(r->str, r->len);
	u->value_len = r->len;
	json_t *v = json_loadb(r->str, r->len, 0, NULL);
	json_t *env = json_array_get(v, 0);
	const char *ex = json_string_value(json_array_get(v, 1));
	const char *rk = json_string_value(json_array_get(v, 2));
	if (json_is_object(env) && ex != NULL && rk != NULL) {
		char *text = json_dumps(env, JSON_COMPACT);
		u->newm = text ? message_mark_redelivered(text, strlen(text)) : NULL;
		free(text);
		u->exchange = xstrdup(ex);
		u->rk = xstrdup(rk);
		json_t *pr = json_object_get(json_object_get(env, "properties"), "priority");
		u->priority = json_is_integer(pr) ? (int)json_integer_value(pr) : 0;
	}
	json_decref(v);
	if (u->exchange == NULL) {
		unacked_move(u, NULL);
	} else if (u->exchange[0] == '\0') {
		unacked_move(u, u->rk);
	} else {
		char *key = xasprintf("_kombu.binding.%s", u->exchange);
		const char *a[] = {"SMEMBERS", key};
		if (rpipe_send(&w->broker, unacked_binding_cb, u, 2, a, NULL) < 0) {
			u->failed = true;
			unacked_finish_cb(p, NULL, u);
		}
		free(key);
	}
}

static void
unacked_next(struct unacked_scan *u)
{
	struct worker *w = u->w;
	if (u->next >= u->n) {
		unacked_finish(u);
		return;
	}
	const char *tag = u->tags[u->next++];
	const char *a[] = {"HGET", KEY_UNACKED, tag};
	if (rpipe_send(&w->broker, unacked_value_cb, u, 3, a, NULL) < 0) {
		u->failed = true;
		unacked_finish_cb(&w->broker, NULL, u);
	}
}

static void
unacked_stale_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct unacked_scan *u = arg;
	if (r == NULL || r->type != REDIS_REPLY_ARRAY) {
		u->failed = true;
		unacked_finish_cb(p, NULL, u); /* the mutex expires by itself */
		return;
	}
	u->tags = xcalloc(r->elements + 1, sizeof *u->tags);
	for (size_t i = 0; i < r->elements; i++)
		if (r->element[i]->str != NULL)
			u->tags[u->n++] = xstrndup(r->element[i]->str, r->element[i]->len);
	unacked_next(u);
}

static void
unacked_lock_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct unacked_scan *u = arg;
	struct worker *w = u->w;
	if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		u->failed = true;
		unacked_finish_cb(p, NULL, u);
		return;
	}
	if (r->type != REDIS_REPLY_STATUS) {
		unacked_finish_cb(p, r, u); /* someone else is sweeping */
		return;
	}
	char max[64];
	snprintf(max, sizeof max, "%.6f", now_wall() - w->cfg->visibility_timeout);
	const char *a[] = {"ZREVRANGEBYSCORE", KEY_UNACKED_INDEX, max, "0"};
	if (rpipe_send(&w->broker, unacked_stale_cb, u, 4, a, NULL) < 0) {
		u->failed = true;
		unacked_finish_cb(p, NULL, u);
	}
}

void
sweep_restore_unacked(struct worker *w, void (*done)(struct worker *w, bool ok))
{
	struct unacked_scan *u = xcalloc(1, sizeof *u);
	u->w = w;
	u->done = done;
	uuid4_string(u->token);
	w->unacked_running = true;
	const char *a[] = {"SET", KEY_UNACKED_MUTEX, u->token, "NX", "PX", "300000"};
	if (rpipe_send(&w->broker, unacked_lock_cb, u, 6, a, NULL) < 0) {
		u->failed = true;
		unacked_finish_cb(&w->broker, NULL, u);
	}
}

/*
 * Recovery of messages nobody will finish: the processing lists of dead spark-worker processes, and kombu's
 * unacked entries older than the visibility timeout (a dead Python consumer's, restored as kombu's
 * restore_by_tag does). Rare work: each message costs a few round trips, taken one message at a time.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

/* The queue key a message goes back to: its routing key (or our first queue) at its priority. */
static char *
route_of(const struct worker *w, const char *raw, size_t len)
{
	json_t *env = json_loadb(raw, len, 0, NULL);
	if (!json_is_object(env)) {
		json_decref(env);
		return NULL;
	}
	json_t *props = json_object_get(env, "properties");
	const char *rk = json_string_value(json_object_get(json_object_get(props, "delivery_info"), "routing_key"));
	json_t *pr = json_object_get(props, "priority");
	char *key =
	    message_queue_key(rk && rk[0] ? rk : w->queues[0], json_is_integer(pr) ? (int)json_integer_value(pr) : 0);
	json_decref(env);
	return key;
}

static void
requeue_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	if (chain_reply(c, r))
		chain_end(c);
}

int
sweep_requeue_raw(struct chain *c, const char *list, bool landing, const char *raw, size_t len)
{
	struct worker *w = c->w;
	char *dest = route_of(w, raw, len);
	int rv;
	if (dest == NULL) {
		char *entry = message_deadletter_entry("unreadable message left in a processing list", NULL, now_wall(),
		                                       raw, len);
		const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_DEADLETTER, raw, "", entry};
		size_t lens[] = {strlen(list), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]), len, 0,
		                 strlen(entry)};
		rv = chain_eval(c, requeue_cb, SCRIPT_DEADLETTER, 4, 3, argv, lens);
		free(entry);
		return rv;
	}
	json_t *env = json_loadb(raw, len, 0, NULL);
	const char *tag =
	    landing ? "" : json_string_value(json_object_get(json_object_get(env, "properties"), "delivery_tag"));
	if (tag == NULL)
		tag = "";
	char *marked = message_mark_redelivered(raw, len);
	const char *newm = marked ? marked : raw;
	const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX, dest, raw, newm, tag, landing ? "landing" : "list"};
	size_t lens[] = {strlen(list), strlen(argv[1]), strlen(argv[2]), strlen(dest),
	                 len,          strlen(newm),    strlen(tag),     strlen(argv[7])};
	rv = chain_eval(c, requeue_cb, SCRIPT_REQUEUE, 4, 4, argv, lens);
	free(marked);
	json_decref(env);
	free(dest);
	return rv;
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
			    sweep_requeue_raw(c, landing ? landing_key : list, landing, r->element[i]->str,
			                      r->element[i]->len) == 0)
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

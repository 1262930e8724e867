/*
 * Housekeeping on the broker connection, as chains of async commands: registration, the reconcile after a
 * reconnect, ETA moves, lease refresh, queue lengths, and the recovery of what dead processes and dead Python
 * consumers left (sweep-recover.c). Each chain runs at most once at a time; a lost reply ends the chain and the
 * timer starts it again later.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

struct chain *
chain_new(struct worker *w, void (*done)(struct worker *w, bool ok), bool *running)
{
	struct chain *c = xcalloc(1, sizeof *c);
	c->w = w;
	c->done = done;
	c->running = running;
	if (running != NULL)
		*running = true;
	return c;
}

void
chain_end(struct chain *c)
{
	if (c->running != NULL)
		*c->running = false;
	if (c->done != NULL)
		c->done(c->w, !c->failed);
	free(c);
}

/* A reply of a step: NULL or an error fails the chain. true when it was the step's last one. */
bool
chain_reply(struct chain *c, redisReply *r)
{
	c->pending--;
	if (r == NULL || r->type == REDIS_REPLY_ERROR) {
		if (r != NULL && !c->failed)
			log_warnx("housekeeping: %.200s", r->str);
		c->failed = true;
	}
	return c->pending == 0;
}

int
chain_send(struct chain *c, rpipe_cb cb, int argc, const char **argv, const size_t *lens)
{
	if (rpipe_send(&c->w->broker, cb, c, argc, argv, lens) < 0) {
		c->failed = true;
		return -1;
	}
	c->pending++;
	return 0;
}

int
chain_eval(struct chain *c, rpipe_cb cb, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens)
{
	if (rpipe_eval(&c->w->broker, id, cb, c, nkeys, nargs, argv, lens) < 0) {
		c->failed = true;
		return -1;
	}
	c->pending++;
	return 0;
}

/* The last reply of a one-step chain ends it. */
void
chain_last_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	if (chain_reply(c, r))
		chain_end(c);
}

/* Nothing could be sent: end now (from the caller, not a callback). */
void
chain_end_if_idle(struct chain *c)
{
	if (c->pending == 0)
		chain_end(c);
}

/* ---- registration ---- */

void
sweep_register(struct worker *w, void (*done)(struct worker *w, bool ok))
{
	struct chain *c = chain_new(w, done, NULL);
	char pid[32];
	snprintf(pid, sizeof pid, "%ld", w->pid);
	char ttl[16];
	snprintf(ttl, sizeof ttl, "%d", ALIVE_TTL_S);
	/* alive key first: a sweep that sees the set member without it would take us for dead */
	const char *set[] = {"SET", w->alive_key, pid, "EX", ttl};
	chain_send(c, chain_last_cb, 5, set, NULL);
	const char *sadd[] = {"SADD", KEY_PROCESSING_SET, w->proc_key};
	chain_send(c, chain_last_cb, 3, sadd, NULL);
	for (int i = 0; i < w->nqueues; i++) {
		const char *q = w->queues[i];
		char *key = xasprintf("_kombu.binding.%s", q);
		char *member = xasprintf("%s" KOMBU_SEP KOMBU_SEP "%s", q, q);
		const char *b[] = {"SADD", key, member};
		chain_send(c, chain_last_cb, 3, b, NULL);
		free(key);
		free(member);
	}
	chain_end_if_idle(c);
}

void
sweep_unregister(struct worker *w, void (*done)(struct worker *w, bool ok))
{
	struct chain *c = chain_new(w, done, NULL);
	const char *argv[] = {KEY_PROCESSING_SET, w->proc_key, w->landing_key, w->alive_key, w->proc_key};
	chain_eval(c, chain_last_cb, SCRIPT_UNREGISTER, 4, 1, argv, NULL);
	chain_end_if_idle(c);
}

/* ---- reconcile: the processing list against the jobs ---- */

static bool
held_by_job(struct worker *w, const char *raw, size_t len, unsigned char *matched)
{
	int i = 0;
	for (struct job *j = TAILQ_FIRST(&w->jobs); j != NULL; j = TAILQ_NEXT(j, entry), i++)
		if (!matched[i] && j->len == len && memcmp(j->raw, raw, len) == 0) {
			matched[i] = 1; /* the same bytes twice are two messages: each job keeps one */
			return true;
		}
	return false;
}

static void
reconcile_list_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	struct worker *w = c->w;
	bool landing = c->step++ == 1; /* the landing list's LRANGE is the second one sent */
	if (r != NULL && r->type == REDIS_REPLY_ARRAY) {
		unsigned char *matched = xcalloc((size_t)w->njobs + 1, 1);
		int put_back = 0;
		for (size_t i = 0; i < r->elements; i++) {
			redisReply *e = r->element[i];
			if (e->type != REDIS_REPLY_STRING || (!landing && held_by_job(w, e->str, e->len, matched)))
				continue;
			if (sweep_requeue_raw(c, landing ? w->landing_key : w->proc_key, landing, e->str, e->len) == 0)
				put_back++;
		}
		free(matched);
		if (put_back > 0)
			log_warnx("Put back %d message(s) this process held but no task knew of (a reply lost with the "
			          "connection)",
			          put_back);
	}
	if (chain_reply(c, r))
		chain_end(c);
}

void
sweep_reconcile(struct worker *w, void (*done)(struct worker *w, bool ok))
{
	struct chain *c = chain_new(w, done, NULL);
	const char *a[] = {"LRANGE", w->proc_key, "0", "-1"};
	chain_send(c, reconcile_list_cb, 4, a, NULL);
	const char *b[] = {"LRANGE", w->landing_key, "0", "-1"};
	chain_send(c, reconcile_list_cb, 4, b, NULL);
	revoke_load(c); /* before fetching resumes: ids revoked while this process was away */
	chain_end_if_idle(c);
}

/* ---- periodic ---- */

static void
due_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	bool more = r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer >= 100;
	if (!chain_reply(c, r))
		return;
	if (more && !c->failed) {
		char now[64], cap[32];
		snprintf(now, sizeof now, "%.6f", now_wall());
		snprintf(cap, sizeof cap, "%ld", c->w->cfg->deadletter_max);
		const char *argv[] = {KEY_ETA, KEY_DEADLETTER, now, "100", cap};
		if (chain_eval(c, due_cb, SCRIPT_DUE, 2, 3, argv, NULL) == 0)
			return;
	}
	chain_end(c);
}

static void
queues_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	struct worker *w = c->w;
	if (r != NULL && r->type == REDIS_REPLY_INTEGER) {
		int k = w->nqkeys - c->pending; /* replies come in the order sent */
		if (k >= 0 && k < w->nqkeys)    /* else counted before a queues command replaced the keys */
			w->qlen_acc[k % w->nqueues] += r->integer;
	}
	if (!chain_reply(c, r))
		return;
	if (!c->failed)
		report_queues(&w->rep, w->nqueues, (const char *const *)w->queues, w->qlen_acc);
	chain_end(c);
}

void
sweep_tick(struct worker *w)
{
	if (!w->broker.ready || !w->started)
		return;
	double now = now_mono();
	if (now >= w->next_due && !w->due_running) {
		w->next_due = now + 0.2;
		struct chain *c = chain_new(w, NULL, &w->due_running);
		char t[64], cap[32];
		snprintf(t, sizeof t, "%.6f", now_wall());
		snprintf(cap, sizeof cap, "%ld", w->cfg->deadletter_max);
		const char *argv[] = {KEY_ETA, KEY_DEADLETTER, t, "100", cap};
		chain_eval(c, due_cb, SCRIPT_DUE, 2, 3, argv, NULL);
		chain_end_if_idle(c);
	}
	if (now >= w->next_refresh && !w->refresh_running) {
		double every = w->cfg->visibility_timeout / 3;
		w->next_refresh = now + (every > 10 ? 10 : every);
		struct chain *c = chain_new(w, NULL, &w->refresh_running);
		char pid[32], ttl[16], score[64];
		snprintf(pid, sizeof pid, "%ld", w->pid);
		snprintf(ttl, sizeof ttl, "%d", ALIVE_TTL_S);
		snprintf(score, sizeof score, "%.6f", now_wall());
		const char *set[] = {"SET", w->alive_key, pid, "EX", ttl};
		chain_send(c, chain_last_cb, 5, set, NULL);
		const char *sadd[] = {"SADD", KEY_PROCESSING_SET, w->proc_key};
		chain_send(c, chain_last_cb, 3, sadd, NULL);
		/* lease refresh: messages still held must not look stale to anybody's visibility-timeout sweep */
		for (struct job *j = TAILQ_FIRST(&w->jobs); j != NULL; j = TAILQ_NEXT(j, entry))
			if (j->tag[0] != '\0' && !j->unrecorded) {
				const char *z[] = {"ZADD", KEY_UNACKED_INDEX, "XX", score, j->tag};
				chain_send(c, chain_last_cb, 5, z, NULL);
			}
		chain_end_if_idle(c);
	}
	if (now >= w->next_queues && !w->queues_running) {
		w->next_queues = now + 5;
		struct chain *c = chain_new(w, NULL, &w->queues_running);
		memset(w->qlen_acc, 0, sizeof *w->qlen_acc * (size_t)w->nqueues);
		for (int k = 0; k < w->nqkeys; k++) {
			const char *a[] = {"LLEN", w->qkeys[k]};
			chain_send(c, queues_cb, 2, a, NULL);
		}
		chain_end_if_idle(c);
	}
	if (now >= w->next_recover && !w->recover_running) {
		w->next_recover = now + 10;
		sweep_recover_dead(w, NULL);
	}
	if (now >= w->next_sweep && !w->unacked_running) {
		w->next_sweep = now + 60;
		sweep_restore_unacked(w, NULL);
	}
}

static void
startup_unacked_done(struct worker *w, bool ok)
{
	void (*done)(struct worker *, bool) = w->startup_done;
	w->startup_done = NULL;
	if (done != NULL)
		done(w, ok);
}

static void
startup_dead_done(struct worker *w, bool ok)
{
	if (!ok) {
		startup_unacked_done(w, false);
		return;
	}
	sweep_restore_unacked(w, startup_unacked_done);
}

void
sweep_startup(struct worker *w, void (*done)(struct worker *w, bool ok))
{
	double now = now_mono();
	w->next_due = now;
	w->next_refresh = now + 1;
	w->next_recover = now + 10;
	w->next_sweep = now + 60;
	w->next_queues = now;
	w->startup_done = done;
	sweep_recover_dead(w, startup_dead_done);
}

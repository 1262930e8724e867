/*
 * The process's revoked ids: Celery keeps them in memory per worker (bounded by REVOKES_MAX, expiring after
 * REVOKE_EXPIRES); ours come from SPARK_REVOKED_KEY, which sparkd writes and every process reads after each
 * connect, and from sparkd's revoke commands. A chained hash keyed by id plus an age list: the oldest id is
 * dropped when the set is full, an expired one when it is looked up. No linked library offers a string set
 * (jansson's object would do, but costs a json_t per id and has no order to drop the oldest by).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"
#include "log.h"
#include "util.h"
#include "worker.h"

struct revoke_entry {
	struct revoke_entry *next; /* the bucket's chain */
	TAILQ_ENTRY(revoke_entry) entry;
	uint32_t hash;
	double expires;
	char id[];
};

/* FNV-1a: ids are UUIDs, any spread does */
static uint32_t
revoke_hash(const char *s)
{
	uint32_t h = 2166136261u;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

void
revoke_init(struct revoke_set *s)
{
	memset(s, 0, sizeof *s);
	TAILQ_INIT(&s->age);
}

void
revoke_free(struct revoke_set *s)
{
	struct revoke_entry *e;
	while ((e = TAILQ_FIRST(&s->age)) != NULL) {
		TAILQ_REMOVE(&s->age, e, entry);
		free(e);
	}
	free(s->buckets);
	s->buckets = NULL;
	s->nbuckets = 0;
	s->count = 0;
}

static struct revoke_entry **
revoke_slot(struct revoke_set *s, const char *id, uint32_t h)
{
	struct revoke_entry **pp = &s->buckets[h & (s->nbuckets - 1)];
	while (*pp != NULL && !((*pp)->hash == h && strcmp((*pp)->id, id) == 0))
		pp = &(*pp)->next;
	return pp;
}

static void
revoke_remove(struct revoke_set *s, struct revoke_entry **pp)
{
	struct revoke_entry *e = *pp;
	*pp = e->next;
	TAILQ_REMOVE(&s->age, e, entry);
	free(e);
	s->count--;
}

static void
revoke_grow(struct revoke_set *s)
{
	size_t n = s->nbuckets ? s->nbuckets * 2 : 64;
	struct revoke_entry **b = xcalloc(n, sizeof *b);
	struct revoke_entry *e;
	TAILQ_FOREACH(e, &s->age, entry)
	{
		e->next = b[e->hash & (n - 1)];
		b[e->hash & (n - 1)] = e;
	}
	free(s->buckets);
	s->buckets = b;
	s->nbuckets = n;
}

void
revoke_add(struct revoke_set *s, const char *id, double expires)
{
	if (id == NULL || id[0] == '\0')
		return;
	if ((size_t)s->count >= s->nbuckets)
		revoke_grow(s);
	uint32_t h = revoke_hash(id);
	struct revoke_entry **pp = revoke_slot(s, id, h);
	if (*pp != NULL) {
		/* revoked again: it lives on from now, as the youngest */
		(*pp)->expires = expires;
		TAILQ_REMOVE(&s->age, *pp, entry);
		TAILQ_INSERT_TAIL(&s->age, *pp, entry);
		return;
	}
	size_t len = strlen(id);
	struct revoke_entry *e = xmalloc(sizeof *e + len + 1);
	memcpy(e->id, id, len + 1);
	e->hash = h;
	e->expires = expires;
	e->next = NULL;
	*pp = e;
	TAILQ_INSERT_TAIL(&s->age, e, entry);
	if (++s->count > SPARK_REVOKED_MAX) {
		struct revoke_entry *old = TAILQ_FIRST(&s->age);
		revoke_remove(s, revoke_slot(s, old->id, old->hash));
	}
}

bool
revoke_has_slow(struct revoke_set *s, const char *id)
{
	uint32_t h = revoke_hash(id);
	struct revoke_entry **pp = revoke_slot(s, id, h);
	if (*pp == NULL)
		return false;
	if ((*pp)->expires < now_wall()) {
		revoke_remove(s, pp);
		return false;
	}
	return true;
}

static void
revoke_load_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct chain *c = arg;
	struct worker *w = c->w;
	if (r != NULL && r->type == REDIS_REPLY_ARRAY) {
		int before = w->revoked.count;
		/* the reply is youngest first: add oldest first, so the age list keeps their order */
		for (size_t i = r->elements / 2; i-- > 0;) {
			redisReply *id = r->element[2 * i], *score = r->element[2 * i + 1];
			if (id->type != REDIS_REPLY_STRING || score->type != REDIS_REPLY_STRING)
				continue;
			revoke_add(&w->revoked, id->str, strtod(score->str, NULL));
		}
		if (w->revoked.count != before)
			log_debug("%d revoked task id(s) known from " SPARK_REVOKED_KEY, w->revoked.count);
		/* a message held since before the connect may have been revoked meanwhile */
		job_revoke_held(w, false, NULL);
	}
	if (chain_reply(c, r))
		chain_end(c);
}

void
revoke_load(struct chain *c)
{
	char now[32], max[16];
	snprintf(now, sizeof now, "%.6f", now_wall());
	snprintf(max, sizeof max, "%d", SPARK_REVOKED_MAX);
	/* the youngest first: with more than the bound in Redis, the ones kept are those revoked last */
	const char *a[] = {"ZREVRANGEBYSCORE", SPARK_REVOKED_KEY, "+inf", now, "WITHSCORES", "LIMIT", "0", max};
	chain_send(c, revoke_load_cb, 8, a, NULL);
}

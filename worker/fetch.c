/*
 * Reliable, batched fetch.
 *
 * A batch is k plain `LMOVE <key> <processing list> RIGHT LEFT` for the k messages the process may still take
 * (free slots, plus the prefetch allowance), sent in one write: each message is safe in the process's
 * processing list the moment Redis moves it, and kombu's unacked records follow with the job's next write
 * (outcome_record). Every ~10 ms of draining, and whenever the key runs dry, the batch also carries an LLEN of
 * every consumed key (kombu's priority order): the next key is the highest-priority one that holds messages,
 * round-robin among queues of the same priority. Between probes a new batch may go out while one is in flight
 * (the tick starts half the slots at a time, job_dispatch): the worker runs one half while Redis serves the
 * other, instead of the two taking turns.
 *
 * The idle wait costs nothing: the LLENs that found every key empty were read on a connection with CLIENT
 * TRACKING redirected to the notify connection, so the next LPUSH to any of those keys arrives there as an
 * invalidation and wakes the fetch (no blocking command, no polling; a 1 s safety poll covers a notify
 * connection that is reconnecting, 50 ms when tracking is unavailable).
 *
 * A reply lost with a broken connection may leave a message in the processing list that no job knows of: the
 * first thing after every (re)connect is sweep_reconcile, which puts back whatever the list holds beyond the
 * jobs this process holds. Only then does fetching resume: one step, no lock.
 */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

#define FETCH_PROBE_EVERY_S 0.01
#define FETCH_SAFETY_POLL_S 1.0
#define FETCH_DEGRADED_POLL 0.05

static void fetch_arm_poll(struct worker *w);

/* Messages the process may still take: held jobs that have not ended count against max_held. */
static int
fetch_capacity(const struct worker *w)
{
	if (w->stop || !w->started || w->reconciling || !w->broker.ready)
		return 0;
	int held = w->njobs - w->writing;
	int want = w->max_held - held - w->fetching;
	return want > 0 ? want : 0;
}

/* After a probe: the highest-priority non-empty key, the next queue after the current one at equal priority. */
static void
fetch_choose_key(struct worker *w)
{
	int nq = w->nqueues;
	for (int base = 0; base < w->nqkeys; base += nq) {
		for (int i = 1; i <= nq; i++) {
			int k = base + (w->fast_key % nq + i) % nq;
			if (w->probe_len[k] > 0) {
				w->fast_key = k;
				return;
			}
		}
	}
}

static bool
fetch_all_empty(const struct worker *w)
{
	for (int i = 0; i < w->nqkeys; i++)
		if (w->probe_len[i] > 0)
			return false;
	return true;
}

/* The last reply of a batch: decide what comes next. */
static void
fetch_batch_done(struct worker *w)
{
	bool probed = w->batch_probe, dry = w->batch_dry;
	w->batch_probe = w->batch_dry = false;
	if (probed) {
		if (fetch_all_empty(w)) {
			/* nothing anywhere: the LLENs armed tracking, an invalidation wakes us */
			w->fetch_idle = true;
			fetch_arm_poll(w);
			return;
		}
		fetch_choose_key(w);
	} else if (dry) {
		w->next_probe = 0; /* the key ran dry: probe at once */
	}
	engine_tick(w);
}

static void
fetch_reply_done(struct worker *w)
{
	if (--w->fetching == 0)
		fetch_batch_done(w);
}

static void
fetch_lmove_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct worker *w = p->w;
	const char *qkey = arg;
	if (r == NULL) {
		/* lost with the connection: if Redis moved a message, reconcile puts it back (on_down may have zeroed
		 * the count already: rpipe_fail runs it before hiredis hands the outstanding callbacks NULL) */
		if (w->fetching > 0 && --w->fetching == 0)
			w->batch_probe = w->batch_dry = false;
		return;
	}
	if (r->type == REDIS_REPLY_STRING && r->len > (size_t)w->cfg->max_message_bytes)
		/* never copied nor decoded: only its head and size go back, to find it in the processing list */
		sweep_deadletter_oversized(w, NULL, w->proc_key, false, qkey, r->str, r->len);
	else if (r->type == REDIS_REPLY_STRING)
		job_new(w, qkey, r->str, r->len, "", true);
	else if (r->type == REDIS_REPLY_NIL)
		w->batch_dry = true;
	else if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "LMOVE: %.250s", r->str);
		if (w->fetching > 0)
			w->fetching--;
		rpipe_fail(p, why);
		return;
	}
	fetch_reply_done(w);
}

static void
fetch_llen_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct worker *w = p->w;
	int k = (int)(intptr_t)arg;
	if (r == NULL) {
		if (w->fetching > 0 && --w->fetching == 0)
			w->batch_probe = w->batch_dry = false;
		return;
	}
	if (k < w->nqkeys) /* else asked before a queues command replaced the keys */
		w->probe_len[k] = r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
	fetch_reply_done(w);
}

static void
fetch_send_probe(struct worker *w)
{
	for (int k = 0; k < w->nqkeys; k++) {
		const char *a[] = {"LLEN", w->qkeys[k]};
		size_t l[] = {4, strlen(w->qkeys[k])};
		if (rpipe_send(&w->broker, fetch_llen_cb, (void *)(intptr_t)k, 2, a, l) == 0)
			w->fetching++;
	}
	w->batch_probe = true;
	w->next_probe = now_mono() + FETCH_PROBE_EVERY_S;
}

void
fetch_kick(struct worker *w)
{
	if (w->fetch_idle)
		return;
	bool probe = now_mono() >= w->next_probe;
	/* a batch may join one in flight only while the key is known to hold messages and no probe is due: the
	 * probe (and with it the choice of key) waits for the batches in flight to come back */
	if (w->fetching > 0 && (w->batch_dry || w->batch_probe || probe))
		return;
	int want = fetch_capacity(w);
	if (want <= 0)
		return;
	const char *key = w->qkeys[w->fast_key];
	/* right after a dry key, the probe alone says where to go next */
	if (!(probe && w->next_probe == 0)) {
		const char *a[] = {"LMOVE", key, w->proc_key, "RIGHT", "LEFT"};
		size_t l[] = {5, strlen(key), strlen(w->proc_key), 5, 4};
		for (int i = 0; i < want; i++)
			if (rpipe_send(&w->broker, fetch_lmove_cb, (void *)key, 5, a, l) == 0)
				w->fetching++;
	}
	if (probe)
		fetch_send_probe(w);
}

/* ---- the idle wait ---- */

static void
fetch_poll_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	if (w->fetch_idle) {
		w->fetch_idle = false;
		w->next_probe = 0;
		fetch_kick(w);
	}
}

static void
fetch_arm_poll(struct worker *w)
{
	double s = w->tracking ? FETCH_SAFETY_POLL_S : FETCH_DEGRADED_POLL;
	struct timeval tv = {(time_t)s, (suseconds_t)((s - (double)(time_t)s) * 1e6)};
	if (w->poll_ev == NULL)
		w->poll_ev = evtimer_new(w->base, fetch_poll_cb, w);
	evtimer_add(w->poll_ev, &tv);
}

void
fetch_on_invalidate(struct worker *w, const char *key, size_t len)
{
	if (!w->fetch_idle)
		return;
	for (int k = 0; key != NULL && k < w->nqkeys; k++)
		if (strlen(w->qkeys[k]) == len && memcmp(w->qkeys[k], key, len) == 0) {
			w->fetch_idle = false;
			w->fast_key = k;
			w->next_probe = now_mono() + FETCH_PROBE_EVERY_S; /* go straight for the key */
			fetch_kick(w);
			return;
		}
	if (key == NULL) {
		w->fetch_idle = false;
		w->next_probe = 0;
		fetch_kick(w);
	}
}

/* ---- connection state ---- */

static void
fetch_tracking_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct worker *w = p->w;
	if (r == NULL)
		return;
	if (r->type == REDIS_REPLY_ERROR) {
		log_warnx("CLIENT TRACKING unavailable (%.200s): an idle worker polls its queues every %.0f ms", r->str,
		          FETCH_DEGRADED_POLL * 1000);
		return;
	}
	w->tracking = true;
	/* keys read before tracking was on are not tracked: probe again so the idle wait is armed */
	if (w->fetch_idle)
		fetch_poll_cb(-1, 0, w);
}

static void
fetch_ignore_cb(struct rpipe *p, redisReply *r, void *arg)
{
}

/* Tracking on the broker connection, redirected to the notify connection (both must be up). */
static void
fetch_enable_tracking(struct worker *w)
{
	w->tracking = false;
	if (!w->broker.ready || !w->notify.ready)
		return;
	char id[32];
	snprintf(id, sizeof id, "%lld", w->notify.client_id);
	const char *off[] = {"CLIENT", "TRACKING", "OFF"};
	rpipe_send(&w->broker, fetch_ignore_cb, NULL, 3, off, NULL);
	const char *on[] = {"CLIENT", "TRACKING", "ON", "REDIRECT", id};
	rpipe_send(&w->broker, fetch_tracking_cb, NULL, 5, on, NULL);
}

static void
fetch_reconciled(struct worker *w, bool ok)
{
	w->reconciling = false;
	if (!ok)
		return; /* the connection went again: the next on_up reconciles */
	w->fetch_idle = false;
	w->next_probe = 0;
	engine_tick(w);
}

void
fetch_on_broker_up(struct worker *w)
{
	outcome_resend(w);
	fetch_enable_tracking(w);
	w->reconciling = true;
	sweep_reconcile(w, fetch_reconciled);
}

void
fetch_on_broker_down(struct worker *w)
{
	w->fetching = 0;
	w->batch_probe = w->batch_dry = false;
	w->tracking = false;
}

void
fetch_on_notify_up(struct worker *w)
{
	fetch_enable_tracking(w);
}

void
fetch_on_notify_down(struct worker *w)
{
	/* invalidations may be lost until the redirect is set again: poll meanwhile */
	w->tracking = false;
	if (w->fetch_idle)
		fetch_arm_poll(w);
}

/*
 * The engine: slot threads that fetch, run and record; the main thread that handles signals and time limits;
 * the housekeeper thread that moves due ETA messages, refreshes leases and recovers messages of dead workers.
 *
 * Ownership of a held message: the slot thread owns it until it has recorded the outcome. The main thread may
 * take it over (SLOT_CLAIMED) only while the slot is HELD or RUNNING, under the slot mutex, when it must act
 * for a task that does not return (hard limit, cold stop); the slot then never touches it again.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "report.h"
#include "util.h"
#include "worker.h"

#define COLD_GRACE_S 0.8

/* Retry a recording step until it succeeds; give up only on a cold stop (the message stays in Redis). */
#define UNTIL_DONE(s, rc, expr)                                                                                        \
	do {                                                                                                           \
		while ((expr) < 0)                                                                                     \
			if (rconn_ensure((rc), &(s)->w->cold, -1) < 0)                                                 \
				goto abandoned;                                                                        \
	} while (0)

static bool
str_same(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* The same Redis server with the same credentials (databases may differ). */
static bool
same_server(const struct redis_url *a, const struct redis_url *b)
{
	return str_same(a->host, b->host) && str_same(a->path, b->path) && a->port == b->port &&
	       str_same(a->user, b->user) && str_same(a->password, b->password);
}

static double
rand01(void)
{
	uint32_t v = 0;
	if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v)
		v = (uint32_t)rand();
	return (double)v / 4294967296.0;
}

static void
sleep_s(double s)
{
	struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int
engine_init(struct worker *w, const struct spark_config *cfg, const char *node, int nslots)
{
	memset(w, 0, sizeof *w);
	w->cfg = cfg;
	w->node = node;
	w->nslots = nslots;
	spark_strlcpy(w->host, spark_hostname(), sizeof w->host);
	w->pid = (long)getpid();
	w->proc_key = xasprintf(KEY_PROCESSING_PREFIX "%s:%ld", w->host, w->pid);
	w->landing_key = xasprintf("%s" KEY_LANDING_SUFFIX, w->proc_key);
	w->alive_key = xasprintf(KEY_ALIVE_PREFIX "%s:%ld", w->host, w->pid);
	/* kombu's order: priority-major, then queue */
	static const int steps[] = {0, 3, 6, 9};
	w->nqkeys = 4 * cfg->nqueues;
	w->qkeys = xcalloc((size_t)w->nqkeys, sizeof *w->qkeys);
	w->qnames = xcalloc((size_t)w->nqkeys, sizeof *w->qnames);
	for (int p = 0, k = 0; p < 4; p++)
		for (int q = 0; q < cfg->nqueues; q++, k++) {
			w->qkeys[k] = message_queue_key(cfg->queues[q], steps[p]);
			w->qnames[k] = xstrdup(cfg->queues[q]);
		}
	rconn_init(&w->ctl, w, &cfg->broker, "broker");
	if (cfg->result_backend != NULL)
		rconn_init(&w->ctl_backend, w, &cfg->backend, "result backend");
	w->backend_on_broker = cfg->result_backend != NULL && same_server(&cfg->broker, &cfg->backend);
	pthread_rwlock_init(&w->fetch_lock, NULL);
	w->slots = xcalloc((size_t)nslots, sizeof *w->slots);
	for (int i = 0; i < nslots; i++) {
		struct slot *s = &w->slots[i];
		s->w = w;
		s->idx = i;
		pthread_mutex_init(&s->mu, NULL);
		rconn_init(&s->broker, w, &cfg->broker, "broker");
		if (cfg->result_backend != NULL)
			rconn_init(&s->backend, w, &cfg->backend, "result backend");
	}
	return 0;
}

void
engine_free(struct worker *w)
{
	for (int i = 0; i < w->nslots; i++) {
		struct slot *s = &w->slots[i];
		rconn_close(&s->broker);
		rconn_close(&s->backend);
		held_free(&s->held);
		pthread_mutex_destroy(&s->mu);
	}
	free(w->slots);
	pthread_rwlock_destroy(&w->fetch_lock);
	rconn_close(&w->ctl);
	rconn_close(&w->ctl_backend);
	for (int i = 0; i < w->nqkeys; i++) {
		free(w->qkeys[i]);
		free(w->qnames[i]);
	}
	free(w->qkeys);
	free(w->qnames);
	free(w->proc_key);
	free(w->landing_key);
	free(w->alive_key);
}

void
engine_recycle(struct worker *w, const char *reason)
{
	if (atomic_exchange(&w->recycle_sent, 1) == 0) {
		log_info("Recycling this worker process (%s): finishing in-flight tasks", reason);
		report_send("recycle %s", reason);
	}
	atomic_store(&w->stop, 1);
}

/* ---------------------------------------------------------------- slots */

static bool
slot_has_backend(const struct slot *s)
{
	return s->w->cfg->result_backend != NULL;
}

/* Send the deferred finish report, if any, with the given report in the same datagram. */
static void
slot_report(struct slot *s, const char *line)
{
	if (s->deferred_report[0] != '\0' && line != NULL)
		report_send("%s\n%s", s->deferred_report, line);
	else if (s->deferred_report[0] != '\0')
		report_send("%s", s->deferred_report);
	else if (line != NULL)
		report_send("%s", line);
	s->deferred_report[0] = '\0';
}

static void
slot_finish_report_as(struct slot *s, const char *task_id, const char *outcome, bool counted, bool defer)
{
	struct worker *w = s->w;
	long processed = counted ? atomic_fetch_add(&w->processed, 1) + 1 : atomic_load(&w->processed);
	long rss = proc_rss_kib(0);
	char *id = report_escape(task_id);
	char *line = xasprintf("finish %d %s %s %ld %ld", s->idx, id, outcome, processed, rss);
	/* a finish too long to wait in deferred_report (a long id) goes now, alone */
	if (defer && s->deferred_report[0] == '\0' && strlen(line) < sizeof s->deferred_report)
		spark_strlcpy(s->deferred_report, line, sizeof s->deferred_report);
	else
		slot_report(s, line);
	free(line);
	free(id);
	if (!counted)
		return;
	if (w->cfg->max_tasks_per_child > 0 && processed >= w->cfg->max_tasks_per_child)
		engine_recycle(w, "max-tasks");
	else if (w->cfg->max_memory_kib > 0 && rss > w->cfg->max_memory_kib)
		engine_recycle(w, "max-memory");
}

static void
slot_finish_report(struct slot *s, const char *task_id, const char *outcome, bool counted)
{
	slot_finish_report_as(s, task_id, outcome, counted, false);
}

/* A message that cannot run: FAILURE result when it has an id, then the dead-letter list. */
static void
slot_reject(struct slot *s, const struct message *m, const char *exc_module, const char *exc_type,
            const char *exc_message, const char *reason)
{
	struct held *h = &s->held;
	char *queue = message_queue_of_key(h->qkey);
	log_errorx("Rejecting message from queue %s (task %s[%s]): %s; moved to " KEY_DEADLETTER, queue,
	           m->task_name ? m->task_name : "?", m->task_id ? m->task_id : "?", reason);
	free(queue);
	if (m->task_id != NULL && slot_has_backend(s) && !m->ignore_result)
		UNTIL_DONE(s, &s->backend,
		           result_store(&s->backend, m->task_id, "FAILURE",
		                        result_exception(exc_module, exc_type, exc_message), reason, m));
	UNTIL_DONE(s, &s->broker, broker_deadletter(&s->broker, h, reason));
	return;
abandoned:
	log_warnx("Cold shutdown: rejected message left in the processing list for recovery");
}

static void
slot_park_forever(void)
{
	/* the main thread took this slot's message over and is about to end the process */
	for (;;)
		sleep(60);
}

static char *
json_brief(json_t *v)
{
	if (v == NULL)
		return xstrdup("None");
	char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
	if (text == NULL)
		return xstrdup("?");
	if (strlen(text) > 200)
		strcpy(text + 197, "...");
	return text;
}

static void
slot_run(struct slot *s, struct message *m, task_fn fn)
{
	struct worker *w = s->w;
	const struct spark_config *cfg = w->cfg;
	struct held *h = &s->held;
	double hard = m->hard_limit >= 0 ? m->hard_limit : cfg->time_limit;
	double soft = m->soft_limit >= 0 ? m->soft_limit : cfg->soft_time_limit;
	bool store = slot_has_backend(s) && !m->ignore_result;
	struct task_run run;
	memset(&run, 0, sizeof run);

	log_info("Task %s[%s] received", m->task_name, m->task_id);
	/* STARTED goes out without waiting for its reply: the task runs meanwhile, the reply is read before the
	 * outcome is written on the same connection, so the order is kept and a round trip is saved */
	bool started_pending = false;
	if (store) {
		char *meta =
		    result_meta_text(m->task_id, "STARTED",
		                     json_pack("{s:I, s:s}", "pid", (json_int_t)w->pid, "hostname", w->node), NULL, m);
		if (meta != NULL && !m->redelivered && w->backend_on_broker) {
			/* one write carries kombu's records and STARTED; the replies come with the next fetch */
			(void)result_store_plain_send_in(&s->broker, m->task_id, meta, cfg->backend.db);
		} else if (meta != NULL) {
			if (rconn_ensure(&s->backend, &w->cold, -1) == 0)
				started_pending =
				    (m->redelivered ? result_store_send(&s->backend, m->task_id, meta)
				                    : result_store_plain_send(&s->backend, m->task_id, meta)) == 0 &&
				    rconn_flush(&s->backend) == 0;
		}
		free(meta);
	}
	(void)rconn_flush(&s->broker);

	pthread_mutex_lock(&s->mu);
	s->state = SLOT_RUNNING;
	s->started_at = now_mono();
	s->soft_s = soft;
	s->hard_s = hard;
	s->soft_at = soft > 0 ? s->started_at + soft : 0;
	s->hard_at = hard > 0 ? s->started_at + hard : 0;
	s->soft_fired = false;
	s->store_result = store;
	spark_strlcpy(s->task_id, m->task_id, sizeof s->task_id);
	spark_strlcpy(s->task_name, m->task_name, sizeof s->task_name);
	/* a cold stop that raced with the start must not be lost */
	atomic_store(&s->cancel, atomic_load(&w->cold) ? TASK_CANCEL_SHUTDOWN : TASK_CANCEL_NONE);
	pthread_mutex_unlock(&s->mu);
	char *id = report_escape(m->task_id), *name = report_escape(m->task_name);
	char *startline = xasprintf("start %d %g %s %s", s->idx, hard, id, name);
	slot_report(s, startline);
	free(startline);
	free(id);
	free(name);

	run.task_id = m->task_id;
	run.task_name = m->task_name;
	run.args = m->args;
	run.kwargs = m->kwargs;
	run.headers = m->headers;
	run.retries = m->retries;
	run.max_retries = cfg->max_retries;
	run.last_attempt = m->retries >= cfg->max_retries;
	run.retry_countdown = message_retry_countdown(cfg, m->retries, rand01());
	run.redelivered = m->redelivered;
	run.cfg = cfg;
	run.slot = s->idx;
	run.node = w->node;
	run.cancel = &s->cancel;
	run.outcome = TASK_SUCCESS;
	double t0 = now_mono();
	fn(&run);
	double runtime = now_mono() - t0;

	pthread_mutex_lock(&s->mu);
	if (s->state == SLOT_CLAIMED) {
		pthread_mutex_unlock(&s->mu);
		json_decref(run.result);
		slot_park_forever();
	}
	s->state = SLOT_FINISHING;
	pthread_mutex_unlock(&s->mu);

	int cancel = atomic_load(&s->cancel);
	if (cancel == TASK_CANCEL_SHUTDOWN && run.outcome != TASK_SUCCESS) {
		json_decref(run.result);
		run.result = NULL;
		UNTIL_DONE(s, &s->broker, broker_requeue(&s->broker, h));
		log_warnx("Task %s[%s] interrupted by cold shutdown: put back in the queue", m->task_name, m->task_id);
		slot_finish_report(s, m->task_id, "requeued", false);
		return;
	}
	if (cancel == TASK_CANCEL_SOFT_LIMIT && run.outcome != TASK_SUCCESS &&
	    strcmp(run.exc_type, "SoftTimeLimitExceeded") != 0)
		task_fail(&run, TASK_FAILURE, "celery.exceptions", "SoftTimeLimitExceeded",
		          "soft time limit (%gs) exceeded", soft);
	else if (cancel == TASK_CANCEL_SOFT_LIMIT && run.outcome != TASK_SUCCESS)
		run.outcome = TASK_FAILURE;

	if (run.outcome == TASK_DEFER) {
		UNTIL_DONE(s, &s->broker, broker_park(&s->broker, h, now_wall() + DEFER_DELAY_S));
		log_warnx("Task %s[%s] deferred for %gs: %s", m->task_name, m->task_id, DEFER_DELAY_S, run.exc_message);
		slot_finish_report(s, m->task_id, "requeued", false);
		return;
	}
	if (run.outcome == TASK_RETRY && m->retries >= cfg->max_retries)
		run.outcome = TASK_FAILURE; /* retries exhausted: fail with the task's own exception */

	/* a lost STARTED reply only means the connection dropped: the outcome below is written after a reconnect */
	if (started_pending)
		while (s->backend.pending > 0 && rconn_collect(&s->backend) == 0)
			;

	const char *outcome = "success";
	char *meta = NULL; /* the outcome's Celery meta, when results are stored */
	if (run.outcome == TASK_SUCCESS) {
		char *brief = json_brief(run.result);
		log_info("Task %s[%s] succeeded in %.6fs: %s", m->task_name, m->task_id, runtime, brief);
		free(brief);
		if (store)
			meta = result_meta_text(m->task_id, "SUCCESS", run.result ? json_incref(run.result) : NULL,
			                        NULL, m);
	} else if (run.outcome == TASK_RETRY) {
		outcome = "retry";
		double countdown = run.retry_countdown > 0 ? run.retry_countdown : 0;
		double eta = now_wall() + countdown;
		char *env = message_build_retry(m, m->retries + 1, eta);
		if (env == NULL) {
			log_errorx("Task %s[%s] cannot be retried: its message cannot be re-encoded", m->task_name,
			           m->task_id);
			run.outcome = TASK_FAILURE;
		} else {
			/* publish first, then RETRY, then ack: a crash in between duplicates, never loses */
			int rv;
			while ((rv = broker_publish_eta(&s->broker, h->qkey, env, eta)) < 0)
				if (rconn_ensure(&s->broker, &w->cold, -1) < 0)
					break;
			free(env);
			if (rv < 0)
				goto abandoned;
			log_info("Task %s[%s] retry: Retry in %.3gs: %s('%s')", m->task_name, m->task_id, countdown,
			         run.exc_type, run.exc_message);
			char tb[1200];
			snprintf(tb, sizeof tb, "%s.%s: %s", run.exc_module, run.exc_type, run.exc_message);
			if (store)
				meta = result_meta_text(m->task_id, "RETRY",
				                        result_exception(run.exc_module, run.exc_type, run.exc_message),
				                        tb, m);
		}
	}
	if (run.outcome == TASK_FAILURE) {
		outcome = "failure";
		log_errorx("Task %s[%s] raised unexpected: %s('%s')", m->task_name, m->task_id, run.exc_type,
		           run.exc_message);
		char tb[1200];
		snprintf(tb, sizeof tb, "%s.%s: %s", run.exc_module, run.exc_type, run.exc_message);
		if (store)
			meta = result_meta_text(m->task_id, "FAILURE",
			                        result_exception(run.exc_module[0] ? run.exc_module : "builtins",
			                                         run.exc_type[0] ? run.exc_type : "RuntimeError",
			                                         run.exc_message),
			                        tb, m);
	}
	/*
	 * The ack comes only after the outcome is recorded: in one atomic call when both live on one server.
	 * A first delivery uses plain commands in MULTI/EXEC (only this run's STARTED can be stored); a redelivered
	 * message may have succeeded before, so its write goes through the Lua guard that never overwrites SUCCESS.
	 */
	bool fused = meta != NULL && w->backend_on_broker;
	if (!fused && meta != NULL) {
		if (m->redelivered)
			UNTIL_DONE(s, &s->backend, result_store_text(&s->backend, m->task_id, meta));
		else
			UNTIL_DONE(s, &s->backend, result_store_plain(&s->backend, m->task_id, meta));
		free(meta);
		meta = NULL;
	}
	/* a first delivery's finish is queued and goes out with the next fetch (slot_fin_complete), unless it is
	 * this process's last task, so that recycling never takes a message it would only put back */
	bool last = cfg->max_tasks_per_child > 0 && atomic_load(&w->processed) + 1 >= cfg->max_tasks_per_child;
	if (!m->redelivered && !last &&
	    broker_finish_plain_send(&s->broker, h, m->task_id, meta, fused ? cfg->backend.db : 0) == 0) {
		pthread_mutex_lock(&s->mu); /* a reconciling slot reads held and fin */
		s->fin.active = true;
		s->fin.h = *h;
		memset(h, 0, sizeof *h);
		s->fin.task_id = xstrdup(m->task_id);
		s->fin.meta = meta;
		s->fin.backend_db = fused ? cfg->backend.db : 0;
		s->fin.outcome = outcome;
		pthread_mutex_unlock(&s->mu);
		json_decref(run.result);
		return;
	}
	if (fused && m->redelivered)
		UNTIL_DONE(s, &s->broker, broker_finish(&s->broker, h, m->task_id, meta, cfg->backend.db));
	else
		UNTIL_DONE(s, &s->broker,
		           broker_finish_plain(&s->broker, h, m->task_id, meta, fused ? cfg->backend.db : 0));
	free(meta);
	json_decref(run.result);
	slot_finish_report(s, m->task_id, outcome, true);
	return;
abandoned:
	json_decref(run.result);
	log_warnx("Task %s[%s]: cold shutdown while recording; the message stays in Redis for recovery", m->task_name,
	          m->task_id);
}

/* One fetched message, from decoding to its final place (result + ack, ETA set, dead letters, queue). */
static void
slot_handle(struct slot *s)
{
	struct worker *w = s->w;
	struct held *h = &s->held;
	struct message m;
	double now = now_wall();
	task_fn fn = NULL;
	int decoded = message_decode(h->raw, h->len, &m);
	/* kombu's unacked records are queued now and go out at once with the next write on the connection (the
	 * STARTED meta, or the first command of any other outcome); their replies are read later */
	if (h->unrecorded)
		(void)broker_record_send(&s->broker, h, m.delivery_tag, m.exchange, m.routing_key);
	if (decoded < 0) {
		slot_reject(s, &m, "builtins", m.exc_type, m.reason, m.reason);
		goto out;
	}
	if ((fn = task_lookup(m.task_name)) == NULL) {
		char reason[512];
		snprintf(reason, sizeof reason, "Received unregistered task of type '%.400s'", m.task_name);
		slot_reject(s, &m, "celery.exceptions", "NotRegistered", m.task_name, reason);
		goto out;
	}
	if (m.expires > 0 && now >= m.expires) {
		log_info("Discarding revoked task: %s[%s] (expired)", m.task_name, m.task_id);
		if (slot_has_backend(s) && !m.ignore_result)
			UNTIL_DONE(s, &s->backend,
			           result_store(&s->backend, m.task_id, "REVOKED",
			                        result_exception("celery.exceptions", "TaskRevokedError", "expired"),
			                        NULL, &m));
		UNTIL_DONE(s, &s->broker, broker_ack(&s->broker, h));
		slot_finish_report(s, m.task_id, "revoked", false);
		goto out;
	}
	if (m.eta > now) {
		char iso[64];
		message_format_iso(m.eta, true, iso, sizeof iso);
		UNTIL_DONE(s, &s->broker, broker_park(&s->broker, h, m.eta));
		log_info("Task %s[%s] received: ETA %s, waiting in " KEY_ETA, m.task_name, m.task_id, iso);
		goto out;
	}
	if (atomic_load(&w->stop)) {
		/* stopping: a message not started goes back at once, at the consumer end of its queue */
		UNTIL_DONE(s, &s->broker, broker_requeue(&s->broker, h));
		log_info("Task %s[%s] put back in the queue (worker stopping)", m.task_name, m.task_id);
		goto out;
	}
	slot_run(s, &m, fn);
	goto out;
abandoned:
	log_warnx("Cold shutdown: message left in the processing list for recovery");
out:
	message_free(&m);
}

/* The queued finish of the previous task: confirmed by the fetch (ok), else written again until it holds. */
static void
slot_fin_complete(struct slot *s, bool ok, bool defer_report)
{
	struct finishing *f = &s->fin;
	if (!ok)
		UNTIL_DONE(s, &s->broker, broker_finish_plain(&s->broker, &f->h, f->task_id, f->meta, f->backend_db));
	slot_finish_report_as(s, f->task_id, f->outcome, true, defer_report);
	goto out;
abandoned:
	log_warnx("Task [%s]: cold shutdown while recording; the message stays in Redis for recovery", f->task_id);
out:
	pthread_mutex_lock(&s->mu);
	struct finishing done = *f;
	memset(f, 0, sizeof *f);
	pthread_mutex_unlock(&s->mu);
	held_free(&done.h);
	free(done.task_id);
	free(done.meta);
}

static void
held_copy(struct held *dst, const struct held *src)
{
	dst->raw = xmalloc(src->len + 1);
	memcpy(dst->raw, src->raw, src->len + 1);
	dst->len = src->len;
	dst->tag = NULL;
	dst->qkey = NULL;
}

/*
 * After this slot's broker connection was re-established: a fetch whose reply was lost with the old connection
 * may have left a message in this process's lists that no slot knows of, and nobody else would ever put it back
 * (the process is alive). With every fetch of the process paused, put back what no slot holds.
 */
static int
slot_reconcile(struct slot *s, const struct held *pending)
{
	struct worker *w = s->w;
	struct held *keep = xcalloc((size_t)(2 * w->nslots + 1), sizeof *keep);
	int k = 0, rv;
	pthread_rwlock_wrlock(&w->fetch_lock);
	for (int i = 0; i < w->nslots; i++) {
		struct slot *o = &w->slots[i];
		pthread_mutex_lock(&o->mu);
		if (o->held.raw != NULL)
			held_copy(&keep[k++], &o->held);
		if (o->fin.active && o->fin.h.raw != NULL)
			held_copy(&keep[k++], &o->fin.h);
		pthread_mutex_unlock(&o->mu);
	}
	if (pending->raw != NULL)
		held_copy(&keep[k++], pending);
	rv = broker_reconcile(&s->broker, keep, k);
	pthread_rwlock_unlock(&w->fetch_lock);
	for (int i = 0; i < k; i++)
		free(keep[i].raw);
	free(keep);
	return rv;
}

static void *
slot_main(void *arg)
{
	struct slot *s = arg;
	struct worker *w = s->w;
	struct held pending;
	memset(&pending, 0, sizeof pending);
	unsigned seen_gen = 0;
	while (!atomic_load(&w->stop)) {
		if (rconn_ensure(&s->broker, &w->stop, -1) < 0)
			break;
		if (s->broker.gen != seen_gen) {
			if (seen_gen != 0 && slot_reconcile(s, &pending) < 0)
				continue;
			seen_gen = s->broker.gen;
		}
		/* from the fetch command to the held record, a reconciling slot must wait */
		pthread_rwlock_rdlock(&w->fetch_lock);
		bool queued_ok = true;
		int got = 0;
		if (s->fin.active) {
			got = broker_fetch_queued(&s->broker, &pending, &queued_ok);
			/* with a next message in hand, the finish report travels with its start report */
			slot_fin_complete(s, queued_ok, got == 1);
		}
		if (got == 0 && !atomic_load(&w->stop))
			got = broker_fetch(&s->broker, &pending, &queued_ok);
		if (got == 1) {
			pthread_mutex_lock(&s->mu);
			s->held = pending;
			memset(&pending, 0, sizeof pending);
			s->state = SLOT_HELD;
			pthread_mutex_unlock(&s->mu);
		}
		pthread_rwlock_unlock(&w->fetch_lock);
		if (got <= 0)
			continue;

		slot_handle(s);
		/* a message that did not start (ETA, rejected, put back) must not hold the previous finish back */
		slot_report(s, NULL);

		pthread_mutex_lock(&s->mu);
		held_free(&s->held);
		s->state = SLOT_IDLE;
		s->task_id[0] = s->task_name[0] = '\0';
		s->soft_at = s->hard_at = 0;
		pthread_mutex_unlock(&s->mu);
	}
	if (s->fin.active)
		slot_fin_complete(s, broker_read_queued(&s->broker) == 0, false);
	slot_report(s, NULL);
	if (pending.raw != NULL)
		log_warnx("A message taken while the broker connection failed stays in %s for recovery",
		          w->landing_key);
	held_free(&pending);
	atomic_fetch_sub(&w->live_slots, 1);
	return NULL;
}

/* ---------------------------------------------------------------- housekeeper */

/* Queue lengths for sparkd's status (all priority steps summed). */
static int
engine_report_queues(struct worker *w, struct rconn *rc)
{
	char line[SPARK_REPORT_MAX] = "queues";
	for (int q = 0; q < w->cfg->nqueues && q < REPORT_MAX_QUEUES; q++) {
		long long total = 0;
		for (int k = q; k < w->nqkeys; k += w->cfg->nqueues) {
			redisReply *r = rconn_command(rc, "LLEN %s", w->qkeys[k]);
			if (r == NULL)
				return -1;
			if (r->type == REDIS_REPLY_INTEGER)
				total += r->integer;
			freeReplyObject(r);
		}
		char *name = report_escape(w->cfg->queues[q]);
		size_t n = strlen(line);
		/* whole items only: a cut one would reach sparkd malformed */
		if (n + strlen(name) + 32 < sizeof line)
			snprintf(line + n, sizeof line - n, " %s=%lld", name, total);
		free(name);
	}
	report_send("%s", line);
	return 0;
}

static void *
housekeeper_main(void *arg)
{
	struct worker *w = arg;
	struct rconn rc;
	rconn_init(&rc, w, &w->cfg->broker, "broker");
	double refresh_every = w->cfg->visibility_timeout / 3;
	if (refresh_every > 10)
		refresh_every = 10;
	double now = now_mono();
	double next_due = now, next_refresh = now + refresh_every, next_recover = now + 10, next_sweep = now + 60;
	double next_queues = now;
	while (!atomic_load(&w->hk_stop)) {
		if (rconn_ensure(&rc, &w->hk_stop, -1) < 0)
			break;
		now = now_mono();
		int rv = 0;
		if (now >= next_due && (rv = broker_move_due(&rc)) == 0)
			next_due = now + 0.2;
		if (rv == 0 && now >= next_refresh && (rv = broker_refresh(&rc)) == 0)
			next_refresh = now + refresh_every;
		if (rv == 0 && now >= next_recover && (rv = broker_recover_dead(&rc)) == 0)
			next_recover = now + 10;
		if (rv == 0 && now >= next_sweep && (rv = broker_restore_unacked(&rc)) == 0)
			next_sweep = now + 60;
		if (rv == 0 && now >= next_queues && (rv = engine_report_queues(w, &rc)) == 0)
			next_queues = now + 5;
		sleep_s(0.05);
	}
	rconn_close(&rc);
	return NULL;
}

/* ---------------------------------------------------------------- main thread: limits, stops */

/* Take over every message a slot holds (HELD or RUNNING) and put it back in its queue. */
static void
engine_requeue_claimed(struct worker *w, struct held *h)
{
	for (int i = 0; i < 5; i++)
		if (rconn_ensure(&w->ctl, NULL, 0.3) == 0 && broker_requeue(&w->ctl, h) == 0)
			return;
	log_warnx("Could not put a message back (broker down): it stays in %s for recovery", w->proc_key);
}

static int
engine_claim(struct slot *s, struct held *copy)
{
	int ok = 0;
	pthread_mutex_lock(&s->mu);
	if ((s->state == SLOT_HELD || s->state == SLOT_RUNNING) && s->held.raw != NULL) {
		s->state = SLOT_CLAIMED;
		copy->raw = xmalloc(s->held.len + 1);
		memcpy(copy->raw, s->held.raw, s->held.len + 1);
		copy->len = s->held.len;
		copy->tag = xstrdup(s->held.tag);
		copy->qkey = xstrdup(s->held.qkey);
		ok = 1;
	}
	pthread_mutex_unlock(&s->mu);
	return ok;
}

static void
engine_requeue_all(struct worker *w, int except)
{
	for (int i = 0; i < w->nslots; i++) {
		struct held copy;
		memset(&copy, 0, sizeof copy);
		if (i == except || !engine_claim(&w->slots[i], &copy))
			continue;
		atomic_store(&w->slots[i].cancel, TASK_CANCEL_SHUTDOWN);
		engine_requeue_claimed(w, &copy);
		held_free(&copy);
	}
}

/* The task ignored its soft limit and reached the hard one: record it, put the rest back, end the process. */
static void __attribute__((noreturn))
engine_hard_limit(struct worker *w, struct slot *s, struct held *h, const char *task_id, const char *task_name,
                  double hard, bool store)
{
	atomic_store(&s->cancel, TASK_CANCEL_HARD_LIMIT);
	atomic_store(&w->stop, 1);
	log_errorx("Hard time limit (%gs) exceeded for %s[%s]", hard, task_name, task_id);
	char msg[128];
	snprintf(msg, sizeof msg, "hard time limit (%gs) exceeded", hard);
	if (store) {
		int rv = -1;
		for (int i = 0; i < 20 && rv < 0; i++)
			if (rconn_ensure(&w->ctl_backend, NULL, 0.5) == 0)
				rv = result_store(&w->ctl_backend, task_id, "FAILURE",
				                  result_exception("celery.exceptions", "TimeLimitExceeded", msg), msg,
				                  NULL);
	}
	int rv = -1;
	for (int i = 0; i < 20 && rv < 0; i++)
		if (rconn_ensure(&w->ctl, NULL, 0.5) == 0)
			rv = broker_ack(&w->ctl, h);
	long processed = atomic_fetch_add(&w->processed, 1) + 1;
	char *id = report_escape(task_id);
	report_send("finish %d %s failure %ld %ld", s->idx, id, processed, proc_rss_kib(0));
	free(id);
	engine_requeue_all(w, s->idx);
	report_send("recycle time-limit");
	for (int i = 0; i < 3; i++)
		if (rconn_ensure(&w->ctl, NULL, 0.5) == 0 && broker_unregister(&w->ctl) == 0)
			break;
	log_warnx("Exiting to stop the task; sparkd starts a replacement");
	_exit(0);
}

static void
engine_check_limits(struct worker *w)
{
	double now = now_mono();
	for (int i = 0; i < w->nslots; i++) {
		struct slot *s = &w->slots[i];
		pthread_mutex_lock(&s->mu);
		if (s->state != SLOT_RUNNING) {
			pthread_mutex_unlock(&s->mu);
			continue;
		}
		if (s->soft_at > 0 && now >= s->soft_at && !s->soft_fired) {
			s->soft_fired = true;
			int expected = TASK_CANCEL_NONE;
			atomic_compare_exchange_strong(&s->cancel, &expected, TASK_CANCEL_SOFT_LIMIT);
			log_warnx("Soft time limit (%gs) exceeded for %s[%s]", s->soft_s, s->task_name, s->task_id);
		}
		if (s->hard_at > 0 && now >= s->hard_at) {
			struct held copy;
			char id[128], name[256];
			double hard = s->hard_s;
			bool store = s->store_result;
			pthread_mutex_unlock(&s->mu);
			memset(&copy, 0, sizeof copy);
			spark_strlcpy(id, s->task_id, sizeof id);
			spark_strlcpy(name, s->task_name, sizeof name);
			if (engine_claim(s, &copy))
				engine_hard_limit(w, s, &copy, id, name, hard, store);
			continue;
		}
		pthread_mutex_unlock(&s->mu);
	}
}

static void
engine_warm_stop(struct worker *w)
{
	atomic_store(&w->stop, 1);
	if (atomic_exchange(&w->draining_sent, 1) == 0) {
		log_info("worker: Warm shutdown (MainProcess)");
		report_send("draining");
	}
}

static void
engine_cold_stop(struct worker *w)
{
	log_info("worker: Cold shutdown (MainProcess)");
	atomic_store(&w->stop, 1);
	atomic_store(&w->cold, 1);
	for (int i = 0; i < w->nslots; i++)
		atomic_store(&w->slots[i].cancel, TASK_CANCEL_SHUTDOWN);
}

/* Connect the control connection and do the start-up work; a stop signal meanwhile ends it (-1). */
static int
engine_startup(struct worker *w, const sigset_t *set)
{
	for (;;) {
		if (rconn_ensure(&w->ctl, NULL, 0.5) == 0 && broker_register(&w->ctl) == 0 &&
		    broker_recover_dead(&w->ctl) == 0 && broker_restore_unacked(&w->ctl) == 0)
			return 0;
		struct timespec tick = {0, 50 * 1000 * 1000};
		int sig = sigtimedwait(set, NULL, &tick);
		if (sig == SIGTERM || sig == SIGINT || sig == SIGQUIT)
			return -1;
	}
}

int
engine_run(struct worker *w)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGQUIT);
	sigaddset(&set, SIGHUP);
	/* every thread inherits the mask: signals are taken only by the main thread, with sigtimedwait */
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (engine_startup(w, &set) < 0) {
		log_info("Stopped before start-up completed");
		return 0;
	}
	if (workflow_init(w->cfg, w->node, w->nslots) < 0)
		log_warnx("Workflow support could not be initialised; workflow tasks will retry it");

	if (pthread_create(&w->housekeeper, NULL, housekeeper_main, w) != 0)
		fatalx("cannot start the housekeeper thread");
	w->hk_started = true;
	atomic_store(&w->live_slots, w->nslots);
	for (int i = 0; i < w->nslots; i++) {
		if (pthread_create(&w->slots[i].thread, NULL, slot_main, &w->slots[i]) != 0)
			fatalx("cannot start slot thread %d", i);
		w->slots[i].started = true;
	}
	report_send("ready %d", w->nslots);
	char queues[512] = "";
	for (int i = 0; i < w->cfg->nqueues; i++) {
		size_t n = strlen(queues);
		snprintf(queues + n, sizeof queues - n, "%s%s", i ? "," : "", w->cfg->queues[i]);
	}
	log_info("%s ready: %d slot%s, queues %s", w->node, w->nslots, w->nslots == 1 ? "" : "s", queues);

	int sigints = 0;
	double cold_at = 0;
	while (atomic_load(&w->live_slots) > 0) {
		struct timespec tick = {0, 50 * 1000 * 1000};
		int sig = sigtimedwait(&set, NULL, &tick);
		if (sig == SIGTERM || (sig == SIGINT && sigints++ == 0)) {
			engine_warm_stop(w);
		} else if ((sig == SIGQUIT || sig == SIGINT) && cold_at == 0) {
			engine_cold_stop(w);
			cold_at = now_mono();
		}
		engine_check_limits(w);
		if (cold_at > 0 && now_mono() - cold_at > COLD_GRACE_S) {
			/* a task that ignores cancellation: take its message back and leave */
			engine_requeue_all(w, -1);
			log_warnx("Tasks did not stop in time; their messages are back in the queue");
			_exit(0);
		}
	}
	for (int i = 0; i < w->nslots; i++)
		if (w->slots[i].started)
			pthread_join(w->slots[i].thread, NULL);
	atomic_store(&w->hk_stop, 1);
	pthread_join(w->housekeeper, NULL);
	/* the control connection may have died unnoticed since start-up: one failure is not final */
	for (int i = 0; i < 3; i++)
		if (rconn_ensure(&w->ctl, NULL, 0.5) == 0 && broker_unregister(&w->ctl) == 0)
			break;
	workflow_shutdown();
	log_info("%s stopped (%ld task%s processed)", w->node, atomic_load(&w->processed),
	         atomic_load(&w->processed) == 1 ? "" : "s");
	return 0;
}

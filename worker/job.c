/*
 * A held message from the fetch to its end: decode, the checks that end it without running (bad, unknown,
 * expired, ETA, stopping), a slot, the time limits, and the task's completion, which decides the outcome
 * outcome.c writes. Everything runs on the loop thread; a task ends by calling run->done.
 */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "log.h"
#include "util.h"
#include "worker.h"

/* Jitter for retry delays: xorshift64* seeded once per process (a syscall per task would cost more than the
 * task). */
static double
rand01(struct worker *w)
{
	if (w->rng == 0) {
		if (getrandom(&w->rng, sizeof w->rng, 0) != (ssize_t)sizeof w->rng || w->rng == 0)
			w->rng = (uint64_t)w->pid * 0x9E3779B97F4A7C15ULL + 1;
	}
	w->rng ^= w->rng >> 12;
	w->rng ^= w->rng << 25;
	w->rng ^= w->rng >> 27;
	return (double)((w->rng * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;
}

/* The meta for j's outcome, in the job's own buffer (NULL when results are not stored). */
static char *
job_meta(struct job *j, const char *status, const char *result_json, size_t result_len, const char *traceback)
{
	if (!j->store_result)
		return NULL;
	meta_build(&j->meta_buf, j->m.task_id, status, result_json, result_len, traceback, &j->m);
	return j->meta_buf.p;
}

static char *
job_failure_meta(struct job *j, const char *status, const char *module, const char *type, const char *message)
{
	if (!j->store_result)
		return NULL;
	struct worker *w = j->w;
	char tb[1200];
	snprintf(tb, sizeof tb, "%s.%s: %s", module, type, message);
	meta_exception(&w->scratch, module, type, message);
	return job_meta(j, status, w->scratch.p, w->scratch.len, tb);
}

/* Celery's REVOKED: TaskRevokedError(reason) without a traceback (mark_as_revoked), then the ack. */
static void
job_end_revoked(struct job *j, const char *reason, const char *signal, bool expired)
{
	struct worker *w = j->w;
	log_info("Discarding revoked task: %s[%s] (%s)", j->m.task_name ? j->m.task_name : "?",
	         j->m.task_id ? j->m.task_id : "?", reason);
	if (w->events.on)
		events_revoked(w, j, j->terminated, signal, expired);
	if (j->store_result) {
		meta_exception(&w->scratch, "celery.exceptions", "TaskRevokedError", reason);
		j->out_meta = job_meta(j, "REVOKED", w->scratch.p, w->scratch.len, NULL);
	}
	j->out = OUT_RESULT;
	j->report_outcome = "revoked";
	outcome_write(j);
}

bool
job_is_workflow(const struct job *j)
{
	return j->fn == task_execute_workflow || j->fn == task_run_task;
}

/* A revoked message: REVOKED at once, or, for a workflow task, a run with the revocation preset so the plugin
 * records it on the task's row (which may be pending from an earlier attempt) without calling the source. */
static bool
job_revoke_reserved(struct job *j)
{
	if (j->fn != NULL && job_is_workflow(j) && j->w->cfg->database_url != NULL) {
		j->revoked = true;
		return false;
	}
	job_end_revoked(j, "revoked", NULL, false);
	return true;
}

/* A message that cannot run: FAILURE result when it has an id, then the dead-letter list. */
static void
job_reject(struct job *j, const char *module, const char *type, const char *message, const char *reason)
{
	char *queue = message_queue_of_key(j->qkey);
	log_errorx("Rejecting message from queue %s (task %s[%s]): %s; moved to " KEY_DEADLETTER, queue,
	           j->m.task_name ? j->m.task_name : "?", j->m.task_id ? j->m.task_id : "?", reason);
	free(queue);
	if (j->m.task_id != NULL)
		j->out_meta = job_failure_meta(j, "FAILURE", module, type, message);
	j->out = OUT_DEADLETTER;
	j->out_reason = xstrdup(reason);
	j->report_outcome = NULL;
	if (j->w->events.on && j->m.task_id != NULL)
		events_rejected(j->w, j);
	outcome_write(j);
}

struct job *
job_new(struct worker *w, const char *qkey, const char *raw, size_t len, const char *tag, bool unrecorded)
{
	struct job *j = job_alloc(w, len);
	j->w = w;
	memcpy(j->raw, raw, len);
	j->raw[len] = '\0';
	j->len = len;
	j->qkey = qkey;
	j->slot = -1;
	j->tag = "";
	if (tag != NULL && tag[0] != '\0') {
		j->tag = xstrdup(tag);
		j->tag_owned = true;
	}
	TAILQ_INSERT_TAIL(&w->jobs, j, entry);
	w->njobs++;

	int decoded = message_decode(j->raw, j->len, &j->m);
	j->decoded = true;
	/* the message's own tag lives in its store as long as the job */
	if (j->tag[0] == '\0' && j->m.delivery_tag != NULL)
		j->tag = j->m.delivery_tag;
	j->unrecorded = unrecorded && j->tag[0] != '\0';
	/* kombu's records go out at the end of the tick, for the jobs still held then: a job that ended within the
	 * tick (a no-op) would only have written them to delete them in the same write */
	if (j->unrecorded) {
		job_queue_record(j);
		j->record_queued = true;
	}
	engine_tick(w);
	j->store_result = w->cfg->result_backend != NULL && !j->m.ignore_result;
	if (decoded < 0) {
		job_reject(j, "builtins", j->m.exc_type, j->m.reason, j->m.reason);
		return NULL;
	}
	bool needs_dom = false;
	if ((j->fn = task_lookup(j->m.task_name, &needs_dom)) == NULL) {
		char reason[600];
		snprintf(reason, sizeof reason, "Received unregistered task of type '%.400s'", j->m.task_name);
		job_reject(j, "celery.exceptions", "NotRegistered", j->m.task_name, reason);
		return NULL;
	}
	if (needs_dom && message_dom(&j->m, j->raw, j->len) < 0) {
		job_reject(j, "builtins", j->m.exc_type, j->m.reason, j->m.reason);
		return NULL;
	}
	/* revoked before it came: whether fetched first, back from its ETA or as a retry */
	if (revoke_has(&w->revoked, j->m.task_id) && job_revoke_reserved(j))
		return NULL;
	double now = now_wall();
	if (j->m.expires > 0 && now >= j->m.expires && !j->revoked) {
		log_info("Discarding revoked task: %s[%s] (expired)", j->m.task_name, j->m.task_id);
		if (w->events.on)
			events_revoked(w, j, false, NULL, true);
		j->out_meta = job_failure_meta(j, "REVOKED", "celery.exceptions", "TaskRevokedError", "expired");
		j->out = OUT_RESULT;
		j->report_outcome = NULL;
		outcome_write(j);
		return NULL;
	}
	if (w->events.on && !j->revoked)
		events_received(w, j);
	if (j->m.eta > now && !j->revoked) {
		char iso[64];
		message_format_iso(j->m.eta, true, iso, sizeof iso);
		log_info("Task %s[%s] received: ETA %s, waiting in " KEY_ETA, j->m.task_name, j->m.task_id, iso);
		j->out = OUT_PARK;
		j->out_at = j->m.eta;
		outcome_write(j);
		return NULL;
	}
	if (w->stop && !j->revoked) {
		log_info("Task %s[%s] put back in the queue (worker stopping)", j->m.task_name, j->m.task_id);
		j->out = OUT_REQUEUE;
		outcome_write(j);
		return NULL;
	}
	j->state = JOB_RESERVED;
	TAILQ_INSERT_TAIL(&w->reserved, j, rentry);
	j->in_reserved = true;
	return j;
}

/* ---- running ---- */

static void
job_soft_cb(evutil_socket_t fd, short what, void *arg)
{
	struct job *j = arg;
	if (j->state != JOB_RUNNING)
		return;
	int expected = TASK_CANCEL_NONE;
	if (!atomic_compare_exchange_strong(&j->run.cancel_flag, &expected, TASK_CANCEL_SOFT_LIMIT))
		return;
	log_warnx("Soft time limit (%gs) exceeded for %s[%s]", j->soft_s, j->m.task_name, j->m.task_id);
	if (j->run.on_cancel != NULL)
		j->run.on_cancel(&j->run);
}

static void
job_leave_slot(struct job *j)
{
	struct worker *w = j->w;
	if (j->slot >= 0) {
		w->slots[j->slot] = NULL;
		w->running--;
		if (j->slot < w->slot_hint)
			w->slot_hint = j->slot;
		j->slot = -1;
	}
	if (j->timers_assigned) {
		evtimer_del(&j->soft_ev);
		evtimer_del(&j->hard_ev);
	}
}

/* The task ignored its soft limit: record TimeLimitExceeded now; the task's own end is ignored. */
static void
job_hard_cb(evutil_socket_t fd, short what, void *arg)
{
	struct job *j = arg;
	struct worker *w = j->w;
	if (j->state != JOB_RUNNING)
		return;
	double hard = j->hard_s;
	log_errorx("Hard time limit (%gs) exceeded for %s[%s]", hard, j->m.task_name, j->m.task_id);
	atomic_store(&j->run.cancel_flag, TASK_CANCEL_HARD_LIMIT);
	char msg[128];
	snprintf(msg, sizeof msg, "hard time limit (%gs) exceeded", hard);
	j->out_meta = job_failure_meta(j, "FAILURE", "celery.exceptions", "TimeLimitExceeded", msg);
	j->out = OUT_RESULT;
	j->report_outcome = "failure";
	j->counted = true;
	w->processed++;
	job_leave_slot(j);
	j->state = JOB_ABANDONED;
	if (j->run.on_cancel != NULL)
		j->run.on_cancel(&j->run);
	else
		/* a task off the loop (the blocking bridge) cannot be stopped: replace the process */
		engine_recycle(w, "time-limit");
	outcome_write(j);
	engine_tick(w);
}

static void
job_timer(struct job *j, struct event *ev, double s)
{
	if (s <= 0)
		return;
	struct timeval tv = {(time_t)s, (suseconds_t)((s - (double)(time_t)s) * 1e6)};
	evtimer_add(ev, &tv);
}

static void job_task_done(struct task_run *run);

static void
job_start(struct job *j, int slot)
{
	struct worker *w = j->w;
	const struct spark_config *cfg = w->cfg;
	struct message *m = &j->m;
	/* Celery's order: the message's timelimit, then the task's own (the time_limit command), then the
	 * process-wide default */
	double hard = cfg->time_limit, soft = cfg->soft_time_limit;
	for (int i = 0; i < w->nlimits; i++)
		if (strcmp(w->limits[i].name, m->task_name) == 0) {
			hard = w->limits[i].hard;
			soft = w->limits[i].soft;
			break;
		}
	if (m->hard_limit >= 0)
		hard = m->hard_limit;
	if (m->soft_limit >= 0)
		soft = m->soft_limit;
	j->soft_s = soft;
	j->state = JOB_RUNNING;
	j->slot = slot;
	w->slots[slot] = j;
	w->running++;
	j->started_mono = now_mono();
	j->started_wall = now_wall();
	log_info("Task %s[%s] received", m->task_name, m->task_id);
	if (!j->revoked) {
		query_count_task(w, m->task_name);
		if (w->events.on)
			events_started(w, j);
	}
	if (j->store_result) {
		job_queue_record(j); /* STARTED at the end of the tick, if it still runs then */
		j->started_queued = true;
	}
	j->hard_s = hard;
	job_queue_report(j); /* its start reaches sparkd with the next flush, if it still runs then */
	if (!j->timers_assigned) {
		evtimer_assign(&j->soft_ev, w->base, job_soft_cb, j);
		evtimer_assign(&j->hard_ev, w->base, job_hard_cb, j);
		j->timers_assigned = true;
	}
	job_timer(j, &j->soft_ev, soft);
	job_timer(j, &j->hard_ev, hard);

	struct task_run *run = &j->run;
	run->task_id = m->task_id;
	run->task_name = m->task_name;
	run->args = m->args;
	run->kwargs = m->kwargs;
	run->headers = m->headers;
	run->arg0_json = m->arg0_json;
	run->arg0_len = m->arg0_len;
	run->kwargs_json = m->kwargs_json;
	run->kwargs_len = m->kwargs_len;
	run->retries = m->retries;
	run->max_retries = cfg->max_retries;
	run->last_attempt = m->retries >= cfg->max_retries;
	run->retry_countdown = message_retry_countdown(cfg, m->retries, rand01(w));
	run->redelivered = m->redelivered;
	run->cfg = cfg;
	run->slot = slot;
	run->node = w->node;
	run->base = w->base;
	run->done = job_task_done;
	run->engine = j;
	run->task = &w->workflow; /* how workflow tasks find the plugin (task.h); others replace it */
	atomic_store(&run->cancel_flag, w->cold      ? TASK_CANCEL_SHUTDOWN
	                                : j->revoked ? TASK_CANCEL_REVOKED
	                                             : TASK_CANCEL_NONE);
	run->cancel = &run->cancel_flag;
	run->outcome = TASK_SUCCESS;
	j->fn(run);
}

/* Start reserved jobs in the lowest free slots. It walks the reserved queue, not every held job: with a thousand
 * running and none waiting, each tick of a wave's ends would otherwise walk them all. A job that left
 * JOB_RESERVED another way (revoked, put back) leaves the queue here or when freed.
 *
 * A tick starts at most half the slots; the rest wait for the next tick, made at once. The first half's results,
 * acks and next fetches then reach Redis while the second half runs: a drain whose batches all came back in one
 * reply (worker and Redis taking turns, each idle while the other works) splits into two batches in flight that
 * overlap. Measured on a no-op drain at threads C8: 30k -> 45k tasks/s (docs/benchmarks.md). */
void
job_dispatch(struct worker *w)
{
	struct job *j;
	int chunk = (w->nslots + 1) / 2, started = 0;
	while (w->running < w->nslots && (j = TAILQ_FIRST(&w->reserved)) != NULL) {
		if (started == chunk) {
			engine_tick(w);
			return;
		}
		TAILQ_REMOVE(&w->reserved, j, rentry);
		j->in_reserved = false;
		if (j->state != JOB_RESERVED)
			continue;
		int slot = w->slot_hint;
		while (w->slots[slot] != NULL)
			slot++;
		w->slot_hint = slot + 1;
		job_start(j, slot);
		started++;
	}
}

static char *
json_brief(const char *text, size_t len)
{
	if (text == NULL)
		return xstrdup("None");
	return len > 200 ? xasprintf("%.197s...", text) : xstrndup(text, len);
}

/* The task's end: decide the outcome and hand it to outcome.c. */
static void
job_task_done(struct task_run *run)
{
	struct job *j = run->engine;
	struct worker *w = j->w;
	struct message *m = &j->m;
	const struct spark_config *cfg = w->cfg;
	run->on_cancel = NULL;
	if (j->state == JOB_ABANDONED) {
		/* its outcome was written when it was abandoned; free it once that write is confirmed */
		j->task_ended = true;
		if (j->out_confirmed)
			job_free(j);
		engine_tick(w);
		return;
	}
	double runtime = now_mono() - j->started_mono;
	job_leave_slot(j);
	int cancel = atomic_load(&run->cancel_flag);
	if (cancel == TASK_CANCEL_REVOKED) {
		/* whatever the task made of it: revoked, as Celery records a terminated or discarded task */
		if (j->terminated) {
			j->counted = true;
			w->processed++;
		}
		j->out_meta = NULL;
		job_end_revoked(j, j->terminated ? "terminated" : "revoked", NULL, false);
		engine_tick(w);
		return;
	}
	if (cancel == TASK_CANCEL_SHUTDOWN && run->outcome != TASK_SUCCESS) {
		log_warnx("Task %s[%s] interrupted by cold shutdown: put back in the queue", m->task_name, m->task_id);
		j->out = OUT_REQUEUE;
		j->report_outcome = "requeued";
		goto write;
	}
	if (cancel == TASK_CANCEL_SOFT_LIMIT && run->outcome != TASK_SUCCESS &&
	    strcmp(run->exc_type, "SoftTimeLimitExceeded") != 0) {
		task_fail(run, TASK_FAILURE, "celery.exceptions", "SoftTimeLimitExceeded",
		          "soft time limit (%gs) exceeded", j->soft_s);
	} else if (cancel == TASK_CANCEL_SOFT_LIMIT && run->outcome != TASK_SUCCESS) {
		run->outcome = TASK_FAILURE;
	}
	if (run->outcome == TASK_DEFER) {
		log_warnx("Task %s[%s] deferred for %gs: %s", m->task_name, m->task_id, DEFER_DELAY_S,
		          run->exc_message);
		j->out = OUT_PARK;
		j->out_at = now_wall() + DEFER_DELAY_S;
		j->report_outcome = "requeued";
		goto write;
	}
	if (run->outcome == TASK_RETRY && m->retries >= cfg->max_retries)
		run->outcome = TASK_FAILURE; /* retries exhausted: fail with the task's own exception */
	j->counted = true;
	if (run->outcome == TASK_SUCCESS) {
		char *dumped = NULL;
		const char *text = run->result_json;
		size_t len = run->result_len;
		if (text == NULL && run->result != NULL) {
			dumped = json_dumps(run->result, JSON_ENCODE_ANY | JSON_COMPACT);
			text = dumped;
			len = dumped ? strlen(dumped) : 0;
		}
		if (log_get_level() <= SPARK_LOG_INFO) {
			char *brief = json_brief(text, len);
			log_info("Task %s[%s] succeeded in %.6fs: %s", m->task_name, m->task_id, runtime, brief);
			free(brief);
		}
		j->out = OUT_RESULT;
		j->report_outcome = "success";
		j->out_meta = job_meta(j, "SUCCESS", text, len, NULL);
		if (w->events.on)
			events_succeeded(w, j, runtime, text, len);
		free(dumped);
	} else if (run->outcome == TASK_RETRY) {
		double countdown = run->retry_countdown > 0 ? run->retry_countdown : 0;
		j->out_at = now_wall() + countdown;
		j->out_env = message_build_retry(j->raw, j->len, m, m->retries + 1, j->out_at);
		if (j->out_env == NULL) {
			log_errorx("Task %s[%s] cannot be retried: its message cannot be re-encoded", m->task_name,
			           m->task_id);
			run->outcome = TASK_FAILURE;
		} else {
			log_info("Task %s[%s] retry: Retry in %.3gs: %s('%s')", m->task_name, m->task_id, countdown,
			         run->exc_type, run->exc_message);
			j->out = OUT_RETRY;
			j->report_outcome = "retry";
			if (w->events.on)
				events_failed(w, j, run->exc_type, run->exc_message, true);
			j->out_meta = job_failure_meta(j, "RETRY", run->exc_module, run->exc_type, run->exc_message);
		}
	}
	if (run->outcome == TASK_FAILURE) {
		log_errorx("Task %s[%s] raised unexpected: %s('%s')", m->task_name, m->task_id, run->exc_type,
		           run->exc_message);
		j->out = OUT_RESULT;
		j->report_outcome = "failure";
		j->out_meta = job_failure_meta(j, "FAILURE", run->exc_module[0] ? run->exc_module : "builtins",
		                               run->exc_type[0] ? run->exc_type : "RuntimeError", run->exc_message);
		if (w->events.on)
			events_failed(w, j, run->exc_type[0] ? run->exc_type : "RuntimeError", run->exc_message, false);
	}
	w->processed++;
	if (cfg->max_tasks_per_child > 0 && w->processed >= cfg->max_tasks_per_child)
		engine_recycle(w, "max-tasks");
write:
	outcome_write(j);
	engine_tick(w);
}

void
job_cancel_all(struct worker *w, enum task_cancel why)
{
	for (int i = 0; i < w->nslots; i++) {
		struct job *j = w->slots[i];
		if (j == NULL || j->state != JOB_RUNNING)
			continue;
		atomic_store(&j->run.cancel_flag, why);
		if (j->run.on_cancel != NULL)
			j->run.on_cancel(&j->run);
	}
}

/* Cold stop, grace over: tasks that did not stop go back to the queue now; their later ends are ignored. */
void
job_abandon_running(struct worker *w)
{
	for (int i = 0; i < w->nslots; i++) {
		struct job *j = w->slots[i];
		if (j == NULL || j->state != JOB_RUNNING)
			continue;
		job_leave_slot(j);
		j->state = JOB_ABANDONED;
		j->out = OUT_REQUEUE;
		j->report_outcome = "requeued";
		outcome_write(j);
	}
}

void
job_requeue_reserved(struct worker *w)
{
	struct job *j, *next;
	for (j = TAILQ_FIRST(&w->jobs); j != NULL; j = next) {
		next = TAILQ_NEXT(j, entry);
		if (j->state != JOB_RESERVED)
			continue;
		log_info("Task %s[%s] put back in the queue (worker stopping)", j->m.task_name, j->m.task_id);
		j->out = OUT_REQUEUE;
		outcome_write(j);
	}
}

/* terminate: stop the running task now; its end (job_task_done) records REVOKED. */
static void
job_terminate(struct job *j, const char *signal)
{
	struct worker *w = j->w;
	log_info("Terminating task %s[%s] (revoked, %s)", j->m.task_name, j->m.task_id,
	         signal && signal[0] ? signal : "SIGTERM");
	j->terminated = true;
	atomic_store(&j->run.cancel_flag, TASK_CANCEL_REVOKED);
	if (j->run.on_cancel != NULL) {
		j->run.on_cancel(&j->run); /* may end the task, and free j, before it returns */
		return;
	}
	/* a task that cannot be interrupted: its end is recorded now and its own end ignored */
	j->counted = true;
	w->processed++;
	job_leave_slot(j);
	j->state = JOB_ABANDONED;
	job_end_revoked(j, "terminated", signal, false);
	engine_tick(w);
}

void
job_revoke_held(struct worker *w, bool terminate, const char *signal)
{
	struct job *j, *next;
	for (j = TAILQ_FIRST(&w->jobs); j != NULL; j = next) {
		next = TAILQ_NEXT(j, entry);
		if (j->revoked || j->terminated || !revoke_has(&w->revoked, j->m.task_id))
			continue;
		if (j->state == JOB_RESERVED)
			job_revoke_reserved(j);
		else if (j->state == JOB_RUNNING && terminate)
			job_terminate(j, signal);
	}
	engine_tick(w);
}

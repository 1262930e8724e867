/*
 * The process: one libevent loop that drives the Redis connections, the slots, the time limits, housekeeping and
 * the stops. Work queued during a loop iteration (fetches, records, metas, acks) leaves in one write per
 * connection; the end-of-tick callback dispatches reserved jobs, fetches for free capacity, checks memory once
 * per batch of finished tasks, and sends the reports gathered meanwhile as one datagram.
 *
 * Stops: warm (SIGTERM, first SIGINT) and recycle (max tasks, max memory, hard limit of a task that cannot be
 * stopped) stop fetching, put back what has not started, and exit when every held message has reached Redis;
 * cold (SIGQUIT, second SIGINT) also cancels running tasks, and after a short grace puts back what still runs.
 */
#include <event2/event.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "worker.h"

#define COLD_GRACE_S    0.8
#define EXIT_DEADLINE_S 3.0 /* after the last job, how long unregistering may take */
#define HUNG_AFTER_S    30.0
#define HOUSEKEEPING_S  0.05
#define REPORT_EVERY_S  0.01 /* task starts and ends reach sparkd within this; one datagram per interval */

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

/* The queue set and its keys; the keys of a set being replaced are kept (retired) until the process ends. */
static void
engine_build_queues(struct worker *w, int n, const char *const *names)
{
	w->old_qkeys = xrealloc(w->old_qkeys, (size_t)(w->nold_qkeys + w->nqkeys) * sizeof *w->old_qkeys);
	for (int i = 0; i < w->nqkeys; i++) {
		w->old_qkeys[w->nold_qkeys++] = w->qkeys[i];
		free(w->qnames[i]);
	}
	for (int i = 0; i < w->nqueues; i++)
		free(w->queues[i]);
	free(w->queues);
	free(w->qkeys);
	free(w->qnames);
	free(w->probe_len);
	free(w->qlen_acc);
	w->nqueues = n;
	w->queues = xcalloc((size_t)n, sizeof *w->queues);
	for (int i = 0; i < n; i++)
		w->queues[i] = xstrdup(names[i]);
	/* kombu's order: priority-major, then queue */
	static const int steps[] = {0, 3, 6, 9};
	w->nqkeys = 4 * n;
	w->qkeys = xcalloc((size_t)w->nqkeys, sizeof *w->qkeys);
	w->qnames = xcalloc((size_t)w->nqkeys, sizeof *w->qnames);
	for (int p = 0, k = 0; p < 4; p++)
		for (int q = 0; q < n; q++, k++) {
			w->qkeys[k] = message_queue_key(names[q], steps[p]);
			w->qnames[k] = xstrdup(names[q]);
		}
	w->probe_len = xcalloc((size_t)w->nqkeys, sizeof *w->probe_len);
	w->qlen_acc = xcalloc((size_t)n, sizeof *w->qlen_acc);
	w->fast_key = 0;
}

void
engine_set_queues(struct worker *w, int n, const char *const *names)
{
	if (n <= 0 || n > SPARK_MAX_QUEUES) {
		log_warnx("queues command with %d queues ignored (1 to %d)", n, SPARK_MAX_QUEUES);
		return;
	}
	engine_build_queues(w, n, names);
	char list[512] = "";
	for (int i = 0; i < n; i++) {
		size_t len = strlen(list);
		snprintf(list + len, sizeof list - len, "%s%s", i ? "," : "", names[i]);
	}
	log_info("Consuming from queues %s", list);
	if (w->broker.ready)
		sweep_register(w, NULL); /* kombu's bindings of the new queues */
	/* probe the new keys at once: the LLENs that find them empty arm the idle wake for them */
	w->fetch_idle = false;
	w->next_probe = 0;
	engine_tick(w);
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
	engine_build_queues(w, cfg->nqueues, (const char *const *)cfg->queues);
	w->slots = xcalloc((size_t)nslots, sizeof *w->slots);
	int mult = cfg->prefetch_multiplier > 0 ? cfg->prefetch_multiplier : 1;
	w->max_held = nslots * mult;
	TAILQ_INIT(&w->jobs);
	w->backend_on_broker = cfg->result_backend != NULL && same_server(&cfg->broker, &cfg->backend);
	/* what every task's writes repeat, formatted once */
	snprintf(w->ttl_str, sizeof w->ttl_str, "%d", RESULT_EXPIRES);
	snprintf(w->db_str[0], sizeof w->db_str[0], "%d", cfg->broker.db);
	snprintf(w->db_str[1], sizeof w->db_str[1], "%d", cfg->result_backend ? cfg->backend.db : cfg->broker.db);
	char pid[32];
	snprintf(pid, sizeof pid, "%ld", w->pid);
	sbuf_adds(&w->started_json, "{\"pid\": ");
	sbuf_adds(&w->started_json, pid);
	sbuf_adds(&w->started_json, ", \"hostname\": ");
	sbuf_add_json_string(&w->started_json, node, strlen(node));
	sbuf_adds(&w->started_json, "}");
	revoke_init(&w->revoked);
	events_init(w);
	w->started_at = now_wall();
	rpipe_init(&w->broker, w, RPIPE_COMMANDS, &cfg->broker, "broker");
	rpipe_init(&w->notify, w, RPIPE_NOTIFY, &cfg->broker, "broker (notify)");
	if (cfg->result_backend != NULL && !w->backend_on_broker)
		rpipe_init(&w->backend, w, RPIPE_COMMANDS, &cfg->backend, "result backend");
	return 0;
}

void
engine_free(struct worker *w)
{
	workflow_close(&w->workflow);
	rpipe_close(&w->broker);
	rpipe_close(&w->notify);
	rpipe_close(&w->backend);
	while (!TAILQ_EMPTY(&w->jobs))
		job_free(TAILQ_FIRST(&w->jobs));
	job_free_pool(w);
	for (int i = 0; i < 4; i++)
		if (w->sig_ev[i] != NULL)
			event_free(w->sig_ev[i]);
	struct event *evs[] = {w->tick_ev, w->housekeeping_ev, w->exit_ev, w->poll_ev, w->report_ev};
	for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++)
		if (evs[i] != NULL)
			event_free(evs[i]);
	if (w->base != NULL)
		event_base_free(w->base);
	commands_stop(w);
	revoke_free(&w->revoked);
	events_free(w);
	query_free(w);
	reporter_free(&w->rep);
	sbuf_free(&w->meta);
	sbuf_free(&w->scratch);
	sbuf_free(&w->keybuf);
	sbuf_free(&w->started_json);
	for (int i = 0; i < w->nqkeys; i++) {
		free(w->qkeys[i]);
		free(w->qnames[i]);
	}
	for (int i = 0; i < w->nold_qkeys; i++)
		free(w->old_qkeys[i]);
	for (int i = 0; i < w->nqueues; i++)
		free(w->queues[i]);
	free(w->queues);
	free(w->old_qkeys);
	free(w->qkeys);
	free(w->qnames);
	free(w->probe_len);
	free(w->qlen_acc);
	free(w->slots);
	free(w->to_record);
	free(w->acks);
	free(w->unreported);
	free(w->proc_key);
	free(w->landing_key);
	free(w->alive_key);
}

static void
engine_stop_fetching(struct worker *w)
{
	w->stop = true;
	job_requeue_reserved(w);
	engine_tick(w);
}

void
engine_recycle(struct worker *w, const char *reason)
{
	if (!w->recycling) {
		w->recycling = true;
		log_info("Recycling this worker process (%s): finishing in-flight tasks", reason);
		report_recycle(&w->rep, reason);
		engine_flush_reports(w, true);
	}
	engine_stop_fetching(w);
}

static void
engine_warm_stop(struct worker *w)
{
	if (!w->draining_sent) {
		w->draining_sent = true;
		log_info("worker: Warm shutdown (MainProcess)");
		report_draining(&w->rep);
		engine_flush_reports(w, true);
	}
	engine_stop_fetching(w);
}

static void
engine_cold_stop(struct worker *w)
{
	if (w->cold)
		return;
	log_info("worker: Cold shutdown (MainProcess)");
	w->cold = true;
	w->cold_at = now_mono();
	engine_stop_fetching(w);
	job_cancel_all(w, TASK_CANCEL_SHUTDOWN);
}

void
engine_conn_state(struct worker *w)
{
	report_problem(&w->rep, w->down > 0 ? w->problem : NULL);
	engine_flush_reports(w, true);
}

/* ---- the end ---- */

static void
engine_left(void *arg)
{
	struct worker *w = arg;
	engine_flush_reports(w, true);
	event_base_loopexit(w->base, NULL);
}

/* The workflow plugin writes its last rows (workers row stopped), then the loop ends. */
static void
engine_leave(struct worker *w)
{
	if (w->exit_ev == NULL || w->leaving)
		return; /* not leaving yet, or already */
	w->leaving = true;
	workflow_shutdown(&w->workflow, EXIT_DEADLINE_S, engine_left, w);
}

static void
engine_unregistered(struct worker *w, bool ok)
{
	if (!ok)
		log_warnx("Could not unregister from the broker; dead-process recovery will clean up");
	engine_leave(w);
}

static void
engine_exit_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	log_warnx("Leaving with messages still in %s: they are recovered once this process is gone", w->proc_key);
	engine_leave(w);
}

/* Jobs that still hold something in Redis (an abandoned task whose end is confirmed holds nothing). */
static int
engine_live_jobs(const struct worker *w)
{
	int n = 0;
	for (struct job *j = TAILQ_FIRST(&w->jobs); j != NULL; j = TAILQ_NEXT(j, entry))
		if (!j->out_confirmed)
			n++;
	return n;
}

void
engine_maybe_exit(struct worker *w)
{
	if (!w->stop || w->exit_ev != NULL)
		return;
	if (w->started && (engine_live_jobs(w) > 0 || w->fetching > 0))
		return;
	w->exit_ev = evtimer_new(w->base, engine_exit_deadline_cb, w);
	struct timeval tv = {(time_t)EXIT_DEADLINE_S, 0};
	evtimer_add(w->exit_ev, &tv);
	if (!w->started) {
		log_info("Stopped before start-up completed");
		engine_leave(w);
		return;
	}
	log_info("%s stopped (%ld task%s processed)", w->node, w->processed, w->processed == 1 ? "" : "s");
	if (w->broker.ready)
		sweep_unregister(w, engine_unregistered);
}

/* ---- the tick ---- */

static void
engine_report_cb(evutil_socket_t fd, short what, void *arg)
{
	engine_flush_reports(arg, true);
}

/* Reports go out at most every REPORT_EVERY_S (a drain would otherwise send a datagram per task); now = also
 * what sparkd must learn at once (ready, recycle, stopping, problems). */
void
engine_flush_reports(struct worker *w, bool now)
{
	if (w->rep.out.len == 0 && w->nunreported == 0 && !w->progress_dirty)
		return;
	double t = now_mono();
	if (now || t - w->reports_at >= REPORT_EVERY_S) {
		w->reports_at = t;
		job_report_starts(w);
		if (w->progress_dirty)
			report_progress(&w->rep, w->processed, w->rss_kib);
		w->progress_dirty = false;
		report_flush(&w->rep);
		return;
	}
	if (w->report_ev == NULL)
		w->report_ev = evtimer_new(w->base, engine_report_cb, w);
	if (!evtimer_pending(w->report_ev, NULL)) {
		double left = REPORT_EVERY_S - (t - w->reports_at);
		struct timeval tv = {0, (suseconds_t)(left * 1e6)};
		evtimer_add(w->report_ev, &tv);
	}
}

static void
engine_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	job_dispatch(w);
	job_flush_records(w);
	fetch_kick(w);
	/*
	 * Memory after each batch of finished tasks (Celery checks after each task; a batch is one loop pass). The
	 * resident size is read from /proc only when the heap grew by a MiB since the last reading, or a second
	 * passed: mallinfo2 is a cheap userspace signal, a statm read costs a syscall per task.
	 */
	if (w->processed != w->rss_checked_at) {
		/* mallinfo2 walks the allocator's bins (a few thousand instructions): once per batch of finished
		 * tasks, not again in a tick that finished none */
		double t = now_mono();
		bool due = t - w->rss_read_at >= 1.0;
		size_t heap = 0;
		if (due || w->processed != w->heap_checked_at) {
			w->heap_checked_at = w->processed;
			struct mallinfo2 mi = mallinfo2();
			heap = mi.uordblks + mi.hblkhd;
		}
		if (due || heap > w->heap_at_read + (1u << 20)) {
			w->rss_checked_at = w->processed;
			w->rss_read_at = t;
			w->heap_at_read = heap;
			long rss = proc_rss_kib(0);
			if (rss > 0)
				w->rss_kib = rss;
			if (w->cfg->max_memory_kib > 0 && w->rss_kib > w->cfg->max_memory_kib)
				engine_recycle(w, "max-memory");
		}
	}
	engine_maybe_exit(w);
	engine_flush_reports(w, false);
	if (w->events.nbatch > 0)
		events_flush(w);
	if (w->nacks > 0)
		outcome_flush(w);
	rpipe_flush(&w->broker);
	rpipe_flush(&w->backend);
}

void
engine_tick(struct worker *w)
{
	if (w->tick_ev != NULL && !event_pending(w->tick_ev, EV_TIMEOUT, NULL))
		event_active(w->tick_ev, EV_TIMEOUT, 0);
}

static void
engine_housekeeping_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	rpipe_check_hung(&w->broker, HUNG_AFTER_S);
	rpipe_check_hung(&w->notify, HUNG_AFTER_S);
	rpipe_check_hung(&w->backend, HUNG_AFTER_S);
	if (w->cold && now_mono() - w->cold_at > COLD_GRACE_S && w->running > 0) {
		/* tasks that ignore cancellation: take their messages back */
		job_abandon_running(w);
		log_warnx("Tasks did not stop in time; their messages go back to the queue");
	}
	sweep_tick(w);
	engine_tick(w);
}

/* ---- signals ---- */

static void
engine_signal_cb(evutil_socket_t sig, short what, void *arg)
{
	struct worker *w = arg;
	if (sig == SIGTERM || (sig == SIGINT && w->sigints++ == 0))
		engine_warm_stop(w);
	else if (sig == SIGQUIT || sig == SIGINT)
		engine_cold_stop(w);
	/* SIGHUP: log files are sparkd's; nothing to reopen here */
}

/* ---- start-up ---- */

static void
engine_started(struct worker *w, bool ok)
{
	if (!ok)
		return; /* the connection went: the next broker up starts over */
	if (w->started)
		return;
	w->started = true;
	if (workflow_open(&w->workflow, w->cfg, w->node, w->nslots, w->base) < 0)
		log_warnx("Workflow support could not be initialised; workflow tasks will retry it");
	char queues[512] = "";
	for (int i = 0; i < w->nqueues; i++) {
		size_t n = strlen(queues);
		snprintf(queues + n, sizeof queues - n, "%s%s", i ? "," : "", w->queues[i]);
	}
	if (!w->stop) {
		report_ready(&w->rep, w->nslots);
		engine_flush_reports(w, true);
		log_info("%s ready: %d slot%s, queues %s", w->node, w->nslots, w->nslots == 1 ? "" : "s", queues);
	}
	fetch_on_broker_up(w);
}

static void
engine_registered(struct worker *w, bool ok)
{
	if (!ok)
		return;
	if (!w->started)
		sweep_startup(w, engine_started);
	else
		fetch_on_broker_up(w);
}

static void
broker_up(struct rpipe *p)
{
	/* the alive key may have expired while the connection was down: register again every time */
	sweep_register(p->w, engine_registered);
}

static void
broker_down(struct rpipe *p)
{
	fetch_on_broker_down(p->w);
}

static void
notify_up(struct rpipe *p)
{
	fetch_on_notify_up(p->w);
}

static void
notify_down(struct rpipe *p)
{
	fetch_on_notify_down(p->w);
}

static void
notify_invalidate(struct rpipe *p, const char *key, size_t len)
{
	fetch_on_invalidate(p->w, key, len);
}

static void
backend_up(struct rpipe *p)
{
	outcome_resend(p->w);
}

int
engine_run(struct worker *w)
{
	signal(SIGPIPE, SIG_IGN);
	/* the change list lets the write event hiredis adds and rpipe_flush removes in one tick cost no epoll_ctl */
	struct event_config *ecfg = event_config_new();
	if (ecfg != NULL)
		event_config_set_flag(ecfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
	w->base = ecfg != NULL ? event_base_new_with_config(ecfg) : NULL;
	if (ecfg != NULL)
		event_config_free(ecfg);
	if (w->base == NULL)
		w->base = event_base_new();
	if (w->base == NULL)
		fatalx("cannot create the event loop");
	reporter_init(&w->rep, SPARK_REPORT_FD);
	commands_start(w);
	static const int sigs[4] = {SIGTERM, SIGINT, SIGQUIT, SIGHUP};
	for (int i = 0; i < 4; i++) {
		w->sig_ev[i] = evsignal_new(w->base, sigs[i], engine_signal_cb, w);
		evsignal_add(w->sig_ev[i], NULL);
	}
	/* sparkd spawns workers with signals blocked across fork: take them in the loop from now on */
	sigset_t set;
	sigemptyset(&set);
	for (int i = 0; i < 4; i++)
		sigaddset(&set, sigs[i]);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	w->tick_ev = event_new(w->base, -1, 0, engine_tick_cb, w);
	w->housekeeping_ev = event_new(w->base, -1, EV_PERSIST, engine_housekeeping_cb, w);
	struct timeval hk = {0, (suseconds_t)(HOUSEKEEPING_S * 1e6)};
	event_add(w->housekeeping_ev, &hk);

	w->broker.on_up = broker_up;
	w->broker.on_down = broker_down;
	w->notify.on_up = notify_up;
	w->notify.on_down = notify_down;
	w->notify.on_invalidate = notify_invalidate;
	w->backend.on_up = backend_up;
	rpipe_start(&w->broker);
	rpipe_start(&w->notify);
	if (w->backend.url != NULL)
		rpipe_start(&w->backend);

	event_base_dispatch(w->base);
	return w->exit_status;
}

/*
 * Supervision (DESIGN §2, §7): the workers and their processes' lifecycle: spawn, retire, exit, restart. Reports
 * (sup-report.c), the limits tick (sup-limits.c), stopping (sup-stop.c) and the states shown in status
 * (sup-state.c) live beside it.
 */
#include <sys/wait.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sup.h"

static void proc_spawn(struct sd_slot *s);
static void slot_restart_cb(evutil_socket_t fd, short what, void *arg);
static void worker_stopped(struct sd_worker *w);

/* ---- workers ---- */

void
sup_init(struct sparkd *sd)
{
	const struct spark_config *cfg = &sd->cfg;
	sd->nworkers = cfg->workers;
	sd->workers = xcalloc((size_t)sd->nworkers, sizeof *sd->workers);
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		w->sd = sd;
		w->index = i + 1;
		sup_worker_name(w->name, sizeof w->name, w->index, sd->nworkers, spark_hostname());
		w->nslots = cfg->pool == SPARK_POOL_PREFORK ? cfg->concurrency : 1;
		w->proc_slots = cfg->pool == SPARK_POOL_THREADS ? cfg->concurrency : 1;
		TAILQ_INIT(&w->procs);
		w->slots = xcalloc((size_t)w->nslots, sizeof *w->slots);
		w->slots_cap = w->nslots;
		for (int k = 0; k < w->nslots; k++) {
			struct sd_slot *s = &w->slots[k];
			s->w = w;
			s->index = k;
			s->backoff_delay = SD_BACKOFF_MIN;
			s->restart_ev = evtimer_new(sd->base, slot_restart_cb, s);
			if (s->restart_ev == NULL)
				fatalx("out of memory (timer)");
		}
	}
	sup_stop_init(sd);
}

void
sup_start_all(struct sparkd *sd)
{
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		w->started_wall = now_wall();
		for (int k = 0; k < w->nslots; k++)
			proc_spawn(&w->slots[k]);
	}
}

void
sup_task_clear(struct sd_task *t)
{
	free(t->id);
	free(t->name);
	memset(t, 0, sizeof *t);
}

static void
proc_free(struct sd_proc *p)
{
	TAILQ_REMOVE(&p->w->procs, p, entry);
	if (p->out != NULL)
		p->out->proc = NULL;
	if (p->err != NULL)
		p->err->proc = NULL;
	if (p->rep_ev != NULL)
		event_free(p->rep_ev);
	wl_out_free(&p->cmd);
	if (p->rep_fd >= 0)
		close(p->rep_fd);
	for (int i = 0; i < p->nslots; i++)
		sup_task_clear(&p->tasks[i]);
	free(p->tasks);
	free(p->problem);
	free(p);
}

void
sup_free(struct sparkd *sd)
{
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		struct sd_proc *p;
		while ((p = TAILQ_FIRST(&w->procs)) != NULL)
			proc_free(p);
		for (int k = 0; k < w->slots_cap; k++)
			event_free(w->slots[k].restart_ev);
		free(w->slots);
	}
	free(sd->workers);
	sd->workers = NULL;
	sd->nworkers = 0;
	for (int i = 0; i < sd->nqlen; i++)
		free(sd->qname[i]);
	sd->nqlen = 0;
	if (sd->stop_timeout_ev)
		event_free(sd->stop_timeout_ev);
	if (sd->kill_ev)
		event_free(sd->kill_ev);
	sd->stop_timeout_ev = sd->kill_ev = NULL;
}
/* ---- processes ---- */

static struct sd_proc *
proc_find(struct sparkd *sd, pid_t pid)
{
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_proc *p;
		for (p = TAILQ_FIRST(&sd->workers[i].procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
			if (p->pid == pid)
				return p;
		}
	}
	return NULL;
}

static void
slot_backoff(struct sd_slot *s, double delay)
{
	s->backoff = true;
	s->failing = true;
	s->backoff_until = now_wall() + delay;
	struct timeval tv = {(time_t)delay, (suseconds_t)((delay - (double)(time_t)delay) * 1e6)};
	evtimer_add(s->restart_ev, &tv);
	log_info("%s: restarting process %d in %.1fs", s->w->name, s->index + 1, delay);
}

static void
slot_restart_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sd_slot *s = arg;
	s->backoff = false;
	if (s->w->sd->state == SD_STOPPING || s->w->stopped || s->current != NULL)
		return;
	s->restarts++;
	proc_spawn(s);
}

static void
proc_spawn(struct sd_slot *s)
{
	struct sd_worker *w = s->w;
	struct sparkd *sd = w->sd;
	char slots[16], index[16];
	snprintf(slots, sizeof slots, "%d", w->proc_slots);
	snprintf(index, sizeof index, "%d", s->index + 1);
	/* --index names a prefork pool child (ForkPoolWorker-N); threads and solo run one process per worker */
	char *argv[] = {sd->worker_path, "--name", w->name, "--slots", slots, "--index", index, NULL};
	if (sd->cfg.pool != SPARK_POOL_PREFORK)
		argv[5] = NULL;
	int out, err, rep;
	pid_t pid = spawn_child(sd->worker_path, argv, &out, &err, &rep);
	if (pid < 0) {
		log_warn("%s: cannot start %s", w->name, sd->worker_path);
		s->last_exit = (struct sd_exit){.set = true, .status = -1, .at = now_wall()};
		snprintf(s->last_exit.reason, sizeof s->last_exit.reason, "not started (%s)", strerror(errno));
		slot_backoff(s, sup_restart_delay(&s->backoff_delay, false, 0, sd->cfg.startsecs));
		return;
	}
	struct sd_proc *p = xcalloc(1, sizeof *p);
	p->w = w;
	p->slot = s->index;
	p->pid = pid;
	p->state = PS_STARTING;
	p->started_wall = now_wall();
	p->started_mono = now_mono();
	p->nslots = w->proc_slots;
	p->tasks = xcalloc((size_t)p->nslots, sizeof *p->tasks);
	p->rep_fd = rep;
	wl_out_init(&p->cmd, rep);
	p->rep_ev = event_new(sd->base, rep, EV_READ | EV_PERSIST, sup_report_cb, p);
	if (p->rep_ev == NULL)
		fatalx("out of memory (event)");
	event_add(p->rep_ev, NULL);
	p->out = logcap_reader_new(sd, out, w->name, pid, false);
	p->out->proc = p;
	p->err = logcap_reader_new(sd, err, w->name, pid, true);
	p->err->proc = p;
	TAILQ_INSERT_TAIL(&w->procs, p, entry);
	s->current = p;
	s->backoff = false;
	log_debug("%s: started process %d (slot %d)", w->name, (int)pid, s->index);
	celery_proc_started(p);
}

/*
 * The process will go (recycle, memory, time limit): its slot gets a replacement now, before the old one is
 * gone, unless sparkd is stopping.
 */
void
sup_retire(struct sd_proc *p, const char *reason)
{
	if (reason != NULL && p->reason[0] == '\0')
		spark_strlcpy(p->reason, reason, sizeof p->reason);
	if (p->retiring)
		return;
	p->retiring = true;
	struct sd_slot *s = &p->w->slots[p->slot];
	if (s->current != p)
		return;
	s->current = NULL;
	if (p->w->sd->state == SD_STOPPING || p->w->stopped)
		return;
	/* the restart is counted now, so its reason is shown now; the exit status follows when it is reaped */
	s->last_exit = (struct sd_exit){.set = true, .status = -1, .at = now_wall(), .pid = p->pid};
	spark_strlcpy(s->last_exit.reason, p->reason, sizeof s->last_exit.reason);
	s->restarts++;
	proc_spawn(s);
}

static void
proc_exited(struct sd_proc *p, int wstatus)
{
	struct sd_worker *w = p->w;
	struct sparkd *sd = w->sd;
	struct sd_slot *s = &w->slots[p->slot];

	/* its last reports and lines come before the verdict */
	sup_read_reports(p);
	if (p->out != NULL)
		logcap_reader_drain(p->out);
	if (p->err != NULL)
		logcap_reader_drain(p->err);

	struct sd_exit ex;
	sup_exit_classify(wstatus, p->reason, &ex);
	bool recycled = p->reason[0] != '\0';
	bool stopping = sd->state == SD_STOPPING || w->stopped;
	if (stopping && !recycled && ex.signal == 0 && ex.status == 0)
		spark_strlcpy(ex.reason, "stopped", sizeof ex.reason);
	else if (stopping && !recycled && ex.signal != 0)
		snprintf(ex.reason, sizeof ex.reason, "stopped (signal %d)", ex.signal);
	if (recycled && ex.signal == SIGKILL)
		log_info("%s: process %d killed (%s)", w->name, (int)p->pid, ex.reason);
	else if (recycled)
		log_info("%s: process %d exited: recycled (%s)", w->name, (int)p->pid, ex.reason);
	else if (stopping)
		log_info("%s: process %d %s", w->name, (int)p->pid, ex.reason);
	else
		log_warnx("%s: process %d %s", w->name, (int)p->pid, ex.reason);

	w->processed_done += p->processed;
	bool was_current = s->current == p;
	/* a retired process completes the entry its retirement made, never one about its successor */
	ex.pid = p->pid;
	if (was_current || s->last_exit.pid == p->pid || !s->last_exit.set)
		s->last_exit = ex;
	if (was_current)
		s->current = NULL;
	bool was_ready = p->ready_mono > 0;
	double ran = now_mono() - p->started_mono;
	pid_t pid = p->pid;
	proc_free(p);

	if (sd->state == SD_STOPPING) {
		if (sup_live_procs(sd) == 0)
			sd_finish(sd);
		return;
	}
	if (w->stopped) {
		if (TAILQ_EMPTY(&w->procs))
			worker_stopped(w);
		return;
	}
	if (!was_current)
		return;
	double delay = recycled ? 0 : sup_restart_delay(&s->backoff_delay, was_ready, ran, sd->cfg.startsecs);
	if (delay > 0) {
		slot_backoff(s, delay);
		return;
	}
	if (!recycled)
		log_info("%s: process %d ran %.1fs after its start: replacing it now", w->name, (int)pid, ran);
	s->failing = false;
	s->restarts++;
	proc_spawn(s);
}

/* SIGCHLD: reap everything that has exited. */
void
sup_reap(struct sparkd *sd)
{
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, WNOHANG);
		if (pid < 0 && errno == EINTR)
			continue;
		if (pid <= 0)
			return;
		struct sd_proc *p = proc_find(sd, pid);
		if (p != NULL)
			proc_exited(p, st);
		else /* an orphan re-parented to us as a container's PID 1: reaped so no zombie stays, else ignored */
			log_debug("reaped pid %d: not a worker (an orphan)", (int)pid);
	}
}

/* ---- one node at a time (Celery's remote control) ---- */

/* The last process of a node stopped alone is gone: sparkd stops too once no node is left. */
static void
worker_stopped(struct sd_worker *w)
{
	struct sparkd *sd = w->sd;
	log_info("%s: stopped", w->name);
	celery_node_stopped(w);
	for (int i = 0; i < sd->nworkers; i++)
		if (!sd->workers[i].stopped)
			return;
	log_info("every worker node is stopped: sparkd stops");
	sup_stop(sd, false, -1);
}

/* Warm stop of one node: its processes finish their tasks and put back prefetched ones; none is restarted. */
void
sup_stop_worker(struct sd_worker *w)
{
	if (w->stopped || w->sd->state == SD_STOPPING)
		return;
	w->stopped = true;
	for (int k = 0; k < w->nslots; k++) {
		evtimer_del(w->slots[k].restart_ev);
		w->slots[k].backoff = false;
	}
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		p->state = PS_STOPPING;
		if (kill(p->pid, SIGTERM) < 0 && errno != ESRCH)
			log_warn("%s: kill %d", w->name, (int)p->pid);
	}
	if (TAILQ_EMPTY(&w->procs))
		worker_stopped(w);
}

/* More slots than allocated: a new array; each restart timer is re-pointed at its slot's new place. */
static void
worker_slots_grow(struct sd_worker *w, int n)
{
	struct sd_slot *old = w->slots;
	w->slots = xcalloc((size_t)n, sizeof *w->slots);
	memcpy(w->slots, old, (size_t)w->slots_cap * sizeof *old);
	for (int k = 0; k < w->slots_cap; k++) {
		struct sd_slot *s = &w->slots[k];
		bool pending = evtimer_pending(s->restart_ev, NULL);
		evtimer_del(s->restart_ev);
		evtimer_assign(s->restart_ev, w->sd->base, slot_restart_cb, s);
		if (pending) {
			double d = s->backoff_until - now_wall();
			d = d > 0 ? d : 0;
			struct timeval tv = {(time_t)d, (suseconds_t)((d - (double)(time_t)d) * 1e6)};
			evtimer_add(s->restart_ev, &tv);
		}
	}
	free(old);
	for (int k = w->slots_cap; k < n; k++) {
		w->slots[k].restart_ev = evtimer_new(w->sd->base, slot_restart_cb, &w->slots[k]);
		if (w->slots[k].restart_ev == NULL)
			fatalx("out of memory (timer)");
	}
	w->slots_cap = n;
}

/*
 * pool_grow / pool_shrink: the node runs n single-slot processes from now on. New slots start a process at once;
 * a removed slot's process finishes its task, puts back what it prefetched and exits (a warm stop of that process
 * alone), so no task is lost.
 */
void
sup_worker_resize(struct sd_worker *w, int n)
{
	struct sparkd *sd = w->sd;
	if (n < 1 || n == w->nslots || w->stopped || sd->state == SD_STOPPING)
		return;
	log_info("%s: pool %s from %d to %d process%s (remote control)", w->name, n > w->nslots ? "grows" : "shrinks",
	         w->nslots, n, n == 1 ? "" : "es");
	if (n < w->nslots) {
		for (int k = n; k < w->nslots; k++) {
			struct sd_slot *s = &w->slots[k];
			evtimer_del(s->restart_ev);
			s->backoff = s->failing = false;
			struct sd_proc *p = s->current;
			if (p == NULL)
				continue;
			s->current = NULL;
			p->retiring = true;
			if (p->reason[0] == '\0')
				spark_strlcpy(p->reason, "pool-shrink", sizeof p->reason);
			if (p->state != PS_STOPPING)
				p->state = PS_DRAINING;
			if (kill(p->pid, SIGTERM) < 0 && errno != ESRCH)
				log_warn("%s: kill %d", w->name, (int)p->pid);
		}
		w->nslots = n;
		return;
	}
	if (n > w->slots_cap)
		worker_slots_grow(w, n);
	for (int k = w->nslots; k < n; k++) {
		struct sd_slot *s = &w->slots[k];
		struct event *ev = s->restart_ev;
		memset(s, 0, sizeof *s);
		s->w = w;
		s->index = k;
		s->backoff_delay = SD_BACKOFF_MIN;
		s->restart_ev = ev;
	}
	int from = w->nslots;
	w->nslots = n;
	for (int k = from; k < n; k++)
		proc_spawn(&w->slots[k]);
}

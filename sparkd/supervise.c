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
		for (int k = 0; k < w->nslots; k++)
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
slot_backoff(struct sd_slot *s, double ran_s)
{
	double delay = sup_backoff_next(&s->backoff_delay, ran_s);
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
	if (s->w->sd->state == SD_STOPPING || s->current != NULL)
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
		slot_backoff(s, 0);
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
	if (p->w->sd->state == SD_STOPPING)
		return;
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
	bool stopping = sd->state == SD_STOPPING;
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
	s->last_exit = ex;
	bool was_current = s->current == p;
	if (was_current)
		s->current = NULL;
	double ran = p->ready_mono > 0 ? now_mono() - p->ready_mono : 0;
	proc_free(p);

	if (stopping) {
		if (sup_live_procs(sd) == 0)
			sd_finish(sd);
		return;
	}
	if (!was_current)
		return;
	if (recycled) {
		s->restarts++;
		proc_spawn(s);
	} else {
		slot_backoff(s, ran);
	}
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
	}
}

/*
 * Supervision (DESIGN §2, §7): the workers and their processes, reports on fd 3, exits and restarts, the memory
 * and hard-time-limit backstops, warm and cold stop.
 */
#include <sys/socket.h>
#include <sys/wait.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sparkd.h"

static void proc_spawn(struct sd_slot *s);

/* ---- pure logic (unit tested) ---- */

void
sup_worker_name(char *buf, size_t len, int index, int nworkers, const char *host)
{
	if (nworkers == 1)
		snprintf(buf, len, "celery@%s", host);
	else
		snprintf(buf, len, "celery-%d@%s", index, host);
}

/* How a process ended, in the words status and the log use. */
void
sup_exit_classify(int wstatus, const char *recycle_reason, struct sd_exit *ex)
{
	memset(ex, 0, sizeof *ex);
	ex->set = true;
	ex->at = now_wall();
	if (WIFSIGNALED(wstatus)) {
		ex->signal = WTERMSIG(wstatus);
		ex->status = -1;
	} else {
		ex->status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
	}
	if (recycle_reason != NULL && *recycle_reason != '\0')
		spark_strlcpy(ex->reason, recycle_reason, sizeof ex->reason);
	else if (ex->signal != 0)
		snprintf(ex->reason, sizeof ex->reason, "crashed (signal %d)", ex->signal);
	else
		snprintf(ex->reason, sizeof ex->reason, "exited (status %d)", ex->status);
}

/*
 * The delay before the next restart after a crash, advancing *delay for the one after. A process that ran
 * SD_HEALTHY_AFTER seconds or more starts the sequence again.
 */
double
sup_backoff_next(double *delay, double ran_s)
{
	if (ran_s >= SD_HEALTHY_AFTER || *delay < SD_BACKOFF_MIN)
		*delay = SD_BACKOFF_MIN;
	double d = *delay;
	*delay = d * 2 > SD_BACKOFF_MAX ? SD_BACKOFF_MAX : d * 2;
	return d;
}

const char *
sup_state_name(enum sd_pstate s)
{
	static const char *names[] = {"starting", "active", "draining", "stopping", "backoff", "stopped"};
	return s <= PS_STOPPED ? names[s] : "starting";
}

/* ---- workers ---- */

static void slot_restart_cb(evutil_socket_t fd, short what, void *arg);
static void stop_timeout_cb(evutil_socket_t fd, short what, void *arg);
static void cold_kill_cb(evutil_socket_t fd, short what, void *arg);

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
	sd->stop_timeout_ev = evtimer_new(sd->base, stop_timeout_cb, sd);
	sd->kill_ev = evtimer_new(sd->base, cold_kill_cb, sd);
	if (sd->stop_timeout_ev == NULL || sd->kill_ev == NULL)
		fatalx("out of memory (timer)");
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

static void
task_clear(struct sd_task *t)
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
		task_clear(&p->tasks[i]);
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

int
sup_live_procs(struct sparkd *sd)
{
	int n = 0;
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_proc *p;
		for (p = TAILQ_FIRST(&sd->workers[i].procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
			n++;
		}
	}
	return n;
}

bool
sup_all_ready(struct sparkd *sd)
{
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		for (int k = 0; k < w->nslots; k++)
			if (w->slots[k].current == NULL || w->slots[k].current->state != PS_ACTIVE)
				return false;
	}
	return true;
}

enum sd_pstate
sup_worker_state(struct sd_worker *w)
{
	if (w->sd->state == SD_STOPPING)
		return TAILQ_EMPTY(&w->procs) ? PS_STOPPED : PS_STOPPING;
	bool active = false, draining = false;
	for (int k = 0; k < w->nslots; k++) {
		struct sd_slot *s = &w->slots[k];
		/* restarted after a crash and not ready yet: still the backoff cycle */
		if (s->backoff || s->failing)
			return PS_BACKOFF;
		if (s->current != NULL && s->current->state == PS_ACTIVE)
			active = true;
		if (s->current != NULL && s->current->state == PS_DRAINING)
			draining = true;
	}
	if (active)
		return PS_ACTIVE;
	return draining ? PS_DRAINING : PS_STARTING;
}

long
sup_worker_processed(struct sd_worker *w)
{
	long n = w->processed_done;
	struct sd_proc *p;
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		n += p->processed;
	}
	return n;
}

int
sup_worker_active(struct sd_worker *w)
{
	int n = 0;
	struct sd_proc *p;
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		for (int i = 0; i < p->nslots; i++)
			n += p->tasks[i].used;
	}
	return n;
}

int
sup_worker_restarts(struct sd_worker *w)
{
	int n = 0;
	for (int k = 0; k < w->nslots; k++)
		n += w->slots[k].restarts;
	return n;
}

/* "3 workers active, 120 tasks processed, 0 restarts": for STATUS= and the log. */
void
sup_status_line(struct sparkd *sd, char *buf, size_t len)
{
	int active = 0, restarts = 0, backoff = 0;
	long processed = 0;
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		enum sd_pstate st = sup_worker_state(w);
		active += st == PS_ACTIVE;
		backoff += st == PS_BACKOFF;
		processed += sup_worker_processed(w);
		restarts += sup_worker_restarts(w);
	}
	if (sd->state == SD_STOPPING) {
		snprintf(buf, len, "stopping (%s): %d processes left, %ld tasks processed", sd->cold ? "cold" : "warm",
		         sup_live_procs(sd), processed);
		return;
	}
	if (sd->state == SD_STARTING) {
		snprintf(buf, len, "starting: %d of %d worker%s active", active, sd->nworkers,
		         sd->nworkers == 1 ? "" : "s");
		return;
	}
	int n =
	    snprintf(buf, len, "%d worker%s active, %ld task%s processed, %d restart%s", active, active == 1 ? "" : "s",
	             processed, processed == 1 ? "" : "s", restarts, restarts == 1 ? "" : "s");
	if (backoff > 0 && n > 0 && (size_t)n < len)
		snprintf(buf + n, len - (size_t)n, ", %d in backoff", backoff);
}

/* Why the workers are not all ready yet, for the --daemon parent and the log. */
void
sup_not_ready_reason(struct sparkd *sd, char *buf, size_t len)
{
	buf[0] = '\0';
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		for (int k = 0; k < w->nslots; k++) {
			struct sd_slot *s = &w->slots[k];
			if (s->current != NULL && s->current->state == PS_ACTIVE)
				continue;
			if (s->current != NULL && s->current->problem != NULL)
				snprintf(buf, len, "%s: %s", w->name, s->current->problem);
			else if (s->last_exit.set)
				snprintf(buf, len, "%s: last process %s", w->name, s->last_exit.reason);
			else
				snprintf(buf, len, "%s: not ready", w->name);
			return;
		}
	}
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
proc_report(struct sd_proc *p, const struct report *r)
{
	struct sparkd *sd = p->w->sd;
	switch (r->kind) {
	case REPORT_READY:
		if (p->state == PS_STARTING) {
			p->state = PS_ACTIVE;
			p->ready_mono = now_mono();
			long rss = proc_rss_kib(p->pid);
			if (rss >= 0)
				p->rss_kib = rss;
			if (p->w->slots[p->slot].current == p)
				p->w->slots[p->slot].failing = false;
			log_info("%s: process %d ready (%d slot%s)", p->w->name, (int)p->pid, r->slots,
			         r->slots == 1 ? "" : "s");
		}
		if (!sd->ready && sup_all_ready(sd))
			sd_ready(sd);
		break;
	case REPORT_START: {
		int slot = r->slot >= 0 && r->slot < p->nslots ? r->slot : -1;
		for (int i = 0; slot < 0 && i < p->nslots; i++)
			if (!p->tasks[i].used)
				slot = i;
		if (slot < 0)
			slot = 0;
		struct sd_task *t = &p->tasks[slot];
		task_clear(t);
		t->used = true;
		t->id = xstrdup(r->task_id);
		t->name = xstrdup(r->task_name);
		t->started_wall = now_wall();
		t->started_mono = now_mono();
		t->hard_limit = r->hard_limit;
		break;
	}
	case REPORT_FINISH: {
		int slot = -1;
		if (r->slot >= 0 && r->slot < p->nslots && p->tasks[r->slot].used &&
		    strcmp(p->tasks[r->slot].id, r->task_id) == 0)
			slot = r->slot;
		for (int i = 0; slot < 0 && i < p->nslots; i++)
			if (p->tasks[i].used && strcmp(p->tasks[i].id, r->task_id) == 0)
				slot = i;
		if (slot >= 0)
			task_clear(&p->tasks[slot]);
		if (r->processed > p->processed)
			p->processed = r->processed;
		if (r->rss_kib > 0)
			p->rss_kib = r->rss_kib;
		break;
	}
	case REPORT_PROGRESS:
		if (r->processed > p->processed)
			p->processed = r->processed;
		if (r->rss_kib > 0)
			p->rss_kib = r->rss_kib;
		break;
	case REPORT_RECYCLE:
		log_info("%s: process %d will exit after its current tasks (%s): starting its replacement", p->w->name,
		         (int)p->pid, r->reason);
		if (p->state != PS_STOPPING)
			p->state = PS_DRAINING;
		sup_retire(p, r->reason);
		break;
	case REPORT_DRAINING:
		if (p->state != PS_STOPPING)
			p->state = PS_DRAINING;
		break;
	case REPORT_PROBLEM:
		free(p->problem);
		p->problem = r->text[0] != '\0' ? xstrdup(r->text) : NULL;
		break;
	case REPORT_QUEUES:
		for (int i = 0; i < sd->nqlen; i++)
			free(sd->qname[i]);
		sd->nqlen = r->nqueues;
		for (int i = 0; i < r->nqueues; i++) {
			sd->qname[i] = xstrdup(r->queue[i]);
			sd->qlen[i] = r->queue_len[i];
		}
		sd->qlen_at = now_wall();
		break;
	case REPORT_UNKNOWN:
		break;
	}
}

/* Read every report the process has sent. */
static void
proc_read_reports(struct sd_proc *p)
{
	/* a datagram never exceeds SPARK_REPORT_MAX (report.h); its lines unescape into no more than their length */
	char buf[SPARK_REPORT_MAX], scratch[SPARK_REPORT_MAX + 1];
	while (p->rep_fd >= 0) {
		ssize_t n = recv(p->rep_fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) {
			/* the worker closed it or died: what comes next is its exit */
			event_free(p->rep_ev);
			p->rep_ev = NULL;
			close(p->rep_fd);
			p->rep_fd = -1;
			return;
		}
		/* one datagram may carry several reports, one per line */
		for (const char *line = buf, *end = buf + n; line < end;) {
			const char *nl = memchr(line, '\n', (size_t)(end - line));
			size_t len = nl ? (size_t)(nl - line) : (size_t)(end - line);
			struct report r;
			if (len > 0 && report_parse(line, len, &r, scratch, sizeof scratch) < 0)
				log_warnx("%s: process %d sent a malformed report: %.*s", p->w->name, (int)p->pid,
				          (int)(len > 120 ? 120 : len), line);
			else if (len > 0)
				proc_report(p, &r);
			line += len + 1;
		}
	}
}

static void
rep_cb(evutil_socket_t fd, short what, void *arg)
{
	proc_read_reports(arg);
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
	p->rep_ev = event_new(sd->base, rep, EV_READ | EV_PERSIST, rep_cb, p);
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
	proc_read_reports(p);
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
		else /* an orphan re-parented to us as a container's PID 1: reaped so no zombie stays, else ignored */
			log_debug("reaped pid %d: not a worker (an orphan)", (int)pid);
	}
}

/* Every second: RSS of each process, the memory and hard-time-limit backstops, STATUS=. */
void
sup_tick(struct sparkd *sd)
{
	const struct spark_config *cfg = &sd->cfg;
	double now = now_mono();
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		struct sd_proc *p, *next;
		for (p = TAILQ_FIRST(&w->procs); p != NULL; p = next) {
			next = TAILQ_NEXT(p, entry);
			long rss = proc_rss_kib(p->pid);
			if (rss >= 0)
				p->rss_kib = rss;
			if (p->w->slots[p->slot].current == p)
				p->w->slots[p->slot].failing = false;
			for (int k = 0; k < p->nslots; k++) {
				struct sd_task *t = &p->tasks[k];
				if (!t->used || t->hard_limit <= 0 || strcmp(p->reason, "time-limit") == 0)
					continue;
				double ran = now - t->started_mono;
				if (ran <= t->hard_limit + SD_TIME_LIMIT_GRACE)
					continue;
				/* escaped: an id may hold any byte, a newline included; long ones are cut in the log
				 * only */
				char *id = report_escape(t->id), *name = report_escape(t->name);
				log_warnx("%s: process %d: task %.256s (%.256s) has run %.0fs, past its hard time "
				          "limit of %.0fs: killing the process (time-limit)",
				          w->name, (int)p->pid, name, id, ran, t->hard_limit);
				free(id);
				free(name);
				kill(p->pid, SIGKILL);
				spark_strlcpy(p->reason, "time-limit", sizeof p->reason);
				sup_retire(p, "time-limit");
				break;
			}
			if (cfg->max_memory_kib > 0 && rss > cfg->max_memory_kib && p->reason[0] == '\0' &&
			    p->state != PS_STOPPING) {
				log_warnx(
				    "%s: process %d uses %ld KiB, over the limit of %ld KiB: it finishes its task "
				    "and is replaced (max-memory)",
				    w->name, (int)p->pid, rss, cfg->max_memory_kib);
				kill(p->pid, SIGTERM);
				p->state = PS_DRAINING;
				sup_retire(p, "max-memory");
			}
		}
	}
	sys_notify_status(sd);
}

/* ---- stop ---- */

static void
signal_all(struct sparkd *sd, int sig)
{
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_proc *p;
		for (p = TAILQ_FIRST(&sd->workers[i].procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
			/* each worker pid, never the process group */
			if (kill(p->pid, sig) < 0 && errno != ESRCH)
				log_warn("%s: kill %d", p->w->name, (int)p->pid);
		}
	}
}

static void
go_cold(struct sparkd *sd)
{
	sd->cold = true;
	log_info("cold stop: asking %d process%s to requeue their tasks and exit (SIGQUIT), SIGKILL in %.0fs",
	         sup_live_procs(sd), sup_live_procs(sd) == 1 ? "" : "es", SD_COLD_KILL_AFTER);
	evtimer_del(sd->stop_timeout_ev);
	signal_all(sd, SIGQUIT);
	struct timeval tv = {(time_t)SD_COLD_KILL_AFTER, 0};
	evtimer_add(sd->kill_ev, &tv);
}

static void
stop_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sparkd *sd = arg;
	log_warnx("warm stop timed out with %d process%s left: going cold", sup_live_procs(sd),
	          sup_live_procs(sd) == 1 ? "" : "es");
	go_cold(sd);
}

static void
cold_kill_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sparkd *sd = arg;
	log_warnx("%d process%s still running after SIGQUIT: SIGKILL", sup_live_procs(sd),
	          sup_live_procs(sd) == 1 ? "" : "es");
	signal_all(sd, SIGKILL);
}

/*
 * Warm stop: SIGTERM to every worker (they finish in-flight tasks, put back prefetched ones), cold after
 * timeout_s (< 0: the hard time limit + 10 s; 0: never). Cold: SIGQUIT now, SIGKILL after 5 s. A cold request
 * during a warm stop escalates it.
 */
void
sup_stop(struct sparkd *sd, bool cold, double timeout_s)
{
	if (sd->state == SD_STOPPING) {
		if (cold && !sd->cold)
			go_cold(sd);
		return;
	}
	sd->state = SD_STOPPING;
	sys_notify(sd, "STOPPING=1");
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		for (int k = 0; k < w->nslots; k++) {
			evtimer_del(w->slots[k].restart_ev);
			w->slots[k].backoff = false;
		}
		struct sd_proc *p;
		for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
			p->state = PS_STOPPING;
		}
	}
	if (sup_live_procs(sd) == 0) {
		log_info("stopping: no worker process is running");
		sd_finish(sd);
		return;
	}
	if (cold) {
		go_cold(sd);
		return;
	}
	if (timeout_s < 0)
		timeout_s = sd->cfg.time_limit > 0 ? sd->cfg.time_limit + 10 : 0;
	if (timeout_s > 0) {
		struct timeval tv = {(time_t)timeout_s, (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6)};
		evtimer_add(sd->stop_timeout_ev, &tv);
	}
	log_info("warm stop: %d process%s finish their tasks and exit (SIGTERM)%s", sup_live_procs(sd),
	         sup_live_procs(sd) == 1 ? "" : "es", timeout_s > 0 ? "" : ", no timeout");
	signal_all(sd, SIGTERM);
}

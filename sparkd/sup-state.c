/*
 * What status and the log say about the fleet (DESIGN §4, §7): worker names, exit and state names, the backoff
 * sequence, and counts over workers and processes. Pure logic and queries only: nothing here changes a process.
 */
#include <sys/wait.h>

#include <stdio.h>
#include <string.h>

#include "sup.h"

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
 * The delay before a slot's next process, advancing *delay for the one after. A process that was ready and ran
 * startsecs is replaced at once, whatever ended it (a kill storm must not cost capacity: Celery replaces a dead
 * child at once, supervisord's startsecs draws the same line); only consecutive early failures back off.
 */
double
sup_restart_delay(double *delay, bool was_ready, double ran_s, double startsecs)
{
	if ((was_ready && ran_s >= startsecs) || *delay < SD_BACKOFF_MIN)
		*delay = SD_BACKOFF_MIN;
	if (was_ready && ran_s >= startsecs)
		return 0;
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
	if (w->sd->state == SD_STOPPING || w->stopped)
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

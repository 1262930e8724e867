/*
 * Warm and cold stop (DESIGN §7): SIGTERM and a timeout, then SIGQUIT, then SIGKILL.
 */
#include <errno.h>
#include <signal.h>

#include "sup.h"

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

void
sup_stop_init(struct sparkd *sd)
{
	sd->stop_timeout_ev = evtimer_new(sd->base, stop_timeout_cb, sd);
	sd->kill_ev = evtimer_new(sd->base, cold_kill_cb, sd);
	if (sd->stop_timeout_ev == NULL || sd->kill_ev == NULL)
		fatalx("out of memory (timer)");
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

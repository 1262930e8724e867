/*
 * The once-a-second tick (DESIGN §7): each process's RSS, the max-memory and hard-time-limit backstops, STATUS=.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "sup.h"

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

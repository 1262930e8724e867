/*
 * What held jobs send at the end of a tick, for those still held then: kombu's unacked records, STARTED metas, and
 * the start reports of the next report flush.
 */
#include "util.h"
#include "worker.h"

void
job_list_add(struct job ***list, int *n, int *cap, struct job *j)
{
	if (*n == *cap) {
		*cap = *cap ? 2 * *cap : 64;
		*list = xrealloc(*list, (size_t)*cap * sizeof **list);
	}
	(*list)[(*n)++] = j;
}

void
job_queue_report(struct job *j)
{
	struct worker *w = j->w;
	job_list_add(&w->unreported, &w->nunreported, &w->unreported_cap, j);
	j->report_queued = true;
}

/* Report flush: the starts of the jobs still running. A task that began and ended between two flushes is only
 * counted (report_progress): sparkd tracks tasks that last, and the per-task pair would cost more than the task. */
void
job_report_starts(struct worker *w)
{
	for (int i = 0; i < w->nunreported; i++) {
		struct job *j = w->unreported[i];
		if (j == NULL)
			continue;
		j->report_queued = false;
		if (j->state != JOB_RUNNING)
			continue;
		report_start(&w->rep, j->slot, j->hard_s, j->m.task_id, j->m.task_name);
		j->started_report = true;
		j->slot_reported = j->slot;
	}
	w->nunreported = 0;
}

void
job_queue_record(struct job *j)
{
	struct worker *w = j->w;
	if (j->record_queued || j->started_queued) /* already in the list */
		return;
	job_list_add(&w->to_record, &w->nto_record, &w->to_record_cap, j);
}

void
job_unqueue_record(struct job *j)
{
	struct worker *w = j->w;
	for (int i = 0; i < w->nto_record; i++)
		if (w->to_record[i] == j)
			w->to_record[i] = NULL;
	j->record_queued = j->started_queued = false;
}

/*
 * End of tick: kombu's records of the jobs fetched in it, and the STARTED metas of the jobs started in it, for
 * those still held then. A job that ended within the tick (a no-op) writes neither: its records would be deleted
 * by the same write, and its STARTED would be overwritten by its outcome before anyone could read it (it would
 * only cost four commands and, on a subscriber, a message announcing what is already over).
 */
void
job_flush_records(struct worker *w)
{
	for (int i = 0; i < w->nto_record; i++) {
		struct job *j = w->to_record[i];
		if (j == NULL)
			continue;
		bool record = j->record_queued, started = j->started_queued;
		j->record_queued = j->started_queued = false;
		if (record && (j->state == JOB_RESERVED || j->state == JOB_RUNNING))
			outcome_record(j);
		if (started && j->state == JOB_RUNNING)
			outcome_started(j);
	}
	w->nto_record = 0;
}

/*
 * A job's memory: ended jobs are kept for the next messages with their envelope and meta buffers (a no-op drain
 * would otherwise allocate and zero a 2 KiB job, and grow two buffers, per task), and freeing one unlinks it from
 * every list of the tick that may still name it.
 */
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "worker.h"

#ifdef __SANITIZE_ADDRESS__
#define JOB_FREE_MAX 0 /* SAN=1: every job freed, so that a use after its end is reported */
#else
#define JOB_FREE_MAX 256 /* ended jobs kept for reuse, at most (and at most max_held) */
#endif
#define JOB_BUF_KEEP (64u << 10) /* a reused job keeps buffers up to this size */

void
job_free(struct job *j)
{
	struct worker *w = j->w;
	if (j->timers_assigned) {
		event_del(&j->soft_ev);
		event_del(&j->hard_ev);
	}
	if (j->record_queued || j->started_queued)
		job_unqueue_record(j);
	if (j->report_queued)
		for (int i = 0; i < w->nunreported; i++)
			if (w->unreported[i] == j)
				w->unreported[i] = NULL;
	if (j->ack_queued)
		for (int i = 0; i < w->nacks; i++)
			if (w->acks[i] == j)
				w->acks[i] = NULL;
	if (j->state == JOB_WRITING)
		w->writing--;
	TAILQ_REMOVE(&w->jobs, j, entry);
	w->njobs--;
	json_decref(j->run.result);
	if (j->decoded)
		message_free(&j->m);
	if (j->tag_owned)
		free((char *)j->tag);
	free(j->out_env);
	free(j->out_reason);
	/* kept for the next message, unless the process already keeps as many as it may hold or its buffers grew
	 * for an unusual message */
	if (w->nfree_jobs >= w->max_held || w->nfree_jobs >= JOB_FREE_MAX || j->raw_cap > JOB_BUF_KEEP ||
	    j->meta_buf.cap > JOB_BUF_KEEP) {
		free(j->raw);
		sbuf_free(&j->meta_buf);
		free(j);
		return;
	}
	TAILQ_NEXT(j, entry) = w->free_jobs;
	w->free_jobs = j;
	w->nfree_jobs++;
}

void
job_free_pool(struct worker *w)
{
	while (w->free_jobs != NULL) {
		struct job *j = w->free_jobs;
		w->free_jobs = TAILQ_NEXT(j, entry);
		free(j->raw);
		sbuf_free(&j->meta_buf);
		free(j);
	}
	w->nfree_jobs = 0;
}

/* A zeroed job, reused when one is kept: its raw and meta buffers stay allocated. */
struct job *
job_alloc(struct worker *w, size_t len)
{
	struct job *j = w->free_jobs;
	if (j == NULL) {
		j = xcalloc(1, sizeof *j);
	} else {
		w->free_jobs = TAILQ_NEXT(j, entry);
		w->nfree_jobs--;
		char *raw = j->raw;
		size_t cap = j->raw_cap;
		struct sbuf meta = j->meta_buf;
		memset(j, 0, sizeof *j);
		j->raw = raw;
		j->raw_cap = cap;
		j->meta_buf = meta;
	}
	if (j->raw_cap < len + 1) {
		free(j->raw);
		j->raw_cap = len + 1 < 1024 ? 1024 : len + 1;
		j->raw = xmalloc(j->raw_cap);
	}
	return j;
}

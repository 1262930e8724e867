/*
 * Queries to a node's processes (common/command.h "query", answered by "answer" and "answered" reports): sent to
 * every live process of the node at once, collected until all have answered or CEL_QUERY_DEADLINE passes, so a
 * Celery client (which waits 1 s) gets the node's reply even when a process is busy, stuck or gone.
 */
#include <stdlib.h>
#include <string.h>

#include "celery.h"
#include "command.h"

struct fq {
	TAILQ_ENTRY(fq) entry;
	struct sparkd *sd;
	struct pb_call *call;
	unsigned long reqid;
	pid_t *pids;
	bool *answered;
	int nprocs, waiting;
	json_t *items;
	struct event *deadline;
	fq_done_fn done;
};

static void
fq_finish(struct fq *q)
{
	struct sd_celery *cel = q->sd->cel;
	TAILQ_REMOVE(&cel->queries, q, entry);
	if (q->deadline != NULL)
		event_free(q->deadline);
	struct fq_result r = {.items = q->items, .missing = xcalloc((size_t)q->nprocs + 1, sizeof(pid_t))};
	for (int i = 0; i < q->nprocs; i++)
		if (!q->answered[i])
			r.missing[r.nmissing++] = q->pids[i];
	if (r.nmissing > 0)
		log_debug("%s: %d process%s did not answer a query within %.0f ms", q->call->w->name, r.nmissing,
		          r.nmissing == 1 ? "" : "es", CEL_QUERY_DEADLINE * 1000);
	q->done(q->call, &r);
	free(r.missing);
	json_decref(q->items);
	free(q->pids);
	free(q->answered);
	free(q);
}

static void
fq_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	fq_finish(arg);
}

void
fq_start(struct pb_call *c, const char *what, int nargs, const char *const *args, fq_done_fn done)
{
	struct sparkd *sd = c->sd;
	struct sd_celery *cel = sd->cel;
	struct fq *q = xcalloc(1, sizeof *q);
	q->sd = sd;
	q->call = c;
	q->reqid = ++cel->next_reqid;
	q->items = json_array();
	q->done = done;
	int n = 0;
	struct sd_proc *p;
	TAILQ_FOREACH(p, &c->w->procs, entry)
	{
		n++;
	}
	q->pids = xcalloc((size_t)n + 1, sizeof *q->pids);
	q->answered = xcalloc((size_t)n + 1, sizeof *q->answered);
	TAILQ_FOREACH(p, &c->w->procs, entry)
	{
		if (p->rep_fd < 0)
			continue;
		command_query(&p->cmd, q->reqid, what, nargs, args);
		node_flush(p);
		q->pids[q->nprocs++] = p->pid;
	}
	q->waiting = q->nprocs;
	TAILQ_INSERT_TAIL(&cel->queries, q, entry);
	if (q->waiting == 0) {
		fq_finish(q);
		return;
	}
	q->deadline = evtimer_new(sd->base, fq_deadline_cb, q);
	if (q->deadline == NULL)
		fatalx("out of memory (timer)");
	struct timeval tv = {0, (suseconds_t)(CEL_QUERY_DEADLINE * 1e6)};
	evtimer_add(q->deadline, &tv);
}

/* The query and the index of the process in it, or NULL for an answer nobody waits for (late, or stale). */
static struct fq *
fq_find(struct sd_proc *p, unsigned long reqid, int *idx)
{
	struct fq *q;
	TAILQ_FOREACH(q, &p->w->sd->cel->queries, entry)
	{
		if (q->reqid != reqid)
			continue;
		for (int i = 0; i < q->nprocs; i++)
			if (q->pids[i] == p->pid && !q->answered[i]) {
				*idx = i;
				return q;
			}
		return NULL;
	}
	return NULL;
}

void
fq_answer(struct sd_proc *p, unsigned long reqid, const char *json)
{
	int idx;
	struct fq *q = fq_find(p, reqid, &idx);
	if (q == NULL)
		return;
	json_error_t err;
	json_t *v = json_loads(json, JSON_DECODE_ANY, &err);
	if (v == NULL) {
		log_warnx("%s: process %d answered a query with malformed JSON: %s", p->w->name, (int)p->pid, err.text);
		return;
	}
	json_array_append_new(q->items, v);
}

void
fq_answered(struct sd_proc *p, unsigned long reqid, int count)
{
	int idx;
	struct fq *q = fq_find(p, reqid, &idx);
	if (q == NULL)
		return;
	q->answered[idx] = true;
	if (--q->waiting == 0)
		fq_finish(q);
}

/* At exit: every query still waiting ends now, without a reply (the broker goes too). */
void
fq_free_all(struct sparkd *sd)
{
	struct fq *q;
	while ((q = TAILQ_FIRST(&sd->cel->queries)) != NULL) {
		TAILQ_REMOVE(&sd->cel->queries, q, entry);
		if (q->deadline != NULL)
			event_free(q->deadline);
		pb_call_done(q->call, NULL);
		json_decref(q->items);
		free(q->pids);
		free(q->answered);
		free(q);
	}
}

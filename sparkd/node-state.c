/*
 * Per node, what control commands changed (queues, task events, per-name time limits): sent at once to the
 * node's processes over fd 3 (common/command.h) and again to every process started later, so a restart or a
 * recycle never undoes an operator's change.
 */
#include <stdlib.h>
#include <string.h>

#include "celery.h"
#include "command.h"

void
node_init(struct sparkd *sd, struct cel_node *n)
{
	const struct spark_config *cfg = &sd->cfg;
	memset(n, 0, sizeof *n);
	n->queues = xcalloc(SPARK_MAX_QUEUES, sizeof *n->queues);
	for (int i = 0; i < cfg->nqueues && i < SPARK_MAX_QUEUES; i++)
		n->queues[n->nqueues++] = xstrdup(cfg->queues[i]);
	/* the workers read CELERY_WORKER_SEND_TASK_EVENTS themselves; sparkd only mirrors it */
	const char *ev = getenv("CELERY_WORKER_SEND_TASK_EVENTS");
	bool on = false;
	n->task_events = ev != NULL && parse_bool(ev, &on) == 0 && on ? 1 : 0;
}

void
node_free(struct cel_node *n)
{
	for (int i = 0; i < n->nqueues; i++)
		free(n->queues[i]);
	free(n->queues);
	for (int i = 0; i < n->nlimits; i++)
		free(n->limits[i].name);
	free(n->limits);
	memset(n, 0, sizeof *n);
}

void
node_flush(struct sd_proc *p)
{
	/* the report fd is closed (and its number maybe reused) once the worker is gone */
	if (p->rep_fd < 0) {
		wl_out_free(&p->cmd);
		return;
	}
	p->cmd.fd = p->rep_fd;
	wl_flush(&p->cmd);
}

bool
node_has_queue(const struct cel_node *n, const char *q)
{
	for (int i = 0; i < n->nqueues; i++)
		if (strcmp(n->queues[i], q) == 0)
			return true;
	return false;
}

static void
bind_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	redisReply *r = reply;
	if (r != NULL && r->type == REDIS_REPLY_ERROR)
		log_warnx("SADD of a queue binding: %s", r->str);
}

void
node_bind_queue(struct sparkd *sd, const char *q)
{
	char *key = xasprintf(CEL_BINDING_PREFIX "%s", q), *member = xasprintf("%s" CEL_SEP CEL_SEP "%s", q, q);
	const char *argv[] = {"SADD", key, member};
	broker_cmd(&sd->cel->broker, bind_reply, NULL, 3, argv, NULL);
	free(key);
	free(member);
}

static void
node_send_queues(struct sd_worker *w, struct cel_node *n)
{
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		command_queues(&p->cmd, n->nqueues, (const char *const *)n->queues);
		node_flush(p);
	}
}

void
node_add_queue(struct sparkd *sd, struct sd_worker *w, const char *q)
{
	struct cel_node *n = celery_node(sd, w);
	if (node_has_queue(n, q) || n->nqueues >= SPARK_MAX_QUEUES)
		return;
	n->queues[n->nqueues++] = xstrdup(q);
	node_bind_queue(sd, q);
	log_info("%s: now consuming from %s too (add_consumer)", w->name, q);
	node_send_queues(w, n);
}

bool
node_cancel_queue(struct sparkd *sd, struct sd_worker *w, const char *q)
{
	struct cel_node *n = celery_node(sd, w);
	for (int i = 0; i < n->nqueues; i++) {
		if (strcmp(n->queues[i], q) != 0)
			continue;
		free(n->queues[i]);
		memmove(&n->queues[i], &n->queues[i + 1], (size_t)(n->nqueues - i - 1) * sizeof *n->queues);
		n->nqueues--;
		log_info("%s: no longer consuming from %s (cancel_consumer)", w->name, q);
		node_send_queues(w, n);
		return true;
	}
	return false;
}

void
node_set_events(struct sparkd *sd, struct sd_worker *w, bool on)
{
	struct cel_node *n = celery_node(sd, w);
	n->task_events = on ? 1 : 0;
	n->events_changed = true;
	log_info("%s: task events %s by remote control", w->name, on ? "enabled" : "disabled");
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		command_events(&p->cmd, on);
		node_flush(p);
	}
}

void
node_set_time_limit(struct sparkd *sd, struct sd_worker *w, const char *name, double soft, double hard)
{
	struct cel_node *n = celery_node(sd, w);
	int i;
	for (i = 0; i < n->nlimits && strcmp(n->limits[i].name, name) != 0; i++)
		;
	if (i == n->nlimits) {
		n->limits = xrealloc(n->limits, (size_t)(n->nlimits + 1) * sizeof *n->limits);
		n->limits[n->nlimits++].name = xstrdup(name);
	}
	n->limits[i].soft = soft;
	n->limits[i].hard = hard;
	log_info("%s: time limits of %s set to soft %gs, hard %gs by remote control", w->name, name, soft, hard);
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		command_time_limit(&p->cmd, name, soft, hard);
		node_flush(p);
	}
}

void
node_send_revoke(struct sparkd *sd, struct sd_worker *w, int terminate, const char *signal, int nids,
                 const char *const *ids)
{
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		command_revoke(&p->cmd, terminate, signal, nids, ids);
		node_flush(p);
	}
}

static bool
queues_changed(const struct spark_config *cfg, const struct cel_node *n)
{
	if (n->nqueues != cfg->nqueues)
		return true;
	for (int i = 0; i < n->nqueues; i++)
		if (strcmp(n->queues[i], cfg->queues[i]) != 0)
			return true;
	return false;
}

void
node_send_state(struct sparkd *sd, struct sd_proc *p)
{
	struct cel_node *n = celery_node(sd, p->w);
	if (queues_changed(&sd->cfg, n))
		command_queues(&p->cmd, n->nqueues, (const char *const *)n->queues);
	if (n->events_changed)
		command_events(&p->cmd, n->task_events == 1);
	for (int i = 0; i < n->nlimits; i++)
		command_time_limit(&p->cmd, n->limits[i].name, n->limits[i].soft, n->limits[i].hard);
	node_flush(p);
}

/*
 * The reply of `status` (DESIGN §4): the supervisor, each worker and, when it fits in a frame, each process.
 */
#include "ctl.h"

static void
pack_exit(msgpack_packer *pk, const struct sd_exit *ex)
{
	if (!ex->set) {
		msgpack_pack_nil(pk);
		return;
	}
	msgpack_pack_map(pk, 4);
	proto_pack_kv_str(pk, "reason", ex->reason);
	proto_pack_key(pk, "status");
	if (ex->signal != 0 || ex->status < 0)
		msgpack_pack_nil(pk);
	else
		msgpack_pack_int(pk, ex->status);
	proto_pack_key(pk, "signal");
	if (ex->signal != 0)
		msgpack_pack_int(pk, ex->signal);
	else
		msgpack_pack_nil(pk);
	proto_pack_kv_double(pk, "at", ex->at);
}

static void
pack_proc(msgpack_packer *pk, const struct sd_slot *s, const struct sd_proc *p, enum sd_pstate placeholder)
{
	double now = now_mono(), wall = now_wall();
	msgpack_pack_map(pk, 12);
	proto_pack_kv_int(pk, "pid", p ? p->pid : 0);
	proto_pack_kv_str(pk, "state", sup_state_name(p ? p->state : placeholder));
	proto_pack_kv_int(pk, "slot", s->index);
	proto_pack_kv_int(pk, "rss_kib", p ? p->rss_kib : 0);
	proto_pack_kv_int(pk, "processed", p ? p->processed : 0);
	proto_pack_kv_int(pk, "restarts", s->restarts);
	proto_pack_key(pk, "active_tasks");
	int n = 0;
	for (int i = 0; p != NULL && i < p->nslots; i++)
		n += p->tasks[i].used;
	msgpack_pack_array(pk, (size_t)n);
	for (int i = 0; p != NULL && i < p->nslots; i++) {
		const struct sd_task *t = &p->tasks[i];
		if (!t->used)
			continue;
		msgpack_pack_map(pk, 5);
		proto_pack_kv_str(pk, "id", t->id);
		proto_pack_kv_str(pk, "name", t->name);
		proto_pack_kv_double(pk, "runtime_s", now - t->started_mono);
		proto_pack_kv_double(pk, "started_at", t->started_wall);
		proto_pack_kv_double(pk, "hard_limit", t->hard_limit);
	}
	proto_pack_key(pk, "started_at");
	if (p)
		msgpack_pack_double(pk, p->started_wall);
	else
		msgpack_pack_nil(pk);
	proto_pack_key(pk, "last_exit");
	pack_exit(pk, &s->last_exit);
	proto_pack_kv_str(pk, "problem", p ? p->problem : NULL);
	proto_pack_kv_str(pk, "recycle", p && p->reason[0] ? p->reason : NULL);
	proto_pack_key(pk, "next_restart_s");
	if (p == NULL && s->backoff)
		msgpack_pack_double(pk, s->backoff_until > wall ? s->backoff_until - wall : 0);
	else
		msgpack_pack_nil(pk);
}

static void
pack_worker(msgpack_packer *pk, struct sparkd *sd, struct sd_worker *w, bool with_procs)
{
	msgpack_pack_map(pk, with_procs ? 9 : 8);
	proto_pack_kv_str(pk, "name", w->name);
	proto_pack_kv_str(pk, "state", sup_state_name(sup_worker_state(w)));
	proto_pack_kv_str(pk, "pool", pool_name(sd->cfg.pool));
	proto_pack_kv_int(pk, "concurrency", sd->cfg.concurrency);
	proto_pack_kv_int(pk, "processed", sup_worker_processed(w));
	proto_pack_kv_int(pk, "active", sup_worker_active(w));
	proto_pack_kv_double(pk, "uptime_s", w->started_wall > 0 ? now_wall() - w->started_wall : 0);
	proto_pack_kv_int(pk, "restarts", sup_worker_restarts(w));
	if (!with_procs)
		return;
	/* each slot's current process (or its backoff/stopped placeholder), then processes being replaced */
	size_t n = 0;
	for (int k = 0; k < w->nslots; k++)
		if (w->slots[k].current != NULL || sd->state != SD_STOPPING)
			n++;
	struct sd_proc *p;
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		if (p->retiring || w->slots[p->slot].current != p)
			n++;
	}
	proto_pack_key(pk, "processes");
	msgpack_pack_array(pk, n);
	for (int k = 0; k < w->nslots; k++) {
		const struct sd_slot *s = &w->slots[k];
		if (s->current != NULL)
			pack_proc(pk, s, s->current, PS_STARTING);
		else if (sd->state != SD_STOPPING)
			pack_proc(pk, s, NULL, s->backoff ? PS_BACKOFF : PS_STARTING);
	}
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		if (p->retiring || w->slots[p->slot].current != p)
			pack_proc(pk, &w->slots[p->slot], p, PS_DRAINING);
	}
}

void
ctl_pack_status(struct sparkd *sd, msgpack_packer *pk, bool verbose, bool with_procs)
{
	const struct spark_config *cfg = &sd->cfg;
	msgpack_pack_map(pk, with_procs ? 2 : 3);
	proto_pack_key(pk, "supervisor");
	bool qknown = sd->nqlen > 0;
	msgpack_pack_map(pk, qknown ? 17 : 15);
	proto_pack_kv_int(pk, "pid", sd->pid);
	proto_pack_kv_str(pk, "version", SPARK_VERSION);
	proto_pack_kv_int(pk, "protocol", SPARK_PROTOCOL_VERSION);
	proto_pack_kv_double(pk, "uptime_s", now_wall() - sd->started_wall);
	proto_pack_kv_double(pk, "started_at", sd->started_wall);
	proto_pack_kv_str(pk, "socket", sd->sock_path);
	proto_pack_kv_bool(pk, "socket_activated", !sd->listen_owned);
	proto_pack_kv_str(pk, "pool", pool_name(cfg->pool));
	proto_pack_kv_int(pk, "workers", cfg->workers);
	proto_pack_kv_int(pk, "concurrency", cfg->concurrency);
	proto_pack_key(pk, "queues");
	msgpack_pack_array(pk, (size_t)cfg->nqueues);
	for (int i = 0; i < cfg->nqueues; i++)
		proto_pack_str(pk, cfg->queues[i]);
	if (qknown) {
		proto_pack_key(pk, "queue_lengths");
		msgpack_pack_map(pk, (size_t)sd->nqlen);
		for (int i = 0; i < sd->nqlen; i++)
			proto_pack_kv_int(pk, sd->qname[i], sd->qlen[i]);
		proto_pack_kv_double(pk, "queue_lengths_at", sd->qlen_at);
	}
	proto_pack_key(pk, "limits");
	msgpack_pack_map(pk, 4);
	proto_pack_kv_int(pk, "max_tasks_per_child", cfg->max_tasks_per_child);
	proto_pack_kv_int(pk, "max_memory_kib", cfg->max_memory_kib);
	proto_pack_kv_double(pk, "time_limit", cfg->time_limit);
	proto_pack_kv_double(pk, "soft_time_limit", cfg->soft_time_limit);
	proto_pack_kv_str(pk, "log_file", sd->lc.path);
	proto_pack_kv_str(pk, "state",
	                  sd->state == SD_STOPPING  ? "stopping"
	                  : sd->state == SD_RUNNING ? "running"
	                                            : "starting");
	proto_pack_kv_int(pk, "rss_kib", proc_rss_kib(0));
	proto_pack_key(pk, "workers");
	msgpack_pack_array(pk, (size_t)sd->nworkers);
	for (int i = 0; i < sd->nworkers; i++)
		pack_worker(pk, sd, &sd->workers[i], with_procs);
	if (!with_procs)
		proto_pack_kv_bool(pk, "truncated", true);
	(void)verbose;
}

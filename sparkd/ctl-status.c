/*
 * The reply of `status` (DESIGN §4, docs/protocol.md): the supervisor, each worker and, when asked for (verbose)
 * and it fits in a frame, each process. Every map has the fields of its list in proto/fields.h, nil when there is
 * no value: one shape, whatever the state.
 */
#include "ctl.h"

static void
pack_nil_or_double(msgpack_packer *pk, bool set, double v)
{
	if (set)
		msgpack_pack_double(pk, v);
	else
		msgpack_pack_nil(pk);
}

static void
pack_nil_or_int(msgpack_packer *pk, bool set, int64_t v)
{
	if (set)
		msgpack_pack_int64(pk, v);
	else
		msgpack_pack_nil(pk);
}

static void
pack_exit(msgpack_packer *pk, const struct sd_exit *ex)
{
	if (!ex->set) {
		msgpack_pack_nil(pk);
		return;
	}
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_EXIT_FIELDS));
	proto_pack_kv_str(pk, PROTO_F_REASON, ex->reason);
	proto_pack_key(pk, PROTO_F_STATUS);
	pack_nil_or_int(pk, ex->signal == 0 && ex->status >= 0, ex->status);
	proto_pack_key(pk, PROTO_F_SIGNAL);
	pack_nil_or_int(pk, ex->signal != 0, ex->signal);
	proto_pack_kv_double(pk, PROTO_F_AT, ex->at);
}

static void
pack_task(msgpack_packer *pk, const struct sd_task *t, double now)
{
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_TASK_FIELDS));
	proto_pack_kv_str(pk, PROTO_F_ID, t->id);
	proto_pack_kv_str(pk, PROTO_F_NAME, t->name);
	proto_pack_kv_double(pk, PROTO_F_RUNTIME_S, now - t->started_mono);
	proto_pack_kv_double(pk, PROTO_F_STARTED_AT, t->started_wall);
	proto_pack_kv_double(pk, PROTO_F_HARD_LIMIT, t->hard_limit);
}

static void
pack_proc(msgpack_packer *pk, const struct sd_slot *s, const struct sd_proc *p, enum sd_pstate placeholder)
{
	double now = now_mono(), wall = now_wall();
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_PROCESS_FIELDS));
	proto_pack_kv_int(pk, PROTO_F_PID, p ? p->pid : 0);
	proto_pack_kv_str(pk, PROTO_F_STATE, sup_state_name(p ? p->state : placeholder));
	proto_pack_kv_int(pk, PROTO_F_SLOT, s->index);
	proto_pack_kv_int(pk, PROTO_F_RSS_KIB, p ? p->rss_kib : 0);
	proto_pack_kv_int(pk, PROTO_F_PROCESSED, p ? p->processed : 0);
	proto_pack_kv_int(pk, PROTO_F_RESTARTS, s->restarts);
	proto_pack_key(pk, PROTO_F_ACTIVE_TASKS);
	int n = 0;
	for (int i = 0; p != NULL && i < p->nslots; i++)
		n += p->tasks[i].used;
	msgpack_pack_array(pk, (size_t)n);
	for (int i = 0; p != NULL && i < p->nslots; i++)
		if (p->tasks[i].used)
			pack_task(pk, &p->tasks[i], now);
	proto_pack_key(pk, PROTO_F_STARTED_AT);
	pack_nil_or_double(pk, p != NULL, p ? p->started_wall : 0);
	proto_pack_key(pk, PROTO_F_LAST_EXIT);
	pack_exit(pk, &s->last_exit);
	proto_pack_kv_str(pk, PROTO_F_PROBLEM, p ? p->problem : NULL);
	proto_pack_kv_str(pk, PROTO_F_RECYCLE, p && p->reason[0] ? p->reason : NULL);
	proto_pack_key(pk, PROTO_F_NEXT_RESTART_S);
	pack_nil_or_double(pk, p == NULL && s->backoff, s->backoff_until > wall ? s->backoff_until - wall : 0);
}

/* Each slot's current process (or its backoff/starting placeholder), then the processes being replaced. */
static void
pack_processes(msgpack_packer *pk, struct sparkd *sd, struct sd_worker *w)
{
	size_t n = 0;
	for (int k = 0; k < w->nslots; k++)
		if (w->slots[k].current != NULL || sd->state != SD_STOPPING)
			n++;
	struct sd_proc *p;
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		if (p->retiring || w->slots[p->slot].current != p)
			n++;
	}
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

static void
pack_worker(msgpack_packer *pk, struct sparkd *sd, struct sd_worker *w, bool with_procs)
{
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_WORKER_FIELDS));
	proto_pack_kv_str(pk, PROTO_F_NAME, w->name);
	proto_pack_kv_str(pk, PROTO_F_STATE, sup_state_name(sup_worker_state(w)));
	proto_pack_kv_str(pk, PROTO_F_POOL, pool_name(sd->cfg.pool));
	proto_pack_kv_int(pk, PROTO_F_CONCURRENCY, w->nslots * w->proc_slots); /* pool_grow/pool_shrink change it */
	proto_pack_kv_int(pk, PROTO_F_PROCESSED, sup_worker_processed(w));
	proto_pack_kv_int(pk, PROTO_F_ACTIVE, sup_worker_active(w));
	proto_pack_kv_double(pk, PROTO_F_UPTIME_S, w->started_wall > 0 ? now_wall() - w->started_wall : 0);
	proto_pack_kv_int(pk, PROTO_F_RESTARTS, sup_worker_restarts(w));
	proto_pack_key(pk, PROTO_F_CELERY);
	celery_pack_node(sd, w, pk);
	proto_pack_key(pk, PROTO_F_PROCESSES);
	if (with_procs)
		pack_processes(pk, sd, w);
	else
		msgpack_pack_nil(pk);
}

static void
pack_supervisor(msgpack_packer *pk, struct sparkd *sd, bool verbose)
{
	const struct spark_config *cfg = &sd->cfg;
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_SUPERVISOR_FIELDS));
	proto_pack_kv_int(pk, PROTO_F_PID, sd->pid);
	proto_pack_kv_str(pk, PROTO_F_VERSION, SPARK_VERSION);
	proto_pack_kv_int(pk, PROTO_F_PROTOCOL, SPARK_PROTOCOL_VERSION);
	proto_pack_kv_double(pk, PROTO_F_UPTIME_S, now_wall() - sd->started_wall);
	proto_pack_kv_double(pk, PROTO_F_STARTED_AT, sd->started_wall);
	proto_pack_kv_str(pk, PROTO_F_SOCKET, sd->sock_path);
	proto_pack_kv_bool(pk, PROTO_F_SOCKET_ACTIVATED, !sd->listen_owned);
	proto_pack_kv_str(pk, PROTO_F_POOL, pool_name(cfg->pool));
	proto_pack_kv_int(pk, PROTO_F_WORKERS, cfg->workers);
	proto_pack_kv_int(pk, PROTO_F_CONCURRENCY, cfg->concurrency);
	proto_pack_key(pk, PROTO_F_QUEUES);
	msgpack_pack_array(pk, (size_t)cfg->nqueues);
	for (int i = 0; i < cfg->nqueues; i++)
		proto_pack_str(pk, cfg->queues[i]);
	/* nil until a worker has reported them */
	proto_pack_key(pk, PROTO_F_QUEUE_LENGTHS);
	if (sd->nqlen > 0) {
		msgpack_pack_map(pk, (size_t)sd->nqlen);
		for (int i = 0; i < sd->nqlen; i++)
			proto_pack_kv_int(pk, sd->qname[i], sd->qlen[i]);
	} else {
		msgpack_pack_nil(pk);
	}
	proto_pack_key(pk, PROTO_F_QUEUE_LENGTHS_AT);
	pack_nil_or_double(pk, sd->nqlen > 0, sd->qlen_at);
	proto_pack_key(pk, PROTO_F_LIMITS);
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_LIMITS_FIELDS));
	proto_pack_kv_int(pk, PROTO_F_MAX_TASKS_PER_CHILD, cfg->max_tasks_per_child);
	proto_pack_kv_int(pk, PROTO_F_MAX_MEMORY_KIB, cfg->max_memory_kib);
	proto_pack_kv_double(pk, PROTO_F_TIME_LIMIT, cfg->time_limit);
	proto_pack_kv_double(pk, PROTO_F_SOFT_TIME_LIMIT, cfg->soft_time_limit);
	proto_pack_kv_str(pk, PROTO_F_LOG_FILE, sd->lc.path);
	proto_pack_kv_str(pk, PROTO_F_STATE,
	                  sd->state == SD_STOPPING  ? "stopping"
	                  : sd->state == SD_RUNNING ? "running"
	                                            : "starting");
	proto_pack_kv_int(pk, PROTO_F_RSS_KIB, proc_rss_kib(0));
	proto_pack_key(pk, PROTO_F_CELERY);
	celery_pack_status(sd, pk, verbose);
}

/*
 * with_procs: each worker's processes (else nil: not asked for, or they do not fit); truncated: they were asked
 * for and did not fit in one frame.
 */
void
ctl_pack_status(struct sparkd *sd, msgpack_packer *pk, bool with_procs, bool truncated)
{
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_STATUS_FIELDS));
	proto_pack_key(pk, PROTO_F_SUPERVISOR);
	pack_supervisor(pk, sd, with_procs || truncated); /* verbose: the revoked ids too */
	proto_pack_key(pk, PROTO_F_WORKERS);
	msgpack_pack_array(pk, (size_t)sd->nworkers);
	for (int i = 0; i < sd->nworkers; i++)
		pack_worker(pk, sd, &sd->workers[i], with_procs);
	proto_pack_kv_bool(pk, PROTO_F_TRUNCATED, truncated);
}

/*
 * Celery's inspect methods (reference §5.5), answered per node. What only the processes know (the requests
 * they run or hold, their task counts and rusage) comes from fleet queries; a process that does not answer in
 * time still shows what sparkd knows of its running tasks, so `inspect active` never loses a task.
 */
#include <sys/resource.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "celery.h"
#include "command.h"
#include "tasknames.h"
#include "url.h"

static const char *const task_names[] = {SPARK_TASK_NAMES};

json_t *
inspect_registered_list(void)
{
	json_t *a = json_array();
	for (size_t i = 0; i < sizeof task_names / sizeof task_names[0]; i++)
		json_array_append_new(a, json_string(task_names[i]));
	return a;
}

/* The request-info dict of a running task as sparkd knows it (Celery's Request.info() has more). */
static json_t *
task_info(const struct sd_worker *w, const struct sd_proc *p, const struct sd_task *t)
{
	return json_pack("{s:s, s:s, s:n, s:n, s:s, s:s, s:f, s:b, s:{s:s, s:s, s:i, s:b}, s:I}", "id", t->id, "name",
	                 t->name, "args", "kwargs", "type", t->name, "hostname", w->name, "time_start", t->started_wall,
	                 "acknowledged", 0, "delivery_info", "exchange", "", "routing_key", "", "priority", 0,
	                 "redelivered", 0, "worker_pid", (json_int_t)p->pid);
}

static struct sd_proc *
proc_by_pid(struct sd_worker *w, pid_t pid)
{
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		if (p->pid == pid)
			return p;
	}
	return NULL;
}

/* ---- answered from a fleet query ---- */

static void
list_done(struct pb_call *c, const struct fq_result *r)
{
	pb_call_done(c, json_incref(r->items));
}

static void stats_done(struct pb_call *c, const struct fq_result *r);

static void
active_done(struct pb_call *c, const struct fq_result *r)
{
	json_t *list = json_incref(r->items);
	for (int i = 0; i < r->nmissing; i++) {
		struct sd_proc *p = proc_by_pid(c->w, r->missing[i]);
		for (int k = 0; p != NULL && k < p->nslots; k++)
			if (p->tasks[k].used)
				json_array_append_new(list, task_info(c->w, p, &p->tasks[k]));
	}
	pb_call_done(c, list);
}

static void
query_task_done(struct pb_call *c, const struct fq_result *r)
{
	json_t *out = json_object(), *item;
	size_t i;
	json_array_foreach(r->items, i, item)
	{
		if (json_is_object(item))
			json_object_update(out, item);
	}
	const char **ids;
	int n = pb_arg_ids(c->req->args, "ids", &ids);
	for (int m = 0; m < r->nmissing; m++) {
		struct sd_proc *p = proc_by_pid(c->w, r->missing[m]);
		for (int k = 0; p != NULL && k < p->nslots; k++)
			for (int j = 0; j < n && p->tasks[k].used; j++)
				if (strcmp(ids[j], p->tasks[k].id) == 0)
					json_object_set_new(
					    out, ids[j],
					    json_pack("[s, o]", "active", task_info(c->w, p, &p->tasks[k])));
	}
	free(ids);
	pb_call_done(c, out);
}

/* The methods the processes answer: the query sent to each, and how their answers make the node's reply. */
static const struct {
	const char *method, *what;
	fq_done_fn done;
} query_methods[] = {
    {"active", CMD_Q_ACTIVE, active_done},
    {"reserved", CMD_Q_RESERVED, list_done},
    {"scheduled", CMD_Q_SCHEDULED, list_done},
    {"stats", CMD_Q_STATS, stats_done},
};

static json_t *
i_query(struct pb_call *c)
{
	for (size_t i = 0; i < sizeof query_methods / sizeof query_methods[0]; i++)
		if (strcmp(query_methods[i].method, c->req->method) == 0)
			fq_start(c, query_methods[i].what, 0, NULL, query_methods[i].done);
	return NULL;
}

static json_t *
i_query_task(struct pb_call *c)
{
	const char **ids;
	int n = pb_arg_ids(c->req->args, "ids", &ids);
	fq_start(c, CMD_Q_QUERY_TASK, n, ids, query_task_done);
	free(ids);
	return NULL;
}

/* ---- stats ---- */

static json_t *
stats_broker(const struct sparkd *sd)
{
	const struct redis_url *u = &sd->cfg.broker;
	char vhost[16];
	snprintf(vhost, sizeof vhost, "%d", u->db);
	return json_pack("{s:s?, s:s?, s:s, s:i, s:b, s:b, s:s, s:i, s:{}, s:n, s:n, s:f, s:s, s:[]}", "hostname",
	                 u->path ? "localhost" : u->host, "userid", u->user, "virtual_host", vhost, "port",
	                 u->path ? 0 : u->port, "insist", 0, "ssl", 0, "transport", u->path ? "redis+socket" : "redis",
	                 "connect_timeout", 4, "transport_options", "login_method", "uri_prefix", "heartbeat", 120.0,
	                 "failover_strategy", "round-robin", "alternates");
}

/* Adds the processes' counts: totals per task name summed, rusage times summed, maxrss the largest. */
static void
stats_merge(json_t *total, json_t *rusage, json_t *item)
{
	const char *k;
	json_t *v;
	json_object_foreach(json_object_get(item, "total"), k, v)
	{
		json_int_t have = json_integer_value(json_object_get(total, k));
		json_object_set_new(total, k, json_integer(have + json_integer_value(v)));
	}
	json_object_foreach(json_object_get(item, "rusage"), k, v)
	{
		if (!json_is_number(v))
			continue;
		double have = json_number_value(json_object_get(rusage, k)), x = json_number_value(v);
		double sum = strcmp(k, "maxrss") == 0 ? (x > have ? x : have) : have + x;
		json_object_set_new(rusage, k, json_is_integer(v) ? json_integer((json_int_t)sum) : json_real(sum));
	}
}

static void
stats_done(struct pb_call *c, const struct fq_result *r)
{
	struct sparkd *sd = c->sd;
	const struct spark_config *cfg = &sd->cfg;
	struct sd_worker *w = c->w;
	json_t *total = json_object(), *rusage = json_object(), *item, *pids = json_array();
	size_t i;
	json_array_foreach(r->items, i, item)
	{
		stats_merge(total, rusage, item);
	}
	if (json_object_size(rusage) == 0) {
		/* no process answered: sparkd's view of its children is better than nothing */
		struct rusage ru;
		getrusage(RUSAGE_CHILDREN, &ru);
		json_object_set_new(rusage, "utime", json_real((double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6));
		json_object_set_new(rusage, "stime", json_real((double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6));
		json_object_set_new(rusage, "maxrss", json_integer(ru.ru_maxrss));
	}
	struct sd_proc *p;
	TAILQ_FOREACH(p, &w->procs, entry)
	{
		json_array_append_new(pids, json_integer(p->pid));
	}
	int slots = w->nslots * w->proc_slots;
	char clock[32];
	snprintf(clock, sizeof clock, "%lu", sd->cel->clock);
	json_t *st = json_pack("{s:o, s:I, s:s, s:I, s:{s:i, s:o, s:I, s:b, s:[f, f], s:s}, s:o, s:I, s:o, s:s, s:s}",
	                       "total", total, "pid", (json_int_t)sd->pid, "clock", clock, "uptime",
	                       (json_int_t)(now_wall() - w->started_wall), "pool", "max-concurrency", slots,
	                       "processes", pids, "max-tasks-per-child", (json_int_t)cfg->max_tasks_per_child,
	                       "put-guarded-by-semaphore", 0, "timeouts", cfg->soft_time_limit, cfg->time_limit,
	                       "implementation", pool_name(cfg->pool), "broker", stats_broker(sd), "prefetch_count",
	                       (json_int_t)slots * (cfg->prefetch_multiplier > 0 ? cfg->prefetch_multiplier : 1),
	                       "rusage", rusage, "sw_ident", CEL_SW_IDENT, "sw_ver", SPARK_VERSION);
	pb_call_done(c, st);
}

/* ---- answered by sparkd alone ---- */

static json_t *
i_ping(struct pb_call *c)
{
	return pb_ok("pong");
}

static json_t *
i_clock(struct pb_call *c)
{
	return json_pack("{s:I}", "clock", (json_int_t)celery_tick(c->sd));
}

static json_t *
i_registered(struct pb_call *c)
{
	return inspect_registered_list();
}

/* kombu's Queue.as_dict(recurse=True) for a direct queue of that name (reference §5.5) */
static json_t *
queue_dict(const char *q)
{
	return json_pack("{s:s, s:{s:s, s:s, s:n, s:b, s:b, s:b, s:n, s:b}, s:s, s:n, s:n, s:n, s:b, s:b, s:b, s:b, "
	                 "s:n, s:[], s:b, s:n, s:n, s:n, s:n, s:n}",
	                 "name", q, "exchange", "name", q, "type", "direct", "arguments", "durable", 1, "passive", 0,
	                 "auto_delete", 0, "delivery_mode", "no_declare", 0, "routing_key", q, "queue_arguments",
	                 "binding_arguments", "consumer_arguments", "durable", 1, "exclusive", 0, "auto_delete", 0,
	                 "no_ack", 0, "alias", "bindings", "no_declare", 0, "expires", "message_ttl", "max_length",
	                 "max_length_bytes", "max_priority");
}

static json_t *
i_active_queues(struct pb_call *c)
{
	struct cel_node *n = celery_node(c->sd, c->w);
	json_t *a = json_array();
	for (int i = 0; i < n->nqueues; i++)
		json_array_append_new(a, queue_dict(n->queues[i]));
	return a;
}

static json_t *
i_revoked(struct pb_call *c)
{
	const struct sd_celery *cel = c->sd->cel;
	json_t *a = json_array();
	double now = now_wall();
	for (int i = 0; i < cel->nrevoked; i++)
		if (cel->revoked_exp[i] > now)
			json_array_append_new(a, json_string(cel->revoked[i]));
	return a;
}

static json_t *
i_conf(struct pb_call *c)
{
	const struct spark_config *cfg = &c->sd->cfg;
	struct cel_node *n = celery_node(c->sd, c->w);
	char *broker = url_redact(cfg->broker_url);
	char *backend = cfg->result_backend ? url_redact(cfg->result_backend) : NULL;
	json_t *queues = json_array();
	for (int i = 0; i < n->nqueues; i++)
		json_array_append_new(queues, json_string(n->queues[i]));
	json_t *conf = json_pack(
	    "{s:s, s:s?, s:i, s:s, s:i, s:I, s:I, s:f, s:f, s:s, s:s, s:[s], s:s, s:o, s:b, s:i, s:b, s:f}",
	    "broker_url", broker, "result_backend", backend, "worker_concurrency", cfg->concurrency, "worker_pool",
	    pool_name(cfg->pool), "worker_prefetch_multiplier", cfg->prefetch_multiplier, "worker_max_tasks_per_child",
	    (json_int_t)cfg->max_tasks_per_child, "worker_max_memory_per_child", (json_int_t)cfg->max_memory_kib,
	    "task_time_limit", cfg->time_limit, "task_soft_time_limit", cfg->soft_time_limit, "task_serializer", "json",
	    "result_serializer", "json", "accept_content", "json", "task_default_queue", "celery", "worker_queues",
	    queues, "worker_send_task_events", n->task_events == 1, "task_max_retries", cfg->max_retries,
	    "task_retry_backoff", cfg->retry_backoff, "task_retry_backoff_max", cfg->retry_backoff_max);
	free(broker);
	free(backend);
	return conf;
}

static json_t *
i_report(struct pb_call *c)
{
	const struct spark_config *cfg = &c->sd->cfg;
	return pb_ok("software -> %s:%s\nplatform -> Linux\nworker -> %s (pool %s, %d x %d)\nsupervisor -> sparkd "
	             "pid %ld\n",
	             CEL_SW_IDENT, SPARK_VERSION, c->w->name, pool_name(cfg->pool), c->w->nslots, c->w->proc_slots,
	             (long)c->sd->pid);
}

/* mingle: a Python worker starting says hello; it merges only truthy replies (reference §5.5) */
static json_t *
i_hello(struct pb_call *c)
{
	const char *from = json_string_value(json_object_get(c->req->args, "from_node"));
	if (from != NULL && strcmp(from, c->w->name) == 0)
		return json_null();
	return json_pack("{s:{}, s:I}", "revoked", "clock", (json_int_t)celery_tick(c->sd));
}

static const struct {
	const char *name;
	pb_handler fn;
} inspect_methods[] = {
    {"ping", i_ping},
    {"active", i_query},
    {"reserved", i_query},
    {"scheduled", i_query},
    {"registered", i_registered},
    {"stats", i_query},
    {"active_queues", i_active_queues},
    {"revoked", i_revoked},
    {"query_task", i_query_task},
    {"clock", i_clock},
    {"conf", i_conf},
    {"report", i_report},
    {"hello", i_hello},
};

pb_handler
inspect_lookup(const char *method)
{
	for (size_t i = 0; i < sizeof inspect_methods / sizeof inspect_methods[0]; i++)
		if (strcmp(inspect_methods[i].name, method) == 0)
			return inspect_methods[i].fn;
	return NULL;
}

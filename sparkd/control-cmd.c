/*
 * Celery's control methods (reference §5.5; replies worded as celery/worker/control.py words them), per node.
 * Revoked ids go to SPARK_REVOKED_KEY first, so every process and every restart sees them, then to the node's
 * processes as the revoke command.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "celery.h"
#include "command.h"

/* Celery's signal names: "KILL", "SIGKILL", "9"; NULL or "" is TERM */
static int
signal_number(const char *name)
{
	static const struct {
		const char *name;
		int sig;
	} sigs[] = {{"TERM", SIGTERM}, {"KILL", SIGKILL}, {"INT", SIGINT},  {"QUIT", SIGQUIT},
	            {"HUP", SIGHUP},   {"USR1", SIGUSR1}, {"USR2", SIGUSR2}};
	if (name == NULL || name[0] == '\0')
		return SIGTERM;
	if (strncasecmp(name, "SIG", 3) == 0)
		name += 3;
	long n;
	if (parse_long(name, &n) == 0)
		return n > 0 && n < 65 ? (int)n : -1;
	for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
		if (strcasecmp(sigs[i].name, name) == 0)
			return sigs[i].sig;
	return -1;
}

static void
revoke_stored(redisAsyncContext *ac, void *reply, void *priv)
{
	redisReply *r = reply;
	if (r == NULL)
		log_warnx("revoke: the broker connection was lost before the revoked ids were stored");
	else if (r->type == REDIS_REPLY_ERROR)
		log_warnx("revoke: storing the revoked ids: %s", r->str);
}

/* ZADD with expiry scores, then drop the expired and keep the newest SPARK_REVOKED_MAX. */
static void
revoke_store(struct sparkd *sd, int n, const char *const *ids)
{
	double now = now_wall(), exp = now + SPARK_REVOKED_EXPIRES;
	char score[32], lo[32], rank[32];
	snprintf(score, sizeof score, "%.3f", exp);
	snprintf(lo, sizeof lo, "%.3f", now);
	snprintf(rank, sizeof rank, "%d", -(SPARK_REVOKED_MAX + 1));
	const char **argv = xcalloc((size_t)(2 + 2 * n), sizeof *argv);
	argv[0] = "ZADD";
	argv[1] = SPARK_REVOKED_KEY;
	for (int i = 0; i < n; i++) {
		argv[2 + 2 * i] = score;
		argv[3 + 2 * i] = ids[i];
		celery_revoked_add(sd, ids[i], exp);
	}
	struct sd_broker *b = &sd->cel->broker;
	if (broker_cmd(b, revoke_stored, NULL, 2 + 2 * n, argv, NULL) < 0)
		log_warnx("revoke: the broker is down: %d id%s revoked in this sparkd's processes only", n,
		          n == 1 ? "" : "s");
	const char *expire[] = {"ZREMRANGEBYSCORE", SPARK_REVOKED_KEY, "-inf", lo};
	broker_cmd(b, revoke_stored, NULL, 4, expire, NULL);
	const char *trim[] = {"ZREMRANGEBYRANK", SPARK_REVOKED_KEY, "0", rank};
	broker_cmd(b, revoke_stored, NULL, 4, trim, NULL);
	free(argv);
}

static json_t *
c_revoke(struct pb_call *c)
{
	json_t *args = c->req->args;
	const char **ids;
	int n = pb_arg_ids(args, "task_id", &ids);
	bool terminate = json_is_true(json_object_get(args, "terminate"));
	const char *signame = json_string_value(json_object_get(args, "signal"));
	int sig = signal_number(signame);
	if (sig < 0) {
		free(ids);
		return pb_error("ValueError('unknown signal: %s')", signame);
	}
	if (!c->req->shared_done) {
		c->req->shared_done = true;
		if (n > 0)
			revoke_store(c->sd, n, ids);
	}
	node_send_revoke(c->sd, c->w, terminate, signame ? signame : "", n, ids);
	if (!terminate) {
		char *list = xstrdup("");
		for (int i = 0; i < n; i++) {
			char *l = xasprintf("%s%s%s", list, i ? ", " : "", ids[i]);
			free(list);
			list = l;
		}
		log_info("%s: tasks flagged as revoked: %s", c->w->name, list);
		json_t *r = pb_ok("tasks %s flagged as revoked", list);
		free(list);
		free(ids);
		return r;
	}
	/* which of the ids run here now; KILL: a single-slot process is ended by sparkd itself */
	char *list = xstrdup("");
	int found = 0;
	struct sd_proc *p;
	TAILQ_FOREACH(p, &c->w->procs, entry)
	{
		for (int k = 0; k < p->nslots; k++)
			for (int i = 0; i < n && p->tasks[k].used; i++) {
				if (strcmp(p->tasks[k].id, ids[i]) != 0)
					continue;
				char *l = xasprintf("%s%s%s", list, found++ ? ", " : "", ids[i]);
				free(list);
				list = l;
				if (sig == SIGKILL && p->nslots == 1) {
					log_info("%s: revoke: SIGKILL to process %d running %.256s", c->w->name,
					         (int)p->pid, ids[i]);
					kill(p->pid, SIGKILL);
				}
			}
	}
	json_t *r = found ? pb_ok("terminate: %s", list) : pb_ok("terminate: tasks unknown");
	free(list);
	free(ids);
	return r;
}

static json_t *
c_shutdown(struct pb_call *c)
{
	log_warnx("%s: Got shutdown from remote: warm stop of the node", c->w->name);
	sup_stop_worker(c->w);
	/* Celery's handler raises WorkerShutdown, which kombu does not catch: no reply */
	pb_call_done(c, NULL);
	return NULL;
}

/* n: an int, or a string of one (Celery's CLI passes either) */
static long
arg_count(json_t *args, const char *key, long dflt)
{
	json_t *v = json_object_get(args, key);
	long n;
	if (json_is_integer(v))
		return (long)json_integer_value(v);
	if (json_is_string(v) && parse_long(json_string_value(v), &n) == 0)
		return n;
	return dflt;
}

static json_t *
pool_resize(struct pb_call *c, long delta)
{
	struct sparkd *sd = c->sd;
	if (sd->cfg.pool != SPARK_POOL_PREFORK)
		return pb_error("NotImplementedError('the %s pool has one process per worker: pool_grow and "
		                "pool_shrink change the prefork pool only')",
		                pool_name(sd->cfg.pool));
	long target = c->w->nslots + delta;
	if (target < 1)
		return pb_error("ValueError(\"Can't shrink pool below one process\")");
	if (target > 4096)
		return pb_error("ValueError('at most 4096 processes per worker')");
	sup_worker_resize(c->w, (int)target);
	return pb_ok(delta > 0 ? "pool will grow" : "pool will shrink");
}

static json_t *
c_pool_grow(struct pb_call *c)
{
	return pool_resize(c, arg_count(c->req->args, "n", 1));
}

static json_t *
c_pool_shrink(struct pb_call *c)
{
	return pool_resize(c, -arg_count(c->req->args, "n", 1));
}

static json_t *
c_add_consumer(struct pb_call *c)
{
	const char *q = json_string_value(json_object_get(c->req->args, "queue"));
	if (q == NULL || q[0] == '\0')
		return pb_error("TypeError(\"add_consumer() missing required argument: 'queue'\")");
	struct cel_node *n = celery_node(c->sd, c->w);
	if (node_has_queue(n, q))
		return pb_ok("already consuming from '%s'", q);
	if (n->nqueues >= SPARK_MAX_QUEUES)
		return pb_error("ValueError('at most %d queues per worker')", SPARK_MAX_QUEUES);
	node_add_queue(c->sd, c->w, q);
	return pb_ok("add consumer %s", q);
}

static json_t *
c_cancel_consumer(struct pb_call *c)
{
	const char *q = json_string_value(json_object_get(c->req->args, "queue"));
	if (q == NULL || q[0] == '\0')
		return pb_error("TypeError(\"cancel_consumer() missing required argument: 'queue'\")");
	node_cancel_queue(c->sd, c->w, q);
	return pb_ok("no longer consuming from %s", q);
}

static json_t *
c_enable_events(struct pb_call *c)
{
	if (celery_node(c->sd, c->w)->task_events == 1)
		return pb_ok("task events already enabled");
	node_set_events(c->sd, c->w, true);
	return pb_ok("task events enabled");
}

static json_t *
c_disable_events(struct pb_call *c)
{
	if (celery_node(c->sd, c->w)->task_events == 0)
		return pb_ok("task events already disabled");
	node_set_events(c->sd, c->w, false);
	return pb_ok("task events disabled");
}

static double
arg_seconds(json_t *args, const char *key)
{
	json_t *v = json_object_get(args, key);
	double d;
	if (json_is_number(v))
		return json_number_value(v);
	if (json_is_string(v) && parse_double(json_string_value(v), &d) == 0)
		return d;
	return 0;
}

static json_t *
c_time_limit(struct pb_call *c)
{
	const char *name = json_string_value(json_object_get(c->req->args, "task_name"));
	json_t *known = inspect_registered_list(), *v;
	size_t i;
	bool found = false;
	json_array_foreach(known, i, v)
	{
		found = found || (name != NULL && strcmp(json_string_value(v), name) == 0);
	}
	json_decref(known);
	if (!found)
		return pb_error("unknown task");
	double soft = arg_seconds(c->req->args, "soft"), hard = arg_seconds(c->req->args, "hard");
	if (soft < 0 || hard < 0 || (hard > 0 && soft > hard))
		return pb_error("ValueError('soft limit above the hard one, or negative')");
	node_set_time_limit(c->sd, c->w, name, soft, hard);
	return pb_ok("time limits set successfully");
}

static const struct {
	const char *name;
	pb_handler fn;
} control_methods[] = {
    {"revoke", c_revoke},
    {"shutdown", c_shutdown},
    {"pool_grow", c_pool_grow},
    {"pool_shrink", c_pool_shrink},
    {"add_consumer", c_add_consumer},
    {"cancel_consumer", c_cancel_consumer},
    {"enable_events", c_enable_events},
    {"disable_events", c_disable_events},
    {"time_limit", c_time_limit},
};

pb_handler
control_lookup(const char *method)
{
	for (size_t i = 0; i < sizeof control_methods / sizeof control_methods[0]; i++)
		if (strcmp(control_methods[i].name, method) == 0)
			return control_methods[i].fn;
	return NULL;
}

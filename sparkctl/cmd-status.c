/*
 * sparkctl status: the guide's six fields per worker; --verbose adds every process, its active tasks and the
 * supervisor; --json prints the daemon's result as is. Fields the daemon does not send print as "-".
 */
#include "sparkctl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "util.h"

#define STATUS_TIMEOUT_MS 10000

static void
status_pack(msgpack_packer *pk, void *arg)
{
	const bool *verbose = arg;
	msgpack_pack_map(pk, 1);
	proto_pack_kv_bool(pk, PROTO_P_VERBOSE, *verbose);
}

/* "celery (3 waiting), priority": the queues, with their lengths once a worker has reported them. */
static void
status_fmt_queues(const msgpack_object *sup, char *buf, size_t len)
{
	const msgpack_object *q = proto_map_get(sup, PROTO_F_QUEUES);
	const msgpack_object *lengths = proto_map_get(sup, PROTO_F_QUEUE_LENGTHS);
	size_t off = 0;
	buf[0] = '\0';
	for (uint32_t i = 0; q != NULL && q->type == MSGPACK_OBJECT_ARRAY && i < q->via.array.size && off < len; i++) {
		char name[256], count[32] = "";
		out_obj_str(&q->via.array.ptr[i], name, sizeof name);
		if (proto_map_get(lengths, name) != NULL)
			out_field_int(lengths, name, count, sizeof count);
		int w = count[0] ? snprintf(buf + off, len - off, "%s%s (%s waiting)", off ? ", " : "", name, count)
		                 : snprintf(buf + off, len - off, "%s%s", off ? ", " : "", name);
		if (w < 0)
			break;
		off += (size_t)w;
	}
	if (buf[0] == '\0')
		snprintf(buf, len, "-");
}

static void
status_fmt_limits(const msgpack_object *limits, char *buf, size_t len)
{
	char tasks[32], mem[32], hard[32], soft[32];
	int64_t kib = -1;
	double d;
	out_field_int(limits, PROTO_F_MAX_TASKS_PER_CHILD, tasks, sizeof tasks);
	if (strcmp(tasks, "0") == 0)
		snprintf(tasks, sizeof tasks, "none");
	if (proto_get_int(limits, PROTO_F_MAX_MEMORY_KIB, &kib) == 1 && kib == 0)
		snprintf(mem, sizeof mem, "none");
	else
		out_fmt_rss(mem, sizeof mem, proto_map_get(limits, PROTO_F_MAX_MEMORY_KIB) ? kib : -1);
	if (proto_get_double(limits, PROTO_F_TIME_LIMIT, &d) == 1 && isfinite(d))
		snprintf(hard, sizeof hard, d > 0 ? "%g s" : "none", d);
	else
		snprintf(hard, sizeof hard, "-");
	if (proto_get_double(limits, PROTO_F_SOFT_TIME_LIMIT, &d) == 1 && isfinite(d))
		snprintf(soft, sizeof soft, d > 0 ? "%g s" : "none", d);
	else
		snprintf(soft, sizeof soft, "-");
	snprintf(buf, len, "max tasks per child %s, max memory per child %s, time limit %s (soft %s)", tasks, mem, hard,
	         soft);
}

static void
status_print_supervisor(const struct ctl *ctl, const msgpack_object *sup)
{
	char pid[32], version[64], uptime[32], sock[512], pool[32], workers[32], conc[32], queues[1024], limits[256],
	    logfile[512], state[32], capital[32];
	out_field_int(sup, PROTO_F_PID, pid, sizeof pid);
	out_field_str(sup, PROTO_F_VERSION, version, sizeof version);
	out_field_duration(sup, PROTO_F_UPTIME_S, uptime, sizeof uptime);
	out_field_str(sup, PROTO_F_SOCKET, sock, sizeof sock);
	out_field_str(sup, PROTO_F_POOL, pool, sizeof pool);
	out_field_int(sup, PROTO_F_WORKERS, workers, sizeof workers);
	out_field_int(sup, PROTO_F_CONCURRENCY, conc, sizeof conc);
	status_fmt_queues(sup, queues, sizeof queues);
	status_fmt_limits(proto_map_get(sup, PROTO_F_LIMITS), limits, sizeof limits);
	out_field_str(sup, PROTO_F_LOG_FILE, logfile, sizeof logfile);
	out_field_str(sup, PROTO_F_STATE, state, sizeof state);
	out_capitalise(capital, sizeof capital, state);

	printf("Supervisor: sparkd\n");
	printf("  PID: %s\n", pid);
	printf("  Version: %s\n", version);
	printf("  State: %s%s%s\n", out_color(ctl, out_state_color(state)), capital, out_reset(ctl));
	printf("  Uptime: %s\n", uptime);
	printf("  Socket: %s\n", sock);
	printf("  Pool: %s (workers %s, concurrency %s)\n", pool, workers, conc);
	printf("  Queues: %s\n", queues);
	printf("  Limits: %s\n", limits);
	printf("  Log File: %s\n", logfile);
	out_celery_supervisor(ctl, proto_map_get(sup, PROTO_F_CELERY));
	printf("\n");
}

static void
status_print_process(const struct ctl *ctl, const msgpack_object *p)
{
	char pid[32], state[32], capital[32], rss[32], processed[32], restarts[32], last[128], problem[256];
	int64_t kib = -1;
	out_field_int(p, PROTO_F_PID, pid, sizeof pid);
	out_field_str(p, PROTO_F_STATE, state, sizeof state);
	out_capitalise(capital, sizeof capital, state);
	if (proto_get_int(p, PROTO_F_RSS_KIB, &kib) != 1)
		kib = -1;
	out_fmt_rss(rss, sizeof rss, kib);
	out_field_int(p, PROTO_F_PROCESSED, processed, sizeof processed);
	out_field_int(p, PROTO_F_RESTARTS, restarts, sizeof restarts);
	out_fmt_exit(last, sizeof last, proto_map_get(p, PROTO_F_LAST_EXIT));

	printf("  Process %s: %s%s%s, RSS %s, processed %s, restarts %s, last restart: %s\n", pid,
	       out_color(ctl, out_state_color(state)), capital, out_reset(ctl), rss, processed, restarts, last);
	if (proto_get_str(p, PROTO_F_PROBLEM, problem, sizeof problem) == 1 && problem[0] != '\0') {
		out_sanitize(problem);
		printf("    Problem: %s\n", problem);
	}
	const msgpack_object *tasks = proto_map_get(p, PROTO_F_ACTIVE_TASKS);
	if (tasks == NULL || tasks->type != MSGPACK_OBJECT_ARRAY)
		return;
	for (uint32_t i = 0; i < tasks->via.array.size; i++) {
		const msgpack_object *t = &tasks->via.array.ptr[i];
		/* whole: workers accept ids up to 16 KiB and names up to 1 KiB */
		char id[16385], name[1025], runtime[32];
		double rt;
		out_field_str(t, PROTO_F_ID, id, sizeof id);
		out_field_str(t, PROTO_F_NAME, name, sizeof name);
		if (proto_get_double(t, PROTO_F_RUNTIME_S, &rt) == 1 && isfinite(rt))
			snprintf(runtime, sizeof runtime, "%.1f s", rt);
		else
			snprintf(runtime, sizeof runtime, "-");
		printf("    Task %s: %s, running %s\n", id, name, runtime);
	}
}

static void
status_print_worker(const struct ctl *ctl, const msgpack_object *w, bool verbose)
{
	char name[256], state[32], capital[32], conc[32], processed[32], active[32], uptime[32];
	out_field_str(w, PROTO_F_NAME, name, sizeof name);
	out_field_str(w, PROTO_F_STATE, state, sizeof state);
	out_capitalise(capital, sizeof capital, state);
	out_field_int(w, PROTO_F_CONCURRENCY, conc, sizeof conc);
	out_field_int(w, PROTO_F_PROCESSED, processed, sizeof processed);
	out_field_int(w, PROTO_F_ACTIVE, active, sizeof active);
	out_field_duration(w, PROTO_F_UPTIME_S, uptime, sizeof uptime);

	/* the guide's six lines, word for word */
	printf("Worker: %s\n", name);
	printf("Status: %s%s%s\n", out_color(ctl, out_state_color(state)), capital, out_reset(ctl));
	printf("Concurrency: %s\n", conc);
	printf("Tasks Processed: %s\n", processed);
	printf("Active Tasks: %s\n", active);
	printf("Uptime: %s\n", uptime);
	out_celery_worker(ctl, proto_map_get(w, PROTO_F_CELERY), verbose);
	if (!verbose)
		return;

	char pool[32], restarts[32];
	out_field_str(w, PROTO_F_POOL, pool, sizeof pool);
	out_field_int(w, PROTO_F_RESTARTS, restarts, sizeof restarts);
	printf("Pool: %s\n", pool);
	printf("Restarts: %s\n", restarts);
	const msgpack_object *procs = proto_map_get(w, PROTO_F_PROCESSES);
	if (procs == NULL || procs->type != MSGPACK_OBJECT_ARRAY || procs->via.array.size == 0) {
		printf("Processes: -\n");
		return;
	}
	printf("Processes:\n");
	for (uint32_t i = 0; i < procs->via.array.size; i++)
		status_print_process(ctl, &procs->via.array.ptr[i]);
}

int
cmd_status(struct ctl *ctl, const struct ctl_args *a)
{
	bool json = a->set[OPT_JSON];
	bool verbose = a->set[OPT_VERBOSE];
	/* JSON is for machines: give them everything the daemon knows */
	bool ask_verbose = verbose || json;

	struct ctl_client c;
	int rc = ctl_connect_or_report(ctl, &c);
	if (rc != CTL_EXIT_OK)
		return rc;

	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	const msgpack_object *res = NULL;
	char err[768] = "";
	enum ctl_result r = ctl_client_call(&c, PROTO_M_STATUS, status_pack, &ask_verbose, STATUS_TIMEOUT_MS, &reply,
	                                    &res, err, sizeof err);
	ctl_client_close(&c);
	if (r != CTL_OK) {
		msgpack_unpacked_destroy(&reply);
		return ctl_report_failure(ctl, r, err);
	}
	if (res == NULL || res->type != MSGPACK_OBJECT_MAP) {
		msgpack_unpacked_destroy(&reply);
		out_err(ctl, "malformed status reply from sparkd (not a map)");
		return CTL_EXIT_ERROR;
	}

	if (json) {
		rc = out_print_json(res, true) == 0 ? CTL_EXIT_OK : CTL_EXIT_ERROR;
		if (rc != CTL_EXIT_OK)
			out_err(ctl, "cannot convert the status reply to JSON");
		msgpack_unpacked_destroy(&reply);
		return rc;
	}

	if (verbose)
		status_print_supervisor(ctl, proto_map_get(res, PROTO_F_SUPERVISOR));
	const msgpack_object *workers = proto_map_get(res, PROTO_F_WORKERS);
	if (workers == NULL || workers->type != MSGPACK_OBJECT_ARRAY || workers->via.array.size == 0) {
		char state[32];
		out_field_str(proto_map_get(res, PROTO_F_SUPERVISOR), PROTO_F_STATE, state, sizeof state);
		printf("No workers (sparkd state: %s)\n", state);
	} else {
		for (uint32_t i = 0; i < workers->via.array.size; i++) {
			if (i > 0)
				printf("\n");
			status_print_worker(ctl, &workers->via.array.ptr[i], verbose);
		}
	}
	msgpack_unpacked_destroy(&reply);
	return CTL_EXIT_OK;
}

/*
 * sparkctl stop: ask for a warm (or, with --force, cold) stop, then wait until the daemon closes the connection
 * and its process is gone, so that `stop && start` never races the old supervisor.
 */
#include "sparkctl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "util.h"

/* Beyond the daemon's own escalation timeout: its cold stop and exit must fit in this margin. */
#define STOP_MARGIN_S 15.0
/* What the daemon uses when no --timeout is given: the hard time limit plus this (DESIGN §3). */
#define STOP_DAEMON_EXTRA_S       10.0
#define STOP_DEFAULT_TIME_LIMIT_S 300.0

struct stop_params {
	bool force;
	bool has_timeout;
	double timeout_s;
};

static void
stop_pack(msgpack_packer *pk, void *arg)
{
	const struct stop_params *p = arg;
	msgpack_pack_map(pk, p->has_timeout ? 2 : 1);
	proto_pack_kv_bool(pk, PROTO_P_FORCE, p->force);
	if (p->has_timeout)
		proto_pack_kv_double(pk, PROTO_P_TIMEOUT_S, p->timeout_s);
}

static void
status_pack(msgpack_packer *pk, void *arg)
{
	(void)arg;
	msgpack_pack_map(pk, 1);
	proto_pack_kv_bool(pk, PROTO_P_VERBOSE, false);
}

/*
 * The daemon's pid and hard time limit, from a status call: the pid lets us wait for the process to be gone, the
 * limit tells how long its warm stop may take. Failures leave the defaults.
 */
static enum ctl_result
stop_probe(struct ctl_client *c, int64_t *pid, double *time_limit)
{
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	const msgpack_object *res = NULL;
	char err[256];
	enum ctl_result r = ctl_client_call(c, PROTO_M_STATUS, status_pack, NULL, 10000, &reply, &res, err, sizeof err);
	if (r == CTL_OK) {
		const msgpack_object *sup = proto_map_get(res, PROTO_F_SUPERVISOR);
		double tl;
		if (proto_get_int(sup, PROTO_F_PID, pid) != 1)
			*pid = 0;
		if (proto_get_double(proto_map_get(sup, PROTO_F_LIMITS), PROTO_F_TIME_LIMIT, &tl) == 1 &&
		    isfinite(tl) && tl >= 0)
			*time_limit = tl;
	}
	msgpack_unpacked_destroy(&reply);
	return r;
}

/*
 * The daemon hung up without answering. Either it was exiting anyway (then the socket soon refuses: success), or it
 * refused this peer (its credentials check): that must not pass for a stop.
 */
static int
stop_after_hangup(struct ctl *ctl)
{
	const char *path = ctl_socket_path(ctl);
	double until = now_mono() + 2.0;
	char err[512];
	while (now_mono() < until && !ctl_was_interrupted()) {
		struct ctl_client c;
		enum ctl_result r = ctl_client_open(&c, path, 1000, err, sizeof err);
		if (r == CTL_NOT_RUNNING) {
			if (ctl->tty)
				printf("sparkd stopped\n");
			return CTL_EXIT_OK;
		}
		if (r == CTL_OK)
			ctl_client_close(&c);
		struct timespec ts = {0, 100 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	out_err(
	    ctl,
	    "sparkd at %s closed the connection without answering: this user may not use it (root, the daemon's user "
	    "and the socket's group may); see sparkd's log",
	    path);
	return CTL_EXIT_ERROR;
}

/* Gone, or a zombie its parent has not reaped yet (a foreground sparkd under a test harness or a shell). */
static bool
stop_pid_gone(int64_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
	FILE *f = fopen(path, "r");
	if (f == NULL)
		return true;
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = '\0';
	const char *rp = strrchr(buf, ')');
	return rp == NULL || rp[1] == '\0' || rp[2] == 'Z' || rp[2] == 'X';
}

/* After the socket closed: the process may still be unlinking its socket and pid file. */
static bool
stop_wait_gone(int64_t pid, double deadline)
{
	if (pid <= 0)
		return true;
	for (;;) {
		if (stop_pid_gone(pid))
			return true;
		if (now_mono() >= deadline || ctl_was_interrupted())
			return false;
		struct timespec ts = {0, 20 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}

int
cmd_stop(struct ctl *ctl, const struct ctl_args *a)
{
	struct ctl_client c;
	int rc = ctl_connect_or_report(ctl, &c);
	if (rc != CTL_EXIT_OK)
		return rc;
	ctl_catch_interrupt();

	struct stop_params p = {
	    .force = a->set[OPT_FORCE], .has_timeout = a->set[OPT_TIMEOUT], .timeout_s = a->num[OPT_TIMEOUT]};
	int64_t pid = 0;
	double time_limit = STOP_DEFAULT_TIME_LIMIT_S;
	if (stop_probe(&c, &pid, &time_limit) == CTL_EOF) {
		ctl_client_close(&c);
		return stop_after_hangup(ctl);
	}
	/*
	 * Wait for the pid only when it is the listener we are connected to, as our pid namespace sees it: under socket
	 * activation the listener is systemd, and across namespaces the number would name another process.
	 */
	if (pid != c.peer_pid)
		pid = 0;

	/* how long we wait: always past the daemon's escalation; no hard limit means no bound on a warm stop */
	double wait_s;
	if (p.has_timeout)
		wait_s = p.timeout_s + STOP_MARGIN_S;
	else if (p.force)
		wait_s = STOP_MARGIN_S + STOP_DAEMON_EXTRA_S;
	else if (time_limit > 0)
		wait_s = time_limit + STOP_DAEMON_EXTRA_S + STOP_MARGIN_S;
	else
		wait_s = -1;
	double deadline = wait_s < 0 ? 0 : now_mono() + wait_s;

	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	const msgpack_object *res = NULL;
	char err[768] = "";
	enum ctl_result r = ctl_client_call(&c, PROTO_M_STOP, stop_pack, &p, 10000, &reply, &res, err, sizeof err);
	msgpack_unpacked_destroy(&reply);
	if (r == CTL_FAILED && strcmp(c.errcode, PROTO_E_PERMISSION) == 0) {
		out_err(ctl, "permission denied: only root or the daemon's user may stop it");
		ctl_client_close(&c);
		return CTL_EXIT_ERROR;
	}
	if (r == CTL_EOF) {
		ctl_client_close(&c);
		return stop_after_hangup(ctl);
	}
	/* already stopping (someone else asked): waiting for the end is still what the caller wants */
	bool already = r == CTL_FAILED && strcmp(c.errcode, PROTO_E_STOPPING) == 0;
	if (r != CTL_OK && !already) {
		ctl_client_close(&c);
		return ctl_report_failure(ctl, r, err);
	}

	while (r != CTL_EOF) {
		int left;
		if (deadline > 0) {
			double l = (deadline - now_mono()) * 1000.0;
			left = l <= 0 ? 0 : (int)l;
			if (left == 0) {
				r = CTL_TIMEOUT;
				break;
			}
		} else {
			left = -1;
		}
		msgpack_unpacked msg;
		msgpack_unpacked_init(&msg);
		r = ctl_client_next(&c, left, &msg, err, sizeof err);
		msgpack_unpacked_destroy(&msg);
		if (r != CTL_OK && r != CTL_EOF)
			break;
	}
	ctl_client_close(&c);

	/* the socket closes as the daemon exits: what is left is short, whatever the stop timeout */
	double gone_by = now_mono() + STOP_MARGIN_S;
	if (deadline > 0 && deadline < gone_by)
		gone_by = deadline;
	if (r == CTL_EOF && !stop_wait_gone(pid, gone_by))
		r = ctl_was_interrupted() ? CTL_INTERRUPTED : CTL_TIMEOUT;
	switch (r) {
	case CTL_EOF:
		if (ctl->tty)
			printf("sparkd stopped\n");
		return CTL_EXIT_OK;
	case CTL_TIMEOUT:
		if (pid > 0)
			out_err(ctl, "sparkd (pid %lld) is still running after %.0f s; try '%s' or check its log",
			        (long long)pid, wait_s,
			        ctl->guide_grammar ? "automagik-spark workers stop --force" : "sparkctl stop --force");
		else
			out_err(ctl, "sparkd is still running after %.0f s; try '%s' or check its log", wait_s,
			        ctl->guide_grammar ? "automagik-spark workers stop --force" : "sparkctl stop --force");
		return CTL_EXIT_ERROR;
	case CTL_INTERRUPTED:
		out_err(ctl, "interrupted; sparkd goes on stopping on its own");
		return CTL_EXIT_ERROR;
	default:
		return ctl_report_failure(ctl, r, err);
	}
}

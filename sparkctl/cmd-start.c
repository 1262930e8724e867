/*
 * sparkctl start: validate the configuration here (so a bad value is refused before any process starts), refuse
 * when a sparkd already answers, then become sparkd: `--daemon` returns when every worker is ready, and its exit
 * status is ours because we exec it. Under a supervisor that watches the process it started (supervisord, a
 * container) we exec sparkd in the foreground instead, so that its pid is the one that supervisor watches.
 */
#include "sparkctl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "util.h"

/* The flags that are configuration, with the variable each one sets (DESIGN §5). */
static const struct {
	enum ctl_optid id;
	const char *var;
} start_vars[] = {
    {OPT_WORKERS, "SPARK_WORKERS"},   {OPT_CONCURRENCY, "CELERY_WORKER_CONCURRENCY"},
    {OPT_POOL, "CELERY_WORKER_POOL"}, {OPT_LOGLEVEL, "SPARK_LOGLEVEL"},
    {OPT_QUEUES, "SPARK_QUEUES"},     {OPT_SOCKET, "SPARK_SOCKET"},
};

#define NSTART_VARS (sizeof start_vars / sizeof start_vars[0])

/* Is a sparkd already serving this socket? 1 yes (reported), 0 no, -1 failed (reported). */
static int
start_check_running(struct ctl *ctl, const char *path)
{
	struct ctl_client c;
	char err[512] = "";
	enum ctl_result r = ctl_client_open(&c, path, 2000, err, sizeof err);
	if (r == CTL_NOT_RUNNING)
		return 0;
	if (r != CTL_OK) {
		out_err(ctl, "%s", err);
		return -1;
	}
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	const msgpack_object *res = NULL;
	r = ctl_client_call(&c, PROTO_M_PING, NULL, NULL, 3000, &reply, &res, err, sizeof err);
	int64_t pid = 0;
	if (r == CTL_OK && proto_get_int(res, PROTO_F_PID, &pid) == 1)
		out_err(ctl, "sparkd is already running (pid %lld) on %s", (long long)pid, path);
	else if (r == CTL_OK)
		out_err(ctl, "sparkd is already running on %s", path);
	else if (r == CTL_EOF)
		/* a listener that hangs up at once: most likely a sparkd that is just exiting */
		out_err(ctl, "something listens on %s but closed the connection; wait for it to exit and retry", path);
	else
		out_err(ctl, "something listens on %s but does not answer like sparkd (%s); stop it first", path, err);
	msgpack_unpacked_destroy(&reply);
	ctl_client_close(&c);
	return 1;
}

static bool
start_in_container(void)
{
	const char *c = getenv("container"); /* systemd-nspawn, podman, LXC */
	return access("/.dockerenv", F_OK) == 0 || access("/run/.containerenv", F_OK) == 0 || (c != NULL && *c);
}

/*
 * Why `start` must stay in the foreground without --foreground, or NULL to daemonize. A supervisor that started us
 * watches the process it started: if that returns, supervisord restarts it (and ends FATAL while an orphaned
 * daemon runs on) and a container stops. A container's main process is PID 1, or the child of an init such as
 * tini (`docker run --init`, compose `init: true`) or of a shell-form CMD; a shell opened with `docker exec`
 * is not PID 1, so `start` typed there daemonizes as on a host. A systemd unit (INVOCATION_ID) is the guide's
 * Type=forking one even inside a container: systemd waits for the fork.
 */
static const char *
start_foreground_reason(void)
{
	if (getenv("SUPERVISOR_ENABLED") != NULL)
		return "under supervisord";
	if (getpid() == 1)
		return "as PID 1";
	if (getenv("INVOCATION_ID") != NULL)
		return NULL;
	if (getppid() == 1 && start_in_container())
		return "as the container's main process";
	return NULL;
}

int
cmd_start(struct ctl *ctl, const struct ctl_args *a)
{
	struct config_override ov[NSTART_VARS + 1];
	size_t nov = 0;
	if (a->set[OPT_EVENTS])
		ov[nov++] = (struct config_override){"CELERY_WORKER_SEND_TASK_EVENTS", "--events", "True"};
	for (size_t i = 0; i < NSTART_VARS; i++) {
		if (!a->set[start_vars[i].id])
			continue;
		ov[nov].var = start_vars[i].var;
		ov[nov].flag = ctl_optspec_get(start_vars[i].id)->name;
		ov[nov].value = a->str[start_vars[i].id];
		nov++;
	}
	const char *env_file = a->set[OPT_ENV_FILE] ? a->str[OPT_ENV_FILE] : NULL;

	struct spark_config cfg;
	char err[768] = "";
	if (config_load(&cfg, ov, nov, env_file, err, sizeof err) < 0) {
		out_err(ctl, "%s", err);
		return CTL_EXIT_ERROR;
	}
	int running = start_check_running(ctl, cfg.socket_path);
	config_free(&cfg);
	if (running != 0)
		return CTL_EXIT_ERROR;

	char *sparkd = ctl_find_program("sparkd");
	if (sparkd == NULL) {
		out_err(ctl,
		        "cannot find sparkd next to %s, in ../sbin or on PATH; install it or add its directory to PATH",
		        ctl->prog);
		return CTL_EXIT_ERROR;
	}

	/* the options exactly as given, so sparkd resolves them with the same precedence we just checked */
	const char *argv[2 * NSTART_VARS + 7];
	size_t n = 0;
	argv[n++] = "sparkd";
	for (size_t i = 0; i < NSTART_VARS; i++) {
		if (!a->set[start_vars[i].id])
			continue;
		argv[n++] = ctl_optspec_get(start_vars[i].id)->name;
		argv[n++] = a->str[start_vars[i].id];
	}
	if (env_file != NULL) {
		argv[n++] = "--env-file";
		argv[n++] = env_file;
	}
	if (a->set[OPT_EVENTS])
		argv[n++] = "--events";
	const char *why = a->set[OPT_FOREGROUND] ? NULL : start_foreground_reason();
	if (why != NULL)
		/* said once, so that the supervisor's log tells why no daemon was forked */
		out_err(ctl, "staying in the foreground %s; SIGTERM stops the workers warm", why);
	else if (!a->set[OPT_FOREGROUND])
		argv[n++] = "--daemon";
	argv[n] = NULL;

	fflush(stdout);
	fflush(stderr);
	execv(sparkd, (char *const *)argv);
	out_err(ctl, "cannot run %s: %s", sparkd, strerror(errno));
	free(sparkd);
	return CTL_EXIT_ERROR;
}

/*
 * sparkd: options, configuration, daemonizing, signals and the loop. See sparkd.h for the parts.
 */
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rundir.h"
#include "sparkd.h"
#include "url.h"

/* The one global: lets an exit through fatal() still record what was said (atexit has no argument). */
static struct sparkd *sd_bridge;

static void
usage(FILE *f)
{
	fprintf(f, "usage: sparkd [--workers N] [--concurrency N] [--pool prefork|threads|solo] [--loglevel LEVEL]\n"
	           "              [--queues a,b] [--events|-E] [--env-file FILE] [--socket PATH] [--daemon]\n"
	           "       sparkd --help | --version\n"
	           "\n"
	           "The spark worker supervisor: runs spark-worker processes, restarts them, captures their logs and\n"
	           "serves the control socket that sparkctl talks to. Foreground unless --daemon, which returns once\n"
	           "every worker is ready. Settings come from flags, then the environment, then the env file.\n");
}

static char *
abs_path(const char *p)
{
	if (p == NULL || p[0] == '/')
		return p ? xstrdup(p) : NULL;
	char *cwd = getcwd(NULL, 0);
	if (cwd == NULL)
		return xstrdup(p);
	char *r = xasprintf("%s/%s", cwd, p);
	free(cwd);
	return r;
}

static void
make_abs(char **p)
{
	char *a = abs_path(*p);
	free(*p);
	*p = a;
}

static void
start_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sparkd *sd = arg;
	if (sd->ready || sd->state == SD_STOPPING)
		return;
	char why[600];
	sup_not_ready_reason(sd, why, sizeof why);
	if (sd->ready_fd < 0) {
		log_warnx("not every worker is ready after %gs (%s); still trying", sd->cfg.start_timeout, why);
		return;
	}
	char msg[900];
	snprintf(msg, sizeof msg, "workers not ready within %gs (SPARK_START_TIMEOUT): %s; stopped",
	         sd->cfg.start_timeout, why);
	log_errorx("%s", msg);
	sd_ready_fail(sd, msg);
	sd->exit_code = 1;
	sup_stop(sd, false, 5);
}

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
	sup_tick(arg);
}

static void
signal_cb(evutil_socket_t sig, short what, void *arg)
{
	struct sparkd *sd = arg;
	switch (sig) {
	case SIGCHLD:
		sup_reap(sd);
		break;
	case SIGTERM:
		log_info("SIGTERM: warm stop");
		sup_stop(sd, false, -1);
		break;
	case SIGINT:
		if (++sd->nint == 1) {
			log_info("SIGINT: warm stop (again for a cold stop)");
			sup_stop(sd, false, -1);
		} else {
			log_info("second SIGINT: cold stop");
			sup_stop(sd, true, -1);
		}
		break;
	case SIGQUIT:
		log_info("SIGQUIT: cold stop");
		sup_stop(sd, true, -1);
		break;
	case SIGHUP:
		logcap_reopen(sd);
		break;
	}
}

/* --daemon: the parent waits for "ready" (exit 0) or a reason (printed, exit 1); the child goes on. */
static void
daemonize(struct sparkd *sd)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) {
		fprintf(stderr, "sparkd: pipe: %s\n", strerror(errno));
		exit(1);
	}
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	if (pid < 0) {
		fprintf(stderr, "sparkd: fork: %s\n", strerror(errno));
		exit(1);
	}
	if (pid > 0) {
		close(p[1]);
		char buf[1200];
		size_t len = 0;
		for (;;) {
			ssize_t n = read(p[0], buf + len, sizeof buf - 1 - len);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			len += (size_t)n;
			if (len >= sizeof buf - 1)
				break;
		}
		buf[len] = '\0';
		if (len > 0 && buf[0] == PROTO_READY_OK)
			exit(0);
		if (len > 1 && buf[0] == PROTO_READY_FAIL)
			fprintf(stderr, "sparkd: %s\n", buf + 1);
		else
			fprintf(stderr, "sparkd: the daemon exited during startup; see %s/sparkd.log\n",
			        sd->cfg.log_dir);
		exit(1);
	}
	close(p[0]);
	sd->ready_fd = p[1];
	if (setsid() < 0) {
		/* already a group leader cannot happen after fork; keep going */
	}
	if (chdir("/") < 0) {
		/* not fatal: paths are absolute */
	}
	int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (nul >= 0) {
		dup2(nul, STDIN_FILENO);
		dup2(nul, STDOUT_FILENO);
		close(nul);
	}
	sd->daemon = true;
}

static void
bridge_atexit(void)
{
	if (sd_bridge != NULL && sd_bridge->lc.self != NULL)
		logcap_flush_self(sd_bridge);
}

int
main(int argc, char **argv)
{
	/* one option a line, so option changes merge */
	/* clang-format off */
	static const struct option longopts[] = {
	    {"workers", required_argument, NULL, 'w'},
	    {"concurrency", required_argument, NULL, 'c'},
	    {"pool", required_argument, NULL, 'P'},
	    {"loglevel", required_argument, NULL, 'l'},
	    {"queues", required_argument, NULL, 'Q'},
	    {"env-file", required_argument, NULL, 'e'},
	    {"socket", required_argument, NULL, 's'},
	    {"daemon", no_argument, NULL, 'd'},
	    {"events", no_argument, NULL, 'E'},
	    {"help", no_argument, NULL, 'h'},
	    {"version", no_argument, NULL, 'V'},
	    {NULL, 0, NULL, 0},
	};
	/* clang-format on */
	struct config_override ov[8];
	size_t nov = 0;
	const char *env_file = NULL;
	bool daemon_mode = false;
	int ch;
	while ((ch = getopt_long(argc, argv, "+E", longopts, NULL)) != -1) {
		const char *var = NULL, *flag = NULL;
		switch (ch) {
		case 'w':
			var = "SPARK_WORKERS", flag = "--workers";
			break;
		case 'c':
			var = "CELERY_WORKER_CONCURRENCY", flag = "--concurrency";
			break;
		case 'P':
			var = "CELERY_WORKER_POOL", flag = "--pool";
			break;
		case 'l':
			var = "SPARK_LOGLEVEL", flag = "--loglevel";
			break;
		case 'Q':
			var = "SPARK_QUEUES", flag = "--queues";
			break;
		case 's':
			var = "SPARK_SOCKET", flag = "--socket";
			break;
		case 'e':
			env_file = optarg;
			break;
		case 'd':
			daemon_mode = true;
			break;
		case 'E':
			var = "CELERY_WORKER_SEND_TASK_EVENTS", flag = "--events";
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("sparkd %s (protocol %d)\n", SPARK_VERSION, SPARK_PROTOCOL_VERSION);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
		if (var != NULL) {
			/* a flag given twice: the last one wins */
			size_t i;
			for (i = 0; i < nov && strcmp(ov[i].var, var) != 0; i++)
				;
			/* --events is a flag: it sets its variable to True */
			ov[i] = (struct config_override){var, flag, ch == 'E' ? "True" : optarg};
			if (i == nov)
				nov++;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "sparkd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}

	struct sparkd sdv;
	memset(&sdv, 0, sizeof sdv);
	struct sparkd *sd = &sdv;
	sd->listen_fd = -1;
	sd->spare_fd = -1;
	sd->ready_fd = -1;
	sd->lc.file_fd = -1;
	sd->lc.echo_fd = -1;
	sd->sys.listen_fd = -1;
	sd->sys.notify_fd = -1;

	log_init(SD_SELF_NAME, SPARK_LOG_INFO);
	char err[1024];
	if (config_load(&sd->cfg, ov, nov, env_file, err, sizeof err) < 0) {
		fprintf(stderr, "sparkd: %s\n", err);
		return 1;
	}
	log_set_level(sd->cfg.loglevel);
	sd->worker_path = spawn_find_worker(NULL);
	if (sd->worker_path == NULL) {
		fprintf(stderr, "sparkd: cannot find spark-worker next to sparkd or on PATH; install it with sparkd\n");
		config_free(&sd->cfg);
		return 1;
	}
	make_abs(&sd->cfg.socket_path);
	make_abs(&sd->cfg.log_dir);
	make_abs(&sd->cfg.pid_file);
	sd->sock_path = xstrdup(sd->cfg.socket_path);

	signal(SIGPIPE, SIG_IGN);
	if (daemon_mode)
		daemonize(sd);
	umask(027);
	sd->pid = getpid();
	sd->uid = getuid();
	sd->started_wall = now_wall();
	sd->started_mono = now_mono();
	sd->state = SD_STARTING;
	TAILQ_INIT(&sd->clients);
	LIST_INIT(&sd->lc.readers);

	sd->base = event_base_new();
	if (sd->base == NULL)
		sd_startup_fail(sd, "cannot create the event loop");
	if (sys_init(sd, err, sizeof err) < 0)
		sd_startup_fail(sd, "%s", err);
	if (ctl_listen(sd, err, sizeof err) < 0)
		sd_startup_fail(sd, "%s", err);
	sd_pidfile_write(sd);
	/* the log goes in the fallback when nothing better is known: the same check as the socket's */
	if (rundir_in_fallback(sd->cfg.log_dir) && rundir_prepare(sd->cfg.log_dir, 0750, "log", err, sizeof err) < 0)
		sd_startup_fail(sd, "%s (set SPARK_LOG_DIR)", err);
	if (logcap_init(sd, err, sizeof err) < 0)
		sd_startup_fail(sd, "%s", err);
	sd_bridge = sd;
	atexit(bridge_atexit);
	config_export(&sd->cfg);

	char *broker = url_redact(sd->cfg.broker_url);
	log_info("sparkd %s starting: %d worker%s x %d (%s), queues %s%s, broker %s, socket %s%s", SPARK_VERSION,
	         sd->cfg.workers, sd->cfg.workers == 1 ? "" : "s", sd->cfg.concurrency, pool_name(sd->cfg.pool),
	         sd->cfg.queues[0], sd->cfg.nqueues > 1 ? ",..." : "", broker, sd->sock_path,
	         sd->listen_owned ? "" : " (from systemd)");
	free(broker);
	if (sd->cfg.concurrency_forced)
		log_warnx("the solo pool runs one task at a time per worker: concurrency set to 1");

	static const int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP};
	for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
		sd->sig_ev[i] = evsignal_new(sd->base, sigs[i], signal_cb, sd);
		if (sd->sig_ev[i] == NULL || event_add(sd->sig_ev[i], NULL) < 0)
			sd_startup_fail(sd, "cannot watch signal %d", sigs[i]);
	}
	sd->tick_ev = event_new(sd->base, -1, EV_PERSIST, tick_cb, sd);
	sd->start_timeout_ev = evtimer_new(sd->base, start_timeout_cb, sd);
	if (sd->tick_ev == NULL || sd->start_timeout_ev == NULL)
		sd_startup_fail(sd, "out of memory (timers)");
	struct timeval tick = {(time_t)SD_TICK, 0};
	event_add(sd->tick_ev, &tick);
	double st = sd->cfg.start_timeout;
	struct timeval stv = {(time_t)st, (suseconds_t)((st - (double)(time_t)st) * 1e6)};
	evtimer_add(sd->start_timeout_ev, &stv);

	sup_init(sd);
	celery_init(sd);
	sup_start_all(sd);
	celery_start(sd);
	sys_start_watchdog(sd);
	sys_notify_status(sd);

	event_base_dispatch(sd->base);

	int code = sd->exit_code;
	sd_bridge = NULL;
	sd_cleanup(sd);
	return code;
}

/* Startup, readiness and shutdown of the supervisor as a whole. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rundir.h"
#include "sparkd.h"

static void
pidfile_remove(struct sparkd *sd)
{
	if (sd->pid_written)
		unlink(sd->cfg.pid_file);
	sd->pid_written = false;
}

void
sd_startup_fail(struct sparkd *sd, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (sd->lc.self != NULL) {
		log_errorx("%s", msg);
		logcap_flush_self(sd);
	} else if (sd->ready_fd < 0) {
		fprintf(stderr, "sparkd: %s\n", msg);
	}
	sd_ready_fail(sd, msg);
	ctl_close_listener(sd);
	pidfile_remove(sd);
	exit(1);
}

/* Tell the waiting --daemon parent why startup failed (it prints msg and exits 1); nothing when none waits. */
void
sd_ready_fail(struct sparkd *sd, const char *msg)
{
	if (sd->ready_fd < 0)
		return;
	char buf[1100];
	int n = snprintf(buf, sizeof buf, "%c%s", PROTO_READY_FAIL, msg);
	ssize_t w = write(sd->ready_fd, buf, n < (int)sizeof buf ? (size_t)n : sizeof buf - 1);
	(void)w;
	close(sd->ready_fd);
	sd->ready_fd = -1;
}

/* Every worker reported ready (once): tell systemd and the waiting --daemon parent; let go of the terminal. */
void
sd_ready(struct sparkd *sd)
{
	sd->ready = true;
	if (sd->state == SD_STARTING)
		sd->state = SD_RUNNING;
	if (sd->start_timeout_ev != NULL)
		evtimer_del(sd->start_timeout_ev);
	int procs = sup_live_procs(sd);
	log_info("ready: %d worker%s, %d process%s", sd->nworkers, sd->nworkers == 1 ? "" : "s", procs,
	         procs == 1 ? "" : "es");
	sys_notify_status(sd);
	sys_notify(sd, "READY=1");
	if (sd->ready_fd >= 0) {
		char ok = PROTO_READY_OK;
		ssize_t w = write(sd->ready_fd, &ok, 1);
		(void)w;
		close(sd->ready_fd);
		sd->ready_fd = -1;
		int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (nul >= 0) {
			dup2(nul, STDIN_FILENO);
			dup2(nul, STDOUT_FILENO);
			close(nul);
		}
		logcap_detach_echo(sd);
	}
}

/* Every worker is gone after a stop: tell the monitors (worker-offline), then leave the loop; main() cleans up. */
void
sd_finish(struct sparkd *sd)
{
	if (sd->finishing)
		return;
	sd->finishing = true;
	celery_stop(sd);
}

void
sd_pidfile_write(struct sparkd *sd)
{
	const char *path = sd->cfg.pid_file;
	const char *slash = strrchr(path, '/');
	if (slash != NULL && slash != path) {
		char *dir = xstrndup(path, (size_t)(slash - path));
		char err[512];
		int rc = rundir_prepare(dir, 0750, "pid file", err, sizeof err);
		free(dir);
		if (rc < 0)
			sd_startup_fail(sd, "%s (set SPARK_PID_FILE)", err);
	}
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		sd_startup_fail(sd, "cannot write the pid file %s: %s (set SPARK_PID_FILE)", path, strerror(errno));
	char buf[32];
	int n = snprintf(buf, sizeof buf, "%d\n", (int)sd->pid);
	if (write(fd, buf, (size_t)n) != n) {
		close(fd);
		sd_startup_fail(sd, "cannot write the pid file %s: %s", path, strerror(errno));
	}
	close(fd);
	sd->pid_written = true;
}

void
sd_cleanup(struct sparkd *sd)
{
	logcap_drain_all(sd);
	sd_ready_fail(sd, "stopped before every worker was ready");
	ctl_close_listener(sd);
	pidfile_remove(sd);
	log_info("sparkd stopped (exit %d)", sd->exit_code);
	logcap_flush_self(sd);
	ctl_free_all(sd);
	if (sd->tick_ev)
		event_free(sd->tick_ev);
	if (sd->start_timeout_ev)
		event_free(sd->start_timeout_ev);
	for (size_t i = 0; i < sizeof sd->sig_ev / sizeof sd->sig_ev[0]; i++)
		if (sd->sig_ev[i])
			event_free(sd->sig_ev[i]);
	celery_free(sd);
	sup_free(sd);
	logcap_free(&sd->lc);
	sys_free(sd);
	event_base_free(sd->base);
	free(sd->worker_path);
	free(sd->sock_path);
	config_free(&sd->cfg);
}

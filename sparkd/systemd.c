/*
 * systemd glue without libsystemd (DESIGN §8): socket activation (LISTEN_FDS), readiness and status
 * (NOTIFY_SOCKET), the watchdog, and journal priority prefixes (JOURNAL_STREAM). The protocols are small.
 */
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sparkd.h"

#define SD_LISTEN_FDS_START 3

/* The variables systemd hands us; none of them may reach a worker. */
static const char *const sys_vars[] = {
    "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
};

void
sys_scrub_env(void)
{
	for (size_t i = 0; i < sizeof sys_vars / sizeof sys_vars[0]; i++)
		unsetenv(sys_vars[i]);
}

/* Is fd a listening AF_UNIX stream socket? */
static bool
is_unix_listener(int fd)
{
	int type = 0, domain = 0, acc = 0;
	socklen_t l1 = sizeof type, l2 = sizeof domain, l3 = sizeof acc;
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l1) == 0 && type == SOCK_STREAM &&
	       getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l2) == 0 && domain == AF_UNIX &&
	       getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l3) == 0 && acc == 1;
}

static int
sys_listen_fds(struct sparkd *sd, char *err, size_t errlen)
{
	const char *spid = getenv("LISTEN_PID"), *sfds = getenv("LISTEN_FDS");
	long pid, n;
	if (spid == NULL || sfds == NULL || parse_long(spid, &pid) < 0 || pid != (long)getpid())
		return 0;
	if (parse_long(sfds, &n) < 0 || n < 0) {
		snprintf(err, errlen, "socket activation: bad LISTEN_FDS=%s", sfds);
		return -1;
	}
	if (n == 0)
		return 0;
	if (n != 1) {
		snprintf(err, errlen, "socket activation: expected one socket, got LISTEN_FDS=%ld (one ListenStream=)",
		         n);
		return -1;
	}
	int fd = SD_LISTEN_FDS_START;
	if (!is_unix_listener(fd)) {
		snprintf(err, errlen, "socket activation: fd %d is not a listening Unix stream socket", fd);
		return -1;
	}
	fd_set_cloexec(fd);
	sd->sys.listen_fd = fd;
	return 0;
}

/* NOTIFY_SOCKET into an address: a path, or "@name" for the abstract namespace. */
int
sys_notify_addr(const char *path, void *sunp, size_t sunlen, unsigned *addrlen)
{
	struct sockaddr_un *sun = sunp;
	size_t n = strlen(path);
	if (sunlen < sizeof *sun || n < 2 || (path[0] != '/' && path[0] != '@') || n >= sizeof sun->sun_path)
		return -1;
	memset(sun, 0, sizeof *sun);
	sun->sun_family = AF_UNIX;
	memcpy(sun->sun_path, path, n);
	if (path[0] == '@')
		sun->sun_path[0] = '\0';
	/* abstract names are exactly their length; paths too (the NUL is optional) */
	*addrlen = (unsigned)(offsetof(struct sockaddr_un, sun_path) + n);
	return 0;
}

void
sys_notify(struct sparkd *sd, const char *msg)
{
	struct sd_systemd *sy = &sd->sys;
	if (sy->notify_path == NULL)
		return;
	struct sockaddr_un sun;
	unsigned alen;
	if (sys_notify_addr(sy->notify_path, &sun, sizeof sun, &alen) < 0)
		return;
	if (sy->notify_fd < 0) {
		sy->notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (sy->notify_fd < 0) {
			log_warn("sd_notify: socket");
			return;
		}
	}
	if (sendto(sy->notify_fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sun, alen) < 0 && errno != EAGAIN)
		log_debug("sd_notify to %s: %s", sy->notify_path, strerror(errno));
}

/* STATUS= for `systemctl status`, sent only when the text changes. */
void
sys_notify_status(struct sparkd *sd)
{
	char line[256], msg[300];
	sup_status_line(sd, line, sizeof line);
	if (strcmp(line, sd->sys.last_status) == 0)
		return;
	spark_strlcpy(sd->sys.last_status, line, sizeof sd->sys.last_status);
	snprintf(msg, sizeof msg, "STATUS=%s", line);
	sys_notify(sd, msg);
}

static void
watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
	sys_notify(arg, "WATCHDOG=1");
}

void
sys_start_watchdog(struct sparkd *sd)
{
	struct sd_systemd *sy = &sd->sys;
	if (sy->watchdog_s <= 0 || sy->notify_path == NULL)
		return;
	/* half the interval is the rule; a little less keeps scheduling jitter from ever stretching it */
	double half = sy->watchdog_s * 0.4;
	struct timeval tv = {(time_t)half, (suseconds_t)((half - (double)(time_t)half) * 1e6)};
	sy->watchdog_ev = event_new(sd->base, -1, EV_PERSIST, watchdog_cb, sd);
	if (sy->watchdog_ev == NULL)
		fatalx("out of memory (event)");
	event_add(sy->watchdog_ev, &tv);
	sys_notify(sd, "WATCHDOG=1");
}

/*
 * Read what systemd passed (before anything is forked and before stderr is redirected), then remove it from
 * the environment the workers will inherit.
 */
int
sys_init(struct sparkd *sd, char *err, size_t errlen)
{
	struct sd_systemd *sy = &sd->sys;
	sy->listen_fd = -1;
	sy->notify_fd = -1;
	int rc = sys_listen_fds(sd, err, errlen);

	const char *ns = getenv("NOTIFY_SOCKET");
	if (ns != NULL && (ns[0] == '/' || ns[0] == '@') && ns[1] != '\0')
		sy->notify_path = xstrdup(ns);

	const char *wu = getenv("WATCHDOG_USEC"), *wp = getenv("WATCHDOG_PID");
	long usec, wpid;
	if (wu != NULL && parse_long(wu, &usec) == 0 && usec > 0 &&
	    (wp == NULL || (parse_long(wp, &wpid) == 0 && wpid == (long)getpid())))
		sy->watchdog_s = (double)usec / 1e6;

	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;
	if (js != NULL && sscanf(js, "%llu:%llu", &dev, &ino) == 2 && fstat(STDERR_FILENO, &st) == 0 &&
	    (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino) {
		sy->journal = true;
		log_set_journal(true);
	}
	sys_scrub_env();
	return rc;
}

void
sys_free(struct sparkd *sd)
{
	struct sd_systemd *sy = &sd->sys;
	if (sy->watchdog_ev != NULL)
		event_free(sy->watchdog_ev);
	sy->watchdog_ev = NULL;
	if (sy->notify_fd >= 0)
		close(sy->notify_fd);
	sy->notify_fd = -1;
	free(sy->notify_path);
	sy->notify_path = NULL;
}

/*
 * The control socket itself (DESIGN §4): checking for a running sparkd, binding (or adopting systemd's socket),
 * accepting with the peer checks and caps, closing at exit.
 */
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"
#include "rundir.h"

/* The spare descriptor: given up at EMFILE so one more connection can be accepted, taken back when possible. */
static void
spare_take(struct sparkd *sd)
{
	if (sd->spare_fd < 0)
		sd->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

static void
accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sparkd *sd = arg;
	spare_take(sd);
	if (sd->listen_ev != NULL)
		event_add(sd->listen_ev, NULL);
}

/*
 * Out of descriptors: accept with the spare one so the connection is not left in the backlog (where it would wake
 * the loop again at once), or pause accepting for a second when even that fails.
 */
static int
accept_at_emfile(struct sparkd *sd, int lfd)
{
	int fd = -1;
	if (sd->spare_fd >= 0) {
		close(sd->spare_fd);
		sd->spare_fd = -1;
		fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	}
	if (fd < 0) {
		log_warnx("control socket: out of file descriptors; not accepting for 1s");
		event_del(sd->listen_ev);
		struct timeval tv = {1, 0};
		evtimer_add(sd->accept_retry_ev, &tv);
		errno = EMFILE;
	}
	return fd;
}

/* Refused for a cap: the cause goes back at once, without a client, so a refusal costs no more than its accept. */
static void
accept_refuse(struct sparkd *sd, int fd, const struct ucred *cr, const char *why)
{
	int of_uid = ctl_clients_of(sd, cr->uid);
	char msg[256];
	snprintf(msg, sizeof msg, "%s (uid %u holds %d of %d connections; try again later)", why, (unsigned)cr->uid,
	         of_uid, sd->nclients);
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_error_response(&pk, 0, PROTO_E_TOO_MANY, msg);
	/* a fresh socket's buffer takes a few hundred bytes; if not, the close alone says it */
	(void)!send(fd, sb.data, sb.size, MSG_DONTWAIT | MSG_NOSIGNAL);
	msgpack_sbuffer_destroy(&sb);
	close(fd);
	double now = now_mono();
	if (now - sd->capped_logged >= 1) {
		log_warnx("control client refused: pid %d: %s", (int)cr->pid, msg);
		sd->capped_logged = now;
	}
}

static void
accept_cb(evutil_socket_t lfd, short what, void *arg)
{
	struct sparkd *sd = arg;
	spare_take(sd);
	for (int i = 0; i < 32; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0 && (errno == EMFILE || errno == ENFILE))
			fd = accept_at_emfile(sd, lfd);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EMFILE || errno == ENFILE)
				return;
			if (errno == ENOBUFS || errno == ENOMEM) {
				/* the kernel is short of memory: pause accepting for a second instead of spinning */
				log_warn("accept on the control socket; pausing for 1s");
				event_del(sd->listen_ev);
				struct timeval tv = {1, 0};
				evtimer_add(sd->accept_retry_ev, &tv);
				return;
			}
			log_warn("accept on the control socket");
			return;
		}
		struct ucred cr;
		socklen_t sl = sizeof cr;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &sl) < 0) {
			log_warn("control client: SO_PEERCRED");
			close(fd);
			continue;
		}
		/* the group may have been changed since we bound the socket (chgrp, SocketGroup=) */
		struct stat st;
		if (stat(sd->sock_path, &st) == 0)
			sd->sock_gid = st.st_gid;
		bool allowed = ctl_peer_allowed(cr.uid, cr.gid, cr.pid, sd->uid, sd->sock_gid);
		if (!allowed) {
			double now = now_mono();
			if (now - sd->refused_logged >= 1) {
				log_warnx("control client refused: pid %d uid %u is not root, uid %u or in group %u",
				          (int)cr.pid, (unsigned)cr.uid, (unsigned)sd->uid, (unsigned)sd->sock_gid);
				sd->refused_logged = now;
			}
		}
		const char *why =
		    ctl_admit_check(cr.uid, sd->uid, sd->nclients, ctl_clients_of(sd, cr.uid), fd, sd->fd_limit);
		if (why != NULL) {
			accept_refuse(sd, fd, &cr, why);
			continue;
		}
		ctl_client_new(sd, fd, &cr)->refused = !allowed;
	}
}

/* ---- the socket ---- */

static int
sun_fill(struct sockaddr_un *sun, const char *path)
{
	memset(sun, 0, sizeof *sun);
	sun->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sun->sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	spark_strlcpy(sun->sun_path, path, sizeof sun->sun_path);
	return 0;
}

/*
 * Before binding: is a sparkd already serving path? 0 = free (a stale socket is removed), -1 = in use or
 * unusable, with the reason in err. Runs once at startup, before the loop, with short timeouts.
 */
int
ctl_check_running(const char *path, char *err, size_t errlen)
{
	struct stat st;
	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		snprintf(err, errlen, "cannot use the control socket %s: %s", path, strerror(errno));
		return -1;
	}
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "%s exists and is not a socket; remove it or choose another --socket", path);
		return -1;
	}
	struct sockaddr_un sun;
	if (sun_fill(&sun, path) < 0) {
		snprintf(err, errlen, "control socket path too long: %s", path);
		return -1;
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
		int e = errno;
		close(fd);
		if (e == ECONNREFUSED) {
			/* nobody listens: a leftover of a sparkd that died */
			if (unlink(path) < 0 && errno != ENOENT) {
				snprintf(err, errlen, "cannot remove the stale socket %s: %s", path, strerror(errno));
				return -1;
			}
			return 0;
		}
		snprintf(err, errlen, "cannot check the control socket %s: %s", path, strerror(e));
		return -1;
	}
	/* something listens: ask it who it is */
	struct timeval tv = {2, 0};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_request_head(&pk, 1, PROTO_M_PING);
	msgpack_pack_array(&pk, 0);
	ssize_t w = send(fd, sb.data, sb.size, MSG_NOSIGNAL);
	msgpack_sbuffer_destroy(&sb);
	int64_t pid = 0;
	if (w > 0) {
		struct proto_reader rd;
		proto_reader_init(&rd);
		char buf[4096];
		for (int tries = 0; tries < 8 && pid == 0; tries++) {
			ssize_t n = recv(fd, buf, sizeof buf, 0);
			if (n <= 0)
				break;
			if (proto_reader_feed(&rd, buf, (size_t)n) != PROTO_READ_NEED_MORE)
				break;
			msgpack_unpacked u;
			msgpack_unpacked_init(&u);
			if (proto_reader_next(&rd, &u) == PROTO_READ_FRAME) {
				struct proto_message m;
				char e[64];
				if (proto_parse_message(&u.data, &m, e, sizeof e) == 0 && m.type == PROTO_RESPONSE &&
				    proto_get_int(m.result, PROTO_F_PID, &pid) != 1)
					pid = -1;
				if (pid == 0)
					pid = -1;
			}
			msgpack_unpacked_destroy(&u);
		}
		proto_reader_free(&rd);
	}
	close(fd);
	if (pid > 0)
		snprintf(err, errlen, "sparkd is already running (pid %lld) on %s", (long long)pid, path);
	else
		snprintf(err, errlen,
		         "the control socket %s is in use by another program; stop it or choose another --socket",
		         path);
	return -1;
}

int
ctl_listen(struct sparkd *sd, char *err, size_t errlen)
{
	int fd;
	if (sd->sys.listen_fd >= 0) {
		/* socket activation: systemd made it and owns the path */
		fd = sd->sys.listen_fd;
		sd->listen_owned = false;
		struct sockaddr_un sun;
		socklen_t sl = sizeof sun;
		memset(&sun, 0, sizeof sun);
		if (getsockname(fd, (struct sockaddr *)&sun, &sl) == 0 && sl > offsetof(struct sockaddr_un, sun_path) &&
		    sun.sun_path[0] != '\0') {
			free(sd->sock_path);
			sd->sock_path = xstrndup(sun.sun_path, sizeof sun.sun_path);
		}
		fd_set_nonblock(fd);
	} else {
		const char *path = sd->sock_path;
		const char *slash = strrchr(path, '/');
		if (slash != NULL && slash != path) {
			char *dir = xstrndup(path, (size_t)(slash - path));
			int rc = rundir_prepare(dir, 0750, "socket", err, errlen);
			free(dir);
			if (rc < 0)
				return -1;
		}
		if (ctl_check_running(path, err, errlen) < 0)
			return -1;
		struct sockaddr_un sun;
		if (sun_fill(&sun, path) < 0) {
			snprintf(err, errlen, "control socket path too long (at most %zu bytes): %s",
			         sizeof sun.sun_path - 1, path);
			return -1;
		}
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0) {
			snprintf(err, errlen, "socket: %s", strerror(errno));
			return -1;
		}
		mode_t old = umask(0117);
		int rc = bind(fd, (struct sockaddr *)&sun, sizeof sun);
		int e = errno;
		umask(old);
		if (rc < 0) {
			close(fd);
			if (e == EADDRINUSE)
				snprintf(err, errlen, "the control socket %s is in use (another sparkd starting?)",
				         path);
			else
				snprintf(err, errlen, "cannot bind the control socket %s: %s", path, strerror(e));
			return -1;
		}
		if (chmod(path, 0660) < 0 || listen(fd, 128) < 0) {
			snprintf(err, errlen, "cannot listen on %s: %s", path, strerror(errno));
			close(fd);
			unlink(path);
			return -1;
		}
		sd->listen_owned = true;
	}
	sd->listen_fd = fd;
	struct rlimit rl;
	sd->fd_limit = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (long)rl.rlim_cur : 0;
	spare_take(sd);
	struct stat st;
	sd->sock_gid = stat(sd->sock_path, &st) == 0 ? st.st_gid : getgid();
	sd->listen_ev = event_new(sd->base, fd, EV_READ | EV_PERSIST, accept_cb, sd);
	sd->accept_retry_ev = evtimer_new(sd->base, accept_retry_cb, sd);
	if (sd->listen_ev == NULL || sd->accept_retry_ev == NULL)
		fatalx("out of memory (event)");
	event_add(sd->listen_ev, NULL);
	return 0;
}

/* At exit: stop listening and remove the path, unless systemd owns it. */
void
ctl_close_listener(struct sparkd *sd)
{
	if (sd->listen_ev != NULL)
		event_free(sd->listen_ev);
	if (sd->accept_retry_ev != NULL)
		event_free(sd->accept_retry_ev);
	sd->listen_ev = sd->accept_retry_ev = NULL;
	if (sd->spare_fd >= 0)
		close(sd->spare_fd);
	sd->spare_fd = -1;
	if (sd->listen_fd >= 0) {
		close(sd->listen_fd);
		if (sd->listen_owned)
			unlink(sd->sock_path);
	}
	sd->listen_fd = -1;
}

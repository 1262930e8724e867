/*
 * The client side of the control socket: connect with a timeout, send one msgpack-RPC request, read frames through
 * proto's streaming reader (1 MiB cap), match the response by msgid. Every failure becomes one line in err.
 */
#include "sparkctl.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "util.h"

/* The signal-to-loop bridge: handlers only set this; waits poll in short slices and look at it. */
static volatile sig_atomic_t ctl_interrupted;

/* Long enough to notice a signal promptly, short enough not to spin. */
#define CTL_POLL_SLICE_MS 200

static void
ctl_on_signal(int sig)
{
	(void)sig;
	ctl_interrupted = 1;
}

void
ctl_catch_interrupt(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = ctl_on_signal;
	sigemptyset(&sa.sa_mask);
	/* no SA_RESTART: poll() must return so the wait can end */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
}

bool
ctl_was_interrupted(void)
{
	return ctl_interrupted != 0;
}

const char *
ctl_socket_path(struct ctl *ctl)
{
	char err[512] = "";
	if (ctl->socket_path != NULL)
		return ctl->socket_path;
	ctl->socket_path = config_resolve("SPARK_SOCKET", ctl->socket_flag, NULL, err, sizeof err);
	if (ctl->socket_path == NULL && err[0] != '\0') {
		out_err(ctl, "%s", err);
		return NULL;
	}
	if (ctl->socket_path == NULL)
		ctl->socket_path = config_default_socket();
	return ctl->socket_path;
}

/* Milliseconds left until deadline (monotonic seconds); -1 = no deadline. */
static int
ms_left(double deadline)
{
	if (deadline <= 0)
		return -1;
	double left = (deadline - now_mono()) * 1000.0;
	if (left <= 0)
		return 0;
	return left > INT_MAX ? INT_MAX : (int)left;
}

static double
deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? 0 : now_mono() + timeout_ms / 1000.0;
}

/* Wait for events on fd until the deadline, in slices so a signal is noticed. 1 ready, 0 timeout, -1 error. */
static int
wait_fd(int fd, short events, double deadline, enum ctl_result *why)
{
	for (;;) {
		if (ctl_interrupted) {
			*why = CTL_INTERRUPTED;
			return -1;
		}
		int left = ms_left(deadline);
		if (left == 0)
			return 0;
		int slice = left < 0 || left > CTL_POLL_SLICE_MS ? CTL_POLL_SLICE_MS : left;
		struct pollfd p = {.fd = fd, .events = events};
		int n = poll(&p, 1, slice);
		if (n > 0)
			return 1;
		if (n < 0 && errno != EINTR) {
			*why = CTL_FAILED;
			return -1;
		}
	}
}

enum ctl_result
ctl_client_open(struct ctl_client *c, const char *path, int timeout_ms, char *err, size_t errlen)
{
	memset(c, 0, sizeof *c);
	c->fd = -1;
	c->path = path;
	c->next_msgid = 1;

	struct sockaddr_un sun;
	memset(&sun, 0, sizeof sun);
	sun.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sun.sun_path) {
		snprintf(err, errlen, "socket path too long (%zu bytes, at most %zu): %s", strlen(path),
		         sizeof sun.sun_path - 1, path);
		return CTL_FAILED;
	}
	memcpy(sun.sun_path, path, strlen(path) + 1);

	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (c->fd < 0) {
		snprintf(err, errlen, "cannot create a socket: %s", strerror(errno));
		return CTL_FAILED;
	}
	double deadline = deadline_after(timeout_ms);
	for (;;) {
		if (connect(c->fd, (struct sockaddr *)&sun, sizeof sun) == 0)
			break;
		int e = errno;
		if (e == EINTR)
			continue;
		if (e == ENOENT || e == ECONNREFUSED || e == ENOTDIR) {
			ctl_client_close(c);
			return CTL_NOT_RUNNING;
		}
		if (e == EAGAIN) {
			/* the daemon's accept backlog is full: it is busy, not gone; retry until the deadline */
			if (ms_left(deadline) == 0) {
				snprintf(err, errlen, "sparkd at %s accepts no connection (backlog full); try again",
				         path);
				ctl_client_close(c);
				return CTL_TIMEOUT;
			}
			struct timespec ts = {0, 50 * 1000 * 1000};
			nanosleep(&ts, NULL);
			continue;
		}
		if (e == EINPROGRESS) {
			enum ctl_result why = CTL_FAILED;
			int w = wait_fd(c->fd, POLLOUT, deadline, &why);
			int soerr = 0;
			socklen_t sl = sizeof soerr;
			if (w == 0) {
				snprintf(err, errlen, "timed out connecting to sparkd at %s", path);
				ctl_client_close(c);
				return CTL_TIMEOUT;
			}
			if (w < 0) {
				snprintf(err, errlen, "connecting to %s: %s", path, strerror(errno));
				ctl_client_close(c);
				return why;
			}
			if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
				break;
			errno = soerr;
			e = soerr;
			if (e == ECONNREFUSED) {
				ctl_client_close(c);
				return CTL_NOT_RUNNING;
			}
		}
		if (e == EACCES || e == EPERM)
			snprintf(err, errlen,
			         "permission denied on %s: run as root, as the daemon's user or as a member of the "
			         "socket's group",
			         path);
		else
			snprintf(err, errlen, "cannot connect to sparkd at %s: %s", path, strerror(e));
		ctl_client_close(c);
		return CTL_FAILED;
	}
	struct ucred cred;
	socklen_t cl = sizeof cred;
	if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0)
		c->peer_pid = (int)cred.pid;
	if (proto_reader_init(&c->rd) < 0) {
		snprintf(err, errlen, "out of memory for the reply buffer");
		ctl_client_close(c);
		return CTL_FAILED;
	}
	return CTL_OK;
}

void
ctl_client_close(struct ctl_client *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	proto_reader_free(&c->rd);
}

static enum ctl_result
client_send(struct ctl_client *c, const char *buf, size_t len, double deadline, char *err, size_t errlen)
{
	size_t off = 0;
	while (off < len) {
		ssize_t n = send(c->fd, buf + off, len - off, MSG_NOSIGNAL);
		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			enum ctl_result why = CTL_FAILED;
			int w = wait_fd(c->fd, POLLOUT, deadline, &why);
			if (w == 0) {
				snprintf(err, errlen, "timed out sending to sparkd at %s", c->path);
				return CTL_TIMEOUT;
			}
			if (w < 0) {
				snprintf(err, errlen, "sending to sparkd: %s", strerror(errno));
				return why;
			}
			continue;
		}
		if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
			return CTL_EOF;
		snprintf(err, errlen, "sending to sparkd at %s: %s", c->path, strerror(errno));
		return CTL_FAILED;
	}
	return CTL_OK;
}

/*
 * The next frame from the daemon into msg (initialised by the caller, destroyed by the caller). timeout_ms < 0
 * waits for ever (until a signal). A frame over the cap or bytes that are not msgpack end the conversation.
 */
enum ctl_result
ctl_client_next(struct ctl_client *c, int timeout_ms, msgpack_unpacked *msg, char *err, size_t errlen)
{
	double deadline = deadline_after(timeout_ms);
	char buf[64 * 1024];
	for (;;) {
		int r = proto_reader_next(&c->rd, msg);
		if (r == PROTO_READ_FRAME)
			return CTL_OK;
		if (r == PROTO_READ_BAD) {
			snprintf(err, errlen,
			         "malformed reply from sparkd (not msgpack-RPC); is %s really sparkd's socket?",
			         c->path);
			return CTL_FAILED;
		}
		if (r == PROTO_READ_TOO_LARGE) {
			snprintf(err, errlen, "reply from sparkd exceeds the %d KiB frame limit",
			         SPARK_FRAME_MAX / 1024);
			return CTL_FAILED;
		}
		enum ctl_result why = CTL_FAILED;
		int w = wait_fd(c->fd, POLLIN, deadline, &why);
		if (w == 0) {
			snprintf(
			    err, errlen,
			    "sparkd at %s did not answer within %.0f s; it may be overloaded or stuck (see its log)",
			    c->path, timeout_ms / 1000.0);
			return CTL_TIMEOUT;
		}
		if (w < 0) {
			if (why != CTL_INTERRUPTED)
				snprintf(err, errlen, "waiting for sparkd: %s", strerror(errno));
			return why;
		}
		ssize_t n = recv(c->fd, buf, sizeof buf, 0);
		if (n == 0)
			return CTL_EOF;
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
				continue;
			if (errno == ECONNRESET)
				return CTL_EOF;
			snprintf(err, errlen, "reading from sparkd: %s", strerror(errno));
			return CTL_FAILED;
		}
		int fr = proto_reader_feed(&c->rd, buf, (size_t)n);
		if (fr == PROTO_READ_BAD) {
			snprintf(err, errlen, "malformed reply from sparkd (not msgpack-RPC)");
			return CTL_FAILED;
		}
		if (fr != PROTO_READ_NEED_MORE) {
			snprintf(err, errlen, "reply from sparkd exceeds the %d KiB frame limit",
			         SPARK_FRAME_MAX / 1024);
			return CTL_FAILED;
		}
	}
}

/*
 * One request and its response. On CTL_OK *result points into reply (which the caller destroys). A daemon error
 * is CTL_FAILED with c->errcode set and "CODE: message" in err. Notifications that arrive first are skipped.
 */
enum ctl_result
ctl_client_call(struct ctl_client *c, const char *method, ctl_pack_fn pack, void *arg, int timeout_ms,
                msgpack_unpacked *reply, const msgpack_object **result, char *err, size_t errlen)
{
	*result = NULL;
	if (c->closed_why[0] != '\0') {
		snprintf(err, errlen, "%s", c->closed_why);
		return CTL_FAILED;
	}
	c->errcode[0] = '\0';
	uint32_t msgid = c->next_msgid++;
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_request_head(&pk, msgid, method);
	msgpack_pack_array(&pk, 1);
	if (pack != NULL)
		pack(&pk, arg);
	else
		msgpack_pack_map(&pk, 0);
	if (sb.data == NULL) {
		/* msgpack_sbuffer_write leaves data NULL only when it could not allocate */
		snprintf(err, errlen, "out of memory packing the request");
		return CTL_FAILED;
	}

	double deadline = deadline_after(timeout_ms);
	enum ctl_result r = client_send(c, sb.data, sb.size, deadline, err, errlen);
	msgpack_sbuffer_destroy(&sb);
	/* hung up before our request: what it sent first (a refusal with its reason) is still there to read */
	if (r != CTL_OK && r != CTL_EOF)
		return r;

	for (;;) {
		int left = ms_left(deadline);
		if (left == 0) {
			snprintf(err, errlen, "sparkd did not answer '%s' within %.0f s", method, timeout_ms / 1000.0);
			return CTL_TIMEOUT;
		}
		r = ctl_client_next(c, left, reply, err, errlen);
		if (r != CTL_OK)
			return r;
		struct proto_message m;
		char perr[128];
		if (proto_parse_message(&reply->data, &m, perr, sizeof perr) < 0) {
			snprintf(err, errlen, "malformed reply from sparkd: %s", perr);
			return CTL_FAILED;
		}
		/* msgid 0 (ours start at 1): about the connection, not a request, e.g. too many connections */
		bool conn_error = m.type == PROTO_RESPONSE && m.msgid == 0;
		if (m.type != PROTO_RESPONSE || (m.msgid != msgid && !conn_error))
			continue;
		if (m.error != NULL && m.error->type != MSGPACK_OBJECT_NIL) {
			char msgtext[384] = "";
			if (proto_get_str(m.error, "code", c->errcode, sizeof c->errcode) != 1)
				spark_strlcpy(c->errcode, "error", sizeof c->errcode);
			if (proto_get_str(m.error, "message", msgtext, sizeof msgtext) != 1)
				msgtext[0] = '\0';
			out_sanitize(msgtext);
			if (conn_error) {
				snprintf(c->closed_why, sizeof c->closed_why, "sparkd at %s closed the connection: %s",
				         c->path, msgtext[0] ? msgtext : c->errcode);
				snprintf(err, errlen, "%s", c->closed_why);
			} else
				snprintf(err, errlen, "sparkd refused '%s': %s%s%s", method, c->errcode,
				         msgtext[0] ? ": " : "", msgtext);
			return CTL_FAILED;
		}
		if (conn_error)
			continue;
		*result = m.result;
		return CTL_OK;
	}
}

/* A start hint in the grammar the user typed. */
static const char *
start_hint(const struct ctl *ctl)
{
	return ctl->guide_grammar ? "automagik-spark workers start" : "sparkctl start";
}

/* Print why a request failed and return the exit code for it. */
int
ctl_report_failure(struct ctl *ctl, enum ctl_result r, const char *err)
{
	switch (r) {
	case CTL_OK:
		return CTL_EXIT_OK;
	case CTL_NOT_RUNNING:
		out_err(ctl, "sparkd is not running (no socket at %s); start it with '%s'", ctl_socket_path(ctl),
		        start_hint(ctl));
		return CTL_EXIT_NOT_RUNNING;
	case CTL_EOF:
		/* refusals (permission, too many connections, timed out) come with their reason: this is not one */
		out_err(ctl, "sparkd at %s closed the connection without answering: it may be exiting; see its log",
		        ctl_socket_path(ctl));
		return CTL_EXIT_ERROR;
	case CTL_INTERRUPTED:
		return 130;
	case CTL_TIMEOUT:
	case CTL_FAILED:
	default:
		out_err(ctl, "%s", err);
		return CTL_EXIT_ERROR;
	}
}

/* Connect to the daemon at the resolved socket path: CTL_EXIT_OK, or the exit code after reporting. */
int
ctl_connect_or_report(struct ctl *ctl, struct ctl_client *c)
{
	char err[512] = "";
	const char *path = ctl_socket_path(ctl);
	if (path == NULL)
		return CTL_EXIT_ERROR;
	enum ctl_result r = ctl_client_open(c, path, 5000, err, sizeof err);
	if (r != CTL_OK)
		return ctl_report_failure(ctl, r, err);
	return CTL_EXIT_OK;
}

static char *
try_exec(const char *dir, const char *rel, const char *name)
{
	char *p = xasprintf("%s/%s%s", dir, rel, name);
	if (access(p, X_OK) == 0)
		return p;
	free(p);
	return NULL;
}

/*
 * A sibling program (sparkd, spark-worker): next to our own executable, then ../sbin from it (the installed
 * layout puts sparkctl in bin and the daemons in sbin), then PATH. Returns a new string, or NULL.
 */
char *
ctl_find_program(const char *name)
{
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n > 0) {
		self[n] = '\0';
		char *slash = strrchr(self, '/');
		if (slash != NULL) {
			*slash = '\0';
			const char *dir = self[0] ? self : "/";
			char *p = try_exec(dir, "", name);
			if (p == NULL)
				p = try_exec(dir, "../sbin/", name);
			if (p != NULL)
				return p;
		}
	}
	const char *path = getenv("PATH");
	if (path == NULL || *path == '\0')
		return NULL;
	char *copy = xstrdup(path);
	char *save = NULL;
	for (char *d = strtok_r(copy, ":", &save); d != NULL; d = strtok_r(NULL, ":", &save)) {
		char *p = try_exec(*d ? d : ".", "", name);
		if (p != NULL) {
			free(copy);
			return p;
		}
	}
	free(copy);
	return NULL;
}

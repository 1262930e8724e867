/*
 * Log capture: every line a child (or sparkd itself) writes goes into a bounded ring, the log file (rotated by
 * size), the terminal or journal while one is attached, and to the followers.
 */
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sparkd.h"

/* ---- ring ---- */

int
logcap_ring_init(struct logcap *lc, size_t cap)
{
	lc->ring = xcalloc(cap, sizeof *lc->ring);
	lc->cap = cap;
	lc->head = lc->count = lc->bytes = 0;
	return 0;
}

static void
ring_evict(struct logcap *lc)
{
	size_t oldest = (lc->head + lc->cap - lc->count) % lc->cap;
	lc->bytes -= lc->ring[oldest]->len;
	free(lc->ring[oldest]);
	lc->ring[oldest] = NULL;
	lc->count--;
}

void
logcap_ring_push(struct logcap *lc, double ts, int level, const char *worker, pid_t pid, const char *msg, size_t len)
{
	if (lc->cap == 0)
		return;
	while (lc->count > 0 && (lc->count == lc->cap || lc->bytes + len > LC_RING_MAX_BYTES))
		ring_evict(lc);
	struct lc_line *l = xmalloc(sizeof *l + len + 1);
	l->ts = ts;
	l->level = level;
	l->worker = worker;
	l->pid = pid;
	l->len = len;
	memcpy(l->msg, msg, len);
	l->msg[len] = '\0';
	lc->ring[lc->head] = l;
	lc->head = (lc->head + 1) % lc->cap;
	lc->count++;
	lc->bytes += len;
}

const struct lc_line *
logcap_ring_get(const struct logcap *lc, size_t i)
{
	if (i >= lc->count)
		return NULL;
	return lc->ring[(lc->head + lc->cap - lc->count + i) % lc->cap];
}

void
logcap_ring_free(struct logcap *lc)
{
	while (lc->count > 0)
		ring_evict(lc);
	free(lc->ring);
	lc->ring = NULL;
	lc->cap = 0;
}

/* ---- parsing ---- */

/*
 * Level of a captured line and where its message starts: the worker's own "[ts: LEVEL/tag]" prefix (after an
 * optional "<N>" journal prefix), else info for stdout and error for stderr.
 */
int
logcap_parse_level(const char *line, size_t len, bool is_err, size_t *msg_off)
{
	size_t skip = 0;
	if (len >= 3 && line[0] == '<' && line[1] >= '0' && line[1] <= '7' && line[2] == '>')
		skip = 3;
	int off = 0;
	int level = log_parse_line(line + skip, &off);
	if (level < 0) {
		*msg_off = 0;
		return is_err ? SPARK_LOG_ERROR : SPARK_LOG_INFO;
	}
	*msg_off = skip + (size_t)off;
	if (*msg_off > len)
		*msg_off = len;
	return level;
}

/* A --worker filter: the full name, the part before '@' ("celery-1"), or "sparkd". */
bool
logcap_worker_match(const char *filter, const char *worker)
{
	if (filter == NULL || *filter == '\0')
		return true;
	if (strcmp(filter, worker) == 0)
		return true;
	const char *at = strchr(worker, '@');
	return at != NULL && strchr(filter, '@') == NULL && strlen(filter) == (size_t)(at - worker) &&
	       strncmp(filter, worker, (size_t)(at - worker)) == 0;
}

/* Replace NULs, control characters other than tab, and invalid UTF-8 with '?': lines travel as msgpack strings. */
static void
sanitize(char *s, size_t len)
{
	size_t i = 0;
	while (i < len) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x80) {
			if ((c < 0x20 && c != '\t') || c == 0x7f)
				s[i] = '?';
			i++;
			continue;
		}
		size_t n = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
		if (c >= 0xf5)
			n = 0;
		bool ok = n > 0 && i + n <= len;
		for (size_t k = 1; ok && k < n; k++)
			ok = ((unsigned char)s[i + k] & 0xc0) == 0x80;
		if (ok && n == 3) {
			unsigned char c1 = (unsigned char)s[i + 1];
			ok = !(c == 0xe0 && c1 < 0xa0) && !(c == 0xed && c1 >= 0xa0);
		} else if (ok && n == 4) {
			unsigned char c1 = (unsigned char)s[i + 1];
			ok = !(c == 0xf0 && c1 < 0x90) && !(c == 0xf4 && c1 >= 0x90);
		}
		if (!ok) {
			s[i++] = '?';
			continue;
		}
		i += n;
	}
}

/* ---- output: file and terminal/journal ---- */

static void
file_open(struct logcap *lc)
{
	lc->file_fd = open(lc->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
	if (lc->file_fd < 0) {
		lc->file_size = 0;
		return;
	}
	struct stat st;
	lc->file_size = fstat(lc->file_fd, &st) == 0 ? (long)st.st_size : 0;
}

static void
file_rotate(struct logcap *lc)
{
	if (lc->file_fd >= 0)
		close(lc->file_fd);
	lc->file_fd = -1;
	if (lc->keep <= 0) {
		unlink(lc->path);
	} else {
		for (int i = lc->keep - 1; i >= 1; i--) {
			char *from = xasprintf("%s.%d", lc->path, i);
			char *to = xasprintf("%s.%d", lc->path, i + 1);
			rename(from, to);
			free(from);
			free(to);
		}
		char *to = xasprintf("%s.1", lc->path);
		rename(lc->path, to);
		free(to);
	}
	file_open(lc);
}

static void
write_all(int fd, const char *buf, size_t len, long *dropped)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* a stalled terminal or journal never stalls the loop: the line is in the file */
			if (dropped)
				(*dropped)++;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void
lc_output(struct logcap *lc, const struct lc_line *l)
{
	char head[400];
	time_t secs = (time_t)l->ts;
	struct tm tm;
	gmtime_r(&secs, &tm);
	char tbuf[32];
	strftime(tbuf, sizeof tbuf, "%Y-%m-%d %H:%M:%S", &tm);
	int ms = (int)((l->ts - (double)secs) * 1000);
	if (ms > 999)
		ms = 999;
	int hn = snprintf(head, sizeof head, "[%s,%03d: %s/%s[%d]] ", tbuf, ms, log_level_name(l->level), l->worker,
	                  (int)l->pid);
	if (hn < 0 || (size_t)hn >= sizeof head)
		hn = (int)strlen(head);
	size_t total = (size_t)hn + l->len + 1;
	char *line = xmalloc(total + 8);
	int jn = snprintf(line, 8, "<%d>", log_level_syslog(l->level));
	memcpy(line + jn, head, (size_t)hn);
	memcpy(line + jn + hn, l->msg, l->len);
	line[jn + hn + l->len] = '\n';

	if (lc->file_fd >= 0) {
		if (lc->max_bytes > 0 && lc->file_size > 0 && lc->file_size + (long)total > lc->max_bytes)
			file_rotate(lc);
		if (lc->file_fd >= 0) {
			write_all(lc->file_fd, line + jn, total, NULL);
			lc->file_size += (long)total;
		}
	}
	if (lc->echo_fd >= 0) {
		if (lc->journal)
			write_all(lc->echo_fd, line, total + (size_t)jn, &lc->echo_dropped);
		else
			write_all(lc->echo_fd, line + jn, total, &lc->echo_dropped);
	}
	free(line);
}

/* One captured line (NUL-terminated, writable): into the ring, the outputs and the followers. */
static void
lc_emit(struct sparkd *sd, const char *worker, pid_t pid, bool is_err, char *line, size_t len)
{
	while (len > 0 && line[len - 1] == '\r')
		line[--len] = '\0';
	sanitize(line, len);
	size_t off;
	int level = logcap_parse_level(line, len, is_err, &off);
	struct logcap *lc = &sd->lc;
	logcap_ring_push(lc, now_wall(), level, worker, pid, line + off, len - off);
	const struct lc_line *l = logcap_ring_get(lc, lc->count - 1);
	lc_output(lc, l);
	ctl_broadcast_log(sd, l);
}

/* ---- readers ---- */

static void
reader_free(struct lc_reader *r)
{
	LIST_REMOVE(r, entry);
	if (r->proc != NULL) {
		if (r->proc->out == r)
			r->proc->out = NULL;
		if (r->proc->err == r)
			r->proc->err = NULL;
	}
	if (r->sd->lc.self == r)
		r->sd->lc.self = NULL;
	event_free(r->ev);
	evbuffer_free(r->buf);
	close(r->fd);
	free(r);
}

/* Split what is buffered into lines; at EOF the remainder is a line too. */
static void
reader_lines(struct lc_reader *r, bool eof)
{
	char *line = NULL;
	for (;;) {
		size_t avail = evbuffer_get_length(r->buf);
		if (avail == 0)
			break;
		size_t eol_len = 0;
		struct evbuffer_ptr p = evbuffer_search_eol(r->buf, NULL, &eol_len, EVBUFFER_EOL_LF);
		size_t take, drain;
		bool cut = false;
		if (p.pos >= 0) {
			drain = (size_t)p.pos + eol_len;
			if (r->skipping) {
				evbuffer_drain(r->buf, drain);
				r->skipping = false;
				continue;
			}
			take = (size_t)p.pos;
			if (take > LC_LINE_MAX) {
				take = LC_LINE_MAX;
				cut = true;
			}
		} else if (r->skipping) {
			evbuffer_drain(r->buf, avail);
			break;
		} else if (avail >= LC_LINE_MAX) {
			take = drain = LC_LINE_MAX;
			cut = true;
			r->skipping = true;
		} else if (eof) {
			take = drain = avail;
		} else {
			break;
		}
		if (line == NULL)
			line = xmalloc(LC_LINE_MAX + sizeof LC_TRUNC_MARK + 1);
		evbuffer_copyout(r->buf, line, take);
		evbuffer_drain(r->buf, drain);
		/* never cut a UTF-8 sequence in half: back up to its start */
		if (cut) {
			size_t k = take;
			while (k > 0 && take - k < 3 && ((unsigned char)line[k - 1] & 0xc0) == 0x80)
				k--;
			if (k > 0 && (unsigned char)line[k - 1] >= 0xc0) {
				unsigned char c = (unsigned char)line[k - 1];
				size_t n = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
				if (k - 1 + n > take)
					take = k - 1;
			}
			memcpy(line + take, LC_TRUNC_MARK, sizeof LC_TRUNC_MARK);
			take += sizeof LC_TRUNC_MARK - 1;
		}
		line[take] = '\0';
		lc_emit(r->sd, r->worker, r->pid, r->is_err, line, take);
	}
	free(line);
}

/* Read up to rounds chunks. Returns true when the reader hit EOF and was freed. */
static bool
reader_read(struct lc_reader *r, int rounds)
{
	for (int i = 0; i < rounds; i++) {
		int n = evbuffer_read(r->buf, r->fd, CTL_READ_CHUNK);
		if (n > 0) {
			reader_lines(r, false);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return false;
		reader_lines(r, true);
		reader_free(r);
		return true;
	}
	return false;
}

static void
reader_cb(evutil_socket_t fd, short what, void *arg)
{
	reader_read(arg, 4);
}

struct lc_reader *
logcap_reader_new(struct sparkd *sd, int fd, const char *worker, pid_t pid, bool is_err)
{
	struct lc_reader *r = xcalloc(1, sizeof *r);
	r->sd = sd;
	r->fd = fd;
	r->worker = worker;
	r->pid = pid;
	r->is_err = is_err;
	r->buf = evbuffer_new();
	r->ev = event_new(sd->base, fd, EV_READ | EV_PERSIST, reader_cb, r);
	if (r->buf == NULL || r->ev == NULL)
		fatalx("out of memory (log reader)");
	event_add(r->ev, NULL);
	LIST_INSERT_HEAD(&sd->lc.readers, r, entry);
	return r;
}

/* Take what a pipe holds now (a child just exited: its last words come before the exit message). */
void
logcap_reader_drain(struct lc_reader *r)
{
	reader_read(r, 64);
}

void
logcap_flush_self(struct sparkd *sd)
{
	if (sd->lc.self != NULL)
		reader_read(sd->lc.self, 64);
}

void
logcap_drain_all(struct sparkd *sd)
{
	struct lc_reader *r, *next;
	for (r = LIST_FIRST(&sd->lc.readers); r != NULL; r = next) {
		next = LIST_NEXT(r, entry);
		if (r != sd->lc.self)
			reader_read(r, 64);
	}
	logcap_flush_self(sd);
}

/* ---- setup ---- */

/*
 * The log directory and file, the ring, and sparkd's own stderr turned into a captured pipe so that its messages
 * land in the same places as the workers'. The original stderr stays the echo target (the terminal or journal)
 * in the foreground.
 */
int
logcap_init(struct sparkd *sd, char *err, size_t errlen)
{
	struct logcap *lc = &sd->lc;
	LIST_INIT(&lc->readers);
	lc->max_bytes = sd->cfg.log_max_bytes;
	lc->keep = sd->cfg.log_keep;
	lc->echo_fd = -1;
	logcap_ring_init(lc, (size_t)sd->cfg.log_lines);
	if (mkdir_p(sd->cfg.log_dir, 0750) < 0) {
		snprintf(err, errlen, "cannot create the log directory %s: %s (set SPARK_LOG_DIR)", sd->cfg.log_dir,
		         strerror(errno));
		return -1;
	}
	lc->path = xasprintf("%s/sparkd.log", sd->cfg.log_dir);
	file_open(lc);
	if (lc->file_fd < 0) {
		snprintf(err, errlen, "cannot open the log file %s: %s (set SPARK_LOG_DIR)", lc->path, strerror(errno));
		return -1;
	}

	if (!sd->daemon && fcntl(STDERR_FILENO, F_GETFD) >= 0) {
		lc->echo_fd = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
		/*
		 * A pipe or the journal's socket never gets to stall the loop: non-blocking, lines dropped when full
		 * (they are in the file). A terminal is left alone: the flag would be shared with the shell.
		 */
		lc->echo_flags = -1;
		if (lc->echo_fd >= 0 && !isatty(lc->echo_fd)) {
			lc->echo_flags = fcntl(lc->echo_fd, F_GETFL);
			fd_set_nonblock(lc->echo_fd);
		}
	}
	lc->journal = sd->sys.journal;

	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) {
		snprintf(err, errlen, "pipe: %s", strerror(errno));
		return -1;
	}
	/* room for bursts of our own messages; the write end never blocks the loop */
	(void)fcntl(p[1], F_SETPIPE_SZ, 1024 * 1024);
	fd_set_nonblock(p[0]);
	if (dup2(p[1], STDERR_FILENO) < 0) {
		snprintf(err, errlen, "dup2: %s", strerror(errno));
		close(p[0]);
		close(p[1]);
		return -1;
	}
	close(p[1]);
	fd_set_nonblock(STDERR_FILENO);
	lc->self = logcap_reader_new(sd, p[0], SD_SELF_NAME, sd->pid, true);
	return 0;
}

void
logcap_reopen(struct sparkd *sd)
{
	struct logcap *lc = &sd->lc;
	if (lc->file_fd >= 0)
		close(lc->file_fd);
	file_open(lc);
	if (lc->file_fd < 0)
		log_warn("cannot reopen the log file %s", lc->path);
	else
		log_info("log file %s reopened", lc->path);
}

/* Daemon ready: the terminal is no longer ours. */
void
logcap_detach_echo(struct sparkd *sd)
{
	struct logcap *lc = &sd->lc;
	if (lc->echo_fd < 0)
		return;
	if (lc->echo_flags >= 0)
		(void)fcntl(lc->echo_fd, F_SETFL, lc->echo_flags);
	close(lc->echo_fd);
	lc->echo_fd = -1;
}

void
logcap_free(struct logcap *lc)
{
	struct lc_reader *r;
	while ((r = LIST_FIRST(&lc->readers)) != NULL)
		reader_free(r);
	/* whatever is said after this (exit messages) goes where stderr went first */
	if (lc->echo_fd >= 0) {
		if (lc->echo_flags >= 0)
			(void)fcntl(lc->echo_fd, F_SETFL, lc->echo_flags);
		dup2(lc->echo_fd, STDERR_FILENO);
		close(lc->echo_fd);
		lc->echo_fd = -1;
	} else {
		int nul = open("/dev/null", O_WRONLY | O_CLOEXEC);
		if (nul >= 0) {
			dup2(nul, STDERR_FILENO);
			close(nul);
		}
	}
	if (lc->file_fd >= 0)
		close(lc->file_fd);
	lc->file_fd = -1;
	free(lc->path);
	lc->path = NULL;
	logcap_ring_free(lc);
}

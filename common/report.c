/*
 * Worker -> sparkd reports (the format is in report.h). The escaping is written here by hand: it is a few lines,
 * and no linked library offers a word-safe encoding that leaves plain ids (UUIDs, task names) unchanged.
 */
#include "report.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

static const char hex_digits[] = "0123456789ABCDEF";

static bool
esc_byte(unsigned char c)
{
	return c == '%' || c < 0x21 || c == 0x7f;
}

static bool
esc_is_dash(const char *s)
{
	return s[0] == '-' && s[1] == '\0';
}

/* Bytes report_escape writes for s (without a NUL). */
static size_t
esc_len(const char *s)
{
	if (s == NULL || *s == '\0')
		return 1;
	if (esc_is_dash(s))
		return 3;
	size_t n = 0;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		n += esc_byte(*p) ? 3 : 1;
	return n;
}

/* Writes esc_len(s) bytes at out. */
static void
esc_write(char *out, const char *s)
{
	if (s == NULL || *s == '\0') {
		*out = '-';
		return;
	}
	if (esc_is_dash(s)) {
		memcpy(out, "%2D", 3);
		return;
	}
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (esc_byte(*p)) {
			*out++ = '%';
			*out++ = hex_digits[*p >> 4];
			*out++ = hex_digits[*p & 0xf];
		} else {
			*out++ = (char)*p;
		}
	}
}

char *
report_escape(const char *s)
{
	size_t n = esc_len(s);
	char *out = xmalloc(n + 1);
	esc_write(out, s);
	out[n] = '\0';
	return out;
}

static bool
fd_is_report_socket(int fd)
{
	int type;
	socklen_t sl = sizeof type;
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &sl) == 0 && type == SOCK_SEQPACKET;
}

static void
send_datagram(int fd, const char *buf, size_t len)
{
	/* sparkd gone: nothing to report to; the worker keeps its own course */
	while (send(fd, buf, len, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

/* ---- the loop engine's reporter ---- */

void
reporter_init(struct reporter *r, int fd)
{
	memset(r, 0, sizeof *r);
	r->fd = fd;
	r->usable = -1;
}

void
reporter_free(struct reporter *r)
{
	free(r->buf);
	r->buf = NULL;
	r->len = r->cap = 0;
}

static bool
rep_on(struct reporter *r)
{
	if (r->usable == -1)
		r->usable = fd_is_report_socket(r->fd);
	return r->usable == 1;
}

static void
rep_reserve(struct reporter *r, size_t n)
{
	if (r->cap - r->len >= n)
		return;
	size_t cap = r->cap ? r->cap : 256;
	while (cap - r->len < n)
		cap *= 2;
	r->buf = xrealloc(r->buf, cap);
	r->cap = cap;
}

static void
rep_raw(struct reporter *r, const char *s, size_t n)
{
	rep_reserve(r, n);
	memcpy(r->buf + r->len, s, n);
	r->len += n;
}

static void rep_fmt(struct reporter *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Numbers only: they fit the small buffer. */
static void
rep_fmt(struct reporter *r, const char *fmt, ...)
{
	char tmp[64];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n > 0)
		rep_raw(r, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A space and one escaped string field. */
static void
rep_str(struct reporter *r, const char *s)
{
	size_t n = esc_len(s);
	rep_reserve(r, n + 1);
	r->buf[r->len++] = ' ';
	esc_write(r->buf + r->len, s);
	r->len += n;
}

/* A new report is written straight after the buffered ones; returns where they end (the mark for rep_end). */
static size_t
rep_begin(struct reporter *r, const char *kind)
{
	size_t mark = r->len;
	if (mark > 0)
		rep_raw(r, "\n", 1);
	rep_raw(r, kind, strlen(kind));
	return mark;
}

/* The report is complete: when the buffer no longer fits one datagram, the reports before it go first. */
static void
rep_end(struct reporter *r, size_t mark)
{
	size_t start = mark > 0 ? mark + 1 : 0, n = r->len - start;
	if (n > SPARK_REPORT_MAX) {
		/* the worker refuses ids and names this long before reporting them: a bug, not a producer's doing */
		log_warnx("report of %zu bytes dropped (over %d): %.40s", n, SPARK_REPORT_MAX, r->buf + start);
		r->len = mark;
		return;
	}
	if (r->len <= SPARK_REPORT_MAX)
		return;
	send_datagram(r->fd, r->buf, mark);
	memmove(r->buf, r->buf + start, n);
	r->len = n;
}

void
report_flush(struct reporter *r)
{
	if (r->len == 0)
		return;
	send_datagram(r->fd, r->buf, r->len);
	r->len = 0;
}

void
report_ready(struct reporter *r, int slots)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "ready");
	rep_fmt(r, " %d", slots);
	rep_end(r, m);
}

void
report_start(struct reporter *r, int slot, double hard_limit, const char *task_id, const char *task_name)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "start");
	rep_fmt(r, " %d %.15g", slot, hard_limit);
	rep_str(r, task_id);
	rep_str(r, task_name);
	rep_end(r, m);
}

void
report_finish(struct reporter *r, int slot, const char *task_id, const char *outcome, long processed, long rss_kib)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "finish");
	rep_fmt(r, " %d", slot);
	rep_str(r, task_id);
	rep_str(r, outcome);
	rep_fmt(r, " %ld %ld", processed, rss_kib);
	rep_end(r, m);
}

void
report_progress(struct reporter *r, long processed, long rss_kib)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "progress");
	rep_fmt(r, " %ld %ld", processed, rss_kib);
	rep_end(r, m);
}

void
report_recycle(struct reporter *r, const char *reason)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "recycle");
	rep_str(r, reason);
	rep_end(r, m);
}

void
report_draining(struct reporter *r)
{
	if (!rep_on(r))
		return;
	rep_end(r, rep_begin(r, "draining"));
}

void
report_problem(struct reporter *r, const char *text)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "problem");
	if (text != NULL && *text != '\0')
		rep_str(r, text);
	rep_end(r, m);
}

void
report_queues(struct reporter *r, int n, const char *const *names, const long long *lens)
{
	if (!rep_on(r))
		return;
	size_t m = rep_begin(r, "queues");
	for (int i = 0; i < n && i < REPORT_MAX_QUEUES; i++) {
		rep_str(r, names[i]);
		rep_fmt(r, "=%lld", lens[i]);
	}
	rep_end(r, m);
}

/* ---- sparkd's parser ---- */

struct cursor {
	const char *p, *end; /* what is left of the line */
	char *out, *oend;    /* what is left of the scratch */
};

/* The next word, [*w, *w + *n); -1 at the end of the line. */
static int
cur_word(struct cursor *c, const char **w, size_t *n)
{
	while (c->p < c->end && *c->p == ' ')
		c->p++;
	const char *s = c->p;
	while (c->p < c->end && *c->p != ' ')
		c->p++;
	*w = s;
	*n = (size_t)(c->p - s);
	return *n > 0 ? 0 : -1;
}

static int
hex_val(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	return -1;
}

/* Unescape w[0..n) into the scratch. */
static int
cur_unescape(struct cursor *c, const char *w, size_t n, const char **out)
{
	if ((size_t)(c->oend - c->out) < n + 1)
		return -1;
	char *o = c->out;
	*out = o;
	if (n == 1 && w[0] == '-') {
		*o++ = '\0';
		c->out = o;
		return 0;
	}
	for (size_t i = 0; i < n; i++) {
		if (w[i] != '%') {
			*o++ = w[i];
			continue;
		}
		if (i + 2 >= n)
			return -1;
		int hi = hex_val(w[i + 1]), lo = hex_val(w[i + 2]);
		/* %00 cannot be a C string's byte: no builder writes it */
		if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
			return -1;
		*o++ = (char)(hi << 4 | lo);
		i += 2;
	}
	*o++ = '\0';
	c->out = o;
	return 0;
}

static int
cur_str(struct cursor *c, const char **out)
{
	const char *w;
	size_t n;
	if (cur_word(c, &w, &n) < 0)
		return -1;
	return cur_unescape(c, w, n, out);
}

static int
num_long(const char *w, size_t n, long *out)
{
	char b[32];
	if (n == 0 || n >= sizeof b)
		return -1;
	memcpy(b, w, n);
	b[n] = '\0';
	return parse_long(b, out);
}

static int
cur_long(struct cursor *c, long *out)
{
	const char *w;
	size_t n;
	if (cur_word(c, &w, &n) < 0)
		return -1;
	return num_long(w, n, out);
}

static int
cur_int(struct cursor *c, int *out)
{
	long v;
	if (cur_long(c, &v) < 0 || v < INT_MIN || v > INT_MAX)
		return -1;
	*out = (int)v;
	return 0;
}

static int
cur_double(struct cursor *c, double *out)
{
	const char *w;
	size_t n;
	char b[64];
	if (cur_word(c, &w, &n) < 0 || n >= sizeof b)
		return -1;
	memcpy(b, w, n);
	b[n] = '\0';
	return parse_double(b, out);
}

/* name=len: the name ends at the last '='. */
static int
cur_queue(struct cursor *c, const char *w, size_t n, const char **name, long *len)
{
	const char *eq = NULL;
	for (size_t i = n; i > 0 && eq == NULL; i--)
		if (w[i - 1] == '=')
			eq = w + i - 1;
	if (eq == NULL || eq == w || num_long(eq + 1, (size_t)(w + n - eq - 1), len) < 0 || *len < 0)
		return -1;
	return cur_unescape(c, w, (size_t)(eq - w), name);
}

static bool
word_is(const char *w, size_t n, const char *kind)
{
	return strlen(kind) == n && memcmp(w, kind, n) == 0;
}

int
report_parse(const char *line, size_t len, struct report *r, char *scratch, size_t scratch_len)
{
	memset(r, 0, sizeof *r);
	r->task_id = r->task_name = r->outcome = r->reason = r->text = "";
	struct cursor c = {line, line + len, scratch, scratch + scratch_len};
	const char *k;
	size_t kn;
	if (cur_word(&c, &k, &kn) < 0)
		return -1;
	if (word_is(k, kn, "ready")) {
		r->kind = REPORT_READY;
		return cur_int(&c, &r->slots);
	}
	if (word_is(k, kn, "start")) {
		r->kind = REPORT_START;
		if (cur_int(&c, &r->slot) < 0 || cur_double(&c, &r->hard_limit) < 0 || cur_str(&c, &r->task_id) < 0 ||
		    cur_str(&c, &r->task_name) < 0)
			return -1;
		return 0;
	}
	if (word_is(k, kn, "finish")) {
		r->kind = REPORT_FINISH;
		if (cur_int(&c, &r->slot) < 0 || cur_str(&c, &r->task_id) < 0 || cur_str(&c, &r->outcome) < 0 ||
		    cur_long(&c, &r->processed) < 0 || cur_long(&c, &r->rss_kib) < 0)
			return -1;
		return 0;
	}
	if (word_is(k, kn, "progress")) {
		r->kind = REPORT_PROGRESS;
		if (cur_long(&c, &r->processed) < 0 || cur_long(&c, &r->rss_kib) < 0)
			return -1;
		return 0;
	}
	if (word_is(k, kn, "recycle")) {
		r->kind = REPORT_RECYCLE;
		return cur_str(&c, &r->reason);
	}
	if (word_is(k, kn, "draining")) {
		r->kind = REPORT_DRAINING;
		return 0;
	}
	if (word_is(k, kn, "problem")) {
		r->kind = REPORT_PROBLEM;
		const char *w;
		size_t n;
		if (cur_word(&c, &w, &n) < 0)
			return 0;
		return cur_unescape(&c, w, n, &r->text);
	}
	if (word_is(k, kn, "queues")) {
		r->kind = REPORT_QUEUES;
		const char *w;
		size_t n;
		while (r->nqueues < REPORT_MAX_QUEUES && cur_word(&c, &w, &n) == 0) {
			if (cur_queue(&c, w, n, &r->queue[r->nqueues], &r->queue_len[r->nqueues]) < 0)
				return -1;
			r->nqueues++;
		}
		return 0;
	}
	r->kind = REPORT_UNKNOWN;
	return 0;
}

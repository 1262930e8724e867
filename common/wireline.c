/*
 * The line wire (wireline.h). The escaping is written here by hand: it is a few lines, and no linked library
 * offers a word-safe encoding that leaves plain ids (UUIDs, task names) unchanged.
 */
#include "wireline.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

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

/* Bytes wl_escape writes for s (without a NUL). */
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
wl_escape(const char *s)
{
	size_t n = esc_len(s);
	char *out = xmalloc(n + 1);
	esc_write(out, s);
	out[n] = '\0';
	return out;
}

/* ---- sending ---- */

static bool
fd_is_seqpacket(int fd)
{
	int type;
	socklen_t sl = sizeof type;
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &sl) == 0 && type == SOCK_SEQPACKET;
}

static void
send_datagram(int fd, const char *buf, size_t len)
{
	ssize_t n;
	while ((n = send(fd, buf, len, MSG_NOSIGNAL)) < 0 && errno == EINTR)
		;
	/* a peer that is gone has nobody to tell; a peer that does not read (a full non-blocking socket) must not
	 * stall this loop: both lose the datagram, the second with a word in the log */
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		log_warnx("fd %d: peer not reading, %zu bytes of lines dropped", fd, len);
}

void
wl_out_init(struct wl_out *o, int fd)
{
	memset(o, 0, sizeof *o);
	o->fd = fd;
	o->usable = -1;
}

void
wl_out_free(struct wl_out *o)
{
	free(o->buf);
	o->buf = NULL;
	o->len = o->cap = 0;
}

bool
wl_on(struct wl_out *o)
{
	if (o->usable == -1)
		o->usable = fd_is_seqpacket(o->fd);
	return o->usable == 1;
}

static void
out_reserve(struct wl_out *o, size_t n)
{
	if (o->cap - o->len >= n)
		return;
	size_t cap = o->cap ? o->cap : 256;
	while (cap - o->len < n)
		cap *= 2;
	o->buf = xrealloc(o->buf, cap);
	o->cap = cap;
}

static void
out_raw(struct wl_out *o, const char *s, size_t n)
{
	out_reserve(o, n);
	memcpy(o->buf + o->len, s, n);
	o->len += n;
}

/* Numbers only: they fit the small buffer. */
void
wl_num(struct wl_out *o, const char *fmt, ...)
{
	char tmp[64];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n > 0)
		out_raw(o, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

void
wl_str(struct wl_out *o, const char *s)
{
	size_t n = esc_len(s);
	out_reserve(o, n + 1);
	o->buf[o->len++] = ' ';
	esc_write(o->buf + o->len, s);
	o->len += n;
}

/* A new line is written straight after the buffered ones; returns where they end (the mark for wl_end).
 * On an fd that is not a line socket nothing is kept (wl_end drops it). */
size_t
wl_begin(struct wl_out *o, const char *kind)
{
	size_t mark = o->len;
	if (mark > 0)
		out_raw(o, "\n", 1);
	out_raw(o, kind, strlen(kind));
	return mark;
}

/* The line is complete: when the buffer no longer fits one datagram, the lines before it go first. */
void
wl_end(struct wl_out *o, size_t mark)
{
	if (!wl_on(o)) {
		o->len = 0;
		return;
	}
	size_t start = mark > 0 ? mark + 1 : 0, n = o->len - start;
	if (n > SPARK_REPORT_MAX) {
		/* builders refuse fields this long before they get here: a bug, not a producer's doing */
		log_warnx("line of %zu bytes dropped (over %d): %.40s", n, SPARK_REPORT_MAX, o->buf + start);
		o->len = mark;
		return;
	}
	if (o->len <= SPARK_REPORT_MAX)
		return;
	send_datagram(o->fd, o->buf, mark);
	memmove(o->buf, o->buf + start, n);
	o->len = n;
}

void
wl_flush(struct wl_out *o)
{
	if (o->len == 0)
		return;
	send_datagram(o->fd, o->buf, o->len);
	o->len = 0;
}

/* ---- reading ---- */

void
wl_cursor_init(struct wl_cursor *c, const char *line, size_t len, char *scratch, size_t scratch_len)
{
	c->p = line;
	c->end = line + len;
	c->out = scratch;
	c->oend = scratch + scratch_len;
}

int
wl_word(struct wl_cursor *c, const char **w, size_t *n)
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

bool
wl_word_is(const char *w, size_t n, const char *s)
{
	return strlen(s) == n && memcmp(w, s, n) == 0;
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

int
wl_unescape(struct wl_cursor *c, const char *w, size_t n, const char **out)
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

int
wl_next_str(struct wl_cursor *c, const char **out)
{
	const char *w;
	size_t n;
	if (wl_word(c, &w, &n) < 0)
		return -1;
	return wl_unescape(c, w, n, out);
}

/* A number word as a C string in b (numbers are short: a longer word is not one). */
static int
next_num(struct wl_cursor *c, char *b, size_t blen)
{
	const char *w;
	size_t n;
	if (wl_word(c, &w, &n) < 0 || n >= blen)
		return -1;
	memcpy(b, w, n);
	b[n] = '\0';
	return 0;
}

int
wl_next_long(struct wl_cursor *c, long *out)
{
	char b[32];
	return next_num(c, b, sizeof b) < 0 ? -1 : parse_long(b, out);
}

int
wl_next_ulong(struct wl_cursor *c, unsigned long *out)
{
	long v;
	if (wl_next_long(c, &v) < 0 || v < 0)
		return -1;
	*out = (unsigned long)v;
	return 0;
}

int
wl_next_int(struct wl_cursor *c, int *out)
{
	long v;
	if (wl_next_long(c, &v) < 0 || v < INT_MIN || v > INT_MAX)
		return -1;
	*out = (int)v;
	return 0;
}

int
wl_next_double(struct wl_cursor *c, double *out)
{
	char b[64];
	return next_num(c, b, sizeof b) < 0 ? -1 : parse_double(b, out);
}

/*
 * The line wire shared by the fd-3 reports (report.h) and the sparkd -> worker commands (command.h): datagrams
 * on a SOCK_SEQPACKET socket, each one or more lines, a line being a kind and then space-separated fields, a
 * string field escaped to one non-empty word (report.h gives the rules). One definition of the escaping, the
 * buffering and the parsing cursor, so both directions read and write the same way.
 */
#ifndef SPARK_WIRELINE_H
#define SPARK_WIRELINE_H

#include <stdbool.h>
#include <stddef.h>

#define SPARK_REPORT_FD  3
#define SPARK_REPORT_MAX 65536 /* one datagram, the most either side reads at once */

/* Lines buffered for one socket, sent as few datagrams as possible, each <= SPARK_REPORT_MAX, split only between
 * lines. Sending never blocks the caller for long: on a full socket (EAGAIN) the datagram is dropped with a
 * warning, as for a peer that is gone. */
struct wl_out {
	int fd;
	int usable; /* -1 = not checked yet; fd must be a SOCK_SEQPACKET socket, else lines are dropped */
	char *buf;  /* lines buffered since the last flush, newline-separated */
	size_t len, cap;
};

void wl_out_init(struct wl_out *o, int fd);
void wl_out_free(struct wl_out *o); /* drops what is buffered: flush first */
void wl_flush(struct wl_out *o);
/* Whether lines on this fd go anywhere: builders on a hot path skip their work when not. */
bool wl_on(struct wl_out *o);

/* Building one line: mark = wl_begin(o, kind); wl_str/wl_num ...; wl_end(o, mark). A line longer than one
 * datagram is dropped by wl_end with a warning (builders refuse such fields before they get here). */
size_t wl_begin(struct wl_out *o, const char *kind);
void wl_str(struct wl_out *o, const char *s); /* a space and one escaped string field ("" and NULL as "-") */
/* numbers, as printf writes them: the format carries its own separators (" %d", "=%lld") */
void wl_num(struct wl_out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void wl_end(struct wl_out *o, size_t mark);

/* One string field, escaped (never empty); the caller frees it. NULL is written as "" is. */
char *wl_escape(const char *s);

/* Reading one line: fields are unescaped into the caller's scratch (len + 1 bytes always suffice). */
struct wl_cursor {
	const char *p, *end; /* what is left of the line */
	char *out, *oend;    /* what is left of the scratch */
};

void wl_cursor_init(struct wl_cursor *c, const char *line, size_t len, char *scratch, size_t scratch_len);
int wl_word(struct wl_cursor *c, const char **w, size_t *n); /* the next raw word; -1 at the end */
bool wl_word_is(const char *w, size_t n, const char *s);
int wl_unescape(struct wl_cursor *c, const char *w, size_t n, const char **out);
int wl_next_str(struct wl_cursor *c, const char **out);
int wl_next_long(struct wl_cursor *c, long *out);
int wl_next_ulong(struct wl_cursor *c, unsigned long *out);
int wl_next_int(struct wl_cursor *c, int *out);
int wl_next_double(struct wl_cursor *c, double *out);

#endif

#include "report.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "util.h"

/* TEMPORARY (replaced by the escaping reporter): words as before. */
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
}

static const char *
rword(const char *s)
{
	if (s == NULL || s[0] == '\0' || strpbrk(s, " \t\r\n") != NULL || strlen(s) > 120)
		return "-";
	return s;
}

static void __attribute__((format(printf, 2, 3)))
radd(struct reporter *r, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof line)
		n = sizeof line - 1;
	if (r->len + (size_t)n + 1 > SPARK_REPORT_MAX)
		report_flush(r);
	if (r->len + (size_t)n + 2 > r->cap) {
		r->cap = r->cap ? r->cap * 2 : 4096;
		r->buf = xrealloc(r->buf, r->cap);
	}
	if (r->len > 0)
		r->buf[r->len++] = '\n';
	memcpy(r->buf + r->len, line, (size_t)n);
	r->len += (size_t)n;
}

void
report_flush(struct reporter *r)
{
	if (r->len == 0)
		return;
	if (r->usable == -1) {
		int type;
		socklen_t sl = sizeof type;
		r->usable = getsockopt(r->fd, SOL_SOCKET, SO_TYPE, &type, &sl) == 0 && type == SOCK_SEQPACKET;
	}
	if (r->usable)
		while (send(r->fd, r->buf, r->len, MSG_NOSIGNAL) < 0 && errno == EINTR)
			;
	r->len = 0;
}

void
report_ready(struct reporter *r, int slots)
{
	radd(r, "ready %d", slots);
}
void
report_start(struct reporter *r, int slot, double hard, const char *id, const char *name)
{
	radd(r, "start %d %g %s %s", slot, hard, rword(id), rword(name));
}
void
report_finish(struct reporter *r, int slot, const char *id, const char *outcome, long processed, long rss)
{
	radd(r, "finish %d %s %s %ld %ld", slot, rword(id), outcome, processed, rss);
}
void
report_progress(struct reporter *r, long processed, long rss)
{
	radd(r, "finish -1 - progress %ld %ld", processed, rss);
}
void
report_recycle(struct reporter *r, const char *reason)
{
	radd(r, "recycle %s", reason);
}
void
report_draining(struct reporter *r)
{
	radd(r, "draining");
}
void
report_problem(struct reporter *r, const char *text)
{
	radd(r, "problem %s", text ? text : "");
}
void
report_queues(struct reporter *r, int n, const char *const *names, const long long *lens)
{
	char line[900] = "queues";
	for (int i = 0; i < n; i++) {
		size_t l = strlen(line);
		if (strpbrk(names[i], " \t\r\n=") == NULL && strlen(names[i]) < 64)
			snprintf(line + l, sizeof line - l, " %s=%lld", names[i], lens[i]);
	}
	radd(r, "%s", line);
}

static int
word(const char **p, const char *end, char *out, size_t len)
{
	while (*p < end && **p == ' ')
		(*p)++;
	const char *s = *p;
	while (*p < end && **p != ' ')
		(*p)++;
	size_t n = (size_t)(*p - s);
	if (n == 0 || n >= len)
		return -1;
	memcpy(out, s, n);
	out[n] = '\0';
	return 0;
}

static int
num(const char **p, const char *end, long *out)
{
	char b[32];
	if (word(p, end, b, sizeof b) < 0)
		return -1;
	return parse_long(b, out);
}

int
report_parse(const char *buf, size_t len, struct report *r)
{
	memset(r, 0, sizeof *r);
	const char *p = buf, *end = buf + len;
	char kind[16];
	if (word(&p, end, kind, sizeof kind) < 0)
		return -1;
	long v;
	if (!strcmp(kind, "ready")) {
		r->kind = REPORT_READY;
		if (num(&p, end, &v) < 0)
			return -1;
		r->slots = (int)v;
	} else if (!strcmp(kind, "start")) {
		r->kind = REPORT_START;
		char lim[32];
		if (num(&p, end, &v) < 0 || word(&p, end, lim, sizeof lim) < 0 ||
		    parse_double(lim, &r->hard_limit) < 0 || word(&p, end, r->task_id, sizeof r->task_id) < 0 ||
		    word(&p, end, r->task_name, sizeof r->task_name) < 0)
			return -1;
		r->slot = (int)v;
	} else if (!strcmp(kind, "finish")) {
		r->kind = REPORT_FINISH;
		if (num(&p, end, &v) < 0 || word(&p, end, r->task_id, sizeof r->task_id) < 0 ||
		    word(&p, end, r->outcome, sizeof r->outcome) < 0 || num(&p, end, &r->processed) < 0 ||
		    num(&p, end, &r->rss_kib) < 0)
			return -1;
		r->slot = (int)v;
	} else if (!strcmp(kind, "recycle")) {
		r->kind = REPORT_RECYCLE;
		if (word(&p, end, r->reason, sizeof r->reason) < 0)
			return -1;
	} else if (!strcmp(kind, "draining")) {
		r->kind = REPORT_DRAINING;
	} else if (!strcmp(kind, "problem")) {
		r->kind = REPORT_PROBLEM;
		while (p < end && *p == ' ')
			p++;
		size_t n = (size_t)(end - p);
		if (n >= sizeof r->text)
			n = sizeof r->text - 1;
		memcpy(r->text, p, n);
		r->text[n] = '\0';
	} else if (!strcmp(kind, "queues")) {
		r->kind = REPORT_QUEUES;
		char item[96];
		while (r->nqueues < REPORT_MAX_QUEUES && word(&p, end, item, sizeof item) == 0) {
			char *eq = strrchr(item, '=');
			long n;
			if (eq == NULL || eq == item || (size_t)(eq - item) >= sizeof r->queue[0] ||
			    parse_long(eq + 1, &n) < 0 || n < 0)
				return -1;
			*eq = '\0';
			spark_strlcpy(r->queue[r->nqueues], item, sizeof r->queue[0]);
			r->queue_len[r->nqueues++] = n;
		}
	} else {
		r->kind = REPORT_UNKNOWN;
	}
	return 0;
}

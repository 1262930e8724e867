#include "report.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "util.h"

void
report_send(const char *fmt, ...)
{
	static int usable = -1;
	if (usable == -1) {
		int type;
		socklen_t sl = sizeof type;
		usable = getsockopt(SPARK_REPORT_FD, SOL_SOCKET, SO_TYPE, &type, &sl) == 0 && type == SOCK_SEQPACKET;
	}
	if (!usable)
		return;
	char buf[SPARK_REPORT_MAX];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	/* sparkd gone: nothing to report to; the worker keeps its own course */
	while (send(SPARK_REPORT_FD, buf, (size_t)n, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
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

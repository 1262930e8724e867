/* Worker -> sparkd reports (the format is in report.h, the line wire under it in wireline.c). */
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

void
report_ready(struct reporter *r, int slots)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "ready");
	wl_num(&r->out, " %d", slots);
	wl_end(&r->out, m);
}

void
report_start(struct reporter *r, int slot, double hard_limit, const char *task_id, const char *task_name)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "start");
	wl_num(&r->out, " %d %.15g", slot, hard_limit);
	wl_str(&r->out, task_id);
	wl_str(&r->out, task_name);
	wl_end(&r->out, m);
}

void
report_finish(struct reporter *r, int slot, const char *task_id, const char *outcome, long processed, long rss_kib)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "finish");
	wl_num(&r->out, " %d", slot);
	wl_str(&r->out, task_id);
	wl_str(&r->out, outcome);
	wl_num(&r->out, " %ld %ld", processed, rss_kib);
	wl_end(&r->out, m);
}

void
report_progress(struct reporter *r, long processed, long rss_kib)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "progress");
	wl_num(&r->out, " %ld %ld", processed, rss_kib);
	wl_end(&r->out, m);
}

void
report_recycle(struct reporter *r, const char *reason)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "recycle");
	wl_str(&r->out, reason);
	wl_end(&r->out, m);
}

void
report_draining(struct reporter *r)
{
	if (!wl_on(&r->out))
		return;
	wl_end(&r->out, wl_begin(&r->out, "draining"));
}

void
report_problem(struct reporter *r, const char *text)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "problem");
	if (text != NULL && *text != '\0')
		wl_str(&r->out, text);
	wl_end(&r->out, m);
}

void
report_answer(struct reporter *r, unsigned long reqid, const char *json)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "answer");
	wl_num(&r->out, " %lu", reqid);
	wl_str(&r->out, json);
	wl_end(&r->out, m);
}

void
report_answered(struct reporter *r, unsigned long reqid, int count)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "answered");
	wl_num(&r->out, " %lu %d", reqid, count);
	wl_end(&r->out, m);
}

void
report_queues(struct reporter *r, int n, const char *const *names, const long long *lens)
{
	if (!wl_on(&r->out))
		return;
	size_t m = wl_begin(&r->out, "queues");
	for (int i = 0; i < n && i < REPORT_MAX_QUEUES; i++) {
		wl_str(&r->out, names[i]);
		wl_num(&r->out, "=%lld", lens[i]);
	}
	wl_end(&r->out, m);
}

/* ---- sparkd's parser ---- */

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

/* name=len: the name ends at the last '='. */
static int
cur_queue(struct wl_cursor *c, const char *w, size_t n, const char **name, long *len)
{
	const char *eq = NULL;
	for (size_t i = n; i > 0 && eq == NULL; i--)
		if (w[i - 1] == '=')
			eq = w + i - 1;
	if (eq == NULL || eq == w || num_long(eq + 1, (size_t)(w + n - eq - 1), len) < 0 || *len < 0)
		return -1;
	return wl_unescape(c, w, (size_t)(eq - w), name);
}

int
report_parse(const char *line, size_t len, struct report *r, char *scratch, size_t scratch_len)
{
	memset(r, 0, sizeof *r);
	r->task_id = r->task_name = r->outcome = r->reason = r->text = "";
	struct wl_cursor c;
	wl_cursor_init(&c, line, len, scratch, scratch_len);
	const char *k;
	size_t kn;
	if (wl_word(&c, &k, &kn) < 0)
		return -1;
	if (wl_word_is(k, kn, "ready")) {
		r->kind = REPORT_READY;
		return wl_next_int(&c, &r->slots);
	}
	if (wl_word_is(k, kn, "start")) {
		r->kind = REPORT_START;
		if (wl_next_int(&c, &r->slot) < 0 || wl_next_double(&c, &r->hard_limit) < 0 ||
		    wl_next_str(&c, &r->task_id) < 0 || wl_next_str(&c, &r->task_name) < 0)
			return -1;
		return 0;
	}
	if (wl_word_is(k, kn, "finish")) {
		r->kind = REPORT_FINISH;
		if (wl_next_int(&c, &r->slot) < 0 || wl_next_str(&c, &r->task_id) < 0 ||
		    wl_next_str(&c, &r->outcome) < 0 || wl_next_long(&c, &r->processed) < 0 ||
		    wl_next_long(&c, &r->rss_kib) < 0)
			return -1;
		return 0;
	}
	if (wl_word_is(k, kn, "progress")) {
		r->kind = REPORT_PROGRESS;
		if (wl_next_long(&c, &r->processed) < 0 || wl_next_long(&c, &r->rss_kib) < 0)
			return -1;
		return 0;
	}
	if (wl_word_is(k, kn, "recycle")) {
		r->kind = REPORT_RECYCLE;
		return wl_next_str(&c, &r->reason);
	}
	if (wl_word_is(k, kn, "draining")) {
		r->kind = REPORT_DRAINING;
		return 0;
	}
	if (wl_word_is(k, kn, "problem")) {
		r->kind = REPORT_PROBLEM;
		const char *w;
		size_t n;
		if (wl_word(&c, &w, &n) < 0)
			return 0;
		return wl_unescape(&c, w, n, &r->text);
	}
	if (wl_word_is(k, kn, "queues")) {
		r->kind = REPORT_QUEUES;
		const char *w;
		size_t n;
		while (r->nqueues < REPORT_MAX_QUEUES && wl_word(&c, &w, &n) == 0) {
			if (cur_queue(&c, w, n, &r->queue[r->nqueues], &r->queue_len[r->nqueues]) < 0)
				return -1;
			r->nqueues++;
		}
		return 0;
	}
	if (wl_word_is(k, kn, "answer")) {
		r->kind = REPORT_ANSWER;
		return wl_next_ulong(&c, &r->reqid) < 0 || wl_next_str(&c, &r->text) < 0 ? -1 : 0;
	}
	if (wl_word_is(k, kn, "answered")) {
		r->kind = REPORT_ANSWERED;
		return wl_next_ulong(&c, &r->reqid) < 0 || wl_next_int(&c, &r->count) < 0 ? -1 : 0;
	}
	r->kind = REPORT_UNKNOWN;
	return 0;
}

/*
 * Reports from the workers on fd 3 (DESIGN §7, common/report.h): ready, task start and finish, progress,
 * recycle, draining, problems, queue lengths. Read until the socket is dry, never blocking.
 */
#include <sys/socket.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sup.h"

static void
proc_report(struct sd_proc *p, const struct report *r)
{
	struct sparkd *sd = p->w->sd;
	switch (r->kind) {
	case REPORT_READY:
		if (p->state == PS_STARTING) {
			p->state = PS_ACTIVE;
			p->ready_mono = now_mono();
			long rss = proc_rss_kib(p->pid);
			if (rss >= 0)
				p->rss_kib = rss;
			if (p->w->slots[p->slot].current == p)
				p->w->slots[p->slot].failing = false;
			log_info("%s: process %d ready (%d slot%s)", p->w->name, (int)p->pid, r->slots,
			         r->slots == 1 ? "" : "s");
		}
		if (!sd->ready && sup_all_ready(sd))
			sd_ready(sd);
		break;
	case REPORT_START: {
		int slot = r->slot >= 0 && r->slot < p->nslots ? r->slot : -1;
		for (int i = 0; slot < 0 && i < p->nslots; i++)
			if (!p->tasks[i].used)
				slot = i;
		if (slot < 0)
			slot = 0;
		struct sd_task *t = &p->tasks[slot];
		sup_task_clear(t);
		t->used = true;
		t->id = xstrdup(r->task_id);
		t->name = xstrdup(r->task_name);
		t->started_wall = now_wall();
		t->started_mono = now_mono();
		t->hard_limit = r->hard_limit;
		break;
	}
	case REPORT_FINISH: {
		int slot = -1;
		if (r->slot >= 0 && r->slot < p->nslots && p->tasks[r->slot].used &&
		    strcmp(p->tasks[r->slot].id, r->task_id) == 0)
			slot = r->slot;
		for (int i = 0; slot < 0 && i < p->nslots; i++)
			if (p->tasks[i].used && strcmp(p->tasks[i].id, r->task_id) == 0)
				slot = i;
		if (slot >= 0)
			sup_task_clear(&p->tasks[slot]);
		if (r->processed > p->processed)
			p->processed = r->processed;
		if (r->rss_kib > 0)
			p->rss_kib = r->rss_kib;
		break;
	}
	case REPORT_PROGRESS:
		if (r->processed > p->processed)
			p->processed = r->processed;
		if (r->rss_kib > 0)
			p->rss_kib = r->rss_kib;
		break;
	case REPORT_RECYCLE:
		log_info("%s: process %d will exit after its current tasks (%s): starting its replacement", p->w->name,
		         (int)p->pid, r->reason);
		if (p->state != PS_STOPPING)
			p->state = PS_DRAINING;
		sup_retire(p, r->reason);
		break;
	case REPORT_DRAINING:
		if (p->state != PS_STOPPING)
			p->state = PS_DRAINING;
		break;
	case REPORT_PROBLEM:
		free(p->problem);
		p->problem = r->text[0] != '\0' ? xstrdup(r->text) : NULL;
		break;
	case REPORT_QUEUES:
		for (int i = 0; i < sd->nqlen; i++)
			free(sd->qname[i]);
		sd->nqlen = r->nqueues;
		for (int i = 0; i < r->nqueues; i++) {
			sd->qname[i] = xstrdup(r->queue[i]);
			sd->qlen[i] = r->queue_len[i];
		}
		sd->qlen_at = now_wall();
		break;
	case REPORT_ANSWER: /* queries are not sent yet: nothing waits for an answer */
	case REPORT_ANSWERED:
	case REPORT_UNKNOWN:
		break;
	}
}

/* Read every report the process has sent. */
void
sup_read_reports(struct sd_proc *p)
{
	/* a datagram never exceeds SPARK_REPORT_MAX (report.h); its lines unescape into no more than their length */
	char buf[SPARK_REPORT_MAX], scratch[SPARK_REPORT_MAX + 1];
	while (p->rep_fd >= 0) {
		ssize_t n = recv(p->rep_fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) {
			/* the worker closed it or died: what comes next is its exit */
			event_free(p->rep_ev);
			p->rep_ev = NULL;
			close(p->rep_fd);
			p->rep_fd = -1;
			return;
		}
		/* one datagram may carry several reports, one per line */
		for (const char *line = buf, *end = buf + n; line < end;) {
			const char *nl = memchr(line, '\n', (size_t)(end - line));
			size_t len = nl ? (size_t)(nl - line) : (size_t)(end - line);
			struct report r;
			if (len > 0 && report_parse(line, len, &r, scratch, sizeof scratch) < 0)
				log_warnx("%s: process %d sent a malformed report: %.*s", p->w->name, (int)p->pid,
				          (int)(len > 120 ? 120 : len), line);
			else if (len > 0)
				proc_report(p, &r);
			line += len + 1;
		}
	}
}

void
sup_report_cb(evutil_socket_t fd, short what, void *arg)
{
	sup_read_reports(arg);
}

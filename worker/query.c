/*
 * Answers to sparkd's queries (command.h: query <reqid> <what> [<arg> ...]): what this process holds, as the
 * dicts Celery's worker/control.py returns (reference §5.5), one "answer" report per item and then "answered",
 * so sparkd can merge the processes of a node into one reply. Queries are rare: the dicts are built with
 * jansson, compact, each small enough for one datagram (args and kwargs are capped JSON text).
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "command.h"
#include "log.h"
#include "util.h"
#include "worker.h"

#define QUERY_TEXT_MAX 1024

void
query_count_task(struct worker *w, const char *name)
{
	if (name == NULL)
		return;
	for (int i = 0; i < w->ntotals; i++)
		if (strcmp(w->totals[i].name, name) == 0) {
			w->totals[i].n++;
			return;
		}
	if (w->ntotals == w->totals_cap) {
		w->totals_cap = w->totals_cap ? 2 * w->totals_cap : 8;
		w->totals = xrealloc(w->totals, (size_t)w->totals_cap * sizeof *w->totals);
	}
	w->totals[w->ntotals].name = xstrdup(name);
	w->totals[w->ntotals++].n = 1;
}

void
query_free(struct worker *w)
{
	for (int i = 0; i < w->ntotals; i++)
		free(w->totals[i].name);
	free(w->totals);
	w->totals = NULL;
	w->ntotals = w->totals_cap = 0;
	for (int i = 0; i < w->nlimits; i++)
		free(w->limits[i].name);
	free(w->limits);
	w->limits = NULL;
	w->nlimits = 0;
}

/* JSON text of args or kwargs as a string, cut (on a UTF-8 boundary) so one item fits a datagram. */
static json_t *
query_text(const char *s, size_t n, const char *empty)
{
	if (s == NULL)
		return json_string(empty);
	if (n <= QUERY_TEXT_MAX)
		return json_stringn_nocheck(s, n);
	size_t cut = QUERY_TEXT_MAX;
	while (cut > 0 && ((unsigned char)s[cut] & 0xc0) == 0x80)
		cut--;
	char *t = xasprintf("%.*s...", (int)cut, s);
	json_t *v = json_string_nocheck(t);
	free(t);
	return v;
}

/* Celery's Request.info(safe=False) gives args and kwargs as values: the message's own JSON when it fits one
 * item, else (or if it does not parse) the capped text. */
static json_t *
query_value(const char *s, size_t n, const char *empty)
{
	if (s != NULL && n <= QUERY_TEXT_MAX) {
		json_t *v = json_loadb(s, n, JSON_DECODE_ANY, NULL);
		if (v != NULL)
			return v;
	}
	return query_text(s, n, empty);
}

static json_t *
query_str(const char *s)
{
	return s ? json_string_nocheck(s) : json_null();
}

/* Celery's Request.info() as `inspect active` asks for it (safe=False: args and kwargs as values). */
static json_t *
query_info(struct worker *w, const struct job *j)
{
	const struct message *m = &j->m;
	char *queue = message_queue_of_key(j->qkey);
	const char *rk = m->routing_key && m->routing_key[0] ? m->routing_key : queue;
	json_t *di = json_pack("{s:o, s:o, s:i, s:b}", "exchange", query_str(m->exchange ? m->exchange : ""),
	                       "routing_key", query_str(rk), "priority", m->priority, "redelivered", m->redelivered);
	free(queue);
	bool running = j->state == JOB_RUNNING || j->state == JOB_ABANDONED;
	json_t *o = json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:b, s:o, s:o}", "id", query_str(m->task_id), "name",
	                      query_str(m->task_name), "args", query_value(m->args_json, m->args_len, "[]"), "kwargs",
	                      query_value(m->kwargs_json, m->kwargs_len, "{}"), "type", query_str(m->task_name),
	                      "hostname", query_str(w->node), "time_start",
	                      running ? json_real(j->started_wall) : json_null(), "acknowledged", false,
	                      "delivery_info", di, "worker_pid", running ? json_integer(w->pid) : json_null());
	return o;
}

static void
query_emit(struct worker *w, unsigned long reqid, json_t *item, int *count)
{
	if (item == NULL)
		return;
	char *text = json_dumps(item, JSON_COMPACT);
	json_decref(item);
	if (text == NULL)
		return;
	report_answer(&w->rep, reqid, text);
	free(text);
	(*count)++;
}

static json_t *
query_stats(struct worker *w)
{
	json_t *total = json_object();
	for (int i = 0; i < w->ntotals; i++)
		json_object_set_new(total, w->totals[i].name, json_integer(w->totals[i].n));
	struct rusage ru;
	memset(&ru, 0, sizeof ru);
	getrusage(RUSAGE_SELF, &ru);
	/* the fields of Celery's stats()['rusage'] (resource.getrusage) */
	json_t *rusage = json_pack(
	    "{s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "utime",
	    ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, "stime", ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
	    "maxrss", (json_int_t)ru.ru_maxrss, "ixrss", (json_int_t)ru.ru_ixrss, "idrss", (json_int_t)ru.ru_idrss,
	    "isrss", (json_int_t)ru.ru_isrss, "minflt", (json_int_t)ru.ru_minflt, "majflt", (json_int_t)ru.ru_majflt,
	    "nswap", (json_int_t)ru.ru_nswap, "inblock", (json_int_t)ru.ru_inblock, "oublock",
	    (json_int_t)ru.ru_oublock, "msgsnd", (json_int_t)ru.ru_msgsnd, "msgrcv", (json_int_t)ru.ru_msgrcv,
	    "nsignals", (json_int_t)ru.ru_nsignals, "nvcsw", (json_int_t)ru.ru_nvcsw, "nivcsw",
	    (json_int_t)ru.ru_nivcsw);
	return json_pack("{s:o, s:o, s:I, s:f, s:I}", "total", total, "rusage", rusage, "pid", (json_int_t)w->pid,
	                 "uptime", now_wall() - w->started_at, "processed", (json_int_t)w->processed);
}

void
query_answer(struct worker *w, const struct command *c)
{
	int count = 0;
	const char *what = c->what ? c->what : "";
	bool active = strcmp(what, CMD_Q_ACTIVE) == 0, reserved = strcmp(what, CMD_Q_RESERVED) == 0;
	bool scheduled = strcmp(what, CMD_Q_SCHEDULED) == 0, query_task = strcmp(what, CMD_Q_QUERY_TASK) == 0;
	double now = now_wall();
	if (strcmp(what, CMD_Q_STATS) == 0)
		query_emit(w, c->reqid, query_stats(w), &count);
	for (struct job *j = TAILQ_FIRST(&w->jobs); j != NULL && (active || reserved || scheduled || query_task);
	     j = TAILQ_NEXT(j, entry)) {
		if (j->m.task_id == NULL || j->revoked)
			continue;
		/* what a Python worker would still list: abandoned tasks still run; a writing one has ended */
		bool run = j->state == JOB_RUNNING || (j->state == JOB_ABANDONED && !j->task_ended);
		bool held = j->state == JOB_RESERVED;
		if (active && run)
			query_emit(w, c->reqid, query_info(w, j), &count);
		else if (reserved && held && !(j->m.eta > now))
			query_emit(w, c->reqid, query_info(w, j), &count);
		else if (scheduled && held && j->m.eta > now) {
			char iso[64];
			message_format_iso(j->m.eta, true, iso, sizeof iso);
			query_emit(w, c->reqid,
			           json_pack("{s:s, s:i, s:o}", "eta", iso, "priority", 6, "request", query_info(w, j)),
			           &count);
		} else if (query_task && (run || held)) {
			for (int i = 0; i < c->argc; i++)
				if (strcmp(c->argv[i], j->m.task_id) == 0) {
					json_t *item = json_object();
					json_object_set_new(
					    item, j->m.task_id,
					    json_pack("[s, o]", run ? "active" : "reserved", query_info(w, j)));
					query_emit(w, c->reqid, item, &count);
					break;
				}
		}
	}
	report_answered(&w->rep, c->reqid, count);
}

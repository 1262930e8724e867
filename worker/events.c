/*
 * Celery's task events (celery/worker/request.py, strategy.py; reference §5.6): task-received, -started,
 * -succeeded, -failed, -retried, -revoked, -rejected, as a Python worker sends them with -E: PUBLISH on the
 * celeryev fanout, "/<db>.celeryev/<type with . for ->", a kombu envelope with headers.hostname = the node and the
 * event's JSON body in base64. The events of one loop tick leave as one command (events_flush) in the same write
 * as the tasks' other commands (no round trip of their own, no reply waited for). Off, they cost the callers one
 * branch on w->events.on.
 *
 * Differences from Python a monitor can see: args/kwargs and a result are JSON text (Python sends repr()), and a
 * traceback is the one line we have ("module.Type: message").
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"
#include "util.h"
#include "worker.h"

#define EVENT_TEXT_MAX 1024 /* args, kwargs, results: cut beyond this, as Celery's saferepr cuts */

void
events_init(struct worker *w)
{
	struct task_events *e = &w->events;
	e->on = w->cfg->send_task_events;
	static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	for (int k = 0; k < 4096; k++) {
		e->b64[k][0] = abc[k >> 6];
		e->b64[k][1] = abc[k & 63];
	}
	if (getrandom(&e->rng, sizeof e->rng, 0) != (ssize_t)sizeof e->rng || e->rng == 0)
		e->rng = (uint64_t)w->pid * 0x9E3779B97F4A7C15ULL + 7;
	/* celery.utils.time.utcoffset: hours west of UTC */
	time_t t = time(NULL);
	struct tm tm;
	localtime_r(&t, &tm);
	char num[64];
	sbuf_adds(&e->head, "{\"hostname\": ");
	sbuf_add_json_string(&e->head, w->node, strlen(w->node));
	snprintf(num, sizeof num, ", \"utcoffset\": %ld, \"pid\": %ld, \"clock\": ", -(long)tm.tm_gmtoff / 3600,
	         w->pid);
	sbuf_adds(&e->head, num);
	sbuf_adds(&e->mid, "\", \"content-encoding\": \"utf-8\", \"content-type\": \"application/json\", "
	                   "\"headers\": {\"hostname\": ");
	sbuf_add_json_string(&e->mid, w->node, strlen(w->node));
	sbuf_adds(&e->mid, "}, \"properties\": {\"delivery_mode\": 1, \"delivery_info\": {\"exchange\": \"celeryev\", "
	                   "\"routing_key\": \"");
}

void
events_free(struct worker *w)
{
	struct task_events *e = &w->events;
	sbuf_free(&e->head);
	sbuf_free(&e->mid);
	sbuf_free(&e->env);
	sbuf_free(&e->chan);
	sbuf_free(&e->batch);
}

/* A uuid4-shaped delivery tag from the process's generator (a getrandom per event would cost more). */
static void
events_tag(struct task_events *e, char out[37])
{
	unsigned char b[16];
	for (int i = 0; i < 2; i++) {
		e->rng ^= e->rng >> 12;
		e->rng ^= e->rng << 25;
		e->rng ^= e->rng >> 27;
		uint64_t v = e->rng * 0x2545F4914F6CDD1DULL;
		memcpy(b + 8 * i, &v, 8);
	}
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	static const char hex[] = "0123456789abcdef";
	int o = 0;
	for (int i = 0; i < 16; i++) {
		if (i == 4 || i == 6 || i == 8 || i == 10)
			out[o++] = '-';
		out[o++] = hex[b[i] >> 4];
		out[o++] = hex[b[i] & 15];
	}
	out[o] = '\0';
}

#define EVENT_BATCH_MAX 49152 /* bytes of events in one PUBLISH, about (base64 grows it by a third) */

/* A new event in the tick's batch, written in place up to its own fields: the common head, the clock and the
 * task's uuid. */
static struct sbuf *
events_begin(struct worker *w, const struct job *j)
{
	struct task_events *e = &w->events;
	struct sbuf *b = &e->batch;
	if (e->nbatch > 0 && b->len > EVENT_BATCH_MAX)
		events_flush(w);
	if (e->nbatch == 0) {
		sbuf_reset(b);
		sbuf_add(b, "[", 1); /* left out again when the batch is one event */
	} else {
		sbuf_add(b, ", ", 2);
	}
	sbuf_add(b, e->head.p, e->head.len);
	sbuf_add_uint(b, ++e->clock);
	sbuf_adds(b, ", \"uuid\": ");
	const char *id = j->m.task_id ? j->m.task_id : "";
	sbuf_add_json_string(b, id, strlen(id));
	return b;
}

/* ", "key": " of a literal key, its length known when compiled (these run a dozen times per task) */
#define EVENTS_KEY(b, key) sbuf_add((b), ", \"" key "\": ", sizeof(", \"" key "\": ") - 1)
#define events_str(b, key, s, n)                                                                                       \
	do {                                                                                                           \
		EVENTS_KEY(b, key);                                                                                    \
		events_value(b, s, n);                                                                                 \
	} while (0)
#define events_raw(b, key, json)                                                                                       \
	do {                                                                                                           \
		EVENTS_KEY(b, key);                                                                                    \
		sbuf_adds(b, json);                                                                                    \
	} while (0)

/* A string value: null, the JSON literal, or its first EVENT_TEXT_MAX bytes and "...". */
static void
events_value(struct sbuf *b, const char *s, size_t n)
{
	if (s == NULL) {
		sbuf_adds(b, "null");
		return;
	}
	if (n > EVENT_TEXT_MAX) {
		/* cut on a UTF-8 boundary, marked as saferepr marks it */
		n = EVENT_TEXT_MAX;
		while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
			n--;
		sbuf_add_json_string(b, s, n);
		b->len--; /* the literal's closing quote: the ellipsis goes inside */
		sbuf_adds(b, "...\"");
		return;
	}
	sbuf_add_json_string(b, s, n);
}

static void
events_ignore(struct rpipe *p, redisReply *r, void *arg)
{
}

/* Close the event with timestamp and type. */
static void
events_send(struct worker *w, const char *type)
{
	struct task_events *e = &w->events;
	struct sbuf *b = &e->batch;
	char num[SBUF_FIXED_MAX];
	size_t n = sbuf_fixed(now_wall(), 6, num);
	sbuf_adds(b, ", \"timestamp\": ");
	sbuf_add(b, num, n);
	sbuf_adds(b, ", \"type\": \"");
	sbuf_adds(b, type);
	sbuf_adds(b, "\"}");
	e->nbatch++;
	e->batch_type = type;
	engine_tick(w);
}

/*
 * Standard base64 of the batch, appended in place: b64_encode's copy (a malloc, then a strlen and a copy
 * into the envelope) was a tenth of an event's cost, its per-group branches another.
 */
static void
events_base64(struct task_events *e, struct sbuf *v, const unsigned char *p, size_t len)
{
	sbuf_reserve(v, (len + 2) / 3 * 4);
	char *o = v->p + v->len;
	size_t i = 0;
	for (; i + 3 <= len; i += 3, o += 4) {
		uint32_t g = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
		memcpy(o, e->b64[g >> 12], 2);
		memcpy(o + 2, e->b64[g & 0xfff], 2);
	}
	if (i < len) {
		uint32_t g = (uint32_t)p[i] << 16 | (i + 1 < len ? (uint32_t)p[i + 1] << 8 : 0);
		memcpy(o, e->b64[g >> 12], 2);
		o[2] = i + 1 < len ? e->b64[g & 0xfff][0] : '=';
		o[3] = '=';
		o += 4;
	}
	v->len = (size_t)(o - v->p);
	v->p[v->len] = '\0';
}

/*
 * The tick's events in one PUBLISH: one event as itself, several as Celery's own batch (a JSON list of events,
 * routing key "task.multi", what its dispatcher's buffer groups send and every receiver since Celery 4 reads),
 * so a drain's three events per task cost one command per tick, not three per task.
 */
void
events_flush(struct worker *w)
{
	struct task_events *e = &w->events;
	if (e->nbatch == 0)
		return;
	char rk[32] = "task.multi";
	struct sbuf *b = &e->batch;
	const char *events = b->p;
	size_t len = b->len;
	if (e->nbatch == 1) {
		/* the routing key: the type with '-' as '.' (celery/events/event.py) */
		size_t n = 0;
		for (; e->batch_type[n] != '\0' && n + 1 < sizeof rk; n++)
			rk[n] = e->batch_type[n] == '-' ? '.' : e->batch_type[n];
		rk[n] = '\0';
		events++; /* its "[" */
		len--;
	} else {
		sbuf_add(b, "]", 1);
		len++;
	}
	e->nbatch = 0;
	struct sbuf *v = &e->env;
	sbuf_reset(v);
	sbuf_adds(v, "{\"body\": \"");
	events_base64(e, v, (const unsigned char *)events, len);
	sbuf_reset(b);
	sbuf_add(v, e->mid.p, e->mid.len);
	sbuf_adds(v, rk);
	char tag[37];
	events_tag(e, tag);
	sbuf_adds(v, "\"}, \"priority\": 0, \"body_encoding\": \"base64\", \"delivery_tag\": \"");
	sbuf_adds(v, tag);
	sbuf_adds(v, "\"}}");
	struct sbuf *c = &e->chan;
	sbuf_reset(c);
	sbuf_adds(c, "/");
	sbuf_adds(c, w->db_str[0]);
	sbuf_adds(c, ".celeryev/");
	sbuf_adds(c, rk);
	const char *argv[] = {"PUBLISH", c->p, v->p};
	size_t lens[] = {7, c->len, v->len};
	/* fire and forget, as kombu's fanout is: events lost with the connection are not sent again */
	rpipe_send(&w->broker, events_ignore, NULL, 3, argv, lens);
}

static void
events_iso(struct sbuf *b, double t)
{
	if (t <= 0) {
		sbuf_add(b, "null", 4);
		return;
	}
	char iso[META_ISO_MAX];
	size_t n = meta_iso(t, true, iso);
	sbuf_add_json_string(b, iso, n);
}

void
events_received(struct worker *w, const struct job *j)
{
	const struct message *m = &j->m;
	struct sbuf *b = events_begin(w, j);
	events_str(b, "name", m->task_name, m->task_name ? strlen(m->task_name) : 0);
	events_str(b, "args", m->args_json ? m->args_json : "[]", m->args_json ? m->args_len : 2);
	events_str(b, "kwargs", m->kwargs_json ? m->kwargs_json : "{}", m->kwargs_json ? m->kwargs_len : 2);
	const char *root = m->parent_id ? NULL : m->task_id; /* a task with no parent is its own root */
	events_str(b, "root_id", root, root ? strlen(root) : 0);
	events_str(b, "parent_id", m->parent_id, m->parent_id ? strlen(m->parent_id) : 0);
	sbuf_adds(b, ", \"retries\": ");
	sbuf_add_uint(b, m->retries > 0 ? (unsigned long long)m->retries : 0);
	EVENTS_KEY(b, "eta");
	events_iso(b, m->eta);
	EVENTS_KEY(b, "expires");
	events_iso(b, m->expires);
	events_send(w, "task-received");
}

void
events_started(struct worker *w, const struct job *j)
{
	events_begin(w, j);
	events_send(w, "task-started");
}

void
events_succeeded(struct worker *w, const struct job *j, double runtime, const char *result, size_t len)
{
	struct sbuf *b = events_begin(w, j);
	/* Python sends repr(result): its scalars spelt as Python spells them */
	if (result == NULL || (len == 4 && memcmp(result, "null", 4) == 0))
		result = "None", len = 4;
	else if (len == 4 && memcmp(result, "true", 4) == 0)
		result = "True";
	else if (len == 5 && memcmp(result, "false", 5) == 0)
		result = "False";
	events_str(b, "result", result, len);
	char num[SBUF_FIXED_MAX];
	size_t n = sbuf_fixed(runtime, 9, num);
	sbuf_adds(b, ", \"runtime\": ");
	sbuf_add(b, num, n);
	events_send(w, "task-succeeded");
}

void
events_failed(struct worker *w, const struct job *j, const char *type, const char *msg, bool retried)
{
	struct sbuf *b = events_begin(w, j);
	/* safe_repr(exc): Type('message'), the message quoted as Python's repr quotes it */
	struct sbuf *s = &w->scratch;
	sbuf_reset(s);
	sbuf_adds(s, type);
	sbuf_adds(s, "('");
	for (const char *p = msg; p && *p; p++) {
		if (*p == '\\' || *p == '\'')
			sbuf_add(s, "\\", 1);
		sbuf_add(s, p, 1);
	}
	sbuf_adds(s, "')");
	events_str(b, "exception", s->p, s->len);
	sbuf_reset(s);
	sbuf_adds(s, type);
	sbuf_adds(s, ": ");
	sbuf_adds(s, msg ? msg : "");
	events_str(b, "traceback", s->p, s->len);
	events_send(w, retried ? "task-retried" : "task-failed");
}

void
events_revoked(struct worker *w, const struct job *j, bool terminated, const char *signal, bool expired)
{
	struct sbuf *b = events_begin(w, j);
	events_raw(b, "terminated", terminated ? "true" : "false");
	if (terminated)
		/* Celery sends the signal's number */
		events_raw(b, "signum",
		           signal && (strstr(signal, "KILL") != NULL || strcmp(signal, "9") == 0) ? "9" : "15");
	else
		events_raw(b, "signum", "null");
	events_raw(b, "expired", expired ? "true" : "false");
	events_send(w, "task-revoked");
}

void
events_rejected(struct worker *w, const struct job *j)
{
	struct sbuf *b = events_begin(w, j);
	events_raw(b, "requeue", "false");
	events_send(w, "task-rejected");
}

/*
 * Celery's task events (celery/worker/request.py, strategy.py; reference §5.6): task-received, -started,
 * -succeeded, -failed, -retried, -revoked, -rejected, as a Python worker sends them with -E: PUBLISH on the
 * celeryev fanout, "/<db>.celeryev/<type with . for ->", a kombu envelope with headers.hostname = the node and the
 * event's JSON body. The events of one loop tick leave as one command (events_flush) in the same write as the
 * tasks' other commands (no round trip of their own, no reply waited for). Off, they cost the callers one branch
 * on w->events.on.
 *
 * The body is the envelope's "body" string itself, with body_encoding null: what kombu's virtual transport
 * writes when its body_encoding option is None, and reads back as the body unchanged (Channel.decode_body). A
 * Python worker base64s it (the option's default); base64 was a third of the events' cost here, and the event is
 * written escaped for its place in the envelope as it is built, so nothing is encoded twice: every literal below
 * carries \" for ", and a string value is escaped for JSON and then once more (events_value).
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

/* JSON text as the contents of a JSON string: sbuf_add_json_string's output is valid UTF-8 without control
 * characters, so only " and \ need a backslash. */
static void
events_escape(struct sbuf *b, const char *s, size_t n)
{
	const char *end = s + n;
	sbuf_reserve(b, n);
	while (s < end) {
		const char *run = s;
		while (s < end && *s != '"' && *s != '\\')
			s++;
		if (s > run)
			sbuf_add(b, run, (size_t)(s - run));
		if (s == end)
			break;
		char e[2] = {'\\', *s++};
		sbuf_add(b, e, 2);
	}
}

void
events_init(struct worker *w)
{
	struct task_events *e = &w->events;
	e->on = w->cfg->send_task_events;
	if (getrandom(&e->rng, sizeof e->rng, 0) != (ssize_t)sizeof e->rng || e->rng == 0)
		e->rng = (uint64_t)w->pid * 0x9E3779B97F4A7C15ULL + 7;
	/* celery.utils.time.utcoffset: hours west of UTC */
	time_t t = time(NULL);
	struct tm tm;
	localtime_r(&t, &tm);
	char num[64];
	struct sbuf *hd = &e->tmp;
	sbuf_adds(hd, "{\"hostname\": ");
	sbuf_add_json_string(hd, w->node, strlen(w->node));
	snprintf(num, sizeof num, ", \"utcoffset\": %ld, \"pid\": %ld, \"clock\": ", -(long)tm.tm_gmtoff / 3600,
	         w->pid);
	sbuf_adds(hd, num);
	events_escape(&e->head, hd->p, hd->len);
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
	sbuf_free(&e->tmp);
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

/* ', \"key\": ' of a literal key, its length known when compiled (these run a dozen times per task) */
#define EVENTS_KEY(b, key) sbuf_add((b), ", \\\"" key "\\\": ", sizeof(", \\\"" key "\\\": ") - 1)

static void events_value(struct task_events *e, struct sbuf *b, const char *s, size_t n);

#define EVENT_BATCH_MAX 49152 /* bytes of events in one PUBLISH, about */
#define EVENT_ENV_HEAD  "{\"body\": \""

/* A new event in the tick's batch, written in place up to its own fields: the common head, the clock and the
 * task's uuid. The batch is the envelope itself, up to the end of its body: '{"body": "[' and the events. */
static struct sbuf *
events_begin(struct worker *w, const struct job *j)
{
	struct task_events *e = &w->events;
	struct sbuf *b = &e->env;
	if (e->nbatch > 0 && b->len > EVENT_BATCH_MAX)
		events_flush(w);
	if (e->nbatch == 0) {
		sbuf_reset(b);
		sbuf_add(b, EVENT_ENV_HEAD "[", sizeof EVENT_ENV_HEAD); /* the "[" left out again for one event */
	} else {
		sbuf_add(b, ", ", 2);
	}
	sbuf_add(b, e->head.p, e->head.len);
	sbuf_add_uint(b, ++e->clock);
	EVENTS_KEY(b, "uuid");
	const char *id = j->m.task_id ? j->m.task_id : "";
	events_value(e, b, id, strlen(id));
	return b;
}

#define events_str(b, key, s, n)                                                                                       \
	do {                                                                                                           \
		EVENTS_KEY(b, key);                                                                                    \
		events_value(&w->events, b, s, n);                                                                     \
	} while (0)
#define events_raw(b, key, json)                                                                                       \
	do {                                                                                                           \
		EVENTS_KEY(b, key);                                                                                    \
		sbuf_adds(b, json);                                                                                    \
	} while (0)

/* A string value: null, the JSON literal, or its first EVENT_TEXT_MAX bytes and "...", escaped for the body. */
static void
events_value(struct task_events *e, struct sbuf *b, const char *s, size_t n)
{
	if (s == NULL) {
		sbuf_add(b, "null", 4);
		return;
	}
	/* the common case (ids, names, "[]"): no byte that either escape would touch, eight at a time */
	const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
	size_t i = 0;
	if (n <= EVENT_TEXT_MAX) {
		for (; i + 8 <= n; i += 8) {
			uint64_t x, q, k;
			memcpy(&x, s + i, 8);
			q = x ^ (0x22 * ones);
			k = x ^ (0x5c * ones);
			if (((x | ((x - 0x20 * ones) & ~x) | ((q - ones) & ~q) | ((k - ones) & ~k)) & highs) != 0)
				break;
		}
		for (unsigned char c; i < n && (c = (unsigned char)s[i]) >= 0x20 && c < 0x80 && c != '"' && c != '\\';)
			i++;
	}
	if (i == n) {
		sbuf_reserve(b, n + 4);
		sbuf_add(b, "\\\"", 2);
		sbuf_add(b, s, n);
		sbuf_add(b, "\\\"", 2);
		return;
	}
	struct sbuf *t = &e->tmp;
	sbuf_reset(t);
	if (n > EVENT_TEXT_MAX) {
		/* cut on a UTF-8 boundary, marked as saferepr marks it */
		n = EVENT_TEXT_MAX;
		while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
			n--;
		sbuf_add_json_string(t, s, n);
		t->len--; /* the literal's closing quote: the ellipsis goes inside */
		sbuf_adds(t, "...\"");
	} else {
		sbuf_add_json_string(t, s, n);
	}
	events_escape(b, t->p, t->len);
}

/* time.time() with microseconds; the seconds' digits written once a second */
static void
events_stamp(struct task_events *e, struct sbuf *b)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	if (ts.tv_sec != e->stamp_sec || e->stamp_len == 0) {
		e->stamp_sec = ts.tv_sec;
		e->stamp_len = sbuf_digits(ts.tv_sec > 0 ? (unsigned long long)ts.tv_sec : 0, e->stamp);
		e->stamp[e->stamp_len++] = '.';
	}
	sbuf_reserve(b, e->stamp_len + 6);
	char *o = b->p + b->len;
	memcpy(o, e->stamp, e->stamp_len);
	long us = ts.tv_nsec / 1000;
	for (int i = 5; i >= 0; i--, us /= 10)
		o[e->stamp_len + (size_t)i] = (char)('0' + us % 10);
	b->len += e->stamp_len + 6;
	b->p[b->len] = '\0';
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
	struct sbuf *b = &e->env;
	EVENTS_KEY(b, "timestamp");
	events_stamp(e, b);
	EVENTS_KEY(b, "type");
	sbuf_add(b, "\\\"", 2);
	sbuf_adds(b, type);
	sbuf_add(b, "\\\"}", 3);
	e->nbatch++;
	e->batch_type = type;
	engine_tick(w);
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
	struct sbuf *v = &e->env;
	size_t skip = 0;
	if (e->nbatch == 1) {
		/* the routing key: the type with '-' as '.' (celery/events/event.py) */
		size_t n = 0;
		for (; e->batch_type[n] != '\0' && n + 1 < sizeof rk; n++)
			rk[n] = e->batch_type[n] == '-' ? '.' : e->batch_type[n];
		rk[n] = '\0';
		/* the "[": the envelope's head moves over it */
		skip = 1;
		memmove(v->p + 1, v->p, sizeof EVENT_ENV_HEAD - 1);
	} else {
		sbuf_add(v, "]", 1);
	}
	e->nbatch = 0;
	sbuf_add(v, e->mid.p, e->mid.len);
	sbuf_adds(v, rk);
	char tag[37];
	events_tag(e, tag);
	sbuf_adds(v, "\"}, \"priority\": 0, \"body_encoding\": null, \"delivery_tag\": \"");
	sbuf_adds(v, tag);
	sbuf_adds(v, "\"}}");
	struct sbuf *c = &e->chan;
	sbuf_reset(c);
	sbuf_adds(c, "/");
	sbuf_adds(c, w->db_str[0]);
	sbuf_adds(c, ".celeryev/");
	sbuf_adds(c, rk);
	const char *argv[] = {"PUBLISH", c->p, v->p + skip};
	size_t lens[] = {7, c->len, v->len - skip};
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
	sbuf_add(b, "\\\"", 2);
	sbuf_add(b, iso, n);
	sbuf_add(b, "\\\"", 2);
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
	EVENTS_KEY(b, "retries");
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
	EVENTS_KEY(b, "runtime");
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

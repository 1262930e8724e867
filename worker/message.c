/*
 * Celery task messages (protocol v2, and v1 as sent with task_protocol=1): the envelope scan, the peek the sweeps
 * use, retry and redelivered envelopes. Key names, times, base64 and the dead-letter and ETA records are
 * message-codec.c's.
 *
 * The hot path builds no DOM: jscan (jsmn, checked strictly) tokenizes the envelope and the body, the fields are
 * read from the tokens, and the strings a worker keeps are copied (unescaped) into one allocation per message.
 * Accepted and refused messages, reasons and exc_types are those of the jansson decoder this replaced.
 */
#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include "jscan.h"
#include "log.h"
#include "util.h"
#include "worker.h"

/* ---- the decoder ---- */

/* The longest time limit a message may ask for: anything longer is a producer's mistake (or an overflow of the
 * timer), refused like any other malformed field. */
#define MESSAGE_MAX_LIMIT_S 1e7
/* Epoch seconds of 9999-12-31T23:59:59Z: the latest time ISO 8601 can write, and far past any real ETA. */
#define MESSAGE_MAX_TIME 253402300799.0

struct decode {
	struct message *m;
	size_t used, cap; /* of m->store */
	struct jscan env, body;
	jsmntok_t env_tok[JSCAN_STACK_TOKENS], body_tok[JSCAN_STACK_TOKENS];
};

/* The string at token i, unescaped into the store; NULL when it is not a string. The store is sized for each
 * string token copied at most once (decode_envelope). */
static const char *
decode_str(struct decode *d, const struct jscan *s, int i)
{
	if (!jscan_is(s, i, JSMN_STRING))
		return NULL;
	const char *p = s->js + s->tok[i].start;
	size_t n = (size_t)(s->tok[i].end - s->tok[i].start);
	if (d->used + n + 1 > d->cap)
		fatalx("message store overflow (%zu + %zu > %zu)", d->used, n + 1, d->cap);
	char *out = d->m->store + d->used;
	if (memchr(p, '\\', n) != NULL)
		n = jscan_unescape(p, n, out);
	else
		memcpy(out, p, n);
	out[n] = '\0';
	d->used += n + 1;
	return out;
}

static const char *
decode_str_or_empty(struct decode *d, const struct jscan *s, int i)
{
	const char *v = decode_str(d, s, i);
	return v ? v : "";
}

static int bad(struct message *m, const char *exc_type, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int
bad(struct message *m, const char *exc_type, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(m->reason, sizeof m->reason, fmt, ap);
	va_end(ap);
	spark_strlcpy(m->exc_type, exc_type, sizeof m->exc_type);
	return -1;
}

/* An id too long to name a result is dropped, so that no FAILURE meta is written under it. */
static int
decode_limits(struct message *m)
{
	if (m->task_id != NULL && strlen(m->task_id) > MESSAGE_MAX_ID) {
		m->task_id = NULL;
		return bad(m, "ValueError", "task id is longer than %d bytes (MESSAGE_MAX_ID)", MESSAGE_MAX_ID);
	}
	if (m->task_name != NULL && strlen(m->task_name) > MESSAGE_MAX_NAME)
		return bad(m, "ValueError", "task name is longer than %d bytes (MESSAGE_MAX_NAME)", MESSAGE_MAX_NAME);
	return 0;
}

/* A time value: ISO string, or null/absent (0); a number is never sent by Celery 5, but harmless to accept. */
static int
decode_time(struct decode *d, const struct jscan *s, int i, double *out)
{
	*out = 0;
	if (i < 0 || jscan_null(s, i))
		return 0;
	if (jscan_is(s, i, JSMN_STRING))
		return message_parse_iso(decode_str(d, s, i), out);
	if (jscan_number(s, i)) {
		*out = jscan_double(s, i);
		return *out >= 0 && *out <= MESSAGE_MAX_TIME ? 0 : -1;
	}
	return -1;
}

/* A whole number in [lo, hi]: 1 = read into *v; 0 = absent or null; -1 = anything else. An integral real (3.0)
 * counts as its value, as Python's int() of it does in Celery and kombu. */
static int
decode_whole(const struct jscan *s, int i, long long lo, long long hi, long long *v)
{
	if (i < 0 || jscan_null(s, i))
		return 0;
	long long n;
	if (!jscan_integer(s, i, &n)) {
		if (!jscan_number(s, i))
			return -1;
		double x = jscan_double(s, i);
		if (x != floor(x) || x < (double)lo || x > (double)hi)
			return -1;
		n = (long long)x;
	}
	if (n < lo || n > hi)
		return -1;
	*v = n;
	return 1;
}

/* One limit of timelimit: null (unset) or seconds from 0 to MESSAGE_MAX_LIMIT_S. */
static int
decode_limit(const struct jscan *s, int i, double *out)
{
	if (jscan_null(s, i))
		return 0;
	if (!jscan_number(s, i))
		return -1;
	double x = jscan_double(s, i);
	if (!(x >= 0 && x <= MESSAGE_MAX_LIMIT_S))
		return -1;
	*out = x;
	return 0;
}

/* timelimit: absent, null, or Celery's [hard, soft], each null or seconds */
static int
decode_timelimit(const struct jscan *s, int tl, struct message *m)
{
	if (tl < 0 || jscan_null(s, tl))
		return 0;
	if (!jscan_is(s, tl, JSMN_ARRAY) || s->tok[tl].size != 2)
		return -1;
	int soft = jscan_after(s, tl + 1);
	if (decode_limit(s, tl + 1, &m->hard_limit) < 0 || decode_limit(s, soft, &m->soft_limit) < 0)
		return -1;
	return 0;
}

enum { T_PROPS, T_HEADERS, T_BODY, T_CTYPE, T_CENC, T_N };
static const char *const top_names[T_N] = {"properties", "headers", "body", "content-type", "content-encoding"};
enum { P_TAG, P_INFO, P_PRIORITY, P_CORRELATION, P_BENC, P_N };
static const char *const props_names[P_N] = {"delivery_tag", "delivery_info", "priority", "correlation_id",
                                             "body_encoding"};
enum { I_EXCHANGE, I_ROUTING, I_REDELIVERED, I_N };
static const char *const info_names[I_N] = {"exchange", "routing_key", "redelivered"};
enum {
	H_ID,
	H_TASK,
	H_REDELIVERED,
	H_COMPRESSION,
	H_RETRIES,
	H_ETA,
	H_EXPIRES,
	H_TIMELIMIT,
	H_IGNORE,
	H_PARENT,
	H_GROUP,
	H_N
};
static const char *const headers_names[H_N] = {"id",      "task",      "redelivered",   "compression", "retries", "eta",
                                               "expires", "timelimit", "ignore_result", "parent_id",   "group"};
/* protocol v1: the task fields live in the body */
enum { B_TASK, B_ID, B_ARGS, B_KWARGS, B_RETRIES, B_ETA, B_EXPIRES, B_TIMELIMIT, B_N };
static const char *const v1_names[B_N] = {"task", "id", "args", "kwargs", "retries", "eta", "expires", "timelimit"};

/* The body: decoded into the store and scanned there, followed by a space while it is scanned (jsmn ends a
 * number only at a delimiter, and jansson took a bare "5" as a body) and a NUL. */
static int
decode_body(struct decode *d, int body, const char *benc)
{
	struct message *m = d->m;
	const jsmntok_t *t = &d->env.tok[body];
	const char *src = d->env.js + t->start;
	size_t n = (size_t)(t->end - t->start), blen;
	if (d->used + n + 2 > d->cap)
		fatalx("message store overflow (%zu + %zu > %zu)", d->used, n + 2, d->cap);
	char *out = m->store + d->used;
	bool escaped = memchr(src, '\\', n) != NULL;
	if (benc != NULL && strcmp(benc, "base64") == 0) {
		if (escaped) {
			n = jscan_unescape(src, n, out);
			src = out;
		}
		if (b64_decode_into(src, n, (unsigned char *)out, &blen) < 0)
			return bad(m, "ValueError", "body is not valid base64");
	} else if (benc == NULL || strcmp(benc, "utf-8") == 0) {
		if (escaped) {
			blen = jscan_unescape(src, n, out);
		} else {
			memcpy(out, src, n);
			blen = n;
		}
	} else {
		return bad(m, "ValueError", "body_encoding %.100s is not supported", benc);
	}
	out[blen] = ' ';
	out[blen + 1] = '\0';
	d->used += blen + 2;
	m->body = out;
	m->body_len = blen;
	int r = jscan_run(&d->body, out, blen + 1, d->body_tok, JSCAN_STACK_TOKENS);
	/* scanned: a C string from now on (every number still to read is inside a container, ended by a delimiter) */
	out[blen] = '\0';
	if (r == -2)
		return bad(m, "ValueError", "body has more than %d JSON tokens", JSCAN_MAX_TOKENS);
	if (r < 0)
		return bad(m, "ValueError", "body is not JSON: %s", d->body.err);
	return 0;
}

static int
decode_envelope(struct decode *d, const char *raw, size_t len)
{
	struct message *m = d->m;
	struct jscan *e = &d->env, *b = &d->body;
	int r = jscan_run(e, raw, len, d->env_tok, JSCAN_STACK_TOKENS);
	if (r == -2)
		return bad(m, "ValueError", "envelope has more than %d JSON tokens", JSCAN_MAX_TOKENS);
	if (r < 0)
		return bad(m, "ValueError", "envelope is not JSON: %s", e->err);
	if (e->tok[0].type == JSMN_STRING)
		return bad(m, "ValueError", "envelope is not JSON: '[' or '{' expected");
	if (e->tok[0].type != JSMN_OBJECT)
		return bad(m, "ValueError", "envelope is not a JSON object");

	int top[T_N], pw[P_N], iw[I_N], hw[H_N];
	jscan_pick(e, 0, top_names, top, T_N);
	int props = jscan_is(e, top[T_PROPS], JSMN_OBJECT) ? top[T_PROPS] : -1;
	int headers = jscan_is(e, top[T_HEADERS], JSMN_OBJECT) ? top[T_HEADERS] : -1;
	int body = jscan_is(e, top[T_BODY], JSMN_STRING) ? top[T_BODY] : -1;
	jscan_pick(e, props, props_names, pw, P_N);
	jscan_pick(e, pw[P_INFO], info_names, iw, I_N);
	jscan_pick(e, headers, headers_names, hw, H_N);

	/* One allocation: every string copied from the envelope fits in the bytes of its token and its quotes, the
	 * body in its token's; the strings of a v1 body fit in the body's size once more. */
	size_t body_span = body >= 0 ? (size_t)(e->tok[body].end - e->tok[body].start) : 0;
	bool maybe_v1 = !jscan_is(e, hw[H_TASK], JSMN_STRING);
	d->cap = len + 2 + (maybe_v1 ? body_span + 1 : 0);
	m->store = xmalloc(d->cap);

	m->delivery_tag = decode_str_or_empty(d, e, pw[P_TAG]);
	m->exchange = decode_str_or_empty(d, e, iw[I_EXCHANGE]);
	m->routing_key = decode_str_or_empty(d, e, iw[I_ROUTING]);
	m->redelivered = jscan_true(e, iw[I_REDELIVERED]) || jscan_true(e, hw[H_REDELIVERED]);
	m->task_id = decode_str(d, e, hw[H_ID]);
	m->task_name = decode_str(d, e, hw[H_TASK]);
	m->parent_id = decode_str(d, e, hw[H_PARENT]);
	m->group_id = decode_str(d, e, hw[H_GROUP]);
	if (m->task_id == NULL)
		m->task_id = decode_str(d, e, pw[P_CORRELATION]);
	if (decode_limits(m) < 0)
		return -1;

	if (headers < 0)
		return bad(m, "ValueError", "message has no headers");
	const char *ctype = decode_str(d, e, top[T_CTYPE]);
	if (ctype != NULL && strcmp(ctype, "application/json") != 0)
		return bad(m, "ValueError", "content-type %.100s is not supported (only application/json)", ctype);
	if (hw[H_COMPRESSION] >= 0)
		return bad(m, "ValueError", "compressed bodies are not supported");
	const char *cenc = decode_str(d, e, top[T_CENC]);
	if (cenc != NULL && strcasecmp(cenc, "utf-8") != 0 && strcasecmp(cenc, "utf8") != 0)
		return bad(m, "ValueError", "content-encoding %.100s is not supported (only utf-8)", cenc);
	if (body < 0)
		return bad(m, "ValueError", "message has no body");
	if (decode_body(d, body, decode_str(d, e, pw[P_BENC])) < 0)
		return -1;

	int bw[B_N];
	jscan_pick(b, m->task_name == NULL ? 0 : -1, v1_names, bw, B_N);
	const struct jscan *f; /* where retries, eta, expires and timelimit are */
	int args, kwargs, retries, eta, expires, timelimit;
	if (m->task_name == NULL && jscan_is(b, bw[B_TASK], JSMN_STRING)) {
		m->v1 = true;
		m->task_name = decode_str(d, b, bw[B_TASK]);
		m->task_id = decode_str(d, b, bw[B_ID]);
		if (decode_limits(m) < 0)
			return -1;
		f = b;
		args = bw[B_ARGS];
		kwargs = bw[B_KWARGS];
		retries = bw[B_RETRIES];
		eta = bw[B_ETA];
		expires = bw[B_EXPIRES];
		timelimit = bw[B_TIMELIMIT];
	} else {
		if (m->task_name == NULL)
			return bad(m, "ValueError", "message has no task header");
		if (b->tok[0].type != JSMN_ARRAY || b->tok[0].size < 2)
			return bad(m, "ValueError", "body is not [args, kwargs, embed]");
		f = e;
		args = 1;
		kwargs = jscan_after(b, 1);
		retries = hw[H_RETRIES];
		eta = hw[H_ETA];
		expires = hw[H_EXPIRES];
		timelimit = hw[H_TIMELIMIT];
		m->ignore_result = jscan_true(e, hw[H_IGNORE]);
	}
	if (m->task_id == NULL)
		return bad(m, "ValueError", "message has no task id");
	if (args < 0) { /* v1 without args: the decoder always took it as empty */
		m->args_json = "[]";
		m->args_len = 2;
	} else if (!jscan_is(b, args, JSMN_ARRAY)) {
		return bad(m, "TypeError", "args must be a list");
	} else {
		m->args_json = jscan_span(b, args, &m->args_len);
		if (b->tok[args].size > 0)
			m->arg0_json = jscan_span(b, args + 1, &m->arg0_len);
	}
	if (kwargs < 0) {
		m->kwargs_json = "{}";
		m->kwargs_len = 2;
	} else if (!jscan_is(b, kwargs, JSMN_OBJECT)) {
		return bad(m, "TypeError", "kwargs must be a dict");
	} else {
		m->kwargs_json = jscan_span(b, kwargs, &m->kwargs_len);
	}
	/* the fields a producer fills with numbers: a wrong type or range is refused, never read as a default */
	long long v;
	int got = decode_whole(f, retries, 0, MESSAGE_MAX_RETRIES, &v);
	if (got < 0)
		return bad(m, "ValueError", "retries is not a whole number from 0 to %d", MESSAGE_MAX_RETRIES);
	if (got > 0)
		m->retries = (int)v;
	if ((got = decode_whole(e, pw[P_PRIORITY], 0, 255, &v)) < 0)
		return bad(m, "ValueError", "priority is not a whole number from 0 to 255");
	if (got > 0)
		m->priority = (int)v;
	if (decode_timelimit(f, timelimit, m) < 0)
		return bad(m, "ValueError", "timelimit is not [hard, soft] with each null or seconds from 0 to %.0f",
		           MESSAGE_MAX_LIMIT_S);
	if (decode_time(d, f, eta, &m->eta) < 0)
		return bad(m, "ValueError", "eta is not an ISO 8601 time (nor epoch seconds up to year 9999)");
	if (decode_time(d, f, expires, &m->expires) < 0)
		return bad(m, "ValueError", "expires is not an ISO 8601 time (nor epoch seconds up to year 9999)");
	return 0;
}

int
message_decode(const char *raw, size_t len, struct message *m)
{
	memset(m, 0, sizeof *m);
	m->hard_limit = m->soft_limit = -1;
	m->exchange = m->routing_key = m->delivery_tag = "";
	struct decode d;
	d.m = m;
	d.used = d.cap = 0;
	d.env.heap = d.body.heap = NULL;
	int rv = decode_envelope(&d, raw, len);
	jscan_free(&d.env);
	jscan_free(&d.body);
	return rv;
}

int
message_dom(struct message *m, const char *raw, size_t len)
{
	json_error_t jerr;
	if (m->args_json == NULL || m->kwargs_json == NULL)
		return bad(m, "ValueError", "message_dom: the message was not decoded");
	if (m->args == NULL && (m->args = json_loadb(m->args_json, m->args_len, 0, &jerr)) == NULL)
		return bad(m, "ValueError", "args are not JSON: %s", jerr.text);
	if (m->kwargs == NULL && (m->kwargs = json_loadb(m->kwargs_json, m->kwargs_len, 0, &jerr)) == NULL)
		return bad(m, "ValueError", "kwargs are not JSON: %s", jerr.text);
	if (m->headers != NULL)
		return 0;
	static const char *const names[] = {"headers"};
	struct jscan s;
	jsmntok_t tok[JSCAN_STACK_TOKENS];
	int h = -1;
	if (jscan_run(&s, raw, len, tok, JSCAN_STACK_TOKENS) == 0)
		jscan_pick(&s, 0, names, &h, 1);
	if (jscan_is(&s, h, JSMN_OBJECT)) {
		size_t n;
		const char *p = jscan_span(&s, h, &n);
		m->headers = json_loadb(p, n, 0, &jerr);
	}
	jscan_free(&s);
	if (m->headers == NULL)
		return bad(m, "ValueError", "message headers are not a JSON object");
	return 0;
}

/* A string token's value as a new C string, or NULL. */
static char *
peek_str(const struct jscan *s, int i)
{
	if (!jscan_is(s, i, JSMN_STRING))
		return NULL;
	size_t n = (size_t)(s->tok[i].end - s->tok[i].start);
	char *out = xmalloc(n + 1);
	n = jscan_unescape(s->js + s->tok[i].start, n, out);
	out[n] = '\0';
	return out;
}

int
message_peek(const char *raw, size_t len, struct message_peek *pk)
{
	memset(pk, 0, sizeof *pk);
	static const char *const top_n[] = {"properties", "headers"};
	static const char *const props_n[] = {"delivery_tag", "delivery_info", "priority", "correlation_id"};
	static const char *const info_n[] = {"routing_key"};
	static const char *const headers_n[] = {"id", "ignore_result"};
	struct jscan s;
	jsmntok_t tok[JSCAN_STACK_TOKENS];
	s.heap = NULL;
	/* the body is one string token: the scan of a large message costs its bytes, not a copy of them */
	if (jscan_run(&s, raw, len, tok, JSCAN_STACK_TOKENS) < 0 || !jscan_is(&s, 0, JSMN_OBJECT)) {
		jscan_free(&s);
		return -1;
	}
	int top[2], pw[4], iw[1], hw[2];
	jscan_pick(&s, 0, top_n, top, 2);
	jscan_pick(&s, top[0], props_n, pw, 4);
	jscan_pick(&s, pw[1], info_n, iw, 1);
	jscan_pick(&s, top[1], headers_n, hw, 2);
	pk->tag = peek_str(&s, pw[0]);
	pk->routing_key = peek_str(&s, iw[0]);
	pk->id = peek_str(&s, hw[0]);
	if (pk->id == NULL)
		pk->id = peek_str(&s, pw[3]);
	long long v;
	if (decode_whole(&s, pw[2], 0, 255, &v) > 0)
		pk->priority = (int)v;
	pk->ignore_result = jscan_true(&s, hw[1]);
	jscan_free(&s);
	return 0;
}

void
message_peek_free(struct message_peek *pk)
{
	free(pk->id);
	free(pk->tag);
	free(pk->routing_key);
	memset(pk, 0, sizeof *pk);
}

void
message_free(struct message *m)
{
	free(m->store);
	m->store = NULL;
	json_decref(m->args);
	json_decref(m->kwargs);
	json_decref(m->headers);
	m->args = m->kwargs = m->headers = NULL;
	m->body = m->task_name = m->task_id = m->parent_id = m->group_id = NULL;
	m->args_json = m->kwargs_json = m->arg0_json = NULL;
	m->exchange = m->routing_key = m->delivery_tag = "";
}

char *
message_build_retry(const char *raw, size_t len, const struct message *m, int retries, double eta)
{
	json_t *env = json_loadb(raw, len, 0, NULL);
	if (!json_is_object(env)) {
		json_decref(env);
		return NULL;
	}
	char iso[64], tag[37];
	message_format_iso(eta, true, iso, sizeof iso);
	uuid4_string(tag);
	json_t *headers = json_object_get(env, "headers");
	json_t *props = json_object_get(env, "properties");
	json_object_del(headers, "redelivered");
	if (m->v1) {
		json_t *body = json_loadb(m->body, m->body_len, JSON_DECODE_ANY, NULL);
		if (!json_is_object(body)) {
			json_decref(body);
			json_decref(env);
			return NULL;
		}
		/* the decoder took a missing args/kwargs as empty, and the retry carries them */
		if (json_object_get(body, "args") == NULL)
			json_object_set_new(body, "args", json_array());
		if (json_object_get(body, "kwargs") == NULL)
			json_object_set_new(body, "kwargs", json_object());
		json_object_set_new(body, "retries", json_integer(retries));
		json_object_set_new(body, "eta", json_string(iso));
		char *text = json_dumps(body, JSON_COMPACT);
		json_decref(body);
		if (text == NULL) {
			json_decref(env);
			return NULL;
		}
		char *b64 = b64_encode((const unsigned char *)text, strlen(text));
		free(text);
		json_object_set_new(env, "body", json_string(b64));
		json_object_set_new(props, "body_encoding", json_string("base64"));
		free(b64);
	} else {
		json_object_set_new(headers, "retries", json_integer(retries));
		json_object_set_new(headers, "eta", json_string(iso));
		/* Python sends the retry from inside the task: its parent is the task itself */
		json_object_set_new(headers, "parent_id", json_string(m->task_id));
	}
	if (json_is_object(props)) {
		json_object_set_new(props, "delivery_tag", json_string(tag));
		json_object_del(json_object_get(props, "delivery_info"), "redelivered");
	}
	char *out = json_dumps(env, JSON_COMPACT);
	json_decref(env);
	return out;
}

char *
message_mark_redelivered(const char *raw, size_t len)
{
	json_t *env = json_loadb(raw, len, 0, NULL);
	if (!json_is_object(env)) {
		json_decref(env);
		return NULL;
	}
	json_t *headers = json_object_get(env, "headers");
	if (json_is_object(headers))
		json_object_set_new(headers, "redelivered", json_true());
	json_t *di = json_object_get(json_object_get(env, "properties"), "delivery_info");
	if (json_is_object(di))
		json_object_set_new(di, "redelivered", json_true());
	char *out = json_dumps(env, JSON_COMPACT);
	json_decref(env);
	return out;
}

double
message_retry_countdown(const struct spark_config *cfg, int retries, double rand01)
{
	if (!cfg->retry_backoff)
		return cfg->default_retry_delay;
	double cap = retries >= 60 ? cfg->retry_backoff_max : ldexp(1.0, retries);
	if (cap > cfg->retry_backoff_max)
		cap = cfg->retry_backoff_max;
	/* equal jitter: never less than half the backoff, so a retry storm still spreads out */
	return cap / 2 + rand01 * cap / 2;
}

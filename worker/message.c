/* Celery task messages (protocol v2, and v1 as sent with task_protocol=1): decoding, retries, key names. */
#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"
#include "util.h"
#include "worker.h"

static const int priority_steps[] = {0, 3, 6, 9};

int
message_priority_step(int priority)
{
	if (priority < 0)
		priority = 0;
	if (priority > 9)
		priority = 9;
	int step = 0;
	for (size_t i = 0; i < sizeof priority_steps / sizeof priority_steps[0]; i++)
		if (priority_steps[i] <= priority)
			step = priority_steps[i];
	return step;
}

char *
message_queue_key(const char *queue, int priority)
{
	int step = message_priority_step(priority);
	if (step == 0)
		return xstrdup(queue);
	return xasprintf("%s" KOMBU_SEP "%d", queue, step);
}

char *
message_queue_of_key(const char *key)
{
	const char *sep = strstr(key, KOMBU_SEP);
	return sep ? xstrndup(key, (size_t)(sep - key)) : xstrdup(key);
}

void
message_uuid4(char out[37])
{
	unsigned char b[16];
	size_t got = 0;
	while (got < sizeof b) {
		ssize_t n = getrandom(b + got, sizeof b - got, 0);
		if (n > 0)
			got += (size_t)n;
	}
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
	         b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

static int
digits(const char **p, int n, int *out)
{
	int v = 0;
	for (int i = 0; i < n; i++) {
		if (!isdigit((unsigned char)(*p)[i]))
			return -1;
		v = v * 10 + ((*p)[i] - '0');
	}
	*p += n;
	*out = v;
	return 0;
}

int
message_parse_iso(const char *s, double *out)
{
	int Y, M, D, h = 0, m = 0, sec = 0;
	double frac = 0;
	const char *p = s;
	if (digits(&p, 4, &Y) < 0 || *p++ != '-' || digits(&p, 2, &M) < 0 || *p++ != '-' || digits(&p, 2, &D) < 0)
		return -1;
	if (*p == 'T' || *p == ' ') {
		p++;
		if (digits(&p, 2, &h) < 0 || *p++ != ':' || digits(&p, 2, &m) < 0)
			return -1;
		if (*p == ':') {
			p++;
			if (digits(&p, 2, &sec) < 0)
				return -1;
			if (*p == '.' || *p == ',') {
				p++;
				double scale = 0.1;
				if (!isdigit((unsigned char)*p))
					return -1;
				while (isdigit((unsigned char)*p)) {
					frac += (*p - '0') * scale;
					scale /= 10;
					p++;
				}
			}
		}
	}
	long offset = 0;
	if (*p == 'Z' || *p == 'z') {
		p++;
	} else if (*p == '+' || *p == '-') {
		int sign = *p == '-' ? -1 : 1, oh, om = 0;
		p++;
		if (digits(&p, 2, &oh) < 0)
			return -1;
		if (*p == ':')
			p++;
		if (isdigit((unsigned char)*p) && digits(&p, 2, &om) < 0)
			return -1;
		offset = sign * (oh * 3600L + om * 60L);
	}
	if (*p != '\0' || M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60)
		return -1;
	struct tm tm = {.tm_year = Y - 1900, .tm_mon = M - 1, .tm_mday = D, .tm_hour = h, .tm_min = m, .tm_sec = sec};
	time_t t = timegm(&tm);
	*out = (double)t - (double)offset + frac;
	return 0;
}

void
message_format_iso(double t, bool aware, char *buf, size_t len)
{
	time_t secs = (time_t)floor(t);
	long usec = lround((t - (double)secs) * 1e6);
	if (usec >= 1000000) {
		secs++;
		usec -= 1000000;
	}
	struct tm tm;
	gmtime_r(&secs, &tm);
	snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%06ld%s", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
	         tm.tm_hour, tm.tm_min, tm.tm_sec, usec, aware ? "+00:00" : "");
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

static const char *
str_or_empty(json_t *o, const char *key)
{
	const char *s = json_string_value(json_object_get(o, key));
	return s ? s : "";
}

/* A header time value: ISO string, or null/absent (0). */
static int
time_field(json_t *v, double *out)
{
	*out = 0;
	if (v == NULL || json_is_null(v))
		return 0;
	if (json_is_string(v))
		return message_parse_iso(json_string_value(v), out);
	if (json_is_number(v)) { /* never sent by Celery 5, but harmless to accept */
		*out = json_number_value(v);
		return 0;
	}
	return -1;
}

/* Base64 here rather than libcrypto's EVP_*Block: loading libcrypto cost every worker process ~1.6 MiB RSS. */
static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int
b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

unsigned char *
message_b64_decode(const char *s, size_t len, size_t *outlen)
{
	while (len > 0 && isspace((unsigned char)s[len - 1]))
		len--;
	while (len > 0 && isspace((unsigned char)*s))
		s++, len--;
	if (len % 4 != 0 || len > (size_t)1 << 30)
		return NULL;
	size_t pad = len >= 1 && s[len - 1] == '=' ? (len >= 2 && s[len - 2] == '=' ? 2 : 1) : 0;
	unsigned char *out = xmalloc(len / 4 * 3 + 1), *o = out;
	for (size_t i = 0; i < len; i += 4) {
		/* '=' only as the padding of the last quantum, never in the middle */
		size_t data = i + 4 == len ? 4 - pad : 4;
		uint32_t v = 0;
		for (size_t k = 0; k < 4; k++) {
			int d = k < data ? b64_value((unsigned char)s[i + k]) : 0;
			if (d < 0) {
				free(out);
				return NULL;
			}
			v = v << 6 | (uint32_t)d;
		}
		*o++ = (unsigned char)(v >> 16);
		if (data > 2)
			*o++ = (unsigned char)(v >> 8);
		if (data > 3)
			*o++ = (unsigned char)v;
	}
	*outlen = (size_t)(o - out);
	*o = '\0';
	return out;
}

char *
message_b64_encode(const unsigned char *p, size_t len)
{
	char *out = xmalloc(4 * ((len + 2) / 3) + 1), *o = out;
	for (size_t i = 0; i < len; i += 3) {
		size_t n = len - i < 3 ? len - i : 3;
		uint32_t v = (uint32_t)p[i] << 16 | (n > 1 ? (uint32_t)p[i + 1] << 8 : 0) | (n > 2 ? p[i + 2] : 0);
		*o++ = b64_alphabet[v >> 18 & 63];
		*o++ = b64_alphabet[v >> 12 & 63];
		*o++ = n > 1 ? b64_alphabet[v >> 6 & 63] : '=';
		*o++ = n > 2 ? b64_alphabet[v & 63] : '=';
	}
	*o = '\0';
	return out;
}

static void
read_timelimit(json_t *tl, struct message *m)
{
	if (!json_is_array(tl))
		return;
	json_t *hard = json_array_get(tl, 0), *soft = json_array_get(tl, 1);
	if (json_is_number(hard) && json_number_value(hard) >= 0)
		m->hard_limit = json_number_value(hard);
	if (json_is_number(soft) && json_number_value(soft) >= 0)
		m->soft_limit = json_number_value(soft);
}

int
message_decode(const char *raw, size_t len, struct message *m)
{
	memset(m, 0, sizeof *m);
	m->hard_limit = m->soft_limit = -1;
	m->exchange = m->routing_key = m->delivery_tag = "";
	json_error_t jerr;
	m->env = json_loadb(raw, len, 0, &jerr);
	if (m->env == NULL)
		return bad(m, "ValueError", "envelope is not JSON: %s", jerr.text);
	if (!json_is_object(m->env))
		return bad(m, "ValueError", "envelope is not a JSON object");

	json_t *props = json_object_get(m->env, "properties");
	if (json_is_object(props)) {
		m->delivery_tag = str_or_empty(props, "delivery_tag");
		json_t *di = json_object_get(props, "delivery_info");
		m->exchange = str_or_empty(di, "exchange");
		m->routing_key = str_or_empty(di, "routing_key");
		json_t *pr = json_object_get(props, "priority");
		if (json_is_integer(pr))
			m->priority = (int)json_integer_value(pr);
		if (json_is_true(json_object_get(di, "redelivered")))
			m->redelivered = true;
	}
	m->headers = json_object_get(m->env, "headers");
	if (json_is_object(m->headers)) {
		m->task_id = json_string_value(json_object_get(m->headers, "id"));
		m->task_name = json_string_value(json_object_get(m->headers, "task"));
		if (json_is_true(json_object_get(m->headers, "redelivered")))
			m->redelivered = true;
	}
	if (m->task_id == NULL && json_is_object(props))
		m->task_id = json_string_value(json_object_get(props, "correlation_id"));

	if (!json_is_object(m->headers))
		return bad(m, "ValueError", "message has no headers");
	const char *ctype = json_string_value(json_object_get(m->env, "content-type"));
	if (ctype != NULL && strcmp(ctype, "application/json") != 0)
		return bad(m, "ValueError", "content-type %.100s is not supported (only application/json)", ctype);
	if (json_object_get(m->headers, "compression") != NULL)
		return bad(m, "ValueError", "compressed bodies are not supported");
	const char *cenc = json_string_value(json_object_get(m->env, "content-encoding"));
	if (cenc != NULL && strcasecmp(cenc, "utf-8") != 0 && strcasecmp(cenc, "utf8") != 0)
		return bad(m, "ValueError", "content-encoding %.100s is not supported (only utf-8)", cenc);

	json_t *jbody = json_object_get(m->env, "body");
	if (!json_is_string(jbody))
		return bad(m, "ValueError", "message has no body");
	const char *benc = json_is_object(props) ? json_string_value(json_object_get(props, "body_encoding")) : NULL;
	if (benc != NULL && strcmp(benc, "base64") == 0) {
		size_t blen;
		unsigned char *dec = message_b64_decode(json_string_value(jbody), json_string_length(jbody), &blen);
		if (dec == NULL)
			return bad(m, "ValueError", "body is not valid base64");
		m->body = json_loadb((const char *)dec, blen, JSON_DECODE_ANY, &jerr);
		free(dec);
	} else if (benc == NULL || strcmp(benc, "utf-8") == 0) {
		m->body = json_loadb(json_string_value(jbody), json_string_length(jbody), JSON_DECODE_ANY, &jerr);
	} else {
		return bad(m, "ValueError", "body_encoding %.100s is not supported", benc);
	}
	if (m->body == NULL)
		return bad(m, "ValueError", "body is not JSON: %s", jerr.text);

	json_t *retries, *eta, *expires;
	if (m->task_name == NULL && json_is_object(m->body) && json_is_string(json_object_get(m->body, "task"))) {
		/* protocol v1: everything in the body */
		m->v1 = true;
		m->task_name = json_string_value(json_object_get(m->body, "task"));
		m->task_id = json_string_value(json_object_get(m->body, "id"));
		m->args = json_object_get(m->body, "args");
		m->kwargs = json_object_get(m->body, "kwargs");
		retries = json_object_get(m->body, "retries");
		eta = json_object_get(m->body, "eta");
		expires = json_object_get(m->body, "expires");
		read_timelimit(json_object_get(m->body, "timelimit"), m);
		if (m->args == NULL)
			m->args = json_array(), json_object_set_new(m->body, "args", m->args);
		if (m->kwargs == NULL)
			m->kwargs = json_object(), json_object_set_new(m->body, "kwargs", m->kwargs);
	} else {
		if (m->task_name == NULL)
			return bad(m, "ValueError", "message has no task header");
		if (!json_is_array(m->body) || json_array_size(m->body) < 2)
			return bad(m, "ValueError", "body is not [args, kwargs, embed]");
		m->args = json_array_get(m->body, 0);
		m->kwargs = json_array_get(m->body, 1);
		retries = json_object_get(m->headers, "retries");
		eta = json_object_get(m->headers, "eta");
		expires = json_object_get(m->headers, "expires");
		read_timelimit(json_object_get(m->headers, "timelimit"), m);
		json_t *ir = json_object_get(m->headers, "ignore_result");
		m->ignore_result = json_is_true(ir);
	}
	if (m->task_id == NULL)
		return bad(m, "ValueError", "message has no task id");
	if (!json_is_array(m->args))
		return bad(m, "TypeError", "args must be a list");
	if (!json_is_object(m->kwargs))
		return bad(m, "TypeError", "kwargs must be a dict");
	if (json_is_integer(retries) && json_integer_value(retries) > 0 && json_integer_value(retries) < 1000000)
		m->retries = (int)json_integer_value(retries);
	if (time_field(eta, &m->eta) < 0)
		return bad(m, "ValueError", "eta is not an ISO 8601 time");
	if (time_field(expires, &m->expires) < 0)
		return bad(m, "ValueError", "expires is not an ISO 8601 time");
	return 0;
}

void
message_free(struct message *m)
{
	json_decref(m->env);
	json_decref(m->body);
	m->env = m->body = NULL;
}

char *
message_build_retry(const struct message *m, int retries, double eta)
{
	json_t *env = json_deep_copy(m->env);
	if (env == NULL)
		return NULL;
	char iso[64], tag[37];
	message_format_iso(eta, true, iso, sizeof iso);
	message_uuid4(tag);
	json_t *headers = json_object_get(env, "headers");
	json_t *props = json_object_get(env, "properties");
	json_object_del(headers, "redelivered");
	if (m->v1) {
		json_t *body = json_deep_copy(m->body);
		json_object_set_new(body, "retries", json_integer(retries));
		json_object_set_new(body, "eta", json_string(iso));
		char *text = json_dumps(body, JSON_COMPACT);
		json_decref(body);
		if (text == NULL) {
			json_decref(env);
			return NULL;
		}
		char *b64 = message_b64_encode((const unsigned char *)text, strlen(text));
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

char *
message_deadletter_entry(const char *reason, const char *queue, double at, const char *raw, size_t len)
{
	json_t *e = json_object();
	json_object_set_new(e, "reason", json_string(reason));
	json_object_set_new(e, "queue", queue ? json_string(queue) : json_null());
	json_object_set_new(e, "at", json_real(at));
	json_t *msg = json_stringn(raw, len);
	if (msg == NULL) {
		/* not UTF-8: keep the exact bytes in base64, and a readable approximation */
		char *b64 = message_b64_encode((const unsigned char *)raw, len);
		json_object_set_new(e, "message_base64", json_string(b64));
		free(b64);
		char *ascii = xmalloc(len + 1);
		for (size_t i = 0; i < len; i++)
			ascii[i] = (raw[i] > 0 && (unsigned char)raw[i] < 0x80) ? raw[i] : '?';
		ascii[len] = '\0';
		msg = json_string(ascii);
		free(ascii);
	}
	json_object_set_new(e, "message", msg);
	char *out = json_dumps(e, JSON_COMPACT);
	json_decref(e);
	if (out == NULL)
		fatalx("cannot encode a dead-letter entry");
	return out;
}

char *
message_eta_member(const char *qkey, const char *raw, size_t len)
{
	json_t *e = json_object();
	json_object_set_new(e, "queue", json_string(qkey));
	json_t *env = json_stringn(raw, len);
	if (env == NULL) {
		json_decref(e);
		return NULL;
	}
	json_object_set_new(e, "envelope", env);
	char *out = json_dumps(e, JSON_COMPACT);
	json_decref(e);
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

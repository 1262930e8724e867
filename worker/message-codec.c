/*
 * The small encodings Celery messages use: kombu's queue key names and priority steps, UUIDs, ISO 8601 times as
 * Celery writes them, standard base64 for body_encoding "base64", and the records a message is wrapped in
 * (spark:deadletter entries, spark:eta members).
 */
#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* The longest prefix of raw[0..n) that jansson takes as a string (a cut may split a UTF-8 sequence: up to 3
 * bytes back), or NULL when there is none (not UTF-8). */
static json_t *
deadletter_text(const char *raw, size_t n, bool cut)
{
	json_t *msg = json_stringn(raw, n);
	for (size_t back = 1; msg == NULL && cut && back <= 3 && back < n; back++)
		msg = json_stringn(raw, n - back);
	return msg;
}

char *
message_deadletter_entry(const char *reason, const char *queue, double at, const char *raw, size_t len)
{
	json_t *e = json_object();
	json_object_set_new(e, "reason", json_string(reason));
	json_object_set_new(e, "queue", queue ? json_string(queue) : json_null());
	json_object_set_new(e, "at", json_real(at));
	/* the list is bounded in entries (SPARK_DEADLETTER_MAX), each entry in bytes: a 50 MB message keeps its head */
	bool cut = len > DEADLETTER_MESSAGE_MAX;
	size_t n = cut ? DEADLETTER_MESSAGE_MAX : len;
	if (cut) {
		json_object_set_new(e, "truncated", json_true());
		json_object_set_new(e, "message_bytes", json_integer((json_int_t)len));
	}
	json_t *msg = deadletter_text(raw, n, cut);
	if (msg == NULL) {
		/* not UTF-8: keep the exact bytes in base64, and a readable approximation */
		char *b64 = b64_encode((const unsigned char *)raw, n);
		json_object_set_new(e, "message_base64", json_string(b64));
		free(b64);
		char *ascii = xmalloc(n + 1);
		for (size_t i = 0; i < n; i++)
			ascii[i] = (raw[i] > 0 && (unsigned char)raw[i] < 0x80) ? raw[i] : '?';
		ascii[n] = '\0';
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

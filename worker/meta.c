/*
 * Celery result metas in the Redis result backend (reference §3): what AsyncResult.get() in Python reads.
 *
 * Written with appends into a buffer the process reuses, not through a jansson DOM: a meta is a fixed shape around
 * a few strings and one raw JSON result (often a span of the message, copied through), so building and dumping a
 * tree would only allocate. The string escaper is ours for that reason: jansson escapes only while dumping a tree.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jscan.h"
#include "util.h"
#include "worker.h"

void
sbuf_grow(struct sbuf *b, size_t n)
{
	size_t cap = b->cap ? b->cap : 256;
	while (cap <= b->len + n)
		cap *= 2;
	b->p = xrealloc(b->p, cap);
	b->cap = cap;
}

void
sbuf_reset(struct sbuf *b)
{
	b->len = 0;
	if (b->p != NULL)
		b->p[0] = '\0';
}

void
sbuf_adds(struct sbuf *b, const char *s)
{
	sbuf_add(b, s, strlen(s));
}

void
sbuf_free(struct sbuf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

void
sbuf_add_json_string(struct sbuf *b, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *p = (const unsigned char *)s, *end = p + n;
	sbuf_reserve(b, n + 2);
	sbuf_add(b, "\"", 1);
	while (p < end) {
		/* the run that needs nothing, appended at once */
		const unsigned char *run = p;
		while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
			p++;
		if (p > run)
			sbuf_add(b, run, (size_t)(p - run));
		if (p == end)
			break;
		unsigned c = *p;
		if (c == '"' || c == '\\') {
			char e[2] = {'\\', (char)c};
			sbuf_add(b, e, 2);
			p++;
		} else if (c < 0x20) {
			char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
			size_t elen = 2;
			switch (c) {
			case '\n':
				e[1] = 'n';
				break;
			case '\r':
				e[1] = 'r';
				break;
			case '\t':
				e[1] = 't';
				break;
			case '\b':
				e[1] = 'b';
				break;
			case '\f':
				e[1] = 'f';
				break;
			default:
				elen = 6;
			}
			sbuf_add(b, e, elen);
			p++;
		} else {
			size_t k = jscan_utf8_seq(p, (size_t)(end - p));
			if (k > 0) {
				sbuf_add(b, p, k);
				p += k;
			} else {
				sbuf_add(b, "\xef\xbf\xbd", 3); /* U+FFFD for each byte that is not UTF-8 */
				p++;
			}
		}
	}
	sbuf_add(b, "\"", 1);
}

size_t
sbuf_digits(unsigned long long v, char *out)
{
	if (v < 100) { /* most RESP lengths */
		if (v < 10) {
			out[0] = (char)('0' + v);
			return 1;
		}
		out[0] = (char)('0' + v / 10);
		out[1] = (char)('0' + v % 10);
		return 2;
	}
	char tmp[20];
	size_t n = 0;
	do
		tmp[n++] = (char)('0' + v % 10);
	while ((v /= 10) > 0);
	for (size_t i = 0; i < n; i++)
		out[i] = tmp[n - 1 - i];
	return n;
}

void
sbuf_add_uint(struct sbuf *b, unsigned long long v)
{
	sbuf_reserve(b, 20);
	b->len += sbuf_digits(v, b->p + b->len);
	b->p[b->len] = '\0';
}

size_t
sbuf_fixed(double v, int decimals, char out[SBUF_FIXED_MAX])
{
	if (!(v >= 0 && v < 1e15) || decimals < 1 || decimals > 9)
		return (size_t)snprintf(out, SBUF_FIXED_MAX, "%.*f", decimals, v);
	unsigned long long scale = 1;
	for (int i = 0; i < decimals; i++)
		scale *= 10;
	unsigned long long units = (unsigned long long)(v * (double)scale + 0.5);
	size_t n = sbuf_digits(units / scale, out);
	out[n++] = '.';
	unsigned long long frac = units % scale;
	for (int i = decimals - 1; i >= 0; i--, frac /= 10)
		out[n + (size_t)i] = (char)('0' + frac % 10);
	n += (size_t)decimals;
	out[n] = '\0';
	return n;
}

/* Two digits of v at out. */
static void
meta_two(char *out, int v)
{
	out[0] = (char)('0' + v / 10 % 10);
	out[1] = (char)('0' + v % 10);
}

size_t
meta_iso(double t, bool aware, char out[META_ISO_MAX])
{
	/* whole microseconds first, so that a fraction rounding up to the next second carries into it */
	long long us = llround(t * 1e6);
	long long whole = us / 1000000 - (us % 1000000 < 0);
	long usec = (long)(us - whole * 1000000);
	time_t secs = (time_t)whole;
	struct tm tm;
	if (!(t > -1e12 && t < 1e12) || gmtime_r(&secs, &tm) == NULL || tm.tm_year + 1900 < 0 ||
	    tm.tm_year + 1900 > 9999) {
		message_format_iso(t, aware, out, META_ISO_MAX);
		return strlen(out);
	}
	int year = tm.tm_year + 1900;
	meta_two(out, year / 100);
	meta_two(out + 2, year % 100);
	out[4] = '-';
	meta_two(out + 5, tm.tm_mon + 1);
	out[7] = '-';
	meta_two(out + 8, tm.tm_mday);
	out[10] = 'T';
	meta_two(out + 11, tm.tm_hour);
	out[13] = ':';
	meta_two(out + 14, tm.tm_min);
	out[16] = ':';
	meta_two(out + 17, tm.tm_sec);
	out[19] = '.';
	for (int i = 25; i >= 20; i--, usec /= 10)
		out[i] = (char)('0' + usec % 10);
	size_t n = 26;
	if (aware) {
		memcpy(out + n, "+00:00", 6);
		n += 6;
	}
	out[n] = '\0';
	return n;
}

static void
meta_add_string(struct sbuf *b, const char *s)
{
	sbuf_add_json_string(b, s ? s : "", s ? strlen(s) : 0);
}

/* The states Celery stamps with date_done (READY_STATES); the others carry null. */
static bool
meta_state_ready(const char *status)
{
	return status != NULL &&
	       (strcmp(status, "SUCCESS") == 0 || strcmp(status, "FAILURE") == 0 || strcmp(status, "REVOKED") == 0);
}

void
meta_build(struct sbuf *b, const char *task_id, const char *status, const char *result_json, size_t result_len,
           const char *traceback, const struct message *m)
{
	sbuf_reset(b);
	sbuf_adds(b, "{\"status\":");
	meta_add_string(b, status);
	sbuf_adds(b, ",\"result\":");
	if (result_json != NULL && result_len > 0)
		sbuf_add(b, result_json, result_len);
	else
		sbuf_adds(b, "null");
	sbuf_adds(b, ",\"traceback\":");
	if (traceback != NULL)
		meta_add_string(b, traceback);
	else
		sbuf_adds(b, "null");
	sbuf_adds(b, ",\"children\":[],\"date_done\":");
	if (meta_state_ready(status)) {
		/* naive, as Celery 5.2 writes it */
		char iso[META_ISO_MAX];
		size_t n = meta_iso(now_wall(), false, iso);
		sbuf_add(b, "\"", 1);
		sbuf_add(b, iso, n);
		sbuf_add(b, "\"", 1);
	} else {
		sbuf_adds(b, "null");
	}
	if (m != NULL && m->parent_id != NULL) {
		sbuf_adds(b, ",\"parent_id\":");
		meta_add_string(b, m->parent_id);
	}
	if (m != NULL && m->group_id != NULL) {
		sbuf_adds(b, ",\"group_id\":");
		meta_add_string(b, m->group_id);
	}
	sbuf_adds(b, ",\"task_id\":");
	meta_add_string(b, task_id);
	sbuf_adds(b, "}");
}

void
meta_exception(struct sbuf *b, const char *module, const char *type, const char *message)
{
	sbuf_reset(b);
	sbuf_adds(b, "{\"exc_type\":");
	meta_add_string(b, type);
	sbuf_adds(b, ",\"exc_message\":[");
	meta_add_string(b, message);
	sbuf_adds(b, "],\"exc_module\":");
	meta_add_string(b, module);
	sbuf_adds(b, "}");
}

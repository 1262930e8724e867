/*
 * Celery result metas in the Redis result backend (reference §3): what AsyncResult.get() in Python reads.
 *
 * Written with appends into a buffer the process reuses, not through a jansson DOM: a meta is a fixed shape around
 * a few strings and one raw JSON result (often a span of the message, copied through), so building and dumping a
 * tree would only allocate. The string escaper is ours for that reason: jansson escapes only while dumping a tree.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
		char iso[64];
		message_format_iso(now_wall(), false, iso, sizeof iso);
		meta_add_string(b, iso);
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

/* The strict JSON scan (jscan.h): jsmn's tokens, checked as jansson checks its input. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSCAN_IMPLEMENTATION
#include "jscan.h"
#include "util.h"

static int jscan_fail(struct jscan *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int
jscan_fail(struct jscan *s, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(s->err, sizeof s->err, fmt, ap);
	va_end(ap);
	return -1;
}

void
jscan_free(struct jscan *s)
{
	free(s->heap);
	s->heap = NULL;
}

static void
jscan_ws(struct jscan *s)
{
	while (s->pos < s->len &&
	       (s->js[s->pos] == ' ' || s->js[s->pos] == '\t' || s->js[s->pos] == '\n' || s->js[s->pos] == '\r'))
		s->pos++;
}

static int
jscan_byte(const struct jscan *s)
{
	return s->pos < s->len ? (unsigned char)s->js[s->pos] : -1;
}

static unsigned
hex4(const char *p)
{
	unsigned v = 0;
	for (int i = 0; i < 4; i++) {
		unsigned c = (unsigned char)p[i];
		v = v << 4 | (c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
	}
	return v;
}

size_t
jscan_utf8_seq(const unsigned char *p, size_t n)
{
	unsigned c = p[0], need, min;
	uint32_t v;
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		need = 1, min = 0x80, v = c & 0x1f;
	else if (c >= 0xe0 && c <= 0xef)
		need = 2, min = 0x800, v = c & 0x0f;
	else if (c >= 0xf0 && c <= 0xf4)
		need = 3, min = 0x10000, v = c & 0x07;
	else
		return 0;
	if (n <= need)
		return 0;
	for (unsigned i = 1; i <= need; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		v = v << 6 | (p[i] & 0x3f);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	return need + 1;
}

/* What jsmn does not check in a string: control characters, UTF-8, \u0000 and surrogate pairs. Its escapes are
 * well-formed already (jsmn checks the letter and the four hex digits). */
static int
jscan_check_string(struct jscan *s, const jsmntok_t *t)
{
	const unsigned char *p = (const unsigned char *)s->js + t->start, *e = (const unsigned char *)s->js + t->end;
	const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
	while (p < e) {
		/* eight bytes at a time while none is a control character, a backslash or beyond ASCII (the common
		 * case: ids, names, base64 bodies): the byte loop below was a tenth of a no-op task's CPU */
		while (e - p >= 8) {
			uint64_t x, y;
			memcpy(&x, p, 8);
			y = x ^ (0x5c * ones);
			if (((x | ((x - 0x20 * ones) & ~x) | ((y - ones) & ~y)) & highs) != 0)
				break;
			p += 8;
		}
		if (p >= e)
			break;
		unsigned c = *p;
		if (c >= 0x20 && c < 0x80 && c != '\\') {
			p++;
		} else if (c < 0x20) {
			return jscan_fail(s, "control character 0x%x in string", c);
		} else if (c == '\\') {
			if (p[1] != 'u') {
				p += 2;
				continue;
			}
			unsigned u = hex4((const char *)p + 2);
			p += 6;
			if (u == 0)
				return jscan_fail(s, "\\u0000 is not allowed");
			if (u >= 0xdc00 && u <= 0xdfff)
				return jscan_fail(s, "invalid Unicode '\\u%04X'", u);
			if (u >= 0xd800 && u <= 0xdbff) {
				unsigned lo = e - p >= 6 && p[0] == '\\' && p[1] == 'u' ? hex4((const char *)p + 2) : 0;
				if (lo < 0xdc00 || lo > 0xdfff)
					return jscan_fail(s, "invalid Unicode '\\u%04X'", u);
				p += 6;
			}
		} else {
			size_t n = jscan_utf8_seq(p, (size_t)(e - p));
			if (n == 0)
				return jscan_fail(s, "invalid UTF-8 in string");
			p += n;
		}
	}
	return 0;
}

/* jsmn takes any run of printable bytes after [-0-9tfn] as a primitive: keep JSON's numbers, true, false, null,
 * and refuse the integers and reals jansson could not hold */
static int
jscan_check_primitive(struct jscan *s, const jsmntok_t *t)
{
	const char *p = s->js + t->start;
	size_t n = (size_t)(t->end - t->start), i = 0;
	if ((n == 4 && (memcmp(p, "true", 4) == 0 || memcmp(p, "null", 4) == 0)) ||
	    (n == 5 && memcmp(p, "false", 5) == 0))
		return 0;
	bool real = false;
	if (p[i] == '-')
		i++;
	if (i >= n || !isdigit((unsigned char)p[i]))
		return jscan_fail(s, "invalid token near byte %d", t->start);
	if (p[i] == '0')
		i++;
	else
		while (i < n && isdigit((unsigned char)p[i]))
			i++;
	size_t int_digits = i;
	if (i < n && p[i] == '.') {
		real = true;
		if (++i >= n || !isdigit((unsigned char)p[i]))
			return jscan_fail(s, "invalid number near byte %d", t->start);
		while (i < n && isdigit((unsigned char)p[i]))
			i++;
	}
	if (i < n && (p[i] == 'e' || p[i] == 'E')) {
		real = true;
		if (++i < n && (p[i] == '+' || p[i] == '-'))
			i++;
		if (i >= n || !isdigit((unsigned char)p[i]))
			return jscan_fail(s, "invalid number near byte %d", t->start);
		while (i < n && isdigit((unsigned char)p[i]))
			i++;
	}
	if (i != n)
		return jscan_fail(s, "invalid token near byte %d", t->start);
	/* strtoll/strtod stop at the delimiter that always follows a primitive (the C locale: no setlocale here) */
	errno = 0;
	if (!real && int_digits >= 19) {
		long long v = strtoll(p, NULL, 10);
		if (errno == ERANGE)
			return jscan_fail(s, v < 0 ? "too big negative integer" : "too big integer");
	} else if (real) {
		double v = strtod(p, NULL);
		if ((v == HUGE_VAL || v == -HUGE_VAL) && errno == ERANGE)
			return jscan_fail(s, "real number overflow");
	}
	return 0;
}

/* Check the value at token i, which must begin at s->pos, and what lies between its tokens; the index after it. */
static int
jscan_check_value(struct jscan *s, int i, int depth)
{
	if (i >= s->ntok)
		return jscan_fail(s, "unexpected token near byte %zu", s->pos);
	const jsmntok_t *t = &s->tok[i];
	if ((size_t)(t->type == JSMN_STRING ? t->start - 1 : t->start) != s->pos)
		return jscan_fail(s, "unexpected token near byte %zu", s->pos);
	if (t->type == JSMN_STRING || t->type == JSMN_PRIMITIVE) {
		if (t->size != 0)
			return jscan_fail(s, "unexpected ':' near byte %d", t->end);
		if ((t->type == JSMN_STRING ? jscan_check_string(s, t) : jscan_check_primitive(s, t)) < 0)
			return -1;
		s->pos = (size_t)t->end + (t->type == JSMN_STRING);
		return i + 1;
	}
	if (t->type != JSMN_OBJECT && t->type != JSMN_ARRAY)
		return jscan_fail(s, "unexpected token near byte %zu", s->pos);
	if (depth > JSCAN_MAX_DEPTH)
		return jscan_fail(s, "maximum parsing depth reached");
	bool obj = t->type == JSMN_OBJECT;
	int next = i + 1;
	s->pos++;
	for (int k = 0; k < t->size; k++) {
		jscan_ws(s);
		if (k > 0) {
			if (jscan_byte(s) != ',')
				return jscan_fail(s, "',' expected near byte %zu", s->pos);
			s->pos++;
			jscan_ws(s);
		}
		if (obj) {
			const jsmntok_t *key = next < s->ntok ? &s->tok[next] : NULL;
			if (key == NULL || key->type != JSMN_STRING || key->size != 1 ||
			    (size_t)key->start != s->pos + 1)
				return jscan_fail(s, "string or '}' expected near byte %zu", s->pos);
			if (jscan_check_string(s, key) < 0)
				return -1;
			s->pos = (size_t)key->end + 1;
			jscan_ws(s);
			if (jscan_byte(s) != ':')
				return jscan_fail(s, "':' expected near byte %zu", s->pos);
			s->pos++;
			jscan_ws(s);
			next++;
		}
		if ((next = jscan_check_value(s, next, depth + 1)) < 0)
			return -1;
	}
	jscan_ws(s);
	if (s->pos + 1 != (size_t)t->end)
		return jscan_fail(s, "',' or '%c' expected near byte %zu", obj ? '}' : ']', s->pos);
	s->pos = (size_t)t->end;
	return next;
}

int
jscan_run(struct jscan *s, const char *js, size_t len, jsmntok_t *stack, unsigned nstack)
{
	s->js = js;
	s->len = len;
	s->tok = stack;
	s->heap = NULL;
	s->ntok = 0;
	if (len > INT_MAX / 2) /* jsmn counts in int */
		return jscan_fail(s, "more than %d bytes", INT_MAX / 2);
	jsmn_parser p;
	jsmn_init(&p);
	int r = jsmn_parse(&p, js, len, stack, nstack);
	if (r == JSMN_ERROR_NOMEM) {
		jsmn_init(&p);
		r = jsmn_parse(&p, js, len, NULL, 0); /* count them */
		if (r > JSCAN_MAX_TOKENS)
			return -2;
		if (r > 0) {
			s->tok = s->heap = xmalloc((size_t)r * sizeof *s->tok);
			jsmn_init(&p);
			r = jsmn_parse(&p, js, len, s->tok, (unsigned)r);
		}
	}
	if (r == JSMN_ERROR_PART)
		return jscan_fail(s, "unexpected end of input");
	if (r < 0)
		return jscan_fail(s, "invalid JSON near byte %u", p.pos);
	if (r == 0)
		return jscan_fail(s, "no JSON value");
	s->ntok = r;
	s->pos = 0;
	jscan_ws(s);
	int next = jscan_check_value(s, 0, 1);
	if (next < 0)
		return -1;
	jscan_ws(s);
	if (s->pos != len || next != s->ntok)
		return jscan_fail(s, "end of file expected near byte %zu", s->pos);
	return 0;
}

int
jscan_after(const struct jscan *s, int i)
{
	const jsmntok_t *t = &s->tok[i];
	if ((t->type != JSMN_OBJECT && t->type != JSMN_ARRAY) || t->size == 0)
		return i + 1;
	/* tokens are in document order: the first one that starts past this value's end */
	int lo = i + 1, hi = s->ntok;
	while (lo < hi) {
		int mid = lo + (hi - lo) / 2;
		if (s->tok[mid].start < t->end)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

size_t
jscan_unescape(const char *p, size_t n, char *out)
{
	char *o = out;
	for (size_t i = 0; i < n; i++) {
		if (p[i] != '\\') {
			*o++ = p[i];
			continue;
		}
		char c = p[++i];
		switch (c) {
		case 'b':
			*o++ = '\b';
			continue;
		case 'f':
			*o++ = '\f';
			continue;
		case 'n':
			*o++ = '\n';
			continue;
		case 'r':
			*o++ = '\r';
			continue;
		case 't':
			*o++ = '\t';
			continue;
		case 'u':
			break;
		default: /* " \ / */
			*o++ = c;
			continue;
		}
		uint32_t u = hex4(p + i + 1);
		i += 4;
		if (u >= 0xd800 && u <= 0xdbff) { /* checked: a low surrogate follows */
			u = 0x10000 + ((u - 0xd800) << 10) + (hex4(p + i + 3) - 0xdc00);
			i += 6;
		}
		if (u < 0x80) {
			*o++ = (char)u;
		} else if (u < 0x800) {
			*o++ = (char)(0xc0 | u >> 6);
			*o++ = (char)(0x80 | (u & 0x3f));
		} else if (u < 0x10000) {
			*o++ = (char)(0xe0 | u >> 12);
			*o++ = (char)(0x80 | (u >> 6 & 0x3f));
			*o++ = (char)(0x80 | (u & 0x3f));
		} else {
			*o++ = (char)(0xf0 | u >> 18);
			*o++ = (char)(0x80 | (u >> 12 & 0x3f));
			*o++ = (char)(0x80 | (u >> 6 & 0x3f));
			*o++ = (char)(0x80 | (u & 0x3f));
		}
	}
	return (size_t)(o - out);
}

void
jscan_pick(const struct jscan *s, int obj, const char *const *names, int *val, int n)
{
	for (int k = 0; k < n; k++)
		val[k] = -1;
	if (obj < 0 || s->tok[obj].type != JSMN_OBJECT || n > JSCAN_MAX_NAMES)
		return;
	char kbuf[128];
	size_t nlen[JSCAN_MAX_NAMES];
	for (int j = 0; j < n; j++)
		nlen[j] = strlen(names[j]);
	for (int k = 0, i = obj + 1; k < s->tok[obj].size; k++, i = jscan_after(s, i + 1)) {
		const char *key = s->js + s->tok[i].start;
		size_t klen = (size_t)(s->tok[i].end - s->tok[i].start);
		if (memchr(key, '\\', klen) != NULL) {
			if (klen > sizeof kbuf) /* unescapes to more than any name asked for */
				continue;
			klen = jscan_unescape(key, klen, kbuf);
			key = kbuf;
		}
		for (int j = 0; j < n; j++)
			if (nlen[j] == klen && memcmp(names[j], key, klen) == 0)
				val[j] = i + 1;
	}
}

bool
jscan_is(const struct jscan *s, int i, jsmntype_t type)
{
	return i >= 0 && s->tok[i].type == type;
}

bool
jscan_true(const struct jscan *s, int i)
{
	return jscan_is(s, i, JSMN_PRIMITIVE) && s->js[s->tok[i].start] == 't';
}

bool
jscan_null(const struct jscan *s, int i)
{
	return jscan_is(s, i, JSMN_PRIMITIVE) && s->js[s->tok[i].start] == 'n';
}

bool
jscan_number(const struct jscan *s, int i)
{
	return jscan_is(s, i, JSMN_PRIMITIVE) &&
	       (s->js[s->tok[i].start] == '-' || isdigit((unsigned char)s->js[s->tok[i].start]));
}

/* what jansson reads as an integer: a number without fraction or exponent */
bool
jscan_integer(const struct jscan *s, int i, long long *v)
{
	if (!jscan_number(s, i))
		return false;
	for (int k = s->tok[i].start; k < s->tok[i].end; k++)
		if (s->js[k] == '.' || s->js[k] == 'e' || s->js[k] == 'E')
			return false;
	*v = strtoll(s->js + s->tok[i].start, NULL, 10);
	return true;
}

const char *
jscan_span(const struct jscan *s, int i, size_t *len)
{
	const jsmntok_t *t = &s->tok[i];
	int q = t->type == JSMN_STRING;
	*len = (size_t)(t->end - t->start + 2 * q);
	return s->js + t->start - q;
}

double
jscan_double(const struct jscan *s, int i)
{
	/* the delimiter after a primitive ends strtod's read; the C locale (no setlocale here) keeps '.' */
	return strtod(s->js + s->tok[i].start, NULL);
}

/* The strict JSON scan (jscan.c): it takes exactly what jansson takes; tokens, member picks, spans, unescaping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jscan.h"

/* The scan's verdict: as the envelope is read (an object or array), or as a body (any value, a space after it). */
static bool
scan_ok(const char *js, size_t len, bool any)
{
	char *buf = malloc(len + 1);
	memcpy(buf, js, len);
	buf[len] = ' ';
	struct jscan s;
	jsmntok_t tok[JSCAN_STACK_TOKENS];
	bool ok = jscan_run(&s, buf, any ? len + 1 : len, tok, JSCAN_STACK_TOKENS) == 0;
	if (ok && !any)
		ok = s.tok[0].type == JSMN_OBJECT || s.tok[0].type == JSMN_ARRAY;
	if (!ok && s.err[0] == '\0')
		fail_msg("refused without a reason");
	jscan_free(&s);
	free(buf);
	return ok;
}

static bool
jansson_ok(const char *js, size_t len, size_t flags)
{
	json_t *j = json_loadb(js, len, flags, NULL);
	json_decref(j);
	return j != NULL;
}

static void
expect_parity(const char *js, size_t len)
{
	for (int any = 0; any < 2; any++) {
		bool ours = scan_ok(js, len, any), theirs = jansson_ok(js, len, any ? JSON_DECODE_ANY : 0);
		if (ours != theirs)
			fail_msg("'%.*s'%s: jansson %s, the scan %s", (int)len, js, any ? " (any value)" : "",
			         theirs ? "takes it" : "refuses it", ours ? "takes it" : "refuses it");
	}
}

static const char *const not_json[] = {
    "{\"a\": 1 \"b\": 2}",
    "{\"a\" 1}",
    "{\"a\": 1,}",
    "{,}",
    "{\"a\": 1,, \"b\": 2}",
    "{:1}",
    "{\"a\"}",
    "{\"a\": [1 2]}",
    "{\"a\": [1,]}",
    "{\"a\": [,1]}",
    "{\"a\": tru}",
    "{\"a\": nul}",
    "{\"a\": falsey}",
    "{\"a\": 01}",
    "{\"a\": 1.}",
    "{\"a\": .5}",
    "{\"a\": -}",
    "{\"a\": 1e}",
    "{\"a\": 1e+}",
    "{\"a\": +1}",
    "{\"a\": 0x10}",
    "{\"a\": 1.5.5}",
    "{\"a\": -01}",
    "{\"a\": \"x\x01y\"}",
    "{\"a\": \"tab\there\"}",
    "{\"a\": \"\xff\"}",
    "{\"a\": \"\xc0\xaf\"}",
    "{\"a\": \"\xed\xa0\x80\"}",
    "{\"a\": \"\xf4\x90\x80\x80\"}",
    "{\"a\": \"\xe2\x82\"}",
    "{\"\xff\": 1}",
    "{\"a\": \"\\u0000\"}",
    "{\"a\\u0000\": 1}",
    "{\"a\": \"\\ud800\"}",
    "{\"a\": \"\\udc00\"}",
    "{\"a\": \"\\ud800\\u0041\"}",
    "{\"a\": \"\\ud800x\"}",
    "{} x",
    "{}{}",
    "{} {}",
    "{\"a\": 1}}",
    "{\"a\": 1}]",
    "{\"a\":",
    "{\"a\": [1, 2}",
    "{\"a\": {\"b\": 1]}",
    "{\"a\": \"b\"",
    "{",
    "",
    "   ",
    "\"str\"",
    "5",
    "null",
    "{\"a\": 99999999999999999999}",
    "{\"a\": -99999999999999999999}",
    "{\"a\": 1e400}",
    "{\"a\": -1e400}",
    "{1: 2}",
    "{\"a\": 1:2}",
    "[\"a\": 1]",
    "{\"a\": \"\\x\"}",
    "{\"a\": \"\\u12\"}",
    "{\"a\": [1]:2}",
    "\xef\xbb\xbf{}",
    "{\"a\": infinity}",
    "{\"a\": NaN}",
};
static const char *const json_ok[] = {
    "{}",
    " \t\r\n{ } \n",
    "{\"a\": -0}",
    "{\"a\": 1E+2}",
    "{\"a\": 1e-400}",
    "{\"a\": -0.0e-0}",
    "{\"a\": 9223372036854775807}",
    "{\"a\": -9223372036854775808}",
    "{\"a\": \"\\ud83d\\ude00\"}",
    "{\"a\": \"\xf0\x9f\x98\x80\xe2\x82\xac\xc3\xa9\x7f\"}",
    "{\"a\": [true, false, null, [], {}, \"\"]}",
    "{\"\": {\"\": []}}",
    "{\"a\": \"\\\"\\\\\\/\\b\\f\\n\\r\\t\"}",
    "[]",
    "[1, {\"a\": 2}]",
};

static void
test_jscan_parity(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof not_json / sizeof not_json[0]; i++) {
		if (jansson_ok(not_json[i], strlen(not_json[i]), 0))
			fail_msg("jansson takes '%s'", not_json[i]);
		expect_parity(not_json[i], strlen(not_json[i]));
	}
	for (size_t i = 0; i < sizeof json_ok / sizeof json_ok[0]; i++) {
		if (!jansson_ok(json_ok[i], strlen(json_ok[i]), 0))
			fail_msg("jansson refuses '%s'", json_ok[i]);
		expect_parity(json_ok[i], strlen(json_ok[i]));
	}
	/* values jansson takes only as a body */
	const char *any[] = {"5", "-0.5e3", "\"s\"", "true", "null", " [] "};
	for (size_t i = 0; i < sizeof any / sizeof any[0]; i++) {
		assert_true(scan_ok(any[i], strlen(any[i]), true));
		expect_parity(any[i], strlen(any[i]));
	}
	/* an embedded NUL byte: the length is what counts */
	expect_parity("{\"a\": 1}\0", 9);
	expect_parity("{\"a\": \"x\0y\"}", 12);
	expect_parity("[1,\0 2]", 7);
	assert_true(scan_ok("{\"a\": 1}\0junk", 8, false));
	/* jansson's depth limit, 2048 */
	for (int depth = 2047; depth <= 2049; depth++) {
		char *s = malloc(2 * (size_t)depth + 16);
		size_t n = 0;
		memcpy(s, "{\"a\":", 5);
		n = 5;
		for (int i = 1; i < depth; i++)
			s[n++] = '[';
		for (int i = 1; i < depth; i++)
			s[n++] = ']';
		s[n++] = '}';
		expect_parity(s, n);
		assert_true(scan_ok(s, n, false) == (depth <= 2048));
		free(s);
	}
}

/* Random damage to real JSON: the scan and jansson agree on every result. */
static void
test_jscan_mutations(void **state)
{
	(void)state;
	const char *seeds[] = {
	    /* a Celery 5.2 envelope, shortened */
	    "{\"body\": \"W1sxLCAyXSwgeyJ6IjogIlx1MDBlOSJ9LCB7fV0=\", \"content-encoding\": \"utf-8\", "
	    "\"content-type\": \"application/json\", \"headers\": {\"lang\": \"py\", \"task\": \"tasks.add\", "
	    "\"id\": \"e23e56a0\", \"shadow\": null, \"eta\": \"2026-11-26T18:46:22.400551+00:00\", \"retries\": 0, "
	    "\"timelimit\": [null, null], \"kwargsrepr\": \"{'z': '\\u00e9'}\", \"ignore_result\": false}, "
	    "\"properties\": {\"delivery_mode\": 2, \"delivery_info\": {\"exchange\": \"\", \"routing_key\": "
	    "\"celery\"}, \"priority\": 5, \"body_encoding\": \"base64\"}}",
	    /* a body */
	    "[[\"\\u00e9\\ud83d\\ude00\", 1.5e3, -0, true, null, \"x\\\"\", 12345678901234567890], {\"k\": [{}, []]}, "
	    "{\"callbacks\": null}]",
	};
	unsigned seed = 12345;
	const char alphabet[] = "{}[]:,\"\\ u0123456789eE.-+tfnrlsaxd\x01\x80\xc3\xa9\xff";
	int refused = 0, rounds = 0;
	for (size_t si = 0; si < sizeof seeds / sizeof seeds[0]; si++) {
		size_t len = strlen(seeds[si]);
		char *buf = malloc(len + 8);
		for (int round = 0; round < 4000; round++, rounds++) {
			memcpy(buf, seeds[si], len);
			size_t n = len;
			int edits = 1 + (int)(rand_r(&seed) % 3);
			for (int e = 0; e < edits && n > 1; e++) {
				size_t at = (size_t)rand_r(&seed) % (n - 1);
				switch (rand_r(&seed) % 4) {
				case 0: /* replace */
					buf[at] = alphabet[(size_t)rand_r(&seed) % (sizeof alphabet - 1)];
					break;
				case 1: /* delete */
					memmove(buf + at, buf + at + 1, n - at - 1);
					n--;
					break;
				case 2: /* insert */
					memmove(buf + at + 1, buf + at, n - at);
					buf[at] = alphabet[(size_t)rand_r(&seed) % (sizeof alphabet - 1)];
					n++;
					break;
				default: /* truncate */
					n = at + 1;
				}
			}
			refused += !jansson_ok(buf, n, 0);
			expect_parity(buf, n);
		}
		free(buf);
	}
	/* the damage reached the grammar often, and left valid JSON often */
	assert_true(refused > rounds / 4 && refused < rounds * 19 / 20);
}

static void
test_jscan_tokens(void **state)
{
	(void)state;
	struct jscan s;
	jsmntok_t tok[8];
	const char *js = "{\"a\": [1, {\"b\": 2}], \"k\\u0065y\": \"v\\\"\", \"a\": -0, \"n\": null, \"t\": true, "
	                 "\"r\": 1.5e1, \"i\": 9223372036854775807}";
	/* far more tokens than the array: counted, then one allocation */
	assert_int_equal(jscan_run(&s, js, strlen(js), tok, 8), 0);
	assert_non_null(s.heap);
	static const char *const names[] = {"a", "key", "n", "t", "r", "i", "missing"};
	int v[7];
	jscan_pick(&s, 0, names, v, 7);
	assert_true(jscan_integer(&s, v[0], &(long long){0})); /* the last "a" */
	size_t n;
	const char *p = jscan_span(&s, v[1], &n);
	assert_int_equal(n, 5);
	assert_memory_equal(p, "\"v\\\"\"", 5);
	char out[8];
	assert_int_equal(jscan_unescape(s.js + s.tok[v[1]].start, 3, out), 2);
	assert_memory_equal(out, "v\"", 2);
	assert_true(jscan_null(&s, v[2]) && !jscan_true(&s, v[2]) && !jscan_number(&s, v[2]));
	assert_true(jscan_true(&s, v[3]));
	long long iv;
	assert_true(jscan_number(&s, v[4]) && !jscan_integer(&s, v[4], &iv));
	assert_true(jscan_double(&s, v[4]) == 15);
	assert_true(jscan_integer(&s, v[5], &iv) && iv == 9223372036854775807LL);
	assert_int_equal(v[6], -1);
	/* the first "a": its span and next sibling */
	int a = 2;
	assert_true(jscan_is(&s, a, JSMN_ARRAY));
	p = jscan_span(&s, a, &n);
	assert_memory_equal(p, "[1, {\"b\": 2}]", n);
	assert_int_equal(jscan_after(&s, a), a + 5);
	assert_memory_equal(s.js + s.tok[jscan_after(&s, a)].start, "k\\u0065y", 8);
	/* not an object: nothing picked */
	jscan_pick(&s, a, names, v, 7);
	assert_int_equal(v[0], -1);
	jscan_pick(&s, -1, names, v, 7);
	assert_int_equal(v[0], -1);
	jscan_free(&s);
	assert_null(s.heap);

	/* past the bound: -2, before any allocation for the tokens */
	size_t count = JSCAN_MAX_TOKENS + 10;
	char *big = malloc(2 * count + 8);
	big[0] = '[';
	n = 1;
	for (size_t i = 0; i < count; i++) {
		big[n++] = '0';
		big[n++] = ',';
	}
	big[n - 1] = ']';
	assert_int_equal(jscan_run(&s, big, n, tok, 8), -2);
	assert_null(s.heap);
	jscan_free(&s);
	/* at the bound: taken */
	n = 1;
	for (size_t i = 0; i < JSCAN_MAX_TOKENS - 1; i++) {
		big[n++] = '0';
		big[n++] = ',';
	}
	big[n - 1] = ']';
	assert_int_equal(jscan_run(&s, big, n, tok, 8), 0);
	assert_int_equal(s.ntok, JSCAN_MAX_TOKENS);
	jscan_free(&s);
	free(big);
}

static void
test_jscan_unescape(void **state)
{
	(void)state;
	char out[64];
	const char *in = "a\\\"\\\\\\/\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20ac\\ud83d\\ude00z";
	size_t n = jscan_unescape(in, strlen(in), out);
	const char *want = "a\"\\/\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z";
	assert_int_equal(n, strlen(want));
	assert_memory_equal(out, want, n);
	/* the same as jansson's reading of the string */
	char quoted[80];
	snprintf(quoted, sizeof quoted, "[\"%s\"]", in);
	json_t *j = json_loads(quoted, 0, NULL);
	assert_int_equal(json_string_length(json_array_get(j, 0)), n);
	assert_memory_equal(json_string_value(json_array_get(j, 0)), out, n);
	json_decref(j);

	/* UTF-8 sequences: valid ones at each length, and what is refused */
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"A", 1), 1);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xc2\x80", 2), 2);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xef\xbf\xbf", 3), 3);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xf4\x8f\xbf\xbf", 4), 4);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xc3\xa9", 1), 0); /* cut short */
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xc1\xbf", 2), 0); /* overlong */
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xe0\x9f\xbf", 3), 0);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xf0\x8f\xbf\xbf", 4), 0);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xed\xbf\xbf", 3), 0);     /* a surrogate */
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xf4\x90\x80\x80", 4), 0); /* past U+10FFFF */
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\x80", 1), 0);
	assert_int_equal(jscan_utf8_seq((const unsigned char *)"\xc3\x28", 2), 0);
	/* every two-byte input: the verdict jansson gives a string of it */
	for (unsigned a = 0x80; a < 0x100; a++)
		for (unsigned b = 0; b < 0x100; b++) {
			unsigned char s2[2] = {(unsigned char)a, (unsigned char)b};
			json_t *str = json_stringn((const char *)s2, 2);
			bool ours = jscan_utf8_seq(s2, 2) == 2;
			assert_true(ours == (str != NULL));
			json_decref(str);
		}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_jscan_parity),
	    cmocka_unit_test(test_jscan_mutations),
	    cmocka_unit_test(test_jscan_tokens),
	    cmocka_unit_test(test_jscan_unescape),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

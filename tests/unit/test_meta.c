/* Celery result metas (meta.c) read back with jansson, as Python's json.loads would read them; the sbuf. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "worker.h"

static json_t *
parse(const struct sbuf *b)
{
	json_error_t jerr;
	assert_int_equal(strlen(b->p), b->len);
	json_t *j = json_loadb(b->p, b->len, JSON_ALLOW_NUL, &jerr); /* as Python reads \u0000 */
	if (j == NULL)
		fail_msg("not JSON (%s): %s", jerr.text, b->p);
	return j;
}

/* The keys of a meta in the order written. */
static void
expect_keys(const struct sbuf *b, const char *const *keys)
{
	const char *at = b->p;
	for (size_t i = 0; keys[i] != NULL; i++) {
		char quoted[64];
		snprintf(quoted, sizeof quoted, "\"%s\":", keys[i]);
		const char *k = strstr(at, quoted);
		if (k == NULL)
			fail_msg("key %s missing or out of order in %s", keys[i], b->p);
		at = k + strlen(quoted);
	}
}

static void
test_meta_statuses(void **state)
{
	(void)state;
	struct sbuf b = {0};
	/* not ready: date_done null; compact, in Celery's key order: what the jansson meta was, byte for byte */
	const char *started = "{\"pid\": 1, \"hostname\": \"celery@h\"}";
	meta_build(&b, "t1", "STARTED", started, strlen(started), NULL, NULL);
	assert_string_equal(b.p, "{\"status\":\"STARTED\",\"result\":{\"pid\": 1, \"hostname\": \"celery@h\"},"
	                         "\"traceback\":null,\"children\":[],\"date_done\":null,\"task_id\":\"t1\"}");
	json_t *old = json_pack("{s:s, s:{s:i, s:s}, s:n, s:[], s:n, s:s}", "status", "STARTED", "result", "pid", 1,
	                        "hostname", "celery@h", "traceback", "children", "date_done", "task_id", "t1");
	json_t *now = parse(&b);
	assert_true(json_equal(old, now));
	json_decref(old);
	json_decref(now);

	meta_build(&b, "t1", "RETRY", NULL, 0, "Traceback (most recent call last):\n  x", NULL);
	now = parse(&b);
	assert_true(json_is_null(json_object_get(now, "result")));
	assert_true(json_is_null(json_object_get(now, "date_done")));
	assert_string_equal(json_string_value(json_object_get(now, "traceback")),
	                    "Traceback (most recent call last):\n  x");
	json_decref(now);

	/* ready states: date_done now, naive ISO (Celery 5.2) */
	const char *ready[] = {"SUCCESS", "FAILURE", "REVOKED"};
	for (size_t i = 0; i < 3; i++) {
		double before = now_wall();
		const char *result = "[1, 2.5, \"\\u00e9\"]";
		meta_build(&b, "t2", ready[i], result, strlen(result), NULL, NULL);
		double after = now_wall();
		now = parse(&b);
		assert_string_equal(json_string_value(json_object_get(now, "status")), ready[i]);
		const char *done = json_string_value(json_object_get(now, "date_done"));
		assert_non_null(done);
		assert_int_equal(strlen(done), 26); /* 2026-11-26T18:46:05.338234, no offset */
		double t;
		assert_int_equal(message_parse_iso(done, &t), 0);
		assert_true(t >= floor(before) - 1e-6 && t <= after + 1e-6);
		/* the result copied through as it was */
		assert_non_null(strstr(b.p, "\"result\":[1, 2.5, \"\\u00e9\"],"));
		assert_string_equal(json_string_value(json_array_get(json_object_get(now, "result"), 2)), "\xc3\xa9");
		assert_true(json_array_size(json_object_get(now, "children")) == 0);
		json_decref(now);
	}
	const char *keys[] = {"status", "result", "traceback", "children", "date_done", "task_id", NULL};
	expect_keys(&b, keys);
	sbuf_free(&b);
	sbuf_free(&b); /* twice is harmless */
	assert_null(b.p);
}

static void
test_meta_exception(void **state)
{
	(void)state;
	struct sbuf e = {0}, b = {0};
	meta_exception(&e, "celery.exceptions", "NotRegistered", "spark.nope");
	json_t *j = parse(&e);
	char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	assert_string_equal(s, "{\"exc_message\":[\"spark.nope\"],\"exc_module\":\"celery.exceptions\",\"exc_type\":"
	                       "\"NotRegistered\"}");
	free(s);
	json_decref(j);
	assert_string_equal(e.p, "{\"exc_type\":\"NotRegistered\",\"exc_message\":[\"spark.nope\"],\"exc_module\":"
	                         "\"celery.exceptions\"}");

	/* as a FAILURE result; a message that is not UTF-8 still gives a readable failure */
	meta_exception(&e, "builtins", "ValueError", "bad \"value\" \xff\n");
	meta_build(&b, "t3", "FAILURE", e.p, e.len, "tb", NULL);
	j = parse(&b);
	json_t *r = json_object_get(j, "result");
	assert_string_equal(json_string_value(json_object_get(r, "exc_type")), "ValueError");
	assert_string_equal(json_string_value(json_object_get(r, "exc_module")), "builtins");
	assert_string_equal(json_string_value(json_array_get(json_object_get(r, "exc_message"), 0)),
	                    "bad \"value\" \xef\xbf\xbd\n");
	json_decref(j);
	sbuf_free(&e);
	sbuf_free(&b);
}

static void
expect_escaped_n(const char *in, size_t n, const char *text, const char *value, size_t vlen)
{
	struct sbuf b = {0};
	sbuf_adds(&b, "[");
	sbuf_add_json_string(&b, in, n);
	sbuf_adds(&b, "]");
	if (text != NULL && (strlen(text) != b.len - 2 || memcmp(b.p + 1, text, b.len - 2) != 0))
		fail_msg("escaped as %s, not %s", b.p, text);
	json_t *j = parse(&b);
	const char *got = json_string_value(json_array_get(j, 0));
	assert_non_null(got);
	assert_int_equal(json_string_length(json_array_get(j, 0)), vlen);
	assert_memory_equal(got, value, vlen);
	json_decref(j);
	sbuf_free(&b);
}

static void
expect_escaped(const char *in, size_t n, const char *text, const char *value)
{
	expect_escaped_n(in, n, text, value, strlen(value));
}

static void
test_json_string(void **state)
{
	(void)state;
	expect_escaped("", 0, "\"\"", "");
	expect_escaped("plain / text", 12, "\"plain / text\"", "plain / text");
	expect_escaped("q\"b\\", 4, "\"q\\\"b\\\\\"", "q\"b\\");
	expect_escaped("\n\r\t\b\f", 5, "\"\\n\\r\\t\\b\\f\"", "\n\r\t\b\f");
	expect_escaped("\x01\x1f\x7f", 3, "\"\\u0001\\u001f\x7f\"", "\x01\x1f\x7f");
	/* valid UTF-8 as is, at every length */
	expect_escaped("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf", 13,
	               "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf\"",
	               "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf");
	/* each byte that is not UTF-8 becomes U+FFFD: stray continuation, truncated sequence, overlong forms,
	 * an encoded surrogate, past U+10FFFF, bytes that never occur */
	expect_escaped("a\x80z", 3, NULL, "a\xef\xbf\xbdz");
	expect_escaped("a\xc3", 2, NULL, "a\xef\xbf\xbd");
	expect_escaped("\xe2\x82z", 3, NULL, "\xef\xbf\xbd\xef\xbf\xbdz");
	expect_escaped("\xc0\xaf", 2, NULL, "\xef\xbf\xbd\xef\xbf\xbd");
	expect_escaped("\xe0\x80\xaf", 3, NULL, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
	expect_escaped("\xed\xa0\x80", 3, NULL, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
	expect_escaped("\xf4\x90\x80\x80", 4, NULL, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
	expect_escaped("\xfe\xff", 2, NULL, "\xef\xbf\xbd\xef\xbf\xbd");
	/* the length counts, not a NUL */
	expect_escaped_n("a\0b", 3, "\"a\\u0000b\"", "a\0b", 3);

	/* random bytes: always JSON that jansson reads, and the same text when the input was UTF-8 */
	unsigned seed = 99;
	for (int round = 0; round < 3000; round++) {
		unsigned char in[40];
		size_t n = (size_t)rand_r(&seed) % sizeof in;
		for (size_t i = 0; i < n; i++) {
			unsigned r = (unsigned)rand_r(&seed);
			in[i] = (unsigned char)(r % 3 == 0 ? 0x80 + r % 0x80 : r % 3 == 1 ? r % 0x80 : 0xc2 + r % 0x33);
		}
		struct sbuf b = {0};
		sbuf_adds(&b, "[");
		sbuf_add_json_string(&b, (const char *)in, n);
		sbuf_adds(&b, "]");
		json_t *j = parse(&b);
		json_t *back = json_stringn((const char *)in, n); /* NULL when in is not UTF-8 (or has a NUL) */
		if (back != NULL)
			assert_true(json_equal(json_array_get(j, 0), back));
		json_decref(back);
		json_decref(j);
		sbuf_free(&b);
	}
}

static void
test_meta_parent_group_and_escaping(void **state)
{
	(void)state;
	const char *raw = "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"i\\u00e9\\\"\", "
	                  "\"parent_id\": \"p\\n1\", \"group\": \"g\\u0001\"}, \"properties\": "
	                  "{\"body_encoding\": \"base64\"}}";
	struct message m;
	assert_int_equal(message_decode(raw, strlen(raw), &m), 0);
	struct sbuf b = {0};
	meta_build(&b, m.task_id, "SUCCESS", m.args_json, m.args_len, NULL, &m);
	const char *keys[] = {"status",    "result",   "traceback", "children", "date_done",
	                      "parent_id", "group_id", "task_id",   NULL};
	expect_keys(&b, keys);
	json_t *j = parse(&b);
	assert_string_equal(json_string_value(json_object_get(j, "task_id")), "i\xc3\xa9\"");
	assert_string_equal(json_string_value(json_object_get(j, "parent_id")), "p\n1");
	assert_string_equal(json_string_value(json_object_get(j, "group_id")), "g\x01");
	assert_true(json_is_array(json_object_get(j, "result")));
	json_decref(j);
	message_free(&m);

	/* only the ones present */
	const char *only =
	    "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"i\", \"parent_id\": "
	    "null, \"group\": \"g\"}, \"properties\": {\"body_encoding\": \"base64\"}}";
	assert_int_equal(message_decode(only, strlen(only), &m), 0);
	meta_build(&b, m.task_id, "STARTED", NULL, 0, NULL, &m);
	assert_null(strstr(b.p, "parent_id"));
	assert_non_null(strstr(b.p, ",\"group_id\":\"g\",\"task_id\":\"i\"}"));
	message_free(&m);

	/* the buffer is reused: a long meta, then a short one */
	char *tb = malloc(100001);
	memset(tb, 'x', 100000);
	tb[100000] = '\0';
	meta_build(&b, "t", "FAILURE", NULL, 0, tb, NULL);
	assert_true(b.len > 100000);
	size_t cap = b.cap;
	meta_build(&b, "t", "STARTED", NULL, 0, NULL, NULL);
	assert_int_equal(b.cap, cap);
	assert_string_equal(b.p, "{\"status\":\"STARTED\",\"result\":null,\"traceback\":null,\"children\":[],"
	                         "\"date_done\":null,\"task_id\":\"t\"}");
	sbuf_reset(&b);
	assert_int_equal(b.len, 0);
	assert_string_equal(b.p, "");
	free(tb);
	sbuf_free(&b);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_meta_statuses),
	    cmocka_unit_test(test_meta_exception),
	    cmocka_unit_test(test_json_string),
	    cmocka_unit_test(test_meta_parent_group_and_escaping),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

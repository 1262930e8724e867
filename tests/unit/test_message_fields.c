/* The numeric fields a producer fills (retries, priority, timelimit, eta, expires): malformed values are refused
 * with a reason and the task id kept for the FAILURE meta, never read as a default. Also the envelope peek the
 * sweeps use, and the bounded dead-letter entry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

/* A v2 envelope (body [[], {}, {}]) with extra headers and properties. */
static char *
v2_with(const char *headers_extra, const char *props_extra)
{
	size_t n = strlen(headers_extra) + strlen(props_extra) + 300;
	char *s = malloc(n);
	snprintf(s, n,
	         "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"i9\"%s}, \"properties\": "
	         "{\"body_encoding\": \"base64\"%s}}",
	         headers_extra, props_extra);
	return s;
}

static void
expect_field_bad(const char *headers_extra, const char *props_extra, const char *field)
{
	char *s = v2_with(headers_extra, props_extra);
	struct message m;
	if (message_decode(s, strlen(s), &m) != -1)
		fail_msg("accepted: %s", s);
	assert_string_equal(m.exc_type, "ValueError");
	if (strncmp(m.reason, field, strlen(field)) != 0)
		fail_msg("reason '%s' does not name %s (%s)", m.reason, field, s);
	assert_string_equal(m.task_id, "i9"); /* a FAILURE result is written under it */
	message_free(&m);
	free(s);
}

static void
test_malformed_fields_refused(void **state)
{
	(void)state;
	static const char *const retries[] = {"\"3\"", "-1", "2.5", "1000001", "true", "[1]", "{}"};
	for (size_t i = 0; i < sizeof retries / sizeof retries[0]; i++) {
		char h[64];
		snprintf(h, sizeof h, ", \"retries\": %s", retries[i]);
		expect_field_bad(h, "", "retries");
	}
	static const char *const priority[] = {"\"high\"", "-1", "256", "4.5", "false", "[]"};
	for (size_t i = 0; i < sizeof priority / sizeof priority[0]; i++) {
		char p[64];
		snprintf(p, sizeof p, ", \"priority\": %s", priority[i]);
		expect_field_bad("", p, "priority");
	}
	static const char *const timelimit[] = {"5",           "\"5\"",      "[]",          "[1]",
	                                        "[1, 2, 3]",   "[-1, null]", "[null, -2]",  "[\"1\", 2]",
	                                        "[1e8, null]", "{}",         "[true, null]"};
	for (size_t i = 0; i < sizeof timelimit / sizeof timelimit[0]; i++) {
		char h[64];
		snprintf(h, sizeof h, ", \"timelimit\": %s", timelimit[i]);
		expect_field_bad(h, "", "timelimit");
	}
	static const char *const times[] = {"\"soon\"", "\"2026-13-01T00:00:00\"", "-5", "1e13", "true", "[]", "{}"};
	for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
		char h[64];
		snprintf(h, sizeof h, ", \"eta\": %s", times[i]);
		expect_field_bad(h, "", "eta");
		snprintf(h, sizeof h, ", \"expires\": %s", times[i]);
		expect_field_bad(h, "", "expires");
	}
}

static void
test_wellformed_fields_read(void **state)
{
	(void)state;
	struct message m;
	/* null everywhere is Celery's "not set" */
	char *s = v2_with(", \"retries\": null, \"timelimit\": null, \"eta\": null, \"expires\": null",
	                  ", \"priority\": null");
	assert_int_equal(message_decode(s, strlen(s), &m), 0);
	assert_int_equal(m.retries, 0);
	assert_int_equal(m.priority, 0);
	assert_true(m.hard_limit < 0 && m.soft_limit < 0);
	assert_true(m.eta == 0 && m.expires == 0);
	message_free(&m);
	free(s);
	s = v2_with(", \"retries\": 7, \"timelimit\": [0, 10000000], \"eta\": 0", ", \"priority\": 255");
	assert_int_equal(message_decode(s, strlen(s), &m), 0);
	assert_int_equal(m.retries, 7);
	assert_int_equal(m.priority, 255);
	assert_true(m.hard_limit == 0 && m.soft_limit == 1e7);
	message_free(&m);
	free(s);
}

static void
test_v1_fields_refused(void **state)
{
	(void)state;
	/* protocol v1 keeps them in the body: the same rules */
	const char *v1 = "{\"body\": \"{\\\"task\\\": \\\"spark.noop\\\", \\\"id\\\": \\\"v9\\\", \\\"retries\\\": "
	                 "\\\"2\\\"}\", \"headers\": {}}";
	struct message m;
	assert_int_equal(message_decode(v1, strlen(v1), &m), -1);
	assert_non_null(strstr(m.reason, "retries"));
	assert_string_equal(m.task_id, "v9");
	message_free(&m);
	const char *tl = "{\"body\": \"{\\\"task\\\": \\\"spark.noop\\\", \\\"id\\\": \\\"v9\\\", \\\"timelimit\\\": "
	                 "[1]}\", \"headers\": {}}";
	assert_int_equal(message_decode(tl, strlen(tl), &m), -1);
	assert_non_null(strstr(m.reason, "timelimit"));
	message_free(&m);
}

static void
test_peek(void **state)
{
	(void)state;
	const char *raw =
	    "{\"body\": \"not even base64 !!\", \"headers\": {\"id\": \"p\\u0031\", \"ignore_result\": true}, "
	    "\"properties\": {\"delivery_tag\": \"tg\", \"priority\": 6, \"delivery_info\": {\"routing_key\": \"q\"}}}";
	struct message_peek pk;
	assert_int_equal(message_peek(raw, strlen(raw), &pk), 0);
	assert_string_equal(pk.id, "p1");
	assert_string_equal(pk.tag, "tg");
	assert_string_equal(pk.routing_key, "q");
	assert_int_equal(pk.priority, 6);
	assert_true(pk.ignore_result);
	message_peek_free(&pk);
	/* the id falls back to correlation_id; a malformed priority reads as 0 */
	const char *v1 = "{\"properties\": {\"correlation_id\": \"c\", \"priority\": \"x\"}}";
	assert_int_equal(message_peek(v1, strlen(v1), &pk), 0);
	assert_string_equal(pk.id, "c");
	assert_null(pk.tag);
	assert_int_equal(pk.priority, 0);
	message_peek_free(&pk);
	assert_int_equal(message_peek("[1]", 3, &pk), -1);
	assert_null(pk.id);
	assert_int_equal(message_peek("{\"a\": ", 6, &pk), -1);
}

static void
test_deadletter_entry_bounded(void **state)
{
	(void)state;
	/* a long message keeps its head, and says so */
	size_t len = 200000;
	char *raw = malloc(len);
	memset(raw, 'a', len);
	/* a 2-byte UTF-8 sequence across the cut: the head ends before it */
	raw[DEADLETTER_MESSAGE_MAX - 1] = '\xc3';
	raw[DEADLETTER_MESSAGE_MAX] = '\xa9';
	char *e = message_deadletter_entry("big", "celery", 1, raw, len);
	json_t *j = json_loads(e, 0, NULL);
	assert_non_null(j);
	assert_true(json_is_true(json_object_get(j, "truncated")));
	assert_int_equal(json_integer_value(json_object_get(j, "message_bytes")), len);
	const char *msg = json_string_value(json_object_get(j, "message"));
	assert_int_equal(strlen(msg), DEADLETTER_MESSAGE_MAX - 1);
	assert_null(json_object_get(j, "message_base64"));
	assert_true(strlen(e) < DEADLETTER_MESSAGE_MAX + 200);
	json_decref(j);
	free(e);
	/* not UTF-8: the head in base64 */
	raw[10] = '\xff';
	e = message_deadletter_entry("big", NULL, 1, raw, len);
	j = json_loads(e, 0, NULL);
	size_t b64 = strlen(json_string_value(json_object_get(j, "message_base64")));
	assert_int_equal(b64, 4 * ((DEADLETTER_MESSAGE_MAX + 2) / 3));
	assert_true(json_is_true(json_object_get(j, "truncated")));
	json_decref(j);
	free(e);
	/* at the bound: whole, nothing named */
	memset(raw, 'b', DEADLETTER_MESSAGE_MAX);
	e = message_deadletter_entry("ok", NULL, 1, raw, DEADLETTER_MESSAGE_MAX);
	j = json_loads(e, 0, NULL);
	assert_null(json_object_get(j, "truncated"));
	assert_int_equal(strlen(json_string_value(json_object_get(j, "message"))), DEADLETTER_MESSAGE_MAX);
	json_decref(j);
	free(e);
	free(raw);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_malformed_fields_refused), cmocka_unit_test(test_wellformed_fields_read),
	    cmocka_unit_test(test_v1_fields_refused),        cmocka_unit_test(test_peek),
	    cmocka_unit_test(test_deadletter_entry_bounded),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

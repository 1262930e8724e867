/* Celery message decoding, retry envelopes, key names, ISO times, backoff, task registry and built-ins. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

/* A real Celery 5.2.6 envelope (reference §1.3), body [[1, 2], {"z": "é"}, {...}]. */
static const char *captured =
    "{\"body\": "
    "\"W1sxLCAyXSwgeyJ6IjogIlx1MDBlOSJ9LCB7ImNhbGxiYWNrcyI6IG51bGwsICJlcnJiYWNrcyI6IG51bGwsICJjaGFpbiI6IG51bGwsICJjaG9y"
    "ZCI6IG51bGx9XQ==\","
    " \"content-encoding\": \"utf-8\", \"content-type\": \"application/json\","
    " \"headers\": {\"lang\": \"py\", \"task\": \"tasks.add\", \"id\": \"e23e56a0-fdaf-44e6-8d71-58411ad3651a\", "
    "\"shadow\": null, \"eta\": \"2026-11-26T18:46:22.400551+00:00\", \"expires\": "
    "\"2026-11-26T18:47:52.400551+00:00\","
    " \"group\": null, \"group_index\": null, \"retries\": 0, \"timelimit\": [null, null],"
    " \"root_id\": \"e23e56a0-fdaf-44e6-8d71-58411ad3651a\", \"parent_id\": null, \"argsrepr\": \"(1, 2)\","
    " \"kwargsrepr\": \"{'z': '\\u00e9'}\", \"origin\": \"gen8197@vm\", \"ignore_result\": false},"
    " \"properties\": {\"correlation_id\": \"e23e56a0-fdaf-44e6-8d71-58411ad3651a\", \"reply_to\": \"x\","
    " \"delivery_mode\": 2, \"expiration\": \"120000\", \"delivery_info\": {\"exchange\": \"\", \"routing_key\": "
    "\"celery\"}, \"priority\": 5, \"body_encoding\": \"base64\", \"delivery_tag\": "
    "\"f7b6798f-94d3-4dba-89a2-ed87d39e936d\"}}";

static void
test_decode_captured(void **state)
{
	(void)state;
	struct message m;
	assert_int_equal(message_decode(captured, strlen(captured), &m), 0);
	assert_string_equal(m.task_name, "tasks.add");
	assert_string_equal(m.task_id, "e23e56a0-fdaf-44e6-8d71-58411ad3651a");
	assert_string_equal(m.delivery_tag, "f7b6798f-94d3-4dba-89a2-ed87d39e936d");
	assert_string_equal(m.routing_key, "celery");
	assert_int_equal(m.priority, 5);
	assert_int_equal(json_array_size(m.args), 2);
	assert_int_equal(json_integer_value(json_array_get(m.args, 1)), 2);
	assert_string_equal(json_string_value(json_object_get(m.kwargs, "z")), "\xc3\xa9");
	assert_true(fabs(m.eta - 1795718782.400551) < 1e-5);
	assert_true(fabs(m.expires - m.eta - 90) < 1e-5);
	assert_true(m.hard_limit < 0 && m.soft_limit < 0);
	assert_false(m.ignore_result);
	assert_false(m.redelivered);
	message_free(&m);
}

static void
expect_bad(const char *raw, const char *exc_type, const char *reason_part, const char *task_id)
{
	struct message m;
	assert_int_equal(message_decode(raw, strlen(raw), &m), -1);
	assert_string_equal(m.exc_type, exc_type);
	if (strstr(m.reason, reason_part) == NULL)
		fail_msg("reason '%s' lacks '%s'", m.reason, reason_part);
	if (task_id == NULL)
		assert_null(m.task_id);
	else
		assert_string_equal(m.task_id, task_id);
	message_free(&m);
}

static void
test_decode_bad(void **state)
{
	(void)state;
	expect_bad("not json", "ValueError", "not JSON", NULL);
	expect_bad("[1, 2]", "ValueError", "not a JSON object", NULL);
	expect_bad("{\"body\": \"W10=\"}", "ValueError", "no headers", NULL);
	expect_bad("{\"body\": \"!!\", \"headers\": {\"task\": \"a\", \"id\": \"i1\"}, \"properties\": "
	           "{\"body_encoding\": \"base64\"}}",
	           "ValueError", "base64", "i1");
	expect_bad("{\"body\": \"W10=\", \"headers\": {\"task\": \"a\", \"id\": \"i2\", \"compression\": \"zlib\"}}",
	           "ValueError", "compressed", "i2");
	expect_bad("{\"body\": \"\", \"content-type\": \"application/x-yaml\", \"headers\": {\"id\": \"i3\"}}",
	           "ValueError", "content-type", "i3");
	/* body {"a":1},{},{} as args: not a list */
	expect_bad("{\"body\": \"W3siYSI6MX0sIHt9LCB7fV0=\", \"headers\": {\"task\": \"a\", \"id\": \"i4\"}, "
	           "\"properties\": {\"body_encoding\": \"base64\"}}",
	           "TypeError", "args", "i4");
	/* body [[],{},{}] with no task header */
	expect_bad("{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"id\": \"i5\"}, \"properties\": "
	           "{\"body_encoding\": \"base64\", \"correlation_id\": \"i5\"}}",
	           "ValueError", "task", "i5");
	expect_bad(
	    "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"a\", \"id\": \"i6\", \"eta\": \"soon\"}, "
	    "\"properties\": {\"body_encoding\": \"base64\"}}",
	    "ValueError", "eta", "i6");
}

static void
test_decode_v1_and_limits(void **state)
{
	(void)state;
	/* protocol v1: {"task": "spark.noop", "id": "v1", "args": [7], "kwargs": {}, "retries": 2}, utf-8 body */
	const char *v1 = "{\"body\": \"{\\\"task\\\": \\\"spark.noop\\\", \\\"id\\\": \\\"v1\\\", \\\"args\\\": [7], "
	                 "\\\"kwargs\\\": {}, \\\"retries\\\": 2, \\\"timelimit\\\": [9, 4]}\", \"headers\": {}, "
	                 "\"properties\": {\"body_encoding\": \"utf-8\"}}";
	struct message m;
	assert_int_equal(message_decode(v1, strlen(v1), &m), 0);
	assert_true(m.v1);
	assert_string_equal(m.task_name, "spark.noop");
	assert_int_equal(m.retries, 2);
	assert_true(m.hard_limit == 9 && m.soft_limit == 4);
	message_free(&m);

	const char *v2 =
	    "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"a\", \"id\": \"x\", \"timelimit\": "
	    "[10, null], \"ignore_result\": true, \"redelivered\": true}, \"properties\": "
	    "{\"body_encoding\": \"base64\"}}";
	assert_int_equal(message_decode(v2, strlen(v2), &m), 0);
	assert_true(m.hard_limit == 10 && m.soft_limit < 0);
	assert_true(m.ignore_result);
	assert_true(m.redelivered);
	message_free(&m);
}

static void
test_iso(void **state)
{
	(void)state;
	double t;
	assert_int_equal(message_parse_iso("1970-01-01T00:00:00", &t), 0);
	assert_true(t == 0);
	assert_int_equal(message_parse_iso("1970-01-01T01:00:00+01:00", &t), 0);
	assert_true(t == 0);
	assert_int_equal(message_parse_iso("1970-01-01T00:00:01.5Z", &t), 0);
	assert_true(t == 1.5);
	assert_int_equal(message_parse_iso("2026-11-26T18:46:22.400551+00:00", &t), 0);
	assert_true(fabs(t - 1795718782.400551) < 1e-5);
	assert_int_equal(message_parse_iso("2026-11-26 18:46:22-0130", &t), 0);
	assert_true(t == 1795718782 + 5400);
	assert_int_equal(message_parse_iso("tomorrow", &t), -1);
	assert_int_equal(message_parse_iso("2026-13-01T00:00:00", &t), -1);
	assert_int_equal(message_parse_iso("2026-11-26T18:46:22+00:00 junk", &t), -1);

	char buf[64];
	message_format_iso(1795718782.400551, true, buf, sizeof buf);
	assert_string_equal(buf, "2026-11-26T18:46:22.400551+00:00");
	message_format_iso(0, false, buf, sizeof buf);
	assert_string_equal(buf, "1970-01-01T00:00:00.000000");
}

static void
test_keys(void **state)
{
	(void)state;
	int want[] = {0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9};
	for (int p = 0; p <= 10; p++)
		assert_int_equal(message_priority_step(p), want[p]);
	assert_int_equal(message_priority_step(-4), 0);
	char *k = message_queue_key("celery", 0);
	assert_string_equal(k, "celery");
	free(k);
	k = message_queue_key("celery", 5);
	assert_memory_equal(k,
	                    "celery\x06\x16"
	                    "3",
	                    9);
	char *q = message_queue_of_key(k);
	assert_string_equal(q, "celery");
	free(q);
	free(k);
}

static void
test_retry_envelope(void **state)
{
	(void)state;
	struct message m;
	assert_int_equal(message_decode(captured, strlen(captured), &m), 0);
	char *env = message_build_retry(&m, 1, 1795718800.25);
	assert_non_null(env);
	struct message r;
	assert_int_equal(message_decode(env, strlen(env), &r), 0);
	assert_string_equal(r.task_id, m.task_id);
	assert_int_equal(r.retries, 1);
	assert_true(fabs(r.eta - 1795718800.25) < 1e-5);
	assert_string_not_equal(r.delivery_tag, m.delivery_tag);
	assert_int_equal(strlen(r.delivery_tag), 36);
	assert_string_equal(json_string_value(json_object_get(r.headers, "parent_id")), m.task_id);
	assert_true(json_equal(r.args, m.args));
	/* [] and {} survive (unlike a Lua cjson round trip) */
	assert_non_null(strstr(env, "\"timelimit\":[null,null]"));
	message_free(&r);
	free(env);

	char *marked = message_mark_redelivered(captured, strlen(captured));
	assert_int_equal(message_decode(marked, strlen(marked), &r), 0);
	assert_true(r.redelivered);
	assert_string_equal(r.delivery_tag, m.delivery_tag);
	message_free(&r);
	free(marked);
	assert_null(message_mark_redelivered("nope", 4));
	message_free(&m);
}

static void
test_deadletter_and_eta_member(void **state)
{
	(void)state;
	char *e = message_deadletter_entry("bad", "celery", 12.5, "a\"b", 3);
	json_t *j = json_loads(e, 0, NULL);
	assert_string_equal(json_string_value(json_object_get(j, "reason")), "bad");
	assert_string_equal(json_string_value(json_object_get(j, "queue")), "celery");
	assert_string_equal(json_string_value(json_object_get(j, "message")), "a\"b");
	json_decref(j);
	free(e);
	e = message_deadletter_entry("bad", NULL, 1, "\xff\xfe", 2);
	j = json_loads(e, 0, NULL);
	assert_string_equal(json_string_value(json_object_get(j, "message_base64")), "//4=");
	json_decref(j);
	free(e);
	e = message_eta_member("celery", "{\"x\": []}", 9);
	j = json_loads(e, 0, NULL);
	assert_string_equal(json_string_value(json_object_get(j, "envelope")), "{\"x\": []}");
	json_decref(j);
	free(e);
}

static void
b64_roundtrip(const char *plain, const char *encoded)
{
	char *e = message_b64_encode((const unsigned char *)plain, strlen(plain));
	assert_string_equal(e, encoded);
	free(e);
	size_t n = 99;
	unsigned char *d = message_b64_decode(encoded, strlen(encoded), &n);
	assert_non_null(d);
	assert_int_equal(n, strlen(plain));
	assert_memory_equal(d, plain, n);
	assert_int_equal(d[n], '\0');
	free(d);
}

static void
b64_refused(const char *s)
{
	size_t n;
	unsigned char *d = message_b64_decode(s, strlen(s), &n);
	if (d != NULL)
		fail_msg("'%s' decoded", s);
}

static void
test_base64(void **state)
{
	(void)state;
	/* RFC 4648 section 10 */
	b64_roundtrip("", "");
	b64_roundtrip("f", "Zg==");
	b64_roundtrip("fo", "Zm8=");
	b64_roundtrip("foo", "Zm9v");
	b64_roundtrip("foob", "Zm9vYg==");
	b64_roundtrip("fooba", "Zm9vYmE=");
	b64_roundtrip("foobar", "Zm9vYmFy");
	/* every byte value, and both ends of the alphabet */
	unsigned char all[256];
	for (int i = 0; i < 256; i++)
		all[i] = (unsigned char)i;
	for (size_t len = 0; len <= sizeof all; len += 85) {
		char *e = message_b64_encode(all, len);
		size_t n;
		unsigned char *d = message_b64_decode(e, strlen(e), &n);
		assert_non_null(d);
		assert_int_equal(n, len);
		assert_memory_equal(d, all, len);
		free(d);
		free(e);
	}
	b64_roundtrip("\xfb\xff\xbf", "+/+/");
	/* whitespace at the ends, as a body may carry */
	size_t n;
	unsigned char *d = message_b64_decode(" Zm9v\r\n", 7, &n);
	assert_non_null(d);
	assert_int_equal(n, 3);
	assert_memory_equal(d, "foo", 3);
	free(d);
	/* malformed: bad length, missing padding, characters outside the standard alphabet (urlsafe too),
	 * padding in the middle or too much of it, whitespace inside */
	b64_refused("Zg");
	b64_refused("Zg=");
	b64_refused("Zm9vY");
	b64_refused("Zm9v-_==");
	b64_refused("Zm9v!A==");
	b64_refused("Zg==Zg==");
	b64_refused("Z===");
	b64_refused("====");
	b64_refused("Zm=v");
	b64_refused("Zm 9v");
	b64_refused("Zm9v\xc3\xa9"
	            "A=");
	/* the length is what counts: an embedded NUL is an invalid character */
	assert_null(message_b64_decode("Zm\0v", 4, &n));
}

static void
test_countdown(void **state)
{
	(void)state;
	struct spark_config cfg;
	memset(&cfg, 0, sizeof cfg);
	cfg.retry_backoff = true;
	cfg.retry_backoff_max = 120;
	cfg.default_retry_delay = 5;
	assert_true(message_retry_countdown(&cfg, 0, 0) == 0.5);
	assert_true(message_retry_countdown(&cfg, 0, 0.999) < 1);
	assert_true(message_retry_countdown(&cfg, 3, 0) == 4);
	assert_true(message_retry_countdown(&cfg, 3, 1) == 8);
	assert_true(message_retry_countdown(&cfg, 20, 1) == 120);
	assert_true(message_retry_countdown(&cfg, 500, 0) == 60);
	cfg.retry_backoff = false;
	assert_true(message_retry_countdown(&cfg, 7, 0.3) == 5);
}

static void
test_tasks(void **state)
{
	(void)state;
	assert_ptr_equal(task_lookup("spark.noop"), task_noop);
	assert_ptr_equal(task_lookup("spark.sleep"), task_sleep);
	assert_non_null(task_lookup("automagik_spark.core.tasks.workflow_tasks.execute_workflow"));
	assert_non_null(task_lookup("spark.run_task"));
	assert_null(task_lookup("spark.nope"));
	assert_null(task_lookup(NULL));

	atomic_int cancel = TASK_CANCEL_NONE;
	struct task_run run;
	memset(&run, 0, sizeof run);
	run.args = json_pack("[s]", "h\xc3\xa9");
	run.kwargs = json_object();
	run.cancel = &cancel;
	task_noop(&run);
	assert_int_equal(run.outcome, TASK_SUCCESS);
	assert_string_equal(json_string_value(run.result), "h\xc3\xa9");
	json_decref(run.result);
	json_decref(run.args);
	run.result = NULL;

	run.args = json_array();
	task_noop(&run);
	assert_int_equal(run.outcome, TASK_FAILURE);
	assert_string_equal(run.exc_type, "TypeError");

	run.outcome = TASK_SUCCESS;
	json_array_append_new(run.args, json_string("x"));
	task_sleep(&run);
	assert_int_equal(run.outcome, TASK_FAILURE);
	assert_string_equal(run.exc_type, "TypeError");
	json_array_set_new(run.args, 0, json_real(-1));
	task_sleep(&run);
	assert_string_equal(run.exc_type, "ValueError");

	/* cancelled at once by a soft limit */
	run.outcome = TASK_SUCCESS;
	json_array_set_new(run.args, 0, json_integer(30));
	cancel = TASK_CANCEL_SOFT_LIMIT;
	task_sleep(&run);
	assert_int_equal(run.outcome, TASK_FAILURE);
	assert_string_equal(run.exc_type, "SoftTimeLimitExceeded");
	assert_string_equal(run.exc_module, "celery.exceptions");

	cancel = TASK_CANCEL_NONE;
	run.outcome = TASK_FAILURE;
	json_array_set_new(run.args, 0, json_real(0.01));
	task_sleep(&run);
	assert_int_equal(run.outcome, TASK_SUCCESS);
	assert_true(json_real_value(run.result) == 0.01);
	json_decref(run.result);
	run.result = NULL;
	json_decref(run.args);
	json_decref(run.kwargs);

	task_fail(&run, TASK_RETRY, "builtins", "TimeoutError", "line1\nline2 %d", 3);
	assert_int_equal(run.outcome, TASK_RETRY);
	assert_string_equal(run.exc_message, "line1 line2 3");
}

static void
test_result_exception(void **state)
{
	(void)state;
	json_t *e = result_exception("celery.exceptions", "NotRegistered", "spark.nope");
	char *s = json_dumps(e, JSON_COMPACT | JSON_SORT_KEYS);
	assert_string_equal(s, "{\"exc_message\":[\"spark.nope\"],\"exc_module\":\"celery.exceptions\",\"exc_type\":"
	                       "\"NotRegistered\"}");
	free(s);
	json_decref(e);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_decode_captured),
	    cmocka_unit_test(test_decode_bad),
	    cmocka_unit_test(test_decode_v1_and_limits),
	    cmocka_unit_test(test_iso),
	    cmocka_unit_test(test_keys),
	    cmocka_unit_test(test_retry_envelope),
	    cmocka_unit_test(test_deadletter_and_eta_member),
	    cmocka_unit_test(test_base64),
	    cmocka_unit_test(test_countdown),
	    cmocka_unit_test(test_tasks),
	    cmocka_unit_test(test_result_exception),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Celery message decoding (the jsmn scan and its parity with jansson), retry envelopes, backoff. Key names, ISO
 * times and base64 are test_message_codec.c's. */
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
	assert_string_equal(m.exchange, "");
	assert_int_equal(m.priority, 5);
	/* the raw spans of the decoded body, escapes kept */
	assert_int_equal(m.args_len, 6);
	assert_memory_equal(m.args_json, "[1, 2]", 6);
	assert_int_equal(m.kwargs_len, 15);
	assert_memory_equal(m.kwargs_json, "{\"z\": \"\\u00e9\"}", 15);
	assert_int_equal(m.arg0_len, 1);
	assert_memory_equal(m.arg0_json, "1", 1);
	assert_true(m.body > m.store && m.args_json > m.body && m.args_json < m.body + m.body_len);
	assert_null(m.parent_id); /* null in the headers */
	assert_null(m.group_id);
	assert_null(m.args);
	assert_int_equal(message_dom(&m, captured, strlen(captured)), 0);
	assert_int_equal(json_array_size(m.args), 2);
	assert_int_equal(json_integer_value(json_array_get(m.args, 1)), 2);
	assert_string_equal(json_string_value(json_object_get(m.kwargs, "z")), "\xc3\xa9");
	assert_string_equal(json_string_value(json_object_get(m.headers, "origin")), "gen8197@vm");
	/* idempotent: the same values */
	json_t *args = m.args, *headers = m.headers;
	assert_int_equal(message_dom(&m, captured, strlen(captured)), 0);
	assert_ptr_equal(m.args, args);
	assert_ptr_equal(m.headers, headers);
	assert_true(fabs(m.eta - 1795718782.400551) < 1e-5);
	assert_true(fabs(m.expires - m.eta - 90) < 1e-5);
	assert_true(m.hard_limit < 0 && m.soft_limit < 0);
	assert_false(m.ignore_result);
	assert_false(m.redelivered);
	assert_false(m.v1);
	message_free(&m);
	assert_null(m.store);
	assert_null(m.args);
	message_free(&m); /* twice is harmless */
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
	assert_string_equal(m.task_id, "v1");
	assert_int_equal(m.retries, 2);
	assert_true(m.hard_limit == 9 && m.soft_limit == 4);
	assert_int_equal(m.args_len, 3);
	assert_memory_equal(m.args_json, "[7]", 3);
	assert_memory_equal(m.arg0_json, "7", m.arg0_len);
	assert_memory_equal(m.kwargs_json, "{}", m.kwargs_len);
	/* the body is the unescaped string */
	assert_int_equal(m.body_len, strlen(m.body));
	assert_non_null(strstr(m.body, "\"task\": \"spark.noop\""));
	message_free(&m);

	const char *v2 =
	    "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"a\", \"id\": \"x\", \"timelimit\": "
	    "[10, null], \"ignore_result\": true, \"redelivered\": true}, \"properties\": "
	    "{\"body_encoding\": \"base64\"}}";
	assert_int_equal(message_decode(v2, strlen(v2), &m), 0);
	assert_true(m.hard_limit == 10 && m.soft_limit < 0);
	assert_true(m.ignore_result);
	assert_true(m.redelivered);
	assert_memory_equal(m.args_json, "[]", m.args_len);
	assert_null(m.arg0_json); /* args is empty */
	message_free(&m);

	/* v1 without args and kwargs: empty ones, also for the DOM */
	const char *bare = "{\"body\": \"{\\\"task\\\": \\\"a\\\", \\\"id\\\": \\\"b\\\"}\", \"headers\": {}}";
	assert_int_equal(message_decode(bare, strlen(bare), &m), 0);
	assert_memory_equal(m.args_json, "[]", m.args_len);
	assert_memory_equal(m.kwargs_json, "{}", m.kwargs_len);
	assert_null(m.arg0_json);
	assert_int_equal(message_dom(&m, bare, strlen(bare)), 0);
	assert_int_equal(json_array_size(m.args), 0);
	assert_true(json_is_object(m.kwargs) && json_object_size(m.kwargs) == 0);
	assert_true(json_is_object(m.headers));
	message_free(&m);

	/* timelimit only soft; integral reals as retries and priority count as their value, as Python's int() */
	const char *odd =
	    "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"a\", \"id\": \"x\", \"timelimit\": "
	    "[null, 2.5], \"retries\": 3.0, \"eta\": 1795718782.5}, \"properties\": {\"priority\": 5.0, "
	    "\"body_encoding\": \"base64\", \"delivery_info\": {\"redelivered\": true}}}";
	assert_int_equal(message_decode(odd, strlen(odd), &m), 0);
	assert_true(m.hard_limit < 0 && m.soft_limit == 2.5);
	assert_int_equal(m.retries, 3);
	assert_int_equal(m.priority, 5);
	assert_true(m.eta == 1795718782.5);
	assert_true(m.redelivered);
	message_free(&m);
	const char *many =
	    "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"a\", \"id\": \"x\", \"retries\": "
	    "1000000}, \"properties\": {\"body_encoding\": \"base64\"}}";
	assert_int_equal(message_decode(many, strlen(many), &m), 0);
	assert_int_equal(m.retries, MESSAGE_MAX_RETRIES);
	message_free(&m);
}

/* A v2 message around a body given as text (sent base64-encoded) and extra headers. */
static char *
v2_message(const char *headers_extra, const char *body)
{
	char *b64 = b64_encode((const unsigned char *)body, strlen(body));
	size_t n = strlen(b64) + strlen(headers_extra) + 200;
	char *s = malloc(n);
	snprintf(s, n,
	         "{\"body\": \"%s\", \"headers\": {\"task\": \"t\", \"id\": \"i\"%s}, \"properties\": "
	         "{\"body_encoding\": \"base64\"}}",
	         b64, headers_extra);
	free(b64);
	return s;
}

static void
test_decode_escapes(void **state)
{
	(void)state;
	/* escapes in ids, names and tags: unescaped, surrogate pairs to 4-byte UTF-8 */
	const char *raw =
	    "{\"body\": \"W1tdLHt9LHt9XQ\\u003d\\u003d\", \"content-type\": \"application\\/json\", "
	    "\"headers\": {\"task\": \"spark\\u002enoop\", \"id\": \"a\\u00e9\\ud83d\\ude00\\\"\\\\\\/\\n\\t\", "
	    "\"parent_id\": \"p\\u0031\", \"group\": \"g\\\"1\"}, \"properties\": {\"body_encoding\": "
	    "\"base64\", \"delivery_tag\": \"t\\u00e9g\", \"delivery_info\": {\"exchange\": \"e\\u0078\", "
	    "\"routing_key\": \"r\\u0000k\"}}}";
	struct message m;
	/* \u0000 is refused as jansson refuses it */
	assert_int_equal(message_decode(raw, strlen(raw), &m), -1);
	assert_non_null(strstr(m.reason, "envelope is not JSON"));
	message_free(&m);

	char *fixed = strdup(raw);
	char *nul = strstr(fixed, "\\u0000");
	memcpy(nul, "\\u004b", 6);
	assert_int_equal(message_decode(fixed, strlen(fixed), &m), 0);
	assert_string_equal(m.task_name, "spark.noop");
	assert_string_equal(m.task_id, "a\xc3\xa9\xf0\x9f\x98\x80\"\\/\n\t");
	assert_string_equal(m.parent_id, "p1");
	assert_string_equal(m.group_id, "g\"1");
	assert_string_equal(m.delivery_tag, "t\xc3\xa9g");
	assert_string_equal(m.exchange, "ex");
	assert_string_equal(m.routing_key, "rKk");
	message_free(&m);
	free(fixed);

	/* args spans keep the escapes; the DOM has the values */
	char *s =
	    v2_message("", "[[\"x\\\"y\", \"\\u00e9\\ud83d\\ude00\", [1, {\"a\": []}]], {\"k\\u0031\": \"v\"}, {}]");
	assert_int_equal(message_decode(s, strlen(s), &m), 0);
	const char *args = "[\"x\\\"y\", \"\\u00e9\\ud83d\\ude00\", [1, {\"a\": []}]]";
	assert_int_equal(m.args_len, strlen(args));
	assert_memory_equal(m.args_json, args, m.args_len);
	assert_int_equal(m.arg0_len, 6);
	assert_memory_equal(m.arg0_json, "\"x\\\"y\"", 6);
	assert_memory_equal(m.kwargs_json, "{\"k\\u0031\": \"v\"}", m.kwargs_len);
	assert_int_equal(message_dom(&m, s, strlen(s)), 0);
	assert_string_equal(json_string_value(json_array_get(m.args, 0)), "x\"y");
	assert_string_equal(json_string_value(json_array_get(m.args, 1)), "\xc3\xa9\xf0\x9f\x98\x80");
	assert_string_equal(json_string_value(json_object_get(m.kwargs, "k1")), "v");
	message_free(&m);
	free(s);

	/* a utf-8 body is a JSON string in the envelope: its escapes are undone before it is scanned */
	const char *u = "{\"body\": \"[[\\\"\\\\u00e9\\\", {\\\"a\\\": 1}], {}, {}]\", \"headers\": {\"task\": \"t\", "
	                "\"id\": \"i\"}}";
	assert_int_equal(message_decode(u, strlen(u), &m), 0);
	assert_memory_equal(m.args_json, "[\"\\u00e9\", {\"a\": 1}]", m.args_len);
	assert_memory_equal(m.arg0_json, "\"\\u00e9\"", m.arg0_len);
	message_free(&m);

	/* an escaped key is the same key */
	const char *k =
	    "{\"bo\\u0064y\": \"W1tdLHt9LHt9XQ==\", \"he\\u0061ders\": {\"t\\u0061sk\": \"t\", \"id\": \"i\"}, "
	    "\"properties\": {\"body_encoding\": \"base64\"}}";
	assert_int_equal(message_decode(k, strlen(k), &m), 0);
	assert_string_equal(m.task_name, "t");
	message_free(&m);
}

static void
test_decode_duplicates(void **state)
{
	(void)state;
	/* the last of a repeated key wins, as in jansson */
	const char *raw =
	    "{\"headers\": {\"id\": \"lost\"}, \"body\": \"!!\", \"headers\": {\"task\": \"a\", \"id\": "
	    "\"first\", \"id\": \"second\", \"retries\": 1, \"retries\": 4}, \"body\": \"W1tdLHt9LHt9XQ==\", "
	    "\"properties\": {\"body_encoding\": \"utf-8\", \"body_encoding\": \"base64\"}}";
	struct message m;
	assert_int_equal(message_decode(raw, strlen(raw), &m), 0);
	assert_string_equal(m.task_id, "second");
	assert_string_equal(m.task_name, "a");
	assert_int_equal(m.retries, 4);
	assert_int_equal(message_dom(&m, raw, strlen(raw)), 0);
	assert_string_equal(json_string_value(json_object_get(m.headers, "id")), "second");
	message_free(&m);
	/* v1 body keys too */
	const char *v1 = "{\"body\": \"{\\\"task\\\": \\\"a\\\", \\\"id\\\": \\\"b\\\", \\\"args\\\": 5, \\\"args\\\": "
	                 "[1, 2]}\", \"headers\": {}}";
	assert_int_equal(message_decode(v1, strlen(v1), &m), 0);
	assert_memory_equal(m.args_json, "[1, 2]", m.args_len);
	message_free(&m);
}

static void
test_decode_id_limits(void **state)
{
	(void)state;
	char *id = malloc(MESSAGE_MAX_ID + 2);
	memset(id, 'a', MESSAGE_MAX_ID + 1);
	id[MESSAGE_MAX_ID + 1] = '\0';
	size_t n = MESSAGE_MAX_ID + 300;
	char *raw = malloc(n);
	struct message m;
	snprintf(raw, n,
	         "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"%s\"}, "
	         "\"properties\": {\"body_encoding\": \"base64\"}}",
	         id);
	assert_int_equal(message_decode(raw, strlen(raw), &m), -1);
	assert_string_equal(m.exc_type, "ValueError");
	assert_non_null(strstr(m.reason, "MESSAGE_MAX_ID"));
	assert_null(m.task_id); /* not usable as a result key */
	message_free(&m);
	/* the limit itself is fine; so is an escaped id whose text is longer but whose value is not */
	id[MESSAGE_MAX_ID] = '\0';
	snprintf(raw, n,
	         "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"%s\"}, "
	         "\"properties\": {\"body_encoding\": \"base64\"}}",
	         id);
	assert_int_equal(message_decode(raw, strlen(raw), &m), 0);
	assert_int_equal(strlen(m.task_id), MESSAGE_MAX_ID);
	message_free(&m);
	char *esc = malloc(6 * 4000 + 300);
	strcpy(esc, "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"");
	for (int i = 0; i < 4000; i++)
		strcat(esc, "\\u0062");
	strcat(esc, "\"}, \"properties\": {\"body_encoding\": \"base64\"}}");
	assert_int_equal(message_decode(esc, strlen(esc), &m), 0);
	assert_int_equal(strlen(m.task_id), 4000);
	message_free(&m);
	free(esc);
	/* the name: bad, but the id is kept for the FAILURE meta */
	char *name = malloc(MESSAGE_MAX_NAME + 2);
	memset(name, 'n', MESSAGE_MAX_NAME + 1);
	name[MESSAGE_MAX_NAME + 1] = '\0';
	snprintf(raw, n,
	         "{\"body\": \"W1tdLHt9LHt9XQ==\", \"headers\": {\"task\": \"%s\", \"id\": \"i7\"}, "
	         "\"properties\": {\"body_encoding\": \"base64\"}}",
	         name);
	expect_bad(raw, "ValueError", "MESSAGE_MAX_NAME", "i7");
	/* v1: the same limits on the body's fields */
	snprintf(raw, n, "{\"body\": \"{\\\"task\\\": \\\"%s\\\", \\\"id\\\": \\\"i8\\\"}\", \"headers\": {}}", name);
	expect_bad(raw, "ValueError", "MESSAGE_MAX_NAME", "i8");
	free(name);
	free(raw);
	free(id);
}

/* What the scan refuses comes out as "not JSON" with the part named (jscan's own parity tests: test_jscan.c). */
static void
test_decode_not_json(void **state)
{
	(void)state;
	const char *envelopes[] = {"{\"body\": \"W10=\", \"headers\": {\"task\": \"a\", \"id\": \"x\"},}",
	                           "{\"body\": \"W10=\" \"headers\": {}}",
	                           "{\"headers\": {\"id\": \"\\ud800\"}}",
	                           "{\"headers\": {\"id\": \"x\"}, \"retries\": 01}",
	                           "{\"headers\": {}} {}",
	                           "\"str\""};
	for (size_t i = 0; i < sizeof envelopes / sizeof envelopes[0]; i++)
		expect_bad(envelopes[i], "ValueError", "envelope is not JSON: ", NULL);
	/* the body: the same checks, and jansson's acceptance of any value there */
	struct message m;
	char *s = v2_message("", "[[], {}, {}] x");
	expect_bad(s, "ValueError", "body is not JSON: ", "i");
	free(s);
	s = v2_message("", "[[1 2], {}, {}]");
	expect_bad(s, "ValueError", "body is not JSON: ", "i");
	free(s);
	s = v2_message("", "[[\"\\ud800\"], {}, {}]");
	expect_bad(s, "ValueError", "body is not JSON: ", "i");
	free(s);
	s = v2_message("", "[[], {}, {}");
	expect_bad(s, "ValueError", "body is not JSON: ", "i");
	free(s);
	s = v2_message("", "5");
	expect_bad(s, "ValueError", "body is not [args, kwargs, embed]", "i");
	free(s);
	s = v2_message("", " \"x\" ");
	expect_bad(s, "ValueError", "body is not [args, kwargs, embed]", "i");
	free(s);
	s = v2_message("", "[[], {}, {}]\n");
	assert_int_equal(message_decode(s, strlen(s), &m), 0);
	message_free(&m);
	free(s);
	/* a base64 body that is not UTF-8 */
	const char *raw =
	    "{\"body\": \"W1si/yJdLHt9XQ==\", \"headers\": {\"task\": \"t\", \"id\": \"i\"}, \"properties\": "
	    "{\"body_encoding\": \"base64\"}}";
	expect_bad(raw, "ValueError", "body is not JSON: ", "i");
}

static void
test_decode_sizes(void **state)
{
	(void)state;
	/* more tokens than the caller's array: one counted allocation, same spans */
	size_t cap = 20000;
	char *body = malloc(cap);
	size_t n = 0;
	n += (size_t)snprintf(body + n, cap - n, "[[\"first\"");
	for (int i = 1; i < 3000; i++)
		n += (size_t)snprintf(body + n, cap - n, ",%d", i);
	snprintf(body + n, cap - n, "], {}, {}]");
	char *s =
	    v2_message(", \"argsrepr\": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, "
	               "21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, "
	               "43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, "
	               "65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, "
	               "87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, "
	               "107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, "
	               "125, 126, 127, 128, 129, 130], \"retries\": 2",
	               body);
	struct message m;
	assert_int_equal(message_decode(s, strlen(s), &m), 0);
	assert_int_equal(m.retries, 2);
	assert_memory_equal(m.arg0_json, "\"first\"", m.arg0_len);
	assert_int_equal(m.args_len, strlen(body) - strlen(", {}, {}]") - 1);
	assert_memory_equal(m.kwargs_json, "{}", m.kwargs_len);
	assert_int_equal(message_dom(&m, s, strlen(s)), 0);
	assert_int_equal(json_array_size(m.args), 3000);
	message_free(&m);
	free(s);
	free(body);

	/* past the token bound: bad with the reason, before any allocation for the tokens */
	size_t count = (1 << 20) + 10;
	char *big = malloc(2 * count + 16);
	n = 0;
	memcpy(big, "{\"x\": [", 7);
	n = 7;
	for (size_t i = 0; i < count; i++) {
		big[n++] = '0';
		big[n++] = ',';
	}
	big[n - 1] = ']';
	big[n++] = '}';
	assert_int_equal(message_decode(big, n, &m), -1);
	if (strstr(m.reason, "more than 1048576 JSON tokens") == NULL)
		fail_msg("reason: %s", m.reason);
	message_free(&m);
	free(big);
}

static void
test_retry_envelope(void **state)
{
	(void)state;
	struct message m;
	assert_int_equal(message_decode(captured, strlen(captured), &m), 0);
	char *env = message_build_retry(captured, strlen(captured), &m, 1, 1795718800.25);
	assert_non_null(env);
	struct message r;
	assert_int_equal(message_decode(env, strlen(env), &r), 0);
	assert_string_equal(r.task_id, m.task_id);
	assert_int_equal(r.retries, 1);
	assert_true(fabs(r.eta - 1795718800.25) < 1e-5);
	assert_string_not_equal(r.delivery_tag, m.delivery_tag);
	assert_int_equal(strlen(r.delivery_tag), 36);
	assert_string_equal(r.parent_id, m.task_id);
	assert_int_equal(message_dom(&r, env, strlen(env)), 0);
	assert_int_equal(message_dom(&m, captured, strlen(captured)), 0);
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
	/* a retry is a new delivery: the flags go */
	env = message_build_retry(marked, strlen(marked), &r, 2, 1795718800.25);
	message_free(&r);
	assert_int_equal(message_decode(env, strlen(env), &r), 0);
	assert_false(r.redelivered);
	assert_int_equal(r.retries, 2);
	message_free(&r);
	free(env);
	free(marked);
	assert_null(message_mark_redelivered("nope", 4));
	message_free(&m);

	/* v1: the body carries retries and eta, re-encoded in base64, with the empty args/kwargs the decoder
	 * assumed */
	const char *v1 = "{\"body\": \"{\\\"task\\\": \\\"spark.noop\\\", \\\"id\\\": \\\"v\\\\u0031\\\"}\", "
	                 "\"headers\": {}, \"properties\": {\"body_encoding\": \"utf-8\", \"delivery_tag\": \"d\"}}";
	assert_int_equal(message_decode(v1, strlen(v1), &m), 0);
	env = message_build_retry(v1, strlen(v1), &m, 3, 1795718800.25);
	assert_non_null(env);
	assert_int_equal(message_decode(env, strlen(env), &r), 0);
	assert_true(r.v1);
	assert_string_equal(r.task_id, "v1");
	assert_int_equal(r.retries, 3);
	assert_true(fabs(r.eta - 1795718800.25) < 1e-5);
	assert_memory_equal(r.args_json, "[]", r.args_len);
	assert_non_null(strstr(r.body, "\"args\":[],\"kwargs\":{},\"retries\":3"));
	assert_non_null(strstr(env, "\"body_encoding\":\"base64\""));
	message_free(&r);
	free(env);
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

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_decode_captured),
	    cmocka_unit_test(test_decode_bad),
	    cmocka_unit_test(test_decode_v1_and_limits),
	    cmocka_unit_test(test_decode_escapes),
	    cmocka_unit_test(test_decode_duplicates),
	    cmocka_unit_test(test_decode_id_limits),
	    cmocka_unit_test(test_decode_not_json),
	    cmocka_unit_test(test_decode_sizes),
	    cmocka_unit_test(test_retry_envelope),
	    cmocka_unit_test(test_deadletter_and_eta_member),
	    cmocka_unit_test(test_countdown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Workflow sources: reply shaping (worker/source-shape.c) and calls on a loop (worker/source.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

#include "source.h"

static json_t *
J(const char *text)
{
	json_error_t e;
	json_t *j = json_loads(text, JSON_DECODE_ANY, &e);
	if (!j)
		fail_msg("bad test JSON: %s", e.text);
	return j;
}

static void
assert_json(json_t *got, const char *want_text)
{
	json_t *want = J(want_text);
	if (!json_equal(got, want)) {
		char *g = json_dumps(got, JSON_ENCODE_ANY | JSON_COMPACT);
		fail_msg("got %s, want %s", g, want_text);
	}
	json_decref(want);
}

static void
test_agents(void **state)
{
	(void)state;
	json_t *r = J("{\"message\": \"hi there\", \"session_id\": \"s1\", \"tool_calls\": [{\"n\": 1}],"
	              " \"usage\": {\"tokens\": 3}, \"extra\": 1}");
	json_t *o = source_agents_output(r);
	assert_json(o, "{\"result\": \"hi there\", \"session_id\": \"s1\", \"tool_calls\": [{\"n\": 1}],"
	               " \"usage\": {\"tokens\": 3}, \"success\": true}");
	/* key order as automagik-spark builds it */
	const char *k = json_object_iter_key(json_object_iter(o));
	assert_string_equal(k, "result");
	json_decref(o);
	json_decref(r);

	r = J("{\"message\": \"no\", \"success\": false}");
	o = source_agents_output(r);
	assert_json(o, "{\"result\": \"no\", \"session_id\": null, \"tool_calls\": null, \"usage\": null,"
	               " \"success\": false}");
	json_decref(o);
	json_decref(r);

	r = J("[1, 2]"); /* not an object: everything null, success defaults to true */
	o = source_agents_output(r);
	assert_json(o, "{\"result\": null, \"session_id\": null, \"tool_calls\": null, \"usage\": null,"
	               " \"success\": true}");
	json_decref(o);
	json_decref(r);
}

static void
test_hive_ids(void **state)
{
	(void)state;
	json_t *l = J("[{\"id\": \"a1\", \"name\": \"x\"}, {\"agent_id\": \"a2\"}, {\"team_id\": \"t1\"},"
	              " {\"workflow_id\": \"w1\"}, {\"name\": \"n1\"}, {\"id\": \"\", \"name\": \"n2\"}, 5, {}]");
	const char *yes[] = {"a1", "a2", "t1", "w1", "n1", "n2"};
	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
		assert_true(source_hive_list_has(l, yes[i]));
	assert_false(source_hive_list_has(l, "x")); /* name is only used when no id field is set */
	assert_false(source_hive_list_has(l, "zz"));
	assert_false(source_hive_list_has(l, NULL));
	json_t *obj = J("{\"id\": \"a1\"}");
	assert_false(source_hive_list_has(obj, "a1")); /* a listing must be an array */
	json_t *num = json_integer(1);
	assert_null(source_hive_item_id(num));
	json_decref(num);
	json_decref(obj);
	json_decref(l);
}

static void
hive_case(enum hive_kind kind, const char *reply, const char *want, bool want_ok)
{
	json_t *r = J(reply);
	bool ok = !want_ok;
	json_t *o = source_hive_output(kind, r, &ok);
	assert_true(json_is_string(o));
	if (strcmp(json_string_value(o), want) != 0)
		fail_msg("got \"%s\", want \"%s\"", json_string_value(o), want);
	assert_int_equal(ok, want_ok);
	json_decref(o);
	json_decref(r);
}

static void
test_hive_output(void **state)
{
	(void)state;
	hive_case(HIVE_AGENT, "{\"content\": \"agent says\", \"status\": \"RUNNING\"}", "agent says", true);
	hive_case(HIVE_AGENT, "{\"content\": \"done\", \"status\": \"COMPLETED\"}", "done", true);
	hive_case(HIVE_AGENT, "{\"content\": \"done\", \"status\": \"completed\"}", "done", true);
	hive_case(HIVE_AGENT, "{\"content\": \"x\", \"status\": \"ERROR\"}", "x", false);
	hive_case(HIVE_AGENT, "{\"content\": \"no status\"}", "no status", true);
	hive_case(HIVE_AGENT, "{\"run_id\": \"r\"}", "{\"run_id\":\"r\"}", true); /* falls back to the reply */
	hive_case(HIVE_TEAM, "{\"coordinator_response\": {\"content\": \"lead\"}, \"status\": \"completed\"}", "lead",
	          true);
	hive_case(HIVE_TEAM,
	          "{\"coordinator_response\": {\"content\": \"lead\"}, \"member_responses\": [{\"agent_id\": \"a\","
	          " \"response\": \"ra\"}, {\"response\": \"rb\"}]}",
	          "lead\n\n**a**: ra\n**Agent**: rb", true);
	hive_case(HIVE_WORKFLOW, "{\"final_output\": \"final\", \"status\": \"completed\"}", "final", true);
	hive_case(HIVE_WORKFLOW,
	          "{\"steps_completed\": [{\"step_id\": \"s1\", \"status\": \"completed\", \"output\": \"o1\"},"
	          " {\"step_id\": \"s2\", \"status\": \"failed\", \"output\": \"o2\"}, {\"status\": \"completed\","
	          " \"output\": \"o3\"}]}",
	          "**s1**: o1\n**Step**: o3", true);
	hive_case(HIVE_AGENT, "{}", "", true); /* empty: the caller reports "No output from workflow" */
	hive_case(HIVE_AGENT, "{\"content\": \"caf\\u00e9 \\u2713\"}", "caf\xc3\xa9 \xe2\x9c\x93", true);
}

static void
test_classify(void **state)
{
	(void)state;
	assert_int_equal(source_classify_http(200), SOURCE_OK);
	assert_int_equal(source_classify_http(201), SOURCE_OK);
	assert_int_equal(source_classify_http(500), SOURCE_RETRY);
	assert_int_equal(source_classify_http(503), SOURCE_RETRY);
	assert_int_equal(source_classify_http(429), SOURCE_RETRY);
	assert_int_equal(source_classify_http(400), SOURCE_FAIL);
	assert_int_equal(source_classify_http(401), SOURCE_FAIL);
	assert_int_equal(source_classify_http(404), SOURCE_FAIL);
	assert_int_equal(source_classify_http(302), SOURCE_FAIL);
}

static void
on_call_done(struct source_call *c)
{
	int *calls = c->arg;
	(*calls)++;
}

/* Run the call on a private loop until done; returns how many times done ran. */
static int
run_call(struct source_call *c, const struct source_request *req, double abort_after)
{
	struct event_base *base = event_base_new();
	assert_non_null(base);
	struct http h;
	assert_int_equal(http_init(&h, base, 4), 0);
	int calls = 0;
	source_start(&h, c, req, on_call_done, &calls);
	struct timeval tv = {0, (suseconds_t)(abort_after * 1e6)};
	if (abort_after > 0) {
		event_base_loopexit(base, &tv);
		event_base_dispatch(base);
		if (calls == 0)
			source_abort(c); /* done runs before source_abort returns */
	}
	while (calls == 0)
		event_base_loop(base, EVLOOP_ONCE);
	http_free(&h);
	event_base_free(base);
	return calls;
}

static void
test_unreachable(void **state)
{
	(void)state;
	source_global_init();
	/* connect refused on a closed local port is retryable; an unknown type fails at once */
	struct source_request req = {
	    .source_type = "langflow", .url = "http://127.0.0.1:1", .remote_id = "f", .input = "x", .timeout = 5};
	struct source_call c;
	assert_int_equal(run_call(&c, &req, 0), 1);
	assert_int_equal(c.res.status, SOURCE_RETRY);
	assert_null(c.res.output);
	req.source_type = "other";
	assert_int_equal(run_call(&c, &req, 0), 1);
	assert_int_equal(c.res.status, SOURCE_FAIL);
	assert_non_null(strstr(c.res.error, "Unsupported source type"));
}

static void
test_abort(void **state)
{
	(void)state;
	source_global_init();
	/* a server that accepts (the kernel's backlog) and never answers: only the abort ends the call */
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t sl = sizeof(sa);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(fd, 8), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", ntohs(sa.sin_port));
	for (int i = 0; i < 2; i++) {
		/* LangFlow: the run request; Hive: mid-sequence, the first listing */
		struct source_request req = {.source_type = i ? "automagik-hive" : "langflow",
		                             .url = url,
		                             .remote_id = "f",
		                             .input = "x",
		                             .timeout = 30};
		struct source_call c;
		assert_int_equal(run_call(&c, &req, 0.2), 1);
		assert_int_equal(c.res.status, SOURCE_CANCELLED);
		assert_non_null(strstr(c.res.error, "cancelled"));
		assert_null(c.res.output);
	}
	close(fd);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_agents),   cmocka_unit_test(test_hive_ids),    cmocka_unit_test(test_hive_output),
	    cmocka_unit_test(test_classify), cmocka_unit_test(test_unreachable), cmocka_unit_test(test_abort),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Worker -> sparkd reports on fd 3: every kind, and malformed datagrams. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "report.h"

static struct report
parse_ok(const char *s)
{
	struct report r;
	if (report_parse(s, strlen(s), &r) != 0)
		fail_msg("'%s' refused", s);
	return r;
}

static void
parse_bad(const char *s)
{
	struct report r;
	if (report_parse(s, strlen(s), &r) != -1)
		fail_msg("'%s' accepted", s);
}

static void
test_kinds(void **state)
{
	(void)state;
	struct report r = parse_ok("ready 4");
	assert_int_equal(r.kind, REPORT_READY);
	assert_int_equal(r.slots, 4);

	r = parse_ok("start 1 300 5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f spark.sleep");
	assert_int_equal(r.kind, REPORT_START);
	assert_int_equal(r.slot, 1);
	assert_true(r.hard_limit == 300);
	assert_string_equal(r.task_id, "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f");
	assert_string_equal(r.task_name, "spark.sleep");

	r = parse_ok("start 0 0.5 - automagik_spark.core.tasks.workflow_tasks.execute_workflow");
	assert_true(r.hard_limit == 0.5);
	assert_string_equal(r.task_id, "-");
	assert_string_equal(r.task_name, "automagik_spark.core.tasks.workflow_tasks.execute_workflow");

	r = parse_ok("finish 1 abc success 10 5120");
	assert_int_equal(r.kind, REPORT_FINISH);
	assert_int_equal(r.slot, 1);
	assert_string_equal(r.task_id, "abc");
	assert_string_equal(r.outcome, "success");
	assert_int_equal(r.processed, 10);
	assert_int_equal(r.rss_kib, 5120);

	const char *outcomes[] = {"failure", "retry", "revoked", "requeued"};
	for (size_t i = 0; i < 4; i++) {
		char buf[64];
		snprintf(buf, sizeof buf, "finish 0 id %s 1 1", outcomes[i]);
		r = parse_ok(buf);
		assert_string_equal(r.outcome, outcomes[i]);
	}

	r = parse_ok("recycle max-tasks");
	assert_int_equal(r.kind, REPORT_RECYCLE);
	assert_string_equal(r.reason, "max-tasks");
	r = parse_ok("recycle max-memory");
	assert_string_equal(r.reason, "max-memory");

	r = parse_ok("draining");
	assert_int_equal(r.kind, REPORT_DRAINING);

	r = parse_ok("problem broker unreachable: Connection refused (redis://127.0.0.1:6379/0)");
	assert_int_equal(r.kind, REPORT_PROBLEM);
	assert_string_equal(r.text, "broker unreachable: Connection refused (redis://127.0.0.1:6379/0)");
	r = parse_ok("problem");
	assert_int_equal(r.kind, REPORT_PROBLEM);
	assert_string_equal(r.text, "");

	/* unknown kinds are ignored, not errors: newer workers may say more */
	r = parse_ok("heartbeat 12");
	assert_int_equal(r.kind, REPORT_UNKNOWN);
}

static void
test_malformed(void **state)
{
	(void)state;
	parse_bad("");
	parse_bad("   ");
	parse_bad("ready");
	parse_bad("ready x");
	parse_bad("ready 99999999999999999999999");
	parse_bad("start");
	parse_bad("start 1");
	parse_bad("start 1 300 id");
	parse_bad("start x 300 id name");
	parse_bad("start 1 soon id name");
	parse_bad("finish 1 id success");
	parse_bad("finish 1 id success ten 5");
	parse_bad("finish 1 id success 1 lots");
	parse_bad("recycle");
	parse_bad("averyveryverylongkindname 1");

	/* fields longer than their buffers are refused, never overflow */
	char buf[SPARK_REPORT_MAX];
	char id[200];
	memset(id, 'i', sizeof id - 1);
	id[sizeof id - 1] = '\0';
	snprintf(buf, sizeof buf, "start 0 1 %s spark.noop", id);
	parse_bad(buf);
	char name[300];
	memset(name, 'n', sizeof name - 1);
	name[sizeof name - 1] = '\0';
	snprintf(buf, sizeof buf, "start 0 1 id %s", name);
	parse_bad(buf);
	snprintf(buf, sizeof buf, "recycle %.100s", name);
	parse_bad(buf);

	/* a long problem text is cut, not overflowed */
	char text[SPARK_REPORT_MAX];
	memset(text, 'x', sizeof text);
	memcpy(text, "problem ", 8);
	struct report r;
	assert_int_equal(report_parse(text, sizeof text, &r), 0);
	assert_int_equal(strlen(r.text), sizeof r.text - 1);
}

static void
test_not_nul_terminated(void **state)
{
	(void)state;
	/* the datagram's length is authoritative: bytes after it are not read */
	const char dg[] = "ready 2GARBAGE";
	struct report r;
	assert_int_equal(report_parse(dg, 7, &r), 0);
	assert_int_equal(r.slots, 2);
	const char fin[] = "finish 0 id success 3 42 trailing";
	assert_int_equal(report_parse(fin, 24, &r), 0);
	assert_int_equal(r.rss_kib, 42);
	assert_int_equal(report_parse("ready 12", 6, &r), -1); /* "ready " */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_kinds),
	    cmocka_unit_test(test_malformed),
	    cmocka_unit_test(test_not_nul_terminated),
	};
	return cmocka_run_group_tests_name("report", tests, NULL, NULL);
}

/*
 * sparkd -> worker commands on fd 3: the builders, through a real SOCK_SEQPACKET socketpair, into the parser;
 * ids of any bytes and length, the scratch bound command_scratch_size promises, malformed lines; and the two
 * answer reports going the other way.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "command.h"
#include "report.h"

struct pair {
	int sv[2];
	struct wl_out out;
	char buf[SPARK_REPORT_MAX + 1];
	size_t len;
};

static void
pair_open(struct pair *p)
{
	memset(p, 0, sizeof *p);
	assert_int_equal(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, p->sv), 0);
	wl_out_init(&p->out, p->sv[0]);
}

/* Flush and read the one datagram the builders made. */
static void
pair_recv(struct pair *p)
{
	wl_flush(&p->out);
	ssize_t n = recv(p->sv[1], p->buf, sizeof p->buf, MSG_DONTWAIT);
	assert_true(n > 0);
	p->len = (size_t)n;
}

static void
pair_close(struct pair *p)
{
	wl_out_free(&p->out);
	close(p->sv[0]);
	close(p->sv[1]);
}

/* Parse line index `which` of the datagram with exactly the scratch the header promises. */
static struct command
parse_line(struct pair *p, int which, void **scratch)
{
	const char *s = p->buf, *end = p->buf + p->len;
	for (int i = 0; i < which; i++)
		s = (const char *)memchr(s, '\n', (size_t)(end - s)) + 1;
	const char *nl = memchr(s, '\n', (size_t)(end - s));
	size_t n = nl ? (size_t)(nl - s) : (size_t)(end - s);
	size_t sl = command_scratch_size(n);
	*scratch = malloc(sl);
	struct command c;
	assert_int_equal(command_parse(s, n, &c, *scratch, sl), 0);
	return c;
}

static void
test_revoke_roundtrip(void **state)
{
	(void)state;
	struct pair p;
	pair_open(&p);
	/* an id with a space, a percent, a newline and a lone dash, and a 10 KB one */
	char *big = malloc(10001);
	memset(big, 'x', 10000);
	big[10000] = '\0';
	const char *ids[] = {"a b%c\nd", "-", big, "5f0c2b1e-0000-4000-8000-000000000001"};
	command_revoke(&p.out, 1, "SIGKILL", 4, ids);
	command_revoke(&p.out, 0, "", 1, ids + 3);
	pair_recv(&p);
	void *scr;
	struct command c = parse_line(&p, 0, &scr);
	assert_int_equal(c.kind, COMMAND_REVOKE);
	assert_int_equal(c.terminate, 1);
	assert_string_equal(c.signal, "SIGKILL");
	assert_int_equal(c.argc, 4);
	for (int i = 0; i < 4; i++)
		assert_string_equal(c.argv[i], ids[i]);
	free(scr);
	c = parse_line(&p, 1, &scr);
	assert_int_equal(c.terminate, 0);
	assert_string_equal(c.signal, "");
	assert_int_equal(c.argc, 1);
	assert_string_equal(c.argv[0], ids[3]);
	free(scr);
	free(big);
	pair_close(&p);
}

static void
test_other_commands(void **state)
{
	(void)state;
	struct pair p;
	pair_open(&p);
	const char *qs[] = {"celery", "direct", "q=2"};
	const char *qa[] = {"id-1", "id 2"};
	command_events(&p.out, 1);
	command_queues(&p.out, 3, qs);
	command_time_limit(&p.out, "spark.sleep", 1.5, 0);
	command_query(&p.out, 42, CMD_Q_QUERY_TASK, 2, qa);
	command_query(&p.out, 43, CMD_Q_ACTIVE, 0, NULL);
	pair_recv(&p);
	void *scr;
	struct command c = parse_line(&p, 0, &scr);
	assert_int_equal(c.kind, COMMAND_EVENTS);
	assert_int_equal(c.on, 1);
	free(scr);
	c = parse_line(&p, 1, &scr);
	assert_int_equal(c.kind, COMMAND_QUEUES);
	assert_int_equal(c.argc, 3);
	assert_string_equal(c.argv[2], "q=2");
	free(scr);
	c = parse_line(&p, 2, &scr);
	assert_int_equal(c.kind, COMMAND_TIME_LIMIT);
	assert_string_equal(c.name, "spark.sleep");
	assert_true(c.soft == 1.5 && c.hard == 0);
	free(scr);
	c = parse_line(&p, 3, &scr);
	assert_int_equal(c.kind, COMMAND_QUERY);
	assert_int_equal(c.reqid, 42);
	assert_string_equal(c.what, "query_task");
	assert_int_equal(c.argc, 2);
	assert_string_equal(c.argv[1], "id 2");
	free(scr);
	c = parse_line(&p, 4, &scr);
	assert_string_equal(c.what, "active");
	assert_int_equal(c.argc, 0);
	free(scr);
	pair_close(&p);
}

static void
parse_bad(const char *s)
{
	size_t sl = command_scratch_size(strlen(s));
	void *scr = malloc(sl);
	struct command c;
	int rv = command_parse(s, strlen(s), &c, scr, sl);
	free(scr);
	if (rv != -1)
		fail_msg("'%s' accepted", s);
}

static void
test_malformed(void **state)
{
	(void)state;
	parse_bad("");
	parse_bad("revoke");
	parse_bad("revoke 1 TERM"); /* no ids */
	parse_bad("revoke x TERM id");
	parse_bad("revoke 1 TERM a%0");
	parse_bad("revoke 1 TERM a%00b");
	parse_bad("events");
	parse_bad("events yes");
	parse_bad("queues");
	parse_bad("time_limit spark.sleep 1");
	parse_bad("time_limit spark.sleep -1 2");
	parse_bad("query -1 active");
	parse_bad("query 1");
	/* too little scratch is refused, never overrun */
	const char *s = "revoke 0 - a b c d e f";
	char small[8];
	struct command c;
	assert_int_equal(command_parse(s, strlen(s), &c, small, sizeof small), -1);
	/* an unknown kind is not an error: a newer sparkd may say more */
	char scr[64];
	assert_int_equal(command_parse("resize 3", 8, &c, scr, sizeof scr), 0);
	assert_int_equal(c.kind, COMMAND_UNKNOWN);
}

static void
test_answer_reports(void **state)
{
	(void)state;
	int sv[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
	struct reporter r;
	reporter_init(&r, sv[0]);
	report_answer(&r, 7, "{\"id\": \"a b\", \"args\": \"[1, 2]\"}");
	report_answered(&r, 7, 1);
	report_flush(&r);
	char buf[512], scr[512];
	ssize_t n = recv(sv[1], buf, sizeof buf, 0);
	assert_true(n > 0);
	char *nl = memchr(buf, '\n', (size_t)n);
	assert_non_null(nl);
	struct report rp;
	assert_int_equal(report_parse(buf, (size_t)(nl - buf), &rp, scr, sizeof scr), 0);
	assert_int_equal(rp.kind, REPORT_ANSWER);
	assert_int_equal(rp.reqid, 7);
	assert_string_equal(rp.text, "{\"id\": \"a b\", \"args\": \"[1, 2]\"}");
	assert_int_equal(report_parse(nl + 1, (size_t)(buf + n - nl - 1), &rp, scr, sizeof scr), 0);
	assert_int_equal(rp.kind, REPORT_ANSWERED);
	assert_int_equal(rp.count, 1);
	reporter_free(&r);
	close(sv[0]);
	close(sv[1]);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_revoke_roundtrip),
	    cmocka_unit_test(test_other_commands),
	    cmocka_unit_test(test_malformed),
	    cmocka_unit_test(test_answer_reports),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Worker -> sparkd reports on fd 3: the builders, through a real SOCK_SEQPACKET socketpair, into the parser; ids
 * of any length and bytes; buffering and flush splitting; malformed lines.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "report.h"

/* ---- helpers ---- */

/* The report's strings live in scr (strlen(s) + 1 bytes). */
static struct report
parse_ok(const char *s, char *scr)
{
	struct report r;
	if (report_parse(s, strlen(s), &r, scr, strlen(s) + 1) != 0)
		fail_msg("'%.80s' refused", s);
	return r;
}

static void
parse_bad(const char *s)
{
	struct report r;
	char *scr = malloc(strlen(s) + 1);
	int rv = report_parse(s, strlen(s), &r, scr, strlen(s) + 1);
	free(scr);
	if (rv != -1)
		fail_msg("'%.80s' accepted", s);
}

/* What the receiving end got: every datagram, as sparkd reads them. */
struct wire {
	int sv[2];
	struct reporter rep;
	char *dg[64];
	size_t dglen[64];
	int ndg;
};

static void
wire_open(struct wire *w)
{
	memset(w, 0, sizeof *w);
	assert_int_equal(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, w->sv), 0);
	reporter_init(&w->rep, w->sv[0]);
}

/* Take every datagram waiting (never blocks). */
static void
wire_drain(struct wire *w)
{
	for (;;) {
		char *buf = malloc(SPARK_REPORT_MAX + 1);
		ssize_t n = recv(w->sv[1], buf, SPARK_REPORT_MAX + 1, MSG_DONTWAIT);
		if (n < 0) {
			assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
			free(buf);
			return;
		}
		assert_true(w->ndg < 64);
		w->dg[w->ndg] = buf;
		w->dglen[w->ndg++] = (size_t)n;
	}
}

static void
wire_close(struct wire *w)
{
	reporter_free(&w->rep);
	close(w->sv[0]);
	close(w->sv[1]);
	for (int i = 0; i < w->ndg; i++)
		free(w->dg[i]);
}

/* Flush and parse the one datagram that must come of it, as sparkd does; returns its number of reports. */
static int
wire_reports(struct wire *w, struct report *out, int max, char *scr, size_t scrlen)
{
	report_flush(&w->rep);
	wire_drain(w);
	assert_int_equal(w->ndg, 1);
	int n = 0;
	const char *p = w->dg[0], *end = p + w->dglen[0];
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
		assert_true(n < max);
		/* one scratch per report: the strings of each stay valid */
		size_t part = scrlen / (size_t)max;
		assert_int_equal(report_parse(p, len, &out[n], scr + (size_t)n * part, part), 0);
		n++;
		p += len + 1;
	}
	return n;
}

/* Bytes 1..255, then the given pattern, to exactly len bytes. */
static char *
make_id(size_t len, int variant)
{
	static const char *pat[] = {"a b\nc%d-e\t", "-", "%2D", "5f0c2a1e-1b2c-4d5e", "\x7f\x01 \xff\xc3\xa9"};
	char *s = malloc(len + 1);
	for (size_t i = 0; i < len; i++) {
		if (variant == 0)
			s[i] = (char)(1 + i % 255);
		else
			s[i] = pat[variant - 1][i % strlen(pat[variant - 1])];
	}
	s[len] = '\0';
	return s;
}

/* ---- tests ---- */

static void
test_escape(void **state)
{
	(void)state;
	struct {
		const char *in, *out;
	} cases[] = {
	    {"", "-"},
	    {NULL, "-"},
	    {"-", "%2D"},
	    {"--", "--"},
	    {"a-b", "a-b"},
	    {"%", "%25"},
	    {"a b", "a%20b"},
	    {"\n\r\t\x01\x7f", "%0A%0D%09%01%7F"},
	    {"5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f", "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f"},
	    {"automagik_spark.core.tasks.workflow_tasks.execute_workflow",
	     "automagik_spark.core.tasks.workflow_tasks.execute_workflow"},
	    {"caf\xc3\xa9=1", "caf\xc3\xa9=1"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		char *e = report_escape(cases[i].in);
		assert_string_equal(e, cases[i].out);
		free(e);
	}
}

/* Lines as the thread engine writes them parse as they always did. */
static void
test_kinds(void **state)
{
	(void)state;
	char scr[256];
	struct report r = parse_ok("ready 4", scr);
	assert_int_equal(r.kind, REPORT_READY);
	assert_int_equal(r.slots, 4);

	r = parse_ok("start 1 300 5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f spark.sleep", scr);
	assert_int_equal(r.kind, REPORT_START);
	assert_int_equal(r.slot, 1);
	assert_true(r.hard_limit == 300);
	assert_string_equal(r.task_id, "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f");
	assert_string_equal(r.task_name, "spark.sleep");

	r = parse_ok("start 0 0.5 - automagik_spark.core.tasks.workflow_tasks.execute_workflow", scr);
	assert_true(r.hard_limit == 0.5);
	assert_string_equal(r.task_id, "");
	assert_string_equal(r.task_name, "automagik_spark.core.tasks.workflow_tasks.execute_workflow");

	r = parse_ok("finish 1 abc success 10 5120", scr);
	assert_int_equal(r.kind, REPORT_FINISH);
	assert_int_equal(r.slot, 1);
	assert_string_equal(r.task_id, "abc");
	assert_string_equal(r.outcome, "success");
	assert_int_equal(r.processed, 10);
	assert_int_equal(r.rss_kib, 5120);

	r = parse_ok("progress 7 2048", scr);
	assert_int_equal(r.kind, REPORT_PROGRESS);
	assert_int_equal(r.processed, 7);
	assert_int_equal(r.rss_kib, 2048);

	r = parse_ok("recycle max-memory", scr);
	assert_int_equal(r.kind, REPORT_RECYCLE);
	assert_string_equal(r.reason, "max-memory");

	r = parse_ok("draining", scr);
	assert_int_equal(r.kind, REPORT_DRAINING);

	r = parse_ok("problem broker%20redis://127.0.0.1:6379/0%20unreachable", scr);
	assert_int_equal(r.kind, REPORT_PROBLEM);
	assert_string_equal(r.text, "broker redis://127.0.0.1:6379/0 unreachable");
	r = parse_ok("problem", scr);
	assert_string_equal(r.text, "");

	r = parse_ok("queues celery=3 a=b=0", scr);
	assert_int_equal(r.kind, REPORT_QUEUES);
	assert_int_equal(r.nqueues, 2);
	assert_string_equal(r.queue[0], "celery");
	assert_int_equal(r.queue_len[0], 3);
	assert_string_equal(r.queue[1], "a=b");
	r = parse_ok("queues", scr);
	assert_int_equal(r.nqueues, 0);

	/* unknown kinds and extra fields are ignored, not errors: newer workers may say more */
	r = parse_ok("heartbeat 12", scr);
	assert_int_equal(r.kind, REPORT_UNKNOWN);
	r = parse_ok("averyveryverylongkindname 1", scr);
	assert_int_equal(r.kind, REPORT_UNKNOWN);
	r = parse_ok("ready 2 more", scr);
	assert_int_equal(r.slots, 2);
	/* kinds have no fields' strings: never NULL */
	assert_string_equal(r.task_id, "");
	assert_string_equal(r.text, "");
}

/* Every builder, through the socket, into the parser. */
static void
test_builders_round_trip(void **state)
{
	(void)state;
	struct wire w;
	wire_open(&w);
	const char *names[40];
	long long lens[40];
	char namebuf[40][16];
	for (int i = 0; i < 40; i++) {
		snprintf(namebuf[i], sizeof namebuf[i], i == 1 ? "q %d=x" : "q%d", i);
		names[i] = namebuf[i];
		lens[i] = (long long)i * 1000;
	}
	names[2] = "";

	report_ready(&w.rep, 4);
	report_start(&w.rep, 2, 1234567.891, "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f", "spark.sleep");
	report_finish(&w.rep, 2, "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f", "requeued", 17, 9000);
	report_progress(&w.rep, 18, 9100);
	report_recycle(&w.rep, "max-tasks");
	report_draining(&w.rep);
	report_problem(&w.rep, "result backend unix:///tmp/r.sock?db=1 unreachable: No such file (100%)");
	report_problem(&w.rep, NULL);
	report_problem(&w.rep, "");
	report_queues(&w.rep, 40, names, lens);
	report_queues(&w.rep, 0, NULL, NULL);
	/* nothing goes before the flush */
	wire_drain(&w);
	assert_int_equal(w.ndg, 0);

	struct report r[16];
	static char scr[16 * 4096];
	assert_int_equal(wire_reports(&w, r, 16, scr, sizeof scr), 11);
	assert_int_equal(r[0].kind, REPORT_READY);
	assert_int_equal(r[0].slots, 4);
	assert_int_equal(r[1].kind, REPORT_START);
	assert_int_equal(r[1].slot, 2);
	assert_true(r[1].hard_limit == 1234567.891);
	assert_string_equal(r[1].task_id, "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f");
	assert_string_equal(r[1].task_name, "spark.sleep");
	assert_int_equal(r[2].kind, REPORT_FINISH);
	assert_int_equal(r[2].slot, 2);
	assert_string_equal(r[2].task_id, "5f0c2a1e-1b2c-4d5e-8f90-0a1b2c3d4e5f");
	assert_string_equal(r[2].outcome, "requeued");
	assert_int_equal(r[2].processed, 17);
	assert_int_equal(r[2].rss_kib, 9000);
	assert_int_equal(r[3].kind, REPORT_PROGRESS);
	assert_int_equal(r[3].processed, 18);
	assert_int_equal(r[3].rss_kib, 9100);
	assert_int_equal(r[4].kind, REPORT_RECYCLE);
	assert_string_equal(r[4].reason, "max-tasks");
	assert_int_equal(r[5].kind, REPORT_DRAINING);
	assert_int_equal(r[6].kind, REPORT_PROBLEM);
	assert_string_equal(r[6].text, "result backend unix:///tmp/r.sock?db=1 unreachable: No such file (100%)");
	assert_int_equal(r[7].kind, REPORT_PROBLEM);
	assert_string_equal(r[7].text, "");
	assert_string_equal(r[8].text, "");
	assert_int_equal(r[9].kind, REPORT_QUEUES);
	assert_int_equal(r[9].nqueues, REPORT_MAX_QUEUES);
	for (int i = 0; i < REPORT_MAX_QUEUES; i++) {
		assert_string_equal(r[9].queue[i], names[i]);
		assert_int_equal(r[9].queue_len[i], lens[i]);
	}
	assert_int_equal(r[10].kind, REPORT_QUEUES);
	assert_int_equal(r[10].nqueues, 0);
	wire_close(&w);
}

/* Ids and names of 0, 1, 500 and 10000 bytes, of every NUL-free byte, travel whole. */
static void
test_ids_any_length(void **state)
{
	(void)state;
	static const size_t lens[] = {0, 1, 2, 3, 500, 10000};
	static char scr[2 * (SPARK_REPORT_MAX + 1)];
	for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
		for (int v = 0; v <= 5; v++) {
			char *id = make_id(lens[li], v);
			char *name = make_id(lens[li] / 10 + 1, (v + 1) % 6);
			struct wire w;
			wire_open(&w);
			report_start(&w.rep, 0, 0, id, name);
			report_finish(&w.rep, 0, id, "success", 1, 1);
			struct report r[2];
			assert_int_equal(wire_reports(&w, r, 2, scr, sizeof scr), 2);
			assert_int_equal(r[0].kind, REPORT_START);
			assert_int_equal(strlen(r[0].task_id), lens[li]);
			assert_memory_equal(r[0].task_id, id, lens[li] + 1);
			assert_string_equal(r[0].task_name, name);
			assert_int_equal(r[1].kind, REPORT_FINISH);
			assert_memory_equal(r[1].task_id, id, lens[li] + 1);
			assert_string_equal(r[1].outcome, "success");
			/* on the wire every report is one line of words: no other byte below 0x21, no 0x7f */
			int newlines = 0;
			for (size_t i = 0; i < w.dglen[0]; i++) {
				unsigned char c = (unsigned char)w.dg[0][i];
				newlines += c == '\n';
				assert_true(c == ' ' || c == '\n' || (c >= 0x21 && c != 0x7f));
			}
			assert_int_equal(newlines, 1);
			wire_close(&w);
			free(id);
			free(name);
		}
	}
}

/* Datagrams: each at most SPARK_REPORT_MAX, split between reports only, as few as the order allows. */
static void
test_flush_splitting(void **state)
{
	(void)state;
	struct wire w;
	wire_open(&w);
	/* 10000 bytes with spaces escape to ~20 KB: a few per datagram */
	char *id = make_id(10000, 1);
	int nlines = 0;
	for (int i = 0; i < 12; i++) {
		id[0] = (char)('A' + i);
		report_start(&w.rep, i, 1, id, "spark.sleep");
		nlines++;
		/* the reports before one that would not fit went out: read them now, so the socket never fills */
		wire_drain(&w);
		for (int k = 0; k < 30; k++) {
			report_ready(&w.rep, k);
			nlines++;
			wire_drain(&w);
		}
	}
	report_flush(&w.rep);
	report_flush(&w.rep); /* nothing left: nothing sent */
	wire_drain(&w);
	assert_true(w.ndg >= 2);

	int seen = 0, starts = 0;
	static char scr[SPARK_REPORT_MAX + 1];
	for (int d = 0; d < w.ndg; d++) {
		assert_true(w.dglen[d] <= SPARK_REPORT_MAX);
		assert_true(w.dglen[d] > 0);
		assert_true(w.dg[d][0] != '\n' && w.dg[d][w.dglen[d] - 1] != '\n');
		const char *p = w.dg[d], *end = p + w.dglen[d];
		while (p < end) {
			const char *nl = memchr(p, '\n', (size_t)(end - p));
			size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
			struct report r;
			assert_int_equal(report_parse(p, len, &r, scr, sizeof scr), 0);
			if (r.kind == REPORT_START) {
				/* in order, whole */
				assert_int_equal(r.slot, starts);
				assert_int_equal(strlen(r.task_id), 10000);
				assert_int_equal(r.task_id[0], 'A' + starts);
				assert_memory_equal(r.task_id + 1, id + 1, 9999);
				starts++;
			} else {
				assert_int_equal(r.kind, REPORT_READY);
			}
			seen++;
			p += len + 1;
		}
		/* as few as possible: the next datagram's first report would not have fitted in this one */
		if (d + 1 < w.ndg) {
			const char *nl = memchr(w.dg[d + 1], '\n', w.dglen[d + 1]);
			size_t first = nl ? (size_t)(nl - w.dg[d + 1]) : w.dglen[d + 1];
			assert_true(w.dglen[d] + 1 + first > SPARK_REPORT_MAX);
		}
	}
	assert_int_equal(seen, nlines);
	assert_int_equal(starts, 12);
	free(id);
	wire_close(&w);
}

/* A report that alone would not fit a datagram is dropped, never cut (the worker refuses such ids first). */
static void
test_oversized_dropped(void **state)
{
	(void)state;
	struct wire w;
	wire_open(&w);
	/* spaces escape to three bytes each */
	char *id = malloc(SPARK_REPORT_MAX / 3 + 10);
	memset(id, ' ', SPARK_REPORT_MAX / 3 + 9);
	id[SPARK_REPORT_MAX / 3 + 9] = '\0';
	report_ready(&w.rep, 1);
	report_start(&w.rep, 0, 0, id, "n");
	report_draining(&w.rep);
	struct report r[2];
	static char scr[2 * 64];
	assert_int_equal(wire_reports(&w, r, 2, scr, sizeof scr), 2);
	assert_int_equal(r[0].kind, REPORT_READY);
	assert_int_equal(r[1].kind, REPORT_DRAINING);
	free(id);
	wire_close(&w);
}

/* Not a SOCK_SEQPACKET socket (spark-worker run by hand): reports are dropped, nothing is buffered. */
static void
test_not_usable(void **state)
{
	(void)state;
	int p[2];
	assert_int_equal(pipe(p), 0);
	int fds[] = {p[1], -1};
	for (size_t i = 0; i < 2; i++) {
		struct reporter r;
		reporter_init(&r, fds[i]);
		assert_int_equal(r.out.usable, -1);
		report_ready(&r, 1);
		report_start(&r, 0, 0, "id", "name");
		assert_int_equal(r.out.usable, 0);
		assert_int_equal(r.out.len, 0);
		report_flush(&r);
		reporter_free(&r);
	}
	fcntl(p[0], F_SETFL, O_NONBLOCK);
	char c;
	assert_int_equal(read(p[0], &c, 1), -1);
	close(p[0]);
	close(p[1]);
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
	parse_bad("ready 4294967296");
	parse_bad("start");
	parse_bad("start 1");
	parse_bad("start 1 300 id");
	parse_bad("start x 300 id name");
	parse_bad("start 1 soon id name");
	parse_bad("finish 1 id success");
	parse_bad("finish 1 id success ten 5");
	parse_bad("finish 1 id success 1 lots");
	parse_bad("progress");
	parse_bad("progress 1");
	parse_bad("progress 1 x");
	parse_bad("recycle");
	/* escapes no builder writes */
	parse_bad("start 0 1 % name");
	parse_bad("start 0 1 %4 name");
	parse_bad("start 0 1 ab%4 name");
	parse_bad("start 0 1 %zz name");
	parse_bad("start 0 1 %00 name");
	parse_bad("start 0 1 id na%G1me");
	parse_bad("problem 100%");
	parse_bad("recycle %");
	parse_bad("queues celery");
	parse_bad("queues =3");
	parse_bad("queues celery=");
	parse_bad("queues celery=x");
	parse_bad("queues celery=-1");
	parse_bad("queues ok=1 q%2=3");

	/* long fields are no longer refused */
	char buf[2048], scr[2048];
	char id[1000];
	memset(id, 'i', sizeof id - 1);
	id[sizeof id - 1] = '\0';
	snprintf(buf, sizeof buf, "start 0 1 %s %s", id, id);
	struct report r = parse_ok(buf, scr);
	assert_int_equal(strlen(r.task_id), sizeof id - 1);
	assert_int_equal(strlen(r.task_name), sizeof id - 1);

	/* len + 1 bytes of scratch always suffice; less may not */
	const char *line = "start 0 1 abc def";
	char small[32];
	size_t n = strlen(line);
	assert_int_equal(report_parse(line, n, &r, small, n + 1), 0);
	assert_string_equal(r.task_name, "def");
	assert_int_equal(report_parse(line, n, &r, small, 4), -1);
}

static void
test_not_nul_terminated(void **state)
{
	(void)state;
	/* the line's length is authoritative: bytes after it are not read */
	const char dg[] = "ready 2GARBAGE";
	char scratch[64];
	struct report r;
	assert_int_equal(report_parse(dg, 7, &r, scratch, sizeof scratch), 0);
	assert_int_equal(r.slots, 2);
	const char fin[] = "finish 0 id success 3 42 trailing";
	assert_int_equal(report_parse(fin, 24, &r, scratch, sizeof scratch), 0);
	assert_int_equal(r.rss_kib, 42);
	const char st[] = "start 0 1 ab%41 nameXX";
	assert_int_equal(report_parse(st, 20, &r, scratch, sizeof scratch), 0);
	assert_string_equal(r.task_id, "abA");
	assert_string_equal(r.task_name, "name");
	assert_int_equal(report_parse("start 0 1 n ab%41", 17, &r, scratch, sizeof scratch), 0);
	assert_int_equal(report_parse("start 0 1 n ab%41", 16, &r, scratch, sizeof scratch), -1); /* "ab%4" */
	assert_int_equal(report_parse("ready 12", 6, &r, scratch, sizeof scratch), -1);           /* "ready " */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_escape),
	    cmocka_unit_test(test_kinds),
	    cmocka_unit_test(test_builders_round_trip),
	    cmocka_unit_test(test_ids_any_length),
	    cmocka_unit_test(test_flush_splitting),
	    cmocka_unit_test(test_oversized_dropped),
	    cmocka_unit_test(test_not_usable),
	    cmocka_unit_test(test_malformed),
	    cmocka_unit_test(test_not_nul_terminated),
	};
	return cmocka_run_group_tests_name("report", tests, NULL, NULL);
}

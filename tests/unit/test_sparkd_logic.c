/* sparkd's pure logic: exit classification, restart backoff, worker names, the log ring, line levels, filters,
 * peer rules and the sd_notify address (DESIGN §4, §7, §8). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "sparkd.h"

/* wait(2) statuses built the way the kernel encodes them */
#define EXITED(code)  (((code)&0xff) << 8)
#define SIGNALED(sig) ((sig)&0x7f)

static void
test_exit_classify(void **state)
{
	(void)state;
	struct sd_exit ex;
	sup_exit_classify(SIGNALED(SIGKILL), NULL, &ex);
	assert_true(ex.set);
	assert_string_equal(ex.reason, "crashed (signal 9)");
	assert_int_equal(ex.signal, 9);
	assert_int_equal(ex.status, -1);

	sup_exit_classify(EXITED(3), "", &ex);
	assert_string_equal(ex.reason, "exited (status 3)");
	assert_int_equal(ex.status, 3);
	assert_int_equal(ex.signal, 0);

	sup_exit_classify(EXITED(0), NULL, &ex);
	assert_string_equal(ex.reason, "exited (status 0)");

	/* a recycle keeps its reason whatever the status */
	sup_exit_classify(EXITED(0), "max-tasks", &ex);
	assert_string_equal(ex.reason, "max-tasks");
	sup_exit_classify(SIGNALED(SIGKILL), "time-limit", &ex);
	assert_string_equal(ex.reason, "time-limit");
	assert_int_equal(ex.signal, 9);
	sup_exit_classify(SIGNALED(SIGSEGV), NULL, &ex);
	assert_string_equal(ex.reason, "crashed (signal 11)");
}

static void
test_backoff(void **state)
{
	(void)state;
	double delay = SD_BACKOFF_MIN;
	double want[] = {0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30, 30};
	/* consecutive early failures: not ready, or ready for less than startsecs */
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
		assert_float_equal(sup_restart_delay(&delay, i % 2 == 0, 4.9, 5), want[i], 1e-9);
	/* ready and up for startsecs: replaced at once, and the next early failure starts again at 100 ms */
	assert_float_equal(sup_restart_delay(&delay, true, 5, 5), 0, 1e-9);
	assert_float_equal(sup_restart_delay(&delay, false, 0, 5), 0.1, 1e-9);
	assert_float_equal(sup_restart_delay(&delay, true, 1, 5), 0.2, 1e-9);
	/* however long it ran, a process that never became ready is an early failure */
	assert_float_equal(sup_restart_delay(&delay, false, 3600, 5), 0.4, 1e-9);
	/* never below the minimum, never a permanent failure */
	delay = 0;
	assert_float_equal(sup_restart_delay(&delay, false, 0, 5), 0.1, 1e-9);
	for (int i = 0; i < 1000; i++)
		assert_true(sup_restart_delay(&delay, false, 0, 5) <= SD_BACKOFF_MAX);
}

static void
test_worker_names(void **state)
{
	(void)state;
	char buf[128];
	sup_worker_name(buf, sizeof buf, 1, 1, "host");
	assert_string_equal(buf, "celery@host");
	sup_worker_name(buf, sizeof buf, 1, 3, "host");
	assert_string_equal(buf, "celery-1@host");
	sup_worker_name(buf, sizeof buf, 3, 3, "h.example");
	assert_string_equal(buf, "celery-3@h.example");
	assert_string_equal(sup_state_name(PS_BACKOFF), "backoff");
	assert_string_equal(sup_state_name(PS_STOPPED), "stopped");
	assert_string_equal(sup_state_name(PS_ACTIVE), "active");
}

static void
test_ring(void **state)
{
	(void)state;
	struct logcap lc;
	memset(&lc, 0, sizeof lc);
	logcap_ring_init(&lc, 4);
	assert_null(logcap_ring_get(&lc, 0));
	char msg[32];
	for (int i = 0; i < 10; i++) {
		snprintf(msg, sizeof msg, "line %d", i);
		logcap_ring_push(&lc, i, SPARK_LOG_INFO, "w", 100 + i, msg, strlen(msg));
		assert_int_equal(lc.count, i + 1 < 4 ? (size_t)i + 1 : 4);
	}
	/* oldest first, the newest four kept */
	for (size_t i = 0; i < 4; i++) {
		const struct lc_line *l = logcap_ring_get(&lc, i);
		snprintf(msg, sizeof msg, "line %zu", i + 6);
		assert_string_equal(l->msg, msg);
		assert_int_equal(l->pid, 106 + (int)i);
	}
	assert_null(logcap_ring_get(&lc, 4));
	assert_int_equal(lc.bytes, 4 * strlen("line 9"));
	logcap_ring_free(&lc);
	assert_null(lc.ring);
}

static void
test_ring_byte_cap(void **state)
{
	(void)state;
	struct logcap lc;
	memset(&lc, 0, sizeof lc);
	logcap_ring_init(&lc, 100000);
	char *big = malloc(LC_LINE_MAX);
	memset(big, 'x', LC_LINE_MAX);
	size_t n = LC_RING_MAX_BYTES / LC_LINE_MAX + 50;
	for (size_t i = 0; i < n; i++)
		logcap_ring_push(&lc, (double)i, SPARK_LOG_INFO, "w", 1, big, LC_LINE_MAX);
	assert_true(lc.bytes <= LC_RING_MAX_BYTES);
	assert_true(lc.count < n);
	assert_float_equal(logcap_ring_get(&lc, lc.count - 1)->ts, (double)(n - 1), 0);
	free(big);
	logcap_ring_free(&lc);
}

static void
test_parse_level(void **state)
{
	(void)state;
	size_t off;
	const char *l1 = "[2026-11-26 19:14:27,123: WARNING/ForkPoolWorker-1] disk almost full";
	assert_int_equal(logcap_parse_level(l1, strlen(l1), false, &off), SPARK_LOG_WARNING);
	assert_string_equal(l1 + off, "disk almost full");
	const char *l2 = "<3>[2026-11-26 19:14:27,123: ERROR/celery@h] boom";
	assert_int_equal(logcap_parse_level(l2, strlen(l2), false, &off), SPARK_LOG_ERROR);
	assert_string_equal(l2 + off, "boom");
	const char *l3 = "Traceback (most recent call last):";
	assert_int_equal(logcap_parse_level(l3, strlen(l3), true, &off), SPARK_LOG_ERROR);
	assert_int_equal(off, 0);
	assert_int_equal(logcap_parse_level(l3, strlen(l3), false, &off), SPARK_LOG_INFO);
	const char *l4 = "[not a prefix] text";
	assert_int_equal(logcap_parse_level(l4, strlen(l4), false, &off), SPARK_LOG_INFO);
	assert_int_equal(off, 0);
}

static void
test_worker_match(void **state)
{
	(void)state;
	assert_true(logcap_worker_match(NULL, "celery-1@h"));
	assert_true(logcap_worker_match("", "celery-1@h"));
	assert_true(logcap_worker_match("celery-1@h", "celery-1@h"));
	assert_true(logcap_worker_match("celery-1", "celery-1@h"));
	assert_false(logcap_worker_match("celery-1", "celery-10@h"));
	assert_false(logcap_worker_match("celery-1@x", "celery-1@h"));
	assert_false(logcap_worker_match("celery", "celery-1@h"));
	assert_true(logcap_worker_match("celery", "celery@h"));
	assert_true(logcap_worker_match("sparkd", "sparkd"));
	assert_false(logcap_worker_match("sparkd", "celery@h"));
}

static void
test_peer_rules(void **state)
{
	(void)state;
	assert_true(ctl_peer_allowed(0, 0, 0, 1000, 1000));
	assert_true(ctl_peer_allowed(1000, 50, 0, 1000, 1000));
	assert_true(ctl_peer_allowed(2000, 1000, 0, 1000, 1000)); /* the socket's group */
	assert_false(ctl_peer_allowed(2000, 2000, 0, 1000, 1000));
	assert_true(ctl_may_stop(0, 1000));
	assert_true(ctl_may_stop(1000, 1000));
	assert_false(ctl_may_stop(2000, 1000));
}

static void
test_notify_addr(void **state)
{
	(void)state;
	struct sockaddr_un sun;
	unsigned len;
	assert_int_equal(sys_notify_addr("/run/systemd/notify", &sun, sizeof sun, &len), 0);
	assert_string_equal(sun.sun_path, "/run/systemd/notify");
	assert_int_equal(len, offsetof(struct sockaddr_un, sun_path) + strlen("/run/systemd/notify"));
	assert_int_equal(sys_notify_addr("@abstract-name", &sun, sizeof sun, &len), 0);
	assert_int_equal(sun.sun_path[0], '\0');
	assert_memory_equal(sun.sun_path + 1, "abstract-name", 13);
	assert_int_equal(len, offsetof(struct sockaddr_un, sun_path) + 14);
	assert_int_equal(sys_notify_addr("relative", &sun, sizeof sun, &len), -1);
	assert_int_equal(sys_notify_addr("@", &sun, sizeof sun, &len), -1);
	char longp[200];
	memset(longp, 'a', sizeof longp - 1);
	longp[0] = '/';
	longp[sizeof longp - 1] = '\0';
	assert_int_equal(sys_notify_addr(longp, &sun, sizeof sun, &len), -1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_exit_classify), cmocka_unit_test(test_backoff),
	    cmocka_unit_test(test_worker_names),  cmocka_unit_test(test_ring),
	    cmocka_unit_test(test_ring_byte_cap), cmocka_unit_test(test_parse_level),
	    cmocka_unit_test(test_worker_match),  cmocka_unit_test(test_peer_rules),
	    cmocka_unit_test(test_notify_addr),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* sparkctl's pure helpers: the token parser (values, usage errors) and the output formatters (DESIGN §3). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../sparkctl/sparkctl.h"

static const enum ctl_optid logs_opts[] = {OPT_FOLLOW, OPT_LEVEL,  OPT_LINES, OPT_WORKER,
                                           OPT_JSON,   OPT_SOCKET, OPT_HELP};
static const enum ctl_optid start_opts[] = {OPT_WORKERS, OPT_CONCURRENCY, OPT_POOL, OPT_FOREGROUND, OPT_HELP};
static const enum ctl_optid stop_opts[] = {OPT_FORCE, OPT_TIMEOUT, OPT_HELP};

#define N(a) (sizeof(a) / sizeof((a)[0]))

static int
parse(const enum ctl_optid *allowed, size_t n, struct ctl_args *a, char *err, size_t errlen, int argc, ...)
{
	char *argv[16];
	va_list ap;
	va_start(ap, argc);
	for (int i = 0; i < argc; i++)
		argv[i] = va_arg(ap, char *);
	va_end(ap);
	memset(a, 0, sizeof *a);
	err[0] = '\0';
	return ctl_args_parse(a, allowed, n, argc, argv, err, errlen);
}

static void
test_parse_forms(void **state)
{
	(void)state;
	struct ctl_args a;
	char err[512];
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 6, "-f", "--lines", "7", "--level=WARN",
	                       "--worker", "celery-1@h"),
	                 0);
	assert_true(a.set[OPT_FOLLOW]);
	assert_int_equal((int)a.num[OPT_LINES], 7);
	assert_true(a.set[OPT_LEVEL]);
	assert_string_equal(a.str[OPT_WORKER], "celery-1@h");
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 2, "-n5", "--json"), 0);
	assert_int_equal((int)a.num[OPT_LINES], 5);
	assert_true(a.set[OPT_JSON]);
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 2, "-n", "0"), 0);
	assert_int_equal((int)a.num[OPT_LINES], 0);
}

static void
test_parse_errors(void **state)
{
	(void)state;
	struct ctl_args a;
	char err[512];
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 2, "--lines", "abc"), -1);
	assert_non_null(strstr(err, "--lines"));
	assert_non_null(strstr(err, "abc"));
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 2, "-n", "-3"), -1);
	assert_non_null(strstr(err, "-3"));
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 1, "--lines"), -1);
	assert_non_null(strstr(err, "needs a value"));
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 2, "--level", "loud"), -1);
	assert_non_null(strstr(err, "loud"));
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 1, "--force"), -1);
	assert_non_null(strstr(err, "unknown option '--force'"));
	assert_non_null(strstr(err, "--follow"));
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 1, "extra"), -1);
	assert_non_null(strstr(err, "unexpected argument 'extra'"));
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 1, "-fx"), -1);
	assert_int_equal(parse(stop_opts, N(stop_opts), &a, err, sizeof err, 2, "--timeout", "0"), -1);
	assert_int_equal(parse(stop_opts, N(stop_opts), &a, err, sizeof err, 1, "--force=yes"), -1);
	assert_int_equal(parse(stop_opts, N(stop_opts), &a, err, sizeof err, 2, "--timeout", "2.5"), 0);
	assert_true(a.num[OPT_TIMEOUT] > 2.4 && a.num[OPT_TIMEOUT] < 2.6);
	/* an option-looking token is not taken as a value */
	assert_int_equal(parse(logs_opts, N(logs_opts), &a, err, sizeof err, 2, "--worker", "--json"), -1);
}

static void
test_parse_start_values_are_raw(void **state)
{
	(void)state;
	struct ctl_args a;
	char err[512];
	/* start's values go to config_load as typed: "-3" is a value (refused there, exit 1), not an option */
	assert_int_equal(
	    parse(start_opts, N(start_opts), &a, err, sizeof err, 4, "--workers", "-3", "--pool", "gevent"), 0);
	assert_string_equal(a.str[OPT_WORKERS], "-3");
	assert_string_equal(a.str[OPT_POOL], "gevent");
	/* --help wins over whatever follows */
	assert_int_equal(parse(start_opts, N(start_opts), &a, err, sizeof err, 2, "--help", "--bogus"), 0);
	assert_true(a.set[OPT_HELP]);
}

static void
test_rss_and_state(void **state)
{
	(void)state;
	char b[64];
	out_fmt_rss(b, sizeof b, 3277);
	assert_string_equal(b, "3.2 MiB");
	out_fmt_rss(b, sizeof b, 900);
	assert_string_equal(b, "900 KiB");
	out_fmt_rss(b, sizeof b, 3 * 1024 * 1024);
	assert_string_equal(b, "3.0 GiB");
	out_fmt_rss(b, sizeof b, -1);
	assert_string_equal(b, "-");
	out_capitalise(b, sizeof b, "backoff");
	assert_string_equal(b, "Backoff");
	out_capitalise(b, sizeof b, NULL);
	assert_string_equal(b, "-");
}

static void
test_timestamp(void **state)
{
	(void)state;
	char b[64];
	setenv("TZ", "UTC", 1);
	out_fmt_ts(b, sizeof b, 1795721067.9996);
	assert_string_equal(b, "2026-11-26T19:24:28.000");
	out_fmt_ts(b, sizeof b, 1795721067.123);
	assert_string_equal(b, "2026-11-26T19:24:27.123");
	out_fmt_ts(b, sizeof b, -5);
	assert_string_equal(b, "-");
}

/* Pack a map {k: v...} into an unpacked object for the helpers that read the daemon's replies. */
static void
exit_obj(msgpack_sbuffer *sb, msgpack_unpacked *u, const char *reason, int64_t status, int64_t sig)
{
	msgpack_packer pk;
	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 3);
	proto_pack_kv_str(&pk, "reason", reason);
	if (status < 0) {
		proto_pack_key(&pk, "status");
		msgpack_pack_nil(&pk);
	} else {
		proto_pack_kv_int(&pk, "status", status);
	}
	proto_pack_kv_int(&pk, "signal", sig);
	msgpack_unpacked_init(u);
	assert_int_equal(msgpack_unpack_next(u, sb->data, sb->size, NULL), MSGPACK_UNPACK_SUCCESS);
}

static void
test_exit_reason(void **state)
{
	(void)state;
	struct {
		const char *reason;
		int64_t status, sig;
		const char *want;
	} cases[] = {
	    /* sparkd's reason carries the detail: it is shown as is, status and signal are not re-read */
	    {"max-tasks", 0, 0, "max-tasks"},
	    {"crashed (signal 11)", -1, 11, "crashed (signal 11)"},
	    {"exited (status 3)", 3, 0, "exited (status 3)"},
	    {"max-memory", -1, 15, "max-memory"},
	    {NULL, -1, 6, "-"},
	    {"", 1, 0, "-"},
	};
	for (size_t i = 0; i < N(cases); i++) {
		msgpack_sbuffer sb;
		msgpack_unpacked u;
		char b[128];
		exit_obj(&sb, &u, cases[i].reason, cases[i].status, cases[i].sig);
		out_fmt_exit(b, sizeof b, &u.data);
		assert_string_equal(b, cases[i].want);
		msgpack_unpacked_destroy(&u);
		msgpack_sbuffer_destroy(&sb);
	}
	char b[16];
	out_fmt_exit(b, sizeof b, NULL);
	assert_string_equal(b, "-");
}

static void
test_json_conversion(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 5);
	proto_pack_kv_str(&pk, "name", "celery@h");
	proto_pack_kv_double(&pk, "uptime_s", 1.5);
	proto_pack_key(&pk, "bad");
	msgpack_pack_str(&pk, 3);
	msgpack_pack_str_body(&pk,
	                      "a\xff"
	                      "b",
	                      3);
	proto_pack_key(&pk, "list");
	msgpack_pack_array(&pk, 2);
	msgpack_pack_nil(&pk);
	msgpack_pack_true(&pk);
	msgpack_pack_int(&pk, 7); /* a non-string key */
	msgpack_pack_uint64(&pk, UINT64_MAX);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	assert_int_equal(msgpack_unpack_next(&u, sb.data, sb.size, NULL), MSGPACK_UNPACK_SUCCESS);
	json_t *j = out_msgpack_to_json(&u.data);
	assert_non_null(j);
	char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	assert_non_null(s);
	assert_string_equal(s,
	                    "{\"7\":1.8446744073709552e19,\"bad\":\"a?b\",\"list\":[null,true],\"name\":\"celery@h\","
	                    "\"uptime_s\":1.5}");
	free(s);
	json_decref(j);
	msgpack_unpacked_destroy(&u);
	msgpack_sbuffer_destroy(&sb);
}

static void
test_sanitize(void **state)
{
	(void)state;
	char s[] = "ok\x1b[31mred\ttab\x7f";
	out_sanitize(s);
	assert_string_equal(s, "ok?[31mred\ttab?");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_parse_forms),
	    cmocka_unit_test(test_parse_errors),
	    cmocka_unit_test(test_parse_start_values_are_raw),
	    cmocka_unit_test(test_rss_and_state),
	    cmocka_unit_test(test_timestamp),
	    cmocka_unit_test(test_exit_reason),
	    cmocka_unit_test(test_json_conversion),
	    cmocka_unit_test(test_sanitize),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The env-file parser: KEY=value, KEY = value (the guide's style), quotes, comments, export, bad lines. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

struct kv {
	int n;
	char key[32][64];
	char val[32][256];
};

static void
collect(const char *key, const char *value, void *arg)
{
	struct kv *kv = arg;
	assert_true(kv->n < 32);
	snprintf(kv->key[kv->n], sizeof kv->key[0], "%s", key);
	snprintf(kv->val[kv->n], sizeof kv->val[0], "%s", value);
	kv->n++;
}

static void
collect_count(const char *key, const char *value, void *arg)
{
	int *n = arg;
	char want[64];
	snprintf(want, sizeof want, "value number %d", *n);
	assert_string_equal(value, want);
	assert_int_equal(strncmp(key, "VAR_", 4), 0);
	(*n)++;
}

static const char *
get(const struct kv *kv, const char *key)
{
	const char *v = NULL;
	for (int i = 0; i < kv->n; i++)
		if (strcmp(kv->key[i], key) == 0)
			v = kv->val[i];
	return v;
}

static int
parse(const char *text, struct kv *kv, char *err)
{
	memset(kv, 0, sizeof *kv);
	err[0] = '\0';
	return envfile_parse_buf("test.env", text, collect, kv, err, 256);
}

static void
test_forms(void **state)
{
	(void)state;
	struct kv kv;
	char err[256];
	const char *text = "# Spark workers\n"
	                   "\n"
	                   "PLAIN=value\n"
	                   "CELERY_WORKER_CONCURRENCY = 1\n"
	                   "   INDENTED   =   spaced out   \n"
	                   "export EXPORTED=yes\n"
	                   "export\tTABBED=1\n"
	                   "SINGLE='it is # not a comment'\n"
	                   "DOUBLE=\"a \\\"quoted\\\" word\\nnext\"\n"
	                   "INLINE=value # a comment\n"
	                   "HASH=a#b\n"
	                   "EMPTY=\n"
	                   "EMPTYQ=\"\"\n"
	                   "URL=redis://:p@ss@host:6379/0?db=1\n"
	                   "EQ=a=b=c\n"
	                   "exported_name=lower\n"
	                   "  # indented comment\n"
	                   "LAST=no newline";
	if (parse(text, &kv, err) != 0)
		fail_msg("refused: %s", err);
	assert_string_equal(get(&kv, "PLAIN"), "value");
	assert_string_equal(get(&kv, "CELERY_WORKER_CONCURRENCY"), "1");
	assert_string_equal(get(&kv, "INDENTED"), "spaced out");
	assert_string_equal(get(&kv, "EXPORTED"), "yes");
	assert_string_equal(get(&kv, "TABBED"), "1");
	assert_string_equal(get(&kv, "SINGLE"), "it is # not a comment");
	assert_string_equal(get(&kv, "DOUBLE"), "a \"quoted\" word\nnext");
	assert_string_equal(get(&kv, "INLINE"), "value");
	assert_string_equal(get(&kv, "HASH"), "a#b");
	assert_string_equal(get(&kv, "EMPTY"), "");
	assert_string_equal(get(&kv, "EMPTYQ"), "");
	assert_string_equal(get(&kv, "URL"), "redis://:p@ss@host:6379/0?db=1");
	assert_string_equal(get(&kv, "EQ"), "a=b=c");
	assert_string_equal(get(&kv, "exported_name"), "lower");
	assert_string_equal(get(&kv, "LAST"), "no newline");
	assert_null(get(&kv, "export"));
}

static void
test_quotes(void **state)
{
	(void)state;
	struct kv kv;
	char err[256];
	assert_int_equal(parse("A='# kept'\nB=\"# kept too\"  # dropped\nC='back\\slash'\n", &kv, err), 0);
	assert_string_equal(get(&kv, "A"), "# kept");
	assert_string_equal(get(&kv, "B"), "# kept too");
	assert_string_equal(get(&kv, "C"), "back\\slash"); /* no escapes inside single quotes */
	assert_int_equal(parse("KEY = \"  padded  \"\n", &kv, err), 0);
	assert_string_equal(get(&kv, "KEY"), "  padded  ");
}

static void
test_later_wins_and_crlf(void **state)
{
	(void)state;
	struct kv kv;
	char err[256];
	assert_int_equal(parse("K=1\r\nK=2\r\nQ=\"x\"\r\n", &kv, err), 0);
	assert_int_equal(kv.n, 3);
	assert_string_equal(get(&kv, "K"), "2");
	assert_string_equal(get(&kv, "Q"), "x");
}

static void
expect_bad(const char *text, const char *where, const char *why)
{
	struct kv kv;
	char err[256];
	assert_int_equal(parse(text, &kv, err), -1);
	if (strstr(err, where) == NULL || strstr(err, why) == NULL)
		fail_msg("error '%s' should name '%s' and say '%s'", err, where, why);
}

static void
test_bad_lines(void **state)
{
	(void)state;
	expect_bad("A=1\nthis is not an assignment\n", "test.env:2", "KEY=value");
	expect_bad("=value\n", "test.env:1", "name");
	expect_bad("A=1\n\n\nBAD-NAME=1\n", "test.env:4", "BAD-NAME");
	expect_bad("MY KEY=1\n", "test.env:1", "name");
	expect_bad("Q=\"unterminated\n", "test.env:1", "quote");
	expect_bad("Q='open\n", "test.env:1", "quote");
	expect_bad("Q=\"done\" trailing\n", "test.env:1", "Q");
	expect_bad("export\n", "test.env:1", "KEY=value");
}

static void
test_files(void **state)
{
	(void)state;
	char dir[] = "/tmp/spark-test-envfile-XXXXXX";
	assert_non_null(mkdtemp(dir));
	char path[300];
	snprintf(path, sizeof path, "%s/x.env", dir);
	struct kv kv;
	char err[512];

	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs("CELERY_BROKER_URL = redis://localhost:6379/0\nexport SPARK_WORKERS=2\n", f);
	fclose(f);
	memset(&kv, 0, sizeof kv);
	assert_int_equal(envfile_parse(path, collect, &kv, err, sizeof err), 0);
	assert_string_equal(get(&kv, "SPARK_WORKERS"), "2");
	assert_string_equal(get(&kv, "CELERY_BROKER_URL"), "redis://localhost:6379/0");

	/* errors carry the file's own name */
	f = fopen(path, "w");
	fputs("OK=1\nnope\n", f);
	fclose(f);
	memset(&kv, 0, sizeof kv);
	assert_int_equal(envfile_parse(path, collect, &kv, err, sizeof err), -1);
	char want[320];
	snprintf(want, sizeof want, "%s:2", path);
	assert_non_null(strstr(err, want));

	/* NUL bytes: refused, not silently truncated */
	f = fopen(path, "w");
	fwrite("A=1\0B=2\n", 1, 8, f);
	fclose(f);
	assert_int_equal(envfile_parse(path, collect, &kv, err, sizeof err), -1);
	assert_non_null(strstr(err, path));

	/* missing file and a directory */
	char missing[320];
	snprintf(missing, sizeof missing, "%s/missing.env", dir);
	assert_int_equal(envfile_parse(missing, collect, &kv, err, sizeof err), -1);
	assert_non_null(strstr(err, missing));
	assert_int_equal(envfile_parse(dir, collect, &kv, err, sizeof err), -1);
	assert_non_null(strstr(err, dir));

	/* a long file parses whole (the reader grows its buffer) */
	f = fopen(path, "w");
	for (int i = 0; i < 5000; i++)
		fprintf(f, "VAR_%d = value number %d\n", i % 20, i);
	fclose(f);
	int count = 0;
	assert_int_equal(envfile_parse(path, collect_count, &count, err, sizeof err), 0);
	assert_int_equal(count, 5000);

	unlink(path);
	rmdir(dir);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_forms),     cmocka_unit_test(test_quotes), cmocka_unit_test(test_later_wins_and_crlf),
	    cmocka_unit_test(test_bad_lines), cmocka_unit_test(test_files),
	};
	return cmocka_run_group_tests_name("envfile", tests, NULL, NULL);
}

/* Which runtime directories are safe (common/rundir.c): the rules behind sparkd's refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rundir.h"

static struct stat
dir(unsigned uid, unsigned mode)
{
	struct stat st;
	memset(&st, 0, sizeof st);
	st.st_mode = S_IFDIR | mode;
	st.st_uid = uid;
	return st;
}

static void
test_unsafe_rules(void **state)
{
	(void)state;
	struct stat st = dir(1000, 0700);
	assert_null(rundir_unsafe(&st, 1000, true));
	st = dir(1000, 0750);
	assert_null(rundir_unsafe(&st, 1000, true));
	st = dir(1000, 0777);
	assert_string_equal(rundir_unsafe(&st, 1000, true), "it is writable by group or others");
	st = dir(1000, 0770);
	assert_non_null(rundir_unsafe(&st, 1000, false));
	st = dir(2000, 0700);
	assert_string_equal(rundir_unsafe(&st, 1000, true), "it is owned by another user");
	/* root's directories are fine for the general check, never for the fallback */
	st = dir(0, 0755);
	assert_null(rundir_unsafe(&st, 1000, false));
	assert_non_null(rundir_unsafe(&st, 1000, true));
	/* a sticky shared directory such as /tmp: fine in general, not as the fallback */
	st = dir(0, 01777);
	assert_null(rundir_unsafe(&st, 1000, false));
	assert_non_null(rundir_unsafe(&st, 1000, true));
	st = dir(1000, 0700);
	st.st_mode = S_IFLNK | 0777;
	assert_string_equal(rundir_unsafe(&st, 1000, false), "it is a symbolic link");
	st.st_mode = S_IFREG | 0600;
	assert_string_equal(rundir_unsafe(&st, 1000, false), "it is not a directory");
}

static void
test_fallback_paths(void **state)
{
	(void)state;
	char *fb = rundir_fallback();
	char buf[128];
	assert_true(rundir_in_fallback(fb));
	snprintf(buf, sizeof buf, "%s/log", fb);
	assert_true(rundir_in_fallback(buf));
	snprintf(buf, sizeof buf, "%s0/log", fb);
	assert_false(rundir_in_fallback(buf));
	assert_false(rundir_in_fallback("/run/spark"));
	free(fb);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_unsafe_rules),
	    cmocka_unit_test(test_fallback_paths),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

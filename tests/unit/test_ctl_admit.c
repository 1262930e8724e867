/* The control socket's admission tiers (DESIGN §4): others, the daemon's uid and root each keep a reserve that the
 * tier below cannot take. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "sparkd.h"

#define SELF  1000
#define OTHER 2000

static void
test_per_uid_caps(void **state)
{
	(void)state;
	assert_null(ctl_admit_check(OTHER, SELF, 10, CTL_MAX_PER_UID - 1, 20, 1024));
	assert_non_null(ctl_admit_check(OTHER, SELF, 10, CTL_MAX_PER_UID, 20, 1024));
	/* the daemon's uid at the cap of others still gets in, up to its reserve */
	assert_null(ctl_admit_check(SELF, SELF, 10, CTL_MAX_PER_UID, 20, 1024));
	assert_non_null(ctl_admit_check(SELF, SELF, 10, CTL_MAX_PER_UID + CTL_OWNER_RESERVE, 20, 1024));
	/* root has no per-uid cap below the total */
	assert_null(ctl_admit_check(0, SELF, 10, 200, 20, 1024));
}

static void
test_total_tiers(void **state)
{
	(void)state;
	int full = CTL_MAX_CLIENTS;
	assert_non_null(ctl_admit_check(OTHER, SELF, full, 0, 20, 100000));
	assert_null(ctl_admit_check(SELF, SELF, full, 0, 20, 100000));
	assert_non_null(ctl_admit_check(SELF, SELF, full + CTL_OWNER_RESERVE, 0, 20, 100000));
	assert_null(ctl_admit_check(0, SELF, full + CTL_OWNER_RESERVE, 0, 20, 100000));
	assert_non_null(ctl_admit_check(0, SELF, full + 2 * CTL_OWNER_RESERVE, 0, 20, 100000));
	/* sparkd running as root: root is the owner and has the top tier */
	assert_null(ctl_admit_check(0, 0, full + CTL_OWNER_RESERVE, 100, 20, 100000));
}

static void
test_descriptor_reserve(void **state)
{
	(void)state;
	const char *why = ctl_admit_check(OTHER, SELF, 10, 0, 1024 - CTL_FD_RESERVE, 1024);
	assert_non_null(why);
	assert_non_null(strstr(why, "file descriptors"));
	assert_null(ctl_admit_check(OTHER, SELF, 10, 0, 1024 - CTL_FD_RESERVE - 1, 1024));
	/* owners may use what is left */
	assert_null(ctl_admit_check(SELF, SELF, 10, 0, 1023, 1024));
	assert_null(ctl_admit_check(0, SELF, 10, 0, 1023, 1024));
	/* no known limit: no descriptor check */
	assert_null(ctl_admit_check(OTHER, SELF, 10, 0, 1 << 20, 0));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_per_uid_caps),
	    cmocka_unit_test(test_total_tiers),
	    cmocka_unit_test(test_descriptor_reserve),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Broker URLs (redis://, unix://), passwords with escapes, rediss refused, redaction, PostgreSQL URLs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "url.h"

static struct redis_url
ok(const char *s)
{
	struct redis_url u;
	char err[256] = "";
	if (redis_url_parse(s, &u, err, sizeof err) != 0)
		fail_msg("'%s' refused: %s", s, err);
	return u;
}

static void
bad(const char *s, const char *why)
{
	struct redis_url u;
	char err[256] = "";
	if (redis_url_parse(s, &u, err, sizeof err) != -1)
		fail_msg("'%s' accepted", s ? s : "(null)");
	if (why != NULL && strstr(err, why) == NULL)
		fail_msg("'%s': error '%s' should mention '%s'", s ? s : "(null)", err, why);
	if (strstr(err, "hunter2") != NULL)
		fail_msg("error '%s' shows the password", err);
	/* a refused URL leaves nothing allocated */
	assert_null(u.host);
	assert_null(u.password);
}

static void
test_redis_urls(void **state)
{
	(void)state;
	struct redis_url u = ok("redis://localhost:6379/0");
	assert_string_equal(u.host, "localhost");
	assert_int_equal(u.port, 6379);
	assert_int_equal(u.db, 0);
	assert_null(u.path);
	assert_null(u.user);
	assert_null(u.password);
	redis_url_free(&u);

	u = ok("redis://redis");
	assert_string_equal(u.host, "redis");
	assert_int_equal(u.port, 6379);
	assert_int_equal(u.db, 0);
	redis_url_free(&u);

	u = ok("redis://127.0.0.1:6390/15");
	assert_int_equal(u.port, 6390);
	assert_int_equal(u.db, 15);
	redis_url_free(&u);

	u = ok("redis://h:1/");
	assert_int_equal(u.db, 0);
	redis_url_free(&u);

	u = ok("redis://h/0?db=5");
	assert_int_equal(u.db, 5);
	redis_url_free(&u);

	u = ok("redis://[::1]:6380/2");
	assert_string_equal(u.host, "::1");
	assert_int_equal(u.port, 6380);
	assert_int_equal(u.db, 2);
	redis_url_free(&u);

	/* a zone id (RFC 6874) is passed on as getaddrinfo takes it */
	u = ok("redis://[fe80::1%25eth0]/1");
	assert_string_equal(u.host, "fe80::1%eth0");
	assert_int_equal(u.port, 6379);
	redis_url_free(&u);

	u = ok("redis://[::ffff:127.0.0.1]");
	assert_string_equal(u.host, "::ffff:127.0.0.1");
	redis_url_free(&u);

	/* an empty port keeps the default; a #fragment is ignored */
	u = ok("redis://h:/3#x");
	assert_int_equal(u.port, 6379);
	assert_int_equal(u.db, 3);
	redis_url_free(&u);

	u = ok("redis://h?db=4");
	assert_string_equal(u.host, "h");
	assert_int_equal(u.db, 4);
	redis_url_free(&u);
}

static void
test_passwords(void **state)
{
	(void)state;
	struct redis_url u = ok("redis://:hunter2@h:6379/0");
	assert_null(u.user);
	assert_string_equal(u.password, "hunter2");
	redis_url_free(&u);

	u = ok("redis://default:hunter2@h/1");
	assert_string_equal(u.user, "default");
	assert_string_equal(u.password, "hunter2");
	assert_int_equal(u.db, 1);
	redis_url_free(&u);

	/* percent-escapes are decoded: p@ss:w/rd%x */
	u = ok("redis://:p%40ss%3Aw%2Frd%25x@h:7000/3");
	assert_string_equal(u.password, "p@ss:w/rd%x");
	assert_int_equal(u.port, 7000);
	assert_int_equal(u.db, 3);
	redis_url_free(&u);

	u = ok("redis://us%20er:pa%20ss@h");
	assert_string_equal(u.user, "us er");
	assert_string_equal(u.password, "pa ss");
	redis_url_free(&u);

	/* only the first ':' separates user and password */
	u = ok("redis://u:a:b%2b+@h");
	assert_string_equal(u.user, "u");
	assert_string_equal(u.password, "a:b++");
	redis_url_free(&u);

	/* malformed escapes and %00 (which would cut the password short) are refused, without showing it */
	bad("redis://:hunter2%00x@h/0", "escape");
	bad("redis://:hunter2%zz@h/0", "escape");
	bad("redis://:hunter2%4@h/0", "escape");
	bad("redis://:hunter2%@h/0", "escape");
	bad("redis://hunter2%g0:pw@h/0", "escape");
	/* an unencoded '@', '/', '?' or '#' in the password */
	bad("redis://:hunter2@x@h/0", "%40");
	bad("redis://:hun/ter2@h/0", "%2F");
	bad("redis://:hun?ter2@h/0", "%3F");
	bad("redis://:hun#ter2@h/0", "%23");
}

static void
test_unix_urls(void **state)
{
	(void)state;
	struct redis_url u = ok("unix:///var/run/redis/redis.sock?db=2");
	assert_null(u.host);
	assert_string_equal(u.path, "/var/run/redis/redis.sock");
	assert_int_equal(u.db, 2);
	redis_url_free(&u);

	u = ok("unix:///tmp/r.sock");
	assert_string_equal(u.path, "/tmp/r.sock");
	assert_int_equal(u.db, 0);
	redis_url_free(&u);

	u = ok("redis+socket:///tmp/r.sock?db=1");
	assert_string_equal(u.path, "/tmp/r.sock");
	assert_int_equal(u.db, 1);
	redis_url_free(&u);

	bad("unix://", "unix:///path");
	bad("unix:///", "absolute path");
	bad("unix:///tmp/r.sock?db=x", "db");

	u = ok("unix:///tmp/r%20s.sock");
	assert_string_equal(u.path, "/tmp/r s.sock");
	redis_url_free(&u);

	u = ok("unix://localhost/tmp/r.sock");
	assert_string_equal(u.path, "/tmp/r.sock");
	redis_url_free(&u);

	bad("unix://tmp/r.sock", "absolute path");
	bad("unix:///tmp/r%00.sock", "escape");
	bad("unix:///r.sock?db=0&password=hunter2", "password");
}

static void
test_refused(void **state)
{
	(void)state;
	bad("rediss://h:6379/0", "rediss");
	bad("rediss://:hunter2@h:6379/0", "TLS");
	bad("nonsense", "redis://");
	bad("", "redis://");
	bad(NULL, "redis://");
	bad("http://h:6379/0", "redis://");
	bad("amqp://guest:hunter2@h//", "redis://");
	bad("redis://", NULL);
	bad("redis://h:0/0", "port");
	bad("redis://h:70000/0", NULL);
	bad("redis://:hunter2@h:notaport/0", NULL);
	bad("redis://h/notadb", "database");
	bad("redis://h/-1", "database");
	bad("redis://h/0?db=-2", "db");
	bad("redis://h:65536/0", "port");
	bad("redis://h:+80/0", "port");
	bad("redis://h:1:2/0", "port");
	bad("redis://:hunter2@:1/0", "host");
	bad("redis://h!x/0", "host");
	bad("redis://[::1/0", "IPv6");
	bad("redis://[nothex]/0", "IPv6");
	bad("redis://[::1]x/0", NULL);
	bad("redis://h/0 ", "space");
	bad("redis://:hunter2@h\n/0", "control");
}

static void
redacts(const char *in, const char *want)
{
	char *r = url_redact(in);
	assert_string_equal(r, want);
	free(r);
}

static void
test_redaction(void **state)
{
	(void)state;
	redacts("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0");
	redacts("redis://user:hunter2@h/0", "redis://user:***@h/0");
	redacts("redis://hunter2@h/0", "redis://***@h/0");
	redacts("redis://:p@ss@h/0", "redis://:***@h/0");
	redacts("redis://h:6379/0", "redis://h:6379/0");
	/* a password in the query is masked too, and so is anything before the '@' of a URL we cannot parse */
	redacts("redis://h/0?password=x@y", "redis://h/0?password=***");
	redacts("unix:///r.sock?db=0&password=pw&x=1", "unix:///r.sock?db=0&password=***&x=1");
	/* a password shorter than the mask (the string grows), and several of them */
	redacts("unix:///r.sock?password=p", "unix:///r.sock?password=***");
	redacts("redis://h/0?password=a&password=bb#password=c", "redis://h/0?password=***&password=***#password=***");
	redacts("redis:/:hunter2@h:6379/0", "***@h:6379/0");
	redacts("postgresql+asyncpg://spark:hunter2@db:5432/spark", "postgresql+asyncpg://spark:***@db:5432/spark");
	redacts("unix:///tmp/r.sock?db=1", "unix:///tmp/r.sock?db=1");
	redacts("nonsense", "nonsense");
	redacts("", "");
	char *r = url_redact(NULL);
	assert_string_equal(r, "");
	free(r);
}

static void
test_pg_normalize(void **state)
{
	(void)state;
	char *s = pg_url_normalize("postgresql+asyncpg://u:p@db:5432/spark");
	assert_string_equal(s, "postgresql://u:p@db:5432/spark");
	free(s);
	s = pg_url_normalize("postgresql://u:p@db/spark");
	assert_string_equal(s, "postgresql://u:p@db/spark");
	free(s);
	s = pg_url_normalize("postgres+psycopg2://db/x");
	assert_string_equal(s, "postgres://db/x");
	free(s);
	/* a '+' in the password is not a driver suffix */
	s = pg_url_normalize("postgresql://u:a+b@db/x");
	assert_string_equal(s, "postgresql://u:a+b@db/x");
	free(s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_redis_urls), cmocka_unit_test(test_passwords), cmocka_unit_test(test_unix_urls),
	    cmocka_unit_test(test_refused),    cmocka_unit_test(test_redaction), cmocka_unit_test(test_pg_normalize),
	};
	return cmocka_run_group_tests_name("url", tests, NULL, NULL);
}

/* The small encodings of message-codec.c: ISO 8601 times, kombu key names, base64. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

static void
test_iso(void **state)
{
	(void)state;
	double t;
	assert_int_equal(message_parse_iso("1970-01-01T00:00:00", &t), 0);
	assert_true(t == 0);
	assert_int_equal(message_parse_iso("1970-01-01T01:00:00+01:00", &t), 0);
	assert_true(t == 0);
	assert_int_equal(message_parse_iso("1970-01-01T00:00:01.5Z", &t), 0);
	assert_true(t == 1.5);
	assert_int_equal(message_parse_iso("2026-11-26T18:46:22.400551+00:00", &t), 0);
	assert_true(fabs(t - 1795718782.400551) < 1e-5);
	assert_int_equal(message_parse_iso("2026-11-26 18:46:22-0130", &t), 0);
	assert_true(t == 1795718782 + 5400);
	assert_int_equal(message_parse_iso("tomorrow", &t), -1);
	assert_int_equal(message_parse_iso("2026-13-01T00:00:00", &t), -1);
	assert_int_equal(message_parse_iso("2026-11-26T18:46:22+00:00 junk", &t), -1);

	char buf[64];
	message_format_iso(1795718782.400551, true, buf, sizeof buf);
	assert_string_equal(buf, "2026-11-26T18:46:22.400551+00:00");
	message_format_iso(0, false, buf, sizeof buf);
	assert_string_equal(buf, "1970-01-01T00:00:00.000000");
}

static void
test_keys(void **state)
{
	(void)state;
	int want[] = {0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9};
	for (int p = 0; p <= 10; p++)
		assert_int_equal(message_priority_step(p), want[p]);
	assert_int_equal(message_priority_step(-4), 0);
	char *k = message_queue_key("celery", 0);
	assert_string_equal(k, "celery");
	free(k);
	k = message_queue_key("celery", 5);
	assert_memory_equal(k,
	                    "celery\x06\x16"
	                    "3",
	                    9);
	char *q = message_queue_of_key(k);
	assert_string_equal(q, "celery");
	free(q);
	free(k);
}

static void
b64_roundtrip(const char *plain, const char *encoded)
{
	char *e = b64_encode((const unsigned char *)plain, strlen(plain));
	assert_string_equal(e, encoded);
	free(e);
	size_t n = 99;
	unsigned char *d = b64_decode(encoded, strlen(encoded), &n);
	assert_non_null(d);
	assert_int_equal(n, strlen(plain));
	assert_memory_equal(d, plain, n);
	assert_int_equal(d[n], '\0');
	free(d);
}

static void
b64_refused(const char *s)
{
	size_t n;
	unsigned char *d = b64_decode(s, strlen(s), &n);
	if (d != NULL)
		fail_msg("'%s' decoded", s);
}

static void
test_base64(void **state)
{
	(void)state;
	/* RFC 4648 section 10 */
	b64_roundtrip("", "");
	b64_roundtrip("f", "Zg==");
	b64_roundtrip("fo", "Zm8=");
	b64_roundtrip("foo", "Zm9v");
	b64_roundtrip("foob", "Zm9vYg==");
	b64_roundtrip("fooba", "Zm9vYmE=");
	b64_roundtrip("foobar", "Zm9vYmFy");
	/* every byte value, and both ends of the alphabet */
	unsigned char all[256];
	for (int i = 0; i < 256; i++)
		all[i] = (unsigned char)i;
	for (size_t len = 0; len <= sizeof all; len += 85) {
		char *e = b64_encode(all, len);
		size_t n;
		unsigned char *d = b64_decode(e, strlen(e), &n);
		assert_non_null(d);
		assert_int_equal(n, len);
		assert_memory_equal(d, all, len);
		free(d);
		free(e);
	}
	b64_roundtrip("\xfb\xff\xbf", "+/+/");
	/* whitespace at the ends, as a body may carry */
	size_t n;
	unsigned char *d = b64_decode(" Zm9v\r\n", 7, &n);
	assert_non_null(d);
	assert_int_equal(n, 3);
	assert_memory_equal(d, "foo", 3);
	free(d);
	/* malformed: bad length, missing padding, characters outside the standard alphabet (urlsafe too),
	 * padding in the middle or too much of it, whitespace inside */
	b64_refused("Zg");
	b64_refused("Zg=");
	b64_refused("Zm9vY");
	b64_refused("Zm9v-_==");
	b64_refused("Zm9v!A==");
	b64_refused("Zg==Zg==");
	b64_refused("Z===");
	b64_refused("====");
	b64_refused("Zm=v");
	b64_refused("Zm 9v");
	b64_refused("Zm9v\xc3\xa9"
	            "A=");
	/* the length is what counts: an embedded NUL is an invalid character */
	assert_null(b64_decode("Zm\0v", 4, &n));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_iso),
	    cmocka_unit_test(test_keys),
	    cmocka_unit_test(test_base64),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The hot path's printf-free writers (meta.c) against printf and message_format_iso, and the strict string scan's
 * eight-byte skip (jscan.c) against jansson's verdict, with the byte that matters at every offset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jscan.h"
#include "worker.h"

static void
test_digits_and_fixed(void **state)
{
	static const unsigned long long ints[] = {0, 7, 9, 10, 99, 100, 12345, 4294967296ULL, 18446744073709551615ULL};
	for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
		char want[32], got[32];
		snprintf(want, sizeof want, "%llu", ints[i]);
		size_t n = sbuf_digits(ints[i], got);
		got[n] = '\0';
		assert_string_equal(got, want);
		struct sbuf b = {0};
		sbuf_adds(&b, "x");
		sbuf_add_uint(&b, ints[i]);
		assert_string_equal(b.p + 1, want);
		assert_int_equal(b.len, 1 + strlen(want));
		sbuf_free(&b);
	}
	/* printf's shape, and the value within half a unit of the last digit (ties may round the other way: these
	 * are times and runtimes, not money) */
	static const double reals[] = {0, 0.5, 1.25, 1795718782.5, 1795718782.400551, 0.000001, 12.0, 999999.999999};
	for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
		for (int d = 1; d <= 9; d++) {
			char got[SBUF_FIXED_MAX];
			size_t n = sbuf_fixed(reals[i], d, got);
			assert_int_equal(n, strlen(got));
			const char *dot = strchr(got, '.');
			assert_non_null(dot);
			assert_int_equal(strlen(dot + 1), d);
			double unit = 1;
			for (int k = 0; k < d; k++)
				unit /= 10;
			assert_true(fabs(strtod(got, NULL) - reals[i]) <= unit / 2 + reals[i] * 1e-15);
		}
	char got[SBUF_FIXED_MAX];
	sbuf_fixed(1795718782.400551, 6, got);
	assert_string_equal(got, "1795718782.400551");
	/* outside [0, 1e15): printf's own text */
	sbuf_fixed(-1.5, 6, got);
	assert_string_equal(got, "-1.500000");
	sbuf_fixed(1e16, 1, got);
	assert_string_equal(got, "10000000000000000.0");
}

static void
test_iso(void **state)
{
	static const double times[] = {
	    0, 1795718782.400551, 1795718782.9999996, 951782400.25, 4102444799.999999, 1700000000.000001};
	for (size_t i = 0; i < sizeof times / sizeof times[0]; i++)
		for (int aware = 0; aware < 2; aware++) {
			char want[64], got[META_ISO_MAX];
			message_format_iso(times[i], aware, want, sizeof want);
			size_t n = meta_iso(times[i], aware, got);
			assert_string_equal(got, want);
			assert_int_equal(n, strlen(want));
		}
}

/* jscan's verdict on the JSON string literal "<body>" equals jansson's */
static void
expect_same_verdict(const char *body, size_t len)
{
	char *js = malloc(len + 3);
	js[0] = '"';
	memcpy(js + 1, body, len);
	js[len + 1] = '"';
	js[len + 2] = '\0';
	json_error_t jerr;
	json_t *j = json_loadb(js, len + 2, JSON_DECODE_ANY, &jerr);
	struct jscan s;
	jsmntok_t tok[4];
	int r = jscan_run(&s, js, len + 2, tok, 4);
	jscan_free(&s);
	if ((j != NULL) != (r == 0))
		fail_msg("jansson %s, jscan %s (%s) for %s", j ? "accepts" : "refuses", r == 0 ? "accepts" : "refuses",
		         r == 0 ? "" : s.err, js);
	json_decref(j);
	free(js);
}

static void
test_string_skip(void **state)
{
	/* each kind of byte the skip must stop at, at every offset of strings longer than a few words */
	static const char *const odd[] = {
	    "\x01",     "\x1f", "\\n",      "\\u00e9", "\\u0000", "\\ud800", "\\ud83d\\ude00",
	    "\xc3\xa9", "\xff", "\xe2\x82", "\x7f",    "\\",      "\\q"};
	char body[128];
	for (size_t k = 0; k < sizeof odd / sizeof odd[0]; k++)
		for (size_t at = 0; at < 40; at++)
			for (size_t total = at; total < at + 20; total += 9) {
				size_t olen = strlen(odd[k]);
				memset(body, 'a', total);
				memcpy(body + at, odd[k], olen);
				memset(body + at + olen, 'b', total - at);
				expect_same_verdict(body, total + olen);
			}
	/* long runs of plain bytes, every length around the word size */
	for (size_t n = 0; n < 40; n++) {
		memset(body, 'Z', n);
		expect_same_verdict(body, n);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_digits_and_fixed),
	    cmocka_unit_test(test_iso),
	    cmocka_unit_test(test_string_skip),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

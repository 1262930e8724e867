/* Fernet decryption against tokens made by Python's cryptography.fernet.Fernet (38.0.4). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fernet.h"

/* Fernet(base64.urlsafe_b64encode(bytes(range(32)))) */
#define KEY       "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
#define OTHER_KEY "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
#define TOK_SK    "gAAAAABrCId2-5bab6ZCasj0KO5wdS9eaZ1dBrB3z19rcDkKz4p5QkJqaf1XbThi0wR4bruW1y6jp7jsy8GU51CXinqkItoM8w=="
#define TOK_EMPTY "gAAAAABrCId2PaQXMDzhcWSyVjmkZ0c2FQJ9x6BL_u6jlJn8O3ybJPxGS-iC6FM91ksVTLpSGcFiwPRjFHQB2I-ItVh3lim-AA=="
#define TOK_UTF8                                                                                                       \
	"gAAAAABrCId2B4ouT5bUwl6QcZP9E1w5AcvBDdwdo528Ch2ojoX48VGOY80kpbGRNuAa6upgO61tFsRjFuuJN9DV-sDG6FaGSC1X6-"       \
	"Cnxyg7cGt"                                                                                                    \
	"ov40AHoA="
#define TOK_BLOCK                                                                                                      \
	"gAAAAABrCId2K4WI49fWBbAYbRGewApHX-x2r_IcJPTGOzPuzDddinE_wiAna1YzLm8i_"                                        \
	"gMPUShpaONbiai9ZQBfF6yktMC9uAvIg5HmtqPj4y9"                                                                   \
	"61s0Yels="
#define TOK_LONG                                                                                                       \
	"gAAAAABrCId2rVNbiCL7Xe0oHop_"                                                                                 \
	"pIDyWjcGQBG7X9ozlBAdSI6mOZ1CzdbxpojCpP16QpWzUttkDjJO8vq7AcWFFVVGIKORNwMREDsGrv2RN9f"                          \
	"fikJGbuFCpFzeKf2JvU-i2HZrrvx7oMVjFZ9Yr_1VtGeUud0cMAWLeX--XqVQdceECJFHWjcajhEXaLc67Rg23rCo4UUZYs-"             \
	"xASasQp4npUaAo2"                                                                                              \
	"00ZQ=="
/* made with automagik-spark's fallback test key and with a raw 32-character key */
#define TEST_KEY "5aQaTalKCAOAgOPFV_xZrQVzWgE80mseLFW-x_sa06o="
#define TOK_TESTKEY                                                                                                    \
	"gAAAAABrCId2WNYmRf7NUG4607DS5QnxKvn_5J4OGdpthTFeNMRjX8Ww_WIDywaAYZzMBurHqf937v8bvGzNZWzVidwhJPCL2g=="
#define RAW_KEY "0123456789abcdef0123456789abcdef"
#define TOK_RAW "gAAAAABrCId2ms0JGFY8l9InmpxR2IX7dEXRT_c1dpDsrCglM7HEnwjvcr3lmF1QV7izUl-Aps4ulqZikTiHCCHUobtwfczBNQ=="

static void
expect_plain(const char *keytext, const char *token, const char *want, size_t wantlen)
{
	unsigned char key[FERNET_KEY_LEN];
	char err[256];
	char *out = NULL;
	size_t len = 0;
	assert_int_equal(fernet_key_parse(keytext, key, err, sizeof(err)), 0);
	assert_int_equal(fernet_decrypt(key, token, &out, &len, err, sizeof(err)), 0);
	assert_int_equal(len, wantlen);
	assert_memory_equal(out, want, wantlen);
	assert_int_equal(out[len], '\0');
	free(out);
}

static void
expect_fail(const char *keytext, const char *token, const char *reason)
{
	unsigned char key[FERNET_KEY_LEN];
	char err[256] = "";
	char *out = (char *)1;
	size_t len = 1;
	assert_int_equal(fernet_key_parse(keytext, key, err, sizeof(err)), 0);
	assert_int_equal(fernet_decrypt(key, token, &out, &len, err, sizeof(err)), -1);
	assert_null(out);
	assert_int_equal(len, 0);
	assert_non_null(strstr(err, reason));
}

static void
test_python_tokens(void **state)
{
	(void)state;
	expect_plain(KEY, TOK_SK, "sk-test-key-123", 15);
	expect_plain(KEY, TOK_EMPTY, "", 0);
	expect_plain(KEY, TOK_UTF8,
	             "cl\xc3\xa9 \xc3\xbcn\xc3\xaf"
	             "code \xe2\x9c\x93",
	             18);
	expect_plain(KEY, TOK_BLOCK, "AAAAAAAAAAAAAAAA", 16);
	char x100[101];
	memset(x100, 'x', 100);
	x100[100] = '\0';
	expect_plain(KEY, TOK_LONG, x100, 100);
}

static void
test_key_forms(void **state)
{
	(void)state;
	expect_plain(TEST_KEY, TOK_TESTKEY, "from-test-key", 13);
	expect_plain("\"" KEY "\"", TOK_SK, "sk-test-key-123", 15); /* quotes left by an env file */
	expect_plain("'" KEY "'", TOK_SK, "sk-test-key-123", 15);
	expect_plain(RAW_KEY, TOK_RAW, "raw-key-secret", 14);
	/* padding dropped from the token */
	char tok[256];
	strcpy(tok, TOK_SK);
	tok[strlen(tok) - 2] = '\0';
	expect_plain(KEY, tok, "sk-test-key-123", 15);
}

static void
test_bad_key(void **state)
{
	(void)state;
	unsigned char key[FERNET_KEY_LEN];
	char err[256];
	assert_int_equal(fernet_key_parse("", key, err, sizeof(err)), -1);
	assert_int_equal(fernet_key_parse("short", key, err, sizeof(err)), -1);
	assert_int_equal(fernet_key_parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd", key, err, sizeof(err)), -1);
	assert_null(strstr(err, "AAEC")); /* the key never appears in messages */
	/* a valid key that is not the one the token was made with */
	expect_fail(OTHER_KEY, TOK_SK, "signature mismatch");
}

static void
test_bad_tokens(void **state)
{
	(void)state;
	char tok[512];
	/* flip one character of the HMAC */
	strcpy(tok, TOK_SK);
	size_t n = strlen(tok);
	tok[n - 5] = tok[n - 5] == 'A' ? 'B' : 'A';
	expect_fail(KEY, tok, "signature mismatch");
	/* flip one character of the ciphertext */
	strcpy(tok, TOK_SK);
	tok[40] = tok[40] == 'A' ? 'B' : 'A';
	expect_fail(KEY, tok, "signature mismatch");
	/* unknown version byte (0x80 -> 0x84) */
	strcpy(tok, TOK_SK);
	tok[0] = 'h';
	expect_fail(KEY, tok, "version");
	/* truncated */
	strcpy(tok, TOK_SK);
	tok[60] = '\0';
	expect_fail(KEY, tok, "length");
	expect_fail(KEY, "", "length");
	expect_fail(KEY, "not base64 at all!", "base64");
	expect_fail(KEY, "gAAAAA+/", "base64"); /* standard alphabet is not Fernet's */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_python_tokens),
	    cmocka_unit_test(test_key_forms),
	    cmocka_unit_test(test_bad_key),
	    cmocka_unit_test(test_bad_tokens),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * libFuzzer harness for Fernet: the key text as AUTOMAGIK_SPARK_ENCRYPTION_KEY gives it (fernet_key_parse) and a
 * token from the sources table (fernet_decrypt), with a fixed key so that well-formed tokens reach the HMAC and
 * the decryption. The first byte chooses: 0 = the rest is a key text, else a token.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "fernet.h"

/* the key of tests/unit/test_fernet.c, so the corpus's real tokens decrypt */
#define FUZZ_FERNET_KEY "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	char *s = fuzz_cstr(data + 1, size - 1);
	if (s == NULL)
		return 0;
	unsigned char key[FERNET_KEY_LEN];
	char err[256];
	if (data[0] == 0) {
		fernet_key_parse(s, key, err, sizeof err);
	} else if (fernet_key_parse(FUZZ_FERNET_KEY, key, err, sizeof err) == 0) {
		char *out = NULL;
		size_t outlen = 0;
		if (fernet_decrypt(key, s, &out, &outlen, err, sizeof err) == 0 && out[outlen] != '\0')
			abort(); /* the plaintext is promised NUL-terminated */
		free(out);
	}
	free(s);
	return 0;
}

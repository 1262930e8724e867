/*
 * Fernet (https://github.com/fernet/spec) decryption, compatible with Python's cryptography.fernet.Fernet.
 * automagik-spark stores workflow source API keys as Fernet tokens made with AUTOMAGIK_SPARK_ENCRYPTION_KEY.
 */
#ifndef SPARK_FERNET_H
#define SPARK_FERNET_H

#include <stddef.h>

#define FERNET_KEY_LEN 32

/*
 * Turn the AUTOMAGIK_SPARK_ENCRYPTION_KEY text into the 32-byte key the way automagik-spark does: surrounding
 * quotes stripped, then urlsafe base64 of 32 bytes, else a raw 32-byte string. -1 with a reason in err otherwise
 * (the reason never contains the key).
 */
int fernet_key_parse(const char *text, unsigned char key[FERNET_KEY_LEN], char *err, size_t errlen);

/*
 * Verify and decrypt a token. On success returns 0 and *out holds the plaintext (malloc'd, NUL-terminated, the
 * caller frees it; *outlen is its length without the NUL). On failure returns -1 with a reason in err that never
 * contains key or plaintext material. No TTL is applied, as automagik-spark decrypts without one.
 */
int fernet_decrypt(const unsigned char key[FERNET_KEY_LEN], const char *token, char **out, size_t *outlen, char *err,
                   size_t errlen);

#endif

/* Encodings shared by the worker and sparkd: standard base64 (kombu's body_encoding "base64") and uuid4 strings. */
#ifndef SPARK_CODEC_H
#define SPARK_CODEC_H

#include <stddef.h>

/* Standard base64 (RFC 4648, padding required; whitespace at the ends ignored). NULL/-1 when malformed;
 * decoding writes never more than it reads, so b64_decode_into may decode in place. */
unsigned char *b64_decode(const char *s, size_t len, size_t *outlen); /* NUL-terminated too; caller frees */
int b64_decode_into(const char *s, size_t len, unsigned char *out, size_t *outlen); /* out may be s itself */
char *b64_encode(const unsigned char *p, size_t len);                               /* caller frees */
void uuid4_string(char out[37]);                                                    /* a random (v4) UUID */

#endif

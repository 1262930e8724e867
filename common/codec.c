/* Base64 and uuid4 (codec.h). */
#include "codec.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "util.h"

void
uuid4_string(char out[37])
{
	unsigned char b[16];
	size_t got = 0;
	while (got < sizeof b) {
		ssize_t n = getrandom(b + got, sizeof b - got, 0);
		if (n > 0)
			got += (size_t)n;
	}
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
	         b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* Base64 here rather than libcrypto's EVP_*Block: loading libcrypto cost every worker process ~1.6 MiB RSS. */
static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int
b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* out may be s itself: each quantum is read whole before its bytes are written, and output never passes input */
int
b64_decode_into(const char *s, size_t len, unsigned char *out, size_t *outlen)
{
	while (len > 0 && isspace((unsigned char)s[len - 1]))
		len--;
	while (len > 0 && isspace((unsigned char)*s))
		s++, len--;
	if (len % 4 != 0 || len > (size_t)1 << 30)
		return -1;
	size_t pad = len >= 1 && s[len - 1] == '=' ? (len >= 2 && s[len - 2] == '=' ? 2 : 1) : 0;
	unsigned char *o = out;
	for (size_t i = 0; i < len; i += 4) {
		/* '=' only as the padding of the last quantum, never in the middle */
		size_t data = i + 4 == len ? 4 - pad : 4;
		uint32_t v = 0;
		for (size_t k = 0; k < 4; k++) {
			int d = k < data ? b64_value((unsigned char)s[i + k]) : 0;
			if (d < 0)
				return -1;
			v = v << 6 | (uint32_t)d;
		}
		*o++ = (unsigned char)(v >> 16);
		if (data > 2)
			*o++ = (unsigned char)(v >> 8);
		if (data > 3)
			*o++ = (unsigned char)v;
	}
	*outlen = (size_t)(o - out);
	return 0;
}

unsigned char *
b64_decode(const char *s, size_t len, size_t *outlen)
{
	unsigned char *out = xmalloc(len / 4 * 3 + 1);
	if (b64_decode_into(s, len, out, outlen) < 0) {
		free(out);
		return NULL;
	}
	out[*outlen] = '\0';
	return out;
}

char *
b64_encode(const unsigned char *p, size_t len)
{
	char *out = xmalloc(4 * ((len + 2) / 3) + 1), *o = out;
	for (size_t i = 0; i < len; i += 3) {
		size_t n = len - i < 3 ? len - i : 3;
		uint32_t v = (uint32_t)p[i] << 16 | (n > 1 ? (uint32_t)p[i + 1] << 8 : 0) | (n > 2 ? p[i + 2] : 0);
		*o++ = b64_alphabet[v >> 18 & 63];
		*o++ = b64_alphabet[v >> 12 & 63];
		*o++ = n > 1 ? b64_alphabet[v >> 6 & 63] : '=';
		*o++ = n > 2 ? b64_alphabet[v & 63] : '=';
	}
	*o = '\0';
	return out;
}

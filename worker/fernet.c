/*
 * Fernet decryption with libcrypto: urlsafe base64 token = 0x80 | timestamp (8) | IV (16) | AES-128-CBC
 * ciphertext | HMAC-SHA256 (32) over everything before it. Key = signing key (16) | encryption key (16).
 */
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "fernet.h"
#include "util.h"

#define FERNET_VERSION 0x80
#define FERNET_HDR     (1 + 8 + 16)
#define FERNET_MAC     32

/*
 * urlsafe base64 -> bytes through libcrypto's standard decoder: the urlsafe alphabet differs from the standard one
 * in two characters only, and Python pads with '=' (padding is restored when a caller dropped it).
 * Returns the decoded length or -1.
 */
static long
b64url_decode(const char *in, unsigned char **out)
{
	size_t n = strlen(in);
	while (n > 0 && (in[n - 1] == '\n' || in[n - 1] == '\r' || in[n - 1] == ' '))
		n--;
	size_t padded = (n + 3) / 4 * 4;
	char *std = xmalloc(padded + 1);
	for (size_t i = 0; i < n; i++) {
		char c = in[i];
		if (c == '+' || c == '/') { /* not part of the urlsafe alphabet */
			free(std);
			return -1;
		}
		std[i] = c == '-' ? '+' : c == '_' ? '/' : c;
	}
	for (size_t i = n; i < padded; i++)
		std[i] = '=';
	std[padded] = '\0';

	unsigned char *buf = xmalloc(padded / 4 * 3 + 1);
	EVP_ENCODE_CTX *ctx = EVP_ENCODE_CTX_new();
	if (!ctx) {
		free(std);
		free(buf);
		return -1;
	}
	int len = 0, fin = 0;
	EVP_DecodeInit(ctx);
	int rc = EVP_DecodeUpdate(ctx, buf, &len, (const unsigned char *)std, (int)padded);
	if (rc >= 0 && EVP_DecodeFinal(ctx, buf + len, &fin) == 1) {
		EVP_ENCODE_CTX_free(ctx);
		free(std);
		*out = buf;
		return (long)len + fin;
	}
	EVP_ENCODE_CTX_free(ctx);
	free(std);
	free(buf);
	return -1;
}

int
fernet_key_parse(const char *text, unsigned char key[FERNET_KEY_LEN], char *err, size_t errlen)
{
	if (!text || !*text) {
		snprintf(err, errlen, "encryption key is empty");
		return -1;
	}
	/* automagik-spark strips quotes an env file may have left around the value */
	size_t n = strlen(text);
	while (n > 0 && (*text == '"' || *text == '\'')) {
		text++;
		n--;
	}
	while (n > 0 && (text[n - 1] == '"' || text[n - 1] == '\''))
		n--;
	char *k = xstrndup(text, n);
	unsigned char *raw = NULL;
	long len = b64url_decode(k, &raw);
	if (len == FERNET_KEY_LEN) {
		memcpy(key, raw, FERNET_KEY_LEN);
		OPENSSL_cleanse(raw, (size_t)len);
		free(raw);
		OPENSSL_cleanse(k, n);
		free(k);
		return 0;
	}
	if (raw) {
		OPENSSL_cleanse(raw, (size_t)len);
		free(raw);
	}
	if (n == FERNET_KEY_LEN) { /* a raw 32-byte key: automagik-spark base64-encodes it and uses the bytes */
		memcpy(key, k, FERNET_KEY_LEN);
		OPENSSL_cleanse(k, n);
		free(k);
		return 0;
	}
	OPENSSL_cleanse(k, n);
	free(k);
	snprintf(
	    err, errlen,
	    "AUTOMAGIK_SPARK_ENCRYPTION_KEY is not a Fernet key (expected urlsafe base64 of 32 bytes, 44 characters)");
	return -1;
}

int
fernet_decrypt(const unsigned char key[FERNET_KEY_LEN], const char *token, char **out, size_t *outlen, char *err,
               size_t errlen)
{
	unsigned char *tok = NULL;
	*out = NULL;
	*outlen = 0;
	if (!token) {
		snprintf(err, errlen, "invalid Fernet token: empty");
		return -1;
	}
	long len = b64url_decode(token, &tok);
	if (len < 0) {
		snprintf(err, errlen, "invalid Fernet token: not urlsafe base64");
		return -1;
	}
	/* header, at least one cipher block, and the MAC */
	if (len < FERNET_HDR + 16 + FERNET_MAC || (len - FERNET_HDR - FERNET_MAC) % 16 != 0) {
		free(tok);
		snprintf(err, errlen, "invalid Fernet token: bad length");
		return -1;
	}
	if (tok[0] != FERNET_VERSION) {
		free(tok);
		snprintf(err, errlen, "invalid Fernet token: unknown version");
		return -1;
	}
	size_t signed_len = (size_t)len - FERNET_MAC;
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	if (!HMAC(EVP_sha256(), key, 16, tok, signed_len, mac, &maclen) || maclen != FERNET_MAC) {
		free(tok);
		snprintf(err, errlen, "invalid Fernet token: HMAC computation failed");
		return -1;
	}
	/* constant time, so a forger learns nothing from timing */
	if (CRYPTO_memcmp(mac, tok + signed_len, FERNET_MAC) != 0) {
		free(tok);
		snprintf(err, errlen,
		         "invalid Fernet token: signature mismatch (wrong AUTOMAGIK_SPARK_ENCRYPTION_KEY?)");
		return -1;
	}

	const unsigned char *iv = tok + 9;
	const unsigned char *ct = tok + FERNET_HDR;
	int ctlen = (int)(signed_len - FERNET_HDR);
	unsigned char *pt = xmalloc((size_t)ctlen + 16 + 1);
	int n1 = 0, n2 = 0;
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
	int ok = c && EVP_DecryptInit_ex(c, EVP_aes_128_cbc(), NULL, key + 16, iv) == 1 &&
	         EVP_DecryptUpdate(c, pt, &n1, ct, ctlen) == 1 && EVP_DecryptFinal_ex(c, pt + n1, &n2) == 1; /* PKCS7 */
	EVP_CIPHER_CTX_free(c);
	free(tok);
	if (!ok) {
		OPENSSL_cleanse(pt, (size_t)ctlen + 16);
		free(pt);
		snprintf(err, errlen, "invalid Fernet token: bad padding");
		return -1;
	}
	pt[n1 + n2] = '\0';
	*out = (char *)pt;
	*outlen = (size_t)(n1 + n2);
	return 0;
}

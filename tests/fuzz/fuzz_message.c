/*
 * libFuzzer harness for a Celery message as the worker takes it from Redis: message_decode (the jscan envelope
 * and body scan, base64 bodies, v1 and v2), then what the engine does next with the same bytes: message_dom,
 * a retry envelope, the redelivered mark (also what the sweeps do to any message) and the dead-letter entry.
 *
 * The first input byte says what the rest is, so the fuzzer also reaches past the envelope without having to
 * write base64 of valid JSON itself:
 *   0  the whole envelope
 *   1  a protocol v2 body ([args, kwargs, embed]), put in base64 in a well-formed envelope
 *   2  a protocol v1 body ({"task", "id", "args", ...}), the same way, with empty headers
 *   3  the headers object's text (task, id, eta, expires, retries, timelimit ...), with a well-formed body
 * The envelope is in an allocation of exactly its size, so a read past the message is an ASan report, as it would
 * be on a message hiredis hands over.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

/* base64 of [[1], {}, {}] */
#define FUZZ_BODY_B64 "W1sxXSwge30sIHt9XQ=="
#define FUZZ_PROPS                                                                                                     \
	"\"properties\": {\"body_encoding\": \"base64\", \"delivery_tag\": \"t1\", \"priority\": 0, "                  \
	"\"delivery_info\": {\"exchange\": \"\", \"routing_key\": \"celery\"}}"

/* The envelope the mode asks for (caller frees), its length in *len. */
static char *
fuzz_message_envelope(int mode, const uint8_t *data, size_t size, size_t *len)
{
	char *out = NULL;
	int n = -1;
	if (mode == 0) {
		out = malloc(size ? size : 1);
		if (out != NULL)
			memcpy(out, data, size);
		*len = size;
		return out;
	}
	if (mode == 1 || mode == 2) {
		char *b64 = b64_encode(data, size);
		const char *headers = mode == 1 ? "{\"task\": \"spark.noop\", \"id\": \"i1\"}" : "{}";
		n = asprintf(
		    &out, "{\"body\": \"%s\", \"content-type\": \"application/json\", \"headers\": %s, " FUZZ_PROPS "}",
		    b64, headers);
		free(b64);
	} else {
		n = asprintf(&out, "{\"body\": \"" FUZZ_BODY_B64 "\", \"headers\": %.*s, " FUZZ_PROPS "}", (int)size,
		             (const char *)data);
	}
	if (n < 0)
		return NULL;
	/* exactly its size: no NUL after it for a parser to lean on */
	char *exact = malloc((size_t)n ? (size_t)n : 1);
	if (exact != NULL)
		memcpy(exact, out, (size_t)n);
	free(out);
	*len = (size_t)n;
	return exact;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1 || size > 1 << 20)
		return 0;
	size_t len;
	char *raw = fuzz_message_envelope(data[0] & 3, data + 1, size - 1, &len);
	if (raw == NULL)
		return 0;
	struct message m;
	if (message_decode(raw, len, &m) == 0 && message_dom(&m, raw, len) == 0)
		free(message_build_retry(raw, len, &m, m.retries + 1, 1.8e9));
	free(message_mark_redelivered(raw, len));
	free(message_deadletter_entry(m.reason, "celery", 1.8e9, raw, len));
	message_free(&m);
	free(raw);
	return 0;
}

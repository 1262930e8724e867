/*
 * libFuzzer harness for a Celery message as the worker takes it from Redis: message_decode (the jscan envelope
 * and body scan, base64 bodies, v1 and v2), then what the engine does next with the same bytes: message_dom,
 * a retry envelope, the redelivered mark and the dead-letter entry.
 *
 * The input is copied into an allocation of exactly its size, so a read past the message is an ASan report, as
 * it would be on a message hiredis hands over.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *raw = malloc(size ? size : 1);
	if (raw == NULL)
		return 0;
	memcpy(raw, data, size);
	struct message m;
	if (message_decode(raw, size, &m) == 0 && message_dom(&m, raw, size) == 0) {
		free(message_build_retry(raw, size, &m, m.retries + 1, 1.8e9));
		free(message_mark_redelivered(raw, size));
	}
	free(message_deadletter_entry(m.reason, "celery", 1.8e9, raw, size));
	message_free(&m);
	free(raw);
	return 0;
}

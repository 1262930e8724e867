/*
 * libFuzzer harness for the URLs in the configuration: the broker and result-backend parser (redis_url_parse),
 * password redaction (url_redact) and the PostgreSQL normalisation (pg_url_normalize).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "url.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *s = fuzz_cstr(data, size);
	if (s == NULL)
		return 0;
	struct redis_url u;
	char err[256];
	memset(&u, 0, sizeof u);
	if (redis_url_parse(s, &u, err, sizeof err) == 0)
		redis_url_free(&u);
	free(url_redact(s));
	free(pg_url_normalize(s));
	free(s);
	return 0;
}

/*
 * libFuzzer harness for the env-file parser (envfile_parse_buf: KEY=value, KEY = value, export, quotes,
 * comments) and the memory-size values an env file may hold (parse_memory_kib).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "config.h"

/* Touch every byte of what the parser hands out, so a pair that is not NUL-terminated is an ASan report. */
static void
fuzz_envfile_pair(const char *key, const char *value, void *arg)
{
	size_t *total = arg;
	*total += strlen(key) + strlen(value);
	parse_memory_kib(value);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = fuzz_cstr(data, size);
	if (buf == NULL)
		return 0;
	char err[256];
	size_t total = 0;
	envfile_parse_buf("fuzz.env", buf, fuzz_envfile_pair, &total, err, sizeof err);
	free(buf);
	return 0;
}

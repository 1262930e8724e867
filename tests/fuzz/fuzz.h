/* What the libFuzzer harnesses share. */
#ifndef SPARK_FUZZ_H
#define SPARK_FUZZ_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The input as a C string in an allocation of exactly size + 1 bytes, so a read past its end is an ASan report;
 * NULL when out of memory. Bytes after an embedded NUL are the parser's to ignore. */
static inline char *
fuzz_cstr(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);
	if (s != NULL) {
		memcpy(s, data, size);
		s[size] = '\0';
	}
	return s;
}

#endif

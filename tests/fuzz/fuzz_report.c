/*
 * libFuzzer harness for the fd-3 reports sparkd reads from its workers (report_parse): a datagram split into
 * lines as sparkd splits it, each line parsed with exactly len + 1 bytes of scratch (what report.h promises is
 * enough), the line itself in an allocation of its exact size so nothing after len may be read.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "report.h"

/* Touch the parsed strings, so a field left pointing outside the scratch is an ASan report. */
static size_t
fuzz_report_touch(const struct report *r)
{
	size_t n = strlen(r->task_id ? r->task_id : "") + strlen(r->task_name ? r->task_name : "") +
	           strlen(r->outcome ? r->outcome : "") + strlen(r->reason ? r->reason : "") +
	           strlen(r->text ? r->text : "");
	for (int i = 0; i < r->nqueues && i < REPORT_MAX_QUEUES; i++)
		n += strlen(r->queue[i]);
	return n;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > SPARK_REPORT_MAX)
		return 0;
	const uint8_t *p = data, *end = data + size;
	while (p < end) {
		const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
		size_t len = (size_t)((nl ? nl : end) - p);
		char *line = malloc(len ? len : 1);
		char *scratch = malloc(len + 1);
		if (line == NULL || scratch == NULL)
			abort();
		memcpy(line, p, len);
		struct report r;
		if (report_parse(line, len, &r, scratch, len + 1) == 0)
			fuzz_report_touch(&r);
		free(line);
		free(scratch);
		p += len + 1;
	}
	return 0;
}

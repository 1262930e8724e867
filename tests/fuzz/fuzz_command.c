/*
 * libFuzzer harness for the sparkd -> worker commands on fd 3 (command_parse), two ways, chosen by the first
 * input byte:
 *   - even: the rest is one command line, parsed with exactly command_scratch_size(len) bytes of scratch at an
 *     offset (0..7, from the byte) that is not always pointer-aligned, ending where the allocation ends, so a
 *     write past what command.h promises is enough is an ASan report;
 *   - odd: the rest, split at NUL bytes, is a list of strings; a revoke and a queues command built from them with
 *     the builders parse back to the same strings (the escaping round-trips whatever a producer put in an id).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

#define FUZZ_MAX_IDS 64

/* Touch the parsed strings, so a field left pointing outside the scratch is an ASan report. */
static size_t
fuzz_command_touch(const struct command *c)
{
	size_t n = strlen(c->signal) + strlen(c->name) + strlen(c->what);
	for (int i = 0; i < c->argc; i++)
		n += strlen(c->argv[i]);
	return n;
}

static void
fuzz_command_line(const uint8_t *data, size_t size, unsigned off)
{
	char *line = malloc(size ? size : 1);
	size_t need = command_scratch_size(size);
	char *base = malloc(off + need);
	if (line == NULL || base == NULL)
		abort();
	memcpy(line, data, size);
	struct command c;
	if (command_parse(line, size, &c, base + off, need) == 0)
		fuzz_command_touch(&c);
	free(line);
	free(base);
}

/* Parse the one line buffered in o and check its list is ids[0..n). */
static void
fuzz_command_check(struct wl_out *o, enum command_kind kind, int n, const char *const *ids)
{
	size_t need = command_scratch_size(o->len);
	void *scratch = malloc(need);
	if (scratch == NULL)
		abort();
	struct command c;
	if (command_parse(o->buf, o->len, &c, scratch, need) != 0 || c.kind != kind || c.argc != n)
		abort();
	for (int i = 0; i < n; i++)
		if (strcmp(c.argv[i], ids[i]) != 0)
			abort();
	free(scratch);
	o->len = 0;
}

static void
fuzz_command_round_trip(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);
	if (s == NULL)
		abort();
	memcpy(s, data, size);
	s[size] = '\0';
	const char *ids[FUZZ_MAX_IDS];
	int n = 0;
	for (char *p = s; n < FUZZ_MAX_IDS; p += strlen(p) + 1) {
		ids[n++] = p;
		if (p + strlen(p) >= s + size)
			break;
	}
	struct wl_out o;
	wl_out_init(&o, -1);
	o.usable = 1; /* lines stay in the buffer: none reaches a datagram's size, so nothing is sent */
	command_revoke(&o, 1, "SIGTERM", n, ids);
	fuzz_command_check(&o, COMMAND_REVOKE, n, ids);
	command_queues(&o, n, ids);
	fuzz_command_check(&o, COMMAND_QUEUES, n, ids);
	wl_out_free(&o);
	free(s);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1 || size > SPARK_REPORT_MAX / 4)
		return 0;
	if (data[0] & 1)
		fuzz_command_round_trip(data + 1, size - 1);
	else
		fuzz_command_line(data + 1, size - 1, (data[0] >> 1) & 7);
	return 0;
}

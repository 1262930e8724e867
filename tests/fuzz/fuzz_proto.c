/*
 * libFuzzer harness for the control protocol reader: proto_reader_feed/next, proto_parse_request,
 * proto_parse_message and the typed map getters, on whatever bytes a client might send.
 *
 * Built and run by `make fuzz` (tests/fuzz/run.sh), seeded from tests/fuzz/proto/.
 *
 * The first input byte chooses the chunk size, so that frames split across reads are covered too.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "proto.h"

static void
use_frame(const msgpack_object *o)
{
	struct proto_request req;
	struct proto_message m;
	char err[128], s[64];
	bool b;
	int64_t i;
	double d;
	if (proto_parse_request(o, &req, err, sizeof err) == 0 && req.params != NULL) {
		proto_get_bool(req.params, "verbose", &b);
		proto_get_bool(req.params, "follow", &b);
		proto_get_int(req.params, "lines", &i);
		proto_get_double(req.params, "timeout_s", &d);
		proto_get_str(req.params, "level", s, sizeof s);
		proto_get_str(req.params, "worker", s, sizeof s);
	}
	if (proto_parse_message(o, &m, err, sizeof err) == 0 && m.result != NULL)
		proto_get_str(m.result, "msg", s, sizeof s);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	size_t chunk = (size_t)data[0] * 16 + 1;
	data++;
	size--;
	struct proto_reader r;
	if (proto_reader_init(&r) != 0)
		return 0;
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	for (size_t off = 0; off < size; off += chunk) {
		size_t n = size - off < chunk ? size - off : chunk;
		if (proto_reader_feed(&r, data + off, n) != PROTO_READ_NEED_MORE)
			break;
		int rc;
		while ((rc = proto_reader_next(&r, &u)) == PROTO_READ_FRAME)
			use_frame(&u.data);
		if (rc != PROTO_READ_NEED_MORE)
			break;
	}
	msgpack_unpacked_destroy(&u);
	proto_reader_free(&r);
	return 0;
}

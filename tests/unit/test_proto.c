/* msgpack-RPC frames: round trips, incremental reading, the 1 MiB cap, malformed input never crashes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "proto.h"

struct frame {
	msgpack_sbuffer buf;
	msgpack_packer pk;
};

static void
frame_init(struct frame *f)
{
	msgpack_sbuffer_init(&f->buf);
	msgpack_packer_init(&f->pk, &f->buf, msgpack_sbuffer_write);
}

static void
frame_free(struct frame *f)
{
	msgpack_sbuffer_destroy(&f->buf);
}

/* A request [0, msgid, method, [{verbose: true, lines: 5}]] */
static void
pack_status_request(struct frame *f, uint32_t msgid)
{
	proto_pack_request_head(&f->pk, msgid, PROTO_M_STATUS);
	msgpack_pack_array(&f->pk, 1);
	msgpack_pack_map(&f->pk, 3);
	proto_pack_kv_bool(&f->pk, "verbose", true);
	proto_pack_kv_int(&f->pk, "lines", 5);
	proto_pack_kv_str(&f->pk, "worker", "celery-1@host");
}

static void
test_request_round_trip(void **state)
{
	(void)state;
	struct frame f;
	frame_init(&f);
	pack_status_request(&f, 4000000000u);
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	assert_int_equal(proto_reader_feed(&r, f.buf.data, f.buf.size), PROTO_READ_NEED_MORE);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
	struct proto_request req;
	char err[128];
	assert_int_equal(proto_parse_request(&u.data, &req, err, sizeof err), 0);
	assert_int_equal(req.msgid, 4000000000u);
	assert_string_equal(req.method, "status");
	assert_non_null(req.params);
	bool verbose = false;
	assert_int_equal(proto_get_bool(req.params, "verbose", &verbose), 1);
	assert_true(verbose);
	int64_t lines = 0;
	assert_int_equal(proto_get_int(req.params, "lines", &lines), 1);
	assert_int_equal(lines, 5);
	char worker[64];
	assert_int_equal(proto_get_str(req.params, "worker", worker, sizeof worker), 1);
	assert_string_equal(worker, "celery-1@host");
	/* absent keys */
	assert_int_equal(proto_get_bool(req.params, "follow", &verbose), 0);
	assert_null(proto_map_get(req.params, "nothing"));
	/* wrong types */
	assert_int_equal(proto_get_bool(req.params, "lines", &verbose), -1);
	assert_int_equal(proto_get_int(req.params, "verbose", &lines), -1);
	assert_int_equal(proto_get_str(req.params, "lines", worker, sizeof worker), -1);
	assert_int_equal(proto_get_str(req.params, "worker", worker, 5), -1); /* too long for the buffer */
	double d;
	assert_int_equal(proto_get_double(req.params, "lines", &d), 1);
	assert_true(d == 5.0);
	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_NEED_MORE);
	msgpack_unpacked_destroy(&u);
	proto_reader_free(&r);
	frame_free(&f);
}

static void
test_byte_by_byte_and_back_to_back(void **state)
{
	(void)state;
	struct frame f;
	frame_init(&f);
	for (uint32_t id = 1; id <= 3; id++)
		pack_status_request(&f, id);
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	uint32_t next = 1;
	for (size_t i = 0; i < f.buf.size; i++) {
		assert_int_equal(proto_reader_feed(&r, f.buf.data + i, 1), PROTO_READ_NEED_MORE);
		int rc;
		while ((rc = proto_reader_next(&r, &u)) == PROTO_READ_FRAME) {
			struct proto_request req;
			char err[128];
			assert_int_equal(proto_parse_request(&u.data, &req, err, sizeof err), 0);
			assert_int_equal(req.msgid, next);
			next++;
		}
		assert_int_equal(rc, PROTO_READ_NEED_MORE);
	}
	assert_int_equal(next, 4);
	msgpack_unpacked_destroy(&u);
	proto_reader_free(&r);
	frame_free(&f);
}

static void
test_long_connection_is_not_capped(void **state)
{
	(void)state;
	/* many small frames over one connection add up to far more than the cap: each frame counts alone */
	struct frame f;
	frame_init(&f);
	pack_status_request(&f, 7);
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	size_t total = 0;
	int frames = 0;
	while (total < 3 * SPARK_FRAME_MAX) {
		assert_int_equal(proto_reader_feed(&r, f.buf.data, f.buf.size), PROTO_READ_NEED_MORE);
		total += f.buf.size;
		assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
		frames++;
	}
	assert_true(frames > 1000);
	msgpack_unpacked_destroy(&u);
	proto_reader_free(&r);
	frame_free(&f);
}

static void
test_responses_and_notifications(void **state)
{
	(void)state;
	struct frame f;
	frame_init(&f);
	proto_pack_response_head(&f.pk, 9);
	msgpack_pack_nil(&f.pk);
	msgpack_pack_map(&f.pk, 1);
	proto_pack_kv_bool(&f.pk, "stopping", true);
	proto_pack_error_response(&f.pk, 10, PROTO_E_UNKNOWN_METHOD, "no such method: frobnicate");
	proto_pack_notify_head(&f.pk, PROTO_N_LOG);
	msgpack_pack_array(&f.pk, 1);
	msgpack_pack_map(&f.pk, 2);
	proto_pack_kv_str(&f.pk, "msg", "hello");
	proto_pack_kv_double(&f.pk, "ts", 1.5);

	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	assert_int_equal(proto_reader_feed(&r, f.buf.data, f.buf.size), PROTO_READ_NEED_MORE);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	struct proto_message m;
	char err[128];

	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
	assert_int_equal(proto_parse_message(&u.data, &m, err, sizeof err), 0);
	assert_int_equal(m.type, PROTO_RESPONSE);
	assert_int_equal(m.msgid, 9);
	assert_int_equal(m.error->type, MSGPACK_OBJECT_NIL);
	bool b = false;
	assert_int_equal(proto_get_bool(m.result, "stopping", &b), 1);
	assert_true(b);

	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
	assert_int_equal(proto_parse_message(&u.data, &m, err, sizeof err), 0);
	assert_int_equal(m.msgid, 10);
	char code[64];
	assert_int_equal(proto_get_str(m.error, "code", code, sizeof code), 1);
	assert_string_equal(code, "unknown_method");
	assert_int_equal(m.result->type, MSGPACK_OBJECT_NIL);

	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
	assert_int_equal(proto_parse_message(&u.data, &m, err, sizeof err), 0);
	assert_int_equal(m.type, PROTO_NOTIFY);
	assert_string_equal(m.method, "log");
	char msg[32];
	assert_int_equal(proto_get_str(m.result, "msg", msg, sizeof msg), 1);
	assert_string_equal(msg, "hello");
	double ts = 0;
	assert_int_equal(proto_get_double(m.result, "ts", &ts), 1);
	assert_true(ts == 1.5);

	msgpack_unpacked_destroy(&u);
	proto_reader_free(&r);
	frame_free(&f);
}

/* Feed data in chunks; return the first non-NEED_MORE outcome of feed or next (frames are consumed). */
static int
feed_all(struct proto_reader *r, const char *data, size_t len, size_t chunk, int *frames)
{
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	int rc = PROTO_READ_NEED_MORE;
	for (size_t off = 0; off < len && rc == PROTO_READ_NEED_MORE; off += chunk) {
		size_t n = len - off < chunk ? len - off : chunk;
		rc = proto_reader_feed(r, data + off, n);
		while (rc == PROTO_READ_NEED_MORE && (rc = proto_reader_next(r, &u)) == PROTO_READ_FRAME) {
			(*frames)++;
			rc = PROTO_READ_NEED_MORE;
		}
	}
	msgpack_unpacked_destroy(&u);
	return rc;
}

static void
test_frame_cap(void **state)
{
	(void)state;
	/* a str32 announcing 1 GiB, followed by 1.1 MiB of filler: refused before the filler is all in */
	size_t fill = SPARK_FRAME_MAX + SPARK_FRAME_MAX / 10;
	char *big = malloc(fill + 5);
	assert_non_null(big);
	big[0] = (char)0xdb;
	big[1] = 0x40;
	big[2] = big[3] = big[4] = 0;
	memset(big + 5, 'a', fill);
	for (size_t chunk = 4096; chunk <= 65536; chunk *= 16) {
		struct proto_reader r;
		assert_int_equal(proto_reader_init(&r), 0);
		int frames = 0;
		assert_int_equal(feed_all(&r, big, fill + 5, chunk, &frames), PROTO_READ_TOO_LARGE);
		assert_int_equal(frames, 0);
		proto_reader_free(&r);
	}
	/* the same through bin32 */
	big[0] = (char)0xc6;
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	int frames = 0;
	assert_int_equal(feed_all(&r, big, fill + 5, 65536, &frames), PROTO_READ_TOO_LARGE);
	proto_reader_free(&r);

	/* a complete request just under the cap passes; one just over does not */
	for (int over = 0; over <= 1; over++) {
		struct frame f;
		frame_init(&f);
		size_t n = over ? SPARK_FRAME_MAX + 64 : SPARK_FRAME_MAX - 64;
		proto_pack_request_head(&f.pk, 1, PROTO_M_LOGS);
		msgpack_pack_array(&f.pk, 1);
		msgpack_pack_map(&f.pk, 1);
		proto_pack_key(&f.pk, "worker");
		msgpack_pack_str(&f.pk, n);
		msgpack_pack_str_body(&f.pk, big + 5, n);
		assert_int_equal(proto_reader_init(&r), 0);
		frames = 0;
		int rc = feed_all(&r, f.buf.data, f.buf.size, 65536, &frames);
		if (over) {
			assert_int_equal(rc, PROTO_READ_TOO_LARGE);
			assert_int_equal(frames, 0);
		} else {
			assert_int_equal(rc, PROTO_READ_NEED_MORE);
			assert_int_equal(frames, 1);
		}
		proto_reader_free(&r);
		frame_free(&f);
	}
	free(big);
}

static void
test_huge_container_headers(void **state)
{
	(void)state;
	/*
	 * array32 / map32 headers announcing more elements than a 1 MiB frame can hold (each element takes at least
	 * one byte): an announced frame over the cap, refused at once (proto.h), never a huge allocation.
	 */
	static const unsigned char heads[][5] = {
	    {0xdd, 0x00, 0x20, 0x00, 0x00}, /* array of 2^21 */
	    {0xdd, 0x10, 0x00, 0x00, 0x00}, /* array of 2^28 */
	    {0xdf, 0x10, 0x00, 0x00, 0x00}, /* map of 2^28 */
	    {0xdd, 0xff, 0xff, 0xff, 0xff}, /* array of 2^32-1 */
	};
	for (size_t i = 0; i < sizeof heads / sizeof heads[0]; i++) {
		char buf[5 + 64];
		memcpy(buf, heads[i], 5);
		memset(buf + 5, 0xc0, 64);
		struct proto_reader r;
		assert_int_equal(proto_reader_init(&r), 0);
		int frames = 0;
		int rc = feed_all(&r, buf, sizeof buf, sizeof buf, &frames);
		assert_int_equal(frames, 0);
		if (rc != PROTO_READ_TOO_LARGE)
			fail_msg("header %zu: expected PROTO_READ_TOO_LARGE, got %d", i, rc);
		proto_reader_free(&r);
	}
}

static void
bad_request(const char *desc, void (*pack)(msgpack_packer *))
{
	struct frame f;
	frame_init(&f);
	pack(&f.pk);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	assert_int_equal(msgpack_unpack_next(&u, f.buf.data, f.buf.size, NULL), MSGPACK_UNPACK_SUCCESS);
	struct proto_request req;
	char err[128] = "";
	if (proto_parse_request(&u.data, &req, err, sizeof err) != -1)
		fail_msg("accepted: %s", desc);
	assert_true(err[0] != '\0');
	msgpack_unpacked_destroy(&u);
	frame_free(&f);
}

static void
p_not_array(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 0);
}
static void
p_short(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 3);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	proto_pack_str(pk, "ping");
}
static void
p_type1(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 1);
	msgpack_pack_uint8(pk, 1);
	proto_pack_str(pk, "ping");
	msgpack_pack_array(pk, 0);
}
static void
p_msgid_neg(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_int8(pk, -1);
	proto_pack_str(pk, "ping");
	msgpack_pack_array(pk, 0);
}
static void
p_msgid_big(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint64(pk, 1ull << 40);
	proto_pack_str(pk, "ping");
	msgpack_pack_array(pk, 0);
}
static void
p_msgid_str(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	proto_pack_str(pk, "1");
	proto_pack_str(pk, "ping");
	msgpack_pack_array(pk, 0);
}
static void
p_method_int(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	msgpack_pack_uint8(pk, 7);
	msgpack_pack_array(pk, 0);
}
static void
p_method_long(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	proto_pack_str(pk, "a_method_name_that_is_far_too_long_to_be_real");
	msgpack_pack_array(pk, 0);
}
static void
p_method_nul(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	msgpack_pack_str(pk, 6);
	msgpack_pack_str_body(pk, "ping\0x", 6);
	msgpack_pack_array(pk, 0);
}
static void
p_params_scalar(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	proto_pack_str(pk, "ping");
	msgpack_pack_uint8(pk, 3);
}
static void
p_params_two(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	proto_pack_str(pk, "ping");
	msgpack_pack_array(pk, 2);
	msgpack_pack_map(pk, 0);
	msgpack_pack_map(pk, 0);
}
static void
p_params_str(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, 0);
	msgpack_pack_uint8(pk, 1);
	proto_pack_str(pk, "ping");
	msgpack_pack_array(pk, 1);
	proto_pack_str(pk, "verbose");
}

static void
test_bad_requests(void **state)
{
	(void)state;
	bad_request("a map", p_not_array);
	bad_request("3 elements", p_short);
	bad_request("type 1", p_type1);
	bad_request("negative msgid", p_msgid_neg);
	bad_request("msgid over 32 bits", p_msgid_big);
	bad_request("string msgid", p_msgid_str);
	bad_request("integer method", p_method_int);
	bad_request("method too long", p_method_long);
	bad_request("method with NUL", p_method_nul);
	bad_request("scalar params", p_params_scalar);
	bad_request("two params", p_params_two);
	bad_request("string param", p_params_str);
}

static void
test_params_forms(void **state)
{
	(void)state;
	/* [], [nil] and a bare map are all fine */
	for (int form = 0; form < 3; form++) {
		struct frame f;
		frame_init(&f);
		proto_pack_request_head(&f.pk, 5, PROTO_M_PING);
		if (form == 0) {
			msgpack_pack_array(&f.pk, 0);
		} else if (form == 1) {
			msgpack_pack_array(&f.pk, 1);
			msgpack_pack_nil(&f.pk);
		} else {
			msgpack_pack_map(&f.pk, 1);
			proto_pack_kv_bool(&f.pk, "verbose", true);
		}
		msgpack_unpacked u;
		msgpack_unpacked_init(&u);
		assert_int_equal(msgpack_unpack_next(&u, f.buf.data, f.buf.size, NULL), MSGPACK_UNPACK_SUCCESS);
		struct proto_request req;
		char err[128];
		assert_int_equal(proto_parse_request(&u.data, &req, err, sizeof err), 0);
		assert_string_equal(req.method, "ping");
		if (form < 2)
			assert_null(req.params);
		else
			assert_non_null(req.params);
		msgpack_unpacked_destroy(&u);
		frame_free(&f);
	}
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t
rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)rng;
}

/* Run everything a server would run on whatever comes out of the reader. */
static void
exercise(const char *data, size_t len, size_t chunk)
{
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	for (size_t off = 0; off < len; off += chunk) {
		size_t n = len - off < chunk ? len - off : chunk;
		if (proto_reader_feed(&r, data + off, n) != PROTO_READ_NEED_MORE)
			break;
		int rc;
		while ((rc = proto_reader_next(&r, &u)) == PROTO_READ_FRAME) {
			struct proto_request req;
			struct proto_message m;
			char err[128], s[64];
			bool b;
			int64_t i;
			double d;
			if (proto_parse_request(&u.data, &req, err, sizeof err) == 0 && req.params != NULL) {
				proto_get_bool(req.params, "verbose", &b);
				proto_get_int(req.params, "lines", &i);
				proto_get_double(req.params, "timeout_s", &d);
				proto_get_str(req.params, "level", s, sizeof s);
			}
			proto_parse_message(&u.data, &m, err, sizeof err);
		}
		if (rc != PROTO_READ_NEED_MORE)
			break;
	}
	msgpack_unpacked_destroy(&u);
	proto_reader_free(&r);
}

static void
test_random_input_never_crashes(void **state)
{
	(void)state;
	char buf[4096];
	for (int iter = 0; iter < 3000; iter++) {
		size_t len = 1 + rnd() % sizeof buf;
		for (size_t i = 0; i < len; i++)
			buf[i] = (char)rnd();
		exercise(buf, len, 1 + rnd() % 512);
	}
	/* mutations of valid frames reach deeper */
	struct frame f;
	frame_init(&f);
	for (uint32_t id = 0; id < 4; id++)
		pack_status_request(&f, id);
	for (int iter = 0; iter < 20000; iter++) {
		size_t len = f.buf.size;
		memcpy(buf, f.buf.data, len);
		int flips = 1 + (int)(rnd() % 4);
		for (int k = 0; k < flips; k++)
			buf[rnd() % len] = (char)rnd();
		if (rnd() % 4 == 0)
			len = rnd() % len + 1;
		exercise(buf, len, 1 + rnd() % 64);
	}
	frame_free(&f);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_request_round_trip),
	    cmocka_unit_test(test_byte_by_byte_and_back_to_back),
	    cmocka_unit_test(test_long_connection_is_not_capped),
	    cmocka_unit_test(test_responses_and_notifications),
	    cmocka_unit_test(test_frame_cap),
	    cmocka_unit_test(test_huge_container_headers),
	    cmocka_unit_test(test_bad_requests),
	    cmocka_unit_test(test_params_forms),
	    cmocka_unit_test(test_random_input_never_crashes),
	};
	return cmocka_run_group_tests_name("proto", tests, NULL, NULL);
}

/* The control reader's memory budget: a cap on the values of a frame, counted as headers announce them, buffers
 * given back between frames, and params checked against the names a method knows. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

static const unsigned char head[] = {0x94, 0x00, 0x01, 0xa6, 's', 't', 'a', 't', 'u', 's', 0x91};

static void
test_announced_values_are_capped(void **state)
{
	(void)state;
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	r.scan.values_max = PROTO_REQUEST_VALUES_MAX;
	assert_int_equal(proto_reader_feed(&r, head, sizeof head), PROTO_READ_NEED_MORE);
	/* a map32 announcing 524,000 pairs: refused at its header, before msgpack-c allocates a slot */
	unsigned char map[5] = {0xdf, 0x00, 0x07, 0xfe, 0x20};
	assert_int_equal(proto_reader_feed(&r, map, sizeof map), PROTO_READ_TOO_MANY);
	proto_reader_free(&r);

	/* the same values in many small containers are counted too */
	assert_int_equal(proto_reader_init(&r), 0);
	r.scan.values_max = 64;
	unsigned char small[] = {0x94, 0x00, 0x01, 0xa1, 'x', 0x9f};
	assert_int_equal(proto_reader_feed(&r, small, sizeof small), PROTO_READ_NEED_MORE);
	int rc = PROTO_READ_NEED_MORE;
	for (int i = 0; i < 15 && rc == PROTO_READ_NEED_MORE; i++) {
		unsigned char inner[] = {0x94, 0xc0, 0xc0, 0xc0, 0xc0};
		rc = proto_reader_feed(&r, inner, sizeof inner);
	}
	assert_int_equal(rc, PROTO_READ_TOO_MANY);
	proto_reader_free(&r);
}

static void
test_values_count_per_frame(void **state)
{
	(void)state;
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	r.scan.values_max = 16;
	/* [0, 1, "ping", []] is 5 values: a hundred of them back to back never add up */
	unsigned char ping[] = {0x94, 0x00, 0x01, 0xa4, 'p', 'i', 'n', 'g', 0x90};
	for (int i = 0; i < 100; i++) {
		assert_int_equal(proto_reader_feed(&r, ping, sizeof ping), PROTO_READ_NEED_MORE);
		msgpack_unpacked u;
		msgpack_unpacked_init(&u);
		assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
		msgpack_unpacked_destroy(&u);
	}
	proto_reader_free(&r);
}

static void
test_big_frame_buffer_is_given_back(void **state)
{
	(void)state;
	struct proto_reader r;
	assert_int_equal(proto_reader_init(&r), 0);
	r.scan.values_max = PROTO_REQUEST_VALUES_MAX;
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_request_head(&pk, 1, PROTO_M_STATUS);
	msgpack_pack_array(&pk, 1);
	msgpack_pack_map(&pk, 1);
	proto_pack_key(&pk, PROTO_P_VERBOSE);
	size_t n = 900 * 1024;
	char *big = calloc(1, n);
	msgpack_pack_str(&pk, n);
	msgpack_pack_str_body(&pk, big, n);
	free(big);
	assert_int_equal(proto_reader_feed(&r, sb.data, sb.size), PROTO_READ_NEED_MORE);
	assert_true(proto_reader_held(&r) >= sb.size);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_FRAME);
	msgpack_unpacked_destroy(&u);
	assert_int_equal(proto_reader_next(&r, &u), PROTO_READ_NEED_MORE);
	proto_reader_shrink(&r);
	assert_true(proto_reader_held(&r) <= 64 * 1024);
	assert_int_equal(r.scan.values_max, PROTO_REQUEST_VALUES_MAX);
	msgpack_sbuffer_destroy(&sb);
	proto_reader_free(&r);
}

static void
test_check_params(void **state)
{
	(void)state;
	static const char *const known[] = {PROTO_P_FORCE, PROTO_P_TIMEOUT_S, NULL};
	char err[128];
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 2 + PROTO_PARAMS_UNKNOWN_MAX + 1);
	proto_pack_kv_bool(&pk, PROTO_P_FORCE, true);
	proto_pack_kv_int(&pk, PROTO_P_TIMEOUT_S, 3);
	for (int i = 0; i <= PROTO_PARAMS_UNKNOWN_MAX; i++) {
		char k[16];
		snprintf(k, sizeof k, "new%d", i);
		proto_pack_kv_int(&pk, k, i);
	}
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	assert_int_equal(msgpack_unpack_next(&u, sb.data, sb.size, NULL), MSGPACK_UNPACK_SUCCESS);
	assert_int_equal(proto_check_params(&u.data, known, err, sizeof err), -1);
	assert_non_null(strstr(err, "does not know"));
	/* one fewer unknown name: accepted */
	u.data.via.map.size--;
	assert_int_equal(proto_check_params(&u.data, known, err, sizeof err), 0);
	/* a key that is not a string */
	u.data.via.map.ptr[0].key.type = MSGPACK_OBJECT_POSITIVE_INTEGER;
	assert_int_equal(proto_check_params(&u.data, known, err, sizeof err), -1);
	assert_int_equal(proto_check_params(NULL, known, err, sizeof err), 0);
	msgpack_unpacked_destroy(&u);
	msgpack_sbuffer_destroy(&sb);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_announced_values_are_capped),
	    cmocka_unit_test(test_values_count_per_frame),
	    cmocka_unit_test(test_big_frame_buffer_is_given_back),
	    cmocka_unit_test(test_check_params),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

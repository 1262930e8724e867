#include "proto.h"

#include <stdio.h>
#include <string.h>

#define PROTO_READER_INITIAL (4 * 1024)
#define PROTO_READER_KEEP    (64 * 1024)

int
proto_reader_init(struct proto_reader *r)
{
	memset(&r->scan, 0, sizeof r->scan);
	/* small: it grows by doubling for the rare big frame, and hundreds of idle connections each hold one */
	r->init = msgpack_unpacker_init(&r->unp, PROTO_READER_INITIAL);
	return r->init ? 0 : -1;
}

size_t
proto_reader_held(const struct proto_reader *r)
{
	return r->init ? r->unp.used + r->unp.free : 0;
}

void
proto_reader_shrink(struct proto_reader *r)
{
	if (!r->init || proto_reader_held(r) <= PROTO_READER_KEEP || msgpack_unpacker_message_size(&r->unp) > 0)
		return;
	uint64_t values_max = r->scan.values_max;
	proto_reader_free(r);
	proto_reader_init(r);
	r->scan.values_max = values_max;
}

static uint64_t
be_uint(const unsigned char *p, unsigned n)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

/* One complete value: close every container it completes; a frame ends when none is left open. */
static void
scan_value_done(struct proto_scan *s)
{
	while (s->depth > 0) {
		if (--s->left[s->depth - 1] > 0)
			return;
		s->depth--;
	}
	s->frame_bytes = 0;
	s->values = 0;
}

/* Act on a complete type header (type byte + its length bytes). */
static int
scan_header(struct proto_scan *s, const unsigned char *h)
{
	unsigned char b = h[0];
	uint64_t room = SPARK_FRAME_MAX - (s->frame_bytes < SPARK_FRAME_MAX ? s->frame_bytes : SPARK_FRAME_MAX);
	uint64_t n = 0;
	bool container = false, payload = false;

	if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
		scan_value_done(s);
		return PROTO_READ_NEED_MORE;
	}
	if (b == 0xc1)
		return PROTO_READ_BAD;
	if (b >= 0x80 && b <= 0x8f) {
		n = 2ULL * (b & 0x0f);
		container = true;
	} else if (b >= 0x90 && b <= 0x9f) {
		n = b & 0x0f;
		container = true;
	} else if (b >= 0xa0 && b <= 0xbf) {
		n = b & 0x1f;
		payload = true;
	} else {
		switch (b) {
		case 0xc4:
		case 0xd9:
			n = h[1];
			payload = true;
			break;
		case 0xc5:
		case 0xda:
			n = be_uint(h + 1, 2);
			payload = true;
			break;
		case 0xc6:
		case 0xdb:
			n = be_uint(h + 1, 4);
			payload = true;
			break;
		case 0xc7:
			n = h[1] + 1ULL;
			payload = true;
			break;
		case 0xc8:
			n = be_uint(h + 1, 2) + 1;
			payload = true;
			break;
		case 0xc9:
			n = be_uint(h + 1, 4) + 1;
			payload = true;
			break;
		case 0xca:
			n = 4;
			payload = true;
			break;
		case 0xcb:
			n = 8;
			payload = true;
			break;
		case 0xcc:
		case 0xd0:
			n = 1;
			payload = true;
			break;
		case 0xcd:
		case 0xd1:
			n = 2;
			payload = true;
			break;
		case 0xce:
		case 0xd2:
			n = 4;
			payload = true;
			break;
		case 0xcf:
		case 0xd3:
			n = 8;
			payload = true;
			break;
		case 0xd4:
			n = 2;
			payload = true;
			break;
		case 0xd5:
			n = 3;
			payload = true;
			break;
		case 0xd6:
			n = 5;
			payload = true;
			break;
		case 0xd7:
			n = 9;
			payload = true;
			break;
		case 0xd8:
			n = 17;
			payload = true;
			break;
		case 0xdc:
			n = be_uint(h + 1, 2);
			container = true;
			break;
		case 0xdd:
			n = be_uint(h + 1, 4);
			container = true;
			break;
		case 0xde:
			n = 2 * be_uint(h + 1, 2);
			container = true;
			break;
		case 0xdf:
			n = 2 * be_uint(h + 1, 4);
			container = true;
			break;
		default:
			return PROTO_READ_BAD;
		}
	}
	/* every item takes at least one byte: more than fits is an oversized frame, refused now */
	if (n > room)
		return PROTO_READ_TOO_LARGE;
	/* a container's slots are allocated when msgpack-c reads its header: count them now */
	s->values += container ? n : 0;
	if (s->depth == 0)
		s->values++;
	if (s->values_max > 0 && s->values > s->values_max)
		return PROTO_READ_TOO_MANY;
	if (payload) {
		s->skip = n;
		if (n == 0)
			scan_value_done(s);
		return PROTO_READ_NEED_MORE;
	}
	(void)container;
	if (n == 0) {
		scan_value_done(s);
		return PROTO_READ_NEED_MORE;
	}
	if (s->depth >= PROTO_SCAN_DEPTH)
		return PROTO_READ_BAD;
	s->left[s->depth++] = n;
	return PROTO_READ_NEED_MORE;
}

static unsigned
scan_header_len(unsigned char b)
{
	switch (b) {
	case 0xc4:
	case 0xc7:
	case 0xd9:
		return 2;
	case 0xc5:
	case 0xc8:
	case 0xda:
	case 0xdc:
	case 0xde:
		return 3;
	case 0xc6:
	case 0xc9:
	case 0xdb:
	case 0xdd:
	case 0xdf:
		return 5;
	default:
		return 1;
	}
}

int
proto_scan_feed(struct proto_scan *s, const unsigned char *p, size_t len)
{
	size_t i = 0;
	while (i < len) {
		if (s->skip > 0) {
			size_t n = len - i < s->skip ? len - i : (size_t)s->skip;
			s->skip -= n;
			s->frame_bytes += n;
			i += n;
			if (s->skip == 0)
				scan_value_done(s);
			continue;
		}
		if (s->hdr_have == 0)
			s->hdr_need = scan_header_len(p[i]);
		s->hdr[s->hdr_have++] = p[i++];
		s->frame_bytes++;
		if (s->frame_bytes > SPARK_FRAME_MAX)
			return PROTO_READ_TOO_LARGE;
		if (s->hdr_have < s->hdr_need)
			continue;
		s->hdr_have = 0;
		int rc = scan_header(s, s->hdr);
		if (rc != PROTO_READ_NEED_MORE)
			return rc;
	}
	if (s->frame_bytes > SPARK_FRAME_MAX)
		return PROTO_READ_TOO_LARGE;
	return PROTO_READ_NEED_MORE;
}

void
proto_reader_free(struct proto_reader *r)
{
	if (r->init)
		msgpack_unpacker_destroy(&r->unp);
	r->init = false;
}

int
proto_reader_feed(struct proto_reader *r, const void *data, size_t len)
{
	int rc = proto_scan_feed(&r->scan, data, len);
	if (rc != PROTO_READ_NEED_MORE)
		return rc;
	/* bytes held but not yet returned as complete objects: a peer that pipelines faster than it is served */
	if (msgpack_unpacker_message_size(&r->unp) + len > 4 * (size_t)SPARK_FRAME_MAX)
		return PROTO_READ_TOO_LARGE;
	if (msgpack_unpacker_buffer_capacity(&r->unp) < len && !msgpack_unpacker_reserve_buffer(&r->unp, len))
		return PROTO_READ_BAD;
	memcpy(msgpack_unpacker_buffer(&r->unp), data, len);
	msgpack_unpacker_buffer_consumed(&r->unp, len);
	return PROTO_READ_NEED_MORE;
}

int
proto_reader_next(struct proto_reader *r, msgpack_unpacked *out)
{
	msgpack_unpack_return ret = msgpack_unpacker_next(&r->unp, out);
	switch (ret) {
	case MSGPACK_UNPACK_SUCCESS:
		return PROTO_READ_FRAME;
	case MSGPACK_UNPACK_CONTINUE:
		return PROTO_READ_NEED_MORE;
	case MSGPACK_UNPACK_NOMEM_ERROR:
		return PROTO_READ_TOO_LARGE;
	default:
		return PROTO_READ_BAD;
	}
}

static int
obj_str(const msgpack_object *o, char *buf, size_t len)
{
	if (o->type != MSGPACK_OBJECT_STR && o->type != MSGPACK_OBJECT_BIN)
		return -1;
	size_t n = o->type == MSGPACK_OBJECT_STR ? o->via.str.size : o->via.bin.size;
	const char *p = o->type == MSGPACK_OBJECT_STR ? o->via.str.ptr : o->via.bin.ptr;
	/* an empty string may come with a NULL pointer: never hand that to memchr/memcpy */
	if (n >= len || (n > 0 && memchr(p, '\0', n) != NULL))
		return -1;
	if (n > 0)
		memcpy(buf, p, n);
	buf[n] = '\0';
	return 0;
}

int
proto_parse_request(const msgpack_object *o, struct proto_request *req, char *err, size_t errlen)
{
	memset(req, 0, sizeof *req);
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 4) {
		snprintf(err, errlen, "a request is [0, msgid, method, [params]]");
		return -1;
	}
	const msgpack_object *a = o->via.array.ptr;
	if (a[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[0].via.u64 != PROTO_REQUEST) {
		snprintf(err, errlen, "expected a request (type 0)");
		return -1;
	}
	if (a[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[1].via.u64 > UINT32_MAX) {
		snprintf(err, errlen, "msgid must be an unsigned 32-bit integer");
		return -1;
	}
	req->msgid = (uint32_t)a[1].via.u64;
	if (obj_str(&a[2], req->method, sizeof req->method) < 0) {
		snprintf(err, errlen, "method must be a short string");
		return -1;
	}
	if (a[3].type == MSGPACK_OBJECT_NIL)
		return 0;
	if (a[3].type == MSGPACK_OBJECT_MAP) {
		/* tolerate a bare map as params */
		req->params = &a[3];
		return 0;
	}
	if (a[3].type != MSGPACK_OBJECT_ARRAY) {
		snprintf(err, errlen, "params must be an array holding one map");
		return -1;
	}
	if (a[3].via.array.size == 0)
		return 0;
	const msgpack_object *p = &a[3].via.array.ptr[0];
	if (a[3].via.array.size > 1 || (p->type != MSGPACK_OBJECT_MAP && p->type != MSGPACK_OBJECT_NIL)) {
		snprintf(err, errlen, "params must be an array holding one map");
		return -1;
	}
	req->params = p->type == MSGPACK_OBJECT_MAP ? p : NULL;
	return 0;
}

int
proto_check_params(const msgpack_object *params, const char *const *known, char *err, size_t errlen)
{
	if (params == NULL)
		return 0;
	uint32_t unknown = 0;
	for (uint32_t i = 0; i < params->via.map.size; i++) {
		const msgpack_object *k = &params->via.map.ptr[i].key;
		if (k->type != MSGPACK_OBJECT_STR) {
			snprintf(err, errlen, "parameter names must be strings");
			return -1;
		}
		bool found = false;
		for (const char *const *n = known; *n != NULL && !found; n++)
			found = strlen(*n) == k->via.str.size && memcmp(*n, k->via.str.ptr, k->via.str.size) == 0;
		if (!found && ++unknown > PROTO_PARAMS_UNKNOWN_MAX) {
			snprintf(err, errlen, "more than %d parameters this method does not know",
			         PROTO_PARAMS_UNKNOWN_MAX);
			return -1;
		}
	}
	return 0;
}

int
proto_parse_message(const msgpack_object *o, struct proto_message *m, char *err, size_t errlen)
{
	memset(m, 0, sizeof *m);
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 3) {
		snprintf(err, errlen, "not a msgpack-RPC message");
		return -1;
	}
	const msgpack_object *a = o->via.array.ptr;
	if (a[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
		snprintf(err, errlen, "bad message type");
		return -1;
	}
	m->type = (int)a[0].via.u64;
	if (m->type == PROTO_RESPONSE && o->via.array.size == 4) {
		if (a[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
			snprintf(err, errlen, "bad msgid");
			return -1;
		}
		m->msgid = (uint32_t)a[1].via.u64;
		m->error = &a[2];
		m->result = &a[3];
		return 0;
	}
	if (m->type == PROTO_NOTIFY && o->via.array.size == 3) {
		if (obj_str(&a[1], m->method, sizeof m->method) < 0) {
			snprintf(err, errlen, "bad notification method");
			return -1;
		}
		if (a[2].type == MSGPACK_OBJECT_ARRAY && a[2].via.array.size > 0)
			m->result = &a[2].via.array.ptr[0];
		return 0;
	}
	snprintf(err, errlen, "unexpected message type %d", m->type);
	return -1;
}

const msgpack_object *
proto_map_get(const msgpack_object *map, const char *key)
{
	if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
		return NULL;
	size_t kl = strlen(key);
	for (uint32_t i = 0; i < map->via.map.size; i++) {
		const msgpack_object *k = &map->via.map.ptr[i].key;
		if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl && memcmp(k->via.str.ptr, key, kl) == 0)
			return &map->via.map.ptr[i].val;
	}
	return NULL;
}

int
proto_get_bool(const msgpack_object *map, const char *key, bool *out)
{
	const msgpack_object *v = proto_map_get(map, key);
	if (v == NULL || v->type == MSGPACK_OBJECT_NIL)
		return 0;
	if (v->type != MSGPACK_OBJECT_BOOLEAN)
		return -1;
	*out = v->via.boolean;
	return 1;
}

int
proto_get_int(const msgpack_object *map, const char *key, int64_t *out)
{
	const msgpack_object *v = proto_map_get(map, key);
	if (v == NULL || v->type == MSGPACK_OBJECT_NIL)
		return 0;
	if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		if (v->via.u64 > INT64_MAX)
			return -1;
		*out = (int64_t)v->via.u64;
		return 1;
	}
	if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
		*out = v->via.i64;
		return 1;
	}
	return -1;
}

int
proto_get_double(const msgpack_object *map, const char *key, double *out)
{
	const msgpack_object *v = proto_map_get(map, key);
	if (v == NULL || v->type == MSGPACK_OBJECT_NIL)
		return 0;
	switch (v->type) {
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		*out = v->via.f64;
		return 1;
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		*out = (double)v->via.u64;
		return 1;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		*out = (double)v->via.i64;
		return 1;
	default:
		return -1;
	}
}

int
proto_get_str(const msgpack_object *map, const char *key, char *buf, size_t len)
{
	const msgpack_object *v = proto_map_get(map, key);
	if (v == NULL || v->type == MSGPACK_OBJECT_NIL)
		return 0;
	return obj_str(v, buf, len) < 0 ? -1 : 1;
}

void
proto_pack_str(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);
	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s, n);
}

void
proto_pack_key(msgpack_packer *pk, const char *k)
{
	proto_pack_str(pk, k);
}

void
proto_pack_kv_str(msgpack_packer *pk, const char *k, const char *v)
{
	proto_pack_str(pk, k);
	if (v == NULL)
		msgpack_pack_nil(pk);
	else
		proto_pack_str(pk, v);
}

void
proto_pack_kv_int(msgpack_packer *pk, const char *k, int64_t v)
{
	proto_pack_str(pk, k);
	msgpack_pack_int64(pk, v);
}

void
proto_pack_kv_double(msgpack_packer *pk, const char *k, double v)
{
	proto_pack_str(pk, k);
	msgpack_pack_double(pk, v);
}

void
proto_pack_kv_bool(msgpack_packer *pk, const char *k, bool v)
{
	proto_pack_str(pk, k);
	if (v)
		msgpack_pack_true(pk);
	else
		msgpack_pack_false(pk);
}

void
proto_pack_request_head(msgpack_packer *pk, uint32_t msgid, const char *method)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, PROTO_REQUEST);
	msgpack_pack_uint32(pk, msgid);
	proto_pack_str(pk, method);
}

void
proto_pack_response_head(msgpack_packer *pk, uint32_t msgid)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, PROTO_RESPONSE);
	msgpack_pack_uint32(pk, msgid);
}

void
proto_pack_result_head(msgpack_packer *pk, uint32_t msgid)
{
	proto_pack_response_head(pk, msgid);
	msgpack_pack_nil(pk);
}

void
proto_pack_error_response(msgpack_packer *pk, uint32_t msgid, const char *code, const char *message)
{
	proto_pack_response_head(pk, msgid);
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_ERROR_FIELDS));
	proto_pack_kv_str(pk, PROTO_F_CODE, code);
	proto_pack_kv_str(pk, PROTO_F_MESSAGE, message);
	msgpack_pack_nil(pk);
}

void
proto_pack_notify_head(msgpack_packer *pk, const char *method)
{
	msgpack_pack_array(pk, 3);
	msgpack_pack_uint8(pk, PROTO_NOTIFY);
	proto_pack_str(pk, method);
}

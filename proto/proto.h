/*
 * The control protocol between sparkd and its clients (DESIGN §4): msgpack-RPC over a Unix stream socket.
 *
 *   request       [0, msgid, method, [params-map]]
 *   response      [1, msgid, error, result]      error = nil or {"code": str, "message": str}
 *   notification  [2, method, [payload]]
 *
 * Every wire name lives here. Bump SPARK_PROTOCOL_VERSION when a method or field changes meaning;
 * adding fields or methods does not change it. Never reuse a name for something else.
 */
#ifndef SPARK_PROTO_H
#define SPARK_PROTO_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SPARK_PROTOCOL_VERSION 1
#define SPARK_FRAME_MAX        (1024 * 1024)

/* message types */
#define PROTO_REQUEST  0
#define PROTO_RESPONSE 1
#define PROTO_NOTIFY   2

/* methods, protocol 1 */
#define PROTO_M_PING   "ping"
#define PROTO_M_STATUS "status"
#define PROTO_M_LOGS   "logs"
#define PROTO_M_STOP   "stop"

/* notifications, protocol 1 */
#define PROTO_N_LOG     "log"
#define PROTO_N_DROPPED "dropped" /* also carried as {"dropped": N} in a "log" notification */

/* error codes, protocol 1 */
#define PROTO_E_UNKNOWN_METHOD  "unknown_method"
#define PROTO_E_BAD_REQUEST     "bad_request"
#define PROTO_E_BAD_PARAMS      "bad_params"
#define PROTO_E_FRAME_TOO_LARGE "frame_too_large"
#define PROTO_E_PERMISSION      "permission_denied"
#define PROTO_E_STOPPING        "stopping"
#define PROTO_E_INTERNAL        "internal"
#define PROTO_E_TOO_MANY        "too_many_connections"
#define PROTO_E_TIMED_OUT       "timed_out"

/*
 * Incremental frame reader over msgpack-c's streaming unpacker, with the 1 MiB cap.
 * msgpack-c has no limits of its own: it allocates an array32's object slots as soon as it reads the header,
 * and waits patiently for a str32 announcing 1 GiB. So the bytes pass a small structural scan first (type
 * headers only, no values decoded) that refuses, as soon as it is announced, any container or string that
 * cannot fit in what is left of a 1 MiB frame.
 */
#define PROTO_SCAN_DEPTH 32
struct proto_scan {
	size_t frame_bytes;   /* bytes of the current frame seen so far */
	uint64_t skip;        /* payload bytes still to pass over */
	unsigned char hdr[5]; /* a header split across reads */
	unsigned hdr_have, hdr_need;
	uint64_t left[PROTO_SCAN_DEPTH]; /* items still expected per open container */
	int depth;
};

struct proto_reader {
	msgpack_unpacker unp;
	struct proto_scan scan;
	bool init;
};

/* The structural scan alone (exposed for tests): PROTO_READ_NEED_MORE, _BAD or _TOO_LARGE. */
int proto_scan_feed(struct proto_scan *s, const unsigned char *p, size_t len);

enum proto_read {
	PROTO_READ_NEED_MORE = 0,
	PROTO_READ_FRAME = 1,
	PROTO_READ_BAD = -1,       /* not msgpack */
	PROTO_READ_TOO_LARGE = -2, /* a frame over SPARK_FRAME_MAX, complete or announced */
};

int proto_reader_init(struct proto_reader *r);
void proto_reader_free(struct proto_reader *r);
/* Append bytes. Returns PROTO_READ_TOO_LARGE when the unparsed backlog exceeds the cap. */
int proto_reader_feed(struct proto_reader *r, const void *data, size_t len);
/* Next complete object into *out (caller msgpack_unpacked_destroy()s it). */
int proto_reader_next(struct proto_reader *r, msgpack_unpacked *out);

/* A decoded request. Pointers refer into the msgpack object. */
struct proto_request {
	uint32_t msgid;
	char method[32];
	const msgpack_object *params; /* a map, or NULL when [] or missing */
};

/* Validate shape [0, msgid, method, [map?]]. Returns 0, or -1 with a reason in err. */
int proto_parse_request(const msgpack_object *o, struct proto_request *req, char *err, size_t errlen);

/* Same for responses and notifications (used by clients). */
struct proto_message {
	int type;
	uint32_t msgid;
	char method[32];
	const msgpack_object *error;  /* response: nil or map */
	const msgpack_object *result; /* response result, or notification payload (first element) */
};
int proto_parse_message(const msgpack_object *o, struct proto_message *m, char *err, size_t errlen);

/* Map lookup helpers. Return NULL / fallback when absent; type errors are reported with -1. */
const msgpack_object *proto_map_get(const msgpack_object *map, const char *key);
/* 1 = found and well typed, 0 = absent or nil, -1 = wrong type */
int proto_get_bool(const msgpack_object *map, const char *key, bool *out);
int proto_get_int(const msgpack_object *map, const char *key, int64_t *out);
int proto_get_double(const msgpack_object *map, const char *key, double *out);
/* copies into buf; -1 on wrong type or too long */
int proto_get_str(const msgpack_object *map, const char *key, char *buf, size_t len);

/* Packing helpers over msgpack_packer. */
void proto_pack_str(msgpack_packer *pk, const char *s);
void proto_pack_kv_str(msgpack_packer *pk, const char *k, const char *v); /* v NULL -> nil */
void proto_pack_kv_int(msgpack_packer *pk, const char *k, int64_t v);
void proto_pack_kv_double(msgpack_packer *pk, const char *k, double v);
void proto_pack_kv_bool(msgpack_packer *pk, const char *k, bool v);
void proto_pack_key(msgpack_packer *pk, const char *k);

/* Start frames; the caller then packs the params map / result / payload. */
void proto_pack_request_head(msgpack_packer *pk, uint32_t msgid, const char *method); /* then pack [map] */
void proto_pack_response_head(msgpack_packer *pk, uint32_t msgid);
/* [1, msgid, nil, ...: the head of a successful response; the caller then packs the result. */
void proto_pack_result_head(msgpack_packer *pk, uint32_t msgid); /* then pack nil error + result */
void proto_pack_error_response(msgpack_packer *pk, uint32_t msgid, const char *code, const char *message);
void proto_pack_notify_head(msgpack_packer *pk, const char *method); /* then pack [payload] */

#endif

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

/* field names of results and notifications, with each map's list */
#include "fields.h"

/* request parameters, protocol 1 */
#define PROTO_P_VERBOSE   "verbose"   /* status */
#define PROTO_P_LINES     "lines"     /* logs */
#define PROTO_P_FOLLOW    "follow"    /* logs */
#define PROTO_P_LEVEL     "level"     /* logs */
#define PROTO_P_WORKER    "worker"    /* logs */
#define PROTO_P_FORCE     "force"     /* stop */
#define PROTO_P_TIMEOUT_S "timeout_s" /* stop */

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
#define PROTO_E_OVERLOADED      "overloaded"

/*
 * Incremental frame reader over msgpack-c's streaming unpacker, with the 1 MiB cap.
 * msgpack-c has no limits of its own: it allocates an array32's object slots as soon as it reads the header,
 * and waits patiently for a str32 announcing 1 GiB. So the bytes pass a small structural scan first (type
 * headers only, no values decoded) that refuses, as soon as it is announced, any container or string that
 * cannot fit in what is left of a 1 MiB frame.
 *
 * Decoded, every value costs a msgpack_object (24 bytes) however small on the wire: a map of nil:nil pairs
 * decodes to 24 times its size, and msgpack-c allocates a container's slots when it reads the header. So a reader
 * may also cap the values of a frame, counted as the scan announces them: sparkd's requests get
 * PROTO_REQUEST_VALUES_MAX (their decoded size is then at most the frame's bytes, which strings reference in
 * place, plus 24 bytes a value); replies read by clients have no such cap.
 */
#define PROTO_SCAN_DEPTH         32
#define PROTO_REQUEST_VALUES_MAX 1024
struct proto_scan {
	size_t frame_bytes;   /* bytes of the current frame seen so far */
	uint64_t values;      /* values of the current frame announced so far */
	uint64_t values_max;  /* 0 = no cap */
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
	PROTO_READ_TOO_MANY = -3,  /* more values than the reader's values_max */
};

int proto_reader_init(struct proto_reader *r);
void proto_reader_free(struct proto_reader *r);
/* Bytes the reader holds in its buffer (what a frame being read costs before it is decoded). */
size_t proto_reader_held(const struct proto_reader *r);
/* Between frames: give a buffer grown past 64 KiB back, so one big frame does not cost its size for ever. */
void proto_reader_shrink(struct proto_reader *r);
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

/*
 * Params against the names a method knows (NULL-terminated): every key a string, and at most
 * PROTO_PARAMS_UNKNOWN_MAX names it does not know (a newer client's additions are ignored, a heap of them is not
 * a request). Returns 0, or -1 with the reason in err.
 */
#define PROTO_PARAMS_UNKNOWN_MAX 8
int proto_check_params(const msgpack_object *params, const char *const *known, char *err, size_t errlen);

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

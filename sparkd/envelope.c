/*
 * kombu envelopes on Redis (reference §1.3, §5.3, §5.4, §5.6): a JSON object around a base64 body. The base64
 * and the uuid4 are common/codec.c (one definition for the worker and sparkd).
 */
#include <stdlib.h>
#include <string.h>

#include "celery.h"
#include "codec.h"

json_t *
envelope_body(json_t *env, json_t **headers)
{
	if (!json_is_object(env))
		return NULL;
	json_t *h = json_object_get(env, "headers");
	*headers = json_is_object(h) ? h : NULL;
	json_t *body = json_object_get(env, "body");
	if (!json_is_string(body))
		return NULL;
	const char *enc = json_string_value(json_object_get(json_object_get(env, "properties"), "body_encoding"));
	const char *text = json_string_value(body);
	size_t len = json_string_length(body);
	json_error_t err;
	if (enc == NULL || strcmp(enc, "base64") != 0)
		return json_loadb(text, len, JSON_DECODE_ANY, &err);
	size_t n;
	unsigned char *raw = b64_decode(text, len, &n);
	if (raw == NULL)
		return NULL;
	json_t *v = json_loadb((const char *)raw, n, JSON_DECODE_ANY, &err);
	free(raw);
	return v;
}

char *
envelope_build(json_t *body, json_t *headers, const char *exchange, const char *rk)
{
	char *text = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
	json_decref(body);
	if (text == NULL) {
		json_decref(headers);
		return NULL;
	}
	char *b64 = b64_encode((const unsigned char *)text, strlen(text));
	free(text);
	char tag[37];
	uuid4_string(tag);
	/* delivery_tag is required: a Python client reads it unconditionally (reference §5.4) */
	json_t *env = json_pack("{s:s, s:s, s:s, s:o, s:{s:i, s:{s:s, s:s}, s:i, s:s, s:s}}", "body", b64,
	                        "content-encoding", "utf-8", "content-type", "application/json", "headers", headers,
	                        "properties", "delivery_mode", 1, "delivery_info", "exchange", exchange, "routing_key",
	                        rk, "priority", 0, "body_encoding", "base64", "delivery_tag", tag);
	free(b64);
	if (env == NULL)
		return NULL;
	char *out = json_dumps(env, JSON_COMPACT);
	json_decref(env);
	return out;
}

/* Celery result meta in the Redis result backend (reference §3): what AsyncResult.get() in Python reads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "worker.h"

json_t *
result_exception(const char *module, const char *type, const char *message)
{
	json_t *msg = json_string(message);
	if (msg == NULL) /* not UTF-8: never lose the failure for it */
		msg = json_string("(undecodable message)");
	return json_pack("{s:s, s:[o], s:s}", "exc_type", type, "exc_message", msg, "exc_module", module);
}

static bool
state_ready(const char *status)
{
	return strcmp(status, "SUCCESS") == 0 || strcmp(status, "FAILURE") == 0 || strcmp(status, "REVOKED") == 0;
}

char *
result_meta_text(const char *task_id, const char *status, json_t *result, const char *traceback,
                 const struct message *m)
{
	json_t *meta = json_object();
	json_object_set_new(meta, "status", json_string(status));
	json_object_set_new(meta, "result", result ? result : json_null());
	json_object_set_new(meta, "traceback", traceback ? json_string(traceback) : json_null());
	json_object_set_new(meta, "children", json_array());
	if (state_ready(status)) {
		char iso[64];
		message_format_iso(now_wall(), false, iso, sizeof iso);
		json_object_set_new(meta, "date_done", json_string(iso));
	} else {
		json_object_set_new(meta, "date_done", json_null());
	}
	if (m != NULL && json_is_object(m->headers)) {
		json_t *v = json_object_get(m->headers, "parent_id");
		if (json_is_string(v))
			json_object_set(meta, "parent_id", v);
		v = json_object_get(m->headers, "group");
		if (json_is_string(v))
			json_object_set(meta, "group_id", v);
	}
	json_object_set_new(meta, "task_id", json_string(task_id));
	char *text = json_dumps(meta, JSON_COMPACT);
	json_decref(meta);
	return text;
}

static void
result_argv(const char *task_id, const char *text, char **key, char ttl[16])
{
	*key = xasprintf(RESULT_KEY_PREFIX "%s", task_id);
	snprintf(ttl, 16, "%d", RESULT_EXPIRES);
}

int
result_store(struct rconn *rc, const char *task_id, const char *status, json_t *result, const char *traceback,
             const struct message *m)
{
	char *text = result_meta_text(task_id, status, result, traceback, m);
	if (text == NULL)
		return 0; /* cannot happen with jansson-built values; nothing to retry */
	int rv = result_store_text(rc, task_id, text);
	free(text);
	return rv;
}

int
result_store_text(struct rconn *rc, const char *task_id, const char *text)
{
	char *key, ttl[16];
	result_argv(task_id, text, &key, ttl);
	const char *argv[] = {key, text, ttl};
	redisReply *r = rconn_eval(rc, SCRIPT_STORE, 1, 2, argv, NULL);
	free(key);
	if (r == NULL)
		return -1;
	freeReplyObject(r);
	return 0;
}

int
result_store_plain_send(struct rconn *rc, const char *task_id, const char *text)
{
	char *key, ttl[16];
	result_argv(task_id, text, &key, ttl);
	const char *setex[] = {"SETEX", key, ttl, text};
	size_t sl[] = {5, strlen(key), strlen(ttl), strlen(text)};
	const char *pub[] = {"PUBLISH", key, text};
	size_t pl[] = {7, strlen(key), strlen(text)};
	int rv = rconn_send(rc, 4, setex, sl) < 0 || rconn_send(rc, 3, pub, pl) < 0 ? -1 : 0;
	free(key);
	return rv;
}

int
result_store_plain_send_in(struct rconn *rc, const char *task_id, const char *text, int db)
{
	char sel[16], home[16];
	snprintf(sel, sizeof sel, "%d", db);
	snprintf(home, sizeof home, "%d", rc->url->db);
	bool other = db != rc->url->db;
	const char *a[] = {"SELECT", sel};
	size_t al[] = {6, strlen(sel)};
	const char *b[] = {"SELECT", home};
	size_t bl[] = {6, strlen(home)};
	if (other && rconn_send(rc, 2, a, al) < 0)
		return -1;
	if (result_store_plain_send(rc, task_id, text) < 0)
		return -1;
	if (other && rconn_send(rc, 2, b, bl) < 0)
		return -1;
	return 0;
}

int
result_store_plain(struct rconn *rc, const char *task_id, const char *text)
{
	while (rc->pending > 0)
		if (rconn_collect(rc) < 0)
			return -1;
	if (result_store_plain_send(rc, task_id, text) < 0)
		return -1;
	int rv = 0;
	while (rc->pending > 0)
		if (rconn_collect(rc) < 0)
			rv = -1;
	return rv;
}

int
result_store_send(struct rconn *rc, const char *task_id, const char *text)
{
	char *key, ttl[16];
	result_argv(task_id, text, &key, ttl);
	const char *argv[] = {key, text, ttl};
	int rv = rconn_eval_send(rc, SCRIPT_STORE, 1, 2, argv, NULL);
	free(key);
	return rv;
}

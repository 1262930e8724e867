/* Reply shaping of the workflow sources: pure functions of JSON (unit-tested in tests/unit/test_source.c). */
#include <string.h>

#include "log.h"
#include "source.h"
#include "util.h"

enum source_status
source_classify_http(long status)
{
	if (status >= 200 && status < 300)
		return SOURCE_OK;
	if (status >= 500 || status == 408 || status == 429) /* server side or "come back later" */
		return SOURCE_RETRY;
	return SOURCE_FAIL;
}

char *
source_json_compact(const json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
	if (!s)
		fatalx("source: out of memory");
	return s;
}

json_t *
source_agents_output(const json_t *reply)
{
	json_t *o = json_object();
	if (!o)
		fatalx("source: out of memory");
	const char *keys[][2] = {
	    {"result", "message"}, {"session_id", "session_id"}, {"tool_calls", "tool_calls"}, {"usage", "usage"}};
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		json_t *v = json_is_object(reply) ? json_object_get(reply, keys[i][1]) : NULL;
		json_object_set_new(o, keys[i][0], v ? json_incref(v) : json_null());
	}
	json_t *s = json_is_object(reply) ? json_object_get(reply, "success") : NULL;
	json_object_set_new(o, "success", s && !json_is_null(s) ? json_incref(s) : json_true());
	return o;
}

const char *
source_hive_item_id(const json_t *item)
{
	static const char *const keys[] = {"id", "agent_id", "team_id", "workflow_id", "name"};
	if (!json_is_object(item))
		return NULL;
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		const char *s = json_string_value(json_object_get(item, keys[i]));
		if (s && *s) /* Python's `a or b`: an empty identifier falls through to the next key */
			return s;
	}
	return NULL;
}

bool
source_hive_list_has(const json_t *list, const char *id)
{
	size_t i;
	json_t *item;
	if (!json_is_array(list) || !id)
		return false;
	json_array_foreach(list, i, item)
	{
		const char *s = source_hive_item_id(item);
		if (s && strcmp(s, id) == 0)
			return true;
	}
	return false;
}

/* Append text to a growing buffer. */
void
source_buf_add(char **buf, size_t *len, const char *s)
{
	size_t n = strlen(s);
	*buf = xrealloc(*buf, *len + n + 1);
	memcpy(*buf + *len, s, n + 1);
	*len += n;
}

/* A JSON value as text: strings as they are, anything else as compact JSON. */
static char *
value_text(const json_t *v)
{
	if (!v || json_is_null(v))
		return xstrdup("");
	if (json_is_string(v))
		return xstrdup(json_string_value(v));
	return source_json_compact(v);
}

json_t *
source_hive_output(enum hive_kind kind, const json_t *reply, bool *success)
{
	char *out = xstrdup("");
	size_t len = 0;
	const char *status = json_string_value(json_object_get(reply, "status"));
	/* AgentOS reports RUNNING for a finished non-streamed agent run; a missing status is not a failure */
	*success = !status || strcmp(status, "RUNNING") == 0 || strcmp(status, "COMPLETED") == 0 ||
	           strcmp(status, "completed") == 0;

	if (kind == HIVE_AGENT) {
		char *t = value_text(json_object_get(reply, "content"));
		source_buf_add(&out, &len, t);
		free(t);
	} else if (kind == HIVE_TEAM) {
		char *t = value_text(json_object_get(json_object_get(reply, "coordinator_response"), "content"));
		source_buf_add(&out, &len, t);
		free(t);
		json_t *members = json_object_get(reply, "member_responses");
		if (json_is_array(members) && json_array_size(members) > 0) {
			source_buf_add(&out, &len, "\n\n");
			size_t i;
			json_t *m;
			json_array_foreach(members, i, m)
			{
				const char *aid = json_string_value(json_object_get(m, "agent_id"));
				char *resp = value_text(json_object_get(m, "response"));
				if (i > 0)
					source_buf_add(&out, &len, "\n");
				source_buf_add(&out, &len, "**");
				source_buf_add(&out, &len, aid ? aid : "Agent");
				source_buf_add(&out, &len, "**: ");
				source_buf_add(&out, &len, resp);
				free(resp);
			}
		}
	} else if (kind == HIVE_WORKFLOW) {
		char *t = value_text(json_object_get(reply, "final_output"));
		source_buf_add(&out, &len, t);
		free(t);
		json_t *steps = json_object_get(reply, "steps_completed");
		if (len == 0 && json_is_array(steps)) {
			size_t i, n = 0;
			json_t *s;
			json_array_foreach(steps, i, s)
			{
				const char *st = json_string_value(json_object_get(s, "status"));
				if (!st || strcmp(st, "completed") != 0)
					continue;
				const char *sid = json_string_value(json_object_get(s, "step_id"));
				char *o = value_text(json_object_get(s, "output"));
				if (n++ > 0)
					source_buf_add(&out, &len, "\n");
				source_buf_add(&out, &len, "**");
				source_buf_add(&out, &len, sid ? sid : "Step");
				source_buf_add(&out, &len, "**: ");
				source_buf_add(&out, &len, o);
				free(o);
			}
		}
	}
	if (len == 0 && reply && !(json_is_object(reply) && json_object_size(reply) == 0)) {
		/* automagik-spark falls back to the whole reply when the expected fields are absent */
		char *t = source_json_compact(reply);
		free(out);
		out = t;
	}
	json_t *j = json_stringn(out, strlen(out));
	free(out);
	if (!j) /* not UTF-8: keep what the source said, escaped as JSON text */
		j = json_string("(non-UTF-8 reply)");
	if (!j)
		fatalx("source: out of memory");
	return j;
}

/*
 * Workflow sources over HTTP: LangFlow, automagik-agents and automagik-hive, with the exact requests of
 * automagik-spark (reference/automagik-spark.md, "How the original executes"), run on the loop through http.c.
 * Errors are classified so the caller can retry what may pass later (connect errors, timeouts, 5xx) and fail the
 * rest at once. Hive's requests (list agents, teams, workflows, then run) are a small state machine.
 */
#ifndef SPARK_SOURCE_H
#define SPARK_SOURCE_H

#include <jansson.h>
#include <stdbool.h>

#include "http.h"

enum source_status {
	SOURCE_OK = 0,    /* output holds the shaped output */
	SOURCE_RETRY,     /* connect error, timeout, HTTP 5xx: may pass later */
	SOURCE_FAIL,      /* HTTP 4xx, bad reply, unknown flow or source type: will not pass by retrying */
	SOURCE_CANCELLED, /* source_abort ended the call */
};

struct source_request {
	const char *source_type; /* "langflow", "automagik-agents", "automagik-hive" */
	const char *url;         /* base URL, no trailing '/' (one is tolerated) */
	const char *api_key;     /* decrypted; NULL or "" when the source has none. Never logged. */
	const char *remote_id;   /* LangFlow flow id, agent name or Hive id */
	const char *input;       /* the input text */
	const char *session_id;  /* Hive session id (the task row id, as automagik-spark sends); may be NULL */
	double timeout;          /* seconds, each transfer (AUTOMAGIK_SPARK_HTTP_TIMEOUT) */
};

struct source_result {
	enum source_status status;
	json_t *output;   /* SOURCE_OK: new reference */
	long http_status; /* last HTTP status seen, 0 when none */
	char error[512];  /* one line, never a key */
};

enum hive_kind {
	HIVE_NONE = 0,
	HIVE_AGENT,
	HIVE_TEAM,
	HIVE_WORKFLOW,
};

struct source_call;
typedef void (*source_done_fn)(struct source_call *c);

/* One call of a workflow on its source, from source_start to done. */
struct source_call {
	const struct source_request *req; /* borrowed until done */
	struct http *http;
	struct source_result res; /* filled when done runs; res.output is the caller's to release */
	source_done_fn done;
	void *arg;
	bool active;
	int stage; /* which request is in flight (source.c) */
	char *url; /* of the request in flight (for error messages, redacted there) */
	struct http_xfer xfer;
	enum hive_kind kind;         /* Hive: the kind found by the listings */
	enum source_status list_err; /* Hive: the most retryable listing error so far */
	char list_msg[512];
};

/* Once per process, before the first call (curl_global_init). */
void source_global_init(void);

/* Run the workflow on its source; done(c) runs from the loop when it ends, possibly before this returns. */
void source_start(struct http *h, struct source_call *c, const struct source_request *req, source_done_fn done,
                  void *arg);
/* Abort a call in flight: done runs before this returns, with SOURCE_CANCELLED. */
void source_abort(struct source_call *c);

/* ---- reply shaping, pure functions (unit-tested) ---- */

/* automagik-agents: {"result": message, "session_id", "tool_calls", "usage", "success": success (default true)}. */
json_t *source_agents_output(const json_t *reply);

/* Identifier of a Hive listing item: "id", else "agent_id"/"team_id"/"workflow_id", else "name"; NULL if none. */
const char *source_hive_item_id(const json_t *item);
/* true when the JSON array list holds an item whose identifier is id. */
bool source_hive_list_has(const json_t *list, const char *id);

/*
 * Hive run reply -> output text (new reference to a JSON string): agent "content"; team coordinator content plus
 * member responses; workflow "final_output", else the joined outputs of completed steps; the reply itself as JSON
 * text when those are absent. *success is false when the reply's status says the run did not succeed.
 */
json_t *source_hive_output(enum hive_kind kind, const json_t *reply, bool *success);

/* Compact JSON text of j (dies on OOM); caller frees. */
char *source_json_compact(const json_t *j);
/* Append s to the growing NUL-terminated buffer *buf of length *len. */
void source_buf_add(char **buf, size_t *len, const char *s);

/* Classify an HTTP status: SOURCE_OK for 2xx, SOURCE_RETRY for 5xx (and 408/429), SOURCE_FAIL otherwise. */
enum source_status source_classify_http(long status);

#endif

/* Workflow source calls (libcurl) and reply shaping; see source.h. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <curl/curl.h>

#include "log.h"
#include "source.h"
#include "url.h"
#include "util.h"

#define SOURCE_MAX_REPLY       (32L * 1024 * 1024) /* bound a worker's memory against a runaway reply */
#define SOURCE_CONNECT_TIMEOUT 30.0
/* automagik-spark sends this fixed user to automagik-agents */
#define AGENTS_USER_ID "550e8400-e29b-41d4-a716-446655440000"

static pthread_once_t source_once = PTHREAD_ONCE_INIT;
/* this thread's handles: handles are not thread-safe, and reusing them keeps connections alive */
static pthread_key_t source_key;

struct source_handles {
	CURL *easy;
	CURLM *multi; /* drives the transfer so the cancel flag is polled every 100 ms, not once a second */
};

static void
source_handle_free(void *arg)
{
	struct source_handles *h = arg;
	curl_multi_cleanup(h->multi);
	curl_easy_cleanup(h->easy);
	free(h);
}

static void
source_init_once(void)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	if (pthread_key_create(&source_key, source_handle_free) != 0)
		fatalx("source: pthread_key_create failed");
}

void
source_global_init(void)
{
	pthread_once(&source_once, source_init_once);
}

static struct source_handles *
source_handle(void)
{
	source_global_init();
	struct source_handles *h = pthread_getspecific(source_key);
	if (!h) {
		h = xcalloc(1, sizeof(*h));
		h->easy = curl_easy_init();
		h->multi = curl_multi_init();
		if (!h->easy || !h->multi)
			fatalx("source: curl init failed");
		pthread_setspecific(source_key, h);
	} else {
		curl_easy_reset(h->easy);
	}
	return h;
}

/* curl_easy_perform, but checking the cancel flag at least every 100 ms. */
static CURLcode
source_perform(struct source_handles *hs, atomic_int *cancel)
{
	CURLcode rc = CURLE_OK;
	if (curl_multi_add_handle(hs->multi, hs->easy) != CURLM_OK)
		return CURLE_OUT_OF_MEMORY;
	for (;;) {
		int running = 0;
		if (curl_multi_perform(hs->multi, &running) != CURLM_OK) {
			rc = CURLE_RECV_ERROR;
			break;
		}
		int left = 0;
		CURLMsg *m;
		bool done = false;
		while ((m = curl_multi_info_read(hs->multi, &left)))
			if (m->msg == CURLMSG_DONE) {
				rc = m->data.result;
				done = true;
			}
		if (done || running == 0)
			break;
		if (cancel && atomic_load(cancel) != 0) {
			rc = CURLE_ABORTED_BY_CALLBACK;
			break;
		}
		if (curl_multi_poll(hs->multi, NULL, 0, 100, NULL) != CURLM_OK) {
			rc = CURLE_RECV_ERROR;
			break;
		}
	}
	curl_multi_remove_handle(hs->multi, hs->easy);
	return rc;
}

struct http_reply {
	char *body;
	size_t len;
	long status;
	bool too_big;
};

static size_t
http_write(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct http_reply *r = arg;
	size_t n = size * nmemb;
	if (r->len + n > (size_t)SOURCE_MAX_REPLY) {
		r->too_big = true;
		return 0;
	}
	r->body = xrealloc(r->body, r->len + n + 1);
	memcpy(r->body + r->len, ptr, n);
	r->len += n;
	r->body[r->len] = '\0';
	return n;
}

static int
http_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	atomic_int *cancel = arg;
	return cancel && atomic_load(cancel) != 0; /* non-zero aborts the transfer: soft limit or cold stop */
}

/* A short, one-line excerpt of a reply body for error messages. */
static void
body_excerpt(const struct http_reply *r, char *out, size_t outlen)
{
	size_t j = 0;
	for (size_t i = 0; r->body && i < r->len && j + 1 < outlen && i < 200; i++) {
		unsigned char c = (unsigned char)r->body[i];
		out[j++] = (c < 0x20 || c == 0x7f) ? ' ' : (char)c;
	}
	out[j] = '\0';
}

enum source_status
source_classify_http(long status)
{
	if (status >= 200 && status < 300)
		return SOURCE_OK;
	if (status >= 500 || status == 408 || status == 429) /* server side or "come back later" */
		return SOURCE_RETRY;
	return SOURCE_FAIL;
}

static enum source_status
classify_curl(CURLcode rc)
{
	switch (rc) {
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_OPERATION_TIMEDOUT:
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_GOT_NOTHING:
	case CURLE_PARTIAL_FILE:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
		return SOURCE_RETRY;
	case CURLE_ABORTED_BY_CALLBACK:
		return SOURCE_CANCELLED;
	default:
		return SOURCE_FAIL;
	}
}

/*
 * One HTTP exchange. body NULL = GET. Returns the classification; on SOURCE_OK r holds the reply.
 * what names the call in error messages ("langflow POST <url>"); the URL is redacted, keys travel in headers only.
 */
static enum source_status
http_exchange(const struct source_request *req, const char *url, struct curl_slist *hdrs, const char *body,
              struct http_reply *r, char *err, size_t errlen)
{
	struct source_handles *hs = source_handle();
	CURL *h = hs->easy;
	char cerr[CURL_ERROR_SIZE] = "";
	memset(r, 0, sizeof(*r));
	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* threads: no SIGALRM for DNS timeouts */
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, http_write);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, http_progress);
	curl_easy_setopt(h, CURLOPT_XFERINFODATA, req->cancel);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
	double t = req->timeout > 0 ? req->timeout : 600;
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(t * 1000));
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
	                 (long)((t < SOURCE_CONNECT_TIMEOUT ? t : SOURCE_CONNECT_TIMEOUT) * 1000));
	if (body) {
		curl_easy_setopt(h, CURLOPT_POST, 1L);
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
	}
	CURLcode rc = source_perform(hs, req->cancel);
	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL); /* hdrs is freed by the caller; drop the borrowed pointer */
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);

	char *shown = url_redact(url);
	enum source_status st;
	if (rc != CURLE_OK) {
		st = r->too_big ? SOURCE_FAIL : classify_curl(rc);
		if (r->too_big)
			snprintf(err, errlen, "%s %s: reply larger than %ld bytes", body ? "POST" : "GET", shown,
			         SOURCE_MAX_REPLY);
		else if (st == SOURCE_CANCELLED)
			snprintf(err, errlen, "%s %s: cancelled", body ? "POST" : "GET", shown);
		else
			snprintf(err, errlen, "%s %s: %s", body ? "POST" : "GET", shown,
			         cerr[0] ? cerr : curl_easy_strerror(rc));
	} else {
		st = source_classify_http(r->status);
		if (st != SOURCE_OK) {
			char ex[201];
			body_excerpt(r, ex, sizeof(ex));
			snprintf(err, errlen, "HTTP %ld from %s %s%s%s", r->status, body ? "POST" : "GET", shown,
			         ex[0] ? ": " : "", ex);
		}
	}
	free(shown);
	if (st != SOURCE_OK) {
		free(r->body);
		r->body = NULL;
		r->len = 0;
	}
	return st;
}

/* base + "/" + escaped segment + rest; the remote id is one path segment even if it holds '/' or spaces. */
static char *
build_url(const char *base, const char *prefix, const char *id, const char *suffix)
{
	size_t n = strlen(base);
	while (n > 0 && base[n - 1] == '/')
		n--;
	char *esc = curl_easy_escape(NULL, id ? id : "", 0);
	if (!esc)
		fatalx("source: out of memory");
	char *u = xasprintf("%.*s%s%s%s", (int)n, base, prefix, esc, suffix ? suffix : "");
	curl_free(esc);
	return u;
}

static struct curl_slist *
hdr_add(struct curl_slist *l, const char *h)
{
	struct curl_slist *n = curl_slist_append(l, h);
	if (!n)
		fatalx("source: out of memory");
	return n;
}

static struct curl_slist *
hdr_key(struct curl_slist *l, const char *key)
{
	if (!key || !*key)
		return l;
	char *h = xasprintf("x-api-key: %s", key);
	l = hdr_add(l, h);
	memset(h, 0, strlen(h));
	free(h);
	return l;
}

static void
hdr_free(struct curl_slist *l)
{
	/* the key header lives in these buffers: wipe before freeing */
	for (struct curl_slist *p = l; p; p = p->next)
		memset(p->data, 0, strlen(p->data));
	curl_slist_free_all(l);
}

static json_t *
parse_reply(const struct http_reply *r, const char *what, struct source_result *res)
{
	json_error_t jerr;
	json_t *j = json_loadb(r->body ? r->body : "", r->len, JSON_DECODE_ANY, &jerr);
	if (!j) {
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "%s reply is not JSON: %s", what, jerr.text);
	}
	return j;
}

static char *
dump_compact(const json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
	if (!s)
		fatalx("source: out of memory");
	return s;
}

/* POST a JSON body (stolen) to url with the source's headers; the parsed reply, or NULL with res filled. */
static json_t *
post_json(const struct source_request *req, char *url, json_t *b, const char *what, struct source_result *res)
{
	if (!b)
		fatalx("source: out of memory");
	char *body = dump_compact(b);
	json_decref(b);
	struct curl_slist *h = hdr_add(NULL, "Content-Type: application/json");
	h = hdr_add(h, "Accept: application/json");
	h = hdr_add(h, "Expect:");
	h = hdr_key(h, req->api_key);
	struct http_reply r;
	res->status = http_exchange(req, url, h, body, &r, res->error, sizeof(res->error));
	res->http_status = r.status;
	hdr_free(h);
	free(body);
	free(url);
	if (res->status != SOURCE_OK)
		return NULL;
	json_t *reply = parse_reply(&r, what, res);
	free(r.body);
	return reply;
}

static void
call_langflow(const struct source_request *req, struct source_result *res)
{
	char *url = build_url(req->url, "/api/v1/run/", req->remote_id, "?stream=false");
	json_t *b = json_pack("{s:s, s:s, s:s, s:{}}", "input_value", req->input ? req->input : "", "output_type",
	                      "debug", "input_type", "chat", "tweaks");
	res->output = post_json(req, url, b, "LangFlow", res);
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

static void
call_agents(const struct source_request *req, struct source_result *res)
{
	char *url = build_url(req->url, "/api/v1/agent/", req->remote_id, "/run");
	json_t *b = json_pack("{s:s, s:n, s:s, s:s}", "message_content", req->input ? req->input : "", "session_name",
	                      "session_origin", "automagik-spark", "user_id", AGENTS_USER_ID);
	json_t *reply = post_json(req, url, b, "automagik-agents", res);
	if (!reply)
		return;
	res->output = source_agents_output(reply);
	json_decref(reply);
	if (!json_is_true(json_object_get(res->output, "success"))) {
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "automagik-agents reported failure for agent %s",
		         req->remote_id);
		json_decref(res->output);
		res->output = NULL;
	}
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
static void
buf_add(char **buf, size_t *len, const char *s)
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
	return dump_compact(v);
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
		buf_add(&out, &len, t);
		free(t);
	} else if (kind == HIVE_TEAM) {
		char *t = value_text(json_object_get(json_object_get(reply, "coordinator_response"), "content"));
		buf_add(&out, &len, t);
		free(t);
		json_t *members = json_object_get(reply, "member_responses");
		if (json_is_array(members) && json_array_size(members) > 0) {
			buf_add(&out, &len, "\n\n");
			size_t i;
			json_t *m;
			json_array_foreach(members, i, m)
			{
				const char *aid = json_string_value(json_object_get(m, "agent_id"));
				char *resp = value_text(json_object_get(m, "response"));
				if (i > 0)
					buf_add(&out, &len, "\n");
				buf_add(&out, &len, "**");
				buf_add(&out, &len, aid ? aid : "Agent");
				buf_add(&out, &len, "**: ");
				buf_add(&out, &len, resp);
				free(resp);
			}
		}
	} else if (kind == HIVE_WORKFLOW) {
		char *t = value_text(json_object_get(reply, "final_output"));
		buf_add(&out, &len, t);
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
					buf_add(&out, &len, "\n");
				buf_add(&out, &len, "**");
				buf_add(&out, &len, sid ? sid : "Step");
				buf_add(&out, &len, "**: ");
				buf_add(&out, &len, o);
				free(o);
			}
		}
	}
	if (len == 0 && reply && !(json_is_object(reply) && json_object_size(reply) == 0)) {
		/* automagik-spark falls back to the whole reply when the expected fields are absent */
		char *t = dump_compact(reply);
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

/* GET one Hive listing; SOURCE_OK with *list set (an array) or an error. */
static enum source_status
hive_list(const struct source_request *req, const char *what, json_t **list, struct source_result *res)
{
	size_t n = strlen(req->url);
	while (n > 0 && req->url[n - 1] == '/')
		n--;
	char *url = xasprintf("%.*s/%s", (int)n, req->url, what);
	struct curl_slist *h = hdr_add(NULL, "accept: application/json");
	h = hdr_key(h, req->api_key);
	struct http_reply r;
	enum source_status st = http_exchange(req, url, h, NULL, &r, res->error, sizeof(res->error));
	res->http_status = r.status;
	hdr_free(h);
	free(url);
	*list = NULL;
	if (st != SOURCE_OK)
		return st;
	*list = parse_reply(&r, "automagik-hive", res);
	free(r.body);
	if (!*list)
		return SOURCE_FAIL;
	return SOURCE_OK;
}

/* application/x-www-form-urlencoded pair, escaped by libcurl. */
static void
form_add(char **buf, size_t *len, const char *k, const char *v)
{
	char *ek = curl_easy_escape(NULL, k, 0), *ev = curl_easy_escape(NULL, v ? v : "", 0);
	if (!ek || !ev)
		fatalx("source: out of memory");
	if (*len > 0)
		buf_add(buf, len, "&");
	buf_add(buf, len, ek);
	buf_add(buf, len, "=");
	buf_add(buf, len, ev);
	curl_free(ek);
	curl_free(ev);
}

static void
call_hive(const struct source_request *req, struct source_result *res)
{
	static const char *const lists[] = {"agents", "teams", "workflows"};
	static const char *const runs[] = {"/agents/", "/teams/", "/workflows/"};
	enum hive_kind kind = HIVE_NONE;
	enum source_status list_err = SOURCE_OK;
	char list_msg[sizeof(res->error)] = "";

	/* find the kind: stop at the first listing that holds the id (fewer requests than listing all three) */
	for (int i = 0; i < 3 && kind == HIVE_NONE; i++) {
		json_t *l = NULL;
		enum source_status st = hive_list(req, lists[i], &l, res);
		if (st == SOURCE_CANCELLED)
			return (void)(res->status = st);
		if (st != SOURCE_OK) {
			/* remember the most retryable listing error; the id may still be in another list */
			if (list_err != SOURCE_RETRY) {
				list_err = st;
				spark_strlcpy(list_msg, res->error, sizeof(list_msg));
			}
			continue;
		}
		if (source_hive_list_has(l, req->remote_id))
			kind = (enum hive_kind)(i + 1);
		json_decref(l);
	}
	if (kind == HIVE_NONE) {
		if (list_err != SOURCE_OK) {
			res->status = list_err;
			spark_strlcpy(res->error, list_msg, sizeof(res->error));
		} else {
			res->status = SOURCE_FAIL;
			snprintf(res->error, sizeof(res->error), "Flow %s not found in AutoMagik Hive", req->remote_id);
		}
		return;
	}

	char *url = build_url(req->url, runs[kind - 1], req->remote_id, "/runs");
	char *form = xstrdup("");
	size_t flen = 0;
	form_add(&form, &flen, "message", req->input);
	form_add(&form, &flen, "stream", "false");
	if (kind == HIVE_TEAM)
		form_add(&form, &flen, "mode", "coordinate");
	if (req->session_id && *req->session_id)
		form_add(&form, &flen, "session_id", req->session_id);
	struct curl_slist *h = hdr_add(NULL, "accept: application/json");
	h = hdr_add(h, "Content-Type: application/x-www-form-urlencoded");
	h = hdr_add(h, "Expect:");
	h = hdr_key(h, req->api_key);
	struct http_reply r;
	res->error[0] = '\0';
	res->status = http_exchange(req, url, h, form, &r, res->error, sizeof(res->error));
	res->http_status = r.status;
	hdr_free(h);
	free(form);
	free(url);
	if (res->status != SOURCE_OK)
		return;
	json_t *reply = parse_reply(&r, "automagik-hive", res);
	free(r.body);
	if (!reply)
		return;
	bool ok = true;
	res->output = source_hive_output(kind, reply, &ok);
	if (!ok) {
		const char *st = json_string_value(json_object_get(reply, "status"));
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "automagik-hive run of %s ended with status %s",
		         req->remote_id, st ? st : "?");
		json_decref(res->output);
		res->output = NULL;
	}
	json_decref(reply);
}

void
source_call(const struct source_request *req, struct source_result *res)
{
	memset(res, 0, sizeof(*res));
	const char *t = req->source_type ? req->source_type : "";
	if (!req->url || !*req->url) {
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "workflow source has no URL");
	} else if (strcmp(t, "langflow") == 0) {
		call_langflow(req, res);
	} else if (strcmp(t, "automagik-agents") == 0) {
		call_agents(req, res);
	} else if (strcmp(t, "automagik-hive") == 0) {
		call_hive(req, res);
	} else {
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "Unsupported source type: %.100s", t);
	}
	if (res->status != SOURCE_OK && res->output) {
		json_decref(res->output);
		res->output = NULL;
	}
}

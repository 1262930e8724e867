/*
 * Workflow source calls: the requests automagik-spark sends, each run on the loop through http.c, and the
 * classification of their outcome. Reply shaping is in source-shape.c.
 */
#include <stdio.h>
#include <string.h>

#include <curl/curl.h>

#include "log.h"
#include "source.h"
#include "url.h"
#include "util.h"

/* automagik-spark sends this fixed user to automagik-agents */
#define AGENTS_USER_ID "550e8400-e29b-41d4-a716-446655440000"

/* What the request in flight is. */
enum source_stage {
	STAGE_LANGFLOW = 1,
	STAGE_AGENTS,
	STAGE_HIVE_LIST, /* c->kind holds the index of the listing in flight (hive_lists) */
	STAGE_HIVE_RUN,
};

static const char *const hive_lists[] = {"agents", "teams", "workflows"};
static const char *const hive_runs[] = {"/agents/", "/teams/", "/workflows/"};

void
source_global_init(void)
{
	/* once per process, before any handle: the plugin's create runs before any transfer starts */
	curl_global_init(CURL_GLOBAL_DEFAULT);
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

/* application/x-www-form-urlencoded pair, escaped by libcurl. */
static void
form_add(char **buf, size_t *len, const char *k, const char *v)
{
	char *ek = curl_easy_escape(NULL, k, 0), *ev = curl_easy_escape(NULL, v ? v : "", 0);
	if (!ek || !ev)
		fatalx("source: out of memory");
	if (*len > 0)
		source_buf_add(buf, len, "&");
	source_buf_add(buf, len, ek);
	source_buf_add(buf, len, "=");
	source_buf_add(buf, len, ev);
	curl_free(ek);
	curl_free(ev);
}

/* A short, one-line excerpt of a reply body for error messages. */
static void
body_excerpt(const struct http_xfer *x, char *out, size_t outlen)
{
	size_t j = 0;
	for (size_t i = 0; x->reply && i < x->reply_len && j + 1 < outlen && i < 200; i++) {
		unsigned char ch = (unsigned char)x->reply[i];
		out[j++] = (ch < 0x20 || ch == 0x7f) ? ' ' : (char)ch;
	}
	out[j] = '\0';
}

/* The outcome of the transfer that just ended; on SOURCE_OK x->reply holds the body. The URL is redacted in
 * messages; keys travel in headers only. */
static enum source_status
source_xfer_status(struct source_call *c, CURLcode rc, char *err, size_t errlen)
{
	struct http_xfer *x = &c->xfer;
	const char *method = x->body ? "POST" : "GET";
	char *shown = url_redact(c->url);
	enum source_status st;
	if (rc != CURLE_OK) {
		st = x->too_big ? SOURCE_FAIL : classify_curl(rc);
		if (x->too_big)
			snprintf(err, errlen, "%s %s: reply larger than %ld bytes", method, shown, HTTP_MAX_REPLY);
		else if (st == SOURCE_CANCELLED)
			snprintf(err, errlen, "%s %s: cancelled", method, shown);
		else
			snprintf(err, errlen, "%s %s: %s", method, shown,
			         x->cerr[0] ? x->cerr : curl_easy_strerror(rc));
	} else {
		st = source_classify_http(x->status);
		if (st != SOURCE_OK) {
			char ex[201];
			body_excerpt(x, ex, sizeof(ex));
			snprintf(err, errlen, "HTTP %ld from %s %s%s%s", x->status, method, shown, ex[0] ? ": " : "",
			         ex);
		}
	}
	free(shown);
	return st;
}

static json_t *
parse_reply(const struct http_xfer *x, const char *what, struct source_result *res)
{
	json_error_t jerr;
	json_t *j = json_loadb(x->reply ? x->reply : "", x->reply_len, JSON_DECODE_ANY, &jerr);
	if (!j) {
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "%s reply is not JSON: %s", what, jerr.text);
	}
	return j;
}

static void source_on_xfer(struct http_xfer *x, CURLcode rc);

/* The call is over: hand it back. */
static void
source_end(struct source_call *c)
{
	c->active = false;
	http_xfer_clear(&c->xfer);
	free(c->url);
	c->url = NULL;
	if (c->res.status != SOURCE_OK && c->res.output) {
		json_decref(c->res.output);
		c->res.output = NULL;
	}
	c->done(c);
}

/* Send one request (url and body become the transfer's); on a refusal the call ends. */
static void
source_send(struct source_call *c, enum source_stage stage, char *url, struct curl_slist *h, char *body)
{
	c->stage = stage;
	free(c->url);
	c->url = url;
	if (http_start(c->http, &c->xfer, url, h, body, c->req->timeout, source_on_xfer, c) < 0) {
		http_xfer_clear(&c->xfer);
		c->res.status = SOURCE_FAIL;
		snprintf(c->res.error, sizeof(c->res.error), "cannot start the HTTP call to the source");
		source_end(c);
	}
}

static struct curl_slist *
json_headers(const char *key)
{
	struct curl_slist *h = hdr_add(NULL, "Content-Type: application/json");
	h = hdr_add(h, "Accept: application/json");
	h = hdr_add(h, "Expect:");
	return hdr_key(h, key);
}

static void
post_json(struct source_call *c, enum source_stage stage, char *url, json_t *b)
{
	if (!b)
		fatalx("source: out of memory");
	char *body = source_json_compact(b);
	json_decref(b);
	source_send(c, stage, url, json_headers(c->req->api_key), body);
}

static void
hive_list_start(struct source_call *c, int i)
{
	const struct source_request *req = c->req;
	size_t n = strlen(req->url);
	while (n > 0 && req->url[n - 1] == '/')
		n--;
	c->kind = (enum hive_kind)i; /* the listing in flight until one holds the id */
	struct curl_slist *h = hdr_add(NULL, "accept: application/json");
	source_send(c, STAGE_HIVE_LIST, xasprintf("%.*s/%s", (int)n, req->url, hive_lists[i]), hdr_key(h, req->api_key),
	            NULL);
}

static void
hive_run_start(struct source_call *c)
{
	const struct source_request *req = c->req;
	char *form = xstrdup("");
	size_t flen = 0;
	form_add(&form, &flen, "message", req->input);
	form_add(&form, &flen, "stream", "false");
	if (c->kind == HIVE_TEAM)
		form_add(&form, &flen, "mode", "coordinate");
	if (req->session_id && *req->session_id)
		form_add(&form, &flen, "session_id", req->session_id);
	struct curl_slist *h = hdr_add(NULL, "accept: application/json");
	h = hdr_add(h, "Content-Type: application/x-www-form-urlencoded");
	h = hdr_add(h, "Expect:");
	h = hdr_key(h, req->api_key);
	c->res.error[0] = '\0';
	source_send(c, STAGE_HIVE_RUN, build_url(req->url, hive_runs[c->kind - 1], req->remote_id, "/runs"), h, form);
}

/* A Hive listing ended (c->kind holds its index): stop at the first listing that holds the id. */
static void
hive_list_done(struct source_call *c, enum source_status st)
{
	struct source_result *res = &c->res;
	int i = (int)c->kind;
	if (st == SOURCE_CANCELLED) {
		res->status = st;
		source_end(c);
		return;
	}
	json_t *l = st == SOURCE_OK ? parse_reply(&c->xfer, "automagik-hive", res) : NULL;
	if (st == SOURCE_OK && !l)
		st = SOURCE_FAIL;
	if (st != SOURCE_OK) {
		/* remember the most retryable listing error; the id may still be in another list */
		if (c->list_err != SOURCE_RETRY) {
			c->list_err = st;
			spark_strlcpy(c->list_msg, res->error, sizeof(c->list_msg));
		}
	} else if (source_hive_list_has(l, c->req->remote_id)) {
		json_decref(l);
		http_xfer_clear(&c->xfer);
		c->kind = (enum hive_kind)(i + 1);
		hive_run_start(c);
		return;
	}
	json_decref(l);
	http_xfer_clear(&c->xfer);
	if (i + 1 < 3) {
		hive_list_start(c, i + 1);
		return;
	}
	if (c->list_err != SOURCE_OK) {
		res->status = c->list_err;
		spark_strlcpy(res->error, c->list_msg, sizeof(res->error));
	} else {
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "Flow %s not found in AutoMagik Hive", c->req->remote_id);
	}
	source_end(c);
}

/* The reply of a run request: shape it the way the source's kind says. */
static void
run_done(struct source_call *c)
{
	struct source_result *res = &c->res;
	const char *what = c->stage == STAGE_LANGFLOW ? "LangFlow"
	                   : c->stage == STAGE_AGENTS ? "automagik-agents"
	                                              : "automagik-hive";
	json_t *reply = parse_reply(&c->xfer, what, res);
	http_xfer_clear(&c->xfer);
	if (!reply)
		return;
	if (c->stage == STAGE_LANGFLOW) {
		res->output = reply;
		return;
	}
	if (c->stage == STAGE_AGENTS) {
		res->output = source_agents_output(reply);
		json_decref(reply);
		if (!json_is_true(json_object_get(res->output, "success"))) {
			res->status = SOURCE_FAIL;
			snprintf(res->error, sizeof(res->error), "automagik-agents reported failure for agent %s",
			         c->req->remote_id);
		}
		return;
	}
	bool ok = true;
	res->output = source_hive_output(c->kind, reply, &ok);
	if (!ok) {
		const char *st = json_string_value(json_object_get(reply, "status"));
		res->status = SOURCE_FAIL;
		snprintf(res->error, sizeof(res->error), "automagik-hive run of %s ended with status %s",
		         c->req->remote_id, st ? st : "?");
	}
	json_decref(reply);
}

static void
source_on_xfer(struct http_xfer *x, CURLcode rc)
{
	struct source_call *c = x->arg;
	struct source_result *res = &c->res;
	enum source_status st = source_xfer_status(c, rc, res->error, sizeof(res->error));
	res->http_status = x->status;
	if (c->stage == STAGE_HIVE_LIST) {
		hive_list_done(c, st);
		return;
	}
	res->status = st;
	if (st == SOURCE_OK)
		run_done(c);
	else
		http_xfer_clear(&c->xfer);
	source_end(c);
}

void
source_start(struct http *h, struct source_call *c, const struct source_request *req, source_done_fn done, void *arg)
{
	memset(c, 0, sizeof(*c));
	c->http = h;
	c->req = req;
	c->done = done;
	c->arg = arg;
	c->active = true;
	const char *t = req->source_type ? req->source_type : "";
	const char *input = req->input ? req->input : "";
	if (!req->url || !*req->url) {
		c->res.status = SOURCE_FAIL;
		snprintf(c->res.error, sizeof(c->res.error), "workflow source has no URL");
		source_end(c);
	} else if (strcmp(t, "langflow") == 0) {
		json_t *b = json_pack("{s:s, s:s, s:s, s:{}}", "input_value", input, "output_type", "debug",
		                      "input_type", "chat", "tweaks");
		post_json(c, STAGE_LANGFLOW, build_url(req->url, "/api/v1/run/", req->remote_id, "?stream=false"), b);
	} else if (strcmp(t, "automagik-agents") == 0) {
		json_t *b = json_pack("{s:s, s:n, s:s, s:s}", "message_content", input, "session_name",
		                      "session_origin", "automagik-spark", "user_id", AGENTS_USER_ID);
		post_json(c, STAGE_AGENTS, build_url(req->url, "/api/v1/agent/", req->remote_id, "/run"), b);
	} else if (strcmp(t, "automagik-hive") == 0) {
		hive_list_start(c, 0);
	} else {
		c->res.status = SOURCE_FAIL;
		snprintf(c->res.error, sizeof(c->res.error), "Unsupported source type: %.100s", t);
		source_end(c);
	}
}

void
source_abort(struct source_call *c)
{
	if (c->active && c->xfer.active)
		http_abort(&c->xfer); /* source_on_xfer runs: CANCELLED ends the call, also mid-Hive */
}

/*
 * Celery's remote-control mailbox (reference §5.3, §5.4): every request published on /<db>.celery.pidbox is
 * decoded once and handled by each worker node it addresses, which replies once for all its processes, as
 * kombu's Node does: an unknown method or a failing handler still replies {"error": ...}; a cast (no reply_to)
 * gets no reply; a reply goes only to the queues the reply binding names, so a client that has gone leaves no
 * orphan keys behind.
 */
#include <fnmatch.h>
#include <regex.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "celery.h"

static json_t *
pb_kv(const char *key, const char *fmt, va_list ap)
{
	char *s = xvasprintf(fmt, ap);
	json_t *r = json_pack("{s:s}", key, s);
	free(s);
	return r;
}

json_t *
pb_ok(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	json_t *r = pb_kv("ok", fmt, ap);
	va_end(ap);
	return r;
}

json_t *
pb_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	json_t *r = pb_kv("error", fmt, ap);
	va_end(ap);
	return r;
}

/* A list of ids, or one id (Celery accepts both); the strings are borrowed from args. Caller frees *ids. */
int
pb_arg_ids(json_t *args, const char *key, const char ***ids)
{
	json_t *v = json_object_get(args, key);
	size_t n = json_is_array(v) ? json_array_size(v) : 1, k = 0;
	*ids = xcalloc(n + 1, sizeof **ids);
	if (json_is_string(v))
		(*ids)[k++] = json_string_value(v);
	for (size_t i = 0; json_is_array(v) && i < n; i++)
		if (json_is_string(json_array_get(v, i)))
			(*ids)[k++] = json_string_value(json_array_get(v, i));
	return (int)k;
}

static void
req_unref(struct pb_req *r)
{
	if (--r->refs > 0)
		return;
	free(r->method);
	json_decref(r->args);
	free(r->ticket);
	free(r->reply_ex);
	free(r->reply_rk);
	free(r);
}

/* kombu's matchers: glob is fnmatch; pcre is matched here with POSIX extended regexps (re.search semantics:
 * unanchored), which agree with Python's re for the patterns people give node names. 1 = match, 0 = no, -1 = the
 * matcher or pattern is refused (err says why). */
int
pidbox_match(const char *node, const char *pattern, const char *matcher, char *err, size_t errlen)
{
	if (strcmp(matcher, "glob") == 0)
		return fnmatch(pattern, node, 0) == 0;
	if (strcmp(matcher, "pcre") == 0) {
		regex_t re;
		int rc = regcomp(&re, pattern, REG_EXTENDED | REG_NOSUB);
		if (rc != 0) {
			char msg[128];
			regerror(rc, &re, msg, sizeof msg);
			snprintf(err, errlen, "error('%s')", msg);
			return -1;
		}
		int m = regexec(&re, node, 0, NULL, 0) == 0;
		regfree(&re);
		return m;
	}
	snprintf(err, errlen, "MatcherNotInstalled('No matcher installed for %s')", matcher);
	return -1;
}

/* ---- replies ---- */

struct pb_reply {
	struct sparkd *sd;
	char *rk;
	char *envelope;
};

static void
reply_free(struct pb_reply *r)
{
	free(r->rk);
	free(r->envelope);
	free(r);
}

static void
reply_pushed(redisAsyncContext *ac, void *reply, void *priv)
{
	redisReply *r = reply;
	if (r != NULL && r->type == REDIS_REPLY_ERROR)
		log_warnx("pidbox reply: LPUSH: %s", r->str);
}

/* SMEMBERS _kombu.binding.reply.celery.pidbox: members "<rk>\x06\x16<pattern>\x06\x16<queue>" */
static void
reply_bindings(redisAsyncContext *ac, void *reply, void *priv)
{
	struct pb_reply *rp = priv;
	redisReply *r = reply;
	size_t rklen = strlen(rp->rk);
	for (size_t i = 0; r != NULL && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
		const redisReply *m = r->element[i];
		if (m->type != REDIS_REPLY_STRING || m->len < rklen + 4 || memcmp(m->str, rp->rk, rklen) != 0 ||
		    memcmp(m->str + rklen, CEL_SEP, 2) != 0)
			continue;
		const char *pat = m->str + rklen + 2, *end = m->str + m->len;
		const char *sep = memmem(pat, (size_t)(end - pat), CEL_SEP, 2);
		if (sep == NULL || sep + 2 >= end)
			continue;
		const char *argv[] = {"LPUSH", sep + 2, rp->envelope};
		size_t lens[] = {5, (size_t)(end - sep - 2), strlen(rp->envelope)};
		broker_cmd(&rp->sd->cel->broker, reply_pushed, NULL, 3, argv, lens);
	}
	reply_free(rp);
}

static void
pb_reply_send(struct sparkd *sd, const struct pb_req *req, const char *node, json_t *reply)
{
	json_t *body = json_object();
	json_object_set_new(body, node, reply);
	json_t *headers = json_pack("{s:I}", "clock", (json_int_t)celery_tick(sd));
	if (req->ticket != NULL)
		json_object_set_new(headers, "ticket", json_string(req->ticket));
	char *env = envelope_build(body, headers, req->reply_ex, req->reply_rk);
	if (env == NULL) {
		log_warnx("pidbox: cannot encode the reply to %s", req->method);
		return;
	}
	struct pb_reply *rp = xcalloc(1, sizeof *rp);
	rp->sd = sd;
	rp->rk = xstrdup(req->reply_rk);
	rp->envelope = env;
	char key[300];
	snprintf(key, sizeof key, CEL_BINDING_PREFIX "%s", req->reply_ex);
	const char *argv[] = {"SMEMBERS", key};
	if (broker_cmd(&sd->cel->broker, reply_bindings, rp, 2, argv, NULL) < 0)
		reply_free(rp);
}

void
pb_call_done(struct pb_call *c, json_t *reply)
{
	if (reply != NULL && c->req->reply_ex != NULL)
		pb_reply_send(c->sd, c->req, c->w->name, reply);
	else
		json_decref(reply);
	req_unref(c->req);
	free(c);
}

/* ---- requests ---- */

static pb_handler
pidbox_lookup(const char *method)
{
	pb_handler h = inspect_lookup(method);
	return h != NULL ? h : control_lookup(method);
}

/* Whether the node handles the request (kombu's Node.handle_message); -1 with err for a refused matcher. */
static int
pidbox_addressed(const char *node, json_t *body, char *err, size_t errlen)
{
	json_t *dest = json_object_get(body, "destination");
	if (json_is_array(dest) && json_array_size(dest) > 0) {
		size_t i;
		json_t *d;
		json_array_foreach(dest, i, d)
		{
			if (json_is_string(d) && strcmp(json_string_value(d), node) == 0)
				return 1;
		}
		return 0;
	}
	const char *pattern = json_string_value(json_object_get(body, "pattern"));
	const char *matcher = json_string_value(json_object_get(body, "matcher"));
	if (pattern != NULL && pattern[0] != '\0' && matcher != NULL && matcher[0] != '\0')
		return pidbox_match(node, pattern, matcher, err, errlen);
	return 1;
}

static struct pb_req *
req_new(json_t *body)
{
	const char *method = json_string_value(json_object_get(body, "method"));
	if (method == NULL)
		return NULL;
	struct pb_req *r = xcalloc(1, sizeof *r);
	r->refs = 1;
	r->method = xstrdup(method);
	json_t *args = json_object_get(body, "arguments");
	r->args = json_is_object(args) ? json_incref(args) : json_object();
	const char *ticket = json_string_value(json_object_get(body, "ticket"));
	r->ticket = ticket ? xstrdup(ticket) : NULL;
	json_t *rt = json_object_get(body, "reply_to");
	const char *ex = json_string_value(json_object_get(rt, "exchange"));
	const char *rk = json_string_value(json_object_get(rt, "routing_key"));
	if (ex != NULL && rk != NULL && ex[0] != '\0') {
		r->reply_ex = xstrdup(ex);
		r->reply_rk = xstrdup(rk);
	}
	return r;
}

void
pidbox_message(struct sparkd *sd, const char *data, size_t len)
{
	json_error_t jerr;
	json_t *env = json_loadb(data, len, 0, &jerr), *headers = NULL;
	json_t *body = envelope_body(env, &headers);
	struct pb_req *req = body != NULL ? req_new(body) : NULL;
	if (req == NULL) {
		log_warnx("pidbox: ignored a message that is not a kombu control request (%zu bytes)", len);
		json_decref(body);
		json_decref(env);
		return;
	}
	json_t *clock = json_object_get(headers, "clock");
	if (json_is_integer(clock) && json_integer_value(clock) > 0)
		celery_adjust_clock(sd, (unsigned long)json_integer_value(clock));
	pb_handler h = pidbox_lookup(req->method);
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		if (w->stopped) /* shut down by remote control: gone, as a Python worker would be */
			continue;
		char err[200];
		int addressed = pidbox_addressed(w->name, body, err, sizeof err);
		if (addressed == 0)
			continue;
		struct pb_call *c = xcalloc(1, sizeof *c);
		c->sd = sd;
		c->w = w;
		c->req = req;
		req->refs++;
		if (addressed < 0) {
			pb_call_done(c, pb_error("%s", err));
			continue;
		}
		if (h == NULL) {
			/* what kombu's dispatch answers: repr() of the KeyError from its handler table */
			pb_call_done(c, pb_error("KeyError('%s')", req->method));
			continue;
		}
		log_debug("pidbox: %s for %s", req->method, w->name);
		json_t *reply = h(c);
		if (reply != NULL)
			pb_call_done(c, reply);
	}
	req_unref(req);
	json_decref(body);
	json_decref(env);
}

static void
bind_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	redisReply *r = reply;
	if (r != NULL && r->type == REDIS_REPLY_ERROR)
		log_warnx("SADD of a kombu binding: %s", r->str);
}

/* The bindings a Python worker declares: each node's mailbox, each of its queues (reference §1.2, §5.1). */
void
pidbox_bind(struct sparkd *sd)
{
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		char member[400];
		snprintf(member, sizeof member, CEL_SEP CEL_SEP "%s." CEL_MAILBOX_EXCHANGE, w->name);
		const char *argv[] = {"SADD", CEL_BINDING_PREFIX CEL_MAILBOX_EXCHANGE, member};
		broker_cmd(&sd->cel->broker, bind_reply, NULL, 3, argv, NULL);
		struct cel_node *n = celery_node(sd, w);
		for (int q = 0; q < n->nqueues; q++)
			node_bind_queue(sd, n->queues[q]);
	}
}

/*
 * An async Redis connection on the process's loop (hiredis + its libevent adapter) that reconnects with backoff.
 *
 * Commands queued in one loop tick leave in one write (hiredis buffers them until the socket is writable), so
 * a batch of fetches, records, metas and acks costs one round trip. A lost connection hands NULL to every
 * outstanding callback (hiredis does), then on_down runs; after the backoff the connection is made again,
 * AUTH/SELECT/SCRIPT LOAD run pipelined, and on_up runs once everything has answered.
 */
#include <errno.h>
#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/sds.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "worker.h"

#define RPIPE_CONNECT_TIMEOUT_S 5.0
#define RPIPE_BACKOFF_MAX_S     5.0

/* One outstanding command: taken from a free list, so steady traffic allocates nothing. */
struct rcall {
	rpipe_cb cb;
	void *arg;
	struct rcall *next;
};

static void rpipe_connect(struct rpipe *p);

void
rpipe_init(struct rpipe *p, struct worker *w, enum rpipe_kind kind, const struct redis_url *url, const char *what)
{
	memset(p, 0, sizeof *p);
	p->w = w;
	p->kind = kind;
	p->url = url;
	p->what = what;
}

static void
rpipe_where(const struct rpipe *p, char *buf, size_t len)
{
	if (p->url->path != NULL)
		snprintf(buf, len, "unix://%s?db=%d", p->url->path, p->url->db);
	else
		snprintf(buf, len, "redis://%s:%d/%d", p->url->host, p->url->port, p->url->db);
}

static void
rpipe_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	rpipe_connect(arg);
}

/* The one path for a connection that is gone (failed connect, error, hang, error reply): idempotent. */
static void
rpipe_gone(struct rpipe *p, const char *why)
{
	if (p->ac == NULL)
		return;
	p->ac = NULL;
	p->ready = false;
	p->inflight = 0;
	if (!p->down) {
		char where[300];
		rpipe_where(p, where, sizeof where);
		log_warnx("%s %s unreachable: %s; reconnecting", p->what, where, why);
		snprintf(p->w->problem, sizeof p->w->problem, "%s %s unreachable: %s", p->what, where, why);
		p->down = true;
		p->w->down++;
		engine_conn_state(p->w);
	}
	p->backoff = p->backoff <= 0 ? 0.1 : p->backoff * 2;
	if (p->backoff > RPIPE_BACKOFF_MAX_S)
		p->backoff = RPIPE_BACKOFF_MAX_S;
	struct timeval tv = {(time_t)p->backoff, (suseconds_t)((p->backoff - (double)(time_t)p->backoff) * 1e6)};
	if (p->retry_ev == NULL)
		p->retry_ev = evtimer_new(p->w->base, rpipe_retry_cb, p);
	evtimer_add(p->retry_ev, &tv);
	if (p->on_down != NULL)
		p->on_down(p);
}

void
rpipe_fail(struct rpipe *p, const char *why)
{
	redisAsyncContext *ac = p->ac;
	if (ac == NULL)
		return;
	rpipe_gone(p, why);
	/* outstanding callbacks get NULL now (or right after the callback that called us returns) */
	redisAsyncFree(ac);
}

/*
 * Write what is queued now rather than on the next writable event: called at the end of each tick, it saves the
 * connection a loop iteration per round trip. The write is ours, not redisAsyncHandleWrite's: hiredis frees its
 * output buffer after every complete write and grows a new one, reallocation by reallocation, in the next tick;
 * clearing it keeps the allocation (up to RPIPE_OBUF_KEEP). A partial write leaves the rest to hiredis's write
 * event; an error is left to hiredis to find, so the connection ends the one way it always does.
 */
#define RPIPE_OBUF_KEEP (256u << 10)

void
rpipe_flush(struct rpipe *p)
{
	redisAsyncContext *ac = p->ac;
	if (ac == NULL || ac->c.obuf == NULL || sdslen(ac->c.obuf) == 0)
		return;
	redisContext *c = &ac->c;
	if (c->err || !(c->flags & REDIS_CONNECTED)) {
		redisAsyncHandleWrite(ac);
		return;
	}
	size_t len = sdslen(c->obuf);
	ssize_t n = write(c->fd, c->obuf, len);
	if (n == (ssize_t)len) {
		if (sdsalloc(c->obuf) > RPIPE_OBUF_KEEP) {
			sdsfree(c->obuf);
			c->obuf = sdsempty();
		} else {
			sdsclear(c->obuf);
		}
		ac->ev.delWrite(ac->ev.data);
	} else if (n > 0) {
		sdsrange(c->obuf, (int)n, -1);
	} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
		/* the write event, armed when the commands were queued, writes it */
	} else {
		redisAsyncHandleWrite(ac);
	}
}

void
rpipe_check_hung(struct rpipe *p, double limit_s)
{
	if (p->ac == NULL)
		return;
	if (p->replies != p->replies_seen) {
		p->replies_seen = p->replies;
		p->last_progress = now_mono();
	}
	double age = now_mono() - p->last_progress;
	if (!p->ready && age > RPIPE_CONNECT_TIMEOUT_S)
		rpipe_fail(p, "connect timed out");
	else if (p->ready && p->inflight > 0 && age > limit_s)
		rpipe_fail(p, "no reply: server hung");
}

static void
rpipe_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct rpipe *p = ac->data;
	struct rcall *c = privdata;
	rpipe_cb cb = c->cb;
	void *arg = c->arg;
	c->next = p->free_calls;
	p->free_calls = c;
	if (p->ac == ac) {
		p->inflight--;
		p->replies++; /* rpipe_check_hung turns this into a time: no clock read per reply */
	}
	cb(p, reply, arg);
}

/*
 * The RESP encoding of a command, written here rather than by hiredis's redisAsyncCommandArgv: its formatter
 * (sdscatfmt into a fresh sds per command) was the worker's largest single cost per task. Room is reserved once
 * per argument and the bytes written in place.
 */
static void
rpipe_format(struct sbuf *b, int argc, const char **argv, const size_t *lens)
{
	sbuf_reset(b);
	sbuf_reserve(b, 32);
	char *o = b->p;
	*o++ = '*';
	o += sbuf_digits((unsigned long long)argc, o);
	*o++ = '\r';
	*o++ = '\n';
	b->len = (size_t)(o - b->p);
	for (int i = 0; i < argc; i++) {
		size_t n = lens ? lens[i] : strlen(argv[i]);
		sbuf_reserve(b, n + 32);
		o = b->p + b->len;
		*o++ = '$';
		o += sbuf_digits(n, o);
		*o++ = '\r';
		*o++ = '\n';
		memcpy(o, argv[i], n);
		o += n;
		*o++ = '\r';
		*o++ = '\n';
		b->len = (size_t)(o - b->p);
	}
	b->p[b->len] = '\0';
}

/* Queue a command on the connection even before it is ready (the start-up sequence). */
static int
rpipe_queue(struct rpipe *p, rpipe_cb cb, void *arg, int argc, const char **argv, const size_t *lens)
{
	if (p->ac == NULL)
		return -1;
	struct rcall *c = p->free_calls;
	if (c != NULL)
		p->free_calls = c->next;
	else
		c = xmalloc(sizeof *c);
	c->cb = cb;
	c->arg = arg;
	rpipe_format(&p->fmt, argc, argv, lens);
	if (redisAsyncFormattedCommand(p->ac, rpipe_reply, c, p->fmt.p, p->fmt.len) != REDIS_OK) {
		c->next = p->free_calls;
		p->free_calls = c;
		return -1;
	}
	if (p->inflight++ == 0)
		p->last_progress = now_mono();
	return 0;
}

int
rpipe_send(struct rpipe *p, rpipe_cb cb, void *arg, int argc, const char **argv, const size_t *lens)
{
	if (!p->ready)
		return -1;
	return rpipe_queue(p, cb, arg, argc, argv, lens);
}

int
rpipe_eval(struct rpipe *p, enum script_id id, rpipe_cb cb, void *arg, int nkeys, int nargs, const char **argv,
           const size_t *lens)
{
	if (!p->ready)
		return -1;
	int argc = 3 + nkeys + nargs;
	const char *stack_av[64];
	size_t stack_al[64];
	const char **av = argc <= 64 ? stack_av : xcalloc((size_t)argc, sizeof *av);
	size_t *al = argc <= 64 ? stack_al : xcalloc((size_t)argc, sizeof *al);
	char nk[16];
	snprintf(nk, sizeof nk, "%d", nkeys);
	av[0] = "EVALSHA";
	av[1] = p->sha[id];
	av[2] = nk;
	al[0] = 7;
	al[1] = 40;
	al[2] = strlen(nk);
	for (int i = 0; i < nkeys + nargs; i++) {
		av[3 + i] = argv[i];
		al[3 + i] = lens ? lens[i] : strlen(argv[i]);
	}
	int rv = rpipe_queue(p, cb, arg, argc, av, al);
	if (av != stack_av) {
		free(av);
		free(al);
	}
	return rv;
}

/* ---- the start-up sequence of a connection ---- */

static void
rpipe_became_ready(struct rpipe *p)
{
	p->ready = true;
	p->gen++;
	p->backoff = 0;
	if (p->down) {
		p->down = false;
		p->w->down--;
		log_info("%s connection restored", p->what);
		engine_conn_state(p->w);
	}
	if (p->on_up != NULL)
		p->on_up(p);
}

static void
rpipe_setup_reply(struct rpipe *p, redisReply *r, void *arg)
{
	const char *step = arg;
	if (r == NULL)
		return; /* the connection went meanwhile: rpipe_gone has run */
	if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "%s failed: %.250s", step, r->str);
		rpipe_fail(p, why);
		return;
	}
	if (strcmp(step, "CLIENT ID") == 0 && r->type == REDIS_REPLY_INTEGER)
		p->client_id = r->integer;
	if (strncmp(step, "SCRIPT LOAD ", 12) == 0) {
		int id = atoi(step + 12);
		if (r->type != REDIS_REPLY_STRING || r->len != 40) {
			rpipe_fail(p, "SCRIPT LOAD gave an unexpected reply");
			return;
		}
		memcpy(p->sha[id], r->str, 40);
		p->sha[id][40] = '\0';
	}
	/* the last setup command of a command connection is the last SCRIPT LOAD */
	if (p->kind == RPIPE_COMMANDS && p->inflight == 0)
		rpipe_became_ready(p);
}

/* __redis__:invalidate messages: ["message", channel, [keys] | nil]; the first reply confirms SUBSCRIBE. */
static void
rpipe_notify_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct rpipe *p = ac->data;
	redisReply *r = reply;
	if (r == NULL || p->ac != ac)
		return;
	p->last_progress = now_mono();
	if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "SUBSCRIBE failed: %.250s", r->str);
		rpipe_fail(p, why);
		return;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || r->element[0]->type != REDIS_REPLY_STRING)
		return;
	const char *kind = r->element[0]->str;
	if (strcmp(kind, "subscribe") == 0) {
		if (!p->ready)
			rpipe_became_ready(p);
		return;
	}
	if (strcmp(kind, "message") != 0 || p->on_invalidate == NULL)
		return;
	redisReply *keys = r->element[2];
	if (keys->type == REDIS_REPLY_ARRAY) {
		for (size_t i = 0; i < keys->elements; i++)
			if (keys->element[i]->type == REDIS_REPLY_STRING)
				p->on_invalidate(p, keys->element[i]->str, keys->element[i]->len);
	} else {
		p->on_invalidate(p, NULL, 0); /* FLUSHALL/FLUSHDB: everything changed */
	}
}

static void
rpipe_connect_cb(const redisAsyncContext *ac, int status)
{
	struct rpipe *p = ac->data;
	if (p->ac != ac)
		return;
	if (status != REDIS_OK) {
		/* hiredis frees the context after this callback */
		rpipe_gone(p, ac->errstr[0] ? ac->errstr : "connect failed");
		return;
	}
	if (p->url->path == NULL)
		redisEnableKeepAlive((redisContext *)&ac->c);
	const char **a;
	static const char *const scripts_step[SCRIPT_COUNT] = {
	    "SCRIPT LOAD 0", "SCRIPT LOAD 1", "SCRIPT LOAD 2", "SCRIPT LOAD 3", "SCRIPT LOAD 4",  "SCRIPT LOAD 5",
	    "SCRIPT LOAD 6", "SCRIPT LOAD 7", "SCRIPT LOAD 8", "SCRIPT LOAD 9", "SCRIPT LOAD 10", "SCRIPT LOAD 11",
	};
	_Static_assert(SCRIPT_COUNT == 12, "one setup step name per script");
	if (p->url->password != NULL) {
		const char *auth[] = {"AUTH", p->url->user ? p->url->user : p->url->password, p->url->password};
		a = auth;
		rpipe_queue(p, rpipe_setup_reply, "AUTH", p->url->user ? 3 : 2, a, NULL);
	}
	char db[16], name[64];
	snprintf(db, sizeof db, "%d", p->url->db);
	snprintf(name, sizeof name, "spark-worker:%ld%s", p->w->pid, p->kind == RPIPE_NOTIFY ? ":notify" : "");
	const char *setname[] = {"CLIENT", "SETNAME", name};
	rpipe_queue(p, rpipe_setup_reply, "CLIENT SETNAME", 3, setname, NULL);
	const char *id[] = {"CLIENT", "ID"};
	rpipe_queue(p, rpipe_setup_reply, "CLIENT ID", 2, id, NULL);
	if (p->kind == RPIPE_NOTIFY) {
		const char *sub[] = {"SUBSCRIBE", KEY_INVALIDATE};
		size_t sl[] = {9, strlen(KEY_INVALIDATE)};
		redisAsyncCommandArgv(p->ac, rpipe_notify_reply, NULL, 2, sub, sl);
		return;
	}
	if (p->url->db != 0) {
		const char *sel[] = {"SELECT", db};
		rpipe_queue(p, rpipe_setup_reply, "SELECT", 2, sel, NULL);
	}
	for (int i = 0; i < SCRIPT_COUNT; i++) {
		const char *load[] = {"SCRIPT", "LOAD", script_src[i]};
		rpipe_queue(p, rpipe_setup_reply, (void *)scripts_step[i], 3, load, NULL);
	}
}

static void
rpipe_disconnect_cb(const redisAsyncContext *ac, int status)
{
	struct rpipe *p = ac->data;
	if (p->ac == ac)
		rpipe_gone(p, ac->errstr[0] ? ac->errstr : "connection closed");
}

static void
rpipe_connect(struct rpipe *p)
{
	if (p->ac != NULL)
		return;
	redisAsyncContext *ac =
	    p->url->path ? redisAsyncConnectUnix(p->url->path) : redisAsyncConnect(p->url->host, p->url->port);
	if (ac == NULL) {
		log_warnx("%s: out of memory for a connection", p->what);
		return;
	}
	ac->data = p;
	p->ac = ac;
	p->last_progress = now_mono();
	if (ac->err) {
		char why[256];
		spark_strlcpy(why, ac->errstr, sizeof why);
		rpipe_gone(p, why);
		redisAsyncFree(ac);
		return;
	}
	rpipe_glue_attach(p, ac);
	redisAsyncSetConnectCallback(ac, rpipe_connect_cb);
	redisAsyncSetDisconnectCallback(ac, rpipe_disconnect_cb);
}

void
rpipe_start(struct rpipe *p)
{
	rpipe_connect(p);
}

void
rpipe_close(struct rpipe *p)
{
	redisAsyncContext *ac = p->ac;
	p->on_down = NULL;
	p->on_up = NULL;
	p->ac = NULL;
	p->ready = false;
	if (ac != NULL)
		redisAsyncFree(ac);
	if (p->retry_ev != NULL)
		event_free(p->retry_ev);
	p->retry_ev = NULL;
	sbuf_free(&p->fmt);
	rpipe_glue_free(p); /* after redisAsyncFree: every reply has come back */
	while (p->free_calls != NULL) {
		struct rcall *c = p->free_calls;
		p->free_calls = c->next;
		free(c);
	}
}

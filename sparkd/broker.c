/*
 * sparkd's broker connections (DESIGN §2): one for commands, one subscribed to the mailbox channel (a
 * subscribed hiredis connection cannot send anything else). Both are hiredis async contexts on sparkd's loop;
 * either one lost takes both down, and they come back together after a backoff. The state and the last error
 * are kept for status.
 */
#include <hiredis/adapters/libevent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "celery.h"

#define BROKER_BACKOFF_MIN     0.1
#define BROKER_BACKOFF_MAX     5.0
#define BROKER_CONNECT_TIMEOUT 5.0 /* hiredis 0.14's async connect has no timeout of its own */

static void broker_connect(struct sd_broker *b);

const char *
broker_state_name(enum broker_state s)
{
	static const char *const names[] = {"connecting", "up", "down"};
	return s <= BROKER_DOWN ? names[s] : "down";
}

bool
broker_up(const struct sd_broker *b)
{
	return b->state == BROKER_UP;
}

static void
broker_set_state(struct sd_broker *b, enum broker_state st, const char *why)
{
	if (b->state != st)
		b->since = now_wall();
	b->state = st;
	spark_strlcpy(b->error, why ? why : "", sizeof b->error);
}

static void
broker_tv(double s, struct timeval *tv)
{
	tv->tv_sec = (time_t)s;
	tv->tv_usec = (suseconds_t)((s - (double)(time_t)s) * 1e6);
}

/* Drop one connection's context. Its pending callbacks get NULL replies (now, or after the callback that is
 * running returns: hiredis defers the free), and its own disconnect callback sees ac != c->ac and does nothing. */
static void
conn_drop(struct broker_conn *c)
{
	redisAsyncContext *ac = c->ac;
	c->ac = NULL;
	c->ready = false;
	if (ac != NULL)
		redisAsyncFree(ac);
}

/* The one path for a lost broker: either connection failed, hung or answered its setup with an error. */
static void
broker_fail(struct sd_broker *b, const char *why)
{
	if (b->closing)
		return;
	bool was_up = b->state == BROKER_UP;
	char msg[sizeof b->error];
	spark_strlcpy(msg, why, sizeof msg);
	conn_drop(&b->cmd);
	conn_drop(&b->sub);
	evtimer_del(b->connect_timeout_ev);
	if (was_up || b->state != BROKER_DOWN || strcmp(b->error, msg) != 0)
		log_warnx("broker connection %s: %s; retrying in %.1fs", was_up ? "lost" : "failed", msg, b->backoff);
	broker_set_state(b, BROKER_DOWN, msg);
	struct timeval tv;
	broker_tv(b->backoff, &tv);
	evtimer_add(b->retry_ev, &tv);
	b->backoff = b->backoff * 2 > BROKER_BACKOFF_MAX ? BROKER_BACKOFF_MAX : b->backoff * 2;
}

static void
broker_check_ready(struct sd_broker *b)
{
	if (!b->cmd.ready || !b->sub.ready || b->state == BROKER_UP)
		return;
	evtimer_del(b->connect_timeout_ev);
	b->backoff = BROKER_BACKOFF_MIN;
	log_info("broker connection up (%s)", b->pidbox_channel);
	broker_set_state(b, BROKER_UP, NULL);
	celery_broker_up(b->sd);
}

static void
conn_setup_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	struct broker_conn *c = ac->data;
	redisReply *r = reply;
	if (c == NULL || c->ac != ac)
		return;
	if (r == NULL) {
		broker_fail(c->b, ac->errstr[0] ? ac->errstr : "connection closed during setup");
		return;
	}
	if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "%s: %.200s", (const char *)priv, r->str);
		broker_fail(c->b, why);
		return;
	}
	if (--c->setup_left == 0 && !c->subscriber) {
		c->ready = true;
		broker_check_ready(c->b);
	}
}

/* Every message on the mailbox channel: ["pmessage", pattern, channel, data]; the first reply confirms. */
static void
conn_sub_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	struct broker_conn *c = ac->data;
	redisReply *r = reply;
	if (c == NULL || c->ac != ac || r == NULL)
		return;
	if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "PSUBSCRIBE: %.200s", r->str);
		broker_fail(c->b, why);
		return;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || r->element[0]->type != REDIS_REPLY_STRING)
		return;
	if (strcmp(r->element[0]->str, "psubscribe") == 0) {
		c->ready = true;
		broker_check_ready(c->b);
		return;
	}
	if (strcmp(r->element[0]->str, "pmessage") == 0 && r->elements >= 4 &&
	    r->element[3]->type == REDIS_REPLY_STRING)
		pidbox_message(c->b->sd, r->element[3]->str, r->element[3]->len);
}

static void
conn_connect_cb(const redisAsyncContext *cac, int status)
{
	redisAsyncContext *ac = (redisAsyncContext *)cac;
	struct broker_conn *c = ac->data;
	if (c == NULL || c->ac != ac)
		return;
	struct sd_broker *b = c->b;
	const struct redis_url *u = &b->sd->cfg.broker;
	if (status != REDIS_OK) {
		/* hiredis frees the context after this callback */
		c->ac = NULL;
		broker_fail(b, ac->errstr[0] ? ac->errstr : "connect failed");
		return;
	}
	if (u->path == NULL)
		redisEnableKeepAlive(&ac->c);
	c->setup_left = 0;
	if (u->password != NULL) {
		const char *auth[] = {"AUTH", u->user ? u->user : u->password, u->password};
		redisAsyncCommandArgv(ac, conn_setup_reply, (void *)"AUTH", u->user ? 3 : 2, auth, NULL);
		c->setup_left++;
	}
	if (c->subscriber) {
		const char *ps[] = {"PSUBSCRIBE", b->pidbox_channel};
		redisAsyncCommandArgv(ac, conn_sub_reply, NULL, 2, ps, NULL);
		return;
	}
	char db[16], name[64];
	snprintf(db, sizeof db, "%d", u->db);
	snprintf(name, sizeof name, "sparkd:%ld", (long)b->sd->pid);
	const char *setname[] = {"CLIENT", "SETNAME", name};
	redisAsyncCommandArgv(ac, conn_setup_reply, (void *)"CLIENT SETNAME", 3, setname, NULL);
	c->setup_left++;
	if (u->db != 0) {
		const char *sel[] = {"SELECT", db};
		redisAsyncCommandArgv(ac, conn_setup_reply, (void *)"SELECT", 2, sel, NULL);
		c->setup_left++;
	}
}

static void
conn_disconnect_cb(const redisAsyncContext *ac, int status)
{
	struct broker_conn *c = ac->data;
	if (c == NULL || c->ac != ac)
		return;
	/* hiredis frees the context after this callback */
	c->ac = NULL;
	broker_fail(c->b, ac->errstr[0] ? ac->errstr : "connection closed");
}

static int
conn_open(struct sd_broker *b, struct broker_conn *c)
{
	const struct redis_url *u = &b->sd->cfg.broker;
	redisAsyncContext *ac = u->path ? redisAsyncConnectUnix(u->path) : redisAsyncConnect(u->host, u->port);
	if (ac == NULL) {
		broker_fail(b, "out of memory for a connection");
		return -1;
	}
	if (ac->err) {
		char why[256];
		spark_strlcpy(why, ac->errstr, sizeof why);
		redisAsyncFree(ac);
		broker_fail(b, why);
		return -1;
	}
	ac->data = c;
	c->ac = ac;
	c->ready = false;
	redisLibeventAttach(ac, b->sd->base);
	redisAsyncSetConnectCallback(ac, conn_connect_cb);
	redisAsyncSetDisconnectCallback(ac, conn_disconnect_cb);
	return 0;
}

static void
broker_connect(struct sd_broker *b)
{
	if (b->closing || b->cmd.ac != NULL || b->sub.ac != NULL)
		return;
	if (b->state != BROKER_DOWN)
		broker_set_state(b, BROKER_CONNECTING, NULL);
	if (conn_open(b, &b->cmd) < 0 || conn_open(b, &b->sub) < 0)
		return;
	struct timeval tv;
	broker_tv(BROKER_CONNECT_TIMEOUT, &tv);
	evtimer_add(b->connect_timeout_ev, &tv);
}

static void
broker_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	broker_connect(arg);
}

static void
broker_connect_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sd_broker *b = arg;
	if (b->state != BROKER_UP)
		broker_fail(b, "no answer from the broker within 5s");
}

void
broker_init(struct sparkd *sd, struct sd_broker *b)
{
	memset(b, 0, sizeof *b);
	b->sd = sd;
	b->cmd.b = b->sub.b = b;
	b->sub.subscriber = true;
	b->backoff = BROKER_BACKOFF_MIN;
	b->since = now_wall();
	b->retry_ev = evtimer_new(sd->base, broker_retry_cb, b);
	b->connect_timeout_ev = evtimer_new(sd->base, broker_connect_timeout_cb, b);
	if (b->retry_ev == NULL || b->connect_timeout_ev == NULL)
		fatalx("out of memory (timer)");
	broker_fanout_channel(b, CEL_MAILBOX_EXCHANGE, NULL, b->pidbox_channel, sizeof b->pidbox_channel);
}

void
broker_start(struct sd_broker *b)
{
	broker_connect(b);
}

void
broker_free(struct sd_broker *b)
{
	b->closing = true;
	conn_drop(&b->cmd);
	conn_drop(&b->sub);
	if (b->retry_ev != NULL)
		event_free(b->retry_ev);
	if (b->connect_timeout_ev != NULL)
		event_free(b->connect_timeout_ev);
	b->retry_ev = b->connect_timeout_ev = NULL;
}

int
broker_cmd(struct sd_broker *b, redisCallbackFn *cb, void *priv, int argc, const char **argv, const size_t *lens)
{
	if (!broker_up(b) || b->cmd.ac == NULL)
		return -1;
	return redisAsyncCommandArgv(b->cmd.ac, cb, priv, argc, argv, lens) == REDIS_OK ? 0 : -1;
}

void
broker_fanout_channel(const struct sd_broker *b, const char *exchange, const char *rk, char *buf, size_t len)
{
	int db = b->sd->cfg.broker.db;
	if (rk != NULL && rk[0] != '\0')
		snprintf(buf, len, "/%d.%s/%s", db, exchange, rk);
	else
		snprintf(buf, len, "/%d.%s", db, exchange);
}

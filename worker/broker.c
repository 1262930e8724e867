/*
 * Redis side of the engine: connections that reconnect, the Lua scripts that keep every message in Redis at
 * every instant (DESIGN §6), and the recovery sweeps.
 *
 * Envelopes are never re-encoded inside Lua (cjson turns [] into {}): scripts only read fields and move the
 * original strings. Where kombu re-serializes (redelivered flags), C does it with jansson and Lua checks that
 * the original is still where it was before it moves the new text.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "report.h"
#include "util.h"
#include "worker.h"

/*
 * Records a fetched message in kombu's unacked hash and unacked_index zset, exactly as QoS.append does.
 * The three fields it needs are read with patterns first (a JSON key cannot occur unescaped inside a string
 * value, and kombu writes them as plain strings); decoding the whole envelope with cjson cost most of the
 * fetch's time in Redis, so it is kept for unusual shapes only.
 */
#define LUA_RECORD_FN                                                                                                  \
	"local function record(m, now, qname, unacked, index)\n"                                                       \
	"  local tag = string.match(m, '\"delivery_tag\"%s*:%s*\"([^\"\\\\]+)\"')\n"                                   \
	"  local di = tag and string.match(m, '\"delivery_info\"%s*:%s*(%b{})')\n"                                     \
	"  if di then\n"                                                                                               \
	"    local ex = string.match(di, '\"exchange\"%s*:%s*\"([^\"\\\\]*)\"')\n"                                     \
	"    local rk = string.match(di, '\"routing_key\"%s*:%s*\"([^\"\\\\]*)\"')\n"                                  \
	"    if ex and rk then\n"                                                                                      \
	"      if rk == '' then rk = qname end\n"                                                                      \
	"      redis.call('HSET', unacked, tag, '[' .. m .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. "  \
	"']')\n"                                                                                                       \
	"      redis.call('ZADD', index, now, tag)\n"                                                                  \
	"      return tag\n"                                                                                           \
	"    end\n"                                                                                                    \
	"  end\n"                                                                                                      \
	"  local ok, env = pcall(cjson.decode, m)\n"                                                                   \
	"  if not ok or type(env) ~= 'table' or type(env.properties) ~= 'table' then return '' end\n"                  \
	"  local tag = env.properties.delivery_tag\n"                                                                  \
	"  if type(tag) ~= 'string' or tag == '' then return '' end\n"                                                 \
	"  local ex, rk = '', qname\n"                                                                                 \
	"  local di = env.properties.delivery_info\n"                                                                  \
	"  if type(di) == 'table' then\n"                                                                              \
	"    if type(di.exchange) == 'string' then ex = di.exchange end\n"                                             \
	"    if type(di.routing_key) == 'string' and di.routing_key ~= '' then rk = di.routing_key end\n"              \
	"  end\n"                                                                                                      \
	"  redis.call('HSET', unacked, tag, '[' .. m .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. "      \
	"']')\n"                                                                                                       \
	"  redis.call('ZADD', index, now, tag)\n"                                                                      \
	"  return tag\n"                                                                                               \
	"end\n"

/*
 * Celery's _store_result: never overwrite a SUCCESS, then SETEX + PUBLISH on the key's own name.
 * Celery (and we) write "status" first; a meta in another shape is decoded in full.
 */
#define LUA_STORE_FN                                                                                                   \
	"local function store(key, meta, ttl)\n"                                                                       \
	"  local cur = redis.call('GET', key)\n"                                                                       \
	"  if cur then\n"                                                                                              \
	"    local st = string.match(cur, '^%s*{%s*\"status\"%s*:%s*\"(%u+)\"')\n"                                     \
	"    if not st then\n"                                                                                         \
	"      local ok, d = pcall(cjson.decode, cur)\n"                                                               \
	"      if ok and type(d) == 'table' then st = d.status end\n"                                                  \
	"    end\n"                                                                                                    \
	"    if st == 'SUCCESS' then return 0 end\n"                                                                   \
	"  end\n"                                                                                                      \
	"  redis.call('SETEX', key, ttl, meta)\n"                                                                      \
	"  redis.call('PUBLISH', key, meta)\n"                                                                         \
	"  return 1\n"                                                                                                 \
	"end\n"

static const char *const script_src[SCRIPT_COUNT] = {
    /* FETCH. KEYS: processing, unacked, unacked_index, queue keys in kombu's order. ARGV: now, queue names. */
    [SCRIPT_FETCH] =
        LUA_RECORD_FN "for i = 4, #KEYS do\n"
                      "  local m = redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT')\n"
                      "  if m then return {KEYS[i], m, record(m, ARGV[1], ARGV[i - 2], KEYS[2], KEYS[3])} end\n"
                      "end\n"
                      "return false\n",
    /* RECORD (after BLMOVE into the landing list). KEYS: landing, processing, unacked, unacked_index.
       ARGV: message, now, queue name. */
    [SCRIPT_RECORD] = LUA_RECORD_FN "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return false end\n"
                                    "redis.call('LPUSH', KEYS[2], ARGV[1])\n"
                                    "return record(ARGV[1], ARGV[2], ARGV[3], KEYS[3], KEYS[4])\n",
    /* ACK. KEYS: processing, unacked, unacked_index. ARGV: message, tag. */
    [SCRIPT_ACK] = "redis.call('LREM', KEYS[1], 1, ARGV[1])\n"
                   "if ARGV[2] ~= '' then\n"
                   "  redis.call('HDEL', KEYS[2], ARGV[2])\n"
                   "  redis.call('ZREM', KEYS[3], ARGV[2])\n"
                   "end\n"
                   "return 1\n",
    /* DEADLETTER. KEYS: processing, unacked, unacked_index, deadletter. ARGV: message, tag, entry. */
    [SCRIPT_DEADLETTER] = "redis.call('LREM', KEYS[1], 1, ARGV[1])\n"
                          "if ARGV[2] ~= '' then\n"
                          "  redis.call('HDEL', KEYS[2], ARGV[2])\n"
                          "  redis.call('ZREM', KEYS[3], ARGV[2])\n"
                          "end\n"
                          "redis.call('LPUSH', KEYS[4], ARGV[3])\n"
                          "return 1\n",
    /* PARK (ETA, defer). KEYS: processing, unacked, unacked_index, spark:eta. ARGV: message, tag, score, member. */
    [SCRIPT_PARK] = "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
                    "if ARGV[2] ~= '' then\n"
                    "  redis.call('HDEL', KEYS[2], ARGV[2])\n"
                    "  redis.call('ZREM', KEYS[3], ARGV[2])\n"
                    "end\n"
                    "redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])\n"
                    "return 1\n",
    /*
     * REQUEUE. KEYS: list, unacked, unacked_index, destination. ARGV: message, new message, tag, mode.
     * mode "list": a processing list. Its unacked records may be missing: a message taken with the plain LMOVE
     * is recorded just after, and its owner may have died in between. So a message in the list is always pushed
     * back: at least once, never lost. (The only duplicate: a dead owner's message that kombu's sweep also
     * restored, which takes an owner dead for longer than the visibility timeout.)
     * mode "landing": a landing list, never recorded in unacked.
     */
    [SCRIPT_REQUEUE] = "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
                       "if ARGV[4] == 'list' and ARGV[3] ~= '' then\n"
                       "  redis.call('HDEL', KEYS[2], ARGV[3])\n"
                       "  redis.call('ZREM', KEYS[3], ARGV[3])\n"
                       "end\n"
                       "redis.call('RPUSH', KEYS[4], ARGV[2])\n"
                       "return 1\n",
    /* DUE. KEYS: spark:eta, deadletter. ARGV: now, limit. */
    [SCRIPT_DUE] =
        "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))\n"
        "for _, member in ipairs(due) do\n"
        "  redis.call('ZREM', KEYS[1], member)\n"
        "  local ok, e = pcall(cjson.decode, member)\n"
        "  if ok and type(e) == 'table' and type(e.queue) == 'string' and type(e.envelope) == 'string' then\n"
        "    redis.call('RPUSH', e.queue, e.envelope)\n"
        "  else\n"
        "    redis.call('LPUSH', KEYS[2], cjson.encode({reason = 'unreadable spark:eta entry', queue = cjson.null,\n"
        "      at = tonumber(ARGV[1]), message = member}))\n"
        "  end\n"
        "end\n"
        "return #due\n",
    /* SWEEP_ONE (kombu's restore_by_tag). KEYS: unacked, unacked_index, destination.
       ARGV: tag, value read before, new message, push ("1"/"0"). */
    [SCRIPT_SWEEP_ONE] = "local v = redis.call('HGET', KEYS[1], ARGV[1])\n"
                         "if not v then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end\n"
                         "if v ~= ARGV[2] then return 0 end\n"
                         "redis.call('HDEL', KEYS[1], ARGV[1])\n"
                         "redis.call('ZREM', KEYS[2], ARGV[1])\n"
                         "if ARGV[4] == '1' then redis.call('RPUSH', KEYS[3], ARGV[3]) end\n"
                         "return 1\n",
    /* UNLOCK (redis-py's lock release). KEYS: mutex. ARGV: token. */
    [SCRIPT_UNLOCK] = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end\n"
                      "return 0\n",
    /* UNREGISTER. KEYS: spark:processing, list, landing, alive key. ARGV: member. */
    [SCRIPT_UNREGISTER] = "if redis.call('LLEN', KEYS[2]) == 0 and redis.call('LLEN', KEYS[3]) == 0 then\n"
                          "  redis.call('SREM', KEYS[1], ARGV[1])\n"
                          "  redis.call('DEL', KEYS[4])\n"
                          "  return 1\n"
                          "end\n"
                          "return 0\n",
    /* STORE (Celery result meta). KEYS: meta key. ARGV: meta, expires. Never overwrites a SUCCESS. */
    [SCRIPT_STORE] = LUA_STORE_FN "return store(KEYS[1], ARGV[1], ARGV[2])\n",
    /*
     * FINISH: the result and the ack in one atomic call, when the result backend is the broker's server.
     * KEYS: processing, unacked, unacked_index, meta key. ARGV: message, tag, meta, expires, backend db, broker db.
     */
    [SCRIPT_FINISH] = LUA_STORE_FN "redis.call('SELECT', ARGV[5])\n"
                                   "store(KEYS[4], ARGV[3], ARGV[4])\n"
                                   "redis.call('SELECT', ARGV[6])\n"
                                   "redis.call('LREM', KEYS[1], 1, ARGV[1])\n"
                                   "if ARGV[2] ~= '' then\n"
                                   "  redis.call('HDEL', KEYS[2], ARGV[2])\n"
                                   "  redis.call('ZREM', KEYS[3], ARGV[2])\n"
                                   "end\n"
                                   "return 1\n",
};

/* ---------------------------------------------------------------- connections */

void
rconn_init(struct rconn *rc, struct worker *w, const struct redis_url *url, const char *what)
{
	memset(rc, 0, sizeof *rc);
	rc->w = w;
	rc->url = url;
	rc->what = what;
}

void
rconn_close(struct rconn *rc)
{
	if (rc->pending > 0)
		rc->queued_lost = true;
	rc->pending = 0;
	if (rc->c != NULL)
		redisFree(rc->c);
	rc->c = NULL;
}

static void
rconn_where(const struct rconn *rc, char *buf, size_t len)
{
	if (rc->url->path != NULL)
		snprintf(buf, len, "unix://%s?db=%d", rc->url->path, rc->url->db);
	else
		snprintf(buf, len, "redis://%s:%d/%d", rc->url->host, rc->url->port, rc->url->db);
}

/* First failure of a connection: log once, and tell sparkd while any connection of the process is down. */
static void
rconn_mark_down(struct rconn *rc, const char *why)
{
	if (rc->down)
		return;
	rc->down = true;
	char where[300];
	rconn_where(rc, where, sizeof where);
	log_warnx("%s %s unreachable: %s; reconnecting", rc->what, where, why);
	if (rc->w != NULL && atomic_fetch_add(&rc->w->down, 1) == 0) {
		char *text = xasprintf("%s %s unreachable: %s", rc->what, where, why);
		char *field = report_escape(text);
		report_send("problem %s", field);
		free(field);
		free(text);
	}
}

static void
rconn_mark_up(struct rconn *rc)
{
	rc->backoff = 0;
	if (!rc->down)
		return;
	rc->down = false;
	log_info("%s connection restored", rc->what);
	if (rc->w != NULL && atomic_fetch_sub(&rc->w->down, 1) == 1)
		report_send("problem");
}

/* A failed connect or command: the next rconn_ensure waits a growing delay (100 ms -> 5 s) first. */
static void
rconn_fail(struct rconn *rc, const char *why)
{
	rconn_mark_down(rc, why);
	rc->backoff = rc->backoff <= 0 ? 0.1 : rc->backoff * 2;
	if (rc->backoff > 5)
		rc->backoff = 5;
}

static void
rconn_drop(struct rconn *rc, const char *why)
{
	rconn_fail(rc, why);
	rconn_close(rc);
}

static int
reply_is_ok(redisReply *r)
{
	return r != NULL && r->type != REDIS_REPLY_ERROR;
}

/*
 * Load every script on a new connection and keep the SHA-1 names Redis returns for EVALSHA: Redis computes
 * them, so the worker need not load libcrypto (its ~1.6 MiB RSS in every worker process) just for SHA-1.
 * Pipelined: one round trip. A server that forgets them later (SCRIPT FLUSH, restart) gets EVAL on NOSCRIPT.
 */
static int
rconn_load_scripts(struct rconn *rc, redisContext *c, char *err, size_t errlen)
{
	for (int i = 0; i < SCRIPT_COUNT; i++)
		if (redisAppendCommand(c, "SCRIPT LOAD %s", script_src[i]) != REDIS_OK) {
			snprintf(err, errlen, "SCRIPT LOAD failed: %s", c->errstr);
			return -1;
		}
	int rv = 0;
	for (int i = 0; i < SCRIPT_COUNT; i++) {
		void *reply = NULL;
		if (redisGetReply(c, &reply) != REDIS_OK || reply == NULL) {
			snprintf(err, errlen, "SCRIPT LOAD failed: %s", c->errstr[0] ? c->errstr : "connection lost");
			return -1;
		}
		redisReply *r = reply;
		if (rv == 0 && (r->type != REDIS_REPLY_STRING || r->len != 40)) {
			snprintf(err, errlen, "SCRIPT LOAD failed: %.200s",
			         r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
			rv = -1; /* keep reading: the remaining replies are still on the wire */
		} else if (rv == 0) {
			memcpy(rc->sha[i], r->str, 40);
			rc->sha[i][40] = '\0';
		}
		freeReplyObject(r);
	}
	return rv;
}

static int
rconn_connect(struct rconn *rc, char *err, size_t errlen)
{
	struct timeval ctv = {2, 0};
	redisContext *c = rc->url->path ? redisConnectUnixWithTimeout(rc->url->path, ctv)
	                                : redisConnectWithTimeout(rc->url->host, rc->url->port, ctv);
	if (c == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (c->err) {
		snprintf(err, errlen, "%s", c->errstr);
		redisFree(c);
		return -1;
	}
	/* blocking commands use short timeouts (FETCH_BLOCK_S), so this only catches a hung server */
	struct timeval tv = {10, 0};
	redisSetTimeout(c, tv);
	if (rc->url->path == NULL)
		redisEnableKeepAlive(c);
	redisReply *r = NULL;
	if (rc->url->password != NULL) {
		if (rc->url->user != NULL)
			r = redisCommand(c, "AUTH %s %s", rc->url->user, rc->url->password);
		else
			r = redisCommand(c, "AUTH %s", rc->url->password);
		if (!reply_is_ok(r)) {
			snprintf(err, errlen, "authentication failed: %s", r ? r->str : c->errstr);
			goto fail;
		}
		freeReplyObject(r);
	}
	if (rc->url->db != 0) {
		r = redisCommand(c, "SELECT %d", rc->url->db);
		if (!reply_is_ok(r)) {
			snprintf(err, errlen, "SELECT %d failed: %s", rc->url->db, r ? r->str : c->errstr);
			goto fail;
		}
		freeReplyObject(r);
	}
	if (rconn_load_scripts(rc, c, err, errlen) < 0) {
		redisFree(c);
		return -1;
	}
	rc->c = c;
	rc->gen++;
	return 0;
fail:
	if (r != NULL)
		freeReplyObject(r);
	redisFree(c);
	return -1;
}

int
rconn_ensure(struct rconn *rc, const atomic_int *abort, double max_wait)
{
	double start = now_mono();
	while (rc->c == NULL) {
		if (rc->down) {
			/* the connection stays "down" until a command succeeds: a server that accepts connections but
			 * answers errors (LOADING after a restart) is retried with the same backoff */
			double until = now_mono() + rc->backoff;
			bool last = max_wait >= 0 && until > start + max_wait;
			if (last)
				until = start + max_wait; /* wait out the budget anyway: callers loop on failure */
			while (now_mono() < until) {
				if (abort != NULL && atomic_load(abort))
					return -1;
				struct timespec ts = {0, 20 * 1000 * 1000};
				nanosleep(&ts, NULL);
			}
			if (last)
				return -1;
		}
		if (abort != NULL && atomic_load(abort))
			return -1;
		char err[256];
		if (rconn_connect(rc, err, sizeof err) == 0)
			break;
		rconn_fail(rc, err);
		if (max_wait >= 0 && now_mono() >= start + max_wait)
			return -1;
	}
	return 0;
}

/* Read the replies of commands sent without waiting, so the next reply read is the next command's. */
static int
rconn_drain(struct rconn *rc)
{
	while (rc->pending > 0)
		if (rconn_collect(rc) < 0)
			return -1;
	return 0;
}

/* The reply of a synchronous command: NULL means the connection failed (and is dropped). */
static redisReply *
rconn_took(struct rconn *rc, redisReply *r)
{
	if (r == NULL) {
		rconn_drop(rc, rc->c->errstr[0] ? rc->c->errstr : "connection lost");
		return NULL;
	}
	if (r->type != REDIS_REPLY_ERROR)
		rconn_mark_up(rc);
	return r;
}

redisReply *
rconn_argv(struct rconn *rc, int argc, const char **argv, const size_t *lens)
{
	if (rc->c == NULL || rconn_drain(rc) < 0)
		return NULL;
	return rconn_took(rc, redisCommandArgv(rc->c, argc, argv, lens));
}

redisReply *
rconn_command(struct rconn *rc, const char *fmt, ...)
{
	if (rc->c == NULL || rconn_drain(rc) < 0)
		return NULL;
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(rc->c, fmt, ap);
	va_end(ap);
	return rconn_took(rc, r);
}

/* EVALSHA sha nkeys keys... args... (caller frees *av and *al) */
static int
eval_argv(struct rconn *rc, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens, char nk[16],
          const char ***av, size_t **al)
{
	int argc = 3 + nkeys + nargs;
	*av = xcalloc((size_t)argc, sizeof **av);
	*al = xcalloc((size_t)argc, sizeof **al);
	snprintf(nk, 16, "%d", nkeys);
	(*av)[0] = "EVALSHA";
	(*av)[1] = rc->sha[id];
	(*av)[2] = nk;
	for (int i = 0; i < 3; i++)
		(*al)[i] = strlen((*av)[i]);
	for (int i = 0; i < nkeys + nargs; i++) {
		(*av)[3 + i] = argv[i];
		(*al)[3 + i] = lens ? lens[i] : strlen(argv[i]);
	}
	return argc;
}

redisReply *
rconn_eval(struct rconn *rc, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens)
{
	const char **av;
	size_t *al;
	char nk[16];
	int argc = eval_argv(rc, id, nkeys, nargs, argv, lens, nk, &av, &al);
	redisReply *r = rconn_argv(rc, argc, av, al);
	if (r != NULL && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
		freeReplyObject(r);
		av[0] = "EVAL";
		av[1] = script_src[id];
		al[0] = 4;
		al[1] = strlen(script_src[id]);
		r = rconn_argv(rc, argc, av, al);
	}
	free(av);
	free(al);
	/* an error reply (LOADING after a restart, OOM, READONLY...) is treated like a lost connection: the caller
	 * retries after a reconnect with backoff, so nothing that must be recorded is given up */
	if (r != NULL && r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "error reply: %.250s", r->str);
		freeReplyObject(r);
		rconn_drop(rc, why);
		return NULL;
	}
	return r;
}

int
rconn_eval_send(struct rconn *rc, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens)
{
	if (rc->c == NULL)
		return -1;
	const char **av;
	size_t *al;
	char nk[16];
	int argc = eval_argv(rc, id, nkeys, nargs, argv, lens, nk, &av, &al);
	int rv = rconn_send(rc, argc, av, al);
	free(av);
	free(al);
	return rv;
}

int
rconn_flush(struct rconn *rc)
{
	if (rc->c == NULL)
		return -1;
	int done = 0;
	while (!done)
		if (redisBufferWrite(rc->c, &done) != REDIS_OK) {
			rconn_drop(rc, rc->c->errstr[0] ? rc->c->errstr : "connection lost");
			return -1;
		}
	return 0;
}

int
rconn_send(struct rconn *rc, int argc, const char **argv, const size_t *lens)
{
	if (rc->c == NULL)
		return -1;
	if (redisAppendCommandArgv(rc->c, argc, argv, lens) != REDIS_OK) {
		rconn_drop(rc, "cannot queue a command");
		return -1;
	}
	rc->pending++;
	return 0;
}

/* One reply of a command sent without waiting; NULL (connection dropped) when it cannot be read. */
static redisReply *
rconn_read_reply(struct rconn *rc)
{
	if (rc->c == NULL)
		return NULL;
	if (rc->pending > 0)
		rc->pending--;
	void *reply = NULL;
	if (redisGetReply(rc->c, &reply) != REDIS_OK || reply == NULL) {
		rconn_drop(rc, rc->c->errstr[0] ? rc->c->errstr : "connection lost");
		return NULL;
	}
	return reply;
}

int
rconn_collect(struct rconn *rc)
{
	redisReply *r = rconn_read_reply(rc);
	if (r == NULL)
		return -1;
	int rv = 0;
	if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "error reply: %.250s", r->str);
		rconn_drop(rc, why);
		rv = -1;
	} else {
		rconn_mark_up(rc);
	}
	freeReplyObject(r);
	return rv;
}

/* ---------------------------------------------------------------- messages this process holds */

void
held_free(struct held *h)
{
	free(h->raw);
	free(h->tag);
	free(h->qkey);
	memset(h, 0, sizeof *h);
}

static char *
score_str(double t, char *buf, size_t len)
{
	snprintf(buf, len, "%.6f", t);
	return buf;
}

static void
held_set(struct held *h, const char *key, const char *raw, size_t len, const char *tag)
{
	held_free(h);
	h->raw = xmalloc(len + 1);
	memcpy(h->raw, raw, len);
	h->raw[len] = '\0';
	h->len = len;
	h->tag = xstrdup(tag ? tag : "");
	h->qkey = xstrdup(key);
}

/* The landing step: a message BLMOVEd into the landing list is moved to the processing list and recorded. */
static int
broker_record(struct rconn *rc, struct held *h)
{
	struct worker *w = rc->w;
	char now[64];
	char *qname = message_queue_of_key(h->qkey);
	const char *argv[] = {
	    w->landing_key, w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, h->raw, score_str(now_wall(), now, sizeof now),
	    qname};
	size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]),
	                 h->len,          strlen(now),     strlen(qname)};
	redisReply *r = rconn_eval(rc, SCRIPT_RECORD, 4, 3, argv, lens);
	free(qname);
	if (r == NULL)
		return -1;
	int rv = 0;
	if (r->type == REDIS_REPLY_STRING) {
		free(h->tag);
		h->tag = xstrndup(r->str, r->len);
		rv = 1;
	}
	freeReplyObject(r);
	return rv;
}

/* Read queued replies but the last `keep`; ok when the last of them is an array (EXEC carried out). */
static int
read_queued_but(struct rconn *rc, int keep)
{
	int rv = 0;
	while (rc->pending > keep) {
		redisReply *r = rconn_read_reply(rc);
		if (r == NULL)
			return -1;
		if (r->type == REDIS_REPLY_ERROR)
			rv = -1;
		else if (rc->pending == keep && r->type != REDIS_REPLY_ARRAY)
			rv = -1;
		freeReplyObject(r);
	}
	if (rv == 0)
		rconn_mark_up(rc);
	return rv;
}

int
broker_read_queued(struct rconn *rc)
{
	int rv = read_queued_but(rc, 0);
	if (rc->queued_lost)
		rv = -1;
	rc->queued_lost = false;
	return rv;
}

/* A plain LMOVE's reply (freed here): 1 with the message held, not yet recorded in unacked; 0 for none. */
static int
held_take_lmove(struct held *h, const char *key, redisReply *r)
{
	int rv = 0;
	if (r->type == REDIS_REPLY_STRING) {
		held_set(h, key, r->str, r->len, "");
		h->unrecorded = true;
		rv = 1;
	}
	freeReplyObject(r);
	return rv;
}

int
broker_fetch_queued(struct rconn *rc, struct held *h, bool *queued_ok)
{
	struct worker *w = rc->w;
	*queued_ok = !rc->queued_lost;
	rc->queued_lost = false;
	if (rc->pending > 0 && h->raw == NULL && rc->c != NULL) {
		/* the previous task's result + ack and this LMOVE share one round trip */
		const char *lm[] = {"LMOVE", w->qkeys[0], w->proc_key, "RIGHT", "LEFT"};
		size_t ll[] = {5, strlen(lm[1]), strlen(lm[2]), 5, 4};
		if (rconn_send(rc, 5, lm, ll) < 0) {
			*queued_ok = false;
			return -1;
		}
		if (read_queued_but(rc, 1) < 0)
			*queued_ok = false;
		redisReply *fr = rconn_read_reply(rc);
		if (fr == NULL) {
			*queued_ok = false;
			return -1;
		}
		return held_take_lmove(h, w->qkeys[0], fr);
	}
	if (rc->pending > 0 && read_queued_but(rc, 0) < 0)
		*queued_ok = false;
	return 0;
}

int
broker_fetch(struct rconn *rc, struct held *h, bool *queued_ok)
{
	struct worker *w = rc->w;
	*queued_ok = !rc->queued_lost;
	rc->queued_lost = false;
	if (h->raw != NULL) {
		/* a landed message whose recording failed with the connection: record it first */
		int rv = broker_record(rc, h);
		if (rv == 0)
			held_free(h);
		return rv;
	}
	/* the common case, a message on the first (highest priority) key, costs one plain LMOVE: the message is
	 * safe in the processing list at once, and kombu's unacked records follow without a round trip of their
	 * own (broker_record_send) once the envelope is decoded */
	if (rc->pending > 0 && read_queued_but(rc, 0) < 0)
		*queued_ok = false;
	redisReply *fr = rconn_command(rc, "LMOVE %s %s RIGHT LEFT", w->qkeys[0], w->proc_key);
	if (fr == NULL)
		return -1;
	if (held_take_lmove(h, w->qkeys[0], fr) == 1)
		return 1;
	int nkeys = 3 + w->nqkeys, nargs = 1 + w->nqkeys;
	const char **argv = xcalloc((size_t)(nkeys + nargs), sizeof *argv);
	char now[64];
	argv[0] = w->proc_key;
	argv[1] = KEY_UNACKED;
	argv[2] = KEY_UNACKED_INDEX;
	for (int i = 0; i < w->nqkeys; i++) {
		argv[3 + i] = w->qkeys[i];
		argv[nkeys + 1 + i] = w->qnames[i];
	}
	argv[nkeys] = score_str(now_wall(), now, sizeof now);
	redisReply *r = rconn_eval(rc, SCRIPT_FETCH, nkeys, nargs, argv, NULL);
	free(argv);
	if (r == NULL)
		return -1;
	if (r->type == REDIS_REPLY_ARRAY && r->elements == 3) {
		held_set(h, r->element[0]->str, r->element[1]->str, r->element[1]->len, r->element[2]->str);
		freeReplyObject(r);
		return 1;
	}
	freeReplyObject(r);

	/* nothing waiting: block briefly on the first (highest priority) key; the Lua poll above serves the others */
	r = rconn_command(rc, "BLMOVE %s %s RIGHT LEFT %s", w->qkeys[0], w->landing_key,
	                  w->cfg->nqueues > 1 ? FETCH_BLOCK_MULTI_S : FETCH_BLOCK_S);
	if (r == NULL)
		return -1;
	if (r->type == REDIS_REPLY_ERROR) {
		char why[300];
		snprintf(why, sizeof why, "BLMOVE: %.250s", r->str);
		freeReplyObject(r);
		rconn_drop(rc, why);
		return -1;
	}
	if (r->type != REDIS_REPLY_STRING) {
		freeReplyObject(r);
		return 0;
	}
	held_set(h, w->qkeys[0], r->str, r->len, "");
	freeReplyObject(r);
	int rv = broker_record(rc, h);
	if (rv == 0)
		held_free(h);
	return rv;
}

static int
eval_simple(struct rconn *rc, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens,
            long long *out)
{
	redisReply *r = rconn_eval(rc, id, nkeys, nargs, argv, lens);
	if (r == NULL)
		return -1;
	if (out != NULL)
		*out = r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
	freeReplyObject(r);
	return 0;
}

int
broker_ack(struct rconn *rc, const struct held *h)
{
	struct worker *w = rc->w;
	const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, h->raw, h->tag};
	size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), h->len, strlen(h->tag)};
	return eval_simple(rc, SCRIPT_ACK, 3, 2, argv, lens, NULL);
}

int
broker_record_send(struct rconn *rc, struct held *h, const char *tag, const char *exchange, const char *routing_key)
{
	h->unrecorded = false;
	if (tag == NULL || tag[0] == '\0')
		return 0;
	char *qname = message_queue_of_key(h->qkey);
	json_t *ex = json_string(exchange ? exchange : "");
	json_t *rk = json_string(routing_key && routing_key[0] ? routing_key : qname);
	char *exs = ex ? json_dumps(ex, JSON_ENCODE_ANY) : NULL;
	char *rks = rk ? json_dumps(rk, JSON_ENCODE_ANY) : NULL;
	json_decref(ex);
	json_decref(rk);
	free(qname);
	int rv = 0;
	if (exs != NULL && rks != NULL) {
		/* QoS.append's value: [<envelope as received>, "<exchange>", "<routing_key>"] */
		char *val = xmalloc(h->len + strlen(exs) + strlen(rks) + 8);
		size_t n = 0;
		val[n++] = '[';
		memcpy(val + n, h->raw, h->len);
		n += h->len;
		n += (size_t)sprintf(val + n, ", %s, %s]", exs, rks);
		char now[64];
		score_str(now_wall(), now, sizeof now);
		const char *hset[] = {"HSET", KEY_UNACKED, tag, val};
		size_t hl[] = {4, strlen(KEY_UNACKED), strlen(tag), n};
		const char *zadd[] = {"ZADD", KEY_UNACKED_INDEX, now, tag};
		size_t zl[] = {4, strlen(KEY_UNACKED_INDEX), strlen(now), strlen(tag)};
		if (rconn_send(rc, 4, hset, hl) < 0 || rconn_send(rc, 4, zadd, zl) < 0)
			rv = -1;
		free(val);
		if (rv == 0) {
			free(h->tag);
			h->tag = xstrdup(tag);
		}
	}
	free(exs);
	free(rks);
	return rv;
}

int
broker_finish_plain(struct rconn *rc, const struct held *h, const char *task_id, const char *meta, int backend_db)
{
	if (rc->c == NULL || rconn_drain(rc) < 0)
		return -1;
	if (broker_finish_plain_send(rc, h, task_id, meta, backend_db) < 0)
		return -1;
	return read_queued_but(rc, 0);
}

int
broker_finish_plain_send(struct rconn *rc, const struct held *h, const char *task_id, const char *meta, int backend_db)
{
	struct worker *w = rc->w;
	if (rc->c == NULL)
		return -1;
	char ttl[16], bdb[16], qdb[16];
	snprintf(ttl, sizeof ttl, "%d", RESULT_EXPIRES);
	snprintf(bdb, sizeof bdb, "%d", backend_db);
	snprintf(qdb, sizeof qdb, "%d", rc->url->db);
	char *key = meta ? xasprintf(RESULT_KEY_PREFIX "%s", task_id) : NULL;
	bool other_db = meta != NULL && backend_db != rc->url->db;
	int rv = 0;
#define SEND(...)                                                                                                      \
	do {                                                                                                           \
		const char *a_[] = {__VA_ARGS__};                                                                      \
		size_t n_ = sizeof a_ / sizeof a_[0], l_[12];                                                          \
		for (size_t i_ = 0; i_ < n_; i_++)                                                                     \
			l_[i_] = strlen(a_[i_]);                                                                       \
		if (rv == 0 && rconn_send(rc, (int)n_, a_, l_) < 0)                                                    \
			rv = -1;                                                                                       \
	} while (0)
	SEND("MULTI");
	if (meta != NULL) {
		if (other_db)
			SEND("SELECT", bdb);
		SEND("SETEX", key, ttl, meta);
		SEND("PUBLISH", key, meta);
		if (other_db)
			SEND("SELECT", qdb);
	}
	if (rv == 0) {
		const char *a[] = {"LREM", w->proc_key, "1", h->raw};
		size_t l[] = {4, strlen(w->proc_key), 1, h->len};
		if (rconn_send(rc, 4, a, l) < 0)
			rv = -1;
	}
	if (h->tag[0] != '\0') {
		SEND("HDEL", KEY_UNACKED, h->tag);
		SEND("ZREM", KEY_UNACKED_INDEX, h->tag);
	}
	SEND("EXEC");
#undef SEND
	free(key);
	return rv;
}

int
broker_finish(struct rconn *rc, const struct held *h, const char *task_id, const char *meta, int backend_db)
{
	struct worker *w = rc->w;
	char *key = xasprintf(RESULT_KEY_PREFIX "%s", task_id);
	char ttl[16], bdb[16], qdb[16];
	snprintf(ttl, sizeof ttl, "%d", RESULT_EXPIRES);
	snprintf(bdb, sizeof bdb, "%d", backend_db);
	snprintf(qdb, sizeof qdb, "%d", rc->url->db);
	const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, key, h->raw, h->tag, meta, ttl, bdb, qdb};
	size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(key), h->len,
	                 strlen(h->tag),  strlen(meta),    strlen(ttl),     strlen(bdb), strlen(qdb)};
	int rv = eval_simple(rc, SCRIPT_FINISH, 4, 6, argv, lens, NULL);
	free(key);
	return rv;
}

int
broker_deadletter(struct rconn *rc, const struct held *h, const char *reason)
{
	struct worker *w = rc->w;
	char *queue = message_queue_of_key(h->qkey);
	char *entry = message_deadletter_entry(reason, queue, now_wall(), h->raw, h->len);
	free(queue);
	const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_DEADLETTER, h->raw, h->tag, entry};
	size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]),
	                 h->len,          strlen(h->tag),  strlen(entry)};
	int rv = eval_simple(rc, SCRIPT_DEADLETTER, 4, 3, argv, lens, NULL);
	free(entry);
	return rv;
}

int
broker_park(struct rconn *rc, const struct held *h, double at)
{
	struct worker *w = rc->w;
	char *member = message_eta_member(h->qkey, h->raw, h->len);
	if (member == NULL)
		return broker_deadletter(rc, h, "envelope is not valid UTF-8");
	char score[64];
	score_str(at, score, sizeof score);
	const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_ETA, h->raw, h->tag, score, member};
	size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]),
	                 h->len,          strlen(h->tag),  strlen(score),   strlen(member)};
	int rv = eval_simple(rc, SCRIPT_PARK, 4, 4, argv, lens, NULL);
	free(member);
	return rv;
}

static int
requeue_from(struct rconn *rc, const char *list, const char *mode, const char *raw, size_t len, const char *tag,
             const char *dest, long long *result)
{
	char *marked = message_mark_redelivered(raw, len);
	const char *newm = marked ? marked : raw;
	size_t newlen = marked ? strlen(marked) : len;
	const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX, dest, raw, newm, tag, mode};
	size_t lens[] = {strlen(list), strlen(argv[1]), strlen(argv[2]), strlen(dest),
	                 len,          newlen,          strlen(tag),     strlen(mode)};
	int rv = eval_simple(rc, SCRIPT_REQUEUE, 4, 4, argv, lens, result);
	free(marked);
	return rv;
}

int
broker_requeue(struct rconn *rc, const struct held *h)
{
	return requeue_from(rc, rc->w->proc_key, "list", h->raw, h->len, h->tag, h->qkey, NULL);
}

int
broker_publish_eta(struct rconn *rc, const char *qkey, const char *raw, double at)
{
	char *member = message_eta_member(qkey, raw, strlen(raw));
	if (member == NULL)
		return -1;
	redisReply *r = rconn_command(rc, "ZADD %s %.6f %s", KEY_ETA, at, member);
	free(member);
	if (r == NULL)
		return -1;
	int ok = reply_is_ok(r);
	if (!ok)
		rconn_drop(rc, r->str);
	freeReplyObject(r);
	return ok ? 0 : -1;
}

/* Run a plain command whose reply does not matter beyond success. */
static int
simple(struct rconn *rc, redisReply *r)
{
	if (r == NULL)
		return -1;
	int ok = reply_is_ok(r);
	if (!ok) {
		char why[300];
		snprintf(why, sizeof why, "error reply: %.250s", r->str);
		rconn_drop(rc, why);
	}
	freeReplyObject(r);
	return ok ? 0 : -1;
}

int
broker_register(struct rconn *rc)
{
	struct worker *w = rc->w;
	/* alive key first: a sweep that sees the set member without it would take us for dead */
	if (simple(rc, rconn_command(rc, "SET %s %ld EX %d", w->alive_key, w->pid, ALIVE_TTL_S)) < 0 ||
	    simple(rc, rconn_command(rc, "SADD %s %s", KEY_PROCESSING_SET, w->proc_key)) < 0)
		return -1;
	for (int i = 0; i < w->cfg->nqueues; i++) {
		const char *q = w->cfg->queues[i];
		if (simple(rc, rconn_command(rc, "SADD _kombu.binding.%s %s" KOMBU_SEP KOMBU_SEP "%s", q, q, q)) < 0)
			return -1;
	}
	return 0;
}

int
broker_refresh(struct rconn *rc)
{
	struct worker *w = rc->w;
	if (simple(rc, rconn_command(rc, "SET %s %ld EX %d", w->alive_key, w->pid, ALIVE_TTL_S)) < 0 ||
	    simple(rc, rconn_command(rc, "SADD %s %s", KEY_PROCESSING_SET, w->proc_key)) < 0)
		return -1;
	/* lease refresh: messages still held must not look stale to anybody's visibility-timeout sweep */
	double now = now_wall();
	for (int i = 0; i < w->nslots; i++) {
		struct slot *s = &w->slots[i];
		char tag[128] = "";
		pthread_mutex_lock(&s->mu);
		if (s->state != SLOT_IDLE && s->held.tag != NULL)
			spark_strlcpy(tag, s->held.tag, sizeof tag);
		pthread_mutex_unlock(&s->mu);
		if (tag[0] && simple(rc, rconn_command(rc, "ZADD %s XX %.6f %s", KEY_UNACKED_INDEX, now, tag)) < 0)
			return -1;
	}
	return 0;
}

int
broker_move_due(struct rconn *rc)
{
	char now[64];
	score_str(now_wall(), now, sizeof now);
	for (int round = 0; round < 50; round++) {
		const char *argv[] = {KEY_ETA, KEY_DEADLETTER, now, "100"};
		long long moved = 0;
		if (eval_simple(rc, SCRIPT_DUE, 2, 2, argv, NULL, &moved) < 0)
			return -1;
		if (moved < 100)
			break;
	}
	return 0;
}

/* The queue key a message goes back to: its routing key (or our first queue) at its priority. */
static char *
route_of(const struct worker *w, const char *raw, size_t len)
{
	json_t *env = json_loadb(raw, len, 0, NULL);
	if (!json_is_object(env)) {
		json_decref(env);
		return NULL;
	}
	json_t *props = json_object_get(env, "properties");
	const char *rk = json_string_value(json_object_get(json_object_get(props, "delivery_info"), "routing_key"));
	json_t *pr = json_object_get(props, "priority");
	char *key = message_queue_key(rk && rk[0] ? rk : w->cfg->queues[0],
	                              json_is_integer(pr) ? (int)json_integer_value(pr) : 0);
	json_decref(env);
	return key;
}

static const char *
tag_of(json_t *env)
{
	const char *t = json_string_value(json_object_get(json_object_get(env, "properties"), "delivery_tag"));
	return t ? t : "";
}

/* Put back every message of one list of a dead process, or of our own but those in keep (held by a slot).
 * Returns messages restored, or -1. */
static int
recover_list_but(struct rconn *rc, const char *list, bool landing, const struct held *keep, int nkeep)
{
	struct worker *w = rc->w;
	redisReply *r = rconn_command(rc, "LRANGE %s 0 -1", list);
	if (r == NULL)
		return -1;
	if (r->type != REDIS_REPLY_ARRAY) {
		freeReplyObject(r);
		return 0;
	}
	int restored = 0, rv = 0;
	/* head first: the oldest message (at the tail) is pushed last and is therefore the next one served */
	for (size_t i = 0; i < r->elements; i++) {
		redisReply *e = r->element[i];
		if (e->type != REDIS_REPLY_STRING)
			continue;
		bool kept = false;
		for (int k = 0; k < nkeep && !kept; k++)
			kept = keep[k].raw != NULL && keep[k].len == e->len && memcmp(keep[k].raw, e->str, e->len) == 0;
		if (kept)
			continue;
		char *dest = route_of(w, e->str, e->len);
		json_t *env = json_loadb(e->str, e->len, 0, NULL);
		long long res = 0;
		if (dest == NULL) {
			struct held h = {.raw = e->str, .len = e->len, .tag = "", .qkey = w->qkeys[0]};
			char *entry = message_deadletter_entry("unreadable message left by a dead worker", NULL,
			                                       now_wall(), e->str, e->len);
			const char *argv[] = {list, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_DEADLETTER, h.raw, "", entry};
			size_t lens[] = {strlen(list), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]), h.len, 0,
			                 strlen(entry)};
			rv = eval_simple(rc, SCRIPT_DEADLETTER, 4, 3, argv, lens, NULL);
			free(entry);
		} else {
			rv = requeue_from(rc, list, landing ? "landing" : "list", e->str, e->len,
			                  landing ? "" : tag_of(env), dest, &res);
			if (res == 1)
				restored++;
		}
		json_decref(env);
		free(dest);
		if (rv < 0)
			break;
	}
	freeReplyObject(r);
	return rv < 0 ? -1 : restored;
}

static int
recover_list(struct rconn *rc, const char *list, bool landing)
{
	return recover_list_but(rc, list, landing, NULL, 0);
}

int
broker_reconcile(struct rconn *rc, const struct held *keep, int nkeep)
{
	struct worker *w = rc->w;
	int a = recover_list_but(rc, w->proc_key, false, keep, nkeep);
	if (a < 0)
		return -1;
	int b = recover_list_but(rc, w->landing_key, true, keep, nkeep);
	if (b < 0)
		return -1;
	if (a + b > 0)
		log_warnx("Put back %d message(s) taken by a fetch whose reply was lost with the connection", a + b);
	return a + b;
}

static bool
owner_dead(struct rconn *rc, const char *member, bool *err)
{
	struct worker *w = rc->w;
	const char *rest = member + strlen(KEY_PROCESSING_PREFIX);
	const char *colon = strrchr(rest, ':');
	*err = false;
	if (colon == NULL)
		return true; /* not ours to judge, but nothing can ever refresh it */
	long pid = strtol(colon + 1, NULL, 10);
	size_t hostlen = (size_t)(colon - rest);
	if (hostlen == strlen(w->host) && strncmp(rest, w->host, hostlen) == 0 && pid > 0 && kill((pid_t)pid, 0) < 0 &&
	    errno == ESRCH)
		return true;
	redisReply *r = rconn_command(rc, "EXISTS " KEY_ALIVE_PREFIX "%s", rest);
	if (r == NULL) {
		*err = true;
		return false;
	}
	bool dead = r->type == REDIS_REPLY_INTEGER && r->integer == 0;
	freeReplyObject(r);
	return dead;
}

int
broker_recover_dead(struct rconn *rc)
{
	struct worker *w = rc->w;
	redisReply *r = rconn_command(rc, "SMEMBERS %s", KEY_PROCESSING_SET);
	if (r == NULL)
		return -1;
	int rv = 0;
	for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
		const char *member = r->element[i]->str;
		if (member == NULL || strcmp(member, w->proc_key) == 0 ||
		    strncmp(member, KEY_PROCESSING_PREFIX, strlen(KEY_PROCESSING_PREFIX)) != 0)
			continue;
		bool err;
		if (!owner_dead(rc, member, &err)) {
			if (err) {
				rv = -1;
				break;
			}
			continue;
		}
		char *landing = xasprintf("%s" KEY_LANDING_SUFFIX, member);
		char *alive = xasprintf(KEY_ALIVE_PREFIX "%s", member + strlen(KEY_PROCESSING_PREFIX));
		int a = recover_list(rc, landing, true);
		int b = a < 0 ? -1 : recover_list(rc, member, false);
		if (a > 0 || b > 0)
			log_warnx("Restored %d message(s) held by dead worker %s", (a > 0 ? a : 0) + (b > 0 ? b : 0),
			          member + strlen(KEY_PROCESSING_PREFIX));
		const char *argv[] = {KEY_PROCESSING_SET, member, landing, alive, member};
		if (b < 0 || eval_simple(rc, SCRIPT_UNREGISTER, 4, 1, argv, NULL, NULL) < 0)
			rv = -1;
		free(landing);
		free(alive);
		if (rv < 0)
			break;
	}
	freeReplyObject(r);
	return rv;
}

/* kombu's binding lookup for a non-empty exchange: the queue of the member whose routing key matches. */
static char *
binding_lookup(struct rconn *rc, const char *exchange, const char *rk, bool *err)
{
	*err = false;
	redisReply *r = rconn_command(rc, "SMEMBERS _kombu.binding.%s", exchange);
	if (r == NULL) {
		*err = true;
		return NULL;
	}
	char *queue = NULL;
	for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements && queue == NULL; i++) {
		const char *m = r->element[i]->str;
		const char *s1 = m ? strstr(m, KOMBU_SEP) : NULL;
		const char *s2 = s1 ? strstr(s1 + 2, KOMBU_SEP) : NULL;
		if (s2 != NULL && (size_t)(s1 - m) == strlen(rk) && strncmp(m, rk, strlen(rk)) == 0)
			queue = xstrdup(s2 + 2);
	}
	freeReplyObject(r);
	return queue;
}

/* Restore one stale unacked entry the way kombu's restore_by_tag does. */
static int
restore_tag(struct rconn *rc, const char *tag)
{
	redisReply *r = rconn_command(rc, "HGET %s %s", KEY_UNACKED, tag);
	if (r == NULL)
		return -1;
	if (r->type != REDIS_REPLY_STRING) {
		freeReplyObject(r);
		const char *argv[] = {KEY_UNACKED, KEY_UNACKED_INDEX, KEY_UNACKED, tag, "", "", "0"};
		return eval_simple(rc, SCRIPT_SWEEP_ONE, 3, 4, argv, NULL, NULL);
	}
	json_t *v = json_loadb(r->str, r->len, 0, NULL);
	json_t *env = json_array_get(v, 0);
	const char *ex = json_string_value(json_array_get(v, 1));
	const char *rk = json_string_value(json_array_get(v, 2));
	char *newm = NULL, *dest = NULL;
	int rv = 0;
	if (json_is_object(env) && ex != NULL && rk != NULL) {
		char *text = json_dumps(env, JSON_COMPACT);
		newm = text ? message_mark_redelivered(text, strlen(text)) : NULL;
		free(text);
		char *queue = NULL;
		bool err = false;
		if (ex[0] == '\0')
			queue = xstrdup(rk);
		else
			queue = binding_lookup(rc, ex, rk, &err);
		if (err)
			rv = -1;
		json_t *pr = json_object_get(json_object_get(env, "properties"), "priority");
		if (queue != NULL)
			dest = message_queue_key(queue, json_is_integer(pr) ? (int)json_integer_value(pr) : 0);
		free(queue);
	}
	if (rv == 0) {
		bool push = newm != NULL && dest != NULL;
		if (!push)
			log_warnx("Could not restore unacked message %s: no queue for it; dropped as kombu does", tag);
		const char *argv[] = {KEY_UNACKED, KEY_UNACKED_INDEX, push ? dest : KEY_UNACKED, tag,
		                      r->str,      push ? newm : "",  push ? "1" : "0"};
		size_t lens[] = {
		    strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(tag), r->len, strlen(argv[5]), 1};
		long long res = 0;
		rv = eval_simple(rc, SCRIPT_SWEEP_ONE, 3, 4, argv, lens, &res);
		if (rv == 0 && res == 1 && push)
			log_warnx("Restored unacknowledged message %s (visibility timeout passed)", tag);
	}
	json_decref(v);
	free(newm);
	free(dest);
	freeReplyObject(r);
	return rv;
}

int
broker_restore_unacked(struct rconn *rc)
{
	struct worker *w = rc->w;
	char token[37];
	message_uuid4(token);
	redisReply *r = rconn_command(rc, "SET %s %s NX PX 300000", KEY_UNACKED_MUTEX, token);
	if (r == NULL)
		return -1;
	bool locked = r->type == REDIS_REPLY_STATUS;
	freeReplyObject(r);
	if (!locked)
		return 0; /* someone else is sweeping */
	int rv = 0;
	r = rconn_command(rc, "ZREVRANGEBYSCORE %s %.6f 0", KEY_UNACKED_INDEX, now_wall() - w->cfg->visibility_timeout);
	if (r == NULL)
		return -1; /* the mutex expires by itself */
	for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements && rv == 0; i++)
		if (r->element[i]->str != NULL)
			rv = restore_tag(rc, r->element[i]->str);
	freeReplyObject(r);
	if (rv == 0) {
		const char *argv[] = {KEY_UNACKED_MUTEX, token};
		rv = eval_simple(rc, SCRIPT_UNLOCK, 1, 1, argv, NULL, NULL);
	}
	return rv;
}

int
broker_unregister(struct rconn *rc)
{
	struct worker *w = rc->w;
	const char *argv[] = {KEY_PROCESSING_SET, w->proc_key, w->landing_key, w->alive_key, w->proc_key};
	return eval_simple(rc, SCRIPT_UNREGISTER, 4, 1, argv, NULL, NULL);
}

/*
 * The Lua scripts that keep every message in Redis at every instant (DESIGN §6). Each is loaded on every new
 * connection (SCRIPT LOAD: Redis computes the SHA-1 names) and run with EVALSHA.
 *
 * Envelopes are never re-encoded inside Lua (cjson turns [] into {}): scripts only read fields and move the
 * original strings. Where kombu re-serializes (redelivered flags), C does it with jansson and Lua checks that
 * the original is still where it was before it moves the new text. Every script that moves a message out of a
 * processing list first checks that it is still there, so a write sent again after a lost reply is harmless.
 */
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
 * Celery's _store_result: never overwrite a SUCCESS, then SETEX + PUBLISH on the key's own name. The same meta
 * already there (a write sent again after a lost reply) is not published twice.
 * Celery (and we) write "status" first; a meta in another shape is decoded in full.
 */
#define LUA_STORE_FN                                                                                                   \
	"local function store(key, meta, ttl)\n"                                                                       \
	"  local cur = redis.call('GET', key)\n"                                                                       \
	"  if cur == meta then return 0 end\n"                                                                         \
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

/* Every push to spark:deadletter trims it in the same script: the list never holds more than the cap
 * (SPARK_DEADLETTER_MAX; 10,000 when a caller of an older build passes none), the oldest entries go. */
#define LUA_DEADLETTER_PUSH(key, entry, cap)                                                                           \
	"redis.call('LPUSH', " key ", " entry ")\n"                                                                    \
	"redis.call('LTRIM', " key ", 0, (tonumber(" cap ") or 10000) - 1)\n"

/* A message that leaves a processing list leaves kombu's unacked records too (tag '' = none). */
#define LUA_FORGET_TAG(tag)                                                                                            \
	"if " tag " ~= '' then\n"                                                                                      \
	"  redis.call('HDEL', KEYS[2], " tag ")\n"                                                                     \
	"  redis.call('ZREM', KEYS[3], " tag ")\n"                                                                     \
	"end\n"

/* The FAILURE meta of a dead letter, in the same script when the result backend is the broker's server: ARGV
 * meta ('' = none), ttl, backend db, broker db. */
#define LUA_DEADLETTER_META(key, meta, ttl, bdb, qdb)                                                                  \
	"if " meta " ~= '' then\n"                                                                                     \
	"  redis.call('SELECT', " bdb ")\n"                                                                            \
	"  store(" key ", " meta ", " ttl ")\n"                                                                        \
	"  redis.call('SELECT', " qdb ")\n"                                                                            \
	"end\n"

const char *const script_src[SCRIPT_COUNT] = {
    /* FETCH: up to ARGV[2] messages, highest priority key first, each recorded as kombu's QoS.append does.
       KEYS: processing, unacked, unacked_index, queue keys in kombu's order. ARGV: now, max, queue names.
       Returns {key, message, tag, key, message, tag, ...}. */
    [SCRIPT_FETCH] = LUA_RECORD_FN "local out, want = {}, tonumber(ARGV[2])\n"
                                   "for i = 4, #KEYS do\n"
                                   "  while want > 0 do\n"
                                   "    local m = redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT')\n"
                                   "    if not m then break end\n"
                                   "    out[#out + 1] = KEYS[i]\n"
                                   "    out[#out + 1] = m\n"
                                   "    out[#out + 1] = record(m, ARGV[1], ARGV[i - 1], KEYS[2], KEYS[3])\n"
                                   "    want = want - 1\n"
                                   "  end\n"
                                   "end\n"
                                   "return out\n",
    /* DEADLETTER (sent again after a lost reply: only the first one counts). KEYS: processing, unacked, unacked_index,
       deadletter. ARGV: message, tag, entry, cap. */
    [SCRIPT_DEADLETTER] = "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
                          "if ARGV[2] ~= '' then\n"
                          "  redis.call('HDEL', KEYS[2], ARGV[2])\n"
                          "  redis.call('ZREM', KEYS[3], ARGV[2])\n"
                          "end\n" LUA_DEADLETTER_PUSH("KEYS[4]", "ARGV[3]", "ARGV[4]") "return 1\n",
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
    /* DUE. KEYS: spark:eta, deadletter. ARGV: now, limit, dead-letter cap. */
    [SCRIPT_DUE] =
        "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))\n"
        "for _, member in ipairs(due) do\n"
        "  redis.call('ZREM', KEYS[1], member)\n"
        "  local ok, e = pcall(cjson.decode, member)\n"
        "  if ok and type(e) == 'table' and type(e.queue) == 'string' and type(e.envelope) == 'string' then\n"
        "    redis.call('RPUSH', e.queue, e.envelope)\n"
        "  else\n"
        "    local e = {reason = 'unreadable spark:eta entry', queue = cjson.null, at = tonumber(ARGV[1])}\n"
        "    if #member > 65536 then e.truncated = true e.message_bytes = #member member = string.sub(member, 1, "
        "65536) "
        "end\n"
        "    e.message = member\n"
        "    " LUA_DEADLETTER_PUSH("KEYS[2]", "cjson.encode(e)", "ARGV[3]") "  end\n"
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
    /*
     * OVERSIZE: a message too large to decode leaves a list for the dead letters without being sent back to Redis:
     * it is the element of that size that starts with the given head. KEYS: list, unacked, unacked_index,
     * deadletter, meta key. ARGV: size, head, tag, entry, cap, meta, ttl, backend db, broker db.
     */
    [SCRIPT_OVERSIZE] = LUA_STORE_FN "local size, head, found = tonumber(ARGV[1]), ARGV[2], nil\n"
                                     "for _, m in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do\n"
                                     "  if #m == size and string.sub(m, 1, #head) == head then found = m break end\n"
                                     "end\n"
                                     "if not found then return 0 end\n"
                                     "redis.call('LREM', KEYS[1], 1, found)\n" LUA_FORGET_TAG("ARGV[3]")
                                         LUA_DEADLETTER_META("KEYS[5]", "ARGV[6]", "ARGV[7]", "ARGV[8]", "ARGV[9]")
                                             LUA_DEADLETTER_PUSH("KEYS[4]", "ARGV[4]", "ARGV[5]") "return 1\n",
    /*
     * RECOVER: a dead process's message. Its delivery count goes up; below the poison threshold it goes back to its
     * queue (as REQUEUE does), at the threshold to the dead letters with its FAILURE meta (returns 2).
     * KEYS: list, unacked, unacked_index, destination, deadletter, delivery count, meta key.
     * ARGV: message, new message, tag, mode, threshold, entry, cap, meta, ttl, backend db, broker db, count ttl.
     */
    [SCRIPT_RECOVER] =
        LUA_STORE_FN "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
                     "if ARGV[4] == 'list' then\n" LUA_FORGET_TAG(
                         "ARGV[3]") "end\n"
                                    "if redis.call('INCR', KEYS[6]) < tonumber(ARGV[5]) then\n"
                                    "  redis.call('EXPIRE', KEYS[6], ARGV[12])\n"
                                    "  redis.call('RPUSH', KEYS[4], ARGV[2])\n"
                                    "  return 1\n"
                                    "end\n"
                                    "redis.call('DEL', KEYS[6])\n" LUA_DEADLETTER_META("KEYS[7]", "ARGV[8]", "ARGV[9]",
                                                                                       "ARGV[10]", "ARGV[11]")
                                        LUA_DEADLETTER_PUSH("KEYS[5]", "ARGV[6]", "ARGV[7]") "return 2\n",
};

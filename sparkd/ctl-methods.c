/*
 * The control protocol's methods (DESIGN §4): ping, status, logs, stop, and the dispatch that checks a request
 * and the peer's right to it before any method runs.
 */
#include <stdio.h>
#include <string.h>

#include "ctl.h"

struct ctl_method {
	const char *name;
	void (*fn)(struct ctl_client *, const struct proto_request *);
	const char *const *params; /* the names it knows, NULL-terminated */
};

static void
m_ping(struct ctl_client *c, const struct proto_request *req)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	msgpack_pack_map(&pk, PROTO_NFIELDS(PROTO_PING_FIELDS));
	proto_pack_kv_int(&pk, PROTO_F_PROTOCOL, SPARK_PROTOCOL_VERSION);
	proto_pack_kv_str(&pk, PROTO_F_VERSION, SPARK_VERSION);
	proto_pack_kv_int(&pk, PROTO_F_PID, c->sd->pid);
	ctl_client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
}

static void
m_status(struct ctl_client *c, const struct proto_request *req)
{
	bool verbose = false;
	if (proto_get_bool(req->params, PROTO_P_VERBOSE, &verbose) < 0) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "verbose must be a boolean");
		return;
	}
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	/* the per-process detail only for who asks for it: a poller's status stays small */
	ctl_pack_status(c->sd, &pk, verbose, false);
	if (sb.size > SPARK_FRAME_MAX) {
		/* thousands of processes: the per-process detail does not fit in one frame */
		msgpack_sbuffer_clear(&sb);
		proto_pack_result_head(&pk, req->msgid);
		ctl_pack_status(c->sd, &pk, false, true);
	}
	ctl_client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
}

static void
m_logs(struct ctl_client *c, const struct proto_request *req)
{
	struct sparkd *sd = c->sd;
	int64_t lines = 100;
	bool follow = false;
	char level_s[32] = "", worker[300] = "";
	int level = SPARK_LOG_DEBUG;
	if (proto_get_int(req->params, PROTO_P_LINES, &lines) < 0 || lines < 0) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "lines must be a whole number >= 0");
		return;
	}
	if (proto_get_bool(req->params, PROTO_P_FOLLOW, &follow) < 0) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "follow must be a boolean");
		return;
	}
	int r = proto_get_str(req->params, PROTO_P_LEVEL, level_s, sizeof level_s);
	if (r < 0 || (r == 1 && level_s[0] != '\0' && (level = log_level_parse(level_s)) < 0)) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS,
		                "level must be one of debug, info, warning, error, critical");
		return;
	}
	if (proto_get_str(req->params, PROTO_P_WORKER, worker, sizeof worker) < 0) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "worker must be a worker name such as celery@host");
		return;
	}

	/* the newest matching lines that fit in one frame, oldest first */
	const struct logcap *lc = &sd->lc;
	size_t budget = SPARK_FRAME_MAX - 4096, used = 0, n = 0, first = lc->count;
	for (size_t i = lc->count; i > 0 && (int64_t)n < lines; i--) {
		const struct lc_line *l = logcap_ring_get(lc, i - 1);
		if (l->level < level || !logcap_worker_match(worker, l->worker))
			continue;
		size_t sz = l->len + strlen(l->worker) + 64;
		if (used + sz > budget)
			break;
		used += sz;
		n++;
		first = i - 1;
	}
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	msgpack_pack_map(&pk, PROTO_NFIELDS(PROTO_LOGS_FIELDS));
	proto_pack_key(&pk, PROTO_F_LINES);
	msgpack_pack_array(&pk, n);
	for (size_t i = first, k = 0; k < n && i < lc->count; i++) {
		const struct lc_line *l = logcap_ring_get(lc, i);
		if (l->level < level || !logcap_worker_match(worker, l->worker))
			continue;
		ctl_pack_log_line(&pk, l);
		k++;
	}
	ctl_client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
	if (follow) {
		c->follow = true;
		c->follow_level = level;
		spark_strlcpy(c->follow_worker, worker, sizeof c->follow_worker);
	}
}

static void
m_stop(struct ctl_client *c, const struct proto_request *req)
{
	struct sparkd *sd = c->sd;
	if (!ctl_may_stop(c->uid, sd->uid)) {
		log_warnx("control client (pid %d, uid %u): stop refused: only root or uid %u may stop sparkd",
		          (int)c->pid, (unsigned)c->uid, (unsigned)sd->uid);
		ctl_reply_error(c, req->msgid, PROTO_E_PERMISSION, "only root or the daemon's user may stop sparkd");
		return;
	}
	bool force = false;
	double timeout = -1;
	if (proto_get_bool(req->params, PROTO_P_FORCE, &force) < 0) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "force must be a boolean");
		return;
	}
	int r = proto_get_double(req->params, PROTO_P_TIMEOUT_S, &timeout);
	if (r < 0 || (r == 1 && !(timeout >= 0 && timeout <= 30 * 86400))) {
		ctl_reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "timeout_s must be a number of seconds >= 0");
		return;
	}
	if (r == 0)
		timeout = -1;
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	msgpack_pack_map(&pk, PROTO_NFIELDS(PROTO_STOP_FIELDS));
	proto_pack_kv_bool(&pk, PROTO_F_STOPPING, true);
	ctl_client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
	log_info("%s stop requested by pid %d (uid %u)", force ? "cold" : "warm", (int)c->pid, (unsigned)c->uid);
	/* sparkctl waits on this connection for sparkd's exit */
	c->waits_exit = true;
	/* timeout 0: no grace at all */
	sup_stop(sd, force || (r == 1 && timeout == 0), timeout);
}

static const char *const ping_params[] = {NULL};
static const char *const status_params[] = {PROTO_P_VERBOSE, NULL};
static const char *const logs_params[] = {PROTO_P_LINES, PROTO_P_FOLLOW, PROTO_P_LEVEL, PROTO_P_WORKER, NULL};
static const char *const stop_params[] = {PROTO_P_FORCE, PROTO_P_TIMEOUT_S, NULL};

static const struct ctl_method methods[] = {
    {PROTO_M_PING, m_ping, ping_params},
    {PROTO_M_STATUS, m_status, status_params},
    {PROTO_M_LOGS, m_logs, logs_params},
    {PROTO_M_STOP, m_stop, stop_params},
};

void
ctl_dispatch(struct ctl_client *c, const msgpack_object *o)
{
	struct proto_request req;
	char err[160];
	if (proto_parse_request(o, &req, err, sizeof err) < 0) {
		uint32_t msgid = 0;
		if (o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size >= 2 &&
		    o->via.array.ptr[1].type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
		    o->via.array.ptr[1].via.u64 <= UINT32_MAX)
			msgid = (uint32_t)o->via.array.ptr[1].via.u64;
		ctl_client_fail(c, msgid, PROTO_E_BAD_REQUEST, err);
		return;
	}
	if (c->refused) {
		/* an answer the client can show, then the door closes */
		char msg[160];
		snprintf(msg, sizeof msg, "only root, uid %u or members of group %u may use this socket",
		         (unsigned)c->sd->uid, (unsigned)c->sd->sock_gid);
		ctl_reply_error(c, req.msgid, PROTO_E_PERMISSION, msg);
		ctl_client_close(c);
		return;
	}
	for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
		if (strcmp(req.method, methods[i].name) != 0)
			continue;
		if (proto_check_params(req.params, methods[i].params, err, sizeof err) < 0)
			ctl_reply_error(c, req.msgid, PROTO_E_BAD_PARAMS, err);
		else
			methods[i].fn(c, &req);
		return;
	}
	char msg[96];
	snprintf(msg, sizeof msg, "unknown method '%s' (protocol %d: ping, status, logs, stop)", req.method,
	         SPARK_PROTOCOL_VERSION);
	ctl_reply_error(c, req.msgid, PROTO_E_UNKNOWN_METHOD, msg);
}

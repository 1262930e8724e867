/*
 * The control socket (DESIGN §4): peer checks, per-uid caps, msgpack-RPC dispatch, log followers with bounded
 * output. Clients are untrusted: a bad one is a warning and a dropped connection, never fatal, never blocking.
 */
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sparkd.h"

struct ctl_method {
	const char *name;
	void (*fn)(struct ctl_client *, const struct proto_request *);
};

static void client_free(struct ctl_client *c);

/* ---- peers ---- */

/* Is gid among the supplementary groups of pid (from /proc: no NSS lookups in the loop)? */
static bool
pid_in_group(pid_t pid, gid_t gid)
{
	if (pid <= 0)
		return false;
	char path[64], line[4096];
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "re");
	if (f == NULL)
		return false;
	bool found = false;
	while (!found && fgets(line, sizeof line, f) != NULL) {
		if (strncmp(line, "Groups:", 7) != 0)
			continue;
		char *save = NULL;
		for (char *t = strtok_r(line + 7, " \t\n", &save); t != NULL; t = strtok_r(NULL, " \t\n", &save)) {
			long g;
			if (parse_long(t, &g) == 0 && (gid_t)g == gid)
				found = true;
		}
		break;
	}
	fclose(f);
	return found;
}

/* Root, the daemon's own user, or a member of the socket's group may talk to sparkd. */
bool
ctl_peer_allowed(uid_t peer_uid, gid_t peer_gid, pid_t peer_pid, uid_t self_uid, gid_t sock_gid)
{
	if (peer_uid == 0 || peer_uid == self_uid)
		return true;
	if (peer_gid == sock_gid)
		return true;
	return pid_in_group(peer_pid, sock_gid);
}

/* Changing methods need root or the daemon's uid. */
bool
ctl_may_stop(uid_t peer_uid, uid_t self_uid)
{
	return peer_uid == 0 || peer_uid == self_uid;
}

/* ---- output ---- */

static void
client_send(struct ctl_client *c, const msgpack_sbuffer *sb)
{
	if (c->flags & (CLIENT_CLOSING | CLIENT_FREE))
		return;
	if (bufferevent_write(c->bev, sb->data, sb->size) < 0)
		log_warnx("control client (pid %d): cannot queue %zu bytes", (int)c->pid, sb->size);
}

/* Everything is written: shut our side, wait for the peer's EOF (or the read timeout) to free. */
static void
client_linger(struct ctl_client *c)
{
	if (c->flags & CLIENT_LINGER)
		return;
	c->flags |= CLIENT_LINGER;
	shutdown(bufferevent_getfd(c->bev), SHUT_WR);
}

static void
reply_error(struct ctl_client *c, uint32_t msgid, const char *code, const char *message)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_error_response(&pk, msgid, code, message);
	client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
}

/*
 * Close once what is queued has been written. Until then, and for a moment after (write side shut), input is
 * read and thrown away: closing on unread input would reset the connection and lose the error reply.
 */
static void
client_close_after_flush(struct ctl_client *c)
{
	c->flags |= CLIENT_CLOSING;
	c->follow = false;
	struct timeval rtv = {2, 0}, wtv = {CTL_IDLE_PARTIAL, 0};
	bufferevent_set_timeouts(c->bev, &rtv, &wtv);
	if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
		client_linger(c);
}

/* A protocol violation: an error reply where one can be given, then the connection goes. */
static void
client_fail(struct ctl_client *c, uint32_t msgid, const char *code, const char *message)
{
	log_warnx("control client (pid %d, uid %u): %s: %s; closing", (int)c->pid, (unsigned)c->uid, code, message);
	reply_error(c, msgid, code, message);
	client_close_after_flush(c);
}

static void
pack_log_line(msgpack_packer *pk, const struct lc_line *l)
{
	char level[16];
	spark_strlcpy(level, log_level_name(l->level), sizeof level);
	for (char *s = level; *s; s++)
		*s = (char)(*s - 'A' + 'a');
	msgpack_pack_map(pk, 5);
	proto_pack_kv_double(pk, "ts", l->ts);
	proto_pack_kv_str(pk, "level", level);
	proto_pack_kv_str(pk, "worker", l->worker);
	proto_pack_kv_int(pk, "pid", l->pid);
	proto_pack_key(pk, "msg");
	msgpack_pack_str(pk, l->len);
	msgpack_pack_str_body(pk, l->msg, l->len);
}

static void
send_dropped(struct ctl_client *c)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_notify_head(&pk, PROTO_N_LOG);
	msgpack_pack_array(&pk, 1);
	msgpack_pack_map(&pk, 1);
	proto_pack_kv_int(&pk, PROTO_N_DROPPED, c->dropped);
	client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
	c->dropped = 0;
}

static bool
follower_wants(const struct ctl_client *c, const struct lc_line *l)
{
	return l->level >= c->follow_level && logcap_worker_match(c->follow_worker, l->worker);
}

/*
 * A new line for every follower. Above CTL_FOLLOW_LIMIT queued bytes a follower gets nothing more; the lines it
 * missed are counted and reported as {"dropped": N} once its buffer has drained.
 */
void
ctl_broadcast_log(struct sparkd *sd, const struct lc_line *l)
{
	msgpack_sbuffer sb;
	bool packed = false;
	struct ctl_client *c;
	for (c = TAILQ_FIRST(&sd->clients); c != NULL; c = TAILQ_NEXT(c, entry)) {
		if (!c->follow || (c->flags & (CLIENT_CLOSING | CLIENT_FREE)) || !follower_wants(c, l))
			continue;
		if (c->dropped > 0 || evbuffer_get_length(bufferevent_get_output(c->bev)) > CTL_FOLLOW_LIMIT) {
			c->dropped++;
			continue;
		}
		if (!packed) {
			msgpack_sbuffer_init(&sb);
			msgpack_packer pk;
			msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
			proto_pack_notify_head(&pk, PROTO_N_LOG);
			msgpack_pack_array(&pk, 1);
			pack_log_line(&pk, l);
			packed = true;
		}
		client_send(c, &sb);
	}
	if (packed)
		msgpack_sbuffer_destroy(&sb);
}

/* ---- methods ---- */

static void
m_ping(struct ctl_client *c, const struct proto_request *req)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	msgpack_pack_map(&pk, 3);
	proto_pack_kv_int(&pk, "protocol", SPARK_PROTOCOL_VERSION);
	proto_pack_kv_str(&pk, "version", SPARK_VERSION);
	proto_pack_kv_int(&pk, "pid", c->sd->pid);
	client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
}

static void
pack_exit(msgpack_packer *pk, const struct sd_exit *ex)
{
	if (!ex->set) {
		msgpack_pack_nil(pk);
		return;
	}
	msgpack_pack_map(pk, 4);
	proto_pack_kv_str(pk, "reason", ex->reason);
	proto_pack_key(pk, "status");
	if (ex->signal != 0 || ex->status < 0)
		msgpack_pack_nil(pk);
	else
		msgpack_pack_int(pk, ex->status);
	proto_pack_key(pk, "signal");
	if (ex->signal != 0)
		msgpack_pack_int(pk, ex->signal);
	else
		msgpack_pack_nil(pk);
	proto_pack_kv_double(pk, "at", ex->at);
}

static void
pack_proc(msgpack_packer *pk, const struct sd_slot *s, const struct sd_proc *p, enum sd_pstate placeholder)
{
	double now = now_mono(), wall = now_wall();
	msgpack_pack_map(pk, 12);
	proto_pack_kv_int(pk, "pid", p ? p->pid : 0);
	proto_pack_kv_str(pk, "state", sup_state_name(p ? p->state : placeholder));
	proto_pack_kv_int(pk, "slot", s->index);
	proto_pack_kv_int(pk, "rss_kib", p ? p->rss_kib : 0);
	proto_pack_kv_int(pk, "processed", p ? p->processed : 0);
	proto_pack_kv_int(pk, "restarts", s->restarts);
	proto_pack_key(pk, "active_tasks");
	int n = 0;
	for (int i = 0; p != NULL && i < p->nslots; i++)
		n += p->tasks[i].used;
	msgpack_pack_array(pk, (size_t)n);
	for (int i = 0; p != NULL && i < p->nslots; i++) {
		const struct sd_task *t = &p->tasks[i];
		if (!t->used)
			continue;
		msgpack_pack_map(pk, 5);
		proto_pack_kv_str(pk, "id", t->id);
		proto_pack_kv_str(pk, "name", t->name);
		proto_pack_kv_double(pk, "runtime_s", now - t->started_mono);
		proto_pack_kv_double(pk, "started_at", t->started_wall);
		proto_pack_kv_double(pk, "hard_limit", t->hard_limit);
	}
	proto_pack_key(pk, "started_at");
	if (p)
		msgpack_pack_double(pk, p->started_wall);
	else
		msgpack_pack_nil(pk);
	proto_pack_key(pk, "last_exit");
	pack_exit(pk, &s->last_exit);
	proto_pack_kv_str(pk, "problem", p ? p->problem : NULL);
	proto_pack_kv_str(pk, "recycle", p && p->reason[0] ? p->reason : NULL);
	proto_pack_key(pk, "next_restart_s");
	if (p == NULL && s->backoff)
		msgpack_pack_double(pk, s->backoff_until > wall ? s->backoff_until - wall : 0);
	else
		msgpack_pack_nil(pk);
}

static void
pack_worker(msgpack_packer *pk, struct sparkd *sd, struct sd_worker *w, bool with_procs)
{
	msgpack_pack_map(pk, with_procs ? 10 : 9);
	proto_pack_kv_str(pk, "name", w->name);
	proto_pack_kv_str(pk, "state", sup_state_name(sup_worker_state(w)));
	proto_pack_kv_str(pk, "pool", pool_name(sd->cfg.pool));
	proto_pack_kv_int(pk, "concurrency", w->nslots * w->proc_slots); /* pool_grow/pool_shrink change it */
	proto_pack_kv_int(pk, "processed", sup_worker_processed(w));
	proto_pack_kv_int(pk, "active", sup_worker_active(w));
	proto_pack_kv_double(pk, "uptime_s", w->started_wall > 0 ? now_wall() - w->started_wall : 0);
	proto_pack_kv_int(pk, "restarts", sup_worker_restarts(w));
	proto_pack_key(pk, PROTO_F_CELERY);
	celery_pack_node(sd, w, pk);
	if (!with_procs)
		return;
	/* each slot's current process (or its backoff/stopped placeholder), then processes being replaced */
	size_t n = 0;
	for (int k = 0; k < w->nslots; k++)
		if (w->slots[k].current != NULL || sd->state != SD_STOPPING)
			n++;
	struct sd_proc *p;
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		if (p->retiring || w->slots[p->slot].current != p)
			n++;
	}
	proto_pack_key(pk, "processes");
	msgpack_pack_array(pk, n);
	for (int k = 0; k < w->nslots; k++) {
		const struct sd_slot *s = &w->slots[k];
		if (s->current != NULL)
			pack_proc(pk, s, s->current, PS_STARTING);
		else if (sd->state != SD_STOPPING)
			pack_proc(pk, s, NULL, s->backoff ? PS_BACKOFF : PS_STARTING);
	}
	for (p = TAILQ_FIRST(&w->procs); p != NULL; p = TAILQ_NEXT(p, entry)) {
		if (p->retiring || w->slots[p->slot].current != p)
			pack_proc(pk, &w->slots[p->slot], p, PS_DRAINING);
	}
}

void
ctl_pack_status(struct sparkd *sd, msgpack_packer *pk, bool verbose, bool with_procs)
{
	const struct spark_config *cfg = &sd->cfg;
	msgpack_pack_map(pk, with_procs ? 2 : 3);
	proto_pack_key(pk, "supervisor");
	bool qknown = sd->nqlen > 0;
	msgpack_pack_map(pk, qknown ? 18 : 16);
	proto_pack_kv_int(pk, "pid", sd->pid);
	proto_pack_kv_str(pk, "version", SPARK_VERSION);
	proto_pack_kv_int(pk, "protocol", SPARK_PROTOCOL_VERSION);
	proto_pack_kv_double(pk, "uptime_s", now_wall() - sd->started_wall);
	proto_pack_kv_double(pk, "started_at", sd->started_wall);
	proto_pack_kv_str(pk, "socket", sd->sock_path);
	proto_pack_kv_bool(pk, "socket_activated", !sd->listen_owned);
	proto_pack_kv_str(pk, "pool", pool_name(cfg->pool));
	proto_pack_kv_int(pk, "workers", cfg->workers);
	proto_pack_kv_int(pk, "concurrency", cfg->concurrency);
	proto_pack_key(pk, "queues");
	msgpack_pack_array(pk, (size_t)cfg->nqueues);
	for (int i = 0; i < cfg->nqueues; i++)
		proto_pack_str(pk, cfg->queues[i]);
	if (qknown) {
		proto_pack_key(pk, "queue_lengths");
		msgpack_pack_map(pk, (size_t)sd->nqlen);
		for (int i = 0; i < sd->nqlen; i++)
			proto_pack_kv_int(pk, sd->qname[i], sd->qlen[i]);
		proto_pack_kv_double(pk, "queue_lengths_at", sd->qlen_at);
	}
	proto_pack_key(pk, "limits");
	msgpack_pack_map(pk, 4);
	proto_pack_kv_int(pk, "max_tasks_per_child", cfg->max_tasks_per_child);
	proto_pack_kv_int(pk, "max_memory_kib", cfg->max_memory_kib);
	proto_pack_kv_double(pk, "time_limit", cfg->time_limit);
	proto_pack_kv_double(pk, "soft_time_limit", cfg->soft_time_limit);
	proto_pack_kv_str(pk, "log_file", sd->lc.path);
	proto_pack_kv_str(pk, "state",
	                  sd->state == SD_STOPPING  ? "stopping"
	                  : sd->state == SD_RUNNING ? "running"
	                                            : "starting");
	proto_pack_kv_int(pk, "rss_kib", proc_rss_kib(0));
	proto_pack_key(pk, PROTO_F_CELERY);
	celery_pack_status(sd, pk, verbose);
	proto_pack_key(pk, "workers");
	msgpack_pack_array(pk, (size_t)sd->nworkers);
	for (int i = 0; i < sd->nworkers; i++)
		pack_worker(pk, sd, &sd->workers[i], with_procs);
	if (!with_procs)
		proto_pack_kv_bool(pk, "truncated", true);
}

static void
m_status(struct ctl_client *c, const struct proto_request *req)
{
	bool verbose = false;
	if (proto_get_bool(req->params, "verbose", &verbose) < 0) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "verbose must be a boolean");
		return;
	}
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	ctl_pack_status(c->sd, &pk, verbose, true);
	if (sb.size > SPARK_FRAME_MAX) {
		/* thousands of processes: the per-process detail does not fit in one frame */
		msgpack_sbuffer_clear(&sb);
		proto_pack_result_head(&pk, req->msgid);
		ctl_pack_status(c->sd, &pk, verbose, false);
	}
	client_send(c, &sb);
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
	if (proto_get_int(req->params, "lines", &lines) < 0 || lines < 0) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "lines must be a whole number >= 0");
		return;
	}
	if (proto_get_bool(req->params, "follow", &follow) < 0) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "follow must be a boolean");
		return;
	}
	int r = proto_get_str(req->params, "level", level_s, sizeof level_s);
	if (r < 0 || (r == 1 && level_s[0] != '\0' && (level = log_level_parse(level_s)) < 0)) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS,
		            "level must be one of debug, info, warning, error, critical");
		return;
	}
	if (proto_get_str(req->params, "worker", worker, sizeof worker) < 0) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "worker must be a worker name such as celery@host");
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
	msgpack_pack_map(&pk, 1);
	proto_pack_key(&pk, "lines");
	msgpack_pack_array(&pk, n);
	for (size_t i = first, k = 0; k < n && i < lc->count; i++) {
		const struct lc_line *l = logcap_ring_get(lc, i);
		if (l->level < level || !logcap_worker_match(worker, l->worker))
			continue;
		pack_log_line(&pk, l);
		k++;
	}
	client_send(c, &sb);
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
		reply_error(c, req->msgid, PROTO_E_PERMISSION, "only root or the daemon's user may stop sparkd");
		return;
	}
	bool force = false;
	double timeout = -1;
	if (proto_get_bool(req->params, "force", &force) < 0) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "force must be a boolean");
		return;
	}
	int r = proto_get_double(req->params, "timeout_s", &timeout);
	if (r < 0 || (r == 1 && !(timeout >= 0 && timeout <= 30 * 86400))) {
		reply_error(c, req->msgid, PROTO_E_BAD_PARAMS, "timeout_s must be a number of seconds >= 0");
		return;
	}
	if (r == 0)
		timeout = -1;
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_result_head(&pk, req->msgid);
	msgpack_pack_map(&pk, 1);
	proto_pack_kv_bool(&pk, "stopping", true);
	client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
	log_info("%s stop requested by pid %d (uid %u)", force ? "cold" : "warm", (int)c->pid, (unsigned)c->uid);
	/* timeout 0: no grace at all */
	sup_stop(sd, force || (r == 1 && timeout == 0), timeout);
}

static const struct ctl_method methods[] = {
    {PROTO_M_PING, m_ping},
    {PROTO_M_STATUS, m_status},
    {PROTO_M_LOGS, m_logs},
    {PROTO_M_STOP, m_stop},
};

static void
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
		client_fail(c, msgid, PROTO_E_BAD_REQUEST, err);
		return;
	}
	if (c->refused) {
		/* an answer the client can show, then the door closes */
		char msg[160];
		snprintf(msg, sizeof msg, "only root, uid %u or members of group %u may use this socket",
		         (unsigned)c->sd->uid, (unsigned)c->sd->sock_gid);
		reply_error(c, req.msgid, PROTO_E_PERMISSION, msg);
		client_close_after_flush(c);
		return;
	}
	for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
		if (strcmp(req.method, methods[i].name) == 0) {
			methods[i].fn(c, &req);
			return;
		}
	}
	char msg[96];
	snprintf(msg, sizeof msg, "unknown method '%s' (protocol %d: ping, status, logs, stop)", req.method,
	         SPARK_PROTOCOL_VERSION);
	reply_error(c, req.msgid, PROTO_E_UNKNOWN_METHOD, msg);
}

/* ---- clients ---- */

static void
client_free(struct ctl_client *c)
{
	struct sparkd *sd = c->sd;
	TAILQ_REMOVE(&sd->clients, c, entry);
	sd->nclients--;
	proto_reader_free(&c->rd);
	bufferevent_free(c->bev);
	free(c);
}

static bool
is_array_head(unsigned char b)
{
	return (b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd;
}

static void
client_set_partial(struct ctl_client *c, bool partial)
{
	if (partial == c->partial)
		return;
	c->partial = partial;
	struct timeval tv = {CTL_IDLE_PARTIAL, 0};
	bufferevent_set_timeouts(c->bev, partial ? &tv : NULL, NULL);
}

static void
client_read_cb(struct bufferevent *bev, void *arg)
{
	struct ctl_client *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	char buf[CTL_READ_CHUNK];
	if (c->flags & CLIENT_CLOSING) {
		size_t n = evbuffer_get_length(in);
		evbuffer_drain(in, n);
		c->discarded += n;
		if (c->discarded > 8 * SPARK_FRAME_MAX)
			client_free(c);
		return;
	}
	c->flags |= CLIENT_IN_CALLBACK;
	while (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE)) && evbuffer_get_length(in) > 0) {
		int n = evbuffer_remove(in, buf, sizeof buf);
		if (n <= 0)
			break;
		/* a frame is an array: anything else at a frame boundary is noise, refused at once */
		if (msgpack_unpacker_message_size(&c->rd.unp) == 0 && !is_array_head((unsigned char)buf[0])) {
			client_fail(c, 0, PROTO_E_BAD_REQUEST,
			            "expected a msgpack-RPC request [0, msgid, method, [params]]");
			break;
		}
		/* proto's reader scans the structure first: an oversized announcement is refused before buffering */
		int rc = proto_reader_feed(&c->rd, buf, (size_t)n);
		if (rc == PROTO_READ_TOO_LARGE) {
			client_fail(c, 0, PROTO_E_FRAME_TOO_LARGE, "a frame is at most 1 MiB");
			break;
		}
		if (rc != PROTO_READ_NEED_MORE) {
			client_fail(c, 0, PROTO_E_BAD_REQUEST, "not valid msgpack");
			break;
		}
		while (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE))) {
			msgpack_unpacked u;
			msgpack_unpacked_init(&u);
			rc = proto_reader_next(&c->rd, &u);
			if (rc == PROTO_READ_FRAME)
				ctl_dispatch(c, &u.data);
			msgpack_unpacked_destroy(&u);
			if (rc == PROTO_READ_NEED_MORE)
				break;
			if (rc == PROTO_READ_BAD)
				client_fail(c, 0, PROTO_E_BAD_REQUEST, "not valid msgpack");
			else if (rc == PROTO_READ_TOO_LARGE)
				client_fail(c, 0, PROTO_E_FRAME_TOO_LARGE, "a frame is at most 1 MiB");
		}
	}
	if (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE)))
		client_set_partial(c, msgpack_unpacker_message_size(&c->rd.unp) > 0);
	c->flags &= ~CLIENT_IN_CALLBACK;
	if (c->flags & CLIENT_FREE)
		client_free(c);
	else if ((c->flags & CLIENT_CLOSING) && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
		client_linger(c);
}

static void
client_write_cb(struct bufferevent *bev, void *arg)
{
	struct ctl_client *c = arg;
	if (c->flags & CLIENT_CLOSING) {
		client_linger(c);
		return;
	}
	if (c->follow && c->dropped > 0)
		send_dropped(c);
}

static void
client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct ctl_client *c = arg;
	if ((what & BEV_EVENT_TIMEOUT) && !(c->flags & CLIENT_CLOSING))
		log_warnx("control client (pid %d): partial frame idle for %ds; closing", (int)c->pid,
		          CTL_IDLE_PARTIAL);
	/* EOF, error and timeout all end the same way */
	if (c->flags & CLIENT_IN_CALLBACK)
		c->flags |= CLIENT_FREE;
	else
		client_free(c);
}

static struct ctl_client *
client_new(struct sparkd *sd, int fd, const struct ucred *cr)
{
	struct ctl_client *c = xcalloc(1, sizeof *c);
	c->sd = sd;
	c->uid = cr->uid;
	c->gid = cr->gid;
	c->pid = cr->pid;
	if (proto_reader_init(&c->rd) < 0)
		fatalx("out of memory (msgpack unpacker)");
	c->bev = bufferevent_socket_new(sd->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (c->bev == NULL)
		fatalx("out of memory (bufferevent)");
	bufferevent_setcb(c->bev, client_read_cb, client_write_cb, client_event_cb, c);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
	TAILQ_INSERT_TAIL(&sd->clients, c, entry);
	sd->nclients++;
	return c;
}

static int
clients_of(struct sparkd *sd, uid_t uid)
{
	int n = 0;
	struct ctl_client *c;
	for (c = TAILQ_FIRST(&sd->clients); c != NULL; c = TAILQ_NEXT(c, entry)) {
		n += c->uid == uid;
	}
	return n;
}

static void
accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sparkd *sd = arg;
	if (sd->listen_ev != NULL)
		event_add(sd->listen_ev, NULL);
}

static void
accept_cb(evutil_socket_t lfd, short what, void *arg)
{
	struct sparkd *sd = arg;
	for (int i = 0; i < 32; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				/* out of descriptors: pause accepting for a second instead of spinning */
				log_warn("accept on the control socket; pausing for 1s");
				event_del(sd->listen_ev);
				struct timeval tv = {1, 0};
				evtimer_add(sd->accept_retry_ev, &tv);
				return;
			}
			log_warn("accept on the control socket");
			return;
		}
		struct ucred cr;
		socklen_t sl = sizeof cr;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &sl) < 0) {
			log_warn("control client: SO_PEERCRED");
			close(fd);
			continue;
		}
		/* the group may have been changed since we bound the socket (chgrp, SocketGroup=) */
		struct stat st;
		if (stat(sd->sock_path, &st) == 0)
			sd->sock_gid = st.st_gid;
		bool allowed = ctl_peer_allowed(cr.uid, cr.gid, cr.pid, sd->uid, sd->sock_gid);
		if (!allowed) {
			double now = now_mono();
			if (now - sd->refused_logged >= 1) {
				log_warnx("control client refused: pid %d uid %u is not root, uid %u or in group %u",
				          (int)cr.pid, (unsigned)cr.uid, (unsigned)sd->uid, (unsigned)sd->sock_gid);
				sd->refused_logged = now;
			}
		}
		if (sd->nclients >= CTL_MAX_CLIENTS || clients_of(sd, cr.uid) >= CTL_MAX_PER_UID) {
			log_warnx("control client refused: pid %d uid %u: too many connections (%d in all)",
			          (int)cr.pid, (unsigned)cr.uid, sd->nclients);
			close(fd);
			continue;
		}
		client_new(sd, fd, &cr)->refused = !allowed;
	}
}

/* ---- the socket ---- */

static int
sun_fill(struct sockaddr_un *sun, const char *path)
{
	memset(sun, 0, sizeof *sun);
	sun->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sun->sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	spark_strlcpy(sun->sun_path, path, sizeof sun->sun_path);
	return 0;
}

/*
 * Before binding: is a sparkd already serving path? 0 = free (a stale socket is removed), -1 = in use or
 * unusable, with the reason in err. Runs once at startup, before the loop, with short timeouts.
 */
int
ctl_check_running(const char *path, char *err, size_t errlen)
{
	struct stat st;
	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		snprintf(err, errlen, "cannot use the control socket %s: %s", path, strerror(errno));
		return -1;
	}
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "%s exists and is not a socket; remove it or choose another --socket", path);
		return -1;
	}
	struct sockaddr_un sun;
	if (sun_fill(&sun, path) < 0) {
		snprintf(err, errlen, "control socket path too long: %s", path);
		return -1;
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
		int e = errno;
		close(fd);
		if (e == ECONNREFUSED) {
			/* nobody listens: a leftover of a sparkd that died */
			if (unlink(path) < 0 && errno != ENOENT) {
				snprintf(err, errlen, "cannot remove the stale socket %s: %s", path, strerror(errno));
				return -1;
			}
			return 0;
		}
		snprintf(err, errlen, "cannot check the control socket %s: %s", path, strerror(e));
		return -1;
	}
	/* something listens: ask it who it is */
	struct timeval tv = {2, 0};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_request_head(&pk, 1, PROTO_M_PING);
	msgpack_pack_array(&pk, 0);
	ssize_t w = send(fd, sb.data, sb.size, MSG_NOSIGNAL);
	msgpack_sbuffer_destroy(&sb);
	int64_t pid = 0;
	if (w > 0) {
		struct proto_reader rd;
		proto_reader_init(&rd);
		char buf[4096];
		for (int tries = 0; tries < 8 && pid == 0; tries++) {
			ssize_t n = recv(fd, buf, sizeof buf, 0);
			if (n <= 0)
				break;
			if (proto_reader_feed(&rd, buf, (size_t)n) != PROTO_READ_NEED_MORE)
				break;
			msgpack_unpacked u;
			msgpack_unpacked_init(&u);
			if (proto_reader_next(&rd, &u) == PROTO_READ_FRAME) {
				struct proto_message m;
				char e[64];
				if (proto_parse_message(&u.data, &m, e, sizeof e) == 0 && m.type == PROTO_RESPONSE &&
				    proto_get_int(m.result, "pid", &pid) != 1)
					pid = -1;
				if (pid == 0)
					pid = -1;
			}
			msgpack_unpacked_destroy(&u);
		}
		proto_reader_free(&rd);
	}
	close(fd);
	if (pid > 0)
		snprintf(err, errlen, "sparkd is already running (pid %lld) on %s", (long long)pid, path);
	else
		snprintf(err, errlen,
		         "the control socket %s is in use by another program; stop it or choose another --socket",
		         path);
	return -1;
}

int
ctl_listen(struct sparkd *sd, char *err, size_t errlen)
{
	int fd;
	if (sd->sys.listen_fd >= 0) {
		/* socket activation: systemd made it and owns the path */
		fd = sd->sys.listen_fd;
		sd->listen_owned = false;
		struct sockaddr_un sun;
		socklen_t sl = sizeof sun;
		memset(&sun, 0, sizeof sun);
		if (getsockname(fd, (struct sockaddr *)&sun, &sl) == 0 && sl > offsetof(struct sockaddr_un, sun_path) &&
		    sun.sun_path[0] != '\0') {
			free(sd->sock_path);
			sd->sock_path = xstrndup(sun.sun_path, sizeof sun.sun_path);
		}
		fd_set_nonblock(fd);
	} else {
		const char *path = sd->sock_path;
		const char *slash = strrchr(path, '/');
		if (slash != NULL && slash != path) {
			char *dir = xstrndup(path, (size_t)(slash - path));
			int rc = mkdir_p(dir, 0750);
			if (rc < 0)
				snprintf(err, errlen, "cannot create the socket directory %s: %s", dir,
				         strerror(errno));
			free(dir);
			if (rc < 0)
				return -1;
		}
		if (ctl_check_running(path, err, errlen) < 0)
			return -1;
		struct sockaddr_un sun;
		if (sun_fill(&sun, path) < 0) {
			snprintf(err, errlen, "control socket path too long (at most %zu bytes): %s",
			         sizeof sun.sun_path - 1, path);
			return -1;
		}
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0) {
			snprintf(err, errlen, "socket: %s", strerror(errno));
			return -1;
		}
		mode_t old = umask(0117);
		int rc = bind(fd, (struct sockaddr *)&sun, sizeof sun);
		int e = errno;
		umask(old);
		if (rc < 0) {
			close(fd);
			if (e == EADDRINUSE)
				snprintf(err, errlen, "the control socket %s is in use (another sparkd starting?)",
				         path);
			else
				snprintf(err, errlen, "cannot bind the control socket %s: %s", path, strerror(e));
			return -1;
		}
		if (chmod(path, 0660) < 0 || listen(fd, 128) < 0) {
			snprintf(err, errlen, "cannot listen on %s: %s", path, strerror(errno));
			close(fd);
			unlink(path);
			return -1;
		}
		sd->listen_owned = true;
	}
	sd->listen_fd = fd;
	struct stat st;
	sd->sock_gid = stat(sd->sock_path, &st) == 0 ? st.st_gid : getgid();
	sd->listen_ev = event_new(sd->base, fd, EV_READ | EV_PERSIST, accept_cb, sd);
	sd->accept_retry_ev = evtimer_new(sd->base, accept_retry_cb, sd);
	if (sd->listen_ev == NULL || sd->accept_retry_ev == NULL)
		fatalx("out of memory (event)");
	event_add(sd->listen_ev, NULL);
	return 0;
}

/* At exit: stop listening and remove the path, unless systemd owns it. */
void
ctl_close_listener(struct sparkd *sd)
{
	if (sd->listen_ev != NULL)
		event_free(sd->listen_ev);
	if (sd->accept_retry_ev != NULL)
		event_free(sd->accept_retry_ev);
	sd->listen_ev = sd->accept_retry_ev = NULL;
	if (sd->listen_fd >= 0) {
		close(sd->listen_fd);
		if (sd->listen_owned)
			unlink(sd->sock_path);
	}
	sd->listen_fd = -1;
}

void
ctl_free_all(struct sparkd *sd)
{
	struct ctl_client *c;
	while ((c = TAILQ_FIRST(&sd->clients)) != NULL)
		client_free(c);
}

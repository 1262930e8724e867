/*
 * Log followers (`logs --follow`, DESIGN §4): every captured line goes to each follower that wants it, with a
 * bounded output buffer per follower; what a slow follower misses is counted, never queued.
 */
#include <string.h>

#include "ctl.h"

void
ctl_pack_log_line(msgpack_packer *pk, const struct lc_line *l)
{
	char level[16];
	spark_strlcpy(level, log_level_name(l->level), sizeof level);
	for (char *s = level; *s; s++)
		*s = (char)(*s - 'A' + 'a');
	msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_LOG_LINE_FIELDS));
	proto_pack_kv_double(pk, PROTO_F_TS, l->ts);
	proto_pack_kv_str(pk, PROTO_F_LEVEL, level);
	proto_pack_kv_str(pk, PROTO_F_WORKER, l->worker);
	proto_pack_kv_int(pk, PROTO_F_PID, l->pid);
	proto_pack_key(pk, PROTO_F_MSG);
	msgpack_pack_str(pk, l->len);
	msgpack_pack_str_body(pk, l->msg, l->len);
}

void
ctl_follow_send_dropped(struct ctl_client *c)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_notify_head(&pk, PROTO_N_LOG);
	msgpack_pack_array(&pk, 1);
	msgpack_pack_map(&pk, PROTO_NFIELDS(PROTO_DROPPED_FIELDS));
	proto_pack_kv_int(&pk, PROTO_N_DROPPED, c->dropped);
	ctl_client_send(c, &sb);
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
			ctl_pack_log_line(&pk, l);
			packed = true;
		}
		ctl_client_send(c, &sb);
	}
	if (packed)
		msgpack_sbuffer_destroy(&sb);
}

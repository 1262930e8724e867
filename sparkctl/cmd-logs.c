/*
 * sparkctl logs: the last N lines of every worker from sparkd's ring (already merged in time order by the daemon),
 * then, with --follow, its "log" notifications until interrupted or until the daemon exits.
 */
#include "sparkctl.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "log.h"
#include "util.h"

#define LOGS_DEFAULT_LINES 100
#define LOGS_TIMEOUT_MS    10000

struct logs_params {
	int64_t lines;
	const char *level; /* canonical lower-case name, or NULL */
	const char *worker;
	bool follow;
};

static void
logs_pack(msgpack_packer *pk, void *arg)
{
	const struct logs_params *p = arg;
	msgpack_pack_map(pk, 2 + (p->level != NULL) + (p->worker != NULL));
	proto_pack_kv_int(pk, PROTO_P_LINES, p->lines);
	proto_pack_kv_bool(pk, PROTO_P_FOLLOW, p->follow);
	if (p->level != NULL)
		proto_pack_kv_str(pk, PROTO_P_LEVEL, p->level);
	if (p->worker != NULL)
		proto_pack_kv_str(pk, PROTO_P_WORKER, p->worker);
}

/* One entry, either a log line or a {"dropped": N} marker, in the chosen format. */
static void
logs_print(const struct ctl *ctl, const msgpack_object *o, bool json)
{
	if (o == NULL)
		return;
	if (json) {
		out_print_json(o, false);
		return;
	}
	if (o->type != MSGPACK_OBJECT_MAP)
		return;
	if (proto_map_get(o, PROTO_N_DROPPED) != NULL && proto_map_get(o, PROTO_F_MSG) == NULL)
		out_dropped_line(ctl, o);
	else
		out_log_line(ctl, o);
}

int
cmd_logs(struct ctl *ctl, const struct ctl_args *a)
{
	char level[16] = "";
	struct logs_params p = {
	    .lines = a->set[OPT_LINES] ? (int64_t)a->num[OPT_LINES] : LOGS_DEFAULT_LINES,
	    .worker = a->set[OPT_WORKER] && a->str[OPT_WORKER][0] != '\0' ? a->str[OPT_WORKER] : NULL,
	    .follow = a->set[OPT_FOLLOW],
	};
	bool json = a->set[OPT_JSON];
	if (a->set[OPT_LEVEL]) {
		/* the daemon gets the canonical name whatever spelling was typed ("WARN" -> "warning") */
		spark_strlcpy(level, log_level_name(a->level), sizeof level);
		for (char *s = level; *s; s++)
			*s = (char)tolower((unsigned char)*s);
		p.level = level;
	}

	struct ctl_client c;
	int rc = ctl_connect_or_report(ctl, &c);
	if (rc != CTL_EXIT_OK)
		return rc;
	if (p.follow)
		ctl_catch_interrupt();

	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	const msgpack_object *res = NULL;
	char err[768] = "";
	enum ctl_result r =
	    ctl_client_call(&c, PROTO_M_LOGS, logs_pack, &p, LOGS_TIMEOUT_MS, &reply, &res, err, sizeof err);
	if (r != CTL_OK) {
		msgpack_unpacked_destroy(&reply);
		ctl_client_close(&c);
		return r == CTL_INTERRUPTED ? CTL_EXIT_OK : ctl_report_failure(ctl, r, err);
	}
	const msgpack_object *lines = proto_map_get(res, PROTO_F_LINES);
	if (lines != NULL && lines->type == MSGPACK_OBJECT_ARRAY)
		for (uint32_t i = 0; i < lines->via.array.size; i++)
			logs_print(ctl, &lines->via.array.ptr[i], json);
	int64_t dropped = 0;
	if (proto_get_int(res, PROTO_N_DROPPED, &dropped) == 1 && dropped > 0)
		logs_print(ctl, res, json);
	msgpack_unpacked_destroy(&reply);
	fflush(stdout);

	if (!p.follow) {
		ctl_client_close(&c);
		return CTL_EXIT_OK;
	}

	for (;;) {
		msgpack_unpacked msg;
		msgpack_unpacked_init(&msg);
		r = ctl_client_next(&c, -1, &msg, err, sizeof err);
		if (r != CTL_OK) {
			msgpack_unpacked_destroy(&msg);
			break;
		}
		struct proto_message m;
		char perr[128];
		if (proto_parse_message(&msg.data, &m, perr, sizeof perr) < 0) {
			snprintf(err, sizeof err, "malformed message from sparkd: %s", perr);
			msgpack_unpacked_destroy(&msg);
			r = CTL_FAILED;
			break;
		}
		if (m.type == PROTO_NOTIFY && strcmp(m.method, PROTO_N_LOG) == 0) {
			logs_print(ctl, m.result, json);
		} else if (m.type == PROTO_NOTIFY && strcmp(m.method, PROTO_N_DROPPED) == 0 && m.result != NULL) {
			if (json || m.result->type == MSGPACK_OBJECT_MAP)
				logs_print(ctl, m.result, json);
			else
				out_dropped_line(ctl, m.result);
		}
		msgpack_unpacked_destroy(&msg);
		fflush(stdout);
	}
	ctl_client_close(&c);
	/* an interrupt is how a follow normally ends; the daemon exiting ends it too */
	if (r == CTL_INTERRUPTED || r == CTL_EOF)
		return CTL_EXIT_OK;
	return ctl_report_failure(ctl, r, err);
}

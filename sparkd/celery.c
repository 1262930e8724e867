/*
 * The Celery side of sparkd as a whole (celery.h): init, start and free, the Lamport clock, the cache of revoked
 * ids, the hooks supervision calls, and the fields status shows.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "celery.h"
#include "command.h"
#include "url.h"

void
celery_init(struct sparkd *sd)
{
	struct sd_celery *cel = xcalloc(1, sizeof *cel);
	sd->cel = cel;
	TAILQ_INIT(&cel->queries);
	cel->heartbeats = true;
	broker_init(sd, &cel->broker);
	cel->nodes = xcalloc((size_t)sd->nworkers, sizeof *cel->nodes);
	for (int i = 0; i < sd->nworkers; i++)
		node_init(sd, &cel->nodes[i]);
}

void
celery_start(struct sparkd *sd)
{
	broker_start(&sd->cel->broker);
	node_events_start(sd);
}

void
celery_free(struct sparkd *sd)
{
	struct sd_celery *cel = sd->cel;
	if (cel == NULL)
		return;
	fq_free_all(sd);
	/* first: pending PUBLISH callbacks run (with NULL) while the events' timers still exist */
	broker_free(&cel->broker);
	node_events_free(sd);
	for (int i = 0; i < sd->nworkers; i++)
		node_free(&cel->nodes[i]);
	free(cel->nodes);
	for (int i = 0; i < cel->nrevoked; i++)
		free(cel->revoked[i]);
	free(cel->revoked);
	free(cel->revoked_exp);
	free(cel);
	sd->cel = NULL;
}

struct cel_node *
celery_node(struct sparkd *sd, struct sd_worker *w)
{
	return &sd->cel->nodes[w->index - 1];
}

unsigned long
celery_tick(struct sparkd *sd)
{
	return ++sd->cel->clock;
}

void
celery_adjust_clock(struct sparkd *sd, unsigned long seen)
{
	if (seen > sd->cel->clock)
		sd->cel->clock = seen;
	sd->cel->clock++;
}

/* ---- revoked ids: a bounded cache of SPARK_REVOKED_KEY, newest last ---- */

void
celery_revoked_add(struct sparkd *sd, const char *id, double expires)
{
	struct sd_celery *cel = sd->cel;
	for (int i = 0; i < cel->nrevoked; i++) {
		if (strcmp(cel->revoked[i], id) != 0)
			continue;
		char *s = cel->revoked[i];
		memmove(&cel->revoked[i], &cel->revoked[i + 1], (size_t)(cel->nrevoked - i - 1) * sizeof(char *));
		memmove(&cel->revoked_exp[i], &cel->revoked_exp[i + 1],
		        (size_t)(cel->nrevoked - i - 1) * sizeof(double));
		cel->revoked[cel->nrevoked - 1] = s;
		cel->revoked_exp[cel->nrevoked - 1] = expires;
		return;
	}
	if (cel->nrevoked == SPARK_REVOKED_MAX) {
		free(cel->revoked[0]);
		memmove(&cel->revoked[0], &cel->revoked[1], (size_t)(cel->nrevoked - 1) * sizeof(char *));
		memmove(&cel->revoked_exp[0], &cel->revoked_exp[1], (size_t)(cel->nrevoked - 1) * sizeof(double));
		cel->nrevoked--;
	}
	if (cel->nrevoked == cel->caprevoked) {
		cel->caprevoked = cel->caprevoked ? cel->caprevoked * 2 : 64;
		cel->revoked = xrealloc(cel->revoked, (size_t)cel->caprevoked * sizeof(char *));
		cel->revoked_exp = xrealloc(cel->revoked_exp, (size_t)cel->caprevoked * sizeof(double));
	}
	cel->revoked[cel->nrevoked] = xstrdup(id);
	cel->revoked_exp[cel->nrevoked++] = expires;
}

/* ZREVRANGEBYSCORE ... WITHSCORES: [id, score, id, score ...], newest first */
static void
revoked_loaded(redisAsyncContext *ac, void *reply, void *priv)
{
	struct sparkd *sd = priv;
	redisReply *r = reply;
	if (r == NULL || r->type != REDIS_REPLY_ARRAY)
		return;
	for (size_t i = r->elements; i >= 2; i -= 2) {
		const redisReply *id = r->element[i - 2], *score = r->element[i - 1];
		double exp;
		if (id->type == REDIS_REPLY_STRING && score->type == REDIS_REPLY_STRING &&
		    parse_double(score->str, &exp) == 0)
			celery_revoked_add(sd, id->str, exp);
	}
}

void
celery_broker_up(struct sparkd *sd)
{
	pidbox_bind(sd);
	char now[32], max[32];
	snprintf(now, sizeof now, "%.3f", now_wall());
	snprintf(max, sizeof max, "%d", SPARK_REVOKED_MAX);
	const char *argv[] = {"ZREVRANGEBYSCORE", SPARK_REVOKED_KEY, "+inf", now, "WITHSCORES", "LIMIT", "0", max};
	broker_cmd(&sd->cel->broker, revoked_loaded, sd, 8, argv, NULL);
	for (int i = 0; i < sd->nworkers; i++)
		node_events_online(sd, &sd->workers[i]);
}

/* ---- hooks from supervision ---- */

void
celery_proc_started(struct sd_proc *p)
{
	struct sparkd *sd = p->w->sd;
	if (sd->cel != NULL)
		node_send_state(sd, p);
}

void
celery_proc_report(struct sd_proc *p, const struct report *r)
{
	if (p->w->sd->cel == NULL)
		return;
	if (r->kind == REPORT_ANSWER)
		fq_answer(p, r->reqid, r->text);
	else if (r->kind == REPORT_ANSWERED)
		fq_answered(p, r->reqid, r->count);
}

void
celery_node_stopped(struct sd_worker *w)
{
	if (w->sd->cel != NULL)
		node_events_offline(w->sd, w);
}

static void
celery_exit_loop(struct sparkd *sd)
{
	event_base_loopexit(sd->base, NULL);
}

void
celery_stop(struct sparkd *sd)
{
	if (sd->cel == NULL) {
		celery_exit_loop(sd);
		return;
	}
	if (sd->cel->heartbeat_ev != NULL)
		event_del(sd->cel->heartbeat_ev);
	node_events_all_offline(sd, celery_exit_loop);
}

/* ---- status: built with jansson (map sizes follow from the content), packed as msgpack ---- */

static void
pack_json(msgpack_packer *pk, json_t *v)
{
	const char *k;
	json_t *x;
	size_t i;
	switch (json_typeof(v)) {
	case JSON_OBJECT:
		msgpack_pack_map(pk, json_object_size(v));
		json_object_foreach(v, k, x)
		{
			proto_pack_key(pk, k);
			pack_json(pk, x);
		}
		break;
	case JSON_ARRAY:
		msgpack_pack_array(pk, json_array_size(v));
		json_array_foreach(v, i, x)
		{
			pack_json(pk, x);
		}
		break;
	case JSON_STRING:
		proto_pack_str(pk, json_string_value(v));
		break;
	case JSON_INTEGER:
		msgpack_pack_int64(pk, json_integer_value(v));
		break;
	case JSON_REAL:
		msgpack_pack_double(pk, json_real_value(v));
		break;
	case JSON_TRUE:
		msgpack_pack_true(pk);
		break;
	case JSON_FALSE:
		msgpack_pack_false(pk);
		break;
	default:
		msgpack_pack_nil(pk);
	}
}

static json_t *
broker_status(const struct sd_broker *b)
{
	return json_pack("{s:s, s:s?, s:f}", PROTO_F_BROKER_STATE, broker_state_name(b->state), PROTO_F_BROKER_ERROR,
	                 b->state == BROKER_UP || b->error[0] == '\0' ? NULL : b->error, PROTO_F_BROKER_SINCE,
	                 b->since);
}

/* The supervisor's "celery" field: sparkd's broker connection, events, revoked ids. */
void
celery_pack_status(struct sparkd *sd, msgpack_packer *pk, bool verbose)
{
	const struct sd_celery *cel = sd->cel;
	json_t *st = broker_status(&cel->broker);
	char *url = url_redact(sd->cfg.broker_url);
	json_object_set_new(st, PROTO_F_BROKER_URL, json_string(url));
	free(url);
	json_t *ids = json_array();
	double now = now_wall();
	int live = 0;
	for (int i = cel->nrevoked - 1; i >= 0; i--) {
		if (cel->revoked_exp[i] <= now)
			continue;
		if (verbose && live < CEL_STATUS_REVOKED_MAX)
			json_array_append_new(ids, json_string(cel->revoked[i]));
		live++;
	}
	json_t *v = json_pack("{s:o, s:{s:b, s:f}, s:{s:i, s:o}, s:I}", PROTO_F_BROKER, st, PROTO_F_EVENTS,
	                      PROTO_F_HEARTBEATS, cel->heartbeats, PROTO_F_FREQ, CEL_HEARTBEAT_FREQ, PROTO_F_REVOKED,
	                      PROTO_F_COUNT, live, PROTO_F_IDS, ids, PROTO_F_CLOCK, (json_int_t)cel->clock);
	pack_json(pk, v);
	json_decref(v);
}

/* A worker's "celery" field: the broker connection its Celery side depends on, its task events and queues. */
void
celery_pack_node(struct sparkd *sd, struct sd_worker *w, msgpack_packer *pk)
{
	const struct cel_node *n = celery_node(sd, w);
	json_t *queues = json_array();
	for (int i = 0; i < n->nqueues; i++)
		json_array_append_new(queues, json_string(n->queues[i]));
	json_t *v = json_pack("{s:o, s:b, s:o}", PROTO_F_BROKER, broker_status(&sd->cel->broker), PROTO_F_TASK_EVENTS,
	                      n->task_events == 1, PROTO_F_QUEUES, queues);
	pack_json(pk, v);
	json_decref(v);
}

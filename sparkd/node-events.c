/*
 * Worker events per node (reference §5.6), on by default as Celery's are: worker-online once the broker is up,
 * worker-heartbeat every 2 s, worker-offline when the node stops. A stop of sparkd waits (at most
 * CEL_OFFLINE_WAIT) for the PUBLISH replies, so monitors see the nodes go instead of timing them out.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "celery.h"

/* Python's time.timezone // 3600: hours west of UTC, floored */
static int
events_utcoffset(void)
{
	time_t now = time(NULL);
	struct tm tm;
	localtime_r(&now, &tm);
	long west = -tm.tm_gmtoff;
	return (int)(west >= 0 ? west / 3600 : -((-west + 3599) / 3600));
}

static json_t *
events_body(struct sparkd *sd, struct sd_worker *w, const char *type)
{
	double la[3] = {0, 0, 0};
	if (getloadavg(la, 3) < 0)
		la[0] = la[1] = la[2] = 0;
	for (int i = 0; i < 3; i++)
		la[i] = (double)(long)(la[i] * 100 + 0.5) / 100; /* load averages are never negative */
	return json_pack("{s:s, s:i, s:I, s:I, s:f, s:i, s:I, s:[f, f, f], s:s, s:s, s:s, s:f, s:s}", "hostname",
	                 w->name, "utcoffset", events_utcoffset(), "pid", (json_int_t)sd->pid, "clock",
	                 (json_int_t)celery_tick(sd), "freq", CEL_HEARTBEAT_FREQ, "active", sup_worker_active(w),
	                 "processed", (json_int_t)sup_worker_processed(w), "loadavg", la[0], la[1], la[2], "sw_ident",
	                 CEL_SW_IDENT, "sw_ver", SPARK_VERSION, "sw_sys", "Linux", "timestamp", now_wall(), "type",
	                 type);
}

/* PUBLISH /<db>.celeryev/<type with '-' as '.'> */
static int
events_publish(struct sparkd *sd, struct sd_worker *w, const char *type, redisCallbackFn *cb, void *priv)
{
	struct sd_broker *b = &sd->cel->broker;
	if (!broker_up(b))
		return -1;
	char rk[64], channel[128];
	spark_strlcpy(rk, type, sizeof rk);
	for (char *c = rk; *c; c++)
		if (*c == '-')
			*c = '.';
	broker_fanout_channel(b, CEL_EVENT_EXCHANGE, rk, channel, sizeof channel);
	char *env =
	    envelope_build(events_body(sd, w, type), json_pack("{s:s}", "hostname", w->name), CEL_EVENT_EXCHANGE, rk);
	if (env == NULL)
		return -1;
	const char *argv[] = {"PUBLISH", channel, env};
	int rc = broker_cmd(b, cb, priv, 3, argv, NULL);
	free(env);
	return rc;
}

static void
events_sent(redisAsyncContext *ac, void *reply, void *priv)
{
	redisReply *r = reply;
	if (r != NULL && r->type == REDIS_REPLY_ERROR)
		log_warnx("worker event: PUBLISH: %s", r->str);
}

static bool
node_running(struct sparkd *sd, struct sd_worker *w)
{
	return !w->stopped && sd->state != SD_STOPPING;
}

void
node_events_online(struct sparkd *sd, struct sd_worker *w)
{
	struct cel_node *n = celery_node(sd, w);
	if (n->online_sent || !node_running(sd, w))
		return;
	if (events_publish(sd, w, "worker-online", events_sent, NULL) == 0)
		n->online_sent = true;
}

static void
heartbeat_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sparkd *sd = arg;
	if (!sd->cel->heartbeats || !broker_up(&sd->cel->broker))
		return;
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		if (!node_running(sd, w))
			continue;
		if (!celery_node(sd, w)->online_sent)
			node_events_online(sd, w);
		else
			events_publish(sd, w, "worker-heartbeat", events_sent, NULL);
	}
}

void
node_events_start(struct sparkd *sd)
{
	struct sd_celery *cel = sd->cel;
	cel->heartbeat_ev = event_new(sd->base, -1, EV_PERSIST, heartbeat_cb, sd);
	if (cel->heartbeat_ev == NULL)
		fatalx("out of memory (timer)");
	struct timeval tv = {(time_t)CEL_HEARTBEAT_FREQ, 0};
	event_add(cel->heartbeat_ev, &tv);
}

void
node_events_offline(struct sparkd *sd, struct sd_worker *w)
{
	struct cel_node *n = celery_node(sd, w);
	if (!n->online_sent || n->offline_sent)
		return;
	n->offline_sent = true;
	events_publish(sd, w, "worker-offline", events_sent, NULL);
}

static void
offline_finish(struct sparkd *sd)
{
	struct sd_celery *cel = sd->cel;
	void (*done)(struct sparkd *) = cel->offline_done;
	cel->offline_done = NULL;
	if (cel->offline_ev != NULL)
		evtimer_del(cel->offline_ev);
	if (done != NULL)
		done(sd);
}

static void
offline_sent(redisAsyncContext *ac, void *reply, void *priv)
{
	struct sparkd *sd = priv;
	events_sent(ac, reply, NULL);
	if (--sd->cel->offline_pending == 0)
		offline_finish(sd);
}

static void
offline_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	log_warnx("worker-offline: no answer from the broker within %.0fs; exiting anyway", CEL_OFFLINE_WAIT);
	offline_finish(arg);
}

void
node_events_all_offline(struct sparkd *sd, void (*done)(struct sparkd *))
{
	struct sd_celery *cel = sd->cel;
	cel->offline_done = done;
	for (int i = 0; i < sd->nworkers; i++) {
		struct sd_worker *w = &sd->workers[i];
		struct cel_node *n = celery_node(sd, w);
		if (!n->online_sent || n->offline_sent)
			continue;
		n->offline_sent = true;
		if (events_publish(sd, w, "worker-offline", offline_sent, sd) == 0)
			cel->offline_pending++;
	}
	if (cel->offline_pending == 0) {
		offline_finish(sd);
		return;
	}
	cel->offline_ev = evtimer_new(sd->base, offline_timeout_cb, sd);
	if (cel->offline_ev == NULL)
		fatalx("out of memory (timer)");
	struct timeval tv = {(time_t)CEL_OFFLINE_WAIT, 0};
	evtimer_add(cel->offline_ev, &tv);
}

void
node_events_free(struct sparkd *sd)
{
	struct sd_celery *cel = sd->cel;
	if (cel->heartbeat_ev != NULL)
		event_free(cel->heartbeat_ev);
	if (cel->offline_ev != NULL)
		event_free(cel->offline_ev);
	cel->heartbeat_ev = cel->offline_ev = NULL;
}

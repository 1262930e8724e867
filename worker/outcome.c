/*
 * "Record, then ack": the one module that writes how a job ends, from the moment its outcome is known to the
 * confirmed ack (DESIGN §6).
 *
 * A job's end is written in phases; a phase is a few pipelined commands on one connection, and the next phase
 * goes out only when every reply of the previous one came back without error:
 *   META  the result meta on the result backend, when that is another server
 *   ETA   a redelivered message's retry envelope into spark:eta (before the guarded ack below)
 *   ACK   on the broker: the meta (when the backend is the broker's server) and the ack, atomically, or the
 *         move to spark:eta / back to the queue / to the dead letters
 * Two writers for the meta and the ack: the plain one (MULTI/EXEC of SETEX, PUBLISH, LREM, HDEL, ZREM) for a
 * first delivery, where nothing but this run's own STARTED can be stored yet, and the guarded one (the FINISH
 * script, which never overwrites a SUCCESS) for a redelivered message, which may have succeeded before.
 *
 * Every phase is idempotent (LREM of a message already gone is 0, scripts check the message is still in the
 * list, ZADD of the same member is one member): a reply lost with the connection marks the job out_lost and the
 * phase is written again after the reconnect (outcome_resend). The job is freed only once confirmed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

enum { PHASE_META = 0, PHASE_ETA, PHASE_ACK, PHASE_DONE };

static void outcome_send(struct job *j);

/* The guarded writer for a message that may have been recorded before: redelivered, or written again after a
 * lost reply (its first write may have landed). */
static bool
out_guarded(const struct job *j)
{
	return j->m.redelivered || j->out_resent;
}

/* celery-task-meta-<id>, in the worker's key buffer (valid until the next call). */
static const char *
meta_key(struct job *j, size_t *len)
{
	struct sbuf *k = &j->w->keybuf;
	sbuf_reset(k);
	sbuf_add(k, RESULT_KEY_PREFIX, sizeof RESULT_KEY_PREFIX - 1);
	sbuf_adds(k, j->m.task_id);
	*len = k->len;
	return k->p;
}

/* The connection that carries result metas. */
static struct rpipe *
outcome_meta_pipe(struct worker *w)
{
	return w->backend_on_broker ? &w->broker : &w->backend;
}

static void
outcome_confirmed(struct job *j)
{
	struct worker *w = j->w;
	j->out_confirmed = true;
	if (j->started_report)
		report_finish(&w->rep, j->slot_reported, j->m.task_id,
		              j->report_outcome ? j->report_outcome : "requeued", w->processed, w->rss_kib);
	else
		w->progress_dirty = true; /* counted with the next flush */
	if (j->state != JOB_ABANDONED || j->task_ended)
		job_free(j);
	engine_tick(w);
}

/* Every reply of a job's phase comes here; the last one of the phase carries final = true. */
static void
outcome_reply_common(struct rpipe *p, redisReply *r, struct job *j, bool final)
{
	j->out_pending--;
	if (r == NULL) {
		j->out_lost = true;
	} else if (r->type == REDIS_REPLY_ERROR || (final && r->type == REDIS_REPLY_NIL && j->out_exec)) {
		char why[300];
		snprintf(why, sizeof why, "writing the end of task %.60s: %.200s", j->m.task_id ? j->m.task_id : "?",
		         r->type == REDIS_REPLY_ERROR ? r->str : "transaction aborted");
		j->out_lost = true;
		rpipe_fail(p, why);
	} else if (final && j->out_exec && r->type == REDIS_REPLY_ARRAY) {
		/* EXEC ran: an error inside it (a wrong type, OOM) still means the phase did not hold */
		for (size_t i = 0; i < r->elements; i++)
			if (r->element[i]->type == REDIS_REPLY_ERROR) {
				j->out_lost = true;
				rpipe_fail(p, r->element[i]->str);
				break;
			}
	}
	if (j->out_pending > 0 || j->out_lost)
		return;
	j->out_phase++;
	outcome_send(j);
}

static void
outcome_reply(struct rpipe *p, redisReply *r, void *arg)
{
	outcome_reply_common(p, r, arg, false);
}

static void
outcome_final(struct rpipe *p, redisReply *r, void *arg)
{
	outcome_reply_common(p, r, arg, true);
}

/* Queue one command of the job's phase; the last one of the phase is sent with final. */
static void
out_cmd(struct job *j, struct rpipe *p, bool final, int argc, const char **argv, const size_t *lens)
{
	if (rpipe_send(p, final ? outcome_final : outcome_reply, j, argc, argv, lens) == 0)
		j->out_pending++;
	else
		j->out_lost = true;
}

static void
out_eval(struct job *j, struct rpipe *p, enum script_id id, int nkeys, int nargs, const char **argv, const size_t *lens)
{
	if (rpipe_eval(p, id, outcome_final, j, nkeys, nargs, argv, lens) == 0)
		j->out_pending++;
	else
		j->out_lost = true;
}

/* SETEX + PUBLISH of the meta, in whatever database the connection has selected. */
static void
out_meta_pair(struct job *j, struct rpipe *p, bool last)
{
	struct worker *w = j->w;
	size_t kl, ml = strlen(j->out_meta);
	const char *key = meta_key(j, &kl);
	const char *setex[] = {"SETEX", key, w->ttl_str, j->out_meta};
	size_t sl[] = {5, kl, strlen(w->ttl_str), ml};
	out_cmd(j, p, false, 4, setex, sl);
	const char *pub[] = {"PUBLISH", key, j->out_meta};
	size_t pl[] = {7, kl, ml};
	out_cmd(j, p, last, 3, pub, pl);
}

/* The meta (in the backend's database) as plain commands; wrapped in SELECTs when the broker connection carries
 * it to another database. */
static void
out_meta_plain(struct job *j, struct rpipe *p, int db, bool last)
{
	struct worker *w = j->w;
	bool other = db != p->url->db;
	const char *sel[] = {"SELECT", w->db_str[db == w->cfg->backend.db ? 1 : 0]};
	if (other)
		out_cmd(j, p, false, 2, sel, NULL);
	out_meta_pair(j, p, last && !other);
	const char *back[] = {"SELECT", w->db_str[0]};
	if (other)
		out_cmd(j, p, last, 2, back, NULL);
}

/* The guarded store (never over a SUCCESS), as the phase's last command. */
static void
out_meta_guarded(struct job *j, struct rpipe *p)
{
	size_t kl;
	const char *key = meta_key(j, &kl);
	const char *argv[] = {key, j->out_meta, j->w->ttl_str};
	size_t lens[] = {kl, strlen(j->out_meta), strlen(j->w->ttl_str)};
	out_eval(j, p, SCRIPT_STORE, 1, 2, argv, lens);
}

static void
out_ack_plain(struct job *j, bool last)
{
	struct worker *w = j->w;
	const char *lrem[] = {"LREM", w->proc_key, "1", j->raw};
	size_t ll[] = {4, strlen(w->proc_key), 1, j->len};
	bool recorded = j->tag[0] != '\0' && (j->record_sent || !j->unrecorded);
	out_cmd(j, &w->broker, last && !recorded, 4, lrem, ll);
	if (recorded) {
		const char *hdel[] = {"HDEL", KEY_UNACKED, j->tag};
		out_cmd(j, &w->broker, false, 3, hdel, NULL);
		const char *zrem[] = {"ZREM", KEY_UNACKED_INDEX, j->tag};
		out_cmd(j, &w->broker, last, 3, zrem, NULL);
	}
}

static void
out_zadd_eta(struct job *j, bool last)
{
	struct worker *w = j->w;
	char *member = message_eta_member(j->qkey, j->out_env, strlen(j->out_env));
	char score[SBUF_FIXED_MAX];
	sbuf_fixed(j->out_at, 6, score);
	const char *zadd[] = {"ZADD", KEY_ETA, score, member ? member : ""};
	out_cmd(j, &w->broker, last, 4, zadd, NULL);
	free(member);
}

/* The broker phase: meta (when on the broker) + ack in one MULTI/EXEC, or the guarded FINISH script. */
static void
out_finish(struct job *j, bool with_eta)
{
	struct worker *w = j->w;
	bool meta_here = j->out_meta != NULL && w->backend_on_broker;
	if (meta_here && out_guarded(j) && !with_eta) {
		char *key = xasprintf(RESULT_KEY_PREFIX "%s", j->m.task_id);
		char ttl[16], bdb[16], qdb[16];
		snprintf(ttl, sizeof ttl, "%d", RESULT_EXPIRES);
		snprintf(bdb, sizeof bdb, "%d", w->cfg->backend.db);
		snprintf(qdb, sizeof qdb, "%d", w->cfg->broker.db);
		const char *argv[] = {
		    w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, key, j->raw, j->tag, j->out_meta, ttl, bdb, qdb};
		size_t lens[] = {strlen(argv[0]), strlen(argv[1]),     strlen(argv[2]), strlen(key), j->len,
		                 strlen(j->tag),  strlen(j->out_meta), strlen(ttl),     strlen(bdb), strlen(qdb)};
		j->out_exec = false;
		out_eval(j, &w->broker, SCRIPT_FINISH, 4, 6, argv, lens);
		free(key);
		return;
	}
	j->out_exec = true;
	const char *multi[] = {"MULTI"};
	out_cmd(j, &w->broker, false, 1, multi, NULL);
	if (with_eta)
		out_zadd_eta(j, false);
	if (meta_here)
		out_meta_plain(j, &w->broker, w->cfg->backend.db, false);
	out_ack_plain(j, false);
	const char *exec[] = {"EXEC"};
	out_cmd(j, &w->broker, true, 1, exec, NULL);
}

static void
out_script_move(struct job *j)
{
	struct worker *w = j->w;
	j->out_exec = false;
	if (j->out == OUT_PARK) {
		char *member = message_eta_member(j->qkey, j->raw, j->len);
		if (member == NULL) {
			/* not UTF-8: cannot live in the JSON member; it could never run anyway */
			j->out = OUT_DEADLETTER;
			free(j->out_reason);
			j->out_reason = xstrdup("envelope is not valid UTF-8");
			out_script_move(j);
			return;
		}
		char score[SBUF_FIXED_MAX];
		sbuf_fixed(j->out_at, 6, score);
		const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_ETA, j->raw, j->tag,
		                      score,       member};
		size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]),
		                 j->len,          strlen(j->tag),  strlen(score),   strlen(member)};
		out_eval(j, &w->broker, SCRIPT_PARK, 4, 4, argv, lens);
		free(member);
	} else if (j->out == OUT_REQUEUE) {
		if (j->out_env == NULL)
			j->out_env = message_mark_redelivered(j->raw, j->len);
		const char *newm = j->out_env ? j->out_env : j->raw;
		const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, j->qkey, j->raw, newm,
		                      j->tag,      "list"};
		size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(j->qkey),
		                 j->len,          strlen(newm),    strlen(j->tag),  4};
		out_eval(j, &w->broker, SCRIPT_REQUEUE, 4, 4, argv, lens);
	} else {
		char *queue = message_queue_of_key(j->qkey);
		char *entry = message_deadletter_entry(j->out_reason, queue, now_wall(), j->raw, j->len);
		free(queue);
		char cap[32];
		snprintf(cap, sizeof cap, "%ld", w->cfg->deadletter_max);
		const char *argv[] = {w->proc_key, KEY_UNACKED, KEY_UNACKED_INDEX, KEY_DEADLETTER, j->raw, j->tag,
		                      entry,       cap};
		size_t lens[] = {strlen(argv[0]), strlen(argv[1]), strlen(argv[2]), strlen(argv[3]),
		                 j->len,          strlen(j->tag),  strlen(entry),   strlen(cap)};
		out_eval(j, &w->broker, SCRIPT_DEADLETTER, 4, 4, argv, lens);
		free(entry);
	}
}

/*
 * The plain ends of a tick share one transaction: MULTI, the SELECT of the backend's database, every job's SETEX
 * and PUBLISH, the SELECT back, every job's LREM (and kombu's HDEL/ZREM), EXEC. With k jobs that is 4 + 3k
 * commands instead of 7k, on both sides of the connection. Each job counts its own commands' replies and the
 * EXEC's, so a job is confirmed, lost or failed exactly as it would be in a transaction of its own.
 */
struct ack_group {
	int refs; /* its commands whose replies are still to come */
	int n;
	struct job *jobs[];
};

static void
outcome_queue_ack(struct job *j)
{
	struct worker *w = j->w;
	job_list_add(&w->acks, &w->nacks, &w->acks_cap, j);
	j->ack_queued = true;
	engine_tick(w);
}

static void
outcome_group_unref(struct ack_group *g)
{
	if (--g->refs == 0)
		free(g);
}

/* MULTI and the SELECTs: an error fails the connection (EXEC then reports the loss to every job). */
static void
outcome_group_step(struct rpipe *p, redisReply *r, void *arg)
{
	if (r != NULL && r->type == REDIS_REPLY_ERROR)
		rpipe_fail(p, r->str);
	outcome_group_unref(arg);
}

/* EXEC: checked once for the group (an error anywhere means none of it holds), then counted by every job. */
static void
outcome_group_exec(struct rpipe *p, redisReply *r, void *arg)
{
	struct ack_group *g = arg;
	const char *why = NULL;
	if (r != NULL && r->type == REDIS_REPLY_ERROR)
		why = r->str;
	else if (r != NULL && r->type == REDIS_REPLY_NIL)
		why = "transaction aborted";
	for (size_t i = 0; r != NULL && r->type == REDIS_REPLY_ARRAY && why == NULL && i < r->elements; i++)
		if (r->element[i]->type == REDIS_REPLY_ERROR)
			why = r->element[i]->str;
	if (why != NULL) {
		char msg[300];
		snprintf(msg, sizeof msg, "writing the ends of %d tasks: %.200s", g->n, why);
		rpipe_fail(p, msg);
		r = NULL; /* every job's end is written again once reconnected */
	}
	for (int i = 0; i < g->n; i++)
		outcome_reply_common(p, r, g->jobs[i], false);
	outcome_group_unref(g);
}

static void
outcome_group_send(struct ack_group *g, struct rpipe *p, int argc, const char **argv, rpipe_cb cb)
{
	if (rpipe_send(p, cb, g, argc, argv, NULL) == 0)
		g->refs++;
}

void
outcome_flush(struct worker *w)
{
	int n = 0;
	for (int i = 0; i < w->nacks; i++)
		if (w->acks[i] != NULL) {
			w->acks[i]->ack_queued = false;
			w->acks[n++] = w->acks[i];
		}
	w->nacks = 0;
	if (n <= 1) {
		if (n == 1)
			out_finish(w->acks[0], false); /* alone: its own transaction, as always */
		return;
	}
	struct ack_group *g = xmalloc(sizeof *g + (size_t)n * sizeof g->jobs[0]);
	g->refs = 1; /* ours until every command is queued */
	g->n = n;
	memcpy(g->jobs, w->acks, (size_t)n * sizeof g->jobs[0]);
	struct rpipe *p = &w->broker;
	bool meta = false;
	for (int i = 0; i < n; i++) {
		g->jobs[i]->out_exec = true;
		meta = meta || (g->jobs[i]->out_meta != NULL && w->backend_on_broker);
	}
	const char *multi[] = {"MULTI"};
	outcome_group_send(g, p, 1, multi, outcome_group_step);
	bool other = meta && w->cfg->backend.db != p->url->db;
	const char *sel[] = {"SELECT", w->db_str[1]};
	if (other)
		outcome_group_send(g, p, 2, sel, outcome_group_step);
	for (int i = 0; i < n && meta; i++)
		if (g->jobs[i]->out_meta != NULL)
			out_meta_pair(g->jobs[i], p, false);
	const char *back[] = {"SELECT", w->db_str[0]};
	if (other)
		outcome_group_send(g, p, 2, back, outcome_group_step);
	for (int i = 0; i < n; i++)
		out_ack_plain(g->jobs[i], false);
	const char *exec[] = {"EXEC"};
	if (rpipe_send(p, outcome_group_exec, g, 1, exec, NULL) == 0) {
		g->refs++;
		for (int i = 0; i < n; i++)
			g->jobs[i]->out_pending++;
	} else {
		for (int i = 0; i < n; i++)
			g->jobs[i]->out_lost = true;
	}
	outcome_group_unref(g);
}

/* Send the job's current phase (skipping phases that do not apply). */
static void
outcome_send(struct job *j)
{
	struct worker *w = j->w;
	bool meta = j->out_meta != NULL && (j->out == OUT_RESULT || j->out == OUT_RETRY || j->out == OUT_DEADLETTER);
	for (;;) {
		switch (j->out_phase) {
		case PHASE_META:
			if (!meta || w->backend_on_broker) {
				/* on the broker: a dead letter's FAILURE meta goes first, in its own phase */
				if (meta && j->out == OUT_DEADLETTER) {
					j->out_exec = false;
					if (out_guarded(j))
						out_meta_guarded(j, &w->broker);
					else
						out_meta_plain(j, &w->broker, w->cfg->backend.db, true);
					return;
				}
				j->out_phase++;
				continue;
			}
			j->out_exec = false;
			if (out_guarded(j))
				out_meta_guarded(j, &w->backend);
			else
				out_meta_plain(j, &w->backend, w->cfg->backend.db, true);
			return;
		case PHASE_ETA:
			if (j->out != OUT_RETRY || !(out_guarded(j) && w->backend_on_broker && j->out_meta != NULL)) {
				j->out_phase++;
				continue;
			}
			j->out_exec = false;
			out_zadd_eta(j, true);
			return;
		case PHASE_ACK:
			if (j->out == OUT_RESULT && !(j->out_meta != NULL && w->backend_on_broker && out_guarded(j)))
				outcome_queue_ack(j);
			else if (j->out == OUT_RESULT)
				out_finish(j, false);
			else if (j->out == OUT_RETRY)
				out_finish(j, !(out_guarded(j) && w->backend_on_broker && j->out_meta != NULL));
			else
				out_script_move(j); /* a dead letter's meta went in PHASE_META */
			return;
		default:
			outcome_confirmed(j);
			return;
		}
	}
}

void
outcome_write(struct job *j)
{
	struct worker *w = j->w;
	if (j->state != JOB_ABANDONED) {
		if (j->state != JOB_WRITING)
			w->writing++;
		j->state = JOB_WRITING;
	}
	j->out_phase = PHASE_META;
	j->out_lost = false;
	j->out_pending = 0;
	/* when nothing could be sent (out_lost), outcome_resend writes it once a connection is back */
	outcome_send(j);
}

void
outcome_resend(struct worker *w)
{
	struct job *j, *next;
	for (j = TAILQ_FIRST(&w->jobs); j != NULL; j = next) {
		next = TAILQ_NEXT(j, entry);
		if (j->unrecorded && (j->state == JOB_RESERVED || j->state == JOB_RUNNING))
			outcome_record(j);
		if (j->out == OUT_NONE || j->out_confirmed || !j->out_lost || j->out_pending > 0)
			continue;
		j->out_lost = false;
		j->out_resent = true;
		outcome_send(j);
	}
}

/* ---- what goes out before the end ---- */

static void
outcome_record_cb(struct rpipe *p, redisReply *r, void *arg)
{
	struct job *j = arg;
	j->record_pending--;
	if (r != NULL && r->type != REDIS_REPLY_ERROR && j->record_pending == 0)
		j->unrecorded = false;
}

void
outcome_record(struct job *j)
{
	struct worker *w = j->w;
	struct sbuf *b = &w->scratch;
	sbuf_reset(b);
	/* QoS.append's value: [<envelope as received>, "<exchange>", "<routing_key>"] */
	sbuf_adds(b, "[");
	sbuf_add(b, j->raw, j->len);
	sbuf_adds(b, ", ");
	const char *ex = j->m.exchange ? j->m.exchange : "";
	sbuf_add_json_string(b, ex, strlen(ex));
	sbuf_adds(b, ", ");
	char *qname = NULL;
	const char *rk = j->m.routing_key;
	if (rk == NULL || rk[0] == '\0')
		rk = qname = message_queue_of_key(j->qkey);
	sbuf_add_json_string(b, rk, strlen(rk));
	sbuf_adds(b, "]");
	free(qname);
	char now[SBUF_FIXED_MAX];
	sbuf_fixed(now_wall(), 6, now); /* kombu's unacked_index score */
	const char *hset[] = {"HSET", KEY_UNACKED, j->tag, b->p};
	size_t hl[] = {4, strlen(KEY_UNACKED), strlen(j->tag), b->len};
	const char *zadd[] = {"ZADD", KEY_UNACKED_INDEX, now, j->tag};
	if (rpipe_send(&w->broker, outcome_record_cb, j, 4, hset, hl) == 0) {
		j->record_pending++;
		j->record_sent = true;
	}
	if (rpipe_send(&w->broker, outcome_record_cb, j, 4, zadd, NULL) == 0)
		j->record_pending++;
}

static void
outcome_ignore(struct rpipe *p, redisReply *r, void *arg)
{
}

void
outcome_started(struct job *j)
{
	struct worker *w = j->w;
	struct sbuf *b = &w->meta;
	meta_build(b, j->m.task_id, "STARTED", w->started_json.p, w->started_json.len, NULL, &j->m);
	struct rpipe *p = outcome_meta_pipe(w);
	size_t kl, tl = strlen(w->ttl_str);
	const char *key = meta_key(j, &kl);
	bool other = w->cfg->backend.db != p->url->db;
	/* the STARTED state is informative: its reply is not waited for, and a lost one is not written again */
	const char *sel[] = {"SELECT", w->db_str[1]};
	if (other)
		rpipe_send(p, outcome_ignore, NULL, 2, sel, NULL);
	if (j->m.redelivered) {
		const char *argv[] = {key, b->p, w->ttl_str};
		size_t lens[] = {kl, b->len, tl};
		rpipe_eval(p, SCRIPT_STORE, outcome_ignore, NULL, 1, 2, argv, lens);
	} else {
		const char *setex[] = {"SETEX", key, w->ttl_str, b->p};
		size_t sl[] = {5, kl, tl, b->len};
		rpipe_send(p, outcome_ignore, NULL, 4, setex, sl);
		const char *pub[] = {"PUBLISH", key, b->p};
		size_t pl[] = {7, kl, b->len};
		rpipe_send(p, outcome_ignore, NULL, 3, pub, pl);
	}
	const char *back[] = {"SELECT", w->db_str[0]};
	if (other)
		rpipe_send(p, outcome_ignore, NULL, 2, back, NULL);
}

/*
 * The process's side of the database: the schema check (migrations applied once per process when the tables
 * are missing), the workers row (heartbeat on a timer, the final write at shutdown) and the recovery of rows
 * left `running` by processes that died.
 *
 * Recovery (worker lost): a row still `running` whose worker process is gone (same host: its pid no longer
 * exists; other hosts: no heartbeat for 3 intervals) is marked `failed` with error "worker lost", never left
 * `running`. It is not put back to `pending`, because nothing may ever redeliver its message (Python workers
 * lose it), and a pending row would then wait forever. A row another live worker has in its current tasks is
 * never touched.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"
#include "store.h"
#include "util.h"
#include "wf.h"

static void wf_beat_submit(struct wf_state *st);
static void wf_beat_failed(struct wf_state *st, const char *err);

/* ---- the workers row ---- */

/* Stats of this process for the workers row; current_tasks lists every row running here (recovery reads it
 * when this process dies). Built by hand: the ids are checked UUIDs and node is a JSON literal already. */
static char *
wf_stats(struct wf_state *st)
{
	size_t cap = 512 + strlen(st->node_json) + (size_t)st->njobs * 40, len = 0;
	char *s = xmalloc(cap);
	len += (size_t)snprintf(s, cap,
	                        "{\"node\":%s,\"version\":\"%s\",\"slots\":%d,\"processed\":%ld,\"succeeded\":%ld,"
	                        "\"failed\":%ld,\"retried\":%ld,\"started_at\":%.6f,\"current_tasks\":[",
	                        st->node_json, SPARK_VERSION, st->nslots, st->processed, st->succeeded, st->failed,
	                        st->retried, st->started);
	/* once per batch over every run of the process (a thousand at C1024): copied, not formatted */
	for (struct wf_job *j = TAILQ_FIRST(&st->jobs); j; j = TAILQ_NEXT(j, entry)) {
		if (!j->current)
			continue;
		if (s[len - 1] != '[')
			s[len++] = ',';
		s[len++] = '"';
		memcpy(s + len, j->row, 36);
		len += 36;
		s[len++] = '"';
	}
	memcpy(s + len, "]}", 3);
	return s;
}

/*
 * Insert or refresh this process's workers row, as one statement of u's step. An extra, finished entry in
 * current_tasks is harmless; a missing running one is impossible, because a run is listed before the step
 * that marks its row running is built.
 *
 * DEADLOCK note: current_task_id (a foreign key to tasks) is written only by the task path: own_row is the row
 * this transaction marks running, else a row whose claim has already committed. Writing a row another
 * transaction has inserted but not committed would wait on that transaction while it waits for this workers
 * row. With group commit this still holds: a batch names no row of its own (they are leaving `running`), only
 * a run whose claim committed. The heartbeat (task_path false) leaves current_task_id alone.
 */
void
wf_send_worker_upsert(struct wf_state *st, struct pg_unit *u, bool task_path, const char *own_row)
{
	char *stats = wf_stats(st);
	const char *cur = own_row;
	for (struct wf_job *j = TAILQ_FIRST(&st->jobs); j && !cur; j = TAILQ_NEXT(j, entry))
		if (j->current && j->committed)
			cur = j->row;
	if (task_path) {
		const char *p[] = {st->worker_id, spark_hostname(), st->pid, stats, cur};
		pg_send(
		    u,
		    "INSERT INTO workers (id, hostname, pid, status, current_task_id, stats, created_at, updated_at,"
		    " last_heartbeat) VALUES ($1, $2, $3, 'active', $5, $4::json, now(), now(), now())"
		    " ON CONFLICT (id) DO UPDATE SET status = 'active', hostname = EXCLUDED.hostname, pid = "
		    "EXCLUDED.pid,"
		    " current_task_id = EXCLUDED.current_task_id, stats = EXCLUDED.stats, updated_at = now(),"
		    " last_heartbeat = now()",
		    5, p);
	} else {
		const char *p[] = {st->worker_id, spark_hostname(), st->pid, stats};
		pg_send(u,
		        "INSERT INTO workers (id, hostname, pid, status, stats, created_at, updated_at, last_heartbeat)"
		        " VALUES ($1, $2, $3, 'active', $4::json, now(), now(), now())"
		        " ON CONFLICT (id) DO UPDATE SET status = 'active', hostname = EXCLUDED.hostname, pid = "
		        "EXCLUDED.pid,"
		        " stats = EXCLUDED.stats, updated_at = now(), last_heartbeat = now()",
		        4, p);
	}
	free(stats);
}

/* ---- the schema: checked once per process; migrations when the tables are missing ---- */

enum { SCHEMA_CHECK = 1, SCHEMA_VERSIONS, SCHEMA_APPLY };

static void
wf_schema_send(struct pg_unit *u)
{
	struct wf_state *st = u->arg;
	st->schema_phase = SCHEMA_CHECK;
	pg_send(u, store_schema_check_sql(), 0, NULL);
	pg_sync(u);
}

/* The check is over (err NULL: the schema is there): release what waited for it. */
static void
wf_schema_over(struct wf_state *st, const char *err, bool lost)
{
	pg_end(&st->schema_unit);
	st->schema_busy = false;
	st->schema_ready = err == NULL;
	struct wf_jobq waiting = TAILQ_HEAD_INITIALIZER(waiting);
	struct wf_job *j;
	while ((j = TAILQ_FIRST(&st->schema_wait))) {
		TAILQ_REMOVE(&st->schema_wait, j, qentry);
		TAILQ_INSERT_TAIL(&waiting, j, qentry);
	}
	bool hb = st->schema_hb_wait;
	st->schema_hb_wait = false;
	while ((j = TAILQ_FIRST(&waiting))) {
		TAILQ_REMOVE(&waiting, j, qentry);
		if (err) {
			spark_strlcpy(j->err, err, sizeof(j->err));
			wf_db_error(j, "preparing the database", lost);
		} else {
			wf_claim_start(j);
		}
	}
	if (hb) {
		if (err)
			wf_beat_failed(st, err);
		else
			wf_beat_submit(st);
	}
}

static void
wf_schema_step(struct pg_unit *u)
{
	struct wf_state *st = u->arg;
	if (!u->ok) {
		char err[sizeof(u->err)];
		spark_strlcpy(err, u->err, sizeof(err));
		wf_schema_over(st, err, u->lost);
		return;
	}
	int n = store_migration_count();
	if (st->schema_phase == SCHEMA_CHECK) {
		const char *v = pg_value(u, 0, 0, 0);
		if (v && strcmp(v, "t") == 0) {
			wf_schema_over(st, NULL, false);
			return;
		}
		log_info("database: automagik-spark tables missing, applying migrations");
		st->schema_phase = SCHEMA_VERSIONS;
		char lock[32];
		snprintf(lock, sizeof(lock), "%lld", (long long)STORE_MIGRATE_LOCK);
		const char *lp[] = {lock};
		pg_send(u, "BEGIN", 0, NULL);
		pg_send(u, STORE_SQL_MIGRATE_LOCK, 1, lp);
		pg_send(u, STORE_SQL_MIGRATIONS_TABLE, 0, NULL);
		for (int i = 0; i < n; i++) {
			char v[16];
			snprintf(v, sizeof(v), "%d", store_migration_get(i)->version);
			const char *vp[] = {v};
			pg_send(u, STORE_SQL_MIGRATION_DONE, 1, vp);
		}
		pg_sync(u);
		return;
	}
	if (st->schema_phase == SCHEMA_VERSIONS) {
		st->schema_phase = SCHEMA_APPLY;
		/* BEGIN, lock, table, then one "done?" read per migration: apply those not done, in order */
		for (int i = 0; i < n; i++) {
			if (pg_ntuples(u, 3 + i) > 0)
				continue;
			const struct store_migration *m = store_migration_get(i);
			for (const char *const *q = m->sql; *q; q++)
				pg_send(u, *q, 0, NULL);
			char v[16];
			snprintf(v, sizeof(v), "%d", m->version);
			const char *vp[] = {v};
			pg_send(u, STORE_SQL_MIGRATION_RECORD, 1, vp);
		}
		pg_send(u, "COMMIT", 0, NULL);
		pg_sync(u);
		return;
	}
	log_info("database: schema at version %d", store_schema_version());
	wf_schema_over(st, NULL, false);
}

static void
wf_schema_start(struct wf_state *st)
{
	if (st->schema_busy)
		return;
	st->schema_busy = true;
	pgpool_run(&st->pool, &st->schema_unit, wf_schema_send, wf_schema_step, st, 1);
}

void
wf_schema_need(struct wf_job *j)
{
	struct wf_state *st = j->st;
	if (st->schema_ready) {
		wf_claim_start(j);
		return;
	}
	j->phase = WF_WAIT_SCHEMA;
	TAILQ_INSERT_TAIL(&st->schema_wait, j, qentry);
	wf_schema_start(st);
}

/* ---- heartbeat and recovery ---- */

enum { BEAT_UPSERT = 1, BEAT_RECOVER, BEAT_PRUNE };

static void
wf_beat_failed(struct wf_state *st, const char *err)
{
	if (!st->hb_warned)
		log_warnx("heartbeat: %s (retrying every %.0f s)", err, st->hb_interval);
	st->hb_warned = true;
	st->hb_busy = false;
}

static void
wf_beat_send(struct pg_unit *u)
{
	struct wf_state *st = u->arg;
	wf_send_worker_upsert(st, u, false, NULL);
	const char *hp[] = {spark_hostname(), st->worker_id};
	pg_send(u, "SELECT id, pid FROM workers WHERE hostname = $1 AND status <> 'stopped' AND id <> $2", 2, hp);
	pg_sync(u);
}

/* The recovery statement: dead workers retired, the rows they held failed, a log line for each. */
static void
wf_recover_send(struct wf_state *st, struct pg_unit *u)
{
	/* same host: a process is dead when its pid is gone (immediate and exact, unlike a heartbeat age) */
	char *dead = xstrdup("{");
	size_t ndead = 0;
	for (int i = 0; i < pg_ntuples(u, 1); i++) {
		const char *pv = pg_value(u, 1, i, 1), *id = pg_value(u, 1, i, 0);
		long pid = pv ? atol(pv) : 0;
		bool gone = pid <= 0 || pid == (long)getpid() || (kill((pid_t)pid, 0) < 0 && errno == ESRCH);
		if (!gone || !id)
			continue;
		char *n = xasprintf("%s%s%s", dead, ndead ? "," : "", id);
		free(dead);
		dead = n;
		ndead++;
	}
	char *arr = xasprintf("%s}", dead);
	free(dead);
	char stale[32], orphan[32];
	snprintf(stale, sizeof(stale), "%.3f", 3 * st->hb_interval);
	snprintf(orphan, sizeof(orphan), "%.3f", st->orphan_age);
	const char *p[] = {st->worker_id, arr, stale, spark_hostname(), orphan};
	pg_send(u,
	        "WITH dead AS ("
	        "  UPDATE workers SET status = 'stopped', current_task_id = NULL, updated_at = now()"
	        "  WHERE id <> $1 AND status <> 'stopped' AND (id = ANY($2::uuid[]) OR (hostname <> $4 AND"
	        "   COALESCE(last_heartbeat, updated_at, created_at) < now() - make_interval(secs => $3::float8)))"
	        "  RETURNING id, stats),"
	        " held AS ("
	        "  SELECT DISTINCT e.tid::uuid AS tid FROM dead d,"
	        "   json_array_elements_text(CASE WHEN json_typeof(d.stats->'current_tasks') = 'array'"
	        "    THEN d.stats->'current_tasks' ELSE '[]'::json END) AS e(tid)"
	        "  WHERE e.tid ~ '^[0-9a-fA-F-]{36}$'),"
	        " live AS ("
	        "  SELECT e.tid FROM workers w,"
	        "   json_array_elements_text(CASE WHEN json_typeof(w.stats->'current_tasks') = 'array'"
	        "    THEN w.stats->'current_tasks' ELSE '[]'::json END) AS e(tid)"
	        "  WHERE w.status = 'active' AND w.id NOT IN (SELECT id FROM dead)"
	        "  UNION SELECT current_task_id::text FROM workers"
	        "  WHERE status = 'active' AND current_task_id IS NOT NULL AND id NOT IN (SELECT id FROM dead)),"
	        " lost AS ("
	        "  UPDATE tasks t SET status = 'failed', error = '" WF_ERR_WORKER_LOST "', finished_at = now(),"
	        "   updated_at = now()"
	        "  WHERE t.status = 'running' AND t.id::text NOT IN (SELECT tid FROM live WHERE tid IS NOT NULL)"
	        "   AND (t.id IN (SELECT tid FROM held)"
	        "    OR COALESCE(t.updated_at, t.started_at, t.created_at) < now() - make_interval(secs => $5::float8))"
	        "  RETURNING t.id)"
	        " INSERT INTO task_logs (id, task_id, level, message, created_at)"
	        " SELECT md5(random()::text || clock_timestamp()::text || id::text)::uuid, id, 'error',"
	        "  'worker lost: the process running this task died; the row is failed unless its message is"
	        " delivered again', now() FROM lost"
	        " RETURNING task_id",
	        5, p);
	free(arr);
	pg_sync(u);
}

static void
wf_beat_step(struct pg_unit *u)
{
	struct wf_state *st = u->arg;
	if (u->steps == BEAT_UPSERT) {
		if (!u->ok) {
			char err[sizeof(u->err)];
			spark_strlcpy(err, u->err, sizeof(err));
			pg_end(u);
			wf_beat_failed(st, err);
			return;
		}
		if (st->hb_warned)
			log_info("heartbeat: database reachable again");
		st->hb_warned = false;
		wf_recover_send(st, u);
		return;
	}
	if (u->steps == BEAT_RECOVER) {
		if (!u->ok) {
			log_warnx("recovery: %s", u->err);
			pg_end(u);
			st->hb_busy = false;
			return;
		}
		for (int i = 0; i < pg_ntuples(u, 0); i++)
			log_warnx(
			    "recovery: task row %s was running in a process that died: marked failed (worker lost)",
			    pg_value(u, 0, i, 0));
		/* keep the table small when processes are recycled often */
		pg_send(u, "DELETE FROM workers WHERE status = 'stopped' AND updated_at < now() - interval '1 day'", 0,
		        NULL);
		pg_sync(u);
		return;
	}
	pg_end(u);
	st->hb_busy = false;
}

static void
wf_beat_submit(struct wf_state *st)
{
	/* an upsert and a read: the same again on a fresh connection */
	pgpool_run(&st->pool, &st->hb_unit, wf_beat_send, wf_beat_step, st, 1);
}

static void
wf_on_beat(evutil_socket_t fd, short what, void *arg)
{
	struct wf_state *st = arg;
	if (st->hb_busy || st->stopping)
		return; /* a beat still waiting for the database: one at a time */
	st->hb_busy = true;
	if (!st->schema_ready) {
		st->schema_hb_wait = true;
		wf_schema_start(st);
		return;
	}
	wf_beat_submit(st);
}

void
wf_beat_start(struct wf_state *st)
{
	double t = st->hb_interval;
	struct timeval tv = {.tv_sec = (time_t)t, .tv_usec = (suseconds_t)((t - (double)(time_t)t) * 1e6)};
	st->hb_ev = event_new(st->base, -1, EV_PERSIST, wf_on_beat, st);
	if (!st->hb_ev || event_add(st->hb_ev, &tv) < 0)
		fatalx("workflow: cannot start the heartbeat timer");
	/* the first beat (migrations when tables are missing, the workers row, recovery) at once: the database
	 * may be down, and that must not hold up the worker's start */
	event_active(st->hb_ev, EV_TIMEOUT, 0);
}

/* ---- shutdown ---- */

static void
wf_on_stop_done(evutil_socket_t fd, short what, void *arg)
{
	struct wf_state *st = arg;
	if (st->stop_done)
		st->stop_done(st->stop_arg);
}

/* Call the engine's done from a loop turn of its own: never from inside a pool callback (it may destroy). */
static void
wf_stop_finish(struct wf_state *st)
{
	if (st->stop_called)
		return;
	st->stop_called = true;
	if (st->stop_deadline_ev)
		evtimer_del(st->stop_deadline_ev);
	event_active(st->stop_done_ev, EV_TIMEOUT, 0);
}

static void
wf_on_stop_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct wf_state *st = arg;
	log_warnx("workflow: database writes still pending at the shutdown deadline (%d runs): giving up on them",
	          st->njobs);
	wf_stop_finish(st);
}

static void
wf_stop_send(struct pg_unit *u)
{
	struct wf_state *st = u->arg;
	wf_send_worker_upsert(st, u, false, NULL); /* final stats */
	pg_sync(u);
}

static void
wf_stop_step(struct pg_unit *u)
{
	struct wf_state *st = u->arg;
	if (u->steps == 1 && u->conn) {
		/* marked stopped even when the stats could not be written, as before */
		const char *p[] = {st->worker_id};
		pg_send(
		    u,
		    "UPDATE workers SET status = 'stopped', current_task_id = NULL, updated_at = now() WHERE id = $1",
		    1, p);
		pg_sync(u);
		return;
	}
	if (!u->ok)
		log_warnx("workflow: could not mark this worker stopped: %s", u->err);
	pg_end(u);
	wf_stop_finish(st);
}

void
wf_shutdown_check(struct wf_state *st)
{
	if (!st->stopping || st->stop_final_sent || st->stop_called || st->njobs > 0)
		return;
	st->stop_final_sent = true;
	pgpool_run(&st->pool, &st->stop_unit, wf_stop_send, wf_stop_step, st, 1);
}

void
wf_shutdown(struct wf_state *st, double timeout_s, void (*done)(void *arg), void *arg)
{
	if (st->stopping)
		return;
	st->stopping = true;
	st->stop_done = done;
	st->stop_arg = arg;
	if (st->hb_ev)
		event_del(st->hb_ev);
	st->stop_done_ev = event_new(st->base, -1, 0, wf_on_stop_done, st);
	st->stop_deadline_ev = evtimer_new(st->base, wf_on_stop_deadline, st);
	if (!st->stop_done_ev || !st->stop_deadline_ev)
		fatalx("workflow: out of memory");
	if (!st->enabled) {
		wf_stop_finish(st);
		return;
	}
	double t = timeout_s > 0 ? timeout_s : 0;
	struct timeval tv = {.tv_sec = (time_t)t, .tv_usec = (suseconds_t)((t - (double)(time_t)t) * 1e6)};
	evtimer_add(st->stop_deadline_ev, &tv);
	wf_shutdown_check(st);
}

void
wf_beat_free(struct wf_state *st)
{
	if (st->hb_ev)
		event_free(st->hb_ev);
	if (st->stop_done_ev)
		event_free(st->stop_done_ev);
	if (st->stop_deadline_ev)
		event_free(st->stop_deadline_ev);
	st->hb_ev = st->stop_done_ev = st->stop_deadline_ev = NULL;
	pg_unit_release(&st->schema_unit);
	pg_unit_release(&st->hb_unit);
	pg_unit_release(&st->stop_unit);
}

/*
 * Workflow tasks: automagik-spark's execute_workflow(schedule_id) and spark.run_task(task_row_id), recorded in
 * PostgreSQL (reference/automagik-spark.md), plus the workers-table heartbeat and the recovery of rows left
 * `running` by a process that died.
 *
 * Row identity: execute_workflow's row id is a name-based UUID of the Celery task id, so a retry (same task id)
 * or a redelivery after a crash finds and updates the SAME row instead of inserting a new one; each attempt
 * increments `tries`. Between retries a row is `pending` with next_retry_at and the last error.
 *
 * Recovery (worker lost): a row still `running` whose worker process is gone (same host: its pid no longer
 * exists; other hosts: no heartbeat for 3 intervals) is marked `failed` with error "worker lost", never left
 * `running`. It is not put back to `pending`, because nothing may ever redeliver its message (Python workers
 * lose it), and a pending row would then wait forever. When our engine does redeliver the message, the new
 * attempt finds the row by its id, sees "worker lost", and runs it again (tries counts both attempts, the final
 * status is that of the last attempt): so a row is never `running` without a live process and never counted
 * twice as a separate row. A row another live worker has in its current tasks is never touched.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "fernet.h"
#include "log.h"
#include "source.h"
#include "store.h"
#include "task.h"
#include "util.h"

/* automagik-spark's key when AUTOMAGIK_SPARK_ENCRYPTION_KEY is unset (a public test key: tokens it made must
 * still decrypt, but it protects nothing, hence the warning) */
#define WF_TEST_KEY          "5aQaTalKCAOAgOPFV_xZrQVzWgE80mseLFW-x_sa06o="
#define WF_HEARTBEAT_DEFAULT 5.0
#define WF_ERR_WORKER_LOST   "worker lost"
#define WF_DEFAULT_INPUT     "Hello World"

/* The task row as execute_workflow returns it (automagik-spark's Task.to_dict, same key order). */
#define WF_ROW_JSON                                                                                                    \
	"json_build_object('id', id, 'workflow_id', workflow_id, 'schedule_id', schedule_id, 'status', status,"        \
	" 'input_data', input_data, 'output_data', output_data, 'error', error, 'tries', tries,"                       \
	" 'max_retries', max_retries, 'next_retry_at', next_retry_at, 'created_at', created_at,"                       \
	" 'updated_at', updated_at, 'started_at', started_at, 'finished_at', finished_at)"

struct wf_slot {
	pthread_mutex_t mu; /* the slot's connection is used by one task at a time */
	struct store *db;
	char current[37]; /* task row running in this slot, "" when none (guarded by wf.cur_mu) */
	bool committed;   /* current is committed as running (may be named in current_task_id) */
};

static struct {
	pthread_mutex_t init_mu;
	bool inited;
	bool enabled; /* DATABASE_URL set */
	char *db_url;
	char *node;
	double http_timeout;
	double orphan_age; /* a running row untouched this long, in no live worker, is lost */
	int max_retries;
	char worker_id[37];
	double started;

	int nslots;
	struct wf_slot *slots;
	struct wf_slot spare; /* for a slot number outside 0..nslots-1 */

	unsigned char key[FERNET_KEY_LEN];
	bool key_ok;
	char key_err[200];

	pthread_mutex_t schema_mu;
	atomic_bool schema_ready;

	pthread_mutex_t cur_mu; /* slots[].current and the counters */
	long processed, succeeded, failed, retried;

	pthread_t hb;
	bool hb_running;
	pthread_mutex_t hb_mu;
	pthread_cond_t hb_cv;
	bool stopping;
	double hb_interval;
	struct store *hb_db;
} wf = {
    .init_mu = PTHREAD_MUTEX_INITIALIZER,
    .schema_mu = PTHREAD_MUTEX_INITIALIZER,
    .cur_mu = PTHREAD_MUTEX_INITIALIZER,
    .hb_mu = PTHREAD_MUTEX_INITIALIZER,
    .hb_cv = PTHREAD_COND_INITIALIZER,
    .spare = {.mu = PTHREAD_MUTEX_INITIALIZER},
};

/* Set the outcome and exception of run (our own helper: task_fail belongs to the engine). */
static void __attribute__((format(printf, 5, 6)))
wf_fail(struct task_run *run, enum task_outcome outcome, const char *module, const char *type, const char *fmt, ...)
{
	va_list ap;
	run->outcome = outcome;
	spark_strlcpy(run->exc_module, module, sizeof(run->exc_module));
	spark_strlcpy(run->exc_type, type, sizeof(run->exc_type));
	va_start(ap, fmt);
	vsnprintf(run->exc_message, sizeof(run->exc_message), fmt, ap);
	va_end(ap);
	/* one line */
	for (char *p = run->exc_message; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
}

static bool
uuid_valid(const char *s)
{
	if (!s || strlen(s) != 36)
		return false;
	for (int i = 0; i < 36; i++) {
		char c = s[i];
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (c != '-')
				return false;
		} else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
			return false;
		}
	}
	return true;
}

/* ---- schema and the workers row ---- */

/* Apply the migrations once per process when the tables are missing (an existing database is used as is). */
static int
wf_schema_ensure(struct store *db, char *err, size_t errlen)
{
	if (atomic_load(&wf.schema_ready))
		return 0;
	pthread_mutex_lock(&wf.schema_mu);
	int rc = 0;
	if (!atomic_load(&wf.schema_ready)) {
		int present = store_schema_present(db, err, errlen);
		if (present < 0) {
			rc = -1;
		} else if (present == 0) {
			log_info("database: automagik-spark tables missing, applying migrations");
			rc = store_migrate(db, NULL, err, errlen);
			if (rc == 0)
				log_info("database: schema at version %d", store_schema_version());
		}
		if (rc == 0)
			atomic_store(&wf.schema_ready, true);
	}
	pthread_mutex_unlock(&wf.schema_mu);
	return rc;
}

/* Stats of this process for the workers row (caller holds cur_mu). */
static char *
wf_stats_locked(void)
{
	json_t *cur = json_array();
	if (!cur)
		fatalx("workflow: out of memory");
	for (int i = 0; i < wf.nslots; i++)
		if (wf.slots[i].current[0])
			json_array_append_new(cur, json_string(wf.slots[i].current));
	if (wf.spare.current[0])
		json_array_append_new(cur, json_string(wf.spare.current));
	json_t *st = json_pack("{s:s, s:s, s:i, s:I, s:I, s:I, s:I, s:f, s:o}", "node", wf.node ? wf.node : "",
	                       "version", SPARK_VERSION, "slots", wf.nslots, "processed", (json_int_t)wf.processed,
	                       "succeeded", (json_int_t)wf.succeeded, "failed", (json_int_t)wf.failed, "retried",
	                       (json_int_t)wf.retried, "started_at", wf.started, "current_tasks", cur);
	if (!st)
		fatalx("workflow: out of memory");
	char *s = json_dumps(st, JSON_COMPACT);
	json_decref(st);
	if (!s)
		fatalx("workflow: out of memory");
	return s;
}

/*
 * Insert or refresh this process's workers row. stats.current_tasks lists every row running here (recovery reads
 * it when this process dies); an extra, finished entry is harmless, a missing running one is impossible because
 * a slot notes its row before the transaction that marks it running.
 *
 * current_task_id (a foreign key to tasks) is written only by the task path: own_row is the row this transaction
 * just marked running, else a row already committed by another slot. Writing a row that another slot's transaction
 * has inserted but not committed would wait on that transaction while it waits for this workers row: a deadlock.
 * The heartbeat (task_path false) therefore leaves current_task_id alone.
 */
static int
wf_worker_upsert(struct store *db, bool task_path, const char *own_row, char *err, size_t errlen)
{
	char pid[16];
	snprintf(pid, sizeof(pid), "%ld", (long)getpid());
	char cur[37] = "";
	pthread_mutex_lock(&wf.cur_mu);
	char *stats = wf_stats_locked();
	if (own_row) {
		spark_strlcpy(cur, own_row, sizeof(cur));
	} else {
		for (int i = 0; i < wf.nslots && !cur[0]; i++)
			if (wf.slots[i].current[0] && wf.slots[i].committed)
				spark_strlcpy(cur, wf.slots[i].current, sizeof(cur));
		if (!cur[0] && wf.spare.current[0] && wf.spare.committed)
			spark_strlcpy(cur, wf.spare.current, sizeof(cur));
	}
	pthread_mutex_unlock(&wf.cur_mu);
	int rc;
	if (task_path) {
		const char *p[] = {wf.worker_id, spark_hostname(), pid, stats, cur[0] ? cur : NULL};
		rc = store_exec(
		    db,
		    "INSERT INTO workers (id, hostname, pid, status, current_task_id, stats, created_at, updated_at,"
		    " last_heartbeat) VALUES ($1, $2, $3, 'active', $5, $4::json, now(), now(), now())"
		    " ON CONFLICT (id) DO UPDATE SET status = 'active', hostname = EXCLUDED.hostname, pid = "
		    "EXCLUDED.pid,"
		    " current_task_id = EXCLUDED.current_task_id, stats = EXCLUDED.stats, updated_at = now(),"
		    " last_heartbeat = now()",
		    5, p, err, errlen);
	} else {
		const char *p[] = {wf.worker_id, spark_hostname(), pid, stats};
		rc = store_exec(
		    db,
		    "INSERT INTO workers (id, hostname, pid, status, stats, created_at, updated_at, last_heartbeat)"
		    " VALUES ($1, $2, $3, 'active', $4::json, now(), now(), now())"
		    " ON CONFLICT (id) DO UPDATE SET status = 'active', hostname = EXCLUDED.hostname, pid = "
		    "EXCLUDED.pid,"
		    " stats = EXCLUDED.stats, updated_at = now(), last_heartbeat = now()",
		    4, p, err, errlen);
	}
	free(stats);
	return rc;
}

/*
 * Recover rows left `running` by dead processes (see the comment at the top of this file), and retire the
 * workers rows of those processes. Any worker may run it: every statement is idempotent.
 */
static void
wf_recover(struct store *db)
{
	char err[512];
	/* same host: a process is dead when its pid is gone (immediate and exact, unlike a heartbeat age) */
	const char *hp[] = {spark_hostname(), wf.worker_id};
	PGresult *r =
	    store_query(db, "SELECT id, pid FROM workers WHERE hostname = $1 AND status <> 'stopped' AND id <> $2", 2,
	                hp, err, sizeof(err));
	if (!r) {
		log_warnx("recovery: %s", err);
		return;
	}
	char *dead = xstrdup("{");
	size_t ndead = 0;
	for (int i = 0; i < PQntuples(r); i++) {
		long pid = atol(PQgetvalue(r, i, 1));
		bool gone = pid <= 0 || pid == (long)getpid() || (kill((pid_t)pid, 0) < 0 && errno == ESRCH);
		if (!gone)
			continue;
		char *n = xasprintf("%s%s%s", dead, ndead ? "," : "", PQgetvalue(r, i, 0));
		free(dead);
		dead = n;
		ndead++;
	}
	PQclear(r);
	char *arr = xasprintf("%s}", dead);
	free(dead);

	char stale[32], orphan[32];
	snprintf(stale, sizeof(stale), "%.3f", 3 * wf.hb_interval);
	snprintf(orphan, sizeof(orphan), "%.3f", wf.orphan_age);
	const char *p[] = {wf.worker_id, arr, stale, spark_hostname(), orphan};
	r = store_query(
	    db,
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
	    5, p, err, sizeof(err));
	free(arr);
	if (!r) {
		log_warnx("recovery: %s", err);
		return;
	}
	for (int i = 0; i < PQntuples(r); i++)
		log_warnx("recovery: task row %s was running in a process that died: marked failed (worker lost)",
		          PQgetvalue(r, i, 0));
	PQclear(r);
	/* keep the table small when processes are recycled often */
	store_exec(db, "DELETE FROM workers WHERE status = 'stopped' AND updated_at < now() - interval '1 day'", 0,
	           NULL, err, sizeof(err));
}

static void
wf_beat(void)
{
	char err[512];
	static bool warned; /* one warning per outage, not one per beat */
	if (wf_schema_ensure(wf.hb_db, err, sizeof(err)) < 0 ||
	    wf_worker_upsert(wf.hb_db, false, NULL, err, sizeof(err)) < 0) {
		if (!warned)
			log_warnx("heartbeat: %s (retrying every %.0f s)", err, wf.hb_interval);
		warned = true;
		return;
	}
	if (warned)
		log_info("heartbeat: database reachable again");
	warned = false;
	wf_recover(wf.hb_db);
}

static void *
wf_heartbeat_main(void *arg)
{
	(void)arg;
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the engine's business */
	pthread_mutex_lock(&wf.hb_mu);
	while (!wf.stopping) {
		pthread_mutex_unlock(&wf.hb_mu);
		wf_beat();
		pthread_mutex_lock(&wf.hb_mu);
		if (wf.stopping)
			break;
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		double t = ts.tv_sec + ts.tv_nsec / 1e9 + wf.hb_interval;
		ts.tv_sec = (time_t)t;
		ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
		while (!wf.stopping && pthread_cond_timedwait(&wf.hb_cv, &wf.hb_mu, &ts) != ETIMEDOUT)
			;
	}
	pthread_mutex_unlock(&wf.hb_mu);
	return NULL;
}

/* ---- init / shutdown / migrate ---- */

int
workflow_init(const struct spark_config *cfg, const char *node, int slots)
{
	pthread_mutex_lock(&wf.init_mu);
	if (wf.inited) {
		pthread_mutex_unlock(&wf.init_mu);
		return 0;
	}
	wf.inited = true;
	if (!cfg || !cfg->database_url || !*cfg->database_url) {
		log_debug("workflow: DATABASE_URL is not set; workflow tasks will fail");
		pthread_mutex_unlock(&wf.init_mu);
		return 0;
	}
	wf.enabled = true;
	wf.db_url = xstrdup(cfg->database_url);
	wf.node = xstrdup(node ? node : spark_hostname());
	wf.http_timeout = cfg->http_timeout > 0 ? cfg->http_timeout : 600;
	wf.max_retries = cfg->max_retries;
	double longest = cfg->time_limit > wf.http_timeout ? cfg->time_limit : wf.http_timeout;
	wf.orphan_age = longest + 60;
	wf.started = now_wall();
	source_global_init();

	wf.hb_interval = cfg->heartbeat_interval > 0 ? cfg->heartbeat_interval : WF_HEARTBEAT_DEFAULT;

	if (cfg->encryption_key && *cfg->encryption_key) {
		wf.key_ok = fernet_key_parse(cfg->encryption_key, wf.key, wf.key_err, sizeof(wf.key_err)) == 0;
		if (!wf.key_ok)
			log_warnx("workflow: %s; workflow sources with API keys will fail", wf.key_err);
	} else {
		log_warnx(
		    "workflow: AUTOMAGIK_SPARK_ENCRYPTION_KEY is not set: using automagik-spark's public test key "
		    "(unsafe for production)");
		wf.key_ok = fernet_key_parse(WF_TEST_KEY, wf.key, wf.key_err, sizeof(wf.key_err)) == 0;
	}

	wf.nslots = slots > 0 ? slots : 1;
	wf.slots = xcalloc((size_t)wf.nslots, sizeof(*wf.slots));
	for (int i = 0; i < wf.nslots; i++) {
		pthread_mutex_init(&wf.slots[i].mu, NULL);
		wf.slots[i].db = store_open(wf.db_url);
	}
	wf.spare.db = store_open(wf.db_url);
	wf.hb_db = store_open(wf.db_url);
	store_uuid4(wf.worker_id);

	/* the first beat (migrations when tables are missing, the workers row, recovery) runs in the heartbeat
	 * thread: a database that is down must not hold up the worker's start */
	wf.stopping = false;
	if (pthread_create(&wf.hb, NULL, wf_heartbeat_main, NULL) == 0)
		wf.hb_running = true;
	else
		log_warnx("workflow: cannot start the heartbeat thread; the workers row will not be kept current");
	pthread_mutex_unlock(&wf.init_mu);
	return 0;
}

void
workflow_shutdown(void)
{
	pthread_mutex_lock(&wf.init_mu);
	if (!wf.enabled) {
		pthread_mutex_unlock(&wf.init_mu);
		return;
	}
	if (wf.hb_running) {
		pthread_mutex_lock(&wf.hb_mu);
		wf.stopping = true;
		pthread_cond_broadcast(&wf.hb_cv);
		pthread_mutex_unlock(&wf.hb_mu);
		pthread_join(wf.hb, NULL);
		wf.hb_running = false;
	}
	char err[512];
	const char *p[] = {wf.worker_id};
	wf_worker_upsert(wf.hb_db, false, NULL, err, sizeof(err)); /* final stats */
	if (store_exec(
	        wf.hb_db,
	        "UPDATE workers SET status = 'stopped', current_task_id = NULL, updated_at = now() WHERE id = $1", 1, p,
	        err, sizeof(err)) < 0)
		log_warnx("workflow: could not mark this worker stopped: %s", err);
	store_close(wf.hb_db);
	wf.hb_db = NULL;
	for (int i = 0; i < wf.nslots; i++) {
		pthread_mutex_lock(&wf.slots[i].mu);
		store_close(wf.slots[i].db);
		wf.slots[i].db = NULL;
		pthread_mutex_unlock(&wf.slots[i].mu);
	}
	pthread_mutex_lock(&wf.spare.mu);
	store_close(wf.spare.db);
	wf.spare.db = NULL;
	pthread_mutex_unlock(&wf.spare.mu);
	OPENSSL_cleanse(wf.key, sizeof(wf.key));
	wf.enabled = false;
	pthread_mutex_unlock(&wf.init_mu);
}

int
workflow_migrate(const struct spark_config *cfg)
{
	if (!cfg || !cfg->database_url || !*cfg->database_url) {
		fprintf(stderr,
		        "spark-worker: DATABASE_URL is not set: set DATABASE_URL (or AUTOMAGIK_SPARK_DATABASE_URL) "
		        "to the PostgreSQL URL to migrate\n");
		return 1;
	}
	char err[512];
	struct store *db = store_open(cfg->database_url);
	int rc = store_migrate(db, stdout, err, sizeof(err));
	store_close(db);
	if (rc < 0) {
		fprintf(stderr, "spark-worker: %s\n", err);
		return 1;
	}
	fflush(stdout);
	return 0;
}

/* ---- one workflow run ---- */

struct wf_job {
	struct task_run *run;
	struct wf_slot *slot;
	struct store *db;
	char row[37];
	char workflow_id[37];
	char *input;
	int tries;
	bool claimed; /* the row is ours and `running` */
	char err[1024];
};

static void
wf_current_set(struct wf_slot *slot, const char *row, bool committed)
{
	pthread_mutex_lock(&wf.cur_mu);
	spark_strlcpy(slot->current, row ? row : "", sizeof(slot->current));
	slot->committed = row && committed;
	pthread_mutex_unlock(&wf.cur_mu);
}

static void
wf_count(long *counter)
{
	pthread_mutex_lock(&wf.cur_mu);
	(*counter)++;
	pthread_mutex_unlock(&wf.cur_mu);
}

static int
wf_log_line(struct store *db, const char *row, const char *level, const char *msg, char *err, size_t errlen)
{
	char id[37];
	store_uuid4(id);
	const char *p[] = {id, row, level, msg};
	return store_exec(
	    db, "INSERT INTO task_logs (id, task_id, level, message, created_at) VALUES ($1, $2, $3, $4, now())", 4, p,
	    err, errlen);
}

/* The database let us down: put the message back (TASK_DEFER) when it may pass later, else fail. */
static void
wf_db_error(struct wf_job *j, const char *what)
{
	store_rollback(j->db);
	if (store_lost(j->db)) {
		log_warnx("task %s: %s: %s; the message will be delivered again", j->run->task_id, what, j->err);
		wf_fail(j->run, TASK_DEFER, "builtins", "ConnectionError", "database unavailable: %s", j->err);
	} else {
		log_errorx("task %s: %s: %s", j->run->task_id, what, j->err);
		wf_fail(j->run, TASK_FAILURE, "builtins", "RuntimeError", "%s: %s", what, j->err);
		if (j->claimed) {
			/* the database answers but refused the full record: still never leave the row running */
			char e2[256];
			const char *p[] = {j->row, j->run->exc_message};
			if (store_exec(j->db,
			               "UPDATE tasks SET status = 'failed', error = $2, finished_at = now(), "
			               "updated_at = now()"
			               " WHERE id = $1 AND status = 'running'",
			               2, p, e2, sizeof(e2)) < 0)
				log_errorx("task %s: row %s could not be marked failed: %s", j->run->task_id, j->row,
				           e2);
		}
	}
}

/* Input text from a JSON value the way automagik-spark reads it: a string as is, {"value": x} -> x, else JSON. */
static char *
wf_input_text(const json_t *v)
{
	if (json_is_object(v) && json_object_get(v, "value"))
		v = json_object_get(v, "value");
	if (!v || json_is_null(v))
		return xstrdup("");
	if (json_is_string(v))
		return xstrdup(json_string_value(v));
	char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
	if (!s)
		fatalx("workflow: out of memory");
	return s;
}

/* Mark the row running for a new attempt on an existing row (inside the caller's transaction). */
static int
wf_restart_row(struct wf_job *j, const char *why)
{
	const char *p[] = {j->row};
	PGresult *r = store_query(
	    j->db,
	    "UPDATE tasks SET status = 'running', tries = COALESCE(tries, 0) + 1, started_at = now(), finished_at = "
	    "NULL,"
	    " next_retry_at = NULL, updated_at = now() WHERE id = $1 RETURNING tries, workflow_id, input_data::text",
	    1, p, j->err, sizeof(j->err));
	if (!r)
		return -1;
	j->tries = atoi(PQgetvalue(r, 0, 0));
	spark_strlcpy(j->workflow_id, PQgetvalue(r, 0, 1), sizeof(j->workflow_id));
	json_t *in = PQgetisnull(r, 0, 2) ? NULL : json_loads(PQgetvalue(r, 0, 2), JSON_DECODE_ANY, NULL);
	free(j->input);
	j->input = wf_input_text(in);
	json_decref(in);
	PQclear(r);
	char *msg = xasprintf("Task started (attempt %d%s%s)", j->tries, why ? ", " : "", why ? why : "");
	int rc = wf_log_line(j->db, j->row, "info", msg, j->err, sizeof(j->err));
	free(msg);
	return rc;
}

/* Result of claiming the row for this attempt. */
enum wf_claim {
	WF_CLAIM_RUN,  /* row is running: call the source */
	WF_CLAIM_DONE, /* run->outcome is set: nothing to call */
};

/* The existing row decides: final rows are answered again (a redelivered message), others run again. */
static enum wf_claim
wf_claim_existing(struct wf_job *j, const char *status, const char *error, bool manual)
{
	struct task_run *run = j->run;
	if (strcmp(status, "completed") == 0 ||
	    (strcmp(status, "failed") == 0 && (!error || strcmp(error, WF_ERR_WORKER_LOST) != 0))) {
		const char *p[] = {j->row};
		PGresult *r =
		    store_query(j->db, "SELECT " WF_ROW_JSON " FROM tasks WHERE id = $1", 1, p, j->err, sizeof(j->err));
		if (!r || store_commit(j->db, j->err, sizeof(j->err)) < 0) {
			PQclear(r);
			wf_db_error(j, "reading the task row");
			return WF_CLAIM_DONE;
		}
		if (strcmp(status, "completed") == 0) {
			run->outcome = TASK_SUCCESS;
			run->result = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
		} else if (manual && run->retries == 0 && !run->redelivered) {
			wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s is failed, not pending", j->row);
		} else {
			wf_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "%s", error ? error : "failed");
		}
		PQclear(r);
		return WF_CLAIM_DONE;
	}
	if (manual && strcmp(status, "running") == 0 && run->retries == 0 && !run->redelivered) {
		/* a second run_task for a row another worker is running: never run it twice at once */
		store_rollback(j->db);
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s is already running", j->row);
		return WF_CLAIM_DONE;
	}
	const char *why = strcmp(status, "running") == 0 || (error && strcmp(error, WF_ERR_WORKER_LOST) == 0)
	                      ? "after a lost worker"
	                  : strcmp(status, "pending") == 0 && run->retries > 0 ? "retry"
	                                                                       : NULL;
	if (wf_restart_row(j, why) < 0) {
		wf_db_error(j, "starting the task row");
		return WF_CLAIM_DONE;
	}
	return WF_CLAIM_RUN;
}

/*
 * First half of a run, in one transaction: find or create the row, mark it running, note it in the workers row.
 * schedule_id set: execute_workflow; NULL: run_task on j->row.
 */
static enum wf_claim
wf_claim(struct wf_job *j, const char *schedule_id)
{
	struct task_run *run = j->run;
	if (wf_schema_ensure(j->db, j->err, sizeof(j->err)) < 0) {
		wf_db_error(j, "preparing the database");
		return WF_CLAIM_DONE;
	}
	if (store_begin(j->db, j->err, sizeof(j->err)) < 0) {
		wf_db_error(j, "starting a transaction");
		return WF_CLAIM_DONE;
	}
	const char *rp[] = {j->row};
	PGresult *r = store_query(j->db, "SELECT status, error FROM tasks WHERE id = $1 FOR UPDATE", 1, rp, j->err,
	                          sizeof(j->err));
	if (!r) {
		wf_db_error(j, "reading the task row");
		return WF_CLAIM_DONE;
	}
	enum wf_claim c;
	if (PQntuples(r) > 0) {
		char *status = xstrdup(PQgetvalue(r, 0, 0));
		char *error = PQgetisnull(r, 0, 1) ? NULL : xstrdup(PQgetvalue(r, 0, 1));
		PQclear(r);
		c = wf_claim_existing(j, status, error, schedule_id == NULL);
		free(status);
		free(error);
		if (c == WF_CLAIM_DONE)
			return c;
	} else if (!schedule_id) {
		PQclear(r);
		store_rollback(j->db);
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "Task %s not found", j->row);
		return WF_CLAIM_DONE;
	} else {
		PQclear(r);
		const char *sp[] = {schedule_id};
		r = store_query(
		    j->db,
		    "SELECT workflow_id, schedule_type, status, params::text, input_data FROM schedules WHERE id = $1"
		    " FOR UPDATE",
		    1, sp, j->err, sizeof(j->err));
		if (!r) {
			wf_db_error(j, "reading the schedule");
			return WF_CLAIM_DONE;
		}
		if (PQntuples(r) == 0 || strcmp(PQgetvalue(r, 0, 2), "completed") == 0) {
			log_info("task %s: schedule %s is %s: nothing to run", run->task_id, schedule_id,
			         PQntuples(r) == 0 ? "missing" : "completed");
			PQclear(r);
			if (store_commit(j->db, j->err, sizeof(j->err)) < 0) {
				wf_db_error(j, "reading the schedule");
				return WF_CLAIM_DONE;
			}
			run->outcome = TASK_SUCCESS;
			run->result = NULL;
			return WF_CLAIM_DONE;
		}
		spark_strlcpy(j->workflow_id, PQgetvalue(r, 0, 0), sizeof(j->workflow_id));
		bool one_time = strcmp(PQgetvalue(r, 0, 1), "one-time") == 0;
		/* input: params["value"], else input_data, else "Hello World" (empty counts as absent, as in Python) */
		json_t *params = PQgetisnull(r, 0, 3) ? NULL : json_loads(PQgetvalue(r, 0, 3), JSON_DECODE_ANY, NULL);
		json_t *value = json_is_object(params) ? json_object_get(params, "value") : NULL;
		free(j->input);
		j->input = value ? wf_input_text(value) : xstrdup("");
		json_decref(params);
		if (!*j->input && !PQgetisnull(r, 0, 4)) {
			free(j->input);
			j->input = xstrdup(PQgetvalue(r, 0, 4));
		}
		if (!*j->input) {
			free(j->input);
			j->input = xstrdup(WF_DEFAULT_INPUT);
		}
		PQclear(r);
		if (one_time &&
		    store_exec(j->db, "UPDATE schedules SET status = 'completed', updated_at = now() WHERE id = $1", 1,
		               sp, j->err, sizeof(j->err)) < 0) {
			wf_db_error(j, "completing the one-time schedule");
			return WF_CLAIM_DONE;
		}
		json_t *in = json_string(j->input);
		char *in_json = in ? json_dumps(in, JSON_ENCODE_ANY) : NULL;
		json_decref(in);
		if (!in_json) {
			store_rollback(j->db);
			wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "schedule %s: input is not valid UTF-8",
			        schedule_id);
			return WF_CLAIM_DONE;
		}
		char maxr[16];
		snprintf(maxr, sizeof(maxr), "%d", run->max_retries);
		const char *ip[] = {j->row, j->workflow_id, schedule_id, in_json, maxr};
		int rc = store_exec(
		    j->db,
		    "INSERT INTO tasks (id, workflow_id, schedule_id, status, input_data, tries, max_retries, "
		    "created_at,"
		    " started_at, updated_at) VALUES ($1, $2, $3, 'running', $4::json, 1, $5, now(), now(), now())",
		    5, ip, j->err, sizeof(j->err));
		free(in_json);
		j->tries = 1;
		if (rc < 0 ||
		    wf_log_line(j->db, j->row, "info", "Task started (attempt 1)", j->err, sizeof(j->err)) < 0) {
			wf_db_error(j, "creating the task row");
			return WF_CLAIM_DONE;
		}
	}
	/* the workers row names the task in the same transaction, so recovery never mistakes it for an orphan */
	wf_current_set(j->slot, j->row, false);
	if (wf_worker_upsert(j->db, true, j->row, j->err, sizeof(j->err)) < 0 ||
	    store_commit(j->db, j->err, sizeof(j->err)) < 0) {
		wf_current_set(j->slot, NULL, false);
		wf_db_error(j, "starting the task row");
		return WF_CLAIM_DONE;
	}
	wf_current_set(j->slot, j->row, true);
	return WF_CLAIM_RUN;
}

/* Record the end of an attempt in one transaction; returns the row as JSON in *row_json (caller frees). */
static int
wf_record(struct wf_job *j, const char *status, const char *output_json, const char *error, double retry_in,
          const char *log_level, const char *log_msg, char **row_json)
{
	char retry[32];
	snprintf(retry, sizeof(retry), "%.3f", retry_in);
	*row_json = NULL;
	wf_current_set(j->slot, NULL, false);
	if (store_begin(j->db, j->err, sizeof(j->err)) < 0)
		return -1;
	const char *p[] = {j->row, status, output_json, error, strcmp(status, "pending") == 0 ? retry : NULL};
	PGresult *r = store_query(
	    j->db,
	    "UPDATE tasks SET status = $2::varchar, output_data = COALESCE($3::json, output_data), error = $4::varchar,"
	    " next_retry_at = now() + make_interval(secs => $5::float8),"
	    " finished_at = CASE WHEN $2::varchar IN ('completed', 'failed') THEN now() END, updated_at = now()"
	    " WHERE id = $1 RETURNING " WF_ROW_JSON,
	    5, p, j->err, sizeof(j->err));
	if (!r)
		goto fail;
	if (PQntuples(r) > 0)
		*row_json = xstrdup(PQgetvalue(r, 0, 0));
	PQclear(r);
	if (wf_log_line(j->db, j->row, log_level, log_msg, j->err, sizeof(j->err)) < 0 ||
	    wf_worker_upsert(j->db, true, NULL, j->err, sizeof(j->err)) < 0 ||
	    store_commit(j->db, j->err, sizeof(j->err)) < 0)
		goto fail;
	return 0;
fail:
	free(*row_json);
	*row_json = NULL;
	return -1;
}

/* A final failure: row failed, Celery FAILURE (or RETRY on the last attempt, so the engine records it). */
static void
wf_finish_failed(struct wf_job *j, enum task_outcome outcome, const char *module, const char *type, const char *msg)
{
	char *row = NULL;
	char *line = xasprintf("Task failed: %s", msg);
	wf_count(&wf.failed);
	int rc = wf_record(j, "failed", NULL, msg, 0, "error", line, &row);
	free(line);
	free(row);
	if (rc < 0) {
		wf_db_error(j, "recording the failure");
		return;
	}
	log_warnx("task %s: row %s failed: %s", j->run->task_id, j->row, msg);
	wf_fail(j->run, outcome, module, type, "%s", msg);
}

/* Empty output in automagik-spark's sense: nothing, "", {} or []. */
static bool
output_empty(const json_t *o)
{
	return !o || json_is_null(o) || (json_is_string(o) && json_string_length(o) == 0) ||
	       (json_is_object(o) && json_object_size(o) == 0) || (json_is_array(o) && json_array_size(o) == 0);
}

static void
wf_finish_ok(struct wf_job *j, json_t *output)
{
	if (output_empty(output)) {
		wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", "No output from workflow");
		return;
	}
	/* stored as automagik-spark does: a JSON string holding json.dumps(output) (or the text itself) */
	char *text = json_is_string(output) ? xstrdup(json_string_value(output)) : json_dumps(output, JSON_ENCODE_ANY);
	json_t *s = text ? json_string(text) : NULL;
	char *out_json = s ? json_dumps(s, JSON_ENCODE_ANY) : NULL;
	json_decref(s);
	free(text);
	if (!out_json)
		fatalx("workflow: out of memory");
	char *row = NULL;
	wf_count(&wf.succeeded);
	int rc = wf_record(j, "completed", out_json, NULL, 0, "info", "Task completed", &row);
	free(out_json);
	if (rc < 0) {
		free(row);
		wf_db_error(j, "recording the result");
		return;
	}
	log_info("task %s: row %s completed", j->run->task_id, j->row);
	j->run->outcome = TASK_SUCCESS;
	j->run->result = row ? json_loads(row, 0, NULL) : NULL;
	free(row);
}

static void
wf_finish_retry(struct wf_job *j, const char *msg, bool timeout)
{
	struct task_run *run = j->run;
	const char *type = timeout ? "TimeoutError" : "ConnectionError";
	if (run->last_attempt) {
		char *m = xasprintf("%s (gave up after %d attempts)", msg, j->tries);
		wf_finish_failed(j, TASK_RETRY, "builtins", type, m);
		free(m);
		return;
	}
	char *row = NULL;
	char *line =
	    xasprintf("Retry %d/%d in %.1f s: %s", run->retries + 1, run->max_retries, run->retry_countdown, msg);
	wf_count(&wf.retried);
	int rc = wf_record(j, "pending", NULL, msg, run->retry_countdown, "warning", line, &row);
	free(line);
	free(row);
	if (rc < 0) {
		wf_db_error(j, "recording the retry");
		return;
	}
	log_warnx("task %s: row %s will be retried: %s", run->task_id, j->row, msg);
	wf_fail(run, TASK_RETRY, "builtins", type, "%s", msg);
}

/* The source call was cut short by the engine. */
static void
wf_finish_cancelled(struct wf_job *j)
{
	int why = j->run->cancel ? atomic_load(j->run->cancel) : TASK_CANCEL_NONE;
	if (why == TASK_CANCEL_SHUTDOWN) {
		/* cold stop: the message goes back to the queue and the next attempt reuses this row */
		char *row = NULL;
		int rc = wf_record(j, "pending", NULL, "interrupted by a worker shutdown; will run again", 0, "warning",
		                   "Task interrupted by a worker shutdown; it will run again", &row);
		free(row);
		if (rc < 0) {
			wf_db_error(j, "recording the interruption");
			return;
		}
		wf_fail(j->run, TASK_DEFER, "celery.exceptions", "WorkerLostError", "interrupted by a worker shutdown");
		return;
	}
	if (why == TASK_CANCEL_HARD_LIMIT)
		wf_finish_failed(j, TASK_FAILURE, "celery.exceptions", "TimeLimitExceeded", "TimeLimitExceeded");
	else
		wf_finish_failed(j, TASK_FAILURE, "celery.exceptions", "SoftTimeLimitExceeded",
		                 "SoftTimeLimitExceeded: soft time limit exceeded");
}

/* Second half: load the workflow and its source, decrypt the key, call the source, record the outcome. */
static void
wf_call(struct wf_job *j)
{
	const char *p[] = {j->workflow_id};
	PGresult *r =
	    store_query(j->db,
	                "SELECT w.remote_flow_id, s.id, s.source_type, s.url, s.encrypted_api_key FROM workflows w"
	                " LEFT JOIN workflow_sources s ON s.id = w.workflow_source_id WHERE w.id = $1",
	                1, p, j->err, sizeof(j->err));
	if (!r) {
		if (store_lost(j->db)) {
			/* the row is running and the database is gone: leave it to the redelivered message */
			wf_current_set(j->slot, NULL, false);
			wf_db_error(j, "reading the workflow");
		} else {
			char *m = xasprintf("reading the workflow: %s", j->err);
			wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", m);
			free(m);
		}
		return;
	}
	if (PQntuples(r) == 0 || PQgetisnull(r, 0, 1)) {
		char *m = PQntuples(r) == 0 ? xasprintf("Workflow %s not found", j->workflow_id)
		                            : xasprintf("No source found for workflow %s", j->workflow_id);
		PQclear(r);
		wf_finish_failed(j, TASK_FAILURE, "builtins", "ValueError", m);
		free(m);
		return;
	}
	char *remote = xstrdup(PQgetvalue(r, 0, 0));
	char *type = xstrdup(PQgetvalue(r, 0, 2));
	char *url = xstrdup(PQgetvalue(r, 0, 3));
	char *token = PQgetisnull(r, 0, 4) ? xstrdup("") : xstrdup(PQgetvalue(r, 0, 4));
	PQclear(r);

	char *key = NULL;
	size_t keylen = 0;
	char kerr[256];
	if (*token) {
		if (!wf.key_ok) {
			snprintf(kerr, sizeof(kerr), "%s", wf.key_err);
		} else if (fernet_decrypt(wf.key, token, &key, &keylen, kerr, sizeof(kerr)) < 0) {
			key = NULL;
		}
		if (!key) {
			char *m = xasprintf("Failed to decrypt API key: %s", kerr);
			wf_finish_failed(j, TASK_FAILURE, "builtins", "ValueError", m);
			free(m);
			goto out;
		}
	}
	if (j->run->cancel && atomic_load(j->run->cancel)) {
		wf_finish_cancelled(j);
		goto out;
	}

	struct source_request req = {
	    .source_type = type,
	    .url = url,
	    .api_key = key,
	    .remote_id = remote,
	    .input = j->input,
	    .session_id = j->row,
	    .timeout = wf.http_timeout,
	    .cancel = j->run->cancel,
	};
	struct source_result res;
	log_info("task %s: row %s: calling %s flow %s (attempt %d)", j->run->task_id, j->row, type, remote, j->tries);
	source_call(&req, &res);
	switch (res.status) {
	case SOURCE_OK:
		wf_finish_ok(j, res.output);
		break;
	case SOURCE_RETRY:
		wf_finish_retry(j, res.error, strstr(res.error, "imed out") || strstr(res.error, "imeout"));
		break;
	case SOURCE_FAIL:
		wf_finish_failed(j, TASK_FAILURE, "builtins", "RuntimeError", res.error);
		break;
	case SOURCE_CANCELLED:
		wf_finish_cancelled(j);
		break;
	}
	json_decref(res.output);
out:
	if (key) {
		OPENSSL_cleanse(key, keylen);
		free(key);
	}
	OPENSSL_cleanse(token, strlen(token));
	free(token);
	free(remote);
	free(type);
	free(url);
}

/* Lazy init when the engine did not call workflow_init (tests, or a task before init). */
static bool
wf_ready(struct task_run *run)
{
	if (!wf.inited)
		workflow_init(run->cfg, run->node, 1);
	if (!wf.enabled) {
		wf_fail(run, TASK_FAILURE, "builtins", "RuntimeError", WORKFLOW_ERR_NO_DATABASE);
		return false;
	}
	return true;
}

static struct wf_slot *
wf_slot_for(const struct task_run *run)
{
	if (run->slot >= 0 && run->slot < wf.nslots)
		return &wf.slots[run->slot];
	return &wf.spare;
}

static void
wf_run(struct task_run *run, const char *schedule_id, const char *row_id)
{
	struct wf_job j = {.run = run};
	run->outcome = TASK_SUCCESS;
	run->result = NULL;
	j.slot = wf_slot_for(run);
	pthread_mutex_lock(&j.slot->mu);
	j.db = j.slot->db;
	if (schedule_id) {
		/* one row per Celery task id: retries and redeliveries land on it */
		char *name = xasprintf("execute_workflow:%s", run->task_id ? run->task_id : "");
		store_uuid5(name, j.row);
		free(name);
	} else {
		spark_strlcpy(j.row, row_id, sizeof(j.row));
		for (char *c = j.row; *c; c++) /* the row id is compared as text in recovery */
			if (*c >= 'A' && *c <= 'F')
				*c = (char)(*c - 'A' + 'a');
	}
	if (wf_claim(&j, schedule_id) == WF_CLAIM_RUN) {
		j.claimed = true;
		wf_count(&wf.processed);
		wf_call(&j);
	}
	wf_current_set(j.slot, NULL, false);
	free(j.input);
	pthread_mutex_unlock(&j.slot->mu);
}

static const char *
wf_arg_string(struct task_run *run, const char *what)
{
	json_t *a = json_is_array(run->args) ? json_array_get(run->args, 0) : NULL;
	if (!a && json_is_object(run->kwargs))
		a = json_object_get(run->kwargs, what);
	const char *s = json_string_value(a);
	if (!uuid_valid(s)) {
		wf_fail(run, TASK_FAILURE, "builtins", "ValueError", "%s must be a UUID string", what);
		return NULL;
	}
	return s;
}

void
task_execute_workflow(struct task_run *run)
{
	if (!wf_ready(run))
		return;
	const char *sid = wf_arg_string(run, "schedule_id");
	if (sid)
		wf_run(run, sid, NULL);
}

void
task_run_task(struct task_run *run)
{
	if (!wf_ready(run))
		return;
	const char *tid = wf_arg_string(run, "task_id");
	if (tid)
		wf_run(run, NULL, tid);
}

/* The plugin's state for one process: create, destroy, and the one-shot migrate command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "log.h"
#include "store.h"
#include "util.h"
#include "wf.h"

/* Each call in flight holds a socket: make sure the process may open that many. */
static void
wf_raise_nofile(int slots)
{
	struct rlimit rl;
	rlim_t want = (rlim_t)slots + 256;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
		return;
	rlim_t got = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
	rl.rlim_cur = got;
	if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || got < want)
		log_warnx("workflow: %d slots need %lu file descriptors, the limit is %lu: calls beyond it will fail",
		          slots, (unsigned long)want, (unsigned long)got);
}

static void
wf_key_setup(struct wf_state *st, const struct spark_config *cfg)
{
	if (cfg->encryption_key && *cfg->encryption_key) {
		st->key_ok = fernet_key_parse(cfg->encryption_key, st->key, st->key_err, sizeof(st->key_err)) == 0;
		if (!st->key_ok)
			log_warnx("workflow: %s; workflow sources with API keys will fail", st->key_err);
	} else {
		log_warnx(
		    "workflow: AUTOMAGIK_SPARK_ENCRYPTION_KEY is not set: using automagik-spark's public test key "
		    "(unsafe for production)");
		st->key_ok = fernet_key_parse(WF_TEST_KEY, st->key, st->key_err, sizeof(st->key_err)) == 0;
	}
}

struct wf_state *
wf_create(const struct spark_config *cfg, const char *node, int slots, struct event_base *base)
{
	struct wf_state *st = xcalloc(1, sizeof(*st));
	st->cfg = cfg;
	st->base = base;
	TAILQ_INIT(&st->jobs);
	TAILQ_INIT(&st->schema_wait);
	TAILQ_INIT(&st->claimq);
	TAILQ_INIT(&st->claims.q);
	TAILQ_INIT(&st->recq);
	TAILQ_INIT(&st->recs.q);
	st->nslots = slots > 0 ? slots : 1;
	if (!cfg || !cfg->database_url || !*cfg->database_url) {
		log_debug("workflow: DATABASE_URL is not set; workflow tasks will fail");
		return st;
	}
	st->node = xstrdup(node ? node : spark_hostname());
	json_t *nj = json_string(st->node);
	st->node_json = nj ? json_dumps(nj, JSON_ENCODE_ANY) : NULL;
	json_decref(nj);
	if (!st->node_json)
		st->node_json = xstrdup("\"\"");
	snprintf(st->pid, sizeof(st->pid), "%ld", (long)getpid());
	st->http_timeout = cfg->http_timeout > 0 ? cfg->http_timeout : 600;
	double longest = cfg->time_limit > st->http_timeout ? cfg->time_limit : st->http_timeout;
	st->orphan_age = longest + 60;
	st->hb_interval = cfg->heartbeat_interval > 0 ? cfg->heartbeat_interval : WF_HEARTBEAT_DEFAULT;
	st->started = now_wall();
	store_uuid4(st->worker_id);
	wf_key_setup(st, cfg);
	wf_raise_nofile(st->nslots);

	source_global_init();
	int pool = cfg->db_pool_size > 0 ? cfg->db_pool_size : 4;
	if (pgpool_init(&st->pool, base, cfg->database_url, pool) < 0 ||
	    http_init(&st->http, base, (long)st->nslots + 16) < 0) {
		log_errorx("workflow: cannot set up the database pool or the HTTP client");
		wf_destroy(st);
		return NULL;
	}
	st->enabled = true;
	wf_beat_start(st);
	return st;
}

void
wf_destroy(struct wf_state *st)
{
	if (!st)
		return;
	/* abandon what is in flight: the pool's units and the transfers go first, then the runs that owned them */
	if (st->pool.conns)
		pgpool_free(&st->pool);
	if (st->http.multi)
		http_free(&st->http);
	struct wf_job *j;
	while ((j = TAILQ_FIRST(&st->jobs))) {
		TAILQ_REMOVE(&st->jobs, j, entry);
		j->run->on_cancel = NULL;
		j->run->task = NULL;
		wf_job_free(j);
	}
	wf_batches_free(&st->claims);
	wf_beat_free(st);
	wf_batches_free(&st->recs);
	OPENSSL_cleanse(st->key, sizeof(st->key));
	free(st->cur_rows);
	free(st->cur_jobs);
	free(st->node);
	free(st->node_json);
	free(st);
}

void
wf_set_current(struct wf_job *j, bool on)
{
	struct wf_state *st = j->st;
	if (j->current == on)
		return;
	j->current = on;
	if (on) {
		if (st->ncur == st->cur_cap) {
			st->cur_cap = st->cur_cap ? 2 * st->cur_cap : 64;
			st->cur_rows = xrealloc(st->cur_rows, (size_t)st->cur_cap * sizeof *st->cur_rows);
			st->cur_jobs = xrealloc(st->cur_jobs, (size_t)st->cur_cap * sizeof *st->cur_jobs);
		}
		memcpy(st->cur_rows[st->ncur], j->row, 36);
		st->cur_jobs[st->ncur] = j;
		j->cur_at = st->ncur++;
		return;
	}
	/* the last one takes its place: current_tasks is a set */
	int last = --st->ncur;
	if (j->cur_at != last) {
		memcpy(st->cur_rows[j->cur_at], st->cur_rows[last], 36);
		st->cur_jobs[j->cur_at] = st->cur_jobs[last];
		st->cur_jobs[j->cur_at]->cur_at = j->cur_at;
	}
}

void
wf_batch_add(struct wf_state *st, struct wf_batches *set, struct wf_batch *b, bool waiting)
{
	b->st = st;
	b->set = set;
	TAILQ_INIT(&b->jobs);
	b->waiting = waiting;
	set->waiting = set->waiting || waiting;
	TAILQ_INSERT_TAIL(&set->q, b, entry);
	set->n++;
}

void
wf_batch_attached(struct wf_batch *b)
{
	if (b->waiting)
		b->set->waiting = false;
	b->waiting = false;
}

void
wf_batch_free(struct wf_batch *b)
{
	wf_batch_attached(b);
	TAILQ_REMOVE(&b->set->q, b, entry);
	b->set->n--;
	pg_unit_release(&b->unit);
	free(b);
}

/*
 * Half the pool while the other kind has work, so that neither waits behind the other (the rows of a thousand
 * calls ending together are written while the next thousand are claimed); all connections but one while it has
 * none (the first wave's claims, with nothing to record yet, took twice as long on half the pool). The other
 * kind's next batch then waits for one of ours to end (a record's one round trip, a claim's two).
 */
int
wf_batch_most(const struct wf_state *st, const struct wf_batches *other, const struct wf_jobq *other_q)
{
	int size = st->pool.size;
	if (size <= 2)
		return 1;
	return other->n > 0 || !TAILQ_EMPTY(other_q) ? size / 2 : size - 1;
}

void
wf_batches_free(struct wf_batches *set)
{
	struct wf_batch *b;
	while ((b = TAILQ_FIRST(&set->q)))
		wf_batch_free(b);
}

int
wf_migrate(const struct spark_config *cfg)
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

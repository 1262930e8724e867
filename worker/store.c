/* PostgreSQL store for workflow tasks; see store.h. */
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "log.h"
#include "store.h"
#include "util.h"

struct store {
	char *url;
	PGconn *conn;
	bool in_tx;
	bool lost; /* the last failure was transient: connection gone, deadlock, serialization or lock timeout */
};

/*
 * The automagik-spark schema (reference/automagik-spark.md). CREATE TABLE IF NOT EXISTS so that an existing
 * automagik-spark database is used as it is: its tables, columns and constraints are never altered.
 */
static const char *const migration_1[] = {
    "CREATE TABLE IF NOT EXISTS workflow_sources ("
    " id uuid PRIMARY KEY,"
    " name varchar(255),"
    " source_type varchar(50) NOT NULL,"
    " url varchar(255) NOT NULL UNIQUE,"
    " encrypted_api_key varchar NOT NULL,"
    " version_info json,"
    " status varchar(50) NOT NULL DEFAULT 'active',"
    " created_at timestamptz DEFAULT now(),"
    " updated_at timestamptz DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS workflows ("
    " id uuid PRIMARY KEY,"
    " name varchar(255) NOT NULL,"
    " description text,"
    " data json,"
    " flow_raw_data json,"
    " source varchar(50) NOT NULL,"
    " remote_flow_id varchar(255) NOT NULL,"
    " flow_version integer DEFAULT 1,"
    " workflow_source_id uuid REFERENCES workflow_sources(id),"
    " input_component varchar(255),"
    " output_component varchar(255),"
    " is_component boolean DEFAULT false,"
    " folder_id varchar(255),"
    " folder_name varchar(255),"
    " icon varchar(255),"
    " icon_bg_color varchar(50),"
    " liked boolean DEFAULT false,"
    " tags json,"
    " gradient boolean DEFAULT false,"
    " created_at timestamptz DEFAULT now(),"
    " updated_at timestamptz DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS workflow_components ("
    " id uuid PRIMARY KEY,"
    " workflow_id uuid NOT NULL REFERENCES workflows(id),"
    " component_id varchar(255) NOT NULL,"
    " type varchar(50) NOT NULL,"
    " template json,"
    " tweakable_params json,"
    " is_input boolean DEFAULT false,"
    " is_output boolean DEFAULT false,"
    " created_at timestamptz DEFAULT now(),"
    " updated_at timestamptz DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS schedules ("
    " id uuid PRIMARY KEY,"
    " workflow_id uuid NOT NULL REFERENCES workflows(id),"
    " schedule_type varchar NOT NULL,"
    " schedule_expr varchar NOT NULL,"
    " params json,"
    " input_data varchar,"
    " status varchar NOT NULL DEFAULT 'active',"
    " next_run_at timestamptz,"
    " created_at timestamptz DEFAULT now(),"
    " updated_at timestamptz DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS tasks ("
    " id uuid PRIMARY KEY,"
    " workflow_id uuid NOT NULL REFERENCES workflows(id),"
    " schedule_id uuid REFERENCES schedules(id),"
    " status varchar(50) NOT NULL DEFAULT 'pending',"
    " input_data json NOT NULL,"
    " output_data json,"
    " error varchar,"
    " next_retry_at timestamptz,"
    " tries integer NOT NULL DEFAULT 0,"
    " max_retries integer NOT NULL DEFAULT 3,"
    " created_at timestamptz DEFAULT now(),"
    " started_at timestamptz,"
    " finished_at timestamptz,"
    " updated_at timestamptz DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS task_logs ("
    " id uuid PRIMARY KEY,"
    " task_id uuid NOT NULL REFERENCES tasks(id),"
    " level varchar NOT NULL,"
    " message varchar NOT NULL,"
    " component_id varchar,"
    " created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS workers ("
    " id uuid PRIMARY KEY,"
    " hostname varchar(255) NOT NULL,"
    " pid integer NOT NULL,"
    " status varchar(50) NOT NULL DEFAULT 'active',"
    " current_task_id uuid REFERENCES tasks(id),"
    " stats json,"
    " created_at timestamptz DEFAULT now(),"
    " updated_at timestamptz DEFAULT now(),"
    " last_heartbeat timestamptz)",
    NULL,
};

static const struct store_migration migrations[] = {
    {1, "automagik-spark tables", migration_1},
};
#define NMIGRATIONS (sizeof(migrations) / sizeof(migrations[0]))

static const char *const schema_tables[] = {
    "workflow_sources", "workflows", "workflow_components", "schedules", "tasks", "task_logs", "workers"};

int
store_schema_version(void)
{
	return migrations[NMIGRATIONS - 1].version;
}

int
store_migration_count(void)
{
	return (int)NMIGRATIONS;
}

const struct store_migration *
store_migration_get(int i)
{
	return i >= 0 && i < (int)NMIGRATIONS ? &migrations[i] : NULL;
}

const char *
store_schema_check_sql(void)
{
	return "SELECT to_regclass('workflow_sources') IS NOT NULL AND to_regclass('workflows') IS NOT NULL"
	       " AND to_regclass('workflow_components') IS NOT NULL AND to_regclass('schedules') IS NOT NULL"
	       " AND to_regclass('tasks') IS NOT NULL AND to_regclass('task_logs') IS NOT NULL"
	       " AND to_regclass('workers') IS NOT NULL";
}

struct store *
store_open(const char *url)
{
	struct store *s = xcalloc(1, sizeof(*s));
	s->url = xstrdup(url);
	return s;
}

static void
store_drop(struct store *s)
{
	if (s->conn)
		PQfinish(s->conn);
	s->conn = NULL;
	s->in_tx = false;
}

void
store_close(struct store *s)
{
	if (!s)
		return;
	store_drop(s);
	free(s->url);
	free(s);
}

bool
store_lost(const struct store *s)
{
	return s->lost;
}

/* libpq's messages end with a newline and may span lines: keep the first line only. */
static void
pq_error(char *err, size_t errlen, const char *what, const char *msg)
{
	char line[400];
	spark_strlcpy(line, msg ? msg : "", sizeof(line));
	line[strcspn(line, "\r\n")] = '\0';
	snprintf(err, errlen, "%s: %s", what, line[0] ? line : "unknown error");
}

int
store_connect(struct store *s, char *err, size_t errlen)
{
	if (s->conn && PQstatus(s->conn) == CONNECTION_OK)
		return 0;
	store_drop(s);
	/* defaults first: a value given in the URL, expanded from dbname after them, wins */
	const char *keys[] = {"connect_timeout",
	                      "application_name",
	                      "keepalives_idle",
	                      "keepalives_interval",
	                      "keepalives_count",
	                      "dbname",
	                      NULL};
	const char *vals[] = {"5", "spark-worker", "30", "10", "3", s->url, NULL};
	s->conn = PQconnectdbParams(keys, vals, 1);
	if (!s->conn) {
		s->lost = true;
		snprintf(err, errlen, "database: out of memory");
		return -1;
	}
	if (PQstatus(s->conn) != CONNECTION_OK) {
		s->lost = true;
		pq_error(err, errlen, "database connection failed", PQerrorMessage(s->conn));
		store_drop(s);
		return -1;
	}
	/* timestamps in task rows returned to Celery read like Python's isoformat() of UTC datetimes */
	PGresult *r = PQexec(s->conn, "SET TIME ZONE 'UTC'");
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	PQclear(r);
	if (!ok) {
		s->lost = true;
		pq_error(err, errlen, "database setup failed", PQerrorMessage(s->conn));
		store_drop(s);
		return -1;
	}
	s->lost = false;
	return 0;
}

/* A failed statement: was it the connection (defer and reconnect) or the statement (a real error)? */
static bool
failure_is_connection(PGconn *c, PGresult *r)
{
	if (PQstatus(c) != CONNECTION_OK)
		return true;
	const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	if (!state)
		return r == NULL;
	/* 08: connection exception; 57P01-03: admin/crash shutdown, cannot connect now */
	return strncmp(state, "08", 2) == 0 || strncmp(state, "57P0", 4) == 0;
}

PGresult *
store_query(struct store *s, const char *sql, int nparams, const char *const *params, char *err, size_t errlen)
{
	for (int attempt = 0;; attempt++) {
		if (store_connect(s, err, errlen) < 0)
			return NULL;
		PGresult *r = PQexecParams(s->conn, sql, nparams, NULL, params, NULL, NULL, 0);
		ExecStatusType st = PQresultStatus(r);
		if (r && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)) {
			s->lost = false;
			return r;
		}
		bool conn = failure_is_connection(s->conn, r);
		const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
		/* 40: deadlock or serialization failure; 55P03: lock not available. Worth running again later. */
		bool transient = conn || (state && (strncmp(state, "40", 2) == 0 || strcmp(state, "55P03") == 0));
		pq_error(err, errlen, conn ? "database connection lost" : "database error",
		         r ? PQresultErrorMessage(r) : PQerrorMessage(s->conn));
		PQclear(r);
		s->lost = transient;
		if (!conn)
			return NULL;
		bool was_tx = s->in_tx;
		store_drop(s);
		/* a statement outside a transaction is simply sent again on a fresh connection (server restarted);
		 * inside one, the transaction is gone and the caller must start over */
		if (was_tx || attempt > 0)
			return NULL;
	}
}

int
store_exec(struct store *s, const char *sql, int nparams, const char *const *params, char *err, size_t errlen)
{
	PGresult *r = store_query(s, sql, nparams, params, err, errlen);
	if (!r)
		return -1;
	PQclear(r);
	return 0;
}

int
store_begin(struct store *s, char *err, size_t errlen)
{
	if (s->in_tx)
		store_rollback(s);
	if (store_exec(s, "BEGIN", 0, NULL, err, errlen) < 0)
		return -1;
	s->in_tx = true;
	return 0;
}

int
store_commit(struct store *s, char *err, size_t errlen)
{
	int rc = store_exec(s, "COMMIT", 0, NULL, err, errlen);
	s->in_tx = false;
	return rc;
}

void
store_rollback(struct store *s)
{
	if (s->conn && PQstatus(s->conn) == CONNECTION_OK && PQtransactionStatus(s->conn) != PQTRANS_IDLE) {
		PGresult *r = PQexec(s->conn, "ROLLBACK");
		PQclear(r);
	}
	s->in_tx = false;
}

int
store_schema_present(struct store *s, char *err, size_t errlen)
{
	int present = 1;
	for (size_t i = 0; i < sizeof(schema_tables) / sizeof(schema_tables[0]); i++) {
		const char *p[] = {schema_tables[i]};
		PGresult *r = store_query(s, "SELECT to_regclass($1) IS NOT NULL", 1, p, err, errlen);
		if (!r)
			return -1;
		if (strcmp(PQgetvalue(r, 0, 0), "t") != 0)
			present = 0;
		PQclear(r);
	}
	return present;
}

int
store_migrate(struct store *s, FILE *out, char *err, size_t errlen)
{
	if (store_begin(s, err, errlen) < 0)
		return -1;
	char lock[32];
	snprintf(lock, sizeof(lock), "%lld", (long long)STORE_MIGRATE_LOCK);
	const char *lp[] = {lock};
	if (store_exec(s, STORE_SQL_MIGRATE_LOCK, 1, lp, err, errlen) < 0 ||
	    store_exec(s, STORE_SQL_MIGRATIONS_TABLE, 0, NULL, err, errlen) < 0)
		goto fail;
	int applied = 0;
	for (size_t i = 0; i < NMIGRATIONS; i++) {
		char v[16];
		snprintf(v, sizeof(v), "%d", migrations[i].version);
		const char *vp[] = {v};
		PGresult *r = store_query(s, STORE_SQL_MIGRATION_DONE, 1, vp, err, errlen);
		if (!r)
			goto fail;
		bool done = PQntuples(r) > 0;
		PQclear(r);
		if (done)
			continue;
		for (const char *const *q = migrations[i].sql; *q; q++) {
			PGresult *m = PQexec(s->conn, *q);
			if (PQresultStatus(m) != PGRES_COMMAND_OK) {
				pq_error(err, errlen, "migration failed", PQresultErrorMessage(m));
				s->lost = failure_is_connection(s->conn, m);
				PQclear(m);
				goto fail;
			}
			PQclear(m);
		}
		if (store_exec(s, STORE_SQL_MIGRATION_RECORD, 1, vp, err, errlen) < 0)
			goto fail;
		if (out)
			fprintf(out, "applied migration %d: %s\n", migrations[i].version, migrations[i].what);
		applied++;
	}
	if (store_commit(s, err, errlen) < 0)
		return -1;
	if (out && applied == 0)
		fprintf(out, "database schema is up to date (version %d)\n", store_schema_version());
	return 0;
fail:
	store_rollback(s);
	return -1;
}

static void
uuid_format(const unsigned char b[16], char out[37])
{
	static const char hex[] = "0123456789abcdef";
	int j = 0;
	for (int i = 0; i < 16; i++) {
		if (i == 4 || i == 6 || i == 8 || i == 10)
			out[j++] = '-';
		out[j++] = hex[b[i] >> 4];
		out[j++] = hex[b[i] & 15];
	}
	out[j] = '\0';
}

void
store_uuid4(char out[37])
{
	unsigned char b[16];
	if (RAND_bytes(b, sizeof(b)) != 1)
		fatalx("store: no random bytes for a UUID");
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	uuid_format(b, out);
}

void
store_uuid5(const char *name, char out[37])
{
	/* namespace of spark task rows (a fixed random UUID); changing it would orphan rows across an upgrade */
	static const unsigned char ns[16] = {0x6b, 0x1d, 0x3c, 0x52, 0x8f, 0x0e, 0x4a, 0x41,
	                                     0x9a, 0x57, 0x2e, 0x60, 0x0d, 0xb4, 0x7c, 0x13};
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	if (!c || EVP_DigestInit_ex(c, EVP_sha1(), NULL) != 1 || EVP_DigestUpdate(c, ns, sizeof(ns)) != 1 ||
	    EVP_DigestUpdate(c, name, strlen(name)) != 1 || EVP_DigestFinal_ex(c, md, &mdlen) != 1)
		fatalx("store: SHA-1 unavailable");
	EVP_MD_CTX_free(c);
	md[6] = (unsigned char)((md[6] & 0x0f) | 0x50);
	md[8] = (unsigned char)((md[8] & 0x3f) | 0x80);
	uuid_format(md, out);
}

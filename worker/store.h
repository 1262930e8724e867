/*
 * The automagik-spark schema and its versioned migrations, with a blocking libpq connection for the one-shot
 * `--migrate` command (the worker's own traffic goes through pgpool.c on the loop), and the row-id UUIDs.
 */
#ifndef SPARK_STORE_H
#define SPARK_STORE_H

#include <stdbool.h>
#include <stdio.h>

#include <libpq-fe.h>

struct store;

/* A handle for url (not connected yet; nothing is logged that could hold the password). */
struct store *store_open(const char *url);
void store_close(struct store *s);

/* Connect when not connected or when the connection went bad. 0, or -1 with a reason in err. */
int store_connect(struct store *s, char *err, size_t errlen);

/* true when the last failure was the connection (server down, network): callers defer rather than fail. */
bool store_lost(const struct store *s);

/*
 * Run sql with text parameters (NULL = SQL NULL). Returns the result when it is PGRES_COMMAND_OK or
 * PGRES_TUPLES_OK (the caller PQclear()s it); NULL with a reason in err otherwise. Connects first when needed.
 */
PGresult *store_query(struct store *s, const char *sql, int nparams, const char *const *params, char *err,
                      size_t errlen);
/* As store_query for statements whose result is not needed. 0 or -1. */
int store_exec(struct store *s, const char *sql, int nparams, const char *const *params, char *err, size_t errlen);

int store_begin(struct store *s, char *err, size_t errlen);
int store_commit(struct store *s, char *err, size_t errlen);
/* Roll back an open transaction; harmless when none is open or the connection is gone. */
void store_rollback(struct store *s);

/* true when every automagik-spark table exists. -1 on error. */
int store_schema_present(struct store *s, char *err, size_t errlen);

/*
 * Apply the pending migrations in one transaction under an advisory lock (concurrent workers wait, then find
 * nothing to do). Lines saying what was done go to out when not NULL. 0 or -1.
 */
int store_migrate(struct store *s, FILE *out, char *err, size_t errlen);

/* Latest migration version known to this build. */
int store_schema_version(void);

/* Any 64-bit constant shared by every worker: serialises migrations across processes and hosts. */
#define STORE_MIGRATE_LOCK     0x5370726b4d696772LL /* "SprkMigr" */
#define STORE_SQL_MIGRATE_LOCK "SELECT pg_advisory_xact_lock($1::bigint)"
#define STORE_SQL_MIGRATIONS_TABLE                                                                                     \
	"CREATE TABLE IF NOT EXISTS spark_schema_migrations ("                                                         \
	" version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
#define STORE_SQL_MIGRATION_DONE   "SELECT 1 FROM spark_schema_migrations WHERE version = $1"
#define STORE_SQL_MIGRATION_RECORD "INSERT INTO spark_schema_migrations (version, applied_at) VALUES ($1, now())"

/* One migration: its statements, in order (NULL-terminated), each run on its own. */
struct store_migration {
	int version;
	const char *what;
	const char *const *sql;
};
int store_migration_count(void);
const struct store_migration *store_migration_get(int i);
/* One statement whose single value is true when every automagik-spark table exists. */
const char *store_schema_check_sql(void);

/* A random (v4) UUID, "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx". */
void store_uuid4(char out[37]);
/* A name-based (v5, SHA-1) UUID: the same name always gives the same id. */
void store_uuid5(const char *name, char out[37]);

#endif

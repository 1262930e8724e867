/*
 * PostgreSQL access for workflow tasks (libpq): one connection per slot thread (plus one for the heartbeat), lazy
 * connect and reconnect, parameterised queries, and the versioned migrations that create the automagik-spark schema.
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

/* A random (v4) UUID, "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx". */
void store_uuid4(char out[37]);
/* A name-based (v5, SHA-1) UUID: the same name always gives the same id. */
void store_uuid5(const char *name, char out[37]);

#endif

/*
 * Configuration shared by sparkd, spark-worker and sparkctl (DESIGN §5).
 * Sources, highest first: command-line flags, environment, env file, defaults.
 * Every value is validated before any process starts.
 */
#ifndef SPARK_CONFIG_H
#define SPARK_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "url.h"

enum spark_pool {
	SPARK_POOL_PREFORK = 0,
	SPARK_POOL_THREADS,
	SPARK_POOL_SOLO,
};

#define SPARK_MAX_QUEUES 32

struct spark_config {
	int workers;     /* SPARK_WORKERS, --workers */
	int concurrency; /* CELERY_WORKER_CONCURRENCY, --concurrency (forced to 1 for solo) */
	int pool;        /* enum spark_pool */
	int loglevel;    /* SPARK_LOGLEVEL, --loglevel */

	char *broker_url; /* as given (may hold a password: print only via url_redact) */
	struct redis_url broker;
	char *result_backend; /* NULL when unset */
	struct redis_url backend;
	char *database_url; /* normalised for libpq, NULL when unset */

	long max_tasks_per_child; /* 0 = never */
	long max_memory_kib;      /* 0 = none */
	double time_limit;        /* hard, seconds, 0 = none */
	double soft_time_limit;   /* seconds, 0 = none */

	int max_retries;
	bool retry_backoff;
	double retry_backoff_max;
	double default_retry_delay;

	char *queues[SPARK_MAX_QUEUES];
	int nqueues;

	char *socket_path;
	char *log_dir;
	char *pid_file;
	char *encryption_key;    /* AUTOMAGIK_SPARK_ENCRYPTION_KEY, NULL when unset */
	double http_timeout;     /* AUTOMAGIK_SPARK_HTTP_TIMEOUT */
	int prefetch_multiplier; /* messages a process may hold: slots x this */
	double visibility_timeout;
	long log_lines;     /* sparkd's in-memory ring */
	long log_max_bytes; /* rotate the log file at this size */
	int log_keep;       /* rotated files kept */
	double start_timeout;
	double startsecs;          /* SPARK_STARTSECS: a process ready this long after its start is replaced at once */
	double heartbeat_interval; /* SPARK_HEARTBEAT_INTERVAL: workers table heartbeat, seconds */
	int db_pool_size;          /* SPARK_DB_POOL_SIZE: PostgreSQL connections per worker process */
	bool send_task_events;     /* CELERY_WORKER_SEND_TASK_EVENTS, --events/-E: task-* events on celeryev */
	long max_message_bytes;    /* SPARK_MAX_MESSAGE_BYTES: larger messages are dead-lettered undecoded */
	long deadletter_max;       /* SPARK_DEADLETTER_MAX: entries kept in spark:deadletter */
	int poison_deliveries;     /* SPARK_POISON_DELIVERIES: deaths in a row that make a message poison */

	char *env_file; /* the env file that was read, or NULL */
	bool concurrency_forced;
};

/* A value given on the command line, for the variable it sets. */
struct config_override {
	const char *var;  /* e.g. "SPARK_WORKERS" */
	const char *flag; /* e.g. "--workers", for messages */
	const char *value;
};

/*
 * Load and validate. env_file: a path given with --env-file, NULL to use $SPARK_ENV_FILE or ./.env when present,
 * or "" to read no env file. On error returns -1 with one line in err naming the variable, the value and what is
 * accepted (passwords never included).
 */
int config_load(struct spark_config *cfg, const struct config_override *ov, size_t nov, const char *env_file, char *err,
                size_t errlen);
void config_free(struct spark_config *cfg);

/* Resolve a single variable the same way (flag, env, env file, default) without validating the rest.
 * Returns a newly allocated string or NULL when unset. Used by sparkctl for the socket path. */
char *config_resolve(const char *var, const char *flag_value, const char *env_file, char *err, size_t errlen);

/*
 * The control socket for the commands that only talk to sparkd (status, logs, stop): the flag, else $SPARK_SOCKET,
 * else SPARK_SOCKET from the env file (chosen as config_load chooses it), else the default. Nothing else is read or
 * judged: an unreadable env file or a bad line in it is only a warning, left in warn ("" when none), and the good
 * lines still count. Never NULL; caller frees.
 */
char *config_socket_resolve(const char *flag_value, const char *env_file, char *warn, size_t warnlen);

/* The default control socket path for this user (DESIGN §4). Caller frees. */
char *config_default_socket(void);

/* Export every resolved value into this process's environment, so children read the same configuration. */
void config_export(const struct spark_config *cfg);

/*
 * Env-file parser: KEY=value, KEY = value, export KEY=value, 'single' and "double" quotes, # comments.
 * Calls cb for each pair. Returns 0, or -1 with "FILE:LINE: reason" (or the open error) in err.
 */
typedef void (*envfile_cb)(const char *key, const char *value, void *arg);
int envfile_parse(const char *path, envfile_cb cb, void *arg, char *err, size_t errlen);
int envfile_parse_buf(const char *name, const char *buf, envfile_cb cb, void *arg, char *err, size_t errlen);
/* The file's bytes (NUL-terminated; caller frees); its lines, and with lenient a bad line is skipped and counted
 * (returns the count) instead of failing (-1). */
int envfile_read(const char *path, char **out, char *err, size_t errlen);
/* The env file to read: env_file if given ("" = none), else $SPARK_ENV_FILE, else ./.env if it exists; *explicit
 * says whether it was named (a named file must exist). */
const char *envfile_pick(const char *env_file, bool *explicit);
int envfile_parse_lines(const char *name, const char *buf, bool lenient, envfile_cb cb, void *arg, char *err,
                        size_t errlen);

/* "200000" (KiB), "200MB", "1G", "512k" -> KiB. -1 on error. */
long parse_memory_kib(const char *s);

const char *pool_name(int pool);

#endif

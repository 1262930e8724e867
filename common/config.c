#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "log.h"
#include "rundir.h"
#include "util.h"

enum vtype {
	V_INT,
	V_LONG,
	V_DOUBLE,
	V_BOOL,
	V_STR,
	V_POOL,
	V_LEVEL,
	V_MEMORY,
	V_REDIS,
	V_REDIS_OPT,
	V_PGURL,
	V_QUEUES,
	V_JSONONLY,
	V_PATH,
	V_BYTES,
};

struct vdef {
	const char *name;
	const char *alias; /* AUTOMAGIK_SPARK_* name, or NULL */
	const char *def;   /* NULL = unset */
	enum vtype type;
	double min, max;
	size_t off; /* offsetof in struct spark_config, or (size_t)-1 */
};

#define OFF(f) offsetof(struct spark_config, f)
#define NOOFF  ((size_t)-1)

static const struct vdef vdefs[] = {
    {"SPARK_WORKERS", NULL, "1", V_INT, 1, 256, OFF(workers)},
    {"CELERY_WORKER_CONCURRENCY", NULL, "1", V_INT, 1, 4096, OFF(concurrency)},
    {"CELERY_WORKER_PREFETCH_MULTIPLIER", NULL, "1", V_INT, 1, 1000, OFF(prefetch_multiplier)},
    {"CELERY_WORKER_POOL", NULL, "prefork", V_POOL, 0, 0, OFF(pool)},
    {"SPARK_LOGLEVEL", "CELERY_WORKER_LOGLEVEL", "info", V_LEVEL, 0, 0, OFF(loglevel)},
    {"CELERY_BROKER_URL", "AUTOMAGIK_SPARK_CELERY_BROKER_URL", "redis://localhost:6379/0", V_REDIS, 0, 0,
     OFF(broker_url)},
    {"CELERY_RESULT_BACKEND", "AUTOMAGIK_SPARK_CELERY_RESULT_BACKEND", NULL, V_REDIS_OPT, 0, 0, OFF(result_backend)},
    {"DATABASE_URL", "AUTOMAGIK_SPARK_DATABASE_URL", NULL, V_PGURL, 0, 0, OFF(database_url)},
    {"CELERY_WORKER_MAX_TASKS_PER_CHILD", NULL, "100", V_LONG, 0, 1e9, OFF(max_tasks_per_child)},
    {"CELERY_WORKER_MAX_MEMORY_PER_CHILD", NULL, "200000", V_MEMORY, 0, 1e12, OFF(max_memory_kib)},
    {"CELERY_TASK_TIME_LIMIT", NULL, "300", V_DOUBLE, 0, 7 * 86400, OFF(time_limit)},
    {"CELERY_TASK_SOFT_TIME_LIMIT", NULL, "280", V_DOUBLE, 0, 7 * 86400, OFF(soft_time_limit)},
    {"CELERY_TASK_SERIALIZER", NULL, "json", V_JSONONLY, 0, 0, NOOFF},
    {"CELERY_RESULT_SERIALIZER", NULL, "json", V_JSONONLY, 0, 0, NOOFF},
    {"CELERY_TASK_MAX_RETRIES", NULL, "3", V_INT, 0, 1000, OFF(max_retries)},
    {"CELERY_TASK_RETRY_BACKOFF", NULL, "True", V_BOOL, 0, 0, OFF(retry_backoff)},
    {"CELERY_TASK_RETRY_BACKOFF_MAX", NULL, "120", V_DOUBLE, 0, 86400, OFF(retry_backoff_max)},
    {"CELERY_TASK_DEFAULT_RETRY_DELAY", NULL, "5", V_DOUBLE, 0, 86400, OFF(default_retry_delay)},
    /* automagik-spark's Celery app declares both task queues and its Python worker consumes both */
    {"SPARK_QUEUES", NULL, "celery,direct", V_QUEUES, 0, 0, NOOFF},
    {"SPARK_SOCKET", NULL, NULL, V_PATH, 0, 0, OFF(socket_path)},
    {"SPARK_LOG_DIR", NULL, NULL, V_PATH, 0, 0, OFF(log_dir)},
    {"SPARK_PID_FILE", NULL, NULL, V_PATH, 0, 0, OFF(pid_file)},
    {"AUTOMAGIK_SPARK_ENCRYPTION_KEY", NULL, NULL, V_STR, 0, 0, OFF(encryption_key)},
    {"AUTOMAGIK_SPARK_HTTP_TIMEOUT", NULL, "600", V_DOUBLE, 1, 3600, OFF(http_timeout)},
    {"SPARK_VISIBILITY_TIMEOUT", NULL, "3600", V_DOUBLE, 10, 30 * 86400, OFF(visibility_timeout)},
    {"SPARK_LOG_LINES", NULL, "10000", V_LONG, 100, 1000000, OFF(log_lines)},
    {"SPARK_LOG_MAX_BYTES", NULL, "10MB", V_MEMORY, 0, 1e9, OFF(log_max_bytes)},
    {"SPARK_LOG_KEEP", NULL, "5", V_INT, 0, 100, OFF(log_keep)},
    {"SPARK_START_TIMEOUT", NULL, "30", V_DOUBLE, 1, 3600, OFF(start_timeout)},
    {"SPARK_STARTSECS", NULL, "5", V_DOUBLE, 0, 3600, OFF(startsecs)},
    {"SPARK_HEARTBEAT_INTERVAL", NULL, "5", V_DOUBLE, 0.1, 3600, OFF(heartbeat_interval)},
    {"SPARK_DB_POOL_SIZE", NULL, "4", V_INT, 1, 64, OFF(db_pool_size)},
    {"CELERY_WORKER_SEND_TASK_EVENTS", NULL, "False", V_BOOL, 0, 0, OFF(send_task_events)},
    {"SPARK_MAX_MESSAGE_BYTES", NULL, "16MiB", V_BYTES, 1024, 512.0 * 1024 * 1024, OFF(max_message_bytes)},
    {"SPARK_DEADLETTER_MAX", NULL, "10000", V_LONG, 1, 10000000, OFF(deadletter_max)},
    {"SPARK_POISON_DELIVERIES", NULL, "3", V_INT, 1, 100, OFF(poison_deliveries)},
};
#define NVDEFS (sizeof vdefs / sizeof vdefs[0])

enum src { SRC_DEFAULT, SRC_FILE, SRC_ENV, SRC_FLAG };

struct resolved {
	char *value;
	enum src src;
	const char *flag;
	const char *from; /* name actually used (alias or plain) */
};

const char *
pool_name(int pool)
{
	switch (pool) {
	case SPARK_POOL_THREADS:
		return "threads";
	case SPARK_POOL_SOLO:
		return "solo";
	default:
		return "prefork";
	}
}

long
parse_memory_kib(const char *s)
{
	if (s == NULL || !isdigit((unsigned char)*s))
		return -1;
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno != 0 || v < 0)
		return -1;
	while (*end == ' ')
		end++;
	double mul;
	if (*end == '\0')
		mul = 1; /* bare number: KiB, as Celery */
	else if (!strcasecmp(end, "k") || !strcasecmp(end, "kb") || !strcasecmp(end, "kib"))
		mul = 1;
	else if (!strcasecmp(end, "m") || !strcasecmp(end, "mb") || !strcasecmp(end, "mib"))
		mul = 1024;
	else if (!strcasecmp(end, "g") || !strcasecmp(end, "gb") || !strcasecmp(end, "gib"))
		mul = 1024.0 * 1024;
	else if (!strcasecmp(end, "b"))
		mul = 1.0 / 1024;
	else
		return -1;
	double kib = v * mul;
	if (kib > 1e15)
		return -1;
	return (long)kib;
}

/* A size in bytes: a bare number (or one ending in b) is bytes, the variable's unit; with k/M/G it is read as
 * parse_memory_kib reads it. -1 on error. */
static long
parse_bytes(const char *s)
{
	if (s == NULL || !isdigit((unsigned char)*s))
		return -1;
	size_t digits = strspn(s, "0123456789");
	const char *unit = s + digits + strspn(s + digits, " ");
	if (*unit == '\0' || !strcasecmp(unit, "b")) {
		errno = 0;
		long n = strtol(s, NULL, 10);
		return errno == 0 ? n : -1;
	}
	if (*unit == '.') { /* a fraction of a byte means nothing; "1.5M" is fine */
		unit += 1 + strspn(unit + 1, "0123456789");
		unit += strspn(unit, " ");
		if (*unit == '\0' || !strcasecmp(unit, "b"))
			return -1;
	}
	long kib = parse_memory_kib(s);
	return kib < 0 || kib > LONG_MAX / 1024 ? -1 : kib * 1024;
}

/* ---- resolution ---- */

struct filevals {
	struct resolved r[NVDEFS];
};

static int
vdef_index(const char *key, const char **matched_alias)
{
	for (size_t i = 0; i < NVDEFS; i++) {
		if (strcmp(key, vdefs[i].name) == 0) {
			*matched_alias = NULL;
			return (int)i;
		}
		if (vdefs[i].alias && strcmp(key, vdefs[i].alias) == 0) {
			*matched_alias = vdefs[i].alias;
			return (int)i;
		}
	}
	return -1;
}

static void
file_cb(const char *key, const char *value, void *arg)
{
	struct filevals *fv = arg;
	const char *alias;
	int i = vdef_index(key, &alias);
	if (i < 0)
		return;
	/* the plain name wins over the alias, whatever the order in the file */
	if (alias != NULL && fv->r[i].value != NULL && fv->r[i].from == vdefs[i].name)
		return;
	free(fv->r[i].value);
	fv->r[i].value = xstrdup(value);
	fv->r[i].src = SRC_FILE;
	fv->r[i].from = alias ? alias : vdefs[i].name;
}

static int
resolve_all(struct resolved *r, const struct config_override *ov, size_t nov, const char *env_file, char **used_file,
            char *err, size_t errlen)
{
	struct filevals fv;
	memset(&fv, 0, sizeof fv);
	bool explicit;
	const char *path = envfile_pick(env_file, &explicit);
	*used_file = NULL;
	if (path != NULL) {
		if (envfile_parse(path, file_cb, &fv, err, errlen) < 0) {
			for (size_t i = 0; i < NVDEFS; i++)
				free(fv.r[i].value);
			return -1;
		}
		*used_file = xstrdup(path);
	}
	for (size_t i = 0; i < NVDEFS; i++) {
		const struct vdef *d = &vdefs[i];
		r[i] = (struct resolved){NULL, SRC_DEFAULT, NULL, d->name};
		const char *v;
		if ((v = getenv(d->name)) != NULL) {
			r[i].value = xstrdup(v);
			r[i].src = SRC_ENV;
		} else if (d->alias && (v = getenv(d->alias)) != NULL) {
			r[i].value = xstrdup(v);
			r[i].src = SRC_ENV;
			r[i].from = d->alias;
		} else if (fv.r[i].value != NULL) {
			r[i] = fv.r[i];
			fv.r[i].value = NULL;
		} else if (d->def != NULL) {
			r[i].value = xstrdup(d->def);
		}
		free(fv.r[i].value);
	}
	for (size_t k = 0; k < nov; k++) {
		const char *alias;
		int i = vdef_index(ov[k].var, &alias);
		if (i < 0 || ov[k].value == NULL)
			continue;
		free(r[i].value);
		r[i].value = xstrdup(ov[k].value);
		r[i].src = SRC_FLAG;
		r[i].flag = ov[k].flag;
		r[i].from = vdefs[i].name;
	}
	return 0;
}

static void
bad(char *err, size_t errlen, const struct vdef *d, const struct resolved *r, const char *accepted)
{
	static const char *srcname[] = {"default", "env file", "environment", "command line"};
	const char *shown = r->value ? r->value : "";
	char *redacted = NULL;
	if (d->type == V_REDIS || d->type == V_REDIS_OPT || d->type == V_PGURL) {
		redacted = url_redact(shown);
		shown = redacted;
	}
	if (r->src == SRC_FLAG && r->flag)
		snprintf(err, errlen, "invalid value '%s' for %s (%s): %s", shown, r->flag, d->name, accepted);
	else
		snprintf(err, errlen, "invalid %s=%s (from the %s): %s", r->from, shown, srcname[r->src], accepted);
	free(redacted);
}

static int
convert(struct spark_config *cfg, const struct vdef *d, const struct resolved *r, char *err, size_t errlen)
{
	char acc[256];
	void *field = d->off == NOOFF ? NULL : (char *)cfg + d->off;
	const char *v = r->value;
	switch (d->type) {
	case V_INT:
	case V_LONG: {
		long n;
		if (parse_long(v, &n) < 0 || n < (long)d->min || n > (long)d->max) {
			snprintf(acc, sizeof acc, "expected a whole number from %.0f to %.0f", d->min, d->max);
			bad(err, errlen, d, r, acc);
			return -1;
		}
		if (d->type == V_INT)
			*(int *)field = (int)n;
		else
			*(long *)field = n;
		return 0;
	}
	case V_DOUBLE: {
		double x;
		if (parse_double(v, &x) < 0 || x < d->min || x > d->max) {
			snprintf(acc, sizeof acc, "expected a number of seconds from %g to %g", d->min, d->max);
			bad(err, errlen, d, r, acc);
			return -1;
		}
		*(double *)field = x;
		return 0;
	}
	case V_BOOL:
		if (parse_bool(v, (bool *)field) < 0) {
			bad(err, errlen, d, r, "expected True or False (also yes/no, on/off, 1/0)");
			return -1;
		}
		return 0;
	case V_MEMORY: {
		long kib = parse_memory_kib(v);
		if (kib < 0 || kib > (long)d->max) {
			bad(err, errlen, d, r,
			    d->off == OFF(log_max_bytes) ? "expected a size such as 10MB, 1G or a number of KiB"
			                                 : "expected KiB as a whole number (Celery's unit, 0 = no "
			                                   "limit) or a size such as 200MB or 1G");
			return -1;
		}
		/* SPARK_LOG_MAX_BYTES is stored in bytes */
		if (d->off == OFF(log_max_bytes))
			kib *= 1024;
		*(long *)field = kib;
		return 0;
	}
	case V_BYTES: {
		long n = parse_bytes(v);
		if (n < (long)d->min || n > (long)d->max) {
			snprintf(acc, sizeof acc, "expected a size from %.0f bytes to %.0f MiB, such as 16MiB or 65536",
			         d->min, d->max / (1024 * 1024));
			bad(err, errlen, d, r, acc);
			return -1;
		}
		*(long *)field = n;
		return 0;
	}
	case V_POOL:
		if (!strcmp(v, "prefork"))
			cfg->pool = SPARK_POOL_PREFORK;
		else if (!strcmp(v, "threads"))
			cfg->pool = SPARK_POOL_THREADS;
		else if (!strcmp(v, "solo"))
			cfg->pool = SPARK_POOL_SOLO;
		else {
			bad(err, errlen, d, r, "accepted pools are prefork, threads, solo");
			return -1;
		}
		return 0;
	case V_LEVEL: {
		int l = log_level_parse(v);
		if (l < 0) {
			bad(err, errlen, d, r, "accepted levels are debug, info, warning, error, critical");
			return -1;
		}
		cfg->loglevel = l;
		return 0;
	}
	case V_REDIS:
	case V_REDIS_OPT: {
		if (d->type == V_REDIS_OPT && (v == NULL || *v == '\0'))
			return 0;
		struct redis_url *u = d->off == OFF(broker_url) ? &cfg->broker : &cfg->backend;
		char why[200];
		if (redis_url_parse(v, u, why, sizeof why) < 0) {
			bad(err, errlen, d, r, why);
			return -1;
		}
		*(char **)field = xstrdup(v);
		return 0;
	}
	case V_PGURL:
		if (v == NULL || *v == '\0')
			return 0;
		if (strncmp(v, "postgresql", 10) != 0 && strncmp(v, "postgres://", 11) != 0 &&
		    strncmp(v, "postgres+", 9) != 0) {
			bad(err, errlen, d, r, "expected postgresql://user:password@host:port/dbname");
			return -1;
		}
		cfg->database_url = pg_url_normalize(v);
		return 0;
	case V_QUEUES: {
		char *copy = xstrdup(v ? v : "");
		char *save = NULL;
		for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
			t = str_trim(t);
			if (*t == '\0')
				continue;
			bool ok = strlen(t) <= 200;
			for (char *c = t; *c; c++)
				if ((unsigned char)*c < 0x21 || *c == 0x7f)
					ok = false;
			if (!ok || cfg->nqueues >= SPARK_MAX_QUEUES) {
				free(copy);
				bad(err, errlen, d, r,
				    "expected up to 32 comma-separated queue names without spaces or control "
				    "characters");
				return -1;
			}
			cfg->queues[cfg->nqueues++] = xstrdup(t);
		}
		free(copy);
		if (cfg->nqueues == 0) {
			bad(err, errlen, d, r, "expected at least one queue name, e.g. celery");
			return -1;
		}
		return 0;
	}
	case V_JSONONLY:
		if (strcasecmp(v, "json") != 0) {
			bad(err, errlen, d, r, "only json is supported");
			return -1;
		}
		return 0;
	case V_STR:
	case V_PATH:
		if (v == NULL || *v == '\0')
			return 0;
		if (d->type == V_PATH && strlen(v) >= 4096) {
			bad(err, errlen, d, r, "path too long");
			return -1;
		}
		*(char **)field = xstrdup(v);
		return 0;
	}
	return 0;
}

static char *
default_log_dir(void)
{
	const char *l = getenv("LOGS_DIRECTORY");
	if (l != NULL && *l)
		return xasprintf("%.*s", (int)strcspn(l, ":"), l);
	if (geteuid() == 0)
		return xstrdup("/var/log/spark");
	const char *s = getenv("XDG_STATE_HOME");
	if (s != NULL && *s == '/')
		return xasprintf("%s/spark", s);
	const char *h = getenv("HOME");
	if (h != NULL && *h == '/')
		return xasprintf("%s/.local/state/spark", h);
	char *fb = rundir_fallback();
	char *p = xasprintf("%s/log", fb);
	free(fb);
	return p;
}

int
config_load(struct spark_config *cfg, const struct config_override *ov, size_t nov, const char *env_file, char *err,
            size_t errlen)
{
	memset(cfg, 0, sizeof *cfg);
	struct resolved r[NVDEFS];
	if (resolve_all(r, ov, nov, env_file, &cfg->env_file, err, errlen) < 0)
		return -1;
	int rc = 0;
	size_t soft_i = 0, hard_i = 0, conc_i = 0;
	for (size_t i = 0; i < NVDEFS; i++) {
		if (!strcmp(vdefs[i].name, "CELERY_TASK_SOFT_TIME_LIMIT"))
			soft_i = i;
		if (!strcmp(vdefs[i].name, "CELERY_TASK_TIME_LIMIT"))
			hard_i = i;
		if (!strcmp(vdefs[i].name, "CELERY_WORKER_CONCURRENCY"))
			conc_i = i;
		if (rc == 0 && convert(cfg, &vdefs[i], &r[i], err, errlen) < 0)
			rc = -1;
	}
	if (rc == 0 && cfg->time_limit > 0 && cfg->soft_time_limit > cfg->time_limit) {
		if (r[soft_i].src == SRC_DEFAULT) {
			/* only the hard limit was lowered: keep the soft one just under it */
			cfg->soft_time_limit = cfg->time_limit;
		} else {
			snprintf(err, errlen,
			         "invalid CELERY_TASK_SOFT_TIME_LIMIT=%g: the soft limit must not exceed "
			         "CELERY_TASK_TIME_LIMIT=%g (set it lower, or 0 for none)",
			         cfg->soft_time_limit, cfg->time_limit);
			rc = -1;
		}
	}
	(void)hard_i;
	if (rc == 0 && cfg->pool == SPARK_POOL_SOLO && cfg->concurrency != 1) {
		cfg->concurrency_forced = r[conc_i].src != SRC_DEFAULT;
		cfg->concurrency = 1;
	}
	if (rc == 0) {
		if (cfg->socket_path == NULL)
			cfg->socket_path = config_default_socket();
		if (cfg->log_dir == NULL)
			cfg->log_dir = default_log_dir();
		if (cfg->pid_file == NULL) {
			const char *slash = strrchr(cfg->socket_path, '/');
			if (slash == NULL)
				cfg->pid_file = xstrdup("sparkd.pid");
			else
				cfg->pid_file =
				    xasprintf("%.*s/sparkd.pid", (int)(slash - cfg->socket_path), cfg->socket_path);
		}
	}
	for (size_t i = 0; i < NVDEFS; i++)
		free(r[i].value);
	if (rc < 0)
		config_free(cfg);
	return rc;
}

void
config_free(struct spark_config *cfg)
{
	free(cfg->broker_url);
	redis_url_free(&cfg->broker);
	free(cfg->result_backend);
	redis_url_free(&cfg->backend);
	free(cfg->database_url);
	for (int i = 0; i < cfg->nqueues; i++)
		free(cfg->queues[i]);
	free(cfg->socket_path);
	free(cfg->log_dir);
	free(cfg->pid_file);
	free(cfg->encryption_key);
	free(cfg->env_file);
	memset(cfg, 0, sizeof *cfg);
}

char *
config_resolve(const char *var, const char *flag_value, const char *env_file, char *err, size_t errlen)
{
	if (flag_value != NULL)
		return xstrdup(flag_value);
	struct resolved r[NVDEFS];
	char *used = NULL;
	if (resolve_all(r, NULL, 0, env_file, &used, err, errlen) < 0)
		return NULL;
	free(used);
	char *out = NULL;
	for (size_t i = 0; i < NVDEFS; i++) {
		if (!strcmp(vdefs[i].name, var) && r[i].value != NULL && r[i].value[0] != '\0')
			out = xstrdup(r[i].value);
		free(r[i].value);
	}
	return out;
}

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

/* ---- env file ---- */

static int
envfile_line(char *line, const char *name, int lineno, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	char *p = str_trim(line);
	if (*p == '\0' || *p == '#')
		return 0;
	if (strncmp(p, "export", 6) == 0 && isspace((unsigned char)p[6]))
		p = str_trim(p + 6);
	char *eq = strchr(p, '=');
	if (eq == NULL) {
		snprintf(err, errlen, "%s:%d: expected KEY=value", name, lineno);
		return -1;
	}
	*eq = '\0';
	char *key = str_trim(p);
	if (*key == '\0') {
		snprintf(err, errlen, "%s:%d: empty variable name", name, lineno);
		return -1;
	}
	for (char *k = key; *k; k++) {
		if (!isalnum((unsigned char)*k) && *k != '_') {
			snprintf(err, errlen, "%s:%d: bad variable name '%s' (letters, digits and _ only)", name,
			         lineno, key);
			return -1;
		}
	}
	char *v = str_trim(eq + 1);
	if (*v == '"' || *v == '\'') {
		char q = *v++;
		char *out = v, *in = v;
		while (*in && *in != q) {
			if (q == '"' && *in == '\\' && in[1] != '\0') {
				in++;
				*out++ = *in == 'n' ? '\n' : *in;
				in++;
			} else
				*out++ = *in++;
		}
		if (*in != q) {
			snprintf(err, errlen, "%s:%d: unterminated quote in the value of %s", name, lineno, key);
			return -1;
		}
		*out = '\0';
		char *rest = str_trim(in + 1);
		if (*rest != '\0' && *rest != '#') {
			snprintf(err, errlen, "%s:%d: text after the closing quote in %s", name, lineno, key);
			return -1;
		}
	} else {
		/* unquoted: an inline comment starts at " #" */
		for (char *c = v; *c; c++) {
			if (*c == '#' && (c == v || isspace((unsigned char)c[-1]))) {
				*c = '\0';
				break;
			}
		}
		v = str_trim(v);
	}
	cb(key, v, arg);
	return 0;
}

/* Strict: the first bad line ends the parse with -1. Lenient: bad lines are skipped, the first one's reason is kept
 * in err, and the number of bad lines is returned. */
static int
envfile_parse_lines(const char *name, const char *buf, bool lenient, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	char *copy = xstrdup(buf);
	int lineno = 0, nbad = 0;
	char *s = copy;
	for (;;) {
		char *nl = strchr(s, '\n');
		if (nl)
			*nl = '\0';
		lineno++;
		char lerr[512];
		if (envfile_line(s, name, lineno, cb, arg, lerr, sizeof lerr) < 0) {
			if (nbad++ == 0)
				snprintf(err, errlen, "%s", lerr);
			if (!lenient)
				break;
		}
		if (!nl)
			break;
		s = nl + 1;
	}
	free(copy);
	return lenient ? nbad : (nbad ? -1 : 0);
}

int
envfile_parse_buf(const char *name, const char *buf, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	return envfile_parse_lines(name, buf, false, cb, arg, err, errlen);
}

/* The whole file, NUL-terminated, in *out (caller frees); -1 with the reason in err. */
static int
envfile_read(const char *path, char **out, char *err, size_t errlen)
{
	FILE *f = fopen(path, "re");
	if (f == NULL) {
		snprintf(err, errlen, "cannot read env file %s: %s", path, strerror(errno));
		return -1;
	}
	size_t cap = 4096, len = 0;
	char *buf = xmalloc(cap);
	size_t n;
	while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
		len += n;
		if (len > 4 * 1024 * 1024) {
			snprintf(err, errlen, "env file %s is larger than 4 MiB", path);
			fclose(f);
			free(buf);
			return -1;
		}
		if (cap - len - 1 == 0)
			buf = xrealloc(buf, cap *= 2);
	}
	int rerr = ferror(f);
	fclose(f);
	if (rerr) {
		snprintf(err, errlen, "cannot read env file %s: read error", path);
		free(buf);
		return -1;
	}
	buf[len] = '\0';
	if (memchr(buf, '\0', len) != NULL) {
		snprintf(err, errlen, "env file %s contains NUL bytes", path);
		free(buf);
		return -1;
	}
	*out = buf;
	return 0;
}

int
envfile_parse(const char *path, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	char *buf;
	if (envfile_read(path, &buf, err, errlen) < 0)
		return -1;
	int rc = envfile_parse_buf(path, buf, cb, arg, err, errlen);
	free(buf);
	return rc;
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

static const char *
pick_env_file(const char *env_file, bool *explicit)
{
	*explicit = true;
	if (env_file != NULL)
		return env_file[0] ? env_file : NULL;
	const char *e = getenv("SPARK_ENV_FILE");
	if (e != NULL)
		return e[0] ? e : NULL;
	*explicit = false;
	if (access(".env", F_OK) == 0)
		return ".env";
	return NULL;
}

static int
resolve_all(struct resolved *r, const struct config_override *ov, size_t nov, const char *env_file, char **used_file,
            char *err, size_t errlen)
{
	struct filevals fv;
	memset(&fv, 0, sizeof fv);
	bool explicit;
	const char *path = pick_env_file(env_file, &explicit);
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

char *
config_default_socket(void)
{
	const char *rt = getenv("RUNTIME_DIRECTORY");
	if (rt != NULL && *rt) {
		/* systemd may list several, colon-separated: the first is ours */
		size_t n = strcspn(rt, ":");
		return xasprintf("%.*s/sparkd.sock", (int)n, rt);
	}
	if (geteuid() == 0)
		return xstrdup("/run/spark/sparkd.sock");
	const char *x = getenv("XDG_RUNTIME_DIR");
	if (x != NULL && *x == '/')
		return xasprintf("%s/spark/sparkd.sock", x);
	char *fb = rundir_fallback();
	char *p = xasprintf("%s/sparkd.sock", fb);
	free(fb);
	return p;
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

static void
socket_cb(const char *key, const char *value, void *arg)
{
	char **out = arg;
	if (strcmp(key, "SPARK_SOCKET") == 0) {
		free(*out);
		*out = xstrdup(value);
	}
}

char *
config_socket_resolve(const char *flag_value, const char *env_file, char *warn, size_t warnlen)
{
	if (warnlen > 0)
		warn[0] = '\0';
	if (flag_value != NULL && flag_value[0] != '\0')
		return xstrdup(flag_value);
	const char *v = getenv("SPARK_SOCKET");
	char *found = NULL;
	if (v != NULL) {
		/* the environment wins over the file: the file is not even opened */
		if (v[0] != '\0')
			return xstrdup(v);
	} else {
		bool explicit;
		const char *path = pick_env_file(env_file, &explicit);
		char *buf = NULL;
		if (path != NULL && envfile_read(path, &buf, warn, warnlen) == 0) {
			int nbad = envfile_parse_lines(path, buf, true, socket_cb, &found, warn, warnlen);
			size_t used = strlen(warn);
			if (nbad > 1 && used < warnlen)
				snprintf(warn + used, warnlen - used, " (and %d more bad line%s)", nbad - 1,
				         nbad == 2 ? "" : "s");
		}
		free(buf);
	}
	if (found != NULL && found[0] != '\0')
		return found;
	free(found);
	return config_default_socket();
}

static void
setenv_num(const char *name, double v)
{
	char buf[64];
	snprintf(buf, sizeof buf, "%.17g", v);
	setenv(name, buf, 1);
}

void
config_export(const struct spark_config *cfg)
{
	setenv_num("SPARK_WORKERS", cfg->workers);
	setenv_num("CELERY_WORKER_CONCURRENCY", cfg->concurrency);
	setenv_num("CELERY_WORKER_PREFETCH_MULTIPLIER", cfg->prefetch_multiplier);
	setenv("CELERY_WORKER_POOL", pool_name(cfg->pool), 1);
	setenv("SPARK_LOGLEVEL", log_level_name(cfg->loglevel), 1);
	setenv("CELERY_BROKER_URL", cfg->broker_url, 1);
	if (cfg->result_backend)
		setenv("CELERY_RESULT_BACKEND", cfg->result_backend, 1);
	else
		unsetenv("CELERY_RESULT_BACKEND");
	unsetenv("AUTOMAGIK_SPARK_CELERY_RESULT_BACKEND");
	if (cfg->database_url)
		setenv("DATABASE_URL", cfg->database_url, 1);
	else
		unsetenv("DATABASE_URL");
	unsetenv("AUTOMAGIK_SPARK_DATABASE_URL");
	setenv_num("CELERY_WORKER_MAX_TASKS_PER_CHILD", (double)cfg->max_tasks_per_child);
	setenv_num("CELERY_WORKER_MAX_MEMORY_PER_CHILD", (double)cfg->max_memory_kib);
	setenv_num("CELERY_TASK_TIME_LIMIT", cfg->time_limit);
	setenv_num("CELERY_TASK_SOFT_TIME_LIMIT", cfg->soft_time_limit);
	setenv_num("CELERY_TASK_MAX_RETRIES", cfg->max_retries);
	setenv("CELERY_TASK_RETRY_BACKOFF", cfg->retry_backoff ? "True" : "False", 1);
	setenv("CELERY_WORKER_SEND_TASK_EVENTS", cfg->send_task_events ? "True" : "False", 1);
	setenv_num("CELERY_TASK_RETRY_BACKOFF_MAX", cfg->retry_backoff_max);
	setenv_num("CELERY_TASK_DEFAULT_RETRY_DELAY", cfg->default_retry_delay);
	char q[SPARK_MAX_QUEUES * 210] = "";
	for (int i = 0; i < cfg->nqueues; i++) {
		if (i)
			strcat(q, ",");
		strcat(q, cfg->queues[i]);
	}
	setenv("SPARK_QUEUES", q, 1);
	setenv("SPARK_SOCKET", cfg->socket_path, 1);
	setenv("SPARK_LOG_DIR", cfg->log_dir, 1);
	setenv("SPARK_PID_FILE", cfg->pid_file, 1);
	if (cfg->encryption_key)
		setenv("AUTOMAGIK_SPARK_ENCRYPTION_KEY", cfg->encryption_key, 1);
	setenv_num("AUTOMAGIK_SPARK_HTTP_TIMEOUT", cfg->http_timeout);
	setenv_num("SPARK_VISIBILITY_TIMEOUT", cfg->visibility_timeout);
	setenv_num("SPARK_LOG_LINES", (double)cfg->log_lines);
	char lb[32];
	snprintf(lb, sizeof lb, "%ldb", cfg->log_max_bytes);
	setenv("SPARK_LOG_MAX_BYTES", lb, 1);
	setenv_num("SPARK_LOG_KEEP", cfg->log_keep);
	setenv_num("SPARK_START_TIMEOUT", cfg->start_timeout);
	setenv_num("SPARK_STARTSECS", cfg->startsecs);
	setenv_num("SPARK_HEARTBEAT_INTERVAL", cfg->heartbeat_interval);
	setenv_num("SPARK_DB_POOL_SIZE", cfg->db_pool_size);
	setenv_num("SPARK_MAX_MESSAGE_BYTES", (double)cfg->max_message_bytes);
	setenv_num("SPARK_DEADLETTER_MAX", (double)cfg->deadletter_max);
	setenv_num("SPARK_POISON_DELIVERIES", cfg->poison_deliveries);
	/* children read exactly this environment, never an env file of their own */
	setenv("SPARK_ENV_FILE", "", 1);
}

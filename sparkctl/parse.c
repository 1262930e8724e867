/*
 * The token parser under the command table: options as --name, --name=value, --name value, -x, -x value, -xVALUE.
 * Values are checked here so that every handler sees only well-formed input and every usage error is one line.
 */
#include "sparkctl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "log.h"
#include "util.h"

static const struct ctl_optspec optspecs[] = {
    {OPT_SOCKET, "--socket", 0, OPTV_STRING, "PATH",
     "control socket (default: $SPARK_SOCKET, then the per-user default)"},
    {OPT_HELP, "--help", 'h', OPTV_NONE, NULL, "show this help"},
    {OPT_VERSION, "--version", 0, OPTV_NONE, NULL, "show the version"},
    {OPT_WORKERS, "--workers", 0, OPTV_STRING, "N", "worker count (SPARK_WORKERS, default 1)"},
    {OPT_CONCURRENCY, "--concurrency", 0, OPTV_STRING, "N", "tasks per worker (CELERY_WORKER_CONCURRENCY, default 1)"},
    {OPT_POOL, "--pool", 0, OPTV_STRING, "prefork|threads|solo", "pool (CELERY_WORKER_POOL, default prefork)"},
    {OPT_LOGLEVEL, "--loglevel", 0, OPTV_STRING, "LEVEL", "debug, info, warning, error (SPARK_LOGLEVEL, default info)"},
    {OPT_QUEUES, "--queues", 0, OPTV_STRING, "a,b",
     "queues to consume, comma separated (SPARK_QUEUES, default celery)"},
    {OPT_ENV_FILE, "--env-file", 0, OPTV_STRING, "FILE",
     "read configuration from FILE (default $SPARK_ENV_FILE, else ./.env)"},
    {OPT_FOREGROUND, "--foreground", 0, OPTV_NONE, NULL, "run the supervisor in this terminal instead of daemonizing"},
    {OPT_VERBOSE, "--verbose", 0, OPTV_NONE, NULL, "add processes, active tasks, restarts, limits and queues"},
    {OPT_JSON, "--json", 0, OPTV_NONE, NULL, "machine-readable JSON"},
    {OPT_FORCE, "--force", 0, OPTV_NONE, NULL, "cold stop now: running tasks are interrupted and go back to the queue"},
    {OPT_TIMEOUT, "--timeout", 0, OPTV_SECONDS, "SECONDS",
     "escalate to a cold stop after SECONDS (default: hard time limit + 10)"},
    {OPT_FOLLOW, "--follow", 'f', OPTV_NONE, NULL, "keep printing new lines until interrupted"},
    {OPT_LEVEL, "--level", 0, OPTV_LEVEL, "LEVEL", "only this level and above: debug, info, warning, error, critical"},
    {OPT_LINES, "--lines", 'n', OPTV_COUNT, "N", "how many past lines (default 100)"},
    {OPT_WORKER, "--worker", 0, OPTV_STRING, "NAME", "only this worker (e.g. celery-1@host)"},
    {OPT_EVENTS, "--events", 'E', OPTV_NONE, NULL, "send task events (CELERY_WORKER_SEND_TASK_EVENTS, default off)"},
};

/* Bounds that keep numbers sane on the wire (int32 for lines, a week for timeouts). */
#define CTL_MAX_COUNT   2147483647L
#define CTL_MAX_SECONDS (7.0 * 86400.0)

const struct ctl_optspec *
ctl_optspec_get(enum ctl_optid id)
{
	for (size_t i = 0; i < sizeof optspecs / sizeof optspecs[0]; i++)
		if (optspecs[i].id == id)
			return &optspecs[i];
	return NULL;
}

const struct ctl_optspec *
ctl_optspec_find(const char *name, char shortname)
{
	for (size_t i = 0; i < sizeof optspecs / sizeof optspecs[0]; i++) {
		if (name != NULL && strcmp(optspecs[i].name, name) == 0)
			return &optspecs[i];
		if (name == NULL && shortname != 0 && optspecs[i].shortname == shortname)
			return &optspecs[i];
	}
	return NULL;
}

const char *
ctl_basename(const char *path)
{
	const char *s = strrchr(path, '/');
	return s != NULL ? s + 1 : path;
}

/* "--verbose, --json, --socket PATH, --help": what a command accepts, for its usage errors. */
void
ctl_args_accepted(const enum ctl_optid *allowed, size_t nallowed, char *buf, size_t len)
{
	size_t off = 0;
	if (len == 0)
		return;
	buf[0] = '\0';
	for (size_t i = 0; i < nallowed && off < len; i++) {
		const struct ctl_optspec *s = ctl_optspec_get(allowed[i]);
		if (s == NULL)
			continue;
		int n = snprintf(buf + off, len - off, "%s%s%s%s", i ? ", " : "", s->name, s->metavar ? " " : "",
		                 s->metavar ? s->metavar : "");
		if (n < 0)
			break;
		off += (size_t)n;
	}
}

static const char *
optval_expect(enum ctl_optval v)
{
	switch (v) {
	case OPTV_COUNT:
		return "a whole number >= 0";
	case OPTV_SECONDS:
		return "a number of seconds > 0";
	case OPTV_LEVEL:
		return "one of debug, info, warning, error, critical";
	default:
		return "a value";
	}
}

/* A following token is a value unless it looks like another option; "-3" is a (bad) value, not an option, so that
 * the message names the real problem. */
static bool
looks_like_option(const char *s)
{
	if (s[0] != '-' || s[1] == '\0')
		return false;
	if ((s[1] >= '0' && s[1] <= '9') || s[1] == '.')
		return false;
	return true;
}

static int
check_value(struct ctl_args *a, const struct ctl_optspec *s, const char *v, char *err, size_t errlen)
{
	long l;
	double d;
	switch (s->val) {
	case OPTV_NONE:
		break;
	case OPTV_STRING:
		a->str[s->id] = v;
		break;
	case OPTV_COUNT:
		if (parse_long(v, &l) < 0 || l < 0 || l > CTL_MAX_COUNT) {
			snprintf(err, errlen, "%s needs %s, got '%s'", s->name, optval_expect(s->val), v);
			return -1;
		}
		a->str[s->id] = v;
		a->num[s->id] = (double)l;
		break;
	case OPTV_SECONDS:
		if (parse_double(v, &d) < 0 || !isfinite(d) || d <= 0 || d > CTL_MAX_SECONDS) {
			snprintf(err, errlen, "%s needs %s, got '%s'", s->name, optval_expect(s->val), v);
			return -1;
		}
		a->str[s->id] = v;
		a->num[s->id] = d;
		break;
	case OPTV_LEVEL: {
		int lv = log_level_parse(v);
		if (lv < 0) {
			snprintf(err, errlen, "%s needs %s, got '%s'", s->name, optval_expect(s->val), v);
			return -1;
		}
		a->str[s->id] = v;
		a->level = lv;
		break;
	}
	}
	a->set[s->id] = true;
	return 0;
}

static bool
is_allowed(const enum ctl_optid *allowed, size_t nallowed, enum ctl_optid id)
{
	for (size_t i = 0; i < nallowed; i++)
		if (allowed[i] == id)
			return true;
	return false;
}

/*
 * Parse argv[0..argc) against the options a command allows. Returns 0, or -1 with one line in err (no program
 * name: the caller adds it). --help stops parsing at once so that `cmd --bad --help` still helps.
 */
int
ctl_args_parse(struct ctl_args *a, const enum ctl_optid *allowed, size_t nallowed, int argc, char **argv, char *err,
               size_t errlen)
{
	char accepted[512];
	for (int i = 0; i < argc; i++) {
		const char *tok = argv[i];
		const struct ctl_optspec *s = NULL;
		const char *inline_val = NULL;
		char name[64];

		if (tok[0] == '-' && tok[1] == '-' && tok[2] != '\0') {
			const char *eq = strchr(tok, '=');
			size_t n = eq ? (size_t)(eq - tok) : strlen(tok);
			if (n < sizeof name) {
				memcpy(name, tok, n);
				name[n] = '\0';
				s = ctl_optspec_find(name, 0);
			}
			if (eq != NULL)
				inline_val = eq + 1;
		} else if (tok[0] == '-' && tok[1] != '\0' && tok[1] != '-') {
			s = ctl_optspec_find(NULL, tok[1]);
			if (tok[2] != '\0') {
				/* -n5 carries its value; -fx is not a thing here */
				if (s != NULL && s->val == OPTV_NONE)
					s = NULL;
				else
					inline_val = tok + 2;
			}
		} else {
			ctl_args_accepted(allowed, nallowed, accepted, sizeof accepted);
			snprintf(err, errlen, "unexpected argument '%s' (accepted: %s)", tok, accepted);
			return -1;
		}

		if (s == NULL || !is_allowed(allowed, nallowed, s->id)) {
			ctl_args_accepted(allowed, nallowed, accepted, sizeof accepted);
			snprintf(err, errlen, "unknown option '%s' (accepted: %s)", tok, accepted);
			return -1;
		}
		if (s->id == OPT_HELP) {
			a->set[OPT_HELP] = true;
			return 0;
		}
		if (s->val == OPTV_NONE) {
			if (inline_val != NULL) {
				snprintf(err, errlen, "%s takes no value, got '%s'", s->name, inline_val);
				return -1;
			}
			a->set[s->id] = true;
			continue;
		}
		const char *v = inline_val;
		if (v == NULL) {
			if (i + 1 >= argc || looks_like_option(argv[i + 1])) {
				if (s->val == OPTV_STRING)
					snprintf(err, errlen, "%s needs a value (%s)", s->name, s->metavar);
				else
					snprintf(err, errlen, "%s needs a value: %s, %s", s->name, s->metavar,
					         optval_expect(s->val));
				return -1;
			}
			v = argv[++i];
		}
		if (check_value(a, s, v, err, errlen) < 0)
			return -1;
	}
	return 0;
}

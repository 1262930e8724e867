/*
 * sparkctl: the table of commands and the dispatch on argv[0]. Called `automagik-spark`, the same binary takes the
 * workers guide's grammar (`automagik-spark workers start --workers 4`).
 */
#include "sparkctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

#define ALWAYS OPT_SOCKET, OPT_HELP, OPT_VERSION

static const enum ctl_optid start_opts[] = {OPT_WORKERS,  OPT_CONCURRENCY, OPT_POOL,   OPT_LOGLEVEL, OPT_QUEUES,
                                            OPT_ENV_FILE, OPT_FOREGROUND,  OPT_EVENTS, ALWAYS};
static const enum ctl_optid status_opts[] = {OPT_VERBOSE, OPT_JSON, ALWAYS};
static const enum ctl_optid stop_opts[] = {OPT_FORCE, OPT_TIMEOUT, ALWAYS};
static const enum ctl_optid logs_opts[] = {OPT_FOLLOW, OPT_LEVEL, OPT_LINES, OPT_WORKER, OPT_JSON, ALWAYS};
static const enum ctl_optid migrate_opts[] = {OPT_ENV_FILE, ALWAYS};
static const enum ctl_optid global_opts[] = {ALWAYS};

#define NOPTS(a) (sizeof(a) / sizeof((a)[0]))

struct ctl_command {
	const char *group; /* NULL, or "db" for `db migrate` */
	const char *name;
	int (*handler)(struct ctl *, const struct ctl_args *);
	const enum ctl_optid *opts;
	size_t nopts;
	const char *summary;
	bool socket_only; /* talks only to sparkd: reads the socket path and nothing else (DESIGN §3) */
};

static const struct ctl_command commands[] = {
    {NULL, "start", cmd_start, start_opts, NOPTS(start_opts),
     "start sparkd and its workers; returns once every worker is ready (stays in the foreground under "
     "supervisord or as a container's main process)",
     false},
    {NULL, "status", cmd_status, status_opts, NOPTS(status_opts), "show each worker's state and counters", true},
    {NULL, "stop", cmd_stop, stop_opts, NOPTS(stop_opts),
     "stop gracefully: in-flight tasks finish, prefetched ones go back to the queue", true},
    {NULL, "logs", cmd_logs, logs_opts, NOPTS(logs_opts), "show the workers' recent log lines, merged in time order",
     true},
    {"db", "migrate", cmd_db_migrate, migrate_opts, NOPTS(migrate_opts),
     "create or upgrade the PostgreSQL schema (runs spark-worker --migrate)", false},
};

#define NCOMMANDS (sizeof commands / sizeof commands[0])

/* The words before a command's options: "sparkctl", "automagik-spark workers", "automagik-spark db". */
static void
cmd_prefix(const struct ctl *ctl, const struct ctl_command *c, char *buf, size_t len)
{
	if (c->group != NULL)
		snprintf(buf, len, "%s %s %s", ctl->prog, c->group, c->name);
	else if (ctl->guide_grammar)
		snprintf(buf, len, "%s workers %s", ctl->prog, c->name);
	else
		snprintf(buf, len, "%s %s", ctl->prog, c->name);
}

/* "[--verbose] [--json]": a command's own options, globals left to the general help. */
static void
cmd_synopsis(const struct ctl_command *c, char *buf, size_t len)
{
	size_t off = 0;
	buf[0] = '\0';
	for (size_t i = 0; i < c->nopts && off < len; i++) {
		const struct ctl_optspec *s = ctl_optspec_get(c->opts[i]);
		if (s->id == OPT_SOCKET || s->id == OPT_HELP || s->id == OPT_VERSION)
			continue;
		char name[48];
		if (s->shortname)
			snprintf(name, sizeof name, "%s|-%c", s->name, s->shortname);
		else
			snprintf(name, sizeof name, "%s", s->name);
		int n = snprintf(buf + off, len - off, "%s[%s%s%s]", off ? " " : "", name, s->metavar ? " " : "",
		                 s->metavar ? s->metavar : "");
		if (n < 0)
			break;
		off += (size_t)n;
	}
}

/* "  prefix [--a] [--b]" folded before 100 columns, continuation lines aligned under the first option. */
static void
usage_wrap(FILE *f, const char *prefix, const char *syn)
{
	size_t indent = 2 + strlen(prefix) + 1, col = indent;
	fprintf(f, "  %s", prefix);
	const char *p = syn;
	while (*p) {
		const char *end = strstr(p, "] [");
		size_t n = end != NULL ? (size_t)(end - p) + 1 : strlen(p);
		if (col > indent && col + 1 + n > 100) {
			fprintf(f, "\n%*s", (int)indent - 1, "");
			col = indent - 1;
		}
		fprintf(f, " %.*s", (int)n, p);
		col += 1 + n;
		p += n;
		while (*p == ' ')
			p++;
	}
	fputc('\n', f);
}

static void
usage_print(const struct ctl *ctl, FILE *f)
{
	char prefix[128], syn[512];
	fprintf(f, "usage:\n");
	for (size_t i = 0; i < NCOMMANDS; i++) {
		cmd_prefix(ctl, &commands[i], prefix, sizeof prefix);
		cmd_synopsis(&commands[i], syn, sizeof syn);
		usage_wrap(f, prefix, syn);
	}
	fprintf(f, "global options: --socket PATH, -h|--help, --version\n");
}

static void
help_print(const struct ctl *ctl)
{
	char prefix[128];
	if (ctl->guide_grammar)
		printf("%s: manage the spark workers (the C runtime; same binary as sparkctl)\n\n", ctl->prog);
	else
		printf("%s: control sparkd, the supervisor of the spark workers\n\n", ctl->prog);
	usage_print(ctl, stdout);
	printf("\ncommands:\n");
	for (size_t i = 0; i < NCOMMANDS; i++) {
		cmd_prefix(ctl, &commands[i], prefix, sizeof prefix);
		printf("  %-32s %s\n", prefix, commands[i].summary);
	}
	printf("\n'%s%s COMMAND --help' describes a command's options.\n", ctl->prog,
	       ctl->guide_grammar ? " workers" : "");
	printf("exit status: 0 success, 1 error, 2 usage error, 3 sparkd is not running\n");
}

static void
cmd_help_print(const struct ctl *ctl, const struct ctl_command *c)
{
	char prefix[128], syn[512];
	cmd_prefix(ctl, c, prefix, sizeof prefix);
	cmd_synopsis(c, syn, sizeof syn);
	printf("usage: %s%s%s\n\n%s\n\noptions:\n", prefix, syn[0] ? " " : "", syn, c->summary);
	for (size_t i = 0; i < c->nopts; i++) {
		const struct ctl_optspec *s = ctl_optspec_get(c->opts[i]);
		char name[64];
		if (s->shortname)
			snprintf(name, sizeof name, "-%c, %s%s%s", s->shortname, s->name, s->metavar ? " " : "",
			         s->metavar ? s->metavar : "");
		else
			snprintf(name, sizeof name, "    %s%s%s", s->name, s->metavar ? " " : "",
			         s->metavar ? s->metavar : "");
		printf("  %-32s %s\n", name, s->help);
	}
}

static int
version_print(const struct ctl *ctl)
{
	printf("%s %s (control protocol %d)\n", ctl->prog, SPARK_VERSION, SPARK_PROTOCOL_VERSION);
	return CTL_EXIT_OK;
}

static int
usage_error(const struct ctl *ctl, const char *what)
{
	out_err(ctl, "%s; see '%s --help'", what, ctl->prog);
	return CTL_EXIT_USAGE;
}

static const struct ctl_command *
cmd_find(const char *group, const char *name)
{
	for (size_t i = 0; i < NCOMMANDS; i++) {
		const struct ctl_command *c = &commands[i];
		if (((group == NULL && c->group == NULL) ||
		     (group != NULL && c->group != NULL && strcmp(group, c->group) == 0)) &&
		    strcmp(name, c->name) == 0)
			return c;
	}
	return NULL;
}

/* "start, status, stop, logs" (or "migrate" under "db"): what may follow a word, for usage errors. */
static void
cmd_names(const char *group, char *buf, size_t len)
{
	size_t off = 0;
	buf[0] = '\0';
	for (size_t i = 0; i < NCOMMANDS && off < len; i++) {
		const struct ctl_command *c = &commands[i];
		if ((group == NULL) != (c->group == NULL) || (group != NULL && strcmp(group, c->group) != 0))
			continue;
		int n = snprintf(buf + off, len - off, "%s%s", off ? ", " : "", c->name);
		if (n < 0)
			break;
		off += (size_t)n;
	}
}

/* Options given before the command apply to it: sparkctl --socket S status. Later ones win. */
static void
args_merge(struct ctl_args *into, const struct ctl_args *from)
{
	for (int i = 0; i < OPT__COUNT; i++) {
		if (from->set[i] && !into->set[i]) {
			into->set[i] = true;
			into->str[i] = from->str[i];
			into->num[i] = from->num[i];
		}
	}
}

int
main(int argc, char **argv)
{
	struct ctl ctl;
	struct ctl_args global, args;
	char err[768], names[128];
	memset(&ctl, 0, sizeof ctl);
	memset(&global, 0, sizeof global);
	memset(&args, 0, sizeof args);

	ctl.prog = argc > 0 && argv[0] != NULL && argv[0][0] != '\0' ? ctl_basename(argv[0]) : "sparkctl";
	ctl.guide_grammar = strcmp(ctl.prog, "automagik-spark") == 0;
	if (strcmp(ctl.prog, "sparkctl") != 0 && !ctl.guide_grammar)
		ctl.prog = "sparkctl"; /* a renamed copy speaks sparkctl's grammar under our own name in messages */
	out_init(&ctl);

	/* global options up to the first word; --socket takes the next token with it */
	int i = 1;
	while (i < argc && argv[i][0] == '-' && argv[i][1] != '\0')
		i += strcmp(argv[i], "--socket") == 0 && i + 1 < argc ? 2 : 1;
	if (ctl_args_parse(&global, global_opts, NOPTS(global_opts), i - 1, argv + 1, err, sizeof err) < 0)
		return usage_error(&ctl, err);
	if (global.set[OPT_HELP]) {
		help_print(&ctl);
		return CTL_EXIT_OK;
	}
	if (global.set[OPT_VERSION])
		return version_print(&ctl);
	if (i >= argc) {
		if (ctl.guide_grammar)
			return usage_error(&ctl,
			                   "missing command (accepted: workers start|status|stop|logs, db migrate)");
		return usage_error(&ctl, "missing command (accepted: start, status, stop, logs, db migrate)");
	}

	const char *group = NULL;
	const char *word = argv[i++];
	if (ctl.guide_grammar) {
		if (strcmp(word, "beat") == 0) {
			out_err(&ctl, "'beat' (the scheduler) is not part of this runtime yet; use 'automagik-spark "
			              "workers ...'");
			return CTL_EXIT_USAGE;
		}
		if (strcmp(word, "workers") != 0 && strcmp(word, "db") != 0) {
			snprintf(err, sizeof err, "unknown command '%s' (accepted: workers, db)", word);
			return usage_error(&ctl, err);
		}
		if (strcmp(word, "db") == 0)
			group = "db";
		if (i >= argc) {
			cmd_names(group, names, sizeof names);
			snprintf(err, sizeof err, "'%s' needs a subcommand (accepted: %s)", word, names);
			return usage_error(&ctl, err);
		}
		if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
			help_print(&ctl);
			return CTL_EXIT_OK;
		}
		word = argv[i++];
	} else if (strcmp(word, "db") == 0) {
		group = "db";
		if (i >= argc) {
			snprintf(err, sizeof err, "'db' needs a subcommand (accepted: migrate)");
			return usage_error(&ctl, err);
		}
		word = argv[i++];
	}

	const struct ctl_command *c = cmd_find(group, word);
	if (c == NULL) {
		cmd_names(group, names, sizeof names);
		if (group == NULL && !ctl.guide_grammar)
			snprintf(err, sizeof err, "unknown command '%s' (accepted: %s, db migrate)", word, names);
		else
			snprintf(err, sizeof err, "unknown command '%s%s%s' (accepted: %s)", group ? group : "",
			         group ? " " : "", word, names);
		return usage_error(&ctl, err);
	}
	ctl.cmdname = c->name;

	if (ctl_args_parse(&args, c->opts, c->nopts, argc - i, argv + i, err, sizeof err) < 0) {
		char prefix[128];
		cmd_prefix(&ctl, c, prefix, sizeof prefix);
		out_err(&ctl, "%s: %s; see '%s --help'", c->name, err, prefix);
		return CTL_EXIT_USAGE;
	}
	args_merge(&args, &global);
	if (args.set[OPT_HELP]) {
		cmd_help_print(&ctl, c);
		return CTL_EXIT_OK;
	}
	if (args.set[OPT_VERSION])
		return version_print(&ctl);
	ctl.socket_flag = args.set[OPT_SOCKET] ? args.str[OPT_SOCKET] : NULL;
	if (c->socket_only) {
		/* resolved here, so that ctl_socket_path() never parses the rest of the configuration */
		char warn[640];
		ctl.socket_path = config_socket_resolve(ctl.socket_flag, NULL, warn, sizeof warn);
		if (warn[0] != '\0')
			out_err(&ctl,
			        "warning: %s; ignored by '%s', which needs only the socket ('start' refuses the file "
			        "until it is fixed)",
			        warn, c->name);
	}

	int rc = c->handler(&ctl, &args);
	if (fflush(stdout) != 0 && rc == CTL_EXIT_OK) {
		out_err(&ctl, "cannot write the output");
		rc = CTL_EXIT_ERROR;
	}
	free(ctl.socket_path);
	return rc;
}

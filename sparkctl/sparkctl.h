/*
 * sparkctl: the operator CLI for sparkd (DESIGN §3). The same binary answers as `automagik-spark` with the workers
 * guide's grammar. A table of commands (main.c) bound to handlers (cmd-*.c) over a small token parser (parse.c).
 */
#ifndef SPARKCTL_H
#define SPARKCTL_H

#include <jansson.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "proto.h"

/* Exit codes: part of the CLI contract, scripts and systemd rely on them. */
#define CTL_EXIT_OK          0
#define CTL_EXIT_ERROR       1
#define CTL_EXIT_USAGE       2
#define CTL_EXIT_NOT_RUNNING 3

/* Options every command may take, and those of each command. Bound to commands by the table in main.c. */
enum ctl_optid {
	OPT_SOCKET = 0,
	OPT_HELP,
	OPT_VERSION,
	OPT_WORKERS,
	OPT_CONCURRENCY,
	OPT_POOL,
	OPT_LOGLEVEL,
	OPT_QUEUES,
	OPT_ENV_FILE,
	OPT_FOREGROUND,
	OPT_VERBOSE,
	OPT_JSON,
	OPT_FORCE,
	OPT_TIMEOUT,
	OPT_FOLLOW,
	OPT_LEVEL,
	OPT_LINES,
	OPT_WORKER,
	OPT_EVENTS,
	OPT__COUNT,
};

/* What a value must look like; checked by the parser so that handlers see only good values. */
enum ctl_optval {
	OPTV_NONE = 0, /* a flag */
	OPTV_STRING,   /* any non-empty text (start's values: config_load judges them, exit 1) */
	OPTV_COUNT,    /* a whole number >= 0 */
	OPTV_SECONDS,  /* a number of seconds > 0 */
	OPTV_LEVEL,    /* debug, info, warning, error, critical */
};

struct ctl_optspec {
	enum ctl_optid id;
	const char *name; /* "--lines" */
	char shortname;   /* 'n', or 0 */
	enum ctl_optval val;
	const char *metavar; /* "N", for usage lines */
	const char *help;    /* one line for --help */
};

/* Parsed options: set[] tells which were given, str[] holds the raw value, num[] the checked number. */
struct ctl_args {
	bool set[OPT__COUNT];
	const char *str[OPT__COUNT];
	double num[OPT__COUNT];
	int level; /* OPT_LEVEL, parsed */
};

/* The program's state, passed to every handler. */
struct ctl {
	const char *prog;        /* "sparkctl" or "automagik-spark", for messages */
	bool guide_grammar;      /* invoked as automagik-spark: hints say "workers start" */
	const char *cmdname;     /* "status", for messages */
	const char *socket_flag; /* --socket as given, or NULL */
	char *socket_path;       /* resolved lazily by ctl_socket_path() */
	bool color;              /* stdout is a TTY and NO_COLOR is unset */
	bool tty;                /* stdout is a TTY */
};

/* A connection to sparkd. */
struct ctl_client {
	int fd;
	struct proto_reader rd;
	uint32_t next_msgid;
	const char *path;
	char errcode[32];     /* the daemon's error code when a call failed with one, else "" */
	int peer_pid;         /* SO_PEERCRED: the listener's pid as our namespace sees it, 0 if unknown */
	char closed_why[448]; /* the daemon closed this connection with a reason (msgid 0): every later call fails so */
};

/* Outcome of a request, mapped to exit codes by the handlers. */
enum ctl_result {
	CTL_OK = 0,
	CTL_NOT_RUNNING, /* no socket, or nothing listens on it */
	CTL_FAILED,      /* anything else: message in err */
	CTL_EOF,         /* the daemon closed the connection */
	CTL_TIMEOUT,     /* no answer in time: message in err */
	CTL_INTERRUPTED, /* a signal asked us to stop waiting */
};

/* A params map packed by a caller of ctl_client_call(). */
typedef void (*ctl_pack_fn)(msgpack_packer *pk, void *arg);

/* parse.c */
const struct ctl_optspec *ctl_optspec_find(const char *name, char shortname);
const struct ctl_optspec *ctl_optspec_get(enum ctl_optid id);
int ctl_args_parse(struct ctl_args *a, const enum ctl_optid *allowed, size_t nallowed, int argc, char **argv, char *err,
                   size_t errlen);
void ctl_args_accepted(const enum ctl_optid *allowed, size_t nallowed, char *buf, size_t len);
const char *ctl_basename(const char *path);

/* client.c */
const char *ctl_socket_path(struct ctl *ctl);
enum ctl_result ctl_client_open(struct ctl_client *c, const char *path, int timeout_ms, char *err, size_t errlen);
void ctl_client_close(struct ctl_client *c);
enum ctl_result ctl_client_call(struct ctl_client *c, const char *method, ctl_pack_fn pack, void *arg, int timeout_ms,
                                msgpack_unpacked *reply, const msgpack_object **result, char *err, size_t errlen);
enum ctl_result ctl_client_next(struct ctl_client *c, int timeout_ms, msgpack_unpacked *msg, char *err, size_t errlen);
int ctl_connect_or_report(struct ctl *ctl, struct ctl_client *c);
int ctl_report_failure(struct ctl *ctl, enum ctl_result r, const char *err);
char *ctl_find_program(const char *name);
bool ctl_was_interrupted(void);
void ctl_catch_interrupt(void);

/* output.c */
void out_init(struct ctl *ctl);
const char *out_color(const struct ctl *ctl, const char *code);
const char *out_reset(const struct ctl *ctl);
void out_err(const struct ctl *ctl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void out_fmt_rss(char *buf, size_t len, int64_t kib);
void out_fmt_ts(char *buf, size_t len, double ts);
void out_capitalise(char *buf, size_t len, const char *state);
const char *out_state_color(const char *state);
const char *out_level_color(const char *level);
void out_fmt_exit(char *buf, size_t len, const msgpack_object *last_exit);
void out_sanitize(char *s);
int out_obj_str(const msgpack_object *o, char *buf, size_t len);
void out_field_str(const msgpack_object *map, const char *key, char *buf, size_t len);
void out_field_int(const msgpack_object *map, const char *key, char *buf, size_t len);
void out_field_duration(const msgpack_object *map, const char *key, char *buf, size_t len);
json_t *out_msgpack_to_json(const msgpack_object *o);
int out_print_json(const msgpack_object *o, bool pretty);
void out_log_line(const struct ctl *ctl, const msgpack_object *line);
void out_dropped_line(const struct ctl *ctl, const msgpack_object *payload);
void out_celery_worker(const struct ctl *ctl, const msgpack_object *cel, bool verbose);
void out_celery_supervisor(const struct ctl *ctl, const msgpack_object *cel);

/* cmd-*.c: handlers, bound to command names in main.c */
int cmd_start(struct ctl *ctl, const struct ctl_args *a);
int cmd_status(struct ctl *ctl, const struct ctl_args *a);
int cmd_stop(struct ctl *ctl, const struct ctl_args *a);
int cmd_logs(struct ctl *ctl, const struct ctl_args *a);
int cmd_db_migrate(struct ctl *ctl, const struct ctl_args *a);

#endif

/*
 * sparkd -> worker commands on fd 3: the same SOCK_SEQPACKET socketpair the reports use (report.h), the other
 * direction. Same framing and escaping as the reports: datagrams of at most SPARK_REPORT_MAX bytes, one command
 * per line, its kind and then its fields separated by single spaces, string fields escaped as report.h says (so a
 * task id of any length fits, up to the datagram). A worker answers a query with reports (report.h: "answer" and
 * "answered").
 *
 *   revoke <terminate> <signal> <id> [<id> ...]   add the ids to the process's revoked set (sparkd has already
 *                                                  added them to SPARK_REVOKED_KEY in Redis, which every process
 *                                                  reads when it connects). A revoked id is never started: it is
 *                                                  recorded REVOKED and acked when it is fetched, when its ETA
 *                                                  comes or when it is retried. terminate 1: a task with one of
 *                                                  the ids that is running now is stopped at once (its transfer
 *                                                  aborted) and recorded REVOKED. signal: Celery's name of the
 *                                                  signal ("SIGTERM", "TERM", "KILL", ...); "" = SIGTERM. sparkd
 *                                                  itself sends SIGKILL to a single-slot (prefork, solo) process
 *                                                  for KILL; a process with more slots stops the task as for TERM.
 *   events <on>                                    task events (task-received ... task-revoked) on (1) or off (0)
 *   queues <name> [<name> ...]                     the queues to consume from, replacing the current set
 *   time_limit <task_name> <soft_s> <hard_s>       per-task-name time limits (decimal seconds; 0 = none) that
 *                                                  replace the process-wide ones for that name
 *   query <reqid> <what> [<arg> ...]              what the process holds, answered with one "answer" report per
 *                                                  item and then "answered <reqid> <count>":
 *                                                    active      one request-info dict per running task
 *                                                    reserved    one per message held but not started
 *                                                    scheduled   one {"eta", "priority", "request"} per ETA held
 *                                                    stats       one dict: {"total": {name: n}, "rusage": {...}}
 *                                                    query_task  args: ids; one {"<id>": [state, info]} per id
 *                                                                held (state "active" or "reserved")
 *                                                  The dicts are Celery's (reference §5.5), JSON text. reqid is
 *                                                  sparkd's counter; an unknown what is answered with 0 items.
 *
 * Unknown kinds and fields after the known ones are ignored (a newer sparkd may say more); a malformed command
 * is logged and ignored. sparkd and spark-worker always ship together.
 */
#ifndef SPARK_COMMAND_H
#define SPARK_COMMAND_H

#include <stddef.h>

#include "wireline.h"

/* Revoked ids, shared by every sparkd and worker on the broker: ZSET member = task id, score = expiry (Unix s). */
#define SPARK_REVOKED_KEY     "spark:revoked"
#define SPARK_REVOKED_MAX     50000 /* Celery's REVOKES_MAX */
#define SPARK_REVOKED_EXPIRES 10800 /* seconds, Celery's REVOKE_EXPIRES */

#define CMD_Q_ACTIVE     "active"
#define CMD_Q_RESERVED   "reserved"
#define CMD_Q_SCHEDULED  "scheduled"
#define CMD_Q_STATS      "stats"
#define CMD_Q_QUERY_TASK "query_task"

/* ---- sparkd's side: buffered on a wl_out over its end of the socketpair (wireline.h), sent by wl_flush ---- */

void command_revoke(struct wl_out *o, int terminate, const char *signal, int nids, const char *const *ids);
void command_events(struct wl_out *o, int on);
void command_queues(struct wl_out *o, int n, const char *const *names);
void command_time_limit(struct wl_out *o, const char *task_name, double soft, double hard);
void command_query(struct wl_out *o, unsigned long reqid, const char *what, int nargs, const char *const *args);

/* ---- the worker's side ---- */

enum command_kind {
	COMMAND_UNKNOWN = 0,
	COMMAND_REVOKE,
	COMMAND_EVENTS,
	COMMAND_QUEUES,
	COMMAND_TIME_LIMIT,
	COMMAND_QUERY,
};

/*
 * One parsed command. String fields point into the caller's scratch (unescaped, NUL-terminated); the lists
 * (revoke's ids, queues' names, query's args) are in argv[0..argc), which the parser allocates in the scratch
 * too. len + 1 + (len / 2 + 1) * sizeof(char *) bytes of scratch always suffice: command_scratch_size(len).
 */
struct command {
	enum command_kind kind;
	int terminate;       /* revoke */
	const char *signal;  /* revoke: "" = SIGTERM */
	int on;              /* events */
	const char *name;    /* time_limit: the task name */
	double soft, hard;   /* time_limit */
	unsigned long reqid; /* query */
	const char *what;    /* query */
	int argc;            /* revoke: ids; queues: names; query: args */
	const char **argv;
};

size_t command_scratch_size(size_t len);

/* Parse one command: line[0..len) without its '\n'. Returns 0, or -1 for a malformed one (or too little scratch). */
int command_parse(const char *line, size_t len, struct command *out, void *scratch, size_t scratch_len);

#endif

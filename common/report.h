/*
 * Worker -> sparkd reports on fd 3 (a SOCK_SEQPACKET socketpair; one datagram per report, so reports from
 * several threads never interleave). Text, space-separated, one report per datagram:
 *
 *   ready <slots>                                           consuming from the broker
 *   start <slot> <hard_limit_s> <task_id> <task_name>       a task began (hard limit 0 = none)
 *   finish <slot> <task_id> <outcome> <processed> <rss_kib>  outcome: success failure retry revoked requeued
 *   recycle <reason>                                        max-tasks | max-memory: will exit after the
 *                                                           current tasks; start a replacement now
 *   draining                                                stopped fetching (warm stop)
 *   problem <text>                                          e.g. broker unreachable; "problem" alone clears it
 *   queues <name>=<len> ...                                 lengths of the consumed queues (all priority steps
 *                                                           summed), sent every few seconds by one process
 *
 * A datagram may carry several reports separated by newlines (a finish and the next start travel together).
 * Ids and task names never contain spaces (a task id with spaces is reported as "-").
 * Bump nothing: sparkd and spark-worker always ship together. Unknown reports are ignored by sparkd.
 */
#ifndef SPARK_REPORT_H
#define SPARK_REPORT_H

#include <stddef.h>

#define SPARK_REPORT_FD  3
#define SPARK_REPORT_MAX 1024

enum report_kind {
	REPORT_UNKNOWN = 0,
	REPORT_READY,
	REPORT_START,
	REPORT_FINISH,
	REPORT_RECYCLE,
	REPORT_DRAINING,
	REPORT_PROBLEM,
	REPORT_QUEUES,
};

#define REPORT_MAX_QUEUES 32

struct report {
	enum report_kind kind;
	int slots;
	int slot;
	double hard_limit;
	char task_id[128];
	char task_name[256];
	char outcome[32];
	long processed;
	long rss_kib;
	char reason[64];
	char text[512];
	int nqueues;
	char queue[REPORT_MAX_QUEUES][64];
	long queue_len[REPORT_MAX_QUEUES];
};

/* Send one report; silently does nothing when fd 3 is not a socket (spark-worker run by hand). */
void report_send(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Parse one datagram (not NUL-terminated). Returns 0, or -1 for a malformed report. */
int report_parse(const char *buf, size_t len, struct report *r);

#endif

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
#define SPARK_REPORT_MAX 65536

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

struct reporter {
	int fd;
	int usable; /* -1 = not checked yet */
	char *buf;
	size_t len, cap;
};
void reporter_init(struct reporter *r, int fd);
void reporter_free(struct reporter *r);
void report_ready(struct reporter *r, int slots);
void report_start(struct reporter *r, int slot, double hard_limit, const char *task_id, const char *task_name);
void report_finish(struct reporter *r, int slot, const char *task_id, const char *outcome, long processed,
                   long rss_kib);
void report_progress(struct reporter *r, long processed, long rss_kib);
void report_recycle(struct reporter *r, const char *reason);
void report_draining(struct reporter *r);
void report_problem(struct reporter *r, const char *text);
void report_queues(struct reporter *r, int n, const char *const *names, const long long *lens);
void report_flush(struct reporter *r);
/* Parse one datagram (not NUL-terminated). Returns 0, or -1 for a malformed report. */
int report_parse(const char *buf, size_t len, struct report *r);

#endif

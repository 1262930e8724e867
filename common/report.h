/*
 * Worker -> sparkd reports on fd 3, a SOCK_SEQPACKET socketpair: each datagram carries one or more reports, one
 * per line, separated by '\n' (no trailing newline needed), at most SPARK_REPORT_MAX bytes, and a report never
 * spans two datagrams. A report is its kind and then its fields, separated by single spaces:
 *
 *   ready <slots>                                            consuming from the broker
 *   start <slot> <hard_limit_s> <task_id> <task_name>        a task began (hard limit 0 = none)
 *   finish <slot> <task_id> <outcome> <processed> <rss_kib>  outcome: success failure retry revoked requeued
 *   progress <processed> <rss_kib>                           counts changed without a task finishing
 *   recycle <reason>                                         max-tasks | max-memory | time-limit: will exit
 *                                                            after the current tasks; start a replacement now
 *   draining                                                 stopped fetching (warm stop)
 *   problem [<text>]                                         e.g. broker unreachable; no text clears it
 *   answer <reqid> <json>                                    one item of the answer to a query (command.h)
 *   answered <reqid> <count>                                 the answer is complete: count items were sent
 *   queues [<name>=<len> ...]                                lengths of the consumed queues (all priority
 *                                                            steps summed), sent every few seconds by one
 *                                                            process; at most REPORT_MAX_QUEUES are read
 *
 * Numbers are decimal (hard_limit_s as strtod reads it). String fields (task id, task name, outcome, reason,
 * problem text, queue name) carry any NUL-free byte string, escaped so that it is one non-empty word:
 *   - '%', and every byte below 0x21 (space, '\n', controls) or equal to 0x7f, is written %XX (two hex digits;
 *     upper case when written, either case read); every other byte, UTF-8 included, is written as is;
 *   - the empty string is written "-", so the string "-" itself is written "%2D" (only a whole field of "-"
 *     means empty: "a-b" is "a-b").
 * A queue name ends at its last '=' (the length after it has no '='), so names need no escaping of '='.
 * Ids from an engine that never sends those bytes (UUIDs, Celery's names) read exactly as written.
 *
 * sparkd refuses as malformed (logs it, ignores it) only what no builder below writes: a missing or non-numeric
 * field, a bad or %00 escape. Unknown kinds, and fields after the known ones, are ignored, so a newer worker may
 * say more. No field limits the length of a string: the worker refuses ids and names too long for one datagram
 * before it reports them. Bump nothing: sparkd and spark-worker always ship together.
 */
#ifndef SPARK_REPORT_H
#define SPARK_REPORT_H

#include <stddef.h>

#include "wireline.h" /* SPARK_REPORT_FD, SPARK_REPORT_MAX, the escaping and the buffer */

/* ---- the worker's side ---- */

/* The worker's side: reports buffered on fd 3, used from the loop thread only. */
struct reporter {
	struct wl_out out;
};

static inline void
reporter_init(struct reporter *r, int fd)
{
	wl_out_init(&r->out, fd);
}

static inline void
reporter_free(struct reporter *r) /* drops what is buffered: flush first */
{
	wl_out_free(&r->out);
}

void report_ready(struct reporter *r, int slots);
void report_start(struct reporter *r, int slot, double hard_limit, const char *task_id, const char *task_name);
void report_finish(struct reporter *r, int slot, const char *task_id, const char *outcome, long processed,
                   long rss_kib);
void report_progress(struct reporter *r, long processed, long rss_kib); /* counts, without a task */
void report_recycle(struct reporter *r, const char *reason);
void report_draining(struct reporter *r);
void report_problem(struct reporter *r, const char *text); /* NULL or "" clears the problem */
void report_queues(struct reporter *r, int n, const char *const *names, const long long *lens);
void report_answer(struct reporter *r, unsigned long reqid, const char *json); /* one item, JSON text */
void report_answered(struct reporter *r, unsigned long reqid, int count);
/* Send what is buffered: as few datagrams as possible, each <= SPARK_REPORT_MAX, split only between reports.
 * A report is appended to the buffer; the buffer is flushed first when the report would not fit. */
static inline void
report_flush(struct reporter *r)
{
	wl_flush(&r->out);
}

/* One string field, escaped as above (never empty); the caller frees it. NULL is written as "" is. */
static inline char *
report_escape(const char *s)
{
	return wl_escape(s);
}

/* ---- sparkd's side ---- */

enum report_kind {
	REPORT_UNKNOWN = 0,
	REPORT_READY,
	REPORT_START,
	REPORT_FINISH,
	REPORT_PROGRESS,
	REPORT_RECYCLE,
	REPORT_DRAINING,
	REPORT_PROBLEM,
	REPORT_QUEUES,
	REPORT_ANSWER,
	REPORT_ANSWERED,
};

#define REPORT_MAX_QUEUES 32

/* String fields point into the caller's scratch (unescaped, NUL-terminated); "" when the kind has none. */
struct report {
	enum report_kind kind;
	int slots;
	int slot;
	double hard_limit;
	const char *task_id;
	const char *task_name;
	const char *outcome;
	long processed;
	long rss_kib;
	const char *reason;
	const char *text;    /* problem: "" clears it; answer: the JSON */
	unsigned long reqid; /* answer, answered */
	int count;           /* answered */
	int nqueues;
	const char *queue[REPORT_MAX_QUEUES];
	long queue_len[REPORT_MAX_QUEUES];
};

/*
 * Parse one report: line[0..len) without its '\n' (not NUL-terminated; nothing after len is read). scratch
 * receives the unescaped strings: len + 1 bytes always suffice. Returns 0, or -1 for a malformed report (or a
 * scratch too small).
 */
int report_parse(const char *line, size_t len, struct report *out, char *scratch, size_t scratch_len);

#endif

/*
 * The field names of the control protocol's maps (docs/protocol.md), each defined once, and for every map the
 * list of its fields: a packer writes msgpack_pack_map(pk, PROTO_NFIELDS(PROTO_X_FIELDS)) and then exactly those
 * fields, so a map's size is never counted by hand. Every field of a list is always sent (nil when it has no
 * value): a reply has one shape. Included by proto.h.
 */
#ifndef SPARK_PROTO_FIELDS_H
#define SPARK_PROTO_FIELDS_H

/* the lists, one field a line: clang-format would re-flow them differently on every run */
// clang-format off
#define PROTO_COUNT_FIELD_(f) +1
#define PROTO_NFIELDS(list)   (0 list(PROTO_COUNT_FIELD_))

/* names shared by several maps */
#define PROTO_F_PID         "pid"
#define PROTO_F_VERSION     "version"
#define PROTO_F_PROTOCOL    "protocol"
#define PROTO_F_STATE       "state"
#define PROTO_F_NAME        "name"
#define PROTO_F_POOL        "pool"
#define PROTO_F_CONCURRENCY "concurrency"
#define PROTO_F_PROCESSED   "processed"
#define PROTO_F_RESTARTS    "restarts"
#define PROTO_F_UPTIME_S    "uptime_s"
#define PROTO_F_STARTED_AT  "started_at"
#define PROTO_F_RSS_KIB     "rss_kib"
#define PROTO_F_WORKERS     "workers"

/* an error: {"code": …, "message": …} */
#define PROTO_F_CODE          "code"
#define PROTO_F_MESSAGE       "message"
#define PROTO_ERROR_FIELDS(X) \
	X(PROTO_F_CODE) \
	X(PROTO_F_MESSAGE)

/* ping's result */
#define PROTO_PING_FIELDS(X) \
	X(PROTO_F_PROTOCOL) \
	X(PROTO_F_VERSION) \
	X(PROTO_F_PID)

/* status's result: supervisor map, workers array, truncated bool */
#define PROTO_F_SUPERVISOR     "supervisor"
#define PROTO_F_TRUNCATED      "truncated"
#define PROTO_STATUS_FIELDS(X) \
	X(PROTO_F_SUPERVISOR) \
	X(PROTO_F_WORKERS) \
	X(PROTO_F_TRUNCATED)

#define PROTO_F_SOCKET           "socket"
#define PROTO_F_SOCKET_ACTIVATED "socket_activated"
#define PROTO_F_QUEUES           "queues"
#define PROTO_F_QUEUE_LENGTHS    "queue_lengths"
#define PROTO_F_QUEUE_LENGTHS_AT "queue_lengths_at"
#define PROTO_F_LIMITS           "limits"
#define PROTO_F_LOG_FILE         "log_file"
/* status fields of the Celery side (sparkd/celery.c): supervisor.celery and workers[].celery; the
 * maps under them are packed by celery.c from these names (queues: PROTO_F_QUEUES) */
#define PROTO_F_CELERY       "celery"
#define PROTO_F_BROKER       "broker" /* sparkd's own broker connection: {state, error, since[, url]} */
#define PROTO_F_BROKER_STATE "state"  /* connecting, up, down */
#define PROTO_F_BROKER_ERROR "error"  /* why it is down; nil when up */
#define PROTO_F_BROKER_SINCE "since"  /* wall clock of the last change */
#define PROTO_F_BROKER_URL   "url"    /* password redacted */
#define PROTO_F_EVENTS       "events" /* {heartbeats, freq} */
#define PROTO_F_HEARTBEATS   "heartbeats"
#define PROTO_F_FREQ         "freq"
#define PROTO_F_REVOKED      "revoked" /* {count, ids}: ids (newest first, at most 100) only with verbose */
#define PROTO_F_COUNT        "count"
#define PROTO_F_IDS          "ids"
#define PROTO_F_CLOCK        "clock"
#define PROTO_F_TASK_EVENTS  "task_events"

#define PROTO_SUPERVISOR_FIELDS(X) \
	X(PROTO_F_PID) \
	X(PROTO_F_VERSION) \
	X(PROTO_F_PROTOCOL) \
	X(PROTO_F_UPTIME_S) \
	X(PROTO_F_STARTED_AT) \
	X(PROTO_F_SOCKET) \
	X(PROTO_F_SOCKET_ACTIVATED) \
	X(PROTO_F_POOL) \
	X(PROTO_F_WORKERS) \
	X(PROTO_F_CONCURRENCY) \
	X(PROTO_F_QUEUES) \
	X(PROTO_F_QUEUE_LENGTHS) \
	X(PROTO_F_QUEUE_LENGTHS_AT) \
	X(PROTO_F_LIMITS) \
	X(PROTO_F_LOG_FILE) \
	X(PROTO_F_STATE) \
	X(PROTO_F_RSS_KIB) \
	X(PROTO_F_CELERY)

#define PROTO_F_MAX_TASKS_PER_CHILD "max_tasks_per_child"
#define PROTO_F_MAX_MEMORY_KIB      "max_memory_kib"
#define PROTO_F_TIME_LIMIT          "time_limit"
#define PROTO_F_SOFT_TIME_LIMIT     "soft_time_limit"
#define PROTO_LIMITS_FIELDS(X) \
	X(PROTO_F_MAX_TASKS_PER_CHILD) \
	X(PROTO_F_MAX_MEMORY_KIB) \
	X(PROTO_F_TIME_LIMIT) \
	X(PROTO_F_SOFT_TIME_LIMIT)

#define PROTO_F_ACTIVE    "active"
#define PROTO_F_PROCESSES "processes"
#define PROTO_WORKER_FIELDS(X) \
	X(PROTO_F_NAME) \
	X(PROTO_F_STATE) \
	X(PROTO_F_POOL) \
	X(PROTO_F_CONCURRENCY) \
	X(PROTO_F_PROCESSED) \
	X(PROTO_F_ACTIVE) \
	X(PROTO_F_UPTIME_S) \
	X(PROTO_F_RESTARTS) \
	X(PROTO_F_CELERY) \
	X(PROTO_F_PROCESSES)

#define PROTO_F_SLOT           "slot"
#define PROTO_F_ACTIVE_TASKS   "active_tasks"
#define PROTO_F_LAST_EXIT      "last_exit"
#define PROTO_F_PROBLEM        "problem"
#define PROTO_F_RECYCLE        "recycle"
#define PROTO_F_NEXT_RESTART_S "next_restart_s"
#define PROTO_PROCESS_FIELDS(X) \
	X(PROTO_F_PID) \
	X(PROTO_F_STATE) \
	X(PROTO_F_SLOT) \
	X(PROTO_F_RSS_KIB) \
	X(PROTO_F_PROCESSED) \
	X(PROTO_F_RESTARTS) \
	X(PROTO_F_ACTIVE_TASKS) \
	X(PROTO_F_STARTED_AT) \
	X(PROTO_F_LAST_EXIT) \
	X(PROTO_F_PROBLEM) \
	X(PROTO_F_RECYCLE) \
	X(PROTO_F_NEXT_RESTART_S)

#define PROTO_F_ID         "id"
#define PROTO_F_RUNTIME_S  "runtime_s"
#define PROTO_F_HARD_LIMIT "hard_limit"
#define PROTO_TASK_FIELDS(X) \
	X(PROTO_F_ID) \
	X(PROTO_F_NAME) \
	X(PROTO_F_RUNTIME_S) \
	X(PROTO_F_STARTED_AT) \
	X(PROTO_F_HARD_LIMIT)

#define PROTO_F_REASON       "reason"
#define PROTO_F_STATUS       "status"
#define PROTO_F_SIGNAL       "signal"
#define PROTO_F_AT           "at"
#define PROTO_EXIT_FIELDS(X) \
	X(PROTO_F_REASON) \
	X(PROTO_F_STATUS) \
	X(PROTO_F_SIGNAL) \
	X(PROTO_F_AT)

/* logs: its result, and each line (in the result and in "log" notifications) */
#define PROTO_F_LINES            "lines"
#define PROTO_LOGS_FIELDS(X) \
	X(PROTO_F_LINES)
#define PROTO_F_TS               "ts"
#define PROTO_F_LEVEL            "level"
#define PROTO_F_WORKER           "worker"
#define PROTO_F_MSG              "msg"
#define PROTO_LOG_LINE_FIELDS(X) \
	X(PROTO_F_TS) \
	X(PROTO_F_LEVEL) \
	X(PROTO_F_WORKER) \
	X(PROTO_F_PID) \
	X(PROTO_F_MSG)
/* what a follower missed: {"dropped": N} in a "log" notification (PROTO_N_DROPPED) */
#define PROTO_DROPPED_FIELDS(X) \
	X(PROTO_N_DROPPED)

/* stop's result */
#define PROTO_F_STOPPING     "stopping"
#define PROTO_STOP_FIELDS(X) \
	X(PROTO_F_STOPPING)

// clang-format on

/*
 * The --daemon ready pipe (sparkd's child to its waiting parent): one byte PROTO_READY_OK when every worker is
 * ready, or PROTO_READY_FAIL followed by the one-line reason; then the child closes it.
 */
#define PROTO_READY_OK   'R'
#define PROTO_READY_FAIL 'E'

#endif

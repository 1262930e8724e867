/*
 * sparkd: the supervisor (DESIGN §2, §4, §7, §8). One libevent loop owns every worker process, captures their
 * output, enforces the limits and serves the control socket. Nothing here blocks.
 */
#ifndef SPARKD_H
#define SPARKD_H

#include <sys/queue.h>
#include <sys/types.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "log.h"
#include "proto.h"
#include "report.h"
#include "util.h"
#include "wireline.h"

#define SD_SELF_NAME "sparkd"

/* Restart backoff over consecutive early failures (before SPARK_STARTSECS): 100 ms doubling to 30 s. */
#define SD_BACKOFF_MIN 0.1
#define SD_BACKOFF_MAX 30.0
/* Grace after the hard time limit before sparkd kills the process itself. */
#define SD_TIME_LIMIT_GRACE 5.0
/* Cold stop: SIGQUIT, then SIGKILL after this long. */
#define SD_COLD_KILL_AFTER 5.0
/* How often RSS and time limits are checked, and STATUS= refreshed. */
#define SD_TICK 1.0

/* Captured lines longer than this are cut, with a marker. */
#define LC_LINE_MAX   (16 * 1024)
#define LC_TRUNC_MARK " [truncated]"
/* Bytes of message text the ring may hold, whatever its line count. */
#define LC_RING_MAX_BYTES (16 * 1024 * 1024)

/*
 * Control clients. Others (socket-group members) get CTL_MAX_PER_UID each and CTL_MAX_CLIENTS together; the
 * daemon's uid a reserve of CTL_OWNER_RESERVE beyond both, root twice that, so no one below them can lock them out.
 * Descriptors likewise: others stop CTL_FD_RESERVE short of RLIMIT_NOFILE, owners go further.
 */
#define CTL_MAX_CLIENTS     256
#define CTL_MAX_PER_UID     64
#define CTL_OWNER_RESERVE   16
#define CTL_FD_RESERVE      32
#define CTL_REQUEST_TIMEOUT 5  /* seconds from connecting, or from the last request, to the next whole request */
#define CTL_CLOSE_TIMEOUT   10 /* seconds a closing client has to take its last reply */
/*
 * Memory of frames being read: each client's first CTL_DECODE_FREE bytes are its own (every real request fits),
 * what any client holds beyond that comes out of one CTL_DECODE_BUDGET for all of them.
 */
#define CTL_DECODE_FREE (64 * 1024)
/* Replies queued for a client that does not read them: above this, its requests wait until it does. */
#define CTL_OUTPUT_MAX    (2 * SPARK_FRAME_MAX)
#define CTL_DECODE_BUDGET (16 * 1024 * 1024)
#define CTL_FOLLOW_LIMIT  (128 * 1024) /* a follower's output buffer: stop queueing above this */
#define CTL_READ_CHUNK    (64 * 1024)

/* States shown in status (DESIGN §4). */
enum sd_pstate {
	PS_STARTING = 0,
	PS_ACTIVE,
	PS_DRAINING,
	PS_STOPPING,
	PS_BACKOFF,
	PS_STOPPED,
};

enum sd_state {
	SD_STARTING = 0, /* workers spawned, not all ready yet */
	SD_RUNNING,
	SD_STOPPING,
};

struct sd_task {
	bool used;
	char *id; /* heap, any length (NULL when not used) */
	char *name;
	double started_wall;
	double started_mono;
	double hard_limit; /* seconds, 0 = none */
};

struct sd_exit {
	bool set;
	char reason[64]; /* max-tasks, max-memory, time-limit, "crashed (signal 9)", "exited (status 3)", stopped */
	int status;      /* exit status, -1 when killed by a signal */
	int signal;      /* 0 when it exited */
	double at;       /* wall clock */
	pid_t pid;       /* the process it is about */
};

struct sd_worker;
struct sparkd;
struct sd_celery;

/* One worker process. */
struct sd_proc {
	TAILQ_ENTRY(sd_proc) entry; /* in the worker's list */
	struct sd_worker *w;
	int slot;
	pid_t pid;
	enum sd_pstate state;
	bool retiring;   /* no longer its slot's current process: a replacement runs or will not be needed */
	char reason[64]; /* recycle reason, "" when none */
	double started_wall;
	double started_mono;
	double ready_mono; /* 0 until ready */
	long processed;
	long rss_kib;
	char *problem; /* as last reported (heap), NULL when none */
	int nslots;
	struct sd_task *tasks; /* nslots entries */
	int rep_fd;
	struct event *rep_ev;
	struct wl_out cmd; /* commands to the process, on rep_fd (command.h) */
	struct lc_reader *out, *err;
};
TAILQ_HEAD(sd_proc_list, sd_proc);

/* A position in a worker that should always hold a running process. */
struct sd_slot {
	struct sd_worker *w;
	int index;
	struct sd_proc *current; /* NULL while in backoff or stopped */
	bool backoff;
	bool failing;         /* crashed and not ready since */
	double backoff_delay; /* the next delay */
	double backoff_until; /* wall clock of the next attempt */
	struct event *restart_ev;
	int restarts;
	struct sd_exit last_exit;
};

struct sd_worker {
	struct sparkd *sd;
	int index; /* 1-based */
	char name[300];
	int nslots;     /* processes: C for prefork, 1 otherwise */
	int proc_slots; /* --slots for each process */
	struct sd_slot *slots;
	int slots_cap;             /* entries allocated: pool_shrink keeps the slots its draining processes name */
	bool stopped;              /* stopped alone (Celery's control shutdown): its slots are not refilled */
	struct sd_proc_list procs; /* every live process, current and retiring */
	long processed_done;       /* by processes that have exited */
	double started_wall;
};

/* A captured pipe (a child's stdout or stderr, or sparkd's own stderr). */
struct lc_reader {
	LIST_ENTRY(lc_reader) entry;
	struct sparkd *sd;
	int fd;
	struct event *ev;
	struct evbuffer *buf;
	const char *worker; /* points at a worker's name or SD_SELF_NAME: they outlive every reader */
	pid_t pid;
	bool is_err;
	bool skipping;        /* the rest of an over-long line is being dropped */
	struct sd_proc *proc; /* NULL once the process is gone */
};
LIST_HEAD(lc_reader_list, lc_reader);

struct lc_line {
	double ts;
	int level;
	const char *worker;
	pid_t pid;
	size_t len;
	char msg[]; /* NUL-terminated */
};

struct logcap {
	struct lc_line **ring;
	size_t cap, head, count; /* head: where the next line goes */
	size_t bytes;
	char *path;
	int file_fd;
	long file_size;
	long max_bytes;
	int keep;
	int echo_fd; /* the terminal or the journal; -1 once detached */
	int echo_flags;
	bool journal;
	long echo_dropped;
	struct lc_reader *self; /* sparkd's own stderr */
	struct lc_reader_list readers;
};

/* Control clients. Freed only outside their own callbacks (hiredis style). */
#define CLIENT_IN_CALLBACK 0x1
#define CLIENT_CLOSING     0x2 /* close once the output is flushed */
#define CLIENT_FREE        0x4 /* free when the callback returns */
#define CLIENT_LINGER      0x8 /* write side shut, waiting for the peer's EOF */

struct ctl_client {
	TAILQ_ENTRY(ctl_client) entry;
	struct sparkd *sd;
	struct bufferevent *bev;
	struct proto_reader rd;
	uid_t uid;
	gid_t gid;
	pid_t pid;
	int flags;
	bool follow;
	int follow_level;
	char follow_worker[300];
	long dropped;
	struct event *deadline_ev; /* CTL_REQUEST_TIMEOUT: armed until a follow or a stop makes the wait legitimate */
	bool waits_exit;           /* asked for stop: stays until sparkd exits */
	bool paused;               /* CTL_OUTPUT_MAX queued: not reading its requests until it reads our replies */
	size_t decode_charge;      /* what its reader holds beyond CTL_DECODE_FREE, counted in sd->decode_held */
	size_t discarded;          /* input thrown away while closing */
	bool refused;              /* not allowed on this socket: every request gets permission_denied, then close */
};
TAILQ_HEAD(ctl_client_list, ctl_client);

struct sd_systemd {
	int listen_fd;     /* adopted from LISTEN_FDS, or -1 */
	char *notify_path; /* NOTIFY_SOCKET as given, or NULL */
	int notify_fd;
	double watchdog_s; /* 0 = off */
	struct event *watchdog_ev;
	char last_status[256];
	bool journal;
};

struct sparkd {
	struct event_base *base;
	struct spark_config cfg;
	char *worker_path; /* the spark-worker executable */
	pid_t pid;
	uid_t uid;
	double started_wall, started_mono;
	enum sd_state state;
	bool cold;
	int exit_code;
	int nint; /* SIGINTs received */

	int nworkers;
	struct sd_worker *workers;

	/* control socket */
	int listen_fd;
	bool listen_owned; /* we made the path: unlink it at exit */
	char *sock_path;
	gid_t sock_gid;
	bool pid_written;
	struct event *listen_ev;
	struct event *accept_retry_ev;
	struct ctl_client_list clients;
	int nclients;
	double refused_logged; /* rate limit for refusal warnings */
	double capped_logged;  /* rate limit for "too many connections" warnings */
	long fd_limit;         /* RLIMIT_NOFILE when listening started */
	int spare_fd;          /* held open so a connection can still be accepted (and answered) at EMFILE */
	size_t decode_held;    /* sum of the clients' decode_charge */

	struct logcap lc;
	struct sd_systemd sys;

	struct event *tick_ev;
	struct event *stop_timeout_ev;
	struct event *kill_ev;
	struct event *start_timeout_ev;
	struct event *sig_ev[6];

	int ready_fd; /* pipe to the --daemon parent, -1 */
	bool ready;   /* every worker reported ready once */
	bool daemon;

	/* queue lengths, as the workers last reported them (sparkd has no Redis client of its own) */
	int nqlen;
	char *qname[REPORT_MAX_QUEUES]; /* heap */
	long qlen[REPORT_MAX_QUEUES];
	double qlen_at;

	struct sd_celery *cel; /* the broker connection, mailbox and events (celery.h) */
	bool finishing;        /* every process is gone: worker-offline, then the loop ends */
};

/* celery.c (the rest of the Celery side is in celery.h) */
void celery_init(struct sparkd *sd);
void celery_start(struct sparkd *sd);
void celery_free(struct sparkd *sd);
void celery_stop(struct sparkd *sd); /* worker-offline for every node, then leave the loop */
void celery_proc_started(struct sd_proc *p);
void celery_proc_report(struct sd_proc *p, const struct report *r);
void celery_node_stopped(struct sd_worker *w);
void celery_pack_status(struct sparkd *sd, msgpack_packer *pk, bool verbose);
void celery_pack_node(struct sparkd *sd, struct sd_worker *w, msgpack_packer *pk);

/* lifecycle.c */
void sd_startup_fail(struct sparkd *sd, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
void sd_ready(struct sparkd *sd);
void sd_ready_fail(struct sparkd *sd, const char *msg);
void sd_finish(struct sparkd *sd);
void sd_pidfile_write(struct sparkd *sd);
void sd_cleanup(struct sparkd *sd);

/* the control socket: server.c (binding, accepting), ctl-*.c (clients, peers, followers, methods, status) */
int ctl_check_running(const char *path, char *err, size_t errlen);
int ctl_listen(struct sparkd *sd, char *err, size_t errlen);
void ctl_close_listener(struct sparkd *sd);
void ctl_free_all(struct sparkd *sd);
void ctl_broadcast_log(struct sparkd *sd, const struct lc_line *l);
bool ctl_peer_allowed(uid_t peer_uid, gid_t peer_gid, pid_t peer_pid, uid_t self_uid, gid_t sock_gid);
bool ctl_may_stop(uid_t peer_uid, uid_t self_uid);
const char *ctl_admit_check(uid_t peer_uid, uid_t self_uid, int nclients, int of_uid, int fd, long fd_limit);
void ctl_pack_status(struct sparkd *sd, msgpack_packer *pk, bool with_procs, bool truncated);

/* spawn.c */
char *spawn_find_worker(const char *self_exe);
pid_t spawn_child(const char *path, char *const argv[], int *out_fd, int *err_fd, int *rep_fd);

/* supervision: supervise.c (process lifecycle), sup-state.c, sup-report.c, sup-limits.c, sup-stop.c */
void sup_init(struct sparkd *sd);
void sup_start_all(struct sparkd *sd);
void sup_free(struct sparkd *sd);
void sup_reap(struct sparkd *sd);
void sup_tick(struct sparkd *sd);
void sup_stop(struct sparkd *sd, bool cold, double timeout_s);
void sup_retire(struct sd_proc *p, const char *reason);
void sup_stop_worker(struct sd_worker *w);          /* warm stop of one node */
void sup_worker_resize(struct sd_worker *w, int n); /* prefork: the node's process count, live */
int sup_live_procs(struct sparkd *sd);
bool sup_all_ready(struct sparkd *sd);
const char *sup_state_name(enum sd_pstate s);
enum sd_pstate sup_worker_state(struct sd_worker *w);
long sup_worker_processed(struct sd_worker *w);
int sup_worker_active(struct sd_worker *w);
int sup_worker_restarts(struct sd_worker *w);
void sup_exit_classify(int wstatus, const char *recycle_reason, struct sd_exit *ex);
double sup_restart_delay(double *delay, bool was_ready, double ran_s, double startsecs);
void sup_worker_name(char *buf, size_t len, int index, int nworkers, const char *host);
void sup_not_ready_reason(struct sparkd *sd, char *buf, size_t len);
void sup_status_line(struct sparkd *sd, char *buf, size_t len);

/* logcap.c */
int logcap_init(struct sparkd *sd, char *err, size_t errlen);
void logcap_free(struct logcap *lc);
int logcap_ring_init(struct logcap *lc, size_t cap);
void logcap_ring_push(struct logcap *lc, double ts, int level, const char *worker, pid_t pid, const char *msg,
                      size_t len);
const struct lc_line *logcap_ring_get(const struct logcap *lc, size_t i); /* 0 = oldest */
void logcap_ring_free(struct logcap *lc);
void logcap_reopen(struct sparkd *sd);
void logcap_detach_echo(struct sparkd *sd);
void logcap_flush_self(struct sparkd *sd);
void logcap_drain_all(struct sparkd *sd);
struct lc_reader *logcap_reader_new(struct sparkd *sd, int fd, const char *worker, pid_t pid, bool is_err);
void logcap_reader_drain(struct lc_reader *r);
int logcap_parse_level(const char *line, size_t len, bool is_err, size_t *msg_off);
bool logcap_worker_match(const char *filter, const char *worker);

/* systemd.c */
int sys_init(struct sparkd *sd, char *err, size_t errlen);
void sys_scrub_env(void);
void sys_notify(struct sparkd *sd, const char *msg);
void sys_notify_status(struct sparkd *sd);
void sys_start_watchdog(struct sparkd *sd);
void sys_free(struct sparkd *sd);
int sys_notify_addr(const char *path, void *sun, size_t sunlen, unsigned *addrlen);

#endif

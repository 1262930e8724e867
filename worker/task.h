/*
 * The boundary between the worker engine (broker, results, retries, limits: engine-*.c, broker.c, ...)
 * and task implementations (built-ins in tasks.c, workflows in workflow.c).
 *
 * The engine decodes the Celery message, fills the "in" part, calls the task function on a slot thread,
 * and then acts on the "out" part: store the result, publish a retry, or record a failure, then ack.
 */
#ifndef SPARK_TASK_H
#define SPARK_TASK_H

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "config.h"

enum task_outcome {
	TASK_SUCCESS = 0, /* result holds the return value */
	TASK_FAILURE,     /* exc_* describe the error; not retried */
	TASK_RETRY, /* a retryable error (connect error, timeout, 5xx); the engine decides whether retries remain */
	TASK_DEFER, /* could not even record (database down): put the message back after a short delay,
	               not counted as a retry and not acked until a later run records it */
};

/* Why the cancel flag was raised. */
enum task_cancel {
	TASK_CANCEL_NONE = 0,
	TASK_CANCEL_SOFT_LIMIT, /* soft time limit reached: stop cleanly */
	TASK_CANCEL_SHUTDOWN,   /* cold stop: stop now, the message goes back to the queue */
	TASK_CANCEL_HARD_LIMIT, /* hard limit: the engine is about to record TimeLimitExceeded */
	TASK_CANCEL_REVOKED,    /* revoked (terminate, or before it started): stop now; the engine records REVOKED,
	                           a workflow records the revocation on its tasks row */
};

struct task_run {
	/* ---- in (borrowed, valid until the task has called done) ---- */
	const char *task_id; /* Celery task id */
	const char *task_name;
	json_t *args;          /* JSON array; built only for tasks registered with needs_dom */
	json_t *kwargs;        /* JSON object; ditto */
	json_t *headers;       /* the message headers object; ditto */
	const char *arg0_json; /* raw JSON of args[0] (NULL when args is empty): for copy-through tasks */
	size_t arg0_len;
	const char *kwargs_json; /* raw JSON of kwargs */
	size_t kwargs_len;
	int retries;            /* headers.retries: 0 on the first run */
	int max_retries;        /* CELERY_TASK_MAX_RETRIES */
	bool last_attempt;      /* true when a TASK_RETRY outcome would not be retried (retries >= max_retries) */
	double retry_countdown; /* seconds until the retry, if this run ends TASK_RETRY and retries remain */
	bool redelivered;       /* the message was put back after a crash or stop: the task may have run before */
	const struct spark_config *cfg;
	int slot;                /* slot number inside this process (0-based) */
	const char *node;        /* worker node name, e.g. celery-1@host */
	struct event_base *base; /* the process's loop: tasks wait on it, never block it */

	/*
	 * The engine's end of a run: the task calls done(run) exactly once, from the loop thread, possibly before
	 * its start function returns. After a cancel the task still calls done (the engine may ignore it).
	 */
	void (*done)(struct task_run *run);
	void *engine; /* the engine's, for done */
	/*
	 * Cancellation: the engine stores the reason in *cancel (enum task_cancel), then calls on_cancel when the
	 * task set it. Tasks running off the loop (the blocking bridge) poll *cancel instead.
	 */
	atomic_int *cancel;
	atomic_int cancel_flag; /* what cancel points at */
	void (*on_cancel)(struct task_run *run);
	void *task; /* the task's own state */

	/* ---- out ---- */
	enum task_outcome outcome;
	json_t *result;          /* TASK_SUCCESS: new reference, or NULL for null (unless result_json is set) */
	const char *result_json; /* TASK_SUCCESS: raw JSON copied through (borrowed from the message), or NULL */
	size_t result_len;
	char exc_type[64];      /* e.g. "ValueError", "TimeoutError", "SoftTimeLimitExceeded" */
	char exc_module[64];    /* e.g. "builtins", "celery.exceptions" */
	char exc_message[1024]; /* one line; never contains a secret */
};

/* Start a task; it ends with run->done(run), possibly before returning. */
typedef void (*task_fn)(struct task_run *run);

/* Set a failure (or retryable failure) on run in one call. */
void task_fail(struct task_run *run, enum task_outcome outcome, const char *exc_module, const char *exc_type,
               const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Built-in tasks (tasks.c). */
void task_noop(struct task_run *run);  /* spark.noop(x) -> x */
void task_sleep(struct task_run *run); /* spark.sleep(seconds) -> seconds; wakes on cancel */

/*
 * Workflow tasks. The workflow stack (workflow.c and its wf-*.c, pgpool.c, store.c, http.c, source.c, fernet.c:
 * libpq, libcurl, libcrypto) lives in the plugin spark-workflow.so, loaded only when DATABASE_URL is set, so a
 * worker without workflows does not carry those libraries' memory. spark-worker reaches it through
 * workflow-loader.c's struct wf_loader (one per process, on the process's loop).
 *
 * Finding the loader: before calling task_execute_workflow or task_run_task, the engine sets run->task to its
 * struct wf_loader (the task then replaces run->task with its own state). Setting it for every task is harmless.
 *
 * workflow_open runs once per process before any slot starts: with DATABASE_URL it loads the plugin and creates
 * its state on base (heartbeat, pool); without it, it does nothing and workflow tasks fail with
 * WORKFLOW_ERR_NO_DATABASE. A database that is down never fails it (the plugin retries). A task arriving before
 * workflow_open (or after a load that failed) loads lazily with the run's cfg, node and base.
 */
struct event_base;
struct wf_state;

struct wf_loader {
	const struct workflow_plugin *p; /* NULL until loaded, and when loading failed */
	void *dl;
	bool tried;      /* loading was attempted (it is not attempted again) */
	bool err_logged; /* the load failure was logged (once, at error level) */
	char err[768];   /* why loading failed */
	struct wf_state *st;
	const struct spark_config *cfg;
	char *node;
	int slots;
	struct event_base *base;
};

int workflow_open(struct wf_loader *wl, const struct spark_config *cfg, const char *node, int slots,
                  struct event_base *base);
void task_execute_workflow(struct task_run *run); /* automagik_spark.core.tasks.workflow_tasks.execute_workflow */
void task_run_task(struct task_run *run);         /* spark.run_task(task_row_id) */
/* Stop the heartbeat, mark this process's workers row stopped, finish pending writes within timeout_s, then call
 * done(arg) from the loop (at once when the plugin is not loaded). */
void workflow_shutdown(struct wf_loader *wl, double timeout_s, void (*done)(void *arg), void *arg);
/* Free the plugin's state (runs still in flight are abandoned: their done is never called) and unload it. */
void workflow_close(struct wf_loader *wl);
/* Apply the migrations and exit status (spark-worker --migrate; sparkctl db migrate). Blocking. */
int workflow_migrate(const struct spark_config *cfg);

#define WORKFLOW_ERR_NO_DATABASE "DATABASE_URL is not set: workflow tasks need the automagik-spark PostgreSQL database"

/*
 * The plugin's one exported symbol (workflow-plugin.c). Bump WORKFLOW_PLUGIN_ABI whenever this struct changes;
 * the sizes catch a plugin built against another struct task_run or struct spark_config.
 * ABI 2: the plugin runs on the process's event loop; its state is one struct wf_state.
 * ABI 3: TASK_CANCEL_REVOKED (a run may start with it already set: record the revocation, call nothing).
 */
#define WORKFLOW_PLUGIN_ABI    3
#define WORKFLOW_PLUGIN_SYMBOL "spark_workflow_plugin"
#define WORKFLOW_PLUGIN_FILE   "spark-workflow.so"

struct workflow_plugin {
	int abi;            /* WORKFLOW_PLUGIN_ABI */
	size_t run_size;    /* sizeof(struct task_run) */
	size_t config_size; /* sizeof(struct spark_config) */
	/* the plugin has its own copy of log.c: give it the program's tag, level and journal mode */
	void (*log_setup)(const char *tag, int level, bool journal);
	/* the plugin's state on the process's loop; never fails for a database that is down (it retries).
	 * NULL only when out of resources. cfg and base must outlive the state. */
	struct wf_state *(*create)(const struct spark_config *cfg, const char *node, int slots,
	                           struct event_base *base);
	/* start a run on the loop; it ends with run->done(run), possibly before returning. run->task becomes the
	 * plugin's; run->on_cancel is set while an HTTP call can be aborted. */
	void (*execute_workflow)(struct wf_state *st, struct task_run *run);
	void (*run_task)(struct wf_state *st, struct task_run *run);
	/* stop the heartbeat, write the final workers row (status stopped), finish pending writes within
	 * timeout_s, then call done(arg) from the loop */
	void (*shutdown)(struct wf_state *st, double timeout_s, void (*done)(void *arg), void *arg);
	void (*destroy)(struct wf_state *st);
	int (*migrate)(const struct spark_config *cfg); /* blocking is fine: a one-shot command */
};

/* Look up a task by name; NULL when unknown. *needs_dom: the task reads run->args/kwargs/headers. */
task_fn task_lookup(const char *name, bool *needs_dom);

#endif

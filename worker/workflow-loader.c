/*
 * spark-worker's side of the workflow plugin (task.h): loads spark-workflow.so with dlopen and forwards to it.
 *
 * Why a plugin: libpq, libcurl and libcrypto, with the ~35 libraries they pull in, cost every worker process
 * ~7 MiB of resident memory even when no workflow task ever runs. Loaded eagerly when DATABASE_URL is set (the
 * workers-table heartbeat runs from the start), else never: without a database a workflow task fails the same
 * way the plugin would fail it. A plugin that cannot be loaded fails workflow tasks, never the worker.
 *
 * Where: $SPARK_WORKFLOW_PLUGIN when set (and only there: an explicit choice is not second-guessed), else
 * beside the executable (the build tree), else ../lib/spark/ from it (make install: sbin/ -> lib/spark/).
 */
#include <dlfcn.h>
#include <event2/event.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "task.h"
#include "util.h"

static struct {
	pthread_once_t once;
	const struct workflow_plugin *p; /* NULL until loaded, and when loading failed */
	char err[768];                   /* why loading failed */
	pthread_mutex_t mu;              /* guards what follows */
	bool err_logged;
	/* remembered from workflow_init, for a plugin loaded later */
	const struct spark_config *cfg;
	char *node;
	int slots;
} wl = {.once = PTHREAD_ONCE_INIT, .mu = PTHREAD_MUTEX_INITIALIZER};

/* dlopen one candidate; 0 when it is loaded and compatible, else -1 with the reason in wl.err. */
static int
wl_try(const char *path)
{
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		const char *e = dlerror();
		snprintf(wl.err, sizeof wl.err, "%s", e ? e : path);
		return -1;
	}
	const struct workflow_plugin *p = dlsym(h, WORKFLOW_PLUGIN_SYMBOL);
	if (p == NULL) {
		const char *e = dlerror();
		snprintf(wl.err, sizeof wl.err, "%s", e ? e : WORKFLOW_PLUGIN_SYMBOL " missing");
	} else if (p->abi != WORKFLOW_PLUGIN_ABI || p->run_size != sizeof(struct task_run) ||
	           p->config_size != sizeof(struct spark_config)) {
		snprintf(wl.err, sizeof wl.err, "%s: built for another spark-worker (plugin ABI %d, expected %d)", path,
		         p->abi, WORKFLOW_PLUGIN_ABI);
	} else {
		wl.p = p;
		return 0;
	}
	dlclose(h);
	return -1;
}

/* pthread_once routine: find and load the plugin, and hand it the program's log settings. */
static void
wl_load(void)
{
	const char *env = getenv("SPARK_WORKFLOW_PLUGIN");
	if (env != NULL && *env != '\0') {
		wl_try(env);
	} else {
		char exe[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
		if (n <= 0) {
			snprintf(wl.err, sizeof wl.err, "cannot find the spark-worker executable's directory");
			return;
		}
		exe[n] = '\0';
		char *slash = strrchr(exe, '/');
		if (slash != NULL)
			*slash = '\0';
		char *beside = xasprintf("%s/" WORKFLOW_PLUGIN_FILE, exe);
		char *installed = xasprintf("%s/../lib/spark/" WORKFLOW_PLUGIN_FILE, exe);
		/* report the reason of the first candidate that exists (a missing library, say), else of the first */
		char first[sizeof wl.err];
		if (wl_try(beside) < 0) {
			spark_strlcpy(first, wl.err, sizeof first);
			if (wl_try(installed) < 0 && access(installed, F_OK) != 0)
				spark_strlcpy(wl.err, first, sizeof wl.err);
		}
		free(beside);
		free(installed);
	}
	if (wl.p != NULL)
		wl.p->log_setup(log_get_tag(), log_get_level(), log_get_journal());
}

/* The plugin, or NULL (the reason is logged once at error level and left in wl.err). */
static const struct workflow_plugin *
wl_plugin(void)
{
	pthread_once(&wl.once, wl_load);
	if (wl.p == NULL) {
		pthread_mutex_lock(&wl.mu);
		if (!wl.err_logged)
			log_errorx("workflow support unavailable: %s", wl.err);
		wl.err_logged = true;
		pthread_mutex_unlock(&wl.mu);
	}
	return wl.p;
}

static bool
wl_has_database(const struct spark_config *cfg)
{
	return cfg != NULL && cfg->database_url != NULL && *cfg->database_url != '\0';
}

int
workflow_init(const struct spark_config *cfg, const char *node, int slots)
{
	pthread_mutex_lock(&wl.mu);
	if (wl.cfg == NULL) {
		wl.cfg = cfg;
		wl.node = node ? xstrdup(node) : NULL;
		wl.slots = slots;
	}
	pthread_mutex_unlock(&wl.mu);
	if (!wl_has_database(cfg)) {
		log_debug("workflow: DATABASE_URL is not set; workflow tasks will fail");
		return 0;
	}
	const struct workflow_plugin *p = wl_plugin();
	return p ? p->init(cfg, node, slots) : 0;
}

void
workflow_shutdown(void)
{
	/* never loads: nothing to shut down in a plugin that was not needed */
	if (wl.p != NULL)
		wl.p->shutdown();
}

/* The plugin, initialised with what workflow_init was given (or with this run's settings), or NULL with the
 * failure set on run. */
static const struct workflow_plugin *
wl_ready(struct task_run *run)
{
	if (!wl_has_database(run->cfg)) {
		task_fail(run, TASK_FAILURE, "builtins", "RuntimeError", WORKFLOW_ERR_NO_DATABASE);
		return NULL;
	}
	const struct workflow_plugin *p = wl_plugin();
	if (p == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "workflow support unavailable: %s", wl.err);
		return NULL;
	}
	/* the plugin's workflow_init runs once (later calls return at once): the first task of a plugin loaded
	 * lazily initialises it with the engine's settings, as the engine would have */
	pthread_mutex_lock(&wl.mu);
	const struct spark_config *cfg = wl_has_database(wl.cfg) ? wl.cfg : run->cfg;
	const char *node = wl.node ? wl.node : run->node;
	int slots = wl.slots > 0 ? wl.slots : 1;
	pthread_mutex_unlock(&wl.mu);
	p->init(cfg, node, slots);
	return p;
}

/*
 * The bridge from the loop to the plugin's blocking calls: each workflow task runs on a thread of its own and
 * its end comes back to the loop through an eventfd. (The plugin's libpq and libcurl calls block; the thread
 * polls run->cancel as before. This bridge goes when the plugin runs on the loop itself.)
 */
struct wl_call {
	struct task_run *run;
	void (*fn)(struct task_run *run);
	struct wl_call *next;
};

static struct {
	pthread_mutex_t mu;
	struct wl_call *ended; /* guarded by mu */
	int efd;
	struct event *ev;
} wb = {.mu = PTHREAD_MUTEX_INITIALIZER, .efd = -1};

static void
wl_ended_cb(evutil_socket_t fd, short what, void *arg)
{
	uint64_t n;
	while (read(wb.efd, &n, sizeof n) == (ssize_t)sizeof n)
		;
	pthread_mutex_lock(&wb.mu);
	struct wl_call *list = wb.ended;
	wb.ended = NULL;
	pthread_mutex_unlock(&wb.mu);
	while (list != NULL) {
		struct wl_call *c = list;
		list = c->next;
		c->run->done(c->run);
		free(c);
	}
}

static void *
wl_thread(void *arg)
{
	struct wl_call *c = arg;
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the loop's */
	c->fn(c->run);
	pthread_mutex_lock(&wb.mu);
	c->next = wb.ended;
	wb.ended = c;
	pthread_mutex_unlock(&wb.mu);
	uint64_t one = 1;
	if (write(wb.efd, &one, sizeof one) < 0)
		log_warnx("workflow bridge: cannot wake the loop");
	return NULL;
}

static void
wl_spawn(struct task_run *run, void (*fn)(struct task_run *run))
{
	if (wb.efd < 0) {
		wb.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (wb.efd < 0)
			fatal("workflow bridge: eventfd");
		wb.ev = event_new(run->base, wb.efd, EV_READ | EV_PERSIST, wl_ended_cb, NULL);
		event_add(wb.ev, NULL);
	}
	struct wl_call *c = xcalloc(1, sizeof *c);
	c->run = run;
	c->fn = fn;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_t t;
	if (pthread_create(&t, &attr, wl_thread, c) != 0) {
		free(c);
		task_fail(run, TASK_DEFER, "builtins", "RuntimeError", "cannot start a thread for the workflow task");
		run->done(run);
	}
	pthread_attr_destroy(&attr);
}

void
task_execute_workflow(struct task_run *run)
{
	const struct workflow_plugin *p = wl_ready(run);
	if (p == NULL) {
		run->done(run);
		return;
	}
	wl_spawn(run, p->execute_workflow);
}

void
task_run_task(struct task_run *run)
{
	const struct workflow_plugin *p = wl_ready(run);
	if (p == NULL) {
		run->done(run);
		return;
	}
	wl_spawn(run, p->run_task);
}

int
workflow_migrate(const struct spark_config *cfg)
{
	pthread_once(&wl.once, wl_load);
	if (wl.p == NULL) {
		fprintf(stderr, "spark-worker: workflow support unavailable: %s\n", wl.err);
		return 1;
	}
	return wl.p->migrate(cfg);
}

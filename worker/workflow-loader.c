/*
 * spark-worker's side of the workflow plugin (task.h): loads spark-workflow.so with dlopen and forwards to it.
 * Its state is the process's struct wf_loader; the task entry points find it in run->task (set by the engine).
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
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "task.h"
#include "util.h"

/* dlopen one candidate; 0 when it is loaded and compatible, else -1 with the reason in wl->err. */
static int
wl_try(struct wf_loader *wl, const char *path)
{
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		const char *e = dlerror();
		snprintf(wl->err, sizeof wl->err, "%s", e ? e : path);
		return -1;
	}
	const struct workflow_plugin *p = dlsym(h, WORKFLOW_PLUGIN_SYMBOL);
	if (p == NULL) {
		const char *e = dlerror();
		snprintf(wl->err, sizeof wl->err, "%s", e ? e : WORKFLOW_PLUGIN_SYMBOL " missing");
	} else if (p->abi != WORKFLOW_PLUGIN_ABI || p->run_size != sizeof(struct task_run) ||
	           p->config_size != sizeof(struct spark_config)) {
		snprintf(wl->err, sizeof wl->err, "%s: built for another spark-worker (plugin ABI %d, expected %d)",
		         path, p->abi, WORKFLOW_PLUGIN_ABI);
	} else {
		wl->p = p;
		wl->dl = h;
		return 0;
	}
	dlclose(h);
	return -1;
}

/* Find and load the plugin once, and hand it the program's log settings. */
static void
wl_load(struct wf_loader *wl)
{
	if (wl->tried)
		return;
	wl->tried = true;
	const char *env = getenv("SPARK_WORKFLOW_PLUGIN");
	if (env != NULL && *env != '\0') {
		wl_try(wl, env);
	} else {
		char exe[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
		if (n <= 0) {
			snprintf(wl->err, sizeof wl->err, "cannot find the spark-worker executable's directory");
			return;
		}
		exe[n] = '\0';
		char *slash = strrchr(exe, '/');
		if (slash != NULL)
			*slash = '\0';
		char *beside = xasprintf("%s/" WORKFLOW_PLUGIN_FILE, exe);
		char *installed = xasprintf("%s/../lib/spark/" WORKFLOW_PLUGIN_FILE, exe);
		/* report the reason of the first candidate that exists (a missing library, say), else of the first */
		char first[sizeof wl->err];
		if (wl_try(wl, beside) < 0) {
			spark_strlcpy(first, wl->err, sizeof first);
			if (wl_try(wl, installed) < 0 && access(installed, F_OK) != 0)
				spark_strlcpy(wl->err, first, sizeof wl->err);
		}
		free(beside);
		free(installed);
	}
	if (wl->p != NULL)
		wl->p->log_setup(log_get_tag(), log_get_level(), log_get_journal());
}

/* The plugin, or NULL (the reason is logged once at error level and left in wl->err). */
static const struct workflow_plugin *
wl_plugin(struct wf_loader *wl)
{
	wl_load(wl);
	if (wl->p == NULL && !wl->err_logged) {
		log_errorx("workflow support unavailable: %s", wl->err);
		wl->err_logged = true;
	}
	return wl->p;
}

static bool
wl_has_database(const struct spark_config *cfg)
{
	return cfg != NULL && cfg->database_url != NULL && *cfg->database_url != '\0';
}

int
workflow_open(struct wf_loader *wl, const struct spark_config *cfg, const char *node, int slots,
              struct event_base *base)
{
	if (wl->cfg == NULL) {
		wl->cfg = cfg;
		wl->node = node ? xstrdup(node) : NULL;
		wl->slots = slots;
		wl->base = base;
	}
	if (!wl_has_database(cfg)) {
		log_debug("workflow: DATABASE_URL is not set; workflow tasks will fail");
		return 0;
	}
	/* eager with a database: the workers-table heartbeat runs from the start */
	const struct workflow_plugin *p = wl_plugin(wl);
	if (p != NULL && wl->st == NULL)
		wl->st = p->create(cfg, node, slots, base);
	return 0;
}

/* The plugin's state, created with what workflow_open was given (or with this run's settings), or NULL with the
 * failure set on run. */
static struct wf_state *
wl_ready(struct wf_loader *wl, struct task_run *run)
{
	if (!wl_has_database(run->cfg)) {
		task_fail(run, TASK_FAILURE, "builtins", "RuntimeError", WORKFLOW_ERR_NO_DATABASE);
		return NULL;
	}
	if (wl == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "RuntimeError",
		          "workflow support unavailable: the engine gave the task no loader");
		return NULL;
	}
	const struct workflow_plugin *p = wl_plugin(wl);
	if (p == NULL) {
		task_fail(run, TASK_FAILURE, "builtins", "RuntimeError", "workflow support unavailable: %s", wl->err);
		return NULL;
	}
	if (wl->st == NULL) {
		/* a plugin loaded lazily: created with the engine's settings, as workflow_open would have */
		const struct spark_config *cfg = wl_has_database(wl->cfg) ? wl->cfg : run->cfg;
		wl->st = p->create(cfg, wl->node ? wl->node : run->node, wl->slots > 0 ? wl->slots : 1,
		                   wl->base ? wl->base : run->base);
		if (wl->st == NULL) {
			task_fail(run, TASK_FAILURE, "builtins", "RuntimeError",
			          "workflow support unavailable: its state could not be created");
			return NULL;
		}
	}
	return wl->st;
}

void
task_execute_workflow(struct task_run *run)
{
	struct wf_loader *wl = run->task;
	struct wf_state *st = wl_ready(wl, run);
	if (st == NULL)
		run->done(run);
	else
		wl->p->execute_workflow(st, run);
}

void
task_run_task(struct task_run *run)
{
	struct wf_loader *wl = run->task;
	struct wf_state *st = wl_ready(wl, run);
	if (st == NULL)
		run->done(run);
	else
		wl->p->run_task(st, run);
}

void
workflow_shutdown(struct wf_loader *wl, double timeout_s, void (*done)(void *arg), void *arg)
{
	/* never loads: nothing to shut down in a plugin that was not needed */
	if (wl->p != NULL && wl->st != NULL)
		wl->p->shutdown(wl->st, timeout_s, done, arg);
	else
		done(arg);
}

void
workflow_close(struct wf_loader *wl)
{
	if (wl->p != NULL && wl->st != NULL)
		wl->p->destroy(wl->st);
	wl->st = NULL;
	/* the library stays mapped: libcurl and OpenSSL keep process-wide state that dlclose would pull away */
	free(wl->node);
	wl->node = NULL;
}

int
workflow_migrate(const struct spark_config *cfg)
{
	struct wf_loader wl = {0};
	wl_load(&wl);
	if (wl.p == NULL) {
		fprintf(stderr, "spark-worker: workflow support unavailable: %s\n", wl.err);
		return 1;
	}
	return wl.p->migrate(cfg);
}

/* The resolved configuration written back to the environment, for the processes sparkd starts. */
#include "config.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "rundir.h"
#include "util.h"

static void
setenv_num(const char *name, double v)
{
	char buf[64];
	snprintf(buf, sizeof buf, "%.17g", v);
	setenv(name, buf, 1);
}

void
config_export(const struct spark_config *cfg)
{
	setenv_num("SPARK_WORKERS", cfg->workers);
	setenv_num("CELERY_WORKER_CONCURRENCY", cfg->concurrency);
	setenv_num("CELERY_WORKER_PREFETCH_MULTIPLIER", cfg->prefetch_multiplier);
	setenv("CELERY_WORKER_POOL", pool_name(cfg->pool), 1);
	setenv("SPARK_LOGLEVEL", log_level_name(cfg->loglevel), 1);
	setenv("CELERY_BROKER_URL", cfg->broker_url, 1);
	if (cfg->result_backend)
		setenv("CELERY_RESULT_BACKEND", cfg->result_backend, 1);
	else
		unsetenv("CELERY_RESULT_BACKEND");
	unsetenv("AUTOMAGIK_SPARK_CELERY_RESULT_BACKEND");
	if (cfg->database_url)
		setenv("DATABASE_URL", cfg->database_url, 1);
	else
		unsetenv("DATABASE_URL");
	unsetenv("AUTOMAGIK_SPARK_DATABASE_URL");
	setenv_num("CELERY_WORKER_MAX_TASKS_PER_CHILD", (double)cfg->max_tasks_per_child);
	setenv_num("CELERY_WORKER_MAX_MEMORY_PER_CHILD", (double)cfg->max_memory_kib);
	setenv_num("CELERY_TASK_TIME_LIMIT", cfg->time_limit);
	setenv_num("CELERY_TASK_SOFT_TIME_LIMIT", cfg->soft_time_limit);
	setenv_num("CELERY_TASK_MAX_RETRIES", cfg->max_retries);
	setenv("CELERY_TASK_RETRY_BACKOFF", cfg->retry_backoff ? "True" : "False", 1);
	setenv("CELERY_WORKER_SEND_TASK_EVENTS", cfg->send_task_events ? "True" : "False", 1);
	setenv_num("CELERY_TASK_RETRY_BACKOFF_MAX", cfg->retry_backoff_max);
	setenv_num("CELERY_TASK_DEFAULT_RETRY_DELAY", cfg->default_retry_delay);
	char q[SPARK_MAX_QUEUES * 210] = "";
	for (int i = 0; i < cfg->nqueues; i++) {
		if (i)
			strcat(q, ",");
		strcat(q, cfg->queues[i]);
	}
	setenv("SPARK_QUEUES", q, 1);
	setenv("SPARK_SOCKET", cfg->socket_path, 1);
	setenv("SPARK_LOG_DIR", cfg->log_dir, 1);
	setenv("SPARK_PID_FILE", cfg->pid_file, 1);
	if (cfg->encryption_key)
		setenv("AUTOMAGIK_SPARK_ENCRYPTION_KEY", cfg->encryption_key, 1);
	setenv_num("AUTOMAGIK_SPARK_HTTP_TIMEOUT", cfg->http_timeout);
	setenv_num("SPARK_VISIBILITY_TIMEOUT", cfg->visibility_timeout);
	setenv_num("SPARK_LOG_LINES", (double)cfg->log_lines);
	char lb[32];
	snprintf(lb, sizeof lb, "%ldb", cfg->log_max_bytes);
	setenv("SPARK_LOG_MAX_BYTES", lb, 1);
	setenv_num("SPARK_LOG_KEEP", cfg->log_keep);
	setenv_num("SPARK_START_TIMEOUT", cfg->start_timeout);
	setenv_num("SPARK_STARTSECS", cfg->startsecs);
	setenv_num("SPARK_HEARTBEAT_INTERVAL", cfg->heartbeat_interval);
	setenv_num("SPARK_DB_POOL_SIZE", cfg->db_pool_size);
	setenv_num("SPARK_MAX_MESSAGE_BYTES", (double)cfg->max_message_bytes);
	setenv_num("SPARK_DEADLETTER_MAX", (double)cfg->deadletter_max);
	setenv_num("SPARK_POISON_DELIVERIES", cfg->poison_deliveries);
	/* children read exactly this environment, never an env file of their own */
	setenv("SPARK_ENV_FILE", "", 1);
}

/* The fixture the configuration tests share: a clean environment, a temporary working directory, helpers. */
#ifndef SPARK_TEST_CONFIG_FIXTURE_H
#define SPARK_TEST_CONFIG_FIXTURE_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"

static const char *const vars[] = {"SPARK_WORKERS",
                                   "CELERY_WORKER_CONCURRENCY",
                                   "CELERY_WORKER_POOL",
                                   "SPARK_LOGLEVEL",
                                   "CELERY_WORKER_LOGLEVEL",
                                   "CELERY_BROKER_URL",
                                   "AUTOMAGIK_SPARK_CELERY_BROKER_URL",
                                   "CELERY_RESULT_BACKEND",
                                   "AUTOMAGIK_SPARK_CELERY_RESULT_BACKEND",
                                   "DATABASE_URL",
                                   "AUTOMAGIK_SPARK_DATABASE_URL",
                                   "CELERY_WORKER_MAX_TASKS_PER_CHILD",
                                   "CELERY_WORKER_MAX_MEMORY_PER_CHILD",
                                   "CELERY_TASK_TIME_LIMIT",
                                   "CELERY_TASK_SOFT_TIME_LIMIT",
                                   "CELERY_TASK_SERIALIZER",
                                   "CELERY_RESULT_SERIALIZER",
                                   "CELERY_TASK_MAX_RETRIES",
                                   "CELERY_TASK_RETRY_BACKOFF",
                                   "CELERY_TASK_RETRY_BACKOFF_MAX",
                                   "CELERY_TASK_DEFAULT_RETRY_DELAY",
                                   "SPARK_QUEUES",
                                   "SPARK_SOCKET",
                                   "SPARK_LOG_DIR",
                                   "SPARK_PID_FILE",
                                   "AUTOMAGIK_SPARK_ENCRYPTION_KEY",
                                   "AUTOMAGIK_SPARK_HTTP_TIMEOUT",
                                   "SPARK_VISIBILITY_TIMEOUT",
                                   "SPARK_LOG_LINES",
                                   "SPARK_LOG_MAX_BYTES",
                                   "SPARK_LOG_KEEP",
                                   "SPARK_START_TIMEOUT",
                                   "SPARK_DB_POOL_SIZE",
                                   "SPARK_ENV_FILE",
                                   "RUNTIME_DIRECTORY",
                                   "LOGS_DIRECTORY"};

static char tmpdir[] = "/tmp/spark-test-config-XXXXXX"; /* each test binary has its own */
static char envpath[512];
static char oldcwd[4096];

static inline int
setup(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
		unsetenv(vars[i]);
	return 0;
}

static inline int
group_setup(void **state)
{
	(void)state;
	if (getcwd(oldcwd, sizeof oldcwd) == NULL || mkdtemp(tmpdir) == NULL || chdir(tmpdir) != 0)
		return -1;
	snprintf(envpath, sizeof envpath, "%s/test.env", tmpdir);
	return 0;
}

static inline int
group_teardown(void **state)
{
	(void)state;
	unlink(envpath);
	unlink(".env");
	if (chdir(oldcwd) != 0)
		return -1;
	rmdir(tmpdir);
	return 0;
}

static inline void
write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

static inline int
load(struct spark_config *cfg, const struct config_override *ov, size_t nov, const char *file, char *err)
{
	err[0] = '\0';
	return config_load(cfg, ov, nov, file, err, 512);
}

static inline void
assert_contains(const char *hay, const char *needle)
{
	if (strstr(hay, needle) == NULL)
		fail_msg("'%s' does not contain '%s'", hay, needle);
}

static inline void
assert_lacks(const char *hay, const char *needle)
{
	if (strstr(hay, needle) != NULL)
		fail_msg("'%s' must not contain '%s'", hay, needle);
}

#endif

/* Configuration: precedence, aliases, validation messages, units, limits, solo, secrets (DESIGN §5); the socket
 * path is in test_config_socket.c. */
#include "config_fixture.h"

static void
test_defaults(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.workers, 1);
	assert_int_equal(c.concurrency, 1);
	assert_int_equal(c.pool, SPARK_POOL_PREFORK);
	assert_int_equal(c.max_tasks_per_child, 100);
	assert_int_equal(c.max_memory_kib, 200000);
	assert_true(c.time_limit == 300);
	assert_true(c.soft_time_limit == 280);
	assert_int_equal(c.max_retries, 3);
	assert_true(c.retry_backoff);
	assert_true(c.retry_backoff_max == 120);
	assert_true(c.default_retry_delay == 5);
	/* automagik-spark's app declares both queues */
	assert_int_equal(c.nqueues, 2);
	assert_string_equal(c.queues[0], "celery");
	assert_string_equal(c.queues[1], "direct");
	assert_string_equal(c.broker.host, "localhost");
	assert_int_equal(c.broker.port, 6379);
	assert_int_equal(c.broker.db, 0);
	assert_null(c.result_backend);
	assert_null(c.database_url);
	assert_int_equal(c.log_lines, 10000);
	assert_non_null(c.socket_path);
	assert_non_null(c.pid_file);
	assert_null(c.env_file);
	config_free(&c);
}

static void
test_precedence(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	write_file(envpath, "CELERY_WORKER_CONCURRENCY=3\nSPARK_WORKERS=2\nCELERY_WORKER_POOL=threads\n");
	struct config_override ov[] = {{"CELERY_WORKER_CONCURRENCY", "--concurrency", "5"}};

	setenv("CELERY_WORKER_CONCURRENCY", "4", 1);
	assert_int_equal(load(&c, ov, 1, envpath, err), 0);
	assert_int_equal(c.concurrency, 5); /* flag > env */
	assert_int_equal(c.workers, 2);     /* env file > default */
	assert_int_equal(c.pool, SPARK_POOL_THREADS);
	assert_string_equal(c.env_file, envpath);
	config_free(&c);

	assert_int_equal(load(&c, NULL, 0, envpath, err), 0);
	assert_int_equal(c.concurrency, 4); /* env > env file */
	config_free(&c);

	unsetenv("CELERY_WORKER_CONCURRENCY");
	assert_int_equal(load(&c, NULL, 0, envpath, err), 0);
	assert_int_equal(c.concurrency, 3);
	config_free(&c);

	assert_int_equal(load(&c, NULL, 0, "", err), 0); /* "" = no env file */
	assert_int_equal(c.concurrency, 1);
	config_free(&c);

	/* a NULL override value means "not given" */
	struct config_override none[] = {{"CELERY_WORKER_CONCURRENCY", "--concurrency", NULL}};
	assert_int_equal(load(&c, none, 1, envpath, err), 0);
	assert_int_equal(c.concurrency, 3);
	config_free(&c);
}

static void
test_env_file_selection(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	write_file(".env", "SPARK_WORKERS = 6\n");
	write_file(envpath, "SPARK_WORKERS = 7\n");
	assert_int_equal(load(&c, NULL, 0, NULL, err), 0); /* ./.env when nothing else is named */
	assert_int_equal(c.workers, 6);
	config_free(&c);
	setenv("SPARK_ENV_FILE", envpath, 1);
	assert_int_equal(load(&c, NULL, 0, NULL, err), 0);
	assert_int_equal(c.workers, 7);
	config_free(&c);
	setenv("SPARK_ENV_FILE", "", 1); /* set but empty: no env file at all */
	assert_int_equal(load(&c, NULL, 0, NULL, err), 0);
	assert_int_equal(c.workers, 1);
	config_free(&c);
	unsetenv("SPARK_ENV_FILE");
	unlink(".env");
}

static void
test_aliases(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	setenv("AUTOMAGIK_SPARK_CELERY_BROKER_URL", "redis://alias-host:7001/2", 1);
	setenv("AUTOMAGIK_SPARK_DATABASE_URL", "postgresql+asyncpg://u:p@db:5432/spark", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_string_equal(c.broker.host, "alias-host");
	assert_int_equal(c.broker.port, 7001);
	assert_int_equal(c.broker.db, 2);
	assert_string_equal(c.database_url, "postgresql://u:p@db:5432/spark");
	config_free(&c);

	/* the plain name wins over the alias */
	setenv("CELERY_BROKER_URL", "redis://plain-host:7002/3", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_string_equal(c.broker.host, "plain-host");
	config_free(&c);
	unsetenv("CELERY_BROKER_URL");
	unsetenv("AUTOMAGIK_SPARK_CELERY_BROKER_URL");

	/* in a file too, whatever the order */
	write_file(envpath,
	           "CELERY_BROKER_URL=redis://plain:1/0\nAUTOMAGIK_SPARK_CELERY_BROKER_URL=redis://alias:2/0\n");
	assert_int_equal(load(&c, NULL, 0, envpath, err), 0);
	assert_string_equal(c.broker.host, "plain");
	config_free(&c);
	write_file(envpath, "AUTOMAGIK_SPARK_CELERY_BROKER_URL=redis://alias:2/0\n");
	assert_int_equal(load(&c, NULL, 0, envpath, err), 0);
	assert_string_equal(c.broker.host, "alias");
	config_free(&c);
	/* the environment's alias beats the file's plain name (environment > env file) */
	setenv("AUTOMAGIK_SPARK_CELERY_BROKER_URL", "redis://envalias:3/0", 1);
	write_file(envpath, "CELERY_BROKER_URL=redis://fileplain:1/0\n");
	assert_int_equal(load(&c, NULL, 0, envpath, err), 0);
	assert_string_equal(c.broker.host, "envalias");
	config_free(&c);
}

/* One line naming the variable, the value and what is accepted. */
static void
expect_refused(const char *var, const char *value, const char *accepted_hint)
{
	struct spark_config c;
	char err[512];
	setenv(var, value, 1);
	assert_int_equal(load(&c, NULL, 0, "", err), -1);
	unsetenv(var);
	assert_contains(err, var);
	assert_contains(err, value);
	assert_contains(err, accepted_hint);
	assert_null(strchr(err, '\n'));
}

static void
test_validation_messages(void **state)
{
	(void)state;
	expect_refused("SPARK_WORKERS", "-3", "expected");
	expect_refused("SPARK_WORKERS", "0", "expected");
	expect_refused("SPARK_WORKERS", "two", "expected");
	expect_refused("CELERY_WORKER_CONCURRENCY", "1.5", "expected");
	expect_refused("CELERY_WORKER_POOL", "gevent", "prefork, threads, solo");
	expect_refused("CELERY_WORKER_POOL", "eventlet", "prefork");
	expect_refused("SPARK_LOGLEVEL", "loud", "debug");
	expect_refused("CELERY_BROKER_URL", "nonsense", "redis://");
	expect_refused("CELERY_WORKER_MAX_TASKS_PER_CHILD", "-1", "expected");
	expect_refused("CELERY_WORKER_MAX_MEMORY_PER_CHILD", "lots", "200MB");
	expect_refused("CELERY_TASK_TIME_LIMIT", "-5", "expected");
	expect_refused("CELERY_TASK_SERIALIZER", "pickle", "json");
	expect_refused("CELERY_RESULT_SERIALIZER", "msgpack", "json");
	expect_refused("CELERY_TASK_RETRY_BACKOFF", "maybe", "True");
	expect_refused("DATABASE_URL", "mysql://db/x", "postgresql://");
	expect_refused("SPARK_QUEUES", " , ", "queue");

	/* a flag is named as the flag and its variable */
	struct spark_config c;
	char err[512];
	struct config_override ov[] = {{"SPARK_WORKERS", "--workers", "-3"}};
	assert_int_equal(load(&c, ov, 1, "", err), -1);
	assert_contains(err, "--workers");
	assert_contains(err, "-3");
	assert_contains(err, "SPARK_WORKERS");

	/* a bad value in the env file names the file as its source */
	write_file(envpath, "CELERY_WORKER_POOL = gevent\n");
	assert_int_equal(load(&c, NULL, 0, envpath, err), -1);
	assert_contains(err, "CELERY_WORKER_POOL");
	assert_contains(err, "gevent");
	assert_contains(err, "env file");

	/* an unreadable env file names its path */
	assert_int_equal(load(&c, NULL, 0, "/nonexistent/spark.env", err), -1);
	assert_contains(err, "/nonexistent/spark.env");
	assert_int_equal(load(&c, NULL, 0, tmpdir, err), -1); /* a directory */
	assert_contains(err, tmpdir);
}

static void
test_memory_units(void **state)
{
	(void)state;
	assert_int_equal(parse_memory_kib("200000"), 200000);
	assert_int_equal(parse_memory_kib("0"), 0);
	assert_int_equal(parse_memory_kib("512k"), 512);
	assert_int_equal(parse_memory_kib("512KB"), 512);
	assert_int_equal(parse_memory_kib("200MB"), 200 * 1024);
	assert_int_equal(parse_memory_kib("200m"), 200 * 1024);
	assert_int_equal(parse_memory_kib("1G"), 1024 * 1024);
	assert_int_equal(parse_memory_kib("1GiB"), 1024 * 1024);
	assert_int_equal(parse_memory_kib("1.5G"), 1536 * 1024);
	assert_int_equal(parse_memory_kib("2048b"), 2);
	assert_int_equal(parse_memory_kib(""), -1);
	assert_int_equal(parse_memory_kib("-1"), -1);
	assert_int_equal(parse_memory_kib("MB"), -1);
	assert_int_equal(parse_memory_kib("10 parsecs"), -1);
	assert_int_equal(parse_memory_kib("1e30G"), -1);
	assert_int_equal(parse_memory_kib(NULL), -1);

	struct spark_config c;
	char err[512];
	setenv("CELERY_WORKER_MAX_MEMORY_PER_CHILD", "150MB", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.max_memory_kib, 150 * 1024);
	config_free(&c);
	setenv("CELERY_WORKER_MAX_MEMORY_PER_CHILD", "150000", 1); /* Celery's unit: KiB */
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.max_memory_kib, 150000);
	config_free(&c);
	unsetenv("CELERY_WORKER_MAX_MEMORY_PER_CHILD");
}

static void
test_soft_above_hard(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	setenv("CELERY_TASK_TIME_LIMIT", "10", 1);
	setenv("CELERY_TASK_SOFT_TIME_LIMIT", "20", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), -1);
	assert_contains(err, "CELERY_TASK_SOFT_TIME_LIMIT");
	assert_contains(err, "20");
	assert_contains(err, "CELERY_TASK_TIME_LIMIT");
	assert_contains(err, "10");

	setenv("CELERY_TASK_SOFT_TIME_LIMIT", "10", 1); /* equal is fine */
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	config_free(&c);

	/* only the hard limit lowered: the default soft limit follows it down */
	unsetenv("CELERY_TASK_SOFT_TIME_LIMIT");
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_true(c.soft_time_limit <= c.time_limit);
	config_free(&c);

	/* hard limit 0 = none: any soft limit is fine */
	setenv("CELERY_TASK_TIME_LIMIT", "0", 1);
	setenv("CELERY_TASK_SOFT_TIME_LIMIT", "20", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	config_free(&c);
	unsetenv("CELERY_TASK_TIME_LIMIT");
	unsetenv("CELERY_TASK_SOFT_TIME_LIMIT");
}

static void
test_solo_forces_concurrency(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	setenv("CELERY_WORKER_POOL", "solo", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.concurrency, 1);
	assert_false(c.concurrency_forced); /* nothing was asked: no warning */
	config_free(&c);
	struct config_override ov[] = {{"CELERY_WORKER_CONCURRENCY", "--concurrency", "4"}};
	assert_int_equal(load(&c, ov, 1, "", err), 0);
	assert_int_equal(c.pool, SPARK_POOL_SOLO);
	assert_int_equal(c.concurrency, 1);
	assert_true(c.concurrency_forced);
	config_free(&c);
	setenv("CELERY_WORKER_POOL", "threads", 1);
	assert_int_equal(load(&c, ov, 1, "", err), 0);
	assert_int_equal(c.concurrency, 4);
	assert_false(c.concurrency_forced);
	config_free(&c);
	unsetenv("CELERY_WORKER_POOL");
}

static void
expect_secret_hidden(const char *var, const char *value)
{
	struct spark_config c;
	char err[512];
	setenv(var, value, 1);
	int rc = load(&c, NULL, 0, "", err);
	unsetenv(var);
	assert_int_equal(rc, -1);
	assert_contains(err, var);
	assert_lacks(err, "hunter2");
}

static void
test_no_password_in_messages(void **state)
{
	(void)state;
	expect_secret_hidden("CELERY_BROKER_URL", "redis://:hunter2@host:notaport/0");
	expect_secret_hidden("CELERY_BROKER_URL", "redis://user:hunter2@host:99999/0");
	expect_secret_hidden("CELERY_BROKER_URL", "redis://user:hunter2@host/notadb");
	expect_secret_hidden("CELERY_BROKER_URL", "rediss://:hunter2@host:6379/0");
	expect_secret_hidden("CELERY_RESULT_BACKEND", "rediss://:hunter2@host:6379/0");
	expect_secret_hidden("AUTOMAGIK_SPARK_CELERY_BROKER_URL", "rediss://:hunter2@host/0");
	expect_secret_hidden("DATABASE_URL", "mysql://user:hunter2@db/spark");

	/* from a flag, too */
	struct spark_config c;
	char err[512];
	struct config_override ov[] = {{"CELERY_BROKER_URL", "--broker", "redis://:hunter2@h:0/0"}};
	assert_int_equal(load(&c, ov, 1, "", err), -1);
	assert_lacks(err, "hunter2");

	/* a valid URL keeps its password for the connection, and only there */
	setenv("CELERY_BROKER_URL", "redis://:hunter2@127.0.0.1:6390/4", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_string_equal(c.broker.password, "hunter2");
	assert_int_equal(c.broker.db, 4);
	config_free(&c);
	unsetenv("CELERY_BROKER_URL");
}

static void
test_export_round_trip(void **state)
{
	(void)state;
	struct spark_config a, b;
	char err[512];
	write_file(envpath, "SPARK_WORKERS = 3\nCELERY_WORKER_MAX_MEMORY_PER_CHILD = 150MB\nSPARK_QUEUES = a, b,c\n"
	                    "CELERY_RESULT_BACKEND = redis://:pw@h:1/2\nCELERY_TASK_TIME_LIMIT = 60\n"
	                    "SPARK_LOG_MAX_BYTES = 1MB\n");
	struct config_override ov[] = {{"CELERY_WORKER_CONCURRENCY", "--concurrency", "2"}};
	assert_int_equal(load(&a, ov, 1, envpath, err), 0);
	config_export(&a);
	/* a child reads exactly this environment and no env file */
	assert_int_equal(load(&b, NULL, 0, NULL, err), 0);
	assert_null(b.env_file);
	assert_int_equal(b.workers, 3);
	assert_int_equal(b.concurrency, 2);
	assert_int_equal(b.max_memory_kib, 150 * 1024);
	assert_int_equal(b.nqueues, 3);
	assert_string_equal(b.queues[0], "a");
	assert_string_equal(b.queues[1], "b");
	assert_string_equal(b.queues[2], "c");
	assert_string_equal(b.result_backend, "redis://:pw@h:1/2");
	assert_true(b.time_limit == 60);
	assert_true(b.soft_time_limit == a.soft_time_limit);
	assert_int_equal(b.log_max_bytes, a.log_max_bytes);
	assert_int_equal(b.log_max_bytes, 1024 * 1024);
	assert_string_equal(b.socket_path, a.socket_path);
	config_free(&a);
	config_free(&b);
	for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
		unsetenv(vars[i]);
}

/* SPARK_MAX_MESSAGE_BYTES (bytes unless a unit says otherwise), SPARK_DEADLETTER_MAX, SPARK_POISON_DELIVERIES */
static void
test_poison_limits(void **state)
{
	(void)state;
	struct spark_config c;
	char err[512];
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.max_message_bytes, 16 * 1024 * 1024);
	assert_int_equal(c.deadletter_max, 10000);
	assert_int_equal(c.poison_deliveries, 3);
	config_free(&c);
	setenv("SPARK_MAX_MESSAGE_BYTES", "65536", 1);
	setenv("SPARK_DEADLETTER_MAX", "5", 1);
	setenv("SPARK_POISON_DELIVERIES", "1", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.max_message_bytes, 65536);
	assert_int_equal(c.deadletter_max, 5);
	assert_int_equal(c.poison_deliveries, 1);
	config_free(&c);
	setenv("SPARK_MAX_MESSAGE_BYTES", "2MB", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.max_message_bytes, 2 * 1024 * 1024);
	config_free(&c);
	/* what the export writes reads back the same */
	setenv("SPARK_MAX_MESSAGE_BYTES", "1025b", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_int_equal(c.max_message_bytes, 1025);
	config_free(&c);
	const char *bad_size[] = {"100", "1T", "1.5", "-1", "1G"};
	for (size_t i = 0; i < sizeof bad_size / sizeof bad_size[0]; i++) {
		setenv("SPARK_MAX_MESSAGE_BYTES", bad_size[i], 1);
		assert_int_equal(load(&c, NULL, 0, "", err), -1);
		assert_non_null(strstr(err, "SPARK_MAX_MESSAGE_BYTES"));
	}
	unsetenv("SPARK_MAX_MESSAGE_BYTES");
	setenv("SPARK_DEADLETTER_MAX", "0", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), -1);
	assert_non_null(strstr(err, "SPARK_DEADLETTER_MAX"));
	unsetenv("SPARK_DEADLETTER_MAX");
	setenv("SPARK_POISON_DELIVERIES", "0", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), -1);
	assert_non_null(strstr(err, "SPARK_POISON_DELIVERIES"));
	unsetenv("SPARK_POISON_DELIVERIES");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_poison_limits),
	    cmocka_unit_test_setup(test_defaults, setup),
	    cmocka_unit_test_setup(test_precedence, setup),
	    cmocka_unit_test_setup(test_env_file_selection, setup),
	    cmocka_unit_test_setup(test_aliases, setup),
	    cmocka_unit_test_setup(test_validation_messages, setup),
	    cmocka_unit_test_setup(test_memory_units, setup),
	    cmocka_unit_test_setup(test_soft_above_hard, setup),
	    cmocka_unit_test_setup(test_solo_forces_concurrency, setup),
	    cmocka_unit_test_setup(test_no_password_in_messages, setup),
	    cmocka_unit_test_setup(test_export_round_trip, setup),
	};
	return cmocka_run_group_tests_name("config", tests, group_setup, group_teardown);
}

/* The control socket's path: the default (RUNTIME_DIRECTORY), SPARK_SOCKET and the pid file beside it, and the
 * socket-only resolution of status, logs and stop (common/config-socket.c). */
#include "config_fixture.h"

static void
test_default_socket(void **state)
{
	(void)state;
	setenv("RUNTIME_DIRECTORY", "/run/spark:/run/other", 1);
	char *s = config_default_socket();
	assert_string_equal(s, "/run/spark/sparkd.sock");
	free(s);
	unsetenv("RUNTIME_DIRECTORY");
	struct spark_config c;
	char err[512];
	setenv("SPARK_SOCKET", "/x/y/ctl.sock", 1);
	assert_int_equal(load(&c, NULL, 0, "", err), 0);
	assert_string_equal(c.socket_path, "/x/y/ctl.sock");
	assert_string_equal(c.pid_file, "/x/y/sparkd.pid"); /* the pid file sits next to the socket */
	config_free(&c);
}

/* status, logs and stop: only the socket is read, and a bad env file is a warning that leaves its good lines */
static void
test_socket_only_resolution(void **state)
{
	(void)state;
	char warn[512];
	write_file(".env", "this line is not a variable\nSPARK_SOCKET = /from/file.sock\nCELERY_WORKER_POOL = gevent\n"
	                   "A B = c\n");
	char *s = config_socket_resolve(NULL, NULL, warn, sizeof warn);
	assert_string_equal(s, "/from/file.sock");
	assert_contains(warn, ".env:1: expected KEY=value");
	assert_contains(warn, "and 1 more bad line");
	free(s);
	/* the same file is refused where the whole configuration is read */
	struct spark_config c;
	char err[512];
	assert_int_equal(load(&c, NULL, 0, NULL, err), -1);
	assert_contains(err, ".env:1");

	/* the environment wins and the file is not read at all */
	setenv("SPARK_SOCKET", "/from/env.sock", 1);
	s = config_socket_resolve(NULL, NULL, warn, sizeof warn);
	assert_string_equal(s, "/from/env.sock");
	assert_string_equal(warn, "");
	free(s);
	s = config_socket_resolve("/from/flag.sock", NULL, warn, sizeof warn);
	assert_string_equal(s, "/from/flag.sock");
	free(s);
	unsetenv("SPARK_SOCKET");

	/* an env file that cannot be read: a warning, and the default socket */
	setenv("SPARK_ENV_FILE", "/nonexistent/spark.env", 1);
	s = config_socket_resolve(NULL, NULL, warn, sizeof warn);
	char *def = config_default_socket();
	assert_string_equal(s, def);
	assert_contains(warn, "/nonexistent/spark.env");
	free(s);
	free(def);
	unsetenv("SPARK_ENV_FILE");
	unlink(".env");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup(test_default_socket, setup),
	    cmocka_unit_test_setup(test_socket_only_resolution, setup),
	};
	return cmocka_run_group_tests_name("config-socket", tests, group_setup, group_teardown);
}

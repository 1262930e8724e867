/* The control socket's path: the default, and what the socket-only commands (status, logs, stop) read. */
#include "config.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "rundir.h"
#include "util.h"

char *
config_default_socket(void)
{
	const char *rt = getenv("RUNTIME_DIRECTORY");
	if (rt != NULL && *rt) {
		/* systemd may list several, colon-separated: the first is ours */
		size_t n = strcspn(rt, ":");
		return xasprintf("%.*s/sparkd.sock", (int)n, rt);
	}
	if (geteuid() == 0)
		return xstrdup("/run/spark/sparkd.sock");
	const char *x = getenv("XDG_RUNTIME_DIR");
	if (x != NULL && *x == '/')
		return xasprintf("%s/spark/sparkd.sock", x);
	char *fb = rundir_fallback();
	char *p = xasprintf("%s/sparkd.sock", fb);
	free(fb);
	return p;
}

static void
socket_cb(const char *key, const char *value, void *arg)
{
	char **out = arg;
	if (strcmp(key, "SPARK_SOCKET") == 0) {
		free(*out);
		*out = xstrdup(value);
	}
}

char *
config_socket_resolve(const char *flag_value, const char *env_file, char *warn, size_t warnlen)
{
	if (warnlen > 0)
		warn[0] = '\0';
	if (flag_value != NULL && flag_value[0] != '\0')
		return xstrdup(flag_value);
	const char *v = getenv("SPARK_SOCKET");
	char *found = NULL;
	if (v != NULL) {
		/* the environment wins over the file: the file is not even opened */
		if (v[0] != '\0')
			return xstrdup(v);
	} else {
		bool explicit;
		const char *path = envfile_pick(env_file, &explicit);
		char *buf = NULL;
		if (path != NULL && envfile_read(path, &buf, warn, warnlen) == 0) {
			int nbad = envfile_parse_lines(path, buf, true, socket_cb, &found, warn, warnlen);
			size_t used = strlen(warn);
			if (nbad > 1 && used < warnlen)
				snprintf(warn + used, warnlen - used, " (and %d more bad line%s)", nbad - 1,
				         nbad == 2 ? "" : "s");
		}
		free(buf);
	}
	if (found != NULL && found[0] != '\0')
		return found;
	free(found);
	return config_default_socket();
}

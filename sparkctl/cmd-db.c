/*
 * sparkctl db migrate: the schema belongs to spark-worker (it owns the PostgreSQL code), so we only find it and
 * become `spark-worker --migrate`; its exit status is ours.
 */
#include "sparkctl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int
cmd_db_migrate(struct ctl *ctl, const struct ctl_args *a)
{
	char *worker = ctl_find_program("spark-worker");
	if (worker == NULL) {
		out_err(ctl,
		        "cannot find spark-worker next to %s, in ../sbin or on PATH; install it or add its directory "
		        "to PATH",
		        ctl->prog);
		return CTL_EXIT_ERROR;
	}
	/* the worker reads its configuration itself; an explicit env file reaches it the documented way */
	if (a->set[OPT_ENV_FILE] && setenv("SPARK_ENV_FILE", a->str[OPT_ENV_FILE], 1) < 0) {
		out_err(ctl, "cannot set SPARK_ENV_FILE: %s", strerror(errno));
		free(worker);
		return CTL_EXIT_ERROR;
	}
	char *const argv[] = {"spark-worker", "--migrate", NULL};
	fflush(stdout);
	fflush(stderr);
	execv(worker, argv);
	out_err(ctl, "cannot run %s: %s", worker, strerror(errno));
	free(worker);
	return CTL_EXIT_ERROR;
}

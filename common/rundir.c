#include "rundir.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

char *
rundir_fallback(void)
{
	return xasprintf("/tmp/spark-%u", (unsigned)geteuid());
}

bool
rundir_in_fallback(const char *path)
{
	char *fb = rundir_fallback();
	size_t fl = strlen(fb);
	bool in = strncmp(path, fb, fl) == 0 && (path[fl] == '\0' || path[fl] == '/');
	free(fb);
	return in;
}

const char *
rundir_unsafe(const struct stat *st, unsigned euid, bool strict)
{
	if (S_ISLNK(st->st_mode))
		return "it is a symbolic link";
	if (!S_ISDIR(st->st_mode))
		return "it is not a directory";
	if (st->st_uid != euid && (strict || st->st_uid != 0))
		return "it is owned by another user";
	/* a sticky /tmp is shared by design: others cannot rename or remove what we put there */
	if ((st->st_mode & (S_IWGRP | S_IWOTH)) != 0 && (strict || !(st->st_mode & S_ISVTX)))
		return "it is writable by group or others";
	return NULL;
}

/* lstat and judge one directory; -1 with the line in err. */
static int
check_one(const char *dir, bool strict, const char *what, char *err, size_t errlen)
{
	struct stat st;
	if (lstat(dir, &st) < 0) {
		snprintf(err, errlen, "cannot use the %s directory %s: %s", what, dir, strerror(errno));
		return -1;
	}
	const char *why = rundir_unsafe(&st, (unsigned)geteuid(), strict);
	if (why == NULL)
		return 0;
	if (strcmp(why, "it is owned by another user") == 0)
		snprintf(err, errlen, "refusing the %s directory %s: it is owned by uid %u, not by uid %u", what, dir,
		         (unsigned)st.st_uid, (unsigned)geteuid());
	else if (strcmp(why, "it is writable by group or others") == 0)
		snprintf(err, errlen, "refusing the %s directory %s: it is writable by group or others (mode %04o)",
		         what, dir, (unsigned)(st.st_mode & 07777));
	else
		snprintf(err, errlen, "refusing the %s directory %s: %s", what, dir, why);
	return -1;
}

int
rundir_prepare(const char *dir, unsigned mode, const char *what, char *err, size_t errlen)
{
	char *fb = rundir_fallback();
	bool in_fallback = rundir_in_fallback(dir);
	int rc = 0;
	if (in_fallback) {
		/* the one directory sparkd makes in a place everyone writes: it must be ours alone */
		if (mkdir(fb, 0700) < 0 && errno != EEXIST) {
			snprintf(err, errlen, "cannot create the %s directory %s: %s", what, fb, strerror(errno));
			rc = -1;
		} else {
			rc = check_one(fb, true, what, err, errlen);
		}
	}
	if (rc == 0 && mkdir_p(dir, mode) < 0) {
		snprintf(err, errlen, "cannot create the %s directory %s: %s", what, dir, strerror(errno));
		rc = -1;
	}
	if (rc == 0 && strcmp(dir, fb) != 0)
		rc = check_one(dir, in_fallback, what, err, errlen);
	free(fb);
	return rc;
}

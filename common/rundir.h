/*
 * Runtime directories (the control socket's, the pid file's): created when missing and refused when another user
 * could replace what sparkd puts there, as tmux does with /tmp/tmux-UID.
 */
#ifndef SPARK_RUNDIR_H
#define SPARK_RUNDIR_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>

/* The per-user fallback under /tmp when no runtime directory is known: "/tmp/spark-EUID" (new string). */
char *rundir_fallback(void);

/* Is path the fallback or inside it? */
bool rundir_in_fallback(const char *path);

/*
 * Why a directory with these attributes is unsafe for a daemon running as euid, or NULL when it is safe. Safe: a
 * directory (not a symbolic link), owned by euid or root (only euid when strict, as for the fallback), and not
 * writable by group or others unless sticky (only without exception when strict).
 */
const char *rundir_unsafe(const struct stat *st, unsigned euid, bool strict);

/*
 * Create dir (mode for what is created; the fallback itself always 0700) and check it, and the fallback too when
 * dir lies in it. Returns 0, or -1 with one line in err naming the path and the problem. what names the use
 * ("socket", "pid file") for the message.
 */
int rundir_prepare(const char *dir, unsigned mode, const char *what, char *err, size_t errlen);

#endif

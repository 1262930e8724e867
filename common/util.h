/* Small helpers shared by sparkd, spark-worker and sparkctl. */
#ifndef SPARK_UTIL_H
#define SPARK_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SPARK_VERSION "0.1.0"

/* Allocation helpers: print one line and exit(70) on OOM. */
void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
char *xvasprintf(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));

/* Bounded copy; always NUL-terminates when size > 0. Returns strlen(src). */
size_t spark_strlcpy(char *dst, const char *src, size_t size);

/* Wall clock as seconds since the epoch (with fraction), and a monotonic clock. */
double now_wall(void);
double now_mono(void);

/* Strict number parsing: whole string, no overflow. Return 0 on success, -1 otherwise. */
int parse_long(const char *s, long *out);
int parse_double(const char *s, double *out);
/* true/false, yes/no, on/off, 1/0 (case-insensitive). */
int parse_bool(const char *s, bool *out);

/* Trim ASCII whitespace in place; returns s advanced past leading space. */
char *str_trim(char *s);

/* Resident set size of a process in KiB from /proc; -1 if unknown. pid 0 = self. */
long proc_rss_kib(int pid);

/* Set O_NONBLOCK / FD_CLOEXEC. Return 0 or -1 with errno. */
int fd_set_nonblock(int fd);
int fd_set_cloexec(int fd);

/* mkdir -p with the given mode for every created component. */
int mkdir_p(const char *path, unsigned mode);

/* Host name (cached, never NULL). */
const char *spark_hostname(void);

/* Format seconds as "3h 24m", "5m 2s", "12s". */
void fmt_duration(char *buf, size_t len, double seconds);

#endif

/* Logging for all three programs: one line per call, one write(2) per line. */
#ifndef SPARK_LOG_H
#define SPARK_LOG_H

#include <stdbool.h>

enum spark_log_level {
	SPARK_LOG_DEBUG = 0,
	SPARK_LOG_INFO,
	SPARK_LOG_WARNING,
	SPARK_LOG_ERROR,
	SPARK_LOG_CRITICAL,
};

/*
 * Line format (Celery's, so operators recognise it and sparkd can parse the level):
 *   [2026-11-26 19:14:27,123: INFO/TAG] message
 * With journal mode on, the line is prefixed with "<N>" (syslog priority).
 */
void log_init(const char *tag, int level);
void log_set_tag(const char *tag);
void log_set_level(int level);
int log_get_level(void);
const char *log_get_tag(void);
void log_set_journal(bool on);
bool log_get_journal(void);

/* "debug" .. "critical" (also "warn", "fatal"; case-insensitive) -> level, or -1. */
int log_level_parse(const char *s);
const char *log_level_name(int level); /* "INFO" ... */
int log_level_syslog(int level);       /* syslog priority 7 .. 2 */

/* Parse the level out of a line in our format; -1 when the line has no recognisable prefix.
 * On success *msg_off is the offset of the message text. */
int log_parse_line(const char *line, int *msg_off);

void log_msg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* As log_warnx, with ": strerror(errno)" appended. */
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_errorx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void fatalx(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

#endif

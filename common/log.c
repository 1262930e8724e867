#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

static struct {
	char tag[64];
	int level;
	bool journal;
} lg = {"spark", SPARK_LOG_INFO, false};

static const char *names[] = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"};

void
log_init(const char *tag, int level)
{
	log_set_tag(tag);
	lg.level = level;
}

void
log_set_tag(const char *tag)
{
	spark_strlcpy(lg.tag, tag, sizeof lg.tag);
}

void
log_set_level(int level)
{
	lg.level = level;
}

int
log_get_level(void)
{
	return lg.level;
}

const char *
log_get_tag(void)
{
	return lg.tag;
}

void
log_set_journal(bool on)
{
	lg.journal = on;
}

bool
log_get_journal(void)
{
	return lg.journal;
}

int
log_level_parse(const char *s)
{
	if (s == NULL)
		return -1;
	for (int i = 0; i < 5; i++)
		if (strcasecmp(s, names[i]) == 0)
			return i;
	if (strcasecmp(s, "warn") == 0)
		return SPARK_LOG_WARNING;
	if (strcasecmp(s, "fatal") == 0)
		return SPARK_LOG_CRITICAL;
	return -1;
}

const char *
log_level_name(int level)
{
	if (level < 0 || level > SPARK_LOG_CRITICAL)
		return "INFO";
	return names[level];
}

int
log_level_syslog(int level)
{
	static const int prio[] = {7, 6, 4, 3, 2};
	if (level < 0 || level > SPARK_LOG_CRITICAL)
		return 6;
	return prio[level];
}

int
log_parse_line(const char *line, int *msg_off)
{
	/* [YYYY-MM-DD HH:MM:SS,mmm: LEVEL/TAG] msg */
	if (line[0] != '[')
		return -1;
	const char *c = strstr(line, ": ");
	if (c == NULL || c - line > 32)
		return -1;
	const char *lv = c + 2;
	const char *slash = strchr(lv, '/');
	const char *close = strchr(lv, ']');
	if (slash == NULL || close == NULL || slash > close || slash - lv > 10)
		return -1;
	char buf[16];
	memcpy(buf, lv, (size_t)(slash - lv));
	buf[slash - lv] = '\0';
	int level = log_level_parse(buf);
	if (level < 0)
		return -1;
	const char *m = close + 1;
	if (*m == ' ')
		m++;
	if (msg_off)
		*msg_off = (int)(m - line);
	return level;
}

static void
log_vemit(int level, const char *fmt, va_list ap, const char *suffix)
{
	if (level < lg.level)
		return;
	char line[8192];
	size_t off = 0;
	struct timeval tv;
	gettimeofday(&tv, NULL);
	struct tm tm;
	gmtime_r(&tv.tv_sec, &tm);
	if (lg.journal)
		off += (size_t)snprintf(line, sizeof line, "<%d>", log_level_syslog(level));
	off += strftime(line + off, sizeof line - off, "[%Y-%m-%d %H:%M:%S", &tm);
	off += (size_t)snprintf(line + off, sizeof line - off, ",%03d: %s/%s] ", (int)(tv.tv_usec / 1000),
	                        log_level_name(level), lg.tag);
	int n = vsnprintf(line + off, sizeof line - off, fmt, ap);
	if (n < 0)
		n = 0;
	off = off + (size_t)n < sizeof line - 1 ? off + (size_t)n : sizeof line - 2;
	if (suffix != NULL)
		off += (size_t)snprintf(line + off, sizeof line - off, ": %s", suffix);
	if (off > sizeof line - 2)
		off = sizeof line - 2;
	/* One line stays one line: embedded newlines would split it in the capture. */
	for (size_t i = 0; i < off; i++)
		if (line[i] == '\n' || line[i] == '\r')
			line[i] = ' ';
	line[off++] = '\n';
	ssize_t w = write(STDERR_FILENO, line, off);
	(void)w;
}

void
log_msg(int level, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_vemit(level, fmt, ap, NULL);
	va_end(ap);
}

#define LOG_FN(name, level)                                                                                            \
	void name(const char *fmt, ...)                                                                                \
	{                                                                                                              \
		va_list ap;                                                                                            \
		va_start(ap, fmt);                                                                                     \
		log_vemit(level, fmt, ap, NULL);                                                                       \
		va_end(ap);                                                                                            \
	}
LOG_FN(log_debug, SPARK_LOG_DEBUG)
LOG_FN(log_info, SPARK_LOG_INFO)
LOG_FN(log_warnx, SPARK_LOG_WARNING)
LOG_FN(log_errorx, SPARK_LOG_ERROR)

void
log_warn(const char *fmt, ...)
{
	int saved = errno;
	va_list ap;
	va_start(ap, fmt);
	log_vemit(SPARK_LOG_WARNING, fmt, ap, strerror(saved));
	va_end(ap);
	errno = saved;
}

void
fatal(const char *fmt, ...)
{
	int saved = errno;
	va_list ap;
	va_start(ap, fmt);
	log_vemit(SPARK_LOG_CRITICAL, fmt, ap, strerror(saved));
	va_end(ap);
	exit(1);
}

void
fatalx(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_vemit(SPARK_LOG_CRITICAL, fmt, ap, NULL);
	va_end(ap);
	exit(1);
}

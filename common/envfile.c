/*
 * The env file (DESIGN §5): KEY=value lines, `export` prefixes, comments and blank lines, single or double quotes
 * (backslash escapes in double quotes), inline comments after unquoted values. Parsed by hand: a few lines, and no
 * linked library reads this format.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

static int
envfile_line(char *line, const char *name, int lineno, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	char *p = str_trim(line);
	if (*p == '\0' || *p == '#')
		return 0;
	if (strncmp(p, "export", 6) == 0 && isspace((unsigned char)p[6]))
		p = str_trim(p + 6);
	char *eq = strchr(p, '=');
	if (eq == NULL) {
		snprintf(err, errlen, "%s:%d: expected KEY=value", name, lineno);
		return -1;
	}
	*eq = '\0';
	char *key = str_trim(p);
	if (*key == '\0') {
		snprintf(err, errlen, "%s:%d: empty variable name", name, lineno);
		return -1;
	}
	for (char *k = key; *k; k++) {
		if (!isalnum((unsigned char)*k) && *k != '_') {
			snprintf(err, errlen, "%s:%d: bad variable name '%s' (letters, digits and _ only)", name,
			         lineno, key);
			return -1;
		}
	}
	char *v = str_trim(eq + 1);
	if (*v == '"' || *v == '\'') {
		char q = *v++;
		char *out = v, *in = v;
		while (*in && *in != q) {
			if (q == '"' && *in == '\\' && in[1] != '\0') {
				in++;
				*out++ = *in == 'n' ? '\n' : *in;
				in++;
			} else
				*out++ = *in++;
		}
		if (*in != q) {
			snprintf(err, errlen, "%s:%d: unterminated quote in the value of %s", name, lineno, key);
			return -1;
		}
		*out = '\0';
		char *rest = str_trim(in + 1);
		if (*rest != '\0' && *rest != '#') {
			snprintf(err, errlen, "%s:%d: text after the closing quote in %s", name, lineno, key);
			return -1;
		}
	} else {
		/* unquoted: an inline comment starts at " #" */
		for (char *c = v; *c; c++) {
			if (*c == '#' && (c == v || isspace((unsigned char)c[-1]))) {
				*c = '\0';
				break;
			}
		}
		v = str_trim(v);
	}
	cb(key, v, arg);
	return 0;
}

/* Strict: the first bad line ends the parse with -1. Lenient: bad lines are skipped, the first one's reason is kept
 * in err, and the number of bad lines is returned. */
int
envfile_parse_lines(const char *name, const char *buf, bool lenient, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	char *copy = xstrdup(buf);
	int lineno = 0, nbad = 0;
	char *s = copy;
	for (;;) {
		char *nl = strchr(s, '\n');
		if (nl)
			*nl = '\0';
		lineno++;
		char lerr[512];
		if (envfile_line(s, name, lineno, cb, arg, lerr, sizeof lerr) < 0) {
			if (nbad++ == 0)
				snprintf(err, errlen, "%s", lerr);
			if (!lenient)
				break;
		}
		if (!nl)
			break;
		s = nl + 1;
	}
	free(copy);
	return lenient ? nbad : (nbad ? -1 : 0);
}

int
envfile_parse_buf(const char *name, const char *buf, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	return envfile_parse_lines(name, buf, false, cb, arg, err, errlen);
}

/* The whole file, NUL-terminated, in *out (caller frees); -1 with the reason in err. */
int
envfile_read(const char *path, char **out, char *err, size_t errlen)
{
	FILE *f = fopen(path, "re");
	if (f == NULL) {
		snprintf(err, errlen, "cannot read env file %s: %s", path, strerror(errno));
		return -1;
	}
	size_t cap = 4096, len = 0;
	char *buf = xmalloc(cap);
	size_t n;
	while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
		len += n;
		if (len > 4 * 1024 * 1024) {
			snprintf(err, errlen, "env file %s is larger than 4 MiB", path);
			fclose(f);
			free(buf);
			return -1;
		}
		if (cap - len - 1 == 0)
			buf = xrealloc(buf, cap *= 2);
	}
	int rerr = ferror(f);
	fclose(f);
	if (rerr) {
		snprintf(err, errlen, "cannot read env file %s: read error", path);
		free(buf);
		return -1;
	}
	buf[len] = '\0';
	if (memchr(buf, '\0', len) != NULL) {
		snprintf(err, errlen, "env file %s contains NUL bytes", path);
		free(buf);
		return -1;
	}
	*out = buf;
	return 0;
}

int
envfile_parse(const char *path, envfile_cb cb, void *arg, char *err, size_t errlen)
{
	char *buf;
	if (envfile_read(path, &buf, err, errlen) < 0)
		return -1;
	int rc = envfile_parse_buf(path, buf, cb, arg, err, errlen);
	free(buf);
	return rc;
}

const char *
envfile_pick(const char *env_file, bool *explicit)
{
	*explicit = true;
	if (env_file != NULL)
		return env_file[0] ? env_file : NULL;
	const char *e = getenv("SPARK_ENV_FILE");
	if (e != NULL)
		return e[0] ? e : NULL;
	*explicit = false;
	if (access(".env", F_OK) == 0)
		return ".env";
	return NULL;
}

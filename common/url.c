#include "url.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static char *
url_part(CURLU *h, CURLUPart part, unsigned flags)
{
	char *v = NULL;
	if (curl_url_get(h, part, &v, flags) != CURLUE_OK || v == NULL)
		return NULL;
	char *r = xstrdup(v);
	curl_free(v);
	return r;
}

static int
query_db(const char *query, int *db)
{
	/* db=N among &-separated pairs */
	for (const char *p = query; p && *p;) {
		const char *amp = strchr(p, '&');
		size_t n = amp ? (size_t)(amp - p) : strlen(p);
		if (n > 3 && strncmp(p, "db=", 3) == 0) {
			char buf[16];
			if (n - 3 >= sizeof buf)
				return -1;
			memcpy(buf, p + 3, n - 3);
			buf[n - 3] = '\0';
			long v;
			if (parse_long(buf, &v) < 0 || v < 0 || v > 1000000)
				return -1;
			*db = (int)v;
		}
		p = amp ? amp + 1 : NULL;
	}
	return 0;
}

int
redis_url_parse(const char *s, struct redis_url *u, char *err, size_t errlen)
{
	memset(u, 0, sizeof *u);
	u->port = 6379;
	if (s == NULL || *s == '\0') {
		snprintf(err, errlen, "empty URL; expected redis://[user:password@]host:port/db or unix:///path?db=N");
		return -1;
	}
	if (strncmp(s, "rediss://", 9) == 0) {
		snprintf(err, errlen, "rediss:// (TLS) is not supported by this hiredis build; use redis:// or unix://");
		return -1;
	}
	int is_unix = strncmp(s, "unix://", 7) == 0 || strncmp(s, "redis+socket://", 15) == 0;
	if (!is_unix && strncmp(s, "redis://", 8) != 0) {
		snprintf(err, errlen, "unsupported scheme; expected redis://[user:password@]host:port/db or unix:///path?db=N");
		return -1;
	}
	CURLU *h = curl_url();
	if (h == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	/* a unix socket URL has the shape of a file:// URL: let libcurl split path and query */
	char *asfile = is_unix ? xasprintf("file://%s", strstr(s, "://") + 3) : NULL;
	CURLUcode uc = curl_url_set(h, CURLUPART_URL, is_unix ? asfile : s, is_unix ? 0 : CURLU_NON_SUPPORT_SCHEME);
	free(asfile);
	if (uc != CURLUE_OK) {
		snprintf(err, errlen, "not a valid URL; expected redis://[user:password@]host:port/db or unix:///path?db=N");
		curl_url_cleanup(h);
		return -1;
	}
	int rc = -1;
	char *path = url_part(h, CURLUPART_PATH, CURLU_URLDECODE);
	char *query = url_part(h, CURLUPART_QUERY, 0);
	u->user = url_part(h, CURLUPART_USER, CURLU_URLDECODE);
	u->password = url_part(h, CURLUPART_PASSWORD, CURLU_URLDECODE);
	if (u->user != NULL && u->user[0] == '\0') {
		free(u->user);
		u->user = NULL;
	}
	if (is_unix) {
		if (path == NULL || path[0] != '/' || path[1] == '\0') {
			snprintf(err, errlen, "unix socket URL needs an absolute path: unix:///path/to/redis.sock?db=N");
			goto out;
		}
		u->path = xstrdup(path);
		if (query_db(query, &u->db) < 0) {
			snprintf(err, errlen, "bad db= in the query; expected a number 0..1000000");
			goto out;
		}
		if (query != NULL && strstr(query, "password=") != NULL) {
			snprintf(err, errlen, "a password for a unix socket is not supported in the URL; use redis://");
			goto out;
		}
	} else {
		u->host = url_part(h, CURLUPART_HOST, 0);
		if (u->host == NULL || u->host[0] == '\0') {
			snprintf(err, errlen, "missing host; expected redis://host:port/db");
			goto out;
		}
		/* [::1] comes back bracketed; hiredis wants the bare address. */
		size_t hl = strlen(u->host);
		if (hl > 2 && u->host[0] == '[' && u->host[hl - 1] == ']') {
			memmove(u->host, u->host + 1, hl - 2);
			u->host[hl - 2] = '\0';
		}
		char *port = url_part(h, CURLUPART_PORT, 0);
		if (port != NULL) {
			long p;
			if (parse_long(port, &p) < 0 || p < 1 || p > 65535) {
				snprintf(err, errlen, "bad port; expected 1..65535");
				free(port);
				goto out;
			}
			u->port = (int)p;
			free(port);
		}
		if (path != NULL && strcmp(path, "/") != 0 && path[0] != '\0') {
			long db;
			if (parse_long(path + 1, &db) < 0 || db < 0 || db > 1000000) {
				snprintf(err, errlen, "bad database number in the path; expected /N with N >= 0");
				goto out;
			}
			u->db = (int)db;
		}
		if (query_db(query, &u->db) < 0) {
			snprintf(err, errlen, "bad db= in the query; expected a number");
			goto out;
		}
	}
	rc = 0;
out:
	free(path);
	free(query);
	curl_url_cleanup(h);
	if (rc < 0)
		redis_url_free(u);
	return rc;
}

void
redis_url_free(struct redis_url *u)
{
	free(u->host);
	free(u->path);
	free(u->user);
	free(u->password);
	memset(u, 0, sizeof *u);
}

/* Mask a password=... query value in place. */
static void
redact_query(char *u)
{
	char *q = strchr(u, '?');
	while (q != NULL) {
		char *pw = strstr(q, "password=");
		if (pw == NULL)
			return;
		char *v = pw + 9;
		size_t n = strcspn(v, "&#");
		if (n > 0) {
			memmove(v + 3, v + n, strlen(v + n) + 1);
			memcpy(v, "***", 3);
		}
		q = v;
	}
}

char *
url_redact(const char *s)
{
	if (s == NULL)
		return xstrdup("");
	char *out;
	const char *scheme = strstr(s, "://");
	const char *auth = scheme ? scheme + 3 : s;
	const char *end = auth + strcspn(auth, "/?#");
	const char *at = NULL;
	for (const char *p = auth; p < end; p++)
		if (*p == '@')
			at = p;
	if (scheme == NULL) {
		/* not a URL we understand (a typo such as redis:/:pw@host): hide everything before the last '@' */
		const char *last = strrchr(s, '@');
		out = last ? xasprintf("***%s", last) : xstrdup(s);
	} else if (at == NULL) {
		out = xstrdup(s);
	} else {
		const char *colon = memchr(auth, ':', (size_t)(at - auth));
		/* user:pass@ keeps the user; a bare secret@ (redis://secret@host) is hidden whole */
		const char *cut = colon ? colon + 1 : auth;
		out = xasprintf("%.*s***%s", (int)(cut - s), s, at);
	}
	redact_query(out);
	return out;
}

char *
pg_url_normalize(const char *s)
{
	const char *plus = strchr(s, '+');
	const char *sep = strstr(s, "://");
	if (plus != NULL && sep != NULL && plus < sep && strncmp(s, "postgres", 8) == 0)
		return xasprintf("%.*s%s", (int)(plus - s), s, sep);
	return xstrdup(s);
}

#include "url.h"

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* The usage hint every refusal ends with. */
#define URL_FORMS "redis://[user:password@]host:port/db or unix:///path?db=N"

/*
 * Hand-written rather than libcurl's curl_url: common/ is linked into all three programs, and loading libcurl
 * (and the 30-odd libraries it pulls in) cost every spark-worker process about 7 MiB of resident memory.
 */

static int
url_hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Percent-decode n bytes into a new string; NULL for a malformed escape or %00 (which would cut the value). */
static char *
url_decode(const char *p, size_t n)
{
	char *out = xmalloc(n + 1), *o = out;
	for (size_t i = 0; i < n; i++) {
		if (p[i] != '%') {
			*o++ = p[i];
			continue;
		}
		int hi = i + 2 < n ? url_hexval(p[i + 1]) : -1;
		int lo = hi >= 0 ? url_hexval(p[i + 2]) : -1;
		if (lo < 0 || (hi == 0 && lo == 0)) {
			free(out);
			return NULL;
		}
		*o++ = (char)(hi << 4 | lo);
		i += 2;
	}
	*o = '\0';
	return out;
}

/* Host names as libcurl accepted them: anything but separators, quotes and shell-ish punctuation. */
static bool
url_host_ok(const char *h, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (strchr(" /:#?!@{}[]\\$'\"^`*<>=;,+&()%", h[i]) != NULL)
			return false;
	return n > 0;
}

/* The inside of [...]: an IPv6 address (hex digits, ':' and a dotted IPv4 tail), then an optional zone id
 * (%25eth0, RFC 6874). The address is copied with the zone as getaddrinfo takes it ("fe80::1%eth0"). */
static char *
url_ipv6(const char *h, size_t n)
{
	size_t alen = 0;
	while (alen < n && (url_hexval(h[alen]) >= 0 || h[alen] == ':' || h[alen] == '.'))
		alen++;
	if (alen < 2 || memchr(h, ':', alen) == NULL)
		return NULL;
	if (alen == n)
		return xstrndup(h, n);
	if (n - alen < 4 || strncmp(h + alen, "%25", 3) != 0)
		return NULL;
	for (size_t i = alen + 3; i < n; i++)
		if (!isalnum((unsigned char)h[i]) && strchr("-._~", h[i]) == NULL)
			return NULL;
	return xasprintf("%.*s%%%.*s", (int)alen, h, (int)(n - alen - 3), h + alen + 3);
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

/* user[:password] before the '@' of a redis:// URL, percent-decoded; an empty user is no user. */
static int
url_userinfo(const char *p, size_t n, struct redis_url *u, char *err, size_t errlen)
{
	const char *colon = memchr(p, ':', n);
	size_t ulen = colon ? (size_t)(colon - p) : n;
	if (ulen > 0 && (u->user = url_decode(p, ulen)) == NULL) {
		snprintf(err, errlen, "bad %%-escape in the user name; expected %%XX (not %%00)");
		return -1;
	}
	if (colon != NULL && (u->password = url_decode(colon + 1, n - ulen - 1)) == NULL) {
		snprintf(err, errlen, "bad %%-escape in the password; expected %%XX (not %%00)");
		return -1;
	}
	return 0;
}

/* host[:port] or [v6][:port] of a redis:// URL. */
static int
url_hostport(const char *p, size_t n, struct redis_url *u, char *err, size_t errlen)
{
	const char *port = NULL;
	if (n > 0 && p[0] == '[') {
		const char *close = memchr(p, ']', n);
		if (close == NULL || (u->host = url_ipv6(p + 1, (size_t)(close - p - 1))) == NULL) {
			snprintf(err, errlen, "bad IPv6 address; expected redis://[::1]:port/db");
			return -1;
		}
		const char *after = close + 1;
		if (after < p + n) {
			if (*after != ':') {
				snprintf(err, errlen, "not a valid URL; expected " URL_FORMS);
				return -1;
			}
			port = after + 1;
		}
	} else {
		const char *colon = memchr(p, ':', n);
		size_t hlen = colon ? (size_t)(colon - p) : n;
		if (colon != NULL)
			port = colon + 1;
		if (hlen == 0) {
			snprintf(err, errlen, "missing host; expected redis://host:port/db");
			return -1;
		}
		if (!url_host_ok(p, hlen)) {
			snprintf(err, errlen, "not a valid host name; expected " URL_FORMS);
			return -1;
		}
		u->host = xstrndup(p, hlen);
	}
	if (port != NULL && port < p + n) { /* "host:" alone keeps the default port, as libcurl did */
		size_t plen = (size_t)(p + n - port);
		long v = 0;
		for (size_t i = 0; i < plen; i++) {
			if (port[i] < '0' || port[i] > '9' || v > 65535) {
				v = -1;
				break;
			}
			v = v * 10 + (port[i] - '0');
		}
		if (v < 1 || v > 65535) {
			snprintf(err, errlen, "bad port; expected 1..65535");
			return -1;
		}
		u->port = (int)v;
	}
	return 0;
}

int
redis_url_parse(const char *s, struct redis_url *u, char *err, size_t errlen)
{
	memset(u, 0, sizeof *u);
	u->port = 6379;
	if (s == NULL || *s == '\0') {
		snprintf(err, errlen, "empty URL; expected " URL_FORMS);
		return -1;
	}
	if (strncmp(s, "rediss://", 9) == 0) {
		snprintf(err, errlen,
		         "rediss:// (TLS) is not supported by this hiredis build; use redis:// or unix://");
		return -1;
	}
	int is_unix = strncmp(s, "unix://", 7) == 0 || strncmp(s, "redis+socket://", 15) == 0;
	if (!is_unix && strncmp(s, "redis://", 8) != 0) {
		snprintf(err, errlen, "unsupported scheme; expected " URL_FORMS);
		return -1;
	}
	/* spaces and control characters are never part of a URL (a stray newline from an env file, say) */
	for (const char *p = s; *p; p++)
		if ((unsigned char)*p <= 0x20 || *p == 0x7f) {
			snprintf(err, errlen, "not a valid URL (a space or control character); expected " URL_FORMS);
			return -1;
		}
	const char *rest = strstr(s, "://") + 3;
	/* a #fragment means nothing to Redis: ignored, as libcurl did */
	size_t rlen = strcspn(rest, "#");
	const char *q = memchr(rest, '?', rlen);
	char *query = q ? xstrndup(q + 1, (size_t)(rest + rlen - q - 1)) : NULL;
	size_t before_q = q ? (size_t)(q - rest) : rlen;
	char *path = NULL;
	bool stray_at = false;
	int rc = -1;
	if (is_unix) {
		if (strncmp(rest, "localhost/", 10) == 0) /* file://localhost/path is the same file */
			rest += 9, before_q -= 9;
		if (before_q < 2 || rest[0] != '/') {
			snprintf(err, errlen,
			         "unix socket URL needs an absolute path: unix:///path/to/redis.sock?db=N");
			goto out;
		}
		if ((path = url_decode(rest, before_q)) == NULL) {
			snprintf(err, errlen, "bad %%-escape in the socket path; expected %%XX (not %%00)");
			goto out;
		}
		u->path = path;
		path = NULL;
		if (query_db(query, &u->db) < 0) {
			snprintf(err, errlen, "bad db= in the query; expected a number 0..1000000");
			goto out;
		}
		if (query != NULL && strstr(query, "password=") != NULL) {
			snprintf(err, errlen, "a password for a unix socket is not supported in the URL; use redis://");
			goto out;
		}
	} else {
		size_t alen = strcspn(rest, "/?#");
		if (alen > before_q)
			alen = before_q;
		const char *at = memchr(rest, '@', alen);
		/* redis://:pa/ss@host: a '/', '?' or '#' in the password ended the host part early */
		stray_at = at == NULL && strchr(rest + alen, '@') != NULL;
		if (at != NULL && memchr(at + 1, '@', (size_t)(rest + alen - at - 1)) != NULL) {
			/* an unencoded '@' in the password: where it ends is a guess, so refuse (%40 is the way) */
			snprintf(err, errlen,
			         "not a valid URL (more than one '@'; write '@' in a password as %%40); "
			         "expected " URL_FORMS);
			goto out;
		}
		if (at != NULL && url_userinfo(rest, (size_t)(at - rest), u, err, errlen) < 0)
			goto out;
		const char *hp = at ? at + 1 : rest;
		if (url_hostport(hp, (size_t)(rest + alen - hp), u, err, errlen) < 0)
			goto out;
		if (alen < before_q) { /* the path: "/" or "/N" */
			if ((path = url_decode(rest + alen, before_q - alen)) == NULL) {
				snprintf(err, errlen, "bad database number in the path; expected /N with N >= 0");
				goto out;
			}
			long db;
			if (path[1] != '\0' && (parse_long(path + 1, &db) < 0 || db < 0 || db > 1000000)) {
				snprintf(err, errlen, "bad database number in the path; expected /N with N >= 0");
				goto out;
			}
			if (path[1] != '\0')
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
	if (rc < 0 && stray_at)
		snprintf(err, errlen,
		         "not a valid URL (write '/', '?' and '#' in a password as %%2F, %%3F, %%23); "
		         "expected " URL_FORMS);
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

/* Mask every password=... query value; returns u or its replacement (u is then freed). Not in place: a
 * password shorter than "***" makes the string longer. */
static char *
redact_query(char *u)
{
	char *q = strchr(u, '?');
	while (q != NULL) {
		char *pw = strstr(q, "password=");
		if (pw == NULL)
			break;
		char *v = pw + 9;
		size_t n = strcspn(v, "&#");
		size_t off = (size_t)(v - u);
		if (n > 0) {
			char *r = xasprintf("%.*s***%s", (int)off, u, v + n);
			free(u);
			u = r;
			off += 3;
		}
		q = u + off;
	}
	return u;
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
	return redact_query(out);
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

/* Broker / result-backend URL parsing (redis://, unix://) and password redaction. */
#ifndef SPARK_URL_H
#define SPARK_URL_H

#include <stddef.h>

struct redis_url {
	char *host; /* NULL for a unix socket */
	int port;
	char *path; /* unix socket path, or NULL */
	int db;
	char *user;     /* may be NULL */
	char *password; /* may be NULL; never print it */
};

/* 0 on success; -1 with a one-line reason in err (which never contains the password). */
int redis_url_parse(const char *s, struct redis_url *u, char *err, size_t errlen);
void redis_url_free(struct redis_url *u);

/* A copy of any URL with the password part replaced by "***" (caller frees). */
char *url_redact(const char *s);

/* PostgreSQL URL as libpq takes it: "postgresql+asyncpg://" -> "postgresql://" (caller frees). */
char *pg_url_normalize(const char *s);

#endif

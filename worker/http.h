/*
 * HTTP transfers on the process's event loop: one curl multi handle driven by libevent (socket and timer
 * callbacks), so thousands of calls can be in flight in one thread. The multi's connection cache keeps
 * connections to each source open for reuse. The reply body is capped; the caller classifies the outcome.
 */
#ifndef SPARK_HTTP_H
#define SPARK_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/queue.h>

#include <curl/curl.h>

struct event_base;
struct event;

#define HTTP_MAX_REPLY (32L * 1024 * 1024) /* bound a worker's memory against a runaway reply */

struct http_xfer;
TAILQ_HEAD(http_xferq, http_xfer);

struct http {
	CURLM *multi;
	struct event_base *base;
	struct event *timer;
	struct http_xferq xfers; /* transfers in the multi */
	int active;
	CURL **idle; /* easy handles of ended transfers, reset, for the next ones */
	int nidle, idle_max;
};

/* A transfer ended (rc: CURLE_OK, a curl error, or CURLE_ABORTED_BY_CALLBACK after http_abort). */
typedef void (*http_done_fn)(struct http_xfer *x, CURLcode rc);

struct http_xfer {
	struct http *h;
	TAILQ_ENTRY(http_xfer) entry;
	CURL *easy;
	bool active;
	struct curl_slist *hdrs; /* owned: wiped and freed at the end (it may hold the key header) */
	char *body;              /* owned request body, NULL for GET */
	char *reply;             /* the reply body (NUL-terminated), NULL when empty */
	size_t reply_len;
	long status; /* HTTP status, 0 when none */
	bool too_big;
	char cerr[CURL_ERROR_SIZE];
	http_done_fn done;
	void *arg;
};

/* maxconnects: connections the multi keeps open for reuse (at least the number of parallel transfers). */
int http_init(struct http *h, struct event_base *base, long maxconnects);
/* Abandon every transfer (their callbacks are not called) and free the multi. */
void http_free(struct http *h);

/*
 * Start a transfer of url: POST body when body is not NULL (both hdrs and body become the transfer's), else GET.
 * timeout_s bounds the whole transfer. 0, or -1 when curl refused it (done is not called). done runs from the
 * loop once the transfer ends; x->reply then holds the body; release it with http_xfer_clear.
 */
int http_start(struct http *h, struct http_xfer *x, const char *url, struct curl_slist *hdrs, char *body,
               double timeout_s, http_done_fn done, void *arg);
/* Abort a transfer in flight: done runs before this returns, with CURLE_ABORTED_BY_CALLBACK. */
void http_abort(struct http_xfer *x);
/* Free what a finished transfer holds (reply, headers, body). */
void http_xfer_clear(struct http_xfer *x);

#endif

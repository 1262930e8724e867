/* curl multi on libevent; see http.h. The glue follows libcurl's documented multi_socket API. */
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <event2/event_struct.h>

#include "http.h"
#include "log.h"
#include "util.h"

#define HTTP_CONNECT_TIMEOUT 30.0

/* One socket curl asked us to watch; its event is embedded and re-assigned when curl changes what it waits for
 * (a request is a write, then reads: one allocation per change otherwise). */
struct http_sock {
	struct http *h;
	struct event ev;
};

static void http_check_done(struct http *h);

static void
http_on_socket(evutil_socket_t fd, short what, void *arg)
{
	struct http *h = arg;
	int flags = ((what & EV_READ) ? CURL_CSELECT_IN : 0) | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
	int running = 0;
	curl_multi_socket_action(h->multi, fd, flags, &running);
	http_check_done(h);
}

static void
http_on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct http *h = arg;
	int running = 0;
	curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	http_check_done(h);
}

/* CURLMOPT_SOCKETFUNCTION: watch, change or forget a socket. */
static int
http_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	struct http *h = userp;
	struct http_sock *s = socketp;
	if (what == CURL_POLL_REMOVE) {
		if (s) {
			event_del(&s->ev);
			free(s);
			curl_multi_assign(h->multi, fd, NULL);
		}
		return 0;
	}
	short ev = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
	if (!s) {
		s = xcalloc(1, sizeof(*s));
		s->h = h;
		curl_multi_assign(h->multi, fd, s);
	} else {
		event_del(&s->ev);
	}
	if (event_assign(&s->ev, h->base, fd, ev, http_on_socket, h) < 0 || event_add(&s->ev, NULL) < 0)
		fatalx("http: cannot watch a socket");
	return 0;
}

/* CURLMOPT_TIMERFUNCTION: one timer for the whole multi. */
static int
http_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
	struct http *h = userp;
	if (timeout_ms < 0) {
		evtimer_del(h->timer);
		return 0;
	}
	struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
	evtimer_add(h->timer, &tv);
	return 0;
}

int
http_init(struct http *h, struct event_base *base, long maxconnects)
{
	memset(h, 0, sizeof(*h));
	TAILQ_INIT(&h->xfers);
	h->base = base;
	h->multi = curl_multi_init();
	h->timer = evtimer_new(base, http_on_timer, h);
	if (!h->multi || !h->timer) {
		http_free(h);
		return -1;
	}
	curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, http_socket_cb);
	curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
	curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, http_timer_cb);
	curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
	/* every slot may call the same source at once: no per-host cap, and a cache that keeps them all */
	curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
	curl_multi_setopt(h->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, 0L);
	curl_multi_setopt(h->multi, CURLMOPT_MAXCONNECTS, maxconnects > 0 ? maxconnects : 16L);
	h->idle_max = maxconnects > 0 ? (int)maxconnects : 16;
	h->idle = xcalloc((size_t)h->idle_max, sizeof *h->idle);
	return 0;
}

/* Take a finished transfer off the multi and give back what the easy handle borrowed. The handle itself is reset
 * and kept: curl_easy_init allocates and initialises several KiB per transfer, a reset keeps them. */
static void
http_detach(struct http_xfer *x)
{
	struct http *h = x->h;
	curl_multi_remove_handle(h->multi, x->easy);
	if (h->nidle < h->idle_max) {
		curl_easy_reset(x->easy);
		h->idle[h->nidle++] = x->easy;
	} else {
		curl_easy_cleanup(x->easy);
	}
	x->easy = NULL;
	x->active = false;
	TAILQ_REMOVE(&x->h->xfers, x, entry);
	x->h->active--;
}

void
http_free(struct http *h)
{
	if (h->multi) {
		/* transfers still in the multi are abandoned: their owners are being freed too */
		struct http_xfer *x;
		while ((x = TAILQ_FIRST(&h->xfers))) {
			http_detach(x);
			http_xfer_clear(x);
		}
		curl_multi_cleanup(h->multi);
	}
	while (h->nidle > 0)
		curl_easy_cleanup(h->idle[--h->nidle]);
	free(h->idle);
	if (h->timer)
		event_free(h->timer);
	memset(h, 0, sizeof(*h));
}

static size_t
http_write(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct http_xfer *x = arg;
	size_t n = size * nmemb;
	if (x->reply_len + n > (size_t)HTTP_MAX_REPLY) {
		x->too_big = true;
		return 0; /* curl ends the transfer with CURLE_WRITE_ERROR */
	}
	x->reply = xrealloc(x->reply, x->reply_len + n + 1);
	memcpy(x->reply + x->reply_len, ptr, n);
	x->reply_len += n;
	x->reply[x->reply_len] = '\0';
	return n;
}

static void
http_finish(struct http_xfer *x, CURLcode rc)
{
	curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &x->status);
	http_detach(x);
	x->done(x, rc);
}

static void
http_check_done(struct http *h)
{
	CURLMsg *m;
	int left = 0;
	while ((m = curl_multi_info_read(h->multi, &left))) {
		if (m->msg != CURLMSG_DONE)
			continue;
		struct http_xfer *x = NULL;
		curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
		if (x && x->active)
			http_finish(x, m->data.result);
	}
}

int
http_start(struct http *h, struct http_xfer *x, const char *url, struct curl_slist *hdrs, char *body, double timeout_s,
           http_done_fn done, void *arg)
{
	memset(x, 0, sizeof(*x));
	x->h = h;
	x->hdrs = hdrs;
	x->body = body;
	x->done = done;
	x->arg = arg;
	x->easy = h->nidle > 0 ? h->idle[--h->nidle] : curl_easy_init();
	if (!x->easy)
		return -1;
	CURL *e = x->easy;
	curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)x);
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, http_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->cerr);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
	double t = timeout_s > 0 ? timeout_s : 600;
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(t * 1000));
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
	                 (long)((t < HTTP_CONNECT_TIMEOUT ? t : HTTP_CONNECT_TIMEOUT) * 1000));
	if (body) {
		curl_easy_setopt(e, CURLOPT_POST, 1L);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
	}
	if (curl_multi_add_handle(h->multi, e) != CURLM_OK) {
		curl_easy_cleanup(e);
		x->easy = NULL;
		return -1;
	}
	x->active = true;
	TAILQ_INSERT_TAIL(&h->xfers, x, entry);
	h->active++;
	return 0;
}

void
http_abort(struct http_xfer *x)
{
	if (!x->active)
		return;
	http_finish(x, CURLE_ABORTED_BY_CALLBACK);
}

static void
http_slist_wipe_free(struct curl_slist *l)
{
	for (struct curl_slist *p = l; p; p = p->next)
		memset(p->data, 0, strlen(p->data));
	curl_slist_free_all(l);
}

void
http_xfer_clear(struct http_xfer *x)
{
	http_slist_wipe_free(x->hdrs);
	x->hdrs = NULL;
	free(x->body);
	x->body = NULL;
	free(x->reply);
	x->reply = NULL;
	x->reply_len = 0;
}

/*
 * Control clients (DESIGN §4): reading frames, writing replies, closing politely. Clients are untrusted: a bad
 * one is a warning and a dropped connection, never fatal, never blocking. A client is freed only outside its own
 * callbacks (hiredis style: CLIENT_IN_CALLBACK / CLIENT_FREE).
 */
#include <sys/socket.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

void
ctl_client_send(struct ctl_client *c, const msgpack_sbuffer *sb)
{
	if (c->flags & (CLIENT_CLOSING | CLIENT_FREE))
		return;
	if (bufferevent_write(c->bev, sb->data, sb->size) < 0)
		log_warnx("control client (pid %d): cannot queue %zu bytes", (int)c->pid, sb->size);
}

/* Everything is written: shut our side, wait for the peer's EOF (or the read timeout) to free. */
static void
client_linger(struct ctl_client *c)
{
	if (c->flags & CLIENT_LINGER)
		return;
	c->flags |= CLIENT_LINGER;
	shutdown(bufferevent_getfd(c->bev), SHUT_WR);
}

void
ctl_reply_error(struct ctl_client *c, uint32_t msgid, const char *code, const char *message)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	msgpack_packer pk;
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	proto_pack_error_response(&pk, msgid, code, message);
	ctl_client_send(c, &sb);
	msgpack_sbuffer_destroy(&sb);
}

/*
 * Close once what is queued has been written. Until then, and for a moment after (write side shut), input is
 * read and thrown away: closing on unread input would reset the connection and lose the error reply.
 */
void
ctl_client_close(struct ctl_client *c)
{
	c->flags |= CLIENT_CLOSING;
	c->follow = false;
	evtimer_del(c->deadline_ev);
	struct timeval rtv = {2, 0}, wtv = {CTL_CLOSE_TIMEOUT, 0};
	bufferevent_set_timeouts(c->bev, &rtv, &wtv);
	if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
		client_linger(c);
}

/* A protocol violation: an error reply where one can be given, then the connection goes. */
void
ctl_client_fail(struct ctl_client *c, uint32_t msgid, const char *code, const char *message)
{
	log_warnx("control client (pid %d, uid %u): %s: %s; closing", (int)c->pid, (unsigned)c->uid, code, message);
	ctl_reply_error(c, msgid, code, message);
	ctl_client_close(c);
}

/* Re-count what the client's reader holds; false when all readers together are over CTL_DECODE_BUDGET. */
static bool
client_charge(struct ctl_client *c)
{
	size_t held = proto_reader_held(&c->rd);
	size_t charge = held > CTL_DECODE_FREE ? held - CTL_DECODE_FREE : 0;
	c->sd->decode_held = c->sd->decode_held - c->decode_charge + charge;
	c->decode_charge = charge;
	return charge == 0 || c->sd->decode_held <= CTL_DECODE_BUDGET;
}

static void
client_free(struct ctl_client *c)
{
	struct sparkd *sd = c->sd;
	sd->decode_held -= c->decode_charge;
	TAILQ_REMOVE(&sd->clients, c, entry);
	sd->nclients--;
	proto_reader_free(&c->rd);
	event_free(c->deadline_ev);
	bufferevent_free(c->bev);
	free(c);
}

static bool
is_array_head(unsigned char b)
{
	return (b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd;
}

/*
 * A connection must bring a whole request within CTL_REQUEST_TIMEOUT of connecting or of its last one, however
 * it trickles in: a fixed deadline, not an idle timer, so one byte a second does not hold it. Followers and stop
 * waiters have a reason to wait and are exempt.
 */
static void
client_arm_deadline(struct ctl_client *c)
{
	if (c->follow || c->waits_exit) {
		evtimer_del(c->deadline_ev);
		return;
	}
	struct timeval tv = {CTL_REQUEST_TIMEOUT, 0};
	evtimer_add(c->deadline_ev, &tv);
}

static void
client_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct ctl_client *c = arg;
	char msg[96];
	snprintf(msg, sizeof msg, "timed out: no complete request within %d s", CTL_REQUEST_TIMEOUT);
	ctl_client_fail(c, 0, PROTO_E_TIMED_OUT, msg);
}

/* Dispatch the whole frames the reader holds, in order, unless the client lets its replies pile up. */
static void
client_run_frames(struct ctl_client *c)
{
	while (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE))) {
		if (evbuffer_get_length(bufferevent_get_output(c->bev)) > CTL_OUTPUT_MAX) {
			/* pipelining without reading: no more of its requests until it reads (or its deadline ends it)
			 */
			c->paused = true;
			bufferevent_disable(c->bev, EV_READ);
			return;
		}
		msgpack_unpacked u;
		msgpack_unpacked_init(&u);
		int rc = proto_reader_next(&c->rd, &u);
		if (rc == PROTO_READ_FRAME) {
			ctl_dispatch(c, &u.data);
			if (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE)))
				client_arm_deadline(c);
		}
		msgpack_unpacked_destroy(&u);
		if (rc == PROTO_READ_NEED_MORE) {
			proto_reader_shrink(&c->rd);
			client_charge(c);
			return;
		}
		if (rc == PROTO_READ_BAD)
			ctl_client_fail(c, 0, PROTO_E_BAD_REQUEST, "not valid msgpack");
		else if (rc == PROTO_READ_TOO_LARGE)
			ctl_client_fail(c, 0, PROTO_E_FRAME_TOO_LARGE, "a frame is at most 1 MiB");
	}
}

static void
client_read_cb(struct bufferevent *bev, void *arg)
{
	struct ctl_client *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	char buf[CTL_READ_CHUNK];
	if (c->flags & CLIENT_CLOSING) {
		size_t n = evbuffer_get_length(in);
		evbuffer_drain(in, n);
		c->discarded += n;
		if (c->discarded > 8 * SPARK_FRAME_MAX)
			client_free(c);
		return;
	}
	c->flags |= CLIENT_IN_CALLBACK;
	/* frames held back while it was paused go first */
	client_run_frames(c);
	while (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE)) && !c->paused && evbuffer_get_length(in) > 0) {
		int n = evbuffer_remove(in, buf, sizeof buf);
		if (n <= 0)
			break;
		/* a frame is an array: anything else at a frame boundary is noise, refused at once */
		if (msgpack_unpacker_message_size(&c->rd.unp) == 0 && !is_array_head((unsigned char)buf[0])) {
			ctl_client_fail(c, 0, PROTO_E_BAD_REQUEST,
			                "expected a msgpack-RPC request [0, msgid, method, [params]]");
			break;
		}
		/* proto's reader scans the structure first: an oversized announcement is refused before buffering */
		int rc = proto_reader_feed(&c->rd, buf, (size_t)n);
		if (rc == PROTO_READ_TOO_LARGE) {
			ctl_client_fail(c, 0, PROTO_E_FRAME_TOO_LARGE, "a frame is at most 1 MiB");
			break;
		}
		if (rc == PROTO_READ_TOO_MANY) {
			char msg[64];
			snprintf(msg, sizeof msg, "a request holds at most %d values", PROTO_REQUEST_VALUES_MAX);
			ctl_client_fail(c, 0, PROTO_E_FRAME_TOO_LARGE, msg);
			break;
		}
		if (rc == PROTO_READ_NEED_MORE && !client_charge(c)) {
			ctl_client_fail(c, 0, PROTO_E_OVERLOADED,
			                "sparkd is reading too many large frames at once; try again");
			break;
		}
		if (rc != PROTO_READ_NEED_MORE) {
			ctl_client_fail(c, 0, PROTO_E_BAD_REQUEST, "not valid msgpack");
			break;
		}
		client_run_frames(c);
	}
	c->flags &= ~CLIENT_IN_CALLBACK;
	if ((c->flags & CLIENT_CLOSING) && !(c->flags & CLIENT_FREE) && c->decode_charge > 0) {
		/* nothing more is decoded for it: its share of the budget goes back now, not at the close */
		proto_reader_free(&c->rd);
		if (proto_reader_init(&c->rd) < 0)
			fatalx("out of memory (msgpack unpacker)");
		client_charge(c);
	}
	if (c->flags & CLIENT_FREE)
		client_free(c);
	else if ((c->flags & CLIENT_CLOSING) && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
		client_linger(c);
}

static void
client_write_cb(struct bufferevent *bev, void *arg)
{
	struct ctl_client *c = arg;
	if (c->flags & CLIENT_CLOSING) {
		client_linger(c);
		return;
	}
	if (c->paused) {
		c->paused = false;
		bufferevent_enable(c->bev, EV_READ);
		client_read_cb(bev, c); /* may free c */
		return;
	}
	if (c->follow && c->dropped > 0)
		ctl_follow_send_dropped(c);
}

static void
client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct ctl_client *c = arg;
	/* EOF, error and the closing timeouts all end the same way */
	if (c->flags & CLIENT_IN_CALLBACK)
		c->flags |= CLIENT_FREE;
	else
		client_free(c);
}

struct ctl_client *
ctl_client_new(struct sparkd *sd, int fd, const struct ucred *cr)
{
	struct ctl_client *c = xcalloc(1, sizeof *c);
	c->sd = sd;
	c->uid = cr->uid;
	c->gid = cr->gid;
	c->pid = cr->pid;
	if (proto_reader_init(&c->rd) < 0)
		fatalx("out of memory (msgpack unpacker)");
	c->rd.scan.values_max = PROTO_REQUEST_VALUES_MAX;
	c->bev = bufferevent_socket_new(sd->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (c->bev == NULL)
		fatalx("out of memory (bufferevent)");
	bufferevent_setcb(c->bev, client_read_cb, client_write_cb, client_event_cb, c);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
	c->deadline_ev = evtimer_new(sd->base, client_deadline_cb, c);
	if (c->deadline_ev == NULL)
		fatalx("out of memory (timer)");
	client_arm_deadline(c);
	TAILQ_INSERT_TAIL(&sd->clients, c, entry);
	sd->nclients++;
	return c;
}

void
ctl_free_all(struct sparkd *sd)
{
	struct ctl_client *c;
	while ((c = TAILQ_FIRST(&sd->clients)) != NULL)
		client_free(c);
}

/*
 * Control clients (DESIGN §4): reading frames, writing replies, closing politely. Clients are untrusted: a bad
 * one is a warning and a dropped connection, never fatal, never blocking. A client is freed only outside its own
 * callbacks (hiredis style: CLIENT_IN_CALLBACK / CLIENT_FREE).
 */
#include <sys/socket.h>

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
	struct timeval rtv = {2, 0}, wtv = {CTL_IDLE_PARTIAL, 0};
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

static void
client_free(struct ctl_client *c)
{
	struct sparkd *sd = c->sd;
	TAILQ_REMOVE(&sd->clients, c, entry);
	sd->nclients--;
	proto_reader_free(&c->rd);
	bufferevent_free(c->bev);
	free(c);
}

static bool
is_array_head(unsigned char b)
{
	return (b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd;
}

static void
client_set_partial(struct ctl_client *c, bool partial)
{
	if (partial == c->partial)
		return;
	c->partial = partial;
	struct timeval tv = {CTL_IDLE_PARTIAL, 0};
	bufferevent_set_timeouts(c->bev, partial ? &tv : NULL, NULL);
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
	while (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE)) && evbuffer_get_length(in) > 0) {
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
		if (rc != PROTO_READ_NEED_MORE) {
			ctl_client_fail(c, 0, PROTO_E_BAD_REQUEST, "not valid msgpack");
			break;
		}
		while (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE))) {
			msgpack_unpacked u;
			msgpack_unpacked_init(&u);
			rc = proto_reader_next(&c->rd, &u);
			if (rc == PROTO_READ_FRAME)
				ctl_dispatch(c, &u.data);
			msgpack_unpacked_destroy(&u);
			if (rc == PROTO_READ_NEED_MORE)
				break;
			if (rc == PROTO_READ_BAD)
				ctl_client_fail(c, 0, PROTO_E_BAD_REQUEST, "not valid msgpack");
			else if (rc == PROTO_READ_TOO_LARGE)
				ctl_client_fail(c, 0, PROTO_E_FRAME_TOO_LARGE, "a frame is at most 1 MiB");
		}
	}
	if (!(c->flags & (CLIENT_CLOSING | CLIENT_FREE)))
		client_set_partial(c, msgpack_unpacker_message_size(&c->rd.unp) > 0);
	c->flags &= ~CLIENT_IN_CALLBACK;
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
	if (c->follow && c->dropped > 0)
		ctl_follow_send_dropped(c);
}

static void
client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct ctl_client *c = arg;
	if ((what & BEV_EVENT_TIMEOUT) && !(c->flags & CLIENT_CLOSING))
		log_warnx("control client (pid %d): partial frame idle for %ds; closing", (int)c->pid,
		          CTL_IDLE_PARTIAL);
	/* EOF, error and timeout all end the same way */
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
	c->bev = bufferevent_socket_new(sd->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (c->bev == NULL)
		fatalx("out of memory (bufferevent)");
	bufferevent_setcb(c->bev, client_read_cb, client_write_cb, client_event_cb, c);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
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

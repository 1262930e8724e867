/*
 * What an rpipe connection needs from hiredis beyond its protocol: the glue to the process's libevent loop and the
 * reply objects, both ours for the syscalls and allocations they save per task (the reasons are below).
 */
#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/read.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "worker.h"

/*
 * Reply objects from a free list of the connection, with short strings and small arrays inside the node: a no-op
 * task's replies (its LMOVE, then +OK, QUEUED and an EXEC array for its end) were a dozen malloc/free pairs with
 * hiredis's own reply functions. hiredis frees every reply through the reader's freeObject, so the nodes come back.
 */
#define RNODE_INLINE   64 /* bytes of a string, or pointers of an array, kept inside the node */
#define RNODE_FREE_MAX 512

struct rnode {
	redisReply r; /* first: what hiredis and the callbacks see */
	struct rpipe *p;
	struct rnode *next;
	union {
		char str[RNODE_INLINE];
		redisReply *elem[RNODE_INLINE / sizeof(redisReply *)];
	} in;
};

static struct rnode *
rnode_get(const redisReadTask *task, int type)
{
	struct rpipe *p = task->privdata;
	struct rnode *n = p != NULL ? p->free_replies : NULL;
	if (n != NULL) {
		p->free_replies = n->next;
		p->nfree_replies--;
	} else {
		n = xmalloc(sizeof *n);
	}
	memset(&n->r, 0, sizeof n->r);
	n->r.type = type;
	n->p = p;
	if (task->parent != NULL) {
		redisReply *parent = task->parent->obj;
		parent->element[task->idx] = &n->r;
	}
	return n;
}

static void
rnode_free(void *reply)
{
	struct rnode *n = reply;
	if (n == NULL)
		return;
	redisReply *r = &n->r;
	if (r->type == REDIS_REPLY_ARRAY && r->element != NULL) {
		for (size_t i = 0; i < r->elements; i++)
			rnode_free(r->element[i]);
		if (r->element != n->in.elem)
			free(r->element);
	} else if (r->str != NULL && r->str != n->in.str) {
		free(r->str);
	}
	struct rpipe *p = n->p;
	if (p == NULL || p->nfree_replies >= RNODE_FREE_MAX) {
		free(n);
		return;
	}
	n->next = p->free_replies;
	p->free_replies = n;
	p->nfree_replies++;
}

static void *
rnode_string(const redisReadTask *task, char *str, size_t len)
{
	struct rnode *n = rnode_get(task, task->type);
	char *s = len < RNODE_INLINE ? n->in.str : xmalloc(len + 1);
	memcpy(s, str, len);
	s[len] = '\0';
	n->r.str = s;
	n->r.len = len;
	return n;
}

static void *
rnode_array(const redisReadTask *task, int elements)
{
	struct rnode *n = rnode_get(task, REDIS_REPLY_ARRAY);
	if (elements > 0) {
		size_t k = (size_t)elements;
		if (k <= sizeof n->in.elem / sizeof n->in.elem[0]) {
			memset(n->in.elem, 0, k * sizeof n->in.elem[0]);
			n->r.element = n->in.elem;
		} else {
			n->r.element = xcalloc(k, sizeof *n->r.element);
		}
	}
	n->r.elements = elements > 0 ? (size_t)elements : 0;
	return n;
}

static void *
rnode_integer(const redisReadTask *task, long long value)
{
	struct rnode *n = rnode_get(task, REDIS_REPLY_INTEGER);
	n->r.integer = value;
	return n;
}

static void *
rnode_nil(const redisReadTask *task)
{
	return rnode_get(task, REDIS_REPLY_NIL);
}

static redisReplyObjectFunctions rnode_functions = {rnode_string, rnode_array, rnode_integer, rnode_nil, rnode_free};

void
rpipe_glue_free(struct rpipe *p)
{
	while (p->free_replies != NULL) {
		struct rnode *n = p->free_replies;
		p->free_replies = n->next;
		free(n);
	}
	p->nfree_replies = 0;
}

/*
 * The loop glue for hiredis, ours rather than <hiredis/adapters/libevent.h>: that adapter's read event is one-shot
 * and hiredis re-arms it after every read, which libevent's change list turns into an epoll_ctl per reply batch
 * (one more syscall per task for a one-slot process). Here the read event is persistent and stays armed until
 * hiredis asks to stop reading; the write event stays one-shot (armed when commands are queued, usually written by
 * rpipe_flush before the loop waits, so the add and the delete cancel out in the change list).
 */
struct rpipe_ev {
	redisAsyncContext *ac;
	struct event *rev, *wev;
	bool reading, writing;
};

static void
rpipe_ev_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rpipe_ev *e = arg;
	redisAsyncHandleRead(e->ac);
}

static void
rpipe_ev_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rpipe_ev *e = arg;
	e->writing = false; /* one-shot: libevent has removed it */
	redisAsyncHandleWrite(e->ac);
}

/* An event armed or not, as hiredis asks: its flag saves libevent the call when nothing changes. */
static void
rpipe_ev_arm(struct event *ev, bool *armed, bool on)
{
	if (*armed == on)
		return;
	*armed = on;
	if (on)
		event_add(ev, NULL);
	else
		event_del(ev);
}

static void
rpipe_ev_add_read(void *arg)
{
	struct rpipe_ev *e = arg;
	rpipe_ev_arm(e->rev, &e->reading, true);
}

static void
rpipe_ev_del_read(void *arg)
{
	struct rpipe_ev *e = arg;
	rpipe_ev_arm(e->rev, &e->reading, false);
}

static void
rpipe_ev_add_write(void *arg)
{
	struct rpipe_ev *e = arg;
	rpipe_ev_arm(e->wev, &e->writing, true);
}

static void
rpipe_ev_del_write(void *arg)
{
	struct rpipe_ev *e = arg;
	rpipe_ev_arm(e->wev, &e->writing, false);
}

static void
rpipe_ev_cleanup(void *arg)
{
	struct rpipe_ev *e = arg;
	event_free(e->rev);
	event_free(e->wev);
	free(e);
}

void
rpipe_glue_attach(struct rpipe *p, redisAsyncContext *ac)
{
	struct event_base *base = p->w->base;
	ac->c.reader->fn = &rnode_functions;
	ac->c.reader->privdata = p;
	struct rpipe_ev *e = xcalloc(1, sizeof *e);
	e->ac = ac;
	e->rev = event_new(base, ac->c.fd, EV_READ | EV_PERSIST, rpipe_ev_read_cb, e);
	e->wev = event_new(base, ac->c.fd, EV_WRITE, rpipe_ev_write_cb, e);
	if (e->rev == NULL || e->wev == NULL)
		fatalx("cannot create the events of a Redis connection");
	ac->ev.addRead = rpipe_ev_add_read;
	ac->ev.delRead = rpipe_ev_del_read;
	ac->ev.addWrite = rpipe_ev_add_write;
	ac->ev.delWrite = rpipe_ev_del_write;
	ac->ev.cleanup = rpipe_ev_cleanup;
	ac->ev.data = e;
	/* reading, and writable for the end of the non-blocking connect, as hiredis expects after attaching */
	rpipe_ev_add_read(e);
	rpipe_ev_add_write(e);
}

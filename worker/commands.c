/*
 * sparkd's commands (common/command.h) on fd 3, the socketpair the reports go out on: read on the loop when fd 3
 * is such a socket (spark-worker run by hand has none), dispatched here. sparkd's end closing is not an error:
 * the process stops watching and runs on (sparkd gone means a stop is coming, or a debugging session).
 */
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "command.h"
#include "log.h"
#include "util.h"
#include "worker.h"

static void
commands_revoke(struct worker *w, const struct command *c)
{
	double expires = now_wall() + SPARK_REVOKED_EXPIRES;
	for (int i = 0; i < c->argc; i++)
		revoke_add(&w->revoked, c->argv[i], expires);
	log_info("Tasks flagged as revoked: %d id%s%s", c->argc, c->argc == 1 ? "" : "s",
	         c->terminate ? " (terminate)" : "");
	job_revoke_held(w, c->terminate != 0, c->signal);
}

static void
commands_time_limit(struct worker *w, const struct command *c)
{
	if (c->name == NULL || c->name[0] == '\0' || !(c->soft >= 0) || !(c->hard >= 0))
		return;
	struct name_limit *l = NULL;
	for (int i = 0; i < w->nlimits; i++)
		if (strcmp(w->limits[i].name, c->name) == 0)
			l = &w->limits[i];
	if (l == NULL) {
		w->limits = xrealloc(w->limits, (size_t)(w->nlimits + 1) * sizeof *w->limits);
		l = &w->limits[w->nlimits++];
		l->name = xstrdup(c->name);
	}
	l->soft = c->soft;
	l->hard = c->hard;
	log_info("New time limits for tasks of type %s: soft %gs, hard %gs (applies to tasks started from now)",
	         c->name, c->soft, c->hard);
}

static void
commands_dispatch(struct worker *w, const struct command *c)
{
	switch (c->kind) {
	case COMMAND_REVOKE:
		commands_revoke(w, c);
		break;
	case COMMAND_EVENTS:
		if (w->events.on != (c->on != 0))
			log_info("Task events %s", c->on ? "enabled" : "disabled");
		w->events.on = c->on != 0;
		break;
	case COMMAND_QUEUES:
		engine_set_queues(w, c->argc, c->argv);
		break;
	case COMMAND_TIME_LIMIT:
		commands_time_limit(w, c);
		break;
	case COMMAND_QUERY:
		query_answer(w, c);
		break;
	case COMMAND_UNKNOWN:
		break; /* a newer sparkd's: ignored */
	}
}

static void
commands_line(struct worker *w, const char *line, size_t len)
{
	if (len == 0)
		return;
	size_t n = command_scratch_size(len);
	void *scratch = xmalloc(n);
	struct command c;
	if (command_parse(line, len, &c, scratch, n) < 0)
		log_warnx("Malformed command from sparkd ignored: %.80s", line);
	else
		commands_dispatch(w, &c);
	free(scratch);
}

static void
commands_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	for (;;) {
		ssize_t n = recv(fd, w->cmd_buf, SPARK_REPORT_MAX, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n <= 0) {
			if (n < 0)
				log_warn("reading commands from sparkd");
			commands_stop(w);
			break;
		}
		w->cmd_buf[n] = '\0';
		const char *p = w->cmd_buf, *end = w->cmd_buf + n;
		while (p < end) {
			const char *nl = memchr(p, '\n', (size_t)(end - p));
			const char *e = nl ? nl : end;
			commands_line(w, p, (size_t)(e - p));
			p = e + 1;
		}
	}
	/* answers, and whatever the commands changed, go out now */
	engine_flush_reports(w, true);
	engine_tick(w);
}

void
commands_start(struct worker *w)
{
	int type = 0;
	socklen_t len = sizeof type;
	if (getsockopt(SPARK_REPORT_FD, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_SEQPACKET)
		return; /* not sparkd's socketpair: nobody sends commands */
	w->cmd_buf = xmalloc(SPARK_REPORT_MAX + 1);
	w->cmd_ev = event_new(w->base, SPARK_REPORT_FD, EV_READ | EV_PERSIST, commands_read_cb, w);
	event_add(w->cmd_ev, NULL);
}

void
commands_stop(struct worker *w)
{
	if (w->cmd_ev != NULL) {
		event_free(w->cmd_ev);
		w->cmd_ev = NULL;
	}
	free(w->cmd_buf);
	w->cmd_buf = NULL;
}

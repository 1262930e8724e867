/* sparkd -> worker commands on fd 3 (the format is in command.h, the line wire under it in wireline.c). */
#include "command.h"

#include <stdint.h>
#include <string.h>

#include "wireline.h"

static void
put_list(struct wl_out *o, int n, const char *const *v)
{
	for (int i = 0; i < n; i++)
		wl_str(o, v[i]);
}

void
command_revoke(struct wl_out *o, int terminate, const char *signal, int nids, const char *const *ids)
{
	if (nids <= 0 || !wl_on(o))
		return;
	size_t m = wl_begin(o, "revoke");
	wl_num(o, " %d", terminate ? 1 : 0);
	wl_str(o, signal);
	put_list(o, nids, ids);
	wl_end(o, m);
}

void
command_events(struct wl_out *o, int on)
{
	if (!wl_on(o))
		return;
	size_t m = wl_begin(o, "events");
	wl_num(o, " %d", on ? 1 : 0);
	wl_end(o, m);
}

void
command_queues(struct wl_out *o, int n, const char *const *names)
{
	if (n <= 0 || !wl_on(o))
		return;
	size_t m = wl_begin(o, "queues");
	put_list(o, n, names);
	wl_end(o, m);
}

void
command_time_limit(struct wl_out *o, const char *task_name, double soft, double hard)
{
	if (!wl_on(o))
		return;
	size_t m = wl_begin(o, "time_limit");
	wl_str(o, task_name);
	wl_num(o, " %.17g %.17g", soft, hard);
	wl_end(o, m);
}

void
command_query(struct wl_out *o, unsigned long reqid, const char *what, int nargs, const char *const *args)
{
	if (!wl_on(o))
		return;
	size_t m = wl_begin(o, "query");
	wl_num(o, " %lu", reqid);
	wl_str(o, what);
	put_list(o, nargs, args);
	wl_end(o, m);
}

/* ---- the worker's parser ---- */

size_t
command_scratch_size(size_t len)
{
	/* every list item is a word of at least one byte plus a space: at most len / 2 + 1 of them */
	return len + 1 + (len / 2 + 1) * sizeof(char *) + sizeof(char *);
}

/*
 * The rest of the line as a list of strings. The pointer array goes at the top of the scratch, aligned, the
 * strings below it; both fit in what command_scratch_size promised.
 */
static int
next_list(struct wl_cursor *c, struct command *cmd, size_t min)
{
	size_t words = 0;
	for (const char *p = c->p; p < c->end; p++)
		if (*p != ' ' && (p == c->p || p[-1] == ' '))
			words++;
	uintptr_t top = (uintptr_t)c->oend & ~(uintptr_t)(sizeof(char *) - 1);
	if (top < (uintptr_t)c->out || (top - (uintptr_t)c->out) / sizeof(char *) < words)
		return -1;
	const char **v = (const char **)(top - words * sizeof(char *));
	c->oend = (char *)v;
	for (size_t i = 0; i < words; i++)
		if (wl_next_str(c, &v[i]) < 0)
			return -1;
	if (words < min)
		return -1;
	cmd->argv = v;
	cmd->argc = (int)words;
	return 0;
}

int
command_parse(const char *line, size_t len, struct command *cmd, void *scratch, size_t scratch_len)
{
	static const char *const none[1] = {NULL};
	memset(cmd, 0, sizeof *cmd);
	cmd->signal = cmd->name = cmd->what = "";
	cmd->argv = (const char **)none;
	struct wl_cursor c;
	wl_cursor_init(&c, line, len, scratch, scratch_len);
	const char *k;
	size_t kn;
	if (wl_word(&c, &k, &kn) < 0)
		return -1;
	if (wl_word_is(k, kn, "revoke")) {
		cmd->kind = COMMAND_REVOKE;
		if (wl_next_int(&c, &cmd->terminate) < 0 || wl_next_str(&c, &cmd->signal) < 0)
			return -1;
		return next_list(&c, cmd, 1);
	}
	if (wl_word_is(k, kn, "events")) {
		cmd->kind = COMMAND_EVENTS;
		return wl_next_int(&c, &cmd->on);
	}
	if (wl_word_is(k, kn, "queues")) {
		cmd->kind = COMMAND_QUEUES;
		return next_list(&c, cmd, 1);
	}
	if (wl_word_is(k, kn, "time_limit")) {
		cmd->kind = COMMAND_TIME_LIMIT;
		if (wl_next_str(&c, &cmd->name) < 0 || wl_next_double(&c, &cmd->soft) < 0 ||
		    wl_next_double(&c, &cmd->hard) < 0 || cmd->soft < 0 || cmd->hard < 0)
			return -1;
		return 0;
	}
	if (wl_word_is(k, kn, "query")) {
		cmd->kind = COMMAND_QUERY;
		if (wl_next_ulong(&c, &cmd->reqid) < 0 || wl_next_str(&c, &cmd->what) < 0)
			return -1;
		return next_list(&c, cmd, 0);
	}
	cmd->kind = COMMAND_UNKNOWN;
	return 0;
}

/*
 * Who may use the control socket, and how many connections each may hold (DESIGN §4).
 */
#include <stdio.h>
#include <string.h>

#include "ctl.h"

/* Is gid among the supplementary groups of pid (from /proc: no NSS lookups in the loop)? */
static bool
pid_in_group(pid_t pid, gid_t gid)
{
	if (pid <= 0)
		return false;
	char path[64], line[4096];
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "re");
	if (f == NULL)
		return false;
	bool found = false;
	while (!found && fgets(line, sizeof line, f) != NULL) {
		if (strncmp(line, "Groups:", 7) != 0)
			continue;
		char *save = NULL;
		for (char *t = strtok_r(line + 7, " \t\n", &save); t != NULL; t = strtok_r(NULL, " \t\n", &save)) {
			long g;
			if (parse_long(t, &g) == 0 && (gid_t)g == gid)
				found = true;
		}
		break;
	}
	fclose(f);
	return found;
}

/* Root, the daemon's own user, or a member of the socket's group may talk to sparkd. */
bool
ctl_peer_allowed(uid_t peer_uid, gid_t peer_gid, pid_t peer_pid, uid_t self_uid, gid_t sock_gid)
{
	if (peer_uid == 0 || peer_uid == self_uid)
		return true;
	if (peer_gid == sock_gid)
		return true;
	return pid_in_group(peer_pid, sock_gid);
}

/* Changing methods need root or the daemon's uid. */
bool
ctl_may_stop(uid_t peer_uid, uid_t self_uid)
{
	return peer_uid == 0 || peer_uid == self_uid;
}

int
ctl_clients_of(struct sparkd *sd, uid_t uid)
{
	int n = 0;
	struct ctl_client *c;
	for (c = TAILQ_FIRST(&sd->clients); c != NULL; c = TAILQ_NEXT(c, entry)) {
		n += c->uid == uid;
	}
	return n;
}

/*
 * May one more connection from peer_uid stay? NULL when it may, else the cause for the refusal. fd is the new
 * connection's descriptor: the kernel hands out the lowest free one, so every descriptor below it is in use and
 * fd tells how close to RLIMIT_NOFILE sparkd is. Tiers: others, the daemon's uid, root; each tier's limits
 * exceed the one below, so a lower tier filling its share never locks out a higher one. Only others stop short of
 * the descriptor limit: what is left (and the spare descriptor, server.c) is the owners'.
 */
const char *
ctl_admit_check(uid_t peer_uid, uid_t self_uid, int nclients, int of_uid, int fd, long fd_limit)
{
	int tier = peer_uid == 0 ? 2 : peer_uid == self_uid ? 1 : 0;
	int total = CTL_MAX_CLIENTS + tier * CTL_OWNER_RESERVE;
	if (tier == 0 && fd_limit > 0 && fd >= fd_limit - CTL_FD_RESERVE)
		return "too many connections: sparkd is running out of file descriptors";
	if (nclients >= total)
		return "too many connections: the control socket is full";
	if (tier < 2 && of_uid >= CTL_MAX_PER_UID + tier * CTL_OWNER_RESERVE)
		return "too many connections from this user";
	return NULL;
}

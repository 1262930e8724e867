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

/* Finding spark-worker and starting it: the fork/exec half of supervision (tmux job.c's shape). */
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sparkd.h"

static bool
is_exec(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* spark-worker next to sparkd's own executable, then on PATH. Returns NULL when neither has it. */
char *
spawn_find_worker(const char *self_exe)
{
	char buf[PATH_MAX];
	const char *exe = self_exe;
	if (exe == NULL) {
		ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
		if (n > 0) {
			buf[n] = '\0';
			exe = buf;
		}
	}
	if (exe != NULL) {
		const char *slash = strrchr(exe, '/');
		if (slash != NULL) {
			char *p = xasprintf("%.*s/spark-worker", (int)(slash - exe), exe);
			if (is_exec(p))
				return p;
			free(p);
		}
	}
	const char *path = getenv("PATH");
	if (path == NULL || *path == '\0')
		return NULL;
	char *copy = xstrdup(path), *save = NULL;
	for (char *d = strtok_r(copy, ":", &save); d != NULL; d = strtok_r(NULL, ":", &save)) {
		if (*d == '\0')
			continue;
		char *p = xasprintf("%s/spark-worker", d);
		if (is_exec(p)) {
			free(copy);
			return p;
		}
		free(p);
	}
	free(copy);
	return NULL;
}

static void
close_pair(int p[2])
{
	if (p[0] >= 0)
		close(p[0]);
	if (p[1] >= 0)
		close(p[1]);
	p[0] = p[1] = -1;
}

/*
 * Fork and exec path with stdout/stderr on pipes and the report socketpair on fd 3. Signals stay blocked across
 * fork so the child never runs libevent's handlers; the child resets every disposition, restores the mask, closes
 * every other descriptor and execs. The parent's ends come back non-blocking and close-on-exec.
 * Returns the pid, or -1 with errno.
 */
pid_t
spawn_child(const char *path, char *const argv[], int *out_fd, int *err_fd, int *rep_fd)
{
	int out[2] = {-1, -1}, err[2] = {-1, -1}, rep[2] = {-1, -1};
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 ||
	    socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, rep) < 0) {
		int e = errno;
		close_pair(out);
		close_pair(err);
		close_pair(rep);
		errno = e;
		return -1;
	}

	sigset_t all, old;
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, &old);
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid == 0) {
		/* child: async-signal-safe calls only */
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_handler = SIG_DFL;
		sigemptyset(&sa.sa_mask);
		for (int s = 1; s < NSIG; s++)
			(void)sigaction(s, &sa, NULL);
		sigprocmask(SIG_SETMASK, &old, NULL);
		/* if sparkd dies without stopping us, stop warmly instead of running unsupervised */
		(void)prctl(PR_SET_PDEATHSIG, SIGTERM);
		if (getppid() != parent)
			_exit(1);
		/* a session of its own: a terminal's ^C or hangup reaches sparkd only, which decides what workers get
		 */
		(void)setsid();

		/* move the ends out of the way first, in case one of them already sits on 0..3 */
		int o = fcntl(out[1], F_DUPFD, 10), e = fcntl(err[1], F_DUPFD, 10), r = fcntl(rep[1], F_DUPFD, 10);
		int nul = open("/dev/null", O_RDONLY);
		if (o < 0 || e < 0 || r < 0 || nul < 0)
			_exit(127);
		if (dup2(nul, STDIN_FILENO) < 0 || dup2(o, STDOUT_FILENO) < 0 || dup2(e, STDERR_FILENO) < 0 ||
		    dup2(r, SPARK_REPORT_FD) < 0)
			_exit(127);
		closefrom(SPARK_REPORT_FD + 1);
		execv(path, argv);
		static const char msg[] = "spark-worker: cannot execute the worker program\n";
		ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
		(void)w;
		_exit(127);
	}
	int fork_errno = errno;
	sigprocmask(SIG_SETMASK, &old, NULL);
	close(out[1]);
	close(err[1]);
	close(rep[1]);
	if (pid < 0) {
		close(out[0]);
		close(err[0]);
		close(rep[0]);
		errno = fork_errno;
		return -1;
	}
	fd_set_nonblock(out[0]);
	fd_set_nonblock(err[0]);
	fd_set_nonblock(rep[0]);
	*out_fd = out[0];
	*err_fd = err[0];
	*rep_fd = rep[0];
	return pid;
}

/*
 * The job's agents as root finds and signals them (prolog, epilog):
 * identified by uid and command line, then held by a pidfd, so that no
 * signal reaches a process that took a pid over.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <aegaeon/job.h>

#include "aegaeon_spank.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

static int open_pidfd(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

static int send_pidfd(int fd, int sig)
{
	return (int)syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0);
}

/* State, parent and start time (clock ticks since boot) from /proc/PID/stat. */
static int proc_stat(pid_t pid, char *state, pid_t *ppid, unsigned long long *start)
{
	char path[64], buf[1024], *p;
	unsigned long long v = 0;
	ssize_t n;
	int fd, ppid_i = 0;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	/* The command name may hold anything, ')' included: fields start after the last ')'. */
	p = strrchr(buf, ')');
	if (p == NULL || sscanf(p + 1, " %c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d "
				"%*d %*d %llu", state, &ppid_i, &v) != 3)
		return -1;
	*ppid = ppid_i;
	*start = v;
	return 0;
}

/* Still the process that was held: its pid names a process of the same start time. */
static int same_process(const struct aeg_spank_proc *p)
{
	unsigned long long start;
	pid_t ppid;
	char state;

	return proc_stat(p->pid, &state, &ppid, &start) == 0 && start == p->start;
}

/*
 * Hold @pid when @match says it is ours. The pidfd is opened first and the
 * checks are made after: if its process is still there at the end, the pid
 * cannot have been reused meanwhile, so the checks were of that process.
 * Without pidfds (kernels before 5.3) the start time stands in for it.
 */
static int hold(struct aeg_spank_proc *p, pid_t pid, int (*match)(pid_t, const void *), const void *arg)
{
	pid_t ppid;
	char state;

	p->pid = pid;
	p->fd = open_pidfd(pid);
	if (p->fd < 0 && errno != ENOSYS)
		return -1;
	if (proc_stat(pid, &state, &ppid, &p->start) < 0 || state == 'Z' || state == 'X' || !match(pid, arg))
		goto no;
	if (p->fd >= 0 ? send_pidfd(p->fd, 0) < 0 : !same_process(p))
		goto no;
	return 0;
no:
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
	return -1;
}

int aeg_spank_proc_signal(const struct aeg_spank_proc *p, int sig)
{
	if (p->fd >= 0)
		return send_pidfd(p->fd, sig);
	/* No pidfd: identify it again right before the signal. */
	if (!same_process(p)) {
		errno = ESRCH;
		return -1;
	}
	return kill(p->pid, sig);
}

/* Exited (a zombie nobody reaps holds nothing either). */
static int gone(const struct aeg_spank_proc *p)
{
	unsigned long long start;
	struct pollfd pfd;
	pid_t ppid;
	char state;

	if (p->fd >= 0) {
		pfd.fd = p->fd;
		pfd.events = POLLIN;
		return poll(&pfd, 1, 0) == 1;
	}
	return proc_stat(p->pid, &state, &ppid, &start) < 0 || start != p->start || state == 'Z' || state == 'X';
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int aeg_spank_procs_wait(const struct aeg_spank_proc *p, int n, long timeout_ms)
{
	for (long waited = 0;; waited += 20) {
		int left = 0;

		for (int i = 0; i < n; i++)
			left += !gone(&p[i]);
		if (left == 0 || waited >= timeout_ms)
			return left;
		sleep_ms(20);
	}
}

int aeg_spank_proc_gone(const struct aeg_spank_proc *p)
{
	return gone(p);
}

void aeg_spank_procs_release(struct aeg_spank_proc *p, int n)
{
	for (int i = 0; i < n; i++) {
		if (p[i].fd >= 0)
			close(p[i].fd);
		p[i].fd = -1;
	}
}

struct agent_id {
	uid_t uid;
	const char *dir;
};

/* A process of the job user with "--runtime-dir DIR" on its command line: this job's agent. */
static int is_agent(pid_t pid, const void *arg)
{
	const struct agent_id *id = arg;
	char path[64], buf[8192];
	struct stat st;
	ssize_t n;
	int fd, found = 0;

	snprintf(path, sizeof(path), "/proc/%d", (int)pid);
	if (stat(path, &st) < 0 || st.st_uid != id->uid)
		return 0;
	snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	for (const char *p = buf; p < buf + n; p += strlen(p) + 1)
		if (strcmp(p, "--runtime-dir") == 0 && p + strlen(p) + 1 < buf + n &&
		    strcmp(p + strlen(p) + 1, id->dir) == 0)
			found = 1;
	return found;
}

static int held(const struct aeg_spank_proc *p, int n, pid_t pid)
{
	for (int i = 0; i < n; i++)
		if (p[i].pid == pid)
			return 1;
	return 0;
}

/* agent.pid is the user's file: read with care, and only trusted after is_agent(). */
static pid_t pid_file(int dfd)
{
	char buf[32];
	struct stat st;
	ssize_t len = -1;
	long pid;
	int fd;

	fd = openat(dfd, AEG_JOB_PID_FILE, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return 0;
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
		len = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (len <= 0)
		return 0;
	buf[len] = '\0';
	pid = strtol(buf, NULL, 10);
	return pid > 1 && pid <= INT32_MAX ? (pid_t)pid : 0;
}

int aeg_spank_agents_find(struct aeg_spank_proc *agents, int max, uid_t uid, const char *dir, int dfd)
{
	struct agent_id id = { uid, dir };
	struct dirent *de;
	pid_t pid;
	DIR *d;
	int n = 0;

	pid = dfd >= 0 ? pid_file(dfd) : 0;
	if (pid > 0 && max > 0 && hold(&agents[n], pid, is_agent, &id) == 0)
		n++;
	/* An agent that has not written its pid yet (or a second one) is found by its command line. */
	d = opendir("/proc");
	if (d == NULL)
		return n;
	while ((de = readdir(d)) != NULL && n < max) {
		char *end;
		long v = strtol(de->d_name, &end, 10);

		if (*end != '\0' || v <= 1 || held(agents, n, (pid_t)v))
			continue;
		if (hold(&agents[n], (pid_t)v, is_agent, &id) == 0)
			n++;
	}
	closedir(d);
	return n;
}

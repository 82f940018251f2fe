/*
 * The job's agents as root finds and signals them (prolog, extern step,
 * epilog): the one the prolog started by its record in runtime_dir, others
 * by uid and command line, each then held by a pidfd, so that no signal
 * reaches a process that took a pid over; and everything an agent started,
 * found below it (it is its children's subreaper).
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

#include <aegaeon/jobrec.h>

#include "aegaeon_spank.h"
#include "device_internal.h"

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

/* Still the process that was held: its pid names a process of the same start time. */
static int same_process(const struct aeg_spank_proc *p)
{
	uint64_t start;

	return aeg_proc_start_time(p->pid, &start) == 0 && start == p->start;
}

/*
 * Hold @pid when @match says it is ours. The pidfd is opened first and the
 * checks are made after: if its process is still there at the end, the pid
 * cannot have been reused meanwhile, so the checks were of that process.
 * Without pidfds (kernels before 5.3) the start time stands in for it.
 */
static int hold(struct aeg_spank_proc *p, pid_t pid, int (*match)(pid_t, const void *), const void *arg)
{
	char state;

	p->pid = pid;
	p->fd = open_pidfd(pid);
	if (p->fd < 0 && errno != ENOSYS)
		return -1;
	if (aeg_proc_stat(pid, &state, NULL, &p->start) < 0 || state == 'Z' || state == 'X' || !match(pid, arg))
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
	struct pollfd pfd = { p->fd, POLLIN, 0 };

	if (p->fd >= 0)
		return poll(&pfd, 1, 0) == 1;
	return !aeg_proc_alive(p->pid, p->start);
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

/* A process of the job user with "--runtime-dir DIR" on its command line: this job's agent. */
static int is_agent(pid_t pid, const void *arg)
{
	const struct aeg_spank_agent_key *key = arg;
	char path[64], buf[8192];
	struct stat st;
	ssize_t n;
	int fd, found = 0;

	snprintf(path, sizeof(path), "/proc/%d", (int)pid);
	if (stat(path, &st) < 0 || st.st_uid != key->uid)
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
	for (const char *p = buf; p < buf + n; p += strlen(p) + 1) {
		const char *v = p + strlen(p) + 1, *slash;

		if (strcmp(p, "--runtime-dir") != 0 || v >= buf + n)
			continue;
		slash = strrchr(v, '/');
		if (key->dir != NULL ? strcmp(v, key->dir) == 0 : slash != NULL && strcmp(slash + 1, key->name) == 0)
			found = 1;
	}
	return found;
}

/* The process the prolog started and recorded: the same pid and start time, whatever it runs now. */
static int is_recorded(pid_t pid, const void *arg)
{
	const struct aeg_spank_agent_key *key = arg;
	uint64_t start;

	return aeg_proc_start_time(pid, &start) == 0 && start == key->start;
}

static int held(const struct aeg_spank_proc *p, int n, pid_t pid)
{
	for (int i = 0; i < n; i++)
		if (p[i].pid == pid)
			return 1;
	return 0;
}

int aeg_spank_agents_find(struct aeg_spank_proc *agents, int max, const struct aeg_spank_agent_key *key,
			  unsigned *found)
{
	struct dirent *de;
	DIR *d;
	int n = 0;

	*found = 0;
	if (key->pid > 1 && max > 0 && hold(&agents[n], key->pid, is_recorded, key) == 0) {
		n++;
		*found |= AEG_SPANK_FOUND_RECORDED;
	}
	/*
	 * An agent the prolog did not record (one started by hand, or by a
	 * plugin before records) is found by its command line. So is any
	 * process of the job user's that only claims to be the agent: stopping
	 * it as the agent costs the user nothing, and what does not fit in
	 * @max is said, never passed over in silence.
	 */
	d = opendir("/proc");
	if (d == NULL)
		return n;
	while ((de = readdir(d)) != NULL) {
		char *end;
		long v = strtol(de->d_name, &end, 10);

		if (*end != '\0' || v <= 1 || held(agents, n, (pid_t)v))
			continue;
		if (n == max) {
			struct aeg_spank_proc extra;

			if (hold(&extra, (pid_t)v, is_agent, key) == 0) {
				aeg_spank_procs_release(&extra, 1);
				*found |= AEG_SPANK_FOUND_MORE;
				break;
			}
			continue;
		}
		if (hold(&agents[n], (pid_t)v, is_agent, key) == 0)
			n++;
	}
	closedir(d);
	return n;
}

int aeg_spank_agent_hold(struct aeg_spank_proc *agent, pid_t pid, const struct aeg_spank_agent_key *key)
{
	return hold(agent, pid, is_agent, key);
}

/* The record's file in runtime_dir: ".agent-<jobdir name>", a name no job directory can have. */
static int record_name(char *buf, size_t len, const char *name)
{
	int w = snprintf(buf, len, ".agent-%s", name);

	return w < 0 || (size_t)w >= len ? -1 : 0;
}

int aeg_spank_agent_record(int rfd, const char *name, const struct aeg_spank_proc *agent)
{
	char file[128], tmp[140], line[64];
	int fd, len, err = 0;

	if (record_name(file, sizeof(file), name) < 0)
		return -1;
	snprintf(tmp, sizeof(tmp), "%s.tmp", file);
	len = snprintf(line, sizeof(line), "%d %llu\n", (int)agent->pid, (unsigned long long)agent->start);
	if (unlinkat(rfd, tmp, 0) < 0 && errno != ENOENT)
		return -1;
	fd = openat(rfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	if (write(fd, line, (size_t)len) != len || fsync(fd) < 0)
		err = -1;
	if (close(fd) < 0)
		err = -1;
	if (err == 0 && renameat(rfd, tmp, rfd, file) < 0)
		err = -1;
	if (err < 0) {
		int saved = errno;

		unlinkat(rfd, tmp, 0);
		errno = saved;
	}
	return err;
}

int aeg_spank_agent_recorded(int rfd, const char *name, struct aeg_spank_agent_key *key)
{
	char file[128], buf[64], *end;
	unsigned long long start;
	struct stat st;
	ssize_t len = -1;
	long pid;
	int fd;

	key->pid = 0;
	key->start = 0;
	if (record_name(file, sizeof(file), name) < 0)
		return -1;
	fd = openat(rfd, file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -1;
	/* Root's own file in a directory only root writes: anything else is not a record. */
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == 0)
		len = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (len <= 0)
		return -1;
	buf[len] = '\0';
	errno = 0;
	pid = strtol(buf, &end, 10);
	if (errno != 0 || *end != ' ' || pid <= 1 || pid > INT32_MAX)
		return -1;
	start = strtoull(end + 1, &end, 10);
	if (errno != 0 || *end != '\n')
		return -1;
	key->pid = (pid_t)pid;
	key->start = start;
	return 1;
}

int aeg_spank_agent_record_remove(int rfd, const char *name)
{
	char file[128];

	if (record_name(file, sizeof(file), name) < 0)
		return -1;
	return unlinkat(rfd, file, 0) < 0 && errno != ENOENT ? -1 : 0;
}

/* Pids and parents of every live process, for walking trees. */
struct ptable {
	pid_t *pid, *ppid;
	size_t n, cap;
};

static int ptable_grow(struct ptable *t)
{
	size_t cap = t->cap ? t->cap * 2 : 1024;
	pid_t *v;

	v = realloc(t->pid, cap * sizeof(*v));
	if (v == NULL)
		return -1;
	t->pid = v;
	v = realloc(t->ppid, cap * sizeof(*v));
	if (v == NULL)
		return -1;
	t->ppid = v;
	t->cap = cap;
	return 0;
}

/* The live processes now (zombies hold nothing); -1 (nothing to free) on failure. */
static int ptable_read(struct ptable *t)
{
	struct dirent *de;
	DIR *d;

	memset(t, 0, sizeof(*t));
	d = opendir("/proc");
	if (d == NULL)
		return -1;
	while ((de = readdir(d)) != NULL) {
		char *end, state;
		long v = strtol(de->d_name, &end, 10);
		pid_t ppid;

		if (*end != '\0' || v <= 1 || aeg_proc_stat((pid_t)v, &state, &ppid, NULL) < 0 ||
		    state == 'Z' || state == 'X')
			continue;
		if (t->n == t->cap && ptable_grow(t) < 0) {
			closedir(d);
			free(t->pid);
			free(t->ppid);
			return -1;
		}
		t->pid[t->n] = (pid_t)v;
		t->ppid[t->n++] = ppid;
	}
	closedir(d);
	return 0;
}

static int by_pid(const void *a, const void *b)
{
	pid_t x = *(const pid_t *)a, y = *(const pid_t *)b;

	return (x > y) - (x < y);
}

static int in_set(const pid_t *set, size_t n, pid_t pid)
{
	return n > 0 && bsearch(&pid, set, n, sizeof(*set), by_pid) != NULL;
}

/* The tree below a root: its pids sorted, the root included. */
struct tree {
	pid_t *pids;
	size_t n;
};

/* Its parent is in the tree (read after the pidfd was opened: see hold()). */
static int in_tree(pid_t pid, const void *arg)
{
	const struct tree *t = arg;
	pid_t ppid;

	return aeg_proc_stat(pid, NULL, &ppid, NULL) == 0 && in_set(t->pids, t->n, ppid);
}

/* Grow @tr from the table, one generation per pass, until nothing more hangs below it. */
static int tree_grow(struct tree *tr, const struct ptable *t, pid_t root)
{
	size_t before;

	tr->pids = malloc((t->n + 1) * sizeof(*tr->pids));
	if (tr->pids == NULL)
		return -1;
	tr->pids[0] = root;
	tr->n = 1;
	do {
		size_t n = tr->n;

		before = tr->n;
		for (size_t i = 0; i < t->n; i++)
			if (t->pid[i] != root && in_set(tr->pids, before, t->ppid[i]) &&
			    !in_set(tr->pids, before, t->pid[i]))
				tr->pids[n++] = t->pid[i];
		tr->n = n;
		qsort(tr->pids, tr->n, sizeof(*tr->pids), by_pid);
	} while (tr->n != before);
	return 0;
}

/* Add @pid to the sorted set @s unless it is there (the set is sorted again after each round). */
static int set_add(struct tree *s, size_t sorted, pid_t pid)
{
	pid_t *v;

	if (in_set(s->pids, sorted, pid))
		return 0;
	v = realloc(s->pids, (s->n + 1) * sizeof(*v));
	if (v == NULL)
		return -1;
	s->pids = v;
	s->pids[s->n++] = pid;
	return 0;
}

/* One round: SIGKILL every process below @root now, adding it to @dead; how many, or -1. */
static int kill_round(const struct aeg_spank_proc *root, struct tree *dead)
{
	size_t sorted = dead->n;
	struct aeg_spank_proc p;
	struct ptable t;
	struct tree tr;
	int killed = 0;

	if (ptable_read(&t) < 0)
		return -1;
	if (tree_grow(&tr, &t, root->pid) < 0) {
		free(t.pid);
		free(t.ppid);
		return -1;
	}
	for (size_t i = 0; i < tr.n; i++) {
		if (tr.pids[i] == root->pid || hold(&p, tr.pids[i], in_tree, &tr) < 0)
			continue;
		/* The root still alive: the parent pids read were not reused. */
		if (!gone(root) && aeg_spank_proc_signal(&p, SIGKILL) == 0) {
			killed++;
			if (set_add(dead, sorted, p.pid) < 0)
				killed = -1;
		}
		aeg_spank_procs_release(&p, 1);
		if (killed < 0)
			break;
	}
	if (dead->n > 1)
		qsort(dead->pids, dead->n, sizeof(*dead->pids), by_pid);
	free(tr.pids);
	free(t.pid);
	free(t.ppid);
	return killed;
}

/*
 * Killed processes' children move up to the agent (their subreaper) or stay
 * below their dying parents, so rounds go on until one finds nothing, each a
 * fresh look; bounded in time for a tree that forks faster than it dies.
 */
int aeg_spank_kill_tree(const struct aeg_spank_proc *root, long timeout_ms, unsigned *killed)
{
	struct tree dead = { NULL, 0 };
	int rc = 0;

	for (long waited = 0;; waited += 5) {
		int k = gone(root) ? 0 : kill_round(root, &dead);

		if (k <= 0) {
			rc = k;
			break;
		}
		if (waited >= timeout_ms) {
			errno = EAGAIN;
			rc = -1;
			break;
		}
		sleep_ms(5);
	}
	*killed = (unsigned)dead.n;
	free(dead.pids);
	return rc;
}

pid_t aeg_spank_only_child(pid_t parent)
{
	struct ptable t;
	pid_t child = 0;

	if (ptable_read(&t) < 0)
		return -1;
	for (size_t i = 0; i < t.n; i++) {
		if (t.ppid[i] != parent)
			continue;
		child = child == 0 ? t.pid[i] : -1;
		if (child < 0)
			break;
	}
	free(t.pid);
	free(t.ppid);
	return child > 0 ? child : -1;
}

int aeg_spank_tree_hold(const struct aeg_spank_proc *root, struct aeg_spank_proc **below)
{
	struct ptable t;
	struct tree tr;
	int n = 0;

	*below = NULL;
	if (ptable_read(&t) < 0)
		return -1;
	if (tree_grow(&tr, &t, root->pid) < 0 || (*below = calloc(tr.n, sizeof(**below))) == NULL) {
		n = -1;
		goto out;
	}
	for (size_t i = 0; i < tr.n; i++)
		if (tr.pids[i] != root->pid && hold(&(*below)[n], tr.pids[i], in_tree, &tr) == 0)
			n++;
	/* The root still alive: the parent pids read were not reused. */
	if (gone(root)) {
		aeg_spank_procs_release(*below, n);
		n = 0;
	}
out:
	free(tr.pids);
	free(t.pid);
	free(t.ppid);
	return n;
}

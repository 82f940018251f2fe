/*
 * Helpers of the tests that run aegaeond (without Slurm) and attack or
 * break it: start and stop it, count its descriptors, read its log.
 * Include after cmocka.h and testutil.h.
 */
#ifndef AEGAEON_AGENTUTIL_H
#define AEGAEON_AGENTUTIL_H

#include <dirent.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>
#include <aegaeon/jobrec.h>

/*
 * Generous: the CI machine has two cores shared with other builds, and
 * under valgrind the agent and the test run some twenty times slower.
 */
#define BOUND_MS (under_valgrind() ? 20000 : 5000)

struct agent {
	char dir[64], sock[128], ready[128], log[96];
	pid_t pid;
};

/* Every agent a test started, so one that fails midway leaves none running. */
static pid_t started[16];
static int nstarted;

static inline double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static inline int agent_fds(pid_t pid)
{
	char path[64];
	struct dirent *e;
	DIR *d;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	d = opendir(path);
	if (d == NULL)
		return -1;
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/*
 * The agent's descriptors once its start-up is over: the fewest seen over
 * 200 ms. Its ready record appears before it has closed the runtime
 * directory it opened to fsync the rename, so a count taken right then can
 * be one too many.
 */
static inline int agent_fds_idle(pid_t pid)
{
	int n = agent_fds(pid);

	for (int i = 0; i < 20; i++) {
		int m;

		usleep(10000);
		m = agent_fds(pid);
		if (m < n)
			n = m;
	}
	return n;
}

/* Wait for the agent's descriptors to come back to @want (threads close theirs as they see EOF). */
static inline int agent_fds_settle(pid_t pid, int want)
{
	char cmd[96];
	int n = -1;

	for (int i = 0; i < BOUND_MS / 10; i++) {
		n = agent_fds(pid);
		if (n == want)
			return n;
		usleep(10000);
	}
	snprintf(cmd, sizeof(cmd), "ls -l /proc/%d/fd >&2", (int)pid);
	if (system(cmd) != 0)
		print_error("cannot list the agent's descriptors\n");
	return n;
}

/* The agent's log from byte @from into @buf (NUL-terminated, cut at @size - 1 bytes); "" when unreadable. */
static inline void log_read(const struct agent *ag, long from, char *buf, size_t size)
{
	FILE *f = fopen(ag->log, "r");
	size_t n = 0;

	if (f != NULL && fseek(f, from, SEEK_SET) == 0)
		n = fread(buf, 1, size - 1, f);
	if (f != NULL)
		fclose(f);
	buf[n] = '\0';
}

/* Whether the agent's log has @text at or after byte @from. */
static inline int log_has_from(const struct agent *ag, long from, const char *text)
{
	char buf[65536];

	log_read(ag, from, buf, sizeof(buf));
	return strstr(buf, text) != NULL;
}

static inline int log_has(const struct agent *ag, const char *text)
{
	return log_has_from(ag, 0, text);
}

/*
 * The agent makes its pinned pool after it is ready, in a thread of its own;
 * its descriptor counts are the same from one test to the next only once
 * that is over (made or failed, both logged).
 */
static inline void pool_made(const struct agent *ag, long log_from)
{
	for (int i = 0; i < BOUND_MS / 10; i++) {
		if (log_has_from(ag, log_from, "pinned pool ready") ||
		    log_has_from(ag, log_from, "the job runs on without it"))
			return;
		usleep(10000);
	}
	fail_msg("aegaeond made no pinned pool in %d ms (see %s)", BOUND_MS, ag->log);
}

/* aegaeond in @dir (made when empty) with "--gpus 0" and @extra; its stderr in a log beside the dir. */
static inline void agent_start(struct agent *ag, const char *const *extra)
{
	const char *argv[32] = { AEGAEOND_PATH, "--job", "77", "--runtime-dir", NULL, "--device", "host",
				 "--foreground", "--gpus", "0" };
	int n = 10, pinned = 0;
	long log_from = 0;
	struct stat st;

	if (ag->dir[0] == '\0') {
		strcpy(ag->dir, "/tmp/aeg-faults-XXXXXX");
		assert_non_null(mkdtemp(ag->dir));
	}
	snprintf(ag->sock, sizeof(ag->sock), "%s/agent.sock", ag->dir);
	snprintf(ag->ready, sizeof(ag->ready), "%s/ready", ag->dir);
	snprintf(ag->log, sizeof(ag->log), "%s.log", ag->dir);
	argv[4] = ag->dir;
	for (int i = 0; extra[i]; i++) {
		pinned |= strcmp(extra[i], "--pinned") == 0;
		argv[n++] = extra[i];
	}
	argv[n] = NULL;
	if (stat(ag->log, &st) == 0)
		log_from = (long)st.st_size;
	ag->pid = fork();
	assert_true(ag->pid >= 0);
	if (ag->pid == 0) {
		int fd = open(ag->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	if (nstarted < 16)
		started[nstarted++] = ag->pid;
	for (int i = 0; i < 2000; i++) {
		struct aeg_job_record rec;

		if (aeg_job_record_read(ag->ready, &rec) == 0 && rec.pid == ag->pid) {
			setenv("AEGAEON_SOCKET", ag->sock, 1);
			if (pinned)
				pool_made(ag, log_from);
			return;
		}
		if (waitpid(ag->pid, NULL, WNOHANG) == ag->pid)
			fail_msg("aegaeond exited at start (see %s)", ag->log);
		usleep(10000);
	}
	fail_msg("aegaeond not ready in 20 s (see %s)", ag->log);
}

static inline int exit_status(pid_t pid, int bound_ms)
{
	int status;

	for (int i = 0; i < bound_ms / 10; i++) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		assert_true(r >= 0);
		if (r == pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		usleep(10000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	fail_msg("process %d still running after %d ms (hung)", (int)pid, bound_ms);
	return -1;
}

static inline void agent_kill(struct agent *ag, int sig)
{
	assert_int_equal(kill(ag->pid, sig), 0);
	assert_int_equal(waitpid(ag->pid, NULL, 0), ag->pid);
	ag->pid = -1;
}


static inline void agent_cleanup(struct agent *ag)
{
	char cmd[256];

	if (ag->pid > 0) {
		kill(ag->pid, SIGKILL);
		waitpid(ag->pid, NULL, 0);
	}
	snprintf(cmd, sizeof(cmd), "rm -rf %s %s", ag->dir, ag->log);
	assert_int_equal(system(cmd), 0);
	unsetenv("AEGAEON_SOCKET");
}

static inline void write_file(const char *path, size_t bytes)
{
	unsigned char buf[65536];
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	for (size_t done = 0; done < bytes; done += sizeof(buf)) {
		for (size_t i = 0; i < sizeof(buf); i++)
			buf[i] = (unsigned char)((done + i) * 31 + ((done + i) >> 16));
		assert_int_equal(fwrite(buf, 1, sizeof(buf), f), sizeof(buf));
	}
	assert_int_equal(fclose(f), 0);
}

static inline uint32_t hog_pool(aeg_pool_t *pool, uint32_t *bufs, uint32_t cap)
{
	struct aeg_pool_buffer b;
	uint32_t n = 0;

	while (n < cap && aeg_pool_acquire(pool, 0, &b) == 0)
		bufs[n++] = b.index;
	return n;
}

static inline struct aeg_job_status *status_of(aeg_job_t *job)
{
	struct aeg_job_status *st = NULL;
	int err = aeg_job_status(job, &st);

	if (err)
		fail_msg("status: %s: %s", aeg_errname(err), aeg_error_detail());
	return st;
}

static inline int connect_raw(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	assert_true(fd >= 0);
	strcpy(sa.sun_path, path);
	assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	return fd;
}

/*
 * Session test fixtures (test_session, test_slice). session_env_local: a
 * local session's environment (no job socket, @gpus host GPUs, each
 * engine's slab @slab). session_env_job: an agent of one host GPU started
 * with @opts, its socket in the environment. session_env_end: stops the
 * agent, removes @dir; -1 when the test left other than @fds descriptors.
 */
static inline void session_env_local(const char *gpus, const char *slab)
{
	unsetenv("AEGAEON_SOCKET");
	setenv("AEGAEON_HOST_GPUS", gpus, 1);
	setenv("AEGAEON_PREFETCH_SLAB", slab, 1);
}

static inline void session_env_job(struct agent *ag, const char *const *opts)
{
	setenv("AEGAEON_HOST_GPUS", "1", 1);
	unsetenv("AEGAEON_SLABS");
	agent_start(ag, opts);
}

static inline int session_env_end(struct agent *ag, const char *dir, int fds)
{
	char cmd[128];
	int now = count_fds(), leaked = now != fds;

	/* Every test closes what it opened: no descriptor is left behind. */
	if (leaked)
		fprintf(stderr, "descriptors: %d before the test, %d after\n", fds, now);
	if (ag->pid > 0) {
		agent_cleanup(ag);
		unsetenv("AEGAEON_SOCKET");
	}
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		leaked = 1;
	return leaked ? -1 : 0;
}

static inline int kill_started(void **state)
{
	/* Only children not reaped yet: a pid reaped before may name another process now. */
	for (int i = 0; i < nstarted; i++) {
		if (waitpid(started[i], NULL, WNOHANG) == 0 && kill(started[i], SIGKILL) == 0)
			waitpid(started[i], NULL, 0);
	}
	nstarted = 0;
	return 0;
}

#endif

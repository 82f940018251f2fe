/* A real aegaeond for the unit tests: started on a fresh runtime directory, stopped and removed after. */
#ifndef AEGAEON_AGENTUTIL_H
#define AEGAEON_AGENTUTIL_H

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aegaeon/job.h>

#include "testutil.h"

struct test_agent {
	char dir[64], sock[128], ready[128], log[96];
	pid_t pid;
};

/*
 * test_agent_start - aegaeond (AEGAEOND_PATH) on the host backend with
 * "--gpus 0" and @extra (NULL-terminated), its output in a log beside the
 * runtime directory; waits (at most 20 s) for its ready record and sets
 * $AEGAEON_SOCKET. Returns 0, or -1 with the reason on stderr.
 */
static inline int test_agent_start(struct test_agent *ag, const char *const *extra)
{
	const char *argv[32] = { AEGAEOND_PATH, "--job", "91", "--runtime-dir", NULL, "--device", "host",
				 "--foreground", "--gpus", "0" };
	int n = 10;

	memset(ag, 0, sizeof(*ag));
	strcpy(ag->dir, "/tmp/aeg-test-XXXXXX");
	if (mkdtemp(ag->dir) == NULL)
		return -1;
	snprintf(ag->sock, sizeof(ag->sock), "%s/agent.sock", ag->dir);
	snprintf(ag->ready, sizeof(ag->ready), "%s/ready", ag->dir);
	snprintf(ag->log, sizeof(ag->log), "%s.log", ag->dir);
	argv[4] = ag->dir;
	for (int i = 0; extra && extra[i] && n < 31; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	ag->pid = fork();
	if (ag->pid < 0)
		return -1;
	if (ag->pid == 0) {
		int fd = open(ag->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		execv(argv[0], (char *const *)argv);
		child_exit(127);
	}
	for (int i = 0; i < 2000; i++) {
		struct aeg_job_record rec;

		if (aeg_job_record_read(ag->ready, &rec) == 0 && rec.pid == ag->pid) {
			setenv("AEGAEON_SOCKET", ag->sock, 1);
			return 0;
		}
		if (waitpid(ag->pid, NULL, WNOHANG) == ag->pid) {
			fprintf(stderr, "aegaeond exited at start (see %s)\n", ag->log);
			ag->pid = -1;
			return -1;
		}
		usleep(10000);
	}
	fprintf(stderr, "aegaeond not ready in 20 s (see %s)\n", ag->log);
	return -1;
}

/* test_agent_stop - kill the agent, remove its directory and log, unset $AEGAEON_SOCKET. */
static inline void test_agent_stop(struct test_agent *ag)
{
	char cmd[256];

	if (ag->pid > 0) {
		kill(ag->pid, SIGKILL);
		waitpid(ag->pid, NULL, 0);
		ag->pid = -1;
	}
	unsetenv("AEGAEON_SOCKET");
	if (ag->dir[0] != '\0') {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s' '%s'", ag->dir, ag->log);
		if (system(cmd) != 0)
			fprintf(stderr, "removing %s failed\n", ag->dir);
	}
}

#endif

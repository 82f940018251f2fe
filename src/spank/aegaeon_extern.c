/*
 * task_post_fork (slurmstepd, root). In the job's extern step (PrologFlags=
 * Contain) the job's agent, started by the prolog before the job had
 * cgroups, joins the cgroups Slurm just put the extern step's own process
 * in: its memory is then charged to the job, the job's device limits apply
 * to it, and Slurm kills it, with everything it started, with the job.
 */
#include "config.h"

#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/slurm.h>

#include <aegaeon/error.h>
#include <aegaeon/jobrec.h>

#include "aegaeon_spank.h"
#include "jobdir.h"

#define MAX_AGENTS 64

/*
 * The reason the first step will show, written as the job user (the
 * directory is theirs now): the error record is read before the ready one.
 */
static void write_reason(const char *dir, uid_t uid, gid_t gid, const char *reason)
{
	char path[PATH_MAX + 16];
	pid_t pid;
	int status;

	snprintf(path, sizeof(path), "%s/" AEG_JOB_ERROR_FILE, dir);
	pid = fork();
	if (pid == 0) {
		if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0)
			_exit(1);
		_exit(aeg_job_error_write(path, reason) < 0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		slurm_error("aegaeon: could not write %s: %s", path, reason);
}

/*
 * Move @agent, then what is below it, where @task is; -1 with the reason in
 * @what. A process below may fork while it moves: again until nothing moves.
 */
static int join_tree(const struct aeg_spank_proc *agent, pid_t task, char *what, size_t len)
{
	int moved = aeg_spank_cgroup_join(agent->pid, task, what, len);

	for (int round = 0; moved >= 0 && round < 8; round++) {
		struct aeg_spank_proc *below;
		char sub[1024];
		int n = aeg_spank_tree_hold(agent, &below), any = 0;

		if (n < 0) {
			snprintf(what, len, "listing the processes below it: %s", strerror(errno));
			moved = -1;
		}
		for (int i = 0; i < n && moved >= 0; i++) {
			int m = aeg_spank_cgroup_join(below[i].pid, task, sub, sizeof(sub));

			if (m < 0 && !aeg_spank_proc_gone(&below[i])) {
				snprintf(what, len, "process %d below it: %s", (int)below[i].pid, sub);
				moved = -1;
			}
			any |= m > 0;
		}
		if (n > 0)
			aeg_spank_procs_release(below, n);
		free(below);
		if (!any)
			break;
	}
	return moved;
}

/*
 * Put the job's agents where the extern step's process is; on failure, stop
 * them and say why. The agent the prolog recorded comes first: processes
 * that only claim to be it (started by the user with its command line)
 * cannot keep it out of the job's cgroups.
 */
static void adopt(uint32_t jobid, uid_t uid, gid_t gid, const char *node, const char *dir, const char *name)
{
	struct aeg_spank_agent_key key = { .uid = uid, .dir = dir, .name = name };
	struct aeg_spank_proc agents[MAX_AGENTS];
	char what[1024], reason[AEG_JOB_ERROR_MAX];
	pid_t task = aeg_spank_only_child(getpid());
	int n, rfd, failed = 0;
	unsigned found;

	rfd = aeg_spank_runtime_dir(0);
	if (rfd >= 0 && aeg_spank_agent_recorded(rfd, name, &key) < 0)
		slurm_error("aegaeon: job %u on %s: the record of its agent cannot be read: %m", jobid, node);
	if (rfd >= 0)
		close(rfd);
	n = aeg_spank_agents_find(agents, MAX_AGENTS, &key, &found);
	if (found & AEG_SPANK_FOUND_MORE)
		slurm_error("aegaeon: job %u on %s: more than %d processes of uid %u claim to be its agent; "
			    "the first %d join the job's cgroups%s", jobid, node, MAX_AGENTS, (unsigned)uid, n,
			    found & AEG_SPANK_FOUND_RECORDED ? ", the recorded agent first" : "");
	if (n == 0)
		return;
	for (int i = 0; i < n && !failed; i++) {
		int moved = task > 0 ? join_tree(&agents[i], task, what, sizeof(what)) : -1;

		if (task <= 0)
			snprintf(what, sizeof(what), "the extern step's own process was not found");
		/* An agent that exits meanwhile (a failed start) leaves its own error record. */
		if (aeg_spank_proc_gone(&agents[i]))
			continue;
		if (moved < 0) {
			snprintf(reason, sizeof(reason), "the agent could not join the job's cgroups on node %s: %s",
				 node, what);
			failed = 1;
		} else if (moved > 0) {
			slurm_info("aegaeon: job %u on %s: agent %d joined the job's cgroups: %s", jobid, node,
				   (int)agents[i].pid, what);
		}
	}
	if (failed) {
		slurm_error("aegaeon: job %u: %s; stopping it", jobid, reason);
		for (int i = 0; i < n; i++)
			aeg_spank_proc_signal(&agents[i], SIGKILL);
		write_reason(dir, uid, gid, reason);
	}
	aeg_spank_procs_release(agents, n);
}

int aeg_spank_task_post_fork(spank_t sp)
{
	char dir[PATH_MAX], name[64];
	const char *node = getenv("SLURMD_NODENAME");
	uint32_t jobid, stepid;
	struct stat st;
	uid_t uid;
	gid_t gid;

	if (spank_get_item(sp, S_JOB_STEPID, &stepid) != ESPANK_SUCCESS || stepid != SLURM_EXTERN_CONT ||
	    !aeg_site.ok)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS) {
		slurm_error("aegaeon: extern step: job id, uid or gid unknown");
		return 0;
	}
	/* Jobs without aegaeon have no job directory. */
	if (aeg_jobdir_path(dir, sizeof(dir), aeg_site.cfg.runtime_dir, jobid, node) < 0 ||
	    aeg_jobdir_name(name, sizeof(name), jobid, node) < 0 || lstat(dir, &st) < 0)
		return 0;
	adopt(jobid, uid, gid, node, dir, name);
	return 0;
}

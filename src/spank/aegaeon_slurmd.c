/* job_prolog and job_epilog (root, on each node): the job directory and the agent's start and stop. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aegaeon/error.h>
#include <aegaeon/jobrec.h>

#include "aegaeon_spank.h"
#include "jobdir.h"

#define MAX_GROUPS 1024
/* Processes held at once as the job's agents: the recorded one, and those claiming to be it. */
#define MAX_AGENTS 64
/* Bounds on the epilog: removing the job dir, killing what the agent started. */
#define REMOVE_TIMEOUT_MS 30000
#define TREE_TIMEOUT_MS 5000

/* What the prolog and epilog know about the job from their environment. */
struct job {
	uint32_t id;
	uid_t uid;
	gid_t gid;
	const char *user;
	const char *node;
	char dir[PATH_MAX];
	char name[64];          /* the job dir inside runtime_dir (aeg_jobdir_name) */
};

static int env_u32(const char *name, uint32_t *v)
{
	const char *s = getenv(name);
	char *end;
	unsigned long long n;

	if (s == NULL || *s == '\0')
		return -1;
	errno = 0;
	n = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0' || n > UINT32_MAX)
		return -1;
	*v = (uint32_t)n;
	return 0;
}

static int job_from_env(struct job *job)
{
	uint32_t uid, gid;

	memset(job, 0, sizeof(*job));
	job->user = getenv("SLURM_JOB_USER");
	job->node = getenv("SLURMD_NODENAME");
	if (env_u32("SLURM_JOB_ID", &job->id) < 0 || env_u32("SLURM_JOB_UID", &uid) < 0 ||
	    env_u32("SLURM_JOB_GID", &gid) < 0 || job->user == NULL) {
		slurm_error("aegaeon: SLURM_JOB_ID, SLURM_JOB_UID, SLURM_JOB_GID or SLURM_JOB_USER missing in the prolog/epilog environment");
		return -1;
	}
	job->uid = uid;
	job->gid = gid;
	if (aeg_jobdir_path(job->dir, sizeof(job->dir), aeg_site.cfg.runtime_dir, job->id, job->node) < 0 ||
	    aeg_jobdir_name(job->name, sizeof(job->name), job->id, job->node) < 0) {
		slurm_error("aegaeon: job %u: no job directory: %s", job->id, aeg_error_detail());
		return -1;
	}
	return 0;
}

static int opt_env(const char *name, const char **value)
{
	*value = getenv(name);
	return *value != NULL;
}

/*
 * Re-check the options with this node's site configuration (the client's
 * checks ran on a machine the user controls). On a user mistake *reason
 * gets the message for task_init and the prolog still succeeds.
 */
static int read_options(struct aeg_spank_opts *o, char *reason, size_t len)
{
	const char *slab, *pinned, *prefetch, *device, *abs_prefetch;
	int any;

	memset(o, 0, sizeof(*o));
	any = opt_env(AEG_SPANK_OPTENV("slab"), &slab) | opt_env(AEG_SPANK_OPTENV("pinned"), &pinned) |
	      opt_env(AEG_SPANK_OPTENV("prefetch"), &prefetch) | opt_env(AEG_SPANK_OPTENV("device"), &device);
	if (!any)
		return 0;
	o->any = 1;
	abs_prefetch = getenv("SPANK_" AEG_SPANK_PREFETCH_VAR);
	if (slab != NULL) {
		if (aeg_jobopt_parse_slab(slab, &o->slab) < 0 || aeg_jobopt_check_slab(&o->slab, &aeg_site.cfg) < 0)
			goto bad;
		o->has_slab = 1;
	} else {
		o->slab = aeg_site.cfg.slab_default;
	}
	if (pinned != NULL) {
		if (aeg_jobopt_parse_pinned(pinned, &o->pinned) < 0 ||
		    aeg_jobopt_check_pinned(&o->pinned, &aeg_site.cfg) < 0)
			goto bad;
		o->has_pinned = 1;
	} else {
		o->pinned.bytes = aeg_site.cfg.pinned_default_bytes;
	}
	if (o->pinned.bytes != 0 && o->pinned.buffer_bytes == 0)
		o->pinned.buffer_bytes = aeg_site.cfg.pinned_buffer_bytes;
	/* Relative paths are only accepted as the client resolved them. */
	if (prefetch != NULL &&
	    (aeg_jobopt_parse_prefetch(abs_prefetch != NULL ? abs_prefetch : prefetch, NULL, &o->prefetch, NULL) < 0 ||
	     aeg_jobopt_check_prefetch_slab(1, o->has_slab, &aeg_site.cfg) < 0))
		goto bad;
	o->device = aeg_site.cfg.device;
	if (device != NULL) {
		if (aeg_jobopt_parse_device(device, &o->device) < 0 ||
		    aeg_jobopt_check_device(o->device, &aeg_site.cfg) < 0)
			goto bad;
		o->has_device = 1;
	}
	return 0;
bad:
	snprintf(reason, len, "%s", aeg_error_detail());
	return 0;
}

/*
 * The agent's GPU list: ordinals as its CUDA runtime numbers the job's
 * devices; how many, or -1 when they are more than a job may have.
 */
static int gpu_list(char *buf, size_t len)
{
	const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
	size_t o = 0;
	int n = 1;

	if (cvd == NULL || *cvd == '\0' || strcmp(cvd, "NoDevFiles") == 0) {
		snprintf(buf, len, "none");
		return 0;
	}
	for (const char *p = cvd; *p != '\0'; p++)
		if (*p == ',')
			n++;
	if (n > AEG_JOB_MAX_GPUS)
		return -1;
	for (int i = 0; i < n; i++) {
		int w = snprintf(buf + o, len - o, "%s%d", i ? "," : "", i);

		if (w < 0 || (size_t)w >= len - o)
			return -1;
		o += (size_t)w;
	}
	return n;
}

/* The error record, the user's: safe to write whether or not the directory is theirs already. */
static void write_error(const struct job *job, int dfd, const char *reason)
{
	if (aeg_jobdir_write_error(dfd, job->dir, reason, job->uid, job->gid) < 0)
		slurm_error("aegaeon: job %u: %s", job->id, aeg_error_detail());
}

struct agent_cmd {
	char *argv[24];
	char *envp[10];
	char slab[40], pinned[64], gpus[256], jobid[16];
	char env_path[64], env_home[PATH_MAX + 8], env_user[256], env_logname[256];
	char *env_cvd;                  /* as long as the job's CUDA_VISIBLE_DEVICES: free() it */
	char env_host_gpus[48];
};

/* The agent's command line and environment; -1 when out of memory. */
static int build_cmd(struct agent_cmd *c, const struct job *job, const struct aeg_spank_opts *o,
		     const struct passwd *pw, int ngpus)
{
	const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
	int a = 0, e = 0;

	snprintf(c->jobid, sizeof(c->jobid), "%u", job->id);
	aeg_jobopt_format_slab(&o->slab, c->slab, sizeof(c->slab));
	if (o->pinned.bytes != 0)
		snprintf(c->pinned, sizeof(c->pinned), "%llu:%llu", (unsigned long long)o->pinned.bytes,
			 (unsigned long long)o->pinned.buffer_bytes);
	else
		snprintf(c->pinned, sizeof(c->pinned), "0");
	c->argv[a++] = aeg_site.cfg.agent_path;
	c->argv[a++] = "--job";
	c->argv[a++] = c->jobid;
	c->argv[a++] = "--runtime-dir";
	c->argv[a++] = (char *)job->dir;
	c->argv[a++] = "--gpus";
	c->argv[a++] = c->gpus;
	c->argv[a++] = "--slab";
	c->argv[a++] = c->slab;
	c->argv[a++] = "--pinned";
	c->argv[a++] = c->pinned;
	if (o->prefetch != NULL) {
		c->argv[a++] = "--prefetch";
		c->argv[a++] = o->prefetch;
	}
	c->argv[a++] = "--device";
	c->argv[a++] = (char *)aeg_device_kind_name(o->device);
	if (aeg_site.config_path[0] != '\0') {
		c->argv[a++] = "--config";
		c->argv[a++] = aeg_site.config_path;
	}
	c->argv[a] = NULL;

	snprintf(c->env_path, sizeof(c->env_path), "PATH=/usr/local/bin:/usr/bin:/bin");
	snprintf(c->env_home, sizeof(c->env_home), "HOME=%s", pw->pw_dir);
	snprintf(c->env_user, sizeof(c->env_user), "USER=%s", pw->pw_name);
	snprintf(c->env_logname, sizeof(c->env_logname), "LOGNAME=%s", pw->pw_name);
	c->envp[e++] = c->env_path;
	c->envp[e++] = c->env_home;
	c->envp[e++] = c->env_user;
	c->envp[e++] = c->env_logname;
	/* Whole: a list cut short (MIG UUIDs run long) would show the agent other GPUs than --gpus names. */
	if (cvd != NULL) {
		if (asprintf(&c->env_cvd, "CUDA_VISIBLE_DEVICES=%s", cvd) < 0) {
			c->env_cvd = NULL;
			return -1;
		}
		c->envp[e++] = c->env_cvd;
	}
	/* The host backend shows as many GPUs as it is told: the job's; task_init tells the steps the same. */
	if (o->device == AEG_DEVICE_HOST && ngpus > 0) {
		snprintf(c->env_host_gpus, sizeof(c->env_host_gpus), "AEGAEON_HOST_GPUS=%d", ngpus);
		c->envp[e++] = c->env_host_gpus;
	}
	c->envp[e] = NULL;
	return 0;
}

/*
 * What went wrong in the fork's children, as they report it: a step and its
 * errno. The children of a fork from slurmstepd (which has threads) do only
 * what is safe there (no strerror, no formatting, no allocation: a lock held
 * by another thread at the fork would never be released in them), so the
 * prolog, once the middle process is gone, writes the error record.
 */
enum start_step {
	STEP_STARTED = 1,       /* not a failure: the agent's pid, forked */
	STEP_FDS, STEP_SETSID, STEP_DEVNULL, STEP_GROUP, STEP_CHOWN, STEP_USER, STEP_FORK, STEP_EXEC
};

struct start_report {
	int step;
	int err;
	pid_t pid;              /* STEP_STARTED */
};

static void report(int fd, int step, int err, pid_t pid)
{
	struct start_report r = { .step = step, .err = err, .pid = pid };

	(void)!write(fd, &r, sizeof(r));
}

static void __attribute__((noreturn)) report_exit(int fd, int step, int err, int status)
{
	report(fd, step, err, 0);
	_exit(status);
}

/*
 * The middle process of the double fork: leaves slurmd's session (a daemon
 * still in the prolog's process group is lost when the prolog returns),
 * hands the job directory to the user, becomes the user for good, starts the
 * agent and exits once the agent has exec'd. The agent's pid, and what
 * fails, are reported on @report: the prolog records the one and writes the
 * other as the error record.
 */
static void __attribute__((noreturn))
middle(const struct job *job, int dfd, const struct agent_cmd *cmd, const gid_t *groups, int ngroups,
       int notify[2], int rep)
{
	struct pollfd pfd;
	pid_t pid;
	int fd;

	if (dfd <= 2 || notify[0] <= 2 || notify[1] <= 2 || rep <= 2)
		report_exit(rep, STEP_FDS, 0, 1);
	if (setsid() < 0)
		report_exit(rep, STEP_SETSID, errno, 1);
	fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0 || dup2(fd, 0) < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
		report_exit(rep, STEP_DEVNULL, errno, 1);
	/* No descriptor of slurmd may reach the agent (the pipes must close at exec too). */
	if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
		for (int i = 3; i < 65536; i++)
			(void)fcntl(i, F_SETFD, FD_CLOEXEC);
	if (setgroups((size_t)ngroups, groups) < 0 || setresgid(job->gid, job->gid, job->gid) < 0)
		report_exit(rep, STEP_GROUP, errno, 1);
	if (fchown(dfd, job->uid, job->gid) < 0)
		report_exit(rep, STEP_CHOWN, errno, 1);
	close(dfd);
	if (setresuid(job->uid, job->uid, job->uid) < 0)
		report_exit(rep, STEP_USER, errno, 1);
	if (job->uid != 0 && setuid(0) == 0)
		report_exit(rep, STEP_USER, EPERM, 1);

	pid = fork();
	if (pid < 0)
		report_exit(rep, STEP_FORK, errno, 1);
	if (pid == 0) {
		if (chdir(job->dir) < 0 || execve(cmd->argv[0], cmd->argv, cmd->envp) < 0)
			report_exit(rep, STEP_EXEC, errno, 127);
		_exit(127);
	}
	report(rep, STEP_STARTED, 0, pid);
	/* EOF once the agent has exec'd (the pipe is close-on-exec) or died. */
	close(notify[1]);
	pfd.fd = notify[0];
	pfd.events = POLLIN;
	(void)poll(&pfd, 1, 5000);
	_exit(0);
}

/*
 * What the fork's children reported on @rep (non-blocking, every writer
 * gone): the agent's pid into *@agent (0: none), and the error record for
 * a failure; 1 when there was one.
 */
static int read_reports(const struct job *job, int dfd, const struct agent_cmd *cmd, int rep, pid_t *agent)
{
	char reason[AEG_JOB_ERROR_MAX];
	struct start_report r, failed = { 0 };
	const char *e;

	*agent = 0;
	while (read(rep, &r, sizeof(r)) == (ssize_t)sizeof(r)) {
		if (r.step == STEP_STARTED)
			*agent = r.pid;
		else if (failed.step == 0)
			failed = r;
	}
	if (failed.step == 0)
		return 0;
	r = failed;
	e = strerror(r.err);
	switch (r.step) {
	case STEP_FDS:
		snprintf(reason, sizeof(reason), "the agent could not start: descriptors overlap stdio");
		break;
	case STEP_SETSID:
		snprintf(reason, sizeof(reason), "the agent could not start: setsid: %s", e);
		break;
	case STEP_DEVNULL:
		snprintf(reason, sizeof(reason), "the agent could not start: /dev/null: %s", e);
		break;
	case STEP_GROUP:
		snprintf(reason, sizeof(reason), "the agent could not start: switching to group %u: %s",
			 (unsigned)job->gid, e);
		break;
	case STEP_CHOWN:
		snprintf(reason, sizeof(reason), "the agent could not start: chown %s: %s", job->dir, e);
		break;
	case STEP_USER:
		snprintf(reason, sizeof(reason), "the agent could not start: switching to user %s: %s", job->user, e);
		break;
	case STEP_FORK:
		snprintf(reason, sizeof(reason), "the agent could not start: fork: %s", e);
		break;
	case STEP_EXEC:
		snprintf(reason, sizeof(reason), "the agent %s could not start: %s", cmd->argv[0], e);
		break;
	default:
		snprintf(reason, sizeof(reason), "the agent could not start (step %d: %s)", r.step, e);
		break;
	}
	write_error(job, dfd, reason);
	/* Until the middle process chowned it the directory was root's: the user must read it. */
	if (fchown(dfd, job->uid, job->gid) < 0)
		slurm_error("aegaeon: job %u: chown %s: %m", job->id, job->dir);
	return 1;
}

/*
 * Record the agent the middle process started, held first so that the
 * record names it and nothing else: the epilog stops what the record
 * names, whatever the user does to the job directory.
 */
static void record_agent(const struct job *job, int rfd, pid_t pid)
{
	struct aeg_spank_agent_key key = { .uid = job->uid, .dir = job->dir, .name = job->name };
	struct aeg_spank_proc agent;

	if (pid <= 0 || aeg_spank_agent_hold(&agent, pid, &key) < 0) {
		/* Gone already: it wrote its own error record, and there is nothing to stop. */
		slurm_info("aegaeon: job %u on %s: the agent (pid %d) ended as it started", job->id, job->node,
			   (int)pid);
		return;
	}
	if (aeg_spank_agent_record(rfd, job->name, &agent) < 0)
		slurm_error("aegaeon: job %u on %s: recording agent %d in %s: %m; the epilog will look for it "
			    "by its command line", job->id, job->node, (int)pid, aeg_site.cfg.runtime_dir);
	aeg_spank_procs_release(&agent, 1);
}

static int start_agent(const struct job *job, int rfd, int dfd, const struct aeg_spank_opts *o)
{
	struct passwd pwbuf, *pw = NULL;
	gid_t groups[MAX_GROUPS];
	int ngroups = MAX_GROUPS, notify[2], report[2], status, ngpus;
	struct agent_cmd *cmd;
	char pwstore[4096], reason[AEG_JOB_ERROR_MAX];
	pid_t pid, agent;
	int rc = -1, reported;

	/* Name service lookups happen here, not in the forked child. */
	if (getpwuid_r(job->uid, &pwbuf, pwstore, sizeof(pwstore), &pw) != 0 || pw == NULL) {
		slurm_error("aegaeon: job %u: user %u not found", job->id, (unsigned)job->uid);
		return -1;
	}
	if (getgrouplist(pw->pw_name, job->gid, groups, &ngroups) < 0) {
		slurm_error("aegaeon: job %u: user %s is in more than %d groups", job->id, pw->pw_name, MAX_GROUPS);
		return -1;
	}
	cmd = calloc(1, sizeof(*cmd));
	if (cmd == NULL)
		return -1;
	ngpus = gpu_list(cmd->gpus, sizeof(cmd->gpus));
	if (ngpus < 0) {
		snprintf(reason, sizeof(reason), "the job has more than %d GPUs on node %s "
			 "(CUDA_VISIBLE_DEVICES); aegaeon serves at most %d a node", AEG_JOB_MAX_GPUS, job->node,
			 AEG_JOB_MAX_GPUS);
		slurm_error("aegaeon: job %u: %s", job->id, reason);
		write_error(job, dfd, reason);
		if (fchown(dfd, job->uid, job->gid) < 0)
			slurm_error("aegaeon: job %u: chown %s: %m", job->id, job->dir);
		goto out;
	}
	if (build_cmd(cmd, job, o, pw, ngpus) < 0) {
		slurm_error("aegaeon: job %u: out of memory for the agent's command", job->id);
		goto out;
	}
	if (pipe2(notify, O_CLOEXEC) < 0) {
		slurm_error("aegaeon: job %u: pipe: %m", job->id);
		goto out;
	}
	if (pipe2(report, O_CLOEXEC | O_NONBLOCK) < 0) {
		slurm_error("aegaeon: job %u: pipe: %m", job->id);
		close(notify[0]);
		close(notify[1]);
		goto out;
	}
	pid = fork();
	if (pid < 0) {
		slurm_error("aegaeon: job %u: fork: %m", job->id);
		close(notify[0]);
		close(notify[1]);
		close(report[0]);
		close(report[1]);
		goto out;
	}
	if (pid == 0)
		middle(job, dfd, cmd, groups, ngroups, notify, report[1]);
	close(notify[0]);
	close(notify[1]);
	close(report[1]);
	/* Without this wait the agent was lost in 1 of 3 runs (SLURM-LAB.md). */
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	/* The agent's own exec failing is reported while the middle process still waits for it. */
	reported = read_reports(job, dfd, cmd, report[0], &agent);
	close(report[0]);
	if (reported || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		slurm_error("aegaeon: job %u on %s: the agent could not be started (see %s/error)",
			    job->id, job->node, job->dir);
		goto out;
	}
	slurm_info("aegaeon: job %u on %s: agent %d started as %s: --gpus %s --slab %s --pinned %s%s%s",
		   job->id, job->node, (int)agent, pw->pw_name, cmd->gpus, cmd->slab, cmd->pinned,
		   o->prefetch ? " --prefetch " : "", o->prefetch ? o->prefetch : "");
	record_agent(job, rfd, agent);
	rc = 0;
out:
	free(cmd->env_cvd);
	free(cmd);
	return rc;
}

/*
 * slurmstepd runs the prolog with stdin closed: without this, the runtime
 * dir would be opened as fd 0 and the agent's child would dup2 /dev/null
 * over it (and chown /dev/null instead of the job directory).
 */
static void hold_stdio(void)
{
	int fd;

	do {
		fd = open("/dev/null", O_RDWR);
	} while (fd >= 0 && fd <= 2);
	if (fd >= 0)
		close(fd);
}

static int stop_agents(const struct job *job, int rfd);

/*
 * Any failure here is logged and the prolog still succeeds: a failing prolog
 * drains the node and holds the job, which is out of all proportion to a
 * user's typo. task_init reports what went wrong to the user.
 */
int aeg_spank_prolog(spank_t sp)
{
	struct aeg_spank_opts o;
	char reason[AEG_JOB_ERROR_MAX] = "", gpus[256];
	unsigned long removed = 0;
	struct job job;
	int rfd = -1, dfd = -1, ngpus, stopped;

	if (!getenv(AEG_SPANK_OPTENV("slab")) && !getenv(AEG_SPANK_OPTENV("pinned")) &&
	    !getenv(AEG_SPANK_OPTENV("prefetch")) && !getenv(AEG_SPANK_OPTENV("device")))
		return 0;
	if (!aeg_site.ok) {
		slurm_error("aegaeon: job with aegaeon options, but %s; no agent started", aeg_site.error);
		return 0;
	}
	hold_stdio();
	if (job_from_env(&job) < 0)
		return 0;
	read_options(&o, reason, sizeof(reason));
	ngpus = gpu_list(gpus, sizeof(gpus));
	if (reason[0] == '\0' && o.has_slab && ngpus == 0)
		snprintf(reason, sizeof(reason),
			 "--aegaeon-slab reserves memory on the job's GPUs, but the job has none on node %s "
			 "(ask for GPUs with --gres=gpu:N or --gpus=N)", job.node);

	rfd = aeg_spank_runtime_dir(1);
	if (rfd < 0)
		goto out;
	/*
	 * An earlier run of this job id whose epilog never ran (a requeue after
	 * slurmd died) may have left its agent holding the GPUs.
	 */
	stopped = stop_agents(&job, rfd);
	if (stopped > 0)
		slurm_info("aegaeon: job %u on %s: stopped %d agent(s) left by an earlier run of this job",
			   job.id, job.node, stopped);
	if (aeg_jobdir_remove(rfd, job.name, REMOVE_TIMEOUT_MS, &removed) < 0)
		slurm_error("aegaeon: job %u: the stale %s: %s", job.id, job.dir, aeg_error_detail());
	else if (removed > 0)
		slurm_info("aegaeon: job %u: removed a stale %s (%lu entries)", job.id, job.dir, removed);
	if (mkdirat(rfd, job.name, 0700) < 0) {
		slurm_error("aegaeon: job %u: creating %s: %m", job.id, job.dir);
		goto out;
	}
	dfd = openat(rfd, job.name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (dfd < 0) {
		slurm_error("aegaeon: job %u: opening %s: %m", job.id, job.dir);
		goto out;
	}
	if (reason[0] != '\0') {
		slurm_info("aegaeon: job %u on %s: not starting the agent: %s", job.id, job.node, reason);
		write_error(&job, dfd, reason);
		if (fchown(dfd, job.uid, job.gid) < 0)
			slurm_error("aegaeon: job %u: chown %s: %m", job.id, job.dir);
		goto out;
	}
	start_agent(&job, rfd, dfd, &o);
out:
	if (dfd >= 0)
		close(dfd);
	if (rfd >= 0)
		close(rfd);
	free(o.prefetch);
	return 0;
}

/*
 * Stop the agents of @key and everything they started. What lies below an
 * agent goes first (the agent starts no process of its own: a debugger may
 * have made it start some), then the agent gets SIGTERM, and SIGKILL after
 * @stop_ms. Every signal goes through the pidfd held since the agent was
 * identified, never to a pid that another process may have taken since.
 * How many agents there were, or -1 when one survived, or when more
 * processes claimed to be the agent than could be held and none was the
 * recorded one (the real agent may be among those left).
 */
static int stop_found(const struct job *job, const struct aeg_spank_agent_key *key, long stop_ms)
{
	struct aeg_spank_proc agents[MAX_AGENTS];
	unsigned killed, found;
	int n, left;

	n = aeg_spank_agents_find(agents, MAX_AGENTS, key, &found);
	if (found & AEG_SPANK_FOUND_MORE)
		slurm_error("aegaeon: job %u on %s: more than %d processes of uid %u claim to be its agent "
			    "(--runtime-dir .../%s); stopping %d%s", job->id, job->node, MAX_AGENTS,
			    (unsigned)job->uid, job->name, n,
			    found & AEG_SPANK_FOUND_RECORDED ? ", the recorded agent first" :
			    " without a record of the agent: it may be among those left");
	if (n == 0)
		return 0;
	for (int i = 0; i < n; i++) {
		if (aeg_spank_kill_tree(&agents[i], TREE_TIMEOUT_MS, &killed) < 0)
			slurm_error("aegaeon: job %u on %s: processes below agent %d still there after %d ms (%u killed): %m",
				    job->id, job->node, (int)agents[i].pid, TREE_TIMEOUT_MS, killed);
		else if (killed > 0)
			slurm_info("aegaeon: job %u on %s: killed %u process(es) agent %d had started",
				   job->id, job->node, killed, (int)agents[i].pid);
		aeg_spank_proc_signal(&agents[i], SIGTERM);
	}
	left = aeg_spank_procs_wait(agents, n, stop_ms);
	if (left == 0) {
		slurm_info("aegaeon: job %u on %s: agent %d gone after SIGTERM%s", job->id, job->node,
			   (int)agents[0].pid, n > 1 ? " (with the other processes that claimed to be it)" : "");
		goto out;
	}
	for (int i = 0; i < n; i++) {
		if (aeg_spank_proc_gone(&agents[i]))
			continue;
		slurm_error("aegaeon: job %u on %s: agent %d still running %ld ms after SIGTERM; sending SIGKILL",
			    job->id, job->node, (int)agents[i].pid, stop_ms);
		aeg_spank_proc_signal(&agents[i], SIGKILL);
	}
	left = aeg_spank_procs_wait(agents, n, 5000);
	if (left > 0)
		slurm_error("aegaeon: job %u on %s: %d agent process(es) survived SIGKILL", job->id, job->node, left);
out:
	aeg_spank_procs_release(agents, n);
	if (left > 0 || ((found & AEG_SPANK_FOUND_MORE) && !(found & AEG_SPANK_FOUND_RECORDED)))
		return -1;
	return n;
}

/* The job's agents, the one the prolog recorded in runtime_dir (@rfd) first; the record goes with them. */
static int stop_agents(const struct job *job, int rfd)
{
	struct aeg_spank_agent_key key = { .uid = job->uid, .dir = job->dir, .name = job->name };
	int n;

	if (aeg_spank_agent_recorded(rfd, job->name, &key) < 0)
		slurm_error("aegaeon: job %u on %s: the record of its agent in %s cannot be read: %m; looking for "
			    "the agent by its command line", job->id, job->node, aeg_site.cfg.runtime_dir);
	n = stop_found(job, &key, aeg_site.cfg.agent_stop_timeout_ms);
	if (n >= 0 && aeg_spank_agent_record_remove(rfd, job->name) < 0)
		slurm_error("aegaeon: job %u on %s: removing the record of its agent: %m", job->id, job->node);
	return n;
}

/*
 * The epilog without a usable site configuration (edited, or from another
 * version, since the job started): runtime_dir is not known, so neither are
 * the record nor the job directory. The job's agents are still stopped,
 * found by their command line ("--runtime-dir .../<jobid>.<node>"), with the
 * built-in stop timeout; what is left is said, for the administrator.
 */
static int epilog_without_site(void)
{
	struct aeg_spank_agent_key key = { 0 };
	struct aeg_config defaults;
	struct job job;
	int n;

	aeg_config_defaults(&defaults);
	if (job_from_env(&job) < 0)
		return 0;
	key.uid = job.uid;
	key.name = job.name;
	n = stop_found(&job, &key, defaults.agent_stop_timeout_ms);
	if (n > 0)
		slurm_error("aegaeon: job %u on %s: %s; stopped the job's %d agent(s) found by their command "
			    "line, but its directory under runtime_dir (.../%s) and the agent's record there are "
			    "left until the configuration is fixed", job.id, job.node, aeg_site.error, n, job.name);
	return n < 0 ? -1 : 0;
}

/*
 * Runs for every job (options are not needed to clean up): whatever exists
 * under this job's directory name is this job's, whether or not the agent
 * ever became ready. Fails only when an agent cannot be stopped, so the node
 * is drained rather than handed to the next job with its GPU memory taken.
 */
int aeg_spank_epilog(spank_t sp)
{
	unsigned long removed = 0;
	struct stat st;
	struct job job;
	int rfd, rc = 0;

	if (!aeg_site.ok)
		return epilog_without_site();
	if (job_from_env(&job) < 0)
		return 0;
	/* Jobs without aegaeon have no job directory (the prolog makes it before it starts an agent). */
	if (lstat(job.dir, &st) < 0)
		return 0;
	rfd = aeg_spank_runtime_dir(0);
	if (rfd < 0)
		return 0;
	if (stop_agents(&job, rfd) < 0)
		rc = -1;
	if (aeg_jobdir_remove(rfd, job.name, REMOVE_TIMEOUT_MS, &removed) < 0)
		slurm_error("aegaeon: job %u on %s: %s", job.id, job.node, aeg_error_detail());
	else if (removed > 0)
		slurm_info("aegaeon: job %u on %s: removed %s (%lu entries)", job.id, job.node, job.dir, removed);
	close(rfd);
	return rc;
}

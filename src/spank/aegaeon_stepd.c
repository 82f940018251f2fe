/* task_init (slurmstepd, as the job user): wait for the job's agent and export its reservations to the task. */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <aegaeon/device.h>
#include <aegaeon/error.h>
#include <aegaeon/jobrec.h>

#include "aegaeon_spank.h"
#include "internal.h"
#include "jobdir.h"

static int fail_step(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* slurm_error in task_init reaches the step's stderr; -1 ends the step with rc 1. */
static int fail_step(const char *fmt, ...)
{
	char msg[AEG_JOB_ERROR_MAX + 256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	slurm_error("aegaeon: %s", msg);
	return -1;
}

static int set(spank_t sp, const char *name, const char *value)
{
	spank_err_t err = spank_setenv(sp, name, value, 1);

	if (err != ESPANK_SUCCESS)
		return fail_step("setting %s for the task: %s", name, spank_strerror(err));
	return 0;
}

static int set_u64(spank_t sp, const char *name, uint64_t v)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
	return set(sp, name, buf);
}

static int export_record(spank_t sp, const struct aeg_job_record *rec, const char *dir)
{
	char name[64], buf[AEG_HANDLE_HEX_LEN + 1], gpus[AEG_JOB_MAX_GPUS * 6 + 8];
	int rc;

	if (aeg_job_gpus_format(rec->gpus, rec->gpu_count, gpus, sizeof(gpus)) < 0)
		return fail_step("the agent's GPU list is too long");
	rc = set(sp, "AEGAEON_SOCKET", rec->socket);
	rc = rc ?: set(sp, "AEGAEON_JOB_DIR", dir);
	rc = rc ?: set(sp, "AEGAEON_GPUS", gpus);
	rc = rc ?: set(sp, "AEGAEON_DEVICE", aeg_device_kind_name(rec->device));
	rc = rc ?: set_u64(sp, "AEGAEON_SLABS", (uint64_t)rec->gpu_count);
	for (int i = 0; rc == 0 && i < rec->gpu_count; i++) {
		aeg_handle_to_hex(&rec->slabs[i].handle, buf);
		snprintf(name, sizeof(name), "AEGAEON_SLAB%d_HANDLE", i);
		rc = set(sp, name, buf);
		snprintf(name, sizeof(name), "AEGAEON_SLAB%d_BYTES", i);
		rc = rc ?: set_u64(sp, name, rec->slabs[i].bytes);
		snprintf(name, sizeof(name), "AEGAEON_SLAB%d_GPU", i);
		rc = rc ?: set_u64(sp, name, (uint64_t)rec->slabs[i].gpu);
	}
	/* A step's host backend must show the GPUs the agent's did. */
	if (rc == 0 && rec->device == AEG_DEVICE_HOST && rec->gpu_count > 0)
		rc = set_u64(sp, "AEGAEON_HOST_GPUS", (uint64_t)rec->gpu_count);
	rc = rc ?: set_u64(sp, "AEGAEON_PINNED_BYTES", rec->pinned_bytes);
	rc = rc ?: set_u64(sp, "AEGAEON_PINNED_BUFFER", rec->pinned_buffer);
	return rc;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/*
 * A watch on the job directory, where the agent renames its ready or error
 * record into place: the step goes on as soon as the agent is ready, not up
 * to a polling period (5-50 ms) later. -1 where inotify cannot be had (its
 * limits): the wait then polls.
 */
static int watch_dir(const char *dir)
{
	int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);

	if (fd < 0)
		return -1;
	if (inotify_add_watch(fd, dir, IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Until something changes in the watched directory or @ms pass; without a watch (@fd -1), @ms. */
static void wait_dir(int fd, long ms)
{
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	struct pollfd p = { .fd = fd, .events = POLLIN };

	if (fd < 0) {
		sleep_ms(ms);
		return;
	}
	if (poll(&p, 1, (int)ms) > 0)
		while (read(fd, buf, sizeof(buf)) > 0)   /* drained: the records are what is read next */
			;
}

/*
 * The agent's ready record into @rec, or -1 (the step fails, told why) on
 * its error record or at agent_start_timeout. Each look is woken by @watch;
 * the 100 ms bound is a safety net, the polling without a watch backs off
 * from 5 to 50 ms.
 */
static int wait_ready(int watch, const char *dir, const char *ready, const char *error, const char *node,
		      struct aeg_job_record *rec)
{
	uint64_t deadline = aeg_now_ns() + (uint64_t)aeg_site.cfg.agent_start_timeout_ms * 1000000ull;
	char reason[AEG_JOB_ERROR_MAX];
	long delay = watch >= 0 ? 100 : 5;
	int rc;

	for (;;) {
		rc = aeg_job_error_read(error, reason, sizeof(reason));
		if (rc == 0)
			return fail_step("%s", reason);
		if (rc != AEG_ENOENT)
			return fail_step("reading %s: %s", error, aeg_error_detail());
		rc = aeg_job_record_read(ready, rec);
		if (rc == 0)
			return 0;
		if (rc != AEG_ENOENT)
			return fail_step("reading %s: %s", ready, aeg_error_detail());
		if (aeg_now_ns() >= deadline)
			return fail_step("the job's agent on node %s was not ready after %.1f s (agent_start_timeout); "
					 "its directory is %s", node, aeg_site.cfg.agent_start_timeout_ms / 1000.0, dir);
		wait_dir(watch, delay);
		if (watch < 0 && delay < 50)
			delay *= 2;
	}
}

int aeg_spank_task_init(spank_t sp)
{
	char node[256], dir[PATH_MAX], ready[PATH_MAX + 16], error[PATH_MAX + 16];
	struct aeg_job_record rec;
	uint32_t jobid;
	struct stat st;
	uint64_t t0;
	int rc, watch;

	/* Jobs that do not use aegaeon have no job directory; a broken site only matters to those that do. */
	if (!aeg_site.ok)
		return aeg_opts.any ? fail_step("%s", aeg_site.error) : 0;
	if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS)
		return aeg_opts.any ? fail_step("cannot tell the job id") : 0;
	if (spank_getenv(sp, "SLURMD_NODENAME", node, sizeof(node)) != ESPANK_SUCCESS &&
	    gethostname(node, sizeof(node)) < 0)
		return aeg_opts.any ? fail_step("cannot tell the node name") : 0;
	if (aeg_jobdir_path(dir, sizeof(dir), aeg_site.cfg.runtime_dir, jobid, node) < 0)
		return aeg_opts.any ? fail_step("no job directory on node %s: %s", node, aeg_error_detail()) : 0;
	if (stat(dir, &st) < 0) {
		if (!aeg_opts.any)
			return 0;
		return fail_step("no agent runs for job %u on node %s: either the node's prolog could not "
				 "start one (its slurmd log says why), or the options were given to a step "
				 "inside an allocation made without them (--aegaeon-* options take effect when "
				 "srun, sbatch or salloc creates the job)", jobid, node);
	}
	snprintf(ready, sizeof(ready), "%s/" AEG_JOB_READY_FILE, dir);
	snprintf(error, sizeof(error), "%s/" AEG_JOB_ERROR_FILE, dir);

	t0 = aeg_now_ns();
	watch = watch_dir(dir);
	rc = wait_ready(watch, dir, ready, error, node, &rec);
	if (watch >= 0)
		close(watch);
	if (rc < 0)
		return -1;
	slurm_debug("aegaeon: job %u: the agent (pid %ld) was ready after %.1f ms in task_init", jobid, rec.pid,
		    (double)(aeg_now_ns() - t0) / 1e6);
	if (rec.pid <= 0 || (kill((pid_t)rec.pid, 0) < 0 && errno == ESRCH))
		return fail_step("the job's agent (pid %ld) on node %s is gone; the job's slabs, pool and "
				 "prefetched files went with it. Start a new job", rec.pid, node);
	return export_record(sp, &rec, dir);
}

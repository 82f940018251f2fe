/* The per-job agent: start-up (slabs, pool, engines, socket, records), the serve loop and shutdown. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/prefetch.h>

#include "agent_internal.h"
#include "device_internal.h"
#include "internal.h"
#include "model_paths.h"
#include "pinned_internal.h"
#include "proto.h"
#include "prefetch_internal.h"
#include "topo_internal.h"

#define GONE_CHECK_MS 50                /* how often exited clients are looked for */

/* ------------------------------------------------------------- start-up */

/* JOBDIR must be a real directory of ours that nobody else can enter. */
static int check_runtime_dir(const char *dir)
{
	struct stat st;

	if (dir[0] != '/')
		return aeg_fail(AEG_EINVAL, "runtime directory '%s' is not an absolute path", dir);
	if (lstat(dir, &st) < 0)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "runtime directory %s: %s",
				dir, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return aeg_fail(AEG_EINVAL, "runtime directory %s is not a directory", dir);
	if (st.st_uid != geteuid() || (st.st_mode & 077))
		return aeg_fail(AEG_EPERM, "runtime directory %s is owned by uid %u with mode %04o; it must be "
				"a 0700 directory of uid %u (the job user)", dir, (unsigned)st.st_uid,
				(unsigned)(st.st_mode & 07777), (unsigned)geteuid());
	return 0;
}

int aeg_agent_write_error(const char *runtime_dir, const char *reason)
{
	char path[PATH_MAX];
	int err;

	aeg_error("start-up failed: %s", reason);
	/* A directory the agent would not run in is not one to write into either. */
	err = check_runtime_dir(runtime_dir);
	if (err)
		return err;
	if (snprintf(path, sizeof(path), "%s/%s", runtime_dir, AEG_JOB_ERROR_FILE) >= (int)sizeof(path))
		return aeg_fail(AEG_EINVAL, "runtime directory path too long");
	return aeg_job_error_write(path, reason);
}

static int write_pid(const char *path)
{
	char buf[32];
	int fd, n, err = 0;

	unlink(path);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return aeg_fail(AEG_EIO, "creating %s: %s", path, strerror(errno));
	n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
	if (write(fd, buf, (size_t)n) != n)
		err = aeg_fail(AEG_EIO, "writing %s: %s", path, strerror(errno));
	close(fd);
	return err;
}

static int reserve_slabs(struct agent *a)
{
	const struct aeg_agent_config *cfg = a->cfg;

	/* "--slab 0": a site whose slab_default is 0, and a job that asked for none; its pool is still near GPU 0. */
	if (cfg->gpu_count > 0 && (cfg->slab.is_percent ? cfg->slab.ppm == 0 : cfg->slab.bytes == 0)) {
		aeg_info("no slab reserved (--slab 0) on the job's %d GPU%s", cfg->gpu_count,
			 cfg->gpu_count == 1 ? "" : "s");
		return 0;
	}
	for (int i = 0; i < cfg->gpu_count; i++) {
		struct agent_slab *s = &a->slabs[i];
		struct aeg_gpu_info info;
		char want[32], have[32], total[32];
		uint64_t bytes;
		int gpu = cfg->gpus[i], err;

		err = aeg_device_gpu_info(a->dev, gpu, &info);
		if (err) {
			aeg_error_prefix("GPU %d", gpu);
			return err;
		}
		err = aeg_size_spec_resolve(&cfg->slab, info.total_bytes, &bytes);
		if (err) {
			aeg_error_prefix("GPU %d: slab size", gpu);
			return err;
		}
		if (bytes == 0)
			return aeg_fail(AEG_EINVAL, "GPU %d: slab of 0 bytes asked", gpu);
		if (cfg->slab_max.bytes != 0 || cfg->slab_max.ppm != 0) {
			uint64_t cap;

			err = aeg_size_spec_resolve(&cfg->slab_max, info.total_bytes, &cap);
			if (err) {
				aeg_error_prefix("GPU %d: site slab_max", gpu);
				return err;
			}
			if (bytes > cap && cfg->slab_max.is_percent)
				return aeg_fail(AEG_ERANGE, "GPU %d: slab of %s asked is over this site's limit of %s "
						"(slab_max = %g%% of the GPU's %s)", gpu,
						aeg_size_format(bytes, want, sizeof(want)),
						aeg_size_format(cap, have, sizeof(have)), cfg->slab_max.ppm / 1e4,
						aeg_size_format(info.total_bytes, total, sizeof(total)));
			if (bytes > cap)
				return aeg_fail(AEG_ERANGE, "GPU %d: slab of %s asked is over this site's limit of %s "
						"per GPU (slab_max)", gpu, aeg_size_format(bytes, want, sizeof(want)),
						aeg_size_format(cap, have, sizeof(have)));
		}
		if (bytes > info.free_bytes)
			return aeg_fail(AEG_ENOSPC, "GPU %d: slab of %s asked, %s free", gpu,
					aeg_size_format(bytes, want, sizeof(want)),
					aeg_size_format(info.free_bytes, have, sizeof(have)));
		err = aeg_slab_create(a->dev, gpu, bytes, &s->slab);
		if (err) {
			aeg_error_prefix("GPU %d", gpu);
			return err;
		}
		a->nslabs++;
		s->gpu = gpu;
		snprintf(s->pci_bus_id, sizeof(s->pci_bus_id), "%s", info.pci_bus_id);
		err = aeg_slab_export(s->slab, &s->handle);
		if (err) {
			aeg_error_prefix("GPU %d: exporting the slab", gpu);
			return err;
		}
		aeg_info("GPU %d (%s): slab of %s", gpu, info.pci_bus_id[0] ? info.pci_bus_id : info.name,
			 aeg_size_format(aeg_slab_bytes(s->slab), want, sizeof(want)));
	}
	return 0;
}

/* Each engine's share of the host model cache in the job's pool (the model_cache setting). */
static int cache_share(struct agent *a, uint64_t *bytes)
{
	char size[32];
	int err;

	*bytes = 0;
	if (a->pool_state == POOL_NONE || a->nslabs == 0)
		return 0;
	err = aeg_size_spec_resolve(&a->cfg->model_cache, a->pool_bytes, bytes);
	if (err)
		return err;
	if (*bytes > a->pool_bytes)
		*bytes = a->pool_bytes;
	/* The engines of the job's GPUs share the one pool. */
	*bytes /= (uint64_t)a->nslabs;
	if (*bytes > 0)
		aeg_info("host model cache: %s per GPU in the pinned pool", aeg_size_format(*bytes, size, sizeof(size)));
	return 0;
}

/*
 * The engines stage through the job's pool once it is made, or without one
 * through a staging ring each, made on a thread of its own once the engine's
 * first load has started (agent_ring_start): made here, 24 x 16 MiB took
 * 103-121 ms of a 334-363 ms start on the H200, and a job that loads nothing
 * through its agent needs none. Until the job's pool is there they map
 * files; a load waits for its ring instead (aeg_prefetch_ring_coming).
 */
static int start_engines(struct agent *a)
{
	struct aeg_prefetch_config pcfg;

	aeg_prefetch_config_defaults(&pcfg);
	if (a->cfg->prefetch_threads > 0)
		pcfg.threads = a->cfg->prefetch_threads;
	if (a->pool_state != POOL_NONE) {
		pcfg.pool_later_buffer_bytes = a->pool_buffer_bytes;
	} else {
		pcfg.pool_later_buffer_bytes = AEG_PREFETCH_RING_BUFFER_BYTES;
		pcfg.ring_buffers = aeg_prefetch_ring_buffers(&pcfg);
		a->ring_bytes = AEG_PREFETCH_RING_BUFFER_BYTES * (uint64_t)pcfg.ring_buffers;
	}
	for (int i = 0; i < a->nslabs; i++) {
		int err = aeg_prefetch_create(a->slabs[i].slab, NULL, &pcfg, &a->slabs[i].pf);
		if (err) {
			aeg_error_prefix("GPU %d: prefetch engine", a->slabs[i].gpu);
			return err;
		}
		if (a->ring_bytes != 0)
			aeg_prefetch_ring_coming(a->slabs[i].pf);
	}
	return 0;
}

static int listen_socket(struct agent *a)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	mode_t old;
	int fd, err;

	if (lstat(a->sock_path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return aeg_fail(AEG_EEXIST, "%s exists and is not a socket", a->sock_path);
		unlink(a->sock_path);   /* left by an agent that died */
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return aeg_fail(AEG_EIO, "socket: %s", strerror(errno));
	memcpy(sa.sun_path, a->sock_path, strlen(a->sock_path) + 1);
	old = umask(077);
	err = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (err < 0) {
		err = aeg_fail(AEG_EIO, "bind %s: %s", a->sock_path, strerror(errno));
		goto fail;
	}
	if (chmod(a->sock_path, 0600) < 0 || listen(fd, 128) < 0) {
		err = aeg_fail(AEG_EIO, "listen on %s: %s", a->sock_path, strerror(errno));
		unlink(a->sock_path);
		goto fail;
	}
	a->listen_fd = fd;
	return 0;
fail:
	close(fd);
	return err;
}

/*
 * A socket that still accepts belongs to a live agent of this directory:
 * starting over it would take its socket and records from under it.
 */
static int check_no_agent(struct agent *a)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, live;

	if (lstat(a->sock_path, &st) < 0 || !S_ISSOCK(st.st_mode))
		return 0;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return aeg_fail(AEG_EIO, "socket: %s", strerror(errno));
	memcpy(sa.sun_path, a->sock_path, strlen(a->sock_path) + 1);
	live = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 || errno == EAGAIN;
	close(fd);
	if (live)
		return aeg_fail(AEG_EEXIST, "another agent serves %s; not starting a second one for job %s",
				a->sock_path, a->cfg->job_id);
	return 0;
}

static int write_ready(struct agent *a)
{
	struct aeg_job_record rec;
	int err;

	memset(&rec, 0, sizeof(rec));
	rec.version = AEG_JOB_RECORD_VERSION;
	rec.pid = (long)getpid();
	snprintf(rec.socket, sizeof(rec.socket), "%s", a->sock_path);
	rec.device = a->cfg->device;
	rec.gpu_count = a->nslabs;
	for (int i = 0; i < a->nslabs; i++) {
		rec.gpus[i] = a->slabs[i].gpu;
		rec.slabs[i].gpu = a->slabs[i].gpu;
		rec.slabs[i].bytes = aeg_slab_bytes(a->slabs[i].slab);
		rec.slabs[i].handle = a->slabs[i].handle;
	}
	if (a->pool_state != POOL_NONE) {
		rec.pinned_bytes = a->pool_bytes;
		rec.pinned_buffer = a->pool_buffer_bytes;
	}
	err = aeg_job_record_write(a->ready_path, &rec);
	if (err == 0)
		aeg_debug("job %s: ready record %s written", a->cfg->job_id, a->ready_path);
	return err;
}

static void serve(struct agent *a, int stop_fd)
{
	for (;;) {
		struct pollfd p[3] = {
			{ .fd = a->listen_fd, .events = POLLIN },
			{ .fd = a->wake_fd, .events = POLLIN },
			{ .fd = stop_fd, .events = POLLIN },
		};
		int stopping, timeout;

		pthread_mutex_lock(&a->lock);
		timeout = a->ngone ? GONE_CHECK_MS : -1;
		pthread_mutex_unlock(&a->lock);
		if (poll(p, stop_fd >= 0 ? 3 : 2, timeout) < 0) {
			if (errno == EINTR)
				continue;
			aeg_error("poll: %s", strerror(errno));
			return;
		}
		if (p[1].revents) {
			uint64_t v;
			if (read(a->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				aeg_warn("wake: %s", strerror(errno));
		}
		if (stop_fd >= 0 && p[2].revents) {
			char buf[128];
			if (read(stop_fd, buf, sizeof(buf)) < 0 && errno != EAGAIN)
				aeg_warn("stop: %s", strerror(errno));
			aeg_info("stop requested");
			return;
		}
		agent_reap(a, 0);
		agent_reclaim_gone(a);
		pthread_mutex_lock(&a->lock);
		stopping = a->stopping;
		pthread_mutex_unlock(&a->lock);
		if (stopping)
			return;
		if (p[0].revents & POLLIN)
			agent_accept(a);
	}
}

/* --------------------------------------------------------- run and stop */

static void teardown(struct agent *a)
{
	if (a->listen_fd >= 0) {
		close(a->listen_fd);
		unlink(a->sock_path);
	}
	/* Disconnect every client, then wait for their threads. */
	pthread_mutex_lock(&a->lock);
	a->stopping = 1;
	pthread_cond_broadcast(&a->pool_cv);
	agent_disconnect_all(a);
	pthread_mutex_unlock(&a->lock);
	agent_reap(a, 1);
	/* A pool still being made stops (its pages may take seconds); a ring is finished. */
	atomic_store(&a->pool_stop, 1);
	if (a->settle_thread_started)
		pthread_join(a->settle_thread, NULL);
	for (int i = 0; i < a->nslabs; i++)
		if (a->slabs[i].ring_thread_started)
			pthread_join(a->slabs[i].ring_thread, NULL);
	/* The engines cancel their loads, wait for copies and free chunks and load handles. */
	for (int i = 0; i < a->nslabs; i++)
		if (a->slabs[i].pf)
			aeg_prefetch_destroy(a->slabs[i].pf);
	agent_loads_clear(a, 0);
	free(a->loads);
	if (a->pool)
		aeg_pool_destroy(a->pool);
	for (int i = 0; i < a->nslabs; i++)
		if (a->slabs[i].ring)
			aeg_pool_destroy(a->slabs[i].ring);
	for (int i = 0; i < a->nslabs; i++)
		aeg_slab_destroy(a->slabs[i].slab);
	if (a->dev)
		aeg_device_close(a->dev);
	if (a->wake_fd >= 0)
		close(a->wake_fd);
	pthread_cond_destroy(&a->pool_cv);
	pthread_mutex_destroy(&a->lock);
}

static int paths(struct agent *a, const char *dir)
{
	if (snprintf(a->sock_path, sizeof(a->sock_path), "%s/%s", dir, AEG_JOB_SOCKET_FILE) >=
	    (int)sizeof(a->sock_path))
		return aeg_fail(AEG_EINVAL, "runtime directory %s is too long for a socket path (at most %zu bytes)",
				dir, sizeof(a->sock_path) - sizeof("/" AEG_JOB_SOCKET_FILE));
	snprintf(a->pid_path, sizeof(a->pid_path), "%s/%s", dir, AEG_JOB_PID_FILE);
	snprintf(a->ready_path, sizeof(a->ready_path), "%s/%s", dir, AEG_JOB_READY_FILE);
	snprintf(a->error_path, sizeof(a->error_path), "%s/%s", dir, AEG_JOB_ERROR_FILE);
	return 0;
}

static int pool_gpu(const struct agent *a)
{
	return a->cfg->gpu_count ? a->cfg->gpus[0] : 0;
}

/* The pool: made, then handed to the engines and to the steps waiting for it. */
static void make_pool(struct agent *a)
{
	uint64_t cache = 0;
	aeg_pool_t *pool = NULL;
	int err;

	err = aeg_pool_create_stoppable(a->dev, pool_gpu(a), a->pool_buffer_bytes, a->pool_bytes, &a->pool_stop,
					&pool);
	if (err == 0)
		err = cache_share(a, &cache);
	for (int i = 0; i < a->nslabs; i++)
		aeg_prefetch_set_pool(a->slabs[i].pf, err ? NULL : pool, cache, err);
	pthread_mutex_lock(&a->lock);
	if (err == AEG_ECANCELED) {
		snprintf(a->pool_error, sizeof(a->pool_error), "%s", aeg_error_detail());
		aeg_info("job %s: the agent stops: %s", a->cfg->job_id, a->pool_error);
		a->pool_state = POOL_FAILED;
	} else if (err) {
		snprintf(a->pool_error, sizeof(a->pool_error), "pinned pool: %s", aeg_error_detail());
		aeg_error("job %s: %s; the job runs on without it (steps that ask for it get this error)",
			  a->cfg->job_id, a->pool_error);
		a->pool_state = POOL_FAILED;
		if (pool)
			aeg_pool_destroy(pool);
	} else {
		a->pool = pool;
		a->pool_state = POOL_READY;
		aeg_info("job %s: pinned pool ready", a->cfg->job_id);
	}
	pthread_cond_broadcast(&a->pool_cv);
	pthread_mutex_unlock(&a->lock);
}

/* The staging ring's first buffer is in: the engine stages through it, and through the others as they come. */
static void ring_usable(aeg_pool_t *pool, void *arg)
{
	struct agent_slab *s = arg;

	s->ring = pool;
	aeg_prefetch_set_pool(s->pf, pool, 0, 0);
}

/* The staging ring's thread: made, and handed to the engine at its first buffer; the engine maps files until then. */
static void *make_ring(void *arg)
{
	struct agent_slab *s = arg;
	aeg_pool_t *pool = NULL;
	char size[32];
	int err = aeg_pool_create_private_early(s->agent->dev, s->gpu, AEG_PREFETCH_RING_BUFFER_BYTES,
						s->agent->ring_bytes, ring_usable, s, &pool);

	if (err) {
		aeg_warn("job %s: GPU %d: the prefetch engine's staging ring (%s): files that cannot be mapped "
			 "do not load", s->agent->cfg->job_id, s->gpu, aeg_error_detail());
		aeg_prefetch_set_pool(s->pf, NULL, 0, err);
	} else {
		aeg_info("job %s: GPU %d: the prefetch engine's staging ring ready (%s; no job pool)",
			 s->agent->cfg->job_id, s->gpu, aeg_size_format(s->agent->ring_bytes, size, sizeof(size)));
	}
	return NULL;
}

void agent_ring_start(struct agent *a, uint32_t slab)
{
	struct agent_slab *s = &a->slabs[slab];
	int rc;

	if (a->ring_bytes == 0 || s->ring_asked)
		return;
	s->ring_asked = 1;
	s->agent = a;
	rc = pthread_create(&s->ring_thread, NULL, make_ring, s);
	if (rc) {
		aeg_warn("job %s: GPU %d: starting the staging ring's thread: %s; files that cannot be mapped "
			 "do not load", a->cfg->job_id, s->gpu, strerror(rc));
		aeg_fail(AEG_ENOMEM, "no staging ring: %s", strerror(rc));
		aeg_prefetch_set_pool(s->pf, NULL, 0, AEG_ENOMEM);
		return;
	}
	s->ring_thread_started = 1;
}

/*
 * After ready, off the path of the job's steps: the machine's topology
 * (hwloc's discovery, 50-60 ms of a 55-75 ms start on a development VM),
 * given to the engines, whose workers then bind near their GPUs; then the
 * pool, placed by the same topology. A machine of one NUMA node needs
 * none: every CPU and page is as near the GPUs as any other.
 */
static void *settle(void *arg)
{
	struct agent *a = arg;
	const aeg_topo_t *topo = NULL;
	uint64_t t;
	int node, stopping;

	/* Made before the ready record, so a thread that cannot be had fails the start; works after it. */
	pthread_mutex_lock(&a->lock);
	while (!a->ready_written && !a->stopping)
		pthread_cond_wait(&a->pool_cv, &a->lock);
	stopping = a->stopping;
	pthread_mutex_unlock(&a->lock);
	if (stopping)
		return NULL;
	t = aeg_now_ns();
	node = aeg_topo_sole_node();
	if (node >= 0) {
		aeg_debug("job %s: one NUMA node (%d): no topology; pool and prefetch threads need no binding",
			  a->cfg->job_id, node);
	} else if (aeg_topo_live(&topo)) {
		aeg_warn("no topology (%s): pool and prefetch threads stay unbound", aeg_error_detail());
	} else {
		for (int i = 0; i < a->nslabs; i++)
			aeg_prefetch_set_topo(a->slabs[i].pf, topo);
	}
	aeg_debug("job %s: topology after ready: %.1f ms", a->cfg->job_id, (aeg_now_ns() - t) / 1e6);
	if (a->pool_state == POOL_MAKING)
		make_pool(a);
	return NULL;
}

static int start_settling(struct agent *a)
{
	int rc = pthread_create(&a->settle_thread, NULL, settle, a);

	if (rc)
		return aeg_fail(AEG_ENOMEM, "starting the agent's settling thread: %s", strerror(rc));
	a->settle_thread_started = 1;
	return 0;
}

int agent_pool_wait(struct agent *a, aeg_pool_t **pool)
{
	if (a->pool_state == POOL_NONE)
		return aeg_fail(AEG_ENOENT, "the job has no pinned pool (--aegaeon-pinned)");
	while (a->pool_state == POOL_MAKING && !a->stopping)
		pthread_cond_wait(&a->pool_cv, &a->lock);
	if (a->pool_state == POOL_FAILED)
		return aeg_fail(AEG_ENOMEM, "%s", a->pool_error);
	if (a->pool_state != POOL_READY)
		return aeg_fail(AEG_ECANCELED, "the job's agent is stopping");
	*pool = a->pool;
	return 0;
}

/*
 * A --prefetch model: a file, or every file of a directory or shard index
 * (read with the job user's rights), each a load of its own that steps find
 * by its path, or as a model by the directory's.
 */
static int start_model(struct agent *a, const char *path)
{
	struct aeg_model_paths mp;
	int err = aeg_model_paths(path, &mp);

	if (err) {
		aeg_error_prefix("--prefetch");
		return err;
	}
	pthread_mutex_lock(&a->lock);
	for (uint32_t i = 0; i < mp.count && err == 0; i++)
		err = agent_load_start(a, 0, mp.paths[i], 0, NULL, NULL);
	pthread_mutex_unlock(&a->lock);
	aeg_model_paths_free(&mp);
	return err;
}

/* Milliseconds since *@t, and *@t moved to now: the steps of the start, logged once ready. */
static double lap_ms(uint64_t *t)
{
	uint64_t now = aeg_now_ns(), was = *t;

	*t = now;
	return (double)(now - was) / 1e6;
}

static int start(struct agent *a)
{
	const struct aeg_agent_config *cfg = a->cfg;
	uint64_t t0 = aeg_now_ns(), t = t0;
	double device, slabs, pool_check, engines, prefetch;
	int err;

	err = aeg_device_open(&a->dev, cfg->device);
	if (err) {
		aeg_error_prefix("%s device", aeg_device_kind_name(cfg->device));
		return err;
	}
	device = lap_ms(&t);
	err = reserve_slabs(a);
	if (err)
		return err;
	slabs = lap_ms(&t);
	if (cfg->pinned_bytes > cfg->pinned_max_bytes) {
		char want[32], cap[32];

		return aeg_fail(AEG_ERANGE, "pinned pool of %s asked is over this site's limit of %s (pinned_max)",
				aeg_size_format(cfg->pinned_bytes, want, sizeof(want)),
				aeg_size_format(cfg->pinned_max_bytes, cap, sizeof(cap)));
	}
	if (cfg->pinned_bytes) {
		/* Everything that can be checked now is: a pool that cannot be made fails the start. */
		err = aeg_pool_check(a->dev, pool_gpu(a), cfg->pinned_buffer_bytes, cfg->pinned_bytes, &a->pool_bytes);
		if (err) {
			aeg_error_prefix("pinned pool");
			return err;
		}
		a->pool_buffer_bytes = cfg->pinned_buffer_bytes;
		a->pool_state = POOL_MAKING;
	}
	pool_check = lap_ms(&t);
	err = start_engines(a);
	if (err)
		return err;
	err = listen_socket(a);
	if (err)
		return err;
	engines = lap_ms(&t);
	/* --prefetch models go to the first GPU's slab, all started before ready. */
	for (int i = 0; i < cfg->prefetch_count; i++) {
		if (a->nslabs == 0)
			return aeg_fail(AEG_ENODEV, "--prefetch %s: the job has no slab to load into (%s)",
					cfg->prefetch[i], cfg->gpu_count == 0 ? "no GPU" : "--slab 0");
		err = start_model(a, cfg->prefetch[i]);
		if (err)
			return err;
	}
	prefetch = lap_ms(&t);
	/*
	 * The settling thread is had before the ready record is written: a ready
	 * record must never name an agent that is about to fail its start.
	 */
	err = start_settling(a);
	if (err)
		return err;
	err = write_ready(a);
	if (err)
		return err;
	pthread_mutex_lock(&a->lock);
	a->ready_written = 1;
	pthread_cond_broadcast(&a->pool_cv);
	pthread_mutex_unlock(&a->lock);
	aeg_info("job %s: ready on %s after %.1f ms (device open %.1f, slabs %.1f, pool check %.1f, "
		 "engines and socket %.1f, prefetch starts %.1f)", cfg->job_id, a->sock_path,
		 (aeg_now_ns() - t0) / 1e6, device, slabs, pool_check, engines, prefetch);
	return 0;
}

int aeg_agent_run(const struct aeg_agent_config *cfg, int stop_fd)
{
	struct agent *a;
	int err;

	if (cfg == NULL || cfg->gpu_count < 0 || cfg->gpu_count > AEG_JOB_MAX_GPUS)
		return aeg_fail(AEG_EINVAL, "agent: bad configuration");
	err = check_runtime_dir(cfg->runtime_dir);
	if (err)
		return err;     /* not a place to write an error record into */
	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return aeg_fail(AEG_ENOMEM, "agent: out of memory");
	a->cfg = cfg;
	a->listen_fd = -1;
	pthread_mutex_init(&a->lock, NULL);
	pthread_cond_init(&a->pool_cv, NULL);
	a->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (a->wake_fd < 0) {
		err = aeg_fail(AEG_EIO, "eventfd: %s", strerror(errno));
		goto out;
	}
	err = paths(a, cfg->runtime_dir);
	if (err)
		goto out;
	err = check_no_agent(a);
	if (err) {
		/* Its files are not ours to touch. */
		teardown(a);
		free(a);
		return err;
	}
	unlink(a->ready_path);
	unlink(a->error_path);
	err = write_pid(a->pid_path);
	if (err)
		goto out;
	err = start(a);
	if (err) {
		char reason[AEG_JOB_ERROR_MAX];

		snprintf(reason, sizeof(reason), "%s", aeg_error_detail());
		if (aeg_agent_write_error(cfg->runtime_dir, reason))
			aeg_error("writing the error record: %s", aeg_error_detail());
		teardown(a);
		unlink(a->pid_path);
		free(a);
		return aeg_fail(err, "%s", reason);
	}
	serve(a, stop_fd);
	aeg_info("job %s: shutting down", cfg->job_id);
out:
	teardown(a);
	unlink(a->ready_path);
	unlink(a->pid_path);
	free(a);
	return err;
}

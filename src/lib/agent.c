/* The per-job agent: owns the job's slabs, pool and loads, and serves them on a Unix socket. */
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
#include <aegaeon/job.h>
#include <aegaeon/prefetch.h>

#include "agent.h"
#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"
#include "proto.h"
#include "topo_internal.h"

#define PREFETCH_MAX_CHUNKS (1u << 20)  /* per load: bounds the tables a client can make us build */
#define WAIT_SLICE_MS 200               /* a chunk wait looks for a stop or a gone client this often */
#define GONE_MAX 64                     /* disconnected client processes watched for their exit */
#define GONE_CHECK_MS 50                /* how often they are looked at */
#define GONE_WATCH_MS 10000             /* a process still alive this long after its last connection keeps its buffers */

struct lease {
	struct lease *next;
	uint32_t slab;
	uint64_t id, bytes;
};

struct client {
	struct client *next;
	struct agent *a;
	int fd;
	pid_t pid;                      /* SO_PEERCRED: in the agent's pid namespace */
	uint64_t pid_start;             /* its start time, 0 when unknown */
	uint32_t hello_pid;             /* what it says its pid is: differs in another namespace */
	int hello_done;
	int finished;                   /* its thread returned; join it */
	pthread_t thread;
	struct lease *leases;
	unsigned char *frame;
	union proto_msg *in, *out;
};

/* A load the agent keeps, so later steps find its chunks by id or by path. */
struct load {
	struct load *next;
	uint64_t id;                    /* the agent's: unique across slabs */
	uint32_t slab;
	aeg_load_t *handle;
	char path[PATH_MAX];
	struct stat st;                 /* identity of the file when it was loaded */
	uint32_t nchunks, nreleased;
	unsigned char *released;        /* per chunk */
	int refs;                       /* the list's, and each wait-load's (under the lock) */
};

struct agent_slab {
	int gpu;
	char pci_bus_id[AEG_PCI_BUS_ID_LEN];
	aeg_slab_t *slab;
	aeg_prefetch_t *pf;
	aeg_handle_t handle;
	uint32_t leases;
	uint64_t lease_bytes;
};

struct agent {
	const struct aeg_agent_config *cfg;
	aeg_device_t *dev;
	const aeg_topo_t *topo;         /* the process' cached one: shared with the pool */
	struct agent_slab slabs[AEG_JOB_MAX_GPUS];
	int nslabs;
	aeg_pool_t *pool;
	char sock_path[AEG_JOB_SOCKET_MAX];
	char pid_path[PATH_MAX], ready_path[PATH_MAX], error_path[PATH_MAX];
	int listen_fd, wake_fd;
	pthread_mutex_t lock;           /* guards everything below, leases and loads */
	struct client *clients;
	int nclients;
	struct load *loads;
	uint32_t nloads;
	uint64_t next_load_id;
	int stopping;
	/*
	 * Processes whose connection closed: once one has exited, the pool
	 * buffers it held are put back (a killed step cannot release them).
	 */
	struct gone {
		pid_t pid;
		uint64_t start, until_ns;
	} gone[GONE_MAX];
	int ngone;
};

static void wake(struct agent *a)
{
	uint64_t one = 1;

	if (write(a->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		aeg_warn("waking the agent's main loop: %s", strerror(errno));
}

/* ------------------------------------------------------------- start-up */

AEG_EXPORT int aeg_agent_write_error(const char *runtime_dir, const char *reason)
{
	char path[PATH_MAX];

	if (snprintf(path, sizeof(path), "%s/%s", runtime_dir, AEG_JOB_ERROR_FILE) >= (int)sizeof(path))
		return aeg_fail(AEG_EINVAL, "runtime directory path too long");
	aeg_error("start-up failed: %s", reason);
	return aeg_job_error_write(path, reason);
}

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

static int start_engines(struct agent *a)
{
	struct aeg_prefetch_config pcfg;

	aeg_prefetch_config_defaults(&pcfg);
	if (a->cfg->prefetch_threads > 0)
		pcfg.threads = a->cfg->prefetch_threads;
	pcfg.topo = a->topo;
	if (a->pool != NULL && a->nslabs > 0) {
		struct aeg_pool_stats ps;
		uint64_t bytes = 0;
		char size[32];
		int err = aeg_pool_stats(a->pool, &ps);

		if (err == 0)
			err = aeg_size_spec_resolve(&a->cfg->model_cache, ps.pool_bytes, &bytes);
		if (err)
			return err;
		if (bytes > ps.pool_bytes)
			bytes = ps.pool_bytes;
		/* The engines of the job's GPUs share the one pool. */
		pcfg.cache_bytes = bytes / (uint64_t)a->nslabs;
		if (pcfg.cache_bytes > 0)
			aeg_info("host model cache: %s per GPU in the pinned pool",
				 aeg_size_format(pcfg.cache_bytes, size, sizeof(size)));
	}
	for (int i = 0; i < a->nslabs; i++) {
		int err = aeg_prefetch_create(a->slabs[i].slab, a->pool, &pcfg, &a->slabs[i].pf);
		if (err) {
			aeg_error_prefix("GPU %d: prefetch engine", a->slabs[i].gpu);
			return err;
		}
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
	if (a->pool) {
		struct aeg_pool_stats ps;
		int err = aeg_pool_stats(a->pool, &ps);
		if (err)
			return err;
		rec.pinned_bytes = ps.pool_bytes;
		rec.pinned_buffer = ps.buffer_bytes;
	}
	return aeg_job_record_write(a->ready_path, &rec);
}

/* ---------------------------------------------------------------- loads */

static struct load *find_load(struct agent *a, uint64_t id)
{
	for (struct load *l = a->loads; l; l = l->next)
		if (l->id == id)
			return l;
	return NULL;
}

static void load_free(struct load *l, int close_handle)
{
	if (close_handle)
		aeg_load_close(l->handle);
	free(l->released);
	free(l);
}

/* Drop a reference (lock held); the last one closes the load's handle. */
static void load_put(struct load *l)
{
	if (--l->refs == 0)
		load_free(l, 1);
}

static void unlink_load(struct agent *a, struct load *dead)
{
	for (struct load **pp = &a->loads; *pp; pp = &(*pp)->next) {
		if (*pp == dead) {
			*pp = dead->next;
			a->nloads--;
			return;
		}
	}
}

/* Called with the lock held; the engine call returns at once (copies run on its threads). */
static int start_load(struct agent *a, uint32_t slab, const char *path, uint64_t chunk_bytes,
		      struct load **out)
{
	struct aeg_prefetch_options opts = { .chunk_bytes = chunk_bytes };
	struct load *l;
	uint32_t n;
	int err;

	if (slab >= (uint32_t)a->nslabs)
		return aeg_fail(AEG_ENODEV, "slab %u: the job has %d slab%s", slab, a->nslabs,
				a->nslabs == 1 ? "" : "s");
	if (opts.chunk_bytes == 0)
		opts.chunk_bytes = a->cfg->prefetch_chunk_bytes;
	if (opts.chunk_bytes == 0)
		return aeg_fail(AEG_EINVAL, "prefetch %s: chunk size 0", path);
	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	/* The agent is the job user: the file opens with the job's rights, never root's. */
	if (realpath(path, l->path) == NULL) {
		err = aeg_fail(errno == ENOENT ? AEG_ENOENT : errno == EACCES ? AEG_EACCES : AEG_EINVAL,
			       "prefetch %s: %s", path, strerror(errno));
		goto fail;
	}
	if (stat(l->path, &l->st) < 0) {
		err = aeg_fail(AEG_EACCES, "prefetch %s: %s", l->path, strerror(errno));
		goto fail;
	}
	if ((uint64_t)l->st.st_size / opts.chunk_bytes >= PREFETCH_MAX_CHUNKS) {
		err = aeg_fail(AEG_EINVAL, "prefetch %s: %jd bytes in chunks of %" PRIu64
			       " make more than %u chunks; use larger chunks", l->path,
			       (intmax_t)l->st.st_size, opts.chunk_bytes, PREFETCH_MAX_CHUNKS);
		goto fail;
	}
	err = aeg_prefetch_file(a->slabs[slab].pf, l->path, &opts, &l->handle);
	if (err)
		goto fail;
	aeg_load_chunks(l->handle, &n);
	l->nchunks = n;
	l->released = calloc(n ? n : 1, 1);
	if (l->released == NULL) {
		aeg_load_close(l->handle);
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		goto fail;
	}
	l->slab = slab;
	l->refs = 1;
	l->id = ++a->next_load_id;
	l->next = a->loads;
	a->loads = l;
	a->nloads++;
	aeg_info("load %" PRIu64 ": %s into the slab of GPU %d, %u chunks", l->id, l->path,
		 a->slabs[slab].gpu, n);
	*out = l;
	return 0;
fail:
	free(l);
	return err;
}

/* The newest load of @path into @slab, if the file is still the one loaded. */
static int find_load_by_path(struct agent *a, uint32_t slab, const char *path, struct load **out)
{
	char real[PATH_MAX];
	struct stat st;

	if (realpath(path, real) == NULL || stat(real, &st) < 0)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s: %s", path, strerror(errno));
	for (struct load *l = a->loads; l; l = l->next) {
		if (l->slab != slab || strcmp(l->path, real) != 0)
			continue;
		if (l->st.st_dev != st.st_dev || l->st.st_ino != st.st_ino || l->st.st_size != st.st_size ||
		    l->st.st_mtim.tv_sec != st.st_mtim.tv_sec || l->st.st_mtim.tv_nsec != st.st_mtim.tv_nsec)
			return aeg_fail(AEG_ESTALE, "%s changed since load %" PRIu64 " read it; prefetch it again",
					real, l->id);
		*out = l;
		return 0;
	}
	return aeg_fail(AEG_ENOENT, "%s is not loaded into slab %u", real, slab);
}

/* One page of a load's live chunks. */
static int chunks_page(struct agent *a, struct load *l, uint32_t first, struct proto_chunks_rep *rep)
{
	struct aeg_load_progress pr;
	const struct aeg_chunk *c;
	uint32_t n, live = 0;
	int err;

	err = aeg_load_progress(l->handle, &pr);
	if (err)
		return err;
	c = aeg_load_chunks(l->handle, &n);
	memset(rep, 0, offsetof(struct proto_chunks_rep, chunks));
	rep->detail[0] = '\0';
	rep->load_id = l->id;
	rep->slab = l->slab;
	rep->status = pr.status;
	/* A settled load's wait returns at once, with its error's detail. */
	if (pr.status != 0 && pr.status != AEG_EBUSY && aeg_load_wait(l->handle, 0) != 0)
		snprintf(rep->detail, sizeof(rep->detail), "%s", aeg_error_detail());
	rep->file_bytes = pr.total_bytes;
	rep->done_bytes = pr.done_bytes > pr.total_bytes ? pr.total_bytes : pr.done_bytes;
	rep->total = l->nchunks - l->nreleased;
	if (first > rep->total)
		return aeg_fail(AEG_EINVAL, "load %" PRIu64 " has %u chunks; page from %u asked",
				l->id, rep->total, first);
	rep->first = first;
	for (uint32_t i = 0; i < n && i < l->nchunks && rep->count < PROTO_CHUNKS_PER_PAGE; i++) {
		struct proto_chunk *pc;

		if (l->released[i])
			continue;
		if (live++ < first)
			continue;
		pc = &rep->chunks[rep->count++];
		pc->offset = c[i].slab_offset;
		pc->size = c[i].size;
		pc->file_offset = c[i].file_offset;
		pc->slab_id = c[i].slab_id;
		pc->event = c[i].event;
	}
	return 0;
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

/* After the engine freed blocks @ids of @slab: forget their chunks, and loads left empty. */
static void mark_released(struct agent *a, uint32_t slab, uint64_t *ids, uint32_t count)
{
	qsort(ids, count, sizeof(*ids), cmp_u64);
	for (struct load *l = a->loads, *next; l; l = next) {
		const struct aeg_chunk *c;
		uint32_t n;

		next = l->next;
		if (l->slab != slab)
			continue;
		c = aeg_load_chunks(l->handle, &n);
		for (uint32_t i = 0; i < n && i < l->nchunks; i++) {
			if (!l->released[i] && bsearch(&c[i].slab_id, ids, count, sizeof(*ids), cmp_u64)) {
				l->released[i] = 1;
				l->nreleased++;
			}
		}
		if (l->nreleased == l->nchunks) {
			unlink_load(a, l);
			load_put(l);
		}
	}
}

static int release_ids(struct agent *a, const struct proto_release_req *q, uint32_t *released)
{
	uint64_t *ids;
	int err = 0;

	*released = 0;
	for (uint32_t i = 0; i < q->count; i++)
		if (q->ids[i].slab >= (uint32_t)a->nslabs)
			return aeg_fail(AEG_ENODEV, "release: slab %u, the job has %d", q->ids[i].slab, a->nslabs);
	ids = malloc(sizeof(*ids) * (q->count ? q->count : 1));
	if (ids == NULL)
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	/* One engine call per slab; each checks all its ids before freeing any. */
	for (int s = 0; s < a->nslabs && !err; s++) {
		uint32_t n = 0;

		for (uint32_t i = 0; i < q->count; i++)
			if (q->ids[i].slab == (uint32_t)s)
				ids[n++] = q->ids[i].slab_id;
		if (n == 0)
			continue;
		err = aeg_prefetch_release(a->slabs[s].pf, ids, n);
		if (!err) {
			mark_released(a, (uint32_t)s, ids, n);
			*released += n;
		}
	}
	free(ids);
	return err;
}

static int release_all(struct agent *a, uint32_t *released)
{
	int err = 0;

	*released = 0;
	for (int s = 0; s < a->nslabs; s++) {
		int e = aeg_prefetch_release_all(a->slabs[s].pf);
		if (e && !err)
			err = e;
	}
	while (a->loads) {
		struct load *l = a->loads;

		a->loads = l->next;
		*released += l->nchunks - l->nreleased;
		load_put(l);
	}
	a->nloads = 0;
	return err;
}

/* -------------------------------------------------------------- requests */

static int do_hello(struct client *c, const struct proto_hello_req *q, struct proto_hello_rep *p)
{
	struct agent *a = c->a;

	if (q->min_version > PROTO_VERSION || q->max_version < PROTO_VERSION_MIN)
		return aeg_fail(AEG_EPROTO, "client speaks protocol versions %u..%u, this agent %d..%d",
				q->min_version, q->max_version, PROTO_VERSION_MIN, PROTO_VERSION);
	memset(p, 0, sizeof(*p));
	p->version = q->max_version < PROTO_VERSION ? q->max_version : PROTO_VERSION;
	p->agent_pid = (uint32_t)getpid();
	p->device = (uint8_t)a->cfg->device;
	snprintf(p->job_id, sizeof(p->job_id), "%s", a->cfg->job_id);
	p->nslabs = (uint32_t)a->nslabs;
	for (int i = 0; i < a->nslabs; i++) {
		p->slabs[i].gpu = a->slabs[i].gpu;
		memcpy(p->slabs[i].pci_bus_id, a->slabs[i].pci_bus_id, sizeof(p->slabs[i].pci_bus_id));
		p->slabs[i].bytes = aeg_slab_bytes(a->slabs[i].slab);
		p->slabs[i].handle = a->slabs[i].handle;
	}
	if (a->pool) {
		struct aeg_pool_stats ps;
		int err = aeg_pool_stats(a->pool, &ps);
		if (err)
			return err;
		p->pool_bytes = ps.pool_bytes;
		p->pool_buffer = ps.buffer_bytes;
	}
	c->hello_done = 1;
	c->hello_pid = q->pid;
	aeg_debug("client pid %d (%s) speaks version %u", (int)c->pid, q->client, p->version);
	return 0;
}

static int do_lease(struct client *c, const struct proto_lease_req *q, struct proto_lease_rep *p)
{
	struct agent *a = c->a;
	struct aeg_block b;
	struct lease *l;
	uint64_t bytes = q->bytes;
	int err;

	if (q->slab >= (uint32_t)a->nslabs)
		return aeg_fail(AEG_ENODEV, "lease: slab %u, the job has %d", q->slab, a->nslabs);
	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "lease: out of memory");
	pthread_mutex_lock(&a->lock);
	if (bytes == 0) {
		struct aeg_slab_stats st;

		aeg_slab_stats(a->slabs[q->slab].slab, &st);
		bytes = st.largest_free_bytes;
		if (bytes == 0) {
			err = aeg_fail(AEG_ENOSPC, "lease: the slab of GPU %d is full", a->slabs[q->slab].gpu);
			goto out;
		}
	}
	err = aeg_slab_alloc(a->slabs[q->slab].slab, bytes, &b);
	if (err) {
		aeg_error_prefix("lease on GPU %d", a->slabs[q->slab].gpu);
		goto out;
	}
	l->slab = q->slab;
	l->id = b.id;
	l->bytes = b.size;
	l->next = c->leases;
	c->leases = l;
	a->slabs[q->slab].leases++;
	a->slabs[q->slab].lease_bytes += b.size;
	p->slab = q->slab;
	p->offset = b.offset;
	p->bytes = b.size;
	p->lease_id = b.id;
	l = NULL;
out:
	pthread_mutex_unlock(&a->lock);
	free(l);
	return err;
}

/* With the lock held. */
static void lease_drop(struct agent *a, struct lease *l)
{
	int err = aeg_slab_free(a->slabs[l->slab].slab, l->id);

	if (err)
		aeg_warn("freeing lease %" PRIu64 ": %s", l->id, aeg_error_detail());
	a->slabs[l->slab].leases--;
	a->slabs[l->slab].lease_bytes -= l->bytes;
	free(l);
}

static int do_lease_free(struct client *c, const struct proto_lease_free_req *q)
{
	struct agent *a = c->a;
	int err = aeg_fail(AEG_ENOENT, "lease %" PRIu64 " on slab %u is not one of this connection's",
			   q->lease_id, q->slab);

	pthread_mutex_lock(&a->lock);
	for (struct lease **pp = &c->leases; *pp; pp = &(*pp)->next) {
		struct lease *l = *pp;

		if (l->id == q->lease_id && l->slab == q->slab) {
			*pp = l->next;
			lease_drop(a, l);
			err = 0;
			break;
		}
	}
	pthread_mutex_unlock(&a->lock);
	return err;
}

static int do_status(struct client *c, const struct proto_status_req *q, struct proto_status_rep *p)
{
	struct agent *a = c->a;
	uint32_t i = 0;
	int err = 0;

	memset(p, 0, offsetof(struct proto_status_rep, loads));
	pthread_mutex_lock(&a->lock);
	p->nslabs = (uint32_t)a->nslabs;
	for (int s = 0; s < a->nslabs; s++) {
		p->slabs[s].gpu = a->slabs[s].gpu;
		aeg_slab_stats(a->slabs[s].slab, &p->slabs[s].stats);
		p->slabs[s].leases = a->slabs[s].leases;
		p->slabs[s].lease_bytes = a->slabs[s].lease_bytes;
	}
	p->pool.numa_node = -1;
	if (a->pool) {
		p->has_pool = 1;
		err = aeg_pool_stats(a->pool, &p->pool);
		if (err)
			goto out;
	}
	p->clients = (uint32_t)a->nclients;
	p->loads_total = a->nloads;
	if (q->first_load > a->nloads) {
		err = aeg_fail(AEG_EINVAL, "status: %u loads; page from %u asked", a->nloads, q->first_load);
		goto out;
	}
	p->first = q->first_load;
	/* Oldest first: the list is newest first. */
	for (uint32_t k = a->nloads; k-- > 0 && p->count < PROTO_LOADS_PER_PAGE;) {
		struct load *l = a->loads;
		struct aeg_load_progress pr;
		struct proto_load *pl;

		for (uint32_t j = 0; j < k; j++)
			l = l->next;
		if (i++ < q->first_load)
			continue;
		err = aeg_load_progress(l->handle, &pr);
		if (err)
			goto out;
		pl = &p->loads[p->count++];
		pl->load_id = l->id;
		pl->slab = l->slab;
		pl->status = pr.status;
		pl->file_bytes = pr.total_bytes;
		pl->done_bytes = pr.done_bytes > pr.total_bytes ? pr.total_bytes : pr.done_bytes;
		pl->chunks = l->nchunks - l->nreleased;
		snprintf(pl->path, sizeof(pl->path), "%s", l->path);
	}
out:
	pthread_mutex_unlock(&a->lock);
	return err;
}

static int peer_gone(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLRDHUP };

	return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/*
 * Hold the reply until the chunk event is recorded: a process holding only
 * its CUDA IPC handle would see an armed event as complete. In slices, so a
 * stopping agent or a client gone does not leave this thread behind.
 */
static int do_wait_event(struct client *c, const struct proto_wait_event_req *q)
{
	struct agent *a = c->a;
	uint64_t deadline = aeg_now_ns() + (uint64_t)(q->timeout_ms > 0 ? q->timeout_ms : 0) * 1000000ull;

	for (;;) {
		int slice = WAIT_SLICE_MS, stopping, err;

		if (q->timeout_ms >= 0) {
			uint64_t now = aeg_now_ns();
			uint64_t left_ms = now >= deadline ? 0 : (deadline - now + 999999) / 1000000;

			if (left_ms < (uint64_t)slice)
				slice = (int)left_ms;
		}
		err = aeg_event_wait_recorded(a->dev, &q->event, slice);
		if (err == AEG_ENOENT)
			return aeg_fail(err, "no chunk of this job's agent has that event handle (released?)");
		if (err != AEG_ETIMEDOUT)
			return err;
		if (q->timeout_ms >= 0 && aeg_now_ns() >= deadline)
			return aeg_fail(AEG_ETIMEDOUT, "chunk event not recorded after %d ms", q->timeout_ms);
		pthread_mutex_lock(&a->lock);
		stopping = a->stopping;
		pthread_mutex_unlock(&a->lock);
		if (stopping)
			return aeg_fail(AEG_ECANCELED, "the job's agent is stopping");
		if (peer_gone(c->fd))
			return aeg_fail(AEG_ECANCELED, "client pid %d left while waiting", (int)c->pid);
	}
}

/*
 * Hold the reply until load @q->load_id has stopped, in slices as a chunk
 * wait does. The load is referenced meanwhile: a release frees its chunks,
 * not the handle this thread waits on.
 */
static int do_wait_load(struct client *c, const struct proto_wait_load_req *q)
{
	struct agent *a = c->a;
	uint64_t deadline = aeg_now_ns() + (uint64_t)(q->timeout_ms > 0 ? q->timeout_ms : 0) * 1000000ull;
	struct load *l;
	int err;

	pthread_mutex_lock(&a->lock);
	l = find_load(a, q->load_id);
	if (l != NULL)
		l->refs++;
	pthread_mutex_unlock(&a->lock);
	if (l == NULL)
		return aeg_fail(AEG_ENOENT, "no load %" PRIu64 " (released, or never made)", q->load_id);
	for (;;) {
		int slice = WAIT_SLICE_MS, stopping;

		if (q->timeout_ms >= 0) {
			uint64_t now = aeg_now_ns();
			uint64_t left_ms = now >= deadline ? 0 : (deadline - now + 999999) / 1000000;

			if (left_ms < (uint64_t)slice)
				slice = (int)left_ms;
		}
		err = aeg_load_wait(l->handle, slice);
		if (err != AEG_ETIMEDOUT)
			break;
		if (q->timeout_ms >= 0 && aeg_now_ns() >= deadline) {
			err = aeg_fail(AEG_ETIMEDOUT, "load %" PRIu64 " not done after %d ms", q->load_id,
				       q->timeout_ms);
			break;
		}
		pthread_mutex_lock(&a->lock);
		stopping = a->stopping;
		pthread_mutex_unlock(&a->lock);
		if (stopping) {
			err = aeg_fail(AEG_ECANCELED, "the job's agent is stopping");
			break;
		}
		if (peer_gone(c->fd)) {
			err = aeg_fail(AEG_ECANCELED, "client pid %d left while waiting", (int)c->pid);
			break;
		}
	}
	pthread_mutex_lock(&a->lock);
	load_put(l);
	pthread_mutex_unlock(&a->lock);
	return err;
}

/* Serve one request; fill the reply in c->out. */
static int handle(struct client *c, const struct proto_header *h, int *pass_fd)
{
	struct agent *a = c->a;
	const union proto_msg *in = c->in;
	union proto_msg *out = c->out;
	struct aeg_pool_stats ps;
	struct load *l;
	int err;

	switch (h->type) {
	case PROTO_HELLO:
		return do_hello(c, &in->hello_req, &out->hello_rep);
	case PROTO_LEASE:
		return do_lease(c, &in->lease_req, &out->lease_rep);
	case PROTO_LEASE_FREE:
		return do_lease_free(c, &in->lease_free_req);
	case PROTO_POOL_FD:
		if (a->pool == NULL)
			return aeg_fail(AEG_ENOENT, "the job has no pinned pool (--aegaeon-pinned)");
		err = aeg_pool_stats(a->pool, &ps);
		if (err)
			return err;
		out->pool_rep.pool_bytes = ps.pool_bytes;
		out->pool_rep.buffer_bytes = ps.buffer_bytes;
		*pass_fd = aeg_pool_fd(a->pool);
		return 0;
	case PROTO_PREFETCH:
		pthread_mutex_lock(&a->lock);
		err = start_load(a, in->prefetch_req.slab, in->prefetch_req.path,
				 in->prefetch_req.chunk_bytes, &l);
		if (!err)
			err = chunks_page(a, l, 0, &out->chunks_rep);
		pthread_mutex_unlock(&a->lock);
		return err;
	case PROTO_CHUNKS:
		pthread_mutex_lock(&a->lock);
		if (in->chunks_req.load_id) {
			l = find_load(a, in->chunks_req.load_id);
			err = l ? 0 : aeg_fail(AEG_ENOENT, "no load %" PRIu64 " (released, or never made)",
					       in->chunks_req.load_id);
		} else {
			err = find_load_by_path(a, in->chunks_req.slab, in->chunks_req.path, &l);
		}
		if (!err)
			err = chunks_page(a, l, in->chunks_req.first, &out->chunks_rep);
		pthread_mutex_unlock(&a->lock);
		return err;
	case PROTO_RELEASE:
		pthread_mutex_lock(&a->lock);
		if (in->release_req.flags & PROTO_RELEASE_ALL)
			err = release_all(a, &out->release_rep.released);
		else
			err = release_ids(a, &in->release_req, &out->release_rep.released);
		pthread_mutex_unlock(&a->lock);
		return err;
	case PROTO_STATUS:
		return do_status(c, &in->status_req, &out->status_rep);
	case PROTO_SHUTDOWN:
		aeg_info("shutdown asked by client pid %d", (int)c->pid);
		return 0;
	case PROTO_WAIT_EVENT:
		return do_wait_event(c, &in->wait_event_req);
	case PROTO_WAIT_LOAD:
		return do_wait_load(c, &in->wait_load_req);
	default:
		return aeg_fail(AEG_EPROTO, "%s is not a request", proto_type_name(h->type));
	}
}

static void send_error(struct client *c, uint64_t id, int code)
{
	union proto_msg *out = c->out;

	out->error.code = code;
	snprintf(out->error.detail, sizeof(out->error.detail), "%s", aeg_error_detail());
	(void)proto_send(c->fd, PROTO_ERROR, PROTO_F_REPLY, id, out, -1, c->frame);
}

static void *client_main(void *arg)
{
	struct client *c = arg;
	struct agent *a = c->a;

	for (;;) {
		struct proto_header h = { 0 };
		int pass_fd = -1, err;

		err = proto_recv(c->fd, &h, c->in, NULL, c->frame);
		if (err == AEG_ECANCELED)
			break;
		if (!err && (h.flags & PROTO_F_REPLY))
			err = aeg_fail(AEG_EPROTO, "client sent a %s reply", proto_type_name(h.type));
		if (!err && !c->hello_done && h.type != PROTO_HELLO)
			err = aeg_fail(AEG_EPROTO, "first message is %s, not hello", proto_type_name(h.type));
		if (!err && c->hello_done && h.type == PROTO_HELLO)
			err = aeg_fail(AEG_EPROTO, "hello sent twice");
		if (err) {
			/* A peer that breaks the protocol is told why, then dropped. */
			aeg_warn("client pid %d: %s: %s; disconnecting", (int)c->pid, aeg_errname(err),
				 aeg_error_detail());
			if (err == AEG_EPROTO)
				send_error(c, h.id, err);
			break;
		}
		err = handle(c, &h, &pass_fd);
		if (err) {
			aeg_debug("client pid %d: %s: %s", (int)c->pid, proto_type_name(h.type), aeg_error_detail());
			send_error(c, h.id, err);
			if (err == AEG_EPROTO)
				break;
			continue;
		}
		if (proto_send(c->fd, h.type, PROTO_F_REPLY, h.id, c->out, pass_fd, c->frame))
			break;
		if (h.type == PROTO_SHUTDOWN) {
			pthread_mutex_lock(&a->lock);
			a->stopping = 1;
			pthread_mutex_unlock(&a->lock);
			wake(a);
		}
	}
	/* Leases die with the connection that made them. */
	pthread_mutex_lock(&a->lock);
	while (c->leases) {
		struct lease *l = c->leases;

		c->leases = l->next;
		lease_drop(a, l);
	}
	/*
	 * Pool buffers are marked with the holder's own pid: only a process of
	 * the agent's pid namespace (the pid it says is the one the kernel
	 * gave) can be matched with them.
	 */
	if (a->pool && c->hello_done && c->pid_start && c->hello_pid == (uint32_t)c->pid) {
		if (a->ngone < GONE_MAX)
			a->gone[a->ngone++] = (struct gone){ c->pid, c->pid_start,
							     aeg_now_ns() + GONE_WATCH_MS * 1000000ull };
		else
			aeg_debug("client pid %d: %d exits already watched; its pool buffers stay its own",
				  (int)c->pid, GONE_MAX);
	}
	shutdown(c->fd, SHUT_RDWR);
	c->finished = 1;
	pthread_mutex_unlock(&a->lock);
	wake(a);
	return NULL;
}

static void client_free(struct client *c)
{
	close(c->fd);
	free(c->frame);
	free(c->in);
	free(c->out);
	free(c);
}

/* Put back the pool buffers of client processes that exited since their connection closed. */
static void reclaim_gone(struct agent *a)
{
	uint64_t now = aeg_now_ns();

	pthread_mutex_lock(&a->lock);
	for (int i = 0; i < a->ngone;) {
		struct gone *g = &a->gone[i];
		int connected = 0, drop = 1;
		uint32_t n;

		for (struct client *c = a->clients; c; c = c->next)
			connected |= !c->finished && c->pid == g->pid && c->pid_start == g->start;
		if (connected) {
			/* Still attached through another connection: its buffers are in use. */
		} else if (!aeg_proc_alive(g->pid, g->start)) {
			if (aeg_pool_reclaim(a->pool, g->pid, &n))
				aeg_warn("client pid %d exited: %s", (int)g->pid, aeg_error_detail());
			else if (n > 0)
				aeg_warn("client pid %d exited holding %u pinned pool buffer%s; back in the pool",
					 (int)g->pid, n, n == 1 ? "" : "s");
		} else if (now < g->until_ns) {
			drop = 0;
		}
		if (drop)
			*g = a->gone[--a->ngone];
		else
			i++;
	}
	pthread_mutex_unlock(&a->lock);
}

/* Join the threads of clients that ended. */
static void reap(struct agent *a, int all)
{
	for (;;) {
		struct client *dead = NULL;

		pthread_mutex_lock(&a->lock);
		for (struct client **pp = &a->clients; *pp; pp = &(*pp)->next) {
			if ((*pp)->finished || all) {
				dead = *pp;
				*pp = dead->next;
				a->nclients--;
				break;
			}
		}
		pthread_mutex_unlock(&a->lock);
		if (dead == NULL)
			return;
		pthread_join(dead->thread, NULL);
		client_free(dead);
	}
}

static void accept_one(struct agent *a)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	struct client *c;
	int fd, err, max = a->cfg->max_clients > 0 ? a->cfg->max_clients : AEG_AGENT_MAX_CLIENTS;

	fd = accept4(a->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
			aeg_warn("accept: %s", strerror(errno));
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		aeg_warn("SO_PEERCRED: %s; connection refused", strerror(errno));
		close(fd);
		return;
	}
	if (cred.uid != getuid()) {
		aeg_warn("refused a connection from uid %u (pid %d): only the job user, uid %u, may connect",
			 (unsigned)cred.uid, (int)cred.pid, (unsigned)getuid());
		close(fd);
		return;
	}
	pthread_mutex_lock(&a->lock);
	err = a->nclients >= max;
	pthread_mutex_unlock(&a->lock);
	if (err) {
		aeg_warn("refused a connection from pid %d: %d clients already connected", (int)cred.pid, max);
		close(fd);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL || (c->frame = malloc(PROTO_MAX_FRAME)) == NULL ||
	    (c->in = malloc(sizeof(*c->in))) == NULL || (c->out = malloc(sizeof(*c->out))) == NULL) {
		aeg_warn("connection from pid %d: out of memory", (int)cred.pid);
		goto fail;
	}
	c->a = a;
	c->fd = fd;
	c->pid = cred.pid;
	if (aeg_proc_start_time(cred.pid, &c->pid_start))
		c->pid_start = 0;
	pthread_mutex_lock(&a->lock);
	err = pthread_create(&c->thread, NULL, client_main, c);
	if (!err) {
		c->next = a->clients;
		a->clients = c;
		a->nclients++;
	}
	pthread_mutex_unlock(&a->lock);
	if (err) {
		aeg_warn("connection from pid %d: pthread_create: %s", (int)cred.pid, strerror(err));
		goto fail;
	}
	aeg_debug("client pid %d connected", (int)cred.pid);
	return;
fail:
	if (c) {
		free(c->frame);
		free(c->in);
		free(c->out);
		free(c);
	}
	close(fd);
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
		reap(a, 0);
		reclaim_gone(a);
		pthread_mutex_lock(&a->lock);
		stopping = a->stopping;
		pthread_mutex_unlock(&a->lock);
		if (stopping)
			return;
		if (p[0].revents & POLLIN)
			accept_one(a);
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
	for (struct client *c = a->clients; c; c = c->next)
		shutdown(c->fd, SHUT_RDWR);
	pthread_mutex_unlock(&a->lock);
	reap(a, 1);
	/* The engines cancel their loads, wait for copies and free chunks and load handles. */
	for (int i = 0; i < a->nslabs; i++)
		if (a->slabs[i].pf)
			aeg_prefetch_destroy(a->slabs[i].pf);
	while (a->loads) {
		struct load *l = a->loads;
		a->loads = l->next;
		load_free(l, 0);
	}
	if (a->pool)
		aeg_pool_destroy(a->pool);
	for (int i = 0; i < a->nslabs; i++)
		aeg_slab_destroy(a->slabs[i].slab);
	if (a->dev)
		aeg_device_close(a->dev);
	if (a->wake_fd >= 0)
		close(a->wake_fd);
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

static int start(struct agent *a)
{
	const struct aeg_agent_config *cfg = a->cfg;
	int err;

	err = aeg_device_open(&a->dev, cfg->device);
	if (err) {
		aeg_error_prefix("%s device", aeg_device_kind_name(cfg->device));
		return err;
	}
	if (aeg_topo_live(&a->topo)) {
		aeg_warn("no topology (%s): pool and prefetch threads stay unbound", aeg_error_detail());
		a->topo = NULL;
	}
	err = reserve_slabs(a);
	if (err)
		return err;
	if (cfg->pinned_bytes > cfg->pinned_max_bytes) {
		char want[32], cap[32];

		return aeg_fail(AEG_ERANGE, "pinned pool of %s asked is over this site's limit of %s (pinned_max)",
				aeg_size_format(cfg->pinned_bytes, want, sizeof(want)),
				aeg_size_format(cfg->pinned_max_bytes, cap, sizeof(cap)));
	}
	if (cfg->pinned_bytes) {
		err = aeg_pool_create(a->dev, cfg->gpu_count ? cfg->gpus[0] : 0, cfg->pinned_buffer_bytes,
				      cfg->pinned_bytes, &a->pool);
		if (err) {
			aeg_error_prefix("pinned pool");
			return err;
		}
	}
	err = start_engines(a);
	if (err)
		return err;
	err = listen_socket(a);
	if (err)
		return err;
	/* --prefetch files go to the first GPU's slab, all started before ready. */
	for (int i = 0; i < cfg->prefetch_count; i++) {
		struct load *l;

		if (a->nslabs == 0)
			return aeg_fail(AEG_ENODEV, "--prefetch %s: the job has no GPU to load into",
					cfg->prefetch[i]);
		pthread_mutex_lock(&a->lock);
		err = start_load(a, 0, cfg->prefetch[i], 0, &l);
		pthread_mutex_unlock(&a->lock);
		if (err)
			return err;
	}
	return write_ready(a);
}

AEG_EXPORT int aeg_agent_run(const struct aeg_agent_config *cfg, int stop_fd)
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
	aeg_info("job %s: ready on %s", cfg->job_id, a->sock_path);
	serve(a, stop_fd);
	aeg_info("job %s: shutting down", cfg->job_id);
out:
	teardown(a);
	unlink(a->ready_path);
	unlink(a->pid_path);
	free(a);
	return err;
}

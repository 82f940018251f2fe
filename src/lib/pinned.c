/* The pinned pool: one memfd of fixed buffers with a process-shared free stack in its header. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/topo.h>

#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  /* Linux 5.14 */
#endif

#define POOL_MAGIC "AEGPOOL"    /* and a NUL: 8 bytes */
#define POOL_VERSION 1
#define POOL_PAGE 4096u
#define POOL_MAX_BUFFERS (UINT32_C(1) << 30)
/* Populating runs on up to this many threads, each given at least POPULATE_MIN_BYTES. */
#define POPULATE_THREADS 8
#define POPULATE_MIN_BYTES (256ull << 20)

/*
 * The first pages of the memfd. Every process that attaches works on this
 * header: the mutex and condvar are process-shared and the mutex is robust,
 * so a process that dies holding it does not wedge the others. After it come
 * the free stack (buffers entries) and the owner marks (pid of the acquirer,
 * 0 when free), which are the truth the free stack is rebuilt from.
 */
struct pool_header {
	char magic[8];
	uint32_t version;
	uint32_t buffers;
	uint64_t header_bytes;
	uint64_t buffer_bytes;
	uint64_t pool_bytes;
	int32_t numa_node;
	uint32_t free_count;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint32_t in_use;
	uint32_t high_water;
	uint64_t acquires;
	uint64_t timeouts;
	uint32_t slots[];       /* free stack [buffers], then owner [buffers] */
};

struct aeg_pool {
	aeg_device_t *dev;
	int fd;
	void *map;
	uint64_t map_bytes;
	struct pool_header *hdr;
	char *data;
	uint32_t *stack, *owner;
	int registered;
	struct aeg_pool_timing timing;
};

static uint64_t header_bytes_for(uint32_t buffers)
{
	return aeg_round_up(offsetof(struct pool_header, slots) + 2ull * sizeof(uint32_t) * buffers,
			    POOL_PAGE);
}

/* Rebuild the free stack from the owner marks after a process died holding the lock. */
static void repair(struct aeg_pool *pool)
{
	struct pool_header *h = pool->hdr;
	uint32_t n = 0;

	for (uint32_t i = h->buffers; i-- > 0;)
		if (pool->owner[i] == 0)
			pool->stack[n++] = i;
	h->free_count = n;
	h->in_use = h->buffers - n;
	aeg_warn("pinned pool: a process died holding the pool lock; rebuilt the free list (%" PRIu32 " of %" PRIu32 " buffers in use)",
		 h->in_use, h->buffers);
}

static int check_lock(struct aeg_pool *pool, int r, const char *call)
{
	if (r == 0)
		return 0;
	if (r == EOWNERDEAD) {
		repair(pool);
		pthread_mutex_consistent(&pool->hdr->lock);
		return 0;
	}
	return aeg_fail(AEG_EIO, "pinned pool: %s: %s", call, strerror(r));
}

static int pool_lock(struct aeg_pool *pool)
{
	return check_lock(pool, pthread_mutex_lock(&pool->hdr->lock), "pthread_mutex_lock");
}

static void pool_unlock(struct aeg_pool *pool)
{
	pthread_mutex_unlock(&pool->hdr->lock);
}

static int init_header(struct pool_header *h, uint32_t buffers, uint64_t buffer_bytes, int numa_node)
{
	pthread_mutexattr_t ma;
	pthread_condattr_t ca;
	uint32_t *stack = h->slots;
	int err;

	h->version = POOL_VERSION;
	h->buffers = buffers;
	h->header_bytes = header_bytes_for(buffers);
	h->buffer_bytes = buffer_bytes;
	h->pool_bytes = (uint64_t)buffers * buffer_bytes;
	h->numa_node = numa_node;
	/* Buffer 0 on top: low buffers go out first. */
	for (uint32_t i = 0; i < buffers; i++)
		stack[i] = buffers - 1 - i;
	h->free_count = buffers;

	pthread_mutexattr_init(&ma);
	pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
	pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
	err = pthread_mutex_init(&h->lock, &ma);
	pthread_mutexattr_destroy(&ma);
	if (err != 0)
		return aeg_fail(AEG_EIO, "pinned pool: pthread_mutex_init: %s", strerror(err));
	pthread_condattr_init(&ca);
	pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	err = pthread_cond_init(&h->cond, &ca);
	pthread_condattr_destroy(&ca);
	if (err != 0) {
		pthread_mutex_destroy(&h->lock);
		return aeg_fail(AEG_EIO, "pinned pool: pthread_cond_init: %s", strerror(err));
	}
	/* The magic last: a header is valid once it is there. */
	memcpy(h->magic, POOL_MAGIC, sizeof(h->magic));
	return 0;
}

struct populate_job {
	char *start;
	uint64_t bytes;
	const aeg_topo_t *topo;
	const char *pci;
	int err;                /* errno */
};

static void *populate_main(void *arg)
{
	struct populate_job *job = arg;

	/* Zeroing the pages is the cost: do it from the CPUs next to their node. */
	if (job->topo != NULL)
		aeg_topo_bind_thread(job->topo, job->pci);
	if (madvise(job->start, job->bytes, MADV_POPULATE_WRITE) == 0)
		return NULL;
	if (errno != EINVAL) {
		job->err = errno;
		return NULL;
	}
	/* Kernels before 5.14: fault each page in by writing it. */
	for (uint64_t off = 0; off < job->bytes; off += POOL_PAGE)
		((volatile char *)job->start)[off] = 0;
	return NULL;
}

static int populate(char *start, uint64_t bytes, const aeg_topo_t *topo, const char *pci)
{
	struct populate_job jobs[POPULATE_THREADS];
	pthread_t threads[POPULATE_THREADS];
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	uint64_t n = bytes / POPULATE_MIN_BYTES, piece;
	int started[POPULATE_THREADS], err = 0;

	if (n > POPULATE_THREADS)
		n = POPULATE_THREADS;
	if (cpus > 0 && n > (uint64_t)cpus)
		n = (uint64_t)cpus;
	if (n == 0)
		n = 1;
	piece = aeg_round_up(bytes / n, POOL_PAGE);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t off = i * piece;

		jobs[i] = (struct populate_job){ .start = start + off, .bytes = off + piece > bytes ? bytes - off : piece,
						 .topo = topo, .pci = pci };
	}
	/*
	 * Every piece on a thread of its own, so that binding the populating
	 * threads never moves the caller; a piece whose thread cannot start is
	 * done here, unbound.
	 */
	for (uint64_t i = 0; i < n; i++) {
		started[i] = pthread_create(&threads[i], NULL, populate_main, &jobs[i]) == 0;
		if (!started[i]) {
			jobs[i].topo = NULL;
			populate_main(&jobs[i]);
		}
	}
	for (uint64_t i = 0; i < n; i++)
		if (started[i])
			pthread_join(threads[i], NULL);
	for (uint64_t i = 0; i < n; i++)
		if (jobs[i].err != 0 && err == 0)
			err = jobs[i].err;
	if (err != 0)
		return aeg_fail(AEG_ENOMEM, "pinned pool: populating %" PRIu64 " bytes: %s", bytes, strerror(err));
	return 0;
}

/*
 * Bind [data, +bytes) to the NUMA node(s) of @gpu before the first touch.
 * A GPU without a PCI bus id (host backend without
 * AEGAEON_HOST_PCI_BUS_IDS) or without locality stays unbound (-1).
 */
static int bind_to_gpu(aeg_device_t *dev, int gpu, char *data, uint64_t bytes,
		       aeg_topo_t **topo, char pci[AEG_PCI_BUS_ID_LEN], int *numa_node)
{
	struct aeg_gpu_locality loc;
	struct aeg_gpu_info info;
	int err;

	*numa_node = -1;
	*topo = NULL;
	err = aeg_device_gpu_info(dev, gpu, &info);
	if (err < 0)
		return err;
	if (info.pci_bus_id[0] == '\0')
		return 0;
	snprintf(pci, AEG_PCI_BUS_ID_LEN, "%s", info.pci_bus_id);
	err = aeg_topo_load(topo, NULL);
	if (err < 0) {
		aeg_error_prefix("pinned pool: topology for GPU %d", gpu);
		return err;
	}
	err = aeg_topo_locality(*topo, pci, &loc);
	if (err < 0)
		return err;
	if (!loc.has_locality || loc.numa_count == 0)
		return 0;
	err = aeg_topo_bind_memory(*topo, pci, data, bytes);
	if (err == AEG_ENOTSUP) {
		aeg_warn("pinned pool: cannot bind to the NUMA node of GPU %d (%s): %s; pages go where the kernel puts them",
			 gpu, pci, aeg_error_detail());
		return 0;
	}
	if (err < 0)
		return err;
	*numa_node = loc.numa_nodes[0];
	return 0;
}

static void pool_free(aeg_pool_t *pool)
{
	if (pool->registered)
		aeg_host_unregister(pool->dev, pool->data);
	if (pool->map != NULL)
		munmap(pool->map, pool->map_bytes);
	if (pool->fd >= 0)
		close(pool->fd);
	free(pool);
}

static aeg_pool_t *pool_new(aeg_device_t *dev)
{
	aeg_pool_t *pool = calloc(1, sizeof(*pool));

	if (pool == NULL)
		return NULL;
	pool->dev = dev;
	pool->fd = -1;
	return pool;
}

static void pool_layout(aeg_pool_t *pool)
{
	struct pool_header *h = pool->map;

	pool->hdr = h;
	pool->stack = h->slots;
	pool->owner = h->slots + h->buffers;
	pool->data = (char *)pool->map + h->header_bytes;
}

AEG_EXPORT int aeg_pool_create(aeg_device_t *dev, int gpu, uint64_t buffer_bytes,
			       uint64_t pool_bytes, aeg_pool_t **poolp)
{
	char pci[AEG_PCI_BUS_ID_LEN] = "";
	uint64_t t0 = aeg_now_ns(), t, buffers, header, data_bytes, avail;
	aeg_topo_t *topo = NULL;
	aeg_pool_t *pool;
	int numa_node, err;

	if (dev == NULL || poolp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_create: NULL argument");
	*poolp = NULL;
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	if (buffer_bytes == 0)
		return aeg_fail(AEG_EINVAL, "pinned pool: buffer size 0");
	if (buffer_bytes % POOL_PAGE != 0)
		return aeg_fail(AEG_EINVAL, "pinned pool: buffer size %" PRIu64 " is not a multiple of %u",
				buffer_bytes, POOL_PAGE);
	if (pool_bytes == 0)
		return aeg_fail(AEG_EINVAL, "pinned pool: pool size 0");
	if (buffer_bytes > pool_bytes)
		return aeg_fail(AEG_EINVAL, "pinned pool: buffer size %" PRIu64 " is larger than the pool (%" PRIu64 " bytes)",
				buffer_bytes, pool_bytes);
	buffers = pool_bytes / buffer_bytes;
	if (buffers > POOL_MAX_BUFFERS)
		return aeg_fail(AEG_EINVAL, "pinned pool: %" PRIu64 " buffers of %" PRIu64 " bytes; at most %" PRIu32 " (use larger buffers)",
				buffers, buffer_bytes, POOL_MAX_BUFFERS);
	header = header_bytes_for((uint32_t)buffers);
	data_bytes = buffers * buffer_bytes;
	err = aeg_mem_available(&avail);
	if (err < 0)
		return err;
	if (header + data_bytes > avail)
		return aeg_fail(AEG_ENOMEM, "pinned pool: %" PRIu64 " bytes asked, only %" PRIu64 " available (MemAvailable)",
				header + data_bytes, avail);

	pool = pool_new(dev);
	if (pool == NULL)
		return aeg_fail(AEG_ENOMEM, "pinned pool: out of memory");
	pool->fd = memfd_create("aegaeon-pool", MFD_CLOEXEC);
	if (pool->fd < 0) {
		err = aeg_fail(AEG_EIO, "pinned pool: memfd_create: %s", strerror(errno));
		goto fail;
	}
	if (ftruncate(pool->fd, (off_t)(header + data_bytes)) < 0) {
		err = aeg_fail(AEG_ENOMEM, "pinned pool: ftruncate to %" PRIu64 " bytes: %s",
			       header + data_bytes, strerror(errno));
		goto fail;
	}
	pool->map_bytes = header + data_bytes;
	pool->map = mmap(NULL, pool->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, pool->fd, 0);
	if (pool->map == MAP_FAILED) {
		pool->map = NULL;
		err = aeg_fail(AEG_ENOMEM, "pinned pool: mmap of %" PRIu64 " bytes: %s",
			       pool->map_bytes, strerror(errno));
		goto fail;
	}

	t = aeg_now_ns();
	err = bind_to_gpu(dev, gpu, (char *)pool->map + header, data_bytes, &topo, pci, &numa_node);
	if (err < 0)
		goto fail;
	pool->timing.bind_ns = aeg_now_ns() - t;

	t = aeg_now_ns();
	err = populate(pool->map, pool->map_bytes, numa_node >= 0 ? topo : NULL, pci);
	if (err < 0)
		goto fail;
	pool->timing.populate_ns = aeg_now_ns() - t;

	((struct pool_header *)pool->map)->buffers = (uint32_t)buffers;
	((struct pool_header *)pool->map)->header_bytes = header;
	pool_layout(pool);
	err = init_header(pool->hdr, (uint32_t)buffers, buffer_bytes, numa_node);
	if (err < 0)
		goto fail;

	t = aeg_now_ns();
	err = aeg_host_register(dev, pool->data, data_bytes, 0);
	if (err < 0) {
		aeg_error_prefix("pinned pool of %" PRIu64 " bytes", data_bytes);
		goto fail;
	}
	pool->registered = 1;
	pool->timing.register_ns = aeg_now_ns() - t;
	pool->timing.total_ns = aeg_now_ns() - t0;
	aeg_topo_destroy(topo);
	aeg_debug("pinned pool: %" PRIu64 " buffers of %" PRIu64 " bytes on NUMA node %d in %.1f ms",
		  buffers, buffer_bytes, numa_node, pool->timing.total_ns / 1e6);
	*poolp = pool;
	return 0;
fail:
	aeg_topo_destroy(topo);
	pool_free(pool);
	return err;
}

AEG_EXPORT int aeg_pool_attach(aeg_device_t *dev, int fd, aeg_pool_t **poolp)
{
	struct pool_header *h;
	aeg_pool_t *pool;
	struct stat st;
	uint64_t header = 0, buffer_bytes = 0, pool_bytes = 0;
	uint32_t buffers = 0;
	int valid, err;

	if (dev == NULL || poolp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_attach: NULL argument");
	*poolp = NULL;
	if (fd < 0 || fstat(fd, &st) < 0)
		return aeg_fail(AEG_EBADF, "pinned pool: descriptor %d: %s", fd,
				fd < 0 ? "negative" : strerror(errno));
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < POOL_PAGE)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d is not an aegaeon pool (%s of %lld bytes)",
				fd, S_ISREG(st.st_mode) ? "a file" : "not a file", (long long)st.st_size);
	h = mmap(NULL, POOL_PAGE, PROT_READ, MAP_SHARED, fd, 0);
	if (h == MAP_FAILED)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d cannot be mapped: %s", fd, strerror(errno));
	valid = memcmp(h->magic, POOL_MAGIC, sizeof(h->magic)) == 0 && h->version == POOL_VERSION;
	if (valid) {
		header = h->header_bytes;
		buffers = h->buffers;
		buffer_bytes = h->buffer_bytes;
		pool_bytes = h->pool_bytes;
	}
	munmap(h, POOL_PAGE);
	if (!valid)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d is not an aegaeon pool (no pool header, or another version)",
				fd);
	if (buffers == 0 || buffers > POOL_MAX_BUFFERS || buffer_bytes == 0 ||
	    buffer_bytes % POOL_PAGE != 0 || header != header_bytes_for(buffers) ||
	    pool_bytes != (uint64_t)buffers * buffer_bytes || header + pool_bytes != (uint64_t)st.st_size)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d has a corrupt header (%" PRIu32 " buffers of %" PRIu64 " bytes, header %" PRIu64 ", file %lld bytes)",
				fd, buffers, buffer_bytes, header, (long long)st.st_size);

	pool = pool_new(dev);
	if (pool == NULL)
		return aeg_fail(AEG_ENOMEM, "pinned pool: out of memory");
	pool->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (pool->fd < 0) {
		err = aeg_fail(AEG_EBADF, "pinned pool: dup of descriptor %d: %s", fd, strerror(errno));
		goto fail;
	}
	pool->map_bytes = header + pool_bytes;
	pool->map = mmap(NULL, pool->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, pool->fd, 0);
	if (pool->map == MAP_FAILED) {
		pool->map = NULL;
		err = aeg_fail(AEG_ENOMEM, "pinned pool: mmap of %" PRIu64 " bytes: %s",
			       pool->map_bytes, strerror(errno));
		goto fail;
	}
	pool_layout(pool);
	err = aeg_host_register(dev, pool->data, pool_bytes, 0);
	if (err < 0) {
		aeg_error_prefix("attaching a pinned pool of %" PRIu64 " bytes", pool_bytes);
		goto fail;
	}
	pool->registered = 1;
	*poolp = pool;
	return 0;
fail:
	pool_free(pool);
	return err;
}

AEG_EXPORT void aeg_pool_destroy(aeg_pool_t *pool)
{
	if (pool != NULL)
		pool_free(pool);
}

AEG_EXPORT int aeg_pool_acquire(aeg_pool_t *pool, int timeout_ms, struct aeg_pool_buffer *buf)
{
	struct pool_header *h;
	struct timespec deadline;
	uint32_t index;
	int err;

	if (pool == NULL || buf == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_acquire: NULL argument");
	h = pool->hdr;
	if (timeout_ms > 0) {
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += timeout_ms / 1000;
		deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
		if (deadline.tv_nsec >= 1000000000L) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000L;
		}
	}
	err = pool_lock(pool);
	if (err < 0)
		return err;
	while (h->free_count == 0) {
		int r;

		if (timeout_ms == 0)
			goto timeout;
		if (timeout_ms < 0)
			r = pthread_cond_wait(&h->cond, &h->lock);
		else
			r = pthread_cond_timedwait(&h->cond, &h->lock, &deadline);
		if (r == ETIMEDOUT) {
			if (h->free_count == 0)
				goto timeout;
			break;
		}
		err = check_lock(pool, r, "pthread_cond_wait");
		if (err < 0)
			goto out;
	}
	index = pool->stack[--h->free_count];
	pool->owner[index] = (uint32_t)getpid();
	h->in_use++;
	if (h->in_use > h->high_water)
		h->high_water = h->in_use;
	h->acquires++;
	buf->index = index;
	buf->ptr = pool->data + (uint64_t)index * h->buffer_bytes;
	buf->bytes = h->buffer_bytes;
	err = 0;
	goto out;
timeout:
	h->timeouts++;
	err = aeg_fail(AEG_ETIMEDOUT, "pinned pool: no buffer came free in %d ms (all %" PRIu32 " buffers of %" PRIu64 " bytes in use)",
		       timeout_ms, h->buffers, h->buffer_bytes);
out:
	pool_unlock(pool);
	return err;
}

AEG_EXPORT int aeg_pool_release(aeg_pool_t *pool, uint32_t index)
{
	struct pool_header *h;
	int err;

	if (pool == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_release: NULL pool");
	h = pool->hdr;
	if (index >= h->buffers)
		return aeg_fail(AEG_EINVAL, "pinned pool: buffer %" PRIu32 " does not exist (the pool has %" PRIu32 ")",
				index, h->buffers);
	err = pool_lock(pool);
	if (err < 0)
		return err;
	if (pool->owner[index] == 0) {
		err = aeg_fail(AEG_EINVAL, "pinned pool: buffer %" PRIu32 " is not acquired (released twice?)", index);
		goto out;
	}
	pool->owner[index] = 0;
	pool->stack[h->free_count++] = index;
	h->in_use--;
	/*
	 * Broadcast, not signal: a waiter that died blocked in the condvar can
	 * swallow a signal meant for a live one; waiters re-check anyway.
	 */
	pthread_cond_broadcast(&h->cond);
out:
	pool_unlock(pool);
	return err;
}

AEG_EXPORT void *aeg_pool_buffer_ptr(aeg_pool_t *pool, uint32_t index)
{
	if (pool == NULL || index >= pool->hdr->buffers)
		return NULL;
	return pool->data + (uint64_t)index * pool->hdr->buffer_bytes;
}

AEG_EXPORT int aeg_pool_stats(aeg_pool_t *pool, struct aeg_pool_stats *stats)
{
	struct pool_header *h;
	int err;

	if (pool == NULL || stats == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_stats: NULL argument");
	h = pool->hdr;
	err = pool_lock(pool);
	if (err < 0)
		return err;
	stats->buffer_bytes = h->buffer_bytes;
	stats->pool_bytes = h->pool_bytes;
	stats->buffers = h->buffers;
	stats->in_use = h->in_use;
	stats->high_water = h->high_water;
	stats->acquires = h->acquires;
	stats->timeouts = h->timeouts;
	stats->numa_node = h->numa_node;
	pool_unlock(pool);
	return 0;
}

AEG_EXPORT int aeg_pool_fd(const aeg_pool_t *pool)
{
	return pool != NULL ? pool->fd : AEG_EINVAL;
}

AEG_EXPORT void *aeg_pool_base(const aeg_pool_t *pool)
{
	return pool != NULL ? pool->data : NULL;
}

void aeg_pool_timing(const aeg_pool_t *pool, struct aeg_pool_timing *timing)
{
	*timing = pool->timing;
}

pthread_mutex_t *aeg_pool_mutex(aeg_pool_t *pool)
{
	return &pool->hdr->lock;
}

/* The pinned pool: one memfd of fixed buffers with a process-shared free stack in its header. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <aegaeon/topo.h>

#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"
#include "topo_internal.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  /* Linux 5.14 */
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004u     /* Linux 4.14 */
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21u << 26)
#endif
#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

#define POOL_MAGIC "AEGPOOL"    /* and a NUL: 8 bytes */
#define POOL_VERSION 1
#define POOL_PAGE 4096u
#define HUGE_PAGE (UINT64_C(2) << 20)
#define HUGE_SYSFS "/sys/kernel/mm/hugepages/hugepages-2048kB"
#define NODE_HUGE_SYSFS "/sys/devices/system/node/node%d/hugepages/hugepages-2048kB"
#define POOL_MAX_BUFFERS (UINT32_C(1) << 30)
/*
 * Populating runs on up to this many threads (and no more than the CPUs
 * next to the GPU), each given at least POPULATE_MIN_BYTES. Measured on the
 * H100 machine (16 cores, 4 GiB): 4 threads were the fastest, for 4 KiB
 * pages (~220 ms/GiB; 2 threads ~350, 8 and 16 threads ~230-260) as for
 * 2 MiB pages (~50-57 ms/GiB; 2 threads ~85-95, 8 and 16 threads ~95-135):
 * past 4, the threads contend more than they zero.
 */
#define POPULATE_THREADS 4
#define POPULATE_MIN_BYTES (64ull << 20)

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

/* The header fills whole pages of its own, so buffers start on a page. */
static uint64_t header_bytes_for(uint32_t buffers, uint64_t page)
{
	return aeg_round_up(offsetof(struct pool_header, slots) + 2ull * sizeof(uint32_t) * buffers, page);
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

static int init_header(struct pool_header *h, uint32_t buffers, uint64_t header_bytes, uint64_t buffer_bytes,
		       int numa_node)
{
	pthread_mutexattr_t ma;
	pthread_condattr_t ca;
	uint32_t *stack = h->slots;
	int err;

	h->version = POOL_VERSION;
	h->buffers = buffers;
	h->header_bytes = header_bytes;
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

/* Where a pool goes: the GPU's PCI bus id and, when the topology knows them, its NUMA nodes. */
struct place {
	const aeg_topo_t *topo;         /* NULL: the GPU has no PCI bus id */
	char pci[AEG_PCI_BUS_ID_LEN];
	struct aeg_gpu_locality loc;
	int numa_node;                  /* the pages are bound to it; -1: not bound */
};

/*
 * A GPU without a PCI bus id (host backend without AEGAEON_HOST_PCI_BUS_IDS)
 * has no place. The topology is the process' cached one, so only the first
 * pool of a process pays for hwloc's discovery.
 */
static int locate(aeg_device_t *dev, int gpu, struct place *pl)
{
	struct aeg_gpu_info info;
	int err;

	memset(pl, 0, sizeof(*pl));
	pl->numa_node = -1;
	err = aeg_device_gpu_info(dev, gpu, &info);
	if (err < 0)
		return err;
	if (info.pci_bus_id[0] == '\0')
		return 0;
	snprintf(pl->pci, sizeof(pl->pci), "%s", info.pci_bus_id);
	err = aeg_topo_live(&pl->topo);
	if (err < 0) {
		aeg_error_prefix("pinned pool: topology for GPU %d", gpu);
		return err;
	}
	return aeg_topo_locality(pl->topo, pl->pci, &pl->loc);
}

static int has_nodes(const struct place *pl)
{
	return pl->topo != NULL && pl->loc.has_locality && pl->loc.numa_count > 0;
}

/* Bind [data, +bytes) to the GPU's NUMA node(s) before the first touch. */
static int bind(struct place *pl, int gpu, char *data, uint64_t bytes)
{
	int err;

	pl->numa_node = -1;
	if (!has_nodes(pl))
		return 0;
	err = aeg_topo_bind_memory(pl->topo, pl->pci, data, bytes);
	if (err == AEG_ENOTSUP) {
		aeg_warn("pinned pool: cannot bind to the NUMA node of GPU %d (%s): %s; pages go where the kernel puts them",
			 gpu, pl->pci, aeg_error_detail());
		return 0;
	}
	if (err < 0)
		return err;
	pl->numa_node = pl->loc.numa_nodes[0];
	return 0;
}

enum huge_mode { HUGE_AUTO, HUGE_NEVER, HUGE_ALWAYS };

static int huge_mode(enum huge_mode *mode)
{
	const char *v = getenv("AEGAEON_PINNED_HUGEPAGES");

	if (v == NULL || *v == '\0' || strcmp(v, "auto") == 0)
		*mode = HUGE_AUTO;
	else if (strcmp(v, "never") == 0)
		*mode = HUGE_NEVER;
	else if (strcmp(v, "always") == 0)
		*mode = HUGE_ALWAYS;
	else
		return aeg_fail(AEG_EINVAL, "pinned pool: AEGAEON_PINNED_HUGEPAGES='%s' is not auto, never or always", v);
	return 0;
}

/* A count from sysfs; -1 when the file is missing or holds no number. */
static long read_count(const char *path)
{
	FILE *f = fopen(path, "re");
	long v = -1;

	if (f == NULL)
		return -1;
	if (fscanf(f, "%ld", &v) != 1 || v < 0)
		v = -1;
	fclose(f);
	return v;
}

/* Free 2 MiB huge pages on the GPU's nodes, -1 when the kernel does not say. */
static long node_free_huge(const struct place *pl)
{
	char path[128];
	long sum = 0;

	for (int i = 0; i < pl->loc.numa_count; i++) {
		long n;

		snprintf(path, sizeof(path), NODE_HUGE_SYSFS "/free_hugepages", pl->loc.numa_nodes[i]);
		n = read_count(path);
		if (n < 0)
			return -1;
		sum += n;
	}
	return sum;
}

/*
 * The page size of a new pool: 2 MiB hugetlb pages when the mode allows it,
 * the buffers are whole huge pages and the admin reserved enough of them
 * (on the GPU's node, in "auto"), else 4 KiB pages.
 */
static int choose_page(enum huge_mode mode, uint64_t buffer_bytes, uint64_t buffers,
		       const struct place *pl, uint64_t *page)
{
	long total, free_pages, resv, avail, node_free;
	uint64_t need;

	*page = POOL_PAGE;
	if (mode == HUGE_NEVER)
		return 0;
	if (buffer_bytes % HUGE_PAGE != 0) {
		if (mode == HUGE_ALWAYS)
			return aeg_fail(AEG_EINVAL, "pinned pool: AEGAEON_PINNED_HUGEPAGES=always, but the buffer size %" PRIu64 " is not a multiple of 2 MiB, the huge page size",
					buffer_bytes);
		aeg_debug("pinned pool: buffer size %" PRIu64 " is not a multiple of 2 MiB; using 4 KiB pages", buffer_bytes);
		return 0;
	}
	need = (header_bytes_for((uint32_t)buffers, HUGE_PAGE) + buffers * buffer_bytes) / HUGE_PAGE;
	total = read_count(HUGE_SYSFS "/nr_hugepages");
	free_pages = read_count(HUGE_SYSFS "/free_hugepages");
	resv = read_count(HUGE_SYSFS "/resv_hugepages");
	if (total < 0 || free_pages < 0 || resv < 0) {
		if (mode == HUGE_ALWAYS)
			return aeg_fail(AEG_ENOTSUP, "pinned pool: AEGAEON_PINNED_HUGEPAGES=always, but this kernel offers no 2 MiB huge pages (%s cannot be read)",
					HUGE_SYSFS);
		return 0;
	}
	/* Free pages already promised to other mappings (HugePages_Rsvd) are not ours. */
	avail = free_pages > resv ? free_pages - resv : 0;
	if ((uint64_t)avail < need) {
		if (mode == HUGE_ALWAYS)
			return aeg_fail(AEG_ENOMEM, "pinned pool: AEGAEON_PINNED_HUGEPAGES=always: %" PRIu64 " huge pages of 2 MiB needed, %ld free (%ld reserved in all); %" PRIu64 " short: reserve more as root with `sysctl vm.nr_hugepages=%" PRIu64 "`",
					need, avail, total, need - (uint64_t)avail, (uint64_t)total + need - (uint64_t)avail);
		aeg_log(total > 0 ? AEG_LOG_INFO : AEG_LOG_DEBUG,
			"pinned pool: %" PRIu64 " huge pages of 2 MiB would be needed, %ld are free; using 4 KiB pages",
			need, avail);
		return 0;
	}
	node_free = has_nodes(pl) ? node_free_huge(pl) : -1;
	if (node_free >= 0 && (uint64_t)node_free < need) {
		if (mode == HUGE_AUTO) {
			aeg_info("pinned pool: %" PRIu64 " huge pages of 2 MiB needed on NUMA node %d, next to GPU %s, which has %ld free; using 4 KiB pages there (reserve them on that node with `echo N > " NODE_HUGE_SYSFS "/nr_hugepages`)",
				 need, pl->loc.numa_nodes[0], pl->pci, node_free, pl->loc.numa_nodes[0]);
			return 0;
		}
		aeg_warn("pinned pool: only %ld of the %" PRIu64 " huge pages needed are free on NUMA node %d, next to GPU %s; the others come from other nodes",
			 node_free, need, pl->loc.numa_nodes[0], pl->pci);
	}
	*page = HUGE_PAGE;
	return 0;
}

struct populate_job {
	char *start;
	uint64_t bytes;
	const struct place *pl;         /* bind the thread next to the pages; NULL: don't */
	int err;                        /* errno */
};

static void *populate_main(void *arg)
{
	struct populate_job *job = arg;

	/* Zeroing the pages is the cost: do it from the CPUs next to their node. */
	if (job->pl != NULL)
		aeg_topo_bind_thread(job->pl->topo, job->pl->pci);
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

/*
 * Threads for populating @bytes: the CPUs next to the GPU's node when the
 * pages are bound there, else those this process may run on, at most
 * POPULATE_THREADS and each with POPULATE_MIN_BYTES or more.
 */
static unsigned populate_threads(uint64_t bytes, const struct place *pl)
{
	uint64_t n = bytes / POPULATE_MIN_BYTES;
	long cpus = -1;
	cpu_set_t set;

	if (pl->numa_node >= 0)
		cpus = aeg_topo_cpu_count(pl->topo, pl->pci);
	if (cpus <= 0 && sched_getaffinity(0, sizeof(set), &set) == 0)
		cpus = CPU_COUNT(&set);
	if (cpus > 0 && n > (uint64_t)cpus)
		n = (uint64_t)cpus;
	if (n > POPULATE_THREADS)
		n = POPULATE_THREADS;
	return n == 0 ? 1 : (unsigned)n;
}

/* Fault every page of [start, +bytes) in; pieces are whole @page pages. */
static int populate(char *start, uint64_t bytes, uint64_t page, const struct place *pl, unsigned *threads)
{
	struct populate_job jobs[POPULATE_THREADS];
	pthread_t tids[POPULATE_THREADS];
	unsigned n = populate_threads(bytes, pl), used = 0;
	uint64_t piece = aeg_round_up((bytes + n - 1) / n, page);
	int started[POPULATE_THREADS], err = 0;

	for (uint64_t off = 0; off < bytes; off += piece)
		jobs[used++] = (struct populate_job){ .start = start + off, .bytes = off + piece > bytes ? bytes - off : piece,
						      .pl = pl->numa_node >= 0 ? pl : NULL };
	/*
	 * Every piece on a thread of its own, so that binding the populating
	 * threads never moves the caller; a piece whose thread cannot start is
	 * done here, unbound.
	 */
	for (unsigned i = 0; i < used; i++) {
		started[i] = pthread_create(&tids[i], NULL, populate_main, &jobs[i]) == 0;
		if (!started[i]) {
			jobs[i].pl = NULL;
			populate_main(&jobs[i]);
		}
	}
	for (unsigned i = 0; i < used; i++)
		if (started[i])
			pthread_join(tids[i], NULL);
	for (unsigned i = 0; i < used; i++)
		if (jobs[i].err != 0 && err == 0)
			err = jobs[i].err;
	*threads = used;
	if (err != 0)
		return aeg_fail(AEG_ENOMEM, "pinned pool: populating %" PRIu64 " bytes in %s pages: %s", bytes,
				page == HUGE_PAGE ? "2 MiB huge" : "4 KiB", strerror(err));
	return 0;
}

static void unmap(aeg_pool_t *pool)
{
	if (pool->map != NULL)
		munmap(pool->map, pool->map_bytes);
	pool->map = NULL;
	if (pool->fd >= 0)
		close(pool->fd);
	pool->fd = -1;
}

static void pool_free(aeg_pool_t *pool)
{
	if (pool->registered)
		aeg_host_unregister(pool->dev, pool->data);
	unmap(pool);
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

/* The memfd of @page pages holding @header + @data_bytes, mapped, bound and populated. */
static int provision(aeg_pool_t *pool, uint64_t page, uint64_t header, uint64_t data_bytes,
		     struct place *pl, int gpu)
{
	const char *kind = page == HUGE_PAGE ? " in 2 MiB huge pages" : "";
	uint64_t t;
	int err;

	pool->timing.page_bytes = page;
	pool->fd = memfd_create("aegaeon-pool", MFD_CLOEXEC | (page == HUGE_PAGE ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
	if (pool->fd < 0)
		return aeg_fail(AEG_EIO, "pinned pool: memfd_create%s: %s", kind, strerror(errno));
	if (ftruncate(pool->fd, (off_t)(header + data_bytes)) < 0)
		return aeg_fail(AEG_ENOMEM, "pinned pool: ftruncate to %" PRIu64 " bytes%s: %s",
				header + data_bytes, kind, strerror(errno));
	pool->map_bytes = header + data_bytes;
	/* A hugetlb mapping takes its pages from the reserve here, or fails. */
	pool->map = mmap(NULL, pool->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, pool->fd, 0);
	if (pool->map == MAP_FAILED) {
		pool->map = NULL;
		return aeg_fail(AEG_ENOMEM, "pinned pool: mmap of %" PRIu64 " bytes%s: %s",
				pool->map_bytes, kind, strerror(errno));
	}

	t = aeg_now_ns();
	err = bind(pl, gpu, (char *)pool->map + header, data_bytes);
	pool->timing.bind_ns += aeg_now_ns() - t;
	if (err < 0)
		return err;

	t = aeg_now_ns();
	err = populate(pool->map, pool->map_bytes, page, pl, &pool->timing.threads);
	pool->timing.populate_ns = aeg_now_ns() - t;
	return err;
}

AEG_EXPORT int aeg_pool_create(aeg_device_t *dev, int gpu, uint64_t buffer_bytes,
			       uint64_t pool_bytes, aeg_pool_t **poolp)
{
	uint64_t t0 = aeg_now_ns(), t, buffers, header, data_bytes, avail, page;
	enum huge_mode mode = HUGE_AUTO;
	aeg_pool_t *pool;
	struct place pl;
	int err;

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
	data_bytes = buffers * buffer_bytes;
	err = huge_mode(&mode);
	if (err < 0)
		return err;

	pool = pool_new(dev);
	if (pool == NULL)
		return aeg_fail(AEG_ENOMEM, "pinned pool: out of memory");
	t = aeg_now_ns();
	err = locate(dev, gpu, &pl);
	pool->timing.bind_ns = aeg_now_ns() - t;
	if (err < 0)
		goto fail;
	err = choose_page(mode, buffer_bytes, buffers, &pl, &page);
	if (err < 0)
		goto fail;
	for (;;) {
		header = header_bytes_for((uint32_t)buffers, page);
		/* Reserved huge pages are not part of MemAvailable; choose_page counted them. */
		if (page == POOL_PAGE) {
			err = aeg_mem_available(&avail);
			if (err < 0)
				goto fail;
			if (header + data_bytes > avail) {
				err = aeg_fail(AEG_ENOMEM, "pinned pool: %" PRIu64 " bytes asked, only %" PRIu64 " available (MemAvailable)",
					       header + data_bytes, avail);
				goto fail;
			}
		}
		err = provision(pool, page, header, data_bytes, &pl, gpu);
		if (err == 0)
			break;
		/* "auto" promised huge pages only while they last: another process may have taken them. */
		if (page == POOL_PAGE || mode == HUGE_ALWAYS)
			goto fail;
		aeg_info("pinned pool: 2 MiB huge pages could not be had (%s); using 4 KiB pages", aeg_error_detail());
		unmap(pool);
		page = POOL_PAGE;
	}

	((struct pool_header *)pool->map)->buffers = (uint32_t)buffers;
	((struct pool_header *)pool->map)->header_bytes = header;
	pool_layout(pool);
	err = init_header(pool->hdr, (uint32_t)buffers, header, buffer_bytes, pl.numa_node);
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
	aeg_debug("pinned pool: %" PRIu64 " buffers of %" PRIu64 " bytes in %s pages on NUMA node %d in %.1f ms (bind %.1f, populate %.1f on %u threads, register %.1f)",
		  buffers, buffer_bytes, page == HUGE_PAGE ? "2 MiB" : "4 KiB", pl.numa_node,
		  pool->timing.total_ns / 1e6, pool->timing.bind_ns / 1e6, pool->timing.populate_ns / 1e6,
		  pool->timing.threads, pool->timing.register_ns / 1e6);
	*poolp = pool;
	return 0;
fail:
	pool_free(pool);
	return err;
}

/* The page size of the file behind @fd: a hugetlb memfd maps in huge pages only. */
static uint64_t fd_page_bytes(int fd)
{
	struct statfs sfs;

	if (fstatfs(fd, &sfs) == 0 && (unsigned long)sfs.f_type == HUGETLBFS_MAGIC && sfs.f_bsize > 0)
		return (uint64_t)sfs.f_bsize;
	return POOL_PAGE;
}

AEG_EXPORT int aeg_pool_attach(aeg_device_t *dev, int fd, aeg_pool_t **poolp)
{
	struct pool_header *h;
	aeg_pool_t *pool;
	struct stat st;
	uint64_t header = 0, buffer_bytes = 0, pool_bytes = 0, page;
	uint32_t buffers = 0;
	int valid, err;

	if (dev == NULL || poolp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_attach: NULL argument");
	*poolp = NULL;
	if (fd < 0 || fstat(fd, &st) < 0)
		return aeg_fail(AEG_EBADF, "pinned pool: descriptor %d: %s", fd,
				fd < 0 ? "negative" : strerror(errno));
	page = fd_page_bytes(fd);
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < page)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d is not an aegaeon pool (%s of %lld bytes)",
				fd, S_ISREG(st.st_mode) ? "a file" : "not a file", (long long)st.st_size);
	/* Whole pages: unmapping part of a hugetlb mapping fails. */
	h = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, 0);
	if (h == MAP_FAILED)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d cannot be mapped: %s", fd, strerror(errno));
	valid = memcmp(h->magic, POOL_MAGIC, sizeof(h->magic)) == 0 && h->version == POOL_VERSION;
	if (valid) {
		header = h->header_bytes;
		buffers = h->buffers;
		buffer_bytes = h->buffer_bytes;
		pool_bytes = h->pool_bytes;
	}
	munmap(h, page);
	if (!valid)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d is not an aegaeon pool (no pool header, or another version)",
				fd);
	if (buffers == 0 || buffers > POOL_MAX_BUFFERS || buffer_bytes == 0 ||
	    buffer_bytes % page != 0 || header != header_bytes_for(buffers, page) ||
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
	pool->timing.page_bytes = page;
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

int aeg_pool_reclaim(aeg_pool_t *pool, pid_t pid, uint32_t *reclaimed)
{
	struct pool_header *h;
	uint32_t n = 0;
	int err;

	*reclaimed = 0;
	if (pool == NULL || pid <= 0)
		return aeg_fail(AEG_EINVAL, "aeg_pool_reclaim: no pool or pid %d", (int)pid);
	h = pool->hdr;
	err = pool_lock(pool);
	if (err < 0)
		return err;
	for (uint32_t i = 0; i < h->buffers; i++) {
		if (pool->owner[i] != (uint32_t)pid)
			continue;
		pool->owner[i] = 0;
		pool->stack[h->free_count++] = i;
		h->in_use--;
		n++;
	}
	if (n > 0)
		pthread_cond_broadcast(&h->cond);
	pool_unlock(pool);
	*reclaimed = n;
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

/* The pinned pool: one memfd of fixed buffers, with a lock-free free list in its header (pinned_list.c). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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
#define POOL_VERSION 2          /* 1 had a pthread mutex and condvar in the header */
#define POOL_PAGE 4096u
#define HUGE_PAGE (UINT64_C(2) << 20)
#define HUGE_SYSFS "/sys/kernel/mm/hugepages/hugepages-2048kB"
#define NODE_HUGE_SYSFS "/sys/devices/system/node/node%d/hugepages/hugepages-2048kB"
#define POOL_MAX_BUFFERS (UINT32_C(1) << 30)
/*
 * Populating runs on up to this many threads (and no more than the CPUs
 * next to the GPU), each given at least POPULATE_MIN_BYTES, taking pieces
 * of POPULATE_UNIT in order. Measured on the H200 machine (16 cores, 4 GiB
 * of 2 MiB pages, bench/pool_probe): 2 threads populate in 117 ms/GiB, 4 in
 * 63, 6 in 54, 8 in 50, 12 in 54 and 16 in 69: past 8 the threads contend
 * more than they zero. (The H100 machine had its best at 4.)
 */
#define POPULATE_THREADS 8
/*
 * Shared memory in 4 KiB pages gains nothing past 4 threads (4: 249 ms/GiB,
 * 8: 271 on the H200): the page cache of the one memfd is what they contend
 * for. Past that they only take CPUs from what runs beside a pool made after
 * a job's start (its steps, whose own page faults then wait too).
 */
#define POPULATE_THREADS_SHARED_SMALL 4
/* 32 MiB: a prefetch engine's 96 MiB staging ring is populated on 3 threads. */
#define POPULATE_MIN_BYTES (32ull << 20)
#define POPULATE_UNIT (32ull << 20)
#define POPULATE_STEP (4ull << 20)      /* populated per call: whole 2 MiB pages, about 0.5 ms */
/*
 * An early pool (aeg_pool_create_private_early) is populated in units of a
 * step, so that its first buffers are in after a step's time, not after a
 * whole 32 MiB unit's (7-8 ms on the H200 machine for a staging ring of 24 x
 * 4 MiB, during which a fresh process's first load moved nothing).
 */
#define POPULATE_UNIT_EARLY POPULATE_STEP
/*
 * A pool made in the background beside the process's loads (the agent's,
 * aeg_pool_create_stoppable) starts no unit while a load runs, for up to
 * this long in all: on the H200 machine an agent's job-start load of 8 GiB,
 * registering pieces of the page cache while 8 threads populated its 24 GiB
 * pool, ran at 23.6 GB/s for its first 2 GiB, before the population began,
 * and at 3.5 GB/s beside it (2.4 s in all). The pool comes that much later.
 */
#define POPULATE_YIELD_MAX_NS (2000ull * 1000000)
/*
 * The buffers are registered in pieces of whole buffers, at least this
 * big, each as soon as it is populated: registration (29 ms/GiB of 2 MiB
 * pages on the H200) then runs beside population instead of after it, and
 * adds 2.6 ms/GiB at the end instead of 29 (bench/pool_probe). While a
 * load runs in the process, the pieces wait until every page is in
 * (aeg_loads_active): a load's own registrations would wait behind them. A
 * buffer is always inside one registration; the pieces lie end to end, so
 * the device's view of the whole area is contiguous too.
 */
#define REGISTER_PIECE (64ull << 20)

_Static_assert(offsetof(struct aeg_pool_header, head) % 8 == 0, "the free stack head is one 64-bit atomic word");

struct aeg_pool {
	aeg_device_t *dev;
	int fd;                         /* -1 for a private pool */
	int private_pool;               /* anonymous memory of this process, shared with no one */
	void *map;
	uint64_t map_bytes;
	char *data;
	/* The geometry, this process's own: never read back from the shared header. */
	uint64_t buffer_bytes, pool_bytes;
	int numa_node;
	struct aeg_pool_list list;
	uint64_t reg_piece;             /* the buffers are registered in pieces of this many bytes */
	uint32_t reg_pieces;            /* registered so far, from the first buffer on */
	struct aeg_pool_timing timing;
	const atomic_int *stop;         /* while it is made: set, the making stops (NULL: never) */
	int background;                 /* made beside the process's loads: its population lets them run first */
	/* An early pool, while it is made: */
	void (*ready)(aeg_pool_t *pool, void *arg);     /* called at its first usable buffer (NULL: not early) */
	void *ready_arg;
	int handed;                     /* ready was called: the pool is in use, its making no longer fails */
	uint32_t unlisted;              /* buffers its maker has not listed yet (atomic) */
	uint64_t t0;                    /* when its making began */
};

/* The header fills whole pages of its own, so buffers start on a page. */
static uint64_t header_bytes_for(uint32_t buffers, uint64_t page)
{
	return aeg_round_up(offsetof(struct aeg_pool_header, slots) + 2ull * sizeof(uint32_t) * buffers, page);
}

static void init_header(aeg_pool_t *pool, uint32_t buffers, uint64_t header_bytes)
{
	struct aeg_pool_header *h = pool->map;

	h->version = POOL_VERSION;
	h->buffers = buffers;
	h->header_bytes = header_bytes;
	h->buffer_bytes = pool->buffer_bytes;
	h->pool_bytes = pool->pool_bytes;
	h->numa_node = pool->numa_node;
	/* An early pool's buffers are its maker's until each is registered (hand_out). */
	aeg_pool_list_format(&pool->list, pool->ready != NULL ? (uint32_t)getpid() : 0);
	/* The magic last: a header is valid once it is there. */
	memcpy(h->magic, POOL_MAGIC, sizeof(h->magic));
}

/* Where a pool goes: the GPU's PCI bus id and, when the topology knows them, its NUMA nodes. */
struct place {
	const aeg_topo_t *topo;         /* NULL: the GPU has no PCI bus id, or sole_node */
	char pci[AEG_PCI_BUS_ID_LEN];
	struct aeg_gpu_locality loc;
	int sole_node;                  /* the machine's one NUMA node (no topology needed); -1: not so */
	int numa_node;                  /* the pages are bound to it (or on sole_node); -1: not bound */
};

/*
 * A GPU without a PCI bus id (host backend without AEGAEON_HOST_PCI_BUS_IDS)
 * has no place. On a machine of one NUMA node (and no topology XML given)
 * the place is that node, without the topology. Otherwise the topology is
 * the process' cached one, so only the first pool of a process pays for
 * hwloc's discovery.
 */
static int locate(aeg_device_t *dev, int gpu, struct place *pl)
{
	struct aeg_gpu_info info;
	int err;

	memset(pl, 0, sizeof(*pl));
	pl->numa_node = -1;
	pl->sole_node = -1;
	err = aeg_device_gpu_info(dev, gpu, &info);
	if (err < 0)
		return err;
	if (info.pci_bus_id[0] == '\0')
		return 0;
	snprintf(pl->pci, sizeof(pl->pci), "%s", info.pci_bus_id);
	if ((pl->sole_node = aeg_topo_sole_node()) >= 0)
		return 0;
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

	pl->numa_node = pl->sole_node;
	if (pl->sole_node >= 0 || !has_nodes(pl))
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
	char q[64];

	if (v == NULL || *v == '\0' || strcmp(v, "auto") == 0)
		*mode = HUGE_AUTO;
	else if (strcmp(v, "never") == 0)
		*mode = HUGE_NEVER;
	else if (strcmp(v, "always") == 0)
		*mode = HUGE_ALWAYS;
	else
		return aeg_fail(AEG_EINVAL, "pinned pool: AEGAEON_PINNED_HUGEPAGES='%s' is not auto, never or always",
				aeg_quote(v, q, sizeof(q)));
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

/* The mapping of a pool laid out on 2 MiB pages (hugetlb, or private): its header in whole pages, then the buffers. */
static uint64_t huge_map_bytes(uint64_t buffers, uint64_t buffer_bytes)
{
	return header_bytes_for((uint32_t)buffers, HUGE_PAGE) + buffers * buffer_bytes;
}

/*
 * The page size of a new pool: 2 MiB hugetlb pages when the mode allows it,
 * the buffers are whole huge pages and the admin reserved enough of them
 * (on the GPU's node, in "auto"), else 4 KiB pages. @quiet: why not is
 * logged at debug level only (a pool planned ahead; making it says why).
 */
static int choose_page(enum huge_mode mode, uint64_t buffer_bytes, uint64_t buffers,
		       const struct place *pl, int quiet, uint64_t *page)
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
	need = huge_map_bytes(buffers, buffer_bytes) / HUGE_PAGE;
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
		aeg_log(total > 0 && !quiet ? AEG_LOG_INFO : AEG_LOG_DEBUG,
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

/* Population of a mapping by threads taking POPULATE_UNIT pieces in order; the caller registers behind them. */
struct populating {
	char *start;
	uint64_t bytes;
	uint32_t units;
	uint64_t unit;                  /* bytes of a unit: POPULATE_UNIT, POPULATE_UNIT_EARLY */
	int early;                      /* an early pool: its pieces are registered as soon as they are in */
	const struct place *pl;         /* bind the threads next to the pages; NULL: don't */
	pthread_mutex_t lock;
	pthread_cond_t cv;              /* a unit done, or population stopped */
	uint32_t next;                  /* the next unit to take */
	uint32_t ready;                 /* units 0..ready-1 are populated */
	uint8_t *done;
	int err;                        /* errno of the first failure */
	int stop;                       /* take no more units */
	const atomic_int *cancel;       /* the pool's maker stops it: ECANCELED (NULL: never) */
	uint64_t yield_until_ns;        /* until then no unit starts while a load runs (0: never waits) */
	uint64_t yielded_ns;            /* the longest a thread waited for loads */
	uint64_t populated_ns;          /* when the last unit was done */
};

static int cancelled(const atomic_int *cancel)
{
	return cancel != NULL && atomic_load_explicit(cancel, memory_order_relaxed) != 0;
}

/* Wait on @p's cv (CLOCK_MONOTONIC) for at most a millisecond, @p->lock held. */
static void nap(struct populating *p)
{
	struct timespec ts = aeg_timespec_of_ns(aeg_now_ns() + 1000000);

	pthread_cond_timedwait(&p->cv, &p->lock, &ts);
}

/* Fault [p, +n) in, a step at a time; an errno (ECANCELED once @cancel is set). */
static int populate_range(char *p, uint64_t n, const atomic_int *cancel)
{
	/*
	 * A step at a time: the kernel holds the process's mmap lock while it
	 * populates, and every mmap (a load mapping its file, the driver
	 * making an event) waits for it. A whole thread's share at once held
	 * a fresh process's first load up for the ring's 50 ms on the H200.
	 */
	for (uint64_t off = 0; off < n; off += POPULATE_STEP) {
		uint64_t step = n - off < POPULATE_STEP ? n - off : POPULATE_STEP;

		if (cancelled(cancel))
			return ECANCELED;
		if (madvise(p + off, step, MADV_POPULATE_WRITE) == 0)
			continue;
		if (errno != EINVAL)
			return errno;
		/* Kernels before 5.14: fault each page in by writing it, still a step at a time. */
		for (uint64_t o = off; o < n; o += POOL_PAGE) {
			if (o % POPULATE_STEP == 0 && cancelled(cancel))
				return ECANCELED;
			((volatile char *)p)[o] = 0;
		}
		return 0;
	}
	return 0;
}

static void *populate_main(void *arg)
{
	struct populating *p = arg;
	uint64_t yielded = 0;

	/* Zeroing the pages is the cost: do it from the CPUs next to their node. */
	if (p->pl != NULL)
		aeg_topo_bind_thread(p->pl->topo, p->pl->pci);
	pthread_mutex_lock(&p->lock);
	while (!p->stop && p->err == 0 && p->next < p->units) {
		uint64_t now = aeg_now_ns(), off, n;
		uint32_t i;
		int err;

		if (now < p->yield_until_ns && aeg_loads_active() > 0 && !cancelled(p->cancel)) {
			/* Let the load run: look again in a millisecond. */
			nap(p);
			yielded += aeg_now_ns() - now;
			continue;
		}
		i = p->next++;
		off = (uint64_t)i * p->unit;
		n = p->bytes - off < p->unit ? p->bytes - off : p->unit;
		pthread_mutex_unlock(&p->lock);
		err = populate_range(p->start + off, n, p->cancel);
		pthread_mutex_lock(&p->lock);
		if (err != 0 && p->err == 0)
			p->err = err;
		p->done[i] = 1;
		while (p->ready < p->units && p->done[p->ready])
			p->ready++;
		if (p->ready == p->units)
			p->populated_ns = aeg_now_ns();
		pthread_cond_broadcast(&p->cv);
	}
	if (yielded > p->yielded_ns)
		p->yielded_ns = yielded;
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

/*
 * Threads for populating @bytes: the CPUs next to the GPU's node when the
 * pages are bound there, else those this process may run on, at most
 * POPULATE_THREADS (POPULATE_THREADS_SHARED_SMALL for shared memory in
 * 4 KiB pages, @shared_small) and each with POPULATE_MIN_BYTES or more.
 */
static unsigned populate_threads(uint64_t bytes, const struct place *pl, int shared_small)
{
	uint64_t n = bytes / POPULATE_MIN_BYTES;
	long cpus = -1;
	cpu_set_t set;

	if (pl->numa_node >= 0 && pl->topo != NULL)
		cpus = aeg_topo_cpu_count(pl->topo, pl->pci);
	if (cpus <= 0 && sched_getaffinity(0, sizeof(set), &set) == 0)
		cpus = CPU_COUNT(&set);
	if (cpus > 0 && n > (uint64_t)cpus)
		n = (uint64_t)cpus;
	if (n > POPULATE_THREADS)
		n = POPULATE_THREADS;
	if (shared_small && n > POPULATE_THREADS_SHARED_SMALL)
		n = POPULATE_THREADS_SHARED_SMALL;
	return n == 0 ? 1 : (unsigned)n;
}

/*
 * Wait until [start, start + @end) is populated and may be registered: at
 * once when no load runs in the process or the pool is early (the loads
 * wait for its buffers: they register nothing of their own), else once
 * every page is in (aeg_loads_active). 0, or the errno of a population
 * that stopped short.
 */
static int populated_through(struct populating *p, uint64_t end)
{
	int there, all;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		all = p->ready == p->units;
		there = all || ((uint64_t)p->ready * p->unit >= end && (p->early || aeg_loads_active() == 0));
		if (there || p->err != 0)
			break;
		if ((uint64_t)p->ready * p->unit >= end) {
			/* Only a load holds this piece back: look again in a millisecond. */
			nap(p);
		} else {
			pthread_cond_wait(&p->cv, &p->lock);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return there ? 0 : p->err;
}

/*
 * An early pool's buffers in [@off, @off + @n) of its data are registered:
 * list them, and hand the pool out with its first.
 */
static void hand_out(aeg_pool_t *pool, uint64_t off, uint64_t n)
{
	for (uint64_t b = off / pool->buffer_bytes; b < (off + n) / pool->buffer_bytes; b++) {
		__atomic_sub_fetch(&pool->unlisted, 1, __ATOMIC_RELAXED);
		if (aeg_pool_list_add(&pool->list, (uint32_t)b) < 0)
			aeg_warn("%s", aeg_error_detail());
	}
	if (pool->handed)
		return;
	pool->handed = 1;
	pool->timing.usable_ns = aeg_now_ns() - pool->t0;
	aeg_span_end("pool usable", pool->t0);
	pool->ready(pool, pool->ready_arg);
}

/* An early pool in use stops growing: what it has stays (the error detail says why). */
static void stop_short(aeg_pool_t *pool, uint64_t registered, uint64_t data_bytes)
{
	aeg_warn("%s; the pool keeps the %" PRIu64 " of its %" PRIu64 " buffers it had",
		 aeg_error_detail(), registered / pool->buffer_bytes, data_bytes / pool->buffer_bytes);
}

/* Register the buffers, piece by piece, as the population behind @p reaches them. */
static int register_behind(aeg_pool_t *pool, struct populating *p, uint64_t header, uint64_t data_bytes)
{
	int err;

	for (uint64_t off = 0; off < data_bytes; off += pool->reg_piece) {
		uint64_t n = data_bytes - off < pool->reg_piece ? data_bytes - off : pool->reg_piece;

		if (populated_through(p, header + off + n) != 0)
			return 0;       /* the caller reports the population's failure */
		if (cancelled(p->cancel))
			return aeg_fail(AEG_ECANCELED, "pinned pool: its making was stopped (%" PRIu64 " of %" PRIu64
					" bytes registered)", off, data_bytes);
		err = aeg_host_register(pool->dev, pool->data + off, n, 0);
		if (err < 0) {
			aeg_error_prefix("pinned pool of %" PRIu64 " bytes, registering bytes %" PRIu64 "..%" PRIu64,
					 data_bytes, off, off + n);
			if (!pool->handed)
				return err;
			stop_short(pool, off, data_bytes);
			return 0;
		}
		pool->reg_pieces++;
		if (pool->ready != NULL)
			hand_out(pool, off, n);
	}
	return 0;
}

/*
 * Fault every page of the mapping in on threads of their own (so that
 * binding them never moves the caller) and register the buffer area behind
 * them. With no thread to be had, the caller populates first, unbound.
 */
static int populate_and_register(aeg_pool_t *pool, uint64_t header, uint64_t data_bytes, uint64_t page,
				 const struct place *pl, int *registering)
{
	uint64_t t0 = aeg_now_ns(), t, in;
	struct populating p = { .start = pool->map, .bytes = pool->map_bytes,
				.unit = pool->ready != NULL ? POPULATE_UNIT_EARLY : POPULATE_UNIT, .early = pool->ready != NULL,
				.pl = pl->numa_node >= 0 && pl->topo != NULL ? pl : NULL, .cancel = pool->stop,
				.yield_until_ns = pool->background ? t0 + POPULATE_YIELD_MAX_NS : 0 };
	unsigned n = populate_threads(pool->map_bytes, pl, page == POOL_PAGE && !pool->private_pool), used = 0;
	pthread_t tids[POPULATE_THREADS];
	int err;

	pool->data = (char *)pool->map + header;
	p.units = (uint32_t)((p.bytes + p.unit - 1) / p.unit);
	p.done = calloc(p.units, 1);
	if (p.done == NULL)
		return aeg_fail(AEG_ENOMEM, "pinned pool: out of memory");
	pthread_mutex_init(&p.lock, NULL);
	aeg_cond_init_monotonic(&p.cv);     /* nap(): a wall clock step cannot stretch it */
	for (unsigned i = 0; i < n; i++)
		if (pthread_create(&tids[used], NULL, populate_main, &p) == 0)
			used++;
	if (used == 0) {
		p.pl = NULL;
		populate_main(&p);
	}
	err = register_behind(pool, &p, header, data_bytes);
	*registering = err < 0;
	pthread_mutex_lock(&p.lock);
	p.stop = 1;
	pthread_mutex_unlock(&p.lock);
	for (unsigned i = 0; i < used; i++)
		pthread_join(tids[i], NULL);
	t = aeg_now_ns();
	pool->timing.threads = used ? used : 1;
	pool->timing.yield_ns = p.yielded_ns;
	pool->timing.populate_ns = (p.populated_ns ? p.populated_ns : t) - t0;
	pool->timing.register_ns = t - t0 - pool->timing.populate_ns;
	in = (uint64_t)p.ready * p.unit;
	if (err == 0 && p.err == ECANCELED)
		err = aeg_fail(AEG_ECANCELED, "pinned pool: its making was stopped (%" PRIu64 " of %" PRIu64
			       " bytes populated)", in < p.bytes ? in : p.bytes, p.bytes);
	else if (err == 0 && p.err != 0)
		err = aeg_fail(AEG_ENOMEM, "pinned pool: populating %" PRIu64 " bytes in %s pages: %s", p.bytes,
			       page == HUGE_PAGE ? "2 MiB huge" : "4 KiB", strerror(p.err));
	if (err < 0 && pool->handed) {
		stop_short(pool, (uint64_t)pool->reg_pieces * pool->reg_piece, data_bytes);
		err = 0;
	}
	pthread_cond_destroy(&p.cv);
	pthread_mutex_destroy(&p.lock);
	free(p.done);
	return err;
}

/* Undo registration, piece by piece. */
static void unregister(aeg_pool_t *pool)
{
	for (uint32_t i = 0; i < pool->reg_pieces; i++)
		aeg_host_unregister(pool->dev, pool->data + (uint64_t)i * pool->reg_piece);
	pool->reg_pieces = 0;
}

/* Unregister and unmap (a pool whose huge pages ran out is made again in 4 KiB pages). */
static void unmap(aeg_pool_t *pool)
{
	unregister(pool);
	if (pool->map != NULL)
		munmap(pool->map, pool->map_bytes);
	pool->map = NULL;
	if (pool->fd >= 0)
		close(pool->fd);
	pool->fd = -1;
}

static void pool_free(aeg_pool_t *pool)
{
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

/* Where things are in the mapping, from the geometry this process knows (never from the header). */
static void pool_layout(aeg_pool_t *pool, uint32_t buffers, uint64_t header_bytes)
{
	pool->data = (char *)pool->map + header_bytes;
	aeg_pool_list_init(&pool->list, pool->map, buffers);
}

/*
 * A private pool's memory: anonymous, on a 2 MiB boundary, with transparent
 * huge pages asked for (zeroing and pinning 2 MiB pages costs about half of
 * what 4 KiB pages cost; a kernel without them gives 4 KiB pages), and kept
 * out of children: a fork would otherwise share the pinned pages
 * copy-on-write with a child.
 */
static int map_anonymous(uint64_t bytes, char **mapp)
{
	uint64_t lead;
	char *raw, *map;

	*mapp = NULL;
	raw = mmap(NULL, bytes + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		return aeg_fail(AEG_ENOMEM, "pinned pool: mmap of %" PRIu64 " private bytes: %s", bytes, strerror(errno));
	lead = aeg_round_up((uint64_t)(uintptr_t)raw, HUGE_PAGE) - (uint64_t)(uintptr_t)raw;
	if (lead > 0)
		munmap(raw, lead);
	munmap(raw + lead + bytes, HUGE_PAGE - lead);     /* lead < HUGE_PAGE: never empty */
	map = raw + lead;
#ifdef MADV_HUGEPAGE
	(void)madvise(map, bytes, MADV_HUGEPAGE);
#endif
	if (madvise(map, bytes, MADV_DONTFORK) != 0) {
		int err = aeg_fail(AEG_EIO, "pinned pool: keeping %" PRIu64 " bytes out of children (MADV_DONTFORK): %s",
				   bytes, strerror(errno));

		munmap(map, bytes);
		return err;
	}
	*mapp = map;
	return 0;
}

/* A 4 KiB-page pool must fit what the kernel says is available (reserved huge pages are not in it). */
static int check_available(uint64_t bytes)
{
	uint64_t avail;
	int err = aeg_mem_available(&avail);

	if (err < 0)
		return err;
	if (bytes > avail)
		return aeg_fail(AEG_ENOMEM, "pinned pool: %" PRIu64 " bytes asked, only %" PRIu64 " available (MemAvailable)",
				bytes, avail);
	return 0;
}

/* ---------------------------------------------- memory made ahead of need */

/*
 * One private pool's memory made ahead of need (aeg_pool_premake), mapped
 * as map_anonymous maps it and populated by a thread of its own while the
 * process does other things (its imports, its CUDA context); the next
 * private pool of its size takes it, and finds its pages in. Its pages go
 * where the process runs (the GPU is not known yet): on a machine of
 * several NUMA nodes a pool takes them only where that is its GPU's node. Faulting a
 * fresh staging ring in (24 x 4 MiB) held a fresh process's first load up
 * for 7-15 ms on the H200 machines, virtual machines where a page's first
 * touch costs the host too. One at a time in a process: @ahead.cur, under
 * @ahead.lock, which also orders the mapping against fork. A child has
 * none of it (MADV_DONTFORK) and no thread, and forgets it.
 */
struct ahead_mem {
	char *map;
	uint64_t bytes;
	pthread_t thread;
	atomic_int stop;        /* its taker stops it: the pool populates the rest */
	atomic_int populated;   /* every page is in */
};

static struct {
	pthread_mutex_t lock;
	struct ahead_mem *cur;  /* made ahead, its thread not joined yet; NULL: none */
} ahead = { .lock = PTHREAD_MUTEX_INITIALIZER };

static pthread_once_t ahead_once = PTHREAD_ONCE_INIT;

static void ahead_prepare(void) { pthread_mutex_lock(&ahead.lock); }
static void ahead_parent(void) { pthread_mutex_unlock(&ahead.lock); }
static void ahead_child(void)
{
	free(ahead.cur);
	ahead.cur = NULL;
	pthread_mutex_unlock(&ahead.lock);
}

static void ahead_atfork(void)
{
	pthread_atfork(ahead_prepare, ahead_parent, ahead_child);
}

static void *ahead_main(void *arg)
{
	struct ahead_mem *m = arg;

	if (populate_range(m->map, m->bytes, &m->stop) == 0)
		atomic_store(&m->populated, 1);
	return NULL;
}

/*
 * Would a private pool of these buffers be made of anonymous memory (and
 * not of reserved 2 MiB huge pages, or fail for want of them)? As the
 * pool's making will choose, on the machine's counts (its GPU's node is
 * not known yet), and quietly: the pool says why.
 */
static int anonymous_pool(uint64_t buffer_bytes, uint64_t buffers)
{
	struct place nowhere = { .numa_node = -1, .sole_node = -1 };
	enum huge_mode mode;
	uint64_t page;

	return huge_mode(&mode) == 0 && choose_page(mode, buffer_bytes, buffers, &nowhere, 1, &page) == 0 &&
	       page == POOL_PAGE;
}

int aeg_pool_premake(uint64_t buffer_bytes, uint64_t pool_bytes)
{
	uint64_t buffers, map_bytes;
	struct ahead_mem *m;
	int rc;

	if (buffer_bytes == 0 || buffer_bytes % POOL_PAGE != 0 || pool_bytes < buffer_bytes ||
	    pool_bytes / buffer_bytes > POOL_MAX_BUFFERS)
		return aeg_fail(AEG_EINVAL, "pinned pool made ahead: %" PRIu64 " bytes in buffers of %" PRIu64
				" is no pool (buffers of whole 4 KiB pages, 1 to %" PRIu32 " of them)",
				pool_bytes, buffer_bytes, POOL_MAX_BUFFERS);
	buffers = pool_bytes / buffer_bytes;
	map_bytes = huge_map_bytes(buffers, buffer_bytes);
	if (!anonymous_pool(buffer_bytes, buffers)) {
		aeg_debug("pinned pool: none made ahead (2 MiB huge pages are reserved for it)");
		return 0;
	}
	if (check_available(map_bytes) < 0) {
		aeg_debug("pinned pool: none made ahead: %s", aeg_error_detail());
		return 0;
	}
	pthread_once(&ahead_once, ahead_atfork);
	/* One of another size was made for other settings: these are the newer. */
	if (aeg_pool_premade(NULL, NULL) != map_bytes)
		aeg_pool_premade_drop();
	pthread_mutex_lock(&ahead.lock);
	if (ahead.cur != NULL) {
		pthread_mutex_unlock(&ahead.lock);
		return 0;
	}
	m = calloc(1, sizeof(*m));
	if (m == NULL || map_anonymous(map_bytes, &m->map) < 0) {
		pthread_mutex_unlock(&ahead.lock);
		aeg_debug("pinned pool: none made ahead: %s", m == NULL ? "out of memory" : aeg_error_detail());
		free(m);
		return 0;
	}
	m->bytes = map_bytes;
	rc = pthread_create(&m->thread, NULL, ahead_main, m);
	if (rc != 0) {
		pthread_mutex_unlock(&ahead.lock);
		aeg_debug("pinned pool: none made ahead: starting its thread: %s", strerror(rc));
		munmap(m->map, map_bytes);
		free(m);
		return 0;
	}
	ahead.cur = m;
	pthread_mutex_unlock(&ahead.lock);
	aeg_debug("pinned pool: %" PRIu64 " bytes being made ahead of need", map_bytes);
	return 0;
}

/*
 * Whether the pages of [@map, +@bytes) that are in (one in each 2 MiB, 64
 * at most) are on one of @pl's NUMA nodes; the others come in there, bound.
 */
static int on_nodes(char *map, uint64_t bytes, const struct place *pl)
{
	enum { SAMPLES = 64 };
	void *pages[SAMPLES];
	int status[SAMPLES];
	uint64_t n = bytes / HUGE_PAGE, step;

	if (n == 0)
		n = 1;
	if (n > SAMPLES)
		n = SAMPLES;
	step = aeg_round_up(bytes / n, POOL_PAGE);
	for (uint64_t i = 0; i < n; i++)
		pages[i] = map + (i * step < bytes ? i * step : 0);
	if (syscall(SYS_move_pages, 0, (unsigned long)n, pages, NULL, status, 0) != 0)
		return 0;
	for (uint64_t i = 0; i < n; i++) {
		int here = status[i] == -ENOENT;      /* not in yet */

		for (int k = 0; !here && k < pl->loc.numa_count; k++)
			here = status[i] == pl->loc.numa_nodes[k];
		if (!here) {
			aeg_debug("pinned pool: the memory made ahead is on NUMA node %d, not next to GPU %s", status[i],
				  pl->pci);
			return 0;
		}
	}
	return 1;
}

/*
 * The memory made ahead when it is @map_bytes (0: none wanted) and its
 * pages are on @pl's nodes (where it has some), its population stopped
 * where it was (*@populated: it was whole); otherwise it is given back.
 * NULL: none.
 */
static char *take_ahead(uint64_t map_bytes, const struct place *pl, int *populated)
{
	uint64_t t = aeg_now_ns();
	struct ahead_mem *m;
	char *map = NULL;

	*populated = 0;
	pthread_mutex_lock(&ahead.lock);
	m = ahead.cur;
	ahead.cur = NULL;
	pthread_mutex_unlock(&ahead.lock);
	if (m == NULL)
		return NULL;
	atomic_store(&m->stop, 1);
	pthread_join(m->thread, NULL);
	if (m->bytes == map_bytes && (pl == NULL || !has_nodes(pl) || on_nodes(m->map, m->bytes, pl))) {
		map = m->map;
		*populated = atomic_load(&m->populated);
		aeg_span_end("pool ahead", t);
	} else {
		munmap(m->map, m->bytes);
		if (map_bytes != 0)
			aeg_debug("pinned pool: the %" PRIu64 " bytes made ahead are not this pool's %" PRIu64 "; given back",
				  m->bytes, map_bytes);
	}
	free(m);
	return map;
}

void aeg_pool_premade_drop(void)
{
	int populated;

	(void)take_ahead(0, NULL, &populated);
}

uint64_t aeg_pool_premade(void **map, int *populated)
{
	struct ahead_mem *m;
	uint64_t bytes;

	pthread_mutex_lock(&ahead.lock);
	m = ahead.cur;
	bytes = m != NULL ? m->bytes : 0;
	if (map != NULL)
		*map = m != NULL ? m->map : NULL;
	if (populated != NULL)
		*populated = m != NULL && atomic_load(&m->populated);
	pthread_mutex_unlock(&ahead.lock);
	return bytes;
}

/*
 * A private pool's memory in 4 KiB pages: made ahead of need where that
 * is its size and its pages are where the pool's go, else mapped now.
 */
static int map_private(aeg_pool_t *pool, const struct place *pl)
{
	int populated, err = 0;
	char *map;

	map = take_ahead(pool->map_bytes, pl, &populated);
	if (map != NULL)
		pool->timing.ahead = populated ? 2 : 1;
	else
		err = map_anonymous(pool->map_bytes, &map);
	pool->map = map;
	return err;
}

/*
 * The memfd of @page pages holding @header + @data_bytes, mapped, bound,
 * populated and registered; *@registering set when registration failed
 * (other pages would not help).
 */
static int provision(aeg_pool_t *pool, uint64_t page, uint64_t header, uint64_t data_bytes,
		     struct place *pl, int gpu, int *registering)
{
	const char *kind = page == HUGE_PAGE ? " in 2 MiB huge pages" : "";
	uint64_t t;
	int err;

	pool->timing.page_bytes = page;
	if (pool->private_pool && page == POOL_PAGE) {
		pool->map_bytes = header + data_bytes;
		err = map_private(pool, pl);
		if (err < 0)
			return err;
		goto place;
	}
	if (pool->private_pool)
		aeg_pool_premade_drop();        /* huge pages instead: no one else would take it */
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

place:
	t = aeg_now_ns();
	err = bind(pl, gpu, (char *)pool->map + header, data_bytes);
	pool->timing.bind_ns += aeg_now_ns() - t;
	if (err < 0)
		return err;
	if (pool->ready != NULL) {
		/* Its list first, every buffer the maker's: each is listed as it is registered. */
		uint32_t buffers = (uint32_t)(data_bytes / pool->buffer_bytes);

		pool->numa_node = pl->numa_node;
		pool_layout(pool, buffers, header);
		init_header(pool, buffers, header);
		__atomic_store_n(&pool->unlisted, buffers, __ATOMIC_RELAXED);
	}

	return populate_and_register(pool, header, data_bytes, page, pl, registering);
}

/* What a pool of these sizes will be: checked, placed, its page size chosen. */
struct pool_plan {
	uint64_t buffers, data_bytes, page;
	enum huge_mode mode;
	struct place pl;
	uint64_t locate_ns;
};

/*
 * @place: find the GPU's NUMA node (the topology: hwloc's discovery, tens of
 * ms the first time in a process) to check and use its own huge pages.
 * Without, the check counts the machine's; only "always" fails on them. A
 * @private_pool of the size made ahead needs none of the memory available:
 * it holds it already.
 */
static int plan_pool(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes, int place,
		     int private_pool, struct pool_plan *p)
{
	uint64_t t;
	int err;

	memset(p, 0, sizeof(*p));
	p->mode = HUGE_AUTO;
	if (dev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_create: NULL argument");
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
	p->buffers = pool_bytes / buffer_bytes;
	if (p->buffers > POOL_MAX_BUFFERS)
		return aeg_fail(AEG_EINVAL, "pinned pool: %" PRIu64 " buffers of %" PRIu64 " bytes; at most %" PRIu32 " (use larger buffers)",
				p->buffers, buffer_bytes, POOL_MAX_BUFFERS);
	p->data_bytes = p->buffers * buffer_bytes;
	err = huge_mode(&p->mode);
	if (err < 0)
		return err;
	t = aeg_now_ns();
	if (place || p->mode == HUGE_ALWAYS) {
		err = locate(dev, gpu, &p->pl);
	} else {
		memset(&p->pl, 0, sizeof(p->pl));
		p->pl.numa_node = -1;
		p->pl.sole_node = -1;
	}
	p->locate_ns = aeg_now_ns() - t;
	if (err < 0)
		return err;
	err = choose_page(p->mode, buffer_bytes, p->buffers, &p->pl, 0, &p->page);
	if (err < 0 || p->page != POOL_PAGE)
		return err;
	if (private_pool && aeg_pool_premade(NULL, NULL) == huge_map_bytes(p->buffers, buffer_bytes))
		return 0;
	return check_available(header_bytes_for((uint32_t)p->buffers, POOL_PAGE) + p->data_bytes);
}

int aeg_pool_check(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes, uint64_t *data_bytes)
{
	struct pool_plan p;
	int err = plan_pool(dev, gpu, buffer_bytes, pool_bytes, 0, 0, &p);

	if (err == 0 && data_bytes != NULL)
		*data_bytes = p.data_bytes;
	return err;
}

static int pool_create(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes, int private_pool,
		       const atomic_int *stop, int background, void (*ready)(aeg_pool_t *, void *), void *ready_arg,
		       aeg_pool_t **poolp)
{
	uint64_t t0 = aeg_now_ns(), header;
	struct pool_plan p;
	aeg_pool_t *pool;
	int err, registering = 0;

	if (poolp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_create: NULL argument");
	*poolp = NULL;
	err = plan_pool(dev, gpu, buffer_bytes, pool_bytes, 1, private_pool, &p);
	if (err < 0)
		return err;
	pool = pool_new(dev);
	if (pool == NULL)
		return aeg_fail(AEG_ENOMEM, "pinned pool: out of memory");
	pool->timing.bind_ns = p.locate_ns;
	pool->private_pool = private_pool;
	pool->stop = stop;
	pool->background = background;
	pool->ready = ready;
	pool->ready_arg = ready_arg;
	pool->t0 = t0;
	pool->buffer_bytes = buffer_bytes;
	pool->pool_bytes = p.data_bytes;
	/* An early pool's buffers are usable one by one, each as its registration ends. */
	if (ready != NULL)
		pool->reg_piece = buffer_bytes;
	else
		pool->reg_piece = buffer_bytes >= REGISTER_PIECE ? buffer_bytes : aeg_round_up(REGISTER_PIECE, buffer_bytes);
	for (;;) {
		/* A private pool's buffers start on a 2 MiB boundary, where its huge pages do. */
		header = header_bytes_for((uint32_t)p.buffers, private_pool ? HUGE_PAGE : p.page);
		err = provision(pool, p.page, header, p.data_bytes, &p.pl, gpu, &registering);
		if (err == 0)
			break;
		/* "auto" promised huge pages only while they last: another process may have taken them. */
		if (p.page == POOL_PAGE || p.mode == HUGE_ALWAYS || registering || err == AEG_ECANCELED)
			goto fail;
		aeg_info("pinned pool: 2 MiB huge pages could not be had (%s); using 4 KiB pages", aeg_error_detail());
		unmap(pool);
		p.page = POOL_PAGE;
		err = check_available(header_bytes_for((uint32_t)p.buffers, POOL_PAGE) + p.data_bytes);
		if (err < 0)
			goto fail;
	}

	pool->stop = NULL;
	pool->ready = NULL;
	if (!pool->handed) {            /* an early pool was laid out before it was handed out */
		pool->numa_node = p.pl.numa_node;     /* where binding put it */
		pool_layout(pool, (uint32_t)p.buffers, header);
		init_header(pool, (uint32_t)p.buffers, header);
	}
	pool->timing.total_ns = aeg_now_ns() - t0;
	aeg_debug("pinned pool: %" PRIu64 " buffers of %" PRIu64 " bytes in %s pages%s on NUMA node %d in %.1f ms (bind %.1f, populate %.1f on %u threads, of which %.1f waiting for loads, register %.1f; first buffer usable after %.1f)",
		  p.buffers, buffer_bytes,
		  p.page == HUGE_PAGE ? "2 MiB" : private_pool ? "private (transparent huge)" : "4 KiB",
		  pool->timing.ahead == 2 ? " made ahead" : pool->timing.ahead == 1 ? " partly made ahead" : "",
		  p.pl.numa_node,
		  pool->timing.total_ns / 1e6, pool->timing.bind_ns / 1e6, pool->timing.populate_ns / 1e6,
		  pool->timing.threads, pool->timing.yield_ns / 1e6, pool->timing.register_ns / 1e6,
		  (pool->handed ? pool->timing.usable_ns : pool->timing.total_ns) / 1e6);
	aeg_span_end("pool create", t0);
	*poolp = pool;
	return 0;
fail:
	pool_free(pool);
	return err;
}

AEG_EXPORT int aeg_pool_create(aeg_device_t *dev, int gpu, uint64_t buffer_bytes,
			       uint64_t pool_bytes, aeg_pool_t **poolp)
{
	return pool_create(dev, gpu, buffer_bytes, pool_bytes, 0, NULL, 0, NULL, NULL, poolp);
}

int aeg_pool_create_stoppable(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes,
			      const atomic_int *stop, aeg_pool_t **poolp)
{
	return pool_create(dev, gpu, buffer_bytes, pool_bytes, 0, stop, 1, NULL, NULL, poolp);
}

int aeg_pool_create_private(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes,
			    aeg_pool_t **poolp)
{
	return pool_create(dev, gpu, buffer_bytes, pool_bytes, 1, NULL, 0, NULL, NULL, poolp);
}

int aeg_pool_create_private_early(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes,
				  void (*ready)(aeg_pool_t *pool, void *arg), void *arg, aeg_pool_t **poolp)
{
	if (ready == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_create_private_early: NULL ready");
	return pool_create(dev, gpu, buffer_bytes, pool_bytes, 1, NULL, 0, ready, arg, poolp);
}

/* The page size of the file behind @fd: a hugetlb memfd maps in huge pages only. */
static uint64_t fd_page_bytes(int fd)
{
	struct statfs sfs;

	if (fstatfs(fd, &sfs) == 0 && (unsigned long)sfs.f_type == HUGETLBFS_MAGIC && sfs.f_bsize > 0)
		return (uint64_t)sfs.f_bsize;
	return POOL_PAGE;
}

#define NUMA_FROM_HEADER (-2)

/* A pool's layout, as its maker or the agent says, or as read once from its header. */
struct geometry {
	uint32_t buffers;
	uint64_t header_bytes, buffer_bytes, pool_bytes, page;
	int numa_node;
};

/* The descriptor's file and page size; AEG_EBADF or AEG_EINVAL when it cannot be a pool. */
static int pool_file(int fd, struct stat *st, uint64_t *page)
{
	if (fd < 0 || fstat(fd, st) < 0)
		return aeg_fail(AEG_EBADF, "pinned pool: descriptor %d: %s", fd,
				fd < 0 ? "negative" : strerror(errno));
	*page = fd_page_bytes(fd);
	if (!S_ISREG(st->st_mode) || (uint64_t)st->st_size < *page)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d is not an aegaeon pool (%s of %lld bytes)",
				fd, S_ISREG(st->st_mode) ? "a file" : "not a file", (long long)st->st_size);
	return 0;
}

/* The geometry in the header of the pool behind @fd, read once. */
static int read_geometry(int fd, struct geometry *g)
{
	struct aeg_pool_header *h;
	int valid;

	/* Whole pages: unmapping part of a hugetlb mapping fails. */
	h = mmap(NULL, g->page, PROT_READ, MAP_SHARED, fd, 0);
	if (h == MAP_FAILED)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d cannot be mapped: %s", fd, strerror(errno));
	valid = memcmp(h->magic, POOL_MAGIC, sizeof(h->magic)) == 0 && h->version == POOL_VERSION;
	if (valid) {
		g->header_bytes = h->header_bytes;
		g->buffers = h->buffers;
		g->buffer_bytes = h->buffer_bytes;
		g->pool_bytes = h->pool_bytes;
		g->numa_node = h->numa_node;
	}
	munmap(h, g->page);
	if (!valid)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d is not an aegaeon pool (no pool header, or another version)",
				fd);
	return 0;
}

static int check_geometry(int fd, const struct stat *st, const struct geometry *g)
{
	if (g->buffers == 0 || g->buffers > POOL_MAX_BUFFERS || g->buffer_bytes == 0 ||
	    g->buffer_bytes % g->page != 0 || g->header_bytes != header_bytes_for(g->buffers, g->page) ||
	    g->pool_bytes != (uint64_t)g->buffers * g->buffer_bytes ||
	    g->header_bytes + g->pool_bytes != (uint64_t)st->st_size)
		return aeg_fail(AEG_EINVAL, "pinned pool: descriptor %d has a corrupt header (%" PRIu32 " buffers of %" PRIu64 " bytes, header %" PRIu64 ", file %lld bytes)",
				fd, g->buffers, g->buffer_bytes, g->header_bytes, (long long)st->st_size);
	return 0;
}

static int map_pool(aeg_device_t *dev, int fd, const struct geometry *g, aeg_pool_t **poolp)
{
	aeg_pool_t *pool;
	int err;

	pool = pool_new(dev);
	if (pool == NULL)
		return aeg_fail(AEG_ENOMEM, "pinned pool: out of memory");
	pool->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (pool->fd < 0) {
		err = aeg_fail(AEG_EBADF, "pinned pool: dup of descriptor %d: %s", fd, strerror(errno));
		goto fail;
	}
	pool->timing.page_bytes = g->page;
	pool->map_bytes = g->header_bytes + g->pool_bytes;
	pool->map = mmap(NULL, pool->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, pool->fd, 0);
	if (pool->map == MAP_FAILED) {
		pool->map = NULL;
		err = aeg_fail(AEG_ENOMEM, "pinned pool: mmap of %" PRIu64 " bytes: %s",
			       pool->map_bytes, strerror(errno));
		goto fail;
	}
	pool->buffer_bytes = g->buffer_bytes;
	pool->pool_bytes = g->pool_bytes;
	pool->numa_node = g->numa_node;
	if (g->numa_node == NUMA_FROM_HEADER) {
		/* Shown in stats only; any process may have written it. */
		int node = ((struct aeg_pool_header *)pool->map)->numa_node;

		pool->numa_node = node >= 0 && node < 4096 ? node : -1;
	}
	pool_layout(pool, g->buffers, g->header_bytes);
	/* Populated already: registered at once. */
	err = aeg_host_register(dev, pool->data, g->pool_bytes, 0);
	if (err < 0) {
		aeg_error_prefix("attaching a pinned pool of %" PRIu64 " bytes", g->pool_bytes);
		goto fail;
	}
	pool->reg_piece = g->pool_bytes;
	pool->reg_pieces = 1;
	*poolp = pool;
	return 0;
fail:
	pool_free(pool);
	return err;
}

AEG_EXPORT int aeg_pool_attach(aeg_device_t *dev, int fd, aeg_pool_t **poolp)
{
	struct geometry g = { .numa_node = -1 };
	struct stat st;
	int err;

	if (dev == NULL || poolp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_attach: NULL argument");
	*poolp = NULL;
	err = pool_file(fd, &st, &g.page);
	if (err == 0)
		err = read_geometry(fd, &g);
	if (err == 0)
		err = check_geometry(fd, &st, &g);
	return err < 0 ? err : map_pool(dev, fd, &g, poolp);
}

int aeg_pool_attach_known(aeg_device_t *dev, int fd, uint64_t buffer_bytes, uint64_t pool_bytes,
			  aeg_pool_t **poolp)
{
	struct geometry g = { .numa_node = NUMA_FROM_HEADER, .buffer_bytes = buffer_bytes, .pool_bytes = pool_bytes };
	struct stat st;
	int err;

	*poolp = NULL;
	err = pool_file(fd, &st, &g.page);
	if (err < 0)
		return err;
	if (buffer_bytes == 0 || pool_bytes / buffer_bytes > POOL_MAX_BUFFERS)
		return aeg_fail(AEG_EINVAL, "pinned pool: %" PRIu64 " bytes in buffers of %" PRIu64 " is no pool",
				pool_bytes, buffer_bytes);
	g.buffers = (uint32_t)(pool_bytes / buffer_bytes);
	g.header_bytes = header_bytes_for(g.buffers, g.page);
	err = check_geometry(fd, &st, &g);
	return err < 0 ? err : map_pool(dev, fd, &g, poolp);
}

AEG_EXPORT void aeg_pool_destroy(aeg_pool_t *pool)
{
	if (pool != NULL)
		pool_free(pool);
}

AEG_EXPORT int aeg_pool_acquire(aeg_pool_t *pool, int timeout_ms, struct aeg_pool_buffer *buf)
{
	uint32_t index;
	int err;

	if (pool == NULL || buf == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_acquire: NULL argument");
	err = aeg_pool_list_take(&pool->list, timeout_ms, &index);
	if (err == AEG_ETIMEDOUT) {
		uint32_t unlisted = __atomic_load_n(&pool->unlisted, __ATOMIC_RELAXED);

		/* An early pool being made (or that stopped short) has buffers neither free nor in use. */
		if (unlisted > 0)
			return aeg_fail(AEG_ETIMEDOUT, "pinned pool: no buffer came free in %d ms (%" PRIu32 " of its %" PRIu32 " buffers of %" PRIu64 " bytes not made, the others in use)",
					timeout_ms, unlisted, pool->list.buffers, pool->buffer_bytes);
		return aeg_fail(AEG_ETIMEDOUT, "pinned pool: no buffer came free in %d ms (all %" PRIu32 " buffers of %" PRIu64 " bytes in use)",
				timeout_ms, pool->list.buffers, pool->buffer_bytes);
	}
	if (err < 0)
		return err;
	buf->index = index;
	buf->ptr = pool->data + (uint64_t)index * pool->buffer_bytes;
	buf->bytes = pool->buffer_bytes;
	return 0;
}

AEG_EXPORT int aeg_pool_release(aeg_pool_t *pool, uint32_t index)
{
	if (pool == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_release: NULL pool");
	return aeg_pool_list_give(&pool->list, index);
}

AEG_EXPORT void *aeg_pool_buffer_ptr(aeg_pool_t *pool, uint32_t index)
{
	if (pool == NULL || index >= pool->list.buffers)
		return NULL;
	return pool->data + (uint64_t)index * pool->buffer_bytes;
}

AEG_EXPORT int aeg_pool_stats(aeg_pool_t *pool, struct aeg_pool_stats *stats)
{
	if (pool == NULL || stats == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_stats: NULL argument");
	stats->buffer_bytes = pool->buffer_bytes;
	stats->pool_bytes = pool->pool_bytes;
	stats->buffers = pool->list.buffers;
	stats->numa_node = pool->numa_node;
	aeg_pool_list_counts(&pool->list, stats);
	return 0;
}

int aeg_pool_reclaim(aeg_pool_t *pool, pid_t pid, uint32_t *reclaimed)
{
	*reclaimed = 0;
	if (pool == NULL || pid <= 0)
		return aeg_fail(AEG_EINVAL, "aeg_pool_reclaim: no pool or pid %d", (int)pid);
	*reclaimed = aeg_pool_list_reclaim(&pool->list, (uint32_t)pid);
	return 0;
}

AEG_EXPORT int aeg_pool_fd(const aeg_pool_t *pool)
{
	if (pool == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_pool_fd: NULL pool");
	if (pool->fd < 0)
		return aeg_fail(AEG_EINVAL, "pinned pool: a private pool (a prefetch engine's staging ring) has no file to share");
	return pool->fd;
}

AEG_EXPORT void *aeg_pool_base(const aeg_pool_t *pool)
{
	return pool != NULL ? pool->data : NULL;
}

void aeg_pool_timing(const aeg_pool_t *pool, struct aeg_pool_timing *timing)
{
	*timing = pool->timing;
}

struct aeg_pool_header *aeg_pool_header(aeg_pool_t *pool)
{
	return pool->map;
}

uint32_t aeg_pool_repairs(aeg_pool_t *pool)
{
	return __atomic_load_n(&pool->list.repairs, __ATOMIC_RELAXED);
}

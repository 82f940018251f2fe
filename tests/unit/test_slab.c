/* Slabs: wrapped ranges under many threads, errors, lookups, alloc+free time. */
#include "config.h"

#include <dirent.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/device.h>
#include <aegaeon/slab.h>

#include "internal.h"
#include "slab_internal.h"

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define GiB (1ull << 30)
#define THREADS 8
#define ITERATIONS 20000
#define HELD 16                 /* blocks each thread keeps live at once */

static void stats_of(aeg_slab_t *slab, struct aeg_slab_stats *st)
{
	assert_int_equal(aeg_slab_stats(slab, st), 0);
}

static void *aligned_range(uint64_t bytes)
{
	void *p = aligned_alloc(AEG_SLAB_ALIGN, bytes);

	assert_non_null(p);
	return p;
}

/*
 * The threads share a slab over host memory. Each 256-byte unit has an owner
 * taken with compare-and-swap when a block is handed out, so two live blocks
 * that overlap are caught at once, not only when their data collide.
 */
struct shared {
	aeg_slab_t *slab;
	unsigned char *base;
	uint64_t bytes;
	_Atomic unsigned char *owner;
	atomic_uint failed_allocs;
	atomic_uint errors;
	char first_error[256];
	pthread_mutex_t error_lock;
};

struct worker {
	struct shared *sh;
	unsigned char tag;              /* 1..THREADS: owner and fill byte */
	uint64_t rng;
};

static void worker_error(struct shared *sh, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&sh->error_lock);
	if (atomic_fetch_add(&sh->errors, 1) == 0) {
		va_start(ap, fmt);
		vsnprintf(sh->first_error, sizeof(sh->first_error), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&sh->error_lock);
}

static uint64_t worker_rnd(struct worker *w)
{
	w->rng ^= w->rng << 13;
	w->rng ^= w->rng >> 7;
	w->rng ^= w->rng << 17;
	return w->rng;
}

static int claim(struct worker *w, const struct aeg_block *b)
{
	struct shared *sh = w->sh;
	uint64_t first = b->offset / AEG_SLAB_ALIGN, n = b->size / AEG_SLAB_ALIGN;

	if (b->offset % AEG_SLAB_ALIGN || b->size % AEG_SLAB_ALIGN || b->offset + b->size > sh->bytes ||
	    (unsigned char *)b->ptr != sh->base + b->offset) {
		worker_error(sh, "block %#" PRIx64 " at %" PRIu64 "+%" PRIu64 " is misplaced", b->id,
			     b->offset, b->size);
		return -1;
	}
	for (uint64_t u = first; u < first + n; u++) {
		unsigned char expect = 0;

		if (!atomic_compare_exchange_strong(&sh->owner[u], &expect, w->tag)) {
			worker_error(sh, "block at %" PRIu64 " overlaps one of thread %u", b->offset, expect);
			return -1;
		}
	}
	memset(b->ptr, w->tag, b->size);
	return 0;
}

static void release(struct worker *w, const struct aeg_block *b)
{
	struct shared *sh = w->sh;
	const unsigned char *p = b->ptr;
	uint64_t first = b->offset / AEG_SLAB_ALIGN, n = b->size / AEG_SLAB_ALIGN;

	for (uint64_t i = 0; i < b->size; i++) {
		if (p[i] != w->tag) {
			worker_error(sh, "byte %" PRIu64 " of block at %" PRIu64 " overwritten by thread %u",
				     i, b->offset, p[i]);
			break;
		}
	}
	for (uint64_t u = first; u < first + n; u++)
		atomic_store(&sh->owner[u], 0);
	if (aeg_slab_free(sh->slab, b->id) != 0)
		worker_error(sh, "free of live block %#" PRIx64 ": %s", b->id, aeg_error_detail());
}

static void *worker_run(void *arg)
{
	struct worker *w = arg;
	struct aeg_block held[HELD];
	int live[HELD] = { 0 };

	for (unsigned it = 0; it < ITERATIONS && atomic_load(&w->sh->errors) == 0; it++) {
		unsigned slot = (unsigned)(worker_rnd(w) % HELD);
		uint64_t bytes = 1 + worker_rnd(w) % (worker_rnd(w) % 8 == 0 ? 512 * KiB : 16 * KiB);
		int err;

		if (live[slot]) {
			release(w, &held[slot]);
			live[slot] = 0;
		}
		err = aeg_slab_alloc(w->sh->slab, bytes, &held[slot]);
		if (err == AEG_ENOSPC) {
			atomic_fetch_add(&w->sh->failed_allocs, 1);
			continue;
		}
		if (err != 0) {
			worker_error(w->sh, "alloc of %" PRIu64 " bytes: %s", bytes, aeg_strerror(err));
			break;
		}
		if (claim(w, &held[slot]) != 0)
			break;
		live[slot] = 1;
	}
	for (unsigned s = 0; s < HELD; s++)
		if (live[s])
			release(w, &held[s]);
	return NULL;
}

static void threads_share_a_wrapped_slab(void **state)
{
	/* Small enough that the threads run out of space now and then. */
	const uint64_t bytes = 8 * MiB;
	struct worker workers[THREADS];
	pthread_t threads[THREADS];
	struct aeg_slab_stats st;
	struct shared sh = { .bytes = bytes };

	sh.base = aligned_range(bytes);
	sh.owner = calloc(bytes / AEG_SLAB_ALIGN, sizeof(*sh.owner));
	assert_non_null(sh.owner);
	pthread_mutex_init(&sh.error_lock, NULL);
	assert_int_equal(aeg_slab_wrap(NULL, -1, sh.base, bytes, &sh.slab), 0);
	for (int i = 0; i < THREADS; i++) {
		workers[i] = (struct worker){ .sh = &sh, .tag = (unsigned char)(i + 1),
					      .rng = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1) };
		assert_int_equal(pthread_create(&threads[i], NULL, worker_run, &workers[i]), 0);
	}
	for (int i = 0; i < THREADS; i++)
		assert_int_equal(pthread_join(threads[i], NULL), 0);
	if (atomic_load(&sh.errors) != 0)
		fail_msg("%u errors, first: %s", atomic_load(&sh.errors), sh.first_error);

	stats_of(sh.slab, &st);
	print_message("%" PRIu64 " allocs, %" PRIu64 " refused, high water %" PRIu64 " of %" PRIu64 " bytes\n",
		      st.allocs, st.failed_allocs, st.high_water_bytes, st.total_bytes);
	assert_int_equal(st.used_bytes, 0);
	assert_int_equal(st.blocks, 0);
	assert_int_equal(st.free_bytes, bytes);
	assert_int_equal(st.largest_free_bytes, bytes);
	assert_int_equal(st.allocs, st.frees);
	assert_int_equal(st.failed_allocs, atomic_load(&sh.failed_allocs));
	assert_int_equal(st.allocs + st.failed_allocs, (uint64_t)THREADS * ITERATIONS);
	assert_true(st.high_water_bytes > bytes / 2 && st.high_water_bytes <= bytes);
	aeg_slab_destroy(sh.slab);
	pthread_mutex_destroy(&sh.error_lock);
	free(sh.owner);
	free(sh.base);
}

static void alloc_failure_says_requested_and_largest(void **state)
{
	struct aeg_block a, b;
	struct aeg_slab_stats st;
	aeg_slab_t *slab;

	assert_int_equal(aeg_slab_wrap(NULL, 0, NULL, 1 * MiB, &slab), 0);
	assert_int_equal(aeg_slab_alloc(slab, 2 * MiB, &a), AEG_ENOSPC);
	assert_non_null(strstr(aeg_error_detail(), "requested 2 MiB (2097152 bytes), largest free block 1 MiB (1048576 bytes)"));
	assert_int_equal(aeg_slab_alloc(slab, 0, &a), AEG_EINVAL);
	assert_int_equal(aeg_slab_alloc(slab, 512 * KiB, &a), 0);
	assert_int_equal(aeg_slab_alloc(slab, 256 * KiB, &b), 0);
	assert_int_equal(aeg_slab_free(slab, a.id), 0);
	/* 768 KiB free, but in two pieces. */
	assert_int_equal(aeg_slab_alloc(slab, 768 * KiB, &a), AEG_ENOSPC);
	assert_string_equal(aeg_error_detail(), "requested 768 KiB (786432 bytes), largest free block 512 KiB "
			    "(524288 bytes), free 768 KiB of 1 MiB");
	stats_of(slab, &st);
	assert_int_equal(st.allocs, 2);
	assert_int_equal(st.frees, 1);
	assert_int_equal(st.failed_allocs, 3);
	assert_int_equal(st.largest_free_bytes, 512 * KiB);
	assert_int_equal(aeg_slab_free(slab, b.id), 0);
	aeg_slab_destroy(slab);
}

static void lookup_of_live_and_freed_ids(void **state)
{
	const uint64_t bytes = 4 * MiB;
	unsigned char *base = aligned_range(bytes);
	struct aeg_block a, b, found;
	struct aeg_slab_stats st;
	aeg_slab_t *slab;

	assert_int_equal(aeg_slab_wrap(NULL, 3, base, bytes, &slab), 0);
	assert_ptr_equal(aeg_slab_base(slab), base);
	assert_int_equal(aeg_slab_bytes(slab), bytes);
	assert_int_equal(aeg_slab_gpu(slab), 3);
	assert_null(aeg_slab_device(slab));

	assert_int_equal(aeg_slab_alloc(slab, 1000, &a), 0);
	assert_int_equal(aeg_slab_alloc(slab, 70000, &b), 0);
	assert_int_equal(a.size, 1024);
	assert_int_equal(b.size, 70144);
	assert_ptr_equal(b.ptr, base + b.offset);
	assert_int_equal(aeg_slab_lookup(slab, b.id, &found), 0);
	assert_memory_equal(&found, &b, sizeof(b));
	assert_int_equal(aeg_slab_free(slab, b.id), 0);
	assert_int_equal(aeg_slab_lookup(slab, b.id, &found), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "not live"));
	assert_int_equal(aeg_slab_free(slab, b.id), AEG_ENOENT);
	assert_int_equal(aeg_slab_free(slab, 0), AEG_ENOENT);
	assert_int_equal(aeg_slab_lookup(slab, a.id, &found), 0);
	assert_int_equal(found.offset, a.offset);

	stats_of(slab, &st);
	assert_int_equal(st.blocks, 1);
	assert_int_equal(st.used_bytes, 1024);
	assert_int_equal(st.high_water_bytes, 1024 + 70144);
	assert_int_equal(st.frees, 1);
	assert_int_equal(aeg_slab_free(slab, a.id), 0);
	aeg_slab_destroy(slab);
	free(base);
}

static void wrap_rejects_bad_arguments(void **state)
{
	static const struct {
		uintptr_t base;
		uint64_t bytes;
		const char *detail;
	} bad[] = {
		{ 0x100000, 0, "size 0 is not a non-zero multiple of 256" },
		{ 0x100000, 1000, "size 1000 is not a non-zero multiple of 256" },
		{ 0x100010, 4096, "is not aligned to 256 bytes" },
		{ UINTPTR_MAX - 4095, 8192, "run past the address space" },
	};
	aeg_slab_t *slab = NULL;
	aeg_handle_t handle;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		assert_int_equal(aeg_slab_wrap(NULL, 0, (void *)bad[i].base, bad[i].bytes, &slab), AEG_EINVAL);
		if (strstr(aeg_error_detail(), bad[i].detail) == NULL)
			fail_msg("case %zu: detail '%s' lacks '%s'", i, aeg_error_detail(), bad[i].detail);
		assert_null(slab);
	}
	assert_int_equal(aeg_slab_wrap(NULL, 0, NULL, 4096, NULL), AEG_EINVAL);
	assert_int_equal(aeg_slab_wrap(NULL, 0, (void *)(UINTPTR_MAX - 4095), 4096, &slab), 0);
	aeg_slab_destroy(slab);

	assert_int_equal(aeg_slab_wrap(NULL, 0, NULL, 4096, &slab), 0);
	assert_int_equal(aeg_slab_export(slab, &handle), AEG_ENOTSUP);
	assert_non_null(strstr(aeg_error_detail(), "does not own"));
	assert_int_equal(aeg_slab_alloc(NULL, 1, NULL), AEG_EINVAL);
	assert_int_equal(aeg_slab_stats(slab, NULL), AEG_EINVAL);
	aeg_slab_destroy(slab);
	aeg_slab_destroy(NULL);
}

static int open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;

	assert_non_null(d);
	while (readdir(d) != NULL)
		n++;
	closedir(d);
	return n;
}

static aeg_device_t *host_device(void)
{
	aeg_device_t *dev = NULL;

	setenv("AEGAEON_HOST_GPUS", "2", 1);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	return dev;
}

static void create_on_host_backend(void **state)
{
	const uint64_t bytes = 16 * MiB + 1;
	int fds = open_fds();
	aeg_device_t *dev = host_device();
	struct aeg_slab_stats st;
	struct aeg_block b;
	aeg_handle_t handle;
	aeg_slab_t *slab;
	unsigned char *base;
	void *opened;

	assert_int_equal(aeg_slab_create(dev, 1, bytes, &slab), 0);
	base = aeg_slab_base(slab);
	assert_int_equal((uintptr_t)base % AEG_SLAB_ALIGN, 0);
	assert_int_equal(aeg_slab_bytes(slab), 16 * MiB + AEG_SLAB_ALIGN);
	assert_int_equal(aeg_slab_gpu(slab), 1);
	assert_ptr_equal(aeg_slab_device(slab), dev);
	stats_of(slab, &st);
	assert_int_equal(st.total_bytes, 16 * MiB + AEG_SLAB_ALIGN);
	assert_int_equal(st.largest_free_bytes, st.total_bytes);

	assert_int_equal(aeg_slab_alloc(slab, 1 * MiB, &b), 0);
	assert_int_equal(aeg_slab_alloc(slab, 1 * MiB, &b), 0);
	assert_ptr_equal(b.ptr, base + 1 * MiB);
	memset(b.ptr, 0xa5, b.size);

	/* The handle opens to the same memory: what the block holds is there. */
	assert_int_equal(aeg_slab_export(slab, &handle), 0);
	assert_int_equal(aeg_mem_open_handle(dev, 1, &handle, &opened), 0);
	assert_int_equal(((unsigned char *)opened)[1 * MiB + 12345], 0xa5);
	assert_int_equal(aeg_mem_close_handle(dev, opened), 0);

	aeg_slab_destroy(slab);
	/* Freed once, by destroy: a second free finds no such allocation. */
	assert_int_equal(aeg_mem_free(dev, 1, base), AEG_EINVAL);
	aeg_device_close(dev);
	assert_int_equal(open_fds(), fds);
}

static void create_rejects_what_cannot_be(void **state)
{
	aeg_device_t *dev = host_device();
	struct aeg_gpu_info info;
	aeg_slab_t *slab = NULL;
	uint64_t too_big;

	assert_int_equal(aeg_slab_create(NULL, 0, MiB, &slab), AEG_EINVAL);
	assert_int_equal(aeg_slab_create(dev, 0, MiB, NULL), AEG_EINVAL);
	assert_int_equal(aeg_slab_create(dev, 0, 0, &slab), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "size 0"));
	assert_int_equal(aeg_slab_create(dev, 2, MiB, &slab), AEG_ENODEV);
	assert_int_equal(aeg_slab_create(dev, -1, MiB, &slab), AEG_ENODEV);

	assert_int_equal(aeg_device_gpu_info(dev, 0, &info), 0);
	too_big = info.free_bytes + 64 * GiB;
	assert_int_equal(aeg_slab_create(dev, 0, too_big, &slab), AEG_ENOSPC);
	if (strstr(aeg_error_detail(), "asked on GPU 0 (host), free") == NULL)
		fail_msg("detail: %s", aeg_error_detail());
	assert_int_equal(aeg_slab_create(dev, 0, UINT64_MAX, &slab), AEG_ENOSPC);
	assert_non_null(strstr(aeg_error_detail(), "(18446744073709551615 bytes) asked"));
	assert_null(slab);
	aeg_device_close(dev);
}

static void wrap_device_memory(void **state)
{
	aeg_device_t *dev = host_device();
	aeg_handle_t handle;
	aeg_slab_t *slab = NULL;
	struct aeg_block b;
	void *mem;

	assert_int_equal(aeg_mem_alloc(dev, 0, 4 * MiB, &mem), 0);
	assert_int_equal(aeg_slab_wrap(dev, 0, NULL, 4 * MiB, &slab), AEG_EINVAL);
	assert_int_equal(aeg_slab_wrap(dev, 2, mem, 4 * MiB, &slab), AEG_ENODEV);
	assert_null(slab);
	assert_int_equal(aeg_slab_wrap(dev, 0, mem, 4 * MiB, &slab), 0);
	assert_int_equal(aeg_slab_alloc(slab, 4 * MiB, &b), 0);
	assert_ptr_equal(b.ptr, mem);
	assert_int_equal(aeg_slab_export(slab, &handle), AEG_ENOTSUP);
	aeg_slab_destroy(slab);
	/* The wrapped memory is still its owner's to free. */
	assert_int_equal(aeg_mem_free(dev, 0, mem), 0);
	aeg_device_close(dev);
}

/* The permissions ("rw-s", "---p") of the mapping holding @addr in /proc/self/maps; "" if none does. */
static const char *prot_at(const void *addr, char perms[8])
{
	FILE *f = fopen("/proc/self/maps", "r");
	unsigned long lo, hi;
	char line[512];

	assert_non_null(f);
	perms[0] = '\0';
	while (fgets(line, sizeof(line), f) != NULL) {
		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) == 3 && (uintptr_t)addr >= lo &&
		    (uintptr_t)addr < hi)
			break;
		perms[0] = '\0';
	}
	fclose(f);
	return perms;
}

/*
 * A reserved slab: its addresses taken at once, no memory behind them until
 * an allocation reaches them (a first piece of 256 MiB, then as much again
 * as is mapped) or the rest is mapped; it has no IPC handle, and its
 * destruction gives back the memory and the addresses.
 */
static void reserved_maps_as_it_is_used(void **state)
{
	int fds = open_fds();
	aeg_device_t *dev = host_device();
	struct aeg_slab_stats st;
	struct aeg_block a, b, c;
	aeg_handle_t handle;
	aeg_slab_t *slab;
	unsigned char *base;
	char perms[8];

	assert_int_equal(aeg_slab_create_reserved(dev, 1, 1 * GiB + 1, &slab), 0);
	base = aeg_slab_base(slab);
	assert_int_equal(aeg_slab_bytes(slab), 1 * GiB + AEG_SLAB_ALIGN);
	assert_int_equal(aeg_slab_gpu(slab), 1);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 0);
	assert_string_equal(prot_at(base, perms), "---p");
	stats_of(slab, &st);
	assert_int_equal(st.total_bytes, 1 * GiB + AEG_SLAB_ALIGN);

	assert_int_equal(aeg_slab_alloc(slab, 1 * MiB, &a), 0);
	assert_ptr_equal(a.ptr, base);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 256 * MiB);
	assert_string_equal(prot_at(base, perms), "rw-s");
	assert_string_equal(prot_at(base + 256 * MiB, perms), "---p");
	memset(a.ptr, 0x5a, a.size);

	/* Past the first piece: mapped to its end and as much again as was mapped. */
	assert_int_equal(aeg_slab_alloc(slab, 300 * MiB, &b), 0);
	assert_int_equal(b.offset, 1 * MiB);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 512 * MiB);
	((unsigned char *)b.ptr)[b.size - 1] = 7;
	assert_string_equal(prot_at(base + 512 * MiB, perms), "---p");

	/* Ahead of a load's blocks: what they need beyond the live blocks, in one piece. */
	assert_int_equal(aeg_slab_map_ahead(slab, 100 * MiB), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 512 * MiB);
	/* 301 MiB live + 300 MiB + 1, to the next 2 MiB. */
	assert_int_equal(aeg_slab_map_ahead(slab, 300 * MiB + 1), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 602 * MiB);
	assert_string_equal(prot_at(base + 601 * MiB, perms), "rw-s");
	assert_string_equal(prot_at(base + 602 * MiB, perms), "---p");
	assert_int_equal(aeg_slab_map_ahead(slab, 64 * GiB), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), aeg_slab_bytes(slab));
	assert_int_equal(aeg_slab_map_rest(slab), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), aeg_slab_bytes(slab));
	assert_int_equal(aeg_slab_map_rest(slab), 0);
	assert_int_equal(aeg_slab_alloc(slab, 700 * MiB, &c), 0);
	((unsigned char *)c.ptr)[c.size - 1] = 9;
	assert_int_equal(((unsigned char *)a.ptr)[12345], 0x5a);
	assert_int_equal(((unsigned char *)b.ptr)[b.size - 1], 7);
	stats_of(slab, &st);
	assert_int_equal(st.allocs, 3);
	assert_int_equal(st.failed_allocs, 0);

	assert_int_equal(aeg_slab_export(slab, &handle), AEG_ENOTSUP);
	assert_non_null(strstr(aeg_error_detail(), "no IPC handle"));
	aeg_slab_destroy(slab);
	assert_string_equal(prot_at(base, perms), "");
	assert_string_equal(prot_at(base + 900 * MiB, perms), "");
	aeg_device_close(dev);
	assert_int_equal(open_fds(), fds);
}

/* Descriptors stop at the lowest free one: the host backend's next piece of memory cannot be made. */
static rlim_t no_more_fds(void)
{
	struct rlimit rl;
	int fd = dup(0);

	assert_true(fd >= 0);
	close(fd);
	assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
	rlim_t was = rl.rlim_cur;
	rl.rlim_cur = (rlim_t)fd;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
	return was;
}

static void fds_again(rlim_t was)
{
	struct rlimit rl;

	assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
	rl.rlim_cur = was;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
}

/*
 * Memory that cannot be mapped (the GPU's taken by another process since
 * the reservation): the allocation that needed it fails with the reason and
 * leaves nothing allocated; what was mapped stays usable; the rest maps
 * once memory is there again.
 */
static void reserved_without_memory(void **state)
{
	int fds = open_fds();
	aeg_device_t *dev = host_device();
	struct aeg_slab_stats st;
	struct aeg_block a, b;
	aeg_slab_t *slab;
	rlim_t was;

	assert_int_equal(aeg_slab_create_reserved(dev, 0, 1 * GiB, &slab), 0);
	was = no_more_fds();
	assert_int_equal(aeg_slab_alloc(slab, 1 * MiB, &a), AEG_ENOSPC);
	fds_again(was);
	if (strstr(aeg_error_detail(), "slab at ") == NULL || strstr(aeg_error_detail(), "memfd_create") == NULL ||
	    strstr(aeg_error_detail(), "(0 of its 1073741824 bytes mapped)") == NULL)
		fail_msg("detail: %s", aeg_error_detail());
	stats_of(slab, &st);
	assert_int_equal(st.allocs, 0);
	assert_int_equal(st.failed_allocs, 1);
	assert_int_equal(st.used_bytes, 0);
	assert_int_equal(st.blocks, 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 0);

	assert_int_equal(aeg_slab_alloc(slab, 1 * MiB, &a), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 256 * MiB);
	was = no_more_fds();
	assert_int_equal(aeg_slab_map_rest(slab), AEG_ENOSPC);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 256 * MiB);
	/* Within what is mapped, allocations go on; past it, they fail. */
	assert_int_equal(aeg_slab_alloc(slab, 200 * MiB, &b), 0);
	memset(b.ptr, 1, b.size);
	assert_int_equal(aeg_slab_alloc(slab, 100 * MiB, &b), AEG_ENOSPC);
	fds_again(was);
	assert_int_equal(aeg_slab_map_rest(slab), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 1 * GiB);
	assert_int_equal(aeg_slab_alloc(slab, 100 * MiB, &b), 0);
	memset(b.ptr, 2, b.size);
	aeg_slab_destroy(slab);
	aeg_device_close(dev);
	assert_int_equal(open_fds(), fds);
}

struct mapper {
	aeg_slab_t *slab;
	unsigned seed;
	atomic_int *bad;
};

/*
 * Allocate, touch the first and last byte (a fault if unmapped), free. At
 * most 32 blocks of at most 2 MiB live per thread: a quarter of the slab
 * with 8 threads, so no allocation fails for want of room.
 */
static void *alloc_and_touch(void *arg)
{
	struct mapper *m = arg;
	struct aeg_block held[32];
	int n = 0;

	for (int i = 0; i < 400; i++) {
		uint64_t bytes = (uint64_t)(rand_r(&m->seed) % (2 * MiB)) + 1;
		struct aeg_block b;

		if (n == 32 || (n > 0 && rand_r(&m->seed) % 3 == 0)) {
			int k = rand_r(&m->seed) % n;

			if (((unsigned char *)held[k].ptr)[held[k].size - 1] != (unsigned char)held[k].id ||
			    aeg_slab_free(m->slab, held[k].id) != 0)
				atomic_fetch_add(m->bad, 1);
			held[k] = held[--n];
		}
		if (aeg_slab_alloc(m->slab, bytes, &b) != 0) {
			atomic_fetch_add(m->bad, 1);
			continue;
		}
		((unsigned char *)b.ptr)[0] = 1;
		((unsigned char *)b.ptr)[b.size - 1] = (unsigned char)b.id;
		held[n++] = b;
	}
	while (n > 0)
		aeg_slab_free(m->slab, held[--n].id);
	return NULL;
}

static void *map_rest_thread(void *arg)
{
	struct mapper *m = arg;

	if (aeg_slab_map_rest(m->slab) != 0)
		atomic_fetch_add(m->bad, 1);
	return NULL;
}

/* Allocations on many threads while the rest is mapped: every block is memory when handed out. */
static void reserved_under_threads(void **state)
{
	aeg_device_t *dev = host_device();
	struct mapper m[THREADS + 1];
	pthread_t t[THREADS + 1];
	atomic_int bad = 0;
	aeg_slab_t *slab;

	assert_int_equal(aeg_slab_create_reserved(dev, 0, 2 * GiB, &slab), 0);
	for (int i = 0; i <= THREADS; i++) {
		m[i] = (struct mapper){ .slab = slab, .seed = 77u + (unsigned)i, .bad = &bad };
		assert_int_equal(pthread_create(&t[i], NULL, i == THREADS ? map_rest_thread : alloc_and_touch, &m[i]), 0);
	}
	for (int i = 0; i <= THREADS; i++)
		pthread_join(t[i], NULL);
	assert_int_equal(atomic_load(&bad), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 2 * GiB);
	aeg_slab_destroy(slab);
	aeg_device_close(dev);
}

static void reserved_rejects_what_cannot_be(void **state)
{
	aeg_device_t *dev = host_device();
	aeg_slab_t *slab = NULL;

	assert_int_equal(aeg_slab_create_reserved(NULL, 0, MiB, &slab), AEG_EINVAL);
	assert_int_equal(aeg_slab_create_reserved(dev, 0, MiB, NULL), AEG_EINVAL);
	assert_int_equal(aeg_slab_create_reserved(dev, 0, 0, &slab), AEG_EINVAL);
	assert_int_equal(aeg_slab_create_reserved(dev, 2, MiB, &slab), AEG_ENODEV);
	assert_int_equal(aeg_slab_create_reserved(dev, 0, UINT64_MAX, &slab), AEG_ENOSPC);
	assert_null(slab);
	/* A slab made otherwise is all mapped. */
	assert_int_equal(aeg_slab_create(dev, 0, 3 * MiB, &slab), 0);
	assert_int_equal(aeg_slab_mapped_bytes(slab), 3 * MiB);
	assert_int_equal(aeg_slab_map_rest(slab), 0);
	assert_int_equal(aeg_slab_map_ahead(slab, MiB), 0);
	aeg_slab_destroy(slab);
	aeg_device_close(dev);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/*
 * For information, not asserted (machines and sanitizer builds differ): the
 * median time of one alloc+free pair of 1 MiB blocks, one thread, a slab
 * with some live and free blocks around. Timed in batches so the clock's own
 * cost (~20 ns) does not count.
 */
static void alloc_free_median_time(void **state)
{
	enum { BATCHES = 301, PAIRS = 1000, AROUND = 64 };
	struct aeg_block b, around[AROUND];
	double ns[BATCHES];
	aeg_slab_t *slab;

	assert_int_equal(aeg_slab_wrap(NULL, 0, NULL, 80ull << 30, &slab), 0);
	for (int i = 0; i < AROUND; i++)
		assert_int_equal(aeg_slab_alloc(slab, (uint64_t)(i + 1) * 28 * KiB, &around[i]), 0);
	for (int i = 0; i < AROUND; i += 2)
		assert_int_equal(aeg_slab_free(slab, around[i].id), 0);
	for (int r = 0; r < BATCHES; r++) {
		uint64_t t0 = aeg_now_ns();

		for (int i = 0; i < PAIRS; i++) {
			if (aeg_slab_alloc(slab, 1 * MiB, &b) != 0 || aeg_slab_free(slab, b.id) != 0)
				fail_msg("alloc+free: %s", aeg_error_detail());
		}
		ns[r] = (double)(aeg_now_ns() - t0) / PAIRS;
	}
	qsort(ns, BATCHES, sizeof(ns[0]), cmp_double);
	print_message("slab alloc+free of 1 MiB, median %.1f ns (min %.1f, max %.1f; target <= 150 ns)\n",
		      ns[BATCHES / 2], ns[0], ns[BATCHES - 1]);
	for (int i = 1; i < AROUND; i += 2)
		assert_int_equal(aeg_slab_free(slab, around[i].id), 0);
	aeg_slab_destroy(slab);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(wrap_rejects_bad_arguments),
		cmocka_unit_test(lookup_of_live_and_freed_ids),
		cmocka_unit_test(alloc_failure_says_requested_and_largest),
		cmocka_unit_test(threads_share_a_wrapped_slab),
		cmocka_unit_test(create_on_host_backend),
		cmocka_unit_test(create_rejects_what_cannot_be),
		cmocka_unit_test(wrap_device_memory),
		cmocka_unit_test(reserved_maps_as_it_is_used),
		cmocka_unit_test(reserved_without_memory),
		cmocka_unit_test(reserved_under_threads),
		cmocka_unit_test(reserved_rejects_what_cannot_be),
		cmocka_unit_test(alloc_free_median_time),
	};
	return cmocka_run_group_tests_name("slab", tests, NULL, NULL);
}

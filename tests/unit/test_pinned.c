/*
 * The pinned pool on the host backend: sizes, acquire/release, timeouts,
 * threads, processes, page sizes (4 KiB, and 2 MiB hugetlb pages
 * when this process may reserve some: it is root) and the cached topology.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "device_host.h"
#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"
#include "topo_internal.h"
#include "hugepages.h"
#include "testutil.h"

#define MiB (UINT64_C(1) << 20)
#define HUGE (2 * MiB)
#define HUGETLBFS_MAGIC 0x958458f6
/* Pages the hugetlb case adds to vm.nr_hugepages: it needs 10 at most, the rest is slack. */
#define HUGE_RESERVE 64

/* Mappings of pool memfds in this process. */
static void acquire_release_all(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer bufs[16], extra;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;
	int seen[16] = { 0 };

	assert_int_equal(aeg_pool_create(dev, 0, 64 << 10, 1 << 20, &pool), 0);
	assert_true(aeg_pool_fd(pool) >= 0);
	assert_non_null(aeg_pool_base(pool));
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.buffers, 16);
	assert_int_equal(st.buffer_bytes, 64 << 10);
	assert_int_equal(st.pool_bytes, 1 << 20);
	assert_int_equal(st.in_use, 0);
	assert_int_equal(st.numa_node, -1);    /* no PCI id: not bound */

	for (int i = 0; i < 16; i++) {
		assert_int_equal(aeg_pool_acquire(pool, 0, &bufs[i]), 0);
		assert_true(bufs[i].index < 16);
		assert_int_equal(seen[bufs[i].index]++, 0);
		assert_int_equal(bufs[i].bytes, 64 << 10);
		assert_ptr_equal(bufs[i].ptr, aeg_pool_buffer_ptr(pool, bufs[i].index));
		assert_ptr_equal(bufs[i].ptr, (char *)aeg_pool_base(pool) + (size_t)bufs[i].index * (64 << 10));
		memset(bufs[i].ptr, i, bufs[i].bytes);
	}
	assert_int_equal(bufs[0].index, 0);     /* low buffers first */
	assert_int_equal(aeg_pool_acquire(pool, 0, &extra), AEG_ETIMEDOUT);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 16);
	assert_int_equal(st.high_water, 16);
	assert_int_equal(st.acquires, 16);
	assert_int_equal(st.timeouts, 1);
	for (int i = 0; i < 16; i++) {
		unsigned char *p = bufs[i].ptr;

		assert_int_equal(p[0], i);
		assert_int_equal(p[bufs[i].bytes - 1], i);
		assert_int_equal(aeg_pool_release(pool, bufs[i].index), 0);
	}
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 0);
	assert_int_equal(st.high_water, 16);
	assert_null(aeg_pool_buffer_ptr(pool, 16));
	aeg_pool_destroy(pool);
}

struct releaser {
	aeg_pool_t *pool;
	uint32_t index;
	int delay_ms;
};

static void *release_later(void *arg)
{
	struct releaser *r = arg;

	usleep((useconds_t)r->delay_ms * 1000);
	aeg_pool_release(r->pool, r->index);
	return NULL;
}

static void exhaustion_and_timeout(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer a, b, c;
	struct aeg_pool_stats st;
	struct releaser r;
	aeg_pool_t *pool = NULL;
	uint64_t t0;
	pthread_t t;

	assert_int_equal(aeg_pool_create(dev, 0, 4096, 8192, &pool), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &a), 0);
	assert_int_equal(aeg_pool_acquire(pool, -1, &b), 0);
	t0 = aeg_now_ns();
	assert_int_equal(aeg_pool_acquire(pool, 80, &c), AEG_ETIMEDOUT);
	assert_true(aeg_now_ns() - t0 >= 79 * 1000000ull);
	assert_non_null(strstr(aeg_error_detail(), "80 ms"));
	assert_int_equal(aeg_pool_acquire(pool, 0, &c), AEG_ETIMEDOUT);

	/* A waiter gets the buffer another thread gives back. */
	r = (struct releaser){ .pool = pool, .index = b.index, .delay_ms = 30 };
	assert_int_equal(pthread_create(&t, NULL, release_later, &r), 0);
	assert_int_equal(aeg_pool_acquire(pool, 10000, &c), 0);
	assert_int_equal(c.index, b.index);
	assert_int_equal(pthread_join(t, NULL), 0);
	r = (struct releaser){ .pool = pool, .index = c.index, .delay_ms = 30 };
	assert_int_equal(pthread_create(&t, NULL, release_later, &r), 0);
	assert_int_equal(aeg_pool_acquire(pool, -1, &c), 0);
	assert_int_equal(pthread_join(t, NULL), 0);

	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.timeouts, 2);
	assert_int_equal(st.acquires, 4);
	assert_int_equal(st.in_use, 2);
	assert_int_equal(aeg_pool_release(pool, a.index), 0);
	assert_int_equal(aeg_pool_release(pool, c.index), 0);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 0);
	aeg_pool_destroy(pool);
}

struct worker {
	aeg_pool_t *pool;
	int id;
	int errors;
};

static void *hammer(void *arg)
{
	struct worker *w = arg;

	for (int i = 0; i < 2000; i++) {
		struct aeg_pool_buffer buf;
		uint64_t *words;
		uint64_t mark = (uint64_t)w->id << 32 | (uint64_t)i;

		if (aeg_pool_acquire(w->pool, 10000, &buf) < 0) {
			w->errors++;
			continue;
		}
		words = buf.ptr;
		for (size_t k = 0; k < buf.bytes / 8; k += 61)
			words[k] = mark;
		sched_yield();  /* let another thread in while this one holds the buffer */
		for (size_t k = 0; k < buf.bytes / 8; k += 61)
			if (words[k] != mark)
				w->errors++;
		if (aeg_pool_release(w->pool, buf.index) < 0)
			w->errors++;
	}
	return NULL;
}

static void threads_share_the_pool(void **state)
{
	aeg_device_t *dev = *state;
	struct worker workers[8];
	pthread_t threads[8];
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;

	assert_int_equal(aeg_pool_create(dev, 0, 16384, 4 * 16384, &pool), 0);
	for (int i = 0; i < 8; i++) {
		workers[i] = (struct worker){ .pool = pool, .id = i + 1 };
		assert_int_equal(pthread_create(&threads[i], NULL, hammer, &workers[i]), 0);
	}
	for (int i = 0; i < 8; i++) {
		assert_int_equal(pthread_join(threads[i], NULL), 0);
		assert_int_equal(workers[i].errors, 0);
	}
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 0);
	assert_int_equal(st.acquires, 8 * 2000);
	/* How many were held at once depends on the scheduler; never more than exist. */
	assert_true(st.high_water >= 1 && st.high_water <= 4);
	assert_int_equal(st.timeouts, 0);
	aeg_pool_destroy(pool);
}

/* Child: attach through the inherited fd, take three buffers, mark them, wait, give one back. */
static int child_attaches(int fd, int to_parent, int from_parent)
{
	struct aeg_pool_buffer bufs[3];
	aeg_device_t *dev = NULL;
	aeg_pool_t *pool = NULL;
	char c;

	memset(bufs, 0, sizeof(bufs));        /* the padding goes down the pipe too */
	if (aeg_device_open(&dev, AEG_DEVICE_HOST) < 0 || aeg_pool_attach(dev, fd, &pool) < 0)
		return 10;
	for (int i = 0; i < 3; i++) {
		if (aeg_pool_acquire(pool, 0, &bufs[i]) < 0)
			return 11;
		memset(bufs[i].ptr, 0xc0 + (int)bufs[i].index, bufs[i].bytes);
	}
	if (write(to_parent, bufs, sizeof(bufs)) != sizeof(bufs) || read(from_parent, &c, 1) != 1)
		return 12;
	if (aeg_pool_release(pool, bufs[0].index) < 0)
		return 13;
	aeg_pool_destroy(pool);
	aeg_device_close(dev);
	return 0;
}

static void processes_share_the_pool(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer bufs[3], mine;
	int up[2], down[2], status;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL, *again = NULL;
	pid_t pid;

	assert_int_equal(aeg_pool_create(dev, 0, 8192, 8 * 8192, &pool), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &mine), 0);
	assert_int_equal(pipe(up), 0);
	assert_int_equal(pipe(down), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		close(up[0]);
		close(down[1]);
		child_exit(child_attaches(aeg_pool_fd(pool), up[1], down[0]));
	}
	close(up[1]);
	close(down[0]);
	assert_int_equal(read(up[0], bufs, sizeof(bufs)), sizeof(bufs));
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 4);
	for (int i = 0; i < 3; i++) {
		unsigned char *p = aeg_pool_buffer_ptr(pool, bufs[i].index);

		assert_int_not_equal(bufs[i].index, mine.index);
		assert_int_equal(p[0], 0xc0 + bufs[i].index);
		assert_int_equal(p[8191], 0xc0 + bufs[i].index);
	}
	assert_int_equal(write(down[1], "x", 1), 1);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	close(up[0]);
	close(down[1]);

	/* The child exited holding two buffers: they stay taken until someone releases them. */
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 3);
	assert_int_equal(st.acquires, 4);

	/* Attaching in the same process shares the same free list. */
	assert_int_equal(aeg_pool_attach(dev, aeg_pool_fd(pool), &again), 0);
	assert_int_not_equal(aeg_pool_fd(again), aeg_pool_fd(pool));
	assert_int_equal(aeg_pool_release(again, bufs[1].index), 0);
	assert_int_equal(aeg_pool_release(again, bufs[2].index), 0);
	assert_int_equal(aeg_pool_release(pool, bufs[2].index), AEG_EINVAL);
	assert_int_equal(aeg_pool_release(pool, mine.index), 0);
	assert_int_equal(aeg_pool_stats(again, &st), 0);
	assert_int_equal(st.in_use, 0);
	assert_int_equal(st.buffers, 8);
	aeg_pool_destroy(again);
	aeg_pool_destroy(pool);
}

static void bad_sizes(void **state)
{
	static const struct {
		uint64_t buffer, pool;
		int err;
		const char *detail;
	} cases[] = {
		{ 0, 1 << 20, AEG_EINVAL, "buffer size 0" },
		{ 4095, 1 << 20, AEG_EINVAL, "multiple of 4096" },
		{ 4097, 1 << 20, AEG_EINVAL, "multiple of 4096" },
		{ 6144, 1 << 20, AEG_EINVAL, "multiple of 4096" },
		{ 4096, 0, AEG_EINVAL, "pool size 0" },
		{ 8192, 4096, AEG_EINVAL, "larger than the pool" },
		{ 4096, 1ull << 44, AEG_EINVAL, "at most" },            /* 2^32 buffers */
		{ 1ull << 30, 1ull << 50, AEG_ENOMEM, "MemAvailable" },
	};
	aeg_device_t *dev = *state;
	struct aeg_pool_stats st;
	aeg_pool_t *pool;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		int err;

		pool = NULL;
		err = aeg_pool_create(dev, 0, cases[i].buffer, cases[i].pool, &pool);
		if (err != cases[i].err || strstr(aeg_error_detail(), cases[i].detail) == NULL)
			fail_msg("case %zu: got %s (%s), expected %s (%s)", i, aeg_errname(err),
				 aeg_error_detail(), aeg_errname(cases[i].err), cases[i].detail);
		assert_null(pool);
	}
	assert_int_equal(aeg_pool_create(dev, 1, 4096, 8192, &pool), AEG_ENODEV);
	assert_int_equal(aeg_pool_create(NULL, 0, 4096, 8192, &pool), AEG_EINVAL);

	/* A pool size that is not a multiple of the buffer size is rounded down. */
	assert_int_equal(aeg_pool_create(dev, 0, 8192, 20000, &pool), 0);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.buffers, 2);
	assert_int_equal(st.pool_bytes, 16384);
	aeg_pool_destroy(pool);
}

static void attach_bad_fds(void **state)
{
	aeg_device_t *dev = *state;
	aeg_pool_t *pool = NULL, *good = NULL;
	int fd, fds[2];
	char page[8192];

	assert_int_equal(aeg_pool_attach(dev, -1, &pool), AEG_EBADF);
	assert_int_equal(aeg_pool_attach(dev, 999, &pool), AEG_EBADF);
	fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	assert_true(fd >= 0);
	assert_int_equal(aeg_pool_attach(dev, fd, &pool), AEG_EINVAL);
	close(fd);
	assert_int_equal(pipe(fds), 0);
	assert_int_equal(aeg_pool_attach(dev, fds[0], &pool), AEG_EINVAL);
	close(fds[0]);
	close(fds[1]);

	/* A file of zeros, and a short one, are not pools. */
	fd = memfd_create("not-a-pool", MFD_CLOEXEC);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 8192), 0);
	assert_int_equal(aeg_pool_attach(dev, fd, &pool), AEG_EINVAL);
	assert_int_equal(ftruncate(fd, 100), 0);
	assert_int_equal(aeg_pool_attach(dev, fd, &pool), AEG_EINVAL);

	/* A real pool's header on a file of the wrong size is corrupt. */
	assert_int_equal(aeg_pool_create(dev, 0, 4096, 4 * 4096, &good), 0);
	assert_int_equal(pread(aeg_pool_fd(good), page, sizeof(page), 0), (ssize_t)sizeof(page));
	assert_int_equal(ftruncate(fd, 0), 0);
	assert_int_equal(pwrite(fd, page, sizeof(page), 0), (ssize_t)sizeof(page));
	assert_int_equal(aeg_pool_attach(dev, fd, &pool), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "corrupt"));
	assert_null(pool);
	close(fd);
	aeg_pool_destroy(good);
}

static void release_not_acquired(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer buf;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;

	assert_int_equal(aeg_pool_create(dev, 0, 4096, 4 * 4096, &pool), 0);
	assert_int_equal(aeg_pool_release(pool, 0), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "not acquired"));
	assert_int_equal(aeg_pool_release(pool, 4), AEG_EINVAL);
	assert_int_equal(aeg_pool_release(pool, UINT32_MAX), AEG_EINVAL);
	assert_int_equal(aeg_pool_acquire(pool, 0, &buf), 0);
	assert_int_equal(aeg_pool_release(pool, buf.index), 0);
	assert_int_equal(aeg_pool_release(pool, buf.index), AEG_EINVAL);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 0);
	/* Failed releases did not push a buffer twice: four, then none. */
	for (int i = 0; i < 4; i++)
		assert_int_equal(aeg_pool_acquire(pool, 0, &buf), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &buf), AEG_ETIMEDOUT);
	assert_int_equal(aeg_pool_acquire(NULL, 0, &buf), AEG_EINVAL);
	aeg_pool_destroy(pool);
}

/* An open of the host backend whose GPU 0 sits at 0000:01:00.0 of tests/unit/topo/one-node.xml. */
static aeg_device_t *open_on_xml(void)
{
	const char *top = getenv("top_srcdir");
	aeg_device_t *dev = NULL;
	char path[4096];

	snprintf(path, sizeof(path), "%s/tests/unit/topo/one-node.xml", top != NULL ? top : ".");
	setenv("AEGAEON_TOPOLOGY_XML", path, 1);
	setenv("AEGAEON_HOST_PCI_BUS_IDS", "0000:01:00.0", 1);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	return dev;
}

static void bound_to_the_gpu_node(void **state)
{
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;
	aeg_device_t *dev;
	cpu_set_t before, after;

	/* The XML is not this machine: binding is refused, the pool is made unbound. */
	unsetenv("HWLOC_THISSYSTEM");
	dev = open_on_xml();
	assert_int_equal(aeg_pool_create(dev, 0, 1 << 20, 4 << 20, &pool), 0);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.numa_node, -1);
	aeg_pool_destroy(pool);
	aeg_device_close(dev);

	/* Said to be this machine (one node, 0): the pages are bound to node 0, the caller stays where it was. */
	setenv("HWLOC_THISSYSTEM", "1", 1);
	dev = open_on_xml();
	assert_int_equal(sched_getaffinity(0, sizeof(before), &before), 0);
	assert_int_equal(aeg_pool_create(dev, 0, 1 << 20, 4 << 20, &pool), 0);
	assert_int_equal(sched_getaffinity(0, sizeof(after), &after), 0);
	assert_true(CPU_EQUAL(&before, &after));
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.numa_node, 0);
	aeg_pool_destroy(pool);
	aeg_device_close(dev);
	unsetenv("HWLOC_THISSYSTEM");
	unsetenv("AEGAEON_TOPOLOGY_XML");
}

static void no_leaks(void **state)
{
	aeg_device_t *dev = *state;
	int fds = count_fds(), maps = count_pool_maps();

	for (int round = 0; round < 3; round++) {
		aeg_pool_t *pool = NULL, *other = NULL;
		struct aeg_pool_buffer buf;
		struct aeg_pool_timing timing;

		assert_int_equal(aeg_pool_create(dev, 0, 1 << 20, 8 << 20, &pool), 0);
		aeg_pool_timing(pool, &timing);
		assert_true(timing.total_ns >= timing.populate_ns + timing.register_ns);
		assert_int_equal(aeg_pool_attach(dev, aeg_pool_fd(pool), &other), 0);
		assert_int_equal(aeg_pool_acquire(other, 0, &buf), 0);
		assert_int_equal(aeg_pool_release(pool, buf.index), 0);
		assert_int_equal(count_pool_maps(), maps + 2);
		aeg_pool_destroy(other);
		aeg_pool_destroy(pool);
	}
	aeg_pool_destroy(NULL);
	assert_int_equal(count_fds(), fds);
	assert_int_equal(count_pool_maps(), maps);
}

static int is_hugetlb(int fd)
{
	struct statfs sfs;

	return fstatfs(fd, &sfs) == 0 && (unsigned long)sfs.f_type == HUGETLBFS_MAGIC;
}

static void four_kib_pages(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_timing timing;
	aeg_pool_t *pool = NULL;
	cpu_set_t set;
	unsigned want;

	/* "never" whatever the admin reserved, even for buffers of whole huge pages */
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_pool_create(dev, 0, HUGE, 4 * HUGE, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.page_bytes, 4096);
	assert_false(is_hugetlb(aeg_pool_fd(pool)));
	assert_int_equal(timing.threads, 1);    /* less than 64 MiB: one thread */
	aeg_pool_destroy(pool);

	/* "auto" with buffers smaller than a huge page */
	setenv("AEGAEON_PINNED_HUGEPAGES", "auto", 1);
	assert_int_equal(aeg_pool_create(dev, 0, 64 << 10, 4 * HUGE, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.page_bytes, 4096);
	assert_false(is_hugetlb(aeg_pool_fd(pool)));
	aeg_pool_destroy(pool);

	/*
	 * 128 MiB and a header: four units of 32 MiB, a thread each, no more
	 * than the CPUs (this expected two whatever the CPUs, which only a
	 * machine of two CPUs gave).
	 */
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(sched_getaffinity(0, sizeof(set), &set), 0);
	want = CPU_COUNT(&set) < 4 ? (unsigned)CPU_COUNT(&set) : 4;
	assert_int_equal(aeg_pool_create(dev, 0, MiB, 128 * MiB, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.threads, want);
	assert_true(timing.total_ns >= timing.bind_ns + timing.populate_ns + timing.register_ns);
	aeg_pool_destroy(pool);

	/* 1 GiB of shared 4 KiB pages: no more than 4 threads, whatever the CPUs (they contend for one memfd) */
	want = CPU_COUNT(&set) < 4 ? (unsigned)CPU_COUNT(&set) : 4;
	assert_int_equal(aeg_pool_create(dev, 0, MiB, 1024 * MiB, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.page_bytes, 4096);
	assert_int_equal(timing.threads, want);
	aeg_pool_destroy(pool);
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
}

/* Whether the process can still write to @p: a child (this process, forked) tries. */
static int child_can_write(volatile char *p)
{
	pid_t pid = fork();
	int status;

	assert_true(pid >= 0);
	if (pid == 0) {
		/* cmocka's handler would report the fault as this test's and run the rest here. */
		signal(SIGSEGV, SIG_DFL);
		p[0] = 1;
		_exit(0);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/*
 * A pool private to this process (a prefetch engine's staging ring): no
 * memfd and nothing to share (aeg_pool_fd fails), buffers on 2 MiB
 * boundaries for transparent huge pages, not inherited by a child (a fork
 * would share its pinned pages copy-on-write), and otherwise a pool.
 */
static void private_pool(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer b[4];
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL, *shared = NULL;
	int maps = count_pool_maps(), fds = count_fds();

	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_pool_create_private(dev, 0, MiB, 4 * MiB, &pool), 0);
	assert_int_equal(count_pool_maps(), maps);
	assert_int_equal(count_fds(), fds);
	assert_int_equal(aeg_pool_fd(pool), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "private"));
	assert_int_equal((uintptr_t)aeg_pool_base(pool) % HUGE, 0);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.buffers, 4);
	for (int i = 0; i < 4; i++) {
		assert_int_equal(aeg_pool_acquire(pool, 0, &b[i]), 0);
		memset(b[i].ptr, 0x40 + i, b[i].bytes);
	}
	assert_int_equal(aeg_pool_acquire(pool, 0, &b[0]) == AEG_ETIMEDOUT, 1);
	for (int i = 0; i < 4; i++)
		assert_int_equal(aeg_pool_release(pool, b[i].index), 0);
	assert_false(child_can_write(aeg_pool_base(pool)));
	/* The shared pool next to it is inherited, as its processes need. */
	assert_int_equal(aeg_pool_create(dev, 0, MiB, 4 * MiB, &shared), 0);
	assert_true(child_can_write(aeg_pool_base(shared)));
	aeg_pool_destroy(shared);
	aeg_pool_destroy(pool);
	assert_int_equal(count_fds(), fds);
	unsetenv("AEGAEON_PINNED_HUGEPAGES");

	/* Bad sizes fail as for a shared pool, with nothing left. */
	assert_int_equal(aeg_pool_create_private(dev, 0, 0, MiB, &pool), AEG_EINVAL);
	assert_null(pool);
	assert_int_equal(aeg_pool_create_private(dev, 0, 2 * MiB, MiB, &pool), AEG_EINVAL);
	assert_int_equal(aeg_pool_create_private(dev, 3, MiB, MiB, &pool), AEG_ENODEV);
}

/* What an early pool's ready call saw. */
struct early {
	aeg_device_t *dev;
	aeg_pool_t *pool;
	int calls;
	uint32_t usable;                /* buffers acquirable at once when it was called */
	int take_second;                /* the test registers buffer 1 itself: the pool's own registration fails */
	pthread_t waiter;
	int waiter_started;
	uint32_t taken;                 /* by the waiter, each acquired with a wait */
	int seen[8];
};

/* A user of the pool as soon as it is handed out: waits for every buffer, holding each. */
static void *take_all(void *arg)
{
	struct early *e = arg;
	struct aeg_pool_buffer b;
	struct aeg_pool_stats st;

	if (aeg_pool_stats(e->pool, &st) != 0)
		return NULL;
	while (e->taken < st.buffers && aeg_pool_acquire(e->pool, 10000, &b) == 0) {
		e->seen[b.index]++;
		memset(b.ptr, 0x5a, b.bytes);
		e->taken++;
	}
	return NULL;
}

static void early_ready(aeg_pool_t *pool, void *arg)
{
	struct early *e = arg;
	struct aeg_pool_buffer b[8];
	struct aeg_pool_stats st;
	char unmade[64];
	uint32_t n = 0;

	e->calls++;
	e->pool = pool;
	while (n < 8 && aeg_pool_acquire(pool, 0, &b[n]) == 0)
		n++;
	e->usable = n;
	/* The others are neither free nor in use: not made yet. */
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	snprintf(unmade, sizeof(unmade), "%u of its %u buffers", st.buffers - n, st.buffers);
	assert_non_null(strstr(aeg_error_detail(), unmade));
	assert_non_null(strstr(aeg_error_detail(), "not made, the others in use"));
	for (uint32_t i = 0; i < n; i++)
		assert_int_equal(aeg_pool_release(pool, b[i].index), 0);
	if (e->take_second)
		assert_int_equal(aeg_host_register(e->dev, aeg_pool_buffer_ptr(pool, 1), MiB, 0), 0);
	else
		e->waiter_started = pthread_create(&e->waiter, NULL, take_all, e) == 0;
}

/*
 * An early private pool is handed out at its first buffer, before it is
 * made: a user waiting for buffers gets each as it is registered, and once
 * made it is the pool returned. A buffer that cannot be registered after
 * the hand-out leaves the pool with those it had; bad sizes fail before.
 */
static void early_private_pool(void **state)
{
	aeg_device_t *dev = *state;
	struct early e = { .dev = dev };
	struct aeg_pool_buffer b;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;
	size_t ranges = host_registered_ranges(dev);
	int maps = count_pool_maps(), fds = count_fds();

	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_pool_create_private_early(dev, 0, MiB, 8 * MiB, early_ready, &e, &pool), 0);
	assert_int_equal(e.calls, 1);
	assert_ptr_equal(e.pool, pool);
	/* Handed out once one buffer was registered, before the others. */
	assert_int_equal(e.usable, 1);
	assert_true(e.waiter_started);
	assert_int_equal(pthread_join(e.waiter, NULL), 0);
	assert_int_equal(e.taken, 8);
	for (int i = 0; i < 8; i++)
		assert_int_equal(e.seen[i], 1);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.buffers, 8);
	assert_int_equal(st.in_use, 8);
	assert_int_equal(st.high_water, 8);
	assert_int_equal(st.acquires, 8 + 1);       /* the ready call's one, and the waiter's */
	for (uint32_t i = 0; i < 8; i++)
		assert_int_equal(aeg_pool_release(pool, i), 0);
	assert_int_equal(aeg_pool_release(pool, 0), AEG_EINVAL);
	assert_false(child_can_write(aeg_pool_base(pool)));
	assert_int_equal(host_registered_ranges(dev), ranges + 8);
	aeg_pool_destroy(pool);
	assert_int_equal(host_registered_ranges(dev), ranges);

	/* Buffer 1's registration refused after the hand-out: the pool keeps buffer 0, and says so. */
	memset(&e, 0, sizeof(e));
	e.dev = dev;
	e.take_second = 1;
	pool = NULL;
	assert_int_equal(aeg_pool_create_private_early(dev, 0, MiB, 4 * MiB, early_ready, &e, &pool), 0);
	assert_int_equal(e.calls, 1);
	assert_int_equal(aeg_pool_acquire(pool, 0, &b), 0);
	assert_int_equal(b.index, 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &b) == AEG_ETIMEDOUT, 1);
	assert_non_null(strstr(aeg_error_detail(), "3 of its 4 buffers of 1048576 bytes not made"));
	assert_int_equal(aeg_pool_release(pool, 0), 0);
	assert_int_equal(host_registered_ranges(dev), ranges + 2);
	assert_int_equal(aeg_host_unregister(dev, aeg_pool_buffer_ptr(pool, 1)), 0);
	aeg_pool_destroy(pool);
	assert_int_equal(host_registered_ranges(dev), ranges);
	assert_int_equal(count_pool_maps(), maps);
	assert_int_equal(count_fds(), fds);

	/* Bad sizes and no ready call fail before anything is made or handed out. */
	memset(&e, 0, sizeof(e));
	pool = NULL;
	assert_int_equal(aeg_pool_create_private_early(dev, 0, 0, MiB, early_ready, &e, &pool), AEG_EINVAL);
	assert_int_equal(aeg_pool_create_private_early(dev, 0, 2 * MiB, MiB, early_ready, &e, &pool), AEG_EINVAL);
	assert_int_equal(aeg_pool_create_private_early(dev, 3, MiB, MiB, early_ready, &e, &pool), AEG_ENODEV);
	assert_int_equal(aeg_pool_create_private_early(dev, 0, MiB, MiB, NULL, &e, &pool), AEG_EINVAL);
	assert_null(pool);
	assert_int_equal(e.calls, 0);
	assert_int_equal(host_registered_ranges(dev), ranges);
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
}

/* Whether [@p, +@bytes) is mapped, and (*@resident) every page of it in memory. */
static int mapped(void *p, uint64_t bytes, int *resident)
{
	size_t pages = bytes / 4096;
	unsigned char *vec = malloc(pages);
	int rc;

	assert_non_null(vec);
	rc = mincore(p, bytes, vec);
	assert_true(rc == 0 || errno == ENOMEM);
	if (resident != NULL) {
		*resident = rc == 0;
		for (size_t i = 0; rc == 0 && i < pages; i++)
			*resident &= vec[i] & 1;
	}
	free(vec);
	return rc == 0;
}

/* The memory made ahead is all in: its thread is done (10 s at most). */
static void wait_made_ahead(void)
{
	int populated = 0;

	for (int i = 0; i < 10000 && !populated; i++) {
		assert_true(aeg_pool_premade(NULL, &populated) > 0);
		if (!populated)
			usleep(1000);
	}
	assert_true(populated);
}

/*
 * Memory made ahead for a private pool (a staging ring): the next private
 * pool of its size takes it with its pages in, one of another size gives it
 * back, a later one of another size replaces it, a child has none of it,
 * a pool for a GPU on another NUMA node gives it back; nothing is made
 * where 2 MiB huge pages are asked for, and sizes that make no pool fail.
 */
static void made_ahead(void **state)
{
	static const struct {
		uint64_t buffer, pool;
		const char *detail;
	} bad[] = {
		{ 0, MiB, "1048576 bytes in buffers of 0 is no pool" },
		{ MiB + 1, 4 * MiB, "buffers of 1048577 is no pool" },
		{ 2 * MiB, MiB, "1048576 bytes in buffers of 2097152 is no pool" },
	};
	const uint64_t bytes = HUGE + 8 * MiB;       /* a private pool's header fills a huge page */
	aeg_device_t *dev = *state;
	struct aeg_pool_timing timing;
	struct early e = { .dev = dev };
	aeg_pool_t *pool = NULL;
	void *map, *again;
	int resident, status;
	pid_t pid;

	unsetenv("AEGAEON_TOPOLOGY_XML");
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	/* Made for other settings: a later one replaces it; one of the same size keeps it. */
	assert_int_equal(aeg_pool_premake(MiB, 4 * MiB), 0);
	assert_int_equal(aeg_pool_premade(&again, NULL), HUGE + 4 * MiB);
	assert_int_equal(aeg_pool_premake(MiB, 8 * MiB), 0);
	assert_int_equal(aeg_pool_premade(&map, NULL), bytes);
	assert_int_equal(aeg_pool_premake(MiB, 8 * MiB), 0);
	assert_int_equal(aeg_pool_premade(&again, NULL), bytes);
	assert_ptr_equal(again, map);
	wait_made_ahead();
	assert_true(mapped(map, bytes, &resident));
	assert_true(resident);
	/* Taken whole by an early pool of its size, which works as any. */
	assert_int_equal(aeg_pool_create_private_early(dev, 0, MiB, 8 * MiB, early_ready, &e, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.ahead, 2);
	assert_ptr_equal(aeg_pool_base(pool), (char *)map + HUGE);
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	assert_true(e.waiter_started);
	assert_int_equal(pthread_join(e.waiter, NULL), 0);
	assert_int_equal(e.taken, 8);
	for (uint32_t i = 0; i < 8; i++)
		assert_int_equal(aeg_pool_release(pool, i), 0);
	assert_false(child_can_write(aeg_pool_base(pool)));
	aeg_pool_destroy(pool);
	assert_false(mapped(map, bytes, NULL));

	/* Taken at once, its thread stopped wherever it was: the pool populates the rest. */
	assert_int_equal(aeg_pool_premake(MiB, 64 * MiB), 0);
	assert_int_equal(aeg_pool_create_private(dev, 0, MiB, 64 * MiB, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_true(timing.ahead == 1 || timing.ahead == 2);
	assert_true(mapped(aeg_pool_base(pool), 64 * MiB, &resident));
	assert_true(resident);
	aeg_pool_destroy(pool);

	/* Another size: given back, and the pool maps its own. */
	assert_int_equal(aeg_pool_premake(MiB, 8 * MiB), 0);
	assert_int_equal(aeg_pool_premade(&map, NULL), bytes);
	assert_int_equal(aeg_pool_create_private(dev, 0, MiB, 4 * MiB, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.ahead, 0);
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	assert_false(mapped(map, bytes, NULL));
	aeg_pool_destroy(pool);

	/*
	 * A child, forked while it is made (256 MiB: its thread is at it
	 * still), has none of it; the parent keeps it.
	 */
	assert_int_equal(aeg_pool_premake(MiB, 256 * MiB), 0);
	assert_int_equal(aeg_pool_premade(&map, NULL), HUGE + 256 * MiB);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int ok = aeg_pool_premade(NULL, NULL) == 0 && !mapped(map, HUGE + 256 * MiB, NULL) &&
			 aeg_pool_create_private(dev, 0, MiB, 256 * MiB, &pool) == 0;

		if (ok) {
			aeg_pool_timing(pool, &timing);
			ok = timing.ahead == 0;
		}
		_exit(ok ? 0 : 1);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(aeg_pool_premade(NULL, NULL), HUGE + 256 * MiB);
	aeg_pool_premade_drop();
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	assert_false(mapped(map, HUGE + 256 * MiB, NULL));
	aeg_pool_premade_drop();

	/*
	 * A GPU on a NUMA node of its own (tests/unit/topo/two-node.xml, not
	 * this machine, so nothing is bound): on a machine of one node, 0, the
	 * pages made ahead are on node 0, so a pool for the GPU next to node 0
	 * takes them, one for the GPU next to node 1 gives them back.
	 */
	if (machine_sole_node() == 0) {
		static const struct {
			const char *pci;
			int taken;
		} gpus[] = { { "0000:3b:00.0", 1 }, { "0000:af:00.0", 0 } };
		const char *top = getenv("top_srcdir");
		char xml[4096];

		snprintf(xml, sizeof(xml), "%s/tests/unit/topo/two-node.xml", top != NULL ? top : ".");
		unsetenv("HWLOC_THISSYSTEM");
		for (size_t i = 0; i < sizeof(gpus) / sizeof(gpus[0]); i++) {
			aeg_device_t *there = NULL;

			setenv("AEGAEON_TOPOLOGY_XML", xml, 1);
			setenv("AEGAEON_HOST_PCI_BUS_IDS", gpus[i].pci, 1);
			assert_int_equal(aeg_device_open(&there, AEG_DEVICE_HOST), 0);
			unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
			assert_int_equal(aeg_pool_premake(MiB, 8 * MiB), 0);
			assert_int_equal(aeg_pool_premade(NULL, NULL), bytes);
			wait_made_ahead();      /* pages not in yet would come in bound, where the pool's go */
			assert_int_equal(aeg_pool_create_private(there, 0, MiB, 8 * MiB, &pool), 0);
			aeg_pool_timing(pool, &timing);
			assert_int_equal(timing.ahead != 0, gpus[i].taken);
			assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
			aeg_pool_destroy(pool);
			aeg_device_close(there);
		}
		unsetenv("AEGAEON_TOPOLOGY_XML");
	}

	/* Nothing made: huge pages asked for, sizes that make no pool. */
	setenv("AEGAEON_PINNED_HUGEPAGES", "always", 1);
	assert_int_equal(aeg_pool_premake(HUGE, 4 * HUGE), 0);
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(aeg_pool_premake(bad[i].buffer, bad[i].pool), AEG_EINVAL);
		assert_non_null(strstr(aeg_error_detail(), bad[i].detail));
		assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	}
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
}

static void bad_hugepage_modes(void **state)
{
	static const struct {
		const char *mode;
		uint64_t buffer, pool;
		int err;
		const char *detail;
	} cases[] = {
		{ "sometimes", HUGE, 4 * HUGE, AEG_EINVAL, "AEGAEON_PINNED_HUGEPAGES='sometimes' is not auto, never or always" },
		{ "ALWAYS", HUGE, 4 * HUGE, AEG_EINVAL, "'ALWAYS' is not auto, never or always" },
		{ "always", 64 << 10, 4 * HUGE, AEG_EINVAL, "buffer size 65536 is not a multiple of 2 MiB" },
		{ "always", 3 * MiB, 6 * MiB, AEG_EINVAL, "buffer size 3145728 is not a multiple of 2 MiB" },
		/* 2^19 buffers and a header of 3 huge pages: more than any machine here reserves */
		{ "always", HUGE, UINT64_C(1) << 40, AEG_ENOMEM, "524291 huge pages of 2 MiB needed" },
	};
	aeg_device_t *dev = *state;
	int fds = count_fds(), maps = count_pool_maps();

	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		aeg_pool_t *pool = NULL;
		int err, want = cases[i].err;
		const char *detail = cases[i].detail;
		long before = huge_avail(), after;
		char shortfall[64];

		if (want == AEG_ENOMEM && before < 0) {
			want = AEG_ENOTSUP;
			detail = "offers no 2 MiB huge pages";
		}
		setenv("AEGAEON_PINNED_HUGEPAGES", cases[i].mode, 1);
		err = aeg_pool_create(dev, 0, cases[i].buffer, cases[i].pool, &pool);
		if (err != want || strstr(aeg_error_detail(), detail) == NULL)
			fail_msg("case %zu: got %s (%s), expected %s (%s)", i, aeg_errname(err),
				 aeg_error_detail(), aeg_errname(want), detail);
		assert_null(pool);
		after = huge_avail();
		if (want == AEG_ENOMEM) {
			/* The user is told how many are missing and how to reserve them. */
			assert_non_null(strstr(aeg_error_detail(), "sysctl vm.nr_hugepages="));
			snprintf(shortfall, sizeof(shortfall), "%ld free", before);
			if (before == after)    /* nobody took or gave pages meanwhile */
				assert_non_null(strstr(aeg_error_detail(), shortfall));
			snprintf(shortfall, sizeof(shortfall), "%ld short", 524291 - before);
			if (before == after)
				assert_non_null(strstr(aeg_error_detail(), shortfall));
		}
	}
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	assert_int_equal(count_fds(), fds);
	assert_int_equal(count_pool_maps(), maps);
}

struct huge_fixture {
	aeg_device_t *dev;
	long added;             /* pages this test added to vm.nr_hugepages; -1: none, see skip */
	char skip[256];         /* why the hugetlb case cannot run here */
};

/* Reserve huge pages when there are too few free and this process may (root). */
static int huge_setup(void **state)
{
	struct huge_fixture *f = calloc(1, sizeof(*f));
	void *dev = NULL;

	if (f == NULL || host_device_setup(&dev) != 0) {
		free(f);
		return -1;
	}
	f->dev = dev;
	*state = f;
	f->added = reserve_huge(HUGE_RESERVE, 10, f->skip, sizeof(f->skip));
	return 0;
}

/* Take back what was added, even when the test failed. */
static int huge_teardown(void **state)
{
	struct huge_fixture *f = *state;
	void *dev = f->dev;

	release_huge(f->added);
	host_device_teardown(&dev);
	free(f);
	return 0;
}

static void hugetlb_pool(void **state)
{
	struct huge_fixture *f = *state;
	aeg_device_t *dev = f->dev;
	struct aeg_pool_buffer bufs[8], theirs[3];
	struct aeg_pool_timing timing;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL, *again = NULL;
	int fds = count_fds(), maps = count_pool_maps(), up[2], down[2], status;
	pid_t pid;

	if (f->skip[0] != '\0') {
		print_message("skipping the hugetlb pool case: %s\n", f->skip);
		skip();
	}
	/* "auto" takes them: 8 buffers of 2 MiB and a header page of its own, 9 huge pages. */
	assert_int_equal(aeg_pool_create(dev, 0, HUGE, 8 * HUGE, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.page_bytes, HUGE);
	assert_true(is_hugetlb(aeg_pool_fd(pool)));
	assert_int_equal((uintptr_t)aeg_pool_base(pool) % HUGE, 0);
	for (int i = 0; i < 8; i++) {
		assert_int_equal(aeg_pool_acquire(pool, 0, &bufs[i]), 0);
		assert_int_equal((uintptr_t)bufs[i].ptr % HUGE, 0);
		assert_int_equal(bufs[i].bytes, HUGE);
		memset(bufs[i].ptr, 0x40 + (int)bufs[i].index, HUGE);
	}
	for (int i = 0; i < 8; i++) {
		unsigned char *p = bufs[i].ptr;

		assert_int_equal(p[0], 0x40 + bufs[i].index);
		assert_int_equal(p[HUGE - 1], 0x40 + bufs[i].index);
		assert_int_equal(aeg_pool_release(pool, bufs[i].index), 0);
	}
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.buffers, 8);
	assert_int_equal(st.in_use, 0);

	/* Another process attaches the hugetlb memfd and shares the free list. */
	assert_int_equal(aeg_pool_acquire(pool, 0, &bufs[0]), 0);
	assert_int_equal(pipe(up), 0);
	assert_int_equal(pipe(down), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		close(up[0]);
		close(down[1]);
		child_exit(child_attaches(aeg_pool_fd(pool), up[1], down[0]));
	}
	close(up[1]);
	close(down[0]);
	assert_int_equal(read(up[0], theirs, sizeof(theirs)), sizeof(theirs));
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 4);
	for (int i = 0; i < 3; i++) {
		unsigned char *p = aeg_pool_buffer_ptr(pool, theirs[i].index);

		assert_int_equal(p[0], 0xc0 + theirs[i].index);
		assert_int_equal(p[HUGE - 1], 0xc0 + theirs[i].index);
	}
	assert_int_equal(write(down[1], "x", 1), 1);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	close(up[0]);
	close(down[1]);

	/* And this process, a second time: the mapping is whole huge pages. */
	assert_int_equal(aeg_pool_attach(dev, aeg_pool_fd(pool), &again), 0);
	aeg_pool_timing(again, &timing);
	assert_int_equal(timing.page_bytes, HUGE);
	assert_int_equal(count_pool_maps(), maps + 2);
	assert_int_equal(aeg_pool_release(again, theirs[1].index), 0);
	assert_int_equal(aeg_pool_release(again, theirs[2].index), 0);
	assert_int_equal(aeg_pool_release(pool, bufs[0].index), 0);
	assert_int_equal(aeg_pool_stats(again, &st), 0);
	assert_int_equal(st.in_use, 0);
	aeg_pool_destroy(again);
	aeg_pool_destroy(pool);
	assert_int_equal(count_fds(), fds);
	assert_int_equal(count_pool_maps(), maps);

	/* An early private pool takes them too, and is handed out at its first buffer. */
	{
		struct early e = { .dev = dev };

		assert_int_equal(aeg_pool_create_private_early(dev, 0, HUGE, 4 * HUGE, early_ready, &e, &pool), 0);
		aeg_pool_timing(pool, &timing);
		assert_int_equal(timing.page_bytes, HUGE);
		assert_true(timing.usable_ns > 0 && timing.usable_ns <= timing.total_ns);
		assert_int_equal(e.calls, 1);
		assert_int_equal(e.usable, 1);
		assert_true(e.waiter_started);
		assert_int_equal(pthread_join(e.waiter, NULL), 0);
		assert_int_equal(e.taken, 4);
		for (uint32_t i = 0; i < 4; i++)
			assert_int_equal(aeg_pool_release(pool, i), 0);
		aeg_pool_destroy(pool);
		assert_int_equal(count_fds(), fds);
		assert_int_equal(count_pool_maps(), maps);
	}

	/* "always" takes them too, "never" does not. */
	setenv("AEGAEON_PINNED_HUGEPAGES", "always", 1);
	assert_int_equal(aeg_pool_create(dev, 0, 2 * HUGE, 4 * HUGE, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.page_bytes, HUGE);
	assert_true(is_hugetlb(aeg_pool_fd(pool)));
	aeg_pool_destroy(pool);
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_pool_create(dev, 0, 2 * HUGE, 4 * HUGE, &pool), 0);
	aeg_pool_timing(pool, &timing);
	assert_int_equal(timing.page_bytes, 4096);
	assert_false(is_hugetlb(aeg_pool_fd(pool)));
	aeg_pool_destroy(pool);
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
}

/*
 * Pools on a GPU with a PCI bus id look its locality up: on a machine of
 * one NUMA node that node, with no topology loaded (hwloc's discovery would
 * hold up a fresh process's ring); elsewhere the topology, loaded once.
 */
static void topology_loaded_once(void **state)
{
	aeg_pool_t *a = NULL, *b = NULL;
	aeg_device_t *dev = NULL;
	uint64_t loads = aeg_topo_live_loads();
	int sole = machine_sole_node();
	struct aeg_pool_stats st;

	(void)state;
	unsetenv("AEGAEON_TOPOLOGY_XML");
	unsetenv("HWLOC_THISSYSTEM");
	setenv("AEGAEON_HOST_PCI_BUS_IDS", "0000:01:00.0", 1);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	assert_int_equal(aeg_pool_create(dev, 0, 1 << 20, 4 << 20, &a), 0);
	assert_int_equal(aeg_topo_live_loads(), loads + (sole >= 0 ? 0 : 1));
	assert_int_equal(aeg_pool_create(dev, 0, 1 << 20, 4 << 20, &b), 0);
	assert_int_equal(aeg_topo_live_loads(), loads + (sole >= 0 ? 0 : 1));
	assert_int_equal(aeg_pool_stats(b, &st), 0);
	if (sole >= 0)
		assert_int_equal(st.numa_node, sole);
	aeg_pool_destroy(b);
	aeg_pool_destroy(a);
	aeg_device_close(dev);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(acquire_release_all, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(exhaustion_and_timeout, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(threads_share_the_pool, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(processes_share_the_pool, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(bad_sizes, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(attach_bad_fds, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(release_not_acquired, host_device_setup, host_device_teardown),
		cmocka_unit_test(bound_to_the_gpu_node),
		cmocka_unit_test_setup_teardown(no_leaks, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(four_kib_pages, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(private_pool, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(early_private_pool, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(made_ahead, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(bad_hugepage_modes, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(hugetlb_pool, huge_setup, huge_teardown),
		cmocka_unit_test(topology_loaded_once),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

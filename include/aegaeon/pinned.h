/* aegaeon pinned pool: page-locked host buffers near a GPU, shared by a job's processes. */
#ifndef AEGAEON_PINNED_H
#define AEGAEON_PINNED_H

#include <stdint.h>

#include <aegaeon/device.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_pool aeg_pool_t;

struct aeg_pool_buffer {
	uint32_t index;     /* 0..buffers-1 */
	void *ptr;          /* host pointer in this process */
	uint64_t bytes;     /* the pool's buffer size */
};

struct aeg_pool_stats {
	uint64_t buffer_bytes;
	uint64_t pool_bytes;        /* buffers * buffer_bytes */
	uint32_t buffers;
	uint32_t in_use;            /* across every process attached */
	uint32_t high_water;
	uint64_t acquires;
	uint64_t timeouts;
	int numa_node;              /* node the pages are bound to, -1 if none */
};

/*
 * aeg_pool_create - @pool_bytes / @buffer_bytes buffers of @buffer_bytes in
 * one memfd, pages bound to @gpu's NUMA node when the topology knows it
 * (the process' topology is loaded by the first pool and kept), populated up
 * front by threads on the CPUs next to that node, and registered (portable,
 * mapped) on the cuda backend in pieces of whole buffers, 64 MiB or more,
 * each as soon as its pages are in: a buffer is always inside one
 * registration, so a copy should not cross from one buffer into the next.
 * The free list lives in the memfd, so processes that attach share it.
 * @buffer_bytes must be a multiple of 4096 and <= @pool_bytes.
 *
 * Page size, chosen by $AEGAEON_PINNED_HUGEPAGES:
 *   auto (default, also when unset or empty): 2 MiB hugetlb pages when
 *     @buffer_bytes is a multiple of 2 MiB and enough are free, on the
 *     GPU's NUMA node too when it has one (the admin reserves them, e.g.
 *     `sysctl vm.nr_hugepages=N`); else 4 KiB pages. A pool of huge pages
 *     needs pool_bytes / 2 MiB of them and one more for its header. They
 *     made a pool about three times as fast to populate and register on an
 *     H100 machine (~80 against ~260 ms/GiB) and almost free to tear down.
 *   never: 4 KiB pages.
 *   always: huge pages or an error.
 * Errors: AEG_EINVAL (also: a bad $AEGAEON_PINNED_HUGEPAGES, or "always"
 * with a buffer size that is not a multiple of 2 MiB), AEG_ENOMEM (detail:
 * asked vs available; for "always", how many huge pages are missing and how
 * to reserve them), AEG_ENOTSUP ("always" on a kernel without 2 MiB huge
 * pages), AEG_EDEVICE.
 */
int aeg_pool_create(aeg_device_t *dev, int gpu, uint64_t buffer_bytes,
		    uint64_t pool_bytes, aeg_pool_t **pool);

/*
 * aeg_pool_attach - map the pool behind @fd (from aeg_pool_fd of another
 * process, passed with SCM_RIGHTS), in the page size it was made with; @fd
 * is duplicated, the caller keeps its own. The pool's geometry is read from
 * its header once and kept. AEG_EBADF for a closed or negative @fd,
 * AEG_EINVAL when @fd is not an aegaeon pool of this version (or its header
 * does not match the file's size).
 */
int aeg_pool_attach(aeg_device_t *dev, int fd, aeg_pool_t **pool);

/* aeg_pool_destroy - unmap (and unregister); the memfd goes with its last user. */
void aeg_pool_destroy(aeg_pool_t *pool);

/*
 * aeg_pool_acquire - a free buffer, waiting up to @timeout_ms (0: don't
 * wait, < 0: forever). AEG_ETIMEDOUT when none came free. O(1). Thread- and
 * process-safe and lock-free: a process stopped or killed in the middle of
 * an acquire or release holds up no other. The free list is in memory
 * every attached process can write: a broken one is logged and rebuilt,
 * and AEG_EIO returned when it stays broken.
 */
int aeg_pool_acquire(aeg_pool_t *pool, int timeout_ms, struct aeg_pool_buffer *buf);

/* aeg_pool_release - give buffer @index back. AEG_EINVAL if not acquired. */
int aeg_pool_release(aeg_pool_t *pool, uint32_t index);

/* aeg_pool_buffer_ptr - host pointer of buffer @index in this process. */
void *aeg_pool_buffer_ptr(aeg_pool_t *pool, uint32_t index);

/*
 * aeg_pool_stats - the pool's geometry and its counts across every process
 * attached (read without a lock from the shared header, so a snapshot that
 * may be one off while others acquire; kept within the pool's buffers).
 * AEG_EINVAL for NULL arguments.
 */
int aeg_pool_stats(aeg_pool_t *pool, struct aeg_pool_stats *stats);

/*
 * aeg_pool_fd - the pool's memfd, to pass to another process (SCM_RIGHTS)
 * for aeg_pool_attach; owned by the pool: do not close it. AEG_EINVAL for a
 * NULL @pool, or a pool private to this process (a prefetch engine's
 * staging ring).
 */
int aeg_pool_fd(const aeg_pool_t *pool);
void *aeg_pool_base(const aeg_pool_t *pool);   /* buffer 0 */

#ifdef __cplusplus
}
#endif
#endif

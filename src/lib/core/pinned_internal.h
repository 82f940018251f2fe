/* Pinned pool internals that tests and benchmarks look at; never installed. */
#ifndef AEGAEON_PINNED_INTERNAL_H
#define AEGAEON_PINNED_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include <aegaeon/pinned.h>

/*
 * How aeg_pool_create provisioned the pool and where it spent its time. An
 * attached pool has page_bytes only, the rest zero.
 */
struct aeg_pool_timing {
	uint64_t bind_ns;       /* GPU locality (topology, cached per process) and NUMA binding */
	uint64_t populate_ns;   /* until every page was faulted in (registration runs beside it) */
	uint64_t register_ns;   /* what registering the buffers took after that */
	uint64_t total_ns;
	uint64_t page_bytes;    /* 4096, or 2 MiB for hugetlb pages */
	unsigned threads;       /* that populated the pages */
	uint64_t yield_ns;      /* of populate_ns, the longest a thread waited for the process's loads */
	uint64_t usable_ns;     /* an early pool: until its first buffer could be used (else 0) */
	int ahead;              /* its memory was made ahead (aeg_pool_premake): 2 whole, 1 in part; else 0 */
};

void aeg_pool_timing(const aeg_pool_t *pool, struct aeg_pool_timing *timing);

/*
 * aeg_pool_check - every check aeg_pool_create makes before it provisions
 * (sizes, the huge page choice, the memory available), with no memory
 * taken: a caller that makes the pool later, off its critical path, fails
 * early for what it can. The huge pages counted are the machine's, but for
 * AEGAEON_PINNED_HUGEPAGES=always those of the GPU's NUMA node (finding it
 * loads the topology, which the others leave to aeg_pool_create).
 * *@data_bytes (may be NULL): the pool's bytes.
 */
int aeg_pool_check(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes, uint64_t *data_bytes);

/*
 * The first pages of a pool's memfd. Every process of the job that attaches
 * the pool maps it read-write and can write any byte of it, so nothing in it
 * is trusted: each process keeps the geometry it made or read once at
 * attach in its own memory, checks every index and count it reads here
 * against that, and changes the words below only by atomic operations.
 * There is no lock: a process stopped or killed anywhere holds up no other.
 *   head        the free stack, linked through next[]: (tag << 32) | (top
 *               index + 1), 0 when empty; the tag changes at every push and
 *               pop, so a stale compare-and-swap fails (ABA)
 *   owner[i]    pid of the process holding buffer i, 0 when free; claimed
 *               by compare-and-swap after the pop, so no buffer has two
 *               holders; the truth a broken list is rebuilt from
 *   free_seq    futex word bumped by every release; waiters count those
 *               asleep on it
 * No process-shared pthread object lives here: glibc keeps its own state in
 * them and trusts it (16 bytes written into a robust mutex made glibc abort
 * the process that locked it next).
 */
struct aeg_pool_header {
	char magic[8];
	uint32_t version;
	uint32_t buffers;
	uint64_t header_bytes;
	uint64_t buffer_bytes;
	uint64_t pool_bytes;
	int32_t numa_node;
	uint32_t waiters;
	uint64_t head;
	uint32_t free_seq;
	uint32_t in_use;
	uint32_t high_water;
	uint32_t reserved;
	uint64_t acquires;
	uint64_t timeouts;
	uint32_t slots[];       /* next [buffers], then owner [buffers] */
};

/* aeg_pool_header - the shared header of @pool as mapped here (tests write into it). */
struct aeg_pool_header *aeg_pool_header(aeg_pool_t *pool);

/* aeg_pool_repairs - rebuilds of @pool's broken free list made by this process. */
uint32_t aeg_pool_repairs(aeg_pool_t *pool);

/* A process's view of a pool's free list (pinned_list.c). */
struct aeg_pool_list {
	struct aeg_pool_header *hdr;
	uint32_t *next, *owner;         /* in the header */
	uint32_t buffers;               /* this process's own: never read back from the header */
	uint32_t repairs;               /* rebuilds of a broken list made by this process */
};

/* aeg_pool_list_init - the view of @h for a pool of @buffers (as this process knows it). */
void aeg_pool_list_init(struct aeg_pool_list *l, struct aeg_pool_header *h, uint32_t buffers);

/*
 * aeg_pool_list_format - a new pool's list, counts zero: every buffer free,
 * buffer 0 on top; or, with @maker not 0, every buffer held by that pid (the
 * process making the pool, which lists each with aeg_pool_list_add once it
 * can be used) and the list empty.
 */
void aeg_pool_list_format(struct aeg_pool_list *l, uint32_t maker);

/*
 * aeg_pool_list_add - list buffer @index, held by the pool's maker since
 * aeg_pool_list_format, for the first time (in_use does not count it), and
 * wake a waiter. AEG_EINVAL if it is not held.
 */
int aeg_pool_list_add(struct aeg_pool_list *l, uint32_t index);

/*
 * aeg_pool_list_take - pop a buffer and mark it with this process's pid,
 * waiting up to @timeout_ms (0: not at all, < 0: for ever) for one to come
 * free. A broken list (an index out of range, a held buffer on it) is
 * logged and rebuilt from the owner marks. AEG_ETIMEDOUT (no detail set),
 * or AEG_EIO when the list stays broken or keeps changing under it.
 */
int aeg_pool_list_take(struct aeg_pool_list *l, int timeout_ms, uint32_t *index);

/* aeg_pool_list_give - unmark buffer @index and put it back. AEG_EINVAL if it is not held. */
int aeg_pool_list_give(struct aeg_pool_list *l, uint32_t index);

/* aeg_pool_list_reclaim - put back every buffer marked with @pid; the count. */
uint32_t aeg_pool_list_reclaim(struct aeg_pool_list *l, uint32_t pid);

/* aeg_pool_list_counts - in_use (at most the pool's buffers), high_water, acquires, timeouts. */
void aeg_pool_list_counts(const struct aeg_pool_list *l, struct aeg_pool_stats *stats);

/*
 * aeg_pool_create_stoppable - aeg_pool_create that stops as soon as @stop is
 * set (between 4 MiB population steps and registration pieces; the agent
 * stopping while it makes a pool of many GiB): AEG_ECANCELED, with how far
 * it got, and nothing made left behind. Made in the background beside the
 * process's loads (the agent's job-start load), it lets them run first: no
 * population starts while a load runs, for up to 2 s in all, and no piece
 * is registered while one runs until every page is in.
 */
int aeg_pool_create_stoppable(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes,
			      const atomic_int *stop, aeg_pool_t **poolp);

/*
 * aeg_pool_create_private - aeg_pool_create of a pool this process alone
 * uses (a prefetch engine's staging ring): where no 2 MiB huge pages are
 * reserved, anonymous memory with transparent huge pages asked for instead
 * of a memfd, so it is made in about half the time. It cannot be shared:
 * aeg_pool_fd fails, and a child process does not inherit it.
 */
int aeg_pool_create_private(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes,
			    aeg_pool_t **poolp);

/*
 * aeg_pool_create_private_early - aeg_pool_create_private whose buffers can
 * be used one by one as they are made, so that a load waiting for its
 * staging ring moves bytes after the first buffer's 1-2 ms instead of the
 * whole ring's 11-13 ms (24 x 4 MiB on the H200 machine). @ready(pool, @arg)
 * is called from this thread once the first buffer is populated and
 * registered, with the pool; each further buffer comes onto the free list
 * as its own registration ends (aeg_pool_acquire waits for it), until this
 * returns with *@poolp the same pool. From @ready on it cannot fail: a
 * later buffer that cannot be populated or registered is warned of, and the
 * pool keeps those it has. Before, it fails as aeg_pool_create_private does
 * and @ready is never called.
 */
int aeg_pool_create_private_early(aeg_device_t *dev, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes,
				  void (*ready)(aeg_pool_t *pool, void *arg), void *arg, aeg_pool_t **poolp);

/*
 * aeg_pool_premake - start making, on a thread of its own, the memory of a
 * private pool of these sizes (aeg_pool_create_private, _early), so that
 * its pages are in when that pool is made: the next private pool of this
 * size takes it, where its GPU has no NUMA node or the pages are on it
 * (they go where this process runs). For a process that will load but does
 * other things first. Only where the pool would not be made of reserved 2
 * MiB huge pages and the memory is available; otherwise it makes nothing
 * (debug log says why) and returns 0, as it does while memory of this size
 * made ahead is held already (another size is given back first).
 * Thread-safe. AEG_EINVAL for sizes that make no pool.
 */
int aeg_pool_premake(uint64_t buffer_bytes, uint64_t pool_bytes);

/* aeg_pool_premade_drop - give back the memory made ahead that no pool took (none: nothing). */
void aeg_pool_premade_drop(void);

/*
 * aeg_pool_premade - the bytes made ahead and held (0: none), at *@map;
 * *@populated: all of them are in. Either pointer may be NULL.
 */
uint64_t aeg_pool_premade(void **map, int *populated);

/*
 * aeg_pool_attach_known - aeg_pool_attach of the pool whose geometry the
 * agent told (the job's steps): the header, which any step can write, is
 * not read for it. AEG_EINVAL when the file does not match.
 */
int aeg_pool_attach_known(aeg_device_t *dev, int fd, uint64_t buffer_bytes, uint64_t pool_bytes,
			  aeg_pool_t **pool);

/*
 * aeg_pool_reclaim - give back to the free list every buffer that process
 * @pid (as its getpid() said) holds; the agent calls it once a client
 * process it saw connect has exited. *@reclaimed is the count.
 */
int aeg_pool_reclaim(aeg_pool_t *pool, pid_t pid, uint32_t *reclaimed);

#endif

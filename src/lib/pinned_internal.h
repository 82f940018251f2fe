/* Pinned pool internals that tests and benchmarks look at; never installed. */
#ifndef AEGAEON_PINNED_INTERNAL_H
#define AEGAEON_PINNED_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include <aegaeon/pinned.h>

/*
 * How aeg_pool_create provisioned the pool and where it spent its time. An
 * attached pool has page_bytes only, the rest zero.
 */
struct aeg_pool_timing {
	uint64_t bind_ns;       /* GPU locality (topology, cached per process) and NUMA binding */
	uint64_t populate_ns;   /* faulting every page in */
	uint64_t register_ns;   /* aeg_host_register of the buffer area */
	uint64_t total_ns;
	uint64_t page_bytes;    /* 4096, or 2 MiB for hugetlb pages */
	unsigned threads;       /* that populated the pages */
};

void aeg_pool_timing(const aeg_pool_t *pool, struct aeg_pool_timing *timing);

/* The process-shared mutex in the pool header (robust-mutex tests). */
pthread_mutex_t *aeg_pool_mutex(aeg_pool_t *pool);

/*
 * aeg_pool_reclaim - give back to the free list every buffer that process
 * @pid (as its getpid() said) holds; the agent calls it once a client
 * process it saw connect has exited. *@reclaimed is the count.
 */
int aeg_pool_reclaim(aeg_pool_t *pool, pid_t pid, uint32_t *reclaimed);

#endif

/* Pinned pool internals that tests and benchmarks look at; never installed. */
#ifndef AEGAEON_PINNED_INTERNAL_H
#define AEGAEON_PINNED_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include <aegaeon/pinned.h>

/* Where aeg_pool_create spent its time (zero for an attached pool). */
struct aeg_pool_timing {
	uint64_t bind_ns;       /* topology load and NUMA binding */
	uint64_t populate_ns;   /* faulting every page in */
	uint64_t register_ns;   /* aeg_host_register of the buffer area */
	uint64_t total_ns;
};

void aeg_pool_timing(const aeg_pool_t *pool, struct aeg_pool_timing *timing);

/* The process-shared mutex in the pool header (robust-mutex tests). */
pthread_mutex_t *aeg_pool_mutex(aeg_pool_t *pool);

#endif

/* aegaeon slab: one device allocation per GPU, sub-allocated in O(1). */
#ifndef AEGAEON_SLAB_H
#define AEGAEON_SLAB_H

#include <stdint.h>

#include <aegaeon/device.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_slab aeg_slab_t;

#define AEG_SLAB_ALIGN 256u

/* A block of a slab. Ids are stable for the block's life and never reused soon. */
struct aeg_block {
	uint64_t id;        /* never 0 */
	uint64_t offset;    /* from the slab's base, a multiple of AEG_SLAB_ALIGN */
	uint64_t size;      /* as asked, rounded up to AEG_SLAB_ALIGN */
	void *ptr;          /* device pointer: base + offset */
};

struct aeg_slab_stats {
	uint64_t total_bytes;
	uint64_t used_bytes;
	uint64_t free_bytes;
	uint64_t largest_free_bytes;
	uint64_t high_water_bytes;  /* most bytes ever used at once */
	uint64_t blocks;            /* live blocks */
	uint64_t allocs;            /* successful allocations, ever */
	uint64_t frees;
	uint64_t failed_allocs;
};

/*
 * aeg_slab_create - one device allocation of @bytes (rounded up to
 * AEG_SLAB_ALIGN) on @gpu, sub-allocated by a two-level segregated-fit
 * (TLSF) allocator in offset space: O(1) alloc and free, immediate
 * coalescing, no device calls after creation.
 * Errors: AEG_EINVAL (0 bytes), AEG_ENODEV, AEG_ENOSPC (detail: asked vs
 * free device memory), AEG_EDEVICE, AEG_ENOMEM.
 */
int aeg_slab_create(aeg_device_t *dev, int gpu, uint64_t bytes, aeg_slab_t **slab);

/*
 * aeg_slab_wrap - a slab over memory someone else owns (an opened IPC
 * handle or a lease of a job slab): @base and @bytes are used as they are and
 * never freed by the slab. @base must be aligned to AEG_SLAB_ALIGN and @bytes
 * a non-zero multiple of it (AEG_EINVAL otherwise). @dev may be NULL: the
 * slab then only sub-allocates the range (block pointers are @base + offset,
 * @base may be NULL) and @gpu is not checked.
 * Errors: AEG_EINVAL, AEG_ENODEV, AEG_ENOMEM.
 */
int aeg_slab_wrap(aeg_device_t *dev, int gpu, void *base, uint64_t bytes, aeg_slab_t **slab);

/*
 * aeg_slab_destroy - free every block, and the device memory of a slab from
 * aeg_slab_create. NULL is ignored. No other call on @slab may be running.
 */
void aeg_slab_destroy(aeg_slab_t *slab);

/*
 * aeg_slab_alloc - a block of at least @bytes. Thread-safe.
 * Errors: AEG_EINVAL (0 bytes), AEG_ENOSPC (detail: requested vs largest
 * free block and total free), AEG_ENOMEM (the block table could not grow).
 */
int aeg_slab_alloc(aeg_slab_t *slab, uint64_t bytes, struct aeg_block *block);

/* aeg_slab_free - free block @id. AEG_ENOENT for an id not live. Thread-safe. */
int aeg_slab_free(aeg_slab_t *slab, uint64_t id);

/* aeg_slab_lookup - the live block @id; AEG_ENOENT otherwise. Thread-safe. */
int aeg_slab_lookup(aeg_slab_t *slab, uint64_t id, struct aeg_block *block);

/*
 * aeg_slab_stats - a consistent snapshot of @slab's counters. Thread-safe.
 * largest_free_bytes is exact (one size-class list is walked for it).
 */
int aeg_slab_stats(aeg_slab_t *slab, struct aeg_slab_stats *stats);

/* aeg_slab_export - memory IPC handle of the slab's base (AEG_ENOTSUP for a wrapped slab). */
int aeg_slab_export(aeg_slab_t *slab, aeg_handle_t *handle);

/* What the slab was made with; constant for its life. */
void *aeg_slab_base(const aeg_slab_t *slab);
uint64_t aeg_slab_bytes(const aeg_slab_t *slab);
int aeg_slab_gpu(const aeg_slab_t *slab);
aeg_device_t *aeg_slab_device(const aeg_slab_t *slab);

#ifdef __cplusplus
}
#endif
#endif

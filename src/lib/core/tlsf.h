/* TLSF sub-allocation of an offset range: the slab's allocator, no device calls. */
#ifndef AEGAEON_TLSF_H
#define AEGAEON_TLSF_H

#include <stdint.h>

/*
 * Blocks are kept in units of AEG_SLAB_ALIGN (256 bytes). Size classes: the
 * first level is log2 of the size, the second splits each power of two into
 * 32 lists; sizes below 32 units have one exact list each.
 */
#define AEG_TLSF_UNIT_LOG2 8
#define AEG_TLSF_UNIT (1ull << AEG_TLSF_UNIT_LOG2)
#define AEG_TLSF_SL_LOG2 5
#define AEG_TLSF_SL_COUNT (1u << AEG_TLSF_SL_LOG2)
/* Classes for sizes up to 2^64 bytes = 2^56 units: fl = log2(units) - 4, at most 51. */
#define AEG_TLSF_FL_COUNT 52

struct aeg_tlsf_node;

/*
 * One allocator. Not thread-safe: the slab serialises calls. Block metadata
 * lives in a node array (not in the managed memory, which is on a GPU); it
 * starts small and doubles when a split needs a node and none is spare, so
 * memory follows the number of blocks, not the range size (a 2^63-byte range
 * costs nothing up front). Nodes of blocks merged away go onto a spare stack.
 */
struct aeg_tlsf {
	uint64_t total;                 /* bytes managed: [0, total) */
	uint64_t used;
	uint64_t high_water;
	uint64_t blocks;                /* live (allocated) blocks */
	uint64_t free_blocks;
	struct aeg_tlsf_node *nodes;
	uint32_t nodes_len;             /* nodes ever initialised */
	uint32_t nodes_cap;
	uint32_t spare;                 /* top of the spare node stack */
	uint64_t fl_map;                /* bit fl: some list of that level is not empty */
	uint32_t sl_map[AEG_TLSF_FL_COUNT];
	uint32_t heads[AEG_TLSF_FL_COUNT][AEG_TLSF_SL_COUNT];
};

struct aeg_tlsf_stats {
	uint64_t total_bytes;
	uint64_t used_bytes;
	uint64_t free_bytes;
	uint64_t largest_free_bytes;
	uint64_t high_water_bytes;
	uint64_t blocks;
	uint64_t free_blocks;           /* free blocks after coalescing */
};

/*
 * aeg_tlsf_init - manage [0, @bytes); @bytes must be a non-zero multiple of
 * AEG_TLSF_UNIT (AEG_EINVAL otherwise). AEG_ENOMEM when the node array cannot
 * be allocated. Release with aeg_tlsf_fini.
 */
int aeg_tlsf_init(struct aeg_tlsf *t, uint64_t bytes);
void aeg_tlsf_fini(struct aeg_tlsf *t);

/*
 * aeg_tlsf_alloc - a block of @bytes rounded up to AEG_TLSF_UNIT. Fails only
 * when no free block is large enough: a good-fit lookup in the bitmaps first,
 * then a first-fit walk of the one list holding the request's own class.
 * Errors: AEG_EINVAL (0 bytes), AEG_ENOSPC (detail: requested, largest free,
 * free of total), AEG_ENOMEM (the node array could not grow).
 * @id is never 0 and is not reused until the same node has been reused
 * 2^32 times.
 */
int aeg_tlsf_alloc(struct aeg_tlsf *t, uint64_t bytes, uint64_t *id, uint64_t *offset,
		   uint64_t *size);

/* aeg_tlsf_free - free block @id and merge it with free neighbours. AEG_ENOENT if @id is not live. */
int aeg_tlsf_free(struct aeg_tlsf *t, uint64_t id);

/* aeg_tlsf_lookup - offset and size of live block @id; AEG_ENOENT otherwise. */
int aeg_tlsf_lookup(const struct aeg_tlsf *t, uint64_t id, uint64_t *offset, uint64_t *size);

/*
 * aeg_tlsf_largest_free - the largest free block, exactly: the bitmaps give
 * the highest non-empty list and only that list is walked.
 */
uint64_t aeg_tlsf_largest_free(const struct aeg_tlsf *t);

void aeg_tlsf_stats(const struct aeg_tlsf *t, struct aeg_tlsf_stats *stats);

/*
 * aeg_tlsf_check - walk every block and list and verify the allocator's own
 * invariants (contiguous blocks, no two free neighbours, lists and bitmaps
 * agree with the blocks, counters add up). O(blocks); for tests.
 * Returns 0 or AEG_EINVAL with a detail naming the first broken invariant.
 */
int aeg_tlsf_check(const struct aeg_tlsf *t);

#endif

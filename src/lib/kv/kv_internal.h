/* KV cache internals shared by kv.c, its backends (kv_host.c, kv_cuda.c, kv_nocuda.c) and the kv bench. */
#ifndef AEGAEON_KV_INTERNAL_H
#define AEGAEON_KV_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <aegaeon/event.h>
#include <aegaeon/kv.h>

#include "device_internal.h"

struct kv_op;
struct kv_host;
struct kv_cuda;

/* A stack of free block ids with an allocated bit per id of the id space. */
struct kv_freelist {
	uint32_t *stack;
	uint32_t top;           /* free ids on the stack */
	uint32_t capacity;      /* allocatable ids */
	uint64_t *allocated;    /* bit per id */
};

/*
 * One side's pieces: the piece of segment s (layer l, part p: s = l * parts
 * + p) of block i is at seg[s] + i * stride in this process and at
 * view[s] + i * stride as the device sees it (the mapped view of host
 * memory on cuda; the same pointers otherwise).
 */
struct kv_side {
	char *base;             /* the blocks layout's block 0; NULL per layer */
	char **seg;
	char **view;
	uint64_t stride;
	uint32_t blocks;
};

/*
 * The pieces one launch moves per block pair, for each of @groups launch
 * groups (1: every layer at once; layers: one group per layer). Segments
 * adjacent on both sides are merged, so a block in the blocks layout on both
 * sides moves as one piece of block_bytes. gpu[g * count + k] and
 * host[g * count + k] are the device-visible bases of piece k of group g.
 */
struct kv_plan {
	uint32_t groups;
	uint32_t count;
	uint64_t piece_bytes;
	char **gpu, **host;
};

/* Released events kept for later calls (struct aeg_kv.spare). */
struct kv_spare {
	aeg_event_t *ev;
	aeg_handle_t handle;
};

struct aeg_kv {
	aeg_device_t *dev;
	int gpu;
	uint64_t block_bytes;
	uint32_t layers, parts;
	uint64_t part_bytes;

	struct kv_side gpu_side, host_side;
	struct kv_plan whole, by_layer;
	aeg_slab_t *slab;               /* set when the GPU region is a slab block of ours */
	uint64_t slab_id;
	aeg_pool_t *pool;
	uint64_t pool_buffer_bytes;
	uint32_t *pool_buffers;         /* indices we acquired */
	uint32_t pool_nbuffers;

	/*
	 * Guards free lists, marks, ops, spare events and stats; held for
	 * bookkeeping only, never while a call queues its copies or waits.
	 */
	pthread_mutex_t lock;
	struct kv_freelist gpu_free, host_free;
	uint64_t *gpu_mark, *host_mark; /* scratch bits for duplicate checks, all clear between calls */
	struct kv_op *ops;
	struct kv_spare *spare;
	uint32_t nspare;
	struct aeg_kv_stats stats;

	const struct kv_backend *backend;       /* the device kind's */
	struct kv_host *host;           /* host backend: copy threads */
	struct kv_cuda *cuda;           /* cuda backend: kernels and staging */
};

/*
 * What a call queues, in order: for each step, entries [first, end) of the
 * id arrays, the pieces of the plan's launch group @group, then @event
 * (NULL: none) recorded.
 */
struct kv_step {
	size_t first, end;
	uint32_t group;
	aeg_event_t *event;
};

/* A call as the backends see it: pairs src_ids[i] -> dst_ids[i]. */
struct kv_move {
	int out;                        /* GPU to host */
	const struct kv_plan *plan;
	uint64_t src_stride, dst_stride;
	const uint32_t *src_ids, *dst_ids;
	size_t n;
	const struct kv_step *steps;
	size_t nsteps;
};

/* The device-visible bases of a move's sources and destinations for @group. */
static inline char *const *kv_move_src(const struct kv_move *mv, uint32_t group)
{
	return (mv->out ? mv->plan->gpu : mv->plan->host) + (size_t)group * mv->plan->count;
}

static inline char *const *kv_move_dst(const struct kv_move *mv, uint32_t group)
{
	return (mv->out ? mv->plan->host : mv->plan->gpu) + (size_t)group * mv->plan->count;
}

static inline int kv_bit_test(const uint64_t *bits, uint32_t i)
{
	return (bits[i >> 6] >> (i & 63)) & 1;
}

static inline void kv_bit_set(uint64_t *bits, uint32_t i)
{
	bits[i >> 6] |= 1ull << (i & 63);
}

static inline void kv_bit_clear(uint64_t *bits, uint32_t i)
{
	bits[i >> 6] &= ~(1ull << (i & 63));
}

/* kv.c */
const char *kv_side_name(int gpu);
int kv_check_stream(const aeg_kv_t *kv, const aeg_stream_t *stream);
/* Range and duplicate check of one side's ids with @mark (clear on entry and return). Lock held. */
int kv_check_ids(uint64_t *mark, const uint32_t *ids, size_t n, uint32_t limit, int gpu);
void kv_ops_settle(aeg_kv_t *kv);       /* kv_swap.c: wait for every call not released */
void kv_ops_fini(aeg_kv_t *kv);         /* kv_swap.c: every op and spare event */

/* kv_layout.c */
int kv_side_blocks(struct kv_side *side, char *base, uint32_t blocks, const aeg_kv_t *kv);
int kv_side_tensors(struct kv_side *side, const struct aeg_kv_tensors *t, const aeg_kv_t *kv,
		    const char *what);
void kv_side_fini(struct kv_side *side);
int kv_sides_disjoint(const aeg_kv_t *kv);
char *kv_side_piece(const struct kv_side *side, uint32_t id, uint32_t seg);
int kv_plans_build(aeg_kv_t *kv);       /* after the backend filled the host side's views */
void kv_plans_fini(aeg_kv_t *kv);

/*
 * Baselines for the kv bench, moving the same bytes as a swap of every
 * layer: one memcpy per piece (cudaMemcpyAsync on cuda, as vLLM's
 * swap_blocks does per layer; memcpy on the stream's thread on host) or one
 * cudaMemcpyBatchAsync of all pieces (cuda only; AEG_ENOTSUP on host). Ids
 * are not validated beyond range. @out: GPU to host.
 */
enum kv_baseline {
	KV_BASELINE_PER_BLOCK,
	KV_BASELINE_BATCH,
};
int aeg_kv_baseline(aeg_kv_t *kv, enum kv_baseline how, int out, const uint32_t *src_ids,
		    const uint32_t *dst_ids, size_t n, aeg_stream_t *stream);

/*
 * A KV backend: how a cache on a device of one kind maps its sides and
 * moves blocks. kv.c takes the one of the cache's device kind; kv_host.c
 * and kv_cuda.c each define theirs, and a build without CUDA has
 * kv_nocuda.c's, which makes no cache. Every function returns 0 or an
 * AEG_E* code with a detail.
 */
struct kv_backend {
	const char *name;
	/* Check both sides and fill host_side.view (the device's view of host memory); NULL: views are the pointers. */
	int (*map)(aeg_kv_t *kv);
	/* The backend's state, after the plans are built; fini undoes a part done, even of a failed init. */
	int (*init)(aeg_kv_t *kv);
	void (*fini)(aeg_kv_t *kv);     /* waits for queued moves */
	/* Queue @mv's steps on @stream (a cache whose init succeeded). */
	int (*move)(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream);
	/* Refuse a copy's pointers the backend cannot copy between; NULL: any. */
	int (*check_copy)(aeg_kv_t *kv, void *dst, const void *src, int h2d);
	int (*baseline)(aeg_kv_t *kv, enum kv_baseline how, const struct kv_move *mv, aeg_stream_t *stream);
};

extern const struct kv_backend kv_host_backend;
extern const struct kv_backend kv_cuda_backend;

/*
 * How a move of pieces of @piece_bytes is made (cuda; kv bench): by the
 * copy engines, or by the kernel variant and largest grid given.
 */
struct kv_launch_cfg {
	int copy_engines;
	int variant;
	int unroll;
	unsigned max_grid;              /* a swap-in's */
	unsigned max_grid_out;          /* a swap-out's */
};
void kv_cuda_config(const aeg_kv_t *kv, uint64_t piece_bytes, struct kv_launch_cfg *cfg);
/* kv bench --tune: force unroll (2, 4, 8) and CTAs per SM for every later launch; 0, 0: choose. */
void kv_cuda_force(int unroll, int per_sm);

/* The kernel's fatbin, generated from kv_kernel.cu at build time (kv_kernel_fatbin.c). */
extern const unsigned char aeg_kv_fatbin[];
extern const size_t aeg_kv_fatbin_size;

#endif

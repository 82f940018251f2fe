/* KV cache internals shared by kv.c, its backends (kv_host.c, kv_cuda.c) and the kv bench. */
#ifndef AEGAEON_KV_INTERNAL_H
#define AEGAEON_KV_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

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

struct aeg_kv {
	aeg_device_t *dev;
	int gpu;
	uint64_t block_bytes;

	char *gpu_base;
	uint32_t gpu_blocks;
	aeg_slab_t *slab;               /* set when the GPU region is a slab block of ours */
	uint64_t slab_id;

	char *host_base;                /* this process's pointer */
	char *host_dev;                 /* the same bytes as the device sees them (mapped) */
	uint32_t host_blocks;
	aeg_pool_t *pool;
	uint64_t pool_buffer_bytes;
	uint32_t *pool_buffers;         /* indices we acquired */
	uint32_t pool_nbuffers;

	pthread_mutex_t lock;           /* free lists, marks, ops, stats, backend staging */
	struct kv_freelist gpu_free, host_free;
	uint64_t *gpu_mark, *host_mark; /* scratch bits for duplicate checks, all clear between calls */
	struct kv_op *ops;
	struct aeg_kv_stats stats;

	struct kv_host *host;           /* host backend: copy threads */
	struct kv_cuda *cuda;           /* cuda backend: kernel and staging */
};

/*
 * A block move as the backends see it: block src_ids[i] of @src to block
 * dst_ids[i] of @dst (both device-visible bases), in segments ending at
 * ends[0..nseg-1]; seg_events[s], when not NULL, is recorded after segment s.
 */
struct kv_move {
	const char *src;
	char *dst;
	const uint32_t *src_ids;
	const uint32_t *dst_ids;
	size_t n;
	const size_t *ends;
	size_t nseg;
	aeg_event_t **seg_events;
};

int kv_host_init(aeg_kv_t *kv);
void kv_host_fini(aeg_kv_t *kv);        /* waits for queued moves */
int kv_host_move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream);

#ifdef HAVE_CUDA
int kv_cuda_init(aeg_kv_t *kv);         /* loads the kernel, maps the host region */
void kv_cuda_fini(aeg_kv_t *kv);        /* waits for queued moves */
int kv_cuda_move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream);
int kv_cuda_check_copy(aeg_kv_t *kv, void *dst, const void *src, int h2d);

/* The kernel's fatbin, generated from kv_kernel.cu at build time (kv_kernel_fatbin.c). */
extern const unsigned char aeg_kv_fatbin[];
extern const size_t aeg_kv_fatbin_size;
#endif

/*
 * Baselines for the kv bench, moving the same blocks as a swap: one
 * memcpy per block (cudaMemcpyAsync on cuda, memcpy on the stream's thread on
 * host) or one cudaMemcpyBatchAsync (cuda only; AEG_ENOTSUP on host). Ids
 * are not validated beyond range. @out: GPU to host.
 */
enum kv_baseline {
	KV_BASELINE_PER_BLOCK,
	KV_BASELINE_BATCH,
};
int aeg_kv_baseline(aeg_kv_t *kv, enum kv_baseline how, int out, const uint32_t *src_ids,
		    const uint32_t *dst_ids, size_t n, aeg_stream_t *stream);
int kv_host_baseline(aeg_kv_t *kv, const char *src, char *dst, const uint32_t *src_ids,
		     const uint32_t *dst_ids, size_t n, aeg_stream_t *stream);
#ifdef HAVE_CUDA
int kv_cuda_baseline(aeg_kv_t *kv, enum kv_baseline how, const char *src, char *dst,
		     const uint32_t *src_ids, const uint32_t *dst_ids, size_t n,
		     aeg_stream_t *stream);
#endif

#endif

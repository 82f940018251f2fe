/* The KV copy kernels' argument block, shared by kv_kernel.cu (nvcc) and kv_cuda.c (the C compiler). */
#ifndef AEGAEON_KV_KERNEL_H
#define AEGAEON_KV_KERNEL_H

#include <stdint.h>

/*
 * One launch: for each of the first total_vecs / (count * piece_vecs)
 * pairs of @pairs (source block, destination block), each of its @count
 * pieces of piece_vecs 16-byte vectors, from src_seg[k] + src * src_stride
 * to dst_seg[k] + dst * dst_stride (src0 and dst0 stand for the tables when
 * count is 1). piece_shift is log2(piece_vecs) for the _p2 kernels.
 */
struct kv_kargs {
	uint64_t src0, dst0;
	const uint64_t *src_seg, *dst_seg;
	uint64_t src_stride, dst_stride;
	const uint32_t *pairs;          /* 2 per pair: source id, destination id */
	uint32_t total_vecs;
	uint32_t piece_vecs;
	uint32_t piece_shift;
	uint32_t count;
};

/* Threads per CTA of every variant; UNROLL vectors per thread and round: 2, 4 or 8. */
#define KV_KERNEL_THREADS 512

#endif

/* The KV gather/scatter kernel: many scattered blocks per launch, device <-> mapped pinned host memory. */
#include <stdint.h>

/*
 * Each thread moves UNROLL 16-byte vectors per round, all loads issued before
 * any store, so every SM keeps many PCIe reads in flight when the source is
 * host memory. Consecutive threads take consecutive vectors of a block, so a
 * warp reads and writes 512 contiguous bytes (256 for the smallest blocks).
 * Built with -fatbin and embedded in the library; kv_cuda.c launches it by
 * name through cudaLibraryGetKernel.
 */
#define UNROLL 4

extern "C" __global__ void __launch_bounds__(512, 4)
aeg_kv_copy_blocks(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
		   const uint2 *__restrict__ pairs, unsigned int total_vecs,
		   unsigned int vecs_per_block)
{
	const unsigned int stride = gridDim.x * blockDim.x;
	unsigned int v = blockIdx.x * blockDim.x + threadIdx.x;

	/* The host keeps total_vecs + UNROLL * stride below 2^32. */
	for (; v < total_vecs; v += UNROLL * stride) {
		uint4 r[UNROLL];
		size_t to[UNROLL];

#pragma unroll
		for (int u = 0; u < UNROLL; u++) {
			unsigned int w = v + u * stride;

			if (w < total_vecs) {
				unsigned int b = w / vecs_per_block;
				unsigned int o = w - b * vecs_per_block;
				uint2 p = pairs[b];

				r[u] = src[(size_t)p.x * vecs_per_block + o];
				to[u] = (size_t)p.y * vecs_per_block + o;
			}
		}
#pragma unroll
		for (int u = 0; u < UNROLL; u++)
			if (v + u * stride < total_vecs)
				dst[to[u]] = r[u];
	}
}

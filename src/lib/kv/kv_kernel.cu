/* The KV gather/scatter kernels: many scattered pieces per launch, device <-> mapped pinned host memory. */
#include <stdint.h>

#include "kv_kernel.h"

/*
 * Each thread moves UNROLL 16-byte vectors per round, all loads issued before
 * any store, so every SM keeps many PCIe reads in flight when the source is
 * host memory. Consecutive threads take consecutive vectors of a piece, so a
 * warp reads and writes 32 * 16 contiguous bytes (pieces are multiples of
 * 256 bytes). The host picks the variant per piece size: a deeper UNROLL
 * for large pieces (more bytes in flight per thread), a shallower one for
 * small pieces (more threads across pieces), and the _p2 form, which finds
 * a vector's piece by a shift, when the piece is a power of two.
 * Built with -fatbin and embedded in the library; kv_cuda.c launches the
 * variants by name through cudaLibraryGetKernel.
 */
template <int UNROLL, bool POW2>
__device__ __forceinline__ void copy_pieces(const struct kv_kargs &a)
{
	const unsigned int stride = gridDim.x * blockDim.x;
	unsigned int v = blockIdx.x * blockDim.x + threadIdx.x;

	/* The host keeps total_vecs + UNROLL * stride below 2^32. */
	for (; v < a.total_vecs; v += UNROLL * stride) {
		uint4 r[UNROLL];
		uint4 *to[UNROLL];

#pragma unroll
		for (int u = 0; u < UNROLL; u++) {
			unsigned int w = v + u * stride;

			if (w < a.total_vecs) {
				unsigned int piece = POW2 ? w >> a.piece_shift : w / a.piece_vecs;
				unsigned int o = w - piece * a.piece_vecs;
				unsigned int pair = a.count == 1 ? piece : piece / a.count;
				unsigned int k = piece - pair * a.count;
				uint2 p = reinterpret_cast<const uint2 *>(a.pairs)[pair];
				uint64_t sb = a.count == 1 ? a.src0 : a.src_seg[k];
				uint64_t db = a.count == 1 ? a.dst0 : a.dst_seg[k];

				r[u] = reinterpret_cast<const uint4 *>(sb + p.x * a.src_stride)[o];
				to[u] = reinterpret_cast<uint4 *>(db + p.y * a.dst_stride) + o;
			}
		}
#pragma unroll
		for (int u = 0; u < UNROLL; u++)
			if (v + u * stride < a.total_vecs)
				*to[u] = r[u];
	}
}

#define KV_VARIANT(u)									\
	extern "C" __global__ void __launch_bounds__(KV_KERNEL_THREADS, 2)		\
	aeg_kv_copy_u##u(const struct kv_kargs a)					\
	{										\
		copy_pieces<u, false>(a);						\
	}										\
	extern "C" __global__ void __launch_bounds__(KV_KERNEL_THREADS, 2)		\
	aeg_kv_copy_u##u##_p2(const struct kv_kargs a)					\
	{										\
		copy_pieces<u, true>(a);						\
	}

KV_VARIANT(2)
KV_VARIANT(4)
KV_VARIANT(8)

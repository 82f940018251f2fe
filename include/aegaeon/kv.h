/* aegaeon KV cache: fixed-size blocks on a GPU and in pinned host memory, swapped in bulk. */
#ifndef AEGAEON_KV_H
#define AEGAEON_KV_H

#include <stddef.h>
#include <stdint.h>

#include <aegaeon/device.h>
#include <aegaeon/pinned.h>
#include <aegaeon/slab.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_kv aeg_kv_t;

/*
 * Sizes: a block (every layer and part of it, block_bytes) is a multiple of
 * AEG_KV_BLOCK_ALIGN in [AEG_KV_BLOCK_MIN, AEG_KV_BLOCK_MAX]; so is each of
 * its pieces (block_bytes / (layers * parts): one layer's K or V).
 */
#define AEG_KV_BLOCK_ALIGN 256u
#define AEG_KV_BLOCK_MIN 256u
#define AEG_KV_BLOCK_MAX (64u << 20)
#define AEG_KV_LAYERS_MAX 1024u
#define AEG_KV_PARTS_MAX 8u

/*
 * A side of the cache in the per-layer layout (vLLM's paged KV cache: one
 * tensor per layer, K and V): the piece of layer l, part p (0 K, 1 V) of
 * block i is at base[l * parts + p] + i * stride, part_bytes long
 * (part_bytes = block_bytes / (layers * parts)). The caller owns the
 * tensors and keeps them alive and in place as long as the cache; the
 * pointer array itself is copied by aeg_kv_create. Two examples:
 * - vLLM's flash-attention layout, a tensor [2, blocks, ...] per layer:
 *   base[2l] = tensor_l, base[2l + 1] = tensor_l + blocks * part_bytes,
 *   stride = part_bytes (or 0, which means the same);
 * - a tensor [blocks, 2, ...] per layer (FlashInfer): base[2l] = tensor_l,
 *   base[2l + 1] = tensor_l + part_bytes, stride = 2 * part_bytes.
 * Bases and stride are AEG_KV_BLOCK_ALIGN aligned; no two pieces of the
 * side may overlap.
 */
struct aeg_kv_tensors {
	void *const *base;          /* layers * parts pointers */
	uint64_t stride;            /* bytes from block i to block i + 1; 0: part_bytes */
	uint32_t blocks;            /* blocks in each tensor */
};

/*
 * Where a cache's blocks live. A block holds @layers layers of @parts
 * parts each (0 means 1), every layer of one token range: a swap moves all
 * of a block's pieces in one call. Each side has one of two layouts:
 *
 * - blocks (the default; vLLM's offloading connector and the Aegaeon
 *   paper): block i is block_bytes contiguous bytes at base + i *
 *   block_bytes, its layers one after the other (layer l, part p at
 *   (l * parts + p) * part_bytes into the block);
 * - per layer (@gpu_tensors / @host_tensors, see struct aeg_kv_tensors).
 *
 * The two sides may differ: GPU blocks in the engine's per-layer tensors and
 * host blocks in the blocks layout is the usual offloading set-up. Block ids
 * are indices 0..blocks-1 on each side.
 *
 * GPU side, one of:
 * - @slab: one slab block of @gpu_blocks * @block_bytes is allocated and
 *   freed again by aeg_kv_destroy (the slab must outlive the cache);
 * - @gpu_base/@gpu_bytes: a device range the caller owns (an opened IPC
 *   handle, a job slab lease); floor(gpu_bytes / block_bytes) blocks.
 *   @gpu_base must be AEG_KV_BLOCK_ALIGN aligned;
 * - @gpu_tensors: per-layer device tensors the caller owns.
 *
 * Host side, one of:
 * - @pool: the pool's whole mapping (its buffers are consecutive), so a host
 *   block id names the same bytes in every process attached to the pool.
 *   The cache acquires @host_buffers pool buffers up front (released by
 *   aeg_kv_destroy) and hands their blocks out through aeg_kv_host_alloc;
 *   with @host_buffers 0 it allocates no host blocks and swaps blocks another
 *   process allocated (the consumer side of a handoff). The pool's buffer
 *   size must be a multiple of @block_bytes;
 * - @host_base/@host_bytes: a host range the caller owns, registered
 *   (aeg_host_register, which maps it) on the cuda backend; every block of
 *   it is allocatable. AEG_KV_BLOCK_ALIGN aligned;
 * - @host_tensors: per-layer host tensors the caller owns, each registered
 *   on the cuda backend; every block is allocatable.
 */
struct aeg_kv_params {
	uint64_t block_bytes;
	uint32_t layers;
	uint32_t parts;

	aeg_slab_t *slab;
	uint32_t gpu_blocks;
	void *gpu_base;
	uint64_t gpu_bytes;
	const struct aeg_kv_tensors *gpu_tensors;

	aeg_pool_t *pool;
	uint32_t host_buffers;
	void *host_base;
	uint64_t host_bytes;
	const struct aeg_kv_tensors *host_tensors;
};

struct aeg_kv_stats {
	uint64_t block_bytes;
	uint32_t layers;
	uint32_t parts;
	uint32_t gpu_blocks;        /* GPU block ids are 0..gpu_blocks-1 */
	uint32_t gpu_used;          /* allocated by aeg_kv_gpu_alloc */
	uint32_t host_blocks;       /* host block ids are 0..host_blocks-1 */
	uint32_t host_owned;        /* of them, allocatable by this cache */
	uint32_t host_used;
	uint32_t events_live;       /* call and layer events not yet released */
	uint32_t events_kept;       /* released events kept for reuse */
	uint64_t swaps_out;         /* calls queued */
	uint64_t swaps_in;
	uint64_t blocks_out;        /* blocks queued */
	uint64_t blocks_in;
	uint64_t copies;            /* one-buffer copies queued */
	uint64_t copy_bytes;
};

/*
 * Per-layer events of one swap, one of two kinds:
 * - on a cache of several layers, @ends NULL and @count the cache's layers:
 *   every entry of the call moves all its layers, layer by layer, and an
 *   event is recorded once layer i of every entry has moved;
 * - on a cache of one layer, groups of entries: the id arrays hold the
 *   groups one after the other and @ends[i] is one past group i's last
 *   entry (strictly increasing, the last equal to the call's n); an event
 *   is recorded once group i has moved.
 * The handles are written to @handles[i], so a consumer can start on layer 0
 * while later layers are still in flight.
 */
struct aeg_kv_layers {
	size_t count;
	const size_t *ends;
	aeg_handle_t *handles;      /* out: @count handles */
};

/*
 * aeg_kv_create - a KV cache of @params->block_bytes blocks on @gpu of
 * @dev (a slab given in @params must be of that device and GPU). On the
 * cuda backend the gather/scatter kernels are loaded at the first creation.
 * The caller owns the params and everything they point to; the cache keeps
 * no pointer into @params.
 * Errors: AEG_EINVAL (block or piece size not a multiple of 256 or out of
 * [AEG_KV_BLOCK_MIN, AEG_KV_BLOCK_MAX], layers or parts over their maximum
 * or not dividing the block, not a divisor of the pool's buffer size, no
 * source or two sources for a side, misaligned bases or stride, a stride
 * shorter than a piece, pieces of one side that overlap, GPU and host
 * memory that overlap, a side smaller than one block, host memory not
 * registered on cuda), AEG_ENOSPC (slab or pool too small: the detail has
 * asked vs available), AEG_ERANGE (more than 2^32 - 2 blocks), AEG_ENOMEM,
 * AEG_EDEVICE. Nothing is held on error.
 */
int aeg_kv_create(aeg_device_t *dev, int gpu, const struct aeg_kv_params *params, aeg_kv_t **kv);

/*
 * aeg_kv_destroy - wait for every call of this cache not released yet
 * (swaps and one-buffer copies: their copies may still read or write its
 * blocks), destroy its events, free its slab block and release its pool
 * buffers. No call on the cache may be running or follow.
 */
void aeg_kv_destroy(aeg_kv_t *kv);

/*
 * Block allocation, O(1) per block, all or nothing. alloc writes @n ids to
 * @ids (AEG_ENOSPC: asked vs free). free takes ids this cache allocated
 * (AEG_EINVAL for one out of range, not allocated or given twice; then none
 * is freed). Allocation is bookkeeping for the caller: swaps accept any id
 * in range, allocated or not, so a consumer can name blocks a producer in
 * another process allocated.
 */
int aeg_kv_gpu_alloc(aeg_kv_t *kv, size_t n, uint32_t *ids);
int aeg_kv_gpu_free(aeg_kv_t *kv, const uint32_t *ids, size_t n);
int aeg_kv_host_alloc(aeg_kv_t *kv, size_t n, uint32_t *ids);
int aeg_kv_host_free(aeg_kv_t *kv, const uint32_t *ids, size_t n);

/*
 * aeg_kv_swap_out - queue on @stream the move of GPU blocks @gpu_ids[i] to
 * host blocks @host_ids[i], i < @n, every layer and part of each, in one
 * gather/scatter kernel launch (cuda; a call of more than 32768 blocks or
 * 32 GiB takes one launch per such piece) or memcpy by a few threads queued
 * on the stream (host). The caller keeps both sides' blocks valid until
 * the call's event completes; no two calls in flight should write the same
 * blocks. The id arrays are copied: they may be reused once the call
 * returns. With @handle_out, an interprocess event recorded after the last
 * block is taken and its handle written there; wait on it with
 * aeg_event_wait_handle (any process of the user) and give it back with
 * aeg_kv_release.
 * Everything is checked before anything is queued: @n == 0, an id out of
 * range or given twice on one side, a stream of another device or GPU are
 * AEG_EINVAL with a detail naming the entry; nothing moves then and no
 * event is taken. A backend failure after queueing began is AEG_EDEVICE;
 * the call's events are then given back.
 * Thread-safe, and calls do not wait for each other: a swap-out and a
 * swap-in issued by two threads on two streams run at the same time (the
 * cache's lock is held only to check ids and count; each call has staging
 * of its own and its kernel leaves room on the GPU for the other's).
 */
int aeg_kv_swap_out(aeg_kv_t *kv, const uint32_t *gpu_ids, const uint32_t *host_ids, size_t n,
		    aeg_stream_t *stream, aeg_handle_t *handle_out);

/* aeg_kv_swap_in - host blocks @host_ids[i] to GPU blocks @gpu_ids[i]; as aeg_kv_swap_out. */
int aeg_kv_swap_in(aeg_kv_t *kv, const uint32_t *host_ids, const uint32_t *gpu_ids, size_t n,
		   aeg_stream_t *stream, aeg_handle_t *handle_out);

/*
 * aeg_kv_swap_out_layers, aeg_kv_swap_in_layers - as above, with an event
 * per layer (@layers, see struct aeg_kv_layers) besides the call's, one
 * kernel launch per layer, layer 0 first; @handle_out is required.
 * aeg_kv_release of the call's handle releases the layer events too.
 * AEG_EINVAL for layer ends given on a cache of several layers or missing
 * on a cache of one, a count that is not the cache's layers, ends that are
 * not strictly increasing up to @n.
 */
int aeg_kv_swap_out_layers(aeg_kv_t *kv, const uint32_t *gpu_ids, const uint32_t *host_ids,
			   size_t n, const struct aeg_kv_layers *layers, aeg_stream_t *stream,
			   aeg_handle_t *handle_out);
int aeg_kv_swap_in_layers(aeg_kv_t *kv, const uint32_t *host_ids, const uint32_t *gpu_ids,
			  size_t n, const struct aeg_kv_layers *layers, aeg_stream_t *stream,
			  aeg_handle_t *handle_out);

/*
 * aeg_kv_copy_h2d, aeg_kv_copy_d2h - one asynchronous copy of @bytes on
 * @stream (the seed's KVCache helpers): host @src to device @dst, or device
 * @src to host @dst, anywhere (not only in the cache's blocks). Host memory
 * must be pinned on cuda for the copy to be asynchronous. @handle_out as for
 * swaps. AEG_EINVAL for 0 bytes, NULL pointers or ranges that overlap; on
 * cuda also for pointers of the wrong kind (host where device is expected).
 */
int aeg_kv_copy_h2d(aeg_kv_t *kv, void *dst, const void *src, size_t bytes,
		    aeg_stream_t *stream, aeg_handle_t *handle_out);
int aeg_kv_copy_d2h(aeg_kv_t *kv, void *dst, const void *src, size_t bytes,
		    aeg_stream_t *stream, aeg_handle_t *handle_out);

/*
 * aeg_kv_release - give back the event(s) of the call that returned @handle
 * (its layer events too). The cache keeps up to a few hundred released
 * events and hands them to later calls (making an interprocess event costs
 * microseconds per call and layer; a waiter that opened a handle once waits
 * on it again at no cost), so a released handle may come back from a later
 * call: wait on a handle only until you release it. AEG_ENOENT for a
 * handle this cache does not hold.
 */
int aeg_kv_release(aeg_kv_t *kv, const aeg_handle_t *handle);

/*
 * Device pointer of GPU block @id and host pointer of host block @id (the
 * start of the block in the blocks layout; its piece of layer 0, part 0 in
 * the per-layer layout); NULL when out of range.
 */
void *aeg_kv_gpu_ptr(aeg_kv_t *kv, uint32_t id);
void *aeg_kv_host_ptr(aeg_kv_t *kv, uint32_t id);
/* The piece of @layer, @part of GPU (host) block @id, in either layout; NULL when out of range. */
void *aeg_kv_gpu_piece(aeg_kv_t *kv, uint32_t id, uint32_t layer, uint32_t part);
void *aeg_kv_host_piece(aeg_kv_t *kv, uint32_t id, uint32_t layer, uint32_t part);
uint64_t aeg_kv_block_bytes(const aeg_kv_t *kv);

/* aeg_kv_stats - a consistent snapshot; AEG_EINVAL for NULL arguments. */
int aeg_kv_stats(aeg_kv_t *kv, struct aeg_kv_stats *stats);

#ifdef __cplusplus
}
#endif
#endif

/* KV cache: GPU and host block regions, block allocation, validated bulk swaps and their events. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/event.h>
#include <aegaeon/kv.h>
#include <aegaeon/pinned.h>
#include <aegaeon/slab.h>

#include "internal.h"
#include "kv_internal.h"

/* The events of one call, released together through the call's handle. */
struct kv_op {
	struct kv_op *next;
	aeg_handle_t handle;
	aeg_event_t *ev;
	size_t nlayers;
	aeg_event_t *layer_ev[];
};

static inline int bit_test(const uint64_t *bits, uint32_t i)
{
	return (bits[i >> 6] >> (i & 63)) & 1;
}

static inline void bit_set(uint64_t *bits, uint32_t i)
{
	bits[i >> 6] |= 1ull << (i & 63);
}

static inline void bit_clear(uint64_t *bits, uint32_t i)
{
	bits[i >> 6] &= ~(1ull << (i & 63));
}

static uint64_t *bits_new(uint32_t nbits)
{
	return calloc(((size_t)nbits + 63) / 64 + 1, sizeof(uint64_t));
}

static int freelist_init(struct kv_freelist *fl, uint32_t id_space, uint32_t capacity)
{
	fl->stack = malloc(((size_t)capacity + 1) * sizeof(*fl->stack));
	fl->allocated = bits_new(id_space);
	fl->top = 0;
	fl->capacity = capacity;
	if (!fl->stack || !fl->allocated)
		return aeg_fail(AEG_ENOMEM, "KV free list of %" PRIu32 " blocks", capacity);
	return 0;
}

static void freelist_fini(struct kv_freelist *fl)
{
	free(fl->stack);
	free(fl->allocated);
}

/* Pushing ids from high to low makes allocation hand them out in ascending order. */
static void freelist_push_range_desc(struct kv_freelist *fl, uint32_t first, uint32_t count)
{
	for (uint32_t i = count; i > 0; i--)
		fl->stack[fl->top++] = first + i - 1;
}

static const char *side_name(int gpu)
{
	return gpu ? "GPU" : "host";
}

/*
 * Range and duplicate check of one side of a call, using @mark (all clear
 * on entry and on return).
 */
static int check_ids(uint64_t *mark, const uint32_t *ids, size_t n, uint32_t limit, int gpu)
{
	size_t i;
	int err = 0;

	for (i = 0; i < n; i++) {
		uint32_t id = ids[i];

		if (id >= limit) {
			err = aeg_fail(AEG_EINVAL,
				       "%s block id %" PRIu32 " (entry %zu) is out of range: the cache has %" PRIu32 " %s blocks",
				       side_name(gpu), id, i, limit, side_name(gpu));
			break;
		}
		if (bit_test(mark, id)) {
			size_t first = 0;

			while (ids[first] != id)
				first++;
			err = aeg_fail(AEG_EINVAL,
				       "%s block %" PRIu32 " is given twice in one call (entries %zu and %zu)",
				       side_name(gpu), id, first, i);
			break;
		}
		bit_set(mark, id);
	}
	for (size_t j = 0; j < i; j++)
		bit_clear(mark, ids[j]);
	return err;
}

static int check_stream(const aeg_kv_t *kv, const aeg_stream_t *stream)
{
	if (!stream)
		return aeg_fail(AEG_EINVAL, "no stream given");
	if (stream->dev != kv->dev || stream->gpu != kv->gpu)
		return aeg_fail(AEG_EINVAL,
				"stream is on GPU %d of another device or GPU; the KV cache is on GPU %d",
				stream->gpu, kv->gpu);
	return 0;
}

static int check_block_bytes(uint64_t bytes)
{
	if (bytes < AEG_KV_BLOCK_MIN || bytes > AEG_KV_BLOCK_MAX || bytes % AEG_KV_BLOCK_ALIGN)
		return aeg_fail(AEG_EINVAL,
				"KV block size %" PRIu64 " bytes: must be a multiple of %u from %u to %u bytes",
				bytes, AEG_KV_BLOCK_ALIGN, AEG_KV_BLOCK_MIN, AEG_KV_BLOCK_MAX);
	return 0;
}

/* Whole blocks in @bytes, at most UINT32_MAX - 1 so ids fit in 32 bits. */
static int count_blocks(uint64_t bytes, uint64_t block_bytes, const char *what, uint32_t *blocks)
{
	uint64_t n = bytes / block_bytes;

	if (n == 0)
		return aeg_fail(AEG_EINVAL, "%s of %" PRIu64 " bytes is smaller than one %" PRIu64 "-byte block",
				what, bytes, block_bytes);
	if (n >= UINT32_MAX)
		return aeg_fail(AEG_ERANGE, "%s holds %" PRIu64 " blocks, more than the %u ids allow",
				what, n, UINT32_MAX - 1);
	*blocks = (uint32_t)n;
	return 0;
}

static void op_free(aeg_kv_t *kv, struct kv_op *op)
{
	for (size_t i = 0; i < op->nlayers; i++)
		if (op->layer_ev[i])
			aeg_event_destroy(op->layer_ev[i]);
	if (op->ev)
		aeg_event_destroy(op->ev);
	free(op);
}

/* Undo whatever part of aeg_kv_create got done; also the body of aeg_kv_destroy. */
static void kv_free(aeg_kv_t *kv)
{
	if (kv->host)
		kv_host_fini(kv);
#ifdef HAVE_CUDA
	if (kv->cuda)
		kv_cuda_fini(kv);
#endif
	while (kv->ops) {
		struct kv_op *op = kv->ops;

		kv->ops = op->next;
		op_free(kv, op);
	}
	for (uint32_t i = 0; i < kv->pool_nbuffers; i++)
		aeg_pool_release(kv->pool, kv->pool_buffers[i]);
	free(kv->pool_buffers);
	if (kv->slab_id)
		aeg_slab_free(kv->slab, kv->slab_id);
	freelist_fini(&kv->gpu_free);
	freelist_fini(&kv->host_free);
	free(kv->gpu_mark);
	free(kv->host_mark);
	pthread_mutex_destroy(&kv->lock);
	free(kv);
}

/* Everything about the parameters that can be checked before holding anything. */
static int check_params(aeg_device_t *dev, int gpu, const struct aeg_kv_params *p)
{
	int err;

	if ((err = check_block_bytes(p->block_bytes)))
		return err;
	if (!p->slab == !p->gpu_base)
		return aeg_fail(AEG_EINVAL, "KV GPU blocks: give either a slab or a device range, not %s",
				p->slab ? "both" : "neither");
	if (p->slab) {
		if (aeg_slab_device(p->slab) != dev || aeg_slab_gpu(p->slab) != gpu)
			return aeg_fail(AEG_EINVAL, "KV slab is on GPU %d of another device or GPU; the cache is for GPU %d",
					aeg_slab_gpu(p->slab), gpu);
		if (p->gpu_blocks == 0)
			return aeg_fail(AEG_EINVAL, "KV cache of 0 GPU blocks");
		if (p->gpu_blocks == UINT32_MAX)
			return aeg_fail(AEG_ERANGE, "%" PRIu32 " GPU blocks: at most %u", p->gpu_blocks, UINT32_MAX - 1);
	} else if ((uintptr_t)p->gpu_base % AEG_KV_BLOCK_ALIGN) {
		return aeg_fail(AEG_EINVAL, "KV device range at %p is not %u-byte aligned",
				p->gpu_base, AEG_KV_BLOCK_ALIGN);
	}
	if (!p->pool == !p->host_base)
		return aeg_fail(AEG_EINVAL, "KV host blocks: give either a pinned pool or a host range, not %s",
				p->pool ? "both" : "neither");
	if (!p->pool && (uintptr_t)p->host_base % AEG_KV_BLOCK_ALIGN)
		return aeg_fail(AEG_EINVAL, "KV host range at %p is not %u-byte aligned",
				p->host_base, AEG_KV_BLOCK_ALIGN);
	return 0;
}

static int setup_gpu(aeg_kv_t *kv, const struct aeg_kv_params *p)
{
	struct aeg_block blk;
	int err;

	if (p->slab) {
		if (p->gpu_blocks > UINT64_MAX / p->block_bytes)
			return aeg_fail(AEG_ERANGE, "%" PRIu32 " GPU blocks of %" PRIu64 " bytes overflow",
					p->gpu_blocks, p->block_bytes);
		err = aeg_slab_alloc(p->slab, (uint64_t)p->gpu_blocks * p->block_bytes, &blk);
		if (err) {
			aeg_error_prefix("KV cache of %" PRIu32 " GPU blocks of %" PRIu64 " bytes",
					 p->gpu_blocks, p->block_bytes);
			return err;
		}
		kv->slab = p->slab;
		kv->slab_id = blk.id;
		kv->gpu_base = blk.ptr;
		kv->gpu_blocks = p->gpu_blocks;
		return 0;
	}
	kv->gpu_base = p->gpu_base;
	return count_blocks(p->gpu_bytes, p->block_bytes, "KV device range", &kv->gpu_blocks);
}

static int setup_host(aeg_kv_t *kv, const struct aeg_kv_params *p)
{
	struct aeg_pool_stats ps;
	struct aeg_pool_buffer buf;
	int err;

	if (!p->pool) {
		kv->host_base = p->host_base;
		return count_blocks(p->host_bytes, p->block_bytes, "KV host range", &kv->host_blocks);
	}
	if ((err = aeg_pool_stats(p->pool, &ps)))
		return err;
	if (ps.buffer_bytes % p->block_bytes)
		return aeg_fail(AEG_EINVAL,
				"KV block size %" PRIu64 " does not divide the pool's buffer size %" PRIu64
				": blocks may not straddle buffers",
				p->block_bytes, ps.buffer_bytes);
	if (p->host_buffers > ps.buffers)
		return aeg_fail(AEG_ENOSPC, "KV cache asks %" PRIu32 " pool buffers; the pool has only %" PRIu32,
				p->host_buffers, ps.buffers);
	kv->pool = p->pool;
	kv->pool_buffer_bytes = ps.buffer_bytes;
	kv->host_base = aeg_pool_base(p->pool);
	if ((err = count_blocks(ps.pool_bytes, p->block_bytes, "pinned pool", &kv->host_blocks)))
		return err;
	if (p->host_buffers == 0)
		return 0;
	kv->pool_buffers = calloc(p->host_buffers, sizeof(*kv->pool_buffers));
	if (!kv->pool_buffers)
		return aeg_fail(AEG_ENOMEM, "KV pool buffer list");
	while (kv->pool_nbuffers < p->host_buffers) {
		err = aeg_pool_acquire(p->pool, 0, &buf);
		if (err == AEG_ETIMEDOUT)
			return aeg_fail(AEG_ENOSPC,
					"pinned pool too small for the KV cache: asked %" PRIu32 " buffers of %" PRIu64
					" bytes, only %" PRIu32 " of %" PRIu32 " were free",
					p->host_buffers, ps.buffer_bytes, kv->pool_nbuffers, ps.buffers);
		if (err)
			return err;
		kv->pool_buffers[kv->pool_nbuffers++] = buf.index;
	}
	return 0;
}

static int setup_lists(aeg_kv_t *kv)
{
	uint32_t per_buffer, owned;
	int err;

	if ((err = freelist_init(&kv->gpu_free, kv->gpu_blocks, kv->gpu_blocks)))
		return err;
	freelist_push_range_desc(&kv->gpu_free, 0, kv->gpu_blocks);

	if (kv->pool) {
		per_buffer = (uint32_t)(kv->pool_buffer_bytes / kv->block_bytes);
		owned = kv->pool_nbuffers * per_buffer;
	} else {
		per_buffer = 0;
		owned = kv->host_blocks;
	}
	if ((err = freelist_init(&kv->host_free, kv->host_blocks, owned)))
		return err;
	if (kv->pool) {
		for (uint32_t i = kv->pool_nbuffers; i > 0; i--)
			freelist_push_range_desc(&kv->host_free, kv->pool_buffers[i - 1] * per_buffer,
						 per_buffer);
	} else {
		freelist_push_range_desc(&kv->host_free, 0, kv->host_blocks);
	}

	kv->gpu_mark = bits_new(kv->gpu_blocks);
	kv->host_mark = bits_new(kv->host_blocks);
	if (!kv->gpu_mark || !kv->host_mark)
		return aeg_fail(AEG_ENOMEM, "KV duplicate-check bitmaps");
	return 0;
}

static int ranges_overlap(const char *a, uint64_t a_bytes, const char *b, uint64_t b_bytes)
{
	return (uintptr_t)a < (uintptr_t)b + b_bytes && (uintptr_t)b < (uintptr_t)a + a_bytes;
}

AEG_EXPORT int aeg_kv_create(aeg_device_t *dev, int gpu, const struct aeg_kv_params *params,
			     aeg_kv_t **out)
{
	aeg_kv_t *kv;
	int err;

	if (!out)
		return aeg_fail(AEG_EINVAL, "aeg_kv_create: no place for the cache");
	*out = NULL;
	if (!dev || !params)
		return aeg_fail(AEG_EINVAL, "aeg_kv_create: no %s given", dev ? "parameters" : "device");
	if ((err = aeg_device_check_gpu(dev, gpu)))
		return err;
	if ((err = check_params(dev, gpu, params)))
		return err;

	kv = calloc(1, sizeof(*kv));
	if (!kv)
		return aeg_fail(AEG_ENOMEM, "KV cache");
	pthread_mutex_init(&kv->lock, NULL);
	kv->dev = dev;
	kv->gpu = gpu;
	kv->block_bytes = params->block_bytes;

	if ((err = setup_gpu(kv, params)))
		goto fail;
	if ((err = setup_host(kv, params)))
		goto fail;
	if (ranges_overlap(kv->gpu_base, (uint64_t)kv->gpu_blocks * kv->block_bytes,
			   kv->host_base, (uint64_t)kv->host_blocks * kv->block_bytes)) {
		err = aeg_fail(AEG_EINVAL, "KV GPU blocks at %p and host blocks at %p overlap: a swap would copy memory onto itself",
			       (void *)kv->gpu_base, (void *)kv->host_base);
		goto fail;
	}
	if ((err = setup_lists(kv)))
		goto fail;

	kv->host_dev = kv->host_base;
	switch (aeg_device_kind(dev)) {
	case AEG_DEVICE_HOST:
		err = kv_host_init(kv);
		break;
	case AEG_DEVICE_CUDA:
#ifdef HAVE_CUDA
		err = kv_cuda_init(kv);
#else
		err = aeg_fail(AEG_ENOTSUP, "KV cache on cuda: this build has no CUDA");
#endif
		break;
	default:
		err = aeg_fail(AEG_ENOTSUP, "KV cache: unknown device kind");
		break;
	}
	if (err)
		goto fail;

	kv->stats.block_bytes = kv->block_bytes;
	kv->stats.gpu_blocks = kv->gpu_blocks;
	kv->stats.host_blocks = kv->host_blocks;
	kv->stats.host_owned = kv->host_free.capacity;
	aeg_debug("KV cache on GPU %d: %" PRIu32 " GPU and %" PRIu32 " host blocks (%" PRIu32 " ours) of %" PRIu64 " bytes",
		  gpu, kv->gpu_blocks, kv->host_blocks, kv->host_free.capacity, kv->block_bytes);
	*out = kv;
	return 0;

fail:
	kv_free(kv);
	return err;
}

AEG_EXPORT void aeg_kv_destroy(aeg_kv_t *kv)
{
	if (kv)
		kv_free(kv);
}

static int list_alloc(aeg_kv_t *kv, struct kv_freelist *fl, int gpu, size_t n, uint32_t *ids,
		      uint32_t *used)
{
	int err = 0;

	if (!kv || !ids)
		return aeg_fail(AEG_EINVAL, "KV %s block alloc: no %s given", side_name(gpu), kv ? "id array" : "cache");
	if (n == 0)
		return aeg_fail(AEG_EINVAL, "KV %s block alloc of 0 blocks", side_name(gpu));
	pthread_mutex_lock(&kv->lock);
	if (n > fl->top) {
		err = aeg_fail(AEG_ENOSPC, "KV %s blocks: asked %zu, %" PRIu32 " free of %" PRIu32,
			       side_name(gpu), n, fl->top, fl->capacity);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		ids[i] = fl->stack[--fl->top];
		bit_set(fl->allocated, ids[i]);
	}
	*used += (uint32_t)n;
out:
	pthread_mutex_unlock(&kv->lock);
	return err;
}

static int list_free(aeg_kv_t *kv, struct kv_freelist *fl, uint64_t *mark, uint32_t limit, int gpu,
		     const uint32_t *ids, size_t n, uint32_t *used)
{
	int err;

	if (!kv || !ids)
		return aeg_fail(AEG_EINVAL, "KV %s block free: no %s given", side_name(gpu), kv ? "id array" : "cache");
	if (n == 0)
		return aeg_fail(AEG_EINVAL, "KV %s block free of 0 blocks", side_name(gpu));
	pthread_mutex_lock(&kv->lock);
	if ((err = check_ids(mark, ids, n, limit, gpu)))
		goto out;
	for (size_t i = 0; i < n; i++) {
		if (!bit_test(fl->allocated, ids[i])) {
			err = aeg_fail(AEG_EINVAL, "KV %s block %" PRIu32 " (entry %zu) is not allocated",
				       side_name(gpu), ids[i], i);
			goto out;
		}
	}
	for (size_t i = 0; i < n; i++) {
		bit_clear(fl->allocated, ids[i]);
		fl->stack[fl->top++] = ids[i];
	}
	*used -= (uint32_t)n;
out:
	pthread_mutex_unlock(&kv->lock);
	return err;
}

AEG_EXPORT int aeg_kv_gpu_alloc(aeg_kv_t *kv, size_t n, uint32_t *ids)
{
	return list_alloc(kv, kv ? &kv->gpu_free : NULL, 1, n, ids, kv ? &kv->stats.gpu_used : NULL);
}

AEG_EXPORT int aeg_kv_gpu_free(aeg_kv_t *kv, const uint32_t *ids, size_t n)
{
	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV GPU block free: no cache given");
	return list_free(kv, &kv->gpu_free, kv->gpu_mark, kv->gpu_blocks, 1, ids, n, &kv->stats.gpu_used);
}

AEG_EXPORT int aeg_kv_host_alloc(aeg_kv_t *kv, size_t n, uint32_t *ids)
{
	return list_alloc(kv, kv ? &kv->host_free : NULL, 0, n, ids, kv ? &kv->stats.host_used : NULL);
}

AEG_EXPORT int aeg_kv_host_free(aeg_kv_t *kv, const uint32_t *ids, size_t n)
{
	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV host block free: no cache given");
	return list_free(kv, &kv->host_free, kv->host_mark, kv->host_blocks, 0, ids, n, &kv->stats.host_used);
}

/* Make the events of a call before anything is queued, so a failure here moves nothing. */
/* Hand @op's call handle out and keep its events until released. Lock held. */
static void op_publish(aeg_kv_t *kv, struct kv_op *op, aeg_handle_t *handle_out)
{
	*handle_out = op->handle;
	op->next = kv->ops;
	kv->ops = op;
	kv->stats.events_live += 1 + (uint32_t)op->nlayers;
}

static int op_new(aeg_kv_t *kv, const struct aeg_kv_layers *layers, struct kv_op **out)
{
	size_t nlayers = layers ? layers->count : 0;
	struct kv_op *op;
	int err;

	op = calloc(1, sizeof(*op) + nlayers * sizeof(op->layer_ev[0]));
	if (!op)
		return aeg_fail(AEG_ENOMEM, "KV call events");
	for (size_t i = 0; i < nlayers; i++) {
		err = aeg_event_create(kv->dev, kv->gpu, &op->layer_ev[i], &layers->handles[i]);
		if (err)
			goto fail;
		op->nlayers = i + 1;
	}
	if ((err = aeg_event_create(kv->dev, kv->gpu, &op->ev, &op->handle)))
		goto fail;
	*out = op;
	return 0;
fail:
	op_free(kv, op);
	return err;
}

static int check_layers(const struct aeg_kv_layers *layers, size_t n, const aeg_handle_t *handle_out)
{
	if (!layers)
		return aeg_fail(AEG_EINVAL, "per-layer swap without layers");
	if (!handle_out)
		return aeg_fail(AEG_EINVAL, "per-layer swap without a place for the call's handle");
	if (layers->count == 0 || !layers->ends || !layers->handles)
		return aeg_fail(AEG_EINVAL, "per-layer swap: %s", layers->count == 0 ? "0 layers" :
				!layers->ends ? "no layer ends" : "no place for the layer handles");
	for (size_t i = 0; i < layers->count; i++) {
		size_t prev = i ? layers->ends[i - 1] : 0;

		if (layers->ends[i] <= prev)
			return aeg_fail(AEG_EINVAL, "layer %zu ends at entry %zu, not after %zu: layer ends must increase strictly",
					i, layers->ends[i], prev);
	}
	if (layers->ends[layers->count - 1] != n)
		return aeg_fail(AEG_EINVAL, "the last layer ends at entry %zu; the call has %zu blocks",
				layers->ends[layers->count - 1], n);
	return 0;
}

static int swap(aeg_kv_t *kv, int out, const uint32_t *gpu_ids, const uint32_t *host_ids, size_t n,
		const struct aeg_kv_layers *layers, aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	const char *what = out ? "swap-out" : "swap-in";
	aeg_event_t *no_event = NULL;
	struct kv_op *op = NULL;
	struct kv_move mv;
	int err;

	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV %s: no cache given", what);
	if (!gpu_ids || !host_ids)
		return aeg_fail(AEG_EINVAL, "KV %s: no %s block ids given", what, gpu_ids ? "host" : "GPU");
	if (n == 0)
		return aeg_fail(AEG_EINVAL, "KV %s of 0 blocks", what);
	if ((err = check_stream(kv, stream)))
		return err;
	if (layers && (err = check_layers(layers, n, handle_out)))
		return err;

	pthread_mutex_lock(&kv->lock);
	if ((err = check_ids(kv->gpu_mark, gpu_ids, n, kv->gpu_blocks, 1)))
		goto out;
	if ((err = check_ids(kv->host_mark, host_ids, n, kv->host_blocks, 0)))
		goto out;
	if (handle_out && (err = op_new(kv, layers, &op)))
		goto out;

	mv = (struct kv_move){
		.src = out ? kv->gpu_base : kv->host_dev,
		.dst = out ? kv->host_dev : kv->gpu_base,
		.src_ids = out ? gpu_ids : host_ids,
		.dst_ids = out ? host_ids : gpu_ids,
		.n = n,
		.ends = layers ? layers->ends : &n,
		.nseg = layers ? layers->count : 1,
		.seg_events = layers ? op->layer_ev : &no_event,
	};
	if (kv->host)
		err = kv_host_move(kv, &mv, stream);
#ifdef HAVE_CUDA
	else
		err = kv_cuda_move(kv, &mv, stream);
#endif
	if (!err && op)
		err = aeg_event_record(op->ev, stream);
	if (err) {
		aeg_error_prefix("KV %s of %zu blocks", what, n);
		/* Some of it may be queued: let it drain before its events go. */
		if (op)
			aeg_stream_sync(stream);
		goto out;
	}

	if (op) {
		op_publish(kv, op, handle_out);
		op = NULL;
	}
	if (out) {
		kv->stats.swaps_out++;
		kv->stats.blocks_out += n;
	} else {
		kv->stats.swaps_in++;
		kv->stats.blocks_in += n;
	}
out:
	if (op)
		op_free(kv, op);
	pthread_mutex_unlock(&kv->lock);
	return err;
}

AEG_EXPORT int aeg_kv_swap_out(aeg_kv_t *kv, const uint32_t *gpu_ids, const uint32_t *host_ids,
			       size_t n, aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	return swap(kv, 1, gpu_ids, host_ids, n, NULL, stream, handle_out);
}

AEG_EXPORT int aeg_kv_swap_in(aeg_kv_t *kv, const uint32_t *host_ids, const uint32_t *gpu_ids,
			      size_t n, aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	return swap(kv, 0, gpu_ids, host_ids, n, NULL, stream, handle_out);
}

AEG_EXPORT int aeg_kv_swap_out_layers(aeg_kv_t *kv, const uint32_t *gpu_ids,
				      const uint32_t *host_ids, size_t n,
				      const struct aeg_kv_layers *layers, aeg_stream_t *stream,
				      aeg_handle_t *handle_out)
{
	if (!layers)
		return aeg_fail(AEG_EINVAL, "KV swap-out by layers: no layers given");
	return swap(kv, 1, gpu_ids, host_ids, n, layers, stream, handle_out);
}

AEG_EXPORT int aeg_kv_swap_in_layers(aeg_kv_t *kv, const uint32_t *host_ids,
				     const uint32_t *gpu_ids, size_t n,
				     const struct aeg_kv_layers *layers, aeg_stream_t *stream,
				     aeg_handle_t *handle_out)
{
	if (!layers)
		return aeg_fail(AEG_EINVAL, "KV swap-in by layers: no layers given");
	return swap(kv, 0, gpu_ids, host_ids, n, layers, stream, handle_out);
}

static int copy(aeg_kv_t *kv, int h2d, void *dst, const void *src, size_t bytes,
		aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	const char *what = h2d ? "H2D" : "D2H";
	struct kv_op *op = NULL;
	int err;

	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV %s copy: no cache given", what);
	if (!dst || !src)
		return aeg_fail(AEG_EINVAL, "KV %s copy: no %s pointer", what, dst ? "source" : "destination");
	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "KV %s copy of 0 bytes", what);
	if ((uintptr_t)dst > UINTPTR_MAX - bytes || (uintptr_t)src > UINTPTR_MAX - bytes)
		return aeg_fail(AEG_EINVAL, "KV %s copy of %zu bytes wraps around the address space", what, bytes);
	if (ranges_overlap(dst, bytes, src, bytes))
		return aeg_fail(AEG_EINVAL, "KV %s copy: source %p and destination %p overlap (%zu bytes)",
				what, src, dst, bytes);
	if ((err = check_stream(kv, stream)))
		return err;
#ifdef HAVE_CUDA
	if (kv->cuda && (err = kv_cuda_check_copy(kv, dst, src, h2d)))
		return err;
#endif

	pthread_mutex_lock(&kv->lock);
	if (handle_out && (err = op_new(kv, NULL, &op)))
		goto out;
	err = aeg_memcpy_async(stream, dst, src, bytes);
	if (!err && op)
		err = aeg_event_record(op->ev, stream);
	if (err) {
		aeg_error_prefix("KV %s copy of %zu bytes", what, bytes);
		if (op)
			aeg_stream_sync(stream);
		goto out;
	}
	if (op) {
		op_publish(kv, op, handle_out);
		op = NULL;
	}
	kv->stats.copies++;
	kv->stats.copy_bytes += bytes;
out:
	if (op)
		op_free(kv, op);
	pthread_mutex_unlock(&kv->lock);
	return err;
}

AEG_EXPORT int aeg_kv_copy_h2d(aeg_kv_t *kv, void *dst, const void *src, size_t bytes,
			       aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	return copy(kv, 1, dst, src, bytes, stream, handle_out);
}

AEG_EXPORT int aeg_kv_copy_d2h(aeg_kv_t *kv, void *dst, const void *src, size_t bytes,
			       aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	return copy(kv, 0, dst, src, bytes, stream, handle_out);
}

AEG_EXPORT int aeg_kv_release(aeg_kv_t *kv, const aeg_handle_t *handle)
{
	struct kv_op **pp, *op = NULL;

	if (!kv || !handle)
		return aeg_fail(AEG_EINVAL, "KV release: no %s given", kv ? "handle" : "cache");
	pthread_mutex_lock(&kv->lock);
	for (pp = &kv->ops; *pp; pp = &(*pp)->next) {
		if (memcmp((*pp)->handle.bytes, handle->bytes, AEG_HANDLE_BYTES) == 0) {
			op = *pp;
			*pp = op->next;
			kv->stats.events_live -= 1 + (uint32_t)op->nlayers;
			break;
		}
	}
	pthread_mutex_unlock(&kv->lock);
	if (!op)
		return aeg_fail(AEG_ENOENT, "KV release: the handle is not one of this cache's calls (or was released)");
	op_free(kv, op);
	return 0;
}

AEG_EXPORT void *aeg_kv_gpu_ptr(aeg_kv_t *kv, uint32_t id)
{
	if (!kv || id >= kv->gpu_blocks)
		return NULL;
	return kv->gpu_base + (uint64_t)id * kv->block_bytes;
}

AEG_EXPORT void *aeg_kv_host_ptr(aeg_kv_t *kv, uint32_t id)
{
	if (!kv || id >= kv->host_blocks)
		return NULL;
	return kv->host_base + (uint64_t)id * kv->block_bytes;
}

AEG_EXPORT uint64_t aeg_kv_block_bytes(const aeg_kv_t *kv)
{
	return kv ? kv->block_bytes : 0;
}

AEG_EXPORT int aeg_kv_stats(aeg_kv_t *kv, struct aeg_kv_stats *stats)
{
	if (!kv || !stats)
		return aeg_fail(AEG_EINVAL, "KV stats: no %s given", kv ? "place for the stats" : "cache");
	pthread_mutex_lock(&kv->lock);
	*stats = kv->stats;
	pthread_mutex_unlock(&kv->lock);
	return 0;
}

int aeg_kv_baseline(aeg_kv_t *kv, enum kv_baseline how, int out, const uint32_t *src_ids,
		    const uint32_t *dst_ids, size_t n, aeg_stream_t *stream)
{
	const char *src = out ? kv->gpu_base : kv->host_base;
	char *dst = out ? kv->host_base : kv->gpu_base;
	uint32_t src_limit = out ? kv->gpu_blocks : kv->host_blocks;
	uint32_t dst_limit = out ? kv->host_blocks : kv->gpu_blocks;
	int err;

	if ((err = check_stream(kv, stream)))
		return err;
	for (size_t i = 0; i < n; i++)
		if (src_ids[i] >= src_limit || dst_ids[i] >= dst_limit)
			return aeg_fail(AEG_EINVAL, "baseline copy: entry %zu out of range", i);
	if (kv->host) {
		if (how != KV_BASELINE_PER_BLOCK)
			return aeg_fail(AEG_ENOTSUP, "batched copies need the cuda backend");
		return kv_host_baseline(kv, src, dst, src_ids, dst_ids, n, stream);
	}
#ifdef HAVE_CUDA
	return kv_cuda_baseline(kv, how, src, dst, src_ids, dst_ids, n, stream);
#else
	return aeg_fail(AEG_ENOTSUP, "baseline copy: no backend");
#endif
}

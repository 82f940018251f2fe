/* KV cache: creation from its parameters, block allocation, block pointers and stats. */
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

const char *kv_side_name(int gpu)
{
	return gpu ? "GPU" : "host";
}

int kv_check_ids(uint64_t *mark, const uint32_t *ids, size_t n, uint32_t limit, int gpu)
{
	size_t i;
	int err = 0;

	for (i = 0; i < n; i++) {
		uint32_t id = ids[i];

		if (id >= limit) {
			err = aeg_fail(AEG_EINVAL,
				       "%s block id %" PRIu32 " (entry %zu) is out of range: the cache has %" PRIu32 " %s blocks",
				       kv_side_name(gpu), id, i, limit, kv_side_name(gpu));
			break;
		}
		if (kv_bit_test(mark, id)) {
			size_t first = 0;

			while (ids[first] != id)
				first++;
			err = aeg_fail(AEG_EINVAL,
				       "%s block %" PRIu32 " is given twice in one call (entries %zu and %zu)",
				       kv_side_name(gpu), id, first, i);
			break;
		}
		kv_bit_set(mark, id);
	}
	for (size_t j = 0; j < i; j++)
		kv_bit_clear(mark, ids[j]);
	return err;
}

int kv_check_stream(const aeg_kv_t *kv, const aeg_stream_t *stream)
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

/* Layers and parts: each in range and together cutting the block into pieces of a multiple of 256. */
static int check_shape(const struct aeg_kv_params *p, uint32_t layers, uint32_t parts)
{
	uint64_t pieces = (uint64_t)layers * parts;

	if (layers > AEG_KV_LAYERS_MAX || parts > AEG_KV_PARTS_MAX)
		return aeg_fail(AEG_EINVAL, "KV cache of %" PRIu32 " layers of %" PRIu32 " parts: at most %u layers and %u parts",
				layers, parts, AEG_KV_LAYERS_MAX, AEG_KV_PARTS_MAX);
	if (p->block_bytes % pieces || (p->block_bytes / pieces) % AEG_KV_BLOCK_ALIGN)
		return aeg_fail(AEG_EINVAL,
				"KV block of %" PRIu64 " bytes does not split into %" PRIu32 " layers x %" PRIu32
				" parts of a multiple of %u bytes each",
				p->block_bytes, layers, parts, AEG_KV_BLOCK_ALIGN);
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

/* Undo whatever part of aeg_kv_create got done; also the body of aeg_kv_destroy. */
static void kv_free(aeg_kv_t *kv)
{
	/*
	 * Every call not released ends first, whatever path its copies took
	 * (a CUDA copy engine's DMA is waited for by nothing else here): its
	 * slab block and pool buffers are given back below, to be used again.
	 */
	kv_ops_settle(kv);
	if (kv->backend)
		kv->backend->fini(kv);
	kv_ops_fini(kv);
	for (uint32_t i = 0; i < kv->pool_nbuffers; i++)
		aeg_pool_release(kv->pool, kv->pool_buffers[i]);
	free(kv->pool_buffers);
	if (kv->slab_id)
		aeg_slab_free(kv->slab, kv->slab_id);
	kv_plans_fini(kv);
	kv_side_fini(&kv->gpu_side);
	kv_side_fini(&kv->host_side);
	freelist_fini(&kv->gpu_free);
	freelist_fini(&kv->host_free);
	free(kv->gpu_mark);
	free(kv->host_mark);
	pthread_mutex_destroy(&kv->lock);
	free(kv);
}

static int sources(int a, int b, int c)
{
	return !!a + !!b + !!c;
}

/* Everything about the parameters that can be checked before holding anything. */
static int check_params(aeg_device_t *dev, int gpu, const struct aeg_kv_params *p)
{
	int n, err;

	if ((err = check_block_bytes(p->block_bytes)) ||
	    (err = check_shape(p, p->layers ? p->layers : 1, p->parts ? p->parts : 1)))
		return err;
	if ((n = sources(p->slab != NULL, p->gpu_base != NULL, p->gpu_tensors != NULL)) != 1)
		return aeg_fail(AEG_EINVAL, "KV GPU blocks: give one of a slab, a device range or per-layer tensors, not %s",
				n ? "several" : "none");
	if (p->slab) {
		if (aeg_slab_device(p->slab) != dev || aeg_slab_gpu(p->slab) != gpu)
			return aeg_fail(AEG_EINVAL, "KV slab is on GPU %d of another device or GPU; the cache is for GPU %d",
					aeg_slab_gpu(p->slab), gpu);
		if (p->gpu_blocks == 0)
			return aeg_fail(AEG_EINVAL, "KV cache of 0 GPU blocks");
		if (p->gpu_blocks == UINT32_MAX)
			return aeg_fail(AEG_ERANGE, "%" PRIu32 " GPU blocks: at most %u", p->gpu_blocks, UINT32_MAX - 1);
	} else if (p->gpu_base && (uintptr_t)p->gpu_base % AEG_KV_BLOCK_ALIGN) {
		return aeg_fail(AEG_EINVAL, "KV device range at %p is not %u-byte aligned",
				p->gpu_base, AEG_KV_BLOCK_ALIGN);
	} else if (p->gpu_base && (uintptr_t)p->gpu_base > UINTPTR_MAX - p->gpu_bytes) {
		/* Its end would wrap: the overlap check with the host range would see past it. */
		return aeg_fail(AEG_EINVAL, "KV device range at %p of %" PRIu64 " bytes wraps around the address space",
				p->gpu_base, p->gpu_bytes);
	}
	if ((n = sources(p->pool != NULL, p->host_base != NULL, p->host_tensors != NULL)) != 1)
		return aeg_fail(AEG_EINVAL, "KV host blocks: give one of a pinned pool, a host range or per-layer tensors, not %s",
				n ? "several" : "none");
	if (p->host_base && (uintptr_t)p->host_base % AEG_KV_BLOCK_ALIGN)
		return aeg_fail(AEG_EINVAL, "KV host range at %p is not %u-byte aligned",
				p->host_base, AEG_KV_BLOCK_ALIGN);
	if (p->host_base && (uintptr_t)p->host_base > UINTPTR_MAX - p->host_bytes)
		return aeg_fail(AEG_EINVAL, "KV host range at %p of %" PRIu64 " bytes wraps around the address space",
				p->host_base, p->host_bytes);
	return 0;
}

static int setup_gpu(aeg_kv_t *kv, const struct aeg_kv_params *p)
{
	struct aeg_block blk;
	uint32_t blocks = 0;
	int err;

	if (p->gpu_tensors)
		return kv_side_tensors(&kv->gpu_side, p->gpu_tensors, kv, "KV GPU");
	if (!p->slab) {
		if ((err = count_blocks(p->gpu_bytes, p->block_bytes, "KV device range", &blocks)))
			return err;
		return kv_side_blocks(&kv->gpu_side, p->gpu_base, blocks, kv);
	}
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
	return kv_side_blocks(&kv->gpu_side, blk.ptr, p->gpu_blocks, kv);
}

static int acquire_buffers(aeg_kv_t *kv, const struct aeg_kv_params *p, const struct aeg_pool_stats *ps)
{
	struct aeg_pool_buffer buf;
	int err;

	kv->pool_buffers = calloc(p->host_buffers, sizeof(*kv->pool_buffers));
	if (!kv->pool_buffers)
		return aeg_fail(AEG_ENOMEM, "KV pool buffer list");
	while (kv->pool_nbuffers < p->host_buffers) {
		err = aeg_pool_acquire(p->pool, 0, &buf);
		if (err == AEG_ETIMEDOUT)
			return aeg_fail(AEG_ENOSPC,
					"pinned pool too small for the KV cache: asked %" PRIu32 " buffers of %" PRIu64
					" bytes, only %" PRIu32 " of %" PRIu32 " were free",
					p->host_buffers, ps->buffer_bytes, kv->pool_nbuffers, ps->buffers);
		if (err)
			return err;
		kv->pool_buffers[kv->pool_nbuffers++] = buf.index;
	}
	return 0;
}

static int setup_host(aeg_kv_t *kv, const struct aeg_kv_params *p)
{
	struct aeg_pool_stats ps;
	uint32_t blocks = 0;
	int err;

	if (p->host_tensors)
		return kv_side_tensors(&kv->host_side, p->host_tensors, kv, "KV host");
	if (!p->pool) {
		if ((err = count_blocks(p->host_bytes, p->block_bytes, "KV host range", &blocks)))
			return err;
		return kv_side_blocks(&kv->host_side, p->host_base, blocks, kv);
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
	if ((err = count_blocks(ps.pool_bytes, p->block_bytes, "pinned pool", &blocks)) ||
	    (err = kv_side_blocks(&kv->host_side, aeg_pool_base(p->pool), blocks, kv)))
		return err;
	return p->host_buffers ? acquire_buffers(kv, p, &ps) : 0;
}

static int setup_lists(aeg_kv_t *kv)
{
	uint32_t gpu_blocks = kv->gpu_side.blocks, host_blocks = kv->host_side.blocks;
	uint32_t per_buffer, owned;
	int err;

	if ((err = freelist_init(&kv->gpu_free, gpu_blocks, gpu_blocks)))
		return err;
	freelist_push_range_desc(&kv->gpu_free, 0, gpu_blocks);

	if (kv->pool) {
		per_buffer = (uint32_t)(kv->pool_buffer_bytes / kv->block_bytes);
		owned = kv->pool_nbuffers * per_buffer;
	} else {
		per_buffer = 0;
		owned = host_blocks;
	}
	if ((err = freelist_init(&kv->host_free, host_blocks, owned)))
		return err;
	if (kv->pool) {
		for (uint32_t i = kv->pool_nbuffers; i > 0; i--)
			freelist_push_range_desc(&kv->host_free, kv->pool_buffers[i - 1] * per_buffer,
						 per_buffer);
	} else {
		freelist_push_range_desc(&kv->host_free, 0, host_blocks);
	}

	kv->gpu_mark = bits_new(gpu_blocks);
	kv->host_mark = bits_new(host_blocks);
	if (!kv->gpu_mark || !kv->host_mark)
		return aeg_fail(AEG_ENOMEM, "KV duplicate-check bitmaps");
	return 0;
}

/* The backend's part: mapping checks, the plans (which need the device's views), then its state. */
static int setup_backend(aeg_kv_t *kv)
{
	int err;

	switch (aeg_device_kind(kv->dev)) {
	case AEG_DEVICE_HOST:
		kv->backend = &kv_host_backend;
		break;
	case AEG_DEVICE_CUDA:
		kv->backend = &kv_cuda_backend;
		break;
	default:
		return aeg_fail(AEG_ENOTSUP, "KV cache: unknown device kind");
	}
	if ((kv->backend->map && (err = kv->backend->map(kv))) || (err = kv_plans_build(kv)))
		return err;
	return kv->backend->init(kv);
}

static void fill_stats(aeg_kv_t *kv)
{
	kv->stats.block_bytes = kv->block_bytes;
	kv->stats.layers = kv->layers;
	kv->stats.parts = kv->parts;
	kv->stats.gpu_blocks = kv->gpu_side.blocks;
	kv->stats.host_blocks = kv->host_side.blocks;
	kv->stats.host_owned = kv->host_free.capacity;
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
	kv->layers = params->layers ? params->layers : 1;
	kv->parts = params->parts ? params->parts : 1;
	kv->part_bytes = kv->block_bytes / kv->layers / kv->parts;

	if ((err = setup_gpu(kv, params)) || (err = setup_host(kv, params)) ||
	    (err = kv_sides_disjoint(kv)) || (err = setup_lists(kv)) || (err = setup_backend(kv))) {
		kv_free(kv);
		return err;
	}
	fill_stats(kv);
	aeg_debug("KV cache on GPU %d: %" PRIu32 " GPU and %" PRIu32 " host blocks (%" PRIu32 " ours) of %" PRIu64
		  " bytes, %" PRIu32 " layers x %" PRIu32 " parts, %" PRIu32 " pieces of %" PRIu64 " bytes per call",
		  gpu, kv->gpu_side.blocks, kv->host_side.blocks, kv->host_free.capacity, kv->block_bytes,
		  kv->layers, kv->parts, kv->whole.count, kv->whole.piece_bytes);
	*out = kv;
	return 0;
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
		return aeg_fail(AEG_EINVAL, "KV %s block alloc: no %s given", kv_side_name(gpu), kv ? "id array" : "cache");
	if (n == 0)
		return aeg_fail(AEG_EINVAL, "KV %s block alloc of 0 blocks", kv_side_name(gpu));
	pthread_mutex_lock(&kv->lock);
	if (n > fl->top) {
		err = aeg_fail(AEG_ENOSPC, "KV %s blocks: asked %zu, %" PRIu32 " free of %" PRIu32,
			       kv_side_name(gpu), n, fl->top, fl->capacity);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		ids[i] = fl->stack[--fl->top];
		kv_bit_set(fl->allocated, ids[i]);
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
		return aeg_fail(AEG_EINVAL, "KV %s block free: no %s given", kv_side_name(gpu), kv ? "id array" : "cache");
	if (n == 0)
		return aeg_fail(AEG_EINVAL, "KV %s block free of 0 blocks", kv_side_name(gpu));
	pthread_mutex_lock(&kv->lock);
	if ((err = kv_check_ids(mark, ids, n, limit, gpu)))
		goto out;
	for (size_t i = 0; i < n; i++) {
		if (!kv_bit_test(fl->allocated, ids[i])) {
			err = aeg_fail(AEG_EINVAL, "KV %s block %" PRIu32 " (entry %zu) is not allocated",
				       kv_side_name(gpu), ids[i], i);
			goto out;
		}
	}
	for (size_t i = 0; i < n; i++) {
		kv_bit_clear(fl->allocated, ids[i]);
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
	return list_free(kv, &kv->gpu_free, kv->gpu_mark, kv->gpu_side.blocks, 1, ids, n, &kv->stats.gpu_used);
}

AEG_EXPORT int aeg_kv_host_alloc(aeg_kv_t *kv, size_t n, uint32_t *ids)
{
	return list_alloc(kv, kv ? &kv->host_free : NULL, 0, n, ids, kv ? &kv->stats.host_used : NULL);
}

AEG_EXPORT int aeg_kv_host_free(aeg_kv_t *kv, const uint32_t *ids, size_t n)
{
	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV host block free: no cache given");
	return list_free(kv, &kv->host_free, kv->host_mark, kv->host_side.blocks, 0, ids, n, &kv->stats.host_used);
}

AEG_EXPORT void *aeg_kv_gpu_ptr(aeg_kv_t *kv, uint32_t id)
{
	return aeg_kv_gpu_piece(kv, id, 0, 0);
}

AEG_EXPORT void *aeg_kv_host_ptr(aeg_kv_t *kv, uint32_t id)
{
	return aeg_kv_host_piece(kv, id, 0, 0);
}

static void *piece(const aeg_kv_t *kv, const struct kv_side *side, uint32_t id, uint32_t layer, uint32_t part)
{
	if (id >= side->blocks || layer >= kv->layers || part >= kv->parts)
		return NULL;
	return kv_side_piece(side, id, layer * kv->parts + part);
}

AEG_EXPORT void *aeg_kv_gpu_piece(aeg_kv_t *kv, uint32_t id, uint32_t layer, uint32_t part)
{
	return kv ? piece(kv, &kv->gpu_side, id, layer, part) : NULL;
}

AEG_EXPORT void *aeg_kv_host_piece(aeg_kv_t *kv, uint32_t id, uint32_t layer, uint32_t part)
{
	return kv ? piece(kv, &kv->host_side, id, layer, part) : NULL;
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
	stats->events_kept = kv->nspare;
	pthread_mutex_unlock(&kv->lock);
	return 0;
}

/* GPU slabs: one device allocation each, sub-allocated by the TLSF allocator. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>

#include <aegaeon/size.h>
#include <aegaeon/slab.h>

#include "device_internal.h"
#include "internal.h"
#include "slab_internal.h"
#include "tlsf.h"

/*
 * A reserved slab maps memory behind an allocation that reaches past what
 * is mapped: at least as much again as is mapped (from 256 MiB), so a load
 * of many chunks maps a few pieces, not one per chunk; at most 8 GiB more
 * than the allocation needs. aeg_slab_map_rest maps 8 GiB a piece (0.7 ms
 * on the H200), so an allocation that waits behind it waits about that.
 */
#define SLAB_PIECE_MIN (256ull << 20)
#define SLAB_PIECE_MAX (8ull << 30)

struct slab_piece {
	uint64_t offset, bytes;
};

struct aeg_slab {
	aeg_device_t *dev;              /* NULL for pure offset accounting */
	int gpu;
	void *base;
	uint64_t bytes;
	int owned;                      /* base came from aeg_mem_alloc or a reservation */
	/*
	 * A reserved slab (aeg_slab_create_reserved): @reserve_bytes of
	 * addresses at @base (a multiple of @granularity), memory mapped into
	 * them from the base up as @pieces; @mapped is how far, read by
	 * allocations without a lock. @map_lock orders the mappings.
	 */
	int reserved;
	uint64_t reserve_bytes, granularity;
	uint64_t mapped;
	pthread_mutex_t map_lock;
	struct slab_piece *pieces;
	size_t npieces, pieces_room;
	/*
	 * A mutex, not a spinlock: uncontended it measured faster (alloc+free
	 * pair 24 ns against 26 ns) and it does not burn a core while a
	 * preempted holder sleeps, as happens with more threads than cores.
	 */
	pthread_mutex_t lock;
	uint64_t allocs;
	uint64_t frees;
	uint64_t failed_allocs;
	struct aeg_tlsf tlsf;
};

static int slab_new(aeg_device_t *dev, int gpu, void *base, uint64_t bytes, int owned,
		    aeg_slab_t **slabp)
{
	aeg_slab_t *slab;
	int err;

	slab = calloc(1, sizeof(*slab));
	if (slab == NULL)
		return aeg_fail(AEG_ENOMEM, "allocating a slab");
	err = aeg_tlsf_init(&slab->tlsf, bytes);
	if (err < 0) {
		free(slab);
		return err;
	}
	pthread_mutex_init(&slab->lock, NULL);
	slab->dev = dev;
	slab->gpu = gpu;
	slab->base = base;
	slab->bytes = bytes;
	slab->owned = owned;
	*slabp = slab;
	return 0;
}

/*
 * A create's arguments checked: @bytes rounded up to AEG_SLAB_ALIGN into
 * *@rounded, if GPU @gpu has that much free.
 */
static int slab_size(aeg_device_t *dev, int gpu, uint64_t bytes, aeg_slab_t **slabp, uint64_t *rounded)
{
	char asked[32], free_h[32], total[32];
	struct aeg_gpu_info info;
	int err;

	if (dev == NULL || slabp == NULL)
		return aeg_fail(AEG_EINVAL, "slab create: device or result pointer missing");
	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "slab size 0");
	err = aeg_device_gpu_info(dev, gpu, &info);
	if (err < 0)
		return aeg_fail_keep(err);
	/* The first test also keeps the rounding from overflowing. */
	if (bytes > info.free_bytes || (*rounded = aeg_round_up(bytes, AEG_SLAB_ALIGN)) > info.free_bytes)
		return aeg_fail(AEG_ENOSPC, "slab of %s (%" PRIu64 " bytes) asked on GPU %d (%s), free %s of %s",
				aeg_size_format(bytes, asked, sizeof(asked)), bytes, gpu, info.name,
				aeg_size_format(info.free_bytes, free_h, sizeof(free_h)),
				aeg_size_format(info.total_bytes, total, sizeof(total)));
	return 0;
}

AEG_EXPORT int aeg_slab_create(aeg_device_t *dev, int gpu, uint64_t bytes, aeg_slab_t **slabp)
{
	void *base = NULL;
	uint64_t rounded;
	int err;

	err = slab_size(dev, gpu, bytes, slabp, &rounded);
	if (err < 0)
		return err;
	err = aeg_mem_alloc(dev, gpu, rounded, &base);
	if (err < 0) {
		aeg_error_prefix("slab of %" PRIu64 " bytes on GPU %d", rounded, gpu);
		return err;
	}
	err = slab_new(dev, gpu, base, rounded, 1, slabp);
	if (err < 0)
		goto out_free;
	aeg_debug("slab of %" PRIu64 " bytes on GPU %d at %p", rounded, gpu, base);
	return 0;

out_free:
	aeg_mem_free(dev, gpu, base);
	return err;
}

int aeg_slab_create_reserved(aeg_device_t *dev, int gpu, uint64_t bytes, aeg_slab_t **slabp)
{
	uint64_t rounded, granularity = 0;
	void *base = NULL;
	aeg_slab_t *slab;
	int err;

	err = slab_size(dev, gpu, bytes, slabp, &rounded);
	if (err < 0)
		return err;
	err = aeg_va_reserve(dev, gpu, rounded, &granularity, &base);
	if (err < 0) {
		aeg_error_prefix("slab of %" PRIu64 " bytes on GPU %d", rounded, gpu);
		return err;
	}
	err = slab_new(dev, gpu, base, rounded, 1, &slab);
	if (err < 0) {
		aeg_va_release(dev, gpu, base, aeg_round_up(rounded, granularity));
		return err;
	}
	slab->reserved = 1;
	slab->granularity = granularity;
	slab->reserve_bytes = aeg_round_up(rounded, granularity);
	pthread_mutex_init(&slab->map_lock, NULL);
	aeg_debug("slab of %" PRIu64 " bytes on GPU %d at %p reserved (memory mapped as it is used, in multiples of %" PRIu64 " bytes)",
		  rounded, gpu, base, granularity);
	*slabp = slab;
	return 0;
}

/* Map @bytes more behind what @slab has mapped; its map_lock held. */
static int map_piece(aeg_slab_t *slab, uint64_t bytes)
{
	uint64_t at = slab->mapped;
	int err;

	if (slab->npieces == slab->pieces_room) {
		size_t room = slab->pieces_room ? 2 * slab->pieces_room : 16;
		struct slab_piece *p = realloc(slab->pieces, room * sizeof(*p));

		if (p == NULL)
			return aeg_fail(AEG_ENOMEM, "slab at %p: no memory for its pieces' list", slab->base);
		slab->pieces = p;
		slab->pieces_room = room;
	}
	err = aeg_va_map(slab->dev, slab->gpu, (char *)slab->base + at, bytes);
	if (err < 0) {
		aeg_error_prefix("slab at %p (%" PRIu64 " of its %" PRIu64 " bytes mapped)", slab->base, at,
				 slab->reserve_bytes);
		return err;
	}
	slab->pieces[slab->npieces++] = (struct slab_piece){ .offset = at, .bytes = bytes };
	__atomic_store_n(&slab->mapped, at + bytes, __ATOMIC_RELEASE);
	return 0;
}

/* Map @slab's memory at least to @end (an allocation's end), as the policy above says. */
static int map_to(aeg_slab_t *slab, uint64_t end)
{
	uint64_t need, want, grow;
	int err = 0;

	pthread_mutex_lock(&slab->map_lock);
	if (end <= slab->mapped)
		goto out;
	need = aeg_round_up(end, slab->granularity);
	grow = slab->mapped < SLAB_PIECE_MIN ? SLAB_PIECE_MIN : slab->mapped;
	want = aeg_round_up(slab->mapped + (grow < SLAB_PIECE_MAX ? grow : SLAB_PIECE_MAX), slab->granularity);
	if (want < need)
		want = need;
	if (want > slab->reserve_bytes)
		want = slab->reserve_bytes;
	err = map_piece(slab, want - slab->mapped);
	/* Memory for more than is needed may be what is missing. */
	if (err == AEG_ENOSPC && want > need)
		err = map_piece(slab, need - slab->mapped);
out:
	pthread_mutex_unlock(&slab->map_lock);
	return err;
}

int aeg_slab_map_ahead(aeg_slab_t *slab, uint64_t bytes)
{
	uint64_t used, end;
	int err = 0;

	if (slab == NULL || !slab->reserved)
		return 0;
	pthread_mutex_lock(&slab->lock);
	used = slab->tlsf.used;
	pthread_mutex_unlock(&slab->lock);
	end = bytes > slab->reserve_bytes - used ? slab->reserve_bytes : used + bytes;
	pthread_mutex_lock(&slab->map_lock);
	if (end > slab->mapped)
		err = map_piece(slab, aeg_round_up(end, slab->granularity) - slab->mapped);
	pthread_mutex_unlock(&slab->map_lock);
	return err;
}

int aeg_slab_map_rest(aeg_slab_t *slab)
{
	uint64_t t = aeg_now_ns();
	int err = 0;

	if (slab == NULL || !slab->reserved)
		return 0;
	for (;;) {
		uint64_t left;

		/* Let go between pieces: an allocation waits for one piece at most. */
		pthread_mutex_lock(&slab->map_lock);
		left = slab->reserve_bytes - slab->mapped;
		if (left > 0)
			err = map_piece(slab, left < SLAB_PIECE_MAX ? left : SLAB_PIECE_MAX);
		pthread_mutex_unlock(&slab->map_lock);
		if (left == 0 || err < 0)
			break;
	}
	aeg_span_end("slab map", t);
	return err;
}

uint64_t aeg_slab_mapped_bytes(aeg_slab_t *slab)
{
	uint64_t mapped;

	if (!slab->reserved)
		return slab->bytes;
	mapped = __atomic_load_n(&slab->mapped, __ATOMIC_ACQUIRE);
	return mapped < slab->bytes ? mapped : slab->bytes;
}

/* Unmap a reserved slab's pieces, newest first, and give its addresses back. */
static void slab_unreserve(aeg_slab_t *slab)
{
	int err;

	while (slab->npieces > 0) {
		struct slab_piece *p = &slab->pieces[--slab->npieces];

		err = aeg_va_unmap(slab->dev, slab->gpu, (char *)slab->base + p->offset, p->bytes);
		if (err < 0)
			aeg_warn("slab at %p: %s", slab->base, aeg_error_detail());
	}
	err = aeg_va_release(slab->dev, slab->gpu, slab->base, slab->reserve_bytes);
	if (err < 0)
		aeg_warn("slab at %p: %s", slab->base, aeg_error_detail());
	free(slab->pieces);
	pthread_mutex_destroy(&slab->map_lock);
}

AEG_EXPORT int aeg_slab_wrap(aeg_device_t *dev, int gpu, void *base, uint64_t bytes,
			     aeg_slab_t **slabp)
{
	int err;

	if (slabp == NULL)
		return aeg_fail(AEG_EINVAL, "slab wrap: result pointer missing");
	if (base == NULL && dev != NULL)
		return aeg_fail(AEG_EINVAL, "slab wrap: base pointer missing");
	if ((uintptr_t)base % AEG_SLAB_ALIGN != 0)
		return aeg_fail(AEG_EINVAL, "slab wrap: base %p is not aligned to %u bytes", base,
				AEG_SLAB_ALIGN);
	if (bytes == 0 || bytes % AEG_SLAB_ALIGN != 0)
		return aeg_fail(AEG_EINVAL, "slab wrap: size %" PRIu64 " is not a non-zero multiple of %u bytes",
				bytes, AEG_SLAB_ALIGN);
	if (bytes - 1 > UINTPTR_MAX - (uintptr_t)base)
		return aeg_fail(AEG_EINVAL, "slab wrap: %" PRIu64 " bytes at %p run past the address space",
				bytes, base);
	if (dev != NULL) {
		err = aeg_device_check_gpu(dev, gpu);
		if (err < 0)
			return err;
	}
	return slab_new(dev, gpu, base, bytes, 0, slabp);
}

AEG_EXPORT void aeg_slab_destroy(aeg_slab_t *slab)
{
	int err;

	if (slab == NULL)
		return;
	if (slab->tlsf.blocks != 0)
		aeg_debug("slab at %p destroyed with %" PRIu64 " live blocks (%" PRIu64 " bytes)",
			  slab->base, slab->tlsf.blocks, slab->tlsf.used);
	if (slab->reserved) {
		slab_unreserve(slab);
	} else if (slab->owned) {
		err = aeg_mem_free(slab->dev, slab->gpu, slab->base);
		if (err < 0)
			aeg_warn("freeing slab memory at %p on GPU %d: %s", slab->base, slab->gpu,
				 aeg_error_detail());
	}
	aeg_tlsf_fini(&slab->tlsf);
	pthread_mutex_destroy(&slab->lock);
	free(slab);
}

/* @block as handed out: the allocator's id, offset and size, and its address in the slab. */
static void set_block(const aeg_slab_t *slab, uint64_t id, uint64_t offset, uint64_t size,
		      struct aeg_block *block)
{
	block->id = id;
	block->offset = offset;
	block->size = size;
	block->ptr = (void *)((uintptr_t)slab->base + offset);
}

AEG_EXPORT int aeg_slab_alloc(aeg_slab_t *slab, uint64_t bytes, struct aeg_block *block)
{
	uint64_t id, offset, size;
	int err;

	if (slab == NULL || block == NULL)
		return aeg_fail(AEG_EINVAL, "slab alloc: slab or block pointer missing");
	pthread_mutex_lock(&slab->lock);
	err = aeg_tlsf_alloc(&slab->tlsf, bytes, &id, &offset, &size);
	if (err < 0)
		slab->failed_allocs++;
	else
		slab->allocs++;
	pthread_mutex_unlock(&slab->lock);
	if (err < 0)
		return err;
	if (slab->reserved && offset + size > __atomic_load_n(&slab->mapped, __ATOMIC_ACQUIRE)) {
		err = map_to(slab, offset + size);
		if (err < 0) {
			pthread_mutex_lock(&slab->lock);
			aeg_tlsf_free(&slab->tlsf, id);
			slab->allocs--;
			slab->failed_allocs++;
			pthread_mutex_unlock(&slab->lock);
			return err;
		}
	}
	set_block(slab, id, offset, size, block);
	return 0;
}

AEG_EXPORT int aeg_slab_free(aeg_slab_t *slab, uint64_t id)
{
	int err;

	if (slab == NULL)
		return aeg_fail(AEG_EINVAL, "slab free: slab pointer missing");
	pthread_mutex_lock(&slab->lock);
	err = aeg_tlsf_free(&slab->tlsf, id);
	if (err == 0)
		slab->frees++;
	pthread_mutex_unlock(&slab->lock);
	return err;
}

AEG_EXPORT int aeg_slab_lookup(aeg_slab_t *slab, uint64_t id, struct aeg_block *block)
{
	uint64_t offset, size;
	int err;

	if (slab == NULL || block == NULL)
		return aeg_fail(AEG_EINVAL, "slab lookup: slab or block pointer missing");
	pthread_mutex_lock(&slab->lock);
	err = aeg_tlsf_lookup(&slab->tlsf, id, &offset, &size);
	pthread_mutex_unlock(&slab->lock);
	if (err < 0)
		return err;
	set_block(slab, id, offset, size, block);
	return 0;
}

AEG_EXPORT int aeg_slab_stats(aeg_slab_t *slab, struct aeg_slab_stats *stats)
{
	struct aeg_tlsf_stats t;

	if (slab == NULL || stats == NULL)
		return aeg_fail(AEG_EINVAL, "slab stats: slab or stats pointer missing");
	pthread_mutex_lock(&slab->lock);
	aeg_tlsf_stats(&slab->tlsf, &t);
	*stats = (struct aeg_slab_stats){
		.total_bytes = t.total_bytes,
		.used_bytes = t.used_bytes,
		.free_bytes = t.free_bytes,
		.largest_free_bytes = t.largest_free_bytes,
		.high_water_bytes = t.high_water_bytes,
		.blocks = t.blocks,
		.allocs = slab->allocs,
		.frees = slab->frees,
		.failed_allocs = slab->failed_allocs,
	};
	pthread_mutex_unlock(&slab->lock);
	return 0;
}

AEG_EXPORT int aeg_slab_export(aeg_slab_t *slab, aeg_handle_t *handle)
{
	if (slab == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "slab export: slab or handle pointer missing");
	if (!slab->owned)
		return aeg_fail(AEG_ENOTSUP, "slab at %p wraps memory it does not own; export the owner's handle",
				slab->base);
	if (slab->reserved)
		return aeg_fail(AEG_ENOTSUP, "slab at %p is reserved address space mapped as it is used, which has no IPC handle",
				slab->base);
	return aeg_mem_export(slab->dev, slab->base, handle);
}

AEG_EXPORT void *aeg_slab_base(const aeg_slab_t *slab)
{
	return slab->base;
}

AEG_EXPORT uint64_t aeg_slab_bytes(const aeg_slab_t *slab)
{
	return slab->bytes;
}

AEG_EXPORT int aeg_slab_gpu(const aeg_slab_t *slab)
{
	return slab->gpu;
}

AEG_EXPORT aeg_device_t *aeg_slab_device(const aeg_slab_t *slab)
{
	return slab->dev;
}

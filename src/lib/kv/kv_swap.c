/* KV swaps: checked calls, their steps per layer, their events (kept for reuse), copies, baselines. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/event.h>
#include <aegaeon/kv.h>

#include "internal.h"
#include "kv_internal.h"

/* Released events a cache keeps for later calls; more are destroyed. */
#define SPARE_MAX 512u

/* The events of one call, given back together through the call's handle. */
struct kv_op {
	struct kv_op *next;
	size_t nlayers;
	struct kv_spare ev;             /* the call's */
	struct kv_spare layer[];
};

static void events_destroy(struct kv_spare *ev, size_t n)
{
	for (size_t i = 0; i < n; i++)
		aeg_event_destroy(ev[i].ev);
}

/* Keep up to SPARE_MAX released events for later calls; destroy the rest. */
static void events_give(aeg_kv_t *kv, struct kv_spare *ev, size_t n)
{
	size_t kept = 0;

	pthread_mutex_lock(&kv->lock);
	if (!kv->spare)
		kv->spare = malloc(SPARE_MAX * sizeof(*kv->spare));
	while (kv->spare && kept < n && kv->nspare < SPARE_MAX)
		kv->spare[kv->nspare++] = ev[kept++];
	pthread_mutex_unlock(&kv->lock);
	events_destroy(ev + kept, n - kept);
}

/* @n events: kept ones first, the others made (slowly, so without the lock). */
static int events_take(aeg_kv_t *kv, struct kv_spare *ev, size_t n)
{
	size_t got = 0;
	int err;

	pthread_mutex_lock(&kv->lock);
	while (got < n && kv->nspare)
		ev[got++] = kv->spare[--kv->nspare];
	pthread_mutex_unlock(&kv->lock);
	for (; got < n; got++) {
		if ((err = aeg_event_create(kv->dev, kv->gpu, &ev[got].ev, &ev[got].handle))) {
			events_give(kv, ev, got);
			return err;
		}
	}
	return 0;
}

static int op_new(aeg_kv_t *kv, size_t nlayers, struct kv_op **out)
{
	struct kv_op *op = calloc(1, sizeof(*op) + nlayers * sizeof(op->layer[0]));
	int err;

	if (!op)
		return aeg_fail(AEG_ENOMEM, "KV call events");
	if ((err = events_take(kv, &op->ev, 1))) {
		free(op);
		return err;
	}
	if (nlayers && (err = events_take(kv, op->layer, nlayers))) {
		events_give(kv, &op->ev, 1);
		free(op);
		return err;
	}
	op->nlayers = nlayers;
	*out = op;
	return 0;
}

/* A call that failed after queueing began: its events may be in any state, so they go. */
static void op_drop(struct kv_op *op)
{
	events_destroy(&op->ev, 1);
	events_destroy(op->layer, op->nlayers);
	free(op);
}

/* Hand @op's call handle out and keep its events until released. */
static void op_publish(aeg_kv_t *kv, struct kv_op *op, aeg_handle_t *handle_out)
{
	*handle_out = op->ev.handle;
	op->next = kv->ops;
	kv->ops = op;
	kv->stats.events_live += 1 + (uint32_t)op->nlayers;
}

void kv_ops_settle(aeg_kv_t *kv)
{
	for (struct kv_op *op = kv->ops; op; op = op->next) {
		int err = aeg_event_wait(op->ev.ev, -1);

		if (err && err != AEG_ECANCELED)
			aeg_warn("KV cache destroyed with a call that failed: %s", aeg_strerror(err));
	}
}

void kv_ops_fini(aeg_kv_t *kv)
{
	while (kv->ops) {
		struct kv_op *op = kv->ops;

		kv->ops = op->next;
		op_drop(op);
	}
	events_destroy(kv->spare, kv->nspare);
	free(kv->spare);
	kv->spare = NULL;
	kv->nspare = 0;
}

static int check_ends(const struct aeg_kv_layers *layers, size_t n)
{
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

static int check_layers(const aeg_kv_t *kv, const struct aeg_kv_layers *layers, size_t n,
			const aeg_handle_t *handle_out)
{
	if (!handle_out)
		return aeg_fail(AEG_EINVAL, "per-layer swap without a place for the call's handle");
	if (layers->count == 0 || !layers->handles)
		return aeg_fail(AEG_EINVAL, "per-layer swap: %s", layers->count == 0 ? "0 layers" :
				"no place for the layer handles");
	if (kv->layers > 1) {
		if (layers->ends)
			return aeg_fail(AEG_EINVAL,
					"per-layer swap: layer ends split the id arrays of a cache of one layer; this cache has %" PRIu32
					" layers in every block: give no ends",
					kv->layers);
		if (layers->count != kv->layers)
			return aeg_fail(AEG_EINVAL, "per-layer swap with %zu layer handles; the cache has %" PRIu32 " layers",
					layers->count, kv->layers);
		return 0;
	}
	if (!layers->ends)
		return aeg_fail(AEG_EINVAL,
				"per-layer swap: no layer ends (a cache of one layer splits a call into groups of entries)");
	return check_ends(layers, n);
}

/* The steps of a call: one, a group of entries per layer, or every entry once per layer. */
static void fill_steps(const aeg_kv_t *kv, const struct aeg_kv_layers *layers, size_t n,
		       struct kv_op *op, struct kv_step *steps, size_t *nsteps)
{
	if (!layers) {
		steps[0] = (struct kv_step){ 0, n, 0, NULL };
		*nsteps = 1;
		return;
	}
	for (size_t i = 0; i < layers->count; i++) {
		if (layers->ends)
			steps[i] = (struct kv_step){ i ? layers->ends[i - 1] : 0, layers->ends[i], 0, op->layer[i].ev };
		else
			steps[i] = (struct kv_step){ 0, n, (uint32_t)i, op->layer[i].ev };
		layers->handles[i] = op->layer[i].handle;
	}
	*nsteps = layers->count;
}

static int check_call(const aeg_kv_t *kv, const char *what, const uint32_t *gpu_ids, const uint32_t *host_ids,
		      size_t n, const struct aeg_kv_layers *layers, const aeg_stream_t *stream,
		      const aeg_handle_t *handle_out)
{
	int err;

	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV %s: no cache given", what);
	if (!gpu_ids || !host_ids)
		return aeg_fail(AEG_EINVAL, "KV %s: no %s block ids given", what, gpu_ids ? "host" : "GPU");
	if (n == 0)
		return aeg_fail(AEG_EINVAL, "KV %s of 0 blocks", what);
	if ((err = kv_check_stream(kv, stream)))
		return err;
	return layers ? check_layers(kv, layers, n, handle_out) : 0;
}

/*
 * The tail of a swap or copy whose work was queued (@err 0) or not: record
 * the call's event after it, or on failure drain what got queued and drop
 * the events. Returns @err or the record's error.
 */
static int record_call(int err, struct kv_op *op, aeg_stream_t *stream)
{
	if (!err && op)
		err = aeg_event_record(op->ev.ev, stream);
	if (err && op) {
		aeg_stream_sync(stream);
		op_drop(op);
	}
	return err;
}

/* A call queued: hand its handle out and count it (+1 in *@calls, +@amount in *@moved). */
static void count_call(aeg_kv_t *kv, struct kv_op *op, aeg_handle_t *handle_out, uint64_t *calls,
		       uint64_t *moved, uint64_t amount)
{
	pthread_mutex_lock(&kv->lock);
	if (op)
		op_publish(kv, op, handle_out);
	(*calls)++;
	*moved += amount;
	pthread_mutex_unlock(&kv->lock);
}

static int swap(aeg_kv_t *kv, int out, const uint32_t *gpu_ids, const uint32_t *host_ids, size_t n,
		const struct aeg_kv_layers *layers, aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	const char *what = out ? "swap-out" : "swap-in";
	struct kv_step one, *steps = &one;
	struct kv_op *op = NULL;
	struct kv_move mv;
	int err;

	if ((err = check_call(kv, what, gpu_ids, host_ids, n, layers, stream, handle_out)))
		return err;
	pthread_mutex_lock(&kv->lock);
	if (!(err = kv_check_ids(kv->gpu_mark, gpu_ids, n, kv->gpu_side.blocks, 1)))
		err = kv_check_ids(kv->host_mark, host_ids, n, kv->host_side.blocks, 0);
	pthread_mutex_unlock(&kv->lock);
	if (err)
		return err;
	if (layers && !(steps = malloc(layers->count * sizeof(*steps))))
		return aeg_fail(AEG_ENOMEM, "KV %s steps of %zu layers", what, layers->count);
	if (handle_out && (err = op_new(kv, layers ? layers->count : 0, &op)))
		goto out;

	mv = (struct kv_move){
		.out = out,
		.plan = layers && !layers->ends ? &kv->by_layer : &kv->whole,
		.src_stride = out ? kv->gpu_side.stride : kv->host_side.stride,
		.dst_stride = out ? kv->host_side.stride : kv->gpu_side.stride,
		.src_ids = out ? gpu_ids : host_ids,
		.dst_ids = out ? host_ids : gpu_ids,
		.n = n,
		.steps = steps,
	};
	fill_steps(kv, layers, n, op, steps, &mv.nsteps);
	if ((err = record_call(kv->backend->move(kv, &mv, stream), op, stream))) {
		aeg_error_prefix("KV %s of %zu blocks", what, n);
		goto out;
	}
	count_call(kv, op, handle_out, out ? &kv->stats.swaps_out : &kv->stats.swaps_in,
		   out ? &kv->stats.blocks_out : &kv->stats.blocks_in, n);
out:
	if (steps != &one)
		free(steps);
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

static int ranges_overlap(const void *a, const void *b, size_t bytes)
{
	return (uintptr_t)a < (uintptr_t)b + bytes && (uintptr_t)b < (uintptr_t)a + bytes;
}

static int check_copy(aeg_kv_t *kv, int h2d, void *dst, const void *src, size_t bytes,
		      aeg_stream_t *stream)
{
	const char *what = h2d ? "H2D" : "D2H";
	int err;

	if (!kv)
		return aeg_fail(AEG_EINVAL, "KV %s copy: no cache given", what);
	if (!dst || !src)
		return aeg_fail(AEG_EINVAL, "KV %s copy: no %s pointer", what, dst ? "source" : "destination");
	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "KV %s copy of 0 bytes", what);
	if ((uintptr_t)dst > UINTPTR_MAX - bytes || (uintptr_t)src > UINTPTR_MAX - bytes)
		return aeg_fail(AEG_EINVAL, "KV %s copy of %zu bytes wraps around the address space", what, bytes);
	if (ranges_overlap(dst, src, bytes))
		return aeg_fail(AEG_EINVAL, "KV %s copy: source %p and destination %p overlap (%zu bytes)",
				what, src, dst, bytes);
	if ((err = kv_check_stream(kv, stream)))
		return err;
	if (kv->backend->check_copy)
		return kv->backend->check_copy(kv, dst, src, h2d);
	return 0;
}

static int copy(aeg_kv_t *kv, int h2d, void *dst, const void *src, size_t bytes,
		aeg_stream_t *stream, aeg_handle_t *handle_out)
{
	struct kv_op *op = NULL;
	int err;

	if ((err = check_copy(kv, h2d, dst, src, bytes, stream)))
		return err;
	if (handle_out && (err = op_new(kv, 0, &op)))
		return err;
	if ((err = record_call(aeg_memcpy_async(stream, dst, src, bytes), op, stream))) {
		aeg_error_prefix("KV %s copy of %zu bytes", h2d ? "H2D" : "D2H", bytes);
		return err;
	}
	count_call(kv, op, handle_out, &kv->stats.copies, &kv->stats.copy_bytes, bytes);
	return 0;
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
		if (memcmp((*pp)->ev.handle.bytes, handle->bytes, AEG_HANDLE_BYTES) == 0) {
			op = *pp;
			*pp = op->next;
			kv->stats.events_live -= 1 + (uint32_t)op->nlayers;
			break;
		}
	}
	pthread_mutex_unlock(&kv->lock);
	if (!op)
		return aeg_fail(AEG_ENOENT, "KV release: the handle is not one of this cache's calls (or was released)");
	events_give(kv, &op->ev, 1);
	events_give(kv, op->layer, op->nlayers);
	free(op);
	return 0;
}

int aeg_kv_baseline(aeg_kv_t *kv, enum kv_baseline how, int out, const uint32_t *src_ids,
		    const uint32_t *dst_ids, size_t n, aeg_stream_t *stream)
{
	uint32_t src_limit = out ? kv->gpu_side.blocks : kv->host_side.blocks;
	uint32_t dst_limit = out ? kv->host_side.blocks : kv->gpu_side.blocks;
	struct kv_step step = { 0, n, 0, NULL };
	struct kv_move mv = {
		.out = out,
		.plan = &kv->whole,
		.src_stride = out ? kv->gpu_side.stride : kv->host_side.stride,
		.dst_stride = out ? kv->host_side.stride : kv->gpu_side.stride,
		.src_ids = src_ids,
		.dst_ids = dst_ids,
		.n = n,
		.steps = &step,
		.nsteps = 1,
	};
	int err;

	if ((err = kv_check_stream(kv, stream)))
		return err;
	for (size_t i = 0; i < n; i++)
		if (src_ids[i] >= src_limit || dst_ids[i] >= dst_limit)
			return aeg_fail(AEG_EINVAL, "baseline copy: entry %zu out of range", i);
	return kv->backend->baseline(kv, how, &mv, stream);
}

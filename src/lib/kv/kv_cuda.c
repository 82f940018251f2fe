/* KV swaps on the cuda backend: the embedded gather/scatter kernels, id staging, baselines. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include <aegaeon/event.h>

#include "internal.h"
#include "kv_internal.h"
#include "kv_kernel.h"

#define SLOTS 8
#define SLOT_MAX_PAIRS 32768u
/* Keeps the kernel's 32-bit vector indexes, plus a round of its stride, from wrapping. */
#define LAUNCH_MAX_VECS (1u << 31)
#define VARIANTS 6                      /* unroll 2, 4, 8; each plain and _p2 */

static const char *const kernel_names[VARIANTS] = {
	"aeg_kv_copy_u2", "aeg_kv_copy_u2_p2", "aeg_kv_copy_u4",
	"aeg_kv_copy_u4_p2", "aeg_kv_copy_u8", "aeg_kv_copy_u8_p2",
};

/* A staging slot: pinned ids, their device twin, and the event after the last launch reading them. */
struct kv_slot {
	uint32_t *host, *dev;           /* 2 * slot_pairs ids */
	cudaEvent_t done;
	int held;                       /* a call is filling or launching from it (or it is lost) */
	int pending;                    /* @done recorded and maybe not complete */
	uint64_t seq;                   /* when @done was recorded, to wait for the oldest */
};

/*
 * Each call takes a staging slot of its own for its ids (copied to the
 * device on the call's stream ahead of its launches) and gives it back
 * with an event after its last launch. Slots are taken under @lock without
 * waiting; a call that finds none free waits for the oldest one's event
 * with no lock held, so calls on other streams go on meanwhile.
 */
struct kv_cuda {
	int sms;
	int per_sm[VARIANTS];           /* resident CTAs per SM of each variant */
	uint32_t slot_pairs;
	uint32_t *stage_host, *stage_dev;
	uint64_t *tables;               /* device copies of the plans' bases */
	const uint64_t *whole_gpu, *whole_host, *layer_gpu, *layer_host;
	pthread_mutex_t lock;
	pthread_cond_t freed;
	struct kv_slot slot[SLOTS];
	int nevents;
	int lost;                       /* slots whose guard could not be recorded: never reused */
	uint64_t seq;
};

/* The kernels are loaded once per process and unloaded with the last cache. */
static pthread_mutex_t lib_lock = PTHREAD_MUTEX_INITIALIZER;
static cudaLibrary_t lib;
static cudaKernel_t kernels[VARIANTS];
static unsigned lib_users;
static atomic_int forced_unroll, forced_per_sm;   /* kv bench --tune; 0: the size's choice */

/*
 * Pieces of DMA_MIN_PIECE and more go to the copy engines, one batch per
 * step: on the H200 they beat the kernel one way (53-54 against 51-52
 * GB/s for 1-2 MiB pieces) and far more with both directions at once
 * (96-97 against 77), where the kernel's SMs, not the link, are the limit.
 * Smaller pieces stay with the kernel (the copy engines give 40-47 GB/s
 * at 256 KiB, 5-31 at 4-64 KiB). kv bench --tune forces the kernel.
 */
#define DMA_MIN_PIECE (1ull << 20)

static int use_copy_engines(uint64_t piece_bytes)
{
	return piece_bytes >= DMA_MIN_PIECE && atomic_load(&forced_unroll) == 0;
}

static int cuda_fail(cudaError_t e, const char *call)
{
	return aeg_fail(AEG_EDEVICE, "%s: %s", call, cudaGetErrorString(e));
}

/* Make @gpu current for a call, keeping the caller's current device to give back. */
static int enter(int gpu, int *prev)
{
	cudaError_t e = cudaGetDevice(prev);

	if (e != cudaSuccess)
		return cuda_fail(e, "cudaGetDevice");
	if (*prev != gpu && (e = cudaSetDevice(gpu)) != cudaSuccess)
		return cuda_fail(e, "cudaSetDevice");
	return 0;
}

static void leave(int gpu, int prev)
{
	if (prev != gpu)
		cudaSetDevice(prev);
}

static int lib_load(void)
{
	cudaError_t e = cudaLibraryLoadData(&lib, aeg_kv_fatbin, NULL, NULL, 0, NULL, NULL, 0);

	if (e != cudaSuccess)
		return cuda_fail(e, "cudaLibraryLoadData (KV kernels)");
	for (int i = 0; i < VARIANTS; i++) {
		e = cudaLibraryGetKernel(&kernels[i], lib, kernel_names[i]);
		if (e != cudaSuccess) {
			cudaLibraryUnload(lib);
			return aeg_fail(AEG_EDEVICE, "cudaLibraryGetKernel(%s): %s", kernel_names[i],
					cudaGetErrorString(e));
		}
	}
	return 0;
}

static int lib_get(void)
{
	int err = 0;

	pthread_mutex_lock(&lib_lock);
	if (lib_users == 0)
		err = lib_load();
	if (!err)
		lib_users++;
	pthread_mutex_unlock(&lib_lock);
	return err;
}

static void lib_put(void)
{
	pthread_mutex_lock(&lib_lock);
	if (--lib_users == 0) {
		cudaError_t e = cudaLibraryUnload(lib);

		if (e != cudaSuccess)
			aeg_warn("cudaLibraryUnload (KV kernels): %s", cudaGetErrorString(e));
	}
	pthread_mutex_unlock(&lib_lock);
}

static int check_device_range(const aeg_kv_t *kv, const char *p, uint64_t bytes, const char *what)
{
	struct cudaPointerAttributes a;
	cudaError_t e;

	e = cudaPointerGetAttributes(&a, p);
	if (e != cudaSuccess)
		return cuda_fail(e, "cudaPointerGetAttributes (KV GPU blocks)");
	if (a.type != cudaMemoryTypeDevice || a.device != kv->gpu)
		return aeg_fail(AEG_EINVAL, "KV GPU %s at %p is not device memory of GPU %d", what, (const void *)p,
				kv->gpu);
	e = cudaPointerGetAttributes(&a, p + bytes - 1);
	if (e != cudaSuccess || a.type != cudaMemoryTypeDevice)
		return aeg_fail(AEG_EINVAL, "KV GPU %s: %p + %" PRIu64 " bytes runs past the device allocation",
				what, (const void *)p, bytes);
	return 0;
}

/* The device view of a registered, mapped host range (which also proves it is one). */
static int map_host_range(char *p, uint64_t bytes, const char *what, char **view)
{
	struct cudaPointerAttributes a;
	void *dev_ptr, *last;
	cudaError_t e;

	e = cudaHostGetDevicePointer(&dev_ptr, p, 0);
	if (e != cudaSuccess)
		return aeg_fail(AEG_EINVAL,
				"KV host %s at %p are not registered, mapped host memory (use a pinned pool or aeg_host_register): cudaHostGetDevicePointer: %s",
				what, (void *)p, cudaGetErrorString(e));
	e = cudaPointerGetAttributes(&a, p + bytes - 1);
	if (e != cudaSuccess || a.type != cudaMemoryTypeHost)
		return aeg_fail(AEG_EINVAL, "KV host %s: %p + %" PRIu64 " bytes runs past the registered range",
				what, (void *)p, bytes);
	/*
	 * The kernel reaches every block from the view of the first byte: a
	 * range registered in pieces (a pinned pool's) must be seen by the
	 * device end to end, as it is wherever registered memory keeps its
	 * host address on the device.
	 */
	e = cudaHostGetDevicePointer(&last, p + bytes - 1, 0);
	if (e != cudaSuccess || (char *)last != (char *)dev_ptr + bytes - 1)
		return aeg_fail(AEG_EINVAL, "KV host %s at %p: the device does not see the %" PRIu64 " bytes end to end (%s)",
				what, (void *)p, bytes, e != cudaSuccess ? cudaGetErrorString(e) : "registered in pieces");
	*view = dev_ptr;
	return 0;
}

static uint64_t seg_span(const aeg_kv_t *kv, const struct kv_side *side)
{
	if (side->base)
		return (uint64_t)side->blocks * kv->block_bytes;
	return (uint64_t)(side->blocks - 1) * side->stride + kv->part_bytes;
}

static int map(aeg_kv_t *kv)
{
	const uint32_t nseg = kv->layers * kv->parts;
	struct kv_side *g = &kv->gpu_side, *h = &kv->host_side;
	int err;

	for (uint32_t s = 0; s < (g->base ? 1 : nseg); s++)
		if ((err = check_device_range(kv, g->seg[s], seg_span(kv, g), g->base ? "blocks" : "tensor")))
			return err;
	if (h->base) {
		char *view;

		if ((err = map_host_range(h->base, seg_span(kv, h), "blocks", &view)))
			return err;
		for (uint32_t s = 0; s < nseg; s++)
			h->view[s] = view + (uint64_t)s * kv->part_bytes;
		return 0;
	}
	for (uint32_t s = 0; s < nseg; s++)
		if ((err = map_host_range(h->seg[s], seg_span(kv, h), "tensor", &h->view[s])))
			return err;
	return 0;
}

static int cuda_map(aeg_kv_t *kv)
{
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	err = map(kv);
	leave(kv->gpu, prev);
	return err;
}

/* Device copies of the plans' piece bases, in one allocation. */
static int upload_plans(aeg_kv_t *kv, struct kv_cuda *c)
{
	const size_t nw = kv->whole.count, nl = (size_t)kv->by_layer.groups * kv->by_layer.count;
	const size_t n = 2 * (nw + nl);
	uint64_t *t = malloc(n * sizeof(*t));
	cudaError_t e;

	if (!t)
		return aeg_fail(AEG_ENOMEM, "KV piece tables");
	for (size_t i = 0; i < nw; i++) {
		t[i] = (uintptr_t)kv->whole.gpu[i];
		t[nw + i] = (uintptr_t)kv->whole.host[i];
	}
	for (size_t i = 0; i < nl; i++) {
		t[2 * nw + i] = (uintptr_t)kv->by_layer.gpu[i];
		t[2 * nw + nl + i] = (uintptr_t)kv->by_layer.host[i];
	}
	e = cudaMalloc((void **)&c->tables, n * sizeof(*t));
	if (e == cudaSuccess)
		e = cudaMemcpy(c->tables, t, n * sizeof(*t), cudaMemcpyHostToDevice);
	free(t);
	if (e != cudaSuccess)
		return cuda_fail(e, "cudaMalloc/cudaMemcpy (KV piece tables)");
	c->whole_gpu = c->tables;
	c->whole_host = c->tables + nw;
	c->layer_gpu = c->tables + 2 * nw;
	c->layer_host = c->tables + 2 * nw + nl;
	return 0;
}

static int init_occupancy(aeg_kv_t *kv, struct kv_cuda *c)
{
	cudaError_t e = cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, kv->gpu);

	if (e != cudaSuccess)
		return cuda_fail(e, "cudaDeviceGetAttribute(MultiProcessorCount)");
	for (int i = 0; i < VARIANTS; i++) {
		e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c->per_sm[i], (const void *)kernels[i],
								  KV_KERNEL_THREADS, 0);
		if (e != cudaSuccess)
			return cuda_fail(e, "cudaOccupancyMaxActiveBlocksPerMultiprocessor (KV kernels)");
		if (c->per_sm[i] < 1)
			return aeg_fail(AEG_EDEVICE, "the KV kernel %s cannot run %d threads per block on GPU %d",
					kernel_names[i], KV_KERNEL_THREADS, kv->gpu);
	}
	return 0;
}

static int init_staging(aeg_kv_t *kv, struct kv_cuda *c)
{
	/* A call never has more pairs than either side has blocks (ids are distinct). */
	uint32_t most = kv->gpu_side.blocks < kv->host_side.blocks ? kv->gpu_side.blocks : kv->host_side.blocks;
	size_t bytes;
	cudaError_t e;

	c->slot_pairs = most < SLOT_MAX_PAIRS ? most : SLOT_MAX_PAIRS;
	bytes = (size_t)SLOTS * c->slot_pairs * 2 * sizeof(uint32_t);
	e = cudaHostAlloc((void **)&c->stage_host, bytes, cudaHostAllocPortable);
	if (e != cudaSuccess) {
		c->stage_host = NULL;
		return cuda_fail(e, "cudaHostAlloc (KV id staging)");
	}
	e = cudaMalloc((void **)&c->stage_dev, bytes);
	if (e != cudaSuccess) {
		c->stage_dev = NULL;
		return cuda_fail(e, "cudaMalloc (KV id staging)");
	}
	for (; c->nevents < SLOTS; c->nevents++) {
		struct kv_slot *sl = &c->slot[c->nevents];

		e = cudaEventCreateWithFlags(&sl->done, cudaEventDisableTiming);
		if (e != cudaSuccess)
			return cuda_fail(e, "cudaEventCreateWithFlags (KV staging)");
		sl->host = c->stage_host + (size_t)c->nevents * c->slot_pairs * 2;
		sl->dev = c->stage_dev + (size_t)c->nevents * c->slot_pairs * 2;
	}
	return 0;
}

static int init(aeg_kv_t *kv)
{
	struct kv_cuda *c = calloc(1, sizeof(*c));
	int err;

	if (!c)
		return aeg_fail(AEG_ENOMEM, "KV cuda state");
	if ((err = lib_get())) {
		free(c);
		return err;
	}
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->freed, NULL);
	kv->cuda = c;                   /* from here cuda_fini undoes what got done */
	if ((err = init_occupancy(kv, c)) || (err = init_staging(kv, c)))
		return err;
	return upload_plans(kv, c);
}

static int cuda_init(aeg_kv_t *kv)
{
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	err = init(kv);
	leave(kv->gpu, prev);
	return err;
}

static void warn_cuda(cudaError_t e, const char *what)
{
	if (e != cudaSuccess)
		aeg_warn("KV cache: %s: %s", what, cudaGetErrorString(e));
}

static void cuda_fini(aeg_kv_t *kv)
{
	struct kv_cuda *c = kv->cuda;
	int prev = kv->gpu;

	if (!c)
		return;
	if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(kv->gpu) != cudaSuccess)
		aeg_warn("KV cache: cannot make GPU %d current to free its staging", kv->gpu);
	for (int i = 0; i < c->nevents; i++) {
		if (c->slot[i].pending)
			warn_cuda(cudaEventSynchronize(c->slot[i].done), "cudaEventSynchronize (staging)");
		cudaEventDestroy(c->slot[i].done);
	}
	if (c->tables)
		warn_cuda(cudaFree(c->tables), "cudaFree (piece tables)");
	if (c->stage_dev)
		warn_cuda(cudaFree(c->stage_dev), "cudaFree (id staging)");
	if (c->stage_host)
		warn_cuda(cudaFreeHost(c->stage_host), "cudaFreeHost (id staging)");
	pthread_cond_destroy(&c->freed);
	pthread_mutex_destroy(&c->lock);
	lib_put();
	free(c);
	kv->cuda = NULL;
	leave(kv->gpu, prev);
}

/* A slot no call holds: a finished one at once, else the oldest pending one (-1: all held). Lock held. */
static int slot_pick(struct kv_cuda *c, int *ready)
{
	int oldest = -1;

	for (int i = 0; i < SLOTS; i++) {
		struct kv_slot *sl = &c->slot[i];

		if (sl->held)
			continue;
		if (!sl->pending || cudaEventQuery(sl->done) == cudaSuccess) {
			sl->pending = 0;
			*ready = 1;
			return i;
		}
		(void)cudaGetLastError();       /* cudaErrorNotReady is no error of the call */
		if (oldest < 0 || sl->seq < c->slot[oldest].seq)
			oldest = i;
	}
	*ready = 0;
	return oldest;
}

static int slot_take(struct kv_cuda *c, struct kv_slot **out)
{
	int i, ready = 0;
	cudaError_t e;

	pthread_mutex_lock(&c->lock);
	while ((i = slot_pick(c, &ready)) < 0 && c->lost < SLOTS)
		pthread_cond_wait(&c->freed, &c->lock);
	if (i < 0) {
		pthread_mutex_unlock(&c->lock);
		return aeg_fail(AEG_EDEVICE, "KV staging: every slot lost to earlier CUDA failures");
	}
	c->slot[i].held = 1;
	pthread_mutex_unlock(&c->lock);
	*out = &c->slot[i];
	if (ready)
		return 0;
	/* Every slot in flight: wait for the oldest launches, holding no lock. */
	e = cudaEventSynchronize(c->slot[i].done);
	c->slot[i].pending = 0;
	if (e != cudaSuccess) {
		pthread_mutex_lock(&c->lock);
		c->slot[i].held = 0;
		pthread_cond_signal(&c->freed);
		pthread_mutex_unlock(&c->lock);
		return cuda_fail(e, "cudaEventSynchronize (KV staging)");
	}
	return 0;
}

/* Give the slot back, guarded by an event after the launches that read it (when any was queued). */
static int slot_give(struct kv_cuda *c, struct kv_slot *sl, cudaStream_t s, int queued)
{
	cudaError_t e = queued ? cudaEventRecord(sl->done, s) : cudaSuccess;

	pthread_mutex_lock(&c->lock);
	if (queued && e == cudaSuccess) {
		sl->pending = 1;
		sl->seq = ++c->seq;
	} else if (queued) {
		/* The queued id copy may still read it: keep it out of use for good. */
		c->lost++;
		pthread_cond_broadcast(&c->freed);
		pthread_mutex_unlock(&c->lock);
		return cuda_fail(e, "cudaEventRecord (KV staging)");
	}
	sl->held = 0;
	pthread_cond_signal(&c->freed);
	pthread_mutex_unlock(&c->lock);
	return 0;
}

void kv_cuda_force(int unroll, int per_sm)
{
	atomic_store(&forced_unroll, unroll);
	atomic_store(&forced_per_sm, per_sm);
}

/*
 * The variant and grid for pieces of @piece_bytes: unroll 2 below 16 KiB,
 * 4 up to 256 KiB, 8 above; at most half the CTAs the GPU holds at once
 * (at least one per SM), so that a swap-in and a swap-out on two streams
 * run side by side instead of one kernel waiting for the other's CTAs.
 * A swap-out takes 3/4 of that (max_grid_out): its stores are posted
 * writes and need fewer in flight than a swap-in's reads, which wait on
 * the link's round trip; with as many CTAs the swap-out crowds the
 * swap-in's reads and ends first. On the H200, both ways at once
 * (aegaeon-cli kv bench, 16 / 32 / 256 KiB blocks): 74-75 / 73-74 / 76-78
 * GB/s with equal grids, 79-81 / 81 / 81 with the swap-out's at 3/4, one
 * way unchanged (50.9-52.4); the split was found with bench/link_probe
 * --in-grid/--out-grid (1/2: 72.4, 3/4: 82.8 at 32 KiB).
 */
#define OUT_GRID_NUM 3
#define OUT_GRID_DEN 4

static void choose(const struct kv_cuda *c, uint64_t piece_bytes, struct kv_launch_cfg *cfg)
{
	int unroll = piece_bytes < (16u << 10) ? 2 : piece_bytes <= (256u << 10) ? 4 : 8;
	int pow2 = (piece_bytes & (piece_bytes - 1)) == 0;
	int f = atomic_load(&forced_unroll), per_sm;

	if (f == 2 || f == 4 || f == 8)
		unroll = f;
	cfg->variant = (unroll == 2 ? 0 : unroll == 4 ? 2 : 4) + pow2;
	cfg->unroll = unroll;
	per_sm = c->per_sm[cfg->variant] / 2;
	if (atomic_load(&forced_per_sm) > 0)
		per_sm = atomic_load(&forced_per_sm);
	if (per_sm > c->per_sm[cfg->variant])
		per_sm = c->per_sm[cfg->variant];
	cfg->max_grid = (unsigned)(c->sms * (per_sm > 0 ? per_sm : 1));
	cfg->max_grid_out = atomic_load(&forced_per_sm) > 0 ? cfg->max_grid
							    : cfg->max_grid * OUT_GRID_NUM / OUT_GRID_DEN;
}

static unsigned log2u(uint64_t v)
{
	unsigned s = 0;

	while ((1ull << s) < v)
		s++;
	return s;
}

static int launch(const struct kv_cuda *c, struct kv_kargs *a, uint64_t piece_bytes, int out, cudaStream_t s)
{
	struct kv_launch_cfg cfg;
	unsigned int per_cta, grid, max_grid;
	void *args[] = { a };
	cudaError_t e;

	choose(c, piece_bytes, &cfg);
	max_grid = out ? cfg.max_grid_out : cfg.max_grid;
	per_cta = KV_KERNEL_THREADS * (unsigned)cfg.unroll;
	grid = (a->total_vecs + per_cta - 1) / per_cta;
	e = cudaLaunchKernel((const void *)kernels[cfg.variant],
			     (dim3){ grid < max_grid ? grid : max_grid, 1, 1 },
			     (dim3){ KV_KERNEL_THREADS, 1, 1 }, args, 0, s);
	if (e != cudaSuccess)
		return aeg_fail(AEG_EDEVICE, "cudaLaunchKernel(%s): %s", kernel_names[cfg.variant],
				cudaGetErrorString(e));
	return 0;
}

/* The launches of one step over pairs [lo, hi) of the chunk staged at @dev (pair lo at dev). */
static int launch_step(const aeg_kv_t *kv, const struct kv_move *mv, const struct kv_step *st,
		       const uint32_t *dev, size_t lo, size_t hi, cudaStream_t s)
{
	const struct kv_cuda *c = kv->cuda;
	const struct kv_plan *p = mv->plan;
	const int whole = p == &kv->whole;
	const uint64_t *gpu = (whole ? c->whole_gpu : c->layer_gpu) + (size_t)st->group * p->count;
	const uint64_t *host = (whole ? c->whole_host : c->layer_host) + (size_t)st->group * p->count;
	const uint32_t pv = (uint32_t)(p->piece_bytes / 16);
	const size_t per_launch = LAUNCH_MAX_VECS / ((uint64_t)pv * p->count);
	struct kv_kargs a = {
		.src0 = (uintptr_t)kv_move_src(mv, st->group)[0],
		.dst0 = (uintptr_t)kv_move_dst(mv, st->group)[0],
		.src_seg = mv->out ? gpu : host,
		.dst_seg = mv->out ? host : gpu,
		.src_stride = mv->src_stride,
		.dst_stride = mv->dst_stride,
		.piece_vecs = pv,
		.piece_shift = log2u(pv),
		.count = p->count,
	};
	int err = 0;

	for (size_t pos = lo; !err && pos < hi;) {
		size_t end = hi - pos > per_launch ? pos + per_launch : hi;

		a.pairs = dev + 2 * (pos - lo);
		a.total_vecs = (uint32_t)((end - pos) * p->count * pv);
		err = launch(c, &a, p->piece_bytes, mv->out, s);
		pos = end;
	}
	return err;
}

/* One chunk of at most a slot's pairs: stage its ids, then each step's part of it. */
static int move_chunk(aeg_kv_t *kv, const struct kv_move *mv, size_t c0, size_t chunk, aeg_stream_t *stream)
{
	struct kv_cuda *c = kv->cuda;
	cudaStream_t s = aeg_stream_native(stream);
	struct kv_slot *sl = NULL;
	cudaError_t e;
	int err, give;

	if ((err = slot_take(c, &sl)))
		return err;
	for (size_t i = 0; i < chunk; i++) {
		sl->host[2 * i] = mv->src_ids[c0 + i];
		sl->host[2 * i + 1] = mv->dst_ids[c0 + i];
	}
	e = cudaMemcpyAsync(sl->dev, sl->host, chunk * 2 * sizeof(uint32_t), cudaMemcpyHostToDevice, s);
	if (e != cudaSuccess)
		err = cuda_fail(e, "cudaMemcpyAsync (KV ids)");
	for (size_t i = 0; !err && i < mv->nsteps; i++) {
		const struct kv_step *st = &mv->steps[i];
		size_t lo = st->first > c0 ? st->first : c0;
		size_t hi = st->end < c0 + chunk ? st->end : c0 + chunk;

		if (lo < hi)
			err = launch_step(kv, mv, st, sl->dev + 2 * (lo - c0), lo, hi, s);
		/* A step's event follows its launch in the chunk that holds its last entry. */
		if (!err && st->event && st->end > c0 && st->end <= c0 + chunk)
			err = aeg_event_record(st->event, stream);
	}
	give = slot_give(c, sl, s, e == cudaSuccess);
	return err ? err : give;
}


void kv_cuda_config(const aeg_kv_t *kv, uint64_t piece_bytes, struct kv_launch_cfg *cfg)
{
	choose(kv->cuda, piece_bytes, cfg);
	cfg->copy_engines = use_copy_engines(piece_bytes);
}

static int move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream)
{
	const size_t slot = kv->cuda->slot_pairs;
	int err = 0;

	for (size_t c0 = 0; !err && c0 < mv->n; c0 += slot)
		err = move_chunk(kv, mv, c0, mv->n - c0 < slot ? mv->n - c0 : slot, stream);
	return err;
}

static int cuda_check_copy(aeg_kv_t *kv, void *dst, const void *src, int h2d)
{
	struct cudaPointerAttributes da, sa;
	cudaError_t e;

	if ((e = cudaPointerGetAttributes(&da, dst)) != cudaSuccess)
		return cuda_fail(e, "cudaPointerGetAttributes (copy destination)");
	if ((e = cudaPointerGetAttributes(&sa, src)) != cudaSuccess)
		return cuda_fail(e, "cudaPointerGetAttributes (copy source)");
	if (h2d ? sa.type == cudaMemoryTypeDevice : sa.type != cudaMemoryTypeDevice)
		return aeg_fail(AEG_EINVAL, "%s copy: source %p is %s memory", h2d ? "H2D" : "D2H", src,
				sa.type == cudaMemoryTypeDevice ? "device" : "host");
	if (h2d ? da.type != cudaMemoryTypeDevice : da.type == cudaMemoryTypeDevice)
		return aeg_fail(AEG_EINVAL, "%s copy: destination %p is %s memory", h2d ? "H2D" : "D2H", dst,
				da.type == cudaMemoryTypeDevice ? "device" : "host");
	return 0;
}

/* The address of piece @k of entry @i on the source (@src) or destination side of @mv. */
static char *piece_at(const struct kv_move *mv, int src, size_t i, uint32_t k)
{
	char *const *base = src ? kv_move_src(mv, 0) : kv_move_dst(mv, 0);

	return base[k] + (uint64_t)(src ? mv->src_ids[i] : mv->dst_ids[i]) * (src ? mv->src_stride : mv->dst_stride);
}

static int per_piece(const struct kv_move *mv, cudaStream_t s)
{
	const uint64_t ps = mv->plan->piece_bytes;
	cudaError_t e;

	for (size_t i = 0; i < mv->n; i++) {
		for (uint32_t k = 0; k < mv->plan->count; k++) {
			e = cudaMemcpyAsync(piece_at(mv, 0, i, k), piece_at(mv, 1, i, k), ps, cudaMemcpyDefault, s);
			if (e != cudaSuccess)
				return cuda_fail(e, "cudaMemcpyAsync (per-block baseline)");
		}
	}
	return 0;
}

/*
 * Pairs [first, end) of a move, pieces of launch group @group, as one
 * cudaMemcpyBatchAsync on @s: the copy engines, no kernel.
 */
static int batch(const struct kv_move *mv, size_t first, size_t end, uint32_t group, cudaStream_t s)
{
	const size_t n = (end - first) * mv->plan->count;
	char *const *src = kv_move_src(mv, group);
	char *const *dst = kv_move_dst(mv, group);
	struct cudaMemcpyAttributes attr = { .srcAccessOrder = cudaMemcpySrcAccessOrderStream };
	size_t attr_index = 0, j = 0;
	void **dsts = malloc(n * sizeof(*dsts));
	const void **srcs = malloc(n * sizeof(*srcs));
	size_t *sizes = malloc(n * sizeof(*sizes));
	cudaError_t e;
	int err = 0;

	if (!dsts || !srcs || !sizes) {
		err = aeg_fail(AEG_ENOMEM, "KV: arrays of %zu copies for the copy engines", n);
		goto out;
	}
	for (size_t i = first; i < end; i++) {
		for (uint32_t k = 0; k < mv->plan->count; k++, j++) {
			dsts[j] = dst[k] + (uint64_t)mv->dst_ids[i] * mv->dst_stride;
			srcs[j] = src[k] + (uint64_t)mv->src_ids[i] * mv->src_stride;
			sizes[j] = mv->plan->piece_bytes;
		}
	}
	e = cudaMemcpyBatchAsync(dsts, srcs, sizes, n, &attr, &attr_index, 1, s);
	if (e != cudaSuccess)
		err = cuda_fail(e, "cudaMemcpyBatchAsync");
out:
	free(sizes);
	free(srcs);
	free(dsts);
	return err;
}

static int move_dma(const struct kv_move *mv, aeg_stream_t *stream)
{
	cudaStream_t s = aeg_stream_native(stream);
	int err = 0;

	for (size_t i = 0; !err && i < mv->nsteps; i++) {
		const struct kv_step *st = &mv->steps[i];

		if (st->first < st->end)
			err = batch(mv, st->first, st->end, st->group, s);
		if (!err && st->event)
			err = aeg_event_record(st->event, stream);
	}
	return err;
}

static int cuda_move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream)
{
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	err = use_copy_engines(mv->plan->piece_bytes) ? move_dma(mv, stream) : move(kv, mv, stream);
	leave(kv->gpu, prev);
	return err;
}

static int cuda_baseline(aeg_kv_t *kv, enum kv_baseline how, const struct kv_move *mv,
			 aeg_stream_t *stream)
{
	cudaStream_t s = aeg_stream_native(stream);
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	err = how == KV_BASELINE_BATCH ? batch(mv, 0, mv->n, 0, s) : per_piece(mv, s);
	leave(kv->gpu, prev);
	return err;
}

const struct kv_backend kv_cuda_backend = {
	.name = "cuda",
	.map = cuda_map,
	.init = cuda_init,
	.fini = cuda_fini,
	.move = cuda_move,
	.check_copy = cuda_check_copy,
	.baseline = cuda_baseline,
};

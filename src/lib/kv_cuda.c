/* KV swaps on the cuda backend: the embedded gather/scatter kernel, id staging, baselines. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include <aegaeon/event.h>

#include "internal.h"
#include "kv_internal.h"

#define THREADS 512
#define UNROLL 4                        /* as in kv_kernel.cu */
#define KERNEL_NAME "aeg_kv_copy_blocks"
#define SLOTS 4
#define SLOT_MAX_PAIRS 32768u
/* Keeps the kernel's 32-bit vector indexes, plus a round of its stride, from wrapping. */
#define LAUNCH_MAX_VECS (1u << 31)

/* One entry of the id staging: the kernel reads it as a uint2. */
struct kv_pair {
	uint32_t src, dst;
};

/*
 * Ids reach the device through SLOTS pinned staging slots, each copied to
 * its device twin before the launches that read it; a slot is written again
 * only once the event recorded after its last launch completed, so up to
 * SLOTS calls are in flight without the host waiting.
 */
struct kv_cuda {
	int blocks_per_sm;
	int sms;
	uint32_t slot_pairs;
	struct kv_pair *stage_host;     /* SLOTS * slot_pairs, pinned */
	struct kv_pair *stage_dev;
	cudaEvent_t slot_ev[SLOTS];
	int slot_busy[SLOTS];
	unsigned next_slot;
	int nevents;
};

/* The kernel library is loaded once per process and unloaded with the last cache. */
static pthread_mutex_t lib_lock = PTHREAD_MUTEX_INITIALIZER;
static cudaLibrary_t lib;
static cudaKernel_t kernel;
static unsigned lib_users;

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

static int lib_get(void)
{
	cudaError_t e;
	int err = 0;

	pthread_mutex_lock(&lib_lock);
	if (lib_users == 0) {
		e = cudaLibraryLoadData(&lib, aeg_kv_fatbin, NULL, NULL, 0, NULL, NULL, 0);
		if (e != cudaSuccess) {
			err = cuda_fail(e, "cudaLibraryLoadData (KV kernel)");
			goto out;
		}
		e = cudaLibraryGetKernel(&kernel, lib, KERNEL_NAME);
		if (e != cudaSuccess) {
			err = cuda_fail(e, "cudaLibraryGetKernel(" KERNEL_NAME ")");
			cudaLibraryUnload(lib);
			goto out;
		}
	}
	lib_users++;
out:
	pthread_mutex_unlock(&lib_lock);
	return err;
}

static void lib_put(void)
{
	pthread_mutex_lock(&lib_lock);
	if (--lib_users == 0) {
		cudaError_t e = cudaLibraryUnload(lib);

		if (e != cudaSuccess)
			aeg_warn("cudaLibraryUnload (KV kernel): %s", cudaGetErrorString(e));
	}
	pthread_mutex_unlock(&lib_lock);
}

/* The GPU region must be memory of our GPU, the host region mapped host memory. */
static int check_regions(aeg_kv_t *kv)
{
	const uint64_t host_bytes = (uint64_t)kv->host_blocks * kv->block_bytes;
	const uint64_t gpu_bytes = (uint64_t)kv->gpu_blocks * kv->block_bytes;
	struct cudaPointerAttributes a;
	void *dev_ptr;
	cudaError_t e;

	e = cudaPointerGetAttributes(&a, kv->gpu_base);
	if (e != cudaSuccess)
		return cuda_fail(e, "cudaPointerGetAttributes (KV GPU blocks)");
	if (a.type != cudaMemoryTypeDevice || a.device != kv->gpu)
		return aeg_fail(AEG_EINVAL, "KV GPU blocks at %p are not device memory of GPU %d",
				(void *)kv->gpu_base, kv->gpu);
	e = cudaPointerGetAttributes(&a, kv->gpu_base + gpu_bytes - 1);
	if (e != cudaSuccess || a.type != cudaMemoryTypeDevice)
		return aeg_fail(AEG_EINVAL, "KV GPU blocks: %p + %" PRIu64 " bytes runs past the device allocation",
				(void *)kv->gpu_base, gpu_bytes);

	e = cudaHostGetDevicePointer(&dev_ptr, kv->host_base, 0);
	if (e != cudaSuccess)
		return aeg_fail(AEG_EINVAL,
				"KV host blocks at %p are not registered, mapped host memory (use a pinned pool or aeg_host_register): cudaHostGetDevicePointer: %s",
				(void *)kv->host_base, cudaGetErrorString(e));
	e = cudaPointerGetAttributes(&a, kv->host_base + host_bytes - 1);
	if (e != cudaSuccess || a.type != cudaMemoryTypeHost)
		return aeg_fail(AEG_EINVAL, "KV host blocks: %p + %" PRIu64 " bytes runs past the registered range",
				(void *)kv->host_base, host_bytes);
	kv->host_dev = dev_ptr;
	return 0;
}

static int init(aeg_kv_t *kv)
{
	struct kv_cuda *c;
	uint32_t most;
	size_t stage_bytes;
	cudaError_t e;
	int err;

	if ((err = check_regions(kv)))
		return err;

	c = calloc(1, sizeof(*c));
	if (!c)
		return aeg_fail(AEG_ENOMEM, "KV cuda state");
	kv->cuda = c;                   /* from here kv_cuda_fini undoes what got done */
	if ((err = lib_get())) {
		free(c);
		kv->cuda = NULL;
		return err;
	}

	e = cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, kv->gpu);
	if (e != cudaSuccess)
		return cuda_fail(e, "cudaDeviceGetAttribute(MultiProcessorCount)");
	e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c->blocks_per_sm, (const void *)kernel, THREADS, 0);
	if (e != cudaSuccess)
		return cuda_fail(e, "cudaOccupancyMaxActiveBlocksPerMultiprocessor (KV kernel)");
	if (c->blocks_per_sm < 1)
		return aeg_fail(AEG_EDEVICE, "the KV kernel cannot run %d threads per block on GPU %d",
				THREADS, kv->gpu);

	/* A call never has more pairs than either side has blocks (ids are distinct). */
	most = kv->gpu_blocks < kv->host_blocks ? kv->gpu_blocks : kv->host_blocks;
	c->slot_pairs = most < SLOT_MAX_PAIRS ? most : SLOT_MAX_PAIRS;
	stage_bytes = (size_t)SLOTS * c->slot_pairs * sizeof(struct kv_pair);
	e = cudaHostAlloc((void **)&c->stage_host, stage_bytes, cudaHostAllocPortable);
	if (e != cudaSuccess) {
		c->stage_host = NULL;
		return cuda_fail(e, "cudaHostAlloc (KV id staging)");
	}
	e = cudaMalloc((void **)&c->stage_dev, stage_bytes);
	if (e != cudaSuccess) {
		c->stage_dev = NULL;
		return cuda_fail(e, "cudaMalloc (KV id staging)");
	}
	for (; c->nevents < SLOTS; c->nevents++) {
		e = cudaEventCreateWithFlags(&c->slot_ev[c->nevents], cudaEventDisableTiming);
		if (e != cudaSuccess)
			return cuda_fail(e, "cudaEventCreateWithFlags (KV staging)");
	}
	return 0;
}

int kv_cuda_init(aeg_kv_t *kv)
{
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	err = init(kv);
	leave(kv->gpu, prev);
	return err;
}

void kv_cuda_fini(aeg_kv_t *kv)
{
	struct kv_cuda *c = kv->cuda;
	int prev = kv->gpu;
	cudaError_t e;

	if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(kv->gpu) != cudaSuccess)
		aeg_warn("KV cache: cannot make GPU %d current to free its staging", kv->gpu);
	for (int i = 0; i < c->nevents; i++) {
		if (c->slot_busy[i] && (e = cudaEventSynchronize(c->slot_ev[i])) != cudaSuccess)
			aeg_warn("KV cache: cudaEventSynchronize: %s", cudaGetErrorString(e));
		cudaEventDestroy(c->slot_ev[i]);
	}
	if (c->stage_dev && (e = cudaFree(c->stage_dev)) != cudaSuccess)
		aeg_warn("KV cache: cudaFree (id staging): %s", cudaGetErrorString(e));
	if (c->stage_host && (e = cudaFreeHost(c->stage_host)) != cudaSuccess)
		aeg_warn("KV cache: cudaFreeHost (id staging): %s", cudaGetErrorString(e));
	lib_put();
	free(c);
	kv->cuda = NULL;
	leave(kv->gpu, prev);
}

/* The next staging slot, once the launches that last read it are done. */
static int slot_take(struct kv_cuda *c, unsigned *slot)
{
	unsigned s = c->next_slot;
	cudaError_t e;

	if (c->slot_busy[s]) {
		e = cudaEventSynchronize(c->slot_ev[s]);
		if (e != cudaSuccess)
			return cuda_fail(e, "cudaEventSynchronize (KV staging)");
		c->slot_busy[s] = 0;
	}
	c->next_slot = (s + 1) % SLOTS;
	*slot = s;
	return 0;
}

static int launch(struct kv_cuda *c, const char *src, char *dst, const struct kv_pair *pairs,
		  uint32_t n, uint32_t vecs_per_block, cudaStream_t s)
{
	unsigned int total = n * vecs_per_block;
	unsigned int per_cta = THREADS * UNROLL;
	unsigned int grid = (total + per_cta - 1) / per_cta;
	unsigned int full = (unsigned int)(c->sms * c->blocks_per_sm);
	void *args[] = { &src, &dst, &pairs, &total, &vecs_per_block };
	dim3 grid_dim = { grid < full ? grid : full, 1, 1 };
	dim3 block_dim = { THREADS, 1, 1 };
	cudaError_t e;

	e = cudaLaunchKernel((const void *)kernel, grid_dim, block_dim, args, 0, s);
	if (e != cudaSuccess)
		return cuda_fail(e, "cudaLaunchKernel (" KERNEL_NAME ")");
	return 0;
}

static int move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream)
{
	struct kv_cuda *c = kv->cuda;
	cudaStream_t s = aeg_stream_native(stream);
	uint32_t vpb = (uint32_t)(kv->block_bytes / 16);
	size_t per_launch = LAUNCH_MAX_VECS / vpb;
	size_t seg = 0, chunk;
	cudaError_t e;
	int err = 0;

	for (size_t c0 = 0; c0 < mv->n; c0 += chunk) {
		struct kv_pair *host, *dev;
		unsigned slot = 0;

		chunk = mv->n - c0 < c->slot_pairs ? mv->n - c0 : c->slot_pairs;
		if ((err = slot_take(c, &slot)))
			return err;
		host = c->stage_host + (size_t)slot * c->slot_pairs;
		dev = c->stage_dev + (size_t)slot * c->slot_pairs;
		for (size_t i = 0; i < chunk; i++) {
			host[i].src = mv->src_ids[c0 + i];
			host[i].dst = mv->dst_ids[c0 + i];
		}
		e = cudaMemcpyAsync(dev, host, chunk * sizeof(*host), cudaMemcpyHostToDevice, s);
		if (e != cudaSuccess)
			return cuda_fail(e, "cudaMemcpyAsync (KV ids)");

		/* One launch per layer piece of this chunk. */
		for (size_t pos = c0; !err && pos < c0 + chunk;) {
			size_t end = c0 + chunk;

			if (mv->ends[seg] < end)
				end = mv->ends[seg];
			if (end - pos > per_launch)
				end = pos + per_launch;
			err = launch(c, mv->src, mv->dst, dev + (pos - c0), (uint32_t)(end - pos), vpb, s);
			pos = end;
			if (!err && end == mv->ends[seg]) {
				if (mv->seg_events[seg])
					err = aeg_event_record(mv->seg_events[seg], stream);
				seg++;
			}
		}
		/* Even after a failure the queued id copy reads the slot: guard it all the same. */
		e = cudaEventRecord(c->slot_ev[slot], s);
		if (e == cudaSuccess)
			c->slot_busy[slot] = 1;
		else if (!err)
			err = cuda_fail(e, "cudaEventRecord (KV staging)");
		if (err)
			return err;
	}
	return 0;
}

int kv_cuda_move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream)
{
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	err = move(kv, mv, stream);
	leave(kv->gpu, prev);
	return err;
}

int kv_cuda_check_copy(aeg_kv_t *kv, void *dst, const void *src, int h2d)
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

static int per_block(aeg_kv_t *kv, const char *src, char *dst, const uint32_t *src_ids,
		     const uint32_t *dst_ids, size_t n, cudaStream_t s)
{
	const uint64_t bs = kv->block_bytes;
	cudaError_t e;

	for (size_t i = 0; i < n; i++) {
		e = cudaMemcpyAsync(dst + dst_ids[i] * bs, src + src_ids[i] * bs, bs, cudaMemcpyDefault, s);
		if (e != cudaSuccess)
			return cuda_fail(e, "cudaMemcpyAsync (per-block baseline)");
	}
	return 0;
}

static int batch(aeg_kv_t *kv, const char *src, char *dst, const uint32_t *src_ids,
		 const uint32_t *dst_ids, size_t n, cudaStream_t s)
{
	const uint64_t bs = kv->block_bytes;
	struct cudaMemcpyAttributes attr = { .srcAccessOrder = cudaMemcpySrcAccessOrderStream };
	size_t attr_index = 0;
	void **dsts = malloc(n * sizeof(*dsts));
	const void **srcs = malloc(n * sizeof(*srcs));
	size_t *sizes = malloc(n * sizeof(*sizes));
	cudaError_t e;
	int err = 0;

	if (!dsts || !srcs || !sizes) {
		err = aeg_fail(AEG_ENOMEM, "batch baseline arrays of %zu copies", n);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		dsts[i] = dst + dst_ids[i] * bs;
		srcs[i] = src + src_ids[i] * bs;
		sizes[i] = bs;
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

int kv_cuda_baseline(aeg_kv_t *kv, enum kv_baseline how, const char *src, char *dst,
		     const uint32_t *src_ids, const uint32_t *dst_ids, size_t n,
		     aeg_stream_t *stream)
{
	cudaStream_t s = aeg_stream_native(stream);
	int prev, err;

	if ((err = enter(kv->gpu, &prev)))
		return err;
	if (how == KV_BASELINE_BATCH)
		err = batch(kv, src, dst, src_ids, dst_ids, n, s);
	else
		err = per_block(kv, src, dst, src_ids, dst_ids, n, s);
	leave(kv->gpu, prev);
	return err;
}

/* Per-load gate stream holding chunk events pending until their bytes land. */
#include "config.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_CUDA
#include <cuda.h>
#include <cuda_runtime.h>
#endif

#include "device_internal.h"
#include "internal.h"
#include "prefetch_gate.h"

struct gate_arg {
	struct aeg_gate *gate;
	uint32_t index;
};

struct aeg_gate {
	aeg_device_t *dev;
	aeg_stream_t *stream;
	uint32_t count;
	uint32_t *flags;                /* page-aligned; registered on cuda */
	size_t flags_bytes;
	int registered;
	struct gate_arg *args;          /* host backend: one per flag */
	pthread_mutex_t lock;
	pthread_cond_t cond;
#ifdef HAVE_CUDA
	CUresult (*wait_value)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
	CUdeviceptr dflags;
#endif
};

static void host_wait(void *p)
{
	struct gate_arg *a = p;
	struct aeg_gate *g = a->gate;

	pthread_mutex_lock(&g->lock);
	while (!__atomic_load_n(&g->flags[a->index], __ATOMIC_ACQUIRE))
		pthread_cond_wait(&g->cond, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

#ifdef HAVE_CUDA
static int cuda_setup(struct aeg_gate *g)
{
	enum cudaDriverEntryPointQueryResult q;
	cudaError_t ce;
	void *fn = NULL, *dptr = NULL;

	ce = cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000,
					      cudaEnableDefault, &q);
	if (ce != cudaSuccess || q != cudaDriverEntryPointSuccess || fn == NULL)
		return aeg_fail(AEG_EDEVICE,
				"cudaGetDriverEntryPointByVersion(cuStreamWaitValue32): %s (query result %d)",
				cudaGetErrorString(ce), (int)q);
	g->wait_value = (CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int))fn;
	ce = cudaHostGetDevicePointer(&dptr, g->flags, 0);
	if (ce != cudaSuccess)
		return aeg_fail(AEG_EDEVICE, "cudaHostGetDevicePointer(gate flags): %s",
				cudaGetErrorString(ce));
	g->dflags = (CUdeviceptr)(uintptr_t)dptr;
	return 0;
}
#endif

int aeg_gate_create(aeg_device_t *dev, int gpu, uint32_t count, struct aeg_gate **gate)
{
	struct aeg_gate *g;
	int err;

	g = calloc(1, sizeof(*g));
	if (g == NULL)
		return aeg_fail(AEG_ENOMEM, "gate: out of memory");
	g->dev = dev;
	g->count = count;
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cond, NULL);
	g->flags_bytes = aeg_round_up((uint64_t)(count ? count : 1) * sizeof(uint32_t), 4096);
	if (posix_memalign((void **)&g->flags, 4096, g->flags_bytes)) {
		g->flags = NULL;
		err = aeg_fail(AEG_ENOMEM, "gate: out of memory for %u flags", count);
		goto fail;
	}
	memset(g->flags, 0, g->flags_bytes);
	g->args = calloc(count ? count : 1, sizeof(*g->args));
	if (g->args == NULL) {
		err = aeg_fail(AEG_ENOMEM, "gate: out of memory for %u flags", count);
		goto fail;
	}
	err = aeg_host_register(dev, g->flags, g->flags_bytes, 0);
	if (err)
		goto fail;
	g->registered = 1;
#ifdef HAVE_CUDA
	if (aeg_device_kind(dev) == AEG_DEVICE_CUDA) {
		err = cuda_setup(g);
		if (err)
			goto fail;
	}
#endif
	err = aeg_stream_create(dev, gpu, &g->stream);
	if (err)
		goto fail;
	*gate = g;
	return 0;
fail:
	if (g->registered)
		aeg_host_unregister(dev, g->flags);
	free(g->args);
	free(g->flags);
	pthread_cond_destroy(&g->cond);
	pthread_mutex_destroy(&g->lock);
	free(g);
	return err;
}

int aeg_gate_arm(struct aeg_gate *g, uint32_t index, aeg_event_t *ev)
{
	int err;

#ifdef HAVE_CUDA
	if (aeg_device_kind(g->dev) == AEG_DEVICE_CUDA) {
		CUresult r = g->wait_value((CUstream)aeg_stream_native(g->stream),
					   g->dflags + index * sizeof(uint32_t), 1,
					   CU_STREAM_WAIT_VALUE_GEQ);

		if (r != CUDA_SUCCESS)
			return aeg_fail(AEG_EDEVICE, "cuStreamWaitValue32: CUresult %d", (int)r);
		return aeg_event_record(ev, g->stream);
	}
#endif
	g->args[index].gate = g;
	g->args[index].index = index;
	err = aeg_stream_launch_host_fn(g->stream, host_wait, &g->args[index]);
	if (err)
		return err;
	return aeg_event_record(ev, g->stream);
}

void aeg_gate_open(struct aeg_gate *g, uint32_t index)
{
	pthread_mutex_lock(&g->lock);
	__atomic_store_n(&g->flags[index], 1, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&g->cond);
	pthread_mutex_unlock(&g->lock);
}

void aeg_gate_destroy(struct aeg_gate *g)
{
	if (g == NULL)
		return;
	for (uint32_t i = 0; i < g->count; i++)
		aeg_gate_open(g, i);
	aeg_stream_destroy(g->stream);
	aeg_host_unregister(g->dev, g->flags);
	free(g->args);
	free(g->flags);
	pthread_cond_destroy(&g->cond);
	pthread_mutex_destroy(&g->lock);
	free(g);
}

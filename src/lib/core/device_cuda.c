/* The cuda device backend: cudart (linked statically) behind the device vtable. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "device_internal.h"
#include "internal.h"

_Static_assert(sizeof(cudaIpcMemHandle_t) == AEG_HANDLE_BYTES, "CUDA memory handles are 64 bytes");
_Static_assert(sizeof(cudaIpcEventHandle_t) == AEG_HANDLE_BYTES, "CUDA event handles are 64 bytes");

/*
 * Waits spin this long on cudaEventQuery before they start to sleep; then
 * each sleep is a 32nd of the time waited so far (1 us to 1 ms), so a wait
 * wakes at most about 3% after the event completes (plus the timer's
 * slack): a doubling backoff overslept up to a millisecond, a fifth of a
 * 5 ms KV swap waited on from Python.
 */
#define SPIN_NS 20000ull
#define BACKOFF_MIN_NS 1000L
#define BACKOFF_MAX_NS 1000000L
#define BACKOFF_SHARE 32

/* An allocation this process exported: its own handle must open locally. */
struct cuda_export {
	void *ptr;
	aeg_handle_t handle;
	unsigned opens;
	struct cuda_export *next;
};

/* Another process's allocation opened here, shared by repeated opens. */
struct cuda_opening {
	void *ptr;
	aeg_handle_t handle;
	unsigned refs;
	struct cuda_opening *next;
};

struct cuda_impl {
	pthread_mutex_t lock;   /* guards both lists */
	struct cuda_export *exports;
	struct cuda_opening *openings;
};

struct cuda_stream {
	cudaStream_t stream;
	int gpu;
};

struct cuda_event {
	cudaEvent_t event;
	int gpu;                /* -1 for an event opened from a handle */
};

static struct cuda_impl *impl_of(aeg_device_t *dev)
{
	return dev->impl;
}

/*
 * Fail with @code and "<what>: <cudaGetErrorString> (<name>)". The last
 * error is cleared so a later cudaGetLastError of the caller does not see it.
 */
static int __attribute__((format(printf, 3, 4)))
cfail(int code, cudaError_t e, const char *fmt, ...)
{
	char what[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	(void)cudaGetLastError();
	return aeg_fail(code, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

/*
 * The current device is per thread and may be the caller's (a framework's
 * thread): make @gpu current for one call, then give the caller its own back.
 */
static int enter(int gpu, int *prev)
{
	cudaError_t e;

	if (cudaGetDevice(prev) != cudaSuccess) {
		(void)cudaGetLastError();
		*prev = -1;
	}
	if (*prev == gpu)
		return 0;
	e = cudaSetDevice(gpu);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaSetDevice(%d)", gpu);
	return 0;
}

static void leave(int gpu, int prev)
{
	if (prev >= 0 && prev != gpu)
		cudaSetDevice(prev);
}

#define ON_GPU(gpu, call) __extension__({		\
	int prev_, err_ = enter((gpu), &prev_);		\
	if (err_ == 0) {				\
		err_ = (call);				\
		leave((gpu), prev_);			\
	}						\
	err_;						\
})

static int cuda_init(aeg_device_t *dev)
{
	const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
	char q[128];
	struct cuda_impl *c;
	cudaError_t e;
	int count = 0, err;

	e = cudaGetDeviceCount(&count);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaGetDeviceCount (is the NVIDIA driver loaded? device \"host\" runs without a GPU)");
	if (count <= 0)
		return aeg_fail(AEG_EDEVICE, "cudaGetDeviceCount: no CUDA GPU visible (CUDA_VISIBLE_DEVICES=\"%s\")",
				aeg_quote(cvd != NULL ? cvd : "", q, sizeof(q)));
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return aeg_fail(AEG_ENOMEM, "cuda device: out of memory");
	err = pthread_mutex_init(&c->lock, NULL);
	if (err != 0) {
		free(c);
		return aeg_fail(AEG_ENOMEM, "cuda device: pthread_mutex_init: %s", strerror(err));
	}
	dev->gpu_count = count;
	dev->impl = c;
	return 0;
}

static void cuda_fini(aeg_device_t *dev)
{
	struct cuda_impl *c = impl_of(dev);

	while (c->openings != NULL) {
		struct cuda_opening *o = c->openings;

		c->openings = o->next;
		aeg_warn("cuda device closed with an opened memory handle at %p; closing it", o->ptr);
		cudaIpcCloseMemHandle(o->ptr);
		free(o);
	}
	while (c->exports != NULL) {
		struct cuda_export *x = c->exports;

		c->exports = x->next;
		free(x);
	}
	pthread_mutex_destroy(&c->lock);
	free(c);
	dev->impl = NULL;
}

/* A device attribute: no context made, no current device changed. */
static int cuda_pci_bus_id(aeg_device_t *dev, int gpu, char id[AEG_PCI_BUS_ID_LEN])
{
	unsigned domain, bus, device, function;
	char pci[64];
	cudaError_t e;

	(void)dev;
	e = cudaDeviceGetPCIBusId(pci, sizeof(pci), gpu);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaDeviceGetPCIBusId(%d)", gpu);
	/* The domain may come with 8 digits; the rest of aegaeon writes 4, in lower case. */
	if (sscanf(pci, "%x:%x:%x.%x", &domain, &bus, &device, &function) != 4 || domain > 0xffff)
		return aeg_fail(AEG_EDEVICE, "cudaDeviceGetPCIBusId(%d) gave \"%s\", not a PCI bus id", gpu, pci);
	snprintf(id, AEG_PCI_BUS_ID_LEN, "%04x:%02x:%02x.%x", domain, bus, device, function);
	return 0;
}

static int gpu_info_here(aeg_device_t *dev, int gpu, struct aeg_gpu_info *info)
{
	struct cudaDeviceProp prop;
	size_t free_bytes, total_bytes;
	cudaError_t e;

	e = cudaGetDeviceProperties(&prop, gpu);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaGetDeviceProperties(%d)", gpu);
	snprintf(info->name, sizeof(info->name), "%s", prop.name);
	e = cudaMemGetInfo(&free_bytes, &total_bytes);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaMemGetInfo on GPU %d", gpu);
	info->free_bytes = free_bytes;
	info->total_bytes = total_bytes;
	return cuda_pci_bus_id(dev, gpu, info->pci_bus_id);
}

static int cuda_gpu_info(aeg_device_t *dev, int gpu, struct aeg_gpu_info *info)
{
	return ON_GPU(gpu, gpu_info_here(dev, gpu, info));
}

/* ---------------------------------------------------------------- memory */

static int mem_alloc_here(aeg_device_t *dev, int gpu, uint64_t bytes, void **ptr)
{
	size_t free_bytes = 0, total_bytes = 0;
	cudaError_t e;

	e = cudaMalloc(ptr, bytes);
	if (e == cudaErrorMemoryAllocation) {
		(void)cudaGetLastError();
		cudaMemGetInfo(&free_bytes, &total_bytes);
		return cfail(AEG_ENOSPC, e, "cudaMalloc(%" PRIu64 " bytes) on GPU %d (%zu free of %zu)",
			     bytes, gpu, free_bytes, total_bytes);
	}
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaMalloc(%" PRIu64 " bytes) on GPU %d", bytes, gpu);
	return 0;
}

static int cuda_mem_alloc(aeg_device_t *dev, int gpu, uint64_t bytes, void **ptr)
{
	return ON_GPU(gpu, mem_alloc_here(dev, gpu, bytes, ptr));
}

static int mem_free_here(aeg_device_t *dev, int gpu, void *ptr)
{
	struct cuda_impl *c = impl_of(dev);
	struct cuda_export **pp;
	cudaError_t e;

	pthread_mutex_lock(&c->lock);
	for (pp = &c->exports; *pp != NULL;) {
		struct cuda_export *x = *pp;

		if (x->ptr == ptr) {
			*pp = x->next;
			free(x);
		} else {
			pp = &x->next;
		}
	}
	pthread_mutex_unlock(&c->lock);
	e = cudaFree(ptr);
	if (e == cudaErrorInvalidValue || e == cudaErrorInvalidDevicePointer)
		return cfail(AEG_EINVAL, e, "cudaFree(%p) on GPU %d", ptr, gpu);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaFree(%p) on GPU %d", ptr, gpu);
	return 0;
}

static int cuda_mem_free(aeg_device_t *dev, int gpu, void *ptr)
{
	return ON_GPU(gpu, mem_free_here(dev, gpu, ptr));
}

static int cuda_mem_export(aeg_device_t *dev, void *ptr, aeg_handle_t *handle)
{
	struct cuda_impl *c = impl_of(dev);
	struct cuda_export *x;
	cudaIpcMemHandle_t h;
	cudaError_t e;
	int err = 0;

	pthread_mutex_lock(&c->lock);
	for (x = c->exports; x != NULL; x = x->next) {
		if (x->ptr == ptr) {
			*handle = x->handle;
			goto out;
		}
	}
	e = cudaIpcGetMemHandle(&h, ptr);
	if (e != cudaSuccess) {
		err = cfail(e == cudaErrorInvalidValue ? AEG_EINVAL : AEG_EDEVICE, e,
			    "cudaIpcGetMemHandle(%p)", ptr);
		goto out;
	}
	x = calloc(1, sizeof(*x));
	if (x == NULL) {
		err = aeg_fail(AEG_ENOMEM, "memory export: out of memory");
		goto out;
	}
	x->ptr = ptr;
	memcpy(x->handle.bytes, &h, sizeof(h));
	x->next = c->exports;
	c->exports = x;
	*handle = x->handle;
out:
	pthread_mutex_unlock(&c->lock);
	return err;
}

static int mem_open_here(aeg_device_t *dev, int gpu, const aeg_handle_t *handle, void **ptr)
{
	struct cuda_impl *c = impl_of(dev);
	struct cuda_opening *o;
	cudaIpcMemHandle_t h;
	cudaError_t e;
	int err = 0;

	pthread_mutex_lock(&c->lock);
	/* CUDA refuses to open a handle of the calling process. */
	for (struct cuda_export *x = c->exports; x != NULL; x = x->next) {
		if (memcmp(x->handle.bytes, handle->bytes, AEG_HANDLE_BYTES) == 0) {
			x->opens++;
			*ptr = x->ptr;
			goto out;
		}
	}
	for (o = c->openings; o != NULL; o = o->next) {
		if (memcmp(o->handle.bytes, handle->bytes, AEG_HANDLE_BYTES) == 0) {
			o->refs++;
			*ptr = o->ptr;
			goto out;
		}
	}
	o = calloc(1, sizeof(*o));
	if (o == NULL) {
		err = aeg_fail(AEG_ENOMEM, "memory handle: out of memory");
		goto out;
	}
	memcpy(&h, handle->bytes, sizeof(h));
	e = cudaIpcOpenMemHandle(&o->ptr, h, cudaIpcMemLazyEnablePeerAccess);
	if (e != cudaSuccess) {
		free(o);
		err = cfail(AEG_EBADF, e, "cudaIpcOpenMemHandle on GPU %d (is the owner alive, and the handle of a cudaMalloc allocation?)",
			    gpu);
		goto out;
	}
	o->handle = *handle;
	o->refs = 1;
	o->next = c->openings;
	c->openings = o;
	*ptr = o->ptr;
out:
	pthread_mutex_unlock(&c->lock);
	return err;
}

static int cuda_mem_open(aeg_device_t *dev, int gpu, const aeg_handle_t *handle, void **ptr)
{
	return ON_GPU(gpu, mem_open_here(dev, gpu, handle, ptr));
}

/*
 * Reserved address space with memory mapped into it (the driver's virtual
 * memory management, reached through the runtime: no link to libcuda). A
 * slab reserved this way costs its range at once (0.02 ms for 125 GiB on
 * the H200) and its memory as it is mapped, where the first cudaMalloc of
 * the same 125 GiB costs 5 ms; its memory has no cudaIpcGetMemHandle.
 */
static struct {
	PFN_cuMemAddressReserve_v10020 reserve;
	PFN_cuMemAddressFree_v10020 addr_free;
	PFN_cuMemCreate_v10020 create;
	PFN_cuMemRelease_v10020 release;
	PFN_cuMemMap_v10020 map;
	PFN_cuMemUnmap_v10020 unmap;
	PFN_cuMemSetAccess_v10020 set_access;
	PFN_cuMemGetAllocationGranularity_v10020 granularity;
	PFN_cuDeviceGetAttribute_v2000 attribute;
	PFN_cuGetErrorName_v6000 error_name;
	int loaded;             /* 1: every call found; -1: one is missing */
	char missing[64];
} vmm;
static pthread_once_t vmm_once = PTHREAD_ONCE_INIT;

static void vmm_load(void)
{
	static const struct {
		const char *name;
		int version;
		size_t slot;
	} calls[] = {
		{ "cuMemAddressReserve", 10020, offsetof(__typeof__(vmm), reserve) },
		{ "cuMemAddressFree", 10020, offsetof(__typeof__(vmm), addr_free) },
		{ "cuMemCreate", 10020, offsetof(__typeof__(vmm), create) },
		{ "cuMemRelease", 10020, offsetof(__typeof__(vmm), release) },
		{ "cuMemMap", 10020, offsetof(__typeof__(vmm), map) },
		{ "cuMemUnmap", 10020, offsetof(__typeof__(vmm), unmap) },
		{ "cuMemSetAccess", 10020, offsetof(__typeof__(vmm), set_access) },
		{ "cuMemGetAllocationGranularity", 10020, offsetof(__typeof__(vmm), granularity) },
		{ "cuDeviceGetAttribute", 2000, offsetof(__typeof__(vmm), attribute) },
		{ "cuGetErrorName", 6000, offsetof(__typeof__(vmm), error_name) },
	};

	for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
		enum cudaDriverEntryPointQueryResult q;
		void **slot = (void **)((char *)&vmm + calls[i].slot);
		cudaError_t e = cudaGetDriverEntryPointByVersion(calls[i].name, slot, calls[i].version,
								 cudaEnableDefault, &q);

		if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
			(void)cudaGetLastError();
			snprintf(vmm.missing, sizeof(vmm.missing), "%s", calls[i].name);
			vmm.loaded = -1;
			return;
		}
	}
	vmm.loaded = 1;
}

/* Fail with @code and "<what>: <the driver's error name>". */
static int __attribute__((format(printf, 3, 4)))
cufail(int code, CUresult r, const char *fmt, ...)
{
	const char *name = NULL;
	char what[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (vmm.error_name == NULL || vmm.error_name(r, &name) != CUDA_SUCCESS || name == NULL)
		name = "an unknown driver error";
	return aeg_fail(code, "%s: %s (%d)", what, name, (int)r);
}

static CUmemAllocationProp vmm_prop(int gpu)
{
	return (CUmemAllocationProp){ .type = CU_MEM_ALLOCATION_TYPE_PINNED,
				      .location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = gpu } };
}

static int va_reserve_here(aeg_device_t *dev, int gpu, uint64_t bytes, uint64_t *granularity, void **base)
{
	CUmemAllocationProp prop = vmm_prop(gpu);
	CUdeviceptr p = 0;
	uint64_t rounded;
	size_t g = 0;
	CUresult r;
	int on = 0;

	(void)dev;
	pthread_once(&vmm_once, vmm_load);
	if (vmm.loaded < 0)
		return aeg_fail(AEG_ENOTSUP, "the CUDA driver has no %s: no reserved address space", vmm.missing);
	r = vmm.attribute(&on, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, gpu);
	if (r != CUDA_SUCCESS)
		return cufail(AEG_EDEVICE, r, "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, %d)", gpu);
	if (!on)
		return aeg_fail(AEG_ENOTSUP, "GPU %d has no virtual memory management", gpu);
	r = vmm.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
	if (r != CUDA_SUCCESS || g == 0)
		return cufail(AEG_EDEVICE, r, "cuMemGetAllocationGranularity on GPU %d", gpu);
	rounded = aeg_round_up(bytes, g);
	r = vmm.reserve(&p, rounded, g, 0, 0);
	if (r != CUDA_SUCCESS)
		return cufail(r == CUDA_ERROR_OUT_OF_MEMORY ? AEG_ENOSPC : AEG_EDEVICE, r,
			      "cuMemAddressReserve(%" PRIu64 " bytes) for GPU %d", rounded, gpu);
	*granularity = g;
	*base = (void *)(uintptr_t)p;
	return 0;
}

static int va_map_here(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	CUmemAllocationProp prop = vmm_prop(gpu);
	CUmemAccessDesc access = { .location = prop.location, .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE };
	CUdeviceptr at = (CUdeviceptr)(uintptr_t)addr;
	CUmemGenericAllocationHandle h;
	CUresult r;

	(void)dev;
	r = vmm.create(&h, bytes, &prop, 0);
	if (r != CUDA_SUCCESS)
		return cufail(r == CUDA_ERROR_OUT_OF_MEMORY ? AEG_ENOSPC : AEG_EDEVICE, r,
			      "cuMemCreate(%" PRIu64 " bytes) on GPU %d", bytes, gpu);
	r = vmm.map(at, bytes, 0, h, 0);
	/* The mapping holds the memory from here on: it goes when unmapped. */
	vmm.release(h);
	if (r != CUDA_SUCCESS)
		return cufail(AEG_EDEVICE, r, "cuMemMap(%p, %" PRIu64 " bytes) on GPU %d", addr, bytes, gpu);
	r = vmm.set_access(at, bytes, &access, 1);
	if (r != CUDA_SUCCESS) {
		vmm.unmap(at, bytes);
		return cufail(AEG_EDEVICE, r, "cuMemSetAccess(%p, %" PRIu64 " bytes) on GPU %d", addr, bytes, gpu);
	}
	return 0;
}

static int va_unmap_here(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	CUresult r;

	(void)dev;
	/* cudaFree waits for work in flight on the GPU before its memory goes; so does this. */
	if (cudaDeviceSynchronize() != cudaSuccess)
		(void)cudaGetLastError();
	r = vmm.unmap((CUdeviceptr)(uintptr_t)addr, bytes);
	if (r != CUDA_SUCCESS)
		return cufail(AEG_EDEVICE, r, "cuMemUnmap(%p, %" PRIu64 " bytes) on GPU %d", addr, bytes, gpu);
	return 0;
}

static int va_release_here(aeg_device_t *dev, int gpu, void *base, uint64_t bytes)
{
	CUresult r;

	(void)dev;
	r = vmm.addr_free((CUdeviceptr)(uintptr_t)base, bytes);
	if (r != CUDA_SUCCESS)
		return cufail(AEG_EDEVICE, r, "cuMemAddressFree(%p, %" PRIu64 " bytes) on GPU %d", base, bytes, gpu);
	return 0;
}

/* With @gpu current (the caller's thread may not have made its context yet). */
static int cuda_va_reserve(aeg_device_t *dev, int gpu, uint64_t bytes, uint64_t *granularity, void **base)
{
	return ON_GPU(gpu, va_reserve_here(dev, gpu, bytes, granularity, base));
}

static int cuda_va_map(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	return ON_GPU(gpu, va_map_here(dev, gpu, addr, bytes));
}

static int cuda_va_unmap(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	return ON_GPU(gpu, va_unmap_here(dev, gpu, addr, bytes));
}

static int cuda_va_release(aeg_device_t *dev, int gpu, void *base, uint64_t bytes)
{
	return ON_GPU(gpu, va_release_here(dev, gpu, base, bytes));
}

static int cuda_mem_close(aeg_device_t *dev, void *ptr)
{
	struct cuda_impl *c = impl_of(dev);
	struct cuda_opening **pp, *o = NULL;
	cudaError_t e;
	int err = 0;

	pthread_mutex_lock(&c->lock);
	for (pp = &c->openings; *pp != NULL; pp = &(*pp)->next) {
		if ((*pp)->ptr == ptr) {
			o = *pp;
			if (--o->refs == 0)
				*pp = o->next;
			else
				o = NULL;
			goto out;
		}
	}
	err = aeg_fail(AEG_EINVAL, "memory handle: %p was not opened with aeg_mem_open_handle", ptr);
	for (struct cuda_export *x = c->exports; x != NULL; x = x->next) {
		if (x->ptr == ptr && x->opens > 0) {
			x->opens--;
			err = 0;
			break;
		}
	}
out:
	pthread_mutex_unlock(&c->lock);
	if (o != NULL) {
		e = cudaIpcCloseMemHandle(o->ptr);
		free(o);
		if (e != cudaSuccess)
			return cfail(AEG_EDEVICE, e, "cudaIpcCloseMemHandle(%p)", ptr);
	}
	return err;
}

/* cudaMemcpy/cudaMemset return before a device-to-device operation is done; wait for it. */
static int sync_legacy(const char *what)
{
	cudaError_t e = cudaStreamSynchronize(0);

	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaStreamSynchronize after %s", what);
	return 0;
}

static int cuda_memcpy_sync(aeg_device_t *dev, void *dst, const void *src, size_t bytes)
{
	cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);

	if (e != cudaSuccess)
		return cfail(e == cudaErrorInvalidValue ? AEG_EINVAL : AEG_EDEVICE, e,
			     "cudaMemcpy(%p <- %p, %zu bytes)", dst, src, bytes);
	return sync_legacy("cudaMemcpy");
}

static int cuda_memset_sync(aeg_device_t *dev, void *dst, int value, size_t bytes)
{
	struct cudaPointerAttributes attr;
	cudaError_t e;

	e = cudaPointerGetAttributes(&attr, dst);
	if (e != cudaSuccess)
		return cfail(AEG_EINVAL, e, "cudaPointerGetAttributes(%p)", dst);
	if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
		memset(dst, value, bytes);
		return 0;
	}
	e = cudaMemset(dst, value, bytes);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaMemset(%p, %d, %zu bytes)", dst, value, bytes);
	return sync_legacy("cudaMemset");
}

static int cuda_host_register(aeg_device_t *dev, void *ptr, size_t bytes, unsigned flags)
{
	unsigned cflags = cudaHostRegisterPortable | cudaHostRegisterMapped;
	cudaError_t e;

	if (flags & AEG_HOST_REGISTER_READONLY)
		cflags |= cudaHostRegisterReadOnly;
	e = cudaHostRegister(ptr, bytes, cflags);
	if (e == cudaErrorHostMemoryAlreadyRegistered)
		return cfail(AEG_EEXIST, e, "cudaHostRegister(%p, %zu bytes)", ptr, bytes);
	if (e == cudaErrorInvalidValue)
		return cfail(AEG_EINVAL, e, "cudaHostRegister(%p, %zu bytes, flags 0x%x)", ptr, bytes, cflags);
	if (e == cudaErrorMemoryAllocation)
		return cfail(AEG_ENOMEM, e, "cudaHostRegister(%p, %zu bytes): pinning failed (ulimit -l?)",
			     ptr, bytes);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaHostRegister(%p, %zu bytes, flags 0x%x)", ptr, bytes, cflags);
	return 0;
}

static int cuda_host_unregister(aeg_device_t *dev, void *ptr)
{
	cudaError_t e = cudaHostUnregister(ptr);

	if (e == cudaErrorHostMemoryNotRegistered || e == cudaErrorInvalidValue)
		return cfail(AEG_EINVAL, e, "cudaHostUnregister(%p)", ptr);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaHostUnregister(%p)", ptr);
	return 0;
}

/* ---------------------------------------------------------------- streams */

static int stream_create_here(aeg_device_t *dev, int gpu, void **streamp)
{
	struct cuda_stream *s;
	cudaError_t e;

	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return aeg_fail(AEG_ENOMEM, "stream: out of memory");
	s->gpu = gpu;
	e = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
	if (e != cudaSuccess) {
		free(s);
		return cfail(AEG_EDEVICE, e, "cudaStreamCreateWithFlags on GPU %d", gpu);
	}
	*streamp = s;
	return 0;
}

static int cuda_stream_create(aeg_device_t *dev, int gpu, void **streamp)
{
	return ON_GPU(gpu, stream_create_here(dev, gpu, streamp));
}

static int cuda_stream_destroy(aeg_device_t *dev, void *stream)
{
	struct cuda_stream *s = stream;
	cudaError_t e, e2;

	e = cudaStreamSynchronize(s->stream);
	e2 = cudaStreamDestroy(s->stream);
	free(s);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaStreamSynchronize before destroying a stream");
	if (e2 != cudaSuccess)
		return cfail(AEG_EDEVICE, e2, "cudaStreamDestroy");
	return 0;
}

static int cuda_stream_sync(aeg_device_t *dev, void *stream)
{
	struct cuda_stream *s = stream;
	cudaError_t e = cudaStreamSynchronize(s->stream);

	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaStreamSynchronize on GPU %d", s->gpu);
	return 0;
}

static void *cuda_stream_native(void *stream)
{
	return ((struct cuda_stream *)stream)->stream;
}

static int memcpy_async_here(aeg_device_t *dev, void *stream, void *dst, const void *src, size_t bytes)
{
	struct cuda_stream *s = stream;
	cudaError_t e;

	e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s->stream);
	if (e != cudaSuccess)
		return cfail(e == cudaErrorInvalidValue ? AEG_EINVAL : AEG_EDEVICE, e,
			     "cudaMemcpyAsync(%p <- %p, %zu bytes) on GPU %d", dst, src, bytes, s->gpu);
	return 0;
}

static int cuda_memcpy_async(aeg_device_t *dev, void *stream, void *dst, const void *src, size_t bytes)
{
	return ON_GPU(((struct cuda_stream *)stream)->gpu, memcpy_async_here(dev, stream, dst, src, bytes));
}

/* Pitches past the driver's limit (2^31 - 1 bytes on current GPUs) go row by row. */
#define PITCH_MAX ((size_t)INT_MAX)

static int memcpy2d_async_here(aeg_device_t *dev, void *stream, void *dst, size_t dpitch, const void *src,
			       size_t spitch, size_t width, size_t height)
{
	struct cuda_stream *s = stream;
	cudaError_t e;

	if (dpitch > PITCH_MAX || spitch > PITCH_MAX) {
		for (size_t r = 0; r < height; r++) {
			int err = memcpy_async_here(dev, stream, (char *)dst + r * dpitch,
						    (const char *)src + r * spitch, width);
			if (err)
				return err;
		}
		return 0;
	}
	e = cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, s->stream);
	if (e != cudaSuccess)
		return cfail(e == cudaErrorInvalidValue || e == cudaErrorInvalidPitchValue ? AEG_EINVAL : AEG_EDEVICE, e,
			     "cudaMemcpy2DAsync(%p pitch %zu <- %p pitch %zu, %zu rows of %zu bytes) on GPU %d",
			     dst, dpitch, src, spitch, height, width, s->gpu);
	return 0;
}

static int cuda_memcpy2d_async(aeg_device_t *dev, void *stream, void *dst, size_t dpitch, const void *src,
			       size_t spitch, size_t width, size_t height)
{
	return ON_GPU(((struct cuda_stream *)stream)->gpu,
		      memcpy2d_async_here(dev, stream, dst, dpitch, src, spitch, width, height));
}

static int launch_host_fn_here(aeg_device_t *dev, void *stream, void (*fn)(void *), void *arg)
{
	struct cuda_stream *s = stream;
	cudaError_t e;

	e = cudaLaunchHostFunc(s->stream, fn, arg);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaLaunchHostFunc on GPU %d", s->gpu);
	return 0;
}

static int cuda_launch_host_fn(aeg_device_t *dev, void *stream, void (*fn)(void *), void *arg)
{
	return ON_GPU(((struct cuda_stream *)stream)->gpu, launch_host_fn_here(dev, stream, fn, arg));
}

/* ---------------------------------------------------------------- events */

static int event_create_here(aeg_device_t *dev, int gpu, void **evp, aeg_handle_t *handle)
{
	struct cuda_event *ev;
	cudaIpcEventHandle_t h;
	cudaError_t e;
	int err;

	ev = calloc(1, sizeof(*ev));
	if (ev == NULL)
		return aeg_fail(AEG_ENOMEM, "event: out of memory");
	ev->gpu = gpu;
	e = cudaEventCreateWithFlags(&ev->event, cudaEventDisableTiming | cudaEventInterprocess);
	if (e != cudaSuccess) {
		err = cfail(AEG_EDEVICE, e, "cudaEventCreateWithFlags(interprocess) on GPU %d", gpu);
		goto free_ev;
	}
	e = cudaIpcGetEventHandle(&h, ev->event);
	if (e != cudaSuccess) {
		err = cfail(AEG_EDEVICE, e, "cudaIpcGetEventHandle on GPU %d", gpu);
		goto destroy;
	}
	memcpy(handle->bytes, &h, sizeof(h));
	*evp = ev;
	return 0;
destroy:
	cudaEventDestroy(ev->event);
free_ev:
	free(ev);
	return err;
}

static int cuda_event_create(aeg_device_t *dev, int gpu, void **evp, aeg_handle_t *handle)
{
	return ON_GPU(gpu, event_create_here(dev, gpu, evp, handle));
}

static int cuda_event_destroy(aeg_device_t *dev, void *evp)
{
	struct cuda_event *ev = evp;
	cudaError_t e = cudaEventDestroy(ev->event);

	free(ev);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaEventDestroy");
	return 0;
}

static int event_record_here(aeg_device_t *dev, void *evp, void *stream)
{
	struct cuda_event *ev = evp;
	struct cuda_stream *s = stream;
	cudaError_t e;

	e = cudaEventRecord(ev->event, s->stream);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaEventRecord on GPU %d", s->gpu);
	return 0;
}

static int cuda_event_record(aeg_device_t *dev, void *evp, void *stream)
{
	return ON_GPU(((struct cuda_stream *)stream)->gpu, event_record_here(dev, evp, stream));
}

static int cuda_event_query(aeg_device_t *dev, void *evp)
{
	struct cuda_event *ev = evp;
	cudaError_t e = cudaEventQuery(ev->event);

	if (e == cudaSuccess)
		return 0;
	if (e == cudaErrorNotReady) {
		(void)cudaGetLastError();
		return AEG_EBUSY;
	}
	return cfail(AEG_EDEVICE, e, "cudaEventQuery");
}

/*
 * CUDA has no timed event wait, and cudaEventSynchronize on an interprocess
 * event cannot be bounded: poll, spinning first (an opened event that is
 * already complete answers in a few microseconds), then sleeping in
 * proportion to the time waited (SPIN_NS above).
 */
static int cuda_event_wait(aeg_device_t *dev, void *evp, int timeout_ms)
{
	uint64_t start = aeg_now_ns(), deadline = start + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	int err;

	for (;;) {
		uint64_t now, waited;
		long nap;

		err = cuda_event_query(dev, evp);
		if (err != AEG_EBUSY)
			return err;
		if (timeout_ms == 0)
			break;
		now = aeg_now_ns();
		if (timeout_ms > 0 && now >= deadline)
			break;
		waited = now - start;
		if (waited >= SPIN_NS) {
			nap = (long)(waited / BACKOFF_SHARE);
			nap = nap < BACKOFF_MIN_NS ? BACKOFF_MIN_NS : nap > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : nap;
			if (timeout_ms > 0 && (uint64_t)nap > deadline - now)
				nap = (long)(deadline - now);
			nanosleep(&(struct timespec){ 0, nap }, NULL);
		}
	}
	return aeg_fail(AEG_ETIMEDOUT, "event not complete after %d ms", timeout_ms);
}

static int cuda_event_open(aeg_device_t *dev, const aeg_handle_t *handle, void **evp)
{
	struct cuda_event *ev;
	cudaIpcEventHandle_t h;
	cudaError_t e;

	ev = calloc(1, sizeof(*ev));
	if (ev == NULL)
		return aeg_fail(AEG_ENOMEM, "event handle: out of memory");
	ev->gpu = -1;
	memcpy(&h, handle->bytes, sizeof(h));
	e = cudaIpcOpenEventHandle(&ev->event, h);
	if (e != cudaSuccess) {
		free(ev);
		return cfail(AEG_EBADF, e, "cudaIpcOpenEventHandle (is the owner alive and the handle an event's?)");
	}
	*evp = ev;
	return 0;
}

static int cuda_event_close(aeg_device_t *dev, void *evp)
{
	return cuda_event_destroy(dev, evp);
}

static int stream_wait_event_here(aeg_device_t *dev, void *stream, void *evp)
{
	struct cuda_stream *s = stream;
	struct cuda_event *ev = evp;
	cudaError_t e;

	e = cudaStreamWaitEvent(s->stream, ev->event, 0);
	if (e != cudaSuccess)
		return cfail(AEG_EDEVICE, e, "cudaStreamWaitEvent on GPU %d", s->gpu);
	return 0;
}

static int cuda_stream_wait_event(aeg_device_t *dev, void *stream, void *evp)
{
	return ON_GPU(((struct cuda_stream *)stream)->gpu, stream_wait_event_here(dev, stream, evp));
}

const struct aeg_device_ops aeg_device_cuda_ops = {
	.name = "cuda",
	.init = cuda_init,
	.fini = cuda_fini,
	.gpu_info = cuda_gpu_info,
	.pci_bus_id = cuda_pci_bus_id,
	.mem_alloc = cuda_mem_alloc,
	.mem_free = cuda_mem_free,
	.mem_export = cuda_mem_export,
	.va_reserve = cuda_va_reserve,
	.va_map = cuda_va_map,
	.va_unmap = cuda_va_unmap,
	.va_release = cuda_va_release,
	.mem_open = cuda_mem_open,
	.mem_close = cuda_mem_close,
	.memcpy_sync = cuda_memcpy_sync,
	.memset_sync = cuda_memset_sync,
	.host_register = cuda_host_register,
	.host_unregister = cuda_host_unregister,
	.stream_create = cuda_stream_create,
	.stream_destroy = cuda_stream_destroy,
	.stream_sync = cuda_stream_sync,
	.stream_native = cuda_stream_native,
	.memcpy_async = cuda_memcpy_async,
	.memcpy2d_async = cuda_memcpy2d_async,
	.launch_host_fn = cuda_launch_host_fn,
	.event_create = cuda_event_create,
	.event_destroy = cuda_event_destroy,
	.event_record = cuda_event_record,
	.event_query = cuda_event_query,
	.event_wait = cuda_event_wait,
	.event_open = cuda_event_open,
	.event_close = cuda_event_close,
	.stream_wait_event = cuda_stream_wait_event,
	.event_fail = NULL,
};

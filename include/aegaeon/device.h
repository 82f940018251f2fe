/* aegaeon device backends (cuda, host), streams, copies and memory handles. */
#ifndef AEGAEON_DEVICE_H
#define AEGAEON_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include <aegaeon/config.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_device aeg_device_t;
typedef struct aeg_stream aeg_stream_t;

/* A 64-byte handle another process of the same user can open (CUDA IPC size). */
#define AEG_HANDLE_BYTES 64
#define AEG_HANDLE_HEX_LEN (2 * AEG_HANDLE_BYTES)
typedef struct aeg_handle {
	unsigned char bytes[AEG_HANDLE_BYTES];
} aeg_handle_t;

/* aeg_handle_to_hex - 128 lower-case hex digits and a NUL into @hex. */
void aeg_handle_to_hex(const aeg_handle_t *handle, char hex[AEG_HANDLE_HEX_LEN + 1]);
/* aeg_handle_from_hex - exactly 128 hex digits; AEG_EINVAL otherwise. */
int aeg_handle_from_hex(const char *hex, aeg_handle_t *handle);

struct aeg_gpu_info {
	int index;                  /* ordinal within this process's visible GPUs */
	char name[96];              /* "NVIDIA H100 80GB HBM3", "host" */
	uint64_t total_bytes;
	uint64_t free_bytes;
	char pci_bus_id[16];        /* "0000:3b:00.0"; empty when none */
};

/*
 * aeg_device_open - open a backend. AEG_DEVICE_CUDA fails with AEG_ENOTSUP
 * in a build without CUDA and AEG_EDEVICE (detail: the CUDA error) where no
 * usable driver or GPU exists; it never switches to the host backend.
 * The host backend keeps "GPU" memory in host memory; it shows
 * $AEGAEON_HOST_GPUS GPUs (default 1, at most 64), each with the PCI bus id
 * from the comma-separated $AEGAEON_HOST_PCI_BUS_IDS if set. A device is
 * thread-safe; close it after every object made from it is destroyed.
 */
int aeg_device_open(aeg_device_t **dev, enum aeg_device_kind kind);
void aeg_device_close(aeg_device_t *dev);
enum aeg_device_kind aeg_device_kind(const aeg_device_t *dev);
int aeg_device_count(aeg_device_t *dev, int *count);
/* aeg_device_gpu_info - AEG_ENODEV for an index out of range. */
int aeg_device_gpu_info(aeg_device_t *dev, int gpu, struct aeg_gpu_info *info);

/*
 * Streams order copies and event records, as CUDA streams do. On the host
 * backend a stream is a worker thread running its queue in order.
 */
int aeg_stream_create(aeg_device_t *dev, int gpu, aeg_stream_t **stream);
int aeg_stream_destroy(aeg_stream_t *stream);       /* waits for queued work */
int aeg_stream_sync(aeg_stream_t *stream);
/* aeg_stream_native - the cudaStream_t on the cuda backend, NULL on host. */
void *aeg_stream_native(aeg_stream_t *stream);

/*
 * aeg_memcpy_async - queue a copy of @bytes on @stream; direction follows
 * from the pointers (unified addressing). Host memory must stay valid until
 * the stream passes the copy.
 */
int aeg_memcpy_async(aeg_stream_t *stream, void *dst, const void *src, size_t bytes);

/*
 * aeg_memcpy2d_async - queue a copy of @height rows of @width bytes, from
 * rows @spitch apart at @src to rows @dpitch apart at @dst (cudaMemcpy2DAsync:
 * how a column slice of a matrix is gathered in one call). AEG_EINVAL when
 * @width exceeds a pitch; nothing to do when @width or @height is 0.
 */
int aeg_memcpy2d_async(aeg_stream_t *stream, void *dst, size_t dpitch, const void *src, size_t spitch,
		       size_t width, size_t height);

/* Device memory outside a slab (used by slabs and tests). */
int aeg_mem_alloc(aeg_device_t *dev, int gpu, uint64_t bytes, void **ptr);
int aeg_mem_free(aeg_device_t *dev, int gpu, void *ptr);
int aeg_memcpy(aeg_device_t *dev, void *dst, const void *src, size_t bytes);  /* synchronous */
int aeg_memset(aeg_device_t *dev, void *dst, int value, size_t bytes);        /* synchronous */

/*
 * Memory IPC: export an allocation made by aeg_mem_alloc (its base pointer)
 * and open it in another process of the same user. A handle made in this
 * process opens to the same pointer. Close with aeg_mem_close_handle.
 * Errors: AEG_EBADF for a handle that is not valid (or whose owner is gone).
 */
int aeg_mem_export(aeg_device_t *dev, void *ptr, aeg_handle_t *handle);
int aeg_mem_open_handle(aeg_device_t *dev, int gpu, const aeg_handle_t *handle, void **ptr);
int aeg_mem_close_handle(aeg_device_t *dev, void *ptr);

/*
 * Page-locking host memory: register @bytes at @ptr (portable, mapped;
 * AEG_HOST_REGISTER_READONLY for read-only mappings such as a file's
 * pages). The host backend pins nothing but checks what CUDA checks: the
 * range is mapped (else AEG_EINVAL), overlaps no registered range (else
 * AEG_EEXIST), and unregistering takes a registered range's start (else
 * AEG_EINVAL). The cuda backend never changes the calling thread's current
 * device: each call sets the GPU it needs and restores the caller's.
 */
#define AEG_HOST_REGISTER_READONLY 0x1u
int aeg_host_register(aeg_device_t *dev, void *ptr, size_t bytes, unsigned flags);
int aeg_host_unregister(aeg_device_t *dev, void *ptr);

#ifdef __cplusplus
}
#endif
#endif

/*
 * The host device backend's shared parts: its handles and per-device state
 * (device_host.c) and the calls of its streams and events
 * (device_host_stream.c), which the backend's table lists. Private to core.
 */
#ifndef AEGAEON_DEVICE_HOST_H
#define AEGAEON_DEVICE_HOST_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "device_internal.h"

#define HOST_MAX_GPUS 64
#define HOST_HANDLE_VERSION 1

/*
 * What a host handle holds. The owner's start time tells a reused pid from
 * the owner; the inode tells a reused descriptor number from the memfd that
 * was exported.
 */
struct host_handle {
	char magic[4];          /* "AEGM" memory, "AEGE" event */
	uint32_t version;
	uint32_t pid;
	uint32_t uid;
	uint64_t start_time;    /* /proc/<pid>/stat field 22 */
	int32_t fd;             /* in the owner process */
	uint32_t gpu;
	uint64_t bytes;
	uint64_t ino;
	unsigned char zero[16];
};
_Static_assert(sizeof(struct host_handle) == AEG_HANDLE_BYTES, "host handle must fill 64 bytes");

struct host_impl {
	pthread_mutex_t lock;   /* guards the three lists */
	struct host_alloc *allocs;
	struct host_mapping *mappings;
	struct host_range *registered;
	uint64_t start_time;    /* of this process */
	uint64_t total_bytes;
	char pci[HOST_MAX_GPUS][16];
};

static inline struct host_impl *impl_of(aeg_device_t *dev)
{
	return dev->impl;
}

/* A handle of this process's memfd @fd (@magic "AEGM" memory, "AEGE" event). */
void host_make_handle(const struct host_impl *h, const char *magic, int fd, int gpu, uint64_t bytes, uint64_t ino,
		      aeg_handle_t *handle);
/* @handle read into @hh, checked (AEG_EBADF naming @what when it is no handle of @magic or of this user). */
int host_parse_handle(const aeg_handle_t *handle, const char *magic, const char *what, struct host_handle *hh);
/* The owner's memfd of @hh, opened through /proc and proved the one exported (AEG_EBADF otherwise). */
int host_open_owner_fd(const struct host_handle *hh, const char *what, int *fdp);

/* How many host ranges @dev (a host device) holds registered: tests see that none are left behind. */
size_t host_registered_ranges(aeg_device_t *dev);

/* device_host_stream.c: the table's stream and event calls. */
int host_stream_create(aeg_device_t *dev, int gpu, void **streamp);
int host_stream_destroy(aeg_device_t *dev, void *stream);
int host_stream_sync(aeg_device_t *dev, void *stream);
int host_memcpy_async(aeg_device_t *dev, void *stream, void *dst, const void *src, size_t bytes);
int host_memcpy2d_async(aeg_device_t *dev, void *stream, void *dst, size_t dpitch, const void *src, size_t spitch,
			size_t width, size_t height);
int host_launch_host_fn(aeg_device_t *dev, void *stream, void (*fn)(void *), void *arg);
int host_event_create(aeg_device_t *dev, int gpu, void **evp, aeg_handle_t *handle);
int host_event_destroy(aeg_device_t *dev, void *ev);
int host_event_record(aeg_device_t *dev, void *evp, void *stream);
int host_event_arm(aeg_device_t *dev, void *evp);
int host_event_query(aeg_device_t *dev, void *evp);
int host_event_wait(aeg_device_t *dev, void *evp, int timeout_ms);
int host_event_open(aeg_device_t *dev, const aeg_handle_t *handle, void **evp);
int host_event_close(aeg_device_t *dev, void *ev);
int host_stream_wait_event(aeg_device_t *dev, void *stream, void *evp);
int host_event_fail(aeg_device_t *dev, void *evp, int err);

#endif

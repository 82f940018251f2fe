/* The device backend interface: what cuda and host each implement. */
#ifndef AEGAEON_DEVICE_INTERNAL_H
#define AEGAEON_DEVICE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <aegaeon/device.h>
#include <aegaeon/event.h>
#include <aegaeon/topo.h>

/*
 * One table per backend. Every function returns 0 or an AEG_E* code with a
 * detail set (for CUDA: the call's name and cudaGetErrorString). Opaque
 * backend objects are plain void pointers: cudaStream_t / cudaEvent_t on
 * cuda, the host backend's own structs on host. device.c validates the
 * arguments the public API promises to check (NULL, gpu range) before a
 * backend is called.
 */
struct aeg_device_ops {
	const char *name;
	int (*init)(aeg_device_t *dev);         /* sets dev->gpu_count and dev->impl */
	void (*fini)(aeg_device_t *dev);
	int (*gpu_info)(aeg_device_t *dev, int gpu, struct aeg_gpu_info *info);
	/* The GPU's PCI bus id without touching the GPU itself (no CUDA context); NULL: from gpu_info. */
	int (*pci_bus_id)(aeg_device_t *dev, int gpu, char id[AEG_PCI_BUS_ID_LEN]);

	int (*mem_alloc)(aeg_device_t *dev, int gpu, uint64_t bytes, void **ptr);
	int (*mem_free)(aeg_device_t *dev, int gpu, void *ptr);
	int (*mem_export)(aeg_device_t *dev, void *ptr, aeg_handle_t *handle);
	int (*mem_open)(aeg_device_t *dev, int gpu, const aeg_handle_t *handle, void **ptr);
	int (*mem_close)(aeg_device_t *dev, void *ptr);
	/*
	 * Address space with memory mapped into it piece by piece (a slab that
	 * is reserved at once and backed as it is used): va_reserve takes
	 * @bytes of addresses rounded up to *@granularity, which it gives
	 * (every piece is a multiple of it too), va_map backs [@addr, @addr + @bytes) of a reservation with memory
	 * of the GPU, va_unmap gives one such piece back (the same range
	 * va_map mapped), va_release the reservation, every piece unmapped.
	 * NULL where the backend has none.
	 */
	int (*va_reserve)(aeg_device_t *dev, int gpu, uint64_t bytes, uint64_t *granularity, void **base);
	int (*va_map)(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes);
	int (*va_unmap)(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes);
	int (*va_release)(aeg_device_t *dev, int gpu, void *base, uint64_t bytes);
	int (*memcpy_sync)(aeg_device_t *dev, void *dst, const void *src, size_t bytes);
	int (*memset_sync)(aeg_device_t *dev, void *dst, int value, size_t bytes);

	int (*host_register)(aeg_device_t *dev, void *ptr, size_t bytes, unsigned flags);
	int (*host_unregister)(aeg_device_t *dev, void *ptr);

	int (*stream_create)(aeg_device_t *dev, int gpu, void **stream);
	int (*stream_destroy)(aeg_device_t *dev, void *stream);
	int (*stream_sync)(aeg_device_t *dev, void *stream);
	void *(*stream_native)(void *stream);  /* the cudaStream_t; NULL on host */
	int (*memcpy_async)(aeg_device_t *dev, void *stream, void *dst, const void *src, size_t bytes);
	int (*memcpy2d_async)(aeg_device_t *dev, void *stream, void *dst, size_t dpitch, const void *src,
			      size_t spitch, size_t width, size_t height);
	/* Run @fn(@arg) on the host once @stream reaches this point. @fn must not call into the stream. */
	int (*launch_host_fn)(aeg_device_t *dev, void *stream, void (*fn)(void *), void *arg);

	int (*event_create)(aeg_device_t *dev, int gpu, void **ev, aeg_handle_t *handle);
	int (*event_destroy)(aeg_device_t *dev, void *ev);
	int (*event_record)(aeg_device_t *dev, void *ev, void *stream);
	/*
	 * Mark @ev "will be recorded" where other processes see it, so their
	 * waits on its handle stay pending until the record; NULL when the
	 * backend's events carry no state (cuda: the agent tells them).
	 */
	int (*event_arm)(aeg_device_t *dev, void *ev);
	/* 0, AEG_EBUSY, or the failure code of a failed event (host only). */
	int (*event_query)(aeg_device_t *dev, void *ev);
	int (*event_wait)(aeg_device_t *dev, void *ev, int timeout_ms);
	int (*event_open)(aeg_device_t *dev, const aeg_handle_t *handle, void **ev);
	int (*event_close)(aeg_device_t *dev, void *ev);
	int (*stream_wait_event)(aeg_device_t *dev, void *stream, void *ev);
	/*
	 * Publish a failure code (0 clears it) where other processes can see
	 * it. NULL when the backend's events carry no status (cuda): the code
	 * then lives in struct aeg_event only.
	 */
	int (*event_fail)(aeg_device_t *dev, void *ev, int err);
};

/* Buckets of the per-device event table (own events and cached openings). */
#define AEG_EVENT_FAILED_KEPT 256      /* failed events remembered after their destruction */
#define AEG_EVENT_BUCKETS 256

struct aeg_event;               /* event.c */

/*
 * One handle the device knows: an event of this process (@local) or an
 * opening of another process's handle (@opened). @refs counts the table's
 * reference and the waits in flight, so a wait never sees its event freed
 * under it by aeg_event_destroy or aeg_event_close_handle. The table is the
 * device's (device.c: found, added, removed, and its openings closed with
 * the device); event.c gives the entries their meaning.
 */
struct aeg_event_entry {
	aeg_handle_t handle;
	struct aeg_event *local;
	void *opened;
	unsigned refs;
	int recorded_seen;      /* the agent said it is recorded (or is not one of its): ask no more */
	struct aeg_event_entry *next;
};

/*
 * aeg_event_resolver_fn - asked before a wait on another process's event
 * handle that this device has not seen recorded yet, because a backend's
 * handle may not tell whether its event is recorded (CUDA IPC events carry
 * no state: one never recorded counts as complete). It waits, at most
 * @timeout_ms (< 0: no limit), until the event behind @handle is recorded:
 * 0 then (the backend wait follows), AEG_ENOENT when the handle is not one
 * it knows (its owner records it: the backend wait follows), or an error
 * the wait returns (the event's failure code, AEG_ETIMEDOUT, AEG_EIO).
 */
typedef int (*aeg_event_resolver_fn)(void *ctx, const aeg_handle_t *handle, int timeout_ms);

struct aeg_device {
	const struct aeg_device_ops *ops;
	enum aeg_device_kind kind;
	int gpu_count;
	void *impl;                     /* backend private state */
	pthread_mutex_t lock;           /* guards events[] and the counters below */
	/* Keyed by the 64 handle bytes: this process's events and opened handles. */
	struct aeg_event_entry *events[AEG_EVENT_BUCKETS];
	/*
	 * Events of this process destroyed while failed (a cancelled load's
	 * chunks, released): a wait through the agent that comes just after the
	 * release is told the failure, not that the handle is unknown.
	 */
	struct {
		aeg_handle_t handle;
		int code;
	} failed_gone[AEG_EVENT_FAILED_KEPT];
	unsigned failed_gone_next;
	uint64_t event_opens;           /* backend event_open calls that succeeded */
	uint64_t event_cached;          /* openings held in events[] now */
	/* Installed by a layer above (the job's attach: its agent); NULL: the backend alone. */
	aeg_event_resolver_fn resolver;
	void *resolver_ctx;
};

struct aeg_stream {
	aeg_device_t *dev;
	int gpu;
	void *impl;
};

extern const struct aeg_device_ops aeg_device_host_ops;
#ifdef HAVE_CUDA
extern const struct aeg_device_ops aeg_device_cuda_ops;
#endif

/* Validate @gpu against the device; AEG_ENODEV with a detail otherwise. */
int aeg_device_check_gpu(aeg_device_t *dev, int gpu);

/* aeg_device_pci_bus_id - GPU @gpu's PCI bus id, without making its CUDA context (device.c). */
int aeg_device_pci_bus_id(aeg_device_t *dev, int gpu, char id[AEG_PCI_BUS_ID_LEN]);

/*
 * The backend's va_* calls (see struct aeg_device_ops), the GPU checked;
 * aeg_va_reserve is AEG_ENOTSUP where the backend or the GPU has no
 * virtual memory management.
 */
int aeg_va_reserve(aeg_device_t *dev, int gpu, uint64_t bytes, uint64_t *granularity, void **base);
int aeg_va_map(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes);
int aeg_va_unmap(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes);
int aeg_va_release(aeg_device_t *dev, int gpu, void *base, uint64_t bytes);

/* Queue @fn on @stream (see launch_host_fn). */
int aeg_stream_launch_host_fn(aeg_stream_t *stream, void (*fn)(void *), void *arg);

/*
 * aeg_event_wait_recorded - wait until this process's event behind @handle
 * is no longer armed (aeg_event_arm): 0 once recorded, its failure code,
 * AEG_ETIMEDOUT, or AEG_ENOENT when no event of this process has @handle.
 * The agent serves PROTO_WAIT_EVENT with it.
 */
int aeg_event_wait_recorded(aeg_device_t *dev, const aeg_handle_t *handle, int timeout_ms);

/*
 * aeg_device_set_event_resolver - have waits by handle on @dev ask @fn
 * (with @ctx) first; NULL for none (a device starts with none). Call before
 * the device's first wait by handle; @ctx must outlive the device.
 */
void aeg_device_set_event_resolver(aeg_device_t *dev, aeg_event_resolver_fn fn, void *ctx);

/*
 * The device's table of event handles (device.c), each with dev->lock held:
 * aeg_event_table_lookup - the entry of @handle, or NULL.
 * aeg_event_table_insert - add @e (its handle not in the table yet).
 * aeg_event_table_unlink - take @e out; its references stay the caller's.
 */
struct aeg_event_entry *aeg_event_table_lookup(aeg_device_t *dev, const aeg_handle_t *handle);
void aeg_event_table_insert(aeg_device_t *dev, struct aeg_event_entry *e);
void aeg_event_table_unlink(aeg_device_t *dev, struct aeg_event_entry *e);

/*
 * aeg_device_event_stats - backend opens of event handles made so far and
 * openings cached now; tests use them to see that a second wait reuses the
 * first opening.
 */
void aeg_device_event_stats(aeg_device_t *dev, uint64_t *opens, uint64_t *cached);

/* Helpers shared by the backends (device.c). */

/*
 * aeg_proc_stat - from /proc/<pid>/stat: the state (field 3: 'R', 'S', 'Z'...),
 * the parent (field 4) and the start time (field 22, clock ticks since boot);
 * any pointer may be NULL. AEG_ENOENT once the process is gone, AEG_EIO.
 * aeg_proc_start_time - the start time alone.
 */
int aeg_proc_stat(pid_t pid, char *state, pid_t *ppid, uint64_t *start);
int aeg_proc_start_time(pid_t pid, uint64_t *start);

/*
 * aeg_proc_alive - 1 while process @pid started at @start (field 22) runs;
 * 0 once it exited (a zombie counts as exited) or the pid names another
 * process now.
 */
int aeg_proc_alive(pid_t pid, uint64_t start);

/* MemAvailable of /proc/meminfo in bytes. */
int aeg_mem_available(uint64_t *bytes);

#endif

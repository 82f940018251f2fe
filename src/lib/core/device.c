/* The public device API: argument checks, then dispatch to the backend's vtable; the table of event handles. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "device_internal.h"
#include "internal.h"

AEG_EXPORT int aeg_device_open(aeg_device_t **devp, enum aeg_device_kind kind)
{
	const struct aeg_device_ops *ops;
	aeg_device_t *dev;
	int err;

	if (devp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_device_open: no result pointer");
	*devp = NULL;
	switch (kind) {
	case AEG_DEVICE_HOST:
		ops = &aeg_device_host_ops;
		break;
	case AEG_DEVICE_CUDA:
#ifdef HAVE_CUDA
		ops = &aeg_device_cuda_ops;
		break;
#else
		return aeg_fail(AEG_ENOTSUP,
				"device \"cuda\": this build of aegaeon has no CUDA backend "
				"(configure --with-cuda=DIR); use device \"host\" for tests");
#endif
	default:
		return aeg_fail(AEG_EINVAL, "device kind %d: expected cuda (%d) or host (%d)",
				(int)kind, AEG_DEVICE_CUDA, AEG_DEVICE_HOST);
	}

	dev = calloc(1, sizeof(*dev));
	if (dev == NULL)
		return aeg_fail(AEG_ENOMEM, "device: out of memory");
	dev->ops = ops;
	dev->kind = kind;
	err = pthread_mutex_init(&dev->lock, NULL);
	if (err != 0) {
		free(dev);
		return aeg_fail(AEG_ENOMEM, "device: pthread_mutex_init: %s", strerror(err));
	}
	err = ops->init(dev);
	if (err < 0) {
		aeg_error_prefix("opening the %s device", ops->name);
		pthread_mutex_destroy(&dev->lock);
		free(dev);
		return err;
	}
	*devp = dev;
	return 0;
}

static unsigned bucket_of(const aeg_handle_t *handle)
{
	uint32_t h = 2166136261u;       /* FNV-1a */

	for (int i = 0; i < AEG_HANDLE_BYTES; i++) {
		h ^= handle->bytes[i];
		h *= 16777619u;
	}
	return h % AEG_EVENT_BUCKETS;
}

struct aeg_event_entry *aeg_event_table_lookup(aeg_device_t *dev, const aeg_handle_t *handle)
{
	for (struct aeg_event_entry *e = dev->events[bucket_of(handle)]; e != NULL; e = e->next)
		if (memcmp(e->handle.bytes, handle->bytes, AEG_HANDLE_BYTES) == 0)
			return e;
	return NULL;
}

void aeg_event_table_insert(aeg_device_t *dev, struct aeg_event_entry *e)
{
	unsigned b = bucket_of(&e->handle);

	e->next = dev->events[b];
	dev->events[b] = e;
	if (e->local == NULL)
		dev->event_cached++;
}

void aeg_event_table_unlink(aeg_device_t *dev, struct aeg_event_entry *e)
{
	struct aeg_event_entry **pp;

	for (pp = &dev->events[bucket_of(&e->handle)]; *pp != NULL; pp = &(*pp)->next) {
		if (*pp == e) {
			*pp = e->next;
			break;
		}
	}
	if (e->local == NULL)
		dev->event_cached--;
}

/*
 * Close every cached opening of another process's event handle. Events of
 * this process are their owners' to destroy: a device closed with some
 * left says so.
 */
static void close_openings(aeg_device_t *dev)
{
	struct aeg_event_entry *dead = NULL;
	unsigned live = 0;

	pthread_mutex_lock(&dev->lock);
	for (int b = 0; b < AEG_EVENT_BUCKETS; b++) {
		struct aeg_event_entry *e = dev->events[b], *next;

		for (; e != NULL; e = next) {
			next = e->next;
			if (e->local != NULL) {
				live++;
				continue;
			}
			aeg_event_table_unlink(dev, e);
			if (--e->refs == 0) {
				e->next = dead;
				dead = e;
			}
		}
	}
	pthread_mutex_unlock(&dev->lock);
	if (live != 0)
		aeg_warn("device closed with %u event%s not destroyed", live, live == 1 ? "" : "s");
	while (dead != NULL) {
		struct aeg_event_entry *e = dead;

		dead = e->next;
		dev->ops->event_close(dev, e->opened);
		free(e);
	}
}

void aeg_device_set_event_resolver(aeg_device_t *dev, aeg_event_resolver_fn fn, void *ctx)
{
	dev->resolver = fn;
	dev->resolver_ctx = ctx;
}

void aeg_device_event_stats(aeg_device_t *dev, uint64_t *opens, uint64_t *cached)
{
	pthread_mutex_lock(&dev->lock);
	if (opens != NULL)
		*opens = dev->event_opens;
	if (cached != NULL)
		*cached = dev->event_cached;
	pthread_mutex_unlock(&dev->lock);
}

AEG_EXPORT void aeg_device_close(aeg_device_t *dev)
{
	if (dev == NULL)
		return;
	close_openings(dev);
	dev->ops->fini(dev);
	pthread_mutex_destroy(&dev->lock);
	free(dev);
}

AEG_EXPORT enum aeg_device_kind aeg_device_kind(const aeg_device_t *dev)
{
	return dev->kind;
}

AEG_EXPORT int aeg_device_count(aeg_device_t *dev, int *count)
{
	if (dev == NULL || count == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_device_count: NULL argument");
	*count = dev->gpu_count;
	return 0;
}

int aeg_device_check_gpu(aeg_device_t *dev, int gpu)
{
	if (gpu < 0 || gpu >= dev->gpu_count)
		return aeg_fail(AEG_ENODEV, "GPU %d does not exist: the %s device shows %d GPU%s (0..%d)",
				gpu, dev->ops->name, dev->gpu_count, dev->gpu_count == 1 ? "" : "s",
				dev->gpu_count - 1);
	return 0;
}

AEG_EXPORT int aeg_device_gpu_info(aeg_device_t *dev, int gpu, struct aeg_gpu_info *info)
{
	int err;

	if (dev == NULL || info == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_device_gpu_info: NULL argument");
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	memset(info, 0, sizeof(*info));
	info->index = gpu;
	return dev->ops->gpu_info(dev, gpu, info);
}

/*
 * GPU @gpu's PCI bus id ("0000:3b:00.0"). Cheaper than aeg_device_gpu_info
 * on cuda, which makes the GPU's context (hundreds of MiB of its memory) to
 * read the free memory: a process that only needs to tell the GPUs apart
 * (a job client finding its slabs' GPUs) makes none.
 */
int aeg_device_pci_bus_id(aeg_device_t *dev, int gpu, char id[AEG_PCI_BUS_ID_LEN])
{
	struct aeg_gpu_info info;
	int err;

	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	if (dev->ops->pci_bus_id != NULL)
		return dev->ops->pci_bus_id(dev, gpu, id);
	err = aeg_device_gpu_info(dev, gpu, &info);
	if (err == 0)
		memcpy(id, info.pci_bus_id, AEG_PCI_BUS_ID_LEN);
	return err;
}

AEG_EXPORT void aeg_handle_to_hex(const aeg_handle_t *handle, char hex[AEG_HANDLE_HEX_LEN + 1])
{
	static const char digits[] = "0123456789abcdef";

	for (int i = 0; i < AEG_HANDLE_BYTES; i++) {
		hex[2 * i] = digits[handle->bytes[i] >> 4];
		hex[2 * i + 1] = digits[handle->bytes[i] & 0xf];
	}
	hex[AEG_HANDLE_HEX_LEN] = '\0';
}

static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

AEG_EXPORT int aeg_handle_from_hex(const char *hex, aeg_handle_t *handle)
{
	aeg_handle_t h;
	size_t len;

	if (hex == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_handle_from_hex: NULL argument");
	len = strnlen(hex, AEG_HANDLE_HEX_LEN + 1);
	if (len != AEG_HANDLE_HEX_LEN) {
		char shown[21];
		size_t n = len < 20 ? len : 20;

		/* Handles come from command lines and the environment: no escapes into a terminal or log. */
		for (size_t i = 0; i < n; i++)
			shown[i] = isprint((unsigned char)hex[i]) ? hex[i] : '?';
		shown[n] = '\0';
		return aeg_fail(AEG_EINVAL, "handle \"%s%s\": %s%zu hex digits, expected %d",
				shown, len > 20 ? "..." : "", len > AEG_HANDLE_HEX_LEN ? "more than " : "",
				len, AEG_HANDLE_HEX_LEN);
	}
	for (int i = 0; i < AEG_HANDLE_BYTES; i++) {
		int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);

		if (hi < 0 || lo < 0) {
			int at = hi < 0 ? 2 * i : 2 * i + 1;
			unsigned char c = (unsigned char)hex[at];

			if (isprint(c))
				return aeg_fail(AEG_EINVAL, "handle: '%c' at position %d is not a hex digit",
						c, at);
			return aeg_fail(AEG_EINVAL, "handle: byte 0x%02x at position %d is not a hex digit",
					c, at);
		}
		h.bytes[i] = (unsigned char)(hi << 4 | lo);
	}
	*handle = h;
	return 0;
}

AEG_EXPORT int aeg_stream_create(aeg_device_t *dev, int gpu, aeg_stream_t **streamp)
{
	aeg_stream_t *stream;
	int err;

	if (dev == NULL || streamp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_stream_create: NULL argument");
	*streamp = NULL;
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	stream = calloc(1, sizeof(*stream));
	if (stream == NULL)
		return aeg_fail(AEG_ENOMEM, "stream: out of memory");
	stream->dev = dev;
	stream->gpu = gpu;
	err = dev->ops->stream_create(dev, gpu, &stream->impl);
	if (err < 0) {
		free(stream);
		return err;
	}
	*streamp = stream;
	return 0;
}

AEG_EXPORT int aeg_stream_destroy(aeg_stream_t *stream)
{
	int err;

	if (stream == NULL)
		return 0;
	err = stream->dev->ops->stream_destroy(stream->dev, stream->impl);
	free(stream);
	return err;
}

AEG_EXPORT int aeg_stream_sync(aeg_stream_t *stream)
{
	if (stream == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_stream_sync: NULL stream");
	return stream->dev->ops->stream_sync(stream->dev, stream->impl);
}

AEG_EXPORT void *aeg_stream_native(aeg_stream_t *stream)
{
	if (stream == NULL || stream->dev->ops->stream_native == NULL)
		return NULL;
	return stream->dev->ops->stream_native(stream->impl);
}

AEG_EXPORT int aeg_memcpy_async(aeg_stream_t *stream, void *dst, const void *src, size_t bytes)
{
	if (stream == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy_async: NULL stream");
	if (bytes == 0)
		return 0;
	if (dst == NULL || src == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy_async: NULL %s pointer for %zu bytes",
				dst == NULL ? "destination" : "source", bytes);
	return stream->dev->ops->memcpy_async(stream->dev, stream->impl, dst, src, bytes);
}

AEG_EXPORT int aeg_memcpy2d_async(aeg_stream_t *stream, void *dst, size_t dpitch, const void *src,
				  size_t spitch, size_t width, size_t height)
{
	if (stream == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy2d_async: NULL stream");
	if (width == 0 || height == 0)
		return 0;
	if (dst == NULL || src == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy2d_async: NULL %s pointer for %zu rows of %zu bytes",
				dst == NULL ? "destination" : "source", height, width);
	if (width > dpitch || width > spitch)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy2d_async: rows of %zu bytes wider than the %s pitch of %zu",
				width, width > dpitch ? "destination" : "source", width > dpitch ? dpitch : spitch);
	return stream->dev->ops->memcpy2d_async(stream->dev, stream->impl, dst, dpitch, src, spitch, width, height);
}

int aeg_stream_launch_host_fn(aeg_stream_t *stream, void (*fn)(void *), void *arg)
{
	if (stream == NULL || fn == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_stream_launch_host_fn: NULL argument");
	return stream->dev->ops->launch_host_fn(stream->dev, stream->impl, fn, arg);
}

AEG_EXPORT int aeg_mem_alloc(aeg_device_t *dev, int gpu, uint64_t bytes, void **ptr)
{
	int err;

	if (dev == NULL || ptr == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_mem_alloc: NULL argument");
	*ptr = NULL;
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "device memory: 0 bytes asked on GPU %d", gpu);
	return dev->ops->mem_alloc(dev, gpu, bytes, ptr);
}

AEG_EXPORT int aeg_mem_free(aeg_device_t *dev, int gpu, void *ptr)
{
	int err;

	if (dev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_mem_free: NULL device");
	if (ptr == NULL)
		return 0;
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	return dev->ops->mem_free(dev, gpu, ptr);
}

AEG_EXPORT int aeg_memcpy(aeg_device_t *dev, void *dst, const void *src, size_t bytes)
{
	if (dev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy: NULL device");
	if (bytes == 0)
		return 0;
	if (dst == NULL || src == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memcpy: NULL %s pointer for %zu bytes",
				dst == NULL ? "destination" : "source", bytes);
	return dev->ops->memcpy_sync(dev, dst, src, bytes);
}

AEG_EXPORT int aeg_memset(aeg_device_t *dev, void *dst, int value, size_t bytes)
{
	if (dev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memset: NULL device");
	if (bytes == 0)
		return 0;
	if (dst == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_memset: NULL pointer for %zu bytes", bytes);
	return dev->ops->memset_sync(dev, dst, value, bytes);
}

AEG_EXPORT int aeg_mem_export(aeg_device_t *dev, void *ptr, aeg_handle_t *handle)
{
	if (dev == NULL || ptr == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_mem_export: NULL argument");
	return dev->ops->mem_export(dev, ptr, handle);
}

AEG_EXPORT int aeg_mem_open_handle(aeg_device_t *dev, int gpu, const aeg_handle_t *handle, void **ptr)
{
	int err;

	if (dev == NULL || handle == NULL || ptr == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_mem_open_handle: NULL argument");
	*ptr = NULL;
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	return dev->ops->mem_open(dev, gpu, handle, ptr);
}

AEG_EXPORT int aeg_mem_close_handle(aeg_device_t *dev, void *ptr)
{
	if (dev == NULL || ptr == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_mem_close_handle: NULL argument");
	return dev->ops->mem_close(dev, ptr);
}

int aeg_va_reserve(aeg_device_t *dev, int gpu, uint64_t bytes, uint64_t *granularity, void **base)
{
	int err = aeg_device_check_gpu(dev, gpu);

	if (err < 0)
		return err;
	if (dev->ops->va_reserve == NULL)
		return aeg_fail(AEG_ENOTSUP, "the %s device reserves no address space", dev->ops->name);
	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "address reservation of 0 bytes");
	return dev->ops->va_reserve(dev, gpu, bytes, granularity, base);
}

int aeg_va_map(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	return dev->ops->va_map(dev, gpu, addr, bytes);
}

int aeg_va_unmap(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	return dev->ops->va_unmap(dev, gpu, addr, bytes);
}

int aeg_va_release(aeg_device_t *dev, int gpu, void *base, uint64_t bytes)
{
	return dev->ops->va_release(dev, gpu, base, bytes);
}

/* Loads in flight in this process (internal.h says who counts and who asks). */
static int loads_active;

void aeg_loads_begin(void)
{
	__atomic_add_fetch(&loads_active, 1, __ATOMIC_RELAXED);
}

void aeg_loads_end(void)
{
	__atomic_sub_fetch(&loads_active, 1, __ATOMIC_RELAXED);
}

int aeg_loads_active(void)
{
	return __atomic_load_n(&loads_active, __ATOMIC_RELAXED);
}

AEG_EXPORT int aeg_host_register(aeg_device_t *dev, void *ptr, size_t bytes, unsigned flags)
{
	if (dev == NULL || ptr == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_host_register: NULL argument");
	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "host register: 0 bytes at %p", ptr);
	if (flags & ~AEG_HOST_REGISTER_READONLY)
		return aeg_fail(AEG_EINVAL, "host register: unknown flags 0x%x", flags);
	return dev->ops->host_register(dev, ptr, bytes, flags);
}

AEG_EXPORT int aeg_host_unregister(aeg_device_t *dev, void *ptr)
{
	if (dev == NULL || ptr == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_host_unregister: NULL argument");
	return dev->ops->host_unregister(dev, ptr);
}

int aeg_proc_stat(pid_t pid, char *state, pid_t *ppid, uint64_t *start)
{
	char path[64], buf[1024], *p, st;
	unsigned long long value;
	ssize_t n;
	int parent;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "re");
	if (f == NULL)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EIO, "%s: %s", path, strerror(errno));
	n = (ssize_t)fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	if (n <= 0)
		return aeg_fail(AEG_EIO, "%s: empty", path);
	buf[n] = '\0';
	/* The command name (field 2) may hold spaces and parentheses: skip past its last ')'. */
	p = strrchr(buf, ')');
	if (p == NULL)
		return aeg_fail(AEG_EIO, "%s: no command field", path);
	if (sscanf(p + 1, " %c %d", &st, &parent) != 2)
		return aeg_fail(AEG_EIO, "%s: no state or parent", path);
	p++;
	/* Fields 3..21 precede the start time. */
	for (int field = 3; field <= 22; field++) {
		while (*p == ' ')
			p++;
		if (*p == '\0')
			return aeg_fail(AEG_EIO, "%s: only %d fields", path, field - 1);
		if (field == 22)
			break;
		while (*p != ' ' && *p != '\0')
			p++;
	}
	if (sscanf(p, "%llu", &value) != 1)
		return aeg_fail(AEG_EIO, "%s: field 22 is not a number", path);
	if (state != NULL)
		*state = st;
	if (ppid != NULL)
		*ppid = parent;
	if (start != NULL)
		*start = value;
	return 0;
}

int aeg_proc_start_time(pid_t pid, uint64_t *start)
{
	return aeg_proc_stat(pid, NULL, NULL, start);
}

int aeg_proc_alive(pid_t pid, uint64_t start)
{
	uint64_t now;
	char state;

	return aeg_proc_stat(pid, &state, NULL, &now) == 0 && now == start && state != 'Z' && state != 'X';
}

int aeg_mem_available(uint64_t *bytes)
{
	char line[256];
	unsigned long long kib;
	int found = 0;
	FILE *f;

	f = fopen("/proc/meminfo", "re");
	if (f == NULL)
		return aeg_fail(AEG_EIO, "/proc/meminfo: %s", strerror(errno));
	while (fgets(line, sizeof(line), f) != NULL) {
		if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) {
			found = 1;
			break;
		}
	}
	fclose(f);
	if (!found)
		return aeg_fail(AEG_EIO, "/proc/meminfo: no MemAvailable line");
	*bytes = (uint64_t)kib * 1024;
	return 0;
}

/* The host device backend: "GPU" memory in memfds, its handles, and the backend's table (device_host_stream.c: streams, events). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "device_host.h"
#include "device_internal.h"
#include "internal.h"

#define HOST_MAX_GPUS 64

/* An allocation of this process. */
struct host_alloc {
	void *ptr;
	uint64_t bytes;
	int gpu;
	int fd;
	uint64_t ino;
	unsigned opens;         /* aeg_mem_open_handle of its own handle */
	struct host_alloc *next;
};

/* Another process's allocation mapped here, shared by repeated opens. */
struct host_mapping {
	pid_t pid;
	uint64_t start_time;            /* the owner's */
	uint64_t ino;
	void *ptr;
	uint64_t bytes;
	unsigned refs;
	struct host_mapping *next;
};

struct host_range {
	uintptr_t start, end;
	struct host_range *next;
};

/* ---------------------------------------------------------------- device */

static int parse_gpu_count(int *count)
{
	const char *text = getenv("AEGAEON_HOST_GPUS");
	char *end, q[64];
	long n;

	*count = 1;
	if (text == NULL || *text == '\0')
		return 0;
	errno = 0;
	n = strtol(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || n < 1 || n > HOST_MAX_GPUS)
		return aeg_fail(AEG_EINVAL, "AEGAEON_HOST_GPUS=\"%s\": expected a whole number from 1 to %d",
				aeg_quote(text, q, sizeof(q)), HOST_MAX_GPUS);
	*count = (int)n;
	return 0;
}

/* "[dddd:]bb:dd.f" in any case to "dddd:bb:dd.f" in lower case. */
static int parse_pci(const char *text, size_t len, char out[16])
{
	unsigned domain = 0, bus, device, function;
	char buf[32], tail;

	if (len == 0 || len >= sizeof(buf))
		return -1;
	memcpy(buf, text, len);
	buf[len] = '\0';
	for (size_t i = 0; i < len; i++)
		if (!strchr("0123456789abcdefABCDEF:.", buf[i]))
			return -1;
	if (sscanf(buf, "%4x:%2x:%2x.%1x%c", &domain, &bus, &device, &function, &tail) == 4 &&
	    len == 12) {
		/* full form */
	} else if (sscanf(buf, "%2x:%2x.%1x%c", &bus, &device, &function, &tail) == 3 && len == 7) {
		domain = 0;
	} else {
		return -1;
	}
	if (device > 0x1f || function > 7)
		return -1;
	snprintf(out, 16, "%04x:%02x:%02x.%x", domain, bus, device, function);
	return 0;
}

static int parse_pci_ids(struct host_impl *h, int count)
{
	const char *text = getenv("AEGAEON_HOST_PCI_BUS_IDS");
	char q[128], id[40];
	const char *p;
	int n = 0;

	if (text == NULL || *text == '\0')
		return 0;
	p = text;
	for (;;) {
		size_t len = strcspn(p, ",");

		if (n == count)
			return aeg_fail(AEG_EINVAL, "AEGAEON_HOST_PCI_BUS_IDS=\"%s\": more ids than the %d GPU%s of AEGAEON_HOST_GPUS",
					aeg_quote(text, q, sizeof(q)), count, count == 1 ? "" : "s");
		if (parse_pci(p, len, h->pci[n]) < 0) {
			snprintf(id, sizeof(id), "%.*s", (int)(len < sizeof(id) ? len : sizeof(id) - 1), p);
			return aeg_fail(AEG_EINVAL, "AEGAEON_HOST_PCI_BUS_IDS: \"%s\" is not a PCI bus id (like 0000:3b:00.0)",
					aeg_quote(id, id, sizeof(id)));
		}
		for (int i = 0; i < n; i++)
			if (strcmp(h->pci[i], h->pci[n]) == 0)
				return aeg_fail(AEG_EINVAL, "AEGAEON_HOST_PCI_BUS_IDS: %s given twice", h->pci[n]);
		n++;
		if (p[len] == '\0')
			break;
		p += len + 1;
	}
	if (n != count)
		return aeg_fail(AEG_EINVAL, "AEGAEON_HOST_PCI_BUS_IDS=\"%s\": %d id%s for %d GPU%s (AEGAEON_HOST_GPUS): give one per GPU",
				aeg_quote(text, q, sizeof(q)), n, n == 1 ? "" : "s", count, count == 1 ? "" : "s");
	return 0;
}

static int host_init(aeg_device_t *dev)
{
	struct host_impl *h;
	long pages, page_size;
	int count, err;

	err = parse_gpu_count(&count);
	if (err < 0)
		return err;
	h = calloc(1, sizeof(*h));
	if (h == NULL)
		return aeg_fail(AEG_ENOMEM, "host device: out of memory");
	err = parse_pci_ids(h, count);
	if (err < 0)
		goto fail;
	err = aeg_proc_start_time(getpid(), &h->start_time);
	if (err < 0)
		goto fail;
	pages = sysconf(_SC_PHYS_PAGES);
	page_size = sysconf(_SC_PAGESIZE);
	if (pages <= 0 || page_size <= 0) {
		err = aeg_fail(AEG_EIO, "sysconf(_SC_PHYS_PAGES): %s", strerror(errno));
		goto fail;
	}
	h->total_bytes = (uint64_t)pages * (uint64_t)page_size;
	err = pthread_mutex_init(&h->lock, NULL);
	if (err != 0) {
		err = aeg_fail(AEG_ENOMEM, "host device: pthread_mutex_init: %s", strerror(err));
		goto fail;
	}
	dev->gpu_count = count;
	dev->impl = h;
	return 0;
fail:
	free(h);
	return err;
}

size_t host_registered_ranges(aeg_device_t *dev)
{
	struct host_impl *h = impl_of(dev);
	size_t n = 0;

	pthread_mutex_lock(&h->lock);
	for (struct host_range *r = h->registered; r != NULL; r = r->next)
		n++;
	pthread_mutex_unlock(&h->lock);
	return n;
}

static void host_fini(aeg_device_t *dev)
{
	struct host_impl *h = impl_of(dev);

	if (h->allocs != NULL || h->mappings != NULL || h->registered != NULL)
		aeg_warn("host device closed while holding%s%s%s; releasing them",
			 h->allocs ? " allocations" : "", h->mappings ? " opened memory handles" : "",
			 h->registered ? " registered host ranges" : "");
	while (h->allocs != NULL) {
		struct host_alloc *a = h->allocs;

		h->allocs = a->next;
		munmap(a->ptr, a->bytes);
		close(a->fd);
		free(a);
	}
	while (h->mappings != NULL) {
		struct host_mapping *m = h->mappings;

		h->mappings = m->next;
		munmap(m->ptr, m->bytes);
		free(m);
	}
	while (h->registered != NULL) {
		struct host_range *r = h->registered;

		h->registered = r->next;
		free(r);
	}
	pthread_mutex_destroy(&h->lock);
	free(h);
	dev->impl = NULL;
}

static int host_gpu_info(aeg_device_t *dev, int gpu, struct aeg_gpu_info *info)
{
	struct host_impl *h = impl_of(dev);
	uint64_t avail;
	int err;

	err = aeg_mem_available(&avail);
	if (err < 0)
		return err;
	snprintf(info->name, sizeof(info->name), "host");
	info->total_bytes = h->total_bytes;
	info->free_bytes = avail;
	snprintf(info->pci_bus_id, sizeof(info->pci_bus_id), "%s", h->pci[gpu]);
	return 0;
}

/* ---------------------------------------------------------------- handles */

void host_make_handle(const struct host_impl *h, const char *magic, int fd, int gpu,
		      uint64_t bytes, uint64_t ino, aeg_handle_t *handle)
{
	struct host_handle hh;

	memset(&hh, 0, sizeof(hh));
	memcpy(hh.magic, magic, 4);
	hh.version = HOST_HANDLE_VERSION;
	hh.pid = (uint32_t)getpid();
	hh.uid = (uint32_t)getuid();
	hh.start_time = h->start_time;
	hh.fd = fd;
	hh.gpu = (uint32_t)gpu;
	hh.bytes = bytes;
	hh.ino = ino;
	memcpy(handle->bytes, &hh, sizeof(hh));
}

int host_parse_handle(const aeg_handle_t *handle, const char *magic, const char *what,
		      struct host_handle *hh)
{
	static const unsigned char zero[sizeof(hh->zero)];

	memcpy(hh, handle->bytes, sizeof(*hh));
	if (memcmp(hh->magic, magic, 4) != 0)
		return aeg_fail(AEG_EBADF, "not a host-backend %s handle (magic %02x%02x%02x%02x, expected \"%s\")",
				what, (unsigned char)hh->magic[0], (unsigned char)hh->magic[1],
				(unsigned char)hh->magic[2], (unsigned char)hh->magic[3], magic);
	if (hh->version != HOST_HANDLE_VERSION)
		return aeg_fail(AEG_EBADF, "%s handle version %" PRIu32 ", this library reads version %d",
				what, hh->version, HOST_HANDLE_VERSION);
	if (memcmp(hh->zero, zero, sizeof(zero)) != 0 || hh->pid == 0 || hh->pid > INT_MAX ||
	    hh->fd < 0 || hh->bytes == 0)
		return aeg_fail(AEG_EBADF, "%s handle is corrupt (pid %" PRIu32 ", fd %" PRId32 ", %" PRIu64 " bytes)",
				what, hh->pid, hh->fd, hh->bytes);
	if (hh->uid != (uint32_t)getuid())
		return aeg_fail(AEG_EBADF, "%s handle belongs to uid %" PRIu32 "; only processes of the same user (uid %u) can open it",
				what, hh->uid, (unsigned)getuid());
	return 0;
}

/*
 * Open the owner's descriptor through /proc/<pid>/fd and prove it is the
 * exported memfd: the owner is the same process (start time) and the file
 * the same (inode, size).
 */
int host_open_owner_fd(const struct host_handle *hh, const char *what, int *fdp)
{
	char path[64];
	uint64_t start;
	struct stat st;
	int fd, err;

	snprintf(path, sizeof(path), "/proc/%" PRIu32 "/fd/%" PRId32, hh->pid, hh->fd);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;

		if (aeg_proc_start_time((pid_t)hh->pid, &start) < 0 || start != hh->start_time)
			return aeg_fail(AEG_EBADF, "%s handle: its owner, process %" PRIu32 ", is gone",
					what, hh->pid);
		if (e == ENOENT)
			return aeg_fail(AEG_EBADF, "%s handle: process %" PRIu32 " no longer holds it (freed or destroyed)",
					what, hh->pid);
		/* A handle whose uid field was rewritten: the kernel, not the field, has the last word. */
		if (e == EACCES || e == EPERM)
			return aeg_fail(AEG_EBADF, "%s handle: process %" PRIu32 " is not this user's (uid %u): "
					"opening %s: %s; only processes of the same user can open its handles",
					what, hh->pid, (unsigned)getuid(), path, strerror(e));
		return aeg_fail(AEG_EBADF, "%s handle: opening %s: %s", what, path, strerror(e));
	}
	err = aeg_proc_start_time((pid_t)hh->pid, &start);
	if (err < 0 || start != hh->start_time) {
		err = aeg_fail(AEG_EBADF, "%s handle: its owner, process %" PRIu32 ", is gone (the pid now belongs to another process)",
			       what, hh->pid);
		goto fail;
	}
	if (fstat(fd, &st) < 0) {
		err = aeg_fail(AEG_EBADF, "%s handle: fstat %s: %s", what, path, strerror(errno));
		goto fail;
	}
	if ((uint64_t)st.st_ino != hh->ino) {
		err = aeg_fail(AEG_EBADF, "%s handle: process %" PRIu32 " no longer holds it (descriptor %" PRId32 " is another file now)",
			       what, hh->pid, hh->fd);
		goto fail;
	}
	if ((uint64_t)st.st_size != hh->bytes) {
		err = aeg_fail(AEG_EBADF, "%s handle says %" PRIu64 " bytes, the shared file has %lld",
			       what, hh->bytes, (long long)st.st_size);
		goto fail;
	}
	*fdp = fd;
	return 0;
fail:
	close(fd);
	return err;
}

/* ---------------------------------------------------------------- memory */

static struct host_alloc *find_alloc(struct host_impl *h, const void *ptr)
{
	for (struct host_alloc *a = h->allocs; a != NULL; a = a->next)
		if (a->ptr == ptr)
			return a;
	return NULL;
}

static int host_mem_alloc(aeg_device_t *dev, int gpu, uint64_t bytes, void **ptr)
{
	struct host_impl *h = impl_of(dev);
	struct host_alloc *a;
	char name[32];
	struct stat st;
	int err;

	if (bytes > h->total_bytes)
		return aeg_fail(AEG_ENOSPC, "device memory: %" PRIu64 " bytes asked on host GPU %d, which has %" PRIu64 " in all",
				bytes, gpu, h->total_bytes);
	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return aeg_fail(AEG_ENOMEM, "device memory: out of memory");
	a->bytes = bytes;
	a->gpu = gpu;
	snprintf(name, sizeof(name), "aegaeon-gpu%d", gpu);
	a->fd = memfd_create(name, MFD_CLOEXEC);
	if (a->fd < 0) {
		err = aeg_fail(errno == EMFILE || errno == ENFILE ? AEG_ENOSPC : AEG_EIO,
			       "device memory: memfd_create: %s", strerror(errno));
		goto free_alloc;
	}
	if (ftruncate(a->fd, (off_t)bytes) < 0) {
		err = aeg_fail(AEG_ENOSPC, "device memory: ftruncate to %" PRIu64 " bytes: %s",
			       bytes, strerror(errno));
		goto close_fd;
	}
	if (fstat(a->fd, &st) < 0) {
		err = aeg_fail(AEG_EIO, "device memory: fstat: %s", strerror(errno));
		goto close_fd;
	}
	a->ino = (uint64_t)st.st_ino;
	a->ptr = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
	if (a->ptr == MAP_FAILED) {
		err = aeg_fail(AEG_ENOSPC, "device memory: mmap of %" PRIu64 " bytes: %s",
			       bytes, strerror(errno));
		goto close_fd;
	}
	pthread_mutex_lock(&h->lock);
	a->next = h->allocs;
	h->allocs = a;
	pthread_mutex_unlock(&h->lock);
	*ptr = a->ptr;
	return 0;
close_fd:
	close(a->fd);
free_alloc:
	free(a);
	return err;
}

static int host_mem_free(aeg_device_t *dev, int gpu, void *ptr)
{
	struct host_impl *h = impl_of(dev);
	struct host_alloc **pp, *a = NULL;

	pthread_mutex_lock(&h->lock);
	for (pp = &h->allocs; *pp != NULL; pp = &(*pp)->next) {
		if ((*pp)->ptr == ptr && (*pp)->gpu == gpu) {
			a = *pp;
			*pp = a->next;
			break;
		}
	}
	pthread_mutex_unlock(&h->lock);
	if (a == NULL)
		return aeg_fail(AEG_EINVAL, "device memory: %p is not an allocation of GPU %d", ptr, gpu);
	munmap(a->ptr, a->bytes);
	close(a->fd);
	free(a);
	return 0;
}

static int host_mem_export(aeg_device_t *dev, void *ptr, aeg_handle_t *handle)
{
	struct host_impl *h = impl_of(dev);
	struct host_alloc *a;
	int err = 0;

	pthread_mutex_lock(&h->lock);
	a = find_alloc(h, ptr);
	if (a == NULL)
		err = aeg_fail(AEG_EINVAL, "memory export: %p is not the base of an aeg_mem_alloc allocation", ptr);
	else
		host_make_handle(h, "AEGM", a->fd, a->gpu, a->bytes, a->ino, handle);
	pthread_mutex_unlock(&h->lock);
	return err;
}

static int host_mem_open(aeg_device_t *dev, int gpu, const aeg_handle_t *handle, void **ptr)
{
	struct host_impl *h = impl_of(dev);
	struct host_mapping *m;
	struct host_handle hh;
	void *p;
	int fd, err;

	err = host_parse_handle(handle, "AEGM", "memory", &hh);
	if (err < 0)
		return err;
	pthread_mutex_lock(&h->lock);
	if (hh.pid == (uint32_t)getpid() && hh.start_time == h->start_time) {
		for (struct host_alloc *a = h->allocs; a != NULL; a = a->next) {
			if (a->ino != hh.ino)
				continue;
			if (a->fd != hh.fd || a->bytes != hh.bytes) {
				err = aeg_fail(AEG_EBADF, "memory handle does not match the allocation it names (fd %" PRId32 ", %" PRIu64 " bytes; allocation: fd %d, %" PRIu64 " bytes)",
					       hh.fd, hh.bytes, a->fd, a->bytes);
				goto out;
			}
			a->opens++;
			*ptr = a->ptr;
			goto out;
		}
	}
	/*
	 * A mapping made for an earlier open is shared, but only for a handle
	 * that would open now, checked as a first open is: its owner alive, its
	 * descriptor still the file, the size the file's and the mapping's.
	 */
	err = host_open_owner_fd(&hh, "memory", &fd);
	if (err < 0)
		goto out;
	for (m = h->mappings; m != NULL; m = m->next) {
		if (m->pid == (pid_t)hh.pid && m->start_time == hh.start_time && m->ino == hh.ino) {
			close(fd);
			if (m->bytes != hh.bytes) {
				err = aeg_fail(AEG_EBADF, "memory handle says %" PRIu64 " bytes, its memory is open here with %" PRIu64,
					       hh.bytes, m->bytes);
				goto out;
			}
			m->refs++;
			*ptr = m->ptr;
			goto out;
		}
	}
	p = mmap(NULL, hh.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		err = aeg_fail(AEG_ENOMEM, "memory handle: mmap of %" PRIu64 " bytes: %s",
			       hh.bytes, strerror(errno));
		goto out;
	}
	m = calloc(1, sizeof(*m));
	if (m == NULL) {
		munmap(p, hh.bytes);
		err = aeg_fail(AEG_ENOMEM, "memory handle: out of memory");
		goto out;
	}
	m->pid = (pid_t)hh.pid;
	m->start_time = hh.start_time;
	m->ino = hh.ino;
	m->ptr = p;
	m->bytes = hh.bytes;
	m->refs = 1;
	m->next = h->mappings;
	h->mappings = m;
	*ptr = p;
out:
	pthread_mutex_unlock(&h->lock);
	return err;
}

static int host_mem_close(aeg_device_t *dev, void *ptr)
{
	struct host_impl *h = impl_of(dev);
	struct host_mapping **pp, *m = NULL;
	struct host_alloc *a;
	int err = 0;

	pthread_mutex_lock(&h->lock);
	for (pp = &h->mappings; *pp != NULL; pp = &(*pp)->next) {
		if ((*pp)->ptr == ptr) {
			m = *pp;
			if (--m->refs == 0)
				*pp = m->next;
			else
				m = NULL;
			goto out;
		}
	}
	a = find_alloc(h, ptr);
	if (a != NULL && a->opens > 0)
		a->opens--;
	else
		err = aeg_fail(AEG_EINVAL, "memory handle: %p was not opened with aeg_mem_open_handle", ptr);
out:
	pthread_mutex_unlock(&h->lock);
	if (m != NULL) {
		munmap(m->ptr, m->bytes);
		free(m);
	}
	return err;
}

/*
 * Reserved address space, as CUDA's virtual memory management gives it: a
 * PROT_NONE range no page of which is backed; each piece mapped into it is
 * memory of its own (a memfd, as aeg_mem_alloc's), so a piece that cannot
 * be made fails as a GPU's cuMemCreate would, and unmapping one gives its
 * memory back while the addresses stay reserved.
 */
#define HOST_VA_GRANULARITY (2ull << 20)

static int host_va_reserve(aeg_device_t *dev, int gpu, uint64_t bytes, uint64_t *granularity, void **base)
{
	struct host_impl *h = impl_of(dev);
	uint64_t rounded = aeg_round_up(bytes, HOST_VA_GRANULARITY);
	void *p;

	if (bytes > h->total_bytes || rounded > h->total_bytes)
		return aeg_fail(AEG_ENOSPC, "address reservation: %" PRIu64 " bytes asked on host GPU %d, which has %" PRIu64 " in all",
				bytes, gpu, h->total_bytes);
	p = mmap(NULL, rounded, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return aeg_fail(AEG_ENOSPC, "address reservation of %" PRIu64 " bytes: mmap: %s", rounded, strerror(errno));
	*granularity = HOST_VA_GRANULARITY;
	*base = p;
	return 0;
}

static int host_va_map(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	char name[32];
	void *p;
	int fd, e;

	(void)dev;
	snprintf(name, sizeof(name), "aegaeon-gpu%d", gpu);
	fd = memfd_create(name, MFD_CLOEXEC);
	if (fd < 0)
		return aeg_fail(errno == EMFILE || errno == ENFILE ? AEG_ENOSPC : AEG_EIO,
				"device memory of %" PRIu64 " bytes at %p: memfd_create: %s", bytes, addr, strerror(errno));
	if (ftruncate(fd, (off_t)bytes) < 0) {
		e = errno;
		close(fd);
		return aeg_fail(AEG_ENOSPC, "device memory of %" PRIu64 " bytes at %p: ftruncate: %s", bytes, addr,
				strerror(e));
	}
	p = mmap(addr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
	e = errno;
	close(fd);              /* the mapping holds the memory */
	if (p == MAP_FAILED)
		return aeg_fail(AEG_ENOSPC, "device memory of %" PRIu64 " bytes at %p: mmap: %s", bytes, addr, strerror(e));
	return 0;
}

static int host_va_unmap(aeg_device_t *dev, int gpu, void *addr, uint64_t bytes)
{
	(void)dev;
	(void)gpu;
	/* Back to reserved: the piece's memory goes with its last mapping. */
	if (mmap(addr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED)
		return aeg_fail(AEG_EIO, "unmapping device memory of %" PRIu64 " bytes at %p: %s", bytes, addr,
				strerror(errno));
	return 0;
}

static int host_va_release(aeg_device_t *dev, int gpu, void *base, uint64_t bytes)
{
	(void)dev;
	(void)gpu;
	if (munmap(base, aeg_round_up(bytes, HOST_VA_GRANULARITY)) < 0)
		return aeg_fail(AEG_EIO, "releasing %" PRIu64 " bytes of addresses at %p: %s", bytes, base,
				strerror(errno));
	return 0;
}

static int host_memcpy_sync(aeg_device_t *dev, void *dst, const void *src, size_t bytes)
{
	memmove(dst, src, bytes);
	return 0;
}

static int host_memset_sync(aeg_device_t *dev, void *dst, int value, size_t bytes)
{
	memset(dst, value, bytes);
	return 0;
}

/*
 * Registration pins nothing on the host backend: host memory is already
 * what its "GPUs" read. It still checks what CUDA checks (the range is
 * mapped, not registered twice, unregistered by its start) so code tested
 * on host behaves the same on cuda.
 */
static int host_host_register(aeg_device_t *dev, void *ptr, size_t bytes, unsigned flags)
{
	struct host_impl *h = impl_of(dev);
	uintptr_t start = (uintptr_t)ptr, end, page = (uintptr_t)sysconf(_SC_PAGESIZE);
	struct host_range *r;
	int err = 0;

	if (__builtin_add_overflow(start, bytes, &end))
		return aeg_fail(AEG_EINVAL, "host register: %zu bytes at %p wrap around", bytes, ptr);
	if (msync((void *)(start & ~(page - 1)), end - (start & ~(page - 1)), MS_ASYNC) < 0)
		return aeg_fail(AEG_EINVAL, "host register: [%p, +%zu) is not mapped memory", ptr, bytes);
	r = calloc(1, sizeof(*r));
	if (r == NULL)
		return aeg_fail(AEG_ENOMEM, "host register: out of memory");
	r->start = start;
	r->end = end;
	pthread_mutex_lock(&h->lock);
	for (struct host_range *o = h->registered; o != NULL; o = o->next) {
		if (o->start < end && start < o->end) {
			err = aeg_fail(AEG_EEXIST, "host register: [%p, +%zu) overlaps the registered range [%p, +%zu)",
				       ptr, bytes, (void *)o->start, (size_t)(o->end - o->start));
			break;
		}
	}
	if (err == 0) {
		r->next = h->registered;
		h->registered = r;
		r = NULL;
	}
	pthread_mutex_unlock(&h->lock);
	free(r);
	return err;
}

static int host_host_unregister(aeg_device_t *dev, void *ptr)
{
	struct host_impl *h = impl_of(dev);
	struct host_range **pp, *r = NULL;

	pthread_mutex_lock(&h->lock);
	for (pp = &h->registered; *pp != NULL; pp = &(*pp)->next) {
		if ((*pp)->start == (uintptr_t)ptr) {
			r = *pp;
			*pp = r->next;
			break;
		}
	}
	pthread_mutex_unlock(&h->lock);
	if (r == NULL)
		return aeg_fail(AEG_EINVAL, "host unregister: %p is not the start of a registered range", ptr);
	free(r);
	return 0;
}

const struct aeg_device_ops aeg_device_host_ops = {
	.name = "host",
	.init = host_init,
	.fini = host_fini,
	.gpu_info = host_gpu_info,
	.mem_alloc = host_mem_alloc,
	.mem_free = host_mem_free,
	.mem_export = host_mem_export,
	.va_reserve = host_va_reserve,
	.va_map = host_va_map,
	.va_unmap = host_va_unmap,
	.va_release = host_va_release,
	.mem_open = host_mem_open,
	.mem_close = host_mem_close,
	.memcpy_sync = host_memcpy_sync,
	.memset_sync = host_memset_sync,
	.host_register = host_host_register,
	.host_unregister = host_host_unregister,
	.stream_create = host_stream_create,
	.stream_destroy = host_stream_destroy,
	.stream_sync = host_stream_sync,
	.memcpy_async = host_memcpy_async,
	.memcpy2d_async = host_memcpy2d_async,
	.launch_host_fn = host_launch_host_fn,
	.event_create = host_event_create,
	.event_destroy = host_event_destroy,
	.event_record = host_event_record,
	.event_arm = host_event_arm,
	.event_query = host_event_query,
	.event_wait = host_event_wait,
	.event_open = host_event_open,
	.event_close = host_event_close,
	.stream_wait_event = host_stream_wait_event,
	.event_fail = host_event_fail,
};

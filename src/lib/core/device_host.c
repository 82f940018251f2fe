/* The host device backend: "GPU" memory in memfds, streams as worker threads, futex events. */
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

#include "device_internal.h"
#include "internal.h"

#define HOST_MAX_GPUS 64
#define HOST_HANDLE_VERSION 1
#define HOST_EVENT_BYTES 4096

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

struct host_impl {
	pthread_mutex_t lock;   /* guards the three lists */
	struct host_alloc *allocs;
	struct host_mapping *mappings;
	struct host_range *registered;
	uint64_t start_time;    /* of this process */
	uint64_t total_bytes;
	char pci[HOST_MAX_GPUS][16];
};

/* The process-shared state of an event: one memfd page. */
struct host_event_page {
	char magic[4];
	uint32_t version;
	_Atomic uint32_t word;          /* futex word: bumped on every completion or failure */
	_Atomic uint32_t waiters;
	_Atomic uint64_t recorded;      /* sequence of the latest record */
	_Atomic uint64_t completed;     /* highest sequence the streams passed */
	_Atomic int32_t failure;        /* aeg_event_fail code; 0 none */
};

struct host_event {
	_Atomic unsigned refs;          /* the owner's, and one per queued stream op */
	struct host_event_page *page;
	int fd;                         /* -1 for an event opened from a handle */
	_Atomic uint64_t armed_seq;     /* sequence taken by host_event_arm, 0 none */
	pid_t owner;                    /* opened from a handle: the process that records it */
	uint64_t owner_start;
};

/* A wait on another process's event looks this often whether that process still lives. */
#define OWNER_CHECK_MS 100

enum op_kind { OP_COPY, OP_COPY2D, OP_HOST_FN, OP_RECORD, OP_WAIT };

struct op {
	enum op_kind kind;
	struct op *next;
	union {
		struct {
			void *dst;
			const void *src;
			size_t bytes;
			size_t dpitch, spitch, rows;    /* OP_COPY2D: rows of bytes */
		} copy;
		struct {
			void (*fn)(void *);
			void *arg;
		} host_fn;
		struct {
			struct host_event *ev;
			uint64_t seq;
		} event;
	} u;
};

struct host_stream {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t work;            /* the worker: an op arrived or stop */
	pthread_cond_t idle;            /* sync: done moved */
	struct op *head, *tail;
	uint64_t queued, done;
	int stopping;
};

static struct host_impl *impl_of(aeg_device_t *dev)
{
	return dev->impl;
}

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

static void make_handle(const struct host_impl *h, const char *magic, int fd, int gpu,
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

static int parse_handle(const aeg_handle_t *handle, const char *magic, const char *what,
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
static int open_owner_fd(const struct host_handle *hh, const char *what, int *fdp)
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
		make_handle(h, "AEGM", a->fd, a->gpu, a->bytes, a->ino, handle);
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

	err = parse_handle(handle, "AEGM", "memory", &hh);
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
	for (m = h->mappings; m != NULL; m = m->next) {
		if (m->pid == (pid_t)hh.pid && m->ino == hh.ino) {
			m->refs++;
			*ptr = m->ptr;
			goto out;
		}
	}
	err = open_owner_fd(&hh, "memory", &fd);
	if (err < 0)
		goto out;
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

/* ---------------------------------------------------------------- events */

static void page_wake(struct host_event_page *pg)
{
	atomic_fetch_add(&pg->word, 1);
	if (atomic_load(&pg->waiters) != 0)
		aeg_futex_wake((uint32_t *)&pg->word);
}

static void page_complete(struct host_event_page *pg, uint64_t seq)
{
	uint64_t cur = atomic_load(&pg->completed);

	while (cur < seq && !atomic_compare_exchange_weak(&pg->completed, &cur, seq))
		;
	page_wake(pg);
}

/*
 * Wait until the streams pass sequence @target of @ev (or, with @failures,
 * until the event is failed). The waiters count is raised before the word
 * is read, so a completer either sees a waiter and wakes it or completed
 * before the word was read. On another process's event the wait also ends
 * when that process exits: nothing would record the event any more.
 */
static int page_wait(struct host_event *ev, uint64_t target, int timeout_ms, int failures)
{
	struct host_event_page *pg = ev->page;
	uint64_t deadline = 0, next_check = 0;
	int err;

	if (timeout_ms > 0)
		deadline = aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	atomic_fetch_add(&pg->waiters, 1);
	for (;;) {
		uint32_t gen = atomic_load(&pg->word);
		int32_t failure = atomic_load(&pg->failure);
		uint64_t now, until = 0;

		if (failures && failure != 0) {
			err = failure;
			break;
		}
		if (atomic_load(&pg->completed) >= target) {
			err = 0;
			break;
		}
		if (timeout_ms == 0) {
			err = AEG_ETIMEDOUT;
			break;
		}
		now = aeg_now_ns();
		if (timeout_ms > 0) {
			if (now >= deadline) {
				err = AEG_ETIMEDOUT;
				break;
			}
			until = deadline;
		}
		if (ev->owner > 0) {
			if (now >= next_check) {
				if (!aeg_proc_alive(ev->owner, ev->owner_start)) {
					err = AEG_EBADF;
					break;
				}
				next_check = now + OWNER_CHECK_MS * 1000000ull;
			}
			if (until == 0 || next_check < until)
				until = next_check;
		}
		aeg_futex_wait((uint32_t *)&pg->word, gen, until != 0 ? until - now : 0);
	}
	atomic_fetch_sub(&pg->waiters, 1);
	if (err == AEG_ETIMEDOUT)
		return aeg_fail(err, "event not complete after %d ms", timeout_ms);
	if (err == AEG_EBADF)
		return aeg_fail(err, "event handle: its owner, process %d, exited before the event completed",
				(int)ev->owner);
	return err;
}

static void event_put(struct host_event *ev)
{
	if (atomic_fetch_sub(&ev->refs, 1) != 1)
		return;
	munmap(ev->page, HOST_EVENT_BYTES);
	if (ev->fd >= 0)
		close(ev->fd);
	free(ev);
}

static int host_event_create(aeg_device_t *dev, int gpu, void **evp, aeg_handle_t *handle)
{
	struct host_impl *h = impl_of(dev);
	struct host_event *ev;
	struct stat st;
	int err;

	ev = calloc(1, sizeof(*ev));
	if (ev == NULL)
		return aeg_fail(AEG_ENOMEM, "event: out of memory");
	atomic_init(&ev->refs, 1);
	ev->fd = memfd_create("aegaeon-event", MFD_CLOEXEC);
	if (ev->fd < 0) {
		err = aeg_fail(errno == EMFILE || errno == ENFILE ? AEG_ENOSPC : AEG_EIO,
			       "event: memfd_create: %s", strerror(errno));
		goto free_ev;
	}
	if (ftruncate(ev->fd, HOST_EVENT_BYTES) < 0 || fstat(ev->fd, &st) < 0) {
		err = aeg_fail(AEG_ENOMEM, "event: sizing its memfd: %s", strerror(errno));
		goto close_fd;
	}
	ev->page = mmap(NULL, HOST_EVENT_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, ev->fd, 0);
	if (ev->page == MAP_FAILED) {
		err = aeg_fail(AEG_ENOMEM, "event: mmap: %s", strerror(errno));
		goto close_fd;
	}
	memcpy(ev->page->magic, "AEGE", 4);
	ev->page->version = HOST_HANDLE_VERSION;
	make_handle(h, "AEGE", ev->fd, gpu, HOST_EVENT_BYTES, (uint64_t)st.st_ino, handle);
	*evp = ev;
	return 0;
close_fd:
	close(ev->fd);
free_ev:
	free(ev);
	return err;
}

static int host_event_destroy(aeg_device_t *dev, void *ev)
{
	event_put(ev);
	return 0;
}

static int host_event_open(aeg_device_t *dev, const aeg_handle_t *handle, void **evp)
{
	struct host_event_page *pg;
	struct host_handle hh;
	struct host_event *ev;
	int fd, err;

	err = parse_handle(handle, "AEGE", "event", &hh);
	if (err < 0)
		return err;
	if (hh.bytes != HOST_EVENT_BYTES)
		return aeg_fail(AEG_EBADF, "event handle is corrupt (%" PRIu64 " bytes, events have %d)",
				hh.bytes, HOST_EVENT_BYTES);
	err = open_owner_fd(&hh, "event", &fd);
	if (err < 0)
		return err;
	pg = mmap(NULL, HOST_EVENT_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (pg == MAP_FAILED)
		return aeg_fail(AEG_ENOMEM, "event handle: mmap: %s", strerror(errno));
	if (memcmp(pg->magic, "AEGE", 4) != 0 || pg->version != HOST_HANDLE_VERSION) {
		err = aeg_fail(AEG_EBADF, "event handle: the shared page of process %" PRIu32 " is not an event",
			       hh.pid);
		goto unmap;
	}
	ev = calloc(1, sizeof(*ev));
	if (ev == NULL) {
		err = aeg_fail(AEG_ENOMEM, "event handle: out of memory");
		goto unmap;
	}
	atomic_init(&ev->refs, 1);
	ev->page = pg;
	ev->fd = -1;
	ev->owner = (pid_t)hh.pid;
	ev->owner_start = hh.start_time;
	*evp = ev;
	return 0;
unmap:
	munmap(pg, HOST_EVENT_BYTES);
	return err;
}

static int host_event_close(aeg_device_t *dev, void *ev)
{
	event_put(ev);
	return 0;
}

static int host_event_query(aeg_device_t *dev, void *evp)
{
	struct host_event_page *pg = ((struct host_event *)evp)->page;
	int32_t failure = atomic_load(&pg->failure);

	if (failure != 0)
		return failure;
	return atomic_load(&pg->completed) >= atomic_load(&pg->recorded) ? 0 : AEG_EBUSY;
}

static int host_event_wait(aeg_device_t *dev, void *evp, int timeout_ms)
{
	struct host_event *ev = evp;

	return page_wait(ev, atomic_load(&ev->page->recorded), timeout_ms, 1);
}

static int host_event_fail(aeg_device_t *dev, void *evp, int err)
{
	struct host_event_page *pg = ((struct host_event *)evp)->page;

	atomic_store(&pg->failure, err);
	page_wake(pg);
	return 0;
}

/* ---------------------------------------------------------------- streams */

static void run_op(struct op *op)
{
	switch (op->kind) {
	case OP_COPY:
		memmove(op->u.copy.dst, op->u.copy.src, op->u.copy.bytes);
		break;
	case OP_COPY2D:
		for (size_t r = 0; r < op->u.copy.rows; r++)
			memmove((char *)op->u.copy.dst + r * op->u.copy.dpitch,
				(const char *)op->u.copy.src + r * op->u.copy.spitch, op->u.copy.bytes);
		break;
	case OP_HOST_FN:
		op->u.host_fn.fn(op->u.host_fn.arg);
		break;
	case OP_RECORD:
		page_complete(op->u.event.ev->page, op->u.event.seq);
		event_put(op->u.event.ev);
		break;
	case OP_WAIT:
		/* A failed event releases the stream too: nothing else would. */
		page_wait(op->u.event.ev, op->u.event.seq, -1, 1);
		event_put(op->u.event.ev);
		break;
	}
}

static void *stream_main(void *arg)
{
	struct host_stream *s = arg;
	struct op *op;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		while (s->head == NULL && !s->stopping)
			pthread_cond_wait(&s->work, &s->lock);
		if (s->head == NULL)
			break;
		op = s->head;
		s->head = op->next;
		if (s->head == NULL)
			s->tail = NULL;
		pthread_mutex_unlock(&s->lock);
		run_op(op);
		free(op);
		pthread_mutex_lock(&s->lock);
		s->done++;
		if (s->done == s->queued)
			pthread_cond_broadcast(&s->idle);
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

static void enqueue(struct host_stream *s, struct op *op)
{
	op->next = NULL;
	pthread_mutex_lock(&s->lock);
	if (s->tail != NULL)
		s->tail->next = op;
	else
		s->head = op;
	s->tail = op;
	s->queued++;
	pthread_cond_signal(&s->work);
	pthread_mutex_unlock(&s->lock);
}

static struct op *new_op(enum op_kind kind)
{
	struct op *op = calloc(1, sizeof(*op));

	if (op == NULL) {
		aeg_fail(AEG_ENOMEM, "stream: out of memory for a queued operation");
		return NULL;
	}
	op->kind = kind;
	return op;
}

static int host_stream_create(aeg_device_t *dev, int gpu, void **streamp)
{
	struct host_stream *s;
	pthread_condattr_t attr;
	int err;

	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return aeg_fail(AEG_ENOMEM, "stream: out of memory");
	pthread_mutex_init(&s->lock, NULL);
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&s->work, &attr);
	pthread_cond_init(&s->idle, &attr);
	pthread_condattr_destroy(&attr);
	err = pthread_create(&s->thread, NULL, stream_main, s);
	if (err != 0) {
		pthread_cond_destroy(&s->idle);
		pthread_cond_destroy(&s->work);
		pthread_mutex_destroy(&s->lock);
		free(s);
		return aeg_fail(AEG_ENOMEM, "stream: pthread_create: %s", strerror(err));
	}
	*streamp = s;
	return 0;
}

static int host_stream_destroy(aeg_device_t *dev, void *stream)
{
	struct host_stream *s = stream;

	pthread_mutex_lock(&s->lock);
	s->stopping = 1;
	pthread_cond_signal(&s->work);
	pthread_mutex_unlock(&s->lock);
	pthread_join(s->thread, NULL);
	pthread_cond_destroy(&s->idle);
	pthread_cond_destroy(&s->work);
	pthread_mutex_destroy(&s->lock);
	free(s);
	return 0;
}

static int host_stream_sync(aeg_device_t *dev, void *stream)
{
	struct host_stream *s = stream;
	uint64_t target;

	pthread_mutex_lock(&s->lock);
	target = s->queued;
	while (s->done < target)
		pthread_cond_wait(&s->idle, &s->lock);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

static int host_memcpy_async(aeg_device_t *dev, void *stream, void *dst, const void *src, size_t bytes)
{
	struct op *op = new_op(OP_COPY);

	if (op == NULL)
		return AEG_ENOMEM;
	op->u.copy.dst = dst;
	op->u.copy.src = src;
	op->u.copy.bytes = bytes;
	enqueue(stream, op);
	return 0;
}

static int host_memcpy2d_async(aeg_device_t *dev, void *stream, void *dst, size_t dpitch, const void *src,
			       size_t spitch, size_t width, size_t height)
{
	struct op *op = new_op(OP_COPY2D);

	if (op == NULL)
		return AEG_ENOMEM;
	op->u.copy.dst = dst;
	op->u.copy.src = src;
	op->u.copy.bytes = width;
	op->u.copy.dpitch = dpitch;
	op->u.copy.spitch = spitch;
	op->u.copy.rows = height;
	enqueue(stream, op);
	return 0;
}

static int host_launch_host_fn(aeg_device_t *dev, void *stream, void (*fn)(void *), void *arg)
{
	struct op *op = new_op(OP_HOST_FN);

	if (op == NULL)
		return AEG_ENOMEM;
	op->u.host_fn.fn = fn;
	op->u.host_fn.arg = arg;
	enqueue(stream, op);
	return 0;
}

static int host_event_record(aeg_device_t *dev, void *evp, void *stream)
{
	struct host_event *ev = evp;
	struct op *op = new_op(OP_RECORD);

	if (op == NULL)
		return AEG_ENOMEM;
	atomic_fetch_add(&ev->refs, 1);
	op->u.event.ev = ev;
	atomic_store(&ev->page->failure, 0);
	op->u.event.seq = atomic_exchange(&ev->armed_seq, 0);
	if (op->u.event.seq == 0)
		op->u.event.seq = atomic_fetch_add(&ev->page->recorded, 1) + 1;
	enqueue(stream, op);
	return 0;
}

/*
 * Take the next sequence now: every wait, here or through the handle,
 * aims at it and stays pending until the record that uses it completes.
 */
static int host_event_arm(aeg_device_t *dev, void *evp)
{
	struct host_event *ev = evp;

	/* event.c arms under the event's lock, never while recording it. */
	if (atomic_load(&ev->armed_seq) == 0)
		atomic_store(&ev->armed_seq, atomic_fetch_add(&ev->page->recorded, 1) + 1);
	return 0;
}

static int host_stream_wait_event(aeg_device_t *dev, void *stream, void *evp)
{
	struct host_event *ev = evp;
	uint64_t target = atomic_load(&ev->page->recorded);
	struct op *op;

	if (atomic_load(&ev->page->completed) >= target)
		return 0;
	op = new_op(OP_WAIT);
	if (op == NULL)
		return AEG_ENOMEM;
	atomic_fetch_add(&ev->refs, 1);
	op->u.event.ev = ev;
	op->u.event.seq = target;
	enqueue(stream, op);
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

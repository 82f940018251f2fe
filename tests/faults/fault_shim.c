/* Test-only fault injection for one file's reads and mappings; LD_PRELOAD it or link it into a test. */
/*
 * Driven by the environment (read at the first intercepted call, again
 * after aeg_fault_shim_reload):
 *   AEGAEON_FAULT_FILE  the file to hurt, matched by device and inode of
 *                       each descriptor (so every open of it is hit)
 *   AEGAEON_FAULT       eio:    reads of bytes at or past AEGAEON_FAULT_AT
 *                               fail with EIO (a read across it stops at
 *                               it), and MADV_POPULATE_READ of mapped pages
 *                               past it fails with EFAULT, as the kernel
 *                               reports a page it could not read
 *                       short:  every read returns at most AEGAEON_FAULT_AT
 *                               bytes (at least 1)
 *                       shrink: the first read or populate reaching past
 *                               AEGAEON_FAULT_AT truncates the real file to
 *                               that size first (the kernel then does the
 *                               rest: short reads, EFAULT, SIGBUS)
 *                       slow:   every read sleeps AEGAEON_FAULT_AT
 *                               microseconds first (a slow disk)
 *                       gate:   every MADV_POPULATE_WRITE (a pinned pool
 *                               being made) after the first
 *                               AEGAEON_FAULT_AT ones waits until
 *                               AEGAEON_FAULT_FILE exists: the test opens
 *                               the gate
 *                       nomem:  MADV_POPULATE_WRITE fails with ENOMEM once
 *                               AEGAEON_FAULT_AT calls went through (memory
 *                               running out while a pool is made; no file)
 *                       slowpop: every MADV_POPULATE_WRITE sleeps
 *                               AEGAEON_FAULT_AT microseconds first (a pool
 *                               slow to make; no file)
 *                       nothread: the first pthread_create once
 *                               AEGAEON_FAULT_FILE exists fails with EAGAIN
 *                               (threads running out, as under a cgroup's
 *                               pids.max)
 *   AEGAEON_FAULT_AT    a byte offset (a size for short, microseconds for
 *                       slow and slowpop)
 * Intercepted: read, pread, pread64, preadv, preadv64, mmap, mmap64,
 * munmap, madvise, pthread_create. Never installed; see tests/unit/test_faults.c.
 */
#include "config.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

enum mode { M_OFF, M_EIO, M_SHORT, M_SHRINK, M_SLOW, M_GATE, M_NOMEM, M_SLOWPOP, M_NOTHREAD };

#define MAX_MAPS 64

struct map {
	uintptr_t base;
	size_t bytes;
	off_t off;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;
static enum mode mode;
static char path[4096];
static dev_t dev;
static ino_t ino;
static uint64_t at;
static int shrunk;
static unsigned long hits;
static struct map maps[MAX_MAPS];

static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_pread)(int, void *, size_t, off_t);
static ssize_t (*real_preadv)(int, const struct iovec *, int, off_t);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);
static int (*real_madvise)(void *, size_t, int);
static int (*real_pthread_create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

static void resolve(void)
{
	if (__atomic_load_n(&real_read, __ATOMIC_ACQUIRE))
		return;
	real_pread = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
	real_preadv = (ssize_t (*)(int, const struct iovec *, int, off_t))dlsym(RTLD_NEXT, "preadv");
	real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
	real_munmap = (int (*)(void *, size_t))dlsym(RTLD_NEXT, "munmap");
	real_madvise = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
	real_pthread_create = (int (*)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *))
		dlsym(RTLD_NEXT, "pthread_create");
	__atomic_store_n(&real_read, (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read"),
			 __ATOMIC_RELEASE);
}

/* Lock held. */
static void load_env(void)
{
	const char *m = getenv("AEGAEON_FAULT"), *f = getenv("AEGAEON_FAULT_FILE");
	const char *a = getenv("AEGAEON_FAULT_AT");
	struct stat st;

	loaded = 1;
	mode = M_OFF;
	at = a ? strtoull(a, NULL, 0) : 0;
	shrunk = 0;
	hits = 0;
	memset(maps, 0, sizeof(maps));
	/* A gate (or the file that stops threads) is a file that does not exist yet. */
	if (m != NULL && f != NULL && (strcmp(m, "gate") == 0 || strcmp(m, "nothread") == 0) &&
	    strlen(f) < sizeof(path)) {
		strcpy(path, f);
		mode = strcmp(m, "gate") == 0 ? M_GATE : M_NOTHREAD;
		return;
	}
	if (m != NULL && strcmp(m, "nomem") == 0) {
		mode = M_NOMEM;
		return;
	}
	if (m != NULL && strcmp(m, "slowpop") == 0) {
		mode = M_SLOWPOP;
		return;
	}
	if (m == NULL || f == NULL || stat(f, &st) != 0)
		return;
	if (strlen(f) >= sizeof(path))
		return;
	strcpy(path, f);
	dev = st.st_dev;
	ino = st.st_ino;
	if (strcmp(m, "eio") == 0)
		mode = M_EIO;
	else if (strcmp(m, "short") == 0)
		mode = M_SHORT;
	else if (strcmp(m, "shrink") == 0)
		mode = M_SHRINK;
	else if (strcmp(m, "slow") == 0)
		mode = M_SLOW;
}

/* Forget the mappings and counts and read the environment again (tests in one process). */
void aeg_fault_shim_reload(void);
void aeg_fault_shim_reload(void)
{
	resolve();
	pthread_mutex_lock(&lock);
	load_env();
	pthread_mutex_unlock(&lock);
}

/* How many calls were hurt since the last reload. */
unsigned long aeg_fault_shim_hits(void);
unsigned long aeg_fault_shim_hits(void)
{
	unsigned long n;

	pthread_mutex_lock(&lock);
	n = hits;
	pthread_mutex_unlock(&lock);
	return n;
}

/* The mode for @fd: M_OFF unless it is the file. */
static enum mode mode_of(int fd)
{
	struct stat st;
	enum mode m;

	resolve();
	pthread_mutex_lock(&lock);
	if (!loaded)
		load_env();
	m = mode;
	pthread_mutex_unlock(&lock);
	if (m == M_OFF || fd < 0 || fstat(fd, &st) != 0 || st.st_dev != dev || st.st_ino != ino)
		return M_OFF;
	return m;
}

/* Shrink the file once, before the first access reaching past the cut. */
static void shrink_once(void)
{
	pthread_mutex_lock(&lock);
	if (!shrunk) {
		if (truncate(path, (off_t)at) == 0)
			shrunk = 1;
		hits++;
	}
	pthread_mutex_unlock(&lock);
}

static void hit(void)
{
	pthread_mutex_lock(&lock);
	hits++;
	pthread_mutex_unlock(&lock);
}

/*
 * How much of a read of @len bytes at @off may go through: @len, fewer, or
 * -1 with errno set. @off < 0: a read at the current position of @fd.
 */
static ssize_t allow(int fd, size_t len, off_t off)
{
	enum mode m = mode_of(fd);

	if (m == M_OFF || len == 0)
		return (ssize_t)len;
	if (off < 0)
		off = lseek(fd, 0, SEEK_CUR);
	if (off < 0)
		return (ssize_t)len;
	switch (m) {
	case M_EIO:
		if ((uint64_t)off >= at) {
			hit();
			errno = EIO;
			return -1;
		}
		if ((uint64_t)off + len > at) {
			hit();
			return (ssize_t)(at - (uint64_t)off);
		}
		break;
	case M_SHORT:
		if (len > (at ? at : 1)) {
			hit();
			return (ssize_t)(at ? at : 1);
		}
		break;
	case M_SHRINK:
		if ((uint64_t)off + len > at)
			shrink_once();
		break;
	case M_SLOW:
		hit();
		usleep((useconds_t)at);
		break;
	default:
		break;
	}
	return (ssize_t)len;
}

ssize_t read(int fd, void *buf, size_t len)
{
	ssize_t n = allow(fd, len, -1);

	return n < 0 ? -1 : real_read(fd, buf, (size_t)n);
}

ssize_t pread(int fd, void *buf, size_t len, off_t off)
{
	ssize_t n = allow(fd, len, off);

	return n < 0 ? -1 : real_pread(fd, buf, (size_t)n, off);
}

ssize_t pread64(int fd, void *buf, size_t len, off_t off)
{
	return pread(fd, buf, len, off);
}

ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off)
{
	size_t len = 0;
	ssize_t n;

	for (int i = 0; i < cnt; i++)
		len += iov[i].iov_len;
	n = allow(fd, len, off);
	if (n < 0)
		return -1;
	if ((size_t)n < len) {
		/* Fewer bytes than the vector holds: read them into the first buffers. */
		struct iovec v[64];
		int k = 0;
		size_t left = (size_t)n;

		for (; k < cnt && k < 64 && left; k++) {
			v[k] = iov[k];
			if (v[k].iov_len > left)
				v[k].iov_len = left;
			left -= v[k].iov_len;
		}
		return real_preadv(fd, v, k, off);
	}
	return real_preadv(fd, iov, cnt, off);
}

ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off_t off)
{
	return preadv(fd, iov, cnt, off);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	void *p;

	resolve();
	p = real_mmap(addr, len, prot, flags, fd, off);
	if (p != MAP_FAILED && !(flags & MAP_ANONYMOUS) && mode_of(fd) != M_OFF) {
		pthread_mutex_lock(&lock);
		for (int i = 0; i < MAX_MAPS; i++) {
			if (maps[i].base == 0) {
				maps[i] = (struct map){ (uintptr_t)p, len, off };
				break;
			}
		}
		pthread_mutex_unlock(&lock);
	}
	return p;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return mmap(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len)
{
	resolve();
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_MAPS; i++)
		if (maps[i].base == (uintptr_t)addr)
			maps[i].base = 0;
	pthread_mutex_unlock(&lock);
	return real_munmap(addr, len);
}

int madvise(void *addr, size_t len, int advice)
{
	uintptr_t a = (uintptr_t)addr;
	uint64_t end = 0;
	int found = 0;
	enum mode m;

	resolve();
	pthread_mutex_lock(&lock);
	m = mode;
	if (m == M_GATE && advice == MADV_POPULATE_WRITE) {
		int gated = hits >= at;

		pthread_mutex_unlock(&lock);
		while (gated && access(path, F_OK) != 0)
			usleep(10000);
		hit();
		return real_madvise(addr, len, advice);
	}
	if (m == M_SLOWPOP && advice == MADV_POPULATE_WRITE) {
		pthread_mutex_unlock(&lock);
		usleep((useconds_t)at);
		hit();
		return real_madvise(addr, len, advice);
	}
	if (m == M_NOMEM && advice == MADV_POPULATE_WRITE) {
		int fail = hits >= at;

		hits += !fail;
		pthread_mutex_unlock(&lock);
		if (fail) {
			errno = ENOMEM;
			return -1;
		}
		return real_madvise(addr, len, advice);
	}
	for (int i = 0; i < MAX_MAPS && advice == MADV_POPULATE_READ; i++) {
		if (maps[i].base && a >= maps[i].base && a < maps[i].base + maps[i].bytes) {
			end = (uint64_t)maps[i].off + (a - maps[i].base) + len;
			found = 1;
			break;
		}
	}
	pthread_mutex_unlock(&lock);
	if (found && end > at) {
		if (m == M_EIO) {
			hit();
			errno = EFAULT;
			return -1;
		}
		if (m == M_SHRINK)
			shrink_once();
	}
	return real_madvise(addr, len, advice);
}

int pthread_create(pthread_t *thread, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
	int fail;

	resolve();
	pthread_mutex_lock(&lock);
	if (!loaded)
		load_env();
	fail = mode == M_NOTHREAD && hits == 0 && access(path, F_OK) == 0;
	hits += (unsigned long)fail;
	pthread_mutex_unlock(&lock);
	if (fail)
		return EAGAIN;
	return real_pthread_create(thread, attr, fn, arg);
}

/* Helpers the unit tests share. */
#ifndef AEGAEON_TESTUTIL_H
#define AEGAEON_TESTUTIL_H

#include "config.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef HAVE_VALGRIND_VALGRIND_H
#include <valgrind/valgrind.h>
#endif

#include <aegaeon/device.h>

/*
 * count_fds - descriptors open in this process (the listing's own one
 * included, the same in every call), for "nothing leaked" checks.
 */
static inline int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (d == NULL) {
		perror("count_fds: /proc/self/fd");
		abort();        /* a leak check that cannot count must not pass */
	}
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/*
 * child_exit - ends a test's forked child. The child inherits the parent's
 * heap and frees none of it; under valgrind (scripts/valgrind.sh) the leak
 * check at its exit would report that heap as lost and its --error-exitcode
 * would fail the child, so leak checking is turned off for this process
 * first. Memory errors in the child are still reported and still fail it.
 */
static inline _Noreturn void child_exit(int status)
{
#ifdef HAVE_VALGRIND_VALGRIND_H
	VALGRIND_CLO_CHANGE("--leak-check=no");
#endif
	_exit(status);
}

/*
 * self_exe_path - this program's file, for a test that runs itself again in
 * a child. Not "/proc/self/exe" itself: under valgrind that is valgrind's
 * tool, which refuses to start, while readlink of it gives the program.
 */
static inline const char *self_exe_path(void)
{
	static char path[4096];
	ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);

	if (n <= 0) {
		perror("self_exe_path: readlink /proc/self/exe");
		abort();
	}
	path[n] = '\0';
	return path;
}

/*
 * test_pattern - @bytes of a xorshift sequence from @seed (malloc'd, never
 * NULL): file and buffer contents no offset mix-up can pass unnoticed.
 */
static inline unsigned char *test_pattern(uint64_t bytes, unsigned seed)
{
	unsigned char *p = malloc(bytes ? bytes : 1);
	uint32_t x = seed * 2654435761u + 1;

	if (p == NULL) {
		fprintf(stderr, "test_pattern: out of memory for %llu bytes\n", (unsigned long long)bytes);
		abort();
	}
	for (uint64_t i = 0; i < bytes; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		p[i] = (unsigned char)x;
	}
	return p;
}

/* test_write_file - @path made to hold exactly @bytes of @buf (aborts on failure). */
static inline void test_write_file(const char *path, const void *buf, uint64_t bytes)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

	if (fd < 0 || write(fd, buf, bytes) != (ssize_t)bytes || close(fd) != 0) {
		perror(path);
		abort();
	}
}

/*
 * host_device_setup / host_device_teardown - a cmocka fixture: the host
 * backend opened in *@state, with the default GPU count, no PCI bus ids and
 * no page size forced on pools.
 */
static inline int host_device_setup(void **state)
{
	aeg_device_t *dev = NULL;

	unsetenv("AEGAEON_HOST_GPUS");
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	if (aeg_device_open(&dev, AEG_DEVICE_HOST) < 0)
		return -1;
	*state = dev;
	return 0;
}

static inline int host_device_teardown(void **state)
{
	aeg_device_close(*state);
	return 0;
}

#endif

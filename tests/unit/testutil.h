/* Helpers the unit tests share. */
#ifndef AEGAEON_TESTUTIL_H
#define AEGAEON_TESTUTIL_H

#include "config.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
 * This machine's one NUMA node, counted from the node directories in sysfs
 * (the library reads the "online" list instead); -1 with several or none.
 */
static inline int machine_sole_node(void)
{
	DIR *d = opendir("/sys/devices/system/node");
	struct dirent *e;
	int node = -1, count = 0;

	if (d == NULL)
		return -1;
	while ((e = readdir(d)) != NULL) {
		if (strncmp(e->d_name, "node", 4) != 0 || e->d_name[4] < '0' || e->d_name[4] > '9')
			continue;
		node = atoi(e->d_name + 4);
		count++;
	}
	closedir(d);
	return count == 1 ? node : -1;
}

/* count_pool_maps - mappings of pinned pools' memfds ("aegaeon-pool") in this process. */
static inline int count_pool_maps(void)
{
	char line[512];
	FILE *f = fopen("/proc/self/maps", "re");
	int n = 0;

	if (f == NULL) {
		perror("count_pool_maps: /proc/self/maps");
		abort();
	}
	while (fgets(line, sizeof(line), f) != NULL)
		if (strstr(line, "aegaeon-pool") != NULL)
			n++;
	fclose(f);
	return n;
}

/* under_valgrind - 1 when this test runs under valgrind (scripts/valgrind.sh), for time bounds. */
static inline int under_valgrind(void)
{
#ifdef HAVE_VALGRIND_VALGRIND_H
	return RUNNING_ON_VALGRIND != 0;
#else
	return 0;
#endif
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
 * test_st_file_named - a safetensors file at @path holding @n one-dimensional
 * U8 tensors "@prefix0", "@prefix1", ... of @sizes bytes (a xorshift
 * pattern, seed 11), in that order; *@file_bytes gets its size. Returns the
 * whole file's bytes (malloc'd), to compare with what was loaded.
 * test_st_file - the same with tensors "t0", "t1", ...
 */
static inline unsigned char *test_st_file_named(const char *path, const char *prefix, const uint64_t *sizes,
						int n, uint64_t *file_bytes)
{
	size_t cap = 256 + (size_t)n * (96 + strlen(prefix)), hlen = 0;
	uint64_t data = 0, off = 0;
	unsigned char *file, *bytes;
	char *json = malloc(cap);

	if (json == NULL)
		abort();
	for (int i = 0; i < n; i++)
		data += sizes[i];
	hlen += (size_t)snprintf(json, cap, "{\"__metadata__\":{\"format\":\"pt\"}");
	for (int i = 0; i < n; i++) {
		hlen += (size_t)snprintf(json + hlen, cap - hlen,
					 ",\"%s%d\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[%llu,%llu]}", prefix, i,
					 (unsigned long long)sizes[i], (unsigned long long)off,
					 (unsigned long long)(off + sizes[i]));
		off += sizes[i];
	}
	hlen += (size_t)snprintf(json + hlen, cap - hlen, "}");
	while (hlen % 8)
		json[hlen++] = ' ';
	*file_bytes = 8 + hlen + data;
	file = malloc(*file_bytes);
	if (file == NULL)
		abort();
	for (int i = 0; i < 8; i++)
		file[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
	memcpy(file + 8, json, hlen);
	bytes = test_pattern(data, 11);
	memcpy(file + 8 + hlen, bytes, data);
	free(bytes);
	free(json);
	test_write_file(path, file, *file_bytes);
	return file;
}

static inline unsigned char *test_st_file(const char *path, const uint64_t *sizes, int n, uint64_t *file_bytes)
{
	return test_st_file_named(path, "t", sizes, n, file_bytes);
}

/*
 * host_device_setup / host_device_teardown - a cmocka fixture: the host
 * backend opened in *@state, with the default GPU count, no PCI bus ids and
 * no page size forced on pools.
 */
static inline int host_device_setup(void **state)
{
	aeg_device_t *opened = NULL;

	unsetenv("AEGAEON_HOST_GPUS");
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	if (aeg_device_open(&opened, AEG_DEVICE_HOST) < 0)
		return -1;
	*state = opened;
	return 0;
}

static inline int host_device_teardown(void **state)
{
	aeg_device_close(*state);
	return 0;
}

#endif

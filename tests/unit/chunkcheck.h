/*
 * A second process that checks a load's chunks, for the prefetch tests of
 * both backends (test_prefetch.c, tests/gpu/test_prefetch_cuda.c): the
 * parent runs itself again as "PROGRAM --child FILE SLAB_HANDLE
 * OFFSET:SIZE:FILE_OFFSET:EVENT..." (chunk_child_args), the child waits on
 * each chunk's event by handle and compares its bytes with the file's
 * (chunk_child).
 */
#ifndef AEGAEON_TESTS_CHUNKCHECK_H
#define AEGAEON_TESTS_CHUNKCHECK_H

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>

/* The child's argv for @n chunks of @path in the slab behind @slab; chunk_child_args_free frees it. */
static inline char **chunk_child_args(const char *self, const char *path, const aeg_handle_t *slab,
				      const struct aeg_chunk *c, uint32_t n)
{
	char **args = calloc(n + 5, sizeof(*args));
	char hex[AEG_HANDLE_HEX_LEN + 1];

	if (args == NULL)
		abort();
	args[0] = (char *)self;
	args[1] = "--child";
	args[2] = (char *)path;
	aeg_handle_to_hex(slab, hex);
	args[3] = strdup(hex);
	for (uint32_t i = 0; i < n; i++) {
		args[4 + i] = malloc(64 + AEG_HANDLE_HEX_LEN);
		if (args[4 + i] == NULL)
			abort();
		aeg_handle_to_hex(&c[i].event, hex);
		sprintf(args[4 + i], "%" PRIu64 ":%" PRIu64 ":%" PRIu64 ":%s", c[i].slab_offset, c[i].size,
			c[i].file_offset, hex);
	}
	return args;
}

static inline void chunk_child_args_free(char **args)
{
	for (int i = 3; args[i] != NULL; i++)
		free(args[i]);
	free(args);
}

/* The child: 0 when every chunk equals the file; 2..7 name the step that failed. */
static inline int chunk_child(enum aeg_device_kind kind, int wait_ms, int argc, char **argv)
{
	aeg_device_t *dev;
	aeg_handle_t h;
	void *base;
	unsigned char *file;
	struct stat st;
	int fd, bad = 0;

	if (aeg_device_open(&dev, kind) || aeg_handle_from_hex(argv[3], &h) ||
	    aeg_mem_open_handle(dev, 0, &h, &base)) {
		fprintf(stderr, "child: %s\n", aeg_error_detail());
		return 2;
	}
	fd = open(argv[2], O_RDONLY);
	if (fd < 0 || fstat(fd, &st))
		return 3;
	file = malloc((size_t)st.st_size);
	if (file == NULL || read(fd, file, (size_t)st.st_size) != st.st_size)
		return 4;
	close(fd);
	for (int i = 4; i < argc; i++) {
		uint64_t off, size, foff;
		char hex[AEG_HANDLE_HEX_LEN + 1];
		unsigned char *back;

		if (sscanf(argv[i], "%" SCNu64 ":%" SCNu64 ":%" SCNu64 ":%128s", &off, &size, &foff, hex) != 4 ||
		    aeg_handle_from_hex(hex, &h))
			return 5;
		if (aeg_event_wait_handle(dev, &h, wait_ms)) {
			fprintf(stderr, "child: chunk %d: %s\n", i - 4, aeg_error_detail());
			return 6;
		}
		back = malloc(size);
		if (back == NULL || aeg_memcpy(dev, back, (char *)base + off, size) || memcmp(back, file + foff, size))
			bad++;
		free(back);
	}
	free(file);
	aeg_mem_close_handle(dev, base);
	aeg_device_close(dev);
	return bad ? 7 : 0;
}

#endif

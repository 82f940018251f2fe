/* TAP lines for the GPU test programs that count checks by hand (test_cuda_core, test_slab_gpu). */
#ifndef AEGAEON_TESTS_GPU_TAP_H
#define AEGAEON_TESTS_GPU_TAP_H

#include <stdint.h>
#include <stdio.h>

#include <aegaeon/aegaeon.h>

#include "gpu_tool.h"

static int failures;
static int test_number;

/* "ok N - what", or "not ok N - what" with the library's last detail. */
static inline void check(int cond, const char *what)
{
	test_number++;
	if (cond) {
		printf("ok %d - %s\n", test_number, what);
	} else {
		printf("not ok %d - %s (last detail: %s)\n", test_number, what, aeg_error_detail());
		failures++;
	}
	fflush(stdout);
}

/* A check of the GPU's free memory: skipped where a tool keeps its own there. */
static inline void check_free(int cond, const char *what)
{
	char line[256];

	snprintf(line, sizeof(line), "%s%s", what, GPU_FREE_SKIP);
	check(!gpu_free_memory_checked() || cond, line);
}

/* GPU 0's free bytes, 0 when they cannot be read. */
static inline uint64_t gpu_free(aeg_device_t *dev)
{
	struct aeg_gpu_info info;

	if (aeg_device_gpu_info(dev, 0, &info) != 0)
		return 0;
	return info.free_bytes;
}

#endif

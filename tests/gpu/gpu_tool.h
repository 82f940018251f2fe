/* GPU tests under compute-sanitizer: which checks mean nothing there. */
#ifndef AEGAEON_TESTS_GPU_TOOL_H
#define AEGAEON_TESTS_GPU_TOOL_H

#include <stdlib.h>
#include <string.h>

/*
 * scripts/gpu-run.sh sanitize names the tool in AEGAEON_GPU_UNDER_TOOL.
 * initcheck keeps shadow memory on the device beside every allocation, so
 * the GPU's free memory no longer tells what the test allocated or freed:
 * such checks pass with a TAP "# SKIP" note saying why.
 */
static inline int gpu_free_memory_checked(void)
{
	const char *tool = getenv("AEGAEON_GPU_UNDER_TOOL");

	return tool == NULL || strcmp(tool, "initcheck") != 0;
}

#define GPU_FREE_SKIP \
	(gpu_free_memory_checked() ? "" : " # SKIP initcheck's shadow memory moves the GPU's free memory")

#endif

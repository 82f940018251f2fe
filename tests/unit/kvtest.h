/* Helpers the KV unit tests share (test_kv.c, test_kv_layout.c). */
#ifndef AEGAEON_KVTEST_H
#define AEGAEON_KVTEST_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/aegaeon.h>

#include "../gpu/gpu_gate.h"
#include "kvhandoff.h"

/* Include after cmocka.h: the gate helpers assert. */

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define WAIT_MS 20000

/* The host backend with two GPUs and a stream on GPU 0, for the whole group of tests. */
static aeg_device_t *dev;
static aeg_stream_t *stream;

static inline int kvtest_setup(void **state)
{
	setenv("AEGAEON_HOST_GPUS", "2", 1);
	if (aeg_device_open(&dev, AEG_DEVICE_HOST) || aeg_stream_create(dev, 0, &stream))
		return -1;
	return 0;
}

static inline int kvtest_teardown(void **state)
{
	aeg_stream_destroy(stream);
	aeg_device_close(dev);
	return 0;
}

/* The GPU tests' gate (a host function holding a stream), with asserts and the stream drained. */
static inline void gate_hold(struct gate *g, aeg_stream_t *s)
{
	assert_int_equal(gate_close(g, s), 0);
}

static inline void gate_release(struct gate *g, aeg_stream_t *s)
{
	gate_open(g);
	assert_int_equal(aeg_stream_sync(s), 0);
	pthread_cond_destroy(&g->cv);
	pthread_mutex_destroy(&g->lock);
}

/* A pool buffer size holding whole blocks: a multiple of the block and of 4 KiB, >= 64 KiB. */
static inline uint64_t buffer_for(uint64_t block)
{
	uint64_t a = block, b = 4096, buffer;

	while (b) {
		uint64_t t = a % b;

		a = b;
		b = t;
	}
	buffer = block / a * 4096;
	while (buffer < 64 * KiB)
		buffer *= 2;
	return buffer;
}

#endif

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

static inline uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Bytes a block gets from @seed: the child of the handoff test makes the same. */
static inline void fill_pattern(void *p, size_t bytes, uint64_t seed)
{
	uint64_t s = seed, v;
	unsigned char *c = p;

	for (size_t i = 0; i < bytes; i += 8) {
		v = splitmix(&s);
		memcpy(c + i, &v, bytes - i < 8 ? bytes - i : 8);
	}
}

static inline void shuffle(uint32_t *a, size_t n, uint64_t *s)
{
	for (size_t i = n; i > 1; i--) {
		size_t j = splitmix(s) % i;
		uint32_t t = a[i - 1];

		a[i - 1] = a[j];
		a[j] = t;
	}
}

static inline int all_bytes(const void *p, int value, size_t bytes)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < bytes; i++)
		if (c[i] != (unsigned char)value)
			return 0;
	return 1;
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

/* Helpers the KV unit tests share (test_kv.c, test_kv_layout.c). */
#ifndef AEGAEON_KVTEST_H
#define AEGAEON_KVTEST_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <aegaeon/aegaeon.h>

/* Include after cmocka.h: the gate helpers assert. */

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define WAIT_MS 20000

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

/* A host function that holds a stream until the test opens the gate. */
struct gate {
	pthread_mutex_t lock;
	pthread_cond_t cv;
	int open;
};

static inline void gate_fn(void *arg)
{
	struct gate *g = arg;

	pthread_mutex_lock(&g->lock);
	while (!g->open)
		pthread_cond_wait(&g->cv, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

static inline void gate_close(struct gate *g, aeg_stream_t *s)
{
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cv, NULL);
	g->open = 0;
	assert_int_equal(aeg_stream_launch_host_fn(s, gate_fn, g), 0);
}

static inline void gate_open(struct gate *g, aeg_stream_t *s)
{
	pthread_mutex_lock(&g->lock);
	g->open = 1;
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->lock);
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

/*
 * What the KV tests of both backends share (test_kv.c and test_kv_layout.c
 * through kvtest.h, tests/gpu/test_kv_cuda.c and test_kv_layout_cuda.c):
 * block contents, and process B of the cross-process handoff.
 */
#ifndef AEGAEON_TESTS_KVHANDOFF_H
#define AEGAEON_TESTS_KVHANDOFF_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>

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

/* The handoff: @n blocks of @block bytes, block i filled with fill_pattern(@seed + i). */
struct kv_handoff {
	enum aeg_device_kind kind;
	int n;
	uint64_t block;
	uint64_t seed;
	int wait_ms;
};

/* Process B's blocks: A's host blocks @host_ids swapped into GPU blocks n-1..0 and read back. */
static inline int handoff_swap_in(const struct kv_handoff *ho, aeg_device_t *dev, aeg_stream_t *s,
				  aeg_kv_t *kv, const aeg_handle_t *h, const uint32_t *host_ids,
				  uint32_t *gpu_ids, unsigned char *back)
{
	aeg_handle_t hin;

	for (int i = 0; i < ho->n; i++)
		gpu_ids[i] = (uint32_t)(ho->n - 1 - i);
	if (aeg_event_wait_handle(dev, h, ho->wait_ms)) {
		fprintf(stderr, "# child wait: %s\n", aeg_error_detail());
		return 5;
	}
	if (aeg_kv_swap_in(kv, host_ids, gpu_ids, (size_t)ho->n, s, &hin) ||
	    aeg_event_wait_handle(dev, &hin, ho->wait_ms) ||
	    aeg_memcpy(dev, back, aeg_kv_gpu_ptr(kv, 0), (size_t)ho->n * ho->block)) {
		fprintf(stderr, "# child swap in: %s\n", aeg_error_detail());
		return 6;
	}
	return 0;
}

/*
 * kv_handoff_child - process B, run as "PROGRAM --handoff-child POOL_FD
 * HANDLE IDS READY_FD" (@argv as main has it): attach A's pinned pool (its
 * memfd inherited as POOL_FD), see that A's swap-out event HANDLE is still
 * pending, say so on READY_FD, wait for it, swap A's host blocks IDS
 * (comma-separated) into GPU blocks of a cache of its own and compare each
 * with what A wrote. 0 when every block matches; 1 when some differ;
 * 2..8 name the step that failed.
 */
static inline int kv_handoff_child(const struct kv_handoff *ho, char **argv)
{
	struct aeg_kv_params p = { .block_bytes = ho->block, .gpu_blocks = (uint32_t)ho->n };
	uint32_t *host_ids = calloc((size_t)ho->n, sizeof(*host_ids)), *gpu_ids = calloc((size_t)ho->n, sizeof(*gpu_ids));
	unsigned char *expect = malloc(ho->block), *back = malloc((size_t)ho->n * ho->block);
	aeg_device_t *dev;
	aeg_stream_t *s;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_kv_t *kv;
	aeg_handle_t h;
	char *cur = argv[4];
	int bad = 0, rc;

	if (!host_ids || !gpu_ids || !expect || !back)
		return 2;
	for (int i = 0; i < ho->n; i++) {
		host_ids[i] = (uint32_t)strtoul(cur, &cur, 10);
		cur += *cur == ',';
	}
	if (aeg_handle_from_hex(argv[3], &h) || aeg_device_open(&dev, ho->kind) || aeg_stream_create(dev, 0, &s) ||
	    aeg_pool_attach(dev, atoi(argv[2]), &pool) || aeg_slab_create(dev, 0, (uint64_t)ho->n * ho->block, &slab)) {
		fprintf(stderr, "# child setup: %s\n", aeg_error_detail());
		return 3;
	}
	p.slab = slab;
	p.pool = pool;                  /* host_buffers 0: the producer owns the host blocks */
	if (aeg_kv_create(dev, 0, &p, &kv)) {
		fprintf(stderr, "# child kv: %s\n", aeg_error_detail());
		return 4;
	}
	/* A's stream is held until we say we are ready: the event must be pending now. */
	if (aeg_event_wait_handle(dev, &h, 0) != AEG_ETIMEDOUT) {
		fprintf(stderr, "# child: A's event is not pending: %s\n", aeg_error_detail());
		return 7;
	}
	if (write(atoi(argv[5]), "r", 1) != 1)
		return 8;
	rc = handoff_swap_in(ho, dev, s, kv, &h, host_ids, gpu_ids, back);
	for (int i = 0; rc == 0 && i < ho->n; i++) {
		fill_pattern(expect, ho->block, ho->seed + (uint64_t)i);
		bad += memcmp(back + gpu_ids[i] * ho->block, expect, ho->block) != 0;
	}
	aeg_kv_destroy(kv);
	aeg_slab_destroy(slab);
	aeg_pool_destroy(pool);
	aeg_stream_destroy(s);
	aeg_device_close(dev);
	free(back);
	free(expect);
	free(gpu_ids);
	free(host_ids);
	if (bad)
		fprintf(stderr, "# child: %d blocks differ\n", bad);
	return rc ? rc : bad ? 1 : 0;
}

#endif

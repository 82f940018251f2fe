/* KV cache on the host backend: round trips, per-layer events, errors, cross-process handoff, leaks. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "device_internal.h"
#include "internal.h"
#include "kvtest.h"
#include "testutil.h"



/* ------------------------------------------------------------ helpers */

/* A cache over a slab of its own and a pool of its own. */
struct cache {
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_kv_t *kv;
	uint64_t block;
	uint32_t gpu_blocks, host_blocks;
	uint32_t per_buffer;
};

static void cache_make(struct cache *c, uint64_t block, uint32_t gpu_blocks, uint32_t host_buffers,
		       uint32_t spare_buffers)
{
	uint64_t buffer = buffer_for(block);
	struct aeg_kv_params p = { 0 };

	memset(c, 0, sizeof(*c));
	c->block = block;
	c->per_buffer = (uint32_t)(buffer / block);
	assert_int_equal(aeg_slab_create(dev, 0, gpu_blocks * block + 64 * KiB, &c->slab), 0);
	assert_int_equal(aeg_pool_create(dev, 0, buffer, (host_buffers + spare_buffers) * buffer,
					 &c->pool), 0);
	p.block_bytes = block;
	p.slab = c->slab;
	p.gpu_blocks = gpu_blocks;
	p.pool = c->pool;
	p.host_buffers = host_buffers;
	assert_int_equal(aeg_kv_create(dev, 0, &p, &c->kv), 0);
	c->gpu_blocks = gpu_blocks;
	c->host_blocks = (host_buffers + spare_buffers) * c->per_buffer;
}

static void cache_free(struct cache *c)
{
	struct aeg_slab_stats ss;
	struct aeg_pool_stats ps;

	aeg_kv_destroy(c->kv);
	assert_int_equal(aeg_slab_stats(c->slab, &ss), 0);
	assert_int_equal(ss.used_bytes, 0);
	assert_int_equal(ss.blocks, 0);
	assert_int_equal(aeg_pool_stats(c->pool, &ps), 0);
	assert_int_equal(ps.in_use, 0);
	aeg_pool_destroy(c->pool);
	aeg_slab_destroy(c->slab);
}

static void kv_stats(aeg_kv_t *kv, struct aeg_kv_stats *st)
{
	assert_int_equal(aeg_kv_stats(kv, st), 0);
}

/* ----------------------------------------------------------- round trips */

/*
 * Random data out through a random permutation and back in through another;
 * blocks not named by a call must keep their bytes (a scatter writing one
 * block too far shows here).
 */
static void round_trip(uint64_t block, uint32_t gpu_blocks, uint32_t n, uint64_t seed)
{
	struct cache c;
	struct aeg_kv_stats st;
	uint32_t *gpu_all, *host_all, *gpu_in;
	unsigned char *expect, *named;
	aeg_handle_t h_out, h_in;
	uint32_t owned;
	uint64_t rs = seed;

	cache_make(&c, block, gpu_blocks, gpu_blocks / (uint32_t)(buffer_for(block) / block) + 1, 2);
	kv_stats(c.kv, &st);
	owned = st.host_owned;
	assert_true(owned >= n);

	gpu_all = malloc(gpu_blocks * sizeof(uint32_t));
	host_all = malloc(owned * sizeof(uint32_t));
	gpu_in = malloc(gpu_blocks * sizeof(uint32_t));
	expect = malloc(block);
	named = calloc(c.host_blocks > gpu_blocks ? c.host_blocks : gpu_blocks, 1);
	assert_true(gpu_all && host_all && gpu_in && expect && named);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, gpu_blocks, gpu_all), 0);
	assert_int_equal(aeg_kv_host_alloc(c.kv, owned, host_all), 0);
	shuffle(gpu_all, gpu_blocks, &rs);
	shuffle(host_all, owned, &rs);

	/* The host backend's device memory is host memory: fill and check it directly. */
	for (uint32_t i = 0; i < gpu_blocks; i++)
		fill_pattern(aeg_kv_gpu_ptr(c.kv, i), block, seed * 1000003 + i);
	memset(aeg_kv_host_ptr(c.kv, 0), 0xa5, (size_t)c.host_blocks * block);

	assert_int_equal(aeg_kv_swap_out(c.kv, gpu_all, host_all, n, stream, &h_out), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h_out, WAIT_MS), 0);
	for (uint32_t i = 0; i < n; i++) {
		assert_memory_equal(aeg_kv_host_ptr(c.kv, host_all[i]), aeg_kv_gpu_ptr(c.kv, gpu_all[i]), block);
		named[host_all[i]] = 1;
	}
	for (uint32_t id = 0; id < c.host_blocks; id++)
		if (!named[id])
			assert_true(all_bytes(aeg_kv_host_ptr(c.kv, id), 0xa5, block));

	/* Back in, to other GPU blocks in another order. */
	memcpy(gpu_in, gpu_all, gpu_blocks * sizeof(uint32_t));
	shuffle(gpu_in, gpu_blocks, &rs);
	memset(aeg_kv_gpu_ptr(c.kv, 0), 0x5a, (size_t)gpu_blocks * block);
	assert_int_equal(aeg_kv_swap_in(c.kv, host_all, gpu_in, n, stream, &h_in), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h_in, WAIT_MS), 0);
	memset(named, 0, gpu_blocks);
	for (uint32_t i = 0; i < n; i++) {
		fill_pattern(expect, block, seed * 1000003 + gpu_all[i]);
		assert_memory_equal(aeg_kv_gpu_ptr(c.kv, gpu_in[i]), expect, block);
		named[gpu_in[i]] = 1;
	}
	for (uint32_t id = 0; id < gpu_blocks; id++)
		if (!named[id])
			assert_true(all_bytes(aeg_kv_gpu_ptr(c.kv, id), 0x5a, block));

	kv_stats(c.kv, &st);
	assert_int_equal(st.swaps_out, 1);
	assert_int_equal(st.swaps_in, 1);
	assert_int_equal(st.blocks_out, n);
	assert_int_equal(st.blocks_in, n);
	assert_int_equal(st.events_live, 2);
	assert_int_equal(aeg_kv_release(c.kv, &h_out), 0);
	assert_int_equal(aeg_kv_release(c.kv, &h_in), 0);
	assert_int_equal(aeg_kv_release(c.kv, &h_in), AEG_ENOENT);
	assert_int_equal(aeg_kv_gpu_free(c.kv, gpu_all, gpu_blocks), 0);
	assert_int_equal(aeg_kv_host_free(c.kv, host_all, owned), 0);
	kv_stats(c.kv, &st);
	assert_int_equal(st.events_live, 0);
	assert_int_equal(st.gpu_used, 0);
	assert_int_equal(st.host_used, 0);

	free(named);
	free(expect);
	free(gpu_in);
	free(host_all);
	free(gpu_all);
	cache_free(&c);
}

static void round_trip_256(void **state)
{
	round_trip(256, 8192, 6000, 1);
}

static void round_trip_4k(void **state)
{
	round_trip(4 * KiB, 1024, 700, 2);
}

static void round_trip_32k(void **state)
{
	round_trip(32 * KiB, 256, 200, 3);
}

static void round_trip_2m(void **state)
{
	round_trip(2 * MiB, 12, 9, 4);
}

/* Odd sizes: a multiple of 256 that is no power of two, one block per call. */
static void round_trip_odd_size_and_single_block(void **state)
{
	round_trip(768, 64, 1, 5);
	round_trip(768, 64, 64, 6);
}

/* ------------------------------------------------------------- layers */

static void per_layer_events(void **state)
{
	enum { LAYERS = 4, PER = 16, N = LAYERS * PER };
	const uint64_t block = 4 * KiB;
	size_t ends[LAYERS];
	aeg_handle_t lh[LAYERS], lh_in[LAYERS], h, h_in;
	struct aeg_kv_layers layers = { LAYERS, ends, lh };
	struct aeg_kv_layers layers_in = { LAYERS, ends, lh_in };
	uint32_t gpu_ids[N], host_ids[N];
	struct aeg_kv_stats st;
	struct gate g;
	struct cache c;
	int err, pending, distinct = 1;

	cache_make(&c, block, N, 8, 0);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, N, gpu_ids), 0);
	assert_int_equal(aeg_kv_host_alloc(c.kv, N, host_ids), 0);
	for (int l = 0; l < LAYERS; l++)
		ends[l] = (size_t)(l + 1) * PER;
	for (uint32_t i = 0; i < N; i++)
		fill_pattern(aeg_kv_gpu_ptr(c.kv, gpu_ids[i]), block, 77 + i);
	memset(aeg_kv_host_ptr(c.kv, 0), 0, (size_t)c.host_blocks * block);

	/* No assertion while the gate is shut: a failure would leave the stream held. */
	gate_hold(&g, stream);
	err = aeg_kv_swap_out_layers(c.kv, gpu_ids, host_ids, N, &layers, stream, &h);
	/* Nothing ran yet: every event pending, every handle distinct. */
	pending = aeg_event_wait_handle(dev, &h, 0) == AEG_ETIMEDOUT;
	for (int l = 0; l < LAYERS; l++) {
		pending &= aeg_event_wait_handle(dev, &lh[l], 0) == AEG_ETIMEDOUT;
		distinct &= memcmp(lh[l].bytes, h.bytes, AEG_HANDLE_BYTES) != 0;
		for (int m = 0; m < l; m++)
			distinct &= memcmp(lh[l].bytes, lh[m].bytes, AEG_HANDLE_BYTES) != 0;
	}
	kv_stats(c.kv, &st);
	pthread_mutex_lock(&g.lock);
	g.open = 1;
	pthread_cond_broadcast(&g.cv);
	pthread_mutex_unlock(&g.lock);
	assert_int_equal(err, 0);
	assert_true(pending);
	assert_true(distinct);
	assert_int_equal(st.events_live, LAYERS + 1);

	for (int l = 0; l < LAYERS; l++) {
		assert_int_equal(aeg_event_wait_handle(dev, &lh[l], WAIT_MS), 0);
		for (size_t i = l * PER; i < ends[l]; i++)
			assert_memory_equal(aeg_kv_host_ptr(c.kv, host_ids[i]),
					    aeg_kv_gpu_ptr(c.kv, gpu_ids[i]), block);
	}
	assert_int_equal(aeg_event_wait_handle(dev, &h, WAIT_MS), 0);
	assert_int_equal(aeg_stream_sync(stream), 0);
	pthread_cond_destroy(&g.cv);
	pthread_mutex_destroy(&g.lock);

	/* And back in by layers, into zeroed GPU blocks. */
	memset(aeg_kv_gpu_ptr(c.kv, 0), 0, (size_t)N * block);
	assert_int_equal(aeg_kv_swap_in_layers(c.kv, host_ids, gpu_ids, N, &layers_in, stream, &h_in), 0);
	for (int l = LAYERS - 1; l >= 0; l--)
		assert_int_equal(aeg_event_wait_handle(dev, &lh_in[l], WAIT_MS), 0);
	for (uint32_t i = 0; i < N; i++) {
		unsigned char expect[4 * KiB];

		fill_pattern(expect, block, 77 + i);
		assert_memory_equal(aeg_kv_gpu_ptr(c.kv, gpu_ids[i]), expect, block);
	}

	/* A layer handle is not a call's: only the call's releases them all. */
	assert_int_equal(aeg_kv_release(c.kv, &lh[0]), AEG_ENOENT);
	assert_int_equal(aeg_kv_release(c.kv, &h), 0);
	assert_int_equal(aeg_kv_release(c.kv, &h_in), 0);
	kv_stats(c.kv, &st);
	assert_int_equal(st.events_live, 0);
	cache_free(&c);
}

/*
 * An event completes only after its blocks are there: with 64 MiB per call
 * the copy takes milliseconds, so a record queued before the copy (or a
 * layer's record before its layer) would let the waiter see old bytes.
 */
static void events_complete_after_the_data(void **state)
{
	enum { LAYERS = 4, N = 256 };
	const uint64_t block = 256 * KiB;
	uint32_t gpu_ids[N], host_ids[N];
	size_t ends[LAYERS];
	aeg_handle_t lh[LAYERS], h;
	struct aeg_kv_layers layers = { LAYERS, ends, lh };
	struct cache c;

	cache_make(&c, block, N, N, 0);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, N, gpu_ids), 0);
	assert_int_equal(aeg_kv_host_alloc(c.kv, N, host_ids), 0);
	for (int l = 0; l < LAYERS; l++)
		ends[l] = (size_t)(l + 1) * (N / LAYERS);
	for (int round = 0; round < 3; round++) {
		unsigned char v = (unsigned char)(0x31 + round);

		memset(aeg_kv_gpu_ptr(c.kv, 0), v, (size_t)N * block);
		memset(aeg_kv_host_ptr(c.kv, 0), 0, (size_t)c.host_blocks * block);
		if (round == 0) {
			assert_int_equal(aeg_kv_swap_out(c.kv, gpu_ids, host_ids, N, stream, &h), 0);
			assert_int_equal(aeg_event_wait_handle(dev, &h, WAIT_MS), 0);
			for (uint32_t i = 0; i < N; i++)
				assert_int_equal(*((unsigned char *)aeg_kv_host_ptr(c.kv, host_ids[i]) + block - 1), v);
		} else {
			assert_int_equal(aeg_kv_swap_out_layers(c.kv, gpu_ids, host_ids, N, &layers, stream, &h), 0);
			for (int l = 0; l < LAYERS; l++) {
				assert_int_equal(aeg_event_wait_handle(dev, &lh[l], WAIT_MS), 0);
				for (size_t i = l ? ends[l - 1] : 0; i < ends[l]; i++)
					assert_int_equal(*((unsigned char *)aeg_kv_host_ptr(c.kv, host_ids[i]) + block - 1), v);
			}
		}
		assert_int_equal(aeg_stream_sync(stream), 0);
		assert_int_equal(aeg_kv_release(c.kv, &h), 0);
	}
	assert_int_equal(aeg_kv_gpu_free(c.kv, gpu_ids, N), 0);
	assert_int_equal(aeg_kv_host_free(c.kv, host_ids, N), 0);
	cache_free(&c);
}

/* ------------------------------------------------------------- errors */

/*
 * Each bad call with the code it must give. Before each, every destination
 * block holds a sentinel; after, it still does, the stats are unchanged and
 * no event or fd was made.
 */
struct bad_swap {
	const char *name;
	int out;                        /* swap-out, else swap-in */
	uint32_t gpu[4], host[4];
	size_t n;
	int null_gpu, null_host, null_stream, other_gpu_stream, no_handle;
	int layered;
	size_t ends[3], nlayers;
	const char *detail;             /* a word the detail must have */
};

static void swap_errors_move_nothing(void **state)
{
	static const struct bad_swap cases[] = {
		{ "n = 0", 1, { 0 }, { 0 }, 0, .detail = "0 blocks" },
		{ "GPU id out of range", 1, { 1, 64 }, { 1, 2 }, 2, .detail = "out of range" },
		{ "host id out of range", 0, { 1, 2 }, { 3, 1000000 }, 2, .detail = "out of range" },
		{ "GPU id twice", 1, { 5, 6, 5 }, { 1, 2, 3 }, 3, .detail = "twice" },
		{ "host id twice", 0, { 5, 6, 7 }, { 9, 9, 3 }, 3, .detail = "twice" },
		{ "max id", 1, { UINT32_MAX }, { 0 }, 1, .detail = "out of range" },
		{ "NULL GPU ids", 1, { 0 }, { 0 }, 1, .null_gpu = 1, .detail = "GPU" },
		{ "NULL host ids", 0, { 0 }, { 0 }, 1, .null_host = 1, .detail = "host" },
		{ "NULL stream", 1, { 0 }, { 0 }, 1, .null_stream = 1, .detail = "stream" },
		{ "stream of GPU 1", 0, { 0 }, { 0 }, 1, .other_gpu_stream = 1, .detail = "GPU 1" },
		{ "layers not increasing", 1, { 1, 2, 3 }, { 1, 2, 3 }, 3, .layered = 1,
		  .ends = { 2, 2, 3 }, .nlayers = 3, .detail = "increase" },
		{ "last layer short of n", 1, { 1, 2, 3 }, { 1, 2, 3 }, 3, .layered = 1,
		  .ends = { 1, 2 }, .nlayers = 2, .detail = "last layer" },
		{ "0 layers", 0, { 1 }, { 1 }, 1, .layered = 1, .nlayers = 0, .detail = "0 layers" },
		{ "layers without a call handle", 0, { 1 }, { 1 }, 1, .layered = 1, .ends = { 1 },
		  .nlayers = 1, .no_handle = 1, .detail = "handle" },
	};
	const uint64_t block = 4 * KiB;
	struct aeg_kv_stats before, after;
	aeg_stream_t *other;
	struct cache c;
	int fds;

	cache_make(&c, block, 64, 4, 0);
	assert_int_equal(aeg_stream_create(dev, 1, &other), 0);
	kv_stats(c.kv, &before);
	fds = count_fds();
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		const struct bad_swap *t = &cases[i];
		aeg_handle_t h, lh[3];
		struct aeg_kv_layers layers = { t->nlayers, t->ends, lh };
		const uint32_t *gpu = t->null_gpu ? NULL : t->gpu;
		const uint32_t *host = t->null_host ? NULL : t->host;
		aeg_stream_t *s = t->null_stream ? NULL : t->other_gpu_stream ? other : stream;
		aeg_handle_t *hp = t->no_handle ? NULL : &h;
		int err;

		memset(aeg_kv_gpu_ptr(c.kv, 0), 0x11, 64 * block);
		memset(aeg_kv_host_ptr(c.kv, 0), 0x22, (size_t)c.host_blocks * block);
		if (t->layered && t->out)
			err = aeg_kv_swap_out_layers(c.kv, gpu, host, t->n, &layers, s, hp);
		else if (t->layered)
			err = aeg_kv_swap_in_layers(c.kv, host, gpu, t->n, &layers, s, hp);
		else if (t->out)
			err = aeg_kv_swap_out(c.kv, gpu, host, t->n, s, hp);
		else
			err = aeg_kv_swap_in(c.kv, host, gpu, t->n, s, hp);
		assert_int_equal(aeg_stream_sync(stream), 0);
		if (err != AEG_EINVAL || !strstr(aeg_error_detail(), t->detail))
			fail_msg("%s: got %s \"%s\", want AEG_EINVAL with \"%s\"", t->name,
				 aeg_errname(err), aeg_error_detail(), t->detail);
		assert_true(all_bytes(aeg_kv_gpu_ptr(c.kv, 0), 0x11, 64 * block));
		assert_true(all_bytes(aeg_kv_host_ptr(c.kv, 0), 0x22, (size_t)c.host_blocks * block));
		kv_stats(c.kv, &after);
		assert_memory_equal(&before, &after, sizeof(before));
		assert_int_equal(count_fds(), fds);
	}
	/* The marks of the failed calls were cleared: the same ids now work. */
	{
		uint32_t g[3] = { 5, 6, 7 }, hh[3] = { 9, 10, 3 };
		aeg_handle_t h;

		assert_int_equal(aeg_kv_swap_in(c.kv, hh, g, 3, stream, &h), 0);
		assert_int_equal(aeg_event_wait_handle(dev, &h, WAIT_MS), 0);
		assert_true(all_bytes(aeg_kv_gpu_ptr(c.kv, 5), 0x22, block));
		assert_int_equal(aeg_kv_release(c.kv, &h), 0);
	}
	assert_int_equal(aeg_stream_destroy(other), 0);
	cache_free(&c);
}

static void create_errors_hold_nothing(void **state)
{
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_kv_t *kv = (aeg_kv_t *)&kv;
	struct aeg_slab_stats ss;
	struct aeg_pool_stats ps;
	unsigned char *range;
	int fds;
	struct {
		const char *name;
		struct aeg_kv_params p;
		int gpu, err;
		const char *detail;
	} cases[] = {
		{ "block 0", { .block_bytes = 0, .gpu_blocks = 4, .host_buffers = 1 }, 0, AEG_EINVAL, "multiple of 256" },
		{ "block 100", { .block_bytes = 100, .gpu_blocks = 4, .host_buffers = 1 }, 0, AEG_EINVAL, "multiple of 256" },
		{ "block 4097", { .block_bytes = 4097, .gpu_blocks = 4, .host_buffers = 1 }, 0, AEG_EINVAL, "multiple of 256" },
		{ "block 128 MiB", { .block_bytes = 128 * MiB, .gpu_blocks = 1, .host_buffers = 1 }, 0, AEG_EINVAL, "multiple of 256" },
		{ "block not dividing the buffer", { .block_bytes = 768, .gpu_blocks = 4, .host_buffers = 1 }, 0, AEG_EINVAL, "does not divide" },
		{ "0 GPU blocks", { .block_bytes = 4096, .gpu_blocks = 0, .host_buffers = 1 }, 0, AEG_EINVAL, "0 GPU blocks" },
		{ "slab too small", { .block_bytes = 64 * KiB, .gpu_blocks = 1000, .host_buffers = 1 }, 0, AEG_ENOSPC, "KV cache" },
		{ "pool too small", { .block_bytes = 4096, .gpu_blocks = 4, .host_buffers = 9 }, 0, AEG_ENOSPC, "only 8" },
		{ "GPU out of range", { .block_bytes = 4096, .gpu_blocks = 4, .host_buffers = 1 }, 7, AEG_ENODEV, "" },
		{ "slab of another GPU", { .block_bytes = 4096, .gpu_blocks = 4, .host_buffers = 1 }, 1, AEG_EINVAL, "another" },
	};

	assert_int_equal(aeg_slab_create(dev, 0, 1 * MiB, &slab), 0);
	assert_int_equal(aeg_pool_create(dev, 0, 64 * KiB, 8 * 64 * KiB, &pool), 0);
	fds = count_fds();
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		int err;

		cases[i].p.slab = slab;
		cases[i].p.pool = pool;
		err = aeg_kv_create(dev, cases[i].gpu, &cases[i].p, &kv);
		if (err != cases[i].err || !strstr(aeg_error_detail(), cases[i].detail))
			fail_msg("%s: got %s \"%s\", want %s with \"%s\"", cases[i].name, aeg_errname(err),
				 aeg_error_detail(), aeg_errname(cases[i].err), cases[i].detail);
		assert_null(kv);
		assert_int_equal(aeg_slab_stats(slab, &ss), 0);
		assert_int_equal(ss.used_bytes, 0);
		assert_int_equal(aeg_pool_stats(pool, &ps), 0);
		assert_int_equal(ps.in_use, 0);
		assert_int_equal(count_fds(), fds);
	}

	/* Sources: both or neither of a side, misaligned or tiny ranges, overlap. */
	range = aligned_alloc(4096, 1 * MiB);
	assert_non_null(range);
	{
		struct {
			const char *name;
			struct aeg_kv_params p;
			const char *detail;
		} src[] = {
			{ "slab and range", { .block_bytes = 4096, .slab = slab, .gpu_blocks = 1, .gpu_base = range, .gpu_bytes = 8192, .pool = pool }, "not several" },
			{ "no GPU side", { .block_bytes = 4096, .pool = pool }, "not none" },
			{ "pool and range", { .block_bytes = 4096, .slab = slab, .gpu_blocks = 1, .pool = pool, .host_base = range, .host_bytes = 8192 }, "not several" },
			{ "no host side", { .block_bytes = 4096, .slab = slab, .gpu_blocks = 1 }, "not none" },
			{ "misaligned GPU range", { .block_bytes = 4096, .gpu_base = range + 16, .gpu_bytes = 8192, .pool = pool }, "aligned" },
			{ "misaligned host range", { .block_bytes = 4096, .slab = slab, .gpu_blocks = 1, .host_base = range + 8, .host_bytes = 8192 }, "aligned" },
			{ "GPU range under a block", { .block_bytes = 4096, .gpu_base = range, .gpu_bytes = 4095, .pool = pool }, "smaller than one" },
			{ "host range under a block", { .block_bytes = 4096, .slab = slab, .gpu_blocks = 1, .host_base = range, .host_bytes = 100 }, "smaller than one" },
			{ "overlapping ranges", { .block_bytes = 4096, .gpu_base = range, .gpu_bytes = 64 * KiB, .host_base = range + 32 * KiB, .host_bytes = 64 * KiB }, "overlap" },
			/* A range whose end wraps past the top of the address space onto the other. */
			{ "GPU range wrapping onto the host range", { .block_bytes = 1 * MiB, .gpu_base = (unsigned char *)(UINTPTR_MAX - 1 * MiB + 1),
			  .gpu_bytes = (uint64_t)(uintptr_t)range + 2 * MiB, .host_base = range, .host_bytes = 1 * MiB }, "wraps around" },
			{ "host range wrapping", { .block_bytes = 4096, .slab = slab, .gpu_blocks = 1, .host_base = (unsigned char *)(UINTPTR_MAX - 64 * KiB + 1),
			  .host_bytes = 128 * KiB }, "wraps around" },
		};

		for (size_t i = 0; i < AEG_ARRAY_SIZE(src); i++) {
			int err = aeg_kv_create(dev, 0, &src[i].p, &kv);

			if (err != AEG_EINVAL || !strstr(aeg_error_detail(), src[i].detail))
				fail_msg("%s: got %s \"%s\", want AEG_EINVAL with \"%s\"", src[i].name,
					 aeg_errname(err), aeg_error_detail(), src[i].detail);
			assert_null(kv);
			assert_int_equal(aeg_slab_stats(slab, &ss), 0);
			assert_int_equal(ss.used_bytes, 0);
			assert_int_equal(count_fds(), fds);
		}
	}
	/* Buffers held by others: the cache gets what it asked or nothing. */
	{
		struct aeg_pool_buffer held[7];
		struct aeg_kv_params p = { .block_bytes = 4096, .slab = slab, .gpu_blocks = 4, .pool = pool,
					   .host_buffers = 2 };

		for (int i = 0; i < 7; i++)
			assert_int_equal(aeg_pool_acquire(pool, 0, &held[i]), 0);
		assert_int_equal(aeg_kv_create(dev, 0, &p, &kv), AEG_ENOSPC);
		assert_non_null(strstr(aeg_error_detail(), "only 1 of 8"));
		assert_int_equal(aeg_pool_stats(pool, &ps), 0);
		assert_int_equal(ps.in_use, 7);
		for (int i = 0; i < 7; i++)
			assert_int_equal(aeg_pool_release(pool, held[i].index), 0);
	}
	assert_int_equal(aeg_kv_create(NULL, 0, &cases[0].p, &kv), AEG_EINVAL);
	assert_int_equal(aeg_kv_create(dev, 0, NULL, &kv), AEG_EINVAL);
	assert_int_equal(aeg_kv_create(dev, 0, &cases[0].p, NULL), AEG_EINVAL);
	free(range);
	aeg_pool_destroy(pool);
	aeg_slab_destroy(slab);
}

static void alloc_and_free(void **state)
{
	uint32_t ids[80], more[2];
	struct aeg_kv_stats st;
	struct aeg_pool_stats ps;
	struct cache c;
	unsigned char *base;

	/* 4 host buffers of 16 blocks owned out of 6; 64 GPU blocks. */
	cache_make(&c, 4 * KiB, 64, 4, 2);
	kv_stats(c.kv, &st);
	assert_int_equal(st.gpu_blocks, 64);
	assert_int_equal(st.host_blocks, 6 * 16);
	assert_int_equal(st.host_owned, 4 * 16);
	assert_int_equal(aeg_pool_stats(c.pool, &ps), 0);
	assert_int_equal(ps.in_use, 4);

	/* GPU ids come out ascending and distinct; one more is ENOSPC. */
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, 64, ids), 0);
	for (uint32_t i = 0; i < 64; i++)
		assert_int_equal(ids[i], i);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, 1, more), AEG_ENOSPC);
	assert_non_null(strstr(aeg_error_detail(), "0 free of 64"));
	kv_stats(c.kv, &st);
	assert_int_equal(st.gpu_used, 64);

	/* Freeing checks everything first: a bad entry frees nothing. */
	{
		uint32_t twice[3] = { 3, 4, 3 }, outside[2] = { 5, 64 };

		assert_int_equal(aeg_kv_gpu_free(c.kv, twice, 3), AEG_EINVAL);
		assert_int_equal(aeg_kv_gpu_free(c.kv, outside, 2), AEG_EINVAL);
		assert_int_equal(aeg_kv_gpu_free(c.kv, twice, 0), AEG_EINVAL);
		kv_stats(c.kv, &st);
		assert_int_equal(st.gpu_used, 64);
	}
	assert_int_equal(aeg_kv_gpu_free(c.kv, ids, 10), 0);
	assert_int_equal(aeg_kv_gpu_free(c.kv, ids, 1), AEG_EINVAL);     /* not allocated now */
	assert_non_null(strstr(aeg_error_detail(), "not allocated"));
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, 11, ids), AEG_ENOSPC);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, 10, ids), 0);
	assert_int_equal(aeg_kv_gpu_free(c.kv, ids, 10), 0);
	for (uint32_t i = 0; i < 54; i++)
		ids[i] = 10 + i;
	assert_int_equal(aeg_kv_gpu_free(c.kv, ids, 54), 0);

	/* Host ids name blocks of the pool buffers the cache acquired. */
	assert_int_equal(aeg_kv_host_alloc(c.kv, 64, ids), 0);
	assert_int_equal(aeg_kv_host_alloc(c.kv, 1, more), AEG_ENOSPC);
	base = aeg_pool_base(c.pool);
	for (uint32_t i = 0; i < 64; i++) {
		unsigned char *p = aeg_kv_host_ptr(c.kv, ids[i]);
		int held = 0;

		assert_ptr_equal(p, base + (uint64_t)ids[i] * 4 * KiB);
		assert_true(ids[i] < 6 * 16);
		/* Every block of each acquired buffer is handed out. */
		for (uint32_t j = 0; j < 64; j++)
			held += ids[j] / 16 == ids[i] / 16;
		assert_int_equal(held, 16);
	}
	assert_int_equal(aeg_kv_host_free(c.kv, ids, 64), 0);
	assert_null(aeg_kv_gpu_ptr(c.kv, 64));
	assert_null(aeg_kv_host_ptr(c.kv, 6 * 16));
	assert_int_equal(aeg_kv_block_bytes(c.kv), 4 * KiB);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, 0, ids), AEG_EINVAL);
	assert_int_equal(aeg_kv_gpu_alloc(NULL, 1, ids), AEG_EINVAL);
	cache_free(&c);
}

static void one_buffer_copies(void **state)
{
	const size_t bytes = 3 * MiB + 256;
	unsigned char *host = malloc(bytes), *back = malloc(bytes);
	struct aeg_kv_stats st;
	aeg_handle_t h1, h2;
	struct cache c;
	void *gpu;

	assert_true(host && back);
	cache_make(&c, 4 * KiB, 1024, 1, 0);
	gpu = aeg_kv_gpu_ptr(c.kv, 0);
	fill_pattern(host, bytes, 99);
	memset(back, 0, bytes);
	assert_int_equal(aeg_kv_copy_h2d(c.kv, gpu, host, bytes, stream, &h1), 0);
	assert_int_equal(aeg_kv_copy_d2h(c.kv, back, gpu, bytes, stream, &h2), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h2, WAIT_MS), 0);
	assert_memory_equal(back, host, bytes);
	assert_int_equal(aeg_kv_copy_h2d(c.kv, gpu, host, bytes, stream, NULL), 0);

	assert_int_equal(aeg_kv_copy_h2d(c.kv, gpu, host, 0, stream, NULL), AEG_EINVAL);
	assert_int_equal(aeg_kv_copy_h2d(c.kv, NULL, host, 1, stream, NULL), AEG_EINVAL);
	assert_int_equal(aeg_kv_copy_d2h(c.kv, host + 16, host, 64, stream, NULL), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "overlap"));
	assert_int_equal(aeg_kv_copy_d2h(c.kv, back, gpu, 64, NULL, NULL), AEG_EINVAL);
	assert_int_equal(aeg_stream_sync(stream), 0);
	kv_stats(c.kv, &st);
	assert_int_equal(st.copies, 3);
	assert_int_equal(st.copy_bytes, 3 * bytes);
	assert_int_equal(st.events_live, 2);
	assert_int_equal(aeg_kv_release(c.kv, &h1), 0);
	assert_int_equal(aeg_kv_release(c.kv, &h2), 0);
	free(back);
	free(host);
	cache_free(&c);
}

/* Ranges instead of a slab and a pool: the caller owns both. */
static void over_given_ranges(void **state)
{
	const uint64_t block = 8 * KiB;
	unsigned char *gpu_mem = aligned_alloc(4096, 32 * block), *host_mem = aligned_alloc(4096, 48 * block);
	struct aeg_kv_params p = { .block_bytes = block, .gpu_base = gpu_mem, .gpu_bytes = 32 * block + 100,
				   .host_base = host_mem, .host_bytes = 48 * block };
	uint32_t g[32], h[32];
	struct aeg_kv_stats st;
	aeg_kv_t *kv;

	assert_true(gpu_mem && host_mem);
	assert_int_equal(aeg_kv_create(dev, 0, &p, &kv), 0);
	kv_stats(kv, &st);
	assert_int_equal(st.gpu_blocks, 32);
	assert_int_equal(st.host_blocks, 48);
	assert_int_equal(st.host_owned, 48);
	assert_int_equal(aeg_kv_gpu_alloc(kv, 32, g), 0);
	assert_int_equal(aeg_kv_host_alloc(kv, 32, h), 0);
	for (uint32_t i = 0; i < 32; i++) {
		fill_pattern(gpu_mem + i * block, block, 500 + i);
		h[i] = 47 - h[i];
	}
	assert_int_equal(aeg_kv_swap_out(kv, g, h, 32, stream, NULL), 0);
	assert_int_equal(aeg_stream_sync(stream), 0);
	for (uint32_t i = 0; i < 32; i++)
		assert_memory_equal(host_mem + (47 - i) * block, gpu_mem + i * block, block);
	kv_stats(kv, &st);
	assert_int_equal(st.events_live, 0);
	aeg_kv_destroy(kv);
	free(host_mem);
	free(gpu_mem);
}

/* ------------------------------------------------------------- concurrency */

struct swapper {
	aeg_kv_t *kv;
	aeg_stream_t *s;
	uint32_t first;                 /* its own 32 GPU and host blocks from here */
	uint64_t block;
	unsigned char *expect;
	int failures;
};

static void *swapper_main(void *arg)
{
	struct swapper *w = arg;
	uint32_t g[32], h[32];
	uint64_t rs = w->first + 1;

	for (int round = 0; round < 30; round++) {
		aeg_handle_t ho, hi;

		for (uint32_t i = 0; i < 32; i++)
			g[i] = h[i] = w->first + i;
		shuffle(h, 32, &rs);
		if (aeg_kv_swap_out(w->kv, g, h, 32, w->s, &ho) ||
		    aeg_event_wait_handle(dev, &ho, WAIT_MS)) {
			w->failures++;
			continue;
		}
		memset(aeg_kv_gpu_ptr(w->kv, w->first), 0, 32 * w->block);
		if (aeg_kv_swap_in(w->kv, h, g, 32, w->s, &hi) ||
		    aeg_event_wait_handle(dev, &hi, WAIT_MS) ||
		    aeg_kv_release(w->kv, &ho) || aeg_kv_release(w->kv, &hi))
			w->failures++;
		for (uint32_t i = 0; i < 32; i++) {
			fill_pattern(w->expect, w->block, 4242 + w->first + i);
			if (memcmp(aeg_kv_gpu_ptr(w->kv, w->first + i), w->expect, w->block))
				w->failures++;
		}
	}
	return NULL;
}

/* Four threads on four streams swap their own blocks out and back; data must survive. */
static void threads_on_streams(void **state)
{
	enum { T = 4 };
	const uint64_t block = 16 * KiB;
	struct swapper w[T];
	pthread_t th[T];
	struct aeg_kv_stats st;
	struct cache c;

	cache_make(&c, block, T * 32, (T * 32) / 4, 0);
	for (uint32_t i = 0; i < T * 32; i++)
		fill_pattern(aeg_kv_gpu_ptr(c.kv, i), block, 4242 + i);
	for (int t = 0; t < T; t++) {
		w[t] = (struct swapper){ c.kv, NULL, (uint32_t)t * 32, block, malloc(block), 0 };
		assert_non_null(w[t].expect);
		assert_int_equal(aeg_stream_create(dev, 0, &w[t].s), 0);
		assert_int_equal(pthread_create(&th[t], NULL, swapper_main, &w[t]), 0);
	}
	for (int t = 0; t < T; t++) {
		assert_int_equal(pthread_join(th[t], NULL), 0);
		assert_int_equal(w[t].failures, 0);
		assert_int_equal(aeg_stream_destroy(w[t].s), 0);
		free(w[t].expect);
	}
	for (uint32_t i = 0; i < T * 32; i++) {
		unsigned char expect[16 * KiB];

		fill_pattern(expect, block, 4242 + i);
		assert_memory_equal(aeg_kv_gpu_ptr(c.kv, i), expect, block);
	}
	kv_stats(c.kv, &st);
	assert_int_equal(st.swaps_out, T * 30);
	assert_int_equal(st.events_live, 0);
	cache_free(&c);
}

struct destroyer {
	aeg_kv_t *kv;
	atomic_int done;
};

static void *destroyer_main(void *arg)
{
	struct destroyer *d = arg;

	aeg_kv_destroy(d->kv);
	atomic_store(&d->done, 1);
	return NULL;
}

/* aeg_kv_destroy waits for swaps still queued on a stream. */
static void destroy_waits_for_queued_swaps(void **state)
{
	const uint64_t block = 64 * KiB;
	uint32_t g[32], h[32];
	struct destroyer d;
	struct gate gt;
	struct cache c;
	pthread_t th;
	int err, started, early;

	cache_make(&c, block, 32, 32, 0);
	for (uint32_t i = 0; i < 32; i++) {
		g[i] = i;
		h[i] = 31 - i;
		fill_pattern(aeg_kv_gpu_ptr(c.kv, i), block, 31337 + i);
	}
	/* No assertion while the gate is shut: a failure would leave the stream held. */
	gate_hold(&gt, stream);
	err = aeg_kv_swap_out(c.kv, g, h, 32, stream, NULL);
	d.kv = c.kv;
	atomic_init(&d.done, 0);
	started = err == 0 && pthread_create(&th, NULL, destroyer_main, &d) == 0;
	usleep(100 * 1000);
	early = atomic_load(&d.done);
	gate_release(&gt, stream);
	assert_int_equal(err, 0);
	assert_true(started);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(early, 0);
	assert_int_equal(atomic_load(&d.done), 1);
	for (uint32_t i = 0; i < 32; i++) {
		unsigned char *expect = malloc(block);

		fill_pattern(expect, block, 31337 + i);
		assert_memory_equal((unsigned char *)aeg_pool_base(c.pool) + (31 - i) * block, expect, block);
		free(expect);
	}
	c.kv = NULL;
	cache_free(&c);
}

/* ------------------------------------------------------- cross-process */

/*
 * Process A swaps blocks out into a pool and hands the pool's fd, the
 * event handle and the host ids to process B, which waits on the handle and
 * swaps the same host blocks into GPU blocks of its own. A's stream is held
 * shut until B is waiting, so a B that did not wait would read zeroes.
 */
#define HANDOFF_BLOCK (32 * KiB)
#define HANDOFF_N 48
#define HANDOFF_SEED 8080

static void cross_process_handoff(void **state)
{
	uint32_t gpu_ids[HANDOFF_N], host_ids[HANDOFF_N];
	char hex[AEG_HANDLE_HEX_LEN + 1], fdtext[16], readytext[16], list[HANDOFF_N * 12], ready;
	int ready_pipe[2] = { -1, -1 }, err;
	ssize_t got = 0;
	uint64_t rs = 7;
	struct gate g;
	struct cache c;
	aeg_handle_t h;
	size_t off = 0;
	const char *self;
	int status, fds;
	pid_t pid;

	fds = count_fds();
	cache_make(&c, HANDOFF_BLOCK, HANDOFF_N, HANDOFF_N, 4);
	assert_int_equal(aeg_kv_gpu_alloc(c.kv, HANDOFF_N, gpu_ids), 0);
	assert_int_equal(aeg_kv_host_alloc(c.kv, HANDOFF_N, host_ids), 0);
	shuffle(host_ids, HANDOFF_N, &rs);
	for (int i = 0; i < HANDOFF_N; i++) {
		fill_pattern(aeg_kv_gpu_ptr(c.kv, gpu_ids[i]), HANDOFF_BLOCK, HANDOFF_SEED + i);
		off += (size_t)snprintf(list + off, sizeof(list) - off, "%s%" PRIu32, i ? "," : "", host_ids[i]);
	}
	memset(aeg_pool_base(c.pool), 0, (size_t)c.host_blocks * HANDOFF_BLOCK);
	self = self_exe_path();

	/* No assertion while the gate is shut: a failure would leave the stream held. */
	gate_hold(&g, stream);
	err = aeg_kv_swap_out(c.kv, gpu_ids, host_ids, HANDOFF_N, stream, &h);
	aeg_handle_to_hex(&h, hex);
	snprintf(fdtext, sizeof(fdtext), "%d", aeg_pool_fd(c.pool));
	if (err == 0)
		err = pipe(ready_pipe);
	snprintf(readytext, sizeof(readytext), "%d", ready_pipe[1]);

	pid = err ? -1 : fork();
	if (pid == 0) {
		char *args[] = { "test_kv", "--handoff-child", fdtext, hex, list, readytext, NULL };

		fcntl(aeg_pool_fd(c.pool), F_SETFD, 0);
		close(ready_pipe[0]);
		execv(self, args);
		child_exit(127);
	}
	if (pid > 0) {
		close(ready_pipe[1]);
		/* Once the child has seen the event pending it says so; then let A's swap run. */
		got = read(ready_pipe[0], &ready, 1);
		close(ready_pipe[0]);
		usleep(20 * 1000);
	}
	gate_release(&g, stream);
	assert_int_equal(err, 0);
	assert_true(pid > 0);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_int_equal(got, 1);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);

	assert_int_equal(aeg_kv_release(c.kv, &h), 0);
	assert_int_equal(aeg_kv_gpu_free(c.kv, gpu_ids, HANDOFF_N), 0);
	assert_int_equal(aeg_kv_host_free(c.kv, host_ids, HANDOFF_N), 0);
	cache_free(&c);
	assert_int_equal(count_fds(), fds);
}

/* No fd, slab byte or pool buffer outlives a cache that did everything. */
static void nothing_leaks(void **state)
{
	int fds = count_fds();

	for (int i = 0; i < 3; i++) {
		struct cache c;
		uint32_t g[8], h[8];
		aeg_handle_t hh, lh[2];
		size_t ends[2] = { 4, 8 };
		struct aeg_kv_layers layers = { 2, ends, lh };

		cache_make(&c, 4 * KiB, 8, 1, 1);
		assert_int_equal(aeg_kv_gpu_alloc(c.kv, 8, g), 0);
		assert_int_equal(aeg_kv_host_alloc(c.kv, 8, h), 0);
		assert_int_equal(aeg_kv_swap_out_layers(c.kv, g, h, 8, &layers, stream, &hh), 0);
		/* Left unreleased and allocated on purpose: destroy cleans up. */
		assert_int_equal(aeg_kv_swap_in(c.kv, h, g, 8, stream, &hh), 0);
		cache_free(&c);
	}
	/*
	 * A host event's memfd closes with its last reference, which the stream
	 * that recorded it drops just after completing it: a moment after the
	 * swap's waiter returned (as cudaEventDestroy frees a pending event's
	 * resources later). So: the count comes back within a bound.
	 */
	for (int i = 0; i < 500 && count_fds() != fds; i++)
		usleep(10000);
	assert_int_equal(count_fds(), fds);
}


int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(round_trip_256),
		cmocka_unit_test(round_trip_4k),
		cmocka_unit_test(round_trip_32k),
		cmocka_unit_test(round_trip_2m),
		cmocka_unit_test(round_trip_odd_size_and_single_block),
		cmocka_unit_test(per_layer_events),
		cmocka_unit_test(events_complete_after_the_data),
		cmocka_unit_test(swap_errors_move_nothing),
		cmocka_unit_test(create_errors_hold_nothing),
		cmocka_unit_test(alloc_and_free),
		cmocka_unit_test(one_buffer_copies),
		cmocka_unit_test(over_given_ranges),
		cmocka_unit_test(threads_on_streams),
		cmocka_unit_test(destroy_waits_for_queued_swaps),
		cmocka_unit_test(cross_process_handoff),
		cmocka_unit_test(nothing_leaks),
	};

	if (argc > 1 && strcmp(argv[1], "--handoff-child") == 0) {
		const struct kv_handoff ho = { AEG_DEVICE_HOST, HANDOFF_N, HANDOFF_BLOCK, HANDOFF_SEED, WAIT_MS };

		return argc == 6 ? kv_handoff_child(&ho, argv) : 2;
	}
	return cmocka_run_group_tests_name("kv", tests, kvtest_setup, kvtest_teardown);
}

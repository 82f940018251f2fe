/* KV layouts on the host backend: per-layer tensors and blocks across layers, per-layer events, both directions at once. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "device_internal.h"
#include "internal.h"
#include "kvtest.h"
#include "testutil.h"


/*
 * How a side holds its blocks: in the blocks layout (a slab block on the GPU
 * side, a pool on the host side), or per layer as vLLM's flash-attention
 * backend lays a layer's tensor out ([parts][blocks]) or as FlashInfer does
 * ([blocks][parts]).
 */
enum side_kind { SIDE_BLOCKS, SIDE_FLASH, SIDE_INFER };

struct lcache {
	aeg_kv_t *kv;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	char *mem[2];                   /* per-layer tensors of the GPU (0) and host (1) side */
	void *base[2][64];
	uint64_t stride[2];
	enum side_kind kind[2];
	uint32_t layers, parts, blocks[2];
	uint64_t part, block;
};

/* Per-layer tensors for one side: one allocation, layer l's tensor at l * blocks * parts * part. */
static void tensors_make(struct lcache *c, int host, uint32_t blocks, struct aeg_kv_tensors *t)
{
	const uint64_t layer_bytes = (uint64_t)blocks * c->parts * c->part;
	const uint64_t bytes = layer_bytes * c->layers;
	char *mem;

	if (host)
		mem = aligned_alloc(4096, (bytes + 4095) & ~4095ull);  /* a multiple of the alignment */
	else
		assert_int_equal(aeg_mem_alloc(dev, 0, bytes, (void **)&mem), 0);
	assert_non_null(mem);
	c->mem[host] = mem;
	for (uint32_t l = 0; l < c->layers; l++) {
		for (uint32_t p = 0; p < c->parts; p++) {
			char *tensor = mem + l * layer_bytes;

			c->base[host][l * c->parts + p] = c->kind[host] == SIDE_FLASH ?
				tensor + (uint64_t)p * blocks * c->part : tensor + p * c->part;
		}
	}
	c->stride[host] = c->kind[host] == SIDE_FLASH ? c->part : c->parts * c->part;
	*t = (struct aeg_kv_tensors){ c->base[host], c->kind[host] == SIDE_FLASH ? 0 : c->stride[host], blocks };
}

static void lcache_make(struct lcache *c, enum side_kind gk, enum side_kind hk, uint32_t layers,
			uint32_t parts, uint64_t part, uint32_t blocks)
{
	struct aeg_kv_params p = { 0 };
	struct aeg_kv_tensors gt, ht;
	struct aeg_kv_stats st;
	uint64_t buffer;

	memset(c, 0, sizeof(*c));
	assert_true(layers * parts <= 64);
	c->kind[0] = gk;
	c->kind[1] = hk;
	c->layers = layers;
	c->parts = parts;
	c->part = part;
	c->block = part * layers * parts;
	p.block_bytes = c->block;
	p.layers = layers;
	p.parts = parts;
	if (gk == SIDE_BLOCKS) {
		assert_int_equal(aeg_slab_create(dev, 0, blocks * c->block + 64 * KiB, &c->slab), 0);
		p.slab = c->slab;
		p.gpu_blocks = blocks;
	} else {
		tensors_make(c, 0, blocks, &gt);
		p.gpu_tensors = &gt;
	}
	if (hk == SIDE_BLOCKS) {
		buffer = buffer_for(c->block);
		assert_int_equal(aeg_pool_create(dev, 0, buffer, (blocks * c->block / buffer + 2) * buffer, &c->pool), 0);
		p.pool = c->pool;
		p.host_buffers = (uint32_t)(blocks * c->block / buffer + 1);
	} else {
		tensors_make(c, 1, blocks + 3, &ht);
		p.host_tensors = &ht;
	}
	assert_int_equal(aeg_kv_create(dev, 0, &p, &c->kv), 0);
	assert_int_equal(aeg_kv_stats(c->kv, &st), 0);
	c->blocks[0] = st.gpu_blocks;
	c->blocks[1] = st.host_blocks;
	assert_int_equal(st.layers, layers);
	assert_int_equal(st.parts, parts);
}

static void lcache_free(struct lcache *c)
{
	aeg_kv_destroy(c->kv);
	if (c->mem[0])
		assert_int_equal(aeg_mem_free(dev, 0, c->mem[0]), 0);
	free(c->mem[1]);
	if (c->pool) {
		struct aeg_pool_stats ps;

		assert_int_equal(aeg_pool_stats(c->pool, &ps), 0);
		assert_int_equal(ps.in_use, 0);
		aeg_pool_destroy(c->pool);
	}
	if (c->slab)
		aeg_slab_destroy(c->slab);
}

/* Where the piece (layer l, part p) of block @id lies, from the layout's definition, not the library's. */
static unsigned char *piece(const struct lcache *c, int host, uint32_t id, uint32_t l, uint32_t p)
{
	uint32_t s = l * c->parts + p;
	char *base;

	if (c->kind[host] != SIDE_BLOCKS)
		return (unsigned char *)c->base[host][s] + (uint64_t)id * c->stride[host];
	base = host ? aeg_pool_base(c->pool) : aeg_kv_gpu_ptr(c->kv, 0);
	return (unsigned char *)base + (uint64_t)id * c->block + s * c->part;
}

static uint64_t seed_of(uint32_t id, uint32_t l, uint32_t p)
{
	return ((uint64_t)id << 24) ^ ((uint64_t)l << 8) ^ p ^ 0x6b76;
}

/* Every piece of every block on one side gets a sentinel byte. */
static void side_fill(const struct lcache *c, int host, int value)
{
	for (uint32_t id = 0; id < c->blocks[host]; id++)
		for (uint32_t l = 0; l < c->layers; l++)
			for (uint32_t p = 0; p < c->parts; p++)
				memset(piece(c, host, id, l, p), value, c->part);
}

/* Pieces of layers [l0, l1) of @n entries hold the pattern of @src[i]'s pieces. */
static int pieces_hold(const struct lcache *c, int host, const uint32_t *dst, const uint32_t *src, size_t n,
		       uint32_t l0, uint32_t l1, unsigned char *expect)
{
	for (size_t i = 0; i < n; i++) {
		for (uint32_t l = l0; l < l1; l++) {
			for (uint32_t p = 0; p < c->parts; p++) {
				fill_pattern(expect, c->part, seed_of(src[i], l, p));
				if (memcmp(piece(c, host, dst[i], l, p), expect, c->part))
					return 0;
			}
		}
	}
	return 1;
}

/* Blocks not named by a call keep their sentinel in every piece. */
static int others_hold(const struct lcache *c, int host, const uint32_t *named, size_t n, int value)
{
	unsigned char *mark = calloc(c->blocks[host], 1);
	int ok = 1;

	assert_non_null(mark);
	for (size_t i = 0; i < n; i++)
		mark[named[i]] = 1;
	for (uint32_t id = 0; ok && id < c->blocks[host]; id++)
		for (uint32_t l = 0; ok && !mark[id] && l < c->layers; l++)
			for (uint32_t p = 0; ok && p < c->parts; p++)
				ok = all_bytes(piece(c, host, id, l, p), value, c->part);
	free(mark);
	return ok;
}

/*
 * GPU blocks filled per piece, out through one random permutation and back
 * in through another, one call each way, every piece and every byte of the
 * blocks not named checked; the library's piece pointers agree with the
 * layout's definition.
 */
static void layout_round_trip(enum side_kind gk, enum side_kind hk, uint32_t layers, uint32_t parts,
			      uint64_t part, uint32_t blocks, uint32_t n, uint64_t seed)
{
	uint32_t *g, *h, *g_in;
	unsigned char *expect = malloc(part);
	aeg_handle_t ho, hi;
	struct lcache c;

	lcache_make(&c, gk, hk, layers, parts, part, blocks);
	g = malloc(c.blocks[0] * sizeof(*g));
	h = malloc(c.blocks[1] * sizeof(*h));
	g_in = malloc(c.blocks[0] * sizeof(*g_in));
	assert_true(g && h && g_in && expect);
	for (uint32_t i = 0; i < c.blocks[0]; i++)
		g[i] = g_in[i] = i;
	for (uint32_t i = 0; i < c.blocks[1]; i++)
		h[i] = i;
	shuffle(g, c.blocks[0], &seed);
	shuffle(h, c.blocks[1], &seed);
	shuffle(g_in, c.blocks[0], &seed);
	for (uint32_t id = 0; id < c.blocks[0]; id++)
		for (uint32_t l = 0; l < layers; l++)
			for (uint32_t p = 0; p < parts; p++) {
				fill_pattern(piece(&c, 0, id, l, p), part, seed_of(id, l, p));
				assert_ptr_equal(aeg_kv_gpu_piece(c.kv, id, l, p), piece(&c, 0, id, l, p));
			}
	side_fill(&c, 1, 0xa5);
	assert_ptr_equal(aeg_kv_host_piece(c.kv, h[0], layers - 1, parts - 1), piece(&c, 1, h[0], layers - 1, parts - 1));
	assert_null(aeg_kv_gpu_piece(c.kv, 0, layers, 0));
	assert_null(aeg_kv_host_piece(c.kv, 0, 0, parts));

	assert_int_equal(aeg_kv_swap_out(c.kv, g, h, n, stream, &ho), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &ho, WAIT_MS), 0);
	assert_true(pieces_hold(&c, 1, h, g, n, 0, layers, expect));
	assert_true(others_hold(&c, 1, h, n, 0xa5));

	side_fill(&c, 0, 0x5a);
	assert_int_equal(aeg_kv_swap_in(c.kv, h, g_in, n, stream, &hi), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &hi, WAIT_MS), 0);
	assert_true(pieces_hold(&c, 0, g_in, g, n, 0, layers, expect));
	assert_true(others_hold(&c, 0, g_in, n, 0x5a));
	assert_int_equal(aeg_kv_release(c.kv, &ho), 0);
	assert_int_equal(aeg_kv_release(c.kv, &hi), 0);
	free(g_in);
	free(h);
	free(g);
	free(expect);
	lcache_free(&c);
}

/* vLLM's paged layout on the GPU (a [2, blocks] tensor per layer), blocks across layers on the host. */
static void gpu_per_layer_host_blocks(void **state)
{
	layout_round_trip(SIDE_FLASH, SIDE_BLOCKS, 4, 2, 4 * KiB, 64, 50, 1);
	layout_round_trip(SIDE_FLASH, SIDE_BLOCKS, 32, 2, 256, 40, 40, 2);
	layout_round_trip(SIDE_FLASH, SIDE_BLOCKS, 2, 2, 32 * KiB, 24, 17, 3);
}

static void gpu_blocks_host_per_layer(void **state)
{
	layout_round_trip(SIDE_BLOCKS, SIDE_FLASH, 4, 2, 4 * KiB, 64, 64, 4);
	layout_round_trip(SIDE_BLOCKS, SIDE_INFER, 3, 2, 1 * KiB, 32, 31, 5);
}

/* FlashInfer's [blocks, 2] per layer: K and V of a layer adjacent, so they move as one piece. */
static void both_per_layer(void **state)
{
	layout_round_trip(SIDE_INFER, SIDE_INFER, 4, 2, 2 * KiB, 48, 48, 6);
	layout_round_trip(SIDE_FLASH, SIDE_INFER, 5, 2, 768, 30, 29, 7);
	layout_round_trip(SIDE_INFER, SIDE_FLASH, 1, 2, 16 * KiB, 16, 1, 8);
}

/* The blocks layout on both sides with several layers: one piece per block; sizes 4 KiB to 2 MiB. */
static void blocks_across_layers_sizes(void **state)
{
	static const uint64_t sizes[] = { 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB };

	for (size_t i = 0; i < AEG_ARRAY_SIZE(sizes); i++) {
		uint32_t blocks = sizes[i] >= MiB ? 6 : 40;

		layout_round_trip(SIDE_BLOCKS, SIDE_BLOCKS, 8, 2, sizes[i] / 16, blocks, blocks - 1, 10 + i);
		layout_round_trip(SIDE_FLASH, SIDE_BLOCKS, 4, 2, sizes[i] / 8, blocks, blocks / 2, 20 + i);
	}
}

/*
 * Per-layer events on a cache of several layers: one call, an event per
 * layer, all pending while the stream is held; once released, layer l's
 * event completes only with layers 0..l of every block in place.
 */
static void per_layer_events_of_a_request(void **state)
{
	enum { L = 6, N = 20 };
	uint32_t g[N], h[N];
	aeg_handle_t lh[L], call;
	struct aeg_kv_layers layers = { L, NULL, lh };
	unsigned char *expect;
	struct aeg_kv_stats st;
	struct lcache c;
	struct gate gt;
	int err, pending = 1;

	lcache_make(&c, SIDE_FLASH, SIDE_BLOCKS, L, 2, 8 * KiB, N);
	expect = malloc(c.part);
	assert_non_null(expect);
	for (uint32_t i = 0; i < N; i++) {
		g[i] = i;
		h[i] = N - 1 - i;
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t p = 0; p < 2; p++)
				fill_pattern(piece(&c, 0, i, l, p), c.part, seed_of(i, l, p));
	}
	side_fill(&c, 1, 0);
	/* No assertion while the gate is shut: a failure would leave the stream held. */
	gate_hold(&gt, stream);
	err = aeg_kv_swap_out_layers(c.kv, g, h, N, &layers, stream, &call);
	for (int l = 0; !err && l < L; l++)
		pending &= aeg_event_wait_handle(dev, &lh[l], 0) == AEG_ETIMEDOUT;
	gate_release(&gt, stream);
	assert_int_equal(err, 0);
	assert_true(pending);
	for (uint32_t l = 0; l < L; l++) {
		assert_int_equal(aeg_event_wait_handle(dev, &lh[l], WAIT_MS), 0);
		assert_true(pieces_hold(&c, 1, h, g, N, 0, l + 1, expect));
	}
	assert_int_equal(aeg_event_wait_handle(dev, &call, WAIT_MS), 0);

	/* Back in, layer by layer, into blocks zeroed first. */
	side_fill(&c, 0, 0);
	assert_int_equal(aeg_kv_swap_in_layers(c.kv, h, g, N, &layers, stream, &call), 0);
	for (uint32_t l = 0; l < L; l++)
		assert_int_equal(aeg_event_wait_handle(dev, &lh[l], WAIT_MS), 0);
	assert_true(pieces_hold(&c, 0, g, g, N, 0, L, expect));
	assert_int_equal(aeg_kv_stats(c.kv, &st), 0);
	assert_int_equal(st.events_live, 2 * (L + 1));
	free(expect);
	lcache_free(&c);
}

/*
 * Released events come back to later calls (making one costs a memfd or a
 * CUDA IPC event each), distinct within a call; stats count them.
 */
static void events_are_reused(void **state)
{
	enum { L = 4 };
	uint32_t g[2] = { 0, 1 }, h[2] = { 1, 0 };
	aeg_handle_t lh[L], lh2[L], call, call2;
	struct aeg_kv_layers layers = { L, NULL, lh }, layers2 = { L, NULL, lh2 };
	struct aeg_kv_stats st;
	struct lcache c;
	int fds, found;

	lcache_make(&c, SIDE_FLASH, SIDE_BLOCKS, L, 2, 256, 4);
	assert_int_equal(aeg_kv_swap_out_layers(c.kv, g, h, 2, &layers, stream, &call), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &call, WAIT_MS), 0);
	assert_int_equal(aeg_kv_release(c.kv, &call), 0);
	assert_int_equal(aeg_kv_stats(c.kv, &st), 0);
	assert_int_equal(st.events_live, 0);
	assert_int_equal(st.events_kept, L + 1);
	fds = count_fds();
	assert_int_equal(aeg_kv_swap_in_layers(c.kv, h, g, 2, &layers2, stream, &call2), 0);
	assert_int_equal(count_fds(), fds);     /* no new event was made */
	assert_int_equal(aeg_event_wait_handle(dev, &call2, WAIT_MS), 0);
	for (int i = 0; i < L; i++) {
		found = !memcmp(lh2[i].bytes, call.bytes, AEG_HANDLE_BYTES);
		for (int j = 0; j < L; j++)
			found |= !memcmp(lh2[i].bytes, lh[j].bytes, AEG_HANDLE_BYTES);
		assert_true(found);
		for (int j = 0; j < i; j++)
			assert_memory_not_equal(lh2[i].bytes, lh2[j].bytes, AEG_HANDLE_BYTES);
		assert_memory_not_equal(lh2[i].bytes, call2.bytes, AEG_HANDLE_BYTES);
	}
	assert_int_equal(aeg_kv_stats(c.kv, &st), 0);
	assert_int_equal(st.events_kept, 0);
	assert_int_equal(st.events_live, L + 1);
	lcache_free(&c);
}

/* ------------------------------------------------------- both at once */

/*
 * One thread swaps blocks out while another swaps other blocks in, each on
 * its own stream, as an engine evicts one request while loading another;
 * each checks every piece after every round (the destination is cleared
 * before each call, so a copy that did not happen or went astray shows).
 */
struct way {
	struct lcache *c;
	aeg_stream_t *s;
	int out;
	uint32_t first, n;
	int rounds, failures;
};

static void *way_main(void *arg)
{
	struct way *w = arg;
	struct lcache *c = w->c;
	uint32_t *src = malloc(w->n * sizeof(*src)), *dst = malloc(w->n * sizeof(*dst));
	unsigned char *expect = malloc(c->part);
	uint64_t rs = w->first + 99;

	for (int r = 0; src && dst && expect && r < w->rounds; r++) {
		aeg_handle_t h;

		for (uint32_t i = 0; i < w->n; i++)
			src[i] = dst[i] = w->first + i;
		shuffle(dst, w->n, &rs);
		for (uint32_t i = 0; i < w->n; i++)
			for (uint32_t l = 0; l < c->layers; l++)
				for (uint32_t p = 0; p < c->parts; p++)
					memset(piece(c, w->out, dst[i], l, p), r, c->part);
		if ((w->out ? aeg_kv_swap_out(c->kv, src, dst, w->n, w->s, &h) :
			      aeg_kv_swap_in(c->kv, src, dst, w->n, w->s, &h)) ||
		    aeg_event_wait_handle(dev, &h, WAIT_MS) || aeg_kv_release(c->kv, &h)) {
			w->failures++;
			continue;
		}
		if (!pieces_hold(c, w->out, dst, src, w->n, 0, c->layers, expect))
			w->failures++;
	}
	if (!src || !dst || !expect)
		w->failures++;
	free(expect);
	free(dst);
	free(src);
	return NULL;
}

static void both_directions_at_once(void **state)
{
	enum { N = 24 };
	struct way w[2];
	pthread_t th[2];
	struct lcache c;

	/* 24 blocks of 128 KiB per call: 3 MiB, enough for the copy threads to split each call. */
	lcache_make(&c, SIDE_FLASH, SIDE_BLOCKS, 8, 2, 8 * KiB, 2 * N);
	for (uint32_t id = 0; id < 2 * N; id++)
		for (uint32_t l = 0; l < c.layers; l++)
			for (uint32_t p = 0; p < c.parts; p++) {
				fill_pattern(piece(&c, 0, id, l, p), c.part, seed_of(id, l, p));
				fill_pattern(piece(&c, 1, id, l, p), c.part, seed_of(id, l, p));
			}
	w[0] = (struct way){ &c, NULL, 1, 0, N, 40, 0 };
	w[1] = (struct way){ &c, NULL, 0, N, N, 40, 0 };
	for (int t = 0; t < 2; t++) {
		assert_int_equal(aeg_stream_create(dev, 0, &w[t].s), 0);
		assert_int_equal(pthread_create(&th[t], NULL, way_main, &w[t]), 0);
	}
	for (int t = 0; t < 2; t++) {
		assert_int_equal(pthread_join(th[t], NULL), 0);
		assert_int_equal(aeg_stream_destroy(w[t].s), 0);
		assert_int_equal(w[t].failures, 0);
	}
	lcache_free(&c);
}

/*
 * A swap-in on one stream completes while a swap-out of the same cache is
 * queued on another stream that is held: calls share no lock or staging
 * that one of them keeps while its copy waits.
 */
static void a_held_stream_holds_no_other(void **state)
{
	uint32_t g[8], h[8], g2[8], h2[8];
	aeg_handle_t ho, hi;
	aeg_stream_t *other;
	struct lcache c;
	struct gate gt;
	int err, in_done;

	lcache_make(&c, SIDE_FLASH, SIDE_BLOCKS, 4, 2, 4 * KiB, 16);
	for (uint32_t i = 0; i < 8; i++) {
		g[i] = h[i] = i;
		g2[i] = h2[i] = 8 + i;
	}
	assert_int_equal(aeg_stream_create(dev, 0, &other), 0);
	/* No assertion while the gate is shut: a failure would leave the stream held. */
	gate_hold(&gt, stream);
	err = aeg_kv_swap_out(c.kv, g, h, 8, stream, &ho);
	if (!err)
		err = aeg_kv_swap_in(c.kv, h2, g2, 8, other, &hi);
	in_done = !err && aeg_event_wait_handle(dev, &hi, WAIT_MS) == 0 &&
		  aeg_event_wait_handle(dev, &ho, 0) == AEG_ETIMEDOUT;
	gate_release(&gt, stream);
	assert_int_equal(err, 0);
	assert_true(in_done);
	assert_int_equal(aeg_event_wait_handle(dev, &ho, WAIT_MS), 0);
	assert_int_equal(aeg_stream_destroy(other), 0);
	lcache_free(&c);
}

/* -------------------------------------------------------------- errors */

/* Bad shapes and tensors: each with its code and a word of its detail; nothing is held after. */
static void layout_errors_hold_nothing(void **state)
{
	enum { L = 4, P = 2 };
	char *gmem, *hmem = aligned_alloc(4096, 1 * MiB);
	void *gb[L * P], *hb[L * P], *bad[L * P];
	struct aeg_kv_tensors gt = { gb, 0, 16 }, ht = { hb, 0, 16 };
	struct aeg_kv_tensors t_bad = { bad, 0, 16 }, t_stride = { gb, 1000, 16 }, t_short = { gb, 256, 16 };
	struct aeg_kv_tensors t_zero = { gb, 0, 0 }, t_null = { NULL, 0, 16 };
	struct aeg_kv_tensors t_over = { hb, 0, 16 };
	struct aeg_slab_stats ss;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_kv_t *kv = (aeg_kv_t *)&kv;
	int fds;

	assert_non_null(hmem);
	assert_int_equal(aeg_mem_alloc(dev, 0, 1 * MiB, (void **)&gmem), 0);
	assert_int_equal(aeg_slab_create(dev, 0, 1 * MiB, &slab), 0);
	assert_int_equal(aeg_pool_create(dev, 0, 64 * KiB, 4 * 64 * KiB, &pool), 0);
	for (int s = 0; s < L * P; s++) {
		gb[s] = gmem + (size_t)s * 16 * 1024;   /* [parts][blocks] of 1 KiB pieces */
		hb[s] = hmem + (size_t)s * 16 * 1024;
		bad[s] = gb[s];
	}
	bad[5] = gmem + 16 * 1024 + 8;
	{
		struct {
			const char *name;
			struct aeg_kv_params p;
			int err;
			const char *detail;
		} cases[] = {
			{ "pieces under 256 B", { .block_bytes = 4096, .layers = 32, .parts = 2, .slab = slab, .gpu_blocks = 4, .pool = pool }, AEG_EINVAL, "does not split" },
			{ "layers not dividing", { .block_bytes = 8192, .layers = 3, .parts = 2, .slab = slab, .gpu_blocks = 4, .pool = pool }, AEG_EINVAL, "3 layers x 2 parts" },
			{ "too many layers", { .block_bytes = 4 * MiB, .layers = 2048, .slab = slab, .gpu_blocks = 1, .pool = pool }, AEG_EINVAL, "at most 1024 layers" },
			{ "too many parts", { .block_bytes = 4096, .parts = 16, .slab = slab, .gpu_blocks = 1, .pool = pool }, AEG_EINVAL, "8 parts" },
			{ "slab and tensors", { .block_bytes = 8192, .layers = L, .parts = P, .slab = slab, .gpu_blocks = 4, .gpu_tensors = &gt, .pool = pool }, AEG_EINVAL, "not several" },
			{ "pool and tensors", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &gt, .pool = pool, .host_tensors = &ht }, AEG_EINVAL, "not several" },
			{ "no base pointers", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &t_null, .pool = pool }, AEG_EINVAL, "no base pointers" },
			{ "0 blocks", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &t_zero, .pool = pool }, AEG_EINVAL, "0 blocks" },
			{ "misaligned tensor", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &t_bad, .pool = pool }, AEG_EINVAL, "tensor 5" },
			{ "stride not a multiple of 256", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &t_stride, .pool = pool }, AEG_EINVAL, "stride 1000" },
			{ "stride under a piece", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &t_short, .pool = pool }, AEG_EINVAL, "at least the piece size 1024" },
			{ "pieces of two layers overlap", { .block_bytes = 16384, .layers = L, .parts = P, .gpu_tensors = &gt, .pool = pool }, AEG_EINVAL, "overlap" },
			{ "GPU and host tensors overlap", { .block_bytes = 8192, .layers = L, .parts = P, .gpu_tensors = &gt, .host_tensors = &t_over }, AEG_EINVAL, "overlap" },
		};

		/* The overlapping pair: host tensors over the GPU ones. */
		t_over.base = gb;
		fds = count_fds();
		for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
			int err = aeg_kv_create(dev, 0, &cases[i].p, &kv);

			if (err != cases[i].err || !strstr(aeg_error_detail(), cases[i].detail))
				fail_msg("%s: got %s \"%s\", want %s with \"%s\"", cases[i].name, aeg_errname(err),
					 aeg_error_detail(), aeg_errname(cases[i].err), cases[i].detail);
			assert_null(kv);
			assert_int_equal(aeg_slab_stats(slab, &ss), 0);
			assert_int_equal(ss.used_bytes, 0);
			assert_int_equal(count_fds(), fds);
		}
	}
	aeg_pool_destroy(pool);
	aeg_slab_destroy(slab);
	assert_int_equal(aeg_mem_free(dev, 0, gmem), 0);
	free(hmem);
}

/* Layer events that do not match the cache: rejected before anything moves. */
static void layer_event_errors(void **state)
{
	uint32_t g[4] = { 0, 1, 2, 3 }, h[4] = { 3, 2, 1, 0 };
	size_t ends[2] = { 2, 4 };
	aeg_handle_t lh[8], call;
	struct aeg_kv_layers with_ends = { 2, ends, lh }, wrong_count = { 3, NULL, lh }, no_handles = { 4, NULL, NULL };
	struct aeg_kv_stats before, after;
	struct lcache c, one;

	lcache_make(&c, SIDE_FLASH, SIDE_BLOCKS, 4, 2, 256, 8);
	lcache_make(&one, SIDE_FLASH, SIDE_BLOCKS, 1, 2, 256, 8);
	assert_int_equal(aeg_kv_stats(c.kv, &before), 0);
	side_fill(&c, 1, 0x77);
	assert_int_equal(aeg_kv_swap_out_layers(c.kv, g, h, 4, &with_ends, stream, &call), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "give no ends"));
	assert_int_equal(aeg_kv_swap_out_layers(c.kv, g, h, 4, &wrong_count, stream, &call), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "the cache has 4 layers"));
	assert_int_equal(aeg_kv_swap_in_layers(c.kv, h, g, 4, &no_handles, stream, &call), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "layer handles"));
	assert_int_equal(aeg_kv_swap_in_layers(one.kv, h, g, 4, &wrong_count, stream, &call), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "no layer ends"));
	assert_int_equal(aeg_stream_sync(stream), 0);
	assert_true(others_hold(&c, 1, NULL, 0, 0x77));
	assert_int_equal(aeg_kv_stats(c.kv, &after), 0);
	assert_memory_equal(&before, &after, sizeof(before));
	/* On a cache of one layer, groups of entries still work. */
	assert_int_equal(aeg_kv_swap_out_layers(one.kv, g, h, 4, &with_ends, stream, &call), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &lh[1], WAIT_MS), 0);
	lcache_free(&one);
	lcache_free(&c);
}

/* No descriptor, pool buffer or device byte outlives caches of every layout that did everything. */
static void nothing_leaks(void **state)
{
	int fds = count_fds();         /* the host backend's device memory is memfds: counted too */

	for (int k = 0; k < 3; k++) {
		uint32_t g[4] = { 0, 1, 2, 3 }, h[4] = { 2, 3, 0, 1 };
		aeg_handle_t lh[3], call;
		struct aeg_kv_layers layers = { 3, NULL, lh };
		struct lcache c;

		lcache_make(&c, k == 0 ? SIDE_FLASH : SIDE_BLOCKS, k == 1 ? SIDE_INFER : SIDE_BLOCKS, 3, 2, 512, 6);
		assert_int_equal(aeg_kv_swap_out_layers(c.kv, g, h, 4, &layers, stream, &call), 0);
		/* Left unreleased on purpose, and one released for the spare list: destroy cleans up. */
		assert_int_equal(aeg_kv_swap_in(c.kv, h, g, 4, stream, &call), 0);
		assert_int_equal(aeg_event_wait_handle(dev, &call, WAIT_MS), 0);
		assert_int_equal(aeg_kv_release(c.kv, &call), 0);
		assert_int_equal(aeg_kv_swap_in(c.kv, h, g, 4, stream, &call), 0);
		lcache_free(&c);
	}
	assert_int_equal(count_fds(), fds);
}


int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(gpu_per_layer_host_blocks),
		cmocka_unit_test(gpu_blocks_host_per_layer),
		cmocka_unit_test(both_per_layer),
		cmocka_unit_test(blocks_across_layers_sizes),
		cmocka_unit_test(per_layer_events_of_a_request),
		cmocka_unit_test(events_are_reused),
		cmocka_unit_test(both_directions_at_once),
		cmocka_unit_test(a_held_stream_holds_no_other),
		cmocka_unit_test(layout_errors_hold_nothing),
		cmocka_unit_test(layer_event_errors),
		cmocka_unit_test(nothing_leaks),
	};

	return cmocka_run_group_tests_name("kv_layout", tests, kvtest_setup, kvtest_teardown);
}

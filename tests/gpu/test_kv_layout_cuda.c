/* KV layouts on a real GPU: per-layer tensors, blocks across layers, 4 KiB-2 MiB, every kernel variant, both directions at once. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include <aegaeon/aegaeon.h>

#include "gpu_gate.h"
#include "gpu_tap.h"

#include "device_internal.h"
#include "internal.h"
#include "kv_internal.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define SLACK (64 * MiB)
#define WAIT_MS 20000
#define MAX_SEGS 128

static aeg_device_t *dev;
/* --small (under compute-sanitizer): regions of 4 MiB instead of 64, fewer blocks at once. */
static uint64_t scale = 1;

static void checkf(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void checkf(int cond, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	check(cond, line);
}

/* Each 8-byte word names its block, piece and word (and the side it came from). */
static uint64_t word(int salt, uint32_t id, uint32_t seg, uint64_t w)
{
	return ((uint64_t)id * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)(seg + 1) * 0xc2b2ae3d27d4eb4full) ^
	       ((uint64_t)salt << 60) ^ w;
}

static void stamp(unsigned char *p, uint64_t bytes, int salt, uint32_t id, uint32_t seg)
{
	for (uint64_t w = 0; w < bytes / 8; w++)
		((uint64_t *)p)[w] = word(salt, id, seg, w);
}

static int stamped(const unsigned char *p, uint64_t bytes, int salt, uint32_t id, uint32_t seg)
{
	for (uint64_t w = 0; w < bytes / 8; w++)
		if (((const uint64_t *)p)[w] != word(salt, id, seg, w))
			return 0;
	return 1;
}

static void shuffle(uint32_t *a, uint32_t n, uint64_t *s)
{
	for (uint32_t i = n; i > 1; i--) {
		uint32_t j, t;

		*s = *s * 6364136223846793005ull + 1442695040888963407ull;
		j = (uint32_t)((*s >> 33) % i);
		t = a[i - 1];
		a[i - 1] = a[j];
		a[j] = t;
	}
}

/*
 * A cache whose GPU side is one device allocation: the blocks layout, or
 * per-layer tensors [layer][part][block] (vLLM's flash-attention order) or
 * [layer][block][part] (FlashInfer's); the host side a pool of its own.
 */
enum gpu_kind { GPU_BLOCKS, GPU_FLASH, GPU_INFER };

struct lc {
	enum gpu_kind kind;
	uint32_t layers, parts, segs, blocks, host_blocks;
	uint64_t piece, block, region_bytes;
	char *region;
	void *bases[MAX_SEGS];
	aeg_pool_t *pool;
	aeg_kv_t *kv;
};

static uint64_t gpu_off(const struct lc *c, uint32_t id, uint32_t s)
{
	uint32_t l = s / c->parts, p = s % c->parts;

	switch (c->kind) {
	case GPU_FLASH:
		return ((uint64_t)s * c->blocks + id) * c->piece;
	case GPU_INFER:
		return (((uint64_t)l * c->blocks + id) * c->parts + p) * c->piece;
	default:
		return (uint64_t)id * c->block + (uint64_t)s * c->piece;
	}
}

static int lc_make(struct lc *c, enum gpu_kind kind, uint32_t layers, uint32_t parts, uint64_t piece, uint32_t blocks)
{
	struct aeg_kv_params p = { .layers = layers, .parts = parts };
	struct aeg_kv_tensors t;
	uint64_t buffer;

	memset(c, 0, sizeof(*c));
	c->kind = kind;
	c->layers = layers;
	c->parts = parts;
	c->segs = layers * parts;
	c->piece = piece;
	c->block = piece * c->segs;
	c->blocks = blocks;
	c->region_bytes = c->block * blocks;
	/* Pool buffers: whole blocks and whole pages, at least 2 MiB. */
	for (buffer = c->block; buffer % 4096; buffer += c->block)
		;
	while (buffer < 2 * MiB)
		buffer *= 2;
	p.block_bytes = c->block;
	if (c->segs > MAX_SEGS || aeg_mem_alloc(dev, 0, c->region_bytes, (void **)&c->region) ||
	    aeg_pool_create(dev, 0, buffer, (c->region_bytes / buffer + 1) * buffer, &c->pool))
		return -1;
	for (uint32_t s = 0; s < c->segs; s++)
		c->bases[s] = c->region + gpu_off(c, 0, s);
	t = (struct aeg_kv_tensors){ c->bases, kind == GPU_INFER ? c->parts * piece : 0, blocks };
	if (kind == GPU_BLOCKS) {
		p.gpu_base = c->region;
		p.gpu_bytes = c->region_bytes;
	} else {
		p.gpu_tensors = &t;
	}
	p.pool = c->pool;
	p.host_buffers = (uint32_t)(c->region_bytes / buffer + 1);
	if (aeg_kv_create(dev, 0, &p, &c->kv))
		return -1;
	c->host_blocks = (uint32_t)(p.host_buffers * buffer / c->block);
	return 0;
}

static int lc_free(struct lc *c)
{
	struct aeg_pool_stats ps = { 0 };
	int ok = 1;

	aeg_kv_destroy(c->kv);
	if (c->pool)
		ok = aeg_pool_stats(c->pool, &ps) == 0 && ps.in_use == 0;
	aeg_pool_destroy(c->pool);
	if (c->region)
		ok &= aeg_mem_free(dev, 0, c->region) == 0;
	return ok;
}

static unsigned char *host_piece(const struct lc *c, uint32_t id, uint32_t s)
{
	return (unsigned char *)aeg_kv_host_ptr(c->kv, id) + (uint64_t)s * c->piece;
}

/* Out through one random permutation, back in through another; every piece of both checked. */
static void layout_round_trip(aeg_stream_t *s, enum gpu_kind kind, uint32_t layers, uint32_t parts,
			      uint64_t piece, uint32_t blocks, const char *name)
{
	uint32_t *g = malloc(blocks * sizeof(*g)), *h = malloc(blocks * sizeof(*h)), *g2 = malloc(blocks * sizeof(*g2));
	unsigned char *img = NULL;
	uint64_t rs = piece * 31 + layers;
	aeg_handle_t ho, hi;
	int ok, out_ok = 1, in_ok = 1;
	struct lc c;

	ok = g && h && g2 && lc_make(&c, kind, layers, parts, piece, blocks) == 0 && (img = malloc(c.region_bytes));
	for (uint32_t i = 0; ok && i < blocks; i++) {
		g[i] = g2[i] = h[i] = i;
		for (uint32_t sg = 0; sg < c.segs; sg++)
			stamp(img + gpu_off(&c, i, sg), piece, 0, i, sg);
	}
	if (ok) {
		shuffle(g, blocks, &rs);
		shuffle(h, blocks, &rs);
		shuffle(g2, blocks, &rs);
		ok = aeg_memcpy(dev, c.region, img, c.region_bytes) == 0 &&
		     aeg_kv_swap_out(c.kv, g, h, blocks, s, &ho) == 0 && aeg_event_wait_handle(dev, &ho, WAIT_MS) == 0;
	}
	for (uint32_t i = 0; ok && i < blocks; i++)
		for (uint32_t sg = 0; sg < c.segs; sg++)
			out_ok &= stamped(host_piece(&c, h[i], sg), piece, 0, g[i], sg);
	ok = ok && aeg_memset(dev, c.region, 0, c.region_bytes) == 0 &&
	     aeg_kv_swap_in(c.kv, h, g2, blocks, s, &hi) == 0 && aeg_event_wait_handle(dev, &hi, WAIT_MS) == 0 &&
	     aeg_memcpy(dev, img, c.region, c.region_bytes) == 0;
	for (uint32_t i = 0; ok && i < blocks; i++)
		for (uint32_t sg = 0; sg < c.segs; sg++)
			in_ok &= stamped(img + gpu_off(&c, g2[i], sg), piece, 0, g[i], sg);
	checkf(ok && out_ok && in_ok, "%s: %" PRIu32 " layers x %" PRIu32 " parts of %" PRIu64
	       " B, %" PRIu32 " blocks out and back in, every piece bit-exact", name, layers, parts, piece, blocks);
	checkf(lc_free(&c), "%s: nothing held after", name);
	free(img);
	free(g2);
	free(h);
	free(g);
}

static void layouts(aeg_stream_t *s)
{
	static const uint64_t sizes[] = { 4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB };

	layout_round_trip(s, GPU_FLASH, 32, 2, 32 * KiB, 64, "vLLM per-layer K/V tensors -> pool");
	layout_round_trip(s, GPU_INFER, 8, 2, 4 * KiB, 256, "FlashInfer per-layer tensors -> pool");
	layout_round_trip(s, GPU_FLASH, 4, 2, 768, 300, "per-layer, pieces of 768 B (no power of two)");
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		layout_round_trip(s, GPU_BLOCKS, 1, 1, sizes[i], (uint32_t)(64 * MiB / scale / sizes[i]), "blocks layout");
		layout_round_trip(s, GPU_FLASH, 2, 2, sizes[i] / 4, (uint32_t)(32 * MiB / scale / sizes[i]),
				  "per-layer tensors of the same block size");
	}
}

/* Every kernel variant (unroll 2, 4, 8) and CTA share, forced, on powers of two and not. */
static void variants(aeg_stream_t *s)
{
	static const int unrolls[] = { 2, 4, 8 }, per_sm[] = { 1, 2, 4 };

	for (int u = 0; u < 3; u++) {
		for (int c = 0; c < 3; c++) {
			char name[64];

			snprintf(name, sizeof(name), "forced unroll %d, %d CTAs/SM", unrolls[u], per_sm[c]);
			kv_cuda_force(unrolls[u], per_sm[c]);
			layout_round_trip(s, GPU_BLOCKS, 1, 1, 32 * KiB, 512, name);
			layout_round_trip(s, GPU_FLASH, 2, 2, 1280, 200, name);
			kv_cuda_force(0, 0);
		}
	}
}

/*
 * Per-layer events of a request on a cache of 16 layers, with more blocks
 * than a staging slot holds (the call takes several): all pending while
 * the stream is held; layers 0..l in place once layer l's event completes.
 */
static void layer_events(aeg_stream_t *s)
{
	enum { L = 16, N = 40000 };     /* more than a staging slot's 32768 pairs, even with --small */
	uint32_t *g = malloc(N * sizeof(*g)), *h = malloc(N * sizeof(*h));
	aeg_handle_t lh[L], call;
	struct aeg_kv_layers layers = { L, NULL, lh };
	struct gate gt;
	unsigned char *img = NULL;
	int ok, pending = 1, each = 1;
	struct lc c;

	ok = g && h && lc_make(&c, GPU_FLASH, L, 2, 256, N) == 0 && (img = malloc(c.region_bytes));
	for (uint32_t i = 0; ok && i < N; i++) {
		g[i] = i;
		h[i] = N - 1 - i;
		for (uint32_t sg = 0; sg < c.segs; sg++)
			stamp(img + gpu_off(&c, i, sg), c.piece, 0, i, sg);
	}
	ok = ok && aeg_memcpy(dev, c.region, img, c.region_bytes) == 0 && gate_close(&gt, s) == 0;
	ok = ok && aeg_kv_swap_out_layers(c.kv, g, h, N, &layers, s, &call) == 0;
	for (int l = 0; ok && l < L; l++)
		pending &= aeg_event_wait_handle(dev, &lh[l], 0) == AEG_ETIMEDOUT;
	gate_open(&gt);
	for (uint32_t l = 0; ok && l < L; l++) {
		each &= aeg_event_wait_handle(dev, &lh[l], WAIT_MS) == 0;
		for (uint32_t i = 0; i < N; i += 97)
			for (uint32_t sg = 0; sg < (l + 1) * 2; sg++)
				each &= stamped(host_piece(&c, h[i], sg), c.piece, 0, g[i], sg);
	}
	ok = ok && aeg_stream_sync(s) == 0;
	checkf(ok && pending, "%d layer events of one call of %d blocks pending while the stream is held", L, N);
	checkf(ok && each, "each layer's pieces (and the earlier layers') are there when its event completes");
	checkf(ok && aeg_kv_release(c.kv, &call) == 0 && lc_free(&c), "layer events released, nothing held");
	pthread_cond_destroy(&gt.cv);
	pthread_mutex_destroy(&gt.lock);
	free(img);
	free(h);
	free(g);
}

/* The other direction of a both-at-once run, on its own thread and stream. */
struct partner {
	struct lc *c;
	aeg_stream_t *s;
	const uint32_t *h, *g;
	uint32_t n;
	int rounds, failures;
	double seconds;
};

static void *swap_in_loop(void *arg)
{
	struct partner *p = arg;
	uint64_t t0 = aeg_now_ns();

	for (int r = 0; r < p->rounds; r++)
		if (aeg_kv_swap_in(p->c->kv, p->h, p->g, p->n, p->s, NULL) || aeg_stream_sync(p->s))
			p->failures++;
	p->seconds = (double)(aeg_now_ns() - t0) / 1e9;
	return NULL;
}

/* Host set B stamped (salt 1), GPU set A stamped (salt 0) in @img, the rest zero. */
static int stamp_both(struct lc *c, unsigned char *img, const uint32_t *ga, const uint32_t *ha,
		      const uint32_t *gb, const uint32_t *hb, uint32_t n)
{
	memset(img, 0, c->region_bytes);
	for (uint32_t i = 0; i < n; i++) {
		for (uint32_t sg = 0; sg < c->segs; sg++) {
			stamp(img + gpu_off(c, ga[i], sg), c->piece, 0, ga[i], sg);
			stamp(host_piece(c, hb[i], sg), c->piece, 1, hb[i], sg);
			memset(host_piece(c, ha[i], sg), 0, c->piece);
		}
	}
	return aeg_memcpy(dev, c->region, img, c->region_bytes) == 0;
}

/*
 * A swap-out of set A on one stream and a swap-in of set B on another, from
 * two threads, many rounds: both sets bit-exact after, and the GB/s of both
 * together printed beside each direction alone (issue 18's >= 90 GB/s is
 * measured by aegaeon-cli kv bench; here it is only shown).
 */
static void both_at_once(aeg_stream_t *s, aeg_stream_t *s2, uint64_t piece, int layered)
{
	const uint32_t N = (uint32_t)(4096 / scale);
	enum { ROUNDS = 10 };
	uint32_t *ids = malloc(4 * N * sizeof(*ids)), *ga, *gb, *ha, *hb;
	struct partner p = { 0 };
	unsigned char *img = NULL;
	pthread_t th;
	double out_s = 0, alone_s = 0;
	int ok, good = 1, fails = 0;
	uint64_t rs = 5, t0;
	struct lc c;

	ok = ids && lc_make(&c, layered ? GPU_FLASH : GPU_BLOCKS, layered ? 8 : 1, layered ? 2 : 1, piece, 2 * N) == 0 &&
	     (img = malloc(c.region_bytes));
	if (!ok) {
		checkf(0, "both at once: cache made");
		goto out;
	}
	/* GPU ids 0..2N-1 and host ids 0..2N-1, each permuted; the first half of each is set A. */
	ga = ids, gb = ids + N, ha = ids + 2 * N, hb = ids + 3 * N;
	for (uint32_t i = 0; i < 2 * N; i++)
		ga[i] = ha[i] = i;
	shuffle(ga, 2 * N, &rs);
	shuffle(ha, 2 * N, &rs);
	ok = stamp_both(&c, img, ga, ha, gb, hb, N);
	t0 = aeg_now_ns();
	for (int r = 0; ok && r < ROUNDS; r++)
		fails += aeg_kv_swap_out(c.kv, ga, ha, N, s, NULL) || aeg_stream_sync(s);
	alone_s = (double)(aeg_now_ns() - t0) / 1e9;
	p = (struct partner){ &c, s2, hb, gb, N, ROUNDS, 0, 0 };
	t0 = aeg_now_ns();
	ok = ok && pthread_create(&th, NULL, swap_in_loop, &p) == 0;
	for (int r = 0; ok && r < ROUNDS; r++)
		fails += aeg_kv_swap_out(c.kv, ga, ha, N, s, NULL) || aeg_stream_sync(s);
	if (ok)
		pthread_join(th, NULL);
	out_s = (double)(aeg_now_ns() - t0) / 1e9;
	ok = ok && aeg_memcpy(dev, img, c.region, c.region_bytes) == 0;
	for (uint32_t i = 0; ok && i < N; i++)
		for (uint32_t sg = 0; sg < c.segs; sg++)
			good &= stamped(host_piece(&c, ha[i], sg), c.piece, 0, ga[i], sg) &&
				stamped(img + gpu_off(&c, gb[i], sg), c.piece, 1, hb[i], sg);
	printf("# both at once, %s, %" PRIu64 " B pieces: %.1f GB/s together (out alone %.1f GB/s)\n",
	       layered ? "per-layer tensors" : "blocks", piece,
	       2.0 * ROUNDS * (double)N * (double)c.block / (out_s > p.seconds ? out_s : p.seconds) / 1e9,
	       ROUNDS * (double)N * (double)c.block / alone_s / 1e9);
	checkf(ok && !fails && !p.failures && good,
	       "a swap-out and a swap-in on two threads and streams, %d rounds each: both sets bit-exact (%s)", ROUNDS,
	       layered ? "per-layer tensors" : "blocks");
	checkf(lc_free(&c), "both at once: nothing held after");
out:
	free(img);
	free(ids);
}

int main(int argc, char **argv)
{
	aeg_stream_t *s = NULL, *s2 = NULL;
	uint64_t start_free, end_free;

	if (argc == 2 && strcmp(argv[1], "--small") == 0)
		scale = 16;

	if (aeg_device_open(&dev, AEG_DEVICE_CUDA) || aeg_stream_create(dev, 0, &s) || aeg_stream_create(dev, 0, &s2)) {
		check(0, "cuda backend and two streams open");
		printf("0 passed, %d failed\n", failures);
		return 1;
	}
	start_free = gpu_free(dev);
	layouts(s);
	variants(s);
	layer_events(s);
	both_at_once(s, s2, 32 * KiB, 0);
	both_at_once(s, s2, 4 * KiB, 1);
	aeg_stream_destroy(s2);
	aeg_stream_destroy(s);
	end_free = gpu_free(dev);
	check_free(end_free + SLACK >= start_free, "no device memory leaked over the whole run");
	aeg_device_close(dev);
	printf("%d passed, %d failed\n", test_number - failures, failures);
	return failures != 0;
}

/* aegaeon-cli kv bench runs: a cache per block size, our swap and the baselines each way and both at once. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_kv.h"
#include "internal.h"
#include "kv_internal.h"

/* A cache and its ids: set A moves out (GPU to host), set B moves in, n blocks each. */
struct bench {
	const struct kv_env *env;
	const struct kv_opts *o;
	uint64_t block, piece;
	uint32_t n, segs;
	aeg_slab_t *slab;
	aeg_pool_t *pool;               /* ours, or the job's (not destroyed) */
	int own_pool;
	uint64_t region_id;             /* per-layer tensors: their slab block */
	char *region;                   /* the GPU side: 2n blocks, contiguous either way */
	void **bases;
	aeg_kv_t *kv;
	aeg_stream_t *s[2];
	uint32_t *ids;                  /* gpu_a, host_a, gpu_b, host_b: n each */
};

static const uint32_t *gpu_ids(const struct bench *b, int out)
{
	return b->ids + (out ? 0 : 2 * (size_t)b->n);
}

static const uint32_t *host_ids(const struct bench *b, int out)
{
	return b->ids + (out ? 1 : 3) * (size_t)b->n;
}

static void shuffle(uint32_t *a, uint32_t n, uint64_t *state)
{
	for (uint32_t i = n; i > 1; i--) {
		uint32_t j, t;

		*state = *state * 6364136223846793005ull + 1442695040888963407ull;
		j = (uint32_t)((*state >> 33) % i);
		t = a[i - 1];
		a[i - 1] = a[j];
		a[j] = t;
	}
}

int kv_env_open(const struct kv_opts *o, struct kv_env *env)
{
	int err;

	memset(env, 0, sizeof(*env));
	if (cli_in_job() && !o->standalone) {
		if ((err = aeg_job_attach(&env->job)))
			return cli_fail(err, "attaching to the job's agent (--standalone runs without it)");
		env->dev = aeg_job_device(env->job);
		if (o->device && strcmp(o->device, aeg_device_kind_name(aeg_device_kind(env->dev)))) {
			fprintf(stderr, "aegaeon-cli kv bench: --device %s, but the job's agent uses the %s device\n",
				o->device, aeg_device_kind_name(aeg_device_kind(env->dev)));
			kv_env_close(env);
			return 1;
		}
	} else if ((err = cli_open_device(o->device, &env->dev))) {
		return err;     /* cli_open_device's exit code */
	}
	env->cuda = aeg_device_kind(env->dev) == AEG_DEVICE_CUDA;
	if ((err = aeg_device_gpu_info(env->dev, o->gpu, &env->info))) {
		kv_env_close(env);
		return cli_fail(err, "GPU");
	}
	return 0;
}

void kv_env_close(struct kv_env *env)
{
	if (env->job)
		aeg_job_detach(env->job);       /* closes the device too */
	else if (env->dev)
		aeg_device_close(env->dev);
	memset(env, 0, sizeof(*env));
}

/* The job slab on @gpu, leased for @bytes. */
static int job_slab(const struct kv_env *env, int gpu, uint64_t bytes, aeg_slab_t **slab)
{
	struct aeg_job_info info;
	struct aeg_job_slab_desc d;
	int err;

	if ((err = aeg_job_get_info(env->job, &info)))
		return err;
	for (int i = 0; i < info.slabs; i++)
		if (aeg_job_slab_describe(env->job, i, &d) == 0 && d.gpu == gpu)
			return aeg_job_slab(env->job, i, bytes, slab);
	return aeg_fail(AEG_ENODEV, "the job has no slab on GPU %d", gpu);
}

/* A pool buffer size that holds whole blocks: a multiple of the block and of 4 KiB, >= 2 MiB. */
static uint64_t buffer_for(uint64_t block)
{
	uint64_t buffer = block;

	while (buffer % 4096)
		buffer += block;
	while (buffer < (2ull << 20))
		buffer *= 2;
	return buffer;
}

static int setup_memory(struct bench *b, uint64_t region, uint32_t *buffers)
{
	struct aeg_pool_stats ps;
	int err;

	if (b->env->job) {
		if ((err = job_slab(b->env, b->o->gpu, region + (1u << 20), &b->slab)))
			return cli_fail(err, "job slab");
		if (!(b->pool = aeg_job_pool(b->env->job))) {
			fprintf(stderr, "aegaeon-cli kv bench: the job has no pinned pool (ask for one with --aegaeon-pinned)\n");
			return 1;
		}
	} else {
		uint64_t buffer = buffer_for(b->block);

		if ((err = aeg_slab_create(b->env->dev, b->o->gpu, region + (1u << 20), &b->slab)))
			return cli_fail(err, "slab");
		if ((err = aeg_pool_create(b->env->dev, b->o->gpu, buffer, (region + buffer - 1) / buffer * buffer,
					   &b->pool)))
			return cli_fail(err, "pinned pool");
		b->own_pool = 1;
	}
	if ((err = aeg_pool_stats(b->pool, &ps)))
		return cli_fail(err, "pinned pool");
	*buffers = (uint32_t)((region + ps.buffer_bytes - 1) / ps.buffer_bytes);
	return 0;
}

/* Per-layer tensors as vLLM's flash-attention backend lays them out: [layer][K, V][block]. */
static int setup_tensors(struct bench *b, uint64_t region, struct aeg_kv_tensors *t)
{
	struct aeg_block blk;
	int err;

	if ((err = aeg_slab_alloc(b->slab, region, &blk)))
		return cli_fail(err, "GPU tensors");
	b->region_id = blk.id;
	b->region = blk.ptr;
	b->bases = calloc(b->segs, sizeof(*b->bases));
	if (!b->bases)
		return cli_fail(aeg_fail(AEG_ENOMEM, "tensor list"), "GPU tensors");
	for (uint32_t s = 0; s < b->segs; s++)
		b->bases[s] = b->region + (uint64_t)s * 2 * b->n * b->piece;
	*t = (struct aeg_kv_tensors){ b->bases, 0, 2 * b->n };
	return 0;
}

static int setup_ids(struct bench *b)
{
	uint64_t rng = 0x6b76;
	uint32_t *g, *h;
	int err;

	b->ids = malloc(4 * (size_t)b->n * sizeof(*b->ids));
	g = malloc(2 * (size_t)b->n * sizeof(*g));
	h = malloc(2 * (size_t)b->n * sizeof(*h));
	if (!b->ids || !g || !h) {
		free(g);
		free(h);
		return cli_fail(aeg_fail(AEG_ENOMEM, "%" PRIu32 " block ids", 4 * b->n), "KV bench");
	}
	for (uint32_t i = 0; i < 2 * b->n; i++)
		g[i] = i;
	if ((err = aeg_kv_host_alloc(b->kv, 2 * (size_t)b->n, h)) == 0 && b->o->random) {
		shuffle(g, 2 * b->n, &rng);
		shuffle(h, 2 * b->n, &rng);
	}
	if (!err) {
		memcpy(b->ids, g, b->n * sizeof(*g));                         /* gpu_a */
		memcpy(b->ids + b->n, h, b->n * sizeof(*h));                  /* host_a */
		memcpy(b->ids + 2 * (size_t)b->n, g + b->n, b->n * sizeof(*g));   /* gpu_b */
		memcpy(b->ids + 3 * (size_t)b->n, h + b->n, b->n * sizeof(*h));   /* host_b */
	}
	free(g);
	free(h);
	return err ? cli_fail(err, "KV host blocks") : 0;
}

static void teardown(struct bench *b)
{
	for (int i = 0; i < 2; i++)
		if (b->s[i])
			aeg_stream_destroy(b->s[i]);
	aeg_kv_destroy(b->kv);
	if (b->region_id)
		aeg_slab_free(b->slab, b->region_id);
	if (b->slab && b->env->job)
		aeg_job_slab_return(b->env->job, b->slab);
	else if (b->slab)
		aeg_slab_destroy(b->slab);
	if (b->own_pool)
		aeg_pool_destroy(b->pool);
	free(b->bases);
	free(b->ids);
}

static int setup(struct bench *b, const struct kv_env *env, const struct kv_opts *o, uint64_t block)
{
	struct aeg_kv_params p = { .block_bytes = block };
	struct aeg_kv_tensors t;
	uint64_t region;
	uint32_t buffers = 0;
	int err;

	memset(b, 0, sizeof(*b));
	b->env = env;
	b->o = o;
	b->block = block;
	b->segs = o->layers ? 2 * (uint32_t)o->layers : 1;
	b->piece = block / b->segs;
	b->n = o->blocks ? o->blocks : (uint32_t)(o->call_bytes / block ? o->call_bytes / block : 1);
	if (b->n > (UINT32_MAX - 2) / 2 || (uint64_t)2 * b->n > UINT64_MAX / block - (1u << 20)) {
		fprintf(stderr, "aegaeon-cli kv bench: 2 x %" PRIu32 " blocks of %" PRIu64 " bytes overflow\n", b->n, block);
		return 1;
	}
	region = (uint64_t)2 * b->n * block;
	if (setup_memory(b, region, &buffers))
		return 1;
	if (o->layers) {
		if (setup_tensors(b, region, &t))
			return 1;
		p.layers = (uint32_t)o->layers;
		p.parts = 2;
		p.gpu_tensors = &t;
	} else {
		p.slab = b->slab;
		p.gpu_blocks = 2 * b->n;
	}
	p.pool = b->pool;
	p.host_buffers = buffers;
	if ((err = aeg_kv_create(env->dev, o->gpu, &p, &b->kv)))
		return cli_fail(err, "KV cache");
	if (!o->layers)
		b->region = aeg_kv_gpu_ptr(b->kv, 0);
	for (int i = 0; i < 2; i++)
		if ((err = aeg_stream_create(env->dev, o->gpu, &b->s[i])))
			return cli_fail(err, "stream");
	return setup_ids(b);
}

/* Queue one call of @way in direction @out (set A out, set B in) on @s. */
static int issue(struct bench *b, enum kv_way way, int out, aeg_stream_t *s, aeg_handle_t *h)
{
	const uint32_t *g = gpu_ids(b, out), *hh = host_ids(b, out);

	if (way == KV_OURS)
		return out ? aeg_kv_swap_out(b->kv, g, hh, b->n, s, h) : aeg_kv_swap_in(b->kv, hh, g, b->n, s, h);
	return aeg_kv_baseline(b->kv, way == KV_BATCH ? KV_BASELINE_BATCH : KV_BASELINE_PER_BLOCK, out,
			       out ? g : hh, out ? hh : g, b->n, s);
}

/* Issue, then wait for the stream: every way timed alike (ours makes and releases its event too). */
static int run_one(struct bench *b, enum kv_way way, int out, aeg_stream_t *s)
{
	aeg_handle_t h;
	int err = issue(b, way, out, s, &h);

	if (!err)
		err = aeg_stream_sync(s);
	if (!err && way == KV_OURS)
		err = aeg_kv_release(b->kv, &h);
	return err;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The other direction of a both-at-once measurement, on its own thread and stream. */
struct partner {
	struct bench *b;
	enum kv_way way;
	int reps;
	pthread_barrier_t *start, *end;
	int err;
};

static void *partner_main(void *arg)
{
	struct partner *p = arg;

	for (int r = 0; r < p->reps; r++) {
		pthread_barrier_wait(p->start);
		if (!p->err)
			p->err = run_one(p->b, p->way, 0, p->b->s[1]);
		pthread_barrier_wait(p->end);
	}
	return NULL;
}

/* Swap-out of set A here on stream 0 while the partner swaps set B in on stream 1; wall time of both. */
static int both_at_once(struct bench *b, enum kv_way way, double *t, int reps)
{
	pthread_barrier_t start, end;
	struct partner p = { b, way, reps, &start, &end, 0 };
	pthread_t th;
	int err = 0;

	pthread_barrier_init(&start, NULL, 2);
	pthread_barrier_init(&end, NULL, 2);
	if (pthread_create(&th, NULL, partner_main, &p)) {
		err = aeg_fail(AEG_ENOMEM, "a second thread for both directions at once");
		goto out;
	}
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = aeg_now_ns();

		pthread_barrier_wait(&start);
		if (!err)
			err = run_one(b, way, 1, b->s[0]);
		pthread_barrier_wait(&end);
		t[r] = (double)(aeg_now_ns() - t0) / 1e9;
	}
	pthread_join(th, NULL);
	err = err ? err : p.err;
out:
	pthread_barrier_destroy(&start);
	pthread_barrier_destroy(&end);
	return err;
}

/* Median GB/s of @way in @dir after one untimed warm-up call (or pair). */
static int measure(struct bench *b, enum kv_way way, enum kv_dir dir, double *gbps)
{
	int reps = b->o->repeat + 1, err = 0;
	double *t = calloc((size_t)reps, sizeof(*t));
	uint64_t bytes = (uint64_t)b->n * b->block * (dir == KV_BOTH ? 2 : 1);

	if (!t)
		return aeg_fail(AEG_ENOMEM, "timings");
	if (dir == KV_BOTH) {
		err = both_at_once(b, way, t, reps);
	} else {
		for (int r = 0; !err && r < reps; r++) {
			uint64_t t0 = aeg_now_ns();

			err = run_one(b, way, dir == KV_OUT, b->s[0]);
			t[r] = (double)(aeg_now_ns() - t0) / 1e9;
		}
	}
	if (!err)
		*gbps = (double)bytes / median(t + 1, reps - 1) / 1e9;
	free(t);
	return err;
}

/* Each 8-byte word of a piece says which side it came from, its block, piece and word. */
static uint64_t stamp_word(int from_host, uint32_t id, uint32_t seg, uint64_t w)
{
	return ((uint64_t)id * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)(seg + 1) * 0xc2b2ae3d27d4eb4full) ^
	       ((uint64_t)from_host << 63) ^ w;
}

static void stamp(void *p, uint64_t bytes, int from_host, uint32_t id, uint32_t seg)
{
	uint64_t *words = p;

	for (uint64_t w = 0; w < bytes / 8; w++)
		words[w] = stamp_word(from_host, id, seg, w);
}

static int stamped(const void *p, uint64_t bytes, int from_host, uint32_t id, uint32_t seg)
{
	const uint64_t *words = p;

	for (uint64_t w = 0; w < bytes / 8; w++)
		if (words[w] != stamp_word(from_host, id, seg, w))
			return 0;
	return 1;
}

/* Piece @seg of GPU block @id within the GPU region (blocks layout, or [segment][block] tensors). */
static uint64_t gpu_offset(const struct bench *b, uint32_t id, uint32_t seg)
{
	if (b->o->layers)
		return (uint64_t)seg * 2 * b->n * b->piece + (uint64_t)id * b->piece;
	return (uint64_t)id * b->block + (uint64_t)seg * b->piece;
}

static unsigned char *host_piece(const struct bench *b, uint32_t id, uint32_t seg)
{
	return (unsigned char *)aeg_kv_host_ptr(b->kv, id) + (uint64_t)seg * b->piece;
}

/* Stamp GPU set A and host set B, clear host set A and GPU set B's pieces in @img. */
static void stamp_sources(struct bench *b, unsigned char *img)
{
	const uint32_t *ga = gpu_ids(b, 1), *ha = host_ids(b, 1), *gb = gpu_ids(b, 0), *hb = host_ids(b, 0);

	for (uint32_t i = 0; i < b->n; i++) {
		for (uint32_t s = 0; s < b->segs; s++) {
			stamp(img + gpu_offset(b, ga[i], s), b->piece, 0, ga[i], s);
			memset(img + gpu_offset(b, gb[i], s), 0, b->piece);
			stamp(host_piece(b, hb[i], s), b->piece, 1, hb[i], s);
			memset(host_piece(b, ha[i], s), 0, b->piece);
		}
	}
}

/* Pieces of @n blocks that do not hold what their source block's stamp says. */
static uint32_t count_bad(struct bench *b, const unsigned char *img)
{
	const uint32_t *ga = gpu_ids(b, 1), *ha = host_ids(b, 1), *gb = gpu_ids(b, 0), *hb = host_ids(b, 0);
	uint32_t bad = 0;

	for (uint32_t i = 0; i < b->n; i++) {
		for (uint32_t s = 0; s < b->segs; s++) {
			bad += !stamped(host_piece(b, ha[i], s), b->piece, 0, ga[i], s);
			bad += !stamped(img + gpu_offset(b, gb[i], s), b->piece, 1, hb[i], s);
		}
	}
	return bad;
}

/* One more swap each way at once, every piece of both checked: a fast wrong copy is no result. */
static int verify(struct bench *b)
{
	uint64_t region = (uint64_t)2 * b->n * b->block;
	unsigned char *img = malloc(region);
	double t;
	uint32_t bad;
	int err;

	if (!img)
		return cli_fail(aeg_fail(AEG_ENOMEM, "verification image of %" PRIu64 " bytes", region), "KV bench");
	memset(img, 0, region);
	stamp_sources(b, img);
	if (!(err = aeg_memcpy(b->env->dev, b->region, img, region)) &&
	    !(err = both_at_once(b, KV_OURS, &t, 1)))
		err = aeg_memcpy(b->env->dev, img, b->region, region);
	bad = err ? 0 : count_bad(b, img);
	free(img);
	if (err)
		return cli_fail(err, "verification");
	if (bad) {
		fprintf(stderr, "aegaeon-cli kv bench: %" PRIu32 " of %" PRIu64 " pieces hold wrong bytes after a swap each way\n",
			bad, (uint64_t)2 * b->n * b->segs);
		return 1;
	}
	return 0;
}

static void fill_kernel(const struct bench *b, struct kv_row *row)
{
#ifdef HAVE_CUDA
	struct kv_launch_cfg cfg;

	if (b->env->cuda) {
		kv_cuda_config(b->kv, b->kv->whole.piece_bytes, &cfg);
		row->copy_engines = cfg.copy_engines;
		row->unroll = cfg.copy_engines ? 0 : cfg.unroll;
		row->max_grid = cfg.max_grid;
		row->max_grid_out = cfg.max_grid_out;
	}
#else
	(void)b;
	(void)row;
#endif
}

int kv_bench_size(const struct kv_env *env, const struct kv_opts *o, uint64_t block, struct kv_row *row)
{
	static const char *const dirs[] = { "swap-out", "swap-in", "both at once" };
	struct bench b;
	int err, rc = 1;

	memset(row, 0, sizeof(*row));
	if (setup(&b, env, o, block))
		goto out;
	row->block_bytes = block;
	row->piece_bytes = b.kv->whole.piece_bytes;
	row->blocks = b.n;
	fill_kernel(&b, row);
	for (int d = 0; d < KV_DIRS; d++) {
		for (int w = 0; w < KV_WAYS; w++) {
			row->gbps[d][w] = -1;
			if (w == KV_BATCH && !env->cuda)
				continue;
			if ((err = measure(&b, (enum kv_way)w, (enum kv_dir)d, &row->gbps[d][w]))) {
				cli_fail(err, dirs[d]);
				goto out;
			}
		}
	}
	if (verify(&b))
		goto out;
	row->verified = 1;
	rc = 0;
out:
	teardown(&b);
	return rc;
}

int kv_tune_size(const struct kv_env *env, const struct kv_opts *o, uint64_t block, struct kv_tune *t,
		 int max, int *n)
{
#ifdef HAVE_CUDA
	static const int unrolls[] = { 2, 4, 8 }, per_sm[] = { 1, 2, 4 };
	struct bench b;
	int err = 0, rc = 1;

	*n = 0;
	if (setup(&b, env, o, block))
		goto out;
	for (int u = 0; u < 3; u++) {
		for (int c = 0; c < 3 && *n < max; c++) {
			struct kv_tune *line = &t[(*n)++];

			*line = (struct kv_tune){ block, unrolls[u], per_sm[c], { 0 } };
			kv_cuda_force(unrolls[u], per_sm[c]);
			for (int d = 0; !err && d < KV_DIRS; d++)
				err = measure(&b, KV_OURS, (enum kv_dir)d, &line->gbps[d]);
			kv_cuda_force(0, 0);
			if (err) {
				cli_fail(err, "kv bench --tune");
				goto out;
			}
		}
	}
	rc = verify(&b);
out:
	teardown(&b);
	return rc;
#else
	(void)env, (void)o, (void)block, (void)t, (void)max, (void)n;
	fprintf(stderr, "aegaeon-cli kv bench --tune: this build has no CUDA\n");
	return 1;
#endif
}

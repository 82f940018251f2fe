/* aegaeon-cli kv bench: KV swap GB/s against per-block copies and the batch copy API, same run. */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "internal.h"
#include "kv_internal.h"

#define MAX_SIZES 16

struct kv_opts {
	const char *device;
	int gpu;
	uint64_t blocks[MAX_SIZES];
	int nsizes;
	uint32_t count;
	int random;
	int repeat;
};

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: aegaeon-cli kv bench [--device D] [--gpu N] [--block SIZE[,SIZE...]]\n"
		"                            [--blocks N] [--pattern seq|random] [--repeat N]\n"
		"\n"
		"Move N KV blocks GPU->host (out) and host->GPU (in) between a slab and a\n"
		"pinned pool, and print GB/s medians of three ways in the same run:\n"
		"  aegaeon     aeg_kv_swap_out/in: one gather/scatter kernel launch per call\n"
		"              through mapped pinned memory, with its interprocess event\n"
		"  per-block   one cudaMemcpyAsync per block (host backend: one memcpy per\n"
		"              block on the stream's thread)\n"
		"  batch       one cudaMemcpyBatchAsync for all blocks (cuda only)\n"
		"and aegaeon's speedup over each. The blocks are checked bit-exact after.\n"
		"\n"
		"  -d, --device NAME     backend: cuda or host\n"
		"  -g, --gpu N           GPU ordinal (default 0)\n"
		"  -b, --block SIZES     block sizes, comma-separated (default 32KiB)\n"
		"  -n, --blocks N        blocks per call (default 8192)\n"
		"  -p, --pattern P       seq: block i to block i; random: independent random\n"
		"                        permutations on both sides (default random)\n"
		"  -r, --repeat N        timed calls per way for the median (default 10)\n"
		"  -h, --help            this text\n");
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

/* Each 8-byte word of block @id says which block and word it is. */
static void stamp(uint64_t *words, uint64_t block_bytes, uint32_t id)
{
	for (uint64_t w = 0; w < block_bytes / 8; w++)
		words[w] = ((uint64_t)id << 32 | w) ^ 0x5bd1e9955bd1e995ull;
}

static int stamped(const uint64_t *words, uint64_t block_bytes, uint32_t id)
{
	for (uint64_t w = 0; w < block_bytes / 8; w++)
		if (words[w] != (((uint64_t)id << 32 | w) ^ 0x5bd1e9955bd1e995ull))
			return 0;
	return 1;
}

enum way { WAY_OURS = -1, WAY_PER_BLOCK = KV_BASELINE_PER_BLOCK, WAY_BATCH = KV_BASELINE_BATCH };

/* One call of @way in direction @out, timed to the stream's end. */
static int timed(aeg_kv_t *kv, aeg_stream_t *s, enum way way, int out, const uint32_t *gpu_ids,
		 const uint32_t *host_ids, uint32_t n, double *seconds)
{
	const uint32_t *src = out ? gpu_ids : host_ids, *dst = out ? host_ids : gpu_ids;
	uint64_t t0 = aeg_now_ns();
	aeg_handle_t h;
	int err;

	if (way == WAY_OURS)
		err = out ? aeg_kv_swap_out(kv, gpu_ids, host_ids, n, s, &h)
			  : aeg_kv_swap_in(kv, host_ids, gpu_ids, n, s, &h);
	else
		err = aeg_kv_baseline(kv, (enum kv_baseline)way, out, src, dst, n, s);
	if (!err)
		err = aeg_stream_sync(s);
	*seconds = (double)(aeg_now_ns() - t0) / 1e9;
	if (!err && way == WAY_OURS)
		err = aeg_kv_release(kv, &h);
	return err;
}

/* Median GB/s of @way after one untimed warm-up call; 0 where the backend has no such way. */
static int measure(aeg_kv_t *kv, aeg_stream_t *s, enum way way, int out, const uint32_t *gpu_ids,
		   const uint32_t *host_ids, const struct kv_opts *o, uint64_t block, double *gbps)
{
	double *t = calloc((size_t)o->repeat, sizeof(*t)), warm;
	int err;

	if (!t)
		return aeg_fail(AEG_ENOMEM, "timings");
	err = timed(kv, s, way, out, gpu_ids, host_ids, o->count, &warm);
	for (int r = 0; !err && r < o->repeat; r++)
		err = timed(kv, s, way, out, gpu_ids, host_ids, o->count, &t[r]);
	if (!err)
		*gbps = (double)o->count * (double)block / median(t, o->repeat) / 1e9;
	free(t);
	return err;
}

/* Out and back in once more, every byte checked: a fast wrong copy is no result. */
static int verify(aeg_device_t *dev, aeg_kv_t *kv, aeg_stream_t *s, const uint32_t *gpu_ids,
		  const uint32_t *host_ids, uint32_t n, uint64_t block)
{
	uint64_t region = (uint64_t)n * block;
	uint64_t *staging = malloc(region);
	uint32_t bad = 0;
	int err;

	if (!staging)
		return aeg_fail(AEG_ENOMEM, "verification buffer of %" PRIu64 " bytes", region);
	for (uint32_t id = 0; id < n; id++)
		stamp(staging + id * block / 8, block, id);
	if ((err = aeg_memcpy(dev, aeg_kv_gpu_ptr(kv, 0), staging, region)))
		goto out;
	memset(aeg_kv_host_ptr(kv, 0), 0, region);
	if ((err = aeg_kv_swap_out(kv, gpu_ids, host_ids, n, s, NULL)) || (err = aeg_stream_sync(s)))
		goto out;
	for (uint32_t i = 0; i < n; i++)
		bad += !stamped(aeg_kv_host_ptr(kv, host_ids[i]), block, gpu_ids[i]);
	if (bad) {
		err = aeg_fail(AEG_EIO, "swap-out check: %" PRIu32 " of %" PRIu32 " host blocks hold wrong bytes", bad, n);
		goto out;
	}
	if ((err = aeg_memset(dev, aeg_kv_gpu_ptr(kv, 0), 0, region)) ||
	    (err = aeg_kv_swap_in(kv, host_ids, gpu_ids, n, s, NULL)) || (err = aeg_stream_sync(s)) ||
	    (err = aeg_memcpy(dev, staging, aeg_kv_gpu_ptr(kv, 0), region)))
		goto out;
	for (uint32_t id = 0; id < n; id++)
		bad += !stamped(staging + id * block / 8, block, id);
	if (bad)
		err = aeg_fail(AEG_EIO, "swap-in check: %" PRIu32 " of %" PRIu32 " GPU blocks hold wrong bytes", bad, n);
out:
	free(staging);
	return err;
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

static int bench_size(aeg_device_t *dev, aeg_stream_t *s, const struct kv_opts *o, uint64_t block,
		      int cuda)
{
	uint64_t buffer = buffer_for(block), region, rng = 0x6b76;
	struct aeg_kv_params p = { .block_bytes = block };
	uint32_t *gpu_ids = NULL, *host_ids = NULL, buffers;
	aeg_slab_t *slab = NULL;
	aeg_pool_t *pool = NULL;
	aeg_kv_t *kv = NULL;
	char size_text[32];
	int err, rc = 1;

	aeg_size_format(block, size_text, sizeof(size_text));
	if (block > UINT64_MAX / o->count) {
		fprintf(stderr, "aegaeon-cli kv bench: %" PRIu32 " blocks of %s overflow\n", o->count, size_text);
		return 1;
	}
	region = (uint64_t)o->count * block;
	buffers = (uint32_t)((region + buffer - 1) / buffer);
	gpu_ids = malloc(o->count * sizeof(*gpu_ids));
	host_ids = malloc(o->count * sizeof(*host_ids));
	if (!gpu_ids || !host_ids) {
		fprintf(stderr, "aegaeon-cli kv bench: out of memory for %" PRIu32 " block ids\n", o->count);
		goto out;
	}
	if ((err = aeg_slab_create(dev, o->gpu, region, &slab))) {
		cli_fail(err, "slab");
		goto out;
	}
	if ((err = aeg_pool_create(dev, o->gpu, buffer, (uint64_t)buffers * buffer, &pool))) {
		cli_fail(err, "pinned pool");
		goto out;
	}
	p.slab = slab;
	p.gpu_blocks = o->count;
	p.pool = pool;
	p.host_buffers = buffers;
	if ((err = aeg_kv_create(dev, o->gpu, &p, &kv))) {
		cli_fail(err, "KV cache");
		goto out;
	}
	for (uint32_t i = 0; i < o->count; i++)
		gpu_ids[i] = host_ids[i] = i;
	if (o->random) {
		shuffle(gpu_ids, o->count, &rng);
		shuffle(host_ids, o->count, &rng);
	}

	for (int out = 1; out >= 0; out--) {
		double ours = 0, per = 0, batch = 0;

		if ((err = measure(kv, s, WAY_OURS, out, gpu_ids, host_ids, o, block, &ours)) ||
		    (err = measure(kv, s, WAY_PER_BLOCK, out, gpu_ids, host_ids, o, block, &per)) ||
		    (cuda && (err = measure(kv, s, WAY_BATCH, out, gpu_ids, host_ids, o, block, &batch)))) {
			cli_fail(err, out ? "swap-out" : "swap-in");
			goto out;
		}
		if (cuda)
			printf("  %-9s %-4s %12.2f %14.2f %12.2f %12.2fx %10.2fx\n", size_text, out ? "out" : "in",
			       ours, per, batch, ours / per, ours / batch);
		else
			printf("  %-9s %-4s %12.2f %14.2f %12s %12.2fx %10s\n", size_text, out ? "out" : "in",
			       ours, per, "-", ours / per, "-");
		fflush(stdout);
	}
	if ((err = verify(dev, kv, s, gpu_ids, host_ids, o->count, block))) {
		cli_fail(err, "verification");
		goto out;
	}
	rc = 0;
out:
	aeg_kv_destroy(kv);
	aeg_pool_destroy(pool);
	aeg_slab_destroy(slab);
	free(host_ids);
	free(gpu_ids);
	return rc;
}

static int parse_sizes(const char *text, struct kv_opts *o)
{
	char *copy = strdup(text), *tok, *save = NULL;
	int rc = 0;

	if (!copy)
		return cli_usage_error("kv", "out of memory");
	o->nsizes = 0;
	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (o->nsizes == MAX_SIZES) {
			rc = cli_usage_error("kv", "--block: at most %d sizes", MAX_SIZES);
			break;
		}
		if (aeg_size_parse(tok, 0, &o->blocks[o->nsizes])) {
			rc = cli_usage_error("kv", "--block: %s", aeg_error_detail());
			break;
		}
		if (o->blocks[o->nsizes] < AEG_KV_BLOCK_MIN || o->blocks[o->nsizes] > AEG_KV_BLOCK_MAX ||
		    o->blocks[o->nsizes] % AEG_KV_BLOCK_ALIGN) {
			rc = cli_usage_error("kv", "--block '%s': a KV block is a multiple of %u bytes from %u B to %u MiB",
					     tok, AEG_KV_BLOCK_ALIGN, AEG_KV_BLOCK_MIN, AEG_KV_BLOCK_MAX >> 20);
			break;
		}
		o->nsizes++;
	}
	if (rc == 0 && o->nsizes == 0)
		rc = cli_usage_error("kv", "--block: no size given");
	free(copy);
	return rc;
}

static int kv_bench(const struct kv_opts *o)
{
	struct aeg_gpu_info info;
	aeg_device_t *dev = NULL;
	aeg_stream_t *s = NULL;
	int cuda, err, rc = 1;

	if (cli_open_device(o->device, &dev))
		return 1;
	if ((err = aeg_device_gpu_info(dev, o->gpu, &info))) {
		cli_fail(err, "GPU");
		goto out;
	}
	if ((err = aeg_stream_create(dev, o->gpu, &s))) {
		cli_fail(err, "stream");
		goto out;
	}
	cuda = aeg_device_kind(dev) == AEG_DEVICE_CUDA;
	printf("KV swap of %" PRIu32 " %s blocks per call, %s backend, GPU %d (%s); GB/s, median of %d\n",
	       o->count, o->random ? "randomly permuted" : "sequential", aeg_device_kind_name(aeg_device_kind(dev)),
	       o->gpu, info.name, o->repeat);
	printf("  %-9s %-4s %12s %14s %12s %13s %11s\n", "block", "dir", "aegaeon", "per-block", "batch",
	       "vs per-block", "vs batch");
	rc = 0;
	for (int i = 0; i < o->nsizes && rc == 0; i++)
		rc = bench_size(dev, s, o, o->blocks[i], cuda);
	if (rc == 0)
		printf("all blocks checked bit-exact after one more swap each way\n");
out:
	if (s)
		aeg_stream_destroy(s);
	aeg_device_close(dev);
	return rc;
}

int cli_kv(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "block", required_argument, NULL, 'b' },
		{ "blocks", required_argument, NULL, 'n' },
		{ "pattern", required_argument, NULL, 'p' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct kv_opts o = { .gpu = 0, .blocks = { 32 << 10 }, .nsizes = 1, .count = 8192, .random = 1,
			     .repeat = 10 };
	unsigned long long v;
	int c, rc;
	char *end;

	while ((c = getopt_long(argc, argv, "d:g:b:n:p:r:h", opts, NULL)) != -1) {
		switch (c) {
		case 'd':
			o.device = optarg;
			break;
		case 'g':
			o.gpu = (int)strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end != '\0' || o.gpu < 0)
				return cli_usage_error("kv", "--gpu '%s' is not a GPU ordinal", optarg);
			break;
		case 'b':
			if ((rc = parse_sizes(optarg, &o)))
				return rc;
			break;
		case 'n':
			v = strtoull(optarg, &end, 10);
			if (*optarg == '\0' || *optarg == '-' || *end != '\0' || v == 0 || v >= UINT32_MAX)
				return cli_usage_error("kv", "--blocks '%s' is not a count in 1..%u", optarg, UINT32_MAX - 1);
			o.count = (uint32_t)v;
			break;
		case 'p':
			if (strcmp(optarg, "seq") == 0)
				o.random = 0;
			else if (strcmp(optarg, "random") == 0)
				o.random = 1;
			else
				return cli_usage_error("kv", "--pattern '%s': seq or random", optarg);
			break;
		case 'r':
			o.repeat = (int)strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end != '\0' || o.repeat <= 0 || o.repeat > 10000)
				return cli_usage_error("kv", "--repeat '%s' is not a count in 1..10000", optarg);
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind >= argc)
		return cli_usage_error("kv", "expected a subcommand: bench");
	if (strcmp(argv[optind], "bench") != 0)
		return cli_usage_error("kv", "unknown subcommand '%s' (bench)", argv[optind]);
	if (optind + 1 != argc)
		return cli_usage_error("kv", "unexpected argument '%s'", argv[optind + 1]);
	return kv_bench(&o);
}

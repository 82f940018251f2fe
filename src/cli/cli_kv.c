/* aegaeon-cli kv bench: KV swap GB/s against per-block copies and the batch copy API, each way and both at once. */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_kv.h"
#include "internal.h"

#define DEFAULT_SIZES "4KiB,16KiB,32KiB,64KiB,256KiB,1MiB,2MiB"
#define TUNE_MAX 9

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: aegaeon-cli kv bench [--device D] [--gpu N] [--block SIZE[,SIZE...]]\n"
		"                            [--bytes SIZE | --blocks N] [--layers L]\n"
		"                            [--pattern seq|random] [--repeat N] [--json]\n"
		"                            [--tune] [--standalone]\n"
		"\n"
		"Move KV blocks between a slab and a pinned pool and print GB/s medians of\n"
		"three ways, each way alone and both at once, in the same run:\n"
		"  aegaeon     aeg_kv_swap_out/in: one gather/scatter kernel launch per call\n"
		"              through mapped pinned memory, with its interprocess event\n"
		"  per-block   one cudaMemcpyAsync per block and layer (host backend: one\n"
		"              memcpy per block on the stream's thread)\n"
		"  batch       one cudaMemcpyBatchAsync for all of them (cuda only)\n"
		"'out' is GPU to host, 'in' host to GPU, 'both' a swap-out and a swap-in of\n"
		"other blocks from two threads on two streams at once (GB/s of both\n"
		"together). Every piece is then checked bit-exact after one more swap each\n"
		"way at once. Inside a job ($AEGAEON_SOCKET) the blocks are in the job's\n"
		"slab and pinned pool. On the host backend the figures are host memcpy\n"
		"speeds, not GPU figures.\n"
		"\n"
		"  -d, --device NAME     backend: cuda or host (in a job: the job's)\n"
		"  -g, --gpu N           GPU ordinal (default 0)\n"
		"  -b, --block SIZES     block sizes, comma-separated (default\n"
		"                        " DEFAULT_SIZES ")\n"
		"  -B, --bytes SIZE      bytes per call and direction (default 256MiB)\n"
		"  -n, --blocks N        blocks per call and direction instead of --bytes\n"
		"  -l, --layers L        GPU blocks in per-layer K and V tensors, vLLM's paged\n"
		"                        layout (each copy moves SIZE / 2L); default 0: a block\n"
		"                        is contiguous on both sides\n"
		"  -p, --pattern P       seq: block i to block i; random: independent random\n"
		"                        permutations on both sides (default random)\n"
		"  -r, --repeat N        timed calls per way for the median (default 10)\n"
		"  -j, --json            one JSON object instead of the table\n"
		"  -t, --tune            cuda: our swap with every kernel variant (unroll 2, 4,\n"
		"                        8) and 1, 2, 4 CTAs per SM, per size\n"
		"  -s, --standalone      in a job, use a slab and pool of this process\n"
		"  -h, --help            this text\n");
}

static int parse_sizes(const char *text, struct kv_opts *o)
{
	char *copy = strdup(text), *tok, *save = NULL;
	int rc = 0;

	if (!copy)
		return cli_usage_error("kv", "out of memory");
	o->nsizes = 0;
	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		uint64_t v;

		if (o->nsizes == KV_MAX_SIZES) {
			rc = cli_usage_error("kv", "--block: at most %d sizes", KV_MAX_SIZES);
			break;
		}
		if (aeg_size_parse(tok, 0, &v)) {
			rc = cli_usage_error("kv", "--block: %s", aeg_error_detail());
			break;
		}
		if (v < AEG_KV_BLOCK_MIN || v > AEG_KV_BLOCK_MAX || v % AEG_KV_BLOCK_ALIGN) {
			rc = cli_usage_error("kv", "--block '%s': a KV block is a multiple of %u bytes from %u B to %u MiB",
					     tok, AEG_KV_BLOCK_ALIGN, AEG_KV_BLOCK_MIN, AEG_KV_BLOCK_MAX >> 20);
			break;
		}
		o->sizes[o->nsizes++] = v;
	}
	if (rc == 0 && o->nsizes == 0)
		rc = cli_usage_error("kv", "--block: no size given");
	free(copy);
	return rc;
}

/* Sizes and layers together: every block splits into 2L pieces of a multiple of 256 bytes. */
static int check_layers(const struct kv_opts *o)
{
	for (int i = 0; o->layers && i < o->nsizes; i++) {
		uint64_t pieces = 2 * (uint64_t)o->layers;

		if (o->sizes[i] % pieces || (o->sizes[i] / pieces) % AEG_KV_BLOCK_ALIGN) {
			char text[32];

			aeg_size_format(o->sizes[i], text, sizeof(text));
			return cli_usage_error("kv", "--block %s with --layers %d: a block must split into %" PRIu64
					       " K and V pieces of a multiple of %u bytes",
					       text, o->layers, pieces, AEG_KV_BLOCK_ALIGN);
		}
	}
	return 0;
}

static const char *const dir_names[KV_DIRS] = { "out", "in", "both" };
static const char *const way_keys[KV_WAYS] = { "aegaeon", "per_block", "batch" };

static void print_gbps(double v, int width)
{
	if (v < 0)
		printf(" %*s", width, "-");
	else
		printf(" %*.2f", width, v);
}

static void print_ratio(double ours, double base, int width)
{
	if (base <= 0)
		printf(" %*s", width, "-");
	else
		printf(" %*.2fx", width - 1, ours / base);
}

static void print_header(const struct kv_env *env, const struct kv_opts *o)
{
	printf("KV swap, %s backend, GPU %d (%s)%s; %s blocks, %s; GB/s, median of %d\n",
	       aeg_device_kind_name(aeg_device_kind(env->dev)), o->gpu, env->info.name,
	       env->job ? ", inside the job (its slab and pinned pool)" : ", standalone",
	       o->random ? "randomly permuted" : "sequential",
	       o->layers ? "GPU blocks in per-layer K and V tensors" : "blocks contiguous on both sides", o->repeat);
	if (!env->cuda)
		printf("host backend: these are host memcpy speeds, not GPU figures\n");
	printf("  %-9s %-9s %7s %-4s %9s %10s %9s %12s %9s\n", "block", "piece", "blocks", "dir", "aegaeon",
	       "per-block", "batch", "vs per-block", "vs batch");
}

static void print_row(const struct kv_row *r)
{
	char block[32], piece[32];

	aeg_size_format(r->block_bytes, block, sizeof(block));
	aeg_size_format(r->piece_bytes, piece, sizeof(piece));
	for (int d = 0; d < KV_DIRS; d++) {
		printf("  %-9s %-9s %7" PRIu32 " %-4s", block, piece, r->blocks, dir_names[d]);
		print_gbps(r->gbps[d][KV_OURS], 9);
		print_gbps(r->gbps[d][KV_PER_BLOCK], 10);
		print_gbps(r->gbps[d][KV_BATCH], 9);
		print_ratio(r->gbps[d][KV_OURS], r->gbps[d][KV_PER_BLOCK], 12);
		print_ratio(r->gbps[d][KV_OURS], r->gbps[d][KV_BATCH], 9);
		printf("\n");
	}
	if (r->copy_engines)
		printf("  %-9s copy engines: one cudaMemcpyBatchAsync per call (pieces of 1 MiB and more)\n", "");
	else if (r->unroll)
		printf("  %-9s kernel: unroll %d, at most %u CTAs in, %u out\n", "", r->unroll, r->max_grid,
		       r->max_grid_out);
	fflush(stdout);
}

static void json_number(double v)
{
	if (v < 0)
		printf("null");
	else
		printf("%.3f", v);
}

static void json_row(const struct kv_row *r, int first)
{
	printf("%s\n    {\"block_bytes\": %" PRIu64 ", \"piece_bytes\": %" PRIu64 ", \"blocks\": %" PRIu32,
	       first ? "" : ",", r->block_bytes, r->piece_bytes, r->blocks);
	for (int d = 0; d < KV_DIRS; d++) {
		printf(", \"%s\": {", dir_names[d]);
		for (int w = 0; w < KV_WAYS; w++) {
			printf("%s\"%s\": ", w ? ", " : "", way_keys[w]);
			json_number(r->gbps[d][w]);
		}
		printf("}");
	}
	if (r->copy_engines)
		printf(", \"copy_engines\": true");
	else if (r->unroll)
		printf(", \"kernel\": {\"unroll\": %d, \"max_ctas\": %u, \"max_ctas_out\": %u}", r->unroll, r->max_grid,
		       r->max_grid_out);
	printf(", \"verified\": %s}", r->verified ? "true" : "false");
}

static void json_open(const struct kv_env *env, const struct kv_opts *o)
{
	printf("{\"backend\": ");
	cli_json_string(stdout, aeg_device_kind_name(aeg_device_kind(env->dev)));
	printf(", \"gpu\": %d, \"gpu_name\": ", o->gpu);
	cli_json_string(stdout, env->info.name);
	printf(", \"in_job\": %s, \"pattern\": \"%s\", \"layout\": \"%s\", \"layers\": %d, \"repeat\": %d, \"unit\": \"GB/s\"",
	       env->job ? "true" : "false", o->random ? "random" : "seq", o->layers ? "per-layer" : "blocks",
	       o->layers, o->repeat);
	if (!env->cuda)
		printf(", \"note\": \"host backend: host memcpy speeds, not GPU figures\"");
	printf(", \"results\": [");
}

static void print_tune(const struct kv_tune *t, int n, int json, int *first)
{
	for (int i = 0; i < n; i++) {
		if (json) {
			printf("%s\n    {\"block_bytes\": %" PRIu64 ", \"unroll\": %d, \"ctas_per_sm\": %d", *first ? "" : ",",
			       t[i].block_bytes, t[i].unroll, t[i].per_sm);
			for (int d = 0; d < KV_DIRS; d++)
				printf(", \"%s\": %.3f", dir_names[d], t[i].gbps[d]);
			printf("}");
		} else {
			char block[32];

			aeg_size_format(t[i].block_bytes, block, sizeof(block));
			printf("  %-9s unroll %d, %d CTAs/SM: out %.2f, in %.2f, both %.2f GB/s\n", block, t[i].unroll,
			       t[i].per_sm, t[i].gbps[KV_OUT], t[i].gbps[KV_IN], t[i].gbps[KV_BOTH]);
		}
		*first = 0;
	}
}

static int kv_bench(const struct kv_opts *o)
{
	struct kv_tune tune[TUNE_MAX];
	struct kv_env env;
	struct kv_row row;
	int rc = 0, first = 1, n;

	if ((rc = kv_env_open(o, &env)))
		return rc;
	if (o->tune && !env.cuda) {
		fprintf(stderr, "aegaeon-cli kv bench --tune: the kernels exist on the cuda backend only (this is %s)\n",
			aeg_device_kind_name(aeg_device_kind(env.dev)));
		kv_env_close(&env);
		return 1;
	}
	if (o->json)
		json_open(&env, o);
	else
		print_header(&env, o);
	for (int i = 0; i < o->nsizes && rc == 0; i++) {
		if (o->tune) {
			if (!(rc = kv_tune_size(&env, o, o->sizes[i], tune, TUNE_MAX, &n)))
				print_tune(tune, n, o->json, &first);
			continue;
		}
		if ((rc = kv_bench_size(&env, o, o->sizes[i], &row)))
			break;
		if (o->json)
			json_row(&row, first);
		else
			print_row(&row);
		first = 0;
	}
	if (o->json)
		printf("\n  ], \"verified\": %s}\n", rc == 0 ? "true" : "false");
	else if (rc == 0)
		printf("every piece checked bit-exact after one more swap each way at once\n");
	kv_env_close(&env);
	return rc;
}

static int parse_count(const char *text, const char *opt, unsigned long long max, unsigned long long *v)
{
	char *end;

	*v = strtoull(text, &end, 10);
	if (*text == '\0' || *text == '-' || *end != '\0' || *v == 0 || *v > max)
		return cli_usage_error("kv", "%s '%s' is not a count in 1..%llu", opt, text, max);
	return 0;
}

static int parse_option(int c, const char *arg, struct kv_opts *o)
{
	unsigned long long v;
	int rc;

	switch (c) {
	case 'd': {
		enum aeg_device_kind kind;

		if (aeg_device_kind_parse(arg, &kind))
			return cli_usage_error("kv", "--device '%s': %s", arg, aeg_error_detail());
		o->device = arg;
		return 0;
	}
	case 'g':
		if (cli_parse_int(arg, 0, 1023, &o->gpu))
			return cli_usage_error("kv", "--gpu '%s' is not a GPU ordinal", arg);
		return 0;
	case 'b':
		return parse_sizes(arg, o);
	case 'B':
		if (aeg_size_parse(arg, 0, &o->call_bytes) || o->call_bytes == 0)
			return cli_usage_error("kv", "--bytes '%s': %s", arg,
					       o->call_bytes ? aeg_error_detail() : "not a size above 0");
		return 0;
	case 'n':
		rc = parse_count(arg, "--blocks", (UINT32_MAX - 2) / 2, &v);
		o->blocks = (uint32_t)v;
		return rc;
	case 'l':
		if (cli_parse_int(arg, 0, AEG_KV_LAYERS_MAX, &o->layers))
			return cli_usage_error("kv", "--layers '%s' is not a count in 0..%u", arg, AEG_KV_LAYERS_MAX);
		return 0;
	case 'p':
		if (strcmp(arg, "seq") && strcmp(arg, "random"))
			return cli_usage_error("kv", "--pattern '%s': seq or random", arg);
		o->random = strcmp(arg, "random") == 0;
		return 0;
	case 'r':
		rc = parse_count(arg, "--repeat", 10000, &v);
		o->repeat = (int)v;
		return rc;
	case 'j':
		o->json = 1;
		return 0;
	case 't':
		o->tune = 1;
		return 0;
	case 's':
		o->standalone = 1;
		return 0;
	default:
		return cli_usage_error("kv", "unknown option");
	}
}

int cli_kv(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "block", required_argument, NULL, 'b' },
		{ "bytes", required_argument, NULL, 'B' },
		{ "blocks", required_argument, NULL, 'n' },
		{ "layers", required_argument, NULL, 'l' },
		{ "pattern", required_argument, NULL, 'p' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "json", no_argument, NULL, 'j' },
		{ "tune", no_argument, NULL, 't' },
		{ "standalone", no_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct kv_opts o = { .call_bytes = 256ull << 20, .random = 1, .repeat = 10 };
	int c, rc;

	if ((rc = parse_sizes(DEFAULT_SIZES, &o)))
		return rc;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":d:g:b:B:n:l:p:r:jtsh", opts, NULL)) != -1) {
		if (c == 'h') {
			usage(stdout);
			return 0;
		}
		if (c == '?' || c == ':')
			return cli_option_error("kv", c, argv);
		if ((rc = parse_option(c, optarg, &o)))
			return rc;
	}
	if (optind >= argc)
		return cli_usage_error("kv", "expected a subcommand: bench");
	if (strcmp(argv[optind], "bench") != 0)
		return cli_usage_error("kv", "unknown subcommand '%s' (bench)", argv[optind]);
	if (optind + 1 != argc)
		return cli_usage_error("kv", "unexpected argument '%s'", argv[optind + 1]);
	if ((rc = check_layers(&o)))
		return rc;
	return kv_bench(&o);
}

/* aegaeon-cli bench alloc|pinned|event: our figure against a baseline measured in the same run. */
#include "config.h"

#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "cli.h"
#include "internal.h"
#include "pinned_internal.h"

struct bench_opts {
	const char *device;
	int gpu;
	int repeat;
	uint64_t bytes;
	const char *hugepages;  /* --hugepages, NULL: as the environment says */
	json_t *json;           /* --json: the result object being filled, else NULL */
};

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: aegaeon-cli bench alloc  [--device D] [--gpu N] [--repeat N] [--json]\n"
		"       aegaeon-cli bench pinned [--device D] [--gpu N] [--repeat N] [--size SIZE]\n"
		"                                [--hugepages auto|never|always] [--json]\n"
		"       aegaeon-cli bench event  [--device D] [--gpu N] [--repeat N] [--json]\n"
		"       aegaeon-cli bench prefetch FILE [options]   (see 'bench prefetch --help')\n"
		"Options go before or after the benchmark's name.\n"
		"\n"
		"Measure aegaeon against the plain device API in the same run and print\n"
		"medians, p99 and the ratio:\n"
		"  alloc   slab alloc+free (1 MiB and 64 MiB, with 1000 other live blocks)\n"
		"          vs cudaMalloc+cudaFree (host backend: its mem_alloc+mem_free)\n"
		"  pinned  pinned pool provisioning per GiB (memfd, NUMA bind, populate,\n"
		"          register) vs cudaHostAlloc (host backend: mmap+MAP_POPULATE),\n"
		"          with the time of each step and the page size used\n"
		"  event   wait on an event handle of another process, already opened,\n"
		"          vs opening the handle afresh each time\n"
		"  prefetch  loading FILE into a slab in chunks vs read+memcpy\n"
		"\n"
		"  -d, --device NAME  backend: cuda or host\n"
		"  -g, --gpu N        GPU ordinal (default 0)\n"
		"  -r, --repeat N     repetitions for medians (default: per benchmark: alloc\n"
		"                     2000 batches, pinned 3 pools, event 10000 waits on the\n"
		"                     opened handle, prefetch 5 loads)\n"
		"  -s, --size SIZE    pool size for 'pinned' (default 1GiB)\n"
		"  -H, --hugepages M  page size for 'pinned' (sets AEGAEON_PINNED_HUGEPAGES):\n"
		"                     auto (default) uses 2 MiB huge pages when enough are\n"
		"                     reserved, never uses 4 KiB pages, always fails without\n"
		"                     them. Reserve them as root: sysctl vm.nr_hugepages=N,\n"
		"                     N = SIZE / 2 MiB + 1 (the pool's header page)\n"
		"  -j, --json         one JSON object on stdout: the rows of the table\n"
		"                     (what, aegaeon, baseline, unit, speedup) and the details\n"
		"  -h, --help         this text\n");
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Sorts @v in place; the @pct-th percentile (nearest rank). */
static uint64_t percentile(uint64_t *v, size_t n, double pct)
{
	size_t rank;

	qsort(v, n, sizeof(*v), cmp_u64);
	rank = (size_t)(pct / 100.0 * (double)n);
	return v[rank >= n ? n - 1 : rank];
}

/* A row of the table, or of the JSON object's "rows" with --json. */
static void print_row(const struct bench_opts *o, const char *what, double ours, double base, const char *unit,
		      int lower_is_better)
{
	double ratio = lower_is_better ? base / ours : ours / base;

	if (o->json)
		json_array_append_new(json_object_get(o->json, "rows"),
				      json_pack("{s:s, s:f, s:f, s:s, s:f}", "what", what, "aegaeon", ours,
						"baseline", base, "unit", unit, "speedup", ratio));
	else
		printf("  %-34s %12.2f %12.2f %-6s %8.1fx\n", what, ours, base, unit, ratio);
}

static void print_header(const struct bench_opts *o, const char *title)
{
	if (o->json)
		json_object_set_new(o->json, "title", json_string(title));
	else
		printf("%s\n  %-34s %12s %12s %-6s %9s\n", title, "what", "aegaeon", "baseline", "unit", "speedup");
}

/* ---------------------------------------------------------------- alloc */

static int bench_alloc_size(aeg_device_t *dev, const struct bench_opts *o, uint64_t block)
{
	const size_t batches = (size_t)o->repeat, per_batch = 100, base_n = 200;
	uint64_t *ours = NULL, *base = NULL, *live = NULL;
	uint64_t slab_bytes = block * 4 + (256ull << 20);
	aeg_slab_t *slab = NULL;
	struct aeg_block b;
	char label[64], sz[32];
	int err, rc = 1;
	size_t nlive = 1000;

	ours = calloc(batches, sizeof(*ours));
	base = calloc(base_n, sizeof(*base));
	live = calloc(nlive, sizeof(*live));
	if (ours == NULL || base == NULL || live == NULL) {
		fprintf(stderr, "aegaeon-cli bench: out of memory\n");
		goto out;
	}
	err = aeg_slab_create(dev, o->gpu, slab_bytes, &slab);
	if (err) {
		cli_fail(err, "slab");
		goto out;
	}
	/* Other live blocks of mixed sizes, so the free lists are not trivial. */
	srand(42);
	for (size_t i = 0; i < nlive; i++) {
		err = aeg_slab_alloc(slab, 256u * (1 + (uint64_t)(rand() % 512)), &b);
		if (err) {
			cli_fail(err, "slab alloc");
			goto out;
		}
		live[i] = b.id;
	}
	for (size_t i = 0; i < nlive; i += 2)
		aeg_slab_free(slab, live[i]);

	for (size_t i = 0; i < batches; i++) {
		uint64_t t0 = aeg_now_ns();

		for (size_t j = 0; j < per_batch; j++) {
			err = aeg_slab_alloc(slab, block, &b);
			if (err == 0)
				err = aeg_slab_free(slab, b.id);
			if (err) {
				cli_fail(err, "slab alloc+free");
				goto out;
			}
		}
		ours[i] = (aeg_now_ns() - t0) / per_batch;
	}
	for (size_t i = 0; i < base_n; i++) {
		void *p;
		uint64_t t0 = aeg_now_ns();

		err = aeg_mem_alloc(dev, o->gpu, block, &p);
		if (err == 0)
			err = aeg_mem_free(dev, o->gpu, p);
		if (err) {
			cli_fail(err, "device alloc+free");
			goto out;
		}
		base[i] = aeg_now_ns() - t0;
	}
	aeg_size_format(block, sz, sizeof(sz));
	snprintf(label, sizeof(label), "%s median", sz);
	uint64_t om = percentile(ours, batches, 50), bm = percentile(base, base_n, 50);
	print_row(o, label, (double)om, (double)bm, "ns", 1);
	snprintf(label, sizeof(label), "%s p99", sz);
	print_row(o, label, (double)percentile(ours, batches, 99), (double)percentile(base, base_n, 99), "ns", 1);
	rc = 0;
out:
	if (slab != NULL)
		aeg_slab_destroy(slab);
	free(ours);
	free(base);
	free(live);
	return rc;
}

static int bench_alloc(aeg_device_t *dev, struct bench_opts *o)
{
	if (o->repeat <= 0)
		o->repeat = 2000;
	print_header(o, aeg_device_kind(dev) == AEG_DEVICE_CUDA
		     ? "slab alloc+free vs cudaMalloc+cudaFree (per pair; batches of 100)"
		     : "slab alloc+free vs host mem_alloc+mem_free (per pair; batches of 100)");
	if (bench_alloc_size(dev, o, 1ull << 20) || bench_alloc_size(dev, o, 64ull << 20))
		return 1;
	return 0;
}

/* --------------------------------------------------------------- pinned */

static int baseline_pinned(aeg_device_t *dev, uint64_t bytes, uint64_t *ns)
{
	uint64_t t0 = aeg_now_ns();

#ifdef HAVE_CUDA
	if (aeg_device_kind(dev) == AEG_DEVICE_CUDA) {
		void *p;
		cudaError_t ce = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped);

		if (ce != cudaSuccess)
			return aeg_fail(AEG_EDEVICE, "cudaHostAlloc: %s", cudaGetErrorString(ce));
		*ns = aeg_now_ns() - t0;
		cudaFreeHost(p);
		return 0;
	}
#endif
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (p == MAP_FAILED)
		return aeg_fail(AEG_ENOMEM, "mmap of %llu bytes failed", (unsigned long long)bytes);
	*ns = aeg_now_ns() - t0;
	munmap(p, bytes);
	return 0;
}

static int bench_pinned(aeg_device_t *dev, struct bench_opts *o)
{
	uint64_t ours[64], base[64], bind[64], populate[64], reg[64], destroy[64];
	double gib = (double)o->bytes / (double)(1ull << 30);
	const uint64_t buffer = 32ull << 20;
	struct aeg_pool_timing first = { 0 }, tm;
	size_t n;
	int err;

	if (o->repeat <= 0)
		o->repeat = 3;
	if (o->repeat > 64)
		o->repeat = 64;
	n = (size_t)o->repeat;
	if (o->bytes < buffer || o->bytes % buffer)
		return cli_usage_error("bench", "--size must be a multiple of 32 MiB");
	if (o->hugepages != NULL && setenv("AEGAEON_PINNED_HUGEPAGES", o->hugepages, 1) != 0) {
		perror("aegaeon-cli bench: setenv");
		return 1;
	}
	for (size_t i = 0; i < n; i++) {
		aeg_pool_t *pool;
		uint64_t t0 = aeg_now_ns();

		err = aeg_pool_create(dev, o->gpu, buffer, o->bytes, &pool);
		if (err)
			return cli_fail(err, "bench pinned");
		ours[i] = aeg_now_ns() - t0;
		aeg_pool_timing(pool, &tm);
		if (i == 0)
			first = tm;
		bind[i] = tm.bind_ns;
		populate[i] = tm.populate_ns;
		reg[i] = tm.register_ns;
		t0 = aeg_now_ns();
		aeg_pool_destroy(pool);
		destroy[i] = aeg_now_ns() - t0;
		err = baseline_pinned(dev, o->bytes, &base[i]);
		if (err)
			return cli_fail(err, "baseline");
	}
	print_header(o, aeg_device_kind(dev) == AEG_DEVICE_CUDA
		     ? "pinned pool provisioning vs cudaHostAlloc (median)"
		     : "pinned pool provisioning vs mmap+MAP_POPULATE (median)");
	print_row(o, "provisioning per GiB", (double)percentile(ours, n, 50) / 1e6 / gib,
		  (double)percentile(base, n, 50) / 1e6 / gib, "ms", 1);
	/* Medians of each step: they need not add up to the median of the whole. */
	double steps[4] = { (double)percentile(bind, n, 50) / 1e6 / gib, (double)percentile(populate, n, 50) / 1e6 / gib,
			    (double)percentile(reg, n, 50) / 1e6 / gib, (double)percentile(destroy, n, 50) / 1e6 / gib };
	const char *hp = getenv("AEGAEON_PINNED_HUGEPAGES") ? getenv("AEGAEON_PINNED_HUGEPAGES") : "auto";

	if (o->json) {
		json_object_set_new(o->json, "steps_ms_per_gib",
				    json_pack("{s:f, s:f, s:f, s:f}", "bind", steps[0], "populate", steps[1],
					      "register", steps[2], "destroy", steps[3]));
		json_object_set_new(o->json, "populate_threads", json_integer(first.threads));
		json_object_set_new(o->json, "first_bind_ms", json_real((double)first.bind_ns / 1e6));
		json_object_set_new(o->json, "page_bytes", json_integer((json_int_t)first.page_bytes));
		json_object_set_new(o->json, "hugepages", json_string(hp));
		return 0;
	}
	printf("  steps per GiB (medians): bind %.1f ms, populate %.1f ms (%u threads), register %.1f ms; destroy %.1f ms\n",
	       steps[0], steps[1], first.threads, steps[2], steps[3]);
	printf("  first run's bind, the process' topology load included: %.1f ms\n", (double)first.bind_ns / 1e6);
	printf("  pages: %s (AEGAEON_PINNED_HUGEPAGES=%s)\n", first.page_bytes == 4096 ? "4 KiB" : "2 MiB hugetlb", hp);
	return 0;
}

/* ---------------------------------------------------------------- event */

/* The other process: EVENT_COUNT recorded events, their handles on stdout, alive until stdin closes. */
#define EVENT_COUNT 50

static int event_serve(aeg_device_t *dev, const struct bench_opts *o)
{
	char hex[AEG_HANDLE_HEX_LEN + 1], c;
	aeg_event_t *ev[EVENT_COUNT] = { NULL };
	aeg_stream_t *stream = NULL;
	aeg_handle_t h;
	int err;

	err = aeg_stream_create(dev, o->gpu, &stream);
	for (int i = 0; err == 0 && i < EVENT_COUNT; i++) {
		err = aeg_event_create(dev, o->gpu, &ev[i], &h);
		if (err == 0)
			err = aeg_event_record(ev[i], stream);
		if (err == 0) {
			aeg_handle_to_hex(&h, hex);
			printf("%s\n", hex);
		}
	}
	if (err == 0)
		err = aeg_stream_sync(stream);
	if (err) {
		cli_fail(err, "event");
		goto out;
	}
	fflush(stdout);
	while (read(STDIN_FILENO, &c, 1) > 0)
		;
out:
	for (int i = 0; i < EVENT_COUNT; i++)
		if (ev[i] != NULL)
			aeg_event_destroy(ev[i]);
	if (stream != NULL)
		aeg_stream_destroy(stream);
	return err ? 1 : 0;
}

/*
 * The baseline opens each of EVENT_COUNT distinct handles once (as a fresh
 * consumer does); ours waits --repeat times (10000) on one handle already
 * opened.
 */
static int bench_event(aeg_device_t *dev, struct bench_opts *o)
{
	int to_child[2] = { -1, -1 }, from_child[2] = { -1, -1 }, rc = 1, err, status;
	const size_t waits = o->repeat > 0 ? (size_t)o->repeat : 10000;
	uint64_t first[EVENT_COUNT], *cached = NULL;
	char hex[AEG_HANDLE_HEX_LEN + 2], gpu[16], self[4096], title[128];
	aeg_handle_t h[EVENT_COUNT];
	struct aeg_gpu_info info;
	ssize_t n;
	pid_t pid = -1;
	FILE *in = NULL;

	memset(h, 0, sizeof(h));
	/* The device's context exists before anything is timed. */
	err = aeg_device_gpu_info(dev, o->gpu, &info);
	if (err)
		return cli_fail(err, "GPU");
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0 || pipe(to_child) || pipe(from_child)) {
		perror("aegaeon-cli bench event");
		return 1;
	}
	self[n] = '\0';
	snprintf(gpu, sizeof(gpu), "%d", o->gpu);
	pid = fork();
	if (pid == 0) {
		dup2(to_child[0], STDIN_FILENO);
		dup2(from_child[1], STDOUT_FILENO);
		close(to_child[1]);
		close(from_child[0]);
		execl(self, self, "bench", "event", "--serve", "--device",
		      aeg_device_kind_name(aeg_device_kind(dev)), "--gpu", gpu, (char *)NULL);
		_exit(127);
	}
	close(to_child[0]);
	close(from_child[1]);
	in = fdopen(from_child[0], "r");
	for (int i = 0; i < EVENT_COUNT; i++) {
		if (pid < 0 || in == NULL || fgets(hex, sizeof(hex), in) == NULL) {
			fprintf(stderr, "aegaeon-cli bench event: the event process gave no handles\n");
			goto out;
		}
		hex[strcspn(hex, "\n")] = '\0';
		err = aeg_handle_from_hex(hex, &h[i]);
		if (err) {
			cli_fail(err, "event handle");
			goto out;
		}
	}
	for (int i = 0; i < EVENT_COUNT; i++) {
		uint64_t t0 = aeg_now_ns();

		err = aeg_event_wait_handle(dev, &h[i], 10000);
		first[i] = aeg_now_ns() - t0;
		if (err) {
			cli_fail(err, "first wait");
			goto out;
		}
	}
	cached = calloc(waits, sizeof(*cached));
	if (cached == NULL) {
		cli_fail(AEG_ENOMEM, "bench");
		goto out;
	}
	for (size_t i = 0; i < waits; i++) {
		uint64_t t0 = aeg_now_ns();

		err = aeg_event_wait_handle(dev, &h[0], 10000);
		cached[i] = aeg_now_ns() - t0;
		if (err) {
			cli_fail(err, "cached wait");
			goto out;
		}
	}
	snprintf(title, sizeof(title), "event wait by handle of another process: opened (%zu waits) vs first open (%d)",
		 waits, EVENT_COUNT);
	print_header(o, title);
	if (o->json)
		json_object_set_new(o->json, "waits", json_integer((json_int_t)waits));
	print_row(o, "wait, median", (double)percentile(cached, waits, 50) / 1e3,
		  (double)percentile(first, EVENT_COUNT, 50) / 1e3, "us", 1);
	print_row(o, "wait, p99", (double)percentile(cached, waits, 99) / 1e3,
		  (double)percentile(first, EVENT_COUNT, 99) / 1e3, "us", 1);
	rc = 0;
out:
	for (int i = 0; i < EVENT_COUNT; i++)
		aeg_event_close_handle(dev, &h[i]);
	free(cached);
	if (to_child[1] >= 0)
		close(to_child[1]);
	if (in != NULL)
		fclose(in);
	else if (from_child[0] >= 0)
		close(from_child[0]);
	if (pid > 0)
		waitpid(pid, &status, 0);
	return rc;
}

/* Runs benchmark @what, printing a table, or with @json one JSON object. */
static int run(const char *what, struct bench_opts *o, int serve, int json)
{
	aeg_device_t *dev = NULL;
	int rc;

	rc = cli_open_device(o->device, &dev);
	if (rc)
		return rc;
	if (json && !serve) {
		o->json = json_pack("{s:s, s:s, s:i, s:[]}", "benchmark", what, "device",
				    aeg_device_kind_name(aeg_device_kind(dev)), "gpu", o->gpu, "rows");
		if (o->json == NULL) {
			aeg_device_close(dev);
			return cli_fail(AEG_ENOMEM, "bench");
		}
	}
	if (serve)
		rc = event_serve(dev, o);
	else if (strcmp(what, "alloc") == 0)
		rc = bench_alloc(dev, o);
	else if (strcmp(what, "pinned") == 0)
		rc = bench_pinned(dev, o);
	else
		rc = bench_event(dev, o);
	aeg_device_close(dev);
	if (o->json != NULL && rc == 0)
		return cli_json_print(o->json);
	json_decref(o->json);
	return rc;
}

/*
 * The benchmark's name: the first word that is neither an option nor an
 * option's value, wherever the options are (before the name or after it);
 * NULL when there is none. Both tables are asked, so a value of a bench
 * prefetch option (--chunk 1MiB) is never taken for the name.
 */
static const char *benchmark_name(int argc, char **argv, const struct option *bench_opts, int *at)
{
	struct option all[64];
	size_t n = 0;
	char **copy;
	const char *what = NULL;
	int c;

	for (const struct option *o = bench_opts; o->name != NULL && n < 63; o++)
		all[n++] = *o;
	for (const struct option *o = cli_prefetch_options; o->name != NULL && n < 63; o++)
		all[n++] = *o;
	memset(&all[n], 0, sizeof(all[n]));
	/* getopt_long permutes what it is given: a copy, so the subcommand parses the words as they were. */
	copy = malloc(sizeof(*copy) * ((size_t)argc + 1));
	if (copy == NULL)
		return NULL;
	memcpy(copy, argv, sizeof(*copy) * ((size_t)argc + 1));
	optind = 0;
	opterr = 0;
	/* A leading '-' hands each word that is no option over in order, as the value of option 1. */
	while (what == NULL && (c = getopt_long(argc, copy, "-:d:g:r:s:H:jh", all, NULL)) != -1)
		if (c == 1)
			what = optarg;
	if (what == NULL && optind < argc)
		what = copy[optind];        /* after "--" */
	free(copy);
	for (*at = 1; what != NULL && *at < argc && argv[*at] != what; (*at)++)
		;
	return what;
}

/* bench prefetch FILE with the options wherever they were: the words without the name, argv[0] "prefetch". */
static int bench_prefetch(int argc, char **argv, int at)
{
	char **words = malloc(sizeof(*words) * (size_t)argc);
	int n = 0, rc;

	if (words == NULL)
		return cli_fail(AEG_ENOMEM, "bench");
	words[n++] = argv[at];
	for (int i = 1; i < argc; i++)
		if (i != at)
			words[n++] = argv[i];
	rc = cli_bench_prefetch(n, words);
	free(words);
	return rc;
}

int cli_bench(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "size", required_argument, NULL, 's' },
		{ "hugepages", required_argument, NULL, 'H' },
		{ "serve", no_argument, NULL, 'S' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct bench_opts o = { .gpu = 0, .repeat = 0, .bytes = 1ull << 30 };
	const char *what;
	int c, at, serve = 0, json = 0;

	/* bench prefetch has options of its own (cli_prefetch.c). */
	what = benchmark_name(argc, argv, opts, &at);
	if (what != NULL && strcmp(what, "prefetch") == 0)
		return bench_prefetch(argc, argv, at);

	/* 0, not 1: glibc's getopt starts afresh, out of the mode the scan for the name left it in. */
	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":d:g:r:s:H:jh", opts, NULL)) != -1) {
		switch (c) {
		case 'd': o.device = optarg; break;
		case 'g':
			if (cli_parse_int(optarg, 0, 1023, &o.gpu))
				return cli_usage_error("bench", "--gpu '%s' is not a GPU ordinal (0..1023)", optarg);
			break;
		case 'r':
			if (cli_parse_int(optarg, 1, 1000000, &o.repeat))
				return cli_usage_error("bench", "--repeat '%s' is not a count in 1..1000000", optarg);
			break;
		case 's':
			if (aeg_size_parse(optarg, 0, &o.bytes))
				return cli_usage_error("bench", "--size: %s", aeg_error_detail());
			break;
		case 'H':
			if (strcmp(optarg, "auto") && strcmp(optarg, "never") && strcmp(optarg, "always"))
				return cli_usage_error("bench", "--hugepages '%s' is not auto, never or always", optarg);
			o.hugepages = optarg;
			break;
		case 'S': serve = 1; break;
		case 'j': json = 1; break;
		case 'h': usage(stdout); return 0;
		default: return cli_option_error("bench", c, argv);
		}
	}
	if (optind == argc)
		return cli_usage_error("bench", "expected one of alloc, pinned, event, prefetch FILE");
	if (optind + 1 != argc)
		return cli_usage_error("bench", "unexpected argument '%s'", argv[optind + 1]);
	what = argv[optind];
	if (strcmp(what, "alloc") && strcmp(what, "pinned") && strcmp(what, "event"))
		return cli_usage_error("bench", "unknown benchmark '%s' (alloc, pinned, event, prefetch FILE)", what);
	if (o.hugepages != NULL && strcmp(what, "pinned") != 0)
		return cli_usage_error("bench", "--hugepages is for 'bench pinned' only");
	return run(what, &o, serve, json);
}

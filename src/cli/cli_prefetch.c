/* aegaeon-cli prefetch: load a file into a GPU slab through a session (the job's agent, or this process). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"
#include "internal.h"
#include "model_paths.h"
#include "prefetch_internal.h"

static int parse_feed(const char *text, enum aeg_prefetch_feed *feed)
{
	if (strcmp(text, "auto") == 0)
		*feed = AEG_FEED_AUTO;
	else if (strcmp(text, "mmap") == 0)
		*feed = AEG_FEED_MMAP;
	else if (strcmp(text, "read") == 0)
		*feed = AEG_FEED_READ;
	else if (strcmp(text, "mixed") == 0)
		*feed = AEG_FEED_MIXED;
	else
		return -1;
	return 0;
}

static const char prefetch_usage[] =
	"Usage: aegaeon-cli prefetch FILE [--gpu N] [--chunk SIZE] [--json] [--wait | --no-wait]\n"
	"                            [--verify] [--reload] [--timing] [--local [--device NAME] [--feed auto|mmap|read|mixed]\n"
	"                            [--threads N] [--streams N] [--piece SIZE]\n"
	"                            [--mmap-threads N] [--direct]]\n"
	"                            [--tp-rank R --tp-world W [--tp-preset megatron|vllm|none]\n"
	"                             [--tp-rule PATTERN=DIM|PATTERN=whole]... [--tp-uneven]]\n"
	"Load FILE (a file, or a model directory or shard index) into a GPU slab in chunks, each\n"
	"with an interprocess event.\n"
	"Inside a job ($AEGAEON_SOCKET set) the node's agent loads it into the job slab, so the chunks\n"
	"outlive the command; a file the job already holds is reused unless --reload. --no-wait prints\n"
	"the load id and chunks at once; --verify reads the chunks back and compares them with the file.\n"
	"Outside a job, or with --local, this process loads it, waits and reports the speed.\n"
	"--timing prints how long each set-up step took (device, slab, engine, agent round trips)\n"
	"and a local load from its start to its last byte on the GPU (\"load\").\n"
	"--tp-rank and --tp-world load only tensor-parallel rank R's part of each tensor (of W ranks):\n"
	"the tensors a rule matches are split along its dimension (rules in order, then the preset's,\n"
	"megatron by default; PATTERN as fnmatch(3)), the others loaded whole. --tp-uneven allows an\n"
	"extent that is no multiple of W (the last ranks take less). A job reuses only a load of the\n"
	"same slice; --verify compares each part with the rows of the file it comes from.\n";
static const char bench_usage[] =
	"Usage: aegaeon-cli bench prefetch FILE [--gpu N] [--chunk SIZE] [--feed auto|mmap|read|mixed]\n"
	"                                  [--threads N] [--streams N] [--piece SIZE] [--mmap-threads N]\n"
	"                                  [--repeat N] [--cache] [--direct] [--json] [--timing]\n";

/* The engine's options, which work in this process only: 0 or the exit code of bad usage. */
static int engine_option(const char *cmd, int c, const char *arg, struct cli_prefetch_args *a)
{
	static const struct { int c; const char *name; } names[] = {
		{ 'd', "--device" }, { 'f', "--feed" }, { 't', "--threads" }, { 's', "--streams" },
		{ 'm', "--mmap-threads" }, { 'p', "--piece" }, { 'D', "--direct" },
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]) && a->local_only == NULL; i++)
		if (names[i].c == c)
			a->local_only = names[i].name;
	switch (c) {
	case 'd':
		a->device = arg;
		return 0;
	case 'f':
		return parse_feed(arg, &a->feed) ?
		       cli_usage_error(cmd, "--feed '%s': expected auto, mmap, read or mixed", arg) : 0;
	case 't':
		return cli_parse_int(arg, 1, 256, &a->threads) ? cli_usage_error(cmd, "--threads '%s': expected 1..256", arg) : 0;
	case 's':
		return cli_parse_int(arg, 1, 64, &a->streams) ? cli_usage_error(cmd, "--streams '%s': expected 1..64", arg) : 0;
	case 'm':
		return cli_parse_int(arg, 1, 256, &a->mmap_threads) ?
		       cli_usage_error(cmd, "--mmap-threads '%s': expected 1..256", arg) : 0;
	case 'p':
		if (aeg_size_parse(arg, 0, &a->piece_bytes))
			return cli_usage_error(cmd, "--piece: %s", aeg_error_detail());
		if (a->piece_bytes == 0 || a->piece_bytes % 4096)
			return cli_usage_error(cmd, "--piece %s: expected a non-zero multiple of 4 KiB", arg);
		return 0;
	default:        /* 'D' */
		a->direct = 1;
		return 0;
	}
}

/* One option of prefetch or bench prefetch: 0, -1 after --help, or the exit code of bad usage. */
static int take_option(const char *cmd, int c, char *arg, const char *word, struct cli_prefetch_args *a, int bench)
{
	switch (c) {
	case CLI_OPT_TP_RANK: case CLI_OPT_TP_WORLD: case CLI_OPT_TP_PRESET: case CLI_OPT_TP_RULE:
	case CLI_OPT_TP_UNEVEN:
		if (bench)
			return cli_usage_error(cmd, "the --tp-* options (a tensor-parallel slice) are options of prefetch");
		return cli_slice_option(cmd, c, arg, &a->tp);
	case 'd': case 'f': case 't': case 's': case 'm': case 'p': case 'D':
		return engine_option(cmd, c, arg, a);
	case 'g':
		if (cli_parse_int(arg, 0, 1023, &a->gpu))
			return cli_usage_error(cmd, "--gpu '%s': expected a GPU index", arg);
		a->gpu_given = 1;
		return 0;
	case 'c':
		if (aeg_size_parse(arg, 0, &a->chunk_bytes))
			return cli_usage_error(cmd, "--chunk: %s", aeg_error_detail());
		if (a->chunk_bytes == 0 || a->chunk_bytes % AEG_PREFETCH_CHUNK_ALIGN)
			return cli_usage_error(cmd, "--chunk %s: a chunk is a non-zero multiple of 4 KiB, such as 64MiB", arg);
		a->chunk_given = 1;
		return 0;
	case 'j': a->json = 1; return 0;
	case 'l': a->local = 1; return 0;
	case 'T': a->timing = 1; return 0;
	case 'r':
		if (!bench)
			return cli_usage_error(cmd, "--repeat is an option of bench prefetch");
		return cli_parse_int(arg, 1, 1000, &a->repeat) ? cli_usage_error(cmd, "--repeat '%s': expected 1..1000", arg) : 0;
	case 'C':
		if (!bench)
			return cli_usage_error(cmd, "--cache is an option of bench prefetch");
		a->cache = 1;
		return 0;
	case 'w': case 'W': case 'v': case 'R':
		if (bench)
			return cli_usage_error(cmd, "'%s' is an option of prefetch", word);
		if (c == 'w' || c == 'W')
			a->wait = c == 'w';
		else
			*(c == 'v' ? &a->verify : &a->reload) = 1;
		return 0;
	case 'h':
		fputs(bench ? bench_usage : prefetch_usage, stdout);
		return -1;
	default:
		return cli_usage_error(cmd, "unknown option '%s'", word);
	}
}

const struct option cli_prefetch_options[] = {
	{ "device", required_argument, NULL, 'd' },
	{ "gpu", required_argument, NULL, 'g' },
	{ "chunk", required_argument, NULL, 'c' },
	{ "feed", required_argument, NULL, 'f' },
	{ "threads", required_argument, NULL, 't' },
	{ "streams", required_argument, NULL, 's' },
	{ "piece", required_argument, NULL, 'p' },
	{ "mmap-threads", required_argument, NULL, 'm' },
	{ "json", no_argument, NULL, 'j' },
	{ "local", no_argument, NULL, 'l' },
	{ "repeat", required_argument, NULL, 'r' },
	{ "cache", no_argument, NULL, 'C' },
	{ "direct", no_argument, NULL, 'D' },
	{ "wait", no_argument, NULL, 'w' },
	{ "no-wait", no_argument, NULL, 'W' },
	{ "verify", no_argument, NULL, 'v' },
	{ "reload", no_argument, NULL, 'R' },
	{ "timing", no_argument, NULL, 'T' },
	{ "help", no_argument, NULL, 'h' },
	CLI_SLICE_OPTIONS,
	{ NULL, 0, NULL, 0 },
};

int cli_prefetch_parse(const char *cmd, int argc, char **argv, struct cli_prefetch_args *a, int bench)
{
	struct aeg_config cfg;
	int c, err;

	memset(a, 0, sizeof(*a));
	a->repeat = 5;
	a->wait = 1;
	err = aeg_config_load(&cfg, NULL);
	if (err)
		return cli_fail(err, "reading the configuration");
	a->chunk_bytes = cfg.prefetch_chunk_bytes;
	a->threads = cfg.prefetch_threads;
	/* 0, not 1: glibc's getopt starts afresh, after bench's scan for the benchmark's name in another mode. */
	optind = 0;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", cli_prefetch_options, NULL)) != -1) {
		if (c == '?' || c == ':')
			return cli_option_error(cmd, c, argv);
		err = take_option(cmd, c, optarg, argv[optind - 1], a, bench);
		if (err)
			return err;
	}
	if (optind != argc - 1)
		return cli_usage_error(cmd, "expected one FILE");
	a->file = argv[optind];
	return cli_slice_finish(cmd, &a->tp, &a->slice);
}

void cli_prefetch_engine(const struct cli_prefetch_args *a, struct aeg_prefetch_config *cfg)
{
	aeg_prefetch_config_defaults(cfg);
	cfg->threads = a->threads;
	if (a->streams)
		cfg->streams = a->streams;
	if (a->piece_bytes)
		cfg->piece_bytes = a->piece_bytes;
	if (a->mmap_threads)
		cfg->mmap_threads = a->mmap_threads;
	cfg->direct_io = a->direct;
}

/* The usage rules of prefetch in a job and outside one; 0 or the exit code. */
static int check_usage(const struct cli_prefetch_args *a, int job)
{
	if (job && a->local_only)
		return cli_usage_error("prefetch", "%s works in this process only: add --local (inside a job the "
				       "agent loads with the site's settings)", a->local_only);
	if (job && !a->wait && a->verify)
		return cli_usage_error("prefetch", "--verify needs the chunks loaded: drop --no-wait");
	if (!job && !a->wait)
		return cli_usage_error("prefetch", "--no-wait needs a job's agent to keep the chunks: %s",
				       cli_in_job() ? "drop --local" : "outside a job they are freed when this command exits");
	if (!job && a->reload)
		return cli_usage_error("prefetch", "--reload works through a job's agent only");
	return 0;
}

/*
 * Slab bytes certainly enough for every file of the model @path names (a
 * file, a directory or a shard index): the sum of each file's worst case,
 * since each file's chunks are laid out apart. 0, or 1 after saying why.
 */
static int model_slab_bytes(const char *path, uint64_t chunk_bytes, uint64_t *bytes)
{
	struct aeg_model_paths mp;
	struct stat st;
	int err;

	err = aeg_model_paths(path, &mp);
	if (err)
		return cli_fail(err, path);
	*bytes = 0;
	for (uint32_t i = 0; i < mp.count; i++) {
		if (stat(mp.paths[i], &st) != 0) {
			char shown[CLI_SHOWN_MAX];

			fprintf(stderr, "aegaeon-cli: %s: %s\n", cli_shown(mp.paths[i], shown, sizeof(shown)),
				strerror(errno));
			aeg_model_paths_free(&mp);
			return 1;
		}
		*bytes += aeg_prefetch_slab_bytes_for((uint64_t)st.st_size, chunk_bytes);
	}
	aeg_model_paths_free(&mp);
	return 0;
}

/* This process's session: one GPU's slab just big enough for the model, the engine the options ask. */
static int local_session(const struct cli_prefetch_args *a, struct aeg_prefetch_config *engine, aeg_session_t **s)
{
	struct aeg_session_config cfg = { .mode = AEG_SESSION_LOCAL, .engine = engine };
	int err;

	/* A chunk larger than a file is the file's size (the engine's rule): the slab is not made larger for it. */
	if (model_slab_bytes(a->file, a->chunk_bytes, &cfg.slab_bytes))
		return 1;
	cli_prefetch_engine(a, engine);
	/* The ring's memory is faulted in while the device opens (a CUDA context: 100 ms and more). */
	err = aeg_session_warm_up(&cfg);
	if (err)
		return cli_fail(err, "prefetch");
	return cli_session_open(&cfg, a->device, a->file, s);
}

static double gbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (double)ns : 0.0;
}

/* Loaded by this process: the speed, the feed, the first chunk's latency; the read-back check's result. */
static int print_local(const struct cli_prefetch_args *a, aeg_model_t *m, const struct cli_verify *vr)
{
	struct cli_load_info l;
	struct aeg_load_progress p;
	double first_ms;
	uint32_t ntensors;
	uint64_t ns;
	char size[32], file[CLI_SHOWN_MAX];
	int err;

	aeg_model_progress(m, &p);
	aeg_model_tensors(m, &ntensors);
	ns = p.end_ns - p.start_ns;
	first_ms = p.first_chunk_ns ? (double)(p.first_chunk_ns - p.start_ns) / 1e6 : 0.0;
	if (a->json) {
		json_t *o;

		/* The keys of a load the job's agent made, and what only this process can time. */
		err = cli_model_info(m, &l);
		if (err)
			return cli_fail(err, a->file);
		o = cli_load_json(m, &l);
		if (o) {
			json_object_set_new(o, "seconds", json_real((double)ns / 1e9));
			json_object_set_new(o, "gbps", json_real(gbps(p.total_bytes, ns)));
			json_object_set_new(o, "first_chunk_ms", json_real(first_ms));
			json_object_set_new(o, "feed", json_string(aeg_prefetch_feed_name(p.feed)));
			if (vr)
				json_object_set_new(o, "verified", cli_verified_json(vr));
		}
		return cli_json_print(o);
	}
	printf("%s: %s in %.3f s, %.2f GB/s (%s feed, %u chunk%s, %u tensor%s, first chunk after %.2f ms)\n",
	       cli_shown(a->file, file, sizeof(file)), aeg_size_format(p.total_bytes, size, sizeof(size)),
	       (double)ns / 1e9, gbps(p.total_bytes, ns), aeg_prefetch_feed_name(p.feed), p.chunks, cli_s(p.chunks),
	       ntensors, cli_s(ntensors), first_ms);
	cli_print_slice(m);
	if (vr && cli_model_info(m, &l) == 0)
		cli_print_verified(&l, vr);
	return 0;
}

/* Loaded, or found, by the job's agent. */
static int print_job(const struct cli_prefetch_args *a, aeg_model_t *m, uint64_t ns, const struct cli_verify *vr)
{
	struct cli_load_info l;
	char size[32], path[CLI_SHOWN_MAX];
	int reused = !aeg_model_owned(m), err = cli_model_info(m, &l);

	if (err)
		return cli_fail(err, a->file);
	if (a->json) {
		json_t *o = cli_load_json(m, &l);

		if (o && a->wait) {
			json_object_set_new(o, "seconds", json_real((double)ns / 1e9));
			if (!reused)
				json_object_set_new(o, "gbps", json_real(gbps(l.file_bytes, ns)));
			if (vr)
				json_object_set_new(o, "verified", cli_verified_json(vr));
		}
		if (o)
			json_object_set_new(o, "reused", json_boolean(reused));
		return cli_json_print(o);
	}
	cli_shown(l.path, path, sizeof(path));
	if (!a->wait) {
		if (reused)
			printf("%s: already in the job's slab (load %" PRIu64 "): reused, nothing loaded\n", path, l.id);
		cli_print_load(m, &l, 1);
	} else if (reused) {
		printf("%s: already in the job's slab (load %" PRIu64 ", %s in %u chunk%s): reused, nothing loaded%s\n",
		       path, l.id, aeg_size_format(l.file_bytes, size, sizeof(size)), l.chunks, cli_s(l.chunks),
		       ns > 1000000 ? "; waited for it to finish" : "");
	} else if (aeg_model_file_count(m) > 1) {
		printf("%s: %s in %.3f s, %.2f GB/s through the job's agent (%u chunk%s in slab %d)\n", path,
		       aeg_size_format(l.file_bytes, size, sizeof(size)), (double)ns / 1e9, gbps(l.file_bytes, ns),
		       l.chunks, cli_s(l.chunks), l.slab);
	} else {
		printf("%s: %s in %.3f s, %.2f GB/s through the job's agent (load %" PRIu64 ", %u chunk%s in slab %d)\n",
		       path, aeg_size_format(l.file_bytes, size, sizeof(size)), (double)ns / 1e9, gbps(l.file_bytes, ns),
		       l.id, l.chunks, cli_s(l.chunks), l.slab);
	}
	if (a->wait) {
		cli_print_files(m);
		cli_print_slice(m);
	}
	if (vr)
		cli_print_verified(&l, vr);
	return 0;
}

/* A load refused: why; an extent no multiple of the world size is allowed by --tp-uneven. */
static int load_refused(const struct cli_prefetch_args *a, int err)
{
	int uneven = a->slice != NULL && strstr(aeg_error_detail(), "AEG_SLICE_UNEVEN") != NULL;

	cli_fail(err, a->file);
	if (uneven)
		fprintf(stderr, "aegaeon-cli: --tp-uneven sets AEG_SLICE_UNEVEN\n");
	return 1;
}

/* Load, wait, check and report; the session is open. */
static int run(const struct cli_prefetch_args *a, aeg_session_t *s, int job)
{
	/* In a job the agent's chunk size unless one is given; a chunk larger than the file is the file's. */
	uint64_t chunk = !job || a->chunk_given ? a->chunk_bytes : 0;
	struct aeg_load_request req = { .path = a->file, .gpu = a->gpu_given || !job ? a->gpu : -1,
					.chunk_bytes = chunk, .feed = a->feed,
					.flags = job && !a->reload ? AEG_LOAD_REUSE : 0, .slice = a->slice };
	struct cli_verify vr;
	struct cli_load_info l;
	uint64_t t0 = aeg_now_ns(), end = t0;
	aeg_model_t *m = NULL;
	int err, rc = 0;

	if (job && a->gpu_given && cli_job_slab_of(s, a->gpu) < 0)
		return 1;
	err = aeg_session_load(s, &req, &m);
	if (err)
		return load_refused(a, err);
	if (a->wait) {
		err = cli_model_wait(m, 0, !a->json && isatty(STDERR_FILENO), t0, &end);
		if (err) {
			char why[1024];

			snprintf(why, sizeof(why), "%s", aeg_error_detail());
			rc = cli_model_info(m, &l) ? cli_fail(err, a->file) : cli_load_failed(&l, err, why);
			goto out;
		}
	}
	if (a->verify && cli_verify(s, m, &vr)) {
		rc = 1;
		goto out;
	}
	rc = job ? print_job(a, m, end - t0, a->verify ? &vr : NULL) : print_local(a, m, a->verify ? &vr : NULL);
out:
	aeg_model_close(m);
	return rc;
}

int cli_prefetch(int argc, char **argv)
{
	struct aeg_session_config cfg = { .mode = AEG_SESSION_JOB };
	struct cli_prefetch_args a;
	struct aeg_prefetch_config engine;
	aeg_session_t *s = NULL;
	int job, rc;

	rc = cli_prefetch_parse("prefetch", argc, argv, &a, 0);
	if (rc)
		return rc < 0 ? 0 : rc;
	job = cli_in_job() && !a.local;
	rc = check_usage(&a, job);
	if (rc)
		return rc;
	if (job) {
		/* GPU memory is touched only to verify. */
		if (!a.verify)
			cfg.flags |= AEG_SESSION_CONNECT_ONLY;
		rc = cli_session_open(&cfg, NULL, "prefetch", &s);
	} else {
		rc = local_session(&a, &engine, &s);
	}
	if (rc == 0)
		rc = run(&a, s, job);
	aeg_session_close(s);
	if (a.timing)
		cli_print_timings();
	return rc;
}

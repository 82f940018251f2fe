/* aegaeon-cli prefetch, wait, release and bench prefetch (cli_job.c does them inside a job). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"
#include "internal.h"
#include "prefetch_internal.h"
#include "topo_internal.h"

#define NAIVE_BUFFER (64ull << 20)

struct pf_args {
	const char *device;
	const char *file;
	int gpu;
	uint64_t chunk_bytes;
	enum aeg_prefetch_feed feed;
	int threads;
	int streams;
	int mmap_threads;
	uint64_t piece_bytes;
	int json;
	int local;
	int repeat;
	int cache;
	int direct;
	/* prefetch only */
	int gpu_given, chunk_given, wait, verify, reload;
	const char *local_only;         /* the first option the job's agent does not take */
};

/* One engine on one GPU with a slab just big enough for the file. */
struct session {
	aeg_device_t *dev;
	const aeg_topo_t *topo;         /* the process' cached one: shared with the pool */
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_prefetch_t *pf;
	uint64_t file_bytes;
};

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
	"                            [--verify] [--reload] [--local [--device NAME] [--feed auto|mmap|read|mixed]\n"
	"                            [--threads N] [--streams N] [--piece SIZE]\n"
	"                            [--mmap-threads N] [--direct]]\n"
	"Load FILE into a GPU slab in chunks, each with an interprocess event.\n"
	"Inside a job ($AEGAEON_SOCKET set) the node's agent loads it into the job slab, so the chunks\n"
	"outlive the command; a file the job already holds is reused unless --reload. --no-wait prints\n"
	"the load id and chunks at once; --verify reads the chunks back and compares them with the file.\n"
	"Outside a job, or with --local, this process loads it, waits and reports the speed.\n";
static const char bench_usage[] =
	"Usage: aegaeon-cli bench prefetch FILE [--gpu N] [--chunk SIZE] [--feed auto|mmap|read|mixed]\n"
	"                                  [--threads N] [--streams N] [--piece SIZE] [--mmap-threads N]\n"
	"                                  [--repeat N] [--cache] [--direct] [--json]\n";

/* Options shared by prefetch and bench prefetch; returns 0, -1 after --help, or the exit code. */
static int parse_args(const char *cmd, int argc, char **argv, struct pf_args *a, int bench)
{
	static const struct option opts[] = {
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
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
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

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'd':
			a->device = optarg;
			a->local_only = a->local_only ? a->local_only : "--device";
			break;
		case 'g':
			if (cli_parse_int(optarg, 0, 1023, &a->gpu))
				return cli_usage_error(cmd, "--gpu '%s': expected a GPU index", optarg);
			a->gpu_given = 1;
			break;
		case 'c':
			err = aeg_size_parse(optarg, 0, &a->chunk_bytes);
			if (err)
				return cli_usage_error(cmd, "--chunk: %s", aeg_error_detail());
			if (a->chunk_bytes == 0 || a->chunk_bytes % AEG_PREFETCH_CHUNK_ALIGN)
				return cli_usage_error(cmd, "--chunk %s: a chunk is a non-zero multiple of 4 KiB, such as 64MiB",
						       optarg);
			a->chunk_given = 1;
			break;
		case 'f':
			if (parse_feed(optarg, &a->feed))
				return cli_usage_error(cmd, "--feed '%s': expected auto, mmap, read or mixed", optarg);
			a->local_only = a->local_only ? a->local_only : "--feed";
			break;
		case 't':
			if (cli_parse_int(optarg, 1, 256, &a->threads))
				return cli_usage_error(cmd, "--threads '%s': expected 1..256", optarg);
			a->local_only = a->local_only ? a->local_only : "--threads";
			break;
		case 's':
			if (cli_parse_int(optarg, 1, 64, &a->streams))
				return cli_usage_error(cmd, "--streams '%s': expected 1..64", optarg);
			a->local_only = a->local_only ? a->local_only : "--streams";
			break;
		case 'm':
			if (cli_parse_int(optarg, 1, 256, &a->mmap_threads))
				return cli_usage_error(cmd, "--mmap-threads '%s': expected 1..256", optarg);
			a->local_only = a->local_only ? a->local_only : "--mmap-threads";
			break;
		case 'p':
			err = aeg_size_parse(optarg, 0, &a->piece_bytes);
			if (err)
				return cli_usage_error(cmd, "--piece: %s", aeg_error_detail());
			if (a->piece_bytes == 0 || a->piece_bytes % 4096)
				return cli_usage_error(cmd, "--piece %s: expected a non-zero multiple of 4 KiB", optarg);
			a->local_only = a->local_only ? a->local_only : "--piece";
			break;
		case 'j':
			a->json = 1;
			break;
		case 'l':
			a->local = 1;
			break;
		case 'r':
			if (!bench || cli_parse_int(optarg, 1, 1000, &a->repeat))
				return cli_usage_error(cmd, "--repeat '%s': expected 1..1000", optarg);
			break;
		case 'C':
			if (!bench)
				return cli_usage_error(cmd, "--cache is an option of bench prefetch");
			a->cache = 1;
			break;
		case 'D':
			a->direct = 1;
			a->local_only = a->local_only ? a->local_only : "--direct";
			break;
		case 'w':
		case 'W':
		case 'v':
		case 'R':
			if (bench)
				return cli_usage_error(cmd, "'%s' is an option of prefetch", argv[optind - 1]);
			if (c == 'w' || c == 'W')
				a->wait = c == 'w';
			else if (c == 'v')
				a->verify = 1;
			else
				a->reload = 1;
			break;
		case 'h':
			fputs(bench ? bench_usage : prefetch_usage, stdout);
			return -1;
		default:
			return cli_usage_error(cmd, "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error(cmd, "expected one FILE");
	a->file = argv[optind];
	return 0;
}

static void session_close(struct session *s)
{
	aeg_prefetch_destroy(s->pf);
	if (s->pool)
		aeg_pool_destroy(s->pool);
	if (s->slab)
		aeg_slab_destroy(s->slab);
	if (s->dev)
		aeg_device_close(s->dev);
}

static int session_open(const struct pf_args *a, struct session *s)
{
	struct aeg_prefetch_config cfg;
	uint64_t slab_bytes;
	struct stat st;
	int err;

	memset(s, 0, sizeof(*s));
	if (stat(a->file, &st) != 0) {
		fprintf(stderr, "aegaeon-cli: %s: %s\n", a->file, strerror(errno));
		return 1;
	}
	s->file_bytes = (uint64_t)st.st_size;
	err = cli_open_device(a->device, &s->dev);
	if (err)
		return err;
	err = aeg_topo_live(&s->topo);
	if (err) {
		fprintf(stderr, "aegaeon-cli: topology unknown (%s): prefetch threads stay unbound\n",
			aeg_error_detail());
		s->topo = NULL;
	}
	/*
	 * The slab is made for this one file; a chunk larger than the file makes
	 * one chunk of it (session_chunk), so it does not make the slab larger.
	 */
	slab_bytes = aeg_prefetch_slab_bytes_for(s->file_bytes, a->chunk_bytes);
	err = aeg_slab_create(s->dev, a->gpu, slab_bytes, &s->slab);
	if (err)
		goto fail;
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = a->threads;
	if (a->streams)
		cfg.streams = a->streams;
	if (a->piece_bytes)
		cfg.piece_bytes = a->piece_bytes;
	if (a->mmap_threads)
		cfg.mmap_threads = a->mmap_threads;
	cfg.topo = s->topo;
	cfg.direct_io = a->direct;
	if (a->cache) {
		/* Room for the whole file in the cache plus the ring beside it. */
		uint64_t buf = 32ull << 20;
		uint64_t bytes = (s->file_bytes + buf - 1) / buf * buf + 2ull * (uint64_t)cfg.threads * buf;

		err = aeg_pool_create(s->dev, a->gpu, buf, bytes, &s->pool);
		if (err)
			goto fail;
		cfg.cache_bytes = bytes;
	}
	err = aeg_prefetch_create(s->slab, s->pool, &cfg, &s->pf);
	if (err)
		goto fail;
	return 0;
fail:
	cli_fail(err, a->file);
	session_close(s);
	return 1;
}

/* The chunk size the engine gets: the one asked, at most the session's slab. */
static uint64_t session_chunk(const struct session *s, uint64_t chunk_bytes)
{
	uint64_t slab_bytes = aeg_slab_bytes(s->slab);

	return chunk_bytes < slab_bytes ? chunk_bytes : slab_bytes;
}

static double gbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (double)ns : 0.0;
}

static void draw_bar(const struct aeg_load_progress *p)
{
	cli_progress(p->done_bytes, p->total_bytes, p->start_ns);
}

static json_t *chunks_json(aeg_load_t *l)
{
	const struct aeg_chunk *c;
	json_t *arr = json_array();
	char hex[AEG_HANDLE_HEX_LEN + 1], ptr[32];
	uint32_t n;

	c = aeg_load_chunks(l, &n);
	for (uint32_t i = 0; i < n; i++) {
		aeg_handle_to_hex(&c[i].event, hex);
		snprintf(ptr, sizeof(ptr), "0x%" PRIxPTR, (uintptr_t)c[i].device_ptr);
		json_array_append_new(arr, json_pack("{s:s, s:I, s:s, s:I, s:I, s:I}",
						     "device_ptr", ptr, "size", (json_int_t)c[i].size,
						     "event_handle", hex, "slab_id", (json_int_t)c[i].slab_id,
						     "slab_offset", (json_int_t)c[i].slab_offset,
						     "file_offset", (json_int_t)c[i].file_offset));
	}
	return arr;
}

/* Load once and wait, drawing progress on a terminal. */
static int load_and_wait(struct session *s, const struct pf_args *a, int bar,
			 struct aeg_load_progress *p, aeg_load_t **lp)
{
	struct aeg_prefetch_options o = { .chunk_bytes = session_chunk(s, a->chunk_bytes), .feed = a->feed };
	aeg_load_t *l;
	int err;

	err = aeg_prefetch_file(s->pf, a->file, &o, &l);
	if (err)
		return err;
	for (;;) {
		err = aeg_load_wait(l, bar ? 100 : -1);
		if (err != AEG_ETIMEDOUT)
			break;
		aeg_load_progress(l, p);
		draw_bar(p);
	}
	aeg_load_progress(l, p);
	if (bar) {
		draw_bar(p);
		fputc('\n', stderr);
	}
	if (err) {
		aeg_prefetch_release_all(s->pf);
		aeg_load_close(l);
		return err;
	}
	*lp = l;
	return 0;
}

int cli_prefetch(int argc, char **argv)
{
	struct aeg_load_progress p;
	struct pf_args a;
	struct session s;
	aeg_load_t *l;
	uint32_t ntensors;
	uint64_t ns;
	int rc, err;

	rc = parse_args("prefetch", argc, argv, &a, 0);
	if (rc)
		return rc < 0 ? 0 : rc;
	if (cli_in_job() && !a.local) {
		struct cli_job_prefetch j = { .file = a.file, .gpu = a.gpu_given ? a.gpu : -1,
					      .chunk_bytes = a.chunk_given ? a.chunk_bytes : 0, .json = a.json,
					      .wait = a.wait, .verify = a.verify, .reload = a.reload };

		if (a.local_only)
			return cli_usage_error("prefetch", "%s works in this process only: add --local (inside a job the "
					       "agent loads with the site's settings)", a.local_only);
		if (!a.wait && a.verify)
			return cli_usage_error("prefetch", "--verify needs the chunks loaded: drop --no-wait");
		return cli_job_prefetch(&j);
	}
	if (!a.wait)
		return cli_usage_error("prefetch", "--no-wait needs a job's agent to keep the chunks: %s",
				       cli_in_job() ? "drop --local" : "outside a job they are freed when this command exits");
	if (a.verify || a.reload)
		return cli_usage_error("prefetch", "%s works through a job's agent only", a.verify ? "--verify" : "--reload");
	rc = session_open(&a, &s);
	if (rc)
		return rc;
	err = load_and_wait(&s, &a, !a.json && isatty(STDERR_FILENO), &p, &l);
	if (err) {
		session_close(&s);
		return cli_fail(err, a.file);
	}
	aeg_load_tensors(l, &ntensors);
	ns = p.end_ns - p.start_ns;
	if (a.json) {
		json_t *o = json_pack("{s:s, s:I, s:I, s:f, s:f, s:f, s:s, s:I, s:o}",
				      "file", a.file, "bytes", (json_int_t)p.total_bytes,
				      "chunk_bytes", (json_int_t)a.chunk_bytes,
				      "seconds", (double)ns / 1e9, "gbps", gbps(p.total_bytes, ns),
				      "first_chunk_ms", p.first_chunk_ns ? (double)(p.first_chunk_ns - p.start_ns) / 1e6 : 0.0,
				      "feed", aeg_prefetch_feed_name(p.feed), "tensors", (json_int_t)ntensors,
				      "chunks", chunks_json(l));

		rc = cli_json_print(o);
	} else {
		char size[32];

		printf("%s: %s in %.3f s, %.2f GB/s (%s feed, %u chunk%s, %u tensor%s, first chunk after %.2f ms)\n",
		       a.file, aeg_size_format(p.total_bytes, size, sizeof(size)), (double)ns / 1e9,
		       gbps(p.total_bytes, ns), aeg_prefetch_feed_name(p.feed), p.chunks, cli_s(p.chunks),
		       ntensors, cli_s(ntensors), p.first_chunk_ns ? (double)(p.first_chunk_ns - p.start_ns) / 1e6 : 0.0);
	}
	aeg_load_close(l);
	session_close(&s);
	return rc;
}

static const char wait_usage[] =
	"Usage: aegaeon-cli wait HANDLE|LOAD_ID|FILE [--timeout S] [--device NAME]\n"
	"Wait for a chunk's event (its 128-hex-digit handle; any process of the user can), or,\n"
	"inside a job, for a load the node's agent holds: by load id, or the newest load of FILE.\n"
	"Exit status 1 when it did not complete in time or the load failed.\n";

int cli_wait(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "timeout", required_argument, NULL, 't' },
		{ "device", required_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *device = NULL;
	aeg_device_t *dev;
	aeg_handle_t h;
	double timeout_s = -1;
	int c, err;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (cli_parse_seconds(optarg, &timeout_s))
				return cli_usage_error("wait", "--timeout '%s': expected seconds >= 0", optarg);
			break;
		case 'd':
			device = optarg;
			break;
		case 'h':
			fputs(wait_usage, stdout);
			return 0;
		default:
			return cli_usage_error("wait", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("wait", "expected one HANDLE, LOAD_ID or FILE");
	if (strlen(argv[optind]) != AEG_HANDLE_HEX_LEN || aeg_handle_from_hex(argv[optind], &h) != 0) {
		if (cli_in_job())
			return cli_job_wait(argv[optind], timeout_s);
		if (strlen(argv[optind]) == AEG_HANDLE_HEX_LEN)
			return cli_usage_error("wait", "%s", aeg_error_detail());
		return cli_usage_error("wait", "'%s' is not an event handle (128 hex digits); load ids and files "
				       "are waited for through a job's agent, and AEGAEON_SOCKET is unset", argv[optind]);
	}
	err = cli_open_device(device, &dev);
	if (err)
		return err;
	err = aeg_event_wait_handle(dev, &h, timeout_s < 0 ? -1 : (int)(timeout_s * 1000));
	aeg_device_close(dev);
	if (err == AEG_ETIMEDOUT) {
		fprintf(stderr, "aegaeon-cli wait: not complete after %g s\n", timeout_s);
		return 1;
	}
	return err ? cli_fail(err, "wait") : 0;
}

static const char release_usage[] =
	"Usage: aegaeon-cli release ID... [--gpu N] | --load LOAD_ID | --all\n"
	"Inside a job: free prefetched chunks in the node's agent: the blocks with these slab ids\n"
	"(in the slab of --gpu, default the first), every block of a load, or everything.\n";

int cli_release(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "all", no_argument, NULL, 'a' },
		{ "load", required_argument, NULL, 'l' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_job_release r = { .gpu = -1 };
	uint64_t *ids = NULL;
	int c, rc;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		char *end;

		switch (c) {
		case 'a':
			r.all = 1;
			break;
		case 'l':
			errno = 0;
			r.load_id = strtoull(optarg, &end, 10);
			if (optarg[0] < '0' || optarg[0] > '9' || errno || *end || r.load_id == 0)
				return cli_usage_error("release", "--load '%s': expected a load id (1, 2, ...)", optarg);
			break;
		case 'g':
			if (cli_parse_int(optarg, 0, 1023, &r.gpu))
				return cli_usage_error("release", "--gpu '%s': expected a GPU index", optarg);
			break;
		case 'h':
			fputs(release_usage, stdout);
			return 0;
		default:
			return cli_usage_error("release", "unknown option '%s'", argv[optind - 1]);
		}
	}
	r.count = (size_t)(argc - optind);
	if ((r.all != 0) + (r.load_id != 0) + (r.count != 0) != 1)
		return cli_usage_error("release", "expected slab ids, --load or --all (one of them)");
	if ((r.all || r.load_id) && r.gpu >= 0)
		return cli_usage_error("release", "--gpu goes with slab ids only");
	if (r.count) {
		ids = calloc(r.count, sizeof(*ids));
		if (ids == NULL)
			return cli_fail(AEG_ENOMEM, "release");
		for (size_t i = 0; i < r.count; i++) {
			const char *t = argv[optind + (int)i];
			char *end;

			errno = 0;
			ids[i] = strtoull(t, &end, 10);
			if (t[0] < '0' || t[0] > '9' || errno || *end) {
				free(ids);
				return cli_usage_error("release", "'%s' is not a slab id", t);
			}
		}
		r.ids = ids;
	}
	if (cli_in_job()) {
		rc = cli_job_release(&r);
	} else {
		fprintf(stderr,
			"aegaeon-cli release: not in an aegaeon job (AEGAEON_SOCKET is unset): chunks that "
			"'aegaeon-cli prefetch' loads outside a job are freed when it exits, so nothing holds these\n");
		rc = 1;
	}
	free(ids);
	return rc;
}

/* --------------------------------------------------------------- bench */

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;

	return a < b ? -1 : a > b;
}

static uint64_t median(uint64_t *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_u64);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The baseline: read() into one buffer and a synchronous copy, chunk after chunk. */
static int naive_once(struct session *s, const char *path, void *dst, void *buf, uint64_t *ns)
{
	uint64_t t0 = aeg_now_ns(), off = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC), err = 0;

	if (fd < 0) {
		fprintf(stderr, "aegaeon-cli: %s: %s\n", path, strerror(errno));
		return AEG_EIO;
	}
	while (off < s->file_bytes) {
		ssize_t r = read(fd, buf, NAIVE_BUFFER);

		if (r <= 0) {
			err = AEG_EIO;
			break;
		}
		err = aeg_memcpy(s->dev, (char *)dst + off, buf, (size_t)r);
		if (err)
			break;
		off += (uint64_t)r;
	}
	close(fd);
	*ns = aeg_now_ns() - t0;
	return err;
}

int cli_bench_prefetch(int argc, char **argv)
{
	struct aeg_load_progress p;
	struct pf_args a;
	struct session s;
	uint64_t *ours, *first, *naive, m_ours, m_first, m_naive;
	void *dst = NULL, *buf = NULL;
	const char *feed = "?";
	int rc, err = 0;

	rc = parse_args("bench prefetch", argc, argv, &a, 1);
	if (rc)
		return rc < 0 ? 0 : rc;
	rc = session_open(&a, &s);
	if (rc)
		return rc;
	ours = calloc((size_t)a.repeat, sizeof(*ours));
	first = calloc((size_t)a.repeat, sizeof(*first));
	naive = calloc((size_t)a.repeat, sizeof(*naive));
	buf = malloc(NAIVE_BUFFER);
	if (ours == NULL || first == NULL || naive == NULL || buf == NULL) {
		err = AEG_ENOMEM;
		fprintf(stderr, "aegaeon-cli bench prefetch: out of memory\n");
		goto out;
	}

	if (a.cache) {
		/* The first load fills the host cache; the timed ones hit it. */
		aeg_load_t *l;

		err = load_and_wait(&s, &a, 0, &p, &l);
		if (err)
			goto fail;
		aeg_load_close(l);
		aeg_prefetch_release_all(s.pf);
	}
	for (int i = 0; i < a.repeat; i++) {
		aeg_load_t *l;

		err = load_and_wait(&s, &a, 0, &p, &l);
		if (err)
			goto fail;
		ours[i] = p.end_ns - p.start_ns;
		first[i] = p.first_chunk_ns ? p.first_chunk_ns - p.start_ns : 0;
		feed = aeg_prefetch_feed_name(p.feed);
		aeg_load_close(l);
		aeg_prefetch_release_all(s.pf);
	}

	err = aeg_mem_alloc(s.dev, a.gpu, s.file_bytes ? s.file_bytes : 1, &dst);
	if (err)
		goto fail;
	for (int i = 0; i < a.repeat; i++) {
		err = naive_once(&s, a.file, dst, buf, &naive[i]);
		if (err)
			break;
	}
	aeg_mem_free(s.dev, a.gpu, dst);
	if (err)
		goto fail;

	m_ours = median(ours, a.repeat);
	m_first = median(first, a.repeat);
	m_naive = median(naive, a.repeat);
	if (a.json) {
		json_t *o = json_pack("{s:s, s:I, s:I, s:i, s:s, s:b, s:f, s:f, s:f, s:f}",
				      "file", a.file, "bytes", (json_int_t)p.total_bytes,
				      "chunk_bytes", (json_int_t)a.chunk_bytes, "repeat", a.repeat,
				      "feed", feed, "cache", a.cache,
				      "ours_gbps", gbps(p.total_bytes, m_ours),
				      "first_chunk_ms", (double)m_first / 1e6,
				      "naive_gbps", gbps(s.file_bytes, m_naive),
				      "ratio", m_ours ? (double)m_naive / (double)m_ours : 0.0);

		err = cli_json_print(o) ? AEG_EIO : 0;
	} else {
		char size[32], chunk[32];

		printf("%s, %s, chunks of %s, median of %d\n", a.file, aeg_size_format(s.file_bytes, size, sizeof(size)),
		       aeg_size_format(a.chunk_bytes, chunk, sizeof(chunk)), a.repeat);
		printf("  %-28s %8.2f GB/s  (first chunk %.2f ms)\n",
		       a.cache ? "aegaeon (host cache)" : feed, gbps(p.total_bytes, m_ours),
		       (double)m_first / 1e6);
		printf("  %-28s %8.2f GB/s\n", "naive read + memcpy", gbps(s.file_bytes, m_naive));
		printf("  %-28s %8.2fx\n", "ratio", m_ours ? (double)m_naive / (double)m_ours : 0.0);
	}
	goto out;
fail:
	cli_fail(err, a.file);
out:
	free(ours);
	free(first);
	free(naive);
	free(buf);
	session_close(&s);
	return err ? 1 : 0;
}

/* aegaeon-cli prefetch, wait, release and bench prefetch. */
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
	int json;
	int local;
	int repeat;
	int cache;
	int direct;
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

static int in_job(void)
{
	const char *s = getenv("AEGAEON_SOCKET");

	return s != NULL && s[0] != '\0';
}

/*
 * Inside a job the chunks must outlive this command, so the job's agent
 * loads them; the agent client comes with the Slurm integration.
 */
static int through_agent(const char *cmd)
{
	fprintf(stderr,
		"aegaeon-cli %s: inside an aegaeon job (AEGAEON_SOCKET is set) this goes through the job's agent, "
		"which this build cannot reach yet; use --local to work in this process\n", cmd);
	return 1;
}

static int parse_feed(const char *text, enum aeg_prefetch_feed *feed)
{
	if (strcmp(text, "auto") == 0)
		*feed = AEG_FEED_AUTO;
	else if (strcmp(text, "mmap") == 0)
		*feed = AEG_FEED_MMAP;
	else if (strcmp(text, "read") == 0)
		*feed = AEG_FEED_READ;
	else
		return -1;
	return 0;
}

static int parse_int(const char *text, int lo, int hi, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

/* Options shared by prefetch and bench prefetch; returns 0, or the exit code. */
static int parse_args(const char *cmd, int argc, char **argv, struct pf_args *a, int bench)
{
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "chunk", required_argument, NULL, 'c' },
		{ "feed", required_argument, NULL, 'f' },
		{ "threads", required_argument, NULL, 't' },
		{ "json", no_argument, NULL, 'j' },
		{ "local", no_argument, NULL, 'l' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "cache", no_argument, NULL, 'C' },
		{ "direct", no_argument, NULL, 'D' },
		{ NULL, 0, NULL, 0 },
	};
	struct aeg_config cfg;
	int c, err;

	memset(a, 0, sizeof(*a));
	a->repeat = 5;
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
			break;
		case 'g':
			if (parse_int(optarg, 0, 1023, &a->gpu))
				return cli_usage_error(cmd, "--gpu '%s': expected a GPU index", optarg);
			break;
		case 'c':
			err = aeg_size_parse(optarg, 0, &a->chunk_bytes);
			if (err)
				return cli_usage_error(cmd, "--chunk: %s", aeg_error_detail());
			if (a->chunk_bytes == 0)
				return cli_usage_error(cmd, "--chunk 0: give a chunk size such as 64MiB");
			break;
		case 'f':
			if (parse_feed(optarg, &a->feed))
				return cli_usage_error(cmd, "--feed '%s': expected auto, mmap or read", optarg);
			break;
		case 't':
			if (parse_int(optarg, 1, 256, &a->threads))
				return cli_usage_error(cmd, "--threads '%s': expected 1..256", optarg);
			break;
		case 'j':
			a->json = 1;
			break;
		case 'l':
			a->local = 1;
			break;
		case 'r':
			if (!bench || parse_int(optarg, 1, 1000, &a->repeat))
				return cli_usage_error(cmd, "--repeat '%s': expected 1..1000", optarg);
			break;
		case 'C':
			if (!bench)
				return cli_usage_error(cmd, "--cache is an option of bench prefetch");
			a->cache = 1;
			break;
		case 'D':
			a->direct = 1;
			break;
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
		return 1;
	err = aeg_topo_live(&s->topo);
	if (err) {
		fprintf(stderr, "aegaeon-cli: topology unknown (%s): prefetch threads stay unbound\n",
			aeg_error_detail());
		s->topo = NULL;
	}
	/* A chunk larger than the file is fine here: the slab is made for this one file. */
	slab_bytes = aeg_prefetch_slab_bytes_for(s->file_bytes, a->chunk_bytes);
	if (slab_bytes < a->chunk_bytes)
		slab_bytes = a->chunk_bytes;
	err = aeg_slab_create(s->dev, a->gpu, slab_bytes, &s->slab);
	if (err)
		goto fail;
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = a->threads;
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

static double gbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (double)ns : 0.0;
}

static void draw_bar(const struct aeg_load_progress *p)
{
	char done[32], total[32];
	int width = 30, fill = p->total_bytes ? (int)(width * p->done_bytes / p->total_bytes) : width;
	uint64_t ns = aeg_now_ns() - p->start_ns;

	fprintf(stderr, "\r[%.*s%*s] %3d%% %s / %s %.1f GB/s ", fill,
		"##############################", width - fill, "",
		p->total_bytes ? (int)(100 * p->done_bytes / p->total_bytes) : 100,
		aeg_size_format(p->done_bytes, done, sizeof(done)),
		aeg_size_format(p->total_bytes, total, sizeof(total)), gbps(p->done_bytes, ns));
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
	struct aeg_prefetch_options o = { .chunk_bytes = a->chunk_bytes, .feed = a->feed };
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
		return rc;
	if (in_job() && !a.local)
		return through_agent("prefetch");
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

		json_dumpf(o, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(o);
	} else {
		char size[32];

		printf("%s: %s in %.3f s, %.2f GB/s (%s feed, %u chunks, %u tensors, first chunk after %.2f ms)\n",
		       a.file, aeg_size_format(p.total_bytes, size, sizeof(size)), (double)ns / 1e9,
		       gbps(p.total_bytes, ns), aeg_prefetch_feed_name(p.feed), p.chunks, ntensors,
		       p.first_chunk_ns ? (double)(p.first_chunk_ns - p.start_ns) / 1e6 : 0.0);
	}
	aeg_load_close(l);
	session_close(&s);
	return 0;
}

int cli_wait(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "timeout", required_argument, NULL, 't' },
		{ "device", required_argument, NULL, 'd' },
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
		char *end;

		switch (c) {
		case 't':
			errno = 0;
			timeout_s = strtod(optarg, &end);
			if (errno || end == optarg || *end || timeout_s < 0 || timeout_s > 86400 * 365)
				return cli_usage_error("wait", "--timeout '%s': expected seconds >= 0", optarg);
			break;
		case 'd':
			device = optarg;
			break;
		default:
			return cli_usage_error("wait", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("wait", "expected one HANDLE (a chunk's 128-hex-digit event handle)");
	if (aeg_handle_from_hex(argv[optind], &h) != 0) {
		/* A load id names a load the agent keeps. */
		if (strspn(argv[optind], "0123456789") == strlen(argv[optind]) && in_job())
			return through_agent("wait");
		return cli_usage_error("wait", "%s", aeg_error_detail());
	}
	err = cli_open_device(device, &dev);
	if (err)
		return 1;
	err = aeg_event_wait_handle(dev, &h, timeout_s < 0 ? -1 : (int)(timeout_s * 1000));
	aeg_device_close(dev);
	if (err == AEG_ETIMEDOUT) {
		fprintf(stderr, "aegaeon-cli wait: not complete after %g s\n", timeout_s);
		return 1;
	}
	return err ? cli_fail(err, "wait") : 0;
}

int cli_release(int argc, char **argv)
{
	int all = 0;

	for (int i = 1; i < argc; i++) {
		char *end;

		if (strcmp(argv[i], "--all") == 0) {
			all = 1;
			continue;
		}
		errno = 0;
		if (argv[i][0] == '-' || (strtoull(argv[i], &end, 10), errno) || *end || end == argv[i])
			return cli_usage_error("release", "'%s' is not a slab id", argv[i]);
	}
	if (argc < 2 || (all && argc > 2))
		return cli_usage_error("release", "expected slab ids or --all (not both)");
	if (in_job())
		return through_agent("release");
	fprintf(stderr,
		"aegaeon-cli release: not in an aegaeon job (AEGAEON_SOCKET is unset): chunks that "
		"'aegaeon-cli prefetch' loads outside a job are freed when it exits, so nothing holds these ids\n");
	return 1;
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
		return rc;
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

		json_dumpf(o, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(o);
	} else {
		char size[32];

		printf("%s, %s, chunks of %" PRIu64 " bytes, median of %d\n", a.file,
		       aeg_size_format(s.file_bytes, size, sizeof(size)), a.chunk_bytes, a.repeat);
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

/* aegaeon-cli bench prefetch: this process's loads of a file against read() and a copy, medians of repeats. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
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

#define NAIVE_BUFFER (64ull << 20)
#define CACHE_BUFFER (32ull << 20)

struct bench {
	struct cli_prefetch_args a;
	aeg_session_t *s;
	uint64_t file_bytes;
	uint64_t chunk_used;            /* the largest chunk of a load: the chunk size the engine used */
	uint64_t *ours, *first, *naive;
	struct aeg_load_progress p;
	const char *feed;
};

static double gbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (double)ns : 0.0;
}

/* Regular file @path is a shard index: it stands for other files (an unreadable one is left to the load to report). */
static int shard_index(const char *path)
{
	struct aeg_model_paths mp;
	int index;

	if (aeg_model_paths(path, &mp) != 0) {
		aeg_error_clear();
		return 0;
	}
	index = mp.index;
	aeg_model_paths_free(&mp);
	return index;
}

/* A session of this process: a slab for the file, and with --cache a pool the whole file fits in. */
static int open_session(struct bench *b)
{
	struct aeg_session_config cfg = { .mode = AEG_SESSION_LOCAL };
	struct aeg_prefetch_config engine;
	char file[CLI_SHOWN_MAX];
	struct stat st;

	cli_shown(b->a.file, file, sizeof(file));
	if (stat(b->a.file, &st) != 0) {
		fprintf(stderr, "aegaeon-cli: %s: %s\n", file, strerror(errno));
		return 1;
	}
	/* Its baseline reads the one file: a model of many is measured file by file. */
	if (!S_ISREG(st.st_mode) || shard_index(b->a.file)) {
		fprintf(stderr, "aegaeon-cli: bench prefetch: %s: %s (it measures one file; give one shard of the model)\n",
			file, S_ISREG(st.st_mode) ? "a shard index" : "not a regular file");
		return 1;
	}
	b->file_bytes = (uint64_t)st.st_size;
	/* A chunk larger than the file is the file's size (the engine's rule): the slab is not made larger for it. */
	cfg.slab_bytes = aeg_prefetch_slab_bytes_for(b->file_bytes, b->a.chunk_bytes);
	cli_prefetch_engine(&b->a, &engine);
	if (b->a.cache) {
		/* Room for the whole file in the cache plus the ring beside it. */
		cfg.pool_buffer_bytes = CACHE_BUFFER;
		cfg.pool_bytes = aeg_round_up(b->file_bytes, CACHE_BUFFER) + 2ull * (uint64_t)engine.threads * CACHE_BUFFER;
		engine.cache_bytes = cfg.pool_bytes;
	}
	cfg.engine = &engine;
	return cli_session_open(&cfg, b->a.device, b->a.file, &b->s);
}

/* One load, waited for; its progress in b->p. The chunks are released after. */
static int load_once(struct bench *b)
{
	struct aeg_load_request req = { .path = b->a.file, .gpu = b->a.gpu, .chunk_bytes = b->a.chunk_bytes,
					.feed = b->a.feed };
	aeg_model_t *m;
	int err = aeg_session_load(b->s, &req, &m);

	if (err)
		return err;
	err = aeg_model_wait(m, -1);
	aeg_model_progress(m, &b->p);
	b->feed = aeg_prefetch_feed_name(b->p.feed);
	b->chunk_used = cli_chunk_bytes(m);
	aeg_model_close(m);
	aeg_session_release_all(b->s, 0, NULL);
	return err;
}

/* The baseline: read() into one buffer and a synchronous copy, chunk after chunk. */
static int naive_once(struct bench *b, void *dst, void *buf, uint64_t *ns)
{
	uint64_t t0 = aeg_now_ns(), off = 0;
	int fd = open(b->a.file, O_RDONLY | O_CLOEXEC), err = 0;

	if (fd < 0)
		return aeg_fail(AEG_EIO, "%s: %s", b->a.file, strerror(errno));
	while (off < b->file_bytes) {
		ssize_t r = read(fd, buf, NAIVE_BUFFER);

		if (r <= 0) {
			err = aeg_fail(AEG_EIO, "%s: reading at %" PRIu64 ": %s", b->a.file, off,
				       r < 0 ? strerror(errno) : "the file got shorter");
			break;
		}
		err = aeg_memcpy(aeg_session_device(b->s), (char *)dst + off, buf, (size_t)r);
		if (err)
			break;
		off += (uint64_t)r;
	}
	close(fd);
	*ns = aeg_now_ns() - t0;
	return err;
}

static int measure(struct bench *b)
{
	aeg_device_t *dev = aeg_session_device(b->s);
	void *dst = NULL, *buf = malloc(NAIVE_BUFFER);
	int err = buf ? 0 : aeg_fail(AEG_ENOMEM, "bench prefetch: out of memory");

	/* The engine and its staging ring made before the clock runs: the engine is measured, not its set-up. */
	if (err == 0)
		err = aeg_session_prepare(b->s, b->a.gpu);
	/* With --cache the first load fills the host cache; the timed ones hit it. */
	if (err == 0 && b->a.cache)
		err = load_once(b);
	for (int i = 0; err == 0 && i < b->a.repeat; i++) {
		err = load_once(b);
		b->ours[i] = b->p.end_ns - b->p.start_ns;
		b->first[i] = b->p.first_chunk_ns ? b->p.first_chunk_ns - b->p.start_ns : 0;
	}
	if (err == 0)
		err = aeg_mem_alloc(dev, b->a.gpu, b->file_bytes ? b->file_bytes : 1, &dst);
	for (int i = 0; err == 0 && i < b->a.repeat; i++)
		err = naive_once(b, dst, buf, &b->naive[i]);
	if (dst)
		aeg_mem_free(dev, b->a.gpu, dst);
	free(buf);
	return err;
}

/* The JSON object every benchmark prints (benchmark, device, gpu, title, rows), with this one's details. */
static int report_json(struct bench *b, const char *title, uint64_t ours, uint64_t first, uint64_t naive)
{
	uint64_t bytes = b->p.total_bytes;
	json_t *o = json_pack("{s:s, s:s, s:i, s:s, s:[{s:s, s:f, s:f, s:s, s:f}], s:s, s:I, s:I, s:i, s:s, s:b, s:f}",
			      "benchmark", "prefetch",
			      "device", aeg_device_kind_name(aeg_device_kind(aeg_session_device(b->s))),
			      "gpu", b->a.gpu, "title", title,
			      "rows", "what", b->a.cache ? "load from the host cache" : "load", "aegaeon", gbps(bytes, ours),
			      "baseline", gbps(b->file_bytes, naive), "unit", "GB/s",
			      "speedup", ours ? (double)naive / (double)ours : 0.0,
			      "path", b->a.file, "file_bytes", (json_int_t)bytes, "chunk_bytes", (json_int_t)b->chunk_used,
			      "repeat", b->a.repeat, "feed", b->feed, "cache", b->a.cache,
			      "first_chunk_ms", (double)first / 1e6);

	return cli_json_print(o);
}

static int report(struct bench *b)
{
	size_t n = (size_t)b->a.repeat;
	uint64_t ours = cli_median_u64(b->ours, n), first = cli_median_u64(b->first, n);
	uint64_t naive = cli_median_u64(b->naive, n), bytes = b->p.total_bytes;
	char size[32], chunk[32], title[96], file[CLI_SHOWN_MAX];

	snprintf(title, sizeof(title), "prefetch vs read + memcpy (GB/s, median of %d)", b->a.repeat);
	if (b->a.json)
		return report_json(b, title, ours, first, naive);
	printf("%s, %s, chunks of %s, median of %d\n", cli_shown(b->a.file, file, sizeof(file)),
	       aeg_size_format(b->file_bytes, size, sizeof(size)), aeg_size_format(b->chunk_used, chunk, sizeof(chunk)),
	       b->a.repeat);
	printf("  %-28s %8.2f GB/s  (first chunk %.2f ms)\n", b->a.cache ? "aegaeon (host cache)" : b->feed,
	       gbps(bytes, ours), (double)first / 1e6);
	printf("  %-28s %8.2f GB/s\n", "naive read + memcpy", gbps(b->file_bytes, naive));
	printf("  %-28s %8.2fx\n", "ratio", ours ? (double)naive / (double)ours : 0.0);
	return 0;
}

int cli_bench_prefetch(int argc, char **argv)
{
	struct bench b = { .feed = "?" };
	int rc, err;

	rc = cli_prefetch_parse("bench prefetch", argc, argv, &b.a, 1);
	if (rc)
		return rc < 0 ? 0 : rc;
	rc = open_session(&b);
	if (rc)
		return rc;
	b.ours = calloc((size_t)b.a.repeat, sizeof(*b.ours));
	b.first = calloc((size_t)b.a.repeat, sizeof(*b.first));
	b.naive = calloc((size_t)b.a.repeat, sizeof(*b.naive));
	err = b.ours && b.first && b.naive ? measure(&b) : aeg_fail(AEG_ENOMEM, "bench prefetch: out of memory");
	rc = err ? cli_fail(err, b.a.file) : report(&b);
	free(b.ours);
	free(b.first);
	free(b.naive);
	aeg_session_close(b.s);
	if (b.a.timing)
		cli_print_timings();
	return rc;
}

/* Prefetch engine on the host backend: bytes, boundaries, tables, errors, cancel, cache, two processes. */
#include "config.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "pinned_internal.h"
#include "prefetch_internal.h"
#include "topo_internal.h"
#include "chunkcheck.h"
#include "testutil.h"

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define SLAB_BYTES (8 * MiB)
#define BUF_BYTES (64 * KiB)
#define POOL_BUFFERS 64
#define CHUNK (256 * KiB)

static const char *self_exe;

struct fx {
	aeg_device_t *dev;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_prefetch_t *pf;
	char dir[64];
	struct aeg_slab_stats slab0;
	struct aeg_pool_stats pool0;
	int fds0;
};

static struct fx *fx_new(uint64_t cache_bytes, int threads)
{
	struct fx *f = calloc(1, sizeof(*f));
	struct aeg_prefetch_config cfg;

	assert_non_null(f);
	assert_int_equal(aeg_device_open(&f->dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_slab_create(f->dev, 0, SLAB_BYTES, &f->slab), 0);
	assert_int_equal(aeg_pool_create(f->dev, 0, BUF_BYTES, BUF_BYTES * POOL_BUFFERS, &f->pool), 0);
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = threads;
	cfg.streams = 2;
	cfg.piece_bytes = 64 * KiB;
	cfg.mmap_threads = 1;   /* MIXED: the other workers read */
	cfg.ring_buffers = 8;
	cfg.small_file_bytes = 0;
	cfg.cache_bytes = cache_bytes;
	assert_int_equal(aeg_prefetch_create(f->slab, f->pool, &cfg, &f->pf), 0);
	snprintf(f->dir, sizeof(f->dir), "/tmp/aegaeon-pf-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	assert_int_equal(aeg_slab_stats(f->slab, &f->slab0), 0);
	assert_int_equal(aeg_pool_stats(f->pool, &f->pool0), 0);
	f->fds0 = count_fds();
	return f;
}

/* Everything the engine took is back: slab blocks, pool buffers, events, fds. */
static void assert_baseline(struct fx *f)
{
	struct aeg_slab_stats s;
	struct aeg_pool_stats p;
	struct aeg_prefetch_stats e;

	assert_int_equal(aeg_slab_stats(f->slab, &s), 0);
	assert_int_equal(aeg_pool_stats(f->pool, &p), 0);
	assert_int_equal(aeg_prefetch_stats(f->pf, &e), 0);
	assert_int_equal(s.blocks, f->slab0.blocks);
	assert_int_equal(s.used_bytes, f->slab0.used_bytes);
	assert_int_equal(p.in_use, f->pool0.in_use + (uint32_t)(e.cache_bytes / BUF_BYTES));
	assert_int_equal(e.chunks, 0);
	assert_int_equal(e.events, 0);
	assert_int_equal(e.blocks, 0);
	assert_int_equal(e.loads_in_flight, 0);
	assert_int_equal(e.ring_in_use, 0);
	assert_int_equal(e.registered_pieces, 0);
	assert_int_equal(count_fds(), f->fds0);
}

static void fx_free(struct fx *f)
{
	char cmd[128];
	struct aeg_pool_stats p;

	aeg_prefetch_destroy(f->pf);
	assert_int_equal(aeg_pool_stats(f->pool, &p), 0);
	assert_int_equal(p.in_use, f->pool0.in_use);
	aeg_pool_destroy(f->pool);
	aeg_slab_destroy(f->slab);
	aeg_device_close(f->dev);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
	assert_int_equal(system(cmd), 0);
	free(f);
}

/* The file's bytes, all of them. */
static unsigned char *raw_file(struct fx *f, const char *name, uint64_t bytes, unsigned seed,
			       char *path, size_t len)
{
	unsigned char *p = test_pattern(bytes, seed);

	snprintf(path, len, "%s/%s", f->dir, name);
	test_write_file(path, p, bytes);
	return p;
}

struct spec {
	const char *name;
	const char *dtype;
	unsigned bits;
	int ndim;
	uint64_t shape[4];
};

static uint64_t spec_bytes(const struct spec *s)
{
	uint64_t n = 1;

	for (int i = 0; i < s->ndim; i++)
		n *= s->shape[i];
	return n * s->bits / 8;
}

/*
 * A safetensors file written here: header with @pad bytes of metadata, the
 * tensors' data in @order (indexes into @specs) to get offsets that are not
 * the order of the JSON keys. Returns the whole file's bytes.
 */
static unsigned char *st_file(struct fx *f, const char *name, const struct spec *specs, int n,
			      size_t pad, char *path, size_t len, uint64_t *file_bytes)
{
	size_t cap = 4096 + pad + (size_t)n * 256, hl;
	char *json = malloc(cap), *p;
	uint64_t off = 0, data = 0, hlen;
	unsigned char *file, *bytes;

	assert_non_null(json);
	for (int i = 0; i < n; i++)
		data += spec_bytes(&specs[i]);
	p = json;
	p += sprintf(p, "{\"__metadata__\":{\"format\":\"pt\",\"pad\":\"");
	memset(p, 'x', pad);
	p += pad;
	p += sprintf(p, "\"}");
	/* Keys in reverse order of their data. */
	for (int i = n - 1; i >= 0; i--) {
		uint64_t o = 0;

		for (int j = 0; j < i; j++)
			o += spec_bytes(&specs[j]);
		p += sprintf(p, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", specs[i].name, specs[i].dtype);
		for (int d = 0; d < specs[i].ndim; d++)
			p += sprintf(p, "%s%" PRIu64, d ? "," : "", specs[i].shape[d]);
		p += sprintf(p, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", o,
			     o + spec_bytes(&specs[i]));
	}
	p += sprintf(p, "}");
	hl = (size_t)(p - json);
	while (hl % 8)
		json[hl++] = ' ';      /* the reference writer pads with spaces */
	hlen = hl;
	*file_bytes = 8 + hlen + data;
	file = malloc(*file_bytes);
	assert_non_null(file);
	for (int i = 0; i < 8; i++)
		file[i] = (unsigned char)(hlen >> (8 * i));
	memcpy(file + 8, json, hlen);
	bytes = test_pattern(data, 7);
	memcpy(file + 8 + hlen, bytes, data);
	free(bytes);
	free(json);
	(void)off;
	snprintf(path, len, "%s/%s", f->dir, name);
	test_write_file(path, file, *file_bytes);
	return file;
}

/* Copy each chunk back and compare with the file; check the chunks tile [from, size). */
static void check_chunks(struct fx *f, aeg_load_t *l, const unsigned char *file, uint64_t from,
			 uint64_t size)
{
	const struct aeg_chunk *c;
	uint32_t n;
	uint64_t pos = from;
	void *base = aeg_slab_base(f->slab);

	c = aeg_load_chunks(l, &n);
	for (uint32_t i = 0; i < n; i++) {
		unsigned char *back = malloc(c[i].size);

		assert_non_null(back);
		assert_int_equal(c[i].file_offset, pos);
		assert_true(c[i].size > 0);
		assert_ptr_equal((char *)base + c[i].slab_offset, c[i].device_ptr);
		assert_int_equal(aeg_load_wait_chunk(l, i, 10000), 0);
		assert_int_equal(aeg_event_wait_handle(f->dev, &c[i].event, 10000), 0);
		assert_int_equal(aeg_memcpy(f->dev, back, c[i].device_ptr, c[i].size), 0);
		if (memcmp(back, file + c[i].file_offset, c[i].size) != 0)
			fail_msg("chunk %u (file offset %" PRIu64 ", %" PRIu64 " bytes) differs from the file",
				 i, c[i].file_offset, c[i].size);
		free(back);
		pos += c[i].size;
	}
	assert_int_equal(pos, size);
}

static void check_one(struct fx *f, const struct aeg_chunk *c, const unsigned char *file)
{
	unsigned char *back = malloc(c->size);

	assert_non_null(back);
	assert_int_equal(aeg_memcpy(f->dev, back, c->device_ptr, c->size), 0);
	assert_memory_equal(back, file + c->file_offset, c->size);
	free(back);
}

static void release_load(struct fx *f, aeg_load_t *l)
{
	const struct aeg_chunk *c;
	uint64_t *ids;
	uint32_t n, k = 0;

	c = aeg_load_chunks(l, &n);
	ids = calloc(n + 1, sizeof(*ids));
	assert_non_null(ids);
	for (uint32_t i = 0; i < n; i++)
		if (i == 0 || c[i].slab_id != c[i - 1].slab_id)
			ids[k++] = c[i].slab_id;
	assert_int_equal(aeg_prefetch_release(f->pf, ids, k), 0);
	free(ids);
	aeg_load_close(l);
}

static void raw_file_every_feed(void **state)
{
	static const enum aeg_prefetch_feed feeds[] = {
		AEG_FEED_MMAP, AEG_FEED_READ, AEG_FEED_MIXED, AEG_FEED_AUTO,
	};
	struct fx *f = fx_new(0, 4);
	const uint64_t size = 2 * MiB + 12345;
	char path[128];
	unsigned char *file = raw_file(f, "model.bin", size, 1, path, sizeof(path));

	for (size_t i = 0; i < AEG_ARRAY_SIZE(feeds); i++) {
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = feeds[i] };
		struct aeg_load_progress pr;
		const struct aeg_chunk *c;
		uint32_t n;
		aeg_load_t *l;

		assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
		c = aeg_load_chunks(l, &n);
		assert_int_equal(n, (size + CHUNK - 1) / CHUNK);
		for (uint32_t k = 0; k + 1 < n; k++) {
			assert_int_equal(c[k].size, CHUNK);
			assert_true(c[k].slab_id != c[k + 1].slab_id);
		}
		assert_int_equal(c[n - 1].size, size - (uint64_t)(n - 1) * CHUNK);
		assert_int_equal(aeg_load_wait(l, 10000), 0);
		check_chunks(f, l, file, 0, size);
		assert_int_equal(aeg_load_progress(l, &pr), 0);
		assert_int_equal(pr.status, 0);
		assert_int_equal(pr.done_bytes, size);
		assert_int_equal(pr.done_chunks, n);
		assert_true(pr.first_chunk_ns >= pr.start_ns && pr.end_ns >= pr.first_chunk_ns);
		assert_int_equal(pr.feed, feeds[i] == AEG_FEED_AUTO ? AEG_FEED_MIXED : feeds[i]);
		release_load(f, l);
		assert_baseline(f);
	}
	free(file);
	fx_free(f);
}

/* @l ends whole, every chunk equal to @file, through @feed; then released. */
static void loaded_whole(struct fx *f, aeg_load_t *l, const unsigned char *file, uint64_t size,
			 enum aeg_prefetch_feed feed)
{
	struct aeg_load_progress pr;

	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, file, 0, size);
	assert_int_equal(aeg_load_progress(l, &pr), 0);
	assert_int_equal(pr.feed, feed);
	release_load(f, l);
}

/*
 * A device, a slab and one raw file of @size for a test that makes its
 * engines itself (no pool, or one given later); bare_free undoes it.
 */
static unsigned char *bare_new(struct fx *f, uint64_t size, unsigned seed, char *path, size_t len)
{
	assert_int_equal(aeg_device_open(&f->dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_slab_create(f->dev, 0, SLAB_BYTES, &f->slab), 0);
	snprintf(f->dir, sizeof(f->dir), "/tmp/aegaeon-pf-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	return raw_file(f, "model.bin", size, seed, path, len);
}

static void bare_free(struct fx *f, unsigned char *file, const char *path)
{
	free(file);
	aeg_slab_destroy(f->slab);
	aeg_device_close(f->dev);
	unlink(path);
	rmdir(f->dir);
}

/*
 * An engine whose pool comes later (a job's, made after the agent's
 * start): a large AUTO load takes MIXED at once, registering every
 * piece until the pool is there, and loads whole whether the pool comes in
 * the middle or never does.
 */
static void pool_later_mixed(void **state)
{
	struct fx f = { 0 };
	struct aeg_prefetch_config cfg;
	const uint64_t size = 3 * MiB + 4321;
	char path[128];
	unsigned char *file;

	file = bare_new(&f, size, 7, path, sizeof(path));
	for (int round = 0; round < 2; round++) {
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
		aeg_load_t *l;

		aeg_prefetch_config_defaults(&cfg);
		cfg.threads = 4;
		cfg.piece_bytes = 64 * KiB;
		cfg.mmap_threads = 1;   /* with a pool, three of the four workers would read */
		cfg.small_file_bytes = 1 * MiB;
		cfg.pool_later_buffer_bytes = BUF_BYTES;
		assert_int_equal(aeg_prefetch_create(f.slab, NULL, &cfg, &f.pf), 0);
		/* Round 0: the pool comes while the load runs; round 1: it never does. */
		if (round == 1)
			assert_int_equal(aeg_prefetch_set_pool(f.pf, NULL, 0, AEG_ENOMEM), 0);
		assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
		if (round == 0) {
			assert_int_equal(aeg_pool_create(f.dev, 0, BUF_BYTES, BUF_BYTES * POOL_BUFFERS, &f.pool), 0);
			assert_int_equal(aeg_prefetch_set_pool(f.pf, f.pool, 0, 0), 0);
		}
		loaded_whole(&f, l, file, size, AEG_FEED_MIXED);
		aeg_prefetch_destroy(f.pf);
		if (f.pool != NULL)
			aeg_pool_destroy(f.pool);
		f.pool = NULL;
	}
	bare_free(&f, file, path);
}

/*
 * An engine with a staging ring of its own (no pool given) READs a large
 * AUTO file through it, as an engine told that its later pool is a ring
 * being made does, waiting for the ring; should the ring fail, the load
 * waiting for it registers its pieces instead, and the next AUTO load
 * takes MIXED (registering): both load whole, and nothing stays
 * registered.
 */
static void staging_ring_reads(void **state)
{
	struct fx f = { 0 };
	struct aeg_prefetch_config cfg;
	const uint64_t size = 3 * MiB + 4321;
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	struct aeg_prefetch_stats st;
	char path[128];
	unsigned char *file;
	aeg_load_t *l;

	file = bare_new(&f, size, 9, path, sizeof(path));
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = 4;
	cfg.piece_bytes = 64 * KiB;
	cfg.small_file_bytes = 1 * MiB;

	/* Its own ring. */
	assert_int_equal(aeg_prefetch_create(f.slab, NULL, &cfg, &f.pf), 0);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_READ);
	aeg_prefetch_destroy(f.pf);

	/* A ring being made: the load waits for it, then reads through it. */
	cfg.pool_later_buffer_bytes = BUF_BYTES;
	assert_int_equal(aeg_prefetch_create(f.slab, NULL, &cfg, &f.pf), 0);
	aeg_prefetch_ring_coming(f.pf);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 50), AEG_ETIMEDOUT);
	assert_int_equal(aeg_pool_create(f.dev, 0, BUF_BYTES, BUF_BYTES * POOL_BUFFERS, &f.pool), 0);
	assert_int_equal(aeg_prefetch_set_pool(f.pf, f.pool, 0, 0), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_READ);
	aeg_prefetch_destroy(f.pf);

	/* A ring that fails: the waiting load registers its pieces instead, and so does the next. */
	assert_int_equal(aeg_prefetch_create(f.slab, NULL, &cfg, &f.pf), 0);
	aeg_prefetch_ring_coming(f.pf);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 50), AEG_ETIMEDOUT);
	aeg_fail(AEG_ENOMEM, "pinned pool: 201326592 bytes asked, only 4096 available (MemAvailable)");
	assert_int_equal(aeg_prefetch_set_pool(f.pf, NULL, 0, AEG_ENOMEM), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_READ);
	assert_int_equal(aeg_prefetch_stats(f.pf, &st), 0);
	assert_int_equal(st.registered_pieces, 0);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_MIXED);
	aeg_prefetch_destroy(f.pf);
	aeg_pool_destroy(f.pool);
	bare_free(&f, file, path);
}

/* Before each piece starts: wait while the gate is shut, then note the pool buffers in use. */
struct pool_watch {
	aeg_pool_t *pool;
	uint32_t most;          /* atomic */
	pthread_mutex_t lock;
	pthread_cond_t cv;
	int shut;
};

static int pool_watch_hook(void *arg, uint64_t load_id, uint32_t item)
{
	struct pool_watch *w = arg;
	struct aeg_pool_stats ps;
	uint32_t most;

	(void)load_id;
	(void)item;
	pthread_mutex_lock(&w->lock);
	while (w->shut)
		pthread_cond_wait(&w->cv, &w->lock);
	pthread_mutex_unlock(&w->lock);
	if (aeg_pool_stats(w->pool, &ps) != 0)
		return 0;
	most = __atomic_load_n(&w->most, __ATOMIC_RELAXED);
	while (ps.in_use > most &&
	       !__atomic_compare_exchange_n(&w->most, &most, ps.in_use, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
	return 0;
}

static void pool_watch_open(struct pool_watch *w)
{
	pthread_mutex_lock(&w->lock);
	w->shut = 0;
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->lock);
}

static uint32_t pool_in_use(aeg_pool_t *pool)
{
	struct aeg_pool_stats ps;

	assert_int_equal(aeg_pool_stats(pool, &ps), 0);
	return ps.in_use;
}

/*
 * An engine given a pool of buffers larger than a staging ring's (a job's)
 * READs a large AUTO file through ring-buffer slots carved from as few of
 * them as its ring needs (4 places, 2 slots a buffer: 2 buffers), and
 * gives them back as the load ends. With the pool dry the load waits; with
 * one buffer given back it loads through that one's slots alone; cancelled
 * while it waits for the pool, it ends and holds nothing.
 */
static void pool_slots(void **state)
{
	const uint64_t buf = 2 * AEG_PREFETCH_RING_BUFFER_BYTES, size = 40 * MiB + 4321;
	struct aeg_prefetch_options o = { .chunk_bytes = 4 * MiB };
	struct aeg_prefetch_config cfg;
	struct aeg_pool_buffer held[6];
	struct aeg_prefetch_stats st;
	struct pool_watch w = { .lock = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };
	struct aeg_pool_timing tm;
	atomic_int stop = 0;
	struct fx f = { 0 };
	unsigned char *file;
	char path[128];
	aeg_load_t *l;

	(void)state;
	assert_int_equal(aeg_device_open(&f.dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_slab_create(f.dev, 0, 48 * MiB, &f.slab), 0);
	snprintf(f.dir, sizeof(f.dir), "/tmp/aegaeon-pf-XXXXXX");
	assert_non_null(mkdtemp(f.dir));
	file = raw_file(&f, "model.bin", size, 13, path, sizeof(path));
	assert_int_equal(aeg_pool_create(f.dev, 0, buf, 6 * buf, &f.pool), 0);
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = 4;
	cfg.ring_buffers = 4;
	cfg.small_file_bytes = 1 * MiB;
	assert_int_equal(aeg_prefetch_create(f.slab, f.pool, &cfg, &f.pf), 0);
	w.pool = f.pool;
	aeg_prefetch_set_hook(f.pf, pool_watch_hook, &w);

	/* Through slots of two buffers at most, given back as it ends. */
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(pool_in_use(f.pool), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_READ);
	assert_in_range(w.most, 1, 2);

	/* The pool dry: the load waits; one buffer back: it loads through that one. */
	aeg_prefetch_set_hook(f.pf, NULL, NULL);
	for (int i = 0; i < 6; i++)
		assert_int_equal(aeg_pool_acquire(f.pool, 0, &held[i]), 0);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 100), AEG_ETIMEDOUT);
	aeg_pool_release(f.pool, held[5].index);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(pool_in_use(f.pool), 5);
	loaded_whole(&f, l, file, size, AEG_FEED_READ);

	/* Cancelled while waiting for the pool. */
	assert_int_equal(aeg_pool_acquire(f.pool, 0, &held[5]), 0);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 100), AEG_ETIMEDOUT);
	assert_int_equal(aeg_load_cancel(l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), AEG_ECANCELED);
	assert_int_equal(pool_in_use(f.pool), 6);
	release_load(&f, l);
	for (int i = 0; i < 6; i++)
		aeg_pool_release(f.pool, held[i].index);

	assert_int_equal(aeg_prefetch_stats(f.pf, &st), 0);
	assert_int_equal(st.ring_in_use, 0);
	assert_int_equal(st.loads, 0);
	aeg_prefetch_destroy(f.pf);
	assert_int_equal(pool_in_use(f.pool), 0);

	/*
	 * The pool given later (a job's): a large load takes MIXED, its pieces
	 * starting once the pool is there; the workers not registering read
	 * through slots, given back as it ends.
	 */
	cfg.pool_later_buffer_bytes = buf;
	cfg.piece_bytes = 4 * MiB;
	assert_int_equal(aeg_prefetch_create(f.slab, NULL, &cfg, &f.pf), 0);
	w.shut = 1;
	aeg_prefetch_set_hook(f.pf, pool_watch_hook, &w);
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_prefetch_set_pool(f.pf, f.pool, 0, 0), 0);
	pool_watch_open(&w);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(pool_in_use(f.pool), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_MIXED);
	aeg_prefetch_set_hook(f.pf, NULL, NULL);
	aeg_prefetch_destroy(f.pf);
	assert_int_equal(pool_in_use(f.pool), 0);
	aeg_pool_destroy(f.pool);

	/*
	 * A READ load waiting for the pool its engine gets later is not a load
	 * that pool's population (an agent's, made in the background) lets run
	 * first: it would wait for itself, 2 s.
	 */
	assert_int_equal(aeg_prefetch_create(f.slab, NULL, &cfg, &f.pf), 0);
	o.feed = AEG_FEED_READ;
	assert_int_equal(aeg_prefetch_file(f.pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 100), AEG_ETIMEDOUT);
	assert_int_equal(aeg_pool_create_stoppable(f.dev, 0, buf, 6 * buf, &stop, &f.pool), 0);
	aeg_pool_timing(f.pool, &tm);
	assert_in_range(tm.yield_ns, 0, 1000000000ull);
	assert_int_equal(aeg_prefetch_set_pool(f.pf, f.pool, 0, 0), 0);
	loaded_whole(&f, l, file, size, AEG_FEED_READ);
	aeg_prefetch_destroy(f.pf);
	assert_int_equal(pool_in_use(f.pool), 0);
	aeg_pool_destroy(f.pool);
	bare_free(&f, file, path);
}

/*
 * A held engine starts no piece: a load waits, whole, until the hold goes;
 * a cancel or release of a load still ends while held; holds nest; a
 * release with no hold is refused.
 */
static void hold_engine(void **state)
{
	struct fx *f = fx_new(0, 4);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	struct aeg_load_progress pr;
	const uint64_t size = 2 * MiB + 999;
	char path[128];
	unsigned char *file = raw_file(f, "model.bin", size, 5, path, sizeof(path));
	aeg_load_t *l, *c;

	assert_int_equal(aeg_prefetch_hold(f->pf, 0), AEG_EINVAL);
	assert_int_equal(aeg_prefetch_hold(NULL, 1), AEG_EINVAL);
	assert_int_equal(aeg_prefetch_hold(f->pf, 1), 0);
	assert_int_equal(aeg_prefetch_hold(f->pf, 1), 0);
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &c), 0);
	assert_int_equal(aeg_load_wait(l, 200), AEG_ETIMEDOUT);
	assert_int_equal(aeg_load_progress(l, &pr), 0);
	assert_int_equal(pr.status, AEG_EBUSY);
	assert_int_equal(pr.done_bytes, 0);
	/* A stop needs no worker to start anything. */
	assert_int_equal(aeg_load_cancel(c), 0);
	assert_int_equal(aeg_load_wait(c, 10000), AEG_ECANCELED);
	assert_int_equal(aeg_load_release(c), 0);
	aeg_load_close(c);
	assert_int_equal(aeg_prefetch_hold(f->pf, 0), 0);
	assert_int_equal(aeg_load_wait(l, 200), AEG_ETIMEDOUT);     /* still held once */
	assert_int_equal(aeg_prefetch_hold(f->pf, 0), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, file, 0, size);
	release_load(f, l);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

/*
 * An engine made without a topology gets one later (a fresh process finds
 * it off its first load's path): every worker binds itself once, idle or
 * between pieces, and loads go on as before. A second topology, or a NULL
 * one, is refused.
 */
static void topology_later(void **state)
{
	struct fx *f;
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	const uint64_t size = 2 * MiB + 77;
	const aeg_topo_t *topo;
	char path[128];
	unsigned char *file;
	aeg_load_t *l;

	/* A device the machine does not have: nothing to bind to, and the bind says so with 0. */
	setenv("AEGAEON_HOST_PCI_BUS_IDS", "ffff:ff:1f.7", 1);
	f = fx_new(0, 4);
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	file = raw_file(f, "model.bin", size, 6, path, sizeof(path));
	assert_int_equal(aeg_topo_live(&topo), 0);

	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(aeg_prefetch_bound_workers(f->pf), 0);
	release_load(f, l);

	assert_int_equal(aeg_prefetch_set_topo(NULL, topo), AEG_EINVAL);
	assert_int_equal(aeg_prefetch_set_topo(f->pf, NULL), AEG_EINVAL);
	assert_int_equal(aeg_prefetch_set_topo(f->pf, topo), 0);
	assert_int_equal(aeg_prefetch_set_topo(f->pf, topo), AEG_EEXIST);
	for (int i = 0; i < 10000 && aeg_prefetch_bound_workers(f->pf) < 4; i++)
		usleep(1000);
	assert_int_equal(aeg_prefetch_bound_workers(f->pf), 4);

	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, file, 0, size);
	release_load(f, l);
	assert_int_equal(aeg_prefetch_bound_workers(f->pf), 4);       /* once each */
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static void empty_file(void **state)
{
	struct fx *f = fx_new(0, 2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	char path[128];
	unsigned char *file = raw_file(f, "empty.bin", 0, 1, path, sizeof(path));
	uint32_t n;
	aeg_load_t *l;

	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	aeg_load_chunks(l, &n);
	assert_int_equal(n, 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(aeg_load_wait_chunk(l, 0, 0), AEG_EINVAL);
	aeg_load_close(l);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static const struct spec specs[] = {
	{ "w.f32", "F32", 32, 2, { 3, 5 } },
	{ "w.bf16", "BF16", 16, 1, { 1000 } },
	{ "empty", "I64", 64, 2, { 0, 9 } },
	{ "odd.u8", "U8", 8, 1, { 7 } },
	{ "big.f16", "F16", 16, 2, { 300, 1001 } },     /* 600600 bytes: over 2 chunks */
	{ "flag", "BOOL", 8, 0, { 0 } },
	{ "fp8", "F8_E4M3", 8, 3, { 3, 3, 3 } },
	{ "exact", "U8", 8, 1, { 262144 } },            /* exactly one chunk */
	{ "tail.f64", "F64", 64, 1, { 1001 } },
	{ "empty.end", "F32", 32, 1, { 0 } },
};

static void safetensors_table(void **state)
{
	struct fx *f = fx_new(0, 3);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = AEG_FEED_MMAP };
	const int n = (int)AEG_ARRAY_SIZE(specs);
	uint64_t size, data_off, hlen = 0;
	char path[128];
	unsigned char *file;
	const struct aeg_tensor *t;
	const struct aeg_chunk *c;
	uint32_t nt, nc;
	aeg_load_t *l;

	/* A big header (~1 MiB of metadata) pushes the data past several pieces. */
	file = st_file(f, "model.safetensors", specs, n, 1 << 20, path, sizeof(path), &size);
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | file[i];
	data_off = 8 + hlen;

	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, file, data_off, size);

	t = aeg_load_tensors(l, &nt);
	c = aeg_load_chunks(l, &nc);
	assert_int_equal(nt, n);
	for (int i = 0; i < n; i++) {
		uint64_t bytes = spec_bytes(&specs[i]);
		unsigned char *back;

		/* Sorted by offset, which is spec order here. */
		assert_string_equal(t[i].name, specs[i].name);
		assert_string_equal(t[i].dtype, specs[i].dtype);
		assert_int_equal(t[i].ndim, specs[i].ndim);
		for (int d = 0; d < specs[i].ndim; d++)
			assert_int_equal(t[i].shape[d], specs[i].shape[d]);
		assert_int_equal(t[i].size, bytes);
		assert_true(t[i].first_chunk < nc);
		if (bytes == 0)
			continue;
		assert_non_null(t[i].device_ptr);
		back = malloc(bytes);
		assert_int_equal(aeg_memcpy(f->dev, back, t[i].device_ptr, bytes), 0);
		assert_memory_equal(back, file + t[i].file_offset, bytes);
		free(back);
		/* A tensor that fits a chunk is never cut; a bigger one keeps one block. */
		if (bytes <= CHUNK) {
			const struct aeg_chunk *h = &c[t[i].first_chunk];

			assert_true(t[i].file_offset >= h->file_offset &&
				    t[i].file_offset + bytes <= h->file_offset + h->size);
		} else {
			uint32_t k = t[i].first_chunk, parts = 0;

			assert_int_equal(c[k].file_offset, t[i].file_offset);
			for (; k < nc && c[k].file_offset < t[i].file_offset + bytes; k++, parts++) {
				assert_int_equal(c[k].slab_id, c[t[i].first_chunk].slab_id);
				assert_true(c[k].size <= CHUNK);
			}
			assert_int_equal(parts, (bytes + CHUNK - 1) / CHUNK);
			assert_int_equal(c[k - 1].file_offset + c[k - 1].size, t[i].file_offset + bytes);
		}
	}
	release_load(f, l);
	assert_baseline(f);

	/* The same file asked as raw is chunked from byte 0, header included. */
	o.format = AEG_FORMAT_RAW;
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	aeg_load_tensors(l, &nt);
	assert_int_equal(nt, 0);
	check_chunks(f, l, file, 0, size);
	release_load(f, l);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static void expect_error(struct fx *f, const char *path, const struct aeg_prefetch_options *o,
			 int code, const char *detail)
{
	aeg_load_t *l = NULL;
	int err = aeg_prefetch_file(f->pf, path, o, &l);

	if (err != code || strstr(aeg_error_detail(), detail) == NULL)
		fail_msg("%s: got %s \"%s\", want %s \"%s\"", path, aeg_errname(err),
			 aeg_error_detail(), aeg_errname(code), detail);
	assert_null(l);
	assert_baseline(f);
}

static int unreadable_as_nobody(struct fx *f, const char *path)
{
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	aeg_load_t *l = NULL;

	if (setgroups(0, NULL) || setgid(65534) || setuid(65534))
		return 10;
	if (aeg_prefetch_file(f->pf, path, &o, &l) != AEG_EACCES)
		return 11;
	return strstr(aeg_error_detail(), "permission denied") && l == NULL ? 0 : 12;
}

static void open_and_option_errors(void **state)
{
	struct fx *f = fx_new(0, 2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	char path[128], sub[160], big[128], twice[128], cut[128];
	uint64_t size;
	unsigned char *file = raw_file(f, "ok.bin", 100 * KiB, 3, path, sizeof(path));
	unsigned char *huge = raw_file(f, "huge.bin", SLAB_BYTES + 1, 4, big, sizeof(big));
	unsigned char *huger = raw_file(f, "twice.bin", 2 * SLAB_BYTES, 5, twice, sizeof(twice));
	unsigned char *st = st_file(f, "cut.safetensors", specs, 2, 0, cut, sizeof(cut), &size);

	snprintf(sub, sizeof(sub), "%s/missing.safetensors", f->dir);
	expect_error(f, sub, &o, AEG_ENOENT, "no such file");
	expect_error(f, f->dir, &o, AEG_EINVAL, "is a directory");
	expect_error(f, "/dev/null", &o, AEG_EINVAL, "not a regular file");

	o.chunk_bytes = 0;
	expect_error(f, path, &o, AEG_EINVAL, "chunk size 0");
	o.chunk_bytes = 1000;
	expect_error(f, path, &o, AEG_EINVAL, "chunk size 1000 bytes is not a multiple of 4 KiB");
	o.chunk_bytes = 4096 + 512;
	expect_error(f, path, &o, AEG_EINVAL, "not a multiple of 4 KiB");
	/* Larger than the slab and cut from a file larger still: never loadable. */
	o.chunk_bytes = SLAB_BYTES + 4096;
	expect_error(f, twice, &o, AEG_EINVAL, "chunk size 8392704 is larger than the slab");
	/* A file of one chunk too large for the slab: what it needs and what is free. */
	expect_error(f, big, &o, AEG_ENOSPC, "which has 8 MiB free of 8 MiB");
	o.chunk_bytes = CHUNK;
	o.feed = AEG_FEED_CACHE;
	expect_error(f, path, &o, AEG_EINVAL, "feed 3");
	o.feed = AEG_FEED_AUTO;

	expect_error(f, big, &o, AEG_ENOSPC, "which has 8 MiB free of 8 MiB");

	/* Shorter than its header says. */
	assert_int_equal(truncate(cut, (off_t)size - 3), 0);
	expect_error(f, cut, &o, AEG_EFORMAT, "shorter than its header says");
	/* Not safetensors at all, but named so. */
	test_write_file(cut, "\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", 24);
	expect_error(f, cut, &o, AEG_EFORMAT, "not valid JSON");

	if (geteuid() != 0) {
		assert_int_equal(chmod(path, 0), 0);
		expect_error(f, path, &o, AEG_EACCES, "permission denied");
		assert_int_equal(chmod(path, 0600), 0);
	} else {
		/* Root reads anything: try as nobody, in a child. */
		pid_t pid = fork();
		int status;

		assert_true(pid >= 0);
		if (pid == 0)
			child_exit(unreadable_as_nobody(f, path));
		assert_int_equal(waitpid(pid, &status, 0), pid);
		assert_true(WIFEXITED(status));
		assert_int_equal(WEXITSTATUS(status), 0);
	}

	/* A full slab: hold most of it, then ask for more than is left. */
	{
		struct aeg_block hold;

		assert_int_equal(aeg_slab_alloc(f->slab, SLAB_BYTES - 64 * KiB, &hold), 0);
		assert_int_equal(aeg_slab_stats(f->slab, &f->slab0), 0);
		expect_error(f, path, &o, AEG_ENOSPC, "needs 100 KiB");
		assert_non_null(strstr(aeg_error_detail(), "64 KiB free"));
		assert_int_equal(aeg_slab_free(f->slab, hold.id), 0);
		assert_int_equal(aeg_slab_stats(f->slab, &f->slab0), 0);
	}
	free(file);
	free(huge);
	free(huger);
	free(st);
	fx_free(f);
}

/*
 * A chunk larger than the file (a site's 64 MiB default, a slab of 8 MiB)
 * is the file's size rounded up to 4 KiB: one chunk of the file, in a slab
 * smaller than the chunk asked for.
 */
static void chunk_larger_than_file(void **state)
{
	struct fx *f = fx_new(0, 2);
	struct aeg_prefetch_options o = { .chunk_bytes = 64 * MiB };
	const uint64_t size = 100000;
	const struct aeg_chunk *c;
	char path[128];
	unsigned char *file = raw_file(f, "small.bin", size, 6, path, sizeof(path));
	uint32_t n;
	aeg_load_t *l;

	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	c = aeg_load_chunks(l, &n);
	assert_int_equal(n, 1);
	assert_int_equal(c[0].size, size);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, file, 0, size);
	release_load(f, l);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

/* --------------------------------------------- hooks: stop a load midway */

struct gatekeeper {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint32_t hold_item;     /* block the worker that reaches this item */
	int holding;            /* a worker is blocked */
	int release;
	int fail_code;          /* return this at hold_item instead of blocking */
	char touch[160];        /* rewrite this file at hold_item */
};

static int hook(void *arg, uint64_t load_id, uint32_t item)
{
	struct gatekeeper *g = arg;
	int ret = 0;

	if (item != g->hold_item)
		return 0;
	if (g->fail_code)
		return g->fail_code;
	if (g->touch[0]) {
		/* Same size, new bytes, new mtime: a model rewritten in place. */
		int fd = open(g->touch, O_WRONLY);
		struct timespec ts[2] = { { 0, UTIME_NOW }, { 12345, 0 } };

		if (fd < 0)
			return AEG_EIO;
		if (pwrite(fd, "XYZ", 3, 0) != 3 || futimens(fd, ts) != 0)
			ret = AEG_EIO;
		close(fd);
		return ret;
	}
	pthread_mutex_lock(&g->lock);
	g->holding = 1;
	pthread_cond_broadcast(&g->cond);
	while (!g->release)
		pthread_cond_wait(&g->cond, &g->lock);
	pthread_mutex_unlock(&g->lock);
	return ret;
}

static void gk_init(struct gatekeeper *g, uint32_t item)
{
	memset(g, 0, sizeof(*g));
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cond, NULL);
	g->hold_item = item;
}

static void gk_wait_holding(struct gatekeeper *g)
{
	pthread_mutex_lock(&g->lock);
	while (!g->holding)
		pthread_cond_wait(&g->cond, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

static void gk_release(struct gatekeeper *g)
{
	pthread_mutex_lock(&g->lock);
	g->release = 1;
	pthread_cond_broadcast(&g->cond);
	pthread_mutex_unlock(&g->lock);
}

static void cancel_in_flight(void **state)
{
	struct fx *f = fx_new(0, 1);       /* one worker: item 0 blocked means nothing lands */
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = AEG_FEED_READ };
	char path[128];
	unsigned char *file = raw_file(f, "cancel.bin", 1 * MiB, 5, path, sizeof(path));
	struct gatekeeper g;
	const struct aeg_chunk *c;
	uint32_t n;
	aeg_load_t *l;

	gk_init(&g, 0);
	aeg_prefetch_set_hook(f->pf, hook, &g);
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	c = aeg_load_chunks(l, &n);
	gk_wait_holding(&g);

	/* Handed out before any byte landed, the events are pending, not complete. */
	assert_int_equal(aeg_load_wait_chunk(l, 0, 50), AEG_ETIMEDOUT);
	assert_int_equal(aeg_event_wait_handle(f->dev, &c[n - 1].event, 50), AEG_ETIMEDOUT);
	assert_int_equal(aeg_load_wait(l, 20), AEG_ETIMEDOUT);
	/* Chunks of a load in flight are not released under it. */
	assert_int_equal(aeg_prefetch_release(f->pf, &c[0].slab_id, 1), AEG_EBUSY);
	assert_non_null(strstr(aeg_error_detail(), "cancel it first"));

	assert_int_equal(aeg_load_cancel(l), 0);
	gk_release(&g);
	assert_int_equal(aeg_load_wait(l, 10000), AEG_ECANCELED);
	assert_non_null(strstr(aeg_error_detail(), "cancelled"));
	for (uint32_t i = 0; i < n; i++) {
		assert_int_equal(aeg_load_wait_chunk(l, i, 10000), AEG_ECANCELED);
		assert_int_equal(aeg_event_wait_handle(f->dev, &c[i].event, 10000), AEG_ECANCELED);
	}
	aeg_prefetch_set_hook(f->pf, NULL, NULL);
	release_load(f, l);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static void file_changes_during_load(void **state)
{
	static const enum aeg_prefetch_feed feeds[] = { AEG_FEED_MMAP, AEG_FEED_READ, AEG_FEED_MIXED };

	for (size_t i = 0; i < AEG_ARRAY_SIZE(feeds); i++) {
		struct fx *f = fx_new(0, 2);
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = feeds[i] };
		char path[128];
		unsigned char *file = raw_file(f, "stale.bin", 1 * MiB, 6, path, sizeof(path));
		const struct aeg_chunk *c;
		struct gatekeeper g;
		uint32_t n;
		aeg_load_t *l;

		gk_init(&g, 3);
		snprintf(g.touch, sizeof(g.touch), "%s", path);
		aeg_prefetch_set_hook(f->pf, hook, &g);
		assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
		assert_int_equal(aeg_load_wait(l, 10000), AEG_ESTALE);
		assert_non_null(strstr(aeg_error_detail(), "changed while loading"));
		/* Every chunk is suspect, those that landed before the change too. */
		c = aeg_load_chunks(l, &n);
		for (uint32_t k = 0; k < n; k++) {
			assert_int_equal(aeg_load_wait_chunk(l, k, 10000), AEG_ESTALE);
			assert_int_equal(aeg_event_wait_handle(f->dev, &c[k].event, 10000), AEG_ESTALE);
		}
		aeg_prefetch_set_hook(f->pf, NULL, NULL);
		release_load(f, l);
		assert_baseline(f);
		free(file);
		fx_free(f);
	}
}

static void device_failure_midway(void **state)
{
	static const enum aeg_prefetch_feed feeds[] = { AEG_FEED_MMAP, AEG_FEED_READ, AEG_FEED_MIXED };

	for (size_t i = 0; i < AEG_ARRAY_SIZE(feeds); i++) {
		struct fx *f = fx_new(0, 1);
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = feeds[i] };
		char path[128];
		unsigned char *file = raw_file(f, "fail.bin", 1 * MiB, 8, path, sizeof(path));
		const struct aeg_chunk *c;
		struct gatekeeper g;
		uint32_t n;
		aeg_load_t *l;

		/* Item 6 of 16 (64 KiB pieces) is in chunk 1 of 4. */
		gk_init(&g, 6);
		g.fail_code = AEG_EDEVICE;
		aeg_prefetch_set_hook(f->pf, hook, &g);
		assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
		assert_int_equal(aeg_load_wait(l, 10000), AEG_EDEVICE);
		assert_non_null(strstr(aeg_error_detail(), "piece 6"));
		c = aeg_load_chunks(l, &n);
		assert_int_equal(n, 4);
		/* One worker goes in order: chunk 0 landed, 1 and later never will. */
		assert_int_equal(aeg_load_wait_chunk(l, 0, 10000), 0);
		check_one(f, &c[0], file);
		for (uint32_t k = 1; k < n; k++) {
			assert_int_equal(aeg_load_wait_chunk(l, k, 10000), AEG_EDEVICE);
			assert_int_equal(aeg_event_wait_handle(f->dev, &c[k].event, 10000), AEG_EDEVICE);
		}
		aeg_prefetch_set_hook(f->pf, NULL, NULL);
		release_load(f, l);
		assert_baseline(f);
		free(file);
		fx_free(f);
	}
}

static void release_errors_and_all(void **state)
{
	struct fx *f = fx_new(0, 2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	char a[128], b[128];
	unsigned char *fa = raw_file(f, "a.bin", 700 * KiB, 9, a, sizeof(a));
	unsigned char *fb = raw_file(f, "b.bin", 300 * KiB, 10, b, sizeof(b));
	const struct aeg_chunk *c;
	uint64_t ids[2];
	struct aeg_prefetch_stats st;
	uint32_t n;
	aeg_load_t *la, *lb;

	assert_int_equal(aeg_prefetch_file(f->pf, a, &o, &la), 0);
	assert_int_equal(aeg_prefetch_file(f->pf, b, &o, &lb), 0);
	assert_int_equal(aeg_load_wait(la, 10000), 0);
	assert_int_equal(aeg_load_wait(lb, 10000), 0);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.chunks, 3 + 2);
	assert_int_equal(st.events, 5);
	assert_int_equal(st.loads, 2);

	/* An unknown id releases nothing, the good one included. */
	c = aeg_load_chunks(la, &n);
	ids[0] = c[0].slab_id;
	ids[1] = 987654321;
	assert_int_equal(aeg_prefetch_release(f->pf, ids, 2), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "987654321"));
	assert_int_equal(aeg_load_wait_chunk(la, 0, 0), 0);
	/* Released chunks are gone; twice is an error. */
	assert_int_equal(aeg_prefetch_release(f->pf, ids, 1), 0);
	assert_int_equal(aeg_load_wait_chunk(la, 0, 0), AEG_ENOENT);
	assert_int_equal(aeg_prefetch_release(f->pf, ids, 1), AEG_ENOENT);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.chunks, 4);

	aeg_load_close(lb);
	assert_int_equal(aeg_prefetch_release_all(f->pf), 0);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.loads, 1);     /* la: released but its handle is open */
	aeg_load_close(la);
	assert_baseline(f);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.loads, 0);
	free(fa);
	free(fb);
	fx_free(f);
}

static void *release_later(void *arg)
{
	usleep(50 * 1000);
	gk_release(arg);
	return NULL;
}

static void release_all_cancels(void **state)
{
	struct fx *f = fx_new(0, 1);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	char path[128];
	unsigned char *file = raw_file(f, "x.bin", 1 * MiB, 11, path, sizeof(path));
	struct gatekeeper g;
	aeg_load_t *l;
	pthread_t t;

	gk_init(&g, 2);
	aeg_prefetch_set_hook(f->pf, hook, &g);
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	gk_wait_holding(&g);
	/* release_all waits for the held worker: let it go a little later. */
	assert_int_equal(pthread_create(&t, NULL, release_later, &g), 0);
	assert_int_equal(aeg_prefetch_release_all(f->pf), 0);
	pthread_join(t, NULL);
	assert_int_equal(aeg_load_wait(l, 0), AEG_ECANCELED);
	aeg_load_close(l);
	aeg_prefetch_set_hook(f->pf, NULL, NULL);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static void host_cache(void **state)
{
	/* Budget: 40 buffers of 64 KiB = 2.5 MiB; files of 1.5 MiB and 1 MiB + 1. */
	struct fx *f = fx_new(40 * BUF_BYTES, 2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	char a[128], b[128];
	unsigned char *fa = raw_file(f, "a.bin", 1536 * KiB, 12, a, sizeof(a));
	unsigned char *fb = raw_file(f, "b.bin", 1 * MiB + 1, 13, b, sizeof(b));
	struct aeg_prefetch_stats st;
	struct aeg_load_progress pr;
	struct aeg_pool_stats ps;
	struct timespec ts[2] = { { 0, UTIME_NOW }, { 1000, 0 } };
	aeg_load_t *l;

	/* Miss: into cache buffers (mixed: read there, or copied back from the GPU), kept after the load. */
	assert_int_equal(aeg_prefetch_file(f->pf, a, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, fa, 0, 1536 * KiB);
	assert_int_equal(aeg_load_progress(l, &pr), 0);
	assert_int_equal(pr.feed, AEG_FEED_MIXED);
	release_load(f, l);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.cache_misses, 1);
	assert_int_equal(st.cache_hits, 0);
	assert_int_equal(st.cache_entries, 1);
	assert_int_equal(st.cache_bytes, 24 * BUF_BYTES);
	assert_int_equal(aeg_pool_stats(f->pool, &ps), 0);
	assert_int_equal(ps.in_use, 24);
	assert_baseline(f);

	/* Hit: pinned -> GPU only; the bytes still match. */
	assert_int_equal(aeg_prefetch_file(f->pf, a, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(aeg_load_progress(l, &pr), 0);
	assert_int_equal(pr.feed, AEG_FEED_CACHE);
	check_chunks(f, l, fa, 0, 1536 * KiB);
	release_load(f, l);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.cache_hits, 1);

	/* b does not fit beside a: a (least recently used) goes. */
	assert_int_equal(aeg_prefetch_file(f->pf, b, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	check_chunks(f, l, fb, 0, 1 * MiB + 1);
	release_load(f, l);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.cache_evictions, 1);
	assert_int_equal(st.cache_entries, 1);
	assert_int_equal(st.cache_bytes, 17 * BUF_BYTES);
	assert_baseline(f);

	/* b changed on disk (mtime): a miss, and the stale entry is dropped. */
	assert_int_equal(utimensat(AT_FDCWD, b, ts, 0), 0);
	assert_int_equal(aeg_prefetch_file(f->pf, b, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(aeg_load_progress(l, &pr), 0);
	assert_int_equal(pr.feed, AEG_FEED_MIXED);
	release_load(f, l);
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.cache_misses, 3);
	assert_int_equal(st.cache_entries, 1);

	/* NO_CACHE neither uses nor fills it. */
	o.flags = AEG_PREFETCH_NO_CACHE;
	assert_int_equal(aeg_prefetch_file(f->pf, b, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(aeg_load_progress(l, &pr), 0);
	assert_int_not_equal(pr.feed, AEG_FEED_CACHE);
	release_load(f, l);

	assert_int_equal(aeg_prefetch_cache_drop(f->pf), 1);
	assert_int_equal(aeg_pool_stats(f->pool, &ps), 0);
	assert_int_equal(ps.in_use, f->pool0.in_use);
	assert_baseline(f);
	free(fa);
	free(fb);
	fx_free(f);
}

/* --------------------------------------------------- a second process */

/*
 * A cache fill of a safetensors file with one worker, so every piece past
 * the header is registered and its bytes come back from the GPU into the
 * cache buffer, and the pieces holding the header are read: the hit that
 * follows serves every tensor from those buffers.
 */
static void host_cache_fill_copies_back(void **state)
{
	struct fx *f = fx_new(40 * BUF_BYTES, 1);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	uint64_t size, hlen = 0, data_off;
	struct aeg_load_progress pr;
	struct aeg_prefetch_stats st;
	unsigned char *file;
	char path[128];
	aeg_load_t *l;

	/* 100 KiB of metadata: the data starts inside the second 64 KiB piece. */
	file = st_file(f, "cached.safetensors", specs, (int)AEG_ARRAY_SIZE(specs), 100 * KiB, path,
		       sizeof(path), &size);
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | file[i];
	data_off = 8 + hlen;
	assert_true(data_off > BUF_BYTES && data_off % BUF_BYTES != 0);

	for (int round = 0; round < 2; round++) {
		assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
		assert_int_equal(aeg_load_wait(l, 10000), 0);
		assert_int_equal(aeg_load_progress(l, &pr), 0);
		assert_int_equal(pr.feed, round == 0 ? AEG_FEED_MIXED : AEG_FEED_CACHE);
		check_chunks(f, l, file, data_off, size);
		release_load(f, l);
	}
	assert_int_equal(aeg_prefetch_stats(f->pf, &st), 0);
	assert_int_equal(st.cache_misses, 1);
	assert_int_equal(st.cache_hits, 1);
	assert_int_equal(st.read_fallbacks, 0);
	assert_int_equal(aeg_prefetch_cache_drop(f->pf), 1);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static void second_process_reads(void **state)
{
	struct fx *f = fx_new(0, 1);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	char path[128];
	unsigned char *file = raw_file(f, "ipc.bin", 1 * MiB + 777, 14, path, sizeof(path));
	const struct aeg_chunk *c;
	struct gatekeeper g;
	aeg_handle_t sh;
	char **args;
	uint32_t n;
	aeg_load_t *l;
	pid_t pid;
	int status;

	gk_init(&g, 0);
	aeg_prefetch_set_hook(f->pf, hook, &g);
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	c = aeg_load_chunks(l, &n);
	assert_int_equal(aeg_slab_export(f->slab, &sh), 0);

	args = chunk_child_args(self_exe, path, &sh, c, n);
	/* The child starts waiting while nothing has landed yet. */
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		execv(self_exe, args);
		child_exit(127);
	}
	gk_wait_holding(&g);
	usleep(100 * 1000);
	gk_release(&g);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);

	chunk_child_args_free(args);
	aeg_prefetch_set_hook(f->pf, NULL, NULL);
	release_load(f, l);
	assert_baseline(f);
	free(file);
	fx_free(f);
}

static void priority_goes_first(void **state)
{
	struct fx *f = fx_new(0, 1);
	struct aeg_prefetch_options lo = { .chunk_bytes = CHUNK, .feed = AEG_FEED_READ };
	struct aeg_prefetch_options hi = lo;
	char a[128], b[128];
	unsigned char *fa = raw_file(f, "low.bin", 1 * MiB, 15, a, sizeof(a));
	unsigned char *fb = raw_file(f, "high.bin", 1 * MiB, 16, b, sizeof(b));
	struct aeg_load_progress pa, pb;
	struct gatekeeper g;
	aeg_load_t *la, *lb;

	hi.priority = 5;
	gk_init(&g, 0);
	aeg_prefetch_set_hook(f->pf, hook, &g);
	assert_int_equal(aeg_prefetch_file(f->pf, a, &lo, &la), 0);
	gk_wait_holding(&g);            /* the one worker holds item 0 of the low load */
	aeg_prefetch_set_hook(f->pf, NULL, NULL);
	assert_int_equal(aeg_prefetch_file(f->pf, b, &hi, &lb), 0);
	gk_release(&g);
	assert_int_equal(aeg_load_wait(lb, 10000), 0);
	assert_int_equal(aeg_load_wait(la, 10000), 0);
	assert_int_equal(aeg_load_progress(la, &pa), 0);
	assert_int_equal(aeg_load_progress(lb, &pb), 0);
	/* The high-priority load, queued later, ended first. */
	assert_true(pb.end_ns < pa.end_ns);
	check_chunks(f, la, fa, 0, 1 * MiB);
	check_chunks(f, lb, fb, 0, 1 * MiB);
	release_load(f, la);
	release_load(f, lb);
	assert_baseline(f);
	free(fa);
	free(fb);
	fx_free(f);
}

static void bad_config(void **state)
{
	struct fx *f = fx_new(0, 1);
	struct aeg_prefetch_config cfg;
	aeg_prefetch_t *pf = NULL;

	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = 0;
	assert_int_equal(aeg_prefetch_create(f->slab, f->pool, &cfg, &pf), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "threads 0"));
	aeg_prefetch_config_defaults(&cfg);
	cfg.piece_bytes = 1000;
	assert_int_equal(aeg_prefetch_create(f->slab, f->pool, &cfg, &pf), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "multiple of 4096"));
	assert_null(pf);
	fx_free(f);
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(raw_file_every_feed),
		cmocka_unit_test(pool_later_mixed),
		cmocka_unit_test(staging_ring_reads),
		cmocka_unit_test(pool_slots),
		cmocka_unit_test(hold_engine),
		cmocka_unit_test(topology_later),
		cmocka_unit_test(empty_file),
		cmocka_unit_test(safetensors_table),
		cmocka_unit_test(open_and_option_errors),
		cmocka_unit_test(chunk_larger_than_file),
		cmocka_unit_test(cancel_in_flight),
		cmocka_unit_test(file_changes_during_load),
		cmocka_unit_test(device_failure_midway),
		cmocka_unit_test(release_errors_and_all),
		cmocka_unit_test(release_all_cancels),
		cmocka_unit_test(host_cache),
		cmocka_unit_test(host_cache_fill_copies_back),
		cmocka_unit_test(second_process_reads),
		cmocka_unit_test(priority_goes_first),
		cmocka_unit_test(bad_config),
	};

	/* Not argv[0]: a test harness may start us through a wrapper. */
	self_exe = self_exe_path();
	if (argc > 3 && strcmp(argv[1], "--child") == 0)
		return chunk_child(AEG_DEVICE_HOST, 20000, argc, argv);
	return cmocka_run_group_tests_name("prefetch", tests, NULL, NULL);
}

/* Faults on the host backend: failing, short and shrinking reads on each feed; slab and pool exhausted. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/session.h>

#include "device_host.h"
#include "internal.h"
#include "pinned_internal.h"
#include "prefetch_internal.h"
#include "testutil.h"

/* tests/faults/fault_shim.c, linked into this program (so it works under ASan too). */
void aeg_fault_shim_reload(void);
unsigned long aeg_fault_shim_hits(void);

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define SLAB_BYTES (8 * MiB)
#define BUF_BYTES (64 * KiB)
#define POOL_BUFFERS 32
#define CHUNK (128 * KiB)
#define FILE_BYTES (1 * MiB)
#define CUT (384 * KiB)         /* chunk 3 begins here: a piece boundary of both feeds */

struct fx {
	aeg_device_t *dev;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_prefetch_t *pf;
	char dir[64];
	int fds0;
};

static void fault_off(void)
{
	unsetenv("AEGAEON_FAULT");
	unsetenv("AEGAEON_FAULT_FILE");
	unsetenv("AEGAEON_FAULT_AT");
	aeg_fault_shim_reload();
}

static void fault_on(const char *mode, const char *path, uint64_t at)
{
	char n[32];

	snprintf(n, sizeof(n), "%" PRIu64, at);
	setenv("AEGAEON_FAULT", mode, 1);
	setenv("AEGAEON_FAULT_FILE", path, 1);
	setenv("AEGAEON_FAULT_AT", n, 1);
	aeg_fault_shim_reload();
}

static struct fx *fx_new(int threads)
{
	struct fx *f = calloc(1, sizeof(*f));
	struct aeg_prefetch_config cfg;

	assert_non_null(f);
	f->fds0 = count_fds();
	assert_int_equal(aeg_device_open(&f->dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_slab_create(f->dev, 0, SLAB_BYTES, &f->slab), 0);
	assert_int_equal(aeg_pool_create(f->dev, 0, BUF_BYTES, BUF_BYTES * POOL_BUFFERS, &f->pool), 0);
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = threads;
	cfg.streams = 2;
	cfg.piece_bytes = 64 * KiB;
	cfg.ring_buffers = 8;
	cfg.small_file_bytes = 0;
	assert_int_equal(aeg_prefetch_create(f->slab, f->pool, &cfg, &f->pf), 0);
	snprintf(f->dir, sizeof(f->dir), "/tmp/aegaeon-faults-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	return f;
}

/* Nothing the engine took is left: blocks, events, ring, registrations, pool buffers. */
static void assert_baseline(struct fx *f)
{
	struct aeg_slab_stats s;
	struct aeg_pool_stats p;
	struct aeg_prefetch_stats e;

	assert_int_equal(aeg_slab_stats(f->slab, &s), 0);
	assert_int_equal(aeg_pool_stats(f->pool, &p), 0);
	assert_int_equal(aeg_prefetch_stats(f->pf, &e), 0);
	assert_int_equal(s.blocks, 0);
	assert_int_equal(s.used_bytes, 0);
	assert_int_equal(p.in_use, 0);
	assert_int_equal(e.loads, 0);
	assert_int_equal(e.chunks, 0);
	assert_int_equal(e.events, 0);
	assert_int_equal(e.blocks, 0);
	assert_int_equal(e.ring_in_use, 0);
	assert_int_equal(e.registered_pieces, 0);
}

static void fx_free(struct fx *f)
{
	char cmd[128];

	aeg_prefetch_destroy(f->pf);
	aeg_pool_destroy(f->pool);
	aeg_slab_destroy(f->slab);
	aeg_device_close(f->dev);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
	assert_int_equal(system(cmd), 0);
	assert_int_equal(count_fds(), f->fds0);
	free(f);
}

/*
 * A raw file of FILE_BYTES, or a safetensors file of eight 128 KiB tensors
 * whose data begins at offset 0 of a page (the header is padded to 4088
 * bytes), so chunks of both kinds start at the same multiples of CHUNK
 * (plus 4096 for safetensors).
 */
static unsigned char *make_file(struct fx *f, int safetensors, char *path, size_t len,
				uint64_t *data_begin)
{
	unsigned char *p = test_pattern(FILE_BYTES + (safetensors ? 4096 : 0), 11);

	if (!safetensors) {
		snprintf(path, len, "%s/model.bin", f->dir);
		*data_begin = 0;
		test_write_file(path, p, FILE_BYTES);
		return p;
	}
	{
		char json[4089];
		int n = snprintf(json, sizeof(json), "{");

		for (int i = 0; i < 8; i++)
			n += snprintf(json + n, sizeof(json) - (size_t)n,
				      "%s\"t%d\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[%llu,%llu]}",
				      i ? "," : "", i, CHUNK, i * CHUNK, (i + 1) * CHUNK);
		n += snprintf(json + n, sizeof(json) - (size_t)n, "}");
		memset(json + n, ' ', 4088 - (size_t)n);
		for (int i = 0; i < 8; i++)
			p[i] = (unsigned char)(4088ull >> (8 * i));
		memcpy(p + 8, json, 4088);
	}
	snprintf(path, len, "%s/model.safetensors", f->dir);
	*data_begin = 4096;
	test_write_file(path, p, FILE_BYTES + 4096);
	return p;
}

static void release_all(struct fx *f, aeg_load_t *l)
{
	aeg_load_close(l);
	assert_int_equal(aeg_prefetch_release_all(f->pf), 0);
	assert_baseline(f);
}

/* With the fault off, the same file loads whole and right: the engine is not left broken. */
static void load_clean(struct fx *f, const char *path, const unsigned char *file,
		       enum aeg_prefetch_feed feed)
{
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = feed };
	const struct aeg_chunk *c;
	aeg_load_t *l;
	uint32_t n;

	fault_off();
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 20000), 0);
	c = aeg_load_chunks(l, &n);
	assert_int_equal(n, FILE_BYTES / CHUNK);
	for (uint32_t i = 0; i < n; i++) {
		assert_int_equal(aeg_load_wait_chunk(l, i, 10000), 0);
		assert_memory_equal(c[i].device_ptr, file + c[i].file_offset, c[i].size);
	}
	release_all(f, l);
}

struct read_case {
	const char *mode;
	enum aeg_prefetch_feed feed;
	int safetensors;
	int threads;
	int want;               /* the load's error; 0: it must load right */
	const char *detail;     /* in the load's error detail */
};

static const struct read_case read_cases[] = {
	{ "eio", AEG_FEED_READ, 0, 1, AEG_EIO, "Input/output error" },
	{ "eio", AEG_FEED_READ, 1, 1, AEG_EIO, "Input/output error" },
	{ "eio", AEG_FEED_MMAP, 0, 1, AEG_EIO, "through its mapping: Input/output error" },
	{ "eio", AEG_FEED_MMAP, 1, 1, AEG_EIO, "through its mapping: Input/output error" },
	{ "eio", AEG_FEED_READ, 0, 4, AEG_EIO, "Input/output error" },
	{ "eio", AEG_FEED_MMAP, 1, 4, AEG_EIO, "through its mapping: Input/output error" },
	{ "short", AEG_FEED_READ, 0, 1, 0, NULL },
	{ "short", AEG_FEED_READ, 1, 4, 0, NULL },
	{ "shrink", AEG_FEED_READ, 0, 1, AEG_ESTALE, "changed while loading" },
	{ "shrink", AEG_FEED_READ, 1, 1, AEG_ESTALE, "changed while loading" },
	{ "shrink", AEG_FEED_MMAP, 0, 1, AEG_ESTALE, "changed while loading" },
	{ "shrink", AEG_FEED_MMAP, 1, 1, AEG_ESTALE, "changed while loading" },
	{ "shrink", AEG_FEED_READ, 0, 4, AEG_ESTALE, "changed while loading" },
	{ "shrink", AEG_FEED_MMAP, 1, 4, AEG_ESTALE, "changed while loading" },
	/* MIXED: one worker registers, three read; the fault meets either
	 * (which pieces are read depends on timing: short reads, which only
	 * reads meet, are the READ rows'). */
	{ "eio", AEG_FEED_MIXED, 0, 4, AEG_EIO, "Input/output error" },
	{ "eio", AEG_FEED_MIXED, 1, 4, AEG_EIO, "Input/output error" },
	{ "shrink", AEG_FEED_MIXED, 0, 4, AEG_ESTALE, "changed while loading" },
	{ "shrink", AEG_FEED_MIXED, 1, 4, AEG_ESTALE, "changed while loading" },
};

/*
 * Each fault on each feed, plain and safetensors: the load's wait returns
 * the error with the path; a chunk either failed with it or holds the
 * file's bytes; with one worker the chunks before the fault all loaded
 * (an EIO spoils no earlier chunk; a shrunk file spoils all of them); then
 * everything is released and the same file loads right.
 */
static void read_faults(void **state)
{
	const char *only = getenv("AEGAEON_FAULT_CASE");       /* run one case, to debug it */

	for (size_t k = 0; k < AEG_ARRAY_SIZE(read_cases); k++) {
		const struct read_case *rc = &read_cases[k];
		struct fx *f;
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = rc->feed };
		const struct aeg_chunk *c;
		uint64_t begin, at, piece_at;
		unsigned char *file;
		char path[128];
		uint32_t n, failed = 0;
		aeg_load_t *l;
		int err;

		if (only && strtoul(only, NULL, 10) != k)
			continue;
		f = fx_new(rc->threads);
		file = make_file(f, rc->safetensors, path, sizeof(path), &begin);
		at = strcmp(rc->mode, "short") == 0 ? 4093 : begin + CUT;
		piece_at = at / (64 * KiB) * (64 * KiB);        /* where the failing piece starts */
		print_message("case %zu: %s, %s feed, %s, %d worker%s\n", k, rc->mode,
			      aeg_prefetch_feed_name(rc->feed), rc->safetensors ? "safetensors" : "raw",
			      rc->threads, rc->threads == 1 ? "" : "s");
		fault_on(rc->mode, path, at);
		assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
		err = aeg_load_wait(l, 20000);
		if (err != rc->want)
			fail_msg("case %zu: load returned %s (%s), want %s", k, aeg_errname(err),
				 aeg_error_detail(), aeg_errname(rc->want));
		print_message("  -> %s %s\n", aeg_errname(err), aeg_error_detail());
		if (rc->want) {
			assert_non_null(strstr(aeg_error_detail(), path));
			assert_non_null(strstr(aeg_error_detail(), rc->detail));
		}
		assert_true(aeg_fault_shim_hits() > 0);
		c = aeg_load_chunks(l, &n);
		assert_int_equal(n, FILE_BYTES / CHUNK);
		for (uint32_t i = 0; i < n; i++) {
			uint64_t end = c[i].file_offset + c[i].size;
			int e = aeg_load_wait_chunk(l, i, 10000);
			int h = aeg_event_wait_handle(f->dev, &c[i].event, 10000);

			assert_int_equal(e, h);
			if (e == 0) {
				assert_memory_equal(c[i].device_ptr, file + c[i].file_offset, c[i].size);
				/* No chunk reaching past the fault can have loaded. */
				if (rc->want)
					assert_true(end <= at);
				continue;
			}
			if (e != rc->want)
				fail_msg("case %zu: chunk %u returned %s (%s), want %s", k, i, aeg_errname(e),
					 aeg_error_detail(), aeg_errname(rc->want));
			assert_non_null(strstr(aeg_error_detail(), path));
			failed++;
			/* One worker: every piece before the failing one was copied. */
			if (rc->want == AEG_EIO && rc->threads == 1 && end <= piece_at)
				fail_msg("case %zu: chunk %u (bytes ..%" PRIu64 ") failed, before the fault at %" PRIu64,
					 k, i, end, at);
		}
		if (rc->want == AEG_ESTALE)
			assert_int_equal(failed, n);
		else if (rc->want == AEG_EIO)
			assert_true(failed > 0 && (rc->threads > 1 || failed < n));
		else
			assert_int_equal(failed, 0);
		release_all(f, l);
		if (strcmp(rc->mode, "shrink") == 0)
			test_write_file(path, file, FILE_BYTES + begin);
		load_clean(f, path, file, rc->feed);
		free(file);
		fx_free(f);
	}
}

/* The safetensors header cannot be read: aeg_prefetch_file itself fails, leaving nothing. */
static void header_eio(void **state)
{
	struct fx *f = fx_new(2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	unsigned char *file;
	char path[128];
	uint64_t begin;
	aeg_load_t *l = NULL;

	file = make_file(f, 1, path, sizeof(path), &begin);
	for (uint64_t at = 0; at <= 8; at += 8) {
		fault_on("eio", path, at);
		assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), AEG_EIO);
		assert_null(l);
		assert_non_null(strstr(aeg_error_detail(), path));
		assert_non_null(strstr(aeg_error_detail(), "reading the header: Input/output error"));
		assert_true(aeg_fault_shim_hits() > 0);
		assert_baseline(f);
	}
	load_clean(f, path, file, AEG_FEED_AUTO);
	free(file);
	fx_free(f);
}

/* ---------------------------------------------------------- memory */

/* A slab larger than the device: a clear error, nothing kept, a sane one next. */
static void slab_over_device(void **state)
{
	struct aeg_gpu_info info;
	aeg_device_t *dev;
	aeg_slab_t *slab = NULL;
	int fds = count_fds();

	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_device_gpu_info(dev, 0, &info), 0);
	assert_int_equal(aeg_slab_create(dev, 0, info.total_bytes + 64 * MiB, &slab), AEG_ENOSPC);
	assert_null(slab);
	/* "slab of 23.6 GiB (25343610880 bytes) asked on GPU 0 (host), free 23.16 GiB of 23.54 GiB" */
	assert_non_null(strstr(aeg_error_detail(), "bytes) asked on GPU 0"));
	assert_non_null(strstr(aeg_error_detail(), ", free "));
	assert_int_equal(count_fds(), fds + 0);
	assert_int_equal(aeg_slab_create(dev, 0, SLAB_BYTES, &slab), 0);
	aeg_slab_destroy(slab);
	aeg_device_close(dev);
	assert_int_equal(count_fds(), fds);
}

/* The slab cannot hold the file: the error says requested vs free; the next load fits. */
static void slab_full_at_prefetch(void **state)
{
	struct fx *f = fx_new(2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	struct aeg_slab_stats s;
	struct aeg_block fill;
	unsigned char *file;
	uint64_t begin;
	char path[128];
	aeg_load_t *l = NULL;

	file = make_file(f, 0, path, sizeof(path), &begin);
	assert_int_equal(aeg_slab_alloc(f->slab, SLAB_BYTES - 512 * KiB, &fill), 0);
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), AEG_ENOSPC);
	assert_null(l);
	assert_non_null(strstr(aeg_error_detail(), path));
	assert_non_null(strstr(aeg_error_detail(), "needs 1 MiB"));
	assert_non_null(strstr(aeg_error_detail(), "512 KiB free of 8 MiB"));
	assert_int_equal(aeg_slab_stats(f->slab, &s), 0);
	assert_int_equal(s.blocks, 1);
	assert_int_equal(aeg_slab_free(f->slab, fill.id), 0);
	assert_baseline(f);
	load_clean(f, path, file, AEG_FEED_READ);
	free(file);
	fx_free(f);
}

/*
 * Enough bytes free but no hole large enough for a big tensor: the blocks
 * taken for the tensors before it are given back.
 */
static void slab_fragmented_at_prefetch(void **state)
{
	struct fx *f = fx_new(2);
	struct aeg_prefetch_options o = { .chunk_bytes = 64 * KiB };
	struct aeg_block b[32];
	struct aeg_slab_stats s;
	unsigned char *file;
	uint64_t begin;
	char path[128];
	aeg_load_t *l = NULL;
	int nb = 0;

	file = make_file(f, 1, path, sizeof(path), &begin);
	/* 256 KiB blocks, every other one freed: 4 MiB free in 256 KiB holes. */
	while (nb < 32 && aeg_slab_alloc(f->slab, 256 * KiB, &b[nb]) == 0)
		nb++;
	assert_int_equal(nb, 32);
	for (int i = 0; i < nb; i += 2)
		assert_int_equal(aeg_slab_free(f->slab, b[i].id), 0);
	/* Each 128 KiB tensor is over the 64 KiB chunk: a block of its own; all fit... */
	o.chunk_bytes = 64 * KiB;
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 20000), 0);
	aeg_load_close(l);
	assert_int_equal(aeg_prefetch_release_all(f->pf), 0);
	/* ...but one chunk of the whole 1 MiB does not, with 4 MiB free. */
	o.chunk_bytes = 512 * KiB;
	o.format = AEG_FORMAT_RAW;
	l = NULL;
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), AEG_ENOSPC);
	assert_null(l);
	assert_non_null(strstr(aeg_error_detail(), path));
	assert_non_null(strstr(aeg_error_detail(), "block 1 of 3"));
	assert_int_equal(aeg_slab_stats(f->slab, &s), 0);
	assert_int_equal(s.blocks, 16);
	for (int i = 1; i < nb; i += 2)
		assert_int_equal(aeg_slab_free(f->slab, b[i].id), 0);
	assert_baseline(f);
	l = NULL;
	assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
	assert_int_equal(aeg_load_wait(l, 20000), 0);
	release_all(f, l);
	free(file);
	fx_free(f);
}

static uint64_t meminfo(const char *key)
{
	char line[256];
	uint64_t v = 0;
	size_t n = strlen(key);
	FILE *fp = fopen("/proc/meminfo", "r");

	assert_non_null(fp);
	while (fgets(line, sizeof(line), fp))
		if (strncmp(line, key, n) == 0 && line[n] == ':')
			v = strtoull(line + n + 1, NULL, 10);
	fclose(fp);
	return v;
}

/* A pool larger than the memory there is: a clear error, nothing kept, a sane one next. */
static void pool_over_memory(void **state)
{
	aeg_device_t *dev;
	aeg_pool_t *pool = NULL;
	uint64_t avail = meminfo("MemAvailable") * KiB;
	int fds = count_fds();

	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_pool_create(dev, 0, MiB, aeg_round_up(avail + 256 * MiB, MiB), &pool), AEG_ENOMEM);
	assert_null(pool);
	assert_non_null(strstr(aeg_error_detail(), "available (MemAvailable)"));
	assert_int_equal(count_fds(), fds);
	assert_int_equal(aeg_pool_create(dev, 0, MiB, 4 * MiB, &pool), 0);
	aeg_pool_destroy(pool);
	aeg_device_close(dev);
	assert_int_equal(count_fds(), fds);
}

/*
 * Run this thread on one CPU of those it may use (*@all, to give back): a
 * pool made now populates on one thread, a unit after the other.
 */
static void one_cpu(cpu_set_t *all)
{
	cpu_set_t one;
	int cpu = 0;

	assert_int_equal(sched_getaffinity(0, sizeof(*all), all), 0);
	while (!CPU_ISSET(cpu, all))
		cpu++;
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	assert_int_equal(sched_setaffinity(0, sizeof(one), &one), 0);
}

/*
 * Memory running out part way through a pool's population, while its
 * buffers are registered behind the populating threads: AEG_ENOMEM that
 * says so, and nothing left behind: no registered range, no mapping, no
 * descriptor.
 */
static void pool_population_fails(void **state)
{
	static const char *const calls[] = { "0", "20", "40" };
	aeg_device_t *dev;
	aeg_pool_t *pool = NULL;
	int fds = count_fds(), maps = count_pool_maps();
	cpu_set_t all;

	/*
	 * One CPU: one populating thread, so the failure comes at a known
	 * point: after 20 steps of 4 MiB inside the second 64 MiB unit (no
	 * buffer registered yet), after 40 inside the third (the first 64 MiB
	 * of buffers registered, and unregistered again).
	 */
	one_cpu(&all);
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
		setenv("AEGAEON_FAULT", "nomem", 1);
		setenv("AEGAEON_FAULT_AT", calls[i], 1);
		aeg_fault_shim_reload();
		assert_int_equal(aeg_pool_create(dev, 0, MiB, 256 * MiB, &pool), AEG_ENOMEM);
		fault_off();
		assert_null(pool);
		assert_non_null(strstr(aeg_error_detail(), "populating"));
		assert_non_null(strstr(aeg_error_detail(), "Cannot allocate memory"));
		assert_int_equal(host_registered_ranges(dev), 0);
		assert_int_equal(count_pool_maps(), maps);
		assert_int_equal(count_fds(), fds);
	}
	/* The same pool with memory to spare: four registrations of 64 MiB, all undone at destroy. */
	assert_int_equal(aeg_pool_create(dev, 0, MiB, 256 * MiB, &pool), 0);
	assert_int_equal(host_registered_ranges(dev), 4);
	aeg_pool_destroy(pool);
	assert_int_equal(host_registered_ranges(dev), 0);
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	assert_int_equal(sched_setaffinity(0, sizeof(all), &all), 0);
	aeg_device_close(dev);
	assert_int_equal(count_fds(), fds);
}

struct pool_maker {
	aeg_device_t *dev;
	aeg_pool_t *pool;
	int err;
};

static void *make_pool(void *arg)
{
	struct pool_maker *m = arg;

	m->err = aeg_pool_create(m->dev, 0, MiB, 256 * MiB, &m->pool);
	return NULL;
}

/* Registered ranges of @dev once they reach @want, or what there are after @ms. */
static size_t ranges_after(aeg_device_t *dev, size_t want, int ms)
{
	for (int i = 0; i < ms && host_registered_ranges(dev) < want; i++)
		usleep(1000);
	return host_registered_ranges(dev);
}

/*
 * A pool registers its buffers beside its population, a piece at a time,
 * only while no load runs in the process: with one populating thread held
 * at a gate after 33 steps of 4 MiB (the first 128 MiB in: the first piece
 * of buffers could go), the first piece is registered when the engine is
 * idle, and nothing is while a load of the engine's is in flight (held);
 * once the gate opens every piece is registered either way.
 */
static void pool_waits_for_loads(void **state)
{
	struct fx *f = fx_new(2);
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	struct pool_maker m = { .dev = f->dev };
	char path[128], gate[160];
	uint64_t begin;
	unsigned char *file = make_file(f, 0, path, sizeof(path), &begin);
	size_t base = host_registered_ranges(f->dev), seen;
	int fd;
	cpu_set_t all;
	pthread_t t;
	aeg_load_t *l;

	one_cpu(&all);
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	snprintf(gate, sizeof(gate), "%s/gate", f->dir);
	for (int loading = 0; loading < 2; loading++) {
		if (loading) {
			assert_int_equal(aeg_prefetch_hold(f->pf, 1), 0);
			assert_int_equal(aeg_prefetch_file(f->pf, path, &o, &l), 0);
		}
		unlink(gate);
		fault_on("gate", gate, 33);
		assert_int_equal(pthread_create(&t, NULL, make_pool, &m), 0);
		seen = ranges_after(f->dev, base + 1, loading ? 300 : 10000);
		/* The gate opens before anything is checked: a failed check leaves no thread behind. */
		fd = open(gate, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
		close(fd);
		pthread_join(t, NULL);
		fault_off();
		assert_true(fd >= 0);
		assert_int_equal(seen, loading ? base : base + 1);
		assert_int_equal(m.err, 0);
		assert_int_equal(host_registered_ranges(f->dev), base + 4);
		aeg_pool_destroy(m.pool);
		assert_int_equal(host_registered_ranges(f->dev), base);
		if (loading) {
			assert_int_equal(aeg_prefetch_hold(f->pf, 0), 0);
			assert_int_equal(aeg_load_wait(l, 10000), 0);
			assert_int_equal(aeg_load_release(l), 0);
			aeg_load_close(l);
		}
	}
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	assert_int_equal(sched_setaffinity(0, sizeof(all), &all), 0);
	free(file);
	fx_free(f);
}

struct stoppable_maker {
	aeg_device_t *dev;
	atomic_int stop;
	aeg_pool_t *pool;
	int err;
	char detail[256];       /* the error's detail, which is the making thread's */
};

static void *make_stoppable(void *arg)
{
	struct stoppable_maker *m = arg;

	m->err = aeg_pool_create_stoppable(m->dev, 0, MiB, 256 * MiB, &m->stop, &m->pool);
	snprintf(m->detail, sizeof(m->detail), "%s", aeg_error_detail());
	return NULL;
}

/*
 * A pool whose making is stopped part way (the agent stopping while it
 * makes the job's pool): AEG_ECANCELED saying how far it got, and nothing
 * registered, mapped or open left, whether it is stopped during its first
 * 64 MiB or once the first piece of buffers is registered. One populating
 * thread, 20 ms a 4 MiB step: the whole pool would take 1.3 s.
 */
static void pool_stopped(void **state)
{
	struct stoppable_maker m = { 0 };
	int fds = count_fds(), maps = count_pool_maps(), open_fds;
	cpu_set_t all;
	pthread_t t;

	one_cpu(&all);
	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_device_open(&m.dev, AEG_DEVICE_HOST), 0);
	open_fds = count_fds();
	for (int registered = 0; registered < 2; registered++) {
		size_t seen = 0;

		atomic_store(&m.stop, 0);
		m.pool = NULL;
		fault_on("slowpop", "", 20000);
		assert_int_equal(pthread_create(&t, NULL, make_stoppable, &m), 0);
		if (registered)
			seen = ranges_after(m.dev, 1, 10000);
		else
			usleep(20000);
		atomic_store(&m.stop, 1);
		pthread_join(t, NULL);
		fault_off();
		assert_int_equal(seen, registered ? 1 : 0);
		assert_int_equal(m.err, AEG_ECANCELED);
		assert_null(m.pool);
		if (strstr(m.detail, "its making was stopped (") == NULL)
			fail_msg("the detail: %s", m.detail);
		assert_int_equal(host_registered_ranges(m.dev), 0);
		assert_int_equal(count_pool_maps(), maps);
		assert_int_equal(count_fds(), open_fds);
	}
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	assert_int_equal(sched_setaffinity(0, sizeof(all), &all), 0);
	aeg_device_close(m.dev);
	assert_int_equal(count_fds(), fds);
}

/*
 * A pool made in the background (the agent's, stoppable) populates nothing
 * while a load runs in the process, for up to 2 s: made while one runs it
 * is not there 300 ms later and comes once the load ends, saying how long
 * it waited; while loads run past the 2 s it is made all the same. A pool
 * made for a caller waiting on it (aeg_pool_create) does not wait.
 */
static void pool_population_yields(void **state)
{
	struct stoppable_maker m = { 0 };
	struct aeg_pool_timing tm;
	aeg_pool_t *pool;
	pthread_t t;
	uint64_t t0;

	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_device_open(&m.dev, AEG_DEVICE_HOST), 0);

	aeg_loads_begin();
	assert_int_equal(pthread_create(&t, NULL, make_stoppable, &m), 0);
	usleep(300000);
	assert_null(__atomic_load_n(&m.pool, __ATOMIC_ACQUIRE));
	aeg_loads_end();
	pthread_join(t, NULL);
	assert_int_equal(m.err, 0);
	aeg_pool_timing(m.pool, &tm);
	assert_in_range(tm.yield_ns, 100000000ull, 1900000000ull);
	aeg_pool_destroy(m.pool);

	aeg_loads_begin();
	t0 = aeg_now_ns();
	m.pool = NULL;
	assert_int_equal(pthread_create(&t, NULL, make_stoppable, &m), 0);
	pthread_join(t, NULL);
	assert_int_equal(m.err, 0);
	assert_true(aeg_now_ns() - t0 >= 2000000000ull);
	aeg_pool_timing(m.pool, &tm);
	assert_in_range(tm.yield_ns, 1500000000ull, 2500000000ull);
	aeg_pool_destroy(m.pool);

	assert_int_equal(aeg_pool_create(m.dev, 0, MiB, 64 * MiB, &pool), 0);
	aeg_pool_timing(pool, &tm);
	assert_int_equal(tm.yield_ns, 0);
	aeg_pool_destroy(pool);
	aeg_loads_end();

	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	aeg_device_close(m.dev);
}

/* Huge pages demanded, more than are free: the error says how many are missing and how to get them. */
static void pool_hugepages_short(void **state)
{
	aeg_device_t *dev;
	aeg_pool_t *pool = NULL;
	uint64_t free_pages = meminfo("HugePages_Free");
	int fds = count_fds(), err;

	setenv("AEGAEON_PINNED_HUGEPAGES", "always", 1);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	err = aeg_pool_create(dev, 0, 2 * MiB, (free_pages + 4) * 2 * MiB, &pool);
	if (err == AEG_ENOTSUP) {
		assert_non_null(strstr(aeg_error_detail(), "huge"));
	} else {
		assert_int_equal(err, AEG_ENOMEM);
		assert_non_null(strstr(aeg_error_detail(), "sysctl vm.nr_hugepages="));
	}
	assert_null(pool);
	assert_int_equal(count_fds(), fds);
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	assert_int_equal(aeg_pool_create(dev, 0, 2 * MiB, 4 * MiB, &pool), 0);
	aeg_pool_destroy(pool);
	aeg_device_close(dev);
	assert_int_equal(count_fds(), fds);
}

/*
 * A release of chunks on two GPUs with a time limit is all or none. GPU 1's
 * load reads a slow file (the shim: 100 ms a read), so it is still in flight
 * when the limit runs out; GPU 0's chunk, loaded, must still be held then,
 * so the caller can ask again with the same ids (the Python module does, in
 * slices, to take signals between them). Before, GPU 0's was released and
 * the next ask failed with AEG_ENOENT.
 */
static uint32_t model_ids(aeg_model_t *m, uint64_t *ids, uint32_t max)
{
	const struct aeg_chunk *c;
	uint32_t n, k = 0;

	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++) {
		int seen = 0;

		for (uint32_t j = 0; j < k; j++)
			seen |= ids[j] == c[i].slab_id;
		if (!seen) {
			assert_true(k < max);
			ids[k++] = c[i].slab_id;
		}
	}
	return k;
}

static void release_on_two_gpus(void **state)
{
	struct aeg_session_config scfg = { .mode = AEG_SESSION_LOCAL };
	struct aeg_load_request req = { .chunk_bytes = CHUNK, .format = AEG_FORMAT_RAW };
	aeg_model_t *m[3] = { NULL, NULL, NULL };
	char dir[] = "/tmp/aegaeon-faults-XXXXXX", path[3][64], cmd[96];
	unsigned char *bytes[3];
	uint64_t ids[64];
	uint32_t na, nb;
	aeg_session_t *s = NULL;
	int fds = count_fds();

	assert_non_null(mkdtemp(dir));
	for (int i = 0; i < 3; i++) {
		snprintf(path[i], sizeof(path[i]), "%s/%c.bin", dir, 'a' + i);
		bytes[i] = test_pattern(FILE_BYTES, 7 + i);
		test_write_file(path[i], bytes[i], FILE_BYTES);
	}
	unsetenv("AEGAEON_SOCKET");
	setenv("AEGAEON_DEVICE", "host", 1);
	setenv("AEGAEON_HOST_GPUS", "2", 1);
	setenv("AEGAEON_PREFETCH_SLAB", "16MiB", 1);
	if (aeg_session_open(&scfg, &s) != 0)
		fail_msg("%s", aeg_error_detail());
	/* GPU 0: c's blocks released, so a's ids are past any GPU 1 will give b. */
	req.gpu = 0;
	for (int i = 2; i >= 0; i -= 2) {
		req.path = path[i];
		assert_int_equal(aeg_session_load(s, &req, &m[i]), 0);
		assert_int_equal(aeg_model_wait(m[i], 10000), 0);
	}
	assert_int_equal(aeg_model_release(m[2]), 0);       /* and closes it */
	fault_on("slow", path[1], 100000);
	req.gpu = 1;
	req.path = path[1];
	assert_int_equal(aeg_session_load(s, &req, &m[1]), 0);
	na = model_ids(m[0], ids, 64);
	nb = model_ids(m[1], ids + na, 64 - na);
	for (uint32_t i = 0; i < na; i++)
		for (uint32_t j = 0; j < nb; j++)
			assert_true(ids[i] != ids[na + j]);
	assert_int_equal(aeg_session_release(s, -1, ids, na + nb, 50, NULL), AEG_ETIMEDOUT);
	/* Nothing was released: GPU 0's ids are still held, and can be asked for again. */
	assert_int_equal(aeg_session_release(s, 0, ids, na, 0, NULL), 0);
	assert_int_equal(aeg_session_release(s, 1, ids + na, nb, 10000, NULL), 0);
	fault_off();
	for (int i = 0; i < 2; i++)
		aeg_model_close(m[i]);
	aeg_session_close(s);
	for (int i = 0; i < 3; i++)
		free(bytes[i]);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
	assert_int_equal(count_fds(), fds);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(read_faults),
		cmocka_unit_test(release_on_two_gpus),
		cmocka_unit_test(header_eio),
		cmocka_unit_test(slab_over_device),
		cmocka_unit_test(slab_full_at_prefetch),
		cmocka_unit_test(slab_fragmented_at_prefetch),
		cmocka_unit_test(pool_over_memory),
		cmocka_unit_test(pool_population_fails),
		cmocka_unit_test(pool_waits_for_loads),
		cmocka_unit_test(pool_stopped),
		cmocka_unit_test(pool_population_yields),
		cmocka_unit_test(pool_hugepages_short),
	};

	setenv("AEGAEON_HOST_GPUS", "1", 1);
	fault_off();
	return cmocka_run_group_tests(tests, NULL, NULL);
}

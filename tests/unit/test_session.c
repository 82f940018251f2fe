/* Sessions on the host backend: the same load, find, wait and release in a process and through a real agent. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
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

#include "internal.h"
#include "pinned_internal.h"
#include "prefetch_internal.h"
#include "testutil.h"
#include "agentutil.h"

#define KiB 1024ull
#define MiB (1024ull * 1024ull)

struct fx {
	char dir[64];
	char raw[128], st[128], st_bin[128];
	unsigned char *raw_bytes, *st_bytes;
	uint64_t raw_size, st_size;
	struct agent agent;
	enum aeg_session_mode mode;
	int fds;
};

static const uint64_t st_sizes[] = { 100 * KiB, 3 * MiB + 17, 4096, 0, 700 * KiB };

static int setup_files(struct fx *f)
{
	strcpy(f->dir, "/tmp/aeg-session-XXXXXX");
	if (mkdtemp(f->dir) == NULL)
		return -1;
	snprintf(f->raw, sizeof(f->raw), "%s/weights.bin", f->dir);
	snprintf(f->st, sizeof(f->st), "%s/model.safetensors", f->dir);
	f->raw_size = 5 * MiB + 123;
	f->raw_bytes = test_pattern(f->raw_size, 3);
	test_write_file(f->raw, f->raw_bytes, f->raw_size);
	f->st_bytes = test_st_file(f->st, st_sizes, (int)AEG_ARRAY_SIZE(st_sizes), &f->st_size);
	/* The same bytes under a name that does not say safetensors. */
	snprintf(f->st_bin, sizeof(f->st_bin), "%s/pytorch_weights.bin", f->dir);
	test_write_file(f->st_bin, f->st_bytes, f->st_size);
	return 0;
}

static int setup_local(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));

	if (f == NULL || setup_files(f))
		return -1;
	session_env_local("2", "64MiB");
	f->mode = AEG_SESSION_LOCAL;
	f->fds = count_fds();
	*state = f;
	return 0;
}

static int setup_job(void **state)
{
	static const char *const opts[] = { "--slab", "64MiB", "--pinned", "8MiB:1MiB", NULL };
	struct fx *f = calloc(1, sizeof(*f));

	if (f == NULL || setup_files(f))
		return -1;
	session_env_job(&f->agent, opts);
	f->mode = AEG_SESSION_JOB;
	f->fds = count_fds();
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;
	int err = session_env_end(&f->agent, f->dir, f->fds);

	free(f->raw_bytes);
	free(f->st_bytes);
	free(f);
	return err;
}

static aeg_session_t *open_session(struct fx *f)
{
	struct aeg_session_config cfg = { .mode = f->mode };
	aeg_session_t *s = NULL;

	assert_int_equal(aeg_session_open(&cfg, &s), 0);
	assert_int_equal(aeg_session_mode(s), f->mode);
	return s;
}

/* Every chunk holds its file range; together they tile the part of the file loaded. */
static void check_model(aeg_model_t *m, const unsigned char *file, uint64_t from, uint64_t size)
{
	const struct aeg_chunk *c;
	uint32_t n;
	uint64_t pos = from;

	c = aeg_model_chunks(m, &n);
	assert_true(n > 0);
	for (uint32_t i = 0; i < n; i++) {
		assert_int_equal(c[i].file_offset, pos);
		assert_non_null(c[i].device_ptr);
		assert_memory_equal(c[i].device_ptr, file + c[i].file_offset, c[i].size);
		pos += c[i].size;
	}
	assert_int_equal(pos, size);
}

static void load_wait_release(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 0, .chunk_bytes = 1 * MiB };
	struct aeg_load_progress p;
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	uint32_t n, released = 0;

	assert_int_equal(aeg_session_gpu_count(s), f->mode == AEG_SESSION_LOCAL ? 2 : 1);
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_owned(m), 1);
	assert_true(aeg_model_id(m) > 0);
	assert_int_equal(aeg_model_gpu(m), 0);
	assert_string_equal(aeg_model_path(m), f->raw);
	aeg_model_chunks(m, &n);
	assert_int_equal(n, 6);
	for (uint32_t i = 0; i < n; i++)
		assert_int_equal(aeg_model_wait_chunk(m, i, 10000), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	check_model(m, f->raw_bytes, 0, f->raw_size);
	assert_int_equal(aeg_model_wait_chunk(m, n, 0), AEG_EINVAL);
	aeg_model_tensors(m, &n);
	assert_int_equal(n, 0);
	assert_int_equal(aeg_model_progress(m, &p), 0);
	assert_int_equal(p.status, 0);
	assert_int_equal(p.done_bytes, f->raw_size);
	aeg_model_close(m);
	assert_int_equal(aeg_session_release_all(s, 0, &released), 0);
	assert_int_equal(released, 6);
	/* Nothing of it is resident any more. */
	assert_int_equal(aeg_session_find(s, f->raw, 0, &m), AEG_ENOENT);
	aeg_session_close(s);
}

/* Safetensors by content: the same tensors and metadata whatever the file is called. */
static void safetensors_tensors(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->st, .gpu = -1, .chunk_bytes = 1 * MiB };
	const char *const *keys, *const *values;
	const struct aeg_tensor *t;
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	uint32_t n;

	for (int named = 0; named < 2; named++) {
		req.path = named ? f->st : f->st_bin;
		assert_int_equal(aeg_session_load(s, &req, &m), 0);
		assert_int_equal(aeg_model_metadata(m, &keys, &values), 1);
		assert_string_equal(keys[0], "format");
		assert_string_equal(values[0], "pt");
		if (!named) {
			aeg_model_tensors(m, &n);
			assert_int_equal(n, AEG_ARRAY_SIZE(st_sizes));
			assert_int_equal(aeg_model_release(m), 0);
		}
	}
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	t = aeg_model_tensors(m, &n);
	assert_int_equal(n, AEG_ARRAY_SIZE(st_sizes));
	for (uint32_t i = 0; i < n; i++) {
		char name[8];

		snprintf(name, sizeof(name), "t%u", i);
		assert_string_equal(t[i].name, name);
		assert_string_equal(t[i].dtype, "U8");
		assert_int_equal(t[i].ndim, 1);
		assert_int_equal(t[i].shape[0], st_sizes[i]);
		assert_int_equal(t[i].size, st_sizes[i]);
		if (t[i].size > 0) {
			assert_non_null(t[i].device_ptr);
			assert_memory_equal(t[i].device_ptr, f->st_bytes + t[i].file_offset, t[i].size);
		}
	}
	assert_int_equal(aeg_model_release(m), 0);
	assert_int_equal(aeg_session_find(s, f->st, -1, &m), AEG_ENOENT);
	aeg_session_close(s);
}

/* REUSE finds a resident load of the same file (not owned); without it a second load is made. */
static void reuse_and_find(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 0, .chunk_bytes = 1 * MiB };
	aeg_session_t *s = open_session(f);
	aeg_model_t *a = NULL, *b = NULL, *c = NULL, *d = NULL;

	assert_int_equal(aeg_session_load(s, &req, &a), 0);
	req.flags = AEG_LOAD_REUSE;
	assert_int_equal(aeg_session_load(s, &req, &b), 0);
	assert_int_equal(aeg_model_id(b), aeg_model_id(a));
	assert_int_equal(aeg_model_owned(b), 0);
	req.flags = 0;
	assert_int_equal(aeg_session_load(s, &req, &c), 0);
	assert_int_not_equal(aeg_model_id(c), aeg_model_id(a));
	assert_int_equal(aeg_session_find_id(s, aeg_model_id(a), &d), 0);
	assert_int_equal(aeg_model_wait(d, 10000), 0);
	check_model(d, f->raw_bytes, 0, f->raw_size);
	aeg_model_close(d);
	/* Closing a handle keeps the chunks; releasing frees them for every holder. */
	aeg_model_close(b);
	assert_int_equal(aeg_model_wait(a, 10000), 0);
	check_model(a, f->raw_bytes, 0, f->raw_size);
	assert_int_equal(aeg_model_release(a), 0);
	assert_int_equal(aeg_session_find_id(s, aeg_model_id(c), &d), 0);
	aeg_model_close(d);
	assert_int_equal(aeg_model_wait(c, 10000), 0);
	assert_int_equal(aeg_model_release(c), 0);
	assert_int_equal(aeg_session_find(s, f->raw, 0, &d), AEG_ENOENT);
	aeg_session_close(s);
}

/* By block id: a load still in flight is waited for; every id is checked before any is freed. */
static void release_by_ids(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 0, .chunk_bytes = 1 * MiB };
	const struct aeg_chunk *c;
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	uint64_t ids[8], bogus[2];
	uint32_t n, k = 0, released = 0;

	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++)
		ids[k++] = c[i].slab_id;
	ids[k++] = c[0].slab_id;                /* a repeat counts once */
	bogus[0] = c[0].slab_id;
	bogus[1] = 999999;
	assert_int_equal(aeg_session_release(s, -1, bogus, 2, -1, NULL), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "999999"));
	assert_int_equal(aeg_session_release(s, -1, ids, k, 10000, &released), 0);
	assert_int_equal(released, n);
	assert_int_equal(aeg_session_release(s, -1, ids, 1, -1, NULL), AEG_ENOENT);
	aeg_model_close(m);
	aeg_session_close(s);
}

static void bad_requests(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 0, .chunk_bytes = 1000 };
	struct aeg_session_config bad = { .mode = 7 };
	aeg_session_t *s = open_session(f), *t = NULL;
	aeg_model_t *m = NULL;
	uint64_t zero = 0;
	char missing[160];

	assert_int_equal(aeg_session_open(&bad, &t), AEG_EINVAL);
	assert_null(t);
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "multiple of 4 KiB"));
	req.chunk_bytes = 1 * MiB;
	req.gpu = 5;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_ENODEV);
	req.gpu = 0;
	snprintf(missing, sizeof(missing), "%s/missing.safetensors", f->dir);
	req.path = missing;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_ENOENT);
	req.path = "";
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_EINVAL);
	/* A directory without a model in it. */
	snprintf(missing, sizeof(missing), "%s/empty", f->dir);
	assert_int_equal(mkdir(missing, 0700), 0);
	req.path = missing;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "no model in it"));
	assert_int_equal(rmdir(missing), 0);
	req.path = f->raw;
	req.flags = 0x80;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_EINVAL);
	assert_null(m);
	assert_int_equal(aeg_session_release(s, -1, &zero, 1, 0, NULL), AEG_EINVAL);
	assert_int_equal(aeg_session_release_all(s, 0x10, NULL), AEG_EINVAL);
	assert_int_equal(aeg_session_find_id(s, 0, &m), AEG_EINVAL);
	assert_int_equal(aeg_session_find_id(s, 424242, &m), AEG_ENOENT);
	assert_int_equal(aeg_session_prepare(s, 9), AEG_ENODEV);
	aeg_session_close(s);
}

/* A local session makes its engine once: later loads reuse the slab, and release_all keeps it. */
static void local_engine_kept(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 1, .chunk_bytes = 1 * MiB };
	struct aeg_span spans[AEG_SPANS_MAX];
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	void *first;
	int n, made = 0;

	aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	assert_int_equal(aeg_session_prepare(s, 1), 0);
	n = aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	/* Ahead of need: the staging ring too. */
	for (int i = 0; i < n; i++)
		made += strcmp(spans[i].name, "slab create") == 0 || strcmp(spans[i].name, "engine create") == 0 ||
			strcmp(spans[i].name, "pool create") == 0;
	assert_int_equal(made, 3);
	assert_int_equal(aeg_session_prepare(s, 1), 0);
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	first = aeg_model_chunks(m, NULL)->device_ptr;
	aeg_model_close(m);
	assert_int_equal(aeg_session_release_all(s, 0, NULL), 0);
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	/* The same slab, so the same first block. */
	assert_ptr_equal(aeg_model_chunks(m, NULL)->device_ptr, first);
	check_model(m, f->raw_bytes, 0, f->raw_size);
	n = aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	for (int i = 0; i < n; i++)
		assert_string_not_equal(spans[i].name, "slab create");
	aeg_model_close(m);
	aeg_session_close(s);
}

/* The span @name of @spans (the last of that name), or fail. */
static const struct aeg_span *span_named(const struct aeg_span *spans, int n, const char *name)
{
	const struct aeg_span *found = NULL;

	for (int i = 0; i < n; i++)
		if (strcmp(spans[i].name, name) == 0)
			found = &spans[i];
	if (found == NULL)
		fail_msg("no span \"%s\" among the %d taken", name, n);
	return found;
}

/*
 * A fresh session's first load starts before its engine's staging ring is
 * made: the start (mapping the file, making events) does not wait behind
 * the ring's page population; the load gets the ring at its first buffer,
 * completes through it, and the rest of the slab is mapped after that.
 */
static void ring_after_first_start(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 0, .chunk_bytes = 1 * MiB };
	struct aeg_span spans[AEG_SPANS_MAX];
	const struct aeg_span *start, *ring, *usable, *map;
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	int n;

	aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	check_model(m, f->raw_bytes, 0, f->raw_size);
	aeg_model_close(m);
	aeg_session_close(s);       /* joins the ring's thread: its span is in */
	n = aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	start = span_named(spans, n, "prefetch start");
	ring = span_named(spans, n, "pool create");
	assert_true(ring->start_ns >= start->start_ns + start->ns);
	/* The load had the ring from its first buffer on, before the ring was made. */
	usable = span_named(spans, n, "pool usable");
	assert_int_equal(usable->start_ns, ring->start_ns);
	assert_true(usable->ns <= ring->ns);
	/* The slab's addresses were reserved; the ring's thread mapped its memory once the ring was made. */
	map = span_named(spans, n, "slab map");
	assert_true(map->start_ns >= ring->start_ns + ring->ns);
}

/*
 * aeg_session_warm_up: outside a job the first engine's staging ring is
 * faulted in before the session opens; that engine's ring takes it, and a
 * session closed without an engine gives it back. Nothing is made for a
 * job, a pool of the caller's or $AEGAEON_RING_AHEAD=0; a bad value fails.
 */
static void ring_made_ahead(void **state)
{
	static const struct {
		enum aeg_session_mode mode;
		uint64_t pool_bytes;
		const char *env;
	} none[] = {
		{ AEG_SESSION_JOB, 0, NULL },
		{ AEG_SESSION_LOCAL, 8 * MiB, NULL },
		{ AEG_SESSION_LOCAL, 0, "0" },
	};
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->raw, .gpu = 0, .chunk_bytes = 1 * MiB };
	struct aeg_span spans[AEG_SPANS_MAX];
	struct aeg_session_config cfg = { .mode = AEG_SESSION_LOCAL };
	aeg_session_t *s;
	aeg_model_t *m = NULL;
	char *conf;
	uint64_t bytes;
	int n;

	setenv("AEGAEON_PINNED_HUGEPAGES", "never", 1);
	assert_int_equal(aeg_session_warm_up(NULL), 0);
	bytes = aeg_pool_premade(NULL, NULL);
	assert_true(bytes > 0);
	s = open_session(f);
	aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	check_model(m, f->raw_bytes, 0, f->raw_size);
	aeg_model_close(m);
	aeg_session_close(s);       /* joins the ring's thread */
	n = aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	assert_true(span_named(spans, n, "pool ahead")->start_ns >= span_named(spans, n, "prefetch start")->start_ns);
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);

	/* A session closed without an engine gives it back. */
	assert_int_equal(aeg_session_warm_up(&cfg), 0);
	assert_int_equal(aeg_pool_premade(NULL, NULL), bytes);
	aeg_session_close(open_session(f));
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);

	/* A site config that cannot be read: nothing made, and no error until the session opens. */
	conf = getenv("AEGAEON_CONFIG") ? strdup(getenv("AEGAEON_CONFIG")) : NULL;
	setenv("AEGAEON_CONFIG", "/nonexistent/aegaeon.conf", 1);
	assert_int_equal(aeg_session_warm_up(NULL), 0);
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	s = NULL;
	assert_int_equal(aeg_session_open(NULL, &s), AEG_ENOENT);
	assert_null(s);
	if (conf != NULL)
		setenv("AEGAEON_CONFIG", conf, 1);
	else
		unsetenv("AEGAEON_CONFIG");
	free(conf);

	for (size_t i = 0; i < AEG_ARRAY_SIZE(none); i++) {
		struct aeg_session_config c = { .mode = none[i].mode, .pool_bytes = none[i].pool_bytes };

		if (none[i].env != NULL)
			setenv("AEGAEON_RING_AHEAD", none[i].env, 1);
		assert_int_equal(aeg_session_warm_up(&c), 0);
		assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
		unsetenv("AEGAEON_RING_AHEAD");
	}
	setenv("AEGAEON_RING_AHEAD", "yes", 1);
	assert_int_equal(aeg_session_warm_up(NULL), AEG_EINVAL);
	assert_string_equal(aeg_error_detail(), "AEGAEON_RING_AHEAD='yes' is not 0 or 1");
	assert_int_equal(aeg_pool_premade(NULL, NULL), 0);
	unsetenv("AEGAEON_RING_AHEAD");
	unsetenv("AEGAEON_PINNED_HUGEPAGES");
}

/*
 * A model as save_pretrained leaves it: a directory of shards and an index.
 * Loaded by its directory or its index, it is every shard's tensors, each
 * where its file says; one tensor can be waited for alone.
 */
static void model_directory(void **state)
{
	static const uint64_t a[] = { 300 * KiB, 5000 }, b[] = { 2 * MiB + 3, 4096, 12 }, c[] = { 70000 };
	struct fx *f = *state;
	struct aeg_load_request req = { .gpu = 0, .chunk_bytes = 1 * MiB };
	const uint64_t *sizes[] = { a, b, c };
	const int counts[] = { 2, 3, 1 };
	const char *prefix[] = { "a", "b", "c" };
	unsigned char *bytes[3];
	char dir[160], path[200], index[200];
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL, *found = NULL;
	FILE *idx;

	snprintf(dir, sizeof(dir), "%s/llama", f->dir);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(index, sizeof(index), "%s/model.safetensors.index.json", dir);
	idx = fopen(index, "w");
	assert_non_null(idx);
	fprintf(idx, "{\"metadata\": {\"total_size\": 1}, \"weight_map\": {");
	for (int i = 0; i < 3; i++) {
		uint64_t size;

		snprintf(path, sizeof(path), "%s/model-0000%d-of-00003.safetensors", dir, i + 1);
		bytes[i] = test_st_file_named(path, prefix[i], sizes[i], counts[i], &size);
		for (int t = 0; t < counts[i]; t++)
			fprintf(idx, "%s\"%s%d\": \"model-0000%d-of-00003.safetensors\"", i + t ? ", " : "", prefix[i],
				t, i + 1);
	}
	fprintf(idx, "}}\n");
	assert_int_equal(fclose(idx), 0);

	for (int by_index = 0; by_index < 2; by_index++) {
		const struct aeg_tensor *t;
		uint32_t n;

		req.path = by_index ? index : dir;
		assert_int_equal(aeg_session_load(s, &req, &m), 0);
		assert_int_equal(aeg_model_file_count(m), 3);
		assert_non_null(strstr(aeg_model_file(m, 2), "model-00003-of-00003.safetensors"));
		assert_null(aeg_model_file(m, 3));
		assert_int_equal(aeg_model_wait_tensor(m, "b0", 10000), 0);
		assert_int_equal(aeg_model_wait_tensor(m, "nope", 0), AEG_ENOENT);
		assert_int_equal(aeg_model_wait(m, 10000), 0);
		t = aeg_model_tensors(m, &n);
		assert_int_equal(n, 6);
		for (uint32_t i = 0; i < n; i++) {
			const struct aeg_chunk *ch = &aeg_model_chunks(m, NULL)[t[i].first_chunk];

			assert_int_equal(ch->file, t[i].file);
			assert_true(t[i].file_offset >= ch->file_offset);
			if (t[i].size)
				assert_memory_equal(t[i].device_ptr, bytes[t[i].file] + t[i].file_offset, t[i].size);
		}
		/* Found again by the directory (another step would). */
		assert_int_equal(aeg_session_find(s, dir, 0, &found), 0);
		assert_int_equal(aeg_model_owned(found), 0);
		aeg_model_tensors(found, &n);
		assert_int_equal(n, 6);
		aeg_model_close(found);
		assert_int_equal(aeg_model_release(m), 0);
		assert_int_equal(aeg_session_find(s, dir, 0, &found), AEG_ENOENT);
	}
	/* One shard resident already: the directory's model reuses it and loads the others, so it is owned. */
	snprintf(path, sizeof(path), "%s/model-00001-of-00003.safetensors", dir);
	req.path = path;
	assert_int_equal(aeg_session_load(s, &req, &found), 0);
	req.path = dir;
	req.flags = AEG_LOAD_REUSE;
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_owned(m), 1);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	assert_int_equal(aeg_model_release(m), 0);
	aeg_model_close(found);
	assert_int_equal(aeg_session_owned_blocks(s), 0);
	req.flags = 0;

	/* A shard the index names is missing: nothing stays loaded. */
	snprintf(path, sizeof(path), "%s/model-00003-of-00003.safetensors", dir);
	assert_int_equal(unlink(path), 0);
	req.path = dir;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "model-00003-of-00003.safetensors"));
	assert_int_equal(aeg_session_owned_blocks(s), 0);
	for (int i = 0; i < 3; i++)
		free(bytes[i]);
	aeg_session_close(s);
}

struct prepare_call {
	aeg_session_t *s;
	int err, done;
};

static void *prepare_thread(void *arg)
{
	struct prepare_call *p = arg;

	p->err = aeg_session_prepare(p->s, 0);
	__atomic_store_n(&p->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

struct load_call {
	aeg_session_t *s;
	struct aeg_load_request req;
	int err, done;
};

static void *load_thread(void *arg)
{
	struct load_call *c = arg;
	aeg_model_t *m = NULL;

	c->err = aeg_session_load(c->s, &c->req, &m);
	if (c->err == 0) {
		c->err = aeg_model_wait(m, 10000);
		aeg_model_release(m);
	}
	__atomic_store_n(&c->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/*
 * aeg_session_prepare waits for the staging ring, not for the process's
 * loads: the ring's thread maps the rest of the slab only once no load
 * runs, and prepare used to wait for that holding the session's lock, so
 * a load of many files, which holds its engine while it takes that lock
 * for each file, never ended (nor did prepare). Here another engine's load
 * stays in flight (held) while prepare and a load of a directory of
 * shards run beside each other; both end. Bounded: after 10 s the held
 * load goes on, so the test fails instead of hanging.
 */
static void prepare_beside_loads(void **state)
{
	static const uint64_t a[] = { 300 * KiB }, b[] = { 70000, 12 };
	struct fx *f = *state;
	struct aeg_prefetch_options opts = { .chunk_bytes = 1 * MiB };
	struct aeg_prefetch_config cfg;
	struct prepare_call p = { .s = NULL };
	struct load_call c = { .req = { .gpu = 0, .chunk_bytes = 1 * MiB } };
	unsigned char *bytes[2];
	char dir[160], path[200];
	aeg_device_t *dev = NULL;
	aeg_slab_t *slab = NULL;
	aeg_prefetch_t *pf = NULL;
	aeg_load_t *l = NULL;
	pthread_t pt, lt;
	uint64_t size;
	int done = 0;

	snprintf(dir, sizeof(dir), "%s/shards", f->dir);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(path, sizeof(path), "%s/a.safetensors", dir);
	bytes[0] = test_st_file_named(path, "a", a, 1, &size);
	snprintf(path, sizeof(path), "%s/b.safetensors", dir);
	bytes[1] = test_st_file_named(path, "b", b, 2, &size);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	assert_int_equal(aeg_slab_create(dev, 0, 16 * MiB, &slab), 0);
	aeg_prefetch_config_defaults(&cfg);
	cfg.threads = 2;
	assert_int_equal(aeg_prefetch_create(slab, NULL, &cfg, &pf), 0);
	assert_int_equal(aeg_prefetch_hold(pf, 1), 0);
	assert_int_equal(aeg_prefetch_file(pf, f->raw, &opts, &l), 0);
	assert_true(aeg_loads_active() > 0);

	p.s = c.s = open_session(f);
	c.req.path = dir;
	assert_int_equal(pthread_create(&pt, NULL, prepare_thread, &p), 0);
	assert_int_equal(pthread_create(&lt, NULL, load_thread, &c), 0);
	for (int i = 0; i < 1000 && !done; i++) {
		usleep(10000);
		done = __atomic_load_n(&p.done, __ATOMIC_ACQUIRE) && __atomic_load_n(&c.done, __ATOMIC_ACQUIRE);
	}
	aeg_prefetch_hold(pf, 0);
	pthread_join(pt, NULL);
	pthread_join(lt, NULL);
	assert_int_equal(aeg_load_wait(l, 10000), 0);
	assert_int_equal(aeg_load_release(l), 0);
	aeg_load_close(l);
	aeg_prefetch_destroy(pf);
	aeg_slab_destroy(slab);
	aeg_device_close(dev);
	for (int i = 0; i < 2; i++)
		free(bytes[i]);
	if (!done) {
		aeg_session_close(p.s);
		fail_msg("aeg_session_prepare and a load beside it waited 10 s for another engine's load");
	}
	assert_int_equal(p.err, 0);
	assert_int_equal(c.err, 0);
	aeg_session_close(p.s);
}

/*
 * An index naming a shard that is neither called *.safetensors nor one: the
 * load fails naming it and leaves nothing loaded. Through a job's agent,
 * which takes such a file for raw bytes and loads it, that load is given
 * back too (it was left in the job's slab, owned by no one).
 */
static void index_bad_shard(void **state)
{
	static const uint64_t g[] = { 8 * KiB };
	struct fx *f = *state;
	struct aeg_load_request req = { .gpu = 0, .chunk_bytes = 1 * MiB };
	char dir[160], path[200];
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	unsigned char *good;
	uint64_t size;
	FILE *idx;

	snprintf(dir, sizeof(dir), "%s/mixed", f->dir);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(path, sizeof(path), "%s/good.safetensors", dir);
	good = test_st_file_named(path, "g", g, 1, &size);
	snprintf(path, sizeof(path), "%s/weights.bin", dir);
	test_write_file(path, f->raw_bytes, f->raw_size);
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	idx = fopen(path, "w");
	assert_non_null(idx);
	fprintf(idx, "{\"weight_map\": {\"g0\": \"good.safetensors\", \"w\": \"weights.bin\"}}\n");
	assert_int_equal(fclose(idx), 0);

	req.path = dir;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_EFORMAT);
	assert_non_null(strstr(aeg_error_detail(), "mixed/weights.bin: safetensors: "));
	assert_int_equal(aeg_session_owned_blocks(s), 0);
	snprintf(path, sizeof(path), "%s/weights.bin", dir);
	assert_int_equal(aeg_session_find(s, path, -1, &m), AEG_ENOENT);
	if (f->mode == AEG_SESSION_JOB) {
		struct aeg_job_status *st;

		assert_int_equal(aeg_job_status(aeg_session_job(s), &st), 0);
		assert_int_equal(st->loads, 0);
		assert_int_equal(st->slab[0].stats.blocks, 0);
		aeg_job_status_free(st);
	}
	free(good);
	aeg_session_close(s);
}

static void on_alarm(int sig)
{
	(void)sig;
}

/*
 * What a directory's shard index is named but is no file (a FIFO, a
 * directory) is an error naming it, at once: a FIFO was opened for reading
 * and waited for a writer forever. (An alarm without SA_RESTART interrupts
 * such a wait, so the test fails instead of hanging.) An index that is a
 * symbolic link to a file, as in the Hugging Face cache, is read through it.
 */
static void index_not_a_file(void **state)
{
	static const uint64_t w[] = { 4 * KiB, 100 };
	struct fx *f = *state;
	struct aeg_load_request req = { .gpu = 0, .chunk_bytes = 1 * MiB };
	struct sigaction sa = { .sa_handler = on_alarm }, old;
	char dir[160], index[200], blob[200], path[200];
	aeg_session_t *s = open_session(f);
	aeg_model_t *m = NULL;
	unsigned char *bytes;
	unsigned left;
	uint64_t size;
	FILE *idx;
	int err;

	snprintf(dir, sizeof(dir), "%s/snapshot", f->dir);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(path, sizeof(path), "%s/model-00001-of-00001.safetensors", dir);
	bytes = test_st_file_named(path, "w", w, 2, &size);
	snprintf(index, sizeof(index), "%s/model.safetensors.index.json", dir);
	req.path = dir;

	for (int dir_not_fifo = 0; dir_not_fifo < 2; dir_not_fifo++) {
		assert_int_equal(dir_not_fifo ? mkdir(index, 0700) : mkfifo(index, 0600), 0);
		assert_int_equal(sigaction(SIGALRM, &sa, &old), 0);
		alarm(5);
		err = aeg_session_load(s, &req, &m);
		left = alarm(0);
		sigaction(SIGALRM, &old, NULL);
		if (left == 0)
			fail_msg("%s: loading waited 5 s on the index", dir_not_fifo ? "a directory" : "a FIFO");
		assert_int_equal(err, AEG_EINVAL);
		assert_non_null(strstr(aeg_error_detail(), "model.safetensors.index.json: not a regular file"));
		assert_int_equal(dir_not_fifo ? rmdir(index) : unlink(index), 0);
	}

	snprintf(blob, sizeof(blob), "%s/blob.json", f->dir);
	idx = fopen(blob, "w");
	assert_non_null(idx);
	fprintf(idx, "{\"weight_map\": {\"w0\": \"model-00001-of-00001.safetensors\", "
		"\"w1\": \"model-00001-of-00001.safetensors\"}}\n");
	assert_int_equal(fclose(idx), 0);
	assert_int_equal(symlink(blob, index), 0);
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_file_count(m), 1);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	assert_int_equal(aeg_model_release(m), 0);
	free(bytes);
	aeg_session_close(s);
}

/* A job session waits for a whole load with one request: a failed load says why. */
static void job_wait_one_request(void **state)
{
	struct fx *f = *state;
	struct aeg_load_request req = { .path = f->st, .gpu = 0, .chunk_bytes = 1 * MiB };
	aeg_session_t *s = open_session(f), *t = NULL;
	aeg_model_t *m = NULL, *found = NULL;

	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	/* Another process of the job (here, a second session) finds it and its tensors. */
	assert_int_equal(aeg_session_open(NULL, &t), 0);
	assert_int_equal(aeg_session_mode(t), AEG_SESSION_JOB);
	assert_int_equal(aeg_session_find(t, f->st, 0, &found), 0);
	assert_int_equal(aeg_model_owned(found), 0);
	assert_int_equal(aeg_model_id(found), aeg_model_id(m));
	assert_int_equal(aeg_model_wait(found, 10000), 0);
	{
		uint32_t n;
		const struct aeg_tensor *tt = aeg_model_tensors(found, &n);

		assert_int_equal(n, AEG_ARRAY_SIZE(st_sizes));
		for (uint32_t i = 0; i < n; i++)
			if (tt[i].size)
				assert_memory_equal(tt[i].device_ptr, f->st_bytes + tt[i].file_offset, tt[i].size);
	}
	aeg_model_close(found);
	/* A second session's release_all frees only its own loads. */
	assert_int_equal(aeg_session_release_all(t, 0, NULL), 0);
	assert_int_equal(aeg_session_find(t, f->st, 0, &found), 0);
	aeg_model_close(found);
	aeg_session_close(t);
	assert_int_equal(aeg_model_release(m), 0);
	aeg_session_open(NULL, &t);
	assert_int_equal(aeg_session_find(t, f->st, 0, &found), AEG_ENOENT);
	aeg_session_close(t);
	/* A load the agent does not hold cannot be waited on. */
	assert_int_equal(aeg_job_wait(aeg_session_job(s), 999999, 1000), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "no load 999999"));
	/* release_all with AEG_RELEASE_JOB frees every load of the job. */
	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, 10000), 0);
	aeg_model_close(m);
	aeg_session_open(NULL, &t);
	req.flags = 0;
	assert_int_equal(aeg_session_load(t, &req, &found), 0);
	aeg_model_close(found);
	assert_int_equal(aeg_session_release_all(s, AEG_RELEASE_JOB, NULL), 0);
	assert_int_equal(aeg_session_find(t, f->st, 0, &found), AEG_ENOENT);
	aeg_session_close(t);
	aeg_session_close(s);
}

int main(void)
{
	const struct CMUnitTest local[] = {
		cmocka_unit_test_setup_teardown(load_wait_release, setup_local, teardown),
		cmocka_unit_test_setup_teardown(safetensors_tensors, setup_local, teardown),
		cmocka_unit_test_setup_teardown(reuse_and_find, setup_local, teardown),
		cmocka_unit_test_setup_teardown(release_by_ids, setup_local, teardown),
		cmocka_unit_test_setup_teardown(bad_requests, setup_local, teardown),
		cmocka_unit_test_setup_teardown(ring_after_first_start, setup_local, teardown),
		cmocka_unit_test_setup_teardown(local_engine_kept, setup_local, teardown),
		cmocka_unit_test_setup_teardown(model_directory, setup_local, teardown),
		cmocka_unit_test_setup_teardown(ring_made_ahead, setup_local, teardown),
		cmocka_unit_test_setup_teardown(prepare_beside_loads, setup_local, teardown),
		cmocka_unit_test_setup_teardown(index_bad_shard, setup_local, teardown),
		cmocka_unit_test_setup_teardown(index_not_a_file, setup_local, teardown),
	};
	const struct CMUnitTest job[] = {
		cmocka_unit_test_setup_teardown(load_wait_release, setup_job, teardown),
		cmocka_unit_test_setup_teardown(safetensors_tensors, setup_job, teardown),
		cmocka_unit_test_setup_teardown(reuse_and_find, setup_job, teardown),
		cmocka_unit_test_setup_teardown(release_by_ids, setup_job, teardown),
		cmocka_unit_test_setup_teardown(bad_requests, setup_job, teardown),
		cmocka_unit_test_setup_teardown(job_wait_one_request, setup_job, teardown),
		cmocka_unit_test_setup_teardown(model_directory, setup_job, teardown),
		cmocka_unit_test_setup_teardown(index_bad_shard, setup_job, teardown),
	};
	int failed = cmocka_run_group_tests_name("local session", local, NULL, NULL);

	return failed + cmocka_run_group_tests_name("job session", job, NULL, NULL);
}

/* Tensor-parallel slices on the host backend: every rank's part checked against the file, in a process and through an agent. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
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
#include <aegaeon/slice.h>

#include "internal.h"
#include "testutil.h"
#include "agentutil.h"

#define KiB 1024ull
#define MiB (1024ull * 1024ull)

struct spec {
	const char *name, *dtype;
	unsigned bytes;                 /* per element */
	int ndim;
	uint64_t shape[4];
};

/*
 * A decoder layer's names as Hugging Face writes them; every split extent
 * is a multiple of 24, so worlds of 1, 2, 3, 4 and 8 divide them all.
 */
static const struct spec model[] = {
	{ "model.embed_tokens.weight", "BF16", 2, 2, { 96, 48 } },
	{ "model.layers.0.input_layernorm.weight", "F32", 4, 1, { 48 } },
	{ "model.layers.0.self_attn.q_proj.weight", "BF16", 2, 2, { 192, 48 } },
	{ "model.layers.0.self_attn.q_proj.bias", "BF16", 2, 1, { 192 } },
	{ "model.layers.0.self_attn.o_proj.weight", "BF16", 2, 2, { 48, 192 } },
	{ "model.layers.0.self_attn.o_proj.bias", "BF16", 2, 1, { 48 } },
	{ "model.layers.0.mlp.down_proj.weight", "F32", 4, 2, { 48, 2400 } },
	{ "model.layers.0.mlp.experts.3.w2.weight", "F16", 2, 3, { 4, 24, 72 } },
	{ "model.layers.0.mlp.gate_proj.weight", "I8", 1, 2, { 240, 1000 } },
	{ "model.layers.0.mlp.up_proj.weight", "F32", 4, 3, { 24, 4, 48 } },
	{ "model.layers.0.empty", "F32", 4, 2, { 0, 24 } },
	{ "model.layers.0.scale", "F32", 4, 0, { 0 } },
	{ "model.norm.weight", "F32", 4, 1, { 48 } },
	{ "lm_head.weight", "BF16", 2, 2, { 96, 48 } },
};
#define NT ((int)AEG_ARRAY_SIZE(model))

/* The megatron preset's dim for each tensor above, and up_proj's by the test's rule (dim 2). */
static const int model_dim[NT] = { 0, -1, 0, 0, 1, -1, 1, 1, 0, 2, -1, -1, -1, 0 };
/* The preset's alone, without the test's rule: up_proj by its rows. */
static const int megatron_dim[NT] = { 0, -1, 0, 0, 1, -1, 1, 1, 0, 0, -1, -1, -1, 0 };
static const struct aeg_slice_rule up_rule[] = { { "*.up_proj.weight", 2 } };

struct fx {
	char dir[64], path[128], shards[128];
	unsigned char *file;
	uint64_t file_bytes, data_offset;
	uint64_t offset[NT];            /* each tensor's data in the file */
	struct agent agent;
	enum aeg_session_mode mode;
	int fds;
};

static uint64_t nelem(const struct spec *t)
{
	uint64_t n = 1;

	for (int i = 0; i < t->ndim; i++)
		n *= t->shape[i];
	return n;
}

/* A safetensors file of @specs[first..first+n) with pattern bytes; the tensors' data offsets into @offset. */
static unsigned char *write_model(const char *path, const struct spec *specs, int n, uint64_t *bytes,
				  uint64_t *data_offset, uint64_t *offset)
{
	char json[8192];
	size_t h = (size_t)snprintf(json, sizeof(json), "{\"__metadata__\":{\"format\":\"pt\"}");
	uint64_t data = 0;
	unsigned char *file, *pattern;

	for (int i = 0; i < n; i++) {
		uint64_t len = nelem(&specs[i]) * specs[i].bytes;

		h += (size_t)snprintf(json + h, sizeof(json) - h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", specs[i].name,
				      specs[i].dtype);
		for (int d = 0; d < specs[i].ndim; d++)
			h += (size_t)snprintf(json + h, sizeof(json) - h, "%s%llu", d ? "," : "",
					      (unsigned long long)specs[i].shape[d]);
		h += (size_t)snprintf(json + h, sizeof(json) - h, "],\"data_offsets\":[%llu,%llu]}",
				      (unsigned long long)data, (unsigned long long)(data + len));
		offset[i] = data;
		data += len;
	}
	h += (size_t)snprintf(json + h, sizeof(json) - h, "}");
	assert_true(h < sizeof(json) - 8);
	while (h % 8)
		json[h++] = ' ';
	*data_offset = 8 + h;
	*bytes = 8 + h + data;
	file = malloc(*bytes);
	assert_non_null(file);
	for (int i = 0; i < 8; i++)
		file[i] = (unsigned char)((uint64_t)h >> (8 * i));
	memcpy(file + 8, json, h);
	pattern = test_pattern(data, 29);
	memcpy(file + 8 + h, pattern, data);
	free(pattern);
	for (int i = 0; i < n; i++)
		offset[i] += *data_offset;
	test_write_file(path, file, *bytes);
	return file;
}

static int setup_files(struct fx *f)
{
	strcpy(f->dir, "/tmp/aeg-slice-XXXXXX");
	if (mkdtemp(f->dir) == NULL)
		return -1;
	snprintf(f->path, sizeof(f->path), "%s/model.safetensors", f->dir);
	f->file = write_model(f->path, model, NT, &f->file_bytes, &f->data_offset, f->offset);
	return 0;
}

static int setup_local(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));

	if (f == NULL || setup_files(f))
		return -1;
	session_env_local("1", "32MiB");
	f->mode = AEG_SESSION_LOCAL;
	f->fds = count_fds();
	*state = f;
	return 0;
}

static int setup_job(void **state)
{
	static const char *const opts[] = { "--slab", "32MiB", "--pinned", "8MiB:1MiB", NULL };
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

	free(f->file);
	free(f);
	return err;
}

static aeg_session_t *open_session(struct fx *f)
{
	struct aeg_prefetch_config engine;
	struct aeg_session_config cfg = { .mode = f->mode, .engine = &engine };
	aeg_session_t *s = NULL;

	/* Small pieces: many of them per tensor, cut inside rows. */
	aeg_prefetch_config_defaults(&engine);
	engine.threads = 3;
	engine.piece_bytes = 12 * KiB;
	assert_int_equal(aeg_session_open(&cfg, &s), 0);
	return s;
}

/*
 * What rank @rank of @world holds of tensor @t (at @off in @file) split
 * along @dim, computed here from the shape alone: ceil(extent / world) per
 * rank, the last ones less. Its bytes into @out (malloc'd), its extent
 * along @dim into @count and its first index into @start.
 */
static uint64_t expected_part(const unsigned char *file, uint64_t off, const struct spec *t, int dim, int rank,
			      int world, unsigned char **out, uint64_t *start, uint64_t *count)
{
	uint64_t outer = 1, inner = t->bytes, n, block, bytes;
	unsigned char *p;

	if (dim < 0) {
		bytes = nelem(t) * t->bytes;
		*out = malloc(bytes ? bytes : 1);
		memcpy(*out, file + off, bytes);
		*start = *count = 0;
		return bytes;
	}
	for (int i = 0; i < dim; i++)
		outer *= t->shape[i];
	for (int i = dim + 1; i < t->ndim; i++)
		inner *= t->shape[i];
	n = t->shape[dim];
	block = (n + (uint64_t)world - 1) / (uint64_t)world;
	*start = block * (uint64_t)rank < n ? block * (uint64_t)rank : n;
	*count = n - *start < block ? n - *start : block;
	bytes = outer * *count * inner;
	p = *out = malloc(bytes ? bytes : 1);
	for (uint64_t o = 0; o < outer; o++, p += *count * inner)
		memcpy(p, file + off + (o * n + *start) * inner, *count * inner);
	return bytes;
}

/* Every tensor of @m is rank @rank's part, byte for byte; returns the bytes @m holds. */
static uint64_t check_parts(struct fx *f, aeg_model_t *m, const int *dims, int rank, int world)
{
	const struct aeg_tensor *t = NULL;
	const struct aeg_chunk *c;
	uint32_t n, nc;
	uint64_t held = 0;

	assert_int_equal(aeg_model_wait(m, BOUND_MS), 0);
	t = aeg_model_tensors(m, &n);
	c = aeg_model_chunks(m, &nc);
	assert_int_equal(n, NT);
	for (int i = 0; i < NT; i++) {
		unsigned char *want;
		uint64_t start, count, bytes;

		bytes = expected_part(f->file, f->offset[i], &model[i], dims[i], rank, world, &want, &start, &count);
		assert_string_equal(t[i].name, model[i].name);
		assert_int_equal(t[i].ndim, model[i].ndim);
		assert_int_equal(t[i].slice_dim, dims[i]);
		for (int d = 0; d < model[i].ndim; d++)
			assert_int_equal(t[i].shape[d], d == dims[i] ? count : model[i].shape[d]);
		if (dims[i] >= 0) {
			assert_int_equal(t[i].slice_start, start);
			assert_int_equal(t[i].slice_extent, model[i].shape[dims[i]]);
		}
		assert_int_equal(t[i].size, bytes);
		if (bytes) {
			const struct aeg_chunk *last = &c[t[i].first_chunk + t[i].chunks - 1];

			assert_memory_equal(t[i].device_ptr, want, bytes);
			assert_int_equal(f->file[t[i].file_offset], want[0]);
			/* The chunks it names hold it, and waiting for it alone works. */
			assert_true(t[i].chunks >= 1 && t[i].first_chunk + t[i].chunks <= nc);
			assert_true((char *)c[t[i].first_chunk].device_ptr <= (char *)t[i].device_ptr);
			assert_true((char *)last->device_ptr + last->size >= (char *)t[i].device_ptr + bytes);
			assert_int_equal(aeg_model_wait_tensor(m, model[i].name, BOUND_MS), 0);
		}
		held += bytes;
		free(want);
	}
	/* A chunk's file_offset is where its first byte comes from. */
	for (uint32_t k = 0; k < nc; k++)
		assert_int_equal(*(unsigned char *)c[k].device_ptr, f->file[c[k].file_offset]);
	return held;
}

static void no_blocks_left(aeg_session_t *s)
{
	struct aeg_job_status *st;

	assert_int_equal(aeg_session_owned_blocks(s), 0);
	if (aeg_session_mode(s) != AEG_SESSION_JOB)
		return;
	assert_int_equal(aeg_job_status(aeg_session_job(s), &st), 0);
	assert_int_equal(st->loads, 0);
	assert_int_equal(st->slab[0].stats.used_bytes, 0);
	aeg_job_status_free(st);
}

/* Megatron's split for worlds of 1, 2, 3, 4 and 8, every rank: the parts tile each split tensor. */
static void megatron_worlds(void **state)
{
	static const int worlds[] = { 1, 2, 3, 4, 8 };
	static const enum aeg_prefetch_feed feeds[] = { AEG_FEED_AUTO, AEG_FEED_READ, AEG_FEED_MMAP };
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);
	uint64_t whole = 0, split = 0;

	for (int i = 0; i < NT; i++) {
		uint64_t b = nelem(&model[i]) * model[i].bytes;

		whole += model_dim[i] < 0 ? b : 0;
		split += model_dim[i] < 0 ? 0 : b;
	}
	for (size_t w = 0; w < AEG_ARRAY_SIZE(worlds); w++) {
		uint64_t total = 0;

		for (int r = 0; r < worlds[w]; r++) {
			struct aeg_slice slice = { .rank = r, .world = worlds[w], .preset = AEG_SLICE_PRESET_MEGATRON,
						   .rules = up_rule, .nrules = 1 };
			struct aeg_load_request req = { .path = f->path, .gpu = 0, .chunk_bytes = 64 * KiB,
							.slice = &slice };
			aeg_model_t *m;

			if (f->mode == AEG_SESSION_LOCAL)
				req.feed = feeds[(w + (size_t)r) % AEG_ARRAY_SIZE(feeds)];
			assert_int_equal(aeg_session_load(s, &req, &m), 0);
			assert_non_null(aeg_model_slice(m));
			assert_int_equal(aeg_model_slice(m)->rank, r);
			total += check_parts(f, m, model_dim, r, worlds[w]) - whole;
			assert_int_equal(aeg_model_release(m), 0);
			no_blocks_left(s);
		}
		/* Every byte of every split tensor is on exactly one rank. */
		assert_int_equal(total, split);
	}
	aeg_session_close(s);
}

/* Rules alone, each dim of a 3-D tensor; uneven splits with AEG_SLICE_UNEVEN, the last ranks getting less or nothing. */
static void rules_and_uneven(void **state)
{
	static const struct aeg_slice_rule rules[] = {
		{ "*.experts.*.w2.weight", 2 }, { "*.up_proj.weight", 0 }, { "*.gate_proj.weight", 1 },
		{ "model.layers.0.*.weight", AEG_SLICE_WHOLE }, { "lm_head.weight", 1 },
	};
	static const int dims[NT] = { -1, -1, -1, -1, -1, -1, -1, 2, 1, 0, -1, -1, -1, 1 };
	static const int worlds[] = { 5, 7, 11 };
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);

	for (size_t w = 0; w < AEG_ARRAY_SIZE(worlds); w++) {
		for (int r = 0; r < worlds[w]; r++) {
			struct aeg_slice slice = { .rank = r, .world = worlds[w], .rules = rules,
						   .nrules = AEG_ARRAY_SIZE(rules), .flags = AEG_SLICE_UNEVEN };
			struct aeg_load_request req = { .path = f->path, .gpu = 0, .chunk_bytes = 16 * KiB,
							.slice = &slice };
			aeg_model_t *m;

			assert_int_equal(aeg_session_load(s, &req, &m), 0);
			check_parts(f, m, dims, r, worlds[w]);
			assert_int_equal(aeg_model_release(m), 0);
		}
	}
	no_blocks_left(s);
	aeg_session_close(s);
}

/* A load reused only with an equal spec; find takes whole loads only. */
static void reuse_by_spec(void **state)
{
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);
	struct aeg_slice r0 = { .rank = 0, .world = 2, .preset = AEG_SLICE_PRESET_MEGATRON };
	struct aeg_slice r1 = r0;
	struct aeg_load_request req = { .path = f->path, .gpu = 0, .chunk_bytes = 64 * KiB,
					.flags = AEG_LOAD_REUSE, .slice = &r0 };
	aeg_model_t *a, *b, *c, *found;

	r1.rank = 1;
	assert_int_equal(aeg_session_load(s, &req, &a), 0);
	assert_int_equal(aeg_session_load(s, &req, &b), 0);
	assert_int_equal(aeg_model_owned(a), 1);
	assert_int_equal(aeg_model_owned(b), 0);
	assert_int_equal(aeg_model_id(a), aeg_model_id(b));
	req.slice = &r1;
	assert_int_equal(aeg_session_load(s, &req, &c), 0);
	assert_int_equal(aeg_model_owned(c), 1);
	assert_int_not_equal(aeg_model_id(c), aeg_model_id(a));
	check_parts(f, c, megatron_dim, 1, 2);
	assert_int_equal(aeg_session_find(s, f->path, 0, &found), AEG_ENOENT);
	aeg_model_close(b);
	assert_int_equal(aeg_model_release(a), 0);
	assert_int_equal(aeg_model_release(c), 0);
	no_blocks_left(s);
	aeg_session_close(s);
}

/* A directory of two shards and an index, sliced: each shard's tensors, each file's parts. */
static void sharded_directory(void **state)
{
	const int *dims = megatron_dim;
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);
	char dir[160], p0[200], p1[200], index[200];
	uint64_t bytes[2], data[2], off[NT];
	unsigned char *file[2];
	FILE *ix;

	snprintf(dir, sizeof(dir), "%s/llama", f->dir);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(p0, sizeof(p0), "%s/model-00001-of-00002.safetensors", dir);
	snprintf(p1, sizeof(p1), "%s/model-00002-of-00002.safetensors", dir);
	file[0] = write_model(p0, model, 7, &bytes[0], &data[0], off);
	file[1] = write_model(p1, model + 7, NT - 7, &bytes[1], &data[1], off + 7);
	snprintf(index, sizeof(index), "%s/model.safetensors.index.json", dir);
	ix = fopen(index, "w");
	assert_non_null(ix);
	fprintf(ix, "{\"metadata\":{},\"weight_map\":{");
	for (int i = 0; i < NT; i++)
		fprintf(ix, "%s\"%s\":\"model-0000%d-of-00002.safetensors\"", i ? "," : "", model[i].name, i < 7 ? 1 : 2);
	fprintf(ix, "}}");
	assert_int_equal(fclose(ix), 0);
	for (int r = 0; r < 3; r++) {
		struct aeg_slice slice = { .rank = r, .world = 3, .preset = AEG_SLICE_PRESET_MEGATRON };
		struct aeg_load_request req = { .path = dir, .gpu = 0, .chunk_bytes = 32 * KiB, .slice = &slice };
		const struct aeg_tensor *t;
		aeg_model_t *m;
		uint32_t n;

		assert_int_equal(aeg_session_load(s, &req, &m), 0);
		assert_int_equal(aeg_model_file_count(m), 2);
		assert_int_equal(aeg_model_wait(m, BOUND_MS), 0);
		t = aeg_model_tensors(m, &n);
		assert_int_equal(n, NT);
		for (int i = 0; i < NT; i++) {
			unsigned char *want;
			uint64_t start, count, len;

			len = expected_part(file[i < 7 ? 0 : 1], off[i], &model[i], dims[i], r, 3, &want, &start, &count);
			assert_int_equal(t[i].file, i < 7 ? 0 : 1);
			assert_int_equal(t[i].size, len);
			if (len && memcmp(t[i].device_ptr, want, len) != 0)
				fail_msg("rank %d: tensor %s of file %u differs", r, t[i].name, t[i].file);
			free(want);
		}
		assert_int_equal(aeg_model_release(m), 0);
	}
	no_blocks_left(s);
	aeg_session_close(s);
	free(file[0]);
	free(file[1]);
}

/* A step finding a slice (by the agent's id) whose file changed since is told so, not given wrong pointers. */
static void changed_file(void **state)
{
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);
	struct aeg_slice slice = { .rank = 1, .world = 4, .preset = AEG_SLICE_PRESET_MEGATRON };
	struct aeg_load_request req = { .path = f->path, .gpu = 0, .chunk_bytes = 64 * KiB, .slice = &slice };
	uint64_t bytes, data, off[NT];
	aeg_model_t *m, *found = NULL;
	unsigned char *other;

	assert_int_equal(aeg_session_load(s, &req, &m), 0);
	assert_int_equal(aeg_model_wait(m, BOUND_MS), 0);
	assert_int_equal(aeg_session_find_id(s, aeg_model_id(m), &found), 0);
	assert_non_null(aeg_model_slice(found));
	assert_int_equal(aeg_model_slice(found)->rank, 1);
	aeg_model_close(found);
	/* The same name, other tensors: the parts the agent holds are not this file's. */
	other = write_model(f->path, model + 2, NT - 2, &bytes, &data, off);
	assert_int_equal(aeg_session_find_id(s, aeg_model_id(m), &found), AEG_ESTALE);
	assert_non_null(strstr(aeg_error_detail(), "(the file changed?)"));
	assert_int_equal(aeg_model_release(m), 0);
	no_blocks_left(s);
	aeg_session_close(s);
	free(other);
}

struct bad {
	struct aeg_slice slice;
	const char *detail;
};

/* Each bad spec, or one the file does not allow, fails with its reason and leaves nothing loaded. */
static void bad_slices(void **state)
{
	static const struct aeg_slice_rule no_dim[] = { { "model.norm.weight", 1 } };
	static const struct aeg_slice_rule scalar[] = { { "model.layers.0.scale", 0 } };
	static const struct aeg_slice_rule empty[] = { { "", 0 } };
	static const struct aeg_slice_rule neg[] = { { "*", -2 } };
	static const struct aeg_slice_rule odd[] = { { "*.gate_proj.weight", 1 } };
	static struct aeg_slice_rule many[AEG_SLICE_MAX_RULES + 1];
	const struct bad bad[] = {
		{ { .rank = 4, .world = 4 }, "slice rank 4: must be 0..3 for a world of 4" },
		{ { .rank = -1, .world = 2 }, "slice rank -1: must be 0..1" },
		{ { .rank = 0, .world = 0 }, "slice world size 0: must be 1..4096" },
		{ { .rank = 0, .world = 5000 }, "slice world size 5000: must be 1..4096" },
		{ { .world = 2, .preset = (enum aeg_slice_preset)7 }, "slice preset 7" },
		{ { .world = 2, .flags = 0x10 }, "slice flags 0x10: unknown bits" },
		{ { .world = 2, .rules = many, .nrules = AEG_SLICE_MAX_RULES + 1 }, "65 slice rules: at most 64" },
		{ { .world = 2, .rules = NULL, .nrules = 1 }, "a NULL rule table" },
		{ { .world = 2, .rules = empty, .nrules = 1 }, "slice rule 0: empty pattern" },
		{ { .world = 2, .rules = neg, .nrules = 1 }, "dim -2: must be 0..31 or -1 (whole)" },
		{ { .world = 2, .rules = no_dim, .nrules = 1 },
		  "tensor \"model.norm.weight\" of shape [48] has no dim 1 (rule \"model.norm.weight\" splits it along dim 1)" },
		{ { .world = 2, .rules = scalar, .nrules = 1 }, "tensor \"model.layers.0.scale\" of shape [] has no dim 0" },
		{ { .world = 5, .preset = AEG_SLICE_PRESET_MEGATRON },
		  "tensor \"model.embed_tokens.weight\" of shape [96, 48] has 96 along dim 0, not a multiple of the 5 ranks "
		  "(rule \"*embed_tokens.weight\"); with AEG_SLICE_UNEVEN each rank takes 20 and the last ones less" },
		{ { .rank = 1, .world = 16, .rules = odd, .nrules = 1 },
		  "tensor \"model.layers.0.mlp.gate_proj.weight\" of shape [240, 1000] has 1000 along dim 1, not a multiple of the 16 ranks" },
	};
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);

	for (size_t i = 0; i < AEG_ARRAY_SIZE(many); i++)
		many[i] = (struct aeg_slice_rule){ "*", 0 };
	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		struct aeg_load_request req = { .path = f->path, .gpu = 0, .chunk_bytes = 64 * KiB, .slice = &bad[i].slice };
		aeg_model_t *m = NULL;

		assert_int_equal(aeg_session_load(s, &req, &m), AEG_EINVAL);
		assert_null(m);
		if (strstr(aeg_error_detail(), bad[i].detail) == NULL)
			fail_msg("case %zu: detail \"%s\", expected \"%s\"", i, aeg_error_detail(), bad[i].detail);
		no_blocks_left(s);
	}
	aeg_session_close(s);
}

/* A slice of a file that is no safetensors (raw, or asked for as raw) is refused. */
static void slice_of_raw(void **state)
{
	struct fx *f = *state;
	aeg_session_t *s = open_session(f);
	struct aeg_slice slice = { .rank = 0, .world = 2, .preset = AEG_SLICE_PRESET_MEGATRON };
	struct aeg_load_request req = { .path = f->path, .gpu = 0, .chunk_bytes = 64 * KiB, .slice = &slice,
					.format = AEG_FORMAT_RAW };
	char raw[160];
	unsigned char *bytes = test_pattern(300 * KiB, 5);
	aeg_model_t *m = NULL;

	assert_int_equal(aeg_session_load(s, &req, &m), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "a slice needs safetensors tensors"));
	snprintf(raw, sizeof(raw), "%s/weights.bin", f->dir);
	test_write_file(raw, bytes, 300 * KiB);
	req.path = raw;
	req.format = AEG_FORMAT_AUTO;
	assert_int_equal(aeg_session_load(s, &req, &m), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "not a safetensors file: a tensor-parallel slice needs its tensors"));
	assert_null(m);
	no_blocks_left(s);
	aeg_session_close(s);
	free(bytes);
}

/* The preset's names and parsing, and which dim it gives names it knows and names it does not. */
static void presets(void **state)
{
	static const struct { const char *name; int dim; } names[] = {
		{ "model.layers.31.self_attn.k_proj.weight", 0 }, { "model.layers.0.self_attn.v_proj.bias", 0 },
		{ "model.layers.2.mlp.up_proj.weight", 0 }, { "model.layers.2.mlp.down_proj.weight", 1 },
		{ "model.layers.2.mlp.down_proj.bias", AEG_SLICE_WHOLE },
		{ "model.layers.1.block_sparse_moe.experts.7.w1.weight", 0 },
		{ "model.layers.1.block_sparse_moe.experts.7.w2.weight", 1 },
		{ "model.layers.1.block_sparse_moe.gate.weight", AEG_SLICE_WHOLE },
		{ "gpt_neox.layers.0.attention.dense.weight", 1 }, { "gpt_neox.layers.0.mlp.dense_h_to_4h.bias", 0 },
		{ "gpt_neox.layers.0.attention.query_key_value.weight", AEG_SLICE_WHOLE },
		{ "gpt_neox.embed_in.weight", 0 }, { "embed_out.weight", 0 }, { "lm_head.weight", 0 },
		{ "model.layers.0.post_attention_layernorm.weight", AEG_SLICE_WHOLE },
	};
	struct aeg_slice s = { .rank = 0, .world = 2, .preset = AEG_SLICE_PRESET_MEGATRON };
	enum aeg_slice_preset p;
	const char *pattern;

	(void)state;
	for (size_t i = 0; i < AEG_ARRAY_SIZE(names); i++)
		if (aeg_slice_dim(&s, names[i].name, &pattern) != names[i].dim)
			fail_msg("%s: dim %d, expected %d", names[i].name, aeg_slice_dim(&s, names[i].name, NULL),
				 names[i].dim);
	s.rules = up_rule;
	s.nrules = 1;
	assert_int_equal(aeg_slice_dim(&s, "model.layers.2.mlp.up_proj.weight", &pattern), 2);
	assert_string_equal(pattern, "*.up_proj.weight");
	s.preset = AEG_SLICE_PRESET_NONE;
	assert_int_equal(aeg_slice_dim(&s, "lm_head.weight", &pattern), AEG_SLICE_WHOLE);
	assert_null(pattern);
	assert_int_equal(aeg_slice_preset_parse("vllm", &p), 0);
	assert_int_equal(p, AEG_SLICE_PRESET_MEGATRON);
	assert_string_equal(aeg_slice_preset_name(p), "megatron");
	assert_int_equal(aeg_slice_preset_parse("none", &p), 0);
	assert_int_equal(p, AEG_SLICE_PRESET_NONE);
	assert_int_equal(aeg_slice_preset_parse("deepspeed", &p), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "expected none, megatron or vllm"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(presets),
		cmocka_unit_test_setup_teardown(megatron_worlds, setup_local, teardown),
		cmocka_unit_test_setup_teardown(rules_and_uneven, setup_local, teardown),
		cmocka_unit_test_setup_teardown(reuse_by_spec, setup_local, teardown),
		cmocka_unit_test_setup_teardown(sharded_directory, setup_local, teardown),
		cmocka_unit_test_setup_teardown(bad_slices, setup_local, teardown),
		cmocka_unit_test_setup_teardown(slice_of_raw, setup_local, teardown),
		cmocka_unit_test_setup_teardown(megatron_worlds, setup_job, teardown),
		cmocka_unit_test_setup_teardown(rules_and_uneven, setup_job, teardown),
		cmocka_unit_test_setup_teardown(reuse_by_spec, setup_job, teardown),
		cmocka_unit_test_setup_teardown(sharded_directory, setup_job, teardown),
		cmocka_unit_test_setup_teardown(bad_slices, setup_job, teardown),
		cmocka_unit_test_setup_teardown(slice_of_raw, setup_job, teardown),
		cmocka_unit_test_setup_teardown(changed_file, setup_job, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

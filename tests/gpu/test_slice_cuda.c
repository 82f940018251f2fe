/* Tensor-parallel slices on a real GPU: every rank's part of a Llama-shaped checkpoint, each feed, checked and timed. */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>

#include "gpu_tap.h"

#define MiB (1ull << 20)
#define CHUNK (64 * MiB)

/* Llama-2-7B's shapes for two layers (BF16): about 1.3 GiB. Every split extent divides by 8. */
struct spec {
	char name[96];
	int ndim;
	uint64_t shape[2];
};

static struct spec specs[32];
static int nspecs;

static void add(const char *name, uint64_t a, uint64_t b)
{
	snprintf(specs[nspecs].name, sizeof(specs[nspecs].name), "%s", name);
	specs[nspecs].ndim = b ? 2 : 1;
	specs[nspecs].shape[0] = a;
	specs[nspecs++].shape[1] = b;
}

static void model_specs(void)
{
	static const char *const attn[] = { "q", "k", "v", "o" };
	char name[96];

	add("model.embed_tokens.weight", 32000, 4096);
	for (int l = 0; l < 2; l++) {
		snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
		add(name, 4096, 0);
		for (int i = 0; i < 4; i++) {
			snprintf(name, sizeof(name), "model.layers.%d.self_attn.%s_proj.weight", l, attn[i]);
			add(name, 4096, 4096);
		}
		snprintf(name, sizeof(name), "model.layers.%d.mlp.gate_proj.weight", l);
		add(name, 11008, 4096);
		snprintf(name, sizeof(name), "model.layers.%d.mlp.up_proj.weight", l);
		add(name, 11008, 4096);
		snprintf(name, sizeof(name), "model.layers.%d.mlp.down_proj.weight", l);
		add(name, 4096, 11008);
	}
	add("model.norm.weight", 4096, 0);
	add("lm_head.weight", 32000, 4096);
}

static uint64_t spec_bytes(const struct spec *t)
{
	return 2 * t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
}

/* The checkpoint at @path: its bytes (kept for the checks), *@offsets each tensor's data. */
static unsigned char *write_model(const char *path, uint64_t *bytes, uint64_t *offsets)
{
	char json[16384];
	size_t h = (size_t)snprintf(json, sizeof(json), "{");
	uint64_t data = 0, x = 0x9e3779b97f4a7c15ull;
	unsigned char *file;
	int fd;

	for (int i = 0; i < nspecs; i++) {
		h += (size_t)snprintf(json + h, sizeof(json) - h, "%s\"%s\":{\"dtype\":\"BF16\",\"shape\":[%" PRIu64 "%s",
				      i ? "," : "", specs[i].name, specs[i].shape[0], specs[i].ndim == 2 ? "," : "");
		if (specs[i].ndim == 2)
			h += (size_t)snprintf(json + h, sizeof(json) - h, "%" PRIu64, specs[i].shape[1]);
		h += (size_t)snprintf(json + h, sizeof(json) - h, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", data,
				      data + spec_bytes(&specs[i]));
		offsets[i] = data;
		data += spec_bytes(&specs[i]);
	}
	h += (size_t)snprintf(json + h, sizeof(json) - h, "}");
	while (h % 8)
		json[h++] = ' ';
	*bytes = 8 + h + data;
	file = malloc(*bytes);
	for (int i = 0; i < 8; i++)
		file[i] = (unsigned char)((uint64_t)h >> (8 * i));
	memcpy(file + 8, json, h);
	for (uint64_t i = 8 + h; i + 8 <= *bytes; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(file + i, &x, 8);
	}
	for (int i = 0; i < nspecs; i++)
		offsets[i] += 8 + h;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, file, *bytes) != (ssize_t)*bytes || close(fd) != 0) {
		perror(path);
		exit(2);
	}
	return file;
}

/* Rank @r of @w's part of tensor @i, computed from the shape (dim 0 or 1 of a matrix, or whole). */
static int part_matches(aeg_device_t *dev, const struct aeg_tensor *t, const unsigned char *file, uint64_t off,
			const struct spec *s, int r, int w)
{
	uint64_t rows = s->shape[0], cols = s->ndim == 2 ? s->shape[1] : 1, width = 2 * cols;
	unsigned char *back = malloc(t->size ? t->size : 1);
	int ok = aeg_memcpy(dev, back, t->device_ptr, t->size) == 0;

	if (ok && t->slice_dim == 0) {
		ok = t->size == rows / (uint64_t)w * width &&
		     memcmp(back, file + off + rows / (uint64_t)w * (uint64_t)r * width, t->size) == 0;
	} else if (ok && t->slice_dim == 1) {
		uint64_t run = width / (uint64_t)w;

		ok = t->size == rows * run;
		for (uint64_t k = 0; ok && k < rows; k++)
			ok = memcmp(back + k * run, file + off + k * width + (uint64_t)r * run, run) == 0;
	} else if (ok) {
		ok = t->size == rows * width && memcmp(back, file + off, t->size) == 0;
	}
	free(back);
	return ok;
}

/* Every rank of @w through @feed: each part right, the slice's rate printed. */
static void ranks(aeg_session_t *s, const char *path, const unsigned char *file, const uint64_t *offsets, int w,
		  enum aeg_prefetch_feed feed)
{
	for (int r = 0; r < w; r++) {
		struct aeg_slice slice = { .rank = r, .world = w, .preset = AEG_SLICE_PRESET_MEGATRON };
		struct aeg_load_request req = { .path = path, .gpu = 0, .chunk_bytes = CHUNK, .feed = feed,
						.flags = AEG_LOAD_NO_CACHE, .slice = &slice };
		struct aeg_load_progress p;
		const struct aeg_tensor *t;
		aeg_model_t *m = NULL;
		char what[128];
		uint32_t n;
		int ok;

		snprintf(what, sizeof(what), "rank %d of %d, %s feed", r, w, aeg_prefetch_feed_name(feed));
		ok = aeg_session_load(s, &req, &m) == 0 && aeg_model_wait(m, 120000) == 0;
		check(ok, what);
		if (!ok) {
			aeg_model_release(m);
			continue;
		}
		t = aeg_model_tensors(m, &n);
		ok = (int)n == nspecs;
		for (int i = 0; ok && i < nspecs; i++)
			ok = part_matches(aeg_session_device(s), &t[i], file, offsets[i], &specs[i], r, w);
		snprintf(what, sizeof(what), "rank %d of %d, %s feed: every part equals the file's", r, w,
			 aeg_prefetch_feed_name(feed));
		check(ok, what);
		aeg_model_progress(m, &p);
		printf("# %s: %" PRIu64 " MiB in %.1f ms, %.2f GB/s\n", what, p.total_bytes >> 20,
		       (double)(p.end_ns - p.start_ns) / 1e6, (double)p.total_bytes / (double)(p.end_ns - p.start_ns));
		check(aeg_model_release(m) == 0, "released");
	}
}

int main(void)
{
	static const int worlds[] = { 1, 2, 4, 8 };
	static const enum aeg_prefetch_feed feeds[] = { AEG_FEED_MMAP, AEG_FEED_READ, AEG_FEED_MIXED };
	struct aeg_session_config cfg = { .mode = AEG_SESSION_LOCAL, .flags = AEG_SESSION_DEVICE_SET,
					  .device = AEG_DEVICE_CUDA, .slab = "4GiB" };
	char dir[256], path[300];
	uint64_t offsets[32], bytes;
	unsigned char *file;
	aeg_session_t *s;

	setvbuf(stdout, NULL, _IOLBF, 0);
	model_specs();
	snprintf(dir, sizeof(dir), "%s/aegaeon-gpu-slice-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (mkdtemp(dir) == NULL) {
		perror("mkdtemp");
		return 2;
	}
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	file = write_model(path, &bytes, offsets);
	check(aeg_session_open(&cfg, &s) == 0, "a local session on the cuda backend");
	if (failures)
		return 1;
	for (size_t f = 0; f < sizeof(feeds) / sizeof(feeds[0]); f++)
		for (size_t w = 0; w < sizeof(worlds) / sizeof(worlds[0]); w++)
			ranks(s, path, file, offsets, worlds[w], feeds[f]);
	check(aeg_session_owned_blocks(s) == 0, "nothing held after the releases");
	aeg_session_close(s);
	unlink(path);
	rmdir(dir);
	free(file);
	printf("1..%d\n", test_number);
	return failures ? 1 : 0;
}

/* Faults on a real GPU: failing and shrinking reads on each feed, slab and pool exhausted, memory given back. */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include <aegaeon/aegaeon.h>

#include "gpu_tool.h"

#include "internal.h"

/* tests/faults/fault_shim.c, linked in. */
void aeg_fault_shim_reload(void);
unsigned long aeg_fault_shim_hits(void);

#define MiB (1ull << 20)
#define FILE_BYTES (256 * MiB)
#define CHUNK (32 * MiB)
#define CUT (128 * MiB)
#define SLACK (64 * MiB)        /* cudaMemGetInfo moves by a few MiB on its own */

static int failures, checks;

#define CHECK(cond, ...) do { \
	checks++; \
	if (cond) { \
		printf("ok %d - ", checks); printf(__VA_ARGS__); printf("\n"); \
	} else { \
		failures++; \
		printf("not ok %d - ", checks); printf(__VA_ARGS__); \
		printf(" (%s:%d: %s)\n", __FILE__, __LINE__, aeg_error_detail()); \
	} \
	fflush(stdout); \
} while (0)

static uint64_t gpu_free(void)
{
	size_t f = 0, t = 0;

	cudaMemGetInfo(&f, &t);
	return f;
}

static int near(uint64_t a, uint64_t b)
{
	return a > b ? a - b <= SLACK : b - a <= SLACK;
}

static void fault(const char *mode, const char *path, uint64_t at)
{
	char n[32];

	snprintf(n, sizeof(n), "%" PRIu64, at);
	if (mode) {
		setenv("AEGAEON_FAULT", mode, 1);
		setenv("AEGAEON_FAULT_FILE", path, 1);
		setenv("AEGAEON_FAULT_AT", n, 1);
	} else {
		unsetenv("AEGAEON_FAULT");
	}
	aeg_fault_shim_reload();
}

static unsigned char *pattern(uint64_t bytes)
{
	unsigned char *p = malloc(bytes);
	uint64_t x = 0x9e3779b97f4a7c15ull;

	for (uint64_t i = 0; p && i + 8 <= bytes; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(p + i, &x, 8);
	}
	return p;
}

static int write_file(const char *path, const unsigned char *p, uint64_t bytes)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	int ok = fd >= 0 && write(fd, p, bytes) == (ssize_t)bytes;

	if (fd >= 0)
		close(fd);
	return ok;
}

/* Chunk @c holds the file's bytes (copied back to the host). */
static int chunk_intact(aeg_device_t *dev, const struct aeg_chunk *c, const unsigned char *file)
{
	unsigned char *back = malloc(c->size);
	int ok = back && aeg_memcpy(dev, back, c->device_ptr, c->size) == 0 &&
		 memcmp(back, file + c->file_offset, c->size) == 0;

	free(back);
	return ok;
}

static int engine_empty(aeg_prefetch_t *pf, aeg_slab_t *slab)
{
	struct aeg_prefetch_stats e;
	struct aeg_slab_stats s;

	return aeg_prefetch_stats(pf, &e) == 0 && aeg_slab_stats(slab, &s) == 0 && e.loads == 0 &&
	       e.chunks == 0 && e.events == 0 && e.ring_in_use == 0 && e.registered_pieces == 0 &&
	       s.blocks == 0;
}

static void read_faults(aeg_device_t *dev, const char *dir)
{
	static const struct {
		const char *mode;
		enum aeg_prefetch_feed feed;
		int want;
	} cases[] = {
		{ "eio", AEG_FEED_READ, AEG_EIO },
		{ "eio", AEG_FEED_MMAP, AEG_EIO },
		{ "shrink", AEG_FEED_READ, AEG_ESTALE },
		{ "shrink", AEG_FEED_MMAP, AEG_ESTALE },
		{ "short", AEG_FEED_READ, 0 },
	};
	unsigned char *file = pattern(FILE_BYTES);
	char path[512];
	uint64_t free0 = gpu_free();
	aeg_slab_t *slab = NULL;
	aeg_pool_t *pool = NULL;
	aeg_prefetch_t *pf = NULL;

	snprintf(path, sizeof(path), "%s/model.bin", dir);
	CHECK(file && write_file(path, file, FILE_BYTES), "a 256 MiB file in %s", dir);
	CHECK(aeg_slab_create(dev, 0, 2 * FILE_BYTES, &slab) == 0 &&
	      aeg_pool_create(dev, 0, 16 * MiB, 256 * MiB, &pool) == 0 &&
	      aeg_prefetch_create(slab, pool, NULL, &pf) == 0, "slab, pool and engine");
	if (pf == NULL)
		goto out;
	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = cases[k].feed };
		const char *feed = aeg_prefetch_feed_name(cases[k].feed);
		const struct aeg_chunk *c;
		uint32_t n, bad = 0, failed = 0;
		aeg_load_t *l = NULL;
		int err;

		fault(cases[k].mode, path, strcmp(cases[k].mode, "short") == 0 ? 100000 : CUT);
		err = aeg_prefetch_file(pf, path, &o, &l);
		if (err == 0)
			err = aeg_load_wait(l, 60000);
		CHECK(err == cases[k].want && (err == 0 || strstr(aeg_error_detail(), path)),
		      "%s, %s feed: the load ends with %s naming the file", cases[k].mode, feed,
		      aeg_errname(cases[k].want));
		printf("# %s\n", aeg_error_detail());
		CHECK(aeg_fault_shim_hits() > 0, "%s, %s feed: the fault was injected", cases[k].mode, feed);
		c = aeg_load_chunks(l, &n);
		for (uint32_t i = 0; i < n; i++) {
			int e = aeg_load_wait_chunk(l, i, 60000);

			if (e == 0 && (!chunk_intact(dev, &c[i], file) ||
				       (cases[k].want && c[i].file_offset + c[i].size > CUT)))
				bad++;
			if (e != 0 && e != cases[k].want)
				bad++;
			failed += e != 0;
		}
		CHECK(bad == 0 && (cases[k].want ? failed > 0 : failed == 0) &&
		      (cases[k].want != AEG_ESTALE || failed == n),
		      "%s, %s feed: each chunk failed with the load's error or holds the file's bytes (%u of %u failed)",
		      cases[k].mode, feed, failed, n);
		aeg_load_close(l);
		CHECK(aeg_prefetch_release_all(pf) == 0 && engine_empty(pf, slab),
		      "%s, %s feed: everything released", cases[k].mode, feed);
		fault(NULL, NULL, 0);
		if (strcmp(cases[k].mode, "shrink") == 0)
			write_file(path, file, FILE_BYTES);
		l = NULL;
		err = aeg_prefetch_file(pf, path, &o, &l);
		if (err == 0)
			err = aeg_load_wait(l, 60000);
		c = aeg_load_chunks(l, &n);
		bad = 0;
		for (uint32_t i = 0; err == 0 && i < n; i++)
			bad += !chunk_intact(dev, &c[i], file);
		CHECK(err == 0 && n == FILE_BYTES / CHUNK && bad == 0, "%s, %s feed: then the file loads right",
		      cases[k].mode, feed);
		aeg_load_close(l);
		aeg_prefetch_release_all(pf);
	}
	/* A slab too small for the file: requested vs free; the next load fits. */
	{
		struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
		struct aeg_block fill;
		aeg_load_t *l = NULL;

		CHECK(aeg_slab_alloc(slab, 2 * FILE_BYTES - 64 * MiB, &fill) == 0, "the slab filled but 64 MiB");
		CHECK(aeg_prefetch_file(pf, path, &o, &l) == AEG_ENOSPC && l == NULL &&
		      strstr(aeg_error_detail(), "needs 256 MiB") && strstr(aeg_error_detail(), "64 MiB free"),
		      "a load larger than the slab's free bytes: AEG_ENOSPC, requested vs free");
		aeg_slab_free(slab, fill.id);
		CHECK(engine_empty(pf, slab), "nothing kept");
		CHECK(aeg_prefetch_file(pf, path, &o, &l) == 0 && aeg_load_wait(l, 60000) == 0,
		      "the next load fits");
		aeg_load_close(l);
		aeg_prefetch_release_all(pf);
	}
out:
	aeg_prefetch_destroy(pf);
	aeg_pool_destroy(pool);
	aeg_slab_destroy(slab);
	CHECK(!gpu_free_memory_checked() || near(gpu_free(), free0), "device memory back (free %" PRIu64 " MiB, was %" PRIu64 " MiB)%s",
	      (uint64_t)(gpu_free() / MiB), (uint64_t)(free0 / MiB), GPU_FREE_SKIP);
	unlink(path);
	free(file);
}

static uint64_t mem_available(void)
{
	char line[256];
	uint64_t kib = 0;
	FILE *fp = fopen("/proc/meminfo", "r");

	while (fp && fgets(line, sizeof(line), fp))
		if (strncmp(line, "MemAvailable:", 13) == 0)
			kib = strtoull(line + 13, NULL, 10);
	if (fp)
		fclose(fp);
	return kib << 10;
}

static void memory_faults(aeg_device_t *dev)
{
	struct aeg_gpu_info info;
	uint64_t free0 = gpu_free();
	aeg_slab_t *slab = NULL;
	aeg_pool_t *pool = NULL;
	int err;

	aeg_device_gpu_info(dev, 0, &info);
	err = aeg_slab_create(dev, 0, info.free_bytes + 1024 * MiB, &slab);
	CHECK(err == AEG_ENOSPC && slab == NULL && strstr(aeg_error_detail(), "free"),
	      "a slab over the free device memory: AEG_ENOSPC naming the free bytes");
	CHECK(!gpu_free_memory_checked() || near(gpu_free(), free0), "no device memory kept%s", GPU_FREE_SKIP);
	CHECK(aeg_slab_create(dev, 0, 1024 * MiB, &slab) == 0, "a 1 GiB slab next");
	aeg_slab_destroy(slab);

	unsetenv("AEGAEON_PINNED_HUGEPAGES");
	err = aeg_pool_create(dev, 0, 64 * MiB, aeg_round_up(mem_available() + 1024 * MiB, 64 * MiB), &pool);
	CHECK(err == AEG_ENOMEM && pool == NULL && strstr(aeg_error_detail(), "MemAvailable"),
	      "a pinned pool over the host's memory: AEG_ENOMEM, asked vs available");
	CHECK(aeg_pool_create(dev, 0, 64 * MiB, 1024 * MiB, &pool) == 0, "a 1 GiB pool next");
	aeg_pool_destroy(pool);
	CHECK(!gpu_free_memory_checked() || near(gpu_free(), free0), "device memory back%s", GPU_FREE_SKIP);
}

int main(void)
{
	char dir[] = "/tmp/aegaeon-faults-gpu-XXXXXX";
	aeg_device_t *dev = NULL;

	unsetenv("AEGAEON_FAULT");
	aeg_fault_shim_reload();
	if (mkdtemp(dir) == NULL || aeg_device_open(&dev, AEG_DEVICE_CUDA) != 0) {
		printf("not ok 1 - cuda device (%s)\n", aeg_error_detail());
		return 1;
	}
	read_faults(dev, dir);
	memory_faults(dev);
	aeg_device_close(dev);
	rmdir(dir);
	printf("1..%d\n", checks);
	return failures ? 1 : 0;
}

/* KV swap on a real GPU: kernel round trips, layers, staging reuse, errors, cross-process handoff, leaks. */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include <aegaeon/aegaeon.h>

#include "gpu_gate.h"
#include "gpu_tool.h"
#include "../unit/kvhandoff.h"

#include "device_internal.h"
#include "internal.h"
#include "kv_internal.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
/* cudaMalloc rounds to its own pages; free memory also moves by a few MiB on its own. */
#define SLACK (64 * MiB)
#define WAIT_MS 20000

static int failures;
static int test_number;

static void check(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void check(int cond, const char *fmt, ...)
{
	va_list ap;

	test_number++;
	printf("%s %d - ", cond ? "ok" : "not ok", test_number);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (!cond) {
		printf(" (last detail: %s)", aeg_error_detail());
		failures++;
	}
	printf("\n");
	fflush(stdout);
}

static uint64_t gpu_free(aeg_device_t *dev)
{
	struct aeg_gpu_info info;

	return aeg_device_gpu_info(dev, 0, &info) == 0 ? info.free_bytes : 0;
}

static double now_s(void)
{
	return aeg_now_ns() / 1e9;
}

/* A cache over a slab and a pool of its own; pool buffers hold whole blocks. */
struct cache {
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_kv_t *kv;
	uint64_t block;
	uint32_t gpu_blocks, host_blocks;
};

static uint64_t buffer_for(uint64_t block)
{
	uint64_t buffer = block;

	while (buffer % 4096)
		buffer += block;
	while (buffer < 2 * MiB)
		buffer *= 2;
	return buffer;
}

static int cache_make(aeg_device_t *dev, struct cache *c, uint64_t block, uint32_t gpu_blocks,
		      uint32_t host_blocks)
{
	uint64_t buffer = buffer_for(block);
	uint32_t buffers = (uint32_t)((host_blocks * block + buffer - 1) / buffer);
	struct aeg_kv_params p = { .block_bytes = block, .gpu_blocks = gpu_blocks, .host_buffers = buffers };

	memset(c, 0, sizeof(*c));
	c->block = block;
	if (aeg_slab_create(dev, 0, gpu_blocks * block, &c->slab) ||
	    aeg_pool_create(dev, 0, buffer, buffers * buffer, &c->pool))
		return -1;
	p.slab = c->slab;
	p.pool = c->pool;
	if (aeg_kv_create(dev, 0, &p, &c->kv))
		return -1;
	c->gpu_blocks = gpu_blocks;
	c->host_blocks = (uint32_t)(buffers * buffer / block);
	return 0;
}

static int cache_free(struct cache *c)
{
	struct aeg_slab_stats ss = { 0 };
	struct aeg_pool_stats ps = { 0 };
	int ok = 1;

	aeg_kv_destroy(c->kv);
	if (c->slab)
		ok &= aeg_slab_stats(c->slab, &ss) == 0 && ss.used_bytes == 0;
	if (c->pool)
		ok &= aeg_pool_stats(c->pool, &ps) == 0 && ps.in_use == 0;
	aeg_pool_destroy(c->pool);
	aeg_slab_destroy(c->slab);
	return ok;
}

/* ------------------------------------------------------------ round trips */

static void round_trip(aeg_device_t *dev, aeg_stream_t *s, uint64_t block, uint32_t gpu_blocks,
		       uint32_t n, uint64_t seed)
{
	struct cache c;
	uint32_t *gpu_ids = NULL, *host_ids = NULL, *gpu_in = NULL;
	unsigned char *gpu_data = NULL, *back = NULL, *named = NULL;
	uint64_t rs = seed, region;
	aeg_handle_t ho, hi;
	int ok, untouched = 1, moved = 1;

	if (cache_make(dev, &c, block, gpu_blocks, gpu_blocks)) {
		check(0, "%" PRIu64 "-byte blocks: cache made", block);
		cache_free(&c);
		return;
	}
	region = (uint64_t)gpu_blocks * block;
	gpu_ids = malloc(gpu_blocks * sizeof(uint32_t));
	host_ids = malloc(c.host_blocks * sizeof(uint32_t));
	gpu_in = malloc(gpu_blocks * sizeof(uint32_t));
	gpu_data = malloc(region);
	back = malloc(region);
	named = calloc(c.host_blocks, 1);
	for (uint32_t i = 0; i < gpu_blocks; i++)
		gpu_ids[i] = gpu_in[i] = i;
	for (uint32_t i = 0; i < c.host_blocks; i++)
		host_ids[i] = i;
	shuffle(gpu_ids, gpu_blocks, &rs);
	shuffle(host_ids, c.host_blocks, &rs);
	shuffle(gpu_in, gpu_blocks, &rs);
	fill_pattern(gpu_data, region, seed);

	ok = aeg_memcpy(dev, aeg_kv_gpu_ptr(c.kv, 0), gpu_data, region) == 0;
	memset(aeg_kv_host_ptr(c.kv, 0), 0xa5, (size_t)c.host_blocks * block);
	ok &= aeg_kv_swap_out(c.kv, gpu_ids, host_ids, n, s, &ho) == 0;
	ok &= aeg_event_wait_handle(dev, &ho, WAIT_MS) == 0;
	for (uint32_t i = 0; ok && i < n; i++) {
		moved &= memcmp(aeg_kv_host_ptr(c.kv, host_ids[i]), gpu_data + gpu_ids[i] * block, block) == 0;
		named[host_ids[i]] = 1;
	}
	for (uint32_t id = 0; ok && id < c.host_blocks; id++)
		if (!named[id])
			untouched &= all_bytes(aeg_kv_host_ptr(c.kv, id), 0xa5, block);
	check(ok && moved && untouched,
	      "swap-out of %" PRIu32 " random %" PRIu64 "-byte blocks is bit-exact, other host blocks untouched",
	      n, block);

	ok &= aeg_memset(dev, aeg_kv_gpu_ptr(c.kv, 0), 0x5a, region) == 0;
	ok &= aeg_kv_swap_in(c.kv, host_ids, gpu_in, n, s, &hi) == 0;
	ok &= aeg_event_wait_handle(dev, &hi, WAIT_MS) == 0;
	ok &= aeg_memcpy(dev, back, aeg_kv_gpu_ptr(c.kv, 0), region) == 0;
	moved = untouched = 1;
	memset(named, 0, c.host_blocks);
	for (uint32_t i = 0; ok && i < n; i++) {
		moved &= memcmp(back + gpu_in[i] * block, gpu_data + gpu_ids[i] * block, block) == 0;
		named[gpu_in[i]] = 1;
	}
	for (uint32_t id = 0; ok && id < gpu_blocks; id++)
		if (!named[id])
			untouched &= all_bytes(back + id * block, 0x5a, block);
	check(ok && moved && untouched,
	      "swap-in to another permutation is bit-exact, other GPU blocks untouched (%" PRIu64 " B)", block);
	check(aeg_kv_release(c.kv, &ho) == 0 && aeg_kv_release(c.kv, &hi) == 0 && cache_free(&c),
	      "events released; slab and pool back to zero (%" PRIu64 " B)", block);
	free(named);
	free(back);
	free(gpu_data);
	free(gpu_in);
	free(host_ids);
	free(gpu_ids);
}

/* Layers: every event pending while the stream is held, each layer there when its event fires. */
static void layers(aeg_device_t *dev, aeg_stream_t *s)
{
	enum { LAYERS = 8, PER = 32, N = LAYERS * PER };
	const uint64_t block = 16 * KiB;
	uint32_t gpu_ids[N], host_ids[N];
	size_t ends[LAYERS];
	aeg_handle_t lh[LAYERS], h;
	struct aeg_kv_layers ly = { LAYERS, ends, lh };
	unsigned char *data = malloc(N * block);
	struct gate g;
	struct cache c;
	int ok, pending = 1, each = 1;
	uint64_t rs = 11;

	if (cache_make(dev, &c, block, N, N) || !data) {
		check(0, "layers: cache made");
		cache_free(&c);
		free(data);
		return;
	}
	for (uint32_t i = 0; i < N; i++)
		gpu_ids[i] = host_ids[i] = i;
	shuffle(gpu_ids, N, &rs);
	shuffle(host_ids, N, &rs);
	for (int l = 0; l < LAYERS; l++)
		ends[l] = (size_t)(l + 1) * PER;
	fill_pattern(data, N * block, 12);
	ok = aeg_memcpy(dev, aeg_kv_gpu_ptr(c.kv, 0), data, N * block) == 0;
	memset(aeg_kv_host_ptr(c.kv, 0), 0, (size_t)c.host_blocks * block);

	ok &= gate_close(&g, s) == 0;
	ok &= aeg_kv_swap_out_layers(c.kv, gpu_ids, host_ids, N, &ly, s, &h) == 0;
	for (int l = 0; l < LAYERS; l++)
		pending &= aeg_event_wait_handle(dev, &lh[l], 0) == AEG_ETIMEDOUT;
	pending &= aeg_event_wait_handle(dev, &h, 0) == AEG_ETIMEDOUT;
	gate_open(&g);
	for (int l = 0; l < LAYERS; l++) {
		each &= aeg_event_wait_handle(dev, &lh[l], WAIT_MS) == 0;
		for (size_t i = l * PER; i < ends[l]; i++)
			each &= memcmp(aeg_kv_host_ptr(c.kv, host_ids[i]), data + gpu_ids[i] * block, block) == 0;
	}
	ok &= aeg_stream_sync(s) == 0;
	check(ok && pending, "per-layer swap: %d layer events and the call's pending while the stream is held", LAYERS);
	check(ok && each, "per-layer swap: each layer's blocks are there when its event completes");
	check(aeg_kv_release(c.kv, &h) == 0 && cache_free(&c), "per-layer events released, nothing held");
	pthread_cond_destroy(&g.cv);
	pthread_mutex_destroy(&g.lock);
	free(data);
}

/*
 * More calls than staging slots, back to back, then one call larger than a
 * slot: staging reuse must wait for the launches reading it, and a large
 * call goes through several slots.
 */
static void staging(aeg_device_t *dev, aeg_stream_t *s)
{
	enum { CALLS = 12, PER = 3000, BIG = 40000 };
	const uint64_t block = 256;
	uint32_t *gpu_ids = malloc(BIG * sizeof(uint32_t)), *host_ids = malloc(BIG * sizeof(uint32_t));
	unsigned char *data = malloc(BIG * block), *back = malloc(BIG * block);
	aeg_handle_t h;
	struct cache c;
	int ok, same = 1;
	uint64_t rs = 21;

	if (!gpu_ids || !host_ids || !data || !back || cache_make(dev, &c, block, BIG, BIG)) {
		check(0, "staging: cache made");
		goto out;
	}
	for (uint32_t i = 0; i < BIG; i++)
		gpu_ids[i] = host_ids[i] = i;
	shuffle(gpu_ids, BIG, &rs);
	shuffle(host_ids, BIG, &rs);
	fill_pattern(data, BIG * block, 22);
	ok = aeg_memcpy(dev, aeg_kv_gpu_ptr(c.kv, 0), data, BIG * block) == 0;
	memset(aeg_kv_host_ptr(c.kv, 0), 0, (size_t)c.host_blocks * block);
	for (int k = 0; k < CALLS; k++)
		ok &= aeg_kv_swap_out(c.kv, gpu_ids + k * PER, host_ids + k * PER, PER, s, NULL) == 0;
	ok &= aeg_stream_sync(s) == 0;
	for (uint32_t i = 0; ok && i < CALLS * PER; i++)
		same &= memcmp(aeg_kv_host_ptr(c.kv, host_ids[i]), data + gpu_ids[i] * block, block) == 0;
	check(ok && same, "%d calls in a row (more than the staging slots) move the right blocks", CALLS);

	ok &= aeg_memset(dev, aeg_kv_gpu_ptr(c.kv, 0), 0, BIG * block) == 0;
	ok &= aeg_kv_swap_in(c.kv, host_ids, gpu_ids, CALLS * PER, s, &h) == 0;
	ok &= aeg_event_wait_handle(dev, &h, WAIT_MS) == 0;
	ok &= aeg_memcpy(dev, back, aeg_kv_gpu_ptr(c.kv, 0), BIG * block) == 0;
	same = 1;
	for (uint32_t i = 0; ok && i < CALLS * PER; i++)
		same &= memcmp(back + gpu_ids[i] * block, data + gpu_ids[i] * block, block) == 0;
	check(ok && same, "one call of %d blocks (several staging slots) is bit-exact", CALLS * PER);
	check(aeg_kv_release(c.kv, &h) == 0 && cache_free(&c), "staging test left nothing held");
out:
	free(back);
	free(data);
	free(host_ids);
	free(gpu_ids);
}

static void errors(aeg_device_t *dev, aeg_stream_t *s)
{
	const uint64_t block = 4 * KiB;
	uint32_t twice[2] = { 3, 3 }, g[2] = { 1, 2 }, far[2] = { 1, 1u << 30 };
	struct aeg_kv_stats before, after;
	unsigned char *back = malloc(64 * block), *plain = aligned_alloc(4096, 64 * block);
	struct cache c;
	aeg_handle_t h;
	aeg_kv_t *kv = NULL;
	int ok;

	if (!back || !plain || cache_make(dev, &c, block, 64, 64)) {
		check(0, "errors: cache made");
		goto out;
	}
	ok = aeg_memset(dev, aeg_kv_gpu_ptr(c.kv, 0), 0x11, 64 * block) == 0;
	memset(aeg_kv_host_ptr(c.kv, 0), 0x22, (size_t)c.host_blocks * block);
	aeg_kv_stats(c.kv, &before);
	ok &= aeg_kv_swap_out(c.kv, twice, g, 2, s, &h) == AEG_EINVAL;
	ok &= aeg_kv_swap_in(c.kv, far, g, 2, s, &h) == AEG_EINVAL;
	ok &= aeg_kv_swap_in(c.kv, g, g, 0, s, &h) == AEG_EINVAL;
	ok &= aeg_stream_sync(s) == 0;
	ok &= aeg_memcpy(dev, back, aeg_kv_gpu_ptr(c.kv, 0), 64 * block) == 0;
	aeg_kv_stats(c.kv, &after);
	check(ok && all_bytes(back, 0x11, 64 * block) &&
	      all_bytes(aeg_kv_host_ptr(c.kv, 0), 0x22, (size_t)c.host_blocks * block) &&
	      memcmp(&before, &after, sizeof(before)) == 0,
	      "duplicate, out-of-range and empty calls are AEG_EINVAL and move nothing");

	{
		/* The cache's slab is full; a device range of its own GPU blocks will do. */
		struct aeg_kv_params p = { .block_bytes = block, .gpu_base = aeg_kv_gpu_ptr(c.kv, 0),
					   .gpu_bytes = block, .host_base = plain, .host_bytes = 64 * block };

		ok = aeg_kv_create(dev, 0, &p, &kv) == AEG_EINVAL &&
		     strstr(aeg_error_detail(), "not registered") != NULL && kv == NULL;
		check(ok, "host blocks in unregistered memory are refused");
		ok = aeg_host_register(dev, plain, 64 * block, 0) == 0 && aeg_kv_create(dev, 0, &p, &kv) == 0;
		aeg_kv_destroy(kv);
		ok &= aeg_host_unregister(dev, plain) == 0;
		check(ok, "host blocks in memory registered with aeg_host_register are taken");
	}
	check(aeg_kv_copy_h2d(c.kv, plain, aeg_kv_gpu_ptr(c.kv, 0), 4096, s, NULL) == AEG_EINVAL &&
	      aeg_kv_copy_d2h(c.kv, aeg_kv_gpu_ptr(c.kv, 1), aeg_kv_gpu_ptr(c.kv, 0), 4096, s, NULL) == AEG_EINVAL,
	      "one-buffer copies in the wrong direction are refused");
	check(cache_free(&c), "error test left nothing held");
out:
	free(plain);
	free(back);
}

static void one_buffer(aeg_device_t *dev, aeg_stream_t *s)
{
	const size_t bytes = 8 * MiB + 4096;
	struct aeg_pool_buffer a, b;
	aeg_handle_t h1, h2;
	struct cache c;
	int ok;

	if (cache_make(dev, &c, 2 * MiB, 8, 8)) {
		check(0, "copies: cache made");
		cache_free(&c);
		return;
	}
	/* The cache's own pool is all its; a second pool gives two pinned buffers. */
	{
		aeg_pool_t *pool = NULL;

		ok = aeg_pool_create(dev, 0, 16 * MiB, 32 * MiB, &pool) == 0 &&
		     aeg_pool_acquire(pool, 0, &a) == 0 && aeg_pool_acquire(pool, 0, &b) == 0;
		if (ok) {
			fill_pattern(a.ptr, bytes, 33);
			memset(b.ptr, 0, bytes);
			ok &= aeg_kv_copy_h2d(c.kv, aeg_kv_gpu_ptr(c.kv, 0), a.ptr, bytes, s, &h1) == 0;
			ok &= aeg_kv_copy_d2h(c.kv, b.ptr, aeg_kv_gpu_ptr(c.kv, 0), bytes, s, &h2) == 0;
			ok &= aeg_event_wait_handle(dev, &h2, WAIT_MS) == 0;
			ok &= memcmp(a.ptr, b.ptr, bytes) == 0;
			ok &= aeg_kv_release(c.kv, &h1) == 0 && aeg_kv_release(c.kv, &h2) == 0;
			aeg_pool_release(pool, a.index);
			aeg_pool_release(pool, b.index);
		}
		aeg_pool_destroy(pool);
	}
	check(ok, "one-buffer H2D then D2H through pinned memory round-trips %zu bytes", bytes);
	check(cache_free(&c), "copy test left nothing held");
}

/* ------------------------------------------------------------ cross-process */

#define HANDOFF_BLOCK (32 * KiB)
#define HANDOFF_N 256
#define HANDOFF_SEED 9090

static void handoff(aeg_device_t *dev, aeg_stream_t *s)
{
	uint32_t gpu_ids[HANDOFF_N], host_ids[HANDOFF_N];
	char hex[AEG_HANDLE_HEX_LEN + 1], fd_text[16], ready_text[16], list[HANDOFF_N * 12], self[4096];
	int ready_pipe[2] = { -1, -1 };
	char ready = 0;
	unsigned char *data = malloc(HANDOFF_N * HANDOFF_BLOCK);
	ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
	uint64_t rs = 31;
	struct gate g;
	struct cache c;
	aeg_handle_t h;
	size_t off = 0;
	int ok, status = -1;
	pid_t pid;

	if (!data || len <= 0 || cache_make(dev, &c, HANDOFF_BLOCK, HANDOFF_N, 2 * HANDOFF_N)) {
		check(0, "handoff: cache made");
		free(data);
		return;
	}
	self[len] = '\0';
	ok = aeg_kv_gpu_alloc(c.kv, HANDOFF_N, gpu_ids) == 0 && aeg_kv_host_alloc(c.kv, HANDOFF_N, host_ids) == 0;
	shuffle(host_ids, HANDOFF_N, &rs);
	for (int i = 0; i < HANDOFF_N; i++) {
		fill_pattern(data + gpu_ids[i] * HANDOFF_BLOCK, HANDOFF_BLOCK, HANDOFF_SEED + i);
		off += (size_t)snprintf(list + off, sizeof(list) - off, "%s%" PRIu32, i ? "," : "", host_ids[i]);
	}
	ok &= aeg_memcpy(dev, aeg_kv_gpu_ptr(c.kv, 0), data, HANDOFF_N * HANDOFF_BLOCK) == 0;
	memset(aeg_kv_host_ptr(c.kv, 0), 0, (size_t)c.host_blocks * HANDOFF_BLOCK);
	/* Held shut until the child waits: a child that did not wait would read zeroes. */
	ok &= gate_close(&g, s) == 0;
	ok &= aeg_kv_swap_out(c.kv, gpu_ids, host_ids, HANDOFF_N, s, &h) == 0;
	aeg_handle_to_hex(&h, hex);
	snprintf(fd_text, sizeof(fd_text), "%d", aeg_pool_fd(c.pool));
	ok &= pipe(ready_pipe) == 0;
	snprintf(ready_text, sizeof(ready_text), "%d", ready_pipe[1]);
	pid = fork();
	if (pid == 0) {
		fcntl(aeg_pool_fd(c.pool), F_SETFD, 0);
		close(ready_pipe[0]);
		execl(self, self, "--handoff-child", fd_text, hex, list, ready_text, (char *)NULL);
		_exit(127);
	}
	close(ready_pipe[1]);
	/* Once the child has seen the event pending it says so; then let A's swap run. */
	ok &= read(ready_pipe[0], &ready, 1) == 1;
	close(ready_pipe[0]);
	usleep(20 * 1000);
	gate_open(&g);
	if (pid > 0 && waitpid(pid, &status, 0) == pid)
		status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	ok &= aeg_stream_sync(s) == 0;
	check(ok && status == 0,
	      "process B waits on A's event handle and swaps A's %d host blocks into its GPU (child rc %d)",
	      HANDOFF_N, status);
	check(aeg_kv_release(c.kv, &h) == 0 && cache_free(&c), "handoff left nothing held");
	pthread_cond_destroy(&g.cv);
	pthread_mutex_destroy(&g.lock);
	free(data);
}

/* ------------------------------------------------------------ timing */

/* GB/s of one swap of @n blocks by @how (-1: ours), median of 5. */
static double rate(aeg_kv_t *kv, aeg_stream_t *s, int how, int out, const uint32_t *src,
		   const uint32_t *dst, size_t n)
{
	double t[5];

	for (int r = 0; r < 5; r++) {
		double t0 = now_s();
		int err;

		if (how < 0)
			err = out ? aeg_kv_swap_out(kv, src, dst, n, s, NULL) : aeg_kv_swap_in(kv, src, dst, n, s, NULL);
		else
			err = aeg_kv_baseline(kv, how, out, src, dst, n, s);
		if (err || aeg_stream_sync(s))
			return 0;
		t[r] = now_s() - t0;
	}
	for (int i = 1; i < 5; i++)
		for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
			double x = t[j];

			t[j] = t[j - 1];
			t[j - 1] = x;
		}
	return (double)n * aeg_kv_block_bytes(kv) / t[2] / 1e9;
}

static void timing(aeg_device_t *dev, aeg_stream_t *s, uint32_t n)
{
	const uint64_t block = 32 * KiB;
	uint32_t *gpu_ids = malloc(n * sizeof(uint32_t)), *host_ids = malloc(n * sizeof(uint32_t));
	uint64_t rs = 41;
	struct cache c;

	if (!gpu_ids || !host_ids || cache_make(dev, &c, block, n, n)) {
		check(0, "timing: cache made");
		goto out;
	}
	for (uint32_t i = 0; i < n; i++)
		gpu_ids[i] = host_ids[i] = i;
	shuffle(gpu_ids, n, &rs);
	shuffle(host_ids, n, &rs);
	for (int out = 1; out >= 0; out--) {
		const uint32_t *src = out ? gpu_ids : host_ids, *dst = out ? host_ids : gpu_ids;
		double ours = rate(c.kv, s, -1, out, src, dst, n);
		double per = rate(c.kv, s, KV_BASELINE_PER_BLOCK, out, src, dst, n);
		double batch = rate(c.kv, s, KV_BASELINE_BATCH, out, src, dst, n);

		printf("# %s %u x 32 KiB random: ours %.1f GB/s, per-block cudaMemcpyAsync %.1f GB/s, cudaMemcpyBatchAsync %.1f GB/s\n",
		       out ? "swap-out" : "swap-in ", n, ours, per, batch);
		check(ours > 0 && per > 0 && batch > 0, "%s timed (all three methods ran)", out ? "swap-out" : "swap-in");
	}
	check(cache_free(&c), "timing left nothing held");
out:
	free(host_ids);
	free(gpu_ids);
}

int main(int argc, char **argv)
{
	aeg_device_t *dev = NULL;
	aeg_stream_t *s = NULL;
	uint64_t start_free, end_free;
	uint32_t timing_blocks = 2048;
	int current = -1, after = -2;

	if (argc == 6 && strcmp(argv[1], "--handoff-child") == 0) {
		const struct kv_handoff ho = { AEG_DEVICE_CUDA, HANDOFF_N, HANDOFF_BLOCK, HANDOFF_SEED, WAIT_MS };

		return kv_handoff_child(&ho, argv);
	}
	if (argc == 3 && strcmp(argv[1], "--timing-blocks") == 0)
		timing_blocks = (uint32_t)strtoul(argv[2], NULL, 10);

	if (aeg_device_open(&dev, AEG_DEVICE_CUDA) || aeg_stream_create(dev, 0, &s)) {
		check(0, "cuda backend and a stream open");
		printf("0 passed, %d failed\n", failures);
		return 1;
	}
	cudaGetDevice(&current);
	start_free = gpu_free(dev);
	round_trip(dev, s, 256, 8192, 6000, 1);
	round_trip(dev, s, 4 * KiB, 2048, 1500, 2);
	round_trip(dev, s, 32 * KiB, 512, 400, 3);
	round_trip(dev, s, 2 * MiB, 16, 11, 4);
	round_trip(dev, s, 768, 512, 512, 5);
	layers(dev, s);
	staging(dev, s);
	errors(dev, s);
	one_buffer(dev, s);
	handoff(dev, s);
	if (timing_blocks)
		timing(dev, s, timing_blocks);
	cudaGetDevice(&after);
	check(current == after, "the calling thread's current device is unchanged");
	aeg_stream_destroy(s);
	end_free = gpu_free(dev);
	check(!gpu_free_memory_checked() || end_free + SLACK >= start_free,
	      "no device memory leaked over the whole run (%" PRIu64 " MiB before, %" PRIu64 " after)%s",
	      start_free / MiB, end_free / MiB, GPU_FREE_SKIP);
	aeg_device_close(dev);
	printf("%d passed, %d failed\n", test_number - failures, failures);
	return failures != 0;
}

/* Prefetch on a real GPU: bytes back, armed events, cancel, cache, CUDA syncs mid-load, a second process. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include <aegaeon/aegaeon.h>

#include "gpu_tool.h"
#include "../unit/chunkcheck.h"

#include "device_internal.h"
#include "internal.h"
#include "prefetch_internal.h"

#define MiB (1ull << 20)
#define CHUNK (64 * MiB)

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
} while (0)

static char dir[256];

static unsigned char *make_file(const char *name, uint64_t bytes, unsigned seed, char *path)
{
	unsigned char *p = malloc(bytes);
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
	int fd;

	for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(p + i, &x, 8);
	}
	for (uint64_t i = bytes / 8 * 8; i < bytes; i++)
		p[i] = (unsigned char)i;
	sprintf(path, "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, p, bytes) != (ssize_t)bytes || close(fd)) {
		perror(path);
		exit(2);
	}
	return p;
}

/* Copy every chunk back from the GPU and compare. */
static int chunks_match(aeg_device_t *dev, aeg_load_t *l, const unsigned char *file)
{
	const struct aeg_chunk *c;
	uint32_t n;
	int bad = 0;

	c = aeg_load_chunks(l, &n);
	for (uint32_t i = 0; i < n && !bad; i++) {
		unsigned char *back = malloc(c[i].size);

		if (aeg_load_wait_chunk(l, i, 60000) != 0 ||
		    aeg_memcpy(dev, back, c[i].device_ptr, c[i].size) != 0 ||
		    memcmp(back, file + c[i].file_offset, c[i].size) != 0)
			bad = 1;
		free(back);
	}
	return !bad;
}

struct holdgate {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int holding, release;
};

static int hold_item0(void *arg, uint64_t load_id, uint32_t item)
{
	struct holdgate *g = arg;

	if (item != 0)
		return 0;
	pthread_mutex_lock(&g->lock);
	g->holding = 1;
	pthread_cond_broadcast(&g->cond);
	while (!g->release)
		pthread_cond_wait(&g->cond, &g->lock);
	pthread_mutex_unlock(&g->lock);
	return 0;
}

static void hold_init(struct holdgate *g)
{
	memset(g, 0, sizeof(*g));
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cond, NULL);
}

static void hold_wait(struct holdgate *g)
{
	pthread_mutex_lock(&g->lock);
	while (!g->holding)
		pthread_cond_wait(&g->cond, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

static void hold_release(struct holdgate *g)
{
	pthread_mutex_lock(&g->lock);
	g->release = 1;
	pthread_cond_broadcast(&g->cond);
	pthread_mutex_unlock(&g->lock);
}

static void release_load(aeg_prefetch_t *pf, aeg_load_t *l)
{
	const struct aeg_chunk *c;
	uint32_t n;

	c = aeg_load_chunks(l, &n);
	for (uint32_t i = 0; i < n; i++)
		if (i == 0 || c[i].slab_id != c[i - 1].slab_id)
			aeg_prefetch_release(pf, &c[i].slab_id, 1);
	aeg_load_close(l);
}

#define SYNC_LIMIT_S 30

struct syncer {
	aeg_load_t *load;               /* NULL: one round; else until the load ends */
	int rounds;
	cudaError_t err;
	const char *call;
};

/*
 * What any library in the process (torch's caching allocator, say) does at
 * any time: calls that wait for the whole device. They must return while
 * a load is in flight: no stream may wait on work not queued yet.
 */
static void *sync_main(void *arg)
{
	struct syncer *s = arg;

	do {
		void *p = NULL;
		struct aeg_load_progress pr;

		s->call = "cudaMalloc";
		s->err = cudaMalloc(&p, 4096);
		if (s->err == cudaSuccess) {
			s->call = "cudaFree";
			s->err = cudaFree(p);
		}
		if (s->err == cudaSuccess) {
			s->call = "cudaDeviceSynchronize";
			s->err = cudaDeviceSynchronize();
		}
		s->rounds++;
		if (s->err != cudaSuccess || s->load == NULL)
			break;
		if (aeg_load_progress(s->load, &pr) != 0 || pr.status != AEG_EBUSY)
			break;
		usleep(2000);
	} while (1);
	return NULL;
}

/* Run sync_main in a thread; a hang is a failure reported before exiting (it cannot be undone). */
static void sync_bounded(struct syncer *s, const char *what)
{
	struct timespec deadline;
	pthread_t t;
	int rc;

	if (pthread_create(&t, NULL, sync_main, s) != 0) {
		CHECK(0, "%s: start the syncing thread", what);
		return;
	}
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += SYNC_LIMIT_S;
	rc = pthread_timedjoin_np(t, NULL, &deadline);
	if (rc == ETIMEDOUT) {
		CHECK(0, "%s: %s returns within %d s (it hangs: a stream waits on unqueued work)",
		      what, s->call, SYNC_LIMIT_S);
		printf("1..%d\n", checks);
		fflush(stdout);
		_exit(1);
	}
	CHECK(s->err == cudaSuccess, "%s: %s: %s (%d rounds)", what, s->call ? s->call : "-",
	      cudaGetErrorString(s->err), s->rounds);
}

static void timed(aeg_device_t *dev, aeg_prefetch_t *pf, const char *path, const unsigned char *file,
		  enum aeg_prefetch_feed feed, const char *what)
{
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK, .feed = feed };
	struct aeg_load_progress p;
	aeg_load_t *l;
	int err;

	err = aeg_prefetch_file(pf, path, &o, &l);
	CHECK(err == 0, "%s: prefetch_file", what);
	if (err)
		return;
	CHECK(aeg_load_wait(l, 120000) == 0, "%s: load completes", what);
	aeg_load_progress(l, &p);
	CHECK(chunks_match(dev, l, file), "%s: every chunk equals the file", what);
	printf("# %s: %.2f GB/s, first chunk %.2f ms, feed %s\n", what,
	       (double)p.total_bytes / (double)(p.end_ns - p.start_ns),
	       (double)(p.first_chunk_ns - p.start_ns) / 1e6, aeg_prefetch_feed_name(p.feed));
	release_load(pf, l);
}

int main(int argc, char **argv)
{
	struct aeg_gpu_info before, after;
	struct aeg_prefetch_config cfg;
	struct aeg_prefetch_stats st;
	struct aeg_prefetch_options o = { .chunk_bytes = CHUNK };
	struct holdgate g;
	aeg_device_t *dev;
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_prefetch_t *pf;
	aeg_load_t *l;
	const struct aeg_chunk *c;
	char path[512], small[512];
	const uint64_t size = 1024 * MiB + 4097, small_size = 3 * MiB + 5;
	unsigned char *file, *sfile;
	uint32_t n;
	int err;

	if (argc > 3 && strcmp(argv[1], "--child") == 0)
		return chunk_child(AEG_DEVICE_CUDA, 60000, argc, argv);
	setvbuf(stdout, NULL, _IOLBF, 0);       /* what printed survives a timeout */

	snprintf(dir, sizeof(dir), "%s/aegaeon-gpu-pf-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (mkdtemp(dir) == NULL) {
		perror("mkdtemp");
		return 2;
	}
	file = make_file("model.bin", size, 1, path);
	sfile = make_file("small.bin", small_size, 2, small);

	if (aeg_device_open(&dev, AEG_DEVICE_CUDA) != 0) {
		printf("not ok 1 - open the cuda device: %s\n", aeg_error_detail());
		return 1;
	}
	aeg_device_gpu_info(dev, 0, &before);
	err = aeg_slab_create(dev, 0, aeg_prefetch_slab_bytes_for(size, CHUNK), &slab);
	CHECK(err == 0, "slab of %" PRIu64 " MiB", aeg_prefetch_slab_bytes_for(size, CHUNK) >> 20);
	err = aeg_pool_create(dev, 0, 32 * MiB, 2048 * MiB, &pool);
	CHECK(err == 0, "pinned pool of 2 GiB");
	if (failures)
		return 1;
	aeg_prefetch_config_defaults(&cfg);
	cfg.cache_bytes = 1280 * MiB;
	CHECK(aeg_prefetch_create(slab, pool, &cfg, &pf) == 0, "engine");

	timed(dev, pf, path, file, AEG_FEED_MMAP, "mmap feed, 1 GiB");
	timed(dev, pf, path, file, AEG_FEED_READ, "read feed, 1 GiB");
	timed(dev, pf, path, file, AEG_FEED_MIXED, "mixed feed, 1 GiB");
	timed(dev, pf, small, sfile, AEG_FEED_READ, "read feed, 3 MiB");
	timed(dev, pf, path, file, AEG_FEED_AUTO, "auto, cache fill");
	timed(dev, pf, path, file, AEG_FEED_AUTO, "auto, cache hit");
	aeg_prefetch_stats(pf, &st);
	CHECK(st.cache_hits == 1 && st.cache_entries == 1, "one cache hit, one entry (%" PRIu64 ", %" PRIu64 ")",
	      st.cache_hits, st.cache_entries);
	CHECK(st.read_fallbacks == 0, "page registration accepted (no fallback)");

	/* Device-wide syncs during loads: free running (pieces registered and
	 * unregistered meanwhile), then with item 0 held so chunk 0 cannot be
	 * recorded while the other chunks' copies run. */
	o.flags = AEG_PREFETCH_NO_CACHE;
	o.feed = AEG_FEED_MMAP;
	err = aeg_prefetch_file(pf, path, &o, &l);
	CHECK(err == 0, "load with syncs alongside");
	if (err == 0) {
		struct syncer s = { .load = l };

		sync_bounded(&s, "syncs while an mmap load runs");
		CHECK(aeg_load_wait(l, 120000) == 0, "the load completes");
		CHECK(chunks_match(dev, l, file), "and every chunk equals the file");
		release_load(pf, l);
	}
	hold_init(&g);
	aeg_prefetch_set_hook(pf, hold_item0, &g);
	err = aeg_prefetch_file(pf, path, &o, &l);
	CHECK(err == 0, "load with item 0 held");
	if (err == 0) {
		struct syncer s = { .load = NULL };

		c = aeg_load_chunks(l, &n);
		hold_wait(&g);
		CHECK(aeg_load_wait_chunk(l, 0, 100) == AEG_ETIMEDOUT,
		      "chunk 0 pending while its first piece is held");
		sync_bounded(&s, "syncs while a chunk event is armed");
		CHECK(aeg_load_wait_chunk(l, 0, 0) == AEG_ETIMEDOUT, "chunk 0 still pending after the syncs");
		hold_release(&g);
		CHECK(aeg_load_wait(l, 120000) == 0, "the held load completes");
		CHECK(chunks_match(dev, l, file), "and every chunk equals the file");
		release_load(pf, l);
	}
	aeg_prefetch_set_hook(pf, NULL, NULL);

	/*
	 * Armed events: chunk 0's stays pending while its first piece is held
	 * (the other pieces run on), then cancel fails it.
	 */
	hold_init(&g);
	aeg_prefetch_set_hook(pf, hold_item0, &g);
	o.flags = AEG_PREFETCH_NO_CACHE;
	o.feed = AEG_FEED_MMAP;
	err = aeg_prefetch_file(pf, path, &o, &l);
	CHECK(err == 0, "load to cancel");
	if (err == 0) {
		c = aeg_load_chunks(l, &n);
		hold_wait(&g);
		CHECK(aeg_event_wait_handle(dev, &c[0].event, 200) == AEG_ETIMEDOUT,
		      "chunk 0's event is pending while its piece is held");
		aeg_load_cancel(l);
		hold_release(&g);
		CHECK(aeg_load_wait(l, 60000) == AEG_ECANCELED, "cancelled load says so");
		CHECK(aeg_load_wait_chunk(l, 0, 60000) == AEG_ECANCELED, "waits on cancelled chunks fail, never hang");
		CHECK(aeg_event_wait_handle(dev, &c[0].event, 60000) == AEG_ECANCELED,
		      "waits through the handle fail too");
		release_load(pf, l);
	}

	/*
	 * A second process waits on the handles and reads through the slab's IPC
	 * handle. CUDA IPC events cannot say "armed, not recorded yet": inside
	 * a job the agent tells (PROTO_WAIT_EVENT). Without an agent here, the
	 * child starts once every event is recorded; copies may still run.
	 */
	hold_init(&g);
	err = aeg_prefetch_file(pf, path, &o, &l);
	CHECK(err == 0, "load for a second process");
	if (err == 0) {
		aeg_handle_t sh;
		char **args;
		pid_t pid;
		int status;

		c = aeg_load_chunks(l, &n);
		aeg_slab_export(slab, &sh);
		args = chunk_child_args("/proc/self/exe", path, &sh, c, n);
		hold_wait(&g);
		hold_release(&g);
		err = 0;
		for (uint32_t i = 0; i < n && err == 0; i++)
			err = aeg_event_wait_recorded(dev, &c[i].event, 60000);
		CHECK(err == 0, "every chunk event recorded");
		pid = fork();
		if (pid == 0) {
			execv("/proc/self/exe", args);
			_exit(127);
		}
		CHECK(aeg_load_wait(l, 60000) == 0, "load completes");
		CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "second process saw every chunk equal to the file (exit %d)",
		      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
		chunk_child_args_free(args);
		release_load(pf, l);
	}
	aeg_prefetch_set_hook(pf, NULL, NULL);

	aeg_prefetch_stats(pf, &st);
	CHECK(st.chunks == 0 && st.events == 0 && st.blocks == 0 && st.registered_pieces == 0 &&
	      st.ring_in_use == 0, "engine holds nothing after the releases");
	aeg_prefetch_destroy(pf);
	aeg_pool_destroy(pool);
	aeg_slab_destroy(slab);
	aeg_device_gpu_info(dev, 0, &after);
	CHECK(!gpu_free_memory_checked() || after.free_bytes + 16 * MiB >= before.free_bytes,
	      "device memory back (free %" PRIu64 " MiB before, %" PRIu64 " MiB after)%s",
	      before.free_bytes >> 20, after.free_bytes >> 20, GPU_FREE_SKIP);
	aeg_device_close(dev);

	unlink(path);
	unlink(small);
	rmdir(dir);
	free(file);
	free(sfile);
	printf("1..%d\n", checks);
	return failures ? 1 : 0;
}

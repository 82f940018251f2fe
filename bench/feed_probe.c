/* Probe of page registration, the mechanism of the prefetch engine's mmap feed, outside the engine. */
/*
 * Each run maps one whole file in the page cache, threads register pieces
 * of it read-only and copy each to a device buffer as soon as it is
 * registered; it prints how long until every byte was on the GPU ("ready")
 * and what unregistering and unmapping cost on top ("cleanup").
 * Usage: feed_probe FILE [--threads N] [--piece MiB]
 *        [--populate none|madv|map] [--unregister end|each] [--repeat N] [--gpu N]
 * The engine's own figures come from aegaeon-cli prefetch; this says what
 * registration reaches on its own, so a gap between the two is visible.
 */
#include "config.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "bench_stats.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

enum populate { POP_NONE, POP_MADV, POP_MAP };

struct probe {
	const char *path;
	int fd;
	uint64_t size;
	uint64_t piece;
	char *map;
	char *dev;
	int threads;
	enum populate populate;
	int unregister_each;
	atomic_uint_fast64_t next;     /* UINT64_MAX until the clock starts */
	atomic_int ready;              /* workers set up */
	atomic_uint_fast64_t reg_ns, unreg_ns;
	atomic_int failed;
};

struct registered {
	void *p;
	struct registered *next;
};

struct worker {
	struct probe *pr;
	struct registered *held;        /* unregistered after the run */
	pthread_t tid;
};

static int cuda_ok(cudaError_t e, const char *what, struct probe *pr)
{
	if (e == cudaSuccess)
		return 1;
	fprintf(stderr, "feed_probe: %s: %s\n", what, cudaGetErrorString(e));
	atomic_store(&pr->failed, 1);
	return 0;
}

static void *register_worker(struct worker *w)
{
	struct probe *pr = w->pr;
	cudaStream_t s;

	if (!cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate", pr)) {
		atomic_fetch_add(&pr->ready, 1);
		return NULL;
	}
	atomic_fetch_add(&pr->ready, 1);
	while (atomic_load(&pr->next) == UINT64_MAX)
		;
	for (;;) {
		uint64_t off = atomic_fetch_add(&pr->next, pr->piece);
		uint64_t n, t0;
		char *p;

		if (off >= pr->size || atomic_load(&pr->failed))
			break;
		n = pr->size - off < pr->piece ? pr->size - off : pr->piece;
		p = pr->map + off;
		t0 = now_ns();
		if (pr->populate == POP_MADV && madvise(p, (n + 4095) & ~4095ull, MADV_POPULATE_READ))
			fprintf(stderr, "feed_probe: MADV_POPULATE_READ: %s\n", strerror(errno));
		if (!cuda_ok(cudaHostRegister(p, (n + 4095) & ~4095ull, cudaHostRegisterReadOnly),
			     "cudaHostRegister", pr))
			break;
		atomic_fetch_add(&pr->reg_ns, now_ns() - t0);
		if (!cuda_ok(cudaMemcpyAsync(pr->dev + off, p, n, cudaMemcpyHostToDevice, s),
			     "cudaMemcpyAsync", pr))
			break;
		if (pr->unregister_each) {
			cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize", pr);
			t0 = now_ns();
			cuda_ok(cudaHostUnregister(p), "cudaHostUnregister", pr);
			atomic_fetch_add(&pr->unreg_ns, now_ns() - t0);
		} else {
			struct registered *r = malloc(sizeof(*r));

			r->p = p;
			r->next = w->held;
			w->held = r;
		}
	}
	cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize", pr);
	cudaStreamDestroy(s);
	return NULL;
}

static void *worker_main(void *arg)
{
	return register_worker(arg);
}

static int run_once(struct probe *pr, double *ready_gbps, double *total_gbps, double *unreg_ms)
{
	int n = pr->threads;
	struct worker *w = calloc((size_t)n, sizeof(*w));
	uint64_t t0, t_ready, t_end;
	int ok = 1;

	atomic_store(&pr->reg_ns, 0);
	atomic_store(&pr->unreg_ns, 0);
	atomic_store(&pr->next, UINT64_MAX);
	atomic_store(&pr->ready, 0);
	pr->map = mmap(NULL, pr->size, PROT_READ, MAP_SHARED, pr->fd, 0);
	if (pr->map == MAP_FAILED) {
		fprintf(stderr, "feed_probe: mmap: %s\n", strerror(errno));
		free(w);
		return 0;
	}
	/* Streams are made by their threads before the clock starts. */
	for (int i = 0; i < n; i++) {
		w[i].pr = pr;
		pthread_create(&w[i].tid, NULL, worker_main, &w[i]);
	}
	while (atomic_load(&pr->ready) < n)
		usleep(1000);
	t0 = now_ns();
	if (pr->populate == POP_MAP) {
		/* MAP_POPULATE's cost belongs to the run: map again, timed. */
		munmap(pr->map, pr->size);
		pr->map = mmap(NULL, pr->size, PROT_READ, MAP_SHARED | MAP_POPULATE, pr->fd, 0);
	}
	atomic_store(&pr->next, 0);
	for (int i = 0; i < n; i++)
		pthread_join(w[i].tid, NULL);
	t_ready = now_ns();
	for (int i = 0; i < n; i++) {
		while (w[i].held) {
			struct registered *r = w[i].held;

			w[i].held = r->next;
			cuda_ok(cudaHostUnregister(r->p), "cudaHostUnregister", pr);
			free(r);
		}
	}
	munmap(pr->map, pr->size);
	t_end = now_ns();
	ok = !atomic_load(&pr->failed);
	*ready_gbps = (double)pr->size / (double)(t_ready - t0);
	*total_gbps = (double)pr->size / (double)(t_end - t0);
	*unreg_ms = (double)(t_end - t_ready) / 1e6 + (double)atomic_load(&pr->unreg_ns) / 1e6;
	free(w);
	return ok;
}

static void usage(void)
{
	fprintf(stderr, "usage: feed_probe FILE [--threads N] [--piece MiB] [--populate none|madv|map] "
		"[--unregister end|each] [--repeat N] [--gpu N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct probe pr = { 0 };
	int repeat = 3, gpu = 0;
	double ready[64], total[64], unreg[64];
	struct stat st;

	if (argc < 2)
		usage();
	pr.path = argv[1];
	pr.threads = 4;
	pr.piece = 64ull << 20;
	pr.populate = POP_MADV;
	for (int i = 2; i < argc; i++) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (v == NULL)
			usage();
		if (!strcmp(argv[i], "--threads"))
			pr.threads = atoi(v);
		else if (!strcmp(argv[i], "--piece"))
			pr.piece = strtoull(v, NULL, 10) << 20;
		else if (!strcmp(argv[i], "--populate"))
			pr.populate = !strcmp(v, "none") ? POP_NONE : !strcmp(v, "map") ? POP_MAP : POP_MADV;
		else if (!strcmp(argv[i], "--unregister"))
			pr.unregister_each = !strcmp(v, "each");
		else if (!strcmp(argv[i], "--repeat"))
			repeat = atoi(v);
		else if (!strcmp(argv[i], "--gpu"))
			gpu = atoi(v);
		else
			usage();
		i++;
	}
	if (repeat < 1 || repeat > 64 || pr.threads < 1 || pr.threads > 256 || pr.piece == 0)
		usage();
	pr.fd = open(pr.path, O_RDONLY | O_CLOEXEC);
	if (pr.fd < 0 || fstat(pr.fd, &st)) {
		fprintf(stderr, "feed_probe: %s: %s\n", pr.path, strerror(errno));
		return 1;
	}
	pr.size = (uint64_t)st.st_size;
	if (cudaSetDevice(gpu) != cudaSuccess || cudaMalloc((void **)&pr.dev, pr.size) != cudaSuccess) {
		fprintf(stderr, "feed_probe: cudaMalloc of %llu bytes failed\n", (unsigned long long)pr.size);
		return 1;
	}
	for (int r = 0; r < repeat; r++)
		if (!run_once(&pr, &ready[r], &total[r], &unreg[r]))
			return 1;
	qsort(ready, (size_t)repeat, sizeof(double), cmp_double);
	qsort(total, (size_t)repeat, sizeof(double), cmp_double);
	qsort(unreg, (size_t)repeat, sizeof(double), cmp_double);
	printf("register threads=%-2d piece=%lluMiB populate=%s unregister=%s: "
	       "ready %.1f GB/s (min %.1f max %.1f), with cleanup %.1f GB/s, cleanup %.0f ms\n",
	       pr.threads, (unsigned long long)(pr.piece >> 20),
	       pr.populate == POP_NONE ? "none" : pr.populate == POP_MAP ? "map" : "madv",
	       pr.unregister_each ? "each" : "end", ready[repeat / 2], ready[0], ready[repeat - 1],
	       total[repeat / 2], unreg[repeat / 2]);
	cudaFree(pr.dev);
	close(pr.fd);
	return 0;
}

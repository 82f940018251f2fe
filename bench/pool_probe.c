/* Probe of pinned pool provisioning, the pinned pool's steps outside the library. */
/*
 * Each run maps SIZE of shared memory (a memfd, as a pool is made: 2 MiB
 * huge pages from the huge page pool, or 4 KiB pages), faults every page
 * in with MADV_POPULATE_WRITE on T threads in 4 MiB steps, and registers it
 * with cudaHostRegister: the whole range once populated ("whole"), or piece
 * by piece on its own thread as the populating threads finish each piece
 * ("pieces": registration beside population). It prints ms/GiB of each
 * step and of the whole, for each thread count, medians of the repeats, so
 * the pool's thread count and order are chosen from what this machine does.
 * With pieces, a copy that spans two registrations is timed as well.
 * Usage: pool_probe [--gib N] [--threads 1,2,4,8] [--pages huge|small]
 *        [--register whole|pieces|both] [--piece MiB] [--repeat N] [--gpu N]
 * Huge pages must be reserved beforehand (vm.nr_hugepages) for --pages huge.
 */
#include "config.h"
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004u
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21u << 26)
#endif

#define MiB (UINT64_C(1) << 20)
#define STEP (4 * MiB)
#define MAX_THREADS 64
#define MAX_RUNS 64

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *why)
{
	fprintf(stderr, "pool_probe: %s: %s\n", what, why);
	exit(1);
}

/* Population hands out pieces in order; a piece is registered once it is populated. */
struct run {
	char *map;
	uint64_t bytes, piece;
	uint32_t pieces;
	_Atomic uint32_t next;          /* next piece to populate */
	_Atomic uint32_t *done;         /* 1 once piece i is populated */
	_Atomic int err;
	int pipelined;
};

static void *populate_main(void *arg)
{
	struct run *r = arg;
	uint32_t i;

	while ((i = atomic_fetch_add(&r->next, 1)) < r->pieces) {
		uint64_t off = (uint64_t)i * r->piece, end = off + r->piece > r->bytes ? r->bytes : off + r->piece;

		for (uint64_t o = off; o < end; o += STEP) {
			uint64_t n = end - o < STEP ? end - o : STEP;

			if (madvise(r->map + o, n, MADV_POPULATE_WRITE) != 0) {
				atomic_store(&r->err, errno);
				return NULL;
			}
		}
		atomic_store_explicit(&r->done[i], 1, memory_order_release);
	}
	return NULL;
}

static int register_range(char *p, uint64_t n)
{
	return cudaHostRegister(p, n, cudaHostRegisterPortable | cudaHostRegisterMapped) == cudaSuccess ? 0 : -1;
}

/* The registering thread of the pipelined order: each piece as soon as it is populated, in order. */
static void *register_main(void *arg)
{
	struct run *r = arg;

	for (uint32_t i = 0; i < r->pieces; i++) {
		uint64_t off = (uint64_t)i * r->piece, n = off + r->piece > r->bytes ? r->bytes - off : r->piece;

		while (!atomic_load_explicit(&r->done[i], memory_order_acquire)) {
			if (atomic_load(&r->err) != 0)
				return NULL;
			nanosleep(&(struct timespec){ 0, 20000 }, NULL);
		}
		if (register_range(r->map + off, n) != 0) {
			atomic_store(&r->err, EIO);
			return NULL;
		}
	}
	return NULL;
}

struct result {
	double map, populate, reg, total, span_copy, inside_copy;
};

static char span_error[128];

/* The copy across two registrations against one inside one. */
static const char *span_text(double span, double inside)
{
	static char text[192];

	if (span >= 0)
		snprintf(text, sizeof(text), "%5.1f GB/s (in one %.1f)", span, inside);
	else
		snprintf(text, sizeof(text), "failed: %s (in one %.1f GB/s)", span_error, inside);
	return text;
}

/* A copy of @n bytes at @p to the GPU, GB/s (best of 3). */
static double copy_gbps(void *dev, const char *p, uint64_t n, cudaStream_t s)
{
	double best = 0;

	for (int k = 0; k < 3; k++) {
		double t0 = now_s(), gbps;

		cudaError_t e = cudaMemcpyAsync(dev, p, n, cudaMemcpyHostToDevice, s);

		if (e == cudaSuccess)
			e = cudaStreamSynchronize(s);
		if (e != cudaSuccess) {
			snprintf(span_error, sizeof(span_error), "%s", cudaGetErrorString(e));
			return -1;
		}
		gbps = (double)n / (now_s() - t0) / 1e9;
		best = gbps > best ? gbps : best;
	}
	return best;
}

static int one(uint64_t bytes, unsigned threads, int huge, int pipelined, uint64_t piece, struct result *res)
{
	struct run r = { .bytes = bytes, .piece = pipelined ? piece : (bytes + threads - 1) / threads,
			 .pipelined = pipelined };
	pthread_t tids[MAX_THREADS], reg;
	double t0, t1, t2;
	int fd, ok = 1;

	r.piece = (r.piece + 2 * MiB - 1) & ~(2 * MiB - 1);
	r.pieces = (uint32_t)((bytes + r.piece - 1) / r.piece);
	r.done = calloc(r.pieces, sizeof(*r.done));
	if (r.done == NULL)
		die("calloc", strerror(errno));
	t0 = now_s();
	fd = memfd_create("pool-probe", MFD_CLOEXEC | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
	if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0)
		die("memfd", strerror(errno));
	r.map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (r.map == MAP_FAILED)
		die("mmap", strerror(errno));
	t1 = now_s();
	res->map = t1 - t0;
	for (unsigned i = 0; i < threads; i++)
		if (pthread_create(&tids[i], NULL, populate_main, &r) != 0)
			die("pthread_create", "populating thread");
	if (pipelined && pthread_create(&reg, NULL, register_main, &r) != 0)
		die("pthread_create", "registering thread");
	for (unsigned i = 0; i < threads; i++)
		pthread_join(tids[i], NULL);
	t2 = now_s();
	res->populate = t2 - t1;
	if (pipelined)
		pthread_join(reg, NULL);
	else if (atomic_load(&r.err) == 0 && register_range(r.map, bytes) != 0)
		atomic_store(&r.err, EIO);
	res->reg = now_s() - t2;        /* pieces: what registration added after population */
	res->total = now_s() - t0;
	if (atomic_load(&r.err) != 0) {
		fprintf(stderr, "pool_probe: %s\n", atomic_load(&r.err) == EIO ? cudaGetErrorString(cudaGetLastError())
									: strerror(atomic_load(&r.err)));
		ok = 0;
	}
	res->span_copy = res->inside_copy = -1;
	if (ok && pipelined && r.pieces > 1) {
		void *dev = NULL;
		cudaStream_t s;

		if (cudaMalloc(&dev, 2 * r.piece) == cudaSuccess && cudaStreamCreate(&s) == cudaSuccess) {
			uint64_t n = r.piece < 64 * MiB ? r.piece : 64 * MiB;

			res->inside_copy = copy_gbps(dev, r.map, n, s);
			res->span_copy = copy_gbps(dev, r.map + r.piece - n / 2, n, s);
			cudaStreamDestroy(s);
		}
		cudaFree(dev);
	}
	if (ok) {
		if (pipelined) {
			for (uint32_t i = 0; i < r.pieces; i++)
				cudaHostUnregister(r.map + (uint64_t)i * r.piece);
		} else {
			cudaHostUnregister(r.map);
		}
	}
	munmap(r.map, bytes);
	close(fd);
	free(r.done);
	return ok ? 0 : -1;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double med(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp);
	return v[n / 2];
}

int main(int argc, char **argv)
{
	const char *threads_list = "1,2,4,6,8,12", *pages = "huge", *order = "both";
	uint64_t gib = 4, piece_mib = 256;
	int repeat = 3, gpu = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(a, "--help") == 0) {
			printf("usage: pool_probe [--gib N] [--threads 1,2,4,8] [--pages huge|small]\n"
			       "                  [--register whole|pieces|both] [--piece MiB] [--repeat N] [--gpu N]\n");
			return 0;
		}
		if (v == NULL)
			die(a, "needs a value (--help)");
		if (strcmp(a, "--gib") == 0)
			gib = strtoull(v, NULL, 10);
		else if (strcmp(a, "--threads") == 0)
			threads_list = v;
		else if (strcmp(a, "--pages") == 0)
			pages = v;
		else if (strcmp(a, "--register") == 0)
			order = v;
		else if (strcmp(a, "--piece") == 0)
			piece_mib = strtoull(v, NULL, 10);
		else if (strcmp(a, "--repeat") == 0)
			repeat = atoi(v);
		else if (strcmp(a, "--gpu") == 0)
			gpu = atoi(v);
		else
			die(a, "unknown option (--help)");
		i++;
	}
	if (gib == 0 || gib > 1024 || piece_mib == 0 || repeat < 1 || repeat > MAX_RUNS ||
	    (strcmp(pages, "huge") != 0 && strcmp(pages, "small") != 0) ||
	    (strcmp(order, "whole") != 0 && strcmp(order, "pieces") != 0 && strcmp(order, "both") != 0))
		die("options", "out of range (--help)");
	if (cudaSetDevice(gpu) != cudaSuccess || cudaFree(NULL) != cudaSuccess)
		die("CUDA", cudaGetErrorString(cudaGetLastError()));

	printf("%-7s %-6s %7s %10s %10s %10s %10s %12s\n", "order", "pages", "threads", "map", "populate",
	       "register", "total", "span copy");
	for (const char *p = threads_list; *p != '\0';) {
		char *end;
		unsigned long threads = strtoul(p, &end, 10);

		if (end == p || threads == 0 || threads > MAX_THREADS)
			die("--threads", "a list of counts 1..64");
		for (int pl = 0; pl < 2; pl++) {
			double m[MAX_RUNS], po[MAX_RUNS], rg[MAX_RUNS], to[MAX_RUNS], span = -1, inside = -1;
			int n = 0;

			if ((pl == 0 && strcmp(order, "pieces") == 0) || (pl == 1 && strcmp(order, "whole") == 0))
				continue;
			for (int k = 0; k < repeat; k++) {
				struct result r;

				if (one(gib << 30, (unsigned)threads, pages[0] == 'h', pl, piece_mib * MiB, &r) != 0)
					return 1;
				m[n] = r.map * 1e3 / (double)gib;
				po[n] = r.populate * 1e3 / (double)gib;
				rg[n] = r.reg * 1e3 / (double)gib;
				to[n] = r.total * 1e3 / (double)gib;
				span = r.span_copy;
				inside = r.inside_copy;
				n++;
			}
			printf("%-7s %-6s %7lu %7.1f ms %7.1f ms %7.1f ms %7.1f ms", pl ? "pieces" : "whole", pages,
			       threads, med(m, n), med(po, n), med(rg, n), med(to, n));
			if (pl)
				printf("  %s", span_text(span, inside));
			printf("   (per GiB, medians of %d)\n", n);
			fflush(stdout);
		}
		p = *end == ',' ? end + 1 : end;
	}
	return 0;
}

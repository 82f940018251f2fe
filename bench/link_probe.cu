/* Probe of what the PCIe link gives each copy method, one way and both ways at once. */
/*
 * KV swaps move many pieces between GPU memory and pinned host memory. This
 * measures, outside the library, what each way of moving them can reach on
 * this machine, so the KV kernel's figures are read against the link:
 *   ce     the copy engines: one cudaMemcpyAsync per piece (or one for the
 *          whole buffer with a piece of 0);
 *   sm     SM loads and stores of 16-byte vectors through mapped host
 *          memory, the KV kernel's method written plainly (zero-copy);
 *   bulk   SM bulk copies (sm_90's cp.async.bulk): each CTA moves a piece
 *          from its source into shared memory and out to its destination,
 *          a pipeline of --stages slots per CTA, --ctas CTAs per SM;
 *   kv     the library's own kernel (kv_kernel.cu, included), launched as
 *          kv_cuda.c launches it (--kv-unroll and --kv-grid, a percentage
 *          of that grid, try others).
 * Both at once, the sm and kv methods give each direction half their grid,
 * or --in-grid and --out-grid percent of that half; the table says when
 * each direction ended.
 * Each method moves --bytes host -> device ("in"), device -> host ("out")
 * and both at once on two streams (two buffers each way, as an engine
 * evicting one request while loading another), launched together, or the
 * second --stagger microseconds after the first, in pieces of every size of
 * --piece, the device side of each piece at a random place (a seeded
 * permutation; --scatter both: the host side too). The host buffers are
 * cudaHostAlloc's (--host alloc), or registered with cudaHostRegister:
 * private memory in transparent huge pages (thp) or in 4 KiB pages (4k),
 * or a shared memfd in 4 KiB pages (memfd, as a job's pinned pool without
 * huge pages reserved). It prints GB/s (GPU-timed), the median of --repeat
 * runs, and checks every byte of the last run of each.
 * --cpu-copy THREADS,... measures host memory instead: threads copying
 * --bytes of ordinary memory into pinned memory (the prefetch engine's read
 * feed), alone and while the copy engines pull another pinned buffer.
 * Usage: link_probe [--bytes MiB] [--piece KiB,...] [--methods ce,sm,bulk,kv]
 *        [--ctas N] [--stages N] [--host alloc|thp|4k|memfd]
 *        [--scatter device|both] [--stagger US] [--kv-unroll 2|4|8]
 *        [--kv-grid PCT] [--in-grid PCT] [--out-grid PCT]
 *        [--cpu-copy THREADS,...] [--repeat N] [--gpu N]
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "bench_stats.h"

/* The library's KV kernels as built (aeg_kv_copy_*), to run them in this harness ("kv"). */
#include "../src/lib/kv/kv_kernel.cu"

#define MiB (UINT64_C(1) << 20)
#define KiB (UINT64_C(1) << 10)
#define MAX_REPEAT 32
#define MAX_PIECES 16
#define SM_THREADS 512
#define SM_UNROLL 4
#define BULK_SLOT (32 * KiB)   /* a bulk copy's shared-memory slot; larger pieces go in slots */
#define MAX_STAGES 6

/* The work of one direction: @n pieces of @piece bytes, piece i from src + i * piece to dst + at[i] * piece. */
struct job {
	const char *src;
	char *dst;
	const uint32_t *at;     /* device array: where each piece lies on the device side */
	const uint32_t *hat;    /* where each lies on the host side (--scatter both), or NULL: in order */
	int at_dst;             /* 1: the device side is dst (in), 0: it is src (out) */
	uint64_t piece, n;
};

__device__ __forceinline__ uint64_t host_at(const struct job &j, uint64_t i)
{
	return j.hat != NULL ? j.hat[i] : i;
}

__device__ __forceinline__ uint64_t src_off(const struct job &j, uint64_t i)
{
	return (j.at_dst ? host_at(j, i) : j.at[i]) * j.piece;
}

__device__ __forceinline__ uint64_t dst_off(const struct job &j, uint64_t i)
{
	return (j.at_dst ? j.at[i] : host_at(j, i)) * j.piece;
}

/* SM loads and stores: a warp takes 512 contiguous bytes of a piece; pieces are multiples of 256 bytes. */
__global__ void __launch_bounds__(SM_THREADS) sm_copy(const struct job j)
{
	const uint64_t vecs_per_piece = j.piece / 16, total = vecs_per_piece * j.n;
	const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;

	for (uint64_t v = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += SM_UNROLL * stride) {
		uint4 r[SM_UNROLL];
		uint4 *to[SM_UNROLL];

#pragma unroll
		for (int u = 0; u < SM_UNROLL; u++) {
			uint64_t w = v + u * stride;

			if (w < total) {
				uint64_t i = w / vecs_per_piece, o = w - i * vecs_per_piece;

				r[u] = reinterpret_cast<const uint4 *>(j.src + src_off(j, i))[o];
				to[u] = reinterpret_cast<uint4 *>(j.dst + dst_off(j, i)) + o;
			}
		}
#pragma unroll
		for (int u = 0; u < SM_UNROLL; u++)
			if (v + u * stride < total)
				*to[u] = r[u];
	}
}

/* The bulk copy's PTX (sm_90): a load into a slot that completes on an mbarrier, a store out of it. */
__device__ __forceinline__ uint32_t smem_addr(const void *p)
{
	return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void bar_init(uint64_t *bar)
{
	asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)));
	asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void bulk_load(void *slot, const void *src, uint32_t bytes, uint64_t *bar)
{
	asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
		     : "memory");
	asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
		     ::"r"(smem_addr(slot)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
		     : "memory");
}

__device__ __forceinline__ void bar_wait(uint64_t *bar, uint32_t phase)
{
	uint32_t done = 0;

	while (!done)
		asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
			     : "=r"(done)
			     : "r"(smem_addr(bar)), "r"(phase)
			     : "memory");
}

__device__ __forceinline__ void bulk_store(void *dst, const void *slot, uint32_t bytes)
{
	asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(slot)),
		     "r"(bytes)
		     : "memory");
	asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

/* At most @n bulk stores still reading their slots. */
template <int N> __device__ __forceinline__ void stores_reading_at_most(void)
{
	asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void stores_done(void)
{
	asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

/*
 * One thread per CTA drives a pipeline of @stages slots over the CTA's
 * units (slot-sized parts of pieces, CTA b taking units b, b + grid, ...):
 * loads run @stages ahead; a slot is loaded again once the store out of it
 * has read it.
 */
__global__ void bulk_copy(const struct job j, int stages)
{
	extern __shared__ __align__(128) char slots[];
	__shared__ __align__(8) uint64_t bars[MAX_STAGES];
	const uint64_t unit = j.piece < BULK_SLOT ? j.piece : BULK_SLOT;
	const uint64_t per_piece = j.piece / unit, units = per_piece * j.n;
	uint64_t mine, k;

	if (threadIdx.x != 0 || blockIdx.x >= units)
		return;
	mine = (units - blockIdx.x + gridDim.x - 1) / gridDim.x;
	for (int s = 0; s < stages; s++)
		bar_init(&bars[s]);
#define UNIT_SRC(k) (j.src + src_off(j, (k) / per_piece) + ((k) % per_piece) * unit)
#define UNIT_DST(k) (j.dst + dst_off(j, (k) / per_piece) + ((k) % per_piece) * unit)
	for (k = 0; k < mine && k < (uint64_t)stages; k++)
		bulk_load(slots + k * unit, UNIT_SRC(blockIdx.x + k * gridDim.x), (uint32_t)unit, &bars[k]);
	for (k = 0; k < mine; k++) {
		uint64_t u = blockIdx.x + k * gridDim.x;
		int s = (int)(k % stages);

		bar_wait(&bars[s], (uint32_t)((k / stages) & 1));
		bulk_store(UNIT_DST(u), slots + s * unit, (uint32_t)unit);
		/* Reload the previous unit's slot once its store has read it. */
		if (k >= 1 && k - 1 + stages < mine) {
			int ps = (int)((k - 1) % stages);

			stores_reading_at_most<1>();
			bulk_load(slots + ps * unit, UNIT_SRC(blockIdx.x + (k - 1 + stages) * gridDim.x), (uint32_t)unit,
				  &bars[ps]);
		}
	}
	stores_done();
#undef UNIT_SRC
#undef UNIT_DST
}

static void check(cudaError_t e, const char *what)
{
	if (e != cudaSuccess) {
		fprintf(stderr, "link_probe: %s: %s\n", what, cudaGetErrorString(e));
		exit(1);
	}
}

enum method { CE, SM, BULK, KV, METHODS };
static const char *const method_name[] = { "ce", "sm", "bulk", "kv" };

/* How the pinned host buffers are made. */
enum host_mem { HOST_ALLOC, HOST_THP, HOST_4K, HOST_MEMFD };
static const char *const host_name[] = { "alloc", "thp", "4k", "memfd" };

struct setup {
	int sms, ctas, stages, scatter_host;
	enum host_mem mem;
	uint64_t bytes;
	char *host_in, *host_out;       /* pinned, mapped: the sources of "in", the destinations of "out" */
	char *dev_in, *dev_out;         /* the destinations of "in", the sources of "out" */
	uint32_t *dperm, *hperm;        /* where piece i lies on the device / host side (device arrays) */
	uint32_t *dperm_h, *hperm_h;    /* the same in host memory */
	uint32_t *pairs_in, *pairs_out; /* the KV kernel's (source, destination) ids of each direction */
	int stagger_us;                 /* both at once: the second launch this long after the first, ungated */
	int kv_unroll, kv_grid_pct;     /* the KV kernel's variant, and its grid as a share of kv_cuda.c's */
	int grid_pct[2];                /* sm and kv, both at once: each direction's grid (in, out), percent */
	double end_ms[2];               /* both at once: when each direction ended, medians of the last measure */
	cudaStream_t s[2];
	cudaEvent_t start, end[2];
};

/* Queue one direction's copy on @stream; @share: the part of the GPU's SMs it may take (1 or 2 for half). */
static void launch(const struct setup *st, enum method m, struct job j, cudaStream_t stream, int share)
{
	const int pct = share > 1 ? st->grid_pct[j.at_dst ? 0 : 1] : 100;

	switch (m) {
	case CE:
		if (j.piece == st->bytes) {
			check(cudaMemcpyAsync(j.dst, j.src, j.piece, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
			break;
		}
		for (uint64_t i = 0; i < j.n; i++) {
			uint64_t d = (uint64_t)st->dperm_h[i] * j.piece, h = (uint64_t)st->hperm_h[i] * j.piece;

			check(cudaMemcpyAsync(j.dst + (j.at_dst ? d : h), j.src + (j.at_dst ? h : d), j.piece,
					      cudaMemcpyDefault, stream),
			      "cudaMemcpyAsync");
		}
		break;
	case SM:
		sm_copy<<<(st->sms * 2 / share * pct + 99) / 100, SM_THREADS, 0, stream>>>(j);
		break;
	case BULK: {
		uint64_t unit = j.piece < BULK_SLOT ? j.piece : BULK_SLOT;

		bulk_copy<<<st->sms * st->ctas / share, 32, (size_t)(unit * st->stages), stream>>>(j, st->stages);
		break;
	}
	case KV: {
		/* As kv_cuda.c launches it for such pieces: unroll 4, one CTA per SM when sharing. */
		uint32_t vecs = (uint32_t)(j.piece / 16), shift = 0;
		struct kv_kargs a;

		while ((1u << shift) < vecs)
			shift++;
		memset(&a, 0, sizeof(a));
		a.src0 = (uintptr_t)j.src;
		a.dst0 = (uintptr_t)j.dst;
		a.src_stride = a.dst_stride = j.piece;
		a.pairs = j.at_dst ? st->pairs_in : st->pairs_out;
		a.total_vecs = (uint32_t)(j.n * vecs);
		a.piece_vecs = vecs;
		a.piece_shift = shift;
		a.count = 1;
		{
			int p2 = (1u << shift) == vecs;
			unsigned grid = (unsigned)(st->sms * 2 / share * st->kv_grid_pct / 100 * pct / 100);
			void (*k)(const struct kv_kargs) = st->kv_unroll == 2 ? (p2 ? aeg_kv_copy_u2_p2 : aeg_kv_copy_u2)
							 : st->kv_unroll == 8 ? (p2 ? aeg_kv_copy_u8_p2 : aeg_kv_copy_u8)
							 : (p2 ? aeg_kv_copy_u4_p2 : aeg_kv_copy_u4);

			k<<<grid ? grid : 1, KV_KERNEL_THREADS, 0, stream>>>(a);
		}
		break;
	}
	default:
		break;
	}
	check(cudaGetLastError(), "launch");
}

/* GB/s of @dirs (1: in, 2: out, 3: both at once) by @m in pieces of @piece bytes, median of @repeat. */
static double measure(struct setup *st, enum method m, uint64_t piece, int dirs, int repeat)
{
	double gbs[MAX_REPEAT], end_in[MAX_REPEAT], end_out[MAX_REPEAT];
	uint64_t n = st->bytes / piece;
	const uint32_t *hp = st->scatter_host ? st->hperm : NULL;
	struct job in = { st->host_in, st->dev_in, st->dperm, hp, 1, piece, n };
	struct job out = { st->dev_out, st->host_out, st->dperm, hp, 0, piece, n };
	int both = dirs == 3;

	for (int r = 0; r < repeat + 1; r++) {
		float ms = 0, ms1 = 0;

		check(cudaEventRecord(st->start, st->s[0]), "cudaEventRecord");
		if (!(both && st->stagger_us > 0))
			check(cudaStreamWaitEvent(st->s[1], st->start, 0), "cudaStreamWaitEvent");
		if (dirs & 1)
			launch(st, m, in, st->s[0], both ? 2 : 1);
		if (both && st->stagger_us > 0) {
			struct timespec t0, t;

			clock_gettime(CLOCK_MONOTONIC, &t0);
			do
				clock_gettime(CLOCK_MONOTONIC, &t);
			while ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000 < st->stagger_us);
		}
		if (dirs & 2)
			launch(st, m, out, st->s[1], both ? 2 : 1);
		check(cudaEventRecord(st->end[0], st->s[0]), "cudaEventRecord");
		check(cudaEventRecord(st->end[1], st->s[1]), "cudaEventRecord");
		check(cudaDeviceSynchronize(), "copy");
		check(cudaEventElapsedTime(&ms, st->start, st->end[0]), "cudaEventElapsedTime");
		check(cudaEventElapsedTime(&ms1, st->start, st->end[1]), "cudaEventElapsedTime");
		if (r > 0) {    /* the first run warms up */
			end_in[r - 1] = ms;
			end_out[r - 1] = ms1;
		}
		if (ms1 > ms)
			ms = ms1;
		if (r > 0)
			gbs[r - 1] = (double)st->bytes * (both ? 2 : 1) / (ms * 1e6);
	}
	st->end_ms[0] = median(end_in, repeat);
	st->end_ms[1] = median(end_out, repeat);
	return median(gbs, repeat);
}

/* Every byte of the last copies where it should be: in from host_in, out into host_out. */
static int verify(struct setup *st, uint64_t piece, int dirs)
{
	uint64_t n = st->bytes / piece;
	char *back = (char *)malloc(st->bytes);
	int bad = 0;

	if (back == NULL) {
		fprintf(stderr, "link_probe: out of memory\n");
		exit(1);
	}
	if (dirs & 1) {
		check(cudaMemcpy(back, st->dev_in, st->bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
		for (uint64_t i = 0; i < n && !bad; i++)
			bad = memcmp(back + (uint64_t)st->dperm_h[i] * piece,
				     st->host_in + (uint64_t)(st->scatter_host ? st->hperm_h[i] : i) * piece, piece) != 0;
	}
	if ((dirs & 2) && !bad) {
		check(cudaMemcpy(back, st->dev_out, st->bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
		for (uint64_t i = 0; i < n && !bad; i++)
			bad = memcmp(st->host_out + (uint64_t)(st->scatter_host ? st->hperm_h[i] : i) * piece,
				     back + (uint64_t)st->dperm_h[i] * piece, piece) != 0;
	}
	free(back);
	return bad;
}

static void fill(char *p, uint64_t bytes, uint64_t seed)
{
	for (uint64_t i = 0; i < bytes / 8; i++) {
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
		((uint64_t *)p)[i] = seed ^ (seed >> 29);
	}
}

/* A seeded random permutation of 0..n-1. */
static void permute(uint32_t *v, uint64_t n, unsigned seed)
{
	for (uint64_t i = 0; i < n; i++)
		v[i] = (uint32_t)i;
	srand(seed);
	for (uint64_t i = n - 1; i > 0; i--) {
		uint64_t k = (uint64_t)rand() % (i + 1);
		uint32_t t = v[i];

		v[i] = v[k];
		v[k] = t;
	}
}

/* Pinned, mapped host memory of @bytes made the way @mem says. */
static char *host_buffer(enum host_mem mem, uint64_t bytes)
{
	char *p = NULL;

	if (mem == HOST_ALLOC) {
		check(cudaHostAlloc(&p, bytes, cudaHostAllocMapped), "cudaHostAlloc");
		return p;
	}
	if (mem == HOST_MEMFD) {
		int fd = memfd_create("link_probe", MFD_CLOEXEC);

		if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0)
			return NULL;
		p = (char *)mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
		close(fd);
	} else {
		/* 2 MiB aligned, so transparent huge pages can back it whole. */
		char *raw = (char *)mmap(NULL, bytes + (2 * MiB), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (raw == MAP_FAILED)
			return NULL;
		p = (char *)(((uintptr_t)raw + 2 * MiB - 1) & ~(uintptr_t)(2 * MiB - 1));
		madvise(p, bytes, mem == HOST_THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
		memset(p, 0, bytes);
	}
	if (p == MAP_FAILED)
		return NULL;
	check(cudaHostRegister(p, bytes, cudaHostRegisterMapped), "cudaHostRegister");
	return p;
}

/*
 * --cpu-copy: what host memory gives a CPU copy from ordinary memory into
 * pinned memory (the prefetch engine's read feed: page cache -> staging
 * ring), with @threads threads, alone and while the copy engines pull
 * another pinned buffer to the GPU (the ring's bytes going on to the GPU).
 */
struct cpu_copier {
	char *src, *dst;
	uint64_t bytes;
	volatile int *stop;     /* NULL: one pass; else copy again until set */
	uint64_t copied;
};

static void *cpu_copy_main(void *arg)
{
	struct cpu_copier *c = (struct cpu_copier *)arg;
	const uint64_t piece = 16 * MiB;

	do {
		for (uint64_t off = 0; off < c->bytes; off += piece) {
			uint64_t n = c->bytes - off < piece ? c->bytes - off : piece;

			memcpy(c->dst + off, c->src + off, n);
			c->copied += n;
			if (c->stop != NULL && *c->stop)
				break;
		}
	} while (c->stop != NULL && !*c->stop);
	return NULL;
}

static double seconds_since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

/* CPU copy GB/s of @threads threads into st->host_out, alone (@dma 0) or beside H2D copies of st->host_in. */
static double cpu_copy(struct setup *st, char *src, int threads, int dma, double *dma_gbs)
{
	struct cpu_copier c[64];
	pthread_t tid[64];
	volatile int stop = 0;
	uint64_t share = st->bytes / (uint64_t)threads / 4096 * 4096, total = 0;
	const int rounds = 4;
	struct timespec t0;
	double secs;
	float ms = 0;

	if (dma) {
		check(cudaEventRecord(st->start, st->s[0]), "cudaEventRecord");
		for (int r = 0; r < rounds; r++)
			check(cudaMemcpyAsync(st->dev_in, st->host_in, st->bytes, cudaMemcpyHostToDevice, st->s[0]),
			      "cudaMemcpyAsync");
		check(cudaEventRecord(st->end[0], st->s[0]), "cudaEventRecord");
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < threads; i++) {
		c[i] = (struct cpu_copier){ src + i * share, st->host_out + i * share, share, dma ? &stop : NULL, 0 };
		if (pthread_create(&tid[i], NULL, cpu_copy_main, &c[i]) != 0) {
			fprintf(stderr, "link_probe: pthread_create failed\n");
			exit(1);
		}
	}
	if (dma) {
		check(cudaEventSynchronize(st->end[0]), "cudaEventSynchronize");
		stop = 1;
	}
	for (int i = 0; i < threads; i++) {
		pthread_join(tid[i], NULL);
		total += c[i].copied;
	}
	secs = seconds_since(&t0);
	if (dma) {
		check(cudaEventElapsedTime(&ms, st->start, st->end[0]), "cudaEventElapsedTime");
		*dma_gbs = (double)st->bytes * rounds / (ms * 1e6);
	}
	return (double)total / secs / 1e9;
}

static void cpu_copy_table(struct setup *st, const char *threads_list, int repeat)
{
	char *src = (char *)malloc(st->bytes), *list = strdup(threads_list);
	double alone[MAX_REPEAT], beside[MAX_REPEAT], dma[MAX_REPEAT];

	if (src == NULL || list == NULL) {
		fprintf(stderr, "link_probe: out of memory\n");
		exit(1);
	}
	fill(src, st->bytes, 3);
	check(cudaMemcpy(st->dev_in, st->host_in, st->bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
	printf("CPU copy, ordinary -> pinned memory (%llu MiB), GB/s, median of %d: alone | beside the copy engines' "
	       "H2D of another pinned buffer: CPU copy, H2D, sum\n",
	       (unsigned long long)(st->bytes / MiB), repeat);
	for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
		int threads = atoi(tok);

		if (threads < 1 || threads > 64)
			continue;
		for (int r = 0; r < repeat; r++) {
			alone[r] = cpu_copy(st, src, threads, 0, NULL);
			beside[r] = cpu_copy(st, src, threads, 1, &dma[r]);
		}
		{
			double a = median(alone, repeat), b = median(beside, repeat), d = median(dma, repeat);

			printf("%2d threads  %6.1f | %6.1f %6.1f %6.1f\n", threads, a, b, d, b + d);
		}
		fflush(stdout);
	}
	free(list);
	free(src);
}

static int usage(void)
{
	fprintf(stderr, "usage: link_probe [--bytes MiB] [--piece KiB,...] [--methods ce,sm,bulk,kv] [--ctas N] "
			"[--stages N] [--host alloc|thp|4k|memfd] [--scatter device|both] [--stagger US] "
			"[--kv-unroll 2|4|8] [--kv-grid PCT] [--in-grid PCT] [--out-grid PCT] [--cpu-copy THREADS,...] [--repeat N] [--gpu N]\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct setup st;
	uint64_t pieces[MAX_PIECES];
	int npieces = 0, repeat = 5, gpu = 0, use[METHODS] = { 1, 1, 1, 1 };
	char *list = NULL;
	const char *cpu_threads = NULL;
	cudaDeviceProp prop;

	memset(&st, 0, sizeof(st));
	st.bytes = 1024 * MiB;
	st.ctas = 2;
	st.stages = 4;
	st.mem = HOST_ALLOC;
	st.kv_unroll = 4;
	st.kv_grid_pct = 100;
	st.grid_pct[0] = st.grid_pct[1] = 100;
	for (int i = 1; i < argc; i += 2) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (v == NULL)
			return usage();
		if (strcmp(a, "--bytes") == 0) {
			st.bytes = strtoull(v, NULL, 10) * MiB;
		} else if (strcmp(a, "--piece") == 0) {
			list = argv[i + 1];
		} else if (strcmp(a, "--methods") == 0) {
			for (int m = 0; m < METHODS; m++)
				use[m] = strstr(v, method_name[m]) != NULL;
		} else if (strcmp(a, "--cpu-copy") == 0) {
			cpu_threads = v;
		} else if (strcmp(a, "--kv-unroll") == 0) {
			st.kv_unroll = atoi(v);
		} else if (strcmp(a, "--kv-grid") == 0) {
			st.kv_grid_pct = atoi(v);
		} else if (strcmp(a, "--in-grid") == 0 || strcmp(a, "--out-grid") == 0) {
			st.grid_pct[a[2] == 'o'] = atoi(v);
		} else if (strcmp(a, "--stagger") == 0) {
			st.stagger_us = atoi(v);
		} else if (strcmp(a, "--ctas") == 0) {
			st.ctas = atoi(v);
		} else if (strcmp(a, "--stages") == 0) {
			st.stages = atoi(v);
		} else if (strcmp(a, "--host") == 0) {
			int k = 0;

			while (k < 4 && strcmp(v, host_name[k]) != 0)
				k++;
			if (k == 4)
				return usage();
			st.mem = (enum host_mem)k;
		} else if (strcmp(a, "--scatter") == 0) {
			if (strcmp(v, "device") && strcmp(v, "both"))
				return usage();
			st.scatter_host = strcmp(v, "both") == 0;
		} else if (strcmp(a, "--repeat") == 0) {
			repeat = atoi(v);
		} else if (strcmp(a, "--gpu") == 0) {
			gpu = atoi(v);
		} else {
			return usage();
		}
	}
	if (st.bytes == 0 || st.bytes / 256 > UINT32_MAX || repeat < 1 || repeat > MAX_REPEAT || st.ctas < 1 ||
	    st.stages < 2 || st.stages > MAX_STAGES || (st.kv_unroll != 2 && st.kv_unroll != 4 && st.kv_unroll != 8) ||
	    st.kv_grid_pct < 1 || st.kv_grid_pct > 1000 || st.stagger_us < 0 ||
	    st.grid_pct[0] < 1 || st.grid_pct[0] > 1000 || st.grid_pct[1] < 1 || st.grid_pct[1] > 1000) {
		fprintf(stderr, "link_probe: --bytes 1..%llu MiB, --repeat 1..%d, --ctas 1.., --stages 2..%d, "
				"--kv-unroll 2|4|8, --kv-grid, --in-grid, --out-grid 1..1000, --stagger 0..\n",
			(unsigned long long)((UINT64_C(256) << 32) / MiB), MAX_REPEAT, MAX_STAGES);
		return usage();
	}
	for (char *tok = list ? strtok(list, ",") : NULL; tok && npieces < MAX_PIECES; tok = strtok(NULL, ","))
		pieces[npieces++] = strtoull(tok, NULL, 10) * KiB;
	if (npieces == 0) {
		static const uint64_t dflt[] = { 4, 16, 32, 64, 256, 1024, 2048 };

		for (unsigned i = 0; i < sizeof(dflt) / sizeof(dflt[0]); i++)
			pieces[npieces++] = dflt[i] * KiB;
	}
	for (int i = 0; i < npieces; i++) {
		if (pieces[i] == 0)
			pieces[i] = st.bytes;
		else if (pieces[i] % 256 || st.bytes % pieces[i] || (pieces[i] > BULK_SLOT && pieces[i] % BULK_SLOT)) {
			fprintf(stderr, "link_probe: a piece of %llu KiB: pieces are multiples of 256 bytes that divide "
					"--bytes, and above 32 KiB multiples of 32 KiB\n",
				(unsigned long long)(pieces[i] / KiB));
			return usage();
		}
	}

	check(cudaSetDevice(gpu), "cudaSetDevice");
	check(cudaGetDeviceProperties(&prop, gpu), "cudaGetDeviceProperties");
	st.sms = prop.multiProcessorCount;
	check(cudaFuncSetAttribute(bulk_copy, cudaFuncAttributeMaxDynamicSharedMemorySize,
				   (int)(BULK_SLOT * st.stages)),
	      "cudaFuncSetAttribute");
	st.host_in = host_buffer(st.mem, st.bytes);
	st.host_out = host_buffer(st.mem, st.bytes);
	if (st.host_in == NULL || st.host_out == NULL) {
		fprintf(stderr, "link_probe: host buffers of %llu bytes (%s): %s\n", (unsigned long long)st.bytes,
			host_name[st.mem], strerror(errno));
		return 1;
	}
	check(cudaMalloc(&st.dev_in, st.bytes), "cudaMalloc");
	check(cudaMalloc(&st.dev_out, st.bytes), "cudaMalloc");
	fill(st.host_in, st.bytes, 1);
	{
		char *tmp = (char *)malloc(st.bytes);

		fill(tmp, st.bytes, 2);
		check(cudaMemcpy(st.dev_out, tmp, st.bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
		free(tmp);
	}
	st.dperm_h = (uint32_t *)malloc(st.bytes / 256 * sizeof(uint32_t));
	st.hperm_h = (uint32_t *)malloc(st.bytes / 256 * sizeof(uint32_t));
	check(cudaMalloc(&st.dperm, st.bytes / 256 * sizeof(uint32_t)), "cudaMalloc");
	check(cudaMalloc(&st.hperm, st.bytes / 256 * sizeof(uint32_t)), "cudaMalloc");
	check(cudaMalloc(&st.pairs_in, st.bytes / 256 * 2 * sizeof(uint32_t)), "cudaMalloc");
	check(cudaMalloc(&st.pairs_out, st.bytes / 256 * 2 * sizeof(uint32_t)), "cudaMalloc");
	for (int s = 0; s < 2; s++) {
		check(cudaStreamCreateWithFlags(&st.s[s], cudaStreamNonBlocking), "cudaStreamCreate");
		check(cudaEventCreate(&st.end[s]), "cudaEventCreate");
	}
	check(cudaEventCreate(&st.start), "cudaEventCreate");

	if (cpu_threads != NULL) {
		cpu_copy_table(&st, cpu_threads, repeat);
		return 0;
	}
	printf("link_probe: %s, %d SMs, %llu MiB each way, host memory %s, pieces scattered on the %s; "
	       "bulk: %d CTAs per SM, %d stages; GB/s, median of %d\n",
	       prop.name, st.sms, (unsigned long long)(st.bytes / MiB), host_name[st.mem],
	       st.scatter_host ? "device and the host" : "device", st.ctas, st.stages, repeat);
	printf("%-8s %-6s %8s %8s %8s  %s\n", "piece", "method", "in", "out", "both", "bytes");
	for (int p = 0; p < npieces; p++) {
		uint64_t n = st.bytes / pieces[p];

		permute(st.dperm_h, n, 7);
		if (st.scatter_host)
			permute(st.hperm_h, n, 11);
		else
			for (uint64_t i = 0; i < n; i++)
				st.hperm_h[i] = (uint32_t)i;
		check(cudaMemcpy(st.dperm, st.dperm_h, n * sizeof(uint32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
		check(cudaMemcpy(st.hperm, st.hperm_h, n * sizeof(uint32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
		{
			uint32_t *pin = (uint32_t *)malloc(n * 2 * sizeof(uint32_t)), *pout = (uint32_t *)malloc(n * 2 * sizeof(uint32_t));

			for (uint64_t i = 0; i < n; i++) {
				pin[2 * i] = st.hperm_h[i];
				pin[2 * i + 1] = st.dperm_h[i];
				pout[2 * i] = st.dperm_h[i];
				pout[2 * i + 1] = st.hperm_h[i];
			}
			check(cudaMemcpy(st.pairs_in, pin, n * 2 * sizeof(uint32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
			check(cudaMemcpy(st.pairs_out, pout, n * 2 * sizeof(uint32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
			free(pin);
			free(pout);
		}
		for (int m = 0; m < METHODS; m++) {
			double g[3];
			int bad = 0;

			if (!use[m] || (m == CE && n > 65536))
				continue;
			for (int d = 1; d <= 3; d++) {
				check(cudaMemset(st.dev_in, 0, st.bytes), "cudaMemset");
				memset(st.host_out, 0, st.bytes);
				g[d - 1] = measure(&st, (enum method)m, pieces[p], d, repeat);
				bad |= verify(&st, pieces[p], d);
			}
			if (pieces[p] == st.bytes)
				printf("%-8s", "whole");
			else
				printf("%-8llu", (unsigned long long)(pieces[p] / KiB));
			printf(" %-6s %8.1f %8.1f %8.1f  %-4s in ended %.2f ms, out %.2f ms\n", method_name[m], g[0], g[1],
			       g[2], bad ? "BAD" : "ok", st.end_ms[0], st.end_ms[1]);
			fflush(stdout);
		}
	}
	return 0;
}

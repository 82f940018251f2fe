/* Probe of what making a slab costs: cudaMalloc against the driver's virtual memory calls. */
/*
 * In a fresh process, after the context is made (timed apart), it times the
 * first cudaMalloc of SIZE (a share of the free memory, as a session's
 * prefetch slab is), its IPC handle and its cudaFree, then more rounds of
 * the same at each size of --sizes; then the driver's virtual memory calls
 * that could replace it: reserving the address range of SIZE, and making and
 * mapping physical memory into it (cuMemCreate, cuMemMap, cuMemSetAccess) in
 * one piece of --commit bytes or in pieces of --piece bytes. It prints
 * milliseconds per call, medians of the rounds, so whether a slab's cost is
 * the range or the memory behind it is measured before it is changed.
 * Usage: slab_probe [--share PERCENT] [--sizes GiB,...] [--commit GiB]
 *        [--piece MiB] [--repeat N] [--gpu N]
 */
#include "config.h"
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "bench_stats.h"

#define GiB (UINT64_C(1) << 30)
#define MiB (UINT64_C(1) << 20)
#define MAX_REPEAT 32
#define MAX_SIZES 16

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int die_cuda(const char *what, cudaError_t e)
{
	fprintf(stderr, "slab_probe: %s: %s\n", what, cudaGetErrorString(e));
	return 1;
}

static int die_cu(const char *what, CUresult r)
{
	fprintf(stderr, "slab_probe: %s: CUresult %d\n", what, (int)r);
	return 1;
}

/* The driver's virtual memory calls, through the runtime (no link to libcuda). */
static struct {
	PFN_cuMemAddressReserve_v10020 reserve;
	PFN_cuMemAddressFree_v10020 addr_free;
	PFN_cuMemCreate_v10020 create;
	PFN_cuMemRelease_v10020 release;
	PFN_cuMemMap_v10020 map;
	PFN_cuMemUnmap_v10020 unmap;
	PFN_cuMemSetAccess_v10020 set_access;
	PFN_cuMemGetAllocationGranularity_v10020 granularity;
} vm;

static int vm_load(void)
{
	static const char *names[] = { "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease",
				       "cuMemMap", "cuMemUnmap", "cuMemSetAccess", "cuMemGetAllocationGranularity" };
	void **slots[] = { (void **)&vm.reserve, (void **)&vm.addr_free, (void **)&vm.create, (void **)&vm.release,
			   (void **)&vm.map, (void **)&vm.unmap, (void **)&vm.set_access, (void **)&vm.granularity };

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		enum cudaDriverEntryPointQueryResult q;
		cudaError_t e = cudaGetDriverEntryPointByVersion(names[i], slots[i], 12000, cudaEnableDefault, &q);

		if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
			fprintf(stderr, "slab_probe: the driver has no %s\n", names[i]);
			return 1;
		}
	}
	return 0;
}

/* Reserve @size, then make and map @commit bytes in pieces of @piece; times in ms into @t[0..3]. */
static int vm_round(int gpu, uint64_t size, uint64_t commit, uint64_t piece, double t[4])
{
	CUmemAllocationProp prop = { .type = CU_MEM_ALLOCATION_TYPE_PINNED,
				     .location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = gpu } };
	CUmemAccessDesc access = { .location = prop.location, .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE };
	CUmemGenericAllocationHandle handles[4096];
	uint64_t n = (commit + piece - 1) / piece;
	CUdeviceptr base;
	CUresult r;
	double t0;

	if (n > sizeof(handles) / sizeof(handles[0]))
		return die_cu("too many pieces", CUDA_ERROR_INVALID_VALUE);
	t0 = now_ms();
	r = vm.reserve(&base, size, 2 * MiB, 0, 0);
	if (r != CUDA_SUCCESS)
		return die_cu("cuMemAddressReserve", r);
	t[0] = now_ms() - t0;
	t0 = now_ms();
	for (uint64_t i = 0; i < n; i++) {
		r = vm.create(&handles[i], piece, &prop, 0);
		if (r != CUDA_SUCCESS)
			return die_cu("cuMemCreate", r);
		r = vm.map(base + i * piece, piece, 0, handles[i], 0);
		if (r != CUDA_SUCCESS)
			return die_cu("cuMemMap", r);
	}
	t[1] = now_ms() - t0;
	t0 = now_ms();
	r = vm.set_access(base, n * piece, &access, 1);
	if (r != CUDA_SUCCESS)
		return die_cu("cuMemSetAccess", r);
	t[2] = now_ms() - t0;
	t0 = now_ms();
	for (uint64_t i = 0; i < n; i++) {
		vm.unmap(base + i * piece, piece);
		vm.release(handles[i]);
	}
	vm.addr_free(base, size);
	t[3] = now_ms() - t0;
	return 0;
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 10);

	if (end == s || *end != '\0' || v == 0) {
		fprintf(stderr, "slab_probe: %s '%s' is not a positive number\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	const char *sizes_arg = "1,4,16,64";
	uint64_t share = 90, commit = 4 * GiB, piece = 2 * GiB, sizes[MAX_SIZES], big;
	int repeat = 3, gpu = 0, nsizes = 0;
	double t0, ctx, first[3], r[4][MAX_REPEAT], m[3][MAX_REPEAT];
	size_t free_b, total_b;
	cudaIpcMemHandle_t h;
	cudaError_t e;
	void *p;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
			printf("Usage: slab_probe [--share PERCENT] [--sizes GiB,...] [--commit GiB] [--piece MiB] "
			       "[--repeat N] [--gpu N]\n");
			return 0;
		}
		if (v == NULL) {
			fprintf(stderr, "slab_probe: %s needs a value (--help)\n", a);
			return 2;
		}
		if (strcmp(a, "--share") == 0)
			share = parse_u64(v, a);
		else if (strcmp(a, "--sizes") == 0)
			sizes_arg = v;
		else if (strcmp(a, "--commit") == 0)
			commit = parse_u64(v, a) * GiB;
		else if (strcmp(a, "--piece") == 0)
			piece = parse_u64(v, a) * MiB;
		else if (strcmp(a, "--repeat") == 0)
			repeat = (int)parse_u64(v, a);
		else if (strcmp(a, "--gpu") == 0)
			gpu = atoi(v);
		else {
			fprintf(stderr, "slab_probe: unknown option %s (--help)\n", a);
			return 2;
		}
		i++;
	}
	if (share > 99 || repeat > MAX_REPEAT || piece % (2 * MiB) != 0 || commit % piece != 0) {
		fprintf(stderr, "slab_probe: --share 1..99, --repeat 1..%d, --piece a multiple of 2 MiB, "
			"--commit a multiple of --piece\n", MAX_REPEAT);
		return 2;
	}
	for (char *s = strdup(sizes_arg), *tok = strtok(s, ","); tok && nsizes < MAX_SIZES; tok = strtok(NULL, ","))
		sizes[nsizes++] = parse_u64(tok, "--sizes") * GiB;

	e = cudaSetDevice(gpu);
	if (e != cudaSuccess)
		return die_cuda("cudaSetDevice", e);
	t0 = now_ms();
	e = cudaFree(0);
	if (e != cudaSuccess)
		return die_cuda("making the context", e);
	ctx = now_ms() - t0;
	e = cudaMemGetInfo(&free_b, &total_b);
	if (e != cudaSuccess)
		return die_cuda("cudaMemGetInfo", e);
	big = (uint64_t)free_b / 100 * share & ~(2 * MiB - 1);
	printf("context %.1f ms; %.1f GiB free of %.1f\n", ctx, free_b / (double)GiB, total_b / (double)GiB);

	/* The first allocation of the process, as a fresh session's slab is. */
	t0 = now_ms();
	e = cudaMalloc(&p, big);
	if (e != cudaSuccess)
		return die_cuda("cudaMalloc", e);
	first[0] = now_ms() - t0;
	t0 = now_ms();
	e = cudaIpcGetMemHandle(&h, p);
	if (e != cudaSuccess)
		return die_cuda("cudaIpcGetMemHandle", e);
	first[1] = now_ms() - t0;
	t0 = now_ms();
	cudaFree(p);
	first[2] = now_ms() - t0;
	printf("%-36s %10s %10s %10s\n", "cudaMalloc", "malloc", "ipc handle", "free");
	printf("%-36s %8.2f ms %7.2f ms %7.2f ms\n", "first, %share of free", first[0], first[1], first[2]);
	sizes[nsizes++] = big;
	for (int s = 0; s < nsizes; s++) {
		char label[64];

		for (int i = 0; i < repeat; i++) {
			t0 = now_ms();
			e = cudaMalloc(&p, sizes[s]);
			if (e != cudaSuccess)
				return die_cuda("cudaMalloc", e);
			m[0][i] = now_ms() - t0;
			t0 = now_ms();
			e = cudaIpcGetMemHandle(&h, p);
			if (e != cudaSuccess)
				return die_cuda("cudaIpcGetMemHandle", e);
			m[1][i] = now_ms() - t0;
			t0 = now_ms();
			cudaFree(p);
			m[2][i] = now_ms() - t0;
		}
		snprintf(label, sizeof(label), "later, %.1f GiB", sizes[s] / (double)GiB);
		printf("%-36s %8.2f ms %7.2f ms %7.2f ms\n", label, median(m[0], repeat), median(m[1], repeat),
		       median(m[2], repeat));
	}

	if (vm_load())
		return 1;
	printf("%-36s %10s %10s %10s %10s\n", "virtual memory", "reserve", "create+map", "access", "undo");
	for (int pass = 0; pass < 2; pass++) {
		uint64_t pc = pass == 0 ? commit : piece;
		char label[64];

		for (int i = 0; i < repeat; i++) {
			double t[4];

			if (vm_round(gpu, big, commit, pc, t))
				return 1;
			for (int k = 0; k < 4; k++)
				r[k][i] = t[k];
		}
		snprintf(label, sizeof(label), "%.1f GiB range, %.1f GiB in %" PRIu64 " piece%s", big / (double)GiB,
			 commit / (double)GiB, commit / pc, commit / pc == 1 ? "" : "s");
		printf("%-36s %7.3f ms %7.2f ms %7.2f ms %7.2f ms\n", label, median(r[0], repeat), median(r[1], repeat),
		       median(r[2], repeat), median(r[3], repeat));
	}
	return 0;
}

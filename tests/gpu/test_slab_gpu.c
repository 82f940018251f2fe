/* Slabs on a real GPU: device memory taken and given back, data, IPC export, reserved slabs. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/aegaeon.h>

#include "gpu_tap.h"

#include "internal.h"
#include "slab_internal.h"

#define MiB (1ull << 20)
#define GiB (1ull << 30)
/* cudaMalloc rounds to its own pages; free memory also moves by a few MiB on its own. */
#define SLACK (64 * MiB)

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static void data_round_trip(aeg_device_t *dev, aeg_slab_t *slab)
{
	enum { N = 64 };
	struct aeg_block blocks[N];
	unsigned char *host = malloc(MiB);
	int ok = host != NULL, aligned = 1;

	for (int i = 0; i < N && ok; i++) {
		ok = aeg_slab_alloc(slab, MiB - 100, &blocks[i]) == 0 &&
		     aeg_memset(dev, blocks[i].ptr, i + 1, MiB - 100) == 0;
		aligned &= (uintptr_t)blocks[i].ptr % AEG_SLAB_ALIGN == 0;
	}
	check(ok, "64 blocks allocated and filled on the GPU");
	check(aligned, "block pointers are 256-byte aligned");
	for (int i = 0; i < N && ok; i++) {
		ok = aeg_memcpy(dev, host, blocks[i].ptr, MiB - 100) == 0;
		for (uint64_t j = 0; ok && j < MiB - 100; j++)
			ok = host[j] == (unsigned char)(i + 1);
	}
	check(ok, "every block reads back its own fill byte");
	for (int i = 0; i < N; i++)
		aeg_slab_free(slab, blocks[i].id);
	free(host);
}

static void alloc_free_time(aeg_slab_t *slab)
{
	enum { BATCHES = 301, PAIRS = 1000 };
	uint64_t ns[BATCHES];
	struct aeg_block b;
	int ok = 1;

	for (int r = 0; r < BATCHES && ok; r++) {
		uint64_t t0 = aeg_now_ns();

		for (int i = 0; i < PAIRS && ok; i++)
			ok = aeg_slab_alloc(slab, MiB, &b) == 0 && aeg_slab_free(slab, b.id) == 0;
		ns[r] = (aeg_now_ns() - t0) / PAIRS;
	}
	check(ok, "alloc+free pairs of 1 MiB");
	if (!ok)
		return;
	qsort(ns, BATCHES, sizeof(ns[0]), cmp_u64);
	printf("# slab alloc+free of 1 MiB: median %" PRIu64 " ns (target <= 150 ns)\n", ns[BATCHES / 2]);
	check(ns[BATCHES / 2] <= 150, "alloc+free median within 150 ns");
}

static double ms_since(uint64_t t0)
{
	return (double)(aeg_now_ns() - t0) / 1e6;
}

/*
 * A reserved slab of 90% of the free memory, as a fresh process's session
 * makes: addresses at once and no memory, memory as blocks reach it, the
 * rest by aeg_slab_map_rest; data through it; no IPC handle; all given back.
 * Run first, in a fresh process, where a cudaMalloc of the same size costs
 * most.
 */
static void reserved_slab(aeg_device_t *dev)
{
	uint64_t before = gpu_free(dev), bytes = before / 10 * 9, t0, last;
	unsigned char host[4096], back[4096];
	double reserve_ms, first_ms, rest_ms;
	struct aeg_block big;
	aeg_handle_t handle;
	aeg_slab_t *slab;
	int err;

	t0 = aeg_now_ns();
	err = aeg_slab_create_reserved(dev, 0, bytes, &slab);
	reserve_ms = ms_since(t0);
	check(err == 0, "a slab of 90% of the free memory reserved on GPU 0");
	if (err != 0)
		return;
	check(aeg_slab_mapped_bytes(slab) == 0, "no memory behind a new reserved slab");
	check_free(gpu_free(dev) + SLACK >= before, "reserving takes no memory of the GPU");

	t0 = aeg_now_ns();
	err = aeg_slab_alloc(slab, 4 * GiB, &big);
	first_ms = ms_since(t0);
	check(err == 0 && aeg_slab_mapped_bytes(slab) >= 4 * GiB && aeg_slab_mapped_bytes(slab) <= 4 * GiB + 64 * MiB,
	      "a first block of 4 GiB maps 4 GiB");
	check_free(before - gpu_free(dev) >= 4 * GiB && before - gpu_free(dev) <= 4 * GiB + SLACK,
		   "the GPU's free memory fell by the mapped 4 GiB");
	for (size_t i = 0; i < sizeof(host); i++)
		host[i] = (unsigned char)(i * 7 + 3);
	last = big.size - sizeof(host);
	err = err ? err : aeg_memcpy(dev, (char *)big.ptr + last, host, sizeof(host));
	err = err ? err : aeg_memcpy(dev, back, (char *)big.ptr + last, sizeof(back));
	check(err == 0 && memcmp(host, back, sizeof(host)) == 0, "the block's last bytes written and read back");
	data_round_trip(dev, slab);

	t0 = aeg_now_ns();
	err = aeg_slab_map_rest(slab);
	rest_ms = ms_since(t0);
	if (!gpu_free_memory_checked() && err == AEG_ENOSPC)
		/* The tool's shadow of the mapped memory took what the rest needed: refused, as it must be. */
		check(aeg_slab_mapped_bytes(slab) >= 4 * GiB,
		      "the rest of the slab not mapped, AEG_ENOSPC, the mapped part kept # SKIP initcheck's shadow memory took the GPU's memory");
	else
		check(err == 0 && aeg_slab_mapped_bytes(slab) == aeg_slab_bytes(slab), "the rest of the slab mapped");
	check_free(before - gpu_free(dev) + SLACK >= bytes, "then the GPU's free memory fell by the slab's size");
	check(aeg_slab_export(slab, &handle) == AEG_ENOTSUP, "a reserved slab has no IPC handle (AEG_ENOTSUP)");
	printf("# reserved slab of %.1f GiB: reserve %.3f ms, first 4 GiB block %.3f ms, the rest %.1f ms\n",
	       (double)bytes / GiB, reserve_ms, first_ms, rest_ms);
	aeg_slab_free(slab, big.id);
	t0 = aeg_now_ns();
	aeg_slab_destroy(slab);
	printf("# reserved slab destroyed in %.1f ms\n", ms_since(t0));
	check_free(gpu_free(dev) + SLACK >= before, "destroying a reserved slab gives its memory back");
}

int main(void)
{
	struct aeg_slab_stats st;
	aeg_device_t *dev = NULL;
	aeg_slab_t *slab = NULL;
	aeg_handle_t handle;
	uint64_t before, during, after;
	void *opened = NULL;
	int count = 0, err;

	err = aeg_device_open(&dev, AEG_DEVICE_CUDA);
	check(err == 0, "cuda backend opens");
	if (err != 0)
		return 1;
	aeg_device_count(dev, &count);
	reserved_slab(dev);

	before = gpu_free(dev);
	err = aeg_slab_create(dev, 0, 4 * GiB + 1, &slab);
	check(err == 0, "4 GiB + 1 byte slab created on GPU 0");
	if (err != 0)
		goto out;
	during = gpu_free(dev);
	check(aeg_slab_bytes(slab) == 4 * GiB + AEG_SLAB_ALIGN, "slab size rounded up to 256 bytes");
	check_free(before - during >= 4 * GiB && before - during <= 4 * GiB + SLACK,
		   "the GPU's free memory fell by the slab's size");

	data_round_trip(dev, slab);
	alloc_free_time(slab);

	check(aeg_slab_export(slab, &handle) == 0, "slab exported as an IPC handle");
	err = aeg_mem_open_handle(dev, 0, &handle, &opened);
	check(err == 0 && opened == aeg_slab_base(slab), "own handle opens to the slab's base");
	if (err == 0)
		aeg_mem_close_handle(dev, opened);

	aeg_slab_stats(slab, &st);
	check(st.used_bytes == 0 && st.blocks == 0 && st.allocs == st.frees,
	      "stats back to zero after freeing every block");
	aeg_slab_destroy(slab);
	slab = NULL;
	after = gpu_free(dev);
	check_free(after + SLACK >= before, "destroy gives the device memory back");

	err = aeg_slab_create(dev, 0, after + GiB, &slab);
	check(err == AEG_ENOSPC && strstr(aeg_error_detail(), "free") != NULL,
	      "a slab over the free memory is refused with AEG_ENOSPC, naming the free bytes");
	printf("# %s\n", aeg_error_detail());
	if (err == 0) {
		aeg_slab_destroy(slab);
		slab = NULL;
	}
	check(aeg_slab_create(dev, count, MiB, &slab) == AEG_ENODEV, "a GPU index out of range is AEG_ENODEV");
	check(aeg_slab_create(dev, 0, 0, &slab) == AEG_EINVAL, "a slab of 0 bytes is AEG_EINVAL");
	check_free(gpu_free(dev) + SLACK >= before, "no device memory leaked by the refused creates");

out:
	aeg_slab_destroy(slab);
	aeg_device_close(dev);
	printf("1..%d\n", test_number);
	return failures == 0 ? 0 : 1;
}

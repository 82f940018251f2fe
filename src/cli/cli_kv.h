/* aegaeon-cli kv: options and results shared by cli_kv.c (arguments, output) and cli_kv_bench.c (runs). */
#ifndef AEGAEON_CLI_KV_H
#define AEGAEON_CLI_KV_H

#include <stdint.h>

#include <aegaeon/aegaeon.h>

#define KV_MAX_SIZES 16

struct kv_opts {
	const char *device;             /* NULL: the job's, else the configured one */
	int gpu;
	uint64_t sizes[KV_MAX_SIZES];
	int nsizes;
	uint32_t blocks;                /* per call; 0: call_bytes / block */
	uint64_t call_bytes;
	int layers;                     /* 0: blocks layout on both sides; N: per-layer K/V tensors on the GPU */
	int random;
	int repeat;
	int json;
	int tune;                       /* cuda: every kernel variant and grid per size */
	int standalone;                 /* in a job, still use a slab and pool of our own */
};

enum kv_dir { KV_OUT, KV_IN, KV_BOTH, KV_DIRS };
enum kv_way { KV_OURS, KV_PER_BLOCK, KV_BATCH, KV_WAYS };

/* One block size's results: GB/s medians, < 0 where a way does not exist on the backend. */
struct kv_row {
	uint64_t block_bytes;
	uint64_t piece_bytes;           /* what one copy moves: the block, or one layer's K or V */
	uint32_t blocks;                /* per call (both at once: per direction) */
	double gbps[KV_DIRS][KV_WAYS];
	int unroll;                     /* cuda: the kernel variant and grid used; 0 on host */
	unsigned max_grid, max_grid_out;   /* a swap-in's, a swap-out's */
	int copy_engines;               /* cuda: the copy engines move these pieces, not the kernel */
	int verified;
};

/* A --tune line: our swap with a forced kernel variant and CTAs per SM. */
struct kv_tune {
	uint64_t block_bytes;
	int unroll, per_sm;
	double gbps[KV_DIRS];
};

/* Where the bench runs: what the output's header says. */
struct kv_env {
	aeg_device_t *dev;
	aeg_job_t *job;                 /* set inside a job */
	int cuda;
	struct aeg_gpu_info info;
};

/* cli_kv_bench.c */
int kv_env_open(const struct kv_opts *o, struct kv_env *env);
void kv_env_close(struct kv_env *env);
/* One size: fills @row; prints nothing; 0 or 1 with the message printed. */
int kv_bench_size(const struct kv_env *env, const struct kv_opts *o, uint64_t block, struct kv_row *row);
/* --tune for one size: fills up to @max lines. */
int kv_tune_size(const struct kv_env *env, const struct kv_opts *o, uint64_t block, struct kv_tune *t,
		 int max, int *n);

#endif

#!/bin/bash
# The KV swap benchmark of issue 18, in one run: block sizes 4 KiB to 2 MiB,
# randomly permuted, 256 MiB per call and direction; aegaeon vs one
# cudaMemcpyAsync per block vs cudaMemcpyBatchAsync, swap-out, swap-in and
# both at once (two threads, two streams); first with blocks contiguous on
# both sides, then with the GPU blocks in vLLM's per-layer K and V tensors
# (32 layers). Medians of 10 calls; every piece checked bit-exact.
# KV_SIZES and KV_LAYER_SIZES change the sizes of the two runs.
# Inside a job (srun ... bench/kv_bench.sh) it runs through the job's slab
# and pinned pool. JSON lines go to $KV_BENCH_JSON when set.
# Usage: bench/kv_bench.sh [extra aegaeon-cli kv bench options]
# AEGAEON_CLI names the binary (default: aegaeon-cli on PATH); KV_DEVICE the
# backend (default cuda; host for a smoke test: host memcpy figures).
set -euo pipefail
cli=${AEGAEON_CLI:-aegaeon-cli}
device=${KV_DEVICE:-cuda}
sizes=${KV_SIZES:-4KiB,16KiB,32KiB,64KiB,256KiB,1MiB,2MiB}
if [[ -z ${AEGAEON_SOCKET:-} ]]; then
	dev=(--device "$device")
else
	dev=()
fi
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current,driver_version \
	--format=csv,noheader 2>/dev/null || true
# The per-layer run: 32 layers of K and V, so blocks of 256 KiB to 4 MiB move
# as pieces of 4 to 64 KiB (a 2 MiB block: vLLM's 16 tokens x 8 heads x 128 x
# bf16 per layer and part).
run() {
	if [[ -n ${KV_BENCH_JSON:-} ]]; then
		"$cli" kv bench "${dev[@]}" --pattern random --repeat 10 --json "$@" | tee -a "$KV_BENCH_JSON"
	else
		"$cli" kv bench "${dev[@]}" --pattern random --repeat 10 "$@"
	fi
}
run --block "$sizes" "$@"
run --block "${KV_LAYER_SIZES:-256KiB,1MiB,2MiB,4MiB}" --layers 32 "$@"

#!/bin/bash
# The KV swap table of issue 6: 8192 scattered blocks of 4, 16, 32 and 256 KiB,
# both directions, aegaeon vs one cudaMemcpyAsync per block vs
# cudaMemcpyBatchAsync, medians of 10 calls each, on GPU 0.
# Usage: bench/kv_bench.sh [extra aegaeon-cli kv bench options]
# AEGAEON_CLI names the binary (default: aegaeon-cli on PATH).
set -euo pipefail
cli=${AEGAEON_CLI:-aegaeon-cli}
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current,driver_version \
	--format=csv,noheader 2>/dev/null || true
exec "$cli" kv bench --device cuda --block 4KiB,16KiB,32KiB,256KiB --blocks 8192 \
	--pattern random --repeat 10 "$@"

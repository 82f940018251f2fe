#!/bin/bash
# Runs on the GPU machine from a bundle made by scripts/gpu-bundle.sh: the GPU
# tests, then the benchmarks. Logs go to $OUT (or ./gpu-out).
# Usage: bash bundle/gpu-run.sh [tests] [bench] [unit]   (default: tests bench)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$here/root/opt/aegaeon/bin:$here/root/opt/aegaeon/sbin:$PATH
export AEGAEON_CONFIG=/dev/null
what=${*:-tests bench}
passed=0
failed=0

run() {   # name command...: logs to $out/name.log, counts the result
	local name=$1
	shift
	echo "== $name"
	if "$@" >"$out/$name.log" 2>&1; then
		passed=$((passed + 1)); echo "ok - $name"
	else
		failed=$((failed + 1)); echo "not ok - $name (rc $?)"
	fi
	tail -n 40 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
if [[ " $what " == *" unit "* ]]; then
	for t in "$here"/tests/unit/test_*; do
		top_srcdir=$here run "unit-$(basename "$t")" "$t"
	done
fi
if [[ " $what " == *" tests "* ]]; then
	for t in "$here"/tests/gpu/test_*; do
		run "$(basename "$t")" "$t"
	done
fi
if [[ " $what " == *" bench "* ]]; then
	run info aegaeon-cli info --device cuda
	run bench-alloc aegaeon-cli bench alloc --device cuda
	run bench-pinned aegaeon-cli bench pinned --device cuda --size 4GiB --repeat 3
	run bench-event aegaeon-cli bench event --device cuda
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

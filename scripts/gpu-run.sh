#!/bin/bash
# Runs on the GPU machine from a bundle made by scripts/gpu-bundle.sh: the GPU
# tests, then the benchmarks. Logs go to $OUT (or ./gpu-out).
# Usage: bash bundle/gpu-run.sh [tests] [sanitize] [bench] [prefetch] [unit] [slurm] [soak]
#        (default: tests bench). prefetch needs torch and safetensors; slurm
#        (tests/gpu/slurm_e2e.sh: a Slurm cluster, Slurm from bundle/debs) needs root;
#        soak (tests/soak/soak on the cuda backend) runs $SOAK_SECONDS (default 480) s.
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
py=${PYTHON:-python3}
site=$(ls -d "$here"/root/opt/aegaeon/lib/python3*/site-packages 2>/dev/null | head -n 1)
export PYTHONPATH=${site}${PYTHONPATH:+:$PYTHONPATH}
if [[ " $what " == *" tests "* ]]; then
	for t in "$here"/tests/gpu/test_*; do
		case "$t" in
		*.py) run "$(basename "$t")" "$py" "$t" ;;
		*) run "$(basename "$t")" "$t" ;;
		esac
	done
fi
if [[ " $what " == *" sanitize "* ]] && command -v compute-sanitizer >/dev/null; then
	# The test provokes API errors on purpose (unregistered memory, bad
	# handles); memory-access errors and races are what must be absent.
	for tool in memcheck racecheck; do
		run "sanitize-$tool-kv" compute-sanitizer --tool $tool --error-exitcode 1 \
			--report-api-errors no --target-processes all \
			"$here/tests/gpu/test_kv_cuda" --timing-blocks 0
	done
fi
if [[ " $what " == *" bench "* ]]; then
	run info aegaeon-cli info --device cuda
	run bench-alloc aegaeon-cli bench alloc --device cuda
	run bench-pinned aegaeon-cli bench pinned --device cuda --size 4GiB --repeat 3
	run bench-event aegaeon-cli bench event --device cuda
	run bench-kv bash "$here/bench/kv_bench.sh"
fi
if [[ " $what " == *" prefetch "* ]]; then
	run bench-prefetch "$py" "$here/bench/prefetch_bench.py" --sizes "${PREFETCH_SIZES:-4,16}" \
		--repeat "${PREFETCH_REPEAT:-3}" --dir "${PREFETCH_DIR:-/tmp/aegaeon-bench}" --out "$out/prefetch_bench.json"
fi
if [[ " $what " == *" soak "* ]]; then
	run soak "$here/tests/soak/soak" --device cuda --agent "$here/root/opt/aegaeon/sbin/aegaeond" \
		--seconds "${SOAK_SECONDS:-480}" ${SOAK_ARGS:-}
fi
if [[ " $what " == *" slurm "* ]]; then
	OUT=$out run slurm-e2e bash "$here/tests/gpu/slurm_e2e.sh" ${SLURM_E2E_ARGS:-}
	grep -E '^(not ok|# figure:)' "$out/slurm-e2e.log"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

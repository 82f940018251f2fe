#!/bin/bash
# The project's test command: installs dependencies, builds with autotools and
# runs every test that needs no GPU (unit, real-Slurm and Python tests twice:
# plain and under ASan+UBSan; the unit tests a third time under valgrind
# memcheck; the Debian packages installed, tested with the Python tests and
# the real-Slurm suite, and purged; the wheel in a fresh venv; the fuzz
# targets). Run as root on Debian 12.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

jobs=$(nproc)
if [ "${AEGAEON_SKIP_DEPS:-0}" != 1 ]; then
	bash scripts/install-deps.sh
fi
cuda_flag=--without-cuda
if [ -x /usr/local/cuda/bin/nvcc ]; then
	cuda_flag=--with-cuda=/usr/local/cuda
fi

autoreconf -fi >/dev/null

status=0
passed=0
failed=0
failures=()    # "stage|log" of each stage that failed, for the summary
# stage_failed NAME LOG...: the stage failed; the summary shows what its logs say of it
stage_failed() {
	local name=$1
	shift
	status=1
	failures+=("$name|$*")
}
count_log() {   # adds a log's cmocka and "N passed, N failed" counts to the totals
	local p f
	p=$(sed -n -E 's/^\[  PASSED  \] ([0-9]+) test.*/\1/p; s/^([0-9]+) passed, [0-9]+ failed.*/\1/p' "$1" | awk '{s+=$1} END {print s+0}')
	f=$(sed -n -E 's/^\[  FAILED  \] ([0-9]+) test.*/\1/p; s/^[0-9]+ passed, ([0-9]+) failed.*/\1/p' "$1" | awk '{s+=$1} END {print s+0}')
	passed=$((passed + p))
	failed=$((failed + f))
	echo "$(basename "$1" .log): $p passed, $f failed"
}
run_suite() {   # name builddir configure-flags...
	local name=$1 dir=$2
	shift 2
	echo "=== $name"
	rm -rf "$dir" && mkdir -p "$dir"
	if ! (cd "$dir" && { "$top/configure" -q --enable-werror "$cuda_flag" "$@" && make -s -j"$jobs"; } 2>&1 |
		tee build-output.log; exit "${PIPESTATUS[0]}"); then
		stage_failed "$name: the build" "$dir/build-output.log"
	elif ! (cd "$dir" && make -j"$jobs" check 2>&1 | tee check-output.log; exit "${PIPESTATUS[0]}"); then
		stage_failed "$name: make check" "$dir/check-output.log" "$dir"/tests/*/*.log
	fi
	for f in "$dir"/tests/*/*.log "$dir/check-output.log"; do
		[ -f "$f" ] && count_log "$f"
	done
	grep -h -E '^# (TOTAL|PASS|FAIL|ERROR|SKIP):' "$dir/test-suite.log" 2>/dev/null || true
}

run_suite "build and tests" build-test --enable-python

echo "=== unit tests under valgrind memcheck"
# (a failing pipeline under set -e would end the script before the summary)
if ! make -C build-test -s check-valgrind VALGRIND_JOBS="$jobs" 2>&1 | tee build-test/valgrind-output.log; then
	stage_failed "valgrind" build-test/valgrind-output.log
fi
count_log build-test/valgrind-output.log

# The packages as admins and Python users install them (tests/packages/).
echo "=== Debian packages: build, install, Python and real-Slurm tests against them, purge"
t0=$SECONDS
# build-deb/ is this script's, as build-test/ is (build-debs.sh refuses a
# directory it did not make, and one of an older checkout has no stamp).
rm -rf build-deb
if ! { bash scripts/build-debs.sh build-deb >/dev/null && bash tests/packages/test_debs.sh build-deb build-test; } 2>&1 |
	tee build-test/debs-output.log; then
	stage_failed "Debian packages" build-test/debs-output.log
fi
count_log build-test/debs-output.log
echo "# Debian packages: $((SECONDS - t0)) s"

echo "=== the wheel: python -m build, auditwheel, tests in a fresh venv; pip install ."
t0=$SECONDS
if ! bash tests/packages/test_wheel.sh build-wheel-test build-test 2>&1 | tee build-test/wheel-output.log; then
	stage_failed "the wheel" build-test/wheel-output.log
fi
count_log build-test/wheel-output.log
echo "# wheel: $((SECONDS - t0)) s"

run_suite "unit, Slurm and Python tests under ASan+UBSan" build-asan --enable-sanitizers --enable-python

# By count from a fixed seed, not by time: the same inputs on every run
# and machine, so a commit passes or fails here the same way each time.
echo "=== fuzzing: each parser of outside input, ${AEGAEON_FUZZ_RUNS:-1000000} inputs"
if ! bash scripts/fuzz.sh --runs "${AEGAEON_FUZZ_RUNS:-1000000}" 2>&1 | tee build-test/fuzz-output.log; then
	stage_failed "fuzzing" build-test/fuzz-output.log
fi
count_log build-test/fuzz-output.log

echo "=== summary"
# What failed, again at the end, where a reader of a long log looks first:
# each failed stage with its failing checks, or its last lines when it
# stopped before naming one (a build error, a suite cut short).
for f in "${failures[@]}"; do
	name=${f%%|*}
	read -r -a logs <<<"${f#*|}"
	echo "failed: $name"
	# (no match, a missing log, or head closing early is no reason to end here)
	lines=$(cat "${logs[@]}" 2>/dev/null |
		grep -E '^(not ok [0-9]|FAIL: |ERROR: |\[  FAILED  \] [a-z_])' | awk '!seen[$0]++' | head -n 30) || true
	if [ -n "$lines" ]; then
		echo "$lines" | sed 's/^/    /'
	else
		tail -n 15 "${logs[0]}" 2>/dev/null | sed 's/^/    | /' || echo "    (no log: ${logs[0]})"
	fi
done
[ $status = 0 ] || { echo "a build or test suite failed"; [ $failed -gt 0 ] || failed=1; }
echo "$passed passed, $failed failed"
exit $status

#!/bin/bash
# Builds the libFuzzer targets (make fuzz) and runs each on a copy of its
# seed corpus, so the committed corpora do not grow: for SECONDS (default
# 20), or with --runs N for N inputs each. Every run starts from the same
# seed (AEGAEON_FUZZ_SEED, default 1; 0 lets libFuzzer pick one) without
# address randomisation, so a run by count goes through the same inputs
# every time: the test command uses that; a long run by time explores.
# Prints per target the executions, their rate and the crashes (a failed
# invariant, a sanitizer report, a leak, a timeout or running out of memory
# all count), then "N passed, N failed". Crash inputs are kept under
# BUILD/fuzz/crashes/<target>/; turn each into a unit test of its parser
# or a file of its seed corpus (fuzz/corpus/<target>/).
# Environment: AEGAEON_FUZZ_BUILD (build directory, default build-fuzz, or
# the source tree when it is configured in place; one configured without
# clang fails with make fuzz's message),
# AEGAEON_FUZZ_TARGETS (space-separated subset), AEGAEON_FUZZ_KEEP=1 (keep
# the grown corpora and logs, printed at the end), AEGAEON_FUZZ_JOBS (targets
# run at once, default the number of cores), AEGAEON_FUZZ_SEED.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
usage() {
	echo "usage: $0 [SECONDS | --runs N]  (whole numbers: seconds or inputs per target)" >&2
	exit 2
}
whole() { case $1 in ''|*[!0-9]*|0) return 1 ;; esac; }
seconds=20 runs=
case $# in
0) ;;
1) seconds=$1 ;;
2) [ "$1" = --runs ] || usage; runs=$2 seconds= ;;
*) usage ;;
esac
if [ -n "$runs" ]; then whole "$runs" || usage; else whole "$seconds" || usage; fi
seed=${AEGAEON_FUZZ_SEED:-1}
case $seed in ''|*[!0-9]*) echo "$0: AEGAEON_FUZZ_SEED='$seed' is not a whole number" >&2; exit 2 ;; esac
# Comparisons of pointers steer libFuzzer too: without address-space
# randomisation the same seed gives the same inputs, run after run.
norandom=(setarch "$(uname -m)" -R)
if ! "${norandom[@]}" true 2>/dev/null; then
	echo "$0: warning: cannot turn address randomisation off (setarch -R); runs may differ" >&2
	norandom=()
fi
build=${AEGAEON_FUZZ_BUILD:-$top/build-fuzz}
# configure refuses a separate build of a tree configured in place: use it.
[ -z "${AEGAEON_FUZZ_BUILD:-}" ] && [ -f "$top/config.status" ] && build=$top

mkdir -p "$build"
build=$(cd "$build" && pwd)
if [ ! -f "$build/Makefile" ]; then
	[ -x "$top/configure" ] || (cd "$top" && autoreconf -fi >/dev/null)
	(cd "$build" && "$top/configure" -q --enable-fuzz --without-cuda --without-cmocka)
fi
make -s -j"$(nproc)" -C "$build" fuzz >/dev/null

targets=${AEGAEON_FUZZ_TARGETS:-$(cd "$build/fuzz/bin" && ls fuzz_* | sed 's/^fuzz_//')}
# The targets that write files (config, index) rewrite them at every input:
# on tmpfs where there is one. Each target's TMPDIR is its own folder in
# here, so what a crashed target leaves goes with the rest.
root=${TMPDIR:-/tmp}
[ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] && root=/dev/shm
work=$(mktemp -d "$root/aegaeon-fuzz.XXXXXX")
if [ "${AEGAEON_FUZZ_KEEP:-0}" != 1 ]; then
	trap 'rm -rf "$work"' EXIT
fi

# One target: its summary line (and what a failure said) into $work/$t/result.
run_one() {
	local t=$1 bin=$build/fuzz/bin/fuzz_$1 dir=$work/$1 rc=0 execs crashes start took rate
	# -reload=0: the corpus is this run's own copy, and reading it again
	# every few seconds (the default) would make a run depend on time.
	local opts=(-seed="$seed" -reload=0 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
		    -artifact_prefix="$dir/artifacts/")

	if [ -n "$runs" ]; then opts+=(-runs="$runs"); else opts+=(-max_total_time="$seconds"); fi

	mkdir -p "$dir/corpus" "$dir/artifacts" "$dir/tmp"
	if [ ! -x "$bin" ]; then
		echo "$t: no program $bin: FAILED" >"$dir/result"
		return
	fi
	[ -d "$top/fuzz/corpus/$t" ] && cp "$top/fuzz/corpus/$t"/* "$dir/corpus"/
	[ -f "$top/fuzz/dict/$t.dict" ] && opts+=(-dict="$top/fuzz/dict/$t.dict")
	# Frames go up to 64 KiB; the other inputs are small.
	# libconfig 1.5 (Debian 12) leaks a string on some syntax errors
	# (hyperrealm/libconfig#142); fuzz_config suppresses that report, but
	# the leak scan it sets off after each such input slows short runs
	# tenfold, so config runs without leak checks here (test_config has
	# them; docs/reliability.md has a long run with them).
	case $t in
	proto_*) opts+=(-max_len=65560) ;;
	config) opts+=(-detect_leaks=0) ;;
	esac
	start=$SECONDS
	TMPDIR=$dir/tmp "${norandom[@]}" "$bin" "${opts[@]}" "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
	took=$((SECONDS - start))
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
	execs=${execs:-0}
	rate="$execs executions in ${took} s"
	crashes=$(find "$dir/artifacts" -type f | wc -l)
	if [ $rc = 0 ] && [ "$crashes" = 0 ]; then
		echo "$t: $rate, 0 crashes: ok" >"$dir/result"
		return
	fi
	[ "$crashes" = 0 ] && crashes=1
	mkdir -p "$build/fuzz/crashes/$t"
	cp "$dir/artifacts"/* "$build/fuzz/crashes/$t/" 2>/dev/null || true
	{
		echo "$t: $rate, $crashes crash(es), exit $rc: FAILED"
		grep -E 'invariant|ERROR|SUMMARY|runtime error' "$dir/log" | head -5 | sed 's/^/    /'
		echo "    inputs: $build/fuzz/crashes/$t/ (replay: $bin FILE)"
	} >"$dir/result"
}

# Targets run side by side, one a core (each is single-threaded).
jobs=${AEGAEON_FUZZ_JOBS:-$(nproc)}
if [ -n "$runs" ]; then per="$runs inputs"; else per="${seconds} s"; fi
echo "fuzzing $per per target from seed $seed, $jobs at a time: $(echo $targets)"
running=0
for t in $targets; do
	run_one "$t" &
	running=$((running + 1))
	if [ $running -ge "$jobs" ]; then
		wait -n || true
		running=$((running - 1))
	fi
done
wait

passed=0
failed=0
for t in $targets; do
	cat "$work/$t/result"
	if grep -q ': ok$' "$work/$t/result"; then
		passed=$((passed + 1))
	else
		failed=$((failed + 1))
	fi
done
if [ "${AEGAEON_FUZZ_KEEP:-0}" = 1 ]; then
	echo "corpora and logs kept in $work"
fi
echo "$passed passed, $failed failed"
[ $failed = 0 ]

#!/bin/bash
# Runs the cmocka unit tests of a build tree under valgrind memcheck: a test
# passes when its checks pass and no process it makes (itself, its forked
# children, the programs it starts) has a memcheck error or a byte
# "definitely lost". Prints a line per test and "N passed, N failed" last.
# Usage: scripts/valgrind.sh [-j JOBS] [TEST...]   (in the build tree, or with
#        AEG_BUILDDIR naming it; default: every tests/unit/test_* program).
# `make check-valgrind` runs it. AEGAEON_VALGRIND_TIMEOUT: seconds per test
# (default 600); AEGAEON_VALGRIND_LOGS: where the logs go (default
# tests/valgrind/ in the build tree); AEGAEON_VALGRIND_ARGS: more options.
set -uo pipefail
top_srcdir=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${AEG_BUILDDIR:-.}" && pwd)
jobs=1
while getopts j: opt; do
	case $opt in
	j) jobs=$OPTARG ;;
	*) echo "usage: $0 [-j JOBS] [TEST...]" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))

die() {
	echo "valgrind.sh: $*" >&2
	exit 2
}

command -v valgrind >/dev/null || die "valgrind is not installed (Debian: apt-get install valgrind)"
[[ -f $build/Makefile && -f $build/config.h ]] || die "$build is not a configured build tree (set AEG_BUILDDIR)"
grep -q '^SANITIZER_FLAGS = .*-fsanitize' "$build/Makefile" &&
	die "$build is built with --enable-sanitizers: valgrind cannot run ASan programs (use a plain build)"
grep -q '^#define HAVE_VALGRIND_VALGRIND_H 1' "$build/config.h" ||
	die "$build was configured without valgrind/valgrind.h: forked test children would fail valgrind's leak check (install valgrind, then run configure again)"
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "-j $jobs: expected a number of jobs of 1 or more"

if [[ $# -gt 0 ]]; then
	tests=("$@")
else
	tests=()
	for t in "$build"/tests/unit/test_*; do
		[[ -f $t && -x $t && $(head -c 4 "$t") == $'\x7fELF' ]] && tests+=("$t")
	done
	[[ ${#tests[@]} -gt 0 ]] || die "no unit test programs in $build/tests/unit (make check builds them)"
fi
logs=${AEGAEON_VALGRIND_LOGS:-$build/tests/valgrind}
limit=${AEGAEON_VALGRIND_TIMEOUT:-600}
mkdir -p "$logs" || die "cannot make $logs"

# What `make check` gives the tests (AM_TESTS_ENVIRONMENT). Their own waits
# (10 s for an event, 30 s for an agent to start) hold under valgrind too.
export top_srcdir top_builddir=$build AEGAEON_CONFIG=/dev/null AEGAEON_DEVICE=host \
	AEGAEOND=$build/aegaeond

# Programs a test starts (aegaeond, the test itself again) run under valgrind
# too; system programs do not.
vg_args=(--tool=memcheck --error-exitcode=97 --leak-check=full
	--errors-for-leak-kinds=definite --show-leak-kinds=definite
	--suppressions="$top_srcdir/tests/valgrind.supp" --num-callers=30
	--trace-children=yes --trace-children-skip='/bin/*,/sbin/*,/usr/*'
	--track-origins=no)
# shellcheck disable=SC2206 # split on purpose: options given as one string
vg_args+=(${AEGAEON_VALGRIND_ARGS:-})

# One test: its output in NAME.out, valgrind's per process in NAME.vg.PID,
# and its result line in NAME.result.
run_one() {
	local t=$1 name tpid rc main errors=0 lost=0 procs=0 start=$SECONDS res f n why=()
	name=$(basename "$t")
	rm -f "$logs/$name".*
	(cd "$build" && exec timeout -k 10 "$limit" valgrind "${vg_args[@]}" \
		--log-file="$logs/$name.vg.%p" "$t") >"$logs/$name.out" 2>&1 &
	tpid=$!
	wait "$tpid"
	rc=$?
	# The test's own process is the one timeout started; the others are the
	# processes it forked (leak check off: tests/unit/testutil.h) or ran.
	main=$(grep -l "^==[0-9]*== Parent PID: $tpid\$" "$logs/$name".vg.* 2>/dev/null | head -n 1)
	for f in "$logs/$name".vg.*; do
		[[ -f $f ]] || continue
		procs=$((procs + 1))
		n=$(sed -n -E 's/^==[0-9]+== ERROR SUMMARY: ([0-9]+) errors.*/\1/p' "$f" | tail -n 1)
		errors=$((errors + ${n:-0}))
		n=$(sed -n -E 's/^==[0-9]+== +definitely lost: ([0-9,]+) bytes.*/\1/p' "$f" | tr -d , | tail -n 1)
		lost=$((lost + ${n:-0}))
	done
	[[ -n $main ]] || why+=("no valgrind log of the test's process")
	[[ $rc -eq 124 || $rc -eq 137 ]] && why+=("timed out after $limit s")
	grep -q '^\[  FAILED  \]' "$logs/$name.out" && why+=("tests failed")
	[[ $rc -ne 0 && $rc -ne 97 && ${#why[@]} -eq 0 ]] && why+=("exit status $rc")
	res="$errors errors, $lost bytes definitely lost ($procs processes)"
	if [[ $rc -eq 0 && $errors -eq 0 && $lost -eq 0 && ${#why[@]} -eq 0 ]]; then
		echo "ok - $name: $res, $((SECONDS - start)) s" >"$logs/$name.result"
		return
	fi
	{
		echo "not ok - $name: $res${why:+, ${why[*]}}, $((SECONDS - start)) s (logs: $logs/$name.*)"
		# The first reports, so that a CI log shows what went wrong.
		local first='^==[0-9]+== (Invalid|Conditional|Use of uninit|Syscall|Mismatched|Source and|Argument|.* are definitely lost)'
		for f in "$logs/$name".vg.*; do
			grep -q -E "$first" "$f" && sed -n -E "/$first/,/^==[0-9]+== \$/p" "$f" | head -n 60
		done
		grep -E '^\[  (FAILED|ERROR) +\]|^\[   LINE   \]' "$logs/$name.out" | head -n 20
	} >"$logs/$name.result"
}

passed=0
failed=0
start=$SECONDS
report() {   # prints a finished test's result and counts it
	local r=$logs/$1.result
	cat "$r"
	if [[ $(head -c 3 "$r") == "ok " ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}
declare -A running=()
for t in "${tests[@]}"; do
	[[ -x $t ]] || t=$build/tests/unit/$(basename "$t")
	[[ -x $t ]] || die "$t: no such test program"
	while [[ ${#running[@]} -ge $jobs ]]; do
		wait -n -p done_pid
		report "${running[$done_pid]}"
		unset "running[$done_pid]"
	done
	run_one "$t" &
	running[$!]=$(basename "$t")
done
while [[ ${#running[@]} -gt 0 ]]; do
	wait -n -p done_pid
	report "${running[$done_pid]}"
	unset "running[$done_pid]"
done
echo "# valgrind: $((SECONDS - start)) s, $jobs at a time; logs in $logs"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]

# TAP-like helpers the shell tests source: "ok N - what" / "not ok N - what"
# lines, and tap_end's closing "N passed, N failed" with its exit status.
n=0
failed=0

ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; printf '#   %s\n' "${@:2}"; }
# run CMD...: sets $out (stdout+stderr) and $rc
run() { out=$("$@" 2>&1); rc=$?; }
# expect WHAT RC PATTERN CMD...: CMD exits RC and its output matches the ERE PATTERN
expect() {
	local what=$1 want=$2 pat=$3
	shift 3
	run "$@"
	if [[ $rc -eq $want ]] && grep -qE -- "$pat" <<<"$out"; then
		ok "$what"
	else
		not_ok "$what" "command: $*" "rc $rc (want $want), output:" "$out"
	fi
}
# check WHAT CMD...: CMD succeeds
check() {
	local what=$1
	shift
	if run "$@" && [[ $rc -eq 0 ]]; then ok "$what"; else not_ok "$what" "$*" "$out"; fi
}
# tap_end [PASSED FAILED]: the plan and the totals (plus counts of suites run
# inside); exits 0 when nothing failed.
tap_end() {
	echo "1..$n"
	echo "$((n - failed + ${1:-0})) passed, $((failed + ${2:-0})) failed"
	[[ $failed -eq 0 && ${2:-0} -eq 0 ]]
	exit
}

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
# tap_agent DIR SLAB POOL: aegaeond of a job (the host backend, GPU 0, a SLAB slab, a POOL
# pinned pool) on runtime dir DIR in the background, its pid in $AG, its log in DIR.log;
# then a job step's environment. The caller kills $AG (a trap) and removes DIR.
tap_agent() {
	mkdir -m 700 "$1" || exit 99
	"$AGENT" --job 11 --runtime-dir "$1" --gpus 0 --slab "$2" --pinned "$3" --device host \
		--foreground 2>"$1.log" &
	AG=$!
	for _ in $(seq 200); do [[ -f $1/ready || -f $1/error ]] && break; sleep 0.05; done
	[[ -f $1/ready ]] || { echo "agent did not start:"; cat "$1.log" "$1/error" 2>/dev/null; exit 99; }
	export AEGAEON_SOCKET=$1/agent.sock AEGAEON_SLABS=1 AEGAEON_JOB_DIR=$1
	AEGAEON_SLAB0_HANDLE=$(sed -n 's/^slab0_handle=//p' "$1/ready")
	export AEGAEON_SLAB0_HANDLE
}

#!/bin/bash
# Runs the Slurm tests, each file on its own throwaway cluster, and prints
# "N passed, N failed" last. Usage: run.sh [TEST.sh...] (default: all).
# Each file has AEG_TEST_TIMEOUT seconds (180); what its clusters leave
# running after it ends (killed at that limit, say) is killed and fails it.
# Needs AEG_BUILDDIR (the build tree); `make check` sets it, and for an
# --enable-sanitizers build AEG_SANITIZERS=1: then each test file's
# sanitizer reports are collected, and any report fails it.

here=$(cd "$(dirname "$0")" && pwd)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

skip() {
	echo "SKIP: Slurm tests: $*"
	exit 0
}

[[ $(id -u) -eq 0 ]] || skip "they start munged, slurmctld and slurmd and need root (run make check as root)"
for b in munged slurmctld slurmd srun sbatch salloc scontrol squeue sinfo runuser setpriv mknod unshare pgrep; do
	command -v "$b" >/dev/null ||
		skip "$b is not installed (Debian: apt-get install slurmctld slurmd slurm-client munge)"
done
: "${AEG_BUILDDIR:?AEG_BUILDDIR must name the build tree}"
export AEG_BUILDDIR
san=
if [[ ${AEG_SANITIZERS:-0} = 1 ]]; then
	export AEG_SANITIZERS
	san=$(mktemp -d /tmp/aegaeon-sanitizer.XXXXXX) || exit 1
	chmod 755 "$san"
	echo "# sanitizer build: the agent, the CLI and the MPI example carry ASan and UBSan, the plugin" \
		"in slurmd, slurmstepd and the clients UBSan; reports go to $san/TEST/"
fi

# sanitizer_reports NAME: a "not ok" line and the start of each report the
# test's programs wrote; nrep: how many there were.
sanitizer_reports() {
	local f
	nrep=0
	for f in "$san/$1"/*; do
		[[ -f $f ]] || continue
		nrep=$((nrep + 1))
		echo "not ok - $1: sanitizer report $f:"
		grep -m 1 -E 'ERROR: |runtime error: ' "$f"
		grep -E '^ +#[0-9]+ ' "$f" | head -n 12
	done
}

if [[ $# -gt 0 ]]; then
	tests=("$@")
else
	tests=()
	for t in "$here"/*.sh; do
		case $(basename "$t") in cluster.sh | run.sh) ;; *) tests+=("$t") ;; esac
	done
fi

# left_behind DIR: processes that still name a test's cluster dir, found as
# cluster_stop finds them (stray_pids of scripts/lib/cluster.sh).
left_behind() {
	bash -c 'source "$1" && stray_pids "$2"' _ "$here/../../scripts/lib/cluster.sh" "$1"
}

# sweep NAME RECORD: a test that ended without stopping its clusters (killed
# at its time limit, say) leaves their processes running, the agents in
# sessions of their own among them: they are killed and counted as a failure.
sweep() {
	local dir left
	[[ -s $2 ]] || return 0
	while read -r dir; do
		[[ -n $dir ]] || continue
		left=$(left_behind "$dir")
		if [[ -n $left ]]; then
			echo "not ok - $1: its cluster in $dir left processes running: $(echo $left) (killed)"
			kill -KILL $left 2>/dev/null
			failed=$((failed + 1))
		fi
		[[ -d $dir && ${AEG_KEEP:-0} != 1 ]] && rm -rf "$dir"
	done <"$2"
	return 0
}

passed=0
failed=0
times=()
start=$SECONDS
for t in "${tests[@]}"; do
	[[ -f $t ]] || t=$here/$(basename "$t")
	name=$(basename "$t" .sh)
	echo "== $name"
	# A test waiting on a part not written yet says so in a "# pending:" line.
	pending=$(sed -n 's/^# pending: //p' "$t")
	if [[ -n $pending && $# -eq 0 ]]; then
		echo "SKIP $name: pending: $pending (run it by name to try)"
		continue
	fi
	if [[ -n $san ]]; then
		rm -rf "${san:?}/$name"
		mkdir -m 1777 "$san/$name"
		export AEG_SANITIZER_LOGS=$san/$name
	fi
	t0=$SECONDS
	record=$(mktemp /tmp/aegaeon-clusters.XXXXXX) || exit 1
	out=$(TEST_NAME=$name AEG_CLUSTER_RECORD=$record timeout -k 10 "${AEG_TEST_TIMEOUT:-180}" bash "$t" 2>&1)
	rc=$?
	echo "$out"
	sweep "$name" "$record"
	rm -f "$record"
	times+=("$name $((SECONDS - t0))")
	if [[ -n $san ]]; then
		sanitizer_reports "$name"
		failed=$((failed + nrep))
	fi
	summary=$(grep -E "^# $name: [0-9]+ passed, [0-9]+ failed$" <<<"$out" | tail -n 1)
	if [[ -z $summary ]]; then
		echo "not ok - $name: ended without a result (exit status $rc)"
		failed=$((failed + 1))
		continue
	fi
	read -r p f <<<"$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed/\1 \2/' <<<"$summary")"
	passed=$((passed + p))
	failed=$((failed + f))
	if [[ $rc -ne 0 && $f -eq 0 ]]; then
		echo "not ok - $name: exit status $rc"
		failed=$((failed + 1))
	fi
done
echo "# Slurm tests took $((SECONDS - start)) s ($(IFS=,; echo "${times[*]/%/ s}"))"
if [[ -n $san ]]; then
	if [[ -z $(find "$san" -type f) ]]; then
		echo "# sanitizers: no report"
		rm -rf "$san"
	else
		echo "# sanitizers: reports kept in $san"
	fi
fi
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]

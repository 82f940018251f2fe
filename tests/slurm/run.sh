#!/bin/bash
# Runs the Slurm tests, each file on its own throwaway cluster, and prints
# "N passed, N failed" last. Usage: run.sh [TEST.sh...] (default: all).
# Needs AEG_BUILDDIR (the build tree); `make check` sets it.

here=$(cd "$(dirname "$0")" && pwd)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

skip() {
	echo "SKIP: Slurm tests: $*"
	exit 0
}

[[ $(id -u) -eq 0 ]] || skip "they start munged, slurmctld and slurmd and need root (run make check as root)"
for b in munged slurmctld slurmd srun sbatch salloc scontrol squeue sinfo runuser setpriv mknod; do
	command -v "$b" >/dev/null ||
		skip "$b is not installed (Debian: apt-get install slurmctld slurmd slurm-client munge)"
done
[[ -z ${SANITIZER_FLAGS:-} ]] ||
	skip "sanitizer build: slurmd cannot load a plugin and agent built with ASan (configure without --enable-sanitizers)"
: "${AEG_BUILDDIR:?AEG_BUILDDIR must name the build tree}"
export AEG_BUILDDIR

if [[ $# -gt 0 ]]; then
	tests=("$@")
else
	tests=()
	for t in "$here"/*.sh; do
		case $(basename "$t") in cluster.sh | run.sh) ;; *) tests+=("$t") ;; esac
	done
fi

passed=0
failed=0
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
	out=$(TEST_NAME=$name timeout -k 10 180 bash "$t" 2>&1)
	rc=$?
	echo "$out"
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
echo "# Slurm tests took $((SECONDS - start)) s"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]

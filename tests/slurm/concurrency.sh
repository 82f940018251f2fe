#!/bin/bash
# 8 tasks of one step start and attach at once, each reading back the file
# the job's --aegaeon-prefetch loaded; two jobs on one node stay apart.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

head -c $((6 << 20)) /dev/urandom >"$T/work/model.bin"
chown "$JOB_USER" "$T/work/model.bin"
sum=$(sha256sum <"$T/work/model.bin" | cut -d' ' -f1)
out=$(as_user timeout 60 srun -N1 -n8 --gres=gpu:1 --aegaeon-slab=64MiB --aegaeon-prefetch=model.bin bash -c '
	test -S "$AEGAEON_SOCKET" && echo "task=$SLURM_PROCID $AEGAEON_SOCKET $AEGAEON_SLAB0_HANDLE"
	'"$AEG_CLI"' chunks model.bin --verify --timeout 30 | sed -n "s/.*: verified /verified task=$SLURM_PROCID /p"
	'"$AEG_CLI"' status --attach | sed -n "s/^attached: /attached task=$SLURM_PROCID /p"' 2>&1)
rc=$?
check "8 tasks ran (rc $rc)" test $rc -eq 0
check "all 8 saw the agent" test "$(grep -c '^task=' <<<"$out")" -eq 8
check "all 8 got the same socket and slab handle" \
	test "$(sed -n 's/^task=[0-9]* //p' <<<"$out" | sort -u | wc -l)" -eq 1
check "all 8 attached and read the job-start load back identical" \
	test "$(grep -cE "^verified task=[0-7] 6 MiB in 1 chunk of load 1 against the file: identical \(file bytes 0..6291456, sha256 $sum\)$" <<<"$out")" -eq 8
check "all 8 mapped the slab and the pool" \
	test "$(grep -cE '^attached task=[0-7] (slab 0 mapped here on GPU 0|pinned pool mapped here)' <<<"$out")" -eq 16
check "after the job: nothing left" nothing_left 10

# Two jobs on the same node at once have separate agents and directories.
j1=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 30')
j2=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 30')
if wait_ready "$j1" n1 20 && wait_ready "$j2" n1 20; then
	pass "two jobs on n1: both agents ready"
else
	fail "two jobs on n1: both agents ready"
fi
check "two jobs on n1: two agents" test "$(agent_pids | wc -l)" -eq 2
sl scancel "$j1"
wait_job "$j1" 30
check "ending one job leaves the other's agent" test -n "$(agent_of "$j2" n1)" -a -z "$(agent_of "$j1" n1)"
sl scancel "$j2"
wait_job "$j2" 30
check "after both: nothing left" nothing_left 10

finish

#!/bin/bash
# 8 tasks of one step start and attach at once.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

out=$(as_user timeout 60 srun -N1 -n8 --gres=gpu:1 --aegaeon-slab=64MiB bash -c '
	test -S "$AEGAEON_SOCKET" && echo "task=$SLURM_PROCID $AEGAEON_SOCKET $AEGAEON_SLAB0_HANDLE"' 2>&1)
rc=$?
check "8 tasks ran (rc $rc)" test $rc -eq 0
check "all 8 saw the agent" test "$(grep -c '^task=' <<<"$out")" -eq 8
check "all 8 got the same socket and slab handle" \
	test "$(sed -n 's/^task=[0-9]* //p' <<<"$out" | sort -u | wc -l)" -eq 1
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

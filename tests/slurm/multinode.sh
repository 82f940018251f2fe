#!/bin/bash
# srun -N2: each node has its own agent, job directory and slab; every rank
# of an MPI-style layout (2 per node) finds its node's agent.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

job=$(submit -N2 --ntasks-per-node=2 --gres=gpu:1 --aegaeon-slab=64MiB -o multi.out --wrap '
	srun bash -c "echo rank=\$SLURM_PROCID node=\$SLURMD_NODENAME slabs=\$AEGAEON_SLABS sock=\$AEGAEON_SOCKET; test -S \$AEGAEON_SOCKET && echo sock_ok=\$SLURM_PROCID"
	touch multi.done
	sleep 2')
if wait_ready "$job" n1 20 && wait_ready "$job" n2 20; then
	pass "both nodes' agents became ready"
else
	fail "both nodes' agents became ready"
fi
a1=$(agent_of "$job" n1)
a2=$(agent_of "$job" n2)
check "one agent per node, distinct ($a1, $a2)" test -n "$a1" -a -n "$a2" -a "$a1" != "$a2"
wait_for 30 test -e "$T/work/multi.done"
out=$(cat "$T/work/multi.out")
for r in 0 1 2 3; do
	check "rank $r found its socket" grep -qx "sock_ok=$r" <<<"$out"
done
check "ranks on n1 use n1's agent" test "$(grep -c "node=n1 slabs=1 sock=$T/aegrun/$job.n1/agent.sock" <<<"$out")" -eq 2
check "ranks on n2 use n2's agent" test "$(grep -c "node=n2 slabs=1 sock=$T/aegrun/$job.n2/agent.sock" <<<"$out")" -eq 2
wait_job "$job" 30
check "after the job: nothing left on either node" nothing_left 10

finish

#!/bin/bash
# srun -N2: each node has its own agent, job directory and slab; every rank
# of an MPI-style layout (2 per node) finds its node's agent, attaches (opens
# the slab, maps the pool) and reads back what its node's agent loaded.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

head -c $((4 << 20)) /dev/urandom >"$T/work/model.bin"
chown "$JOB_USER" "$T/work/model.bin"
sum=$(sha256sum <"$T/work/model.bin" | cut -d' ' -f1)
job=$(submit -N2 --ntasks-per-node=2 --gres=gpu:1 --aegaeon-slab=64MiB --aegaeon-pinned=8MiB:1MiB -o multi.out --wrap "
	srun bash -c 'echo rank=\$SLURM_PROCID node=\$SLURMD_NODENAME slabs=\$AEGAEON_SLABS sock=\$AEGAEON_SOCKET; test -S \$AEGAEON_SOCKET && echo sock_ok=\$SLURM_PROCID'
	srun $AEG_CLI prefetch model.bin --chunk 1MiB
	srun bash -c '$AEG_CLI chunks model.bin --verify | sed -n \"s/.*: verified /verified rank=\$SLURM_PROCID node=\$SLURMD_NODENAME /p\"'
	srun bash -c '$AEG_CLI status --attach | sed \"s/^/rank=\$SLURM_PROCID node=\$SLURMD_NODENAME /\"'
	touch multi.done
	for i in \$(seq 300); do test -e agents.seen && break; sleep 0.1; done")
if wait_ready "$job" n1 20 && wait_ready "$job" n2 20; then
	pass "both nodes' agents became ready"
else
	fail "both nodes' agents became ready"
fi
a1=$(agent_of "$job" n1)
a2=$(agent_of "$job" n2)
check "one agent per node, distinct ($a1, $a2)" test -n "$a1" -a -n "$a2" -a "$a1" != "$a2"
# The job ends (and its epilogs stop the agents) only once they were looked for:
# its steps can be over before a loaded machine's scan of /proc is.
touch "$T/work/agents.seen"
# Four steps of ASan-built programs on a shared two-core machine can take a while.
check "the job's steps ran to their end" wait_for 180 test -e "$T/work/multi.done"
out=$(cat "$T/work/multi.out")
for r in 0 1 2 3; do
	check "rank $r found its socket" grep -qx "sock_ok=$r" <<<"$out"
done
check "ranks on n1 use n1's agent" test "$(grep -c "node=n1 slabs=1 sock=$T/aegrun/$job.n1/agent.sock" <<<"$out")" -eq 2
check "ranks on n2 use n2's agent" test "$(grep -c "node=n2 slabs=1 sock=$T/aegrun/$job.n2/agent.sock" <<<"$out")" -eq 2
# All four ranks prefetch at once: on each node one loads, the other reuses.
check "each node's agent loaded the file once" \
	test "$(grep -c "model.bin: 4 MiB in .* GB/s through the job's agent (load 1, 4 chunks in slab 0)" <<<"$out")" -eq 2
check "the other rank of each node reused that load" \
	test "$(grep -c "model.bin: already in the job's slab (load 1, 4 MiB in 4 chunks): reused, nothing loaded" <<<"$out")" -eq 2
for r in 0 1 2 3; do
	check "rank $r attached and read the bytes back from its node's slab" \
		grep -qE "^verified rank=$r node=n[12] 4 MiB in 4 chunks of load 1 against the file: identical \(file bytes 0..4194304, sha256 $sum\)$" <<<"$out"
	check "rank $r mapped its node's slab and pool" \
		test "$(grep -cE "^rank=$r node=n[12] attached: (slab 0 mapped here on GPU 0|pinned pool mapped here, 8 buffers)" <<<"$out")" -eq 2
done
check "two ranks verified on each node" \
	test "$(grep -c '^verified rank=[0-9] node=n1 ' <<<"$out"):$(grep -c '^verified rank=[0-9] node=n2 ' <<<"$out")" = 2:2
check "each rank's status shows its node's one load" \
	test "$(grep -cE "^rank=[0-3] node=n[12] load 1: $T/work/model.bin -> slab 0, loaded" <<<"$out")" -eq 4
wait_job "$job" 30
check "after the job: nothing left on either node" nothing_left 10

finish

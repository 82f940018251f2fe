#!/bin/bash
# A node name of 65 characters: the prolog, the agent, task_init and the
# epilog agree on the job directory, whose name carries the first 15
# characters and a hash of the node name (test_jobdir checks that names
# differing in their last character get different ones). Before, the prolog
# cut the name at 64 bytes and the job's directory was left behind. One node
# with a short temp dir: slurmd's own step sockets, <spool>/<node>_<job>.<step>,
# must fit in 108 bytes too.
CLUSTER_NODE_PREFIX=gpu-node-rack-01-chassis-02-blade-03-slot-04-cluster-eu-west-7-n
CLUSTER_NODES=1
CLUSTER_PREFIX=/tmp/aeg-ln
source "$(dirname "$0")/cluster.sh"

n1=${CLUSTER_NODE_PREFIX}1
cluster_start || { fail "cluster starts with a node named $n1"; finish; exit; }

# The name the plugin gives (aeg_jobdir_name): FNV-1a 64 of the node name.
dir_name() {
	/usr/bin/python3 -c 'import sys
h = 0xcbf29ce484222325
for c in sys.argv[2].encode():
    h = ((h ^ c) * 0x100000001b3) % 2**64
print("%s.%s~%016x" % (sys.argv[1], sys.argv[2][:15], h))' "$1" "$2"
}

check "the node name is ${#n1} characters long" test ${#n1} -eq 65
out=$(as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-slab=64MiB \
	bash -c 'echo "$SLURM_JOB_ID $AEGAEON_SLABS $AEGAEON_JOB_DIR"; test -S "$AEGAEON_SOCKET"' 2>&1)
rc=$?
check "a job with options runs (rc $rc: $out)" test $rc -eq 0
job=${out%% *}
check "the step sees its slab in the directory named for the node" \
	test "$out" = "$job 1 $T/aegrun/$(dir_name "$job" "$n1")"
check "after the job: no agent, no runtime dir" nothing_left 10

job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=64MiB -o batch.out --wrap 'srun bash -c "echo step=\$AEGAEON_SLABS"')
wait_job "$job" 30
check "a batch job's step sees its slab" grep -qx "step=1" "$T/work/batch.out"
check "after the batch job: nothing left" nothing_left 10

finish

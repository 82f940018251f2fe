#!/bin/bash
# A job with aegaeon options sees the environment of the contract and an
# agent of its own; a job without options sees nothing and gets no agent.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

# env_of OUTPUT NAME: the value of NAME in `env` output
env_of() { sed -n "s/^$2=//p" <<<"$1" | head -n 1; }

out=$(as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-slab=64MiB bash -c '
	env | grep ^AEGAEON_ | sort
	echo "dir_mode=$(stat -c %a:%U "$AEGAEON_JOB_DIR")"
	echo "sock_mode=$(stat -c %F:%a:%U "$AEGAEON_SOCKET")"
	p=$(sed -n "s/^pid=//p" "$AEGAEON_JOB_DIR/ready")
	echo "agent_uid=$(awk "/^Uid:/ { print \$2 \":\" \$3 \":\" \$4 \":\" \$5 }" /proc/$p/status)"' 2>&1)
rc=$?
check "a job with --aegaeon-slab runs (rc $rc)" test $rc -eq 0
check "AEGAEON_SLABS=1 for one GPU" test "$(env_of "$out" AEGAEON_SLABS)" = 1
check "AEGAEON_SLAB0_BYTES is the 64 MiB asked" test "$(env_of "$out" AEGAEON_SLAB0_BYTES)" = 67108864
check "AEGAEON_SLAB0_GPU=0" test "$(env_of "$out" AEGAEON_SLAB0_GPU)" = 0
check "AEGAEON_SLAB0_HANDLE is 128 hex digits" grep -qE '^AEGAEON_SLAB0_HANDLE=[0-9a-f]{128}$' <<<"$out"
check "AEGAEON_GPUS=0" test "$(env_of "$out" AEGAEON_GPUS)" = 0
check "AEGAEON_DEVICE=host (the site's backend)" test "$(env_of "$out" AEGAEON_DEVICE)" = host
check "AEGAEON_PINNED_BYTES is the site default 16 MiB" test "$(env_of "$out" AEGAEON_PINNED_BYTES)" = 16777216
check "AEGAEON_PINNED_BUFFER is the site's 1 MiB" test "$(env_of "$out" AEGAEON_PINNED_BUFFER)" = 1048576
check "AEGAEON_JOB_DIR is <runtime_dir>/<jobid>.n1" grep -qE "^AEGAEON_JOB_DIR=$T/aegrun/[0-9]+\.n1$" <<<"$out"
check "AEGAEON_SOCKET is in the job dir" grep -qE "^AEGAEON_SOCKET=$T/aegrun/[0-9]+\.n1/agent.sock$" <<<"$out"
check "job dir is 0700 and the user's" grep -qx "dir_mode=700:$JOB_USER" <<<"$out"
check "socket is a 0600 socket of the user" grep -qx "sock_mode=socket:600:$JOB_USER" <<<"$out"
check "agent runs as the job user, all four uids" grep -qx "agent_uid=$JOB_UID:$JOB_UID:$JOB_UID:$JOB_UID" <<<"$out"
check "after the job: no agent, no runtime dir" nothing_left 10

out=$(as_user timeout 60 srun -N1 --gres=gpu:2 --aegaeon-slab=32MiB --aegaeon-pinned=8MiB:2MiB env 2>&1)
check "two GPUs: two slabs" test "$(env_of "$out" AEGAEON_SLABS)" = 2
check "two GPUs: AEGAEON_GPUS=0,1" test "$(env_of "$out" AEGAEON_GPUS)" = 0,1
check "two GPUs: slab 1 on GPU 1, 32 MiB" test "$(env_of "$out" AEGAEON_SLAB1_GPU):$(env_of "$out" AEGAEON_SLAB1_BYTES)" = 1:33554432
check "--aegaeon-pinned=8MiB:2MiB gives that pool" \
	test "$(env_of "$out" AEGAEON_PINNED_BYTES):$(env_of "$out" AEGAEON_PINNED_BUFFER)" = 8388608:2097152

out=$(as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-pinned=0 env 2>&1)
check "--aegaeon-pinned=0 alone: no pool, the site's default slab" \
	test "$(env_of "$out" AEGAEON_PINNED_BYTES):$(env_of "$out" AEGAEON_SLAB0_BYTES)" = 0:67108864

# srun returns before the epilog of its job has run: the next job goes to the
# other node while that epilog still removes its directory, so a job looks
# for its own directory only, and the epilogs are waited for apart. A job
# whose agent is stopped (its epilog waits agent_stop_timeout) makes sure
# an epilog is still running when the next job looks (--quiet: when both
# nodes are still busy, srun's "queued and waiting" is no part of the output).
as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-slab=64MiB \
	bash -c 'kill -STOP $(sed -n "s/^pid=//p" "$AEGAEON_JOB_DIR/ready")'
out=$(as_user timeout 60 srun --quiet -N1 --gres=gpu:1 bash -c 'env | grep -c ^AEGAEON_
	ls -A '"$T/aegrun"' | grep -c "^$SLURM_JOB_ID\\."; exit 0' 2>&1)
check "a job without options sees no AEGAEON_ variable and no job dir ($(echo $out))" test "$(echo $out)" = "0 0"
check "the jobs with options before it cleaned up" nothing_left 10

out=$(as_user timeout 60 srun -N1 -w n1 --aegaeon-slab=64MiB true 2>&1)
rc=$?
check "--aegaeon-slab without GPUs fails the step (rc $rc)" test $rc -ne 0
check "... saying the job has no GPU" grep -qF "but the job has none on node n1 (ask for GPUs with --gres=gpu:N" <<<"$out"

# Batch: options given to sbatch reach the script and the steps inside it,
# and the prefetch list reaches the agent as absolute paths.
head -c 1048576 /dev/urandom >"$T/work/model.bin"
chown "$JOB_USER" "$T/work/model.bin"
job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=64MiB --aegaeon-prefetch=model.bin -o batch.out \
	--wrap 'echo script=$AEGAEON_SLABS; srun bash -c "echo step=\$AEGAEON_SLABS"
		for i in $(seq 300); do test -e agent.seen && break; sleep 0.1; done')
check "batch job submitted" test -n "$job"
if wait_ready "$job" n1 20; then
	agent=$(agent_of "$job" n1)
	check "prefetch path reached the agent made absolute" \
		grep -qF -- "--prefetch $T/work/model.bin" <(tr '\0' ' ' <"/proc/$agent/cmdline")
	check "the agent's environment is clean (no SLURM_/SPANK_ variable)" \
		bash -c "! tr '\\0' '\\n' </proc/$agent/environ | grep -qE '^(SLURM|SPANK)'"
else
	fail "batch job's agent became ready"
fi
touch "$T/work/agent.seen"      # the job ends once its agent was looked at (a bounded wait)
wait_job "$job" 30
check "the batch script sees the env" grep -qx "script=1" "$T/work/batch.out"
check "a step inside it sees the env without repeating the options" grep -qx "step=1" "$T/work/batch.out"
check "after the batch job: nothing left" nothing_left 10

finish

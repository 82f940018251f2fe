#!/bin/bash
# An agent killed mid-job: the next step fails with a clear message, the
# epilog still cleans up.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=64MiB -o killed.out --wrap '
	srun bash -c "echo step1=\$AEGAEON_SLABS"
	touch step1.done
	for i in $(seq 100); do [[ -e agent.killed ]] && break; sleep 0.1; done
	srun bash -c "echo step2=\$AEGAEON_SLABS"
	echo step2_rc=$?')
wait_for 30 test -e "$T/work/step1.done"
check "step 1 saw the agent" grep -qx "step1=1" "$T/work/killed.out"
agent=$(agent_of "$job" n1)
check "agent found" test -n "$agent"
[[ -n $agent ]] && kill -KILL "$agent"
touch "$T/work/agent.killed"
wait_job "$job" 60
check "step 2 failed" grep -qx "step2_rc=1" "$T/work/killed.out"
check "step 2 said the agent is gone" \
	grep -qE "aegaeon: the job's agent \(pid $agent\) on node n1 is gone" "$T/work/killed.out"
check "step 2 got no env" bash -c "! grep -q '^step2=' '$T/work/killed.out'"
check "the epilog cleaned up anyway" nothing_left 10

# An agent that fails to start is reported by the first step with its reason.
write_site_config "agent_path = \"$T/no-such-aegaeond\";"
out=$(as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-slab=64MiB true 2>&1)
check "agent that cannot start: step fails (rc $?)" test $? -ne 0
check "... with the reason" grep -qF "aegaeon: the agent $T/no-such-aegaeond could not start: No such file or directory" <<<"$out"
check "... and nothing is left" nothing_left 10

finish

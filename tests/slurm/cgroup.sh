#!/bin/bash
# On a cluster that confines jobs with cgroups (proctrack/cgroup, task/cgroup
# with ConstrainDevices and ConstrainRAMSpace, PrologFlags=Contain), the
# agent belongs to the job: the extern step puts it in the job's cgroups
# (those of the step's own process), so its memory is charged to the job and
# the job's device limits apply to it, and Slurm kills it, with what it
# started, when the job ends. Before, it stayed in slurmd's cgroups.
CLUSTER_CGROUP=1
source "$(dirname "$0")/cluster.sh"

if ! why=$(cluster_cgroup_usable); then
	echo "SKIP: $TEST_NAME: slurmd cannot use cgroups here: $why"
	echo "# $TEST_NAME: 0 passed, 0 failed"
	exit 0
fi
cluster_start || { fail "cluster starts with proctrack/cgroup and task/cgroup"; finish; exit; }

MARK="AEG_CGROUP_MARK=$T"
marked() { marked_pids "$MARK"; }
# The agent's process leaves a sleep behind (see agent_tree.sh).
agent_wrapper "env $MARK sleep 10011 &"

# The extern step's own process: the `sleep` slurmstepd [JOB.extern] started.
extern_task() {
	local p
	for p in $(pgrep -x sleep); do
		# (slurmstepd's title is cut short: "slurmstepd: [12.ext d")
		[[ $(ps -o args= -p "$(ps -o ppid= -p "$p" | tr -d ' ')") == "slurmstepd: [$1.ext"* ]] && echo "$p"
	done
	return 0
}
# probe_open PID FILE: as the job user, open FILE from a process put in the
# cgroup that confines PID's devices (v1 devices, else the v2 cgroup).
probe_open() {
	local dir
	if [[ -e /sys/fs/cgroup/cgroup.controllers ]]; then
		dir=/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/$1/cgroup")
	else
		dir=/sys/fs/cgroup/devices$(sed -n 's/^[0-9]*:devices://p' "/proc/$1/cgroup")
	fi
	bash -c 'echo $$ >"$1/cgroup.procs" &&
		exec setpriv --reuid="$2" --regid="$3" --clear-groups dd if="$4" of=/dev/null count=1 status=none' \
		_ "$dir" "$JOB_UID" "$JOB_GID" "$2" 2>&1
}

job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 300')
wait_ready "$job" n1 20
agent=$(agent_of "$job" n1)
task=$(extern_task "$job")
check "agent ($agent) and the extern step's process ($task) running" test -n "$agent" -a -n "$task"
check "the agent is in the job's cgroups" grep -q "/job_$job/step_extern" "/proc/${agent:-0}/cgroup"
check "... in every hierarchy where the extern step's process is" \
	test "$(cat "/proc/${agent:-0}/cgroup")" = "$(cat "/proc/${task:-0}/cgroup")"
check "... and so is what it started" \
	test "$(cat "/proc/$(marked | head -n 1)/cgroup" 2>&1)" = "$(cat "/proc/${task:-0}/cgroup")"
check "the extern step logged it" \
	grep -qE "\[$job\.extern\] aegaeon: job $job on n1: agent $agent joined the job's cgroups: .*job_$job/step_extern" \
	"$T/log/slurmd-n1.log"
# The job has one of n1's two GPUs: the other is out of the agent's reach.
out0=$(probe_open "${agent:-0}" "$T/dev/nvidia0")
out1=$(probe_open "${agent:-0}" "$T/dev/nvidia1")
check "the job's device limits apply to the agent: one GPU refused, the other not ($out0 | $out1)" \
	test "$(grep -c 'Operation not permitted' <<<"$out0
$out1")" -eq 1
sl scancel "$job"
wait_job "$job" 30
check "after the job: no agent, no job dir" nothing_left 10
check "after the job: nothing the agent started is left ($(echo $(marked)))" test -z "$(marked)"
check "Slurm stopped them: the epilog found no agent to stop" \
	bash -c "! grep -qE 'job $job on n1: (agent [0-9]+ (gone|stopped)|killed [0-9]+ process)' '$T/log/slurmd-n1.log'"

# A job without Contain's extern step is not different for a step: srun works.
# (Once in CI the step had not printed after the 60 s: what every slurmstepd and
# agent then waits in is kept, from 45 s, so a next time says where it hangs.)
as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-slab=64MiB bash -c 'echo $AEGAEON_SLABS' >"$T/step.out" 2>&1 &
srun_pid=$!
for ((i = 0; i < 450; i++)); do
	kill -0 "$srun_pid" 2>/dev/null || break
	sleep 0.1
done
if kill -0 "$srun_pid" 2>/dev/null; then
	echo "# the step has run 45 s; its node's processes (pid, state, wait channel, kernel stack):"
	for p in $(pgrep -f 'slurmstepd|aegaeond|AEGAEON_SLABS'); do
		echo "#   $(ps -o pid=,stat=,wchan:32=,args= -p "$p" 2>/dev/null | cut -c1-150)"
		echo "#     $(head -n 6 "/proc/$p/stack" 2>/dev/null | awk '{print $2}' | tr '\n' ' ')"
	done
	echo "# the last lines of slurmd-n1.log:"
	tail -n 25 "$T/log/slurmd-n1.log" | sed 's/^/#   /'
fi
wait "$srun_pid"
out=$(cat "$T/step.out")
check "a job step sees its slab ($out)" test "$out" = 1
check "nothing left" nothing_left 10

finish

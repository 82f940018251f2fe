#!/bin/bash
# The epilog stops the agent and removes the job directory after a normal
# end, scancel and the time limit, after a job whose agent failed, and stops
# the agent when the site configuration broke while the job ran.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

opts=(-N1 --gres=gpu:1 --aegaeon-slab=64MiB)

out=$(as_user timeout 60 srun "${opts[@]}" true 2>&1)
check "normal end: the job ran ($out)" test $? -eq 0
check "normal end: no agent, no runtime dir" nothing_left 10

job=$(submit "${opts[@]}" --wrap 'sleep 300')
if wait_ready "$job" n1 20 && [[ -n $(agent_of "$job" n1) ]]; then
	pass "scancel: agent running before"
else
	fail "scancel: agent running before"
fi
sl scancel "$job"
wait_job "$job" 30
check "scancel: no agent, no runtime dir" nothing_left 10

# Slurm enforces limits in whole minutes, checked about every 30 s.
job=$(submit "${opts[@]}" --time=1 --wrap 'sleep 300')
wait_ready "$job" n1 20
check "time limit: job ended by Slurm within 120 s" wait_job "$job" 120
check "time limit: state TIMEOUT" bash -c "env -i SLURM_CONF=$T/etc/slurm.conf scontrol -o show job $job | grep -q JobState=TIMEOUT"
check "time limit: no agent, no runtime dir" nothing_left 10

# An agent that ignores SIGTERM is killed after agent_stop_timeout, and the epilog says so.
job=$(submit "${opts[@]}" --wrap 'sleep 300')
wait_ready "$job" n1 20
agent=$(agent_of "$job" n1)
if [[ -n $agent ]]; then
	# SIG_IGN for TERM, set from outside through gdb would be fragile: stop it instead,
	# so TERM stays pending until KILL.
	kill -STOP "$agent"
	sl scancel "$job"
	wait_job "$job" 30
	check "stuck agent: killed, dir removed" nothing_left 10
	check "stuck agent: the epilog logged the SIGKILL" \
		grep -qF "still running 2000 ms after SIGTERM; sending SIGKILL" "$T/log/slurmd-n1.log"
else
	fail "stuck agent: agent found"
fi

# The site configuration broken while a job runs (an edit, a key of another
# version): the epilog no longer knows runtime_dir, yet stops the job's agent,
# found by its command line, and says what it leaves for the administrator.
job=$(submit "${opts[@]}" --wrap 'sleep 300')
wait_ready "$job" n1 20
agent=$(agent_of "$job" n1)
check "broken config: agent running before ($agent)" test -n "$agent"
cp "$T/etc/aegaeon.conf" "$T/aegaeon.conf.good"
echo 'hello_timeout = 0;' >>"$T/etc/aegaeon.conf"
sl scancel "$job"
wait_job "$job" 30
check "broken config: the epilog stopped the agent all the same" wait_for 10 test ! -e "/proc/${agent:-0}"
check "broken config: and said what it left" grep -qF "job $job on n1: site configuration $T/etc/aegaeon.conf: " \
	"$T/log/slurmd-n1.log"
check "... the job directory, named" grep -qF "its directory under runtime_dir (.../$job.n1) and the agent's record there are left until the configuration is fixed" \
	"$T/log/slurmd-n1.log"
cp "$T/aegaeon.conf.good" "$T/etc/aegaeon.conf"
rm -rf "$(job_dir "$job" n1)" "$T/aegrun/.agent-$job.n1"
check "broken config: nothing else left" nothing_left 10

# A stale directory of the same job id (a crashed node) is replaced, links not followed.
next=$(($(sl scontrol -o show job | sed -n 's/^JobId=\([0-9]*\).*/\1/p' | sort -n | tail -n 1) + 1))
mkdir -p "$T/aegrun/$next.n1/sub"
echo stale >"$T/aegrun/$next.n1/ready"
touch "$T/victim"
ln -s "$T/victim" "$T/aegrun/$next.n1/sub/link"
out=$(as_user timeout 60 srun "${opts[@]}" bash -c 'echo $SLURM_JOB_ID $AEGAEON_SLABS' 2>&1)
check "stale dir of job $next: the job ran with a fresh agent ($out)" test "$out" = "$next 1"
check "stale dir: the link's target survived" test -f "$T/victim"
check "stale dir: nothing left after the job" nothing_left 10

finish

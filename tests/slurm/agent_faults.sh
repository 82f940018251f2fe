#!/bin/bash
# Faults around the agent under Slurm: the agent killed while a step waits
# on a load in flight (the step ends with a clear error, the epilog cleans
# up, the next job works), and what an earlier run of the same job id left
# on the node (its directory with links planted in it, its agent still
# running): the prolog stops that agent and removes the rest without
# following a link, and the job runs with an agent of its own.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

# A load in flight: the step starts it and at once stops the agent (it is
# the job user's), then waits on the load through it; the test kills it then.
head -c $((64 << 20)) /dev/zero | tr '\0' 'w' >"$T/work/big.bin"
chown "$JOB_USER" "$T/work/big.bin"
job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=512MiB --aegaeon-pinned=16MiB:1MiB -o midload.out --wrap "
	srun bash -c 'pid=\$($AEG_CLI status | sed -n \"s/.*agent pid \\([0-9]*\\).*/\\1/p\");
		$AEG_CLI prefetch big.bin --chunk 256KiB --no-wait >/dev/null && kill -STOP \$pid &&
		touch prefetch.started && timeout 60 $AEG_CLI wait big.bin --timeout 50; echo wait_rc=\$?'")
wait_for 30 test -e "$T/work/prefetch.started"
agent=$(agent_of "$job" n1)
check "agent of job $job found, stopped mid-load" grep -q "^State:.*stopped" "/proc/${agent:-0}/status"
sleep 0.5
[[ -n $agent ]] && kill -KILL "$agent"
wait_job "$job" 60
out=$(cat "$T/work/midload.out")
check "the waiting step ended with an error naming the agent, not hung ($out)" \
	grep -qx "wait_rc=1" <<<"$out"
check "... the agent closed the connection ($out)" grep -qE "the agent at .*/agent.sock closed the connection" <<<"$out"
check "the epilog cleaned up after the killed agent" nothing_left 10
out=$(as_user timeout 60 srun -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB "$AEG_CLI" status 2>&1)
check "the next job on n1 works ($out)" grep -qE "^slab 0" <<<"$out"
check "nothing left" nothing_left 10

# What a crashed run of job $next left on n1: a live agent, a stale socket,
# a pid file naming init, a ready record of garbage, and links to root's files.
next=$(($(sl scontrol -o show job | sed -n 's/^JobId=\([0-9]*\).*/\1/p' | sort -n | tail -n 1) + 1))
dir=$(job_dir "$next" n1)
mkdir -m 700 "$dir"
chown "$JOB_USER:" "$dir"
setpriv --reuid="$JOB_UID" --regid="$JOB_GID" --init-groups setsid "$AEG_AGENT" --job "$next" \
	--runtime-dir "$dir" --gpus none --pinned 16MiB --device host --config "$T/etc/aegaeon.conf" \
	</dev/null >/dev/null 2>&1 &
stale=$!
wait_for 10 test -f "$dir/ready"
check "a stale agent runs for job $next (pid $stale)" test "$(agent_of "$next" n1)" = "$stale"
echo "root's" >"$T/precious"
chmod 600 "$T/precious"
runuser -u "$JOB_USER" -- bash -c "echo 1 >'$dir/agent.pid' && echo garbage >'$dir/ready' &&
	ln -s '$T/precious' '$dir/error' && mkdir '$dir/sub' && ln -s '$T' '$dir/sub/up'"
out=$(as_user timeout 60 srun -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB bash -c \
	'echo $SLURM_JOB_ID $AEGAEON_SLABS; '"$AEG_CLI"' status >/dev/null && echo status_ok' 2>&1)
check "job $next ran with an agent of its own ($out)" test "$out" = "$next 1"$'\n'"status_ok"
wait "$stale" 2>/dev/null
check "the stale agent was stopped" bash -c "! kill -0 $stale 2>/dev/null"
check "slurmd says so" grep -qF "job $next on n1: stopped 1 agent(s) left by an earlier run of this job" "$T/log/slurmd-n1.log"
check "... and removed the stale directory" grep -qE "job $next: removed a stale $dir \([0-9]+ entries\)" "$T/log/slurmd-n1.log"
check "the linked files are untouched" test "$(cat "$T/precious"):$(stat -c %U:%a "$T/precious")" = "root's:root:600"
check "the cluster dir the inner link named is untouched" test -d "$T/work" -a -f "$T/etc/aegaeon.conf"
check "nothing left" nothing_left 10

finish

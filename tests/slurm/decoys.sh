#!/bin/bash
# The job user cannot hide the job's agent from root. The user runs more
# processes than the epilog holds at once, each with the agent's command
# line ("--runtime-dir JOBDIR"), and rewrites agent.pid to name one of them.
# Before, the epilog trusted agent.pid and then the first 16 such processes
# it met in /proc, stopped those decoys, and left the real agent running,
# with its GPU memory, after the job. Now the prolog records the agent it
# started in runtime_dir, where only root writes, and the epilog stops that
# one first; it says that more processes claimed to be the agent than it
# holds.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

DECOYS=70

# The job's real agent: the aegaeond among the processes with its command line.
real_agent() {
	local p
	for p in $(agent_of "$1" n1); do
		[[ $(cat "/proc/$p/comm" 2>/dev/null) == aegaeond ]] && echo "$p"
	done
	return 0
}
# start_decoys N DIR: N more processes of the job user with "--runtime-dir DIR" on their command line.
decoys=()
start_decoys() {
	local i
	for i in $(seq "$1"); do
		setpriv --reuid="$JOB_UID" --regid="$JOB_GID" --clear-groups setsid \
			bash -c 'sleep 300; :' decoy --runtime-dir "$2" </dev/null >/dev/null 2>&1 &
		decoys+=($!)
	done
}
decoys_alive() {
	local p n=0
	for p in "${decoys[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
	echo $n
}

# Before the job starts: the prolog takes them for agents an earlier run of
# the job left, and stops as many as it holds; the job gets its agent.
job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --hold --wrap 'sleep 300')
dir=$(job_dir "$job" n1)
start_decoys $DECOYS "$dir"
check "$DECOYS decoys of job $job run as the job user" \
	wait_for 10 test "$(agent_of "$job" n1 | wc -l)" -eq $DECOYS
sl scontrol release "$job"
wait_ready "$job" n1 20
agent=$(real_agent "$job")
check "the job's agent runs ($agent)" test -n "$agent"
check "the prolog stopped 64 decoys as stale agents ($(decoys_alive) left)" test "$(decoys_alive)" -eq $((DECOYS - 64))
check "... and said more claimed to be the agent than it holds" \
	grep -qF "job $job on n1: more than 64 processes of uid $JOB_UID claim to be its agent" "$T/log/slurmd-n1.log"
record=$T/aegrun/.agent-$job.n1
check "the prolog recorded the agent in runtime_dir, root's and 0600 ($(stat -c '%U %a' "$record" 2>&1))" \
	test "$(stat -c '%U %a' "$record" 2>&1)" = "root 600"
# (field 22 of /proc/PID/stat, the 20th after the command's closing parenthesis)
check "... with its pid and start time" \
	test "$(cat "$record" 2>&1)" = "$agent $(sed 's/.*) //' "/proc/${agent:-0}/stat" | cut -d' ' -f20)"

# While the job runs: more decoys, and agent.pid naming one.
start_decoys $DECOYS "$dir"
runuser -u "$JOB_USER" -- sh -c "echo ${decoys[0]} >'$dir/agent.pid'"
check "agent.pid now names a decoy" test "$(cat "$dir/agent.pid")" = "${decoys[0]}"
before=$(decoys_alive)
sl scancel "$job"
check "the job ended" wait_job "$job" 60
check "the epilog stopped the real agent" wait_for 10 test ! -e "/proc/${agent:-0}"
check "... the recorded one first, and said that more claimed to be it" \
	grep -qE "job $job on n1: more than 64 .* stopping 64, the recorded agent first" "$T/log/slurmd-n1.log"
node_idle() { [[ $(sl sinfo -h -n n1 -o %T) == idle ]]; }
check "n1 is not drained ($(sl sinfo -h -n n1 -o %T))" wait_for 10 node_idle
check "the record and the job directory are gone" test ! -e "$record" -a ! -e "$dir"
check "the epilog stopped 63 decoys beside the agent ($before -> $(decoys_alive))" \
	test "$(decoys_alive)" -eq $((before - 63))
kill -KILL "${decoys[@]}" 2>/dev/null
pkill -KILL -u "$JOB_UID" -x sleep 2>/dev/null
wait "${decoys[@]}" 2>/dev/null
check "nothing left" nothing_left 10

# Without a record (an agent started before records were kept), a few decoys
# do not hide it: the epilog finds every process with its command line.
job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 300')
dir=$(job_dir "$job" n1)
wait_ready "$job" n1 20
agent=$(real_agent "$job")
rm -f "$T/aegrun/.agent-$job.n1"
decoys=()
start_decoys 3 "$dir"
runuser -u "$JOB_USER" -- sh -c "echo ${decoys[0]} >'$dir/agent.pid'"
sl scancel "$job"
check "no record: the job ended" wait_job "$job" 60
check "no record: the agent ($agent) was stopped all the same" wait_for 10 test ! -e "/proc/${agent:-0}"
check "no record: so were the decoys" wait_for 10 bash -c "! kill -0 ${decoys[*]} 2>/dev/null"
wait "${decoys[@]}" 2>/dev/null
check "nothing left" nothing_left 10

finish

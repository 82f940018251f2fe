#!/bin/bash
# The epilog signals the agent it identified, never a process that took its
# pid over. The job user stops their agent, so the epilog waits
# agent_stop_timeout after SIGTERM; meanwhile the agent dies and a root
# process gets its pid. Before, the epilog then sent that process SIGKILL.
# The whole cluster runs in a pid namespace of its own, where the test sets
# the next pid (/proc/sys/kernel/ns_last_pid) to make the reuse happen, and
# the epilog is held (SIGSTOP) while the pid changes hands, so it cannot see
# the moment the pid is free: on a busy node that moment can be shorter than
# the epilog's polls.
if [[ ${AEG_PIDNS:-} != 1 ]]; then
	exec env AEG_PIDNS=1 unshare --pid --fork --kill-child --mount-proc bash "$0" "$@"
fi
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }
write_site_config 'agent_stop_timeout = 15.0;'

# sigterm_pending PID: SIGTERM (15, bit 14) waits in the stopped process's shared pending set
sigterm_pending() { (( 0x$(sed -n 's/^ShdPnd:\t//p' "/proc/$1/status") & 0x4000 )); }

# take_pid PID: start a root `sleep` whose pid is PID (pid namespace: only this
# cluster forks here, but its daemons' threads take pids too, hence the tries)
take_pid() {
	local i
	for i in $(seq 200); do
		echo $(($1 - 1)) >/proc/sys/kernel/ns_last_pid
		sleep 300 &
		[[ $! -eq $1 ]] && { victim=$!; return 0; }
		kill -KILL $! 2>/dev/null
		wait $! 2>/dev/null
	done
	return 1
}

job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 300')
wait_ready "$job" n1 20
agent=$(agent_of "$job" n1)
check "agent running ($agent)" test -n "$agent"
victim=
if [[ -n $agent ]]; then
	as_user kill -STOP "$agent"
	sl scancel "$job"
	check "the epilog sent SIGTERM to the stopped agent" wait_for 30 sigterm_pending "$agent"
	epilog=$(pgrep -f 'slurmstepd spank epilog$')
	check "the epilog process found ($epilog)" test "$(wc -w <<<"$epilog")" -eq 1
	kill -STOP $epilog
	# The user ends the agent; the test's shell (pid 1 here) reaps it.
	as_user kill -KILL "$agent"
	check "the agent is gone" wait_for 10 test ! -e "/proc/$agent"
	check "a root process took the agent's pid $agent" take_pid "$agent"
	check "... while the epilog still waited (no SIGKILL sent yet)" \
		bash -c "! grep -qF 'sending SIGKILL' '$T/log/slurmd-n1.log'"
	kill -CONT $epilog
	check "the epilog ended" wait_job "$job" 40
	check "the job dir is gone" nothing_left 20
	check "the root process that took the agent's pid still runs" kill -0 "${victim:-0}"
	check "the epilog sent no SIGKILL" bash -c "! grep -qF 'sending SIGKILL' '$T/log/slurmd-n1.log'"
	[[ -n $victim ]] && { kill -KILL "$victim"; wait "$victim"; } 2>/dev/null
fi

finish

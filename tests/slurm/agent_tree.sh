#!/bin/bash
# What the agent started goes with the job, on a cluster without cgroups
# (proctrack/linuxproc) too. The agent's process starts two processes, as a
# debugger attached to it could make it do: a child, and one that leaves its
# session and its parent once the agent runs. Both end up the agent's (it is
# its children's subreaper) and the epilog kills them before it stops the
# agent. Before, they outlived the job.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

MARK="AEG_TREE_MARK=$T"
marked() { marked_pids "$MARK"; }
parents() { for p in $(marked); do ps -o ppid= -p "$p"; done | tr -d ' ' | sort -u; }
sessions() { for p in $(marked); do ps -o sid= -p "$p"; done | sort -u | wc -l; }

# The agent's process leaves two: a sleep, and a subshell that, once the
# agent is ready (its subreaper flag is set by then), starts a sleep in a new
# session and exits.
agent_wrapper 'dir=; for a in "$@"; do [ "$prev" = --runtime-dir ] && dir=$a; prev=$a; done' \
	"env $MARK sleep 10007 &" \
	"( while [ ! -e \"\$dir/ready\" ]; do sleep 0.05; done; env $MARK setsid sleep 10009 & ) &"

job=$(submit -N1 -w n1 --gres=gpu:1 --aegaeon-slab=64MiB --wrap 'sleep 300')
wait_ready "$job" n1 20
agent=$(agent_of "$job" n1)
check "agent running ($agent)" test -n "$agent"
check "the agent's process started two processes" wait_for 10 test "$(marked | wc -l)" -eq 2
check "... both now children of the agent ($(parents))" wait_for 10 test "$(parents)" = "$agent"
check "... one in a session of its own" test "$(sessions)" -eq 2
sl scancel "$job"
wait_job "$job" 30
check "after the job: no agent, no job dir" nothing_left 10
check "after the job: nothing the agent started is left ($(echo $(marked)))" test -z "$(marked)"
check "the epilog said what it killed" \
	grep -qF "aegaeon: job $job on n1: killed 2 process(es) agent $agent had started" "$T/log/slurmd-n1.log"

finish

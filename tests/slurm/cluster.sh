# A throwaway Slurm cluster for the aegaeon tests: munged, slurmctld and two
# slurmd (n1, n2) in a temp dir on free ports, fake GPUs, the build tree's
# plugin and agent (scripts/lib/cluster.sh starts and stops it). Sourced by
# each test file; see run.sh.
#
# Needs root, Slurm 22.05 daemons and munge. Environment:
#   AEG_BUILDDIR  absolute build tree (holds src/spank/.libs/aegaeon.so,
#                 aegaeond and aegaeon-cli)
#   AEG_KEEP=1    keep the temp dir after a failure (for debugging)
#   AEG_SANITIZERS=1, AEG_SANITIZER_LOGS  an --enable-sanitizers build, and
#                 where reports go (run.sh sets them; scripts/lib/cluster.sh
#                 says how they are used)

set -u

: "${AEG_BUILDDIR:?AEG_BUILDDIR must name the build tree}"
AEG_PLUGIN=${AEG_PLUGIN:-$AEG_BUILDDIR/src/spank/.libs/aegaeon.so}
# The non-recursive build puts programs at the top of the build tree.
first_of() { for f in "$@"; do [[ -e $f ]] && { echo "$f"; return; }; done; echo "$1"; }
AEG_AGENT=${AEG_AGENT:-$(first_of "$AEG_BUILDDIR/aegaeond" "$AEG_BUILDDIR/src/agent/aegaeond")}
AEG_CLI=${AEG_CLI:-$(first_of "$AEG_BUILDDIR/aegaeon-cli" "$AEG_BUILDDIR/src/cli/aegaeon-cli")}
CLUSTER_PLUGIN=$AEG_PLUGIN
# A test file may set CLUSTER_NODES, CLUSTER_PREFIX, CLUSTER_NODE_PREFIX or
# CLUSTER_CGROUP before sourcing this (scripts/lib/cluster.sh says what they do).
CLUSTER_NODES=${CLUSTER_NODES:-2}
CLUSTER_GPUS=2
CLUSTER_GPU_FILES=
CLUSTER_PREFIX=${CLUSTER_PREFIX:-/tmp/aegaeon-slurm}
CLUSTER_SANITIZERS=${AEG_SANITIZERS:-0}
CLUSTER_RECORD=${AEG_CLUSTER_RECORD:-}
CLUSTER_SANITIZER_LOGS=${AEG_SANITIZER_LOGS:-}
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/cluster.sh"
# A second unprivileged identity with no passwd entry, for access checks.
OTHER_UID=65533

PASSED=0
FAILED=0
TEST_NAME=${TEST_NAME:-$(basename "$0" .sh)}

log() { printf '# %s\n' "$*" >&2; }

# One line per result: command output quoted in a description is folded.
pass() { local m="$*"; PASSED=$((PASSED + 1)); printf 'ok %d - %s: %s\n' $((PASSED + FAILED)) "$TEST_NAME" "${m//$'\n'/ | }"; }
fail() {
	local m="$*"
	FAILED=$((FAILED + 1))
	printf 'not ok %d - %s: %s\n' $((PASSED + FAILED)) "$TEST_NAME" "${m//$'\n'/ | }"
	((FAILED == 1)) && diagnose
	return 0
}

# At a test's first failure, while the cluster still shows it: what each of
# its processes is doing (state, wait channel, kernel stack and, with gdb,
# each thread's stack, innermost call first; the daemons' threads left out,
# which would take too long) and the ends of its logs. A failure in CI
# cannot be run again.
diagnose() {
	local p f daemons=" ${PIDS[*]} " until=$((SECONDS + 40))
	[[ -n ${T:-} && -d $T ]] || return 0
	log "diagnosis at the first failure: the cluster's processes"
	for p in $(stray_pids); do
		[[ $p == "$SYSLOG_PID" ]] && continue
		log "  $(ps -o pid=,ppid=,stat=,wchan:24=,etime=,args= -p "$p" 2>/dev/null | cut -c1-200)"
		[[ $daemons == *" $p "* ]] && continue
		[[ -r /proc/$p/stack ]] &&
			log "    kernel: $(sed -E 's/^\[<[0-9a-f]+>\] ([^+]+).*/\1/' "/proc/$p/stack" 2>/dev/null | head -n 8 | paste -sd' ')"
		case $(cat "/proc/$p/comm" 2>/dev/null) in runuser | setpriv | timeout) continue ;; esac
		# (within 40 s in all: the file's run has 180 s)
		command -v gdb >/dev/null && ((SECONDS < until)) || continue
		timeout 20 gdb -q -batch -nx -p "$p" -ex 'thread apply all bt 16' 2>/dev/null | awk '
			function done() { if (t != "") { if (!(t in n)) order[k++] = t; n[t]++ } t = "" }
			/^Thread / { done(); t = " "; next }
			/^#/ { f = ($3 == "in") ? $4 : $2
			       if (match($0, / from [^ ]+$/)) { l = substr($0, RSTART + 6); sub(/.*\//, "", l); f = f "@" l }
			       t = t " " f }
			END { done(); for (i = 0; i < k; i++) print "#     " n[order[i]] " thread(s):" order[i] }' |
			head -n 12 >&2
	done
	for f in "$T"/log/slurmd-*.log "$T"/log/slurmctld.log "$T"/log/syslog; do
		[[ -s $f ]] || continue
		log "the last lines of ${f#"$T"/}:"
		tail -n 30 "$f" | cut -c1-240 | sed 's/^/#   /' >&2
	done
}
check() { # check DESCRIPTION CMD... : pass when CMD succeeds
	local what=$1; shift
	if "$@"; then pass "$what"; else fail "$what"; fi
}

as_other() {
	(cd / && setpriv --reuid=$OTHER_UID --regid=$OTHER_UID --clear-groups -- \
		env -i PATH=/usr/bin:/bin "${CLUSTER_SANITIZER_ENV[@]}" "$@")
}

# write_site_config [KEY = VALUE;...] -- the site config the plugin and agent
# read; each argument replaces the default line of its key or adds one.
write_site_config() {
	local agent=$AEG_AGENT
	# The plugin starts the agent with a clean environment: a wrapper adds the sanitizers'.
	[[ ${#CLUSTER_SANITIZER_ENV[@]} -gt 0 ]] && agent=$(cluster_sanitizer_wrap aegaeond "$AEG_AGENT")
	local defaults=(
		'device = "host";'
		"agent_path = \"$agent\";"
		"runtime_dir = \"$T/aegrun\";"
		'slab_max = "1GiB";'
		'slab_default = "64MiB";'
		'pinned_default = "16MiB";'
		'pinned_max = "256MiB";'
		'pinned_buffer = "1MiB";'
		'agent_start_timeout = 10.0;'
		'agent_stop_timeout = 2.0;'
		'log_level = "debug";'
	) line arg keep
	{
		for line in "${defaults[@]}"; do
			keep=1
			for arg in "$@"; do
				[[ ${arg%% *} == "${line%% *}" ]] && keep=0
			done
			((keep)) && echo "$line"
		done
		for arg in "$@"; do echo "$arg"; done
	} >"$T/etc/aegaeon.conf"
}

# Agents of this cluster still running.
agent_pids() {
	local p
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -- "--runtime-dir $T/aegrun/" && echo "$p"
	done
	return 0
}

# Processes whose environment holds the line $1 (VAR=VALUE, a mark a test gave them).
marked_pids() {
	local p
	for p in /proc/[0-9]*; do
		tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF -- "$1" && echo "${p#/proc/}"
	done
	return 0
}

# agent_wrapper LINE...: the site's agent becomes a script that runs these
# shell lines (with the agent's arguments in "$@") and then execs the agent,
# so the agent's own process starts what they start.
agent_wrapper() {
	local agent=$AEG_AGENT line
	[[ ${#CLUSTER_SANITIZER_ENV[@]} -gt 0 ]] && agent=$(cluster_sanitizer_wrap aegaeond "$AEG_AGENT")
	{
		echo '#!/bin/sh'
		for line in "$@"; do echo "$line"; done
		echo "exec '$agent' \"\$@\""
	} >"$T/agent-wrapper"
	chmod 755 "$T/agent-wrapper"
	write_site_config "agent_path = \"$T/agent-wrapper\";"
}

# Number of jobs slurmctld knows (running, pending or finished recently).
job_count() { sl scontrol -o show job 2>/dev/null | grep -c '^JobId=' || true; }

# Job directory of JOBID on NODE, and waiting for its agent's ready record.
job_dir() { echo "$T/aegrun/$1.$2"; }
wait_ready() { wait_for "${3:-20}" test -f "$(job_dir "$1" "$2")/ready"; }

# Agent pid of JOBID on NODE (from the command line, as the epilog finds it).
agent_of() {
	local p
	for p in $(agent_pids); do
		tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -- "--runtime-dir $(job_dir "$1" "$2") " && echo "$p"
	done
	return 0
}

# No agent process and no runtime dir left for this cluster, within SECONDS.
no_leftovers() { [[ -z $(ls -A "$T/aegrun") && -z $(agent_pids) ]]; }
nothing_left() { wait_for "${1:-10}" no_leftovers; }

# Runtime dirs of this cluster (one per job per node).
runtime_dirs() { find "$T/aegrun" -mindepth 1 -maxdepth 1 2>/dev/null; }

# The lib's site config hook: the tests' defaults.
cluster_site_config() { write_site_config; }

# Keep the cluster's dir after a failure when asked (AEG_KEEP=1).
test_cluster_stop() {
	syslog_stop
	[[ $FAILED -gt 0 && ${AEG_KEEP:-0} = 1 ]] && CLUSTER_KEEP=1
	cluster_stop
}

# Print the result line and exit with the test file's status.
finish() {
	test_cluster_stop
	echo "# $TEST_NAME: $PASSED passed, $FAILED failed"
	[[ $FAILED -eq 0 ]]
}

trap 'test_cluster_stop' EXIT
trap 'exit 130' INT TERM

# A throwaway Slurm cluster for the aegaeon tests: munged, slurmctld and two
# slurmd (n1, n2) in a temp dir on free ports, fake GPUs, the build tree's
# plugin and agent. Sourced by each test file; see run.sh.
#
# Needs root, Slurm 22.05 daemons and munge. Environment:
#   AEG_BUILDDIR  absolute build tree (holds src/spank/.libs/aegaeon.so,
#                 aegaeond and aegaeon-cli)
#   AEG_KEEP=1    keep the temp dir after a failure (for debugging)

set -u

: "${AEG_BUILDDIR:?AEG_BUILDDIR must name the build tree}"
AEG_PLUGIN=${AEG_PLUGIN:-$AEG_BUILDDIR/src/spank/.libs/aegaeon.so}
# The non-recursive build puts programs at the top of the build tree.
first_of() { for f in "$@"; do [[ -e $f ]] && { echo "$f"; return; }; done; echo "$1"; }
AEG_AGENT=${AEG_AGENT:-$(first_of "$AEG_BUILDDIR/aegaeond" "$AEG_BUILDDIR/src/agent/aegaeond")}
AEG_CLI=${AEG_CLI:-$(first_of "$AEG_BUILDDIR/aegaeon-cli" "$AEG_BUILDDIR/src/cli/aegaeon-cli")}
SLURMCTLD=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH command -v slurmctld)
SLURMD=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH command -v slurmd)
MUNGED=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH command -v munged)
JOB_USER=nobody
JOB_UID=$(id -u "$JOB_USER")
JOB_GID=$(id -g "$JOB_USER")
# A second unprivileged identity with no passwd entry, for access checks.
OTHER_UID=65533

T=
PIDS=()
PASSED=0
FAILED=0
TEST_NAME=${TEST_NAME:-$(basename "$0" .sh)}

log() { printf '# %s\n' "$*" >&2; }

# One line per result: command output quoted in a description is folded.
pass() { local m="$*"; PASSED=$((PASSED + 1)); printf 'ok %d - %s: %s\n' $((PASSED + FAILED)) "$TEST_NAME" "${m//$'\n'/ | }"; }
fail() { local m="$*"; FAILED=$((FAILED + 1)); printf 'not ok %d - %s: %s\n' $((PASSED + FAILED)) "$TEST_NAME" "${m//$'\n'/ | }"; }
check() { # check DESCRIPTION CMD... : pass when CMD succeeds
	local what=$1; shift
	if "$@"; then pass "$what"; else fail "$what"; fi
}

free_port_base() { # three consecutive free TCP ports
	local base i used
	used=$(ss -Htan | awk '{ n = split($4, a, ":"); print a[n] }' | sort -u)
	for _ in $(seq 50); do
		base=$((20000 + RANDOM % 30000))
		for i in 0 1 2; do
			grep -qx "$((base + i))" <<<"$used" && continue 2
		done
		echo "$base"; return 0
	done
	return 1
}

# wait_for SECONDS CMD... : poll CMD every 0.1 s until it succeeds or time runs out
wait_for() {
	local deadline=$((SECONDS + $1)); shift
	until "$@" 2>/dev/null; do
		((SECONDS >= deadline)) && return 1
		sleep 0.1
	done
}

# Slurm client commands, as root (admin view) and as the job user.
sl() { env -i PATH=/usr/bin:/bin SLURM_CONF="$T/etc/slurm.conf" "$@"; }
as_user() {
	(cd "$T/work" && runuser -u "$JOB_USER" -- env -i PATH=/usr/bin:/bin HOME="$T/work" \
		SLURM_CONF="$T/etc/slurm.conf" "$@")
}
as_other() {
	(cd / && setpriv --reuid=$OTHER_UID --regid=$OTHER_UID --clear-groups -- \
		env -i PATH=/usr/bin:/bin "$@")
}

write_config() {
	local base=$1
	cat >"$T/etc/slurm.conf" <<-CONF
	ClusterName=aegtest
	SlurmctldHost=localhost(127.0.0.1)
	SlurmctldPort=$base
	SlurmdPort=$((base + 1))
	SlurmUser=root
	SlurmdUser=root
	SlurmdParameters=config_overrides
	AuthType=auth/munge
	AuthInfo=socket=$T/munge/munge.sock
	CredType=cred/munge
	ProctrackType=proctrack/linuxproc
	TaskPlugin=task/none
	SelectType=select/cons_tres
	SelectTypeParameters=CR_Core
	PrologFlags=Alloc
	GresTypes=gpu
	MailProg=/bin/true
	PlugStackConfig=$T/etc/plugstack.conf
	StateSaveLocation=$T/spool/ctld
	SlurmdSpoolDir=$T/spool/%n
	SlurmctldPidFile=$T/run/slurmctld.pid
	SlurmdPidFile=$T/run/slurmd-%n.pid
	SlurmctldLogFile=$T/log/slurmctld.log
	SlurmdLogFile=$T/log/slurmd-%n.log
	SlurmctldDebug=info
	SlurmdDebug=debug
	ReturnToService=2
	MpiDefault=none
	JobAcctGatherType=jobacct_gather/none
	AccountingStorageType=accounting_storage/none
	SwitchType=switch/none
	SchedulerType=sched/builtin
	InactiveLimit=0
	KillWait=2
	MinJobAge=300
	MessageTimeout=10
	UnkillableStepTimeout=30
	NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 1))-$((base + 2)) CPUs=8 RealMemory=1000 Gres=gpu:2 State=UNKNOWN
	PartitionName=main Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
	CONF
	cat >"$T/etc/gres.conf" <<-CONF
	AutoDetect=off
	NodeName=n1 Name=gpu File=$T/dev/nvidia[0-1]
	NodeName=n2 Name=gpu File=$T/dev/nvidia[2-3]
	CONF
	echo "required $AEG_PLUGIN config=$T/etc/aegaeon.conf" >"$T/etc/plugstack.conf"
	write_site_config
}

# write_site_config [KEY = VALUE;...] -- the site config the plugin and agent
# read; each argument replaces the default line of its key or adds one.
write_site_config() {
	local defaults=(
		'device = "host";'
		"agent_path = \"$AEG_AGENT\";"
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

nodes_idle() {
	local states
	states=$(sl sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
	[[ $(grep -c ' idle$' <<<"$states") -eq 2 ]]
}

cluster_start() {
	local base
	[[ $(id -u) -eq 0 ]] || { log "must run as root"; return 1; }
	[[ -f $AEG_PLUGIN ]] || { log "no plugin at $AEG_PLUGIN"; return 1; }
	T=$(mktemp -d /tmp/aegaeon-slurm.XXXXXX) || return 1
	chmod 755 "$T"
	mkdir -p "$T"/{etc,spool/ctld,spool/n1,spool/n2,log,run,dev,work}
	mkdir -m 700 "$T/munge-key"
	mkdir -m 755 "$T/munge"
	mkdir -m 755 "$T/aegrun"
	chown "$JOB_USER:$JOB_GID" "$T/work"
	for i in 0 1 2 3; do mknod "$T/dev/nvidia$i" c 1 3; done
	(umask 077 && dd if=/dev/urandom of="$T/munge-key/munge.key" bs=1024 count=1 status=none)
	base=$(free_port_base) || { log "no free ports"; return 1; }
	write_config "$base"

	"$MUNGED" -F --force --key-file="$T/munge-key/munge.key" --socket="$T/munge/munge.sock" \
		--pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" \
		--seed-file="$T/munge/munged.seed" </dev/null >>"$T/log/munged.out" 2>&1 &
	PIDS+=($!)
	wait_for 10 test -S "$T/munge/munge.sock" || { log "munged did not start"; return 1; }

	env -i SLURM_CONF="$T/etc/slurm.conf" "$SLURMCTLD" -D -i </dev/null >>"$T/log/slurmctld.out" 2>&1 &
	PIDS+=($!)
	for n in n1 n2; do
		env -i SLURM_CONF="$T/etc/slurm.conf" "$SLURMD" -D -N "$n" </dev/null >>"$T/log/slurmd-$n.out" 2>&1 &
		PIDS+=($!)
	done
	if ! wait_for 30 nodes_idle; then
		log "nodes did not become idle:"; sl sinfo -N >&2; tail -n 20 "$T"/log/* >&2
		return 1
	fi
	log "cluster up in $T (ports $base-$((base + 2)))"
}

# Processes that belong to this cluster but were not started here directly:
# slurmstepd, job tasks, agents. Found by cwd, command line or environment
# naming the temp dir.
stray_pids() {
	local p
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		[[ $p == "$$" || $p == "$BASHPID" ]] && continue
		if [[ $(readlink "/proc/$p/cwd" 2>/dev/null) == "$T"* ]] ||
			tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF "$T" ||
			tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qF "$T"; then
			echo "$p"
		fi
	done
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

cluster_stop() {
	local p left
	[[ -n $T && -d $T ]] || return 0
	sl scancel --quiet --full --user="$JOB_USER" 2>/dev/null
	wait_for 15 jobs_gone
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
	for p in "${PIDS[@]}"; do
		wait_for 10 bash -c "! kill -0 $p" || kill -KILL "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	PIDS=()
	left=$(stray_pids)
	if [[ -n $left ]]; then
		log "killing processes left behind: $(echo $left)"
		kill -KILL $left 2>/dev/null
		wait_for 5 bash -c "[[ -z \"\$(for p in $left; do [[ -d /proc/\$p ]] && echo \$p; done)\" ]]"
	fi
	if [[ $FAILED -gt 0 && ${AEG_KEEP:-0} = 1 ]]; then
		log "kept $T"
	else
		rm -rf "$T"
	fi
	T=
}

jobs_gone() { [[ -z $(sl squeue -h -o %i 2>/dev/null) ]]; }

# Number of jobs slurmctld knows (running, pending or finished recently).
job_count() { sl scontrol -o show job 2>/dev/null | grep -c '^JobId=' || true; }

# wait_job JOBID SECONDS: until the job has left the queue
wait_job() {
	wait_for "$2" bash -c "[[ -z \$(env -i SLURM_CONF=$T/etc/slurm.conf squeue -h -j $1 -o %i 2>/dev/null) ]]"
}

# submit SBATCH-ARGS... : submit a batch job as the job user, print its id
submit() { as_user sbatch --parsable "$@" | cut -d';' -f1; }

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

# Print the result line and exit with the test file's status.
finish() {
	cluster_stop
	echo "# $TEST_NAME: $PASSED passed, $FAILED failed"
	[[ $FAILED -eq 0 ]]
}

trap 'cluster_stop' EXIT
trap 'exit 130' INT TERM

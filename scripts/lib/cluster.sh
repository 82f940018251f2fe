# A throwaway Slurm cluster on this machine: munged, slurmctld and one slurmd
# per node in a temp dir on free ports, GPUs as gres (the real ones, or
# character devices standing in for them), the aegaeon SPANK plugin in its
# plugstack. Sourced by tests/slurm/cluster.sh and scripts/quickstart.sh.
#
# Needs root, Slurm 22.05 daemons and munge. Set before cluster_start:
#   CLUSTER_PLUGIN     the plugin (aegaeon.so) named in plugstack.conf (required)
#   CLUSTER_NODES      nodes n1..nN, at most 9 [2]
#   CLUSTER_GPUS       GPUs per node [2]
#   CLUSTER_GPU_FILES  device files of node n1's GPUs, e.g. "/dev/nvidia0 /dev/nvidia1";
#                      empty: character devices made in the temp dir, for every node [""]
#   CLUSTER_PREFIX     temp dir name prefix [/tmp/aegaeon-slurm]
#   CLUSTER_NODE_PREFIX  node names are PREFIX1..PREFIXN [n]
#   CLUSTER_CGROUP=1   track and confine jobs with cgroups: proctrack/cgroup,
#                      task/cgroup (devices and memory constrained) and
#                      PrologFlags=Contain (an extern step per job); needs a
#                      cgroup v1 or v2 file system slurmd can write (see
#                      cluster_cgroup_usable) [0: proctrack/linuxproc, task/none]
#   CLUSTER_KEEP=1     keep the temp dir when stopping (for debugging)
#   CLUSTER_RECORD=FILE  each cluster's dir is added to FILE as it is made
#   CLUSTER_SANITIZERS=1  an --enable-sanitizers build: Slurm's programs, the
#                      agent and what the tests run get the sanitizers'
#                      options (reports to CLUSTER_SANITIZER_LOGS; leak checks
#                      only in aegaeond and aegaeon-cli) [0]
#   CLUSTER_SANITIZER_LOGS     where the sanitizers write their reports (asan.*,
#                      ubsan.*); the job user must be able to write there
# and define cluster_site_config (it writes $T/etc/aegaeon.conf; called once
# the directories exist). After cluster_start: $T is the cluster's dir,
# $T/aegrun a root-owned 0755 runtime_dir, $T/work the job user's cwd.

set -u

SLURMCTLD=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH command -v slurmctld)
SLURMD=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH command -v slurmd)
MUNGED=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH command -v munged)
JOB_USER=${JOB_USER:-nobody}
JOB_UID=$(id -u "$JOB_USER")
JOB_GID=$(id -g "$JOB_USER")
CLUSTER_NODES=${CLUSTER_NODES:-2}
CLUSTER_GPUS=${CLUSTER_GPUS:-2}
CLUSTER_GPU_FILES=${CLUSTER_GPU_FILES:-}
CLUSTER_PREFIX=${CLUSTER_PREFIX:-/tmp/aegaeon-slurm}
CLUSTER_NODE_PREFIX=${CLUSTER_NODE_PREFIX:-n}
CLUSTER_CGROUP=${CLUSTER_CGROUP:-0}

T=
PIDS=()
# VAR=VALUE words: the sanitizers' options for the cluster's programs (see above).
CLUSTER_SANITIZER_ENV=()

clog() { printf '# %s\n' "$*" >&2; }

free_port_base() { # N consecutive free TCP ports (N = nodes + 1)
	local base i used
	# TCP ports in use, from the kernel's tables (no ss on minimal systems)
	used=$(tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null |
		while read -r _ local _; do echo $((16#${local##*:})); done | sort -u)
	for _ in $(seq 50); do
		base=$((20000 + RANDOM % 30000))
		for ((i = 0; i <= CLUSTER_NODES; i++)); do
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
sl() { env -i PATH=/usr/bin:/bin SLURM_CONF="$T/etc/slurm.conf" "${CLUSTER_SANITIZER_ENV[@]}" "$@"; }
as_user() {
	(cd "$T/work" && runuser -u "$JOB_USER" -- env -i PATH=/usr/bin:/bin HOME="$T/work" \
		SLURM_CONF="$T/etc/slurm.conf" "${CLUSTER_SANITIZER_ENV[@]}" "$@")
}

# Under CLUSTER_SANITIZERS: the sanitizers' options go to every program of the
# cluster. No runtime is preloaded: a sanitizer build's plugin carries UBSan
# alone (its runtime comes as the plugin's own dependency), and aegaeon's
# programs link theirs; the ASan runtime in Slurm's programs hung a task now
# and then (configure.ac says why). slurmd passes its environment to the
# slurmstepd of a step but runs `slurmstepd spank prolog|epilog` with the
# prolog's own, so slurmstepd is started through a wrapper (slurmd -d).
# Slurm's programs keep memory to the end, so leak checks are on only in
# aegaeon's own (%b: the program's name); every report lands in
# CLUSTER_SANITIZER_LOGS.
cluster_sanitizer_setup() {
	[[ -d ${CLUSTER_SANITIZER_LOGS:-} ]] || { clog "CLUSTER_SANITIZER_LOGS must name a directory"; return 1; }
	mkdir -p "$T/sanitizer/bin"
	echo detect_leaks=1 >"$T/sanitizer/aegaeond.asan"
	echo detect_leaks=1 >"$T/sanitizer/aegaeon-cli.asan"
	CLUSTER_SANITIZER_ENV=(
		"ASAN_OPTIONS=detect_leaks=0:log_path=$CLUSTER_SANITIZER_LOGS/asan:log_exe_name=1:include_if_exists=$T/sanitizer/%b.asan"
		"UBSAN_OPTIONS=print_stacktrace=1:log_path=$CLUSTER_SANITIZER_LOGS/ubsan:log_exe_name=1"
	)
}

# cluster_sanitizer_wrap NAME PROGRAM: prints the path of a script that runs
# PROGRAM with the sanitizer environment (for programs Slurm or the plugin
# start with an environment of their own: slurmstepd, the agent).
cluster_sanitizer_wrap() {
	local w=$T/sanitizer/bin/$1 e
	{
		echo '#!/bin/sh'
		echo "# $2 with the sanitizer runtimes and options (scripts/lib/cluster.sh)"
		for e in "${CLUSTER_SANITIZER_ENV[@]}"; do echo "export ${e%%=*}='${e#*=}'"; done
		echo "exec '$2' \"\$@\""
	} >"$w"
	chmod 755 "$w"
	echo "$w"
}

cluster_write_config() {
	local base=$1 p=$CLUSTER_NODE_PREFIX n g
	local nodes="$p[1-$CLUSTER_NODES]" proctrack=proctrack/linuxproc task=task/none flags=Alloc
	# slurmd's step sockets are SPOOL/<node>_<job>.<step>, at most 107 bytes:
	# one node needs no node name in its spool dir, which leaves room for long ones.
	local spool=$T/spool/%n
	[[ $CLUSTER_NODES -eq 1 ]] && nodes=${p}1 spool=$T/spool/1
	[[ $CLUSTER_CGROUP = 1 ]] && proctrack=proctrack/cgroup task=task/cgroup flags=Alloc,Contain
	cat >"$T/etc/slurm.conf" <<-CONF
	ClusterName=aegaeon
	SlurmctldHost=localhost(127.0.0.1)
	SlurmctldPort=$base
	SlurmdPort=$((base + 1))
	SlurmUser=root
	SlurmdUser=root
	SlurmdParameters=config_overrides
	AuthType=auth/munge
	AuthInfo=socket=$T/munge/munge.sock
	CredType=cred/munge
	ProctrackType=$proctrack
	TaskPlugin=$task
	SelectType=select/cons_tres
	SelectTypeParameters=CR_Core
	PrologFlags=$flags
	GresTypes=gpu
	MailProg=/bin/true
	PlugStackConfig=$T/etc/plugstack.conf
	StateSaveLocation=$T/spool/ctld
	SlurmdSpoolDir=$spool
	SlurmctldPidFile=$T/run/slurmctld.pid
	SlurmdPidFile=$T/run/slurmd-%n.pid
	SlurmctldLogFile=$T/log/slurmctld.log
	SlurmdLogFile=$T/log/slurmd-%n.log
	SlurmctldDebug=info
	SlurmdDebug=debug
	ReturnToService=2
	MpiDefault=none
	TmpFS=$T/tmp/%n
	JobAcctGatherType=jobacct_gather/none
	AccountingStorageType=accounting_storage/none
	SwitchType=switch/none
	SchedulerType=sched/builtin
	InactiveLimit=0
	KillWait=2
	MinJobAge=300
	MessageTimeout=10
	UnkillableStepTimeout=30
	NodeName=$nodes NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 1))-$((base + CLUSTER_NODES)) CPUs=8 RealMemory=1000 Gres=gpu:$CLUSTER_GPUS State=UNKNOWN
	PartitionName=main Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
	CONF
	{
		echo "AutoDetect=off"
		if [[ -n $CLUSTER_GPU_FILES ]]; then
			for f in $CLUSTER_GPU_FILES; do echo "NodeName=${p}1 Name=gpu File=$f"; done
		else
			for ((n = 1; n <= CLUSTER_NODES; n++)); do
				for ((g = (n - 1) * CLUSTER_GPUS; g < n * CLUSTER_GPUS; g++)); do
					echo "NodeName=$p$n Name=gpu File=$T/dev/nvidia$g"
				done
			done
		fi
	} >"$T/etc/gres.conf"
	# With cgroup v2 slurmd loads cgroup/v2 whatever the other plugins, and
	# exits unless told not to wait for systemd.
	if [[ -e /sys/fs/cgroup/cgroup.controllers ]]; then
		printf 'CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\n' >"$T/etc/cgroup.conf"
		mkdir -p /sys/fs/cgroup/system.slice
		echo "+cpuset +cpu +memory +pids" >/sys/fs/cgroup/system.slice/cgroup.subtree_control 2>/dev/null || true
	elif [[ $CLUSTER_CGROUP = 1 ]]; then
		printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n' >"$T/etc/cgroup.conf"
	fi
	[[ $CLUSTER_CGROUP = 1 ]] && printf 'ConstrainDevices=yes\nConstrainRAMSpace=yes\n' >>"$T/etc/cgroup.conf"
	echo "required $CLUSTER_PLUGIN config=$T/etc/aegaeon.conf" >"$T/etc/plugstack.conf"
}

# cluster_cgroup_usable: whether slurmd can confine jobs with cgroups here
# (CLUSTER_CGROUP=1): cgroup v2 with the memory controller, or v1 with the
# freezer, memory and devices hierarchies, where root can make cgroups.
# Prints why not.
cluster_cgroup_usable() {
	local c d
	if [[ -e /sys/fs/cgroup/cgroup.controllers ]]; then
		grep -qw memory /sys/fs/cgroup/cgroup.controllers ||
			{ echo "cgroup v2 without the memory controller"; return 1; }
		d=/sys/fs/cgroup/aegaeon-probe.$$
	else
		for c in freezer memory devices; do
			[[ -f /sys/fs/cgroup/$c/cgroup.procs ]] ||
				{ echo "no cgroup v1 $c hierarchy at /sys/fs/cgroup/$c"; return 1; }
		done
		d=/sys/fs/cgroup/freezer/aegaeon-probe.$$
	fi
	mkdir "$d" 2>/dev/null && rmdir "$d" || { echo "cannot make a cgroup in ${d%/*}"; return 1; }
}

nodes_idle() {
	local states
	states=$(sl sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
	[[ $(grep -c ' idle$' <<<"$states") -eq $CLUSTER_NODES ]]
}

cluster_start() {
	local base n g stepd
	[[ $(id -u) -eq 0 ]] || { clog "must run as root"; return 1; }
	[[ -f ${CLUSTER_PLUGIN:-} ]] || { clog "no plugin at ${CLUSTER_PLUGIN:-(CLUSTER_PLUGIN unset)}"; return 1; }
	for b in "$SLURMCTLD" "$SLURMD" "$MUNGED"; do
		[[ -x $b ]] || { clog "slurmctld, slurmd or munged not installed"; return 1; }
	done
	T=$(mktemp -d "$CLUSTER_PREFIX.XXXXXX") || return 1
	# Named for whoever must clean up after a run that never got to cluster_stop.
	[[ -n ${CLUSTER_RECORD:-} ]] && echo "$T" >>"$CLUSTER_RECORD"
	chmod 755 "$T"
	mkdir -p "$T"/{etc,spool/ctld,log,run,dev,work}
	((CLUSTER_NODES == 1)) && mkdir -p "$T/spool/1"
	for ((n = 1; n <= CLUSTER_NODES; n++)); do mkdir -p "$T/spool/$CLUSTER_NODE_PREFIX$n"; done
	# Each node's own TmpFS, as real nodes have their /tmp: srun --mpi=pmix puts a
	# step's PMIx directory there (spmix_appdir_UID_JOB.STEP), and two slurmd
	# sharing /tmp would both make the same one (the second step fails).
	for ((n = 1; n <= CLUSTER_NODES; n++)); do mkdir -p -m 1777 "$T/tmp/$CLUSTER_NODE_PREFIX$n"; done
	mkdir -m 700 "$T/munge-key"
	mkdir -m 755 "$T/munge"
	mkdir -m 755 "$T/aegrun"
	chown "$JOB_USER:$JOB_GID" "$T/work"
	if [[ -z $CLUSTER_GPU_FILES ]]; then
		for ((g = 0; g < CLUSTER_NODES * CLUSTER_GPUS; g++)); do mknod "$T/dev/nvidia$g" c 195 "$g"; done
	fi
	(umask 077 && dd if=/dev/urandom of="$T/munge-key/munge.key" bs=1024 count=1 status=none)
	CLUSTER_SANITIZER_ENV=()
	stepd=()
	if [[ ${CLUSTER_SANITIZERS:-0} = 1 ]]; then
		cluster_sanitizer_setup || return 1
		stepd=(-d "$(cluster_sanitizer_wrap slurmstepd "$(dirname "$SLURMD")/slurmstepd")")
	fi
	base=$(free_port_base) || { clog "no free ports"; return 1; }
	cluster_write_config "$base"
	cluster_site_config

	"$MUNGED" -F --force --key-file="$T/munge-key/munge.key" --socket="$T/munge/munge.sock" \
		--pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" \
		--seed-file="$T/munge/munged.seed" </dev/null >>"$T/log/munged.out" 2>&1 &
	PIDS+=($!)
	wait_for 10 test -S "$T/munge/munge.sock" || { clog "munged did not start"; return 1; }

	env -i SLURM_CONF="$T/etc/slurm.conf" "$SLURMCTLD" -D -i </dev/null >>"$T/log/slurmctld.out" 2>&1 &
	PIDS+=($!)
	for ((n = 1; n <= CLUSTER_NODES; n++)); do
		env -i SLURM_CONF="$T/etc/slurm.conf" "${CLUSTER_SANITIZER_ENV[@]}" \
			"$SLURMD" -D -N "$CLUSTER_NODE_PREFIX$n" "${stepd[@]}" </dev/null \
			>>"$T/log/slurmd-$CLUSTER_NODE_PREFIX$n.out" 2>&1 &
		PIDS+=($!)
	done
	if ! wait_for 30 nodes_idle; then
		clog "nodes did not become idle:"; sl sinfo -N >&2; tail -n 20 "$T"/log/* >&2
		return 1
	fi
	clog "cluster up in $T (ports $base-$((base + CLUSTER_NODES)))"
}

# The agents log to syslog(3). On a machine with no /dev/log (a container),
# syslog_listen binds one for a while and keeps what arrives in
# $T/log/syslog, each line led by the epoch time it came in (syslog's own stamp
# has whole seconds only); agent_logged looks there, else in the journal and the
# usual syslog files. /dev/log is the machine's: clusters of other tests
# running at the same time (make -j check runs the Python tests' Slurm rows
# beside this suite) would send their lines to whichever bound it and find
# none of their own. So the listener binds it only while it holds a lock that
# every listener takes (waiting up to 150 s for it), and a /dev/log that no
# one listens on any more (its listener killed) is taken over.
SYSLOG_PID=
SYSLOG_LOCK=/tmp/aegaeon-test-syslog.lock
syslog_listen() {
	rm -f "$T/log/syslog.state"
	/usr/bin/python3 -c '
import fcntl, os, signal, socket, stat, sys, time
log, state, lock_path = sys.argv[1:4]
def say(what):
    with open(state + ".tmp", "w") as f:
        f.write(what)
    os.replace(state + ".tmp", state)
lock = open(lock_path, "a")
deadline = time.monotonic() + 150
while True:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except BlockingIOError:
        if time.monotonic() > deadline:
            say("busy")
            sys.exit(1)
        time.sleep(0.05)
if os.path.lexists("/dev/log"):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect("/dev/log")
    except ConnectionRefusedError:
        if not stat.S_ISSOCK(os.lstat("/dev/log").st_mode):
            say("system")               # not a socket: nothing of ours, left alone
            sys.exit(0)
        os.unlink("/dev/log")           # a listener of ours that was killed
    except OSError:
        say("system")                   # a dangling link, say: not ours either
        sys.exit(0)
    else:
        say("system")                   # a syslog daemon of the machine has it
        sys.exit(0)
out = open(log, "ab", buffering=0)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
ino = os.stat("/dev/log").st_ino
os.chmod("/dev/log", 0o666)
def stop(*_):
    try:
        if os.stat("/dev/log").st_ino == ino:   # only the one bound here
            os.unlink("/dev/log")
    except OSError:
        pass
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
say("bound")
while True:
    msg = s.recv(65536)
    out.write(b"%.6f " % time.time() + msg + b"\n")' "$T/log/syslog" "$T/log/syslog.state" "$SYSLOG_LOCK" \
		2>>"$T/log/syslog.err" &
	SYSLOG_PID=$!
	wait_for 160 test -f "$T/log/syslog.state"
	case $(cat "$T/log/syslog.state" 2>/dev/null) in
	bound) return 0 ;;
	system) wait "$SYSLOG_PID" 2>/dev/null; SYSLOG_PID=; return 0 ;;
	*) syslog_stop; return 1 ;;
	esac
}
syslog_stop() {
	[[ -n $SYSLOG_PID ]] || return 0
	kill -TERM "$SYSLOG_PID" 2>/dev/null
	wait "$SYSLOG_PID" 2>/dev/null
	SYSLOG_PID=
}
# agent_logged ERE: within 5 s, a line of the agents' syslog matches
agent_logged() {
	if [[ -f $T/log/syslog ]]; then
		wait_for 5 grep -qE -- "$1" "$T/log/syslog"
	else
		wait_for 5 bash -c '{ journalctl -q --no-pager -t aegaeond --since -10min 2>/dev/null
			cat /var/log/syslog /var/log/daemon.log /var/log/messages 2>/dev/null; } | grep -qE -- "$1"' _ "$1"
	fi
}

# stray_pids [DIR]: processes that belong to this cluster (or the one in DIR)
# but were not started here directly: slurmstepd, job tasks, agents. Found by
# cwd, command line or environment naming the temp dir; none without one.
stray_pids() {
	local p dir=${1:-$T}
	[[ -n $dir ]] || return 0
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		[[ $p == "$$" || $p == "$BASHPID" ]] && continue
		if [[ $(readlink "/proc/$p/cwd" 2>/dev/null) == "$dir"* ]] ||
			tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF "$dir" ||
			tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qF "$dir"; then
			echo "$p"
		fi
	done
}

jobs_gone() { [[ -z $(sl squeue -h -o %i 2>/dev/null) ]]; }

# wait_job JOBID SECONDS: until the job has left the queue
wait_job() {
	wait_for "$2" bash -c "[[ -z \$(env -i SLURM_CONF=$T/etc/slurm.conf squeue -h -j $1 -o %i 2>/dev/null) ]]"
}

# submit SBATCH-ARGS... : submit a batch job as the job user, print its id
submit() { as_user sbatch --parsable "$@" | cut -d';' -f1; }

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
		clog "killing processes left behind: $(echo $left)"
		kill -KILL $left 2>/dev/null
		wait_for 5 bash -c "[[ -z \"\$(for p in $left; do [[ -d /proc/\$p ]] && echo \$p; done)\" ]]"
	fi
	if [[ ${CLUSTER_KEEP:-0} = 1 ]]; then
		clog "kept $T"
	else
		rm -rf "$T"
	fi
	T=
}

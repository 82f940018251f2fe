#!/bin/bash
# End to end on a GPU node (issue 10): a throwaway Slurm cluster with the aegaeon
# plugin and the cuda backend; as an unprivileged user, a batch job that reserves a
# slab and a pinned pool and prefetches a torch-written safetensors model at job
# start; steps that use it through aegaeon_native (bit for bit against
# safetensors), find it resident, swap KV blocks, share an event and the slab with
# another process, and switch to a second model from the host model cache; then
# nothing left after the job, nor after a job cancelled mid-prefetch; then the KV
# benchmark inside a job beside it standalone (issue 18). Prints
# ok/not ok lines, "# figure: NAME VALUE UNIT" lines, "N passed, N failed"; writes
# the figures to $OUT/e2e.json when OUT is set. Needs root.
#
# With --userpath it measures instead what a user waits for (docs/benchmarks.md,
# bench/userpath.py): job start overhead; submit -> every tensor of model A a torch
# tensor in the first step, with a 60 GiB slab, a 16 GiB pool and A prefetched at
# job start, with and without huge pages reserved, against the same job without
# aegaeon loading A with safetensors' load_file; a new step's first use of the
# resident model; a load through the job's agent from the page cache. Medians of
# --repeat jobs each, every tensor checked bit for bit.
#
# Usage: slurm_e2e.sh [--prefix DIR] [--debs DIR] [--bundle DIR] [--python PY]
#                     [--model-dir DIR] [--host] [--small] [--no-hugepages] [--keep] [--kv-only]
#                     [--userpath [--model-a FILE] [--repeat N]]
#   --prefix DIR   where Slurm is unpacked from the debs when not installed [/opt/slurm]
#   --debs DIR     Debian 12 Slurm/munge packages (scripts/fetch-slurm-debs.sh)
#                  [BUNDLE/debs]
#   --bundle DIR   a bundle of scripts/gpu-bundle.sh [the one holding this script];
#                  else $AEG_BUILDDIR, a build tree configured with --enable-python
#   --python PY    the Python of the job steps (torch and safetensors with cuda)
#                  [/opt/torch/.venv/bin/python3; /usr/bin/python3 with --host]
#   --model-dir D  where the models are written (a directory the job user may read
#                  is made in it) [the test's temp dir]
#   --host         host backend and fake GPU files (no GPU; torch not needed)
#   --small        models of 64 and 32 MiB, small slab, pool and KV blocks
#   --no-hugepages do not reserve 2 MiB huge pages for the pinned pool (on the
#                  cuda backend the test reserves what the job's pool needs with
#                  vm.nr_hugepages, as aegaeond(8) advises, and restores it after)
#   --keep         keep the temp dir (logs, job outputs)
#   --kv-only      only the KV part (issue 18): no models, no prefetch jobs
#   --userpath     the user-path figures above instead of the functional test
#   --model-a FILE a safetensors model, readable by the job user, as model A
#                  (--userpath; default: written by the test, 8 GiB or 64 MiB)
#   --repeat N     jobs per figure with --userpath [3]
#   --hugepages-only with --userpath: only the figures with huge pages reserved
#                  (the plain job's baseline is taken with them too)
#   --agent-log LEVEL  the agents' log level (debug, info, warn, error)
#                  [$AEGAEON_E2E_AGENT_LOG, else info]; their syslog lines are
#                  written to $OUT/agent-syslog.log when OUT is set (where this
#                  machine has no /dev/log, the test listens on one), the
#                  cluster's logs to $OUT/slurmd.log and $OUT/slurmctld.log
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
here=$(cd "$(dirname "$0")" && pwd)
ARGS="$*"

prefix=/opt/slurm
debs=
bundle=
python=
model_parent=
host=0
small=0
keep=0
hugepages=1
hugepages_only=0
kv_only=0
userpath=0
model_a=
repeat=3
agent_log=${AEGAEON_E2E_AGENT_LOG:-info}
while [[ $# -gt 0 ]]; do
	case $1 in
	--prefix) prefix=$2; shift 2 ;;
	--debs) debs=$2; shift 2 ;;
	--bundle) bundle=$2; shift 2 ;;
	--python) python=$2; shift 2 ;;
	--model-dir) model_parent=$2; shift 2 ;;
	--host) host=1; shift ;;
	--small) small=1; shift ;;
	--keep) keep=1; shift ;;
	--no-hugepages) hugepages=0; shift ;;
	--hugepages-only) hugepages_only=1; shift ;;
	--kv-only) kv_only=1; shift ;;
	--userpath) userpath=1; shift ;;
	--model-a) model_a=$2; shift 2 ;;
	--repeat) repeat=$2; shift 2 ;;
	--agent-log) agent_log=$2; shift 2 ;;
	-h | --help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "slurm_e2e.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
	esac
done

PASSED=0
FAILED=0
SKIPPED=0
FIGS=()
pass() { PASSED=$((PASSED + 1)); printf 'ok %d - %s\n' $((PASSED + FAILED)) "${*//$'\n'/ | }"; }
fail() { FAILED=$((FAILED + 1)); printf 'not ok %d - %s\n' $((PASSED + FAILED)) "${*//$'\n'/ | }"; }
skip() { SKIPPED=$((SKIPPED + 1)); printf 'skip - %s\n' "$*"; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
note() { printf '# %s\n' "$*"; }
figure() { FIGS+=("$1 $2 $3"); printf '# figure: %s %s %s\n' "$1" "$2" "$3"; }
die() { echo "slurm_e2e.sh: $*" >&2; fail "$*"; finish; }
calc() { awk "BEGIN { printf \"%.6g\", $* }"; }

# ------------------------------------------------------------ what to test
[[ $(id -u) -eq 0 ]] || { echo "slurm_e2e.sh: needs root (it starts munged, slurmctld and slurmd)" >&2; exit 1; }
if [[ -z $bundle && -z ${AEG_BUILDDIR:-} && -d $here/../../root ]]; then
	bundle=$(cd "$here/../.." && pwd)
fi
if [[ -n $bundle ]]; then
	root=$bundle/root
	src_plugin=$(find "$root" -name aegaeon.so -path '*slurm*' 2>/dev/null | head -n 1)
	src_agent=$(find "$root" -name aegaeond -type f 2>/dev/null | head -n 1)
	src_cli=$(find "$root" -name aegaeon-cli -type f 2>/dev/null | head -n 1)
	src_py=$(find "$root" -name 'aegaeon_native*.so' 2>/dev/null | head -n 1)
	libdir=$bundle/lib
	cluster_lib=$bundle/scripts-lib/cluster.sh
	debs=${debs:-$bundle/debs}
else
	B=${AEG_BUILDDIR:?give --bundle DIR or AEG_BUILDDIR (a build tree)}
	src_plugin=$B/src/spank/.libs/aegaeon.so
	src_agent=$B/aegaeond
	src_cli=$B/aegaeon-cli
	src_py=$B/python/.libs/aegaeon_native.abi3.so
	libdir=
	cluster_lib=$here/../../scripts/lib/cluster.sh
fi
for f in "$src_plugin" "$src_agent" "$src_cli" "$src_py" "$cluster_lib"; do
	[[ -f $f ]] || { echo "slurm_e2e.sh: missing ${f:-a part} (plugin, aegaeond, aegaeon-cli, aegaeon_native built with --enable-python, scripts/lib/cluster.sh)" >&2; exit 1; }
done
if [[ -z $python ]]; then
	if ((host)); then python=/usr/bin/python3; else python=/opt/torch/.venv/bin/python3; fi
fi
[[ $repeat =~ ^[1-9][0-9]?$ ]] || { echo "slurm_e2e.sh: --repeat '$repeat' is not a number of jobs from 1 to 99" >&2; exit 2; }
[[ $agent_log =~ ^(debug|info|warn|error)$ ]] ||
	{ echo "slurm_e2e.sh: --agent-log '$agent_log' is not one of debug, info, warn, error" >&2; exit 2; }
[[ -z $model_a || $userpath = 1 ]] || { echo "slurm_e2e.sh: --model-a is for --userpath" >&2; exit 2; }
if [[ -n $model_a ]]; then
	[[ -f $model_a && -r $model_a ]] || { echo "slurm_e2e.sh: --model-a '$model_a' is not a readable file" >&2; exit 2; }
	model_a=$(realpath "$model_a")
fi
if ((small)); then
	a_bytes=$((64 << 20)) b_bytes=$((32 << 20))
	slab=512MiB pinned=256MiB:1MiB pinned_plain=64MiB:1MiB kv_block=4096 cache=48MiB chunk=4MiB
	slab_max=1GiB pinned_max=512MiB buffer=1MiB pinned_bytes=$((256 << 20)) slab_bytes=$((512 << 20))
	slab_up=512MiB pinned_up=256MiB:1MiB pinned_up_bytes=$((256 << 20))
else
	a_bytes=$((8 << 30)) b_bytes=$((4 << 30))
	slab=40GiB pinned=24GiB pinned_plain=8GiB kv_block=32768 cache=6GiB chunk=64MiB
	slab_max=95% pinned_max=32GiB buffer=32MiB pinned_bytes=$((24 << 30)) slab_bytes=$((40 << 30))
	slab_up=60GiB pinned_up=16GiB pinned_up_bytes=$((16 << 30))
fi
kv_blocks=8192
device=cuda
((host)) && device=host hugepages=0
((!hugepages_only || (userpath && hugepages))) ||
	{ echo "slurm_e2e.sh: --hugepages-only is for --userpath, on the cuda backend, without --no-hugepages" >&2; exit 2; }

# ------------------------------------------------------------ Slurm itself
# As ../shared/lab/gpu-slurm-probe.sh does it: Debian 12's packages unpacked into
# a prefix, binaries linked where slurmd looks for them, libraries the OS lacks
# linked into a directory of ld.so.conf.d.
install_slurm() {
	local d b miss l p
	[[ -d $debs ]] && compgen -G "$debs/*.deb" >/dev/null ||
		{ echo "slurm_e2e.sh: Slurm is not installed and no packages in '${debs:-(no --debs)}' (scripts/fetch-slurm-debs.sh)" >&2; return 1; }
	note "installing Slurm from $debs into $prefix"
	mkdir -p "$prefix"
	for d in "$debs"/*.deb; do dpkg -x "$d" "$prefix" || return 1; done
	for b in slurmd slurmctld slurmstepd; do ln -sf "$prefix/usr/sbin/$b-wlm" "/usr/sbin/$b"; done
	ln -sf "$prefix/usr/sbin/munged" /usr/sbin/munged
	for b in srun sbatch salloc sinfo squeue scontrol scancel; do ln -sf "$prefix/usr/bin/$b" "/usr/bin/$b"; done
	[[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm ]] ||
		ln -s "$prefix/usr/lib/x86_64-linux-gnu/slurm-wlm" /usr/lib/x86_64-linux-gnu/slurm-wlm
	mkdir -p /usr/local/lib/slurm-extra
	miss=$({ for f in "$prefix"/usr/sbin/* "$prefix"/usr/bin/s* "$prefix"/usr/lib/x86_64-linux-gnu/slurm-wlm/*.so; do
		env -u LD_LIBRARY_PATH ldd "$f" 2>/dev/null; done; } | awk '/not found/ { print $1 }' | sort -u)
	for l in $miss; do
		p=$(find "$prefix" -name "$l" | head -n 1)
		[[ -n $p ]] && ln -sf "$p" "/usr/local/lib/slurm-extra/$l"
	done
	echo /usr/local/lib/slurm-extra >/etc/ld.so.conf.d/slurm-extra.conf
	ldconfig
}
for b in slurmd slurmctld slurmstepd munged srun sbatch scontrol scancel squeue sinfo; do
	command -v "$b" >/dev/null && continue
	install_slurm || { echo "1..0 # Slurm unavailable"; exit 1; }
	break
done
for b in slurmd slurmctld slurmstepd munged srun sbatch scontrol scancel squeue sinfo runuser; do
	command -v "$b" >/dev/null || { echo "slurm_e2e.sh: $b is still missing" >&2; exit 1; }
done

# ------------------------------------------------------------ cluster and parts
E=$(mktemp -d /tmp/aegaeon-e2e.XXXXXX) || exit 1
chmod 755 "$E"
mkdir -p "$E/opt/bin" "$E/opt/py"
install -m 755 "$src_agent" "$E/opt/bin/aegaeond"
install -m 755 "$src_cli" "$E/opt/bin/aegaeon-cli"
install -m 755 "$src_plugin" "$E/opt/aegaeon.so"
install -m 755 "$src_py" "$E/opt/py/aegaeon_native.abi3.so"
install -m 644 "$here/slurm_e2e.py" "$E/opt/slurm_e2e.py"
install -m 644 "$here/../../bench/kv_py_calls.py" "$E/opt/kv_py_calls.py"
if [[ -n $model_parent ]]; then
	M=$(mktemp -d "$model_parent/aegaeon-e2e-models.XXXXXX") || exit 1
else
	M=$E/models
	mkdir -p "$M"
fi
chmod 755 "$M"
M=$(realpath "$M")
A=$M/model-a.safetensors
Bm=$M/model-b.safetensors
[[ -n $model_a ]] && A=$model_a

# The plugin cleans the agent's environment and slurmd starts with none:
# libraries the system lacks (the bundle's) go into a directory of
# ld.so.conf.d, for slurmd, the agent, the steps and srun. Looked for without
# LD_LIBRARY_PATH, which gpu-run.sh sets for its own programs.
LDCONF=/etc/ld.so.conf.d/aegaeon-e2e.conf
LIBS=/usr/local/lib/aegaeon-e2e
missing_libs() {
	{ for f in "$E/opt/bin/aegaeond" "$E/opt/bin/aegaeon-cli" "$E/opt/aegaeon.so" "$E/opt/py/aegaeon_native.abi3.so"; do
		env -u LD_LIBRARY_PATH ldd "$f" 2>/dev/null; done; } | awk '/not found/ { print $1 }' | sort -u
}
miss=$(missing_libs)
if [[ -n $miss ]]; then
	[[ -n $libdir ]] || { echo "slurm_e2e.sh: libraries not found: $miss" >&2; rm -rf "$E"; exit 1; }
	mkdir -p "$LIBS"
	for l in $miss; do
		[[ -f $libdir/$l ]] && install -m 644 "$libdir/$l" "$LIBS/$l"
	done
	echo "$LIBS" >"$LDCONF"
	ldconfig
	note "installed for the agent and steps: $(echo $miss)"
fi
miss=$(missing_libs)
[[ -z $miss ]] || { echo "slurm_e2e.sh: still missing libraries: $miss" >&2; rm -rf "$E" "$LIBS" "$LDCONF"; ldconfig; exit 1; }

CLUSTER_PLUGIN=$E/opt/aegaeon.so
CLUSTER_NODES=1
CLUSTER_GPUS=1
CLUSTER_PREFIX=$E/cluster
if ((host)); then CLUSTER_GPU_FILES=; else CLUSTER_GPU_FILES=/dev/nvidia0; fi
source "$cluster_lib"

# Agents of this cluster, and nothing of a job left behind.
agent_pids() {
	local p
	for p in /proc/[0-9]*; do
		tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "--runtime-dir $T/aegrun/" && echo "${p#/proc/}"
	done
	return 0
}
no_leftovers() { [[ -z $(ls -A "$T/aegrun") && -z $(agent_pids) ]]; }
nothing_left() { wait_for "${1:-10}" no_leftovers; }

cluster_site_config() {
	cat >"$T/etc/aegaeon.conf" <<-CONF
	device = "$device";
	agent_path = "$E/opt/bin/aegaeond";
	runtime_dir = "$T/aegrun";
	slab_default = "0";
	slab_max = "$slab_max";
	pinned_default = "0";
	pinned_max = "$pinned_max";
	pinned_buffer = "$buffer";
	prefetch_chunk = "$chunk";
	model_cache = "$cache";
	agent_start_timeout = 120.0;
	agent_stop_timeout = 5.0;
	log_level = "$agent_log";
	CONF
}

# The agents' syslog lines to $OUT/agent-syslog.log: those the test's listener kept (each led by
# the epoch time it came in), else the journal's since the test began, else every aegaeond line
# of the syslog files; the cluster's slurmd and slurmctld logs beside it.
save_agent_log() {
	local log=$OUT/agent-syslog.log
	mkdir -p "$OUT"
	if [[ -f $T/log/syslog ]]; then
		grep -a 'aegaeond' "$T/log/syslog" >"$log"
	else
		{ journalctl -q --no-pager -t aegaeond --since "@$t_began" 2>/dev/null ||
			cat /var/log/syslog /var/log/daemon.log /var/log/messages 2>/dev/null; } | grep -a 'aegaeond' >"$log"
	fi
	note "the agents' log ($agent_log): $(wc -l <"$log") lines in $log"
	# slurmd's (with slurmstepd's and the plugin's lines, at debug) and slurmctld's, beside it.
	cat "$T"/log/slurmd-*.log >"$OUT/slurmd.log" 2>/dev/null
	cp "$T/log/slurmctld.log" "$OUT/slurmctld.log" 2>/dev/null
	return 0
}

finish() {
	local json
	trap - EXIT
	if [[ -n ${T:-} ]]; then
		[[ -n ${OUT:-} ]] && save_agent_log
		syslog_stop
		[[ $keep = 1 ]] && CLUSTER_KEEP=1
		cluster_stop
	fi
	if [[ $keep = 1 ]]; then note "kept $E"; else rm -rf "$E"; [[ -n $model_parent ]] && rm -rf "$M"; fi
	if [[ -f $LDCONF ]]; then rm -rf "$LDCONF" "$LIBS"; ldconfig; fi
	[[ -n ${hp_old:-} && $(cat /proc/sys/vm/nr_hugepages) != "$hp_old" ]] && echo "$hp_old" >/proc/sys/vm/nr_hugepages
	# Figures that are medians over jobs (slurm_userpath.sh), also when stopped early.
	declare -F finish_figures >/dev/null && finish_figures
	((${STOPPED:-0})) && note "stopped by a signal: the figures are those measured until then"
	if [[ -n ${OUT:-} ]]; then
		mkdir -p "$OUT"
		json=$(printf '%s\n' "${FIGS[@]}" | awk -v date="$(date -u +%FT%TZ)" -v dev="${GPU_NAME:-host backend}" \
			-v cmd="$0 $ARGS" -v p=$PASSED -v f=$FAILED -v stopped="${STOPPED:-0}" '
			BEGIN { printf "{\n  \"date\": \"%s\",\n  \"device\": \"%s\",\n  \"command\": \"%s\",\n  \"passed\": %d,\n  \"failed\": %d,\n  \"stopped\": %d,\n  \"figures\": {", date, dev, cmd, p, f, stopped }
			NF == 3 { printf "%s\n    \"%s\": {\"value\": %s, \"unit\": \"%s\"}", (n++ ? "," : ""), $1, $2, $3 }
			END { printf "\n  }\n}\n" }')
		echo "$json" >"$OUT/e2e.json"
		note "figures written to $OUT/e2e.json"
	fi
	echo "$PASSED passed, $FAILED failed"
	[[ $FAILED -eq 0 && ${STOPPED:-0} -eq 0 ]]
	exit $?
}
STOPPED=0
trap finish EXIT
trap 'STOPPED=1; exit 130' INT TERM

gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | tr -d ' '; }
if ((!host)); then
	command -v nvidia-smi >/dev/null || die "no nvidia-smi: give --host on a machine without a GPU"
	GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
	"$python" -c 'import torch, safetensors; assert torch.cuda.is_available()' 2>/dev/null ||
		die "$python cannot import torch and safetensors with a GPU (--python)"
fi

((host)) || hp_old=$(cat /proc/sys/vm/nr_hugepages)
if ((hugepages && !userpath)); then
	hp_want=$((pinned_bytes / (2 << 20) + 2))
	((hp_want > hp_old)) && echo "$hp_want" >/proc/sys/vm/nr_hugepages
	hp_now=$(cat /proc/sys/vm/nr_hugepages)
	note "vm.nr_hugepages $hp_old -> $hp_now (the pool of $pinned takes 2 MiB pages when $hp_want are free)"
	figure hugepages_2MiB_reserved "$hp_now" pages
fi

# ------------------------------------------------------------ models
if ((!kv_only)); then
	t0=$SECONDS
	if ((userpath)) && [[ -n $model_a ]]; then
		runuser -u nobody -- test -r "$A" || die "--model-a $A: the job user (nobody) cannot read it"
		pass "model A given: $A, $(($(stat -c %s "$A") >> 20)) MiB"
	elif ((userpath)); then
		"$python" "$E/opt/slurm_e2e.py" write-models "$A" "$a_bytes" 11 || die "writing model A failed"
		pass "model written: A $(($(stat -c %s "$A") >> 20)) MiB ($((SECONDS - t0)) s)"
	elif "$python" "$E/opt/slurm_e2e.py" write-models "$A" "$a_bytes" "$Bm" "$b_bytes" 11; then
		pass "models written: A $(($(stat -c %s "$A") >> 20)) MiB, B $(($(stat -c %s "$Bm") >> 20)) MiB ($((SECONDS - t0)) s)"
	else
		die "writing the models failed"
	fi
	a_size=$(stat -c %s "$A")
	((userpath)) || b_size=$(stat -c %s "$Bm")
fi

t_began=$(date +%s)
cluster_start || die "the cluster did not start"
syslog_listen || note "no syslog listener: the agents' lines are looked for in the journal"
chmod 755 "$T/work"
W=$T/work
JOB_ENV=(env PATH="$(dirname "$python"):$E/opt/bin:/usr/bin:/bin" PYTHONPATH="$E/opt/py" PYTHONDONTWRITEBYTECODE=1)
PYF=$E/opt/slurm_e2e.py
# bench/kv_py_calls.py times ids as numpy arrays where the job's Python imports
# numpy. The test's Python may lack it (a torch venv) while another Python of
# the same version has it, or have it where only root reads: then a copy of
# that numpy goes on the job's PYTHONPATH, so that the in-job figure is taken
# with the ids engines pass.
job_numpy() {
	local d= p ver
	as_user "${JOB_ENV[@]}" python3 -c 'import numpy' 2>/dev/null && return 0
	ver=$("$python" -c 'import sys; print(sys.version_info[:2])')
	for p in "$python" python3 /usr/bin/python3; do
		[[ $(command -v "$p" 2>/dev/null) && $("$p" -c 'import sys; print(sys.version_info[:2])' 2>/dev/null) = "$ver" ]] ||
			continue
		d=$("$p" -c 'import numpy, os; print(os.path.dirname(numpy.__file__))' 2>/dev/null) && break
		d=
	done
	if [[ -z $d ]]; then
		note "no Python $ver here has numpy: KV ids from Python are timed as lists only"
		return 0
	fi
	cp -a "$d" "$E/opt/py/" && { [[ ! -d $d.libs ]] || cp -a "$d.libs" "$E/opt/py/"; } &&
		chmod -R a+rX "$E/opt/py" || die "copying $d for the job user failed"
	as_user "${JOB_ENV[@]}" python3 -c 'import numpy' 2>/dev/null ||
		die "the job user cannot import the copy of $d: $(as_user "${JOB_ENV[@]}" python3 -c 'import numpy' 2>&1 | tail -n 1)"
	note "numpy for the job user: a copy of $d"
}
if ((!host)); then
	gpu_before=$(gpu_used)
	note "GPU 0 ($GPU_NAME): ${gpu_before} MiB used before the jobs"
fi
gpu_back() { # GPU memory used back to what it was (the driver frees a killed process's memory late)
	local now
	for _ in $(seq 100); do
		now=$(gpu_used)
		((now <= gpu_before + 4)) && return 0
		sleep 0.1
	done
	note "GPU 0: $now MiB used, $gpu_before before"
	return 1
}

gpu_check() {
	if ((host)); then skip "$1: host backend, no GPU"; else check "$1 ($gpu_before MiB used)" gpu_back; fi
}

# Job output lines "KEY VALUE" ($out), JSON fields, and a step's own result lines.
val() { awk -v k="$1" '$1 == k { print $2 }' <<<"$out" | tail -n 1; }
jq_py() { "$python" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null; }
steps() { # NAME [STEP]: the result lines of step STEP (default NAME) in $W/NAME.out, counted here
	local f=$W/$1.out line
	[[ -f $f ]] || { fail "$1 left no output"; return; }
	while IFS= read -r line; do
		case $line in
		"ok - "*) pass "${line#ok - }" ;;
		"not ok - "*) fail "${line#not ok - }" ;;
		"skip - "*) skip "${line#skip - }" ;;
		"# figure: "*) read -r _ _ n v u <<<"$line"; figure "$n" "$v" "$u" ;;
		esac
	done <"$f"
	grep -q "^# done ${2:-$1}" "$f" || fail "$1 did not finish (rc $(val "${1}_rc")): $(tail -n 5 "$f")"
}

# ------------------------------------------------------------ KV in a job (issue 18)
# The KV benchmark through a job's slab and pinned pool (aegaeon-cli kv bench
# in the batch step: every size, each way and both at once, against per-block
# and batched copies), the same at 32 KiB standalone beside it, a consumer's
# waits on another process's layer events (bench/kv_event_wait, when built),
# and swaps from Python each way and both at once (slurm_e2e.py kv). Figures
# kv_*; a JSON that is not verified fails.
# With --kv-only it runs right after the cluster starts.
kv_figures() { # JSON PREFIX: a figure for every size, direction and way of a kv bench JSON
	local line
	while read -r line; do figure $line; done < <("$python" "$PYF" kv-figures "$1" "$2" 2>/dev/null)
}
kv_verified() { jq_py "$1" "d['verified'] and d['in_job'] == ($2 == 1)"; } # JSON IN_JOB(0|1)
kv_in_job() {
	if ((small)); then
		kv_sizes=4KiB,32KiB,2MiB kv_layer_sizes=64KiB,2MiB kv_layers=8 kv_bytes=8MiB kv_repeat=3
		kv_slab=256MiB kv_pinned=64MiB:2MiB kv_py_blocks=256
	else
		kv_sizes=4KiB,16KiB,32KiB,64KiB,256KiB,1MiB,2MiB kv_layer_sizes=256KiB,1MiB,2MiB,4MiB kv_layers=32
		kv_bytes=256MiB kv_repeat=10 kv_slab=4GiB kv_pinned=4GiB:32MiB kv_py_blocks=8192
	fi
	job_numpy
	kv_wait_bin=
	for f in "${bundle:+$bundle/bench/kv_event_wait}" "${AEG_BUILDDIR:+$AEG_BUILDDIR/bench/kv_event_wait}"; do
		[[ -n $f && -x $f ]] && { install -m 755 "$f" "$E/opt/bin/kv_event_wait"; kv_wait_bin=1; break; }
	done

	if env PATH="$E/opt/bin:$PATH" aegaeon-cli kv bench --device "$device" --block 32KiB --bytes "$kv_bytes" \
		--repeat "$kv_repeat" --json >"$W/kv_standalone.json" 2>"$W/kv_standalone.err" &&
		[[ $(kv_verified "$W/kv_standalone.json" 0) = True ]]; then
		pass "KV bench standalone at 32 KiB: each way and both at once, verified"
		kv_figures "$W/kv_standalone.json" kv_standalone
	else
		fail "KV bench standalone: $(tail -n 3 "$W/kv_standalone.err")"
	fi
	cat >"$W/kvjob.sh" <<-'JOB'
		#!/bin/bash
		set -u
		aegaeon-cli kv bench --block "$KV_SIZES" --bytes "$KV_BYTES" --repeat "$KV_REPEAT" --json \
			>"$W/kv_job.json" 2>"$W/kv_job.err"; echo "kv_bench_rc $?"
		aegaeon-cli kv bench --block "$KV_LAYER_SIZES" --layers "$KV_LAYERS" --bytes "$KV_BYTES" --repeat "$KV_REPEAT" \
			--json >"$W/kv_job_layers.json" 2>"$W/kv_job_layers.err"; echo "kv_layers_rc $?"
		if command -v kv_event_wait >/dev/null; then
			kv_event_wait --device "$KV_DEVICE" --layers 32 --waits 10000 --json >"$W/kv_wait.json" 2>&1
			echo "kv_wait_rc $?"
		fi
		srun -n1 python3 "$PYF" kv "$KV_BLOCK" "$KV_PY_BLOCKS" >"$W/kv.out" 2>&1; echo "kv_rc $?"
		srun -n1 python3 "$KVPY" --job --block "$KV_BLOCK" --blocks "$KV_PY_BLOCKS" --json >"$W/kv_py_calls.out" 2>&1
		echo "kv_py_calls_rc $?"
	JOB
	chmod 755 "$W/kvjob.sh"
	job3=$(as_user "${JOB_ENV[@]}" W="$W" PYF="$PYF" KVPY="$E/opt/kv_py_calls.py" KV_SIZES=$kv_sizes KV_LAYER_SIZES=$kv_layer_sizes KV_LAYERS=$kv_layers \
		KV_BYTES=$kv_bytes KV_REPEAT=$kv_repeat KV_DEVICE=$device KV_BLOCK=$kv_block KV_PY_BLOCKS=$kv_py_blocks \
		sbatch --parsable -N1 --gres=gpu:1 -o "$W/kvjob.out" --aegaeon-slab=$kv_slab --aegaeon-pinned=$kv_pinned \
		"$W/kvjob.sh" 2>&1)
	if [[ $job3 =~ ^[0-9]+$ ]] && wait_job "$job3" 900; then
		out=$(cat "$W/kvjob.out" 2>/dev/null)
		if [[ $(val kv_bench_rc) = 0 && $(kv_verified "$W/kv_job.json" 1) = True ]]; then
			pass "KV bench in job $job3 through its slab and pinned pool ($kv_sizes): each way and both at once, verified"
			kv_figures "$W/kv_job.json" kv_job
		else
			fail "KV bench in job $job3 (rc $(val kv_bench_rc)): $(tail -n 3 "$W/kv_job.err" 2>/dev/null)"
		fi
		if [[ $(val kv_layers_rc) = 0 && $(kv_verified "$W/kv_job_layers.json" 1) = True ]]; then
			pass "KV bench in the job, GPU blocks in $kv_layers layers of K and V tensors ($kv_layer_sizes), verified"
			kv_figures "$W/kv_job_layers.json" kv_job_layers
		else
			fail "KV bench in the job, per-layer tensors (rc $(val kv_layers_rc)): $(tail -n 3 "$W/kv_job_layers.err" 2>/dev/null)"
		fi
		if [[ -z $kv_wait_bin ]]; then
			skip "kv_event_wait in the job: not built (make gpu-programs)"
		elif [[ $(val kv_wait_rc) = 0 ]]; then
			pass "a consumer in the job waited on another process's 32 layer events (kv_event_wait)"
			figure kv_job_event_wait_opened_median_us "$(jq_py "$W/kv_wait.json" "d['opened_wait_us']['median']")" us
			figure kv_job_event_wait_opened_p99_us "$(jq_py "$W/kv_wait.json" "d['opened_wait_us']['p99']")" us
			figure kv_job_event_wait_first_median_us "$(jq_py "$W/kv_wait.json" "d['first_wait_us']['median']")" us
		else
			fail "kv_event_wait in the job (rc $(val kv_wait_rc)): $(cat "$W/kv_wait.json" 2>/dev/null | tail -n 3)"
		fi
		steps kv
		# Where a Python call's time goes (bench/kv_py_calls.py): its parts, each way
		# (and each way with numpy ids where the job's Python has numpy).
		if [[ $(val kv_py_calls_rc) = 0 ]]; then
			local way part unit
			pass "KV calls from Python timed part by part in the job, every block bit-exact"
			grep -v '^{' "$W/kv_py_calls.out" | sed 's/^/# /'
			for way in $(jq_py <(tail -n 1 "$W/kv_py_calls.out") "' '.join(d['ways'])"); do
				for part in GBps ids_us submit_us wait_us release_us; do
					unit=us
					[[ $part = GBps ]] && unit=GB/s
					figure "kv_py_calls_${way}_$part" \
						"$(jq_py <(tail -n 1 "$W/kv_py_calls.out") "d['ways']['$way']['$part']")" $unit
				done
			done
		else
			fail "KV calls from Python, part by part (rc $(val kv_py_calls_rc)): $(tail -n 3 "$W/kv_py_calls.out" 2>/dev/null)"
		fi
	else
		fail "KV job did not run: $job3"
		[[ $job3 =~ ^[0-9]+$ ]] && sl scancel "$job3"
	fi
	check "no agent process and no runtime dir after the KV job" nothing_left 30
}

if ((kv_only)); then
	kv_in_job
	exit 0
fi

# ------------------------------------------------------------ job start overhead
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
srun_ms() { # the wall time of an srun of `true` as the job user
	local t0 t1
	t0=$(date +%s%N)
	as_user srun -N1 --gres=gpu:1 "$@" true >/dev/null 2>"$W/srun.err" || { cat "$W/srun.err" >&2; echo -1; return; }
	t1=$(date +%s%N)
	echo $(((t1 - t0) / 1000000))
}
# The node idle again: a job's epilog (an agent letting its slab and pool go)
# holds the node in COMPLETING, and the next job's srun would count it.
node_idle() { [[ $(sl sinfo -h -N -o %T | sort -u) = idle ]]; }
start_overhead() { # SUFFIX: jobs of srun true, plain and with a slab and a pool, medians
	local plain=() aeg=() n=$((userpath ? repeat : 3))
	for ((i = 0; i < n; i++)); do
		wait_for 60 node_idle
		plain+=("$(srun_ms)")
		wait_for 60 node_idle
		aeg+=("$(srun_ms --aegaeon-slab=$slab --aegaeon-pinned=$pinned_plain)")
	done
	if [[ " ${plain[*]} ${aeg[*]} " == *" -1 "* ]]; then
		fail "jobs of srun true, plain and with --aegaeon-slab=$slab --aegaeon-pinned=$pinned_plain"
	else
		pass "jobs of srun true: plain ${plain[*]} ms; slab $slab + pool $pinned_plain ${aeg[*]} ms"
		figure "job_plain_srun$1_s" "$(calc "$(median "${plain[@]}") / 1000")" s
		figure "job_start_overhead$1_s" "$(calc "($(median "${aeg[@]}") - $(median "${plain[@]}")) / 1000")" s
	fi
	check "no agent or runtime dir left after those jobs" nothing_left 30
}
srun_ms >/dev/null      # warm: the first job pays for loading what slurmd and srun load
if ((userpath)); then
	source "$here/slurm_userpath.sh"
	userpath_run
	exit 0
fi
start_overhead ""

# ------------------------------------------------------------ the job
cat >"$W/job1.sh" <<-'JOB'
	#!/bin/bash
	# The batch step: it has the job's AEGAEON_* environment as every step does.
	set -u
	echo "batch_start $(date +%s.%N)"
	aegaeon-cli status --json >"$W/status0.json"
	aegaeon-cli wait "$A" --timeout 300; echo "wait_rc $?"
	echo "model_ready $(date +%s.%N)"
	echo "agent_started $(stat -c %.9Y "$AEGAEON_JOB_DIR/agent.pid")"
	echo "agent_ready $(stat -c %.9Y "$AEGAEON_JOB_DIR/ready")"
	load() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["load_id"])' "$1"; }
	aegaeon-cli status --json >"$W/status1.json"
	srun -n1 python3 "$PYF" step1 "$A" >"$W/step1.out" 2>&1; echo "step1_rc $?"
	aegaeon-cli status --json >"$W/status2.json"
	srun --overlap -n1 python3 "$PYF" step2 "$A" "$W" "$KV_BLOCK" "$KV_BLOCKS" >"$W/step2.out" 2>&1 &
	p2=$!
	srun --overlap -n1 python3 "$PYF" step3 "$A" "$W" >"$W/step3.out" 2>&1; echo "step3_rc $?"
	wait $p2; echo "step2_rc $?"
	aegaeon-cli status --json >"$W/status3.json"
	# The job-start path again, timed by the CLI: a second load of A from the page cache.
	aegaeon-cli prefetch "$A" --reload --json >"$W/reload.json"; echo "reload_rc $?"
	aegaeon-cli release --load "$(load "$W/reload.json")"; echo "reload_release_rc $?"
	# B, loaded earlier in the job: it fills the host model cache, then leaves the GPU.
	aegaeon-cli prefetch "$B" --json >"$W/b1.json"; echo "b1_rc $?"
	aegaeon-cli release --load "$(load "$W/b1.json")"; echo "b1_release_rc $?"
	aegaeon-cli status --json >"$W/status4.json"
	srun -n1 python3 "$PYF" switch "$A" "$B" >"$W/switch.out" 2>&1; echo "switch_rc $?"
	aegaeon-cli status --json >"$W/status5.json"
	echo "batch_end"
JOB
chmod 755 "$W/job1.sh"
t_submit=$(date +%s.%N)
job=$(as_user "${JOB_ENV[@]}" W="$W" A="$A" B="$Bm" PYF="$PYF" KV_BLOCK=$kv_block KV_BLOCKS=$kv_blocks \
	sbatch --parsable -N1 --gres=gpu:1 -o "$W/job1.out" --aegaeon-slab=$slab --aegaeon-pinned=$pinned \
	--aegaeon-prefetch="$A" "$W/job1.sh" 2>&1)
if [[ $job =~ ^[0-9]+$ ]]; then
	pass "batch job $job submitted: --gres=gpu:1 --aegaeon-slab=$slab --aegaeon-pinned=$pinned --aegaeon-prefetch=A"
else
	die "sbatch: $job"
fi
wait_job "$job" 600 || fail "job $job still in the queue after 600 s"
state=$(sl scontrol -o show job "$job" | grep -o 'JobState=[A-Z_]* .*ExitCode=[0-9:]*' | awk '{ print $1, $NF }')
check "job $job completed ($state)" test "$state" = "JobState=COMPLETED ExitCode=0:0"
out=$(cat "$W/job1.out" 2>/dev/null)

check "the batch step waited for the prefetched model (aegaeon-cli wait)" test "$(val wait_rc)" = 0
if [[ -n $(val model_ready) && -n $(val agent_started) ]]; then
	was_done=$(jq_py "$W/status0.json" "int(d['loads'][0]['done_bytes'] == d['loads'][0]['file_bytes'])")
	figure job_start_to_model_ready_s "$(calc "$(val model_ready) - $(val agent_started)")" s
	figure submit_to_model_ready_s "$(calc "$(val model_ready) - $t_submit")" s
	figure prefetch_job_start_GBps "$(calc "$a_size / ($(val model_ready) - $(val agent_ready)) / 1e9")" GB/s
	[[ $was_done = 1 ]] && note "the load had ended before the batch script looked: prefetch_job_start_GBps is a lower bound (prefetch_agent_page_cache_GBps times the same path)"
fi
loads() { jq_py "$1" "' '.join('%s:%s:%s' % (l['load_id'], l['path'], l['state']) for l in d['loads'])"; }
l1=$(loads "$W/status1.json")
check "the job's agent holds one load, A, from --aegaeon-prefetch ($l1)" test "$l1" = "1:$A:loaded"
check "the job has one slab of $slab and a pool of $pinned" test "$(jq_py "$W/status1.json" "[s['total_bytes'] for s in d['slabs']], d['pool']['pool_bytes']")" = "[$slab_bytes] $pinned_bytes"

steps step1
check "step 1 started no load (agent status: $(loads "$W/status2.json"))" test "$(loads "$W/status2.json")" = "$l1"
steps step2
steps step3
check "steps 2 and 3 started no load (agent status: $(loads "$W/status3.json"))" test "$(loads "$W/status3.json")" = "$l1"
if [[ $(val reload_rc) = 0 ]]; then
	figure prefetch_agent_page_cache_GBps "$(jq_py "$W/reload.json" "'%.4g' % d['gbps']")" GB/s
	pass "A loaded again through the agent from the page cache, and released (rc $(val reload_release_rc))"
else
	fail "aegaeon-cli prefetch A --reload in the job (rc $(val reload_rc))"
fi
check "B loaded earlier in the job, then released from the GPU" test "$(val b1_rc)$(val b1_release_rc)" = 00
cached=$(jq_py "$W/status4.json" "d['pool']['in_use'] * d['pool']['buffer_bytes']")
check "B sits in the host model cache ($cached bytes of the pool held, B is $b_size)" test "${cached:-0}" -ge "$b_size"
check "only A is on the GPU before the switch ($(loads "$W/status4.json"))" test "$(loads "$W/status4.json")" = "$l1"
steps switch
l5=$(loads "$W/status5.json")
check "after the switch step A is gone from the job's slab (loads: ${l5:-none})" test "${l5/$A/}" = "$l5"
check "the batch script ran to its end" grep -q '^batch_end' "$W/job1.out"
check "no agent process and no runtime dir after the job" nothing_left 30
gpu_check "GPU memory back to what it was before the job"

# ------------------------------------------------------------ cancelled mid-prefetch
"$python" "$PYF" drop-cache "$A"
cat >"$W/job2.sh" <<-'JOB'
	#!/bin/bash
	aegaeon-cli status --json >"$W/job2-status.tmp" && mv "$W/job2-status.tmp" "$W/job2-status.json"
	sleep 600
JOB
chmod 755 "$W/job2.sh"
job2=$(as_user "${JOB_ENV[@]}" W="$W" sbatch --parsable -N1 --gres=gpu:1 -o "$W/job2.out" \
	--aegaeon-slab=$slab --aegaeon-pinned=$pinned --aegaeon-prefetch="$A" "$W/job2.sh" 2>&1)
if [[ $job2 =~ ^[0-9]+$ ]] && wait_for 120 test -f "$W/job2-status.json"; then
	sl scancel "$job2"
	pass "job $job2 cancelled while its agent ran (load: $(jq_py "$W/job2-status.json" "'%s, %d of %d bytes' % (d['loads'][0]['state'], d['loads'][0]['done_bytes'], d['loads'][0]['file_bytes'])"))"
else
	fail "job $job2 did not start: $(cat "$W/job2.out" 2>/dev/null)"
	[[ $job2 =~ ^[0-9]+$ ]] && sl scancel "$job2"
fi
wait_job "$job2" 60 || fail "job $job2 still in the queue 60 s after scancel"
check "no agent process and no runtime dir after the cancelled job" nothing_left 30
gpu_check "GPU memory back to what it was after the cancelled job"

kv_in_job

exit 0

#!/bin/bash
# The README's first command. On Debian 12, as root: installs what aegaeon
# needs, builds it and installs it into a throwaway prefix, starts a
# throwaway one-node Slurm cluster with the aegaeon SPANK plugin, runs a demo
# batch job as an unprivileged user (--aegaeon-slab, --aegaeon-pinned,
# --aegaeon-prefetch), prints what the job printed and a summary, and removes
# everything it made. The cuda backend where a GPU answers `nvidia-smi -L`
# and a CUDA toolkit is in /usr/local/cuda, the host backend otherwise.
#
#   sudo scripts/quickstart.sh
#
# AEGAEON_SKIP_DEPS=1 skips the package installation; AEGAEON_QUICKSTART_KEEP=1
# keeps the temp dir (build, cluster logs) for a look afterwards.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
if [[ $(id -u) -ne 0 ]]; then
	echo "quickstart.sh: run it as root (sudo scripts/quickstart.sh): it installs packages and starts" \
		"munged, slurmctld and slurmd (in a temp dir; nothing of the system's configuration is touched)" >&2
	exit 1
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
t_start=$SECONDS
W=
step_no=0
bold=; plain=
[[ -t 1 ]] && bold=$'\033[1m' plain=$'\033[0m'
say() { printf '\n%s[%d/6] %s%s\n' "$bold" $((++step_no)) "$*" "$plain"; }
info() { printf '      %s\n' "$*"; }
die() {
	printf '\nquickstart.sh: FAILED: %s\n' "$*" >&2
	exit 1
}
# run_logged LOG CMD...: CMD's output goes to LOG; on failure its tail is shown.
run_logged() {
	local log=$1
	shift
	if ! "$@" >>"$log" 2>&1; then
		echo "---- last lines of $log:" >&2
		tail -n 25 "$log" >&2
		return 1
	fi
}

cleanup() {
	local rc=$?
	trap - EXIT
	set +e
	if [[ -n ${T:-} ]]; then
		[[ $rc -ne 0 && -d $T/log ]] && { echo "---- cluster logs (last lines):" >&2; tail -n 8 "$T"/log/*.log >&2; }
		cluster_stop 2>/dev/null || true
	fi
	if [[ -n $W && -d $W ]]; then
		if [[ ${AEGAEON_QUICKSTART_KEEP:-0} = 1 ]]; then
			echo "kept $W"
		else
			rm -rf "$W"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------- 1. packages
say "Packages: build tools, hwloc, libconfig, jansson, cmocka, Slurm and munge (apt-get)"
W=$(mktemp -d /tmp/aegaeon-quickstart.XXXXXX)
chmod 755 "$W"      # the job user runs the installed programs from here
if [[ ${AEGAEON_SKIP_DEPS:-0} = 1 ]]; then
	info "skipped (AEGAEON_SKIP_DEPS=1)"
else
	t=$SECONDS
	run_logged "$W/deps.log" bash "$top/scripts/install-deps.sh" || die "installing packages (scripts/install-deps.sh)"
	# What it did with the Slurm and munge services (those of packages it installed only).
	while read -r line; do info "$line"; done < <(sed -n 's/^install-deps\.sh: //p' "$W/deps.log")
	info "done in $((SECONDS - t)) s"
fi
for b in autoreconf make gcc munged slurmctld slurmd sbatch srun runuser python3; do
	command -v "$b" >/dev/null || die "$b is not installed (run without AEGAEON_SKIP_DEPS=1)"
done

# ------------------------------------------------------------------ 2. build
say "Build and install into a throwaway prefix"
gpus=0
gpu_note="no GPU: nvidia-smi -L does not answer here"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >"$W/gpus.txt" 2>&1; then
	gpus=$(grep -c '^GPU [0-9]' "$W/gpus.txt" || true)
	gpu_note="$gpus GPU(s): $(sed -n '1s/ (UUID.*//p' "$W/gpus.txt")"
fi
cuda_flags=(--without-cuda)
if [[ -x /usr/local/cuda/bin/nvcc ]]; then
	cuda_flags=(--with-cuda=/usr/local/cuda)
	if [[ $gpus -gt 0 ]]; then
		# The KV kernel is built for this machine's GPU.
		cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
		[[ $cc =~ ^[0-9]+$ ]] && cuda_flags+=("NVCC_ARCH_FLAGS=-gencode arch=compute_$cc,code=sm_$cc")
	fi
fi
device=host
if [[ $gpus -gt 0 && ${cuda_flags[0]} != --without-cuda ]]; then
	device=cuda
elif [[ $gpus -gt 0 ]]; then
	gpu_note="$gpu_note; no CUDA toolkit in /usr/local/cuda, so the demo uses the host backend"
fi
info "$gpu_note"
info "device backend for the demo: $device"

# A copy of the sources, so the checkout is left as it is (configured or not).
src=$W/src
mkdir -p "$src"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
	(cd "$top" && git ls-files -z --cached --others --exclude-standard |
		xargs -0 -r tar -cf - --no-recursion --ignore-failed-read 2>/dev/null) | tar -xf - -C "$src"
elif [[ -x $top/configure && ! -e $top/config.status ]]; then
	(cd "$top" && tar -cf - .) | tar -xf - -C "$src"
else
	die "$top is neither a git checkout nor an unconfigured release tree"
fi
prefix=$W/prefix
t=$SECONDS
(
	cd "$src"
	run_logged "$W/build.log" autoreconf -fi &&
		run_logged "$W/build.log" ./configure --prefix="$prefix" "${cuda_flags[@]}" &&
		run_logged "$W/build.log" make -j"$(nproc)" &&
		run_logged "$W/build.log" make install
) || die "building (full log: $W/build.log; AEGAEON_QUICKSTART_KEEP=1 keeps it)"
build_s=$((SECONDS - t))
plugin=$prefix/lib/slurm/aegaeon.so
cli=$prefix/bin/aegaeon-cli
agent=$prefix/sbin/aegaeond
for f in "$plugin" "$cli" "$agent"; do
	[[ -e $f ]] || die "make install made no $f (is libslurm-dev installed? see $W/build.log)"
done
info "configure ${cuda_flags[*]}; built and installed in $build_s s into $prefix"
info "plugin $plugin, agent $agent, CLI $cli"

# ---------------------------------------------------------------- 3. cluster
say "A throwaway Slurm cluster: munged, slurmctld, one slurmd (node n1)"
CLUSTER_PLUGIN=$plugin
CLUSTER_NODES=1
CLUSTER_PREFIX=$W/cluster
if [[ $device = cuda ]]; then
	CLUSTER_GPUS=$gpus
	CLUSTER_GPU_FILES=$(for ((g = 0; g < gpus; g++)); do echo "/dev/nvidia$g"; done)
else
	CLUSTER_GPUS=1          # a character device stands in for the GPU
	CLUSTER_GPU_FILES=
fi
# shellcheck source=lib/cluster.sh
source "$top/scripts/lib/cluster.sh"
CLUSTER_KEEP=${AEGAEON_QUICKSTART_KEEP:-0}
cluster_site_config() {
	local slab_max=90% pinned_max=4GiB
	[[ $device = host ]] && slab_max=2GiB pinned_max=512MiB
	cat >"$T/etc/aegaeon.conf" <<-CONF
	# The site's limits and paths, read by the plugin (plugstack argument
	# config=) and by the agent. See aegaeon.conf(5).
	device = "$device";
	agent_path = "$agent";
	runtime_dir = "$T/aegrun";
	slab_max = "$slab_max";
	slab_default = "256MiB";
	pinned_max = "$pinned_max";
	pinned_default = "64MiB";
	pinned_buffer = "8MiB";
	prefetch_chunk = "32MiB";
	agent_start_timeout = 30.0;
	agent_stop_timeout = 5.0;
	log_level = "info";
	CONF
}
t=$SECONDS
cluster_start 2>"$W/cluster-start.log" || { cat "$W/cluster-start.log" >&2; die "starting the cluster"; }
cluster_s=$((SECONDS - t))
info "up in $cluster_s s in $T"
info "plugstack.conf: $(cat "$T/etc/plugstack.conf")"
info "srun --help lists the plugin's options:"
sl srun --help 2>&1 | grep -E '^ +--aegaeon-' | sed 's/^ */        /' || true

# ---------------------------------------------------------------- 4. models
say "Two demo models (safetensors, random weights) in the job user's directory"
/usr/bin/python3 - "$T/work" <<-'PY'
	import json, os, struct, sys
	def write(path, layers, layer_bytes):
	    tensors, off = {}, 0
	    for i in range(layers):
	        tensors[f"model.layers.{i}.weight"] = {"dtype": "BF16", "shape": [layer_bytes // 2],
	                                              "data_offsets": [off, off + layer_bytes]}
	        off += layer_bytes
	    header = json.dumps(tensors).encode()
	    header += b" " * (-len(header) % 8)
	    with open(path, "wb") as f:
	        f.write(struct.pack("<Q", len(header)) + header)
	        for _ in range(layers):
	            f.write(os.urandom(layer_bytes))
	write(os.path.join(sys.argv[1], "model.safetensors"), 8, 32 << 20)        # 256 MiB
	write(os.path.join(sys.argv[1], "model-b.safetensors"), 4, 32 << 20)      # 128 MiB
	PY
chown "$JOB_USER" "$T/work/model.safetensors" "$T/work/model-b.safetensors"
info "model.safetensors (8 tensors, 256 MiB): named by --aegaeon-prefetch, loaded by the agent at job start"
info "model-b.safetensors (4 tensors, 128 MiB): prefetched by a job step"

# ------------------------------------------------------------------- 5. job
say "The demo job, as user $JOB_USER"
cat >"$T/work/demo.sh" <<-EOF
#!/bin/bash
# Two job steps sharing the job's GPU slab through the node's agent.
cli=$cli
echo "######## step 1: the reservation, the job-start load, a second model"
srun bash -c '
	echo "\$ aegaeon-cli status"; \$0 status
	echo; echo "\$ aegaeon-cli wait model.safetensors     # loaded since job start (--aegaeon-prefetch)"
	\$0 wait model.safetensors
	echo; echo "\$ aegaeon-cli prefetch model-b.safetensors"
	\$0 prefetch model-b.safetensors' "\$cli"
echo
echo "######## step 2: another process finds both models on the GPU and reads them back"
srun bash -c '
	echo "\$ aegaeon-cli chunks --verify              # attach, wait on each chunk event, compare with the file"
	\$0 chunks --verify
	echo; echo "\$ aegaeon-cli prefetch model.safetensors"
	\$0 prefetch model.safetensors
	echo; echo "\$ aegaeon-cli status"; \$0 status' "\$cli"
EOF
chmod 755 "$T/work/demo.sh"
opts=(-N1 --gres=gpu:1 --aegaeon-slab=512MiB --aegaeon-pinned=64MiB:8MiB --aegaeon-prefetch=model.safetensors)
info "sbatch ${opts[*]} -o demo.out demo.sh"
t=$SECONDS
job=$(submit "${opts[@]}" -o demo.out demo.sh) || die "sbatch refused the job"
[[ $job =~ ^[0-9]+$ ]] || die "sbatch said: $job"
wait_job "$job" 120 || die "job $job did not end within 120 s"
job_s=$((SECONDS - t))
state=$(sl scontrol -o show job "$job" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
out=$(cat "$T/work/demo.out")
info "its output (demo.out), paths shown relative to the job's directory $T/work:"
echo
sed -e "s|$T/work/||g" -e 's/^/    | /' "$T/work/demo.out"

# -------------------------------------------------------------- 6. summary
say "Summary"
ok=1
expect() { # expect WHAT ERE: the job output has a line matching ERE
	if grep -qE -- "$2" <<<"$out"; then
		printf '      ok   %s\n' "$1"
	else
		printf '      FAIL %s\n' "$1"
		ok=0
	fi
}
first() { grep -oE -- "$1" <<<"$out" | head -n 1 || true; }
reservation=$(sed -n 's/^slab 0 (GPU \([0-9]*\)): .* used of \([^,]*\),.*/slab of \2 on GPU \1/p' <<<"$out" | head -n 1)
pool=$(sed -n 's/^pinned pool: \([^ ]* [^ ]*\) in \([0-9]*\) buffers of \([^,]*\),.*/pinned pool of \1 (\2 buffers of \3)/p' <<<"$out" | head -n 1)
speed=$(sed -n 's/.*model-b.safetensors: \(128 MiB in [0-9.]* s, [0-9.]* GB\/s\).*/\1/p' <<<"$out" | head -n 1)
info "job $job: $state in $job_s s (submission to end)"
expect "reservation at job start: ${reservation:-?}, ${pool:-?}" '^slab 0 \(GPU [0-9]+\): .* used of 512 MiB'
at_start=$(sed -n 's/^load 1: .*model.safetensors -> slab 0, \(loading\|loaded\), .*/\1/p' <<<"$out" | head -n 1)
expect "job-start prefetch (--aegaeon-prefetch): model.safetensors, 256 MiB, ${at_start:-?} when step 1 began" \
	'^load 1: .*/model.safetensors loaded, 256 MiB'
expect "a step's prefetch through the agent: model-b.safetensors, ${speed:-?}" \
	"model-b.safetensors: 128 MiB in [0-9.]+ s, [0-9.]+ GB/s through the job's agent"
expect "step 2 read model.safetensors back from the slab: identical to the file" \
	"model.safetensors: verified 256 MiB .* identical"
expect "step 2 read model-b.safetensors back: identical" "model-b.safetensors: verified 128 MiB .* identical"
expect "step 2's prefetch of model.safetensors reused load 1: nothing loaded again" \
	"model.safetensors: already in the job's slab \(load 1, .*reused, nothing loaded"
expect "the agent still holds exactly the two loads" '^load 2: .*model-b.safetensors -> slab 0, loaded'
[[ $state = COMPLETED ]] || { printf '      FAIL job state %s\n' "$state"; ok=0; }
cluster_stop 2>/dev/null || true
T=
info "cluster stopped; $W and everything in it removed on exit"
info "total $((SECONDS - t_start)) s (build $build_s s, cluster start $cluster_s s, job $job_s s)"
[[ $ok = 1 ]] || die "the demo did not show what it should (see the job output above)"
echo
echo "aegaeon quickstart: all good. Next: README.md (Build, Use), aegaeon-cli(1), aegaeon-spank(8)."

#!/bin/bash
# Each bad option value is rejected by srun, sbatch and salloc with a clear
# message, a non-zero exit and no job created; what a site's defaults make
# of a job that gives no value is checked with them.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

# rejected CMD EXPECTED-MESSAGE OPTION... : the client exits non-zero, says why, creates no job
rejected() {
	local cmd=$1 want=$2 before out rc args
	shift 2
	before=$(job_count)
	case $cmd in
	srun) out=$(as_user timeout 30 srun -N1 --gres=gpu:1 "$@" true 2>&1) ;;
	sbatch) out=$(as_user timeout 30 sbatch -N1 --gres=gpu:1 "$@" --wrap true 2>&1) ;;
	salloc) out=$(as_user timeout 30 salloc -N1 --gres=gpu:1 "$@" true 2>&1) ;;
	esac
	rc=$?
	# (an option of 40 KB is named by its first 200 bytes)
	args="$*"
	if [[ $rc -ne 0 && $rc -ne 124 ]] && grep -qF -- "$want" <<<"$out" && [[ $(job_count) -eq $before ]]; then
		pass "$cmd ${args:0:200} rejected: $want"
	else
		fail "$cmd ${args:0:200} (rc $rc, jobs $before -> $(job_count)): wanted '$want', got: ${out:0:2000}"
	fi
}

touch "$T/work/model.bin"
chown "$JOB_USER" "$T/work/model.bin"
touch "$T/secret.bin"
chmod 600 "$T/secret.bin"

# 40 names of 1000 bytes: under the count and PATH_MAX, over what an exec takes in one string once absolute.
long_name=$(head -c 1000 /dev/zero | tr '\0' a)
long_list=$(for i in $(seq 39); do printf '%s,' "$long_name"; done)$long_name
cases=(
	"--aegaeon-slab=abc|size 'abc' does not start with a digit"
	"--aegaeon-slab=-1G|no sign allowed"
	"--aegaeon-slab=0|--aegaeon-slab=0: the slab must be more than 0"
	"--aegaeon-slab=0%|the slab must be more than 0"
	"--aegaeon-slab=500GiB|--aegaeon-slab=500GiB is over this site's limit of 1 GiB per GPU"
	"--aegaeon-slab=1.5GiB|--aegaeon-slab=1.5GiB is over this site's limit of 1 GiB per GPU"
	"--aegaeon-slab=101%|a percentage must be at most 100%"
	"--aegaeon-slab=40XB|unknown unit 'XB'"
	"--aegaeon-slab=99999999999999999999|does not fit in 64 bits"
	"--aegaeon-pinned=1GiB|--aegaeon-pinned=1GiB is over this site's limit of 256 MiB per node"
	"--aegaeon-pinned=64MiB:1000|buffer size must be a non-zero multiple of 4 KiB"
	"--aegaeon-pinned=50%|pool size '50%' cannot be a percentage"
	"--aegaeon-pinned=16MiB:32MiB|buffer size 32 MiB is larger than the pool"
	"--aegaeon-pinned=512KiB|--aegaeon-pinned=512KiB is smaller than one pool buffer of 1 MiB"
	"--aegaeon-pinned=x:y|size 'x' does not start with a digit"
	"--aegaeon-prefetch=/nonexistent/model.safetensors|/nonexistent/model.safetensors: No such file or directory"
	"--aegaeon-prefetch=missing.bin|$T/work/missing.bin: No such file or directory"
	"--aegaeon-prefetch=model.bin,,model.bin|empty file name"
	"--aegaeon-prefetch=$T/work|$T/work: no model in it"
	"--aegaeon-prefetch=$T/secret.bin|$T/secret.bin: Permission denied"
	"--aegaeon-prefetch=$long_list|the list is longer than 32768 bytes with its paths made absolute"
	"--aegaeon-device=host|--aegaeon-device=host is not allowed on this site"
	"--aegaeon-device=gpu|--aegaeon-device=gpu: not one of cuda, host"
)
for c in "${cases[@]}"; do
	rejected srun "${c#*|}" "${c%%|*}"
done
# sbatch and salloc run the same checks; a few cases show it.
for c in "${cases[0]}" "${cases[4]}" "${cases[9]}" "${cases[15]}" "${cases[21]}"; do
	rejected sbatch "${c#*|}" "${c%%|*}"
	rejected salloc "${c#*|}" "${c%%|*}"
done
# A good option beside a bad one does not save the job.
rejected srun "--aegaeon-pinned=1GiB is over" --aegaeon-slab=64MiB --aegaeon-pinned=1GiB

# Caps in percent are checked in the client; a device choice where allowed is still parsed.
write_site_config 'slab_max = "50%";' 'slab_default = "10%";' 'allow_device_option = true;'
rejected srun "--aegaeon-slab=60% is over this site's limit of 50% of each GPU's memory" --aegaeon-slab=60%
rejected srun "--aegaeon-device=tpu: not one of cuda, host" --aegaeon-device=tpu

# A site that reserves no slab unless asked: files to load at start need one.
write_site_config 'slab_default = "0";'
rejected srun "--aegaeon-prefetch loads into the job's slab, but this site reserves none unless the job asks (slab_default is 0): add --aegaeon-slab=SIZE" \
	--aegaeon-prefetch=model.bin
rejected sbatch "this site reserves none unless the job asks" --aegaeon-prefetch=model.bin --aegaeon-pinned=16MiB
# ... and a job that asks for a pool alone gets its agent, with no slab.
out=$(as_user timeout 60 srun -N1 --gres=gpu:1 --aegaeon-pinned=16MiB bash -c \
	'echo slabs=$AEGAEON_SLABS; '"$AEG_CLI"' status' 2>&1)
check "slab_default 0: a pool-only job runs with no slab ($out)" grep -qx "slabs=0" <<<"$out"
check "... and its pool" grep -q "^pinned pool: 16 MiB" <<<"$out"
write_site_config

# A typo in the user's $AEGAEON_LOG is a warning in srun, never a hang (it hung every srun).
out=$(as_user AEGAEON_LOG=verbose timeout 30 srun -N1 echo log-typo-ran 2>&1)
check "srun with AEGAEON_LOG=verbose runs its job" grep -qx log-typo-ran <<<"$out"
check "... and warns: AEGAEON_LOG='verbose' is not one of ..." grep -qF "AEGAEON_LOG='verbose' is not one of" <<<"$out"

# A broken site configuration stops aegaeon jobs with a clear message, and no other job.
echo 'slab_max = "lots";' >>"$T/etc/aegaeon.conf"
rejected srun "site configuration $T/etc/aegaeon.conf" --aegaeon-slab=10%
out=$(as_user timeout 30 srun -N1 echo plain-job-ran 2>&1)
check "a job without aegaeon options runs despite a broken aegaeon.conf" grep -qx plain-job-ran <<<"$out"

finish

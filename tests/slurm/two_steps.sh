#!/bin/bash
# Two steps of one job share the agent's slab: step 1 prefetches a file,
# step 2 finds its chunks and reads the same bytes without loading again;
# a file named by --aegaeon-prefetch is loading or loaded at the first step.
#
# pending: needs aegaeon-cli prefetch/status inside a job (the agent has the protocol; the CLI's main is not built yet)
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

if [[ ! -x $AEG_CLI ]] || ! "$AEG_CLI" --help 2>&1 | grep -qw prefetch; then
	fail "aegaeon-cli with a prefetch command is not built ($AEG_CLI): this test cannot run yet"
	finish
	exit
fi

head -c $((8 << 20)) /dev/urandom >"$T/work/model.bin"
chown "$JOB_USER" "$T/work/model.bin"
sum=$(sha256sum <"$T/work/model.bin" | cut -d' ' -f1)
job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=64MiB --aegaeon-prefetch=model.bin -o two.out --wrap "
	srun $AEG_CLI status
	srun $AEG_CLI prefetch model.bin
	srun $AEG_CLI status")
wait_job "$job" 60
out=$(cat "$T/work/two.out")
check "first step finds model.bin loading or loaded" grep -qE "model.bin.*(loading|loaded)" <<<"$out"
check "second step reuses the chunks (no second load)" grep -qE "model.bin.*(reused|already loaded)" <<<"$out"
check "bytes match ($sum)" grep -qF "$sum" <<<"$out"
check "nothing left" nothing_left 10

finish

#!/bin/bash
# Two steps of one job share the agent's slab: step 1 prefetches a file
# through the agent, a later step finds its chunks and reads the same bytes
# back without loading again; the agent holds one load all along.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

head -c $((8 << 20)) /dev/urandom >"$T/work/model.bin"
chown "$JOB_USER" "$T/work/model.bin"
sum=$(sha256sum <"$T/work/model.bin" | cut -d' ' -f1)
job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=64MiB -o two.out --wrap "
	echo '== step 1'; srun $AEG_CLI prefetch model.bin --chunk 1MiB
	echo '== step 2'; srun $AEG_CLI status
	echo '== step 3'; srun $AEG_CLI chunks model.bin --verify
	echo '== step 4'; srun $AEG_CLI prefetch model.bin
	echo '== step 5'; srun $AEG_CLI status --json >status.json
	echo '== done'")
check "job submitted" test -n "$job"
wait_job "$job" 60
out=$(cat "$T/work/two.out")
step() { sed -n "/^== step $1\$/,/^== /p" <<<"$out"; }
check "step 1 loads through the agent and reports GB/s ($(step 1))" \
	grep -qE "model.bin: 8 MiB in [0-9.]+ s, [0-9.]+ GB/s through the job's agent \(load 1, 8 chunks in slab 0\)" <<<"$(step 1)"
check "step 2 sees that load, loaded, in the agent's status ($(step 2))" \
	grep -qE "^load 1: $T/work/model.bin -> slab 0, loaded, 8 MiB of 8 MiB, 8 chunks$" <<<"$(step 2)"
check "step 3 reads the same bytes back from the slab ($(step 3))" \
	grep -qF "verified 8 MiB in 8 chunks of load 1 against the file: identical (file bytes 0..8388608, sha256 $sum)" <<<"$(step 3)"
check "step 4: a second prefetch reuses the chunks ($(step 4))" \
	grep -qF "already in the job's slab (load 1, 8 MiB in 8 chunks): reused, nothing loaded" <<<"$(step 4)"
loads=$(/usr/bin/python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(len(d["loads"]), d["loads"][0]["load_id"], d["slabs"][0]["blocks"])' \
	"$T/work/status.json" 2>&1)
check "after all steps: one load in the agent, 8 blocks ($loads)" test "$loads" = "1 1 8"
check "the job ran to its end" grep -qx "== done" <<<"$out"
check "nothing left" nothing_left 10

finish

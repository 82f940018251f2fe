#!/bin/bash
# --aegaeon-prefetch: the agent starts loading at job start, before any step;
# the first step finds each file loading or loaded, waits for it, and reads
# the bytes back; nothing is loaded a second time.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

head -c $((48 << 20)) /dev/urandom >"$T/work/model.bin"
# A small safetensors file: the agent's chunks follow its tensors.
/usr/bin/python3 - "$T/work/tiny.safetensors" <<-'PY'
	import json, struct, sys
	tensors, blob = {}, b""
	for i in range(4):
	    data = bytes((i * 13 + k) % 256 for k in range(1 << 18))
	    tensors[f"layer{i}.weight"] = {"dtype": "F16", "shape": [len(data) // 2],
	                                   "data_offsets": [len(blob), len(blob) + len(data)]}
	    blob += data
	header = json.dumps(tensors).encode()
	header += b" " * (-len(header) % 8)
	open(sys.argv[1], "wb").write(struct.pack("<Q", len(header)) + header + blob)
	PY
chown "$JOB_USER" "$T/work/model.bin" "$T/work/tiny.safetensors"
sum=$(sha256sum <"$T/work/model.bin" | cut -d' ' -f1)
hlen=$(/usr/bin/python3 -c 'import struct, sys; print(struct.unpack("<Q", open(sys.argv[1], "rb").read(8))[0])' "$T/work/tiny.safetensors")
tsum=$(tail -c +$((8 + hlen + 1)) "$T/work/tiny.safetensors" | sha256sum | cut -d' ' -f1)

job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=128MiB --aegaeon-pinned=16MiB:1MiB \
	--aegaeon-prefetch=model.bin,tiny.safetensors -o start.out --wrap "
	echo '== step 1'; srun $AEG_CLI status
	echo '== step 2'; srun $AEG_CLI wait model.bin --timeout 30
	echo '== step 3'; srun $AEG_CLI chunks --verify --timeout 30
	echo '== step 4'; srun $AEG_CLI prefetch tiny.safetensors
	echo '== step 5'; srun $AEG_CLI status --json >status.json
	echo '== done'")
check "job submitted" test -n "$job"
wait_job "$job" 60
out=$(cat "$T/work/start.out")
step() { sed -n "/^== step $1\$/,/^== /p" <<<"$out"; }
check "first step: model.bin is load 1, loading or loaded ($(step 1))" \
	grep -qE "^load 1: $T/work/model.bin -> slab 0, (loading|loaded), .* of 48 MiB, 1 chunk$" <<<"$(step 1)"
check "first step: tiny.safetensors is load 2, loading or loaded" \
	grep -qE "^load 2: $T/work/tiny.safetensors -> slab 0, (loading|loaded), " <<<"$(step 1)"
check "wait on the file named at job start ($(step 2))" \
	grep -qE "^load 1: $T/work/model.bin loaded, 48 MiB in 1 chunk" <<<"$(step 2)"
check "model.bin reads back identical ($sum)" \
	grep -qF "model.bin: verified 48 MiB in 1 chunk of load 1 against the file: identical (file bytes 0..50331648, sha256 $sum)" <<<"$(step 3)"
check "tiny.safetensors: the tensor data reads back identical ($tsum)" \
	grep -qE "tiny.safetensors: verified 1 MiB in [0-9]+ chunks? of load 2 against the file: identical \(file bytes $((8 + hlen))\.\.$((8 + hlen + (1 << 20))), sha256 $tsum\)" <<<"$(step 3)"
check "a step's prefetch of it reuses the job's load ($(step 4))" \
	grep -qF "already in the job's slab (load 2, " <<<"$(step 4)"
loads=$(/usr/bin/python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(len(d["loads"]), *[l["state"] for l in d["loads"]])' \
	"$T/work/status.json" 2>&1)
check "the agent holds the two loads of job start, no more ($loads)" test "$loads" = "2 loaded loaded"
check "the job ran to its end" grep -qx "== done" <<<"$out"
check "nothing left" nothing_left 10

# A model as save_pretrained leaves it, named by its directory at job start:
# the agent reads the index as the job user and loads every shard.
mkdir "$T/work/llama"
/usr/bin/python3 - "$T/work/llama" <<-'PY'
	import json, struct, sys
	d, index = sys.argv[1], {"metadata": {"total_size": 0}, "weight_map": {}}
	for s in range(2):
	    tensors, blob = {"__metadata__": {"format": "pt"}}, b""
	    for i in range(3):
	        data = bytes((s * 31 + i * 7 + k) % 256 for k in range(1 << 18))
	        name = f"model.layers.{s}.mlp.w{i}"
	        tensors[name] = {"dtype": "BF16", "shape": [len(data) // 2], "data_offsets": [len(blob), len(blob) + len(data)]}
	        index["weight_map"][name] = f"model-0000{s + 1}-of-00002.safetensors"
	        blob += data
	    header = json.dumps(tensors).encode()
	    header += b" " * (-len(header) % 8)
	    open(f"{d}/model-0000{s + 1}-of-00002.safetensors", "wb").write(struct.pack("<Q", len(header)) + header + blob)
	json.dump(index, open(f"{d}/model.safetensors.index.json", "w"))
	PY
chown -R "$JOB_USER" "$T/work/llama"
job=$(submit -N1 --gres=gpu:1 --aegaeon-slab=128MiB --aegaeon-pinned=16MiB:1MiB \
	--aegaeon-prefetch=llama -o dir.out --wrap "
	echo '== step 1'; srun $AEG_CLI wait llama --timeout 30
	echo '== step 2'; srun $AEG_CLI chunks llama --verify --timeout 30
	echo '== step 3'; srun $AEG_CLI status --json >dir-status.json
	echo '== step 4'; srun $AEG_CLI release --model llama
	echo '== done'")
check "job with --aegaeon-prefetch=DIR submitted" test -n "$job"
wait_job "$job" 60
out=$(cat "$T/work/dir.out")
check "a step waits for the model by its directory ($(step 1))" grep -qE "loaded" <<<"$(step 1)"
check "every shard reads back identical ($(step 2))" \
	grep -qE "llama: verified 1.5 MiB in [0-9]+ chunks of 2 files .* identical" <<<"$(step 2)"
loads=$(/usr/bin/python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(len(d["loads"]), *[l["state"] for l in d["loads"]])' \
	"$T/work/dir-status.json" 2>&1)
check "the agent loaded each shard at job start ($loads)" test "$loads" = "2 loaded loaded"
check "release --model frees both shards ($(step 4))" grep -qE "released model llama: [0-9]+ blocks in 2 files" <<<"$(step 4)"
check "the job with a model directory ran to its end" grep -qx "== done" <<<"$out"
mkdir "$T/work/nomodel"
chown "$JOB_USER" "$T/work/nomodel"
if out=$(as_user sbatch --parsable -N1 --gres=gpu:1 --aegaeon-slab=64MiB --aegaeon-prefetch=nomodel --wrap true 2>&1); then
	fail "a directory without a model is refused by sbatch (it submitted job $out)"
else
	check "a directory without a model is refused by sbatch, saying why ($out)" grep -q "no model in it" <<<"$out"
fi
check "nothing left after the model directory's job" nothing_left 10

finish

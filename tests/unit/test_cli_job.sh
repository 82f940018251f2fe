#!/bin/bash
# aegaeon-cli inside a job, without Slurm: aegaeond on a temp runtime dir (host
# backend), the AEGAEON_* environment task_init would set, the built CLI.
# Prints TAP-like lines; exit 0 when every check passed (automake's driver).
set -u

B=${top_builddir:-.}
CLI=$B/aegaeon-cli
AGENT=$B/aegaeond
PY=$(command -v python3 || echo /usr/bin/python3)
export AEGAEON_CONFIG=/dev/null
unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_SLAB0_HANDLE AEGAEON_LOG
n=0
failed=0

ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; printf '#   %s\n' "${@:2}"; }

# run CMD...: sets $out (stdout+stderr) and $rc
run() { out=$("$@" 2>&1); rc=$?; }
# expect WHAT RC PATTERN CMD...: CMD exits RC and its output matches the ERE PATTERN
expect() {
	local what=$1 want=$2 pat=$3
	shift 3
	run "$@"
	if [[ $rc -eq $want ]] && grep -qE -- "$pat" <<<"$out"; then
		ok "$what"
	else
		not_ok "$what" "command: $*" "rc $rc (want $want), output:" "$out"
	fi
}
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what" "failed: $*"; fi; }
json() { "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

[[ -x $CLI && -x $AGENT ]] || { echo "no $CLI or $AGENT: build first"; exit 99; }
T=$(mktemp -d /tmp/aeg-cli-job.XXXXXX) || exit 99
AG=
cleanup() {
	[[ -n $AG ]] && kill -KILL "$AG" 2>/dev/null && wait "$AG" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT
mkdir -m 700 "$T/run"

# ------------------------------------------------------------ outside a job
expect "outside a job: chunks says why it cannot" 1 "not in an aegaeon job" "$CLI" chunks
expect "outside a job: release says why" 1 "not in an aegaeon job" "$CLI" release 3
expect "outside a job: a load id is not a handle" 2 "not an event handle" "$CLI" wait 5
expect "outside a job: --no-wait is refused" 2 "--no-wait needs a job's agent" "$CLI" prefetch /dev/null --no-wait
expect "release: ids and --all together are refused" 2 "one of them" "$CLI" release 3 --all
expect "release: a bad id" 2 "'x1' is not a slab id" "$CLI" release x1
expect "chunks: FILE and --load together are refused" 2 "not both" "$CLI" chunks f --load 1
expect "wait: an option without its value says so" 2 "wait: a value is missing after '--timeout'" "$CLI" wait 1 --timeout
for c in prefetch wait chunks release status; do
	expect "$c -h: its usage, exit 0" 0 "^Usage: aegaeon-cli $c" "$CLI" $c -h
done
expect "the command list names chunks" 0 "chunks +inside a job" "$CLI" --help

# ------------------------------------------------------------ the job's agent
export AEGAEON_HOST_GPUS=1
"$AGENT" --job 9 --runtime-dir "$T/run" --gpus 0 --slab 64MiB --pinned 8MiB:1MiB --device host \
	--foreground 2>"$T/agent.log" &
AG=$!
for _ in $(seq 200); do [[ -f $T/run/ready || -f $T/run/error ]] && break; sleep 0.05; done
[[ -f $T/run/ready ]] || { echo "agent did not start:"; cat "$T/agent.log" "$T/run/error" 2>/dev/null; exit 99; }
export AEGAEON_SOCKET=$T/run/agent.sock AEGAEON_DEVICE=host AEGAEON_SLABS=1 AEGAEON_JOB_DIR=$T/run
export AEGAEON_SLAB0_HANDLE=$(sed -n 's/^slab0_handle=//p' "$T/run/ready")

head -c $((5 << 20)) /dev/urandom >"$T/model.bin"
sum=$(sha256sum <"$T/model.bin" | cut -d' ' -f1)

expect "prefetch through the agent reports GB/s" 0 "model.bin: 5 MiB in [0-9.]+ s, [0-9.]+ GB/s through the job's agent \(load 1, 5 chunks in slab 0\)" \
	"$CLI" prefetch "$T/model.bin" --chunk 1MiB
expect "prefetch again reuses the load" 0 "already in the job's slab \(load 1, 5 MiB in 5 chunks\): reused, nothing loaded" \
	"$CLI" prefetch "$T/model.bin"
run "$CLI" status --json
check "status: one load, loaded" test "$(json 'len(d["loads"]), d["loads"][0]["state"], d["loads"][0]["path"]' <<<"$out")" = "1 loaded $T/model.bin"
expect "chunks --verify: the bytes read back are the file's (sha256sum's digest)" 0 "verified 5 MiB in 5 chunks of load 1 against the file: identical \(file bytes 0..5242880, sha256 $sum\)" \
	"$CLI" chunks "$T/model.bin" --verify
run "$CLI" chunks "$T/model.bin" --json
check "chunks --json: 5 chunks covering the file in order" \
	test "$(json '[(c["file_offset"], c["size"]) for c in d["chunks"]] == [(i << 20, 1 << 20) for i in range(5)], d["load_id"], d["state"]' <<<"$out")" = "True 1 loaded"
handle=$(json 'd["chunks"][2]["event_handle"]' <<<"$out")
ids=$(json '" ".join(str(c["slab_id"]) for c in d["chunks"])' <<<"$out")
expect "wait on a chunk's event handle" 0 "" "$CLI" wait "$handle" --timeout 5
expect "wait on a load id" 0 "^load 1: $T/model.bin loaded, 5 MiB in 5 chunks" "$CLI" wait 1
expect "wait on a file" 0 "^load 1: .*loaded" "$CLI" wait "$T/model.bin"
expect "wait on a load that does not exist" 1 "no load 99" "$CLI" wait 99
expect "wait on a file not loaded" 1 "not loaded in this job" "$CLI" wait "$T/agent.log"
# The pool's node as a person reads it: a number, or that it is bound to none (never -1).
expect "status: the pool's line, its NUMA node in words" 0 \
	"^pinned pool: 8 MiB in 8 buffers of 1 MiB, 0 in use, (NUMA node [0-9]+|not bound to a NUMA node)$" "$CLI" status
expect "status --attach maps the slab and pool here" 0 "attached: slab 0 mapped here on GPU 0.*attached: pinned pool mapped here, 8 buffers" \
	bash -c "'$CLI' status --attach | tr '\n' ' '"
for c in status chunks "wait 1"; do
	# shellcheck disable=SC2086
	expect "a bad \$AEGAEON_LOG is said by $c, which logs nothing else" 0 "AEGAEON_LOG='bogus' is not one of debug" \
		env AEGAEON_LOG=bogus "$CLI" $c
done
expect "chunks with no file lists the loads" 0 "^load 1: $T/model.bin -> slab 0, loaded, 5 MiB of 5 MiB, 5 chunks$" "$CLI" chunks

expect "--no-wait --reload: a second load, its id and chunks at once" 0 "^load 2: $T/model.bin -> slab 0, (loading|loaded)" \
	"$CLI" prefetch "$T/model.bin" --reload --no-wait --chunk 2MiB
expect "wait for it by id" 0 "^load 2: .* loaded, 5 MiB in 3 chunks" "$CLI" wait 2 --timeout 10
expect "release --load frees a whole load" 0 "released load 2: 3 blocks" "$CLI" release --load 2
expect "released load is gone" 1 "no load 2" "$CLI" chunks --load 2
: >"$T/empty.bin"
expect "an empty file loads, with no chunk" 0 "^load 3: $T/empty.bin -> slab 0, (loading|loaded), 0 B of 0 B, 0 chunks" \
	"$CLI" prefetch "$T/empty.bin" --no-wait
expect "... and is loaded" 0 "^load 3: .* loaded" "$CLI" wait 3 --timeout 10
expect "release --load of a load with no chunk" 0 "released load 3: 0 blocks" "$CLI" release --load 3
expect "... and it is gone" 1 "no load 3" "$CLI" chunks --load 3
expect "release --load of a load that is gone" 1 "release --load: no load 3 \(released, or never made\)" \
	"$CLI" release --load 3

expect "a local-only option inside a job asks for --local" 2 "--feed works in this process only: add --local" \
	"$CLI" prefetch "$T/model.bin" --feed read
expect "--gpu names a GPU the job has no slab on" 1 "--gpu 3: no slab of the job is on that GPU; its slabs are on GPU 0" \
	"$CLI" prefetch "$T/model.bin" --gpu 3
expect "--local loads in this process, not the agent's (read through its own staging ring)" 0 "GB/s \(read feed" \
	"$CLI" prefetch "$T/model.bin" --local --chunk 1MiB
expect "a missing file" 1 "No such file or directory" "$CLI" prefetch "$T/missing.bin"

# Same size and times, other bytes: the agent cannot tell, the read-back can.
mtime=$(stat -c %.9Y "$T/model.bin")
printf 'X' | dd of="$T/model.bin" bs=1 seek=$((3 * 1048576 + 5)) conv=notrunc status=none
touch -d "@$mtime" "$T/model.bin"
expect "verify finds a byte that differs from the file" 1 "chunk 3 \(slab id [0-9]+\) differs from $T/model.bin at file offset 3145733" \
	"$CLI" chunks "$T/model.bin" --verify
# A changed file (new mtime) is stale: listed as such, loaded again by prefetch.
touch "$T/model.bin"
expect "a file changed since its load is stale" 1 "changed since load 1 read it" "$CLI" chunks "$T/model.bin"
expect "prefetch loads a changed file again" 0 "loading it again.*through the job's agent \(load 4," \
	bash -c "'$CLI' prefetch '$T/model.bin' --verify 2>&1 | tr '\n' ' '"

# A load some of whose chunks were released by slab id is no longer the file: listed as partly
# released with the bytes it holds, never reused or found by path, and --verify says it is short.
head -c $((3 << 20)) /dev/urandom >"$T/part.bin"
run "$CLI" prefetch "$T/part.bin" --chunk 1MiB --json
pl=$(json 'd["load_id"]' <<<"$out")
pids=$(json '" ".join(str(c["slab_id"]) for c in d["chunks"][:2])' <<<"$out")
# shellcheck disable=SC2086
expect "release 2 of a load's 3 chunks by slab id" 0 "released 2 blocks from slab 0" "$CLI" release $pids
expect "status: a partly released load, with the bytes it holds" 0 \
	"load $pl: $T/part.bin -> slab 0, partly released, 1 MiB of 3 MiB held, 1 chunk$" "$CLI" status
expect "chunks --load: partly released too" 0 "^load $pl: .*partly released, 1 MiB of 3 MiB held, 1 chunk$" \
	"$CLI" chunks --load "$pl"
run "$CLI" status --json
check "status --json: its state, the bytes held, the chunk count" \
	test "$(json '[(l["state"], l["done_bytes"], l["chunk_count"]) for l in d["loads"] if l["load_id"] == '"$pl"']' <<<"$out")" = "[('partly released', 1048576, 1)]"
expect "wait for a partly released load fails: it is not the file" 1 \
	"load $pl of $T/part.bin is partly released: 1 MiB of 3 MiB held in 1 chunk" "$CLI" wait "$pl"
expect "chunks --verify of a partly released load fails: the chunks do not cover the file" 1 \
	"verify: load $pl of $T/part.bin holds 1 MiB of its 3 MiB: some of its chunks were released" \
	"$CLI" chunks --load "$pl" --verify
expect "prefetch does not reuse it: the file is loaded again" 0 "^$T/part.bin: 3 MiB in .* through the job's agent" \
	"$CLI" prefetch "$T/part.bin" --chunk 1MiB
expect "... whole: --verify checks all 3 MiB" 0 "verified 3 MiB in 3 chunks of load [0-9]+ against the file: identical" \
	"$CLI" prefetch "$T/part.bin" --verify
expect "release --load frees what is left of the partly released load" 0 "released load $pl: 1 block$" \
	"$CLI" release --load "$pl"

# One key set for a load, loaded by the agent or by this process.
run "$CLI" prefetch "$T/part.bin" --reload --json
jk=$(json '" ".join(sorted(d))' <<<"$out")
run "$CLI" prefetch "$T/part.bin" --local --json
lk=$(json '" ".join(sorted(d))' <<<"$out")
common="chunk_bytes chunks done_bytes file_bytes gbps load_id path seconds slab state tensors"
check "prefetch --json: a load's keys in a job ($jk)" "$PY" -c 'import sys; assert set(sys.argv[2].split()) <= set(sys.argv[1].split())' "$jk" "$common"
check "prefetch --local --json: the same keys ($lk)" "$PY" -c 'import sys; assert set(sys.argv[2].split()) <= set(sys.argv[1].split())' "$lk" "$common"
expect "prefetch --local --json: chunk_bytes is the chunk used (one of the 3 MiB file)" 0 '"chunk_bytes": 3145728,' \
	"$CLI" prefetch "$T/part.bin" --local --json

# Release by slab id: all checked first, then freed.
first=${ids%% *}
expect "release an id no chunk holds" 1 "999999" "$CLI" release 999999
expect "release by slab id" 0 "released 1 block from slab 0" "$CLI" release "$first"
expect "release --all" 0 "released [0-9]+ blocks: every load" "$CLI" release --all
run "$CLI" status --json
check "after release --all: no load, slab empty" \
	test "$(json 'len(d["loads"]), d["slabs"][0]["used_bytes"], d["slabs"][0]["blocks"]' <<<"$out")" = "0 0 0"

# A safetensors file: chunks follow the tensors; the digest covers the data.
"$PY" - "$T/tiny.safetensors" <<-'PY'
	import json, struct, sys
	tensors, blob = {}, b""
	for i in range(3):
	    data = bytes((i * 37 + k) % 251 for k in range(300000))
	    tensors[f"w{i}"] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [len(blob), len(blob) + len(data)]}
	    blob += data
	header = json.dumps(tensors).encode()
	header += b" " * (-len(header) % 8)
	with open(sys.argv[1], "wb") as f:
	    f.write(struct.pack("<Q", len(header)) + header + blob)
	PY
hlen=$("$PY" -c 'import struct, sys; print(struct.unpack("<Q", open(sys.argv[1], "rb").read(8))[0])' "$T/tiny.safetensors")
dsum=$(tail -c +$((8 + hlen + 1)) "$T/tiny.safetensors" | sha256sum | cut -d' ' -f1)
expect "safetensors: prefetch --verify checks the tensor data" 0 "verified 878.91 KiB in [0-9]+ chunks .*file bytes $((8 + hlen))\.\.$((8 + hlen + 900000)), sha256 $dsum\)" \
	"$CLI" prefetch "$T/tiny.safetensors" --verify --chunk 256KiB
expect "release --all again" 0 "released" "$CLI" release --all

# A model as save_pretrained leaves it: a directory of shards and an index.
mkdir "$T/llama"
"$PY" - "$T/llama" <<-'PY'
	import json, struct, sys
	d, index = sys.argv[1], {"metadata": {"total_size": 0}, "weight_map": {}}
	for s in range(3):
	    tensors, blob = {"__metadata__": {"format": "pt"}}, b""
	    for i in range(2):
	        data = bytes((s * 91 + i * 37 + k) % 251 for k in range(200000 + 4096 * s))
	        name = f"layers.{s}.w{i}"
	        tensors[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [len(blob), len(blob) + len(data)]}
	        index["weight_map"][name] = f"model-0000{s + 1}-of-00003.safetensors"
	        blob += data
	    header = json.dumps(tensors).encode()
	    header += b" " * (-len(header) % 8)
	    with open(f"{d}/model-0000{s + 1}-of-00003.safetensors", "wb") as f:
	        f.write(struct.pack("<Q", len(header)) + header + blob)
	with open(f"{d}/model.safetensors.index.json", "w") as f:
	    json.dump(index, f)
	PY
expect "a model directory: prefetch --verify loads and checks every shard" 0 "llama: verified [0-9.]+ [KM]iB in [0-9]+ chunks of 3 files .*identical" \
	"$CLI" prefetch "$T/llama" --verify --chunk 256KiB
run "$CLI" status --json
check "status: a load per shard" test "$(json 'len(d["loads"])' <<<"$out")" = 3
expect "wait on the model by its directory" 0 "loaded" "$CLI" wait "$T/llama"
expect "chunks of the model by its index file" 0 "llama/model.safetensors.index.json: verified .* of 3 files" \
	"$CLI" chunks "$T/llama/model.safetensors.index.json" --verify
expect "prefetch of the directory again reuses every shard" 0 "already in the job's slab" "$CLI" prefetch "$T/llama"
# A load per file: prefetch names each file's id, and wait and release take the one named.
check "... and names each file's load" grep -qE "^  load [0-9]+: $T/llama/model-00003-of-00003.safetensors$" <<<"$out"
run "$CLI" prefetch "$T/llama" --json
ids=$(json '" ".join(str(f["load_id"]) for f in d["files"])' <<<"$out")
check "prefetch --json lists the 3 files with their load ids ($ids)" \
	test "$(json '[f["path"].rsplit("/", 1)[1] for f in d["files"]]' <<<"$out")" = \
	"['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors']"
expect "wait on the third file's load id" 0 "model-00003-of-00003.safetensors loaded" "$CLI" wait "${ids##* }"
run "$CLI" status --json
check "... still a load per shard" test "$(json 'len(d["loads"])' <<<"$out")" = 3
expect "release --model frees every shard" 0 "released model $T/llama: [0-9]+ blocks in 3 files" \
	"$CLI" release --model "$T/llama"
run "$CLI" status --json
check "... and nothing is left" test "$(json 'len(d["loads"]), d["slabs"][0]["used_bytes"]' <<<"$out")" = "0 0"
rm "$T/llama/model-00002-of-00003.safetensors"
expect "a model with a missing shard is refused, naming it" 1 "model-00002-of-00003.safetensors: No such file" \
	"$CLI" prefetch "$T/llama"
run "$CLI" status --json
check "... and leaves no load behind" test "$(json 'len(d["loads"])' <<<"$out")" = 0
expect "release --model and --all together are refused" 2 "one of them" "$CLI" release --all --model "$T/llama"

# A shard of an index that is no safetensors file, and not named as one: the agent takes it for
# raw bytes and loads it, the CLI reads it as a shard; the load is refused and given back.
mkdir "$T/mixed"
cp "$T/llama/model-00001-of-00003.safetensors" "$T/mixed/"
head -c 300000 /dev/urandom >"$T/mixed/weights.bin"
printf '{"weight_map": {"a": "model-00001-of-00003.safetensors", "w": "weights.bin"}}' \
	>"$T/mixed/model.safetensors.index.json"
expect "a shard that is not safetensors is refused, naming it" 1 "mixed/weights.bin: safetensors: " \
	"$CLI" prefetch "$T/mixed"
run "$CLI" status --json
check "... and leaves no load, no block behind" \
	test "$(json 'len(d["loads"]), d["slabs"][0]["used_bytes"]' <<<"$out")" = "0 0"
# A FIFO named as the index would wait for a writer forever: refused at once.
mkdir "$T/fifo"
cp "$T/llama/model-00001-of-00003.safetensors" "$T/fifo/"
mkfifo "$T/fifo/model.safetensors.index.json"
expect "a FIFO named as the index is refused at once" 1 "model.safetensors.index.json: not a regular file" \
	timeout 10 "$CLI" prefetch "$T/fifo"

# The agent gone: a clear error, not a hang.
kill -TERM "$AG"; wait "$AG"; AG=
expect "agent gone: status says so" 1 "connecting to the job's agent at .*not running" "$CLI" status
expect "agent gone: prefetch says so" 1 "not running" "$CLI" prefetch "$T/tiny.safetensors"
check "agent log names each load" grep -q "load 1: $T/model.bin into the slab of GPU 0, 5 chunks" "$T/agent.log"

# A slab smaller than the site's chunk (64 MiB by default): a small file is one chunk of its size,
# at the job's start (--prefetch) and later.
head -c 100000 /dev/urandom >"$T/s1.bin"
head -c 200000 /dev/urandom >"$T/s2.bin"
mkdir -m 700 "$T/run8"
"$AGENT" --job 10 --runtime-dir "$T/run8" --gpus 0 --slab 8MiB --device host --prefetch "$T/s1.bin" \
	--foreground 2>"$T/agent8.log" &
AG=$!
for _ in $(seq 200); do [[ -f $T/run8/ready || -f $T/run8/error ]] && break; sleep 0.05; done
check "an 8 MiB slab: --prefetch of a 98 KiB file starts ($(cat "$T/run8/error" 2>/dev/null))" test -f "$T/run8/ready"
export AEGAEON_SOCKET=$T/run8/agent.sock AEGAEON_JOB_DIR=$T/run8
export AEGAEON_SLAB0_HANDLE=$(sed -n 's/^slab0_handle=//p' "$T/run8/ready")
expect "... and loaded it as one chunk" 0 "^load 1: .* loaded, 97.66 KiB in 1 chunk " "$CLI" wait "$T/s1.bin" --timeout 10
expect "an 8 MiB slab: prefetch of a 195 KiB file in the site's chunk, one chunk of it" 0 \
	"s2.bin: 195.31 KiB in .* through the job's agent \(load 2, 1 chunk in slab 0\)" "$CLI" prefetch "$T/s2.bin" --verify
kill -TERM "$AG"; wait "$AG"; AG=

echo "1..$n"
echo "$((n - failed)) passed, $failed failed"
[[ $failed -eq 0 ]]

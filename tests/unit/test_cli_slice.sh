#!/bin/bash
# aegaeon-cli prefetch of tensor-parallel slices (--tp-*), on the host backend:
# in this process and through a real aegaeond as a job has one. Every rank's
# parts are checked against the file byte for byte: Python cuts each tensor's
# part out of the file (the rows of the split dimension's run) and hashes them
# in file order, which must be the digest the command's read-back (--verify)
# prints, with the shapes and offsets its JSON lists. Then status, chunks
# --verify (tensor by tensor, never the file's contiguous bytes), a byte
# changed in and outside a rank's part, and every bad option.
# TAP-like lines; exit 0 when all passed.
set -u -f      # no globbing: rule patterns travel unquoted in word lists

B=${top_builddir:-.}
CLI=$B/aegaeon-cli
AGENT=$B/aegaeond
PY=$(command -v python3 || echo /usr/bin/python3)
export AEGAEON_CONFIG=/dev/null AEGAEON_DEVICE=host AEGAEON_HOST_GPUS=1
unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_SLAB0_HANDLE AEGAEON_JOB_DIR AEGAEON_LOG
source "${top_srcdir:-$(dirname "$0")/../..}/tests/tap.sh"

[[ -x $CLI && -x $AGENT ]] || { echo "no $CLI or $AGENT: build first"; exit 99; }
T=$(mktemp -d /tmp/aeg-cli-slice.XXXXXX) || exit 99
AG=
cleanup() {
	[[ -n $AG ]] && kill -KILL "$AG" 2>/dev/null && wait "$AG" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT

# slices.py write DIR: a model file and a directory of two shards with an index.
# slices.py check RANK WORLD UNEVEN RULE... < JSON: the command's parts and digest
# against the file's, as the slice spec (preset none, RULE PATTERN=DIM) cuts them.
cat >"$T/slices.py" <<-'PY'
	import fnmatch, hashlib, json, os, struct, sys
	ITEM = {"F32": 4, "F16": 2, "U8": 1, "I64": 8}

	def st_bytes(tensors):
	    header, blob = {}, b""
	    for name, (dtype, shape, seed) in tensors.items():
	        n = ITEM[dtype]
	        for d in shape:
	            n *= d
	        raw = bytes((seed * 131 + k * 7 + k // 251) % 256 for k in range(n))
	        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + n]}
	        blob += raw
	    h = json.dumps(header).encode()
	    h += b" " * (-len(h) % 8)
	    return struct.pack("<Q", len(h)) + h + blob

	def write(d):
	    one = {"layers.0.col.weight": ("F32", [12, 10], 1), "layers.0.row.weight": ("F16", [6, 14], 2),
	           "layers.0.norm.weight": ("F32", [10], 3), "layers.0.col.bias": ("F32", [12], 4),
	           "layers.0.cube.weight": ("U8", [3, 8, 5], 5), "layers.0.small.weight": ("I64", [4, 2], 6),
	           "layers.0.q_proj.weight": ("F16", [8, 6], 7), "layers.0.o_proj.weight": ("F32", [6, 8], 8)}
	    with open(os.path.join(d, "model.safetensors"), "wb") as f:
	        f.write(st_bytes(one))
	    os.makedirs(os.path.join(d, "sharded"))
	    names = list(one)
	    wmap = {}
	    for i, part in enumerate((names[:4], names[4:])):
	        shard = "model-%05d-of-00002.safetensors" % (i + 1)
	        with open(os.path.join(d, "sharded", shard), "wb") as f:
	            f.write(st_bytes({k: one[k] for k in part}))
	        wmap.update({k: shard for k in part})
	    with open(os.path.join(d, "sharded", "model.safetensors.index.json"), "w") as f:
	        json.dump({"metadata": {}, "weight_map": wmap}, f)

	def header(path):
	    with open(path, "rb") as f:
	        n = struct.unpack("<Q", f.read(8))[0]
	        h = json.loads(f.read(n))
	        data = f.read()
	    return 8 + n, [(k, v) for k, v in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0])
	                   if k != "__metadata__"], data

	def part(name, t, data, base, rank, world, uneven, rules):
	    """(expected JSON of the part, its bytes) as the file holds them."""
	    dim = next((d for pat, d in rules if fnmatch.fnmatchcase(name, pat)), -1)
	    shape, begin = t["shape"], t["data_offsets"][0]
	    raw = data[begin:t["data_offsets"][1]]
	    if dim < 0:
	        return {"shape": shape, "slice_dim": None, "file_offset": base + begin, "size": len(raw)}, raw
	    ext = shape[dim]
	    assert uneven or ext % world == 0, (name, ext)
	    per = -(-ext // world)
	    start = min(rank * per, ext)
	    n = min(per, ext - start)
	    outer = 1
	    for d in shape[:dim]:
	        outer *= d
	    inner = len(raw) // (outer * ext) if outer * ext else 0
	    out = b"".join(raw[(r * ext + start) * inner:(r * ext + start + n) * inner] for r in range(outer))
	    want = {"shape": shape[:dim] + [n] + shape[dim + 1:], "slice_dim": dim, "slice_start": start,
	            "slice_extent": ext, "file_offset": base + begin + start * inner, "size": len(out)}
	    return want, out

	def check(rank, world, uneven, rule_args, doc):
	    rules = [(r.rsplit("=", 1)[0], -1 if r.endswith("=whole") else int(r.rsplit("=", 1)[1])) for r in rule_args]
	    got = {(p["file"], p["name"]): p for p in doc["parts"]}
	    sha, problems, files = hashlib.sha256(), [], []
	    for p in doc["parts"]:
	        if p["file"] not in files:
	            files.append(p["file"])
	    for path in files:
	        base, tensors, data = header(path)
	        for name, t in tensors:
	            want, raw = part(name, t, data, base, rank, world, uneven, rules)
	            have = got.pop((path, name), None)
	            have = {k: have.get(k) for k in want} if have else None
	            if have != want:
	                problems.append("%s: got %s, want %s" % (name, have, want))
	            sha.update(raw)
	    if got:
	        problems.append("parts of no tensor: %s" % sorted(got))
	    if doc["verified"]["sha256"] != sha.hexdigest():
	        problems.append("digest %s, the file's parts %s" % (doc["verified"]["sha256"], sha.hexdigest()))
	    if doc["slice"]["rank"] != rank or doc["slice"]["world"] != world or doc["slice"]["uneven"] != uneven:
	        problems.append("slice %s" % doc["slice"])
	    print("\n".join(problems) or "ok")

	if sys.argv[1] == "write":
	    write(sys.argv[2])
	else:
	    doc = json.load(sys.stdin)
	    check(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:], doc)
PY
"$PY" "$T/slices.py" write "$T" || exit 99
M=$T/model.safetensors

# parts WHAT RANK WORLD UNEVEN "RULES" CMD...: CMD's JSON (prefetch --verify --json, or
# chunks --verify --json) has the parts the file gives RANK of WORLD, and their digest.
parts() {
	local what=$1 rank=$2 world=$3 uneven=$4 rules=$5 msg
	shift 5
	run "$@"
	# shellcheck disable=SC2086
	if [[ $rc -eq 0 ]] && msg=$("$PY" "$T/slices.py" check "$rank" "$world" "$uneven" $rules <<<"$out" 2>&1) &&
		[[ $msg == ok ]]; then
		ok "$what"
	else
		not_ok "$what" "command: $*" "rc $rc: ${msg:-}" "$out"
	fi
}
tp() { echo "--tp-rank $1 --tp-world $2 --tp-preset none $(for r in $3; do printf -- "--tp-rule %s " "$r"; done)"; }

# ------------------------------------------------------------ in this process
R2="*.col.weight=0 *.col.bias=0 *.row.weight=1 *.cube.weight=1 *.norm.weight=whole"
for rank in 0 1; do
	# shellcheck disable=SC2046
	parts "world 2, rank $rank, dims 0 and 1: each part is the file's" $rank 2 0 "$R2" \
		"$CLI" prefetch "$M" $(tp $rank 2 "$R2") --chunk 4KiB --verify --json
done
R3="*.col.weight=1 *.row.weight=0 *.cube.weight=2 *.small.weight=0 *.col.bias=0"
for rank in 0 1 2; do
	# shellcheck disable=SC2046
	parts "world 3 --tp-uneven, rank $rank: the last ranks take less (rank 2 nothing of a 4-row tensor)" \
		$rank 3 1 "$R3" "$CLI" prefetch "$M" $(tp $rank 3 "$R3") --tp-uneven --verify --json
done
parts "world 1: every part is the whole tensor" 0 1 0 "*.q_proj.weight=0 *.o_proj.weight=1" \
	"$CLI" prefetch "$M" --tp-rank 0 --tp-world 1 --verify --json
parts "the megatron preset by default: q_proj by rows, o_proj by columns" 1 2 0 "*.q_proj.weight=0 *.o_proj.weight=1" \
	"$CLI" prefetch "$M" --tp-rank 1 --tp-world 2 --verify --json
expect "text: the slice and its split tensors, and the read-back of the parts" 0 \
	"slice rank 1 of 3 \(2 rules, uneven\): 2 of 8 tensors split, 6 whole.*verified [0-9]+ B of this rank's parts of 8 tensors \(2 split\)" \
	bash -c "set -o pipefail; '$CLI' prefetch '$M' --tp-rank 1 --tp-world 3 --tp-preset none --tp-rule '*.col.weight=1' --tp-rule '*.cube.weight=2' --tp-uneven --verify | tr '\n' ' '"
expect "an extent no multiple of the world: refused, naming the tensor and --tp-uneven" 1 \
	"tensor \"layers.0.col.weight\" of shape \[12, 10\] has 10 along dim 1, not a multiple of the 3 ranks.*--tp-uneven" \
	bash -c "set -o pipefail; '$CLI' prefetch '$M' --tp-rank 0 --tp-world 3 --tp-preset none --tp-rule '*.col.weight=1' 2>&1 | tr '\n' ' '"
expect "a dimension a tensor lacks: refused, naming it" 1 "tensor \"layers.0.norm.weight\" of shape \[10\] has no dim 1" \
	"$CLI" prefetch "$M" --tp-rank 0 --tp-world 2 --tp-rule '*.norm.weight=1'
# A directory of shards and its index in this process: the slab holds every file
# (it was sized by the directory's own st_size, and every load of one failed).
# shellcheck disable=SC2046
parts "a sharded directory in this process, world 2: each shard's parts" 1 2 0 "$R2" \
	"$CLI" prefetch "$T/sharded" $(tp 1 2 "$R2") --verify --json
expect "a whole sharded directory in this process, read back" 0 "verified [0-9.]+ KiB in [0-9]+ chunks of 2 files.*identical" \
	"$CLI" prefetch "$T/sharded" --verify
expect "its shard index in this process, read back" 0 "verified [0-9.]+ KiB in [0-9]+ chunks of 2 files.*identical" \
	"$CLI" prefetch "$T/sharded/model.safetensors.index.json" --verify
# Two 3 MiB shards, more than the smallest slab (2 MiB): a slab sized by the directory took neither.
"$PY" - "$T/big" <<-'PY' || exit 99
	import json, os, struct, sys
	os.mkdir(sys.argv[1])
	for i in (1, 2):
	    n = 3 << 20
	    head = json.dumps({"w%d" % i: {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
	    with open(os.path.join(sys.argv[1], "part-%d.safetensors" % i), "wb") as f:
	        f.write(struct.pack("<Q", len(head)) + head + os.urandom(n))
	PY
expect "a directory of two 3 MiB shards in this process, read back" 0 \
	"big: 6 MiB in .*verified 6 MiB in 6 chunks of 2 files.*identical" \
	bash -c "set -o pipefail; '$CLI' prefetch '$T/big' --chunk 1MiB --verify | tr '\n' ' '"
mkdir "$T/no-model"
expect "a directory with no model in it, in this process" 1 "no-model: no model in it" "$CLI" prefetch "$T/no-model"
head -c 10000 /dev/urandom >"$T/raw.bin"
expect "a raw file cannot be sliced" 1 "raw.bin: not a safetensors file: a tensor-parallel slice needs its tensors" \
	"$CLI" prefetch "$T/raw.bin" --tp-rank 0 --tp-world 2

# ------------------------------------------------------------ bad options
long=$(printf 'p%.0s' $(seq 300))
many=(); for i in $(seq 65); do many+=(--tp-rule "r$i=0"); done
bad() { expect "bad options: $1" 2 "$2" "$CLI" prefetch "$M" "${@:3}"; }
bad "a rank without a world" "^aegaeon-cli prefetch: --tp-rank needs --tp-world" --tp-rank 1
bad "a world without a rank" "--tp-world needs --tp-rank" --tp-world 2
bad "a rule without rank and world" "--tp-rule needs --tp-rank and --tp-world" --tp-rule 'a=0'
bad "--tp-uneven alone" "--tp-uneven needs --tp-rank and --tp-world" --tp-uneven
bad "a rank that is no number" "--tp-rank 'x': expected a rank 0..4095" --tp-rank x --tp-world 2
bad "a negative rank" "--tp-rank '-1': expected a rank 0..4095" --tp-rank -1 --tp-world 2
bad "a world of 0" "--tp-world '0': expected a world size 1..4096" --tp-rank 0 --tp-world 0
bad "a world over the limit" "--tp-world '5000': expected a world size 1..4096" --tp-rank 0 --tp-world 5000
bad "a rank not in the world" "slice rank 2: must be 0..1 for a world of 2" --tp-rank 2 --tp-world 2
bad "an unknown preset" "--tp-preset: slice preset \"tp\": expected none, megatron or vllm" --tp-rank 0 --tp-world 2 --tp-preset tp
bad "a rule without '='" "--tp-rule 'col': expected PATTERN=DIM or PATTERN=whole" --tp-rank 0 --tp-world 2 --tp-rule col
bad "a rule without a pattern" "--tp-rule '=0': expected PATTERN=DIM" --tp-rank 0 --tp-world 2 --tp-rule =0
bad "a rule's dimension that is no number" "--tp-rule 'a=x': dimension 'x': expected a number from 0 or 'whole'" \
	--tp-rank 0 --tp-world 2 --tp-rule a=x
bad "a rule's dimension over the limit" "slice rule 0 \(\"a\"\): dim 40: must be 0..31" --tp-rank 0 --tp-world 2 --tp-rule a=40
bad "a pattern over the limit" "slice rule 0: pattern \"p+\.\.\.\" of 300 bytes, at most 255" \
	--tp-rank 0 --tp-world 2 --tp-rule "$long=0"
bad "too many rules" "--tp-rule 'r65=0': more than 64 rules" --tp-rank 0 --tp-world 2 "${many[@]}"
expect "bench prefetch takes no slice" 2 "the --tp-\* options \(a tensor-parallel slice\) are options of prefetch" "$CLI" bench prefetch "$M" --tp-rank 0
expect "--help names the options" 0 "--tp-rank R --tp-world W \[--tp-preset megatron\|vllm\|none\]" "$CLI" prefetch --help

# ------------------------------------------------------------ the job's agent
tap_agent "$T/run" 64MiB 8MiB:1MiB

for rank in 0 1 2; do
	# shellcheck disable=SC2046
	parts "job: world 3 --tp-uneven, rank $rank, through the agent" $rank 3 1 "$R3" \
		"$CLI" prefetch "$M" $(tp $rank 3 "$R3") --tp-uneven --chunk 4KiB --verify --json
done
expect "job: the same slice again is reused" 0 "already in the job's slab \(load 2," \
	"$CLI" prefetch "$M" $(tp 1 3 "$R3") --tp-uneven
expect "job: a whole load of the file is another load" 0 "through the job's agent \(load 4," "$CLI" prefetch "$M"
expect "status marks the sliced loads, not the whole one" 0 \
	"\|load 1: $M -> slab 0, loaded, [^|]*, slice rank 0 of 3 \(5 rules, uneven\)\|load 2: [^|]*slice rank 1 of 3 [^|]*\|load 3: [^|]*slice rank 2 of 3 [^|]*\|load 4: [^|]*chunks?\|$" \
	bash -c "set -o pipefail; '$CLI' status | tr '\n' '|'"
run "$CLI" status --json
check "status --json: each load's slice in short, null for the whole one" test \
	"$("$PY" -c 'import json, sys; print([l["slice"] and (l["slice"]["rank"], l["slice"]["world"], l["slice"]["preset"], l["slice"]["uneven"], l["slice"]["rule_count"]) for l in json.load(sys.stdin)["loads"]])' <<<"$out")" = \
	"[(0, 3, 'none', True, 5), (1, 3, 'none', True, 5), (2, 3, 'none', True, 5), None]"
expect "chunks --load: the parts with their shapes and where each starts" 0 \
	"slice rank 2 of 3 \(5 rules, uneven\): 5 of 8 tensors split, 3 whole .* F32 +\[12, 2\] +dim 1: 8\.\.10 of 10 .* layers\.0\.col\.weight .* I64 +\[0, 2\] +dim 0: 4\.\.4 of 4 .* layers\.0\.small\.weight" \
	bash -c "set -o pipefail; '$CLI' chunks --load 3 | tr '\n' ' '"
parts "job: chunks --load --verify --json checks a later step's view of the parts" 2 3 1 "$R3" \
	"$CLI" chunks --load 3 --verify --json
expect "chunks --verify: every load, sliced ones tensor by tensor" 0 \
	"load 1: .*verified [0-9]+ B of this rank's parts of 8 tensors \(5 split\) in [0-9]+ chunks? of load 1 .*load 4: .*verified [0-9.]+ KiB in [0-9]+ chunks? of load 4 against the file: identical" \
	bash -c "set -o pipefail; '$CLI' chunks --verify | tr '\n' ' '"

# A byte of rank 1's part of layers.0.row.weight (split by rows: its rows 2..3 of 6) changed,
# and one of rank 0's rows, with the file's size and times kept: rank 1's read-back sees only its own.
off=$("$PY" -c '
import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n))
t = h["layers.0.row.weight"]; print(8 + n + t["data_offsets"][0])' "$M")
mtime=$(stat -c %.9Y "$M")
flip() { printf "\\x$(printf %02x $(( ($(od -An -tu1 -j "$1" -N1 "$M") + 1) % 256 )))" | dd of="$M" bs=1 seek="$1" conv=notrunc status=none; touch -d "@$mtime" "$M"; }
flip $((off + 5))                               # row 0: rank 0's
expect "a byte changed outside rank 1's part: its read-back still matches" 0 "load 2: .*identical" \
	bash -c "set -o pipefail; '$CLI' chunks --load 2 --verify | tr '\n' ' '"
flip $((off + 2 * 14 * 2 + 3))                  # row 2, byte 3: rank 1's
expect "a byte changed inside rank 1's part: named by tensor, part and file offset" 1 \
	"verify: tensor \"layers.0.row.weight\" \(indices 2\.\.4 of 6 along dim 0\) differs from $M at file offset $((off + 59))" \
	"$CLI" chunks --load 2 --verify
expect "release --all" 0 "released" "$CLI" release --all

# A directory of shards, each file's parts; reused by an equal spec only.
parts "job: a sharded directory, world 2, dims 0 and 1 in both shards" 1 2 0 "$R2" \
	"$CLI" prefetch "$T/sharded" $(tp 1 2 "$R2") --verify --json
expect "job: the directory's slice again is reused" 0 "already in the job's slab" "$CLI" prefetch "$T/sharded" $(tp 1 2 "$R2")
expect "job: another rank is loaded, not reused" 0 "through the job's agent \(2 chunks in slab 0\)" "$CLI" prefetch "$T/sharded" $(tp 0 2 "$R2")

kill -TERM "$AG"; wait "$AG"; AG=
tap_end

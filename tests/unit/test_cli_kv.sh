#!/bin/bash
# aegaeon-cli kv bench on the host backend: usage errors (exit 2), the table
# and --json (every way, each direction and both at once, bit-exact), the
# per-layer layout, and a run inside a job through a real aegaeond's slab and
# pinned pool. Prints TAP-like lines; exit 0 when every check passed.
set -u

B=${top_builddir:-.}
CLI=$B/aegaeon-cli
AGENT=$B/aegaeond
PY=$(command -v python3 || echo /usr/bin/python3)
export AEGAEON_CONFIG=/dev/null AEGAEON_HOST_GPUS=1
unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_SLAB0_HANDLE AEGAEON_LOG AEGAEON_DEVICE
source "${top_srcdir:-$(dirname "$0")/../..}/tests/tap.sh"
# json_check WHAT EXPR: the last run's stdout parses and EXPR (on d) is true
json_check() {
	local what=$1 res
	res=$("$PY" -c "import json, sys; d = json.loads(sys.stdin.read()); print(bool($2))" <<<"$out" 2>&1)
	if [[ $rc -eq 0 && $res == True ]]; then ok "$what"; else not_ok "$what" "rc $rc, check: $res" "$out"; fi
}

[[ -x $CLI && -x $AGENT ]] || { echo "no $CLI or $AGENT: build first"; exit 99; }

# ------------------------------------------------------------ usage errors
expect "kv without a subcommand" 2 "expected a subcommand: bench" "$CLI" kv
expect "kv with an unknown subcommand" 2 "unknown subcommand 'go'" "$CLI" kv go
expect "an unknown option" 2 "unknown option '--fast'" "$CLI" kv bench --fast
expect "an option without its value" 2 "a value is missing after '--block'" "$CLI" kv bench --block
expect "a block size not a multiple of 256" 2 "--block '1000': a KV block is a multiple of 256" "$CLI" kv bench --block 4KiB,1000
expect "a block size over 64 MiB" 2 "--block '128MiB'" "$CLI" kv bench --block 128MiB
expect "a size that is no size" 2 "--block: " "$CLI" kv bench --block 4XB
expect "blocks that do not split into layers" 2 "--block 4 KiB with --layers 3: a block must split into 6 K and V pieces" \
	"$CLI" kv bench --block 4KiB --layers 3
expect "layers out of range" 2 "--layers '5000' is not a count in 0..1024" "$CLI" kv bench --layers 5000
expect "--repeat 0" 2 "--repeat '0' is not a count in 1..10000" "$CLI" kv bench --repeat 0
expect "--blocks -1" 2 "--blocks '-1' is not a count" "$CLI" kv bench --blocks -1
expect "--bytes 0" 2 "--bytes '0'" "$CLI" kv bench --bytes 0
expect "--pattern other" 2 "--pattern 'zigzag': seq or random" "$CLI" kv bench --pattern zigzag
expect "--device that is no backend" 2 "--device 'tpu'" "$CLI" kv bench --device tpu
expect "--gpu not a number" 2 "--gpu 'one' is not a GPU ordinal" "$CLI" kv bench --gpu one
expect "a second subcommand" 2 "unexpected argument 'again'" "$CLI" kv bench again
expect "--help" 0 "Usage: aegaeon-cli kv bench" "$CLI" kv bench --help
expect "--tune needs the cuda backend" 1 "cuda backend only \(this is host\)" "$CLI" kv bench --device host --tune
expect "a GPU the backend does not have" 1 "GPU" "$CLI" kv bench --device host --gpu 3 --block 4KiB --blocks 4

# ------------------------------------------------------------ standalone
expect "table: every size each way and both at once, labelled as host figures, checked" 0 \
	"host backend: these are host memcpy speeds, not GPU figures" \
	"$CLI" kv bench --device host --block 4KiB,64KiB,2MiB --bytes 4MiB --repeat 2
for d in out in both; do
	grep -qE "^  2 MiB +2 MiB +2 $d +[0-9.]+ +[0-9.]+ +- " <<<"$out" &&
		ok "table: a 2 MiB row for '$d' with aegaeon and per-block figures" ||
		not_ok "table: a 2 MiB row for '$d'" "$out"
done
grep -q "every piece checked bit-exact" <<<"$out" && ok "table: the check line" || not_ok "table: the check line" "$out"

run "$CLI" kv bench --device host --block 4KiB,32KiB,2MiB --bytes 4MiB --repeat 2 --pattern seq --json
json_check "--json: host backend, standalone, three sizes, every way measured but batch, all verified" \
	'd["backend"] == "host" and not d["in_job"] and "not GPU figures" in d["note"] and d["verified"] and
	 [r["block_bytes"] for r in d["results"]] == [4096, 32768, 2 << 20] and
	 all(r["verified"] and r[k]["aegaeon"] > 0 and r[k]["per_block"] > 0 and r[k]["batch"] is None
	     for r in d["results"] for k in ("out", "in", "both")) and
	 [r["blocks"] for r in d["results"]] == [1024, 128, 2]'

run "$CLI" kv bench --device host --block 64KiB,1MiB --blocks 6 --layers 8 --repeat 2 --json
json_check "--json --layers 8: per-layer K and V tensors on the GPU, pieces of SIZE/16, verified" \
	'd["layout"] == "per-layer" and d["layers"] == 8 and d["verified"] and
	 [(r["piece_bytes"], r["blocks"]) for r in d["results"]] == [(4096, 6), (65536, 6)]'

# ------------------------------------------------------------ inside a job
T=$(mktemp -d /tmp/aeg-cli-kv.XXXXXX) || exit 99
AG=
cleanup() {
	[[ -n $AG ]] && kill -KILL "$AG" 2>/dev/null && wait "$AG" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT
tap_agent "$T/run" 256MiB 32MiB:2MiB

run "$CLI" kv bench --block 32KiB,2MiB --bytes 8MiB --repeat 2 --json
json_check "in a job: the job's slab and pinned pool, every way and both at once, verified" \
	'd["in_job"] and d["backend"] == "host" and d["verified"] and
	 all(r[k]["aegaeon"] > 0 for r in d["results"] for k in ("out", "in", "both"))'
expect "in a job: the table says so" 0 "inside the job \(its slab and pinned pool\)" \
	"$CLI" kv bench --block 32KiB --bytes 2MiB --repeat 1
run "$CLI" status --json
json_check "in a job: the bench gave its slab lease and pool buffers back" \
	'all(s["leases"] == 0 and s["lease_bytes"] == 0 for s in d["slabs"]) and d["pool"]["in_use"] == 0'
expect "in a job: more than the job's pool holds fails with the pool's limit" 1 "pinned pool too small|pool has only" \
	"$CLI" kv bench --block 2MiB --bytes 64MiB --repeat 1
run "$CLI" kv bench --device host --block 32KiB --bytes 2MiB --repeat 1 --json --standalone
json_check "--standalone in a job: a slab and pool of its own" 'not d["in_job"] and d["verified"]'
WAIT=$B/bench/kv_event_wait
if [[ -x $WAIT ]]; then
	run "$WAIT" --device host --layers 8 --waits 2000 --json
	json_check "kv_event_wait in a job: first waits through the agent, then 2000 waits on an opened layer handle" \
		'd["in_job"] and d["backend"] == "host" and d["layers"] == 8 and d["waits"] == 2000 and
		 0 < d["opened_wait_us"]["median"] <= d["opened_wait_us"]["p99"] <= d["opened_wait_us"]["max"]'
	expect "kv_event_wait: a bad option" 2 "Usage: kv_event_wait" "$WAIT" --layers 0
else
	not_ok "kv_event_wait is built (make check builds it)" "no $WAIT"
fi
expect "in a job: --device other than the job's is refused" 1 "the job's agent uses the host device" \
	"$CLI" kv bench --device cuda --block 32KiB --blocks 2 --repeat 1

tap_end

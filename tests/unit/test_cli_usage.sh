#!/bin/bash
# What a new user of aegaeon-cli meets first, outside a job on the host
# backend: usage errors exit 2 and say what is wrong, each message names a
# file once, counts agree with their nouns, sizes are human, JSON floats are
# short, every benchmark is listed and has --json, the progress bar tells the
# time left, and the configuration is read even when --device or
# $AEGAEON_DEVICE chooses the backend. TAP-like lines; exit 0 when all passed.
set -u

B=${top_builddir:-.}
CLI=$B/aegaeon-cli
SHIM=$B/tests/faults/.libs/libaegfault.so
PY=$(command -v python3 || echo /usr/bin/python3)
export AEGAEON_CONFIG=/dev/null AEGAEON_DEVICE=host AEGAEON_HOST_GPUS=1
unset AEGAEON_SOCKET AEGAEON_LOG AEGAEON_FAULT AEGAEON_FAULT_FILE AEGAEON_FAULT_AT
source "${top_srcdir:-$(dirname "$0")/../..}/tests/tap.sh"
# refute WHAT REGEX: the last command's output does not match REGEX
refute() {
	if grep -qE -- "$2" <<<"$out"; then not_ok "$1" "matched '$2':" "$out"; else ok "$1"; fi
}

[[ -x $CLI ]] || { echo "no $CLI: build first (make check builds it)"; exit 99; }
T=$(mktemp -d /tmp/aeg-usage.XXXXXX) || exit 99
trap 'rm -rf "$T"' EXIT
head -c 100000 /dev/urandom >"$T/raw.bin"
head -c $((64 << 20)) /dev/zero >"$T/big.bin"
printf 'xxxxxxxxxxxxxxxx' >"$T/bad.safetensors"

# ---------------------------------------------------------------- chunks
expect "--chunk 1000: refused at parse time, a multiple of 4 KiB" 2 \
	"^aegaeon-cli prefetch: --chunk 1000: a chunk is a non-zero multiple of 4 KiB" \
	"$CLI" prefetch --chunk 1000 "$T/raw.bin"
expect "bench prefetch --chunk 1000: the same" 2 "--chunk 1000: a chunk is a non-zero multiple of 4 KiB" \
	"$CLI" bench prefetch --chunk 1000 "$T/raw.bin"
expect "--chunk 1TiB for a 98 KiB file: one chunk of the file, no 1 TiB slab" 0 \
	"raw.bin: 97.66 KiB in .*, 1 chunk, 0 tensors," "$CLI" prefetch --chunk 1TiB "$T/raw.bin"
refute "--chunk 1TiB: no slab of 1 TiB asked" "slab of"
expect "a count of 25 chunks is plural" 0 "25 chunks, 0 tensors" "$CLI" prefetch --chunk 4KiB "$T/raw.bin"

# ------------------------------------------------------ paths named once
expect "a bad safetensors file: the error names it" 1 "bad.safetensors: safetensors: " \
	"$CLI" prefetch "$T/bad.safetensors"
[[ $(grep -o "bad.safetensors" <<<"$out" | wc -l) -eq 1 ]] && ok "and names it once" ||
	not_ok "and names it once" "$out"
# A directory is a model: one with a bad shard names the shard once.
expect "a directory: its bad shard named once" 1 "^aegaeon-cli: $T/bad.safetensors: safetensors: " "$CLI" prefetch "$T"
expect "a missing file: named once" 1 "^aegaeon-cli: $T/none: No such file" "$CLI" prefetch "$T/none"

# ------------------------------------------------- bench prefetch output
expect "bench prefetch: the chunk used, as a size (one chunk of a 97.66 KiB file)" 0 \
	"raw.bin, 97.66 KiB, chunks of 97.66 KiB, median of 1" "$CLI" bench prefetch "$T/raw.bin" --repeat 1
expect "bench prefetch: a chunk smaller than the file, as given" 0 "big.bin, 64 MiB, chunks of 16 MiB, median of 1" \
	"$CLI" bench prefetch "$T/big.bin" --repeat 1 --chunk 16MiB
expect "prefetch --json: chunk_bytes is the chunk used" 0 '"chunk_bytes": 100000,' "$CLI" prefetch --json "$T/raw.bin"
# Options before the benchmark's name or after it, for every benchmark.
expect "bench --repeat 1 prefetch FILE: the option is taken" 0 "median of 1$" "$CLI" bench --repeat 1 prefetch "$T/raw.bin"
expect "bench --chunk 16MiB --repeat 1 prefetch FILE: an option's value is not the name" 0 "chunks of 16 MiB, median of 1$" \
	"$CLI" bench --chunk 16MiB --repeat 1 prefetch "$T/big.bin"
expect "bench --gpu 1 prefetch FILE: the option is taken" 1 "GPU 1|no such GPU" "$CLI" bench --gpu 1 prefetch "$T/raw.bin"
expect "bench --json prefetch FILE" 0 '"benchmark": "prefetch"' "$CLI" bench --json --repeat 1 prefetch "$T/raw.bin"
expect "bench --json alloc" 0 '"benchmark": "alloc"' "$CLI" bench --json --repeat 5 alloc
expect "bench alloc --json --repeat 5" 0 '"benchmark": "alloc"' "$CLI" bench alloc --json --repeat 5
expect "bench --gpu 4294967296: refused, not wrapped to GPU 0" 2 "--gpu '4294967296' is not a GPU ordinal" \
	"$CLI" bench --gpu 4294967296 alloc
expect "bench --repeat 4294967298: refused, not wrapped to 2" 2 "--repeat '4294967298' is not a count in 1..1000000" \
	"$CLI" bench --repeat 4294967298 alloc
expect "bench event --repeat: the waits on the opened handle" 0 "opened \(100 waits\)" "$CLI" bench event --repeat 100
expect "bench prefetch of a directory: one file only, said so" 1 \
	"^aegaeon-cli: bench prefetch: $T: not a regular file \(it measures one file" "$CLI" bench prefetch "$T"
printf '{"weight_map": {"w": "raw.bin"}}' >"$T/model.safetensors.index.json"
expect "bench prefetch of a shard index: one file only, said so" 1 \
	"^aegaeon-cli: bench prefetch: $T/model.safetensors.index.json: a shard index \(it measures one file" \
	"$CLI" bench prefetch "$T/model.safetensors.index.json"
rm -f "$T/model.safetensors.index.json"
# json_floats FILE: every float of a JSON document has at most 6 significant digits
json_floats() {
	"$PY" -c '
import json, sys
bad = []
def walk(v):
    if isinstance(v, float) and float("%.6g" % v) != v:
        bad.append(v)
    elif isinstance(v, dict):
        [walk(x) for x in v.values()]
    elif isinstance(v, list):
        [walk(x) for x in v]
walk(json.load(sys.stdin))
sys.exit("long floats: %r" % bad if bad else 0)' <<<"$out"
}
for args in "prefetch --json" "bench prefetch --repeat 1 --json" "bench --json prefetch --repeat 1"; do
	run "$CLI" $args "$T/raw.bin"
	if [[ $rc -eq 0 ]] && msg=$(json_floats 2>&1); then
		ok "$args: JSON floats rounded to 6 significant digits"
	else
		not_ok "$args: JSON floats rounded to 6 significant digits" "rc $rc: $msg" "$out"
	fi
done

# ------------------------------------------------------------ benchmarks
expect "bench --help lists prefetch" 0 "^  prefetch  " "$CLI" bench --help
expect "bench with no benchmark names them all" 2 "expected one of alloc, pinned, event, prefetch FILE" "$CLI" bench
expect "an unknown benchmark: all named" 2 "unknown benchmark 'nope' \(alloc, pinned, event, prefetch FILE\)" \
	"$CLI" bench nope
for b in "alloc --repeat 5" "pinned --size 32MiB --repeat 1" "event" "prefetch $T/raw.bin --repeat 1"; do
	run "$CLI" bench $b --json
	if [[ $rc -eq 0 ]] && "$PY" -c '
import json, sys
d = json.load(sys.stdin)
assert d["benchmark"] == sys.argv[1] and d["device"] == "host" and d["gpu"] == 0 and d["title"] and d["rows"], d
for r in d["rows"]:
    assert set(r) == {"what", "aegaeon", "baseline", "unit", "speedup"}, r
    assert r["aegaeon"] > 0 and r["baseline"] > 0, r' "${b%% *}" <<<"$out" && msg=$(json_floats 2>&1); then
		ok "bench ${b%% *} --json: one object with its rows"
	else
		not_ok "bench ${b%% *} --json: one object with its rows" "rc $rc ${msg:-}" "$out"
	fi
done

# ------------------------------------------------- usage errors exit 2
usage_cases=(
	"info --bogus"
	"info extra"
	"info --device bogus"
	"status --bogus"
	"prefetch"
	"prefetch --gpu x $T/raw.bin"
	"prefetch --chunk lots $T/raw.bin"
	"prefetch --device bogus $T/raw.bin"
	"prefetch --no-wait $T/raw.bin"
	"wait"
	"wait --timeout x abc"
	"release"
	"chunks --bogus"
	"bench"
	"bench --bogus alloc"
	"bench alloc --device bogus"
	"bench alloc --repeat 0"
	"bench prefetch"
	"bench prefetch --repeat 0 $T/raw.bin"
	"bench prefetch --device bogus $T/raw.bin"
	"nosuchcommand"
)
for c in "${usage_cases[@]}"; do
	# shellcheck disable=SC2086
	expect "usage error exits 2: aegaeon-cli $c" 2 "." "$CLI" $c
done
# An option without its value says so, in every subcommand; an option of another says whose it is.
for c in "prefetch $T/raw.bin --chunk" "bench prefetch $T/raw.bin --chunk" "bench alloc --repeat" \
	"chunks --load" "release --load" "info --device" "kv bench --block"; do
	# shellcheck disable=SC2086
	expect "aegaeon-cli $c: the value is missing, not an unknown option" 2 "a value is missing after '${c##* }'" "$CLI" $c
done
expect "prefetch --repeat: an option of bench prefetch" 2 "prefetch: --repeat is an option of bench prefetch" \
	"$CLI" prefetch "$T/raw.bin" --repeat 3
for c in prefetch wait chunks release status info bench kv; do
	expect "$c -h: its usage, exit 0" 0 "Usage: aegaeon-cli" "$CLI" $c -h
done
# A path too long for the error's detail: its reason survives and the path is named once.
long=$T/$(printf 'a%.0s' $(seq 1100))
expect "a path of 1100 bytes: the reason survives" 1 ": File name too long$" "$CLI" prefetch "$long"
[[ $(grep -oF -- "$T" <<<"$out" | wc -l) -eq 1 ]] && ok "... and the path is named once" ||
	not_ok "... and the path is named once" "$out"

expect "--device bogus: says which option and what is allowed" 2 "^aegaeon-cli: --device: device 'bogus' is not one of cuda, host" \
	"$CLI" info --device bogus
expect "\$AEGAEON_DEVICE bogus: a failure naming the variable (1)" 1 "^aegaeon-cli: \\\$AEGAEON_DEVICE: device 'bogus'" \
	env AEGAEON_DEVICE=bogus "$CLI" info

# ------------------------------- the configuration with --device or env
printf 'device = "host";\nslab_max = \n' >"$T/broken.conf"
printf 'device = "host";\nno_such_key = 1;\n' >"$T/unknown.conf"
for how in "--device host" "AEGAEON_DEVICE=host"; do
	if [[ $how == --* ]]; then pre=(env -u AEGAEON_DEVICE); opt=(--device host); else pre=(env AEGAEON_DEVICE=host); opt=(); fi
	expect "$how: a broken configuration is an error" 1 "^aegaeon-cli: configuration: $T/broken.conf:[0-9]+: " \
		"${pre[@]}" AEGAEON_CONFIG="$T/broken.conf" "$CLI" info "${opt[@]}"
	expect "$how: an unknown key is an error" 1 "unknown.conf:2: .*no_such_key" \
		"${pre[@]}" AEGAEON_CONFIG="$T/unknown.conf" "$CLI" info "${opt[@]}"
	expect "$how: a missing \$AEGAEON_CONFIG is an error" 1 "configuration file $T/none.conf \(named by \\\$AEGAEON_CONFIG\): No such file" \
		"${pre[@]}" AEGAEON_CONFIG="$T/none.conf" "$CLI" bench alloc --repeat 1 "${opt[@]}"
done
printf 'device = "cuda";\n' >"$T/cuda.conf"
expect "--device host overrides the file's device = cuda" 0 "backend host, 1 GPU$" \
	env -u AEGAEON_DEVICE AEGAEON_CONFIG="$T/cuda.conf" "$CLI" info --device host

# -------------------------------------------- --timing, the ring made ahead
# prefetch in this process faults its staging ring in while the device opens
# (no huge pages reserved for it; the host backend's GPU has no NUMA node):
# --timing lists each step, and "pool ahead" where the ring took that memory.
expect "--timing lists the steps of the load" 0 "^timing: device open +[0-9.]+ ms$" \
	env AEGAEON_PINNED_HUGEPAGES=never "$CLI" prefetch --timing --feed read "$T/big.bin"
expect "--timing: the ring took its memory made ahead" 0 "^timing: pool ahead +[0-9.]+ ms$" \
	env AEGAEON_PINNED_HUGEPAGES=never "$CLI" prefetch --timing --feed read "$T/big.bin"
run env AEGAEON_PINNED_HUGEPAGES=never AEGAEON_RING_AHEAD=0 "$CLI" prefetch --timing --feed read "$T/big.bin"
refute "AEGAEON_RING_AHEAD=0: nothing made ahead" "pool ahead"
expect "AEGAEON_RING_AHEAD=yes: an error that says what it takes" 1 \
	"^aegaeon-cli: prefetch: AEGAEON_RING_AHEAD='yes' is not 0 or 1$" \
	env AEGAEON_RING_AHEAD=yes "$CLI" prefetch "$T/raw.bin"

# ------------------------------------------------- control bytes in names
# A model's file named with an escape sequence: the error, and every debug
# line about it, shows '?' for each control byte (the library scrubs every
# detail and log line).
esc=$'x\033[2J\033]0;title\007.safetensors'
printf 'not a model' >"$T/$esc"
run env AEGAEON_LOG=debug "$CLI" prefetch "$T/$esc"
if [[ $rc -eq 1 ]] && grep -qF 'x?[2J?]0;title?.safetensors' <<<"$out" && ! LC_ALL=C grep -q $'[\001-\010\013-\037\177]' <<<"$out"; then
	ok "a file named with escape sequences: '?' in the error and the debug lines, no control byte"
else
	not_ok "a file named with escape sequences: '?' in the error and the debug lines, no control byte" \
		"rc $rc, output:" "$(cat -v <<<"$out")"
fi
rm -f "$T/$esc"
# A file that loads (raw bytes): its line names it with '?' too.
esc=$'r\033[2J.bin'
cp "$T/raw.bin" "$T/$esc"
run "$CLI" prefetch "$T/$esc"
if [[ $rc -eq 0 ]] && grep -qF 'r?[2J.bin: ' <<<"$out" && ! LC_ALL=C grep -q $'[\001-\010\013-\037\177]' <<<"$out"; then
	ok "a loaded file named with an escape sequence: '?' in its line"
else
	not_ok "a loaded file named with an escape sequence: '?' in its line" "rc $rc, output:" "$(cat -v <<<"$out")"
fi
rm -f "$T/$esc"

# ------------------------------------------------- the progress bar's ETA
# A terminal on stderr (script(1) makes one) and reads of the read feed's
# 16 MiB buffers slowed to 200 ms each (the fault shim): the 100 ms redraws
# of a load of at least 0.8 s show the time left once the first read is in.
if [[ -f $SHIM ]] && command -v script >/dev/null; then
	PRELOAD="${AEGAEON_PY_PRELOAD:+$AEGAEON_PY_PRELOAD }$SHIM"
	bar=$(LD_PRELOAD="$PRELOAD" AEGAEON_FAULT=slow AEGAEON_FAULT_FILE="$T/big.bin" AEGAEON_FAULT_AT=200000 \
		timeout 60 script -qec "$CLI prefetch --feed read --threads 1 --chunk 16MiB $T/big.bin" /dev/null 2>&1 | tr '\r' '\n')
	if grep -qE '^\[#* *\] +[0-9]+% .* GB/s, ETA [0-9]+ s' <<<"$bar" &&
		grep -qE '^\[#{30}\] 100% 64 MiB / 64 MiB .* GB/s, in [0-9.]+ s' <<<"$bar"; then
		ok "progress bar: the time left while loading, the time taken at the end"
	else
		not_ok "progress bar: the time left while loading, the time taken at the end" "$bar"
	fi
else
	not_ok "progress bar: needs $SHIM and script(1) (util-linux)"
fi

tap_end

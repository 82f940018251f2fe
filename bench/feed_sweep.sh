#!/bin/bash
# The page cache -> GPU paths on one file in the page cache: registration
# alone (feed_probe), then the engine with each feed and thread count.
# Usage: feed_sweep.sh [FILE_GiB] (default 4); needs aegaeon-cli on PATH and
# feed_probe beside this script. The file goes to $SWEEP_DIR.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gib=${1:-4}
dir=${SWEEP_DIR:-/tmp/aegaeon-sweep}
file=$dir/sweep-${gib}g.bin
repeat=${SWEEP_REPEAT:-3}
mkdir -p "$dir"
[[ -f $file ]] || dd if=/dev/urandom of="$file" bs=64M count=$((gib * 16)) status=none iflag=fullblock
cat "$file" >/dev/null

probe() { "$here/feed_probe" "$file" "$@" --repeat "$repeat"; }
echo "## registration alone (feed_probe; $gib GiB file in the page cache, medians of $repeat)"
for t in 1 4; do probe --threads $t; done
probe --threads 4 --populate none
probe --threads 4 --unregister each

echo "## engine (aegaeon-cli prefetch --local, medians of $repeat)"
engine() {
	local rates=() line
	for _ in $(seq "$repeat"); do
		line=$(AEGAEON_LOG=debug aegaeon-cli prefetch "$file" --local --json "$@" 2>"$dir/engine.log") ||
			{ echo "engine $*: failed: $(tail -n 3 "$dir/engine.log")"; return; }
		rates+=("$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(round(j["gbps"],1))' "$line")")
	done
	printf 'engine %-48s %5s GB/s (runs: %s) | %s\n' "$*" \
		"$(printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(((repeat + 1) / 2))p")" "${rates[*]}" \
		"$(grep -o 'unregistered in [0-9.]* ms' "$dir/engine.log" | tr '\n' ' ')"
}
engine --feed mmap --threads 4
engine --feed read --threads 12
for t in 8 12 16; do
	for m in 1 2; do engine --feed mixed --threads $t --mmap-threads $m; done
done
engine --feed auto

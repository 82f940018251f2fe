#!/bin/bash
# Faults through the programs: aegaeon-cli and aegaeond with a file that fails
# to read or shrinks (tests/faults/fault_shim.c preloaded), slabs and pools
# that cannot be had, and a runtime directory on a full file system (root).
# Each must end with a clear error, leave nothing behind, and the next run work.
# Prints TAP-like lines; exit 0 when every check passed (automake's driver).
set -u

B=${top_builddir:-.}
CLI=$B/aegaeon-cli
AGENT=$B/aegaeond
SHIM=$B/tests/faults/.libs/libaegfault.so
PY=$(command -v python3 || echo /usr/bin/python3)
export AEGAEON_CONFIG=/dev/null AEGAEON_DEVICE=host AEGAEON_HOST_GPUS=1
unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_SLAB0_HANDLE AEGAEON_LOG AEGAEON_FAULT AEGAEON_FAULT_FILE AEGAEON_FAULT_AT
# Under ASan the runtime must come first in LD_PRELOAD (the Makefile names it).
PRELOAD="${AEGAEON_PY_PRELOAD:+$AEGAEON_PY_PRELOAD }$SHIM"
n=0
failed=0

ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; printf '#   %s\n' "${@:2}"; }
skip() { n=$((n + 1)); echo "ok $n - # SKIP $1"; }

run() { out=$("$@" 2>&1); rc=$?; }
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
# faulty MODE FILE AT CMD...: CMD with the shim hurting FILE
faulty() {
	local mode=$1 file=$2 at=$3
	shift 3
	exec env LD_PRELOAD="$PRELOAD" AEGAEON_FAULT="$mode" AEGAEON_FAULT_FILE="$file" AEGAEON_FAULT_AT="$at" "$@"
}
# only DIR NAMES...: DIR holds exactly NAMES (sorted, space-separated)
only() { local d=$1; shift; [[ "$(ls -A "$d" | sort | tr '\n' ' ')" == "$*${*:+ }" ]]; }

[[ -x $CLI && -x $AGENT && -f $SHIM ]] || { echo "no $CLI, $AGENT or $SHIM: build first (make check builds them)"; exit 99; }
T=$(mktemp -d /tmp/aeg-faults.XXXXXX) || exit 99
AG=
MNT=
cleanup() {
	[[ -n $AG ]] && kill -KILL "$AG" 2>/dev/null && wait "$AG" 2>/dev/null
	[[ -n $MNT ]] && umount "$MNT" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT

head -c $((4 << 20)) /dev/urandom >"$T/model.bin"
cp "$T/model.bin" "$T/orig.bin"
head -c $((1 << 20)) /dev/urandom >"$T/other.bin"
"$PY" - "$T/tiny.safetensors" <<-'PY'
	import json, struct, sys
	tensors, blob = {}, b""
	for i in range(4):
	    data = bytes((i * 37 + k) % 251 for k in range(300000))
	    tensors[f"w{i}"] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [len(blob), len(blob) + len(data)]}
	    blob += data
	header = json.dumps(tensors).encode()
	header += b" " * (-len(header) % 8)
	with open(sys.argv[1], "wb") as f:
	    f.write(struct.pack("<Q", len(header)) + header + blob)
	PY
ST=$T/tiny.safetensors
# The agent's default chunk (64 MiB) would not fit these small slabs.
# The site's caps are raised past the machine, so the device's and the
# host's own limits are what refuse the huge slab and pool below (the agent
# checks the caps first: test_agent's site_caps_in_agent).
printf '%s\n' 'prefetch_chunk = "1MiB";' 'slab_max = "1024TiB";' 'pinned_max = "1024TiB";' >"$T/aegaeon.conf"
restore() { cp "$T/orig.bin" "$T/model.bin"; }

# ------------------------------------------------- aegaeon-cli, in this process
M=$T/model.bin
for feed in read mmap mixed; do
	expect "cli --feed $feed: EIO at 1 MiB fails with the path and the I/O error" 1 \
		"$M: .*Input/output error" faulty eio "$M" $((1 << 20)) "$CLI" prefetch "$M" --chunk 1MiB --feed $feed
	expect "cli --feed $feed: the file shrinking to 1 MiB under the load is a stale file" 1 \
		"$M: file ends at 1048576 bytes, it had 4194304 .*changed while loading" \
		faulty shrink "$M" $((1 << 20)) "$CLI" prefetch "$M" --chunk 1MiB --feed $feed
	restore
	expect "cli --feed $feed: safetensors data unreadable past its first tensor" 1 \
		"$ST: .*Input/output error" faulty eio "$ST" 400000 "$CLI" prefetch "$ST" --chunk 256KiB --feed $feed
done
expect "cli: short reads (1000 bytes each) still load the whole file" 0 "4 MiB in .* GB/s \(read feed" \
	faulty short "$M" 1000 "$CLI" prefetch "$M" --chunk 1MiB --feed read
expect "cli: a safetensors header that cannot be read" 1 "$ST: safetensors: reading the header: Input/output error" \
	faulty eio "$ST" 0 "$CLI" prefetch "$ST" --chunk 256KiB
expect "cli: the same file loads once the fault is gone" 0 "4 MiB in .* GB/s \(mmap feed" \
	"$CLI" prefetch "$M" --chunk 1MiB --feed mmap

# ------------------------------------------------------------------ the agent
# start_agent DIR OPTS...: aegaeond in the background with OPTS, run through
# the command prefix in PFX (e.g. faulty ...); sets AG, waits for ready or
# error (or its exit); $started is ready, error, exited or timeout
PFX=(env)
start_agent() {
	local d=$1
	shift
	if [[ $d != "${MNT:-}" ]]; then
		rm -rf "$d"
		mkdir -m 700 "$d"
	fi
	"${PFX[@]}" "$AGENT" --config "$T/aegaeon.conf" "$@" --job 7 --runtime-dir "$d" --gpus 0 --device host --foreground 2>"$T/agent.log" &
	AG=$!
	started=exited
	for _ in $(seq 400); do
		# Alive or not, asked before the records are looked for: an agent that
		# wrote its error record and exited between the two is not taken for
		# one that exited without a word.
		local alive=1
		kill -0 "$AG" 2>/dev/null || alive=0
		[[ -f $d/ready ]] && { started=ready; return; }
		[[ -f $d/error ]] && { started=error; return; }
		((alive)) || return
		sleep 0.05
	done
	started=timeout
}
# stop_agent: SIGTERM, sets $agent_rc
stop_agent() { kill -TERM "$AG" 2>/dev/null; wait "$AG"; agent_rc=$?; AG=; }
# failed_start WHAT PATTERN: the agent wrote an error record matching PATTERN, exited 1, left only it
failed_start() {
	local what=$1 pat=$2 rec
	[[ $started == ready || $started == timeout ]] && kill -TERM "$AG"
	wait "$AG"; agent_rc=$?; AG=
	rec=$(cat "$R/error" 2>/dev/null)
	if [[ $started == error && $agent_rc -eq 1 ]] && grep -qE -- "$pat" <<<"$rec" && only "$R" error; then
		ok "$what"
	else
		not_ok "$what" "started: $started, agent rc $agent_rc, error record: $rec" \
			"left in the runtime dir: $(ls -A "$R" | tr '\n' ' ')" "log: $(cat "$T/agent.log")"
	fi
}
R=$T/run
jobenv() {
	export AEGAEON_SOCKET=$R/agent.sock AEGAEON_SLABS=1 AEGAEON_JOB_DIR=$R
	AEGAEON_SLAB0_HANDLE=$(sed -n 's/^slab0_handle=//p' "$R/ready")
	export AEGAEON_SLAB0_HANDLE
}
nojobenv() { unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_JOB_DIR AEGAEON_SLAB0_HANDLE; }

PFX=(faulty eio "$ST" 0)
start_agent "$R" --slab 16MiB --prefetch "$ST"
failed_start "agent: --prefetch of a file whose header cannot be read fails the job start with the path" \
	"prefetch|$ST: safetensors: reading the header: Input/output error"

PFX=(env)
start_agent "$R" --slab 2MiB --prefetch "$M"
failed_start "agent: --prefetch larger than the slab fails the job start: requested vs free" \
	"$M: needs 4 MiB \(4194304 bytes in [0-9]+ blocks\) in the slab of GPU 0, which has 2 MiB free of 2 MiB"

start_agent "$R" --slab 100TiB
failed_start "agent: a slab over the device's memory fails the job start" \
	"GPU 0: slab of [0-9.]+ [GT]iB asked, [0-9.]+ [GT]iB free"

start_agent "$R" --slab 16MiB --pinned 64TiB:1GiB
failed_start "agent: a pinned pool over the host's memory fails the job start" \
	"pinned pool: [0-9]+ bytes asked, only [0-9]+ available \(MemAvailable\)"

# A load that fails midway: the job runs on, the failure is reported where
# the load is waited for, its blocks are freed, and other loads work.
PFX=(faulty eio "$M" $((2 << 20)))
start_agent "$R" --slab 16MiB --pinned 8MiB:1MiB --prefetch "$M"
if [[ $started != ready ]]; then
	not_ok "agent: starts with a --prefetch file that fails midway" "started: $started" "$(cat "$T/agent.log" "$R/error" 2>/dev/null)"
else
	ok "agent: starts with a --prefetch file that fails midway (the load runs after ready)"
	jobenv
	# The agent's reply carries the load's error detail: the bytes and errno. A job-start
	# load maps the file (the pool is still being made), so the range is a piece's.
	expect "agent: waiting on the failed load gives its error with the path, offset and errno" 1 \
		"load 1 of $M failed: $M: reading ([0-9]+ bytes at [0-9]+|bytes [0-9]+\.\.[0-9]+ through its mapping): Input/output error \(AEG_EIO\)" \
		"$CLI" wait 1 --timeout 10
	check "agent: its log has the detail (offset and errno)" \
		grep -qE "load 1 of $M failed: $M: reading ([0-9]+ bytes at [0-9]+|bytes [0-9]+\.\.[0-9]+ through its mapping): Input/output error" "$T/agent.log"
	run "$CLI" status --json
	check "agent: status shows the load failed" test "$(json 'd["loads"][0]["state"]' <<<"$out")" = "failed: input/output error"
	expect "agent: release --all frees the failed load" 0 "released" "$CLI" release --all
	run "$CLI" status --json
	check "agent: slab empty again" test "$(json 'len(d["loads"]), d["slabs"][0]["used_bytes"], d["slabs"][0]["blocks"]' <<<"$out")" = "0 0 0"
	expect "agent: the next load (another file) works" 0 "through the job's agent" \
		"$CLI" prefetch "$T/other.bin" --chunk 1MiB --verify
	expect "agent: a load of the faulty file again fails again, clearly" 1 "load 3 of $M failed: $M: reading .*: Input/output error \(AEG_EIO\)" \
		"$CLI" prefetch "$M" --chunk 1MiB
	expect "agent: release --all" 0 "released" "$CLI" release --all
	stop_agent
	# prefetch.lock is the CLI's (AEGAEON_JOB_DIR); the epilog removes the directory.
	check "agent: stops cleanly (rc 0) and leaves nothing of its own in the runtime dir" \
		test "$agent_rc-$(ls -A "$R" | tr '\n' ' ')" = "0-prefetch.lock "
	nojobenv
fi

# ------------------------------------------------ a staging ring that cannot be made
# Without a job pool the engine makes its staging ring at its first load; with
# no memory to populate it the agent says why, and the load goes on through
# the file's mapping.
PFX=(faulty nomem "" 0)
start_agent "$R" --slab 16MiB
if [[ $started != ready ]]; then
	not_ok "agent: starts without a pool while no memory can be populated" "started: $started" "$(cat "$T/agent.log" "$R/error" 2>/dev/null)"
else
	ok "agent: starts without a pool while no memory can be populated"
	jobenv
	check "agent: no staging ring before a load" bash -c "! grep -q 'staging ring' '$T/agent.log'"
	expect "agent: a load without the ring goes through the file's mapping, verified" 0 "through the job's agent" \
		"$CLI" prefetch "$T/other.bin" --chunk 256KiB --verify
	for _ in $(seq 100); do grep -q "staging ring" "$T/agent.log" && break; sleep 0.05; done
	check "agent: the log says the ring could not be made, and why" \
		grep -qE "GPU 0: the prefetch engine's staging ring \(pinned pool: populating [0-9]+ bytes .*Cannot allocate memory\): files that cannot be mapped do not load" "$T/agent.log"
	expect "agent: release --all" 0 "released" "$CLI" release --all
	stop_agent
	check "agent: stops cleanly (rc 0), nothing of its own left" test "$agent_rc-$(ls -A "$R" | tr '\n' ' ')" = "0-prefetch.lock "
	nojobenv
fi
PFX=(env)

# ------------------------------------------------ a pool still being made at stop
# A large pool in 4 KiB pages takes seconds to make: an agent told to stop
# meanwhile stops making it and exits at once, leaving nothing, instead of
# finishing the pool first (here it would take 12 s or more).
PFX=(faulty slowpop "" 100000)
start_agent "$R" --slab 16MiB --pinned 2GiB:2MiB
if [[ $started != ready ]]; then
	not_ok "stop: the agent is ready while its pool is being made" "started: $started" "$(cat "$T/agent.log" "$R/error" 2>/dev/null)"
else
	ok "stop: the agent is ready while its pool is being made"
	sleep 0.5
	t0=$(date +%s%N)
	stop_agent
	ms=$((($(date +%s%N) - t0) / 1000000))
	check "stop: SIGTERM while the pool's pages are made: rc $agent_rc in $ms ms (at most 3000)" \
		test "$agent_rc" = 0 -a "$ms" -le 3000
	check "stop: the log says the pool's making was stopped, and how far it got" \
		grep -qE "the agent stops: pinned pool: its making was stopped \([0-9]+ of [0-9]+ bytes (populated|registered)\)" "$T/agent.log"
	check "stop: nothing left in the runtime dir" test -z "$(ls -A "$R")"
fi
PFX=(env)

# ------------------------------------------------ the pool after the ready record
# The agent makes the pinned pool after it says ready, so the job's steps and
# loads do not wait for its pages: here the pages are held until the test
# opens a gate.
PFX=(faulty gate "$T/pool-gate" 0)
rm -f "$T/pool-gate"
start_agent "$R" --slab 16MiB --pinned 8MiB:1MiB --prefetch "$T/other.bin"
if [[ $started != ready ]]; then
	not_ok "pool: the agent is ready while its pool's pages are held" "started: $started" "$(cat "$T/agent.log" "$R/error" 2>/dev/null)"
else
	ok "pool: the agent is ready while its pool's pages are held"
	jobenv
	expect "pool: the job-start load completes without the pool" 0 "^load 1: .*other.bin loaded" \
		"$CLI" wait 1 --timeout 30
	expect "pool: a step loads and verifies through the agent meanwhile" 0 "other.bin: verified 1 MiB" \
		"$CLI" prefetch "$T/other.bin" --reload --chunk 256KiB --verify
	run "$CLI" status --json
	check "pool: status shows its sizes, nothing in use" \
		test "$(json 'd["pool"]["buffers"], d["pool"]["in_use"]' <<<"$out")" = "8 0"
	check "pool: not made yet" bash -c "! grep -q 'pinned pool ready' '$T/agent.log'"
	touch "$T/pool-gate"
	expect "pool: once made, a step maps it" 0 "attached: pinned pool mapped here, 8 buffers" \
		bash -c "'$CLI' status --attach | tr '\n' ' '"
	check "pool: the agent says when it is ready" grep -q "pinned pool ready" "$T/agent.log"
	stop_agent
	check "pool: the agent stops cleanly" test "$agent_rc" = 0
	nojobenv
fi
PFX=(env)

# ------------------------------------------- no thread to be had at the start
# The agent's settling thread (topology, then the pool) cannot be started:
# the start fails with an error record, and no ready record is left behind
# naming the agent that exited (the thread used to be started after it).
PFX=(faulty nothread "$R/agent.sock" 0)
start_agent "$R" --slab 16MiB --pinned 8MiB:1MiB
failed_start "agent: no thread for the settling after the socket: an error record, no ready record" \
	"starting the agent's settling thread: Resource temporarily unavailable"
PFX=(env)

# --------------------------------------------- the runtime directory fills up
if [[ $(id -u) -ne 0 ]]; then
	skip "runtime dir on a full tmpfs: needs root to mount one (CI runs as root)"
elif ! { mkdir -p "$T/full" && mount -t tmpfs -o size=64k,mode=0700 aegaeon-faults "$T/full"; } 2>"$T/mount.log"; then
	skip "runtime dir on a full tmpfs: mount refused ($(tr '\n' ' ' <"$T/mount.log"))"
else
	MNT=$T/full
	R=$MNT
	# No page left: the pid file cannot be written.
	dd if=/dev/zero of="$MNT/fill" bs=4096 status=none 2>/dev/null
	"$AGENT" --job 7 --runtime-dir "$R" --gpus 0 --slab 16MiB --device host --foreground 2>"$T/agent.log"
	agent_rc=$?
	if [[ $agent_rc -eq 1 ]] && grep -qE "$R/agent.pid: No space left on device" "$T/agent.log" && only "$R" fill; then
		ok "full runtime dir: the agent fails naming the pid file and ENOSPC, leaves nothing"
	else
		not_ok "full runtime dir: the agent fails naming the pid file and ENOSPC, leaves nothing" \
			"rc $agent_rc, left: $(ls -A "$R" | tr '\n' ' ')" "log: $(cat "$T/agent.log")"
	fi
	# One page left: the pid file fits, the ready record does not.
	rm -f "$MNT/fill"
	dd if=/dev/zero of="$MNT/fill" bs=4096 count=15 status=none
	"$AGENT" --job 7 --runtime-dir "$R" --gpus 0 --slab 16MiB --device host --foreground 2>"$T/agent.log"
	agent_rc=$?
	if [[ $agent_rc -eq 1 ]] && grep -qE "$R/ready.tmp: No space left on device" "$T/agent.log" && only "$R" fill; then
		ok "runtime dir full at the ready record: the agent fails naming it and ENOSPC, leaves nothing"
	else
		not_ok "runtime dir full at the ready record: the agent fails naming it and ENOSPC, leaves nothing" \
			"rc $agent_rc, left: $(ls -A "$R" | tr '\n' ' ')" "log: $(cat "$T/agent.log")"
	fi
	rm -f "$MNT/fill"
	PFX=(env)
	start_agent "$R" --slab 16MiB
	if [[ $started == ready ]]; then
		ok "runtime dir with space again: the agent starts"
		stop_agent
		check "and stops, leaving nothing" test "$agent_rc-$(ls -A "$R" | tr '\n' ' ')" = "0-"
	else
		not_ok "runtime dir with space again: the agent starts" "started: $started" "$(cat "$T/agent.log")"
	fi
	umount "$MNT" && MNT=
fi

echo "1..$n"
echo "$((n - failed)) passed, $failed failed"
[[ $failed -eq 0 ]]

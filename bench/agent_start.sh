#!/bin/bash
# What a job's steps wait for at its start: the agent's start up to its
# ready record. Starts aegaeond REPEAT times on a fresh runtime directory,
# as the SPANK plugin would (in the foreground here, its log kept), and
# prints for each start the time from exec to the ready record, the agent's
# own account of it (its "ready on ... after N ms (device open, slabs, pool
# check, engines and socket, prefetch starts)" line) and what it did after
# ready (the topology, the pool); first, the time of a bare device open
# (`aegaeon-cli info`) as the floor.
# Usage: bench/agent_start.sh [--repeat N] [--device cuda|host] [-- AEGAEOND OPTIONS]
#        (default options: --gpus 0 --slab 40GiB --pinned 8GiB)
# AEGAEOND and AEGAEON_CLI name the binaries (default: aegaeond and
# aegaeon-cli on PATH).
set -euo pipefail
repeat=3 device=cuda
while (($#)); do
	case $1 in
	--repeat) repeat=$2; shift 2 ;;
	--device) device=$2; shift 2 ;;
	--) shift; break ;;
	-h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "agent_start.sh: unknown option $1 (--help)" >&2; exit 2 ;;
	esac
done
opts=("$@")
((${#opts[@]})) || opts=(--gpus 0 --slab 40GiB --pinned 8GiB)
[[ $repeat =~ ^[1-9][0-9]*$ ]] || { echo "agent_start.sh: --repeat needs a count" >&2; exit 2; }
agent=${AEGAEOND:-aegaeond} cli=${AEGAEON_CLI:-aegaeon-cli}
dir=$(mktemp -d /tmp/aegaeon-agent-start.XXXXXX)
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$dir" "$dir.log"' EXIT
chmod 700 "$dir"
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

for ((i = 1; i <= repeat; i++)); do
	t=$(date +%s%N)
	"$cli" info --device "$device" >/dev/null
	echo "device open (aegaeon-cli info, a process of its own): $(ms_since "$t") ms"
done
for ((i = 1; i <= repeat; i++)); do
	rm -rf "${dir:?}"/* "$dir.log"
	t=$(date +%s%N)
	AEGAEON_LOG=debug "$agent" --job 1 --runtime-dir "$dir" --device "$device" --foreground "${opts[@]}" \
		>"$dir.log" 2>&1 &
	pid=$!
	for ((j = 0; j < 3000; j++)); do
		[[ -e $dir/ready || -e $dir/error ]] && break
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.01
	done
	if [[ ! -e $dir/ready ]]; then
		echo "start $i: no ready record: $(tail -n 3 "$dir.log")" >&2
		exit 1
	fi
	echo "start $i: ready record after $(ms_since "$t") ms from exec"
	# What it does after ready: the topology, then the pool when one is asked for.
	for ((j = 0; j < 600; j++)); do
		grep -q "pinned pool ready\|runs on without it" "$dir.log" && break
		[[ " ${opts[*]} " == *" --pinned "* ]] || { grep -q "topology after ready" "$dir.log" && break; }
		sleep 0.05
	done
	kill "$pid"
	wait "$pid" || true
	pid=
	grep -E "ready on|topology after ready|pinned pool: [0-9]+ buffers|pinned pool ready" "$dir.log" | sed 's/^/  /'
done

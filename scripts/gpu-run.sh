#!/bin/bash
# Runs on the GPU machine from a bundle made by scripts/gpu-bundle.sh: the GPU
# tests, then the benchmarks. Logs go to $OUT (or ./gpu-out).
# Usage: bash bundle/gpu-run.sh [tests] [sanitize] [bench] [prefetch] [unit] [slurm] [soak] [kv]
#                               [userpath] [cgroup] [link]
#        (default: tests bench; bench includes bench/agent_start.sh, where the
#        agent's start goes, and bench/slab_probe, what a slab costs). kv: the KV GPU tests, the whole KV benchmark
#        (bench/kv_bench.sh, --tune, kv_event_wait) and the KV part of the Slurm
#        test in a job (needs root and bundle/debs); KV_SANITIZE=1 adds
#        memcheck and racecheck of the KV tests. prefetch needs torch and safetensors; slurm
#        (tests/gpu/slurm_e2e.sh: a Slurm cluster, Slurm from bundle/debs) needs root;
#        soak (tests/soak/soak on the cuda backend) runs $SOAK_SECONDS (default 480) s;
#        sanitize needs compute-sanitizer (SANITIZE_TESTS, SANITIZE_TOOLS pick runs);
#        userpath (bench/userpath.py: the table of what a user waits for, Slurm rows
#        included, within $USERPATH_BUDGET (default 540) s; USERPATH_ARGS adds options)
#        needs torch, safetensors and transformers, and installs the wheels of
#        bundle/baseline-wheels (scripts/fetch-wheels.sh) for its baselines;
#        with bundle/base-wheel (gpu-bundle.sh BASE=REV) that build runs beside
#        this one in the seed, fresh and hf rows (bench/userpath.py --base).
#        cgroup (tests/slurm/cgroup.sh: the agent in the job's cgroups, on this
#        machine's cgroup version) needs root and Slurm installed: give it
#        after slurm, which installs Slurm from bundle/debs. link
#        (bench/link_probe): each copy method one way and both ways at once,
#        the KV kernel's grid split between the directions, host memory.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$here/root/opt/aegaeon/bin:$here/root/opt/aegaeon/sbin:$PATH
export AEGAEON_CONFIG=/dev/null
what=${*:-tests bench}
passed=0
failed=0

run() {   # name command...: logs to $out/name.log, counts the result
	local name=$1
	shift
	echo "== $name"
	if "$@" >"$out/$name.log" 2>&1; then
		passed=$((passed + 1)); echo "ok - $name"
	else
		failed=$((failed + 1)); echo "not ok - $name (rc $?)"
	fi
	tail -n 40 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
# What a SLIM=1 bundle (gpu-bundle.sh) leaves out is asked for by name: say so, not "not found".
for need in "unit:tests/unit/test_*" "soak:tests/soak/soak" "link:bench/link_probe"; do
	if [[ " $what " == *" ${need%%:*} "* ]] && ! compgen -G "$here/${need#*:}" >/dev/null; then
		failed=$((failed + 1))
		why="scripts/gpu-bundle.sh with SLIM=1 leaves it out"
		[[ ${need%%:*} = unit ]] && why="$why; without, it gathers the unit tests its build tree has built (make check)"
		echo "not ok - ${need%%:*}: this bundle has no ${need#*:} ($why)"
		what=" $what "
		what=${what// ${need%%:*} / }
	fi
done
if [[ " $what " == *" unit "* ]]; then
	for t in "$here"/tests/unit/test_*; do
		top_srcdir=$here run "unit-$(basename "$t")" "$t"
	done
fi
py=${PYTHON:-python3}
# The Python module comes from the bundle's wheel, installed by this Python's
# pip into the bundle (no registry: the wheel carries what it needs).
# install_once DIR WHEEL...: the wheels installed into DIR, once: into a fresh
# directory moved into place whole, so a half-made one is never taken.
install_once() {
	local dir=$1
	shift
	[[ -d $dir ]] && return 0
	rm -rf "$dir.new"
	"$py" -m pip install -q --no-index --no-deps --target "$dir.new" "$@" && mv "$dir.new" "$dir"
}
python_module() {
	install_once "$here/python" "$here"/wheels/aegaeon_native-*.whl ||
		{ echo "gpu-run: $py -m pip could not install the bundle's wheel (set PYTHON to a Python with pip)"; exit 1; }
}
export PYTHONPATH=$here/python${PYTHONPATH:+:$PYTHONPATH}
[[ " $what " == *" tests "* || " $what " == *" prefetch "* || " $what " == *" userpath "* ]] && python_module
if [[ " $what " == *" tests "* ]]; then
	for t in "$here"/tests/gpu/test_*; do
		case "$t" in
		*.py) run "$(basename "$t")" "$py" "$t" ;;
		*) run "$(basename "$t")" "$t" ;;
		esac
	done
fi
# sanitize: every GPU test program under compute-sanitizer's tools, one run
# each, a line per run. SANITIZE_TOOLS and SANITIZE_TESTS pick some (each run
# must fit the machine's time: SANITIZE_TIMEOUT seconds, default 600).
sanitize_one() {   # tool program: logs to $out/sanitize-TOOL-PROGRAM.log
	local tool=$1 prog=$2 name log rc start=$SECONDS errors summary args=() targs=()
	name=sanitize-$tool-$prog
	log=$out/$name.log
	case $tool in
	memcheck) args=(--leak-check full) ;;   # device memory still allocated at exit
	esac
	case $prog in
	test_kv_cuda) targs=(--timing-blocks 0) ;;
	test_kv_layout_cuda) targs=(--small) ;;
	esac
	# The tests provoke API errors on purpose (unregistered memory, bad
	# handles, dead peers): the accesses, races and barriers are what count.
	# AEGAEON_GPU_UNTIMED: timing thresholds are not checked under the tool;
	# AEGAEON_GPU_UNDER_TOOL: checks the tool itself upsets are skipped (gpu_tool.h).
	AEGAEON_GPU_UNTIMED=1 AEGAEON_GPU_UNDER_TOOL=$tool timeout -k 10 "${SANITIZE_TIMEOUT:-600}" compute-sanitizer --tool "$tool" \
		--error-exitcode 86 --report-api-errors no --target-processes all "${args[@]}" \
		"$here/tests/gpu/$prog" "${targs[@]}" >"$log" 2>&1
	rc=$?
	# memcheck, initcheck, synccheck: "ERROR SUMMARY: N errors"; racecheck:
	# "RACECHECK SUMMARY: N hazards displayed (N errors, N warnings)".
	summary=$(grep -E '^========= (ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^========= //')
	errors=$(grep -E '^========= (ERROR|RACECHECK) SUMMARY' "$log" |
		sed -n -E 's/.*SUMMARY: ([0-9]+) errors?.*/\1/p; s/.*\(([0-9]+) errors?,.*/\1/p' | awk '{s += $1} END {print s + 0}')
	local tests_failed
	tests_failed=$(grep -c '^not ok' "$log")
	if [[ $rc -eq 0 && $errors -eq 0 && -n $summary ]]; then
		passed=$((passed + 1))
		echo "ok - $name: $summary; $(grep -c '^ok' "$log") test checks passed; $((SECONDS - start)) s"
	else
		failed=$((failed + 1))
		echo "not ok - $name: ${summary:-no sanitizer summary}; $tests_failed test checks failed;" \
			"exit $rc$( [[ $rc -eq 86 ]] && echo ' (sanitizer errors)'; [[ $rc -eq 124 || $rc -eq 137 ]] && echo ' (timed out)'); $((SECONDS - start)) s; log $log"
		grep -E '^not ok' "$log" | head -n 10
		grep -E '^=========  ?[A-Z]|^========= +(at|Address|Saved|Host Frame)' "$log" | grep -v 'COMPUTE-SANITIZER' | head -n 40
	fi
}
if [[ " $what " == *" sanitize "* ]]; then
	if ! command -v compute-sanitizer >/dev/null; then
		failed=$((failed + 1))
		echo "not ok - sanitize: compute-sanitizer not found (it comes with the CUDA toolkit: add its bin/ to PATH)"
	else
		compute-sanitizer --version | tail -n 1
		for prog in ${SANITIZE_TESTS:-test_cuda_core test_slab_gpu test_kv_cuda test_kv_layout_cuda test_prefetch_cuda}; do
			# synccheck only where a kernel runs (the KV gather/scatter); the
			# others launch none, so it would check nothing. initcheck only
			# on the slab test: the others read, in a second process, memory
			# the first one wrote through CUDA IPC, which initcheck (per
			# process) reports as uninitialized, thousands of times over.
			tools=${SANITIZE_TOOLS:-memcheck racecheck $([[ $prog == test_slab_gpu ]] && echo initcheck) $([[ $prog == test_kv_cuda ]] && echo synccheck)}
			for tool in $tools; do
				sanitize_one "$tool" "$prog"
			done
		done
	fi
fi
if [[ " $what " == *" bench "* ]]; then
	run info aegaeon-cli info --device cuda
	run bench-alloc aegaeon-cli bench alloc --device cuda
	run bench-pinned aegaeon-cli bench pinned --device cuda --size 4GiB --repeat 3
	run bench-event aegaeon-cli bench event --device cuda
	run bench-kv bash "$here/bench/kv_bench.sh"
	run agent-start bash "$here/bench/agent_start.sh" --device cuda -- --gpus 0 --slab 60GiB --pinned 16GiB
	if [[ -x $here/bench/slab_probe ]]; then
		run slab-probe "$here/bench/slab_probe" --repeat 3
	else
		echo "slab-probe: not in this bundle (scripts/gpu-bundle.sh with SLIM=1 leaves it out)"
	fi
fi
if [[ " $what " == *" prefetch "* ]]; then
	run bench-prefetch "$py" "$here/bench/prefetch_bench.py" --sizes "${PREFETCH_SIZES:-4,16}" \
		--repeat "${PREFETCH_REPEAT:-3}" --dir "${PREFETCH_DIR:-/tmp/aegaeon-bench}" --out "$out/prefetch_bench.json"
fi
if [[ " $what " == *" soak "* ]]; then
	run soak "$here/tests/soak/soak" --device cuda --agent "$here/root/opt/aegaeon/sbin/aegaeond" \
		--seconds "${SOAK_SECONDS:-480}" ${SOAK_ARGS:-}
fi
if [[ " $what " == *" kv "* ]]; then
	run test_kv_cuda "$here/tests/gpu/test_kv_cuda"
	run test_kv_layout_cuda "$here/tests/gpu/test_kv_layout_cuda"
	rm -f "$out/kv_bench.json"
	KV_BENCH_JSON=$out/kv_bench.json run bench-kv bash "$here/bench/kv_bench.sh"
	run bench-kv-tune aegaeon-cli kv bench --device cuda --tune --block 4KiB,16KiB,32KiB,256KiB,2MiB --repeat 5
	run kv-event-wait "$here/bench/kv_event_wait" --device cuda --layers 32 --waits 10000
	if [[ -n ${KV_SANITIZE:-} ]] && ! command -v compute-sanitizer >/dev/null; then
		failed=$((failed + 1))
		echo "not ok - KV_SANITIZE: compute-sanitizer not found (add the CUDA toolkit's bin/ to PATH)"
	elif [[ -n ${KV_SANITIZE:-} ]]; then
		for prog in test_kv_cuda test_kv_layout_cuda; do
			for tool in memcheck racecheck; do
				sanitize_one "$tool" "$prog"
			done
		done
	fi
	OUT=$out run slurm-e2e-kv bash "$here/tests/gpu/slurm_e2e.sh" --kv-only ${SLURM_E2E_ARGS:-}
	grep -E '^(not ok|# figure:)' "$out/slurm-e2e-kv.log"
fi

# link: what the PCIe link gives each copy method, the KV kernel's split of
# the GPU between the two directions, and host memory (docs/benchmarks.md).
if [[ " $what " == *" link "* ]]; then
	probe=$here/bench/link_probe
	run link-methods "$probe" --piece 4,16,32,64,256,1024,2048,0 --host memfd --scatter both --repeat 5
	for split in "100 100" "100 75" "100 50"; do
		read -r gin gout <<<"$split"
		run "link-split-$gin-$gout" "$probe" --methods sm,kv --piece 16,32,256 --host memfd --scatter both \
			--bytes 512 --in-grid "$gin" --out-grid "$gout" --repeat 7
	done
	run link-cpu-copy "$probe" --cpu-copy 1,2,4,8,12,16 --repeat 3
fi

# userpath: the public loaders' wheels go into a temporary directory on
# PYTHONPATH (the machine has no registry); the table and its JSON go to $out.
if [[ " $what " == *" userpath "* ]]; then
	echo "== userpath"
	wheels=("$here"/baseline-wheels/*.whl)
	[[ -e ${wheels[0]} ]] || wheels=("$here"/../.whl/*.whl)
	wheel_site=$(mktemp -d /tmp/aegaeon-wheels.XXXXXX)
	if [[ ! -e ${wheels[0]} ]]; then
		echo "userpath: no wheels in $here/baseline-wheels (scripts/fetch-wheels.sh, then gpu-bundle.sh): baselines that need them are skipped"
	elif "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$wheel_site" "${wheels[@]}"; then
		echo "userpath: installed $(cd "$wheel_site" && ls -d *.dist-info | sed 's/.dist-info//' | tr '\n' ' ')"
	else
		echo "userpath: installing ${wheels[*]} failed: baselines that need them are skipped"
	fi
	base=()
	if compgen -G "$here/base-wheel/*.whl" >/dev/null; then
		if install_once "$here/python-base" "$here"/base-wheel/*.whl; then
			base=(--base "$here/python-base" --base-label "$(cat "$here/base-wheel/REVISION" 2>/dev/null || echo base)")
			echo "userpath: the base build ${base[3]} runs beside this one"
		else
			echo "userpath: installing $here/base-wheel failed: no base build in this run"
		fi
	fi
	PYTHONPATH=$PYTHONPATH:$wheel_site PYTHONUNBUFFERED=1 "$py" "$here/bench/userpath.py" --device cuda \
		--dir "${USERPATH_DIR:-/tmp/aegaeon-userpath}" --budget "${USERPATH_BUDGET:-540}" \
		--out "$out/userpath.json" "${base[@]}" ${USERPATH_ARGS:-} 2>&1 | tee "$out/userpath.log"
	if [[ ${PIPESTATUS[0]} -eq 0 ]]; then
		passed=$((passed + 1)); echo "ok - userpath"
	else
		failed=$((failed + 1)); echo "not ok - userpath (a check failed or it crashed: $out/userpath.log)"
	fi
	rm -rf "$wheel_site"
fi
if [[ " $what " == *" slurm "* ]]; then
	OUT=$out run slurm-e2e bash "$here/tests/gpu/slurm_e2e.sh" ${SLURM_E2E_ARGS:-}
	grep -E '^(not ok|# figure:)' "$out/slurm-e2e.log"
fi
if [[ " $what " == *" cgroup "* ]]; then
	# The agent runs with slurmd's empty environment: libraries the system
	# lacks go where the loader finds them, and go again after the test.
	root=$here/root/opt/aegaeon
	libs=/usr/local/lib/aegaeon-cgroup
	mkdir -p "$libs"
	for l in $(env -u LD_LIBRARY_PATH ldd "$root/sbin/aegaeond" "$root/lib/slurm/aegaeon.so" | awk '/not found/ {print $1}' | sort -u); do
		cp "$here/lib/$l" "$libs/"
	done
	echo "$libs" >/etc/ld.so.conf.d/aegaeon-cgroup.conf
	ldconfig
	AEG_BUILDDIR=$root AEG_PLUGIN=$root/lib/slurm/aegaeon.so AEG_AGENT=$root/sbin/aegaeond AEG_CLI=$root/bin/aegaeon-cli \
		run cgroup bash "$here/tests/slurm/run.sh" cgroup.sh
	if grep -q '^SKIP' "$out/cgroup.log"; then   # no Slurm, or slurmd cannot use cgroups here
		passed=$((passed - 1)) failed=$((failed + 1))
		echo "not ok - cgroup: skipped, which this mode does not accept"
	fi
	rm -rf "$libs" /etc/ld.so.conf.d/aegaeon-cgroup.conf
	ldconfig
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

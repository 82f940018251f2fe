#!/bin/bash
# Builds aegaeon with the cuda backend and the Python module and gathers into
# one folder what a GPU machine without a package registry needs: the
# installed tree (plugin, agent, CLI, aegaeon_native), the module's repaired
# abi3 wheel (wheels/: the bundle's Python tests install it there with pip;
# it needs scripts/install-deps.sh's tools), the GPU and unit test
# programs, the Slurm end-to-end test, the benchmarks, the non-system shared
# libraries they load, Debian's Slurm packages when .debs/ holds them
# (scripts/fetch-slurm-debs.sh), and the Python wheels of .whl/
# (scripts/fetch-wheels.sh) into baseline-wheels/ (gpu-run.sh userpath).
# Usage: scripts/gpu-bundle.sh [BUNDLE_DIR]
# (default: bundle/); JOBS=N sets make's parallelism (default: all CPUs).
# BASE=REV adds the wheel of another revision (base-wheel/), which gpu-run.sh
# userpath runs beside this build's to compare the two in one run. SLIM=1
# leaves out the diagnostic probes of bench/, the soak test and the unit
# tests (about 9 MiB): the bundle of a tests/userpath/slurm run.
# On the GPU machine: bash BUNDLE_DIR/gpu-run.sh [what...]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$top/bundle}")
build=$top/build-gpu
cuda=${CUDA_HOME:-/usr/local/cuda}
jobs=${JOBS:-$(nproc)}
# The module is built on the stable ABI against Debian's Python (3.11) and
# loads in the GPU machine's torch Python (3.12).
python=${PYTHON:-/usr/bin/python3}

[ -f "$top/configure" ] || (cd "$top" && autoreconf -fi >/dev/null)
mkdir -p "$build"
if [ ! -f "$build/Makefile" ]; then
	(cd "$build" && "$top/configure" -q --enable-werror --with-cuda="$cuda" --prefix=/opt/aegaeon \
		--enable-python PYTHON="$python")
fi
grep -q '^pyexec_LTLIBRARIES = python/aegaeon_native.la' "$build/Makefile" ||
	{ echo "gpu-bundle: $build was configured without --enable-python: remove it and run again" >&2; exit 1; }
make -C "$build" -s -j"$jobs"
make -C "$build" -s -j"$jobs" gpu-programs

rm -rf "$out"
mkdir -p "$out/lib" "$out/tests/gpu" "$out/tests/unit" "$out/tests/soak" "$out/bench"
make -C "$build" -s install DESTDIR="$out/root" >/dev/null

# The wheel, as tests/packages/test_wheel.sh makes it: cudart inside, hwloc,
# libconfig and jansson bundled by auditwheel (manylinux: glibc 2.34 or later).
tools=${AEGAEON_CI_TOOLS:-/opt/aegaeon-ci}
[[ -x $tools/venv/bin/auditwheel ]] || { echo "gpu-bundle: no $tools/venv/bin/auditwheel: run scripts/install-deps.sh" >&2; exit 1; }
rm -rf "$top/build-wheel" "$build/wheel-dist"
(cd "$top" && PIP_NO_INDEX=1 PIP_FIND_LINKS="$tools/wheels" AEGAEON_CONFIGURE_ARGS="--with-cuda=$cuda" \
	AEGAEON_BUILD_JOBS="$jobs" "$python" -m build --wheel --outdir "$build/wheel-dist" . >"$build/wheel.log" 2>&1) ||
	{ tail -n 30 "$build/wheel.log" >&2; echo "gpu-bundle: python -m build --wheel failed" >&2; exit 1; }
PATH=$tools/venv/bin:$PATH auditwheel repair -w "$out/wheels" "$build"/wheel-dist/*.whl >"$build/repair.log" 2>&1 ||
	{ cat "$build/repair.log" >&2; exit 1; }

# The base build's wheel, made the same way from a worktree of REV.
if [[ -n ${BASE:-} ]]; then
	rev=$(git -C "$top" rev-parse -q --verify "$BASE^{commit}") ||
		{ echo "gpu-bundle: BASE=$BASE names no commit of this repository" >&2; exit 1; }
	wt=$(mktemp -d "${TMPDIR:-/tmp}/aegaeon-base.XXXXXX")
	trap 'git -C "$top" worktree remove --force "$wt" >/dev/null 2>&1; rm -rf "$wt"' EXIT
	git -C "$top" worktree add -q --detach "$wt" "$rev"
	(cd "$wt" && PIP_NO_INDEX=1 PIP_FIND_LINKS="$tools/wheels" AEGAEON_CONFIGURE_ARGS="--with-cuda=$cuda" \
		AEGAEON_BUILD_JOBS="$jobs" "$python" -m build --wheel --outdir "$wt/wheel-dist" . >"$build/base-wheel.log" 2>&1) ||
		{ tail -n 30 "$build/base-wheel.log" >&2; echo "gpu-bundle: the wheel of BASE=$BASE failed to build" >&2; exit 1; }
	PATH=$tools/venv/bin:$PATH auditwheel repair -w "$out/base-wheel" "$wt"/wheel-dist/*.whl >"$build/base-repair.log" 2>&1 ||
		{ cat "$build/base-repair.log" >&2; exit 1; }
	git -C "$top" log -1 --format='%h of %cs' "$rev" >"$out/base-wheel/REVISION"
	echo "gpu-bundle: base build $(cat "$out/base-wheel/REVISION")"
fi

# Test programs link the library statically; libtool leaves real binaries in
# .libs only for programs with uninstalled shared dependencies.
copy_prog() {
	local p=$1 dest=$2
	if [ -f "$(dirname "$p")/.libs/$(basename "$p")" ]; then
		cp "$(dirname "$p")/.libs/$(basename "$p")" "$dest/"
	else
		cp "$p" "$dest/"
	fi
}
for p in "$build"/tests/gpu/test_*; do
	[ -x "$p" ] && [ -f "$p" ] && copy_prog "$p" "$out/tests/gpu"
done
cp "$top"/tests/gpu/test_*.py "$out/tests/gpu/" 2>/dev/null || true
for p in "$build"/tests/unit/test_*; do
	[ -x "$p" ] && [ -f "$p" ] && copy_prog "$p" "$out/tests/unit"
done
cp -r "$top/tests/unit/topo" "$out/tests/unit/" 2>/dev/null || true
copy_prog "$build/tests/soak/soak" "$out/tests/soak"
cp -r "$top/bench/." "$out/bench/" 2>/dev/null || true
rm -rf "$out"/bench/*.c "$out/bench/__pycache__"
for p in "$build"/bench/*; do
	[ -x "$p" ] && [ -f "$p" ] && copy_prog "$p" "$out/bench"
done
cp "$top/scripts/gpu-run.sh" "$out/"
cp "$top/tests/gpu/slurm_e2e.sh" "$top/tests/gpu/slurm_e2e.py" "$top/tests/gpu/slurm_userpath.sh" \
	"$top/tests/gpu/test_python_gpu.py" "$out/tests/gpu/"
cp -r "$top/scripts/lib" "$out/scripts-lib"
# The Slurm suite's cgroup test (gpu-run.sh cgroup), beside the library it sources.
mkdir -p "$out/tests/slurm" "$out/scripts"
cp "$top"/tests/slurm/{run.sh,cluster.sh,cgroup.sh} "$out/tests/slurm/"
cp -r "$top/scripts/lib" "$out/scripts/lib"
if compgen -G "$top/.debs/*.deb" >/dev/null; then
	mkdir -p "$out/debs"
	cp "$top"/.debs/*.deb "$out/debs/"
else
	echo "gpu-bundle: no .debs/ (scripts/fetch-slurm-debs.sh): the bundle carries no Slurm packages" >&2
fi
if compgen -G "$top/.whl/*.whl" >/dev/null; then
	mkdir -p "$out/baseline-wheels"
	cp "$top"/.whl/*.whl "$out/baseline-wheels/"
else
	echo "gpu-bundle: no .whl/ (scripts/fetch-wheels.sh): gpu-run.sh userpath skips the fastsafetensors and instanttensor baselines" >&2
fi

# (before the libraries are gathered: theirs are not needed then)
if [[ ${SLIM:-0} = 1 ]]; then
	rm -rf "$out"/bench/*_probe "$out/tests/soak" "$out/tests/unit"
fi

# Shared libraries the programs load, less the C runtime the target has newer.
skip='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|libresolv)\.'
{
	find "$out/root" "$out/tests" -type f \( -perm -u+x -o -name '*.so*' \) -print0 |
		{ xargs -0 -r ldd 2>/dev/null || true; } | awk '/=> \//{print $3}'   # scripts are not ELF
} | sort -u | while read -r lib; do
	base=$(basename "$lib")
	[[ $base =~ $skip ]] && continue
	case "$lib" in "$out"/*) continue ;; esac
	cp -L "$lib" "$out/lib/$base"
done
du -sh "$out" | awk '{print "bundle: " $1 " in '"${out#$top/}"'"}'

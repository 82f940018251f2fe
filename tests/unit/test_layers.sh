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
trap 'rm -rf "$T"' EXIT
check=("${PYTHON:-python3}" "$S/scripts/check-layers.py")

expect "this tree and its build: the layers hold" 0 'the layers hold, no cycle' \
	"${check[@]}" --srcdir "$S" --builddir "$B"

# A fresh copy of the sources, which a case then breaks.
fresh() {
	rm -rf "$T/tree" && mkdir "$T/tree" && cp -r "$S/src" "$S/include" "$S/python" "$T/tree/"
}

fresh
echo '#include "attach_internal.h"' >>"$T/tree/src/lib/event.c"
expect "core including a header of the job layer fails, naming file, line and include" 1 \
	'src/lib/event\.c:[0-9]+: #include "attach_internal\.h": core may not include job \(src/lib/attach_internal\.h\)' \
	"${check[@]}" --srcdir "$T/tree"

fresh
sed -i 's|#include <aegaeon/device.h>|#include <aegaeon/device.h>\n#include <aegaeon/session.h>|' \
	"$T/tree/include/aegaeon/event.h"
expect "a public header of core including one of the job layer fails" 1 \
	'include/aegaeon/event\.h:[0-9]+: #include <aegaeon/session\.h>: core may not include job' \
	"${check[@]}" --srcdir "$T/tree"

fresh
echo '#include <aegaeon/aegaeon.h>' >>"$T/tree/src/lib/kv.c"
expect "a file of the library including the umbrella header fails" 1 \
	'src/lib/kv\.c:[0-9]+: #include <aegaeon/aegaeon\.h>: kv may not include api' \
	"${check[@]}" --srcdir "$T/tree"

fresh
echo '#include "tlsf.h"' >>"$T/tree/src/lib/internal.h"
echo '#include "internal.h"' >>"$T/tree/src/lib/tlsf.h"
expect "two headers including each other fail as an include cycle" 1 \
	'include cycle: src/lib/internal\.h \(#include "tlsf\.h"\) -> src/lib/tlsf\.h \(#include "internal\.h"\)' \
	"${check[@]}" --srcdir "$T/tree"

fresh
touch "$T/tree/src/lib/stray.c"
expect "a new file of src/lib/ in no layer fails" 1 \
	'src/lib/stray\.c: in no layer: add a row to the table' "${check[@]}" --srcdir "$T/tree"

# Files in src/lib/LAYER/ take their folder's layer.
fresh
mkdir "$T/tree/src/lib/core" "$T/tree/src/lib/misc"
printf '#include "internal.h"\n#include "agent.h"\n' >"$T/tree/src/lib/core/clock.c"
touch "$T/tree/src/lib/misc/x.c"
expect "a file in src/lib/core/ including the agent's header fails" 1 \
	'src/lib/core/clock\.c:2: #include "agent\.h": core may not include agent' "${check[@]}" --srcdir "$T/tree"
expect "a folder of src/lib/ that is no layer fails" 1 \
	'src/lib/misc/x\.c: src/lib/misc/ is no layer' "${check[@]}" --srcdir "$T/tree"

fresh
mkdir "$T/tree/src/lib/core"
mv "$T/tree/src/lib/span.c" "$T/tree/src/lib/core/span.c"
expect "a file moved into its layer's folder with its row still in the table fails" 1 \
	'src/lib/span\.c: in the table \(core\) but not in the tree: remove its row' \
	"${check[@]}" --srcdir "$T/tree"
grep -v 'src/lib/span\.c' "$S/scripts/layers.txt" >"$T/layers.txt"
expect "moved, its row removed: the folder is its layer" 0 'the layers hold' \
	"${check[@]}" --srcdir "$T/tree" --table "$T/layers.txt"

# Calls between the library's objects: a unit (a file with its siblings of
# one stem) may call within its layers, never up, and units form no cycle.
obj=$T/build/src/lib/.libs
mkdir -p "$obj"
compile() {     # NAME CODE: the library's object of src/lib/NAME.c
	printf '%s\n' "$2" >"$T/$1.c" && $CC -c -o "$obj/libaegaeon_core_la-$1.o" "$T/$1.c"
}
compile error 'int aeg_t_log(void); int aeg_t_fail(void) { return aeg_t_log(); }'
compile log 'int aeg_t_fail(void); int aeg_t_log(void) { return aeg_t_fail() + 1; }'
compile event 'int aeg_t_agent_wait(void); int aeg_t_event_wait(void) { return aeg_t_agent_wait(); }'
compile attach 'int aeg_t_agent_wait(void) { return 0; }'
compile kv 'int aeg_t_swap_fini(void); int aeg_t_kv_check(void) { return aeg_t_swap_fini(); }'
compile kv_swap 'int aeg_t_kv_check(void); int aeg_t_swap_fini(void) { return aeg_t_kv_check(); }'
run "${check[@]}" --srcdir "$S" --builddir "$T/build"
if [[ $rc -eq 1 ]] &&
	grep -q 'call cycle: src/lib/error\.c -> src/lib/log\.c (aeg_t_log), src/lib/log\.c -> src/lib/error\.c (aeg_t_fail)' <<<"$out"; then
	ok "two files calling each other fail as a call cycle, naming the calls"
else
	not_ok "two files calling each other fail as a call cycle, naming the calls" "rc $rc" "$out"
fi
if grep -q 'src/lib/event\.c: uses aeg_t_agent_wait of src/lib/attach\.c: core may not use job' <<<"$out"; then
	ok "a call from core up into the job layer fails, naming the function"
else
	not_ok "a call from core up into the job layer fails, naming the function" "$out"
fi
if ! grep -q 'kv' <<<"$out"; then
	ok "kv.c and kv_swap.c, one unit, may call each other"
else
	not_ok "kv.c and kv_swap.c, one unit, may call each other" "$out"
fi
mkdir "$T/empty"
expect "a build tree without the library's objects fails" 1 'no object of the library' \
	"${check[@]}" --srcdir "$S" --builddir "$T/empty"

tap_end

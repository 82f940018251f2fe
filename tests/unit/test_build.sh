#!/bin/bash
# What a user building against aegaeon meets: each public header compiles
# alone as strict ISO C11 and C99 (no POSIX macros: PATH_MAX is not there),
# the library exports only what the public headers declare, and configure
# says plainly when --with-cuda names no directory.
# TAP-like lines; exit 0 when every check passed.
set -u

S=$(cd "${top_srcdir:-.}" && pwd)
CC=${CC:-cc}
source "$S/tests/tap.sh"

T=$(mktemp -d /tmp/aeg-build.XXXXXX) || exit 99
trap 'rm -rf "$T"' EXIT

# The installed headers are the ones Makefile.am lists.
mapfile -t headers < <(sed -n '/^aegaeoninclude_HEADERS = /,/^$/p' "$S/Makefile.am" |
	grep -oE 'include/aegaeon/[a-z_]+\.h')
[[ ${#headers[@]} -ge 10 ]] && ok "Makefile.am lists ${#headers[@]} public headers" ||
	not_ok "Makefile.am lists the public headers" "found: ${headers[*]}"
for std in c11 c99; do
	for h in "${headers[@]}"; do
		printf '#include <aegaeon/%s>\nint main(void) { return 0; }\n' "${h##*/}" >"$T/use.c"
		if out=$($CC -std=$std -pedantic-errors -Wall -Wextra -Werror -I"$S/include" -c "$T/use.c" -o "$T/use.o" 2>&1); then
			ok "$h alone with -std=$std -pedantic-errors"
		else
			not_ok "$h alone with -std=$std -pedantic-errors" "$out"
		fi
	done
done
# AEG_PATH_MAX stands for PATH_MAX where the system has one.
printf '#define _GNU_SOURCE\n#include <limits.h>\n#include <aegaeon/aegaeon.h>\n_Static_assert(AEG_PATH_MAX == PATH_MAX, "AEG_PATH_MAX");\nint main(void) { return 0; }\n' >"$T/path.c"
if out=$($CC -std=c11 -I"$S/include" -c "$T/path.c" -o "$T/path.o" 2>&1); then
	ok "AEG_PATH_MAX is this system's PATH_MAX"
else
	not_ok "AEG_PATH_MAX is this system's PATH_MAX" "$out"
fi

# The installed library exports the public API and nothing else: every
# function it exports is declared in a public header.
B=$(cd "${top_builddir:-.}" && pwd)
lib=$B/.libs/libaegaeon.so
if [[ -e $lib ]]; then
	mapfile -t exported < <(nm -D --defined-only "$lib" | awk '$2 == "T" { print $3 }')
	stray=()
	for f in "${exported[@]}"; do
		cat "${headers[@]/#/$S/}" | grep -qE "\b$f\(" || stray+=("$f")
	done
	if [[ ${#exported[@]} -gt 100 && ${#stray[@]} -eq 0 ]]; then
		ok "libaegaeon.so exports ${#exported[@]} functions, each declared in a public header"
	else
		not_ok "libaegaeon.so exports only functions of the public headers" \
			"${#exported[@]} exported; declared in no public header: ${stray[*]}"
	fi
else
	not_ok "libaegaeon.so exports only functions of the public headers" "$lib: not built"
fi

# configure stops at the CUDA check before anything is built.
mkdir "$T/cfg"
out=$(cd "$T/cfg" && "$S/configure" -q --with-cuda="$T/nonexistent" --without-slurm --disable-python \
	--without-cmocka --disable-fuzz 2>&1)
rc=$?
if [[ $rc -ne 0 ]] && grep -q "error: $T/nonexistent (--with-cuda=$T/nonexistent) does not exist" <<<"$out"; then
	ok "configure --with-cuda=/nonexistent: the directory does not exist"
else
	not_ok "configure --with-cuda=/nonexistent: the directory does not exist" "rc $rc" "$out"
fi

tap_end

#!/bin/bash
# What a user building against aegaeon meets: each public header compiles
# alone as strict ISO C11 and C99 (no POSIX macros: PATH_MAX is not there),
# the library exports only what the public headers declare, configure says
# plainly when --with-cuda or --with-slurm names no directory or PYTHON no
# interpreter, scripts/fuzz.sh refuses bad counts, and make install and uninstall keep a site's configuration.
# TAP-like lines; exit 0 when every check passed.
set -u

S=$(cd "${top_srcdir:-.}" && pwd)
CC=${CC:-cc}
source "$S/tests/tap.sh"

T=$(mktemp -d /tmp/aeg-build.XXXXXX) || exit 99
trap 'chmod -R u+w "$T" 2>/dev/null; rm -rf "$T"' EXIT

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

# scripts/fuzz.sh refuses what is not a count of seconds or inputs, or a
# seed, before it builds anything (status 2, its usage or the variable).
fuzz_refuses() {	# WANT ARGS...: run with ARGS, expect status 2 and WANT on stderr
	local want=$1 rc=0
	shift
	out=$(bash "$S/scripts/fuzz.sh" "$@" 2>&1 >/dev/null) || rc=$?
	if [[ $rc == 2 && $out == *"$want"* ]]; then
		ok "scripts/fuzz.sh refuses '$*'${AEGAEON_FUZZ_SEED:+ with AEGAEON_FUZZ_SEED=$AEGAEON_FUZZ_SEED}"
	else
		not_ok "scripts/fuzz.sh refuses '$*'" "status $rc: $out"
	fi
}
for args in 0 x -5 "1 2" --runs "--runs 0" "--runs 1e6" "--seconds 5"; do
	# shellcheck disable=SC2086	# each row is split into arguments on purpose
	AEGAEON_FUZZ_BUILD=$T/no-fuzz-build fuzz_refuses "usage:" $args
done
AEGAEON_FUZZ_SEED=one AEGAEON_FUZZ_BUILD=$T/no-fuzz-build fuzz_refuses "AEGAEON_FUZZ_SEED='one'" 5
[[ ! -e $T/no-fuzz-build ]] && ok "scripts/fuzz.sh built nothing for refused arguments" ||
	not_ok "scripts/fuzz.sh built nothing for refused arguments" "$(ls "$T/no-fuzz-build")"

# configure_refuses NAME ERROR ARGS...: configure with ARGS, in a directory
# of its own, stops before anything is built with "error: ERROR".
configure_refuses() {
	local name=$1 error=$2 dir rc
	shift 2
	dir=$(mktemp -d "$T/cfg.XXXXXX")
	out=$(cd "$dir" && "$S/configure" -q "$@" --without-cmocka --disable-fuzz 2>&1)
	rc=$?
	if [[ $rc -ne 0 ]] && grep -qF "error: $error" <<<"$out"; then
		ok "$name"
	else
		not_ok "$name" "rc $rc" "$out"
	fi
}

# configure stops at the CUDA check before anything is built.
configure_refuses "configure --with-cuda=/nonexistent: the directory does not exist" \
	"$T/nonexistent (--with-cuda=$T/nonexistent) does not exist" \
	--with-cuda="$T/nonexistent" --without-slurm --disable-python
# A --with-slurm=DIR without DIR/include/slurm/spank.h is an error, not the system's header.
configure_refuses "configure --with-slurm=/nonexistent: no spank.h there" \
	"$T/nonexistent/include/slurm/spank.h not found (--with-slurm=$T/nonexistent)" \
	--without-cuda --with-slurm="$T/nonexistent" --disable-python
# PYTHON naming no interpreter is said so, not "too old".
configure_refuses "configure PYTHON=/nonexistent/python3: no such interpreter" \
	"PYTHON=$T/nonexistent/python3 does not exist or does not run" \
	--without-cuda --without-slurm --enable-python PYTHON="$T/nonexistent/python3"

# make install and uninstall of this build into a DESTDIR (everything is
# built; the environment of make check's own make is not this one's).
minst() {      # TARGET: make TARGET DESTDIR=$T/inst in the build tree; output in $out
	out=$(cd "$B" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s "$1" DESTDIR="$T/inst" 2>&1)
}
printf 'show:\n\t@echo "$(sysconfdir)|$(docdir)|$(spank_plugindir)|$(spank_plugin_LTLIBRARIES)"\n' >"$T/show.mk"
IFS='|' read -r sysconfdir docdir plugindir plugin < <(cd "$B" &&
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s --no-print-directory -f Makefile -f "$T/show.mk" show)
conf=$T/inst$sysconfdir/aegaeon/aegaeon.conf
sample=$T/inst$docdir/examples/aegaeon.conf
if minst install && cmp -s "$B/etc/aegaeon.conf" "$conf" && cmp -s "$B/etc/aegaeon.conf" "$sample"; then
	ok "make install: the sample config in DOCDIR/examples and, where none was, in SYSCONFDIR/aegaeon"
else
	not_ok "make install: the sample config in DOCDIR/examples and, where none was, in SYSCONFDIR/aegaeon" "$out"
fi
if [[ -n $plugin ]]; then
	check "make install: the plugin without its libtool archive" \
		test -f "$T/inst$plugindir/aegaeon.so" -a ! -e "$T/inst$plugindir/aegaeon.la"
	check "make install: the plugin's man page and plugstack sample" \
		test -f "$T/inst$docdir/examples/plugstack.conf.d/aegaeon.conf" -a -n "$(find "$T/inst" -name aegaeon-spank.8)"
else
	check "make install without the plugin: neither its man page nor its plugstack sample" \
		test ! -e "$T/inst$docdir/examples/plugstack.conf.d" -a -z "$(find "$T/inst" -name aegaeon-spank.8)"
fi
echo 'slab_max = "50%";    # the site' >>"$conf"
cp "$conf" "$T/site.conf"
if minst install && cmp -s "$T/site.conf" "$conf" && grep -q "kept $conf" <<<"$out"; then
	ok "make install again: the site's changed config kept, and said so"
else
	not_ok "make install again: the site's changed config kept, and said so" "$out" "$(diff "$T/site.conf" "$conf")"
fi
if minst uninstall && cmp -s "$T/site.conf" "$conf" && [[ ! -e $sample ]] &&
	[[ $(find "$T/inst" -type f -o -type l) = "$conf" ]]; then
	ok "make uninstall: everything gone but the site's changed config"
else
	not_ok "make uninstall: everything gone but the site's changed config" "$out" \
		"left: $(find "$T/inst" -type f -o -type l)"
fi
rm -rf "$T/inst"
if minst install && minst uninstall && [[ -z $(find "$T/inst" -type f -o -type l) ]]; then
	ok "make uninstall: the config unchanged from the sample goes too, nothing left"
else
	not_ok "make uninstall: the config unchanged from the sample goes too, nothing left" "$out" \
		"left: $(find "$T/inst" -type f -o -type l)"
fi

tap_end

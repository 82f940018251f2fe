#!/bin/bash
# The Debian packages as an admin uses them: install them (as root), check
# where everything went (conffiles, pkg-config, a C program against the
# installed library, Debian's python3 importing the module and its stubs),
# run the Python tests and the real-Slurm suite against the installed plugin,
# agent and CLI, then purge them and check that nothing of them is left.
# Usage: test_debs.sh DEBDIR BUILDDIR (BUILDDIR: a build tree for the Slurm
# suite's own needs). Prints ok/not ok lines and "N passed, N failed".
set -u

debs=$(realpath "${1:?usage: test_debs.sh DEBDIR BUILDDIR}")
B=$(realpath "${2:?usage: test_debs.sh DEBDIR BUILDDIR}")
top=$(cd "$(dirname "$0")/../.." && pwd)
pkgs=(aegaeon libaegaeon0 libaegaeon-dev python3-aegaeon)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
source "$top/tests/tap.sh"
sub_passed=0    # the Python and Slurm suites' own counts
sub_failed=0
counts() {     # adds a log's last "N passed, N failed" to the suites' counts
	local p f
	read -r p f < <(sed -n -E 's/^([0-9]+) passed, ([0-9]+) failed.*/\1 \2/p' "$1" | tail -n 1)
	sub_passed=$((sub_passed + ${p:-0}))
	sub_failed=$((sub_failed + ${f:-0}))
}
installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

# give_up WHY: this run cannot go on; a failed check, so the totals say so
give_up() { not_ok "$1"; tap_end "$sub_passed" "$sub_failed"; }

[[ $(id -u) -eq 0 ]] || give_up "run as root (it installs packages)"
# The packages are the machine's, not this run's: two suites on one machine
# (two checkouts) take turns here rather than find each other's install.
exec 9>/run/lock/aegaeon-test-debs.lock
flock -w 1800 9 || give_up "another run held /run/lock/aegaeon-test-debs.lock for 30 minutes"
files=()
for p in "${pkgs[@]}"; do
	f=$(ls "$debs/${p}_"*.deb 2>/dev/null | head -n 1)
	[[ -n $f ]] || give_up "no ${p}_*.deb in $debs (scripts/build-debs.sh)"
	files+=("$f")
done
# A run killed before its purge (SIGKILL runs no trap) leaves the packages
# installed and its mark behind: they are that run's, so they go now. Packages
# installed without the mark are the machine's, and this test does not touch them.
mark=/var/tmp/aegaeon-test-debs.installed
if [[ -f $mark ]]; then
	echo "# packages left installed by an earlier run of this test ($(cat "$mark")): purging them"
	dpkg --purge "${pkgs[@]}" >/dev/null 2>&1 || give_up "purging an earlier run's packages failed: dpkg --purge ${pkgs[*]}"
	rm -f "$mark"
fi
for p in "${pkgs[@]}"; do
	installed "$p" && give_up "$p is installed already, not by this test: remove it first (dpkg --purge ${pkgs[*]})"
done
T=$(mktemp -d /tmp/aeg-debs.XXXXXX) || give_up "mktemp -d /tmp/aeg-debs.XXXXXX failed"
# What the packages hold that this machine did not have before: all of it must go at purge.
for f in "${files[@]}"; do dpkg-deb -c "$f"; done | awk '{print $6}' | sed -e 's|^\./|/|' -e 's|/$||' |
	grep -v '^$' | sort -u | while read -r path; do [[ -e $path ]] || echo "$path"; done >"$T/new"
purge() { dpkg --purge "${pkgs[@]}" >"$T/purge.log" 2>&1 && rm -f "$mark"; }
trap 'purge; rm -rf "$T"' EXIT

echo "run $$ started $(date -u '+%F %T') UTC" >"$mark"
if apt-get install -y -q --no-install-recommends "${files[@]}" >"$T/install.log" 2>&1; then
	ok "the four packages install"
else
	not_ok "the four packages install" "$(tail -n 20 "$T/install.log")"
	tap_end
fi

# ----------------------------------------------------------- where things go
plugin=/usr/lib/$multiarch/slurm/aegaeon.so
check "plugin, agent and CLI in place" test -f "$plugin" -a -x /usr/sbin/aegaeond -a -x /usr/bin/aegaeon-cli
check "aegaeon-cli runs from PATH" bash -c 'aegaeon-cli --version | grep -q "^aegaeon-cli [0-9]"'
conf=$(dpkg-query -W -f='${Conffiles}' aegaeon)
check "the sample config and the plugstack line are conffiles" \
	bash -c 'grep -q "^ /etc/aegaeon/aegaeon.conf " <<<"$1" && grep -q "^ /etc/slurm/plugstack.conf.d/aegaeon.conf " <<<"$1"' _ "$conf"
check "the plugstack line names the installed plugin and config" \
	grep -qx "required $plugin config=/etc/aegaeon/aegaeon.conf" /etc/slurm/plugstack.conf.d/aegaeon.conf
check "the CLI reads the installed config by default" bash -c \
	'env -u AEGAEON_CONFIG AEGAEON_LOG=debug aegaeon-cli info --device host 2>&1 | grep -q "configuration read from /etc/aegaeon/aegaeon.conf$"'
check "man pages" test -f /usr/share/man/man8/aegaeon-spank.8.gz -a -f /usr/share/man/man1/aegaeon-cli.1.gz
cat >"$T/use.c" <<'EOF'
#include <stdio.h>
#include <aegaeon/aegaeon.h>
int main(void) { printf("%s\n", aeg_version()); return 0; }
EOF
check "a C11 program builds with pkg-config against libaegaeon-dev and runs" \
	bash -c 'cc -std=c11 -pedantic-errors -Wall -Werror $(pkg-config --cflags aegaeon) "$1/use.c" -o "$1/use" \
		$(pkg-config --libs aegaeon) && "$1/use" | grep -q "^[0-9]"' _ "$T"
check "Debian's python3 imports the module from dist-packages" bash -c 'cd / && env -u PYTHONPATH /usr/bin/python3 -c \
	"import aegaeon_native as an; assert an.__file__ == \"/usr/lib/python3/dist-packages/aegaeon_native.abi3.so\", an.__file__"'

# ------------------------------------------------ tests against the packages
py_log=$T/python.log
(cd "$T" && env -u PYTHONPATH AEGAEON_DEVICE=host AEGAEOND=/usr/sbin/aegaeond top_srcdir="$top" \
	PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 "$top/tests/python/test_aegaeon_native.py" >"$py_log" 2>&1)
rc=$?
line=$(tail -n 1 "$py_log")
counts "$py_log"
if [[ $rc -eq 0 ]] && ! grep -q "test_mypy_reads_the_stubs.*skipped" "$py_log"; then
	ok "Python tests with the installed module and stubs: $line"
else
	not_ok "Python tests with the installed module and stubs: $line" "$(grep -E 'FAIL|ERROR|skipped|Error' "$py_log" | head -n 20)"
fi
slurm_log=$T/slurm.log
AEG_BUILDDIR=$B AEG_PLUGIN=$plugin AEG_AGENT=/usr/sbin/aegaeond AEG_CLI=/usr/bin/aegaeon-cli \
	bash "$top/tests/slurm/run.sh" >"$slurm_log" 2>&1
rc=$?
grep -E '^(not ok|# [a-z_]+: [0-9]+ passed)' "$slurm_log"
line=$(tail -n 1 "$slurm_log")
counts "$slurm_log"
if [[ $rc -eq 0 ]] && grep -qE '^[0-9]+ passed, 0 failed' <<<"$line"; then
	ok "real-Slurm suite with the installed plugin, agent and CLI: $line"
else
	not_ok "real-Slurm suite with the installed plugin, agent and CLI: $line" "rc $rc, log $slurm_log"
fi

# ------------------------------------------------------------------ purge
if purge; then ok "the packages purge"; else not_ok "the packages purge" "$(cat "$T/purge.log")"; fi
left=$(while read -r path; do [[ -e $path || -L $path ]] && echo "$path"; done <"$T/new")
check "nothing of them is left (files, directories, conffiles)" test -z "$left"
[[ -z $left ]] || echo "#   left: $left"
status=$(for p in "${pkgs[@]}"; do dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "$p" 2>/dev/null; done | grep -v ' un *$')
check "dpkg knows none of them any more" test -z "$status"
[[ -z $status ]] || echo "#   dpkg: $status"

echo "# checks: $((n - failed)) passed, $failed failed; the Python and Slurm suites: $sub_passed passed, $sub_failed failed"
tap_end "$sub_passed" "$sub_failed"

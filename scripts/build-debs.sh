#!/bin/bash
# Builds the Debian packages (debian/) from the files of this tree git does not ignore
# (from a release tarball's tree: all of it), in a copy under OUTDIR (default build-deb/),
# so the tree stays unconfigured; the .deb files land in OUTDIR. With CUDA at $CUDA_HOME
# (default /usr/local/cuda) they carry the cuda backend. Usage: scripts/build-debs.sh [OUTDIR]
#
# OUTDIR is new, empty or one this script made (it holds the stamp file
# .aegaeon-build-debs); then what an earlier run left there is removed first.
# Any other directory is refused, so that a wrong OUTDIR (".", the checkout,
# a home directory) loses nothing.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$top/build-deb}")
version=$(sed -n '1s/^aegaeon (\([^)]*\)).*/\1/p' "$top/debian/changelog")
src=$out/aegaeon-$version
stamp=$out/.aegaeon-build-debs
die() {
	echo "build-debs.sh: $*" >&2
	exit 1
}

case $top/ in
"$out"/*) die "OUTDIR $out holds the source tree $top: name a directory of its own (default: $top/build-deb)" ;;
esac
if [[ -e $out && ! -d $out ]]; then
	die "OUTDIR $out exists and is not a directory"
elif [[ -f $stamp ]]; then
	# Only what this script makes: the copy of the tree, the log and dpkg-buildpackage's results.
	rm -rf "$out"/aegaeon-*/ "$out/build.log" "$out"/*.deb "$out"/*.ddeb "$out"/*.buildinfo "$out"/*.changes
elif [[ -d $out && -n $(ls -A "$out") ]]; then
	die "OUTDIR $out exists, is not empty and was not made by build-debs.sh (it has no $(basename "$stamp")): name a new or empty directory, or remove that one yourself"
fi
mkdir -p "$out"
echo "made by scripts/build-debs.sh: it may empty this directory on its next run" >"$stamp"
mkdir -p "$src"

# A checkout gives the files git does not ignore; a release tree (no .git)
# all of its files, as scripts/quickstart.sh takes them. OUTDIR itself is left
# out where it is inside the tree.
rel=
case $out/ in
"$top"/*) rel=${out#"$top"/} ;;
esac
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
	(cd "$top" && git ls-files -z --cached --others --exclude-standard -- . ${rel:+":(exclude)$rel"} |
		tar --null -T - -cf -) | tar -C "$src" -xf -
elif [[ -x $top/configure && ! -e $top/config.status ]]; then
	(cd "$top" && tar -cf - ${rel:+--exclude="./$rel"} .) | tar -C "$src" -xf -
else
	die "$top is neither a git checkout nor an unconfigured release tree (run make distclean there, or unpack the tarball afresh)"
fi
(cd "$src" && dpkg-buildpackage -b -us -uc -j"${JOBS:-$(nproc)}" >"$out/build.log" 2>&1) ||
	{ tail -n 40 "$out/build.log" >&2; die "dpkg-buildpackage failed (log: $out/build.log)"; }
ls "$out"/*.deb

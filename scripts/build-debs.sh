#!/bin/bash
# Builds the Debian packages (debian/) from the files of this tree git does not ignore,
# in a copy under OUTDIR (default build-deb/), so the tree stays unconfigured;
# the .deb files land in OUTDIR. With CUDA at $CUDA_HOME (default
# /usr/local/cuda) they carry the cuda backend. Usage: scripts/build-debs.sh [OUTDIR]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$top/build-deb}")
version=$(sed -n '1s/^aegaeon (\([^)]*\)).*/\1/p' "$top/debian/changelog")
src=$out/aegaeon-$version

rm -rf "$out"
mkdir -p "$src"
(cd "$top" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$src" -xf -
(cd "$src" && dpkg-buildpackage -b -us -uc -j"${JOBS:-$(nproc)}" >"$out/build.log" 2>&1) ||
	{ tail -n 40 "$out/build.log" >&2; echo "build-debs: dpkg-buildpackage failed (log: $out/build.log)" >&2; exit 1; }
ls "$out"/*.deb

#!/bin/bash
# Downloads, for a GPU machine without a package registry, the wheels of the
# public loaders bench/userpath.py measures against (fastsafetensors and
# instanttensor, the versions below) built for its Python (CPython 3.12,
# x86-64 manylinux), and the wheels of every dependency they need that this
# Python lacks, found through each wheel's METADATA (Requires-Dist, markers
# evaluated for that Python; extras left out). They go into .whl/ (ignored by
# git), one version of each project: scripts/gpu-bundle.sh carries them and
# gpu-run.sh userpath installs them into a temporary directory on PYTHONPATH.
#
# Usage: scripts/fetch-wheels.sh [NAME==VERSION...]
#   HAVE   the projects that Python has already [torch transformers safetensors
#          cupy numpy typer tqdm: the GPU machine's torch Python]
#   PYTHON the Python that runs pip here [python3]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dest=$top/.whl
python=${PYTHON:-python3}
have=${HAVE:-torch transformers safetensors cupy numpy typer tqdm}
want=("$@")
((${#want[@]})) || want=(fastsafetensors==0.5.0 instanttensor==0.2.2)

platforms=()
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# norm NAME: the project name as PEP 503 compares them
norm() { tr 'A-Z_.' 'a-z--' <<<"$1" | sed 's/--*/-/g'; }

# deps WHEEL: the requirements of WHEEL for CPython 3.12 on Linux x86-64, one a line
deps() {
	"$python" - "$1" <<-'PY'
	import sys, zipfile
	from pip._vendor.packaging.requirements import Requirement
	env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
	       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
	       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
	with zipfile.ZipFile(sys.argv[1]) as z:
	    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
	    for line in z.read(meta).decode().splitlines():
	        if line.startswith("Requires-Dist:"):
	            req = Requirement(line.split(":", 1)[1].strip())
	            if req.marker is None or req.marker.evaluate(env):
	                print(req.name + str(req.specifier))
	PY
}

mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
seen=" $(for h in $have; do norm "$h"; done | tr '\n' ' ')"
queue=("${want[@]}")
while ((${#queue[@]})); do
	spec=${queue[0]}
	queue=("${queue[@]:1}")
	name=$(norm "$(sed -E 's/[<>=!~ ;[].*//' <<<"$spec")")
	[[ $seen == *" $name "* && ! " ${want[*]} " == *" $spec "* ]] && continue
	seen+="$name "
	rm -rf "$tmp/dl" && mkdir "$tmp/dl"
	"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		"${platforms[@]}" -d "$tmp/dl" "$spec" ||
		{ echo "fetch-wheels: no wheel of '$spec' for CPython 3.12 on manylinux x86-64" >&2; exit 1; }
	for w in "$tmp"/dl/*.whl; do
		# One version of each project: an older wheel of it beside would stop the install.
		for old in "$dest"/*.whl; do
			[[ -e $old && $(norm "$(basename "$old" | cut -d- -f1)") == "$name" && $(basename "$old") != $(basename "$w") ]] &&
				rm -f "$old"
		done
		mv -f "$w" "$dest/"
		echo "fetch-wheels: $(basename "$w")"
		while read -r dep; do
			[[ -n $dep ]] || continue
			d=$(norm "$(sed -E 's/[<>=!~ ;[].*//' <<<"$dep")")
			if [[ $seen == *" $d "* ]]; then
				[[ " $(for h in $have; do norm "$h"; done | tr '\n' ' ')" == *" $d "* ]] &&
					echo "fetch-wheels:   needs $dep: the GPU machine's Python has it"
			else
				echo "fetch-wheels:   needs $dep: fetched too"
				queue+=("$dep")
			fi
		done < <(deps "$dest/$(basename "$w")")
	done
done
du -sh "$dest" | awk '{ print "fetch-wheels: " $1 " in .whl/" }'

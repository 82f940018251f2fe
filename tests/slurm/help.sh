#!/bin/bash
# The plugin's options are listed in srun, sbatch and salloc --help.
source "$(dirname "$0")/cluster.sh"

cluster_start || { fail "cluster starts"; finish; exit; }

for cmd in srun sbatch salloc; do
	out=$(as_user "$cmd" --help 2>&1)
	for opt in "--aegaeon-slab=SIZE|PCT%" "--aegaeon-pinned=SIZE[:BUFFER]" \
		"--aegaeon-prefetch=PATH[,PATH...]" "--aegaeon-device=cuda|host"; do
		check "$cmd --help lists $opt" grep -qF -- "$opt" <<<"$out"
	done
	check "$cmd --help explains the slab option" grep -qF "GPU memory slab reserved for the job" <<<"$out"
done

finish

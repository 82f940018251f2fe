#!/bin/bash
# Downloads Debian 12's Slurm and munge packages, with the libraries they may
# miss elsewhere, into a folder (default .debs/), so scripts/gpu-bundle.sh can
# carry them to a GPU machine without a package registry, where
# tests/gpu/slurm_e2e.sh unpacks them into a prefix (never into /).
# Run it on a Debian 12 machine that reaches the registry (apt-get update first
# if a package is not found). Usage: scripts/fetch-slurm-debs.sh [DIR]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${1:-$top/.debs}")

# The list verified on the H100 machine (Ubuntu 24.04); it lacked none of the libraries.
pkgs=(slurmd slurmctld slurm-client munge libmunge2 slurm-wlm-basic-plugins libhwloc15 libjson-c5
	liblua5.1-0 liblz4-1 libnuma1 libyaml-0-2 libdbus-1-3 libgcrypt20 libgpg-error0 libreadline8
	libbz2-1.0 libpam0g libxml2 libudev1 libicu72 liblzma5 libsystemd0 libcap2 libzstd1 libtinfo6
	libhttp-parser2.9 libjwt0 libssl3 libcurl4 libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200
	libpmix2)

mkdir -p "$dir"
# apt-get download writes into the current directory, and as root through the _apt user.
chmod 777 "$dir"
(cd "$dir" && apt-get download -q "${pkgs[@]}")
chmod 755 "$dir"
n=$(find "$dir" -maxdepth 1 -name '*.deb' | wc -l)
echo "$n packages, $(du -sh "$dir" | cut -f1) in $dir"

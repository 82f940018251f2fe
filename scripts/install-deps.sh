#!/bin/bash
# Installs what building and testing aegaeon needs on Debian 12 (run as root).
# --runtime-only: only what the quickstart's Slurm cluster needs besides the build.
set -euo pipefail

build_pkgs=(autoconf automake libtool make gcc pkg-config
	libhwloc-dev hwloc libconfig-dev libjansson-dev libcmocka-dev
	libslurm-dev python3 python3-dev python3-pip python3-venv
	clang libclang-rt-14-dev)
slurm_pkgs=(slurmctld slurmd slurm-client munge)

if [ "$(id -u)" != 0 ]; then
	echo "install-deps.sh: run as root (it calls apt-get)" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${build_pkgs[@]}" "${slurm_pkgs[@]}" \
	valgrind procps util-linux
# The Debian packages start their daemons where systemd runs; the project's
# clusters are throwaway ones with their own configuration, so stop those.
for s in slurmctld slurmd munge; do
	systemctl disable --now "$s" >/dev/null 2>&1 || true
done

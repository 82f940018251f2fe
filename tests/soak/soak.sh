#!/bin/bash
# make check's soak: tests/soak/soak (8 processes of mixed operations against
# one aegaeond, host backend) for $AEGAEON_SOAK_SECONDS (default 45) seconds.
# A sanitizer build gets more slack for the agent's memory (ASan's quarantine).
set -u
B=${top_builddir:-.}
[[ -x $B/tests/soak/soak && -x $B/aegaeond ]] || { echo "no $B/tests/soak/soak or $B/aegaeond: build first"; exit 99; }
export AEGAEON_CONFIG=/dev/null AEGAEON_SOAK_SECONDS=${AEGAEON_SOAK_SECONDS:-45}
unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_SLAB0_HANDLE AEGAEON_HOST_PCI_BUS_IDS
slack=8MiB
[[ -n ${SANITIZER_FLAGS:-} ]] && slack=64MiB
exec "$B/tests/soak/soak" --agent "$B/aegaeond" --device host --workers 8 --rss-slack "$slack"

#!/bin/bash
# make check's soak: tests/soak/soak (8 processes of mixed operations against
# one aegaeond, host backend) for $AEGAEON_SOAK_SECONDS (default 45) seconds.
# In a sanitizer build ASan's quarantine is kept small and the agent's memory
# gets more slack (its leaks show as an unclean exit through LeakSanitizer).
set -u
B=${top_builddir:-.}
[[ -x $B/tests/soak/soak && -x $B/aegaeond ]] || { echo "no $B/tests/soak/soak or $B/aegaeond: build first"; exit 99; }
export AEGAEON_CONFIG=/dev/null AEGAEON_SOAK_SECONDS=${AEGAEON_SOAK_SECONDS:-45}
unset AEGAEON_SOCKET AEGAEON_SLABS AEGAEON_SLAB0_HANDLE AEGAEON_HOST_PCI_BUS_IDS
slack=8MiB
if [[ -n ${SANITIZER_FLAGS:-} ]]; then
	slack=64MiB
	export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=1:quarantine_size_mb=16
fi
exec "$B/tests/soak/soak" --agent "$B/aegaeond" --device host --workers 8 --rss-slack "$slack"

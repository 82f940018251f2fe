/* Topology internals shared by the library, CLI and agent; never installed. */
#ifndef AEGAEON_TOPO_INTERNAL_H
#define AEGAEON_TOPO_INTERNAL_H

#include <stdint.h>

#include <aegaeon/topo.h>

/*
 * aeg_topo_live - the topology aeg_topo_load(&t, NULL) would give, loaded
 * once per process for each source (the live machine, or the XML of
 * $AEGAEON_TOPOLOGY_XML under the $HWLOC_THISSYSTEM of the time) and kept
 * until exit: later calls with the same environment return the same handle
 * without touching hwloc. The handle is shared and read-only; never destroy
 * it. A failed load is not kept (the next call tries again). Thread-safe.
 * Errors: those of aeg_topo_load.
 */
int aeg_topo_live(const aeg_topo_t **topo);

/*
 * aeg_topo_sole_node - the one NUMA node of a machine that has one
 * (/sys/devices/system/node/online names a single node) and no
 * $AEGAEON_TOPOLOGY_XML given, else -1. There every page is on that node
 * and every CPU next to it: pools and threads need no topology, whose
 * discovery takes 14-17 ms on an idle H200 machine and 43-98 ms beside a
 * fresh process's first load.
 */
int aeg_topo_sole_node(void);

/* How many topologies aeg_topo_live loaded in this process (tests). */
uint64_t aeg_topo_live_loads(void);

/*
 * aeg_topo_cpu_count - how many CPUs are local to @pci_bus_id and usable by
 * this process (every usable one when it has no locality), or an error of
 * aeg_topo_locality.
 */
int aeg_topo_cpu_count(const aeg_topo_t *topo, const char *pci_bus_id);

#endif

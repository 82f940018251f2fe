/* aegaeon topology: where each GPU sits (PCI bus id, NUMA nodes, local CPUs). */
#ifndef AEGAEON_TOPO_H
#define AEGAEON_TOPO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_topo aeg_topo_t;

#define AEG_PCI_BUS_ID_LEN 16   /* "0000:3b:00.0" and a NUL */
#define AEG_MAX_NUMA 64

struct aeg_gpu_locality {
	char pci_bus_id[AEG_PCI_BUS_ID_LEN]; /* lower case, domain included */
	int numa_nodes[AEG_MAX_NUMA];        /* OS indexes of the local NUMA nodes */
	int numa_count;                      /* 0 when unknown */
	char cpus[256];                      /* local CPUs as a list: "0-15,32-47" */
	int has_locality;                    /* 0: the OS reported none, cpus is every CPU */
};

/*
 * aeg_topo_load - discover the machine's topology with hwloc (PCI devices
 * included). @xml_path loads a saved hwloc XML instead; NULL means
 * $AEGAEON_TOPOLOGY_XML when set, else the live machine.
 * Errors: AEG_ENOENT (no such XML), AEG_EINVAL (unreadable XML), AEG_ENOMEM.
 */
int aeg_topo_load(aeg_topo_t **topo, const char *xml_path);
void aeg_topo_destroy(aeg_topo_t *topo);

/* aeg_topo_gpu_count - NVIDIA GPUs (PCI vendor 0x10de, display class) seen. */
int aeg_topo_gpu_count(const aeg_topo_t *topo);

/* aeg_topo_gpu_pci - PCI bus id of the @index-th GPU seen, in PCI order. */
int aeg_topo_gpu_pci(const aeg_topo_t *topo, int index, char pci_bus_id[AEG_PCI_BUS_ID_LEN]);

/*
 * aeg_topo_locality - locality of the PCI device @pci_bus_id (any case, with
 * or without the "0000:" domain). A device the topology does not hold, or
 * one with no locality, gives has_locality = 0 and every CPU (not an error).
 * AEG_EINVAL for a malformed bus id.
 */
int aeg_topo_locality(const aeg_topo_t *topo, const char *pci_bus_id,
		      struct aeg_gpu_locality *loc);

/*
 * aeg_topo_bind_thread - bind the calling thread to the CPUs local to
 * @pci_bus_id (no-op without locality). aeg_topo_bind_memory - bind the
 * pages of [addr, addr+len) to its NUMA nodes; call before the pages are
 * first touched. Both return 0, or AEG_ENOTSUP where the OS refuses.
 */
int aeg_topo_bind_thread(const aeg_topo_t *topo, const char *pci_bus_id);
int aeg_topo_bind_memory(const aeg_topo_t *topo, const char *pci_bus_id, void *addr, size_t len);

#ifdef __cplusplus
}
#endif
#endif

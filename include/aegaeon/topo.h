/* aegaeon topology: where each GPU sits (PCI bus id, NUMA nodes, local CPUs). */
#ifndef AEGAEON_TOPO_H
#define AEGAEON_TOPO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A loaded topology is read-only: every function below may be called from
 * several threads at once on the same handle; destroy it only after all
 * calls have returned.
 */
typedef struct aeg_topo aeg_topo_t;

#define AEG_PCI_BUS_ID_LEN 16   /* "0000:3b:00.0" and a NUL */
#define AEG_MAX_NUMA 64
#define AEG_CPU_LIST_LEN 1024   /* room for sparse lists ("0,2,4,...") of big nodes */

struct aeg_gpu_locality {
	char pci_bus_id[AEG_PCI_BUS_ID_LEN]; /* lower case, domain included */
	int numa_nodes[AEG_MAX_NUMA];        /* OS indexes of the local NUMA nodes */
	int numa_count;                      /* 0 when unknown */
	char cpus[AEG_CPU_LIST_LEN];         /* local CPUs as a list: "0-15,32-47" */
	int has_locality;                    /* 0: the OS reported none, cpus is every CPU */
};

/*
 * aeg_topo_load - discover the machine's topology with hwloc (PCI devices
 * included). @xml_path loads a saved hwloc XML instead (`lstopo file.xml`);
 * NULL means $AEGAEON_TOPOLOGY_XML when set and not empty, else the live
 * machine. A topology loaded from XML is not taken for this machine's
 * unless $HWLOC_THISSYSTEM=1, so binding on it gives AEG_ENOTSUP.
 * On success *@topo is a handle for aeg_topo_destroy().
 * Errors: AEG_ENOENT (no such XML), AEG_EINVAL (unreadable or invalid XML, or
 * a path that is not a regular file: a FIFO would block hwloc for ever),
 * AEG_ENOMEM, AEG_EIO (hwloc could not discover the live machine).
 */
int aeg_topo_load(aeg_topo_t **topo, const char *xml_path);

/* aeg_topo_destroy - free @topo; NULL is ignored. */
void aeg_topo_destroy(aeg_topo_t *topo);

/*
 * aeg_topo_gpu_count - NVIDIA GPUs (PCI vendor 0x10de, class 0x0300 VGA or
 * 0x0302 3D controller) seen; AEG_EINVAL for a NULL @topo.
 */
int aeg_topo_gpu_count(const aeg_topo_t *topo);

/*
 * aeg_topo_gpu_pci - PCI bus id ("0000:3b:00.0") of the @index-th GPU seen,
 * in PCI order (domain, bus, device, function). AEG_ENODEV when @index is
 * not below aeg_topo_gpu_count().
 */
int aeg_topo_gpu_pci(const aeg_topo_t *topo, int index, char pci_bus_id[AEG_PCI_BUS_ID_LEN]);

/*
 * aeg_topo_locality - locality of the PCI device @pci_bus_id (any case, with
 * or without the domain: "3B:00.0", "0000:3b:00.0", "00000000:3B:00.0" as
 * nvidia-smi writes it). Local CPUs and nodes are those of the device's
 * first non-I/O ancestor, restricted to the ones this process may use.
 * A device the topology does not hold, one attached to the whole machine
 * of a multi-node machine (the OS reported no locality), or one whose local
 * CPUs are all out of reach gives has_locality = 0, numa_count = 0 and every
 * usable CPU (not an error; logged once per topology at info level). On a
 * machine with a single NUMA node every device is local to it.
 * Errors: AEG_EINVAL for a malformed bus id, AEG_ERANGE when the CPU list
 * does not fit AEG_CPU_LIST_LEN, AEG_ENOMEM.
 */
int aeg_topo_locality(const aeg_topo_t *topo, const char *pci_bus_id,
		      struct aeg_gpu_locality *loc);

/*
 * aeg_topo_bind_thread - bind the calling thread to the CPUs local to
 * @pci_bus_id. aeg_topo_bind_memory - bind the pages of [addr, addr+len) to
 * its NUMA nodes, not strictly: pages are placed there while the nodes have
 * free memory, elsewhere after, rather than failing (hwloc's non-strict
 * HWLOC_MEMBIND_BIND); call before the pages are first touched.
 * Errors: AEG_EINVAL for a malformed bus id or a bad range; AEG_ENOTSUP,
 * whatever the device, when @topo was loaded from XML that is not this
 * machine's, and where the OS refuses the binding. Otherwise both return 0,
 * without doing anything when the device has no locality (see
 * aeg_topo_locality).
 */
int aeg_topo_bind_thread(const aeg_topo_t *topo, const char *pci_bus_id);
int aeg_topo_bind_memory(const aeg_topo_t *topo, const char *pci_bus_id, void *addr, size_t len);

#ifdef __cplusplus
}
#endif
#endif

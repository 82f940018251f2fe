/* Topology with hwloc: NVIDIA GPUs on PCI, their NUMA nodes and local CPUs, binding. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <hwloc.h>

#include <aegaeon/topo.h>

#include "internal.h"
#include "topo_internal.h"

#define NVIDIA_VENDOR 0x10de
#define CLASS_VGA 0x0300
#define CLASS_3D 0x0302

struct pci_addr {
	unsigned domain, bus, dev, func;
};

struct aeg_topo {
	hwloc_topology_t hw;
	char *xml_path;         /* NULL for the live machine */
	struct pci_addr *gpus;
	int gpu_count;
	atomic_int quiet;       /* the "no locality" message was logged */
};

static void format_addr(const struct pci_addr *a, char out[AEG_PCI_BUS_ID_LEN])
{
	snprintf(out, AEG_PCI_BUS_ID_LEN, "%04x:%02x:%02x.%x", a->domain, a->bus, a->dev, a->func);
}

/* Exactly @n hex digits at @s (n > 0). */
static int hex_field(const char *s, size_t n, unsigned *v)
{
	unsigned x = 0;

	for (size_t i = 0; i < n; i++) {
		if (!isxdigit((unsigned char)s[i]))
			return -1;
		x = x * 16 + (unsigned)(isdigit((unsigned char)s[i]) ? s[i] - '0' :
					  tolower((unsigned char)s[i]) - 'a' + 10);
	}
	*v = x;
	return 0;
}

/*
 * [DOMAIN:]BB:DD.F in hex, any case; DOMAIN of 1 to 8 digits (nvidia-smi
 * writes 8). hwloc 2 keeps 16-bit domains, so larger ones cannot match.
 */
static int parse_bus_id(const char *text, struct pci_addr *a)
{
	const char *p = text, *colon;
	size_t len;

	if (text == NULL)
		return aeg_fail(AEG_EINVAL, "PCI bus id missing");
	colon = strchr(text, ':');
	a->domain = 0;
	if (colon != NULL && strchr(colon + 1, ':') != NULL) {
		len = (size_t)(colon - text);
		if (len < 1 || len > 8 || hex_field(text, len, &a->domain) < 0)
			goto malformed;
		p = colon + 1;
	}
	if (strlen(p) != 7 || p[2] != ':' || p[5] != '.' ||
	    hex_field(p, 2, &a->bus) < 0 || hex_field(p + 3, 2, &a->dev) < 0 ||
	    hex_field(p + 6, 1, &a->func) < 0)
		goto malformed;
	if (a->domain > 0xffff)
		return aeg_fail(AEG_EINVAL, "PCI domain 0x%x of bus id '%s' is over 0xffff, the largest hwloc supports",
				a->domain, text);
	if (a->dev > 0x1f)
		return aeg_fail(AEG_EINVAL, "PCI device 0x%x of bus id '%s' is over 0x1f", a->dev, text);
	if (a->func > 7)
		return aeg_fail(AEG_EINVAL, "PCI function %u of bus id '%s' is over 7", a->func, text);
	return 0;
malformed:
	return aeg_fail(AEG_EINVAL, "PCI bus id '%s' is not [DOMAIN:]BUS:DEVICE.FUNCTION in hex, like 0000:3b:00.0",
			text);
}

static int addr_cmp(const void *x, const void *y)
{
	const struct pci_addr *a = x, *b = y;

	if (a->domain != b->domain)
		return a->domain < b->domain ? -1 : 1;
	if (a->bus != b->bus)
		return a->bus < b->bus ? -1 : 1;
	if (a->dev != b->dev)
		return a->dev < b->dev ? -1 : 1;
	if (a->func != b->func)
		return a->func < b->func ? -1 : 1;
	return 0;
}

static int is_gpu(hwloc_obj_t pci)
{
	return pci->attr->pcidev.vendor_id == NVIDIA_VENDOR &&
	       (pci->attr->pcidev.class_id == CLASS_VGA || pci->attr->pcidev.class_id == CLASS_3D);
}

static int find_gpus(aeg_topo_t *t)
{
	hwloc_obj_t obj = NULL;
	int n = 0;

	while ((obj = hwloc_get_next_pcidev(t->hw, obj)) != NULL)
		n += is_gpu(obj);
	if (n == 0)
		return 0;
	t->gpus = calloc((size_t)n, sizeof(*t->gpus));
	if (t->gpus == NULL)
		return aeg_fail(AEG_ENOMEM, "no memory for a table of %d GPUs", n);
	while ((obj = hwloc_get_next_pcidev(t->hw, obj)) != NULL) {
		if (!is_gpu(obj))
			continue;
		t->gpus[t->gpu_count++] = (struct pci_addr){
			.domain = obj->attr->pcidev.domain, .bus = obj->attr->pcidev.bus,
			.dev = obj->attr->pcidev.dev, .func = obj->attr->pcidev.func,
		};
	}
	/* hwloc lists devices in tree order, which follows NUMA nodes, not bus ids */
	qsort(t->gpus, (size_t)t->gpu_count, sizeof(*t->gpus), addr_cmp);
	return 0;
}

static int xml_error(const char *path, int err)
{
	if (err == ENOMEM)
		return aeg_fail(AEG_ENOMEM, "loading topology XML %s: %s", path, strerror(err));
	if (err == EINVAL)
		return aeg_fail(AEG_EINVAL, "topology XML %s is not a valid hwloc XML export; check it with lstopo --input %s",
				path, path);
	return aeg_fail(AEG_EINVAL, "topology XML %s cannot be read: %s", path, strerror(err));
}

static int load_hwloc(aeg_topo_t *t)
{
	if (hwloc_topology_init(&t->hw) < 0) {
		t->hw = NULL;
		return aeg_fail(AEG_ENOMEM, "hwloc_topology_init: %s", strerror(errno));
	}
	/* every PCI device, so any bus id can be looked up, not only the "important" ones */
	if (hwloc_topology_set_io_types_filter(t->hw, HWLOC_TYPE_FILTER_KEEP_IMPORTANT) < 0 ||
	    hwloc_topology_set_type_filter(t->hw, HWLOC_OBJ_PCI_DEVICE, HWLOC_TYPE_FILTER_KEEP_ALL) < 0)
		return aeg_fail(AEG_EIO, "hwloc refused to keep PCI devices: %s", strerror(errno));
#if HWLOC_API_VERSION >= 0x00020100
	/*
	 * The linux backend reads the same PCI data from sysfs; the libpciaccess
	 * plugin would be dlopened on every load and leaks about 1 KiB each time.
	 */
	if (hwloc_topology_set_components(t->hw, HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, "pci") < 0)
		aeg_debug("hwloc kept its pci component: %s", strerror(errno));
#endif
	/* hwloc 2 parses the XML in set_xml already; load checks what it describes */
	if (t->xml_path != NULL && hwloc_topology_set_xml(t->hw, t->xml_path) < 0)
		return xml_error(t->xml_path, errno);
	if (hwloc_topology_load(t->hw) < 0) {
		if (t->xml_path != NULL)
			return xml_error(t->xml_path, errno);
		if (errno == ENOMEM)
			return aeg_fail(AEG_ENOMEM, "hwloc_topology_load: %s", strerror(errno));
		return aeg_fail(AEG_EIO, "hwloc could not discover this machine's topology: %s", strerror(errno));
	}
	return 0;
}

/* The XML aeg_topo_load(NULL) reads: $AEGAEON_TOPOLOGY_XML when set and not empty, else NULL. */
static const char *env_xml(void)
{
	const char *xml_path = getenv("AEGAEON_TOPOLOGY_XML");

	return xml_path != NULL && *xml_path != '\0' ? xml_path : NULL;
}

int aeg_topo_sole_node(void)
{
	char buf[32];
	FILE *f;
	char *end;
	long n;

	if (env_xml() != NULL)
		return -1;
	f = fopen("/sys/devices/system/node/online", "re");
	if (f == NULL)
		return -1;
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	fclose(f);
	n = strtol(buf, &end, 10);
	if (end == buf || n < 0 || n > 4095 || (*end != '\n' && *end != '\0'))
		return -1;
	return (int)n;
}

static int load(aeg_topo_t **topo, const char *xml_path, const char *from)
{
	aeg_topo_t *t = NULL;
	struct stat st;
	int err;

	if (xml_path != NULL) {
		if (*xml_path == '\0')
			return aeg_fail(AEG_EINVAL, "topology XML path is empty");
		if (stat(xml_path, &st) < 0)
			return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EINVAL,
					"topology XML %s%s: %s", xml_path, from, strerror(errno));
		if (S_ISDIR(st.st_mode))
			return aeg_fail(AEG_EINVAL, "topology XML %s%s is a directory", xml_path, from);
		/* hwloc would wait for ever on a FIFO, or read a device without end. */
		if (!S_ISREG(st.st_mode))
			return aeg_fail(AEG_EINVAL, "topology XML %s%s is not a regular file", xml_path, from);
	}

	t = calloc(1, sizeof(*t));
	if (t == NULL)
		return aeg_fail(AEG_ENOMEM, "no memory for a topology");
	if (xml_path != NULL && (t->xml_path = strdup(xml_path)) == NULL) {
		err = aeg_fail(AEG_ENOMEM, "no memory for a topology");
		goto fail;
	}
	err = load_hwloc(t);
	if (err < 0)
		goto fail;
	err = find_gpus(t);
	if (err < 0)
		goto fail;
	aeg_debug("topology of %s: %d NVIDIA GPUs, %d NUMA nodes", t->xml_path ? t->xml_path : "this machine",
		  t->gpu_count, hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_NUMANODE));
	*topo = t;
	return 0;
fail:
	aeg_topo_destroy(t);
	return err;
}

AEG_EXPORT int aeg_topo_load(aeg_topo_t **topo, const char *xml_path)
{
	if (topo == NULL)
		return aeg_fail(AEG_EINVAL, "topology handle pointer missing");
	*topo = NULL;
	if (xml_path == NULL)
		return load(topo, env_xml(), " (from $AEGAEON_TOPOLOGY_XML)");
	return load(topo, xml_path, "");
}

/*
 * Topologies loaded for aeg_topo_live, one per source, kept until the
 * process exits: callers hold them without references. The list only grows
 * and entries never change once published, so lookups take no lock; the
 * lock only keeps two threads from loading the same source at once.
 */
struct live_topo {
	struct live_topo *next;
	char *thissystem;       /* $HWLOC_THISSYSTEM at load time, NULL when unset */
	aeg_topo_t *topo;
};

static _Atomic(struct live_topo *) live_list;
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_uint_fast64_t live_loads;

static int same(const char *a, const char *b)
{
	return a == NULL || b == NULL ? a == b : strcmp(a, b) == 0;
}

static const aeg_topo_t *live_find(const char *xml_path, const char *thissystem)
{
	for (struct live_topo *e = atomic_load_explicit(&live_list, memory_order_acquire); e != NULL; e = e->next)
		if (same(e->topo->xml_path, xml_path) && same(e->thissystem, thissystem))
			return e->topo;
	return NULL;
}

int aeg_topo_live(const aeg_topo_t **topo)
{
	const char *xml_path = env_xml(), *thissystem = getenv("HWLOC_THISSYSTEM");
	struct live_topo *e = NULL;
	aeg_topo_t *t = NULL;
	int err;

	*topo = live_find(xml_path, thissystem);
	if (*topo != NULL)
		return 0;
	pthread_mutex_lock(&live_lock);
	*topo = live_find(xml_path, thissystem);
	if (*topo != NULL) {
		err = 0;
		goto out;
	}
	err = load(&t, xml_path, " (from $AEGAEON_TOPOLOGY_XML)");
	if (err < 0)
		goto out;
	atomic_fetch_add(&live_loads, 1);
	e = calloc(1, sizeof(*e));
	if (e == NULL || (thissystem != NULL && (e->thissystem = strdup(thissystem)) == NULL)) {
		err = aeg_fail(AEG_ENOMEM, "no memory for a topology");
		goto out;
	}
	e->topo = t;
	e->next = atomic_load_explicit(&live_list, memory_order_relaxed);
	atomic_store_explicit(&live_list, e, memory_order_release);
	*topo = t;
	t = NULL;
	e = NULL;
out:
	pthread_mutex_unlock(&live_lock);
	if (e != NULL)
		free(e->thissystem);
	free(e);
	aeg_topo_destroy(t);
	return err;
}

uint64_t aeg_topo_live_loads(void)
{
	return atomic_load(&live_loads);
}

/* Free the cached topologies when the library goes (exit, dlclose), for leak checkers. */
__attribute__((destructor)) static void live_free(void)
{
	struct live_topo *e = atomic_exchange(&live_list, NULL);

	while (e != NULL) {
		struct live_topo *next = e->next;

		aeg_topo_destroy(e->topo);
		free(e->thissystem);
		free(e);
		e = next;
	}
}

AEG_EXPORT void aeg_topo_destroy(aeg_topo_t *t)
{
	if (t == NULL)
		return;
	if (t->hw != NULL)
		hwloc_topology_destroy(t->hw);
	free(t->gpus);
	free(t->xml_path);
	free(t);
}

AEG_EXPORT int aeg_topo_gpu_count(const aeg_topo_t *t)
{
	if (t == NULL)
		return aeg_fail(AEG_EINVAL, "topology missing");
	return t->gpu_count;
}

AEG_EXPORT int aeg_topo_gpu_pci(const aeg_topo_t *t, int index, char pci_bus_id[AEG_PCI_BUS_ID_LEN])
{
	if (t == NULL || pci_bus_id == NULL)
		return aeg_fail(AEG_EINVAL, "topology or output buffer missing");
	if (index < 0 || index >= t->gpu_count)
		return aeg_fail(AEG_ENODEV, "GPU index %d is not below %d, the number of NVIDIA GPUs in the topology",
				index, t->gpu_count);
	format_addr(&t->gpus[index], pci_bus_id);
	return 0;
}

static hwloc_obj_t find_pci(hwloc_topology_t hw, const struct pci_addr *a)
{
	hwloc_obj_t obj = hwloc_get_pcidev_by_busid(hw, a->domain, a->bus, a->dev, a->func);

	if (obj != NULL)
		return obj;
	/* PCI-to-PCI bridges (switch ports) are Bridge objects, not PCI devices */
	while ((obj = hwloc_get_next_bridge(hw, obj)) != NULL) {
		const struct hwloc_pcidev_attr_s *up = &obj->attr->bridge.upstream.pci;

		if (obj->attr->bridge.upstream_type == HWLOC_OBJ_BRIDGE_PCI && up->domain == a->domain &&
		    up->bus == a->bus && up->dev == a->dev && up->func == a->func)
			return obj;
	}
	return NULL;
}

/*
 * The usable CPUs and NUMA nodes local to the device at @a: 1 with @cpus and
 * @nodes set, 0 when there is no locality (@cpus is then every usable CPU),
 * or an error.
 */
static int local_sets(const aeg_topo_t *t, const struct pci_addr *a, hwloc_bitmap_t cpus, hwloc_bitmap_t nodes)
{
	hwloc_const_cpuset_t allowed_cpus = hwloc_topology_get_allowed_cpuset(t->hw);
	hwloc_const_nodeset_t allowed_nodes = hwloc_topology_get_allowed_nodeset(t->hw);
	hwloc_obj_t root = hwloc_get_root_obj(t->hw), dev, anc;
	char id[AEG_PCI_BUS_ID_LEN];
	const char *why;

	dev = find_pci(t->hw, a);
	if (dev == NULL) {
		why = "is not in the topology";
		goto none;
	}
	anc = hwloc_get_non_io_ancestor_obj(t->hw, dev);
	/*
	 * A device hanging off the machine of a multi-node box is how hwloc
	 * shows "the kernel reported no NUMA node"; with a single node there is
	 * nothing to choose and that node is the device's.
	 */
	if (hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_NUMANODE) > 1 &&
	    hwloc_bitmap_isincluded(root->nodeset, anc->nodeset)) {
		why = "has no NUMA locality (it is attached to the whole machine)";
		goto none;
	}
	if (hwloc_bitmap_and(cpus, anc->cpuset, allowed_cpus) < 0 ||
	    hwloc_bitmap_and(nodes, anc->nodeset, allowed_nodes) < 0)
		return aeg_fail(AEG_ENOMEM, "no memory for a cpuset");
	if (hwloc_bitmap_iszero(cpus) || hwloc_bitmap_iszero(nodes)) {
		why = "has local CPUs or NUMA nodes, but none this process may use";
		goto none;
	}
	return 1;
none:
	if (hwloc_bitmap_copy(cpus, allowed_cpus) < 0)
		return aeg_fail(AEG_ENOMEM, "no memory for a cpuset");
	hwloc_bitmap_zero(nodes);
	/* once per topology: a machine without locality would say it for every GPU */
	if (!atomic_exchange(&((aeg_topo_t *)t)->quiet, 1)) {
		format_addr(a, id);
		aeg_info("PCI device %s %s; using every CPU and no memory binding (further devices without locality are not logged)",
			 id, why);
	}
	return 0;
}

/* Look @pci_bus_id up: fills @cpus and @nodes, returns has_locality or an error. */
static int lookup(const aeg_topo_t *t, const char *pci_bus_id, struct pci_addr *a,
		  hwloc_bitmap_t *cpus, hwloc_bitmap_t *nodes)
{
	int err;

	*cpus = NULL;
	*nodes = NULL;
	if (t == NULL)
		return aeg_fail(AEG_EINVAL, "topology missing");
	err = parse_bus_id(pci_bus_id, a);
	if (err < 0)
		return err;
	*cpus = hwloc_bitmap_alloc();
	*nodes = hwloc_bitmap_alloc();
	if (*cpus == NULL || *nodes == NULL)
		return aeg_fail(AEG_ENOMEM, "no memory for a cpuset");
	return local_sets(t, a, *cpus, *nodes);
}

AEG_EXPORT int aeg_topo_locality(const aeg_topo_t *t, const char *pci_bus_id, struct aeg_gpu_locality *loc)
{
	hwloc_bitmap_t cpus, nodes;
	struct pci_addr a;
	unsigned node;
	int ret, len;

	if (loc == NULL)
		return aeg_fail(AEG_EINVAL, "locality output missing");
	memset(loc, 0, sizeof(*loc));
	ret = lookup(t, pci_bus_id, &a, &cpus, &nodes);
	if (ret < 0)
		goto out;
	format_addr(&a, loc->pci_bus_id);
	loc->has_locality = ret;
	if (hwloc_bitmap_weight(nodes) > AEG_MAX_NUMA) {
		ret = aeg_fail(AEG_ERANGE, "PCI device %s is local to %d NUMA nodes, more than %d",
			       loc->pci_bus_id, hwloc_bitmap_weight(nodes), AEG_MAX_NUMA);
		goto out;
	}
	hwloc_bitmap_foreach_begin(node, nodes)
		loc->numa_nodes[loc->numa_count++] = (int)node;
	hwloc_bitmap_foreach_end();
	len = hwloc_bitmap_list_snprintf(loc->cpus, sizeof(loc->cpus), cpus);
	if (len < 0) {
		ret = aeg_fail(AEG_ENOMEM, "formatting the CPU list of %s: %s", loc->pci_bus_id, strerror(errno));
		goto out;
	}
	if ((size_t)len >= sizeof(loc->cpus)) {
		ret = aeg_fail(AEG_ERANGE, "the CPU list of PCI device %s needs %d characters, more than %zu",
			       loc->pci_bus_id, len, sizeof(loc->cpus) - 1);
		goto out;
	}
	ret = 0;
out:
	hwloc_bitmap_free(cpus);
	hwloc_bitmap_free(nodes);
	if (ret < 0) {
		memset(loc, 0, sizeof(*loc));
		return ret;
	}
	return 0;
}

/* hwloc's binding errno as an aeg code: the OS refusing is AEG_ENOTSUP. */
static int bind_error(int err, const char *what, const char *id)
{
	switch (err) {
	case ENOSYS:
	case EXDEV:
	case EPERM:
	case ENOTSUP:
		return aeg_fail(AEG_ENOTSUP, "the OS refused to bind %s to PCI device %s: %s", what, id, strerror(err));
	case EINVAL:
	case EFAULT:
		return aeg_fail(AEG_EINVAL, "binding %s to PCI device %s: %s", what, id, strerror(err));
	case ENOMEM:
		return aeg_fail(AEG_ENOMEM, "binding %s to PCI device %s: %s", what, id, strerror(err));
	default:
		return aeg_fail(-err, "binding %s to PCI device %s: %s", what, id, strerror(err));
	}
}

/* Binding acts on this process: refuse it when the topology describes another machine. */
static int check_this_system(const aeg_topo_t *t, const char *what)
{
	if (hwloc_topology_is_thissystem(t->hw))
		return 0;
	return aeg_fail(AEG_ENOTSUP, "cannot bind %s: the topology was loaded from %s, not from this machine (set HWLOC_THISSYSTEM=1 if that XML describes this machine)",
			what, t->xml_path ? t->xml_path : "another source");
}

AEG_EXPORT int aeg_topo_bind_thread(const aeg_topo_t *t, const char *pci_bus_id)
{
	hwloc_bitmap_t cpus, nodes;
	struct pci_addr a;
	char id[AEG_PCI_BUS_ID_LEN];
	int ret, err;

	ret = lookup(t, pci_bus_id, &a, &cpus, &nodes);
	if (ret < 0)
		goto out;
	err = check_this_system(t, "a thread");
	if (err < 0 || ret == 0) {
		ret = err;
		goto out;
	}
	if (hwloc_set_cpubind(t->hw, cpus, HWLOC_CPUBIND_THREAD) < 0) {
		format_addr(&a, id);
		ret = bind_error(errno, "a thread", id);
		goto out;
	}
	ret = 0;
out:
	hwloc_bitmap_free(cpus);
	hwloc_bitmap_free(nodes);
	return ret;
}

AEG_EXPORT int aeg_topo_bind_memory(const aeg_topo_t *t, const char *pci_bus_id, void *addr, size_t len)
{
	hwloc_bitmap_t cpus, nodes;
	struct pci_addr a;
	char id[AEG_PCI_BUS_ID_LEN];
	int ret, err;

	if (addr == NULL && len > 0)
		return aeg_fail(AEG_EINVAL, "memory range to bind starts at NULL (%zu bytes)", len);
	if ((uintptr_t)addr + len < (uintptr_t)addr)
		return aeg_fail(AEG_EINVAL, "memory range %p + %zu bytes wraps around", addr, len);
	ret = lookup(t, pci_bus_id, &a, &cpus, &nodes);
	if (ret < 0)
		goto out;
	err = check_this_system(t, "memory");
	if (err < 0 || ret == 0 || len == 0) {
		ret = err;
		goto out;
	}
	if (hwloc_set_area_membind(t->hw, addr, len, nodes, HWLOC_MEMBIND_BIND, HWLOC_MEMBIND_BYNODESET) < 0) {
		format_addr(&a, id);
		ret = bind_error(errno, "memory", id);
		goto out;
	}
	ret = 0;
out:
	hwloc_bitmap_free(cpus);
	hwloc_bitmap_free(nodes);
	return ret;
}

int aeg_topo_cpu_count(const aeg_topo_t *t, const char *pci_bus_id)
{
	hwloc_bitmap_t cpus, nodes;
	struct pci_addr a;
	int ret;

	ret = lookup(t, pci_bus_id, &a, &cpus, &nodes);
	if (ret >= 0)
		ret = hwloc_bitmap_weight(cpus);
	hwloc_bitmap_free(cpus);
	hwloc_bitmap_free(nodes);
	return ret;
}

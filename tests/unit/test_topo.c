/*
 * Topology: GPUs, locality and binding on synthetic hwloc XML and the live
 * machine. tests/unit/topo/ holds: two-node.xml (two packages and nodes,
 * CPUs 0-7 and 8-15; GPU 3b:00.0 and NIC 3c:00.0 on node 0, NVSwitch
 * ae:00.0 and GPU af:00.0 behind PCIe switch port ad:00.0 on node 1),
 * two-node-nolocality.xml (the same machine without the switch, its host
 * bridges on the Machine object, af listed before 3b)
 * and one-node.xml (one node, CPUs 0-7, a VGA-class GPU at 01:00.0).
 */
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmocka.h>

#include <hwloc.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "topo_internal.h"
#include "testutil.h"

#define MPOL_PREFERRED 1
#define MPOL_BIND 2
#define MPOL_PREFERRED_MANY 5
#define MPOL_F_ADDR (1 << 1)

static char xml_dir[4096];

static const char *xml(const char *name)
{
	static char path[4200];

	snprintf(path, sizeof(path), "%s/%s", xml_dir, name);
	return path;
}

static aeg_topo_t *load_xml(const char *name)
{
	aeg_topo_t *t = NULL;

	assert_int_equal(aeg_topo_load(&t, xml(name)), 0);
	assert_non_null(t);
	return t;
}

static void assert_gpus(const aeg_topo_t *t, const char *const *ids, int n)
{
	char id[AEG_PCI_BUS_ID_LEN];

	assert_int_equal(aeg_topo_gpu_count(t), n);
	for (int i = 0; i < n; i++) {
		assert_int_equal(aeg_topo_gpu_pci(t, i, id), 0);
		assert_string_equal(id, ids[i]);
	}
	assert_int_equal(aeg_topo_gpu_pci(t, n, id), AEG_ENODEV);
	assert_int_equal(aeg_topo_gpu_pci(t, -1, id), AEG_ENODEV);
}

static void two_node_gpus_in_pci_order(void **state)
{
	static const char *const ids[] = { "0000:3b:00.0", "0000:af:00.0" };
	aeg_topo_t *t = load_xml("two-node.xml");

	/* the NIC (15b3, InfiniBand) and the NVSwitch (10de, class 0680) are not GPUs */
	assert_gpus(t, ids, 2);
	aeg_topo_destroy(t);
}

static void nolocality_gpus_sorted(void **state)
{
	static const char *const ids[] = { "0000:3b:00.0", "0000:af:00.0" };
	aeg_topo_t *t = load_xml("two-node-nolocality.xml");

	assert_gpus(t, ids, 2);
	aeg_topo_destroy(t);
}

static const struct {
	const char *id, *norm, *cpus;
	int nodes;      /* the one local node; -1 for none */
} two_node_cases[] = {
	{ "0000:3b:00.0", "0000:3b:00.0", "0-7", 0 },
	{ "0000:af:00.0", "0000:af:00.0", "8-15", 1 },
	{ "0000:3c:00.0", "0000:3c:00.0", "0-7", 0 },      /* NIC: any PCI device */
	{ "0000:ae:00.0", "0000:ae:00.0", "8-15", 1 },     /* NVSwitch */
	{ "0000:ad:00.0", "0000:ad:00.0", "8-15", 1 },     /* PCIe switch port */
	{ "3B:00.0", "0000:3b:00.0", "0-7", 0 },
	{ "3b:00.0", "0000:3b:00.0", "0-7", 0 },
	{ "0000:3B:00.0", "0000:3b:00.0", "0-7", 0 },
	{ "00000000:AF:00.0", "0000:af:00.0", "8-15", 1 }, /* nvidia-smi */
	{ "0:af:00.0", "0000:af:00.0", "8-15", 1 },
	{ "0000:3b:01.0", "0000:3b:01.0", "0-15", -1 },    /* not in the topology */
	{ "0001:3b:00.0", "0001:3b:00.0", "0-15", -1 },
	{ "ffff:ff:1f.7", "ffff:ff:1f.7", "0-15", -1 },
};

static void two_node_locality(void **state)
{
	aeg_topo_t *t = load_xml("two-node.xml");
	struct aeg_gpu_locality loc;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(two_node_cases); i++) {
		print_message("%s\n", two_node_cases[i].id);
		assert_int_equal(aeg_topo_locality(t, two_node_cases[i].id, &loc), 0);
		assert_string_equal(loc.pci_bus_id, two_node_cases[i].norm);
		assert_string_equal(loc.cpus, two_node_cases[i].cpus);
		if (two_node_cases[i].nodes < 0) {
			assert_int_equal(loc.has_locality, 0);
			assert_int_equal(loc.numa_count, 0);
		} else {
			assert_int_equal(loc.has_locality, 1);
			assert_int_equal(loc.numa_count, 1);
			assert_int_equal(loc.numa_nodes[0], two_node_cases[i].nodes);
		}
	}
	aeg_topo_destroy(t);
}

static void malformed_bus_ids(void **state)
{
	static const struct {
		const char *id, *detail;
	} cases[] = {
		{ "", "'' is not" },
		{ "3b", "'3b' is not" },
		{ "3b:00", "'3b:00' is not" },
		{ "3b:00.", "'3b:00.' is not" },
		{ "3b:00.0 ", "'3b:00.0 ' is not" },
		{ " 3b:00.0", "' 3b:00.0' is not" },
		{ "3b:00.0\n", "is not" },
		{ "3b-00.0", "'3b-00.0' is not" },
		{ "3b:00:0", "'3b:00:0' is not" },
		{ "3g:00.0", "'3g:00.0' is not" },
		{ "03b:00.0", "'03b:00.0' is not" },
		{ "3b:0.0", "'3b:0.0' is not" },
		{ "3b:00.00", "'3b:00.00' is not" },
		{ "+b:00.0", "'+b:00.0' is not" },
		{ ":3b:00.0", "':3b:00.0' is not" },
		{ "000000000:3b:00.0", "'000000000:3b:00.0' is not" },
		{ "0000:3b:00.0:", "'0000:3b:00.0:' is not" },
		{ "0000:0000:3b:00.0", "'0000:0000:3b:00.0' is not" },
		{ "0x00:3b:00.0", "'0x00:3b:00.0' is not" },
		{ "3b:20.0", "device 0x20 of bus id '3b:20.0' is over 0x1f" },
		{ "3b:00.8", "function 8 of bus id '3b:00.8' is over 7" },
		{ "10000:3b:00.0", "domain 0x10000 of bus id '10000:3b:00.0' is over 0xffff" },
	};
	aeg_topo_t *t = load_xml("two-node.xml");
	struct aeg_gpu_locality loc;
	int x = 0;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		print_message("'%s'\n", cases[i].id);
		memset(&loc, 0x5a, sizeof(loc));
		assert_int_equal(aeg_topo_locality(t, cases[i].id, &loc), AEG_EINVAL);
		assert_non_null(strstr(aeg_error_detail(), cases[i].detail));
		assert_int_equal(loc.has_locality, 0);
		assert_string_equal(loc.pci_bus_id, "");
		/* binding checks the id before anything else */
		assert_int_equal(aeg_topo_bind_thread(t, cases[i].id), AEG_EINVAL);
		assert_int_equal(aeg_topo_bind_memory(t, cases[i].id, &x, sizeof(x)), AEG_EINVAL);
	}
	assert_int_equal(aeg_topo_locality(t, NULL, &loc), AEG_EINVAL);
	assert_int_equal(aeg_topo_locality(t, "3b:00.0", NULL), AEG_EINVAL);
	assert_int_equal(aeg_topo_locality(NULL, "3b:00.0", &loc), AEG_EINVAL);
	aeg_topo_destroy(t);
}

static void nolocality_gives_every_cpu(void **state)
{
	static const char *const ids[] = { "0000:3b:00.0", "0000:af:00.0", "3c:00.0" };
	aeg_topo_t *t = load_xml("two-node-nolocality.xml");
	struct aeg_gpu_locality loc;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(ids); i++) {
		assert_int_equal(aeg_topo_locality(t, ids[i], &loc), 0);
		assert_int_equal(loc.has_locality, 0);
		assert_int_equal(loc.numa_count, 0);
		assert_string_equal(loc.cpus, "0-15");
	}
	aeg_topo_destroy(t);
}

static void one_node_device_is_local_to_it(void **state)
{
	static const char *const ids[] = { "0000:01:00.0" };
	aeg_topo_t *t = load_xml("one-node.xml");
	struct aeg_gpu_locality loc;

	assert_gpus(t, ids, 1);
	assert_int_equal(aeg_topo_locality(t, "01:00.0", &loc), 0);
	assert_int_equal(loc.has_locality, 1);
	assert_int_equal(loc.numa_count, 1);
	assert_int_equal(loc.numa_nodes[0], 0);
	assert_string_equal(loc.cpus, "0-7");
	assert_int_equal(aeg_topo_locality(t, "02:00.0", &loc), 0);
	assert_int_equal(loc.has_locality, 0);
	assert_string_equal(loc.cpus, "0-7");
	aeg_topo_destroy(t);
}

/* Run @fn with stderr going to a file; return what it wrote (caller frees). */
static char *capture_stderr(void (*fn)(void *), void *arg)
{
	FILE *tmp = tmpfile();
	int saved = dup(2);
	char *text = calloc(1, 8192);

	assert_non_null(tmp);
	assert_true(saved >= 0);
	assert_non_null(text);
	fflush(stderr);
	assert_int_equal(dup2(fileno(tmp), 2), 2);
	fn(arg);
	fflush(stderr);
	assert_int_equal(dup2(saved, 2), 2);
	close(saved);
	rewind(tmp);
	assert_true(fread(text, 1, 8191, tmp) < 8191);
	fclose(tmp);
	return text;
}

static void lookup_three_times(void *arg)
{
	struct aeg_gpu_locality loc;

	assert_int_equal(aeg_topo_locality(arg, "3b:00.0", &loc), 0);
	assert_int_equal(aeg_topo_locality(arg, "af:00.0", &loc), 0);
	assert_int_equal(aeg_topo_locality(arg, "3b:00.0", &loc), 0);
}

static void nolocality_logged_once(void **state)
{
	enum aeg_log_level old = aeg_log_get_level();
	aeg_topo_t *t = load_xml("two-node-nolocality.xml");
	char *text, *p;
	int n = 0;

	aeg_log_set_level(AEG_LOG_INFO);
	text = capture_stderr(lookup_three_times, t);
	aeg_log_set_level(old);
	for (p = text; (p = strstr(p, "no NUMA locality")) != NULL; p++)
		n++;
	assert_int_equal(n, 1);
	assert_non_null(strstr(text, "info: PCI device 0000:3b:00.0"));
	free(text);
	aeg_topo_destroy(t);
}

static void missing_and_corrupt_xml(void **state)
{
	static const struct {
		const char *name, *text;
	} bad[] = {
		{ "empty.xml", "" },
		{ "text.xml", "this is not XML\n" },
		{ "other.xml", "<?xml version=\"1.0\"?>\n<inventory><gpu/></inventory>\n" },
		{ "truncated.xml", NULL },       /* the first half of two-node.xml */
		{ "nomachine.xml", "<?xml version=\"1.0\"?>\n<topology version=\"2.0\">\n</topology>\n" },
	};
	char dir[] = "/tmp/aegaeon-topo-XXXXXX", path[4200], good[8192];
	aeg_topo_t *t = (aeg_topo_t *)&t;
	FILE *f;
	size_t n;

	assert_int_equal(aeg_topo_load(&t, xml("no-such-file.xml")), AEG_ENOENT);
	assert_null(t);
	assert_non_null(strstr(aeg_error_detail(), xml("no-such-file.xml")));
	assert_int_equal(aeg_topo_load(&t, ""), AEG_EINVAL);
	assert_int_equal(aeg_topo_load(NULL, xml("two-node.xml")), AEG_EINVAL);

	f = fopen(xml("two-node.xml"), "r");
	assert_non_null(f);
	n = fread(good, 1, sizeof(good), f);
	fclose(f);
	assert_true(n > 100 && n < sizeof(good));

	assert_non_null(mkdtemp(dir));
	assert_int_equal(aeg_topo_load(&t, dir), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "is a directory"));
	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		print_message("%s\n", bad[i].name);
		snprintf(path, sizeof(path), "%s/%s", dir, bad[i].name);
		f = fopen(path, "w");
		assert_non_null(f);
		if (bad[i].text != NULL)
			fputs(bad[i].text, f);
		else
			fwrite(good, 1, n / 2, f);
		fclose(f);
		t = (aeg_topo_t *)&t;
		assert_int_equal(aeg_topo_load(&t, path), AEG_EINVAL);
		assert_null(t);
		assert_non_null(strstr(aeg_error_detail(), path));
		assert_non_null(strstr(aeg_error_detail(), "not a valid hwloc XML"));
		assert_int_equal(unlink(path), 0);
	}
	assert_int_equal(rmdir(dir), 0);
}

static void xml_from_environment(void **state)
{
	static const char *const one[] = { "0000:01:00.0" };
	static const char *const two[] = { "0000:3b:00.0", "0000:af:00.0" };
	aeg_topo_t *t = NULL;

	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("one-node.xml"), 1), 0);
	assert_int_equal(aeg_topo_load(&t, NULL), 0);
	assert_gpus(t, one, 1);
	aeg_topo_destroy(t);

	/* an explicit path wins over the environment */
	t = load_xml("two-node.xml");
	assert_gpus(t, two, 2);
	aeg_topo_destroy(t);

	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("no-such-file.xml"), 1), 0);
	assert_int_equal(aeg_topo_load(&t, NULL), AEG_ENOENT);
	assert_null(t);
	assert_non_null(strstr(aeg_error_detail(), "$AEGAEON_TOPOLOGY_XML"));

	/* empty means unset: the live machine, which is this system */
	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", "", 1), 0);
	assert_int_equal(aeg_topo_load(&t, NULL), 0);
	assert_int_equal(aeg_topo_bind_thread(t, "ffff:ff:1f.7"), 0);
	aeg_topo_destroy(t);
	assert_int_equal(unsetenv("AEGAEON_TOPOLOGY_XML"), 0);
}

static void xml_topology_refuses_binding(void **state)
{
	static const char *const ids[] = { "0000:3b:00.0", "af:00.0", "0000:3b:01.0" };
	aeg_topo_t *t = load_xml("two-node.xml");
	cpu_set_t before, after;
	long page = sysconf(_SC_PAGESIZE);
	char *mem;

	mem = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(mem != MAP_FAILED);
	assert_int_equal(sched_getaffinity(0, sizeof(before), &before), 0);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(ids); i++) {
		assert_int_equal(aeg_topo_bind_thread(t, ids[i]), AEG_ENOTSUP);
		assert_non_null(strstr(aeg_error_detail(), "not from this machine"));
		assert_non_null(strstr(aeg_error_detail(), xml("two-node.xml")));
		assert_int_equal(aeg_topo_bind_memory(t, ids[i], mem, (size_t)page), AEG_ENOTSUP);
		assert_non_null(strstr(aeg_error_detail(), "not from this machine"));
	}
	assert_int_equal(sched_getaffinity(0, sizeof(after), &after), 0);
	assert_true(CPU_EQUAL(&before, &after));
	assert_int_equal(aeg_topo_bind_memory(t, "3b:00.0", NULL, 4096), AEG_EINVAL);
	assert_int_equal(aeg_topo_bind_memory(t, "3b:00.0", mem, SIZE_MAX), AEG_EINVAL);
	assert_int_equal(munmap(mem, (size_t)page), 0);
	aeg_topo_destroy(t);
}

static hwloc_bitmap_t parse_list(const char *list)
{
	hwloc_bitmap_t set = hwloc_bitmap_alloc();

	assert_non_null(set);
	assert_int_equal(hwloc_bitmap_list_sscanf(set, list), 0);
	return set;
}

static void assert_affinity_is(hwloc_const_bitmap_t want)
{
	cpu_set_t now;

	assert_int_equal(sched_getaffinity(0, sizeof(now), &now), 0);
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
		assert_int_equal(!!CPU_ISSET(cpu, &now), hwloc_bitmap_isset(want, (unsigned)cpu));
}

static void live_machine(void **state)
{
	int fds = count_fds(), cpus_conf = (int)sysconf(_SC_NPROCESSORS_CONF);
	struct aeg_gpu_locality loc;
	hwloc_bitmap_t all, mine;
	cpu_set_t before;
	aeg_topo_t *t = NULL;
	char x[64];

	assert_null(getenv("AEGAEON_TOPOLOGY_XML"));
	assert_int_equal(aeg_topo_load(&t, NULL), 0);
	assert_true(aeg_topo_gpu_count(t) >= 0);
	assert_int_equal(aeg_topo_locality(t, "ffff:ff:1f.7", &loc), 0);
	assert_int_equal(loc.has_locality, 0);
	print_message("live CPUs: %s\n", loc.cpus);

	/* every CPU: non-empty, within the configured CPUs, holding our affinity */
	all = parse_list(loc.cpus);
	assert_true(hwloc_bitmap_weight(all) >= 1);
	assert_true(hwloc_bitmap_last(all) < cpus_conf);
	assert_int_equal(sched_getaffinity(0, sizeof(before), &before), 0);
	mine = hwloc_bitmap_alloc();
	assert_non_null(mine);
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
		if (CPU_ISSET(cpu, &before))
			hwloc_bitmap_set(mine, (unsigned)cpu);
	assert_true(hwloc_bitmap_isincluded(mine, all));

	/* absent device: no locality, so binding does nothing */
	assert_int_equal(aeg_topo_bind_thread(t, "ffff:ff:1f.7"), 0);
	assert_affinity_is(mine);
	assert_int_equal(aeg_topo_bind_memory(t, "ffff:ff:1f.7", x, sizeof(x)), 0);

	hwloc_bitmap_free(mine);
	hwloc_bitmap_free(all);
	aeg_topo_destroy(t);
	assert_int_equal(count_fds(), fds);
}

/* GPU 0, else the first PCI device the kernel lists, as "dddd:bb:dd.f"; 0 when none. */
static int some_pci_device(const aeg_topo_t *t, char id[AEG_PCI_BUS_ID_LEN])
{
	struct dirent **names;
	int n, found = 0;

	if (aeg_topo_gpu_count(t) > 0)
		return aeg_topo_gpu_pci(t, 0, id) == 0;
	n = scandir("/sys/bus/pci/devices", &names, NULL, alphasort);
	for (int i = 0; i < n; i++) {
		if (!found && names[i]->d_name[0] != '.' && strlen(names[i]->d_name) < AEG_PCI_BUS_ID_LEN) {
			snprintf(id, AEG_PCI_BUS_ID_LEN, "%s", names[i]->d_name);
			found = 1;
		}
		free(names[i]);
	}
	if (n >= 0)
		free(names);
	return found;
}

static void live_binding_to_a_real_device(void **state)
{
	unsigned long mask[16] = { 0 };
	struct aeg_gpu_locality loc;
	hwloc_bitmap_t cpus, nodes;
	cpu_set_t saved;
	aeg_topo_t *t = NULL;
	long page = sysconf(_SC_PAGESIZE);
	char id[AEG_PCI_BUS_ID_LEN], *mem;
	int mode = -1, err;

	assert_int_equal(aeg_topo_load(&t, NULL), 0);
	if (!some_pci_device(t, id)) {
		aeg_topo_destroy(t);
		skip();
	}
	assert_int_equal(aeg_topo_locality(t, id, &loc), 0);
	print_message("%s: locality %d, nodes %d, CPUs %s\n", id, loc.has_locality, loc.numa_count, loc.cpus);
	if (!loc.has_locality) {
		aeg_topo_destroy(t);
		skip();
	}
	assert_string_equal(loc.pci_bus_id, id);
	cpus = parse_list(loc.cpus);
	nodes = hwloc_bitmap_alloc();
	assert_non_null(nodes);
	for (int i = 0; i < loc.numa_count; i++)
		hwloc_bitmap_set(nodes, (unsigned)loc.numa_nodes[i]);

	assert_int_equal(sched_getaffinity(0, sizeof(saved), &saved), 0);
	err = aeg_topo_bind_thread(t, id);
	print_message("bind thread: %s %s\n", aeg_errname(err), err ? aeg_error_detail() : "");
	if (err == 0)
		assert_affinity_is(cpus);
	else
		assert_int_equal(err, AEG_ENOTSUP);
	assert_int_equal(sched_setaffinity(0, sizeof(saved), &saved), 0);

	mem = mmap(NULL, 4 * (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(mem != MAP_FAILED);
	/* an unaligned range binds the pages it touches */
	err = aeg_topo_bind_memory(t, id, mem + 100, 2 * (size_t)page);
	print_message("bind memory: %s %s\n", aeg_errname(err), err ? aeg_error_detail() : "");
	if (err == 0) {
		assert_int_equal(syscall(SYS_get_mempolicy, &mode, mask, sizeof(mask) * 8, mem, MPOL_F_ADDR), 0);
		/* non-strict BIND: the kernel's "preferred" policies, or BIND */
		assert_true(mode == MPOL_BIND || mode == MPOL_PREFERRED || mode == MPOL_PREFERRED_MANY);
		for (unsigned n = 0; n < sizeof(mask) * 8; n++)
			assert_int_equal(!!(mask[n / 64] & (1ul << (n % 64))), hwloc_bitmap_isset(nodes, n));
	} else {
		assert_int_equal(err, AEG_ENOTSUP);
	}
	assert_int_equal(munmap(mem, 4 * (size_t)page), 0);
	hwloc_bitmap_free(nodes);
	hwloc_bitmap_free(cpus);
	aeg_topo_destroy(t);
}

/* The cached topology: one load per source, the same handle after, failures not kept. */
static void live_loaded_once_per_source(void **state)
{
	static const char *const one[] = { "0000:01:00.0" };
	static const char *const two[] = { "0000:3b:00.0", "0000:af:00.0" };
	const aeg_topo_t *a = NULL, *b = NULL, *c = NULL, *d = NULL;
	uint64_t loads = aeg_topo_live_loads();

	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("one-node.xml"), 1), 0);
	assert_int_equal(aeg_topo_live(&a), 0);
	assert_gpus(a, one, 1);
	assert_int_equal(aeg_topo_live_loads(), loads + 1);
	assert_int_equal(aeg_topo_live(&b), 0);
	assert_ptr_equal(a, b);
	assert_int_equal(aeg_topo_live_loads(), loads + 1);

	/* Another XML is another topology; going back finds the first one. */
	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("two-node.xml"), 1), 0);
	assert_int_equal(aeg_topo_live(&c), 0);
	assert_gpus(c, two, 2);
	assert_int_equal(aeg_topo_live_loads(), loads + 2);
	assert_int_equal(aeg_topo_cpu_count(c, "3b:00.0"), 8);
	assert_int_equal(aeg_topo_cpu_count(c, "0000:3b:01.0"), 16);  /* no locality: every CPU */
	assert_int_equal(aeg_topo_cpu_count(c, "3b:00"), AEG_EINVAL);
	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("one-node.xml"), 1), 0);
	assert_int_equal(aeg_topo_live(&b), 0);
	assert_ptr_equal(a, b);

	/* $HWLOC_THISSYSTEM changes what binding does, so it is part of the key. */
	assert_int_equal(aeg_topo_bind_thread(a, "01:00.0"), AEG_ENOTSUP);
	assert_int_equal(setenv("HWLOC_THISSYSTEM", "1", 1), 0);
	assert_int_equal(aeg_topo_live(&d), 0);
	assert_ptr_not_equal(a, d);
	assert_int_equal(aeg_topo_live_loads(), loads + 3);
	assert_int_equal(unsetenv("HWLOC_THISSYSTEM"), 0);

	/* A failed load is an error each time, never cached. */
	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("no-such-file.xml"), 1), 0);
	for (int i = 0; i < 2; i++) {
		d = a;
		assert_int_equal(aeg_topo_live(&d), AEG_ENOENT);
		assert_null(d);
		assert_non_null(strstr(aeg_error_detail(), "$AEGAEON_TOPOLOGY_XML"));
	}
	assert_int_equal(aeg_topo_live_loads(), loads + 3);
	assert_int_equal(unsetenv("AEGAEON_TOPOLOGY_XML"), 0);
}

/*
 * The one NUMA node of a machine that has one, read from the kernel's list
 * of online nodes and checked against the node directories; never when a
 * topology XML is given, which the caller means to use instead.
 */
static void sole_node(void **state)
{
	int machine = machine_sole_node();

	assert_int_equal(aeg_topo_sole_node(), machine);
	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", xml("one-node.xml"), 1), 0);
	assert_int_equal(aeg_topo_sole_node(), -1);
	assert_int_equal(setenv("AEGAEON_TOPOLOGY_XML", "", 1), 0);   /* empty: not given */
	assert_int_equal(aeg_topo_sole_node(), machine);
	assert_int_equal(unsetenv("AEGAEON_TOPOLOGY_XML"), 0);
}

static void null_handles(void **state)
{
	char id[AEG_PCI_BUS_ID_LEN];
	aeg_topo_t *t = load_xml("one-node.xml");

	assert_int_equal(aeg_topo_gpu_count(NULL), AEG_EINVAL);
	assert_int_equal(aeg_topo_gpu_pci(NULL, 0, id), AEG_EINVAL);
	assert_int_equal(aeg_topo_gpu_pci(t, 0, NULL), AEG_EINVAL);
	assert_int_equal(aeg_topo_bind_thread(NULL, "3b:00.0"), AEG_EINVAL);
	aeg_topo_destroy(t);
	aeg_topo_destroy(NULL);
}

int main(void)
{
	const char *top = getenv("top_srcdir");
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(two_node_gpus_in_pci_order),
		cmocka_unit_test(nolocality_gpus_sorted),
		cmocka_unit_test(two_node_locality),
		cmocka_unit_test(malformed_bus_ids),
		cmocka_unit_test(nolocality_gives_every_cpu),
		cmocka_unit_test(one_node_device_is_local_to_it),
		cmocka_unit_test(nolocality_logged_once),
		cmocka_unit_test(missing_and_corrupt_xml),
		cmocka_unit_test(xml_from_environment),
		cmocka_unit_test(xml_topology_refuses_binding),
		cmocka_unit_test(live_machine),
		cmocka_unit_test(live_binding_to_a_real_device),
		cmocka_unit_test(live_loaded_once_per_source),
		cmocka_unit_test(sole_node),
		cmocka_unit_test(null_handles),
	};

	snprintf(xml_dir, sizeof(xml_dir), "%s/tests/unit/topo", top != NULL ? top : ".");
	unsetenv("AEGAEON_TOPOLOGY_XML");
	/* hwloc would take $HWLOC_THISSYSTEM=1 as "any XML is this machine" */
	unsetenv("HWLOC_THISSYSTEM");
	return cmocka_run_group_tests_name("topo", tests, NULL, NULL);
}

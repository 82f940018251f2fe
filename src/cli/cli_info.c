/* aegaeon-cli info: the backend and, per GPU, memory and locality. */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: aegaeon-cli info [--device cuda|host] [--json]\n"
		"\n"
		"Show the device backend and, for each visible GPU, its name, total and\n"
		"free memory, PCI bus id, NUMA node(s) and local CPUs (from hwloc).\n"
		"\n"
		"  -d, --device NAME   backend: cuda or host\n"
		"  -j, --json          one JSON object on stdout\n"
		"  -h, --help          this text\n");
}

static void numa_list(const struct aeg_gpu_locality *loc, char *buf, size_t len)
{
	size_t used = 0;

	buf[0] = '\0';
	for (int i = 0; i < loc->numa_count && used < len; i++)
		used += (size_t)snprintf(buf + used, len - used, "%s%d", i ? "," : "", loc->numa_nodes[i]);
	if (loc->numa_count == 0)
		snprintf(buf, len, "unknown");
}

int cli_info(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *device = NULL;
	aeg_device_t *dev = NULL;
	aeg_topo_t *topo = NULL;
	int json = 0, count = 0, c, rc = 1, err;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":d:jh", opts, NULL)) != -1) {
		switch (c) {
		case 'd': device = optarg; break;
		case 'j': json = 1; break;
		case 'h': usage(stdout); return 0;
		default: return cli_option_error("info", c, argv);
		}
	}
	if (optind != argc)
		return cli_usage_error("info", "unexpected argument '%s'", argv[optind]);

	rc = cli_open_device(device, &dev);
	if (rc)
		return rc;
	rc = 1;
	err = aeg_device_count(dev, &count);
	if (err) {
		cli_fail(err, "counting GPUs");
		goto out;
	}
	err = aeg_topo_load(&topo, NULL);
	if (err)
		fprintf(stderr, "aegaeon-cli: warning: no topology (%s); locality unknown\n",
			aeg_error_detail());

	if (json)
		printf("{\"version\":\"%s\",\"backend\":\"%s\",\"gpus\":[", aeg_version(),
		       aeg_device_kind_name(aeg_device_kind(dev)));
	else
		printf("aegaeon %s, backend %s, %d GPU%s\n", aeg_version(),
		       aeg_device_kind_name(aeg_device_kind(dev)), count, count == 1 ? "" : "s");

	for (int i = 0; i < count; i++) {
		struct aeg_gpu_info info;
		struct aeg_gpu_locality loc;
		char total[32], free_[32], numa[128];

		err = aeg_device_gpu_info(dev, i, &info);
		if (err) {
			cli_fail(err, "GPU info");
			goto out;
		}
		memset(&loc, 0, sizeof(loc));
		/* A host-backend GPU has no PCI device unless $AEGAEON_HOST_PCI_BUS_IDS gives one. */
		if (topo == NULL || info.pci_bus_id[0] == '\0' ||
		    aeg_topo_locality(topo, info.pci_bus_id, &loc) != 0)
			snprintf(loc.cpus, sizeof(loc.cpus), "unknown");
		numa_list(&loc, numa, sizeof(numa));
		aeg_size_format(info.total_bytes, total, sizeof(total));
		aeg_size_format(info.free_bytes, free_, sizeof(free_));
		if (json) {
			printf("%s{\"index\":%d,\"name\":", i ? "," : "", info.index);
			cli_json_string(stdout, info.name);
			printf(",\"total_bytes\":%llu,\"free_bytes\":%llu,\"pci_bus_id\":",
			       (unsigned long long)info.total_bytes, (unsigned long long)info.free_bytes);
			cli_json_string(stdout, info.pci_bus_id);
			printf(",\"numa_nodes\":[");
			for (int n = 0; n < loc.numa_count; n++)
				printf("%s%d", n ? "," : "", loc.numa_nodes[n]);
			printf("],\"cpus\":");
			cli_json_string(stdout, loc.cpus);
			printf(",\"locality_known\":%s}", loc.has_locality ? "true" : "false");
		} else {
			printf("GPU %d: %s\n", info.index, info.name);
			printf("  memory     %s total, %s free\n", total, free_);
			printf("  PCI bus id %s\n", info.pci_bus_id[0] ? info.pci_bus_id : "none");
			printf("  NUMA node  %s\n", numa);
			printf("  local CPUs %s%s\n", loc.cpus,
			       loc.has_locality ? "" : " (no locality reported: all CPUs)");
		}
	}
	if (json)
		printf("]}\n");
	rc = 0;
out:
	if (topo != NULL)
		aeg_topo_destroy(topo);
	aeg_device_close(dev);
	return rc;
}

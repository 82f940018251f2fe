/* aegaeon-cli status: the job's slabs, pool and loads, as the node agent sees them. */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>

#include "cli.h"

/* What this process opened with --attach: where each slab is mapped, the pool. */
static json_t *attached_json(aeg_job_t *job, const struct aeg_job_info *info)
{
	json_t *arr = json_array();

	for (int i = 0; i < info->slabs; i++) {
		struct aeg_job_slab_desc d;
		char ptr[32];

		if (aeg_job_slab_describe(job, i, &d))
			continue;
		snprintf(ptr, sizeof(ptr), "0x%" PRIxPTR, (uintptr_t)d.base);
		json_array_append_new(arr, json_pack("{s:i, s:i, s:s, s:s*}", "slab", i, "local_gpu", d.gpu,
						     "pci_bus_id", d.pci_bus_id, "base", d.base ? ptr : NULL));
	}
	return json_pack("{s:o, s:b}", "slabs", arr, "pool_mapped", aeg_job_pool(job) != NULL);
}

static void print_attached(aeg_job_t *job, const struct aeg_job_info *info)
{
	aeg_pool_t *pool = aeg_job_pool(job);

	for (int i = 0; i < info->slabs; i++) {
		struct aeg_job_slab_desc d;

		if (aeg_job_slab_describe(job, i, &d))
			continue;
		if (d.base)
			printf("attached: slab %d mapped here on GPU %d (%s) at %p\n", i, d.gpu,
			       d.pci_bus_id[0] ? d.pci_bus_id : "no PCI id", d.base);
		else
			printf("attached: slab %d not visible in this process (GPU %s)\n", i,
			       d.pci_bus_id[0] ? d.pci_bus_id : "?");
	}
	if (pool) {
		struct aeg_pool_stats ps;

		if (aeg_pool_stats(pool, &ps) == 0)
			printf("attached: pinned pool mapped here, %u buffers\n", ps.buffers);
	} else if (info->pinned_bytes) {
		printf("attached: pinned pool not mapped\n");
	}
}

/* A load's slice in short (its rules: chunks --load ID), or null for a whole load. */
static json_t *slice_json(const struct aeg_job_load_status *l)
{
	if (l->slice_world == 0)
		return json_null();
	return json_pack("{s:i, s:i, s:s, s:b, s:i}", "rank", l->slice_rank, "world", l->slice_world,
			 "preset", aeg_slice_preset_name(l->slice_preset), "uneven", (l->slice_flags & AEG_SLICE_UNEVEN) != 0,
			 "rule_count", (int)l->slice_rules);
}

static int print_json(aeg_job_t *job, const struct aeg_job_info *info, const struct aeg_job_status *st,
		      int attached)
{
	json_t *root, *slabs, *loads;
	char state[128];

	root = json_pack("{s:s, s:I, s:s, s:I}", "job", info->job_id, "agent_pid", (json_int_t)info->agent_pid,
			 "device", aeg_device_kind_name(info->device), "clients", (json_int_t)st->clients);
	slabs = json_array();
	loads = json_array();
	if (root == NULL || slabs == NULL || loads == NULL)
		goto oom;
	for (int i = 0; i < st->slabs; i++) {
		const struct aeg_job_slab_status *s = &st->slab[i];

		json_array_append_new(slabs, json_pack("{s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:i, s:I}",
			"gpu", s->agent_gpu, "total_bytes", (json_int_t)s->stats.total_bytes,
			"used_bytes", (json_int_t)s->stats.used_bytes,
			"free_bytes", (json_int_t)s->stats.free_bytes,
			"largest_free_bytes", (json_int_t)s->stats.largest_free_bytes,
			"high_water_bytes", (json_int_t)s->stats.high_water_bytes,
			"blocks", (json_int_t)s->stats.blocks, "leases", (int)s->leases,
			"lease_bytes", (json_int_t)s->lease_bytes));
	}
	json_object_set_new(root, "slabs", slabs);
	if (st->has_pool)
		json_object_set_new(root, "pool", json_pack("{s:I, s:I, s:i, s:i, s:i, s:i}",
			"pool_bytes", (json_int_t)st->pool.pool_bytes,
			"buffer_bytes", (json_int_t)st->pool.buffer_bytes,
			"buffers", (int)st->pool.buffers, "in_use", (int)st->pool.in_use,
			"high_water", (int)st->pool.high_water, "numa_node", st->pool.numa_node));
	else
		json_object_set_new(root, "pool", json_null());
	for (uint32_t i = 0; i < st->loads; i++) {
		const struct aeg_job_load_status *l = &st->load[i];

		/* A count: "chunks" is the list of them in the outputs of prefetch and chunks. */
		json_array_append_new(loads, json_pack("{s:I, s:s, s:i, s:s, s:I, s:I, s:i, s:o}",
			"load_id", (json_int_t)l->load_id, "path", l->path, "slab", l->slab,
			"state", cli_load_state(l->status, l->done_bytes, l->file_bytes, state, sizeof(state)),
			"file_bytes", (json_int_t)l->file_bytes, "done_bytes", (json_int_t)l->done_bytes,
			"chunk_count", (int)l->chunks, "slice", slice_json(l)));
	}
	json_object_set_new(root, "loads", loads);
	if (attached)
		json_object_set_new(root, "attached", attached_json(job, info));
	return cli_json_print(root);
oom:
	json_decref(root);
	json_decref(slabs);
	json_decref(loads);
	fprintf(stderr, "aegaeon-cli: status: out of memory\n");
	return 1;
}

static void print_text(const struct aeg_job_info *info, const struct aeg_job_status *st)
{
	char a[32], b[32], c[32], slice[160];

	printf("job %s: agent pid %ld, %s device, %u client%s\n", info->job_id, info->agent_pid,
	       aeg_device_kind_name(info->device), st->clients, cli_s(st->clients));
	for (int i = 0; i < st->slabs; i++) {
		const struct aeg_job_slab_status *s = &st->slab[i];

		printf("slab %d (GPU %d): %s used of %s, largest free %s, %" PRIu64 " block%s, %u lease%s\n",
		       i, s->agent_gpu, aeg_size_format(s->stats.used_bytes, a, sizeof(a)),
		       aeg_size_format(s->stats.total_bytes, b, sizeof(b)),
		       aeg_size_format(s->stats.largest_free_bytes, c, sizeof(c)), s->stats.blocks,
		       cli_s(s->stats.blocks), s->leases, cli_s(s->leases));
	}
	if (st->has_pool) {
		char node[32] = "not bound to a NUMA node";

		if (st->pool.numa_node >= 0)
			snprintf(node, sizeof(node), "NUMA node %d", st->pool.numa_node);
		printf("pinned pool: %s in %u buffer%s of %s, %u in use, %s\n",
		       aeg_size_format(st->pool.pool_bytes, a, sizeof(a)), st->pool.buffers, cli_s(st->pool.buffers),
		       aeg_size_format(st->pool.buffer_bytes, b, sizeof(b)), st->pool.in_use, node);
	} else
		printf("pinned pool: none\n");
	for (uint32_t i = 0; i < st->loads; i++) {
		const struct aeg_job_load_status *l = &st->load[i];
		struct cli_load_info line = { .id = l->load_id, .path = l->path, .slab = l->slab, .status = l->status,
					      .file_bytes = l->file_bytes, .done_bytes = l->done_bytes,
					      .chunks = l->chunks };

		cli_print_load_line(&line, cli_slice_suffix(l->slice_rank, l->slice_world, l->slice_preset,
							    l->slice_flags, l->slice_rules, slice, sizeof(slice)));
	}
}

int cli_status(int argc, char **argv)
{
	static const struct option options[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "attach", no_argument, NULL, 'a' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct aeg_job_status *st;
	struct aeg_job_info info;
	aeg_job_t *job;
	int json = 0, attach = 0, opt, err, rc;

	optind = 1;
	opterr = 0;
	while ((opt = getopt_long(argc, argv, ":h", options, NULL)) != -1) {
		switch (opt) {
		case 'j':
			json = 1;
			break;
		case 'a':
			attach = 1;
			break;
		case 'h':
			printf("Usage: aegaeon-cli status [--json] [--attach]\n"
			       "The job's slabs, pinned pool and loads, from the node's agent. --attach also\n"
			       "opens the slabs and maps the pool in this process, as a job step does.\n");
			return 0;
		default:
			return cli_option_error("status", opt, argv);
		}
	}
	if (optind < argc)
		return cli_usage_error("status", "unexpected argument '%s'", argv[optind]);
	err = attach ? aeg_job_attach(&job) : aeg_job_connect(&job);
	if (err)
		return cli_fail(err, "status");
	err = aeg_job_get_info(job, &info);
	if (!err)
		err = aeg_job_status(job, &st);
	if (err) {
		aeg_job_detach(job);
		return cli_fail(err, "status");
	}
	if (json) {
		rc = print_json(job, &info, st, attach);
	} else {
		print_text(&info, st);
		if (attach)
			print_attached(job, &info);
		rc = 0;
	}
	aeg_job_status_free(st);
	aeg_job_detach(job);
	return rc;
}

/* The agent protocol's status message: the job's slabs, pool and loads, paged, with their slices. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "proto.h"
#include "proto_codec.h"

void enc_status_req(struct wr *w, const union proto_msg *m)
{
	put_u32(w, m->status_req.first_load);
}

int dec_status_req(struct rd *r, union proto_msg *m)
{
	m->status_req.first_load = get_u32(r);
	return 0;
}

static void enc_slab_stats(struct wr *w, const struct aeg_slab_stats *s)
{
	put_u64(w, s->total_bytes);
	put_u64(w, s->used_bytes);
	put_u64(w, s->free_bytes);
	put_u64(w, s->largest_free_bytes);
	put_u64(w, s->high_water_bytes);
	put_u64(w, s->blocks);
	put_u64(w, s->allocs);
	put_u64(w, s->frees);
	put_u64(w, s->failed_allocs);
}

static void dec_slab_stats(struct rd *r, struct aeg_slab_stats *s)
{
	s->total_bytes = get_u64(r);
	s->used_bytes = get_u64(r);
	s->free_bytes = get_u64(r);
	s->largest_free_bytes = get_u64(r);
	s->high_water_bytes = get_u64(r);
	s->blocks = get_u64(r);
	s->allocs = get_u64(r);
	s->frees = get_u64(r);
	s->failed_allocs = get_u64(r);
}

static int page_sliced(const struct proto_status_rep *p)
{
	for (uint32_t i = 0; i < p->count; i++)
		if (p->loads[i].slice.world != 0)
			return 1;
	return 0;
}

static void enc_load_slices(struct wr *w, const struct proto_status_rep *p)
{
	if (!page_sliced(p))
		return;
	for (uint32_t i = 0; i < p->count; i++) {
		const struct proto_load_slice *s = &p->loads[i].slice;

		put_u32(w, (uint32_t)s->rank);
		put_u32(w, (uint32_t)s->world);
		put_u32(w, s->preset);
		put_u32(w, s->flags);
		put_u32(w, s->nrules);
	}
}

/* A load's slice in short: none (world 0, the rest 0), or what aeg_slice_check takes. */
static int check_load_slice(const struct proto_load *l)
{
	const struct proto_load_slice *s = &l->slice;
	const struct aeg_slice spec = { .rank = s->rank, .world = s->world,
					.preset = (enum aeg_slice_preset)s->preset, .flags = s->flags };
	char why[256];

	if (s->world == 0 && (s->rank || s->preset || s->flags || s->nrules))
		return aeg_fail(AEG_EPROTO, "status: load %llu: a slice of world 0 (none) with rank %d, preset %u, "
				"flags 0x%x, %u rules", (unsigned long long)l->load_id, s->rank, s->preset, s->flags,
				s->nrules);
	if (s->world == 0)
		return 0;
	if (s->nrules > AEG_SLICE_MAX_RULES)
		return aeg_fail(AEG_EPROTO, "status: load %llu: slice of %u rules, at most %d",
				(unsigned long long)l->load_id, s->nrules, AEG_SLICE_MAX_RULES);
	if (aeg_slice_check(&spec) == 0)
		return 0;
	snprintf(why, sizeof(why), "%s", aeg_error_detail());
	return aeg_fail(AEG_EPROTO, "status: load %llu: %s", (unsigned long long)l->load_id, why);
}

static int dec_load_slices(struct rd *r, struct proto_status_rep *p)
{
	for (uint32_t i = 0; i < p->count; i++)
		memset(&p->loads[i].slice, 0, sizeof(p->loads[i].slice));
	if (r->short_read || r->pos == r->len)
		return 0;
	for (uint32_t i = 0; i < p->count; i++) {
		struct proto_load_slice *s = &p->loads[i].slice;

		s->rank = (int32_t)get_u32(r);
		s->world = (int32_t)get_u32(r);
		s->preset = get_u32(r);
		s->flags = get_u32(r);
		s->nrules = get_u32(r);
		if (r->short_read)
			return 0;
		if (check_load_slice(&p->loads[i]))
			return AEG_EPROTO;
	}
	/* Left out when no load is sliced: the encoding stays canonical. */
	if (!page_sliced(p))
		return aeg_fail(AEG_EPROTO, "status: slices of %u loads, none sliced (they are left out)", p->count);
	return 0;
}

void enc_status_rep(struct wr *w, const union proto_msg *m)
{
	const struct proto_status_rep *p = &m->status_rep;

	if (p->nslabs > AEG_JOB_MAX_GPUS || p->count > PROTO_LOADS_PER_PAGE) {
		w->over = 1;
		return;
	}
	put_u32(w, p->nslabs);
	for (uint32_t i = 0; i < p->nslabs; i++) {
		put_u32(w, (uint32_t)p->slabs[i].gpu);
		enc_slab_stats(w, &p->slabs[i].stats);
		put_u32(w, p->slabs[i].leases);
		put_u64(w, p->slabs[i].lease_bytes);
	}
	put_u8(w, p->has_pool);
	if (p->has_pool) {
		put_u64(w, p->pool.buffer_bytes);
		put_u64(w, p->pool.pool_bytes);
		put_u32(w, p->pool.buffers);
		put_u32(w, p->pool.in_use);
		put_u32(w, p->pool.high_water);
		put_u64(w, p->pool.acquires);
		put_u64(w, p->pool.timeouts);
		put_u32(w, (uint32_t)p->pool.numa_node);
	}
	put_u32(w, p->clients);
	put_u32(w, p->loads_total);
	put_u32(w, p->first);
	put_u32(w, p->count);
	for (uint32_t i = 0; i < p->count; i++) {
		const struct proto_load *l = &p->loads[i];

		put_u64(w, l->load_id);
		put_u32(w, l->slab);
		put_u32(w, (uint32_t)l->status);
		put_u64(w, l->file_bytes);
		put_u64(w, l->done_bytes);
		put_u32(w, l->chunks);
		put_str(w, l->path, sizeof(l->path));
	}
	enc_load_slices(w, p);
}

int dec_status_rep(struct rd *r, union proto_msg *m)
{
	struct proto_status_rep *p = &m->status_rep;
	int err = 0;

	p->nslabs = get_u32(r);
	if (r->short_read)
		return 0;
	if (p->nslabs > AEG_JOB_MAX_GPUS)
		return aeg_fail(AEG_EPROTO, "status with %u slabs, at most %d", p->nslabs, AEG_JOB_MAX_GPUS);
	for (uint32_t i = 0; i < p->nslabs; i++) {
		p->slabs[i].gpu = (int32_t)get_u32(r);
		dec_slab_stats(r, &p->slabs[i].stats);
		p->slabs[i].leases = get_u32(r);
		p->slabs[i].lease_bytes = get_u64(r);
		if (r->short_read)
			return 0;
		if (p->slabs[i].gpu < 0 || p->slabs[i].gpu > AEG_JOB_MAX_GPU_ORDINAL ||
		    p->slabs[i].stats.used_bytes > p->slabs[i].stats.total_bytes)
			return aeg_fail(AEG_EPROTO, "status: slab %u on GPU %d uses %llu of %llu bytes", i,
					p->slabs[i].gpu, (unsigned long long)p->slabs[i].stats.used_bytes,
					(unsigned long long)p->slabs[i].stats.total_bytes);
	}
	p->has_pool = get_u8(r);
	if (p->has_pool > 1)
		return aeg_fail(AEG_EPROTO, "status: has_pool %u", p->has_pool);
	memset(&p->pool, 0, sizeof(p->pool));
	p->pool.numa_node = -1;
	if (p->has_pool) {
		p->pool.buffer_bytes = get_u64(r);
		p->pool.pool_bytes = get_u64(r);
		p->pool.buffers = get_u32(r);
		p->pool.in_use = get_u32(r);
		p->pool.high_water = get_u32(r);
		p->pool.acquires = get_u64(r);
		p->pool.timeouts = get_u64(r);
		p->pool.numa_node = (int)get_u32(r);
		if (r->short_read)
			return 0;
		if (p->pool.in_use > p->pool.buffers || p->pool.numa_node < -1)
			return aeg_fail(AEG_EPROTO, "status: pool with %u of %u buffers in use, NUMA node %d",
					p->pool.in_use, p->pool.buffers, p->pool.numa_node);
	}
	p->clients = get_u32(r);
	p->loads_total = get_u32(r);
	p->first = get_u32(r);
	p->count = get_u32(r);
	if (r->short_read)
		return 0;
	if (p->count > PROTO_LOADS_PER_PAGE || p->first > p->loads_total || p->count > p->loads_total - p->first)
		return aeg_fail(AEG_EPROTO, "status page %u+%u of %u loads (at most %d a page)",
				p->first, p->count, p->loads_total, PROTO_LOADS_PER_PAGE);
	for (uint32_t i = 0; i < p->count; i++) {
		struct proto_load *l = &p->loads[i];

		l->load_id = get_u64(r);
		l->slab = get_u32(r);
		l->status = (int32_t)get_u32(r);
		l->file_bytes = get_u64(r);
		l->done_bytes = get_u64(r);
		l->chunks = get_u32(r);
		if (get_str(r, l->path, sizeof(l->path), "load path", &err) || r->short_read)
			return err;
		if (l->load_id == 0 || l->status > 0 || l->done_bytes > l->file_bytes)
			return aeg_fail(AEG_EPROTO, "status: load %llu with status %d, %llu of %llu bytes",
					(unsigned long long)l->load_id, l->status,
					(unsigned long long)l->done_bytes, (unsigned long long)l->file_bytes);
		if (check_slab_index(l->slab, "status load"))
			return AEG_EPROTO;
	}
	return dec_load_slices(r, p);
}

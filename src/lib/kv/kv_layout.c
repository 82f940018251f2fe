/* KV cache layouts: each side's pieces (blocks or per-layer tensors), their checks, the launch plans. */
#include "config.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kv_internal.h"

static int side_alloc(struct kv_side *side, uint32_t nseg)
{
	side->seg = calloc(nseg, sizeof(*side->seg));
	side->view = calloc(nseg, sizeof(*side->view));
	if (!side->seg || !side->view)
		return aeg_fail(AEG_ENOMEM, "KV layout of %" PRIu32 " pieces per block", nseg);
	return 0;
}

void kv_side_fini(struct kv_side *side)
{
	free(side->seg);
	free(side->view);
	side->seg = side->view = NULL;
}

int kv_side_blocks(struct kv_side *side, char *base, uint32_t blocks, const aeg_kv_t *kv)
{
	uint32_t nseg = kv->layers * kv->parts;
	int err;

	if ((err = side_alloc(side, nseg)))
		return err;
	for (uint32_t s = 0; s < nseg; s++)
		side->seg[s] = side->view[s] = base + (uint64_t)s * kv->part_bytes;
	side->base = base;
	side->stride = kv->block_bytes;
	side->blocks = blocks;
	return 0;
}

/* The bytes segment @s of @side spans, first piece to end of last. */
static uint64_t seg_extent(const struct kv_side *side, uint64_t part)
{
	return (uint64_t)(side->blocks - 1) * side->stride + part;
}

static int ranges_overlap(const char *a, uint64_t a_bytes, const char *b, uint64_t b_bytes)
{
	return (uintptr_t)a < (uintptr_t)b + b_bytes && (uintptr_t)b < (uintptr_t)a + a_bytes;
}

/*
 * Two segments of one side with the same stride share no byte when their
 * spans are disjoint, or when their offset modulo the stride keeps every
 * piece of one at least a piece away from every piece of the other.
 */
static int segs_disjoint(const char *a, const char *b, uint64_t stride, uint64_t span, uint64_t part)
{
	uint64_t d;

	if (!ranges_overlap(a, span, b, span))
		return 1;
	d = ((uintptr_t)b > (uintptr_t)a ? (uintptr_t)b - (uintptr_t)a : (uintptr_t)a - (uintptr_t)b) % stride;
	return d >= part && d <= stride - part;
}

static int check_tensor(const struct aeg_kv_tensors *t, uint32_t s, uint64_t part, const char *what)
{
	const char *b = t->base[s];

	if (!b)
		return aeg_fail(AEG_EINVAL, "%s tensor %" PRIu32 " (layer %" PRIu32 "): NULL base", what, s, s);
	if ((uintptr_t)b % AEG_KV_BLOCK_ALIGN)
		return aeg_fail(AEG_EINVAL, "%s tensor %" PRIu32 " at %p is not %u-byte aligned", what, s,
				(const void *)b, AEG_KV_BLOCK_ALIGN);
	if ((uintptr_t)b > UINTPTR_MAX - ((uint64_t)(t->blocks - 1) * (t->stride ? t->stride : part) + part))
		return aeg_fail(AEG_EINVAL, "%s tensor %" PRIu32 " at %p wraps around the address space", what, s,
				(const void *)b);
	return 0;
}

int kv_side_tensors(struct kv_side *side, const struct aeg_kv_tensors *t, const aeg_kv_t *kv,
		    const char *what)
{
	uint32_t nseg = kv->layers * kv->parts;
	uint64_t part = kv->part_bytes, stride = t->stride ? t->stride : kv->part_bytes;
	int err;

	if (!t->base)
		return aeg_fail(AEG_EINVAL, "%s tensors: no base pointers", what);
	if (t->blocks == 0 || t->blocks == UINT32_MAX)
		return aeg_fail(t->blocks ? AEG_ERANGE : AEG_EINVAL, "%s tensors of %" PRIu32 " blocks: 1 to %u",
				what, t->blocks, UINT32_MAX - 1);
	if (stride < part || stride % AEG_KV_BLOCK_ALIGN)
		return aeg_fail(AEG_EINVAL, "%s tensors: stride %" PRIu64 " must be a multiple of %u and at least the piece size %" PRIu64
				" (block %" PRIu64 " bytes / %" PRIu32 " layers / %" PRIu32 " parts)",
				what, stride, AEG_KV_BLOCK_ALIGN, part, kv->block_bytes, kv->layers, kv->parts);
	if (stride > UINT64_MAX / t->blocks)
		return aeg_fail(AEG_ERANGE, "%s tensors: %" PRIu32 " blocks of stride %" PRIu64 " overflow",
				what, t->blocks, stride);
	for (uint32_t s = 0; s < nseg; s++)
		if ((err = check_tensor(t, s, part, what)))
			return err;
	if ((err = side_alloc(side, nseg)))
		return err;
	for (uint32_t s = 0; s < nseg; s++)
		side->seg[s] = side->view[s] = t->base[s];
	side->base = NULL;
	side->stride = stride;
	side->blocks = t->blocks;
	for (uint32_t s = 0; s < nseg; s++)
		for (uint32_t u = 0; u < s; u++)
			if (!segs_disjoint(side->seg[u], side->seg[s], stride, seg_extent(side, part), part))
				return aeg_fail(AEG_EINVAL,
						"%s tensors %" PRIu32 " and %" PRIu32 " (layer %" PRIu32 " part %" PRIu32 ", layer %" PRIu32 " part %" PRIu32
						") overlap: every piece needs bytes of its own",
						what, u, s, u / kv->parts, u % kv->parts, s / kv->parts, s % kv->parts);
	return 0;
}

int kv_sides_disjoint(const aeg_kv_t *kv)
{
	const struct kv_side *g = &kv->gpu_side, *h = &kv->host_side;
	uint32_t nseg = kv->layers * kv->parts;
	uint64_t gx = seg_extent(g, kv->part_bytes), hx = seg_extent(h, kv->part_bytes);

	/* The blocks layout is one range per side: its first segment spans it all. */
	uint32_t gn = g->base ? 1 : nseg, hn = h->base ? 1 : nseg;

	if (g->base)
		gx = (uint64_t)g->blocks * kv->block_bytes;
	if (h->base)
		hx = (uint64_t)h->blocks * kv->block_bytes;
	for (uint32_t a = 0; a < gn; a++)
		for (uint32_t b = 0; b < hn; b++)
			if (ranges_overlap(g->seg[a], gx, h->seg[b], hx))
				return aeg_fail(AEG_EINVAL,
						"KV GPU blocks at %p and host blocks at %p overlap: a swap would copy memory onto itself",
						(void *)g->seg[a], (void *)h->seg[b]);
	return 0;
}

char *kv_side_piece(const struct kv_side *side, uint32_t id, uint32_t seg)
{
	return side->seg[seg] + (uint64_t)id * side->stride;
}

/* Piece s is followed by piece s + 1 in memory on both sides (as the device sees them). */
static int adjacent(const aeg_kv_t *kv, uint32_t s)
{
	return kv->gpu_side.view[s] + kv->part_bytes == kv->gpu_side.view[s + 1] &&
	       kv->host_side.view[s] + kv->part_bytes == kv->host_side.view[s + 1];
}

static uint32_t gcd(uint32_t a, uint32_t b)
{
	while (b) {
		uint32_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

/*
 * The largest m dividing @span (segments per launch group) such that every
 * run of m segments is adjacent: m must divide s + 1 for each s not
 * followed by its neighbour.
 */
static uint32_t merge_factor(const aeg_kv_t *kv, uint32_t span, uint32_t total)
{
	uint32_t m = span;

	for (uint32_t s = 0; s + 1 < total && m > 1; s++)
		if (!adjacent(kv, s))
			m = gcd(m, s + 1);
	return m;
}

static int plan_build(const aeg_kv_t *kv, struct kv_plan *plan, uint32_t groups)
{
	uint32_t nseg = kv->layers * kv->parts, m = merge_factor(kv, nseg / groups, nseg);

	plan->groups = groups;
	plan->count = nseg / groups / m;
	plan->piece_bytes = kv->part_bytes * m;
	plan->gpu = calloc((size_t)groups * plan->count, sizeof(*plan->gpu));
	plan->host = calloc((size_t)groups * plan->count, sizeof(*plan->host));
	if (!plan->gpu || !plan->host)
		return aeg_fail(AEG_ENOMEM, "KV launch plan of %" PRIu32 " pieces", nseg);
	for (uint32_t i = 0; i < groups * plan->count; i++) {
		plan->gpu[i] = kv->gpu_side.view[i * m];
		plan->host[i] = kv->host_side.view[i * m];
	}
	return 0;
}

int kv_plans_build(aeg_kv_t *kv)
{
	int err = plan_build(kv, &kv->whole, 1);

	return err ? err : plan_build(kv, &kv->by_layer, kv->layers);
}

void kv_plans_fini(aeg_kv_t *kv)
{
	free(kv->whole.gpu);
	free(kv->whole.host);
	free(kv->by_layer.gpu);
	free(kv->by_layer.host);
}

/* Two-level segregated fit (TLSF) allocator over an offset range. */
#include "config.h"

#include <inttypes.h>
#include <stdlib.h>

#include <aegaeon/size.h>

#include "internal.h"
#include "tlsf.h"

#define NIL UINT32_MAX
/* Ids carry index + 1 in their low 32 bits, so the last index is UINT32_MAX - 2. */
#define MAX_NODES (UINT32_MAX - 1)
#define INITIAL_NODES 256u

enum node_state { NODE_SPARE, NODE_FREE, NODE_USED };

struct aeg_tlsf_node {
	uint64_t offset;
	uint64_t size;                  /* bytes, a multiple of AEG_TLSF_UNIT */
	uint32_t prev_phys;             /* neighbours in address order */
	uint32_t next_phys;
	uint32_t prev_free;             /* neighbours in the size-class list */
	uint32_t next_free;             /* also links the spare stack */
	uint32_t gen;                   /* bumped on every free: old ids go stale */
	uint8_t state;
};

static inline unsigned log2_floor(uint64_t v)
{
	return 63u - (unsigned)__builtin_clzll(v);
}

static inline void mapping(uint64_t units, unsigned *fl, unsigned *sl)
{
	unsigned f;

	if (units < AEG_TLSF_SL_COUNT) {
		*fl = 0;
		*sl = (unsigned)units;
		return;
	}
	f = log2_floor(units);
	*fl = f - (AEG_TLSF_SL_LOG2 - 1);
	*sl = (unsigned)(units >> (f - AEG_TLSF_SL_LOG2)) - AEG_TLSF_SL_COUNT;
}

static inline uint64_t make_id(const struct aeg_tlsf_node *n, uint32_t i)
{
	return (uint64_t)n->gen << 32 | (uint64_t)(i + 1);
}

static void insert_free(struct aeg_tlsf *t, uint32_t i)
{
	struct aeg_tlsf_node *n = &t->nodes[i];
	unsigned fl, sl;
	uint32_t head;

	mapping(n->size >> AEG_TLSF_UNIT_LOG2, &fl, &sl);
	head = t->heads[fl][sl];
	n->state = NODE_FREE;
	n->prev_free = NIL;
	n->next_free = head;
	if (head != NIL)
		t->nodes[head].prev_free = i;
	t->heads[fl][sl] = i;
	t->sl_map[fl] |= 1u << sl;
	t->fl_map |= 1ull << fl;
}

static void remove_free(struct aeg_tlsf *t, uint32_t i)
{
	struct aeg_tlsf_node *n = &t->nodes[i];
	unsigned fl, sl;

	if (n->prev_free != NIL) {
		t->nodes[n->prev_free].next_free = n->next_free;
	} else {
		mapping(n->size >> AEG_TLSF_UNIT_LOG2, &fl, &sl);
		t->heads[fl][sl] = n->next_free;
		if (n->next_free == NIL) {
			t->sl_map[fl] &= ~(1u << sl);
			if (t->sl_map[fl] == 0)
				t->fl_map &= ~(1ull << fl);
		}
	}
	if (n->next_free != NIL)
		t->nodes[n->next_free].prev_free = n->prev_free;
}

/* The head of the first non-empty list whose every block holds @units. */
static uint32_t find_good_fit(const struct aeg_tlsf *t, uint64_t units)
{
	unsigned fl, sl;
	uint64_t fl_bits;
	uint32_t sl_bits;

	if (units >= AEG_TLSF_SL_COUNT)
		units += (1ull << (log2_floor(units) - AEG_TLSF_SL_LOG2)) - 1;
	mapping(units, &fl, &sl);
	if (fl >= AEG_TLSF_FL_COUNT)
		return NIL;
	sl_bits = t->sl_map[fl] & (~0u << sl);
	if (sl_bits == 0) {
		if (fl + 1 >= AEG_TLSF_FL_COUNT)
			return NIL;
		fl_bits = t->fl_map & (~0ull << (fl + 1));
		if (fl_bits == 0)
			return NIL;
		fl = (unsigned)__builtin_ctzll(fl_bits);
		sl_bits = t->sl_map[fl];
	}
	sl = (unsigned)__builtin_ctz(sl_bits);
	return t->heads[fl][sl];
}

/*
 * Blocks that fit but sit in the request's own class, below the rounded-up
 * class the good fit starts from (asking for exactly the largest free block
 * lands here). Only that one list is walked.
 */
static uint32_t find_in_own_class(const struct aeg_tlsf *t, uint64_t size)
{
	unsigned fl, sl;
	uint32_t i;

	mapping(size >> AEG_TLSF_UNIT_LOG2, &fl, &sl);
	for (i = t->heads[fl][sl]; i != NIL; i = t->nodes[i].next_free)
		if (t->nodes[i].size >= size)
			return i;
	return NIL;
}

static int grow(struct aeg_tlsf *t)
{
	struct aeg_tlsf_node *nodes;
	uint32_t cap;

	if (t->nodes_cap >= MAX_NODES)
		return aeg_fail(AEG_ENOMEM, "slab block table full (%" PRIu32 " blocks)", t->nodes_cap);
	cap = t->nodes_cap > MAX_NODES / 2 ? MAX_NODES : t->nodes_cap * 2;
	nodes = realloc(t->nodes, (size_t)cap * sizeof(*nodes));
	if (nodes == NULL)
		return aeg_fail(AEG_ENOMEM, "growing the slab block table to %" PRIu32 " entries", cap);
	t->nodes = nodes;
	t->nodes_cap = cap;
	return 0;
}

/* A node from the spare stack or the array's unused tail; the caller made room. */
static uint32_t node_get(struct aeg_tlsf *t)
{
	uint32_t i = t->spare;

	if (i != NIL) {
		t->spare = t->nodes[i].next_free;
		return i;
	}
	i = t->nodes_len++;
	t->nodes[i].gen = 0;
	return i;
}

static void node_put(struct aeg_tlsf *t, uint32_t i)
{
	t->nodes[i].state = NODE_SPARE;
	t->nodes[i].next_free = t->spare;
	t->spare = i;
}

static struct aeg_tlsf_node *live_node(const struct aeg_tlsf *t, uint64_t id)
{
	uint32_t low = (uint32_t)id;
	struct aeg_tlsf_node *n;

	if (low == 0 || low - 1 >= t->nodes_len)
		return NULL;
	n = &t->nodes[low - 1];
	if (n->state != NODE_USED || n->gen != (uint32_t)(id >> 32))
		return NULL;
	return n;
}

int aeg_tlsf_init(struct aeg_tlsf *t, uint64_t bytes)
{
	struct aeg_tlsf_node *n;

	if (bytes == 0 || bytes % AEG_TLSF_UNIT != 0)
		return aeg_fail(AEG_EINVAL, "allocator size %" PRIu64 " is not a non-zero multiple of %llu bytes",
				bytes, AEG_TLSF_UNIT);
	*t = (struct aeg_tlsf){ .total = bytes, .spare = NIL };
	for (unsigned fl = 0; fl < AEG_TLSF_FL_COUNT; fl++)
		for (unsigned sl = 0; sl < AEG_TLSF_SL_COUNT; sl++)
			t->heads[fl][sl] = NIL;
	t->nodes = malloc(INITIAL_NODES * sizeof(*t->nodes));
	if (t->nodes == NULL)
		return aeg_fail(AEG_ENOMEM, "allocating the slab block table");
	t->nodes_cap = INITIAL_NODES;
	t->nodes_len = 1;
	n = &t->nodes[0];
	*n = (struct aeg_tlsf_node){ .offset = 0, .size = bytes, .prev_phys = NIL, .next_phys = NIL };
	insert_free(t, 0);
	t->free_blocks = 1;
	return 0;
}

void aeg_tlsf_fini(struct aeg_tlsf *t)
{
	free(t->nodes);
	t->nodes = NULL;
	t->nodes_len = t->nodes_cap = 0;
}

static int no_space(const struct aeg_tlsf *t, uint64_t bytes)
{
	char asked[32], largest[32], free_h[32], total[32];
	uint64_t biggest = aeg_tlsf_largest_free(t);

	/* Exact bytes too: rounded human sizes can hide a miss by a few bytes. */
	return aeg_fail(AEG_ENOSPC,
			"requested %s (%" PRIu64 " bytes), largest free block %s (%" PRIu64 " bytes), free %s of %s",
			aeg_size_format(bytes, asked, sizeof(asked)), bytes,
			aeg_size_format(biggest, largest, sizeof(largest)), biggest,
			aeg_size_format(t->total - t->used, free_h, sizeof(free_h)),
			aeg_size_format(t->total, total, sizeof(total)));
}

int aeg_tlsf_alloc(struct aeg_tlsf *t, uint64_t bytes, uint64_t *id, uint64_t *offset,
		   uint64_t *size)
{
	struct aeg_tlsf_node *n, *rest;
	uint64_t want;
	uint32_t i, j;
	int err;

	if (bytes == 0)
		return aeg_fail(AEG_EINVAL, "block size 0");
	/* Also keeps the rounding below from overflowing. */
	if (bytes > t->total - t->used)
		return no_space(t, bytes);
	want = aeg_round_up(bytes, AEG_TLSF_UNIT);
	i = find_good_fit(t, want >> AEG_TLSF_UNIT_LOG2);
	if (i == NIL)
		i = find_in_own_class(t, want);
	if (i == NIL)
		return no_space(t, bytes);
	/* Make room for the split's node first: nothing is to undo if it fails. */
	if (t->nodes[i].size > want && t->spare == NIL && t->nodes_len == t->nodes_cap) {
		err = grow(t);
		if (err < 0)
			return err;
	}
	remove_free(t, i);
	n = &t->nodes[i];
	if (n->size > want) {
		j = node_get(t);
		rest = &t->nodes[j];
		rest->offset = n->offset + want;
		rest->size = n->size - want;
		rest->prev_phys = i;
		rest->next_phys = n->next_phys;
		if (n->next_phys != NIL)
			t->nodes[n->next_phys].prev_phys = j;
		n->next_phys = j;
		n->size = want;
		insert_free(t, j);
	} else {
		t->free_blocks--;
	}
	n->state = NODE_USED;
	t->blocks++;
	t->used += want;
	if (t->used > t->high_water)
		t->high_water = t->used;
	*id = make_id(n, i);
	*offset = n->offset;
	*size = want;
	return 0;
}

int aeg_tlsf_free(struct aeg_tlsf *t, uint64_t id)
{
	struct aeg_tlsf_node *n = live_node(t, id), *other;
	uint32_t i, prev, next;

	if (n == NULL)
		return aeg_fail(AEG_ENOENT, "block id %#" PRIx64 " is not live (already freed, or not from this slab)",
				id);
	i = (uint32_t)id - 1;
	n->gen++;
	t->used -= n->size;
	t->blocks--;
	t->free_blocks++;

	prev = n->prev_phys;
	if (prev != NIL && t->nodes[prev].state == NODE_FREE) {
		other = &t->nodes[prev];
		remove_free(t, prev);
		other->size += n->size;
		other->next_phys = n->next_phys;
		if (n->next_phys != NIL)
			t->nodes[n->next_phys].prev_phys = prev;
		node_put(t, i);
		i = prev;
		n = other;
		t->free_blocks--;
	}
	next = n->next_phys;
	if (next != NIL && t->nodes[next].state == NODE_FREE) {
		other = &t->nodes[next];
		remove_free(t, next);
		n->size += other->size;
		n->next_phys = other->next_phys;
		if (other->next_phys != NIL)
			t->nodes[other->next_phys].prev_phys = i;
		node_put(t, next);
		t->free_blocks--;
	}
	insert_free(t, i);
	return 0;
}

int aeg_tlsf_lookup(const struct aeg_tlsf *t, uint64_t id, uint64_t *offset, uint64_t *size)
{
	const struct aeg_tlsf_node *n = live_node(t, id);

	if (n == NULL)
		return aeg_fail(AEG_ENOENT, "block id %#" PRIx64 " is not live (freed, or not from this slab)", id);
	*offset = n->offset;
	*size = n->size;
	return 0;
}

uint64_t aeg_tlsf_largest_free(const struct aeg_tlsf *t)
{
	uint64_t largest = 0;
	unsigned fl, sl;

	if (t->fl_map == 0)
		return 0;
	fl = log2_floor(t->fl_map);
	sl = 31u - (unsigned)__builtin_clz(t->sl_map[fl]);
	for (uint32_t i = t->heads[fl][sl]; i != NIL; i = t->nodes[i].next_free)
		if (t->nodes[i].size > largest)
			largest = t->nodes[i].size;
	return largest;
}

void aeg_tlsf_stats(const struct aeg_tlsf *t, struct aeg_tlsf_stats *stats)
{
	*stats = (struct aeg_tlsf_stats){
		.total_bytes = t->total,
		.used_bytes = t->used,
		.free_bytes = t->total - t->used,
		.largest_free_bytes = aeg_tlsf_largest_free(t),
		.high_water_bytes = t->high_water,
		.blocks = t->blocks,
		.free_blocks = t->free_blocks,
	};
}

static int check_lists(const struct aeg_tlsf *t, uint64_t *listed)
{
	*listed = 0;
	for (unsigned fl = 0; fl < AEG_TLSF_FL_COUNT; fl++) {
		if (((t->fl_map >> fl) & 1) != (t->sl_map[fl] != 0))
			return aeg_fail(AEG_EINVAL, "first-level bit %u disagrees with its lists", fl);
		for (unsigned sl = 0; sl < AEG_TLSF_SL_COUNT; sl++) {
			uint32_t prev = NIL;
			unsigned f, s;

			if (((t->sl_map[fl] >> sl) & 1) != (t->heads[fl][sl] != NIL))
				return aeg_fail(AEG_EINVAL, "bit of list %u/%u disagrees with the list", fl, sl);
			for (uint32_t i = t->heads[fl][sl]; i != NIL; i = t->nodes[i].next_free) {
				const struct aeg_tlsf_node *n = &t->nodes[i];

				if (i >= t->nodes_len || n->state != NODE_FREE || n->prev_free != prev)
					return aeg_fail(AEG_EINVAL, "list %u/%u holds a bad node %" PRIu32, fl, sl, i);
				mapping(n->size >> AEG_TLSF_UNIT_LOG2, &f, &s);
				if (f != fl || s != sl)
					return aeg_fail(AEG_EINVAL, "block of %" PRIu64 " bytes in list %u/%u", n->size, fl, sl);
				if (++*listed > t->nodes_len)
					return aeg_fail(AEG_EINVAL, "list %u/%u loops", fl, sl);
				prev = i;
			}
		}
	}
	return 0;
}

int aeg_tlsf_check(const struct aeg_tlsf *t)
{
	uint64_t offset = 0, used = 0, blocks = 0, free_blocks = 0, listed, spares = 0, seen = 0;
	uint32_t i, prev = NIL;
	int err;

	for (i = 0; i < t->nodes_len; i++)
		if (t->nodes[i].state != NODE_SPARE && t->nodes[i].prev_phys == NIL)
			break;
	for (; i != NIL && i < t->nodes_len; i = t->nodes[i].next_phys) {
		const struct aeg_tlsf_node *n = &t->nodes[i];

		if (n->state == NODE_SPARE || n->prev_phys != prev || n->offset != offset)
			return aeg_fail(AEG_EINVAL, "block chain broken at node %" PRIu32 " (offset %" PRIu64 ")",
					i, offset);
		if (n->size == 0 || n->size % AEG_TLSF_UNIT != 0 || n->size > t->total - offset)
			return aeg_fail(AEG_EINVAL, "block at %" PRIu64 " has bad size %" PRIu64, offset, n->size);
		if (n->state == NODE_FREE) {
			if (prev != NIL && t->nodes[prev].state == NODE_FREE)
				return aeg_fail(AEG_EINVAL, "free blocks at %" PRIu64 " not merged", offset);
			free_blocks++;
		} else {
			used += n->size;
			blocks++;
		}
		offset += n->size;
		prev = i;
		seen++;
	}
	if (offset != t->total || i != NIL)
		return aeg_fail(AEG_EINVAL, "blocks cover %" PRIu64 " of %" PRIu64 " bytes", offset, t->total);
	if (used != t->used || blocks != t->blocks || free_blocks != t->free_blocks)
		return aeg_fail(AEG_EINVAL, "counters: used %" PRIu64 "/%" PRIu64 ", blocks %" PRIu64 "/%" PRIu64
				", free blocks %" PRIu64 "/%" PRIu64,
				used, t->used, blocks, t->blocks, free_blocks, t->free_blocks);
	if (t->high_water < t->used)
		return aeg_fail(AEG_EINVAL, "high water %" PRIu64 " under used %" PRIu64, t->high_water, t->used);
	err = check_lists(t, &listed);
	if (err < 0)
		return err;
	if (listed != free_blocks)
		return aeg_fail(AEG_EINVAL, "%" PRIu64 " blocks listed, %" PRIu64 " free", listed, free_blocks);
	for (i = t->spare; i != NIL; i = t->nodes[i].next_free) {
		if (i >= t->nodes_len || t->nodes[i].state != NODE_SPARE || ++spares > t->nodes_len)
			return aeg_fail(AEG_EINVAL, "spare stack holds a bad node %" PRIu32, i);
	}
	if (seen + spares != t->nodes_len)
		return aeg_fail(AEG_EINVAL, "%" PRIu64 " nodes in blocks, %" PRIu64 " spare, of %" PRIu32,
				seen, spares, t->nodes_len);
	return 0;
}

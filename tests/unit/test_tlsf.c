/* The TLSF allocator against a reference model of sorted intervals. */
#include "config.h"

#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "internal.h"
#include "tlsf.h"

#define UNIT AEG_TLSF_UNIT
#define KiB (1ull << 10)
#define MiB (1ull << 20)

static uint64_t rng_state;

static uint64_t rnd(void)
{
	/* xorshift64*: reproducible from the seed printed at the start. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ull;
}

static uint64_t rnd_range(uint64_t lo, uint64_t hi)
{
	return lo + rnd() % (hi - lo + 1);
}

/* Log-uniform in [lo, hi]: as many small as large sizes per power of two. */
static uint64_t rnd_log(uint64_t lo, uint64_t hi)
{
	unsigned a = 63 - __builtin_clzll(lo), b = 63 - __builtin_clzll(hi);
	unsigned e = (unsigned)rnd_range(a, b);
	uint64_t v = (1ull << e) + rnd() % (1ull << e);

	return v < lo ? lo : v > hi ? hi : v;
}

/* The reference: live blocks sorted by offset. */
struct live {
	uint64_t offset;
	uint64_t size;
	uint64_t id;
};

struct model {
	struct live *v;
	size_t n, cap;
	uint64_t total, used;
};

static void model_init(struct model *m, uint64_t total)
{
	*m = (struct model){ .total = total };
	m->cap = 1024;
	m->v = malloc(m->cap * sizeof(*m->v));
	assert_non_null(m->v);
}

static size_t model_pos(const struct model *m, uint64_t offset)
{
	size_t lo = 0, hi = m->n;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (m->v[mid].offset < offset)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* Record a new block after checking it against its neighbours only (cheap). */
static void model_add(struct model *m, uint64_t id, uint64_t offset, uint64_t size, uint64_t asked)
{
	size_t i;

	assert_int_not_equal(id, 0);
	assert_int_equal(offset % UNIT, 0);
	assert_int_equal(size, aeg_round_up(asked, UNIT));
	assert_true(offset < m->total && size <= m->total - offset);
	i = model_pos(m, offset);
	if (i > 0)
		assert_true(m->v[i - 1].offset + m->v[i - 1].size <= offset);
	if (i < m->n)
		assert_true(offset + size <= m->v[i].offset);
	if (m->n == m->cap) {
		m->cap *= 2;
		m->v = realloc(m->v, m->cap * sizeof(*m->v));
		assert_non_null(m->v);
	}
	memmove(&m->v[i + 1], &m->v[i], (m->n - i) * sizeof(*m->v));
	m->v[i] = (struct live){ offset, size, id };
	m->n++;
	m->used += size;
}

static struct live model_remove(struct model *m, size_t i)
{
	struct live l = m->v[i];

	memmove(&m->v[i], &m->v[i + 1], (m->n - i - 1) * sizeof(*m->v));
	m->n--;
	m->used -= l.size;
	return l;
}

/* Largest gap between live blocks, and how many gaps there are. */
static uint64_t model_largest_gap(const struct model *m, uint64_t *gaps)
{
	uint64_t end = 0, largest = 0;

	*gaps = 0;
	for (size_t i = 0; i <= m->n; i++) {
		uint64_t next = i < m->n ? m->v[i].offset : m->total;

		if (next > end) {
			(*gaps)++;
			if (next - end > largest)
				largest = next - end;
		}
		if (i < m->n)
			end = m->v[i].offset + m->v[i].size;
	}
	return largest;
}

static void check_cheap(const struct aeg_tlsf *t, const struct model *m)
{
	assert_int_equal(t->used, m->used);
	assert_int_equal(t->blocks, m->n);
	assert_true(t->high_water >= t->used);
}

static void check_full(const struct aeg_tlsf *t, const struct model *m)
{
	struct aeg_tlsf_stats st;
	uint64_t gaps, largest = model_largest_gap(m, &gaps), offset, size;

	if (aeg_tlsf_check(t) != 0)
		fail_msg("allocator invariant: %s", aeg_error_detail());
	aeg_tlsf_stats(t, &st);
	assert_int_equal(st.total_bytes, m->total);
	assert_int_equal(st.used_bytes, m->used);
	assert_int_equal(st.free_bytes, m->total - m->used);
	assert_int_equal(st.blocks, m->n);
	assert_int_equal(st.free_blocks, gaps);
	assert_int_equal(st.largest_free_bytes, largest);
	for (size_t i = 0; i < m->n; i++) {
		assert_int_equal(aeg_tlsf_lookup(t, m->v[i].id, &offset, &size), 0);
		assert_int_equal(offset, m->v[i].offset);
		assert_int_equal(size, m->v[i].size);
	}
}

static uint64_t random_size(const struct aeg_tlsf *t)
{
	uint64_t kind = rnd() % 100;

	if (kind < 50)
		return rnd_range(1, 8 * KiB);
	if (kind < 85)
		return rnd_log(8 * KiB, 1 * MiB);
	if (kind < 98)
		return rnd_log(1 * MiB, 16 * MiB);
	/* Exactly the largest free block (or one byte more): the own-class path. */
	return aeg_tlsf_largest_free(t) + (kind == 99);
}

static void randomised_against_reference(void **state)
{
	const uint64_t total = 512 * MiB + 50 * UNIT, ops = 1000000;
	const unsigned alloc_pct[] = { 75, 50, 25, 55, 90, 10 };
	uint64_t seed = 0x5eed1234abcdull, failures = 0, id, offset, size, gaps;
	const char *env = getenv("AEGAEON_TEST_SEED");
	struct aeg_tlsf t;
	struct model m;

	if (env != NULL)
		seed = strtoull(env, NULL, 0);
	print_message("seed %#" PRIx64 " (AEGAEON_TEST_SEED to repeat)\n", seed);
	rng_state = seed;
	assert_int_equal(aeg_tlsf_init(&t, total), 0);
	model_init(&m, total);
	for (uint64_t op = 0; op < ops; op++) {
		unsigned pct = alloc_pct[(op / 20000) % AEG_ARRAY_SIZE(alloc_pct)];

		if (m.n == 0 || rnd() % 100 < pct) {
			uint64_t bytes = random_size(&t);
			int err = aeg_tlsf_alloc(&t, bytes, &id, &offset, &size);

			if (bytes == 0) {
				assert_int_equal(err, AEG_EINVAL);
			} else if (err == 0) {
				model_add(&m, id, offset, size, bytes);
			} else {
				/* TLSF here is exact: it fails only if no gap holds the request. */
				assert_int_equal(err, AEG_ENOSPC);
				assert_true(model_largest_gap(&m, &gaps) < aeg_round_up(bytes, UNIT));
				failures++;
			}
		} else {
			struct live l = model_remove(&m, rnd() % m.n);

			assert_int_equal(aeg_tlsf_free(&t, l.id), 0);
			if (rnd() % 16 == 0) {
				assert_int_equal(aeg_tlsf_free(&t, l.id), AEG_ENOENT);
				assert_int_equal(aeg_tlsf_lookup(&t, l.id, &offset, &size), AEG_ENOENT);
			}
		}
		check_cheap(&t, &m);
		if (op % 1000 == 0)
			check_full(&t, &m);
	}
	print_message("%" PRIu64 " ops, %" PRIu64 " refused for lack of space, high water %" PRIu64
		      " of %" PRIu64 " bytes\n", ops, failures, t.high_water, total);
	assert_true(failures > 0);
	while (m.n > 0) {
		struct live l = model_remove(&m, rnd() % m.n);

		assert_int_equal(aeg_tlsf_free(&t, l.id), 0);
		check_cheap(&t, &m);
	}
	check_full(&t, &m);
	assert_int_equal(t.free_blocks, 1);
	assert_int_equal(aeg_tlsf_alloc(&t, total, &id, &offset, &size), 0);
	assert_int_equal(offset, 0);
	assert_int_equal(size, total);
	assert_int_equal(aeg_tlsf_free(&t, id), 0);
	aeg_tlsf_fini(&t);
	free(m.v);
}

static void init_rejects_bad_sizes(void **state)
{
	const uint64_t bad[] = { 0, 1, 255, 257, 1000, UINT64_MAX };
	struct aeg_tlsf t;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		assert_int_equal(aeg_tlsf_init(&t, bad[i]), AEG_EINVAL);
		assert_non_null(strstr(aeg_error_detail(), "multiple of 256"));
	}
}

static void zero_and_too_large_requests(void **state)
{
	const uint64_t total = 1 * MiB;
	uint64_t id, offset, size;
	struct aeg_tlsf t;

	assert_int_equal(aeg_tlsf_init(&t, total), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, 0, &id, &offset, &size), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "size 0"));
	assert_int_equal(aeg_tlsf_alloc(&t, total + 1, &id, &offset, &size), AEG_ENOSPC);
	assert_string_equal(aeg_error_detail(), "requested 1 MiB (1048577 bytes), largest free block 1 MiB "
			    "(1048576 bytes), free 1 MiB of 1 MiB");
	assert_int_equal(aeg_tlsf_alloc(&t, UINT64_MAX, &id, &offset, &size), AEG_ENOSPC);
	assert_int_equal(aeg_tlsf_alloc(&t, UINT64_MAX - 100, &id, &offset, &size), AEG_ENOSPC);
	/* Rounded up to 256, the last byte still fits. */
	assert_int_equal(aeg_tlsf_alloc(&t, total - 255, &id, &offset, &size), 0);
	assert_int_equal(size, total);
	assert_int_equal(aeg_tlsf_alloc(&t, 1, &id, &offset, &size), AEG_ENOSPC);
	assert_non_null(strstr(aeg_error_detail(), "largest free block 0 B (0 bytes), free 0 B of 1 MiB"));
	assert_int_equal(t.used, total);
	aeg_tlsf_fini(&t);
}

static void stale_double_and_forged_ids(void **state)
{
	uint64_t a, b, c, offset, size, a_off;
	struct aeg_tlsf t;

	assert_int_equal(aeg_tlsf_init(&t, 64 * KiB), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, 1000, &a, &a_off, &size), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, 1000, &b, &offset, &size), 0);
	assert_int_not_equal(a, b);
	assert_int_equal(aeg_tlsf_free(&t, a), 0);
	assert_int_equal(aeg_tlsf_free(&t, a), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), "not live"));
	assert_int_equal(aeg_tlsf_lookup(&t, a, &offset, &size), AEG_ENOENT);
	/* The same place again gets a new id; the old one stays dead. */
	assert_int_equal(aeg_tlsf_alloc(&t, 1000, &c, &offset, &size), 0);
	assert_int_equal(offset, a_off);
	assert_int_not_equal(c, a);
	assert_int_equal(aeg_tlsf_free(&t, a), AEG_ENOENT);
	assert_int_equal(aeg_tlsf_lookup(&t, c, &offset, &size), 0);

	const uint64_t forged[] = {
		0, c + (1ull << 32), c - (1ull << 32), 0xffffffffull, (c & ~0xffffffffull) | 0x10000,
		UINT64_MAX, b ^ (1ull << 40),
	};
	for (size_t i = 0; i < AEG_ARRAY_SIZE(forged); i++) {
		assert_int_equal(aeg_tlsf_free(&t, forged[i]), AEG_ENOENT);
		assert_int_equal(aeg_tlsf_lookup(&t, forged[i], &offset, &size), AEG_ENOENT);
	}
	assert_int_equal(t.blocks, 2);
	assert_int_equal(aeg_tlsf_free(&t, b), 0);
	assert_int_equal(aeg_tlsf_free(&t, c), 0);
	assert_int_equal(aeg_tlsf_check(&t), 0);
	assert_int_equal(t.free_blocks, 1);
	aeg_tlsf_fini(&t);
}

static void exhaustion_then_recovery(void **state)
{
	const uint64_t total = 4 * MiB, n = total / (4 * KiB);
	uint64_t *ids = calloc(n, sizeof(*ids)), offset, size, id;
	struct aeg_tlsf t;

	assert_non_null(ids);
	assert_int_equal(aeg_tlsf_init(&t, total), 0);
	for (uint64_t i = 0; i < n; i++)
		assert_int_equal(aeg_tlsf_alloc(&t, 4 * KiB, &ids[i], &offset, &size), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, 1, &id, &offset, &size), AEG_ENOSPC);
	assert_int_equal(aeg_tlsf_largest_free(&t), 0);
	for (uint64_t i = 0; i < n; i += 2)
		assert_int_equal(aeg_tlsf_free(&t, ids[i]), 0);
	assert_int_equal(t.free_blocks, n / 2);
	/* Half the range is free, in 4 KiB holes: 8 KiB does not fit. */
	assert_int_equal(aeg_tlsf_alloc(&t, 8 * KiB, &id, &offset, &size), AEG_ENOSPC);
	assert_non_null(strstr(aeg_error_detail(), "requested 8 KiB (8192 bytes), largest free block 4 KiB (4096 bytes), free 2 MiB of 4 MiB"));
	assert_int_equal(aeg_tlsf_alloc(&t, 4 * KiB, &ids[0], &offset, &size), 0);
	assert_int_equal(aeg_tlsf_check(&t), 0);
	for (uint64_t i = 0; i < n; i += 2)
		assert_int_equal(aeg_tlsf_free(&t, ids[i + 1]), 0);
	assert_int_equal(aeg_tlsf_free(&t, ids[0]), 0);
	assert_int_equal(aeg_tlsf_check(&t), 0);
	assert_int_equal(t.used, 0);
	assert_int_equal(t.free_blocks, 1);
	assert_int_equal(t.high_water, total);
	assert_int_equal(aeg_tlsf_alloc(&t, total, &id, &offset, &size), 0);
	assert_int_equal(aeg_tlsf_free(&t, id), 0);
	aeg_tlsf_fini(&t);
	free(ids);
}

static void neighbours_coalesce_in_any_order(void **state)
{
	static const int orders[][3] = {
		{ 0, 1, 2 }, { 0, 2, 1 }, { 1, 0, 2 }, { 1, 2, 0 }, { 2, 0, 1 }, { 2, 1, 0 },
	};
	uint64_t ids[4], offset, size;
	struct aeg_tlsf t;

	for (size_t o = 0; o < AEG_ARRAY_SIZE(orders); o++) {
		assert_int_equal(aeg_tlsf_init(&t, 1 * MiB), 0);
		for (int i = 0; i < 4; i++)
			assert_int_equal(aeg_tlsf_alloc(&t, 256 * KiB, &ids[i], &offset, &size), 0);
		assert_int_equal(t.free_blocks, 0);
		for (int i = 0; i < 3; i++) {
			assert_int_equal(aeg_tlsf_free(&t, ids[orders[o][i]]), 0);
			assert_int_equal(aeg_tlsf_check(&t), 0);
		}
		assert_int_equal(t.free_blocks, 1);
		assert_int_equal(aeg_tlsf_largest_free(&t), 768 * KiB);
		assert_int_equal(aeg_tlsf_alloc(&t, 768 * KiB, &ids[0], &offset, &size), 0);
		assert_int_equal(offset, 0);
		aeg_tlsf_fini(&t);
	}
}

/* Sizes that are not on a class boundary: only the own-class walk finds them. */
static void exact_fit_off_class_boundary(void **state)
{
	const uint64_t total = 1000 * UNIT;
	uint64_t id, id2, offset, size;
	struct aeg_tlsf t;

	assert_int_equal(aeg_tlsf_init(&t, total), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, total, &id, &offset, &size), 0);
	assert_int_equal(aeg_tlsf_free(&t, id), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, 997 * UNIT, &id, &offset, &size), 0);
	assert_int_equal(aeg_tlsf_alloc(&t, 3 * UNIT, &id2, &offset, &size), 0);
	assert_int_equal(offset, 997 * UNIT);
	assert_int_equal(aeg_tlsf_free(&t, id), 0);
	assert_int_equal(aeg_tlsf_free(&t, id2), 0);
	aeg_tlsf_fini(&t);
}

static void ranges_up_to_2_63_and_beyond(void **state)
{
	const uint64_t totals[] = { 1ull << 63, UINT64_MAX - (UNIT - 1) };
	uint64_t a, b, offset, size;
	struct aeg_tlsf t;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(totals); i++) {
		const uint64_t total = totals[i];

		assert_int_equal(aeg_tlsf_init(&t, total), 0);
		assert_int_equal(aeg_tlsf_largest_free(&t), total);
		assert_int_equal(aeg_tlsf_alloc(&t, (1ull << 62) + 1, &a, &offset, &size), 0);
		assert_int_equal(size, (1ull << 62) + UNIT);
		assert_int_equal(aeg_tlsf_alloc(&t, total - size, &b, &offset, &size), 0);
		assert_int_equal(offset, (1ull << 62) + UNIT);
		assert_int_equal(t.used, total);
		assert_int_equal(aeg_tlsf_alloc(&t, 1, &b, &offset, &size), AEG_ENOSPC);
		assert_int_equal(aeg_tlsf_free(&t, a), 0);
		assert_int_equal(aeg_tlsf_largest_free(&t), (1ull << 62) + UNIT);
		assert_int_equal(aeg_tlsf_alloc(&t, UINT64_MAX, &a, &offset, &size), AEG_ENOSPC);
		assert_int_equal(aeg_tlsf_check(&t), 0);
		aeg_tlsf_fini(&t);
	}
}

/* Many small blocks: the node array grows by doubling, ids stay valid. */
static void node_array_grows(void **state)
{
	const uint64_t n = 100000;
	uint64_t *ids = calloc(n, sizeof(*ids)), offset, size;
	struct aeg_tlsf t;

	assert_non_null(ids);
	assert_int_equal(aeg_tlsf_init(&t, 64 * MiB), 0);
	for (uint64_t i = 0; i < n; i++) {
		assert_int_equal(aeg_tlsf_alloc(&t, 1 + i % UNIT, &ids[i], &offset, &size), 0);
		assert_int_equal(offset, i * UNIT);
	}
	assert_true(t.nodes_cap > n);
	assert_int_equal(aeg_tlsf_check(&t), 0);
	for (uint64_t i = 0; i < n; i++) {
		assert_int_equal(aeg_tlsf_lookup(&t, ids[i], &offset, &size), 0);
		assert_int_equal(offset, i * UNIT);
	}
	for (uint64_t i = n; i-- > 0;)
		assert_int_equal(aeg_tlsf_free(&t, ids[i]), 0);
	assert_int_equal(aeg_tlsf_check(&t), 0);
	assert_int_equal(t.free_blocks, 1);
	assert_int_equal(t.blocks, 0);
	aeg_tlsf_fini(&t);
	free(ids);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(init_rejects_bad_sizes),
		cmocka_unit_test(zero_and_too_large_requests),
		cmocka_unit_test(stale_double_and_forged_ids),
		cmocka_unit_test(exhaustion_then_recovery),
		cmocka_unit_test(neighbours_coalesce_in_any_order),
		cmocka_unit_test(exact_fit_off_class_boundary),
		cmocka_unit_test(ranges_up_to_2_63_and_beyond),
		cmocka_unit_test(node_array_grows),
		cmocka_unit_test(randomised_against_reference),
	};
	return cmocka_run_group_tests_name("tlsf", tests, NULL, NULL);
}

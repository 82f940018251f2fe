/*
 * The pinned pool's free list under what another process of the job can do
 * to the shared header: stop anywhere, die holding buffers, write anything.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "pinned_internal.h"
#include "testutil.h"

#define BUFFERS 8
#define BUF_BYTES 4096

/* Take every buffer there is: each index in range, none twice, none of @held. Returns the count. */
static uint32_t drain(aeg_pool_t *pool, const int held[BUFFERS], uint32_t got[BUFFERS])
{
	int seen[BUFFERS] = { 0 };
	uint32_t n = 0;

	for (int i = 0; i < 2 * BUFFERS; i++) {
		struct aeg_pool_buffer b;
		int err = aeg_pool_acquire(pool, 0, &b);

		if (err == AEG_ETIMEDOUT)
			break;
		if (err != 0)
			fail_msg("acquire %d: %s: %s", i, aeg_errname(err), aeg_error_detail());
		if (b.index >= BUFFERS || seen[b.index]++ || (held != NULL && held[b.index]))
			fail_msg("acquire %d gave buffer %u (held here: %d, already taken: %d)", i, b.index,
				 b.index < BUFFERS && held ? held[b.index] : -1, b.index < BUFFERS ? seen[b.index] - 1 : -1);
		assert_ptr_equal(b.ptr, (char *)aeg_pool_base(pool) + (size_t)b.index * BUF_BYTES);
		got[n++] = b.index;
	}
	return n;
}

static void give_all(aeg_pool_t *pool, const uint32_t *idx, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		assert_int_equal(aeg_pool_release(pool, idx[i]), 0);
}

/* Child: acquire and release as fast as it can, holding one to three buffers, until killed. */
static _Noreturn void churn(int fd)
{
	aeg_device_t *dev = NULL;
	aeg_pool_t *pool = NULL;
	struct aeg_pool_buffer b[3];

	if (aeg_device_open(&dev, AEG_DEVICE_HOST) < 0 || aeg_pool_attach(dev, fd, &pool) < 0)
		child_exit(10);
	for (unsigned round = 0;; round++) {
		unsigned n = 1 + round % 3;

		for (unsigned i = 0; i < n; i++)
			if (aeg_pool_acquire(pool, -1, &b[i]) < 0)
				child_exit(11);
		for (unsigned i = 0; i < n; i++)
			if (aeg_pool_release(pool, b[i].index) < 0)
				child_exit(12);
	}
}

/*
 * A process of the job stopped at any point of its acquires and releases
 * (as a SIGSTOP or a debugger would leave it) holds up no other: every
 * buffer it does not hold is taken at once, 200 times at different
 * moments. With the lock it replaced, a stop inside it blocked every other
 * process for as long as it lasted. Killed, its buffers come back.
 */
static void stopped_process_blocks_nobody(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;
	uint32_t got[BUFFERS], n, fewest = BUFFERS, reclaimed;
	int status;
	pid_t pid;

	assert_int_equal(aeg_pool_create(dev, 0, BUF_BYTES, BUFFERS * BUF_BYTES, &pool), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		churn(aeg_pool_fd(pool));
	for (int round = 0; round < 200; round++) {
		uint64_t t0;

		usleep((useconds_t)(round % 7) * 50);
		assert_int_equal(kill(pid, SIGSTOP), 0);
		assert_int_equal(waitpid(pid, &status, WUNTRACED), pid);
		assert_true(WIFSTOPPED(status));
		t0 = aeg_now_ns();
		n = drain(pool, NULL, got);
		/* It holds three at most, and may be stopped between a pop and its claim. */
		if (n < BUFFERS - 4 || aeg_now_ns() - t0 > 1000000000ull)
			fail_msg("round %d: %u buffers taken in %.1f ms around a stopped process", round, n,
				 (aeg_now_ns() - t0) / 1e6);
		if (n < fewest)
			fewest = n;
		give_all(pool, got, n);
		assert_int_equal(kill(pid, SIGCONT), 0);
	}
	assert_int_equal(kill(pid, SIGKILL), 0);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_int_equal(aeg_pool_reclaim(pool, pid, &reclaimed), 0);
	assert_true(reclaimed <= 3);
	print_message("200 stops: at least %u of %u buffers free each time; %u reclaimed after the kill\n",
		      fewest, BUFFERS, reclaimed);
	/* A kill between a pop and its claim, or an unmark and its push, leaves one buffer unlisted. */
	n = drain(pool, NULL, got);
	assert_true(n >= BUFFERS - 1);
	give_all(pool, got, n);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_true(st.in_use <= 1);
	aeg_pool_destroy(pool);
}

struct forgery {
	const char *what;
	uint32_t hold;                  /* buffers this process holds first (the lowest) */
	void (*forge)(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner);
	uint32_t free;                  /* buffers that can be taken afterwards */
	int marks_forged;               /* held buffers may be given out (their marks were cleared) */
	int repaired;                   /* the list had to be rebuilt */
};

static void set_top(struct aeg_pool_header *h, uint32_t top)
{
	h->head = (h->head & ~(uint64_t)UINT32_MAX) | top;
}

static void far_index(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	set_top(h, 0x7ffffff0u + 1);
}

static void one_past(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	set_top(h, BUFFERS + 1);
}

static void held_on_top(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	next[1] = (uint32_t)h->head;
	set_top(h, 1 + 1);
}

static void link_out(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	next[(uint32_t)h->head - 1] = BUFFERS + 5;
}

static void self_loop(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	next[0] = 0 + 1;        /* buffer 0, held, links to itself */
	set_top(h, 0 + 1);
}

static void huge_count(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	h->buffers = 0x7fffffff;
	h->buffer_bytes = UINT64_MAX;
	h->header_bytes = 0;
}

static void garbage_counts(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	h->in_use = UINT32_MAX;
	h->high_water = UINT32_MAX;
	h->waiters = UINT32_MAX;
}

static void owner_marks_cleared(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	/* Every mark 0 and the list emptied: the held buffers look free to a rebuild. */
	for (int i = 0; i < BUFFERS; i++)
		owner[i] = 0;
	set_top(h, BUFFERS + 2);
}

static void all_ones(struct aeg_pool_header *h, uint32_t *next, uint32_t *owner)
{
	memset(&h->waiters, 0xff, (size_t)((char *)(owner + BUFFERS) - (char *)&h->waiters));
}

/*
 * What a process of the job can write into the header, one row each: an
 * index out of range at the head or in a link, a held buffer on the list,
 * a cycle, a forged geometry or counts, cleared or set owner marks. After
 * each, acquires never give an index out of range or a buffer this process
 * holds, the list is rebuilt where it was broken, and what is free can be
 * taken once each.
 */
static void forged_headers(void **state)
{
	static const struct forgery rows[] = {
		{ "head names buffer 0x7ffffff0", 0, far_index, BUFFERS, 0, 1 },
		{ "head names the buffer one past the last", 0, one_past, BUFFERS, 0, 1 },
		{ "a held buffer on top", 2, held_on_top, BUFFERS - 2, 0, 1 },
		{ "a link out of range", 0, link_out, BUFFERS, 0, 1 },
		{ "a held buffer linked to itself", 1, self_loop, BUFFERS - 1, 0, 1 },
		{ "geometry of 0x7fffffff buffers", 0, huge_count, BUFFERS, 0, 0 },
		{ "counts of 2^32 - 1", 3, garbage_counts, BUFFERS - 3, 0, 0 },
		/* Cleared marks make held buffers look free, set ones make free buffers look held. */
		{ "owner marks cleared", 2, owner_marks_cleared, BUFFERS, 1, 1 },
		{ "every word all ones", 0, all_ones, 0, 1, 1 },
	};
	aeg_device_t *dev = *state;

	for (size_t r = 0; r < AEG_ARRAY_SIZE(rows); r++) {
		const struct forgery *f = &rows[r];
		struct aeg_pool_header *h;
		struct aeg_pool_stats st;
		aeg_pool_t *pool = NULL;
		int held[BUFFERS] = { 0 };
		uint32_t got[BUFFERS], n;

		assert_int_equal(aeg_pool_create(dev, 0, BUF_BYTES, BUFFERS * BUF_BYTES, &pool), 0);
		for (uint32_t i = 0; i < f->hold; i++) {
			struct aeg_pool_buffer b;

			assert_int_equal(aeg_pool_acquire(pool, 0, &b), 0);
			held[b.index] = 1;
		}
		h = aeg_pool_header(pool);
		f->forge(h, h->slots, h->slots + BUFFERS);
		n = drain(pool, f->marks_forged ? NULL : held, got);
		if (n != f->free || (aeg_pool_repairs(pool) > 0) != f->repaired)
			fail_msg("%s: %u buffers taken, %u rebuilds; expected %u and %s", f->what, n,
				 aeg_pool_repairs(pool), f->free, f->repaired ? "some" : "none");
		assert_int_equal(aeg_pool_stats(pool, &st), 0);
		assert_int_equal(st.buffers, BUFFERS);
		assert_int_equal(st.buffer_bytes, BUF_BYTES);
		assert_true(st.in_use <= BUFFERS && st.high_water <= BUFFERS);
		assert_null(aeg_pool_buffer_ptr(pool, BUFFERS));
		assert_int_equal(aeg_pool_release(pool, BUFFERS), AEG_EINVAL);
		print_message("%-40s %u buffers taken, %u rebuilds\n", f->what, n, aeg_pool_repairs(pool));
		aeg_pool_destroy(pool);
	}
}

struct sleeper {
	aeg_pool_t *pool;
	int err;
	struct aeg_pool_buffer b;
};

static void *sleep_acquire(void *arg)
{
	struct sleeper *s = arg;

	s->err = aeg_pool_acquire(s->pool, -1, &s->b);
	return NULL;
}

/* A waiter count forged to 0 skips the wake-up; a waiter without a time limit still gets its buffer. */
static void forged_waiter_count(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer a, b;
	struct sleeper s = { 0 };
	aeg_pool_t *pool = NULL;
	pthread_t t;
	uint64_t t0;

	assert_int_equal(aeg_pool_create(dev, 0, BUF_BYTES, 2 * BUF_BYTES, &pool), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &a), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &b), 0);
	s.pool = pool;
	assert_int_equal(pthread_create(&t, NULL, sleep_acquire, &s), 0);
	while (__atomic_load_n(&aeg_pool_header(pool)->waiters, __ATOMIC_SEQ_CST) == 0)
		usleep(1000);
	usleep(20000);
	__atomic_store_n(&aeg_pool_header(pool)->waiters, 0, __ATOMIC_SEQ_CST);
	t0 = aeg_now_ns();
	assert_int_equal(aeg_pool_release(pool, b.index), 0);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(s.err, 0);
	assert_int_equal(s.b.index, b.index);
	assert_true(aeg_now_ns() - t0 < 2000000000ull);
	assert_int_equal(aeg_pool_release(pool, a.index), 0);
	assert_int_equal(aeg_pool_release(pool, s.b.index), 0);
	aeg_pool_destroy(pool);
}

/*
 * A process killed between claiming a buffer and counting it leaves the
 * in-use count one short; the buffer's release (or reclaim) must not wrap
 * the count to 2^32 - 1, which status would show as every buffer in use.
 */
static void count_never_wraps(void **state)
{
	aeg_device_t *dev = *state;
	struct aeg_pool_buffer a, b;
	struct aeg_pool_stats st;
	aeg_pool_t *pool = NULL;

	assert_int_equal(aeg_pool_create(dev, 0, BUF_BYTES, BUFFERS * BUF_BYTES, &pool), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &a), 0);
	assert_int_equal(aeg_pool_acquire(pool, 0, &b), 0);
	__atomic_store_n(&aeg_pool_header(pool)->in_use, 1, __ATOMIC_SEQ_CST);
	assert_int_equal(aeg_pool_release(pool, a.index), 0);
	assert_int_equal(aeg_pool_release(pool, b.index), 0);
	assert_int_equal(aeg_pool_stats(pool, &st), 0);
	assert_int_equal(st.in_use, 0);
	aeg_pool_destroy(pool);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(stopped_process_blocks_nobody, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(forged_headers, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(forged_waiter_count, host_device_setup, host_device_teardown),
		cmocka_unit_test_setup_teardown(count_never_wraps, host_device_setup, host_device_teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The pinned pool's free list: lock-free words in the memfd's header, none of them trusted. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "pinned_internal.h"

/*
 * A compare-and-swap that keeps failing means another process keeps
 * rewriting the word: give up rather than spin on its behalf. Real
 * contention fails a few times at most (each failure is someone's success).
 */
#define CAS_TRIES 10000
/* A waiter looks again this often even unwoken: a forged waiter count must not make it sleep for ever. */
#define WAIT_SLICE_MS 200
/* Rebuilds of a broken free list one acquire may make before it gives up. */
#define REPAIRS_PER_TAKE 2

#define TOP(head) ((uint32_t)(head))
#define NEXT_HEAD(head, top) ((((head) >> 32) + 1) << 32 | (uint64_t)(top))

void aeg_pool_list_init(struct aeg_pool_list *l, struct aeg_pool_header *h, uint32_t buffers)
{
	memset(l, 0, sizeof(*l));
	l->hdr = h;
	l->buffers = buffers;
	l->next = h->slots;
	l->owner = h->slots + buffers;
}

void aeg_pool_list_format(struct aeg_pool_list *l, uint32_t maker)
{
	struct aeg_pool_header *h = l->hdr;

	/* Buffer 0 on top: low buffers go out first. Links are index + 1, 0 ends the list. */
	for (uint32_t i = 0; i < l->buffers; i++) {
		l->next[i] = maker == 0 && i + 1 < l->buffers ? i + 2 : 0;
		l->owner[i] = maker;
	}
	h->head = maker == 0 && l->buffers > 0 ? 1 : 0;
	h->free_seq = 0;
	h->waiters = 0;
	h->in_use = 0;
	h->high_water = 0;
	h->acquires = 0;
	h->timeouts = 0;
}

/* Pop the top of the free stack: 0, AEG_ETIMEDOUT when it is empty, AEG_EIO when it is broken. */
static int pop(struct aeg_pool_list *l, uint32_t *index)
{
	struct aeg_pool_header *h = l->hdr;
	uint64_t old = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);

	for (int tries = 0; tries < CAS_TRIES; tries++) {
		uint32_t i, next;

		if (TOP(old) == 0)
			return AEG_ETIMEDOUT;
		i = TOP(old) - 1;
		if (i >= l->buffers)
			return aeg_fail(AEG_EIO, "its free list starts at buffer %" PRIu32 ", and it has %" PRIu32,
					i, l->buffers);
		/* Only pushes and rebuilds write links, always in range: anything else is forged. */
		next = __atomic_load_n(&l->next[i], __ATOMIC_RELAXED);
		if (next > l->buffers)
			return aeg_fail(AEG_EIO, "buffer %" PRIu32 " on its free list links to buffer %" PRIu32 ", and it has %" PRIu32,
					i, next - 1, l->buffers);
		if (__atomic_compare_exchange_n(&h->head, &old, NEXT_HEAD(old, next), 1, __ATOMIC_SEQ_CST,
						__ATOMIC_ACQUIRE)) {
			*index = i;
			return 0;
		}
	}
	return aeg_fail(AEG_EIO, "its free list changed under %d attempts in a row to take a buffer", CAS_TRIES);
}

static int push(struct aeg_pool_list *l, uint32_t index)
{
	struct aeg_pool_header *h = l->hdr;
	uint64_t old = __atomic_load_n(&h->head, __ATOMIC_RELAXED);

	for (int tries = 0; tries < CAS_TRIES; tries++) {
		__atomic_store_n(&l->next[index], TOP(old), __ATOMIC_RELAXED);
		if (__atomic_compare_exchange_n(&h->head, &old, NEXT_HEAD(old, index + 1), 1, __ATOMIC_SEQ_CST,
						__ATOMIC_RELAXED))
			return 0;
	}
	return aeg_fail(AEG_EIO, "pinned pool: its free list changed under %d attempts in a row to give buffer %" PRIu32 " back",
			CAS_TRIES, index);
}

/*
 * Only a process of the job that wrote into the header breaks the list:
 * say so, the first time and then at every power of ten, not on every
 * acquire it makes fail.
 */
static void report(struct aeg_pool_list *l, const char *what, uint32_t in_use)
{
	uint32_t n = __atomic_add_fetch(&l->repairs, 1, __ATOMIC_RELAXED);
	uint32_t p = 1;

	while (p < n && p <= UINT32_MAX / 10)
		p *= 10;
	if (p == n)
		aeg_warn("pinned pool: %s: a process of the job wrote into the pool's header; rebuilt its free list from the owner marks (%" PRIu32 " of %" PRIu32 " buffers held; %" PRIu32 " rebuild%s by this process)",
			 what, in_use, l->buffers, n, n == 1 ? "" : "s");
}

/*
 * Rebuild the free stack from the owner marks: every buffer no process
 * holds, buffer 0 on top. Installed only if the head did not move while
 * the list was made; a buffer being given back meanwhile may be left out
 * (it comes back at the next rebuild) or listed twice (its second pop fails
 * to claim it, which is caught as any other break).
 */
static void repair(struct aeg_pool_list *l, const char *what)
{
	struct aeg_pool_header *h = l->hdr;
	uint64_t old = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
	uint32_t top = 0, held = 0;

	for (uint32_t i = l->buffers; i-- > 0;) {
		if (__atomic_load_n(&l->owner[i], __ATOMIC_ACQUIRE) != 0) {
			held++;
			continue;
		}
		__atomic_store_n(&l->next[i], top, __ATOMIC_RELAXED);
		top = i + 1;
	}
	if (__atomic_compare_exchange_n(&h->head, &old, NEXT_HEAD(old, top), 0, __ATOMIC_SEQ_CST,
					__ATOMIC_RELAXED))
		__atomic_store_n(&h->in_use, held, __ATOMIC_RELAXED);
	report(l, what, held);
}

/* Pop a buffer and claim it with this process's pid; a broken list is rebuilt and tried again. */
static int take(struct aeg_pool_list *l, uint32_t *index)
{
	for (int repairs = 0;; repairs++) {
		uint32_t i = 0, holder = 0;
		int err = pop(l, &i);

		if (err == 0) {
			if (__atomic_compare_exchange_n(&l->owner[i], &holder, (uint32_t)getpid(), 0, __ATOMIC_SEQ_CST,
							__ATOMIC_RELAXED)) {
				*index = i;
				return 0;
			}
			err = aeg_fail(AEG_EIO, "buffer %" PRIu32 " was on its free list while process %" PRIu32 " held it",
				       i, holder);
		}
		if (err == AEG_ETIMEDOUT)
			return err;
		if (repairs == REPAIRS_PER_TAKE) {
			aeg_error_prefix("pinned pool: free list still broken after %d rebuilds", REPAIRS_PER_TAKE);
			return err;
		}
		repair(l, aeg_error_detail());
	}
}

/*
 * Wait for a release. The waiter count goes up before the sequence is read
 * and the list looked at; a release pushes, then bumps the sequence, then
 * reads the count: so either the pop sees the buffer, or the futex wait
 * sees the new sequence and returns at once, or the release sees a waiter
 * and wakes it.
 */
static int wait_take(struct aeg_pool_list *l, int timeout_ms, uint64_t deadline, uint32_t *index)
{
	struct aeg_pool_header *h = l->hdr;
	int err;

	__atomic_add_fetch(&h->waiters, 1, __ATOMIC_SEQ_CST);
	for (;;) {
		uint32_t seq = __atomic_load_n(&h->free_seq, __ATOMIC_SEQ_CST);
		uint64_t now, slice = WAIT_SLICE_MS * 1000000ull;

		err = take(l, index);
		if (err != AEG_ETIMEDOUT)
			break;
		now = aeg_now_ns();
		if (timeout_ms > 0) {
			if (now >= deadline)
				break;
			if (deadline - now < slice)
				slice = deadline - now;
		}
		aeg_futex_wait(&h->free_seq, seq, slice);
	}
	__atomic_sub_fetch(&h->waiters, 1, __ATOMIC_SEQ_CST);
	return err;
}

static void count_acquire(struct aeg_pool_list *l)
{
	struct aeg_pool_header *h = l->hdr;
	uint32_t n = __atomic_add_fetch(&h->in_use, 1, __ATOMIC_RELAXED);
	uint32_t hw = __atomic_load_n(&h->high_water, __ATOMIC_RELAXED);

	for (int tries = 0; tries < 8 && n > hw; tries++)
		if (__atomic_compare_exchange_n(&h->high_water, &hw, n, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
			break;
	__atomic_add_fetch(&h->acquires, 1, __ATOMIC_RELAXED);
}

int aeg_pool_list_take(struct aeg_pool_list *l, int timeout_ms, uint32_t *index)
{
	uint64_t deadline = timeout_ms > 0 ? aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
	int err = take(l, index);

	if (err == AEG_ETIMEDOUT && timeout_ms != 0)
		err = wait_take(l, timeout_ms, deadline, index);
	if (err == AEG_ETIMEDOUT)
		__atomic_add_fetch(&l->hdr->timeouts, 1, __ATOMIC_RELAXED);
	else if (err == 0)
		count_acquire(l);
	return err;
}

/*
 * One buffer fewer in use, never below 0: a process killed between its
 * claim of a buffer and counting it leaves the count one short, and the
 * buffer still comes back (by reclaim) to be counted out.
 */
static void count_release(struct aeg_pool_header *h)
{
	uint32_t n = __atomic_load_n(&h->in_use, __ATOMIC_RELAXED);

	for (int tries = 0; tries < CAS_TRIES && n > 0; tries++)
		if (__atomic_compare_exchange_n(&h->in_use, &n, n - 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
			break;
}

/* Back on the list, counted out when it was counted in (@counted), waiters woken. */
static int give_back(struct aeg_pool_list *l, uint32_t index, int counted)
{
	struct aeg_pool_header *h = l->hdr;
	int err = push(l, index);

	if (counted)
		count_release(h);
	__atomic_add_fetch(&h->free_seq, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&h->waiters, __ATOMIC_SEQ_CST) != 0)
		aeg_futex_wake(&h->free_seq);
	return err;
}

/* Unmark held buffer @index and list it; @unheld says what a buffer not held is. */
static int unmark_and_list(struct aeg_pool_list *l, uint32_t index, int counted, const char *unheld)
{
	if (index >= l->buffers)
		return aeg_fail(AEG_EINVAL, "pinned pool: buffer %" PRIu32 " does not exist (the pool has %" PRIu32 ")",
				index, l->buffers);
	/* Unmarked first, then listed: a buffer on the list is never marked. */
	if (__atomic_exchange_n(&l->owner[index], 0, __ATOMIC_SEQ_CST) == 0)
		return aeg_fail(AEG_EINVAL, "pinned pool: buffer %" PRIu32 " %s", index, unheld);
	return give_back(l, index, counted);
}

int aeg_pool_list_give(struct aeg_pool_list *l, uint32_t index)
{
	return unmark_and_list(l, index, 1, "is not acquired (released twice?)");
}

int aeg_pool_list_add(struct aeg_pool_list *l, uint32_t index)
{
	/* Never acquired, so not counted out: in_use counts what users hold. */
	return unmark_and_list(l, index, 0, "is listed already");
}

uint32_t aeg_pool_list_reclaim(struct aeg_pool_list *l, uint32_t pid)
{
	uint32_t n = 0;

	for (uint32_t i = 0; i < l->buffers; i++) {
		uint32_t want = pid;

		if (__atomic_compare_exchange_n(&l->owner[i], &want, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
			if (give_back(l, i, 1) < 0)
				aeg_warn("%s", aeg_error_detail());
			n++;
		}
	}
	return n;
}

void aeg_pool_list_counts(const struct aeg_pool_list *l, struct aeg_pool_stats *stats)
{
	const struct aeg_pool_header *h = l->hdr;
	uint32_t in_use = __atomic_load_n(&h->in_use, __ATOMIC_RELAXED);
	uint32_t high_water = __atomic_load_n(&h->high_water, __ATOMIC_RELAXED);

	/* Counts any process can write: kept within what the pool can hold. */
	stats->in_use = in_use < l->buffers ? in_use : l->buffers;
	stats->high_water = high_water < l->buffers ? high_water : l->buffers;
	stats->acquires = __atomic_load_n(&h->acquires, __ATOMIC_RELAXED);
	stats->timeouts = __atomic_load_n(&h->timeouts, __ATOMIC_RELAXED);
}

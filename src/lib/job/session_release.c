/* Releasing what a session loaded: by block id (waiting for loads in flight), or all of it. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/session.h>

#include "internal.h"
#include "prefetch_internal.h"
#include "session_internal.h"

#define POLL_MIN_US 200u
#define POLL_MAX_US 20000u

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;

	return a < b ? -1 : a > b;
}

/* LOCAL: the GPU whose engine holds block @id: -1 none, -2 several. Lock held. */
static int owner_gpu_locked(aeg_session_t *s, uint64_t id)
{
	struct aeg_block b;
	int found = -1;

	for (int i = 0; i < s->ngpus; i++) {
		if (s->gpus[i].slab == NULL || aeg_slab_lookup(s->gpus[i].slab, id, &b) < 0)
			continue;
		if (found >= 0)
			return -2;
		found = i;
	}
	aeg_error_clear();
	return found;
}

/* Sort @ids and drop repeats; returns how many are left. */
static size_t unique_ids(uint64_t *ids, size_t n)
{
	size_t m = 0;

	qsort(ids, n, sizeof(*ids), cmp_u64);
	for (size_t i = 0; i < n; i++)
		if (m == 0 || ids[m - 1] != ids[i])
			ids[m++] = ids[i];
	return m;
}

static int remaining_ms(uint64_t deadline_ns, int timeout_ms)
{
	uint64_t now;

	if (timeout_ms < 0)
		return -1;
	now = aeg_now_ns();
	return now >= deadline_ns ? 0 : (int)((deadline_ns - now + 999999) / 1000000);
}

static int several_gpus(const int *owner, size_t n)
{
	for (size_t i = 1; i < n; i++)
		if (owner[i] != owner[0])
			return 1;
	return 0;
}

/* The ids of @ids[0..n) whose @owner is @g, into @out; returns how many. */
static size_t ids_of(const int *owner, const uint64_t *ids, size_t n, int g, uint64_t *out)
{
	size_t k = 0;

	for (size_t i = 0; i < n; i++)
		if (owner[i] == g)
			out[k++] = ids[i];
	return k;
}

static int local_release(aeg_session_t *s, int gpu, const uint64_t *ids, size_t n, int timeout_ms)
{
	uint64_t deadline = aeg_now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	uint64_t *mine;
	int *owner, err = 0;

	owner = malloc(n * sizeof(*owner));
	mine = malloc(n * sizeof(*mine));
	if (owner == NULL || mine == NULL) {
		free(owner);
		free(mine);
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	}
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < n && err == 0; i++) {
		owner[i] = gpu >= 0 ? gpu : owner_gpu_locked(s, ids[i]);
		if (owner[i] == -2)
			err = aeg_fail(AEG_EINVAL, "slab id %" PRIu64 " is held by loads on several GPUs: name the GPU", ids[i]);
		else if (owner[i] < 0 || owner[i] >= s->ngpus || s->gpus[owner[i]].pf == NULL)
			err = aeg_fail(AEG_ENOENT, "slab id %" PRIu64 " holds no loaded chunk (released already?)", ids[i]);
	}
	pthread_mutex_unlock(&s->lock);
	/*
	 * One engine call per GPU; an engine checks all its ids before freeing
	 * any. Ids on several GPUs are all released or none: every engine's
	 * loads are waited for first, so a time-out leaves the first GPU's ids
	 * held too (the caller may ask again with the same ids).
	 */
	for (int pass = several_gpus(owner, n) ? 0 : 1; pass < 2 && err == 0; pass++) {
		for (int g = 0; g < s->ngpus && err == 0; g++) {
			uint32_t k = (uint32_t)ids_of(owner, ids, n, g, mine);

			if (k > 0 && pass == 0)
				err = aeg_prefetch_wait_settled(s->gpus[g].pf, mine, k, remaining_ms(deadline, timeout_ms));
			else if (k > 0)
				err = aeg_prefetch_release_wait(s->gpus[g].pf, mine, k, remaining_ms(deadline, timeout_ms));
		}
	}
	free(mine);
	free(owner);
	return err;
}

/*
 * JOB: wait for a load of this session holding any of @ids (slab @slab) to
 * stop. 0 when one stopped or none is known (the caller asks again),
 * AEG_ETIMEDOUT.
 */
static int job_wait_holders(aeg_session_t *s, int slab, const uint64_t *ids, size_t n, int timeout_ms)
{
	const struct idset *set = &s->owned[slab];
	uint64_t load = 0;
	int err;

	pthread_mutex_lock(&s->lock);
	for (size_t k = 0; k < set->n && load == 0; k++)
		for (size_t i = 0; i < n && load == 0; i++)
			if (set->b[k].id == ids[i])
				load = set->b[k].load;
	pthread_mutex_unlock(&s->lock);
	if (load == 0)
		return 0;
	err = aeg_job_wait(s->job, load, timeout_ms);
	if (err != AEG_ETIMEDOUT) {
		aeg_error_clear();
		err = 0;
	}
	return err;
}

/*
 * JOB: wait, until @deadline, for every load of this session that holds
 * any of @ids to stop: a release in several requests (ids of several slabs,
 * or more than one request holds) then releases all or none of them.
 */
static int job_wait_all_holders(aeg_session_t *s, const uint64_t *ids, size_t n, uint64_t deadline,
				int timeout_ms)
{
	uint64_t *loads;
	size_t nloads = 0;
	int err = 0;

	loads = malloc(n * sizeof(*loads));
	if (loads == NULL)
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	pthread_mutex_lock(&s->lock);
	for (int j = 0; j < s->ngpus; j++) {
		for (size_t k = 0; k < s->owned[j].n; k++) {
			const struct owned_block *b = &s->owned[j].b[k];
			int want = 0, seen = 0;

			for (size_t i = 0; i < n && !want; i++)
				want = b->id == ids[i];
			for (size_t l = 0; l < nloads && want && !seen; l++)
				seen = loads[l] == b->load;
			if (want && !seen && nloads < n)
				loads[nloads++] = b->load;
		}
	}
	pthread_mutex_unlock(&s->lock);
	for (size_t l = 0; l < nloads && err == 0; l++) {
		err = aeg_job_wait(s->job, loads[l], remaining_ms(deadline, timeout_ms));
		if (err == AEG_ETIMEDOUT)
			err = aeg_fail(AEG_ETIMEDOUT, "load %" PRIu64 " holding slab ids to release still loading after %d ms; "
				       "nothing released", loads[l], timeout_ms);
		else if (err) {
			aeg_error_clear();      /* a failed load's blocks are released all the same */
			err = 0;
		}
	}
	free(loads);
	return err;
}

static int job_release(aeg_session_t *s, int gpu, const uint64_t *ids, size_t n, int timeout_ms,
		       uint32_t *released)
{
	uint64_t deadline = aeg_now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	unsigned us = POLL_MIN_US;
	uint64_t *mine;
	int *slab, err = 0;

	slab = malloc(n * sizeof(*slab));
	mine = malloc(n * sizeof(*mine));
	if (slab == NULL || mine == NULL) {
		free(slab);
		free(mine);
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	}
	if (gpu >= 0)
		err = session_job_slab(s, gpu, &slab[0]);
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < n && err == 0; i++) {
		slab[i] = gpu >= 0 ? slab[0] : -1;
		for (int j = 0; j < s->ngpus && slab[i] < 0; j++)
			for (size_t k = 0; k < s->owned[j].n && slab[i] < 0; k++)
				if (s->owned[j].b[k].id == ids[i])
					slab[i] = j;
		if (slab[i] < 0 && s->ngpus == 1)
			slab[i] = 0;
		if (slab[i] < 0)
			err = aeg_fail(AEG_EINVAL, "slab id %" PRIu64 " was not loaded by this process and the job has %d slabs: name the GPU",
				       ids[i], s->ngpus);
	}
	pthread_mutex_unlock(&s->lock);
	if (err == 0 && timeout_ms != 0 && (n > AEG_JOB_RELEASE_MAX || several_gpus(slab, n)))
		err = job_wait_all_holders(s, ids, n, deadline, timeout_ms);
	for (int j = 0; j < s->ngpus && err == 0; j++) {
		size_t k = ids_of(slab, ids, n, j, mine);
		uint32_t got = 0;

		for (size_t at = 0; at < k && err == 0; at += got ? got : 1) {
			size_t part = k - at < AEG_JOB_RELEASE_MAX ? k - at : AEG_JOB_RELEASE_MAX;

			got = 0;
			for (;;) {
				err = aeg_job_release(s->job, j, mine + at, part, &got);
				if (err != AEG_EBUSY || timeout_ms == 0)
					break;
				/* A load still in flight holds a block: wait for it, then again. */
				err = job_wait_holders(s, j, mine + at, part, remaining_ms(deadline, timeout_ms));
				if (err == 0 && timeout_ms >= 0 && aeg_now_ns() >= deadline)
					err = AEG_ETIMEDOUT;
				if (err == AEG_ETIMEDOUT) {
					err = aeg_fail(AEG_ETIMEDOUT, "a load holding slab id %" PRIu64 " still loading after %d ms; nothing released",
						       mine[at], timeout_ms);
					break;
				}
				usleep(us);
				us = us < POLL_MAX_US ? 2 * us : POLL_MAX_US;
			}
			if (err == 0) {
				pthread_mutex_lock(&s->lock);
				disown_blocks(s, j, mine + at, part);
				pthread_mutex_unlock(&s->lock);
				if (released)
					*released += (uint32_t)part;
				got = (uint32_t)part;
			}
		}
	}
	free(mine);
	free(slab);
	return err;
}

AEG_EXPORT int aeg_session_release(aeg_session_t *s, int gpu, const uint64_t *ids, size_t count,
				   int timeout_ms, uint32_t *released)
{
	uint64_t *u;
	size_t n;
	int err;

	if (released)
		*released = 0;
	if (s == NULL || (ids == NULL && count))
		return aeg_fail(AEG_EINVAL, "aeg_session_release: NULL argument");
	if (count == 0)
		return 0;
	for (size_t i = 0; i < count; i++)
		if (ids[i] == 0)
			return aeg_fail(AEG_EINVAL, "slab id 0 is no block's");
	u = malloc(count * sizeof(*u));
	if (u == NULL)
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	memcpy(u, ids, count * sizeof(*u));
	n = unique_ids(u, count);
	if (s->mode == AEG_SESSION_JOB) {
		err = job_release(s, gpu, u, n, timeout_ms, released);
	} else {
		err = gpu >= 0 ? session_check_gpu(s, gpu) : 0;
		if (err == 0)
			err = local_release(s, gpu, u, n, timeout_ms);
		if (err == 0 && released)
			*released = (uint32_t)n;
	}
	free(u);
	return err;
}

AEG_EXPORT int aeg_session_release_all(aeg_session_t *s, unsigned flags, uint32_t *released)
{
	uint32_t total = 0;
	int err = 0;

	if (released)
		*released = 0;
	if (s == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_release_all: NULL session");
	if (flags & ~AEG_RELEASE_JOB)
		return aeg_fail(AEG_EINVAL, "release flags 0x%x: unknown bits", flags);
	if (s->mode == AEG_SESSION_JOB && (flags & AEG_RELEASE_JOB)) {
		err = aeg_job_release_all(s->job, &total);
		pthread_mutex_lock(&s->lock);
		for (int j = 0; j < AEG_JOB_MAX_GPUS; j++)
			s->owned[j].n = 0;
		pthread_mutex_unlock(&s->lock);
	} else if (s->mode == AEG_SESSION_JOB) {
		/* Its own blocks, one at a time: another step may have freed some (ENOENT). */
		for (int j = 0; j < s->ngpus && err == 0; j++) {
			for (;;) {
				uint64_t id;
				uint32_t got = 0;

				pthread_mutex_lock(&s->lock);
				id = s->owned[j].n ? s->owned[j].b[s->owned[j].n - 1].id : 0;
				pthread_mutex_unlock(&s->lock);
				if (id == 0)
					break;
				err = job_release(s, -1, &id, 1, -1, &got);
				if (err == AEG_ENOENT) {
					aeg_error_clear();
					pthread_mutex_lock(&s->lock);
					disown_blocks(s, j, &id, 1);
					pthread_mutex_unlock(&s->lock);
					err = 0;
				}
				if (err)
					break;
				total += got;
			}
		}
	} else {
		/* An engine, once made, stays until the session closes. */
		for (int g = 0; g < s->ngpus; g++) {
			struct aeg_prefetch_stats st;
			aeg_prefetch_t *pf;
			int e;

			pthread_mutex_lock(&s->lock);
			pf = s->gpus[g].pf;
			pthread_mutex_unlock(&s->lock);
			if (pf == NULL)
				continue;
			aeg_prefetch_stats(pf, &st);
			e = aeg_prefetch_release_all(pf);
			if (e == 0)
				total += (uint32_t)st.blocks;
			else if (err == 0)
				err = e;
		}
	}
	if (released)
		*released = total;
	return err;
}


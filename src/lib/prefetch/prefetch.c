/* Prefetch engine: its configuration, creation and teardown, releases, and what a load tells. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <aegaeon/event.h>
#include <aegaeon/prefetch.h>

#include "device_internal.h"
#include "internal.h"
#include "pinned_internal.h"
#include "prefetch_engine.h"
#include "prefetch_internal.h"

AEG_EXPORT const char *aeg_prefetch_feed_name(enum aeg_prefetch_feed feed)
{
	switch (feed) {
	case AEG_FEED_AUTO: return "auto";
	case AEG_FEED_MMAP: return "mmap";
	case AEG_FEED_READ: return "read";
	case AEG_FEED_CACHE: return "cache";
	case AEG_FEED_MIXED: return "mixed";
	}
	return "unknown";
}

AEG_EXPORT void aeg_prefetch_config_defaults(struct aeg_prefetch_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->threads = 12;
	cfg->streams = 4;
	cfg->piece_bytes = 64ull << 20;
	cfg->mmap_threads = 1;
	cfg->ring_buffers = 0;          /* AEG_PREFETCH_RING_BUFFERS_PER_THREAD * threads */
	cfg->direct_io = 0;
	cfg->small_file_bytes = 64ull << 20;
	cfg->cache_bytes = 0;
	cfg->topo = NULL;
}

uint64_t aeg_prefetch_slab_bytes_for(uint64_t file_bytes, uint64_t chunk_bytes)
{
	/*
	 * Greedy packing closes a group only when the next tensor does not fit,
	 * so two neighbouring groups hold more than a chunk: at most
	 * 2 * bytes / chunk + 2 groups, each rounded up by under AEG_SLAB_ALIGN.
	 */
	uint64_t groups = chunk_bytes ? 2 * (file_bytes / chunk_bytes) + 2 : 2;

	return aeg_round_up(file_bytes + groups * AEG_SLAB_ALIGN, 2ull << 20);
}

void aeg_prefetch_set_hook(aeg_prefetch_t *pf, aeg_prefetch_hook_fn fn, void *arg)
{
	pthread_mutex_lock(&pf->lock);
	pf->hook = fn;
	pf->hook_arg = arg;
	pthread_mutex_unlock(&pf->lock);
}

uint64_t aeg_prefetch_item_bytes(const aeg_load_t *load)
{
	return load->item_bytes;
}

void prefetch_queue_finish(struct aeg_prefetch *pf, struct aeg_load *l)
{
	if (l->items_left == 0 && l->issuing == 0 && !l->finish_queued) {
		l->finish_queued = 1;
		l->finish_next = pf->finishing;
		pf->finishing = l;
		pthread_cond_broadcast(&pf->work_cv);
	}
}

/* Stop issuing @l's items; the first error wins. Lock held. */
void prefetch_load_stop(struct aeg_prefetch *pf, struct aeg_load *l, int err, const char *detail)
{
	if (l->stop_err == 0) {
		l->stop_err = err;
		snprintf(l->detail, sizeof(l->detail), "%s", detail);
	}
	l->items_left -= l->nitems - l->next_item;
	l->next_item = l->nitems;
	prefetch_queue_finish(pf, l);
	pthread_cond_broadcast(&pf->work_cv);
}

void prefetch_load_free(struct aeg_load *l)
{
	free(l->chunks);
	free(l->rt);
	free(l->groups);
	free(l->tensors);
	free(l->items);
	slice_plan_free(&l->plan);
	aeg_st_free(&l->hdr);
	free(l->path);
	free(l);
}

/* @l still holds chunks or a caller's handle, or is loading. Lock held. */
static int load_held(const struct aeg_load *l)
{
	return l->in_flight || !l->closed || l->live_groups;
}

/* Free @l once nothing refers to it (and its host side is given back). Lock held. */
void prefetch_load_maybe_free(struct aeg_prefetch *pf, struct aeg_load *l)
{
	if (load_held(l) || l->cleaning)
		return;
	if (l->prev)
		l->prev->next = l->next;
	else
		pf->loads = l->next;
	if (l->next)
		l->next->prev = l->prev;
	prefetch_load_free(l);
}

/* -------------------------------------------------------------- engine */

int aeg_prefetch_ring_buffers(const struct aeg_prefetch_config *cfg)
{
	return cfg->ring_buffers ? cfg->ring_buffers : AEG_PREFETCH_RING_BUFFERS_PER_THREAD * cfg->threads;
}

int aeg_prefetch_config_check(const struct aeg_prefetch_config *cfg)
{
	int ring = aeg_prefetch_ring_buffers(cfg);

	if (cfg->threads < 1 || cfg->threads > 256)
		return aeg_fail(AEG_EINVAL, "prefetch threads %d: must be 1..256", cfg->threads);
	if (cfg->streams < 1 || cfg->streams > 64)
		return aeg_fail(AEG_EINVAL, "prefetch streams %d: must be 1..64", cfg->streams);
	if (cfg->piece_bytes == 0 || cfg->piece_bytes % PAGE)
		return aeg_fail(AEG_EINVAL, "prefetch piece size %" PRIu64 ": must be a non-zero multiple of 4096",
				cfg->piece_bytes);
	if (cfg->mmap_threads < 1 || cfg->mmap_threads > 256)
		return aeg_fail(AEG_EINVAL, "prefetch mmap threads %d: must be 1..256", cfg->mmap_threads);
	if (ring < 1 || ring > 4096)
		return aeg_fail(AEG_EINVAL, "prefetch ring of %d buffers: must be 1..4096", ring);
	return 0;
}

AEG_EXPORT int aeg_prefetch_create(aeg_slab_t *slab, aeg_pool_t *pool,
				   const struct aeg_prefetch_config *cfg, aeg_prefetch_t **out)
{
	struct aeg_prefetch *pf;
	struct aeg_pool_stats ps;
	struct aeg_gpu_info info;
	int err = 0;

	if (slab == NULL || out == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_create: NULL argument");
	pf = calloc(1, sizeof(*pf));
	if (pf == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	if (cfg)
		pf->cfg = *cfg;
	else
		aeg_prefetch_config_defaults(&pf->cfg);
	pf->cfg.ring_buffers = aeg_prefetch_ring_buffers(&pf->cfg);
	err = aeg_prefetch_config_check(&pf->cfg);
	if (err) {
		free(pf);
		return err;
	}
	pf->slab = slab;
	pf->dev = aeg_slab_device(slab);
	pf->gpu = aeg_slab_gpu(slab);
	pf->next_id = 1;
	if (aeg_device_gpu_info(pf->dev, pf->gpu, &info) == 0)
		snprintf(pf->pci, sizeof(pf->pci), "%s", info.pci_bus_id);
	pthread_mutex_init(&pf->lock, NULL);
	pthread_cond_init(&pf->work_cv, NULL);
	aeg_cond_init_monotonic(&pf->done_cv);      /* aeg_deadline_after's waits */

	if (pool == NULL && pf->cfg.pool_later_buffer_bytes) {
		/* Its pool comes later; the cache with it. */
		pf->buffer_bytes = pf->cfg.pool_later_buffer_bytes;
		pf->cfg.cache_bytes = 0;
	} else {
		if (pool == NULL) {
			err = aeg_pool_create_private(pf->dev, pf->gpu, AEG_PREFETCH_RING_BUFFER_BYTES,
					      AEG_PREFETCH_RING_BUFFER_BYTES * (uint64_t)pf->cfg.ring_buffers, &pool);
			if (err)
				goto fail;
			pf->own_pool = 1;
			pf->staging_ring = 1;
			pf->cfg.cache_bytes = 0;
		}
		pf->pool = pool;
		err = aeg_pool_stats(pool, &ps);
		if (err)
			goto fail;
		pf->buffer_bytes = ps.buffer_bytes;
	}
	pf->read_bytes = pf->buffer_bytes;
	if (!pf->own_pool && pf->buffer_bytes >= 2 * AEG_PREFETCH_RING_BUFFER_BYTES) {
		/* READ pieces in slots carved from the pool's buffers (prefetch_feed.c). */
		pf->slots_per_buf = (uint32_t)(pf->buffer_bytes / AEG_PREFETCH_RING_BUFFER_BYTES);
		pf->read_bytes = AEG_PREFETCH_RING_BUFFER_BYTES;
		pf->max_carved = ((uint32_t)pf->cfg.ring_buffers + pf->slots_per_buf - 1) / pf->slots_per_buf;
		pf->carved = calloc(pf->max_carved, sizeof(*pf->carved));
		pf->free_slots = calloc((size_t)pf->max_carved * pf->slots_per_buf, sizeof(*pf->free_slots));
		if (pf->carved == NULL || pf->free_slots == NULL) {
			err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
			goto fail;
		}
	}

	pf->streams = calloc((size_t)pf->cfg.streams, sizeof(*pf->streams));
	pf->workers = calloc((size_t)pf->cfg.threads, sizeof(*pf->workers));
	if (pf->streams == NULL || pf->workers == NULL) {
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		goto fail;
	}
	for (; pf->nstreams < pf->cfg.streams; pf->nstreams++) {
		err = aeg_stream_create(pf->dev, pf->gpu, &pf->streams[pf->nstreams]);
		if (err)
			goto fail;
	}
	for (; pf->nworkers < pf->cfg.threads; pf->nworkers++) {
		struct worker_arg *wa = malloc(sizeof(*wa));
		int rc;

		if (wa == NULL) {
			err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
			goto fail;
		}
		wa->pf = pf;
		wa->index = pf->nworkers;
		rc = pthread_create(&pf->workers[pf->nworkers], NULL, prefetch_worker, wa);
		if (rc) {
			free(wa);
			err = aeg_fail(AEG_ENOMEM, "prefetch: starting worker %d: %s", pf->nworkers,
				       strerror(rc));
			goto fail;
		}
	}
	*out = pf;
	return 0;
fail:
	aeg_prefetch_destroy(pf);
	return err;
}

static void stop_all_and_wait(struct aeg_prefetch *pf)
{
	for (struct aeg_load *l = pf->loads; l; l = l->next)
		if (l->in_flight)
			prefetch_load_stop(pf, l, AEG_ECANCELED, "load cancelled: every chunk is being released");
	for (;;) {
		struct aeg_load *l = pf->loads;

		while (l && !l->in_flight && !l->cleaning)
			l = l->next;
		if (l == NULL)
			break;
		pthread_cond_wait(&pf->done_cv, &pf->lock);
	}
}

/*
 * Free group @g of @l. Its events go to @dead (*@ndead of them so far) for
 * the caller to destroy once it dropped the lock: with another load in
 * flight, a host function of this engine may wait for the lock, and a
 * CUDA call made under it could wait for that host function. With @dead
 * NULL (no load in flight) they are destroyed at once.
 */
static void release_group(struct aeg_prefetch *pf, struct aeg_load *l, struct group *g,
			  aeg_event_t **dead, uint32_t *ndead)
{
	if (g->released)
		return;
	for (uint32_t c = g->first_chunk; c < g->first_chunk + g->nchunks; c++) {
		if (dead != NULL)
			dead[(*ndead)++] = l->rt[c].ev;
		else
			aeg_event_destroy(l->rt[c].ev);
		l->rt[c].ev = NULL;
		l->rt[c].state = CH_RELEASED;
	}
	aeg_slab_free(pf->slab, g->block.id);
	g->released = 1;
	l->live_groups--;
}

static void destroy_events(aeg_event_t **dead, uint32_t ndead)
{
	for (uint32_t i = 0; i < ndead; i++)
		aeg_event_destroy(dead[i]);
}

AEG_EXPORT int aeg_prefetch_set_pool(aeg_prefetch_t *pf, aeg_pool_t *pool, uint64_t cache_bytes, int err)
{
	struct aeg_pool_stats ps;

	if (pf == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_set_pool: NULL engine");
	if (pool != NULL && aeg_pool_stats(pool, &ps) == 0 && ps.buffer_bytes != pf->buffer_bytes)
		return aeg_fail(AEG_EINVAL, "prefetch: a pool of %" PRIu64 "-byte buffers, %" PRIu64 " announced",
				ps.buffer_bytes, pf->buffer_bytes);
	pthread_mutex_lock(&pf->lock);
	if (pf->pool != NULL || pf->pool_err != 0 || pf->cfg.pool_later_buffer_bytes == 0) {
		pthread_mutex_unlock(&pf->lock);
		return aeg_fail(AEG_EEXIST, "prefetch: the engine has its pool already");
	}
	if (pool != NULL) {
		__atomic_store_n(&pf->pool_ns, aeg_now_ns(), __ATOMIC_RELAXED);
		pf->pool = pool;
		pf->cfg.cache_bytes = cache_bytes;
	} else {
		pf->pool_err = err < 0 ? err : AEG_ENOMEM;
		pf->staging_ring = 0;   /* later AUTO loads register their pieces */
		snprintf(pf->pool_detail, sizeof(pf->pool_detail), "%s", aeg_error_detail());
	}
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

void aeg_prefetch_ring_coming(aeg_prefetch_t *pf)
{
	pthread_mutex_lock(&pf->lock);
	if (pf->pool == NULL && pf->pool_err == 0 && pf->cfg.pool_later_buffer_bytes != 0)
		pf->staging_ring = 1;
	pthread_mutex_unlock(&pf->lock);
}

int aeg_prefetch_set_topo(aeg_prefetch_t *pf, const aeg_topo_t *topo)
{
	if (pf == NULL || topo == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_set_topo: NULL argument");
	pthread_mutex_lock(&pf->lock);
	if (pf->cfg.topo != NULL) {
		pthread_mutex_unlock(&pf->lock);
		return aeg_fail(AEG_EEXIST, "prefetch: the engine has its topology already");
	}
	pf->cfg.topo = topo;
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

uint32_t aeg_prefetch_bound_workers(aeg_prefetch_t *pf)
{
	uint32_t n;

	pthread_mutex_lock(&pf->lock);
	n = pf->bound;
	pthread_mutex_unlock(&pf->lock);
	return n;
}

int aeg_prefetch_hold(aeg_prefetch_t *pf, int hold)
{
	if (pf == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_hold: NULL engine");
	pthread_mutex_lock(&pf->lock);
	if (!hold && pf->held == 0) {
		pthread_mutex_unlock(&pf->lock);
		return aeg_fail(AEG_EINVAL, "prefetch: the engine is not held");
	}
	pf->held += hold ? 1 : -1;
	if (pf->held == 0)
		pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

AEG_EXPORT int aeg_prefetch_release_all(aeg_prefetch_t *pf)
{
	struct aeg_load *l, *next;

	if (pf == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_release_all: NULL engine");
	pthread_mutex_lock(&pf->lock);
	stop_all_and_wait(pf);
	/* Every load has ended: no host function of this engine is queued, so
	 * the events can go under the lock. */
	for (l = pf->loads; l; l = next) {
		next = l->next;
		for (uint32_t g = 0; g < l->ngroups; g++)
			release_group(pf, l, &l->groups[g], NULL, NULL);
		prefetch_load_maybe_free(pf, l);
	}
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

AEG_EXPORT void aeg_prefetch_destroy(aeg_prefetch_t *pf)
{
	if (pf == NULL)
		return;
	if (pf->workers && pf->nworkers)
		aeg_prefetch_release_all(pf);
	pthread_mutex_lock(&pf->lock);
	while (pf->loads) {
		pf->loads->closed = 1;
		prefetch_load_maybe_free(pf, pf->loads);
	}
	while (prefetch_cache_evict_one(pf))
		;
	pf->quit = 1;
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	for (int i = 0; i < pf->nworkers; i++)
		pthread_join(pf->workers[i], NULL);
	for (int i = 0; i < pf->nstreams; i++)
		aeg_stream_destroy(pf->streams[i]);
	prefetch_slots_drop(pf, 1);     /* every copy has run: the pool outlives the engine */
	if (pf->own_pool)
		aeg_pool_destroy(pf->pool);
	free(pf->carved);
	free(pf->free_slots);
	free(pf->streams);
	free(pf->workers);
	pthread_cond_destroy(&pf->done_cv);
	pthread_cond_destroy(&pf->work_cv);
	pthread_mutex_destroy(&pf->lock);
	free(pf);
}

/*
 * The load and group holding each of @ids, or AEG_ENOENT, or AEG_EBUSY for
 * one still loading (*@busy is that load). Lock held.
 */
static int find_owners(struct aeg_prefetch *pf, const uint64_t *ids, uint32_t count,
		       struct aeg_load **owner, uint32_t *gidx, struct aeg_load **busy)
{
	for (uint32_t i = 0; i < count; i++) {
		owner[i] = NULL;
		for (struct aeg_load *l = pf->loads; l && !owner[i]; l = l->next) {
			for (uint32_t g = 0; g < l->ngroups; g++) {
				if (l->groups[g].block.id == ids[i] && !l->groups[g].released) {
					owner[i] = l;
					gidx[i] = g;
					break;
				}
			}
		}
		if (owner[i] == NULL)
			return aeg_fail(AEG_ENOENT, "slab id %" PRIu64 " holds no chunk of this engine (already released?)",
					ids[i]);
		if (owner[i]->in_flight) {
			*busy = owner[i];
			return aeg_fail(AEG_EBUSY, "slab id %" PRIu64 " belongs to load %" PRIu64 " of %s, still loading: cancel it first",
					ids[i], owner[i]->id, owner[i]->path);
		}
	}
	return 0;
}

/* Wait on done_cv until @deadline (NULL: no limit); AEG_ETIMEDOUT after it. Lock held. */
static int wait_done(struct aeg_prefetch *pf, const struct timespec *deadline)
{
	if (deadline == NULL) {
		pthread_cond_wait(&pf->done_cv, &pf->lock);
		return 0;
	}
	return pthread_cond_timedwait(&pf->done_cv, &pf->lock, deadline) == ETIMEDOUT ? AEG_ETIMEDOUT : 0;
}

/* Release groups @gidx of loads @owner (@count of them); the events go after the lock. */
static int release_owned(struct aeg_prefetch *pf, struct aeg_load **owner, const uint32_t *gidx,
			 uint32_t count)
{
	aeg_event_t **dead;
	uint64_t nchunks = 0;
	uint32_t ndead = 0;

	for (uint32_t i = 0; i < count; i++)
		nchunks += owner[i]->groups[gidx[i]].nchunks;
	dead = malloc((nchunks ? nchunks : 1) * sizeof(*dead));
	if (dead == NULL) {
		pthread_mutex_unlock(&pf->lock);
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory releasing %u blocks", count);
	}
	for (uint32_t i = 0; i < count; i++)
		release_group(pf, owner[i], &owner[i]->groups[gidx[i]], dead, &ndead);
	for (uint32_t i = 0; i < count; i++) {
		/* Free each load once, after its last use in this loop. */
		uint32_t j = i + 1;

		while (j < count && owner[j] != owner[i])
			j++;
		if (j == count)
			prefetch_load_maybe_free(pf, owner[i]);
	}
	pthread_mutex_unlock(&pf->lock);
	destroy_events(dead, ndead);
	free(dead);
	return 0;
}

/* Wait up to @timeout_ms (< 0: no limit) until no load holding @ids is in flight, then release them if @release. */
static int release_wait(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count, int timeout_ms, int release)
{
	struct aeg_load **owner, *busy = NULL;
	struct timespec ts;
	uint32_t *gidx;
	int err;

	if (pf == NULL || (ids == NULL && count))
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_release: NULL argument");
	owner = calloc(count ? count : 1, sizeof(*owner));
	gidx = calloc(count ? count : 1, sizeof(*gidx));
	if (owner == NULL || gidx == NULL) {
		free(owner);
		free(gidx);
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	}
	if (timeout_ms > 0)
		aeg_deadline_after(&ts, timeout_ms);
	pthread_mutex_lock(&pf->lock);
	for (;;) {
		err = find_owners(pf, ids, count, owner, gidx, &busy);
		if (err != AEG_EBUSY || timeout_ms == 0)
			break;
		if (wait_done(pf, timeout_ms < 0 ? NULL : &ts) == AEG_ETIMEDOUT) {
			err = aeg_fail(AEG_ETIMEDOUT, "load %" PRIu64 " of %s still loading after %d ms; nothing released",
				       busy->id, busy->path, timeout_ms);
			break;
		}
	}
	if (err == 0 && release)
		err = release_owned(pf, owner, gidx, count);   /* unlocks */
	else
		pthread_mutex_unlock(&pf->lock);
	free(owner);
	free(gidx);
	return err;
}

AEG_EXPORT int aeg_prefetch_release_wait(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count,
					 int timeout_ms)
{
	return release_wait(pf, ids, count, timeout_ms, 1);
}

int aeg_prefetch_wait_settled(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count, int timeout_ms)
{
	return release_wait(pf, ids, count, timeout_ms, 0);
}

AEG_EXPORT int aeg_prefetch_release(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count)
{
	return aeg_prefetch_release_wait(pf, ids, count, 0);
}

AEG_EXPORT int aeg_prefetch_stats(aeg_prefetch_t *pf, struct aeg_prefetch_stats *st)
{
	if (pf == NULL || st == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_stats: NULL argument");
	memset(st, 0, sizeof(*st));
	pthread_mutex_lock(&pf->lock);
	for (struct aeg_load *l = pf->loads; l; l = l->next) {
		/* One released and closed, only unregistering its pieces, holds nothing. */
		if (!load_held(l))
			continue;
		st->loads++;
		st->loads_in_flight += l->in_flight != 0;
		for (uint32_t g = 0; g < l->ngroups; g++) {
			if (l->groups[g].released)
				continue;
			st->blocks++;
			st->block_bytes += l->groups[g].block.size;
			st->chunks += l->groups[g].nchunks;
		}
	}
	st->events = st->chunks;
	st->ring_in_use = pf->ring_in_use;
	st->registered_pieces = pf->registered;
	st->cache_entries = pf->cache_entries;
	st->cache_bytes = pf->cache_used;
	st->cache_hits = pf->hits;
	st->cache_misses = pf->misses;
	st->cache_evictions = pf->evictions;
	st->read_fallbacks = pf->fallbacks;
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

/* ------------------------------------------------------- load accessors */

AEG_EXPORT const struct aeg_chunk *aeg_load_chunks(const aeg_load_t *l, uint32_t *count)
{
	if (count)
		*count = l ? l->nchunks : 0;
	return l ? l->chunks : NULL;
}

AEG_EXPORT const struct aeg_tensor *aeg_load_tensors(const aeg_load_t *l, uint32_t *count)
{
	if (count)
		*count = l ? l->ntensors : 0;
	return l ? l->tensors : NULL;
}

AEG_EXPORT uint32_t aeg_load_metadata(const aeg_load_t *l, const char *const **keys,
				       const char *const **values)
{
	if (keys)
		*keys = l ? (const char *const *)l->hdr.meta_keys : NULL;
	if (values)
		*values = l ? (const char *const *)l->hdr.meta_values : NULL;
	return l ? (uint32_t)l->hdr.nmeta : 0;
}

AEG_EXPORT const struct aeg_slice *aeg_load_slice(const aeg_load_t *l)
{
	return l ? l->plan.spec : NULL;
}

AEG_EXPORT uint64_t aeg_load_id(const aeg_load_t *l)
{
	return l ? l->id : 0;
}

AEG_EXPORT int aeg_load_wait(aeg_load_t *l, int timeout_ms)
{
	struct aeg_prefetch *pf;
	struct timespec ts;
	int err;

	if (l == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_load_wait: NULL load");
	pf = l->pf;
	if (timeout_ms >= 0)
		aeg_deadline_after(&ts, timeout_ms);
	pthread_mutex_lock(&pf->lock);
	while (l->in_flight) {
		if (timeout_ms < 0) {
			pthread_cond_wait(&pf->done_cv, &pf->lock);
		} else if (pthread_cond_timedwait(&pf->done_cv, &pf->lock, &ts) == ETIMEDOUT) {
			pthread_mutex_unlock(&pf->lock);
			return aeg_fail(AEG_ETIMEDOUT, "%s: still loading after %d ms", l->path, timeout_ms);
		}
	}
	err = l->status;
	if (err)
		aeg_fail(err, "%s", l->detail);
	pthread_mutex_unlock(&pf->lock);
	return err;
}

AEG_EXPORT int aeg_load_wait_chunk(aeg_load_t *l, uint32_t index, int timeout_ms)
{
	struct aeg_prefetch *pf;
	aeg_event_t *ev;
	int err, state;

	if (l == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_load_wait_chunk: NULL load");
	if (index >= l->nchunks)
		return aeg_fail(AEG_EINVAL, "chunk %u: the load has %u chunks", index, l->nchunks);
	pf = l->pf;
	pthread_mutex_lock(&pf->lock);
	ev = l->rt[index].ev;
	state = l->rt[index].state;
	pthread_mutex_unlock(&pf->lock);
	if (state == CH_RELEASED)
		return aeg_fail(AEG_ENOENT, "chunk %u of %s was released", index, l->path);
	err = aeg_event_wait(ev, timeout_ms);
	if (err)
		return err;
	pthread_mutex_lock(&pf->lock);
	state = l->rt[index].state;
	if (state == CH_DONE || state == CH_PENDING) {
		/* The event follows every copy into the chunk; its last item's
		 * host function may just not have counted it yet. */
		err = 0;
	} else if (state == CH_RELEASED) {
		err = aeg_fail(AEG_ENOENT, "chunk %u of %s was released", index, l->path);
	} else {
		err = l->in_flight ? l->stop_err : l->status;
		if (err == 0 || err == AEG_EBUSY)
			err = AEG_EIO;
		aeg_fail(err, "chunk %u of %s not loaded: %s", index, l->path, l->detail);
	}
	pthread_mutex_unlock(&pf->lock);
	return err;
}

AEG_EXPORT int aeg_load_progress(aeg_load_t *l, struct aeg_load_progress *p)
{
	if (l == NULL || p == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_load_progress: NULL argument");
	pthread_mutex_lock(&l->pf->lock);
	p->total_bytes = l->total_bytes;
	p->done_bytes = l->done_bytes;
	p->chunks = l->nchunks;
	p->done_chunks = l->done_chunks;
	p->released_chunks = 0;
	for (uint32_t g = 0; g < l->ngroups; g++)
		if (l->groups[g].released)
			p->released_chunks += l->groups[g].nchunks;
	p->feed = mapped(l) && l->no_register ? AEG_FEED_READ : l->feed;
	p->status = l->status;
	p->start_ns = l->start_ns;
	p->first_chunk_ns = l->first_ns;
	p->end_ns = l->end_ns;
	pthread_mutex_unlock(&l->pf->lock);
	return 0;
}

AEG_EXPORT int aeg_load_cancel(aeg_load_t *l)
{
	char detail[128];

	if (l == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_load_cancel: NULL load");
	snprintf(detail, sizeof(detail), "load %" PRIu64 " cancelled", l->id);
	pthread_mutex_lock(&l->pf->lock);
	if (l->in_flight)
		prefetch_load_stop(l->pf, l, AEG_ECANCELED, detail);
	pthread_mutex_unlock(&l->pf->lock);
	return 0;
}

AEG_EXPORT int aeg_load_release(aeg_load_t *l)
{
	struct aeg_prefetch *pf;
	struct aeg_load **owner;
	uint32_t *gidx, n = 0;
	int err = 0;

	if (l == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_load_release: NULL load");
	pf = l->pf;
	owner = malloc((l->ngroups ? l->ngroups : 1) * sizeof(*owner));
	gidx = malloc((l->ngroups ? l->ngroups : 1) * sizeof(*gidx));
	if (owner == NULL || gidx == NULL) {
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		goto out;
	}
	pthread_mutex_lock(&pf->lock);
	if (l->in_flight)
		prefetch_load_stop(pf, l, AEG_ECANCELED, "load released while loading");
	while (l->in_flight)
		wait_done(pf, NULL);
	for (uint32_t g = 0; g < l->ngroups; g++) {
		if (!l->groups[g].released) {
			owner[n] = l;
			gidx[n++] = g;
		}
	}
	if (n > 0)
		err = release_owned(pf, owner, gidx, n);        /* unlocks */
	else
		pthread_mutex_unlock(&pf->lock);
out:
	free(owner);
	free(gidx);
	return err;
}

AEG_EXPORT void aeg_load_close(aeg_load_t *l)
{
	struct aeg_prefetch *pf;

	if (l == NULL)
		return;
	pf = l->pf;
	pthread_mutex_lock(&pf->lock);
	if (--l->handles == 0) {
		l->closed = 1;
		prefetch_load_maybe_free(pf, l);
	}
	pthread_mutex_unlock(&pf->lock);
}

AEG_EXPORT aeg_load_t *aeg_load_dup(aeg_load_t *l)
{
	if (l == NULL)
		return NULL;
	pthread_mutex_lock(&l->pf->lock);
	l->handles++;
	pthread_mutex_unlock(&l->pf->lock);
	return l;
}

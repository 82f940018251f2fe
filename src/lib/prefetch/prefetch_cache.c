/* The prefetch engine's host model cache: whole files in pool buffers, least recently used first out. */
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
#include "prefetch_engine.h"

static void cache_unlink(struct aeg_prefetch *pf, struct cache_entry *e)
{
	if (!e->linked)
		return;
	if (e->prev)
		e->prev->next = e->next;
	else
		pf->lru = e->next;
	if (e->next)
		e->next->prev = e->prev;
	e->prev = e->next = NULL;
	e->linked = 0;
	pf->cache_entries--;
}

void prefetch_cache_link(struct aeg_prefetch *pf, struct cache_entry *e)
{
	e->prev = NULL;
	e->next = pf->lru;
	if (pf->lru)
		pf->lru->prev = e;
	pf->lru = e;
	e->linked = 1;
	pf->cache_entries++;
}

/* Give an entry's buffers back; the caller has unlinked it and holds the lock. */
static void cache_free(struct aeg_prefetch *pf, struct cache_entry *e, uint32_t nbuf)
{
	for (uint32_t i = 0; i < nbuf; i++)
		aeg_pool_release(pf->pool, e->bufs[i]);
	pf->cache_used -= (uint64_t)e->nbuf * pf->buffer_bytes;
	free(e->bufs);
	free(e->path);
	free(e);
}

/* Evict the least recently used entry no load uses; 1 if one went. */
int prefetch_cache_evict_one(struct aeg_prefetch *pf)
{
	struct cache_entry *e = pf->lru, *victim = NULL;

	for (; e; e = e->next)
		if (e->refs == 0)
			victim = e;
	if (victim == NULL)
		return 0;
	aeg_debug("prefetch: cache evicts %s (%u buffers)", victim->path, victim->nbuf);
	cache_unlink(pf, victim);
	cache_free(pf, victim, victim->nbuf);
	pf->evictions++;
	return 1;
}

static int same_file(const struct cache_entry *e, const char *path, const struct stat *st)
{
	return e->dev == st->st_dev && e->ino == st->st_ino && e->size == st->st_size &&
	       e->mtime.tv_sec == st->st_mtim.tv_sec && e->mtime.tv_nsec == st->st_mtim.tv_nsec &&
	       strcmp(e->path, path) == 0;
}

/* A hit (referenced, moved to the front), or NULL; drops stale entries of @path. */
struct cache_entry *prefetch_cache_lookup(struct aeg_prefetch *pf, const char *path, const struct stat *st)
{
	struct cache_entry *e = pf->lru, *next;

	for (; e; e = next) {
		next = e->next;
		if (same_file(e, path, st)) {
			cache_unlink(pf, e);
			prefetch_cache_link(pf, e);
			e->refs++;
			return e;
		}
		if (strcmp(e->path, path) == 0 && e->refs == 0) {
			aeg_debug("prefetch: cache drops stale %s", e->path);
			cache_unlink(pf, e);
			cache_free(pf, e, e->nbuf);
			pf->evictions++;
		}
	}
	return NULL;
}

/*
 * An entry to fill with the whole file, its buffers taken now (evicting
 * older entries to stay in budget), or NULL when it does not fit: the load
 * then goes uncached.
 */
struct cache_entry *prefetch_cache_reserve(struct aeg_prefetch *pf, const char *path, const struct stat *st)
{
	uint64_t nbuf = ((uint64_t)st->st_size + pf->buffer_bytes - 1) / pf->buffer_bytes;
	uint64_t need = nbuf * pf->buffer_bytes;
	struct cache_entry *e;
	uint32_t got = 0;

	if (nbuf == 0 || need > pf->cfg.cache_bytes)
		return NULL;
	while (pf->cache_used + need > pf->cfg.cache_bytes)
		if (!prefetch_cache_evict_one(pf))
			return NULL;
	e = calloc(1, sizeof(*e));
	if (e == NULL)
		return NULL;
	e->bufs = calloc(nbuf, sizeof(*e->bufs));
	e->path = strdup(path);
	if (e->bufs == NULL || e->path == NULL)
		goto fail;
	e->nbuf = (uint32_t)nbuf;
	pf->cache_used += need;
	for (; got < nbuf; got++) {
		struct aeg_pool_buffer b;

		while (aeg_pool_acquire(pf->pool, 0, &b) != 0)
			if (!prefetch_cache_evict_one(pf))
				goto fail_bufs;
		e->bufs[got] = b.index;
	}
	e->dev = st->st_dev;
	e->ino = st->st_ino;
	e->size = st->st_size;
	e->mtime = st->st_mtim;
	e->refs = 1;
	return e;
fail_bufs:
	aeg_debug("prefetch: pool too busy to cache %s (%u of %" PRIu64 " buffers)", path, got, nbuf);
	cache_free(pf, e, got);
	return NULL;
fail:
	free(e->bufs);
	free(e->path);
	free(e);
	return NULL;
}

void prefetch_cache_unref(struct aeg_prefetch *pf, struct cache_entry *e)
{
	if (--e->refs == 0 && !e->linked)
		cache_free(pf, e, e->nbuf);
}

AEG_EXPORT int aeg_prefetch_cache_drop(aeg_prefetch_t *pf)
{
	int n = 0;

	if (pf == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_cache_drop: NULL engine");
	pthread_mutex_lock(&pf->lock);
	while (prefetch_cache_evict_one(pf))
		n++;
	pthread_mutex_unlock(&pf->lock);
	return n;
}

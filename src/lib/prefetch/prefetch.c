/* Prefetch engine: files to slab chunks through the page cache, preads or the host cache. */
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
#include "prefetch_internal.h"
#include "safetensors.h"
#include "slice_plan.h"

#define PAGE 4096u
#define OWN_POOL_BUFFER (16ull << 20)
#define POOL_WAIT_MS 50

enum chunk_state { CH_PENDING, CH_DONE, CH_FAILED, CH_RELEASED };

/* A slab block: one chunk of small tensors, or every chunk of one big tensor. */
struct group {
	struct aeg_block block;
	uint64_t file_begin;
	uint64_t bytes;
	uint32_t first_chunk;
	uint32_t nchunks;
	int released;
};

/*
 * A chunk's event is armed when the load is handed out and recorded on the
 * chunk's stream once the copies of every item touching it are queued
 * there, so no stream ever waits on work not queued yet (a synchronizing
 * CUDA call anywhere in the process would then hang the device).
 */
struct chunk_rt {
	aeg_event_t *ev;
	uint32_t pending;               /* items touching the chunk not yet copied */
	uint32_t unqueued;              /* items touching the chunk not yet queued */
	uint32_t group;
	int state;
	int recorded;
	uint64_t out;                   /* its first byte's offset: the file's, or a sliced load's packed one */
};

/*
 * The copies of a piece (or of one ring buffer of it) go to the streams of
 * the chunks they fill: a host function on each stream used, the last one
 * to run finishes the batch.
 */
struct batch;

struct part {
	struct batch *b;
	uint32_t stream;
};

struct batch {
	struct aeg_prefetch *pf;
	struct item *it;                /* NULL: a ring buffer of read_through_ring */
	int buf;                        /* that ring buffer */
	uint32_t left;                  /* parts not run, +1 while launching; pf->lock */
	struct part parts[];
};

/* A piece of the file a worker handles at once: one registration or one buffer. */
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22   /* Linux 5.14 */
#endif

/* Copied mmap pieces kept registered (all loads) before unregistering one at a time. */
#define DEFERRED_UNREGISTER_BYTES (32ull << 30)

struct item {
	struct aeg_load *load;
	uint32_t index;
	uint64_t begin, end;
	uint32_t first_chunk, last_chunk;       /* first > last: touches none */
	int buf;                                /* READ: pool buffer to give back */
	void *reg;                              /* MMAP: registered range to drop */
	uint64_t reg_bytes;
	struct item *next;                      /* on pf->retired or its load's unreg */
};

/* The host model cache: a whole file in pool buffers of buffer_bytes. */
struct cache_entry {
	char *path;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime;
	uint32_t nbuf;
	uint32_t *bufs;
	int refs;
	int linked;                     /* on the LRU list (filled) */
	struct cache_entry *prev, *next;
};

struct aeg_load {
	struct aeg_prefetch *pf;
	uint64_t id;
	char *path;
	int fd;
	int dfd;                        /* O_DIRECT descriptor, or -1 */
	struct stat st;
	void *map;
	size_t map_bytes;
	enum aeg_prefetch_feed feed;
	int priority;
	int no_register;

	uint64_t data_begin;
	uint32_t nchunks, ngroups, ntensors, nitems;
	struct aeg_chunk *chunks;
	struct chunk_rt *rt;
	struct group *groups;
	struct aeg_tensor *tensors;
	struct aeg_st_header hdr;
	struct slice_plan plan;         /* a sliced load's; plan.spec NULL otherwise */
	struct item *items;
	uint64_t item_base, item_bytes;
	struct cache_entry *entry;      /* hit or being filled */
	int filling;

	/* Under pf->lock. */
	uint32_t next_item, items_left, issuing;
	struct item *unreg;                     /* copied pieces still registered, unregistered at the end */
	int in_flight, finish_queued, stop_err, status;
	int cleaning;                           /* settled; host side not given back yet */
	char detail[512];
	uint64_t done_bytes, total_bytes;
	uint32_t done_chunks, recorded_chunks;
	uint64_t start_ns, first_ns, landed_ns, end_ns;
	int closed;                     /* every handle is closed */
	int handles;                    /* aeg_prefetch_file's and aeg_load_dup's, not closed yet */
	uint32_t live_groups;
	struct aeg_load *prev, *next;
	struct aeg_load *finish_next;
};

struct aeg_prefetch {
	aeg_device_t *dev;
	int gpu;
	aeg_slab_t *slab;
	aeg_pool_t *pool;               /* NULL until aeg_prefetch_set_pool, with pool_later_buffer_bytes */
	int own_pool;
	int pool_err;                   /* no pool will come: why */
	char pool_detail[256];
	uint64_t buffer_bytes;
	struct aeg_prefetch_config cfg;
	char pci[AEG_PCI_BUS_ID_LEN];

	pthread_mutex_t lock;
	pthread_cond_t work_cv;         /* workers: items, retirements, ring slots */
	pthread_cond_t done_cv;         /* waiters: loads ending */
	pthread_t *workers;
	int nworkers;
	int quit;
	aeg_stream_t **streams;
	int nstreams;

	struct aeg_load *loads;
	struct aeg_load *finishing;
	struct item *retired;
	uint64_t next_id;
	uint32_t ring_in_use;
	uint32_t registered;
	uint32_t registering;                   /* MIXED: workers in a registration now */
	uint64_t deferred_bytes;                /* registered bytes of copied pieces, all loads */

	struct cache_entry *lru;        /* most recent first */
	uint64_t cache_used;            /* bytes of linked and filling entries */
	uint64_t cache_entries;
	uint64_t hits, misses, evictions, fallbacks;

	aeg_prefetch_hook_fn hook;
	void *hook_arg;
};

struct worker_arg {
	struct aeg_prefetch *pf;
	int index;
};

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
	cfg->ring_buffers = 0;          /* 2 * threads */
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

/* ------------------------------------------------------------ the cache */

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

static void cache_link_front(struct aeg_prefetch *pf, struct cache_entry *e)
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
static int cache_evict_one(struct aeg_prefetch *pf)
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
static struct cache_entry *cache_lookup(struct aeg_prefetch *pf, const char *path,
					const struct stat *st)
{
	struct cache_entry *e = pf->lru, *next;

	for (; e; e = next) {
		next = e->next;
		if (same_file(e, path, st)) {
			cache_unlink(pf, e);
			cache_link_front(pf, e);
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
static struct cache_entry *cache_reserve(struct aeg_prefetch *pf, const char *path,
					 const struct stat *st)
{
	uint64_t nbuf = ((uint64_t)st->st_size + pf->buffer_bytes - 1) / pf->buffer_bytes;
	uint64_t need = nbuf * pf->buffer_bytes;
	struct cache_entry *e;
	uint32_t got = 0;

	if (nbuf == 0 || need > pf->cfg.cache_bytes)
		return NULL;
	while (pf->cache_used + need > pf->cfg.cache_bytes)
		if (!cache_evict_one(pf))
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
			if (!cache_evict_one(pf))
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

static void cache_unref(struct aeg_prefetch *pf, struct cache_entry *e)
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
	while (cache_evict_one(pf))
		n++;
	pthread_mutex_unlock(&pf->lock);
	return n;
}

/* ----------------------------------------------------- load bookkeeping */

static void queue_finish_if_done(struct aeg_prefetch *pf, struct aeg_load *l)
{
	if (l->items_left == 0 && l->issuing == 0 && !l->finish_queued) {
		l->finish_queued = 1;
		l->finish_next = pf->finishing;
		pf->finishing = l;
		pthread_cond_broadcast(&pf->work_cv);
	}
}

/* Stop issuing @l's items; the first error wins. Lock held. */
static void load_stop(struct aeg_prefetch *pf, struct aeg_load *l, int err, const char *detail)
{
	if (l->stop_err == 0) {
		l->stop_err = err;
		snprintf(l->detail, sizeof(l->detail), "%s", detail);
	}
	l->items_left -= l->nitems - l->next_item;
	l->next_item = l->nitems;
	queue_finish_if_done(pf, l);
	pthread_cond_broadcast(&pf->work_cv);
}

static void load_free(struct aeg_load *l)
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
static void load_maybe_free(struct aeg_prefetch *pf, struct aeg_load *l)
{
	if (load_held(l) || l->cleaning)
		return;
	if (l->prev)
		l->prev->next = l->next;
	else
		pf->loads = l->next;
	if (l->next)
		l->next->prev = l->prev;
	load_free(l);
}

/* ------------------------------------------------------------ the feeds */

static uint32_t stream_of(const struct aeg_prefetch *pf, uint32_t chunk)
{
	return chunk % (uint32_t)pf->nstreams;
}

/* Every copy of @it on stream @stream has landed: count the chunks it fills. Lock held. */
static void chunks_landed(struct aeg_prefetch *pf, struct item *it, uint32_t stream)
{
	struct aeg_load *l = it->load;

	for (uint32_t c = it->first_chunk; c <= it->last_chunk && c < l->nchunks; c++) {
		struct chunk_rt *rt = &l->rt[c];

		if (stream_of(pf, c) != stream)
			continue;
		if (--rt->pending == 0 && rt->state == CH_PENDING) {
			rt->state = CH_DONE;
			l->done_chunks++;
			l->done_bytes += l->chunks[c].size;
			if (c == 0)
				l->first_ns = aeg_now_ns();
			if (l->done_chunks == l->nchunks)
				l->landed_ns = aeg_now_ns();
		}
	}
}

/* Every copy of @it has landed: give back what it holds. Lock held. */
static void item_done(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;

	if (it->buf >= 0) {
		aeg_pool_release(pf->pool, (uint32_t)it->buf);
		it->buf = -1;
		pf->ring_in_use--;
	}
	if (it->reg) {
		/* A worker unregisters it (never a stream's host function: that is
		 * a CUDA call) and only then counts the item out, so the load
		 * cannot finish (and unmap) under the unregistration. */
		it->next = pf->retired;
		pf->retired = it;
	} else {
		l->items_left--;
		queue_finish_if_done(pf, l);
	}
}

static void batch_done(struct aeg_prefetch *pf, struct batch *b)
{
	if (b->it) {
		item_done(pf, b->it);
	} else {
		aeg_pool_release(pf->pool, (uint32_t)b->buf);
		pf->ring_in_use--;
	}
	free(b);
	pthread_cond_broadcast(&pf->work_cv);
}

/* Stream host function: no CUDA call, no blocking beyond the engine lock. */
static void part_done(void *arg)
{
	struct part *p = arg;
	struct batch *b = p->b;
	struct aeg_prefetch *pf = b->pf;

	pthread_mutex_lock(&pf->lock);
	if (b->it)
		chunks_landed(pf, b->it, p->stream);
	if (--b->left == 0)
		batch_done(pf, b);
	pthread_mutex_unlock(&pf->lock);
}

static int popcount64(uint64_t v)
{
	return __builtin_popcountll(v);
}

static struct batch *batch_new(struct aeg_prefetch *pf, struct item *it, int buf, uint64_t mask)
{
	struct batch *b = calloc(1, sizeof(*b) + (size_t)popcount64(mask) * sizeof(struct part));

	if (b == NULL) {
		aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		return NULL;
	}
	b->pf = pf;
	b->it = it;
	b->buf = buf;
	return b;
}

/*
 * Queue a part of @b on every stream of @mask after what is queued there.
 * On failure the caller syncs the streams (the parts queued run, the bias
 * keeps @b alive) and frees @b; on success @b frees itself.
 */
static int batch_launch(struct aeg_prefetch *pf, struct batch *b, uint64_t mask)
{
	uint32_t k = 0;
	int err;

	b->left = (uint32_t)popcount64(mask) + 1;
	for (uint32_t s = 0; s < (uint32_t)pf->nstreams; s++) {
		if (!(mask & (1ull << s)))
			continue;
		b->parts[k].b = b;
		b->parts[k].stream = s;
		err = aeg_stream_launch_host_fn(pf->streams[s], part_done, &b->parts[k]);
		if (err)
			return err;
		k++;
	}
	pthread_mutex_lock(&pf->lock);
	if (--b->left == 0)
		batch_done(pf, b);
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

/* Wait for every stream, so no host function still refers to what an error path frees. */
static void sync_streams(struct aeg_prefetch *pf)
{
	for (int i = 0; i < pf->nstreams; i++)
		aeg_stream_sync(pf->streams[i]);
}

/*
 * Where file byte @at lands: its offset, or in a sliced load the packed
 * offset of the first byte of a part at or after it. Chunks are placed by
 * these offsets, in the same order as the file.
 */
static uint64_t out_of(const struct aeg_load *l, uint64_t at)
{
	return l->plan.spec ? slice_out_of(&l->plan, at) : at;
}

/* First chunk whose range ends after offset @off (out_of's; chunks tile the data in order). */
static uint32_t chunk_at(const struct aeg_load *l, uint64_t off)
{
	uint32_t lo = 0, hi = l->nchunks;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;

		if (l->rt[mid].out + l->chunks[mid].size <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* The streams of the chunks file bytes [b, e) fall in. */
static uint64_t streams_of(const struct aeg_prefetch *pf, const struct aeg_load *l, uint64_t b,
			   uint64_t e)
{
	uint64_t mask = 0, ob = out_of(l, b), oe = out_of(l, e);

	for (uint32_t c = chunk_at(l, ob); c < l->nchunks && l->rt[c].out < oe; c++)
		mask |= 1ull << stream_of(pf, c);
	return mask;
}

/*
 * Queue the copies of file bytes [b, e) between @host (holding them from
 * byte @b) and the chunks on the GPU, each on its chunk's stream: to the GPU,
 * or @back from it (how a registered piece fills its cache buffer, after
 * the copy that put the bytes there). A sliced load gathers its parts'
 * bytes (slice_copy; never @back: it has no cache).
 */
static int copy_chunks(struct aeg_prefetch *pf, struct aeg_load *l, uint64_t b, uint64_t e,
		       char *host, int back)
{
	uint64_t ob = out_of(l, b), oe = out_of(l, e);

	for (uint32_t c = chunk_at(l, ob); c < l->nchunks && l->rt[c].out < oe; c++) {
		const struct aeg_chunk *ch = &l->chunks[c];
		uint64_t at = l->rt[c].out;
		uint64_t sb = ob > at ? ob : at;
		uint64_t se = oe < at + ch->size ? oe : at + ch->size;
		char *gpu = (char *)ch->device_ptr + (sb - at);
		aeg_stream_t *st = pf->streams[stream_of(pf, c)];
		int err;

		if (sb >= se)
			continue;
		if (l->plan.spec)
			err = slice_copy(st, &l->plan, sb, se, gpu, host, b);
		else
			err = aeg_memcpy_async(st, back ? host + (sb - b) : gpu, back ? gpu : host + (sb - b), se - sb);
		if (err) {
			aeg_error_prefix("%s: copying bytes %" PRIu64 "..%" PRIu64 "%s", l->path, sb, se,
					 back ? " back for the host cache" : l->plan.spec ? " of its slice" : "");
			return err;
		}
	}
	return 0;
}

static int pread_full(struct aeg_load *l, int fd, void *buf, uint64_t bytes, uint64_t off)
{
	/* O_DIRECT wants whole blocks; the buffer always has room for the rounding. */
	uint64_t room = fd == l->dfd ? aeg_round_up(bytes, PAGE) : bytes;
	ssize_t r = aeg_pread_full(fd, buf, bytes, room, off);

	if (r < 0)
		return aeg_fail(AEG_EIO, "%s: reading %" PRIu64 " bytes at %" PRIu64 ": %s",
				l->path, bytes, off, strerror((int)-r));
	if ((uint64_t)r < bytes)
		return aeg_fail(AEG_ESTALE,
				"%s: file ends at %" PRIu64 " bytes, it had %jd when the load began (it changed while loading)",
				l->path, off + (uint64_t)r, (intmax_t)l->st.st_size);
	return 0;
}

/* The file is mapped and its pieces registered (MIXED: some of them). */
static int mapped(const struct aeg_load *l)
{
	return l->feed == AEG_FEED_MMAP || l->feed == AEG_FEED_MIXED;
}

/*
 * MADV_POPULATE_READ failed where touching the pages would raise SIGBUS:
 * the file shrank under its mapping, or its pages could not be read. Say
 * which, before any copy touches them.
 */
static int mapped_fault(struct aeg_load *l, const struct item *it, int e)
{
	struct stat now;

	if (fstat(l->fd, &now) == 0 && now.st_size < l->st.st_size)
		return aeg_fail(AEG_ESTALE,
				"%s: file ends at %jd bytes, it had %jd when the load began (it changed while loading)",
				l->path, (intmax_t)now.st_size, (intmax_t)l->st.st_size);
	return aeg_fail(AEG_EIO, "%s: reading bytes %" PRIu64 "..%" PRIu64 " through its mapping: %s",
			l->path, it->begin, it->end, strerror(e == EFAULT ? EIO : e));
}

static int load_stopped(struct aeg_load *l)
{
	return __atomic_load_n(&l->stop_err, __ATOMIC_RELAXED) != 0;
}

/*
 * A pool buffer for a READ piece, in a ring slot (taken here unless the
 * caller has one), evicting cache entries when the pool is dry. On failure
 * the slot is given back.
 */
static int ring_get(struct aeg_prefetch *pf, struct aeg_load *l, int have_slot,
		    struct aeg_pool_buffer *b)
{
	int err;

	pthread_mutex_lock(&pf->lock);
	if (!have_slot) {
		while (pf->ring_in_use >= (uint32_t)pf->cfg.ring_buffers && !l->stop_err)
			pthread_cond_wait(&pf->work_cv, &pf->lock);
		if (l->stop_err) {
			pthread_mutex_unlock(&pf->lock);
			return aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path);
		}
		pf->ring_in_use++;
	}
	/* A pool given later (the job's, still being made): wait for it. */
	while (pf->pool == NULL && pf->pool_err == 0 && !l->stop_err)
		pthread_cond_wait(&pf->work_cv, &pf->lock);
	if (pf->pool == NULL) {
		err = l->stop_err ? aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path) :
		      aeg_fail(pf->pool_err, "%s: no pinned pool to read it through: %s", l->path, pf->pool_detail);
		pf->ring_in_use--;
		pthread_cond_broadcast(&pf->work_cv);
		pthread_mutex_unlock(&pf->lock);
		return err;
	}
	pthread_mutex_unlock(&pf->lock);
	for (;;) {
		int evicted;

		err = aeg_pool_acquire(pf->pool, 0, b);
		if (err != AEG_ETIMEDOUT)
			break;
		pthread_mutex_lock(&pf->lock);
		evicted = cache_evict_one(pf);
		pthread_mutex_unlock(&pf->lock);
		if (evicted)
			continue;
		err = aeg_pool_acquire(pf->pool, POOL_WAIT_MS, b);
		if (err != AEG_ETIMEDOUT)
			break;
		if (load_stopped(l)) {
			err = aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path);
			break;
		}
	}
	if (err == 0)
		return 0;
	pthread_mutex_lock(&pf->lock);
	pf->ring_in_use--;
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	return err;
}

/* Wait for what is queued, then give back what an unfinished item holds. */
static int item_abort(struct aeg_prefetch *pf, struct item *it, int err)
{
	sync_streams(pf);
	pthread_mutex_lock(&pf->lock);
	if (it->buf >= 0) {
		aeg_pool_release(pf->pool, (uint32_t)it->buf);
		it->buf = -1;
		pf->ring_in_use--;
	}
	pthread_mutex_unlock(&pf->lock);
	if (it->reg) {
		aeg_host_unregister(pf->dev, it->reg);
		it->reg = NULL;
		pthread_mutex_lock(&pf->lock);
		pf->registered--;
		pthread_mutex_unlock(&pf->lock);
	}
	return err;
}

/* READ into pool buffers of the ring, a buffer per sub-range, for an MMAP item whose registration was refused. */
static int read_through_ring(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;

	for (uint64_t b = it->begin; b < it->end; b += pf->buffer_bytes) {
		uint64_t e = b + pf->buffer_bytes < it->end ? b + pf->buffer_bytes : it->end;
		uint64_t mask = streams_of(pf, l, b, e);
		struct aeg_pool_buffer buf;
		struct batch *sb;
		int err;

		err = ring_get(pf, l, 0, &buf);
		if (err)
			return err;
		sb = batch_new(pf, NULL, (int)buf.index, mask);
		if (sb == NULL) {
			err = AEG_ENOMEM;
			goto fail;
		}
		err = pread_full(l, l->dfd >= 0 ? l->dfd : l->fd, buf.ptr, e - b, b);
		if (err == 0)
			err = copy_chunks(pf, l, b, e, buf.ptr, 0);
		if (err == 0)
			err = batch_launch(pf, sb, mask);
		if (err == 0)
			continue;
fail:
		sync_streams(pf);
		free(sb);
		pthread_mutex_lock(&pf->lock);
		aeg_pool_release(pf->pool, buf.index);
		pf->ring_in_use--;
		pthread_cond_broadcast(&pf->work_cv);
		pthread_mutex_unlock(&pf->lock);
		return err;
	}
	return 0;
}

/*
 * @it's copies are queued: record the events of the chunks whose last item
 * it was, on the chunk's stream after the copies of every item. Before the
 * item's host functions, so a load ends only once its events completed.
 */
static int record_chunks(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;

	for (uint32_t c = it->first_chunk; c <= it->last_chunk; c++) {
		struct chunk_rt *rt = &l->rt[c];
		int last, err;

		pthread_mutex_lock(&pf->lock);
		last = --rt->unqueued == 0;
		pthread_mutex_unlock(&pf->lock);
		if (!last)
			continue;
		/* Outside the lock: a host function waiting for it would keep the
		 * device busy under a synchronizing call this record waits behind. */
		err = aeg_event_record(rt->ev, pf->streams[stream_of(pf, c)]);
		if (err) {
			aeg_error_prefix("%s: recording the event of chunk %u", l->path, c);
			return err;
		}
		pthread_mutex_lock(&pf->lock);
		rt->recorded = 1;
		l->recorded_chunks++;
		pthread_mutex_unlock(&pf->lock);
	}
	return 0;
}

/*
 * May this worker register @l's piece? Always for MMAP. For MIXED only while
 * fewer than mmap_threads workers register: registrations serialize in the
 * driver, so more would wait there while they could be reading instead.
 */
static int lane_take(struct aeg_prefetch *pf, struct aeg_load *l)
{
	int ok = 1;

	if (__atomic_load_n(&l->no_register, __ATOMIC_RELAXED))
		return 0;
	if (l->feed != AEG_FEED_MIXED)
		return 1;
	pthread_mutex_lock(&pf->lock);
	if (pf->registering < (uint32_t)pf->cfg.mmap_threads)
		pf->registering++;
	else
		ok = 0;
	pthread_mutex_unlock(&pf->lock);
	return ok;
}

/* A mapped piece that will not stay registered gives back the slot pick() took for it. */
static void slot_give(struct aeg_prefetch *pf)
{
	pthread_mutex_lock(&pf->lock);
	pf->registered--;
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
}

static void lane_give(struct aeg_prefetch *pf, struct aeg_load *l)
{
	if (l->feed != AEG_FEED_MIXED)
		return;
	pthread_mutex_lock(&pf->lock);
	pf->registering--;
	pthread_mutex_unlock(&pf->lock);
}

/*
 * Run one item: get its bytes into host memory the GPU can read, queue the
 * copies into the chunks it touches, then item_done. Returns 0 once
 * item_done is queued; otherwise everything the item took is given back.
 */
static int run_item(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;
	uint64_t len = it->end - it->begin;
	uint64_t mask = 0;
	struct batch *ib;
	const char *src;
	int err;

	for (uint32_t c = it->first_chunk; c <= it->last_chunk; c++)
		mask |= 1ull << stream_of(pf, c);

	switch (l->feed) {
	case AEG_FEED_CACHE:
		src = aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]);
		break;
	case AEG_FEED_READ:
		if (l->filling) {
			src = aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]);
		} else {
			struct aeg_pool_buffer b;

			err = ring_get(pf, l, 1, &b);
			if (err)
				return err;
			it->buf = (int)b.index;
			src = b.ptr;
		}
		err = pread_full(l, l->dfd >= 0 ? l->dfd : l->fd, (void *)src, len, it->begin);
		if (err)
			return item_abort(pf, it, err);
		break;
	case AEG_FEED_MMAP:
	case AEG_FEED_MIXED:
	default:
		src = (const char *)l->map + it->begin;
		/*
		 * A cache fill takes the bytes of a registered piece back from the
		 * GPU into its cache buffer (the copy engines' other direction),
		 * so the piece must lie in the chunks: not in a header.
		 */
		if ((!l->filling || it->begin >= l->data_begin) && lane_take(pf, l)) {
			uint64_t reg_bytes = aeg_round_up(len, PAGE);

			/*
			 * Registration faults the pages in under the driver's
			 * context lock, one thread at a time; mapping them here
			 * first lets the workers do that part in parallel.
			 */
			if (madvise((void *)src, reg_bytes, MADV_POPULATE_READ) != 0 &&
			    (errno == EFAULT || errno == EIO || errno == EHWPOISON)) {
				err = mapped_fault(l, it, errno);
				lane_give(pf, l);
				slot_give(pf);
				return err;
			}
			err = aeg_host_register(pf->dev, (void *)src, reg_bytes,
						AEG_HOST_REGISTER_READONLY);
			lane_give(pf, l);
			if (err == 0) {
				it->reg = (void *)src;
				it->reg_bytes = reg_bytes;
				break;
			}
			if (!__atomic_exchange_n(&l->no_register, 1, __ATOMIC_RELAXED)) {
				aeg_warn("prefetch: %s: registering its pages refused (%s: %s); reading it through the pinned pool instead",
					 l->path, aeg_errname(err), aeg_error_detail());
				pthread_mutex_lock(&pf->lock);
				pf->fallbacks++;
				pthread_mutex_unlock(&pf->lock);
			}
		}
		slot_give(pf);
		if (l->filling) {
			/* As the read feed fills the cache: into the piece's buffer. */
			src = aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]);
			err = pread_full(l, l->fd, (void *)src, len, it->begin);
			if (err)
				return item_abort(pf, it, err);
			break;
		}
		err = read_through_ring(pf, it);
		if (err)
			return err;
		ib = batch_new(pf, it, -1, mask);
		if (ib == NULL)
			return AEG_ENOMEM;
		err = record_chunks(pf, it);
		if (err == 0)
			err = batch_launch(pf, ib, mask);
		if (err) {
			sync_streams(pf);
			free(ib);
		}
		return err;
	}

	ib = batch_new(pf, it, -1, mask);
	if (ib == NULL)
		return item_abort(pf, it, AEG_ENOMEM);
	err = copy_chunks(pf, l, it->begin, it->end, (char *)src, 0);
	if (err == 0)
		err = record_chunks(pf, it);
	if (err == 0 && l->filling && it->reg)
		err = copy_chunks(pf, l, it->begin, it->end,
				  aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]), 1);
	if (err == 0)
		err = batch_launch(pf, ib, mask);
	if (err) {
		item_abort(pf, it, err);
		free(ib);
		return err;
	}
	return 0;
}

/* ------------------------------------------------------------- workers */

/* The next item of the highest-priority load whose feed has room. Lock held. */
static struct aeg_load *pick(struct aeg_prefetch *pf)
{
	struct aeg_load *best = NULL;
	uint32_t reg_limit = 2 * (uint32_t)pf->nworkers;

	for (struct aeg_load *l = pf->loads; l; l = l->next) {
		if (!l->in_flight || l->next_item >= l->nitems)
			continue;
		if (l->feed == AEG_FEED_READ && !l->filling &&
		    pf->ring_in_use >= (uint32_t)pf->cfg.ring_buffers)
			continue;
		if (mapped(l) && pf->registered >= reg_limit)
			continue;
		if (best == NULL || l->priority > best->priority ||
		    (l->priority == best->priority && l->id < best->id))
			best = l;
	}
	return best;
}

static void finish_load(struct aeg_prefetch *pf, struct aeg_load *l);

static void *worker(void *p)
{
	struct worker_arg *wa = p;
	struct aeg_prefetch *pf = wa->pf;

	if (pf->cfg.topo && pf->pci[0]) {
		int err = aeg_topo_bind_thread(pf->cfg.topo, pf->pci);

		if (err)
			aeg_debug("prefetch: worker %d not bound near %s: %s", wa->index, pf->pci,
				  aeg_error_detail());
	}
	free(wa);

	pthread_mutex_lock(&pf->lock);
	for (;;) {
		struct aeg_load *l;
		struct item *it;
		aeg_prefetch_hook_fn hook;
		void *hook_arg;
		int err;

		if (pf->retired) {
			/*
			 * cudaHostUnregister waits for the whole device to go idle,
			 * so unregistering piece by piece would drain the copy
			 * pipeline each time: copied pieces stay registered until
			 * their load finishes, up to DEFERRED_UNREGISTER_BYTES.
			 */
			it = pf->retired;
			pf->retired = it->next;
			if (pf->deferred_bytes + it->reg_bytes <= DEFERRED_UNREGISTER_BYTES) {
				pf->deferred_bytes += it->reg_bytes;
				it->next = it->load->unreg;
				it->load->unreg = it;
			} else {
				pthread_mutex_unlock(&pf->lock);
				aeg_host_unregister(pf->dev, it->reg);
				pthread_mutex_lock(&pf->lock);
				it->reg = NULL;
			}
			pf->registered--;
			it->load->items_left--;
			queue_finish_if_done(pf, it->load);
			pthread_cond_broadcast(&pf->work_cv);
			continue;
		}
		if (pf->finishing) {
			l = pf->finishing;
			pf->finishing = l->finish_next;
			pthread_mutex_unlock(&pf->lock);
			finish_load(pf, l);
			pthread_mutex_lock(&pf->lock);
			continue;
		}
		if (pf->quit)
			break;
		l = pick(pf);
		if (l == NULL) {
			pthread_cond_wait(&pf->work_cv, &pf->lock);
			continue;
		}
		it = &l->items[l->next_item++];
		l->issuing++;
		if (l->feed == AEG_FEED_READ && !l->filling)
			pf->ring_in_use++;
		if (mapped(l))
			pf->registered++;
		hook = pf->hook;
		hook_arg = pf->hook_arg;
		pthread_mutex_unlock(&pf->lock);

		err = hook ? hook(hook_arg, l->id, it->index) : 0;
		if (err)
			aeg_fail(err, "%s: piece %u failed (injected)", l->path, it->index);
		pthread_mutex_lock(&pf->lock);
		/* A load stopped (cancelled) while this piece was picked queues nothing more. */
		if (err == 0 && l->stop_err != 0)
			err = l->stop_err;
		if (err) {
			if (l->feed == AEG_FEED_READ && !l->filling)
				pf->ring_in_use--;
			if (mapped(l))
				pf->registered--;
		}
		pthread_mutex_unlock(&pf->lock);
		if (err == 0)
			err = run_item(pf, it);

		pthread_mutex_lock(&pf->lock);
		l->issuing--;
		if (err) {
			l->items_left--;
			load_stop(pf, l, err, aeg_error_detail());
		}
		queue_finish_if_done(pf, l);
	}
	pthread_mutex_unlock(&pf->lock);
	return NULL;
}

static int file_changed(struct aeg_load *l)
{
	struct stat now;

	if (fstat(l->fd, &now) != 0)
		return aeg_fail(AEG_EIO, "%s: fstat: %s", l->path, strerror(errno));
	if (now.st_size != l->st.st_size || now.st_mtim.tv_sec != l->st.st_mtim.tv_sec ||
	    now.st_mtim.tv_nsec != l->st.st_mtim.tv_nsec)
		return aeg_fail(AEG_ESTALE,
				"%s: changed while loading (size %jd -> %jd, mtime %jd.%09ld -> %jd.%09ld); load it again",
				l->path, (intmax_t)l->st.st_size, (intmax_t)now.st_size,
				(intmax_t)l->st.st_mtim.tv_sec, l->st.st_mtim.tv_nsec,
				(intmax_t)now.st_mtim.tv_sec, now.st_mtim.tv_nsec);
	return 0;
}

/*
 * Fail the chunks not loaded (with @all, every chunk), those whose event
 * was never recorded included: their waiters would wait forever. Lock held;
 * nothing is issuing, so no record races this.
 */
static void fail_chunks(struct aeg_load *l, int err, int all)
{
	for (uint32_t c = 0; c < l->nchunks; c++) {
		struct chunk_rt *rt = &l->rt[c];

		if (rt->state == CH_PENDING || !rt->recorded || (all && rt->state == CH_DONE)) {
			if (rt->state == CH_DONE) {
				l->done_chunks--;
				l->done_bytes -= l->chunks[c].size;
			}
			rt->state = CH_FAILED;
			aeg_event_fail(rt->ev, err);
		}
	}
}

/*
 * Every piece of @l is done: settle the load (its status, the chunks of a
 * failed load, the cache entry it filled), wake its waiters, then give back
 * what the host side still holds. Unregistering is left until after the
 * wake-up: it takes about 10 ms per GiB, and the bytes are on the GPU.
 */
static void finish_load(struct aeg_prefetch *pf, struct aeg_load *l)
{
	char detail[sizeof(l->detail)];
	uint32_t done, recorded, unreg_pieces = 0;
	uint64_t unreg_bytes = 0, t0;
	struct item *unreg;
	int err;

	pthread_mutex_lock(&pf->lock);
	err = l->stop_err;
	done = l->done_chunks;
	recorded = l->recorded_chunks;
	snprintf(detail, sizeof(detail), "%s", l->detail);
	unreg = l->unreg;
	l->unreg = NULL;
	pthread_mutex_unlock(&pf->lock);

	if (err == 0 && l->feed != AEG_FEED_CACHE) {
		err = file_changed(l);
		if (err)
			snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
	}
	if (err == 0 && (done != l->nchunks || recorded != l->nchunks)) {
		err = aeg_fail(AEG_EIO, "%s: %u of %u chunks loaded, %u recorded", l->path, done,
			       l->nchunks, recorded);
		snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
	}

	/* The mapping holds the file on its own; the caller may count its fds. */
	if (l->dfd >= 0)
		close(l->dfd);
	l->dfd = -1;
	close(l->fd);
	l->fd = -1;

	pthread_mutex_lock(&pf->lock);
	if (err)
		fail_chunks(l, err, err == AEG_ESTALE);
	if (l->entry) {
		if (l->filling && err == 0) {
			l->entry->refs--;
			cache_link_front(pf, l->entry);
		} else {
			cache_unref(pf, l->entry);
		}
		l->entry = NULL;
	}
	l->status = err;
	if (err)
		snprintf(l->detail, sizeof(l->detail), "%s", detail);
	l->end_ns = aeg_now_ns();
	l->in_flight = 0;
	l->cleaning = 1;
	pthread_cond_broadcast(&pf->done_cv);
	pthread_mutex_unlock(&pf->lock);
	if (err)
		aeg_info("prefetch: load %" PRIu64 " of %s failed: %s", l->id, l->path, detail);
	else if (l->landed_ns)
		aeg_debug("prefetch: load %" PRIu64 ": first chunk after %.1f ms, all chunks after %.1f ms",
			  l->id, (double)(l->first_ns - l->start_ns) / 1e6,
			  (double)(l->landed_ns - l->start_ns) / 1e6);

	/* Every copy of this load has run (item_done saw each piece). */
	t0 = aeg_now_ns();
	for (struct item *it = unreg; it; it = it->next) {
		aeg_host_unregister(pf->dev, it->reg);
		it->reg = NULL;
		unreg_bytes += it->reg_bytes;
		unreg_pieces++;
	}
	if (unreg_pieces)
		aeg_debug("prefetch: load %" PRIu64 ": %u pieces (%" PRIu64 " MiB) unregistered in %.1f ms",
			  l->id, unreg_pieces, unreg_bytes >> 20, (double)(aeg_now_ns() - t0) / 1e6);
	if (l->map)
		munmap(l->map, l->map_bytes);
	l->map = NULL;

	pthread_mutex_lock(&pf->lock);
	pf->deferred_bytes -= unreg_bytes;
	l->cleaning = 0;
	pthread_cond_broadcast(&pf->done_cv);
	load_maybe_free(pf, l);
	pthread_mutex_unlock(&pf->lock);
}

/* -------------------------------------------------------------- engine */

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
	if (pf->cfg.ring_buffers == 0)
		pf->cfg.ring_buffers = 2 * pf->cfg.threads;
	if (pf->cfg.threads < 1 || pf->cfg.threads > 256)
		err = aeg_fail(AEG_EINVAL, "prefetch threads %d: must be 1..256", pf->cfg.threads);
	else if (pf->cfg.streams < 1 || pf->cfg.streams > 64)
		err = aeg_fail(AEG_EINVAL, "prefetch streams %d: must be 1..64", pf->cfg.streams);
	else if (pf->cfg.piece_bytes == 0 || pf->cfg.piece_bytes % PAGE)
		err = aeg_fail(AEG_EINVAL, "prefetch piece size %" PRIu64 ": must be a non-zero multiple of 4096",
			       pf->cfg.piece_bytes);
	else if (pf->cfg.mmap_threads < 1 || pf->cfg.mmap_threads > 256)
		err = aeg_fail(AEG_EINVAL, "prefetch mmap threads %d: must be 1..256", pf->cfg.mmap_threads);
	else if (pf->cfg.ring_buffers < 1 || pf->cfg.ring_buffers > 4096)
		err = aeg_fail(AEG_EINVAL, "prefetch ring of %d buffers: must be 1..4096",
			       pf->cfg.ring_buffers);
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
	pthread_cond_init(&pf->done_cv, NULL);

	if (pool == NULL && pf->cfg.pool_later_buffer_bytes) {
		/* Its pool comes later; the cache with it. */
		pf->buffer_bytes = pf->cfg.pool_later_buffer_bytes;
		pf->cfg.cache_bytes = 0;
	} else {
		if (pool == NULL) {
			err = aeg_pool_create(pf->dev, pf->gpu, OWN_POOL_BUFFER,
					      OWN_POOL_BUFFER * (uint64_t)pf->cfg.ring_buffers, &pool);
			if (err)
				goto fail;
			pf->own_pool = 1;
			pf->cfg.cache_bytes = 0;
		}
		pf->pool = pool;
		err = aeg_pool_stats(pool, &ps);
		if (err)
			goto fail;
		pf->buffer_bytes = ps.buffer_bytes;
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
		rc = pthread_create(&pf->workers[pf->nworkers], NULL, worker, wa);
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
			load_stop(pf, l, AEG_ECANCELED, "load cancelled: every chunk is being released");
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
		pf->pool = pool;
		pf->cfg.cache_bytes = cache_bytes;
	} else {
		pf->pool_err = err < 0 ? err : AEG_ENOMEM;
		snprintf(pf->pool_detail, sizeof(pf->pool_detail), "%s", aeg_error_detail());
	}
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
		load_maybe_free(pf, l);
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
		load_maybe_free(pf, pf->loads);
	}
	while (cache_evict_one(pf))
		;
	pf->quit = 1;
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	for (int i = 0; i < pf->nworkers; i++)
		pthread_join(pf->workers[i], NULL);
	for (int i = 0; i < pf->nstreams; i++)
		aeg_stream_destroy(pf->streams[i]);
	if (pf->own_pool)
		aeg_pool_destroy(pf->pool);
	free(pf->streams);
	free(pf->workers);
	pthread_cond_destroy(&pf->done_cv);
	pthread_cond_destroy(&pf->work_cv);
	pthread_mutex_destroy(&pf->lock);
	free(pf);
}

static void deadline_after(struct timespec *ts, int timeout_ms)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += timeout_ms / 1000;
	ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
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
			load_maybe_free(pf, owner[i]);
	}
	pthread_mutex_unlock(&pf->lock);
	destroy_events(dead, ndead);
	free(dead);
	return 0;
}

AEG_EXPORT int aeg_prefetch_release_wait(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count,
					 int timeout_ms)
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
		deadline_after(&ts, timeout_ms);
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
	if (err == 0)
		err = release_owned(pf, owner, gidx, count);   /* unlocks */
	else
		pthread_mutex_unlock(&pf->lock);
	free(owner);
	free(gidx);
	return err;
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

/* ---------------------------------------------------------- one file */

static int open_file(const char *path, struct stat *st, int *fdp)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);

	if (fd < 0) {
		int e = errno;

		if (e == ENOENT || e == ENOTDIR)
			return aeg_fail(AEG_ENOENT, "%s: no such file", path);
		if (e == EACCES || e == EPERM)
			return aeg_fail(AEG_EACCES, "%s: permission denied (need read access)", path);
		return aeg_fail(AEG_EIO, "%s: open: %s", path, strerror(e));
	}
	if (fstat(fd, st) != 0) {
		int e = errno;

		close(fd);
		return aeg_fail(AEG_EIO, "%s: fstat: %s", path, strerror(e));
	}
	if (S_ISDIR(st->st_mode)) {
		close(fd);
		return aeg_fail(AEG_EINVAL, "%s is a directory: give a model file (e.g. one .safetensors file)",
				path);
	}
	if (!S_ISREG(st->st_mode)) {
		close(fd);
		return aeg_fail(AEG_EINVAL, "%s is not a regular file", path);
	}
	*fdp = fd;
	return 0;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int add_group(struct aeg_load *l, uint64_t begin, uint64_t bytes, uint64_t chunk_bytes,
		     uint32_t *gcap, uint32_t *ccap)
{
	uint32_t n = (uint32_t)((bytes + chunk_bytes - 1) / chunk_bytes);
	struct group *g;

	if (l->ngroups == *gcap) {
		uint32_t cap = *gcap ? 2 * *gcap : 64;
		void *p = realloc(l->groups, cap * sizeof(*l->groups));

		if (p == NULL)
			return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		l->groups = p;
		*gcap = cap;
	}
	while (l->nchunks + n > *ccap) {
		uint32_t cap = *ccap ? 2 * *ccap : 64;
		void *p = realloc(l->chunks, cap * sizeof(*l->chunks));

		if (p == NULL)
			return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		l->chunks = p;
		*ccap = cap;
	}
	g = &l->groups[l->ngroups];
	memset(g, 0, sizeof(*g));
	g->file_begin = begin;
	g->bytes = bytes;
	g->first_chunk = l->nchunks;
	g->nchunks = n;
	for (uint32_t i = 0; i < n; i++) {
		struct aeg_chunk *c = &l->chunks[l->nchunks++];
		uint64_t off = (uint64_t)i * chunk_bytes;

		memset(c, 0, sizeof(*c));
		c->file_offset = begin + off;
		c->size = bytes - off < chunk_bytes ? bytes - off : chunk_bytes;
	}
	l->ngroups++;
	return 0;
}

/* Tensor @i's bytes as the load places them: where they start (out_of's offsets) and how many. */
static void tensor_place(const struct aeg_load *l, size_t i, uint64_t *begin, uint64_t *bytes)
{
	const struct aeg_st_tensor *t = &l->hdr.tensors[i];

	if (l->plan.spec) {
		*begin = l->plan.spans[i].out;
		*bytes = l->plan.spans[i].bytes;
	} else {
		*begin = l->data_begin + t->begin;
		*bytes = t->end - t->begin;
	}
}

/*
 * Cut the file into groups and chunks: small tensors packed greedily into a
 * chunk, a tensor over chunk_bytes alone in a group of several chunks; a
 * raw file in chunks of chunk_bytes, each its own group. A sliced load's
 * tensors are its parts, packed the same way.
 */
static int plan_chunks(struct aeg_load *l, uint64_t chunk_bytes, int safetensors)
{
	uint32_t gcap = 0, ccap = 0;
	uint64_t size = (uint64_t)l->st.st_size;
	uint64_t open_begin = 0, open_bytes = 0;
	int err;

	if (!safetensors) {
		for (uint64_t off = 0; off < size; off += chunk_bytes) {
			err = add_group(l, off, size - off < chunk_bytes ? size - off : chunk_bytes,
					chunk_bytes, &gcap, &ccap);
			if (err)
				return err;
		}
		return 0;
	}
	for (size_t i = 0; i < l->hdr.count; i++) {
		uint64_t begin, bytes;

		tensor_place(l, i, &begin, &bytes);
		if (bytes == 0)
			continue;
		if (open_bytes && open_bytes + bytes <= chunk_bytes) {
			open_bytes += bytes;
			continue;
		}
		if (open_bytes) {
			err = add_group(l, open_begin, open_bytes, chunk_bytes, &gcap, &ccap);
			if (err)
				return err;
			open_bytes = 0;
		}
		if (bytes > chunk_bytes) {
			err = add_group(l, begin, bytes, chunk_bytes, &gcap, &ccap);
			if (err)
				return err;
		} else {
			open_begin = begin;
			open_bytes = bytes;
		}
	}
	if (open_bytes)
		return add_group(l, open_begin, open_bytes, chunk_bytes, &gcap, &ccap);
	return 0;
}

/* A sliced load's plan of its parts; nothing for a whole one. */
static int plan_slice(struct aeg_load *l, const struct aeg_slice *slice, int safetensors)
{
	char what[128];
	int err;

	if (slice == NULL)
		return 0;
	if (!safetensors)
		return aeg_fail(AEG_EINVAL, "%s: not a safetensors file: a tensor-parallel slice needs its tensors", l->path);
	err = slice_plan_make(slice, &l->hdr, l->path, &l->plan);
	if (err == 0) {
		slice_describe(slice, what, sizeof(what));
		aeg_debug("prefetch: %s: slice %s: %" PRIu64 " of %" PRIu64 " data bytes", l->path, what,
			  l->plan.out_end - l->plan.out_begin, l->hdr.data_bytes);
	}
	return err;
}

static void free_blocks(struct aeg_prefetch *pf, struct aeg_load *l, uint32_t upto)
{
	for (uint32_t g = 0; g < upto; g++)
		aeg_slab_free(pf->slab, l->groups[g].block.id);
}

static int alloc_blocks(struct aeg_prefetch *pf, struct aeg_load *l)
{
	struct aeg_slab_stats ss;
	uint64_t need = 0;
	char a[32], b[32], t[32];
	int err;

	for (uint32_t g = 0; g < l->ngroups; g++)
		need += aeg_round_up(l->groups[g].bytes, AEG_SLAB_ALIGN);
	err = aeg_slab_stats(pf->slab, &ss);
	if (err)
		return err;
	if (need > ss.free_bytes)
		return aeg_fail(AEG_ENOSPC,
				"%s: needs %s (%" PRIu64 " bytes in %u blocks) in the slab of GPU %d, which has %s free of %s",
				l->path, aeg_size_format(need, a, sizeof(a)), need, l->ngroups, pf->gpu,
				aeg_size_format(ss.free_bytes, b, sizeof(b)),
				aeg_size_format(ss.total_bytes, t, sizeof(t)));
	for (uint32_t g = 0; g < l->ngroups; g++) {
		err = aeg_slab_alloc(pf->slab, l->groups[g].bytes, &l->groups[g].block);
		if (err) {
			aeg_error_prefix("%s: block %u of %u (%s asked in all, %s free)", l->path, g + 1,
					 l->ngroups, aeg_size_format(need, a, sizeof(a)),
					 aeg_size_format(ss.free_bytes, b, sizeof(b)));
			free_blocks(pf, l, g);
			return err;
		}
	}
	for (uint32_t g = 0; g < l->ngroups; g++) {
		struct group *gr = &l->groups[g];

		for (uint32_t c = gr->first_chunk; c < gr->first_chunk + gr->nchunks; c++) {
			uint64_t in = l->rt[c].out - gr->file_begin;

			l->chunks[c].device_ptr = (char *)gr->block.ptr + in;
			l->chunks[c].slab_id = gr->block.id;
			l->chunks[c].slab_offset = gr->block.offset + in;
			l->rt[c].group = g;
		}
	}
	l->live_groups = l->ngroups;
	return 0;
}

static int build_tensors(struct aeg_load *l)
{
	if (l->hdr.count == 0)
		return 0;
	l->tensors = calloc(l->hdr.count, sizeof(*l->tensors));
	if (l->tensors == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %zu tensors", l->hdr.count);
	for (size_t i = 0; i < l->hdr.count; i++) {
		const struct aeg_st_tensor *t = &l->hdr.tensors[i];
		struct aeg_tensor *o = &l->tensors[i];
		uint64_t off, bytes;
		uint32_t c;

		tensor_place(l, i, &off, &bytes);
		c = chunk_at(l, off);
		o->name = t->name;
		o->dtype = t->dtype;
		o->ndim = t->ndim;
		o->shape = l->plan.spec ? l->plan.spans[i].shape : t->shape;
		o->size = bytes;
		o->file_offset = l->plan.spec ? l->plan.spans[i].src : off;
		o->slice_dim = l->plan.spec ? l->plan.spans[i].dim : AEG_SLICE_WHOLE;
		o->slice_start = l->plan.spec ? l->plan.spans[i].start : 0;
		o->slice_extent = l->plan.spec ? l->plan.spans[i].extent : 0;
		if (c == l->nchunks && c > 0 && bytes == 0)
			c--;            /* an empty tensor at the very end */
		o->first_chunk = c;
		o->chunks = bytes ? chunk_at(l, off + bytes - 1) - c + 1 : 0;
		if (c < l->nchunks) {
			const struct group *g = &l->groups[l->rt[c].group];

			o->device_ptr = (char *)g->block.ptr + (off - g->file_begin);
		}
	}
	l->ntensors = (uint32_t)l->hdr.count;
	return 0;
}

/* Emit pieces of @B bytes over [b, e) into @items (NULL: count only) from index @n; returns the new count. */
static uint32_t cut_pieces(struct item *items, uint32_t n, uint64_t b, uint64_t e, uint64_t B)
{
	for (uint64_t at = b; at < e; at += B, n++) {
		if (items) {
			items[n].begin = at;
			items[n].end = e - at < B ? e : at + B;
		}
	}
	return n;
}

/*
 * A sliced load reads only the pages its parts lie in: each part's file
 * range, page-aligned (pieces are registered whole pages), merged with the
 * previous one where they touch, cut into pieces of @B. A part split along
 * a later dimension is read whole, rows and all: its rows interleave the
 * other ranks' parts, usually within a page.
 */
static uint32_t slice_pieces(const struct aeg_load *l, uint64_t B, struct item *items)
{
	uint64_t size = (uint64_t)l->st.st_size, rb = 0, re = 0;
	uint32_t n = 0;

	for (size_t i = 0; i < l->plan.count; i++) {
		const struct slice_span *t = &l->plan.spans[i];
		uint64_t b = t->src / PAGE * PAGE, e = aeg_round_up(slice_file_end(t), PAGE);

		if (t->bytes == 0)
			continue;
		if (e > size)
			e = size;
		if (re > rb && b <= re) {
			re = e > re ? e : re;
			continue;
		}
		n = cut_pieces(items, n, rb, re, B);
		rb = b;
		re = e;
	}
	return cut_pieces(items, n, rb, re, B);
}

/* The chunks piece @it fills (none: first > last), each counting it as pending. */
static void piece_chunks(struct aeg_load *l, struct item *it)
{
	uint64_t ob = out_of(l, it->begin), oe = out_of(l, it->end);

	it->first_chunk = chunk_at(l, ob);
	it->last_chunk = it->first_chunk;
	if (it->first_chunk >= l->nchunks || l->rt[it->first_chunk].out >= oe) {
		it->first_chunk = 1;
		it->last_chunk = 0;
		return;
	}
	while (it->last_chunk + 1 < l->nchunks && l->rt[it->last_chunk + 1].out < oe)
		it->last_chunk++;
	for (uint32_t c = it->first_chunk; c <= it->last_chunk; c++)
		l->rt[c].pending++;
}

static int plan_items(struct aeg_prefetch *pf, struct aeg_load *l)
{
	uint64_t size = (uint64_t)l->st.st_size;
	uint64_t B = l->item_bytes;

	if (l->nchunks == 0 && !l->filling)
		return 0;
	l->item_base = l->filling || l->feed == AEG_FEED_CACHE ? 0 : l->data_begin / B * B;
	if (l->plan.spec)
		l->nitems = slice_pieces(l, B, NULL);
	else
		l->nitems = (uint32_t)((size - l->item_base + B - 1) / B);
	l->items = calloc(l->nitems ? l->nitems : 1, sizeof(*l->items));
	if (l->items == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %u pieces", l->nitems);
	if (l->plan.spec)
		slice_pieces(l, B, l->items);
	else
		cut_pieces(l->items, 0, l->item_base, size, B);
	for (uint32_t k = 0; k < l->nitems; k++) {
		struct item *it = &l->items[k];

		it->load = l;
		it->index = k;
		it->buf = -1;
		piece_chunks(l, it);
	}
	return 0;
}

static void choose_feed(struct aeg_prefetch *pf, struct aeg_load *l,
			const struct aeg_prefetch_options *o)
{
	int use_cache = pf->cfg.cache_bytes > 0 && o->feed == AEG_FEED_AUTO &&
			!(o->flags & AEG_PREFETCH_NO_CACHE) && l->plan.spec == NULL;

	pthread_mutex_lock(&pf->lock);
	if (use_cache) {
		l->entry = cache_lookup(pf, l->path, &l->st);
		if (l->entry) {
			pf->hits++;
			l->feed = AEG_FEED_CACHE;
			l->item_bytes = pf->buffer_bytes;
			pthread_mutex_unlock(&pf->lock);
			return;
		}
		pf->misses++;
		l->entry = cache_reserve(pf, l->path, &l->st);
		l->filling = l->entry != NULL;
	}
	pthread_mutex_unlock(&pf->lock);

	l->feed = o->feed;
	if (l->feed == AEG_FEED_AUTO)
		l->feed = (uint64_t)l->st.st_size < pf->cfg.small_file_bytes ? AEG_FEED_READ : AEG_FEED_MIXED;
	/* No pool yet (it is still being made): every piece registered from the page cache. */
	pthread_mutex_lock(&pf->lock);
	if (pf->pool == NULL && o->feed == AEG_FEED_AUTO)
		l->feed = AEG_FEED_MMAP;
	pthread_mutex_unlock(&pf->lock);
	if (mapped(l) && l->st.st_size > 0) {
		l->map_bytes = (size_t)l->st.st_size;
		l->map = mmap(NULL, l->map_bytes, PROT_READ, MAP_SHARED, l->fd, 0);
		if (l->map == MAP_FAILED) {
			aeg_warn("prefetch: %s: mmap refused (%s); reading it through the pinned pool instead",
				 l->path, strerror(errno));
			l->map = NULL;
			l->feed = AEG_FEED_READ;
			pthread_mutex_lock(&pf->lock);
			pf->fallbacks++;
			pthread_mutex_unlock(&pf->lock);
		}
	}
	/* A cache fill goes piece by piece into the entry's buffers. */
	l->item_bytes = mapped(l) && !l->filling ? pf->cfg.piece_bytes : pf->buffer_bytes;
	if (l->feed == AEG_FEED_READ && pf->cfg.direct_io && !l->filling) {
		l->dfd = open(l->path, O_RDONLY | O_CLOEXEC | O_DIRECT);
		if (l->dfd < 0)
			aeg_info("prefetch: %s: O_DIRECT refused (%s); reading through the page cache",
				 l->path, strerror(errno));
	}
}

static int make_events(struct aeg_prefetch *pf, struct aeg_load *l, uint32_t *made)
{
	int err;

	for (*made = 0; *made < l->nchunks; (*made)++) {
		uint32_t c = *made;

		err = aeg_event_create(pf->dev, pf->gpu, &l->rt[c].ev, &l->chunks[c].event);
		if (err) {
			/* The driver's interprocess events are limited: thousands, not millions. */
			aeg_error_prefix("%s: the event of chunk %u of %u (every chunk has one: a larger chunk size makes fewer)",
					 l->path, c, l->nchunks);
			return err;
		}
		l->rt[c].unqueued = l->rt[c].pending;
		err = aeg_event_arm(l->rt[c].ev);
		if (err) {
			(*made)++;
			return err;
		}
	}
	return 0;
}

AEG_EXPORT int aeg_prefetch_file(aeg_prefetch_t *pf, const char *path,
				 const struct aeg_prefetch_options *o, aeg_load_t **out)
{
	struct aeg_load *l;
	uint64_t slab_bytes;
	uint32_t events = 0;
	int safetensors, blocks = 0, err;

	if (pf == NULL || path == NULL || o == NULL || out == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_file: NULL argument");
	slab_bytes = aeg_slab_bytes(pf->slab);
	if (o->chunk_bytes == 0)
		return aeg_fail(AEG_EINVAL, "%s: chunk size 0: give a chunk size such as 64MiB", path);
	if (o->chunk_bytes % AEG_PREFETCH_CHUNK_ALIGN)
		return aeg_fail(AEG_EINVAL, "%s: chunk size %" PRIu64 " bytes is not a multiple of 4 KiB (4096 bytes)",
				path, o->chunk_bytes);
	if (o->chunk_bytes > slab_bytes)
		return aeg_fail(AEG_EINVAL, "%s: chunk size %" PRIu64 " is larger than the slab (%" PRIu64 " bytes)",
				path, o->chunk_bytes, slab_bytes);
	if (o->feed != AEG_FEED_AUTO && o->feed != AEG_FEED_MMAP && o->feed != AEG_FEED_READ &&
	    o->feed != AEG_FEED_MIXED)
		return aeg_fail(AEG_EINVAL, "prefetch feed %d: expected auto, mmap, read or mixed", (int)o->feed);
	if (o->format != AEG_FORMAT_AUTO && o->format != AEG_FORMAT_RAW &&
	    o->format != AEG_FORMAT_SAFETENSORS)
		return aeg_fail(AEG_EINVAL, "prefetch format %d: expected auto, raw or safetensors",
				(int)o->format);
	if (o->flags & ~AEG_PREFETCH_NO_CACHE)
		return aeg_fail(AEG_EINVAL, "prefetch flags 0x%x: unknown bits", o->flags);

	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	l->pf = pf;
	l->handles = 1;
	l->fd = -1;
	l->dfd = -1;
	l->priority = o->priority;
	l->start_ns = aeg_now_ns();
	l->path = strdup(path);
	if (l->path == NULL) {
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		goto fail;
	}
	err = open_file(path, &l->st, &l->fd);
	if (err)
		goto fail;

	/* Safetensors by content; a file named so must be one. */
	safetensors = 0;
	if (o->format == AEG_FORMAT_SAFETENSORS)
		err = aeg_st_read(l->fd, (uint64_t)l->st.st_size, &l->hdr) ?: 1;
	else if (o->format == AEG_FORMAT_AUTO)
		err = aeg_st_detect(l->fd, (uint64_t)l->st.st_size, ends_with(path, ".safetensors"), &l->hdr);
	else
		err = 0;
	if (err < 0) {
		aeg_error_prefix("%s", path);
		goto fail;
	}
	if (err == 1) {
		safetensors = 1;
		l->data_begin = l->hdr.data_offset;
	}
	err = plan_slice(l, o->slice, safetensors);
	if (err == 0)
		err = plan_chunks(l, o->chunk_bytes, safetensors);
	if (err)
		goto fail;
	l->rt = calloc(l->nchunks ? l->nchunks : 1, sizeof(*l->rt));
	if (l->rt == NULL) {
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %u chunks", l->nchunks);
		goto fail;
	}
	for (uint32_t c = 0; c < l->nchunks; c++)
		l->rt[c].out = l->chunks[c].file_offset;
	for (uint32_t g = 0; g < l->ngroups; g++)
		l->total_bytes += l->groups[g].bytes;
	err = alloc_blocks(pf, l);
	if (err)
		goto fail;
	blocks = 1;
	err = build_tensors(l);
	if (err)
		goto fail;

	choose_feed(pf, l, o);
	err = plan_items(pf, l);
	if (err)
		goto fail;
	/* What a caller reads: where each chunk's first byte is in the file. */
	for (uint32_t c = 0; l->plan.spec && c < l->nchunks; c++)
		l->chunks[c].file_offset = slice_file_of(&l->plan, l->rt[c].out);
	err = make_events(pf, l, &events);
	if (err)
		goto fail;

	pthread_mutex_lock(&pf->lock);
	if (pf->quit) {
		pthread_mutex_unlock(&pf->lock);
		err = aeg_fail(AEG_ECANCELED, "prefetch engine is shutting down");
		goto fail;
	}
	l->id = pf->next_id++;
	l->in_flight = 1;
	l->items_left = l->nitems;
	l->status = AEG_EBUSY;
	l->next = pf->loads;
	if (pf->loads)
		pf->loads->prev = l;
	pf->loads = l;
	queue_finish_if_done(pf, l);
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	aeg_debug("prefetch: load %" PRIu64 ": %s, %jd bytes, %u chunks in %u blocks, %u tensors, feed %s",
		  l->id, path, (intmax_t)l->st.st_size, l->nchunks, l->ngroups, l->ntensors,
		  aeg_prefetch_feed_name(l->feed));
	*out = l;
	return 0;

fail:
	for (uint32_t c = 0; c < events; c++)
		if (l->rt[c].ev)
			aeg_event_destroy(l->rt[c].ev);
	if (l->entry) {
		pthread_mutex_lock(&pf->lock);
		cache_unref(pf, l->entry);
		pthread_mutex_unlock(&pf->lock);
	}
	if (blocks)
		free_blocks(pf, l, l->ngroups);
	if (l->map)
		munmap(l->map, l->map_bytes);
	if (l->dfd >= 0)
		close(l->dfd);
	if (l->fd >= 0)
		close(l->fd);
	load_free(l);
	return err;
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
		deadline_after(&ts, timeout_ms);
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
		load_stop(l->pf, l, AEG_ECANCELED, detail);
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
		load_stop(pf, l, AEG_ECANCELED, "load released while loading");
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
		load_maybe_free(pf, l);
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

/*
 * The prefetch engine's structures, shared by its files (prefetch.c: the
 * engine and its loads; prefetch_cache.c: the host model cache;
 * prefetch_feed.c: the workers and feeds; prefetch_plan.c: a file's plan).
 * Private to the prefetch layer.
 */
#ifndef AEGAEON_PREFETCH_ENGINE_H
#define AEGAEON_PREFETCH_ENGINE_H

#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include <aegaeon/device.h>
#include <aegaeon/event.h>
#include <aegaeon/pinned.h>
#include <aegaeon/prefetch.h>
#include <aegaeon/slab.h>

#include "prefetch_internal.h"
#include "safetensors.h"
#include "slice_plan.h"

#define PAGE 4096u

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

/*
 * Where a load's time went, summed over the workers (prefetch_feed.c adds
 * with relaxed atomics; logged at the load's end at debug level).
 */
struct feed_times {
	uint64_t reg_pieces, reg_bytes;
	uint64_t populate_ns, register_ns;      /* MADV_POPULATE_READ, then the registration */
	uint64_t read_bufs, read_bytes;
	uint64_t ring_wait_ns, pread_ns;        /* waiting for a ring buffer, reading into it */
	uint64_t submits, submit_ns, submit_max_ns;   /* queueing copies, events, host functions */
};

struct aeg_load {
	struct aeg_prefetch *pf;
	uint64_t id;
	char *path;
	int fd;
	int dfd;                        /* O_DIRECT descriptor, or -1 */
	struct stat st;
	void *map;                      /* MMAP, MIXED; READ waiting for its ring: should it fail */
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
	uint32_t pool_waiters;                  /* workers waiting for a pool given later (ring_get) */
	struct item *unreg;                     /* copied pieces still registered, unregistered at the end */
	int in_flight, finish_queued, stop_err, status;
	int cleaning;                           /* settled; host side not given back yet */
	char detail[512];
	uint64_t done_bytes, total_bytes;
	uint32_t done_chunks, recorded_chunks;
	uint64_t start_ns, first_ns, landed_ns, end_ns;
	uint64_t quarter_ns[4];                 /* when 1/4, 1/2, 3/4 and all of the bytes had landed */
	struct feed_times times;                /* atomics, no lock */
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
	int staging_ring;               /* the pool is (or will be) a staging ring only: AUTO reads */
	int pool_err;                   /* no pool will come: why */
	char pool_detail[256];
	uint64_t buffer_bytes;
	uint64_t read_bytes;            /* a READ piece: buffer_bytes, or a slot's (below) */
	struct aeg_prefetch_config cfg;
	char pci[AEG_PCI_BUS_ID_LEN];

	pthread_mutex_t lock;
	pthread_cond_t work_cv;         /* workers: items, retirements, ring slots */
	pthread_cond_t done_cv;         /* waiters: loads ending */
	pthread_t *workers;
	int nworkers;
	int quit;
	uint32_t held;                          /* aeg_prefetch_hold: no new piece starts */
	uint32_t bound;                         /* workers bound near the GPU (cfg.topo) */
	aeg_stream_t **streams;
	int nstreams;

	struct aeg_load *loads;
	struct aeg_load *finishing;
	struct item *retired;
	uint64_t next_id;
	uint32_t ring_in_use;
	/*
	 * Slots (prefetch_feed.c): with a pool of buffers larger than a ring
	 * buffer, READ pieces go into slots of read_bytes carved from as few
	 * of its buffers as the ring needs (max_carved), the slot given back
	 * last taken first; the buffers go back to the pool once no load runs.
	 * slots_per_buf 0: READ pieces take whole pool buffers.
	 */
	uint32_t slots_per_buf;
	uint32_t max_carved, ncarved, carving;
	uint32_t *carved;                       /* pool buffer indices, max_carved */
	uint32_t *free_slots;                   /* slot ids (carved index * slots_per_buf + k), a stack */
	uint32_t nfree;
	uint32_t registered;
	uint32_t registering;                   /* MIXED: workers in a registration now */
	uint64_t deferred_bytes;                /* registered bytes of copied pieces, all loads */

	struct cache_entry *lru;        /* most recent first */
	uint64_t cache_used;            /* bytes of linked and filling entries */
	uint64_t cache_entries;
	uint64_t hits, misses, evictions, fallbacks;

	aeg_prefetch_hook_fn hook;
	void *hook_arg;
	uint64_t pool_ns;                       /* when a pool given later came (atomic); 0: none, or from the start */
};

struct worker_arg {
	struct aeg_prefetch *pf;
	int index;
};

/*
 * Where file byte @at lands: its offset, or in a sliced load the packed
 * offset of the first byte of a part at or after it. Chunks are placed by
 * these offsets, in the same order as the file.
 */
static inline uint64_t out_of(const struct aeg_load *l, uint64_t at)
{
	return l->plan.spec ? slice_out_of(&l->plan, at) : at;
}

/* First chunk whose range ends after offset @off (out_of's; chunks tile the data in order). */
static inline uint32_t chunk_at(const struct aeg_load *l, uint64_t off)
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

/* The file is mapped and its pieces registered (MIXED: some of them). */
static inline int mapped(const struct aeg_load *l)
{
	return l->feed == AEG_FEED_MMAP || l->feed == AEG_FEED_MIXED;
}

/* prefetch.c: a load's life. Lock held where they say. */
void prefetch_queue_finish(struct aeg_prefetch *pf, struct aeg_load *l);
void prefetch_load_stop(struct aeg_prefetch *pf, struct aeg_load *l, int err, const char *detail);
void prefetch_load_free(struct aeg_load *l);
void prefetch_load_maybe_free(struct aeg_prefetch *pf, struct aeg_load *l);

/* prefetch_cache.c: the host model cache, all under pf->lock. */
struct cache_entry *prefetch_cache_lookup(struct aeg_prefetch *pf, const char *path, const struct stat *st);
struct cache_entry *prefetch_cache_reserve(struct aeg_prefetch *pf, const char *path, const struct stat *st);
void prefetch_cache_link(struct aeg_prefetch *pf, struct cache_entry *e);
void prefetch_cache_unref(struct aeg_prefetch *pf, struct cache_entry *e);
int prefetch_cache_evict_one(struct aeg_prefetch *pf);

/* prefetch_feed.c: a worker thread, started by aeg_prefetch_create with a malloc'd struct worker_arg. */
void *prefetch_worker(void *arg);
/* prefetch_feed.c: give the carved buffers back to the pool when no load runs (@all: at once). Lock held. */
void prefetch_slots_drop(struct aeg_prefetch *pf, int all);

#endif

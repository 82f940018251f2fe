/* aegaeon prefetch: chunked, safetensors-aware loading of model files into a GPU slab. */
#ifndef AEGAEON_PREFETCH_H
#define AEGAEON_PREFETCH_H

#include <stdint.h>

#include <aegaeon/device.h>
#include <aegaeon/pinned.h>
#include <aegaeon/slab.h>
#include <aegaeon/slice.h>
#include <aegaeon/topo.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_prefetch aeg_prefetch_t;    /* an engine: one slab, worker threads */
typedef struct aeg_load aeg_load_t;            /* one file being (or done) loading */

/*
 * How a file's bytes reach the GPU.
 * MMAP: zero-copy from the page cache: the file is mapped, each piece is
 *   registered read-only (AEG_HOST_REGISTER_READONLY) and copied as soon as
 *   it is registered, then unregistered. Fastest for cached files.
 * READ: pread by threads pinned near the GPU into buffers of the pinned pool
 *   (a bounded ring; a pool of buffers of 8 MiB or more is read through
 *   4 MiB slots carved from a few of them), copied on several streams.
 *   Works on any file system.
 * MIXED: both at once on one mapped file: at most mmap_threads workers
 *   register pieces (registrations serialize in the driver), the others
 *   read pieces through the ring; the copy engines take from both.
 * CACHE: the file is in the host model cache: a pure pinned->GPU copy.
 * AUTO picks per file: CACHE on a hit; READ through an engine's own staging
 * ring (aeg_prefetch_create given no pool, or a ring being made) or through
 * slots of a pool that is there, whose small buffers are still in the CPU's
 * last-level cache when the copy engines read them; else (a pool of small
 * buffers, or one given later and not there yet) READ for files under
 * small_file_bytes or where registration is refused (logged), MIXED for
 * larger ones. A load filling the
 * cache reads its pieces into the cache's buffers, or (MIXED) registers them
 * and copies them back from the GPU into those buffers, the copy engines'
 * other direction.
 * Registered pieces are unregistered after the load has settled: its wait
 * returns once the bytes are on the GPU.
 */
enum aeg_prefetch_feed {
	AEG_FEED_AUTO = 0,
	AEG_FEED_MMAP = 1,
	AEG_FEED_READ = 2,
	AEG_FEED_CACHE = 3,     /* reported only; never asked for */
	AEG_FEED_MIXED = 4,
};

/* aeg_prefetch_feed_name - "auto", "mmap", "read", "cache", "mixed". */
const char *aeg_prefetch_feed_name(enum aeg_prefetch_feed feed);

enum aeg_prefetch_format {
	AEG_FORMAT_AUTO = 0,            /* safetensors by content (a header that parses); a file
					   named *.safetensors must be one (AEG_EFORMAT otherwise) */
	AEG_FORMAT_RAW = 1,             /* any file: fixed-size chunks */
	AEG_FORMAT_SAFETENSORS = 2,     /* parse the header strictly; chunks follow tensors */
};

/* Engine settings; aeg_prefetch_config_defaults gives the values in brackets. */
struct aeg_prefetch_config {
	int threads;                /* worker threads, 1..256 [12] */
	int streams;                /* copy streams, 1..64 [4] */
	uint64_t piece_bytes;       /* MMAP/MIXED piece, multiple of 4096 [64 MiB] */
	int mmap_threads;           /* MIXED: workers registering at once, 1..256 [1] */
	int ring_buffers;           /* READ: pool buffers in flight at most [2 * threads] */
	int direct_io;              /* READ: open files O_DIRECT (cold files; falls back, logged) [0] */
	uint64_t small_file_bytes;  /* AUTO: smaller files take READ [64 MiB] */
	uint64_t cache_bytes;       /* host model cache budget in the pool; 0 disables [0] */
	/*
	 * Buffer size of a pool given later (aeg_prefetch_set_pool) when
	 * aeg_prefetch_create gets none; 0: the engine makes its own pool [0].
	 * Until the pool comes, AUTO loads register every piece (a small file
	 * takes MMAP, a large one MIXED, which reads through the pool once it
	 * is there); one whose file cannot be mapped waits for it.
	 */
	uint64_t pool_later_buffer_bytes;
	const aeg_topo_t *topo;     /* bind workers to the GPU's local CPUs; NULL: unbound */
};

/* aeg_prefetch_config_defaults - fill @cfg with the values in brackets above (no topology). */
void aeg_prefetch_config_defaults(struct aeg_prefetch_config *cfg);

/*
 * aeg_prefetch_create - an engine loading into @slab (and so onto its GPU),
 * staging through @pool (NULL: the engine makes a private pool of
 * ring_buffers buffers of 4 MiB; the cache is then off). The engine keeps
 * the slab and pool pointers; destroy it before them.
 * Errors: AEG_EINVAL (a setting out of range, named in the detail),
 * AEG_ENOMEM, AEG_EDEVICE (streams).
 */
int aeg_prefetch_create(aeg_slab_t *slab, aeg_pool_t *pool,
			const struct aeg_prefetch_config *cfg, aeg_prefetch_t **pf);

/*
 * aeg_prefetch_set_pool - the pool an engine made with
 * pool_later_buffer_bytes stages through from now on, with @cache_bytes of
 * it for the host model cache (the engine keeps the pointer; destroy it
 * before the pool). @pool NULL says none will come: loads waiting for it
 * fail with @err (its detail kept). Once only. AEG_EINVAL for another
 * buffer size than announced, AEG_EEXIST for a second call.
 */
int aeg_prefetch_set_pool(aeg_prefetch_t *pf, aeg_pool_t *pool, uint64_t cache_bytes, int err);

/*
 * aeg_prefetch_destroy - cancel loads in flight, wait for their copies,
 * release every chunk (blocks and events), empty the cache, stop the
 * workers. Load handles not yet closed are freed too.
 */
void aeg_prefetch_destroy(aeg_prefetch_t *pf);

/* Per-file options; zero-initialised means defaults except chunk_bytes. */
#define AEG_PREFETCH_NO_CACHE 0x1u      /* neither use nor fill the host cache */
#define AEG_PREFETCH_CHUNK_ALIGN 4096u  /* chunk_bytes is a multiple of this */
struct aeg_prefetch_options {
	/*
	 * A multiple of 4 KiB, > 0; required. One larger than the file is the
	 * file's size rounded up to 4 KiB; what is left must fit the slab.
	 */
	uint64_t chunk_bytes;
	int priority;                   /* higher loads take the workers first [0] */
	enum aeg_prefetch_feed feed;    /* AUTO, MMAP, READ or MIXED */
	enum aeg_prefetch_format format;
	unsigned flags;                 /* AEG_PREFETCH_* */
	/*
	 * Load only this rank's part of each tensor (a safetensors file;
	 * aegaeon/slice.h); NULL: the whole file. A sliced load neither uses
	 * nor fills the host cache (it holds whole files). The spec is copied.
	 */
	const struct aeg_slice *slice;
};

/*
 * A chunk: a range of the file copied to the GPU, with its own event.
 * Chunks follow tensor boundaries: several small tensors share a chunk; a
 * tensor larger than chunk_bytes gets one block (one slab_id, contiguous on
 * the GPU) cut into several chunks of chunk_bytes, each with its own event.
 * Another process reads a chunk at (its opening of the slab's handle,
 * aeg_slab_export) + slab_offset, after aeg_event_wait_handle on event.
 */
struct aeg_chunk {
	void *device_ptr;
	uint64_t size;
	aeg_handle_t event;             /* 64-byte interprocess event handle */
	uint64_t slab_id;               /* the slab block holding the chunk */
	uint64_t slab_offset;           /* device_ptr - slab base */
	uint64_t file_offset;
	uint32_t file;                  /* a model of several files: which (aeg_model_file); else 0 */
};

/*
 * A tensor as loaded. In a sliced load: this rank's part, with its shape
 * and size; file_offset is where its first byte is in the file; the part
 * covers indices [slice_start, slice_start + shape[slice_dim]) of the
 * file's slice_extent along slice_dim.
 */
struct aeg_tensor {
	const char *name;
	const char *dtype;              /* "F32", "BF16", ... as in the file */
	int ndim;
	const uint64_t *shape;
	void *device_ptr;               /* contiguous on the GPU */
	uint64_t size;
	uint64_t file_offset;
	uint32_t first_chunk;           /* index of the chunk holding its first byte */
	uint32_t file;                  /* a model of several files: which (aeg_model_file); else 0 */
	uint32_t chunks;                /* chunks its bytes lie in, from first_chunk (0 when empty) */
	int slice_dim;                  /* the dimension split across ranks; AEG_SLICE_WHOLE: loaded whole */
	uint64_t slice_start, slice_extent;
};

/*
 * aeg_prefetch_file - start loading @path. Opens and checks the file,
 * parses a safetensors header, allocates a slab block per chunk group and an
 * event per chunk, queues the work, and returns at once with @load: its
 * chunks (aeg_load_chunks) are usable while they still load; wait on one
 * with aeg_load_wait_chunk or, from any process, aeg_event_wait_handle.
 * An event completes only after its chunk's bytes are on the GPU.
 * Thread-safe. Errors (nothing is left allocated): AEG_EINVAL (chunk_bytes
 * 0, not a multiple of 4 KiB or over the slab, a directory, a bad option;
 * a slice of a file that is not safetensors, or one its tensors do not
 * allow: the detail names the tensor, its shape and the rule), AEG_ENOENT, AEG_EACCES,
 * AEG_EFORMAT (a bad safetensors header; the detail says what), AEG_ENOSPC
 * (detail: bytes requested vs free in the slab), AEG_EDEVICE, AEG_ENOMEM,
 * AEG_ECANCELED (the engine is being destroyed).
 */
int aeg_prefetch_file(aeg_prefetch_t *pf, const char *path,
		      const struct aeg_prefetch_options *opts, aeg_load_t **load);

/* aeg_load_chunks - the chunks in file-offset order; valid until the load is closed. */
const struct aeg_chunk *aeg_load_chunks(const aeg_load_t *load, uint32_t *count);

/* aeg_load_tensors - the safetensors table in file order (0 tensors for a raw file). */
const struct aeg_tensor *aeg_load_tensors(const aeg_load_t *load, uint32_t *count);

/*
 * aeg_load_metadata - the safetensors header's "__metadata__": its number
 * of string pairs (0 for none or a raw file), @keys and @values (either may
 * be NULL) in the file's order. Valid until the load is closed.
 */
uint32_t aeg_load_metadata(const aeg_load_t *load, const char *const **keys, const char *const **values);

/* aeg_load_slice - the load's slice spec (its own copy), NULL for a whole file. */
const struct aeg_slice *aeg_load_slice(const aeg_load_t *load);

/* aeg_load_id - a number unique in this engine, for logs and the CLI. */
uint64_t aeg_load_id(const aeg_load_t *load);

/*
 * aeg_load_wait - wait until every chunk is loaded or the load stopped;
 * @timeout_ms < 0 waits forever. Returns 0, AEG_ETIMEDOUT, or the load's
 * error: AEG_ECANCELED, AEG_ESTALE (the file changed during the load),
 * AEG_EIO, AEG_EDEVICE, ... with the detail of what went wrong.
 */
int aeg_load_wait(aeg_load_t *load, int timeout_ms);

/*
 * aeg_load_wait_chunk - wait for chunk @index: 0, AEG_ETIMEDOUT, the load's
 * error for a chunk that will never load, AEG_ENOENT for a released chunk,
 * AEG_EINVAL for an index out of range.
 */
int aeg_load_wait_chunk(aeg_load_t *load, uint32_t index, int timeout_ms);

struct aeg_load_progress {
	uint64_t total_bytes;           /* bytes to copy (a safetensors file: its data) */
	uint64_t done_bytes;
	uint32_t chunks;
	uint32_t done_chunks;
	uint32_t released_chunks;       /* released by id, or all: no longer on the GPU */
	enum aeg_prefetch_feed feed;    /* the feed used (MMAP may turn to READ) */
	int status;                     /* AEG_EBUSY while loading, then 0 or the error */
	uint64_t start_ns;              /* CLOCK_MONOTONIC at aeg_prefetch_file */
	uint64_t first_chunk_ns;        /* when chunk 0 landed; 0 before */
	uint64_t end_ns;                /* when the load stopped; 0 before */
};

/*
 * aeg_load_progress - where @load stands, taken under the engine's lock (a
 * consistent snapshot); callable from any thread while the load runs.
 * AEG_EINVAL for NULL arguments.
 */
int aeg_load_progress(aeg_load_t *load, struct aeg_load_progress *progress);

/*
 * aeg_load_cancel - stop the load: no new copies start, those in flight
 * finish, chunks not loaded fail with AEG_ECANCELED (their waits return it,
 * never hang). Blocks and events stay until released. Returns at once;
 * aeg_load_wait then returns AEG_ECANCELED (or 0 if it had finished).
 */
int aeg_load_cancel(aeg_load_t *load);

/*
 * aeg_load_release - free every block and event of @load still held; a
 * load in flight is cancelled and waited for first. The handle stays open
 * (aeg_load_close drops it); releasing twice does nothing.
 */
int aeg_load_release(aeg_load_t *load);

/*
 * aeg_load_close - drop the caller's handle. The chunks stay on the GPU
 * until released (by id or all); an unfinished load goes on.
 */
void aeg_load_close(aeg_load_t *load);

/* aeg_load_dup - another handle on @load (closed with aeg_load_close); returns @load. Thread-safe. */
aeg_load_t *aeg_load_dup(aeg_load_t *load);

/*
 * aeg_prefetch_release - release the chunks of the blocks @ids: free the
 * blocks and destroy the chunks' events. All ids are checked first: an id
 * no chunk of this engine holds is AEG_ENOENT, a chunk of a load still in
 * flight AEG_EBUSY (cancel it first); then nothing is released.
 */
int aeg_prefetch_release(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count);

/*
 * aeg_prefetch_release_wait - aeg_prefetch_release that first waits, at
 * most @timeout_ms (< 0: no limit; 0: not at all, AEG_EBUSY), for loads in
 * flight holding any of @ids to stop. AEG_ETIMEDOUT releases nothing.
 */
int aeg_prefetch_release_wait(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count, int timeout_ms);

/* aeg_prefetch_release_all - cancel loads in flight, wait for them, release every chunk. */
int aeg_prefetch_release_all(aeg_prefetch_t *pf);

struct aeg_prefetch_stats {
	uint32_t loads;                 /* loads holding chunks or handles */
	uint32_t loads_in_flight;
	uint64_t chunks;                /* chunks held */
	uint64_t events;                /* events held (one per chunk) */
	uint64_t blocks;                /* slab blocks held */
	uint64_t block_bytes;
	uint32_t ring_in_use;           /* READ buffers in flight */
	uint32_t registered_pieces;     /* MMAP pieces registered now */
	uint64_t cache_entries;
	uint64_t cache_bytes;           /* pool bytes the cache holds */
	uint64_t cache_hits;
	uint64_t cache_misses;
	uint64_t cache_evictions;
	uint64_t read_fallbacks;        /* MMAP loads that turned to READ */
};

/*
 * aeg_prefetch_stats - what the engine holds now (loads, chunks, events,
 * blocks, pinned buffers and pieces in flight) and its cache's counts, a
 * consistent snapshot under the engine's lock; everything but the cache's
 * counts is back to 0 once every load is released and closed. AEG_EINVAL
 * for NULL arguments.
 */
int aeg_prefetch_stats(aeg_prefetch_t *pf, struct aeg_prefetch_stats *stats);

/*
 * aeg_prefetch_cache_drop - empty the host model cache (entries in use by a
 * load stay until it ends). Returns the number of entries dropped.
 */
int aeg_prefetch_cache_drop(aeg_prefetch_t *pf);

#ifdef __cplusplus
}
#endif
#endif

/* Prefetch engine internals shared with its tests and the CLI; never installed. */
#ifndef AEGAEON_PREFETCH_INTERNAL_H
#define AEGAEON_PREFETCH_INTERNAL_H

#include <stdint.h>

#include <aegaeon/prefetch.h>

/*
 * A hook a worker calls before it runs item @item (a piece of the file) of
 * load @load_id. A non-zero return fails that item with that code, as a
 * failing read or copy would: tests use it to stop a load at a known point
 * (to change the file under it, cancel it, or inject a device failure).
 * Runs on worker threads, without the engine lock.
 */
typedef int (*aeg_prefetch_hook_fn)(void *arg, uint64_t load_id, uint32_t item);
void aeg_prefetch_set_hook(aeg_prefetch_t *pf, aeg_prefetch_hook_fn fn, void *arg);

/*
 * An engine's own staging ring, ring_buffers buffers of this size (by
 * default AEG_PREFETCH_RING_BUFFERS_PER_THREAD a worker): the engine's when
 * it is given no pool, and the ring a session or an agent without a job
 * pool makes beside the first load. Small buffers, reused at once, are
 * still in the CPU's last-level cache when the copy engines read them, so
 * the read feed's bytes cross host memory once instead of three times: on
 * the H200 machine (300 MiB of L3) 24 x 4 MiB read a file in the page cache
 * at 51 GB/s on a warm engine and 46 GB/s in a fresh process, where
 * 24 x 16 MiB gave 27-35 (fresh) and mixed 29-37. Two a worker, not four:
 * 96 MiB are made in 12 ms beside the load, 192 MiB took 33-43 and the
 * fresh load lost 5 GB/s by it. docs/benchmarks.md.
 */
#define AEG_PREFETCH_RING_BUFFER_BYTES (4ull << 20)
#define AEG_PREFETCH_RING_BUFFERS_PER_THREAD 2

/* aeg_prefetch_ring_buffers - the buffers of the ring an engine of @cfg's settings makes: ring_buffers, or its default. */
int aeg_prefetch_ring_buffers(const struct aeg_prefetch_config *cfg);

/*
 * aeg_prefetch_wait_settled - aeg_prefetch_release_wait's wait alone: until
 * no load holding @ids is in flight, nothing released (so releases across
 * engines can be made all or none). 0, AEG_ENOENT (an id no chunk of this
 * engine holds), AEG_ETIMEDOUT.
 */
int aeg_prefetch_wait_settled(aeg_prefetch_t *pf, const uint64_t *ids, uint32_t count, int timeout_ms);

/* aeg_prefetch_config_check - AEG_EINVAL (the detail names the setting) unless aeg_prefetch_create takes @cfg. */
int aeg_prefetch_config_check(const struct aeg_prefetch_config *cfg);

/*
 * aeg_prefetch_ring_coming - the pool @pf was made to get later
 * (pool_later_buffer_bytes) is its staging ring, being made now: until it
 * comes (tens of ms) AUTO loads read through it, waiting for it, instead
 * of registering pieces, which would hold the ring's own registration up.
 * Should the ring fail, the loads waiting for it register their pieces
 * instead, and later AUTO loads take MIXED. Call before the first load.
 */
void aeg_prefetch_ring_coming(aeg_prefetch_t *pf);

/* aeg_prefetch_item_bytes - the size of the pieces @load is cut into. */
uint64_t aeg_prefetch_item_bytes(const aeg_load_t *load);

/*
 * aeg_prefetch_slab_bytes_for - slab bytes certainly enough to load a file
 * of @file_bytes in chunks of @chunk_bytes (block rounding included), for
 * tools that make a slab just for one file.
 */
uint64_t aeg_prefetch_slab_bytes_for(uint64_t file_bytes, uint64_t chunk_bytes);

/*
 * aeg_prefetch_hold - while held (@hold 1; nested holds count), the workers
 * start no new piece of any load; @hold 0 lets them go. A caller starting
 * the loads of many files holds the engine meanwhile: each start maps its
 * file, and mapping waits for every registration and page population in
 * flight in the process (the kernel's mmap lock), 2-111 ms a shard on the
 * H200 once the first file was loading. AEG_EINVAL for a NULL engine or
 * more releases than holds.
 */
int aeg_prefetch_hold(aeg_prefetch_t *pf, int hold);

/*
 * aeg_prefetch_set_topo - the topology for an engine made without one
 * (cfg.topo NULL): each worker binds itself near the GPU between pieces.
 * A fresh process discovers the topology (14-17 ms on the H200) off its
 * first load's path and hands it over here. AEG_EEXIST when the engine has
 * one already, AEG_EINVAL for NULL arguments.
 */
int aeg_prefetch_set_topo(aeg_prefetch_t *pf, const aeg_topo_t *topo);

/* aeg_prefetch_bound_workers - how many workers bound themselves near the GPU so far. */
uint32_t aeg_prefetch_bound_workers(aeg_prefetch_t *pf);

#endif

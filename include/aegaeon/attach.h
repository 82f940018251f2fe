/* aegaeon job attach: a job step's use of the slabs, pool and loads its node agent owns. */
#ifndef AEGAEON_ATTACH_H
#define AEGAEON_ATTACH_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include <aegaeon/device.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/pinned.h>
#include <aegaeon/slab.h>
#include <aegaeon/slice.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_job aeg_job_t;

/*
 * aeg_job_attach - join the job this process runs in: read $AEGAEON_SOCKET
 * (set by the SPANK plugin in every task), connect to the node's agent,
 * agree on a protocol version, open each slab's memory handle on the GPU
 * this process sees with the same PCI bus id (a GPU the step cannot see is
 * skipped: aeg_job_slab on it is AEG_ENODEV); the pinned pool is mapped
 * at its first use (aeg_job_pool; its memfd comes over the socket). $AEGAEON_SLABS and
 * $AEGAEON_SLAB<i>_HANDLE, when set, must match what the agent says.
 * aeg_job_connect - the same without opening slabs or the pool (for status,
 * prefetch and release from a process that touches no GPU memory).
 * Errors: AEG_ENOENT "not inside an aegaeon job" when $AEGAEON_SOCKET is
 * unset; AEG_EIO (agent gone: the detail names the socket), AEG_EBUSY (all
 * 256 connections of the agent are held by the job's processes), AEG_EPROTO,
 * AEG_EACCES, AEG_EBADF (a slab handle that no longer opens), AEG_EDEVICE.
 * Call after fork, never before: a job must not be shared across fork().
 * A request on a job (waits aside) waits up to 120 s for the agent's
 * answer, then fails with AEG_ETIMEDOUT; the job's connection is out of step
 * after that, and its later requests fail with AEG_EIO: detach and attach
 * again.
 */
int aeg_job_attach(aeg_job_t **job);
int aeg_job_connect(aeg_job_t **job);

/*
 * aeg_job_detach - unmap slabs and pool, destroy the slabs aeg_job_slab
 * gave (their leases end with the connection), close the connection and
 * the device. Every pointer into job memory is invalid afterwards.
 */
void aeg_job_detach(aeg_job_t *job);

/* aeg_job_device - the device this process opened for the job (cuda or host, as the agent's). */
aeg_device_t *aeg_job_device(aeg_job_t *job);

struct aeg_job_info {
	char job_id[64];
	long agent_pid;
	enum aeg_device_kind device;
	int slabs;
	uint64_t pinned_bytes, pinned_buffer;   /* 0 when the job has no pool */
};

struct aeg_job_slab_desc {
	int agent_gpu;                  /* ordinal in the agent's view */
	int gpu;                        /* ordinal in this process, -1 when not visible */
	char pci_bus_id[16];
	uint64_t bytes;
	void *base;                     /* mapped base here; NULL when not opened */
};

/* aeg_job_get_info - what the agent said at connection. */
int aeg_job_get_info(aeg_job_t *job, struct aeg_job_info *info);
/* aeg_job_slab_describe - job slab @index (0..slabs-1); AEG_ENODEV out of range. */
int aeg_job_slab_describe(aeg_job_t *job, int index, struct aeg_job_slab_desc *desc);

/*
 * aeg_job_slab - lease @bytes (0: the largest free range) of job slab
 * @index from the agent and return a slab over them: aeg_slab_alloc and
 * aeg_slab_free on it are local and O(1); its blocks are device memory any
 * process of the job can reach through the job slab's handle. The lease
 * lasts until aeg_job_slab_return, aeg_job_detach, or this process's end.
 * Thread-safe. Errors: AEG_ENODEV (no such slab, or not visible here),
 * AEG_ENOSPC (detail: asked vs free in the job slab), AEG_EIO.
 */
int aeg_job_slab(aeg_job_t *job, int index, uint64_t bytes, aeg_slab_t **slab);

/* aeg_job_slab_return - destroy @slab (from aeg_job_slab) and give its lease back. */
int aeg_job_slab_return(aeg_job_t *job, aeg_slab_t *slab);

/*
 * aeg_job_pool - the job's pinned pool mapped here: mapped at the first call
 * (the agent makes the pool after the job's start, so that call may wait
 * for it). NULL when the job has none, for aeg_job_connect, or when it
 * could not be mapped (the error detail says why). Thread-safe.
 */
aeg_pool_t *aeg_job_pool(aeg_job_t *job);

/* A chunk of a load, placed in this process. */
struct aeg_job_chunk {
	void *ptr;                      /* device pointer here; NULL when the slab is not opened */
	uint64_t offset;                /* from the job slab's base */
	uint64_t size;
	uint64_t file_offset;
	uint64_t slab_id;               /* block id in the job slab: what aeg_job_release takes */
	aeg_handle_t event;             /* complete once the bytes are there (aeg_event_wait_handle) */
};

struct aeg_job_load {
	uint64_t load_id;
	int slab;                       /* job slab index */
	int status;                     /* 0 loaded, AEG_EBUSY loading, or the load's error */
	uint64_t file_bytes, done_bytes;
	uint32_t count;
	struct aeg_job_chunk *chunks;
	char *detail;                   /* a failed load: why, as the agent said; else NULL */
	struct aeg_slice *slice;        /* a sliced load's spec (chunks hold the rank's parts); NULL: whole */
};

/*
 * aeg_job_prefetch - ask the agent to load @path (made absolute here) into
 * job slab @index in chunks of @chunk_bytes (0: the site's default). The
 * agent opens the file as the job user, and keeps the load until it is
 * released; it keeps at most the site's max_loads (AEG_ERANGE past that). Returns at once with every chunk
 * (*@load, free with aeg_job_load_free); wait on a chunk's event before
 * reading it, and check status for a load that failed.
 * aeg_job_chunks - the chunks of load @load_id, or (@load_id 0) of the
 * newest load of @path into slab @index: how a later step finds what an
 * earlier step or the job's --aegaeon-prefetch loaded. AEG_ENOENT when
 * there is none, AEG_ESTALE when the file changed since.
 * Both: AEG_ENOENT/AEG_EACCES (the file), AEG_ENOSPC, AEG_EFORMAT, AEG_EIO.
 */
int aeg_job_prefetch(aeg_job_t *job, const char *path, int index, uint64_t chunk_bytes,
		     struct aeg_job_load **load);
int aeg_job_chunks(aeg_job_t *job, uint64_t load_id, const char *path, int index,
		   struct aeg_job_load **load);

/*
 * aeg_job_prefetch_slice, aeg_job_chunks_slice - the same for a rank's
 * tensor-parallel slice of a safetensors file (@slice NULL: the whole
 * file, as above). Finding by path matches a load of the same file with
 * an equal spec only: aeg_job_chunks by path finds whole loads alone.
 * AEG_EINVAL for a spec aeg_slice_check refuses, or one the file's
 * tensors do not allow (the agent's detail names the tensor).
 */
int aeg_job_prefetch_slice(aeg_job_t *job, const char *path, int index, uint64_t chunk_bytes,
			   const struct aeg_slice *slice, struct aeg_job_load **load);
int aeg_job_chunks_slice(aeg_job_t *job, const char *path, int index, const struct aeg_slice *slice,
			 struct aeg_job_load **load);
void aeg_job_load_free(struct aeg_job_load *load);

/*
 * aeg_job_wait - wait until load @load_id has stopped: 0 once every chunk
 * is on the GPU, the load's error with its detail, AEG_ETIMEDOUT after
 * @timeout_ms (< 0: no limit), AEG_ENOENT for a load the agent does not
 * hold. One round trip for the whole load, on a connection of its own (one
 * is kept per process and reused), so other calls on @job go on meanwhile.
 * Thread-safe.
 */
int aeg_job_wait(aeg_job_t *job, uint64_t load_id, int timeout_ms);

/* The most ids one aeg_job_release call takes (one protocol frame). */
#define AEG_JOB_RELEASE_MAX 4096

/*
 * aeg_job_release - free the chunks of blocks @ids of job slab @index (and
 * their events), 1 to AEG_JOB_RELEASE_MAX of them. All ids are checked first: an id no chunk holds is
 * AEG_ENOENT, one of a load still in flight AEG_EBUSY; then none is freed.
 * aeg_job_release_load - free every chunk of load @load_id and forget the
 * load, also one with no chunk (an empty file): AEG_ENOENT for no such
 * load, AEG_EBUSY while it still loads (wait for it, or release all).
 * aeg_job_release_all - cancel every load and free every chunk of the job.
 * @released (may be NULL) gets the number of blocks freed.
 */
int aeg_job_release(aeg_job_t *job, int index, const uint64_t *ids, size_t count,
		    uint32_t *released);
int aeg_job_release_load(aeg_job_t *job, uint64_t load_id, uint32_t *released);
int aeg_job_release_all(aeg_job_t *job, uint32_t *released);

struct aeg_job_slab_status {
	int agent_gpu;
	struct aeg_slab_stats stats;    /* of the whole job slab */
	uint32_t leases;                /* held by all steps */
	uint64_t lease_bytes;
};

struct aeg_job_load_status {
	uint64_t load_id;
	int slab;
	int status;
	uint64_t file_bytes, done_bytes;
	uint32_t chunks;
	char path[AEG_PATH_MAX];
	/*
	 * A tensor-parallel slice (aegaeon/slice.h): its rank, world size (0
	 * for a whole load), preset, flags and number of rules; the rules
	 * themselves: aeg_model_slice of the load (aeg_session_find_id).
	 */
	int slice_rank, slice_world;
	enum aeg_slice_preset slice_preset;
	unsigned slice_flags;
	uint32_t slice_rules;
};

struct aeg_job_status {
	int slabs;
	struct aeg_job_slab_status slab[AEG_JOB_MAX_GPUS];
	int has_pool;
	struct aeg_pool_stats pool;
	uint32_t clients;               /* connections to the agent, this one included */
	uint32_t loads;
	struct aeg_job_load_status *load;       /* loads entries, oldest first */
};

/* aeg_job_status - a snapshot of the agent's state; free with aeg_job_status_free. */
int aeg_job_status(aeg_job_t *job, struct aeg_job_status **status);
void aeg_job_status_free(struct aeg_job_status *status);

/* aeg_job_shutdown - ask the agent to stop (it frees everything); the job is unusable after. */
int aeg_job_shutdown(aeg_job_t *job);

#ifdef __cplusplus
}
#endif
#endif

/* aegaeon sessions: one way to load, find, view and release models, inside a job or not. */
#ifndef AEGAEON_SESSION_H
#define AEGAEON_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include <aegaeon/attach.h>
#include <aegaeon/device.h>
#include <aegaeon/prefetch.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A session is where a process loads models. Inside a job it is backed by
 * the node's agent (the job's slabs, pool and engines, warm since job
 * start; models outlive the process and later steps find them); outside
 * one it owns a slab and a prefetch engine per GPU, made once, at the first
 * load or by aeg_session_prepare, and kept until the session closes, so
 * releasing a model is bookkeeping and the next load pays no set-up. The
 * Python module, aegaeon-cli and C programs all load through a session.
 */
typedef struct aeg_session aeg_session_t;
typedef struct aeg_model aeg_model_t;

enum aeg_session_mode {
	AEG_SESSION_AUTO = 0,   /* JOB when $AEGAEON_SOCKET is set, else LOCAL */
	AEG_SESSION_LOCAL = 1,  /* this process's own slabs and engines */
	AEG_SESSION_JOB = 2,    /* the job's agent */
};

/* aeg_session_mode_name - "auto", "local", "job". */
const char *aeg_session_mode_name(enum aeg_session_mode mode);

/* Session settings; zero-initialised is the defaults. */
#define AEG_SESSION_CONNECT_ONLY 0x1u   /* JOB: map neither slabs nor pool (no GPU memory touched) */
#define AEG_SESSION_DEVICE_SET 0x2u     /* LOCAL: use @device, not $AEGAEON_DEVICE or the config */
struct aeg_session_config {
	enum aeg_session_mode mode;
	unsigned flags;                 /* AEG_SESSION_* */
	enum aeg_device_kind device;    /* with AEG_SESSION_DEVICE_SET */
	/*
	 * LOCAL: each GPU's slab, a size or a percentage of the memory free
	 * when it is made ("8GiB", "90%"). NULL: $AEGAEON_PREFETCH_SLAB, else
	 * the config's slab_default.
	 */
	const char *slab;
	/* LOCAL: each GPU's slab in bytes, exactly (a tool sizing it for one file); 0: @slab. */
	uint64_t slab_bytes;
	/* LOCAL: the engines' settings; NULL: defaults with the config's prefetch_threads. */
	const struct aeg_prefetch_config *engine;
	/* LOCAL: a pinned pool per engine for its ring and host model cache (0: a private ring only). */
	uint64_t pool_bytes;
	uint64_t pool_buffer_bytes;     /* 0: 32 MiB */
};

/*
 * aeg_session_open - a session as @cfg (NULL: defaults) says. Reads the
 * site configuration ($AEGAEON_CONFIG or the default file); LOCAL opens the
 * device (set, else $AEGAEON_DEVICE, else the config's); JOB attaches to the
 * agent (aeg_job_attach, or aeg_job_connect with CONNECT_ONLY). Nothing
 * else is made yet. Errors: those of aeg_config_load, aeg_device_open and
 * aeg_job_attach (AEG_ENOENT "not inside an aegaeon job" for JOB without
 * $AEGAEON_SOCKET), AEG_EINVAL (a bad setting), AEG_ENOMEM.
 */
int aeg_session_open(const struct aeg_session_config *cfg, aeg_session_t **s);

/*
 * aeg_session_close - close every model handle still open, then: LOCAL
 * cancels loads, frees every chunk, the engines, slabs and pools; JOB
 * detaches (the agent keeps every model: later steps find them). Pointers
 * into session memory are invalid afterwards.
 */
void aeg_session_close(aeg_session_t *s);

enum aeg_session_mode aeg_session_mode(const aeg_session_t *s);   /* LOCAL or JOB */
aeg_device_t *aeg_session_device(aeg_session_t *s);
/* aeg_session_job - the job behind a JOB session (slab leases, pool), NULL for LOCAL. */
aeg_job_t *aeg_session_job(aeg_session_t *s);
/* aeg_session_gpu_count - GPUs a model can be loaded onto: this process's (LOCAL) or the job's slabs seen here (JOB). */
int aeg_session_gpu_count(aeg_session_t *s);

/*
 * aeg_session_prepare - make now what the first load onto @gpu would make
 * (LOCAL: the slab, the engine with its streams and threads, the topology)
 * and wait for its staging ring, so that load pays none of it. Without it,
 * the first load makes the engine and the ring is made beside it: loads
 * map their files (the MMAP feed) until it is there. The rest of the slab's
 * memory is mapped once no load of the process runs: prepare waits for
 * that only while none runs, never for loads, and the session's other
 * calls go on meanwhile. JOB: nothing to make (the agent's engines are
 * warm); checks @gpu. Thread-safe; idempotent.
 * Errors: AEG_ENODEV (no such GPU), AEG_EINVAL (the slab setting gives
 * under 1 MiB), and those of aeg_slab_create and aeg_prefetch_create.
 */
int aeg_session_prepare(aeg_session_t *s, int gpu);

/*
 * aeg_session_warm_up - for a process that will load outside a job but
 * first does other things (imports, its CUDA context): start faulting in,
 * on a thread of its own, the memory of the staging ring that the first
 * engine of a session opened with @cfg (NULL: defaults) makes, so the
 * ring is ready when the first load comes instead of being made beside it
 * (7-15 ms of a fresh process's first load on the H200 machines). Opens
 * no device and touches no GPU. The memory (98 MiB with the default 12
 * prefetch threads) is held until a ring of its size takes it; a ring of
 * another size, a LOCAL session closing, or a later warm-up for another
 * size gives it back; a process that never loads holds it until it ends.
 * Its pages go where the process runs: on a machine of several NUMA nodes
 * the ring takes them only if that is its GPU's node (a process bound near
 * its GPU). Nothing is made inside a job (@cfg's mode, or AUTO with
 * $AEGAEON_SOCKET set), with a pool in @cfg, with $AEGAEON_RING_AHEAD=0,
 * where the ring would use 2 MiB huge pages ($AEGAEON_PINNED_HUGEPAGES
 * "always", or enough reserved), or when the site config cannot be read,
 * the memory is not available or it is held already. Thread-safe.
 * Errors: AEG_EINVAL ($AEGAEON_RING_AHEAD not 0 or 1).
 */
int aeg_session_warm_up(const struct aeg_session_config *cfg);

/*
 * aeg_session_set_engine - LOCAL: the slab size (as in aeg_session_config;
 * NULL: the default) and engine settings (NULL: defaults) of engines made
 * from now on. Engines that hold no load are dropped, so the next load
 * makes one with these settings. AEG_EBUSY while an engine holds a load
 * (release them first; nothing is changed), AEG_EINVAL for a JOB session.
 */
int aeg_session_set_engine(aeg_session_t *s, const char *slab, const struct aeg_prefetch_config *engine);

/* Load flags. */
#define AEG_LOAD_REUSE 0x1u     /* a resident, unchanged load of the same file onto the same GPU is returned instead */
#define AEG_LOAD_NO_CACHE 0x2u  /* LOCAL: neither use nor fill the host model cache */

struct aeg_load_request {
	const char *path;
	int gpu;                        /* as this process numbers GPUs; -1: the first (JOB: the job's first slab) */
	uint64_t chunk_bytes;           /* 0: the config's prefetch_chunk (JOB: the agent's) */
	/*
	 * JOB: the agent chunks a file by its content (AUTO); SAFETENSORS is
	 * then checked here, and a file that is not one is given back to the
	 * agent and AEG_EFORMAT; RAW gives no tensor table, but a safetensors
	 * file's chunks are still the agent's, by tensor.
	 */
	enum aeg_prefetch_format format;
	enum aeg_prefetch_feed feed;    /* LOCAL; a JOB's agent always picks (AUTO) */
	unsigned flags;                 /* AEG_LOAD_* */
	/*
	 * A tensor-parallel rank's part of each tensor (aegaeon/slice.h), for
	 * every file of the model; NULL: whole. Reuse takes a load with an
	 * equal spec only. Copied; the tensor table has the parts' shapes.
	 */
	const struct aeg_slice *slice;
};

/*
 * aeg_session_load - start loading a file and return at once with @m, its
 * chunks usable (wait before reading them). JOB: the agent loads it into
 * the job slab of the GPU, so it outlives this process. With
 * AEG_LOAD_REUSE a model already resident (loaded or loading, file
 * unchanged) is returned instead, not owned (aeg_model_owned 0).
 * Thread-safe. Errors: AEG_EINVAL (a bad request; chunk_bytes not a
 * multiple of 4096; a slice aeg_slice_check refuses or the model's tensors
 * do not allow), AEG_ENODEV (@gpu), those of aeg_prefetch_file and
 * aeg_job_prefetch.
 */
int aeg_session_load(aeg_session_t *s, const struct aeg_load_request *req, aeg_model_t **m);

/*
 * aeg_session_find - the newest resident model of @path on @gpu (-1: LOCAL
 * GPU 0, JOB the first of the job's slabs holding one): a JOB's agent's (another step's, the job's --aegaeon-prefetch),
 * or one this LOCAL session loaded and has not released. Not owned.
 * Whole loads only: a slice is found by loading it with AEG_LOAD_REUSE.
 * AEG_ENOENT when there is none, AEG_ESTALE when the file changed since.
 */
int aeg_session_find(aeg_session_t *s, const char *path, int gpu, aeg_model_t **m);

/*
 * aeg_session_find_id - a JOB's load by the agent's id (what aegaeon-cli
 * status lists), or a LOCAL session's by aeg_model_id. Not owned.
 */
int aeg_session_find_id(aeg_session_t *s, uint64_t id, aeg_model_t **m);

/*
 * aeg_session_release - free the chunks of blocks @ids (from the models'
 * chunks' slab_id) on @gpu (-1: wherever this session's models hold them;
 * a JOB session with one slab also takes ids it did not load). Waits at
 * most @timeout_ms (< 0: no limit) for a load still in flight that holds
 * one. All ids are checked first: an id no chunk holds is AEG_ENOENT,
 * ETIMEDOUT leaves the load running; then nothing is freed, ids on several
 * GPUs included (every load holding one is waited for before any is
 * freed), so the same call can be made again. Repeated ids count once.
 * @released (may be NULL) gets the number of blocks freed.
 */
int aeg_session_release(aeg_session_t *s, int gpu, const uint64_t *ids, size_t count,
			int timeout_ms, uint32_t *released);

/*
 * aeg_session_release_all - cancel and free the models this session owns
 * (LOCAL: every chunk on every GPU; the slabs and engines stay). With
 * AEG_RELEASE_JOB a JOB session frees every model of the job, other
 * steps' too. @released (may be NULL) gets the number of blocks freed.
 */
#define AEG_RELEASE_JOB 0x1u
int aeg_session_release_all(aeg_session_t *s, unsigned flags, uint32_t *released);

/*
 * aeg_session_engine_stats - a LOCAL session's engine on @gpu: its stats,
 * and (may be NULL) its slab's bytes. AEG_ENOENT while none is made, and
 * for a JOB session (the agent's engines: aeg_job_status).
 */
int aeg_session_engine_stats(aeg_session_t *s, int gpu, struct aeg_prefetch_stats *stats,
			     uint64_t *slab_bytes);

/*
 * aeg_session_owned_blocks - blocks this session's own loads hold: a JOB
 * session's (what release_all frees), a LOCAL session's engines' blocks.
 */
uint64_t aeg_session_owned_blocks(aeg_session_t *s);

/*
 * aeg_session_locate - the GPU (as this process numbers them) whose loaded
 * memory holds [@ptr, @ptr + @bytes): LOCAL, inside live block @slab_id of
 * a GPU's slab; JOB, inside a job slab mapped here. AEG_ENOENT otherwise.
 */
int aeg_session_locate(aeg_session_t *s, uint64_t ptr, uint64_t bytes, uint64_t slab_id, int *gpu);

/* ----------------------------------------------------------------- models */

/* aeg_model_id - the engine's load id (LOCAL) or the agent's (JOB). */
uint64_t aeg_model_id(const aeg_model_t *m);
/* aeg_model_path - the file, made absolute. */
const char *aeg_model_path(const aeg_model_t *m);
/* aeg_model_gpu - the GPU as this process numbers it; -1 for a JOB slab not visible here. */
int aeg_model_gpu(const aeg_model_t *m);
/* aeg_model_job_slab - the job slab holding a JOB model (its index), -1 for a LOCAL one. */
int aeg_model_job_slab(const aeg_model_t *m);
/*
 * aeg_model_owned - 1 when this session started the load, of any of its files
 * for a model of several (aeg_session_release_all frees those).
 */
int aeg_model_owned(const aeg_model_t *m);
/* aeg_model_slice - the model's slice spec, NULL when it is loaded whole. Valid until closed. */
const struct aeg_slice *aeg_model_slice(const aeg_model_t *m);

/*
 * aeg_model_file_count, aeg_model_file - the files of the model: one, or a
 * directory's or shard index's shards in load order; a chunk's and a
 * tensor's "file" field index them. NULL for an index out of range.
 */
uint32_t aeg_model_file_count(const aeg_model_t *m);
const char *aeg_model_file(const aeg_model_t *m, uint32_t index);
/*
 * aeg_model_file_id - the load id of file @index of the model (0 for an
 * index out of range): a model of several files is one load per file, so
 * waiting for or releasing a load by id (aegaeon-cli wait, release --load)
 * takes that file only. aeg_model_id is the first file's.
 */
uint64_t aeg_model_file_id(const aeg_model_t *m, uint32_t index);

/*
 * aeg_model_chunks - the chunks in file order (a model of several files: each
 * file's in turn); device_ptr is this process's
 * pointer (NULL where the slab is not mapped here: a CONNECT_ONLY session,
 * a GPU not visible). Valid until the model is closed.
 */
const struct aeg_chunk *aeg_model_chunks(const aeg_model_t *m, uint32_t *count);

/*
 * aeg_model_tensors - the safetensors table in file order with this
 * process's device pointers (0 tensors for a raw file). Valid until closed.
 */
const struct aeg_tensor *aeg_model_tensors(const aeg_model_t *m, uint32_t *count);

/* aeg_model_metadata - the safetensors "__metadata__" pairs, as aeg_load_metadata. */
uint32_t aeg_model_metadata(const aeg_model_t *m, const char *const **keys, const char *const **values);

/*
 * aeg_model_wait - wait until every byte is on the GPU or the load stopped
 * (JOB: one request to the agent, not one per chunk). 0, AEG_ETIMEDOUT, or
 * the load's error with its detail (the file, the byte range, errno).
 * aeg_model_wait_chunk - the same for chunk @index (its event).
 */
int aeg_model_wait(aeg_model_t *m, int timeout_ms);
int aeg_model_wait_chunk(aeg_model_t *m, uint32_t index, int timeout_ms);

/*
 * aeg_model_wait_tensor - wait for the chunks holding tensor @name only, so
 * a model can use its first layers while later ones load. AEG_ENOENT for a
 * name the model has no tensor of; else as aeg_model_wait_chunk.
 */
int aeg_model_wait_tensor(aeg_model_t *m, const char *name, int timeout_ms);

/* aeg_model_progress - bytes and chunks done, feed and status (AEG_EBUSY while loading). */
int aeg_model_progress(aeg_model_t *m, struct aeg_load_progress *progress);

/*
 * aeg_model_release - free the model's chunks (a load still in flight is
 * cancelled first) and close @m. A model not owned is released too: it is
 * then gone for every user of it.
 */
int aeg_model_release(aeg_model_t *m);

/* aeg_model_close - drop the handle; the chunks stay until released. */
void aeg_model_close(aeg_model_t *m);

#ifdef __cplusplus
}
#endif
#endif

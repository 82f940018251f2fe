/* The session's and its models' insides, shared by session.c and model.c (never installed). */
#ifndef AEGAEON_SESSION_INTERNAL_H
#define AEGAEON_SESSION_INTERNAL_H

#include <limits.h>
#include <pthread.h>
#include <stdint.h>

#include <aegaeon/session.h>

#include "safetensors.h"
#include "slice_plan.h"

/* A LOCAL session's engine on one GPU, made at its first use and kept. */
struct sess_gpu {
	aeg_slab_t *slab;
	aeg_pool_t *pool;
	aeg_prefetch_t *pf;
	/*
	 * The engine's staging ring, made by a thread of its own once the
	 * first load has started (ring_go): @ring_pending buffers until then;
	 * while @starting_many, a load of many files is starting them all.
	 */
	pthread_t ring_thread;
	int ring_thread_started;
	int ring_pending;
	int starting_many;
	int bind_later;                 /* the ring's thread finds the topology for the workers */
	int closing;                    /* the ring's thread waits for nothing more */
	aeg_device_t *dev;              /* the session's, and this engine's GPU: set when it is made */
	int gpu;
	uint64_t ring_bytes;
	aeg_session_t *s;
	/*
	 * The ring's threads started, those whose ring is made (with the
	 * topology), and those done (the slab mapped too), under the session's
	 * ring_lock; never reset, so a prepare waiting for one of them sees it
	 * end even when the engine is dropped meanwhile.
	 */
	struct ring_count {
		unsigned started, made, done;
	} rings;
};

/* Blocks a JOB session loaded, per job slab, and their loads: what release_all frees. */
struct owned_block {
	uint64_t id, load;
};

struct idset {
	struct owned_block *b;
	size_t n, cap;
};

struct aeg_model {
	aeg_session_t *s;
	struct aeg_model *prev, *next;  /* the session's open models */
	uint64_t id;
	int gpu;
	int slab;                       /* JOB: the job slab's index */
	int owned;
	int settled;                    /* JOB: the agent said every chunk is there */
	char path[PATH_MAX];
	aeg_load_t *load;               /* LOCAL */
	struct aeg_job_load *jl;        /* JOB */
	struct aeg_chunk *chunks;       /* JOB: jl's chunks as engine chunks */
	uint32_t nchunks;
	struct aeg_tensor *tensors;     /* JOB: from hdr */
	uint32_t ntensors;
	struct aeg_st_header hdr;
	struct slice_plan plan;         /* JOB: a sliced load's parts, as the agent planned them */
	struct aeg_model **parts;       /* a model of several files: one model each */
	uint32_t nparts;
};

struct aeg_session {
	enum aeg_session_mode mode;
	struct aeg_config cfg;
	char slab_spec[64];
	uint64_t slab_exact;            /* aeg_session_config's slab_bytes */
	struct aeg_prefetch_config engine;
	uint64_t pool_bytes, pool_buffer_bytes;
	aeg_device_t *dev;
	aeg_job_t *job;
	int ngpus;
	const aeg_topo_t *topo;
	int topo_tried;
	pthread_mutex_t lock;           /* guards gpus' set-up, the model list and owned */
	/*
	 * What aeg_session_prepare waits on: the ring's threads say here how
	 * far they are (gpus' rings). Never the lock above: prepare waits
	 * without it, and set_engine joins a ring's thread holding it.
	 */
	pthread_mutex_t ring_lock;
	pthread_cond_t ring_cond;       /* on CLOCK_MONOTONIC */
	struct sess_gpu *gpus;
	struct aeg_model *models;
	struct idset owned[AEG_JOB_MAX_GPUS];
};

/*
 * Model records (model.c). A model of several files (a directory or shard
 * index) holds one part per file, each a model of its own; its chunks and
 * tensors are the parts' in file order.
 */
struct aeg_model *model_new(aeg_session_t *s, const char *path, int gpu, int owned);
void model_link(struct aeg_model *m);           /* on the session's list; its lock held */
void model_unlink(struct aeg_model *m);         /* its lock held */
void model_free(struct aeg_model *m);
/* A model of @nparts loaded or found files (taken over; on error freed, the owned ones released); not linked. */
int model_compose(aeg_session_t *s, const char *path, struct aeg_model **parts, uint32_t nparts,
		  struct aeg_model **out);

/* model_release_chunks - free a one-file model's chunks (a JOB load is waited for first); the record stays. */
int model_release_chunks(struct aeg_model *m);

/* session_check_gpu - AEG_ENODEV unless @gpu is one of the session's. */
int session_check_gpu(const aeg_session_t *s, int gpu);
/* session_job_slab - JOB: the job slab on this process's GPU @gpu (-1: the first). */
int session_job_slab(aeg_session_t *s, int gpu, int *index);
/* session_job_load - JOB: aeg_session_load of one file through the job's agent (session_job.c). */
int session_job_load(aeg_session_t *s, const struct aeg_load_request *req, aeg_model_t **out);
/* session_job_find - JOB: the job's load @id, or the newest of @path on @gpu (-1: any slab), as a model. */
int session_job_find(aeg_session_t *s, uint64_t id, const char *path, int gpu, aeg_model_t **out);

/*
 * Forget blocks @ids of job slab @slab as this JOB session's own (released:
 * release_all no longer frees them); its lock held. The session's files and
 * model.c release blocks: here, so that model.c, which the session's files
 * call, calls nothing of theirs.
 */
static inline void disown_blocks(aeg_session_t *s, int slab, const uint64_t *ids, size_t n)
{
	struct idset *set = &s->owned[slab];

	for (size_t i = 0; i < n; i++) {
		for (size_t k = 0; k < set->n; k++) {
			if (set->b[k].id == ids[i]) {
				set->b[k] = set->b[--set->n];
				break;
			}
		}
	}
}

#endif

/* The per-job agent's server: slabs, pool, loads and the socket, run by aegaeond. */
#ifndef AEGAEON_AGENT_H
#define AEGAEON_AGENT_H

#include <limits.h>
#include <stdint.h>

#include <aegaeon/config.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/size.h>

#define AEG_AGENT_MAX_CLIENTS 256
#define AEG_AGENT_MAX_LOADS AEG_CONFIG_DEFAULT_MAX_LOADS
#define AEG_AGENT_HELLO_TIMEOUT_MS AEG_CONFIG_DEFAULT_HELLO_TIMEOUT_MS
#define AEG_AGENT_JOB_ID_MAX 64

struct aeg_agent_config {
	char job_id[AEG_AGENT_JOB_ID_MAX];      /* for logs and hello replies */
	char runtime_dir[PATH_MAX];             /* JOBDIR: a directory of ours, 0700 */
	int gpus[AEG_JOB_MAX_GPUS];             /* ordinals as this process sees them */
	int gpu_count;
	struct aeg_size_spec slab;              /* per GPU; percentages of its memory; 0: no slab */
	uint64_t pinned_bytes;                  /* 0: no pool */
	uint64_t pinned_buffer_bytes;
	char **prefetch;                        /* absolute paths loaded at start */
	int prefetch_count;
	enum aeg_device_kind device;
	uint64_t prefetch_chunk_bytes;          /* default chunk size of loads */
	int prefetch_threads;                   /* per engine (slab); 0: the engine's default */
	int max_clients;                        /* 0: AEG_AGENT_MAX_CLIENTS */
	uint32_t max_loads;                     /* loads kept at once; 0: AEG_AGENT_MAX_LOADS */
	int hello_timeout_ms;                   /* for a new connection's first byte; 0: AEG_AGENT_HELLO_TIMEOUT_MS */
	struct aeg_size_spec model_cache;       /* host model cache in the pool; percentages of it */
	/*
	 * The site's caps (slab_max, pinned_max), checked again here: a slab
	 * given in bytes against a cap in percent (or the reverse) can only be
	 * compared once the GPU's memory is known. slab_max all zero: no cap.
	 */
	struct aeg_size_spec slab_max;
	uint64_t pinned_max_bytes;
};

/*
 * aeg_agent_run - be the job's agent until @stop_fd (a signalfd, eventfd or
 * pipe) becomes readable or a client asks for shutdown: write agent.pid,
 * reserve the slabs and the pool, start the prefetch loads, listen on
 * agent.sock (0600), write the ready record, serve; then stop the loads,
 * disconnect the clients, free everything and remove the socket, pid and
 * ready files (never the directory, which is the plugin's).
 * On a start-up failure the error record holds the reason and that error
 * is returned. Runs its own threads; call it once per process.
 */
int aeg_agent_run(const struct aeg_agent_config *cfg, int stop_fd);

/*
 * aeg_agent_write_error - log @reason and write it as the error record in
 * @runtime_dir for the plugin to show the user. Used for failures found
 * before aeg_agent_run, such as bad options, too. Writes only into a 0700
 * directory of this process's uid, as aeg_agent_run runs only in one:
 * otherwise AEG_EPERM (or AEG_ENOENT, AEG_EINVAL) and nothing written.
 */
int aeg_agent_write_error(const char *runtime_dir, const char *reason);

#endif

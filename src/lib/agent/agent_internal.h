/* The per-job agent's state, shared by its files: agent.c (start-up, clients, serve loop), agent_loads.c. */
#ifndef AEGAEON_AGENT_INTERNAL_H
#define AEGAEON_AGENT_INTERNAL_H

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/prefetch.h>

#include "agent.h"
#include "proto.h"

#define GONE_MAX 64                     /* disconnected client processes watched for their exit */

struct client;
struct load;                            /* agent_loads.c */

struct agent_slab {
	int gpu;
	char pci_bus_id[AEG_PCI_BUS_ID_LEN];
	aeg_slab_t *slab;
	aeg_prefetch_t *pf;
	/* Without a job pool: the engine's staging ring, made at its first load (agent_ring_start). */
	aeg_pool_t *ring;
	pthread_t ring_thread;
	int ring_asked;                 /* agent_ring_start came (with the agent's lock) */
	int ring_thread_started;        /* and its thread runs, to be joined */
	struct agent *agent;            /* for the ring's thread */
	aeg_handle_t handle;
	uint32_t leases;
	uint64_t lease_bytes;
};

struct agent {
	const struct aeg_agent_config *cfg;
	aeg_device_t *dev;
	struct agent_slab slabs[AEG_JOB_MAX_GPUS];
	int nslabs;
	/*
	 * The pool is made by its own thread after the ready record, so no step
	 * and no job-start load waits for its pages: until then pool is NULL,
	 * pool_state POOL_MAKING, and pool_bytes/pool_buffer_bytes what it
	 * will be (every check of its making was done before ready).
	 */
	aeg_pool_t *pool;
	enum { POOL_NONE, POOL_MAKING, POOL_READY, POOL_FAILED } pool_state;
	uint64_t pool_bytes, pool_buffer_bytes;
	char pool_error[512];
	uint64_t ring_bytes;            /* each engine's staging ring without a job pool; 0: none */
	atomic_int pool_stop;           /* set at shutdown: a pool being made stops */
	pthread_t settle_thread;        /* after ready: the topology for the engines, then the pool */
	int settle_thread_started;
	int ready_written;              /* the settling thread may start its work; with lock */
	pthread_cond_t pool_cv;         /* pool_state left POOL_MAKING, ready_written or stopping set; with lock */
	char sock_path[AEG_JOB_SOCKET_MAX];
	char pid_path[PATH_MAX], ready_path[PATH_MAX], error_path[PATH_MAX];
	int listen_fd, wake_fd;
	pthread_mutex_t lock;           /* guards everything below, leases and loads */
	struct client *clients;         /* newest first */
	int nclients;                   /* connections whose thread is not joined yet */
	int npending;                   /* of them, not past their hello and not dropped */
	int ndropped;                   /* of them, dropped to make room, still to join */
	struct load **loads;            /* oldest first, so ids ascend */
	uint32_t nloads, loads_cap;
	uint64_t next_load_id;
	int stopping;
	/*
	 * Processes whose connection closed: once one has exited, the pool
	 * buffers it held are put back (a killed step cannot release them).
	 */
	struct gone {
		pid_t pid;
		uint64_t start, until_ns;
	} gone[GONE_MAX];
	int ngone;
};

/*
 * The connections (agent_clients.c). The serve loop calls agent_accept when
 * the socket has one waiting, agent_reap to join the threads of those that
 * ended (@all: every one, at the end), agent_reclaim_gone to put back the
 * pool buffers of client processes that exited; agent_disconnect_all shuts
 * every connection down (lock held).
 */
void agent_accept(struct agent *a);

/*
 * agent_pool_wait - the job's pool once it is made: waits while it is being
 * made (or the agent stops). AEG_ENOENT for a job without one, the making's
 * error with its detail when it failed. Lock held (the wait releases it).
 */
int agent_pool_wait(struct agent *a, aeg_pool_t **pool);
/*
 * agent_ring_start - without a job pool, start making the staging ring of
 * @slab's engine on a thread of its own, once; called when a load has
 * started there (lock held). A thread that cannot be had is warned about and
 * the engine told no ring comes.
 */
void agent_ring_start(struct agent *a, uint32_t slab);
void agent_reap(struct agent *a, int all);
void agent_reclaim_gone(struct agent *a);
void agent_disconnect_all(struct agent *a);

/*
 * The loads (agent_loads.c), all with a->lock held. Each engine call
 * returns at once: copies run on the engines' threads.
 *
 * agent_load_start - load @path (with @slice: a rank's part of it; NULL:
 * whole) into slab @slab in chunks of @chunk_bytes (0: the site's); the
 * first page of its chunks into @rep (NULL: none).
 * AEG_ERANGE when the job has max_loads loads already.
 * agent_load_chunks - a page of the chunks of the load @q names (by id, or
 * the newest of a path).
 * agent_load_release - free chunks by block id, the chunks of one load (the
 * load goes, even with no chunk), or everything (PROTO_RELEASE_*);
 * @released gets the blocks freed.
 * agent_load_status - page @first of the loads, oldest first, into @p.
 * agent_loads_clear - forget every load (teardown: the engines are gone, so
 * @close_handles is 0).
 */
int agent_load_start(struct agent *a, uint32_t slab, const char *path, uint64_t chunk_bytes,
		     const struct aeg_slice *slice, struct proto_chunks_rep *rep);
int agent_load_chunks(struct agent *a, const struct proto_chunks_req *q, struct proto_chunks_rep *rep);
int agent_load_release(struct agent *a, const struct proto_release_req *q, uint32_t *released);
int agent_load_status(struct agent *a, uint32_t first, struct proto_status_rep *p);
void agent_loads_clear(struct agent *a, int close_handles);

/*
 * agent_load_get - load @id, referenced (NULL when there is none): a
 * wait-load waits on its handle without the lock, and a release meanwhile
 * frees its chunks, not the handle. agent_load_put drops the reference.
 * Both with a->lock held.
 */
struct load *agent_load_get(struct agent *a, uint64_t id);
aeg_load_t *agent_load_handle(const struct load *l);
void agent_load_put(struct load *l);

#endif

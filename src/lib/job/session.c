/* Sessions: one load path for the CLI, the Python module and C callers, local or in a job (session_job.c). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/config.h>
#include <aegaeon/session.h>

#include "internal.h"
#include "model_paths.h"
#include "pinned_internal.h"
#include "prefetch_internal.h"
#include "session_internal.h"
#include "slab_internal.h"
#include "topo_internal.h"

AEG_EXPORT const char *aeg_session_mode_name(enum aeg_session_mode mode)
{
	switch (mode) {
	case AEG_SESSION_AUTO: return "auto";
	case AEG_SESSION_LOCAL: return "local";
	case AEG_SESSION_JOB: return "job";
	}
	return "unknown";
}

/* ------------------------------------------------------------- opening */

static int in_job(void)
{
	const char *sock = getenv("AEGAEON_SOCKET");

	return sock != NULL && sock[0] != '\0';
}

/* LOCAL: the device set, else $AEGAEON_DEVICE, else the config's. */
static int open_local(aeg_session_t *s, const struct aeg_session_config *c)
{
	enum aeg_device_kind kind = s->cfg.device;
	const char *env = getenv("AEGAEON_DEVICE");
	uint64_t t = aeg_now_ns();
	int err;

	if (c->flags & AEG_SESSION_DEVICE_SET) {
		kind = c->device;
	} else if (env != NULL && env[0] != '\0') {
		err = aeg_device_kind_parse(env, &kind);
		if (err)
			return aeg_fail(err, "AEGAEON_DEVICE=\"%s\": expected \"cuda\" or \"host\"", env);
	}
	err = aeg_device_open(&s->dev, kind);
	if (err)
		return err;
	aeg_span_end("device open", t);
	err = aeg_device_count(s->dev, &s->ngpus);
	if (err)
		return err;
	s->gpus = calloc((size_t)(s->ngpus ? s->ngpus : 1), sizeof(*s->gpus));
	return s->gpus ? 0 : aeg_fail(AEG_ENOMEM, "session: out of memory");
}

static int open_job(aeg_session_t *s, const struct aeg_session_config *c)
{
	uint64_t t = aeg_now_ns();
	struct aeg_job_info info;
	int err;

	err = (c->flags & AEG_SESSION_CONNECT_ONLY) ? aeg_job_connect(&s->job) : aeg_job_attach(&s->job);
	if (err)
		return err;
	aeg_span_end(c->flags & AEG_SESSION_CONNECT_ONLY ? "job connect" : "job attach", t);
	s->dev = aeg_job_device(s->job);
	aeg_job_get_info(s->job, &info);
	s->ngpus = info.slabs;
	return 0;
}

/* A local engine's settings: @cfg's, else the defaults with the config's prefetch_threads. */
static void engine_settings(const struct aeg_session_config *c, const struct aeg_config *conf,
			    struct aeg_prefetch_config *engine)
{
	if (c->engine != NULL) {
		*engine = *c->engine;
	} else {
		aeg_prefetch_config_defaults(engine);
		engine->threads = conf->prefetch_threads;
	}
}

/* $AEGAEON_RING_AHEAD=0 turns aeg_session_warm_up off; any other value but 1 is an error. */
static int ring_ahead_wanted(int *wanted)
{
	const char *v = getenv("AEGAEON_RING_AHEAD");
	char q[64];

	*wanted = v == NULL || v[0] == '\0' || strcmp(v, "1") == 0;
	if (*wanted || strcmp(v, "0") == 0)
		return 0;
	return aeg_fail(AEG_EINVAL, "AEGAEON_RING_AHEAD='%s' is not 0 or 1", aeg_quote(v, q, sizeof(q)));
}

AEG_EXPORT int aeg_session_warm_up(const struct aeg_session_config *cfg)
{
	static const struct aeg_session_config defaults;
	const struct aeg_session_config *c = cfg ? cfg : &defaults;
	struct aeg_prefetch_config engine;
	struct aeg_config conf;
	int err, wanted;

	if (c->mode == AEG_SESSION_JOB || (c->mode == AEG_SESSION_AUTO && in_job()) || c->pool_bytes != 0)
		return 0;               /* the agent's engines, or a pool of the caller's: no ring to make */
	err = ring_ahead_wanted(&wanted);
	if (err || !wanted)
		return err;
	/* A config that cannot be read makes nothing here: opening the session says why. */
	if (c->engine == NULL && aeg_config_load(&conf, NULL) != 0)
		return 0;
	engine_settings(c, &conf, &engine);
	if (aeg_prefetch_config_check(&engine) != 0) {
		aeg_error_clear();      /* no such engine: making it says why */
		return 0;
	}
	return aeg_pool_premake(AEG_PREFETCH_RING_BUFFER_BYTES,
				AEG_PREFETCH_RING_BUFFER_BYTES * (uint64_t)aeg_prefetch_ring_buffers(&engine));
}

AEG_EXPORT int aeg_session_open(const struct aeg_session_config *cfg, aeg_session_t **out)
{
	static const struct aeg_session_config defaults;
	const struct aeg_session_config *c = cfg ? cfg : &defaults;
	aeg_session_t *s;
	int err;

	if (out == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_open: NULL argument");
	*out = NULL;
	if (c->mode != AEG_SESSION_AUTO && c->mode != AEG_SESSION_LOCAL && c->mode != AEG_SESSION_JOB)
		return aeg_fail(AEG_EINVAL, "session mode %d: expected auto, local or job", (int)c->mode);
	if (c->slab != NULL && strlen(c->slab) >= sizeof(s->slab_spec))
		return aeg_fail(AEG_EINVAL, "slab size \"%.32s...\" is too long", c->slab);
	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return aeg_fail(AEG_ENOMEM, "session: out of memory");
	pthread_mutex_init(&s->lock, NULL);
	pthread_mutex_init(&s->ring_lock, NULL);
	aeg_cond_init_monotonic(&s->ring_cond);
	err = aeg_config_load(&s->cfg, NULL);
	if (err)
		goto fail;
	s->mode = c->mode != AEG_SESSION_AUTO ? c->mode : in_job() ? AEG_SESSION_JOB : AEG_SESSION_LOCAL;
	if (c->slab != NULL)
		snprintf(s->slab_spec, sizeof(s->slab_spec), "%s", c->slab);
	s->slab_exact = c->slab_bytes;
	engine_settings(c, &s->cfg, &s->engine);
	s->pool_bytes = c->pool_bytes;
	s->pool_buffer_bytes = c->pool_buffer_bytes ? c->pool_buffer_bytes : 32ull << 20;
	err = s->mode == AEG_SESSION_JOB ? open_job(s, c) : open_local(s, c);
	if (err)
		goto fail;
	*out = s;
	return 0;
fail:
	aeg_session_close(s);
	return err;
}

/* Destroy a GPU's engine, pool and slab (its loads' chunks with them). */
static void gpu_free(aeg_session_t *s, struct sess_gpu *g)
{
	struct ring_count rings;

	__atomic_store_n(&g->closing, 1, __ATOMIC_RELEASE);
	if (g->ring_thread_started)
		pthread_join(g->ring_thread, NULL);
	aeg_prefetch_destroy(g->pf);
	if (g->pool)
		aeg_pool_destroy(g->pool);
	if (g->slab)
		aeg_slab_destroy(g->slab);
	/* The counts outlive the engine: a prepare may be waiting on them. */
	pthread_mutex_lock(&s->ring_lock);
	rings = g->rings;
	memset(g, 0, sizeof(*g));
	g->rings = rings;
	pthread_mutex_unlock(&s->ring_lock);
}

AEG_EXPORT void aeg_session_close(aeg_session_t *s)
{
	if (s == NULL)
		return;
	while (s->models != NULL)
		aeg_model_close(s->models);
	for (int i = 0; s->gpus != NULL && i < s->ngpus; i++)
		gpu_free(s, &s->gpus[i]);
	free(s->gpus);
	for (int i = 0; i < AEG_JOB_MAX_GPUS; i++)
		free(s->owned[i].b);
	if (s->job != NULL)
		aeg_job_detach(s->job);         /* closes the device too */
	else if (s->dev != NULL)
		aeg_device_close(s->dev);
	if (s->mode == AEG_SESSION_LOCAL)
		aeg_pool_premade_drop();        /* a ring made ahead that no engine of it took */
	pthread_cond_destroy(&s->ring_cond);
	pthread_mutex_destroy(&s->ring_lock);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

AEG_EXPORT enum aeg_session_mode aeg_session_mode(const aeg_session_t *s)
{
	return s ? s->mode : AEG_SESSION_AUTO;
}

AEG_EXPORT aeg_device_t *aeg_session_device(aeg_session_t *s)
{
	return s ? s->dev : NULL;
}

AEG_EXPORT aeg_job_t *aeg_session_job(aeg_session_t *s)
{
	return s ? s->job : NULL;
}

AEG_EXPORT int aeg_session_gpu_count(aeg_session_t *s)
{
	return s ? s->ngpus : 0;
}

/* ------------------------------------------------------ a local engine */

/* The slab of @gpu: a size, or a percentage of the memory free now (other users keep theirs). */
static int slab_bytes(aeg_session_t *s, int gpu, uint64_t *bytes)
{
	const char *env = getenv("AEGAEON_PREFETCH_SLAB");
	struct aeg_size_spec spec = s->cfg.slab_default;
	struct aeg_gpu_info info;
	char from[96];
	int err = 0;

	if (s->slab_exact) {
		*bytes = s->slab_exact;
		return 0;
	}
	if (s->slab_spec[0] != '\0') {
		snprintf(from, sizeof(from), "slab \"%s\"", s->slab_spec);
		err = aeg_size_spec_parse(s->slab_spec, &spec);
	} else if (env != NULL && env[0] != '\0') {
		snprintf(from, sizeof(from), "AEGAEON_PREFETCH_SLAB=\"%.60s\"", env);
		err = aeg_size_spec_parse(env, &spec);
	} else {
		snprintf(from, sizeof(from), "slab_default of aegaeon.conf");
	}
	if (err) {
		aeg_error_prefix("%s", from);
		return err;
	}
	err = aeg_device_gpu_info(s->dev, gpu, &info);
	if (err)
		return err;
	err = aeg_size_spec_resolve(&spec, info.free_bytes, bytes);
	if (err == 0 && *bytes < (1u << 20))
		err = AEG_EINVAL;
	if (err)
		return aeg_fail(AEG_EINVAL, "%s gives a prefetch slab under 1 MiB on GPU %d (%" PRIu64 " bytes free)",
				from, gpu, info.free_bytes);
	*bytes &= ~((uint64_t)(1u << 20) - 1);
	return 0;
}

/* Give the engine its ring, or tell it none comes (@err) so that loads waiting for it fail. */
static void ring_made(struct sess_gpu *g, int err)
{
	if (err)
		aeg_warn("the prefetch engine's staging ring on GPU %d (%s): files that cannot be mapped do not load",
			 g->gpu, aeg_error_detail());
	aeg_prefetch_set_pool(g->pf, err ? NULL : g->pool, 0, err);
}

/*
 * The machine's topology, to bind the engine's workers near the GPU; NULL
 * (warned) without one, and on a machine of one NUMA node, where every CPU
 * is as near as any other (its discovery took 24-31 ms of a CPU beside a
 * fresh process's first load on the H200 machine).
 */
static const aeg_topo_t *topology(aeg_device_t *dev)
{
	const aeg_topo_t *topo = NULL;
	uint64_t t = aeg_now_ns();
	int node;

	if (aeg_device_kind(dev) != AEG_DEVICE_CUDA)
		return NULL;
	node = aeg_topo_sole_node();
	if (node >= 0) {
		aeg_debug("one NUMA node (%d): the prefetch workers are not bound", node);
		return NULL;
	}
	if (aeg_topo_live(&topo)) {
		aeg_warn("no topology (%s): prefetch threads are not bound near the GPU", aeg_error_detail());
		topo = NULL;
	}
	aeg_span_end("topology", t);
	return topo;
}

/*
 * Back the rest of a reserved slab with memory, so it holds its share of
 * the GPU; from the ring's thread, once no load of this process runs: the
 * driver's mappings and a load's copies and registrations wait for each
 * other (121 GiB mapped in 4-7 ms alone on the H200, 7-18 ms beside a fresh
 * process's first load). Until then loads map what they reach.
 */
static void map_slab(struct sess_gpu *g, int when_idle)
{
	char mapped[32], all[32];

	while (when_idle && aeg_loads_active() > 0 && !__atomic_load_n(&g->closing, __ATOMIC_ACQUIRE))
		usleep(2000);
	if (aeg_slab_map_rest(g->slab) == 0)
		return;
	aeg_warn("prefetch slab on GPU %d holds %s of its %s (%s): loads past it map their memory when they come",
		 g->gpu, aeg_size_format(aeg_slab_mapped_bytes(g->slab), mapped, sizeof(mapped)),
		 aeg_size_format(aeg_slab_bytes(g->slab), all, sizeof(all)), aeg_error_detail());
}

/* The ring's first buffer is in: the engine stages through it, and through the others as they come. */
static void ring_usable(aeg_pool_t *pool, void *arg)
{
	struct sess_gpu *g = arg;

	g->pool = pool;
	ring_made(g, 0);
}

/* The ring's thread got as far as @count says: tell aeg_session_prepare. */
static void ring_step(struct sess_gpu *g, unsigned *count)
{
	pthread_mutex_lock(&g->s->ring_lock);
	(*count)++;
	pthread_cond_broadcast(&g->s->ring_cond);
	pthread_mutex_unlock(&g->s->ring_lock);
}

/*
 * The ring's thread: the engine's loads wait for the ring, and start
 * through its first buffer (1-2 ms) while the others are made (11-13 ms
 * for all 24 on the H200 machine). The ring first: on a machine of one
 * NUMA node it needs no topology (elsewhere making it discovers the
 * topology, as before). Then the topology, off the first load's path
 * (14-17 ms on an idle H200 machine, 43-98 ms beside a load): the workers
 * bind near the GPU once they have it. It takes none of the session's
 * locks but ring_lock, briefly: set_engine joins it holding the other.
 */
static void *make_ring(void *arg)
{
	struct sess_gpu *g = arg;
	const aeg_topo_t *topo;
	aeg_pool_t *pool = NULL;
	int err;

	err = aeg_pool_create_private_early(g->dev, g->gpu, AEG_PREFETCH_RING_BUFFER_BYTES, g->ring_bytes,
					    ring_usable, g, &pool);
	if (err)
		ring_made(g, err);
	topo = g->bind_later ? topology(g->dev) : NULL;
	if (topo != NULL)
		aeg_prefetch_set_topo(g->pf, topo);
	ring_step(g, &g->rings.made);
	map_slab(g, 1);
	ring_step(g, &g->rings.done);
	return NULL;
}

/* An engine without a pool of the session's makes its ring off the first load's path. */
static int start_ring(struct sess_gpu *g, int ring_buffers)
{
	int rc;

	g->ring_bytes = AEG_PREFETCH_RING_BUFFER_BYTES * (uint64_t)ring_buffers;
	rc = pthread_create(&g->ring_thread, NULL, make_ring, g);
	if (rc)
		return aeg_fail(AEG_ENOMEM, "starting the staging ring's thread: %s", strerror(rc));
	g->ring_thread_started = 1;
	pthread_mutex_lock(&g->s->ring_lock);
	g->rings.started++;
	pthread_mutex_unlock(&g->s->ring_lock);
	return 0;
}

/* Make @gpu's slab, pool and engine unless made; lock held. */
static int engine_locked(aeg_session_t *s, int gpu, aeg_prefetch_t **pf)
{
	struct sess_gpu *g = &s->gpus[gpu];
	struct aeg_prefetch_config cfg = s->engine;
	uint64_t bytes, t;
	char size[32];
	int err;

	if (g->pf != NULL) {
		*pf = g->pf;
		return 0;
	}
	err = slab_bytes(s, gpu, &bytes);
	if (err)
		return err;
	/* An engine with a ring made later gets the topology from the ring's thread. */
	g->bind_later = cfg.topo == NULL && s->pool_bytes == 0;
	if (cfg.topo == NULL && !g->bind_later) {
		if (!s->topo_tried) {
			s->topo_tried = 1;
			s->topo = topology(s->dev);
		}
		cfg.topo = s->topo;
	}
	/*
	 * The slab's addresses now, its memory as loads reach it and the rest
	 * by the ring's thread: a first cudaMalloc of 90% of an H200 holds a
	 * fresh process's first load up 5 ms. Never exported: a job's steps
	 * share the agent's slabs, not this one.
	 */
	g->dev = s->dev;
	g->gpu = gpu;
	g->s = s;
	t = aeg_now_ns();
	err = aeg_slab_create_reserved(s->dev, gpu, bytes, &g->slab);
	if (err == AEG_ENOTSUP) {
		aeg_debug("prefetch slab on GPU %d made whole (%s)", gpu, aeg_error_detail());
		err = aeg_slab_create(s->dev, gpu, bytes, &g->slab);
	}
	if (err) {
		aeg_error_prefix("prefetch slab of %s on GPU %d", aeg_size_format(bytes, size, sizeof(size)), gpu);
		goto fail;
	}
	aeg_span_end("slab create", t);
	if (s->pool_bytes) {
		err = aeg_pool_create(s->dev, gpu, s->pool_buffer_bytes, s->pool_bytes, &g->pool);
		if (err)
			goto fail;
		map_slab(g, 0);         /* no ring's thread to do it */
		if (cfg.cache_bytes == 0)
			cfg.cache_bytes = s->pool_bytes;
	} else {
		cfg.pool_later_buffer_bytes = AEG_PREFETCH_RING_BUFFER_BYTES;
		cfg.ring_buffers = aeg_prefetch_ring_buffers(&cfg);
	}
	t = aeg_now_ns();
	err = aeg_prefetch_create(g->slab, g->pool, &cfg, &g->pf);
	if (err)
		goto fail;
	if (g->pool == NULL) {
		g->ring_pending = cfg.ring_buffers;
		aeg_prefetch_ring_coming(g->pf);
	}
	aeg_span_end("engine create", t);
	*pf = g->pf;
	return 0;
fail:
	aeg_prefetch_destroy(g->pf);
	if (g->pool)
		aeg_pool_destroy(g->pool);
	if (g->slab)
		aeg_slab_destroy(g->slab);
	g->pf = NULL;
	g->pool = NULL;
	g->slab = NULL;
	return err;
}

/*
 * Start @gpu's staging ring if it waits to be made: after the first load's
 * start, so that the start (which maps its file and makes its events) does
 * not wait behind the ring's page population and registration. Lock held.
 */
static void ring_go_locked(aeg_session_t *s, int gpu)
{
	struct sess_gpu *g = &s->gpus[gpu];
	int buffers = g->ring_pending, err;

	if (buffers == 0 || g->starting_many)
		return;
	g->ring_pending = 0;
	err = start_ring(g, buffers);
	if (err)
		ring_made(g, err);
}

static void ring_go(aeg_session_t *s, int gpu)
{
	pthread_mutex_lock(&s->lock);
	ring_go_locked(s, gpu);
	pthread_mutex_unlock(&s->lock);
}

int session_check_gpu(const aeg_session_t *s, int gpu)
{
	if (gpu < 0 || gpu >= s->ngpus)
		return aeg_fail(AEG_ENODEV, "GPU %d: %s %d GPU%s on the %s backend", gpu,
				s->mode == AEG_SESSION_JOB ? "the job's slabs are on" : "this process sees", s->ngpus,
				s->ngpus == 1 ? "" : "s", aeg_device_kind_name(aeg_device_kind(s->dev)));
	return 0;
}

/* JOB: the job slab on this process's GPU @gpu (-1: the first slab). */
int session_job_slab(aeg_session_t *s, int gpu, int *index)
{
	struct aeg_job_slab_desc d;

	if (s->ngpus == 0)
		return aeg_fail(AEG_ENODEV, "the job has no GPU slab on this node (ask for GPUs with --gres=gpu:N)");
	if (gpu < 0) {
		*index = 0;
		return 0;
	}
	for (int i = 0; i < s->ngpus; i++) {
		if (aeg_job_slab_describe(s->job, i, &d) == 0 && d.gpu == gpu) {
			*index = i;
			return 0;
		}
	}
	return aeg_fail(AEG_ENODEV, "GPU %d has no slab of this job (the agent holds %d slab%s)", gpu, s->ngpus,
			s->ngpus == 1 ? "" : "s");
}

AEG_EXPORT int aeg_session_set_engine(aeg_session_t *s, const char *slab,
				      const struct aeg_prefetch_config *engine)
{
	int err = 0;

	if (s == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_set_engine: NULL session");
	if (s->mode == AEG_SESSION_JOB)
		return aeg_fail(AEG_EINVAL, "a job session loads with the agent's engines");
	if (slab != NULL && strlen(slab) >= sizeof(s->slab_spec))
		return aeg_fail(AEG_EINVAL, "slab size \"%.32s...\" is too long", slab);
	pthread_mutex_lock(&s->lock);
	for (int g = 0; g < s->ngpus && err == 0; g++) {
		struct aeg_prefetch_stats st;

		if (s->gpus[g].pf != NULL && aeg_prefetch_stats(s->gpus[g].pf, &st) == 0 && st.loads > 0)
			err = aeg_fail(AEG_EBUSY, "the engine on GPU %d holds %u load%s: release them first", g,
				       st.loads, st.loads == 1 ? "" : "s");
	}
	for (int g = 0; g < s->ngpus && err == 0; g++)
		gpu_free(s, &s->gpus[g]);
	if (err == 0) {
		s->slab_exact = 0;
		snprintf(s->slab_spec, sizeof(s->slab_spec), "%s", slab ? slab : "");
		if (engine != NULL) {
			s->engine = *engine;
		} else {
			aeg_prefetch_config_defaults(&s->engine);
			s->engine.threads = s->cfg.prefetch_threads;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return err;
}

/*
 * Wait for the ring's thread that started as @started: its ring and the
 * topology, then, while no load of the process runs, its mapping of the
 * slab. Without the session's lock: the thread maps only once every load
 * of the process has ended, and a load of many files takes that lock
 * while it holds its engine, so its loads could not end (a deadlock).
 */
static void ring_wait(aeg_session_t *s, struct sess_gpu *g, unsigned started)
{
	struct timespec ts;

	pthread_mutex_lock(&s->ring_lock);
	while (g->rings.made < started)
		pthread_cond_wait(&s->ring_cond, &s->ring_lock);
	/* The mapping waits for the process's loads, however long they run: waited for only while none does. */
	while (g->rings.done < started && aeg_loads_active() == 0) {
		aeg_deadline_after(&ts, 2);
		pthread_cond_timedwait(&s->ring_cond, &s->ring_lock, &ts);
	}
	pthread_mutex_unlock(&s->ring_lock);
}

AEG_EXPORT int aeg_session_prepare(aeg_session_t *s, int gpu)
{
	aeg_prefetch_t *pf;
	unsigned started = 0;
	int err, index;

	if (s == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_prepare: NULL session");
	if (s->mode == AEG_SESSION_JOB)
		return session_job_slab(s, gpu, &index);
	err = session_check_gpu(s, gpu);
	if (err)
		return err;
	pthread_mutex_lock(&s->lock);
	err = engine_locked(s, gpu, &pf);
	/* Ahead of need, the staging ring too. */
	if (err == 0)
		ring_go_locked(s, gpu);
	if (err == 0 && s->gpus[gpu].ring_thread_started) {
		pthread_mutex_lock(&s->ring_lock);
		started = s->gpus[gpu].rings.started;
		pthread_mutex_unlock(&s->ring_lock);
	}
	pthread_mutex_unlock(&s->lock);
	if (started)
		ring_wait(s, &s->gpus[gpu], started);
	return err;
}

/* --------------------------------------------------------------- models */

static int find_one(aeg_session_t *s, const char *path, int gpu, const struct aeg_slice *slice, aeg_model_t **m);

static int local_load(aeg_session_t *s, const struct aeg_load_request *req, aeg_model_t **out)
{
	struct aeg_prefetch_options opts = {
		.chunk_bytes = req->chunk_bytes ? req->chunk_bytes : s->cfg.prefetch_chunk_bytes,
		.feed = req->feed,
		.format = req->format,
		.flags = (req->flags & AEG_LOAD_NO_CACHE) ? AEG_PREFETCH_NO_CACHE : 0,
		.slice = req->slice,
	};
	int gpu = req->gpu < 0 ? 0 : req->gpu;
	struct aeg_model *m;
	aeg_prefetch_t *pf;
	uint64_t t;
	int err;

	err = session_check_gpu(s, gpu);
	if (err)
		return err;
	if (req->flags & AEG_LOAD_REUSE) {
		err = find_one(s, req->path, gpu, req->slice, out);
		if (err != AEG_ENOENT && err != AEG_ESTALE)
			return err;
		aeg_error_clear();
	}
	m = model_new(s, req->path, gpu, 1);
	if (m == NULL)
		return AEG_ENOMEM;
	pthread_mutex_lock(&s->lock);
	err = engine_locked(s, gpu, &pf);
	pthread_mutex_unlock(&s->lock);
	if (err == 0) {
		t = aeg_now_ns();
		err = aeg_prefetch_file(pf, req->path, &opts, &m->load);
		if (err == 0)
			aeg_span_end("prefetch start", t);
		ring_go(s, gpu);
	}
	if (err) {
		model_free(m);
		return err;
	}
	m->id = aeg_load_id(m->load);
	*out = m;
	return 0;
}

static int load_one(aeg_session_t *s, const struct aeg_load_request *req, aeg_model_t **m)
{
	return s->mode == AEG_SESSION_JOB ? session_job_load(s, req, m) : local_load(s, req, m);
}

/*
 * A local load of many files holds its engine (made here if it is not yet)
 * until every file has started: a start maps its file, which waits for the
 * registrations of files already loading (aeg_prefetch_hold). 1 when held;
 * 0 for a job's session, or an engine that could not be made (the first
 * load says why).
 */
static int hold_engine(aeg_session_t *s, int gpu)
{
	aeg_prefetch_t *pf;
	int held = 0;

	if (s->mode == AEG_SESSION_JOB)
		return 0;
	if (session_check_gpu(s, gpu)) {
		aeg_error_clear();
		return 0;
	}
	pthread_mutex_lock(&s->lock);
	if (engine_locked(s, gpu, &pf) == 0 && aeg_prefetch_hold(pf, 1) == 0) {
		s->gpus[gpu].starting_many++;
		held = 1;
	}
	pthread_mutex_unlock(&s->lock);
	if (!held)
		aeg_error_clear();
	return held;
}

/* The loads of many files have started: the engine's workers and its ring go. */
static void unhold_engine(aeg_session_t *s, int gpu)
{
	pthread_mutex_lock(&s->lock);
	aeg_prefetch_hold(s->gpus[gpu].pf, 0);
	s->gpus[gpu].starting_many--;
	ring_go_locked(s, gpu);
	pthread_mutex_unlock(&s->lock);
}

/* Every file of a directory or shard index, one part each; a failure frees what was loaded. */
static int load_many(aeg_session_t *s, const struct aeg_load_request *req, const struct aeg_model_paths *mp,
		     aeg_model_t **out)
{
	struct aeg_model **parts = calloc(mp->count, sizeof(*parts));
	struct aeg_load_request r = *req;
	int gpu = req->gpu < 0 ? 0 : req->gpu, held;
	uint32_t n = 0;
	int err = 0;

	if (parts == NULL)
		return aeg_fail(AEG_ENOMEM, "%s: out of memory for %u files", req->path, mp->count);
	held = hold_engine(s, gpu);
	for (; n < mp->count && err == 0; n++) {
		r.path = mp->paths[n];
		r.format = AEG_FORMAT_SAFETENSORS;
		err = load_one(s, &r, &parts[n]);
	}
	if (held)
		unhold_engine(s, gpu);
	if (err) {
		/* The detail names the shard; the parts loaded so far go, keeping it. */
		char why[1024];

		snprintf(why, sizeof(why), "%s", aeg_error_detail());
		for (uint32_t i = 0; i + 1 < n; i++) {
			if (parts[i]->owned)
				model_release_chunks(parts[i]);
			model_free(parts[i]);
		}
		free(parts);
		return aeg_fail(err, "%s", why);
	}
	return model_compose(s, req->path, parts, n, out);
}

AEG_EXPORT int aeg_session_load(aeg_session_t *s, const struct aeg_load_request *req, aeg_model_t **m)
{
	struct aeg_model_paths mp;
	int err;

	if (s == NULL || req == NULL || m == NULL || req->path == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_load: NULL argument");
	if (req->path[0] == '\0')
		return aeg_fail(AEG_EINVAL, "empty path");
	if (req->chunk_bytes % AEG_PREFETCH_CHUNK_ALIGN != 0)
		return aeg_fail(AEG_EINVAL, "%s: chunk size %" PRIu64 " bytes is not a multiple of 4 KiB (4096 bytes)",
				req->path, req->chunk_bytes);
	if (req->flags & ~(AEG_LOAD_REUSE | AEG_LOAD_NO_CACHE))
		return aeg_fail(AEG_EINVAL, "load flags 0x%x: unknown bits", req->flags);
	if (req->slice != NULL && aeg_slice_check(req->slice))
		return aeg_fail_keep(AEG_EINVAL);
	if (req->slice != NULL && req->format == AEG_FORMAT_RAW)
		return aeg_fail(AEG_EINVAL, "%s: a tensor-parallel slice of a raw file: a slice needs safetensors tensors",
				req->path);
	err = aeg_model_paths(req->path, &mp);
	if (err)
		return err;
	if (mp.dir || mp.index)
		err = load_many(s, req, &mp, m);
	else
		err = load_one(s, req, m);
	aeg_model_paths_free(&mp);
	if (err == 0) {
		pthread_mutex_lock(&s->lock);
		model_link(*m);
		pthread_mutex_unlock(&s->lock);
	}
	return err;
}

/*
 * The newest open LOCAL load of @real on @gpu with @slice (or with id @id)
 * that still holds chunks, as a new model on the same engine load; lock held.
 */
static int local_match(struct aeg_model *o, const char *real, int gpu, const struct aeg_slice *slice, uint64_t id,
		       aeg_model_t **out)
{
	struct aeg_load_progress p;

	if (o->load == NULL || (id ? o->id != id : (o->gpu != gpu || strcmp(o->path, real) != 0 ||
						    !slice_equal(aeg_load_slice(o->load), slice))))
		return 0;
	if (aeg_load_progress(o->load, &p) || (p.status != 0 && p.status != AEG_EBUSY) ||
	    (p.chunks > 0 && p.released_chunks == p.chunks))
		return 0;
	*out = model_new(o->s, o->path, o->gpu, 0);
	if (*out == NULL)
		return AEG_ENOMEM;
	(*out)->load = aeg_load_dup(o->load);
	(*out)->id = o->id;
	return 1;
}

static int local_find_locked(aeg_session_t *s, const char *real, int gpu, const struct aeg_slice *slice,
			     uint64_t id, aeg_model_t **out)
{
	for (struct aeg_model *o = s->models; o; o = o->next) {
		int r = local_match(o, real, gpu, slice, id, out);

		for (uint32_t i = 0; r == 0 && i < o->nparts; i++)
			r = local_match(o->parts[i], real, gpu, slice, id, out);
		if (r)
			return r < 0 ? r : 0;
	}
	return id ? aeg_fail(AEG_ENOENT, "no load %" PRIu64 " in this process", id) :
		    aeg_fail(AEG_ENOENT, "%s is not loaded onto GPU %d by this process", real, gpu);
}

/* One file's newest resident load (LOCAL: with @slice; JOB: whole), not linked. */
static int find_one(aeg_session_t *s, const char *path, int gpu, const struct aeg_slice *slice, aeg_model_t **m)
{
	char real[PATH_MAX];
	int err;

	if (s->mode == AEG_SESSION_JOB)
		return session_job_find(s, 0, path, gpu, m);
	if (gpu < 0)
		gpu = 0;
	err = session_check_gpu(s, gpu);
	if (err)
		return err;
	if (realpath(path, real) == NULL)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s: %s", path, strerror(errno));
	pthread_mutex_lock(&s->lock);
	err = local_find_locked(s, real, gpu, slice, 0, m);
	pthread_mutex_unlock(&s->lock);
	return err;
}

/* Every file of a directory or shard index resident: the model of them, not owned. */
static int find_many(aeg_session_t *s, const char *path, const struct aeg_model_paths *mp, int gpu,
		     aeg_model_t **out)
{
	struct aeg_model **parts = calloc(mp->count, sizeof(*parts));
	uint32_t n = 0;
	int err = 0;

	if (parts == NULL)
		return aeg_fail(AEG_ENOMEM, "%s: out of memory for %u files", path, mp->count);
	for (; n < mp->count && err == 0; n++)
		err = find_one(s, mp->paths[n], gpu, NULL, &parts[n]);
	if (err) {
		for (uint32_t i = 0; i + 1 < n; i++)
			model_free(parts[i]);
		free(parts);
		return err;
	}
	return model_compose(s, path, parts, n, out);
}

AEG_EXPORT int aeg_session_find(aeg_session_t *s, const char *path, int gpu, aeg_model_t **m)
{
	struct aeg_model_paths mp;
	int err;

	if (s == NULL || path == NULL || m == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_find: NULL argument");
	err = aeg_model_paths(path, &mp);
	if (err)
		return err;
	err = mp.dir || mp.index ? find_many(s, path, &mp, gpu, m) : find_one(s, path, gpu, NULL, m);
	aeg_model_paths_free(&mp);
	if (err == 0) {
		pthread_mutex_lock(&s->lock);
		model_link(*m);
		pthread_mutex_unlock(&s->lock);
	}
	return err;
}

AEG_EXPORT int aeg_session_find_id(aeg_session_t *s, uint64_t id, aeg_model_t **m)
{
	int err;

	if (s == NULL || m == NULL || id == 0)
		return aeg_fail(AEG_EINVAL, "aeg_session_find_id: %s", id ? "NULL argument" : "load id 0");
	if (s->mode == AEG_SESSION_JOB) {
		err = session_job_find(s, id, NULL, -1, m);
		pthread_mutex_lock(&s->lock);
	} else {
		pthread_mutex_lock(&s->lock);
		err = local_find_locked(s, NULL, -1, NULL, id, m);
	}
	if (err == 0)
		model_link(*m);
	pthread_mutex_unlock(&s->lock);
	return err;
}

AEG_EXPORT int aeg_session_engine_stats(aeg_session_t *s, int gpu, struct aeg_prefetch_stats *stats,
					uint64_t *slab_bytes)
{
	aeg_prefetch_t *pf = NULL;
	aeg_slab_t *slab = NULL;
	int err;

	if (s == NULL || stats == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_engine_stats: NULL argument");
	if (s->mode == AEG_SESSION_JOB)
		return aeg_fail(AEG_ENOENT, "a job session has no engine of its own (the agent's: aegaeon-cli status)");
	err = session_check_gpu(s, gpu);
	if (err)
		return err;
	pthread_mutex_lock(&s->lock);
	pf = s->gpus[gpu].pf;
	slab = s->gpus[gpu].slab;
	pthread_mutex_unlock(&s->lock);
	if (pf == NULL)
		return aeg_fail(AEG_ENOENT, "no engine on GPU %d yet", gpu);
	if (slab_bytes)
		*slab_bytes = aeg_slab_bytes(slab);
	return aeg_prefetch_stats(pf, stats);
}

AEG_EXPORT uint64_t aeg_session_owned_blocks(aeg_session_t *s)
{
	uint64_t n = 0;

	if (s == NULL)
		return 0;
	pthread_mutex_lock(&s->lock);
	for (int i = 0; i < AEG_JOB_MAX_GPUS; i++)
		n += s->owned[i].n;
	for (int g = 0; s->gpus != NULL && g < s->ngpus; g++) {
		struct aeg_prefetch_stats st;

		if (s->gpus[g].pf != NULL && aeg_prefetch_stats(s->gpus[g].pf, &st) == 0)
			n += st.blocks;
	}
	pthread_mutex_unlock(&s->lock);
	return n;
}

AEG_EXPORT int aeg_session_locate(aeg_session_t *s, uint64_t ptr, uint64_t bytes, uint64_t slab_id, int *gpu)
{
	int found = -1;

	if (s == NULL || gpu == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_session_locate: NULL argument");
	if (s->mode == AEG_SESSION_JOB) {
		for (int i = 0; i < s->ngpus && found < 0; i++) {
			struct aeg_job_slab_desc d;
			uintptr_t start;

			if (aeg_job_slab_describe(s->job, i, &d) || d.base == NULL || d.gpu < 0)
				continue;
			start = (uintptr_t)d.base;
			if (ptr >= start && bytes <= d.bytes && ptr - start <= d.bytes - bytes)
				found = d.gpu;
		}
	} else {
		pthread_mutex_lock(&s->lock);
		for (int i = 0; i < s->ngpus && found < 0; i++) {
			struct aeg_block b;
			uintptr_t start;

			if (s->gpus[i].slab == NULL || aeg_slab_lookup(s->gpus[i].slab, slab_id, &b))
				continue;
			start = (uintptr_t)b.ptr;
			if (ptr >= start && bytes <= b.size && ptr - start <= b.size - bytes)
				found = i;
		}
		pthread_mutex_unlock(&s->lock);
		aeg_error_clear();
	}
	if (found < 0)
		return aeg_fail(AEG_ENOENT, "no live loaded chunk has slab id %" PRIu64 " with %" PRIu64 " bytes at 0x%" PRIx64,
				slab_id, bytes, ptr);
	*gpu = found;
	return 0;
}


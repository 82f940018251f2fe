/* The aegaeon_native runtime: its lock, session and device, the job, objects' resources, waits and loads. */
#include "py_internal.h"
#include "py_runtime.h"
#include "internal.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/*
 * The runtime lock. It is only ever taken with the GIL released (pyaeg_lock),
 * so a thread holding it may release and retake the GIL without deadlock.
 * It is not reentrant, and Python code can take it (a collected object's
 * dealloc, a signal handler calling the module): so no Python code runs
 * while it is held. Its holders allocate no Python object, raise nothing
 * and check no signal: the *_locked calls set the library's detail and
 * return its code, raised once the lock is given back.
 * But once the interpreter finalizes, a daemon thread that asks for the GIL
 * never gets it (Python ends or parks it there for good): holding the lock,
 * it would hang every later taker, the finalizing thread's deallocs and
 * Py_AtExit teardown included. So the lock is a flag guarded by a mutex that
 * no one holds across a GIL change, and a holder marks itself parked while it
 * asks for the GIL (PYAEG_END_ALLOW_THREADS). The finalizing thread, the only
 * one that runs Python then, takes the lock over from a parked holder: that
 * holder's C work is done and it never runs again.
 */
static struct {
	pthread_mutex_t mu;             /* guards the three below; never held across a GIL change */
	pthread_cond_t cond;            /* broadcast when the lock is free or its holder parks */
	int held;
	int parked;                     /* the holder is waiting for the GIL */
} rtlock = { .mu = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static _Thread_local int rtlock_mine;  /* this thread holds the runtime lock */

/*
 * A fork() child has one thread: the lock's holder, the session's engine
 * threads and the daemon threads stayed in the parent. The child's copy of
 * the lock is made free (a thread may have held it), and a runtime the
 * parent had opened is marked inherited: nothing of it is used or torn
 * down (closing the parent's session would join threads that are not
 * there), and the device stays closed to this process.
 */
static void atfork_prepare(void) { pthread_mutex_lock(&rtlock.mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&rtlock.mu); }
static void atfork_child(void)
{
	if (pyaeg_rt.dev != NULL || pyaeg_rt.res != NULL || pyaeg_rt.events != NULL || pyaeg_rt.objects > 0)
		pyaeg_rt.inherited = 1;
	rtlock.held = 0;
	rtlock.parked = 0;
	rtlock_mine = 0;
	pthread_cond_init(&rtlock.cond, NULL);
	pthread_mutex_unlock(&rtlock.mu);
}

static void register_atfork(void)
{
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

void pyaeg_fork_init(void)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;

	pthread_once(&once, register_atfork);
}

/* What a fork() child's calls of the parent's runtime get: AEG_EPERM with its detail. */
static int inherited_error(void)
{
	return aeg_fail(AEG_EPERM, "this process is a fork() child of one that used aegaeon_native: its device, "
			"slabs and threads are the parent's; use the module in a fresh interpreter (subprocess, "
			"multiprocessing's \"spawn\" or \"forkserver\")");
}

int pyaeg_inherited_check(void)
{
	if (!pyaeg_rt.inherited)
		return 0;
	pyaeg_raise(inherited_error());
	return -1;
}

#define WAIT_SLICE_MS 100

struct pyaeg_runtime pyaeg_rt = { .attach = -1 };

/*
 * Takes the runtime lock; the caller does not hold the GIL. @finalizer: the
 * caller is the thread finalizing the interpreter, which may take the lock
 * over from a holder parked at the GIL.
 */
void pyaeg_rtlock_take(int finalizer)
{
	pthread_mutex_lock(&rtlock.mu);
	while (rtlock.held && !(finalizer && rtlock.parked))
		pthread_cond_wait(&rtlock.cond, &rtlock.mu);
	rtlock.held = 1;
	rtlock.parked = 0;
	pthread_mutex_unlock(&rtlock.mu);
	rtlock_mine = 1;
}

void pyaeg_rtlock_give(void)
{
	rtlock_mine = 0;
	pthread_mutex_lock(&rtlock.mu);
	rtlock.held = 0;
	rtlock.parked = 0;
	pthread_cond_broadcast(&rtlock.cond);
	pthread_mutex_unlock(&rtlock.mu);
}

/* Takes the runtime lock if it is free, keeping the GIL (its mutex is never held across a GIL change). */
static int rtlock_try(void)
{
	int got;

	pthread_mutex_lock(&rtlock.mu);
	got = !rtlock.held;
	if (got) {
		rtlock.held = 1;
		rtlock.parked = 0;
	}
	pthread_mutex_unlock(&rtlock.mu);
	if (got)
		rtlock_mine = 1;
	return got;
}

static void rtlock_park(int parked)
{
	pthread_mutex_lock(&rtlock.mu);
	rtlock.parked = parked;
	if (parked)
		pthread_cond_broadcast(&rtlock.cond);
	pthread_mutex_unlock(&rtlock.mu);
}

void pyaeg_restore_thread(PyThreadState *save)
{
	if (!rtlock_mine) {
		PyEval_RestoreThread(save);
		return;
	}
	rtlock_park(1);
	PyEval_RestoreThread(save);     /* in a daemon thread after finalization: never returns */
	rtlock_park(0);
}

/*
 * With the GIL held, Py_IsInitialized() is 0 only in the finalizing thread:
 * it clears the flag when it marks the runtime finalizing, and from then on
 * no other thread gets the GIL.
 */
int pyaeg_is_finalizer(void)
{
	return !Py_IsInitialized();
}

void pyaeg_lock(void)
{
	int finalizer = pyaeg_is_finalizer();

	PYAEG_BEGIN_ALLOW_THREADS
	pyaeg_rtlock_take(finalizer);
	PYAEG_END_ALLOW_THREADS
}

void pyaeg_unlock(void)
{
	pyaeg_rtlock_give();
}

void pyaeg_object_born(void)
{
	pyaeg_rt.objects++;
}

void pyaeg_object_gone(void)
{
	pyaeg_rt.objects--;
}

static void res_destroy(struct pyaeg_res *res)
{
	/* A cache first (it uses the stream, slab and pool), the pool last. */
	if (res->kv != NULL)
		aeg_kv_destroy(res->kv);
	if (res->stream != NULL)
		aeg_stream_destroy(res->stream);
	if (res->stream_in != NULL)
		aeg_stream_destroy(res->stream_in);
	if (res->slab != NULL && res->job_lease && pyaeg_rt.job != NULL)
		aeg_job_slab_return(pyaeg_rt.job, res->slab);
	else if (res->slab != NULL)
		aeg_slab_destroy(res->slab);
	if (res->pool != NULL)
		aeg_pool_destroy(res->pool);
	res->kv = NULL;
	res->stream = NULL;
	res->stream_in = NULL;
	res->slab = NULL;
	res->pool = NULL;
}

struct pyaeg_res *pyaeg_res_new(void)
{
	struct pyaeg_res *res = calloc(1, sizeof(*res));

	if (res == NULL) {
		PyErr_NoMemory();
		return NULL;
	}
	pyaeg_lock();
	res->next = pyaeg_rt.res;
	if (pyaeg_rt.res != NULL)
		pyaeg_rt.res->prev = res;
	pyaeg_rt.res = res;
	pyaeg_unlock();
	return res;
}

void pyaeg_res_free(struct pyaeg_res *res)
{
	int finalizer;

	if (res == NULL)
		return;
	finalizer = pyaeg_is_finalizer();
	PYAEG_BEGIN_ALLOW_THREADS
	pyaeg_rtlock_take(finalizer);
	if (!pyaeg_rt.inherited)
		res_destroy(res);
	if (res->prev != NULL)
		res->prev->next = res->next;
	else
		pyaeg_rt.res = res->next;
	if (res->next != NULL)
		res->next->prev = res->prev;
	pyaeg_rtlock_give();
	PYAEG_END_ALLOW_THREADS
	free(res);
}

static void atexit_teardown(void);

/* Anything that still uses the device: objects, views, events, waits, loaded chunks. */
int pyaeg_busy_locked(void)
{
	int busy = pyaeg_rt.objects > 0 || pyaeg_rt.res != NULL || pyaeg_rt.events != NULL || pyaeg_rt.waits > 0;

	for (int i = 0; !busy && i < pyaeg_rt.gpu_count; i++)
		busy = pyaeg_rt.gpus[i].views > 0;
	if (!busy && pyaeg_rt.sess != NULL && pyaeg_rt.job == NULL)
		busy = aeg_session_owned_blocks(pyaeg_rt.sess) > 0;
	return busy;
}

/* The engines' settings of configure(); NULL @engine when none is set. */
void pyaeg_engine_settings(struct aeg_prefetch_config *engine, const struct aeg_prefetch_config **use)
{
	*use = NULL;
	if (pyaeg_rt.prefetch_threads) {
		aeg_prefetch_config_defaults(engine);
		engine->threads = pyaeg_rt.prefetch_threads;
		*use = engine;
	}
}

/*
 * The module's session: the job's agent inside an aegaeon job (unless
 * configure(attach=False)), else this process's slabs and engines on the
 * backend of set_device(), $AEGAEON_DEVICE or the site config.
 */
static int open_device_locked(void)
{
	struct aeg_session_config cfg = { .mode = AEG_SESSION_LOCAL };
	struct aeg_prefetch_config engine;
	const char *sock = getenv("AEGAEON_SOCKET");
	aeg_session_t *sess = NULL;
	int err, count = 0;

	if (pyaeg_rt.attach == 1 || (pyaeg_rt.attach < 0 && sock != NULL && sock[0] != '\0'))
		cfg.mode = AEG_SESSION_JOB;
	if (pyaeg_rt.kind_set && cfg.mode == AEG_SESSION_LOCAL) {
		cfg.flags |= AEG_SESSION_DEVICE_SET;
		cfg.device = pyaeg_rt.kind;
	}
	cfg.slab = pyaeg_rt.prefetch_slab[0] ? pyaeg_rt.prefetch_slab : NULL;
	pyaeg_engine_settings(&engine, &cfg.engine);
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_session_open(&cfg, &sess);
	if (err == 0)
		err = aeg_device_count(aeg_session_device(sess), &count);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		char detail[1024];

		/* The close may set a detail of its own: the open's is the one to tell. */
		snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
		aeg_session_close(sess);
		if (cfg.mode == AEG_SESSION_JOB)
			return aeg_fail(err, "attaching to the job's agent (AEGAEON_SOCKET=%s; configure(attach=False) works without it): %s",
					sock ? sock : "", detail);
		return aeg_fail(err, "%s", detail);
	}
	if (cfg.mode == AEG_SESSION_JOB && pyaeg_rt.kind_set && pyaeg_rt.kind != aeg_device_kind(aeg_session_device(sess))) {
		enum aeg_device_kind agent_kind = aeg_device_kind(aeg_session_device(sess));

		aeg_session_close(sess);
		return aeg_fail(AEG_EINVAL, "set_device(\"%s\") but the job's agent uses the %s device",
				aeg_device_kind_name(pyaeg_rt.kind), aeg_device_kind_name(agent_kind));
	}
	pyaeg_rt.gpus = calloc((size_t)(count ? count : 1), sizeof(*pyaeg_rt.gpus));
	if (pyaeg_rt.gpus == NULL) {
		aeg_session_close(sess);
		return aeg_fail(AEG_ENOMEM, "the runtime's state of %d GPUs", count);
	}
	pyaeg_rt.sess = sess;
	pyaeg_rt.dev = aeg_session_device(sess);
	pyaeg_rt.job = aeg_session_job(sess);
	pyaeg_rt.gpu_count = count;
	pyaeg_rt.kind = aeg_device_kind(pyaeg_rt.dev);
	if (!pyaeg_rt.atexit_set && Py_AtExit(atexit_teardown) == 0)
		pyaeg_rt.atexit_set = 1;
	return 0;
}

int pyaeg_device_locked(aeg_device_t **dev)
{
	int err = 0;

	if (pyaeg_rt.inherited)
		return inherited_error();
	if (pyaeg_rt.dev == NULL)
		err = open_device_locked();
	if (err < 0)
		return err;
	*dev = pyaeg_rt.dev;
	return 0;
}

int pyaeg_device(aeg_device_t **dev)
{
	int err;

	pyaeg_lock();
	err = pyaeg_device_locked(dev);
	pyaeg_unlock();
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	return 0;
}

int pyaeg_check_gpu_locked(int gpu)
{
	if (gpu >= pyaeg_rt.gpu_count)
		return aeg_fail(AEG_ENODEV, "GPU %d: this process sees %d GPU%s on the %s backend", gpu,
				pyaeg_rt.gpu_count, pyaeg_rt.gpu_count == 1 ? "" : "s", aeg_device_kind_name(pyaeg_rt.kind));
	return 0;
}

/* ------------------------------------------------------------------- job */

/* The job slab of GPU @gpu as this process numbers it; AEG_ENODEV with its detail. */
int pyaeg_job_index_locked(int gpu)
{
	struct aeg_job_slab_desc d;
	struct aeg_job_info info = { 0 };

	if (aeg_job_get_info(pyaeg_rt.job, &info) == 0)
		for (int i = 0; i < info.slabs; i++)
			if (aeg_job_slab_describe(pyaeg_rt.job, i, &d) == 0 && d.gpu == gpu)
				return i;
	return aeg_fail(AEG_ENODEV, "GPU %d has no slab of this job (the agent holds %d slab%s)", gpu,
			info.slabs, info.slabs == 1 ? "" : "s");
}

int pyaeg_job_slab(int gpu, uint64_t bytes, aeg_slab_t **slab)
{
	aeg_device_t *dev;
	int idx, err, rc = 0;

	pyaeg_lock();
	err = pyaeg_device_locked(&dev);
	if (err == 0 && pyaeg_rt.job != NULL) {
		idx = err = pyaeg_job_index_locked(gpu);
		if (err >= 0) {
			PYAEG_BEGIN_ALLOW_THREADS
			err = aeg_job_slab(pyaeg_rt.job, idx, bytes, slab);
			PYAEG_END_ALLOW_THREADS
		}
		rc = 1;
	}
	pyaeg_unlock();
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	return rc;
}

aeg_pool_t *pyaeg_job_pool(void)
{
	aeg_pool_t *pool = NULL;
	aeg_device_t *dev;
	int err;

	pyaeg_lock();
	err = pyaeg_device_locked(&dev);
	if (err == 0 && pyaeg_rt.job == NULL)
		err = aeg_fail(AEG_ENOENT, "not inside an aegaeon job (AEGAEON_SOCKET is not set)");
	else if (err == 0 && (pool = aeg_job_pool(pyaeg_rt.job)) == NULL)
		err = aeg_fail(AEG_ENOENT, "the job has no pinned pool (--aegaeon-pinned)");
	pyaeg_unlock();
	if (err < 0)
		pyaeg_raise(err);
	return pool;
}

void pyaeg_drop_events_locked(void)
{
	while (pyaeg_rt.events != NULL) {
		struct mod_event *e = pyaeg_rt.events;

		pyaeg_rt.events = e->next;
		aeg_event_destroy(e->ev);
		free(e);
	}
	pyaeg_rt.nevents = 0;
}

/*
 * Everything the runtime holds; with @close_device, objects still alive
 * are destroyed and the session closed (a job's models stay with its
 * agent). Without, this process's own loaded chunks are freed.
 */
void pyaeg_teardown_locked(int close_device)
{
	if (pyaeg_rt.inherited)
		return;
	pyaeg_drop_events_locked();
	for (int i = 0; pyaeg_rt.gpus != NULL && i < pyaeg_rt.gpu_count; i++) {
		if (pyaeg_rt.gpus[i].stream != NULL)
			aeg_stream_destroy(pyaeg_rt.gpus[i].stream);
		pyaeg_rt.gpus[i].stream = NULL;
	}
	if (!close_device) {
		if (pyaeg_rt.sess != NULL && pyaeg_rt.job == NULL)
			aeg_session_release_all(pyaeg_rt.sess, 0, NULL);
		return;
	}
	for (struct pyaeg_res *r = pyaeg_rt.res; r != NULL; r = r->next)
		res_destroy(r);
	/* A daemon thread may still wait on the device: leave it to process exit. */
	if (pyaeg_rt.sess != NULL && pyaeg_rt.waits == 0) {
		aeg_session_close(pyaeg_rt.sess);
		pyaeg_rt.sess = NULL;
		pyaeg_rt.dev = NULL;
		pyaeg_rt.job = NULL;
		free(pyaeg_rt.gpus);
		pyaeg_rt.gpus = NULL;
		pyaeg_rt.gpu_count = 0;
	}
}

/* Py_AtExit: after the interpreter is gone, in the thread that finalized it; no Python API here. */
static void atexit_teardown(void)
{
	if (pyaeg_rt.inherited)
		return;         /* a fork() child: the parent's to tear down */
	pyaeg_rtlock_take(1);
	pyaeg_teardown_locked(1);
	while (pyaeg_rt.res != NULL) {
		struct pyaeg_res *r = pyaeg_rt.res;

		pyaeg_rt.res = r->next;
		free(r);
	}
	pyaeg_rtlock_give();
}

int pyaeg_stream_locked(int gpu, aeg_stream_t **stream)
{
	struct gpu_state *g = &pyaeg_rt.gpus[gpu];
	int err = 0;

	if (g->stream == NULL) {
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_stream_create(pyaeg_rt.dev, gpu, &g->stream);
		PYAEG_END_ALLOW_THREADS
		if (err < 0)
			return err;
	}
	*stream = g->stream;
	return 0;
}

/* ---------------------------------------------------------------- waits */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int pyaeg_wait(int (*fn)(void *arg, int timeout_ms), void *arg, double seconds)
{
	double deadline = now_s() + seconds, left;
	int err, slice;

	for (;;) {
		slice = WAIT_SLICE_MS;
		if (seconds >= 0) {
			left = deadline - now_s();
			if (left * 1000.0 < WAIT_SLICE_MS)
				slice = left > 0 ? (int)(left * 1000.0) : 0;
		}
		PYAEG_BEGIN_ALLOW_THREADS
		__atomic_add_fetch(&pyaeg_rt.waits, 1, __ATOMIC_SEQ_CST);
		err = fn(arg, slice);
		__atomic_sub_fetch(&pyaeg_rt.waits, 1, __ATOMIC_SEQ_CST);
		PYAEG_END_ALLOW_THREADS
		if (err != AEG_ETIMEDOUT)
			return err;
		if (PyErr_CheckSignals() < 0)
			return PYAEG_SIGNALLED;
		/* A slice shorter than a millisecond was the last one. */
		if (seconds >= 0 && (slice < WAIT_SLICE_MS || now_s() >= deadline))
			return AEG_ETIMEDOUT;
	}
}

struct handle_wait {
	aeg_device_t *dev;
	aeg_handle_t handle;
};

static int wait_handle_slice(void *arg, int timeout_ms)
{
	struct handle_wait *w = arg;

	return aeg_event_wait_handle(w->dev, &w->handle, timeout_ms);
}

/*
 * An opened handle whose event is complete is answered with the GIL held:
 * giving the GIL up and taking it back costs more than the query, and with
 * other Python threads running it can take a whole switch interval.
 */
static int complete_now(aeg_device_t *dev, const aeg_handle_t *handle)
{
	int done = 0;

	if (!rtlock_try())
		return 0;
	if (pyaeg_rt.dev == dev)
		done = aeg_event_query_handle(dev, handle) == 0;
	pyaeg_rtlock_give();
	return done;
}

int pyaeg_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, double seconds)
{
	struct handle_wait w = { dev, *handle };

	if (complete_now(dev, handle))
		return 0;
	return pyaeg_wait(wait_handle_slice, &w, seconds);
}

/* ---------------------------------------------------------------- loads */

/*
 * Start loading @path (@slice: a rank's part of each tensor; NULL: whole)
 * onto @gpu through the session. Inside a job a model the job holds
 * already (its --aegaeon-prefetch, an earlier step; with an equal slice) is
 * reused, as aegaeon-cli prefetch does: nothing is read again, and it stays
 * the job's (not owned). The library's code with its detail.
 */
static int load_locked(const char *path, int gpu, uint64_t chunk_bytes, enum aeg_prefetch_format format,
		       const struct aeg_slice *slice, aeg_model_t **m)
{
	struct aeg_load_request req = { .path = path, .gpu = gpu, .chunk_bytes = chunk_bytes, .format = format,
					.slice = slice };
	aeg_device_t *dev;
	char detail[1024];
	int err;

	if ((err = pyaeg_device_locked(&dev)) < 0 || (err = pyaeg_check_gpu_locked(gpu)) < 0)
		return err;
	if (pyaeg_rt.job != NULL)
		req.flags |= AEG_LOAD_REUSE;
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_session_load(pyaeg_rt.sess, &req, m);
	PYAEG_END_ALLOW_THREADS
	if (err < 0 && slice != NULL && strstr(aeg_error_detail(), "AEG_SLICE_UNEVEN") != NULL) {
		snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
		err = aeg_fail(err, "%s (tp_uneven=True sets AEG_SLICE_UNEVEN)", detail);
	}
	return err;
}

int pyaeg_load(const char *path, int gpu, uint64_t chunk_bytes, enum aeg_prefetch_format format,
	       const struct aeg_slice *slice, struct pyaeg_load *l)
{
	int rc;

	memset(l, 0, sizeof(*l));
	pyaeg_lock();
	rc = load_locked(path, gpu, chunk_bytes, format, slice, &l->m);
	if (rc == 0) {
		l->gpu = gpu;
		l->host = pyaeg_rt.kind == AEG_DEVICE_HOST;
		pyaeg_rt.objects++;
		pyaeg_rt.gpus[gpu].views++;
	}
	pyaeg_unlock();
	if (rc < 0) {
		pyaeg_raise(rc);
		return -1;
	}
	return 0;
}

void pyaeg_load_drop(struct pyaeg_load *l, int release)
{
	aeg_model_t *m = l->m;

	if (m == NULL)
		return;
	l->m = NULL;
	pyaeg_lock();
	PYAEG_BEGIN_ALLOW_THREADS
	/* A fork() child's model is the parent's: its engine is not in this process. */
	if (!pyaeg_rt.inherited) {
		/* Released already by release_all_prefetch_events(): nothing left to free. */
		if (release && aeg_model_owned(m))
			aeg_model_release(m);
		else
			aeg_model_close(m);
		aeg_error_clear();
	}
	PYAEG_END_ALLOW_THREADS
	if (pyaeg_rt.gpus != NULL && l->gpu < pyaeg_rt.gpu_count)
		pyaeg_rt.gpus[l->gpu].views--;
	pyaeg_rt.objects--;
	pyaeg_unlock();
}

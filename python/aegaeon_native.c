/* The aegaeon_native module: runtime (device, prefetch engines, events), errors and module functions. */
#include "py_internal.h"
#include "internal.h"

#include <unistd.h>

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WAIT_SLICE_MS 100

/* Per-GPU state of the module's own work. */
struct gpu_state {
	aeg_stream_t *stream;           /* records create_event_handle_bytes events */
	Py_ssize_t views;               /* chunk views and tensor loads alive */
};

struct mod_event {
	struct mod_event *next;
	aeg_event_t *ev;
	aeg_handle_t handle;
};

/*
 * The runtime lock. It is only ever taken with the GIL released (pyaeg_lock),
 * so a thread holding it may release and retake the GIL without deadlock.
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

/* One runtime per process, under the runtime lock. */
static struct {
	int kind_set;                   /* set_device()/configure() chose the backend */
	enum aeg_device_kind kind;
	aeg_session_t *sess;            /* where models load: the job's agent, or this process */
	aeg_device_t *dev;              /* the session's */
	aeg_job_t *job;                 /* the session's job; NULL outside one */
	int gpu_count;                  /* GPUs this process sees */
	struct gpu_state *gpus;
	struct mod_event *events;
	uint64_t nevents;
	struct pyaeg_res *res;          /* newest first */
	long objects;                   /* Python objects holding C resources */
	char prefetch_slab[64];         /* configure(prefetch_slab=...) */
	int prefetch_threads;           /* configure(prefetch_threads=...); 0: the config's */
	int waits;                      /* waits running with the GIL released */
	int atexit_set;
	int attach;                     /* configure(attach=): -1 auto ($AEGAEON_SOCKET), 0, 1 */
} rt = { .attach = -1 };

PyObject *pyaeg_error_type;
static PyObject *timeout_error_type;
static PyObject *value_error_type;

/* ----------------------------------------------------------------- errors */

static PyObject *raise_text(int code, const char *text)
{
	PyObject *type, *exc, *args = NULL, *v;
	const char *name = aeg_errname(code);

	type = code == AEG_ETIMEDOUT ? timeout_error_type :
	       code == AEG_EINVAL || code == AEG_ERANGE ? value_error_type : pyaeg_error_type;
	/* errno-like codes give OSError's (errno, strerror); project codes only a message. */
	if (code < 0 && code > -4000)
		args = Py_BuildValue("(is)", -code, text);
	else
		args = Py_BuildValue("(s)", text);
	if (args == NULL)
		return NULL;
	exc = PyObject_CallObject(type, args);
	Py_DECREF(args);
	if (exc == NULL)
		return NULL;
	v = PyLong_FromLong(code);
	if (v == NULL || PyObject_SetAttrString(exc, "code", v) < 0)
		goto fail;
	Py_DECREF(v);
	v = PyUnicode_FromString(name);
	if (v == NULL || PyObject_SetAttrString(exc, "name", v) < 0)
		goto fail;
	Py_DECREF(v);
	PyErr_SetObject(type, exc);
	Py_DECREF(exc);
	return NULL;
fail:
	Py_XDECREF(v);
	Py_DECREF(exc);
	return NULL;
}

PyObject *pyaeg_raise(int code)
{
	const char *detail = aeg_error_detail();
	char text[1200];

	if (detail[0] != '\0')
		snprintf(text, sizeof(text), "%s: %s", aeg_strerror(code), detail);
	else
		snprintf(text, sizeof(text), "%s", aeg_strerror(code));
	return raise_text(code, text);
}

PyObject *pyaeg_raise_msg(int code, const char *fmt, ...)
{
	char text[1200];
	size_t len;
	va_list ap;

	len = (size_t)snprintf(text, sizeof(text), "%s: ", aeg_strerror(code));
	if (len >= sizeof(text))
		len = sizeof(text) - 1;
	va_start(ap, fmt);
	vsnprintf(text + len, sizeof(text) - len, fmt, ap);
	va_end(ap);
	return raise_text(code, text);
}

/* -------------------------------------------------------- argument helpers */

const char *pyaeg_tname(PyObject *obj)
{
	static char buf[96];    /* the GIL serialises callers */
	PyObject *name = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), "__name__");
	const char *s = name != NULL ? PyUnicode_AsUTF8AndSize(name, NULL) : NULL;

	snprintf(buf, sizeof(buf), "%s", s != NULL ? s : "?");
	if (s == NULL)
		PyErr_Clear();
	Py_XDECREF(name);
	return buf;
}

int pyaeg_u64(PyObject *obj, const char *what, int allow_zero, uint64_t *out)
{
	unsigned long long v;
	PyObject *zero;
	int negative;

	if (!PyLong_Check(obj) || PyBool_Check(obj)) {
		PyErr_Format(PyExc_TypeError, "%s must be an int, not %s", what, pyaeg_tname(obj));
		return -1;
	}
	zero = PyLong_FromLong(0);
	negative = zero == NULL ? -1 : PyObject_RichCompareBool(obj, zero, Py_LT);
	Py_XDECREF(zero);
	if (negative != 0) {
		if (negative > 0)
			PyErr_Format(PyExc_ValueError, "%s must not be negative (got %R)", what, obj);
		return -1;
	}
	v = PyLong_AsUnsignedLongLong(obj);
	if (v == (unsigned long long)-1 && PyErr_Occurred()) {
		PyErr_Clear();
		PyErr_Format(PyExc_ValueError, "%s %R does not fit in 64 bits", what, obj);
		return -1;
	}
	if (v == 0 && !allow_zero) {
		PyErr_Format(PyExc_ValueError, "%s must be greater than 0", what);
		return -1;
	}
	*out = v;
	return 0;
}

int pyaeg_gpu(PyObject *obj, int *gpu)
{
	uint64_t v;

	if (pyaeg_u64(obj, "gpu_id", 1, &v) < 0)
		return -1;
	if (v > 1023) {
		PyErr_Format(PyExc_ValueError, "gpu_id %llu is out of range (0..1023)", (unsigned long long)v);
		return -1;
	}
	*gpu = (int)v;
	return 0;
}

int pyaeg_timeout(PyObject *obj, double *seconds)
{
	double v;

	if (obj == NULL || obj == Py_None) {
		*seconds = -1;
		return 0;
	}
	if (!PyLong_Check(obj) && !PyFloat_Check(obj)) {
		PyErr_Format(PyExc_TypeError, "timeout must be a number of seconds or None, not %s",
			     pyaeg_tname(obj));
		return -1;
	}
	v = PyFloat_AsDouble(obj);
	if (v == -1.0 && PyErr_Occurred())
		return -1;
	if (isnan(v) || v < 0) {
		PyErr_Format(PyExc_ValueError, "timeout must be >= 0 seconds or None (got %R)", obj);
		return -1;
	}
	*seconds = v;
	return 0;
}

int pyaeg_handle(PyObject *obj, aeg_handle_t *handle)
{
	char *data;
	Py_ssize_t len;

	if (PyBytes_Check(obj)) {
		if (PyBytes_AsStringAndSize(obj, &data, &len) < 0)
			return -1;
	} else if (PyByteArray_Check(obj)) {
		data = PyByteArray_AsString(obj);
		len = PyByteArray_Size(obj);
	} else {
		PyErr_Format(PyExc_TypeError, "an event handle must be bytes, not %s", pyaeg_tname(obj));
		return -1;
	}
	if (len != AEG_HANDLE_BYTES) {
		PyErr_Format(PyExc_ValueError, "an event handle has %d bytes, not %zd", AEG_HANDLE_BYTES, len);
		return -1;
	}
	memcpy(handle->bytes, data, AEG_HANDLE_BYTES);
	return 0;
}

PyObject *pyaeg_handle_bytes(const aeg_handle_t *handle)
{
	return PyBytes_FromStringAndSize((const char *)handle->bytes, AEG_HANDLE_BYTES);
}

/* @seq as a new list, or NULL with TypeError for what is no sequence of ints. */
static PyObject *int_sequence(PyObject *seq, const char *what)
{
	PyObject *fast;

	if (PyUnicode_Check(seq) || PyBytes_Check(seq) || PyLong_Check(seq)) {
		PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints, not %s", what, pyaeg_tname(seq));
		return NULL;
	}
	fast = PySequence_List(seq);
	if (fast == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
		PyErr_Clear();
		PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints, not %s", what, pyaeg_tname(seq));
	}
	return fast;
}

int pyaeg_id_list(PyObject *seq, const char *what, uint32_t max, uint32_t **idsp, size_t *np)
{
	PyObject *fast = int_sequence(seq, what);
	uint32_t *ids = NULL;
	Py_ssize_t n;
	uint64_t v;

	if (fast == NULL)
		return -1;
	n = PyList_Size(fast);
	ids = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(*ids));
	if (ids == NULL) {
		Py_DECREF(fast);
		PyErr_NoMemory();
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (pyaeg_u64(PyList_GetItem(fast, i), what, 1, &v) < 0)
			goto fail;
		if (v >= max) {
			PyErr_Format(PyExc_ValueError, "%s[%zd] = %llu is out of range (0..%u)", what, i,
				     (unsigned long long)v, max - 1);
			goto fail;
		}
		ids[i] = (uint32_t)v;
	}
	Py_DECREF(fast);
	*idsp = ids;
	*np = (size_t)n;
	return 0;
fail:
	Py_DECREF(fast);
	PyMem_Free(ids);
	return -1;
}

int pyaeg_u64_list(PyObject *seq, const char *what, uint64_t **out, size_t *np)
{
	PyObject *fast = int_sequence(seq, what);
	uint64_t *v;
	Py_ssize_t n;

	if (fast == NULL)
		return -1;
	n = PyList_Size(fast);
	v = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(*v));
	if (v == NULL) {
		Py_DECREF(fast);
		PyErr_NoMemory();
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (pyaeg_u64(PyList_GetItem(fast, i), what, 1, &v[i]) < 0) {
			Py_DECREF(fast);
			PyMem_Free(v);
			return -1;
		}
	}
	Py_DECREF(fast);
	*out = v;
	*np = (size_t)n;
	return 0;
}

int pyaeg_dict_set(PyObject *dict, const char *key, PyObject *value)
{
	int rc;

	if (value == NULL)
		return -1;
	rc = PyDict_SetItemString(dict, key, value);
	Py_DECREF(value);
	return rc;
}

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
		__atomic_add_fetch(&rt.waits, 1, __ATOMIC_SEQ_CST);
		err = fn(arg, slice);
		__atomic_sub_fetch(&rt.waits, 1, __ATOMIC_SEQ_CST);
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

/* ---------------------------------------------------------------- runtime */

/*
 * Takes the runtime lock; the caller does not hold the GIL. @finalizer: the
 * caller is the thread finalizing the interpreter, which may take the lock
 * over from a holder parked at the GIL.
 */
static void rtlock_take(int finalizer)
{
	pthread_mutex_lock(&rtlock.mu);
	while (rtlock.held && !(finalizer && rtlock.parked))
		pthread_cond_wait(&rtlock.cond, &rtlock.mu);
	rtlock.held = 1;
	rtlock.parked = 0;
	pthread_mutex_unlock(&rtlock.mu);
	rtlock_mine = 1;
}

static void rtlock_give(void)
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
static int is_finalizer(void)
{
	return !Py_IsInitialized();
}

void pyaeg_lock(void)
{
	int finalizer = is_finalizer();

	PYAEG_BEGIN_ALLOW_THREADS
	rtlock_take(finalizer);
	PYAEG_END_ALLOW_THREADS
}

void pyaeg_unlock(void)
{
	rtlock_give();
}

void pyaeg_object_born(void)
{
	rt.objects++;
}

void pyaeg_object_gone(void)
{
	rt.objects--;
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
	if (res->slab != NULL && res->job_lease && rt.job != NULL)
		aeg_job_slab_return(rt.job, res->slab);
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
	res->next = rt.res;
	if (rt.res != NULL)
		rt.res->prev = res;
	rt.res = res;
	pyaeg_unlock();
	return res;
}

void pyaeg_res_free(struct pyaeg_res *res)
{
	int finalizer;

	if (res == NULL)
		return;
	finalizer = is_finalizer();
	PYAEG_BEGIN_ALLOW_THREADS
	rtlock_take(finalizer);
	res_destroy(res);
	if (res->prev != NULL)
		res->prev->next = res->next;
	else
		rt.res = res->next;
	if (res->next != NULL)
		res->next->prev = res->prev;
	rtlock_give();
	PYAEG_END_ALLOW_THREADS
	free(res);
}

static void atexit_teardown(void);

/* Anything that still uses the device: objects, views, events, waits, loaded chunks. */
static int busy_locked(void)
{
	int busy = rt.objects > 0 || rt.res != NULL || rt.events != NULL || rt.waits > 0;

	for (int i = 0; !busy && i < rt.gpu_count; i++)
		busy = rt.gpus[i].views > 0;
	if (!busy && rt.sess != NULL && rt.job == NULL)
		busy = aeg_session_owned_blocks(rt.sess) > 0;
	return busy;
}

/* The engines' settings of configure(); NULL @engine when none is set. */
static void engine_settings(struct aeg_prefetch_config *engine, const struct aeg_prefetch_config **use)
{
	*use = NULL;
	if (rt.prefetch_threads) {
		aeg_prefetch_config_defaults(engine);
		engine->threads = rt.prefetch_threads;
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

	if (rt.attach == 1 || (rt.attach < 0 && sock != NULL && sock[0] != '\0'))
		cfg.mode = AEG_SESSION_JOB;
	if (rt.kind_set && cfg.mode == AEG_SESSION_LOCAL) {
		cfg.flags |= AEG_SESSION_DEVICE_SET;
		cfg.device = rt.kind;
	}
	cfg.slab = rt.prefetch_slab[0] ? rt.prefetch_slab : NULL;
	engine_settings(&engine, &cfg.engine);
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_session_open(&cfg, &sess);
	if (err == 0)
		err = aeg_device_count(aeg_session_device(sess), &count);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		if (cfg.mode == AEG_SESSION_JOB)
			pyaeg_raise_msg(err, "attaching to the job's agent (AEGAEON_SOCKET=%s; configure(attach=False) works without it): %s",
					sock ? sock : "", aeg_error_detail());
		else
			pyaeg_raise(err);
		aeg_session_close(sess);
		return err;
	}
	if (cfg.mode == AEG_SESSION_JOB && rt.kind_set && rt.kind != aeg_device_kind(aeg_session_device(sess))) {
		pyaeg_raise_msg(AEG_EINVAL, "set_device(\"%s\") but the job's agent uses the %s device",
				aeg_device_kind_name(rt.kind),
				aeg_device_kind_name(aeg_device_kind(aeg_session_device(sess))));
		aeg_session_close(sess);
		return AEG_EINVAL;
	}
	rt.gpus = calloc((size_t)(count ? count : 1), sizeof(*rt.gpus));
	if (rt.gpus == NULL) {
		aeg_session_close(sess);
		PyErr_NoMemory();
		return AEG_ENOMEM;
	}
	rt.sess = sess;
	rt.dev = aeg_session_device(sess);
	rt.job = aeg_session_job(sess);
	rt.gpu_count = count;
	rt.kind = aeg_device_kind(rt.dev);
	if (!rt.atexit_set && Py_AtExit(atexit_teardown) == 0)
		rt.atexit_set = 1;
	return 0;
}

static int device_locked(aeg_device_t **dev)
{
	int err = 0;

	if (rt.dev == NULL)
		err = open_device_locked();
	if (err < 0)
		return -1;
	*dev = rt.dev;
	return 0;
}

int pyaeg_device(aeg_device_t **dev)
{
	int rc;

	pyaeg_lock();
	rc = device_locked(dev);
	pyaeg_unlock();
	return rc;
}

static int check_gpu_locked(int gpu)
{
	if (gpu >= rt.gpu_count) {
		pyaeg_raise_msg(AEG_ENODEV, "GPU %d: this process sees %d GPU%s on the %s backend", gpu,
				rt.gpu_count, rt.gpu_count == 1 ? "" : "s", aeg_device_kind_name(rt.kind));
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------- job */

/* The job slab of GPU @gpu as this process numbers it; -1 with AegaeonError ENODEV. */
static int job_index_locked(int gpu)
{
	struct aeg_job_slab_desc d;
	struct aeg_job_info info;

	if (aeg_job_get_info(rt.job, &info) == 0)
		for (int i = 0; i < info.slabs; i++)
			if (aeg_job_slab_describe(rt.job, i, &d) == 0 && d.gpu == gpu)
				return i;
	aeg_error_clear();
	pyaeg_raise_msg(AEG_ENODEV, "GPU %d has no slab of this job (the agent holds %d slab%s)", gpu,
			info.slabs, info.slabs == 1 ? "" : "s");
	return -1;
}

int pyaeg_job_slab(int gpu, uint64_t bytes, aeg_slab_t **slab)
{
	aeg_device_t *dev;
	int idx, err, rc = -1;

	pyaeg_lock();
	if (device_locked(&dev) < 0)
		goto out;
	if (rt.job == NULL) {
		rc = 0;
		goto out;
	}
	if ((idx = job_index_locked(gpu)) < 0)
		goto out;
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_job_slab(rt.job, idx, bytes, slab);
	PYAEG_END_ALLOW_THREADS
	if (err < 0)
		pyaeg_raise(err);
	else
		rc = 1;
out:
	pyaeg_unlock();
	return rc;
}

aeg_pool_t *pyaeg_job_pool(void)
{
	aeg_pool_t *pool = NULL;
	aeg_device_t *dev;

	pyaeg_lock();
	if (device_locked(&dev) == 0) {
		if (rt.job == NULL)
			pyaeg_raise_msg(AEG_ENOENT, "not inside an aegaeon job (AEGAEON_SOCKET is not set)");
		else if ((pool = aeg_job_pool(rt.job)) == NULL)
			pyaeg_raise_msg(AEG_ENOENT, "the job has no pinned pool (--aegaeon-pinned)");
	}
	pyaeg_unlock();
	return pool;
}

static void drop_events_locked(void)
{
	while (rt.events != NULL) {
		struct mod_event *e = rt.events;

		rt.events = e->next;
		aeg_event_destroy(e->ev);
		free(e);
	}
	rt.nevents = 0;
}

/*
 * Everything the runtime holds; with @close_device, objects still alive
 * are destroyed and the session closed (a job's models stay with its
 * agent). Without, this process's own loaded chunks are freed.
 */
static void teardown_locked(int close_device)
{
	drop_events_locked();
	for (int i = 0; rt.gpus != NULL && i < rt.gpu_count; i++) {
		if (rt.gpus[i].stream != NULL)
			aeg_stream_destroy(rt.gpus[i].stream);
		rt.gpus[i].stream = NULL;
	}
	if (!close_device) {
		if (rt.sess != NULL && rt.job == NULL)
			aeg_session_release_all(rt.sess, 0, NULL);
		return;
	}
	for (struct pyaeg_res *r = rt.res; r != NULL; r = r->next)
		res_destroy(r);
	/* A daemon thread may still wait on the device: leave it to process exit. */
	if (rt.sess != NULL && rt.waits == 0) {
		aeg_session_close(rt.sess);
		rt.sess = NULL;
		rt.dev = NULL;
		rt.job = NULL;
		free(rt.gpus);
		rt.gpus = NULL;
		rt.gpu_count = 0;
	}
}

/* Py_AtExit: after the interpreter is gone, in the thread that finalized it; no Python API here. */
static void atexit_teardown(void)
{
	rtlock_take(1);
	teardown_locked(1);
	while (rt.res != NULL) {
		struct pyaeg_res *r = rt.res;

		rt.res = r->next;
		free(r);
	}
	rtlock_give();
}

static int stream_locked(int gpu, aeg_stream_t **stream)
{
	struct gpu_state *g = &rt.gpus[gpu];
	int err = 0;

	if (g->stream == NULL) {
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_stream_create(rt.dev, gpu, &g->stream);
		PYAEG_END_ALLOW_THREADS
		if (err < 0) {
			pyaeg_raise(err);
			return -1;
		}
	}
	*stream = g->stream;
	return 0;
}

/* ------------------------------------------------------------ device choice */

PyDoc_STRVAR(set_device_doc,
"set_device(kind)\n--\n\n"
"Choose the device backend: \"cuda\" (GPUs through CUDA) or \"host\" (a real\n"
"implementation in host memory, for machines without a GPU). Without a call\n"
"the backend is $AEGAEON_DEVICE, else the `device` key of aegaeon.conf\n"
"($AEGAEON_CONFIG or /etc/aegaeon/aegaeon.conf), else \"cuda\". The device is\n"
"opened at first use; switching backends afterwards needs every object of the\n"
"module gone and release_all_prefetch_events() called (AegaeonError EBUSY\n"
"otherwise). A cuda backend that fails to open is an error, never host.");

static int set_kind(const char *text)
{
	enum aeg_device_kind kind;
	int busy = 0, err;

	err = aeg_device_kind_parse(text, &kind);
	if (err < 0) {
		PyErr_Format(PyExc_ValueError, "device must be \"cuda\" or \"host\", not \"%s\"", text);
		return -1;
	}
	pyaeg_lock();
	if (rt.dev != NULL && rt.kind != kind) {
		busy = busy_locked();
		if (!busy) {
			PYAEG_BEGIN_ALLOW_THREADS
			teardown_locked(1);
			PYAEG_END_ALLOW_THREADS
		}
	}
	if (!busy) {
		rt.kind = kind;
		rt.kind_set = 1;
	}
	pyaeg_unlock();
	if (busy) {
		pyaeg_raise_msg(AEG_EBUSY, "the %s device is in use (objects, prefetched chunks or events alive): release them before switching to %s",
				aeg_device_kind_name(rt.kind), text);
		return -1;
	}
	return 0;
}

static PyObject *py_set_device(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "kind", NULL };
	const char *text;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "s:set_device", kwlist, &text))
		return NULL;
	if (set_kind(text) < 0)
		return NULL;
	Py_RETURN_NONE;
}

PyDoc_STRVAR(device_doc,
"device()\n--\n\n"
"The backend in use, \"cuda\" or \"host\"; opens the device if needed.");

static PyObject *py_device(PyObject *self, PyObject *unused)
{
	aeg_device_t *dev;

	if (pyaeg_device(&dev) < 0)
		return NULL;
	return PyUnicode_FromString(aeg_device_kind_name(aeg_device_kind(dev)));
}

PyDoc_STRVAR(configure_doc,
"configure(*, device=None, prefetch_slab=None, prefetch_threads=None, attach=None)\n--\n\n"
"Settings of the module's own resources. device as set_device().\n"
"prefetch_slab: size of the slab each GPU's prefetch engine loads into, a\n"
"size string (\"8GiB\", \"90%\" of the GPU's free memory) or bytes; default\n"
"$AEGAEON_PREFETCH_SLAB, else aegaeon.conf's slab_default (\"90%\").\n"
"prefetch_threads: the engine's worker threads (1..256; default aegaeon.conf's\n"
"prefetch_threads). An engine is made at a GPU's first load and kept (the\n"
"next load pays no set-up); new prefetch settings remake idle engines, and\n"
"are AegaeonError EBUSY while one holds chunks (release_all_prefetch_events()).\n"
"attach: inside an aegaeon job ($AEGAEON_SOCKET set) the module attaches to\n"
"the job's agent at first use: prefetches, slabs and the pool are the job's.\n"
"False works in-process instead, True insists on a job; before first use only.");

static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "device", "prefetch_slab", "prefetch_threads", "attach", NULL };
	PyObject *device = Py_None, *slab = Py_None, *threads = Py_None, *attach = Py_None;
	struct aeg_size_spec spec;
	char text[64] = "";
	uint64_t nthreads = 0;
	int busy = 0, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOOO:configure", kwlist, &device, &slab, &threads,
					 &attach))
		return NULL;
	if (attach != Py_None && !PyBool_Check(attach))
		return PyErr_Format(PyExc_TypeError, "attach must be True, False or None, not %s", pyaeg_tname(attach));
	if (device != Py_None && !PyUnicode_Check(device))
		return PyErr_Format(PyExc_TypeError, "device must be a str, not %s", pyaeg_tname(device));
	if (slab != Py_None) {
		if (PyLong_Check(slab) && !PyBool_Check(slab)) {
			uint64_t bytes;

			if (pyaeg_u64(slab, "prefetch_slab", 0, &bytes) < 0)
				return NULL;
			snprintf(text, sizeof(text), "%" PRIu64, bytes);
		} else if (PyUnicode_Check(slab)) {
			const char *s = PyUnicode_AsUTF8AndSize(slab, NULL);

			if (s == NULL)
				return NULL;
			if (strlen(s) >= sizeof(text))
				return PyErr_Format(PyExc_ValueError, "prefetch_slab \"%.40s...\" is too long", s);
			snprintf(text, sizeof(text), "%s", s);
		} else {
			return PyErr_Format(PyExc_TypeError, "prefetch_slab must be a size string or an int, not %s",
					    pyaeg_tname(slab));
		}
		err = aeg_size_spec_parse(text, &spec);
		if (err < 0)
			return PyErr_Format(PyExc_ValueError, "prefetch_slab: %s", aeg_error_detail());
		if (!spec.is_percent && spec.bytes == 0)
			return PyErr_Format(PyExc_ValueError, "prefetch_slab must be greater than 0");
	}
	if (threads != Py_None) {
		if (pyaeg_u64(threads, "prefetch_threads", 0, &nthreads) < 0)
			return NULL;
		if (nthreads > 256)
			return PyErr_Format(PyExc_ValueError, "prefetch_threads %llu is out of range (1..256)",
					    (unsigned long long)nthreads);
	}
	if (attach != Py_None) {
		int open;

		pyaeg_lock();
		open = rt.dev != NULL;
		if (!open)
			rt.attach = attach == Py_True;
		pyaeg_unlock();
		if (open)
			return pyaeg_raise_msg(AEG_EBUSY, "the device is open already: configure(attach=...) must come first");
	}
	if (device != Py_None && set_kind(PyUnicode_AsUTF8AndSize(device, NULL)) < 0)
		return NULL;
	if (text[0] == '\0' && nthreads == 0)
		Py_RETURN_NONE;
	err = 0;
	pyaeg_lock();
	if (rt.sess != NULL && rt.job == NULL) {
		struct aeg_prefetch_config engine;
		const struct aeg_prefetch_config *use;
		char old_slab[64];
		int old_threads = rt.prefetch_threads;

		snprintf(old_slab, sizeof(old_slab), "%s", rt.prefetch_slab);
		if (text[0] != '\0')
			snprintf(rt.prefetch_slab, sizeof(rt.prefetch_slab), "%s", text);
		if (nthreads != 0)
			rt.prefetch_threads = (int)nthreads;
		engine_settings(&engine, &use);
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_session_set_engine(rt.sess, rt.prefetch_slab[0] ? rt.prefetch_slab : NULL, use);
		PYAEG_END_ALLOW_THREADS
		busy = err == AEG_EBUSY;
		if (err) {
			snprintf(rt.prefetch_slab, sizeof(rt.prefetch_slab), "%s", old_slab);
			rt.prefetch_threads = old_threads;
		}
	} else {
		if (text[0] != '\0')
			snprintf(rt.prefetch_slab, sizeof(rt.prefetch_slab), "%s", text);
		if (nthreads != 0)
			rt.prefetch_threads = (int)nthreads;
	}
	pyaeg_unlock();
	if (busy)
		return pyaeg_raise_msg(AEG_EBUSY, "a prefetch engine holds loaded chunks: call release_all_prefetch_events() first");
	if (err)
		return pyaeg_raise(err);
	Py_RETURN_NONE;
}

PyDoc_STRVAR(gpu_info_doc,
"gpu_info(gpu_id=0)\n--\n\n"
"{\"index\", \"name\", \"total_bytes\", \"free_bytes\", \"pci_bus_id\"} of a GPU\n"
"of the backend in use. device_count() tells how many there are.");

static PyObject *py_gpu_info(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "gpu_id", NULL };
	PyObject *gpu_obj = NULL;
	struct aeg_gpu_info info;
	aeg_device_t *dev;
	int gpu = 0, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:gpu_info", kwlist, &gpu_obj))
		return NULL;
	if (gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0)
		return NULL;
	if (pyaeg_device(&dev) < 0)
		return NULL;
	err = aeg_device_gpu_info(dev, gpu, &info);
	if (err < 0)
		return pyaeg_raise(err);
	return Py_BuildValue("{s:i,s:s,s:K,s:K,s:s}", "index", info.index, "name", info.name,
			     "total_bytes", (unsigned long long)info.total_bytes,
			     "free_bytes", (unsigned long long)info.free_bytes,
			     "pci_bus_id", info.pci_bus_id);
}

PyDoc_STRVAR(device_count_doc,
"device_count()\n--\n\n"
"GPUs of the backend in use (the host backend shows $AEGAEON_HOST_GPUS, default 1).");

static PyObject *py_device_count(PyObject *self, PyObject *unused)
{
	aeg_device_t *dev;
	int count;

	if (pyaeg_device(&dev) < 0)
		return NULL;
	pyaeg_lock();
	count = rt.gpu_count;
	pyaeg_unlock();
	return PyLong_FromLong(count);
}

/* ------------------------------------------------------------------ events */

PyDoc_STRVAR(create_event_doc,
"create_event_handle_bytes(gpu_id=0)\n--\n\n"
"Create an interprocess event on a GPU, record it now on the module's stream\n"
"of that GPU, and return its 64-byte handle. Any process of the same user can\n"
"wait on it with wait_event_handle_bytes(). The module keeps the event alive\n"
"until release_event_handle_bytes(handle), release_all_prefetch_events() or\n"
"interpreter exit.");

static PyObject *py_create_event(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "gpu_id", NULL };
	PyObject *gpu_obj = NULL;
	struct mod_event *e;
	aeg_stream_t *stream;
	aeg_device_t *dev;
	int gpu = 0, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:create_event_handle_bytes", kwlist, &gpu_obj))
		return NULL;
	if (gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0)
		return NULL;
	e = calloc(1, sizeof(*e));
	if (e == NULL)
		return PyErr_NoMemory();
	pyaeg_lock();
	if (device_locked(&dev) < 0 || check_gpu_locked(gpu) < 0 || stream_locked(gpu, &stream) < 0)
		goto fail;
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_event_create(dev, gpu, &e->ev, &e->handle);
	if (err == 0) {
		err = aeg_event_record(e->ev, stream);
		if (err < 0) {
			/* keep the record's detail, not the destroy's */
			char detail[1024];

			snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
			aeg_event_destroy(e->ev);
			e->ev = NULL;
			aeg_log(AEG_LOG_DEBUG, "event record failed: %s", detail);
		}
	}
	/* Listed before the GIL is retaken: a thread stopped there by finalization leaves no event unlisted. */
	if (err == 0) {
		e->next = rt.events;
		rt.events = e;
		rt.nevents++;
	}
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		pyaeg_raise(err);
		goto fail;
	}
	pyaeg_unlock();
	return pyaeg_handle_bytes(&e->handle);
fail:
	pyaeg_unlock();
	free(e);
	return NULL;
}

PyDoc_STRVAR(release_event_doc,
"release_event_handle_bytes(handle)\n--\n\n"
"Destroy an event made by create_event_handle_bytes() in this process.\n"
"AegaeonError ENOENT for a handle the module does not hold.");

static PyObject *py_release_event(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "handle", NULL };
	struct mod_event *found = NULL;
	aeg_handle_t handle;
	PyObject *obj;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:release_event_handle_bytes", kwlist, &obj))
		return NULL;
	if (pyaeg_handle(obj, &handle) < 0)
		return NULL;
	pyaeg_lock();
	for (struct mod_event **pp = &rt.events; *pp != NULL; pp = &(*pp)->next) {
		if (memcmp((*pp)->handle.bytes, handle.bytes, AEG_HANDLE_BYTES) == 0) {
			found = *pp;
			*pp = found->next;
			rt.nevents--;
			break;
		}
	}
	if (found != NULL) {
		PYAEG_BEGIN_ALLOW_THREADS
		aeg_event_destroy(found->ev);
		PYAEG_END_ALLOW_THREADS
	}
	pyaeg_unlock();
	if (found == NULL)
		return pyaeg_raise_msg(AEG_ENOENT, "this process holds no event with that handle (released already, or made elsewhere)");
	free(found);
	Py_RETURN_NONE;
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
	if (rt.dev == dev)
		done = aeg_event_query_handle(dev, handle) == 0;
	rtlock_give();
	return done;
}

int pyaeg_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, double seconds)
{
	struct handle_wait w = { dev, *handle };

	if (complete_now(dev, handle))
		return 0;
	return pyaeg_wait(wait_handle_slice, &w, seconds);
}

PyDoc_STRVAR(wait_event_doc,
"wait_event_handle_bytes(handle, timeout=None)\n--\n\n"
"Wait until the event behind a 64-byte handle (from this or another process\n"
"of the same user) has completed. timeout is in seconds, None waits for ever.\n"
"The GIL is released while waiting; Ctrl-C interrupts. Raises\n"
"AegaeonTimeoutError (a TimeoutError) when the time runs out, AegaeonError\n"
"EBADF for a handle that cannot be opened (its owner released it or exited),\n"
"or the event's failure (ECANCELED for a cancelled prefetch).");

static PyObject *py_wait_event(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "handle", "timeout", NULL };
	PyObject *obj, *timeout_obj = Py_None;
	aeg_handle_t handle;
	aeg_device_t *dev;
	double seconds;
	int err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:wait_event_handle_bytes", kwlist, &obj,
					 &timeout_obj))
		return NULL;
	if (pyaeg_handle(obj, &handle) < 0 || pyaeg_timeout(timeout_obj, &seconds) < 0)
		return NULL;
	if (pyaeg_device(&dev) < 0)
		return NULL;
	err = pyaeg_wait_handle(dev, &handle, seconds);
	if (err == PYAEG_SIGNALLED)
		return NULL;
	if (err == AEG_ETIMEDOUT)
		return pyaeg_raise_msg(err, "the event did not complete within %g s", seconds);
	if (err < 0)
		return pyaeg_raise(err);
	Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- prefetch */

/*
 * Start loading @path onto @gpu through the session. Inside a job a model
 * the job holds already (its --aegaeon-prefetch, an earlier step) is
 * reused, as aegaeon-cli prefetch does: nothing is read again, and it stays
 * the job's (not owned). -1 with an exception.
 */
static int load_locked(const char *path, int gpu, uint64_t chunk_bytes, enum aeg_prefetch_format format,
		       aeg_model_t **m)
{
	struct aeg_load_request req = { .path = path, .gpu = gpu, .chunk_bytes = chunk_bytes, .format = format };
	aeg_device_t *dev;
	int err;

	if (device_locked(&dev) < 0 || check_gpu_locked(gpu) < 0)
		return -1;
	if (rt.job != NULL)
		req.flags |= AEG_LOAD_REUSE;
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_session_load(rt.sess, &req, m);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	return 0;
}

int pyaeg_load(const char *path, int gpu, uint64_t chunk_bytes, enum aeg_prefetch_format format,
	       struct pyaeg_load *l)
{
	int rc;

	memset(l, 0, sizeof(*l));
	pyaeg_lock();
	rc = load_locked(path, gpu, chunk_bytes, format, &l->m);
	if (rc == 0) {
		l->gpu = gpu;
		l->host = rt.kind == AEG_DEVICE_HOST;
		rt.objects++;
		rt.gpus[gpu].views++;
	}
	pyaeg_unlock();
	return rc;
}

void pyaeg_load_drop(struct pyaeg_load *l, int release)
{
	aeg_model_t *m = l->m;

	if (m == NULL)
		return;
	l->m = NULL;
	pyaeg_lock();
	PYAEG_BEGIN_ALLOW_THREADS
	/* Released already by release_all_prefetch_events(): nothing left to free. */
	if (release && aeg_model_owned(m))
		aeg_model_release(m);
	else
		aeg_model_close(m);
	aeg_error_clear();
	PYAEG_END_ALLOW_THREADS
	if (rt.gpus != NULL && l->gpu < rt.gpu_count)
		rt.gpus[l->gpu].views--;
	rt.objects--;
	pyaeg_unlock();
}

int pyaeg_path(PyObject *obj, PyObject **bytes)
{
	if (!PyUnicode_Check(obj) && !PyBytes_Check(obj) &&
	    !PyObject_HasAttrString(obj, "__fspath__")) {
		PyErr_Format(PyExc_TypeError, "filepath must be a str, bytes or os.PathLike, not %s",
			     pyaeg_tname(obj));
		return -1;
	}
	return PyUnicode_FSConverter(obj, bytes) ? 0 : -1;
}

PyDoc_STRVAR(prefetch_doc,
"prefetch_file_to_gpu_chunks(filepath, gpu_id, chunk_bytes=33554432)\n--\n\n"
"Start loading a file into the prefetch slab of a GPU and return at once, before\n"
"the bytes are there: one dict per chunk, in file order, with the seed's keys\n"
"{\"device_ptr\": int, \"size\": int, \"event_handle\": bytes, \"slab_id\": int}\n"
"and where it comes from: \"file\" (the path), \"file_offset\" (of its first\n"
"byte) and \"tensors\", [(name, offset), ...] of the safetensors tensors that\n"
"start in or cover the chunk, offset being where the tensor starts relative to\n"
"the chunk's first byte (negative for one that began in an earlier chunk).\n"
"Wait for a chunk with wait_event_handle_bytes(chunk[\"event_handle\"]) (any\n"
"process of the user); consumers can start on chunk 0 while later chunks load.\n"
"Safetensors files (by content) are chunked along tensor boundaries, so\n"
"several chunks may share a slab_id. Chunks stay on the GPU until\n"
"release_prefetch_chunks() or release_all_prefetch_events(). The engine's slab\n"
"is made at the first call for a GPU and kept (see configure()). Errors: AegaeonError\n"
"ENOENT/EACCES (the file), EINVAL (chunk_bytes over the slab), ENOSPC (slab\n"
"full; the message has asked vs free), EFORMAT (bad safetensors header).");

static PyObject *py_prefetch(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "filepath", "gpu_id", "chunk_bytes", NULL };
	PyObject *path_obj, *gpu_obj, *chunk_obj = NULL, *path = NULL, *list;
	uint64_t chunk_bytes = PYAEG_DEFAULT_CHUNK_BYTES;
	struct pyaeg_load l;
	int gpu, rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:prefetch_file_to_gpu_chunks", kwlist,
					 &path_obj, &gpu_obj, &chunk_obj))
		return NULL;
	if (pyaeg_gpu(gpu_obj, &gpu) < 0 ||
	    (chunk_obj != NULL && pyaeg_u64(chunk_obj, "chunk_bytes", 0, &chunk_bytes) < 0) ||
	    pyaeg_path(path_obj, &path) < 0)
		return NULL;
	rc = pyaeg_load(PyBytes_AsString(path), gpu, chunk_bytes, AEG_FORMAT_AUTO, &l);
	Py_DECREF(path);
	if (rc < 0)
		return NULL;
	list = pyaeg_chunk_dicts(l.m);
	/* The chunks stay loaded, the handle goes (release is by slab id); no list, no load. */
	pyaeg_load_drop(&l, list == NULL);
	return list;
}

struct release_req {
	const uint64_t *ids;
	size_t n;
	int gpu;
};

/* A chunk of a load still in flight is released once that load is done. */
static int release_slice(void *arg, int timeout_ms)
{
	struct release_req *r = arg;

	return aeg_session_release(rt.sess, r->gpu, r->ids, r->n, timeout_ms, NULL);
}

PyDoc_STRVAR(release_chunks_doc,
"release_prefetch_chunks(slab_ids, gpu_id=None)\n--\n\n"
"Free the slab blocks (and the chunks' events) of the given slab ids from\n"
"prefetch_file_to_gpu_chunks(). A chunk whose file is still loading is\n"
"released once that load has finished (the GIL is released meanwhile). All ids\n"
"are checked first: an id no chunk holds is AegaeonError ENOENT and then\n"
"nothing is released. gpu_id is needed only when prefetches on several GPUs\n"
"hold the same id (ValueError otherwise). Repeated ids count once.");

static PyObject *py_release_chunks(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "slab_ids", "gpu_id", NULL };
	PyObject *seq, *gpu_obj = Py_None, *fast = NULL;
	struct release_req r = { .gpu = -1 };
	uint64_t *ids = NULL;
	Py_ssize_t n = 0;
	int rc = -1, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:release_prefetch_chunks", kwlist, &seq, &gpu_obj))
		return NULL;
	if (gpu_obj != Py_None && pyaeg_gpu(gpu_obj, &r.gpu) < 0)
		return NULL;
	if (PyLong_Check(seq) || PyUnicode_Check(seq) || PyBytes_Check(seq) ||
	    (fast = PySequence_List(seq)) == NULL) {
		PyErr_Clear();
		return PyErr_Format(PyExc_TypeError, "slab_ids must be a list of ints, not %s",
				    pyaeg_tname(seq));
	}
	n = PyList_Size(fast);
	ids = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(*ids));
	if (ids == NULL) {
		PyErr_NoMemory();
		goto out;
	}
	for (Py_ssize_t i = 0; i < n; i++)
		if (pyaeg_u64(PyList_GetItem(fast, i), "slab id", 1, &ids[i]) < 0)
			goto out;
	if (n == 0) {
		rc = 0;
		goto out;
	}
	r.ids = ids;
	r.n = (size_t)n;
	pyaeg_lock();
	if (rt.sess == NULL) {
		pyaeg_raise_msg(AEG_ENOENT, "slab id %llu holds no prefetched chunk (nothing was prefetched)",
				(unsigned long long)ids[0]);
	} else if (r.gpu < 0 || check_gpu_locked(r.gpu) == 0) {
		err = pyaeg_wait(release_slice, &r, -1);
		if (err < 0 && err != PYAEG_SIGNALLED)
			pyaeg_raise(err);
		rc = err < 0 ? -1 : 0;
	}
	pyaeg_unlock();
out:
	Py_XDECREF(fast);
	PyMem_Free(ids);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

PyDoc_STRVAR(release_all_doc,
"release_all_prefetch_events()\n--\n\n"
"Cancel loads in flight and release every prefetched chunk and its event on\n"
"every GPU, and destroy the events of create_event_handle_bytes(). In a job,\n"
"the chunks this process prefetched through the agent (other steps' stay).\n"
"Each GPU's prefetch slab and engine stay for the next load, which then pays\n"
"no set-up. Views of released chunks must not be read any more.");

static PyObject *py_release_all(PyObject *self, PyObject *unused)
{
	int err = 0;

	pyaeg_lock();
	PYAEG_BEGIN_ALLOW_THREADS
	if (rt.sess != NULL)
		err = aeg_session_release_all(rt.sess, 0, NULL);
	drop_events_locked();
	PYAEG_END_ALLOW_THREADS
	if (err < 0)
		pyaeg_raise(err);
	pyaeg_unlock();
	if (err < 0)
		return NULL;
	Py_RETURN_NONE;
}

/* ------------------------------------------------------------- chunk views */

PyDoc_STRVAR(chunk_view_doc,
"chunk_view(chunk, dtype=\"U8\")\n--\n\n"
"A zero-copy DeviceArray over a chunk dict of prefetch_file_to_gpu_chunks()\n"
"(one dimension of the chunk's bytes, as dtype), for torch.as_tensor() (cuda)\n"
"or numpy.asarray() (host). Wait on the chunk's event before reading it; the\n"
"view does not keep the chunk from being released.");

static PyObject *py_chunk_view(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "chunk", "dtype", NULL };
	PyObject *chunk, *v;
	const char *dtype = "U8";
	uint64_t ptr, size, id;
	int gpu = -1, err = AEG_ENOENT;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:chunk_view", kwlist, &chunk, &dtype))
		return NULL;
	if (!PyDict_Check(chunk))
		return PyErr_Format(PyExc_TypeError, "chunk must be a dict from prefetch_file_to_gpu_chunks(), not %s",
				    pyaeg_tname(chunk));
	if ((v = PyDict_GetItemString(chunk, "device_ptr")) == NULL || pyaeg_u64(v, "device_ptr", 1, &ptr) < 0 ||
	    (v = PyDict_GetItemString(chunk, "size")) == NULL || pyaeg_u64(v, "size", 1, &size) < 0 ||
	    (v = PyDict_GetItemString(chunk, "slab_id")) == NULL || pyaeg_u64(v, "slab_id", 1, &id) < 0) {
		if (!PyErr_Occurred())
			PyErr_SetString(PyExc_ValueError, "chunk must have device_ptr, size and slab_id");
		return NULL;
	}
	pyaeg_lock();
	if (rt.sess != NULL)
		err = aeg_session_locate(rt.sess, ptr, size, id, &gpu);
	pyaeg_unlock();
	if (err < 0)
		return pyaeg_raise_msg(AEG_ENOENT, "no live prefetched chunk has slab id %llu with %llu bytes at 0x%llx",
				       (unsigned long long)id, (unsigned long long)size, (unsigned long long)ptr);
	/* rt.gpus stays while views count on it: the device closes only with none alive. */
	return pyaeg_array_new(NULL, &rt.gpus[gpu].views, (void *)(uintptr_t)ptr, size, gpu,
			       rt.kind == AEG_DEVICE_HOST, dtype, 0, NULL, 0);
}

/* ------------------------------------------------------------ set-up, timing */

PyDoc_STRVAR(prepare_doc,
"prepare(gpu_id=0)\n--\n\n"
"Make now what the first load onto a GPU would make (outside a job: its\n"
"prefetch slab and engine with its threads, streams and staging buffers), so\n"
"that load pays none of it; they are kept for every later load. Inside a job\n"
"the agent's engines are warm already: this only checks the GPU has a slab.\n"
"The GIL is released meanwhile.");

static PyObject *py_prepare(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "gpu_id", NULL };
	PyObject *gpu_obj = NULL;
	aeg_device_t *dev;
	int gpu = 0, err = 0, rc = -1;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:prepare", kwlist, &gpu_obj))
		return NULL;
	if (gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0)
		return NULL;
	pyaeg_lock();
	if (device_locked(&dev) == 0 && check_gpu_locked(gpu) == 0) {
		if (rt.job != NULL && job_index_locked(gpu) < 0)
			goto out;
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_session_prepare(rt.sess, gpu);
		PYAEG_END_ALLOW_THREADS
		if (err < 0)
			pyaeg_raise(err);
		else
			rc = 0;
	}
out:
	pyaeg_unlock();
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

PyDoc_STRVAR(timings_doc,
"timings()\n--\n\n"
"The set-up steps the library timed since the last call, oldest first, as\n"
"(name, seconds) tuples: \"device open\", \"topology\", \"slab create\",\n"
"\"engine create\", \"job attach\", \"prefetch start\", \"job prefetch\",\n"
"\"job wait\", ... (AEGAEON_LOG=debug logs each as it ends).");

static PyObject *py_timings(PyObject *self, PyObject *unused)
{
	struct aeg_span *spans = PyMem_Malloc(AEG_SPANS_MAX * sizeof(*spans));
	PyObject *list;
	int n;

	if (spans == NULL)
		return PyErr_NoMemory();
	n = aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	list = PyList_New(n);
	for (int i = 0; list != NULL && i < n; i++) {
		PyObject *t = Py_BuildValue("(sd)", spans[i].name, (double)spans[i].ns / 1e9);

		if (t == NULL)
			Py_CLEAR(list);
		else
			PyList_SetItem(list, i, t);
	}
	PyMem_Free(spans);
	return list;
}

/* ------------------------------------------------------------------- stats */

PyDoc_STRVAR(stats_doc,
"stats()\n--\n\n"
"What the module holds now: {\"device\": \"cuda\"|\"host\"|None, \"events\": int\n"
"(create_event_handle_bytes events alive), \"objects\": int (SlabAllocator,\n"
"PinnedPool, KVCache, Model and load_model results alive), \"prefetch\": {gpu:\n"
"{\"slab_bytes\", \"chunks\", \"blocks\", \"block_bytes\", \"loads\",\n"
"\"loads_in_flight\", \"views\"}} for GPUs with a prefetch engine, \"job\": None\n"
"or, attached to a job, {\"job_id\", \"agent_pid\", \"slabs\", \"blocks\" (job slab\n"
"blocks this process prefetched and holds)}}.");

static PyObject *py_stats(PyObject *self, PyObject *unused)
{
	PyObject *d = NULL, *pf = NULL, *job = NULL;

	pyaeg_lock();
	pf = PyDict_New();
	for (int i = 0; pf != NULL && rt.sess != NULL && i < rt.gpu_count; i++) {
		struct aeg_prefetch_stats s;
		uint64_t slab_bytes = 0;
		PyObject *g, *key;

		if (aeg_session_engine_stats(rt.sess, i, &s, &slab_bytes) < 0) {
			aeg_error_clear();
			continue;
		}
		g = Py_BuildValue("{s:K,s:K,s:K,s:K,s:I,s:I,s:n}",
				  "slab_bytes", (unsigned long long)slab_bytes,
				  "chunks", (unsigned long long)s.chunks, "blocks", (unsigned long long)s.blocks,
				  "block_bytes", (unsigned long long)s.block_bytes, "loads", s.loads,
				  "loads_in_flight", s.loads_in_flight, "views", rt.gpus[i].views);
		key = PyLong_FromLong(i);
		if (g == NULL || key == NULL || PyDict_SetItem(pf, key, g) < 0)
			Py_CLEAR(pf);
		Py_XDECREF(g);
		Py_XDECREF(key);
	}
	if (pf != NULL && rt.job != NULL) {
		struct aeg_job_info info;

		aeg_job_get_info(rt.job, &info);
		job = Py_BuildValue("{s:s,s:l,s:i,s:n}", "job_id", info.job_id, "agent_pid", info.agent_pid,
				    "slabs", info.slabs, "blocks", (Py_ssize_t)aeg_session_owned_blocks(rt.sess));
	} else if (pf != NULL) {
		job = Py_None;
		Py_INCREF(job);
	}
	if (pf != NULL && job != NULL)
		d = Py_BuildValue("{s:s,s:K,s:l,s:O,s:O}",
				  "device", rt.dev ? aeg_device_kind_name(rt.kind) : NULL,
				  "events", (unsigned long long)rt.nevents, "objects", rt.objects,
				  "prefetch", pf, "job", job);
	Py_XDECREF(job);
	pyaeg_unlock();
	Py_XDECREF(pf);
	return d;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
	{ "set_device", (PyCFunction)(void (*)(void))py_set_device, METH_VARARGS | METH_KEYWORDS, set_device_doc },
	{ "device", py_device, METH_NOARGS, device_doc },
	{ "configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS, configure_doc },
	{ "device_count", py_device_count, METH_NOARGS, device_count_doc },
	{ "gpu_info", (PyCFunction)(void (*)(void))py_gpu_info, METH_VARARGS | METH_KEYWORDS, gpu_info_doc },
	{ "create_event_handle_bytes", (PyCFunction)(void (*)(void))py_create_event,
	  METH_VARARGS | METH_KEYWORDS, create_event_doc },
	{ "release_event_handle_bytes", (PyCFunction)(void (*)(void))py_release_event,
	  METH_VARARGS | METH_KEYWORDS, release_event_doc },
	{ "wait_event_handle_bytes", (PyCFunction)(void (*)(void))py_wait_event,
	  METH_VARARGS | METH_KEYWORDS, wait_event_doc },
	{ "prefetch_file_to_gpu_chunks", (PyCFunction)(void (*)(void))py_prefetch,
	  METH_VARARGS | METH_KEYWORDS, prefetch_doc },
	{ "release_prefetch_chunks", (PyCFunction)(void (*)(void))py_release_chunks,
	  METH_VARARGS | METH_KEYWORDS, release_chunks_doc },
	{ "release_all_prefetch_events", py_release_all, METH_NOARGS, release_all_doc },
	{ "chunk_view", (PyCFunction)(void (*)(void))py_chunk_view, METH_VARARGS | METH_KEYWORDS, chunk_view_doc },
	{ "stats", py_stats, METH_NOARGS, stats_doc },
	{ "prepare", (PyCFunction)(void (*)(void))py_prepare, METH_VARARGS | METH_KEYWORDS, prepare_doc },
	{ "timings", py_timings, METH_NOARGS, timings_doc },
	{ NULL, NULL, 0, NULL },
};

/* Interpreter shutdown: prefetched chunks and events go now, the rest at Py_AtExit. */
static void module_free(void *unused)
{
	int finalizer = is_finalizer();

	PYAEG_BEGIN_ALLOW_THREADS
	rtlock_take(finalizer);
	teardown_locked(!busy_locked());
	rtlock_give();
	PYAEG_END_ALLOW_THREADS
}

PyDoc_STRVAR(module_doc,
"aegaeon_native: GPU slabs, pinned host pools, chunked model prefetch,\n"
"interprocess CUDA events and KV-cache swap from Python (libaegaeon).\n\n"
"The seed API of Aegaeon's native module: SlabAllocator, PinnedPool, KVCache,\n"
"create_event_handle_bytes, wait_event_handle_bytes,\n"
"prefetch_file_to_gpu_chunks, release_prefetch_chunks,\n"
"release_all_prefetch_events; plus models (open_model, load_model: a\n"
"safetensors file, a directory of shards or a shard index), chunk_view, the\n"
"DeviceArray zero-copy view (__cuda_array_interface__, DLPack) and\n"
"aegaeon_native.torch (torch tensors and transformers models; imports torch\n"
"only when used).\n"
"Errors are AegaeonError (an OSError) with the library's code (.code, .name)\n"
"and message; AegaeonTimeoutError is also a TimeoutError, AegaeonValueError\n"
"also a ValueError. The backend is chosen by set_device(), $AEGAEON_DEVICE or\n"
"aegaeon.conf (see docs/python.md).");

static struct PyModuleDef moduledef = {
	PyModuleDef_HEAD_INIT,
	.m_name = "aegaeon_native",
	.m_doc = module_doc,
	.m_size = 0,
	.m_methods = methods,
	.m_free = module_free,
};

static PyObject *new_error(PyObject *module, const char *name, const char *doc, PyObject *bases)
{
	char full[64];
	PyObject *type;

	snprintf(full, sizeof(full), "aegaeon_native.%s", name);
	type = PyErr_NewExceptionWithDoc(full, doc, bases, NULL);
	if (type == NULL)
		return NULL;
	Py_INCREF(type);
	if (PyModule_AddObject(module, name, type) < 0) {
		Py_DECREF(type);
		Py_DECREF(type);
		return NULL;
	}
	return type;
}

PyMODINIT_FUNC PyInit_aegaeon_native(void);

PyMODINIT_FUNC PyInit_aegaeon_native(void)
{
	PyObject *m, *bases;

	m = PyModule_Create(&moduledef);
	if (m == NULL)
		return NULL;
	pyaeg_error_type = new_error(m, "AegaeonError",
		"An aegaeon library error, an OSError. errno is the errno value for codes\n"
		"that have one (ENOSPC, ETIMEDOUT, ...), else None; code is the library's\n"
		"(negative) code and name its symbol (\"AEG_ENOSPC\", \"AEG_EDEVICE\");\n"
		"the message says what failed, which value and which limit.",
		PyExc_OSError);
	if (pyaeg_error_type == NULL)
		goto fail;
	bases = Py_BuildValue("(OO)", pyaeg_error_type, PyExc_TimeoutError);
	timeout_error_type = bases ? new_error(m, "AegaeonTimeoutError",
		"A wait that ran out of time: an AegaeonError and a TimeoutError.", bases) : NULL;
	Py_XDECREF(bases);
	if (timeout_error_type == NULL)
		goto fail;
	bases = Py_BuildValue("(OO)", pyaeg_error_type, PyExc_ValueError);
	value_error_type = bases ? new_error(m, "AegaeonValueError",
		"A value the library rejected (AEG_EINVAL, AEG_ERANGE): an AegaeonError and a ValueError.",
		bases) : NULL;
	Py_XDECREF(bases);
	if (value_error_type == NULL)
		goto fail;
	if (pyaeg_array_init_type(m) < 0 || pyaeg_slab_init_type(m) < 0 ||
	    pyaeg_pool_init_type(m) < 0 || pyaeg_kv_init_type(m) < 0 ||
	    pyaeg_model_init(m) < 0 || pyaeg_torch_init(m) < 0)
		goto fail;
	if (PyModule_AddStringConstant(m, "__version__", aeg_version()) < 0 ||
	    PyModule_AddIntConstant(m, "HANDLE_BYTES", AEG_HANDLE_BYTES) < 0 ||
	    PyModule_AddIntConstant(m, "DEFAULT_CHUNK_BYTES", (long)PYAEG_DEFAULT_CHUNK_BYTES) < 0)
		goto fail;
	return m;
fail:
	Py_DECREF(m);
	return NULL;
}

/* KVCache: KV blocks on a GPU and in pinned host memory, swapped in bulk, from Python. */
#include "py_kv.h"

#include <stdarg.h>
#include <string.h>

#define DEFAULT_BLOCK_BYTES (32u << 10)
#define DEFAULT_BLOCKS 1024u


aeg_kv_t *pykv_open(KVObject *k)
{
	if (k->res == NULL || k->res->kv == NULL) {
		PyErr_SetString(PyExc_ValueError, "operation on a closed KVCache");
		return NULL;
	}
	if (pyaeg_inherited_check() < 0)
		return NULL;
	return k->res->kv;
}

/*
 * Taken once a call's arguments are converted and held until it returns:
 * its swaps run with the GIL released and its conversions may call back
 * into Python code, so close() must not free the cache meanwhile.
 */
aeg_kv_t *pykv_use(KVObject *k)
{
	return pyaeg_users_enter(&k->users, pykv_open(k));
}

void pykv_done(KVObject *k)
{
	pyaeg_users_leave(&k->users);
}

/* The slab and pool are given back once the cache that used them is destroyed. */
static void unhold(KVObject *k)
{
	if (k->holds_slab)
		pyaeg_slab_unhold(k->slab);
	if (k->holds_pool)
		pyaeg_pool_unhold(k->pool);
	k->holds_slab = k->holds_pool = 0;
}

static PyObject *call_type(PyObject *type, const char *fmt, ...)
{
	PyObject *args, *obj;
	va_list ap;

	va_start(ap, fmt);
	args = Py_VaBuildValue(fmt, ap);
	va_end(ap);
	if (args == NULL)
		return NULL;
	obj = PyObject_CallObject(type, args);
	Py_DECREF(args);
	return obj;
}

/* KVCache's arguments; the objects are borrowed, Py_None when not given. */
struct kv_args {
	int gpu;
	uint64_t block_bytes, gpu_blocks, host_blocks, gpu_stride, host_stride, layers, parts;
	PyObject *slab, *pool, *gpu_tensors, *host_tensors;
	void **gpu_bases, **host_bases;         /* PyMem_Malloc'ed pointer lists */
};

static int parse_args(PyObject *args, PyObject *kw, struct kv_args *a)
{
	static char *kwlist[] = { "gpu_id", "block_bytes", "gpu_blocks", "host_blocks", "slab", "pool", "layers",
				  "parts", "gpu_tensors", "gpu_stride", "host_tensors", "host_stride", NULL };
	PyObject *gpu_obj, *o[7] = { NULL };

	memset(a, 0, sizeof(*a));
	a->slab = a->pool = a->gpu_tensors = a->host_tensors = Py_None;
	a->block_bytes = DEFAULT_BLOCK_BYTES;
	a->gpu_blocks = a->host_blocks = DEFAULT_BLOCKS;
	a->layers = a->parts = 1;
	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOO$OOOOOOOO:KVCache", kwlist, &gpu_obj, &o[0], &o[1], &o[2],
					 &a->slab, &a->pool, &o[3], &o[4], &a->gpu_tensors, &o[5], &a->host_tensors,
					 &o[6]))
		return -1;
	if (pyaeg_gpu(gpu_obj, &a->gpu) < 0 ||
	    (o[0] && pyaeg_u64(o[0], "block_bytes", 0, &a->block_bytes) < 0) ||
	    (o[1] && pyaeg_u64(o[1], "gpu_blocks", 0, &a->gpu_blocks) < 0) ||
	    (o[2] && pyaeg_u64(o[2], "host_blocks", 1, &a->host_blocks) < 0) ||
	    (o[3] && pyaeg_u64(o[3], "layers", 0, &a->layers) < 0) ||
	    (o[4] && pyaeg_u64(o[4], "parts", 0, &a->parts) < 0) ||
	    (o[5] && pyaeg_u64(o[5], "gpu_stride", 1, &a->gpu_stride) < 0) ||
	    (o[6] && pyaeg_u64(o[6], "host_stride", 1, &a->host_stride) < 0))
		return -1;
	if (a->block_bytes % AEG_KV_BLOCK_ALIGN != 0 || a->block_bytes < AEG_KV_BLOCK_MIN ||
	    a->block_bytes > AEG_KV_BLOCK_MAX) {
		PyErr_Format(PyExc_ValueError, "block_bytes %llu: must be a multiple of %u from %u to %u",
			     (unsigned long long)a->block_bytes, AEG_KV_BLOCK_ALIGN, AEG_KV_BLOCK_MIN, AEG_KV_BLOCK_MAX);
		return -1;
	}
	if (a->gpu_blocks > UINT32_MAX / 2 || a->host_blocks > UINT32_MAX / 2 || a->layers > AEG_KV_LAYERS_MAX ||
	    a->parts > AEG_KV_PARTS_MAX) {
		PyErr_Format(PyExc_ValueError, "gpu_blocks and host_blocks must be below %u, layers 1..%u, parts 1..%u",
			     UINT32_MAX / 2, AEG_KV_LAYERS_MAX, AEG_KV_PARTS_MAX);
		return -1;
	}
	return 0;
}

/* A per-layer side's pointers: layers * parts ints. */
static void **tensor_list(PyObject *seq, const char *what, const struct kv_args *a)
{
	size_t want = (size_t)(a->layers * a->parts), n;
	uint64_t *v;
	void **bases;

	if (pyaeg_u64_list(seq, what, &v, &n) < 0)
		return NULL;
	if (n != want) {
		PyMem_Free(v);
		PyErr_Format(PyExc_ValueError, "%s has %zu pointers; layers x parts is %zu", what, n, want);
		return NULL;
	}
	bases = (void **)v;     /* uint64_t and pointers have one size here */
	for (size_t i = 0; i < n; i++)
		bases[i] = (void *)(uintptr_t)v[i];
	return bases;
}

/* The GPU side: per-layer tensors, the given slab, or a slab of its own. */
static int gpu_side(KVObject *k, struct kv_args *a, struct aeg_kv_params *p, struct aeg_kv_tensors *t)
{
	PyObject *slab = a->slab;

	if (a->gpu_tensors != Py_None) {
		if (slab != Py_None) {
			PyErr_SetString(PyExc_ValueError, "slab= and gpu_tensors= both give the GPU side: give one");
			return -1;
		}
		if (!(a->gpu_bases = tensor_list(a->gpu_tensors, "gpu_tensors", a)))
			return -1;
		*t = (struct aeg_kv_tensors){ a->gpu_bases, a->gpu_stride, (uint32_t)a->gpu_blocks };
		p->gpu_tensors = t;
		Py_INCREF(Py_None);
		k->slab = Py_None;
		return 0;
	}
	if (slab == Py_None)
		slab = call_type(pyaeg_slab_type, "(iK)", a->gpu, (unsigned long long)(a->gpu_blocks * a->block_bytes));
	else
		Py_INCREF(slab);
	k->slab = slab;
	if (slab == NULL || !(p->slab = pyaeg_slab_hold(slab)))
		return -1;
	k->holds_slab = 1;
	p->gpu_blocks = (uint32_t)a->gpu_blocks;
	return 0;
}

/* The host side: per-layer tensors, the given pool, or a pool of its own. */
static int host_side(KVObject *k, struct kv_args *a, struct aeg_kv_params *p, struct aeg_kv_tensors *t)
{
	PyObject *pool = a->pool;
	struct aeg_pool_stats ps;

	if (a->host_tensors != Py_None) {
		if (pool != Py_None) {
			PyErr_SetString(PyExc_ValueError, "pool= and host_tensors= both give the host side: give one");
			return -1;
		}
		if (!(a->host_bases = tensor_list(a->host_tensors, "host_tensors", a)))
			return -1;
		*t = (struct aeg_kv_tensors){ a->host_bases, a->host_stride, (uint32_t)a->host_blocks };
		p->host_tensors = t;
		Py_INCREF(Py_None);
		k->pool = Py_None;
		return 0;
	}
	if (pool == Py_None && a->host_blocks == 0) {
		PyErr_SetString(PyExc_ValueError, "host_blocks 0 needs a pool= whose blocks other processes allocate");
		return -1;
	}
	if (pool == Py_None) {
		uint64_t buf = a->block_bytes;  /* buffers hold whole blocks and whole pages */

		while (buf % 4096 != 0)
			buf += a->block_bytes;
		pool = call_type(pyaeg_pool_type, "(KKi)", (unsigned long long)buf,
				 (unsigned long long)((a->host_blocks * a->block_bytes + buf - 1) / buf), a->gpu);
	} else {
		Py_INCREF(pool);
	}
	k->pool = pool;
	if (pool == NULL || !(p->pool = pyaeg_pool_hold(pool)))
		return -1;
	k->holds_pool = 1;
	aeg_pool_stats(p->pool, &ps);
	p->host_buffers = (uint32_t)((a->host_blocks * a->block_bytes + ps.buffer_bytes - 1) / ps.buffer_bytes);
	return 0;
}

/* Two streams, swap-outs on one and swap-ins on the other, and the cache. */
static int open_cache(KVObject *k, const struct aeg_kv_params *p)
{
	struct aeg_kv_stats st;
	int err;

	k->res = pyaeg_res_new();
	if (k->res == NULL)
		return -1;
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_stream_create(k->dev, k->gpu, &k->res->stream);
	if (err == 0)
		err = aeg_stream_create(k->dev, k->gpu, &k->res->stream_in);
	if (err == 0)
		err = aeg_kv_create(k->dev, k->gpu, p, &k->res->kv);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	aeg_kv_stats(k->res->kv, &st);
	k->gpu_blocks = st.gpu_blocks;
	k->host_blocks = st.host_blocks;
	return 0;
}

static PyObject *kv_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
	struct aeg_kv_params params = { 0 };
	struct aeg_kv_tensors gt, ht;
	struct kv_args a;
	KVObject *k = NULL;

	if (parse_args(args, kw, &a) < 0)
		return NULL;
	k = (KVObject *)PyType_GenericAlloc(type, 0);
	if (k == NULL)
		goto fail;
	k->gpu = a.gpu;
	k->block_bytes = a.block_bytes;
	k->layers = (uint32_t)(a.layers ? a.layers : 1);
	k->parts = (uint32_t)(a.parts ? a.parts : 1);
	k->gpu_per_layer = a.gpu_tensors != Py_None;
	k->pending = PyDict_New();
	k->reqs = PyDict_New();
	if (k->pending == NULL || k->reqs == NULL || pyaeg_device(&k->dev) < 0)
		goto fail;
	k->host = aeg_device_kind(k->dev) == AEG_DEVICE_HOST;
	params.block_bytes = a.block_bytes;
	params.layers = k->layers;
	params.parts = k->parts;
	if (gpu_side(k, &a, &params, &gt) < 0 || host_side(k, &a, &params, &ht) < 0 || open_cache(k, &params) < 0)
		goto fail;
	PyMem_Free(a.gpu_bases);
	PyMem_Free(a.host_bases);
	pyaeg_object_born();
	return (PyObject *)k;
fail:
	PyMem_Free(a.gpu_bases);
	PyMem_Free(a.host_bases);
	Py_XDECREF(k);
	return NULL;
}

static void kv_dealloc(PyObject *self)
{
	KVObject *k = (KVObject *)self;
	PyTypeObject *tp = Py_TYPE(self);
	freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

	if (k->res != NULL) {
		if (k->res->kv != NULL)
			pyaeg_object_gone();
		pyaeg_res_free(k->res);
	}
	unhold(k);
	Py_XDECREF(k->pending);
	Py_XDECREF(k->reqs);
	Py_XDECREF(k->slab);
	Py_XDECREF(k->pool);
	tp_free(self);
	Py_DECREF(tp);
}

/* ---------------------------------------------------------------- blocks */

static PyObject *id_list(const uint32_t *ids, size_t n)
{
	PyObject *list = PyList_New((Py_ssize_t)n);

	for (size_t i = 0; list != NULL && i < n; i++) {
		PyObject *v = PyLong_FromUnsignedLong(ids[i]);

		if (v == NULL)
			Py_CLEAR(list);
		else
			PyList_SetItem(list, (Py_ssize_t)i, v);
	}
	return list;
}

PyObject *pykv_blocks_alloc(KVObject *k, PyObject *n_obj, int gpu_side)
{
	PyObject *list = NULL;
	uint32_t *ids;
	aeg_kv_t *kv;
	uint64_t n;
	int err;

	if (pyaeg_u64(n_obj, "n", 0, &n) < 0 || pykv_open(k) == NULL)
		return NULL;
	if (n > (gpu_side ? k->gpu_blocks : k->host_blocks))
		return pyaeg_raise_msg(AEG_ENOSPC, "%llu %s blocks asked, the cache has %u",
				       (unsigned long long)n, gpu_side ? "GPU" : "host",
				       gpu_side ? k->gpu_blocks : k->host_blocks);
	ids = PyMem_Malloc((size_t)n * sizeof(*ids));
	if (ids == NULL)
		return PyErr_NoMemory();
	if ((kv = pykv_use(k)) == NULL)
		goto out;
	err = gpu_side ? aeg_kv_gpu_alloc(kv, (size_t)n, ids) : aeg_kv_host_alloc(kv, (size_t)n, ids);
	if (err < 0) {
		pyaeg_raise(err);
		goto done;
	}
	list = id_list(ids, (size_t)n);
	if (list == NULL) {
		if (gpu_side)
			aeg_kv_gpu_free(kv, ids, (size_t)n);
		else
			aeg_kv_host_free(kv, ids, (size_t)n);
	}
done:
	pykv_done(k);
out:
	PyMem_Free(ids);
	return list;
}

PyObject *pykv_blocks_free(KVObject *k, PyObject *seq, int gpu_side)
{
	uint32_t *ids;
	aeg_kv_t *kv;
	size_t n;
	int err;

	if (pykv_open(k) == NULL ||
	    pyaeg_id_list(seq, "ids", gpu_side ? k->gpu_blocks : k->host_blocks, &ids, &n) < 0)
		return NULL;
	/* No Python code runs between pykv_open and the free. */
	if ((kv = pykv_open(k)) == NULL) {
		PyMem_Free(ids);
		return NULL;
	}
	err = n == 0 ? 0 : gpu_side ? aeg_kv_gpu_free(kv, ids, n) : aeg_kv_host_free(kv, ids, n);
	PyMem_Free(ids);
	if (err < 0)
		return pyaeg_raise(err);
	Py_RETURN_NONE;
}

static PyObject *kv_gpu_alloc(PyObject *self, PyObject *n)
{
	return pykv_blocks_alloc((KVObject *)self, n, 1);
}

static PyObject *kv_host_alloc(PyObject *self, PyObject *n)
{
	return pykv_blocks_alloc((KVObject *)self, n, 0);
}

static PyObject *kv_gpu_free(PyObject *self, PyObject *ids)
{
	return pykv_blocks_free((KVObject *)self, ids, 1);
}

static PyObject *kv_host_free(PyObject *self, PyObject *ids)
{
	return pykv_blocks_free((KVObject *)self, ids, 0);
}

static int block_index(KVObject *k, PyObject *obj, int gpu_side, uint32_t *id)
{
	uint32_t max = gpu_side ? k->gpu_blocks : k->host_blocks;
	uint64_t v;

	if (pyaeg_u64(obj, "id", 1, &v) < 0)
		return -1;
	if (v >= max) {
		PyErr_Format(PyExc_ValueError, "%s block %llu is out of range (0..%u)", gpu_side ? "GPU" : "host",
			     (unsigned long long)v, max ? max - 1 : 0);
		return -1;
	}
	*id = (uint32_t)v;
	return 0;
}

/* The methods below convert their arguments first: no Python code runs between pykv_open and the call. */
static PyObject *kv_gpu_ptr(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv;
	uint32_t id;

	if (block_index(k, obj, 1, &id) < 0 || (kv = pykv_open(k)) == NULL)
		return NULL;
	return PyLong_FromUnsignedLongLong((uintptr_t)aeg_kv_gpu_ptr(kv, id));
}

static PyObject *kv_host_ptr(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv;
	uint32_t id;

	if (block_index(k, obj, 0, &id) < 0 || (kv = pykv_open(k)) == NULL)
		return NULL;
	return PyLong_FromUnsignedLongLong((uintptr_t)aeg_kv_host_ptr(kv, id));
}

static PyObject *kv_gpu_block(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	PyObject *view;
	aeg_kv_t *kv;
	uint32_t id;

	if (block_index(k, obj, 1, &id) < 0)
		return NULL;
	if (k->gpu_per_layer)
		return PyErr_Format(PyExc_ValueError, "GPU block %u lies in %u per-layer tensors, not in one piece: "
				    "gpu_piece(id, layer, part) gives each piece's address", id, k->layers * k->parts);
	/* Making the view may collect garbage, whose finalizers may call close(). */
	if ((kv = pykv_use(k)) == NULL)
		return NULL;
	view = pyaeg_array_new(self, &k->users.views, aeg_kv_gpu_ptr(kv, id), k->block_bytes, k->gpu, k->host,
			       "U8", 0, NULL, 0);
	pykv_done(k);
	return view;
}

/* gpu_piece / host_piece: the address of (id, layer, part). */
static PyObject *piece(PyObject *self, PyObject *args, int gpu_side)
{
	KVObject *k = (KVObject *)self;
	unsigned long long layer = 0, part = 0;
	PyObject *id_obj;
	aeg_kv_t *kv;
	uint32_t id;
	void *p;

	if (!PyArg_ParseTuple(args, gpu_side ? "O|KK:gpu_piece" : "O|KK:host_piece", &id_obj, &layer, &part) ||
	    block_index(k, id_obj, gpu_side, &id) < 0)
		return NULL;
	if (layer >= k->layers || part >= k->parts)
		return PyErr_Format(PyExc_ValueError, "layer %llu, part %llu: the cache has %u layers of %u parts", layer,
				    part, k->layers, k->parts);
	if ((kv = pykv_open(k)) == NULL)
		return NULL;
	p = gpu_side ? aeg_kv_gpu_piece(kv, id, (uint32_t)layer, (uint32_t)part) :
		       aeg_kv_host_piece(kv, id, (uint32_t)layer, (uint32_t)part);
	return PyLong_FromUnsignedLongLong((uintptr_t)p);
}

static PyObject *kv_gpu_piece(PyObject *self, PyObject *args)
{
	return piece(self, args, 1);
}

static PyObject *kv_host_piece(PyObject *self, PyObject *args)
{
	return piece(self, args, 0);
}

static PyObject *kv_host_block(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv;
	uintptr_t at;
	uint32_t id;

	if (block_index(k, obj, 0, &id) < 0)
		return NULL;
	if (k->pool == Py_None)
		return PyErr_Format(PyExc_ValueError, "host block %u lies in per-layer tensors, not in a pool: "
				    "host_piece(id, layer, part) gives each piece's address", id);
	if ((kv = pykv_open(k)) == NULL)
		return NULL;
	/* The view maps the pool's pages itself: valid after the cache or the pool is closed. */
	at = (uintptr_t)aeg_kv_host_ptr(kv, id);
	return pyaeg_pool_view(k->pool, (uint64_t)(at - pyaeg_pool_base(k->pool)), k->block_bytes);
}

/* ----------------------------------------------------------------- swaps */

static int add_pending(KVObject *k, const aeg_handle_t *h)
{
	PyObject *b = pyaeg_handle_bytes(h);
	int rc;

	if (b == NULL)
		return -1;
	rc = PyDict_SetItem(k->pending, b, Py_None);
	Py_DECREF(b);
	return rc;
}

static int wait_handle(KVObject *k, const aeg_handle_t *h, double seconds)
{
	int err = pyaeg_wait_handle(k->dev, h, seconds);

	if (err == PYAEG_SIGNALLED)
		return -1;
	if (err == AEG_ETIMEDOUT) {
		pyaeg_raise_msg(err, "the KV transfer did not complete within %g s", seconds);
		return -1;
	}
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	return 0;
}

/*
 * Takes pending handle @b for this call: 1 when it was waiting for no one
 * (now marked taken), 0 when it is not pending or another call took it.
 */
static int claim(KVObject *k, PyObject *b)
{
	PyObject *v = PyDict_GetItemWithError(k->pending, b);

	if (v == NULL)
		return PyErr_Occurred() ? -1 : 0;
	if (v != Py_None)
		return 0;
	return PyDict_SetItem(k->pending, b, Py_True) < 0 ? -1 : 1;
}

/* Releases handle @b (@h) this call owns: claimed, or never handed out. */
static int release_owned(KVObject *k, aeg_kv_t *kv, PyObject *b, const aeg_handle_t *h)
{
	int err = aeg_kv_release(kv, h);

	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	if (b != NULL && PyDict_DelItem(k->pending, b) < 0)
		return -1;
	return 0;
}

/*
 * wait=True: the call waits for and releases its own event, which no other
 * call knows of; one the wait gave up on (a signal) goes to pending, for
 * wait_all() or close() to release.
 */
static int wait_own(KVObject *k, aeg_kv_t *kv, const aeg_handle_t *h)
{
	PyObject *type, *value, *tb;

	if (wait_handle(k, h, -1) == 0)
		return release_owned(k, kv, NULL, h);
	PyErr_Fetch(&type, &value, &tb);
	if (add_pending(k, h) < 0)
		PyErr_Clear();
	PyErr_Restore(type, value, tb);
	return -1;
}

/* A swap either way; returns the handle, (handle, layer handles), or None with wait. */
/*
 * layers=: None (or False) for none, True for an event per layer of a cache
 * of several layers, or the ends of groups of entries on a cache of one.
 * Sets @layers (its handles PyMem_Malloc'ed, @ends too); -1 with an exception.
 */
static int parse_layers(const KVObject *k, PyObject *obj, struct aeg_kv_layers *layers, size_t **ends)
{
	uint32_t *e32 = NULL;
	size_t n;

	*ends = NULL;
	memset(layers, 0, sizeof(*layers));
	if (obj == Py_None || obj == Py_False)
		return 0;
	if (obj == Py_True) {
		n = k->layers;
	} else {
		if (pyaeg_id_list(obj, "layers", UINT32_MAX, &e32, &n) < 0)
			return -1;
		*ends = PyMem_Malloc((n ? n : 1) * sizeof(**ends));
		for (size_t i = 0; *ends != NULL && i < n; i++)
			(*ends)[i] = e32[i];
		PyMem_Free(e32);
		if (*ends == NULL) {
			PyErr_NoMemory();
			return -1;
		}
	}
	layers->count = n;
	layers->ends = *ends;
	layers->handles = PyMem_Malloc((n ? n : 1) * sizeof(*layers->handles));
	if (layers->handles == NULL) {
		PyErr_NoMemory();
		return -1;
	}
	return 1;
}

/* (call handle, [layer handles]) */
/* A call submitted: waited for here (wait), or left pending for wait_all; -1 with an exception set. */
static int call_end(KVObject *k, aeg_kv_t *kv, const aeg_handle_t *h, int wait)
{
	return wait ? wait_own(k, kv, h) : add_pending(k, h);
}

static PyObject *handles_tuple(const aeg_handle_t *h, const struct aeg_kv_layers *layers)
{
	PyObject *list = PyList_New((Py_ssize_t)layers->count);

	for (size_t i = 0; list != NULL && i < layers->count; i++) {
		PyObject *b = pyaeg_handle_bytes(&layers->handles[i]);

		if (b == NULL)
			Py_CLEAR(list);
		else
			PyList_SetItem(list, (Py_ssize_t)i, b);
	}
	return list ? Py_BuildValue("(NN)", pyaeg_handle_bytes(h), list) : NULL;
}

static int id_lists(KVObject *k, int out, PyObject *src_seq, PyObject *dst_seq, uint32_t **src, uint32_t **dst,
		    size_t *n)
{
	size_t nd;

	if (pyaeg_id_list(src_seq, out ? "gpu_ids" : "host_ids", out ? k->gpu_blocks : k->host_blocks, src, n) < 0 ||
	    pyaeg_id_list(dst_seq, out ? "host_ids" : "gpu_ids", out ? k->host_blocks : k->gpu_blocks, dst, &nd) < 0)
		return -1;
	if (*n != nd) {
		PyErr_Format(PyExc_ValueError, "%zu source blocks for %zu destination blocks", *n, nd);
		return -1;
	}
	if (*n == 0) {
		PyErr_SetString(PyExc_ValueError, "no blocks to swap");
		return -1;
	}
	return 0;
}

/* Swap-outs go on the cache's first stream, swap-ins on its second: the two directions overlap. */
PyObject *pykv_swap(KVObject *k, int out, PyObject *src_seq, PyObject *dst_seq, PyObject *layers_obj, int wait)
{
	uint32_t *src = NULL, *dst = NULL;
	struct aeg_kv_layers layers;
	aeg_stream_t *s;
	size_t *ends = NULL, n;
	PyObject *result = NULL;
	aeg_handle_t h;
	aeg_kv_t *kv;
	int err, by_layer = 0;

	/* The ids' __index__ may run any Python code, close() included: the cache is taken after. */
	if (pykv_open(k) == NULL || id_lists(k, out, src_seq, dst_seq, &src, &dst, &n) < 0 ||
	    (by_layer = parse_layers(k, layers_obj, &layers, &ends)) < 0)
		goto out;
	if ((kv = pykv_use(k)) == NULL)
		goto out;
	s = out ? k->res->stream : k->res->stream_in;
	PYAEG_BEGIN_ALLOW_THREADS
	if (by_layer)
		err = out ? aeg_kv_swap_out_layers(kv, src, dst, n, &layers, s, &h) :
			    aeg_kv_swap_in_layers(kv, dst, src, n, &layers, s, &h);
	else
		err = out ? aeg_kv_swap_out(kv, src, dst, n, s, &h) : aeg_kv_swap_in(kv, src, dst, n, s, &h);
	PYAEG_END_ALLOW_THREADS
	if (err < 0)
		pyaeg_raise(err);
	else if (call_end(k, kv, &h, wait) == 0)
		result = wait ? Py_NewRef(Py_None) : by_layer ? handles_tuple(&h, &layers) : pyaeg_handle_bytes(&h);
	pykv_done(k);
out:
	PyMem_Free(src);
	PyMem_Free(dst);
	PyMem_Free(ends);
	if (by_layer > 0)
		PyMem_Free(layers.handles);
	return result;
}

static PyObject *kv_swap_out(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "gpu_ids", "host_ids", "layers", "wait", NULL };
	PyObject *g, *h, *layers = Py_None;
	int wait = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$Op:swap_out", kwlist, &g, &h, &layers, &wait))
		return NULL;
	return pykv_swap((KVObject *)self, 1, g, h, layers, wait);
}

static PyObject *kv_swap_in(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "host_ids", "gpu_ids", "layers", "wait", NULL };
	PyObject *g, *h, *layers = Py_None;
	int wait = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$Op:swap_in", kwlist, &h, &g, &layers, &wait))
		return NULL;
	return pykv_swap((KVObject *)self, 0, h, g, layers, wait);
}

static PyObject *copy(KVObject *k, int h2d, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "dst", "src", "nbytes", "wait", NULL };
	PyObject *dst_obj, *src_obj, *n_obj;
	uint64_t dst, src, n;
	PyObject *result = NULL;
	aeg_handle_t h;
	aeg_kv_t *kv;
	int wait = 0, err;

	if (pykv_open(k) == NULL)
		return NULL;
	if (!PyArg_ParseTupleAndKeywords(args, kw, h2d ? "OOO|$p:copy_h2d" : "OOO|$p:copy_d2h", kwlist,
					 &dst_obj, &src_obj, &n_obj, &wait))
		return NULL;
	if (pyaeg_u64(dst_obj, "dst", 0, &dst) < 0 || pyaeg_u64(src_obj, "src", 0, &src) < 0 ||
	    pyaeg_u64(n_obj, "nbytes", 0, &n) < 0 || (kv = pykv_use(k)) == NULL)
		return NULL;
	PYAEG_BEGIN_ALLOW_THREADS
	err = h2d ? aeg_kv_copy_h2d(kv, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, k->res->stream_in, &h) :
		    aeg_kv_copy_d2h(kv, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, k->res->stream, &h);
	PYAEG_END_ALLOW_THREADS
	if (err < 0)
		pyaeg_raise(err);
	else if (call_end(k, kv, &h, wait) == 0)
		result = wait ? Py_NewRef(Py_None) : pyaeg_handle_bytes(&h);
	pykv_done(k);
	return result;
}

static PyObject *kv_copy_h2d(PyObject *self, PyObject *args, PyObject *kw)
{
	return copy((KVObject *)self, 1, args, kw);
}

static PyObject *kv_copy_d2h(PyObject *self, PyObject *args, PyObject *kw)
{
	return copy((KVObject *)self, 0, args, kw);
}

static PyObject *kv_wait(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "handle", "timeout", NULL };
	KVObject *k = (KVObject *)self;
	PyObject *obj, *timeout_obj = Py_None;
	aeg_handle_t h;
	double seconds;

	int rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:wait", kwlist, &obj, &timeout_obj))
		return NULL;
	if (pyaeg_handle(obj, &h) < 0 || pyaeg_timeout(timeout_obj, &seconds) < 0 || pykv_use(k) == NULL)
		return NULL;
	rc = wait_handle(k, &h, seconds);
	pykv_done(k);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *kv_release(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	PyObject *b;
	aeg_handle_t h;
	aeg_kv_t *kv;
	int rc = -1;

	if (pyaeg_handle(obj, &h) < 0 || (b = pyaeg_handle_bytes(&h)) == NULL)
		return NULL;
	if ((kv = pykv_use(k)) == NULL) {
		Py_DECREF(b);
		return NULL;
	}
	switch (claim(k, b)) {
	case 1:
		rc = release_owned(k, kv, b, &h);
		break;
	case 0:
		if (PyDict_GetItemWithError(k->pending, b) != NULL)
			pyaeg_raise_msg(AEG_EBUSY, "KV release: another thread's wait_all() is waiting for this handle "
					"and releases it");
		else if (!PyErr_Occurred())
			pyaeg_raise_msg(AEG_ENOENT, "KV release: the handle is not one of this cache's calls not "
					"released yet (released already, by wait_all(), or a wait=True call's)");
		break;
	}
	pykv_done(k);
	Py_DECREF(b);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

/* Item @i of a seed request record becomes None. */
static int set_none(PyObject *rec, int i)
{
	Py_INCREF(Py_None);
	return PyList_SetItem(rec, i, Py_None);
}

/* Waits for and releases the pending handles no other call has taken; 0, or -1 with an exception. */
static int wait_pending(KVObject *k, aeg_kv_t *kv)
{
	PyObject *handles = PyDict_Keys(k->pending);
	int rc = 0;

	if (handles == NULL)
		return -1;
	for (Py_ssize_t i = 0; rc == 0 && i < PyList_Size(handles); i++) {
		PyObject *b = PyList_GetItem(handles, i);
		aeg_handle_t h;

		rc = claim(k, b);
		if (rc <= 0)
			continue;       /* another call's now, or released */
		rc = pyaeg_handle(b, &h);
		if (rc == 0 && (rc = wait_handle(k, &h, -1)) < 0) {
			/* Interrupted: the handle is anyone's again. */
			PyObject *type, *value, *tb;

			PyErr_Fetch(&type, &value, &tb);
			if (PyDict_SetItem(k->pending, b, Py_None) < 0)
				PyErr_Clear();
			PyErr_Restore(type, value, tb);
		}
		if (rc == 0)
			rc = release_owned(k, kv, b, &h);
	}
	Py_DECREF(handles);
	return rc;
}

/*
 * Swapped-out requests give their GPU blocks back once their swap-out is
 * released (its copies done); one another call still waits for stays.
 */
static int free_swapped_out(KVObject *k)
{
	PyObject *items = PyDict_Items(k->reqs);
	int rc = 0;

	if (items == NULL)
		return -1;
	for (Py_ssize_t i = 0; rc == 0 && i < PyList_Size(items); i++) {
		PyObject *rec = PyTuple_GetItem(PyList_GetItem(items, i), 1), *out = PyList_GetItem(rec, 3), *gpu, *r;
		int pending = out == Py_None ? 1 : PyDict_Contains(k->pending, out);

		if (pending != 0) {
			rc = pending < 0 ? -1 : 0;
			continue;
		}
		/* The record drops its GPU ids before the free (which may run Python code): no call frees them twice. */
		gpu = PyList_GetItem(rec, 2);
		Py_INCREF(gpu);
		if (set_none(rec, 2) < 0 || set_none(rec, 3) < 0 || (r = pykv_blocks_free(k, gpu, 1)) == NULL)
			rc = -1;
		else
			Py_DECREF(r);
		Py_DECREF(gpu);
	}
	Py_DECREF(items);
	return rc < 0 ? -1 : 0;
}

PyObject *pykv_wait_all(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = pykv_use(k);
	int rc;

	if (kv == NULL)
		return NULL;
	rc = wait_pending(k, kv);
	if (rc == 0)
		rc = free_swapped_out(k);
	pykv_done(k);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

/* -------------------------------------------------------------- the rest */

static PyObject *kv_stats(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = pykv_open(k);
	struct aeg_kv_stats st;
	int err;

	if (kv == NULL)
		return NULL;
	err = aeg_kv_stats(kv, &st);
	if (err < 0)
		return pyaeg_raise(err);
	return Py_BuildValue("{s:K,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n}",
			     "block_bytes", (unsigned long long)st.block_bytes, "layers", st.layers, "parts", st.parts,
			     "events_kept", st.events_kept, "gpu_blocks", st.gpu_blocks,
			     "gpu_used", st.gpu_used, "host_blocks", st.host_blocks, "host_owned", st.host_owned,
			     "host_used", st.host_used, "events_live", st.events_live,
			     "swaps_out", (unsigned long long)st.swaps_out, "swaps_in", (unsigned long long)st.swaps_in,
			     "blocks_out", (unsigned long long)st.blocks_out, "blocks_in", (unsigned long long)st.blocks_in,
			     "copies", (unsigned long long)st.copies, "copy_bytes", (unsigned long long)st.copy_bytes,
			     "requests", PyDict_Size(k->reqs), "pending", PyDict_Size(k->pending));
}

static PyObject *kv_close(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	struct pyaeg_res *res = k->res;
	char what[64];

	if (res == NULL || res->kv == NULL)
		Py_RETURN_NONE;
	snprintf(what, sizeof(what), "KVCache of GPU %d", k->gpu);
	if (pyaeg_users_busy(&k->users, what) < 0)
		return NULL;
	/* Detached first: a thread that runs while the cache is destroyed (GIL released) finds it closed. */
	k->res = NULL;
	pyaeg_object_gone();
	PyDict_Clear(k->pending);
	PyDict_Clear(k->reqs);
	pyaeg_res_free(res);
	unhold(k);
	Py_RETURN_NONE;
}

static PyObject *kv_enter(PyObject *self, PyObject *unused)
{
	if (pykv_open((KVObject *)self) == NULL)
		return NULL;
	Py_INCREF(self);
	return self;
}

static PyObject *kv_exit(PyObject *self, PyObject *args)
{
	return kv_close(self, NULL);
}

static PyObject *get_u64(PyObject *self, void *closure)
{
	KVObject *k = (KVObject *)self;

	switch ((intptr_t)closure) {
	case 0: return PyLong_FromUnsignedLongLong(k->block_bytes);
	case 1: return PyLong_FromUnsignedLong(k->gpu_blocks);
	case 2: return PyLong_FromUnsignedLong(k->host_blocks);
	case 3: return PyLong_FromLong(k->gpu);
	default: return PyBool_FromLong(k->res == NULL || k->res->kv == NULL);
	}
}

static PyGetSetDef kv_getset[] = {
	{ "block_bytes", get_u64, NULL, "Bytes per block.", (void *)0 },
	{ "gpu_blocks", get_u64, NULL, "GPU block ids are 0..gpu_blocks-1.", (void *)1 },
	{ "host_blocks", get_u64, NULL, "Host block ids are 0..host_blocks-1.", (void *)2 },
	{ "gpu_id", get_u64, NULL, "GPU ordinal.", (void *)3 },
	{ "closed", get_u64, NULL, "True after close().", (void *)4 },
	{ NULL, NULL, NULL, NULL, NULL },
};

#define KW (METH_VARARGS | METH_KEYWORDS)
#define FN(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef kv_methods[] = {
	{ "gpu_alloc", kv_gpu_alloc, METH_O, "gpu_alloc($self, n, /)\n--\n\nAllocate n GPU blocks (all or none; AegaeonError ENOSPC)." },
	{ "gpu_free", kv_gpu_free, METH_O, "gpu_free($self, ids, /)\n--\n\nFree GPU blocks (AegaeonValueError for one not allocated; then none is freed)." },
	{ "host_alloc", kv_host_alloc, METH_O, "host_alloc($self, n, /)\n--\n\nAllocate n host blocks." },
	{ "host_free", kv_host_free, METH_O, "host_free($self, ids, /)\n--\n\nFree host blocks." },
	{ "swap_out", FN(kv_swap_out), KW,
	  "swap_out($self, gpu_ids, host_ids, *, layers=None, wait=False)\n--\n\n"
	  "Move GPU blocks gpu_ids[i] to host blocks host_ids[i], every layer and part\n"
	  "of each, in one gather/scatter kernel (cuda), asynchronously, on the cache's\n"
	  "swap-out stream. Returns the 64-byte handle of an event recorded after the\n"
	  "last block (wait with wait(), wait_event_handle_bytes() in any process,\n"
	  "then release()). layers=True on a cache of several layers adds an event per\n"
	  "layer, layer 0 first; on a cache of one layer, layers=[ends] splits the ids\n"
	  "into groups (strictly increasing ends, the last = len(ids)) with an event\n"
	  "each; both return (handle, [layer handles]). wait=True waits, releases the\n"
	  "event and returns None. All ids are checked before anything moves. Ids\n"
	  "come as lists or tuples of ints, or as 1-D integer arrays (numpy's, read in\n"
	  "place: for thousands of ids a call, the quick way)." },
	{ "swap_in", FN(kv_swap_in), KW,
	  "swap_in($self, host_ids, gpu_ids, *, layers=None, wait=False)\n--\n\n"
	  "Host blocks to GPU blocks; as swap_out(), on the cache's swap-in stream: a\n"
	  "swap-in and a swap-out run at the same time. Calls of one direction run in\n"
	  "order; to swap in blocks a swap-out is still writing (or the other way\n"
	  "round), wait for that call's handle first." },
	{ "copy_h2d", FN(kv_copy_h2d), KW,
	  "copy_h2d($self, dst, src, nbytes, *, wait=False)\n--\n\n"
	  "One asynchronous copy from host address src to device address dst (raw\n"
	  "pointers, as the seed's; pinned host memory such as a PinnedPool buffer's\n"
	  "address() keeps it asynchronous; a copy stays inside one buffer: the\n"
	  "pool is registered a piece of whole buffers at a time). Returns an event\n"
	  "handle as swap_out()." },
	{ "copy_d2h", FN(kv_copy_d2h), KW,
	  "copy_d2h($self, dst, src, nbytes, *, wait=False)\n--\n\nOne asynchronous copy from device address src to host address dst." },
	{ "wait", FN(kv_wait), KW,
	  "wait($self, handle, timeout=None)\n--\n\nWait for a swap or copy of this cache (GIL released; AegaeonTimeoutError)." },
	{ "release", kv_release, METH_O,
	  "release($self, handle, /)\n--\n\nDestroy the event(s) of a swap or copy (AegaeonError ENOENT for one not held,\n"
	  "EBUSY for one another thread's wait_all() waits for and releases)." },
	{ "wait_all", pykv_wait_all, METH_NOARGS,
	  "wait_all($self, /)\n--\n\nWait for and release every swap and copy not released yet (those\n"
	  "another thread's wait_all() took are left to it); requests swapped out by\n"
	  "swapout_all_async() give their GPU blocks back once their swap-out is released." },
	{ "gpu_ptr", kv_gpu_ptr, METH_O, "gpu_ptr($self, id, /)\n--\n\nDevice address of GPU block id." },
	{ "host_ptr", kv_host_ptr, METH_O, "host_ptr($self, id, /)\n--\n\nHost address of host block id (pinned)." },
	{ "gpu_block", kv_gpu_block, METH_O,
	  "gpu_block($self, id, /)\n--\n\nA U8 view of GPU block id (ValueError with per-layer gpu_tensors)." },
	{ "gpu_piece", kv_gpu_piece, METH_VARARGS,
	  "gpu_piece($self, id, layer=0, part=0, /)\n--\n\nDevice address of GPU block id's piece of one layer and part." },
	{ "host_piece", kv_host_piece, METH_VARARGS,
	  "host_piece($self, id, layer=0, part=0, /)\n--\n\nHost address of host block id's piece of one layer and part." },
	{ "host_block", kv_host_block, METH_O, "host_block($self, id, /)\n--\n\nA writable view of host block id." },
	{ "store_kv_async", FN(pykv_store), KW,
	  "store_kv_async($self, req_id, data)\n--\n\n"
	  "The seed's API: keep a request's KV bytes in host blocks and start copying\n"
	  "them to GPU blocks (asynchronously). A request stored again replaces the old." },
	{ "ensure_kv_on_gpu", pykv_ensure, METH_O,
	  "ensure_kv_on_gpu($self, req_id, /)\n--\n\n"
	  "Bring a request's KV onto the GPU (swap in if it was swapped out), wait, and\n"
	  "return its GPU block ids in order. KeyError for an unknown request." },
	{ "swapout_all_async", pykv_swapout_all, METH_NOARGS,
	  "swapout_all_async($self, /)\n--\n\nStart swapping every resident request out to its host blocks;\n"
	  "wait_all() completes it and frees their GPU blocks." },
	{ "load_kv", pykv_load, METH_O,
	  "load_kv($self, req_id, /)\n--\n\nThe request's KV bytes as they are now (copied back from the GPU if resident)." },
	{ "drop_kv", pykv_drop, METH_O, "drop_kv($self, req_id, /)\n--\n\nForget a request and free its blocks." },
	{ "stats", kv_stats, METH_NOARGS,
	  "stats($self, /)\n--\n\n"
	  "block_bytes, layers, parts, gpu_blocks, gpu_used, host_blocks, host_owned,\n"
	  "host_used, events_live, events_kept (released events kept for reuse),\n"
	  "swaps_out, swaps_in, blocks_out, blocks_in, copies, copy_bytes,\n"
	  "requests (seed API), pending (events not released)." },
	{ "close", kv_close, METH_NOARGS,
	  "close($self, /)\n--\n\nWait for queued transfers and free the cache's blocks and events now (also done\n"
	  "when collected), then let its slab and pool be closed. AegaeonError EBUSY, freeing\n"
	  "nothing, while gpu_block() views are alive or a call of it runs in another thread." },
	{ "__enter__", kv_enter, METH_NOARGS, PYAEG_ENTER_DOC },
	{ "__exit__", kv_exit, METH_VARARGS, PYAEG_EXIT_DOC },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot kv_slots[] = {
	{ Py_tp_new, kv_new },
	{ Py_tp_dealloc, kv_dealloc },
	{ Py_tp_getset, kv_getset },
	{ Py_tp_methods, kv_methods },
	{ Py_tp_doc,
	  "KVCache(gpu_id, block_bytes=32768, gpu_blocks=1024, host_blocks=1024, *, slab=None, pool=None,\n"
	  "        layers=1, parts=1, gpu_tensors=None, gpu_stride=0, host_tensors=None, host_stride=0)\n--\n\n"
	  "A KV cache of fixed-size blocks on a GPU and in pinned host memory, swapped\n"
	  "in bulk by a gather/scatter kernel. A block holds layers x parts pieces (K and\n"
	  "V: parts=2), all moved by one call. The GPU blocks come from slab (a\n"
	  "SlabAllocator), a slab of its own, or gpu_tensors: per-layer tensors (vLLM's\n"
	  "paged layout), layers x parts device addresses, piece (i, l, p) at\n"
	  "gpu_tensors[l * parts + p] + i * gpu_stride (0: the piece size), gpu_blocks\n"
	  "blocks each. The host blocks come from pool (a PinnedPool, whose buffer size\n"
	  "must be a multiple of block_bytes, so other processes attached to it see the\n"
	  "same blocks; a block holds its layers one after the other), a pool of its\n"
	  "own, or host_tensors (registered host memory, as gpu_tensors);\n"
	  "host_blocks=0 with a pool swaps blocks another process allocated. Errors:\n"
	  "ValueError (sizes), AegaeonValueError (layouts), AegaeonError ENOSPC, EDEVICE." },
	{ 0, NULL },
};

static PyType_Spec kv_spec = {
	.name = "aegaeon_native.KVCache",
	.basicsize = sizeof(KVObject),
	.flags = Py_TPFLAGS_DEFAULT,
	.slots = kv_slots,
};

int pyaeg_kv_init_type(PyObject *module)
{
	PyObject *type = PyType_FromSpec(&kv_spec);

	if (type == NULL)
		return -1;
	if (PyModule_AddObject(module, "KVCache", type) < 0) {
		Py_DECREF(type);
		return -1;
	}
	return 0;
}

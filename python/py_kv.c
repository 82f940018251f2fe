/* KVCache: KV blocks on a GPU and in pinned host memory, swapped in bulk, from Python. */
#include "py_internal.h"

#include <stdarg.h>
#include <string.h>

#define DEFAULT_BLOCK_BYTES (32u << 10)
#define DEFAULT_BLOCKS 1024u

typedef struct {
	PyObject_HEAD
	struct pyaeg_res *res;          /* res->kv and res->stream; NULL once closed */
	aeg_device_t *dev;
	int gpu;
	int host;
	uint64_t block_bytes;
	uint32_t gpu_blocks;
	uint32_t host_blocks;
	PyObject *slab;                 /* SlabAllocator the GPU blocks come from */
	PyObject *pool;                 /* PinnedPool the host blocks come from */
	PyObject *pending;              /* {handle: None}: events not released yet */
	PyObject *reqs;                 /* seed API: {req_id: [nbytes, host_ids, gpu_ids|None, out_handle|None]} */
	Py_ssize_t views;
} KVObject;

static aeg_kv_t *kv_open(KVObject *k)
{
	if (k->res == NULL || k->res->kv == NULL) {
		PyErr_SetString(PyExc_ValueError, "operation on a closed KVCache");
		return NULL;
	}
	return k->res->kv;
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

static PyObject *kv_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "gpu_id", "block_bytes", "gpu_blocks", "host_blocks", "slab", "pool", NULL };
	PyObject *gpu_obj, *bb_obj = NULL, *gb_obj = NULL, *hb_obj = NULL, *slab = Py_None, *pool = Py_None;
	uint64_t block_bytes = DEFAULT_BLOCK_BYTES, gpu_blocks = DEFAULT_BLOCKS, host_blocks = DEFAULT_BLOCKS;
	struct aeg_kv_params params;
	struct aeg_kv_stats st;
	KVObject *k;
	int gpu, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOO$OO:KVCache", kwlist, &gpu_obj, &bb_obj, &gb_obj,
					 &hb_obj, &slab, &pool))
		return NULL;
	if (pyaeg_gpu(gpu_obj, &gpu) < 0 ||
	    (bb_obj != NULL && pyaeg_u64(bb_obj, "block_bytes", 0, &block_bytes) < 0) ||
	    (gb_obj != NULL && pyaeg_u64(gb_obj, "gpu_blocks", 0, &gpu_blocks) < 0) ||
	    (hb_obj != NULL && pyaeg_u64(hb_obj, "host_blocks", 1, &host_blocks) < 0))
		return NULL;
	if (block_bytes % AEG_KV_BLOCK_ALIGN != 0 || block_bytes < AEG_KV_BLOCK_MIN || block_bytes > AEG_KV_BLOCK_MAX)
		return PyErr_Format(PyExc_ValueError, "block_bytes %llu: must be a multiple of %u from %u to %u",
				    (unsigned long long)block_bytes, AEG_KV_BLOCK_ALIGN, AEG_KV_BLOCK_MIN,
				    AEG_KV_BLOCK_MAX);
	if (gpu_blocks > UINT32_MAX / 2 || host_blocks > UINT32_MAX / 2)
		return PyErr_Format(PyExc_ValueError, "gpu_blocks and host_blocks must be below %u", UINT32_MAX / 2);
	if (slab != Py_None && pyaeg_slab_of(slab) == NULL)
		return NULL;
	if (pool != Py_None && pyaeg_pool_of(pool) == NULL)
		return NULL;
	if (pool == Py_None && host_blocks == 0)
		return PyErr_Format(PyExc_ValueError, "host_blocks 0 needs a pool= whose blocks other processes allocate");
	k = (KVObject *)PyType_GenericAlloc(type, 0);
	if (k == NULL)
		return NULL;
	k->gpu = gpu;
	k->block_bytes = block_bytes;
	k->pending = PyDict_New();
	k->reqs = PyDict_New();
	if (k->pending == NULL || k->reqs == NULL || pyaeg_device(&k->dev) < 0)
		goto fail;
	k->host = aeg_device_kind(k->dev) == AEG_DEVICE_HOST;
	if (slab == Py_None)
		slab = call_type(pyaeg_slab_type, "(iK)", gpu, (unsigned long long)(gpu_blocks * block_bytes));
	else
		Py_INCREF(slab);
	k->slab = slab;
	if (slab == NULL)
		goto fail;
	if (pool == Py_None) {
		/* Buffers hold whole blocks and whole pages. */
		uint64_t buf = block_bytes;

		while (buf % 4096 != 0)
			buf += block_bytes;
		pool = call_type(pyaeg_pool_type, "(KKi)", (unsigned long long)buf,
				 (unsigned long long)((host_blocks * block_bytes + buf - 1) / buf), gpu);
	} else {
		Py_INCREF(pool);
	}
	k->pool = pool;
	if (pool == NULL)
		goto fail;
	memset(&params, 0, sizeof(params));
	params.block_bytes = block_bytes;
	params.slab = pyaeg_slab_of(slab);
	params.gpu_blocks = (uint32_t)gpu_blocks;
	{
		struct aeg_pool_stats ps;

		params.pool = pyaeg_pool_of(pool);
		if (params.pool == NULL)
			goto fail;
		aeg_pool_stats(params.pool, &ps);
		params.host_buffers = (uint32_t)((host_blocks * block_bytes + ps.buffer_bytes - 1) / ps.buffer_bytes);
	}
	k->res = pyaeg_res_new();
	if (k->res == NULL)
		goto fail;
	PYAEG_BEGIN_ALLOW_THREADS
	err = aeg_stream_create(k->dev, gpu, &k->res->stream);
	if (err == 0)
		err = aeg_kv_create(k->dev, gpu, &params, &k->res->kv);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		pyaeg_raise(err);
		goto fail;
	}
	aeg_kv_stats(k->res->kv, &st);
	k->gpu_blocks = st.gpu_blocks;
	k->host_blocks = st.host_blocks;
	pyaeg_object_born();
	return (PyObject *)k;
fail:
	Py_DECREF(k);
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

static PyObject *blocks_alloc(KVObject *k, PyObject *n_obj, int gpu_side)
{
	aeg_kv_t *kv = kv_open(k);
	uint32_t *ids;
	PyObject *list;
	uint64_t n;
	int err;

	if (kv == NULL || pyaeg_u64(n_obj, "n", 0, &n) < 0)
		return NULL;
	if (n > (gpu_side ? k->gpu_blocks : k->host_blocks))
		return pyaeg_raise_msg(AEG_ENOSPC, "%llu %s blocks asked, the cache has %u",
				       (unsigned long long)n, gpu_side ? "GPU" : "host",
				       gpu_side ? k->gpu_blocks : k->host_blocks);
	ids = PyMem_Malloc((size_t)n * sizeof(*ids));
	if (ids == NULL)
		return PyErr_NoMemory();
	err = gpu_side ? aeg_kv_gpu_alloc(kv, (size_t)n, ids) : aeg_kv_host_alloc(kv, (size_t)n, ids);
	if (err < 0) {
		PyMem_Free(ids);
		return pyaeg_raise(err);
	}
	list = id_list(ids, (size_t)n);
	if (list == NULL) {
		if (gpu_side)
			aeg_kv_gpu_free(kv, ids, (size_t)n);
		else
			aeg_kv_host_free(kv, ids, (size_t)n);
	}
	PyMem_Free(ids);
	return list;
}

static PyObject *blocks_free(KVObject *k, PyObject *seq, int gpu_side)
{
	aeg_kv_t *kv = kv_open(k);
	uint32_t *ids;
	size_t n;
	int err;

	if (kv == NULL || pyaeg_id_list(seq, "ids", gpu_side ? k->gpu_blocks : k->host_blocks, &ids, &n) < 0)
		return NULL;
	err = n == 0 ? 0 : gpu_side ? aeg_kv_gpu_free(kv, ids, n) : aeg_kv_host_free(kv, ids, n);
	PyMem_Free(ids);
	if (err < 0)
		return pyaeg_raise(err);
	Py_RETURN_NONE;
}

static PyObject *kv_gpu_alloc(PyObject *self, PyObject *n)
{
	return blocks_alloc((KVObject *)self, n, 1);
}

static PyObject *kv_host_alloc(PyObject *self, PyObject *n)
{
	return blocks_alloc((KVObject *)self, n, 0);
}

static PyObject *kv_gpu_free(PyObject *self, PyObject *ids)
{
	return blocks_free((KVObject *)self, ids, 1);
}

static PyObject *kv_host_free(PyObject *self, PyObject *ids)
{
	return blocks_free((KVObject *)self, ids, 0);
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

static PyObject *kv_gpu_ptr(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	uint32_t id;

	if (kv == NULL || block_index(k, obj, 1, &id) < 0)
		return NULL;
	return PyLong_FromUnsignedLongLong((uintptr_t)aeg_kv_gpu_ptr(kv, id));
}

static PyObject *kv_host_ptr(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	uint32_t id;

	if (kv == NULL || block_index(k, obj, 0, &id) < 0)
		return NULL;
	return PyLong_FromUnsignedLongLong((uintptr_t)aeg_kv_host_ptr(kv, id));
}

static PyObject *kv_gpu_block(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	uint32_t id;

	if (kv == NULL || block_index(k, obj, 1, &id) < 0)
		return NULL;
	return pyaeg_array_new(self, &k->views, aeg_kv_gpu_ptr(kv, id), k->block_bytes, k->gpu, k->host,
			       "U8", 0, NULL, 0);
}

static PyObject *kv_host_block(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	aeg_pool_t *pool;
	uint32_t id;

	if (kv == NULL || block_index(k, obj, 0, &id) < 0 || (pool = pyaeg_pool_of(k->pool)) == NULL)
		return NULL;
	return pyaeg_pool_view(k->pool, (uint64_t)((uintptr_t)aeg_kv_host_ptr(kv, id) - (uintptr_t)aeg_pool_base(pool)),
			       k->block_bytes);
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

static int release_handle(KVObject *k, aeg_kv_t *kv, const aeg_handle_t *h)
{
	PyObject *b;
	int err;

	err = aeg_kv_release(kv, h);
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	b = pyaeg_handle_bytes(h);
	if (b == NULL)
		return -1;
	if (PyDict_GetItem(k->pending, b) != NULL && PyDict_DelItem(k->pending, b) < 0) {
		Py_DECREF(b);
		return -1;
	}
	Py_DECREF(b);
	return 0;
}

/* A swap either way; returns the handle, (handle, layer handles), or None with wait. */
static PyObject *swap(KVObject *k, int out, PyObject *src_seq, PyObject *dst_seq, PyObject *layers_obj, int wait)
{
	aeg_kv_t *kv = kv_open(k);
	uint32_t *src = NULL, *dst = NULL;
	struct aeg_kv_layers layers = { 0, NULL, NULL };
	size_t *ends = NULL, ns, nd, nl = 0;
	PyObject *result = NULL;
	aeg_handle_t h;
	int err;

	if (kv == NULL)
		return NULL;
	if (pyaeg_id_list(src_seq, out ? "gpu_ids" : "host_ids", out ? k->gpu_blocks : k->host_blocks, &src, &ns) < 0 ||
	    pyaeg_id_list(dst_seq, out ? "host_ids" : "gpu_ids", out ? k->host_blocks : k->gpu_blocks, &dst, &nd) < 0)
		goto out;
	if (ns != nd) {
		PyErr_Format(PyExc_ValueError, "%zu source blocks for %zu destination blocks", ns, nd);
		goto out;
	}
	if (ns == 0) {
		PyErr_SetString(PyExc_ValueError, "no blocks to swap");
		goto out;
	}
	if (layers_obj != Py_None) {
		uint32_t *e32;

		if (pyaeg_id_list(layers_obj, "layers", UINT32_MAX, &e32, &nl) < 0)
			goto out;
		ends = PyMem_Malloc((nl ? nl : 1) * sizeof(*ends));
		layers.handles = PyMem_Malloc((nl ? nl : 1) * sizeof(*layers.handles));
		if (ends == NULL || layers.handles == NULL) {
			PyMem_Free(e32);
			PyErr_NoMemory();
			goto out;
		}
		for (size_t i = 0; i < nl; i++)
			ends[i] = e32[i];
		PyMem_Free(e32);
		layers.count = nl;
		layers.ends = ends;
	}
	PYAEG_BEGIN_ALLOW_THREADS
	if (layers_obj != Py_None)
		err = out ? aeg_kv_swap_out_layers(kv, src, dst, ns, &layers, k->res->stream, &h) :
			    aeg_kv_swap_in_layers(kv, dst, src, ns, &layers, k->res->stream, &h);
	else
		err = out ? aeg_kv_swap_out(kv, src, dst, ns, k->res->stream, &h) :
			    aeg_kv_swap_in(kv, src, dst, ns, k->res->stream, &h);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		pyaeg_raise(err);
		goto out;
	}
	if (add_pending(k, &h) < 0)
		goto out;
	if (wait) {
		if (wait_handle(k, &h, -1) < 0 || release_handle(k, kv, &h) < 0)
			goto out;
		result = Py_None;
		Py_INCREF(result);
	} else if (layers_obj != Py_None) {
		PyObject *list = PyList_New((Py_ssize_t)nl);

		for (size_t i = 0; list != NULL && i < nl; i++) {
			PyObject *b = pyaeg_handle_bytes(&layers.handles[i]);

			if (b == NULL)
				Py_CLEAR(list);
			else
				PyList_SetItem(list, (Py_ssize_t)i, b);
		}
		if (list != NULL)
			result = Py_BuildValue("(NN)", pyaeg_handle_bytes(&h), list);
	} else {
		result = pyaeg_handle_bytes(&h);
	}
out:
	PyMem_Free(src);
	PyMem_Free(dst);
	PyMem_Free(ends);
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
	return swap((KVObject *)self, 1, g, h, layers, wait);
}

static PyObject *kv_swap_in(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "host_ids", "gpu_ids", "layers", "wait", NULL };
	PyObject *g, *h, *layers = Py_None;
	int wait = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$Op:swap_in", kwlist, &h, &g, &layers, &wait))
		return NULL;
	return swap((KVObject *)self, 0, h, g, layers, wait);
}

static PyObject *copy(KVObject *k, int h2d, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "dst", "src", "nbytes", "wait", NULL };
	PyObject *dst_obj, *src_obj, *n_obj;
	uint64_t dst, src, n;
	aeg_kv_t *kv = kv_open(k);
	aeg_handle_t h;
	int wait = 0, err;

	if (kv == NULL)
		return NULL;
	if (!PyArg_ParseTupleAndKeywords(args, kw, h2d ? "OOO|$p:copy_h2d" : "OOO|$p:copy_d2h", kwlist,
					 &dst_obj, &src_obj, &n_obj, &wait))
		return NULL;
	if (pyaeg_u64(dst_obj, "dst", 0, &dst) < 0 || pyaeg_u64(src_obj, "src", 0, &src) < 0 ||
	    pyaeg_u64(n_obj, "nbytes", 0, &n) < 0)
		return NULL;
	PYAEG_BEGIN_ALLOW_THREADS
	err = h2d ? aeg_kv_copy_h2d(kv, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, k->res->stream, &h) :
		    aeg_kv_copy_d2h(kv, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, k->res->stream, &h);
	PYAEG_END_ALLOW_THREADS
	if (err < 0)
		return pyaeg_raise(err);
	if (add_pending(k, &h) < 0)
		return NULL;
	if (wait) {
		if (wait_handle(k, &h, -1) < 0 || release_handle(k, kv, &h) < 0)
			return NULL;
		Py_RETURN_NONE;
	}
	return pyaeg_handle_bytes(&h);
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

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:wait", kwlist, &obj, &timeout_obj))
		return NULL;
	if (kv_open(k) == NULL || pyaeg_handle(obj, &h) < 0 || pyaeg_timeout(timeout_obj, &seconds) < 0)
		return NULL;
	if (wait_handle(k, &h, seconds) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *kv_release(PyObject *self, PyObject *obj)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	aeg_handle_t h;

	if (kv == NULL || pyaeg_handle(obj, &h) < 0 || release_handle(k, kv, &h) < 0)
		return NULL;
	Py_RETURN_NONE;
}

/* --------------------------------------------------------- the seed's API */

static int record_item(PyObject *rec, int i, PyObject *v)
{
	Py_INCREF(v);
	return PyList_SetItem(rec, i, v);
}

static PyObject *kv_wait_all(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	PyObject *handles, *key, *rec;
	Py_ssize_t pos = 0;

	if (kv == NULL)
		return NULL;
	handles = PyDict_Keys(k->pending);
	if (handles == NULL)
		return NULL;
	for (Py_ssize_t i = 0; i < PyList_Size(handles); i++) {
		aeg_handle_t h;

		if (pyaeg_handle(PyList_GetItem(handles, i), &h) < 0 || wait_handle(k, &h, -1) < 0 ||
		    release_handle(k, kv, &h) < 0) {
			Py_DECREF(handles);
			return NULL;
		}
	}
	Py_DECREF(handles);
	/* Swapped-out requests give their GPU blocks back once the copies are done. */
	while (PyDict_Next(k->reqs, &pos, &key, &rec)) {
		if (PyList_GetItem(rec, 3) == Py_None)
			continue;
		if (blocks_free(k, PyList_GetItem(rec, 2), 1) == NULL)
			return NULL;
		Py_DECREF(Py_None);
		if (record_item(rec, 2, Py_None) < 0 || record_item(rec, 3, Py_None) < 0)
			return NULL;
	}
	Py_RETURN_NONE;
}

static PyObject *get_record(KVObject *k, PyObject *req_id)
{
	PyObject *rec = PyDict_GetItemWithError(k->reqs, req_id);

	if (rec == NULL && !PyErr_Occurred())
		PyErr_Format(PyExc_KeyError, "no KV stored for request %R", req_id);
	return rec;
}

static PyObject *drop(KVObject *k, PyObject *req_id)
{
	PyObject *rec, *r;

	if (kv_wait_all((PyObject *)k, NULL) == NULL)
		return NULL;
	rec = get_record(k, req_id);
	if (rec == NULL)
		return NULL;
	if (PyList_GetItem(rec, 2) != Py_None) {
		if ((r = blocks_free(k, PyList_GetItem(rec, 2), 1)) == NULL)
			return NULL;
		Py_DECREF(r);
	}
	if ((r = blocks_free(k, PyList_GetItem(rec, 1), 0)) == NULL)
		return NULL;
	Py_DECREF(r);
	if (PyDict_DelItem(k->reqs, req_id) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *kv_store(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "req_id", "data", NULL };
	KVObject *k = (KVObject *)self;
	PyObject *req_id, *data, *bytes = NULL, *host = NULL, *gpu = NULL, *n_obj = NULL, *h = NULL, *rec;
	aeg_kv_t *kv = kv_open(k);
	Py_ssize_t len;
	uint64_t nblocks;
	char *src;

	if (kv == NULL)
		return NULL;
	if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:store_kv_async", kwlist, &req_id, &data))
		return NULL;
	if (PyObject_Hash(req_id) == -1)
		return NULL;
	if (PyUnicode_Check(data))
		return PyErr_Format(PyExc_TypeError, "data must be bytes-like, not str");
	bytes = PyBytes_FromObject(data);
	if (bytes == NULL || PyBytes_AsStringAndSize(bytes, &src, &len) < 0)
		goto fail;
	if (len == 0) {
		PyErr_SetString(PyExc_ValueError, "no KV bytes to store");
		goto fail;
	}
	if (PyDict_GetItem(k->reqs, req_id) != NULL && drop(k, req_id) == NULL)
		goto fail;
	nblocks = ((uint64_t)len + k->block_bytes - 1) / k->block_bytes;
	n_obj = PyLong_FromUnsignedLongLong(nblocks);
	if (n_obj == NULL || (host = blocks_alloc(k, n_obj, 0)) == NULL)
		goto fail;
	if ((gpu = blocks_alloc(k, n_obj, 1)) == NULL)
		goto fail_host;
	for (uint64_t i = 0; i < nblocks; i++) {
		uint64_t off = i * k->block_bytes, part = (uint64_t)len - off;

		memcpy(aeg_kv_host_ptr(kv, (uint32_t)PyLong_AsUnsignedLong(PyList_GetItem(host, (Py_ssize_t)i))),
		       src + off, part < k->block_bytes ? part : k->block_bytes);
	}
	h = swap(k, 0, host, gpu, Py_None, 0);
	if (h == NULL)
		goto fail_gpu;
	Py_DECREF(h);
	rec = Py_BuildValue("[nOOO]", len, host, gpu, Py_None);
	if (rec == NULL || PyDict_SetItem(k->reqs, req_id, rec) < 0) {
		Py_XDECREF(rec);
		goto fail;
	}
	Py_DECREF(rec);
	Py_DECREF(host);
	Py_DECREF(gpu);
	Py_DECREF(n_obj);
	Py_DECREF(bytes);
	Py_RETURN_NONE;
fail_gpu:
	Py_XDECREF(blocks_free(k, gpu, 1));
fail_host:
	Py_XDECREF(blocks_free(k, host, 0));
fail:
	Py_XDECREF(gpu);
	Py_XDECREF(host);
	Py_XDECREF(n_obj);
	Py_XDECREF(bytes);
	return NULL;
}

static PyObject *kv_ensure(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	PyObject *rec, *gpu, *n_obj, *r;

	if (kv_open(k) == NULL || (rec = get_record(k, req_id)) == NULL)
		return NULL;
	Py_INCREF(rec);
	if (kv_wait_all(self, NULL) == NULL)
		goto fail;
	if (PyList_GetItem(rec, 2) == Py_None) {
		n_obj = PyLong_FromSsize_t(PyList_Size(PyList_GetItem(rec, 1)));
		gpu = n_obj ? blocks_alloc(k, n_obj, 1) : NULL;
		Py_XDECREF(n_obj);
		if (gpu == NULL)
			goto fail;
		r = swap(k, 0, PyList_GetItem(rec, 1), gpu, Py_None, 1);
		if (r == NULL) {
			Py_XDECREF(blocks_free(k, gpu, 1));
			Py_DECREF(gpu);
			goto fail;
		}
		Py_DECREF(r);
		PyList_SetItem(rec, 2, gpu);
	}
	gpu = PyList_GetItem(rec, 2);
	Py_INCREF(gpu);
	Py_DECREF(rec);
	return gpu;
fail:
	Py_DECREF(rec);
	return NULL;
}

static PyObject *kv_swapout_all(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	PyObject *key, *rec, *h;
	Py_ssize_t pos = 0;

	if (kv_open(k) == NULL)
		return NULL;
	while (PyDict_Next(k->reqs, &pos, &key, &rec)) {
		if (PyList_GetItem(rec, 2) == Py_None || PyList_GetItem(rec, 3) != Py_None)
			continue;
		h = swap(k, 1, PyList_GetItem(rec, 2), PyList_GetItem(rec, 1), Py_None, 0);
		if (h == NULL)
			return NULL;
		PyList_SetItem(rec, 3, h);
	}
	Py_RETURN_NONE;
}

static PyObject *kv_load(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	PyObject *rec, *host, *out, *r;
	Py_ssize_t len;
	char *dst;

	if (kv == NULL || kv_wait_all(self, NULL) == NULL || (rec = get_record(k, req_id)) == NULL)
		return NULL;
	host = PyList_GetItem(rec, 1);
	/* The GPU copy is the current one while the request is resident. */
	if (PyList_GetItem(rec, 2) != Py_None) {
		r = swap(k, 1, PyList_GetItem(rec, 2), host, Py_None, 1);
		if (r == NULL)
			return NULL;
		Py_DECREF(r);
	}
	len = PyLong_AsSsize_t(PyList_GetItem(rec, 0));
	out = PyBytes_FromStringAndSize(NULL, len);
	if (out == NULL)
		return NULL;
	dst = PyBytes_AsString(out);
	for (Py_ssize_t i = 0; i < PyList_Size(host); i++) {
		uint64_t off = (uint64_t)i * k->block_bytes, part = (uint64_t)len - off;

		memcpy(dst + off, aeg_kv_host_ptr(kv, (uint32_t)PyLong_AsUnsignedLong(PyList_GetItem(host, i))),
		       part < k->block_bytes ? part : k->block_bytes);
	}
	return out;
}

static PyObject *kv_drop(PyObject *self, PyObject *req_id)
{
	if (kv_open((KVObject *)self) == NULL)
		return NULL;
	return drop((KVObject *)self, req_id);
}

/* -------------------------------------------------------------- the rest */

static PyObject *kv_stats(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = kv_open(k);
	struct aeg_kv_stats st;
	int err;

	if (kv == NULL)
		return NULL;
	err = aeg_kv_stats(kv, &st);
	if (err < 0)
		return pyaeg_raise(err);
	return Py_BuildValue("{s:K,s:I,s:I,s:I,s:I,s:I,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n}",
			     "block_bytes", (unsigned long long)st.block_bytes, "gpu_blocks", st.gpu_blocks,
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

	if (k->res == NULL || k->res->kv == NULL)
		Py_RETURN_NONE;
	if (k->views > 0)
		return pyaeg_raise_msg(AEG_EBUSY, "KVCache: %zd DeviceArray view%s of its blocks still alive", k->views,
				       k->views == 1 ? "" : "s");
	pyaeg_res_free(k->res);
	k->res = NULL;
	pyaeg_object_gone();
	PyDict_Clear(k->pending);
	PyDict_Clear(k->reqs);
	Py_RETURN_NONE;
}

static PyObject *kv_enter(PyObject *self, PyObject *unused)
{
	if (kv_open((KVObject *)self) == NULL)
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
	{ "gpu_alloc", kv_gpu_alloc, METH_O, "gpu_alloc(n) -> list[int]\n--\n\nAllocate n GPU blocks (all or none; AegaeonError ENOSPC)." },
	{ "gpu_free", kv_gpu_free, METH_O, "gpu_free(ids)\n--\n\nFree GPU blocks (AegaeonValueError for one not allocated; then none is freed)." },
	{ "host_alloc", kv_host_alloc, METH_O, "host_alloc(n) -> list[int]\n--\n\nAllocate n host blocks." },
	{ "host_free", kv_host_free, METH_O, "host_free(ids)\n--\n\nFree host blocks." },
	{ "swap_out", FN(kv_swap_out), KW,
	  "swap_out(gpu_ids, host_ids, *, layers=None, wait=False)\n--\n\n"
	  "Move GPU blocks gpu_ids[i] to host blocks host_ids[i] in one gather/scatter\n"
	  "kernel (cuda) on the cache's stream, asynchronously. Returns the 64-byte\n"
	  "handle of an event recorded after the last block (wait with wait(),\n"
	  "wait_event_handle_bytes() in any process, then release()). layers: ends of\n"
	  "each layer's entries (strictly increasing, the last = len(ids)) for an event\n"
	  "per layer: returns (handle, [layer handles]). wait=True waits, releases the\n"
	  "event and returns None. All ids are checked before anything moves." },
	{ "swap_in", FN(kv_swap_in), KW,
	  "swap_in(host_ids, gpu_ids, *, layers=None, wait=False)\n--\n\nHost blocks to GPU blocks; as swap_out()." },
	{ "copy_h2d", FN(kv_copy_h2d), KW,
	  "copy_h2d(dst, src, nbytes, *, wait=False)\n--\n\n"
	  "One asynchronous copy from host address src to device address dst (raw\n"
	  "pointers, as the seed's; pinned host memory such as a PinnedPool buffer's\n"
	  "address() keeps it asynchronous). Returns an event handle as swap_out()." },
	{ "copy_d2h", FN(kv_copy_d2h), KW,
	  "copy_d2h(dst, src, nbytes, *, wait=False)\n--\n\nOne asynchronous copy from device address src to host address dst." },
	{ "wait", FN(kv_wait), KW,
	  "wait(handle, timeout=None)\n--\n\nWait for a swap or copy of this cache (GIL released; AegaeonTimeoutError)." },
	{ "release", kv_release, METH_O,
	  "release(handle)\n--\n\nDestroy the event(s) of a swap or copy (AegaeonError ENOENT for one not held)." },
	{ "wait_all", kv_wait_all, METH_NOARGS,
	  "wait_all()\n--\n\nWait for and release every swap and copy not released yet; requests\n"
	  "swapped out by swapout_all_async() give their GPU blocks back." },
	{ "gpu_ptr", kv_gpu_ptr, METH_O, "gpu_ptr(id) -> int\n--\n\nDevice address of GPU block id." },
	{ "host_ptr", kv_host_ptr, METH_O, "host_ptr(id) -> int\n--\n\nHost address of host block id (pinned)." },
	{ "gpu_block", kv_gpu_block, METH_O, "gpu_block(id) -> DeviceArray\n--\n\nA U8 view of GPU block id." },
	{ "host_block", kv_host_block, METH_O, "host_block(id) -> memoryview\n--\n\nA writable view of host block id." },
	{ "store_kv_async", FN(kv_store), KW,
	  "store_kv_async(req_id, data)\n--\n\n"
	  "The seed's API: keep a request's KV bytes in host blocks and start copying\n"
	  "them to GPU blocks (asynchronously). A request stored again replaces the old." },
	{ "ensure_kv_on_gpu", kv_ensure, METH_O,
	  "ensure_kv_on_gpu(req_id) -> list[int]\n--\n\n"
	  "Bring a request's KV onto the GPU (swap in if it was swapped out), wait, and\n"
	  "return its GPU block ids in order. KeyError for an unknown request." },
	{ "swapout_all_async", kv_swapout_all, METH_NOARGS,
	  "swapout_all_async()\n--\n\nStart swapping every resident request out to its host blocks;\n"
	  "wait_all() completes it and frees their GPU blocks." },
	{ "load_kv", kv_load, METH_O,
	  "load_kv(req_id) -> bytes\n--\n\nThe request's KV bytes as they are now (copied back from the GPU if resident)." },
	{ "drop_kv", kv_drop, METH_O, "drop_kv(req_id)\n--\n\nForget a request and free its blocks." },
	{ "stats", kv_stats, METH_NOARGS,
	  "stats() -> dict\n--\n\n"
	  "block_bytes, gpu_blocks, gpu_used, host_blocks, host_owned, host_used,\n"
	  "events_live, swaps_out, swaps_in, blocks_out, blocks_in, copies, copy_bytes,\n"
	  "requests (seed API), pending (events not released)." },
	{ "close", kv_close, METH_NOARGS,
	  "close()\n--\n\nWait for queued transfers and free the cache's blocks and events now (also done\n"
	  "when collected). AegaeonError EBUSY while gpu_block() views are alive." },
	{ "__enter__", kv_enter, METH_NOARGS, NULL },
	{ "__exit__", kv_exit, METH_VARARGS, NULL },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot kv_slots[] = {
	{ Py_tp_new, kv_new },
	{ Py_tp_dealloc, kv_dealloc },
	{ Py_tp_getset, kv_getset },
	{ Py_tp_methods, kv_methods },
	{ Py_tp_doc,
	  "KVCache(gpu_id, block_bytes=32768, gpu_blocks=1024, host_blocks=1024, *, slab=None, pool=None)\n--\n\n"
	  "A KV cache of fixed-size blocks on a GPU and in pinned host memory, swapped\n"
	  "in bulk by a gather/scatter kernel. The GPU blocks come from slab (a\n"
	  "SlabAllocator) or a slab of its own; the host blocks from pool (a PinnedPool,\n"
	  "whose buffer size must be a multiple of block_bytes, so other processes\n"
	  "attached to it see the same blocks) or a pool of its own; host_blocks=0 with\n"
	  "a pool swaps blocks another process allocated. Errors: ValueError (sizes),\n"
	  "AegaeonError ENOSPC, EDEVICE." },
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

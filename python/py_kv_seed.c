/* KVCache's request API of the seed (store, ensure on GPU, swap all out, load, drop), on py_kv.c's swaps. */
#include "py_kv.h"

#include <string.h>

/* The seed's requests are bytes laid into whole host blocks: a pool's, not per-layer tensors. */
static int contiguous_host(const KVObject *k)
{
	if (k->pool != Py_None)
		return 0;
	PyErr_SetString(PyExc_ValueError, "the request API lays a request's bytes into whole host blocks: "
			"not on a cache whose host side is per-layer host_tensors");
	return -1;
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

	if ((r = pykv_wait_all((PyObject *)k, NULL)) == NULL)
		return NULL;
	Py_DECREF(r);
	rec = get_record(k, req_id);
	if (rec == NULL)
		return NULL;
	if (PyList_GetItem(rec, 2) != Py_None) {
		if ((r = pykv_blocks_free(k, PyList_GetItem(rec, 2), 1)) == NULL)
			return NULL;
		Py_DECREF(r);
	}
	if ((r = pykv_blocks_free(k, PyList_GetItem(rec, 1), 0)) == NULL)
		return NULL;
	Py_DECREF(r);
	if (PyDict_DelItem(k->reqs, req_id) < 0)
		return NULL;
	Py_RETURN_NONE;
}

/*
 * The methods hold the cache (pykv_use) from start to end: they copy into
 * its host blocks and swap with the GIL released in between.
 */
static PyObject *store(KVObject *k, aeg_kv_t *kv, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "req_id", "data", NULL };
	PyObject *req_id, *data, *bytes = NULL, *host = NULL, *gpu = NULL, *n_obj = NULL, *h = NULL, *rec;
	Py_ssize_t len;
	uint64_t nblocks;
	char *src;

	if (contiguous_host(k) < 0)
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
	if (PyDict_GetItem(k->reqs, req_id) != NULL) {
		if ((h = drop(k, req_id)) == NULL)
			goto fail;
		Py_CLEAR(h);
	}
	nblocks = ((uint64_t)len + k->block_bytes - 1) / k->block_bytes;
	n_obj = PyLong_FromUnsignedLongLong(nblocks);
	if (n_obj == NULL || (host = pykv_blocks_alloc(k, n_obj, 0)) == NULL)
		goto fail;
	if ((gpu = pykv_blocks_alloc(k, n_obj, 1)) == NULL)
		goto fail_host;
	for (uint64_t i = 0; i < nblocks; i++) {
		uint64_t off = i * k->block_bytes, part = (uint64_t)len - off;

		memcpy(aeg_kv_host_ptr(kv, (uint32_t)PyLong_AsUnsignedLong(PyList_GetItem(host, (Py_ssize_t)i))),
		       src + off, part < k->block_bytes ? part : k->block_bytes);
	}
	h = pykv_swap(k, 0, host, gpu, Py_None, 0);
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
	Py_XDECREF(pykv_blocks_free(k, gpu, 1));
fail_host:
	Py_XDECREF(pykv_blocks_free(k, host, 0));
fail:
	Py_XDECREF(gpu);
	Py_XDECREF(host);
	Py_XDECREF(n_obj);
	Py_XDECREF(bytes);
	return NULL;
}

static PyObject *ensure(KVObject *k, PyObject *req_id)
{
	PyObject *rec, *gpu, *n_obj, *r;

	if ((rec = get_record(k, req_id)) == NULL)
		return NULL;
	Py_INCREF(rec);
	if ((r = pykv_wait_all((PyObject *)k, NULL)) == NULL)
		goto fail;
	Py_DECREF(r);
	if (PyList_GetItem(rec, 2) == Py_None) {
		n_obj = PyLong_FromSsize_t(PyList_Size(PyList_GetItem(rec, 1)));
		gpu = n_obj ? pykv_blocks_alloc(k, n_obj, 1) : NULL;
		Py_XDECREF(n_obj);
		if (gpu == NULL)
			goto fail;
		r = pykv_swap(k, 0, PyList_GetItem(rec, 1), gpu, Py_None, 1);
		if (r == NULL) {
			Py_XDECREF(pykv_blocks_free(k, gpu, 1));
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

/*
 * The records are a snapshot, each held: the swaps give up the GIL, and
 * another thread's drop_kv() may delete a record from the cache meanwhile.
 */
static PyObject *swapout_all(KVObject *k)
{
	PyObject *items, *r;
	int rc = 0;

	/* Swap-outs run on another stream than swap-ins: a store still copying in comes first. */
	if ((r = pykv_wait_all((PyObject *)k, NULL)) == NULL)
		return NULL;
	Py_DECREF(r);
	items = PyDict_Items(k->reqs);
	if (items == NULL)
		return NULL;
	for (Py_ssize_t i = 0; rc == 0 && i < PyList_Size(items); i++) {
		PyObject *rec = PyTuple_GetItem(PyList_GetItem(items, i), 1), *gpu, *host, *h;

		if (PyList_GetItem(rec, 2) == Py_None || PyList_GetItem(rec, 3) != Py_None)
			continue;
		gpu = PyList_GetItem(rec, 2);
		host = PyList_GetItem(rec, 1);
		Py_INCREF(gpu);
		Py_INCREF(host);
		h = pykv_swap(k, 1, gpu, host, Py_None, 0);
		Py_DECREF(gpu);
		Py_DECREF(host);
		if (h == NULL)
			rc = -1;
		else
			PyList_SetItem(rec, 3, h);
	}
	Py_DECREF(items);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *load(KVObject *k, aeg_kv_t *kv, PyObject *req_id)
{
	PyObject *rec, *host, *gpu, *out = NULL, *r;
	Py_ssize_t len;
	char *dst;

	if (contiguous_host(k) < 0 || (r = pykv_wait_all((PyObject *)k, NULL)) == NULL)
		return NULL;
	Py_DECREF(r);
	if ((rec = get_record(k, req_id)) == NULL)
		return NULL;
	/* Held: the swap gives up the GIL, and a drop_kv() in another thread may delete the record. */
	Py_INCREF(rec);
	host = PyList_GetItem(rec, 1);
	gpu = PyList_GetItem(rec, 2);
	Py_INCREF(host);
	Py_INCREF(gpu);
	/* The GPU copy is the current one while the request is resident. */
	if (gpu != Py_None) {
		r = pykv_swap(k, 1, gpu, host, Py_None, 1);
		if (r == NULL)
			goto out;
		Py_DECREF(r);
	}
	len = PyLong_AsSsize_t(PyList_GetItem(rec, 0));
	out = PyBytes_FromStringAndSize(NULL, len);
	if (out == NULL)
		goto out;
	dst = PyBytes_AsString(out);
	for (Py_ssize_t i = 0; i < PyList_Size(host); i++) {
		uint64_t off = (uint64_t)i * k->block_bytes, part = (uint64_t)len - off;

		memcpy(dst + off, aeg_kv_host_ptr(kv, (uint32_t)PyLong_AsUnsignedLong(PyList_GetItem(host, i))),
		       part < k->block_bytes ? part : k->block_bytes);
	}
out:
	Py_DECREF(gpu);
	Py_DECREF(host);
	Py_DECREF(rec);
	return out;
}

PyObject *pykv_store(PyObject *self, PyObject *args, PyObject *kw)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = pykv_use(k);
	PyObject *r;

	if (kv == NULL)
		return NULL;
	r = store(k, kv, args, kw);
	pykv_done(k);
	return r;
}

PyObject *pykv_ensure(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	PyObject *r;

	if (pykv_use(k) == NULL)
		return NULL;
	r = ensure(k, req_id);
	pykv_done(k);
	return r;
}

PyObject *pykv_swapout_all(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	PyObject *r;

	if (pykv_use(k) == NULL)
		return NULL;
	r = swapout_all(k);
	pykv_done(k);
	return r;
}

PyObject *pykv_load(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = pykv_use(k);
	PyObject *r;

	if (kv == NULL)
		return NULL;
	r = load(k, kv, req_id);
	pykv_done(k);
	return r;
}

PyObject *pykv_drop(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	PyObject *r;

	if (pykv_use(k) == NULL)
		return NULL;
	r = drop(k, req_id);
	pykv_done(k);
	return r;
}


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

	if (pykv_wait_all((PyObject *)k, NULL) == NULL)
		return NULL;
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

PyObject *pykv_store(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "req_id", "data", NULL };
	KVObject *k = (KVObject *)self;
	PyObject *req_id, *data, *bytes = NULL, *host = NULL, *gpu = NULL, *n_obj = NULL, *h = NULL, *rec;
	aeg_kv_t *kv = pykv_open(k);
	Py_ssize_t len;
	uint64_t nblocks;
	char *src;

	if (kv == NULL || contiguous_host(k) < 0)
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

PyObject *pykv_ensure(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	PyObject *rec, *gpu, *n_obj, *r;

	if (pykv_open(k) == NULL || (rec = get_record(k, req_id)) == NULL)
		return NULL;
	Py_INCREF(rec);
	if (pykv_wait_all(self, NULL) == NULL)
		goto fail;
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

PyObject *pykv_swapout_all(PyObject *self, PyObject *unused)
{
	KVObject *k = (KVObject *)self;
	PyObject *key, *rec, *h;
	Py_ssize_t pos = 0;

	/* Swap-outs run on another stream than swap-ins: a store still copying in comes first. */
	if (pykv_open(k) == NULL || pykv_wait_all(self, NULL) == NULL)
		return NULL;
	Py_DECREF(Py_None);
	while (PyDict_Next(k->reqs, &pos, &key, &rec)) {
		if (PyList_GetItem(rec, 2) == Py_None || PyList_GetItem(rec, 3) != Py_None)
			continue;
		h = pykv_swap(k, 1, PyList_GetItem(rec, 2), PyList_GetItem(rec, 1), Py_None, 0);
		if (h == NULL)
			return NULL;
		PyList_SetItem(rec, 3, h);
	}
	Py_RETURN_NONE;
}

PyObject *pykv_load(PyObject *self, PyObject *req_id)
{
	KVObject *k = (KVObject *)self;
	aeg_kv_t *kv = pykv_open(k);
	PyObject *rec, *host, *out, *r;
	Py_ssize_t len;
	char *dst;

	if (kv == NULL || contiguous_host(k) < 0 || pykv_wait_all(self, NULL) == NULL ||
	    (rec = get_record(k, req_id)) == NULL)
		return NULL;
	host = PyList_GetItem(rec, 1);
	/* The GPU copy is the current one while the request is resident. */
	if (PyList_GetItem(rec, 2) != Py_None) {
		r = pykv_swap(k, 1, PyList_GetItem(rec, 2), host, Py_None, 1);
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

PyObject *pykv_drop(PyObject *self, PyObject *req_id)
{
	if (pykv_open((KVObject *)self) == NULL)
		return NULL;
	return drop((KVObject *)self, req_id);
}


/* SlabAllocator: a GPU slab of its own, sub-allocated in O(1), from Python. */
#include "py_internal.h"

#include <inttypes.h>
#include <string.h>

typedef struct {
	PyObject_HEAD
	struct pyaeg_res *res;          /* res->slab; NULL once closed */
	int gpu;
	int host;
	uint64_t total;
	uintptr_t base;
	struct pyaeg_users users;       /* block views, calls, KVCaches: close() waits for none */
	PyObject *blocks;               /* {id: device_ptr} of live blocks */
	PyObject *by_ptr;               /* {device_ptr: id} of allocate()'s blocks */
} SlabObject;

PyObject *pyaeg_slab_type;

static aeg_slab_t *slab_open(SlabObject *s)
{
	if (s->res == NULL || s->res->slab == NULL) {
		PyErr_SetString(PyExc_ValueError, "operation on a closed SlabAllocator");
		return NULL;
	}
	if (pyaeg_inherited_check() < 0)
		return NULL;
	return s->res->slab;
}

/*
 * The slab for one call, taken once its arguments are converted: until
 * slab_done, close() (from a callback, a collection or another thread) is
 * EBUSY, so the slab stays. NULL with ValueError once closed.
 */
static aeg_slab_t *slab_use(SlabObject *s)
{
	return pyaeg_users_enter(&s->users, slab_open(s));
}

static void slab_done(SlabObject *s)
{
	pyaeg_users_leave(&s->users);
}

aeg_slab_t *pyaeg_slab_hold(PyObject *obj)
{
	aeg_slab_t *slab;

	if (!PyObject_TypeCheck(obj, (PyTypeObject *)pyaeg_slab_type)) {
		PyErr_Format(PyExc_TypeError, "slab must be a SlabAllocator, not %s", pyaeg_tname(obj));
		return NULL;
	}
	slab = slab_open((SlabObject *)obj);
	if (slab != NULL)
		((SlabObject *)obj)->users.caches++;
	return slab;
}

void pyaeg_slab_unhold(PyObject *obj)
{
	((SlabObject *)obj)->users.caches--;
}

static PyObject *slab_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "gpu_id", "total_bytes", NULL };
	PyObject *gpu_obj, *bytes_obj;
	aeg_device_t *dev;
	SlabObject *s;
	uint64_t bytes;
	int gpu, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:SlabAllocator", kwlist, &gpu_obj, &bytes_obj))
		return NULL;
	if (pyaeg_gpu(gpu_obj, &gpu) < 0 || pyaeg_u64(bytes_obj, "total_bytes", 0, &bytes) < 0)
		return NULL;
	if (pyaeg_device(&dev) < 0)
		return NULL;
	s = (SlabObject *)PyType_GenericAlloc(type, 0);
	if (s == NULL)
		return NULL;
	s->gpu = gpu;
	s->host = aeg_device_kind(dev) == AEG_DEVICE_HOST;
	s->blocks = PyDict_New();
	s->by_ptr = PyDict_New();
	if (s->blocks == NULL || s->by_ptr == NULL)
		goto fail;
	s->res = pyaeg_res_new();
	if (s->res == NULL)
		goto fail;
	/* Inside a job the blocks are a lease of the job's slab, reachable by every step. */
	err = pyaeg_job_slab(gpu, bytes, &s->res->slab);
	if (err < 0)
		goto fail;
	s->res->job_lease = err;
	if (!s->res->job_lease) {
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_slab_create(dev, gpu, bytes, &s->res->slab);
		PYAEG_END_ALLOW_THREADS
	}
	if (err < 0) {
		pyaeg_raise(err);
		goto fail;
	}
	s->total = aeg_slab_bytes(s->res->slab);
	s->base = (uintptr_t)aeg_slab_base(s->res->slab);
	pyaeg_object_born();
	return (PyObject *)s;
fail:
	Py_DECREF(s);
	return NULL;
}

static void slab_dealloc(PyObject *self)
{
	SlabObject *s = (SlabObject *)self;
	PyTypeObject *tp = Py_TYPE(self);
	freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

	if (s->res != NULL) {
		if (s->res->slab != NULL)
			pyaeg_object_gone();
		pyaeg_res_free(s->res);
	}
	Py_XDECREF(s->blocks);
	Py_XDECREF(s->by_ptr);
	tp_free(self);
	Py_DECREF(tp);
}

static PyObject *block_view(SlabObject *s, const struct aeg_block *b)
{
	return pyaeg_array_new((PyObject *)s, &s->users.views, b->ptr, b->size, s->gpu, s->host, "U8", 0, NULL,
			       b->id);
}

/* A block of @bytes, listed in s->blocks; the caller holds @slab (slab_use). */
static int alloc_block(SlabObject *s, aeg_slab_t *slab, uint64_t bytes, struct aeg_block *b)
{
	PyObject *id, *ptr;
	int err, rc;

	err = aeg_slab_alloc(slab, bytes, b);
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	id = PyLong_FromUnsignedLongLong(b->id);
	ptr = PyLong_FromUnsignedLongLong((uintptr_t)b->ptr);
	rc = id != NULL && ptr != NULL ? PyDict_SetItem(s->blocks, id, ptr) : -1;
	Py_XDECREF(id);
	Py_XDECREF(ptr);
	if (rc < 0)
		aeg_slab_free(slab, b->id);
	return rc;
}

static PyObject *slab_alloc(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "nbytes", NULL };
	SlabObject *s = (SlabObject *)self;
	PyObject *bytes_obj, *view = NULL;
	struct aeg_block b;
	aeg_slab_t *slab;
	uint64_t bytes;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:alloc", kwlist, &bytes_obj))
		return NULL;
	if (pyaeg_u64(bytes_obj, "nbytes", 0, &bytes) < 0 || (slab = slab_use(s)) == NULL)
		return NULL;
	if (alloc_block(s, slab, bytes, &b) == 0) {
		view = block_view(s, &b);
		if (view == NULL) {
			PyObject *id = PyLong_FromUnsignedLongLong(b.id);

			aeg_slab_free(slab, b.id);
			if (id != NULL && PyDict_DelItem(s->blocks, id) < 0)
				PyErr_Clear();
			Py_XDECREF(id);
		}
	}
	slab_done(s);
	return view;
}

static PyObject *slab_allocate(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "nbytes", "alignment", NULL };
	SlabObject *s = (SlabObject *)self;
	PyObject *bytes_obj, *align_obj = NULL, *id, *ptr = NULL;
	struct aeg_block b;
	uint64_t bytes, align = AEG_SLAB_ALIGN;
	aeg_slab_t *slab;
	int rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:allocate", kwlist, &bytes_obj, &align_obj))
		return NULL;
	if (pyaeg_u64(bytes_obj, "nbytes", 0, &bytes) < 0 ||
	    (align_obj != NULL && pyaeg_u64(align_obj, "alignment", 0, &align) < 0))
		return NULL;
	if ((align & (align - 1)) != 0 || align > AEG_SLAB_ALIGN)
		return PyErr_Format(PyExc_ValueError, "alignment %llu: must be a power of two up to %u",
				    (unsigned long long)align, AEG_SLAB_ALIGN);
	if ((slab = slab_use(s)) == NULL)
		return NULL;
	if (alloc_block(s, slab, bytes, &b) == 0) {
		id = PyLong_FromUnsignedLongLong(b.id);
		ptr = PyLong_FromUnsignedLongLong((uintptr_t)b.ptr);
		rc = id != NULL && ptr != NULL ? PyDict_SetItem(s->by_ptr, ptr, id) : -1;
		Py_XDECREF(id);
		if (rc < 0)
			Py_CLEAR(ptr);
	}
	slab_done(s);
	return ptr;
}

/* The block id a free() argument names: a block view, an id, or allocate()'s pointer. */
static int block_id(SlabObject *s, PyObject *obj, uint64_t *id)
{
	PyObject *v, *owner;

	if (PyObject_TypeCheck(obj, (PyTypeObject *)pyaeg_array_type)) {
		/* Block ids are per slab: another slab's block of this id is not this one. */
		owner = pyaeg_array_owner(obj);
		if (owner != NULL && owner != (PyObject *)s &&
		    PyObject_TypeCheck(owner, (PyTypeObject *)pyaeg_slab_type)) {
			PyErr_Format(PyExc_ValueError, "this DeviceArray is a block of %R (GPU %d), not of %R (GPU %d): "
				     "free it with its own SlabAllocator", owner, ((SlabObject *)owner)->gpu,
				     (PyObject *)s, s->gpu);
			return -1;
		}
		if (owner != (PyObject *)s) {
			PyErr_SetString(PyExc_ValueError, "this DeviceArray is not a slab block");
			return -1;
		}
		v = PyObject_GetAttrString(obj, "id");
		if (v == NULL)
			return -1;
		obj = v;
	} else {
		Py_INCREF(obj);
	}
	if (pyaeg_u64(obj, "block", 1, id) < 0) {
		if (PyErr_ExceptionMatches(PyExc_TypeError)) {
			PyErr_Clear();
			PyErr_Format(PyExc_TypeError, "block must be a DeviceArray from alloc(), an id or a pointer from allocate(), not %s",
				     pyaeg_tname(obj));
		}
		Py_DECREF(obj);
		return -1;
	}
	if (*id >= s->base && *id - s->base < s->total) {
		v = PyDict_GetItem(s->by_ptr, obj);
		if (v != NULL && pyaeg_u64(v, "block", 1, id) < 0) {
			Py_DECREF(obj);
			return -1;
		}
	}
	Py_DECREF(obj);
	return 0;
}

static int free_id(SlabObject *s, aeg_slab_t *slab, uint64_t id)
{
	PyObject *key, *ptr;
	int err;

	err = aeg_slab_free(slab, id);
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	key = PyLong_FromUnsignedLongLong(id);
	if (key == NULL)
		return -1;
	ptr = PyDict_GetItem(s->blocks, key);
	if (ptr != NULL) {
		if (PyDict_GetItem(s->by_ptr, ptr) != NULL && PyDict_DelItem(s->by_ptr, ptr) < 0)
			PyErr_Clear();
		if (PyDict_DelItem(s->blocks, key) < 0)
			PyErr_Clear();
	}
	Py_DECREF(key);
	return 0;
}

static PyObject *slab_free(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "block", NULL };
	SlabObject *s = (SlabObject *)self;
	aeg_slab_t *slab;
	PyObject *obj;
	uint64_t id;

	int rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:free", kwlist, &obj))
		return NULL;
	if (block_id(s, obj, &id) < 0 || (slab = slab_use(s)) == NULL)
		return NULL;
	rc = free_id(s, slab, id);
	slab_done(s);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *slab_reset(PyObject *self, PyObject *unused)
{
	SlabObject *s = (SlabObject *)self;
	aeg_slab_t *slab = slab_use(s);
	PyObject *ids;
	int rc = 0;

	if (slab == NULL)
		return NULL;
	ids = PyDict_Keys(s->blocks);
	for (Py_ssize_t i = 0; ids != NULL && rc == 0 && i < PyList_Size(ids); i++) {
		uint64_t id;

		rc = pyaeg_u64(PyList_GetItem(ids, i), "block", 1, &id);
		if (rc == 0)
			rc = free_id(s, slab, id);
	}
	slab_done(s);
	if (ids == NULL)
		return NULL;
	Py_DECREF(ids);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *slab_block(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "id", NULL };
	SlabObject *s = (SlabObject *)self;
	PyObject *obj, *view = NULL;
	aeg_slab_t *slab;
	struct aeg_block b;
	uint64_t id;
	int err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:block", kwlist, &obj))
		return NULL;
	if (pyaeg_u64(obj, "id", 1, &id) < 0 || (slab = slab_use(s)) == NULL)
		return NULL;
	err = aeg_slab_lookup(slab, id, &b);
	if (err < 0)
		pyaeg_raise(err);
	else
		view = block_view(s, &b);
	slab_done(s);
	return view;
}

static PyObject *slab_stats(PyObject *self, PyObject *unused)
{
	SlabObject *s = (SlabObject *)self;
	aeg_slab_t *slab = slab_open(s);
	struct aeg_slab_stats st;
	int err;

	/* No Python code runs between slab_open and the copy: no call to count. */
	if (slab == NULL)
		return NULL;
	err = aeg_slab_stats(slab, &st);
	if (err < 0)
		return pyaeg_raise(err);
	return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n}",
			     "total_bytes", (unsigned long long)st.total_bytes,
			     "used_bytes", (unsigned long long)st.used_bytes,
			     "free_bytes", (unsigned long long)st.free_bytes,
			     "largest_free_bytes", (unsigned long long)st.largest_free_bytes,
			     "high_water_bytes", (unsigned long long)st.high_water_bytes,
			     "blocks", (unsigned long long)st.blocks,
			     "allocs", (unsigned long long)st.allocs,
			     "frees", (unsigned long long)st.frees,
			     "failed_allocs", (unsigned long long)st.failed_allocs,
			     "views", s->users.views);
}

static PyObject *slab_export(PyObject *self, PyObject *unused)
{
	aeg_slab_t *slab = slab_open((SlabObject *)self);
	aeg_handle_t h;
	int err;

	if (slab == NULL)
		return NULL;
	err = aeg_slab_export(slab, &h);
	if (err < 0)
		return pyaeg_raise(err);
	return pyaeg_handle_bytes(&h);
}

static PyObject *slab_close(PyObject *self, PyObject *unused)
{
	SlabObject *s = (SlabObject *)self;
	struct pyaeg_res *res = s->res;
	char what[64];

	if (res == NULL || res->slab == NULL)
		Py_RETURN_NONE;
	snprintf(what, sizeof(what), "SlabAllocator of GPU %d", s->gpu);
	if (pyaeg_users_busy(&s->users, what) < 0)
		return NULL;
	/* Detached first: a thread that runs while the slab is destroyed (GIL released) finds it closed. */
	s->res = NULL;
	pyaeg_object_gone();
	PyDict_Clear(s->blocks);
	PyDict_Clear(s->by_ptr);
	pyaeg_res_free(res);
	Py_RETURN_NONE;
}

static PyObject *slab_enter(PyObject *self, PyObject *unused)
{
	if (slab_open((SlabObject *)self) == NULL)
		return NULL;
	Py_INCREF(self);
	return self;
}

static PyObject *slab_exit(PyObject *self, PyObject *args)
{
	return slab_close(self, NULL);
}

static PyObject *get_device_ptr(PyObject *self, void *closure)
{
	return PyLong_FromUnsignedLongLong(((SlabObject *)self)->base);
}

static PyObject *get_total(PyObject *self, void *closure)
{
	return PyLong_FromUnsignedLongLong(((SlabObject *)self)->total);
}

static PyObject *get_gpu(PyObject *self, void *closure)
{
	return PyLong_FromLong(((SlabObject *)self)->gpu);
}

static PyObject *get_closed(PyObject *self, void *closure)
{
	SlabObject *s = (SlabObject *)self;

	return PyBool_FromLong(s->res == NULL || s->res->slab == NULL);
}

static PyGetSetDef slab_getset[] = {
	{ "device_ptr", get_device_ptr, NULL, "Device address of the slab's first byte (int).", NULL },
	{ "total_bytes", get_total, NULL, "Slab size in bytes (rounded up to 256).", NULL },
	{ "gpu_id", get_gpu, NULL, "GPU ordinal.", NULL },
	{ "closed", get_closed, NULL, "True after close()/destroy().", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyMethodDef slab_methods[] = {
	{ "alloc", (PyCFunction)(void (*)(void))slab_alloc, METH_VARARGS | METH_KEYWORDS,
	  "alloc($self, nbytes)\n--\n\n"
	  "A block of at least nbytes (rounded up to 256), O(1): a U8 DeviceArray with\n"
	  ".id, .device_ptr and .size. AegaeonError ENOSPC (asked vs largest free block)\n"
	  "when it does not fit. The block stays allocated until free()/reset()." },
	{ "allocate", (PyCFunction)(void (*)(void))slab_allocate, METH_VARARGS | METH_KEYWORDS,
	  "allocate($self, nbytes, alignment=256)\n--\n\n"
	  "The seed's form: allocate a block and return its device pointer. Blocks are\n"
	  "256-byte aligned; alignment must be a power of two up to 256." },
	{ "free", (PyCFunction)(void (*)(void))slab_free, METH_VARARGS | METH_KEYWORDS,
	  "free($self, block)\n--\n\n"
	  "Free a block: a DeviceArray from alloc(), its id, or a pointer from\n"
	  "allocate(). AegaeonError ENOENT for a block not live, ValueError for another\n"
	  "slab's block. Views of a freed block must not be used any more." },
	{ "reset", slab_reset, METH_NOARGS, "reset($self, /)\n--\n\nFree every live block." },
	{ "block", (PyCFunction)(void (*)(void))slab_block, METH_VARARGS | METH_KEYWORDS,
	  "block($self, id)\n--\n\nA view of the live block id (AegaeonError ENOENT otherwise)." },
	{ "stats", slab_stats, METH_NOARGS,
	  "stats($self, /)\n--\n\n"
	  "total_bytes, used_bytes, free_bytes, largest_free_bytes, high_water_bytes,\n"
	  "blocks (live), allocs, frees, failed_allocs, views (DeviceArrays alive)." },
	{ "export_handle", slab_export, METH_NOARGS,
	  "export_handle($self, /)\n--\n\n"
	  "The 64-byte memory IPC handle of the slab's base: another process of the user\n"
	  "opens it (cudaIpcOpenMemHandle on cuda) and finds block i at base + offset." },
	{ "close", slab_close, METH_NOARGS,
	  "close($self, /)\n--\n\n"
	  "Free the slab's device memory now (also done when the object is collected).\n"
	  "AegaeonError EBUSY, freeing nothing, while DeviceArray views of its blocks are\n"
	  "alive, a call of it runs in another thread or a KVCache is built on it." },
	{ "destroy", slab_close, METH_NOARGS, "destroy($self, /)\n--\n\nThe seed's name for close()." },
	{ "__enter__", slab_enter, METH_NOARGS, PYAEG_ENTER_DOC },
	{ "__exit__", slab_exit, METH_VARARGS, PYAEG_EXIT_DOC },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot slab_slots[] = {
	{ Py_tp_new, slab_new },
	{ Py_tp_dealloc, slab_dealloc },
	{ Py_tp_getset, slab_getset },
	{ Py_tp_methods, slab_methods },
	{ Py_tp_doc,
	  "SlabAllocator(gpu_id, total_bytes)\n--\n\n"
	  "One device allocation of total_bytes on a GPU, sub-allocated in O(1) by a\n"
	  "two-level segregated-fit allocator (256-byte alignment, immediate coalescing).\n"
	  "Blocks have stable ids. Thread-safe. Freed when collected, by close(), or at\n"
	  "interpreter exit. Inside an aegaeon job it is a lease of the job's slab on\n"
	  "that GPU (the agent's memory; export_handle() is then ENOTSUP: use the\n"
	  "job slab's handle). Errors: AegaeonError ENOSPC (detail: asked vs free device\n"
	  "memory), ENODEV (no such GPU), EDEVICE (CUDA)." },
	{ 0, NULL },
};

static PyType_Spec slab_spec = {
	.name = "aegaeon_native.SlabAllocator",
	.basicsize = sizeof(SlabObject),
	.flags = Py_TPFLAGS_DEFAULT,
	.slots = slab_slots,
};

int pyaeg_slab_init_type(PyObject *module)
{
	pyaeg_slab_type = PyType_FromSpec(&slab_spec);
	if (pyaeg_slab_type == NULL)
		return -1;
	Py_INCREF(pyaeg_slab_type);
	if (PyModule_AddObject(module, "SlabAllocator", pyaeg_slab_type) < 0) {
		Py_DECREF(pyaeg_slab_type);
		return -1;
	}
	return 0;
}

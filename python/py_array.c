/* DeviceArray: a zero-copy view of slab memory (__cuda_array_interface__, __array_interface__, DLPack). */
#include "py_internal.h"

#include <string.h>

/* DLPack (dlpack.h, ABI version 0.x/1.x "dltensor" capsule): the structures consumers read. */
enum { DL_CPU = 1, DL_CUDA = 2 };
enum { DL_INT = 0, DL_UINT = 1, DL_FLOAT = 2, DL_BFLOAT = 4, DL_COMPLEX = 5, DL_BOOL = 6, DL_NONE = 255 };

typedef struct {
	int32_t device_type;
	int32_t device_id;
} DLDevice;

typedef struct {
	uint8_t code;
	uint8_t bits;
	uint16_t lanes;
} DLDataType;

typedef struct {
	void *data;
	DLDevice device;
	int32_t ndim;
	DLDataType dtype;
	int64_t *shape;
	int64_t *strides;
	uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
	DLTensor dl_tensor;
	void *manager_ctx;
	void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

/* Safetensors dtypes; typestr NULL where numpy and the CUDA array interface have none. */
struct dtype {
	const char *name;
	const char *typestr;
	unsigned bits;
	uint8_t dl_code;
};

static const struct dtype dtypes[] = {
	{ "BOOL", "|b1", 8, DL_BOOL },
	{ "U8", "|u1", 8, DL_UINT },
	{ "I8", "|i1", 8, DL_INT },
	{ "F8_E5M2", NULL, 8, DL_NONE },
	{ "F8_E4M3", NULL, 8, DL_NONE },
	{ "F8_E8M0", NULL, 8, DL_NONE },
	{ "F4", NULL, 4, DL_NONE },
	{ "F6_E2M3", NULL, 6, DL_NONE },
	{ "F6_E3M2", NULL, 6, DL_NONE },
	{ "I16", "<i2", 16, DL_INT },
	{ "U16", "<u2", 16, DL_UINT },
	{ "F16", "<f2", 16, DL_FLOAT },
	{ "BF16", NULL, 16, DL_BFLOAT },
	{ "I32", "<i4", 32, DL_INT },
	{ "U32", "<u4", 32, DL_UINT },
	{ "F32", "<f4", 32, DL_FLOAT },
	{ "I64", "<i8", 64, DL_INT },
	{ "U64", "<u8", 64, DL_UINT },
	{ "F64", "<f8", 64, DL_FLOAT },
	{ "C64", "<c8", 64, DL_COMPLEX },
};

typedef struct {
	PyObject_HEAD
	PyObject *owner;
	Py_ssize_t *views;
	void *ptr;
	uint64_t nbytes;
	int gpu;
	int host;
	const struct dtype *dt;
	int ndim;
	int64_t *shape;
	uint64_t id;
} ArrayObject;

PyObject *pyaeg_array_type;

static const struct dtype *find_dtype(const char *name)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (strcmp(dtypes[i].name, name) == 0)
			return &dtypes[i];
	return NULL;
}

static PyObject *bad_dtype(const char *name)
{
	return PyErr_Format(PyExc_ValueError,
			    "dtype \"%s\" is not a safetensors dtype (BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64, C64, F8_E5M2, F8_E4M3, F8_E8M0, F4, F6_E2M3, F6_E3M2)",
			    name);
}

PyObject *pyaeg_array_new(PyObject *owner, Py_ssize_t *views, void *ptr, uint64_t bytes, int gpu,
			  int host, const char *dtype, int ndim, const uint64_t *shape, uint64_t id)
{
	const struct dtype *dt = find_dtype(dtype);
	ArrayObject *a;

	if (dt == NULL)
		return bad_dtype(dtype);
	if (shape == NULL && (bytes * 8) % dt->bits != 0)
		return PyErr_Format(PyExc_ValueError, "%llu bytes are not a whole number of %s items",
				    (unsigned long long)bytes, dt->name);
	a = PyObject_New(ArrayObject, (PyTypeObject *)pyaeg_array_type);
	if (a == NULL)
		return NULL;
	a->ndim = shape != NULL ? ndim : 1;
	a->shape = PyMem_Malloc((size_t)(a->ndim ? a->ndim : 1) * sizeof(*a->shape));
	if (a->shape == NULL) {
		a->owner = NULL;
		a->views = NULL;
		Py_DECREF(a);
		return PyErr_NoMemory();
	}
	if (shape != NULL)
		for (int i = 0; i < ndim; i++)
			a->shape[i] = (int64_t)shape[i];
	else
		a->shape[0] = (int64_t)(bytes * 8 / dt->bits);
	Py_XINCREF(owner);
	a->owner = owner;
	a->views = views;
	if (views != NULL)
		(*views)++;
	a->ptr = ptr;
	a->nbytes = bytes;
	a->gpu = gpu;
	a->host = host;
	a->dt = dt;
	a->id = id;
	return (PyObject *)a;
}

PyObject *pyaeg_array_owner(PyObject *obj)
{
	if (!PyObject_TypeCheck(obj, (PyTypeObject *)pyaeg_array_type))
		return NULL;
	return ((ArrayObject *)obj)->owner;
}

static void array_dealloc(PyObject *self)
{
	ArrayObject *a = (ArrayObject *)self;
	PyTypeObject *tp = Py_TYPE(self);
	freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

	if (a->views != NULL)
		(*a->views)--;
	Py_XDECREF(a->owner);
	PyMem_Free(a->shape);
	tp_free(self);
	Py_DECREF(tp);
}

static PyObject *shape_tuple(const ArrayObject *a)
{
	PyObject *t = PyTuple_New(a->ndim);

	for (int i = 0; t != NULL && i < a->ndim; i++) {
		PyObject *v = PyLong_FromLongLong(a->shape[i]);

		if (v == NULL)
			Py_CLEAR(t);
		else
			PyTuple_SetItem(t, i, v);
	}
	return t;
}

static PyObject *interface(ArrayObject *a, int cuda)
{
	PyObject *shape, *d;

	if (a->dt->typestr == NULL)
		return PyErr_Format(PyExc_AttributeError,
				    "%s has no array-interface type: use torch.from_dlpack() where DLPack has it, or .view(\"U8\")",
				    a->dt->name);
	shape = shape_tuple(a);
	if (shape == NULL)
		return NULL;
	/* Version 3 of both interfaces; strides None: C-contiguous. */
	d = Py_BuildValue("{s:O,s:s,s:(KO),s:i,s:O}", "shape", shape, "typestr", a->dt->typestr,
			  "data", (unsigned long long)(uintptr_t)a->ptr, Py_False, "version", 3,
			  "strides", Py_None);
	Py_DECREF(shape);
	(void)cuda;
	return d;
}

static PyObject *get_cai(PyObject *self, void *closure)
{
	ArrayObject *a = (ArrayObject *)self;

	if (a->host)
		return PyErr_Format(PyExc_AttributeError,
				    "__cuda_array_interface__: this view is in host memory (host backend): use __array_interface__ or DLPack");
	return interface(a, 1);
}

static PyObject *get_ai(PyObject *self, void *closure)
{
	ArrayObject *a = (ArrayObject *)self;

	if (!a->host)
		return PyErr_Format(PyExc_AttributeError,
				    "__array_interface__: this view is in GPU memory: use __cuda_array_interface__ or DLPack");
	return interface(a, 0);
}

static PyObject *get_ptr(PyObject *self, void *closure)
{
	return PyLong_FromUnsignedLongLong((uintptr_t)((ArrayObject *)self)->ptr);
}

static PyObject *get_nbytes(PyObject *self, void *closure)
{
	return PyLong_FromUnsignedLongLong(((ArrayObject *)self)->nbytes);
}

static PyObject *get_shape(PyObject *self, void *closure)
{
	return shape_tuple((ArrayObject *)self);
}

static PyObject *get_ndim(PyObject *self, void *closure)
{
	return PyLong_FromLong(((ArrayObject *)self)->ndim);
}

static PyObject *get_dtype(PyObject *self, void *closure)
{
	return PyUnicode_FromString(((ArrayObject *)self)->dt->name);
}

static PyObject *get_typestr(PyObject *self, void *closure)
{
	const char *t = ((ArrayObject *)self)->dt->typestr;

	if (t == NULL)
		Py_RETURN_NONE;
	return PyUnicode_FromString(t);
}

static PyObject *get_gpu(PyObject *self, void *closure)
{
	return PyLong_FromLong(((ArrayObject *)self)->gpu);
}

static PyObject *get_id(PyObject *self, void *closure)
{
	ArrayObject *a = (ArrayObject *)self;

	if (a->id == 0)
		Py_RETURN_NONE;
	return PyLong_FromUnsignedLongLong(a->id);
}

static PyObject *get_is_host(PyObject *self, void *closure)
{
	return PyBool_FromLong(((ArrayObject *)self)->host);
}

static PyGetSetDef array_getset[] = {
	{ "device_ptr", get_ptr, NULL, "Device address of the first byte (int).", NULL },
	{ "size", get_nbytes, NULL, "Bytes viewed (as a chunk dict's \"size\").", NULL },
	{ "nbytes", get_nbytes, NULL, "Bytes viewed.", NULL },
	{ "shape", get_shape, NULL, "Shape (tuple of ints), C-contiguous.", NULL },
	{ "ndim", get_ndim, NULL, "Number of dimensions.", NULL },
	{ "dtype", get_dtype, NULL, "Safetensors dtype name: \"F32\", \"BF16\", \"U8\", ...", NULL },
	{ "typestr", get_typestr, NULL, "Array-interface type string (\"<f4\"), None for BF16/F8/F4/F6.", NULL },
	{ "gpu_id", get_gpu, NULL, "GPU ordinal the memory is on.", NULL },
	{ "id", get_id, NULL, "Slab block id for SlabAllocator blocks, else None.", NULL },
	{ "is_host", get_is_host, NULL, "True on the host backend (memory is host memory).", NULL },
	{ "__cuda_array_interface__", get_cai, NULL,
	  "CUDA Array Interface v3 (cuda backend): torch.as_tensor(view) wraps it without a copy.", NULL },
	{ "__array_interface__", get_ai, NULL,
	  "NumPy array interface v3 (host backend): numpy.asarray(view) wraps it without a copy.", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

/* --------------------------------------------------------------- DLPack */

static void dl_deleter(DLManagedTensor *mt)
{
	PyGILState_STATE st;

	if (mt == NULL)
		return;
	if (Py_IsInitialized()) {
		st = PyGILState_Ensure();
		Py_XDECREF((PyObject *)mt->manager_ctx);
		PyGILState_Release(st);
	}
	free(mt);
}

static void dl_capsule_free(PyObject *capsule)
{
	DLManagedTensor *mt;

	/* A consumer renames the capsule "used_dltensor" and owns the tensor then. */
	if (!PyCapsule_IsValid(capsule, "dltensor"))
		return;
	mt = PyCapsule_GetPointer(capsule, "dltensor");
	if (mt != NULL && mt->deleter != NULL) {
		Py_XDECREF((PyObject *)mt->manager_ctx);
		mt->manager_ctx = NULL;
		free(mt);
	}
}

static PyObject *array_dlpack(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "stream", "max_version", "dl_device", "copy", NULL };
	PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None, *cap;
	ArrayObject *a = (ArrayObject *)self;
	DLManagedTensor *mt;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|$OOOO:__dlpack__", kwlist, &stream, &max_version,
					 &dl_device, &copy))
		return NULL;
	if (copy == Py_True)
		return PyErr_Format(PyExc_BufferError, "DeviceArray exports without copying only (copy=True asked)");
	if (a->dt->dl_code == DL_NONE)
		return PyErr_Format(PyExc_BufferError, "%s has no DLPack type: use .view(\"U8\") and reinterpret",
				    a->dt->name);
	mt = calloc(1, sizeof(*mt) + (size_t)(a->ndim ? a->ndim : 1) * sizeof(int64_t));
	if (mt == NULL)
		return PyErr_NoMemory();
	mt->dl_tensor.data = a->ptr;
	mt->dl_tensor.device.device_type = a->host ? DL_CPU : DL_CUDA;
	mt->dl_tensor.device.device_id = a->host ? 0 : a->gpu;
	mt->dl_tensor.ndim = a->ndim;
	mt->dl_tensor.dtype.code = a->dt->dl_code;
	mt->dl_tensor.dtype.bits = (uint8_t)a->dt->bits;
	mt->dl_tensor.dtype.lanes = 1;
	mt->dl_tensor.shape = (int64_t *)(mt + 1);
	memcpy(mt->dl_tensor.shape, a->shape, (size_t)a->ndim * sizeof(int64_t));
	mt->dl_tensor.strides = NULL;
	mt->dl_tensor.byte_offset = 0;
	Py_INCREF(self);
	mt->manager_ctx = self;
	mt->deleter = dl_deleter;
	/* The data is ready once the caller waited on its events: no stream to order. */
	(void)stream;
	cap = PyCapsule_New(mt, "dltensor", dl_capsule_free);
	if (cap == NULL) {
		Py_DECREF(self);
		free(mt);
	}
	return cap;
}

static PyObject *array_dlpack_device(PyObject *self, PyObject *unused)
{
	ArrayObject *a = (ArrayObject *)self;

	return Py_BuildValue("(ii)", a->host ? DL_CPU : DL_CUDA, a->host ? 0 : a->gpu);
}

/* ------------------------------------------------------------------ copies */

static PyObject *array_tobytes(PyObject *self, PyObject *unused)
{
	ArrayObject *a = (ArrayObject *)self;
	aeg_device_t *dev;
	PyObject *out;
	char *buf;
	int err = 0;

	if (a->nbytes > (uint64_t)PY_SSIZE_T_MAX)
		return PyErr_NoMemory();
	if (pyaeg_device(&dev) < 0)
		return NULL;
	out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)a->nbytes);
	if (out == NULL)
		return NULL;
	buf = PyBytes_AsString(out);
	if (a->nbytes > 0) {
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_memcpy(dev, buf, a->ptr, a->nbytes);
		PYAEG_END_ALLOW_THREADS
	}
	if (err < 0) {
		Py_DECREF(out);
		return pyaeg_raise(err);
	}
	return out;
}

static PyObject *array_copy_from(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "data", "offset", NULL };
	ArrayObject *a = (ArrayObject *)self;
	PyObject *data, *bytes, *off_obj = NULL;
	aeg_device_t *dev;
	uint64_t offset = 0;
	Py_ssize_t len;
	char *src;
	int err = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:copy_from", kwlist, &data, &off_obj))
		return NULL;
	if (off_obj != NULL && pyaeg_u64(off_obj, "offset", 1, &offset) < 0)
		return NULL;
	if (PyUnicode_Check(data))
		return PyErr_Format(PyExc_TypeError, "data must be bytes-like, not str");
	bytes = PyBytes_FromObject(data);
	if (bytes == NULL)
		return NULL;
	if (PyBytes_AsStringAndSize(bytes, &src, &len) < 0)
		goto fail;
	if (offset > a->nbytes || (uint64_t)len > a->nbytes - offset) {
		PyErr_Format(PyExc_ValueError, "%zd bytes at offset %llu do not fit in the view's %llu bytes",
			     len, (unsigned long long)offset, (unsigned long long)a->nbytes);
		goto fail;
	}
	if (pyaeg_device(&dev) < 0)
		goto fail;
	if (len > 0) {
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_memcpy(dev, (char *)a->ptr + offset, src, (size_t)len);
		PYAEG_END_ALLOW_THREADS
	}
	Py_DECREF(bytes);
	if (err < 0)
		return pyaeg_raise(err);
	Py_RETURN_NONE;
fail:
	Py_DECREF(bytes);
	return NULL;
}

static PyObject *array_view(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "dtype", NULL };
	ArrayObject *a = (ArrayObject *)self;
	const struct dtype *dt;
	const char *name;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "s:view", kwlist, &name))
		return NULL;
	dt = find_dtype(name);
	if (dt == NULL)
		return bad_dtype(name);
	if (dt->bits == a->dt->bits) {
		uint64_t *shape = PyMem_Malloc((size_t)(a->ndim ? a->ndim : 1) * sizeof(*shape));
		PyObject *v;

		if (shape == NULL)
			return PyErr_NoMemory();
		for (int i = 0; i < a->ndim; i++)
			shape[i] = (uint64_t)a->shape[i];
		v = pyaeg_array_new(a->owner, a->views, a->ptr, a->nbytes, a->gpu, a->host, name,
				    a->ndim, shape, a->id);
		PyMem_Free(shape);
		return v;
	}
	return pyaeg_array_new(a->owner, a->views, a->ptr, a->nbytes, a->gpu, a->host, name, 0, NULL, a->id);
}

/*
 * numpy reads __array_interface__ first and comes here only where the view
 * has none: GPU memory, or a dtype numpy lacks. Without this method it
 * would make a 0-d object array of the view, silently.
 */
static PyObject *array_array(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "dtype", "copy", NULL };
	PyObject *dtype = Py_None, *copy = Py_None, *np, *r;
	ArrayObject *a = (ArrayObject *)self;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO:__array__", kwlist, &dtype, &copy))
		return NULL;
	if (!a->host)
		return PyErr_Format(PyExc_TypeError,
				    "a DeviceArray in GPU memory (GPU %d) is not a numpy array: use torch.as_tensor(view) "
				    "or cupy, or view.tobytes() for a copy in host memory", a->gpu);
	if (a->dt->typestr == NULL)
		return PyErr_Format(PyExc_TypeError,
				    "numpy has no %s dtype: numpy.asarray(view.view(\"%s\")) gives its raw %s without a "
				    "copy%s", a->dt->name, a->dt->bits == 16 ? "U16" : "U8",
				    a->dt->bits == 16 ? "16-bit words" : "bytes",
				    a->dt->dl_code == DL_BFLOAT ? " (torch.from_dlpack(view) gives bfloat16)" : "");
	np = PyImport_ImportModule("numpy");
	if (np == NULL)
		return NULL;
	r = PyObject_CallMethod(np, copy == Py_True ? "array" : "asarray", "OO", self, dtype);
	Py_DECREF(np);
	return r;
}

static PyObject *array_repr(PyObject *self)
{
	ArrayObject *a = (ArrayObject *)self;
	PyObject *shape = shape_tuple(a), *r;

	if (shape == NULL)
		return NULL;
	r = PyUnicode_FromFormat("<aegaeon_native.DeviceArray %s %R on %s %d at %p, %llu bytes>",
				 a->dt->name, shape, a->host ? "host GPU" : "GPU", a->gpu,
				 a->ptr, (unsigned long long)a->nbytes);
	Py_DECREF(shape);
	return r;
}

static PyMethodDef array_methods[] = {
	{ "__dlpack__", (PyCFunction)(void (*)(void))array_dlpack, METH_VARARGS | METH_KEYWORDS,
	  "__dlpack__($self, *, stream=None, max_version=None, dl_device=None, copy=None)\n--\n\n"
	  "A DLPack capsule of the view (no copy): torch.from_dlpack(view),\n"
	  "numpy.from_dlpack(view) on the host backend. BF16 is exported as bfloat16.\n"
	  "stream is ignored: wait on the chunk's event before handing the view over." },
	{ "__dlpack_device__", array_dlpack_device, METH_NOARGS,
	  "__dlpack_device__($self, /)\n--\n\n(device type, device id): (2, gpu) for CUDA, (1, 0) for host memory." },
	{ "tobytes", array_tobytes, METH_NOARGS,
	  "tobytes($self, /)\n--\n\nA copy of the viewed bytes in host memory (synchronous; the GIL is released)." },
	{ "copy_from", (PyCFunction)(void (*)(void))array_copy_from, METH_VARARGS | METH_KEYWORDS,
	  "copy_from($self, data, offset=0)\n--\n\nCopy bytes-like data into the view at a byte offset (synchronous).\n"
	  "ValueError when it does not fit." },
	{ "__array__", (PyCFunction)(void (*)(void))array_array, METH_VARARGS | METH_KEYWORDS,
	  "__array__($self, dtype=None, copy=None)\n--\n\n"
	  "numpy.asarray(view) on the host backend. TypeError for a view in GPU memory\n"
	  "and for BF16, F8, F6 and F4, which numpy has no dtype for: view(\"U16\") or\n"
	  "view(\"U8\") first gives their raw bits, zero-copy." },
	{ "view", (PyCFunction)(void (*)(void))array_view, METH_VARARGS | METH_KEYWORDS,
	  "view($self, dtype)\n--\n\nThe same memory as another dtype: the shape is kept when the item sizes\n"
	  "match, else one dimension of the bytes (e.g. view(\"I16\") of a BF16 tensor,\n"
	  "then torch's .view(torch.bfloat16), stays zero-copy)." },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot array_slots[] = {
	{ Py_tp_dealloc, array_dealloc },
	{ Py_tp_repr, array_repr },
	{ Py_tp_getset, array_getset },
	{ Py_tp_methods, array_methods },
	{ Py_tp_doc,
	  "A view of device memory (a prefetched chunk or tensor, a slab block) without\n"
	  "a copy. It keeps what it views alive (the SlabAllocator, the load), though a\n"
	  "block freed or a chunk released explicitly must not be read through it.\n"
	  "cuda backend: __cuda_array_interface__ (v3), so torch.as_tensor(view) and\n"
	  "cupy wrap it; host backend: __array_interface__, so numpy.asarray(view) does\n"
	  "(a TypeError for BF16/F8/F6/F4, which numpy lacks: view(\"U16\"/\"U8\") first).\n"
	  "Both: __dlpack__ (torch.from_dlpack handles BF16), tobytes(), copy_from().\n"
	  "Made by the module only." },
	{ 0, NULL },
};

static PyType_Spec array_spec = {
	.name = "aegaeon_native.DeviceArray",
	.basicsize = sizeof(ArrayObject),
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
	.slots = array_slots,
};

int pyaeg_array_init_type(PyObject *module)
{
	pyaeg_array_type = PyType_FromSpec(&array_spec);
	if (pyaeg_array_type == NULL)
		return -1;
	Py_INCREF(pyaeg_array_type);
	if (PyModule_AddObject(module, "DeviceArray", pyaeg_array_type) < 0) {
		Py_DECREF(pyaeg_array_type);
		return -1;
	}
	return 0;
}

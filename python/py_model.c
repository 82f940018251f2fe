/* Models in Python: Model, open_model, load_model and load_safetensors, and the chunk dicts of a load. */
#include "py_internal.h"

#include <string.h>

/*
 * The GPU memory of one load, owned by its Model and by every view of its
 * tensors: the last of them to go releases the load (when this process
 * loaded it; a job's resident model stays the job's).
 */
typedef struct {
	PyObject_HEAD
	struct pyaeg_load load;
	Py_ssize_t views;
} MemoryObject;

typedef struct {
	PyObject_HEAD
	MemoryObject *mem;              /* NULL once released */
	PyObject *path;                 /* str, absolute */
	PyObject *files;                /* tuple of str */
	PyObject *metadata;             /* mappingproxy of str: str */
	PyObject *tensors;              /* mappingproxy of name: DeviceArray, made at first use */
	PyObject *chunks;               /* list of chunk dicts, made at first use */
	int gpu;
	int owned;
} ModelObject;

#define TP_KWLIST "tp_rank", "tp_world", "tp_preset", "tp_rules", "tp_uneven"

static PyObject *memory_type;
static PyObject *model_type;

static void memory_dealloc(PyObject *self)
{
	MemoryObject *mem = (MemoryObject *)self;
	PyTypeObject *tp = Py_TYPE(self);
	freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

	pyaeg_load_drop(&mem->load, 1);
	tp_free(self);
	Py_DECREF(tp);
}

static PyType_Slot memory_slots[] = {
	{ Py_tp_dealloc, memory_dealloc },
	{ Py_tp_doc, "The GPU memory of a Model or a load_model() result (internal)." },
	{ 0, NULL },
};

static PyType_Spec memory_spec = {
	.name = "aegaeon_native._ModelMemory",
	.basicsize = sizeof(MemoryObject),
	.flags = Py_TPFLAGS_DEFAULT,
	.slots = memory_slots,
};

/* ------------------------------------------------------------ chunk dicts */

static PyObject *file_names(const aeg_model_t *m)
{
	uint32_t n = aeg_model_file_count(m);
	PyObject *t = PyTuple_New(n);

	for (uint32_t i = 0; t != NULL && i < n; i++) {
		PyObject *s = PyUnicode_DecodeFSDefault(aeg_model_file(m, i));

		if (s == NULL)
			Py_CLEAR(t);
		else
			PyTuple_SetItem(t, i, s);
	}
	return t;
}

static PyObject *chunk_dict(const struct aeg_chunk *c, PyObject *file)
{
	return Py_BuildValue("{s:K,s:K,s:y#,s:K,s:K,s:O,s:N}",
			     "device_ptr", (unsigned long long)(uintptr_t)c->device_ptr,
			     "size", (unsigned long long)c->size,
			     "event_handle", (const char *)c->event.bytes, (Py_ssize_t)AEG_HANDLE_BYTES,
			     "slab_id", (unsigned long long)c->slab_id,
			     "file_offset", (unsigned long long)c->file_offset,
			     "file", file, "tensors", PyList_New(0));
}

/*
 * Where tensor @t starts relative to chunk @c, the first it lies in: by
 * their device pointers where mapped (a sliced load packs the parts, so a
 * part's file offset says nothing of where it is in the chunk), else by
 * file offsets (a whole load: the chunks hold the file's bytes in order).
 */
static long long offset_in(const struct aeg_chunk *c, const struct aeg_tensor *t)
{
	if (c->device_ptr != NULL && t->device_ptr != NULL)
		return (long long)((uintptr_t)t->device_ptr - (uintptr_t)c->device_ptr);
	return (long long)t->file_offset - (long long)c->file_offset;
}

/* Adds (name, offset) of tensor @t to the "tensors" of every chunk its bytes are in. */
static int add_tensor(PyObject *list, const struct aeg_chunk *c, uint32_t n, const struct aeg_tensor *t)
{
	PyObject *name = PyUnicode_FromString(t->name);
	long long off = 0;
	/* As aeg_model_wait_tensor: its first chunk (an empty tensor's too), then every one its bytes reach. */
	uint32_t end = t->first_chunk + (t->chunks ? t->chunks : 1);

	if (name == NULL)
		return -1;
	if (t->first_chunk < n)
		off = offset_in(&c[t->first_chunk], t);
	for (uint32_t k = t->first_chunk; k < n && k < end; k++) {
		PyObject *pair, *tensors;
		int rc;

		/* The chunks of one tensor are contiguous on the GPU. */
		if (k > t->first_chunk)
			off -= (long long)c[k - 1].size;
		pair = Py_BuildValue("(OL)", name, off);
		tensors = PyDict_GetItemString(PyList_GetItem(list, k), "tensors");
		rc = pair == NULL ? -1 : PyList_Append(tensors, pair);
		Py_XDECREF(pair);
		if (rc < 0) {
			Py_DECREF(name);
			return -1;
		}
	}
	Py_DECREF(name);
	return 0;
}

PyObject *pyaeg_chunk_dicts(const aeg_model_t *m)
{
	const struct aeg_chunk *c;
	const struct aeg_tensor *t;
	PyObject *files, *list;
	uint32_t n, nt;

	c = aeg_model_chunks(m, &n);
	t = aeg_model_tensors(m, &nt);
	files = file_names(m);
	if (files == NULL)
		return NULL;
	list = PyList_New(n);
	for (uint32_t i = 0; list != NULL && i < n; i++) {
		PyObject *d = c[i].file < (uint32_t)PyTuple_Size(files) ?
			      chunk_dict(&c[i], PyTuple_GetItem(files, c[i].file)) : NULL;

		if (d == NULL) {
			if (!PyErr_Occurred())
				PyErr_Format(PyExc_SystemError, "chunk %u names file %u of %zd", i, c[i].file,
					     PyTuple_Size(files));
			Py_CLEAR(list);
		} else {
			PyList_SetItem(list, i, d);
		}
	}
	for (uint32_t i = 0; list != NULL && i < nt; i++)
		if (add_tensor(list, c, n, &t[i]) < 0)
			Py_CLEAR(list);
	Py_DECREF(files);
	return list;
}

/* ------------------------------------------------------------------ Model */

static PyObject *metadata_proxy(const aeg_model_t *m)
{
	const char *const *keys, *const *values;
	uint32_t n = aeg_model_metadata(m, &keys, &values);
	PyObject *d = PyDict_New(), *proxy;

	for (uint32_t i = 0; d != NULL && i < n; i++)
		if (pyaeg_dict_set(d, keys[i], PyUnicode_FromString(values[i])) < 0)
			Py_CLEAR(d);
	if (d == NULL)
		return NULL;
	proxy = PyDictProxy_New(d);
	Py_DECREF(d);
	return proxy;
}

/* {name: DeviceArray} of @mem's tensors; a name in two files of the model is AEG_EFORMAT. */
static PyObject *tensor_dict(MemoryObject *mem)
{
	const struct aeg_tensor *t;
	uint32_t n;
	PyObject *d = PyDict_New();

	t = aeg_model_tensors(mem->load.m, &n);
	for (uint32_t i = 0; d != NULL && i < n; i++) {
		PyObject *arr;

		if (PyDict_GetItemString(d, t[i].name) != NULL) {
			char q[PYAEG_NAME_SHOWN];

			pyaeg_raise_msg(AEG_EFORMAT, "%s: tensor \"%s\" is in two of its files (the second: %s)",
					aeg_model_path(mem->load.m), aeg_quote(t[i].name, q, sizeof(q)),
					aeg_model_file(mem->load.m, t[i].file));
			Py_CLEAR(d);
			break;
		}
		arr = pyaeg_array_new((PyObject *)mem, &mem->views, t[i].device_ptr, t[i].size, mem->load.gpu,
				      mem->load.host, t[i].dtype, t[i].ndim, t[i].shape, 0);
		if (pyaeg_dict_set(d, t[i].name, arr) < 0)
			Py_CLEAR(d);
	}
	return d;
}

static void model_dealloc(PyObject *self)
{
	ModelObject *m = (ModelObject *)self;
	PyTypeObject *tp = Py_TYPE(self);
	freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

	Py_XDECREF(m->tensors);
	Py_XDECREF(m->chunks);
	Py_XDECREF(m->mem);
	Py_XDECREF(m->path);
	Py_XDECREF(m->files);
	Py_XDECREF(m->metadata);
	tp_free(self);
	Py_DECREF(tp);
}

/* Starts loading @path (@slice: a rank's part of each tensor); a new Model, or NULL with an exception. */
static ModelObject *model_new(const char *path, int gpu, uint64_t chunk_bytes, const struct aeg_slice *slice)
{
	MemoryObject *mem = PyObject_New(MemoryObject, (PyTypeObject *)memory_type);
	ModelObject *m;

	if (mem == NULL)
		return NULL;
	mem->views = 0;
	if (pyaeg_load(path, gpu, chunk_bytes, AEG_FORMAT_SAFETENSORS, slice, &mem->load) < 0) {
		Py_DECREF(mem);
		return NULL;
	}
	m = PyObject_New(ModelObject, (PyTypeObject *)model_type);
	if (m == NULL) {
		Py_DECREF(mem);
		return NULL;
	}
	m->mem = mem;
	m->tensors = m->chunks = m->files = m->metadata = NULL;
	m->gpu = gpu;
	m->owned = aeg_model_owned(mem->load.m);
	m->path = PyUnicode_DecodeFSDefault(aeg_model_path(mem->load.m));
	if (m->path == NULL || (m->files = file_names(mem->load.m)) == NULL ||
	    (m->metadata = metadata_proxy(mem->load.m)) == NULL) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}

static MemoryObject *model_memory(ModelObject *m)
{
	if (m->mem == NULL)
		PyErr_Format(PyExc_ValueError, "the model %U was released", m->path);
	else if (pyaeg_inherited_check() < 0)
		return NULL;
	return m->mem;
}

struct model_wait {
	aeg_model_t *m;
	const char *name;               /* NULL: the whole model */
};

static int wait_slice(void *arg, int timeout_ms)
{
	struct model_wait *w = arg;

	return w->name ? aeg_model_wait_tensor(w->m, w->name, timeout_ms) : aeg_model_wait(w->m, timeout_ms);
}

static int has_tensor(const aeg_model_t *m, const char *name)
{
	const struct aeg_tensor *t;
	uint32_t n;

	t = aeg_model_tensors(m, &n);
	for (uint32_t i = 0; i < n; i++)
		if (strcmp(t[i].name, name) == 0)
			return 1;
	return 0;
}

/* Waits for tensor @name (NULL: all of them); 0, or -1 with an exception. */
static int model_wait_for(ModelObject *m, const char *name, double seconds)
{
	struct model_wait w = { NULL, name };
	MemoryObject *mem = model_memory(m);
	char q[PYAEG_NAME_SHOWN];
	int err;

	if (mem == NULL)
		return -1;
	w.m = mem->load.m;
	if (name != NULL && !has_tensor(w.m, name)) {
		PyErr_Format(PyExc_KeyError, "%s: the model %U has no tensor of that name", name, m->path);
		return -1;
	}
	/*
	 * Another thread may release the model meanwhile: its memory stays until
	 * the error is made, which reads the model's path and the wait's detail
	 * (the last reference's drop frees the model and clears the detail).
	 */
	Py_INCREF(mem);
	err = pyaeg_wait(wait_slice, &w, seconds);
	if (err == AEG_ETIMEDOUT && name != NULL)
		pyaeg_raise_msg(err, "tensor \"%s\" of %s was not loaded within %g s",
				aeg_quote(name, q, sizeof(q)), aeg_model_path(w.m), seconds);
	else if (err == AEG_ETIMEDOUT)
		pyaeg_raise_msg(err, "the model %s was not loaded within %g s", aeg_model_path(w.m), seconds);
	else if (err < 0)
		pyaeg_raise(err);
	Py_DECREF(mem);
	return err == 0 ? 0 : -1;       /* PYAEG_SIGNALLED: the handler's exception */
}

static PyObject *model_wait(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "name", "timeout", NULL };
	PyObject *name_obj = Py_None, *timeout_obj = Py_None;
	const char *name = NULL;
	double seconds;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO:wait", kwlist, &name_obj, &timeout_obj))
		return NULL;
	if (name_obj != Py_None && !PyUnicode_Check(name_obj))
		return PyErr_Format(PyExc_TypeError, "name must be a tensor name (str) or None, not %s",
				    pyaeg_tname(name_obj));
	if (name_obj != Py_None && (name = PyUnicode_AsUTF8AndSize(name_obj, NULL)) == NULL)
		return NULL;
	if (pyaeg_timeout(timeout_obj, &seconds) < 0 || model_wait_for((ModelObject *)self, name, seconds) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *model_release(PyObject *self, PyObject *unused)
{
	ModelObject *m = (ModelObject *)self;
	MemoryObject *mem = m->mem;

	/* The views made go with the cache; views kept elsewhere keep the memory until they go. */
	m->mem = NULL;
	Py_CLEAR(m->tensors);
	Py_CLEAR(m->chunks);
	Py_XDECREF(mem);
	Py_RETURN_NONE;
}

static PyObject *model_enter(PyObject *self, PyObject *unused)
{
	Py_INCREF(self);
	return self;
}

static PyObject *model_exit(PyObject *self, PyObject *args)
{
	return model_release(self, NULL);
}

static PyObject *model_repr(PyObject *self)
{
	ModelObject *m = (ModelObject *)self;
	const struct aeg_slice *s;
	char slice[64] = "";
	uint32_t n = 0;

	if (m->mem == NULL)
		return PyUnicode_FromFormat("<aegaeon_native.Model %R, released>", m->path);
	aeg_model_tensors(m->mem->load.m, &n);
	s = aeg_model_slice(m->mem->load.m);
	if (s != NULL)
		snprintf(slice, sizeof(slice), ", tensor-parallel rank %d of %d", s->rank, s->world);
	return PyUnicode_FromFormat("<aegaeon_native.Model %R: %u tensors in %zd file%s on GPU %d%s>", m->path, n,
				    PyTuple_Size(m->files), PyTuple_Size(m->files) == 1 ? "" : "s", m->gpu, slice);
}

static PyObject *get_tensors(PyObject *self, void *closure)
{
	ModelObject *m = (ModelObject *)self;
	MemoryObject *mem = model_memory(m);
	PyObject *d;

	if (mem == NULL)
		return NULL;
	if (m->tensors == NULL) {
		d = tensor_dict(mem);
		m->tensors = d ? PyDictProxy_New(d) : NULL;
		Py_XDECREF(d);
	}
	Py_XINCREF(m->tensors);
	return m->tensors;
}

/* A copy of chunk dicts @list, down to their "tensors" lists. */
static PyObject *copy_chunks(PyObject *list)
{
	Py_ssize_t n = PyList_Size(list);
	PyObject *copy = PyList_New(n);

	for (Py_ssize_t i = 0; copy != NULL && i < n; i++) {
		PyObject *d = PyDict_Copy(PyList_GetItem(list, i)), *tensors;

		tensors = d != NULL ? PySequence_List(PyDict_GetItemString(d, "tensors")) : NULL;
		if (tensors == NULL || pyaeg_dict_set(d, "tensors", tensors) < 0) {
			Py_XDECREF(d);
			Py_CLEAR(copy);
		} else {
			PyList_SetItem(copy, i, d);
		}
	}
	return copy;
}

static PyObject *get_chunks(PyObject *self, void *closure)
{
	ModelObject *m = (ModelObject *)self;
	MemoryObject *mem = model_memory(m);

	if (mem == NULL)
		return NULL;
	if (m->chunks == NULL)
		m->chunks = pyaeg_chunk_dicts(mem->load.m);
	/* Each caller's own list of its own dicts, as prefetch_file_to_gpu_chunks() gives (its tuples are shared). */
	return m->chunks ? copy_chunks(m->chunks) : NULL;
}

static PyObject *get_path(PyObject *self, void *closure)
{
	PyObject *p = ((ModelObject *)self)->path;

	Py_INCREF(p);
	return p;
}

static PyObject *get_files(PyObject *self, void *closure)
{
	PyObject *f = ((ModelObject *)self)->files;

	Py_INCREF(f);
	return f;
}

static PyObject *get_metadata(PyObject *self, void *closure)
{
	PyObject *d = ((ModelObject *)self)->metadata;

	Py_INCREF(d);
	return d;
}

static PyObject *get_gpu(PyObject *self, void *closure)
{
	return PyLong_FromLong(((ModelObject *)self)->gpu);
}

static PyObject *get_owned(PyObject *self, void *closure)
{
	return PyBool_FromLong(((ModelObject *)self)->owned);
}

static PyObject *get_released(PyObject *self, void *closure)
{
	return PyBool_FromLong(((ModelObject *)self)->mem == NULL);
}

static PyObject *get_slice(PyObject *self, void *closure)
{
	MemoryObject *mem = model_memory((ModelObject *)self);

	return mem ? pyaeg_slice_dict(aeg_model_slice(mem->load.m)) : NULL;
}

/* {name: (dim, start, extent)} of the tensors the slice splits. */
static PyObject *get_parts(PyObject *self, void *closure)
{
	MemoryObject *mem = model_memory((ModelObject *)self);
	const struct aeg_tensor *t;
	PyObject *d;
	uint32_t n;

	if (mem == NULL)
		return NULL;
	d = PyDict_New();
	t = aeg_model_tensors(mem->load.m, &n);
	for (uint32_t i = 0; d != NULL && i < n; i++)
		if (t[i].slice_dim != AEG_SLICE_WHOLE &&
		    pyaeg_dict_set(d, t[i].name, Py_BuildValue("(iKK)", t[i].slice_dim,
							       (unsigned long long)t[i].slice_start,
							       (unsigned long long)t[i].slice_extent)) < 0)
			Py_CLEAR(d);
	return d;
}

static PyGetSetDef model_getset[] = {
	{ "tensors", get_tensors, NULL,
	  "{name: DeviceArray} in file order (read-only mapping), zero-copy views with the\n"
	  "tensors' dtypes and shapes; each keeps the model's memory alive.", NULL },
	{ "chunks", get_chunks, NULL,
	  "The chunk dicts, as prefetch_file_to_gpu_chunks() gives them: device_ptr, size,\n"
	  "event_handle, slab_id, file, file_offset, tensors.", NULL },
	{ "metadata", get_metadata, NULL,
	  "The safetensors header's __metadata__ (of the first file of a sharded model).", NULL },
	{ "files", get_files, NULL, "The model's files in load order (tuple of absolute paths).", NULL },
	{ "path", get_path, NULL, "The path loaded (a file, a directory or a shard index), made absolute.", NULL },
	{ "gpu_id", get_gpu, NULL, "The GPU holding the model.", NULL },
	{ "owned", get_owned, NULL,
	  "True when this process loaded the model (release() frees it); False for a\n"
	  "model a job held already (its --aegaeon-prefetch, another step), which stays the job's.", NULL },
	{ "released", get_released, NULL, "True after release().", NULL },
	{ "slice", get_slice, NULL,
	  "The tensor-parallel slice loaded: {\"rank\", \"world\", \"preset\", \"rules\": [(pattern,\n"
	  "dim or None)], \"uneven\"}; None for a whole model.", NULL },
	{ "parts", get_parts, NULL,
	  "{name: (dim, start, extent)} of the tensors the slice splits: this rank holds indices\n"
	  "start .. start + shape[dim] of the file's extent along dim (tensors[name].shape is the\n"
	  "part's). The other tensors are whole; {} for a whole model.", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyMethodDef model_methods[] = {
	{ "wait", (PyCFunction)(void (*)(void))model_wait, METH_VARARGS | METH_KEYWORDS,
	  "wait($self, /, name=None, timeout=None)\n--\n\n"
	  "Wait until tensor `name` is on the GPU (only the chunks holding it, so the\n"
	  "first layers can be used while later ones load), or with name None the whole\n"
	  "model. timeout in seconds, None waits for ever; the GIL is released and\n"
	  "Ctrl-C interrupts. KeyError for a name the model has no tensor of,\n"
	  "AegaeonTimeoutError when the time runs out, AegaeonError for a load that\n"
	  "failed (the file, the byte range) and ValueError after release()." },
	{ "release", model_release, METH_NOARGS,
	  "release($self, /)\n--\n\n"
	  "Let go of the model: its GPU memory is freed now, or when the last view of\n"
	  "its tensors kept elsewhere (a torch tensor, a DeviceArray) goes. A load\n"
	  "still running is cancelled (inside a job the agent finishes it first). A\n"
	  "model the job held already stays the job's. Calling it again does nothing." },
	{ "__enter__", model_enter, METH_NOARGS, PYAEG_ENTER_DOC },
	{ "__exit__", model_exit, METH_VARARGS,
	  "__exit__($self, /, *exc_info)\n--\n\nrelease(); an exception in the block propagates." },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot model_slots[] = {
	{ Py_tp_dealloc, model_dealloc },
	{ Py_tp_repr, model_repr },
	{ Py_tp_getset, model_getset },
	{ Py_tp_methods, model_methods },
	{ Py_tp_doc,
	  "A model loading or loaded onto a GPU, from open_model(): its tensors as\n"
	  "zero-copy views, its chunks, files and metadata, per-tensor waits. Its GPU\n"
	  "memory stays while the Model or any view of its tensors is alive; release()\n"
	  "(or leaving a with block) lets go of it. Made by open_model() only." },
	{ 0, NULL },
};

static PyType_Spec model_spec = {
	.name = "aegaeon_native.Model",
	.basicsize = sizeof(ModelObject),
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
	.slots = model_slots,
};

/* ---------------------------------------------------------- module functions */

/* The arguments of open_model, load_model and load_safetensors: a new Model loading, or NULL. */
static ModelObject *open_args(PyObject *path_obj, PyObject *gpu_obj, PyObject *chunk_obj,
			      const struct pyaeg_slice_args *tp)
{
	uint64_t chunk_bytes = PYAEG_DEFAULT_CHUNK_BYTES;
	const struct aeg_slice *slice;
	struct pyaeg_slice *ps;
	PyObject *path;
	ModelObject *m = NULL;
	int gpu = 0;

	if ((gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0) ||
	    (chunk_obj != NULL && pyaeg_u64(chunk_obj, "chunk_bytes", 0, &chunk_bytes) < 0))
		return NULL;
	/* A spec's rules hold their patterns (16 KiB at most): not on the stack. */
	ps = PyMem_Malloc(sizeof(*ps));
	if (ps == NULL)
		return (ModelObject *)PyErr_NoMemory();
	if (pyaeg_slice_from_args(tp, ps, &slice) == 0 && pyaeg_path(path_obj, &path) == 0) {
		m = model_new(PyBytes_AsString(path), gpu, chunk_bytes, slice);
		Py_DECREF(path);
	}
	PyMem_Free(ps);
	return m;
}

#define TP_DOC \
"tp_rank and tp_world (both or neither) load only tensor-parallel rank\n" \
"tp_rank's part of each tensor, for tp_world ranks (1..4096): the tensors a\n" \
"rule matches are split along its dimension, rank r taking part r, the others\n" \
"loaded whole. tp_rules: (pattern, dim) pairs (or a dict), at most 64, tried\n" \
"in order before the preset's; pattern as fnmatch(3) (* matches dots too),\n" \
"dim an int from 0, or None or 'whole' for the tensor whole. tp_preset:\n" \
"'megatron' (the default; 'vllm' is the same: column-parallel layers by rows,\n" \
"row-parallel ones by columns) or 'none'. tp_uneven=True allows an extent\n" \
"that is no multiple of tp_world (the last ranks take less). Tensors come\n" \
"with the parts' shapes; inside a job a model is reused only with an equal\n" \
"slice. Bad values: TypeError or ValueError naming the argument; a split the\n" \
"tensors do not allow: AegaeonValueError naming the tensor.\n"

PyDoc_STRVAR(open_model_doc,
"open_model(path, gpu_id=0, chunk_bytes=33554432, *, wait=True, tp_rank=None, tp_world=None,\n"
"           tp_preset=None, tp_rules=None, tp_uneven=False)\n--\n\n"
"Load a model onto a GPU and return a Model. path is a safetensors file\n"
"(recognised by its content, whatever its name), a directory as save_pretrained\n"
"writes it (its model.safetensors.index.json, else model.safetensors, else\n"
"every *.safetensors file) or a shard index. With wait=True it returns once\n"
"every byte is on the GPU (the GIL is released meanwhile; Ctrl-C cancels the\n"
"load); with wait=False at once, the tensors' views usable after\n"
"Model.wait(name). Inside an aegaeon job the job's agent loads it (other steps\n"
"find it) and a model the job holds already is reused.\n"
TP_DOC
"Errors: AegaeonError\n"
"ENOENT (the path, a shard an index names), EFORMAT (not safetensors, a bad\n"
"header or index; the message says what), ENOSPC (the slab is full).");

static PyObject *py_open_model(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "path", "gpu_id", "chunk_bytes", "wait", TP_KWLIST, NULL };
	PyObject *path_obj, *gpu_obj = NULL, *chunk_obj = NULL;
	struct pyaeg_slice_args tp = { NULL };
	ModelObject *m;
	int wait = 1;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO$pOOOOp:open_model", kwlist, &path_obj, &gpu_obj, &chunk_obj,
					 &wait, &tp.rank, &tp.world, &tp.preset, &tp.rules, &tp.uneven))
		return NULL;
	m = open_args(path_obj, gpu_obj, chunk_obj, &tp);
	if (m != NULL && wait && model_wait_for(m, NULL, -1) < 0)
		Py_CLEAR(m);    /* Ctrl-C or a failed load: the Model's release cancels and frees it */
	return (PyObject *)m;
}

/* load_model and load_safetensors: {name: DeviceArray} once loaded; the views own the memory. */
static PyObject *load_dict(const char *fn, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "path", "gpu_id", "chunk_bytes", TP_KWLIST, NULL };
	PyObject *path_obj, *gpu_obj = NULL, *chunk_obj = NULL, *d = NULL;
	struct pyaeg_slice_args tp = { NULL };
	char format[32];
	ModelObject *m;

	snprintf(format, sizeof(format), "O|OO$OOOOp:%s", fn);
	if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &path_obj, &gpu_obj, &chunk_obj, &tp.rank,
					 &tp.world, &tp.preset, &tp.rules, &tp.uneven))
		return NULL;
	m = open_args(path_obj, gpu_obj, chunk_obj, &tp);
	if (m == NULL)
		return NULL;
	if (model_wait_for(m, NULL, -1) == 0)
		d = tensor_dict(m->mem);
	Py_DECREF(m);
	return d;
}

PyDoc_STRVAR(load_model_doc,
"load_model(path, gpu_id=0, chunk_bytes=33554432, *, tp_rank=None, tp_world=None, tp_preset=None,\n"
"           tp_rules=None, tp_uneven=False)\n--\n\n"
"Load a model (a safetensors file, a directory of shards or a shard index, as\n"
"open_model() takes) onto a GPU and return {name: DeviceArray} in file order,\n"
"each a zero-copy view with the tensor's dtype and shape (torch.from_dlpack on\n"
"cuda and on host, numpy on host). Returns once every byte is on the GPU (the\n"
"GIL is released meanwhile; Ctrl-C cancels the load). The GPU memory is\n"
"released when the last view is collected (or by\n"
"release_all_prefetch_events()). Headers are checked strictly: a malformed\n"
"file is AegaeonError EFORMAT with what is wrong. The tp_* arguments load a\n"
"tensor-parallel rank's part of each tensor, as open_model() says.");

static PyObject *py_load_model(PyObject *self, PyObject *args, PyObject *kw)
{
	return load_dict("load_model", args, kw);
}

PyDoc_STRVAR(load_safetensors_doc,
"load_safetensors(path, gpu_id=0, chunk_bytes=33554432, *, tp_rank=None, tp_world=None,\n"
"                 tp_preset=None, tp_rules=None, tp_uneven=False)\n--\n\n"
"load_model() by its first name: a safetensors file, a directory of shards or\n"
"a shard index -> {name: DeviceArray} once every byte is on the GPU.");

static PyObject *py_load_safetensors(PyObject *self, PyObject *args, PyObject *kw)
{
	return load_dict("load_safetensors", args, kw);
}

static PyMethodDef functions[] = {
	{ "open_model", (PyCFunction)(void (*)(void))py_open_model, METH_VARARGS | METH_KEYWORDS, open_model_doc },
	{ "load_model", (PyCFunction)(void (*)(void))py_load_model, METH_VARARGS | METH_KEYWORDS, load_model_doc },
	{ "load_safetensors", (PyCFunction)(void (*)(void))py_load_safetensors, METH_VARARGS | METH_KEYWORDS,
	  load_safetensors_doc },
	{ NULL, NULL, 0, NULL },
};

int pyaeg_model_init(PyObject *module)
{
	memory_type = PyType_FromSpec(&memory_spec);
	if (memory_type == NULL)
		return -1;
	model_type = PyType_FromSpec(&model_spec);
	if (model_type == NULL)
		return -1;
	Py_INCREF(model_type);
	if (PyModule_AddObject(module, "Model", model_type) < 0) {
		Py_DECREF(model_type);
		return -1;
	}
	return PyModule_AddFunctions(module, functions);
}

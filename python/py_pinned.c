/* PinnedPool: page-locked host buffers near a GPU, handed to Python as memoryviews. */
#include "py_internal.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
	PyObject_HEAD
	struct pyaeg_res *res;          /* res->pool; NULL once closed */
	int gpu;
	uint64_t buffer_bytes;
	uint32_t buffers;
	uintptr_t base;
	/*
	 * Python's mmap of the pool's buffer area (the same pages, mapped again):
	 * memoryviews hold it, so they stay valid after the pool is closed.
	 */
	PyObject *map;
	PyObject *view;                 /* memoryview(map) */
	PyObject *handed;               /* list: the memoryview acquire() gave per buffer, or None */
	struct pyaeg_users users;       /* calls, KVCaches (memoryviews map the pages themselves) */
} PoolObject;

PyObject *pyaeg_pool_type;

static aeg_pool_t *pool_open(PoolObject *p)
{
	if (p->res == NULL || p->res->pool == NULL) {
		PyErr_SetString(PyExc_ValueError, "operation on a closed PinnedPool");
		return NULL;
	}
	if (pyaeg_inherited_check() < 0)
		return NULL;
	return p->res->pool;
}

/*
 * The pool for one call, taken once its arguments are converted: until
 * pool_done, close() is EBUSY, so a wait for a buffer (GIL released) never
 * polls a destroyed pool. NULL with ValueError once closed.
 */
static aeg_pool_t *pool_use(PoolObject *p)
{
	return pyaeg_users_enter(&p->users, pool_open(p));
}

static void pool_done(PoolObject *p)
{
	pyaeg_users_leave(&p->users);
}

aeg_pool_t *pyaeg_pool_hold(PyObject *obj)
{
	aeg_pool_t *pool;

	if (!PyObject_TypeCheck(obj, (PyTypeObject *)pyaeg_pool_type)) {
		PyErr_Format(PyExc_TypeError, "pool must be a PinnedPool, not %s", pyaeg_tname(obj));
		return NULL;
	}
	pool = pool_open((PoolObject *)obj);
	if (pool != NULL)
		((PoolObject *)obj)->users.caches++;
	return pool;
}

void pyaeg_pool_unhold(PyObject *obj)
{
	((PoolObject *)obj)->users.caches--;
}

uintptr_t pyaeg_pool_base(PyObject *obj)
{
	return ((PoolObject *)obj)->base;
}

PyObject *pyaeg_pool_view(PyObject *obj, uint64_t offset, uint64_t bytes)
{
	PoolObject *p = (PoolObject *)obj;
	PyObject *start, *stop, *slice = NULL, *mv;

	start = PyLong_FromUnsignedLongLong(offset);
	stop = PyLong_FromUnsignedLongLong(offset + bytes);
	if (start != NULL && stop != NULL)
		slice = PySlice_New(start, stop, NULL);
	Py_XDECREF(start);
	Py_XDECREF(stop);
	if (slice == NULL)
		return NULL;
	mv = PyObject_GetItem(p->view, slice);
	Py_DECREF(slice);
	return mv;
}

/* Map the buffer area of the pool's memfd a second time, as a Python mmap. */
static int map_pool(PoolObject *p)
{
	PyObject *mmap_mod, *ctor, *args, *kw, *map = NULL;
	struct aeg_pool_stats st;
	struct stat sb;
	long long offset;
	int fd, err;

	err = aeg_pool_stats(p->res->pool, &st);
	if (err < 0) {
		pyaeg_raise(err);
		return -1;
	}
	p->buffer_bytes = st.buffer_bytes;
	p->buffers = st.buffers;
	p->base = (uintptr_t)aeg_pool_base(p->res->pool);
	fd = aeg_pool_fd(p->res->pool);
	if (fstat(fd, &sb) < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	/* The buffers are the file's last pool_bytes, after a page-aligned header. */
	offset = (long long)sb.st_size - (long long)st.pool_bytes;
	mmap_mod = PyImport_ImportModule("mmap");
	if (mmap_mod == NULL)
		return -1;
	ctor = PyObject_GetAttrString(mmap_mod, "mmap");
	Py_DECREF(mmap_mod);
	if (ctor == NULL)
		return -1;
	args = Py_BuildValue("(iK)", fd, (unsigned long long)st.pool_bytes);
	kw = Py_BuildValue("{s:i,s:i,s:L}", "flags", MAP_SHARED, "prot", PROT_READ | PROT_WRITE,
			   "offset", offset);
	if (args != NULL && kw != NULL)
		map = PyObject_Call(ctor, args, kw);
	Py_DECREF(ctor);
	Py_XDECREF(args);
	Py_XDECREF(kw);
	if (map == NULL)
		return -1;
	p->map = map;
	p->view = PyMemoryView_FromObject(map);
	p->handed = PyList_New(st.buffers);
	if (p->view == NULL || p->handed == NULL)
		return -1;
	for (uint32_t i = 0; i < st.buffers; i++) {
		Py_INCREF(Py_None);
		PyList_SetItem(p->handed, i, Py_None);
	}
	return 0;
}

static PyObject *pool_make(PyTypeObject *type, int gpu, uint64_t buffer_bytes, uint64_t pool_bytes, int fd)
{
	aeg_device_t *dev;
	PoolObject *p;
	int err;

	if (pyaeg_device(&dev) < 0)
		return NULL;
	p = (PoolObject *)PyType_GenericAlloc(type, 0);
	if (p == NULL)
		return NULL;
	p->gpu = gpu;
	p->res = pyaeg_res_new();
	if (p->res == NULL)
		goto fail;
	PYAEG_BEGIN_ALLOW_THREADS
	if (fd >= 0)
		err = aeg_pool_attach(dev, fd, &p->res->pool);
	else
		err = aeg_pool_create(dev, gpu, buffer_bytes, pool_bytes, &p->res->pool);
	PYAEG_END_ALLOW_THREADS
	if (err < 0) {
		pyaeg_raise(err);
		goto fail;
	}
	pyaeg_object_born();
	if (map_pool(p) < 0)
		goto fail;
	return (PyObject *)p;
fail:
	Py_DECREF(p);
	return NULL;
}

static PyObject *pool_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "buffer_size", "pool_size", "gpu_id", NULL };
	PyObject *size_obj, *count_obj = NULL, *gpu_obj = NULL;
	uint64_t size, count = 4;
	int gpu = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO:PinnedPool", kwlist, &size_obj, &count_obj, &gpu_obj))
		return NULL;
	if (pyaeg_u64(size_obj, "buffer_size", 0, &size) < 0 ||
	    (count_obj != NULL && pyaeg_u64(count_obj, "pool_size", 0, &count) < 0) ||
	    (gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0))
		return NULL;
	if (size % 4096 != 0)
		return PyErr_Format(PyExc_ValueError, "buffer_size %llu is not a multiple of 4096 (the page size)",
				    (unsigned long long)size);
	if (count > UINT32_MAX || size > UINT64_MAX / count)
		return PyErr_Format(PyExc_ValueError, "pool_size %llu buffers of %llu bytes is too large",
				    (unsigned long long)count, (unsigned long long)size);
	return pool_make(type, gpu, size, size * count, -1);
}

static PyObject *pool_attach(PyObject *cls, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "fd", "gpu_id", NULL };
	PyObject *fd_obj, *gpu_obj = NULL;
	uint64_t fd;
	int gpu = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:attach", kwlist, &fd_obj, &gpu_obj))
		return NULL;
	if (pyaeg_u64(fd_obj, "fd", 1, &fd) < 0 || (gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0))
		return NULL;
	if (fd > INT32_MAX)
		return PyErr_Format(PyExc_ValueError, "fd %llu is out of range", (unsigned long long)fd);
	return pool_make((PyTypeObject *)cls, gpu, 0, 0, (int)fd);
}

static PyObject *pool_from_job(PyObject *cls, PyObject *unused)
{
	aeg_pool_t *job_pool = pyaeg_job_pool();

	if (job_pool == NULL)
		return NULL;
	return pool_make((PyTypeObject *)cls, 0, 0, 0, aeg_pool_fd(job_pool));
}

static void pool_dealloc(PyObject *self)
{
	PoolObject *p = (PoolObject *)self;
	PyTypeObject *tp = Py_TYPE(self);
	freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

	if (p->res != NULL) {
		if (p->res->pool != NULL)
			pyaeg_object_gone();
		pyaeg_res_free(p->res);
	}
	Py_XDECREF(p->handed);
	Py_XDECREF(p->view);
	Py_XDECREF(p->map);
	tp_free(self);
	Py_DECREF(tp);
}

struct acquire_wait {
	aeg_pool_t *pool;
	struct aeg_pool_buffer buf;
};

static int acquire_slice(void *arg, int timeout_ms)
{
	struct acquire_wait *w = arg;

	return aeg_pool_acquire(w->pool, timeout_ms, &w->buf);
}

static PyObject *pool_acquire(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "timeout", NULL };
	PoolObject *p = (PoolObject *)self;
	PyObject *timeout_obj = Py_None, *mv;
	struct acquire_wait w;
	double seconds;
	int err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:acquire", kwlist, &timeout_obj))
		return NULL;
	if (pyaeg_timeout(timeout_obj, &seconds) < 0 || (w.pool = pool_use(p)) == NULL)
		return NULL;
	if (seconds == 0)
		err = aeg_pool_acquire(w.pool, 0, &w.buf);
	else
		err = pyaeg_wait(acquire_slice, &w, seconds);
	mv = NULL;
	if (err == AEG_ETIMEDOUT)
		pyaeg_raise_msg(err, "no buffer of the pool came free within %g s (%u buffers, all in use)",
				seconds < 0 ? 0 : seconds, p->buffers);
	else if (err < 0)
		pyaeg_raise(err);
	else if (err == 0 && (mv = pyaeg_pool_view(self, (uint64_t)w.buf.index * p->buffer_bytes, p->buffer_bytes)) == NULL)
		aeg_pool_release(w.pool, w.buf.index);
	pool_done(p);
	if (mv == NULL)         /* an error, or PYAEG_SIGNALLED with the handler's */
		return NULL;
	Py_INCREF(mv);
	PyList_SetItem(p->handed, w.buf.index, mv);
	return Py_BuildValue("(IN)", w.buf.index, mv);
}

/* The buffer index a release() argument names. */
static int buffer_index(PoolObject *p, PyObject *obj, uint32_t *index)
{
	uint64_t v;

	if (PyTuple_Check(obj) && PyTuple_Size(obj) == 2)
		obj = PyTuple_GetItem(obj, 0);
	if (!PyLong_Check(obj)) {
		PyErr_Format(PyExc_TypeError, "release() takes a buffer index, acquire()'s (index, memoryview) or a buffer address, not %s",
			     pyaeg_tname(obj));
		return -1;
	}
	if (pyaeg_u64(obj, "buffer", 1, &v) < 0)
		return -1;
	/* The seed released buffers by address. */
	if (v >= p->base && v - p->base < (uint64_t)p->buffers * p->buffer_bytes) {
		if ((v - p->base) % p->buffer_bytes != 0) {
			PyErr_Format(PyExc_ValueError, "address 0x%llx is inside buffer %llu, not at its start",
				     (unsigned long long)v, (unsigned long long)((v - p->base) / p->buffer_bytes));
			return -1;
		}
		v = (v - p->base) / p->buffer_bytes;
	}
	if (v >= p->buffers) {
		PyErr_Format(PyExc_ValueError, "buffer index %llu is out of range (the pool has %u buffers)",
			     (unsigned long long)v, p->buffers);
		return -1;
	}
	*index = (uint32_t)v;
	return 0;
}

static PyObject *pool_release(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "buffer", NULL };
	PoolObject *p = (PoolObject *)self;
	PyObject *obj, *mv, *r;
	aeg_pool_t *pool;
	uint32_t index;
	int err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:release", kwlist, &obj))
		return NULL;
	if (buffer_index(p, obj, &index) < 0 || (pool = pool_use(p)) == NULL)
		return NULL;
	err = aeg_pool_release(pool, index);
	pool_done(p);
	if (err < 0)
		return pyaeg_raise(err);
	/* The memoryview acquire() gave stops working, unless something still exports it. */
	mv = PyList_GetItem(p->handed, index);
	if (mv != NULL && mv != Py_None) {
		r = PyObject_CallMethod(mv, "release", NULL);
		if (r == NULL)
			PyErr_Clear();
		Py_XDECREF(r);
		Py_INCREF(Py_None);
		PyList_SetItem(p->handed, index, Py_None);
	}
	Py_RETURN_NONE;
}

static PyObject *pool_buffer(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "index", NULL };
	PoolObject *p = (PoolObject *)self;
	PyObject *obj;
	uint32_t index;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:buffer", kwlist, &obj))
		return NULL;
	if (pool_open(p) == NULL || buffer_index(p, obj, &index) < 0)
		return NULL;
	return pyaeg_pool_view(self, (uint64_t)index * p->buffer_bytes, p->buffer_bytes);
}

static PyObject *pool_address(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "index", NULL };
	PoolObject *p = (PoolObject *)self;
	PyObject *obj;
	uint32_t index;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O:address", kwlist, &obj))
		return NULL;
	if (pool_open(p) == NULL || buffer_index(p, obj, &index) < 0)
		return NULL;
	return PyLong_FromUnsignedLongLong(p->base + (uint64_t)index * p->buffer_bytes);
}

static PyObject *pool_stats(PyObject *self, PyObject *unused)
{
	aeg_pool_t *pool = pool_open((PoolObject *)self);
	struct aeg_pool_stats st;
	int err;

	if (pool == NULL)
		return NULL;
	err = aeg_pool_stats(pool, &st);
	if (err < 0)
		return pyaeg_raise(err);
	return Py_BuildValue("{s:K,s:K,s:I,s:I,s:I,s:K,s:K,s:i}",
			     "buffer_bytes", (unsigned long long)st.buffer_bytes,
			     "pool_bytes", (unsigned long long)st.pool_bytes,
			     "buffers", st.buffers, "in_use", st.in_use, "high_water", st.high_water,
			     "acquires", (unsigned long long)st.acquires,
			     "timeouts", (unsigned long long)st.timeouts, "numa_node", st.numa_node);
}

static PyObject *pool_fd(PyObject *self, PyObject *unused)
{
	aeg_pool_t *pool = pool_open((PoolObject *)self);

	if (pool == NULL)
		return NULL;
	return PyLong_FromLong(aeg_pool_fd(pool));
}

static PyObject *pool_close(PyObject *self, PyObject *unused)
{
	PoolObject *p = (PoolObject *)self;
	struct pyaeg_res *res = p->res;
	char what[64];

	if (res == NULL || res->pool == NULL)
		Py_RETURN_NONE;
	snprintf(what, sizeof(what), "PinnedPool of GPU %d", p->gpu);
	if (pyaeg_users_busy(&p->users, what) < 0)
		return NULL;
	/* Detached first: a thread that runs while the pool is unmapped (GIL released) finds it closed. */
	p->res = NULL;
	pyaeg_object_gone();
	pyaeg_res_free(res);
	Py_RETURN_NONE;
}

static PyObject *pool_enter(PyObject *self, PyObject *unused)
{
	if (pool_open((PoolObject *)self) == NULL)
		return NULL;
	Py_INCREF(self);
	return self;
}

static PyObject *pool_exit(PyObject *self, PyObject *args)
{
	return pool_close(self, NULL);
}

static PyObject *get_buffer_size(PyObject *self, void *closure)
{
	return PyLong_FromUnsignedLongLong(((PoolObject *)self)->buffer_bytes);
}

static PyObject *get_pool_size(PyObject *self, void *closure)
{
	return PyLong_FromUnsignedLong(((PoolObject *)self)->buffers);
}

static PyObject *get_gpu(PyObject *self, void *closure)
{
	return PyLong_FromLong(((PoolObject *)self)->gpu);
}

static PyObject *get_closed(PyObject *self, void *closure)
{
	PoolObject *p = (PoolObject *)self;

	return PyBool_FromLong(p->res == NULL || p->res->pool == NULL);
}

static PyGetSetDef pool_getset[] = {
	{ "buffer_size", get_buffer_size, NULL, "Bytes per buffer.", NULL },
	{ "pool_size", get_pool_size, NULL, "Number of buffers.", NULL },
	{ "gpu_id", get_gpu, NULL, "GPU whose NUMA node holds the pages.", NULL },
	{ "closed", get_closed, NULL, "True after close().", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyMethodDef pool_methods[] = {
	{ "acquire", (PyCFunction)(void (*)(void))pool_acquire, METH_VARARGS | METH_KEYWORDS,
	  "acquire($self, timeout=None)\n--\n\n"
	  "Take a free buffer: its index and a writable memoryview of its bytes. Waits up\n"
	  "to timeout seconds (None: for ever, 0: not at all) with the GIL released;\n"
	  "AegaeonTimeoutError when none came free. Process-safe: processes attached to\n"
	  "the same pool share its buffers." },
	{ "release", (PyCFunction)(void (*)(void))pool_release, METH_VARARGS | METH_KEYWORDS,
	  "release($self, buffer)\n--\n\n"
	  "Give a buffer back: its index, acquire()'s tuple, or its address (the seed's\n"
	  "form). AegaeonValueError if it is not acquired. The memoryview acquire()\n"
	  "returned is released too (unless a slice or array still exports it)." },
	{ "buffer", (PyCFunction)(void (*)(void))pool_buffer, METH_VARARGS | METH_KEYWORDS,
	  "buffer($self, index)\n--\n\nA writable memoryview of buffer index (acquired or not)." },
	{ "address", (PyCFunction)(void (*)(void))pool_address, METH_VARARGS | METH_KEYWORDS,
	  "address($self, index)\n--\n\n"
	  "Host address of buffer index in this process: the registered (pinned) mapping\n"
	  "that CUDA copies use." },
	{ "stats", pool_stats, METH_NOARGS,
	  "stats($self, /)\n--\n\n"
	  "buffer_bytes, pool_bytes, buffers, in_use (across processes), high_water,\n"
	  "acquires, timeouts, numa_node (-1 when not bound)." },
	{ "fd", pool_fd, METH_NOARGS,
	  "fd($self, /)\n--\n\n"
	  "The pool's memfd: pass it to another process (subprocess pass_fds, SCM_RIGHTS)\n"
	  "and PinnedPool.attach(fd) there shares the buffers. Owned by the pool." },
	{ "attach", (PyCFunction)(void (*)(void))pool_attach, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
	  "attach($type, fd, gpu_id=0)\n--\n\n"
	  "Map the pool behind fd (from another process's fd()); fd is duplicated.\n"
	  "AegaeonError EBADF for a closed fd, AegaeonValueError for a file that is not a pool." },
	{ "from_job", pool_from_job, METH_NOARGS | METH_CLASS,
	  "from_job($type, /)\n--\n\n"
	  "The pinned pool of the aegaeon job this process runs in (--aegaeon-pinned),\n"
	  "shared with the agent and every step. AegaeonError ENOENT outside a job or\n"
	  "for a job without a pool." },
	{ "close", pool_close, METH_NOARGS,
	  "close($self, /)\n--\n\n"
	  "Unmap (and unregister) the pool now; also done when collected. Memoryviews\n"
	  "already handed out stay readable (they map the same pages). AegaeonError\n"
	  "EBUSY, unmapping nothing, while an acquire() waits in another thread or a\n"
	  "KVCache is built on the pool." },
	{ "__enter__", pool_enter, METH_NOARGS, PYAEG_ENTER_DOC },
	{ "__exit__", pool_exit, METH_VARARGS, PYAEG_EXIT_DOC },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot pool_slots[] = {
	{ Py_tp_new, pool_new },
	{ Py_tp_dealloc, pool_dealloc },
	{ Py_tp_getset, pool_getset },
	{ Py_tp_methods, pool_methods },
	{ Py_tp_doc,
	  "PinnedPool(buffer_size, pool_size=4, gpu_id=0)\n--\n\n"
	  "pool_size buffers of buffer_size bytes (a multiple of 4096) in one memfd, its\n"
	  "pages on the GPU's NUMA node, populated up front and registered with CUDA\n"
	  "(pinned, mapped) a piece of whole buffers at a time, so a copy stays inside\n"
	  "one buffer. acquire()/release() are O(1) and shared by every\n"
	  "process attached. Errors: ValueError (sizes), AegaeonError ENOMEM (detail:\n"
	  "asked vs available), EDEVICE." },
	{ 0, NULL },
};

static PyType_Spec pool_spec = {
	.name = "aegaeon_native.PinnedPool",
	.basicsize = sizeof(PoolObject),
	.flags = Py_TPFLAGS_DEFAULT,
	.slots = pool_slots,
};

int pyaeg_pool_init_type(PyObject *module)
{
	pyaeg_pool_type = PyType_FromSpec(&pool_spec);
	if (pyaeg_pool_type == NULL)
		return -1;
	Py_INCREF(pyaeg_pool_type);
	if (PyModule_AddObject(module, "PinnedPool", pyaeg_pool_type) < 0) {
		Py_DECREF(pyaeg_pool_type);
		return -1;
	}
	return 0;
}

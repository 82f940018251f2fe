/* The aegaeon_native module: its functions (device choice, events, prefetch, views, stats) and its table. */
#include "py_internal.h"
#include "py_runtime.h"
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
	if (pyaeg_rt.dev != NULL && pyaeg_rt.kind != kind) {
		busy = pyaeg_busy_locked();
		if (!busy) {
			PYAEG_BEGIN_ALLOW_THREADS
			pyaeg_teardown_locked(1);
			PYAEG_END_ALLOW_THREADS
		}
	}
	if (!busy) {
		pyaeg_rt.kind = kind;
		pyaeg_rt.kind_set = 1;
	}
	pyaeg_unlock();
	if (busy) {
		pyaeg_raise_msg(AEG_EBUSY, "the %s device is in use (objects, prefetched chunks or events alive): release them before switching to %s",
				aeg_device_kind_name(pyaeg_rt.kind), text);
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
	const char *kind = NULL;
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
	/* A lone surrogate has no UTF-8: UnicodeEncodeError. */
	if (device != Py_None && (kind = PyUnicode_AsUTF8AndSize(device, NULL)) == NULL)
		return NULL;
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
		/* As --aegaeon-slab: a slab of 0 bytes or 0% holds nothing to load into. */
		if (spec.is_percent ? spec.ppm == 0 : spec.bytes == 0)
			return PyErr_Format(PyExc_ValueError, "prefetch_slab \"%s\" must be greater than 0", text);
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
		open = pyaeg_rt.dev != NULL;
		if (!open)
			pyaeg_rt.attach = attach == Py_True;
		pyaeg_unlock();
		if (open)
			return pyaeg_raise_msg(AEG_EBUSY, "the device is open already: configure(attach=...) must come first");
	}
	if (kind != NULL && set_kind(kind) < 0)
		return NULL;
	if (text[0] == '\0' && nthreads == 0)
		Py_RETURN_NONE;
	err = 0;
	pyaeg_lock();
	if (pyaeg_rt.sess != NULL && pyaeg_rt.job == NULL && !pyaeg_rt.inherited) {
		struct aeg_prefetch_config engine;
		const struct aeg_prefetch_config *use;
		char old_slab[64];
		int old_threads = pyaeg_rt.prefetch_threads;

		snprintf(old_slab, sizeof(old_slab), "%s", pyaeg_rt.prefetch_slab);
		if (text[0] != '\0')
			snprintf(pyaeg_rt.prefetch_slab, sizeof(pyaeg_rt.prefetch_slab), "%s", text);
		if (nthreads != 0)
			pyaeg_rt.prefetch_threads = (int)nthreads;
		pyaeg_engine_settings(&engine, &use);
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_session_set_engine(pyaeg_rt.sess, pyaeg_rt.prefetch_slab[0] ? pyaeg_rt.prefetch_slab : NULL, use);
		PYAEG_END_ALLOW_THREADS
		busy = err == AEG_EBUSY;
		if (err) {
			snprintf(pyaeg_rt.prefetch_slab, sizeof(pyaeg_rt.prefetch_slab), "%s", old_slab);
			pyaeg_rt.prefetch_threads = old_threads;
		}
	} else {
		if (text[0] != '\0')
			snprintf(pyaeg_rt.prefetch_slab, sizeof(pyaeg_rt.prefetch_slab), "%s", text);
		if (nthreads != 0)
			pyaeg_rt.prefetch_threads = (int)nthreads;
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
	count = pyaeg_rt.gpu_count;
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
	if ((err = pyaeg_device_locked(&dev)) < 0 || (err = pyaeg_check_gpu_locked(gpu)) < 0 ||
	    (err = pyaeg_stream_locked(gpu, &stream)) < 0)
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
		e->next = pyaeg_rt.events;
		pyaeg_rt.events = e;
		pyaeg_rt.nevents++;
	}
	PYAEG_END_ALLOW_THREADS
	if (err < 0)
		goto fail;
	pyaeg_unlock();
	return pyaeg_handle_bytes(&e->handle);
fail:
	pyaeg_unlock();
	free(e);
	return pyaeg_raise(err);
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
	for (struct mod_event **pp = &pyaeg_rt.events; *pp != NULL; pp = &(*pp)->next) {
		if (memcmp((*pp)->handle.bytes, handle.bytes, AEG_HANDLE_BYTES) == 0) {
			found = *pp;
			*pp = found->next;
			pyaeg_rt.nevents--;
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
	rc = pyaeg_load(PyBytes_AsString(path), gpu, chunk_bytes, AEG_FORMAT_AUTO, NULL, &l);
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
	int finalizer;                  /* the caller finalizes the interpreter */
};

/*
 * A chunk of a load still in flight is released once that load is done.
 * The runtime lock is held for one slice at a time: between slices the wait
 * checks for signals, whose handlers may call the module.
 */
static int release_slice(void *arg, int timeout_ms)
{
	struct release_req *r = arg;
	int err;

	pyaeg_rtlock_take(r->finalizer);
	if (pyaeg_rt.sess == NULL)
		err = aeg_fail(AEG_ENOENT, "slab id %llu holds no prefetched chunk (nothing was prefetched)",
			       (unsigned long long)r->ids[0]);
	else if (r->gpu < 0 || (err = pyaeg_check_gpu_locked(r->gpu)) == 0)
		err = aeg_session_release(pyaeg_rt.sess, r->gpu, r->ids, r->n, timeout_ms, NULL);
	pyaeg_rtlock_give();
	return err;
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
	if ((gpu_obj != Py_None && pyaeg_gpu(gpu_obj, &r.gpu) < 0) || pyaeg_inherited_check() < 0)
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
	r.finalizer = pyaeg_is_finalizer();
	err = pyaeg_wait(release_slice, &r, -1);
	if (err < 0)
		pyaeg_raise(err);
	rc = err == 0 ? 0 : -1;         /* PYAEG_SIGNALLED: the handler's exception */
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

	if (pyaeg_inherited_check() < 0)
		return NULL;
	pyaeg_lock();
	PYAEG_BEGIN_ALLOW_THREADS
	if (pyaeg_rt.sess != NULL)
		err = aeg_session_release_all(pyaeg_rt.sess, 0, NULL);
	pyaeg_drop_events_locked();
	PYAEG_END_ALLOW_THREADS
	pyaeg_unlock();
	if (err < 0)
		return pyaeg_raise(err);
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
	if (pyaeg_inherited_check() < 0)
		return NULL;
	pyaeg_lock();
	if (pyaeg_rt.sess != NULL)
		err = aeg_session_locate(pyaeg_rt.sess, ptr, size, id, &gpu);
	pyaeg_unlock();
	if (err < 0)
		return pyaeg_raise_msg(AEG_ENOENT, "no live prefetched chunk has slab id %llu with %llu bytes at 0x%llx",
				       (unsigned long long)id, (unsigned long long)size, (unsigned long long)ptr);
	/* pyaeg_rt.gpus stays while views count on it: the device closes only with none alive. */
	return pyaeg_array_new(NULL, &pyaeg_rt.gpus[gpu].views, (void *)(uintptr_t)ptr, size, gpu,
			       pyaeg_rt.kind == AEG_DEVICE_HOST, dtype, 0, NULL, 0);
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
	int gpu = 0, err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:prepare", kwlist, &gpu_obj))
		return NULL;
	if (gpu_obj != NULL && pyaeg_gpu(gpu_obj, &gpu) < 0)
		return NULL;
	pyaeg_lock();
	if ((err = pyaeg_device_locked(&dev)) == 0 && (err = pyaeg_check_gpu_locked(gpu)) == 0 &&
	    (pyaeg_rt.job == NULL || (err = pyaeg_job_index_locked(gpu)) >= 0)) {
		PYAEG_BEGIN_ALLOW_THREADS
		err = aeg_session_prepare(pyaeg_rt.sess, gpu);
		PYAEG_END_ALLOW_THREADS
	}
	pyaeg_unlock();
	if (err < 0)
		return pyaeg_raise(err);
	Py_RETURN_NONE;
}

PyDoc_STRVAR(timings_doc,
"timings(*, starts=False)\n--\n\n"
"The steps the library timed since the last call, oldest first, as\n"
"(name, seconds) tuples: \"device open\", \"topology\", \"slab create\",\n"
"\"engine create\", \"pool ahead\" (the staging ring took the memory made\n"
"ahead at import), \"pool create\", \"pool usable\" (the staging ring made,\n"
"and its first buffer usable), \"job attach\", \"prefetch start\", \"job prefetch\",\n"
"\"job wait\", \"load\" (a load in this process, from its start to its last\n"
"byte on the GPU), ... (AEGAEON_LOG=debug logs each as it ends). With\n"
"starts=True, (name, start, seconds) tuples, start on time.monotonic()'s\n"
"clock.");

static PyObject *py_timings(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "starts", NULL };
	struct aeg_span *spans;
	PyObject *list;
	int n, starts = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|$p:timings", kwlist, &starts))
		return NULL;
	spans = PyMem_Malloc(AEG_SPANS_MAX * sizeof(*spans));
	if (spans == NULL)
		return PyErr_NoMemory();
	n = aeg_spans_take(spans, AEG_SPANS_MAX, NULL);
	list = PyList_New(n);
	for (int i = 0; list != NULL && i < n; i++) {
		double sec = (double)spans[i].ns / 1e9;
		PyObject *t = starts ? Py_BuildValue("(sdd)", spans[i].name, (double)spans[i].start_ns / 1e9, sec) :
				       Py_BuildValue("(sd)", spans[i].name, sec);

		if (t == NULL)
			Py_CLEAR(list);
		else
			PyList_SetItem(list, i, t);
	}
	PyMem_Free(spans);
	return list;
}

PyDoc_STRVAR(span_doc,
"_span(name, start)\n--\n\n"
"Keep a step of the module's Python part (aegaeon_native.torch), from start\n"
"(time.monotonic()) to now, for timings(); internal.");

static PyObject *py_span(PyObject *self, PyObject *args)
{
	const char *name;
	double start;

	if (!PyArg_ParseTuple(args, "sd:_span", &name, &start))
		return NULL;
	if (!(start >= 0.0 && start < 1.8e10)) {
		PyErr_SetString(PyExc_ValueError, "_span: start is not a time.monotonic() time");
		return NULL;
	}
	aeg_span_end(name, (uint64_t)(start * 1e9 + 0.5));
	Py_RETURN_NONE;
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

/* What stats() reports, copied out under the runtime lock and built into dicts once it is given back. */
struct stats_copy {
	const char *device;             /* a static name, or NULL */
	uint64_t events;
	long objects;
	int gpus;                       /* entries of engines */
	struct engine_copy {
		int has;                /* the GPU has a prefetch engine */
		struct aeg_prefetch_stats s;
		uint64_t slab_bytes;
		Py_ssize_t views;
	} *engines;
	int in_job;
	struct aeg_job_info job;
	Py_ssize_t job_blocks;
};

static int stats_copy_locked(struct stats_copy *c)
{
	aeg_session_t *sess = pyaeg_rt.inherited ? NULL : pyaeg_rt.sess;     /* a fork() child's is the parent's */

	memset(c, 0, sizeof(*c));
	c->device = pyaeg_rt.dev && !pyaeg_rt.inherited ? aeg_device_kind_name(pyaeg_rt.kind) : NULL;
	c->events = pyaeg_rt.nevents;
	c->objects = pyaeg_rt.objects;
	if (sess == NULL)
		return 0;
	c->engines = calloc((size_t)(pyaeg_rt.gpu_count ? pyaeg_rt.gpu_count : 1), sizeof(*c->engines));
	if (c->engines == NULL)
		return AEG_ENOMEM;
	c->gpus = pyaeg_rt.gpu_count;
	for (int i = 0; i < c->gpus; i++) {
		struct engine_copy *e = &c->engines[i];

		e->has = aeg_session_engine_stats(sess, i, &e->s, &e->slab_bytes) == 0;
		e->views = pyaeg_rt.gpus[i].views;
	}
	aeg_error_clear();
	if (pyaeg_rt.job != NULL) {
		c->in_job = 1;
		aeg_job_get_info(pyaeg_rt.job, &c->job);
		c->job_blocks = (Py_ssize_t)aeg_session_owned_blocks(sess);
	}
	return 0;
}

static PyObject *stats_dict(const struct stats_copy *c)
{
	PyObject *d = NULL, *pf = PyDict_New(), *job = NULL;

	for (int i = 0; pf != NULL && i < c->gpus; i++) {
		const struct engine_copy *e = &c->engines[i];
		PyObject *g, *key;

		if (!e->has)
			continue;
		g = Py_BuildValue("{s:K,s:K,s:K,s:K,s:I,s:I,s:n}",
				  "slab_bytes", (unsigned long long)e->slab_bytes,
				  "chunks", (unsigned long long)e->s.chunks, "blocks", (unsigned long long)e->s.blocks,
				  "block_bytes", (unsigned long long)e->s.block_bytes, "loads", e->s.loads,
				  "loads_in_flight", e->s.loads_in_flight, "views", e->views);
		key = PyLong_FromLong(i);
		if (g == NULL || key == NULL || PyDict_SetItem(pf, key, g) < 0)
			Py_CLEAR(pf);
		Py_XDECREF(g);
		Py_XDECREF(key);
	}
	if (pf != NULL && c->in_job) {
		job = Py_BuildValue("{s:s,s:l,s:i,s:n}", "job_id", c->job.job_id, "agent_pid", c->job.agent_pid,
				    "slabs", c->job.slabs, "blocks", c->job_blocks);
	} else if (pf != NULL) {
		job = Py_None;
		Py_INCREF(job);
	}
	if (pf != NULL && job != NULL)
		d = Py_BuildValue("{s:s,s:K,s:l,s:O,s:O}", "device", c->device,
				  "events", (unsigned long long)c->events, "objects", c->objects,
				  "prefetch", pf, "job", job);
	Py_XDECREF(job);
	Py_XDECREF(pf);
	return d;
}

static PyObject *py_stats(PyObject *self, PyObject *unused)
{
	struct stats_copy c;
	PyObject *d = NULL;
	int err;

	pyaeg_lock();
	err = stats_copy_locked(&c);
	pyaeg_unlock();
	if (err < 0)
		PyErr_NoMemory();
	else
		d = stats_dict(&c);
	free(c.engines);
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
	{ "timings", (PyCFunction)(void (*)(void))py_timings, METH_VARARGS | METH_KEYWORDS, timings_doc },
	{ "_span", py_span, METH_VARARGS, span_doc },
	{ NULL, NULL, 0, NULL },
};

/* Interpreter shutdown: prefetched chunks and events go now, the rest at Py_AtExit. */
static void module_free(void *unused)
{
	int finalizer = pyaeg_is_finalizer();

	if (pyaeg_rt.inherited)
		return;         /* a fork() child: the parent's to tear down */
	PYAEG_BEGIN_ALLOW_THREADS
	pyaeg_rtlock_take(finalizer);
	pyaeg_teardown_locked(!pyaeg_busy_locked());
	pyaeg_rtlock_give();
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

PyMODINIT_FUNC PyInit_aegaeon_native(void);

PyMODINIT_FUNC PyInit_aegaeon_native(void)
{
	PyObject *m;
	int err;

	pyaeg_fork_init();
	m = PyModule_Create(&moduledef);
	if (m == NULL)
		return NULL;
	if (pyaeg_errors_init(m) < 0)
		goto fail;
	if (pyaeg_array_init_type(m) < 0 || pyaeg_slab_init_type(m) < 0 ||
	    pyaeg_pool_init_type(m) < 0 || pyaeg_kv_init_type(m) < 0 ||
	    pyaeg_model_init(m) < 0 || pyaeg_torch_init(m) < 0)
		goto fail;
	if (PyModule_AddStringConstant(m, "__version__", aeg_version()) < 0 ||
	    PyModule_AddIntConstant(m, "HANDLE_BYTES", AEG_HANDLE_BYTES) < 0 ||
	    PyModule_AddIntConstant(m, "DEFAULT_CHUNK_BYTES", (long)PYAEG_DEFAULT_CHUNK_BYTES) < 0)
		goto fail;
	/*
	 * Outside a job, the first load's staging ring is made now, while the
	 * process goes on importing and making its CUDA context. A bad
	 * $AEGAEON_RING_AHEAD (its one error) is a warning here, not a failed
	 * import; a config file that cannot be read is left to the first use.
	 */
	err = aeg_session_warm_up(NULL);
	if (err < 0 && PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "aegaeon_native: %s", aeg_error_detail()) < 0)
		goto fail;
	return m;
fail:
	Py_DECREF(m);
	return NULL;
}

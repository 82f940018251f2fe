/* Shared declarations of the aegaeon_native extension's files; never installed. */
#ifndef AEGAEON_PY_INTERNAL_H
#define AEGAEON_PY_INTERNAL_H

/* The stable ABI of 3.10: one build loads in 3.10, 3.11, 3.12 and later. */
#define Py_LIMITED_API 0x030a0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>
#include <aegaeon/session.h>

#define PYAEG_DEFAULT_CHUNK_BYTES (32ull << 20)        /* the seed's chunk_bytes */
#define PYAEG_NAME_SHOWN 132    /* aeg_quote's buffer for a tensor name in a message: 128 characters */

/*
 * C resources of one Python object, listed in the runtime so that whatever
 * Python never collects is still destroyed at interpreter exit, in reverse
 * order of creation (a KV cache before the slab it took its blocks from).
 */
struct pyaeg_res {
	struct pyaeg_res *prev, *next;
	aeg_kv_t *kv;
	aeg_stream_t *stream;
	aeg_stream_t *stream_in;        /* a KV cache's second stream: swap-ins run beside swap-outs */
	aeg_slab_t *slab;
	int job_lease;                  /* slab is a lease of a job slab (aeg_job_slab) */
	aeg_pool_t *pool;
};

/* Errors and argument helpers (py_args.c). */
extern PyObject *pyaeg_error_type;          /* AegaeonError(OSError) */
int pyaeg_errors_init(PyObject *module);    /* AegaeonError and its two kinds, added to @module */
PyObject *pyaeg_raise(int code);            /* raise the library's code and detail; NULL */
PyObject *pyaeg_raise_msg(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *pyaeg_tname(PyObject *obj);   /* type name for messages (valid until the next call) */
int pyaeg_u64(PyObject *obj, const char *what, int allow_zero, uint64_t *out);
int pyaeg_gpu(PyObject *obj, int *gpu);
int pyaeg_timeout(PyObject *obj, double *seconds);           /* None -> -1 */
int pyaeg_handle(PyObject *obj, aeg_handle_t *handle);
PyObject *pyaeg_handle_bytes(const aeg_handle_t *handle);
int pyaeg_id_list(PyObject *seq, const char *what, uint32_t max, uint32_t **ids, size_t *n);
int pyaeg_u64_list(PyObject *seq, const char *what, uint64_t **v, size_t *n);  /* PyMem_Free *v */
int pyaeg_dict_set(PyObject *dict, const char *key, PyObject *value);  /* steals value */
int pyaeg_path(PyObject *obj, PyObject **bytes);    /* str, bytes or os.PathLike -> new bytes */

/*
 * pyaeg_wait - run a waiting library call in slices with the GIL released,
 * so Ctrl-C and other threads get through: @fn(arg, slice_ms) returns
 * AEG_ETIMEDOUT for a slice that ran out. @seconds < 0 waits forever.
 * Returns 0, the library's code (no exception set; AEG_ETIMEDOUT when
 * @seconds ran out), or PYAEG_SIGNALLED with a signal handler's exception set.
 */
#define PYAEG_SIGNALLED 1
int pyaeg_wait(int (*fn)(void *arg, int timeout_ms), void *arg, double seconds);
/* pyaeg_wait_handle - aeg_event_wait_handle through pyaeg_wait; a complete event is answered keeping the GIL. */
int pyaeg_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, double seconds);

/* The runtime: one device for the process, opened at first use (py_runtime.c). */
int pyaeg_device(aeg_device_t **dev);       /* -1 with an exception set */
/*
 * The runtime lock, taken with the GIL released. Not reentrant: no Python
 * code may run while it is held (no Python object made, no exception
 * raised, no signal checked), as a dealloc or a signal handler would take
 * it again.
 */
void pyaeg_lock(void);
void pyaeg_unlock(void);
/* After fork(): registers the child's hand-off once (module init). */
void pyaeg_fork_init(void);
/* -1 with AegaeonError EPERM in a fork() child of a process that used the module; else 0. */
int pyaeg_inherited_check(void);
/*
 * Py_BEGIN/END_ALLOW_THREADS for the module: a holder of the runtime lock
 * marks itself parked while it waits for the GIL, so that interpreter
 * finalization can take the lock over from a daemon thread that Python
 * stops there for good.
 */
void pyaeg_restore_thread(PyThreadState *save);
#define PYAEG_BEGIN_ALLOW_THREADS { PyThreadState *pyaeg_save_ = PyEval_SaveThread();
#define PYAEG_END_ALLOW_THREADS pyaeg_restore_thread(pyaeg_save_); }
/*
 * Inside an aegaeon job (attached to its agent): pyaeg_job_slab leases @bytes
 * of GPU @gpu's job slab and returns 1; 0 outside a job; -1 with an
 * exception. pyaeg_job_pool gives the job's pool (NULL with an exception).
 */
int pyaeg_job_slab(int gpu, uint64_t bytes, aeg_slab_t **slab);
aeg_pool_t *pyaeg_job_pool(void);
/*
 * A load through the module's session: a job's agent reuses a model the job
 * holds already (then not owned). It counts as an object of the module
 * (and a view of its GPU) until pyaeg_load_drop, which releases the model
 * (@release, when this process loaded it) or closes the handle (the chunks
 * stay). pyaeg_load returns -1 with an exception.
 */
struct pyaeg_load {
	aeg_model_t *m;
	int gpu;
	int host;                       /* the host backend: views are host memory */
};
int pyaeg_load(const char *path, int gpu, uint64_t chunk_bytes, enum aeg_prefetch_format format,
	       const struct aeg_slice *slice, struct pyaeg_load *l);
void pyaeg_load_drop(struct pyaeg_load *l, int release);
struct pyaeg_res *pyaeg_res_new(void);      /* NULL with MemoryError */
void pyaeg_res_free(struct pyaeg_res *res); /* destroys what it holds; GIL released inside */
void pyaeg_object_born(void);
void pyaeg_object_gone(void);

/* DeviceArray (py_array.c). */
extern PyObject *pyaeg_array_type;
int pyaeg_array_init_type(PyObject *module);
/*
 * A view of @bytes at @ptr on @gpu; @owner (may be NULL) is kept alive by
 * the view and *@views (may be NULL) counts the views alive. @dtype is a
 * safetensors dtype name; @shape NULL means one dimension of @bytes / item.
 */
PyObject *pyaeg_array_new(PyObject *owner, Py_ssize_t *views, void *ptr, uint64_t bytes, int gpu,
			  int host, const char *dtype, int ndim, const uint64_t *shape, uint64_t id);
/* What DeviceArray @obj keeps alive (borrowed; NULL for none or another type). */
PyObject *pyaeg_array_owner(PyObject *obj);

/*
 * What still uses an object's C resources besides its owner: close()
 * refuses (AegaeonError EBUSY naming them) and frees nothing while any is
 * left. views: DeviceArrays of its memory alive; calls: its methods running,
 * which may give up the GIL or call back into Python code (an __index__, a
 * collection) that calls close(); caches: KVCaches built on it (a slab's, a
 * pool's). Changed with the GIL held.
 */
struct pyaeg_users {
	Py_ssize_t views;
	Py_ssize_t calls;
	Py_ssize_t caches;
};
/* 0 when nothing uses @u; else -1 with AegaeonError EBUSY, "@what: ..." naming what and what to do. */
int pyaeg_users_busy(const struct pyaeg_users *u, const char *what);
/*
 * One call begins to use @res (an object's resource, or NULL when it is
 * closed, with the exception set): counted in @u while not NULL. Returns @res.
 */
static inline void *pyaeg_users_enter(struct pyaeg_users *u, void *res)
{
	if (res != NULL)
		u->calls++;
	return res;
}

/* The call that pyaeg_users_enter counted has returned. */
static inline void pyaeg_users_leave(struct pyaeg_users *u)
{
	u->calls--;
}

/* Classes (py_slab.c, py_pinned.c, py_kv.c). */
extern PyObject *pyaeg_slab_type;
extern PyObject *pyaeg_pool_type;
int pyaeg_slab_init_type(PyObject *module);
int pyaeg_pool_init_type(PyObject *module);
int pyaeg_kv_init_type(PyObject *module);
/*
 * The C object behind a SlabAllocator / PinnedPool a KVCache is built on
 * (NULL with TypeError, or ValueError if closed), counted in its users'
 * caches until pyaeg_*_unhold: meanwhile its close() is EBUSY.
 */
aeg_slab_t *pyaeg_slab_hold(PyObject *obj);
void pyaeg_slab_unhold(PyObject *obj);
aeg_pool_t *pyaeg_pool_hold(PyObject *obj);
void pyaeg_pool_unhold(PyObject *obj);
/* The base address of a PinnedPool's buffers in this process. */
uintptr_t pyaeg_pool_base(PyObject *obj);
/* A memoryview of @bytes at @offset of a PinnedPool's buffer area. */
PyObject *pyaeg_pool_view(PyObject *pool, uint64_t offset, uint64_t bytes);

/*
 * Tensor-parallel slices (py_slice.c): the tp_* arguments of open_model and
 * load_model (NULL or None where not given) as a spec, checked.
 */
struct pyaeg_slice_args {
	PyObject *rank, *world, *preset, *rules;
	int uneven;
};
struct pyaeg_slice {
	struct aeg_slice spec;
	struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES];
	char patterns[AEG_SLICE_MAX_RULES][AEG_SLICE_PATTERN_MAX];
};
/* *@spec: &@ps->spec, or NULL when no tp_* argument was given. 0, or -1 with TypeError or ValueError. */
int pyaeg_slice_from_args(const struct pyaeg_slice_args *a, struct pyaeg_slice *ps, const struct aeg_slice **spec);
/* A spec as {"rank", "world", "preset", "rules": [(pattern, dim or None)], "uneven"}; None for NULL. */
PyObject *pyaeg_slice_dict(const struct aeg_slice *spec);

/* Models (py_model.c): Model, open_model, load_model, load_safetensors. */
int pyaeg_model_init(PyObject *module);
/* The chunk dicts of a load: the seed's four keys, "file", "file_offset" and "tensors". */
PyObject *pyaeg_chunk_dicts(const aeg_model_t *m);
/* The submodule aegaeon_native.torch, Python source built into the module (py_torch.c). */
int pyaeg_torch_init(PyObject *module);

/* Docstrings of the context-manager methods the classes share (signatures for inspect). */
#define PYAEG_ENTER_DOC "__enter__($self, /)\n--\n\nReturn self."
#define PYAEG_EXIT_DOC "__exit__($self, /, *exc_info)\n--\n\nclose(); an exception in the block propagates."

#endif

/* KVCache's object and the functions py_kv.c shares with py_kv_seed.c (the seed's request API); never installed. */
#ifndef AEGAEON_PY_KV_H
#define AEGAEON_PY_KV_H

#include "py_internal.h"

typedef struct {
	PyObject_HEAD
	struct pyaeg_res *res;          /* res->kv, res->stream (swap-outs), res->stream_in; NULL once closed */
	aeg_device_t *dev;
	int gpu;
	int host;
	uint64_t block_bytes;
	uint32_t layers, parts;
	int gpu_per_layer;              /* GPU blocks in per-layer tensors: not contiguous */
	uint32_t gpu_blocks;
	uint32_t host_blocks;
	PyObject *slab;                 /* SlabAllocator the GPU blocks come from (None: tensors) */
	PyObject *pool;                 /* PinnedPool the host blocks come from (None: tensors) */
	int holds_slab, holds_pool;     /* counted in their users until the cache is destroyed */
	/*
	 * {handle: None, or True while a wait_all() waits for it}: the events
	 * not released yet. A call that takes a handle (marks it True, or
	 * deletes it) owns it: no other call waits for or releases it, as a
	 * released event is reused by later calls.
	 */
	PyObject *pending;
	PyObject *reqs;                 /* seed API: {req_id: [nbytes, host_ids, gpu_ids|None, out_handle|None]} */
	struct pyaeg_users users;       /* gpu_block() views, calls: close() waits for none */
} KVObject;

aeg_kv_t *pykv_open(KVObject *k);                 /* NULL with ValueError once closed */
/* The cache for one call (close() is EBUSY until pykv_done); NULL with ValueError once closed. */
aeg_kv_t *pykv_use(KVObject *k);
void pykv_done(KVObject *k);
PyObject *pykv_blocks_alloc(KVObject *k, PyObject *n_obj, int gpu_side);
PyObject *pykv_blocks_free(KVObject *k, PyObject *seq, int gpu_side);
/* A swap either way: the handle, (handle, layer handles), or None with @wait. */
PyObject *pykv_swap(KVObject *k, int out, PyObject *src_seq, PyObject *dst_seq, PyObject *layers, int wait);
PyObject *pykv_wait_all(PyObject *self, PyObject *unused);

/* py_kv_seed.c: the seed's methods, listed in KVCache's method table. */
PyObject *pykv_store(PyObject *self, PyObject *args, PyObject *kw);
PyObject *pykv_ensure(PyObject *self, PyObject *req_id);
PyObject *pykv_swapout_all(PyObject *self, PyObject *unused);
PyObject *pykv_load(PyObject *self, PyObject *req_id);
PyObject *pykv_drop(PyObject *self, PyObject *req_id);

#endif

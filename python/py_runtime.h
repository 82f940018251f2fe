/*
 * The aegaeon_native runtime's state and calls, for the module's functions
 * (aegaeon_native.c) and the runtime (py_runtime.c); the other files use
 * what py_internal.h declares. Never installed.
 */
#ifndef AEGAEON_PY_RUNTIME_H
#define AEGAEON_PY_RUNTIME_H

#include "py_internal.h"

/* Per-GPU state of the module's own work. */
struct gpu_state {
	aeg_stream_t *stream;           /* records create_event_handle_bytes events */
	Py_ssize_t views;               /* chunk views and tensor loads alive */
};

struct mod_event {
	struct mod_event *next;
	aeg_event_t *ev;
	aeg_handle_t handle;
};

/* One runtime per process, under the runtime lock. */
struct pyaeg_runtime {
	int kind_set;                   /* set_device()/configure() chose the backend */
	enum aeg_device_kind kind;
	aeg_session_t *sess;            /* where models load: the job's agent, or this process */
	aeg_device_t *dev;              /* the session's */
	aeg_job_t *job;                 /* the session's job; NULL outside one */
	int gpu_count;                  /* GPUs this process sees */
	struct gpu_state *gpus;
	struct mod_event *events;
	uint64_t nevents;
	struct pyaeg_res *res;          /* newest first */
	long objects;                   /* Python objects holding C resources */
	char prefetch_slab[64];         /* configure(prefetch_slab=...) */
	int prefetch_threads;           /* configure(prefetch_threads=...); 0: the config's */
	int waits;                      /* waits running with the GIL released */
	int atexit_set;
	int attach;                     /* configure(attach=): -1 auto ($AEGAEON_SOCKET), 0, 1 */
	int inherited;                  /* a fork() child of a process that used the runtime: hands off */
};
extern struct pyaeg_runtime pyaeg_rt;

/* The runtime lock, taken without the GIL; @finalizer: the thread finalizing the interpreter. */
void pyaeg_rtlock_take(int finalizer);
void pyaeg_rtlock_give(void);
int pyaeg_is_finalizer(void);

/*
 * Under the runtime lock, where no Python code may run: they raise nothing
 * and return 0 (an index) or the library's code with this thread's detail
 * set, for pyaeg_raise once the lock is given back.
 */
int pyaeg_busy_locked(void);                    /* anything still uses the device */
void pyaeg_engine_settings(struct aeg_prefetch_config *engine, const struct aeg_prefetch_config **use);
int pyaeg_device_locked(aeg_device_t **dev);    /* opens the session at first use */
int pyaeg_check_gpu_locked(int gpu);
int pyaeg_job_index_locked(int gpu);
void pyaeg_drop_events_locked(void);
void pyaeg_teardown_locked(int close_device);
int pyaeg_stream_locked(int gpu, aeg_stream_t **stream);

#endif

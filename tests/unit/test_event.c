/* Events on the host backend: record, wait, failure, handles across processes, the handle cache. */
#include <dirent.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "device_internal.h"
#include "internal.h"
#include "testutil.h"

static aeg_device_t *open_host(void)
{
	aeg_device_t *dev = NULL;

	unsetenv("AEGAEON_HOST_GPUS");
	unsetenv("AEGAEON_HOST_PCI_BUS_IDS");
	unsetenv("AEGAEON_SOCKET");     /* waits by handle would ask a job's agent first */
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	return dev;
}

/* A host function that holds its stream until the semaphore is posted. */
static void block_fn(void *arg)
{
	while (sem_wait(arg) != 0)
		;
}

static void sleep_fn(void *arg)
{
	usleep((useconds_t)(uintptr_t)arg * 1000);
}

static uint64_t ms_since(uint64_t start_ns)
{
	return (aeg_now_ns() - start_ns) / 1000000;
}

static void record_query_wait(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL, *bad = NULL;
	aeg_handle_t h;
	uint64_t t0;
	sem_t gate;

	assert_int_equal(sem_init(&gate, 0, 0), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	/* Never recorded: complete. */
	assert_int_equal(aeg_event_query(ev), 0);
	assert_int_equal(aeg_event_wait(ev, 0), 0);
	assert_int_equal(aeg_event_wait(ev, -1), 0);

	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, block_fn, &gate), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_query(ev), AEG_EBUSY);
	assert_int_equal(aeg_event_wait(ev, 0), AEG_ETIMEDOUT);
	t0 = aeg_now_ns();
	assert_int_equal(aeg_event_wait(ev, 60), AEG_ETIMEDOUT);
	assert_true(ms_since(t0) >= 59);
	assert_non_null(strstr(aeg_error_detail(), "60 ms"));
	assert_int_equal(aeg_event_wait_handle(dev, &h, 20), AEG_ETIMEDOUT);
	assert_int_equal(sem_post(&gate), 0);
	assert_int_equal(aeg_event_wait(ev, 5000), 0);
	assert_int_equal(aeg_event_query(ev), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), 0);

	assert_int_equal(aeg_event_create(dev, 1, &bad, &h), AEG_ENODEV);
	assert_null(bad);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	sem_destroy(&gate);
	aeg_device_close(dev);
}

static void record_needs_matching_stream(void **state)
{
	aeg_device_t *dev, *other;
	aeg_stream_t *s0 = NULL, *s1 = NULL, *so = NULL;
	aeg_event_t *ev = NULL;

	setenv("AEGAEON_HOST_GPUS", "2", 1);
	assert_int_equal(aeg_device_open(&dev, AEG_DEVICE_HOST), 0);
	unsetenv("AEGAEON_HOST_GPUS");
	other = open_host();
	assert_int_equal(aeg_event_create(dev, 0, &ev, NULL), 0);
	assert_int_equal(aeg_stream_create(dev, 1, &s1), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s0), 0);
	assert_int_equal(aeg_stream_create(other, 0, &so), 0);
	assert_int_equal(aeg_event_record(ev, s1), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "GPU 1"));
	assert_int_equal(aeg_event_record(ev, so), AEG_EINVAL);
	assert_int_equal(aeg_event_record(ev, NULL), AEG_EINVAL);
	assert_int_equal(aeg_event_record(ev, s0), 0);
	assert_int_equal(aeg_event_wait(ev, 5000), 0);
	assert_int_equal(aeg_stream_destroy(so), 0);
	assert_int_equal(aeg_stream_destroy(s0), 0);
	assert_int_equal(aeg_stream_destroy(s1), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	aeg_device_close(other);
	aeg_device_close(dev);
}

struct waiter {
	aeg_event_t *ev;
	aeg_device_t *dev;
	const aeg_handle_t *handle;
	int timeout_ms;                 /* 0: 10 s */
	int result;
	char detail[256];               /* the error detail the wait left */
	pid_t tid;                      /* set before it waits */
};

/*
 * Until @w's thread sleeps (its state in /proc is S): inside the wait, the
 * only place it blocks. At most 10 s.
 */
static void until_waiting(struct waiter *w)
{
	for (int i = 0; i < 10000; i++) {
		pid_t tid = __atomic_load_n(&w->tid, __ATOMIC_ACQUIRE);
		char path[64], buf[256], *p;
		FILE *f;

		if (tid != 0) {
			snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
			f = fopen(path, "r");
			assert_non_null(f);
			assert_non_null(fgets(buf, sizeof(buf), f));
			fclose(f);
			p = strrchr(buf, ')');
			if (p != NULL && p[1] == ' ' && p[2] == 'S')
				return;
		}
		usleep(1000);
	}
	fail_msg("the waiting thread did not block in 10 s");
}

static void *wait_thread(void *arg)
{
	struct waiter *w = arg;

	int timeout_ms = w->timeout_ms ? w->timeout_ms : 10000;

	__atomic_store_n(&w->tid, (pid_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
	if (w->handle != NULL)
		w->result = aeg_event_wait_handle(w->dev, w->handle, timeout_ms);
	else
		w->result = aeg_event_wait(w->ev, timeout_ms);
	snprintf(w->detail, sizeof(w->detail), "%s", aeg_error_detail());
	return NULL;
}

static void fail_then_wait(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL;
	struct waiter w;
	aeg_handle_t h;
	pthread_t t;
	sem_t gate;

	assert_int_equal(sem_init(&gate, 0, 0), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_event_fail(ev, 5), AEG_EINVAL);
	assert_int_equal(aeg_event_fail(ev, 0), AEG_EINVAL);
	assert_int_equal(aeg_event_fail(ev, AEG_ECANCELED), 0);
	assert_int_equal(aeg_event_query(ev), AEG_ECANCELED);
	assert_int_equal(aeg_event_wait(ev, 0), AEG_ECANCELED);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 100), AEG_ECANCELED);

	/* Recording again clears the failure. */
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, block_fn, &gate), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_query(ev), AEG_EBUSY);

	/* A failure wakes a waiter of a pending event at once. */
	w = (struct waiter){ .ev = ev };
	assert_int_equal(pthread_create(&t, NULL, wait_thread, &w), 0);
	usleep(20000);
	assert_int_equal(aeg_event_fail(ev, AEG_EIO), 0);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(w.result, AEG_EIO);

	assert_int_equal(sem_post(&gate), 0);
	assert_int_equal(aeg_stream_sync(s), 0);
	assert_int_equal(aeg_event_wait(ev, 0), AEG_EIO);   /* completion does not clear it */
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_wait(ev, 5000), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	sem_destroy(&gate);
	aeg_device_close(dev);
}

static void own_handle_resolves_locally(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_event_t *ev = NULL;
	uint64_t opens = 9, cached = 9;
	aeg_handle_t h;

	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 100), 0);
	aeg_device_event_stats(dev, &opens, &cached);
	assert_int_equal(opens, 0);
	assert_int_equal(cached, 0);
	assert_int_equal(aeg_event_close_handle(dev, &h), 0);   /* nothing cached: no-op */
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	/* Its descriptor is gone with it: the handle no longer opens. */
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_EBADF);
	aeg_device_close(dev);
}

static void destroy_during_wait_by_handle(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL;
	struct waiter w;
	aeg_handle_t h;
	pthread_t t;
	sem_t gate;

	assert_int_equal(sem_init(&gate, 0, 0), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, block_fn, &gate), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	w = (struct waiter){ .dev = dev, .handle = &h };
	assert_int_equal(pthread_create(&t, NULL, wait_thread, &w), 0);
	until_waiting(&w);
	assert_int_equal(aeg_event_destroy(ev), 0);
	assert_int_equal(sem_post(&gate), 0);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(w.result, 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	sem_destroy(&gate);
	aeg_device_close(dev);
}

static void cache_reuse(void **state)
{
	aeg_device_t *owner = open_host(), *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL;
	uint64_t opens, cached;
	aeg_handle_t h;
	int fds;

	/* A second device does not know the owner's events: it opens the handle. */
	assert_int_equal(aeg_event_create(owner, 0, &ev, &h), 0);
	assert_int_equal(aeg_stream_create(owner, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, sleep_fn, (void *)(uintptr_t)30), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_ETIMEDOUT);
	aeg_device_event_stats(dev, &opens, &cached);
	assert_int_equal(opens, 1);
	assert_int_equal(cached, 1);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 5000), 0);
	for (int i = 0; i < 100; i++)
		assert_int_equal(aeg_event_wait_handle(dev, &h, 0), 0);
	aeg_device_event_stats(dev, &opens, &cached);
	assert_int_equal(opens, 1);
	assert_int_equal(cached, 1);

	assert_int_equal(aeg_event_close_handle(dev, &h), 0);
	aeg_device_event_stats(dev, &opens, &cached);
	assert_int_equal(cached, 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), 0);
	aeg_device_event_stats(dev, &opens, &cached);
	assert_int_equal(opens, 2);
	assert_int_equal(cached, 1);

	/* The cached opening sees a failure through the shared page. */
	assert_int_equal(aeg_event_fail(ev, AEG_ECANCELED), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_ECANCELED);

	/* Closing the device closes its cached openings. */
	fds = count_fds();
	aeg_device_close(dev);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	assert_int_equal(count_fds(), fds - 1);    /* the event's memfd */
	aeg_device_close(owner);
}

static void garbage_handles(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_handle_t h, mem;
	uint64_t opens, cached;
	void *p = NULL;

	memset(&h, 0, sizeof(h));
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_EBADF);
	for (int i = 0; i < AEG_HANDLE_BYTES; i++)
		h.bytes[i] = (unsigned char)(rand() | 1);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_EBADF);
	assert_int_equal(aeg_mem_alloc(dev, 0, 4096, &p), 0);
	assert_int_equal(aeg_mem_export(dev, p, &mem), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &mem, 0), AEG_EBADF);
	/* A memory handle with the event magic: the size gives it away. */
	memcpy(mem.bytes, "AEGE", 4);
	assert_int_equal(aeg_event_wait_handle(dev, &mem, 0), AEG_EBADF);
	assert_int_equal(aeg_event_wait_handle(dev, NULL, 0), AEG_EINVAL);
	aeg_device_event_stats(dev, &opens, &cached);
	assert_int_equal(opens, 0);
	assert_int_equal(cached, 0);
	assert_int_equal(aeg_mem_free(dev, 0, p), 0);
	aeg_device_close(dev);
}

static void stream_waits_for_event(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *a = NULL, *b = NULL;
	aeg_event_t *ev = NULL;
	char from[6] = "after", to[6] = "";
	sem_t gate;

	assert_int_equal(sem_init(&gate, 0, 0), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, NULL), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &a), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &b), 0);
	assert_int_equal(aeg_stream_launch_host_fn(a, block_fn, &gate), 0);
	assert_int_equal(aeg_event_record(ev, a), 0);
	assert_int_equal(aeg_stream_wait_event(b, ev), 0);
	assert_int_equal(aeg_memcpy_async(b, to, from, sizeof(from)), 0);
	usleep(30000);
	assert_string_equal(to, "");
	assert_int_equal(sem_post(&gate), 0);
	assert_int_equal(aeg_stream_sync(b), 0);
	assert_string_equal(to, "after");
	/* An event already complete lets the stream run on. */
	assert_int_equal(aeg_stream_wait_event(b, ev), 0);
	assert_int_equal(aeg_stream_sync(b), 0);
	assert_int_equal(aeg_stream_destroy(a), 0);
	assert_int_equal(aeg_stream_destroy(b), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	sem_destroy(&gate);
	aeg_device_close(dev);
}

/* Child side: wait on a parent's handle that is still pending, then complete. */
static int child_waits(const aeg_handle_t *h, int expect)
{
	aeg_device_t *dev = NULL;
	int err;

	if (aeg_device_open(&dev, AEG_DEVICE_HOST) < 0)
		return 10;
	if (expect == 0 && aeg_event_wait_handle(dev, h, 0) != AEG_ETIMEDOUT)
		return 11;
	err = aeg_event_wait_handle(dev, h, 10000);
	aeg_device_close(dev);
	return err == expect ? 0 : 12;
}

static void child_waits_on_parent(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL, *failed = NULL;
	aeg_handle_t h, hf;
	int status;
	pid_t pid, pid2;

	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, sleep_fn, (void *)(uintptr_t)150), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		child_exit(child_waits(&h, 0));

	/* The failure code reaches other processes too. */
	assert_int_equal(aeg_event_create(dev, 0, &failed, &hf), 0);
	assert_int_equal(aeg_event_fail(failed, AEG_ECANCELED), 0);
	pid2 = fork();
	assert_true(pid2 >= 0);
	if (pid2 == 0)
		child_exit(child_waits(&hf, AEG_ECANCELED));

	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(waitpid(pid2, &status, 0), pid2);
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(failed), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	aeg_device_close(dev);
}

/* Child side: own an event recorded 150 ms late; stay alive until told. */
static int child_owns(int to_parent, int from_parent)
{
	aeg_device_t *dev = NULL;
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL;
	aeg_handle_t h;
	char c;

	if (aeg_device_open(&dev, AEG_DEVICE_HOST) < 0 || aeg_event_create(dev, 0, &ev, &h) < 0 ||
	    aeg_stream_create(dev, 0, &s) < 0)
		return 10;
	if (aeg_stream_launch_host_fn(s, sleep_fn, (void *)(uintptr_t)150) < 0 ||
	    aeg_event_record(ev, s) < 0)
		return 11;
	if (write(to_parent, &h, sizeof(h)) != sizeof(h))
		return 12;
	if (read(from_parent, &c, 1) != 1)
		return 13;
	aeg_stream_destroy(s);
	aeg_event_destroy(ev);
	aeg_device_close(dev);
	return 0;
}

/* A child that owns an event (child_owns); *up_rd gives its handle, a byte on *down_wr lets it go. */
static pid_t start_owner(int *up_rd, int *down_wr)
{
	int up[2], down[2];
	pid_t pid;

	assert_int_equal(pipe(up), 0);
	assert_int_equal(pipe(down), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		close(up[0]);
		close(down[1]);
		child_exit(child_owns(up[1], down[0]));
	}
	close(up[1]);
	close(down[0]);
	*up_rd = up[0];
	*down_wr = down[1];
	return pid;
}

static void parent_waits_on_child(void **state)
{
	aeg_device_t *dev = open_host();
	int up[2], down[2], status;
	uint64_t t0, opens;
	aeg_handle_t h;
	pid_t pid;

	pid = start_owner(&up[0], &down[1]);
	assert_int_equal(read(up[0], &h, sizeof(h)), sizeof(h));
	t0 = aeg_now_ns();
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_ETIMEDOUT);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 10000), 0);
	assert_true(ms_since(t0) < 5000);
	aeg_device_event_stats(dev, &opens, NULL);
	assert_int_equal(opens, 1);
	assert_int_equal(write(down[1], "x", 1), 1);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_int_equal(WEXITSTATUS(status), 0);
	/* The cached opening outlives its owner; a fresh open does not. */
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), 0);
	assert_int_equal(aeg_event_close_handle(dev, &h), 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_EBADF);
	assert_non_null(strstr(aeg_error_detail(), "gone"));
	close(up[0]);
	close(down[1]);
	aeg_device_close(dev);
}

/*
 * aeg_event_query_handle answers from what this process resolved already:
 * ENOENT for a handle never waited on (it opens nothing), then pending or
 * complete; a local event at once; no open is counted by a query.
 */
static void query_handle_never_waits(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *own = NULL;
	int up[2], down[2], status;
	aeg_handle_t h, hown;
	uint64_t opens;
	sem_t gate;
	pid_t pid;

	pid = start_owner(&up[0], &down[1]);
	assert_int_equal(read(up[0], &h, sizeof(h)), sizeof(h));
	assert_int_equal(aeg_event_query_handle(dev, &h), AEG_ENOENT);
	aeg_device_event_stats(dev, &opens, NULL);
	assert_int_equal(opens, 0);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 0), AEG_ETIMEDOUT);  /* opens it */
	assert_int_equal(aeg_event_query_handle(dev, &h), AEG_EBUSY);
	assert_int_equal(aeg_event_wait_handle(dev, &h, 10000), 0);
	assert_int_equal(aeg_event_query_handle(dev, &h), 0);
	aeg_device_event_stats(dev, &opens, NULL);
	assert_int_equal(opens, 1);
	assert_int_equal(aeg_event_close_handle(dev, &h), 0);
	assert_int_equal(aeg_event_query_handle(dev, &h), AEG_ENOENT);
	assert_int_equal(write(down[1], "x", 1), 1);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_int_equal(WEXITSTATUS(status), 0);

	/* This process's own event: pending behind a held stream, then complete. */
	assert_int_equal(sem_init(&gate, 0, 0), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_event_create(dev, 0, &own, &hown), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, block_fn, &gate), 0);
	assert_int_equal(aeg_event_record(own, s), 0);
	assert_int_equal(aeg_event_query_handle(dev, &hown), AEG_EBUSY);
	assert_int_equal(sem_post(&gate), 0);
	assert_int_equal(aeg_stream_sync(s), 0);
	assert_int_equal(aeg_event_query_handle(dev, &hown), 0);
	assert_int_equal(aeg_event_query_handle(NULL, &hown), AEG_EINVAL);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(own), 0);
	sem_destroy(&gate);
	close(up[0]);
	close(down[1]);
	aeg_device_close(dev);
}

/*
 * An armed event is pending until recorded, for waits here, by handle in
 * another process, and by another aeg_device_t of this process; a failure
 * releases them all with its code.
 */
static void armed_until_recorded(void **state)
{
	aeg_device_t *dev = open_host(), *other = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL, *cancelled = NULL;
	aeg_handle_t h, hc, unknown;
	struct waiter w, wh, wc;
	pthread_t t, th, tc;
	int status;
	pid_t pid, pid2;

	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_event_create(dev, 0, &cancelled, &hc), 0);
	assert_int_equal(aeg_event_arm(NULL), AEG_EINVAL);
	assert_int_equal(aeg_event_arm(ev), 0);
	assert_int_equal(aeg_event_arm(ev), 0);         /* once is enough: one record completes it */
	assert_int_equal(aeg_event_arm(cancelled), 0);

	assert_int_equal(aeg_event_query(ev), AEG_EBUSY);
	assert_int_equal(aeg_event_wait(ev, 0), AEG_ETIMEDOUT);
	assert_int_equal(aeg_event_wait(ev, 30), AEG_ETIMEDOUT);
	assert_non_null(strstr(aeg_error_detail(), "not recorded"));
	assert_int_equal(aeg_event_wait_handle(dev, &h, 30), AEG_ETIMEDOUT);
	assert_int_equal(aeg_event_wait_handle(other, &h, 30), AEG_ETIMEDOUT);
	assert_int_equal(aeg_event_wait_recorded(dev, &h, 0), AEG_ETIMEDOUT);
	memset(&unknown, 0, sizeof(unknown));
	assert_int_equal(aeg_event_wait_recorded(dev, &unknown, 0), AEG_ENOENT);
	assert_int_equal(aeg_event_wait_recorded(other, &h, 0), AEG_ENOENT);    /* an opening, not its own */
	/* A stream must never wait on work not queued yet. */
	assert_int_equal(aeg_stream_wait_event(s, ev), AEG_EBUSY);

	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		child_exit(child_waits(&h, 0));
	pid2 = fork();
	assert_true(pid2 >= 0);
	if (pid2 == 0)
		child_exit(child_waits(&hc, AEG_ECANCELED));
	w = (struct waiter){ .ev = ev };
	wh = (struct waiter){ .dev = other, .handle = &h };
	wc = (struct waiter){ .ev = cancelled };
	assert_int_equal(pthread_create(&t, NULL, wait_thread, &w), 0);
	assert_int_equal(pthread_create(&th, NULL, wait_thread, &wh), 0);
	assert_int_equal(pthread_create(&tc, NULL, wait_thread, &wc), 0);
	usleep(100000);

	assert_int_equal(aeg_stream_launch_host_fn(s, sleep_fn, (void *)(uintptr_t)50), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_wait_recorded(dev, &h, 0), 0);
	assert_int_equal(aeg_event_fail(cancelled, AEG_ECANCELED), 0);
	assert_int_equal(aeg_event_wait_recorded(dev, &hc, 0), AEG_ECANCELED);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(pthread_join(tc, NULL), 0);
	assert_int_equal(w.result, 0);
	assert_int_equal(wh.result, 0);
	assert_int_equal(wc.result, AEG_ECANCELED);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(waitpid(pid2, &status, 0), pid2);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);

	/* Recorded, it is an ordinary event again; a new arm holds it anew. */
	assert_int_equal(aeg_event_query(ev), 0);
	assert_int_equal(aeg_stream_wait_event(s, ev), 0);
	assert_int_equal(aeg_event_arm(ev), 0);
	assert_int_equal(aeg_event_wait_handle(other, &h, 0), AEG_ETIMEDOUT);
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_wait_handle(other, &h, 5000), 0);

	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(cancelled), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	aeg_device_close(other);
	aeg_device_close(dev);
}

/*
 * An armed event recorded during a wait on a stream that stays blocked: the
 * backend gets what is left of the time, but the timeout names the time the
 * caller gave (it named what was left: "after 279 ms" for 300).
 */
static void timeout_names_time_asked(void **state)
{
	aeg_device_t *dev = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL;
	struct waiter w;
	aeg_handle_t h;
	pthread_t t;
	sem_t gate;

	assert_int_equal(sem_init(&gate, 0, 0), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_stream_launch_host_fn(s, block_fn, &gate), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_event_arm(ev), 0);
	w = (struct waiter){ .ev = ev, .timeout_ms = 300 };
	assert_int_equal(pthread_create(&t, NULL, wait_thread, &w), 0);
	until_waiting(&w);
	usleep(20000);                  /* 20 ms or more of the 300 gone before the record */
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(w.result, AEG_ETIMEDOUT);
	assert_string_equal(w.detail, "event not complete after 300 ms");
	assert_int_equal(sem_post(&gate), 0);
	assert_int_equal(aeg_stream_sync(s), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	sem_destroy(&gate);
	aeg_device_close(dev);
}

/*
 * Core waits on the backend alone, with or without a job around: a wait by
 * handle never looks for an agent ($AEGAEON_SOCKET names one that does not
 * run here), only a resolver installed on the device (a job's) is asked.
 */
static void waits_need_no_agent(void **state)
{
	aeg_device_t *dev = open_host(), *other = open_host();
	aeg_stream_t *s = NULL;
	aeg_event_t *ev = NULL;
	aeg_handle_t h;

	assert_int_equal(setenv("AEGAEON_SOCKET", "/nonexistent/agent.sock", 1), 0);
	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	assert_int_equal(aeg_event_wait_handle(other, &h, 5000), 0);
	assert_int_equal(aeg_event_query_handle(other, &h), 0);
	assert_int_equal(unsetenv("AEGAEON_SOCKET"), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	aeg_device_close(other);
	aeg_device_close(dev);
}

struct resolver {
	int calls;
	int answer;
	aeg_handle_t last;
};

static int count_resolve(void *ctx, const aeg_handle_t *handle, int timeout_ms)
{
	struct resolver *r = ctx;

	(void)timeout_ms;
	r->calls++;
	r->last = *handle;
	return r->answer;
}

/*
 * A device's resolver is asked once per handle of another process, before
 * its first wait: its error is the wait's, its AEG_ENOENT leaves the wait to
 * the backend, and once a wait went through, later ones do not ask again.
 * Handles of the device's own events never reach it.
 */
static void resolver_asked_first(void **state)
{
	aeg_device_t *dev = open_host(), *other = open_host();
	struct resolver r = { .answer = AEG_ECANCELED };
	aeg_stream_t *s = NULL, *s2 = NULL;
	aeg_event_t *ev = NULL, *mine = NULL;
	aeg_handle_t h, hm;

	assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
	assert_int_equal(aeg_event_create(dev, 0, &ev, &h), 0);
	assert_int_equal(aeg_event_record(ev, s), 0);
	aeg_device_set_event_resolver(other, count_resolve, &r);

	assert_int_equal(aeg_event_wait_handle(other, &h, 5000), AEG_ECANCELED);
	assert_int_equal(r.calls, 1);
	assert_memory_equal(&r.last, &h, sizeof(h));
	r.answer = AEG_ENOENT;
	assert_int_equal(aeg_event_wait_handle(other, &h, 5000), 0);
	assert_int_equal(r.calls, 2);
	assert_int_equal(aeg_event_wait_handle(other, &h, 5000), 0);
	assert_int_equal(r.calls, 2);

	assert_int_equal(aeg_stream_create(other, 0, &s2), 0);
	assert_int_equal(aeg_event_create(other, 0, &mine, &hm), 0);
	assert_int_equal(aeg_event_record(mine, s2), 0);
	assert_int_equal(aeg_event_wait_handle(other, &hm, 5000), 0);
	assert_int_equal(r.calls, 2);

	aeg_device_set_event_resolver(other, NULL, NULL);
	assert_int_equal(aeg_event_destroy(mine), 0);
	assert_int_equal(aeg_stream_destroy(s2), 0);
	assert_int_equal(aeg_stream_destroy(s), 0);
	assert_int_equal(aeg_event_destroy(ev), 0);
	aeg_device_close(other);
	aeg_device_close(dev);
}

static void no_fd_leak(void **state)
{
	int before = count_fds();

	for (int round = 0; round < 3; round++) {
		aeg_device_t *dev = open_host(), *other = open_host();
		aeg_stream_t *s = NULL;
		aeg_event_t *evs[8];
		aeg_handle_t h[8];

		assert_int_equal(aeg_stream_create(dev, 0, &s), 0);
		for (int i = 0; i < 8; i++) {
			assert_int_equal(aeg_event_create(dev, 0, &evs[i], &h[i]), 0);
			assert_int_equal(aeg_event_record(evs[i], s), 0);
			assert_int_equal(aeg_event_wait_handle(other, &h[i], 5000), 0);
		}
		for (int i = 0; i < 8; i += 2)
			assert_int_equal(aeg_event_close_handle(other, &h[i]), 0);
		assert_int_equal(aeg_stream_destroy(s), 0);
		for (int i = 0; i < 8; i++)
			assert_int_equal(aeg_event_destroy(evs[i]), 0);
		aeg_device_close(other);
		aeg_device_close(dev);
	}
	assert_int_equal(count_fds(), before);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(record_query_wait),
		cmocka_unit_test(record_needs_matching_stream),
		cmocka_unit_test(fail_then_wait),
		cmocka_unit_test(own_handle_resolves_locally),
		cmocka_unit_test(destroy_during_wait_by_handle),
		cmocka_unit_test(cache_reuse),
		cmocka_unit_test(garbage_handles),
		cmocka_unit_test(stream_waits_for_event),
		cmocka_unit_test(child_waits_on_parent),
		cmocka_unit_test(parent_waits_on_child),
		cmocka_unit_test(query_handle_never_waits),
		cmocka_unit_test(armed_until_recorded),
		cmocka_unit_test(timeout_names_time_asked),
		cmocka_unit_test(waits_need_no_agent),
		cmocka_unit_test(resolver_asked_first),
		cmocka_unit_test(no_fd_leak),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The host device backend's streams (a worker thread each) and events (a futex in a shared memfd page). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "device_host.h"
#include "device_internal.h"
#include "internal.h"

#define HOST_EVENT_BYTES 4096

/* The process-shared state of an event: one memfd page. */
struct host_event_page {
	char magic[4];
	uint32_t version;
	_Atomic uint32_t word;          /* futex word: bumped on every completion or failure */
	_Atomic uint32_t waiters;
	_Atomic uint64_t recorded;      /* sequence of the latest record */
	_Atomic uint64_t completed;     /* highest sequence the streams passed */
	_Atomic int32_t failure;        /* aeg_event_fail code; 0 none */
};

struct host_event {
	_Atomic unsigned refs;          /* the owner's, and one per queued stream op */
	struct host_event_page *page;
	int fd;                         /* -1 for an event opened from a handle */
	_Atomic uint64_t armed_seq;     /* sequence taken by host_event_arm, 0 none */
	pid_t owner;                    /* opened from a handle: the process that records it */
	uint64_t owner_start;
};

/* A wait on another process's event looks this often whether that process still lives. */
#define OWNER_CHECK_MS 100

enum op_kind { OP_COPY, OP_COPY2D, OP_HOST_FN, OP_RECORD, OP_WAIT };

struct op {
	enum op_kind kind;
	struct op *next;
	union {
		struct {
			void *dst;
			const void *src;
			size_t bytes;
			size_t dpitch, spitch, rows;    /* OP_COPY2D: rows of bytes */
		} copy;
		struct {
			void (*fn)(void *);
			void *arg;
		} host_fn;
		struct {
			struct host_event *ev;
			uint64_t seq;
		} event;
	} u;
};

struct host_stream {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t work;            /* the worker: an op arrived or stop */
	pthread_cond_t idle;            /* sync: done moved */
	struct op *head, *tail;
	uint64_t queued, done;
	int syncing;                    /* threads in host_stream_sync */
	int stopping;
};

static void page_wake(struct host_event_page *pg)
{
	atomic_fetch_add(&pg->word, 1);
	if (atomic_load(&pg->waiters) != 0)
		aeg_futex_wake((uint32_t *)&pg->word);
}

static void page_complete(struct host_event_page *pg, uint64_t seq)
{
	uint64_t cur = atomic_load(&pg->completed);

	while (cur < seq && !atomic_compare_exchange_weak(&pg->completed, &cur, seq))
		;
	page_wake(pg);
}

/*
 * Wait until the streams pass sequence @target of @ev (or, with @failures,
 * until the event is failed). The waiters count is raised before the word
 * is read, so a completer either sees a waiter and wakes it or completed
 * before the word was read. On another process's event the wait also ends
 * when that process exits: nothing would record the event any more.
 */
static int page_wait(struct host_event *ev, uint64_t target, int timeout_ms, int failures)
{
	struct host_event_page *pg = ev->page;
	uint64_t deadline = 0, next_check = 0;
	int err;

	if (timeout_ms > 0)
		deadline = aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	atomic_fetch_add(&pg->waiters, 1);
	for (;;) {
		uint32_t gen = atomic_load(&pg->word);
		int32_t failure = atomic_load(&pg->failure);
		uint64_t now, until = 0;

		if (failures && failure != 0) {
			err = failure;
			break;
		}
		if (atomic_load(&pg->completed) >= target) {
			err = 0;
			break;
		}
		if (timeout_ms == 0) {
			err = AEG_ETIMEDOUT;
			break;
		}
		now = aeg_now_ns();
		if (timeout_ms > 0) {
			if (now >= deadline) {
				err = AEG_ETIMEDOUT;
				break;
			}
			until = deadline;
		}
		if (ev->owner > 0) {
			if (now >= next_check) {
				if (!aeg_proc_alive(ev->owner, ev->owner_start)) {
					err = AEG_EBADF;
					break;
				}
				next_check = now + OWNER_CHECK_MS * 1000000ull;
			}
			if (until == 0 || next_check < until)
				until = next_check;
		}
		aeg_futex_wait((uint32_t *)&pg->word, gen, until != 0 ? until - now : 0);
	}
	atomic_fetch_sub(&pg->waiters, 1);
	if (err == AEG_ETIMEDOUT)
		return aeg_fail(err, "event not complete after %d ms", timeout_ms);
	if (err == AEG_EBADF)
		return aeg_fail(err, "event handle: its owner, process %d, exited before the event completed",
				(int)ev->owner);
	return err;
}

static void event_put(struct host_event *ev)
{
	if (atomic_fetch_sub(&ev->refs, 1) != 1)
		return;
	munmap(ev->page, HOST_EVENT_BYTES);
	if (ev->fd >= 0)
		close(ev->fd);
	free(ev);
}

int host_event_create(aeg_device_t *dev, int gpu, void **evp, aeg_handle_t *handle)
{
	struct host_impl *h = impl_of(dev);
	struct host_event *ev;
	struct stat st;
	int err;

	ev = calloc(1, sizeof(*ev));
	if (ev == NULL)
		return aeg_fail(AEG_ENOMEM, "event: out of memory");
	atomic_init(&ev->refs, 1);
	ev->fd = memfd_create("aegaeon-event", MFD_CLOEXEC);
	if (ev->fd < 0) {
		err = aeg_fail(errno == EMFILE || errno == ENFILE ? AEG_ENOSPC : AEG_EIO,
			       "event: memfd_create: %s", strerror(errno));
		goto free_ev;
	}
	if (ftruncate(ev->fd, HOST_EVENT_BYTES) < 0 || fstat(ev->fd, &st) < 0) {
		err = aeg_fail(AEG_ENOMEM, "event: sizing its memfd: %s", strerror(errno));
		goto close_fd;
	}
	ev->page = mmap(NULL, HOST_EVENT_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, ev->fd, 0);
	if (ev->page == MAP_FAILED) {
		err = aeg_fail(AEG_ENOMEM, "event: mmap: %s", strerror(errno));
		goto close_fd;
	}
	memcpy(ev->page->magic, "AEGE", 4);
	ev->page->version = HOST_HANDLE_VERSION;
	host_make_handle(h, "AEGE", ev->fd, gpu, HOST_EVENT_BYTES, (uint64_t)st.st_ino, handle);
	*evp = ev;
	return 0;
close_fd:
	close(ev->fd);
free_ev:
	free(ev);
	return err;
}

int host_event_destroy(aeg_device_t *dev, void *ev)
{
	event_put(ev);
	return 0;
}

int host_event_open(aeg_device_t *dev, const aeg_handle_t *handle, void **evp)
{
	struct host_event_page *pg;
	struct host_handle hh;
	struct host_event *ev;
	int fd, err;

	err = host_parse_handle(handle, "AEGE", "event", &hh);
	if (err < 0)
		return err;
	if (hh.bytes != HOST_EVENT_BYTES)
		return aeg_fail(AEG_EBADF, "event handle is corrupt (%" PRIu64 " bytes, events have %d)",
				hh.bytes, HOST_EVENT_BYTES);
	err = host_open_owner_fd(&hh, "event", &fd);
	if (err < 0)
		return err;
	pg = mmap(NULL, HOST_EVENT_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (pg == MAP_FAILED)
		return aeg_fail(AEG_ENOMEM, "event handle: mmap: %s", strerror(errno));
	if (memcmp(pg->magic, "AEGE", 4) != 0 || pg->version != HOST_HANDLE_VERSION) {
		err = aeg_fail(AEG_EBADF, "event handle: the shared page of process %" PRIu32 " is not an event",
			       hh.pid);
		goto unmap;
	}
	ev = calloc(1, sizeof(*ev));
	if (ev == NULL) {
		err = aeg_fail(AEG_ENOMEM, "event handle: out of memory");
		goto unmap;
	}
	atomic_init(&ev->refs, 1);
	ev->page = pg;
	ev->fd = -1;
	ev->owner = (pid_t)hh.pid;
	ev->owner_start = hh.start_time;
	*evp = ev;
	return 0;
unmap:
	munmap(pg, HOST_EVENT_BYTES);
	return err;
}

int host_event_close(aeg_device_t *dev, void *ev)
{
	event_put(ev);
	return 0;
}

int host_event_query(aeg_device_t *dev, void *evp)
{
	struct host_event_page *pg = ((struct host_event *)evp)->page;
	int32_t failure = atomic_load(&pg->failure);

	if (failure != 0)
		return failure;
	return atomic_load(&pg->completed) >= atomic_load(&pg->recorded) ? 0 : AEG_EBUSY;
}

int host_event_wait(aeg_device_t *dev, void *evp, int timeout_ms)
{
	struct host_event *ev = evp;

	return page_wait(ev, atomic_load(&ev->page->recorded), timeout_ms, 1);
}

int host_event_fail(aeg_device_t *dev, void *evp, int err)
{
	struct host_event_page *pg = ((struct host_event *)evp)->page;

	atomic_store(&pg->failure, err);
	page_wake(pg);
	return 0;
}

/* ---------------------------------------------------------------- streams */

static void run_op(struct op *op)
{
	switch (op->kind) {
	case OP_COPY:
		memmove(op->u.copy.dst, op->u.copy.src, op->u.copy.bytes);
		break;
	case OP_COPY2D:
		for (size_t r = 0; r < op->u.copy.rows; r++)
			memmove((char *)op->u.copy.dst + r * op->u.copy.dpitch,
				(const char *)op->u.copy.src + r * op->u.copy.spitch, op->u.copy.bytes);
		break;
	case OP_HOST_FN:
		op->u.host_fn.fn(op->u.host_fn.arg);
		break;
	case OP_RECORD:
		page_complete(op->u.event.ev->page, op->u.event.seq);
		event_put(op->u.event.ev);
		break;
	case OP_WAIT:
		/* A failed event releases the stream too: nothing else would. */
		page_wait(op->u.event.ev, op->u.event.seq, -1, 1);
		event_put(op->u.event.ev);
		break;
	}
}

static void *stream_main(void *arg)
{
	struct host_stream *s = arg;
	struct op *op;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		while (s->head == NULL && !s->stopping)
			pthread_cond_wait(&s->work, &s->lock);
		if (s->head == NULL)
			break;
		op = s->head;
		s->head = op->next;
		if (s->head == NULL)
			s->tail = NULL;
		pthread_mutex_unlock(&s->lock);
		run_op(op);
		free(op);
		pthread_mutex_lock(&s->lock);
		s->done++;
		/*
		 * A sync waits for what was queued before it, not for the queue to
		 * empty: while other threads keep queueing, done passes its target
		 * with the queue never empty, so each op wakes it.
		 */
		if (s->syncing > 0 || s->done == s->queued)
			pthread_cond_broadcast(&s->idle);
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

static void enqueue(struct host_stream *s, struct op *op)
{
	op->next = NULL;
	pthread_mutex_lock(&s->lock);
	if (s->tail != NULL)
		s->tail->next = op;
	else
		s->head = op;
	s->tail = op;
	s->queued++;
	pthread_cond_signal(&s->work);
	pthread_mutex_unlock(&s->lock);
}

static struct op *new_op(enum op_kind kind)
{
	struct op *op = calloc(1, sizeof(*op));

	if (op == NULL) {
		aeg_fail(AEG_ENOMEM, "stream: out of memory for a queued operation");
		return NULL;
	}
	op->kind = kind;
	return op;
}

int host_stream_create(aeg_device_t *dev, int gpu, void **streamp)
{
	struct host_stream *s;
	int err;

	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return aeg_fail(AEG_ENOMEM, "stream: out of memory");
	pthread_mutex_init(&s->lock, NULL);
	aeg_cond_init_monotonic(&s->work);
	aeg_cond_init_monotonic(&s->idle);
	err = pthread_create(&s->thread, NULL, stream_main, s);
	if (err != 0) {
		pthread_cond_destroy(&s->idle);
		pthread_cond_destroy(&s->work);
		pthread_mutex_destroy(&s->lock);
		free(s);
		return aeg_fail(AEG_ENOMEM, "stream: pthread_create: %s", strerror(err));
	}
	*streamp = s;
	return 0;
}

int host_stream_destroy(aeg_device_t *dev, void *stream)
{
	struct host_stream *s = stream;

	pthread_mutex_lock(&s->lock);
	s->stopping = 1;
	pthread_cond_signal(&s->work);
	pthread_mutex_unlock(&s->lock);
	pthread_join(s->thread, NULL);
	pthread_cond_destroy(&s->idle);
	pthread_cond_destroy(&s->work);
	pthread_mutex_destroy(&s->lock);
	free(s);
	return 0;
}

int host_stream_sync(aeg_device_t *dev, void *stream)
{
	struct host_stream *s = stream;
	uint64_t target;

	pthread_mutex_lock(&s->lock);
	target = s->queued;
	s->syncing++;
	while (s->done < target)
		pthread_cond_wait(&s->idle, &s->lock);
	s->syncing--;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int host_memcpy_async(aeg_device_t *dev, void *stream, void *dst, const void *src, size_t bytes)
{
	struct op *op = new_op(OP_COPY);

	if (op == NULL)
		return AEG_ENOMEM;
	op->u.copy.dst = dst;
	op->u.copy.src = src;
	op->u.copy.bytes = bytes;
	enqueue(stream, op);
	return 0;
}

int host_memcpy2d_async(aeg_device_t *dev, void *stream, void *dst, size_t dpitch, const void *src,
			size_t spitch, size_t width, size_t height)
{
	struct op *op = new_op(OP_COPY2D);

	if (op == NULL)
		return AEG_ENOMEM;
	op->u.copy.dst = dst;
	op->u.copy.src = src;
	op->u.copy.bytes = width;
	op->u.copy.dpitch = dpitch;
	op->u.copy.spitch = spitch;
	op->u.copy.rows = height;
	enqueue(stream, op);
	return 0;
}

int host_launch_host_fn(aeg_device_t *dev, void *stream, void (*fn)(void *), void *arg)
{
	struct op *op = new_op(OP_HOST_FN);

	if (op == NULL)
		return AEG_ENOMEM;
	op->u.host_fn.fn = fn;
	op->u.host_fn.arg = arg;
	enqueue(stream, op);
	return 0;
}

int host_event_record(aeg_device_t *dev, void *evp, void *stream)
{
	struct host_event *ev = evp;
	struct op *op = new_op(OP_RECORD);

	if (op == NULL)
		return AEG_ENOMEM;
	atomic_fetch_add(&ev->refs, 1);
	op->u.event.ev = ev;
	atomic_store(&ev->page->failure, 0);
	op->u.event.seq = atomic_exchange(&ev->armed_seq, 0);
	if (op->u.event.seq == 0)
		op->u.event.seq = atomic_fetch_add(&ev->page->recorded, 1) + 1;
	enqueue(stream, op);
	return 0;
}

/*
 * Take the next sequence now: every wait, here or through the handle,
 * aims at it and stays pending until the record that uses it completes.
 */
int host_event_arm(aeg_device_t *dev, void *evp)
{
	struct host_event *ev = evp;

	/* event.c arms under the event's lock, never while recording it. */
	if (atomic_load(&ev->armed_seq) == 0)
		atomic_store(&ev->armed_seq, atomic_fetch_add(&ev->page->recorded, 1) + 1);
	return 0;
}

int host_stream_wait_event(aeg_device_t *dev, void *stream, void *evp)
{
	struct host_event *ev = evp;
	uint64_t target = atomic_load(&ev->page->recorded);
	struct op *op;

	if (atomic_load(&ev->page->completed) >= target)
		return 0;
	op = new_op(OP_WAIT);
	if (op == NULL)
		return AEG_ENOMEM;
	atomic_fetch_add(&ev->refs, 1);
	op->u.event.ev = ev;
	op->u.event.seq = target;
	enqueue(stream, op);
	return 0;
}

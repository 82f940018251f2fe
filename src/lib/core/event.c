/* Events: backend events with a failure code, waited on directly or by handle. */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "device_internal.h"
#include "internal.h"

/*
 * Backends without a shared status (cuda) are waited on in slices this long
 * so that aeg_event_fail reaches waiters of this process.
 */
#define FAIL_POLL_MS 10

/*
 * @armed (under @lock) holds waiters of this process until the event is
 * recorded or failed: backends count an event never recorded as complete.
 */
struct aeg_event {
	aeg_device_t *dev;
	int gpu;
	void *impl;
	_Atomic int failure;
	struct aeg_event_entry *entry;
	pthread_mutex_t lock;
	pthread_cond_t cond;            /* on CLOCK_MONOTONIC: armed cleared or failure set */
	int armed;
};

static void event_sync_init(struct aeg_event *ev)
{
	pthread_mutex_init(&ev->lock, NULL);
	aeg_cond_init_monotonic(&ev->cond);
}

/* Free what the last reference of @e held; called without dev->lock. */
static void entry_free(aeg_device_t *dev, struct aeg_event_entry *e)
{
	if (e->local != NULL) {
		dev->ops->event_destroy(dev, e->local->impl);
		pthread_cond_destroy(&e->local->cond);
		pthread_mutex_destroy(&e->local->lock);
		free(e->local);
	} else {
		dev->ops->event_close(dev, e->opened);
	}
	free(e);
}

/* Drop one reference; returns @e when the caller must entry_free it. */
static struct aeg_event_entry *entry_put_locked(struct aeg_event_entry *e)
{
	return --e->refs == 0 ? e : NULL;
}

static void entry_put(aeg_device_t *dev, struct aeg_event_entry *e)
{
	pthread_mutex_lock(&dev->lock);
	e = entry_put_locked(e);
	pthread_mutex_unlock(&dev->lock);
	if (e != NULL)
		entry_free(dev, e);
}

AEG_EXPORT int aeg_event_create(aeg_device_t *dev, int gpu, aeg_event_t **evp, aeg_handle_t *handle)
{
	struct aeg_event_entry *e;
	aeg_event_t *ev;
	int err;

	if (dev == NULL || evp == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_create: NULL argument");
	*evp = NULL;
	err = aeg_device_check_gpu(dev, gpu);
	if (err < 0)
		return err;
	ev = calloc(1, sizeof(*ev));
	e = calloc(1, sizeof(*e));
	if (ev == NULL || e == NULL) {
		err = aeg_fail(AEG_ENOMEM, "event: out of memory");
		goto fail;
	}
	ev->dev = dev;
	ev->gpu = gpu;
	atomic_init(&ev->failure, 0);
	err = dev->ops->event_create(dev, gpu, &ev->impl, &e->handle);
	if (err < 0)
		goto fail;
	event_sync_init(ev);
	ev->entry = e;
	e->local = ev;
	e->refs = 1;
	pthread_mutex_lock(&dev->lock);
	aeg_event_table_insert(dev, e);
	pthread_mutex_unlock(&dev->lock);
	if (handle != NULL)
		*handle = e->handle;
	*evp = ev;
	return 0;
fail:
	free(e);
	free(ev);
	return err;
}

AEG_EXPORT int aeg_event_destroy(aeg_event_t *ev)
{
	aeg_device_t *dev;
	struct aeg_event_entry *e;

	if (ev == NULL)
		return 0;
	dev = ev->dev;
	pthread_mutex_lock(&dev->lock);
	if (atomic_load(&ev->failure) != 0) {
		unsigned i = dev->failed_gone_next++ % AEG_EVENT_FAILED_KEPT;

		dev->failed_gone[i].handle = ev->entry->handle;
		dev->failed_gone[i].code = atomic_load(&ev->failure);
	}
	aeg_event_table_unlink(dev, ev->entry);
	e = entry_put_locked(ev->entry);
	pthread_mutex_unlock(&dev->lock);
	/* A wait by handle in flight frees the event when it returns. */
	if (e != NULL)
		entry_free(dev, e);
	return 0;
}

AEG_EXPORT int aeg_event_record(aeg_event_t *ev, aeg_stream_t *stream)
{
	int err;

	if (ev == NULL || stream == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_record: NULL argument");
	if (stream->dev != ev->dev)
		return aeg_fail(AEG_EINVAL, "event record: the stream belongs to another device");
	if (stream->gpu != ev->gpu)
		return aeg_fail(AEG_EINVAL, "event record: event of GPU %d on a stream of GPU %d",
				ev->gpu, stream->gpu);
	err = ev->dev->ops->event_record(ev->dev, ev->impl, stream->impl);
	if (err)
		return err;
	pthread_mutex_lock(&ev->lock);
	atomic_store(&ev->failure, 0);
	ev->armed = 0;
	pthread_cond_broadcast(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
	return 0;
}

AEG_EXPORT int aeg_event_arm(aeg_event_t *ev)
{
	int err = 0;

	if (ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_arm: NULL event");
	pthread_mutex_lock(&ev->lock);
	if (!ev->armed && ev->dev->ops->event_arm != NULL)
		err = ev->dev->ops->event_arm(ev->dev, ev->impl);
	if (err == 0)
		ev->armed = 1;
	pthread_mutex_unlock(&ev->lock);
	return err;
}

static int is_armed(aeg_event_t *ev)
{
	int armed;

	pthread_mutex_lock(&ev->lock);
	armed = ev->armed;
	pthread_mutex_unlock(&ev->lock);
	return armed;
}

/*
 * Wait until @ev is no longer armed: 0, its failure code, or AEG_ETIMEDOUT
 * once @deadline (CLOCK_MONOTONIC ns; 0 forever) passes.
 */
static int wait_recorded(aeg_event_t *ev, uint64_t deadline, int timeout_ms)
{
	struct timespec ts = aeg_timespec_of_ns(deadline);
	int err = 0;

	pthread_mutex_lock(&ev->lock);
	while (ev->armed && atomic_load(&ev->failure) == 0) {
		if (timeout_ms == 0 ||
		    (deadline != 0 && pthread_cond_timedwait(&ev->cond, &ev->lock, &ts) == ETIMEDOUT)) {
			err = AEG_ETIMEDOUT;
			break;
		}
		if (deadline == 0)
			pthread_cond_wait(&ev->cond, &ev->lock);
	}
	if (err == 0)
		err = atomic_load(&ev->failure);
	pthread_mutex_unlock(&ev->lock);
	if (err == AEG_ETIMEDOUT)
		return aeg_fail(err, "event not recorded after %d ms (its work is not queued yet)",
				timeout_ms);
	return err;
}

AEG_EXPORT int aeg_event_query(aeg_event_t *ev)
{
	int failure;

	if (ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_query: NULL event");
	failure = atomic_load(&ev->failure);
	if (failure != 0)
		return failure;
	if (is_armed(ev))
		return AEG_EBUSY;
	return ev->dev->ops->event_query(ev->dev, ev->impl);
}

AEG_EXPORT int aeg_event_wait(aeg_event_t *ev, int timeout_ms)
{
	const struct aeg_device_ops *ops;
	uint64_t deadline;
	int failure, err, asked = timeout_ms;

	if (ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_wait: NULL event");
	ops = ev->dev->ops;
	deadline = timeout_ms > 0 ? aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
	failure = wait_recorded(ev, deadline, timeout_ms);
	if (failure != 0)
		return failure;
	if (timeout_ms > 0) {
		uint64_t now = aeg_now_ns();

		/* The rest of the time for the backend (at least a poll). */
		timeout_ms = now >= deadline ? 0 : (int)((deadline - now + 999999) / 1000000);
	}
	/* A timeout names the time the caller gave, not what was left of it for the backend. */
	if (ops->event_fail != NULL) {
		err = ops->event_wait(ev->dev, ev->impl, timeout_ms);
		return err == AEG_ETIMEDOUT ? aeg_fail(err, "event not complete after %d ms", asked) : err;
	}

	for (;;) {
		int slice = FAIL_POLL_MS;

		if (timeout_ms == 0) {
			slice = 0;
		} else if (timeout_ms > 0) {
			uint64_t now = aeg_now_ns();
			uint64_t left_ms = now >= deadline ? 0 : (deadline - now + 999999) / 1000000;

			if (left_ms < (uint64_t)slice)
				slice = (int)left_ms;
		}
		err = ops->event_wait(ev->dev, ev->impl, slice);
		failure = atomic_load(&ev->failure);
		if (failure != 0)
			return failure;
		if (err != AEG_ETIMEDOUT)
			return err;
		if (timeout_ms >= 0 && aeg_now_ns() >= deadline)
			return aeg_fail(AEG_ETIMEDOUT, "event not complete after %d ms", asked);
	}
}

AEG_EXPORT int aeg_event_fail(aeg_event_t *ev, int err)
{
	if (ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_fail: NULL event");
	if (err >= 0)
		return aeg_fail(AEG_EINVAL, "event fail: code %d is not an error (negative AEG_E* code)", err);
	pthread_mutex_lock(&ev->lock);
	atomic_store(&ev->failure, err);
	pthread_cond_broadcast(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
	if (ev->dev->ops->event_fail != NULL)
		return ev->dev->ops->event_fail(ev->dev, ev->impl, err);
	return 0;
}

/*
 * Another process's event may be armed there and not recorded yet, which
 * its handle cannot tell (CUDA IPC events carry no state): a device with a
 * resolver (a job's: its agent knows its chunks' events) asks it to wait
 * until the event is recorded. 0 to go on with the backend wait for what is
 * left of *@timeout_ms.
 */
static int resolve_first(aeg_device_t *dev, const aeg_handle_t *handle, int *timeout_ms)
{
	uint64_t start = aeg_now_ns(), spent_ms;
	int err;

	if (dev->resolver == NULL)
		return 0;
	err = dev->resolver(dev->resolver_ctx, handle, *timeout_ms);
	if (err == AEG_ENOENT)
		return 0;       /* not one the resolver knows: the handle's owner records it */
	if (err)
		return err;
	if (*timeout_ms > 0) {
		spent_ms = (aeg_now_ns() - start) / 1000000;
		*timeout_ms = spent_ms >= (uint64_t)*timeout_ms ? 0 : *timeout_ms - (int)spent_ms;
	}
	return 0;
}

int aeg_event_wait_recorded(aeg_device_t *dev, const aeg_handle_t *handle, int timeout_ms)
{
	struct aeg_event_entry *e;
	uint64_t deadline;
	int err;

	pthread_mutex_lock(&dev->lock);
	e = aeg_event_table_lookup(dev, handle);
	if (e != NULL && e->local != NULL)
		e->refs++;
	else
		e = NULL;
	if (e == NULL) {
		int code = 0;

		for (unsigned i = 0; i < AEG_EVENT_FAILED_KEPT && code == 0; i++)
			if (dev->failed_gone[i].code != 0 &&
			    memcmp(&dev->failed_gone[i].handle, handle, sizeof(*handle)) == 0)
				code = dev->failed_gone[i].code;
		pthread_mutex_unlock(&dev->lock);
		if (code != 0)
			return aeg_fail(code, "the chunk's load stopped (%s) and the chunk was released", aeg_strerror(code));
		return aeg_fail(AEG_ENOENT, "no event of this process has that handle");
	}
	pthread_mutex_unlock(&dev->lock);
	deadline = timeout_ms > 0 ? aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
	err = wait_recorded(e->local, deadline, timeout_ms);
	entry_put(dev, e);
	return err;
}

AEG_EXPORT int aeg_event_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, int timeout_ms)
{
	struct aeg_event_entry *e, *other;
	void *opened;
	int err;

	if (dev == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_wait_handle: NULL argument");
	pthread_mutex_lock(&dev->lock);
	e = aeg_event_table_lookup(dev, handle);
	if (e != NULL)
		e->refs++;
	pthread_mutex_unlock(&dev->lock);

	/*
	 * A chunk event is recorded once; after the resolver has said so, waits
	 * on the opened handle go straight to the backend (microseconds, not a
	 * round trip to the agent).
	 */
	if (e == NULL || (e->local == NULL && !__atomic_load_n(&e->recorded_seen, __ATOMIC_ACQUIRE))) {
		err = resolve_first(dev, handle, &timeout_ms);
		if (err) {
			if (e != NULL)
				entry_put(dev, e);
			return err;
		}
	}
	if (e == NULL) {
		/* Opening is slow on cuda (~240 us): not under the lock. */
		err = dev->ops->event_open(dev, handle, &opened);
		if (err < 0)
			return err;
		e = calloc(1, sizeof(*e));
		if (e == NULL) {
			dev->ops->event_close(dev, opened);
			return aeg_fail(AEG_ENOMEM, "event handle: out of memory");
		}
		e->handle = *handle;
		e->opened = opened;
		e->refs = 2;    /* the table's and this wait's */
		pthread_mutex_lock(&dev->lock);
		dev->event_opens++;
		other = aeg_event_table_lookup(dev, handle);
		if (other != NULL)
			other->refs++;
		else
			aeg_event_table_insert(dev, e);
		pthread_mutex_unlock(&dev->lock);
		if (other != NULL) {
			/* Another thread opened it meanwhile: keep one opening. */
			dev->ops->event_close(dev, opened);
			free(e);
			e = other;
		}
	}

	if (e->local != NULL) {
		err = aeg_event_wait(e->local, timeout_ms);
	} else {
		__atomic_store_n(&e->recorded_seen, 1, __ATOMIC_RELEASE);
		err = dev->ops->event_wait(dev, e->opened, timeout_ms);
	}
	entry_put(dev, e);
	return err;
}

AEG_EXPORT int aeg_event_query_handle(aeg_device_t *dev, const aeg_handle_t *handle)
{
	struct aeg_event_entry *e;
	int err;

	if (dev == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_query_handle: NULL argument");
	pthread_mutex_lock(&dev->lock);
	e = aeg_event_table_lookup(dev, handle);
	if (e != NULL && (e->local != NULL || __atomic_load_n(&e->recorded_seen, __ATOMIC_ACQUIRE)))
		e->refs++;
	else
		e = NULL;
	pthread_mutex_unlock(&dev->lock);
	if (e == NULL)
		return AEG_ENOENT;
	err = e->local != NULL ? aeg_event_query(e->local) : dev->ops->event_query(dev, e->opened);
	entry_put(dev, e);
	return err;
}

AEG_EXPORT int aeg_event_close_handle(aeg_device_t *dev, const aeg_handle_t *handle)
{
	struct aeg_event_entry *e;

	if (dev == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_close_handle: NULL argument");
	pthread_mutex_lock(&dev->lock);
	e = aeg_event_table_lookup(dev, handle);
	if (e != NULL && e->local == NULL) {
		aeg_event_table_unlink(dev, e);
		e = entry_put_locked(e);
	} else {
		e = NULL;
	}
	pthread_mutex_unlock(&dev->lock);
	if (e != NULL)
		entry_free(dev, e);
	return 0;
}

AEG_EXPORT int aeg_stream_wait_event(aeg_stream_t *stream, aeg_event_t *ev)
{
	if (stream == NULL || ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_stream_wait_event: NULL argument");
	if (stream->dev != ev->dev)
		return aeg_fail(AEG_EINVAL, "stream wait: the event belongs to another device");
	if (is_armed(ev))
		return aeg_fail(AEG_EBUSY, "stream wait: the event is armed and not recorded yet (a stream "
				"must never wait on work not queued): wait for it on the host first");
	return ev->dev->ops->stream_wait_event(ev->dev, stream->impl, ev->impl);
}

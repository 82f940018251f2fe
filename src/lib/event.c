/* Events: backend events with a failure code, and the per-device table of handles. */
#include "config.h"

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

struct aeg_event {
	aeg_device_t *dev;
	int gpu;
	void *impl;
	_Atomic int failure;
	struct aeg_event_entry *entry;
};

/*
 * One handle the device knows: an event of this process (@local) or an
 * opening of another process's handle (@opened). @refs counts the table's
 * reference and the waits in flight, so a wait never sees its event freed
 * under it by aeg_event_destroy or aeg_event_close_handle.
 */
struct aeg_event_entry {
	aeg_handle_t handle;
	struct aeg_event *local;
	void *opened;
	unsigned refs;
	int in_table;
	struct aeg_event_entry *next;
};

static unsigned bucket_of(const aeg_handle_t *handle)
{
	uint32_t h = 2166136261u;       /* FNV-1a */

	for (int i = 0; i < AEG_HANDLE_BYTES; i++) {
		h ^= handle->bytes[i];
		h *= 16777619u;
	}
	return h % AEG_EVENT_BUCKETS;
}

static struct aeg_event_entry *lookup(aeg_device_t *dev, const aeg_handle_t *handle)
{
	for (struct aeg_event_entry *e = dev->events[bucket_of(handle)]; e != NULL; e = e->next)
		if (memcmp(e->handle.bytes, handle->bytes, AEG_HANDLE_BYTES) == 0)
			return e;
	return NULL;
}

static void insert(aeg_device_t *dev, struct aeg_event_entry *e)
{
	unsigned b = bucket_of(&e->handle);

	e->next = dev->events[b];
	dev->events[b] = e;
	e->in_table = 1;
	if (e->local == NULL)
		dev->event_cached++;
}

static void unlink_entry(aeg_device_t *dev, struct aeg_event_entry *e)
{
	struct aeg_event_entry **pp;

	for (pp = &dev->events[bucket_of(&e->handle)]; *pp != NULL; pp = &(*pp)->next) {
		if (*pp == e) {
			*pp = e->next;
			break;
		}
	}
	e->in_table = 0;
	if (e->local == NULL)
		dev->event_cached--;
}

/* Free what the last reference of @e held; called without dev->lock. */
static void entry_free(aeg_device_t *dev, struct aeg_event_entry *e)
{
	if (e->local != NULL) {
		dev->ops->event_destroy(dev, e->local->impl);
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
	ev->entry = e;
	e->local = ev;
	e->refs = 1;
	pthread_mutex_lock(&dev->lock);
	insert(dev, e);
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
	unlink_entry(dev, ev->entry);
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
	if (err == 0)
		atomic_store(&ev->failure, 0);
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
	return ev->dev->ops->event_query(ev->dev, ev->impl);
}

AEG_EXPORT int aeg_event_wait(aeg_event_t *ev, int timeout_ms)
{
	const struct aeg_device_ops *ops;
	uint64_t deadline;
	int failure, err;

	if (ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_wait: NULL event");
	ops = ev->dev->ops;
	failure = atomic_load(&ev->failure);
	if (failure != 0)
		return failure;
	if (ops->event_fail != NULL)
		return ops->event_wait(ev->dev, ev->impl, timeout_ms);

	deadline = timeout_ms > 0 ? aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
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
			return aeg_fail(AEG_ETIMEDOUT, "event not complete after %d ms", timeout_ms);
	}
}

AEG_EXPORT int aeg_event_fail(aeg_event_t *ev, int err)
{
	if (ev == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_fail: NULL event");
	if (err >= 0)
		return aeg_fail(AEG_EINVAL, "event fail: code %d is not an error (negative AEG_E* code)", err);
	atomic_store(&ev->failure, err);
	if (ev->dev->ops->event_fail != NULL)
		return ev->dev->ops->event_fail(ev->dev, ev->impl, err);
	return 0;
}

AEG_EXPORT int aeg_event_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, int timeout_ms)
{
	struct aeg_event_entry *e, *other;
	void *opened;
	int err;

	if (dev == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_wait_handle: NULL argument");
	pthread_mutex_lock(&dev->lock);
	e = lookup(dev, handle);
	if (e != NULL)
		e->refs++;
	pthread_mutex_unlock(&dev->lock);

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
		other = lookup(dev, handle);
		if (other != NULL)
			other->refs++;
		else
			insert(dev, e);
		pthread_mutex_unlock(&dev->lock);
		if (other != NULL) {
			/* Another thread opened it meanwhile: keep one opening. */
			dev->ops->event_close(dev, opened);
			free(e);
			e = other;
		}
	}

	if (e->local != NULL)
		err = aeg_event_wait(e->local, timeout_ms);
	else
		err = dev->ops->event_wait(dev, e->opened, timeout_ms);
	entry_put(dev, e);
	return err;
}

AEG_EXPORT int aeg_event_close_handle(aeg_device_t *dev, const aeg_handle_t *handle)
{
	struct aeg_event_entry *e;

	if (dev == NULL || handle == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_event_close_handle: NULL argument");
	pthread_mutex_lock(&dev->lock);
	e = lookup(dev, handle);
	if (e != NULL && e->local == NULL) {
		unlink_entry(dev, e);
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
	return ev->dev->ops->stream_wait_event(ev->dev, stream->impl, ev->impl);
}

void aeg_event_cache_clear(aeg_device_t *dev)
{
	struct aeg_event_entry *dead = NULL;
	unsigned live = 0;

	pthread_mutex_lock(&dev->lock);
	for (int b = 0; b < AEG_EVENT_BUCKETS; b++) {
		struct aeg_event_entry *e = dev->events[b], *next;

		for (; e != NULL; e = next) {
			next = e->next;
			if (e->local != NULL) {
				live++;
				continue;
			}
			unlink_entry(dev, e);
			if (entry_put_locked(e) != NULL) {
				e->next = dead;
				dead = e;
			}
		}
	}
	pthread_mutex_unlock(&dev->lock);
	if (live != 0)
		aeg_warn("device closed with %u event%s not destroyed", live, live == 1 ? "" : "s");
	while (dead != NULL) {
		struct aeg_event_entry *e = dead;

		dead = e->next;
		entry_free(dev, e);
	}
}

void aeg_device_event_stats(aeg_device_t *dev, uint64_t *opens, uint64_t *cached)
{
	pthread_mutex_lock(&dev->lock);
	if (opens != NULL)
		*opens = dev->event_opens;
	if (cached != NULL)
		*cached = dev->event_cached;
	pthread_mutex_unlock(&dev->lock);
}

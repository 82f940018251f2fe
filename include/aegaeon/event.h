/* aegaeon events: completion signals other processes can wait on. */
#ifndef AEGAEON_EVENT_H
#define AEGAEON_EVENT_H

#include <aegaeon/device.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aeg_event aeg_event_t;

/*
 * aeg_event_create - an interprocess event on @gpu and its 64-byte @handle
 * (may be NULL). The event stays valid, and its handle openable, until
 * aeg_event_destroy. An event never recorded counts as complete.
 */
int aeg_event_create(aeg_device_t *dev, int gpu, aeg_event_t **ev, aeg_handle_t *handle);
int aeg_event_destroy(aeg_event_t *ev);

/* aeg_event_record - complete once @stream reaches this point. */
int aeg_event_record(aeg_event_t *ev, aeg_stream_t *stream);

/* aeg_event_query - 0 when complete, AEG_EBUSY while pending, the code of a failed event (aeg_event_fail). */
int aeg_event_query(aeg_event_t *ev);

/* aeg_event_wait - wait for completion; @timeout_ms < 0 waits forever. */
int aeg_event_wait(aeg_event_t *ev, int timeout_ms);

/*
 * aeg_event_fail - mark @ev failed with @err (e.g. AEG_ECANCELED): waits on
 * it return @err instead of success until it is recorded again. On the host
 * backend waits through its handle in other processes see the failure too;
 * CUDA IPC events carry no status, so there only waits in this process do
 * (other processes learn it from the agent's chunk table).
 */
int aeg_event_fail(aeg_event_t *ev, int err);

/*
 * aeg_event_wait_handle - wait for the event behind @handle, made by this or
 * another process of the same user. The first wait on a handle opens it
 * (and caches the opened event); later waits reuse it. Handles of this
 * process's own events resolve locally. Returns 0, AEG_ETIMEDOUT, the
 * event's failure code, or AEG_EBADF for a handle that cannot be opened.
 */
int aeg_event_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, int timeout_ms);

/* aeg_event_close_handle - drop the cached opening of @handle, if any. */
int aeg_event_close_handle(aeg_device_t *dev, const aeg_handle_t *handle);

/* aeg_stream_wait_event - later work on @stream waits for @ev (no host wait). */
int aeg_stream_wait_event(aeg_stream_t *stream, aeg_event_t *ev);

#ifdef __cplusplus
}
#endif
#endif

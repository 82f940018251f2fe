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

/*
 * aeg_event_record - complete once @stream reaches this point. Clears the
 * armed state and any failure, waking waiters held by aeg_event_arm.
 */
int aeg_event_record(aeg_event_t *ev, aeg_stream_t *stream);

/*
 * aeg_event_arm - promise that @ev will be recorded (or failed): until
 * then waits on it block and queries say AEG_EBUSY, where an event never
 * recorded would count as complete. For handing out an event before the
 * work it follows is queued, without any stream waiting on unqueued work.
 * On the host backend waits through its handle in other processes see the
 * armed state too. CUDA IPC events carry none: there the armed state is
 * local, and other processes of a job learn it from the agent
 * (aeg_event_wait_handle on the job's device asks it). An armed
 * event cannot be waited on by a stream (aeg_stream_wait_event is
 * AEG_EBUSY). Thread-safe; arming an armed event does nothing.
 */
int aeg_event_arm(aeg_event_t *ev);

/* aeg_event_query - 0 when complete, AEG_EBUSY while pending or armed, the code of a failed event (aeg_event_fail). */
int aeg_event_query(aeg_event_t *ev);

/*
 * aeg_event_wait - wait for completion: until an armed event is recorded,
 * then for the stream to pass the record; @timeout_ms < 0 waits forever.
 * 0, AEG_ETIMEDOUT, or the failure code of aeg_event_fail.
 */
int aeg_event_wait(aeg_event_t *ev, int timeout_ms);

/*
 * aeg_event_fail - mark @ev failed with @err (e.g. AEG_ECANCELED): waits on
 * it, those held by aeg_event_arm included, return @err instead of success
 * until it is recorded again. On the host
 * backend waits through its handle in other processes see the failure too;
 * CUDA IPC events carry no status, so there only waits in this process do
 * (other processes learn it from the agent's chunk table).
 */
int aeg_event_fail(aeg_event_t *ev, int err);

/*
 * aeg_event_wait_handle - wait for the event behind @handle, made by this or
 * another process of the same user. The first wait on a handle opens it
 * (and caches the opened event); later waits reuse it. Handles of this
 * process's own events resolve locally. On a job's device (aeg_job_device,
 * aeg_session_device of a job session) a handle of another process is first
 * waited on through the job's agent until it is recorded (a chunk event the
 * agent armed; one it does not know goes straight to the backend). On any
 * other device the backend alone answers: on cuda a chunk event whose
 * copies are not queued yet then reads as complete, and a released chunk's
 * handle as AEG_EBADF, so wait for a job's chunks on the job's device.
 * Returns 0, AEG_ETIMEDOUT, the event's failure code, AEG_EBADF for a
 * handle that cannot be opened, or AEG_EIO when the job's agent cannot be
 * reached.
 */
int aeg_event_wait_handle(aeg_device_t *dev, const aeg_handle_t *handle, int timeout_ms);

/*
 * aeg_event_query_handle - whether the event behind @handle is complete,
 * without waiting, opening or asking the job's agent: 0 when complete,
 * AEG_EBUSY when not yet, its failure code, or AEG_ENOENT when this
 * process has not resolved the handle yet (its first aeg_event_wait_handle
 * does that). For callers that must not block when the answer is at hand
 * (the Python module keeps the GIL for it). Thread-safe.
 */
int aeg_event_query_handle(aeg_device_t *dev, const aeg_handle_t *handle);

/* aeg_event_close_handle - drop the cached opening of @handle, if any. */
int aeg_event_close_handle(aeg_device_t *dev, const aeg_handle_t *handle);

/* aeg_stream_wait_event - later work on @stream waits for @ev (no host wait). */
int aeg_stream_wait_event(aeg_stream_t *stream, aeg_event_t *ev);

#ifdef __cplusplus
}
#endif
#endif

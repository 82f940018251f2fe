/* What the library's other files need of the agent's client side; never installed. */
#ifndef AEGAEON_ATTACH_INTERNAL_H
#define AEGAEON_ATTACH_INTERNAL_H

#include <aegaeon/device.h>

/*
 * aeg_agent_wait_event - ask the agent listening on @socket_path to wait
 * until the chunk event behind @handle is recorded (its copies queued), at
 * most @timeout_ms (< 0 forever). Opens a connection of its own, so waits
 * of many threads run side by side. Returns 0 once it is recorded (the
 * caller then waits for completion through the backend), the chunk's
 * failure code (AEG_ECANCELED, AEG_ESTALE...), AEG_ETIMEDOUT, AEG_ENOENT
 * when the agent does not know the handle, or AEG_EIO/AEG_EPROTO.
 */
int aeg_agent_wait_event(const char *socket_path, const aeg_handle_t *handle, int timeout_ms);

#endif

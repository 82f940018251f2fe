/* Gates: keep a chunk's event pending from the moment its handle is handed out. */
#ifndef AEGAEON_PREFETCH_GATE_H
#define AEGAEON_PREFETCH_GATE_H

#include <stdint.h>

#include <aegaeon/device.h>
#include <aegaeon/event.h>

/*
 * An event never recorded counts as complete, yet a chunk's handle is given
 * out before its copy is even queued. So each chunk's event is recorded at
 * once on a per-load gate stream behind a wait on a host flag; the flag is
 * set when the chunk's copies are done (or the load stops). On cuda the wait
 * is cuStreamWaitValue32 on registered host memory, so no CUDA callback
 * thread is ever blocked; on host it is a host function on the gate
 * stream's own thread.
 */
struct aeg_gate;

/* aeg_gate_create - a gate stream and @count flags, all closed. */
int aeg_gate_create(aeg_device_t *dev, int gpu, uint32_t count, struct aeg_gate **gate);

/* aeg_gate_arm - queue "wait for flag @index, then record @ev" on the gate stream. */
int aeg_gate_arm(struct aeg_gate *gate, uint32_t index, aeg_event_t *ev);

/* aeg_gate_open - set flag @index. No device call: safe in a stream host function. */
void aeg_gate_open(struct aeg_gate *gate, uint32_t index);

/* aeg_gate_destroy - open every flag, wait for the gate stream, free all. */
void aeg_gate_destroy(struct aeg_gate *gate);

#endif

/* aegaeon: GPU slabs, pinned pools, events, prefetch and KV swap for LLM inference jobs. */
#ifndef AEGAEON_H
#define AEGAEON_H

#include <aegaeon/version.h>
#include <aegaeon/error.h>
#include <aegaeon/log.h>
#include <aegaeon/size.h>
#include <aegaeon/config.h>
#include <aegaeon/topo.h>
#include <aegaeon/device.h>
#include <aegaeon/event.h>
#include <aegaeon/slab.h>
#include <aegaeon/pinned.h>
#include <aegaeon/slice.h>
#include <aegaeon/prefetch.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/attach.h>
#include <aegaeon/kv.h>
#include <aegaeon/session.h>

#endif

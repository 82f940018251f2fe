/* Slabs whose memory is mapped as they are used (never installed). */
#ifndef AEGAEON_SLAB_INTERNAL_H
#define AEGAEON_SLAB_INTERNAL_H

#include <stdint.h>

#include <aegaeon/slab.h>

/*
 * aeg_slab_create_reserved - a slab of @bytes (rounded up as by
 * aeg_slab_create) whose addresses are reserved now and whose memory is
 * mapped into them from the base up: by an allocation that reaches past
 * what is mapped (it waits for that piece alone) and by aeg_slab_map_rest.
 * Reserving 125 GiB costs microseconds where a cudaMalloc of them costs
 * milliseconds, so a process's first load need not wait for its slab. Its
 * memory has no IPC handle: aeg_slab_export is AEG_ENOTSUP. Errors as
 * aeg_slab_create's, and AEG_ENOTSUP where the device reserves no address
 * space (aeg_slab_create then makes the slab).
 */
int aeg_slab_create_reserved(aeg_device_t *dev, int gpu, uint64_t bytes, aeg_slab_t **slab);

/*
 * aeg_slab_map_rest - map memory behind the rest of a reserved slab, in
 * pieces of at most 8 GiB, so that it holds its share of the GPU; 0 at
 * once for a slab made otherwise. On an error (the GPU's memory taken
 * meanwhile) the slab keeps what it mapped, and an allocation past it
 * tries to map its piece then (AEG_ENOSPC when it cannot).
 */
int aeg_slab_map_rest(aeg_slab_t *slab);

/*
 * aeg_slab_map_ahead - map memory for @bytes more than the slab's live
 * blocks hold, in one piece, before allocations that need it come one by
 * one (a load allocating its blocks): one mapping of 8 GiB costs about
 * what one of 256 MiB does. A hint: 0 for a slab made otherwise or mapped
 * that far; on an error the allocations map what they need themselves.
 */
int aeg_slab_map_ahead(aeg_slab_t *slab, uint64_t bytes);

/* aeg_slab_mapped_bytes - bytes from the base backed by memory (all of a slab made otherwise). */
uint64_t aeg_slab_mapped_bytes(aeg_slab_t *slab);

#endif

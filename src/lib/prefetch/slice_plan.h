/* Tensor-parallel slice plans: where each tensor's part lies in the file and in a load (never installed). */
#ifndef AEGAEON_SLICE_PLAN_H
#define AEGAEON_SLICE_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include <aegaeon/device.h>
#include <aegaeon/slice.h>

#include "safetensors.h"

/*
 * A sliced load packs each tensor's part, in file order, one after the
 * other: byte k of the packed stream (counted from the file's data offset,
 * so a load's "packed" offsets and its file offsets agree on where data
 * starts) lands at the same offset of the load's chunks as file byte k
 * would in a whole load. A part is @rows runs of @width bytes, @pitch
 * apart in the file: one run for a tensor loaded whole or split along its
 * first dimension, one per outer index for a later one.
 */
struct slice_span {
	uint64_t src;                   /* file offset of the part's first byte */
	uint64_t width, pitch, rows;    /* pitch == width when rows is 1 */
	uint64_t out;                   /* packed offset of its first byte */
	uint64_t bytes;                 /* width * rows */
	const uint64_t *shape;          /* the part's shape, ndim entries */
	int dim;                        /* split along, or AEG_SLICE_WHOLE */
	uint64_t start, extent;         /* along dim: the part's first index, the file's extent */
};

struct slice_plan {
	struct aeg_slice *spec;         /* owned copy */
	size_t count;                   /* the header's tensors, in file order */
	struct slice_span *spans;
	uint64_t *shapes;
	uint64_t out_begin, out_end;    /* the packed bytes: [data offset, + the parts' bytes) */
};

/*
 * slice_plan_make - the parts of @hdr's tensors (file @path, for messages)
 * that @spec gives its rank. AEG_EINVAL (the spec, a dim a tensor does not
 * have, an uneven split without AEG_SLICE_UNEVEN, a part not starting at a
 * whole byte), AEG_ENOMEM. Free with slice_plan_free.
 */
int slice_plan_make(const struct aeg_slice *spec, const struct aeg_st_header *hdr, const char *path,
		    struct slice_plan *plan);
void slice_plan_free(struct slice_plan *plan);

/* slice_out_of - the packed offset of the first part byte at or after file offset @at. */
uint64_t slice_out_of(const struct slice_plan *plan, uint64_t at);

/* slice_file_of - the file offset packed byte @out comes from (@out inside a part). */
uint64_t slice_file_of(const struct slice_plan *plan, uint64_t out);

/* slice_file_end - the file offset after the last byte of @t's part (its first byte when empty). */
uint64_t slice_file_end(const struct slice_span *t);

/*
 * slice_copy - queue on @stream the copies of packed bytes [@lo, @hi) to
 * @dst from @host, which holds the file from offset @at on (every byte
 * they come from). A part's run of whole rows goes as one 2-D copy.
 */
int slice_copy(aeg_stream_t *stream, const struct slice_plan *plan, uint64_t lo, uint64_t hi, char *dst,
	       const char *host, uint64_t at);

/* Owned copies of a spec (rules and patterns in one allocation), and equality of two (NULL: none). */
int slice_dup(const struct aeg_slice *spec, struct aeg_slice **copy);
void slice_free(struct aeg_slice *spec);
int slice_equal(const struct aeg_slice *a, const struct aeg_slice *b);

/* slice_describe - "rank R of W, preset P, N rules" for logs and messages. */
void slice_describe(const struct aeg_slice *spec, char *buf, size_t len);

#endif

/* Safetensors header parsing and strict validation (private to the library). */
#ifndef AEGAEON_SAFETENSORS_H
#define AEGAEON_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

/* A header longer than this is refused: real ones are kilobytes to a few MiB. */
#define AEG_ST_MAX_HEADER_BYTES (100ull << 20)
#define AEG_ST_MAX_DIMS 32

struct aeg_st_tensor {
	char *name;
	char dtype[12];                 /* as in the file: "F32", "BF16", "F8_E4M3" */
	unsigned dtype_bits;            /* bits per element: 4, 6, 8, 16, 32, 64 */
	int ndim;
	uint64_t shape[AEG_ST_MAX_DIMS];
	uint64_t begin;                 /* data_offsets, from the start of the data */
	uint64_t end;
};

struct aeg_st_header {
	uint64_t header_bytes;          /* the JSON's length, as the first 8 bytes say */
	uint64_t data_offset;           /* 8 + header_bytes: where tensor data starts */
	uint64_t data_bytes;            /* bytes of tensor data, = file size - data_offset */
	size_t count;
	struct aeg_st_tensor *tensors;  /* sorted by begin (then end, then name) */
	size_t nmeta;                   /* "__metadata__" pairs, in the file's order */
	char **meta_keys, **meta_values;
};

/*
 * aeg_st_dtype_bits - bits per element of a safetensors dtype name, 0 when
 * the name is not one (names are case-sensitive, as in the format).
 */
unsigned aeg_st_dtype_bits(const char *dtype);

/*
 * aeg_st_parse - parse and validate the JSON header @json (@json_bytes, the
 * length the file's first 8 bytes give) of a file of @file_bytes. Checks:
 * root object; "__metadata__" only a string->string object; each tensor an
 * object of exactly dtype, shape, data_offsets; known dtype; shape of
 * non-negative integers (at most AEG_ST_MAX_DIMS) whose product times the
 * dtype size is the byte span; begin <= end; tensors tile the data exactly
 * (no gap, no overlap, starting at 0) and end where the file ends.
 * Returns 0 and fills @hdr (free with aeg_st_free), or AEG_EFORMAT with a
 * detail naming the tensor, the values and the rule, AEG_ENOMEM.
 */
int aeg_st_parse(const void *json, size_t json_bytes, uint64_t file_bytes,
		 struct aeg_st_header *hdr);

/*
 * aeg_st_read - read the 8-byte length and the header from @fd (with pread;
 * the offset of @fd is untouched) of a file of @file_bytes, and parse it.
 * Errors: AEG_EFORMAT (too short, length 0 or over AEG_ST_MAX_HEADER_BYTES,
 * or as aeg_st_parse), AEG_EIO, AEG_ENOMEM.
 */
int aeg_st_read(int fd, uint64_t file_bytes, struct aeg_st_header *hdr);

void aeg_st_free(struct aeg_st_header *hdr);

/*
 * aeg_st_detect - whether the file behind @fd (@file_bytes) is safetensors,
 * by its content: its first 8 bytes give a header length that fits the file
 * and the header starts with '{'. Returns 1 with @hdr parsed (free with
 * aeg_st_free), 0 for any other file. A file that looks like safetensors
 * but whose header does not parse is an error (AEG_EFORMAT, with what is
 * wrong) when @strict (the caller expects safetensors: a name ending in
 * ".safetensors"), else a raw file (0). Errors: AEG_EIO, AEG_ENOMEM too.
 */
int aeg_st_detect(int fd, uint64_t file_bytes, int strict, struct aeg_st_header *hdr);

#endif

/* libFuzzer target: safetensors headers (aeg_st_parse of a whole file held in memory, aeg_st_read of a memfd). */
#include <inttypes.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz.h"
#include "safetensors.h"

static const int parse_errors[] = { AEG_EFORMAT, AEG_ENOMEM, 0 };
static const int read_errors[] = { AEG_EFORMAT, AEG_ENOMEM, AEG_EIO, 0 };

/* What a parsed header promises the prefetch engine, which places chunks by it. */
static void check_header(const struct aeg_st_header *h, uint64_t json_bytes, uint64_t file_bytes)
{
	uint64_t pos = 0;

	FUZZ_CHECK(h->header_bytes == json_bytes && h->data_offset == 8 + json_bytes &&
		   h->data_bytes == file_bytes - h->data_offset,
		   "header %" PRIu64 ", data at %" PRIu64 ", %" PRIu64 " bytes, file %" PRIu64,
		   h->header_bytes, h->data_offset, h->data_bytes, file_bytes);
	FUZZ_CHECK(h->count == 0 || h->tensors != NULL, "%zu tensors, no array", h->count);
	for (size_t i = 0; i < h->count; i++) {
		const struct aeg_st_tensor *t = &h->tensors[i];
		uint64_t elems = 1, bits;

		FUZZ_CHECK(t->name != NULL, "tensor %zu has no name", i);
		FUZZ_CHECK(memchr(t->dtype, '\0', sizeof(t->dtype)) && aeg_st_dtype_bits(t->dtype) == t->dtype_bits &&
			   t->dtype_bits != 0, "tensor %zu: dtype '%.12s' of %u bits", i, t->dtype, t->dtype_bits);
		FUZZ_CHECK(t->ndim >= 0 && t->ndim <= AEG_ST_MAX_DIMS, "tensor %zu: %d dims", i, t->ndim);
		for (int d = 0; d < t->ndim; d++)
			FUZZ_CHECK(!__builtin_mul_overflow(elems, t->shape[d], &elems),
				   "tensor '%s': shape product past 64 bits accepted", t->name);
		FUZZ_CHECK(!__builtin_mul_overflow(elems, (uint64_t)t->dtype_bits, &bits),
			   "tensor '%s': bit count past 64 bits accepted", t->name);
		FUZZ_CHECK(t->begin <= t->end && bits % 8 == 0 && bits / 8 == t->end - t->begin,
			   "tensor '%s': [%" PRIu64 ", %" PRIu64 ") for %" PRIu64 " elements of %u bits",
			   t->name, t->begin, t->end, elems, t->dtype_bits);
		/* Sorted and tiling: each starts where the data so far ends. */
		FUZZ_CHECK(t->begin == pos, "tensor '%s' at %" PRIu64 ", data so far ends at %" PRIu64,
			   t->name, t->begin, pos);
		if (t->end > pos)
			pos = t->end;
	}
	FUZZ_CHECK(pos == h->data_bytes, "tensors end at %" PRIu64 ", data is %" PRIu64 " bytes", pos,
		   h->data_bytes);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * The input is the JSON header, then optionally a NUL byte and the tensor
 * data: mutations of the JSON then keep the file consistent, where a raw
 * file's 8-byte length would no longer match its header. The file is put
 * together from them and parsed in memory as aeg_st_read would; one input
 * in 64 also goes through aeg_st_read on a memfd, which must agree.
 */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int memfd = -1;
	static unsigned calls;
	struct aeg_st_header hdr, hdr2;
	const uint8_t *nul = memchr(data, '\0', size);
	size_t json_bytes = nul ? (size_t)(nul - data) : size;
	size_t file_bytes = nul ? 8 + size - 1 : 8 + size;
	unsigned char *file;
	int rc, rc2;

	if (json_bytes == 0)
		return -1;      /* aeg_st_read refuses a length of 0 before parsing */
	file = malloc(file_bytes);
	FUZZ_CHECK(file != NULL, "out of memory");
	for (int i = 0; i < 8; i++)
		file[i] = (unsigned char)((uint64_t)json_bytes >> (8 * i));
	memcpy(file + 8, data, json_bytes);
	if (nul)
		memcpy(file + 8 + json_bytes, nul + 1, size - json_bytes - 1);

	aeg_error_clear();
	rc = aeg_st_parse(file + 8, json_bytes, file_bytes, &hdr);
	if (rc < 0) {
		fuzz_check_error(rc, parse_errors);
		/* The header is a downloaded file's: none of its bytes reach a message raw. */
		fuzz_check_printable(aeg_error_detail(), "safetensors error detail");
		FUZZ_CHECK(hdr.tensors == NULL && hdr.count == 0, "a failed parse left %zu tensors", hdr.count);
	} else {
		FUZZ_CHECK(rc == 0, "aeg_st_parse returned %d", rc);
		check_header(&hdr, json_bytes, file_bytes);
	}

	if (calls++ % 64 == 0) {
		if (memfd < 0)
			memfd = memfd_create("fuzz-safetensors", MFD_CLOEXEC);
		FUZZ_CHECK(memfd >= 0 && ftruncate(memfd, 0) == 0 &&
			   pwrite(memfd, file, file_bytes, 0) == (ssize_t)file_bytes, "writing the memfd failed");
		aeg_error_clear();
		rc2 = aeg_st_read(memfd, file_bytes, &hdr2);
		FUZZ_CHECK(rc2 == rc, "aeg_st_read gave %d, aeg_st_parse %d", rc2, rc);
		if (rc2 < 0) {
			fuzz_check_error(rc2, read_errors);
			fuzz_check_printable(aeg_error_detail(), "safetensors read error detail");
		} else {
			FUZZ_CHECK(hdr2.count == hdr.count, "aeg_st_read found %zu tensors, aeg_st_parse %zu",
				   hdr2.count, hdr.count);
			for (size_t i = 0; i < hdr.count; i++)
				FUZZ_CHECK(strcmp(hdr.tensors[i].name, hdr2.tensors[i].name) == 0 &&
					   hdr.tensors[i].begin == hdr2.tensors[i].begin,
					   "tensor %zu differs between aeg_st_read and aeg_st_parse", i);
			aeg_st_free(&hdr2);
		}
	}
	if (rc == 0)
		aeg_st_free(&hdr);
	free(file);
	return 0;
}

/* Safetensors header: 8-byte little-endian length, JSON table, strict checks. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "internal.h"
#include "safetensors.h"

static const struct {
	const char *name;
	unsigned bits;
} dtypes[] = {
	{ "BOOL", 8 }, { "U8", 8 }, { "I8", 8 }, { "F8_E5M2", 8 }, { "F8_E4M3", 8 },
	{ "F8_E8M0", 8 }, { "F4", 4 }, { "F6_E2M3", 6 }, { "F6_E3M2", 6 },
	{ "I16", 16 }, { "U16", 16 }, { "F16", 16 }, { "BF16", 16 },
	{ "I32", 32 }, { "U32", 32 }, { "F32", 32 },
	{ "I64", 64 }, { "U64", 64 }, { "F64", 64 }, { "C64", 64 },
};

unsigned aeg_st_dtype_bits(const char *dtype)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(dtypes); i++)
		if (strcmp(dtype, dtypes[i].name) == 0)
			return dtypes[i].bits;
	return 0;
}

static int get_u64(json_t *v, uint64_t *out)
{
	if (!json_is_integer(v) || json_integer_value(v) < 0)
		return -1;
	*out = (uint64_t)json_integer_value(v);
	return 0;
}

/* "__metadata__": an object of strings only, kept in @hdr. */
static int parse_metadata(json_t *meta, struct aeg_st_header *hdr)
{
	size_t n = 0, size;
	const char *key;
	json_t *v;

	if (!json_is_object(meta))
		return aeg_fail(AEG_EFORMAT, "safetensors: \"__metadata__\" is not an object");
	size = json_object_size(meta);
	hdr->meta_keys = calloc(size + 1, sizeof(*hdr->meta_keys));
	hdr->meta_values = calloc(size + 1, sizeof(*hdr->meta_values));
	if (hdr->meta_keys == NULL || hdr->meta_values == NULL)
		return aeg_fail(AEG_ENOMEM, "safetensors: out of memory for %zu metadata entries", size);
	json_object_foreach(meta, key, v) {
		char k[AEG_NAME_SHOWN];

		if (!json_is_string(v))
			return aeg_fail(AEG_EFORMAT, "safetensors: \"__metadata__\" value of \"%s\" is not a string",
					aeg_quote(key, k, sizeof(k)));
		hdr->meta_keys[n] = strdup(key);
		hdr->meta_values[n] = strdup(json_string_value(v));
		hdr->nmeta = ++n;
		if (hdr->meta_keys[n - 1] == NULL || hdr->meta_values[n - 1] == NULL)
			return aeg_fail(AEG_ENOMEM, "safetensors: out of memory");
	}
	return 0;
}

static int parse_tensor(const char *name, json_t *obj, struct aeg_st_tensor *t)
{
	json_t *dtype, *shape, *offs, *v;
	const char *key, *dt;
	uint64_t elems = 1, bits, span;
	char n[AEG_NAME_SHOWN], k[AEG_NAME_SHOWN];
	size_t i;

	aeg_quote(name, n, sizeof(n));
	if (!json_is_object(obj))
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\" is not an object", n);
	json_object_foreach(obj, key, v) {
		if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets"))
			return aeg_fail(AEG_EFORMAT,
					"safetensors: tensor \"%s\": unknown key \"%s\" (expected dtype, shape, data_offsets)",
					n, aeg_quote(key, k, sizeof(k)));
	}
	dtype = json_object_get(obj, "dtype");
	shape = json_object_get(obj, "shape");
	offs = json_object_get(obj, "data_offsets");
	if (dtype == NULL || shape == NULL || offs == NULL)
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\" lacks \"%s\"", n,
				dtype == NULL ? "dtype" : shape == NULL ? "shape" : "data_offsets");

	if (!json_is_string(dtype))
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\": dtype is not a string", n);
	dt = json_string_value(dtype);
	t->dtype_bits = aeg_st_dtype_bits(dt);
	if (t->dtype_bits == 0)
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\": unknown dtype \"%s\"",
				n, aeg_quote(dt, k, sizeof(k)));
	snprintf(t->dtype, sizeof(t->dtype), "%s", dt);

	if (!json_is_array(shape))
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\": shape is not an array", n);
	if (json_array_size(shape) > AEG_ST_MAX_DIMS)
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\": %zu dimensions, at most %d",
				n, json_array_size(shape), AEG_ST_MAX_DIMS);
	t->ndim = (int)json_array_size(shape);
	json_array_foreach(shape, i, v) {
		if (get_u64(v, &t->shape[i]))
			return aeg_fail(AEG_EFORMAT,
					"safetensors: tensor \"%s\": shape[%zu] is not a non-negative integer",
					n, i);
		if (__builtin_mul_overflow(elems, t->shape[i], &elems))
			return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\": shape overflows 64 bits",
					n);
	}

	if (!json_is_array(offs) || json_array_size(offs) != 2 ||
	    get_u64(json_array_get(offs, 0), &t->begin) ||
	    get_u64(json_array_get(offs, 1), &t->end))
		return aeg_fail(AEG_EFORMAT,
				"safetensors: tensor \"%s\": data_offsets is not [begin, end] of non-negative integers",
				n);
	if (t->begin > t->end)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] ends before it begins",
				n, t->begin, t->end);

	if (__builtin_mul_overflow(elems, (uint64_t)t->dtype_bits, &bits))
		return aeg_fail(AEG_EFORMAT, "safetensors: tensor \"%s\": size overflows 64 bits", n);
	span = t->end - t->begin;
	if (bits % 8 != 0 || bits / 8 != span)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: tensor \"%s\": %" PRIu64 " elements of %s make %" PRIu64
				"%s bytes, but data_offsets span %" PRIu64,
				n, elems, t->dtype, bits / 8, bits % 8 ? ".x" : "", span);
	return 0;
}

static int cmp_tensor(const void *a, const void *b)
{
	const struct aeg_st_tensor *x = a, *y = b;

	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	if (x->end != y->end)
		return x->end < y->end ? -1 : 1;
	return strcmp(x->name, y->name);
}

/* The tensors, sorted, must tile [0, data_bytes) exactly: the format has no holes. */
static int check_layout(const struct aeg_st_header *hdr, uint64_t file_bytes)
{
	uint64_t pos = 0;
	const char *prev = NULL;

	for (size_t i = 0; i < hdr->count; i++) {
		const struct aeg_st_tensor *t = &hdr->tensors[i];

		char a[AEG_NAME_SHOWN], b[AEG_NAME_SHOWN];

		if (t->begin < pos)
			return aeg_fail(AEG_EFORMAT,
					"safetensors: tensors \"%s\" and \"%s\" overlap (%" PRIu64 " < %" PRIu64 ")",
					aeg_quote(prev, a, sizeof(a)), aeg_quote(t->name, b, sizeof(b)), t->begin, pos);
		if (t->begin > pos)
			return aeg_fail(AEG_EFORMAT,
					"safetensors: %" PRIu64 " bytes of data before tensor \"%s\" belong to no tensor",
					t->begin - pos, aeg_quote(t->name, b, sizeof(b)));
		if (t->end > pos) {
			pos = t->end;
			prev = t->name;
		}
	}
	if (pos > hdr->data_bytes)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: file is %" PRIu64 " bytes, shorter than its header says (%" PRIu64 ")",
				file_bytes, hdr->data_offset + pos);
	if (pos < hdr->data_bytes)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: %" PRIu64 " bytes after the last tensor belong to no tensor (file %" PRIu64
				" bytes, header says %" PRIu64 ")",
				hdr->data_bytes - pos, file_bytes, hdr->data_offset + pos);
	return 0;
}

int aeg_st_parse(const void *json, size_t json_bytes, uint64_t file_bytes,
		 struct aeg_st_header *hdr)
{
	json_error_t jerr;
	json_t *root, *v;
	const char *key;
	size_t n = 0;
	int err;

	memset(hdr, 0, sizeof(*hdr));
	hdr->header_bytes = json_bytes;
	hdr->data_offset = 8 + (uint64_t)json_bytes;
	if (file_bytes < hdr->data_offset)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: file is %" PRIu64 " bytes, shorter than its header (%" PRIu64 ")",
				file_bytes, hdr->data_offset);
	hdr->data_bytes = file_bytes - hdr->data_offset;

	root = json_loadb(json, json_bytes, JSON_REJECT_DUPLICATES, &jerr);
	if (root == NULL) {
		char why[sizeof(jerr.text)];    /* jansson's text may quote the header's bytes */

		return aeg_fail(AEG_EFORMAT, "safetensors: header is not valid JSON: %s (byte %d)",
				aeg_quote(jerr.text, why, sizeof(why)), jerr.position);
	}
	if (!json_is_object(root)) {
		err = aeg_fail(AEG_EFORMAT, "safetensors: header is not a JSON object");
		goto out;
	}

	hdr->tensors = calloc(json_object_size(root) + 1, sizeof(*hdr->tensors));
	if (hdr->tensors == NULL) {
		err = aeg_fail(AEG_ENOMEM, "safetensors: out of memory for %zu tensors",
			       json_object_size(root));
		goto out;
	}
	json_object_foreach(root, key, v) {
		if (strcmp(key, "__metadata__") == 0) {
			err = parse_metadata(v, hdr);
			if (err)
				goto out;
			continue;
		}
		hdr->tensors[n].name = strdup(key);
		if (hdr->tensors[n].name == NULL) {
			err = aeg_fail(AEG_ENOMEM, "safetensors: out of memory");
			goto out;
		}
		hdr->count = ++n;
		err = parse_tensor(key, v, &hdr->tensors[n - 1]);
		if (err)
			goto out;
	}
	qsort(hdr->tensors, hdr->count, sizeof(*hdr->tensors), cmp_tensor);
	err = check_layout(hdr, file_bytes);
out:
	json_decref(root);
	if (err)
		aeg_st_free(hdr);
	return err;
}

static int pread_all(int fd, void *buf, size_t bytes, uint64_t off)
{
	ssize_t r = aeg_pread_full(fd, buf, bytes, bytes, off);

	if (r < 0)
		return aeg_fail(AEG_EIO, "safetensors: reading the header: %s", strerror((int)-r));
	if ((size_t)r < bytes)
		return aeg_fail(AEG_EFORMAT, "safetensors: file ended inside its header");
	return 0;
}

int aeg_st_read(int fd, uint64_t file_bytes, struct aeg_st_header *hdr)
{
	unsigned char le[8];
	uint64_t len = 0;
	char *json;
	int err;

	memset(hdr, 0, sizeof(*hdr));
	if (file_bytes < 8)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: file is %" PRIu64 " bytes, shorter than the 8-byte header length",
				file_bytes);
	err = pread_all(fd, le, sizeof(le), 0);
	if (err)
		return err;
	for (int i = 7; i >= 0; i--)
		len = len << 8 | le[i];
	if (len == 0)
		return aeg_fail(AEG_EFORMAT, "safetensors: header length is 0");
	if (len > AEG_ST_MAX_HEADER_BYTES)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: header length %" PRIu64 " is over the %llu MiB cap (not a safetensors file?)",
				len, AEG_ST_MAX_HEADER_BYTES >> 20);
	if (len > file_bytes - 8)
		return aeg_fail(AEG_EFORMAT,
				"safetensors: file is %" PRIu64 " bytes, shorter than its header (%" PRIu64 ")",
				file_bytes, 8 + len);

	json = malloc(len);
	if (json == NULL)
		return aeg_fail(AEG_ENOMEM, "safetensors: out of memory for a %" PRIu64 "-byte header", len);
	err = pread_all(fd, json, len, 8);
	if (err == 0)
		err = aeg_st_parse(json, len, file_bytes, hdr);
	free(json);
	return err;
}

void aeg_st_free(struct aeg_st_header *hdr)
{
	if (hdr == NULL)
		return;
	for (size_t i = 0; i < hdr->count; i++)
		free(hdr->tensors[i].name);
	free(hdr->tensors);
	for (size_t i = 0; hdr->meta_keys != NULL && i <= hdr->nmeta; i++) {
		free(hdr->meta_keys[i]);
		free(hdr->meta_values[i]);
	}
	free(hdr->meta_keys);
	free(hdr->meta_values);
	hdr->tensors = NULL;
	hdr->count = 0;
	hdr->meta_keys = hdr->meta_values = NULL;
	hdr->nmeta = 0;
}

int aeg_st_detect(int fd, uint64_t file_bytes, int strict, struct aeg_st_header *hdr)
{
	unsigned char head[9];
	uint64_t len = 0;
	int err;

	memset(hdr, 0, sizeof(*hdr));
	if (strict) {
		err = aeg_st_read(fd, file_bytes, hdr);
		return err ? err : 1;
	}
	if (file_bytes < sizeof(head))
		return 0;
	err = pread_all(fd, head, sizeof(head), 0);
	if (err)
		return err == AEG_EFORMAT ? 0 : err;
	for (int i = 7; i >= 0; i--)
		len = len << 8 | head[i];
	if (len < 2 || len > AEG_ST_MAX_HEADER_BYTES || len > file_bytes - 8 || head[8] != '{')
		return 0;
	err = aeg_st_read(fd, file_bytes, hdr);
	if (err == AEG_EFORMAT) {
		aeg_debug("not taken as safetensors: %s", aeg_error_detail());
		aeg_error_clear();
		return 0;
	}
	return err ? err : 1;
}

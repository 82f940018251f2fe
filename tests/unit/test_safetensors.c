/* Safetensors header parser: valid tables and each malformed header with its error. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "safetensors.h"

static int parse(const char *json, uint64_t data_bytes, struct aeg_st_header *hdr)
{
	size_t len = strlen(json);

	return aeg_st_parse(json, len, 8 + len + data_bytes, hdr);
}

static void valid_table(void **state)
{
	const char *json =
		"{\"__metadata__\":{\"format\":\"pt\"},"
		"\"b\":{\"dtype\":\"BF16\",\"shape\":[3,5],\"data_offsets\":[16,46]},"
		"\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
		"\"empty\":{\"dtype\":\"I64\",\"shape\":[0,7],\"data_offsets\":[46,46]},"
		"\"scalar\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[46,47]},"
		"\"nib\":{\"dtype\":\"F4\",\"shape\":[6],\"data_offsets\":[47,50]}}    ";
	struct aeg_st_header h;

	assert_int_equal(parse(json, 50, &h), 0);
	assert_int_equal(h.count, 5);
	assert_int_equal(h.header_bytes, strlen(json));
	assert_int_equal(h.data_offset, 8 + strlen(json));
	assert_int_equal(h.data_bytes, 50);
	/* Sorted by offset; the empty tensor sorts before the one starting where it sits. */
	assert_string_equal(h.tensors[0].name, "a");
	assert_string_equal(h.tensors[1].name, "b");
	assert_string_equal(h.tensors[1].dtype, "BF16");
	assert_int_equal(h.tensors[1].ndim, 2);
	assert_int_equal(h.tensors[1].shape[1], 5);
	assert_string_equal(h.tensors[2].name, "empty");
	assert_int_equal(h.tensors[2].begin, h.tensors[2].end);
	assert_string_equal(h.tensors[3].name, "scalar");
	assert_int_equal(h.tensors[3].ndim, 0);
	assert_string_equal(h.tensors[4].name, "nib");
	assert_int_equal(h.tensors[4].dtype_bits, 4);
	assert_int_equal(h.nmeta, 1);
	assert_string_equal(h.meta_keys[0], "format");
	assert_string_equal(h.meta_values[0], "pt");
	aeg_st_free(&h);
	assert_null(h.tensors);
	assert_null(h.meta_keys);
	assert_int_equal(h.nmeta, 0);
}

static void only_metadata(void **state)
{
	struct aeg_st_header h;

	assert_int_equal(parse("{\"__metadata__\":{}}", 0, &h), 0);
	assert_int_equal(h.count, 0);
	aeg_st_free(&h);
	assert_int_equal(parse("{}", 0, &h), 0);
	aeg_st_free(&h);
}

static const struct bad {
	const char *json;
	uint64_t data_bytes;
	const char *detail;     /* a piece of the message the user must see */
} bad[] = {
	{ "", 0, "not valid JSON" },
	{ "{", 0, "not valid JSON" },
	{ "[]", 0, "not a JSON object" },
	{ "{\"a\":1}", 0, "\"a\" is not an object" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "lacks \"data_offsets\"" },
	{ "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "lacks \"dtype\"" },
	{ "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "lacks \"shape\"" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4, "unknown key \"x\"" },
	{ "{\"a\":{\"dtype\":\"F31\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype \"F31\"" },
	{ "{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype \"f32\"" },
	{ "{\"a\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "dtype is not a string" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4, "shape is not an array" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape[0] is not a non-negative" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4, "shape[0] is not a non-negative" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, "shape[0] is not a non-negative" },
	{ "{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, "overflows 64 bits" },
	{ "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"
	  "\"data_offsets\":[0,1]}}", 1, "33 dimensions, at most 32" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "data_offsets is not [begin, end]" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 4, "data_offsets is not [begin, end]" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,-4]}}", 4, "data_offsets is not [begin, end]" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{}}}", 4, "data_offsets is not [begin, end]" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4, "ends before it begins" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "2 elements of F32 make 8 bytes, but data_offsets span 4" },
	{ "{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,1]}}", 1, "make 1.x bytes" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
	  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "\"a\" and \"b\" overlap" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "4 bytes of data before tensor \"a\"" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
	  "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "before tensor \"b\" belong to no tensor" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 15, "shorter than its header says" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 17, "1 bytes after the last tensor" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
	  "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "not valid JSON" },
	{ "{\"__metadata__\":[]}", 0, "\"__metadata__\" is not an object" },
	{ "{\"__metadata__\":{\"k\":1}}", 0, "value of \"k\" is not a string" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x", 4, "not valid JSON" },
	{ "{\"\xff\":{}}", 0, "not valid JSON" },
	/* A downloaded header's bytes reach the message only quoted: control bytes as '?'. */
	{ "{\"a\\u001b[2J\":1}", 0, "tensor \"a?[2J\" is not an object" },
	{ "{\"a\":{\"dtype\":\"F\\u001b32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype \"F?32\"" },
	{ "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"\\n\":1}}", 4, "unknown key \"?\"" },
	{ "{\"__metadata__\":{\"k\\u0007\":1}}", 0, "value of \"k?\" is not a string" },
	{ "{\"a\\r\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
	  "\"b\\t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "\"a?\" and \"b?\" overlap" },
	{ "{\"a\x1b[31m\":{}}", 0, "not valid JSON" },
};

static void assert_printable(const char *text)
{
	for (const unsigned char *p = (const unsigned char *)text; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			fail_msg("control byte 0x%02x at %zu of \"%s\"", *p, (size_t)(p - (const unsigned char *)text),
				 text);
}

static void malformed_headers(void **state)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		struct aeg_st_header h;
		int err = parse(bad[i].json, bad[i].data_bytes, &h);

		if (err != AEG_EFORMAT || strstr(aeg_error_detail(), bad[i].detail) == NULL)
			fail_msg("case %zu (%s): got %s \"%s\", want AEG_EFORMAT \"%s\"", i, bad[i].json,
				 aeg_errname(err), aeg_error_detail(), bad[i].detail);
		assert_printable(aeg_error_detail());
		assert_null(h.tensors);
		assert_int_equal(h.count, 0);
	}
}

/* A long name is shown to its first 128 characters, then "...". */
static void long_names_cut(void **state)
{
	char json[512], want[160];
	struct aeg_st_header h;

	snprintf(json, sizeof(json), "{\"%0300d\":1}", 7);
	assert_int_equal(parse(json, 0, &h), AEG_EFORMAT);
	snprintf(want, sizeof(want), "tensor \"%0128d...\" is not an object", 0);
	if (strstr(aeg_error_detail(), want) == NULL)
		fail_msg("\"%s\" does not show the name as \"%s\"", aeg_error_detail(), want);
}

static int write_file(const char *path, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	if (fd < 0 || write(fd, buf, len) != (ssize_t)len) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return close(fd);
}

static int read_file(const char *path, struct aeg_st_header *h)
{
	int fd = open(path, O_RDONLY);
	off_t size;
	int err;

	assert_true(fd >= 0);
	size = lseek(fd, 0, SEEK_END);
	err = aeg_st_read(fd, (uint64_t)size, h);
	close(fd);
	return err;
}

static void length_field(void **state)
{
	char path[] = "/tmp/aegaeon-st-XXXXXX";
	unsigned char buf[64] = { 0 };
	const char *json = "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}";
	size_t len = strlen(json);
	struct aeg_st_header h;
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	close(fd);

	/* Shorter than the 8-byte length. */
	assert_int_equal(write_file(path, buf, 5), 0);
	assert_int_equal(read_file(path, &h), AEG_EFORMAT);
	assert_non_null(strstr(aeg_error_detail(), "5 bytes, shorter than the 8-byte"));

	/* Length 0. */
	assert_int_equal(write_file(path, buf, 16), 0);
	assert_int_equal(read_file(path, &h), AEG_EFORMAT);
	assert_non_null(strstr(aeg_error_detail(), "header length is 0"));

	/* Over the cap, little-endian: 0x0000000100000000. */
	buf[4] = 1;
	assert_int_equal(write_file(path, buf, 16), 0);
	assert_int_equal(read_file(path, &h), AEG_EFORMAT);
	assert_non_null(strstr(aeg_error_detail(), "over the 100 MiB cap"));

	/* Longer than the file. */
	memset(buf, 0, sizeof(buf));
	buf[0] = 200;
	assert_int_equal(write_file(path, buf, 64), 0);
	assert_int_equal(read_file(path, &h), AEG_EFORMAT);
	assert_non_null(strstr(aeg_error_detail(), "64 bytes, shorter than its header (208)"));

	/* A good one, then the same one cut inside its data. */
	memset(buf, 0, sizeof(buf));
	buf[0] = (unsigned char)len;
	memcpy(buf + 8, json, len);
	assert_int_equal(write_file(path, buf, 8 + len + 2), 0);
	assert_int_equal(read_file(path, &h), 0);
	assert_int_equal(h.count, 1);
	assert_int_equal(h.data_offset, 8 + len);
	aeg_st_free(&h);
	assert_int_equal(write_file(path, buf, 8 + len + 1), 0);
	assert_int_equal(read_file(path, &h), AEG_EFORMAT);
	assert_non_null(strstr(aeg_error_detail(), "shorter than its header says"));
	unlink(path);
}

/* Safetensors by content, whatever the name; a file that only looks like one is raw unless strict. */
static void detect_by_content(void **state)
{
	static const struct {
		const char *bytes;
		size_t len;
		int strict, want;               /* 1 safetensors, 0 raw, or the error */
		const char *detail;
	} cases[] = {
		{ "\x4e\0\0\0\0\0\0\0{\"__metadata__\":{\"a\":\"b\"},\"t\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}xy",
		  88, 0, 1, NULL },
		/* The same header, a byte of data short: raw, or the format error when strict. */
		{ "\x4e\0\0\0\0\0\0\0{\"__metadata__\":{\"a\":\"b\"},\"t\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}x",
		  87, 0, 0, NULL },
		{ "\x4e\0\0\0\0\0\0\0{\"__metadata__\":{\"a\":\"b\"},\"t\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}x",
		  87, 1, AEG_EFORMAT, "shorter than its header says" },
		{ "\x10\0\0\0\0\0\0\0not json at all!", 24, 0, 0, NULL },
		{ "\x10\0\0\0\0\0\0\0not json at all!", 24, 1, AEG_EFORMAT, "not valid JSON" },
		{ "\x10\0\0\0\0\0\0\0{not json at al}", 24, 0, 0, NULL },
		{ "PK\x03\x04 a zip file, say", 0, 0, 0, NULL },
		{ "\xff\xff\xff\xff\xff\xff\xff\x7f{", 9, 0, 0, NULL },
		{ "tiny", 0, 0, 0, NULL },
		{ "tiny", 0, 1, AEG_EFORMAT, "shorter than the 8-byte" },
	};
	char path[] = "/tmp/aegaeon-st-XXXXXX";
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	close(fd);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		size_t len = cases[i].len ? cases[i].len : strlen(cases[i].bytes);
		struct aeg_st_header h;
		int got;

		assert_int_equal(write_file(path, cases[i].bytes, len), 0);
		fd = open(path, O_RDONLY);
		assert_true(fd >= 0);
		got = aeg_st_detect(fd, len, cases[i].strict, &h);
		close(fd);
		if (got != cases[i].want || (cases[i].detail && !strstr(aeg_error_detail(), cases[i].detail)))
			fail_msg("case %zu: got %d \"%s\", want %d \"%s\"", i, got, aeg_error_detail(), cases[i].want,
				 cases[i].detail ? cases[i].detail : "");
		if (got == 1) {
			assert_int_equal(h.count, 1);
			assert_int_equal(h.nmeta, 1);
			assert_string_equal(h.meta_values[0], "b");
		} else {
			assert_null(h.tensors);
		}
		aeg_st_free(&h);
	}
	unlink(path);
}

static void dtype_sizes(void **state)
{
	assert_int_equal(aeg_st_dtype_bits("BOOL"), 8);
	assert_int_equal(aeg_st_dtype_bits("F8_E4M3"), 8);
	assert_int_equal(aeg_st_dtype_bits("F6_E3M2"), 6);
	assert_int_equal(aeg_st_dtype_bits("BF16"), 16);
	assert_int_equal(aeg_st_dtype_bits("C64"), 64);
	assert_int_equal(aeg_st_dtype_bits("bf16"), 0);
	assert_int_equal(aeg_st_dtype_bits(""), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(valid_table),
		cmocka_unit_test(only_metadata),
		cmocka_unit_test(malformed_headers),
		cmocka_unit_test(long_names_cut),
		cmocka_unit_test(length_field),
		cmocka_unit_test(detect_by_content),
		cmocka_unit_test(dtype_sizes),
	};
	return cmocka_run_group_tests_name("safetensors", tests, NULL, NULL);
}

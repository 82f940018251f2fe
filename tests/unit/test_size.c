/* Size strings: parsing (good and bad tables), resolving percentages, formatting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define GiB (1ull << 30)
#define TiB (1ull << 40)

static const struct {
	const char *text;
	uint64_t bytes;
	uint32_t ppm;
	int is_percent;
} good[] = {
	{ "0", 0, 0, 0 },
	{ "4096", 4096, 0, 0 },
	{ "007", 7, 0, 0 },
	{ "4096B", 4096, 0, 0 },
	{ "4096b", 4096, 0, 0 },
	{ "64KiB", 64 * KiB, 0, 0 },
	{ "64k", 64 * KiB, 0, 0 },
	{ "64KIB", 64 * KiB, 0, 0 },
	{ "1M", MiB, 0, 0 },
	{ "3mib", 3 * MiB, 0, 0 },
	{ "1.5GiB", 1610612736ull, 0, 0 },
	{ "1.5G", 1610612736ull, 0, 0 },
	{ "0.5GiB", 512 * MiB, 0, 0 },
	{ "40G", 40 * GiB, 0, 0 },
	{ "40g", 40 * GiB, 0, 0 },
	{ "40GB", 40000000000ull, 0, 0 },
	{ "40gb", 40000000000ull, 0, 0 },
	{ "2T", 2 * TiB, 0, 0 },
	{ "2TiB", 2 * TiB, 0, 0 },
	{ "2TB", 2000000000000ull, 0, 0 },
	{ "1KB", 1000, 0, 0 },
	{ "1.5MB", 1500000, 0, 0 },
	{ "  40 GiB\t", 40 * GiB, 0, 0 },
	{ "1.5 MiB", 1572864, 0, 0 },
	{ "0.1KiB", 102, 0, 0 },			/* 102.4 rounded down */
	{ "0.001K", 1, 0, 0 },				/* 1.024 */
	{ "1.000000001GiB", GiB + 1, 0, 0 },		/* 9 fraction digits: 1.073741824 */
	{ "0.999999999KiB", 1023, 0, 0 },		/* 1023.99999 rounded down */
	{ "1.25KB", 1250, 0, 0 },
	{ "18446744073709551615", UINT64_MAX, 0, 0 },
	{ "15.999999999TiB", 17592186043316ull, 0, 0 },	/* 16 TiB - 1099.5 B, rounded down: - 1100 */
	{ "16777215.999999999T", UINT64_MAX - 1099, 0, 0 },	/* 2^64 - 1100: the largest near the top */
	{ "1P", 1ull << 50, 0, 0 },
	{ "2.5 PiB", 5ull << 49, 0, 0 },
	{ "1 EiB", 1ull << 60, 0, 0 },
	{ "15.99e", 18435214858663483146ull, 0, 0 },	/* 15.99 * 2^60, rounded down */
	{ "3PB", 3000000000000000ull, 0, 0 },
	{ "18.446744073EB", 18446744073000000000ull, 0, 0 },
	{ "90%", 0, 900000, 1 },
	{ "12.5%", 0, 125000, 1 },
	{ "100%", 0, 1000000, 1 },
	{ "100.000%", 0, 1000000, 1 },
	{ "0%", 0, 0, 1 },
	{ "0.0001%", 0, 1, 1 },
	{ "0.00019%", 0, 1, 1 },			/* 1.9 ppm rounded down */
	{ " 50 % ", 0, 500000, 1 },
};

static const struct {
	const char *text;
	int err;
	const char *detail;	/* a piece the detail must contain */
} bad[] = {
	{ "", AEG_EINVAL, "'' is empty" },
	{ "   ", AEG_EINVAL, "is empty" },
	{ "\t", AEG_EINVAL, "is empty" },
	{ "-1", AEG_EINVAL, "'-1': no sign" },
	{ "+1G", AEG_EINVAL, "'+1G': no sign" },
	{ "-0", AEG_EINVAL, "no sign" },
	{ "18446744073709551616", AEG_ERANGE, "'18446744073709551616' does not fit" },
	{ "99999999999999999999999", AEG_ERANGE, "does not fit" },
	{ "16777216T", AEG_ERANGE, "'16777216T' does not fit" },
	{ "16384PiB", AEG_ERANGE, "'16384PiB' does not fit" },
	{ "16E", AEG_ERANGE, "does not fit" },
	{ "18.446744074EB", AEG_ERANGE, "does not fit" },
	{ "1ZiB", AEG_EINVAL, "unknown unit 'ZiB'" },
	{ "17179869184G", AEG_ERANGE, "does not fit" },
	{ "18446744073709551615K", AEG_ERANGE, "does not fit" },
	{ "18446744073709551615.5K", AEG_ERANGE, "does not fit" },
	{ "16777215.9999999999T", AEG_EINVAL, "more than 9 digits" },
	{ "40Q", AEG_EINVAL, "unknown unit 'Q'" },
	{ "40GiBs", AEG_EINVAL, "unknown unit 'GiBs'" },
	{ "40 G B", AEG_EINVAL, "'40 G B': unexpected text after the unit" },
	{ "40G x", AEG_EINVAL, "unexpected text" },
	{ "40Gi", AEG_EINVAL, "unknown unit 'Gi'" },
	{ "1.5", AEG_EINVAL, "'1.5': a byte count cannot have a fraction" },
	{ "1.5B", AEG_EINVAL, "cannot have a fraction" },
	{ "101%", AEG_EINVAL, "'101%': a percentage must be at most 100%" },
	{ "100.0000001%", AEG_EINVAL, "at most 100%" },
	{ "1000%", AEG_EINVAL, "at most 100%" },
	{ "90%%", AEG_EINVAL, "unknown unit '%%'" },
	{ "%", AEG_EINVAL, "does not start with a digit" },
	{ "0x10", AEG_EINVAL, "unknown unit 'x10'" },
	{ "0x1000G", AEG_EINVAL, "'0x1000G'" },
	{ "inf", AEG_EINVAL, "'inf' does not start with a digit" },
	{ "nan", AEG_EINVAL, "'nan' does not start with a digit" },
	{ "1e9", AEG_EINVAL, "unknown unit 'e9'" },
	{ "1.2.3GiB", AEG_EINVAL, "unknown unit '.3GiB'" },
	{ "1..5G", AEG_EINVAL, "a digit must follow the decimal point" },
	{ "1.G", AEG_EINVAL, "a digit must follow" },
	{ ".5GiB", AEG_EINVAL, "'.5GiB' does not start with a digit" },
	{ "GiB", AEG_EINVAL, "'GiB' does not start with a digit" },
	{ "1,5G", AEG_EINVAL, "unknown unit ',5G'" },
	{ "1 000", AEG_EINVAL, "unknown unit '000'" },
	{ "1.0000000001G", AEG_EINVAL, "more than 9 digits after the decimal point" },
	{ "4G\n", AEG_EINVAL, "unknown unit 'G?'" },
	{ "4G\x1b[31m", AEG_EINVAL, "'4G?[31m'" },
};

static void parses_good_sizes_exactly(void **state)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(good); i++) {
		struct aeg_size_spec spec = { .bytes = 12345, .ppm = 6789, .is_percent = -1 };
		int rc = aeg_size_spec_parse(good[i].text, &spec);

		if (rc != 0)
			fail_msg("'%s': %s (%s)", good[i].text, aeg_errname(rc), aeg_error_detail());
		if (spec.bytes != good[i].bytes || spec.ppm != good[i].ppm || spec.is_percent != good[i].is_percent)
			fail_msg("'%s' gave bytes %llu ppm %u percent %d, want %llu %u %d", good[i].text,
				 (unsigned long long)spec.bytes, spec.ppm, spec.is_percent,
				 (unsigned long long)good[i].bytes, good[i].ppm, good[i].is_percent);
	}
}

static void rejects_bad_sizes_with_a_detail(void **state)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		struct aeg_size_spec spec = { .bytes = 12345, .ppm = 6789, .is_percent = 0 };
		int rc;

		aeg_error_clear();
		rc = aeg_size_spec_parse(bad[i].text, &spec);
		if (rc != bad[i].err)
			fail_msg("'%s' gave %s, want %s", bad[i].text, aeg_errname(rc), aeg_errname(bad[i].err));
		if (strstr(aeg_error_detail(), bad[i].detail) == NULL)
			fail_msg("'%s': detail \"%s\" lacks \"%s\"", bad[i].text, aeg_error_detail(), bad[i].detail);
		/* A failed parse leaves the caller's value alone. */
		assert_int_equal(spec.bytes, 12345);
		assert_int_equal(spec.ppm, 6789);
		assert_int_equal(spec.is_percent, 0);
	}
}

static void rejects_null_arguments(void **state)
{
	struct aeg_size_spec spec;
	uint64_t bytes;

	assert_int_equal(aeg_size_spec_parse(NULL, &spec), AEG_EINVAL);
	assert_int_equal(aeg_size_spec_parse("1G", NULL), AEG_EINVAL);
	assert_int_equal(aeg_size_spec_resolve(NULL, 1, &bytes), AEG_EINVAL);
	assert_int_equal(aeg_size_parse(NULL, 0, &bytes), AEG_EINVAL);
	assert_int_equal(aeg_size_parse("1G", 0, NULL), AEG_EINVAL);
}

static void long_bad_text_is_cut_in_the_detail(void **state)
{
	char text[600];
	struct aeg_size_spec spec;

	memset(text, '7', sizeof(text) - 2);
	text[sizeof(text) - 2] = 'Q';
	text[sizeof(text) - 1] = '\0';
	assert_int_equal(aeg_size_spec_parse(text, &spec), AEG_ERANGE);
	assert_non_null(strstr(aeg_error_detail(), "777..."));
	assert_true(strlen(aeg_error_detail()) < 300);
}

static const struct {
	const char *text;
	uint64_t total;
	uint64_t bytes;
} resolves[] = {
	{ "90%", 80 * GiB, 77309411328ull },		/* 72 GiB */
	{ "100%", 80 * GiB, 80 * GiB },
	{ "0%", 80 * GiB, 0 },
	{ "12.5%", 1000, 125 },
	{ "33.3333%", 100, 33 },			/* 33.3333 rounded down */
	{ "50%", 3, 1 },				/* 1.5 rounded down */
	{ "99.9999%", 999999, 999998 },			/* 999998.000001 */
	{ "100%", UINT64_MAX, UINT64_MAX },		/* no overflow in the product */
	{ "95%", UINT64_MAX, 17524406870024074034ull },	/* floor((2^64-1) * 0.95) */
	{ "4GiB", 0, 4 * GiB },				/* absolute: total ignored */
	{ "4GiB", 1, 4 * GiB },
};

static void resolves_percentages_of_a_total(void **state)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(resolves); i++) {
		struct aeg_size_spec spec;
		uint64_t bytes = 1;

		assert_int_equal(aeg_size_spec_parse(resolves[i].text, &spec), 0);
		assert_int_equal(aeg_size_spec_resolve(&spec, resolves[i].total, &bytes), 0);
		if (bytes != resolves[i].bytes)
			fail_msg("'%s' of %llu gave %llu, want %llu", resolves[i].text,
				 (unsigned long long)resolves[i].total, (unsigned long long)bytes,
				 (unsigned long long)resolves[i].bytes);
		bytes = 1;
		assert_int_equal(aeg_size_parse(resolves[i].text, resolves[i].total, &bytes),
				 spec.is_percent && resolves[i].total == 0 ? AEG_EINVAL : 0);
		assert_int_equal(bytes, resolves[i].bytes);
	}
}

static void percentage_needs_a_total(void **state)
{
	struct aeg_size_spec spec = { .ppm = 500000, .is_percent = 1 };
	struct aeg_size_spec broken = { .ppm = 1000001, .is_percent = 1 };
	uint64_t bytes = 7;

	assert_int_equal(aeg_size_spec_resolve(&spec, 0, &bytes), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "percentage"));
	assert_int_equal(bytes, 7);
	assert_int_equal(aeg_size_parse("50%", 0, &bytes), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "'50%': a percentage is not allowed here"));
	assert_int_equal(bytes, 7);
	assert_int_equal(aeg_size_spec_resolve(&broken, 100, &bytes), AEG_EINVAL);
	assert_int_equal(bytes, 7);
	/* aeg_size_parse passes parse errors through. */
	assert_int_equal(aeg_size_parse("-4G", 100, &bytes), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "no sign"));
	assert_int_equal(aeg_size_parse("99999999999T", 100, &bytes), AEG_ERANGE);
}

static const struct {
	uint64_t bytes;
	const char *text;
} formats[] = {
	{ 0, "0 B" },
	{ 1, "1 B" },
	{ 512, "512 B" },
	{ 1023, "1023 B" },
	{ 1024, "1 KiB" },
	{ 1536, "1.5 KiB" },
	{ 1280, "1.25 KiB" },
	{ 1034, "1.01 KiB" },
	{ 1029, "1 KiB" },			/* 1.0049 rounds to 1.00 */
	{ 1030, "1.01 KiB" },			/* 1.0059 rounds to 1.01 */
	{ 1572864, "1.5 MiB" },
	{ 32 * MiB, "32 MiB" },
	{ MiB - 1, "1 MiB" },			/* 1023.999 KiB rounds up a unit */
	{ 40 * GiB, "40 GiB" },
	{ 1610612736ull, "1.5 GiB" },
	{ 40000000000ull, "37.25 GiB" },
	{ 2 * TiB + TiB / 10, "2.1 TiB" },
	{ 1ull << 50, "1 PiB" },
	{ 1ull << 60, "1 EiB" },
	{ 18440979466186517381ull, "15.99 EiB" },	/* just under 15.995: the fuzzer's find */
	{ UINT64_MAX, "16 EiB" },
};

static void formats_in_binary_units(void **state)
{
	char buf[16];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(formats); i++) {
		memset(buf, 'x', sizeof(buf));
		assert_ptr_equal(aeg_size_format(formats[i].bytes, buf, sizeof(buf)), buf);
		if (strcmp(buf, formats[i].text) != 0)
			fail_msg("%llu formatted as '%s', want '%s'", (unsigned long long)formats[i].bytes,
				 buf, formats[i].text);
	}
}

static void formatted_sizes_parse_back(void **state)
{
	const uint64_t sizes[] = { 0, 512, 1536, 32 * MiB, 1610612736ull, 40 * GiB, 2 * TiB,
				   1ull << 50, 3ull << 59 };
	char buf[16];
	uint64_t bytes;

	for (size_t i = 0; i < AEG_ARRAY_SIZE(sizes); i++) {
		assert_int_equal(aeg_size_parse(aeg_size_format(sizes[i], buf, sizeof(buf)), 0, &bytes), 0);
		assert_int_equal(bytes, sizes[i]);
	}
}

static void format_respects_the_buffer(void **state)
{
	char buf[8];

	memset(buf, 'x', sizeof(buf));
	aeg_size_format(1610612736ull, buf, 4);
	assert_string_equal(buf, "1.5");
	assert_int_equal(buf[4], 'x');
	assert_null(aeg_size_format(1, NULL, 8));
	assert_ptr_equal(aeg_size_format(1, buf, 0), buf);
	assert_int_equal(buf[4], 'x');
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(parses_good_sizes_exactly),
		cmocka_unit_test(rejects_bad_sizes_with_a_detail),
		cmocka_unit_test(rejects_null_arguments),
		cmocka_unit_test(long_bad_text_is_cut_in_the_detail),
		cmocka_unit_test(resolves_percentages_of_a_total),
		cmocka_unit_test(percentage_needs_a_total),
		cmocka_unit_test(formats_in_binary_units),
		cmocka_unit_test(formatted_sizes_parse_back),
		cmocka_unit_test(format_respects_the_buffer),
	};
	return cmocka_run_group_tests_name("size", tests, NULL, NULL);
}

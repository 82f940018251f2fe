/* libFuzzer target: size strings (aeg_size_spec_parse, resolve, aeg_size_parse, aeg_size_format). */
#include <ctype.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <aegaeon/size.h>

#include "fuzz.h"

static const int parse_errors[] = { AEG_EINVAL, AEG_ERANGE, 0 };

static const uint64_t totals[] = { 1, 4096, 80ull << 30, 141ull << 30, UINT64_MAX };

/*
 * aeg_size_format rounds to the nearest hundredth of its unit, and parsing
 * rounds down to a byte: the text read back is within half a hundredth of
 * the unit (and one byte) of the value, and is exact in bytes below 1 KiB.
 */
static void check_format(uint64_t v)
{
	char buf[16], wide[64];
	struct aeg_size_spec spec;
	uint64_t unit = 1, slack;
	const char *u;
	int rc;

	aeg_size_format(v, buf, sizeof(buf));
	aeg_size_format(v, wide, sizeof(wide));
	FUZZ_CHECK(strcmp(buf, wide) == 0, "16 bytes are not enough for %" PRIu64 ": '%s' vs '%s'",
		   v, buf, wide);
	u = strchr(buf, ' ');
	FUZZ_CHECK(u != NULL, "'%s' has no unit", buf);
	for (const char *names = "KMGTPE", *n = names; *n; n++)
		if (u[1] == *n)
			unit = 1ull << (10 * (n - names + 1));
	slack = unit / 200 + 1;

	aeg_error_clear();
	rc = aeg_size_spec_parse(buf, &spec);
	if (rc == AEG_ERANGE && unit == 1ull << 60 && v > UINT64_MAX - slack)
		return;         /* rounded up to 16 EiB, one past 64 bits */
	FUZZ_CHECK(rc == 0, "'%s' (formatted from %" PRIu64 ") does not parse: %s", buf, v,
		   aeg_error_detail());
	FUZZ_CHECK(!spec.is_percent, "'%s' parses as a percentage", buf);
	/* Compared in 128 bits: v + slack passes 2^64 for v near the top (15.995 EiB). */
	FUZZ_CHECK((unsigned __int128)spec.bytes + slack >= v &&
		   (unsigned __int128)spec.bytes <= (unsigned __int128)v + slack,
		   "%" PRIu64 " formats as '%s', which reads back as %" PRIu64, v, buf, spec.bytes);
	if (v < 1024)
		FUZZ_CHECK(spec.bytes == v, "%" PRIu64 " formats as '%s', read back as %" PRIu64, v, buf,
			   spec.bytes);
}

static void check_bytes(const char *text, const struct aeg_size_spec *spec)
{
	struct aeg_size_spec again;
	char plain[32];
	uint64_t b;
	int rc;

	FUZZ_CHECK(spec->ppm == 0, "'%s': bytes with ppm %u", text, spec->ppm);
	for (size_t i = 0; i < sizeof(totals) / sizeof(totals[0]); i++) {
		rc = aeg_size_spec_resolve(spec, totals[i], &b);
		FUZZ_CHECK(rc == 0 && b == spec->bytes, "'%s': resolve of bytes gave %d, %" PRIu64, text,
			   rc, b);
	}
	rc = aeg_size_parse(text, 0, &b);
	FUZZ_CHECK(rc == 0 && b == spec->bytes, "'%s': aeg_size_parse gave %d, %" PRIu64 " not %" PRIu64,
		   text, rc, b, spec->bytes);

	snprintf(plain, sizeof(plain), "%" PRIu64, spec->bytes);
	rc = aeg_size_spec_parse(plain, &again);
	FUZZ_CHECK(rc == 0 && !again.is_percent && again.bytes == spec->bytes,
		   "'%s' (from '%s') reads back as %d, %" PRIu64, plain, text, rc, again.bytes);
	check_format(spec->bytes);
}

static void check_percent(const char *text, const struct aeg_size_spec *spec)
{
	struct aeg_size_spec again;
	char pct[32];
	uint64_t b;
	int rc;

	FUZZ_CHECK(spec->ppm <= 1000000 && spec->bytes == 0, "'%s': %u ppm, %" PRIu64 " bytes", text,
		   spec->ppm, spec->bytes);
	rc = aeg_size_spec_resolve(spec, 0, &b);
	FUZZ_CHECK(rc == AEG_EINVAL, "'%s': a percentage of nothing gave %d", text, rc);
	rc = aeg_size_parse(text, 0, &b);
	FUZZ_CHECK(rc == AEG_EINVAL, "'%s': aeg_size_parse without a total gave %d", text, rc);
	for (size_t i = 0; i < sizeof(totals) / sizeof(totals[0]); i++) {
		uint64_t want = (uint64_t)((unsigned __int128)totals[i] * spec->ppm / 1000000);

		rc = aeg_size_spec_resolve(spec, totals[i], &b);
		FUZZ_CHECK(rc == 0 && b == want && b <= totals[i],
			   "'%s' of %" PRIu64 ": %d, %" PRIu64 " not %" PRIu64, text, totals[i], rc, b, want);
		rc = aeg_size_parse(text, totals[i], &b);
		FUZZ_CHECK(rc == 0 && b == want, "'%s': aeg_size_parse of %" PRIu64 " gave %d, %" PRIu64,
			   text, totals[i], rc, b);
	}
	snprintf(pct, sizeof(pct), "%u.%04u%%", spec->ppm / 10000, spec->ppm % 10000);
	rc = aeg_size_spec_parse(pct, &again);
	FUZZ_CHECK(rc == 0 && again.is_percent && again.ppm == spec->ppm,
		   "'%s' (from '%s') reads back as %d, %u ppm", pct, text, rc, again.ppm);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct aeg_size_spec unset = { 0x5a5a5a5a5a5a5a5aull, 0xa5a5a5a5u, 7 };
	struct aeg_size_spec spec = unset, folded;
	char *text, *upper;
	uint64_t v = 0;
	int rc, rc2;

	/* The first bytes as a number: aeg_size_format over all of 64 bits, not only parsed ones. */
	for (size_t i = 0; i < size && i < 8; i++)
		v = v << 8 | data[i];
	check_format(v);

	text = fuzz_cstring(data, size);
	aeg_error_clear();
	rc = aeg_size_spec_parse(text, &spec);
	if (rc < 0) {
		fuzz_check_error(rc, parse_errors);
		fuzz_check_printable(aeg_error_detail(), "size error detail");
		FUZZ_CHECK(memcmp(&spec, &unset, sizeof(spec)) == 0, "'%s': failed parse changed the spec",
			   text);
	} else if (spec.is_percent == 1) {
		check_percent(text, &spec);
	} else {
		FUZZ_CHECK(spec.is_percent == 0, "'%s': is_percent %d", text, spec.is_percent);
		check_bytes(text, &spec);
	}

	/* Units are case-insensitive and nothing else has case: folding changes nothing. */
	upper = fuzz_cstring(data, size);
	for (char *p = upper; *p; p++)
		*p = (char)toupper((unsigned char)*p);
	folded = unset;
	rc2 = aeg_size_spec_parse(upper, &folded);
	FUZZ_CHECK(rc2 == rc, "'%s' gives %d, '%s' gives %d", text, rc, upper, rc2);
	if (rc == 0)
		FUZZ_CHECK(memcmp(&spec, &folded, sizeof(spec)) == 0, "'%s' and '%s' differ", text, upper);
	free(upper);
	free(text);
	return 0;
}

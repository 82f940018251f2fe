/* Size strings ("4096", "1.5GiB", "40GB", "90%") parsed and formatted in exact integer arithmetic. */
#include "config.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <aegaeon/size.h>

#include "internal.h"

#define FRAC_DIGITS 9
#define FRAC_ONE 1000000000ull	/* a fraction is kept as billionths */
#define PPM_ONE 1000000u

static const struct {
	const char *name;
	uint64_t mult;
} units[] = {
	{ "", 1 },
	{ "b", 1 },
	{ "k", 1ull << 10 },
	{ "kib", 1ull << 10 },
	{ "m", 1ull << 20 },
	{ "mib", 1ull << 20 },
	{ "g", 1ull << 30 },
	{ "gib", 1ull << 30 },
	{ "t", 1ull << 40 },
	{ "tib", 1ull << 40 },
	{ "p", 1ull << 50 },
	{ "pib", 1ull << 50 },
	{ "e", 1ull << 60 },
	{ "eib", 1ull << 60 },
	{ "kb", 1000ull },
	{ "mb", 1000000ull },
	{ "gb", 1000000000ull },
	{ "tb", 1000000000000ull },
	{ "pb", 1000000000000000ull },
	{ "eb", 1000000000000000000ull },
};

static int is_blank(char c)
{
	return c == ' ' || c == '\t';
}

static int is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/* Leaves *spec alone on failure, so callers may parse into their defaults. */
AEG_EXPORT int aeg_size_spec_parse(const char *text, struct aeg_size_spec *spec)
{
	uint64_t ip = 0, frac = 0, scale = FRAC_ONE, mult = 0;
	int have_frac = 0;
	char q[128];
	const char *p, *unit;
	size_t unit_len, nfrac = 0;

	if (text == NULL || spec == NULL)
		return aeg_fail(AEG_EINVAL, "size missing");
	aeg_quote(text, q, sizeof(q));

	p = text;
	while (is_blank(*p))
		p++;
	if (*p == '\0')
		return aeg_fail(AEG_EINVAL, "size '%s' is empty", q);
	if (*p == '-' || *p == '+')
		return aeg_fail(AEG_EINVAL, "size '%s': no sign allowed", q);
	if (!is_digit(*p))
		return aeg_fail(AEG_EINVAL, "size '%s' does not start with a digit (e.g. 4096, 64MiB, 1.5GiB, 90%%)", q);

	for (; is_digit(*p); p++) {
		unsigned d = (unsigned)(*p - '0');

		if (ip > (UINT64_MAX - d) / 10)
			return aeg_fail(AEG_ERANGE, "size '%s' does not fit in 64 bits", q);
		ip = ip * 10 + d;
	}
	if (*p == '.') {
		p++;
		have_frac = 1;
		if (!is_digit(*p))
			return aeg_fail(AEG_EINVAL, "size '%s': a digit must follow the decimal point", q);
		for (; is_digit(*p); p++) {
			if (++nfrac > FRAC_DIGITS)
				return aeg_fail(AEG_EINVAL, "size '%s': more than %d digits after the decimal point",
						q, FRAC_DIGITS);
			scale /= 10;
			frac += (uint64_t)(*p - '0') * scale;
		}
	}

	while (is_blank(*p))
		p++;
	unit = p;
	while (*p != '\0' && !is_blank(*p))
		p++;
	unit_len = (size_t)(p - unit);
	while (is_blank(*p))
		p++;
	if (*p != '\0')
		return aeg_fail(AEG_EINVAL, "size '%s': unexpected text after the unit", q);

	if (unit_len == 1 && unit[0] == '%') {
		/* Compared before rounding to ppm, so "100.0000001%" is refused. */
		if (ip > 100 || (ip == 100 && frac > 0))
			return aeg_fail(AEG_EINVAL, "size '%s': a percentage must be at most 100%%", q);
		spec->bytes = 0;
		spec->ppm = (uint32_t)(ip * 10000 + frac / (FRAC_ONE / 10000));
		spec->is_percent = 1;
		return 0;
	}

	for (size_t i = 0; i < AEG_ARRAY_SIZE(units); i++) {
		if (strlen(units[i].name) == unit_len && strncasecmp(unit, units[i].name, unit_len) == 0) {
			mult = units[i].mult;
			break;
		}
	}
	if (mult == 0) {
		char u[64];

		snprintf(u, sizeof(u), "%.*s", (int)(unit_len < 40 ? unit_len : 40), unit);
		return aeg_fail(AEG_EINVAL,
				"size '%s': unknown unit '%s' (use B, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB, E/EiB, KB, MB, GB, TB, PB, EB or %%)",
				q, aeg_quote(u, u, sizeof(u)));
	}
	if (have_frac && mult == 1)
		return aeg_fail(AEG_EINVAL, "size '%s': a byte count cannot have a fraction (add a unit, e.g. 1.5KiB)", q);

	unsigned __int128 bytes = (unsigned __int128)ip * mult + (unsigned __int128)frac * mult / FRAC_ONE;

	if (bytes > UINT64_MAX)
		return aeg_fail(AEG_ERANGE, "size '%s' does not fit in 64 bits", q);
	spec->bytes = (uint64_t)bytes;
	spec->ppm = 0;
	spec->is_percent = 0;
	return 0;
}

AEG_EXPORT int aeg_size_spec_resolve(const struct aeg_size_spec *spec, uint64_t total_bytes,
				     uint64_t *bytes)
{
	if (spec == NULL || bytes == NULL)
		return aeg_fail(AEG_EINVAL, "size missing");
	if (!spec->is_percent) {
		*bytes = spec->bytes;
		return 0;
	}
	if (spec->ppm > PPM_ONE)
		return aeg_fail(AEG_EINVAL, "percentage of %u ppm is over 100%%", spec->ppm);
	if (total_bytes == 0)
		return aeg_fail(AEG_EINVAL, "a percentage needs a total to take it of, and none is known here");
	*bytes = (uint64_t)((unsigned __int128)total_bytes * spec->ppm / PPM_ONE);
	return 0;
}

AEG_EXPORT int aeg_size_parse(const char *text, uint64_t total_bytes, uint64_t *bytes)
{
	struct aeg_size_spec spec;
	char q[128];
	int rc;

	if (bytes == NULL)
		return aeg_fail(AEG_EINVAL, "size missing");
	rc = aeg_size_spec_parse(text, &spec);
	if (rc < 0)
		return rc;
	if (spec.is_percent && total_bytes == 0)
		return aeg_fail(AEG_EINVAL, "size '%s': a percentage is not allowed here (give bytes, e.g. 64MiB)",
				aeg_quote(text, q, sizeof(q)));
	return aeg_size_spec_resolve(&spec, total_bytes, bytes);
}

AEG_EXPORT char *aeg_size_format(uint64_t bytes, char *buf, size_t len)
{
	static const char *const names[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	unsigned __int128 hundredths;
	size_t u = 0;

	if (buf == NULL || len == 0)
		return buf;
	while (u + 1 < AEG_ARRAY_SIZE(names) && bytes >= (1ull << (10 * (u + 1))))
		u++;
	/* Round to the nearest hundredth; 1023.999 KiB becomes 1 MiB, not 1024 KiB. */
	hundredths = ((unsigned __int128)bytes * 100 + (1ull << (10 * u)) / 2) >> (10 * u);
	if (hundredths >= 1024 * 100 && u + 1 < AEG_ARRAY_SIZE(names)) {
		u++;
		hundredths = ((unsigned __int128)bytes * 100 + (1ull << (10 * u)) / 2) >> (10 * u);
	}

	unsigned long long whole = (unsigned long long)(hundredths / 100);
	unsigned cents = (unsigned)(hundredths % 100);

	if (cents == 0)
		snprintf(buf, len, "%llu %s", whole, names[u]);
	else if (cents % 10 == 0)
		snprintf(buf, len, "%llu.%u %s", whole, cents / 10, names[u]);
	else
		snprintf(buf, len, "%llu.%02u %s", whole, cents, names[u]);
	return buf;
}

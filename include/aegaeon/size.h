/* aegaeon size strings: "4096", "64KiB", "1.5GiB", "40G", "90%". */
#ifndef AEGAEON_SIZE_H
#define AEGAEON_SIZE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A parsed size: either absolute bytes or a percentage of a total known later
 * (a GPU's memory). ppm is parts per million: "90%" gives 900000.
 */
struct aeg_size_spec {
	uint64_t bytes;     /* when is_percent == 0 */
	uint32_t ppm;       /* when is_percent == 1: 0..1000000 */
	int is_percent;
};

/*
 * aeg_size_spec_parse - parse a size. Units (case-insensitive): none or B
 * (bytes); K, KiB, M, MiB, G, GiB, T, TiB (powers of 1024, as Slurm's --mem),
 * and P, PiB, E, EiB so every aeg_size_format text reads back; KB, MB, GB,
 * TB, PB, EB (powers of 1000). A decimal fraction of up to 9 digits,
 * after at least one digit ("0.5GiB", not ".5GiB"), is allowed with a unit
 * ("1.5GiB"; rounded down to a byte) and before '%' (rounded down to a ppm).
 * Blanks may surround the text and separate number and unit ("40 GiB", as
 * aeg_size_format writes it); nothing else may follow. Arithmetic is exact.
 * Errors: AEG_EINVAL for NULL or empty text, a sign, no leading digit, an
 * unknown unit, trailing garbage, a fraction of a byte count without unit,
 * too many fraction digits, a percentage over 100; AEG_ERANGE when the value
 * does not fit in 64 bits. The detail names the bad text. @spec is left
 * unchanged on error. Thread-safe.
 */
int aeg_size_spec_parse(const char *text, struct aeg_size_spec *spec);

/*
 * aeg_size_spec_resolve - bytes of @spec, percentages taken of @total_bytes
 * (rounded down). A percentage with @total_bytes == 0 is AEG_EINVAL.
 */
int aeg_size_spec_resolve(const struct aeg_size_spec *spec, uint64_t total_bytes,
			  uint64_t *bytes);

/*
 * aeg_size_parse - aeg_size_spec_parse then aeg_size_spec_resolve; pass
 * @total_bytes = 0 where percentages make no sense (they are then rejected).
 */
int aeg_size_parse(const char *text, uint64_t total_bytes, uint64_t *bytes);

/*
 * aeg_size_format - human form of @bytes in binary units with up to two
 * decimals ("40 GiB", "1.5 MiB", "512 B"). Returns @buf. @len >= 16 is enough.
 */
char *aeg_size_format(uint64_t bytes, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif

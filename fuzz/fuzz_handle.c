/* libFuzzer target: hex handles from the environment and records (aeg_handle_from_hex, aeg_handle_to_hex). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/device.h>

#include "fuzz.h"

static const int parse_errors[] = { AEG_EINVAL, 0 };

static int hex_digit(unsigned char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	aeg_handle_t h, unset, back;
	char *text = fuzz_cstring(data, size), hex[AEG_HANDLE_HEX_LEN + 1];
	size_t len = strlen(text);
	int valid = len == AEG_HANDLE_HEX_LEN, rc;

	for (size_t i = 0; valid && i < len; i++)
		valid = hex_digit((unsigned char)text[i]);

	memset(&h, 0x5a, sizeof(h));
	unset = h;
	aeg_error_clear();
	rc = aeg_handle_from_hex(text, &h);
	FUZZ_CHECK((rc == 0) == valid, "'%s' gave %d, but it is%s 128 hex digits", text, rc, valid ? "" : " not");
	if (rc < 0) {
		fuzz_check_error(rc, parse_errors);
		fuzz_check_printable(aeg_error_detail(), "handle error detail");
		FUZZ_CHECK(memcmp(&h, &unset, sizeof(h)) == 0, "a failed parse changed the handle");
	} else {
		aeg_handle_to_hex(&h, hex);
		FUZZ_CHECK(strlen(hex) == AEG_HANDLE_HEX_LEN && strncasecmp(hex, text, AEG_HANDLE_HEX_LEN) == 0,
			   "'%s' formats back as '%s'", text, hex);
		FUZZ_CHECK(aeg_handle_from_hex(hex, &back) == 0 && memcmp(&back, &h, sizeof(h)) == 0,
			   "'%s' does not read back", hex);
	}

	/* Any 64 bytes format to digits that read back to them. */
	if (size >= AEG_HANDLE_BYTES) {
		memcpy(h.bytes, data, AEG_HANDLE_BYTES);
		aeg_handle_to_hex(&h, hex);
		FUZZ_CHECK(aeg_handle_from_hex(hex, &back) == 0 && memcmp(&back, &h, sizeof(h)) == 0,
			   "'%s' does not read back to the bytes it came from", hex);
	}
	free(text);
	return 0;
}

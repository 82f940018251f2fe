/* aegaeon-cli's SHA-256: the standard's test vectors, and the CPU's SHA instructions against the portable code. */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cli.h"

static void digest(const void *data, size_t len, char hex[65])
{
	struct cli_sha256 s;

	cli_sha256_init(&s);
	cli_sha256_update(&s, data, len);
	cli_sha256_hex(&s, hex);
}

/* FIPS 180-4's examples and the million a's, on whichever code this CPU takes, then on the portable code. */
static void known_digests(void **state)
{
	static const struct { const char *msg; const char *hex; } v[] = {
		{ "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
		{ "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
		{ "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
		  "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
		{ "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
		  "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1" },
	};
	char *a = malloc(1000000), hex[65];

	assert_non_null(a);
	memset(a, 'a', 1000000);
	for (int portable = 0; portable < 2; portable++) {
		cli_sha256_portable(portable);
		for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
			digest(v[i].msg, strlen(v[i].msg), hex);
			assert_string_equal(hex, v[i].hex);
		}
		digest(a, 1000000, hex);
		assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
	}
	cli_sha256_portable(0);
	free(a);
}

/* Every length up to 1100 bytes, fed in random pieces: the two codes give the same digest as one update. */
static void pieces_and_lengths(void **state)
{
	enum { MAX = 1100 };
	unsigned char data[MAX];
	char one[65], fed[65], portable[65];
	unsigned seed = 18;

	if (!cli_sha256_accelerated())
		print_message("this CPU has no SHA instructions: the portable code alone is checked\n");
	for (size_t i = 0; i < MAX; i++)
		data[i] = (unsigned char)rand_r(&seed);
	for (size_t len = 0; len <= MAX; len++) {
		struct cli_sha256 s;

		digest(data, len, one);
		cli_sha256_init(&s);
		for (size_t at = 0; at < len;) {
			size_t n = (size_t)rand_r(&seed) % 150;

			n = n > len - at ? len - at : n;
			cli_sha256_update(&s, data + at, n);
			at += n;
		}
		cli_sha256_hex(&s, fed);
		cli_sha256_portable(1);
		digest(data, len, portable);
		cli_sha256_portable(0);
		if (strcmp(one, fed) != 0 || strcmp(one, portable) != 0)
			fail_msg("%zu bytes: one update %s, in pieces %s, portable %s", len, one, fed, portable);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(known_digests),
		cmocka_unit_test(pieces_and_lengths),
	};

	return cmocka_run_group_tests_name("cli_sha256", tests, NULL, NULL);
}

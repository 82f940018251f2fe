/* Shared by the libFuzzer targets: invariant checks that abort with a reason, and the error contract. */
#ifndef AEGAEON_FUZZ_H
#define AEGAEON_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/error.h>

/*
 * A broken invariant is a finding like a crash: abort() makes libFuzzer keep
 * the input as a crash artifact, and the message says which rule broke.
 */
#define FUZZ_CHECK(cond, ...)							\
	do {									\
		if (!(cond)) {							\
			fprintf(stderr, "%s:%d: invariant '%s' broken: ",	\
				__FILE__, __LINE__, #cond);			\
			fprintf(stderr, __VA_ARGS__);				\
			fputc('\n', stderr);					\
			abort();						\
		}								\
	} while (0)

/*
 * Where a target writes its files: $TMPDIR (scripts/fuzz.sh gives each
 * target its own), else tmpfs, where rewriting a file at every input costs
 * less than on a disk, else /tmp.
 */
static inline const char *fuzz_tmpdir(void)
{
	const char *t = getenv("TMPDIR");

	if (t != NULL && *t != '\0')
		return t;
	return access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
}

/* The input as a C string; bytes after an embedded NUL are what C callers never see. */
static inline char *fuzz_cstring(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);

	FUZZ_CHECK(s != NULL, "out of memory for %zu bytes", size);
	memcpy(s, data, size);
	s[size] = '\0';
	return s;
}

/*
 * The error contract every parser keeps: a failure is one of the codes its
 * header documents (a zero-terminated list), with a detail that is not empty.
 * Call aeg_error_clear() before the parser so a stale detail cannot pass.
 */
static inline void fuzz_check_error(int rc, const int *allowed)
{
	const char *detail = aeg_error_detail();
	int known = 0;

	for (const int *a = allowed; *a != 0; a++)
		known |= rc == *a;
	FUZZ_CHECK(known, "error %d (%s) is not one the parser documents; detail: %s", rc,
		   aeg_errname(rc), detail);
	FUZZ_CHECK(detail[0] != '\0', "error %s without a detail", aeg_errname(rc));
}

/* A detail that reaches a log line or a terminal must not carry control characters. */
static inline void fuzz_check_printable(const char *text, const char *what)
{
	for (const unsigned char *p = (const unsigned char *)text; *p; p++)
		FUZZ_CHECK(*p >= 0x20 && *p != 0x7f, "%s has control character 0x%02x at byte %zu: %s",
			   what, *p, (size_t)(p - (const unsigned char *)text), text);
}

#endif

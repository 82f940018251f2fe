/* libFuzzer target: SPANK option values (--aegaeon-slab, --aegaeon-pinned, --aegaeon-prefetch, --aegaeon-device). */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <aegaeon/config.h>

#include "fuzz.h"
#include "jobopt.h"

static const int size_errors[] = { AEG_EINVAL, AEG_ERANGE, 0 };
static const int list_errors[] = { AEG_EINVAL, AEG_ENOMEM, 0 };
static const int check_errors[] = { AEG_EINVAL, AEG_ERANGE, 0 };

/* Every message reaches srun's terminal or the step's stderr, naming the option as written. */
static void check_detail(int rc, const int *allowed, const char *option)
{
	fuzz_check_error(rc, allowed);
	fuzz_check_printable(aeg_error_detail(), "job option error detail");
	FUZZ_CHECK(strstr(aeg_error_detail(), option) != NULL, "detail does not name %s: %s", option,
		   aeg_error_detail());
}

static void slab(const char *text, const struct aeg_config *cfg)
{
	struct aeg_size_spec s, again;
	char buf[32];
	int rc;

	aeg_error_clear();
	rc = aeg_jobopt_parse_slab(text, &s);
	if (rc < 0) {
		check_detail(rc, size_errors, "--aegaeon-slab");
		return;
	}
	FUZZ_CHECK(s.is_percent ? s.ppm > 0 && s.ppm <= 1000000 : s.bytes > 0, "slab '%s' of nothing", text);
	aeg_jobopt_format_slab(&s, buf, sizeof(buf));
	rc = aeg_jobopt_parse_slab(buf, &again);
	FUZZ_CHECK(rc == 0 && again.is_percent == s.is_percent && again.bytes == s.bytes && again.ppm == s.ppm,
		   "slab '%s' formats as '%s', which reads back differently (%d)", text, buf, rc);
	aeg_error_clear();
	rc = aeg_jobopt_check_slab(&s, cfg);
	if (rc < 0)
		check_detail(rc, check_errors, "--aegaeon-slab");
}

static void pinned(const char *text, const struct aeg_config *cfg)
{
	struct aeg_jobopt_pinned p;
	int rc;

	aeg_error_clear();
	rc = aeg_jobopt_parse_pinned(text, &p);
	if (rc < 0) {
		check_detail(rc, size_errors, "--aegaeon-pinned");
		return;
	}
	if (p.bytes == 0)
		FUZZ_CHECK(p.buffer_bytes == 0, "'%s': no pool with a buffer size", text);
	else if (p.buffer_bytes != 0)
		FUZZ_CHECK(p.buffer_bytes % 4096 == 0 && p.buffer_bytes <= p.bytes,
			   "'%s': buffer %llu of a %llu-byte pool", text, (unsigned long long)p.buffer_bytes,
			   (unsigned long long)p.bytes);
	aeg_error_clear();
	rc = aeg_jobopt_check_pinned(&p, cfg);
	if (rc < 0)
		check_detail(rc, check_errors, "--aegaeon-pinned");
}

static void prefetch(const char *text, const char *cwd)
{
	char *paths = (char *)"unset";
	size_t count = 12345, n = 1, commas = 0;
	int rc;

	aeg_error_clear();
	rc = aeg_jobopt_parse_prefetch(text, cwd, &paths, &count);
	if (rc < 0) {
		check_detail(rc, list_errors, "--aegaeon-prefetch");
		FUZZ_CHECK(paths == NULL, "a failed parse left a path list");
		return;
	}
	for (const char *c = text; *c; c++)
		commas += *c == ',';
	FUZZ_CHECK(count == commas + 1 && count <= AEG_JOBOPT_PREFETCH_MAX, "'%s' gave %zu files", text, count);
	fuzz_check_printable(paths, "prefetch list");
	/* Comma-joined absolute paths, one per element of the text, each under PATH_MAX. */
	for (const char *p = paths, *end;; p = end + 1, n++) {
		end = strchr(p, ',');
		if (end == NULL)
			end = p + strlen(p);
		FUZZ_CHECK(end > p && *p == '/' && (size_t)(end - p) < PATH_MAX, "element %zu of '%s' in '%s'",
			   n, text, paths);
		if (*end == '\0')
			break;
	}
	FUZZ_CHECK(n == count, "'%s' gave %zu paths, counted %zu", paths, n, count);
	if (cwd == NULL)
		FUZZ_CHECK(strcmp(paths, text) == 0, "absolute list '%s' came back as '%s'", text, paths);
	free(paths);
}

static void device(const char *text, const struct aeg_config *cfg)
{
	enum aeg_device_kind kind = (enum aeg_device_kind)77;
	int rc, want = strcasecmp(text, "cuda") == 0 || strcasecmp(text, "host") == 0;

	aeg_error_clear();
	rc = aeg_jobopt_parse_device(text, &kind);
	FUZZ_CHECK((rc == 0) == want, "--aegaeon-device=%s gave %d", text, rc);
	if (rc < 0) {
		fuzz_check_error(rc, (const int[]){ AEG_EINVAL, 0 });
		fuzz_check_printable(aeg_error_detail(), "device error detail");
		return;
	}
	FUZZ_CHECK(kind == AEG_DEVICE_CUDA || kind == AEG_DEVICE_HOST, "kind %d", kind);
	rc = aeg_jobopt_check_device(kind, cfg);
	FUZZ_CHECK(rc == AEG_EPERM, "the default site refuses --aegaeon-device, not %d", rc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The input is one option value; every parser gets it, as a user may type anything after any '='. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct aeg_config cfg;
	char *text;

	if (size > 8192)
		return -1;
	aeg_config_defaults(&cfg);
	text = fuzz_cstring(data, size);
	slab(text, &cfg);
	pinned(text, &cfg);
	prefetch(text, NULL);
	prefetch(text, "/home/user/run");
	prefetch(text, "/");
	device(text, &cfg);
	free(text);
	return 0;
}

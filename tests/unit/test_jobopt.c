/* Job options: good and bad tables for each option, site caps, prefetch lists and file checks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "jobopt.h"

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define GiB (1ull << 30)

static void assert_detail(const char *piece)
{
	if (strstr(aeg_error_detail(), piece) == NULL)
		fail_msg("detail '%s' lacks '%s'", aeg_error_detail(), piece);
}

static void slab_good(void **state)
{
	static const struct {
		const char *text;
		uint64_t bytes;
		uint32_t ppm;
		int is_percent;
		const char *canonical;
	} t[] = {
		{ "40GiB", 40 * GiB, 0, 0, "42949672960" },
		{ "1", 1, 0, 0, "1" },
		{ "64MiB", 64 * MiB, 0, 0, "67108864" },
		{ "90%", 0, 900000, 1, "90%" },
		{ "12.5%", 0, 125000, 1, "12.5%" },
		{ "0.0001%", 0, 1, 1, "0.0001%" },
		{ "100%", 0, 1000000, 1, "100%" },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		struct aeg_size_spec s, back;
		char buf[32];

		assert_int_equal(aeg_jobopt_parse_slab(t[i].text, &s), 0);
		assert_int_equal(s.is_percent, t[i].is_percent);
		assert_int_equal(s.bytes, t[i].bytes);
		assert_int_equal(s.ppm, t[i].ppm);
		assert_string_equal(aeg_jobopt_format_slab(&s, buf, sizeof(buf)), t[i].canonical);
		/* The agent reads what the plugin formats back to the same value. */
		assert_int_equal(aeg_size_spec_parse(buf, &back), 0);
		assert_memory_equal(&back, &s, sizeof(s));
	}
}

static void slab_bad(void **state)
{
	static const struct {
		const char *text;
		int err;
		const char *detail;
	} t[] = {
		{ "", AEG_EINVAL, "--aegaeon-slab=: size '' is empty" },
		{ "abc", AEG_EINVAL, "--aegaeon-slab=abc: size 'abc' does not start with a digit" },
		{ "-1G", AEG_EINVAL, "no sign" },
		{ "0", AEG_EINVAL, "--aegaeon-slab=0: the slab must be more than 0" },
		{ "0%", AEG_EINVAL, "must be more than 0" },
		{ "101%", AEG_EINVAL, "at most 100%" },
		{ "40XB", AEG_EINVAL, "unknown unit 'XB'" },
		{ "40GiB,", AEG_EINVAL, "unknown unit" },
		{ "99999999999999999999", AEG_ERANGE, "does not fit in 64 bits" },
		{ "1\n2", AEG_EINVAL, "--aegaeon-slab=1?2" },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		struct aeg_size_spec s = { 7, 0, 0 };

		assert_int_equal(aeg_jobopt_parse_slab(t[i].text, &s), t[i].err);
		assert_detail(t[i].detail);
		assert_int_equal(s.bytes, 7);	/* untouched on failure */
	}
	assert_int_equal(aeg_jobopt_parse_slab(NULL, NULL), AEG_EINVAL);
}

static void pinned_good(void **state)
{
	static const struct {
		const char *text;
		uint64_t bytes, buffer;
	} t[] = {
		{ "16GiB", 16 * GiB, 0 },
		{ "16GiB:32MiB", 16 * GiB, 32 * MiB },
		{ "1MiB:4KiB", MiB, 4 * KiB },
		{ "8KiB:8KiB", 8 * KiB, 8 * KiB },
		{ "0", 0, 0 },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		struct aeg_jobopt_pinned p;

		assert_int_equal(aeg_jobopt_parse_pinned(t[i].text, &p), 0);
		assert_int_equal(p.bytes, t[i].bytes);
		assert_int_equal(p.buffer_bytes, t[i].buffer);
	}
}

static void pinned_bad(void **state)
{
	static const struct {
		const char *text;
		int err;
		const char *detail;
	} t[] = {
		{ "", AEG_EINVAL, "--aegaeon-pinned=: pool size: size '' is empty" },
		{ "x", AEG_EINVAL, "--aegaeon-pinned=x: pool size: size 'x' does not start" },
		{ "-4G", AEG_EINVAL, "no sign" },
		{ "50%", AEG_EINVAL, "--aegaeon-pinned=50%: pool size '50%' cannot be a percentage" },
		{ "16GiB:", AEG_EINVAL, "buffer size: size '' is empty" },
		{ ":32MiB", AEG_EINVAL, "pool size: size '' is empty" },
		{ "16GiB:1%", AEG_EINVAL, "buffer size '1%' cannot be a percentage" },
		{ "16GiB:0", AEG_EINVAL, "non-zero multiple of 4 KiB" },
		{ "16GiB:1000", AEG_EINVAL, "non-zero multiple of 4 KiB" },
		{ "16GiB:32GiB", AEG_EINVAL, "buffer size 32 GiB is larger than the pool" },
		{ "0:4KiB", AEG_EINVAL, "no pool) takes no buffer size" },
		{ "16GiB:32MiB:1", AEG_EINVAL, "buffer size: size '32MiB:1'" },
		{ "99999999999999999999", AEG_ERANGE, "does not fit" },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		struct aeg_jobopt_pinned p = { 7, 7 };

		assert_int_equal(aeg_jobopt_parse_pinned(t[i].text, &p), t[i].err);
		assert_detail(t[i].detail);
		assert_int_equal(p.bytes, 7);
	}
}

static void prefetch_good(void **state)
{
	static const struct {
		const char *text, *cwd, *paths;
		size_t count;
	} t[] = {
		{ "/m/a.safetensors", NULL, "/m/a.safetensors", 1 },
		{ "/m/a,/m/b", NULL, "/m/a,/m/b", 2 },
		{ "a", "/home/u", "/home/u/a", 1 },
		{ "a,/abs,sub/b", "/home/u/", "/home/u/a,/abs,/home/u/sub/b", 3 },
		{ "x", "/", "/x", 1 },
		{ "with space", "/w", "/w/with space", 1 },
	};

	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		char *paths = NULL;
		size_t n = 0;

		assert_int_equal(aeg_jobopt_parse_prefetch(t[i].text, t[i].cwd, &paths, &n), 0);
		assert_string_equal(paths, t[i].paths);
		assert_int_equal(n, t[i].count);
		free(paths);
	}
}

static void prefetch_bad(void **state)
{
	static const struct {
		const char *text, *cwd;
		const char *detail;
	} t[] = {
		{ "", "/w", "no file named" },
		{ "a,,b", "/w", "empty file name" },
		{ ",a", "/w", "empty file name" },
		{ "a,", "/w", "empty file name" },
		{ "rel", NULL, "'rel' is not an absolute path" },
		{ "/a,rel", NULL, "'rel' is not an absolute path" },
		{ "/a\nb", NULL, "control character" },
		{ "a", "relative/cwd", "working directory 'relative/cwd' is not absolute" },
	};
	char *many, *paths, cwd[101];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		paths = (char *)"untouched";
		assert_int_equal(aeg_jobopt_parse_prefetch(t[i].text, t[i].cwd, &paths, NULL), AEG_EINVAL);
		assert_detail(t[i].detail);
		assert_null(paths);
	}

	/* One file over the count limit, then one path over PATH_MAX. */
	many = malloc(3 * (AEG_JOBOPT_PREFETCH_MAX + 1) + 1);
	assert_non_null(many);
	many[0] = '\0';
	for (int i = 0; i <= AEG_JOBOPT_PREFETCH_MAX; i++)
		strcat(many, i == 0 ? "/a" : ",/a");
	assert_int_equal(aeg_jobopt_parse_prefetch(many, NULL, &paths, NULL), AEG_EINVAL);
	assert_detail("more than 64 files");
	many[strlen(many) - 3] = '\0';
	assert_int_equal(aeg_jobopt_parse_prefetch(many, NULL, &paths, NULL), 0);
	free(paths);
	free(many);

	many = malloc(PATH_MAX + 2);
	assert_non_null(many);
	memset(many, 'a', PATH_MAX + 1);
	many[0] = '/';
	many[PATH_MAX + 1] = '\0';
	assert_int_equal(aeg_jobopt_parse_prefetch(many, NULL, &paths, NULL), AEG_EINVAL);
	assert_detail("longer than");
	free(many);

	/*
	 * 64 paths of 1000 bytes each fit PATH_MAX and the count, but not an
	 * exec's 128 KiB string: refused by length, with 32 KiB of them kept.
	 * Relative ones count as made absolute.
	 */
	many = malloc(AEG_JOBOPT_PREFETCH_MAX * 1001 + 1);
	assert_non_null(many);
	for (int i = 0; i < AEG_JOBOPT_PREFETCH_MAX; i++) {
		memset(many + i * 1001, 'a', 1000);
		many[i * 1001] = '/';
		many[i * 1001 + 1000] = ',';
	}
	many[AEG_JOBOPT_PREFETCH_MAX * 1001 - 1] = '\0';
	assert_int_equal(aeg_jobopt_parse_prefetch(many, NULL, &paths, NULL), AEG_EINVAL);
	assert_detail("longer than 32768 bytes with its paths made absolute");
	assert_null(paths);
	many[32 * 1001 - 1] = '\0';
	assert_int_equal(aeg_jobopt_parse_prefetch(many, NULL, &paths, NULL), 0);
	assert_int_equal(strlen(paths), 32 * 1001 - 1);
	free(paths);
	many[32 * 1001 - 1] = ',';
	many[33 * 1001 - 1] = '\0';
	assert_int_equal(aeg_jobopt_parse_prefetch(many, NULL, &paths, NULL), AEG_EINVAL);
	/* 30 relative paths (30 KiB) under a working directory of 100 bytes: 33 KiB made absolute. */
	for (int i = 0; i < 30; i++)
		many[i * 1001] = 'a';
	many[30 * 1001 - 1] = '\0';
	memset(cwd, 'w', sizeof(cwd) - 1);
	cwd[0] = '/';
	cwd[sizeof(cwd) - 1] = '\0';
	assert_int_equal(aeg_jobopt_parse_prefetch(many, cwd, &paths, NULL), AEG_EINVAL);
	assert_detail("longer than 32768 bytes");
	free(many);
}

static void files(void **state)
{
	char dir[] = "/tmp/test_jobopt.XXXXXX", ok[64], list[256], sub[64], locked[64];
	FILE *f;

	assert_non_null(mkdtemp(dir));
	snprintf(ok, sizeof(ok), "%s/ok", dir);
	snprintf(sub, sizeof(sub), "%s/sub", dir);
	snprintf(locked, sizeof(locked), "%s/locked", dir);
	f = fopen(ok, "w");
	assert_non_null(f);
	fclose(f);
	assert_int_equal(mkdir(sub, 0700), 0);
	f = fopen(locked, "w");
	assert_non_null(f);
	fclose(f);
	assert_int_equal(chmod(locked, 0), 0);

	snprintf(list, sizeof(list), "%s,%s", ok, ok);
	assert_int_equal(aeg_jobopt_check_files(list), 0);
	snprintf(list, sizeof(list), "%s,%s/missing", ok, dir);
	assert_int_equal(aeg_jobopt_check_files(list), AEG_ENOENT);
	assert_detail("/missing: No such file or directory");
	snprintf(list, sizeof(list), "%s/ok/x", dir);
	assert_int_equal(aeg_jobopt_check_files(list), AEG_ENOENT);
	/* A directory is a model: one without any is refused, one with a readable shard taken. */
	assert_int_equal(aeg_jobopt_check_files(sub), AEG_ENOENT);
	assert_detail("no model in it");
	snprintf(list, sizeof(list), "%s/model.safetensors", sub);
	f = fopen(list, "w");
	assert_non_null(f);
	fclose(f);
	assert_int_equal(aeg_jobopt_check_files(sub), 0);
	assert_int_equal(unlink(list), 0);
	/* root reads anything: the permission case only holds for other users. */
	if (geteuid() != 0) {
		assert_int_equal(aeg_jobopt_check_files(locked), AEG_EACCES);
		assert_detail("Permission denied");
	}

	assert_int_equal(unlink(ok), 0);
	assert_int_equal(unlink(locked), 0);
	assert_int_equal(rmdir(sub), 0);
	assert_int_equal(rmdir(dir), 0);
}

static void device(void **state)
{
	struct aeg_config cfg;
	enum aeg_device_kind k;

	aeg_config_defaults(&cfg);
	assert_int_equal(aeg_jobopt_parse_device("host", &k), 0);
	assert_int_equal(k, AEG_DEVICE_HOST);
	assert_int_equal(aeg_jobopt_parse_device("cuda", &k), 0);
	assert_int_equal(k, AEG_DEVICE_CUDA);
	assert_int_equal(aeg_jobopt_parse_device("gpu", &k), AEG_EINVAL);
	assert_detail("--aegaeon-device=gpu: not one of cuda, host");
	assert_int_equal(aeg_jobopt_parse_device("", &k), AEG_EINVAL);

	assert_int_equal(aeg_jobopt_check_device(AEG_DEVICE_HOST, &cfg), AEG_EPERM);
	assert_detail("--aegaeon-device=host is not allowed on this site");
	cfg.allow_device_option = 1;
	assert_int_equal(aeg_jobopt_check_device(AEG_DEVICE_HOST, &cfg), 0);
}

static void caps(void **state)
{
	static const struct {
		const char *slab_max, *slab;
		int err;
		const char *detail;
	} t[] = {
		{ "80GiB", "500GiB", AEG_ERANGE, "--aegaeon-slab=500GiB is over this site's limit of 80 GiB per GPU" },
		{ "80GiB", "80GiB", 0, NULL },
		{ "80GiB", "80.5GiB", AEG_ERANGE, "--aegaeon-slab=80.5GiB is over this site's limit of 80 GiB" },
		{ "95%", "96%", AEG_ERANGE, "--aegaeon-slab=96% is over this site's limit of 95% of each GPU's memory" },
		{ "95%", "95%", 0, NULL },
		{ "92.5%", "92.75%", AEG_ERANGE, "limit of 92.5%" },
		/* Mixed kinds need the GPU's memory: the agent decides. */
		{ "95%", "500GiB", 0, NULL },
		{ "80GiB", "100%", 0, NULL },
	};
	struct aeg_config cfg;
	struct aeg_jobopt_pinned p;

	aeg_config_defaults(&cfg);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(t); i++) {
		struct aeg_size_spec s;

		assert_int_equal(aeg_size_spec_parse(t[i].slab_max, &cfg.slab_max), 0);
		assert_int_equal(aeg_jobopt_parse_slab(t[i].slab, &s), 0);
		assert_int_equal(aeg_jobopt_check_slab(&s, &cfg), t[i].err);
		if (t[i].detail != NULL)
			assert_detail(t[i].detail);
	}

	cfg.pinned_max_bytes = 64 * GiB;
	cfg.pinned_buffer_bytes = 32 * MiB;
	assert_int_equal(aeg_jobopt_parse_pinned("65GiB", &p), 0);
	assert_int_equal(aeg_jobopt_check_pinned(&p, &cfg), AEG_ERANGE);
	assert_detail("--aegaeon-pinned=65GiB is over this site's limit of 64 GiB per node");
	assert_int_equal(aeg_jobopt_parse_pinned("64GiB", &p), 0);
	assert_int_equal(aeg_jobopt_check_pinned(&p, &cfg), 0);
	/* No buffer given: the site's 32 MiB buffer must fit. */
	assert_int_equal(aeg_jobopt_parse_pinned("16MiB", &p), 0);
	assert_int_equal(aeg_jobopt_check_pinned(&p, &cfg), AEG_EINVAL);
	assert_detail("--aegaeon-pinned=16MiB is smaller than one pool buffer of 32 MiB");
	assert_int_equal(aeg_jobopt_parse_pinned("16MiB:1MiB", &p), 0);
	assert_int_equal(aeg_jobopt_check_pinned(&p, &cfg), 0);
	assert_int_equal(aeg_jobopt_parse_pinned("0", &p), 0);
	assert_int_equal(aeg_jobopt_check_pinned(&p, &cfg), 0);

	/* Files to load at start need a slab: the job's, or the site's default one. */
	assert_int_equal(aeg_jobopt_check_prefetch_slab(1, 0, &cfg), 0);
	for (int pct = 0; pct < 2; pct++) {
		assert_int_equal(aeg_size_spec_parse(pct ? "0%" : "0", &cfg.slab_default), 0);
		assert_int_equal(aeg_jobopt_check_prefetch_slab(1, 0, &cfg), AEG_EINVAL);
		assert_detail("this site reserves none unless the job asks (slab_default is 0): add --aegaeon-slab=SIZE");
		assert_int_equal(aeg_jobopt_check_prefetch_slab(1, 1, &cfg), 0);
		assert_int_equal(aeg_jobopt_check_prefetch_slab(0, 0, &cfg), 0);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(slab_good),
		cmocka_unit_test(slab_bad),
		cmocka_unit_test(pinned_good),
		cmocka_unit_test(pinned_bad),
		cmocka_unit_test(prefetch_good),
		cmocka_unit_test(prefetch_bad),
		cmocka_unit_test(files),
		cmocka_unit_test(device),
		cmocka_unit_test(caps),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

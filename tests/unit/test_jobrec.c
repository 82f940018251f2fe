/* Ready and error records: format/parse round trip, each malformed record rejected, atomic files. */
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
#include <aegaeon/jobrec.h>

#include "internal.h"

#define H0 "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f" \
	   "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
#define H1 "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100" \
	   "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"

static const char good[] =
	"version=1\n"
	"pid=4242\n"
	"socket=/run/aegaeon/17.node1/agent.sock\n"
	"device=cuda\n"
	"gpus=0,3\n"
	"slabs=2\n"
	"slab0_gpu=0\n"
	"slab0_bytes=42949672960\n"
	"slab0_handle=" H0 "\n"
	"slab1_gpu=3\n"
	"slab1_bytes=1073741824\n"
	"slab1_handle=" H1 "\n"
	"pinned_bytes=8589934592\n"
	"pinned_buffer=33554432\n";

static char tmpdir[64];

static int setup(void **state)
{
	strcpy(tmpdir, "/tmp/aeg-jobrec-XXXXXX");
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	return system(cmd);
}

static void parse_good_and_round_trip(void **state)
{
	struct aeg_job_record rec, again;
	char buf[4096];
	size_t len;

	assert_int_equal(aeg_job_record_parse(good, strlen(good), &rec), 0);
	assert_int_equal(rec.version, 1);
	assert_int_equal(rec.pid, 4242);
	assert_string_equal(rec.socket, "/run/aegaeon/17.node1/agent.sock");
	assert_int_equal(rec.device, AEG_DEVICE_CUDA);
	assert_int_equal(rec.gpu_count, 2);
	assert_int_equal(rec.gpus[1], 3);
	assert_int_equal(rec.slabs[0].bytes, 42949672960ull);
	assert_int_equal(rec.slabs[0].handle.bytes[1], 0x01);
	assert_int_equal(rec.slabs[1].handle.bytes[0], 0xff);
	assert_int_equal(rec.pinned_buffer, 33554432);

	assert_int_equal(aeg_job_record_format(&rec, buf, sizeof(buf), &len), 0);
	assert_int_equal(len, strlen(good));
	assert_memory_equal(buf, good, len);
	assert_int_equal(aeg_job_record_parse(buf, len, &again), 0);
	assert_memory_equal(&rec, &again, sizeof(rec));

	assert_int_equal(aeg_job_record_format(&rec, buf, 100, &len), AEG_ERANGE);
}

static void no_gpu_record(void **state)
{
	static const char text[] = "version=1\npid=1\nsocket=/a\ndevice=host\ngpus=none\nslabs=0\n"
				   "pinned_bytes=0\npinned_buffer=0\n";
	struct aeg_job_record rec;
	char buf[512];
	size_t len;

	assert_int_equal(aeg_job_record_parse(text, strlen(text), &rec), 0);
	assert_int_equal(rec.gpu_count, 0);
	assert_int_equal(rec.device, AEG_DEVICE_HOST);
	assert_int_equal(aeg_job_record_format(&rec, buf, sizeof(buf), &len), 0);
	assert_memory_equal(buf, text, len);
}

/* Replace line @key=... of the good record with @line (NULL: drop it). */
static void edit(char *out, size_t len, const char *key, const char *line)
{
	const char *p = good;
	size_t klen = strlen(key);

	out[0] = '\0';
	while (*p) {
		const char *nl = strchr(p, '\n');
		size_t n = (size_t)(nl - p) + 1;

		if (strncmp(p, key, klen) == 0 && p[klen] == '=') {
			if (line)
				snprintf(out + strlen(out), len - strlen(out), "%s\n", line);
		} else {
			snprintf(out + strlen(out), len - strlen(out), "%.*s", (int)n, p);
		}
		p += n;
	}
}

static void malformed_records(void **state)
{
	static const struct {
		const char *key, *line;     /* line replacing key's; NULL drops it */
		const char *detail;         /* part of the detail it must give */
	} cases[] = {
		{ "version", "version=2", "version '2' not supported" },
		{ "version", NULL, "version= must come first" },
		{ "pid", "pid=0", "pid '0'" },
		{ "pid", "pid=-5", "pid '-5'" },
		{ "pid", "pid=99999999999", "pid '99999999999'" },
		{ "pid", "pid= 12", "pid ' 12'" },
		{ "pid", "pid=12\npid=13", "'pid' given twice" },
		{ "pid", NULL, "key 'pid' missing" },
		{ "socket", "socket=agent.sock", "not an absolute path" },
		{ "socket", "socket=/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		  "shorter than 108" },
		{ "device", "device=rocm", "device 'rocm'" },
		{ "device", "device=CUDA", "device 'CUDA'" },
		{ "gpus", "gpus=0,0", "GPU 0 listed twice" },
		{ "gpus", "gpus=0,x", "comma-separated" },
		{ "gpus", "gpus=0,,1", "comma-separated" },
		{ "gpus", "gpus=5000", "ordinal over 1023" },
		{ "gpus", "gpus=0", "slabs=2 but gpus lists 1" },
		{ "slabs", "slabs=65", "slabs '65'" },
		{ "slabs", "slabs=1", "slabs=1 but gpus lists 2" },
		{ "slab1_gpu", "slab1_gpu=2", "slab1_gpu=2 but GPU 1 of the list is 3" },
		{ "slab1_gpu", NULL, "'slab1_gpu' missing" },
		{ "slab0_bytes", "slab0_bytes=0", "positive byte count" },
		{ "slab0_bytes", "slab0_bytes=1e9", "positive byte count" },
		{ "slab0_bytes", "slab0_bytes=18446744073709551616", "positive byte count" },
		{ "slab0_handle", "slab0_handle=abc", "128 hex digits" },
		{ "slab0_handle", "slab0_handle=" H0 "0", "128 hex digits" },
		{ "slab1_handle", "slab1_handle=zz" H1, "128 hex digits" },
		{ "slab1_bytes", "slab01_bytes=5", "unknown key 'slab01_bytes'" },
		{ "slab1_bytes", "slab64_bytes=5", "unknown key 'slab64_bytes'" },
		{ "pinned_bytes", "pinned_bytes=100", "whole number" },
		{ "pinned_buffer", "pinned_buffer=0", "both or neither" },
		{ "pinned_buffer", NULL, "key 'pinned_buffer' missing" },
		{ "device", "colour=blue", "unknown key 'colour'" },
		{ "device", "device cuda", "is not key=value" },
		{ "device", "=cuda", "is not key=value" },
		{ "device", "", "is not key=value" },
		{ "device", "device=cuda\r", "control character 0x0d" },
	};
	struct aeg_job_record rec;
	char text[4096];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		edit(text, sizeof(text), cases[i].key, cases[i].line);
		rec.pid = 77;
		int err = aeg_job_record_parse(text, strlen(text), &rec);
		if (err != AEG_EPROTO || strstr(aeg_error_detail(), cases[i].detail) == NULL)
			fail_msg("case %zu (%s): got %s '%s', wanted AEG_EPROTO '%s'", i,
				 cases[i].line ? cases[i].line : "(dropped)", aeg_errname(err),
				 aeg_error_detail(), cases[i].detail);
		assert_int_equal(rec.pid, 77);      /* untouched on failure */
	}

	/* Whole-text faults. */
	assert_int_equal(aeg_job_record_parse(good, strlen(good) - 1, &rec), AEG_EPROTO);
	assert_non_null(strstr(aeg_error_detail(), "truncated"));
	assert_int_equal(aeg_job_record_parse("", 0, &rec), AEG_EPROTO);
	assert_int_equal(aeg_job_record_parse("version=1\0\n", 11, &rec), AEG_EPROTO);
	assert_non_null(strstr(aeg_error_detail(), "NUL"));
	assert_int_equal(aeg_job_record_parse(good, AEG_JOB_RECORD_MAX + 1, &rec), AEG_EPROTO);
}

static void gpu_lists(void **state)
{
	int gpus[AEG_JOB_MAX_GPUS], n;
	char buf[16], big[512];

	assert_int_equal(aeg_job_gpus_parse("", gpus, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(aeg_job_gpus_parse("2,0,7", gpus, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(gpus[2], 7);
	assert_int_equal(aeg_job_gpus_format(gpus, n, buf, sizeof(buf)), 0);
	assert_string_equal(buf, "2,0,7");
	assert_int_equal(aeg_job_gpus_format(gpus, n, buf, 3), AEG_ERANGE);
	assert_int_equal(aeg_job_gpus_parse(",1", gpus, &n), AEG_EINVAL);
	assert_int_equal(aeg_job_gpus_parse("1,", gpus, &n), AEG_EINVAL);
	assert_int_equal(aeg_job_gpus_parse("-1", gpus, &n), AEG_EINVAL);
	assert_int_equal(aeg_job_gpus_parse("1 ", gpus, &n), AEG_EINVAL);
	big[0] = '\0';
	for (int i = 0; i <= AEG_JOB_MAX_GPUS; i++)
		snprintf(big + strlen(big), sizeof(big) - strlen(big), "%s%d", i ? "," : "", i);
	assert_int_equal(aeg_job_gpus_parse(big, gpus, &n), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "more than 64"));
}

static void files_are_atomic_and_private(void **state)
{
	struct aeg_job_record rec, back;
	char path[128], tmp[160];
	struct stat st;

	assert_int_equal(aeg_job_record_parse(good, strlen(good), &rec), 0);
	snprintf(path, sizeof(path), "%s/ready", tmpdir);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	assert_int_equal(aeg_job_record_read(path, &back), AEG_ENOENT);

	/* A link planted at the tmp name is replaced, not followed. */
	assert_int_equal(symlink("/etc/passwd", tmp), 0);
	umask(022);
	assert_int_equal(aeg_job_record_write(path, &rec), 0);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_int_equal(access(tmp, F_OK), -1);
	assert_int_equal(aeg_job_record_read(path, &back), 0);
	assert_memory_equal(&rec, &back, sizeof(rec));

	/* A link at the record's name is refused on read. */
	unlink(path);
	assert_int_equal(symlink("/etc/passwd", path), 0);
	assert_int_equal(aeg_job_record_read(path, &back), AEG_EPROTO);
	assert_non_null(strstr(aeg_error_detail(), "symbolic link"));
	unlink(path);

	/* A directory, an oversize file. */
	assert_int_equal(mkdir(path, 0700), 0);
	assert_int_equal(aeg_job_record_read(path, &back), AEG_EPROTO);
	rmdir(path);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	for (int i = 0; i < AEG_JOB_RECORD_MAX / 8 + 1; i++)
		fputs("pid=12\n#", f);
	fclose(f);
	assert_int_equal(aeg_job_record_read(path, &back), AEG_EPROTO);
	assert_non_null(strstr(aeg_error_detail(), "at most 65536"));
	unlink(path);
}

static void error_records(void **state)
{
	char path[128], reason[AEG_JOB_ERROR_MAX], longer[3000];
	FILE *f;

	snprintf(path, sizeof(path), "%s/error", tmpdir);
	assert_int_equal(aeg_job_error_write(path, "GPU 0: slab of 40 GiB asked, 12.5 GiB free"), 0);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), 0);
	assert_string_equal(reason, "GPU 0: slab of 40 GiB asked, 12.5 GiB free");
	assert_int_equal(aeg_job_error_read(path, reason, 10), AEG_ERANGE);

	/* Newlines and escapes in a reason cannot forge more lines. */
	assert_int_equal(aeg_job_error_write(path, "bad\nversion=1\x1b[0m"), 0);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), 0);
	assert_string_equal(reason, "bad?version=1?[0m");

	memset(longer, 'x', sizeof(longer) - 1);
	longer[sizeof(longer) - 1] = '\0';
	assert_int_equal(aeg_job_error_write(path, longer), 0);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), 0);
	assert_int_equal(strlen(reason), AEG_JOB_ERROR_MAX - 1);

	f = fopen(path, "w");
	fputs("two\nlines\n", f);
	fclose(f);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), AEG_EPROTO);
	f = fopen(path, "w");
	fputs("no newline", f);
	fclose(f);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), AEG_EPROTO);
	f = fopen(path, "w");
	fclose(f);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), AEG_EPROTO);
	unlink(path);
	assert_int_equal(aeg_job_error_read(path, reason, sizeof(reason)), AEG_ENOENT);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(parse_good_and_round_trip),
		cmocka_unit_test(no_gpu_record),
		cmocka_unit_test(malformed_records),
		cmocka_unit_test(gpu_lists),
		cmocka_unit_test(files_are_atomic_and_private),
		cmocka_unit_test(error_records),
	};
	return cmocka_run_group_tests_name("jobrec", tests, setup, teardown);
}

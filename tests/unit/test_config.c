/* Site configuration: defaults, the sample file, good and bad files, the path rules. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "testutil.h"

#define GiB (1ull << 30)
#define MiB (1ull << 20)

static const char *const key_names[] = {
	"device", "allow_device_option", "slab_default", "slab_max", "pinned_default",
	"pinned_max", "pinned_buffer", "prefetch_threads", "prefetch_chunk", "agent_path",
	"agent_start_timeout", "agent_stop_timeout", "runtime_dir", "log_level", "model_cache", "max_loads",
	"hello_timeout",
};

/* Each test gets a fresh directory for its files; teardown empties and removes it. */
struct fixture {
	char dir[PATH_MAX];
	char paths[8][PATH_MAX];
	size_t npaths;
	int fds;
};

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	const char *tmp = getenv("TMPDIR");

	if (f == NULL)
		return -1;
	snprintf(f->dir, sizeof(f->dir), "%s/aegaeon-test-config.XXXXXX", tmp != NULL && *tmp != '\0' ? tmp : "/tmp");
	if (mkdtemp(f->dir) == NULL) {
		free(f);
		return -1;
	}
	f->fds = count_fds();
	unsetenv("AEGAEON_CONFIG");
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;
	char path[PATH_MAX];
	struct dirent *e;
	int fds = count_fds(), rc;
	DIR *d;

	d = opendir(f->dir);
	if (d != NULL) {
		while ((e = readdir(d)) != NULL) {
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "%s/%s", f->dir, e->d_name);
			if (unlink(path) != 0)
				rmdir(path);
		}
		closedir(d);
	}
	rc = rmdir(f->dir);
	unsetenv("AEGAEON_CONFIG");
	/* The library must close the file on every path, error paths included. */
	if (fds != f->fds) {
		fprintf(stderr, "open descriptors went from %d to %d\n", f->fds, fds);
		rc = -1;
	}
	free(f);
	return rc;
}

/* The path stays valid until teardown; writing the same name again reuses it. */
static const char *write_file(struct fixture *f, const char *name, const char *text)
{
	char path[PATH_MAX];
	size_t i;
	FILE *fp;

	snprintf(path, sizeof(path), "%s/%s", f->dir, name);
	for (i = 0; i < f->npaths && strcmp(f->paths[i], path) != 0; i++)
		;
	assert_true(i < AEG_ARRAY_SIZE(f->paths));
	if (i == f->npaths)
		memcpy(f->paths[f->npaths++], path, sizeof(path));
	fp = fopen(path, "w");
	assert_non_null(fp);
	assert_true(fputs(text, fp) >= 0);
	assert_int_equal(fclose(fp), 0);
	return f->paths[i];
}

static void assert_specs_equal(const struct aeg_size_spec *a, const struct aeg_size_spec *b)
{
	assert_int_equal(a->is_percent, b->is_percent);
	if (a->is_percent)
		assert_int_equal(a->ppm, b->ppm);
	else
		assert_int_equal(a->bytes, b->bytes);
}

static void assert_configs_equal(const struct aeg_config *a, const struct aeg_config *b)
{
	assert_int_equal(a->device, b->device);
	assert_int_equal(a->allow_device_option, b->allow_device_option);
	assert_specs_equal(&a->slab_default, &b->slab_default);
	assert_specs_equal(&a->slab_max, &b->slab_max);
	assert_int_equal(a->pinned_default_bytes, b->pinned_default_bytes);
	assert_int_equal(a->pinned_max_bytes, b->pinned_max_bytes);
	assert_int_equal(a->pinned_buffer_bytes, b->pinned_buffer_bytes);
	assert_int_equal(a->prefetch_threads, b->prefetch_threads);
	assert_int_equal(a->prefetch_chunk_bytes, b->prefetch_chunk_bytes);
	assert_string_equal(a->agent_path, b->agent_path);
	assert_int_equal(a->agent_start_timeout_ms, b->agent_start_timeout_ms);
	assert_int_equal(a->agent_stop_timeout_ms, b->agent_stop_timeout_ms);
	assert_string_equal(a->runtime_dir, b->runtime_dir);
	assert_int_equal(a->log_level, b->log_level);
	assert_specs_equal(&a->model_cache, &b->model_cache);
	assert_int_equal(a->max_loads, b->max_loads);
	assert_int_equal(a->hello_timeout_ms, b->hello_timeout_ms);
}

static void defaults_are_the_documented_ones(void **state)
{
	struct aeg_config c;

	aeg_config_defaults(&c);
	assert_int_equal(c.device, AEG_DEVICE_CUDA);
	assert_false(c.allow_device_option);
	assert_true(c.slab_default.is_percent);
	assert_int_equal(c.slab_default.ppm, 900000);
	assert_true(c.slab_max.is_percent);
	assert_int_equal(c.slab_max.ppm, 950000);
	assert_int_equal(c.pinned_default_bytes, 4 * GiB);
	assert_int_equal(c.pinned_max_bytes, 64 * GiB);
	assert_int_equal(c.pinned_buffer_bytes, 32 * MiB);
	assert_int_equal(c.prefetch_threads, 12);
	assert_int_equal(c.prefetch_chunk_bytes, 64 * MiB);
	assert_string_equal(c.agent_path, SBINDIR "/aegaeond");
	assert_int_equal(c.agent_start_timeout_ms, 30000);
	assert_int_equal(c.agent_stop_timeout_ms, 5000);
	assert_string_equal(c.runtime_dir, "/run/aegaeon");
	assert_int_equal(c.log_level, AEG_LOG_INFO);
	assert_false(c.model_cache.is_percent);
	assert_int_equal(c.model_cache.bytes, 0);
	assert_int_equal(c.max_loads, 4096);
	assert_int_equal(c.hello_timeout_ms, 10000);
}

static void device_kinds_parse_and_name(void **state)
{
	enum aeg_device_kind k = AEG_DEVICE_HOST;

	assert_int_equal(aeg_device_kind_parse("cuda", &k), 0);
	assert_int_equal(k, AEG_DEVICE_CUDA);
	assert_int_equal(aeg_device_kind_parse("HOST", &k), 0);
	assert_int_equal(k, AEG_DEVICE_HOST);
	assert_int_equal(aeg_device_kind_parse("gpu", &k), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "'gpu'"));
	assert_int_equal(aeg_device_kind_parse("", &k), AEG_EINVAL);
	assert_int_equal(aeg_device_kind_parse(NULL, &k), AEG_EINVAL);
	assert_int_equal(k, AEG_DEVICE_HOST);
	assert_string_equal(aeg_device_kind_name(AEG_DEVICE_CUDA), "cuda");
	assert_string_equal(aeg_device_kind_name(AEG_DEVICE_HOST), "host");
	assert_string_equal(aeg_device_kind_name((enum aeg_device_kind)7), "unknown");
}

static void sample_sets_every_key_to_its_default(void **state)
{
	struct aeg_config loaded, defaults;
	char text[8192], needle[64];
	size_t n;
	FILE *fp;

	fp = fopen(SAMPLE_CONFIG, "r");
	assert_non_null(fp);
	n = fread(text, 1, sizeof(text) - 1, fp);
	fclose(fp);
	text[n] = '\0';
	for (size_t i = 0; i < AEG_ARRAY_SIZE(key_names); i++) {
		snprintf(needle, sizeof(needle), "\n%s = ", key_names[i]);
		if (strstr(text, needle) == NULL)
			fail_msg("the sample does not set '%s'", key_names[i]);
	}

	memset(&loaded, 0x5a, sizeof(loaded));
	if (aeg_config_load(&loaded, SAMPLE_CONFIG) != 0)
		fail_msg("%s", aeg_error_detail());
	aeg_config_defaults(&defaults);
	assert_configs_equal(&loaded, &defaults);
}

static void good_file_sets_every_key(void **state)
{
	struct aeg_config c;
	const char *path = write_file(*state, "good.conf",
		"# a site\n"
		"device = \"host\";\n"
		"allow_device_option = true;\n"
		"slab_default = \"30GiB\";   // bytes here, a percentage for the cap\n"
		"slab_max = \"12.5%\";\n"
		"pinned_default = \"0\";\n"
		"pinned_max = \"1.5TiB\";\n"
		"pinned_buffer = \"2MiB\";\n"
		"prefetch_threads = 256L;\n"
		"prefetch_chunk = \"4KiB\";\n"
		"agent_path = \"/opt/aegaeon/sbin/aegaeond\";\n"
		"agent_start_timeout = 2.5;\n"
		"agent_stop_timeout : 86400\n"
		"runtime_dir = \"/var/run/aegaeon//\";\n"
		"log_level = \"WARNING\";\n"
		"model_cache = \"75%\";\n"
		"max_loads = 1048576;\n"
		"hello_timeout = 0.25;\n");

	if (aeg_config_load(&c, path) != 0)
		fail_msg("%s", aeg_error_detail());
	assert_int_equal(c.device, AEG_DEVICE_HOST);
	assert_true(c.allow_device_option);
	assert_false(c.slab_default.is_percent);
	assert_int_equal(c.slab_default.bytes, 30 * GiB);
	assert_true(c.slab_max.is_percent);
	assert_int_equal(c.slab_max.ppm, 125000);
	assert_int_equal(c.pinned_default_bytes, 0);
	assert_int_equal(c.pinned_max_bytes, 1536 * GiB);
	assert_int_equal(c.pinned_buffer_bytes, 2 * MiB);
	assert_int_equal(c.prefetch_threads, 256);
	assert_int_equal(c.prefetch_chunk_bytes, 4096);
	assert_string_equal(c.agent_path, "/opt/aegaeon/sbin/aegaeond");
	assert_int_equal(c.agent_start_timeout_ms, 2500);
	assert_int_equal(c.agent_stop_timeout_ms, 86400000);
	assert_string_equal(c.runtime_dir, "/var/run/aegaeon");
	assert_int_equal(c.log_level, AEG_LOG_WARN);
	assert_true(c.model_cache.is_percent);
	assert_int_equal(c.model_cache.ppm, 750000);
	assert_int_equal(c.max_loads, 1048576);
	assert_int_equal(c.hello_timeout_ms, 250);
}

static void partial_file_keeps_other_defaults(void **state)
{
	struct aeg_config c, want;
	const char *path = write_file(*state, "partial.conf", "prefetch_threads = 3;\n");

	assert_int_equal(aeg_config_load(&c, path), 0);
	aeg_config_defaults(&want);
	want.prefetch_threads = 3;
	assert_configs_equal(&c, &want);

	path = write_file(*state, "empty.conf", "# nothing but a comment\n");
	assert_int_equal(aeg_config_load(&c, path), 0);
	aeg_config_defaults(&want);
	assert_configs_equal(&c, &want);

	assert_int_equal(aeg_config_load(&c, "/dev/null"), 0);
	assert_configs_equal(&c, &want);
}

static const struct {
	const char *text;
	int line;
	const char *detail;	/* what must follow "FILE:LINE: " */
} bad[] = {
	/* unknown keys and groups */
	{ "device = \"cuda\";\nslab_defualt = \"90%\";\n", 2,
	  "key 'slab_defualt': unknown key (did you mean 'slab_default'?)" },
	{ "colour = \"blue\";\n", 1, "key 'colour': unknown key (see aegaeon.conf(5)" },
	{ "\n\nagent = {\n  path = \"/usr/sbin/aegaeond\";\n};\n", 3, "key 'agent': unknown group" },
	{ "limits = { slab_max = \"90%\"; };\n", 1, "key 'limits': unknown group" },
	/* wrong type, for each kind of key */
	{ "device = 1;\n", 1, "key 'device': must be a string in double quotes (e.g. \"cuda\"), not an integer" },
	{ "allow_device_option = 1;\n", 1, "key 'allow_device_option': must be true or false, not an integer" },
	{ "allow_device_option = \"yes\";\n", 1, "must be true or false, not a string" },
	{ "slab_default = 90;\n", 1, "key 'slab_default': must be a string in double quotes (e.g. \"90%\" or \"40GiB\"), not an integer" },
	{ "slab_max = { a = 1; };\n", 1, "key 'slab_max': must be a string in double quotes" },
	{ "pinned_max = 68719476736L;\n", 1, "key 'pinned_max': must be a string in double quotes (e.g. \"64MiB\"), not an integer" },
	{ "pinned_buffer = (\"32MiB\");\n", 1, "key 'pinned_buffer': must be a string in double quotes (e.g. \"64MiB\"), not a list" },
	{ "prefetch_threads = 8.0;\n", 1, "key 'prefetch_threads': must be an integer, not a float" },
	{ "prefetch_threads = \"8\";\n", 1, "must be an integer, not a string" },
	{ "prefetch_chunk = 1.5;\n", 1, "key 'prefetch_chunk': must be a string in double quotes (e.g. \"64MiB\"), not a float" },
	{ "agent_path = 5;\n", 1, "key 'agent_path': must be a string in double quotes" },
	{ "agent_start_timeout = \"30\";\n", 1, "key 'agent_start_timeout': must be a number of seconds (e.g. 30 or 2.5), not a string" },
	{ "agent_stop_timeout = true;\n", 1, "key 'agent_stop_timeout': must be a number of seconds (e.g. 30 or 2.5), not a boolean" },
	{ "runtime_dir = [\"/run\"];\n", 1, "key 'runtime_dir': must be a string in double quotes (e.g. \"/run/aegaeon\"), not an array" },
	{ "log_level = 3;\n", 1, "key 'log_level': must be a string in double quotes (e.g. \"info\"), not an integer" },
	{ "model_cache = 16;\n", 1, "key 'model_cache': must be a string in double quotes (e.g. \"90%\" or \"40GiB\"), not an integer" },
	/* bad sizes */
	{ "slab_max = \"95 percent\";\n", 1, "key 'slab_max': size '95 percent': unknown unit 'percent'" },
	{ "pinned_max = \"-1G\";\n", 1, "key 'pinned_max': size '-1G': no sign" },
	{ "prefetch_chunk = \"1.5\";\n", 1, "key 'prefetch_chunk': size '1.5': a byte count cannot have a fraction" },
	{ "pinned_max = \"99999999999T\";\n", 1, "key 'pinned_max': size '99999999999T' does not fit in 64 bits" },
	{ "slab_default = \"110%\";\n", 1, "key 'slab_default': size '110%': a percentage must be at most 100%" },
	{ "slab_default = \"\";\n", 1, "key 'slab_default': size '' is empty" },
	{ "model_cache = \"101%\";\n", 1, "key 'model_cache': size '101%': a percentage must be at most 100%" },
	/* a percentage where bytes are needed */
	{ "pinned_default = \"10%\";\n", 1, "key 'pinned_default': '10%' is a percentage; this key needs a size in bytes" },
	{ "pinned_max = \"50%\";\n", 1, "key 'pinned_max': '50%' is a percentage" },
	{ "pinned_buffer = \"1%\";\n", 1, "key 'pinned_buffer': '1%' is a percentage" },
	{ "prefetch_chunk = \"1%\";\n", 1, "key 'prefetch_chunk': '1%' is a percentage" },
	/* relative paths */
	{ "agent_path = \"sbin/aegaeond\";\n", 1, "key 'agent_path': 'sbin/aegaeond' is not an absolute path" },
	{ "runtime_dir = \"run/aegaeon\";\n", 1, "key 'runtime_dir': 'run/aegaeon' is not an absolute path" },
	{ "runtime_dir = \"\";\n", 1, "key 'runtime_dir': '' is not an absolute path" },
	{ "runtime_dir = \"//\";\n", 1, "key 'runtime_dir': must be a directory below / (the default is \"/run/aegaeon\")" },
	/* out of range, one key at a time */
	{ "device = \"gpu\";\n", 1, "key 'device': 'gpu' is not one of \"cuda\", \"host\"" },
	{ "log_level = \"loud\";\n", 1, "key 'log_level': 'loud' is not one of \"debug\"" },
	{ "prefetch_threads = 0;\n", 1, "key 'prefetch_threads': 0 is out of range (1 to 256)" },
	{ "prefetch_threads = 257;\n", 1, "key 'prefetch_threads': 257 is out of range (1 to 256)" },
	{ "prefetch_threads = -1;\n", 1, "key 'prefetch_threads': -1 is out of range" },
	{ "prefetch_threads = 4294967304L;\n", 1, "key 'prefetch_threads': 4294967304 is out of range" },
	{ "max_loads = 0;\n", 1, "key 'max_loads': 0 is out of range (1 to 1048576)" },
	{ "max_loads = 1048577;\n", 1, "key 'max_loads': 1048577 is out of range (1 to 1048576)" },
	{ "max_loads = \"100\";\n", 1, "key 'max_loads': must be an integer, not a string" },
	{ "agent_start_timeout = 0;\n", 1, "key 'agent_start_timeout': 0 seconds is out of range (0.001 to 86400, one day)" },
	{ "agent_start_timeout = -2.5;\n", 1, "key 'agent_start_timeout': -2.5 seconds is out of range" },
	{ "agent_start_timeout = 0.0001;\n", 1, "key 'agent_start_timeout': 0.0001 seconds is out of range" },
	{ "agent_stop_timeout = 86401;\n", 1, "key 'agent_stop_timeout': 86401 seconds is out of range" },
	{ "hello_timeout = 0;\n", 1, "key 'hello_timeout': 0 seconds is out of range (0.001 to 86400, one day)" },
	{ "agent_stop_timeout = 1e300;\n", 1, "key 'agent_stop_timeout': 1e+300 seconds is out of range" },
	{ "slab_max = \"0%\";\n", 1, "key 'slab_max': must be more than 0" },
	{ "slab_max = \"0\";\n", 1, "key 'slab_max': must be more than 0" },
	{ "pinned_buffer = \"0\";\n", 1, "key 'pinned_buffer': must be more than 0" },
	{ "pinned_max = \"0\";\n", 1, "key 'pinned_max': must be more than 0" },
	{ "prefetch_chunk = \"0\";\n", 1, "key 'prefetch_chunk': must be more than 0" },
	{ "pinned_buffer = \"1000\";\n", 1, "key 'pinned_buffer': 1000 bytes is not a multiple of 4 KiB" },
	{ "prefetch_chunk = \"1MB\";\n", 1, "key 'prefetch_chunk': 1000000 bytes is not a multiple of 4 KiB" },
	/* limits between keys: the message goes to the key the file set */
	{ "pinned_buffer = \"128GiB\";\n", 1, "key 'pinned_buffer': 128 GiB is more than pinned_max (64 GiB, the default)" },
	{ "\npinned_max = \"16MiB\";\n", 2, "key 'pinned_max': 16 MiB is less than pinned_buffer (32 MiB, the default)" },
	{ "pinned_buffer = \"1MiB\";\npinned_max = \"1GiB\";\n", 2, "key 'pinned_max': 1 GiB is less than pinned_default (4 GiB, the default)" },
	{ "pinned_max = \"8GiB\";\npinned_default = \"9GiB\";\n", 2, "key 'pinned_default': 9 GiB is more than pinned_max (8 GiB)" },
	{ "pinned_default = \"9GiB\";\npinned_max = \"8GiB\";\n", 2, "key 'pinned_max': 8 GiB is less than pinned_default (9 GiB)" },
	{ "pinned_default = \"16MiB\";\n", 1, "key 'pinned_default': 16 MiB is less than pinned_buffer (32 MiB, the default)" },
	{ "pinned_default = \"32MiB\";\npinned_buffer = \"64MiB\";\n", 2, "key 'pinned_buffer': 64 MiB is more than pinned_default (32 MiB)" },
	{ "slab_default = \"96%\";\n", 1, "key 'slab_default': 96% is more than slab_max (95%, the default)" },
	{ "slab_max = \"12.5%\";\n", 1, "key 'slab_max': 12.5% is less than slab_default (90%, the default)" },
	{ "slab_max = \"40GiB\";\nslab_default = \"50GiB\";\n", 2, "key 'slab_default': 50 GiB is more than slab_max (40 GiB)" },
	/* syntax */
	{ "device = \"cuda\";\nslab_max = ;\n", 2, "syntax error" },
	{ "device = \"cuda;\n", 2, "syntax error" },	/* seen at the end of the file */
	{ "# ok\n= 5;\n", 2, "syntax error" },
	{ "device = \"cuda\";\ndevice = \"host\";\n", 2, "duplicate setting name" },
	{ "@include \"missing.conf\"\n", 1, "cannot open include file" },
};

static void bad_files_name_file_line_and_key(void **state)
{
	struct aeg_config c, before;
	char prefix[PATH_MAX + 32];

	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad); i++) {
		const char *path = write_file(*state, "bad.conf", bad[i].text);
		const char *detail;
		int rc;

		memset(&c, 0x5a, sizeof(c));
		memcpy(&before, &c, sizeof(c));
		rc = aeg_config_load(&c, path);
		detail = aeg_error_detail();
		if (rc != AEG_ECONFIG)
			fail_msg("file %zu (%s) gave %s (%s), want AEG_ECONFIG", i, bad[i].text, aeg_errname(rc), detail);
		snprintf(prefix, sizeof(prefix), "%s:%d: ", path, bad[i].line);
		if (strncmp(detail, prefix, strlen(prefix)) != 0 || strstr(detail, bad[i].detail) == NULL)
			fail_msg("file %zu (%s): detail \"%s\", want \"%s%s\"", i, bad[i].text, detail, prefix, bad[i].detail);
		/* Nothing of a bad file is applied. */
		assert_memory_equal(&c, &before, sizeof(c));
	}
}

static void error_in_an_included_file_names_it(void **state)
{
	struct aeg_config c;
	char want[PATH_MAX];
	const char *path;

	write_file(*state, "site.conf", "# limits\n\nprefetch_threads = 300;\n");
	path = write_file(*state, "main.conf", "log_level = \"debug\";\n@include \"site.conf\"\n");
	assert_int_equal(aeg_config_load(&c, path), AEG_ECONFIG);
	snprintf(want, sizeof(want), "%s/site.conf:3: key 'prefetch_threads': 300 is out of range (1 to 256)",
		 ((struct fixture *)*state)->dir);
	assert_string_equal(aeg_error_detail(), want);

	write_file(*state, "site.conf", "prefetch_threads = 30;\n");
	assert_int_equal(aeg_config_load(&c, path), 0);
	assert_int_equal(c.prefetch_threads, 30);
	assert_int_equal(c.log_level, AEG_LOG_DEBUG);
}

static void missing_and_unreadable_files(void **state)
{
	struct fixture *f = *state;
	struct aeg_config c, before;
	char path[PATH_MAX];
	const char *locked;
	int status;
	pid_t pid;

	memset(&c, 0x5a, sizeof(c));
	memcpy(&before, &c, sizeof(c));
	snprintf(path, sizeof(path), "%s/absent.conf", f->dir);
	assert_int_equal(aeg_config_load(&c, path), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), path));
	assert_non_null(strstr(aeg_error_detail(), "No such file"));

	setenv("AEGAEON_CONFIG", path, 1);
	assert_int_equal(aeg_config_load(&c, NULL), AEG_ENOENT);
	assert_non_null(strstr(aeg_error_detail(), path));
	assert_non_null(strstr(aeg_error_detail(), "$AEGAEON_CONFIG"));
	assert_memory_equal(&c, &before, sizeof(c));

	assert_int_equal(aeg_config_load(&c, f->dir), AEG_ECONFIG);
	assert_non_null(strstr(aeg_error_detail(), "is a directory"));
	assert_int_equal(aeg_config_load(&c, ""), AEG_EINVAL);
	assert_int_equal(aeg_config_load(NULL, path), AEG_EINVAL);
	assert_memory_equal(&c, &before, sizeof(c));

	/* root reads any file: as root, try as nobody in a child. */
	locked = write_file(f, "locked.conf", "device = \"host\";\n");
	assert_int_equal(chmod(locked, 0), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
			child_exit(2);
		child_exit(aeg_config_load(&c, locked) == AEG_EACCES &&
		      strstr(aeg_error_detail(), "locked.conf: Permission denied") != NULL ? 0 : 1);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
}

static void environment_names_the_file(void **state)
{
	struct aeg_config c;
	const char *env_path, *arg_path;

	env_path = write_file(*state, "env.conf", "prefetch_threads = 5;\n");
	arg_path = write_file(*state, "arg.conf", "prefetch_threads = 6;\n");

	setenv("AEGAEON_CONFIG", env_path, 1);
	assert_int_equal(aeg_config_load(&c, NULL), 0);
	assert_int_equal(c.prefetch_threads, 5);
	/* An argument wins over the environment. */
	assert_int_equal(aeg_config_load(&c, arg_path), 0);
	assert_int_equal(c.prefetch_threads, 6);

	/* A bad file named by the environment is an error, not a fall back to defaults. */
	write_file(*state, "env.conf", "prefetch_threads = 0;\n");
	assert_int_equal(aeg_config_load(&c, NULL), AEG_ECONFIG);
	assert_non_null(strstr(aeg_error_detail(), "env.conf:1: key 'prefetch_threads'"));
}

static void empty_environment_means_the_default_path(void **state)
{
	struct aeg_config c, want;
	int rc;

	setenv("AEGAEON_CONFIG", "", 1);
	memset(&c, 0x5a, sizeof(c));
	rc = aeg_config_load(&c, NULL);
	if (access(AEG_CONFIG_DEFAULT_PATH, F_OK) == 0 || errno != ENOENT) {
		/* This machine has a site file: it is read, good or bad. */
		assert_true(rc == 0 || rc == AEG_ECONFIG || rc == AEG_EACCES);
		if (rc != 0)
			assert_non_null(strstr(aeg_error_detail(), AEG_CONFIG_DEFAULT_PATH));
		return;
	}
	/* No site file at the default path: the defaults stand. */
	assert_int_equal(rc, 0);
	aeg_config_defaults(&want);
	assert_configs_equal(&c, &want);
}

struct job {
	const char *path;
	int threads;
	int ok;
};

static void *load_many(void *arg)
{
	struct job *j = arg;
	struct aeg_config c;

	j->ok = 1;
	for (int i = 0; i < 200; i++) {
		if (aeg_config_load(&c, j->path) != 0 || c.prefetch_threads != j->threads)
			j->ok = 0;
	}
	return NULL;
}

static void loads_in_parallel(void **state)
{
	char text[64], name[32];
	struct job jobs[4];
	pthread_t t[4];

	for (int i = 0; i < 4; i++) {
		snprintf(name, sizeof(name), "t%d.conf", i);
		snprintf(text, sizeof(text), "prefetch_threads = %d;\n", i + 1);
		jobs[i] = (struct job){ .path = write_file(*state, name, text), .threads = i + 1 };
	}
	for (int i = 0; i < 4; i++)
		assert_int_equal(pthread_create(&t[i], NULL, load_many, &jobs[i]), 0);
	for (int i = 0; i < 4; i++) {
		assert_int_equal(pthread_join(t[i], NULL), 0);
		assert_true(jobs[i].ok);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(defaults_are_the_documented_ones),
		cmocka_unit_test(device_kinds_parse_and_name),
		cmocka_unit_test_setup_teardown(sample_sets_every_key_to_its_default, setup, teardown),
		cmocka_unit_test_setup_teardown(good_file_sets_every_key, setup, teardown),
		cmocka_unit_test_setup_teardown(partial_file_keeps_other_defaults, setup, teardown),
		cmocka_unit_test_setup_teardown(bad_files_name_file_line_and_key, setup, teardown),
		cmocka_unit_test_setup_teardown(error_in_an_included_file_names_it, setup, teardown),
		cmocka_unit_test_setup_teardown(missing_and_unreadable_files, setup, teardown),
		cmocka_unit_test_setup_teardown(environment_names_the_file, setup, teardown),
		cmocka_unit_test_setup_teardown(empty_environment_means_the_default_path, setup, teardown),
		cmocka_unit_test_setup_teardown(loads_in_parallel, setup, teardown),
	};
	return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}

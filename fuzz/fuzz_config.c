/* libFuzzer target: the site configuration file (aeg_config_load of a file holding the input). */
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <aegaeon/config.h>

#include "fuzz.h"

static const int load_errors[] = { AEG_ECONFIG, AEG_ENOMEM, 0 };

static char dir[PATH_MAX];
static char path[PATH_MAX + 32];
static int fd = -1;

static void cleanup(void)
{
	char inc[sizeof(path)];

	snprintf(inc, sizeof(inc), "%s/inc.conf", dir);
	unlink(inc);
	unlink(path);
	rmdir(dir);
}

/*
 * The file lives in a private directory that also holds inc.conf, so
 * '@include "inc.conf"' (relative to the file) is exercised; inputs naming
 * any other file are skipped, or the fuzzer would read whatever it guessed.
 */
static void setup(void)
{
	static const char inc_text[] = "prefetch_threads = 4;\npinned_buffer = \"8MiB\";\n";
	const char *base = fuzz_tmpdir();
	char inc[sizeof(path)];
	int ifd;

	snprintf(dir, sizeof(dir), "%s/aegaeon-fuzz-config.XXXXXX", base);
	FUZZ_CHECK(mkdtemp(dir) != NULL, "mkdtemp %s failed", dir);
	atexit(cleanup);
	snprintf(path, sizeof(path), "%s/aegaeon.conf", dir);
	snprintf(inc, sizeof(inc), "%s/inc.conf", dir);
	ifd = open(inc, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	FUZZ_CHECK(ifd >= 0 && write(ifd, inc_text, sizeof(inc_text) - 1) == sizeof(inc_text) - 1,
		   "writing %s failed", inc);
	close(ifd);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	FUZZ_CHECK(fd >= 0, "creating %s failed", path);
}

static int names_other_files(const uint8_t *data, size_t size)
{
	static const char word[] = "include", only[] = "\"inc.conf\"";

	for (size_t i = 0; i + sizeof(word) - 1 <= size; i++) {
		size_t j = i + sizeof(word) - 1;

		if (strncasecmp((const char *)data + i, word, sizeof(word) - 1) != 0)
			continue;
		while (j < size && data[j] != '"' && data[j] != '\n')
			j++;
		if (j < size && data[j] == '"' &&
		    (size - j < sizeof(only) - 1 || memcmp(data + j, only, sizeof(only) - 1) != 0))
			return 1;
	}
	return 0;
}

/* What aeg_config_load promises about a configuration it returns. */
static void check_config(const struct aeg_config *c)
{
	FUZZ_CHECK(c->device == AEG_DEVICE_CUDA || c->device == AEG_DEVICE_HOST, "device %d", c->device);
	FUZZ_CHECK(c->allow_device_option == 0 || c->allow_device_option == 1, "allow_device_option %d",
		   c->allow_device_option);
	FUZZ_CHECK(c->slab_default.is_percent ? c->slab_default.ppm <= 1000000 : c->slab_default.ppm == 0,
		   "slab_default ppm %u", c->slab_default.ppm);
	FUZZ_CHECK(c->slab_max.is_percent ? c->slab_max.ppm <= 1000000 && c->slab_max.ppm > 0
					  : c->slab_max.ppm == 0 && c->slab_max.bytes > 0,
		   "slab_max of 0");
	if (c->slab_default.is_percent == c->slab_max.is_percent)
		FUZZ_CHECK(c->slab_default.is_percent ? c->slab_default.ppm <= c->slab_max.ppm
						      : c->slab_default.bytes <= c->slab_max.bytes,
			   "slab_default over slab_max");
	FUZZ_CHECK(c->pinned_buffer_bytes > 0 && c->pinned_buffer_bytes % 4096 == 0,
		   "pinned_buffer %llu", (unsigned long long)c->pinned_buffer_bytes);
	FUZZ_CHECK(c->pinned_buffer_bytes <= c->pinned_max_bytes && c->pinned_default_bytes <= c->pinned_max_bytes,
		   "pinned sizes over pinned_max");
	FUZZ_CHECK(c->prefetch_chunk_bytes > 0 && c->prefetch_chunk_bytes % 4096 == 0,
		   "prefetch_chunk %llu", (unsigned long long)c->prefetch_chunk_bytes);
	FUZZ_CHECK(c->prefetch_threads >= 1 && c->prefetch_threads <= 256, "prefetch_threads %d",
		   c->prefetch_threads);
	FUZZ_CHECK(c->max_loads >= 1 && c->max_loads <= 1048576, "max_loads %d", c->max_loads);
	FUZZ_CHECK(c->agent_start_timeout_ms >= 1 && c->agent_start_timeout_ms <= 86400000 &&
		   c->agent_stop_timeout_ms >= 1 && c->agent_stop_timeout_ms <= 86400000 &&
		   c->hello_timeout_ms >= 1 && c->hello_timeout_ms <= 86400000,
		   "timeouts %d, %d, %d ms", c->agent_start_timeout_ms, c->agent_stop_timeout_ms, c->hello_timeout_ms);
	FUZZ_CHECK(c->agent_path[0] == '/' && memchr(c->agent_path, '\0', sizeof(c->agent_path)),
		   "agent_path");
	FUZZ_CHECK(c->runtime_dir[0] == '/' && memchr(c->runtime_dir, '\0', sizeof(c->runtime_dir)),
		   "runtime_dir");
	FUZZ_CHECK(c->log_level >= AEG_LOG_DEBUG && c->log_level <= AEG_LOG_ERROR, "log_level %d",
		   c->log_level);
}

/*
 * libconfig before 1.7.3 leaks a string token when a syntax error discards
 * it (hyperrealm/libconfig#142, fixed by #155); Debian 12 ships 1.5. The
 * leak is libconfig's, bounded by one token per failed load, so it is not
 * reported; leaks of aegaeon's own code still are.
 */
const char *__lsan_default_suppressions(void);

const char *__lsan_default_suppressions(void)
{
	return "leak:libconfig.so\n";
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct aeg_config cfg, before;
	int rc;

	if (fd < 0)
		setup();
	if (names_other_files(data, size))
		return -1;
	FUZZ_CHECK(ftruncate(fd, 0) == 0 && pwrite(fd, data, size, 0) == (ssize_t)size,
		   "writing %zu bytes to %s failed", size, path);

	memset(&cfg, 0xa5, sizeof(cfg));
	before = cfg;
	aeg_error_clear();
	rc = aeg_config_load(&cfg, path);
	if (rc < 0) {
		fuzz_check_error(rc, load_errors);
		FUZZ_CHECK(strncmp(aeg_error_detail(), dir, strlen(dir)) == 0,
			   "detail does not start with the file's name: %s", aeg_error_detail());
		FUZZ_CHECK(memcmp(&cfg, &before, sizeof(cfg)) == 0, "a failed load changed the configuration");
		return 0;
	}
	FUZZ_CHECK(rc == 0, "aeg_config_load returned %d", rc);
	check_config(&cfg);
	return 0;
}

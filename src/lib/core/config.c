/* Site configuration: defaults, and aegaeon.conf read with libconfig into struct aeg_config. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <libconfig.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <aegaeon/config.h>

#include "internal.h"

#define PAGE_BYTES 4096u
#define MAX_TIMEOUT_S 86400.0
#define MAX_PREFETCH_THREADS 256
#define MAX_LOADS_LIMIT 1048576
#define MAX_CONFIG_BYTES (1 << 20)

AEG_EXPORT int aeg_device_kind_parse(const char *text, enum aeg_device_kind *kind)
{
	char q[72];

	if (text == NULL || kind == NULL)
		return aeg_fail(AEG_EINVAL, "device kind missing");
	if (strcasecmp(text, "cuda") == 0)
		*kind = AEG_DEVICE_CUDA;
	else if (strcasecmp(text, "host") == 0)
		*kind = AEG_DEVICE_HOST;
	else
		return aeg_fail(AEG_EINVAL, "device '%s' is not one of cuda, host", aeg_quote(text, q, sizeof(q)));
	return 0;
}

AEG_EXPORT const char *aeg_device_kind_name(enum aeg_device_kind kind)
{
	switch (kind) {
	case AEG_DEVICE_CUDA:
		return "cuda";
	case AEG_DEVICE_HOST:
		return "host";
	}
	return "unknown";
}

AEG_EXPORT void aeg_config_defaults(struct aeg_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->device = AEG_DEVICE_CUDA;
	cfg->allow_device_option = 0;
	cfg->slab_default = (struct aeg_size_spec){ .ppm = 900000, .is_percent = 1 };
	cfg->slab_max = (struct aeg_size_spec){ .ppm = 950000, .is_percent = 1 };
	cfg->pinned_default_bytes = 4ull << 30;
	cfg->pinned_max_bytes = 64ull << 30;
	cfg->pinned_buffer_bytes = 32ull << 20;
	cfg->prefetch_threads = 12;
	cfg->prefetch_chunk_bytes = 64ull << 20;
	snprintf(cfg->agent_path, sizeof(cfg->agent_path), "%s", SBINDIR "/aegaeond");
	cfg->agent_start_timeout_ms = 30000;
	cfg->agent_stop_timeout_ms = 5000;
	snprintf(cfg->runtime_dir, sizeof(cfg->runtime_dir), "%s", "/run/aegaeon");
	cfg->log_level = AEG_LOG_INFO;
	cfg->model_cache = (struct aeg_size_spec){ .bytes = 0 };
	cfg->max_loads = AEG_CONFIG_DEFAULT_MAX_LOADS;
	cfg->hello_timeout_ms = AEG_CONFIG_DEFAULT_HELLO_TIMEOUT_MS;
}

enum kind {
	K_DEVICE,
	K_BOOL,
	K_SLAB,		/* size or percentage */
	K_BYTES,	/* absolute size */
	K_INT,		/* an integer within the key's min..max */
	K_SECONDS,
	K_PATH,
	K_LOG_LEVEL,
};

enum key_id {
	DEVICE,
	ALLOW_DEVICE_OPTION,
	SLAB_DEFAULT,
	SLAB_MAX,
	PINNED_DEFAULT,
	PINNED_MAX,
	PINNED_BUFFER,
	PREFETCH_THREADS,
	PREFETCH_CHUNK,
	AGENT_PATH,
	AGENT_START_TIMEOUT,
	AGENT_STOP_TIMEOUT,
	RUNTIME_DIR,
	LOG_LEVEL,
	MODEL_CACHE,
	MAX_LOADS,
	HELLO_TIMEOUT,
	NKEYS
};

/* Only K_INT keys have bounds; the macros name the fields so none is left unset by accident. */
#define KEY(name_, kind_, field) \
	{ .name = name_, .kind = kind_, .off = offsetof(struct aeg_config, field), .min = 0, .max = 0 }
#define INT_KEY(name_, field, lo, hi) \
	{ .name = name_, .kind = K_INT, .off = offsetof(struct aeg_config, field), .min = lo, .max = hi }

static const struct key {
	const char *name;
	enum kind kind;
	size_t off;
	long long min, max;     /* K_INT */
} keys[NKEYS] = {
	[DEVICE] = KEY("device", K_DEVICE, device),
	[ALLOW_DEVICE_OPTION] = KEY("allow_device_option", K_BOOL, allow_device_option),
	[SLAB_DEFAULT] = KEY("slab_default", K_SLAB, slab_default),
	[SLAB_MAX] = KEY("slab_max", K_SLAB, slab_max),
	[PINNED_DEFAULT] = KEY("pinned_default", K_BYTES, pinned_default_bytes),
	[PINNED_MAX] = KEY("pinned_max", K_BYTES, pinned_max_bytes),
	[PINNED_BUFFER] = KEY("pinned_buffer", K_BYTES, pinned_buffer_bytes),
	[PREFETCH_THREADS] = INT_KEY("prefetch_threads", prefetch_threads, 1, MAX_PREFETCH_THREADS),
	[PREFETCH_CHUNK] = KEY("prefetch_chunk", K_BYTES, prefetch_chunk_bytes),
	[AGENT_PATH] = KEY("agent_path", K_PATH, agent_path),
	[AGENT_START_TIMEOUT] = KEY("agent_start_timeout", K_SECONDS, agent_start_timeout_ms),
	[AGENT_STOP_TIMEOUT] = KEY("agent_stop_timeout", K_SECONDS, agent_stop_timeout_ms),
	[RUNTIME_DIR] = KEY("runtime_dir", K_PATH, runtime_dir),
	[LOG_LEVEL] = KEY("log_level", K_LOG_LEVEL, log_level),
	[MODEL_CACHE] = KEY("model_cache", K_SLAB, model_cache),
	[MAX_LOADS] = INT_KEY("max_loads", max_loads, 1, MAX_LOADS_LIMIT),
	[HELLO_TIMEOUT] = KEY("hello_timeout", K_SECONDS, hello_timeout_ms),
};

/* One load: where messages point, and which keys the file set. */
struct load {
	const char *path;
	const char *dir;	/* where @include looks */
	const config_setting_t *seen[NKEYS];
};

/* libconfig names the main stream NULL and included files as written. */
static const char *file_name(const struct load *ld, const char *file, char *buf, size_t len)
{
	if (file == NULL)
		return ld->path;
	if (file[0] == '/')
		return file;
	snprintf(buf, len, "%s/%s", ld->dir, file);
	return buf;
}

/* "FILE:LINE: key 'NAME': WHY" for a setting of the file. */
__attribute__((format(printf, 3, 4)))
static int bad(const struct load *ld, const config_setting_t *s, const char *fmt, ...)
{
	char why[768], file[PATH_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return aeg_fail(AEG_ECONFIG, "%s:%u: key '%s': %s",
			file_name(ld, config_setting_source_file(s), file, sizeof(file)),
			(unsigned)config_setting_source_line(s), config_setting_name(s), why);
}

static const char *type_name(int type)
{
	switch (type) {
	case CONFIG_TYPE_GROUP:
		return "a group";
	case CONFIG_TYPE_INT:
	case CONFIG_TYPE_INT64:
		return "an integer";
	case CONFIG_TYPE_FLOAT:
		return "a float";
	case CONFIG_TYPE_STRING:
		return "a string";
	case CONFIG_TYPE_BOOL:
		return "a boolean";
	case CONFIG_TYPE_ARRAY:
		return "an array";
	case CONFIG_TYPE_LIST:
		return "a list";
	}
	return "of unknown type";
}

static int string_of(const struct load *ld, const config_setting_t *s, const char *example,
		     const char **str)
{
	if (config_setting_type(s) != CONFIG_TYPE_STRING)
		return bad(ld, s, "must be a string in double quotes (e.g. %s), not %s",
			   example, type_name(config_setting_type(s)));
	*str = config_setting_get_string(s);
	return 0;
}

static int set_size(const struct load *ld, const config_setting_t *s, int allow_percent,
		    struct aeg_size_spec *spec)
{
	const char *str = NULL;
	char q[72];
	int rc;

	rc = string_of(ld, s, allow_percent ? "\"90%\" or \"40GiB\"" : "\"64MiB\"", &str);
	if (rc < 0)
		return rc;
	rc = aeg_size_spec_parse(str, spec);
	if (rc < 0)
		return bad(ld, s, "%s", aeg_error_detail());
	if (spec->is_percent && !allow_percent)
		return bad(ld, s, "'%s' is a percentage; this key needs a size in bytes (e.g. \"64MiB\")",
			   aeg_quote(str, q, sizeof(q)));
	return 0;
}

static int set_seconds(const struct load *ld, const config_setting_t *s, int *ms)
{
	double sec;

	switch (config_setting_type(s)) {
	case CONFIG_TYPE_INT:
	case CONFIG_TYPE_INT64:
		sec = (double)config_setting_get_int64(s);
		break;
	case CONFIG_TYPE_FLOAT:
		sec = config_setting_get_float(s);
		break;
	default:
		return bad(ld, s, "must be a number of seconds (e.g. 30 or 2.5), not %s",
			   type_name(config_setting_type(s)));
	}
	/* Under a millisecond would round to no timeout at all. */
	if (!(sec >= 0.001 && sec <= MAX_TIMEOUT_S))
		return bad(ld, s, "%g seconds is out of range (0.001 to %g, one day)", sec, MAX_TIMEOUT_S);
	*ms = (int)llround(sec * 1000.0);
	return 0;
}

static int set_key(const struct load *ld, const config_setting_t *s, const struct key *k,
		   struct aeg_config *cfg)
{
	void *field = (char *)cfg + k->off;
	const char *str = NULL;
	char q[264];
	long long n;
	int rc;

	switch (k->kind) {
	case K_DEVICE:
		rc = string_of(ld, s, "\"cuda\"", &str);
		if (rc == 0 && aeg_device_kind_parse(str, field) < 0)
			rc = bad(ld, s, "'%s' is not one of \"cuda\", \"host\"", aeg_quote(str, q, sizeof(q)));
		return rc;
	case K_BOOL:
		if (config_setting_type(s) != CONFIG_TYPE_BOOL)
			return bad(ld, s, "must be true or false, not %s", type_name(config_setting_type(s)));
		*(int *)field = config_setting_get_bool(s);
		return 0;
	case K_SLAB:
		return set_size(ld, s, 1, field);
	case K_BYTES: {
		struct aeg_size_spec spec;

		rc = set_size(ld, s, 0, &spec);
		if (rc == 0)
			*(uint64_t *)field = spec.bytes;
		return rc;
	}
	case K_INT:
		if (config_setting_type(s) != CONFIG_TYPE_INT && config_setting_type(s) != CONFIG_TYPE_INT64)
			return bad(ld, s, "must be an integer, not %s", type_name(config_setting_type(s)));
		n = config_setting_get_int64(s);
		if (n < k->min || n > k->max)
			return bad(ld, s, "%lld is out of range (%lld to %lld)", n, k->min, k->max);
		*(int *)field = (int)n;
		return 0;
	case K_SECONDS:
		return set_seconds(ld, s, field);
	case K_PATH:
		rc = string_of(ld, s, "\"/run/aegaeon\"", &str);
		if (rc < 0)
			return rc;
		if (str[0] != '/')
			return bad(ld, s, "'%s' is not an absolute path", aeg_quote(str, q, sizeof(q)));
		if (strlen(str) >= PATH_MAX)
			return bad(ld, s, "path is longer than %d bytes", PATH_MAX - 1);
		memcpy(field, str, strlen(str) + 1);
		/* "/run/aegaeon/" is "/run/aegaeon": paths made from it, and compared, have one form. */
		for (size_t len = strlen(field); len > 1 && ((char *)field)[len - 1] == '/'; len--)
			((char *)field)[len - 1] = '\0';
		return 0;
	case K_LOG_LEVEL:
		rc = string_of(ld, s, "\"info\"", &str);
		if (rc == 0 && aeg_log_parse_level(str, field) < 0)
			rc = bad(ld, s, "'%s' is not one of \"debug\", \"info\", \"warn\", \"error\"",
				 aeg_quote(str, q, sizeof(q)));
		return rc;
	}
	return bad(ld, s, "internal error: no parser for this key");
}

static unsigned edit_distance(const char *a, const char *b)
{
	unsigned row[64], prev, tmp;
	size_t la = strlen(a), lb = strlen(b);

	if (la >= AEG_ARRAY_SIZE(row) || lb >= AEG_ARRAY_SIZE(row))
		return 64;
	for (size_t j = 0; j <= lb; j++)
		row[j] = (unsigned)j;
	for (size_t i = 1; i <= la; i++) {
		prev = row[0];
		row[0] = (unsigned)i;
		for (size_t j = 1; j <= lb; j++) {
			unsigned best = prev + (a[i - 1] != b[j - 1]);

			if (row[j] + 1 < best)
				best = row[j] + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			tmp = row[j];
			row[j] = best;
			prev = tmp;
		}
	}
	return row[lb];
}

static int unknown_key(const struct load *ld, const config_setting_t *s)
{
	const char *name = config_setting_name(s);
	const char *near = NULL;
	unsigned best = 3;

	if (config_setting_type(s) == CONFIG_TYPE_GROUP)
		return bad(ld, s, "unknown group (aegaeon.conf has no groups; all keys are top-level, see aegaeon.conf(5))");
	for (size_t i = 0; i < NKEYS; i++) {
		unsigned d = edit_distance(name, keys[i].name);

		if (d < best) {
			best = d;
			near = keys[i].name;
		}
	}
	if (near != NULL)
		return bad(ld, s, "unknown key (did you mean '%s'?)", near);
	return bad(ld, s, "unknown key (see aegaeon.conf(5) for the keys)");
}

static void describe(const struct aeg_size_spec *spec, char *buf, size_t len)
{
	if (spec->is_percent) {
		unsigned frac = spec->ppm % 10000, digits = 4;

		while (frac != 0 && frac % 10 == 0) {
			frac /= 10;
			digits--;
		}
		if (frac == 0)
			snprintf(buf, len, "%u%%", spec->ppm / 10000);
		else
			snprintf(buf, len, "%u.%0*u%%", spec->ppm / 10000, (int)digits, frac);
	} else {
		aeg_size_format(spec->bytes, buf, len);
	}
}

/*
 * A limit between two keys: the message goes to the one the file set (the
 * later one if both), and says when the other is the default.
 */
static int over(const struct load *ld, enum key_id small, const struct aeg_size_spec *a,
		enum key_id big, const struct aeg_size_spec *b)
{
	const config_setting_t *sa = ld->seen[small], *sb = ld->seen[big];
	char va[32], vb[32];

	describe(a, va, sizeof(va));
	describe(b, vb, sizeof(vb));
	if (sa != NULL && (sb == NULL || config_setting_source_line(sa) >= config_setting_source_line(sb)))
		return bad(ld, sa, "%s is more than %s (%s%s)", va, keys[big].name, vb,
			   sb == NULL ? ", the default" : "");
	return bad(ld, sb, "%s is less than %s (%s%s)", vb, keys[small].name, va,
		   sa == NULL ? ", the default" : "");
}

static int check_bytes(const struct load *ld, enum key_id id, uint64_t v, int may_be_zero, int page)
{
	const config_setting_t *s = ld->seen[id];

	/* Defaults are valid, so only a value from the file can fail here. */
	if (s == NULL)
		return 0;
	if (v == 0 && !may_be_zero)
		return bad(ld, s, "must be more than 0");
	if (page && v % PAGE_BYTES != 0)
		return bad(ld, s, "%llu bytes is not a multiple of 4 KiB (the page size)", (unsigned long long)v);
	return 0;
}

static int check_limits(const struct load *ld, const struct aeg_config *c)
{
	struct aeg_size_spec pd = { .bytes = c->pinned_default_bytes };
	struct aeg_size_spec pm = { .bytes = c->pinned_max_bytes };
	struct aeg_size_spec pb = { .bytes = c->pinned_buffer_bytes };
	int rc;

	if (ld->seen[RUNTIME_DIR] != NULL && strcmp(c->runtime_dir, "/") == 0)
		return bad(ld, ld->seen[RUNTIME_DIR], "must be a directory below / (the default is \"/run/aegaeon\")");

	if (ld->seen[SLAB_MAX] != NULL && c->slab_max.bytes == 0 && c->slab_max.ppm == 0)
		return bad(ld, ld->seen[SLAB_MAX], "must be more than 0");
	if (c->slab_default.is_percent == c->slab_max.is_percent &&
	    (c->slab_default.is_percent ? c->slab_default.ppm > c->slab_max.ppm
					: c->slab_default.bytes > c->slab_max.bytes))
		return over(ld, SLAB_DEFAULT, &c->slab_default, SLAB_MAX, &c->slab_max);

	/* Buffers are registered with the GPU and mapped: page-sized pieces. */
	rc = check_bytes(ld, PINNED_BUFFER, c->pinned_buffer_bytes, 0, 1);
	if (rc == 0)
		rc = check_bytes(ld, PINNED_MAX, c->pinned_max_bytes, 0, 0);
	/* mmap'ed file pieces are host-registered per chunk, so chunks start on pages. */
	if (rc == 0)
		rc = check_bytes(ld, PREFETCH_CHUNK, c->prefetch_chunk_bytes, 0, 1);
	if (rc < 0)
		return rc;
	if (c->pinned_buffer_bytes > c->pinned_max_bytes)
		return over(ld, PINNED_BUFFER, &pb, PINNED_MAX, &pm);
	if (c->pinned_default_bytes > c->pinned_max_bytes)
		return over(ld, PINNED_DEFAULT, &pd, PINNED_MAX, &pm);
	/* The default pool is made of the site's buffers: at least one must fit. */
	if (c->pinned_default_bytes != 0 && c->pinned_default_bytes < c->pinned_buffer_bytes)
		return over(ld, PINNED_BUFFER, &pb, PINNED_DEFAULT, &pd);
	return 0;
}

static int read_settings(struct load *ld, const config_t *lc, struct aeg_config *cfg)
{
	const config_setting_t *root = config_root_setting(lc);
	int n = config_setting_length(root);

	for (int i = 0; i < n; i++) {
		const config_setting_t *s = config_setting_get_elem(root, (unsigned)i);
		const char *name = config_setting_name(s);
		size_t k;
		int rc;

		for (k = 0; k < NKEYS; k++)
			if (strcmp(name, keys[k].name) == 0)
				break;
		if (k == NKEYS)
			return unknown_key(ld, s);
		rc = set_key(ld, s, &keys[k], cfg);
		if (rc < 0)
			return rc;
		ld->seen[k] = s;
	}
	return check_limits(ld, cfg);
}

static int parse_file(const char *path, FILE *fp, struct aeg_config *cfg)
{
	struct load ld = { .path = path };
	char *dir, *slash, file[PATH_MAX];
	config_t lc;
	int rc;

	/* @include "x" is relative to this file's directory, not to the daemon's cwd. */
	dir = strdup(path);
	if (dir == NULL)
		return aeg_fail(AEG_ENOMEM, "reading %s: out of memory", path);
	slash = strrchr(dir, '/');
	if (slash == NULL)
		strcpy(dir, ".");
	else if (slash == dir)
		dir[1] = '\0';
	else
		*slash = '\0';
	ld.dir = dir;
	config_init(&lc);
	config_set_include_dir(&lc, dir);
	if (config_read(&lc, fp) != CONFIG_TRUE) {
		rc = aeg_fail(AEG_ECONFIG, "%s:%d: %s",
			      file_name(&ld, config_error_file(&lc), file, sizeof(file)),
			      config_error_line(&lc), config_error_text(&lc));
		goto out;
	}
	rc = read_settings(&ld, &lc, cfg);
out:
	config_destroy(&lc);
	free(dir);
	return rc;
}

/* /dev/null reads as an empty file: "no configuration" (tests use it). */
static int is_dev_null(const struct stat *st)
{
	return S_ISCHR(st->st_mode) && major(st->st_rdev) == 1 && minor(st->st_rdev) == 3;
}

/*
 * Open the file to parse: 1 and *@fp, 0 when the default file is missing
 * (defaults stand), or an error. Only a regular file of at most
 * MAX_CONFIG_BYTES (or /dev/null): a FIFO or a terminal would block the
 * reader for ever, a device could feed it without end. Opened without
 * blocking, so a FIFO is found before anything waits on it.
 */
static int open_config(const char *path, const char *named_by, int is_default, FILE **fp)
{
	struct stat st;
	int fd, err;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		err = errno;
		if (err == ENOENT && is_default) {
			aeg_debug("no %s, using the built-in defaults", path);
			return 0;
		}
		return aeg_fail(err == ENOENT ? AEG_ENOENT : err == EACCES ? AEG_EACCES : AEG_EIO,
				"configuration file %s%s: %s", path, named_by, strerror(err));
	}
	if (fstat(fd, &st) < 0)
		err = aeg_fail(AEG_EIO, "configuration file %s%s: %s", path, named_by, strerror(errno));
	else if (S_ISDIR(st.st_mode))
		err = aeg_fail(AEG_ECONFIG, "configuration file %s%s is a directory", path, named_by);
	else if (!S_ISREG(st.st_mode) && !is_dev_null(&st))
		err = aeg_fail(AEG_ECONFIG, "configuration file %s%s is not a regular file (a %s)", path, named_by,
			       S_ISFIFO(st.st_mode) ? "FIFO" : S_ISSOCK(st.st_mode) ? "socket" :
			       S_ISCHR(st.st_mode) ? "character device" : "block device");
	else if (st.st_size > MAX_CONFIG_BYTES)
		err = aeg_fail(AEG_ECONFIG, "configuration file %s%s is %lld bytes; at most %d", path, named_by,
			       (long long)st.st_size, MAX_CONFIG_BYTES);
	else if ((*fp = fdopen(fd, "r")) == NULL)
		err = aeg_fail(AEG_ENOMEM, "configuration file %s%s: %s", path, named_by, strerror(errno));
	else
		return 1;
	close(fd);
	return err;
}

AEG_EXPORT int aeg_config_load(struct aeg_config *cfg, const char *path)
{
	struct aeg_config tmp;
	const char *named_by = "";
	int is_default = 0;
	FILE *fp;
	int rc;

	if (cfg == NULL)
		return aeg_fail(AEG_EINVAL, "configuration missing");
	if (path == NULL) {
		path = getenv("AEGAEON_CONFIG");
		named_by = " (named by $AEGAEON_CONFIG)";
		if (path == NULL || path[0] == '\0') {
			path = AEG_CONFIG_DEFAULT_PATH;
			named_by = "";
			is_default = 1;
		}
	}
	if (path[0] == '\0')
		return aeg_fail(AEG_EINVAL, "configuration file name is empty");

	aeg_config_defaults(&tmp);
	rc = open_config(path, named_by, is_default, &fp);
	if (rc <= 0) {
		if (rc == 0)
			*cfg = tmp;
		return rc;
	}
	rc = parse_file(path, fp, &tmp);
	if (rc == 0) {
		*cfg = tmp;
		aeg_debug("configuration read from %s", path);
	}
	fclose(fp);
	return rc;
}

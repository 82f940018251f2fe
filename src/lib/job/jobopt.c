/* Job options (--aegaeon-*): parsed and checked against site limits the same way in srun, slurmd and the agent. */
#include "config.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "jobopt.h"
#include "model_paths.h"

#define PAGE_BYTES 4096u
#define PPM_ONE 1000000u

static void format_ppm(uint32_t ppm, char *buf, size_t len)
{
	unsigned frac = ppm % 10000;
	int digits = 4;

	if (frac == 0) {
		snprintf(buf, len, "%u%%", ppm / 10000);
		return;
	}
	while (frac % 10 == 0) {
		frac /= 10;
		digits--;
	}
	snprintf(buf, len, "%u.%0*u%%", ppm / 10000, digits, frac);
}

/* "80 GiB" or "95%" for messages. */
static void format_spec(const struct aeg_size_spec *s, char *buf, size_t len)
{
	if (s->is_percent)
		format_ppm(s->ppm, buf, len);
	else
		aeg_size_format(s->bytes, buf, len);
}

/* "500GiB": a size as the user would write it after '='. */
static char *format_opt(uint64_t bytes, char *buf, size_t len)
{
	char *sp;

	aeg_size_format(bytes, buf, len);
	sp = strchr(buf, ' ');
	if (sp != NULL)
		memmove(sp, sp + 1, strlen(sp + 1) + 1);
	return buf;
}

int aeg_jobopt_parse_slab(const char *text, struct aeg_size_spec *slab)
{
	struct aeg_size_spec s;
	char q[128];
	int rc;

	if (text == NULL || slab == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-slab: value missing");
	aeg_quote(text, q, sizeof(q));
	rc = aeg_size_spec_parse(text, &s);
	if (rc < 0) {
		aeg_error_prefix("--aegaeon-slab=%s", q);
		return rc;
	}
	if (s.is_percent ? s.ppm == 0 : s.bytes == 0)
		return aeg_fail(AEG_EINVAL, "--aegaeon-slab=%s: the slab must be more than 0 "
				"(leave the option out for no aegaeon)", q);
	*slab = s;
	return 0;
}

static int parse_bytes(const char *opt, const char *what, const char *text, uint64_t *bytes)
{
	struct aeg_size_spec s;
	char q[128];
	int rc;

	rc = aeg_size_spec_parse(text, &s);
	if (rc < 0) {
		aeg_error_prefix("%s: %s", opt, what);
		return rc;
	}
	if (s.is_percent)
		return aeg_fail(AEG_EINVAL, "%s: %s '%s' cannot be a percentage (give bytes, e.g. 16GiB)",
				opt, what, aeg_quote(text, q, sizeof(q)));
	*bytes = s.bytes;
	return 0;
}

int aeg_jobopt_parse_pinned(const char *text, struct aeg_jobopt_pinned *pinned)
{
	struct aeg_jobopt_pinned p = { 0, 0 };
	char q[128], opt[160], size[64], buf[32];
	const char *colon;
	int rc;

	if (text == NULL || pinned == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-pinned: value missing");
	snprintf(opt, sizeof(opt), "--aegaeon-pinned=%s", aeg_quote(text, q, sizeof(q)));
	colon = strchr(text, ':');
	if (colon == NULL) {
		rc = parse_bytes(opt, "pool size", text, &p.bytes);
		if (rc < 0)
			return rc;
		*pinned = p;
		return 0;
	}
	if ((size_t)(colon - text) >= sizeof(size))
		return aeg_fail(AEG_EINVAL, "%s: pool size too long", opt);
	memcpy(size, text, (size_t)(colon - text));
	size[colon - text] = '\0';
	rc = parse_bytes(opt, "pool size", size, &p.bytes);
	if (rc == 0)
		rc = parse_bytes(opt, "buffer size", colon + 1, &p.buffer_bytes);
	if (rc < 0)
		return rc;
	if (p.bytes == 0)
		return aeg_fail(AEG_EINVAL, "%s: a pool of 0 bytes (no pool) takes no buffer size", opt);
	if (p.buffer_bytes == 0 || p.buffer_bytes % PAGE_BYTES != 0)
		return aeg_fail(AEG_EINVAL, "%s: buffer size must be a non-zero multiple of 4 KiB", opt);
	if (p.buffer_bytes > p.bytes)
		return aeg_fail(AEG_EINVAL, "%s: buffer size %s is larger than the pool",
				opt, aeg_size_format(p.buffer_bytes, buf, sizeof(buf)));
	*pinned = p;
	return 0;
}

static int has_control(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
			return 1;
	return 0;
}

int aeg_jobopt_parse_prefetch(const char *text, const char *cwd, char **paths, size_t *count)
{
	char q[128], *out = NULL;
	size_t n = 0, used = 0, cap, cwd_len;
	const char *p, *end;
	int rc;

	if (paths == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: no place for the result");
	*paths = NULL;
	if (text == NULL || *text == '\0')
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: no file named (give PATH[,PATH...])");
	aeg_quote(text, q, sizeof(q));
	cwd_len = cwd != NULL ? strlen(cwd) : 0;
	if (cwd != NULL && cwd[0] != '/')
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: working directory '%.64s' is not absolute", cwd);

	/* Each element grows by at most cwd and a slash. */
	cap = strlen(text) + 1;
	for (p = text; *p != '\0'; p++)
		if (*p == ',')
			cap += cwd_len + 1;
	cap += cwd_len + 1;
	out = malloc(cap);
	if (out == NULL)
		return aeg_fail(AEG_ENOMEM, "--aegaeon-prefetch: out of memory");

	for (p = text;; p = end + 1) {
		size_t len, full;

		end = strchr(p, ',');
		if (end == NULL)
			end = p + strlen(p);
		len = (size_t)(end - p);
		if (len == 0) {
			rc = aeg_fail(AEG_EINVAL, "--aegaeon-prefetch=%s: empty file name in the list", q);
			goto out;
		}
		if (has_control(p, len)) {
			rc = aeg_fail(AEG_EINVAL, "--aegaeon-prefetch=%s: control character in a file name", q);
			goto out;
		}
		if (++n > AEG_JOBOPT_PREFETCH_MAX) {
			rc = aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: more than %d files", AEG_JOBOPT_PREFETCH_MAX);
			goto out;
		}
		if (*p != '/' && cwd == NULL) {
			rc = aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: '%.*s' is not an absolute path",
				      (int)(len < 100 ? len : 100), p);
			goto out;
		}
		full = len + (*p == '/' ? 0 : cwd_len + 1);
		if (full >= PATH_MAX) {
			rc = aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: a path is longer than %d bytes", PATH_MAX - 1);
			goto out;
		}
		if (used > 0)
			out[used++] = ',';
		if (*p != '/') {
			memcpy(out + used, cwd, cwd_len);
			used += cwd_len;
			if (cwd_len == 0 || cwd[cwd_len - 1] != '/')
				out[used++] = '/';
		}
		memcpy(out + used, p, len);
		used += len;
		if (used > AEG_JOBOPT_PREFETCH_MAX_BYTES) {
			rc = aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: the list is longer than %d bytes with its paths "
				      "made absolute; name a model's directory instead of its files, or load the rest "
				      "from the job with aegaeon-cli prefetch", AEG_JOBOPT_PREFETCH_MAX_BYTES);
			goto out;
		}
		if (*end == '\0')
			break;
	}
	out[used] = '\0';
	if (count != NULL)
		*count = n;
	*paths = out;
	out = NULL;
	rc = 0;
out:
	free(out);
	return rc;
}

/* One file of a model: a regular file the caller can read. */
static int check_readable(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0) {
		int err = errno;

		return aeg_fail(err == ENOENT || err == ENOTDIR ? AEG_ENOENT : err == EACCES ? AEG_EACCES : -err,
				"--aegaeon-prefetch: %s: %s", path, strerror(err));
	}
	if (!S_ISREG(st.st_mode))
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: %s is not a regular file", path);
	if (access(path, R_OK) < 0) {
		int err = errno;

		return aeg_fail(err == EACCES ? AEG_EACCES : -err, "--aegaeon-prefetch: %s: %s", path, strerror(err));
	}
	return 0;
}

/* A model: a file, or a directory or shard index and every file it names. */
static int check_model(const char *path)
{
	struct aeg_model_paths mp;
	int err = aeg_model_paths(path, &mp);

	if (err) {
		aeg_error_prefix("--aegaeon-prefetch");
		return err;
	}
	for (uint32_t i = 0; i < mp.count && err == 0; i++)
		err = check_readable(mp.paths[i]);
	aeg_model_paths_free(&mp);
	return err;
}

int aeg_jobopt_check_files(const char *paths)
{
	char path[PATH_MAX];
	const char *p, *end;

	if (paths == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: no file named");
	for (p = paths;; p = end + 1) {
		size_t len;
		int err;

		end = strchr(p, ',');
		if (end == NULL)
			end = p + strlen(p);
		len = (size_t)(end - p);
		if (len == 0 || len >= sizeof(path))
			return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: bad file list");
		memcpy(path, p, len);
		path[len] = '\0';
		err = check_model(path);
		if (err)
			return err;
		if (*end == '\0')
			return 0;
	}
}

int aeg_jobopt_parse_device(const char *text, enum aeg_device_kind *kind)
{
	char q[64];

	if (text == NULL || kind == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-device: value missing");
	if (aeg_device_kind_parse(text, kind) < 0)
		return aeg_fail(AEG_EINVAL, "--aegaeon-device=%s: not one of cuda, host",
				aeg_quote(text, q, sizeof(q)));
	return 0;
}

int aeg_jobopt_check_slab(const struct aeg_size_spec *slab, const struct aeg_config *cfg)
{
	char asked[32], cap[32];

	if (slab == NULL || cfg == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-slab: value missing");
	if (slab->is_percent != cfg->slab_max.is_percent)
		return 0;
	if (slab->is_percent ? slab->ppm <= cfg->slab_max.ppm : slab->bytes <= cfg->slab_max.bytes)
		return 0;
	if (slab->is_percent)
		format_ppm(slab->ppm, asked, sizeof(asked));
	else
		format_opt(slab->bytes, asked, sizeof(asked));
	format_spec(&cfg->slab_max, cap, sizeof(cap));
	return aeg_fail(AEG_ERANGE, "--aegaeon-slab=%s is over this site's limit of %s %s",
			asked, cap, slab->is_percent ? "of each GPU's memory" : "per GPU");
}

int aeg_jobopt_check_pinned(const struct aeg_jobopt_pinned *pinned, const struct aeg_config *cfg)
{
	char asked[32], cap[32];
	uint64_t buffer;

	if (pinned == NULL || cfg == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-pinned: value missing");
	if (pinned->bytes > cfg->pinned_max_bytes)
		return aeg_fail(AEG_ERANGE, "--aegaeon-pinned=%s is over this site's limit of %s per node",
				format_opt(pinned->bytes, asked, sizeof(asked)),
				aeg_size_format(cfg->pinned_max_bytes, cap, sizeof(cap)));
	buffer = pinned->buffer_bytes != 0 ? pinned->buffer_bytes : cfg->pinned_buffer_bytes;
	if (pinned->bytes != 0 && buffer > pinned->bytes)
		return aeg_fail(AEG_EINVAL, "--aegaeon-pinned=%s is smaller than one pool buffer of %s "
				"(give a larger pool, or SIZE:BUFFER)",
				format_opt(pinned->bytes, asked, sizeof(asked)),
				aeg_size_format(buffer, cap, sizeof(cap)));
	return 0;
}

int aeg_jobopt_check_device(enum aeg_device_kind kind, const struct aeg_config *cfg)
{
	if (cfg == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-device: no site configuration");
	if (!cfg->allow_device_option)
		return aeg_fail(AEG_EPERM, "--aegaeon-device=%s is not allowed on this site "
				"(allow_device_option is off; the site uses %s)",
				aeg_device_kind_name(kind), aeg_device_kind_name(cfg->device));
	return 0;
}

int aeg_jobopt_check_prefetch_slab(int prefetch, int has_slab, const struct aeg_config *cfg)
{
	const struct aeg_size_spec *d;

	if (cfg == NULL)
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch: no site configuration");
	d = &cfg->slab_default;
	if (prefetch && !has_slab && (d->is_percent ? d->ppm == 0 : d->bytes == 0))
		return aeg_fail(AEG_EINVAL, "--aegaeon-prefetch loads into the job's slab, but this site reserves "
				"none unless the job asks (slab_default is 0): add --aegaeon-slab=SIZE");
	return 0;
}

char *aeg_jobopt_format_slab(const struct aeg_size_spec *slab, char *buf, size_t len)
{
	if (buf == NULL || len == 0)
		return buf;
	if (slab->is_percent)
		format_ppm(slab->ppm, buf, len);
	else
		snprintf(buf, len, "%llu", (unsigned long long)slab->bytes);
	return buf;
}

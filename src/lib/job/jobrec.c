/* The job directory's ready and error records: strict format, atomic writes, bounded reads. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/jobrec.h>

#include "internal.h"
#include "jobdir.h"

#define PID_MAX_LIMIT 4194304   /* the kernel's ceiling for pid_max */


/* Digits only, no sign, no blanks, fits in 64 bits. */
static int parse_u64(const char *s, uint64_t *v)
{
	uint64_t n = 0;

	if (*s == '\0')
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		if (n > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
			return -1;
		n = n * 10 + (uint64_t)(*s - '0');
	}
	*v = n;
	return 0;
}

AEG_EXPORT int aeg_job_gpus_parse(const char *text, int gpus[AEG_JOB_MAX_GPUS], int *count)
{
	const char *p = text;
	int n = 0;

	if (text == NULL || gpus == NULL || count == NULL)
		return aeg_fail(AEG_EINVAL, "GPU list missing");
	if (*text == '\0' || strcmp(text, "none") == 0) {
		*count = 0;
		return 0;
	}
	for (;;) {
		uint64_t v = 0;
		const char *start = p;

		while (*p >= '0' && *p <= '9') {
			v = v * 10 + (uint64_t)(*p - '0');
			if (v > AEG_JOB_MAX_GPU_ORDINAL)
				return aeg_fail(AEG_EINVAL, "GPU list '%s': ordinal over %d",
						text, AEG_JOB_MAX_GPU_ORDINAL);
			p++;
		}
		if (p == start || (*p != ',' && *p != '\0'))
			return aeg_fail(AEG_EINVAL, "GPU list '%s': expected comma-separated ordinals such as \"0,1\" or \"none\"",
					text);
		for (int i = 0; i < n; i++)
			if (gpus[i] == (int)v)
				return aeg_fail(AEG_EINVAL, "GPU list '%s': GPU %d listed twice", text, (int)v);
		if (n == AEG_JOB_MAX_GPUS)
			return aeg_fail(AEG_EINVAL, "GPU list '%s': more than %d GPUs", text, AEG_JOB_MAX_GPUS);
		gpus[n++] = (int)v;
		if (*p == '\0')
			break;
		p++;
	}
	*count = n;
	return 0;
}

AEG_EXPORT int aeg_job_gpus_format(const int *gpus, int count, char *buf, size_t len)
{
	size_t used = 0;

	if (buf == NULL || len == 0 || count < 0 || count > AEG_JOB_MAX_GPUS)
		return aeg_fail(AEG_EINVAL, "GPU list: bad arguments");
	if (count == 0) {
		if (len < sizeof("none"))
			return aeg_fail(AEG_ERANGE, "GPU list: buffer of %zu bytes too small", len);
		strcpy(buf, "none");
		return 0;
	}
	buf[0] = '\0';
	for (int i = 0; i < count; i++) {
		int w = snprintf(buf + used, len - used, "%s%d", i ? "," : "", gpus[i]);
		if (w < 0 || (size_t)w >= len - used)
			return aeg_fail(AEG_ERANGE, "GPU list: buffer of %zu bytes too small", len);
		used += (size_t)w;
	}
	return 0;
}

/* The checks both format and parse apply, so the two cannot disagree. */
static int record_check(const struct aeg_job_record *rec)
{
	size_t slen;

	if (rec->version != AEG_JOB_RECORD_VERSION)
		return aeg_fail(AEG_EINVAL, "version %d is not %d", rec->version, AEG_JOB_RECORD_VERSION);
	if (rec->pid <= 0 || rec->pid > PID_MAX_LIMIT)
		return aeg_fail(AEG_EINVAL, "pid %ld out of range 1..%d", rec->pid, PID_MAX_LIMIT);
	slen = strnlen(rec->socket, sizeof(rec->socket));
	if (slen == 0 || slen == sizeof(rec->socket))
		return aeg_fail(AEG_EINVAL, "socket path empty or longer than %d bytes", AEG_JOB_SOCKET_MAX - 1);
	if (rec->socket[0] != '/')
		return aeg_fail(AEG_EINVAL, "socket path '%s' is not absolute", rec->socket);
	for (size_t i = 0; i < slen; i++)
		if ((unsigned char)rec->socket[i] < 0x20 || rec->socket[i] == 0x7f)
			return aeg_fail(AEG_EINVAL, "socket path has a control character");
	if (rec->device != AEG_DEVICE_CUDA && rec->device != AEG_DEVICE_HOST)
		return aeg_fail(AEG_EINVAL, "device kind %d unknown", (int)rec->device);
	if (rec->gpu_count < 0 || rec->gpu_count > AEG_JOB_MAX_GPUS)
		return aeg_fail(AEG_EINVAL, "%d GPUs, at most %d", rec->gpu_count, AEG_JOB_MAX_GPUS);
	for (int i = 0; i < rec->gpu_count; i++) {
		if (rec->gpus[i] < 0 || rec->gpus[i] > AEG_JOB_MAX_GPU_ORDINAL)
			return aeg_fail(AEG_EINVAL, "GPU ordinal %d out of range 0..%d",
					rec->gpus[i], AEG_JOB_MAX_GPU_ORDINAL);
		for (int j = 0; j < i; j++)
			if (rec->gpus[j] == rec->gpus[i])
				return aeg_fail(AEG_EINVAL, "GPU %d listed twice", rec->gpus[i]);
		if (rec->slabs[i].gpu != rec->gpus[i])
			return aeg_fail(AEG_EINVAL, "slab%d_gpu=%d but GPU %d of the list is %d",
					i, rec->slabs[i].gpu, i, rec->gpus[i]);
		if (rec->slabs[i].bytes == 0)
			return aeg_fail(AEG_EINVAL, "slab%d_bytes is 0", i);
	}
	if ((rec->pinned_bytes == 0) != (rec->pinned_buffer == 0))
		return aeg_fail(AEG_EINVAL, "pinned_bytes=%" PRIu64 " and pinned_buffer=%" PRIu64
				": both or neither must be 0", rec->pinned_bytes, rec->pinned_buffer);
	if (rec->pinned_buffer && rec->pinned_bytes % rec->pinned_buffer)
		return aeg_fail(AEG_EINVAL, "pinned_bytes=%" PRIu64 " is not a whole number of %" PRIu64
				"-byte buffers", rec->pinned_bytes, rec->pinned_buffer);
	return 0;
}

struct out {
	char *buf;
	size_t len, used;
	int full;
};

static void __attribute__((format(printf, 2, 3))) put(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int w;

	if (o->full)
		return;
	va_start(ap, fmt);
	w = vsnprintf(o->buf + o->used, o->len - o->used, fmt, ap);
	va_end(ap);
	if (w < 0 || (size_t)w >= o->len - o->used)
		o->full = 1;
	else
		o->used += (size_t)w;
}

AEG_EXPORT int aeg_job_record_format(const struct aeg_job_record *rec, char *buf, size_t len,
				     size_t *out_len)
{
	char list[AEG_JOB_MAX_GPUS * 6], hex[AEG_HANDLE_HEX_LEN + 1];
	struct out o = { buf, len, 0, 0 };
	int err;

	if (rec == NULL || buf == NULL || len == 0)
		return aeg_fail(AEG_EINVAL, "job record: missing argument");
	err = record_check(rec);
	if (err)
		return err;
	err = aeg_job_gpus_format(rec->gpus, rec->gpu_count, list, sizeof(list));
	if (err)
		return err;
	put(&o, "version=%d\npid=%ld\nsocket=%s\ndevice=%s\ngpus=%s\nslabs=%d\n",
	    rec->version, rec->pid, rec->socket, aeg_device_kind_name(rec->device), list,
	    rec->gpu_count);
	for (int i = 0; i < rec->gpu_count; i++) {
		aeg_handle_to_hex(&rec->slabs[i].handle, hex);
		put(&o, "slab%d_gpu=%d\nslab%d_bytes=%" PRIu64 "\nslab%d_handle=%s\n",
		    i, rec->slabs[i].gpu, i, rec->slabs[i].bytes, i, hex);
	}
	put(&o, "pinned_bytes=%" PRIu64 "\npinned_buffer=%" PRIu64 "\n",
	    rec->pinned_bytes, rec->pinned_buffer);
	if (o.full)
		return aeg_fail(AEG_ERANGE, "job record: buffer of %zu bytes too small", len);
	if (out_len)
		*out_len = o.used;
	return 0;
}

/* Keys seen so far, so each is required once and only once. */
enum { K_VERSION, K_PID, K_SOCKET, K_DEVICE, K_GPUS, K_SLABS, K_PINNED_BYTES, K_PINNED_BUFFER, K_COUNT };
static const char *const keys[K_COUNT] = {
	"version", "pid", "socket", "device", "gpus", "slabs", "pinned_bytes", "pinned_buffer",
};
enum { S_GPU, S_BYTES, S_HANDLE, S_COUNT };
static const char *const slab_keys[S_COUNT] = { "gpu", "bytes", "handle" };

/* "slab<i>_<what>" with i a plain decimal below AEG_JOB_MAX_GPUS. */
static int slab_key(const char *key, int *index, int *what)
{
	uint64_t i = 0;
	const char *p = key + 4;

	if (strncmp(key, "slab", 4) != 0 || *p < '0' || *p > '9' || (*p == '0' && p[1] != '_'))
		return -1;
	for (; *p >= '0' && *p <= '9'; p++) {
		i = i * 10 + (uint64_t)(*p - '0');
		if (i >= AEG_JOB_MAX_GPUS)
			return -1;
	}
	if (*p++ != '_')
		return -1;
	for (int w = 0; w < S_COUNT; w++) {
		if (strcmp(p, slab_keys[w]) == 0) {
			*index = (int)i;
			*what = w;
			return 0;
		}
	}
	return -1;
}

#define bad(line, ...) aeg_fail(AEG_EPROTO, "job record line " line, __VA_ARGS__)

static int parse_line(struct aeg_job_record *rec, int lineno, char *key, char *val,
		      unsigned char seen[K_COUNT], unsigned char slab_seen[AEG_JOB_MAX_GPUS][S_COUNT],
		      int *slabs)
{
	uint64_t v;
	int index, what;

	for (int k = 0; k < K_COUNT; k++) {
		if (strcmp(key, keys[k]) != 0)
			continue;
		if (seen[k])
			return bad("%d: key '%s' given twice", lineno, key);
		seen[k] = 1;
		switch (k) {
		case K_VERSION:
			if (parse_u64(val, &v) || v != AEG_JOB_RECORD_VERSION)
				return bad("%d: version '%s' not supported (this library reads %d)",
					   lineno, val, AEG_JOB_RECORD_VERSION);
			rec->version = (int)v;
			return 0;
		case K_PID:
			if (parse_u64(val, &v) || v == 0 || v > PID_MAX_LIMIT)
				return bad("%d: pid '%s' is not a number in 1..%d", lineno, val, PID_MAX_LIMIT);
			rec->pid = (long)v;
			return 0;
		case K_SOCKET:
			if (val[0] != '/' || strlen(val) >= sizeof(rec->socket))
				return bad("%d: socket '%s' is not an absolute path shorter than %d bytes",
					   lineno, val, AEG_JOB_SOCKET_MAX);
			strcpy(rec->socket, val);
			return 0;
		case K_DEVICE:
			if (aeg_device_kind_parse(val, &rec->device) ||
			    strcmp(val, aeg_device_kind_name(rec->device)) != 0)
				return bad("%d: device '%s' is not cuda or host", lineno, val);
			return 0;
		case K_GPUS:
			if (aeg_job_gpus_parse(val, rec->gpus, &rec->gpu_count)) {
				aeg_error_prefix("job record line %d", lineno);
				return AEG_EPROTO;
			}
			return 0;
		case K_SLABS:
			if (parse_u64(val, &v) || v > AEG_JOB_MAX_GPUS)
				return bad("%d: slabs '%s' is not a number in 0..%d", lineno, val, AEG_JOB_MAX_GPUS);
			*slabs = (int)v;
			return 0;
		case K_PINNED_BYTES:
		case K_PINNED_BUFFER:
			if (parse_u64(val, &v))
				return bad("%d: %s '%s' is not a byte count", lineno, key, val);
			if (k == K_PINNED_BYTES)
				rec->pinned_bytes = v;
			else
				rec->pinned_buffer = v;
			return 0;
		}
	}
	if (slab_key(key, &index, &what))
		return bad("%d: unknown key '%s'", lineno, key);
	if (slab_seen[index][what])
		return bad("%d: key '%s' given twice", lineno, key);
	slab_seen[index][what] = 1;
	switch (what) {
	case S_GPU:
		if (parse_u64(val, &v) || v > AEG_JOB_MAX_GPU_ORDINAL)
			return bad("%d: %s '%s' is not a GPU ordinal in 0..%d", lineno, key, val,
				   AEG_JOB_MAX_GPU_ORDINAL);
		rec->slabs[index].gpu = (int)v;
		return 0;
	case S_BYTES:
		if (parse_u64(val, &v) || v == 0)
			return bad("%d: %s '%s' is not a positive byte count", lineno, key, val);
		rec->slabs[index].bytes = v;
		return 0;
	default:
		if (aeg_handle_from_hex(val, &rec->slabs[index].handle))
			return bad("%d: %s is not %d hex digits", lineno, key, AEG_HANDLE_HEX_LEN);
		return 0;
	}
}

AEG_EXPORT int aeg_job_record_parse(const char *text, size_t len, struct aeg_job_record *rec)
{
	unsigned char seen[K_COUNT] = { 0 }, slab_seen[AEG_JOB_MAX_GPUS][S_COUNT];
	struct aeg_job_record r;
	char *copy, *line, *next;
	int lineno = 0, slabs = -1, err = 0;

	if (text == NULL || rec == NULL)
		return aeg_fail(AEG_EINVAL, "job record: missing argument");
	if (len == 0)
		return aeg_fail(AEG_EPROTO, "job record is empty");
	if (len > AEG_JOB_RECORD_MAX)
		return aeg_fail(AEG_EPROTO, "job record of %zu bytes, at most %d", len, AEG_JOB_RECORD_MAX);
	if (memchr(text, '\0', len))
		return aeg_fail(AEG_EPROTO, "job record holds a NUL byte");
	if (text[len - 1] != '\n')
		return aeg_fail(AEG_EPROTO, "job record is truncated (no newline at its end)");
	copy = malloc(len + 1);
	if (copy == NULL)
		return aeg_fail(AEG_ENOMEM, "job record: out of memory");
	memcpy(copy, text, len);
	copy[len] = '\0';
	memset(&r, 0, sizeof(r));
	memset(slab_seen, 0, sizeof(slab_seen));

	for (line = copy; *line; line = next) {
		char *eq;

		next = strchr(line, '\n');
		*next++ = '\0';
		lineno++;
		for (char *c = line; *c; c++) {
			if ((unsigned char)*c < 0x20 || *c == 0x7f) {
				err = bad("%d: control character 0x%02x", lineno, (unsigned char)*c);
				goto out;
			}
		}
		eq = strchr(line, '=');
		if (eq == NULL || eq == line) {
			err = bad("%d: '%s' is not key=value", lineno, line);
			goto out;
		}
		*eq = '\0';
		if (lineno == 1 && strcmp(line, "version") != 0) {
			err = bad("1: '%s' where version= must come first", line);
			goto out;
		}
		err = parse_line(&r, lineno, line, eq + 1, seen, slab_seen, &slabs);
		if (err)
			goto out;
	}
	for (int k = 0; k < K_COUNT; k++) {
		if (!seen[k]) {
			err = aeg_fail(AEG_EPROTO, "job record: key '%s' missing", keys[k]);
			goto out;
		}
	}
	if (slabs != r.gpu_count) {
		err = aeg_fail(AEG_EPROTO, "job record: slabs=%d but gpus lists %d GPUs", slabs, r.gpu_count);
		goto out;
	}
	for (int i = 0; i < AEG_JOB_MAX_GPUS; i++) {
		for (int w = 0; w < S_COUNT; w++) {
			if (i < slabs && !slab_seen[i][w]) {
				err = aeg_fail(AEG_EPROTO, "job record: key 'slab%d_%s' missing", i, slab_keys[w]);
				goto out;
			}
			if (i >= slabs && slab_seen[i][w]) {
				err = aeg_fail(AEG_EPROTO, "job record: slab%d_%s given but slabs=%d",
					       i, slab_keys[w], slabs);
				goto out;
			}
		}
	}
	err = record_check(&r);
	if (err) {
		aeg_error_prefix("job record");
		err = AEG_EPROTO;
		goto out;
	}
	*rec = r;
out:
	free(copy);
	return err;
}

#undef bad

/*
 * Write all of @len bytes as @name in the directory @dfd through @name.tmp,
 * fsync'ed, then renamed over @name. With @uid not (uid_t)-1 the file is
 * made @uid:@gid's through its descriptor, before it is renamed: never by
 * name, since @dfd may be a directory that user can change meanwhile.
 * @path names the file in messages.
 */
static int write_atomic_at(int dfd, const char *name, const char *path, const char *data, size_t len,
			   uid_t uid, gid_t gid)
{
	char tmp[NAME_MAX + 1];
	size_t done = 0;
	int fd, err = 0;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp", name) >= (int)sizeof(tmp))
		return aeg_fail(AEG_EINVAL, "file name '%s' too long", name);
	/* A stale tmp file (or a link planted there) must not be followed. */
	if (unlinkat(dfd, tmp, 0) < 0 && errno != ENOENT)
		return aeg_fail(errno == EACCES ? AEG_EACCES : AEG_EIO, "removing %s.tmp: %s", path, strerror(errno));
	fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return aeg_fail(errno == EACCES ? AEG_EACCES : errno == ENOENT ? AEG_ENOENT : AEG_EIO,
				"creating %s.tmp: %s", path, strerror(errno));
	if (fchmod(fd, 0600) < 0) {
		err = aeg_fail(AEG_EIO, "chmod %s.tmp: %s", path, strerror(errno));
		goto out;
	}
	if (uid != (uid_t)-1 && fchown(fd, uid, gid) < 0) {
		err = aeg_fail(AEG_EIO, "chown %s.tmp: %s", path, strerror(errno));
		goto out;
	}
	while (done < len) {
		ssize_t w = write(fd, data + done, len - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			err = aeg_fail(AEG_EIO, "writing %s.tmp: %s", path, strerror(errno));
			goto out;
		}
		done += (size_t)w;
	}
	if (fsync(fd) < 0) {
		err = aeg_fail(AEG_EIO, "fsync %s.tmp: %s", path, strerror(errno));
		goto out;
	}
out:
	if (close(fd) < 0 && !err)
		err = aeg_fail(AEG_EIO, "closing %s.tmp: %s", path, strerror(errno));
	if (!err && renameat(dfd, tmp, dfd, name) < 0)
		err = aeg_fail(AEG_EIO, "renaming %s.tmp to %s: %s", path, path, strerror(errno));
	if (err) {
		unlinkat(dfd, tmp, 0);
		return err;
	}
	/* The rename itself must survive a crash too. */
	fsync(dfd);
	return 0;
}

/* write_atomic_at for a path: in its directory, under its own name. */
static int write_atomic(const char *path, const char *data, size_t len)
{
	char dir[PATH_MAX], base[PATH_MAX];
	int dfd, err;

	if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir))
		return aeg_fail(AEG_EINVAL, "path '%s' too long", path);
	snprintf(base, sizeof(base), "%s", path);
	dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return aeg_fail(errno == EACCES ? AEG_EACCES : errno == ENOENT ? AEG_ENOENT : AEG_EIO,
				"opening the directory of %s: %s", path, strerror(errno));
	err = write_atomic_at(dfd, basename(base), path, data, len, (uid_t)-1, (gid_t)-1);
	close(dfd);
	return err;
}

/* Read the whole regular file @path, at most @max bytes, into a NUL-terminated buffer. */
static int read_bounded(const char *path, size_t max, char **data, size_t *len)
{
	struct stat st;
	char *buf = NULL;
	size_t got = 0;
	int fd, err = 0;

	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ENOENT)
			return aeg_fail(AEG_ENOENT, "%s does not exist", path);
		if (errno == EACCES)
			return aeg_fail(AEG_EACCES, "opening %s: %s", path, strerror(errno));
		if (errno == ELOOP)
			return aeg_fail(AEG_EPROTO, "%s is a symbolic link", path);
		return aeg_fail(AEG_EIO, "opening %s: %s", path, strerror(errno));
	}
	if (fstat(fd, &st) < 0) {
		err = aeg_fail(AEG_EIO, "stat %s: %s", path, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		err = aeg_fail(AEG_EPROTO, "%s is not a regular file", path);
		goto out;
	}
	if ((uint64_t)st.st_size > max) {
		err = aeg_fail(AEG_EPROTO, "%s is %jd bytes, at most %zu", path, (intmax_t)st.st_size, max);
		goto out;
	}
	buf = malloc(max + 2);
	if (buf == NULL) {
		err = aeg_fail(AEG_ENOMEM, "reading %s: out of memory", path);
		goto out;
	}
	/* Read one byte past the limit, in case the file grew since fstat. */
	for (;;) {
		ssize_t r = read(fd, buf + got, max + 1 - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			err = aeg_fail(AEG_EIO, "reading %s: %s", path, strerror(errno));
			goto out;
		}
		if (r == 0)
			break;
		got += (size_t)r;
		if (got > max) {
			err = aeg_fail(AEG_EPROTO, "%s is over %zu bytes", path, max);
			goto out;
		}
	}
	buf[got] = '\0';
	*data = buf;
	*len = got;
	buf = NULL;
out:
	free(buf);
	close(fd);
	return err;
}

AEG_EXPORT int aeg_job_record_write(const char *path, const struct aeg_job_record *rec)
{
	char *buf;
	size_t len;
	int err;

	if (path == NULL || rec == NULL)
		return aeg_fail(AEG_EINVAL, "job record: missing argument");
	buf = malloc(AEG_JOB_RECORD_MAX);
	if (buf == NULL)
		return aeg_fail(AEG_ENOMEM, "job record: out of memory");
	err = aeg_job_record_format(rec, buf, AEG_JOB_RECORD_MAX, &len);
	if (!err)
		err = write_atomic(path, buf, len);
	free(buf);
	return err;
}

AEG_EXPORT int aeg_job_record_read(const char *path, struct aeg_job_record *rec)
{
	char *data;
	size_t len;
	int err;

	if (path == NULL || rec == NULL)
		return aeg_fail(AEG_EINVAL, "job record: missing argument");
	err = read_bounded(path, AEG_JOB_RECORD_MAX, &data, &len);
	if (err)
		return err;
	err = aeg_job_record_parse(data, len, rec);
	if (err)
		aeg_error_prefix("%s", path);
	free(data);
	return err;
}

/* @reason as the record's one line: control characters made '?', cut to fit. Its length. */
static size_t error_line(const char *reason, char line[AEG_JOB_ERROR_MAX + 1])
{
	size_t n = strnlen(reason, AEG_JOB_ERROR_MAX - 1);

	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)reason[i];
		line[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
	}
	if (n == 0)
		line[n++] = '?';
	line[n++] = '\n';
	return n;
}

AEG_EXPORT int aeg_job_error_write(const char *path, const char *reason)
{
	char line[AEG_JOB_ERROR_MAX + 1];

	if (path == NULL || reason == NULL)
		return aeg_fail(AEG_EINVAL, "error record: missing argument");
	return write_atomic(path, line, error_line(reason, line));
}

int aeg_jobdir_write_error(int dfd, const char *dir, const char *reason, uid_t uid, gid_t gid)
{
	char line[AEG_JOB_ERROR_MAX + 1], path[PATH_MAX];

	if (dfd < 0 || dir == NULL || reason == NULL)
		return aeg_fail(AEG_EINVAL, "error record: missing argument");
	snprintf(path, sizeof(path), "%s/" AEG_JOB_ERROR_FILE, dir);
	return write_atomic_at(dfd, AEG_JOB_ERROR_FILE, path, line, error_line(reason, line), uid, gid);
}

AEG_EXPORT int aeg_job_error_read(const char *path, char *reason, size_t len)
{
	char *data;
	size_t n;
	int err;

	if (path == NULL || reason == NULL || len == 0)
		return aeg_fail(AEG_EINVAL, "error record: missing argument");
	err = read_bounded(path, AEG_JOB_ERROR_MAX, &data, &n);
	if (err)
		return err;
	if (n < 2 || data[n - 1] != '\n') {
		err = aeg_fail(AEG_EPROTO, "%s: error record empty or truncated", path);
		goto out;
	}
	data[--n] = '\0';
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)data[i];
		if (c < 0x20 || c == 0x7f) {
			err = aeg_fail(AEG_EPROTO, "%s: error record has a control character at byte %zu",
				       path, i);
			goto out;
		}
	}
	if (n >= len) {
		err = aeg_fail(AEG_ERANGE, "%s: reason of %zu bytes, buffer of %zu", path, n, len);
		goto out;
	}
	memcpy(reason, data, n + 1);
out:
	free(data);
	return err;
}

/* Loads as the subcommands see them, through a session: opening it, waiting, read-back checks, listing. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"
#include "internal.h"

#define VERIFY_PIECE (16u << 20)
#define BAR_SLICE_MS 100

int cli_in_job(void)
{
	const char *s = getenv("AEGAEON_SOCKET");

	return s != NULL && s[0] != '\0';
}

int cli_session_open(struct aeg_session_config *cfg, const char *device, const char *what, aeg_session_t **s)
{
	int err;

	if (cfg->mode == AEG_SESSION_AUTO)
		cfg->mode = cli_in_job() ? AEG_SESSION_JOB : AEG_SESSION_LOCAL;
	if (cfg->mode == AEG_SESSION_LOCAL) {
		err = cli_device_kind(device, &cfg->device);
		if (err)
			return err;
		cfg->flags |= AEG_SESSION_DEVICE_SET;
	}
	err = aeg_session_open(cfg, s);
	return err ? cli_fail(err, what) : 0;
}

static uint64_t remaining_ms(uint64_t deadline_ns)
{
	uint64_t now = aeg_now_ns();

	return now >= deadline_ns ? 0 : (deadline_ns - now + 999999) / 1000000;
}

int cli_model_wait(aeg_model_t *m, uint64_t deadline_ns, int bar, uint64_t start_ns, uint64_t *end_ns)
{
	struct aeg_load_progress p;
	int err;

	for (;;) {
		int ms = bar ? BAR_SLICE_MS : -1;

		if (deadline_ns) {
			uint64_t left = remaining_ms(deadline_ns);

			if (ms < 0 || left < (uint64_t)ms)
				ms = (int)left;
		}
		err = aeg_model_wait(m, ms);
		if (err != AEG_ETIMEDOUT || (deadline_ns && aeg_now_ns() >= deadline_ns))
			break;
		if (bar && aeg_model_progress(m, &p) == 0)
			cli_progress(p.done_bytes, p.total_bytes, start_ns);
	}
	*end_ns = aeg_now_ns();
	if (bar) {
		if (err == 0 && aeg_model_progress(m, &p) == 0)
			cli_progress(p.done_bytes, p.total_bytes, start_ns);
		fputc('\n', stderr);
	}
	return err;
}

int cli_model_info(aeg_model_t *m, struct cli_load_info *info)
{
	struct aeg_load_progress p;
	int err = aeg_model_progress(m, &p);

	if (err)
		return err;
	memset(info, 0, sizeof(*info));
	info->id = aeg_model_id(m);
	info->path = aeg_model_path(m);
	info->slab = aeg_model_job_slab(m);
	info->status = p.status;
	info->file_bytes = p.total_bytes;
	info->done_bytes = p.done_bytes > p.total_bytes ? p.total_bytes : p.done_bytes;
	aeg_model_chunks(m, &info->chunks);
	return 0;
}

int cli_load_failed(const struct cli_load_info *l, int err, const char *detail)
{
	fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s failed: %s (%s)\n", l->id, l->path,
		*detail ? detail : aeg_strerror(err), aeg_errname(err));
	return 1;
}

int cli_load_timed_out(const struct cli_load_info *l, double timeout_s)
{
	char a[32], b[32];

	fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s not complete after %g s (%s of %s)\n", l->id, l->path,
		timeout_s, aeg_size_format(l->done_bytes, a, sizeof(a)), aeg_size_format(l->file_bytes, b, sizeof(b)));
	return 1;
}

/* ----------------------------------------------------------- read-back */

/* Chunk @c (index @i) read back in pieces and compared with the file; the digest takes its bytes. */
static int verify_chunk(aeg_device_t *dev, const struct aeg_chunk *c, uint32_t i, int fd, const char *path,
			unsigned char *gbuf, unsigned char *fbuf, struct cli_sha256 *sha)
{
	for (uint64_t off = 0; off < c->size; off += VERIFY_PIECE) {
		size_t n = c->size - off < VERIFY_PIECE ? (size_t)(c->size - off) : VERIFY_PIECE;
		int err = aeg_memcpy(dev, gbuf, (char *)c->device_ptr + off, n);
		ssize_t got;

		if (err)
			return cli_fail(err, "verify: copying a chunk back");
		got = aeg_pread_full(fd, fbuf, n, n, c->file_offset + off);
		if (got < 0 || (size_t)got < n) {
			fprintf(stderr, "aegaeon-cli: verify: %s: reading %zu bytes at %" PRIu64 ": %s\n", path, n,
				c->file_offset + off, got >= 0 ? "the file is shorter than the load (changed since?)"
							       : strerror((int)-got));
			return 1;
		}
		if (memcmp(gbuf, fbuf, n) != 0) {
			size_t k = 0;

			while (gbuf[k] == fbuf[k])
				k++;
			fprintf(stderr, "aegaeon-cli: verify: chunk %u (slab id %" PRIu64 ") differs from %s at file "
				"offset %" PRIu64 ": 0x%02x in the slab, 0x%02x in the file\n", i, c->slab_id, path,
				c->file_offset + off + k, gbuf[k], fbuf[k]);
			return 1;
		}
		cli_sha256_update(sha, gbuf, n);
	}
	return 0;
}

/* The file of chunk @c, opened when it differs from the one open (*@fd, *@open). */
static int chunk_file(aeg_model_t *m, const struct aeg_chunk *c, int *fd, uint32_t *open_file)
{
	const char *path = aeg_model_file(m, c->file);

	if (*fd >= 0 && *open_file == c->file)
		return 0;
	if (*fd >= 0)
		close(*fd);
	*fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
	*open_file = c->file;
	if (*fd < 0) {
		fprintf(stderr, "aegaeon-cli: verify: %s: %s\n", path ? path : "?", strerror(errno));
		return 1;
	}
	return 0;
}

int cli_verify(aeg_session_t *s, aeg_model_t *m, struct cli_verify *r)
{
	const struct aeg_chunk *c;
	struct cli_sha256 sha;
	unsigned char *gbuf = NULL, *fbuf = NULL;
	uint32_t n, open_file = 0;
	int fd = -1, rc = 1;

	memset(r, 0, sizeof(*r));
	r->contiguous = 1;
	gbuf = malloc(VERIFY_PIECE);
	fbuf = malloc(VERIFY_PIECE);
	if (gbuf == NULL || fbuf == NULL) {
		fprintf(stderr, "aegaeon-cli: verify: out of memory\n");
		goto out;
	}
	cli_sha256_init(&sha);
	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++) {
		if (c[i].device_ptr == NULL) {
			fprintf(stderr, "aegaeon-cli: verify: job slab %d is not mapped in this process (not visible here?)\n",
				aeg_model_job_slab(m));
			goto out;
		}
		if (chunk_file(m, &c[i], &fd, &open_file))
			goto out;
		if (i == 0)
			r->first = c[i].file_offset;
		else if (c[i].file_offset != r->end || c[i].file != c[i - 1].file)
			r->contiguous = 0;
		if (verify_chunk(aeg_session_device(s), &c[i], i, fd, aeg_model_file(m, c[i].file), gbuf, fbuf, &sha))
			goto out;
		r->bytes += c[i].size;
		r->end = c[i].file_offset + c[i].size;
	}
	r->chunks = n;
	r->files = aeg_model_file_count(m);
	cli_sha256_hex(&sha, r->sha256);
	rc = 0;
out:
	free(gbuf);
	free(fbuf);
	if (fd >= 0)
		close(fd);
	return rc;
}

void cli_print_verified(const struct cli_load_info *l, const struct cli_verify *r)
{
	char a[32];

	if (r->files > 1)
		printf("%s: verified %s in %u chunk%s of %u files (load %" PRIu64 " and on) against the files: identical "
		       "(sha256 %s)\n", l->path, aeg_size_format(r->bytes, a, sizeof(a)), r->chunks, cli_s(r->chunks),
		       r->files, l->id, r->sha256);
	else
		printf("%s: verified %s in %u chunk%s of load %" PRIu64 " against the file: identical "
		       "(file bytes %" PRIu64 "..%" PRIu64 "%s, sha256 %s)\n", l->path,
		       aeg_size_format(r->bytes, a, sizeof(a)), r->chunks, cli_s(r->chunks), l->id, r->first, r->end,
		       r->contiguous ? "" : ", with gaps", r->sha256);
}

json_t *cli_verified_json(const struct cli_verify *r)
{
	return json_pack("{s:b, s:I, s:I, s:I, s:b, s:s}", "identical", 1, "bytes", (json_int_t)r->bytes,
			 "file_first", (json_int_t)r->first, "file_end", (json_int_t)r->end,
			 "contiguous", r->contiguous, "sha256", r->sha256);
}

/* -------------------------------------------------------------- listing */

json_t *cli_chunks_json(aeg_model_t *m)
{
	char hex[AEG_HANDLE_HEX_LEN + 1], ptr[32];
	const struct aeg_chunk *c;
	json_t *arr = json_array();
	uint32_t n;

	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++) {
		json_t *o;

		aeg_handle_to_hex(&c[i].event, hex);
		o = json_pack("{s:I, s:I, s:I, s:I, s:s, s:s}", "slab_id", (json_int_t)c[i].slab_id,
			      "slab_offset", (json_int_t)c[i].slab_offset, "size", (json_int_t)c[i].size,
			      "file_offset", (json_int_t)c[i].file_offset, "event_handle", hex,
			      "file", aeg_model_file(m, c[i].file));
		/* This process's pointer, where the slab is mapped here. */
		if (o != NULL && c[i].device_ptr != NULL) {
			snprintf(ptr, sizeof(ptr), "0x%" PRIxPTR, (uintptr_t)c[i].device_ptr);
			json_object_set_new(o, "device_ptr", json_string(ptr));
		}
		json_array_append_new(arr, o);
	}
	return arr;
}

json_t *cli_load_json(aeg_model_t *m, const struct cli_load_info *l)
{
	char state[128];

	return json_pack("{s:I, s:s, s:i, s:s, s:I, s:I, s:o}", "load_id", (json_int_t)l->id, "path", l->path,
			 "slab", l->slab, "state", cli_load_state(l->status, state, sizeof(state)),
			 "file_bytes", (json_int_t)l->file_bytes, "done_bytes", (json_int_t)l->done_bytes,
			 "chunks", cli_chunks_json(m));
}

void cli_print_load(aeg_model_t *m, const struct cli_load_info *l, int chunk_lines)
{
	char a[32], b[32], state[128], hex[AEG_HANDLE_HEX_LEN + 1];
	const struct aeg_chunk *c;
	uint32_t n;

	printf("load %" PRIu64 ": %s -> slab %d, %s, %s of %s, %u chunk%s\n", l->id, l->path, l->slab,
	       cli_load_state(l->status, state, sizeof(state)), aeg_size_format(l->done_bytes, a, sizeof(a)),
	       aeg_size_format(l->file_bytes, b, sizeof(b)), l->chunks, cli_s(l->chunks));
	if (!chunk_lines)
		return;
	printf("%6s %10s %14s %12s %14s  %s\n", "chunk", "slab_id", "slab_offset", "size", "file_offset", "event");
	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++) {
		aeg_handle_to_hex(&c[i].event, hex);
		printf("%6u %10" PRIu64 " %14" PRIu64 " %12" PRIu64 " %14" PRIu64 "  %s\n", i, c[i].slab_id,
		       c[i].slab_offset, c[i].size, c[i].file_offset, hex);
	}
}

int cli_parse_load_id(const char *text, uint64_t *id)
{
	char *end;

	if (text[0] < '0' || text[0] > '9')
		return -1;
	errno = 0;
	*id = strtoull(text, &end, 10);
	return errno || *end || *id == 0 ? -1 : 0;
}

int cli_find_load(aeg_session_t *s, const char *what, aeg_model_t **m)
{
	uint64_t id;
	int err = AEG_ENOENT;

	if (cli_parse_load_id(what, &id) == 0) {
		err = aeg_session_find_id(s, id, m);
		return err ? cli_fail(err, what) : 0;
	}
	if (access(what, F_OK) != 0) {
		fprintf(stderr, "aegaeon-cli: %s: %s\n", what, strerror(errno));
		return 1;
	}
	/* The newest load of the file, in whichever of the job's slabs holds one. */
	err = aeg_session_find(s, what, -1, m);
	if (err == AEG_ENOENT)
		fprintf(stderr, "aegaeon-cli: %s is not loaded in this job on this node (aegaeon-cli status lists the loads)\n",
			what);
	else if (err)
		cli_fail(err, what);
	return err ? 1 : 0;
}

int cli_job_slab_of(aeg_session_t *s, int gpu)
{
	char seen[256] = "";
	size_t used = 0;

	for (int i = 0; i < aeg_session_gpu_count(s); i++) {
		struct aeg_job_slab_desc d;

		if (aeg_job_slab_describe(aeg_session_job(s), i, &d) != 0)
			continue;
		if (d.gpu == gpu)
			return i;
		if (d.gpu >= 0 && used < sizeof(seen))
			used += (size_t)snprintf(seen + used, sizeof(seen) - used, "%s%d", used ? "," : "", d.gpu);
	}
	fprintf(stderr, "aegaeon-cli: --gpu %d: no slab of the job is on that GPU; its slabs are on GPU %s "
		"as this process numbers them\n", gpu, used ? seen : "(none visible)");
	return -1;
}

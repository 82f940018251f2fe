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
	char path[CLI_SHOWN_MAX];

	fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s failed: %s (%s)\n", l->id,
		cli_shown(l->path, path, sizeof(path)), *detail ? detail : aeg_strerror(err), aeg_errname(err));
	return 1;
}

int cli_load_timed_out(const struct cli_load_info *l, double timeout_s)
{
	char a[32], b[32], path[CLI_SHOWN_MAX];

	fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s not complete after %g s (%s of %s)\n", l->id,
		cli_shown(l->path, path, sizeof(path)), timeout_s, aeg_size_format(l->done_bytes, a, sizeof(a)),
		aeg_size_format(l->file_bytes, b, sizeof(b)));
	return 1;
}

/* ----------------------------------------------------------- read-back */

/* @len bytes at @off, all of them: 0, -ENODATA where the file ends first, or -errno. */
static int pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	ssize_t got = aeg_pread_full(fd, buf, len, len, off);

	return got < 0 ? (int)got : (size_t)got < len ? -ENODATA : 0;
}

/* What a read-back check holds: the file open, a buffer for the slab's bytes and one for the file's, the digest. */
struct verify_io {
	int fd;
	uint32_t open_file;
	unsigned char *gbuf, *fbuf;
	struct cli_sha256 sha;
};

static int read_failed(const char *path, size_t n, uint64_t at, int err)
{
	char p[CLI_SHOWN_MAX];

	fprintf(stderr, "aegaeon-cli: verify: %s: reading %zu bytes at %" PRIu64 ": %s\n", cli_shown(path, p, sizeof(p)),
		n, at,
		err == -ENODATA ? "the file is shorter than the load (changed since?)" : strerror(-err));
	return 1;
}

/* The first byte where @n bytes of the slab (@g) and of the file (@f) differ; @n if none. */
static size_t first_difference(const unsigned char *g, const unsigned char *f, size_t n)
{
	size_t k = 0;

	if (memcmp(g, f, n) == 0)
		return n;
	while (g[k] == f[k])
		k++;
	return k;
}

/* Chunk @c (index @i) read back in pieces and compared with the file; the digest takes its bytes. */
static int verify_chunk(aeg_device_t *dev, const struct aeg_chunk *c, uint32_t i, struct verify_io *io,
			const char *path)
{
	for (uint64_t off = 0; off < c->size; off += VERIFY_PIECE) {
		size_t k, n = c->size - off < VERIFY_PIECE ? (size_t)(c->size - off) : VERIFY_PIECE;
		int err = aeg_memcpy(dev, io->gbuf, (char *)c->device_ptr + off, n);

		if (err)
			return cli_fail(err, "verify: copying a chunk back");
		err = pread_full(io->fd, io->fbuf, n, c->file_offset + off);
		if (err)
			return read_failed(path, n, c->file_offset + off, err);
		k = first_difference(io->gbuf, io->fbuf, n);
		if (k < n) {
			char p[CLI_SHOWN_MAX];

			fprintf(stderr, "aegaeon-cli: verify: chunk %u (slab id %" PRIu64 ") differs from %s at file "
				"offset %" PRIu64 ": 0x%02x in the slab, 0x%02x in the file\n", i, c->slab_id,
				cli_shown(path, p, sizeof(p)),
				c->file_offset + off + k, io->gbuf[k], io->fbuf[k]);
			return 1;
		}
		cli_sha256_update(&io->sha, io->gbuf, n);
	}
	return 0;
}

/*
 * Where part @t lies in its file: runs of @run bytes, @pitch apart, one
 * per index of the dimensions before the split one (one run for a tensor
 * loaded whole or split along its first dimension).
 */
struct part_rows {
	uint64_t run, pitch;
};

static struct part_rows part_rows(const struct aeg_tensor *t)
{
	struct part_rows p = { t->size, t->size };
	uint64_t rows = 1;

	if (t->slice_dim <= 0 || t->size == 0)
		return p;
	for (int d = 0; d < t->slice_dim; d++)
		rows *= t->shape[d];
	p.run = t->size / rows;
	p.pitch = p.run / t->shape[t->slice_dim] * t->slice_extent;
	return p;
}

/* The file offset of byte @at of part @t. */
static uint64_t part_file_offset(const struct aeg_tensor *t, struct part_rows p, uint64_t at)
{
	return t->file_offset + at / p.run * p.pitch + at % p.run;
}

/* Bytes [@at, @at + @n) of part @t as its file @path holds them, row by row, into @buf; 0 or 1 (printed). */
static int read_part(int fd, const struct aeg_tensor *t, struct part_rows p, uint64_t at, size_t n,
		     unsigned char *buf, const char *path)
{
	while (n > 0) {
		size_t k = p.run - at % p.run < n ? (size_t)(p.run - at % p.run) : n;
		uint64_t where = part_file_offset(t, p, at);
		int err = pread_full(fd, buf, k, where);

		if (err)
			return read_failed(path, k, where, err);
		buf += k;
		at += k;
		n -= k;
	}
	return 0;
}

/* Part @t of a sliced load read back in pieces and compared with the rows of the file it comes from. */
static int verify_part(aeg_device_t *dev, const struct aeg_tensor *t, struct verify_io *io, const char *path)
{
	struct part_rows p = part_rows(t);

	for (uint64_t off = 0; off < t->size; off += VERIFY_PIECE) {
		size_t k, n = t->size - off < VERIFY_PIECE ? (size_t)(t->size - off) : VERIFY_PIECE;
		int err = aeg_memcpy(dev, io->gbuf, (char *)t->device_ptr + off, n);
		char part[96] = "whole", name[132], file[CLI_SHOWN_MAX];

		if (err)
			return cli_fail(err, "verify: copying a tensor back");
		if (read_part(io->fd, t, p, off, n, io->fbuf, path))
			return 1;
		k = first_difference(io->gbuf, io->fbuf, n);
		if (k < n) {
			if (t->slice_dim != AEG_SLICE_WHOLE)
				snprintf(part, sizeof(part), "indices %" PRIu64 "..%" PRIu64 " of %" PRIu64 " along dim %d",
					 t->slice_start, t->slice_start + t->shape[t->slice_dim], t->slice_extent,
					 t->slice_dim);
			fprintf(stderr, "aegaeon-cli: verify: tensor \"%s\" (%s) differs from %s at file offset %" PRIu64
				": 0x%02x in the slab, 0x%02x in the file\n", aeg_quote(t->name, name, sizeof(name)),
				part, cli_shown(path, file, sizeof(file)), part_file_offset(t, p, off + k), io->gbuf[k], io->fbuf[k]);
			return 1;
		}
		cli_sha256_update(&io->sha, io->gbuf, n);
	}
	return 0;
}

/* File @file of @m, opened when it differs from the one open (*@fd, *@open_file). */
static int model_file(aeg_model_t *m, uint32_t file, int *fd, uint32_t *open_file)
{
	const char *path = aeg_model_file(m, file);

	if (*fd >= 0 && *open_file == file)
		return 0;
	if (*fd >= 0)
		close(*fd);
	*fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
	*open_file = file;
	if (*fd < 0) {
		char p[CLI_SHOWN_MAX];

		fprintf(stderr, "aegaeon-cli: verify: %s: %s\n", path ? cli_shown(path, p, sizeof(p)) : "?",
			strerror(errno));
		return 1;
	}
	return 0;
}

static int not_mapped(aeg_model_t *m)
{
	fprintf(stderr, "aegaeon-cli: verify: job slab %d is not mapped in this process (not visible here?)\n",
		aeg_model_job_slab(m));
	return 1;
}

/* Every chunk of a whole load, in file order. */
static int verify_chunks(aeg_device_t *dev, aeg_model_t *m, struct verify_io *io, struct cli_verify *r)
{
	const struct aeg_chunk *c = aeg_model_chunks(m, &r->chunks);

	r->contiguous = 1;
	for (uint32_t i = 0; i < r->chunks; i++) {
		if (c[i].device_ptr == NULL)
			return not_mapped(m);
		if (model_file(m, c[i].file, &io->fd, &io->open_file))
			return 1;
		if (i == 0)
			r->first = c[i].file_offset;
		else if (c[i].file_offset != r->end || c[i].file != c[i - 1].file)
			r->contiguous = 0;
		if (verify_chunk(dev, &c[i], i, io, aeg_model_file(m, c[i].file)))
			return 1;
		r->bytes += c[i].size;
		r->end = c[i].file_offset + c[i].size;
	}
	return 0;
}

/* Every tensor's part of a sliced load, in the slab's order (the parts are packed in file order). */
static int verify_parts(aeg_device_t *dev, aeg_model_t *m, struct verify_io *io, struct cli_verify *r)
{
	const struct aeg_tensor *t = aeg_model_tensors(m, &r->parts);

	aeg_model_chunks(m, &r->chunks);
	for (uint32_t i = 0; i < r->parts; i++) {
		r->split += t[i].slice_dim != AEG_SLICE_WHOLE;
		if (t[i].size == 0)
			continue;
		if (t[i].device_ptr == NULL)
			return not_mapped(m);
		if (model_file(m, t[i].file, &io->fd, &io->open_file) ||
		    verify_part(dev, &t[i], io, aeg_model_file(m, t[i].file)))
			return 1;
		r->bytes += t[i].size;
	}
	return 0;
}

/*
 * The chunks hold every byte the load was for (the file's data, or the
 * slice's parts): a load some of whose chunks were released does not, and
 * what is left of it, however right, is not the model.
 */
static int check_whole(aeg_model_t *m)
{
	struct aeg_load_progress p;
	const struct aeg_chunk *c;
	uint64_t held = 0;
	uint32_t n;
	char a[32], b[32], path[CLI_SHOWN_MAX];
	int err = aeg_model_progress(m, &p);

	if (err)
		return cli_fail(err, "verify");
	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++)
		held += c[i].size;
	if (held == p.total_bytes)
		return 0;
	cli_shown(aeg_model_path(m), path, sizeof(path));
	fprintf(stderr, "aegaeon-cli: verify: load %" PRIu64 " of %s holds %s of its %s: some of its chunks were "
		"released; load it again (aegaeon-cli prefetch %s)\n", aeg_model_id(m), path,
		aeg_size_format(held, a, sizeof(a)), aeg_size_format(p.total_bytes, b, sizeof(b)), path);
	return 1;
}

int cli_verify(aeg_session_t *s, aeg_model_t *m, struct cli_verify *r)
{
	struct verify_io io = { .fd = -1 };
	int rc = 1;

	memset(r, 0, sizeof(*r));
	if (check_whole(m))
		return 1;
	io.gbuf = malloc(VERIFY_PIECE);
	io.fbuf = malloc(VERIFY_PIECE);
	if (io.gbuf == NULL || io.fbuf == NULL) {
		fprintf(stderr, "aegaeon-cli: verify: out of memory\n");
		goto out;
	}
	cli_sha256_init(&io.sha);
	if (aeg_model_slice(m) != NULL)
		rc = verify_parts(aeg_session_device(s), m, &io, r);
	else
		rc = verify_chunks(aeg_session_device(s), m, &io, r);
	r->files = aeg_model_file_count(m);
	cli_sha256_hex(&io.sha, r->sha256);
out:
	free(io.gbuf);
	free(io.fbuf);
	if (io.fd >= 0)
		close(io.fd);
	return rc;
}

void cli_print_verified(const struct cli_load_info *l, const struct cli_verify *r)
{
	char a[32], path[CLI_SHOWN_MAX];

	cli_shown(l->path, path, sizeof(path));
	if (r->parts)
		printf("%s: verified %s of this rank's parts of %u tensor%s (%u split) in %u chunk%s of load %" PRIu64
		       " against the file%s: identical (sha256 %s)\n", path, aeg_size_format(r->bytes, a, sizeof(a)),
		       r->parts, cli_s(r->parts), r->split, r->chunks, cli_s(r->chunks), l->id, r->files > 1 ? "s" : "",
		       r->sha256);
	else if (r->files > 1)
		printf("%s: verified %s in %u chunk%s of %u files (load %" PRIu64 " and on) against the files: identical "
		       "(sha256 %s)\n", path, aeg_size_format(r->bytes, a, sizeof(a)), r->chunks, cli_s(r->chunks),
		       r->files, l->id, r->sha256);
	else
		printf("%s: verified %s in %u chunk%s of load %" PRIu64 " against the file: identical "
		       "(file bytes %" PRIu64 "..%" PRIu64 "%s, sha256 %s)\n", path,
		       aeg_size_format(r->bytes, a, sizeof(a)), r->chunks, cli_s(r->chunks), l->id, r->first, r->end,
		       r->contiguous ? "" : ", with gaps", r->sha256);
}

json_t *cli_verified_json(const struct cli_verify *r)
{
	if (r->parts)
		return json_pack("{s:b, s:I, s:i, s:i, s:s}", "identical", 1, "bytes", (json_int_t)r->bytes,
				 "parts", (int)r->parts, "split", (int)r->split, "sha256", r->sha256);
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

uint64_t cli_chunk_bytes(aeg_model_t *m)
{
	const struct aeg_chunk *c;
	uint64_t most = 0;
	uint32_t n;

	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++)
		if (c[i].size > most)
			most = c[i].size;
	return most;
}

json_t *cli_load_json(aeg_model_t *m, const struct cli_load_info *l)
{
	char state[128];
	uint32_t ntensors;
	json_t *o;

	aeg_model_tensors(m, &ntensors);
	o = json_pack("{s:I, s:s, s:o, s:s, s:I, s:I, s:I, s:i, s:o}", "load_id", (json_int_t)l->id, "path", l->path,
		      "slab", l->slab >= 0 ? json_integer(l->slab) : json_null(),
		      "state", cli_load_state(l->status, l->done_bytes, l->file_bytes, state, sizeof(state)),
		      "file_bytes", (json_int_t)l->file_bytes, "done_bytes", (json_int_t)l->done_bytes,
		      "chunk_bytes", (json_int_t)cli_chunk_bytes(m), "tensors", (int)ntensors,
		      "chunks", cli_chunks_json(m));
	cli_slice_json_add(o, m);
	if (aeg_model_file_count(m) > 1) {
		json_t *files = json_array();

		for (uint32_t i = 0; i < aeg_model_file_count(m); i++)
			json_array_append_new(files, json_pack("{s:s, s:I}", "path", aeg_model_file(m, i), "load_id",
							       (json_int_t)aeg_model_file_id(m, i)));
		json_object_set_new(o, "files", files);
	}
	return o;
}

/*
 * A model of several files is a load per file: each is waited for and
 * released by its own id, so each is named, not only the first.
 */
void cli_print_files(aeg_model_t *m)
{
	uint32_t n = aeg_model_file_count(m);

	if (n < 2)
		return;
	printf("%u files, a load each (aegaeon-cli wait ID and release --load ID take one file):\n", n);
	for (uint32_t i = 0; i < n; i++) {
		char path[CLI_SHOWN_MAX];

		printf("  load %" PRIu64 ": %s\n", aeg_model_file_id(m, i),
		       cli_shown(aeg_model_file(m, i), path, sizeof(path)));
	}
}

void cli_print_load_line(const struct cli_load_info *l, const char *slice)
{
	char a[32], b[32], state[128], path[CLI_SHOWN_MAX];

	printf("load %" PRIu64 ": %s -> slab %d, %s, %s of %s%s, %u chunk%s%s\n", l->id,
	       cli_shown(l->path, path, sizeof(path)), l->slab,
	       cli_load_state(l->status, l->done_bytes, l->file_bytes, state, sizeof(state)),
	       aeg_size_format(l->done_bytes, a, sizeof(a)), aeg_size_format(l->file_bytes, b, sizeof(b)),
	       cli_partly_released(l->status, l->done_bytes, l->file_bytes) ? " held" : "", l->chunks, cli_s(l->chunks),
	       slice);
}

void cli_print_load(aeg_model_t *m, const struct cli_load_info *l, int chunk_lines)
{
	char hex[AEG_HANDLE_HEX_LEN + 1];
	const struct aeg_slice *sl = aeg_model_slice(m);
	const struct aeg_chunk *c;
	char slice[160];
	uint32_t n;

	if (sl != NULL)
		cli_slice_suffix(sl->rank, sl->world, sl->preset, sl->flags, sl->nrules, slice, sizeof(slice));
	else
		slice[0] = '\0';
	cli_print_load_line(l, slice);
	cli_print_files(m);
	if (!chunk_lines)
		return;
	printf("%6s %10s %14s %12s %14s  %s\n", "chunk", "slab_id", "slab_offset", "size", "file_offset", "event");
	c = aeg_model_chunks(m, &n);
	for (uint32_t i = 0; i < n; i++) {
		aeg_handle_to_hex(&c[i].event, hex);
		printf("%6u %10" PRIu64 " %14" PRIu64 " %12" PRIu64 " %14" PRIu64 "  %s\n", i, c[i].slab_id,
		       c[i].slab_offset, c[i].size, c[i].file_offset, hex);
	}
	cli_print_parts(m);
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

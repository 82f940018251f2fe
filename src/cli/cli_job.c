/* aegaeon-cli inside a job: prefetch, wait, release and chunks through the node's agent; read-back checks. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>

#include "cli.h"
#include "internal.h"
#include "proto.h"

#define VERIFY_PIECE (16u << 20)
/* A load's status settles just after its last event; longer means the agent is stuck. */
#define SETTLE_NS (30ull * 1000000000ull)

int cli_in_job(void)
{
	const char *s = getenv("AEGAEON_SOCKET");

	return s != NULL && s[0] != '\0';
}

static double seconds(uint64_t ns)
{
	return (double)ns / 1e9;
}

static int job_open(int attach, aeg_job_t **job, const char *what)
{
	int err = attach ? aeg_job_attach(job) : aeg_job_connect(job);

	return err ? cli_fail(err, what) : 0;
}

/* The job slab on GPU @gpu as this process numbers GPUs; slab 0 when @gpu < 0. */
static int slab_index(aeg_job_t *job, int gpu, int *index)
{
	struct aeg_job_slab_desc d;
	struct aeg_job_info info;
	char seen[256] = "";
	size_t used = 0;

	aeg_job_get_info(job, &info);
	if (info.slabs == 0) {
		fprintf(stderr, "aegaeon-cli: the job has no GPU slab on this node (ask for GPUs with --gres=gpu:N)\n");
		return 1;
	}
	if (gpu < 0) {
		*index = 0;
		return 0;
	}
	for (int i = 0; i < info.slabs; i++) {
		if (aeg_job_slab_describe(job, i, &d) != 0)
			continue;
		if (d.gpu == gpu) {
			*index = i;
			return 0;
		}
		if (d.gpu >= 0 && used < sizeof(seen))
			used += (size_t)snprintf(seen + used, sizeof(seen) - used, "%s%d", used ? "," : "", d.gpu);
	}
	fprintf(stderr, "aegaeon-cli: --gpu %d: no slab of the job is on that GPU; its slabs are on GPU %s "
		"as this process numbers them\n", gpu, used ? seen : "(none visible)");
	return 1;
}

/* Where the agent keeps load @id: its path from the status, "" when gone. */
static void load_path(aeg_job_t *job, uint64_t id, char *path, size_t len)
{
	struct aeg_job_status *st;

	path[0] = '\0';
	if (aeg_job_status(job, &st) != 0)
		return;
	for (uint32_t i = 0; i < st->loads; i++)
		if (st->load[i].load_id == id)
			snprintf(path, len, "%s", st->load[i].path);
	aeg_job_status_free(st);
}

static uint64_t load_bytes(const struct aeg_job_load *l)
{
	uint64_t n = 0;

	for (uint32_t i = 0; i < l->count; i++)
		n += l->chunks[i].size;
	return n;
}

/*
 * Wait for each chunk's event, as any consumer would; *@end_ns is when the
 * last one completed. @deadline_ns 0: no limit. The events say the bytes are
 * there, not that they are right: a load that stopped opens them too, so
 * the caller asks the agent for the load's status afterwards.
 */
static int wait_events(aeg_job_t *job, const struct aeg_job_load *l, uint64_t deadline_ns, int bar,
		       uint64_t start_ns, uint64_t *end_ns)
{
	uint64_t done = 0, total = load_bytes(l);
	int err = 0;

	for (uint32_t i = 0; i < l->count; i++) {
		int ms = -1;

		if (deadline_ns) {
			uint64_t now = aeg_now_ns();

			ms = now >= deadline_ns ? 0 : (int)((deadline_ns - now + 999999) / 1000000);
		}
		err = aeg_event_wait_handle(aeg_job_device(job), &l->chunks[i].event, ms);
		if (err)
			break;
		done += l->chunks[i].size;
		if (bar)
			cli_progress(done, total, start_ns);
	}
	*end_ns = aeg_now_ns();
	if (bar)
		fputc('\n', stderr);
	return err;
}

/* The load's status once it has stopped loading, or AEG_ETIMEDOUT with it still loading. */
static int settle(aeg_job_t *job, uint64_t load_id, uint64_t deadline_ns, struct aeg_job_load **out)
{
	struct aeg_job_load *l;
	useconds_t us = 200;
	int err;

	for (;;) {
		err = aeg_job_chunks(job, load_id, NULL, 0, &l);
		if (err)
			return err;
		if (l->status != AEG_EBUSY || (deadline_ns && aeg_now_ns() >= deadline_ns)) {
			*out = l;
			return l->status == AEG_EBUSY ? AEG_ETIMEDOUT : 0;
		}
		aeg_job_load_free(l);
		usleep(us);
		us = us < 20000 ? us * 2 : 20000;
	}
}

/*
 * Wait for load @l to finish (events, then the agent's word). @l is replaced
 * by the settled load. Returns 0 (check (*l)->status), AEG_ETIMEDOUT, or an
 * error talking to the agent.
 */
static int wait_load(aeg_job_t *job, struct aeg_job_load **l, uint64_t deadline_ns, int bar,
		     uint64_t start_ns, uint64_t *end_ns)
{
	struct aeg_job_load *final = NULL;
	int err;

	err = wait_events(job, *l, deadline_ns, bar, start_ns, end_ns);
	if (err == AEG_ETIMEDOUT)
		return err;
	/* Events done, or one failed (host backend): the agent's status says what happened. */
	err = settle(job, (*l)->load_id, aeg_now_ns() + SETTLE_NS, &final);
	if (err && err != AEG_ETIMEDOUT)
		return err;
	aeg_job_load_free(*l);
	*l = final;
	return err;
}

static int load_failed(const struct aeg_job_load *l, const char *path)
{
	if (l->detail)
		fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s failed: %s (%s)\n", l->load_id, path,
			l->detail, aeg_errname(l->status));
	else
		fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s failed: %s (%s)\n", l->load_id, path,
			aeg_strerror(l->status), aeg_errname(l->status));
	return 1;
}

static int load_timed_out(const struct aeg_job_load *l, const char *path, double timeout_s)
{
	char a[32], b[32];

	fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s not complete after %g s (%s of %s)\n", l->load_id,
		path, timeout_s, aeg_size_format(l->done_bytes, a, sizeof(a)),
		aeg_size_format(l->file_bytes, b, sizeof(b)));
	return 1;
}

/* ----------------------------------------------------------- read-back */

struct verify_result {
	uint64_t bytes;
	uint64_t first, end;            /* file range the chunks cover */
	int contiguous;
	char sha256[65];
};

static int pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	size_t got = 0;

	while (got < len) {
		ssize_t r = pread(fd, (char *)buf + got, len - got, (off_t)(off + got));

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -ENODATA;
		got += (size_t)r;
	}
	return 0;
}

/*
 * Copy every chunk of settled load @l back from the job slab (as the step
 * sees it) and compare it with @path; the digest covers the loaded bytes in
 * file order, so for a raw file it is sha256sum's.
 */
static int verify_load(aeg_job_t *job, const struct aeg_job_load *l, const char *path, struct verify_result *r)
{
	struct cli_sha256 sha;
	unsigned char *gbuf = NULL, *fbuf = NULL;
	int fd, rc = 1;

	memset(r, 0, sizeof(*r));
	r->contiguous = 1;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "aegaeon-cli: verify: %s: %s\n", path, strerror(errno));
		return 1;
	}
	gbuf = malloc(VERIFY_PIECE);
	fbuf = malloc(VERIFY_PIECE);
	if (gbuf == NULL || fbuf == NULL) {
		fprintf(stderr, "aegaeon-cli: verify: out of memory\n");
		goto out;
	}
	cli_sha256_init(&sha);
	for (uint32_t i = 0; i < l->count; i++) {
		const struct aeg_job_chunk *c = &l->chunks[i];

		if (c->ptr == NULL) {
			fprintf(stderr, "aegaeon-cli: verify: job slab %d is not mapped in this process (not visible here?)\n",
				l->slab);
			goto out;
		}
		if (i == 0)
			r->first = c->file_offset;
		else if (c->file_offset != r->end)
			r->contiguous = 0;
		for (uint64_t off = 0; off < c->size; off += VERIFY_PIECE) {
			size_t n = c->size - off < VERIFY_PIECE ? (size_t)(c->size - off) : VERIFY_PIECE;
			int err = aeg_memcpy(aeg_job_device(job), gbuf, (char *)c->ptr + off, n);

			if (err) {
				cli_fail(err, "verify: copying a chunk back");
				goto out;
			}
			err = pread_full(fd, fbuf, n, c->file_offset + off);
			if (err) {
				fprintf(stderr, "aegaeon-cli: verify: %s: reading %zu bytes at %" PRIu64 ": %s\n", path, n,
					c->file_offset + off, err == -ENODATA ? "the file is shorter than the load (changed since?)"
									      : strerror(-err));
				goto out;
			}
			if (memcmp(gbuf, fbuf, n) != 0) {
				size_t k = 0;

				while (gbuf[k] == fbuf[k])
					k++;
				fprintf(stderr, "aegaeon-cli: verify: chunk %u (slab id %" PRIu64 ") differs from %s at file "
					"offset %" PRIu64 ": 0x%02x in the slab, 0x%02x in the file\n", i, c->slab_id, path,
					c->file_offset + off + k, gbuf[k], fbuf[k]);
				goto out;
			}
			cli_sha256_update(&sha, gbuf, n);
		}
		r->bytes += c->size;
		r->end = c->file_offset + c->size;
	}
	cli_sha256_hex(&sha, r->sha256);
	rc = 0;
out:
	free(gbuf);
	free(fbuf);
	close(fd);
	return rc;
}

static void print_verified(const struct aeg_job_load *l, const char *path, const struct verify_result *r)
{
	char a[32];

	printf("%s: verified %s in %u chunk%s of load %" PRIu64 " against the file: identical "
	       "(file bytes %" PRIu64 "..%" PRIu64 "%s, sha256 %s)\n", path, aeg_size_format(r->bytes, a, sizeof(a)),
	       l->count, cli_s(l->count), l->load_id, r->first, r->end, r->contiguous ? "" : ", with gaps", r->sha256);
}

static json_t *verified_json(const struct verify_result *r)
{
	return json_pack("{s:b, s:I, s:I, s:I, s:b, s:s}", "identical", 1, "bytes", (json_int_t)r->bytes,
			 "file_first", (json_int_t)r->first, "file_end", (json_int_t)r->end,
			 "contiguous", r->contiguous, "sha256", r->sha256);
}

/* -------------------------------------------------------------- listing */

static json_t *load_json(const struct aeg_job_load *l, const char *path)
{
	char hex[AEG_HANDLE_HEX_LEN + 1], state[128];
	json_t *o, *arr = json_array();

	for (uint32_t i = 0; i < l->count; i++) {
		const struct aeg_job_chunk *c = &l->chunks[i];

		aeg_handle_to_hex(&c->event, hex);
		json_array_append_new(arr, json_pack("{s:I, s:I, s:I, s:I, s:s}", "slab_id", (json_int_t)c->slab_id,
						     "slab_offset", (json_int_t)c->offset, "size", (json_int_t)c->size,
						     "file_offset", (json_int_t)c->file_offset, "event_handle", hex));
	}
	o = json_pack("{s:I, s:s, s:i, s:s, s:I, s:I, s:o}", "load_id", (json_int_t)l->load_id, "path", path,
		      "slab", l->slab, "state", cli_load_state(l->status, state, sizeof(state)),
		      "file_bytes", (json_int_t)l->file_bytes, "done_bytes", (json_int_t)l->done_bytes, "chunks", arr);
	return o;
}

static void print_load(const struct aeg_job_load *l, const char *path, int chunk_lines)
{
	char a[32], b[32], state[128], hex[AEG_HANDLE_HEX_LEN + 1];

	printf("load %" PRIu64 ": %s -> slab %d, %s, %s of %s, %u chunk%s\n", l->load_id, path, l->slab,
	       cli_load_state(l->status, state, sizeof(state)), aeg_size_format(l->done_bytes, a, sizeof(a)),
	       aeg_size_format(l->file_bytes, b, sizeof(b)), l->count, cli_s(l->count));
	if (!chunk_lines)
		return;
	printf("%6s %10s %14s %12s %14s  %s\n", "chunk", "slab_id", "slab_offset", "size", "file_offset", "event");
	for (uint32_t i = 0; i < l->count; i++) {
		const struct aeg_job_chunk *c = &l->chunks[i];

		aeg_handle_to_hex(&c->event, hex);
		printf("%6u %10" PRIu64 " %14" PRIu64 " %12" PRIu64 " %14" PRIu64 "  %s\n", i, c->slab_id, c->offset,
		       c->size, c->file_offset, hex);
	}
}

/* ------------------------------------------------------------- prefetch */

/*
 * Steps of a job that prefetch the same file at the same moment (every rank
 * of an MPI job, say) must not each load it: the look-up and the request go
 * under a lock in the job's per-node directory. -1 when there is none.
 */
static int lock_job_dir(void)
{
	const char *dir = getenv("AEGAEON_JOB_DIR");
	char path[PATH_MAX];
	int fd;

	if (dir == NULL || *dir != '/' || snprintf(path, sizeof(path), "%s/prefetch.lock", dir) >= (int)sizeof(path))
		return -1;
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return -1;
	while (flock(fd, LOCK_EX) < 0) {
		if (errno != EINTR) {
			close(fd);
			return -1;
		}
	}
	return fd;
}

int cli_job_prefetch(const struct cli_job_prefetch *a)
{
	struct aeg_job_load *l = NULL;
	struct verify_result vr;
	char path[PATH_MAX], size[32];
	aeg_job_t *job;
	uint64_t t0, end_ns = 0;
	int index, reused = 0, lock = -1, rc, err;

	if (realpath(a->file, path) == NULL) {
		fprintf(stderr, "aegaeon-cli: %s: %s\n", a->file, strerror(errno));
		return 1;
	}
	rc = job_open(a->verify, &job, "prefetch");
	if (rc)
		return rc;
	rc = slab_index(job, a->gpu, &index);
	if (rc)
		goto out;
	t0 = aeg_now_ns();
	if (!a->reload) {
		/* The job's --aegaeon-prefetch or an earlier step may have it already. */
		lock = lock_job_dir();
		err = aeg_job_chunks(job, 0, path, index, &l);
		if (err == 0 && l->status != 0 && l->status != AEG_EBUSY) {
			fprintf(stderr, "aegaeon-cli: %s: load %" PRIu64 " failed (%s); loading it again\n", path,
				l->load_id, aeg_strerror(l->status));
			aeg_job_load_free(l);
			l = NULL;
		} else if (err == AEG_ESTALE) {
			fprintf(stderr, "aegaeon-cli: %s; loading it again (the old chunks stay until released)\n",
				aeg_error_detail());
		} else if (err && err != AEG_ENOENT) {
			rc = cli_fail(err, path);
			goto out;
		}
		reused = l != NULL;
	}
	if (l == NULL) {
		err = aeg_job_prefetch(job, path, index, a->chunk_bytes, &l);
		if (err) {
			rc = cli_fail(err, a->file);
			goto out;
		}
	}
	if (lock >= 0) {
		close(lock);
		lock = -1;
	}
	if (!a->wait) {
		if (a->json) {
			json_t *o = load_json(l, path);

			if (o)
				json_object_set_new(o, "reused", json_boolean(reused));
			rc = cli_json_print(o);
		} else {
			if (reused)
				printf("%s: already in the job's slab (load %" PRIu64 "): reused, nothing loaded\n", path,
				       l->load_id);
			print_load(l, path, 1);
		}
		goto out;
	}
	err = wait_load(job, &l, 0, !a->json && isatty(STDERR_FILENO), t0, &end_ns);
	if (err) {
		rc = err == AEG_ETIMEDOUT ? load_timed_out(l, path, seconds(SETTLE_NS)) : cli_fail(err, path);
		goto out;
	}
	if (l->status) {
		rc = load_failed(l, path);
		goto out;
	}
	if (a->verify && verify_load(job, l, path, &vr)) {
		rc = 1;
		goto out;
	}
	if (a->json) {
		json_t *o = load_json(l, path);

		if (o) {
			json_object_set_new(o, "reused", json_boolean(reused));
			json_object_set_new(o, "seconds", json_real(seconds(end_ns - t0)));
			if (!reused)
				json_object_set_new(o, "gbps", json_real((double)l->file_bytes / (double)(end_ns - t0)));
			if (a->verify)
				json_object_set_new(o, "verified", verified_json(&vr));
		}
		rc = cli_json_print(o);
		goto out;
	}
	if (reused)
		printf("%s: already in the job's slab (load %" PRIu64 ", %s in %u chunk%s): reused, nothing loaded"
		       "%s\n", path, l->load_id, aeg_size_format(l->file_bytes, size, sizeof(size)), l->count,
		       cli_s(l->count), end_ns - t0 > 1000000 ? "; waited for it to finish" : "");
	else
		printf("%s: %s in %.3f s, %.2f GB/s through the job's agent (load %" PRIu64 ", %u chunk%s in slab %d)\n",
		       path, aeg_size_format(l->file_bytes, size, sizeof(size)), seconds(end_ns - t0),
		       (double)l->file_bytes / (double)(end_ns - t0), l->load_id, l->count, cli_s(l->count), index);
	if (a->verify)
		print_verified(l, path, &vr);
out:
	if (lock >= 0)
		close(lock);
	aeg_job_load_free(l);
	aeg_job_detach(job);
	return rc;
}

/* ----------------------------------------------------------------- wait */

static int parse_load_id(const char *text, uint64_t *id)
{
	char *end;

	if (text[0] < '0' || text[0] > '9')
		return -1;
	errno = 0;
	*id = strtoull(text, &end, 10);
	return errno || *end || *id == 0 ? -1 : 0;
}

/* Find the load named by @what: a load id, or the newest load of a file in any slab. */
static int find_load(aeg_job_t *job, const char *what, char *path, size_t len, struct aeg_job_load **l)
{
	struct aeg_job_info info;
	uint64_t id;
	int err = AEG_ENOENT;

	if (parse_load_id(what, &id) == 0) {
		err = aeg_job_chunks(job, id, NULL, 0, l);
		if (err)
			return cli_fail(err, what);
		load_path(job, id, path, len);
		return 0;
	}
	if (realpath(what, path) == NULL) {
		fprintf(stderr, "aegaeon-cli: %s: %s\n", what, strerror(errno));
		return 1;
	}
	aeg_job_get_info(job, &info);
	for (int i = 0; i < info.slabs; i++) {
		err = aeg_job_chunks(job, 0, path, i, l);
		if (err != AEG_ENOENT)
			break;
	}
	if (err == AEG_ENOENT)
		fprintf(stderr, "aegaeon-cli: %s is not loaded in this job on this node (aegaeon-cli status lists the loads)\n",
			path);
	else if (err)
		cli_fail(err, path);
	return err ? 1 : 0;
}

int cli_job_wait(const char *what, double timeout_s)
{
	struct aeg_job_load *l = NULL;
	char path[PATH_MAX], size[32];
	aeg_job_t *job;
	uint64_t t0 = aeg_now_ns(), end_ns, deadline = 0;
	int rc, err;

	rc = job_open(0, &job, "wait");
	if (rc)
		return rc;
	rc = find_load(job, what, path, sizeof(path), &l);
	if (rc)
		goto out;
	if (timeout_s >= 0)
		deadline = t0 + (uint64_t)(timeout_s * 1e9);
	err = wait_load(job, &l, deadline, isatty(STDERR_FILENO), t0, &end_ns);
	if (err == AEG_ETIMEDOUT) {
		rc = load_timed_out(l, path, timeout_s);
		goto out;
	}
	if (err) {
		rc = cli_fail(err, what);
		goto out;
	}
	if (l->status) {
		rc = load_failed(l, path);
		goto out;
	}
	printf("load %" PRIu64 ": %s loaded, %s in %u chunk%s (waited %.3f s)\n", l->load_id, path,
	       aeg_size_format(l->file_bytes, size, sizeof(size)), l->count, cli_s(l->count),
	       seconds(end_ns - t0));
out:
	aeg_job_load_free(l);
	aeg_job_detach(job);
	return rc;
}

/* -------------------------------------------------------------- release */

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;

	return a < b ? -1 : a > b;
}

int cli_job_release(const struct cli_job_release *r)
{
	struct aeg_job_load *l = NULL;
	uint64_t *ids = NULL;
	const uint64_t *use = r->ids;
	size_t n = r->count;
	uint32_t released = 0;
	aeg_job_t *job;
	int index = 0, rc, err;

	rc = job_open(0, &job, "release");
	if (rc)
		return rc;
	if (r->all) {
		err = aeg_job_release_all(job, &released);
		if (err) {
			rc = cli_fail(err, "release --all");
			goto out;
		}
		printf("released %u block%s: every load of the job on this node\n", released, released == 1 ? "" : "s");
		goto out;
	}
	if (r->load_id) {
		err = aeg_job_chunks(job, r->load_id, NULL, 0, &l);
		if (err) {
			rc = cli_fail(err, "release --load");
			goto out;
		}
		if (l->status == AEG_EBUSY) {
			fprintf(stderr, "aegaeon-cli: release: load %" PRIu64 " is still loading: wait for it "
				"(aegaeon-cli wait %" PRIu64 "), or stop and release everything with --all\n",
				r->load_id, r->load_id);
			rc = 1;
			goto out;
		}
		/* A tensor larger than a chunk is one block cut into several chunks. */
		ids = calloc(l->count ? l->count : 1, sizeof(*ids));
		if (ids == NULL) {
			rc = cli_fail(AEG_ENOMEM, "release");
			goto out;
		}
		for (uint32_t i = 0; i < l->count; i++)
			ids[i] = l->chunks[i].slab_id;
		qsort(ids, l->count, sizeof(*ids), cmp_u64);
		n = 0;
		for (uint32_t i = 0; i < l->count; i++)
			if (n == 0 || ids[n - 1] != ids[i])
				ids[n++] = ids[i];
		use = ids;
		index = l->slab;
	} else {
		rc = slab_index(job, r->gpu, &index);
		if (rc)
			goto out;
	}
	/* The agent takes PROTO_RELEASE_MAX ids a request: a larger load goes in parts. */
	for (size_t done = 0; done < n;) {
		size_t part = n - done < PROTO_RELEASE_MAX || !r->load_id ? n - done : PROTO_RELEASE_MAX;
		uint32_t got = 0;

		err = aeg_job_release(job, index, use + done, part, &got);
		if (err) {
			rc = cli_fail(err, "release");
			if (released)
				fprintf(stderr, "aegaeon-cli: release: %u block%s released before that\n", released,
					released == 1 ? " was" : "s were");
			goto out;
		}
		released += got;
		done += part;
	}
	if (r->load_id)
		printf("released load %" PRIu64 ": %u block%s\n", r->load_id, released, released == 1 ? "" : "s");
	else
		printf("released %u block%s from slab %d\n", released, released == 1 ? "" : "s", index);
out:
	free(ids);
	aeg_job_load_free(l);
	aeg_job_detach(job);
	return rc;
}

/* --------------------------------------------------------------- chunks */

/* Wait for @l, then verify it; prints the result. */
static int wait_and_verify(aeg_job_t *job, struct aeg_job_load **l, const char *path, uint64_t deadline,
			   double timeout_s, json_t *o)
{
	struct verify_result vr;
	uint64_t end_ns;
	int err;

	err = wait_load(job, l, deadline, 0, aeg_now_ns(), &end_ns);
	if (err == AEG_ETIMEDOUT)
		return load_timed_out(*l, path, timeout_s);
	if (err)
		return cli_fail(err, path);
	if ((*l)->status)
		return load_failed(*l, path);
	if (verify_load(job, *l, path, &vr))
		return 1;
	if (o)
		json_object_set_new(o, "verified", verified_json(&vr));
	else
		print_verified(*l, path, &vr);
	return 0;
}

static int list_loads(aeg_job_t *job, int json, int verify, uint64_t deadline, double timeout_s)
{
	struct aeg_job_status *st;
	json_t *arr = NULL;
	int rc = 0, err;

	err = aeg_job_status(job, &st);
	if (err)
		return cli_fail(err, "chunks");
	if (json)
		arr = json_array();
	if (!json && st->loads == 0)
		printf("no loads in this job on this node\n");
	for (uint32_t i = 0; i < st->loads && rc == 0; i++) {
		struct aeg_job_load *l;
		json_t *o = NULL;

		err = aeg_job_chunks(job, st->load[i].load_id, NULL, 0, &l);
		if (err == AEG_ENOENT)
			continue;       /* released meanwhile */
		if (err) {
			rc = cli_fail(err, "chunks");
			break;
		}
		if (json) {
			o = load_json(l, st->load[i].path);
			json_array_append_new(arr, o);
		} else {
			print_load(l, st->load[i].path, 0);
		}
		if (verify)
			rc = wait_and_verify(job, &l, st->load[i].path, deadline, timeout_s, o);
		aeg_job_load_free(l);
	}
	aeg_job_status_free(st);
	if (json && rc == 0)
		return cli_json_print(json_pack("{s:o}", "loads", arr));
	json_decref(arr);
	return rc;
}

static const char chunks_usage[] =
	"Usage: aegaeon-cli chunks [FILE | --load ID] [--gpu N] [--json] [--verify [--timeout S]]\n"
	"Inside a job: the loads the node's agent holds, or the chunks of one (the newest load\n"
	"of FILE into the slab of --gpu, default the first). --verify waits for the chunks,\n"
	"reads them back from the job slab and compares them with the file.\n";

int cli_chunks(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "load", required_argument, NULL, 'l' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "json", no_argument, NULL, 'j' },
		{ "verify", no_argument, NULL, 'v' },
		{ "timeout", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct aeg_job_load *l = NULL;
	char path[PATH_MAX];
	const char *file = NULL;
	uint64_t load_id = 0, deadline = 0;
	double timeout_s = -1;
	aeg_job_t *job;
	int gpu = -1, json = 0, verify = 0, index, c, rc, err;
	json_t *o = NULL;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'l':
			if (parse_load_id(optarg, &load_id))
				return cli_usage_error("chunks", "--load '%s': expected a load id (1, 2, ...)", optarg);
			break;
		case 'g':
			if (cli_parse_int(optarg, 0, 1023, &gpu))
				return cli_usage_error("chunks", "--gpu '%s': expected a GPU index", optarg);
			break;
		case 'j':
			json = 1;
			break;
		case 'v':
			verify = 1;
			break;
		case 't':
			if (cli_parse_seconds(optarg, &timeout_s))
				return cli_usage_error("chunks", "--timeout '%s': expected seconds >= 0", optarg);
			break;
		case 'h':
			fputs(chunks_usage, stdout);
			return 0;
		default:
			return cli_usage_error("chunks", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc - 1)
		return cli_usage_error("chunks", "expected at most one FILE");
	if (optind == argc - 1)
		file = argv[optind];
	if (file && load_id)
		return cli_usage_error("chunks", "give FILE or --load, not both");
	if (!cli_in_job()) {
		fprintf(stderr, "aegaeon-cli chunks: not in an aegaeon job (AEGAEON_SOCKET is unset): only a job's agent "
			"keeps chunks after a command ends\n");
		return 1;
	}
	if (timeout_s >= 0)
		deadline = aeg_now_ns() + (uint64_t)(timeout_s * 1e9);
	rc = job_open(verify, &job, "chunks");
	if (rc)
		return rc;
	if (file == NULL && load_id == 0) {
		rc = list_loads(job, json, verify, deadline, timeout_s);
		goto out;
	}
	if (load_id) {
		err = aeg_job_chunks(job, load_id, NULL, 0, &l);
		if (err) {
			rc = cli_fail(err, "chunks");
			goto out;
		}
		load_path(job, load_id, path, sizeof(path));
	} else {
		if (realpath(file, path) == NULL) {
			fprintf(stderr, "aegaeon-cli: %s: %s\n", file, strerror(errno));
			rc = 1;
			goto out;
		}
		rc = slab_index(job, gpu, &index);
		if (rc)
			goto out;
		err = aeg_job_chunks(job, 0, path, index, &l);
		if (err) {
			rc = cli_fail(err, file);
			goto out;
		}
	}
	if (json)
		o = load_json(l, path);
	else
		print_load(l, path, !verify);
	if (verify)
		rc = wait_and_verify(job, &l, path, deadline, timeout_s, o);
	if (json) {
		if (rc == 0)
			rc = cli_json_print(o);
		else
			json_decref(o);
	}
out:
	aeg_job_load_free(l);
	aeg_job_detach(job);
	return rc;
}

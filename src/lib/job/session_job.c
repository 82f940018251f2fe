/* Sessions inside a job: loads through the job's agent, read back as models (their chunks, tensors and blocks). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/session.h>

#include "internal.h"
#include "safetensors.h"
#include "session_internal.h"

#define JOB_LOCK_WAIT_MS 5000        /* a step holding the job's prefetch lock longer is stopped */

/* JOB: the GPU of job slab @index as this process numbers GPUs, -1 when not visible. */
static int job_gpu(aeg_session_t *s, int index)
{
	struct aeg_job_slab_desc d;

	return aeg_job_slab_describe(s->job, index, &d) == 0 ? d.gpu : -1;
}

static int named_safetensors(const char *path)
{
	size_t n = strlen(path);

	return n >= 12 && strcmp(path + n - 12, ".safetensors") == 0;
}

/* The chunk holding byte @at (@keys: where each starts, ascending), or -1. */
static long chunk_at(const struct aeg_model *m, const uint64_t *keys, uint64_t at)
{
	uint32_t lo = 0, hi = m->nchunks;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;

		if (keys[mid] + m->chunks[mid].size <= at)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < m->nchunks && keys[lo] <= at)
		return (long)lo;
	return -1;
}

/* JOB: the agent's chunk list as engine chunks. */
static int job_chunks_copy(struct aeg_model *m)
{
	const struct aeg_job_load *jl = m->jl;

	m->id = jl->load_id;
	m->slab = jl->slab;
	m->chunks = calloc(jl->count ? jl->count : 1, sizeof(*m->chunks));
	if (m->chunks == NULL)
		return aeg_fail(AEG_ENOMEM, "model of %u chunks: out of memory", jl->count);
	m->nchunks = jl->count;
	for (uint32_t i = 0; i < jl->count; i++) {
		m->chunks[i].device_ptr = jl->chunks[i].ptr;
		m->chunks[i].size = jl->chunks[i].size;
		m->chunks[i].event = jl->chunks[i].event;
		m->chunks[i].slab_id = jl->chunks[i].slab_id;
		m->chunks[i].slab_offset = jl->chunks[i].offset;
		m->chunks[i].file_offset = jl->chunks[i].file_offset;
	}
	m->settled = jl->status == 0;
	return 0;
}

/*
 * JOB: the header, read here too, by the agent's rule (a file named
 * *.safetensors or a slice: strictly), and strictly too where the caller
 * asked for safetensors (every shard of an index), which the agent is not
 * told: it loaded such a file for raw bytes. A slice's plan from it.
 */
static int job_read_header(struct aeg_model *m, enum aeg_prefetch_format format)
{
	uint64_t bytes = 0;
	struct stat st;
	int fd, err;

	fd = open(m->path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s: %s", m->path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		err = aeg_fail(AEG_EIO, "%s: %s", m->path, strerror(errno));
	} else {
		err = aeg_st_detect(fd, (uint64_t)st.st_size, format == AEG_FORMAT_SAFETENSORS ||
				    named_safetensors(m->path) || m->jl->slice != NULL, &m->hdr);
		if (err < 0)
			aeg_error_prefix("%s", m->path);        /* as a local load's error names its file */
	}
	close(fd);
	if (err <= 0 || m->jl->slice == NULL)
		return err;
	err = slice_plan_make(m->jl->slice, &m->hdr, m->path, &m->plan);
	for (uint32_t i = 0; err == 0 && i < m->nchunks; i++)
		bytes += m->chunks[i].size;
	if (err == 0 && bytes != m->plan.out_end - m->plan.out_begin)
		err = aeg_fail(AEG_ESTALE, "%s: the agent's slice holds %" PRIu64 " bytes, this file's %" PRIu64
			       " (the file changed?)", m->path, bytes, m->plan.out_end - m->plan.out_begin);
	return err ? err : 1;
}

/* JOB: tensor @i placed in the chunks (@keys: where each starts). */
static int job_place_tensor(struct aeg_model *m, const uint64_t *keys, size_t i)
{
	const struct aeg_st_tensor *t = &m->hdr.tensors[i];
	const struct slice_span *sp = m->plan.spec ? &m->plan.spans[i] : NULL;
	struct aeg_tensor *o = &m->tensors[i];
	uint64_t at = sp ? sp->out : m->hdr.data_offset + t->begin;
	long c = chunk_at(m, keys, at), last;
	char q[AEG_NAME_SHOWN];

	o->name = t->name;
	o->dtype = t->dtype;
	o->ndim = t->ndim;
	o->shape = sp ? sp->shape : t->shape;
	o->size = sp ? sp->bytes : t->end - t->begin;
	o->file_offset = sp ? sp->src : at;
	o->slice_dim = sp ? sp->dim : AEG_SLICE_WHOLE;
	o->slice_start = sp ? sp->start : 0;
	o->slice_extent = sp ? sp->extent : 0;
	if (c < 0 && o->size > 0)
		return aeg_fail(AEG_ESTALE, "%s: tensor \"%s\" at byte %" PRIu64 " is in no chunk the agent loaded (the file changed?)",
				m->path, aeg_quote(t->name, q, sizeof(q)), o->file_offset);
	if (c < 0)
		c = m->nchunks ? (long)m->nchunks - 1 : 0;
	last = o->size ? chunk_at(m, keys, at + o->size - 1) : c;
	if (last < c)
		return aeg_fail(AEG_ESTALE, "%s: tensor \"%s\" ends in no chunk the agent loaded (the file changed?)",
				m->path, aeg_quote(t->name, q, sizeof(q)));
	o->first_chunk = (uint32_t)c;
	o->chunks = o->size ? (uint32_t)(last - c + 1) : 0;
	if (c < (long)m->nchunks && m->chunks[c].device_ptr != NULL)
		o->device_ptr = (char *)m->chunks[c].device_ptr + (at - keys[c]);
	return 0;
}

/*
 * JOB: the load completed, then some of its chunks were released: the agent
 * counts in done_bytes only the bytes a load still holds.
 */
static int job_partly_released(const struct aeg_job_load *jl)
{
	return jl->status == 0 && jl->done_bytes < jl->file_bytes;
}

/*
 * JOB: the agent's chunk list as engine chunks, and the tensors placed in
 * them; a partly released load (found by id, to list or release it) has
 * its chunks only: its tensors are no longer all there.
 */
static int job_model_fill(struct aeg_model *m, enum aeg_prefetch_format format)
{
	uint64_t *keys;
	int err;

	err = job_chunks_copy(m);
	if (err || format == AEG_FORMAT_RAW || job_partly_released(m->jl))
		return err;
	err = job_read_header(m, format);
	if (err <= 0)
		return err;
	m->tensors = calloc(m->hdr.count ? m->hdr.count : 1, sizeof(*m->tensors));
	keys = malloc((m->nchunks ? m->nchunks : 1) * sizeof(*keys));
	if (m->tensors == NULL || keys == NULL) {
		free(keys);
		return aeg_fail(AEG_ENOMEM, "tensor table of %zu tensors: out of memory", m->hdr.count);
	}
	/* A sliced load's chunks start where packed bytes of the parts do. */
	for (uint32_t i = 0; i < m->nchunks; i++)
		keys[i] = m->plan.spec ? slice_out_of(&m->plan, m->chunks[i].file_offset) : m->chunks[i].file_offset;
	err = 0;
	for (size_t i = 0; i < m->hdr.count && err == 0; i++)
		err = job_place_tensor(m, keys, i);
	free(keys);
	if (err == 0)
		m->ntensors = (uint32_t)m->hdr.count;
	return err;
}

/* JOB: remember the blocks of a load this session started (release_all frees them). */
static void own_blocks(aeg_session_t *s, const struct aeg_model *m)
{
	struct idset *set = &s->owned[m->slab];

	for (uint32_t i = 0; i < m->nchunks; i++) {
		if (i > 0 && m->chunks[i].slab_id == m->chunks[i - 1].slab_id)
			continue;
		if (set->n == set->cap) {
			size_t cap = set->cap ? 2 * set->cap : 64;
			struct owned_block *b = realloc(set->b, cap * sizeof(*b));

			if (b == NULL) {
				aeg_warn("session: out of memory remembering the blocks of load %" PRIu64
					 "; release_all will not free them", m->id);
				return;
			}
			set->b = b;
			set->cap = cap;
		}
		set->b[set->n++] = (struct owned_block){ m->chunks[i].slab_id, m->id };
	}
}

/*
 * Steps of a job that load the same file at the same moment (every rank of
 * an MPI job, say) must not each load it: the look-up and the request go
 * under a lock in the job's per-node directory. -1 when there is none, with
 * a warning when $AEGAEON_JOB_DIR names no usable directory, or when another
 * process held the lock for JOB_LOCK_WAIT_MS (a stopped step holds it for as
 * long as it is stopped): the load then goes on without it, and at worst
 * the file is loaded twice.
 */
static int lock_job_dir(void)
{
	const char *dir = getenv("AEGAEON_JOB_DIR");
	char path[PATH_MAX], q[128];
	uint64_t deadline;
	int fd;

	if (dir == NULL || *dir == '\0')
		return -1;
	if (*dir != '/' || snprintf(path, sizeof(path), "%s/prefetch.lock", dir) >= (int)sizeof(path)) {
		aeg_warn("AEGAEON_JOB_DIR='%s' is not an absolute path of a directory; prefetching without the job's lock",
			 aeg_quote(dir, q, sizeof(q)));
		return -1;
	}
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		aeg_warn("%s: %s; prefetching without the job's lock", aeg_quote(path, q, sizeof(q)), strerror(errno));
		return -1;
	}
	deadline = aeg_now_ns() + JOB_LOCK_WAIT_MS * 1000000ull;
	while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if (errno == EINTR)
			continue;
		if (errno != EWOULDBLOCK)
			aeg_warn("%s: %s; prefetching without the job's lock", aeg_quote(path, q, sizeof(q)),
				 strerror(errno));
		else if (aeg_now_ns() >= deadline)
			aeg_warn("%s: held by another process for %d s; prefetching without the job's lock",
				 aeg_quote(path, q, sizeof(q)), JOB_LOCK_WAIT_MS / 1000);
		else {
			usleep(10000);
			continue;
		}
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * JOB, REUSE: the job's resident load of @path in slab @index with @slice,
 * or 0 with *@jl NULL when there is none to reuse.
 */
static int job_reusable(aeg_session_t *s, const char *path, int index, const struct aeg_slice *slice,
			struct aeg_job_load **jl)
{
	int err = aeg_job_chunks_slice(s->job, path, index, slice, jl);

	if (err == 0 && (*jl)->status != 0 && (*jl)->status != AEG_EBUSY) {
		aeg_warn("%s: load %" PRIu64 " failed (%s); loading it again", path, (*jl)->load_id,
			 aeg_strerror((*jl)->status));
		aeg_job_load_free(*jl);
		*jl = NULL;
		return 0;
	}
	/* The agent finds no such load by path; an agent of before that rule is not trusted with it either. */
	if (err == 0 && job_partly_released(*jl)) {
		aeg_warn("%s: some chunks of load %" PRIu64 " were released; loading it again", path, (*jl)->load_id);
		aeg_job_load_free(*jl);
		*jl = NULL;
		return 0;
	}
	if (err == AEG_ESTALE)
		aeg_warn("%s; loading it again (the old chunks stay until released)", aeg_error_detail());
	if (err == AEG_ENOENT || err == AEG_ESTALE) {
		aeg_error_clear();
		*jl = NULL;
		return 0;
	}
	return err;
}

/*
 * JOB: give the agent back the load it started for @m, which failed here
 * (its file is not what this request reads: the agent took a file whose
 * header is not safetensors for raw bytes). The agent cannot cancel for a
 * client, so this waits for the load first. Returns @err with its detail.
 */
static int give_back(struct aeg_model *m, int err)
{
	char why[1024];

	snprintf(why, sizeof(why), "%s", aeg_error_detail());
	m->id = m->jl->load_id;
	if (model_release_chunks(m))
		aeg_warn("%s: load %" PRIu64 " stays in the job's slab (%s): aegaeon-cli release --load %" PRIu64
			 " frees it", m->path, m->id, aeg_error_detail(), m->id);
	return aeg_fail(err, "%s", why);
}

int session_job_load(aeg_session_t *s, const struct aeg_load_request *req, aeg_model_t **out)
{
	struct aeg_model *m;
	int err, index, lock = -1;
	uint64_t t;

	err = session_job_slab(s, req->gpu, &index);
	if (err)
		return err;
	m = model_new(s, req->path, req->gpu, 1);
	if (m == NULL)
		return AEG_ENOMEM;
	t = aeg_now_ns();
	if (req->flags & AEG_LOAD_REUSE) {
		lock = lock_job_dir();
		err = job_reusable(s, m->path, index, req->slice, &m->jl);
	}
	m->owned = m->jl == NULL;
	if (err == 0 && m->owned)
		err = aeg_job_prefetch_slice(s->job, m->path, index, req->chunk_bytes, req->slice, &m->jl);
	if (lock >= 0)
		close(lock);
	if (err == 0) {
		aeg_span_end(m->owned ? "job prefetch" : "job find", t);
		err = job_model_fill(m, req->format);
		/* The agent's load is no one's but ours yet: release_all would not free it. */
		if (err && m->owned)
			err = give_back(m, err);
	}
	if (err) {
		model_free(m);
		return err;
	}
	m->gpu = job_gpu(s, m->slab);
	if (m->owned) {
		pthread_mutex_lock(&s->lock);
		own_blocks(s, m);
		pthread_mutex_unlock(&s->lock);
	}
	*out = m;
	return 0;
}

/* JOB: the path of load @id, from the agent's status. */
static int job_load_path(aeg_session_t *s, uint64_t id, char *path, size_t len)
{
	struct aeg_job_status *st;
	int err;

	err = aeg_job_status(s->job, &st);
	if (err)
		return err;
	err = aeg_fail(AEG_ENOENT, "no load %" PRIu64 " (released, or never made)", id);
	for (uint32_t i = 0; i < st->loads; i++) {
		if (st->load[i].load_id == id) {
			snprintf(path, len, "%s", st->load[i].path);
			aeg_error_clear();
			err = 0;
		}
	}
	aeg_job_status_free(st);
	return err;
}

/*
 * JOB: load @id, or the newest load of @path on @gpu (-1: in the first of
 * the job's slabs holding one), as the agent has it.
 */
int session_job_find(aeg_session_t *s, uint64_t id, const char *path, int gpu, aeg_model_t **out)
{
	struct aeg_model *m;
	int err = 0, index = 0;

	if (id == 0 && gpu >= 0)
		err = session_job_slab(s, gpu, &index);
	if (err)
		return err;
	m = model_new(s, path, gpu, 0);
	if (m == NULL)
		return AEG_ENOMEM;
	if (id == 0 && gpu < 0) {
		err = AEG_ENOENT;
		for (index = 0; index < s->ngpus && err == AEG_ENOENT; index++)
			err = aeg_job_chunks(s->job, 0, m->path, index, &m->jl);
		if (err == AEG_ENOENT)
			err = aeg_fail(AEG_ENOENT, "%s is not loaded in any of the job's %d slab%s", m->path, s->ngpus,
				       s->ngpus == 1 ? "" : "s");
	} else {
		err = aeg_job_chunks(s->job, id, id ? NULL : m->path, index, &m->jl);
	}
	if (err == 0 && id != 0)
		err = job_load_path(s, id, m->path, sizeof(m->path));
	if (err == 0) {
		err = job_model_fill(m, AEG_FORMAT_AUTO);
		m->gpu = job_gpu(s, m->slab);
	}
	if (err) {
		model_free(m);
		return err;
	}
	*out = m;
	return 0;
}

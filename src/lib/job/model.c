/* Models: what a session's loads look like to their callers, one file or several (a directory, a shard index). */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/event.h>
#include <aegaeon/session.h>

#include "internal.h"
#include "session_internal.h"

struct aeg_model *model_new(aeg_session_t *s, const char *path, int gpu, int owned)
{
	struct aeg_model *m = calloc(1, sizeof(*m));

	if (m == NULL) {
		aeg_fail(AEG_ENOMEM, "model: out of memory");
		return NULL;
	}
	m->s = s;
	m->gpu = gpu;
	m->slab = -1;
	m->owned = owned;
	snprintf(m->path, sizeof(m->path), "%s", path ? path : "");
	/* The agent's working directory is not ours: name files by absolute paths. */
	if (path != NULL && path[0] != '\0' && realpath(path, m->path) == NULL)
		snprintf(m->path, sizeof(m->path), "%s", path);
	return m;
}

/* Put @m on the session's list; lock held. */
void model_link(struct aeg_model *m)
{
	aeg_session_t *s = m->s;

	m->next = s->models;
	if (s->models)
		s->models->prev = m;
	s->models = m;
}

void model_unlink(struct aeg_model *m)
{
	aeg_session_t *s = m->s;

	if (m->prev)
		m->prev->next = m->next;
	else if (s->models == m)
		s->models = m->next;
	if (m->next)
		m->next->prev = m->prev;
	m->prev = m->next = NULL;
}

void model_free(struct aeg_model *m)
{
	if (m == NULL)
		return;
	for (uint32_t i = 0; i < m->nparts; i++)
		model_free(m->parts[i]);
	free(m->parts);
	if (m->load)
		aeg_load_close(m->load);
	aeg_job_load_free(m->jl);
	free(m->chunks);
	free(m->tensors);
	slice_plan_free(&m->plan);
	aeg_st_free(&m->hdr);
	free(m);
}

/* The chunks and tensors of a one-file model, as its caller sees them. */
static const struct aeg_chunk *part_chunks(const struct aeg_model *m, uint32_t *count)
{
	if (m->load)
		return aeg_load_chunks(m->load, count);
	*count = m->nchunks;
	return m->chunks;
}

static const struct aeg_tensor *part_tensors(const struct aeg_model *m, uint32_t *count)
{
	if (m->load)
		return aeg_load_tensors(m->load, count);
	*count = m->ntensors;
	return m->tensors;
}

int model_compose(aeg_session_t *s, const char *path, struct aeg_model **parts, uint32_t nparts,
		  struct aeg_model **out)
{
	struct aeg_model *m = model_new(s, path, parts[0]->gpu, parts[0]->owned);
	uint64_t nc = 0, nt = 0;
	int err = AEG_ENOMEM;
	char why[1024];

	if (m == NULL)
		goto fail;
	m->parts = parts;
	m->nparts = nparts;
	m->id = parts[0]->id;
	m->slab = parts[0]->slab;
	for (uint32_t i = 0; i < nparts; i++) {
		uint32_t c, t;

		m->owned |= parts[i]->owned;    /* some files found resident, others loaded: owned */

		part_chunks(parts[i], &c);
		part_tensors(parts[i], &t);
		nc += c;
		nt += t;
	}
	if (nc > UINT32_MAX || nt > UINT32_MAX) {
		err = aeg_fail(AEG_EINVAL, "%s: %" PRIu64 " chunks and %" PRIu64 " tensors in its files: too many", path, nc, nt);
		goto fail_model;
	}
	m->chunks = calloc(nc ? nc : 1, sizeof(*m->chunks));
	m->tensors = calloc(nt ? nt : 1, sizeof(*m->tensors));
	if (m->chunks == NULL || m->tensors == NULL) {
		aeg_fail(AEG_ENOMEM, "%s: out of memory for %" PRIu64 " chunks", path, nc);
		goto fail_model;
	}
	/* Each file's chunks and tensors in turn; a tensor's first chunk counts from the model's first. */
	for (uint32_t i = 0; i < nparts; i++) {
		const struct aeg_chunk *c;
		const struct aeg_tensor *t;
		uint32_t cn, tn, base = m->nchunks;

		c = part_chunks(parts[i], &cn);
		t = part_tensors(parts[i], &tn);
		for (uint32_t k = 0; k < cn; k++) {
			m->chunks[m->nchunks] = c[k];
			m->chunks[m->nchunks++].file = i;
		}
		for (uint32_t k = 0; k < tn; k++) {
			m->tensors[m->ntensors] = t[k];
			m->tensors[m->ntensors].file = i;
			m->tensors[m->ntensors++].first_chunk += base;
		}
	}
	*out = m;
	return 0;
fail_model:
	m->parts = NULL;
	m->nparts = 0;
	model_free(m);
fail:
	/* The loads started for the model go with it, as when one of them fails (files found resident stay). */
	snprintf(why, sizeof(why), "%s", aeg_error_detail());
	for (uint32_t i = 0; i < nparts; i++) {
		if (parts[i]->owned)
			model_release_chunks(parts[i]);
		model_free(parts[i]);
	}
	free(parts);
	return aeg_fail(err, "%s", why);
}

/* ----------------------------------------------------------- accessors */

AEG_EXPORT uint64_t aeg_model_id(const aeg_model_t *m)
{
	return m ? m->id : 0;
}

AEG_EXPORT const char *aeg_model_path(const aeg_model_t *m)
{
	return m ? m->path : NULL;
}

AEG_EXPORT int aeg_model_gpu(const aeg_model_t *m)
{
	return m ? m->gpu : -1;
}

AEG_EXPORT int aeg_model_job_slab(const aeg_model_t *m)
{
	return m ? m->slab : -1;
}

AEG_EXPORT int aeg_model_owned(const aeg_model_t *m)
{
	return m ? m->owned : 0;
}

AEG_EXPORT const struct aeg_slice *aeg_model_slice(const aeg_model_t *m)
{
	if (m == NULL)
		return NULL;
	if (m->nparts)
		return aeg_model_slice(m->parts[0]);
	return m->load ? aeg_load_slice(m->load) : m->jl ? m->jl->slice : NULL;
}

AEG_EXPORT uint32_t aeg_model_file_count(const aeg_model_t *m)
{
	return m == NULL ? 0 : m->nparts ? m->nparts : 1;
}

AEG_EXPORT const char *aeg_model_file(const aeg_model_t *m, uint32_t index)
{
	if (m == NULL || index >= aeg_model_file_count(m))
		return NULL;
	return m->nparts ? m->parts[index]->path : m->path;
}

AEG_EXPORT uint64_t aeg_model_file_id(const aeg_model_t *m, uint32_t index)
{
	if (m == NULL || index >= aeg_model_file_count(m))
		return 0;
	return m->nparts ? m->parts[index]->id : m->id;
}

AEG_EXPORT const struct aeg_chunk *aeg_model_chunks(const aeg_model_t *m, uint32_t *count)
{
	uint32_t n = 0;
	const struct aeg_chunk *c = m ? part_chunks(m, &n) : NULL;

	if (count)
		*count = n;
	return c;
}

AEG_EXPORT const struct aeg_tensor *aeg_model_tensors(const aeg_model_t *m, uint32_t *count)
{
	uint32_t n = 0;
	const struct aeg_tensor *t = m ? part_tensors(m, &n) : NULL;

	if (count)
		*count = n;
	return t;
}

AEG_EXPORT uint32_t aeg_model_metadata(const aeg_model_t *m, const char *const **keys,
				       const char *const **values)
{
	if (m != NULL && m->nparts)
		return aeg_model_metadata(m->parts[0], keys, values);
	if (m != NULL && m->load != NULL)
		return aeg_load_metadata(m->load, keys, values);
	if (keys)
		*keys = m ? (const char *const *)m->hdr.meta_keys : NULL;
	if (values)
		*values = m ? (const char *const *)m->hdr.meta_values : NULL;
	return m ? (uint32_t)m->hdr.nmeta : 0;
}

/* A wait's remaining milliseconds from @deadline_ns (0 with @timeout_ms < 0: no limit). */
static int left_ms(int timeout_ms, uint64_t deadline_ns)
{
	uint64_t now = aeg_now_ns();

	if (timeout_ms < 0)
		return -1;
	return now >= deadline_ns ? 0 : (int)((deadline_ns - now + 999999) / 1000000);
}

static int wait_one(struct aeg_model *m, int timeout_ms)
{
	uint64_t t;
	int err;

	if (m->load)
		return aeg_load_wait(m->load, timeout_ms);
	if (__atomic_load_n(&m->settled, __ATOMIC_ACQUIRE))
		return 0;
	t = aeg_now_ns();
	err = aeg_job_wait(m->s->job, m->id, timeout_ms);
	if (err == 0) {
		__atomic_store_n(&m->settled, 1, __ATOMIC_RELEASE);
		aeg_span_end("job wait", t);
	}
	return err;
}

AEG_EXPORT int aeg_model_wait(aeg_model_t *m, int timeout_ms)
{
	uint64_t deadline = aeg_now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	int err = 0;

	if (m == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_model_wait: NULL model");
	if (m->nparts == 0)
		return wait_one(m, timeout_ms);
	for (uint32_t i = 0; i < m->nparts && err == 0; i++)
		err = wait_one(m->parts[i], left_ms(timeout_ms, deadline));
	return err;
}

AEG_EXPORT int aeg_model_wait_chunk(aeg_model_t *m, uint32_t index, int timeout_ms)
{
	uint32_t n;

	if (m == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_model_wait_chunk: NULL model");
	part_chunks(m, &n);
	if (index >= n)
		return aeg_fail(AEG_EINVAL, "chunk %u: the load has %u chunks", index, n);
	for (uint32_t i = 0; i < m->nparts; i++) {
		part_chunks(m->parts[i], &n);
		if (index < n)
			return aeg_model_wait_chunk(m->parts[i], index, timeout_ms);
		index -= n;
	}
	if (m->load)
		return aeg_load_wait_chunk(m->load, index, timeout_ms);
	if (__atomic_load_n(&m->settled, __ATOMIC_ACQUIRE))
		return 0;
	return aeg_event_wait_handle(m->s->dev, &m->chunks[index].event, timeout_ms);
}

AEG_EXPORT int aeg_model_wait_tensor(aeg_model_t *m, const char *name, int timeout_ms)
{
	uint64_t deadline = aeg_now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	const struct aeg_tensor *t;
	char q[AEG_NAME_SHOWN];
	uint32_t n;
	int err = 0;

	if (m == NULL || name == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_model_wait_tensor: NULL argument");
	t = aeg_model_tensors(m, &n);
	for (uint32_t i = 0; i < n; i++) {
		if (strcmp(t[i].name, name) != 0)
			continue;
		/* Every chunk the tensor's bytes touch. */
		for (uint32_t k = t[i].first_chunk; k < t[i].first_chunk + t[i].chunks && err == 0; k++)
			err = aeg_model_wait_chunk(m, k, left_ms(timeout_ms, deadline));
		return err;
	}
	return aeg_fail(AEG_ENOENT, "%s has no tensor \"%s\"", m->path, aeg_quote(name, q, sizeof(q)));
}

/* Progress of a one-file JOB model, from the agent's status. */
static int progress_job(struct aeg_model *m, struct aeg_load_progress *p)
{
	struct aeg_job_status *st;
	int err;

	memset(p, 0, sizeof(*p));
	p->chunks = m->nchunks;
	p->feed = AEG_FEED_AUTO;
	err = aeg_job_status(m->s->job, &st);
	if (err)
		return err;
	err = aeg_fail(AEG_ENOENT, "load %" PRIu64 " is gone from the agent (released)", m->id);
	for (uint32_t i = 0; i < st->loads; i++) {
		if (st->load[i].load_id != m->id)
			continue;
		p->total_bytes = st->load[i].file_bytes;
		p->done_bytes = st->load[i].done_bytes;
		p->status = st->load[i].status;
		p->released_chunks = m->nchunks > st->load[i].chunks ? m->nchunks - st->load[i].chunks : 0;
		if (p->status == 0)
			p->done_chunks = m->nchunks;
		err = 0;
	}
	aeg_job_status_free(st);
	if (err == 0)
		aeg_error_clear();
	return err;
}

/* The sum of the parts: the first error, else still loading while any part is. */
static void progress_add(struct aeg_load_progress *sum, const struct aeg_load_progress *p, int first)
{
	sum->total_bytes += p->total_bytes;
	sum->done_bytes += p->done_bytes;
	sum->chunks += p->chunks;
	sum->done_chunks += p->done_chunks;
	sum->released_chunks += p->released_chunks;
	if (first) {
		sum->feed = p->feed;
		sum->status = p->status;
		sum->start_ns = p->start_ns;
		sum->first_chunk_ns = p->first_chunk_ns;
	} else if (sum->status == 0 || (sum->status == AEG_EBUSY && p->status != 0)) {
		sum->status = p->status;
	}
	if (p->start_ns && p->start_ns < sum->start_ns)
		sum->start_ns = p->start_ns;
	if (p->end_ns > sum->end_ns)
		sum->end_ns = p->end_ns;
}

AEG_EXPORT int aeg_model_progress(aeg_model_t *m, struct aeg_load_progress *p)
{
	if (m == NULL || p == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_model_progress: NULL argument");
	if (m->nparts) {
		memset(p, 0, sizeof(*p));
		for (uint32_t i = 0; i < m->nparts; i++) {
			struct aeg_load_progress one;
			int err = aeg_model_progress(m->parts[i], &one);

			if (err)
				return err;
			progress_add(p, &one, i == 0);
		}
		if (p->status == AEG_EBUSY)
			p->end_ns = 0;
		return 0;
	}
	if (m->load)
		return aeg_load_progress(m->load, p);
	return progress_job(m, p);
}

int model_release_chunks(struct aeg_model *m)
{
	aeg_session_t *s = m->s;
	uint64_t *ids;
	uint32_t n = 0;
	int err;

	if (m->load)
		return aeg_load_release(m->load);
	ids = malloc((m->nchunks ? m->nchunks : 1) * sizeof(*ids));
	if (ids == NULL)
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	for (uint32_t i = 0; i < m->nchunks; i++)
		if (n == 0 || ids[n - 1] != m->chunks[i].slab_id)
			ids[n++] = m->chunks[i].slab_id;
	/*
	 * The agent cannot cancel for a client: wait for the load (it may have
	 * failed), then free it whole (a load with no chunk too).
	 */
	err = wait_one(m, -1);
	aeg_error_clear();
	if (err != AEG_ENOENT) {
		err = aeg_job_release_load(s->job, m->id, NULL);
		if (err == AEG_ENOENT) {
			aeg_error_clear();
			err = 0;
		}
	} else {
		err = 0;
	}
	pthread_mutex_lock(&s->lock);
	disown_blocks(s, m->slab, ids, n);
	pthread_mutex_unlock(&s->lock);
	free(ids);
	return err;
}

AEG_EXPORT int aeg_model_release(aeg_model_t *m)
{
	int err = 0;

	if (m == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_model_release: NULL model");
	if (m->nparts == 0)
		err = model_release_chunks(m);
	for (uint32_t i = 0; i < m->nparts; i++) {
		int e = model_release_chunks(m->parts[i]);

		if (e && err == 0)
			err = e;
	}
	aeg_model_close(m);
	return err;
}

AEG_EXPORT void aeg_model_close(aeg_model_t *m)
{
	if (m == NULL)
		return;
	pthread_mutex_lock(&m->s->lock);
	model_unlink(m);
	pthread_mutex_unlock(&m->s->lock);
	model_free(m);
}

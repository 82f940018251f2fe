/* KV swaps on the host backend: piece copies queued on the stream, split over a few shared threads. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/event.h>

#include "internal.h"
#include "kv_internal.h"

/* Below this many bytes a job is copied by the stream's thread alone: waking helpers costs more. */
#define PARALLEL_MIN_BYTES (1u << 20)
#define MAX_HELPERS 3

struct host_call;
struct host_job;

/* A part of a split job, queued for whichever helper is free. */
struct host_task {
	struct host_task *next;
	struct host_job *job;
	uint64_t lo, hi;
};

/* One step of a call, run by the stream's thread when the stream reaches it. */
struct host_job {
	struct host_call *call;
	size_t first, end;
	char *const *src, *const *dst;  /* the step's launch group's piece bases */
	int pending;                    /* tasks queued or running (kv_host.lock) */
	struct host_task task[MAX_HELPERS];
};

/* A call's private copy of its ids, shared by its steps' jobs. */
struct host_call {
	struct kv_host *host;
	uint64_t piece_bytes, src_stride, dst_stride;
	uint32_t count;                 /* pieces per entry */
	int serial;                     /* baseline: one memcpy per piece, one thread */
	atomic_int refs;
	uint32_t *src_ids, *dst_ids;
	struct host_job jobs[];
};

/*
 * Helpers serve the tasks of every stream's jobs from one queue, so two
 * calls on two streams (a swap-out and a swap-in) copy at the same time;
 * a runner whose tasks no helper took yet runs them itself.
 */
struct kv_host {
	pthread_mutex_t lock;
	pthread_cond_t work_cv;         /* helpers: a task or stop */
	pthread_cond_t done_cv;         /* runners: a task finished */
	pthread_cond_t idle_cv;         /* fini: no job queued any more */
	pthread_t helpers[MAX_HELPERS];
	int created;                    /* threads started */
	int nhelpers;                   /* of them, running their loop */
	int stop;
	struct host_task *head, **tail;
	unsigned inflight;              /* jobs queued and not yet finished */
};

static void copy_piece(const struct host_job *job, size_t piece, uint64_t off, uint64_t len)
{
	const struct host_call *c = job->call;
	size_t k = job->first + piece / c->count;
	uint32_t s = (uint32_t)(piece % c->count);

	memcpy(job->dst[s] + (uint64_t)c->dst_ids[k] * c->dst_stride + off,
	       job->src[s] + (uint64_t)c->src_ids[k] * c->src_stride + off, len);
}

/* Copy bytes [lo, hi) of the job's pieces laid end to end. */
static void copy_part(const struct host_job *job, uint64_t lo, uint64_t hi)
{
	const uint64_t ps = job->call->piece_bytes;

	for (uint64_t pos = lo; pos < hi;) {
		uint64_t off = pos % ps;
		uint64_t len = ps - off < hi - pos ? ps - off : hi - pos;

		copy_piece(job, pos / ps, off, len);
		pos += len;
	}
}

/* Part @part of @parts, on 256-byte boundaries. */
static void part_bounds(uint64_t total, int part, int parts, uint64_t *lo, uint64_t *hi)
{
	*lo = total / parts * part & ~(uint64_t)255;
	*hi = part == parts - 1 ? total : total / parts * (part + 1) & ~(uint64_t)255;
}

static void task_done(struct kv_host *h, struct host_job *job)
{
	if (--job->pending == 0)
		pthread_cond_broadcast(&h->done_cv);
}

static struct host_task *pop_locked(struct kv_host *h)
{
	struct host_task *t = h->head;

	if (t && !(h->head = t->next))
		h->tail = &h->head;
	return t;
}

/* Take a task of @job off the queue if no helper took it yet. */
static struct host_task *reclaim_locked(struct kv_host *h, const struct host_job *job)
{
	for (struct host_task **pp = &h->head; *pp; pp = &(*pp)->next) {
		struct host_task *t = *pp;

		if (t->job == job) {
			*pp = t->next;
			if (!*pp)
				h->tail = pp;
			return t;
		}
	}
	return NULL;
}

static void *helper_main(void *arg)
{
	struct kv_host *h = arg;

	pthread_mutex_lock(&h->lock);
	h->nhelpers++;
	pthread_cond_broadcast(&h->done_cv);
	for (;;) {
		struct host_task *t;

		while (!h->stop && !h->head)
			pthread_cond_wait(&h->work_cv, &h->lock);
		if (h->stop)
			break;
		t = pop_locked(h);
		pthread_mutex_unlock(&h->lock);
		copy_part(t->job, t->lo, t->hi);
		pthread_mutex_lock(&h->lock);
		task_done(h, t->job);
	}
	pthread_mutex_unlock(&h->lock);
	return NULL;
}

static void run_split(struct kv_host *h, struct host_job *job, uint64_t total)
{
	int parts = h->nhelpers + 1;
	struct host_task *t;
	uint64_t lo, hi;

	pthread_mutex_lock(&h->lock);
	for (int p = 1; p < parts; p++) {
		t = &job->task[p - 1];
		t->job = job;
		t->next = NULL;
		part_bounds(total, p, parts, &t->lo, &t->hi);
		*h->tail = t;
		h->tail = &t->next;
		job->pending++;
	}
	pthread_cond_broadcast(&h->work_cv);
	pthread_mutex_unlock(&h->lock);

	part_bounds(total, 0, parts, &lo, &hi);
	copy_part(job, lo, hi);

	pthread_mutex_lock(&h->lock);
	while (job->pending) {
		if ((t = reclaim_locked(h, job))) {
			pthread_mutex_unlock(&h->lock);
			copy_part(job, t->lo, t->hi);
			pthread_mutex_lock(&h->lock);
			task_done(h, job);
		} else {
			pthread_cond_wait(&h->done_cv, &h->lock);
		}
	}
	pthread_mutex_unlock(&h->lock);
}

static void call_put(struct host_call *c)
{
	if (atomic_fetch_sub(&c->refs, 1) == 1) {
		free(c->src_ids);
		free(c);
	}
}

/* The stream's host function for one job. */
static void run_job(void *arg)
{
	struct host_job *job = arg;
	struct host_call *c = job->call;
	struct kv_host *h = c->host;
	uint64_t pieces = (uint64_t)(job->end - job->first) * c->count;
	uint64_t total = pieces * c->piece_bytes;

	if (c->serial) {
		for (uint64_t p = 0; p < pieces; p++)
			copy_piece(job, p, 0, c->piece_bytes);
	} else if (h->nhelpers == 0 || total < PARALLEL_MIN_BYTES) {
		copy_part(job, 0, total);
	} else {
		run_split(h, job, total);
	}
	call_put(c);

	pthread_mutex_lock(&h->lock);
	if (--h->inflight == 0)
		pthread_cond_broadcast(&h->idle_cv);
	pthread_mutex_unlock(&h->lock);
}

static int host_init(aeg_kv_t *kv)
{
	struct kv_host *h;
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	int want = cpus > 1 ? (int)(cpus - 1 < MAX_HELPERS ? cpus - 1 : MAX_HELPERS) : 0;
	int err;

	h = calloc(1, sizeof(*h));
	if (!h)
		return aeg_fail(AEG_ENOMEM, "KV host copy threads");
	pthread_mutex_init(&h->lock, NULL);
	pthread_cond_init(&h->work_cv, NULL);
	pthread_cond_init(&h->done_cv, NULL);
	pthread_cond_init(&h->idle_cv, NULL);
	h->tail = &h->head;
	kv->host = h;
	for (int i = 0; i < want; i++) {
		if ((err = pthread_create(&h->helpers[i], NULL, helper_main, h)))
			return aeg_fail(AEG_ENOMEM, "KV host copy thread: %s", strerror(err));
		h->created++;
	}
	/* Helpers count themselves in; parts are split among all of them. */
	pthread_mutex_lock(&h->lock);
	while (h->nhelpers < want)
		pthread_cond_wait(&h->done_cv, &h->lock);
	pthread_mutex_unlock(&h->lock);
	return 0;
}

static void host_fini(aeg_kv_t *kv)
{
	struct kv_host *h = kv->host;

	if (!h)
		return;
	pthread_mutex_lock(&h->lock);
	while (h->inflight)
		pthread_cond_wait(&h->idle_cv, &h->lock);
	h->stop = 1;
	pthread_cond_broadcast(&h->work_cv);
	pthread_mutex_unlock(&h->lock);
	for (int i = 0; i < h->created; i++)
		pthread_join(h->helpers[i], NULL);
	pthread_cond_destroy(&h->idle_cv);
	pthread_cond_destroy(&h->done_cv);
	pthread_cond_destroy(&h->work_cv);
	pthread_mutex_destroy(&h->lock);
	free(h);
	kv->host = NULL;
}

static struct host_call *call_new(aeg_kv_t *kv, const struct kv_move *mv)
{
	struct host_call *c = calloc(1, sizeof(*c) + mv->nsteps * sizeof(c->jobs[0]));

	if (!c)
		return NULL;
	c->src_ids = malloc(2 * mv->n * sizeof(uint32_t));
	if (!c->src_ids) {
		free(c);
		return NULL;
	}
	c->dst_ids = c->src_ids + mv->n;
	memcpy(c->src_ids, mv->src_ids, mv->n * sizeof(uint32_t));
	memcpy(c->dst_ids, mv->dst_ids, mv->n * sizeof(uint32_t));
	c->host = kv->host;
	c->piece_bytes = mv->plan->piece_bytes;
	c->count = mv->plan->count;
	c->src_stride = mv->src_stride;
	c->dst_stride = mv->dst_stride;
	atomic_init(&c->refs, 1);       /* the queuer's, dropped when all jobs are queued */
	return c;
}

static int queue_job(struct host_call *c, const struct kv_move *mv, size_t step, aeg_stream_t *stream)
{
	struct kv_host *h = c->host;
	struct host_job *job = &c->jobs[step];
	const struct kv_step *st = &mv->steps[step];
	int err;

	job->call = c;
	job->first = st->first;
	job->end = st->end;
	job->src = kv_move_src(mv, st->group);
	job->dst = kv_move_dst(mv, st->group);
	atomic_fetch_add(&c->refs, 1);
	pthread_mutex_lock(&h->lock);
	h->inflight++;
	pthread_mutex_unlock(&h->lock);
	if ((err = aeg_stream_launch_host_fn(stream, run_job, job))) {
		pthread_mutex_lock(&h->lock);
		if (--h->inflight == 0)
			pthread_cond_broadcast(&h->idle_cv);
		pthread_mutex_unlock(&h->lock);
		call_put(c);
	}
	return err;
}

static int queue_call(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream, int serial)
{
	struct host_call *c = call_new(kv, mv);
	int err = 0;

	if (!c)
		return aeg_fail(AEG_ENOMEM, "KV host copy of %zu block ids", mv->n);
	c->serial = serial;
	for (size_t s = 0; s < mv->nsteps; s++) {
		if ((err = queue_job(c, mv, s, stream)))
			break;
		if (mv->steps[s].event && (err = aeg_event_record(mv->steps[s].event, stream)))
			break;
	}
	call_put(c);
	return err;
}

static int host_move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream)
{
	return queue_call(kv, mv, stream, 0);
}

static int host_baseline(aeg_kv_t *kv, enum kv_baseline how, const struct kv_move *mv, aeg_stream_t *stream)
{
	if (how != KV_BASELINE_PER_BLOCK)
		return aeg_fail(AEG_ENOTSUP, "batched copies need the cuda backend");
	return queue_call(kv, mv, stream, 1);
}

const struct kv_backend kv_host_backend = {
	.name = "host",
	.init = host_init,
	.fini = host_fini,
	.move = host_move,
	.baseline = host_baseline,
};

/* KV swaps on the host backend: block copies queued on the stream, split over a few threads. */
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

/* One segment of a call, run by the stream's thread when the stream reaches it. */
struct host_job {
	struct host_call *call;
	size_t first, end;
};

/* A call's private copy of its ids, shared by its segments' jobs. */
struct host_call {
	struct kv_host *host;
	const char *src;
	char *dst;
	uint64_t block_bytes;
	int serial;                     /* baseline: one memcpy per block, one thread */
	atomic_int refs;
	uint32_t *src_ids, *dst_ids;
	struct host_job jobs[];
};

struct kv_host {
	pthread_mutex_t lock;
	pthread_cond_t work_cv;         /* helpers: a new job or stop */
	pthread_cond_t done_cv;         /* runner: helpers finished their parts */
	pthread_cond_t idle_cv;         /* fini: no job queued any more */
	pthread_t helpers[MAX_HELPERS];
	int created;                    /* threads started */
	int nhelpers;                   /* of them, running their loop */
	int stop;
	uint64_t generation;
	const struct host_job *job;     /* the job being split */
	int pending;                    /* helpers still copying their part */
	unsigned inflight;              /* jobs queued and not yet finished */
	pthread_mutex_t run;            /* one split job at a time across streams */
};

/* Copy bytes [lo, hi) of the job's blocks laid end to end. */
static void copy_part(const struct host_job *job, uint64_t lo, uint64_t hi)
{
	const struct host_call *c = job->call;
	const uint64_t bs = c->block_bytes;
	uint64_t pos = lo;

	while (pos < hi) {
		size_t k = job->first + pos / bs;
		uint64_t off = pos % bs;
		uint64_t len = bs - off < hi - pos ? bs - off : hi - pos;

		memcpy(c->dst + (uint64_t)c->dst_ids[k] * bs + off,
		       c->src + (uint64_t)c->src_ids[k] * bs + off, len);
		pos += len;
	}
}

/* Part @part of @parts, on 256-byte boundaries. */
static void part_bounds(uint64_t total, int part, int parts, uint64_t *lo, uint64_t *hi)
{
	*lo = total / parts * part & ~(uint64_t)255;
	*hi = part == parts - 1 ? total : total / parts * (part + 1) & ~(uint64_t)255;
}

static void *helper_main(void *arg)
{
	struct kv_host *h = arg;
	uint64_t seen = 0;
	int index;

	pthread_mutex_lock(&h->lock);
	index = ++h->nhelpers;          /* part 0 is the runner's */
	pthread_cond_broadcast(&h->done_cv);
	for (;;) {
		const struct host_job *job;
		uint64_t total, lo, hi;
		int parts;

		while (!h->stop && h->generation == seen)
			pthread_cond_wait(&h->work_cv, &h->lock);
		if (h->stop)
			break;
		seen = h->generation;
		job = h->job;
		parts = h->nhelpers + 1;
		pthread_mutex_unlock(&h->lock);

		total = (job->end - job->first) * job->call->block_bytes;
		part_bounds(total, index, parts, &lo, &hi);
		copy_part(job, lo, hi);

		pthread_mutex_lock(&h->lock);
		if (--h->pending == 0)
			pthread_cond_signal(&h->done_cv);
	}
	pthread_mutex_unlock(&h->lock);
	return NULL;
}

static void run_split(struct kv_host *h, const struct host_job *job, uint64_t total)
{
	uint64_t lo, hi;

	pthread_mutex_lock(&h->run);
	pthread_mutex_lock(&h->lock);
	h->job = job;
	h->pending = h->nhelpers;
	h->generation++;
	pthread_cond_broadcast(&h->work_cv);
	pthread_mutex_unlock(&h->lock);

	part_bounds(total, 0, h->nhelpers + 1, &lo, &hi);
	copy_part(job, lo, hi);

	pthread_mutex_lock(&h->lock);
	while (h->pending)
		pthread_cond_wait(&h->done_cv, &h->lock);
	pthread_mutex_unlock(&h->lock);
	pthread_mutex_unlock(&h->run);
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
	uint64_t total = (job->end - job->first) * c->block_bytes;

	if (c->serial) {
		for (size_t k = job->first; k < job->end; k++)
			memcpy(c->dst + (uint64_t)c->dst_ids[k] * c->block_bytes,
			       c->src + (uint64_t)c->src_ids[k] * c->block_bytes, c->block_bytes);
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

int kv_host_init(aeg_kv_t *kv)
{
	struct kv_host *h;
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	int want = cpus > 1 ? (int)(cpus - 1 < MAX_HELPERS ? cpus - 1 : MAX_HELPERS) : 0;
	int err;

	h = calloc(1, sizeof(*h));
	if (!h)
		return aeg_fail(AEG_ENOMEM, "KV host copy threads");
	pthread_mutex_init(&h->lock, NULL);
	pthread_mutex_init(&h->run, NULL);
	pthread_cond_init(&h->work_cv, NULL);
	pthread_cond_init(&h->done_cv, NULL);
	pthread_cond_init(&h->idle_cv, NULL);
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

void kv_host_fini(aeg_kv_t *kv)
{
	struct kv_host *h = kv->host;

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
	pthread_mutex_destroy(&h->run);
	pthread_mutex_destroy(&h->lock);
	free(h);
	kv->host = NULL;
}

static struct host_call *call_new(aeg_kv_t *kv, const char *src, char *dst, const uint32_t *src_ids,
				  const uint32_t *dst_ids, size_t n, size_t nseg)
{
	struct host_call *c = calloc(1, sizeof(*c) + nseg * sizeof(c->jobs[0]));

	if (!c)
		return NULL;
	c->src_ids = malloc(2 * n * sizeof(uint32_t));
	if (!c->src_ids) {
		free(c);
		return NULL;
	}
	c->dst_ids = c->src_ids + n;
	memcpy(c->src_ids, src_ids, n * sizeof(uint32_t));
	memcpy(c->dst_ids, dst_ids, n * sizeof(uint32_t));
	c->host = kv->host;
	c->src = src;
	c->dst = dst;
	c->block_bytes = kv->block_bytes;
	atomic_init(&c->refs, 1);       /* the queuer's, dropped when all jobs are queued */
	return c;
}

static int queue_job(struct host_call *c, size_t seg, size_t first, size_t end, aeg_stream_t *stream)
{
	struct kv_host *h = c->host;
	struct host_job *job = &c->jobs[seg];
	int err;

	job->call = c;
	job->first = first;
	job->end = end;
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

int kv_host_move(aeg_kv_t *kv, const struct kv_move *mv, aeg_stream_t *stream)
{
	struct host_call *c;
	size_t first = 0;
	int err = 0;

	c = call_new(kv, mv->src, mv->dst, mv->src_ids, mv->dst_ids, mv->n, mv->nseg);
	if (!c)
		return aeg_fail(AEG_ENOMEM, "KV host copy of %zu block ids", mv->n);
	for (size_t s = 0; s < mv->nseg; s++) {
		if ((err = queue_job(c, s, first, mv->ends[s], stream)))
			break;
		if (mv->seg_events[s] && (err = aeg_event_record(mv->seg_events[s], stream)))
			break;
		first = mv->ends[s];
	}
	call_put(c);
	return err;
}

int kv_host_baseline(aeg_kv_t *kv, const char *src, char *dst, const uint32_t *src_ids,
		     const uint32_t *dst_ids, size_t n, aeg_stream_t *stream)
{
	struct host_call *c;
	int err;

	c = call_new(kv, src, dst, src_ids, dst_ids, n, 1);
	if (!c)
		return aeg_fail(AEG_ENOMEM, "KV host baseline copy of %zu block ids", n);
	c->serial = 1;
	err = queue_job(c, 0, 0, n, stream);
	call_put(c);
	return err;
}

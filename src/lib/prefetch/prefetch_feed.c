/* The prefetch engine's workers and feeds: pieces of a file registered or read, copied to their chunks. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <aegaeon/event.h>
#include <aegaeon/prefetch.h>

#include "device_internal.h"
#include "internal.h"
#include "prefetch_engine.h"

#define POOL_WAIT_MS 50

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22   /* Linux 5.14 */
#endif

/* Copied mmap pieces kept registered (all loads) before unregistering one at a time. */
#define DEFERRED_UNREGISTER_BYTES (32ull << 30)

static uint32_t stream_of(const struct aeg_prefetch *pf, uint32_t chunk)
{
	return chunk % (uint32_t)pf->nstreams;
}

static void times_add(uint64_t *counter, uint64_t v)
{
	__atomic_fetch_add(counter, v, __ATOMIC_RELAXED);
}

/* A submission of @l's that began at @t0 has ended. */
static void submit_timed(struct aeg_load *l, uint64_t t0)
{
	uint64_t ns = aeg_now_ns() - t0;
	uint64_t max = __atomic_load_n(&l->times.submit_max_ns, __ATOMIC_RELAXED);

	times_add(&l->times.submits, 1);
	times_add(&l->times.submit_ns, ns);
	while (ns > max && !__atomic_compare_exchange_n(&l->times.submit_max_ns, &max, ns, 1, __ATOMIC_RELAXED,
							 __ATOMIC_RELAXED))
		;
}

/* Every copy of @it on stream @stream has landed: count the chunks it fills. Lock held. */
static void chunks_landed(struct aeg_prefetch *pf, struct item *it, uint32_t stream)
{
	struct aeg_load *l = it->load;

	for (uint32_t c = it->first_chunk; c <= it->last_chunk && c < l->nchunks; c++) {
		struct chunk_rt *rt = &l->rt[c];

		if (stream_of(pf, c) != stream)
			continue;
		if (--rt->pending == 0 && rt->state == CH_PENDING) {
			rt->state = CH_DONE;
			l->done_chunks++;
			l->done_bytes += l->chunks[c].size;
			for (int q = 0; q < 4; q++)
				if (l->quarter_ns[q] == 0 && l->done_bytes * 4 >= l->total_bytes * (uint64_t)(q + 1))
					l->quarter_ns[q] = aeg_now_ns();
			if (c == 0)
				l->first_ns = aeg_now_ns();
			if (l->done_chunks == l->nchunks)
				l->landed_ns = aeg_now_ns();
		}
	}
}

/*
 * Slots. An engine given a pool of buffers larger than a staging ring's (a
 * job's: 32 MiB) reads through slots of AEG_PREFETCH_RING_BUFFER_BYTES
 * carved from as few of its buffers as the ring needs (3 for 24 slots), the
 * slot given back last taken first: the bytes a worker reads are then still
 * in the CPU's last-level cache when the copy engines read them, as with an
 * engine's own ring (prefetch_internal.h), where 24 whole 32 MiB buffers
 * in flight would not fit it. The carved buffers go back to the pool when
 * no load runs (prefetch_slots_drop).
 */

/* Give back a READ piece's buffer or slot, and its place in the ring. Lock held. */
static void ring_put(struct aeg_prefetch *pf, uint32_t index)
{
	if (pf->slots_per_buf)
		pf->free_slots[pf->nfree++] = index;
	else
		aeg_pool_release(pf->pool, index);
	pf->ring_in_use--;
}

void prefetch_slots_drop(struct aeg_prefetch *pf, int all)
{
	if (pf->ncarved == 0)
		return;
	if (!all) {
		if (pf->ring_in_use != 0 || pf->carving != 0)
			return;
		for (struct aeg_load *l = pf->loads; l; l = l->next)
			if (l->in_flight)
				return;
	}
	for (uint32_t c = 0; c < pf->ncarved; c++)
		aeg_pool_release(pf->pool, pf->carved[c]);
	pf->ncarved = 0;
	pf->nfree = 0;
}

/* Every copy of @it has landed: give back what it holds. Lock held. */
static void item_done(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;

	if (it->buf >= 0) {
		ring_put(pf, (uint32_t)it->buf);
		it->buf = -1;
	}
	if (it->reg) {
		/* A worker unregisters it (never a stream's host function: that is
		 * a CUDA call) and only then counts the item out, so the load
		 * cannot finish (and unmap) under the unregistration. */
		it->next = pf->retired;
		pf->retired = it;
	} else {
		l->items_left--;
		prefetch_queue_finish(pf, l);
	}
}

static void batch_done(struct aeg_prefetch *pf, struct batch *b)
{
	if (b->it)
		item_done(pf, b->it);
	else
		ring_put(pf, (uint32_t)b->buf);
	free(b);
	pthread_cond_broadcast(&pf->work_cv);
}

/* Stream host function: no CUDA call, no blocking beyond the engine lock. */
static void part_done(void *arg)
{
	struct part *p = arg;
	struct batch *b = p->b;
	struct aeg_prefetch *pf = b->pf;

	pthread_mutex_lock(&pf->lock);
	if (b->it)
		chunks_landed(pf, b->it, p->stream);
	if (--b->left == 0)
		batch_done(pf, b);
	pthread_mutex_unlock(&pf->lock);
}

static int popcount64(uint64_t v)
{
	return __builtin_popcountll(v);
}

static struct batch *batch_new(struct aeg_prefetch *pf, struct item *it, int buf, uint64_t mask)
{
	struct batch *b = calloc(1, sizeof(*b) + (size_t)popcount64(mask) * sizeof(struct part));

	if (b == NULL) {
		aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		return NULL;
	}
	b->pf = pf;
	b->it = it;
	b->buf = buf;
	return b;
}

/*
 * Queue a part of @b on every stream of @mask after what is queued there.
 * On failure the caller syncs the streams (the parts queued run, the bias
 * keeps @b alive) and frees @b; on success @b frees itself.
 */
static int batch_launch(struct aeg_prefetch *pf, struct batch *b, uint64_t mask)
{
	uint32_t k = 0;
	int err;

	b->left = (uint32_t)popcount64(mask) + 1;
	for (uint32_t s = 0; s < (uint32_t)pf->nstreams; s++) {
		if (!(mask & (1ull << s)))
			continue;
		b->parts[k].b = b;
		b->parts[k].stream = s;
		err = aeg_stream_launch_host_fn(pf->streams[s], part_done, &b->parts[k]);
		if (err)
			return err;
		k++;
	}
	pthread_mutex_lock(&pf->lock);
	if (--b->left == 0)
		batch_done(pf, b);
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

/* Wait for every stream, so no host function still refers to what an error path frees. */
static void sync_streams(struct aeg_prefetch *pf)
{
	for (int i = 0; i < pf->nstreams; i++)
		aeg_stream_sync(pf->streams[i]);
}

/* The streams of the chunks file bytes [b, e) fall in. */
static uint64_t streams_of(const struct aeg_prefetch *pf, const struct aeg_load *l, uint64_t b,
			   uint64_t e)
{
	uint64_t mask = 0, ob = out_of(l, b), oe = out_of(l, e);

	for (uint32_t c = chunk_at(l, ob); c < l->nchunks && l->rt[c].out < oe; c++)
		mask |= 1ull << stream_of(pf, c);
	return mask;
}

/*
 * Queue the copies of file bytes [b, e) between @host (holding them from
 * byte @b) and the chunks on the GPU, each on its chunk's stream: to the GPU,
 * or @back from it (how a registered piece fills its cache buffer, after
 * the copy that put the bytes there). A sliced load gathers its parts'
 * bytes (slice_copy; never @back: it has no cache).
 */
static int copy_chunks(struct aeg_prefetch *pf, struct aeg_load *l, uint64_t b, uint64_t e,
		       char *host, int back)
{
	uint64_t ob = out_of(l, b), oe = out_of(l, e);

	for (uint32_t c = chunk_at(l, ob); c < l->nchunks && l->rt[c].out < oe; c++) {
		const struct aeg_chunk *ch = &l->chunks[c];
		uint64_t at = l->rt[c].out;
		uint64_t sb = ob > at ? ob : at;
		uint64_t se = oe < at + ch->size ? oe : at + ch->size;
		char *gpu = (char *)ch->device_ptr + (sb - at);
		aeg_stream_t *st = pf->streams[stream_of(pf, c)];
		int err;

		if (sb >= se)
			continue;
		if (l->plan.spec)
			err = slice_copy(st, &l->plan, sb, se, gpu, host, b);
		else
			err = aeg_memcpy_async(st, back ? host + (sb - b) : gpu, back ? gpu : host + (sb - b), se - sb);
		if (err) {
			aeg_error_prefix("%s: copying bytes %" PRIu64 "..%" PRIu64 "%s", l->path, sb, se,
					 back ? " back for the host cache" : l->plan.spec ? " of its slice" : "");
			return err;
		}
	}
	return 0;
}

static int pread_full(struct aeg_load *l, int fd, void *buf, uint64_t bytes, uint64_t off)
{
	/* O_DIRECT wants whole blocks; the buffer always has room for the rounding. */
	uint64_t room = fd == l->dfd ? aeg_round_up(bytes, PAGE) : bytes;
	ssize_t r = aeg_pread_full(fd, buf, bytes, room, off);

	if (r < 0)
		return aeg_fail(AEG_EIO, "%s: reading %" PRIu64 " bytes at %" PRIu64 ": %s",
				l->path, bytes, off, strerror((int)-r));
	if ((uint64_t)r < bytes)
		return aeg_fail(AEG_ESTALE,
				"%s: file ends at %" PRIu64 " bytes, it had %jd when the load began (it changed while loading)",
				l->path, off + (uint64_t)r, (intmax_t)l->st.st_size);
	return 0;
}

/*
 * MADV_POPULATE_READ failed where touching the pages would raise SIGBUS:
 * the file shrank under its mapping, or its pages could not be read. Say
 * which, before any copy touches them.
 */
static int mapped_fault(struct aeg_load *l, const struct item *it, int e)
{
	struct stat now;

	if (fstat(l->fd, &now) == 0 && now.st_size < l->st.st_size)
		return aeg_fail(AEG_ESTALE,
				"%s: file ends at %jd bytes, it had %jd when the load began (it changed while loading)",
				l->path, (intmax_t)now.st_size, (intmax_t)l->st.st_size);
	return aeg_fail(AEG_EIO, "%s: reading bytes %" PRIu64 "..%" PRIu64 " through its mapping: %s",
			l->path, it->begin, it->end, strerror(e == EFAULT ? EIO : e));
}

static int load_stopped(struct aeg_load *l)
{
	return __atomic_load_n(&l->stop_err, __ATOMIC_RELAXED) != 0;
}

/*
 * A buffer of the pool, evicting cache entries while it is dry; with @wait
 * 0, AEG_ETIMEDOUT when it is dry and nothing is left to evict.
 */
static int pool_take(struct aeg_prefetch *pf, struct aeg_load *l, int wait, struct aeg_pool_buffer *b)
{
	int err;

	for (;;) {
		int evicted;

		err = aeg_pool_acquire(pf->pool, 0, b);
		if (err != AEG_ETIMEDOUT)
			return err;
		pthread_mutex_lock(&pf->lock);
		evicted = prefetch_cache_evict_one(pf);
		pthread_mutex_unlock(&pf->lock);
		if (evicted)
			continue;
		if (!wait)
			return err;
		err = aeg_pool_acquire(pf->pool, POOL_WAIT_MS, b);
		if (err != AEG_ETIMEDOUT)
			return err;
		if (load_stopped(l))
			return aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path);
	}
}

/*
 * A free slot, carving another pool buffer into slots when none is free and
 * fewer than max_carved are. Lock held (dropped while a buffer is taken).
 * The caller holds a place in the ring, and ring_buffers <= max_carved *
 * slots_per_buf, so with every buffer carved a slot is free. Only a worker
 * with no slot carved and no other worker carving waits for the pool; the
 * others wait for a slot to come back (a copy in flight ends) or for the
 * carving to end: a worker blocked on a dry pool while slots come back
 * would hold its piece, and so its load, up for good.
 */
static int slot_get(struct aeg_prefetch *pf, struct aeg_load *l, struct aeg_pool_buffer *b)
{
	uint32_t id;

	while (pf->nfree == 0) {
		struct aeg_pool_buffer pb;
		int alone, err;

		if (l->stop_err)
			return aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path);
		if (pf->ncarved + pf->carving >= pf->max_carved) {
			pthread_cond_wait(&pf->work_cv, &pf->lock);
			continue;
		}
		alone = pf->ncarved == 0 && pf->carving == 0;
		pf->carving++;
		pthread_mutex_unlock(&pf->lock);
		err = pool_take(pf, l, 0, &pb);
		if (err == AEG_ETIMEDOUT && alone)
			err = aeg_pool_acquire(pf->pool, POOL_WAIT_MS, &pb);
		pthread_mutex_lock(&pf->lock);
		pf->carving--;
		pthread_cond_broadcast(&pf->work_cv);
		if (err == AEG_ETIMEDOUT) {
			if (l->stop_err)
				return aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path);
			while (pf->nfree == 0 && (pf->ncarved > 0 || pf->carving > 0) && !l->stop_err)
				pthread_cond_wait(&pf->work_cv, &pf->lock);
			continue;
		}
		if (err)
			return err;
		/* Its first slot on top. */
		for (uint32_t k = pf->slots_per_buf; k-- > 0;)
			pf->free_slots[pf->nfree++] = pf->ncarved * pf->slots_per_buf + k;
		pf->carved[pf->ncarved++] = pb.index;
	}
	id = pf->free_slots[--pf->nfree];
	b->index = id;
	b->ptr = (char *)aeg_pool_buffer_ptr(pf->pool, pf->carved[id / pf->slots_per_buf]) +
		 (uint64_t)(id % pf->slots_per_buf) * pf->read_bytes;
	b->bytes = pf->read_bytes;
	return 0;
}

/*
 * A pool buffer or a slot for a READ piece, in a place of the ring (taken
 * here unless the caller has one), evicting cache entries when the pool is
 * dry. On failure the place is given back.
 */
static int ring_get(struct aeg_prefetch *pf, struct aeg_load *l, int have_slot,
		    struct aeg_pool_buffer *b)
{
	int err;

	pthread_mutex_lock(&pf->lock);
	if (!have_slot) {
		while (pf->ring_in_use >= (uint32_t)pf->cfg.ring_buffers && !l->stop_err)
			pthread_cond_wait(&pf->work_cv, &pf->lock);
		if (l->stop_err) {
			pthread_mutex_unlock(&pf->lock);
			return aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path);
		}
		pf->ring_in_use++;
	}
	/*
	 * A pool given later (the job's, still being made): wait for it. Meanwhile
	 * the load is not one that pool's population lets run first
	 * (aeg_loads_active): it would wait for itself.
	 */
	if (pf->pool == NULL && pf->pool_err == 0 && !l->stop_err) {
		if (l->pool_waiters++ == 0)
			aeg_loads_end();
		while (pf->pool == NULL && pf->pool_err == 0 && !l->stop_err)
			pthread_cond_wait(&pf->work_cv, &pf->lock);
		if (--l->pool_waiters == 0)
			aeg_loads_begin();
	}
	if (pf->pool == NULL) {
		err = l->stop_err ? aeg_fail(AEG_ECANCELED, "%s: load stopped", l->path) :
		      aeg_fail(pf->pool_err, "%s: no pinned pool to read it through: %s", l->path, pf->pool_detail);
	} else if (pf->slots_per_buf) {
		err = slot_get(pf, l, b);
	} else {
		pthread_mutex_unlock(&pf->lock);
		err = pool_take(pf, l, 1, b);
		pthread_mutex_lock(&pf->lock);
	}
	if (err) {
		pf->ring_in_use--;
		pthread_cond_broadcast(&pf->work_cv);
	}
	pthread_mutex_unlock(&pf->lock);
	return err;
}

/* Wait for what is queued, then give back what an unfinished item holds. */
static int item_abort(struct aeg_prefetch *pf, struct item *it, int err)
{
	sync_streams(pf);
	pthread_mutex_lock(&pf->lock);
	if (it->buf >= 0) {
		ring_put(pf, (uint32_t)it->buf);
		it->buf = -1;
		pthread_cond_broadcast(&pf->work_cv);
	}
	pthread_mutex_unlock(&pf->lock);
	if (it->reg) {
		aeg_host_unregister(pf->dev, it->reg);
		it->reg = NULL;
		pthread_mutex_lock(&pf->lock);
		pf->registered--;
		pthread_mutex_unlock(&pf->lock);
	}
	return err;
}

/* READ into buffers (or slots) of the ring, one per sub-range, for a mapped piece not registered. */
static int read_through_ring(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;

	for (uint64_t b = it->begin; b < it->end; b += pf->read_bytes) {
		uint64_t e = b + pf->read_bytes < it->end ? b + pf->read_bytes : it->end;
		uint64_t mask = streams_of(pf, l, b, e);
		struct aeg_pool_buffer buf;
		struct batch *sb;
		uint64_t t = aeg_now_ns();
		int err;

		err = ring_get(pf, l, 0, &buf);
		if (err)
			return err;
		times_add(&l->times.ring_wait_ns, aeg_now_ns() - t);
		sb = batch_new(pf, NULL, (int)buf.index, mask);
		if (sb == NULL) {
			err = AEG_ENOMEM;
			goto fail;
		}
		t = aeg_now_ns();
		err = pread_full(l, l->dfd >= 0 ? l->dfd : l->fd, buf.ptr, e - b, b);
		times_add(&l->times.pread_ns, aeg_now_ns() - t);
		if (err == 0) {
			times_add(&l->times.read_bufs, 1);
			times_add(&l->times.read_bytes, e - b);
			t = aeg_now_ns();
			err = copy_chunks(pf, l, b, e, buf.ptr, 0);
			if (err == 0)
				err = batch_launch(pf, sb, mask);
			submit_timed(l, t);
		}
		if (err == 0)
			continue;
fail:
		sync_streams(pf);
		free(sb);
		pthread_mutex_lock(&pf->lock);
		ring_put(pf, buf.index);
		pthread_cond_broadcast(&pf->work_cv);
		pthread_mutex_unlock(&pf->lock);
		return err;
	}
	return 0;
}

/*
 * @it's copies are queued: record the events of the chunks whose last item
 * it was, on the chunk's stream after the copies of every item. Before the
 * item's host functions, so a load ends only once its events completed.
 */
static int record_chunks(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;

	for (uint32_t c = it->first_chunk; c <= it->last_chunk; c++) {
		struct chunk_rt *rt = &l->rt[c];
		int last, err;

		pthread_mutex_lock(&pf->lock);
		last = --rt->unqueued == 0;
		pthread_mutex_unlock(&pf->lock);
		if (!last)
			continue;
		/* Outside the lock: a host function waiting for it would keep the
		 * device busy under a synchronizing call this record waits behind. */
		err = aeg_event_record(rt->ev, pf->streams[stream_of(pf, c)]);
		if (err) {
			aeg_error_prefix("%s: recording the event of chunk %u", l->path, c);
			return err;
		}
		pthread_mutex_lock(&pf->lock);
		rt->recorded = 1;
		l->recorded_chunks++;
		pthread_mutex_unlock(&pf->lock);
	}
	return 0;
}

/*
 * May this worker register @l's piece? Always for MMAP. For MIXED only while
 * fewer than mmap_threads workers register: registrations serialize in the
 * driver, so more would wait there while they could be reading instead; but
 * every one while the engine's pool is still being made (or could not be):
 * there is nothing to read through yet.
 */
static int lane_take(struct aeg_prefetch *pf, struct aeg_load *l)
{
	int ok = 1;

	if (__atomic_load_n(&l->no_register, __ATOMIC_RELAXED))
		return 0;
	if (l->feed != AEG_FEED_MIXED)
		return 1;
	pthread_mutex_lock(&pf->lock);
	if (pf->pool == NULL || pf->registering < (uint32_t)pf->cfg.mmap_threads)
		pf->registering++;
	else
		ok = 0;
	pthread_mutex_unlock(&pf->lock);
	return ok;
}

/* A mapped piece that will not stay registered gives back the slot pick() took for it. */
static void slot_give(struct aeg_prefetch *pf)
{
	pthread_mutex_lock(&pf->lock);
	pf->registered--;
	pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
}

static void lane_give(struct aeg_prefetch *pf, struct aeg_load *l)
{
	if (l->feed != AEG_FEED_MIXED)
		return;
	pthread_mutex_lock(&pf->lock);
	pf->registering--;
	pthread_mutex_unlock(&pf->lock);
}

/*
 * Registration faults the pages in under the driver's context lock, one
 * thread at a time; mapping them first lets the workers do that part in
 * parallel. 0, or the load's error for a page that cannot be read.
 */
static int populate(struct aeg_load *l, const struct item *it, const char *src, uint64_t bytes)
{
	uint64_t t = aeg_now_ns();

	if (madvise((void *)src, bytes, MADV_POPULATE_READ) != 0 &&
	    (errno == EFAULT || errno == EIO || errno == EHWPOISON))
		return mapped_fault(l, it, errno);
	times_add(&l->times.populate_ns, aeg_now_ns() - t);
	return 0;
}

/*
 * Register @it's piece of the mapped file at @src for the GPU to copy from
 * (it->reg). 0, or the load's error for a page that cannot be read, or
 * the driver's refusal, which sets *@refused: a caller may read around it.
 */
static int register_piece(struct aeg_prefetch *pf, struct item *it, const char *src, int *refused)
{
	struct aeg_load *l = it->load;
	uint64_t len = it->end - it->begin, reg_bytes = aeg_round_up(len, PAGE), t;
	int err;

	*refused = 0;
	err = populate(l, it, src, reg_bytes);
	if (err)
		return err;
	t = aeg_now_ns();
	err = aeg_host_register(pf->dev, (void *)src, reg_bytes, AEG_HOST_REGISTER_READONLY);
	if (err) {
		*refused = 1;
		return err;
	}
	times_add(&l->times.register_ns, aeg_now_ns() - t);
	times_add(&l->times.reg_pieces, 1);
	times_add(&l->times.reg_bytes, len);
	it->reg = (void *)src;
	it->reg_bytes = reg_bytes;
	return 0;
}

/* A READ piece whose load waited for a staging ring that failed, and that can be registered instead. */
static int ring_failed(struct aeg_prefetch *pf, struct aeg_load *l)
{
	int failed;

	if (l->map == NULL || load_stopped(l))
		return 0;
	pthread_mutex_lock(&pf->lock);
	failed = pf->pool == NULL && pf->pool_err != 0;
	pthread_mutex_unlock(&pf->lock);
	if (failed)
		aeg_error_clear();
	return failed;
}

/*
 * Run one item: get its bytes into host memory the GPU can read, queue the
 * copies into the chunks it touches, then item_done. Returns 0 once
 * item_done is queued; otherwise everything the item took is given back.
 */
static int run_item(struct aeg_prefetch *pf, struct item *it)
{
	struct aeg_load *l = it->load;
	uint64_t len = it->end - it->begin;
	uint64_t mask = 0;
	struct batch *ib;
	const char *src;
	uint64_t t;
	int err, refused;

	for (uint32_t c = it->first_chunk; c <= it->last_chunk; c++)
		mask |= 1ull << stream_of(pf, c);

	switch (l->feed) {
	case AEG_FEED_CACHE:
		src = aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]);
		break;
	case AEG_FEED_READ:
		if (l->filling) {
			src = aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]);
		} else {
			struct aeg_pool_buffer b;

			t = aeg_now_ns();
			err = ring_get(pf, l, 1, &b);
			if (err && ring_failed(pf, l)) {
				/* Its staging ring never came: the piece is registered instead. */
				src = (const char *)l->map + it->begin;
				err = register_piece(pf, it, src, &refused);
				if (err)
					return err;
				pthread_mutex_lock(&pf->lock);
				pf->registered++;       /* as pick() counts a mapped piece */
				pthread_mutex_unlock(&pf->lock);
				break;
			}
			if (err)
				return err;
			times_add(&l->times.ring_wait_ns, aeg_now_ns() - t);
			it->buf = (int)b.index;
			src = b.ptr;
		}
		t = aeg_now_ns();
		err = pread_full(l, l->dfd >= 0 ? l->dfd : l->fd, (void *)src, len, it->begin);
		if (err)
			return item_abort(pf, it, err);
		times_add(&l->times.pread_ns, aeg_now_ns() - t);
		times_add(&l->times.read_bufs, 1);
		times_add(&l->times.read_bytes, len);
		break;
	case AEG_FEED_MMAP:
	case AEG_FEED_MIXED:
	default:
		src = (const char *)l->map + it->begin;
		/*
		 * A cache fill takes the bytes of a registered piece back from the
		 * GPU into its cache buffer (the copy engines' other direction),
		 * so the piece must lie in the chunks: not in a header.
		 */
		if ((!l->filling || it->begin >= l->data_begin) && lane_take(pf, l)) {
			err = register_piece(pf, it, src, &refused);
			lane_give(pf, l);
			if (err == 0)
				break;
			if (!refused) {
				slot_give(pf);
				return err;
			}
			if (!__atomic_exchange_n(&l->no_register, 1, __ATOMIC_RELAXED)) {
				aeg_warn("prefetch: %s: registering its pages refused (%s: %s); reading it through the pinned pool instead",
					 l->path, aeg_errname(err), aeg_error_detail());
				pthread_mutex_lock(&pf->lock);
				pf->fallbacks++;
				pthread_mutex_unlock(&pf->lock);
			}
		}
		slot_give(pf);
		if (l->filling) {
			/* As the read feed fills the cache: into the piece's buffer. */
			src = aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]);
			t = aeg_now_ns();
			err = pread_full(l, l->fd, (void *)src, len, it->begin);
			if (err)
				return item_abort(pf, it, err);
			times_add(&l->times.pread_ns, aeg_now_ns() - t);
			times_add(&l->times.read_bufs, 1);
			times_add(&l->times.read_bytes, len);
			break;
		}
		err = read_through_ring(pf, it);
		if (err)
			return err;
		ib = batch_new(pf, it, -1, mask);
		if (ib == NULL) {
			sync_streams(pf);       /* the ring's copies give their places back */
			return aeg_fail(AEG_ENOMEM, "%s: out of memory", l->path);
		}
		t = aeg_now_ns();
		err = record_chunks(pf, it);
		if (err == 0)
			err = batch_launch(pf, ib, mask);
		submit_timed(l, t);
		if (err) {
			sync_streams(pf);
			free(ib);
		}
		return err;
	}

	ib = batch_new(pf, it, -1, mask);
	if (ib == NULL)
		return item_abort(pf, it, AEG_ENOMEM);
	t = aeg_now_ns();
	err = copy_chunks(pf, l, it->begin, it->end, (char *)src, 0);
	if (err == 0)
		err = record_chunks(pf, it);
	if (err == 0 && l->filling && it->reg)
		err = copy_chunks(pf, l, it->begin, it->end,
				  aeg_pool_buffer_ptr(pf->pool, l->entry->bufs[it->index]), 1);
	if (err == 0)
		err = batch_launch(pf, ib, mask);
	submit_timed(l, t);
	if (err) {
		item_abort(pf, it, err);
		free(ib);
		return err;
	}
	return 0;
}

/* ------------------------------------------------------------- workers */

/* The next item of the highest-priority load whose feed has room. Lock held. */
static struct aeg_load *pick(struct aeg_prefetch *pf)
{
	struct aeg_load *best = NULL;
	uint32_t reg_limit = 2 * (uint32_t)pf->nworkers;

	if (pf->held)
		return NULL;
	for (struct aeg_load *l = pf->loads; l; l = l->next) {
		if (!l->in_flight || l->next_item >= l->nitems)
			continue;
		if (l->feed == AEG_FEED_READ && !l->filling &&
		    pf->ring_in_use >= (uint32_t)pf->cfg.ring_buffers)
			continue;
		if (mapped(l) && pf->registered >= reg_limit)
			continue;
		if (best == NULL || l->priority > best->priority ||
		    (l->priority == best->priority && l->id < best->id))
			best = l;
	}
	return best;
}

static void finish_load(struct aeg_prefetch *pf, struct aeg_load *l);

/* Bind this worker near the GPU by @topo; lock held, dropped meanwhile. */
static void bind_worker(struct aeg_prefetch *pf, const aeg_topo_t *topo, int index)
{
	int err;

	pthread_mutex_unlock(&pf->lock);
	err = aeg_topo_bind_thread(topo, pf->pci);
	if (err)
		aeg_debug("prefetch: worker %d not bound near %s: %s", index, pf->pci, aeg_error_detail());
	pthread_mutex_lock(&pf->lock);
	if (!err)
		pf->bound++;
}

void *prefetch_worker(void *p)
{
	struct worker_arg *wa = p;
	struct aeg_prefetch *pf = wa->pf;
	int index = wa->index, bound = 0;

	free(wa);
	pthread_mutex_lock(&pf->lock);
	for (;;) {
		struct aeg_load *l;
		struct item *it;
		aeg_prefetch_hook_fn hook;
		void *hook_arg;
		int err;

		/*
		 * The topology may come after the engine (aeg_prefetch_set_topo:
		 * a fresh process discovers it off its first load's path): a
		 * worker binds itself once, between pieces, when it has one.
		 */
		if (!bound && pf->cfg.topo != NULL && pf->pci[0]) {
			bound = 1;
			bind_worker(pf, pf->cfg.topo, index);
			continue;
		}
		if (pf->retired) {
			/*
			 * cudaHostUnregister waits for the whole device to go idle,
			 * so unregistering piece by piece would drain the copy
			 * pipeline each time: copied pieces stay registered until
			 * their load finishes, up to DEFERRED_UNREGISTER_BYTES.
			 */
			it = pf->retired;
			pf->retired = it->next;
			if (pf->deferred_bytes + it->reg_bytes <= DEFERRED_UNREGISTER_BYTES) {
				pf->deferred_bytes += it->reg_bytes;
				it->next = it->load->unreg;
				it->load->unreg = it;
			} else {
				pthread_mutex_unlock(&pf->lock);
				aeg_host_unregister(pf->dev, it->reg);
				pthread_mutex_lock(&pf->lock);
				it->reg = NULL;
			}
			pf->registered--;
			it->load->items_left--;
			prefetch_queue_finish(pf, it->load);
			pthread_cond_broadcast(&pf->work_cv);
			continue;
		}
		if (pf->finishing) {
			l = pf->finishing;
			pf->finishing = l->finish_next;
			pthread_mutex_unlock(&pf->lock);
			finish_load(pf, l);
			pthread_mutex_lock(&pf->lock);
			continue;
		}
		if (pf->quit)
			break;
		l = pick(pf);
		if (l == NULL) {
			pthread_cond_wait(&pf->work_cv, &pf->lock);
			continue;
		}
		it = &l->items[l->next_item++];
		l->issuing++;
		if (l->feed == AEG_FEED_READ && !l->filling)
			pf->ring_in_use++;
		if (mapped(l))
			pf->registered++;
		hook = pf->hook;
		hook_arg = pf->hook_arg;
		pthread_mutex_unlock(&pf->lock);

		err = hook ? hook(hook_arg, l->id, it->index) : 0;
		if (err)
			aeg_fail(err, "%s: piece %u failed (injected)", l->path, it->index);
		pthread_mutex_lock(&pf->lock);
		/* A load stopped (cancelled) while this piece was picked queues nothing more. */
		if (err == 0 && l->stop_err != 0)
			err = l->stop_err;
		if (err) {
			if (l->feed == AEG_FEED_READ && !l->filling)
				pf->ring_in_use--;
			if (mapped(l))
				pf->registered--;
		}
		pthread_mutex_unlock(&pf->lock);
		if (err == 0)
			err = run_item(pf, it);

		pthread_mutex_lock(&pf->lock);
		l->issuing--;
		if (err) {
			l->items_left--;
			prefetch_load_stop(pf, l, err, aeg_error_detail());
		}
		prefetch_queue_finish(pf, l);
	}
	pthread_mutex_unlock(&pf->lock);
	return NULL;
}

static double ms_since(uint64_t ns, uint64_t start)
{
	return ns > start ? (double)(ns - start) / 1e6 : 0.0;
}

/* Where the load's time went (AEGAEON_LOG=debug): docs/benchmarks.md reads these. */
static void log_times(const struct aeg_prefetch *pf, const struct aeg_load *l)
{
	const struct feed_times *t = &l->times;
	uint64_t s = l->start_ns, pool_ns = __atomic_load_n(&pf->pool_ns, __ATOMIC_RELAXED);
	const char *feed = aeg_prefetch_feed_name(l->filling ? AEG_FEED_READ : l->feed);
	const char *pool = "";

	/* The pool given later (pool_ns) came during the load, after it, or before it began. */
	if (pool_ns == 0 && __atomic_load_n(&pf->pool, __ATOMIC_RELAXED) == NULL)
		pool = __atomic_load_n(&pf->pool_err, __ATOMIC_RELAXED) ? "; no pinned pool (it failed)" : "; no pinned pool yet";
	else if (pool_ns <= s)
		pool = "; the pinned pool was there before it began";
	aeg_debug("prefetch: load %" PRIu64 " (%s feed, %.2f GiB): first chunk after %.1f ms; a quarter, half, "
		  "three quarters, all of the bytes on the GPU after %.1f / %.1f / %.1f / %.1f ms%s",
		  l->id, feed, (double)l->total_bytes / (1u << 30), ms_since(l->first_ns, s),
		  ms_since(l->quarter_ns[0], s), ms_since(l->quarter_ns[1], s), ms_since(l->quarter_ns[2], s),
		  ms_since(l->landed_ns, s), pool);
	if (pool_ns > s)
		aeg_debug("prefetch: load %" PRIu64 ": the pinned pool came after %.1f ms", l->id, ms_since(pool_ns, s));
	aeg_debug("prefetch: load %" PRIu64 ": registered %.2f GiB in %" PRIu64 " pieces (populating %.1f ms, "
		  "registering %.1f ms); read %.2f GiB into %" PRIu64 " buffers (waiting for a buffer %.1f ms, "
		  "reading %.1f ms); %" PRIu64 " submissions %.1f ms, the longest %.2f ms (summed over workers)",
		  l->id, (double)t->reg_bytes / (1u << 30), t->reg_pieces, (double)t->populate_ns / 1e6,
		  (double)t->register_ns / 1e6, (double)t->read_bytes / (1u << 30), t->read_bufs,
		  (double)t->ring_wait_ns / 1e6, (double)t->pread_ns / 1e6, t->submits, (double)t->submit_ns / 1e6,
		  (double)t->submit_max_ns / 1e6);
}

static int file_changed(struct aeg_load *l)
{
	struct stat now;

	if (fstat(l->fd, &now) != 0)
		return aeg_fail(AEG_EIO, "%s: fstat: %s", l->path, strerror(errno));
	if (now.st_size != l->st.st_size || now.st_mtim.tv_sec != l->st.st_mtim.tv_sec ||
	    now.st_mtim.tv_nsec != l->st.st_mtim.tv_nsec)
		return aeg_fail(AEG_ESTALE,
				"%s: changed while loading (size %jd -> %jd, mtime %jd.%09ld -> %jd.%09ld); load it again",
				l->path, (intmax_t)l->st.st_size, (intmax_t)now.st_size,
				(intmax_t)l->st.st_mtim.tv_sec, l->st.st_mtim.tv_nsec,
				(intmax_t)now.st_mtim.tv_sec, now.st_mtim.tv_nsec);
	return 0;
}

/*
 * Fail the chunks not loaded (with @all, every chunk), those whose event
 * was never recorded included: their waiters would wait forever. Lock held;
 * nothing is issuing, so no record races this.
 */
static void fail_chunks(struct aeg_load *l, int err, int all)
{
	for (uint32_t c = 0; c < l->nchunks; c++) {
		struct chunk_rt *rt = &l->rt[c];

		if (rt->state == CH_PENDING || !rt->recorded || (all && rt->state == CH_DONE)) {
			if (rt->state == CH_DONE) {
				l->done_chunks--;
				l->done_bytes -= l->chunks[c].size;
			}
			rt->state = CH_FAILED;
			aeg_event_fail(rt->ev, err);
		}
	}
}

/*
 * Every piece of @l is done: settle the load (its status, the chunks of a
 * failed load, the cache entry it filled), wake its waiters, then give back
 * what the host side still holds. Unregistering is left until after the
 * wake-up: it takes about 10 ms per GiB, and the bytes are on the GPU.
 */
static void finish_load(struct aeg_prefetch *pf, struct aeg_load *l)
{
	char detail[sizeof(l->detail)];
	uint32_t done, recorded, unreg_pieces = 0;
	uint64_t unreg_bytes = 0, t0;
	struct item *unreg;
	int err;

	pthread_mutex_lock(&pf->lock);
	err = l->stop_err;
	done = l->done_chunks;
	recorded = l->recorded_chunks;
	snprintf(detail, sizeof(detail), "%s", l->detail);
	unreg = l->unreg;
	l->unreg = NULL;
	pthread_mutex_unlock(&pf->lock);

	if (err == 0 && l->feed != AEG_FEED_CACHE) {
		err = file_changed(l);
		if (err)
			snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
	}
	if (err == 0 && (done != l->nchunks || recorded != l->nchunks)) {
		err = aeg_fail(AEG_EIO, "%s: %u of %u chunks loaded, %u recorded", l->path, done,
			       l->nchunks, recorded);
		snprintf(detail, sizeof(detail), "%s", aeg_error_detail());
	}

	/* The mapping holds the file on its own; the caller may count its fds. */
	if (l->dfd >= 0)
		close(l->dfd);
	l->dfd = -1;
	close(l->fd);
	l->fd = -1;

	pthread_mutex_lock(&pf->lock);
	if (err)
		fail_chunks(l, err, err == AEG_ESTALE);
	if (l->entry) {
		if (l->filling && err == 0) {
			l->entry->refs--;
			prefetch_cache_link(pf, l->entry);
		} else {
			prefetch_cache_unref(pf, l->entry);
		}
		l->entry = NULL;
	}
	l->status = err;
	if (err)
		snprintf(l->detail, sizeof(l->detail), "%s", detail);
	l->end_ns = aeg_now_ns();
	if (err == 0 && l->landed_ns)
		aeg_span_add("load", l->start_ns, l->landed_ns);     /* kept before a waiter wakes */
	l->in_flight = 0;
	aeg_loads_end();
	prefetch_slots_drop(pf, 0);
	l->cleaning = 1;
	pthread_cond_broadcast(&pf->done_cv);
	pthread_mutex_unlock(&pf->lock);
	if (err)
		aeg_info("prefetch: load %" PRIu64 " of %s failed: %s", l->id, l->path, detail);
	else if (l->landed_ns)
		log_times(pf, l);

	/* Every copy of this load has run (item_done saw each piece). */
	t0 = aeg_now_ns();
	for (struct item *it = unreg; it; it = it->next) {
		aeg_host_unregister(pf->dev, it->reg);
		it->reg = NULL;
		unreg_bytes += it->reg_bytes;
		unreg_pieces++;
	}
	if (unreg_pieces)
		aeg_debug("prefetch: load %" PRIu64 ": %u pieces (%" PRIu64 " MiB) unregistered in %.1f ms",
			  l->id, unreg_pieces, unreg_bytes >> 20, (double)(aeg_now_ns() - t0) / 1e6);
	if (l->map)
		munmap(l->map, l->map_bytes);
	l->map = NULL;

	pthread_mutex_lock(&pf->lock);
	pf->deferred_bytes -= unreg_bytes;
	l->cleaning = 0;
	pthread_cond_broadcast(&pf->done_cv);
	prefetch_load_maybe_free(pf, l);
	pthread_mutex_unlock(&pf->lock);
}

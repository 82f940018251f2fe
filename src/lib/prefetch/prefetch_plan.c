/* The prefetch engine's plan of one file: its chunks, blocks, tensors, pieces, feed and events. */
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
#include "safetensors.h"
#include "slab_internal.h"
#include "slice_plan.h"

static int open_file(const char *path, struct stat *st, int *fdp)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);

	if (fd < 0) {
		int e = errno;

		if (e == ENOENT || e == ENOTDIR)
			return aeg_fail(AEG_ENOENT, "%s: no such file", path);
		if (e == EACCES || e == EPERM)
			return aeg_fail(AEG_EACCES, "%s: permission denied (need read access)", path);
		return aeg_fail(AEG_EIO, "%s: open: %s", path, strerror(e));
	}
	if (fstat(fd, st) != 0) {
		int e = errno;

		close(fd);
		return aeg_fail(AEG_EIO, "%s: fstat: %s", path, strerror(e));
	}
	if (S_ISDIR(st->st_mode)) {
		close(fd);
		return aeg_fail(AEG_EINVAL, "%s is a directory: give a model file (e.g. one .safetensors file)",
				path);
	}
	if (!S_ISREG(st->st_mode)) {
		close(fd);
		return aeg_fail(AEG_EINVAL, "%s is not a regular file", path);
	}
	*fdp = fd;
	return 0;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int add_group(struct aeg_load *l, uint64_t begin, uint64_t bytes, uint64_t chunk_bytes,
		     uint32_t *gcap, uint32_t *ccap)
{
	uint32_t n = (uint32_t)((bytes + chunk_bytes - 1) / chunk_bytes);
	struct group *g;

	if (l->ngroups == *gcap) {
		uint32_t cap = *gcap ? 2 * *gcap : 64;
		void *p = realloc(l->groups, cap * sizeof(*l->groups));

		if (p == NULL)
			return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		l->groups = p;
		*gcap = cap;
	}
	while (l->nchunks + n > *ccap) {
		uint32_t cap = *ccap ? 2 * *ccap : 64;
		void *p = realloc(l->chunks, cap * sizeof(*l->chunks));

		if (p == NULL)
			return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		l->chunks = p;
		*ccap = cap;
	}
	g = &l->groups[l->ngroups];
	memset(g, 0, sizeof(*g));
	g->file_begin = begin;
	g->bytes = bytes;
	g->first_chunk = l->nchunks;
	g->nchunks = n;
	for (uint32_t i = 0; i < n; i++) {
		struct aeg_chunk *c = &l->chunks[l->nchunks++];
		uint64_t off = (uint64_t)i * chunk_bytes;

		memset(c, 0, sizeof(*c));
		c->file_offset = begin + off;
		c->size = bytes - off < chunk_bytes ? bytes - off : chunk_bytes;
	}
	l->ngroups++;
	return 0;
}

/* Tensor @i's bytes as the load places them: where they start (out_of's offsets) and how many. */
static void tensor_place(const struct aeg_load *l, size_t i, uint64_t *begin, uint64_t *bytes)
{
	const struct aeg_st_tensor *t = &l->hdr.tensors[i];

	if (l->plan.spec) {
		*begin = l->plan.spans[i].out;
		*bytes = l->plan.spans[i].bytes;
	} else {
		*begin = l->data_begin + t->begin;
		*bytes = t->end - t->begin;
	}
}

/*
 * Cut the file into groups and chunks: small tensors packed greedily into a
 * chunk, a tensor over chunk_bytes alone in a group of several chunks; a
 * raw file in chunks of chunk_bytes, each its own group. A sliced load's
 * tensors are its parts, packed the same way.
 */
static int plan_chunks(struct aeg_load *l, uint64_t chunk_bytes, int safetensors)
{
	uint32_t gcap = 0, ccap = 0;
	uint64_t size = (uint64_t)l->st.st_size;
	uint64_t open_begin = 0, open_bytes = 0;
	int err;

	if (!safetensors) {
		for (uint64_t off = 0; off < size; off += chunk_bytes) {
			err = add_group(l, off, size - off < chunk_bytes ? size - off : chunk_bytes,
					chunk_bytes, &gcap, &ccap);
			if (err)
				return err;
		}
		return 0;
	}
	for (size_t i = 0; i < l->hdr.count; i++) {
		uint64_t begin, bytes;

		tensor_place(l, i, &begin, &bytes);
		if (bytes == 0)
			continue;
		if (open_bytes && open_bytes + bytes <= chunk_bytes) {
			open_bytes += bytes;
			continue;
		}
		if (open_bytes) {
			err = add_group(l, open_begin, open_bytes, chunk_bytes, &gcap, &ccap);
			if (err)
				return err;
			open_bytes = 0;
		}
		if (bytes > chunk_bytes) {
			err = add_group(l, begin, bytes, chunk_bytes, &gcap, &ccap);
			if (err)
				return err;
		} else {
			open_begin = begin;
			open_bytes = bytes;
		}
	}
	if (open_bytes)
		return add_group(l, open_begin, open_bytes, chunk_bytes, &gcap, &ccap);
	return 0;
}

/* A sliced load's plan of its parts; nothing for a whole one. */
static int plan_slice(struct aeg_load *l, const struct aeg_slice *slice, int safetensors)
{
	char what[128];
	int err;

	if (slice == NULL)
		return 0;
	if (!safetensors)
		return aeg_fail(AEG_EINVAL, "%s: not a safetensors file: a tensor-parallel slice needs its tensors", l->path);
	err = slice_plan_make(slice, &l->hdr, l->path, &l->plan);
	if (err == 0) {
		slice_describe(slice, what, sizeof(what));
		aeg_debug("prefetch: %s: slice %s: %" PRIu64 " of %" PRIu64 " data bytes", l->path, what,
			  l->plan.out_end - l->plan.out_begin, l->hdr.data_bytes);
	}
	return err;
}

static void free_blocks(struct aeg_prefetch *pf, struct aeg_load *l, uint32_t upto)
{
	for (uint32_t g = 0; g < upto; g++)
		aeg_slab_free(pf->slab, l->groups[g].block.id);
}

static int alloc_blocks(struct aeg_prefetch *pf, struct aeg_load *l)
{
	struct aeg_slab_stats ss;
	uint64_t need = 0;
	char a[32], b[32], t[32];
	int err;

	for (uint32_t g = 0; g < l->ngroups; g++)
		need += aeg_round_up(l->groups[g].bytes, AEG_SLAB_ALIGN);
	err = aeg_slab_stats(pf->slab, &ss);
	if (err)
		return err;
	if (need > ss.free_bytes)
		return aeg_fail(AEG_ENOSPC,
				"%s: needs %s (%" PRIu64 " bytes in %u block%s) in the slab of GPU %d, which has %s free of %s",
				l->path, aeg_size_format(need, a, sizeof(a)), need, l->ngroups, l->ngroups == 1 ? "" : "s", pf->gpu,
				aeg_size_format(ss.free_bytes, b, sizeof(b)),
				aeg_size_format(ss.total_bytes, t, sizeof(t)));
	/* A reserved slab maps the load's memory in one piece, not a piece per block (a hint). */
	aeg_slab_map_ahead(pf->slab, need);
	for (uint32_t g = 0; g < l->ngroups; g++) {
		err = aeg_slab_alloc(pf->slab, l->groups[g].bytes, &l->groups[g].block);
		if (err) {
			aeg_error_prefix("%s: block %u of %u (%s asked in all, %s free)", l->path, g + 1,
					 l->ngroups, aeg_size_format(need, a, sizeof(a)),
					 aeg_size_format(ss.free_bytes, b, sizeof(b)));
			free_blocks(pf, l, g);
			return err;
		}
	}
	for (uint32_t g = 0; g < l->ngroups; g++) {
		struct group *gr = &l->groups[g];

		for (uint32_t c = gr->first_chunk; c < gr->first_chunk + gr->nchunks; c++) {
			uint64_t in = l->rt[c].out - gr->file_begin;

			l->chunks[c].device_ptr = (char *)gr->block.ptr + in;
			l->chunks[c].slab_id = gr->block.id;
			l->chunks[c].slab_offset = gr->block.offset + in;
			l->rt[c].group = g;
		}
	}
	l->live_groups = l->ngroups;
	return 0;
}

static int build_tensors(struct aeg_load *l)
{
	if (l->hdr.count == 0)
		return 0;
	l->tensors = calloc(l->hdr.count, sizeof(*l->tensors));
	if (l->tensors == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %zu tensors", l->hdr.count);
	for (size_t i = 0; i < l->hdr.count; i++) {
		const struct aeg_st_tensor *t = &l->hdr.tensors[i];
		struct aeg_tensor *o = &l->tensors[i];
		uint64_t off, bytes;
		uint32_t c;

		tensor_place(l, i, &off, &bytes);
		c = chunk_at(l, off);
		o->name = t->name;
		o->dtype = t->dtype;
		o->ndim = t->ndim;
		o->shape = l->plan.spec ? l->plan.spans[i].shape : t->shape;
		o->size = bytes;
		o->file_offset = l->plan.spec ? l->plan.spans[i].src : off;
		o->slice_dim = l->plan.spec ? l->plan.spans[i].dim : AEG_SLICE_WHOLE;
		o->slice_start = l->plan.spec ? l->plan.spans[i].start : 0;
		o->slice_extent = l->plan.spec ? l->plan.spans[i].extent : 0;
		if (c == l->nchunks && c > 0 && bytes == 0)
			c--;            /* an empty tensor at the very end */
		o->first_chunk = c;
		o->chunks = bytes ? chunk_at(l, off + bytes - 1) - c + 1 : 0;
		if (c < l->nchunks) {
			const struct group *g = &l->groups[l->rt[c].group];

			o->device_ptr = (char *)g->block.ptr + (off - g->file_begin);
		}
	}
	l->ntensors = (uint32_t)l->hdr.count;
	return 0;
}

/* Emit pieces of @B bytes over [b, e) into @items (NULL: count only) from index @n; returns the new count. */
static uint32_t cut_pieces(struct item *items, uint32_t n, uint64_t b, uint64_t e, uint64_t B)
{
	for (uint64_t at = b; at < e; at += B, n++) {
		if (items) {
			items[n].begin = at;
			items[n].end = e - at < B ? e : at + B;
		}
	}
	return n;
}

/*
 * A sliced load reads only the pages its parts lie in: each part's file
 * range, page-aligned (pieces are registered whole pages), merged with the
 * previous one where they touch, cut into pieces of @B. A part split along
 * a later dimension is read whole, rows and all: its rows interleave the
 * other ranks' parts, usually within a page.
 */
static uint32_t slice_pieces(const struct aeg_load *l, uint64_t B, struct item *items)
{
	uint64_t size = (uint64_t)l->st.st_size, rb = 0, re = 0;
	uint32_t n = 0;

	for (size_t i = 0; i < l->plan.count; i++) {
		const struct slice_span *t = &l->plan.spans[i];
		uint64_t b = t->src / PAGE * PAGE, e = aeg_round_up(slice_file_end(t), PAGE);

		if (t->bytes == 0)
			continue;
		if (e > size)
			e = size;
		if (re > rb && b <= re) {
			re = e > re ? e : re;
			continue;
		}
		n = cut_pieces(items, n, rb, re, B);
		rb = b;
		re = e;
	}
	return cut_pieces(items, n, rb, re, B);
}

/* The chunks piece @it fills (none: first > last), each counting it as pending. */
static void piece_chunks(struct aeg_load *l, struct item *it)
{
	uint64_t ob = out_of(l, it->begin), oe = out_of(l, it->end);

	it->first_chunk = chunk_at(l, ob);
	it->last_chunk = it->first_chunk;
	if (it->first_chunk >= l->nchunks || l->rt[it->first_chunk].out >= oe) {
		it->first_chunk = 1;
		it->last_chunk = 0;
		return;
	}
	while (it->last_chunk + 1 < l->nchunks && l->rt[it->last_chunk + 1].out < oe)
		it->last_chunk++;
	for (uint32_t c = it->first_chunk; c <= it->last_chunk; c++)
		l->rt[c].pending++;
}

static int plan_items(struct aeg_prefetch *pf, struct aeg_load *l)
{
	uint64_t size = (uint64_t)l->st.st_size;
	uint64_t B = l->item_bytes;

	if (l->nchunks == 0 && !l->filling)
		return 0;
	l->item_base = l->filling || l->feed == AEG_FEED_CACHE ? 0 : l->data_begin / B * B;
	if (l->plan.spec)
		l->nitems = slice_pieces(l, B, NULL);
	else
		l->nitems = (uint32_t)((size - l->item_base + B - 1) / B);
	l->items = calloc(l->nitems ? l->nitems : 1, sizeof(*l->items));
	if (l->items == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %u pieces", l->nitems);
	if (l->plan.spec)
		slice_pieces(l, B, l->items);
	else
		cut_pieces(l->items, 0, l->item_base, size, B);
	for (uint32_t k = 0; k < l->nitems; k++) {
		struct item *it = &l->items[k];

		it->load = l;
		it->index = k;
		it->buf = -1;
		piece_chunks(l, it);
	}
	return 0;
}

static void choose_feed(struct aeg_prefetch *pf, struct aeg_load *l,
			const struct aeg_prefetch_options *o)
{
	int use_cache = pf->cfg.cache_bytes > 0 && o->feed == AEG_FEED_AUTO &&
			!(o->flags & AEG_PREFETCH_NO_CACHE) && l->plan.spec == NULL;
	int ring_later = 0;

	pthread_mutex_lock(&pf->lock);
	if (use_cache) {
		l->entry = prefetch_cache_lookup(pf, l->path, &l->st);
		if (l->entry) {
			pf->hits++;
			l->feed = AEG_FEED_CACHE;
			l->item_bytes = pf->buffer_bytes;
			pthread_mutex_unlock(&pf->lock);
			return;
		}
		pf->misses++;
		l->entry = prefetch_cache_reserve(pf, l->path, &l->st);
		l->filling = l->entry != NULL;
	}
	pthread_mutex_unlock(&pf->lock);

	/*
	 * AUTO: through a staging ring, or slots carved from the pool's
	 * buffers, every file is READ (small buffers are read from the CPU's
	 * cache; registering pieces beside them only holds their submissions
	 * up), waiting for the ring if it is still being made. With a pool
	 * given later that is not there yet (a job's, seconds to make), a
	 * small file is mapped and a large one MIXED, registering every piece
	 * until the pool comes and reading through it from then on
	 * (lane_take). Else small files READ, large MIXED.
	 */
	l->feed = o->feed;
	pthread_mutex_lock(&pf->lock);
	if (l->feed == AEG_FEED_AUTO) {
		if ((pf->staging_ring || (pf->slots_per_buf && pf->pool != NULL)) && !l->filling) {
			l->feed = AEG_FEED_READ;
			ring_later = pf->pool == NULL;
		} else if (pf->pool == NULL)
			l->feed = (uint64_t)l->st.st_size < pf->cfg.small_file_bytes ? AEG_FEED_MMAP : AEG_FEED_MIXED;
		else
			l->feed = (uint64_t)l->st.st_size < pf->cfg.small_file_bytes ? AEG_FEED_READ : AEG_FEED_MIXED;
	}
	pthread_mutex_unlock(&pf->lock);
	if (ring_later && l->st.st_size > 0) {
		/* Mapped too: should the ring fail, its pieces are registered instead (run_item). */
		l->map_bytes = (size_t)l->st.st_size;
		l->map = mmap(NULL, l->map_bytes, PROT_READ, MAP_SHARED, l->fd, 0);
		if (l->map == MAP_FAILED)
			l->map = NULL;
	} else if (mapped(l) && l->st.st_size > 0) {
		l->map_bytes = (size_t)l->st.st_size;
		l->map = mmap(NULL, l->map_bytes, PROT_READ, MAP_SHARED, l->fd, 0);
		if (l->map == MAP_FAILED) {
			aeg_warn("prefetch: %s: mmap refused (%s); reading it through the pinned pool instead",
				 l->path, strerror(errno));
			l->map = NULL;
			l->feed = AEG_FEED_READ;
			pthread_mutex_lock(&pf->lock);
			pf->fallbacks++;
			pthread_mutex_unlock(&pf->lock);
		}
	}
	/* A cache fill goes piece by piece into the entry's buffers; a READ piece fills a slot or buffer. */
	l->item_bytes = l->filling ? pf->buffer_bytes : mapped(l) ? pf->cfg.piece_bytes : pf->read_bytes;
	if (l->feed == AEG_FEED_READ && pf->cfg.direct_io && !l->filling) {
		l->dfd = open(l->path, O_RDONLY | O_CLOEXEC | O_DIRECT);
		if (l->dfd < 0)
			aeg_info("prefetch: %s: O_DIRECT refused (%s); reading through the page cache",
				 l->path, strerror(errno));
	}
}

static int make_events(struct aeg_prefetch *pf, struct aeg_load *l, uint32_t *made)
{
	int err;

	for (*made = 0; *made < l->nchunks; (*made)++) {
		uint32_t c = *made;

		err = aeg_event_create(pf->dev, pf->gpu, &l->rt[c].ev, &l->chunks[c].event);
		if (err) {
			/* The driver's interprocess events are limited: thousands, not millions. */
			aeg_error_prefix("%s: the event of chunk %u of %u (every chunk has one: a larger chunk size makes fewer)",
					 l->path, c, l->nchunks);
			return err;
		}
		l->rt[c].unqueued = l->rt[c].pending;
		err = aeg_event_arm(l->rt[c].ev);
		if (err) {
			(*made)++;
			return err;
		}
	}
	return 0;
}

/* The options of aeg_prefetch_file; the chunk size's fit in the slab is checked once the file's size is known. */
static int check_options(const char *path, const struct aeg_prefetch_options *o)
{
	if (o->chunk_bytes == 0)
		return aeg_fail(AEG_EINVAL, "%s: chunk size 0: give a chunk size such as 64MiB", path);
	if (o->chunk_bytes % AEG_PREFETCH_CHUNK_ALIGN)
		return aeg_fail(AEG_EINVAL, "%s: chunk size %" PRIu64 " bytes is not a multiple of 4 KiB (4096 bytes)",
				path, o->chunk_bytes);
	if (o->feed != AEG_FEED_AUTO && o->feed != AEG_FEED_MMAP && o->feed != AEG_FEED_READ &&
	    o->feed != AEG_FEED_MIXED)
		return aeg_fail(AEG_EINVAL, "prefetch feed %d: expected auto, mmap, read or mixed", (int)o->feed);
	if (o->format != AEG_FORMAT_AUTO && o->format != AEG_FORMAT_RAW &&
	    o->format != AEG_FORMAT_SAFETENSORS)
		return aeg_fail(AEG_EINVAL, "prefetch format %d: expected auto, raw or safetensors",
				(int)o->format);
	if (o->flags & ~AEG_PREFETCH_NO_CACHE)
		return aeg_fail(AEG_EINVAL, "prefetch flags 0x%x: unknown bits", o->flags);
	return 0;
}

/*
 * The chunk size a load of @l uses: @chunk_bytes, or for a file smaller
 * than that its size rounded up to 4 KiB (one chunk of it), so a site's
 * large default chunk loads small files into a small slab, whoever asks
 * (the CLI, the agent's --prefetch, Python, sessions). A chunk cut from a
 * larger file must fit the slab; a file of one chunk that does not is
 * told by the slab's free space (alloc_blocks: what it needs, what is free).
 */
static int chunk_for(aeg_prefetch_t *pf, const struct aeg_load *l, uint64_t chunk_bytes, uint64_t *out)
{
	uint64_t file = aeg_round_up((uint64_t)l->st.st_size, AEG_PREFETCH_CHUNK_ALIGN);
	uint64_t slab_bytes = aeg_slab_bytes(pf->slab);

	if (file == 0)
		file = AEG_PREFETCH_CHUNK_ALIGN;
	*out = chunk_bytes < file ? chunk_bytes : file;
	if (*out < file && *out > slab_bytes)
		return aeg_fail(AEG_EINVAL, "%s: chunk size %" PRIu64 " is larger than the slab (%" PRIu64 " bytes)",
				l->path, *out, slab_bytes);
	return 0;
}

/* Safetensors by content, and a file named so must be one: 1 when it is, 0 when raw, or an error. */
static int read_format(struct aeg_load *l, enum aeg_prefetch_format format)
{
	int err = 0;

	if (format == AEG_FORMAT_SAFETENSORS)
		err = aeg_st_read(l->fd, (uint64_t)l->st.st_size, &l->hdr) ?: 1;
	else if (format == AEG_FORMAT_AUTO)
		err = aeg_st_detect(l->fd, (uint64_t)l->st.st_size, ends_with(l->path, ".safetensors"), &l->hdr);
	if (err < 0) {
		aeg_error_prefix("%s", l->path);
		return err;
	}
	if (err == 1)
		l->data_begin = l->hdr.data_offset;
	return err;
}

/* Hand @l to the workers: AEG_ECANCELED when the engine is shutting down. */
static int publish(struct aeg_prefetch *pf, struct aeg_load *l)
{
	pthread_mutex_lock(&pf->lock);
	if (pf->quit) {
		pthread_mutex_unlock(&pf->lock);
		return aeg_fail(AEG_ECANCELED, "prefetch engine is shutting down");
	}
	l->id = pf->next_id++;
	l->in_flight = 1;
	aeg_loads_begin();
	l->items_left = l->nitems;
	l->status = AEG_EBUSY;
	l->next = pf->loads;
	if (pf->loads)
		pf->loads->prev = l;
	pf->loads = l;
	prefetch_queue_finish(pf, l);
	/*
	 * A held engine's workers take no item (pick()), and the hold's end wakes
	 * them: waking them for each file of a many-file start only made them
	 * fight the starting thread for the lock.
	 */
	if (!pf->held)
		pthread_cond_broadcast(&pf->work_cv);
	pthread_mutex_unlock(&pf->lock);
	return 0;
}

AEG_EXPORT int aeg_prefetch_file(aeg_prefetch_t *pf, const char *path,
				 const struct aeg_prefetch_options *o, aeg_load_t **out)
{
	struct aeg_load *l;
	uint64_t chunk_bytes;
	uint32_t events = 0;
	int safetensors, blocks = 0, err;

	if (pf == NULL || path == NULL || o == NULL || out == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_prefetch_file: NULL argument");
	err = check_options(path, o);
	if (err)
		return err;

	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	l->pf = pf;
	l->handles = 1;
	l->fd = -1;
	l->dfd = -1;
	l->priority = o->priority;
	l->start_ns = aeg_now_ns();
	l->path = strdup(path);
	if (l->path == NULL) {
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
		goto fail;
	}
	err = open_file(path, &l->st, &l->fd);
	if (err == 0)
		err = chunk_for(pf, l, o->chunk_bytes, &chunk_bytes);
	if (err)
		goto fail;

	safetensors = read_format(l, o->format);
	if (safetensors < 0) {
		err = safetensors;
		goto fail;
	}
	err = plan_slice(l, o->slice, safetensors);
	if (err == 0)
		err = plan_chunks(l, chunk_bytes, safetensors);
	if (err)
		goto fail;
	l->rt = calloc(l->nchunks ? l->nchunks : 1, sizeof(*l->rt));
	if (l->rt == NULL) {
		err = aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %u chunks", l->nchunks);
		goto fail;
	}
	for (uint32_t c = 0; c < l->nchunks; c++)
		l->rt[c].out = l->chunks[c].file_offset;
	for (uint32_t g = 0; g < l->ngroups; g++)
		l->total_bytes += l->groups[g].bytes;
	err = alloc_blocks(pf, l);
	if (err)
		goto fail;
	blocks = 1;
	err = build_tensors(l);
	if (err)
		goto fail;

	choose_feed(pf, l, o);
	err = plan_items(pf, l);
	if (err)
		goto fail;
	/* What a caller reads: where each chunk's first byte is in the file. */
	for (uint32_t c = 0; l->plan.spec && c < l->nchunks; c++)
		l->chunks[c].file_offset = slice_file_of(&l->plan, l->rt[c].out);
	err = make_events(pf, l, &events);
	if (err)
		goto fail;

	err = publish(pf, l);
	if (err)
		goto fail;
	aeg_debug("prefetch: load %" PRIu64 ": %s, %jd bytes, %u chunks in %u blocks, %u tensors, feed %s",
		  l->id, path, (intmax_t)l->st.st_size, l->nchunks, l->ngroups, l->ntensors,
		  aeg_prefetch_feed_name(l->feed));
	*out = l;
	return 0;

fail:
	for (uint32_t c = 0; c < events; c++)
		if (l->rt[c].ev)
			aeg_event_destroy(l->rt[c].ev);
	if (l->entry) {
		pthread_mutex_lock(&pf->lock);
		prefetch_cache_unref(pf, l->entry);
		pthread_mutex_unlock(&pf->lock);
	}
	if (blocks)
		free_blocks(pf, l, l->ngroups);
	if (l->map)
		munmap(l->map, l->map_bytes);
	if (l->dfd >= 0)
		close(l->dfd);
	if (l->fd >= 0)
		close(l->fd);
	prefetch_load_free(l);
	return err;
}

/* The agent's loads: what later steps find by id or path, page through in status, and release. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "agent_internal.h"
#include "internal.h"
#include "slice_plan.h"

#define PREFETCH_MAX_CHUNKS (1u << 20)  /* per load: bounds the tables a client can make us build */

struct load {
	uint64_t id;                    /* the agent's: unique across slabs */
	uint32_t slab;
	aeg_load_t *handle;
	char *path;                     /* real path */
	struct stat st;                 /* identity of the file when it was loaded */
	uint32_t nchunks, nreleased;
	unsigned char *released;        /* per chunk */
	int refs;                       /* the table's, and each wait-load's */
	int close_handle;               /* when the last reference goes */
};

/* Drop a reference; the last one closes the handle (unless the engines are gone) and frees @l. */
static void load_free(struct load *l, int close_handle)
{
	if (close_handle == 0)
		l->close_handle = 0;
	if (--l->refs > 0)
		return;
	if (l->close_handle)
		aeg_load_close(l->handle);
	free(l->released);
	free(l->path);
	free(l);
}

aeg_load_t *agent_load_handle(const struct load *l)
{
	return l->handle;
}

void agent_load_put(struct load *l)
{
	load_free(l, 1);
}

/* Where load @id is in the table, or where it would go: ids ascend. */
static uint32_t find_index(const struct agent *a, uint64_t id)
{
	uint32_t lo = 0, hi = a->nloads;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;

		if (a->loads[mid]->id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static struct load *find_load(struct agent *a, uint64_t id)
{
	uint32_t i = find_index(a, id);

	return i < a->nloads && a->loads[i]->id == id ? a->loads[i] : NULL;
}

struct load *agent_load_get(struct agent *a, uint64_t id)
{
	struct load *l = find_load(a, id);

	if (l != NULL)
		l->refs++;
	return l;
}

static void remove_load(struct agent *a, uint32_t i, int close_handle)
{
	load_free(a->loads[i], close_handle);
	memmove(&a->loads[i], &a->loads[i + 1], sizeof(*a->loads) * (a->nloads - i - 1));
	a->nloads--;
}

/* A place for one more load, within the site's max_loads. */
static int make_room(struct agent *a, const char *path)
{
	uint32_t max = a->cfg->max_loads ? a->cfg->max_loads : AEG_AGENT_MAX_LOADS, cap;
	struct load **grown;
	char q[128];

	if (a->nloads >= max)
		return aeg_fail(AEG_ERANGE, "prefetch %s: the job has %" PRIu32 " loads on this node, this site's limit "
				"(max_loads); release some first (aegaeon-cli release --load ID, or --all)",
				aeg_quote(path, q, sizeof(q)), a->nloads);
	if (a->nloads < a->loads_cap)
		return 0;
	cap = a->loads_cap ? a->loads_cap * 2 : 16;
	if (cap > max)
		cap = max;
	grown = realloc(a->loads, sizeof(*grown) * cap);
	if (grown == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory for %" PRIu32 " loads", cap);
	a->loads = grown;
	a->loads_cap = cap;
	return 0;
}

/* The file to load, by its real path, checked against the chunk limit. */
static int open_load(const char *path, uint64_t chunk_bytes, struct load *l)
{
	/* The agent is the job user: the file is looked at with the job's rights, never root's. */
	l->path = realpath(path, NULL);
	if (l->path == NULL)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : errno == EACCES ? AEG_EACCES : AEG_EINVAL,
				"prefetch %s: %s", path, strerror(errno));
	if (stat(l->path, &l->st) < 0)
		return aeg_fail(AEG_EACCES, "prefetch %s: %s", l->path, strerror(errno));
	if ((uint64_t)l->st.st_size / chunk_bytes >= PREFETCH_MAX_CHUNKS)
		return aeg_fail(AEG_EINVAL, "prefetch %s: %jd bytes in chunks of %" PRIu64
				" make more than %u chunks; use larger chunks", l->path,
				(intmax_t)l->st.st_size, chunk_bytes, PREFETCH_MAX_CHUNKS);
	return 0;
}

/*
 * The bytes @l still holds of those it loaded: a load settles before any
 * of its chunks can be released, so a loaded one that holds fewer than its
 * total is partly released, which is how steps tell (the wire's done_bytes).
 */
static uint64_t held_bytes(const struct load *l, const struct aeg_load_progress *pr)
{
	const struct aeg_chunk *c;
	uint64_t live = 0, done = pr->done_bytes > pr->total_bytes ? pr->total_bytes : pr->done_bytes;
	uint32_t n;

	if (l->nreleased == 0)
		return done;
	c = aeg_load_chunks(l->handle, &n);
	for (uint32_t i = 0; i < n && i < l->nchunks; i++)
		if (!l->released[i])
			live += c[i].size;
	return live < done ? live : done;
}

/* One page of a load's live chunks. */
static int chunks_page(struct load *l, uint32_t first, struct proto_chunks_rep *rep)
{
	struct aeg_load_progress pr;
	const struct aeg_chunk *c;
	uint32_t n, live = 0;
	int err;

	err = aeg_load_progress(l->handle, &pr);
	if (err)
		return err;
	c = aeg_load_chunks(l->handle, &n);
	memset(rep, 0, offsetof(struct proto_chunks_rep, chunks));
	rep->detail[0] = '\0';
	rep->load_id = l->id;
	rep->slab = l->slab;
	rep->status = pr.status;
	/* A settled load's wait returns at once, with its error's detail. */
	if (pr.status != 0 && pr.status != AEG_EBUSY && aeg_load_wait(l->handle, 0) != 0)
		snprintf(rep->detail, sizeof(rep->detail), "%s", aeg_error_detail());
	proto_slice_set(&rep->slice, aeg_load_slice(l->handle));
	rep->file_bytes = pr.total_bytes;
	rep->done_bytes = held_bytes(l, &pr);
	rep->total = l->nchunks - l->nreleased;
	if (first > rep->total)
		return aeg_fail(AEG_EINVAL, "load %" PRIu64 " has %u chunks; page from %u asked",
				l->id, rep->total, first);
	rep->first = first;
	for (uint32_t i = 0; i < n && i < l->nchunks && rep->count < PROTO_CHUNKS_PER_PAGE; i++) {
		struct proto_chunk *pc;

		if (l->released[i])
			continue;
		if (live++ < first)
			continue;
		pc = &rep->chunks[rep->count++];
		pc->offset = c[i].slab_offset;
		pc->size = c[i].size;
		pc->file_offset = c[i].file_offset;
		pc->slab_id = c[i].slab_id;
		pc->event = c[i].event;
	}
	return 0;
}

int agent_load_start(struct agent *a, uint32_t slab, const char *path, uint64_t chunk_bytes,
		     const struct aeg_slice *slice, struct proto_chunks_rep *rep)
{
	struct aeg_prefetch_options opts = { .chunk_bytes = chunk_bytes, .slice = slice };
	char what[128] = "";
	struct load *l;
	uint32_t n;
	int err;

	if (slab >= (uint32_t)a->nslabs)
		return aeg_fail(AEG_ENODEV, "slab %u: the job has %d slab%s", slab, a->nslabs,
				a->nslabs == 1 ? "" : "s");
	if (opts.chunk_bytes == 0)
		opts.chunk_bytes = a->cfg->prefetch_chunk_bytes;
	if (opts.chunk_bytes == 0)
		return aeg_fail(AEG_EINVAL, "prefetch %s: chunk size 0", path);
	err = make_room(a, path);
	if (err)
		return err;
	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	l->refs = 1;
	l->close_handle = 1;
	err = open_load(path, opts.chunk_bytes, l);
	if (err == 0)
		err = aeg_prefetch_file(a->slabs[slab].pf, l->path, &opts, &l->handle);
	if (err) {
		load_free(l, 0);
		return err;
	}
	aeg_load_chunks(l->handle, &n);
	l->nchunks = n;
	l->released = calloc(n ? n : 1, 1);
	if (l->released == NULL) {
		load_free(l, 1);
		return aeg_fail(AEG_ENOMEM, "prefetch: out of memory");
	}
	l->slab = slab;
	l->id = ++a->next_load_id;
	a->loads[a->nloads++] = l;
	if (slice != NULL) {
		memcpy(what, ", slice ", 8);
		slice_describe(slice, what + 8, sizeof(what) - 8);
	}
	aeg_info("load %" PRIu64 ": %s into the slab of GPU %d, %u chunks%s", l->id, l->path,
		 a->slabs[slab].gpu, n, what);
	agent_ring_start(a, slab);
	return rep ? chunks_page(l, 0, rep) : 0;
}

/*
 * The newest load of @path into @slab with @slice (NULL: whole), if the
 * file is still the one loaded. A load some of whose chunks were released
 * is passed over: it is no longer the file, and a step that found it by
 * path would take what is left for the model (by its id it is still found,
 * to list or release).
 */
static int find_load_by_path(struct agent *a, uint32_t slab, const char *path, const struct aeg_slice *slice,
			     struct load **out)
{
	char real[PATH_MAX];
	struct stat st;
	uint64_t partly = 0;

	if (realpath(path, real) == NULL || stat(real, &st) < 0)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s: %s", path, strerror(errno));
	for (uint32_t i = a->nloads; i-- > 0;) {
		struct load *l = a->loads[i];

		if (l->slab != slab || strcmp(l->path, real) != 0 || !slice_equal(aeg_load_slice(l->handle), slice))
			continue;
		if (l->nreleased > 0) {
			if (partly == 0)
				partly = l->id;
			continue;
		}
		if (l->st.st_dev != st.st_dev || l->st.st_ino != st.st_ino || l->st.st_size != st.st_size ||
		    l->st.st_mtim.tv_sec != st.st_mtim.tv_sec || l->st.st_mtim.tv_nsec != st.st_mtim.tv_nsec)
			return aeg_fail(AEG_ESTALE, "%s changed since load %" PRIu64 " read it; prefetch it again",
					real, l->id);
		*out = l;
		return 0;
	}
	if (partly)
		return aeg_fail(AEG_ENOENT, "%s is not loaded into slab %u%s: some chunks of load %" PRIu64 " were "
				"released (aegaeon-cli release --load %" PRIu64 " frees the rest)", real, slab,
				slice ? " with this slice" : " whole", partly, partly);
	return aeg_fail(AEG_ENOENT, "%s is not loaded into slab %u%s", real, slab,
			slice ? " with this slice" : " whole");
}

int agent_load_chunks(struct agent *a, const struct proto_chunks_req *q, struct proto_chunks_rep *rep)
{
	struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES];
	struct aeg_slice view;
	struct load *l = NULL;
	int err = 0;

	if (q->load_id) {
		l = find_load(a, q->load_id);
		if (l == NULL)
			return aeg_fail(AEG_ENOENT, "no load %" PRIu64 " (released, or never made)", q->load_id);
	} else {
		err = find_load_by_path(a, q->slab, q->path, proto_slice_view(&q->slice, &view, rules), &l);
	}
	return err ? err : chunks_page(l, q->first, rep);
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

static uint32_t sort_unique(uint64_t *ids, uint32_t n)
{
	uint32_t k = 0;

	qsort(ids, n, sizeof(*ids), cmp_u64);
	for (uint32_t i = 0; i < n; i++)
		if (k == 0 || ids[k - 1] != ids[i])
			ids[k++] = ids[i];
	return k;
}

/* After the engine freed blocks @ids of @slab: forget their chunks, and loads they emptied. */
static void mark_released(struct agent *a, uint32_t slab, uint64_t *ids, uint32_t count)
{
	qsort(ids, count, sizeof(*ids), cmp_u64);
	for (uint32_t k = 0; k < a->nloads;) {
		struct load *l = a->loads[k];
		const struct aeg_chunk *c;
		uint32_t n, hit = 0;

		if (l->slab != slab) {
			k++;
			continue;
		}
		c = aeg_load_chunks(l->handle, &n);
		for (uint32_t i = 0; i < n && i < l->nchunks; i++) {
			if (!l->released[i] && bsearch(&c[i].slab_id, ids, count, sizeof(*ids), cmp_u64)) {
				l->released[i] = 1;
				l->nreleased++;
				hit = 1;
			}
		}
		if (hit && l->nreleased == l->nchunks)
			remove_load(a, k, 1);
		else
			k++;
	}
}

/* Free blocks @ids of slab @s (their chunks and events); all are checked before any goes. */
static int release_blocks(struct agent *a, int s, uint64_t *ids, uint32_t n)
{
	int err = aeg_prefetch_release(a->slabs[s].pf, ids, n);

	if (!err)
		mark_released(a, (uint32_t)s, ids, n);
	return err;
}

static int release_ids(struct agent *a, const struct proto_release_req *q, uint32_t *released)
{
	uint64_t *ids;
	int err = 0;

	for (uint32_t i = 0; i < q->count; i++)
		if (q->ids[i].slab >= (uint32_t)a->nslabs)
			return aeg_fail(AEG_ENODEV, "release: slab %u, the job has %d", q->ids[i].slab, a->nslabs);
	ids = malloc(sizeof(*ids) * (q->count ? q->count : 1));
	if (ids == NULL)
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	/* One engine call per slab. */
	for (int s = 0; s < a->nslabs && !err; s++) {
		uint32_t n = 0;

		for (uint32_t i = 0; i < q->count; i++)
			if (q->ids[i].slab == (uint32_t)s)
				ids[n++] = q->ids[i].slab_id;
		if (n == 0)
			continue;
		err = release_blocks(a, s, ids, n);
		if (!err)
			*released += n;
	}
	free(ids);
	return err;
}

/*
 * Every block load @id still holds (a tensor larger than a chunk is one
 * block in several chunks), then the load itself: one with no chunk (an
 * empty file) has nothing else to be released by.
 */
static int release_load(struct agent *a, uint64_t id, uint32_t *released)
{
	struct aeg_load_progress pr;
	const struct aeg_chunk *c;
	struct load *l = find_load(a, id);
	uint64_t *ids;
	uint32_t n, nids = 0;
	int err;

	if (l == NULL)
		return aeg_fail(AEG_ENOENT, "no load %" PRIu64 " (released, or never made)", id);
	err = aeg_load_progress(l->handle, &pr);
	if (err == 0 && pr.status == AEG_EBUSY)
		err = aeg_fail(AEG_EBUSY, "load %" PRIu64 " (%s) is still loading: wait for it, or release "
			       "everything (aegaeon-cli release --all)", id, l->path);
	if (err)
		return err;
	c = aeg_load_chunks(l->handle, &n);
	ids = malloc(sizeof(*ids) * (n ? n : 1));
	if (ids == NULL)
		return aeg_fail(AEG_ENOMEM, "release: out of memory");
	for (uint32_t i = 0; i < n && i < l->nchunks; i++)
		if (!l->released[i])
			ids[nids++] = c[i].slab_id;
	if (nids > 0) {
		nids = sort_unique(ids, nids);
		err = release_blocks(a, (int)l->slab, ids, nids);
	}
	free(ids);
	if (err)
		return err;
	*released = nids;
	/* Released blocks took the load with them; an empty one is still here. */
	if (find_load(a, id) != NULL)
		remove_load(a, find_index(a, id), 1);
	aeg_info("load %" PRIu64 " released: %" PRIu32 " block%s", id, nids, nids == 1 ? "" : "s");
	return 0;
}

static int release_all(struct agent *a, uint32_t *released)
{
	int err = 0;

	for (int s = 0; s < a->nslabs; s++) {
		int e = aeg_prefetch_release_all(a->slabs[s].pf);
		if (e && !err)
			err = e;
	}
	for (uint32_t i = 0; i < a->nloads; i++)
		*released += a->loads[i]->nchunks - a->loads[i]->nreleased;
	agent_loads_clear(a, 1);
	return err;
}

int agent_load_release(struct agent *a, const struct proto_release_req *q, uint32_t *released)
{
	*released = 0;
	if (q->flags & PROTO_RELEASE_ALL)
		return release_all(a, released);
	if (q->flags & PROTO_RELEASE_LOAD)
		return release_load(a, q->load_id, released);
	return release_ids(a, q, released);
}

static void load_slice_short(const struct aeg_slice *spec, struct proto_load_slice *out)
{
	memset(out, 0, sizeof(*out));
	if (spec == NULL)
		return;
	out->rank = spec->rank;
	out->world = spec->world;
	out->preset = (uint32_t)spec->preset;
	out->flags = spec->flags;
	out->nrules = spec->nrules;
}

int agent_load_status(struct agent *a, uint32_t first, struct proto_status_rep *p)
{
	p->loads_total = a->nloads;
	if (first > a->nloads)
		return aeg_fail(AEG_EINVAL, "status: %u loads; page from %u asked", a->nloads, first);
	p->first = first;
	/* The table is oldest first, so a page is where it starts: status is linear in loads. */
	for (uint32_t i = first; i < a->nloads && p->count < PROTO_LOADS_PER_PAGE; i++) {
		struct load *l = a->loads[i];
		struct proto_load *pl = &p->loads[p->count++];
		struct aeg_load_progress pr;
		int err = aeg_load_progress(l->handle, &pr);

		if (err)
			return err;
		pl->load_id = l->id;
		pl->slab = l->slab;
		pl->status = pr.status;
		pl->file_bytes = pr.total_bytes;
		pl->done_bytes = held_bytes(l, &pr);
		pl->chunks = l->nchunks - l->nreleased;
		snprintf(pl->path, sizeof(pl->path), "%s", l->path);
		load_slice_short(aeg_load_slice(l->handle), &pl->slice);
	}
	return 0;
}

void agent_loads_clear(struct agent *a, int close_handles)
{
	for (uint32_t i = 0; i < a->nloads; i++)
		load_free(a->loads[i], close_handles);
	a->nloads = 0;
}

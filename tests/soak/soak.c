/* Soak test: concurrent job steps against one agent, every result checked, no growth allowed. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/attach.h>
#include <aegaeon/kv.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MAX_WORKERS 64
#define NFILES 3
#define KV_BLOCK (64u << 10)
#define KV_GPU_BLOCKS 8
#define KV_SWAP 4
#define WAIT_MS 60000                   /* any single wait; a loaded CI machine is slow, not this slow */
#define BARRIER_MS 300000

enum op { OP_SLAB, OP_PREFETCH, OP_EVENT, OP_KV, OP_PINNED, OP_STATUS, OP_RECONNECT, OP_END };
static const char *const op_names[OP_END] = { "slab", "prefetch", "event", "kv", "pinned", "status",
					       "reconnect" };

/* A block one worker wrote and another reads once the event says the copy is done. */
enum { SLOT_EMPTY, SLOT_PUBLISHED, SLOT_TAKEN, SLOT_DONE };
struct slot {
	_Atomic int state;
	aeg_handle_t event;
	uint64_t offset, bytes, seed;           /* in job slab 0 */
};

struct proc_sample {
	long fds, threads, maps;
	long rss_anon_kib, vm_rss_kib;
};

struct worker_stats {
	uint64_t ops[OP_END];
	uint64_t bytes_verified;
	uint64_t pool_retries;
	struct proc_sample at[2];               /* warm-up point and end, after detaching */
};

struct shared {
	_Atomic int arrived[2], go[2], stop;
	struct slot slots[MAX_WORKERS];
	struct worker_stats w[MAX_WORKERS];
};

static struct {
	const char *agent;
	enum aeg_device_kind device;
	int workers;
	double seconds;
	uint64_t ops;
	uint64_t slab_bytes, pinned_bytes, pinned_buffer, file_bytes;
	long rss_slack_kib;
	int verbose;
} opt;

static struct shared *sh;
static unsigned char *files[NFILES];
static uint64_t file_size[NFILES];
static char file_path[NFILES][256];
static char dir[64];

/* ------------------------------------------------------------- patterns */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static void fill(unsigned char *p, uint64_t n, uint64_t seed)
{
	for (uint64_t i = 0; i < n; i += 8) {
		uint64_t w = mix(seed ^ (i / 8));
		memcpy(p + i, &w, n - i < 8 ? n - i : 8);
	}
}

/* Offset of the first byte that differs, or -1. */
static int64_t differs(const unsigned char *p, const unsigned char *want, uint64_t n)
{
	if (memcmp(p, want, n) == 0)
		return -1;
	for (uint64_t i = 0; i < n; i++)
		if (p[i] != want[i])
			return (int64_t)i;
	return -1;
}

static uint64_t rnd(uint64_t *s)
{
	*s = mix(*s);
	return *s;
}

static uint64_t between(uint64_t *s, uint64_t lo, uint64_t hi)
{
	return lo + rnd(s) % (hi - lo + 1);
}

/* ----------------------------------------------------------- reporting */

static int tap, tap_failed;

static void ok(int good, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ok(int good, const char *fmt, ...)
{
	va_list ap;

	printf("%s %d - ", good ? "ok" : "not ok", ++tap);
	tap_failed += !good;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

/* A worker's failure: what it did, the error and its detail; the worker then exits 1. */
static int wfail(int id, enum op op, int err, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int wfail(int id, enum op op, int err, const char *fmt, ...)
{
	char what[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (err)
		fprintf(stderr, "soak: worker %d, %s: %s: %s: %s\n", id, op_names[op], what, aeg_errname(err),
			aeg_error_detail());
	else
		fprintf(stderr, "soak: worker %d, %s: %s\n", id, op_names[op], what);
	atomic_store(&sh->stop, 1);
	return -1;
}

static int sample(pid_t pid, struct proc_sample *s)
{
	char path[64], line[256];
	struct dirent *e;
	FILE *f;
	DIR *d;

	memset(s, 0, sizeof(*s));
	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	d = opendir(path);
	if (d == NULL)
		return -1;
	while ((e = readdir(d)) != NULL)
		s->fds += e->d_name[0] != '.';
	closedir(d);
	if (pid == getpid())
		s->fds--;       /* the listing's own descriptor */
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "re");
	if (f == NULL)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		sscanf(line, "Threads: %ld", &s->threads);
		sscanf(line, "RssAnon: %ld", &s->rss_anon_kib);
		sscanf(line, "VmRSS: %ld", &s->vm_rss_kib);
	}
	fclose(f);
	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "re");
	if (f == NULL)
		return -1;
	/* Only mappings of memfds (slabs, pools, events): allocators map and unmap the rest at will. */
	while (fgets(line, sizeof(line), f))
		s->maps += strstr(line, "/memfd:") != NULL;
	fclose(f);
	return 0;
}

/* -------------------------------------------------------------- worker */

struct worker {
	int id;
	uint64_t rs;
	aeg_job_t *job;
	aeg_device_t *dev;
	aeg_stream_t *stream;
	int gpu;
	unsigned char *base;                    /* job slab 0 mapped here */
	unsigned char *buf, *want;              /* scratch, opt.file_bytes + 1 MiB each */
	uint64_t buf_bytes;
	/* What this worker's slot points at, kept until a reader is done with it. */
	aeg_slab_t *pub_slab;
	aeg_event_t *pub_event;
	unsigned char *pub_src;
	struct worker_stats *st;
};

static int attach(struct worker *w)
{
	struct aeg_job_slab_desc d;
	int err;

	err = aeg_job_attach(&w->job);
	if (err)
		return wfail(w->id, OP_RECONNECT, err, "aeg_job_attach");
	w->dev = aeg_job_device(w->job);
	err = aeg_job_slab_describe(w->job, 0, &d);
	if (err)
		return wfail(w->id, OP_RECONNECT, err, "aeg_job_slab_describe");
	if (d.base == NULL || d.gpu < 0)
		return wfail(w->id, OP_RECONNECT, 0, "job slab 0 not opened here");
	if (aeg_job_pool(w->job) == NULL)
		return wfail(w->id, OP_RECONNECT, 0, "the job's pool is not mapped");
	w->base = d.base;
	w->gpu = d.gpu;
	err = aeg_stream_create(w->dev, w->gpu, &w->stream);
	if (err)
		return wfail(w->id, OP_RECONNECT, err, "aeg_stream_create");
	return 0;
}

/* Take back what the slot points at: withdrawn, or read by another worker. */
static int retire(struct worker *w)
{
	struct slot *s = &sh->slots[w->id];
	int expect = SLOT_PUBLISHED, err;
	uint64_t deadline;

	if (w->pub_slab == NULL)
		return 0;
	if (!atomic_compare_exchange_strong(&s->state, &expect, SLOT_EMPTY)) {
		deadline = now_ns() + WAIT_MS * 1000000ull;
		while (atomic_load(&s->state) == SLOT_TAKEN) {
			if (now_ns() > deadline)
				return wfail(w->id, OP_EVENT, 0, "a reader held this worker's block for %d s",
					     WAIT_MS / 1000);
			usleep(200);
		}
		if (atomic_load(&s->state) != SLOT_DONE)
			return wfail(w->id, OP_EVENT, 0, "slot in state %d", atomic_load(&s->state));
		atomic_store(&s->state, SLOT_EMPTY);
	}
	err = aeg_event_wait(w->pub_event, WAIT_MS);
	if (err)
		return wfail(w->id, OP_EVENT, err, "own event");
	if ((err = aeg_event_destroy(w->pub_event)) || (err = aeg_job_slab_return(w->job, w->pub_slab)))
		return wfail(w->id, OP_EVENT, err, "retiring a published block");
	free(w->pub_src);
	w->pub_slab = NULL;
	w->pub_event = NULL;
	w->pub_src = NULL;
	return 0;
}

static int detach(struct worker *w)
{
	int err;

	if (retire(w))
		return -1;
	err = aeg_stream_destroy(w->stream);
	if (err)
		return wfail(w->id, OP_RECONNECT, err, "aeg_stream_destroy");
	aeg_job_detach(w->job);
	w->job = NULL;
	return 0;
}

/* Lease, blocks of random sizes, a pattern into each and back, all freed, lease returned. */
static int op_slab(struct worker *w)
{
	struct aeg_block b[8];
	struct aeg_slab_stats ss;
	uint64_t lease = between(&w->rs, 64, 2048) << 10;
	int n = (int)between(&w->rs, 1, 8), err;
	aeg_slab_t *slab;

	err = aeg_job_slab(w->job, 0, lease, &slab);
	if (err)
		return wfail(w->id, OP_SLAB, err, "lease of %" PRIu64 " bytes", lease);
	for (int i = 0; i < n; i++) {
		uint64_t bytes = between(&w->rs, 1, lease / 8), seed = rnd(&w->rs);
		int64_t at;

		err = aeg_slab_alloc(slab, bytes, &b[i]);
		if (err)
			return wfail(w->id, OP_SLAB, err, "block %d of %" PRIu64 " bytes", i, bytes);
		fill(w->want, bytes, seed);
		if ((err = aeg_memcpy(w->dev, b[i].ptr, w->want, bytes)) ||
		    (err = aeg_memcpy(w->dev, w->buf, b[i].ptr, bytes)))
			return wfail(w->id, OP_SLAB, err, "copy of block %d", i);
		if ((at = differs(w->buf, w->want, bytes)) >= 0)
			return wfail(w->id, OP_SLAB, 0, "block %d read back differs at byte %" PRId64, i, at);
		w->st->bytes_verified += bytes;
	}
	if ((err = aeg_slab_stats(slab, &ss)) || ss.blocks != (uint64_t)n)
		return wfail(w->id, OP_SLAB, err, "%" PRIu64 " blocks in the lease, %d allocated", ss.blocks, n);
	for (int i = n; i-- > 0;)
		if ((err = aeg_slab_free(slab, b[i].id)))
			return wfail(w->id, OP_SLAB, err, "free of block %" PRIu64, b[i].id);
	if ((err = aeg_slab_stats(slab, &ss)) || ss.blocks != 0 || ss.used_bytes != 0)
		return wfail(w->id, OP_SLAB, err, "after freeing all: %" PRIu64 " blocks, %" PRIu64 " bytes used",
			     ss.blocks, ss.used_bytes);
	err = aeg_job_slab_return(w->job, slab);
	if (err)
		return wfail(w->id, OP_SLAB, err, "returning the lease");
	return 0;
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

/* A file through the agent: every chunk waited on and compared with the file, then released. */
static int op_prefetch(struct worker *w)
{
	/*
	 * 0 is the site's chunk size. On cuda every chunk holds one of the
	 * driver's interprocess events, which are limited (8 loads of 1281
	 * chunks at once ran out on an H100): the chunks there are larger.
	 */
	static const uint64_t host_chunks[] = { 0, 64 << 10, (256 << 10) + 4096, 1 << 20 };
	static const uint64_t cuda_chunks[] = { 0, 1 << 20, (4 << 20) + 4096, 16 << 20 };
	const uint64_t *chunks = opt.device == AEG_DEVICE_CUDA ? cuda_chunks : host_chunks;
	uint64_t chunk = chunks[rnd(&w->rs) % ARRAY_SIZE(host_chunks)], *ids = NULL, covered = 0;
	int f = (int)(rnd(&w->rs) % NFILES), err, rc = -1;
	struct aeg_job_load *load = NULL, *again = NULL;
	uint32_t nids = 0, released;

	err = aeg_job_prefetch(w->job, file_path[f], 0, chunk, &load);
	if (err)
		return wfail(w->id, OP_PREFETCH, err, "%s in chunks of %" PRIu64, file_path[f], chunk);
	if (load->count == 0 || load->file_bytes != file_size[f]) {
		wfail(w->id, OP_PREFETCH, 0, "load of %s: %u chunks, %" PRIu64 " bytes (file %" PRIu64 ")",
		      file_path[f], load->count, load->file_bytes, file_size[f]);
		goto out;
	}
	ids = calloc(load->count, sizeof(*ids));
	if (ids == NULL) {
		wfail(w->id, OP_PREFETCH, 0, "out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < load->count; i++) {
		const struct aeg_job_chunk *c = &load->chunks[i];
		int64_t at;

		err = aeg_event_wait_handle(w->dev, &c->event, WAIT_MS);
		if (err) {
			wfail(w->id, OP_PREFETCH, err, "chunk %u of load %" PRIu64, i, load->load_id);
			goto out;
		}
		if ((err = aeg_event_close_handle(w->dev, &c->event))) {
			wfail(w->id, OP_PREFETCH, err, "closing chunk %u's event", i);
			goto out;
		}
		if (c->ptr == NULL || c->ptr != w->base + c->offset || c->file_offset + c->size > file_size[f]) {
			wfail(w->id, OP_PREFETCH, 0, "chunk %u: ptr %p, offset %" PRIu64 ", file offset %" PRIu64
			      " + %" PRIu64, i, c->ptr, c->offset, c->file_offset, c->size);
			goto out;
		}
		if (c->size > w->buf_bytes) {
			wfail(w->id, OP_PREFETCH, 0, "chunk %u of %" PRIu64 " bytes: larger than the %" PRIu64 "-byte buffer",
			      i, c->size, w->buf_bytes);
			goto out;
		}
		err = aeg_memcpy(w->dev, w->buf, c->ptr, c->size);
		if (err) {
			wfail(w->id, OP_PREFETCH, err, "reading chunk %u", i);
			goto out;
		}
		if ((at = differs(w->buf, files[f] + c->file_offset, c->size)) >= 0) {
			/* Say whether the bytes came late (the event completed too early) or never. */
			unsigned char got = ((unsigned char *)w->buf)[at], want = files[f][c->file_offset + at];
			int64_t later;

			usleep(200000);
			later = aeg_memcpy(w->dev, w->buf, c->ptr, c->size) ? -2 :
				differs(w->buf, files[f] + c->file_offset, c->size);
			wfail(w->id, OP_PREFETCH, 0, "%s chunk %u of %u (file offset %" PRIu64 ", %" PRIu64 " bytes, load %"
			      PRIu64 ") differs from the file at byte %" PRId64 " (0x%02x, not 0x%02x); 200 ms later: %s",
			      file_path[f], i, load->count, c->file_offset, c->size, load->load_id, at, got, want,
			      later == -1 ? "equal (the event completed before the copy)" :
			      later == -2 ? "unreadable" : "still different");
			goto out;
		}
		covered += c->size;
		w->st->bytes_verified += c->size;
		ids[nids++] = c->slab_id;
	}
	if (covered != file_size[f]) {
		wfail(w->id, OP_PREFETCH, 0, "chunks cover %" PRIu64 " of %" PRIu64 " bytes", covered, file_size[f]);
		goto out;
	}
	/* Every event is recorded; the agent calls the load done a moment later. */
	for (int tries = 0;; tries++) {
		aeg_job_load_free(again);
		again = NULL;
		err = aeg_job_chunks(w->job, load->load_id, NULL, 0, &again);
		if (err) {
			wfail(w->id, OP_PREFETCH, err, "chunks of load %" PRIu64, load->load_id);
			goto out;
		}
		if (again->status != AEG_EBUSY)
			break;
		if (tries > WAIT_MS) {
			wfail(w->id, OP_PREFETCH, 0, "load %" PRIu64 " still busy after its chunks", load->load_id);
			goto out;
		}
		usleep(1000);
	}
	if (again->status != 0 || again->count != load->count || again->done_bytes != again->file_bytes) {
		wfail(w->id, OP_PREFETCH, again->status, "load %" PRIu64 " ended with %u chunks, %" PRIu64 "/%" PRIu64
		      " bytes", load->load_id, again->count, again->done_bytes, again->file_bytes);
		goto out;
	}
	qsort(ids, nids, sizeof(*ids), cmp_u64);
	{
		uint32_t u = 0;
		for (uint32_t i = 0; i < nids; i++)
			if (u == 0 || ids[u - 1] != ids[i])
				ids[u++] = ids[i];
		nids = u;
	}
	err = aeg_job_release(w->job, 0, ids, nids, &released);
	if (err || released != nids) {
		wfail(w->id, OP_PREFETCH, err, "release of %u blocks freed %u", nids, released);
		goto out;
	}
	rc = 0;
out:
	aeg_job_load_free(again);
	aeg_job_load_free(load);
	free(ids);
	return rc;
}

/*
 * Read another worker's published block once its event says the copy
 * landed, then publish one of our own (after taking back the last one).
 */
static int op_event(struct worker *w)
{
	struct aeg_block b;
	aeg_handle_t h;
	int err;

	for (int k = 1; k < opt.workers; k++) {
		struct slot *s = &sh->slots[(w->id + k) % opt.workers];
		int expect = SLOT_PUBLISHED;
		int64_t at;

		if (!atomic_compare_exchange_strong(&s->state, &expect, SLOT_TAKEN))
			continue;
		err = aeg_event_wait_handle(w->dev, &s->event, WAIT_MS);
		if (err)
			return wfail(w->id, OP_EVENT, err, "waiting on worker %d's event", (w->id + k) % opt.workers);
		if ((err = aeg_event_close_handle(w->dev, &s->event)))
			return wfail(w->id, OP_EVENT, err, "closing worker %d's event", (w->id + k) % opt.workers);
		if ((err = aeg_memcpy(w->dev, w->buf, w->base + s->offset, s->bytes)))
			return wfail(w->id, OP_EVENT, err, "reading worker %d's block", (w->id + k) % opt.workers);
		fill(w->want, s->bytes, s->seed);
		if ((at = differs(w->buf, w->want, s->bytes)) >= 0)
			return wfail(w->id, OP_EVENT, 0, "worker %d's block (offset %" PRIu64 ", %" PRIu64
				     " bytes) differs at byte %" PRId64 " after its event completed",
				     (w->id + k) % opt.workers, s->offset, s->bytes, at);
		w->st->bytes_verified += s->bytes;
		atomic_store(&s->state, SLOT_DONE);
		break;
	}

	/* A local event: record, wait, query. */
	{
		aeg_event_t *ev;

		if ((err = aeg_event_create(w->dev, w->gpu, &ev, &h)) || (err = aeg_event_record(ev, w->stream)) ||
		    (err = aeg_event_wait_handle(w->dev, &h, WAIT_MS)) || (err = aeg_event_query(ev)) ||
		    (err = aeg_event_close_handle(w->dev, &h)) || (err = aeg_event_destroy(ev)))
			return wfail(w->id, OP_EVENT, err, "local event");
	}

	if (retire(w))
		return -1;
	{
		struct slot *s = &sh->slots[w->id];
		uint64_t bytes = between(&w->rs, 1, 256 << 10), seed = rnd(&w->rs);

		if ((err = aeg_job_slab(w->job, 0, 256 << 10, &w->pub_slab))) {
			w->pub_slab = NULL;
			return wfail(w->id, OP_EVENT, err, "lease");
		}
		if ((err = aeg_slab_alloc(w->pub_slab, bytes, &b)))
			return wfail(w->id, OP_EVENT, err, "block");
		w->pub_src = malloc(bytes);
		if (w->pub_src == NULL)
			return wfail(w->id, OP_EVENT, 0, "out of memory");
		fill(w->pub_src, bytes, seed);
		if ((err = aeg_event_create(w->dev, w->gpu, &w->pub_event, &s->event)))
			return wfail(w->id, OP_EVENT, err, "event");
		if ((err = aeg_memcpy_async(w->stream, b.ptr, w->pub_src, bytes)) ||
		    (err = aeg_event_record(w->pub_event, w->stream)))
			return wfail(w->id, OP_EVENT, err, "copy and record");
		s->offset = (uint64_t)((unsigned char *)b.ptr - w->base);
		s->bytes = bytes;
		s->seed = seed;
		atomic_store(&s->state, SLOT_PUBLISHED);
	}
	return 0;
}

/* GPU blocks -> pool blocks -> other GPU blocks, each hop compared; a per-layer swap now and then. */
static int op_kv(struct worker *w)
{
	struct aeg_kv_params p = { .block_bytes = KV_BLOCK, .host_buffers = 1 };
	uint32_t g[KV_SWAP], hb[KV_SWAP], back[KV_SWAP];
	struct aeg_kv_stats ks;
	aeg_handle_t h, lh[2];
	aeg_slab_t *lease;
	aeg_kv_t *kv = NULL;
	uint64_t seed = rnd(&w->rs);
	int layered = rnd(&w->rs) % 4 == 0, err;

	if ((err = aeg_job_slab(w->job, 0, (uint64_t)KV_GPU_BLOCKS * KV_BLOCK, &lease)))
		return wfail(w->id, OP_KV, err, "lease");
	p.gpu_base = aeg_slab_base(lease);
	p.gpu_bytes = aeg_slab_bytes(lease);
	p.pool = aeg_job_pool(w->job);
	/* The agent's prefetch ring shares the pool: a moment with no free buffer is not a failure. */
	for (int tries = 0; (err = aeg_kv_create(w->dev, w->gpu, &p, &kv)) == AEG_ENOSPC && tries < 5000; tries++) {
		w->st->pool_retries++;
		usleep(2000);
	}
	if (err)
		return wfail(w->id, OP_KV, err, "aeg_kv_create");
	if ((err = aeg_kv_gpu_alloc(kv, KV_SWAP, g)) || (err = aeg_kv_host_alloc(kv, KV_SWAP, hb)))
		return wfail(w->id, OP_KV, err, "block allocation");
	for (int i = 0; i < KV_SWAP; i++) {
		fill(w->want, KV_BLOCK, seed + (uint64_t)i);
		if ((err = aeg_memcpy(w->dev, aeg_kv_gpu_ptr(kv, g[i]), w->want, KV_BLOCK)))
			return wfail(w->id, OP_KV, err, "filling GPU block %u", g[i]);
		back[i] = g[KV_SWAP - 1 - i];
	}
	if (layered) {
		static const size_t ends[2] = { KV_SWAP / 2, KV_SWAP };
		struct aeg_kv_layers layers = { 2, ends, lh };

		err = aeg_kv_swap_out_layers(kv, g, hb, KV_SWAP, &layers, w->stream, &h);
		for (int l = 0; !err && l < 2; l++)
			err = aeg_event_wait_handle(w->dev, &lh[l], WAIT_MS);
	} else {
		err = aeg_kv_swap_out(kv, g, hb, KV_SWAP, w->stream, &h);
	}
	if (err || (err = aeg_event_wait_handle(w->dev, &h, WAIT_MS)))
		return wfail(w->id, OP_KV, err, "swap out");
	for (int i = 0; i < KV_SWAP; i++) {
		int64_t at;

		fill(w->want, KV_BLOCK, seed + (uint64_t)i);
		if ((at = differs(aeg_kv_host_ptr(kv, hb[i]), w->want, KV_BLOCK)) >= 0)
			return wfail(w->id, OP_KV, 0, "host block %u after swap out differs at byte %" PRId64, hb[i], at);
		w->st->bytes_verified += KV_BLOCK;
	}
	if (layered) {
		for (int l = 0; l < 2; l++)
			if ((err = aeg_event_close_handle(w->dev, &lh[l])))
				return wfail(w->id, OP_KV, err, "closing layer event %d", l);
	}
	if ((err = aeg_event_close_handle(w->dev, &h)) || (err = aeg_kv_release(kv, &h)))
		return wfail(w->id, OP_KV, err, "releasing the swap-out event");
	for (int i = 0; i < KV_SWAP; i++)
		if ((err = aeg_memset(w->dev, aeg_kv_gpu_ptr(kv, g[i]), 0, KV_BLOCK)))
			return wfail(w->id, OP_KV, err, "clearing GPU block %u", g[i]);
	if ((err = aeg_kv_swap_in(kv, hb, back, KV_SWAP, w->stream, &h)) ||
	    (err = aeg_event_wait_handle(w->dev, &h, WAIT_MS)))
		return wfail(w->id, OP_KV, err, "swap in");
	for (int i = 0; i < KV_SWAP; i++) {
		int64_t at;

		fill(w->want, KV_BLOCK, seed + (uint64_t)i);
		if ((err = aeg_memcpy(w->dev, w->buf, aeg_kv_gpu_ptr(kv, back[i]), KV_BLOCK)))
			return wfail(w->id, OP_KV, err, "reading GPU block %u", back[i]);
		if ((at = differs(w->buf, w->want, KV_BLOCK)) >= 0)
			return wfail(w->id, OP_KV, 0, "GPU block %u after swap in differs at byte %" PRId64, back[i], at);
		w->st->bytes_verified += KV_BLOCK;
	}
	if ((err = aeg_event_close_handle(w->dev, &h)) || (err = aeg_kv_release(kv, &h)) ||
	    (err = aeg_kv_gpu_free(kv, g, KV_SWAP)) || (err = aeg_kv_host_free(kv, hb, KV_SWAP)))
		return wfail(w->id, OP_KV, err, "releasing events and blocks");
	if ((err = aeg_kv_stats(kv, &ks)) || ks.events_live || ks.gpu_used || ks.host_used ||
	    ks.swaps_out != 1 || ks.swaps_in != 1 || ks.blocks_out != KV_SWAP)
		return wfail(w->id, OP_KV, err, "stats: %u events, %u GPU and %u host blocks held, %" PRIu64
			     "/%" PRIu64 " swaps", ks.events_live, ks.gpu_used, ks.host_used, ks.swaps_out, ks.swaps_in);
	aeg_kv_destroy(kv);
	if ((err = aeg_job_slab_return(w->job, lease)))
		return wfail(w->id, OP_KV, err, "returning the lease");
	return 0;
}

/* Pool buffer -> slab block -> another pool buffer. */
static int op_pinned(struct worker *w)
{
	aeg_pool_t *pool = aeg_job_pool(w->job);
	struct aeg_pool_buffer a, b;
	struct aeg_block blk;
	aeg_slab_t *lease;
	uint64_t seed = rnd(&w->rs), n;
	int64_t at;
	int err;

	if ((err = aeg_pool_acquire(pool, WAIT_MS, &a)))
		return wfail(w->id, OP_PINNED, err, "first buffer");
	if ((err = aeg_pool_acquire(pool, WAIT_MS, &b)))
		return wfail(w->id, OP_PINNED, err, "second buffer");
	n = between(&w->rs, 1, a.bytes);
	if (a.index == b.index || a.bytes != opt.pinned_buffer || a.ptr != aeg_pool_buffer_ptr(pool, a.index))
		return wfail(w->id, OP_PINNED, 0, "buffers %u and %u of %" PRIu64 " bytes", a.index, b.index, a.bytes);
	if ((err = aeg_job_slab(w->job, 0, a.bytes, &lease)) || (err = aeg_slab_alloc(lease, n, &blk)))
		return wfail(w->id, OP_PINNED, err, "lease");
	fill(a.ptr, n, seed);
	memset(b.ptr, 0, n);
	if ((err = aeg_memcpy(w->dev, blk.ptr, a.ptr, n)) || (err = aeg_memcpy(w->dev, b.ptr, blk.ptr, n)))
		return wfail(w->id, OP_PINNED, err, "copies");
	fill(w->want, n, seed);
	if ((at = differs(b.ptr, w->want, n)) >= 0)
		return wfail(w->id, OP_PINNED, 0, "buffer %u differs at byte %" PRId64, b.index, at);
	w->st->bytes_verified += n;
	if ((err = aeg_pool_release(pool, b.index)) || (err = aeg_pool_release(pool, a.index)))
		return wfail(w->id, OP_PINNED, err, "release");
	if ((err = aeg_slab_free(lease, blk.id)) || (err = aeg_job_slab_return(w->job, lease)))
		return wfail(w->id, OP_PINNED, err, "returning the lease");
	return 0;
}

static int op_status(struct worker *w)
{
	struct aeg_job_status *st;
	int err = aeg_job_status(w->job, &st), bad;

	if (err)
		return wfail(w->id, OP_STATUS, err, "aeg_job_status");
	/* Each wait on another process's event connects on its own: only the agent's cap bounds them. */
	bad = st->slabs != 1 || !st->has_pool || st->clients < 1 || st->clients > 256 ||
	      st->pool.in_use > st->pool.buffers || st->slab[0].stats.used_bytes > st->slab[0].stats.total_bytes ||
	      st->slab[0].leases > (uint32_t)opt.workers * 2;
	if (bad)
		wfail(w->id, OP_STATUS, 0, "status: %d slabs, pool %d, %u clients, %u/%u buffers, %" PRIu64 "/%" PRIu64
		      " bytes, %u leases", st->slabs, st->has_pool, st->clients, st->pool.in_use, st->pool.buffers,
		      st->slab[0].stats.used_bytes, st->slab[0].stats.total_bytes, st->slab[0].leases);
	aeg_job_status_free(st);
	return bad ? -1 : 0;
}

/* Wait at barrier @k with nothing attached, after counting what this process holds. */
static int barrier(struct worker *w, int k)
{
	if (detach(w))
		return -1;
	if (sample(getpid(), &w->st->at[k]))
		return wfail(w->id, OP_RECONNECT, 0, "sampling /proc/self: %s", strerror(errno));
	atomic_fetch_add(&sh->arrived[k], 1);
	for (int ms = 0; !atomic_load(&sh->go[k]); ms++) {
		if (atomic_load(&sh->stop) || ms > BARRIER_MS)
			return -1;
		usleep(1000);
	}
	return k == 0 ? attach(w) : 0;
}

static int worker_main(int id)
{
	struct worker w = { .id = id, .rs = 0x50a4 + (uint64_t)id * 7919 };
	uint64_t start = now_ns(), end = start + (uint64_t)(opt.seconds * 1e9);
	uint64_t warm = start + (uint64_t)(opt.seconds * 0.2e9), n = 0;
	int warmed = 0;

	w.st = &sh->w[id];
	/* A chunk can be a whole file (the site's chunk is larger than the files). */
	w.buf_bytes = opt.file_bytes + (4u << 20);
	for (int f = 0; f < NFILES; f++)
		if (w.buf_bytes < file_size[f])
			w.buf_bytes = file_size[f];
	if (w.buf_bytes < opt.pinned_buffer)
		w.buf_bytes = opt.pinned_buffer;
	w.buf = malloc(w.buf_bytes);
	w.want = malloc(w.buf_bytes);
	if (w.buf == NULL || w.want == NULL || attach(&w))
		return 1;
	for (;;) {
		uint64_t now = now_ns(), r;
		enum op op;
		int err;

		if (atomic_load(&sh->stop))
			return 1;
		if (!warmed && (now >= warm || n >= opt.ops / 5)) {
			if (barrier(&w, 0))
				return 1;
			warmed = 1;
		}
		if (warmed && (now >= end || n >= opt.ops))
			break;
		r = rnd(&w.rs) % 100;
		op = r < 25 ? OP_SLAB : r < 45 ? OP_PREFETCH : r < 65 ? OP_EVENT : r < 80 ? OP_KV :
		     r < 93 ? OP_PINNED : r < 98 ? OP_STATUS : OP_RECONNECT;
		switch (op) {
		case OP_SLAB: err = op_slab(&w); break;
		case OP_PREFETCH: err = op_prefetch(&w); break;
		case OP_EVENT: err = op_event(&w); break;
		case OP_KV: err = op_kv(&w); break;
		case OP_PINNED: err = op_pinned(&w); break;
		case OP_STATUS: err = op_status(&w); break;
		default: err = detach(&w) || attach(&w); break;
		}
		if (err)
			return 1;
		w.st->ops[op]++;
		n++;
	}
	if (barrier(&w, 1))
		return 1;
	free(w.buf);
	free(w.want);
	return 0;
}

/* --------------------------------------------------------------- parent */

static pid_t agent = -1;
static pid_t kids[MAX_WORKERS];

static void spawn_agent(const char *log)
{
	char slab[32], pinned[64];
	const char *argv[] = { opt.agent, "--job", "soak", "--runtime-dir", dir, "--gpus", "0", "--slab", slab,
			       "--pinned", pinned, "--device", aeg_device_kind_name(opt.device), "--foreground",
			       NULL };

	snprintf(slab, sizeof(slab), "%" PRIu64, opt.slab_bytes);
	snprintf(pinned, sizeof(pinned), "%" PRIu64 ":%" PRIu64, opt.pinned_bytes, opt.pinned_buffer);
	agent = fork();
	if (agent == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

		if (fd >= 0)
			dup2(fd, 2);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
}

static int wait_ready(const char *ready, const char *error)
{
	for (int i = 0; i < 6000; i++) {
		if (access(ready, F_OK) == 0)
			return 0;
		if (access(error, F_OK) == 0 || waitpid(agent, NULL, WNOHANG) == agent)
			return -1;
		usleep(10000);
	}
	return -1;
}

/* Wait until all workers reached barrier @k; 0, or -1 when one failed or time ran out. */
static int wait_workers(int k, double limit_s)
{
	uint64_t deadline = now_ns() + (uint64_t)(limit_s * 1e9);

	while (atomic_load(&sh->arrived[k]) < opt.workers) {
		for (int i = 0; i < opt.workers; i++) {
			int status;

			if (kids[i] > 0 && waitpid(kids[i], &status, WNOHANG) == kids[i]) {
				kids[i] = -1;
				ok(0, "worker %d ended before barrier %d (%s %d)", i, k,
				   WIFEXITED(status) ? "exit" : "signal",
				   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
				return -1;
			}
		}
		if (atomic_load(&sh->stop) || now_ns() > deadline)
			return -1;
		usleep(5000);
	}
	return 0;
}

/*
 * The agent with exactly one client (this one) connected: its other
 * clients' threads have been joined, so counts compare between samples.
 */
static int sample_agent(struct proc_sample *s, struct aeg_job_status **stp)
{
	aeg_job_t *job;
	int err;

	err = aeg_job_connect(&job);
	if (err) {
		ok(0, "connecting to the agent: %s: %s", aeg_errname(err), aeg_error_detail());
		return -1;
	}
	for (int i = 0;; i++) {
		err = aeg_job_status(job, stp);
		if (err) {
			ok(0, "agent status: %s: %s", aeg_errname(err), aeg_error_detail());
			aeg_job_detach(job);
			return -1;
		}
		if ((*stp)->clients == 1)
			break;
		aeg_job_status_free(*stp);
		if (i > 3000) {
			ok(0, "the agent still counts other clients 30 s after they detached");
			aeg_job_detach(job);
			return -1;
		}
		usleep(10000);
	}
	err = sample(agent, s);
	aeg_job_detach(job);
	if (err)
		ok(0, "sampling /proc/%d: %s", (int)agent, strerror(errno));
	return err;
}

static void print_sample(const char *what, const struct proc_sample *s)
{
	printf("# %s: %ld fds, %ld threads, %ld memfd mappings, RssAnon %ld KiB, VmRSS %ld KiB\n", what, s->fds,
	       s->threads, s->maps, s->rss_anon_kib, s->vm_rss_kib);
}

/* --gpu-free: print GPU 0's free bytes (run by gpu_free in a fresh process). */
static int print_gpu_free(void)
{
	struct aeg_gpu_info info;
	aeg_device_t *dev;

	if (aeg_device_open(&dev, AEG_DEVICE_CUDA) || aeg_device_gpu_info(dev, 0, &info)) {
		fprintf(stderr, "soak: GPU 0: %s\n", aeg_error_detail());
		return 1;
	}
	printf("%" PRIu64 "\n", info.free_bytes);
	aeg_device_close(dev);
	return 0;
}

/*
 * Free memory of GPU 0 as a fresh process sees it. Not forked from this
 * one: once it talked to the agent (aeg_job_connect opens the device) a
 * forked child cannot initialize CUDA, so the child executes this program.
 */
static int gpu_free(uint64_t *free_bytes)
{
	static char self[PATH_MAX];
	char text[32] = "";
	int fds[2], status = -1;
	ssize_t n, len;
	pid_t pid;

	if (self[0] == '\0' && ((len = readlink("/proc/self/exe", self, sizeof(self) - 1)) <= 0))
		return -1;
	if (pipe(fds) < 0)
		return -1;
	pid = fork();
	if (pid == 0) {
		char *argv[] = { self, "--gpu-free", NULL };

		dup2(fds[1], STDOUT_FILENO);
		close(fds[0]);
		close(fds[1]);
		execv(self, argv);
		_exit(127);
	}
	close(fds[1]);
	n = pid > 0 ? read(fds[0], text, sizeof(text) - 1) : -1;
	close(fds[0]);
	if (pid > 0)
		waitpid(pid, &status, 0);
	if (n <= 0 || status != 0)
		return -1;
	text[n] = '\0';
	*free_bytes = strtoull(text, NULL, 10);
	return 0;
}

static int make_files(void)
{
	static const uint64_t extra[NFILES] = { 4096 + 123, 0, 17 };
	static const uint64_t scale[NFILES] = { 3, 1, 5 };

	for (int f = 0; f < NFILES; f++) {
		uint64_t n = opt.file_bytes / 3 * scale[f] + extra[f] - (f == 1);
		int fd;

		file_size[f] = n;
		files[f] = malloc(n);
		if (files[f] == NULL)
			return -1;
		fill(files[f], n, 1000 + (uint64_t)f);
		snprintf(file_path[f], sizeof(file_path[f]), "%s/model%d.bin", dir, f);
		fd = open(file_path[f], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd < 0)
			return -1;
		for (uint64_t o = 0; o < n;) {
			ssize_t w = write(fd, files[f] + o, n - o);
			if (w <= 0) {
				close(fd);
				return -1;
			}
			o += (uint64_t)w;
		}
		close(fd);
	}
	return 0;
}

static void usage(FILE *f)
{
	fputs("Usage: soak [--agent PATH] [--device host|cuda] [--workers N] [--seconds S] [--ops N]\n"
	      "            [--slab SIZE] [--pinned SIZE:BUFFER] [--file-bytes SIZE] [--rss-slack SIZE] [--verbose]\n"
	      "Starts aegaeond (--agent, default $AEGAEOND) on a temporary job directory and runs N worker\n"
	      "processes (default 8) of random slab, prefetch, event, KV-swap, pinned, status and reconnect\n"
	      "operations for S seconds ($AEGAEON_SOAK_SECONDS, default 60) or N operations per worker\n"
	      "($AEGAEON_SOAK_OPS, default 1000000), whichever ends first. Every copy is compared with what\n"
	      "was written; at a warm-up point (a fifth of the run) and at the end the agent's and each\n"
	      "worker's descriptors, threads and memory are sampled with nothing attached and must not grow.\n",
	      f);
}

static int size_arg(const char *name, const char *text, uint64_t *v)
{
	if (aeg_size_parse(text, 0, v) == 0 && *v > 0)
		return 0;
	fprintf(stderr, "soak: %s: %s\n", name, aeg_error_detail());
	return -1;
}

static int parse_args(int argc, char **argv)
{
	static const struct option options[] = {
		{ "agent", required_argument, NULL, 'a' }, { "device", required_argument, NULL, 'd' },
		{ "workers", required_argument, NULL, 'w' }, { "seconds", required_argument, NULL, 's' },
		{ "ops", required_argument, NULL, 'o' }, { "slab", required_argument, NULL, 'S' },
		{ "pinned", required_argument, NULL, 'p' }, { "file-bytes", required_argument, NULL, 'f' },
		{ "rss-slack", required_argument, NULL, 'r' }, { "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 },
	};
	const char *env;
	uint64_t slack = 8u << 20;
	int c, have_slab = 0, have_pinned = 0, have_file = 0;
	char *end;

	opt.agent = getenv("AEGAEOND");
	opt.device = AEG_DEVICE_HOST;
	opt.workers = 8;
	opt.seconds = 60;
	opt.ops = 1000000;
	if ((env = getenv("AEGAEON_SOAK_SECONDS")) && *env)
		opt.seconds = strtod(env, NULL);
	if ((env = getenv("AEGAEON_SOAK_OPS")) && *env)
		opt.ops = strtoull(env, NULL, 10);
	while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (c) {
		case 'a': opt.agent = optarg; break;
		case 'd':
			if (aeg_device_kind_parse(optarg, &opt.device)) {
				fprintf(stderr, "soak: --device: %s\n", aeg_error_detail());
				return -1;
			}
			break;
		case 'w': opt.workers = (int)strtol(optarg, &end, 10); break;
		case 's': opt.seconds = strtod(optarg, &end); break;
		case 'o': opt.ops = strtoull(optarg, &end, 10); break;
		case 'S': if (size_arg("--slab", optarg, &opt.slab_bytes)) return -1; have_slab = 1; break;
		case 'p': {
			char *colon = strchr(optarg, ':');
			if (colon == NULL) {
				fprintf(stderr, "soak: --pinned takes SIZE:BUFFER\n");
				return -1;
			}
			*colon = '\0';
			if (size_arg("--pinned", optarg, &opt.pinned_bytes) ||
			    size_arg("--pinned buffer", colon + 1, &opt.pinned_buffer))
				return -1;
			have_pinned = 1;
			break;
		}
		case 'f': if (size_arg("--file-bytes", optarg, &opt.file_bytes)) return -1; have_file = 1; break;
		case 'r': if (size_arg("--rss-slack", optarg, &slack)) return -1; break;
		case 'v': opt.verbose = 1; break;
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); return -1;
		}
	}
	if (optind < argc || opt.workers < 2 || opt.workers > MAX_WORKERS || !(opt.seconds > 0) || opt.ops < 5) {
		fprintf(stderr, "soak: 2..%d workers, seconds > 0 and at least 5 ops, no other arguments\n",
			MAX_WORKERS);
		return -1;
	}
	if (opt.agent == NULL) {
		fprintf(stderr, "soak: no agent: give --agent PATH or set AEGAEOND\n");
		return -1;
	}
	/* Sizes that never run out: each worker holds at most a load, a lease and two buffers at once. */
	if (!have_file)
		opt.file_bytes = opt.device == AEG_DEVICE_CUDA ? 48u << 20 : 3u << 20;
	if (!have_slab)
		opt.slab_bytes = (uint64_t)opt.workers * (opt.file_bytes * 2 + (8u << 20)) + (64u << 20);
	if (!have_pinned) {
		opt.pinned_buffer = opt.device == AEG_DEVICE_CUDA ? 8u << 20 : 1u << 20;
		/* The agent's engine keeps up to 16 buffers in flight for READ loads. */
		opt.pinned_bytes = opt.pinned_buffer * (uint64_t)(16 + 2 * opt.workers + 8);
	}
	if (opt.pinned_buffer % KV_BLOCK) {
		fprintf(stderr, "soak: the pool buffer must be a multiple of %u bytes (the KV block)\n", KV_BLOCK);
		return -1;
	}
	opt.rss_slack_kib = (long)(slack >> 10);
	return 0;
}

int main(int argc, char **argv)
{
	char ready[128], error[128], log[128], cmd[160];
	struct aeg_job_status *st0 = NULL, *st1 = NULL;
	struct proc_sample a0, a1;
	uint64_t t0 = now_ns(), total_ops[OP_END] = { 0 }, bytes = 0, retries = 0, free0 = 0, free1 = 0;
	int status, failed = 0;

	if (argc == 2 && strcmp(argv[1], "--gpu-free") == 0)
		return print_gpu_free();
	if (parse_args(argc, argv))
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);
	strcpy(dir, "/tmp/aeg-soak-XXXXXX");
	if (mkdtemp(dir) == NULL) {
		perror("soak: mkdtemp");
		return 1;
	}
	snprintf(ready, sizeof(ready), "%s/ready", dir);
	snprintf(error, sizeof(error), "%s/error", dir);
	snprintf(log, sizeof(log), "%s/agent.log", dir);
	snprintf(cmd, sizeof(cmd), "%s/agent.sock", dir);
	setenv("AEGAEON_SOCKET", cmd, 1);
	unsetenv("AEGAEON_SLABS");
	unsetenv("AEGAEON_SLAB0_HANDLE");
	if (opt.device == AEG_DEVICE_HOST)
		setenv("AEGAEON_HOST_GPUS", "1", 1);
	if (!opt.verbose)
		setenv("AEGAEON_LOG", "warn", 0);
	printf("# soak: %d workers, %.0f s or %" PRIu64 " ops each, %s device, slab %" PRIu64 " MiB, pool %" PRIu64
	       " MiB in %" PRIu64 " KiB buffers, files of about %" PRIu64 " KiB\n", opt.workers, opt.seconds,
	       opt.ops, aeg_device_kind_name(opt.device), opt.slab_bytes >> 20, opt.pinned_bytes >> 20,
	       opt.pinned_buffer >> 10, opt.file_bytes >> 10);

	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED || make_files()) {
		perror("soak: set-up");
		failed = 1;
		goto out;
	}
	if (opt.device == AEG_DEVICE_CUDA && gpu_free(&free0)) {
		ok(0, "free memory of GPU 0 before the run (a process opening the device)");
		failed = 1;
		goto out;
	}
	spawn_agent(log);
	if (agent < 0 || wait_ready(ready, error)) {
		ok(0, "agent %s started (see %s)", opt.agent, log);
		failed = 1;
		goto out;
	}
	for (int i = 0; i < opt.workers; i++) {
		fflush(NULL);
		kids[i] = fork();
		if (kids[i] == 0)
			exit(worker_main(i));   /* not _exit: LeakSanitizer checks each worker as it ends */
		if (kids[i] < 0) {
			perror("soak: fork");
			atomic_store(&sh->stop, 1);
			failed = 1;
			goto reap;
		}
	}

	if (wait_workers(0, opt.seconds + BARRIER_MS / 1000) || sample_agent(&a0, &st0)) {
		ok(0, "every worker reached the warm-up point");
		failed = 1;
		atomic_store(&sh->stop, 1);
		goto reap;
	}
	print_sample("agent at warm-up", &a0);
	atomic_store(&sh->go[0], 1);
	if (wait_workers(1, opt.seconds + BARRIER_MS / 1000) || sample_agent(&a1, &st1)) {
		ok(0, "every worker finished its run");
		failed = 1;
		atomic_store(&sh->stop, 1);
		goto reap;
	}
	print_sample("agent at the end", &a1);
	atomic_store(&sh->go[1], 1);
reap:
	for (int i = 0; i < opt.workers; i++) {
		if (kids[i] <= 0)
			continue;
		if (atomic_load(&sh->stop))
			kill(kids[i], SIGKILL);
		waitpid(kids[i], &status, 0);
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			ok(0, "worker %d exited cleanly (%s %d)", i, WIFEXITED(status) ? "exit" : "signal",
			   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
			failed = 1;
		}
	}
	if (failed)
		goto stop;
	ok(1, "%d workers ran without an error", opt.workers);

	for (int i = 0; i < opt.workers; i++) {
		const struct worker_stats *w = &sh->w[i];
		int same = w->at[0].fds == w->at[1].fds && w->at[0].threads == w->at[1].threads &&
			   w->at[0].maps == w->at[1].maps;

		for (int k = 0; k < OP_END; k++)
			total_ops[k] += w->ops[k];
		bytes += w->bytes_verified;
		retries += w->pool_retries;
		if (!same || opt.verbose) {
			print_sample("worker at warm-up", &w->at[0]);
			print_sample("worker at the end", &w->at[1]);
		}
		if (!same) {
			ok(0, "worker %d: descriptors, threads and memfd mappings the same at warm-up and end", i);
			failed = 1;
		}
	}
	if (!failed)
		ok(1, "every worker: descriptors, threads and memfd mappings the same at warm-up and end");
	printf("# operations:");
	for (int k = 0; k < OP_END; k++)
		printf(" %s %" PRIu64, op_names[k], total_ops[k]);
	printf("; %.1f MiB compared; %" PRIu64 " waits for a free pool buffer\n", (double)bytes / (1 << 20), retries);
	for (int k = 0; k < OP_STATUS; k++) {
		if (total_ops[k] == 0) {
			ok(0, "some %s operations ran", op_names[k]);
			failed = 1;
		}
	}

	ok(a1.fds == a0.fds, "agent descriptors: %ld at warm-up, %ld at the end", a0.fds, a1.fds);
	ok(a1.threads == a0.threads, "agent threads: %ld at warm-up, %ld at the end", a0.threads, a1.threads);
	ok(a1.rss_anon_kib <= a0.rss_anon_kib + opt.rss_slack_kib,
	   "agent anonymous memory: %ld KiB at warm-up, %ld KiB at the end (slack %ld KiB)", a0.rss_anon_kib,
	   a1.rss_anon_kib, opt.rss_slack_kib);
	failed |= a1.fds != a0.fds || a1.threads != a0.threads || a1.rss_anon_kib > a0.rss_anon_kib + opt.rss_slack_kib;
	{
		const struct aeg_job_slab_status *s = &st1->slab[0];
		int zero = s->stats.used_bytes == 0 && s->stats.blocks == 0 && s->leases == 0 && s->lease_bytes == 0 &&
			   st1->pool.in_use == 0 && st1->loads == 0 && s->stats.free_bytes == s->stats.total_bytes &&
			   s->stats.largest_free_bytes == s->stats.total_bytes;

		ok(zero, "agent stats back to zero: %" PRIu64 " bytes in %" PRIu64 " blocks, %u leases, %u pool buffers, "
		   "%u loads; %" PRIu64 " allocations, %" PRIu64 " frees, %" PRIu64 " failed", s->stats.used_bytes,
		   s->stats.blocks, s->leases, st1->pool.in_use, st1->loads, s->stats.allocs, s->stats.frees,
		   s->stats.failed_allocs);
		failed |= !zero;
		ok(s->stats.allocs == s->stats.frees && s->stats.failed_allocs == 0,
		   "agent slab: every allocation freed, none failed");
		failed |= s->stats.allocs != s->stats.frees || s->stats.failed_allocs != 0;
	}
stop:
	if (agent > 0) {
		kill(agent, SIGTERM);
		if (waitpid(agent, &status, 0) == agent && !failed) {
			int clean = WIFEXITED(status) && WEXITSTATUS(status) == 0 && access(ready, F_OK) < 0 &&
				    access(cmd, F_OK) < 0;
			ok(clean, "agent stopped cleanly on SIGTERM (status %d) and removed its files", status);
			failed |= !clean;
		}
	}
	/* Every process that held GPU memory is gone: all of it must be back (64 MiB of slack for the driver). */
	if (opt.device == AEG_DEVICE_CUDA && !failed) {
		int back = gpu_free(&free1) == 0 && free1 + (64u << 20) >= free0;

		ok(back, "GPU 0 memory: %" PRIu64 " MiB free before, %" PRIu64 " MiB after", free0 >> 20, free1 >> 20);
		failed |= !back;
	}
out:
	if (failed) {
		char tail[256];

		snprintf(tail, sizeof(tail), "tail -n 30 %s >&2", log);
		fprintf(stderr, "soak: the agent's log (%s):\n", log);
		if (system(tail) != 0)
			fprintf(stderr, "soak: no agent log\n");
	}
	printf("# soak took %.1f s\n", (double)(now_ns() - t0) / 1e9);
	aeg_job_status_free(st0);
	aeg_job_status_free(st1);
	for (int f = 0; f < NFILES; f++)
		free(files[f]);
	if (!failed || getenv("AEGAEON_SOAK_KEEP") == NULL) {
		snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
		if (system(cmd) != 0)
			fprintf(stderr, "soak: could not remove %s\n", dir);
	} else {
		fprintf(stderr, "soak: kept %s\n", dir);
	}
	printf("%d passed, %d failed\n", tap - tap_failed, tap_failed + (failed && !tap_failed));
	printf("%s\n", failed ? "FAIL" : "PASS");
	return failed;
}

/* Agent protocol frames: explicit little-endian encoding and checked decoding of every message. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "proto.h"
#include "proto_codec.h"

static const char *const type_names[PROTO_TYPE_END] = {
	[PROTO_ERROR] = "error",
	[PROTO_HELLO] = "hello",
	[PROTO_LEASE] = "lease",
	[PROTO_LEASE_FREE] = "lease-free",
	[PROTO_POOL_FD] = "pool-fd",
	[PROTO_PREFETCH] = "prefetch",
	[PROTO_CHUNKS] = "chunks",
	[PROTO_RELEASE] = "release",
	[PROTO_STATUS] = "status",
	[PROTO_SHUTDOWN] = "shutdown",
	[PROTO_WAIT_EVENT] = "wait-event",
	[PROTO_WAIT_LOAD] = "wait-load",
};

const char *proto_type_name(unsigned type)
{
	if (type == 0 || type >= PROTO_TYPE_END)
		return "unknown";
	return type_names[type];
}

/* ---------------------------------------------------------------- header */

void proto_header_encode(const struct proto_header *h, unsigned char out[PROTO_HEADER_BYTES])
{
	struct wr w = { out, PROTO_HEADER_BYTES, 0, 0 };

	put_u32(&w, h->magic);
	put_u16(&w, h->version);
	put_u16(&w, h->type);
	put_u32(&w, h->flags);
	put_u32(&w, h->length);
	put_u64(&w, h->id);
}

int proto_header_decode(const unsigned char in[PROTO_HEADER_BYTES], struct proto_header *h)
{
	struct rd r = { in, PROTO_HEADER_BYTES, 0, 0 };

	h->magic = get_u32(&r);
	h->version = get_u16(&r);
	h->type = get_u16(&r);
	h->flags = get_u32(&r);
	h->length = get_u32(&r);
	h->id = get_u64(&r);
	if (h->magic != PROTO_MAGIC)
		return aeg_fail(AEG_EPROTO, "bad magic 0x%08x (not an aegaeon agent frame)", h->magic);
	if (h->type == 0 || h->type >= PROTO_TYPE_END)
		return aeg_fail(AEG_EPROTO, "unknown message type %u", h->type);
	if (h->version != (h->type == PROTO_HELLO ? 1 : PROTO_VERSION))
		return aeg_fail(AEG_EPROTO, "%s frame of protocol version %u, this side speaks %u",
				proto_type_name(h->type), h->version, PROTO_VERSION);
	if (h->flags & ~PROTO_F_KNOWN)
		return aeg_fail(AEG_EPROTO, "unknown flags 0x%x", h->flags & ~PROTO_F_KNOWN);
	if (h->type == PROTO_ERROR && !(h->flags & PROTO_F_REPLY))
		return aeg_fail(AEG_EPROTO, "error message that is not a reply");
	if (h->length > PROTO_MAX_PAYLOAD)
		return aeg_fail(AEG_EPROTO, "%s frame of %u bytes, at most %d",
				proto_type_name(h->type), h->length, PROTO_MAX_PAYLOAD);
	return 0;
}

/* -------------------------------------------------------------- messages */

static int valid_code(int32_t code)
{
	return code < 0;
}

static void enc_error(struct wr *w, const union proto_msg *m)
{
	put_u32(w, (uint32_t)m->error.code);
	put_str(w, m->error.detail, sizeof(m->error.detail));
}

static int dec_error(struct rd *r, union proto_msg *m)
{
	int err = 0;

	m->error.code = (int32_t)get_u32(r);
	get_str(r, m->error.detail, sizeof(m->error.detail), "error detail", &err);
	if (!err && !r->short_read && !valid_code(m->error.code))
		err = aeg_fail(AEG_EPROTO, "error reply with code %d (not an error)", m->error.code);
	return err;
}

static void enc_hello_req(struct wr *w, const union proto_msg *m)
{
	put_u16(w, m->hello_req.min_version);
	put_u16(w, m->hello_req.max_version);
	put_u32(w, m->hello_req.pid);
	put_str(w, m->hello_req.client, sizeof(m->hello_req.client));
}

static int dec_hello_req(struct rd *r, union proto_msg *m)
{
	struct proto_hello_req *q = &m->hello_req;
	int err = 0;

	q->min_version = get_u16(r);
	q->max_version = get_u16(r);
	q->pid = get_u32(r);
	get_str(r, q->client, sizeof(q->client), "client name", &err);
	if (!err && !r->short_read && (q->min_version == 0 || q->min_version > q->max_version))
		err = aeg_fail(AEG_EPROTO, "hello with versions %u..%u", q->min_version, q->max_version);
	return err;
}

static int check_pool(uint64_t bytes, uint64_t buffer)
{
	if ((bytes == 0) != (buffer == 0) || (buffer && bytes % buffer))
		return aeg_fail(AEG_EPROTO, "pool of %llu bytes in buffers of %llu",
				(unsigned long long)bytes, (unsigned long long)buffer);
	return 0;
}

static void enc_hello_rep(struct wr *w, const union proto_msg *m)
{
	const struct proto_hello_rep *p = &m->hello_rep;

	if (p->nslabs > AEG_JOB_MAX_GPUS) {
		w->over = 1;
		return;
	}
	put_u16(w, p->version);
	put_u32(w, p->agent_pid);
	put_u8(w, p->device);
	put_str(w, p->job_id, sizeof(p->job_id));
	put_u32(w, p->nslabs);
	for (uint32_t i = 0; i < p->nslabs; i++) {
		put_u32(w, (uint32_t)p->slabs[i].gpu);
		put_str(w, p->slabs[i].pci_bus_id, sizeof(p->slabs[i].pci_bus_id));
		put_u64(w, p->slabs[i].bytes);
		put(w, p->slabs[i].handle.bytes, AEG_HANDLE_BYTES);
	}
	put_u64(w, p->pool_bytes);
	put_u64(w, p->pool_buffer);
}

static int dec_hello_rep(struct rd *r, union proto_msg *m)
{
	struct proto_hello_rep *p = &m->hello_rep;
	int err = 0;

	p->version = get_u16(r);
	p->agent_pid = get_u32(r);
	p->device = get_u8(r);
	if (get_str(r, p->job_id, sizeof(p->job_id), "job id", &err))
		return err;
	p->nslabs = get_u32(r);
	if (r->short_read)
		return 0;
	if (p->version < PROTO_VERSION_MIN || p->version > PROTO_VERSION)
		return aeg_fail(AEG_EPROTO, "hello reply chose version %u, this side speaks %d..%d",
				p->version, PROTO_VERSION_MIN, PROTO_VERSION);
	if (p->device != AEG_DEVICE_CUDA && p->device != AEG_DEVICE_HOST)
		return aeg_fail(AEG_EPROTO, "hello reply with device kind %u", p->device);
	if (p->nslabs > AEG_JOB_MAX_GPUS)
		return aeg_fail(AEG_EPROTO, "hello reply with %u slabs, at most %d", p->nslabs, AEG_JOB_MAX_GPUS);
	for (uint32_t i = 0; i < p->nslabs; i++) {
		struct proto_slab *s = &p->slabs[i];

		s->gpu = (int32_t)get_u32(r);
		if (get_str(r, s->pci_bus_id, sizeof(s->pci_bus_id), "PCI bus id", &err))
			return err;
		s->bytes = get_u64(r);
		get(r, s->handle.bytes, AEG_HANDLE_BYTES);
		if (r->short_read)
			return 0;
		if (s->gpu < 0 || s->gpu > AEG_JOB_MAX_GPU_ORDINAL || s->bytes == 0)
			return aeg_fail(AEG_EPROTO, "hello reply: slab %u on GPU %d of %llu bytes",
					i, s->gpu, (unsigned long long)s->bytes);
	}
	p->pool_bytes = get_u64(r);
	p->pool_buffer = get_u64(r);
	if (r->short_read)
		return 0;
	return check_pool(p->pool_bytes, p->pool_buffer);
}

static void enc_lease_req(struct wr *w, const union proto_msg *m)
{
	put_u32(w, m->lease_req.slab);
	put_u64(w, m->lease_req.bytes);
}

static int dec_lease_req(struct rd *r, union proto_msg *m)
{
	m->lease_req.slab = get_u32(r);
	m->lease_req.bytes = get_u64(r);
	return r->short_read ? 0 : check_slab_index(m->lease_req.slab, "lease");
}

static void enc_lease_rep(struct wr *w, const union proto_msg *m)
{
	put_u32(w, m->lease_rep.slab);
	put_u64(w, m->lease_rep.offset);
	put_u64(w, m->lease_rep.bytes);
	put_u64(w, m->lease_rep.lease_id);
}

static int dec_lease_rep(struct rd *r, union proto_msg *m)
{
	struct proto_lease_rep *p = &m->lease_rep;

	p->slab = get_u32(r);
	p->offset = get_u64(r);
	p->bytes = get_u64(r);
	p->lease_id = get_u64(r);
	if (r->short_read)
		return 0;
	if (p->bytes == 0 || p->lease_id == 0 || p->offset % AEG_SLAB_ALIGN || p->offset + p->bytes < p->offset)
		return aeg_fail(AEG_EPROTO, "lease reply: id %llu, %llu bytes at offset %llu",
				(unsigned long long)p->lease_id, (unsigned long long)p->bytes,
				(unsigned long long)p->offset);
	return check_slab_index(p->slab, "lease reply");
}

static void enc_lease_free_req(struct wr *w, const union proto_msg *m)
{
	put_u32(w, m->lease_free_req.slab);
	put_u64(w, m->lease_free_req.lease_id);
}

static int dec_lease_free_req(struct rd *r, union proto_msg *m)
{
	m->lease_free_req.slab = get_u32(r);
	m->lease_free_req.lease_id = get_u64(r);
	if (r->short_read)
		return 0;
	if (m->lease_free_req.lease_id == 0)
		return aeg_fail(AEG_EPROTO, "lease-free of lease id 0");
	return check_slab_index(m->lease_free_req.slab, "lease-free");
}

static void enc_pool_rep(struct wr *w, const union proto_msg *m)
{
	put_u64(w, m->pool_rep.pool_bytes);
	put_u64(w, m->pool_rep.buffer_bytes);
}

static int dec_pool_rep(struct rd *r, union proto_msg *m)
{
	m->pool_rep.pool_bytes = get_u64(r);
	m->pool_rep.buffer_bytes = get_u64(r);
	if (r->short_read)
		return 0;
	if (m->pool_rep.pool_bytes == 0)
		return aeg_fail(AEG_EPROTO, "pool-fd reply for an empty pool");
	return check_pool(m->pool_rep.pool_bytes, m->pool_rep.buffer_bytes);
}

/* --------------------------------------------------------------- slices */

void proto_slice_set(struct proto_slice *p, const struct aeg_slice *s)
{
	memset(p, 0, offsetof(struct proto_slice, rules));
	if (s == NULL)
		return;
	p->present = 1;
	p->rank = s->rank;
	p->world = s->world;
	p->preset = (uint32_t)s->preset;
	p->flags = s->flags;
	p->nrules = s->nrules <= AEG_SLICE_MAX_RULES ? s->nrules : AEG_SLICE_MAX_RULES;
	for (uint32_t i = 0; i < p->nrules; i++) {
		p->rules[i].dim = s->rules[i].dim;
		snprintf(p->rules[i].pattern, sizeof(p->rules[i].pattern), "%s", s->rules[i].pattern);
	}
}

const struct aeg_slice *proto_slice_view(const struct proto_slice *p, struct aeg_slice *s,
					 struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES])
{
	if (!p->present)
		return NULL;
	for (uint32_t i = 0; i < p->nrules && i < AEG_SLICE_MAX_RULES; i++) {
		rules[i].pattern = p->rules[i].pattern;
		rules[i].dim = p->rules[i].dim;
	}
	*s = (struct aeg_slice){
		.rank = p->rank, .world = p->world, .preset = (enum aeg_slice_preset)p->preset,
		.rules = rules, .nrules = p->nrules, .flags = p->flags,
	};
	return s;
}

static void enc_slice(struct wr *w, const struct proto_slice *p)
{
	if (!p->present)
		return;
	if (p->nrules > AEG_SLICE_MAX_RULES) {
		w->over = 1;
		return;
	}
	put_u32(w, (uint32_t)p->rank);
	put_u32(w, (uint32_t)p->world);
	put_u32(w, p->preset);
	put_u32(w, p->flags);
	put_u32(w, p->nrules);
	for (uint32_t i = 0; i < p->nrules; i++) {
		put_str(w, p->rules[i].pattern, sizeof(p->rules[i].pattern));
		put_u32(w, (uint32_t)p->rules[i].dim);
	}
}

/* A slice when bytes remain (else none), checked as aeg_slice_check checks one. */
static int dec_slice(struct rd *r, struct proto_slice *p, const char *what)
{
	struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES];
	struct aeg_slice s;
	int err = 0;

	memset(p, 0, offsetof(struct proto_slice, rules));
	if (r->short_read || r->pos == r->len)
		return 0;
	p->present = 1;
	p->rank = (int32_t)get_u32(r);
	p->world = (int32_t)get_u32(r);
	p->preset = get_u32(r);
	p->flags = get_u32(r);
	p->nrules = get_u32(r);
	if (p->nrules > AEG_SLICE_MAX_RULES)
		return aeg_fail(AEG_EPROTO, "%s slice of %u rules, at most %d", what, p->nrules, AEG_SLICE_MAX_RULES);
	for (uint32_t i = 0; i < p->nrules; i++) {
		if (get_str(r, p->rules[i].pattern, sizeof(p->rules[i].pattern), "slice pattern", &err))
			return err;
		p->rules[i].dim = (int32_t)get_u32(r);
	}
	if (r->short_read)
		return 0;
	if (aeg_slice_check(proto_slice_view(p, &s, rules)) != 0) {
		char why[512];

		snprintf(why, sizeof(why), "%s", aeg_error_detail());
		return aeg_fail(AEG_EPROTO, "%s: %s", what, why);
	}
	return 0;
}

static void enc_prefetch_req(struct wr *w, const union proto_msg *m)
{
	put_u32(w, m->prefetch_req.slab);
	put_u64(w, m->prefetch_req.chunk_bytes);
	put_str(w, m->prefetch_req.path, sizeof(m->prefetch_req.path));
	enc_slice(w, &m->prefetch_req.slice);
}

static int dec_prefetch_req(struct rd *r, union proto_msg *m)
{
	struct proto_prefetch_req *q = &m->prefetch_req;
	int err = 0;

	q->slab = get_u32(r);
	q->chunk_bytes = get_u64(r);
	if (get_str(r, q->path, sizeof(q->path), "prefetch path", &err) || r->short_read)
		return err;
	err = dec_slice(r, &q->slice, "prefetch");
	if (err || r->short_read)
		return err;
	if (q->path[0] != '/')
		return aeg_fail(AEG_EPROTO, "prefetch path '%s' is not absolute", q->path);
	return check_slab_index(q->slab, "prefetch");
}

static void enc_chunks_req(struct wr *w, const union proto_msg *m)
{
	put_u64(w, m->chunks_req.load_id);
	put_u32(w, m->chunks_req.slab);
	put_u32(w, m->chunks_req.first);
	put_str(w, m->chunks_req.path, sizeof(m->chunks_req.path));
	enc_slice(w, &m->chunks_req.slice);
}

static int dec_chunks_req(struct rd *r, union proto_msg *m)
{
	struct proto_chunks_req *q = &m->chunks_req;
	int err = 0;

	q->load_id = get_u64(r);
	q->slab = get_u32(r);
	q->first = get_u32(r);
	if (get_str(r, q->path, sizeof(q->path), "chunks path", &err) || r->short_read)
		return err;
	err = dec_slice(r, &q->slice, "chunks");
	if (err || r->short_read)
		return err;
	if (q->slice.present && q->load_id != 0)
		return aeg_fail(AEG_EPROTO, "chunks request of load %llu with a slice (a slice is for a path)",
				(unsigned long long)q->load_id);
	if ((q->load_id != 0) == (q->path[0] != '\0'))
		return aeg_fail(AEG_EPROTO, "chunks request needs a load id or a path, not %s",
				q->load_id ? "both" : "neither");
	if (q->path[0] != '\0' && q->path[0] != '/')
		return aeg_fail(AEG_EPROTO, "chunks path '%s' is not absolute", q->path);
	return check_slab_index(q->slab, "chunks");
}

static void enc_chunks_rep(struct wr *w, const union proto_msg *m)
{
	const struct proto_chunks_rep *p = &m->chunks_rep;

	if (p->count > PROTO_CHUNKS_PER_PAGE) {
		w->over = 1;
		return;
	}
	put_u64(w, p->load_id);
	put_u32(w, p->slab);
	put_u32(w, (uint32_t)p->status);
	put_u64(w, p->file_bytes);
	put_u64(w, p->done_bytes);
	put_u32(w, p->total);
	put_u32(w, p->first);
	put_u32(w, p->count);
	for (uint32_t i = 0; i < p->count; i++) {
		put_u64(w, p->chunks[i].offset);
		put_u64(w, p->chunks[i].size);
		put_u64(w, p->chunks[i].file_offset);
		put_u64(w, p->chunks[i].slab_id);
		put(w, p->chunks[i].event.bytes, AEG_HANDLE_BYTES);
	}
	if (p->detail[0] != '\0' || p->slice.present)
		put_str(w, p->detail, sizeof(p->detail));
	enc_slice(w, &p->slice);
}

static int dec_chunks_rep(struct rd *r, union proto_msg *m)
{
	struct proto_chunks_rep *p = &m->chunks_rep;

	p->load_id = get_u64(r);
	p->slab = get_u32(r);
	p->status = (int32_t)get_u32(r);
	p->file_bytes = get_u64(r);
	p->done_bytes = get_u64(r);
	p->total = get_u32(r);
	p->first = get_u32(r);
	p->count = get_u32(r);
	if (r->short_read)
		return 0;
	if (p->load_id == 0)
		return aeg_fail(AEG_EPROTO, "chunk list of load id 0");
	if (p->status > 0)
		return aeg_fail(AEG_EPROTO, "chunk list with status %d", p->status);
	if (p->done_bytes > p->file_bytes)
		return aeg_fail(AEG_EPROTO, "chunk list: %llu of %llu bytes done",
				(unsigned long long)p->done_bytes, (unsigned long long)p->file_bytes);
	if (p->count > PROTO_CHUNKS_PER_PAGE || p->first > p->total || p->count > p->total - p->first)
		return aeg_fail(AEG_EPROTO, "chunk list page %u+%u of %u chunks (at most %d a page)",
				p->first, p->count, p->total, PROTO_CHUNKS_PER_PAGE);
	for (uint32_t i = 0; i < p->count; i++) {
		struct proto_chunk *c = &p->chunks[i];

		c->offset = get_u64(r);
		c->size = get_u64(r);
		c->file_offset = get_u64(r);
		c->slab_id = get_u64(r);
		get(r, c->event.bytes, AEG_HANDLE_BYTES);
		if (r->short_read)
			return 0;
		if (c->size == 0 || c->slab_id == 0 || c->offset % AEG_SLAB_ALIGN ||
		    c->offset + c->size < c->offset || c->file_offset + c->size < c->file_offset)
			return aeg_fail(AEG_EPROTO, "chunk %u: id %llu, %llu bytes at slab offset %llu",
					p->first + i, (unsigned long long)c->slab_id,
					(unsigned long long)c->size, (unsigned long long)c->offset);
	}
	p->detail[0] = '\0';
	p->slice.present = 0;
	if (r->pos < r->len) {
		int err = 0;

		/* Present only when there is one (or a slice follows): the encoding stays canonical. */
		if (get_str(r, p->detail, sizeof(p->detail), "load error detail", &err))
			return err;
		err = dec_slice(r, &p->slice, "chunk list");
		if (err || r->short_read)
			return err;
		if (p->detail[0] == '\0' && !p->slice.present)
			return aeg_fail(AEG_EPROTO, "chunk list with an empty error detail (it is left out)");
		if (p->detail[0] != '\0' && (p->status == 0 || p->status == AEG_EBUSY))
			return aeg_fail(AEG_EPROTO, "chunk list of a load %s with an error detail",
					p->status == 0 ? "loaded" : "loading");
	}
	return check_slab_index(p->slab, "chunk list");
}

static void enc_release_req(struct wr *w, const union proto_msg *m)
{
	const struct proto_release_req *q = &m->release_req;

	if (q->count > PROTO_RELEASE_MAX) {
		w->over = 1;
		return;
	}
	put_u32(w, q->flags);
	put_u32(w, q->count);
	if (q->flags & PROTO_RELEASE_LOAD)
		put_u64(w, q->load_id);
	for (uint32_t i = 0; i < q->count; i++) {
		put_u32(w, q->ids[i].slab);
		put_u64(w, q->ids[i].slab_id);
	}
}

static int dec_release_req(struct rd *r, union proto_msg *m)
{
	struct proto_release_req *q = &m->release_req;

	q->flags = get_u32(r);
	q->count = get_u32(r);
	if (r->short_read)
		return 0;
	if (q->flags & ~(PROTO_RELEASE_ALL | PROTO_RELEASE_LOAD))
		return aeg_fail(AEG_EPROTO, "release with unknown flags 0x%x", q->flags);
	if (q->flags == (PROTO_RELEASE_ALL | PROTO_RELEASE_LOAD))
		return aeg_fail(AEG_EPROTO, "release of all and of a load at once");
	if (q->flags && q->count)
		return aeg_fail(AEG_EPROTO, "release of %s with %u ids", q->flags & PROTO_RELEASE_ALL ? "all" : "a load",
				q->count);
	q->load_id = 0;
	if (q->flags & PROTO_RELEASE_LOAD) {
		q->load_id = get_u64(r);
		if (!r->short_read && q->load_id == 0)
			return aeg_fail(AEG_EPROTO, "release of load 0");
	}
	if (q->count > PROTO_RELEASE_MAX)
		return aeg_fail(AEG_EPROTO, "release of %u ids, at most %d", q->count, PROTO_RELEASE_MAX);
	for (uint32_t i = 0; i < q->count; i++) {
		q->ids[i].slab = get_u32(r);
		q->ids[i].slab_id = get_u64(r);
		if (r->short_read)
			return 0;
		if (q->ids[i].slab_id == 0)
			return aeg_fail(AEG_EPROTO, "release of id 0");
		if (check_slab_index(q->ids[i].slab, "release"))
			return AEG_EPROTO;
	}
	return 0;
}

static void enc_release_rep(struct wr *w, const union proto_msg *m)
{
	put_u32(w, m->release_rep.released);
}

static int dec_release_rep(struct rd *r, union proto_msg *m)
{
	m->release_rep.released = get_u32(r);
	return 0;
}

static void enc_wait_event_req(struct wr *w, const union proto_msg *m)
{
	put(w, m->wait_event_req.event.bytes, AEG_HANDLE_BYTES);
	put_u32(w, (uint32_t)m->wait_event_req.timeout_ms);
}

static int dec_wait_event_req(struct rd *r, union proto_msg *m)
{
	get(r, m->wait_event_req.event.bytes, AEG_HANDLE_BYTES);
	m->wait_event_req.timeout_ms = (int32_t)get_u32(r);
	if (!r->short_read && m->wait_event_req.timeout_ms < -1)
		return aeg_fail(AEG_EPROTO, "wait-event: timeout %d ms (-1 waits without limit)",
				m->wait_event_req.timeout_ms);
	return 0;
}

static void enc_wait_load_req(struct wr *w, const union proto_msg *m)
{
	put_u64(w, m->wait_load_req.load_id);
	put_u32(w, (uint32_t)m->wait_load_req.timeout_ms);
}

static int dec_wait_load_req(struct rd *r, union proto_msg *m)
{
	m->wait_load_req.load_id = get_u64(r);
	m->wait_load_req.timeout_ms = (int32_t)get_u32(r);
	if (r->short_read)
		return 0;
	if (m->wait_load_req.load_id == 0)
		return aeg_fail(AEG_EPROTO, "wait-load: load id 0");
	if (m->wait_load_req.timeout_ms < -1)
		return aeg_fail(AEG_EPROTO, "wait-load: timeout %d ms (-1 waits without limit)",
				m->wait_load_req.timeout_ms);
	return 0;
}

/* Requests and replies of each type; NULL for an empty payload. */
struct codec {
	void (*enc)(struct wr *w, const union proto_msg *m);
	int (*dec)(struct rd *r, union proto_msg *m);
};

static const struct codec requests[PROTO_TYPE_END] = {
	[PROTO_HELLO] = { enc_hello_req, dec_hello_req },
	[PROTO_LEASE] = { enc_lease_req, dec_lease_req },
	[PROTO_LEASE_FREE] = { enc_lease_free_req, dec_lease_free_req },
	[PROTO_PREFETCH] = { enc_prefetch_req, dec_prefetch_req },
	[PROTO_CHUNKS] = { enc_chunks_req, dec_chunks_req },
	[PROTO_RELEASE] = { enc_release_req, dec_release_req },
	[PROTO_STATUS] = { enc_status_req, dec_status_req },
	[PROTO_WAIT_EVENT] = { enc_wait_event_req, dec_wait_event_req },
	[PROTO_WAIT_LOAD] = { enc_wait_load_req, dec_wait_load_req },
};

static const struct codec replies[PROTO_TYPE_END] = {
	[PROTO_ERROR] = { enc_error, dec_error },
	[PROTO_HELLO] = { enc_hello_rep, dec_hello_rep },
	[PROTO_LEASE] = { enc_lease_rep, dec_lease_rep },
	[PROTO_POOL_FD] = { enc_pool_rep, dec_pool_rep },
	[PROTO_PREFETCH] = { enc_chunks_rep, dec_chunks_rep },
	[PROTO_CHUNKS] = { enc_chunks_rep, dec_chunks_rep },
	[PROTO_RELEASE] = { enc_release_rep, dec_release_rep },
	[PROTO_STATUS] = { enc_status_rep, dec_status_rep },
};

int proto_encode(uint16_t type, uint32_t flags, uint64_t id, const union proto_msg *msg,
		 unsigned char *frame, size_t *frame_len)
{
	struct wr w = { frame + PROTO_HEADER_BYTES, PROTO_MAX_PAYLOAD, 0, 0 };
	struct proto_header h;
	const struct codec *c;

	if (type == 0 || type >= PROTO_TYPE_END || (flags & ~PROTO_F_KNOWN) ||
	    (type == PROTO_ERROR && !(flags & PROTO_F_REPLY)))
		return aeg_fail(AEG_EINVAL, "cannot encode message type %u flags 0x%x", type, flags);
	c = (flags & PROTO_F_REPLY) ? &replies[type] : &requests[type];
	if (c->enc) {
		if (msg == NULL)
			return aeg_fail(AEG_EINVAL, "%s message missing", proto_type_name(type));
		c->enc(&w, msg);
	}
	if (w.over)
		return aeg_fail(AEG_EINVAL, "%s %s over its limits (a count, a string or %d bytes)",
				proto_type_name(type), (flags & PROTO_F_REPLY) ? "reply" : "request",
				PROTO_MAX_PAYLOAD);
	h.magic = PROTO_MAGIC;
	h.version = type == PROTO_HELLO ? 1 : PROTO_VERSION;
	h.type = type;
	h.flags = flags;
	h.length = (uint32_t)w.len;
	h.id = id;
	proto_header_encode(&h, frame);
	*frame_len = PROTO_HEADER_BYTES + w.len;
	return 0;
}

int proto_decode(const struct proto_header *h, const unsigned char *payload, union proto_msg *msg)
{
	struct rd r = { payload, h->length, 0, 0 };
	const char *kind = (h->flags & PROTO_F_REPLY) ? "reply" : "request";
	const struct codec *c;
	int err;

	if (h->type == 0 || h->type >= PROTO_TYPE_END)
		return aeg_fail(AEG_EPROTO, "unknown message type %u", h->type);
	c = (h->flags & PROTO_F_REPLY) ? &replies[h->type] : &requests[h->type];
	if (c->dec) {
		err = c->dec(&r, msg);
		if (err)
			return err;
	}
	if (r.short_read)
		return aeg_fail(AEG_EPROTO, "%s %s truncated (%u bytes)", proto_type_name(h->type), kind,
				h->length);
	if (r.pos != r.len)
		return aeg_fail(AEG_EPROTO, "%s %s: %zu bytes after its end", proto_type_name(h->type), kind,
				r.len - r.pos);
	return 0;
}

/* Agent protocol: every message round trips, every malformed frame is rejected, socket I/O edge cases. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"
#include "proto.h"
#include "testutil.h"

static unsigned char frame[PROTO_MAX_FRAME], frame2[PROTO_MAX_FRAME];
static union proto_msg msg, back;

static void fill_handle(aeg_handle_t *h, unsigned seed)
{
	for (size_t i = 0; i < AEG_HANDLE_BYTES; i++)
		h->bytes[i] = (unsigned char)(seed * 31 + i);
}

/* One valid message of each kind, so round trips and mutations start from it. */
static void make(uint16_t type, uint32_t flags, union proto_msg *m)
{
	memset(m, 0, sizeof(*m));
	if (flags & PROTO_F_REPLY) {
		switch (type) {
		case PROTO_ERROR:
			m->error.code = AEG_ENOSPC;
			strcpy(m->error.detail, "slab 0: 5 GiB asked, largest free block 1 GiB");
			break;
		case PROTO_HELLO:
			m->hello_rep.version = 1;
			m->hello_rep.agent_pid = 4242;
			m->hello_rep.device = AEG_DEVICE_HOST;
			strcpy(m->hello_rep.job_id, "17");
			m->hello_rep.nslabs = 2;
			for (int i = 0; i < 2; i++) {
				m->hello_rep.slabs[i].gpu = i * 2;
				snprintf(m->hello_rep.slabs[i].pci_bus_id, AEG_PCI_BUS_ID_LEN, "0000:%02x:00.0", 0x3b + i);
				m->hello_rep.slabs[i].bytes = (1ull << 34) + (uint64_t)i;
				fill_handle(&m->hello_rep.slabs[i].handle, (unsigned)i);
			}
			m->hello_rep.pool_bytes = 1ull << 33;
			m->hello_rep.pool_buffer = 1ull << 25;
			break;
		case PROTO_LEASE:
			m->lease_rep.slab = 1;
			m->lease_rep.offset = 1ull << 30;
			m->lease_rep.bytes = 1ull << 31;
			m->lease_rep.lease_id = 9;
			break;
		case PROTO_POOL_FD:
			m->pool_rep.pool_bytes = 1ull << 30;
			m->pool_rep.buffer_bytes = 1ull << 20;
			break;
		case PROTO_PREFETCH:
		case PROTO_CHUNKS:
			m->chunks_rep.load_id = 3;
			m->chunks_rep.slab = 0;
			m->chunks_rep.status = AEG_EBUSY;
			m->chunks_rep.file_bytes = 1000 * 4096;
			m->chunks_rep.done_bytes = 4096;
			m->chunks_rep.total = 1000;
			m->chunks_rep.first = 256;
			m->chunks_rep.count = PROTO_CHUNKS_PER_PAGE;
			for (uint32_t i = 0; i < m->chunks_rep.count; i++) {
				m->chunks_rep.chunks[i].offset = (256 + i) * 4096ull;
				m->chunks_rep.chunks[i].size = 4096;
				m->chunks_rep.chunks[i].file_offset = (256 + i) * 4096ull;
				m->chunks_rep.chunks[i].slab_id = 100 + i;
				fill_handle(&m->chunks_rep.chunks[i].event, i);
			}
			if (type == PROTO_CHUNKS) {
				/* A failed load's page carries its error's detail. */
				m->chunks_rep.status = AEG_EIO;
				strcpy(m->chunks_rep.detail, "/models/a.bin: reading 33554432 bytes at 1048576: Input/output error");
			}
			break;
		case PROTO_RELEASE:
			m->release_rep.released = 12;
			break;
		case PROTO_STATUS:
			m->status_rep.nslabs = AEG_JOB_MAX_GPUS;
			for (int i = 0; i < AEG_JOB_MAX_GPUS; i++) {
				m->status_rep.slabs[i].gpu = i;
				m->status_rep.slabs[i].stats.total_bytes = 1ull << 35;
				m->status_rep.slabs[i].stats.used_bytes = 1ull << 20;
				m->status_rep.slabs[i].stats.blocks = 3;
				m->status_rep.slabs[i].leases = 1;
				m->status_rep.slabs[i].lease_bytes = 1ull << 19;
			}
			m->status_rep.has_pool = 1;
			m->status_rep.pool.buffers = 256;
			m->status_rep.pool.in_use = 3;
			m->status_rep.pool.numa_node = -1;
			m->status_rep.clients = 4;
			m->status_rep.loads_total = 20;
			m->status_rep.first = 8;
			m->status_rep.count = PROTO_LOADS_PER_PAGE;
			for (int i = 0; i < PROTO_LOADS_PER_PAGE; i++) {
				struct proto_load *l = &m->status_rep.loads[i];
				l->load_id = 9 + (uint64_t)i;
				l->status = i ? 0 : AEG_EIO;
				l->file_bytes = 10;
				l->done_bytes = 10;
				l->chunks = 1;
				/* Longest paths, so the page size is proven to fit a frame. */
				memset(l->path, 'p', PROTO_PATH_MAX - 1);
				l->path[0] = '/';
				l->path[PROTO_PATH_MAX - 1] = '\0';
			}
			break;
		}
		return;
	}
	switch (type) {
	case PROTO_HELLO:
		m->hello_req.min_version = 1;
		m->hello_req.max_version = 1;
		m->hello_req.pid = 77;
		strcpy(m->hello_req.client, "test");
		break;
	case PROTO_LEASE:
		m->lease_req.slab = 1;
		m->lease_req.bytes = 1ull << 30;
		break;
	case PROTO_LEASE_FREE:
		m->lease_free_req.slab = 1;
		m->lease_free_req.lease_id = 5;
		break;
	case PROTO_PREFETCH:
		m->prefetch_req.slab = 0;
		m->prefetch_req.chunk_bytes = 64 << 20;
		strcpy(m->prefetch_req.path, "/models/llama/model-00001.safetensors");
		break;
	case PROTO_CHUNKS:
		m->chunks_req.slab = 0;
		m->chunks_req.first = 256;
		strcpy(m->chunks_req.path, "/models/x");
		break;
	case PROTO_RELEASE:
		m->release_req.count = PROTO_RELEASE_MAX;
		for (uint32_t i = 0; i < m->release_req.count; i++) {
			m->release_req.ids[i].slab = i % 2;
			m->release_req.ids[i].slab_id = i + 1;
		}
		break;
	case PROTO_STATUS:
		m->status_req.first_load = 8;
		break;
	case PROTO_WAIT_EVENT:
		fill_handle(&m->wait_event_req.event, 77);
		m->wait_event_req.timeout_ms = -1;
		break;
	case PROTO_WAIT_LOAD:
		m->wait_load_req.load_id = 12;
		m->wait_load_req.timeout_ms = 250;
		break;
	}
}

static const struct {
	uint16_t type;
	uint32_t flags;
} all[] = {
	{ PROTO_ERROR, PROTO_F_REPLY },
	{ PROTO_HELLO, 0 }, { PROTO_HELLO, PROTO_F_REPLY },
	{ PROTO_LEASE, 0 }, { PROTO_LEASE, PROTO_F_REPLY },
	{ PROTO_LEASE_FREE, 0 }, { PROTO_LEASE_FREE, PROTO_F_REPLY },
	{ PROTO_POOL_FD, 0 }, { PROTO_POOL_FD, PROTO_F_REPLY },
	{ PROTO_PREFETCH, 0 }, { PROTO_PREFETCH, PROTO_F_REPLY },
	{ PROTO_CHUNKS, 0 }, { PROTO_CHUNKS, PROTO_F_REPLY },
	{ PROTO_RELEASE, 0 }, { PROTO_RELEASE, PROTO_F_REPLY },
	{ PROTO_STATUS, 0 }, { PROTO_STATUS, PROTO_F_REPLY },
	{ PROTO_SHUTDOWN, 0 }, { PROTO_SHUTDOWN, PROTO_F_REPLY },
	{ PROTO_WAIT_EVENT, 0 }, { PROTO_WAIT_EVENT, PROTO_F_REPLY },
	{ PROTO_WAIT_LOAD, 0 }, { PROTO_WAIT_LOAD, PROTO_F_REPLY },
};

static void every_message_round_trips(void **state)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(all); i++) {
		struct proto_header h;
		size_t len, len2;

		make(all[i].type, all[i].flags, &msg);
		assert_int_equal(proto_encode(all[i].type, all[i].flags, 1000 + i, &msg, frame, &len), 0);
		assert_true(len <= PROTO_MAX_FRAME);
		assert_int_equal(proto_header_decode(frame, &h), 0);
		assert_int_equal(h.type, all[i].type);
		assert_int_equal(h.flags, all[i].flags);
		assert_int_equal(h.id, 1000 + i);
		assert_int_equal(h.length, len - PROTO_HEADER_BYTES);
		memset(&back, 0xa5, sizeof(back));
		if (proto_decode(&h, frame + PROTO_HEADER_BYTES, &back))
			fail_msg("%s: %s", proto_type_name(all[i].type), aeg_error_detail());
		/* Decoding then encoding again gives the same bytes: every field survived. */
		assert_int_equal(proto_encode(all[i].type, all[i].flags, 1000 + i, &back, frame2, &len2), 0);
		assert_int_equal(len, len2);
		assert_memory_equal(frame, frame2, len);
	}

	/* And the fields themselves, for a few. */
	make(PROTO_HELLO, PROTO_F_REPLY, &msg);
	assert_memory_equal(&back, &back, 1);
	{
		struct proto_header h;
		size_t len;

		assert_int_equal(proto_encode(PROTO_HELLO, PROTO_F_REPLY, 1, &msg, frame, &len), 0);
		assert_int_equal(proto_header_decode(frame, &h), 0);
		assert_int_equal(proto_decode(&h, frame + PROTO_HEADER_BYTES, &back), 0);
		assert_int_equal(back.hello_rep.nslabs, 2);
		assert_int_equal(back.hello_rep.slabs[1].gpu, 2);
		assert_string_equal(back.hello_rep.slabs[1].pci_bus_id, "0000:3c:00.0");
		assert_int_equal(back.hello_rep.slabs[1].bytes, (1ull << 34) + 1);
		assert_memory_equal(&back.hello_rep.slabs[1].handle, &msg.hello_rep.slabs[1].handle, AEG_HANDLE_BYTES);
		assert_string_equal(back.hello_rep.job_id, "17");
		assert_int_equal(back.hello_rep.pool_buffer, 1ull << 25);

		/* Release by load: the id travels, and only with its flag. */
		memset(&msg, 0, sizeof(msg));
		msg.release_req.flags = PROTO_RELEASE_LOAD;
		msg.release_req.load_id = 1ull << 40;
		assert_int_equal(proto_encode(PROTO_RELEASE, 0, 1, &msg, frame, &len), 0);
		assert_int_equal(len, PROTO_HEADER_BYTES + 16);
		assert_int_equal(proto_header_decode(frame, &h), 0);
		assert_int_equal(proto_decode(&h, frame + PROTO_HEADER_BYTES, &back), 0);
		assert_int_equal(back.release_req.flags, PROTO_RELEASE_LOAD);
		assert_int_equal(back.release_req.count, 0);
		assert_int_equal(back.release_req.load_id, 1ull << 40);
		msg.release_req.flags = PROTO_RELEASE_ALL;
		assert_int_equal(proto_encode(PROTO_RELEASE, 0, 1, &msg, frame, &len), 0);
		assert_int_equal(len, PROTO_HEADER_BYTES + 8);

		make(PROTO_ERROR, PROTO_F_REPLY, &msg);
		assert_int_equal(proto_encode(PROTO_ERROR, PROTO_F_REPLY, 1, &msg, frame, &len), 0);
		assert_int_equal(proto_header_decode(frame, &h), 0);
		assert_int_equal(proto_decode(&h, frame + PROTO_HEADER_BYTES, &back), 0);
		assert_int_equal(back.error.code, AEG_ENOSPC);
		assert_string_equal(back.error.detail, msg.error.detail);
	}
}

/* A slice travels after a prefetch's or chunk request's path and after a chunk list's detail, only when there is one. */
static void slices_round_trip(void **state)
{
	static const struct aeg_slice_rule rules[] = { { "*.q_proj.weight", 0 }, { "*.o_proj.weight", 1 } };
	const struct aeg_slice spec = { .rank = 3, .world = 8, .preset = AEG_SLICE_PRESET_MEGATRON, .rules = rules,
					.nrules = 2, .flags = AEG_SLICE_UNEVEN };
	static const struct { uint16_t type; uint32_t flags; } kinds[] = {
		{ PROTO_PREFETCH, 0 }, { PROTO_CHUNKS, 0 }, { PROTO_CHUNKS, PROTO_F_REPLY },
	};
	struct aeg_slice_rule vr[AEG_SLICE_MAX_RULES];
	struct aeg_slice view;
	const struct aeg_slice *got;

	(void)state;
	for (size_t k = 0; k < AEG_ARRAY_SIZE(kinds); k++) {
		struct proto_slice *ps;
		struct proto_header h;
		size_t plain, len, len2;

		make(kinds[k].type, kinds[k].flags, &msg);
		if (kinds[k].flags)
			msg.chunks_rep.detail[0] = '\0';
		assert_int_equal(proto_encode(kinds[k].type, kinds[k].flags, 1, &msg, frame, &plain), 0);
		ps = kinds[k].type == PROTO_PREFETCH ? &msg.prefetch_req.slice :
		     kinds[k].flags ? &msg.chunks_rep.slice : &msg.chunks_req.slice;
		proto_slice_set(ps, &spec);
		assert_int_equal(proto_encode(kinds[k].type, kinds[k].flags, 1, &msg, frame, &len), 0);
		/* 20 bytes of fields, each rule a string and a dim; a reply's empty detail before it. */
		assert_int_equal(len, plain + 20 + (2 + 15 + 4) * 2 + (kinds[k].flags ? 2 : 0));
		assert_int_equal(proto_header_decode(frame, &h), 0);
		memset(&back, 0xa5, sizeof(back));
		if (proto_decode(&h, frame + PROTO_HEADER_BYTES, &back))
			fail_msg("%s: %s", proto_type_name(kinds[k].type), aeg_error_detail());
		ps = kinds[k].type == PROTO_PREFETCH ? &back.prefetch_req.slice :
		     kinds[k].flags ? &back.chunks_rep.slice : &back.chunks_req.slice;
		got = proto_slice_view(ps, &view, vr);
		assert_non_null(got);
		assert_int_equal(got->rank, 3);
		assert_int_equal(got->world, 8);
		assert_int_equal(got->preset, AEG_SLICE_PRESET_MEGATRON);
		assert_int_equal(got->flags, AEG_SLICE_UNEVEN);
		assert_int_equal(got->nrules, 2);
		assert_string_equal(got->rules[1].pattern, "*.o_proj.weight");
		assert_int_equal(got->rules[1].dim, 1);
		assert_int_equal(proto_encode(kinds[k].type, kinds[k].flags, 1, &back, frame2, &len2), 0);
		assert_int_equal(len, len2);
		assert_memory_equal(frame, frame2, len);
		/* None set: the frame is a whole load's, as before slices. */
		proto_slice_set(ps, NULL);
		assert_null(proto_slice_view(ps, &view, vr));
		assert_int_equal(proto_encode(kinds[k].type, kinds[k].flags, 1, &back, frame2, &len2), 0);
		assert_int_equal(len2, plain);
	}
}

static void encoder_refuses_what_breaks_limits(void **state)
{
	size_t len;

	make(PROTO_RELEASE, 0, &msg);
	msg.release_req.count = PROTO_RELEASE_MAX + 1;
	assert_int_equal(proto_encode(PROTO_RELEASE, 0, 1, &msg, frame, &len), AEG_EINVAL);
	make(PROTO_CHUNKS, PROTO_F_REPLY, &msg);
	msg.chunks_rep.count = PROTO_CHUNKS_PER_PAGE + 1;
	assert_int_equal(proto_encode(PROTO_CHUNKS, PROTO_F_REPLY, 1, &msg, frame, &len), AEG_EINVAL);
	make(PROTO_PREFETCH, 0, &msg);
	memset(msg.prefetch_req.path, 'a', sizeof(msg.prefetch_req.path));   /* no NUL */
	assert_int_equal(proto_encode(PROTO_PREFETCH, 0, 1, &msg, frame, &len), AEG_EINVAL);
	assert_int_equal(proto_encode(PROTO_ERROR, 0, 1, &msg, frame, &len), AEG_EINVAL);
	assert_int_equal(proto_encode(PROTO_TYPE_END, 0, 1, &msg, frame, &len), AEG_EINVAL);
	assert_int_equal(proto_encode(PROTO_LEASE, 0x8, 1, &msg, frame, &len), AEG_EINVAL);
	assert_int_equal(proto_encode(PROTO_LEASE, 0, 1, NULL, frame, &len), AEG_EINVAL);
}

/* Little-endian stores into an encoded frame, to forge bad ones. */
static void set32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void set16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)v;
	p[1] = (unsigned char)(v >> 8);
}

#define HDR_VERSION 4
#define HDR_TYPE 6
#define HDR_FLAGS 8
#define HDR_LENGTH 12
#define P PROTO_HEADER_BYTES

enum mut { M_NONE, M_U8, M_U16, M_U32, M_TRUNCATE, M_APPEND, M_BYTE };

static const struct bad_case {
	const char *name;
	uint16_t type;
	uint32_t flags;
	void (*edit)(union proto_msg *m);   /* made invalid before encoding, or NULL */
	enum mut mut;                       /* then a byte-level change */
	size_t at;                          /* offset in the frame */
	uint32_t value;
	const char *detail;
} bad_cases[];

static void e_hello_versions(union proto_msg *m) { m->hello_req.min_version = 2; m->hello_req.max_version = 1; }
static void e_hello_v0(union proto_msg *m) { m->hello_req.min_version = 0; }
static void e_hello_rep_version(union proto_msg *m) { m->hello_rep.version = 9; }
static void e_hello_rep_device(union proto_msg *m) { m->hello_rep.device = 7; }
static void e_hello_rep_gpu(union proto_msg *m) { m->hello_rep.slabs[1].gpu = 4096; }
static void e_hello_rep_bytes(union proto_msg *m) { m->hello_rep.slabs[0].bytes = 0; }
static void e_hello_rep_pool(union proto_msg *m) { m->hello_rep.pool_bytes += 1; }
static void e_error_code(union proto_msg *m) { m->error.code = 0; }
static void e_lease_slab(union proto_msg *m) { m->lease_req.slab = AEG_JOB_MAX_GPUS; }
static void e_lease_rep_align(union proto_msg *m) { m->lease_rep.offset = 100; }
static void e_lease_rep_id(union proto_msg *m) { m->lease_rep.lease_id = 0; }
static void e_lease_rep_wrap(union proto_msg *m) { m->lease_rep.offset = UINT64_MAX - 255; }
static void e_lease_free_id(union proto_msg *m) { m->lease_free_req.lease_id = 0; }
static void e_pool_empty(union proto_msg *m) { m->pool_rep.pool_bytes = 0; m->pool_rep.buffer_bytes = 0; }
static void e_prefetch_rel(union proto_msg *m) { strcpy(m->prefetch_req.path, "model.bin"); }
static void e_prefetch_empty(union proto_msg *m) { m->prefetch_req.path[0] = '\0'; }
static void e_chunks_both(union proto_msg *m) { m->chunks_req.load_id = 4; }
static void e_chunks_neither(union proto_msg *m) { m->chunks_req.path[0] = '\0'; }
static void e_chunks_rel(union proto_msg *m) { strcpy(m->chunks_req.path, "x"); }
static void e_crep_total(union proto_msg *m) { m->chunks_rep.total = 300; }
static void e_crep_done(union proto_msg *m) { m->chunks_rep.done_bytes = m->chunks_rep.file_bytes + 1; }
static void e_crep_status(union proto_msg *m) { m->chunks_rep.status = 3; }
static void e_crep_size(union proto_msg *m) { m->chunks_rep.chunks[7].size = 0; }
static void e_crep_align(union proto_msg *m) { m->chunks_rep.chunks[7].offset = 4097; }
static void e_crep_id(union proto_msg *m) { m->chunks_rep.chunks[0].slab_id = 0; }
static void e_crep_load(union proto_msg *m) { m->chunks_rep.load_id = 0; }
static void e_crep_detail_busy(union proto_msg *m) { strcpy(m->chunks_rep.detail, "not yet"); }
static void e_crep_detail_ok(union proto_msg *m) { m->chunks_rep.status = 0; strcpy(m->chunks_rep.detail, "fine"); }
static void e_crep_failed(union proto_msg *m) { m->chunks_rep.status = AEG_EIO; }
static void e_rel_all_ids(union proto_msg *m) { m->release_req.flags = PROTO_RELEASE_ALL; m->release_req.count = 1; }
static void e_rel_flags(union proto_msg *m) { m->release_req.flags = 0x10; }
static void e_rel_zero(union proto_msg *m) { m->release_req.ids[17].slab_id = 0; }
static void e_rel_both(union proto_msg *m) { m->release_req.flags = PROTO_RELEASE_ALL | PROTO_RELEASE_LOAD; m->release_req.count = 0; }
static void e_rel_load_ids(union proto_msg *m) { m->release_req.flags = PROTO_RELEASE_LOAD; m->release_req.load_id = 5; }
static void e_rel_load_0(union proto_msg *m) { m->release_req.flags = PROTO_RELEASE_LOAD; m->release_req.count = 0; }
static void e_rel_slab(union proto_msg *m) { m->release_req.ids[3].slab = 1000; }
static void e_st_used(union proto_msg *m) { m->status_rep.slabs[5].stats.used_bytes = (1ull << 35) + 1; }
static void e_st_pool(union proto_msg *m) { m->status_rep.pool.in_use = 300; }
static void e_st_page(union proto_msg *m) { m->status_rep.loads_total = 10; }
static void e_st_load(union proto_msg *m) { m->status_rep.loads[2].done_bytes = 11; }
static void e_wait_timeout(union proto_msg *m) { m->wait_event_req.timeout_ms = -2; }
static void e_wload_id(union proto_msg *m) { m->wait_load_req.load_id = 0; }
static void e_wload_timeout(union proto_msg *m) { m->wait_load_req.timeout_ms = -5; }
static const struct aeg_slice_rule bad_rule[] = { { "*.o_proj.weight", -3 } }, empty_rule[] = { { "", 0 } };
static void e_slice_rank(union proto_msg *m) { proto_slice_set(&m->prefetch_req.slice, &(struct aeg_slice){ .rank = 4, .world = 4 }); }
static void e_slice_world(union proto_msg *m) { proto_slice_set(&m->prefetch_req.slice, &(struct aeg_slice){ .world = 0 }); }
static void e_slice_preset(union proto_msg *m) { proto_slice_set(&m->prefetch_req.slice, &(struct aeg_slice){ .world = 2, .preset = 9 }); }
static void e_slice_dim(union proto_msg *m) { proto_slice_set(&m->prefetch_req.slice, &(struct aeg_slice){ .world = 2, .rules = bad_rule, .nrules = 1 }); }
static void e_slice_empty(union proto_msg *m) { proto_slice_set(&m->chunks_req.slice, &(struct aeg_slice){ .world = 2, .rules = empty_rule, .nrules = 1 }); }
static void e_slice_by_id(union proto_msg *m)
{
	m->chunks_req.load_id = 4;
	m->chunks_req.path[0] = '\0';
	proto_slice_set(&m->chunks_req.slice, &(struct aeg_slice){ .world = 2 });
}
static void e_slice_loaded_detail(union proto_msg *m)
{
	m->chunks_rep.status = 0;
	strcpy(m->chunks_rep.detail, "fine");
	proto_slice_set(&m->chunks_rep.slice, &(struct aeg_slice){ .world = 2 });
}

static const struct bad_case bad_cases[] = {
	{ "magic", PROTO_LEASE, 0, NULL, M_U32, 0, 0x50545448, "bad magic" },
	{ "version", PROTO_LEASE, 0, NULL, M_U16, HDR_VERSION, 2, "protocol version 2" },
	{ "hello version", PROTO_HELLO, 0, NULL, M_U16, HDR_VERSION, 2, "protocol version 2" },
	{ "type 0", PROTO_LEASE, 0, NULL, M_U16, HDR_TYPE, 0, "unknown message type 0" },
	{ "type 99", PROTO_LEASE, 0, NULL, M_U16, HDR_TYPE, 99, "unknown message type 99" },
	{ "flags", PROTO_LEASE, 0, NULL, M_U32, HDR_FLAGS, 0x80000001u, "unknown flags" },
	{ "error request", PROTO_ERROR, PROTO_F_REPLY, NULL, M_U32, HDR_FLAGS, 0, "not a reply" },
	{ "oversize", PROTO_LEASE, 0, NULL, M_U32, HDR_LENGTH, PROTO_MAX_PAYLOAD + 1, "at most 65512" },
	{ "huge length", PROTO_LEASE, 0, NULL, M_U32, HDR_LENGTH, UINT32_MAX, "at most 65512" },
	{ "truncated lease", PROTO_LEASE, 0, NULL, M_TRUNCATE, 1, 0, "truncated" },
	{ "empty lease", PROTO_LEASE, 0, NULL, M_TRUNCATE, 12, 0, "truncated" },
	{ "trailing", PROTO_LEASE, 0, NULL, M_APPEND, 0, 0, "1 bytes after its end" },
	{ "trailing shutdown", PROTO_SHUTDOWN, 0, NULL, M_APPEND, 0, 0, "bytes after its end" },
	{ "trailing hello rep", PROTO_HELLO, PROTO_F_REPLY, NULL, M_APPEND, 0, 0, "bytes after its end" },
	{ "truncated hello rep", PROTO_HELLO, PROTO_F_REPLY, NULL, M_TRUNCATE, 30, 0, "truncated" },
	{ "truncated status rep", PROTO_STATUS, PROTO_F_REPLY, NULL, M_TRUNCATE, 5000, 0, "truncated" },
	{ "truncated chunks", PROTO_CHUNKS, PROTO_F_REPLY, NULL, M_TRUNCATE, 1, 0, "truncated" },
	{ "hello versions", PROTO_HELLO, 0, e_hello_versions, M_NONE, 0, 0, "versions 2..1" },
	{ "hello version 0", PROTO_HELLO, 0, e_hello_v0, M_NONE, 0, 0, "versions 0..1" },
	{ "client name long", PROTO_HELLO, 0, NULL, M_U16, P + 8, PROTO_NAME_MAX, "client name of 64 bytes" },
	{ "client name past end", PROTO_HELLO, 0, NULL, M_U16, P + 8, 60, "truncated" },
	{ "client name NUL", PROTO_HELLO, 0, NULL, M_U8, P + 11, 0, "NUL byte" },
	{ "hello rep version", PROTO_HELLO, PROTO_F_REPLY, e_hello_rep_version, M_NONE, 0, 0, "chose version 9" },
	{ "hello rep device", PROTO_HELLO, PROTO_F_REPLY, e_hello_rep_device, M_NONE, 0, 0, "device kind 7" },
	{ "hello rep slabs", PROTO_HELLO, PROTO_F_REPLY, NULL, M_U32, P + 7 + 2 + 2, 65, "65 slabs" },
	{ "hello rep gpu", PROTO_HELLO, PROTO_F_REPLY, e_hello_rep_gpu, M_NONE, 0, 0, "GPU 4096" },
	{ "hello rep bytes", PROTO_HELLO, PROTO_F_REPLY, e_hello_rep_bytes, M_NONE, 0, 0, "of 0 bytes" },
	{ "hello rep pool", PROTO_HELLO, PROTO_F_REPLY, e_hello_rep_pool, M_NONE, 0, 0, "in buffers of" },
	{ "error code", PROTO_ERROR, PROTO_F_REPLY, e_error_code, M_NONE, 0, 0, "not an error" },
	{ "lease slab", PROTO_LEASE, 0, e_lease_slab, M_NONE, 0, 0, "slab index 64" },
	{ "lease rep align", PROTO_LEASE, PROTO_F_REPLY, e_lease_rep_align, M_NONE, 0, 0, "at offset 100" },
	{ "lease rep id", PROTO_LEASE, PROTO_F_REPLY, e_lease_rep_id, M_NONE, 0, 0, "lease reply: id 0" },
	{ "lease rep wraps", PROTO_LEASE, PROTO_F_REPLY, e_lease_rep_wrap, M_NONE, 0, 0, "lease reply" },
	{ "lease free id", PROTO_LEASE_FREE, 0, e_lease_free_id, M_NONE, 0, 0, "lease id 0" },
	{ "pool rep empty", PROTO_POOL_FD, PROTO_F_REPLY, e_pool_empty, M_NONE, 0, 0, "empty pool" },
	{ "prefetch relative", PROTO_PREFETCH, 0, e_prefetch_rel, M_NONE, 0, 0, "not absolute" },
	{ "prefetch empty", PROTO_PREFETCH, 0, e_prefetch_empty, M_NONE, 0, 0, "not absolute" },
	{ "prefetch path long", PROTO_PREFETCH, 0, NULL, M_U16, P + 12, PROTO_PATH_MAX, "prefetch path of 4096 bytes" },
	{ "chunks both", PROTO_CHUNKS, 0, e_chunks_both, M_NONE, 0, 0, "not both" },
	{ "chunks neither", PROTO_CHUNKS, 0, e_chunks_neither, M_NONE, 0, 0, "not neither" },
	{ "chunks relative", PROTO_CHUNKS, 0, e_chunks_rel, M_NONE, 0, 0, "not absolute" },
	{ "chunk page past total", PROTO_CHUNKS, PROTO_F_REPLY, e_crep_total, M_NONE, 0, 0, "page 256+256 of 300" },
	{ "chunk count over page", PROTO_CHUNKS, PROTO_F_REPLY, NULL, M_U32, P + 40, PROTO_CHUNKS_PER_PAGE + 1, "at most 256 a page" },
	{ "chunk done bytes", PROTO_CHUNKS, PROTO_F_REPLY, e_crep_done, M_NONE, 0, 0, "bytes done" },
	{ "chunk status", PROTO_CHUNKS, PROTO_F_REPLY, e_crep_status, M_NONE, 0, 0, "status 3" },
	{ "chunk size 0", PROTO_PREFETCH, PROTO_F_REPLY, e_crep_size, M_NONE, 0, 0, "chunk 263" },
	{ "chunk align", PROTO_CHUNKS, PROTO_F_REPLY, e_crep_align, M_NONE, 0, 0, "slab offset 4097" },
	{ "chunk id 0", PROTO_CHUNKS, PROTO_F_REPLY, e_crep_id, M_NONE, 0, 0, "id 0" },
	{ "chunk load 0", PROTO_CHUNKS, PROTO_F_REPLY, e_crep_load, M_NONE, 0, 0, "load id 0" },
	{ "chunk detail while loading", PROTO_PREFETCH, PROTO_F_REPLY, e_crep_detail_busy, M_NONE, 0, 0, "loading with an error detail" },
	{ "chunk detail when loaded", PROTO_PREFETCH, PROTO_F_REPLY, e_crep_detail_ok, M_NONE, 0, 0, "loaded with an error detail" },
	{ "chunk detail empty", PROTO_PREFETCH, PROTO_F_REPLY, e_crep_failed, M_APPEND, 0, 2, "empty error detail" },
	{ "chunk detail cut", PROTO_PREFETCH, PROTO_F_REPLY, e_crep_failed, M_APPEND, 0, 1, "truncated" },
	{ "chunk detail long", PROTO_CHUNKS, PROTO_F_REPLY, NULL, M_U16, P + 44 + PROTO_CHUNKS_PER_PAGE * (32 + AEG_HANDLE_BYTES), PROTO_DETAIL_MAX, "load error detail of 1024 bytes" },
	{ "release all with ids", PROTO_RELEASE, 0, e_rel_all_ids, M_NONE, 0, 0, "release of all with 1 ids" },
	{ "release flags", PROTO_RELEASE, 0, e_rel_flags, M_NONE, 0, 0, "unknown flags 0x10" },
	{ "release id 0", PROTO_RELEASE, 0, e_rel_zero, M_NONE, 0, 0, "release of id 0" },
	{ "release all and a load", PROTO_RELEASE, 0, e_rel_both, M_NONE, 0, 0, "release of all and of a load at once" },
	{ "release load with ids", PROTO_RELEASE, 0, e_rel_load_ids, M_NONE, 0, 0, "release of a load with 4096 ids" },
	{ "release load 0", PROTO_RELEASE, 0, e_rel_load_0, M_NONE, 0, 0, "release of load 0" },
	{ "truncated release load", PROTO_RELEASE, 0, e_rel_load_0, M_TRUNCATE, 4, 0, "truncated" },
	{ "release slab", PROTO_RELEASE, 0, e_rel_slab, M_NONE, 0, 0, "slab index 1000" },
	{ "release count", PROTO_RELEASE, 0, NULL, M_U32, P + 4, PROTO_RELEASE_MAX + 1, "release of 4097 ids" },
	{ "release count past end", PROTO_RELEASE, 0, NULL, M_U32, P + 4, 100, "bytes after its end" },
	{ "status slabs", PROTO_STATUS, PROTO_F_REPLY, NULL, M_U32, P, 65, "65 slabs" },
	{ "status used", PROTO_STATUS, PROTO_F_REPLY, e_st_used, M_NONE, 0, 0, "slab 5 on GPU 5" },
	{ "status pool", PROTO_STATUS, PROTO_F_REPLY, e_st_pool, M_NONE, 0, 0, "300 of 256 buffers" },
	{ "status page", PROTO_STATUS, PROTO_F_REPLY, e_st_page, M_NONE, 0, 0, "page 8+8 of 10" },
	{ "status load", PROTO_STATUS, PROTO_F_REPLY, e_st_load, M_NONE, 0, 0, "11 of 10 bytes" },
	{ "wait timeout", PROTO_WAIT_EVENT, 0, e_wait_timeout, M_NONE, 0, 0, "timeout -2 ms" },
	{ "wait timeout huge", PROTO_WAIT_EVENT, 0, NULL, M_U32, P + AEG_HANDLE_BYTES, 0x80000000u, "timeout -2147483648 ms" },
	{ "truncated wait", PROTO_WAIT_EVENT, 0, NULL, M_TRUNCATE, AEG_HANDLE_BYTES, 0, "truncated" },
	{ "trailing wait", PROTO_WAIT_EVENT, 0, NULL, M_APPEND, 0, 0, "1 bytes after its end" },
	{ "trailing wait rep", PROTO_WAIT_EVENT, PROTO_F_REPLY, NULL, M_APPEND, 0, 0, "1 bytes after its end" },
	{ "wait-load id 0", PROTO_WAIT_LOAD, 0, e_wload_id, M_NONE, 0, 0, "load id 0" },
	{ "wait-load timeout", PROTO_WAIT_LOAD, 0, e_wload_timeout, M_NONE, 0, 0, "timeout -5 ms" },
	{ "truncated wait-load", PROTO_WAIT_LOAD, 0, NULL, M_TRUNCATE, 8, 0, "truncated" },
	{ "trailing wait-load", PROTO_WAIT_LOAD, 0, NULL, M_APPEND, 0, 0, "1 bytes after its end" },
	{ "slice rank", PROTO_PREFETCH, 0, e_slice_rank, M_NONE, 0, 0, "prefetch: slice rank 4: must be 0..3" },
	{ "slice world", PROTO_PREFETCH, 0, e_slice_world, M_NONE, 0, 0, "prefetch: slice world size 0" },
	{ "slice preset", PROTO_PREFETCH, 0, e_slice_preset, M_NONE, 0, 0, "slice preset 9" },
	{ "slice dim", PROTO_PREFETCH, 0, e_slice_dim, M_NONE, 0, 0, "dim -3: must be 0..31 or -1" },
	{ "slice cut", PROTO_PREFETCH, 0, e_slice_dim, M_TRUNCATE, 3, 0, "truncated" },
	{ "slice rules", PROTO_PREFETCH, 0, e_slice_dim, M_U32, P + 14 + 37 + 16, 65, "slice of 65 rules, at most 64" },
	{ "slice empty pattern", PROTO_CHUNKS, 0, e_slice_empty, M_NONE, 0, 0, "chunks: slice rule 0: empty pattern" },
	{ "slice by load id", PROTO_CHUNKS, 0, e_slice_by_id, M_NONE, 0, 0, "with a slice (a slice is for a path)" },
	{ "slice with a detail when loaded", PROTO_CHUNKS, PROTO_F_REPLY, e_slice_loaded_detail, M_NONE, 0, 0,
	  "loaded with an error detail" },
};

static void malformed_frames_are_rejected(void **state)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(bad_cases); i++) {
		const struct bad_case *c = &bad_cases[i];
		struct proto_header h;
		size_t len;
		int err;

		make(c->type, c->flags, &msg);
		if (c->edit)
			c->edit(&msg);
		if (proto_encode(c->type, c->flags, 5, &msg, frame, &len))
			fail_msg("case '%s': cannot encode: %s", c->name, aeg_error_detail());
		switch (c->mut) {
		case M_U8:
			frame[c->at] = (unsigned char)c->value;
			break;
		case M_U16:
			set16(frame + c->at, (uint16_t)c->value);
			break;
		case M_U32:
			set32(frame + c->at, c->value);
			break;
		case M_TRUNCATE:
			set32(frame + HDR_LENGTH, (uint32_t)(len - P - c->at));
			break;
		case M_APPEND:  /* @value zero bytes, at least one */
			memset(frame + len, 0, c->value ? c->value : 1);
			set32(frame + HDR_LENGTH, (uint32_t)(len - P + (c->value ? c->value : 1)));
			break;
		default:
			break;
		}
		aeg_error_clear();
		err = proto_header_decode(frame, &h);
		if (!err)
			err = proto_decode(&h, frame + P, &back);
		if (err != AEG_EPROTO || strstr(aeg_error_detail(), c->detail) == NULL)
			fail_msg("case '%s': got %s '%s', wanted AEG_EPROTO '%s'", c->name,
				 aeg_errname(err), aeg_error_detail(), c->detail);
	}
}

/* Random bytes never crash the decoder (ASan watches), and rarely parse. */
static void garbage_does_not_crash(void **state)
{
	unsigned seed = 12345;

	for (int round = 0; round < 5000; round++) {
		struct proto_header h;
		size_t len = 1 + (size_t)(rand_r(&seed) % 600);

		make(all[round % AEG_ARRAY_SIZE(all)].type, all[round % AEG_ARRAY_SIZE(all)].flags, &msg);
		assert_int_equal(proto_encode(all[round % AEG_ARRAY_SIZE(all)].type,
					      all[round % AEG_ARRAY_SIZE(all)].flags, 1, &msg, frame, &len), 0);
		/* Flip a few payload bytes of a valid frame, and cut it somewhere. */
		for (int k = 0; k < 4 && len > P; k++)
			frame[P + (size_t)rand_r(&seed) % (len - P)] = (unsigned char)rand_r(&seed);
		if (proto_header_decode(frame, &h) == 0) {
			h.length = (uint32_t)((size_t)rand_r(&seed) % (h.length + 1));
			(void)proto_decode(&h, frame + P, &back);
		}
	}
}

static void socket_send_recv_and_fd_passing(void **state)
{
	struct proto_header h;
	int sv[2], got = -2, memfd, before = count_fds();
	struct stat a, b;

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	make(PROTO_STATUS, PROTO_F_REPLY, &msg);
	assert_int_equal(proto_send(sv[0], PROTO_STATUS, PROTO_F_REPLY, 42, &msg, -1, frame), 0);
	assert_int_equal(proto_recv(sv[1], &h, &back, &got, frame2), 0);
	assert_int_equal(h.id, 42);
	assert_int_equal(got, -1);
	assert_int_equal(back.status_rep.count, PROTO_LOADS_PER_PAGE);

	/* A descriptor travels with the pool-fd reply. */
	memfd = memfd_create("aeg-test", MFD_CLOEXEC);
	assert_true(memfd >= 0);
	make(PROTO_POOL_FD, PROTO_F_REPLY, &msg);
	assert_int_equal(proto_send(sv[0], PROTO_POOL_FD, PROTO_F_REPLY, 43, &msg, memfd, frame), 0);
	assert_int_equal(proto_recv(sv[1], &h, &back, &got, frame2), 0);
	assert_true(got >= 0);
	assert_int_equal(fstat(memfd, &a), 0);
	assert_int_equal(fstat(got, &b), 0);
	assert_int_equal(a.st_ino, b.st_ino);
	assert_true(fcntl(got, F_GETFD) & FD_CLOEXEC);
	close(got);

	/* One nobody asked for is closed and the frame refused. */
	assert_int_equal(proto_send(sv[0], PROTO_POOL_FD, PROTO_F_REPLY, 44, &msg, memfd, frame), 0);
	assert_int_equal(proto_recv(sv[1], &h, &back, NULL, frame2), AEG_EPROTO);
	assert_non_null(strstr(aeg_error_detail(), "unexpected descriptor"));
	close(memfd);

	/* End of stream between frames is a clean end; inside one, a protocol error. */
	assert_int_equal(write(sv[0], frame, 10), 10);
	shutdown(sv[0], SHUT_WR);
	assert_int_equal(proto_recv(sv[1], &h, &back, NULL, frame2), AEG_EPROTO);
	assert_non_null(strstr(aeg_error_detail(), "closed inside a frame"));
	assert_int_equal(proto_recv(sv[1], &h, &back, NULL, frame2), AEG_ECANCELED);
	close(sv[0]);
	close(sv[1]);

	/* A peer gone: send fails with AEG_EIO, no SIGPIPE. */
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	close(sv[1]);
	assert_int_equal(proto_send(sv[0], PROTO_SHUTDOWN, 0, 1, NULL, -1, frame), AEG_EIO);
	close(sv[0]);
	assert_int_equal(count_fds(), before);
}

static void stalled_frame_times_out(void **state)
{
	struct proto_header h;
	size_t len;
	int sv[2];

	proto_frame_timeout_ms = 200;
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	make(PROTO_LEASE, 0, &msg);
	assert_int_equal(proto_encode(PROTO_LEASE, 0, 1, &msg, frame, &len), 0);
	assert_int_equal(write(sv[0], frame, len - 3), (ssize_t)(len - 3));
	uint64_t t0 = aeg_now_ns();
	assert_int_equal(proto_recv(sv[1], &h, &back, NULL, frame2), AEG_ETIMEDOUT);
	assert_true(aeg_now_ns() - t0 >= 150000000ull);
	assert_true(aeg_now_ns() - t0 < 5000000000ull);
	close(sv[0]);
	close(sv[1]);
	proto_frame_timeout_ms = PROTO_FRAME_TIMEOUT_MS;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(every_message_round_trips),
		cmocka_unit_test(slices_round_trip),
		cmocka_unit_test(encoder_refuses_what_breaks_limits),
		cmocka_unit_test(malformed_frames_are_rejected),
		cmocka_unit_test(garbage_does_not_crash),
		cmocka_unit_test(socket_send_recv_and_fd_passing),
		cmocka_unit_test(stalled_frame_times_out),
	};
	return cmocka_run_group_tests_name("proto", tests, NULL, NULL);
}

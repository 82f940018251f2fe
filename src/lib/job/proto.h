/* The agent protocol: versioned, length-prefixed, bounds-checked frames over a Unix stream socket. */
#ifndef AEGAEON_PROTO_H
#define AEGAEON_PROTO_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include <aegaeon/attach.h>
#include <aegaeon/device.h>
#include <aegaeon/jobrec.h>
#include <aegaeon/pinned.h>
#include <aegaeon/slab.h>
#include <aegaeon/slice.h>
#include <aegaeon/topo.h>

/*
 * A frame is a 24-byte header, every field little-endian:
 *   u32 magic "AEGP", u16 version, u16 type, u32 flags, u32 length, u64 id
 * then @length bytes of payload. A reply carries PROTO_F_REPLY, the
 * request's type and id, or the type PROTO_ERROR. The first request of a
 * connection must be PROTO_HELLO; hello frames are always of version 1, so
 * peers of any version can negotiate. Anything else that does not parse
 * (unknown type or flag, other version, oversize length, truncated or
 * trailing bytes, values out of range) is AEG_EPROTO and ends the connection.
 */
#define PROTO_MAGIC 0x50474541u         /* "AEGP" read as little-endian */
#define PROTO_VERSION 1
#define PROTO_VERSION_MIN 1
#define PROTO_HEADER_BYTES 24
#define PROTO_MAX_FRAME 65536
#define PROTO_MAX_PAYLOAD (PROTO_MAX_FRAME - PROTO_HEADER_BYTES)
#define PROTO_FRAME_TIMEOUT_MS 10000    /* for the rest of a frame once its first byte came */

#define PROTO_F_REPLY 0x1u
#define PROTO_F_KNOWN PROTO_F_REPLY

enum proto_type {
	PROTO_ERROR = 1,        /* reply only */
	PROTO_HELLO,
	PROTO_LEASE,
	PROTO_LEASE_FREE,
	PROTO_POOL_FD,          /* the reply carries the pool's memfd (SCM_RIGHTS) */
	PROTO_PREFETCH,
	PROTO_CHUNKS,
	PROTO_RELEASE,
	PROTO_STATUS,
	PROTO_SHUTDOWN,
	PROTO_WAIT_EVENT,       /* the reply comes once the chunk's event is recorded */
	PROTO_WAIT_LOAD,        /* the reply comes once the load has stopped: loaded, or why not */
	PROTO_TYPE_END
};

#define PROTO_DETAIL_MAX 1024           /* error detail, NUL included */
#define PROTO_NAME_MAX 64               /* client name, job id */
#define PROTO_PATH_MAX 4096             /* a path, NUL included */
#define PROTO_CHUNKS_PER_PAGE 256
#define PROTO_RELEASE_MAX AEG_JOB_RELEASE_MAX
#define PROTO_LOADS_PER_PAGE 8

struct proto_header {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t flags;
	uint32_t length;
	uint64_t id;
};

struct proto_error {
	int32_t code;                   /* an AEG_E* code, < 0 */
	char detail[PROTO_DETAIL_MAX];
};

struct proto_hello_req {
	uint16_t min_version, max_version;
	uint32_t pid;
	char client[PROTO_NAME_MAX];    /* "aegaeon-cli", "python", ... for the log */
};

struct proto_slab {
	int32_t gpu;                    /* ordinal as the agent sees it */
	char pci_bus_id[AEG_PCI_BUS_ID_LEN];
	uint64_t bytes;
	aeg_handle_t handle;
};

struct proto_hello_rep {
	uint16_t version;               /* the one both sides speak from now on */
	uint32_t agent_pid;
	uint8_t device;                 /* enum aeg_device_kind */
	char job_id[PROTO_NAME_MAX];
	uint32_t nslabs;
	struct proto_slab slabs[AEG_JOB_MAX_GPUS];
	uint64_t pool_bytes, pool_buffer;       /* 0 when the job has no pool */
};

/* bytes 0 asks for the largest free range of the slab. */
struct proto_lease_req {
	uint32_t slab;                  /* index into hello's slabs */
	uint64_t bytes;
};

struct proto_lease_rep {
	uint32_t slab;
	uint64_t offset, bytes, lease_id;
};

struct proto_lease_free_req {
	uint32_t slab;
	uint64_t lease_id;
};

struct proto_pool_rep {
	uint64_t pool_bytes, buffer_bytes;
};

/*
 * A tensor-parallel slice spec (aegaeon/slice.h) on the wire: after a
 * message's other fields, and only when @present (so a whole load's
 * frames are as they were): i32 rank, i32 world, u32 preset, u32 flags,
 * u32 nrules, then each rule's pattern (a string) and i32 dim. Decoding
 * checks it as aeg_slice_check does.
 */
struct proto_slice {
	uint8_t present;
	int32_t rank, world;
	uint32_t preset, flags, nrules;
	struct proto_slice_rule {
		int32_t dim;
		char pattern[AEG_SLICE_PATTERN_MAX];
	} rules[AEG_SLICE_MAX_RULES];
};

/* proto_slice_set - @spec (NULL: none) in wire form; the caller checked it. */
void proto_slice_set(struct proto_slice *p, const struct aeg_slice *spec);

/* proto_slice_view - the spec @p holds, its rules in @rules; NULL when none is present. */
const struct aeg_slice *proto_slice_view(const struct proto_slice *p, struct aeg_slice *spec,
					 struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES]);

/* chunk_bytes 0 takes the agent's default. @path must be absolute. A slice loads a rank's part. */
struct proto_prefetch_req {
	uint32_t slab;
	uint64_t chunk_bytes;
	char path[PROTO_PATH_MAX];
	struct proto_slice slice;
};

/*
 * By load id when load_id != 0, else the newest load of @path into @slab
 * with the same slice (none: a whole load).
 */
struct proto_chunks_req {
	uint64_t load_id;
	uint32_t slab;
	uint32_t first;                 /* first chunk of the page asked for */
	char path[PROTO_PATH_MAX];
	struct proto_slice slice;
};

struct proto_chunk {
	uint64_t offset;                /* from the slab's base */
	uint64_t size;
	uint64_t file_offset;
	uint64_t slab_id;               /* the block's id in its slab */
	aeg_handle_t event;             /* complete once the chunk's bytes are there */
};

/* Reply to PROTO_PREFETCH (first page) and PROTO_CHUNKS. */
struct proto_chunks_rep {
	uint64_t load_id;
	uint32_t slab;
	int32_t status;                 /* 0 loaded, AEG_EBUSY loading, or the load's error */
	uint64_t file_bytes, done_bytes;
	uint32_t total, first, count;
	struct proto_chunk chunks[PROTO_CHUNKS_PER_PAGE];
	/*
	 * Why a failed load failed, after the chunks; then a sliced load's
	 * spec. Each is left out when empty, the detail only when no slice
	 * follows it.
	 */
	char detail[PROTO_DETAIL_MAX];
	struct proto_slice slice;
};

#define PROTO_RELEASE_ALL 0x1u
#define PROTO_RELEASE_LOAD 0x2u

struct proto_release_id {
	uint32_t slab;
	uint64_t slab_id;
};

/*
 * Release blocks by id; or (PROTO_RELEASE_ALL, count 0) everything; or
 * (PROTO_RELEASE_LOAD, count 0) load @load_id, its chunks and the load
 * itself, which goes even when it has no chunk. @load_id is on the wire
 * with PROTO_RELEASE_LOAD only, after count.
 */
struct proto_release_req {
	uint32_t flags;
	uint32_t count;
	uint64_t load_id;
	struct proto_release_id ids[PROTO_RELEASE_MAX];
};

struct proto_release_rep {
	uint32_t released;              /* chunks freed */
};

struct proto_status_req {
	uint32_t first_load;
};

struct proto_slab_status {
	int32_t gpu;
	struct aeg_slab_stats stats;
	uint32_t leases;
	uint64_t lease_bytes;
};

struct proto_load {
	uint64_t load_id;
	uint32_t slab;
	int32_t status;
	uint64_t file_bytes, done_bytes;
	uint32_t chunks;
	char path[PROTO_PATH_MAX];
	/* A sliced load's spec in short (its rules come with its chunk list); world 0: a whole load. */
	struct proto_load_slice {
		int32_t rank, world;
		uint32_t preset, flags, nrules;
	} slice;
};

/*
 * A page of loads. After the loads, and only when one of them is sliced
 * (so a page of whole loads is as it was before slices), each load's
 * slice in short: i32 rank, i32 world (0: whole), u32 preset, u32 flags,
 * u32 nrules, checked as aeg_slice_check checks a spec.
 */
struct proto_status_rep {
	uint32_t nslabs;
	struct proto_slab_status slabs[AEG_JOB_MAX_GPUS];
	uint8_t has_pool;
	struct aeg_pool_stats pool;
	uint32_t clients;
	uint32_t loads_total, first, count;
	struct proto_load loads[PROTO_LOADS_PER_PAGE];
};

/*
 * Wait until the agent's chunk event behind @event is recorded (its copies
 * queued): an empty reply, or PROTO_ERROR with the chunk's failure code,
 * AEG_ETIMEDOUT after @timeout_ms (-1: no limit), or AEG_ENOENT for a
 * handle that is none of the agent's events. The waiter then waits on the
 * handle itself: a CUDA IPC event cannot tell "not recorded yet".
 */
struct proto_wait_event_req {
	aeg_handle_t event;
	int32_t timeout_ms;
};

/*
 * Wait until load @load_id has stopped: an empty reply once every chunk is
 * on the GPU, or PROTO_ERROR with the load's error and its detail,
 * AEG_ETIMEDOUT after @timeout_ms (-1: no limit), AEG_ENOENT for a load
 * the agent does not hold. One round trip for a whole load, where waiting
 * on each chunk's event would be one per chunk.
 */
struct proto_wait_load_req {
	uint64_t load_id;
	int32_t timeout_ms;
};

/* Every message; requests and replies with empty payloads have no member. */
union proto_msg {
	struct proto_error error;
	struct proto_hello_req hello_req;
	struct proto_hello_rep hello_rep;
	struct proto_lease_req lease_req;
	struct proto_lease_rep lease_rep;
	struct proto_lease_free_req lease_free_req;
	struct proto_pool_rep pool_rep;
	struct proto_prefetch_req prefetch_req;
	struct proto_chunks_req chunks_req;
	struct proto_chunks_rep chunks_rep;
	struct proto_release_req release_req;
	struct proto_release_rep release_rep;
	struct proto_status_req status_req;
	struct proto_status_rep status_rep;
	struct proto_wait_event_req wait_event_req;
	struct proto_wait_load_req wait_load_req;
};

/* proto_type_name - "hello", "lease", ...; "unknown" otherwise. */
const char *proto_type_name(unsigned type);

/*
 * proto_header_encode / proto_header_decode - the 24 header bytes. Decoding
 * checks magic, version (PROTO_VERSION, and 1 for hello), type, flags and
 * length <= PROTO_MAX_PAYLOAD; AEG_EPROTO with the reason otherwise.
 */
void proto_header_encode(const struct proto_header *h, unsigned char out[PROTO_HEADER_BYTES]);
int proto_header_decode(const unsigned char in[PROTO_HEADER_BYTES], struct proto_header *h);

/*
 * proto_encode - a whole frame (header and payload) of message @msg of
 * @type (a reply when @flags has PROTO_F_REPLY) into @frame (of
 * PROTO_MAX_FRAME bytes); @msg may be NULL for empty messages.
 * AEG_EINVAL for a message that breaks its limits.
 */
int proto_encode(uint16_t type, uint32_t flags, uint64_t id, const union proto_msg *msg,
		 unsigned char *frame, size_t *frame_len);

/*
 * proto_decode - the payload of a frame whose header @h was decoded:
 * exactly @h->length bytes at @payload, every field checked. AEG_EPROTO
 * (detail: which message, what is wrong).
 */
int proto_decode(const struct proto_header *h, const unsigned char *payload, union proto_msg *msg);

/*
 * proto_send - encode and send one frame on @fd, with @pass_fd (>= 0) as
 * SCM_RIGHTS. Never raises SIGPIPE. AEG_EIO when the peer is gone.
 */
int proto_send(int fd, uint16_t type, uint32_t flags, uint64_t id, const union proto_msg *msg,
	       int pass_fd, unsigned char *frame);

/*
 * proto_recv - receive one frame into @frame (PROTO_MAX_FRAME bytes) and
 * decode it into @h and @msg. Waits without limit for the first byte, then
 * at most proto_frame_timeout_ms for the rest (a stalled peer cannot hold
 * the reader). A descriptor passed along goes to @recv_fd when it is not
 * NULL (else, or with more than one, the frame is AEG_EPROTO); -1 when none.
 * Returns 0, AEG_ECANCELED on a clean end of stream before a frame,
 * AEG_EPROTO (bad or truncated frame), AEG_ETIMEDOUT, AEG_EIO.
 */
/* The limit proto_recv applies, PROTO_FRAME_TIMEOUT_MS unless a test lowers it. */
extern int proto_frame_timeout_ms;

int proto_recv(int fd, struct proto_header *h, union proto_msg *msg, int *recv_fd,
	       unsigned char *frame);

#endif

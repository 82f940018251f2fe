/* Shared by the protocol fuzz targets: decode one frame and check that it encodes back to its bytes. */
#ifndef AEGAEON_FUZZ_PROTO_H
#define AEGAEON_FUZZ_PROTO_H

#include <string.h>

#include "fuzz.h"
#include "proto.h"

static const int proto_errors[] = { AEG_EPROTO, 0 };

/*
 * Decode the payload of the frame at @frame (@h decoded from its first
 * bytes). The encoding is canonical (fixed-width fields, strings with their
 * length), so a message that decodes must encode to exactly the same bytes:
 * a field the decoder accepted but the encoder writes differently, or bytes
 * the decoder skipped, would show here.
 */
static inline int fuzz_proto_frame(const struct proto_header *h, const unsigned char *frame)
{
	static union proto_msg msg;
	static unsigned char again[PROTO_MAX_FRAME];
	size_t len = 0;
	int rc;

	aeg_error_clear();
	rc = proto_decode(h, frame + PROTO_HEADER_BYTES, &msg);
	if (rc < 0) {
		fuzz_check_error(rc, proto_errors);
		return rc;
	}
	FUZZ_CHECK(rc == 0, "proto_decode returned %d", rc);
	rc = proto_encode(h->type, h->flags, h->id, &msg, again, &len);
	FUZZ_CHECK(rc == 0, "a decoded %s %s does not encode: %s", proto_type_name(h->type),
		   h->flags & PROTO_F_REPLY ? "reply" : "request", aeg_error_detail());
	FUZZ_CHECK(len == PROTO_HEADER_BYTES + (size_t)h->length, "%s of %u payload bytes encodes to %zu",
		   proto_type_name(h->type), h->length, len - PROTO_HEADER_BYTES);
	FUZZ_CHECK(memcmp(again, frame, len) == 0, "%s %s encodes to other bytes than it decoded from",
		   proto_type_name(h->type), h->flags & PROTO_F_REPLY ? "reply" : "request");
	return 0;
}

#endif

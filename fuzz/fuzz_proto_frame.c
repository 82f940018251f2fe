/* libFuzzer target: agent protocol frames as a socket carries them (headers, lengths, payloads, back to back). */
#include <stdint.h>
#include <string.h>

#include "fuzz_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * The input is a byte stream from a peer, either side: frames are read one
 * after another as proto_recv does, until one is bad (the connection ends
 * there) or the bytes run out (a truncated frame waits for more).
 */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static unsigned char frame[PROTO_MAX_FRAME];
	size_t pos = 0;

	while (size - pos >= PROTO_HEADER_BYTES) {
		struct proto_header h;
		int rc;

		memcpy(frame, data + pos, PROTO_HEADER_BYTES);
		aeg_error_clear();
		rc = proto_header_decode(frame, &h);
		if (rc < 0) {
			fuzz_check_error(rc, proto_errors);
			break;
		}
		FUZZ_CHECK(h.length <= PROTO_MAX_PAYLOAD && h.type > 0 && h.type < PROTO_TYPE_END &&
			   !(h.flags & ~PROTO_F_KNOWN), "header accepted: type %u flags 0x%x length %u",
			   h.type, h.flags, h.length);
		if (h.length > size - pos - PROTO_HEADER_BYTES)
			break;
		memcpy(frame + PROTO_HEADER_BYTES, data + pos + PROTO_HEADER_BYTES, h.length);
		if (fuzz_proto_frame(&h, frame) < 0)
			break;
		pos += PROTO_HEADER_BYTES + h.length;
	}
	return 0;
}

/* libFuzzer target: agent protocol message bodies of every type, requests and replies. */
#include <stdint.h>
#include <string.h>

#include "fuzz_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * The input is a message type byte, a byte whose low bit makes it a reply,
 * then the payload; the header is made to fit, so every mutation lands in a
 * payload decoder rather than in the header checks.
 */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static unsigned char frame[PROTO_MAX_FRAME];
	struct proto_header h = { .magic = PROTO_MAGIC };

	if (size < 2 || size - 2 > PROTO_MAX_PAYLOAD)
		return -1;
	h.type = (uint16_t)(data[0] % PROTO_TYPE_END);
	h.flags = data[1] & PROTO_F_REPLY;
	if (h.type == 0 || (h.type == PROTO_ERROR && !(h.flags & PROTO_F_REPLY)))
		return -1;      /* the header decoder refuses these */
	h.version = h.type == PROTO_HELLO ? 1 : PROTO_VERSION;
	h.length = (uint32_t)(size - 2);
	h.id = size;
	proto_header_encode(&h, frame);
	memcpy(frame + PROTO_HEADER_BYTES, data + 2, size - 2);
	fuzz_proto_frame(&h, frame);
	return 0;
}

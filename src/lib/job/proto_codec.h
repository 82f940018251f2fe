/*
 * The agent protocol's byte codec, shared by the files that encode its
 * messages (proto.c, proto_status.c): an explicit little-endian writer that
 * stops at its capacity and a reader that stops at its end, both marking
 * it, so a message's coder checks once at the end, never per field.
 */
#ifndef AEGAEON_PROTO_CODEC_H
#define AEGAEON_PROTO_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "proto.h"

/* ---------------------------------------------------------------- writer */

struct wr {
	unsigned char *p;
	size_t cap, len;
	int over;
};

static inline void put(struct wr *w, const void *src, size_t n)
{
	if (w->over || n > w->cap - w->len) {
		w->over = 1;
		return;
	}
	memcpy(w->p + w->len, src, n);
	w->len += n;
}

static inline void put_u8(struct wr *w, uint8_t v)
{
	put(w, &v, 1);
}

static inline void put_u16(struct wr *w, uint16_t v)
{
	unsigned char b[2] = { (unsigned char)v, (unsigned char)(v >> 8) };
	put(w, b, 2);
}

static inline void put_u32(struct wr *w, uint32_t v)
{
	unsigned char b[4];
	for (int i = 0; i < 4; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	put(w, b, 4);
}

static inline void put_u64(struct wr *w, uint64_t v)
{
	unsigned char b[8];
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	put(w, b, 8);
}

/* A string is a u16 length and its bytes, no NUL; @cap counts the NUL. */
static inline void put_str(struct wr *w, const char *s, size_t cap)
{
	size_t n = strnlen(s, cap);

	if (n >= cap) {
		w->over = 1;
		return;
	}
	put_u16(w, (uint16_t)n);
	put(w, s, n);
}

/* ---------------------------------------------------------------- reader */

struct rd {
	const unsigned char *p;
	size_t len, pos;
	int short_read;
};

static inline int get(struct rd *r, void *dst, size_t n)
{
	if (r->short_read || n > r->len - r->pos) {
		r->short_read = 1;
		memset(dst, 0, n);
		return -1;
	}
	memcpy(dst, r->p + r->pos, n);
	r->pos += n;
	return 0;
}

static inline uint8_t get_u8(struct rd *r)
{
	uint8_t v;
	get(r, &v, 1);
	return v;
}

static inline uint16_t get_u16(struct rd *r)
{
	unsigned char b[2];
	get(r, b, 2);
	return (uint16_t)(b[0] | b[1] << 8);
}

static inline uint32_t get_u32(struct rd *r)
{
	unsigned char b[4];
	uint32_t v = 0;
	get(r, b, 4);
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)b[i] << (8 * i);
	return v;
}

static inline uint64_t get_u64(struct rd *r)
{
	unsigned char b[8];
	uint64_t v = 0;
	get(r, b, 8);
	for (int i = 0; i < 8; i++)
		v |= (uint64_t)b[i] << (8 * i);
	return v;
}

/* Returns -1 (and sets short_read or *too_long) for a string that does not fit or holds a NUL. */
static inline int get_str(struct rd *r, char *dst, size_t cap, const char *what, int *err)
{
	uint16_t n = get_u16(r);

	dst[0] = '\0';
	if (r->short_read)
		return -1;
	if (n >= cap) {
		*err = aeg_fail(AEG_EPROTO, "%s of %u bytes, at most %zu", what, n, cap - 1);
		return -1;
	}
	if (get(r, dst, n))
		return -1;
	dst[n] = '\0';
	if (strlen(dst) != n) {
		*err = aeg_fail(AEG_EPROTO, "%s holds a NUL byte", what);
		return -1;
	}
	return 0;
}

static inline int check_slab_index(uint32_t slab, const char *what)
{
	if (slab >= AEG_JOB_MAX_GPUS)
		return aeg_fail(AEG_EPROTO, "%s: slab index %u, at most %d", what, slab, AEG_JOB_MAX_GPUS - 1);
	return 0;
}

/* The status request and reply (proto_status.c), for proto.c's table of codecs. */
void enc_status_req(struct wr *w, const union proto_msg *m);
int dec_status_req(struct rd *r, union proto_msg *m);
void enc_status_rep(struct wr *w, const union proto_msg *m);
int dec_status_rep(struct rd *r, union proto_msg *m);

#endif

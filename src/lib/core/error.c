/*
 * Error codes, their names and messages, and the per-thread detail. Nothing
 * here logs: aeg_fail, which sets the detail and logs it, is in log.c.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static __thread char detail[1024];

/*
 * A detail too long for the buffer keeps its start and its last
 * DETAIL_TAIL bytes, with "..." between: a message that starts with a long
 * path loses the middle of the path, not the reason that ends it.
 */
#define DETAIL_TAIL 384

static const struct {
	int code;
	const char *name;
	const char *msg;
} table[] = {
	{ AEG_OK, "AEG_OK", "success" },
	{ AEG_EINVAL, "AEG_EINVAL", "invalid argument" },
	{ AEG_ENOMEM, "AEG_ENOMEM", "out of host memory" },
	{ AEG_ENOSPC, "AEG_ENOSPC", "no space left in slab, pool or cache" },
	{ AEG_ETIMEDOUT, "AEG_ETIMEDOUT", "timed out" },
	{ AEG_ENOENT, "AEG_ENOENT", "not found" },
	{ AEG_EACCES, "AEG_EACCES", "permission denied" },
	{ AEG_EPERM, "AEG_EPERM", "operation not permitted" },
	{ AEG_EBUSY, "AEG_EBUSY", "busy or not yet complete" },
	{ AEG_ERANGE, "AEG_ERANGE", "value out of range" },
	{ AEG_ECANCELED, "AEG_ECANCELED", "canceled" },
	{ AEG_ENODEV, "AEG_ENODEV", "no such GPU" },
	{ AEG_ENOTSUP, "AEG_ENOTSUP", "not supported" },
	{ AEG_EIO, "AEG_EIO", "input/output error" },
	{ AEG_EEXIST, "AEG_EEXIST", "already exists" },
	{ AEG_EBADF, "AEG_EBADF", "bad handle or descriptor" },
	{ AEG_ESTALE, "AEG_ESTALE", "file changed while being read" },
	{ AEG_EDEVICE, "AEG_EDEVICE", "device backend error" },
	{ AEG_ECONFIG, "AEG_ECONFIG", "configuration error" },
	{ AEG_EPROTO, "AEG_EPROTO", "protocol error" },
	{ AEG_EFORMAT, "AEG_EFORMAT", "malformed file format" },
};

AEG_EXPORT const char *aeg_strerror(int err)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(table); i++)
		if (table[i].code == err)
			return table[i].msg;
	return "unknown error";
}

AEG_EXPORT const char *aeg_errname(int err)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(table); i++)
		if (table[i].code == err)
			return table[i].name;
	return "AEG_EUNKNOWN";
}

AEG_EXPORT const char *aeg_error_detail(void)
{
	return detail;
}

AEG_EXPORT void aeg_error_clear(void)
{
	detail[0] = '\0';
}

AEG_EXPORT void aeg_scrub(char *text)
{
	for (unsigned char *p = (unsigned char *)text; *p != '\0'; p++) {
		if (*p < 0x20 || *p == 0x7f) {
			*p = '?';
		} else if (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) {
			/* A C1 control (U+0080..U+009F, CSI among them) written as UTF-8. */
			p[0] = '?';
			p[1] = '?';
			p++;
		}
	}
}

/* @text (@n bytes) as the detail, its middle cut when it does not fit. */
static void set_cut(const char *text, size_t n)
{
	size_t head = sizeof(detail) - 1 - 3 - DETAIL_TAIL;

	if (n < sizeof(detail)) {
		memcpy(detail, text, n + 1);
		return;
	}
	memcpy(detail, text, head);
	memcpy(detail + head, "...", 3);
	memcpy(detail + head + 3, text + n - DETAIL_TAIL, DETAIL_TAIL + 1);
}

void aeg_error_vset(const char *fmt, va_list ap)
{
	va_list again;
	char *whole;
	int n;

	va_copy(again, ap);
	n = vsnprintf(detail, sizeof(detail), fmt, ap);
	/* Without memory for the whole text, the start is kept as vsnprintf left it. */
	if (n >= (int)sizeof(detail) && (whole = malloc((size_t)n + 1)) != NULL) {
		vsnprintf(whole, (size_t)n + 1, fmt, again);
		set_cut(whole, (size_t)n);
		free(whole);
	}
	va_end(again);
	aeg_scrub(detail);
}

void aeg_error_prefix(const char *fmt, ...)
{
	char prefix[512], whole[sizeof(prefix) + 2 + sizeof(detail)];
	va_list ap;
	int n;

	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	n = snprintf(whole, sizeof(whole), "%s: %s", prefix, detail);
	set_cut(whole, (size_t)n < sizeof(whole) ? (size_t)n : sizeof(whole) - 1);
	aeg_scrub(detail);
}

AEG_EXPORT const char *aeg_quote(const char *text, char *buf, size_t len)
{
	size_t o = 0;
	const char *p;

	for (p = text; *p != '\0' && o + 4 < len; p++)
		buf[o++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
	if (*p != '\0') {
		buf[o++] = '.';
		buf[o++] = '.';
		buf[o++] = '.';
	}
	buf[o] = '\0';
	return buf;
}

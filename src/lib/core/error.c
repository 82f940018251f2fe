/*
 * Error codes, their names and messages, and the per-thread detail. Nothing
 * here logs: aeg_fail, which sets the detail and logs it, is in log.c.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static __thread char detail[1024];

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

void aeg_error_vset(const char *fmt, va_list ap)
{
	vsnprintf(detail, sizeof(detail), fmt, ap);
}

void aeg_error_prefix(const char *fmt, ...)
{
	char prefix[512], old[sizeof(detail)];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	memcpy(old, detail, sizeof(old));
	snprintf(detail, sizeof(detail), "%s: %s", prefix, old);
}

const char *aeg_quote(const char *text, char *buf, size_t len)
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

/* aegaeon error model: functions return 0 or a negative AEG_E* code. */
#ifndef AEGAEON_ERROR_H
#define AEGAEON_ERROR_H

#include <errno.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Codes are negated errno values where one fits, so callers may compare them
 * with -errno; the rest are project codes below -4000.
 */
#define AEG_OK          0
#define AEG_EINVAL      (-EINVAL)     /* bad argument or input text */
#define AEG_ENOMEM      (-ENOMEM)     /* host memory exhausted */
#define AEG_ENOSPC      (-ENOSPC)     /* slab, pool or cache full */
#define AEG_ETIMEDOUT   (-ETIMEDOUT)  /* a bounded wait ran out */
#define AEG_ENOENT      (-ENOENT)     /* file, block id or handle not found */
#define AEG_EACCES      (-EACCES)     /* permission denied */
#define AEG_EPERM       (-EPERM)      /* operation not permitted for this caller */
#define AEG_EBUSY       (-EBUSY)      /* resource in use, or event not yet complete */
#define AEG_ERANGE      (-ERANGE)     /* value out of range (overflow, over a cap) */
#define AEG_ECANCELED   (-ECANCELED)  /* the operation was cancelled */
#define AEG_ENODEV      (-ENODEV)     /* no such GPU */
#define AEG_ENOTSUP     (-ENOTSUP)    /* not supported by this backend or build */
#define AEG_EIO         (-EIO)        /* read or write failed */
#define AEG_EEXIST      (-EEXIST)     /* already exists */
#define AEG_EBADF       (-EBADF)      /* bad handle or descriptor */
#define AEG_ESTALE      (-ESTALE)     /* a file changed while it was being read */
#define AEG_EDEVICE     (-4001)       /* a device backend (CUDA) call failed */
#define AEG_ECONFIG     (-4002)       /* configuration file error */
#define AEG_EPROTO      (-4003)       /* malformed or unexpected protocol message */
#define AEG_EFORMAT     (-4004)       /* malformed file format (safetensors header) */

/*
 * aeg_strerror - a short, static description of an error code.
 * Never returns NULL; unknown codes give "unknown error". Thread-safe.
 */
const char *aeg_strerror(int err);

/*
 * aeg_errname - the symbolic name of an error code ("AEG_EINVAL"). Thread-safe.
 */
const char *aeg_errname(int err);

/*
 * aeg_error_detail - the human message of the last error this thread got from
 * the library: what failed, which value, which limit. Empty string when none.
 * The pointer stays valid until this thread's next library call.
 */
const char *aeg_error_detail(void);

/* aeg_error_clear - forget this thread's last error detail. */
void aeg_error_clear(void);

/*
 * aeg_quote - @text as it may go into a message shown on a terminal or in a
 * log: control and non-ASCII bytes as '?', cut with "..." to fit @len bytes
 * (at least 5). Returns @buf. For text from outside the program: the
 * environment, options, and files such as a model's tensor names, which
 * the library's own messages show only this way.
 */
const char *aeg_quote(const char *text, char *buf, size_t len);

/*
 * aeg_scrub - each control character of @text made '?', in place: ASCII's,
 * DEL, and C1 controls written as UTF-8 (each byte); other bytes stay, so
 * UTF-8 text is kept. Every error detail and log
 * line of the library goes through it, whatever its parts, so a path or a
 * peer's text cannot move a terminal's cursor or forge a log line; tools
 * print paths the same way.
 */
void aeg_scrub(char *text);

#ifdef __cplusplus
}
#endif
#endif

/* Helpers shared by the library's files; never installed. */
#ifndef AEGAEON_INTERNAL_H
#define AEGAEON_INTERNAL_H

#include <stdint.h>
#include <time.h>

#include <aegaeon/error.h>
#include <aegaeon/log.h>

#define AEG_EXPORT __attribute__((visibility("default")))
#define AEG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/*
 * aeg_fail - set this thread's error detail (printf format) and return @err,
 * so error paths read `return aeg_fail(AEG_EINVAL, "chunk size 0");`.
 */
int aeg_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* aeg_fail_keep - return @err, keeping the detail a callee already set. */
static inline int aeg_fail_keep(int err) { return err; }

/* Prefix this thread's detail with more context: "opening X: <old detail>". */
void aeg_error_prefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define aeg_debug(...) aeg_log(AEG_LOG_DEBUG, __VA_ARGS__)
#define aeg_info(...)  aeg_log(AEG_LOG_INFO, __VA_ARGS__)
#define aeg_warn(...)  aeg_log(AEG_LOG_WARN, __VA_ARGS__)
#define aeg_error(...) aeg_log(AEG_LOG_ERROR, __VA_ARGS__)

static inline uint64_t aeg_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t aeg_round_up(uint64_t v, uint64_t align)
{
	return (v + align - 1) / align * align;
}

/*
 * Timing spans of set-up steps (device open, slab, engine, agent round
 * trips): aeg_span_end logs "span NAME: X ms" at debug level and keeps the
 * span for aeg_spans_take, which copies them out oldest first and forgets
 * them (--timing, the Python module's timings()). At most AEG_SPANS_MAX are
 * kept between takes; @lost gets how many more came or did not fit in @max.
 * Thread-safe.
 */
#define AEG_SPANS_MAX 256
struct aeg_span {
	char name[48];
	uint64_t start_ns;              /* CLOCK_MONOTONIC */
	uint64_t ns;
};
void aeg_span_end(const char *name, uint64_t start_ns);
int aeg_spans_take(struct aeg_span *out, int max, int *lost);

#endif

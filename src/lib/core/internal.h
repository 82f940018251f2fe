/* Helpers shared by the library's files; never installed. */
#ifndef AEGAEON_INTERNAL_H
#define AEGAEON_INTERNAL_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <aegaeon/error.h>
#include <aegaeon/log.h>

#define AEG_EXPORT __attribute__((visibility("default")))
#define AEG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/*
 * aeg_fail - set this thread's error detail (printf format), log it at debug
 * level and return @err, so error paths read
 * `return aeg_fail(AEG_EINVAL, "chunk size 0");`. In log.c, so that error.c,
 * below the log, calls nothing of it.
 */
int aeg_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* aeg_error_vset - set this thread's detail alone (error.c): aeg_fail's first half. */
void aeg_error_vset(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));

/* aeg_fail_keep - return @err, keeping the detail a callee already set. */
static inline int aeg_fail_keep(int err) { return err; }

/*
 * The size of a buffer that aeg_quote (aegaeon/error.h) fills with a name
 * from a model file (a tensor, a shard, a header key) for a message: 128
 * characters shown. A downloaded model's bytes never reach a terminal or a
 * log unquoted.
 */
enum { AEG_NAME_SHOWN = 132 };

/* Prefix this thread's detail with more context: "opening X: <old detail>". */
void aeg_error_prefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * aeg_log_level_from_env - 1 when $AEGAEON_LOG set the level (a valid
 * value), so a program's own default (aegaeond's log_level) gives way to it.
 */
int aeg_log_level_from_env(void);

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

/*
 * aeg_futex_wait - sleep while *@word is @val, at most @timeout_ns (0: no
 * limit), or until woken; returns early on a signal or a changed word.
 * aeg_futex_wake - wake every sleeper on @word. Not FUTEX_PRIVATE_FLAG: the
 * words live in pages other processes map.
 */
static inline void aeg_futex_wait(uint32_t *word, uint32_t val, uint64_t timeout_ns)
{
	struct timespec ts = { (time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull) };

	syscall(SYS_futex, word, FUTEX_WAIT, val, timeout_ns ? &ts : NULL, NULL, 0);
}

static inline void aeg_futex_wake(uint32_t *word)
{
	syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/*
 * aeg_cond_init_monotonic - a condition variable whose timed waits run on
 * CLOCK_MONOTONIC, so a step of the wall clock neither stretches nor cuts
 * them. Every timed wait of the library is on one of these.
 */
static inline void aeg_cond_init_monotonic(pthread_cond_t *cond)
{
	pthread_condattr_t ca;

	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(cond, &ca);
	pthread_condattr_destroy(&ca);
}

/* aeg_timespec_of_ns - @ns (CLOCK_MONOTONIC nanoseconds, aeg_now_ns) as a deadline for pthread_cond_timedwait. */
static inline struct timespec aeg_timespec_of_ns(uint64_t ns)
{
	return (struct timespec){ .tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull) };
}

/* aeg_deadline_after - *@ts = @timeout_ms from now, for a wait on an aeg_cond_init_monotonic condition. */
static inline void aeg_deadline_after(struct timespec *ts, int timeout_ms)
{
	*ts = aeg_timespec_of_ns(aeg_now_ns() + (uint64_t)timeout_ms * 1000000ull);
}

static inline uint64_t aeg_round_up(uint64_t v, uint64_t align)
{
	return (v + align - 1) / align * align;
}

/*
 * aeg_pread_full - read @fd from @off into @buf until @need bytes are there
 * or the file ends, each read asking for what is left of @room (>= @need:
 * O_DIRECT reads whole blocks, so its callers round @need up). Returns the
 * bytes read, fewer than @need only where the file ended, or -errno.
 */
static inline ssize_t aeg_pread_full(int fd, void *buf, size_t need, size_t room, uint64_t off)
{
	size_t done = 0;

	while (done < need) {
		ssize_t r = pread(fd, (char *)buf + done, room - done, (off_t)(off + done));

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			break;
		done += (size_t)r;
	}
	return (ssize_t)done;
}

/*
 * Timing spans of set-up steps (device open, slab, engine, agent round
 * trips): aeg_span_end logs "span NAME: X ms" at debug level and keeps the
 * span for aeg_spans_take, which copies them out oldest first and forgets
 * them (--timing, the Python module's timings()). At most AEG_SPANS_MAX are
 * kept between takes; @lost gets how many more came or did not fit in @max.
 * aeg_span_add keeps one that ended earlier (a load's, from its start to
 * its last byte on the GPU). Thread-safe.
 */
#define AEG_SPANS_MAX 256
struct aeg_span {
	char name[48];
	uint64_t start_ns;              /* CLOCK_MONOTONIC */
	uint64_t ns;
};
void aeg_span_end(const char *name, uint64_t start_ns);
void aeg_span_add(const char *name, uint64_t start_ns, uint64_t end_ns);
int aeg_spans_take(struct aeg_span *out, int max, int *lost);

/*
 * Loads in flight in this process: prefetch engines count theirs (begin
 * when a load is published, end when it finishes). A pinned pool being made
 * registers its buffers beside its population only while none runs: every
 * registration holds the driver up, and a job-start load registering the
 * pieces of its file waited behind a 24 GiB pool's 384 registrations (2.7
 * against 19.5 GB/s on the H200); with a load running, the pool registers
 * once its pages are all in, as before.
 */
void aeg_loads_begin(void);
void aeg_loads_end(void);
int aeg_loads_active(void);

#endif

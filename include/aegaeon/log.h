/* aegaeon logging: levels, stderr or syslog. */
#ifndef AEGAEON_LOG_H
#define AEGAEON_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

enum aeg_log_level {
	AEG_LOG_DEBUG = 0,
	AEG_LOG_INFO = 1,
	AEG_LOG_WARN = 2,
	AEG_LOG_ERROR = 3,
};

/*
 * aeg_log_parse_level - "debug", "info", "warn" (or "warning"), "error".
 * Returns 0, or AEG_EINVAL with a detail naming the bad text.
 */
int aeg_log_parse_level(const char *text, enum aeg_log_level *level);

/*
 * aeg_log_set_level - messages below @level are dropped. The initial level
 * comes from AEGAEON_LOG (default warn); an invalid AEGAEON_LOG is reported
 * once on stderr (the value with control bytes as '?') and ignored.
 */
void aeg_log_set_level(enum aeg_log_level level);
enum aeg_log_level aeg_log_get_level(void);

/*
 * aeg_log_to_syslog - send messages to syslog(3) under @ident (daemon
 * facility) instead of stderr; NULL goes back to stderr.
 */
void aeg_log_to_syslog(const char *ident);

/* aeg_log - log one message (a newline is added). Thread-safe. */
void aeg_log(enum aeg_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#ifdef __cplusplus
}
#endif
#endif

/* Leveled logging to stderr or syslog; the level starts from $AEGAEON_LOG. */
#include "config.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "internal.h"

static pthread_once_t once = PTHREAD_ONCE_INIT;
static enum aeg_log_level current = AEG_LOG_WARN;
static int use_syslog;

static const char *const names[] = { "debug", "info", "warn", "error" };

AEG_EXPORT int aeg_log_parse_level(const char *text, enum aeg_log_level *level)
{
	if (text == NULL || level == NULL)
		return aeg_fail(AEG_EINVAL, "log level missing");
	for (size_t i = 0; i < AEG_ARRAY_SIZE(names); i++) {
		if (strcasecmp(text, names[i]) == 0) {
			*level = (enum aeg_log_level)i;
			return 0;
		}
	}
	if (strcasecmp(text, "warning") == 0) {
		*level = AEG_LOG_WARN;
		return 0;
	}
	return aeg_fail(AEG_EINVAL, "log level '%s' is not one of debug, info, warn, error", text);
}

static void init_from_env(void)
{
	const char *env = getenv("AEGAEON_LOG");
	enum aeg_log_level level;

	if (env == NULL || *env == '\0')
		return;
	if (aeg_log_parse_level(env, &level) == 0)
		current = level;
	else
		fprintf(stderr, "aegaeon: warning: AEGAEON_LOG=%s is not one of debug, info, warn, error; using warn\n", env);
}

AEG_EXPORT void aeg_log_set_level(enum aeg_log_level level)
{
	pthread_once(&once, init_from_env);
	if (level >= AEG_LOG_DEBUG && level <= AEG_LOG_ERROR)
		current = level;
}

AEG_EXPORT enum aeg_log_level aeg_log_get_level(void)
{
	pthread_once(&once, init_from_env);
	return current;
}

AEG_EXPORT void aeg_log_to_syslog(const char *ident)
{
	if (ident != NULL) {
		openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
		use_syslog = 1;
	} else if (use_syslog) {
		closelog();
		use_syslog = 0;
	}
}

AEG_EXPORT void aeg_log(enum aeg_log_level level, const char *fmt, ...)
{
	static const int prio[] = { LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR };
	char msg[2048];
	va_list ap;

	pthread_once(&once, init_from_env);
	if (level < current || level > AEG_LOG_ERROR)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (use_syslog)
		syslog(prio[level], "%s", msg);
	else
		fprintf(stderr, "aegaeon: %s: %s\n", names[level], msg);
}

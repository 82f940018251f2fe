/*
 * Leveled logging to stderr or syslog; the level starts from $AEGAEON_LOG.
 * aeg_fail is here too: it sets the error detail (error.c) and logs it.
 */
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
static int from_env;            /* the level came from a valid $AEGAEON_LOG */

static const char *const names[] = { "debug", "info", "warn", "error" };

/* The level @text names, or -1. Sets no error detail: the log's own set-up uses it. */
static int level_named(const char *text)
{
	for (size_t i = 0; i < AEG_ARRAY_SIZE(names); i++)
		if (strcasecmp(text, names[i]) == 0)
			return (int)i;
	if (strcasecmp(text, "warning") == 0)
		return AEG_LOG_WARN;
	return -1;
}

AEG_EXPORT int aeg_log_parse_level(const char *text, enum aeg_log_level *level)
{
	char q[80];
	int l;

	if (text == NULL || level == NULL)
		return aeg_fail(AEG_EINVAL, "log level missing");
	l = level_named(text);
	if (l < 0)
		return aeg_fail(AEG_EINVAL, "log level '%s' is not one of debug, info, warn, error",
				aeg_quote(text, q, sizeof(q)));
	*level = (enum aeg_log_level)l;
	return 0;
}

/*
 * Runs once, inside the first call that logs or asks for the level, so
 * nothing here may log, or fail through aeg_fail (which logs): that call
 * would wait for this one to finish, for ever. A bad value is said here,
 * once, on stderr.
 */
static void init_from_env(void)
{
	const char *env = getenv("AEGAEON_LOG");
	char q[80];
	int l;

	if (env == NULL || *env == '\0')
		return;
	l = level_named(env);
	if (l >= 0) {
		current = (enum aeg_log_level)l;
		from_env = 1;
		return;
	}
	fprintf(stderr, "aegaeon: warn: AEGAEON_LOG='%s' is not one of debug, info, warn, error; using %s\n",
		aeg_quote(env, q, sizeof(q)), names[current]);
}

int aeg_log_level_from_env(void)
{
	pthread_once(&once, init_from_env);
	return from_env;
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
	aeg_scrub(msg);
	if (use_syslog)
		syslog(prio[level], "%s", msg);
	else
		fprintf(stderr, "aegaeon: %s: %s\n", names[level], msg);
}

int aeg_fail(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	aeg_error_vset(fmt, ap);
	va_end(ap);
	aeg_log(AEG_LOG_DEBUG, "%s: %s", aeg_errname(err), aeg_error_detail());
	return err;
}

/* Error codes, names and the per-thread detail; log level parsing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <cmocka.h>

#include <aegaeon/aegaeon.h>

#include "internal.h"

static void codes_have_names_and_messages(void **state)
{
	const int codes[] = { AEG_EINVAL, AEG_ENOMEM, AEG_ENOSPC, AEG_ETIMEDOUT, AEG_ENOENT,
			      AEG_EDEVICE, AEG_ECONFIG, AEG_EPROTO, AEG_EFORMAT, AEG_ESTALE };
	for (size_t i = 0; i < AEG_ARRAY_SIZE(codes); i++) {
		assert_string_not_equal(aeg_strerror(codes[i]), "unknown error");
		assert_string_not_equal(aeg_errname(codes[i]), "AEG_EUNKNOWN");
	}
	assert_string_equal(aeg_errname(AEG_EINVAL), "AEG_EINVAL");
	assert_string_equal(aeg_strerror(12345), "unknown error");
}

static void detail_is_kept_and_prefixed(void **state)
{
	assert_int_equal(aeg_fail(AEG_ERANGE, "value %d over cap %d", 9, 4), AEG_ERANGE);
	assert_string_equal(aeg_error_detail(), "value 9 over cap 4");
	aeg_error_prefix("slab %s", "gpu0");
	assert_string_equal(aeg_error_detail(), "slab gpu0: value 9 over cap 4");
	aeg_error_clear();
	assert_string_equal(aeg_error_detail(), "");
}

/* Whatever a detail is made of, no control byte reaches it: each shows as '?'. */
static void detail_has_no_control_bytes(void **state)
{
	aeg_fail(AEG_ENOENT, "%s: %s", "/models/x\033[2J\n\r\t\177.safetensors", "No such file");
	assert_string_equal(aeg_error_detail(), "/models/x?[2J????.safetensors: No such file");
	aeg_error_prefix("loading %s", "a\033]0;title\007");
	assert_string_equal(aeg_error_detail(), "loading a?]0;title?: /models/x?[2J????.safetensors: No such file");
	/* UTF-8 stays, but for C1 controls (U+009B is CSI): each of their two bytes is '?'. */
	aeg_fail(AEG_ENOENT, "%s", "/modèles/\xc2\x9b" "2J/\xc2\x80\xc2\x9f\xc2\xa0");
	assert_string_equal(aeg_error_detail(), "/modèles/??2J/????\xc2\xa0");
	aeg_error_clear();
}

/* A detail too long to keep whole loses the middle of its path, never the reason at its end. */
static void long_detail_keeps_its_reason(void **state)
{
	char path[3000];
	const char *d;
	size_t n;

	memset(path, 'a', sizeof(path) - 1);
	path[0] = '/';
	path[sizeof(path) - 1] = '\0';
	aeg_fail(AEG_EINVAL, "%s: %s", path, "File name too long");
	d = aeg_error_detail();
	n = strlen(d);
	assert_true(n < 1024);
	assert_int_equal(strncmp(d, path, 256), 0);
	assert_non_null(strstr(d, "aaa...aaa"));
	assert_string_equal(d + n - 20, ": File name too long");
	aeg_fail(AEG_EINVAL, "denied");
	aeg_error_prefix("%s", path);
	d = aeg_error_detail();
	n = strlen(d);
	assert_true(n < 1024);
	assert_string_equal(d + n - 8, ": denied");
	aeg_error_clear();
}

static void *other_thread(void *arg)
{
	aeg_fail(AEG_EIO, "other thread");
	return (void *)(strcmp(aeg_error_detail(), "other thread") == 0 ? arg : NULL);
}

static void detail_is_per_thread(void **state)
{
	pthread_t t;
	void *ret;

	aeg_fail(AEG_EINVAL, "main thread");
	assert_int_equal(pthread_create(&t, NULL, other_thread, state), 0);
	assert_int_equal(pthread_join(t, &ret), 0);
	assert_ptr_equal(ret, state);
	assert_string_equal(aeg_error_detail(), "main thread");
}

static void log_levels_parse(void **state)
{
	enum aeg_log_level l;

	assert_int_equal(aeg_log_parse_level("debug", &l), 0);
	assert_int_equal(l, AEG_LOG_DEBUG);
	assert_int_equal(aeg_log_parse_level("WARNING", &l), 0);
	assert_int_equal(l, AEG_LOG_WARN);
	assert_int_equal(aeg_log_parse_level("error", &l), 0);
	assert_int_equal(l, AEG_LOG_ERROR);
	assert_int_equal(aeg_log_parse_level("loud", &l), AEG_EINVAL);
	assert_non_null(strstr(aeg_error_detail(), "'loud'"));
	aeg_log_set_level(AEG_LOG_ERROR);
	assert_int_equal(aeg_log_get_level(), AEG_LOG_ERROR);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(codes_have_names_and_messages),
		cmocka_unit_test(detail_is_kept_and_prefixed),
		cmocka_unit_test(detail_has_no_control_bytes),
		cmocka_unit_test(long_detail_keeps_its_reason),
		cmocka_unit_test(detail_is_per_thread),
		cmocka_unit_test(log_levels_parse),
	};
	return cmocka_run_group_tests_name("error", tests, NULL, NULL);
}

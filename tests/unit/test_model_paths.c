/* What files a model is (aeg_model_paths): shard indexes row by row, directories, one file, and the errors. */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "internal.h"
#include "model_paths.h"
#include "testutil.h"

/*
 * T/outside.safetensors          what a shard name leaving the model's directory would find
 * T/m/                           the model: shards, a directory and a FIFO named like shards
 * T/plain/                       shards and no index: y, z, a hidden one, a text file
 * T/single/                      model.safetensors beside another shard
 * T/empty/                       no model
 */
static char T[64];

static void path_of(char *buf, size_t len, const char *rel)
{
	if (snprintf(buf, len, "%s/%s", T, rel) >= (int)len)
		fail_msg("path %s/%s too long", T, rel);
}

static void touch(const char *rel)
{
	char p[PATH_MAX];

	path_of(p, sizeof(p), rel);
	test_write_file(p, "", 0);
}

static void make_dir(const char *rel)
{
	char p[PATH_MAX];

	path_of(p, sizeof(p), rel);
	if (mkdir(p, 0700) != 0)
		fail_msg("mkdir %s: %s", p, strerror(errno));
}

static int setup(void **state)
{
	static const char *const dirs[] = { "m", "m/sub", "m/d.safetensors", "plain", "single", "empty" };
	static const char *const files[] = {
		"outside.safetensors", "m/a.safetensors", "m/model-00001-of-00002.safetensors",
		"m/model-00002-of-00002.safetensors", "m/sub/b.safetensors", "plain/z.safetensors",
		"plain/y.safetensors", "plain/.hidden.safetensors", "plain/notes.txt", "single/model.safetensors",
		"single/other.safetensors",
	};
	char p[PATH_MAX];

	snprintf(T, sizeof(T), "/tmp/aeg-model-paths.XXXXXX");
	if (mkdtemp(T) == NULL)
		return -1;
	for (size_t i = 0; i < AEG_ARRAY_SIZE(dirs); i++)
		make_dir(dirs[i]);
	for (size_t i = 0; i < AEG_ARRAY_SIZE(files); i++)
		touch(files[i]);
	path_of(p, sizeof(p), "m/f.safetensors");
	return mkfifo(p, 0600);
}

static int teardown(void **state)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", T);
	return system(cmd) == 0 ? 0 : -1;
}

static void write_text(const char *rel, const char *text)
{
	char p[PATH_MAX];

	path_of(p, sizeof(p), rel);
	test_write_file(p, text, strlen(text));
}

/* A failure leaves nothing and says what is wrong, in printable characters. */
static void assert_failed(int rc, const struct aeg_model_paths *mf, int want, const char *detail, const char *what)
{
	const char *d = aeg_error_detail();

	if (rc != want || strstr(d, detail) == NULL)
		fail_msg("%s: got %s \"%s\", want %s \"%s\"", what, aeg_errname(rc), d, aeg_errname(want), detail);
	for (const unsigned char *p = (const unsigned char *)d; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			fail_msg("%s: control byte 0x%02x in \"%s\"", what, *p, d);
	assert_int_equal(mf->count, 0);
	assert_null(mf->paths);
	assert_int_equal(mf->dir, 0);
	assert_int_equal(mf->index, 0);
}

/* @mf's files are exactly @want (names under @dir of T, NULL-terminated), in that order. */
static void assert_files(const struct aeg_model_paths *mf, const char *dir, const char *const *want, const char *what)
{
	char p[PATH_MAX], rel[PATH_MAX];
	uint32_t n = 0;

	while (want[n] != NULL)
		n++;
	if (mf->count != n)
		fail_msg("%s: %u files, want %u (the first: %s)", what, mf->count, n,
			 mf->count ? mf->paths[0] : "none");
	for (uint32_t i = 0; i < n; i++) {
		snprintf(rel, sizeof(rel), "%s/%s", dir, want[i]);
		path_of(p, sizeof(p), rel);
		if (strcmp(mf->paths[i], p) != 0)
			fail_msg("%s: file %u is %s, want %s", what, i, mf->paths[i], p);
	}
}

#define FILES(...) ((const char *const[]){ __VA_ARGS__, NULL })

static const struct index_row {
	const char *what, *json;
	int rc;
	const char *const *files;       /* rc 0: the shards, in m/ */
	const char *detail;             /* rc < 0: a piece of the message */
} rows[] = {
	{ "save_pretrained's index: each shard once, in the order first named",
	  "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {\"lm_head.weight\": \"model-00002-of-00002.safetensors\", "
	  "\"embed.weight\": \"model-00001-of-00002.safetensors\", \"norm.weight\": \"model-00002-of-00002.safetensors\"}}",
	  0, FILES("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"), NULL },
	{ "a shard in a subdirectory", "{\"weight_map\": {\"a\": \"a.safetensors\", \"b\": \"sub/b.safetensors\"}}", 0,
	  FILES("a.safetensors", "sub/b.safetensors"), NULL },
	{ "blanks before the object", "\n  {\"weight_map\": {\"a\": \"a.safetensors\"}}", 0, FILES("a.safetensors"),
	  NULL },
	{ "a shard up out of the directory", "{\"weight_map\": {\"x\": \"../outside.safetensors\"}}", AEG_EFORMAT,
	  NULL, "tensor \"x\" is in \"../outside.safetensors\": a shard must be a file in the index's directory" },
	{ "an absolute shard", "{\"weight_map\": {\"x\": \"/etc/passwd\"}}", AEG_EFORMAT, NULL,
	  "a shard must be a file in the index's directory" },
	{ "up and down again", "{\"weight_map\": {\"x\": \"sub/../a.safetensors\"}}", AEG_EFORMAT, NULL,
	  "a shard must be a file" },
	{ "a shard that is '..'", "{\"weight_map\": {\"x\": \"sub/..\"}}", AEG_EFORMAT, NULL, "a shard must be a file" },
	{ "an empty shard name", "{\"weight_map\": {\"x\": \"\"}}", AEG_EFORMAT, NULL, "a shard must be a file" },
	{ "a missing shard", "{\"weight_map\": {\"a\": \"a.safetensors\", \"x\": \"missing.safetensors\"}}",
	  AEG_ENOENT, NULL, "names shard " },
	{ "a shard that is a directory", "{\"weight_map\": {\"x\": \"d.safetensors\"}}", AEG_EINVAL, NULL,
	  "d.safetensors: not a regular file" },
	{ "a shard that is a FIFO (never opened)", "{\"weight_map\": {\"x\": \"f.safetensors\"}}", AEG_EINVAL, NULL,
	  "f.safetensors: not a regular file" },
	{ "an empty weight_map", "{\"weight_map\": {}}", AEG_EFORMAT, NULL, "the weight_map names no tensor" },
	{ "no weight_map", "{\"metadata\": {}}", AEG_EFORMAT, NULL, "not a shard index: no \"weight_map\" object" },
	{ "a weight_map that is no object", "{\"weight_map\": [\"a.safetensors\"]}", AEG_EFORMAT, NULL,
	  "no \"weight_map\" object" },
	{ "not JSON", "weights", AEG_EFORMAT, NULL, "not a shard index: " },
	{ "a key twice", "{\"weight_map\": {\"a\": \"a.safetensors\"}, \"weight_map\": {}}", AEG_EFORMAT, NULL,
	  "not a shard index: " },
	{ "a shard that is no string", "{\"weight_map\": {\"w\": 7}}", AEG_EFORMAT, NULL,
	  "the shard of tensor \"w\" is not a string" },
	/* A downloaded index's bytes reach the message quoted: an escape sequence shows as '?'. */
	{ "control bytes in a missing shard's name",
	  "{\"weight_map\": {\"t\": \"x\\u001b]0;title\\u0007.safetensors\"}}", AEG_ENOENT, NULL,
	  "x?]0;title?.safetensors" },
	{ "control bytes in a tensor and a shard that leaves",
	  "{\"weight_map\": {\"t\\u001b[2J\": \"../x\\n\"}}", AEG_EFORMAT, NULL, "tensor \"t?[2J\" is in \"../x?\"" },
	{ "control bytes in a tensor whose shard is no string", "{\"weight_map\": {\"\\r\": null}}", AEG_EFORMAT, NULL,
	  "the shard of tensor \"?\" is not a string" },
	{ "a raw control byte in the JSON", "{\"weight_map\": {\"a\x1b\": \"a.safetensors\"}}", AEG_EFORMAT, NULL,
	  "not a shard index: " },
};

/* Each row as the index of m/, found by its path and by the directory: the same files, or the same error. */
static void index_rows(void **state)
{
	char index[PATH_MAX], dir[PATH_MAX];

	path_of(index, sizeof(index), "m/model.safetensors.index.json");
	path_of(dir, sizeof(dir), "m");
	for (size_t i = 0; i < AEG_ARRAY_SIZE(rows); i++) {
		const struct index_row *r = &rows[i];
		struct aeg_model_paths mf;
		int by_dir;

		write_text("m/model.safetensors.index.json", r->json);
		for (by_dir = 0; by_dir < 2; by_dir++) {
			int rc;

			aeg_error_clear();
			rc = aeg_model_paths(by_dir ? dir : index, &mf);
			if (r->rc < 0) {
				assert_failed(rc, &mf, r->rc, r->detail, r->what);
				continue;
			}
			if (rc != 0)
				fail_msg("%s: %s \"%s\"", r->what, aeg_errname(rc), aeg_error_detail());
			assert_files(&mf, "m", r->files, r->what);
			assert_int_equal(mf.index, 1);
			assert_int_equal(mf.dir, by_dir);
			aeg_model_paths_free(&mf);
			assert_null(mf.paths);
		}
	}
}

/*
 * A file of JSON under a name that is no index's: an index when it holds a
 * weight_map, else itself; an index with bad contents stays an error.
 */
static void json_by_another_name(void **state)
{
	static const struct {
		const char *what, *json;
		int rc, index;
	} cases[] = {
		{ "an index", "{\"weight_map\": {\"a\": \"a.safetensors\"}}", 0, 1 },
		{ "an index after blanks", "\r\n\t {\"weight_map\": {\"a\": \"a.safetensors\"}}", 0, 1 },
		{ "JSON without a weight_map", "{\"a\": 1}", 0, 0 },
		{ "not JSON, starting with '{'", "{ weights", 0, 0 },
		{ "an array", "[1]", 0, 0 },
		{ "an index naming a missing shard", "{\"weight_map\": {\"x\": \"missing.safetensors\"}}", AEG_ENOENT, 0 },
		{ "an index with a tensor called 'not a shard index'",
		  "{\"weight_map\": {\"not a shard index\": 1}}", AEG_EFORMAT, 0 },
	};
	char path[PATH_MAX];

	path_of(path, sizeof(path), "m/weights.json");
	for (size_t i = 0; i < AEG_ARRAY_SIZE(cases); i++) {
		struct aeg_model_paths mf;
		int rc;

		write_text("m/weights.json", cases[i].json);
		aeg_error_clear();
		rc = aeg_model_paths(path, &mf);
		if (rc != cases[i].rc)
			fail_msg("%s: %s \"%s\", want %s", cases[i].what, aeg_errname(rc), aeg_error_detail(),
				 aeg_errname(cases[i].rc));
		if (rc < 0) {
			assert_failed(rc, &mf, cases[i].rc, "", cases[i].what);
			continue;
		}
		if (cases[i].index)
			assert_files(&mf, "m", FILES("a.safetensors"), cases[i].what);
		else
			assert_files(&mf, "m", FILES("weights.json"), cases[i].what);
		assert_int_equal(mf.index, cases[i].index);
		aeg_model_paths_free(&mf);
	}
}

/* However many blanks come before it (more than one read's worth here), an index is one. */
static void index_after_many_blanks(void **state)
{
	struct aeg_model_paths mf;
	char text[6000], path[PATH_MAX];

	memset(text, '\n', 5000);
	snprintf(text + 5000, sizeof(text) - 5000, "{\"weight_map\": {\"a\": \"a.safetensors\"}}");
	write_text("m/weights.json", text);
	path_of(path, sizeof(path), "m/weights.json");
	assert_int_equal(aeg_model_paths(path, &mf), 0);
	assert_files(&mf, "m", FILES("a.safetensors"), "an index after 5000 blanks");
	aeg_model_paths_free(&mf);
}

/*
 * A safetensors file whose length field starts with '{' (a header of 123
 * bytes: 7b 00 .. 00, then the header's own '{') is a model, not an index,
 * whatever its name.
 */
static void safetensors_is_no_index(void **state)
{
	char header[124], file[8 + 123 + 4] = { 123 };
	struct aeg_model_paths mf;
	char path[PATH_MAX];

	snprintf(header, sizeof(header), "%-123s", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}");
	memcpy(file + 8, header, 123);
	path_of(path, sizeof(path), "m/small.json");
	test_write_file(path, file, sizeof(file));
	assert_int_equal(aeg_model_paths(path, &mf), 0);
	assert_files(&mf, "m", FILES("small.json"), "a safetensors file named .json");
	assert_int_equal(mf.index, 0);
	aeg_model_paths_free(&mf);
	assert_int_equal(unlink(path), 0);
}

static void directories(void **state)
{
	struct aeg_model_paths mf;
	char p[PATH_MAX];

	/* No index: every *.safetensors by name, hidden files and other names left out. */
	path_of(p, sizeof(p), "plain");
	assert_int_equal(aeg_model_paths(p, &mf), 0);
	assert_files(&mf, "plain", FILES("y.safetensors", "z.safetensors"), "a directory of shards");
	assert_int_equal(mf.dir, 1);
	assert_int_equal(mf.index, 0);
	aeg_model_paths_free(&mf);

	/* model.safetensors alone, though other shards are beside it. */
	path_of(p, sizeof(p), "single");
	assert_int_equal(aeg_model_paths(p, &mf), 0);
	assert_files(&mf, "single", FILES("model.safetensors"), "a directory with model.safetensors");
	aeg_model_paths_free(&mf);

	path_of(p, sizeof(p), "empty");
	assert_failed(aeg_model_paths(p, &mf), &mf, AEG_ENOENT, "no model in it", "an empty directory");

	/* Any other file is itself. */
	path_of(p, sizeof(p), "plain/notes.txt");
	assert_int_equal(aeg_model_paths(p, &mf), 0);
	assert_files(&mf, "plain", FILES("notes.txt"), "a text file");
	assert_int_equal(mf.dir, 0);
	aeg_model_paths_free(&mf);
}

static void bad_paths(void **state)
{
	struct aeg_model_paths mf;
	char p[PATH_MAX];

	assert_failed(aeg_model_paths("", &mf), &mf, AEG_EINVAL, "empty model path", "an empty path");
	path_of(p, sizeof(p), "nothing");
	assert_failed(aeg_model_paths(p, &mf), &mf, AEG_ENOENT, "No such file", "a missing path");
	path_of(p, sizeof(p), "plain/notes.txt/x");
	assert_failed(aeg_model_paths(p, &mf), &mf, AEG_ENOENT, "", "a path through a file");
	path_of(p, sizeof(p), "m/f\033[2J");
	assert_failed(aeg_model_paths(p, &mf), &mf, AEG_ENOENT, "m/f?[2J: No such file", "a path with an escape");
	path_of(p, sizeof(p), "m/modèle");
	assert_failed(aeg_model_paths(p, &mf), &mf, AEG_ENOENT, "m/modèle: No such file", "a path in UTF-8, kept");
}

/*
 * A directory whose path is just short of PATH_MAX: its index's path is too
 * long, said as such, and nothing is left set (the directory flag was).
 */
static void directory_path_too_long(void **state)
{
	struct aeg_model_paths mf;
	char p[PATH_MAX], part[241];
	size_t len;

	memset(part, 'd', sizeof(part) - 1);
	part[sizeof(part) - 1] = '\0';
	path_of(p, sizeof(p), "deep");
	make_dir("deep");
	len = strlen(p);
	/* Parts of 240 bytes, the last one shorter: the path ends 10 bytes short of PATH_MAX. */
	while (len < PATH_MAX - 10) {
		size_t take = PATH_MAX - 10 - len - 1 < strlen(part) ? PATH_MAX - 10 - len - 1 : strlen(part);

		snprintf(p + len, sizeof(p) - len, "/%.*s", (int)take, part);
		len = strlen(p);
		if (mkdir(p, 0700) != 0)
			fail_msg("mkdir of a %zu-byte path: %s", len, strerror(errno));
	}
	assert_failed(aeg_model_paths(p, &mf), &mf, AEG_EINVAL, "path too long", "a directory near PATH_MAX");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(index_rows),
		cmocka_unit_test(json_by_another_name),
		cmocka_unit_test(index_after_many_blanks),
		cmocka_unit_test(safetensors_is_no_index),
		cmocka_unit_test(directories),
		cmocka_unit_test(bad_paths),
		cmocka_unit_test(directory_path_too_long),
	};
	return cmocka_run_group_tests_name("model_paths", tests, setup, teardown);
}

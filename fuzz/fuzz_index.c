/* libFuzzer target: a model's shard index (aeg_model_paths of the index, of its directory, of a *.json). */
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz.h"
#include "model_paths.h"

static const int paths_errors[] = { AEG_ENOENT, AEG_EACCES, AEG_EFORMAT, AEG_EINVAL, AEG_ENOMEM, 0 };

/*
 * base/outside.safetensors        a shard name leaving the directory would find it
 * base/m/                         the model's directory
 *   model.safetensors.index.json  the input
 *   x.json                        the input again, under a name that is no index's
 *   a.safetensors, model-0000{1,2}-of-00002.safetensors, sub/b.safetensors   shards
 *   d.safetensors/, f.safetensors (a FIFO)                                 no files
 * The target works in base and names everything relative to it: base's
 * name is random (mkdtemp), and a string compared anywhere steers
 * libFuzzer's mutations, so a run from a fixed seed repeats only if no
 * compared string holds it.
 */
static char base[PATH_MAX];
static int index_fd = -1, json_fd = -1;

#define MODEL_DIR "m"
#define INDEX_PATH MODEL_DIR "/model.safetensors.index.json"
#define JSON_PATH MODEL_DIR "/x.json"

static const char *const made[] = {
	"outside.safetensors", "m/a.safetensors", "m/model-00001-of-00002.safetensors",
	"m/model-00002-of-00002.safetensors", "m/sub/b.safetensors",
};

static void cleanup(void)
{
	static const char *const rest[] = {
		INDEX_PATH, JSON_PATH, "m/f.safetensors", "m/d.safetensors", "m/sub", "m",
	};

	if (chdir(base) != 0)
		return;
	for (size_t i = 0; i < sizeof(made) / sizeof(made[0]); i++)
		unlink(made[i]);
	for (size_t i = 0; i < sizeof(rest) / sizeof(rest[0]); i++)
		if (unlink(rest[i]) != 0)
			rmdir(rest[i]);
	if (chdir("/") == 0)
		rmdir(base);
}

static int create(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

	FUZZ_CHECK(fd >= 0, "creating %s failed", path);
	return fd;
}

static void setup(void)
{
	snprintf(base, sizeof(base), "%s/aegaeon-fuzz-index.XXXXXX", fuzz_tmpdir());
	FUZZ_CHECK(mkdtemp(base) != NULL && chdir(base) == 0, "mkdtemp %s failed", base);
	atexit(cleanup);
	FUZZ_CHECK(mkdir("m", 0700) == 0 && mkdir("m/sub", 0700) == 0 && mkdir("m/d.safetensors", 0700) == 0 &&
		   mkfifo("m/f.safetensors", 0600) == 0, "making the model's directory in %s failed", base);
	for (size_t i = 0; i < sizeof(made) / sizeof(made[0]); i++)
		close(create(made[i]));
	index_fd = create(INDEX_PATH);
	json_fd = create(JSON_PATH);
}

static void put(int fd, const char *path, const uint8_t *data, size_t size)
{
	FUZZ_CHECK(ftruncate(fd, 0) == 0 && pwrite(fd, data, size, 0) == (ssize_t)size,
		   "writing %zu bytes to %s failed", size, path);
}

/*
 * Whether @path (relative, "m/...") stays inside m/ component by component.
 * The fixture has no symbolic links, so the names alone decide.
 */
static int inside_model(const char *path)
{
	const char *p = path + sizeof(MODEL_DIR);      /* past "m/" */
	int depth = 0;

	if (strncmp(path, MODEL_DIR "/", sizeof(MODEL_DIR)) != 0)
		return 0;
	while (*p != '\0') {
		size_t n = strcspn(p, "/");

		if (n == 2 && p[0] == '.' && p[1] == '.')
			depth--;
		else if (n > 0 && !(n == 1 && p[0] == '.'))
			depth++;
		if (depth < 0)
			return 0;
		p += n + (p[n] == '/');
	}
	return depth > 0;
}

/* What aeg_model_paths promises of the files it returns for an index. */
static void check_files(const struct aeg_model_paths *mf, const char *what)
{
	FUZZ_CHECK(mf->count >= 1 && mf->count <= AEG_MODEL_MAX_FILES && mf->paths != NULL,
		   "%s: %u files", what, mf->count);
	for (uint32_t i = 0; i < mf->count; i++) {
		struct stat st;

		/* Every shard is a regular file inside the model's directory, however it was named. */
		FUZZ_CHECK(inside_model(mf->paths[i]), "%s: shard %s is outside " MODEL_DIR "/", what, mf->paths[i]);
		FUZZ_CHECK(stat(mf->paths[i], &st) == 0 && S_ISREG(st.st_mode), "%s: shard %s is no regular file",
			   what, mf->paths[i]);
		for (uint32_t k = 0; k < i; k++)
			FUZZ_CHECK(strcmp(mf->paths[i], mf->paths[k]) != 0, "%s: shard %s twice", what, mf->paths[i]);
	}
}

static void check_failed(int rc, const struct aeg_model_paths *mf, const char *what)
{
	fuzz_check_error(rc, paths_errors);
	/* An index comes with a downloaded model: none of its bytes reach a message raw. */
	fuzz_check_printable(aeg_error_detail(), what);
	FUZZ_CHECK(mf->count == 0 && mf->paths == NULL && mf->dir == 0 && mf->index == 0,
		   "%s: a failure left %u files", what, mf->count);
}

static int same_files(const struct aeg_model_paths *a, const struct aeg_model_paths *b)
{
	if (a->count != b->count)
		return 0;
	for (uint32_t i = 0; i < a->count; i++)
		if (strcmp(a->paths[i], b->paths[i]) != 0)
			return 0;
	return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct aeg_model_paths by_index, by_dir, by_json;
	int rc, rc_dir, rc_json;

	if (index_fd < 0)
		setup();
	put(index_fd, INDEX_PATH, data, size);
	put(json_fd, JSON_PATH, data, size);

	aeg_error_clear();
	rc = aeg_model_paths(INDEX_PATH, &by_index);
	if (rc < 0) {
		check_failed(rc, &by_index, "index error detail");
	} else {
		FUZZ_CHECK(rc == 0 && by_index.index == 1 && by_index.dir == 0, "index: %d, index %d, dir %d", rc,
			   by_index.index, by_index.dir);
		check_files(&by_index, "index");
	}

	/* The directory finds the same index and gives the same files, in the same order. */
	aeg_error_clear();
	rc_dir = aeg_model_paths(MODEL_DIR, &by_dir);
	FUZZ_CHECK(rc_dir == rc, "the directory gives %d, its index %d", rc_dir, rc);
	if (rc_dir < 0)
		check_failed(rc_dir, &by_dir, "directory error detail");
	else
		FUZZ_CHECK(by_dir.dir == 1 && by_dir.index == 1 && same_files(&by_dir, &by_index),
			   "the directory's files are not its index's");

	/*
	 * Under a name that is no index's, the same bytes are an index where
	 * they are one; else (not JSON, no weight_map, a safetensors file) the
	 * file itself, and an index that names bad shards is still an error.
	 */
	aeg_error_clear();
	rc_json = aeg_model_paths(JSON_PATH, &by_json);
	if (rc_json < 0) {
		check_failed(rc_json, &by_json, "x.json error detail");
		FUZZ_CHECK(rc_json == rc, "x.json fails with %d, the index with %d", rc_json, rc);
	} else if (by_json.index) {
		FUZZ_CHECK(rc == 0 && same_files(&by_json, &by_index), "x.json is an index the index is not");
	} else {
		FUZZ_CHECK(by_json.count == 1 && strcmp(by_json.paths[0], JSON_PATH) == 0,
			   "x.json, no index, gives %u files", by_json.count);
		FUZZ_CHECK(rc != 0, "x.json is taken as itself, but as an index it parsed");
	}
	aeg_model_paths_free(&by_index);
	aeg_model_paths_free(&by_dir);
	aeg_model_paths_free(&by_json);
	return 0;
}

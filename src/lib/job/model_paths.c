/* What files a model is: a directory of safetensors shards, a shard index (save_pretrained's), or one file. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "internal.h"
#include "model_paths.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define INDEX_MAX_BYTES (64ull << 20)

/*
 * Names read from an index (tensors, shards) go into messages through
 * aeg_quote; paths, UTF-8 and all, as they are: every detail goes through
 * aeg_scrub, so no control byte of either reaches a terminal.
 */

void aeg_model_paths_free(struct aeg_model_paths *mf)
{
	if (mf == NULL)
		return;
	for (uint32_t i = 0; i < mf->count; i++)
		free(mf->paths[i]);
	free(mf->paths);
	memset(mf, 0, sizeof(*mf));
}

/* Add @path unless listed already. */
static int add_file(struct aeg_model_paths *mf, const char *path)
{
	char **paths;

	if (mf->count >= AEG_MODEL_MAX_FILES)
		return aeg_fail(AEG_EINVAL, "%s: a model of more than %d files", path, AEG_MODEL_MAX_FILES);
	for (uint32_t i = 0; i < mf->count; i++)
		if (strcmp(mf->paths[i], path) == 0)
			return 0;
	paths = realloc(mf->paths, (mf->count + 1) * sizeof(*paths));
	if (paths == NULL)
		return aeg_fail(AEG_ENOMEM, "model files: out of memory");
	mf->paths = paths;
	mf->paths[mf->count] = strdup(path);
	if (mf->paths[mf->count] == NULL)
		return aeg_fail(AEG_ENOMEM, "model files: out of memory");
	mf->count++;
	return 0;
}

static int add_path(struct aeg_model_paths *mf, const char *dir, const char *name)
{
	char path[PATH_MAX];

	if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path))
		return aeg_fail(AEG_EINVAL, "%s: path too long", path);
	return add_file(mf, path);
}

/* A shard name of an index: a file beside it, never a path that leaves its directory. */
static int check_shard_name(const char *index, const char *tensor, const char *name)
{
	char t[AEG_NAME_SHOWN], n[AEG_NAME_SHOWN];

	if (name[0] == '\0' || name[0] == '/' || strcmp(name, "..") == 0 || strncmp(name, "../", 3) == 0 ||
	    strstr(name, "/../") != NULL || (strlen(name) >= 3 && strcmp(name + strlen(name) - 3, "/..") == 0))
		return aeg_fail(AEG_EFORMAT, "%s: tensor \"%s\" is in \"%s\": a shard must be a file in the "
				"index's directory", index, aeg_quote(tensor, t, sizeof(t)),
				aeg_quote(name, n, sizeof(n)));
	return 0;
}

/* @index is named like a shard index but is no file: an error, not "no index". */
static int not_a_file(const char *index)
{

	return aeg_fail(AEG_EINVAL, "%s: not a regular file (a shard index is a file of JSON: remove or rename it)",
			index);
}

/*
 * Parse @index, a regular file: opened without waiting (a FIFO would wait
 * for a writer forever) and checked on what was opened. Symbolic links are
 * followed: the Hugging Face cache's snapshots link every file to a blob.
 */
static int read_index(const char *index, json_t **root, int *not_index)
{
	char why[sizeof(((json_error_t *)NULL)->text)];    /* jansson's text may quote the file's bytes */
	json_error_t jerr;
	struct stat st;
	int fd, err = 0;

	*root = NULL;
	fd = open(index, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s: %s", index, strerror(errno));
	if (fstat(fd, &st) != 0)
		err = aeg_fail(AEG_EIO, "%s: %s", index, strerror(errno));
	else if (!S_ISREG(st.st_mode))
		err = not_a_file(index);
	else if ((uint64_t)st.st_size > INDEX_MAX_BYTES)
		err = aeg_fail(AEG_EFORMAT, "%s: %lld bytes, over the %llu MiB an index may have", index,
			       (long long)st.st_size, INDEX_MAX_BYTES >> 20);
	if (err == 0) {
		*root = json_loadfd(fd, JSON_REJECT_DUPLICATES, &jerr);
		*not_index = *root == NULL;
		if (*root == NULL)
			err = aeg_fail(AEG_EFORMAT, "%s: not a shard index: %s (line %d)", index,
				       aeg_quote(jerr.text, why, sizeof(why)), jerr.line);
	}
	close(fd);
	return err;
}

/*
 * The shards an index names, in the order they first appear, each checked
 * to be a file. *@not_index: the file failed as no index at all (not JSON,
 * or no weight_map object), not as an index with bad contents.
 */
static int from_index(const char *index, struct aeg_model_paths *mf, int *not_index)
{
	char dir[PATH_MAX], *slash;
	const char *tensor;
	json_t *root = NULL, *map, *v;
	int err;

	*not_index = 0;
	err = read_index(index, &root, not_index);
	if (err)
		return err;
	map = json_object_get(root, "weight_map");
	if (!json_is_object(root) || !json_is_object(map)) {
		*not_index = 1;
		err = aeg_fail(AEG_EFORMAT, "%s: not a shard index: no \"weight_map\" object", index);
		goto out;
	}
	if (json_object_size(map) == 0) {
		err = aeg_fail(AEG_EFORMAT, "%s: the weight_map names no tensor", index);
		goto out;
	}
	snprintf(dir, sizeof(dir), "%s", index);
	slash = strrchr(dir, '/');
	if (slash != NULL)
		*slash = '\0';
	else
		snprintf(dir, sizeof(dir), ".");
	json_object_foreach(map, tensor, v) {
		if (!json_is_string(v)) {
			char t[AEG_NAME_SHOWN];

			err = aeg_fail(AEG_EFORMAT, "%s: the shard of tensor \"%s\" is not a string", index,
				       aeg_quote(tensor, t, sizeof(t)));
			goto out;
		}
		err = check_shard_name(index, tensor, json_string_value(v));
		if (err == 0)
			err = add_path(mf, dir, json_string_value(v));
		if (err)
			goto out;
	}
	mf->index = 1;
	for (uint32_t i = 0; i < mf->count && err == 0; i++) {
		struct stat st;

		if (stat(mf->paths[i], &st) != 0)
			err = aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s names shard %s: %s", index,
				       mf->paths[i], strerror(errno));
		else if (!S_ISREG(st.st_mode))
			err = aeg_fail(AEG_EINVAL, "%s names shard %s: not a regular file", index, mf->paths[i]);
	}
out:
	json_decref(root);
	return err;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A directory without an index: model.safetensors, else every *.safetensors in name order. */
static int from_dir(const char *dir, struct aeg_model_paths *mf)
{
	struct dirent *e;
	DIR *d;
	int err = 0;

	d = opendir(dir);
	if (d == NULL)
		return aeg_fail(errno == ENOENT ? AEG_ENOENT : AEG_EACCES, "%s: %s", dir, strerror(errno));
	while (err == 0 && (e = readdir(d)) != NULL) {
		size_t n = strlen(e->d_name);

		if (n > 12 && strcmp(e->d_name + n - 12, ".safetensors") == 0 && e->d_name[0] != '.')
			err = add_path(mf, dir, e->d_name);
	}
	closedir(d);
	if (err)
		return err;
	if (mf->count == 0)
		return aeg_fail(AEG_ENOENT, "%s: no model in it (no " INDEX_NAME ", " SINGLE_NAME
				" or *.safetensors file)", dir);
	qsort(mf->paths, mf->count, sizeof(*mf->paths), cmp_str);
	return 0;
}

static int named_index(const char *path)
{
	size_t n = strlen(path);

	return n >= 11 && strcmp(path + n - 11, ".index.json") == 0;
}

static int json_blank(unsigned char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/*
 * A file of JSON may be an index whatever its name (one holding a weight_map
 * is). A file not named as one is taken for one only if it could be one:
 * no larger than an index may be, starting with '{' after JSON's blanks,
 * and not a safetensors file, whose first 8 bytes (its header's length, any
 * bytes) are followed by its header's '{'. A model, or raw bytes, that
 * happens to start with '{' loads as it is.
 */
static int looks_like_index(const char *path, const struct stat *st)
{
	unsigned char buf[4096];
	uint64_t at = 0, header = 0;
	int fd, first = -1, safetensors = 0;
	ssize_t n, i;

	if (named_index(path))
		return 1;
	if ((uint64_t)st->st_size > INDEX_MAX_BYTES)
		return 0;
	fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return 0;
	while (first < 0 && (n = pread(fd, buf, sizeof(buf), (off_t)at)) > 0) {
		if (at == 0 && n >= 9 && buf[8] == '{') {
			for (int k = 7; k >= 0; k--)
				header = header << 8 | buf[k];
			safetensors = header <= (uint64_t)st->st_size - 8;
		}
		for (i = 0; i < n && json_blank(buf[i]); i++)
			;
		if (i < n)
			first = buf[i];
		at += (uint64_t)n;
	}
	close(fd);
	return first == '{' && !safetensors;
}

int aeg_model_paths(const char *path, struct aeg_model_paths *mf)
{
	char index[PATH_MAX];
	struct stat st, ist;
	int err, not_index;

	memset(mf, 0, sizeof(*mf));
	if (path == NULL || path[0] == '\0')
		return aeg_fail(AEG_EINVAL, "empty model path");
	if (stat(path, &st) != 0)
		return aeg_fail(errno == ENOENT || errno == ENOTDIR ? AEG_ENOENT : AEG_EACCES, "%s: %s",
				path, strerror(errno));
	if (S_ISDIR(st.st_mode)) {
		mf->dir = 1;
		if (snprintf(index, sizeof(index), "%s/" INDEX_NAME, path) >= (int)sizeof(index))
			err = aeg_fail(AEG_EINVAL, "%s: path too long", path);
		else if (stat(index, &ist) == 0)
			err = S_ISREG(ist.st_mode) ? from_index(index, mf, &not_index) : not_a_file(index);
		else if (snprintf(index, sizeof(index), "%s/" SINGLE_NAME, path) < (int)sizeof(index) &&
			 access(index, F_OK) == 0)
			err = add_path(mf, path, SINGLE_NAME);
		else
			err = from_dir(path, mf);
	} else if (S_ISREG(st.st_mode) && looks_like_index(path, &st)) {
		err = from_index(path, mf, &not_index);
		/* A file of JSON that is no index, and is not named as one, is loaded as it is. */
		if (err == AEG_EFORMAT && not_index && !named_index(path)) {
			aeg_model_paths_free(mf);
			aeg_error_clear();
			err = add_file(mf, path);
		}
	} else {
		err = add_file(mf, path);
	}
	if (err)
		aeg_model_paths_free(mf);
	return err;
}

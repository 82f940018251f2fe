/* The files of a model: a directory, a shard index or one file (private to the library). */
#ifndef AEGAEON_MODEL_PATHS_H
#define AEGAEON_MODEL_PATHS_H

#include <stdint.h>

#define AEG_MODEL_MAX_FILES 4096        /* shards of one model */

struct aeg_model_paths {
	uint32_t count;
	char **paths;                   /* in load order: the index's first mention, else by name */
	int dir;                        /* the model was named by its directory */
	int index;                      /* the files came from a shard index */
};

/*
 * aeg_model_paths - the files @path stands for: a directory holding
 * model.safetensors.index.json (save_pretrained's; its weight_map names the
 * shards, each a file in that directory), else model.safetensors, else
 * every *.safetensors in it by name; a shard index (*.index.json, or any
 * file of JSON with a weight_map); any other file itself. Paths are @path's
 * directory joined with the shard's name. Errors: AEG_ENOENT (no such path,
 * a missing shard, a directory with no model), AEG_EACCES, AEG_EFORMAT (an
 * index that does not parse, has no weight_map, or names a shard outside
 * its directory), AEG_EINVAL (more than AEG_MODEL_MAX_FILES files; a
 * directory's index or a shard that is not a regular file, such as a FIFO,
 * which is never opened to wait for a writer; symbolic links to files are
 * followed), AEG_ENOMEM.
 */
int aeg_model_paths(const char *path, struct aeg_model_paths *mf);
void aeg_model_paths_free(struct aeg_model_paths *mf);

#endif

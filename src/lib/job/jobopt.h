/* Job options (--aegaeon-slab/-pinned/-prefetch/-device): parsing and site limits, shared by plugin, agent and CLI. */
#ifndef AEGAEON_JOBOPT_H
#define AEGAEON_JOBOPT_H

#include <stddef.h>
#include <stdint.h>

#include <aegaeon/config.h>
#include <aegaeon/size.h>

/* At most this many files in one --aegaeon-prefetch. */
#define AEG_JOBOPT_PREFETCH_MAX 64
/*
 * At most this many bytes in the list once its paths are absolute. The list
 * reaches the prolog's environment (twice) and the agent's command line, and
 * Linux refuses an exec with any one string over 128 KiB: a longer list would
 * fail slurmd's start of the prolog, which drains the node.
 */
#define AEG_JOBOPT_PREFETCH_MAX_BYTES (32 * 1024)

/*
 * Every message these functions leave in the error detail names the option
 * as the user wrote it ("--aegaeon-slab=500GiB is over this site's limit of
 * 80 GiB per GPU"), since it reaches srun's terminal or the step's stderr.
 */

/*
 * aeg_jobopt_parse_slab - parse --aegaeon-slab=SIZE|PCT% (aeg_size_spec_parse
 * syntax). Zero ("0", "0%") is AEG_EINVAL; so is any parse error.
 */
int aeg_jobopt_parse_slab(const char *text, struct aeg_size_spec *slab);

/* The pinned pool a job asked for. */
struct aeg_jobopt_pinned {
	uint64_t bytes;         /* pool size per node; 0: no pool */
	uint64_t buffer_bytes;  /* 0: the site's pinned_buffer */
};

/*
 * aeg_jobopt_parse_pinned - parse --aegaeon-pinned=SIZE[:BUFFER]. Both are
 * absolute sizes (no percentage: host memory has no per-GPU total); BUFFER
 * is a non-zero multiple of 4 KiB no larger than SIZE; SIZE 0 means no pool
 * and takes no BUFFER. AEG_EINVAL or AEG_ERANGE otherwise.
 */
int aeg_jobopt_parse_pinned(const char *text, struct aeg_jobopt_pinned *pinned);

/*
 * aeg_jobopt_parse_prefetch - split --aegaeon-prefetch=PATH[,PATH...] into
 * absolute paths joined by commas, in a new string (*@paths, caller frees).
 * Relative paths are made absolute against @cwd; with @cwd NULL they are
 * AEG_EINVAL. Empty elements, control characters, over PATH_MAX, more than
 * AEG_JOBOPT_PREFETCH_MAX files or a list of more than
 * AEG_JOBOPT_PREFETCH_MAX_BYTES are AEG_EINVAL. @count (may be NULL) gets
 * the number of files. Opens nothing. *@paths is NULL on failure.
 */
int aeg_jobopt_parse_prefetch(const char *text, const char *cwd, char **paths, size_t *count);

/*
 * aeg_jobopt_check_files - each path of a comma-joined absolute list (as
 * aeg_jobopt_parse_prefetch makes) must be a model the calling process (its
 * real uid) can read: a regular file, or a directory or shard index whose
 * every file is one (aeg_model_paths). AEG_ENOENT, AEG_EACCES, AEG_EINVAL
 * (not a regular file) or AEG_EFORMAT (a bad index) with the path in the
 * detail.
 */
int aeg_jobopt_check_files(const char *paths);

/*
 * aeg_jobopt_parse_device - --aegaeon-device=cuda|host; AEG_EINVAL otherwise.
 */
int aeg_jobopt_parse_device(const char *text, enum aeg_device_kind *kind);

/*
 * aeg_jobopt_check_slab - @slab against the site's slab_max. Both absolute,
 * or both percentages, are compared here; a mix is left to the agent, which
 * knows the GPU's memory. AEG_ERANGE over the cap, with the cap in the detail.
 */
int aeg_jobopt_check_slab(const struct aeg_size_spec *slab, const struct aeg_config *cfg);

/*
 * aeg_jobopt_check_pinned - @pinned against pinned_max, and its buffer (or
 * the site's pinned_buffer when it names none) against its size.
 * AEG_ERANGE or AEG_EINVAL with the limit in the detail.
 */
int aeg_jobopt_check_pinned(const struct aeg_jobopt_pinned *pinned, const struct aeg_config *cfg);

/*
 * aeg_jobopt_check_device - AEG_EPERM unless the site allows
 * --aegaeon-device (allow_device_option).
 */
int aeg_jobopt_check_device(enum aeg_device_kind kind, const struct aeg_config *cfg);

/*
 * aeg_jobopt_check_prefetch_slab - a job that names files to load at start
 * (@prefetch not 0) needs a slab to load them into: with no --aegaeon-slab
 * (@has_slab 0) on a site whose slab_default is 0, AEG_EINVAL saying so.
 */
int aeg_jobopt_check_prefetch_slab(int prefetch, int has_slab, const struct aeg_config *cfg);

/*
 * aeg_jobopt_format_slab - @slab as text aeg_size_spec_parse reads back to
 * the same value: bytes as a plain integer, percentages as "12.5%".
 * Returns @buf; 32 bytes is enough.
 */
char *aeg_jobopt_format_slab(const struct aeg_size_spec *slab, char *buf, size_t len);

#endif

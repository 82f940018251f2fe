/* aegaeon configuration: /etc/aegaeon/aegaeon.conf (libconfig syntax). */
#ifndef AEGAEON_CONFIG_H
#define AEGAEON_CONFIG_H

#include <limits.h>
#include <stdint.h>

#include <aegaeon/log.h>
#include <aegaeon/size.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AEG_CONFIG_DEFAULT_PATH "/etc/aegaeon/aegaeon.conf"
/* The defaults of max_loads and hello_timeout; the agent takes them too where it is given 0. */
#define AEG_CONFIG_DEFAULT_MAX_LOADS 4096
#define AEG_CONFIG_DEFAULT_HELLO_TIMEOUT_MS 10000

/*
 * Room for a path in the structures of these headers, NUL included: Linux's
 * PATH_MAX, which <limits.h> defines only for POSIX builds (not -std=c11).
 */
#define AEG_PATH_MAX 4096

enum aeg_device_kind {
	AEG_DEVICE_CUDA = 0,
	AEG_DEVICE_HOST = 1,
};

/*
 * aeg_device_kind_parse - "cuda" or "host"; AEG_EINVAL otherwise.
 * aeg_device_kind_name - the reverse.
 */
int aeg_device_kind_parse(const char *text, enum aeg_device_kind *kind);
const char *aeg_device_kind_name(enum aeg_device_kind kind);

/*
 * Site configuration. Every key of the file is a field here; keys absent
 * from the file keep the defaults aeg_config_defaults() sets (in brackets).
 */
struct aeg_config {
	enum aeg_device_kind device;        /* device ["cuda"] */
	int allow_device_option;            /* allow_device_option [false]: may jobs pass --aegaeon-device */
	struct aeg_size_spec slab_default;  /* slab_default ["90%"]: slab when a job asks for none but uses aegaeon */
	struct aeg_size_spec slab_max;      /* slab_max ["95%"]: cap per GPU */
	uint64_t pinned_default_bytes;      /* pinned_default ["4GiB"] */
	uint64_t pinned_max_bytes;          /* pinned_max ["64GiB"]: cap per node */
	uint64_t pinned_buffer_bytes;       /* pinned_buffer ["32MiB"]: pool buffer size */
	int prefetch_threads;               /* prefetch_threads [12]: 1..256 */
	uint64_t prefetch_chunk_bytes;      /* prefetch_chunk ["64MiB"] */
	char agent_path[AEG_PATH_MAX];      /* agent_path [SBINDIR "/aegaeond"] */
	int agent_start_timeout_ms;         /* agent_start_timeout [30.0 s] */
	int agent_stop_timeout_ms;          /* agent_stop_timeout [5.0 s]: TERM to KILL */
	char runtime_dir[AEG_PATH_MAX];     /* runtime_dir ["/run/aegaeon"] */
	enum aeg_log_level log_level;       /* log_level ["info"] */
	struct aeg_size_spec model_cache;   /* model_cache ["0"]: the agent's host model cache, a size or a
					       percentage of the job's pinned pool; 0 for none */
	int max_loads;                      /* max_loads [4096]: loads a job's agent keeps at once, 1..1048576 */
	int hello_timeout_ms;               /* hello_timeout [10.0 s]: a new connection to the agent has this
					       long to say hello */
};

/* aeg_config_defaults - fill @cfg with the built-in defaults. */
void aeg_config_defaults(struct aeg_config *cfg);

/*
 * aeg_config_load - defaults, then the file at @path. @path NULL means
 * $AEGAEON_CONFIG, else AEG_CONFIG_DEFAULT_PATH; a missing default file is
 * not an error (defaults stand), a missing named file is AEG_ENOENT.
 * An empty $AEGAEON_CONFIG counts as unset. Unknown keys, wrong types, bad
 * values and syntax errors are AEG_ECONFIG with a detail
 * "FILE:LINE: key 'NAME': what is wrong"; an unreadable file is AEG_EACCES
 * or AEG_EIO; a path that is not a regular file (a FIFO or device; /dev/null
 * reads as empty) or a file over 1 MiB is AEG_ECONFIG. On error @cfg is left unchanged. Keys, types and limits: see
 * aegaeon.conf(5). Thread-safe (no global state).
 */
int aeg_config_load(struct aeg_config *cfg, const char *path);

#ifdef __cplusplus
}
#endif
#endif

/* aegaeon job records: the ready and error files the agent leaves in its job directory. */
#ifndef AEGAEON_JOBREC_H
#define AEGAEON_JOBREC_H

#include <stddef.h>
#include <stdint.h>

#include <aegaeon/config.h>
#include <aegaeon/device.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Files of a job directory <runtime_dir>/<jobid>.<nodename> (docs/job-integration.md). */
#define AEG_JOB_SOCKET_FILE "agent.sock"
#define AEG_JOB_PID_FILE    "agent.pid"
#define AEG_JOB_READY_FILE  "ready"
#define AEG_JOB_ERROR_FILE  "error"

#define AEG_JOB_RECORD_VERSION 1
#define AEG_JOB_MAX_GPUS 64             /* GPUs (and slabs) of one job on one node */
#define AEG_JOB_MAX_GPU_ORDINAL 1023
#define AEG_JOB_SOCKET_MAX 108          /* sizeof(sockaddr_un.sun_path), NUL included */
#define AEG_JOB_RECORD_MAX 65536        /* larger files are rejected unread */
#define AEG_JOB_ERROR_MAX 1024          /* reason of an error record, NUL included */

struct aeg_job_slab_info {
	int gpu;                        /* ordinal as the agent sees it */
	uint64_t bytes;
	aeg_handle_t handle;            /* memory IPC handle of the slab's base */
};

/* The ready record. slabs[i] is the slab of gpus[i]. */
struct aeg_job_record {
	int version;                    /* AEG_JOB_RECORD_VERSION */
	long pid;                       /* the agent */
	char socket[AEG_JOB_SOCKET_MAX]; /* absolute path of the agent's socket */
	enum aeg_device_kind device;
	int gpu_count;                  /* 0: no GPU (written as gpus=none) */
	int gpus[AEG_JOB_MAX_GPUS];
	struct aeg_job_slab_info slabs[AEG_JOB_MAX_GPUS];
	uint64_t pinned_bytes;          /* 0 when there is no pool */
	uint64_t pinned_buffer;         /* 0 when there is no pool */
};

/*
 * aeg_job_gpus_parse - the agent's GPU list: comma-separated distinct
 * ordinals 0..AEG_JOB_MAX_GPU_ORDINAL ("0,1"), at most AEG_JOB_MAX_GPUS;
 * "" or "none" for no GPU. AEG_EINVAL with a detail naming the bad item.
 * aeg_job_gpus_format - the reverse ("none" for no GPU); AEG_ERANGE when
 * @len is too small.
 */
int aeg_job_gpus_parse(const char *text, int gpus[AEG_JOB_MAX_GPUS], int *count);
int aeg_job_gpus_format(const int *gpus, int count, char *buf, size_t len);

/*
 * aeg_job_record_format - the record as "key=value" lines into @buf.
 * aeg_job_record_parse - strict parse of @len bytes of @text: every line
 * "key=value\n" (the last one too), "version=1" first, each key of the
 * format exactly once, no other key, every value checked (numbers in range,
 * handles of 128 hex digits, slab<i>_gpu equal to the i-th entry of gpus,
 * a pool size that is a whole number of buffers). Both validate the same
 * rules, so a formatted record always parses.
 * Errors: AEG_EPROTO (detail: line and what is wrong), AEG_EINVAL (a
 * record that breaks the rules), AEG_ERANGE (@buf too small). Thread-safe.
 */
int aeg_job_record_format(const struct aeg_job_record *rec, char *buf, size_t len, size_t *out_len);
int aeg_job_record_parse(const char *text, size_t len, struct aeg_job_record *rec);

/*
 * aeg_job_record_write - write @rec to @path atomically: @path.tmp is
 * written (mode 0600, never through a symbolic link), fsync'ed, renamed over
 * @path, and the directory fsync'ed, so a reader sees no file or a whole one.
 * aeg_job_record_read - read and parse @path: a regular file (not followed
 * if a link) of at most AEG_JOB_RECORD_MAX bytes.
 * Errors: AEG_ENOENT (no such file), AEG_EIO/AEG_EACCES (the system's
 * reason in the detail), AEG_EPROTO (malformed, see aeg_job_record_parse).
 */
int aeg_job_record_write(const char *path, const struct aeg_job_record *rec);
int aeg_job_record_read(const char *path, struct aeg_job_record *rec);

/*
 * aeg_job_error_write - the error record: @reason as one line, written as
 * atomically as the ready record. Control characters become '?' and the
 * reason is cut to AEG_JOB_ERROR_MAX - 1 bytes.
 * aeg_job_error_read - the reason, without its newline, into @reason.
 * A file of more than one line, with control characters, empty, or over
 * AEG_JOB_ERROR_MAX bytes is AEG_EPROTO. Other errors as for records.
 */
int aeg_job_error_write(const char *path, const char *reason);
int aeg_job_error_read(const char *path, char *reason, size_t len);

#ifdef __cplusplus
}
#endif
#endif

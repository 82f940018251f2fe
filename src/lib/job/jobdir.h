/* The job directory <runtime_dir>/<jobid>.<node>: its name, which the plugin's prolog, task_init and epilog must agree on, its error record as root writes it, and its removal. */
#ifndef AEGAEON_JOBDIR_H
#define AEGAEON_JOBDIR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Node names longer than this are shortened in the directory's name. */
#define AEG_JOBDIR_NODE_MAX 32
/* Directories aeg_jobdir_remove holds open at once. */
#define AEG_JOBDIR_REMOVE_FDS 16

/*
 * aeg_jobdir_name - the job directory's name, "<jobid>.<node>", into @buf.
 * @node is 1 to 255 characters of [A-Za-z0-9._-], not starting with '.'.
 * A node name over AEG_JOBDIR_NODE_MAX characters becomes its first 15, '~'
 * and the 16 hex digits of its 64-bit FNV-1a hash ("gpu-node-rack-1~<hash>"),
 * so the name is at most 43 bytes for any node and never that of a shorter
 * node ('~' is not a node name character).
 * Errors: AEG_EINVAL (a bad node name, named in the detail), AEG_ERANGE
 * (@len too small). Thread-safe.
 */
int aeg_jobdir_name(char *buf, size_t len, uint32_t jobid, const char *node);

/*
 * aeg_jobdir_path - "<runtime_dir>/<name>" (aeg_jobdir_name) into @buf.
 * Errors: as aeg_jobdir_name, and AEG_ERANGE when the agent's socket
 * "<path>/agent.sock" would not fit in a Unix socket address
 * (AEG_JOB_SOCKET_MAX - 1 bytes): the detail gives runtime_dir's length and
 * the most it may have. Thread-safe.
 */
int aeg_jobdir_path(char *buf, size_t len, const char *runtime_dir, uint32_t jobid, const char *node);

/*
 * aeg_jobdir_remove - remove @name in the directory @dfd and everything in
 * it, whatever its depth, never following a symbolic link (links are
 * removed, not what they point to) and never leaving the tree: every
 * directory is opened from its parent's descriptor with O_NOFOLLOW. At most
 * AEG_JOBDIR_REMOVE_FDS directories are open at once: one found deeper is
 * moved up into @name itself (as ".aegaeon-deep-N") and emptied in a later
 * round. A tree that is still growing after @timeout_ms (someone writing into
 * it) gives AEG_ETIMEDOUT, with what is left in place. @name missing is not
 * an error. *@removed (may be NULL) counts the entries removed, @name
 * included. Errors: AEG_ETIMEDOUT, AEG_ENOMEM, AEG_EIO/AEG_EACCES/AEG_EPERM
 * (the entry and the system's reason in the detail). Thread-safe.
 */
int aeg_jobdir_remove(int dfd, const char *name, uint64_t timeout_ms, unsigned long *removed);

/*
 * aeg_jobdir_write_error - the job's error record (aeg_job_error_write) in
 * the job directory open at @dfd (@dir names it in messages), made
 * @uid:@gid's. The file is made under a temporary name (O_EXCL, O_NOFOLLOW),
 * chowned through its descriptor and renamed into place, so root may write
 * it into a directory the job user already owns: no link planted there is
 * followed and no file is chowned by name. Errors: as aeg_job_error_write.
 */
int aeg_jobdir_write_error(int dfd, const char *dir, const char *reason, uid_t uid, gid_t gid);

#endif

/* The job directory's name (prolog, task_init and epilog compute it alike) and its removal at any depth. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/jobrec.h>

#include "internal.h"
#include "jobdir.h"

#define NODE_NAME_MAX 255
#define SHORT_PREFIX 15

static int node_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '-' || c == '_' || c == '.';
}

static uint64_t fnv1a64(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (; *s != '\0'; s++) {
		h ^= (unsigned char)*s;
		h *= 0x100000001b3ull;
	}
	return h;
}

int aeg_jobdir_name(char *buf, size_t len, uint32_t jobid, const char *node)
{
	size_t n;
	int w;

	if (node == NULL || node[0] == '\0')
		return aeg_fail(AEG_EINVAL, "node name empty (SLURMD_NODENAME unset?)");
	n = strlen(node);
	if (n > NODE_NAME_MAX)
		return aeg_fail(AEG_EINVAL, "node name of %zu characters is longer than %d", n, NODE_NAME_MAX);
	if (node[0] == '.')
		return aeg_fail(AEG_EINVAL, "node name '%s' starts with '.'", node);
	for (size_t i = 0; i < n; i++)
		if (!node_char(node[i]))
			return aeg_fail(AEG_EINVAL, "node name '%.64s' has character 0x%02x at %zu (allowed: "
					"letters, digits, '-', '_', '.')", node, (unsigned char)node[i], i);
	if (n <= AEG_JOBDIR_NODE_MAX)
		w = snprintf(buf, len, "%u.%s", jobid, node);
	else
		w = snprintf(buf, len, "%u.%.*s~%016llx", jobid, SHORT_PREFIX, node,
			     (unsigned long long)fnv1a64(node));
	if (w < 0 || (size_t)w >= len)
		return aeg_fail(AEG_ERANGE, "job directory name needs %d bytes, %zu given", w + 1, len);
	return 0;
}

int aeg_jobdir_path(char *buf, size_t len, const char *runtime_dir, uint32_t jobid, const char *node)
{
	const size_t sock = sizeof("/" AEG_JOB_SOCKET_FILE) - 1;
	char name[64];
	size_t dirlen = strlen(runtime_dir);
	int err, w;

	err = aeg_jobdir_name(name, sizeof(name), jobid, node);
	if (err)
		return err;
	if (dirlen + 1 + strlen(name) + sock > AEG_JOB_SOCKET_MAX - 1)
		return aeg_fail(AEG_ERANGE, "runtime_dir %s (%zu bytes) is too long: the agent's socket "
				"%s/%s/%s would not fit in the %d bytes of a Unix socket address; runtime_dir "
				"may have at most %zu bytes", runtime_dir, dirlen, runtime_dir, name,
				AEG_JOB_SOCKET_FILE, AEG_JOB_SOCKET_MAX - 1,
				(size_t)AEG_JOB_SOCKET_MAX - 1 - 1 - strlen(name) - sock);
	w = snprintf(buf, len, "%s/%s", runtime_dir, name);
	if (w < 0 || (size_t)w >= len)
		return aeg_fail(AEG_ERANGE, "job directory path needs %d bytes, %zu given", w + 1, len);
	return 0;
}

/* One open directory of the walk, and its name in its parent. */
struct level {
	DIR *dir;
	char name[NAME_MAX + 1];
};

struct walk {
	struct level lv[AEG_JOBDIR_REMOVE_FDS];
	int depth;              /* levels open; lv[0] is the top */
	int hoisted;            /* directories moved into the top since it was last read through */
	unsigned long seq;      /* next .aegaeon-deep-N to try */
	unsigned long removed;
	const char *top;
};

static int sys_fail(const struct walk *w, const char *what, const char *name)
{
	int e = errno;

	return aeg_fail(e == EACCES ? AEG_EACCES : e == EPERM ? AEG_EPERM : e == ENOMEM ? AEG_ENOMEM : AEG_EIO,
			"removing %s: %s '%s' %d levels down: %s", w->top, what, name, w->depth, strerror(e));
}

static int push(struct walk *w, int dfd, const char *name)
{
	struct level *l = &w->lv[w->depth];
	int fd;

	fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : sys_fail(w, "opening", name);
	l->dir = fdopendir(fd);
	if (l->dir == NULL) {
		close(fd);
		return sys_fail(w, "reading", name);
	}
	snprintf(l->name, sizeof(l->name), "%s", name);
	w->depth++;
	return 0;
}

/* A directory too deep to open now goes up into the top, under a name nobody has taken. */
static int hoist(struct walk *w, int dfd, const char *name)
{
	char up[40];

	for (;;) {
		snprintf(up, sizeof(up), ".aegaeon-deep-%lu", w->seq++);
		if (renameat2(dfd, name, dirfd(w->lv[0].dir), up, RENAME_NOREPLACE) == 0) {
			w->hoisted = 1;
			return 0;
		}
		if (errno == ENOENT)
			return 0;
		if (errno != EEXIST)
			return sys_fail(w, "moving up", name);
	}
}

/* The directory at the top of the stack was read through: close it and remove it from its parent. */
static int pop(struct walk *w, int parent_fd)
{
	struct level *l = &w->lv[--w->depth];
	int fd = w->depth > 0 ? dirfd(w->lv[w->depth - 1].dir) : parent_fd;

	closedir(l->dir);
	if (unlinkat(fd, l->name, AT_REMOVEDIR) == 0) {
		w->removed++;
		return 0;
	}
	if (errno == ENOENT)
		return 0;
	if (errno != ENOTEMPTY && errno != EEXIST)
		return sys_fail(w, "removing directory", l->name);
	/* Someone wrote into it meanwhile: read its parent again (the top is reopened). */
	if (w->depth > 0) {
		rewinddir(w->lv[w->depth - 1].dir);
		return 0;
	}
	return push(w, parent_fd, w->top);
}

/* One entry of the deepest open directory: a file is unlinked, a directory entered or moved up. */
static int entry(struct walk *w, const char *name)
{
	int fd = dirfd(w->lv[w->depth - 1].dir);

	if (unlinkat(fd, name, 0) == 0) {
		w->removed++;
		return 0;
	}
	if (errno == ENOENT)
		return 0;
	if (errno != EISDIR && errno != EPERM)
		return sys_fail(w, "removing", name);
	if (w->depth < AEG_JOBDIR_REMOVE_FDS)
		return push(w, fd, name);
	return hoist(w, fd, name);
}

static void walk_close(struct walk *w)
{
	while (w->depth > 0)
		closedir(w->lv[--w->depth].dir);
}

int aeg_jobdir_remove(int dfd, const char *name, uint64_t timeout_ms, unsigned long *removed)
{
	uint64_t deadline = aeg_now_ns() + timeout_ms * 1000000ull;
	struct walk *w;
	unsigned long steps = 0;
	int err;

	if (removed != NULL)
		*removed = 0;
	if (unlinkat(dfd, name, 0) == 0) {
		if (removed != NULL)
			*removed = 1;
		return 0;
	}
	if (errno == ENOENT)
		return 0;
	if (errno != EISDIR && errno != EPERM)
		return aeg_fail(errno == EACCES ? AEG_EACCES : AEG_EIO, "removing %s: %s", name, strerror(errno));
	w = calloc(1, sizeof(*w));
	if (w == NULL)
		return aeg_fail(AEG_ENOMEM, "removing %s: out of memory", name);
	w->top = name;
	err = push(w, dfd, name);
	while (err == 0 && w->depth > 0) {
		struct dirent *de;

		if (steps++ % 256 == 0 && aeg_now_ns() >= deadline) {
			err = aeg_fail(AEG_ETIMEDOUT, "removing %s: still not empty after %llu ms (%lu entries "
				       "removed; is something writing into it?)", name,
				       (unsigned long long)timeout_ms, w->removed);
			break;
		}
		errno = 0;
		de = readdir(w->lv[w->depth - 1].dir);
		if (de == NULL && errno != 0) {
			err = sys_fail(w, "reading", w->lv[w->depth - 1].name);
		} else if (de == NULL && w->depth == 1 && w->hoisted) {
			w->hoisted = 0;
			rewinddir(w->lv[0].dir);
		} else if (de == NULL) {
			err = pop(w, dfd);
		} else if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
			err = entry(w, de->d_name);
		}
	}
	walk_close(w);
	if (removed != NULL)
		*removed = w->removed;
	free(w);
	return err;
}

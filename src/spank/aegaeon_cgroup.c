/*
 * Putting a process where another one is in every cgroup hierarchy (v1 and
 * v2 alike): the extern step's own process shows where Slurm keeps the job,
 * whatever its cgroup plugin, version and layout.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "aegaeon_spank.h"

#define MAX_HIERARCHIES 32

/* One line of /proc/PID/cgroup: "ID:CONTROLLERS:PATH" (v2: "0::PATH"). */
struct cg_line {
	char id[16];
	char ctrls[256];
	char path[PATH_MAX];
};

static int read_file(const char *path, char *buf, size_t len)
{
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	return 0;
}

static int read_cgroups(pid_t pid, struct cg_line *lines, int max)
{
	char path[64], *buf, *line, *save = NULL;
	int n = 0;

	buf = malloc(65536);
	if (buf == NULL)
		return -1;
	snprintf(path, sizeof(path), "/proc/%d/cgroup", (int)pid);
	if (read_file(path, buf, 65536) < 0) {
		free(buf);
		return -1;
	}
	for (line = strtok_r(buf, "\n", &save); line != NULL && n < max; line = strtok_r(NULL, "\n", &save)) {
		char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;

		if (c2 == NULL || (size_t)(c1 - line) >= sizeof(lines[n].id) ||
		    (size_t)(c2 - c1 - 1) >= sizeof(lines[n].ctrls) || strlen(c2 + 1) >= sizeof(lines[n].path))
			continue;
		snprintf(lines[n].id, sizeof(lines[n].id), "%.*s", (int)(c1 - line), line);
		snprintf(lines[n].ctrls, sizeof(lines[n].ctrls), "%.*s", (int)(c2 - c1 - 1), c1 + 1);
		snprintf(lines[n].path, sizeof(lines[n].path), "%s", c2 + 1);
		n++;
	}
	free(buf);
	return n;
}

/* mountinfo escapes space, tab, newline and backslash as \ooo. */
static void unescape(char *s)
{
	char *o = s;

	for (; *s != '\0'; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*o++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*o++ = *s;
		}
	}
	*o = '\0';
}

/* Every controller of @ctrls ("cpu,cpuacct", "name=systemd") is among the mount's options. */
static int has_ctrls(const char *opts, const char *ctrls)
{
	char want[256], *c, *save = NULL;

	snprintf(want, sizeof(want), "%s", ctrls);
	for (c = strtok_r(want, ",", &save); c != NULL; c = strtok_r(NULL, ",", &save)) {
		size_t len = strlen(c);
		const char *p = opts;
		int found = 0;

		while (!found && (p = strstr(p, c)) != NULL) {
			found = (p == opts || p[-1] == ',') && (p[len] == ',' || p[len] == '\0');
			p += len;
		}
		if (!found)
			return 0;
	}
	return 1;
}

/*
 * The directory of @l's cgroup: the hierarchy's mount point (cgroup2 for
 * id 0, else the cgroup mount holding its controllers) whose root is a
 * prefix of the path, joined with the rest of the path.
 */
static int cgroup_dir(const struct cg_line *l, char *dir, size_t len)
{
	char line[4096];
	int v2 = strcmp(l->id, "0") == 0, found = -1;
	FILE *f = fopen("/proc/self/mountinfo", "re");

	if (f == NULL)
		return -1;
	while (found < 0 && fgets(line, sizeof(line), f) != NULL) {
		char root[PATH_MAX], mnt[PATH_MAX], type[64], opts[1024], *sep = strstr(line, " - ");
		size_t rlen;

		if (sep == NULL || sscanf(line, "%*s %*s %*s %4095s %4095s", root, mnt) != 2 ||
		    sscanf(sep + 3, "%63s %*s %1023s", type, opts) != 2)
			continue;
		unescape(root);
		unescape(mnt);
		if (v2 ? strcmp(type, "cgroup2") != 0 : strcmp(type, "cgroup") != 0 || !has_ctrls(opts, l->ctrls))
			continue;
		rlen = strcmp(root, "/") == 0 ? 0 : strlen(root);
		if (strncmp(l->path, root, rlen) != 0 || (l->path[rlen] != '/' && l->path[rlen] != '\0'))
			continue;
		found = snprintf(dir, len, "%s%s", mnt, l->path + rlen) < (int)len ? 0 : -1;
	}
	fclose(f);
	return found;
}

static const struct cg_line *line_of(const struct cg_line *lines, int n, const char *id)
{
	for (int i = 0; i < n; i++)
		if (strcmp(lines[i].id, id) == 0)
			return &lines[i];
	return NULL;
}

static int move_to(const struct cg_line *l, pid_t pid, char *err, size_t errlen)
{
	char dir[PATH_MAX], file[PATH_MAX + 16], num[24];
	int fd, len, rc = 0;

	if (cgroup_dir(l, dir, sizeof(dir)) < 0) {
		snprintf(err, errlen, "no mount of cgroup hierarchy %s (%s) holds %s", l->id,
			 l->ctrls[0] ? l->ctrls : "cgroup2", l->path);
		return -1;
	}
	snprintf(file, sizeof(file), "%s/cgroup.procs", dir);
	len = snprintf(num, sizeof(num), "%d\n", (int)pid);
	fd = open(file, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, num, (size_t)len) != len) {
		snprintf(err, errlen, "writing %d to %s: %s", (int)pid, file, strerror(errno));
		rc = -1;
	}
	if (fd >= 0)
		close(fd);
	return rc;
}

int aeg_spank_cgroup_join(pid_t pid, pid_t ref, char *what, size_t len)
{
	struct cg_line *mine, *theirs;
	char desc[1024] = "";
	int n, m, moved = 0, o = 0;

	mine = calloc(2 * MAX_HIERARCHIES, sizeof(*mine));
	if (mine == NULL) {
		snprintf(what, len, "out of memory");
		return -1;
	}
	theirs = mine + MAX_HIERARCHIES;
	n = read_cgroups(ref, theirs, MAX_HIERARCHIES);
	m = read_cgroups(pid, mine, MAX_HIERARCHIES);
	if (n <= 0 || m <= 0) {
		snprintf(what, len, "reading /proc/%d/cgroup: %s", (int)(n <= 0 ? ref : pid), strerror(errno));
		moved = -1;
	}
	for (int i = 0; moved >= 0 && i < n; i++) {
		const struct cg_line *cur = line_of(mine, m, theirs[i].id);
		int w;

		if (cur != NULL && strcmp(cur->path, theirs[i].path) == 0)
			continue;
		if (move_to(&theirs[i], pid, what, len) < 0) {
			moved = -1;
			break;
		}
		moved++;
		/* What it joined, for the log: "memory:/slurm/uid_1/job_2/step_extern ...". */
		w = snprintf(desc + o, sizeof(desc) - (size_t)o, "%s%s:%s", o ? " " : "",
			     theirs[i].ctrls[0] ? theirs[i].ctrls : "cgroup2", theirs[i].path);
		if (w > 0 && (size_t)w < sizeof(desc) - (size_t)o)
			o += w;
	}
	if (moved >= 0)
		snprintf(what, len, "%s", desc);
	free(mine);
	return moved;
}

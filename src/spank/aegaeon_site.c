/* Plugstack arguments (config=FILE), the site configuration, loaded once per process in every context, and its runtime_dir. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/error.h>

#include "aegaeon_spank.h"

struct aeg_spank_site aeg_site;

/*
 * A broken site configuration must not stop jobs that do not use aegaeon, so
 * it is remembered here and reported only to jobs that ask for aegaeon.
 */
void aeg_spank_site_load(int ac, char **av)
{
	const char *path = NULL;
	int rc;

	if (aeg_site.loaded)
		return;
	memset(&aeg_site, 0, sizeof(aeg_site));
	aeg_site.loaded = 1;
	aeg_config_defaults(&aeg_site.cfg);
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "config=", 7) == 0) {
			path = av[i] + 7;
		} else {
			snprintf(aeg_site.error, sizeof(aeg_site.error),
				 "plugstack.conf: unknown argument '%.200s' for aegaeon.so (known: config=FILE)",
				 av[i]);
			slurm_error("aegaeon: %s", aeg_site.error);
			return;
		}
	}
	if (path != NULL && (path[0] != '/' || strlen(path) >= sizeof(aeg_site.config_path))) {
		snprintf(aeg_site.error, sizeof(aeg_site.error),
			 "plugstack.conf: config=%.200s is not an absolute path", path);
		slurm_error("aegaeon: %s", aeg_site.error);
		return;
	}
	/* Never $AEGAEON_CONFIG: in srun that is the user's to set. */
	if (path == NULL && access(AEG_CONFIG_DEFAULT_PATH, F_OK) < 0) {
		aeg_site.ok = 1;
		return;
	}
	if (path == NULL)
		path = AEG_CONFIG_DEFAULT_PATH;
	else
		snprintf(aeg_site.config_path, sizeof(aeg_site.config_path), "%s", path);
	rc = aeg_config_load(&aeg_site.cfg, path);
	if (rc < 0) {
		snprintf(aeg_site.error, sizeof(aeg_site.error), "site configuration %s: %s",
			 path, aeg_error_detail());
		slurm_error("aegaeon: %s", aeg_site.error);
		return;
	}
	aeg_site.ok = 1;
}

int aeg_spank_runtime_dir(int create)
{
	char parent[PATH_MAX], *slash, *base;
	struct stat st;
	int pfd, fd;

	snprintf(parent, sizeof(parent), "%s", aeg_site.cfg.runtime_dir);
	slash = strrchr(parent, '/');
	if (parent[0] != '/' || slash == NULL || slash[1] == '\0') {
		slurm_error("aegaeon: runtime_dir %s must be an absolute path below /", aeg_site.cfg.runtime_dir);
		return -1;
	}
	base = slash + 1;
	*slash = '\0';
	pfd = open(parent[0] ? parent : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (pfd < 0) {
		slurm_error("aegaeon: opening %s (parent of runtime_dir): %m", parent[0] ? parent : "/");
		return -1;
	}
	/* The parent may be world-writable only if sticky (/tmp): others cannot then replace our entry. */
	if (fstat(pfd, &st) < 0 || st.st_uid != 0 ||
	    ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))) {
		slurm_error("aegaeon: %s (parent of runtime_dir) must be owned by root and not writable by others",
			    parent[0] ? parent : "/");
		close(pfd);
		return -1;
	}
	if (create && mkdirat(pfd, base, 0755) < 0 && errno != EEXIST) {
		slurm_error("aegaeon: creating runtime_dir %s: %m", aeg_site.cfg.runtime_dir);
		close(pfd);
		return -1;
	}
	fd = openat(pfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	close(pfd);
	if (fd < 0) {
		slurm_error("aegaeon: opening runtime_dir %s (a symbolic link is refused): %m",
			    aeg_site.cfg.runtime_dir);
		return -1;
	}
	if (fstat(fd, &st) < 0 || st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH))) {
		slurm_error("aegaeon: runtime_dir %s must be owned by root and writable by root only",
			    aeg_site.cfg.runtime_dir);
		close(fd);
		return -1;
	}
	return fd;
}

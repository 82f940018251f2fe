/* Plugstack arguments (config=FILE) and the site configuration, loaded once per process in every context. */
#include "config.h"

#include <stdio.h>
#include <string.h>
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

/* --aegaeon-* options: registration in every context, and their checks in srun/sbatch/salloc. */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/error.h>

#include "aegaeon_spank.h"

struct aeg_spank_opts aeg_opts;

enum { OPT_SLAB, OPT_PINNED, OPT_PREFETCH, OPT_DEVICE };

/*
 * The callbacks run in the client (remote == 0), where a -1 makes
 * srun/sbatch/salloc exit non-zero before any job exists, and again in
 * slurmstepd (remote == 1), where the values were checked already and only
 * matter as "this step asked for aegaeon".
 */
static int reject(void)
{
	slurm_error("%s", aeg_error_detail());
	return -1;
}

static int site_usable(void)
{
	if (aeg_site.ok)
		return 1;
	slurm_error("aegaeon: %s; aegaeon options cannot be used until the administrator fixes it",
		    aeg_site.error);
	return 0;
}

static int slab_cb(int val, const char *optarg, int remote)
{
	struct aeg_size_spec s;

	aeg_opts.any = 1;
	if (remote)
		return 0;
	if (!site_usable())
		return -1;
	if (aeg_jobopt_parse_slab(optarg, &s) < 0 || aeg_jobopt_check_slab(&s, &aeg_site.cfg) < 0)
		return reject();
	aeg_opts.slab = s;
	aeg_opts.has_slab = 1;
	return 0;
}

static int pinned_cb(int val, const char *optarg, int remote)
{
	struct aeg_jobopt_pinned p;

	aeg_opts.any = 1;
	if (remote)
		return 0;
	if (!site_usable())
		return -1;
	if (aeg_jobopt_parse_pinned(optarg, &p) < 0 || aeg_jobopt_check_pinned(&p, &aeg_site.cfg) < 0)
		return reject();
	aeg_opts.pinned = p;
	aeg_opts.has_pinned = 1;
	return 0;
}

static int prefetch_cb(int val, const char *optarg, int remote)
{
	char cwd[PATH_MAX], *paths = NULL;

	aeg_opts.any = 1;
	if (remote)
		return 0;
	if (!site_usable())
		return -1;
	if (getcwd(cwd, sizeof(cwd)) == NULL) {
		slurm_error("--aegaeon-prefetch: cannot tell the current directory to resolve relative paths: %m");
		return -1;
	}
	/* The client runs as the user: what it cannot read, the agent cannot either. */
	if (aeg_jobopt_parse_prefetch(optarg, cwd, &paths, NULL) < 0 || aeg_jobopt_check_files(paths) < 0) {
		free(paths);
		return reject();
	}
	free(aeg_opts.prefetch);
	aeg_opts.prefetch = paths;
	return 0;
}

static int device_cb(int val, const char *optarg, int remote)
{
	enum aeg_device_kind kind;

	aeg_opts.any = 1;
	if (remote)
		return 0;
	if (!site_usable())
		return -1;
	if (aeg_jobopt_parse_device(optarg, &kind) < 0 || aeg_jobopt_check_device(kind, &aeg_site.cfg) < 0)
		return reject();
	aeg_opts.device = kind;
	aeg_opts.has_device = 1;
	return 0;
}

static struct spank_option options[] = {
	{ "aegaeon-slab", "SIZE|PCT%",
	  "[aegaeon] GPU memory slab reserved for the job on each of its GPUs, e.g. 40GiB or 90%",
	  1, OPT_SLAB, slab_cb },
	{ "aegaeon-pinned", "SIZE[:BUFFER]",
	  "[aegaeon] pinned host memory pool per node near the GPUs, in BUFFER pieces, e.g. 16GiB:32MiB",
	  1, OPT_PINNED, pinned_cb },
	{ "aegaeon-prefetch", "PATH[,PATH...]",
	  "[aegaeon] files the job's agent starts loading into the slab at job start",
	  1, OPT_PREFETCH, prefetch_cb },
	{ "aegaeon-device", "cuda|host",
	  "[aegaeon] device backend, where the site allows choosing it",
	  1, OPT_DEVICE, device_cb },
};

/* sbatch and salloc honour only registered options, not a spank_options table. */
int aeg_spank_options_register(spank_t sp)
{
	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
		spank_err_t err = spank_option_register(sp, &options[i]);

		if (err != ESPANK_SUCCESS) {
			slurm_error("aegaeon: registering --%s: %s", options[i].name, spank_strerror(err));
			return -1;
		}
	}
	return 0;
}

/*
 * The prolog sees option values as the user typed them, without the
 * client's working directory; the absolute prefetch list goes to it through
 * the job control environment.
 */
int aeg_spank_client_post_opt(spank_t sp)
{
	spank_err_t err;

	if (aeg_opts.prefetch == NULL)
		return 0;
	if (aeg_jobopt_check_prefetch_slab(1, aeg_opts.has_slab, &aeg_site.cfg) < 0)
		return reject();
	err = spank_job_control_setenv(sp, AEG_SPANK_PREFETCH_VAR, aeg_opts.prefetch, 1);
	if (err != ESPANK_SUCCESS) {
		slurm_error("aegaeon: --aegaeon-prefetch: cannot pass the file list to the job: %s",
			    spank_strerror(err));
		return -1;
	}
	return 0;
}

void aeg_spank_opts_free(void)
{
	free(aeg_opts.prefetch);
	memset(&aeg_opts, 0, sizeof(aeg_opts));
}

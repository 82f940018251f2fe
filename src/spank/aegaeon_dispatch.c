/* SPANK entry points of aegaeon.so: each only dispatches on the context it runs in. */
#include "config.h"

#include <slurm/spank.h>

#include "aegaeon_spank.h"

SPANK_PLUGIN(aegaeon, 1)

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	aeg_spank_site_load(ac, av);
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
	case S_CTX_REMOTE:
		return aeg_spank_options_register(sp);
	default:
		return 0;
	}
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return aeg_spank_client_post_opt(sp);
	default:
		return 0;
	}
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	aeg_spank_site_load(ac, av);
	switch (spank_context()) {
	case S_CTX_JOB_SCRIPT:
		return aeg_spank_prolog(sp);
	default:
		return 0;
	}
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	switch (spank_context()) {
	case S_CTX_REMOTE:
		return aeg_spank_task_init(sp);
	default:
		return 0;
	}
}

int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
	switch (spank_context()) {
	case S_CTX_REMOTE:
		return aeg_spank_task_post_fork(sp);
	default:
		return 0;
	}
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	aeg_spank_site_load(ac, av);
	switch (spank_context()) {
	case S_CTX_JOB_SCRIPT:
		return aeg_spank_epilog(sp);
	default:
		return 0;
	}
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	aeg_spank_opts_free();
	return 0;
}

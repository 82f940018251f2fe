/* The SPANK plugin's shared state and per-context entry points (src/spank/). */
#ifndef AEGAEON_SPANK_H
#define AEGAEON_SPANK_H

#include <limits.h>
#include <stdint.h>
#include <sys/types.h>

#include <slurm/spank.h>

#include <aegaeon/config.h>
#include <aegaeon/size.h>

#include "jobopt.h"

/* Option names as Slurm passes them to the prolog: SPANK__SLURM_SPANK_OPTION_<plugin>_<option>. */
#define AEG_SPANK_OPTENV(opt) "SPANK__SLURM_SPANK_OPTION_aegaeon_aegaeon_" opt
/* Absolute prefetch list the client hands to the prolog (job control env, gets a SPANK_ prefix). */
#define AEG_SPANK_PREFETCH_VAR "AEGAEON_PREFETCH"

/* The site: plugstack arguments and the configuration file they name. */
struct aeg_spank_site {
	struct aeg_config cfg;
	char config_path[PATH_MAX];     /* "" when no config= argument */
	int loaded;
	int ok;                         /* 0: error holds why the site is unusable */
	char error[1024];
};

extern struct aeg_spank_site aeg_site;

/* What the job (or step) asked for with --aegaeon-* options. */
struct aeg_spank_opts {
	int any;                        /* some --aegaeon-* option was given */
	int has_slab;
	struct aeg_size_spec slab;
	int has_pinned;
	struct aeg_jobopt_pinned pinned;
	char *prefetch;                 /* absolute, comma-joined; NULL: none */
	int has_device;
	enum aeg_device_kind device;
};

extern struct aeg_spank_opts aeg_opts;

/*
 * aegaeon_site.c: read plugstack arguments and load the site configuration,
 * once per process (slurm_spank_init does not run before job_prolog/epilog).
 */
void aeg_spank_site_load(int ac, char **av);

/* aegaeon_client.c: options (every context) and client-side checks. */
int aeg_spank_options_register(spank_t sp);
int aeg_spank_client_post_opt(spank_t sp);
void aeg_spank_opts_free(void);

/* aegaeon_slurmd.c: job_prolog and job_epilog, as root. */
int aeg_spank_prolog(spank_t sp);
int aeg_spank_epilog(spank_t sp);

/* aegaeon_stepd.c: task_init, as the job user. */
int aeg_spank_task_init(spank_t sp);

/* aegaeon_extern.c: task_post_fork (root); in the extern step, the agent joins the job's cgroups. */
int aeg_spank_task_post_fork(spank_t sp);

/*
 * aegaeon_procs.c: processes as root sees them. A held process keeps a pidfd
 * (or, on kernels without, its start time, checked again before each signal),
 * so a signal never reaches a process that took its pid over.
 */
struct aeg_spank_proc {
	pid_t pid;
	int fd;                         /* pidfd; -1 without */
	uint64_t start;                 /* start time, clock ticks since boot */
};

/*
 * The job's agents: processes of @uid with "--runtime-dir @dir" on their
 * command line, the pid in agent.pid (in @dfd, -1: none) first; at most @max
 * held in @agents; returns how many. Release them with aeg_spank_procs_release.
 */
int aeg_spank_agents_find(struct aeg_spank_proc *agents, int max, uid_t uid, const char *dir, int dfd);
void aeg_spank_procs_release(struct aeg_spank_proc *p, int n);
/* Signal a held process; -1 with ESRCH once it has gone. */
int aeg_spank_proc_signal(const struct aeg_spank_proc *p, int sig);
int aeg_spank_proc_gone(const struct aeg_spank_proc *p);
/* Wait up to @timeout_ms for them all to exit; how many are left. */
int aeg_spank_procs_wait(const struct aeg_spank_proc *p, int n, long timeout_ms);
/*
 * SIGKILL every process below @root until none is left, for at most
 * @timeout_ms (then -1, errno EAGAIN); *@killed counts them.
 */
int aeg_spank_kill_tree(const struct aeg_spank_proc *root, long timeout_ms, unsigned *killed);
/*
 * Hold every process below @root now in a new array *@below (free() it after
 * aeg_spank_procs_release); returns how many, or -1.
 */
int aeg_spank_tree_hold(const struct aeg_spank_proc *root, struct aeg_spank_proc **below);
/* The one child of @parent, or -1 when it has none or several. */
pid_t aeg_spank_only_child(pid_t parent);

/*
 * aegaeon_cgroup.c: move @pid into the cgroups @ref is in, in every
 * hierarchy where they differ. Returns how many it changed, with what it
 * joined in @what ("memory:/slurm/uid_1/job_2/step_extern ..."), or -1 with
 * the reason in @what.
 */
int aeg_spank_cgroup_join(pid_t pid, pid_t ref, char *what, size_t len);

#endif

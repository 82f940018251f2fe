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

/*
 * aeg_spank_runtime_dir - open runtime_dir (as root), with @create making
 * its last component (0755) if missing. It must be a real directory owned by
 * root that nobody else may write, in a parent only root may change (or a
 * sticky one): the job directories and agent records in it are then safe
 * from renames and links by users. The descriptor, or -1 (logged).
 */
int aeg_spank_runtime_dir(int create);

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
 * How root knows a job's agent: the process the prolog started, recorded in
 * runtime_dir (a directory only root writes) with its start time; and, for
 * agents it did not record, processes of the job user with "--runtime-dir
 * DIR" on their command line. Nothing the user can write (agent.pid, the job
 * directory) is trusted to name it.
 */
struct aeg_spank_agent_key {
	uid_t uid;
	const char *dir;                /* the job directory; NULL: any whose last component is @name */
	const char *name;               /* the job directory's name (aeg_jobdir_name) */
	pid_t pid;                      /* recorded by the prolog (0: none) */
	uint64_t start;                 /* its start time, clock ticks since boot */
};

#define AEG_SPANK_FOUND_RECORDED 1u     /* agents[0] is the recorded agent */
#define AEG_SPANK_FOUND_MORE 2u         /* more processes matched than @max */

/*
 * The job's agents, held in @agents (at most @max): the recorded one first,
 * then those found by command line; returns how many, with *@found telling
 * AEG_SPANK_FOUND_* bits. Release them with aeg_spank_procs_release.
 */
int aeg_spank_agents_find(struct aeg_spank_proc *agents, int max, const struct aeg_spank_agent_key *key,
			  unsigned *found);
/*
 * The record of the agent the prolog started for the job directory @name, a
 * root-owned file in runtime_dir (@rfd): written (0, or -1 with errno),
 * read into @key's pid and start (1; 0 when there is none; -1 when it
 * cannot be read or is not root's), and removed (0, or -1 with errno).
 */
int aeg_spank_agent_record(int rfd, const char *name, const struct aeg_spank_proc *agent);
int aeg_spank_agent_recorded(int rfd, const char *name, struct aeg_spank_agent_key *key);
int aeg_spank_agent_record_remove(int rfd, const char *name);
/* Hold @pid if it is the job's agent by command line (as aeg_spank_agents_find); 0, or -1. */
int aeg_spank_agent_hold(struct aeg_spank_proc *agent, pid_t pid, const struct aeg_spank_agent_key *key);
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

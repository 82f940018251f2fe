/* aegaeond: the per-job node agent; parses its options and runs the library's agent. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>
#include <aegaeon/jobrec.h>

#include "agent.h"
#include "internal.h"
#include "jobopt.h"

static const char usage_text[] =
	"Usage: aegaeond --job JOBID --runtime-dir JOBDIR --gpus LIST --slab SPEC\n"
	"                [--pinned SIZE[:BUFFER]] [--prefetch PATH[,PATH...]]\n"
	"                [--device cuda|host] [--config FILE] [--foreground]\n"
	"       aegaeond --help | --version\n"
	"\n"
	"The per-job aegaeon agent, started by the SPANK plugin as the job user.\n"
	"\n"
	"  --job JOBID          the Slurm job id (for logs)\n"
	"  --runtime-dir JOBDIR the job's 0700 directory: agent.sock, agent.pid, ready/error\n"
	"  --gpus LIST          GPU ordinals as this process sees them (\"0,1\"; \"none\")\n"
	"  --slab SPEC          slab per GPU: a size (\"40GiB\") or a share of its memory (\"90%\")\n"
	"  --pinned SIZE[:BUFFER]  pinned host pool (\"16GiB:32MiB\"); none when absent or 0\n"
	"  --prefetch PATHS     absolute paths loaded into the first GPU's slab at start\n"
	"  --device KIND        cuda or host (default: the config's device)\n"
	"  --config FILE        site configuration (default $AEGAEON_CONFIG, else "
	AEG_CONFIG_DEFAULT_PATH ")\n"
	"  --foreground         log to stderr instead of syslog\n"
	"  --help, --version\n";

static int usage_error(const char *dir, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Bad options still leave an error record, so the plugin need not time out. */
static int usage_error(const char *dir, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "aegaeond: %s\n%s", msg, usage_text);
	/* Only into a runtime directory the agent would run in: never into one named by mistake. */
	if (dir && dir[0] == '/' && aeg_agent_write_error(dir, msg))
		fprintf(stderr, "aegaeond: no error record written: %s\n", aeg_error_detail());
	return 2;
}

/*
 * --pinned and --prefetch take what the plugin forwards of --aegaeon-pinned
 * and --aegaeon-prefetch, by the same rules (jobopt.c); the pool's buffer
 * is the site's unless one is given.
 */
static int parse_pinned(const char *text, uint64_t default_buffer, uint64_t *bytes, uint64_t *buffer)
{
	struct aeg_jobopt_pinned p;
	int err = aeg_jobopt_parse_pinned(text, &p);

	if (err)
		return err;
	*bytes = p.bytes;
	*buffer = p.buffer_bytes != 0 ? p.buffer_bytes : default_buffer;
	return 0;
}

/* Absolute paths only (the plugin made them so), split at the commas of *@joined (freed by the caller). */
static int parse_prefetch(const char *text, char **joined, char ***paths, int *count)
{
	size_t n = 0;
	char **v, *p;
	int err = aeg_jobopt_parse_prefetch(text, NULL, joined, &n);

	if (err)
		return err;
	v = calloc(n, sizeof(*v));
	if (v == NULL)
		return aeg_fail(AEG_ENOMEM, "out of memory");
	p = *joined;
	for (size_t i = 0; i < n; i++) {
		v[i] = p;
		p = strchr(p, ',');
		if (p != NULL)
			*p++ = '\0';
	}
	*paths = v;
	*count = (int)n;
	return 0;
}

static int valid_job_id(const char *id)
{
	size_t n = strlen(id);

	if (n == 0 || n >= AEG_AGENT_JOB_ID_MAX)
		return 0;
	return strspn(id, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_.-+") == n;
}

/* The command line, as given. */
struct args {
	const char *job, *dir, *gpus, *slab, *pinned, *prefetch, *device, *config;
	int foreground;
};

/* Long options only; their values are not characters, so getopt's optopt tells a short option apart. */
enum { OPT_JOB = 256, OPT_DIR, OPT_GPUS, OPT_SLAB, OPT_PINNED, OPT_PREFETCH, OPT_DEVICE, OPT_CONFIG,
       OPT_FOREGROUND, OPT_HELP, OPT_VERSION };

static const struct option options[] = {
	{ "job", required_argument, NULL, OPT_JOB },
	{ "runtime-dir", required_argument, NULL, OPT_DIR },
	{ "gpus", required_argument, NULL, OPT_GPUS },
	{ "slab", required_argument, NULL, OPT_SLAB },
	{ "pinned", required_argument, NULL, OPT_PINNED },
	{ "prefetch", required_argument, NULL, OPT_PREFETCH },
	{ "device", required_argument, NULL, OPT_DEVICE },
	{ "config", required_argument, NULL, OPT_CONFIG },
	{ "foreground", no_argument, NULL, OPT_FOREGROUND },
	{ "help", no_argument, NULL, OPT_HELP },
	{ "version", no_argument, NULL, OPT_VERSION },
	{ NULL, 0, NULL, 0 },
};

/*
 * What getopt_long refused (@opt ':' or '?'), said by optopt alone: argv is
 * no guide, as the option may be a letter inside a group ("-xy").
 */
static int bad_option(const struct args *a, int opt, const char *arg)
{
	const char *name = NULL;

	for (const struct option *o = options; o->name; o++)
		if (o->val == optopt)
			name = o->name;
	if (name && opt == ':')
		return usage_error(a->dir, "option '--%s' needs a value", name);
	if (name)
		return usage_error(a->dir, "option '--%s' takes no value", name);
	if (optopt > 0 && optopt < 256)
		return usage_error(a->dir, "unknown option '-%c' (aegaeond has long options only)", optopt);
	return usage_error(a->dir, "unknown option '%.*s'", (int)strcspn(arg, "="), arg);
}

/* Reads the command line into @a: -1 to go on, else main's exit status (--help, --version, a usage error). */
static int parse_args(int argc, char **argv, struct args *a)
{
	int opt;

	opterr = 0;
	while ((opt = getopt_long(argc, argv, ":", options, NULL)) != -1) {
		switch (opt) {
		case OPT_JOB: a->job = optarg; break;
		case OPT_DIR: a->dir = optarg; break;
		case OPT_GPUS: a->gpus = optarg; break;
		case OPT_SLAB: a->slab = optarg; break;
		case OPT_PINNED: a->pinned = optarg; break;
		case OPT_PREFETCH: a->prefetch = optarg; break;
		case OPT_DEVICE: a->device = optarg; break;
		case OPT_CONFIG: a->config = optarg; break;
		case OPT_FOREGROUND: a->foreground = 1; break;
		case OPT_HELP:
			fputs(usage_text, stdout);
			return 0;
		case OPT_VERSION:
			printf("aegaeond %s\n", aeg_version());
			return 0;
		default:
			/* Scan on for --runtime-dir, so even this error reaches the plugin. */
			for (int i = optind; i < argc - 1 && a->dir == NULL; i++)
				if (strcmp(argv[i], "--runtime-dir") == 0)
					a->dir = argv[i + 1];
			/* An unknown long option is the one getopt_long stepped over. */
			return bad_option(a, opt, optind > 0 ? argv[optind - 1] : "");
		}
	}
	if (optind < argc)
		return usage_error(a->dir, "unexpected argument '%s'", argv[optind]);
	if (a->dir == NULL)
		return usage_error(NULL, "--runtime-dir is required");
	if (a->dir[0] != '/')
		return usage_error(NULL, "--runtime-dir '%s' is not an absolute path", a->dir);
	if (a->job == NULL)
		return usage_error(a->dir, "--job is required");
	if (!valid_job_id(a->job))
		return usage_error(a->dir, "--job '%s': expected up to %d letters, digits, '_', '.', '-' or '+'",
				   a->job, AEG_AGENT_JOB_ID_MAX - 1);
	return -1;
}

/*
 * The agent's configuration from the site's and the command line's (logging
 * set up on the way): 0, or main's exit status after a usage error.
 * *@prefetch_paths holds the strings of acfg->prefetch.
 */
static int make_config(const struct args *a, struct aeg_agent_config *acfg, char **prefetch_paths)
{
	const char *dir = a->dir;
	struct aeg_config cfg;

	snprintf(acfg->job_id, sizeof(acfg->job_id), "%s", a->job);
	if (snprintf(acfg->runtime_dir, sizeof(acfg->runtime_dir), "%s", dir) >= (int)sizeof(acfg->runtime_dir))
		return usage_error(NULL, "--runtime-dir is too long");
	if (aeg_config_load(&cfg, a->config))
		return usage_error(dir, "%s", aeg_error_detail());
	if (!aeg_log_level_from_env())
		aeg_log_set_level(cfg.log_level);
	if (!a->foreground)
		aeg_log_to_syslog("aegaeond");

	acfg->device = cfg.device;
	if (a->device && aeg_device_kind_parse(a->device, &acfg->device))
		return usage_error(dir, "--device: %s", aeg_error_detail());
	if (aeg_job_gpus_parse(a->gpus ? a->gpus : "", acfg->gpus, &acfg->gpu_count))
		return usage_error(dir, "--gpus: %s", aeg_error_detail());
	if (acfg->gpu_count > 0 && a->slab == NULL)
		return usage_error(dir, "--slab is required with GPUs");
	if (a->slab && aeg_size_spec_parse(a->slab, &acfg->slab))
		return usage_error(dir, "--slab: %s", aeg_error_detail());
	if (a->pinned && parse_pinned(a->pinned, cfg.pinned_buffer_bytes, &acfg->pinned_bytes,
				      &acfg->pinned_buffer_bytes))
		return usage_error(dir, "--pinned: %s", aeg_error_detail());
	if (a->prefetch && parse_prefetch(a->prefetch, prefetch_paths, &acfg->prefetch, &acfg->prefetch_count))
		return usage_error(dir, "--prefetch: %s", aeg_error_detail());
	acfg->prefetch_chunk_bytes = cfg.prefetch_chunk_bytes;
	acfg->prefetch_threads = cfg.prefetch_threads;
	acfg->model_cache = cfg.model_cache;
	acfg->max_loads = (uint32_t)cfg.max_loads;
	acfg->hello_timeout_ms = cfg.hello_timeout_ms;
	acfg->slab_max = cfg.slab_max;
	acfg->pinned_max_bytes = cfg.pinned_max_bytes;
	return 0;
}

/* SIGTERM (the epilog), SIGINT and SIGHUP through a signalfd to the agent's loop; -1 when that fails. */
static int take_signals(const char *dir)
{
	sigset_t sigs;
	int sfd;

	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	signal(SIGPIPE, SIG_IGN);
	/*
	 * The agent starts no process of its own. Whatever a debugger makes it
	 * start stays below it, orphans too, where the epilog finds and kills it.
	 */
	if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
		aeg_warn("prctl(PR_SET_CHILD_SUBREAPER): %s", strerror(errno));
	if (sigprocmask(SIG_BLOCK, &sigs, NULL) < 0 ||
	    (sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
		aeg_error("signalfd: %s", strerror(errno));
		aeg_agent_write_error(dir, "aegaeond: cannot take signals");
		return -1;
	}
	return sfd;
}

int main(int argc, char **argv)
{
	struct args a = { 0 };
	char *prefetch_paths = NULL;
	struct aeg_agent_config *acfg;
	int sfd, err, devnull, rc;

	umask(077);
	/* The agent reads nothing from its caller's terminal. */
	devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (devnull >= 0) {
		dup2(devnull, STDIN_FILENO);
		if (devnull != STDIN_FILENO)
			close(devnull);
	}
	rc = parse_args(argc, argv, &a);
	if (rc >= 0)
		return rc;
	acfg = calloc(1, sizeof(*acfg));
	if (acfg == NULL)
		return 1;
	rc = make_config(&a, acfg, &prefetch_paths);
	if (rc == 0) {
		rc = 1;
		sfd = take_signals(a.dir);
		if (sfd >= 0) {
			err = aeg_agent_run(acfg, sfd);
			if (err)
				aeg_error("job %s: %s", a.job, aeg_error_detail());
			close(sfd);
			rc = err ? 1 : 0;
		}
	}
	free(acfg->prefetch);
	free(prefetch_paths);
	free(acfg);
	return rc;
}

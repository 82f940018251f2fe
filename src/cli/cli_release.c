/* aegaeon-cli release: free loaded chunks in the job's agent, by slab id, by load or all of them. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"
#include "internal.h"

static const char release_usage[] =
	"Usage: aegaeon-cli release ID... [--gpu N] | --load LOAD_ID | --model PATH | --all\n"
	"Inside a job: free prefetched chunks in the node's agent: the blocks with these slab ids\n"
	"(in the slab of --gpu, default the first), every block of a load, or of a model (a file, or\n"
	"a directory or shard index: every file of it; each load is waited for if it still loads),\n"
	"or everything.\n";

struct release_args {
	int all, gpu;
	const char *model;
	uint64_t load_id;
	uint64_t *ids;
	size_t count;
};

/* Every block of load @id, or of model @path: after it has stopped loading. */
static int release_model(aeg_session_t *s, uint64_t id, const char *path)
{
	const char *what = id ? "release --load" : "release --model";
	const struct aeg_chunk *c;
	aeg_model_t *m = NULL;
	uint32_t n, files, blocks = 0;
	char shown[CLI_SHOWN_MAX];
	int err;

	err = id ? aeg_session_find_id(s, id, &m) : aeg_session_find(s, path, -1, &m);
	if (err)
		return cli_fail(err, what);
	c = aeg_model_chunks(m, &n);
	files = aeg_model_file_count(m);
	/* A tensor larger than a chunk is one block cut into several chunks. */
	for (uint32_t i = 0; i < n; i++)
		blocks += i == 0 || c[i].slab_id != c[i - 1].slab_id || c[i].file != c[i - 1].file;
	err = aeg_model_release(m);
	if (err)
		return cli_fail(err, what);
	if (id)
		printf("released load %" PRIu64 ": %u block%s\n", id, blocks, cli_s(blocks));
	else
		printf("released model %s: %u block%s in %u file%s\n", cli_shown(path, shown, sizeof(shown)), blocks,
		       cli_s(blocks), files, cli_s(files));
	return 0;
}

/* Blocks by slab id, in the slab of --gpu or the job's first. */
static int release_ids(aeg_session_t *s, const struct release_args *r)
{
	struct aeg_job_slab_desc d;
	uint32_t released = 0;
	int index = 0, gpu = r->gpu, err;

	if (gpu >= 0) {
		index = cli_job_slab_of(s, gpu);
		if (index < 0)
			return 1;
	} else if (aeg_job_slab_describe(aeg_session_job(s), 0, &d) != 0 || d.gpu < 0) {
		fprintf(stderr, "aegaeon-cli release: the job's first slab is not on a GPU this process sees: "
			"name the GPU with --gpu\n");
		return 1;
	} else {
		gpu = d.gpu;
	}
	err = aeg_session_release(s, gpu, r->ids, r->count, 0, &released);
	if (err)
		return cli_fail(err, "release");
	printf("released %u block%s from slab %d\n", released, cli_s(released), index);
	return 0;
}

static int parse(int argc, char **argv, struct release_args *r)
{
	static const struct option opts[] = {
		{ "all", no_argument, NULL, 'a' },
		{ "load", required_argument, NULL, 'l' },
		{ "model", required_argument, NULL, 'm' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
		switch (c) {
		case 'a':
			r->all = 1;
			break;
		case 'l':
			if (cli_parse_load_id(optarg, &r->load_id))
				return cli_usage_error("release", "--load '%s': expected a load id (1, 2, ...)", optarg);
			break;
		case 'm':
			r->model = optarg;
			break;
		case 'g':
			if (cli_parse_int(optarg, 0, 1023, &r->gpu))
				return cli_usage_error("release", "--gpu '%s': expected a GPU index", optarg);
			break;
		case 'h':
			fputs(release_usage, stdout);
			return -1;
		default:
			return cli_option_error("release", c, argv);
		}
	}
	r->count = (size_t)(argc - optind);
	if ((r->all != 0) + (r->load_id != 0) + (r->model != NULL) + (r->count != 0) != 1)
		return cli_usage_error("release", "expected slab ids, --load, --model or --all (one of them)");
	if ((r->all || r->load_id || r->model) && r->gpu >= 0)
		return cli_usage_error("release", "--gpu goes with slab ids only");
	r->ids = calloc(r->count ? r->count : 1, sizeof(*r->ids));
	if (r->ids == NULL)
		return cli_fail(AEG_ENOMEM, "release");
	for (size_t i = 0; i < r->count; i++) {
		const char *t = argv[optind + (int)i];
		char *end;

		errno = 0;
		r->ids[i] = strtoull(t, &end, 10);
		if (t[0] < '0' || t[0] > '9' || errno || *end)
			return cli_usage_error("release", "'%s' is not a slab id", t);
	}
	return 0;
}

int cli_release(int argc, char **argv)
{
	struct aeg_session_config cfg = { .mode = AEG_SESSION_JOB, .flags = AEG_SESSION_CONNECT_ONLY };
	struct release_args r = { .gpu = -1 };
	aeg_session_t *s = NULL;
	uint32_t released = 0;
	int rc, err;

	rc = parse(argc, argv, &r);
	if (rc == 0 && !cli_in_job()) {
		fprintf(stderr,
			"aegaeon-cli release: not in an aegaeon job (AEGAEON_SOCKET is unset): chunks that "
			"'aegaeon-cli prefetch' loads outside a job are freed when it exits, so nothing holds these\n");
		rc = 1;
	}
	if (rc == 0)
		rc = cli_session_open(&cfg, NULL, "release", &s);
	if (rc == 0 && r.all) {
		err = aeg_session_release_all(s, AEG_RELEASE_JOB, &released);
		rc = err ? cli_fail(err, "release --all") : 0;
		if (!err)
			printf("released %u block%s: every load of the job on this node\n", released, cli_s(released));
	} else if (rc == 0) {
		rc = r.load_id || r.model ? release_model(s, r.load_id, r.model) : release_ids(s, &r);
	}
	aeg_session_close(s);
	free(r.ids);
	return rc < 0 ? 0 : rc;
}

/* aegaeon-cli chunks: the loads the job's agent holds, or one load's chunks; --verify reads them back. */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"
#include "internal.h"

static const char chunks_usage[] =
	"Usage: aegaeon-cli chunks [FILE | --load ID] [--gpu N] [--json] [--verify [--timeout S]]\n"
	"Inside a job: the loads the node's agent holds, or the chunks of one: the newest whole\n"
	"load of FILE in the slab of --gpu, or without --gpu in the first of the job's slabs that\n"
	"holds one. --verify waits for the chunks, reads them back from the job slab and compares\n"
	"them with the file.\n";

struct chunks_args {
	const char *file;
	uint64_t load_id;
	int gpu, json, verify;
	double timeout_s;
	uint64_t deadline;
};

/* Wait for @m, then read it back; the result is printed, or added to @o. */
static int wait_and_verify(aeg_session_t *s, aeg_model_t *m, const struct chunks_args *a, json_t *o)
{
	struct cli_load_info l;
	struct cli_verify vr;
	char why[1024];
	uint64_t end;
	int err;

	err = cli_model_wait(m, a->deadline, 0, aeg_now_ns(), &end);
	snprintf(why, sizeof(why), "%s", aeg_error_detail());
	if (cli_model_info(m, &l) != 0)
		return cli_fail(err ? err : AEG_ENOENT, aeg_model_path(m));
	if (err == AEG_ETIMEDOUT)
		return cli_load_timed_out(&l, a->timeout_s);
	if (err)
		return cli_load_failed(&l, err, why);
	if (cli_verify(s, m, &vr))
		return 1;
	if (o)
		json_object_set_new(o, "verified", cli_verified_json(&vr));
	else
		cli_print_verified(&l, &vr);
	return 0;
}

/* One load: its summary with (without --verify) a line per chunk. */
static int show_load(aeg_session_t *s, aeg_model_t *m, const struct chunks_args *a, json_t *list)
{
	struct cli_load_info l;
	json_t *o = NULL;
	int err = cli_model_info(m, &l), rc = 0;

	if (err)
		return cli_fail(err, "chunks");
	if (a->json)
		o = cli_load_json(m, &l);
	else
		cli_print_load(m, &l, !a->verify && list == NULL);
	if (a->verify)
		rc = wait_and_verify(s, m, a, o);
	if (list != NULL)
		json_array_append_new(list, o);
	else if (o != NULL && rc == 0)
		rc = cli_json_print(o);
	else
		json_decref(o);
	return rc;
}

/* Every load of the job on this node, oldest first. */
static int list_loads(aeg_session_t *s, const struct chunks_args *a)
{
	struct aeg_job_status *st;
	json_t *arr = a->json ? json_array() : NULL;
	int rc = 0, err;

	err = aeg_job_status(aeg_session_job(s), &st);
	if (err)
		return cli_fail(err, "chunks");
	if (!a->json && st->loads == 0)
		printf("no loads in this job on this node\n");
	for (uint32_t i = 0; i < st->loads && rc == 0; i++) {
		aeg_model_t *m;

		err = aeg_session_find_id(s, st->load[i].load_id, &m);
		if (err == AEG_ENOENT) {
			aeg_error_clear();
			continue;       /* released meanwhile */
		}
		rc = err ? cli_fail(err, "chunks") : show_load(s, m, a, a->json ? arr : NULL);
		if (m != NULL && err == 0)
			aeg_model_close(m);
	}
	aeg_job_status_free(st);
	if (a->json && rc == 0)
		return cli_json_print(json_pack("{s:o}", "loads", arr));
	json_decref(arr);
	return rc;
}

static int parse(int argc, char **argv, struct chunks_args *a)
{
	static const struct option opts[] = {
		{ "load", required_argument, NULL, 'l' },
		{ "gpu", required_argument, NULL, 'g' },
		{ "json", no_argument, NULL, 'j' },
		{ "verify", no_argument, NULL, 'v' },
		{ "timeout", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
		if (c == 'l' && cli_parse_load_id(optarg, &a->load_id))
			return cli_usage_error("chunks", "--load '%s': expected a load id (1, 2, ...)", optarg);
		if (c == 'g' && cli_parse_int(optarg, 0, 1023, &a->gpu))
			return cli_usage_error("chunks", "--gpu '%s': expected a GPU index", optarg);
		if (c == 't' && cli_parse_seconds(optarg, &a->timeout_s))
			return cli_usage_error("chunks", "--timeout '%s': expected seconds >= 0", optarg);
		if (c == 'j' || c == 'v')
			*(c == 'j' ? &a->json : &a->verify) = 1;
		if (c == 'h') {
			fputs(chunks_usage, stdout);
			return -1;
		}
		if (c == '?' || c == ':')
			return cli_option_error("chunks", c, argv);
	}
	if (optind < argc - 1)
		return cli_usage_error("chunks", "expected at most one FILE");
	if (optind == argc - 1)
		a->file = argv[optind];
	if (a->file && a->load_id)
		return cli_usage_error("chunks", "give FILE or --load, not both");
	return 0;
}

int cli_chunks(int argc, char **argv)
{
	struct chunks_args a = { .gpu = -1, .timeout_s = -1 };
	struct aeg_session_config cfg = { .mode = AEG_SESSION_JOB };
	aeg_session_t *s = NULL;
	aeg_model_t *m = NULL;
	int rc, err;

	rc = parse(argc, argv, &a);
	if (rc)
		return rc < 0 ? 0 : rc;
	if (!cli_in_job()) {
		fprintf(stderr, "aegaeon-cli chunks: not in an aegaeon job (AEGAEON_SOCKET is unset): only a job's agent "
			"keeps chunks after a command ends\n");
		return 1;
	}
	if (a.timeout_s >= 0)
		a.deadline = aeg_now_ns() + (uint64_t)(a.timeout_s * 1e9);
	/* GPU memory is touched only to read it back. */
	if (!a.verify)
		cfg.flags |= AEG_SESSION_CONNECT_ONLY;
	rc = cli_session_open(&cfg, NULL, "chunks", &s);
	if (rc)
		return rc;
	if (a.file == NULL && a.load_id == 0) {
		rc = list_loads(s, &a);
	} else if (a.gpu >= 0 && cli_job_slab_of(s, a.gpu) < 0) {
		rc = 1;
	} else {
		err = a.load_id ? aeg_session_find_id(s, a.load_id, &m) : aeg_session_find(s, a.file, a.gpu, &m);
		rc = err ? cli_fail(err, a.load_id ? "chunks" : a.file) : show_load(s, m, &a, NULL);
		aeg_model_close(m);
	}
	aeg_session_close(s);
	return rc;
}

/* aegaeon-cli wait: for a chunk's event handle, or (in a job) for a load the node's agent holds. */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"
#include "internal.h"

static const char wait_usage[] =
	"Usage: aegaeon-cli wait HANDLE|LOAD_ID|FILE [--timeout S] [--device NAME]\n"
	"Wait for a chunk's event (its 128-hex-digit handle; any process of the user can), or,\n"
	"inside a job, for a load the node's agent holds: by load id, or the newest load of FILE.\n"
	"Exit status 1 when it did not complete in time or the load failed.\n";

/* A load of the job: one request to the agent waits for all of it. */
static int wait_load(aeg_session_t *s, const char *what, double timeout_s)
{
	struct cli_load_info l;
	aeg_model_t *m = NULL;
	uint64_t t0 = aeg_now_ns(), end, deadline = 0;
	char size[32], size2[32], why[1024], path[CLI_SHOWN_MAX];
	int rc, err;

	rc = cli_find_load(s, what, &m);
	if (rc)
		return rc;
	if (timeout_s >= 0)
		deadline = t0 + (uint64_t)(timeout_s * 1e9);
	err = cli_model_wait(m, deadline, isatty(STDERR_FILENO), t0, &end);
	snprintf(why, sizeof(why), "%s", aeg_error_detail());
	if (cli_model_info(m, &l) != 0)
		rc = cli_fail(err ? err : AEG_ENOENT, what);
	else if (err == AEG_ETIMEDOUT)
		rc = cli_load_timed_out(&l, timeout_s);
	else if (err)
		rc = cli_load_failed(&l, err, why);
	else if (cli_partly_released(l.status, l.done_bytes, l.file_bytes)) {
		/* It loaded, but what is left of it is not the file. */
		fprintf(stderr, "aegaeon-cli: load %" PRIu64 " of %s is partly released: %s of %s held in %u chunk%s; "
			"prefetch the file again\n", l.id, cli_shown(l.path, path, sizeof(path)),
			aeg_size_format(l.done_bytes, size, sizeof(size)), aeg_size_format(l.file_bytes, size2, sizeof(size2)),
			l.chunks, cli_s(l.chunks));
		rc = 1;
	} else {
		printf("load %" PRIu64 ": %s loaded, %s in %u chunk%s (waited %.3f s)\n", l.id,
		       cli_shown(l.path, path, sizeof(path)),
		       aeg_size_format(l.file_bytes, size, sizeof(size)), l.chunks, cli_s(l.chunks),
		       (double)(end - t0) / 1e9);
	}
	aeg_model_close(m);
	return rc;
}

int cli_wait(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "timeout", required_argument, NULL, 't' },
		{ "device", required_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct aeg_session_config cfg = { .flags = AEG_SESSION_CONNECT_ONLY };
	const char *device = NULL, *what;
	double timeout_s = -1;
	aeg_session_t *s = NULL;
	aeg_handle_t h;
	int c, rc, err, is_handle;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (cli_parse_seconds(optarg, &timeout_s))
				return cli_usage_error("wait", "--timeout '%s': expected seconds >= 0", optarg);
			break;
		case 'd':
			device = optarg;
			break;
		case 'h':
			fputs(wait_usage, stdout);
			return 0;
		default:
			return cli_option_error("wait", c, argv);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("wait", "expected one HANDLE, LOAD_ID or FILE");
	what = argv[optind];
	is_handle = strlen(what) == AEG_HANDLE_HEX_LEN && aeg_handle_from_hex(what, &h) == 0;
	if (!is_handle && !cli_in_job()) {
		if (strlen(what) == AEG_HANDLE_HEX_LEN)
			return cli_usage_error("wait", "%s", aeg_error_detail());
		return cli_usage_error("wait", "'%s' is not an event handle (128 hex digits); load ids and files "
				       "are waited for through a job's agent, and AEGAEON_SOCKET is unset", what);
	}
	/* A handle on another backend than the job's is waited for in this process. */
	cfg.mode = device != NULL ? AEG_SESSION_LOCAL : AEG_SESSION_AUTO;
	rc = cli_session_open(&cfg, device, "wait", &s);
	if (rc)
		return rc;
	if (!is_handle) {
		rc = wait_load(s, what, timeout_s);
	} else {
		err = aeg_event_wait_handle(aeg_session_device(s), &h, timeout_s < 0 ? -1 : (int)(timeout_s * 1000));
		if (err == AEG_ETIMEDOUT)
			fprintf(stderr, "aegaeon-cli wait: not complete after %g s\n", timeout_s);
		rc = err == AEG_ETIMEDOUT ? 1 : err ? cli_fail(err, "wait") : 0;
	}
	aeg_session_close(s);
	return rc;
}

/* aegaeon-cli: the command-line tool; parses the subcommand and dispatches. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "cli.h"

static const struct {
	const char *name;
	int (*run)(int argc, char **argv);
	const char *summary;
} commands[] = {
	{ "info", cli_info, "show the device backend and each GPU's memory and locality" },
	{ "status", cli_status, "inside a job: the agent's slabs, pool and loads" },
	{ "prefetch", cli_prefetch, "load a model file into a GPU slab in chunks, with an event per chunk" },
	{ "wait", cli_wait, "wait for a chunk's event handle, or (in a job) for a load" },
	{ "chunks", cli_chunks, "inside a job: the loads, a file's chunks; --verify reads them back" },
	{ "release", cli_release, "inside a job: release prefetched chunks by slab id, load, or all" },
	{ "bench", cli_bench, "measure slab, pinned pool, event and prefetch speed against baselines" },
	{ "kv", cli_kv, "KV cache swap: 'kv bench' measures it against per-block and batch copies" },
};

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: aegaeon-cli [--version] [--help] COMMAND [ARGS]\n"
		"\n"
		"GPU slabs, pinned pools, prefetch and events for LLM inference jobs.\n"
		"\n"
		"Commands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
	fprintf(out,
		"\n"
		"Run 'aegaeon-cli COMMAND --help' for a command's options.\n"
		"The device backend comes from --device, else $AEGAEON_DEVICE, else the\n"
		"'device' key of the configuration file ($AEGAEON_CONFIG or %s).\n",
		AEG_CONFIG_DEFAULT_PATH);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
	    strcmp(argv[1], "help") == 0) {
		usage(stdout);
		return 0;
	}
	if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
		printf("aegaeon-cli %s\n", aeg_version());
		return 0;
	}
	/* A bad $AEGAEON_LOG is said now, by every command, not only by one that happens to log. */
	(void)aeg_log_get_level();
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(argv[1], commands[i].name) == 0)
			return commands[i].run(argc - 1, argv + 1);
	fprintf(stderr, "aegaeon-cli: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}

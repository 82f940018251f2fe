/* aegaeon-cli subcommands: one file each, dispatched from aegaeon-cli.c. */
#ifndef AEGAEON_CLI_H
#define AEGAEON_CLI_H

#include <aegaeon/aegaeon.h>

/*
 * Each subcommand gets argv with argv[0] the subcommand's name and returns
 * the process exit code: 0 success, 1 failure, 2 bad usage.
 */
int cli_info(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_status(int argc, char **argv);        /* cli_status.c: inside a job, through the agent */

/* Shared helpers (cli_common.c). */
int cli_open_device(const char *name, aeg_device_t **dev);   /* NULL: config/env choice */
int cli_fail(int err, const char *what);                      /* prints "aegaeon-cli: what: detail", returns 1 */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif

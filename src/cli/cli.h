/* aegaeon-cli subcommands: one file each, dispatched from aegaeon-cli.c. */
#ifndef AEGAEON_CLI_H
#define AEGAEON_CLI_H

#include <stdio.h>

#include <aegaeon/aegaeon.h>

/*
 * Each subcommand gets argv with argv[0] the subcommand's name and returns
 * the process exit code: 0 success, 1 failure, 2 bad usage.
 */
int cli_info(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_prefetch(int argc, char **argv);     /* prefetch FILE [--gpu N] [--chunk SIZE] [--json] ... */
int cli_wait(int argc, char **argv);         /* wait HANDLE [--timeout S] */
int cli_release(int argc, char **argv);      /* release ID...|--all */
/* bench prefetch FILE: called by cli_bench for "prefetch"; argv[0] is "prefetch". */
int cli_bench_prefetch(int argc, char **argv);
int cli_status(int argc, char **argv);        /* cli_status.c: inside a job, through the agent */
int cli_kv(int argc, char **argv);

/* Shared helpers (cli_common.c). */
int cli_open_device(const char *name, aeg_device_t **dev);   /* NULL: config/env choice */
int cli_fail(int err, const char *what);                      /* prints "aegaeon-cli: what: detail", returns 1 */
void cli_json_string(FILE *out, const char *s);                  /* quoted, escaped */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif

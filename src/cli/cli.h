/* aegaeon-cli subcommands: one file each, dispatched from aegaeon-cli.c. */
#ifndef AEGAEON_CLI_H
#define AEGAEON_CLI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>

/*
 * Each subcommand gets argv with argv[0] the subcommand's name and returns
 * the process exit code: 0 success, 1 failure, 2 bad usage.
 */
int cli_info(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_prefetch(int argc, char **argv);     /* prefetch FILE [--gpu N] [--chunk SIZE] [--json] ... */
int cli_wait(int argc, char **argv);         /* wait HANDLE|LOAD_ID|FILE [--timeout S] */
int cli_release(int argc, char **argv);      /* release ID...|--load ID|--all */
int cli_chunks(int argc, char **argv);       /* cli_job.c: chunks [FILE|--load ID] [--verify] ... */
/* bench prefetch FILE: called by cli_bench for "prefetch"; argv[0] is "prefetch". */
int cli_bench_prefetch(int argc, char **argv);
int cli_status(int argc, char **argv);        /* cli_status.c: inside a job, through the agent */
int cli_kv(int argc, char **argv);

/*
 * Inside a job (cli_job.c): the same commands through the node's agent, so
 * what they load outlives them. Each returns the exit code.
 */
int cli_in_job(void);                           /* $AEGAEON_SOCKET is set */
struct cli_job_prefetch {
	const char *file;
	int gpu;                        /* as this process numbers GPUs; -1: the job's first slab */
	uint64_t chunk_bytes;           /* 0: the site's */
	int json, wait, verify, reload;
};
int cli_job_prefetch(const struct cli_job_prefetch *args);
int cli_job_wait(const char *load, double timeout_s);       /* LOAD_ID or FILE; timeout < 0: none */
struct cli_job_release {
	int all;
	uint64_t load_id;               /* every block of this load */
	int gpu;                        /* with ids: the slab they are in; -1: the first */
	const uint64_t *ids;
	size_t count;
};
int cli_job_release(const struct cli_job_release *args);

/* SHA-256 (cli_sha256.c), for read-back checks comparable with sha256sum. */
struct cli_sha256 {
	uint32_t h[8];
	uint64_t bytes;
	unsigned char buf[64];
	size_t fill;
};
void cli_sha256_init(struct cli_sha256 *s);
void cli_sha256_update(struct cli_sha256 *s, const void *data, size_t len);
void cli_sha256_hex(struct cli_sha256 *s, char hex[65]);     /* finishes @s */

/* Shared helpers (cli_common.c). */
/*
 * The backend: @name (--device), else $AEGAEON_DEVICE, else the config's
 * device key; the config file is read and checked in every case. Returns 0,
 * 1 (printed) or 2 for a bad backend name.
 */
int cli_open_device(const char *name, aeg_device_t **dev);
int cli_fail(int err, const char *what);                      /* prints "aegaeon-cli: what: detail", returns 1 */
void cli_json_string(FILE *out, const char *s);                  /* quoted, escaped */
int cli_parse_int(const char *text, int lo, int hi, int *out);  /* 0, or -1 when not in lo..hi */
int cli_parse_seconds(const char *text, double *out);           /* 0..one year */
const char *cli_load_state(int status, char *buf, size_t len);  /* "loaded", "loading", "failed: why" */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *cli_s(uint64_t n);                                  /* "s" unless n is 1: "%u chunk%s" */
/* Prints @o indented with floats to CLI_JSON_DIGITS significant digits; consumes @o; 0 or 1. */
#define CLI_JSON_DIGITS 6
int cli_json_print(json_t *o);
/* A progress bar on stderr: percent, bytes, GB/s and the time left. */
void cli_progress(uint64_t done, uint64_t total, uint64_t start_ns);

#endif

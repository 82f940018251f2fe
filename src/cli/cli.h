/* aegaeon-cli subcommands: one file each, dispatched from aegaeon-cli.c. */
#ifndef AEGAEON_CLI_H
#define AEGAEON_CLI_H

#include <getopt.h>
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
 * A tensor-parallel slice from the command line (cli_slice.c): --tp-rank R
 * --tp-world W [--tp-preset P] [--tp-rule PATTERN=DIM|PATTERN=whole]...
 * [--tp-uneven]; the preset is megatron unless given.
 */
enum { CLI_OPT_TP_RANK = 0x100, CLI_OPT_TP_WORLD, CLI_OPT_TP_PRESET, CLI_OPT_TP_RULE, CLI_OPT_TP_UNEVEN };
#define CLI_SLICE_OPTIONS \
	{ "tp-rank", required_argument, NULL, CLI_OPT_TP_RANK }, \
	{ "tp-world", required_argument, NULL, CLI_OPT_TP_WORLD }, \
	{ "tp-preset", required_argument, NULL, CLI_OPT_TP_PRESET }, \
	{ "tp-rule", required_argument, NULL, CLI_OPT_TP_RULE }, \
	{ "tp-uneven", no_argument, NULL, CLI_OPT_TP_UNEVEN }
struct cli_slice_args {
	struct aeg_slice slice;
	struct aeg_slice_rule rules[AEG_SLICE_MAX_RULES];      /* patterns point into argv */
	int rank_given, world_given, preset_given;
	const char *other;              /* the first other --tp-* option given */
};
/* cli_slice_option - one --tp-* option (@c a CLI_OPT_TP_*; a rule's '=' in @arg is cut): 0 or the exit code. */
int cli_slice_option(const char *cmd, int c, char *arg, struct cli_slice_args *a);
/* cli_slice_finish - the spec the options give, checked (aeg_slice_check), or NULL for none; 0 or the exit code. */
int cli_slice_finish(const char *cmd, struct cli_slice_args *a, const struct aeg_slice **spec);
/* cli_slice_suffix - ", slice rank 1 of 2 (megatron preset, 2 rules, uneven)" into @buf; "" for world 0 (whole). */
const char *cli_slice_suffix(int rank, int world, enum aeg_slice_preset preset, unsigned flags, uint32_t rules,
			     char *buf, size_t len);
json_t *cli_slice_json(const struct aeg_slice *spec);   /* rank, world, preset, uneven, rules */
/* cli_slice_json_add - a sliced load's "slice" and "parts" (each tensor's part) into @o; 0, -1 for @o NULL. */
int cli_slice_json_add(json_t *o, aeg_model_t *m);
/* A sliced load's spec and count of split tensors (a line); with the parts, a table of them. Nothing when whole. */
void cli_print_slice(aeg_model_t *m);
void cli_print_parts(aeg_model_t *m);

/* Options of prefetch and bench prefetch (cli_prefetch.c parses them for both). */
struct cli_prefetch_args {
	const char *device;
	const char *file;
	int gpu;
	uint64_t chunk_bytes;
	enum aeg_prefetch_feed feed;
	int threads, streams, mmap_threads;
	uint64_t piece_bytes;
	int json, local, repeat, cache, direct, timing;
	/* prefetch only */
	int gpu_given, chunk_given, wait, verify, reload;
	const char *local_only;         /* the first option the job's agent does not take */
	struct cli_slice_args tp;
	const struct aeg_slice *slice;  /* &tp.slice with --tp-*, else NULL */
};
/* The long options of prefetch and bench prefetch (cli_bench finds the benchmark's name with them). */
extern const struct option cli_prefetch_options[];
/* Returns 0, -1 after --help, or the exit code of a bad command line. */
int cli_prefetch_parse(const char *cmd, int argc, char **argv, struct cli_prefetch_args *a, int bench);
/* The engine settings these options ask for. */
void cli_prefetch_engine(const struct cli_prefetch_args *a, struct aeg_prefetch_config *cfg);

/*
 * Loads through a session (cli_load.c): every subcommand that loads, waits,
 * lists or releases goes the same way, in a job (the node's agent) or not.
 */
int cli_in_job(void);                           /* $AEGAEON_SOCKET is set */
/*
 * cli_session_open - @cfg's mode AUTO becomes JOB in a job, else LOCAL, on
 * the backend of @device (--device), $AEGAEON_DEVICE or the config.
 * Returns 0, or the exit code after printing why (2 for a bad --device).
 */
int cli_session_open(struct aeg_session_config *cfg, const char *device, const char *what, aeg_session_t **s);
/*
 * cli_model_wait - wait for @m until @deadline_ns (0: no limit), with a
 * progress bar on stderr when @bar; *@end_ns is when it stopped. 0,
 * AEG_ETIMEDOUT, or the load's error (its detail set).
 */
int cli_model_wait(aeg_model_t *m, uint64_t deadline_ns, int bar, uint64_t start_ns, uint64_t *end_ns);

struct cli_load_info {                  /* what the listings print of a load */
	uint64_t id;
	const char *path;
	int slab;                       /* the job slab; -1 outside a job */
	int status;                     /* 0 loaded, AEG_EBUSY loading, or the load's error */
	uint64_t file_bytes, done_bytes;       /* done_bytes: loaded and still held */
	uint32_t chunks;
};
int cli_model_info(aeg_model_t *m, struct cli_load_info *info);
/* Prints why load @l failed: @detail (the wait's error detail, taken before any other call) or @err's text; 1. */
int cli_load_failed(const struct cli_load_info *l, int err, const char *detail);
int cli_load_timed_out(const struct cli_load_info *l, double timeout_s);
/* A model of several files: a line per file with its load id (nothing for one file). */
void cli_print_files(aeg_model_t *m);
/*
 * A load as JSON, the same keys in a job and out of one: load_id, path,
 * slab (null outside a job), state, file_bytes, done_bytes, chunk_bytes,
 * tensors, chunks (and a slice's slice and parts).
 */
json_t *cli_load_json(aeg_model_t *m, const struct cli_load_info *l);
/* The size of @m's largest chunk: the chunk size the load used (0 without chunks). */
uint64_t cli_chunk_bytes(aeg_model_t *m);
/* The chunks of @m: slab_id, slab_offset, size, file_offset, event_handle, file, and device_ptr where mapped here. */
json_t *cli_chunks_json(aeg_model_t *m);
void cli_print_load(aeg_model_t *m, const struct cli_load_info *l, int chunk_lines);
/* The one line of a load that prefetch, chunks and status print; @slice: its suffix ("" for none). */
void cli_print_load_line(const struct cli_load_info *l, const char *slice);

struct cli_verify {                     /* a read-back check's result */
	uint64_t bytes;
	uint64_t first, end;            /* file range the chunks cover (a whole load) */
	uint32_t chunks, files;
	int contiguous;
	uint32_t parts, split;          /* a sliced load: the tensors' parts checked, those split */
	char sha256[65];
};
/*
 * cli_verify - copy every chunk of the loaded @m back and compare it with
 * its file; a sliced load's parts tensor by tensor, each with the rows of
 * the file it holds. 0 or 1 (printed why).
 */
int cli_verify(aeg_session_t *s, aeg_model_t *m, struct cli_verify *r);
void cli_print_verified(const struct cli_load_info *l, const struct cli_verify *r);
json_t *cli_verified_json(const struct cli_verify *r);

int cli_parse_load_id(const char *text, uint64_t *id);          /* 0, or -1 when not a load id */
/* cli_find_load - the load named by @what: a load id, or the newest load of a file. 0 or 1 (printed). */
int cli_find_load(aeg_session_t *s, const char *what, aeg_model_t **m);
/* cli_job_slab_of - the job slab on this process's GPU @gpu, or -1 (printed which GPUs have one). */
int cli_job_slab_of(aeg_session_t *s, int gpu);
/* cli_print_timings - the set-up spans timed so far, on stderr (--timing). */
void cli_print_timings(void);

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
/* Whether the CPU's SHA instructions are used (x86 SHA-NI); @on 1 keeps to the portable code (tests). */
int cli_sha256_accelerated(void);
void cli_sha256_portable(int on);

/* Shared helpers (cli_common.c). */
/*
 * The backend: @name (--device), else $AEGAEON_DEVICE, else the config's
 * device key; the config file is read and checked in every case. Returns 0,
 * 1 (printed) or 2 for a bad backend name.
 */
int cli_open_device(const char *name, aeg_device_t **dev);
/* The same choice without opening it: 0, 1 or 2 (printed). */
int cli_device_kind(const char *name, enum aeg_device_kind *kind);
int cli_fail(int err, const char *what);                      /* prints "aegaeon-cli: what: detail", returns 1 */
/*
 * cli_shown - @text (a path, a tensor's name) as the terminal gets it: a
 * copy in @buf through aeg_scrub, as the library shows such text in its
 * messages. Returns @buf; CLI_SHOWN_MAX holds a path whole.
 */
#define CLI_SHOWN_MAX 4200
const char *cli_shown(const char *text, char *buf, size_t len);
void cli_json_string(FILE *out, const char *s);                  /* quoted, escaped */
int cli_parse_int(const char *text, int lo, int hi, int *out);  /* 0, or -1 when not in lo..hi */
int cli_parse_seconds(const char *text, double *out);           /* 0..one year */
/*
 * A load's state: "loaded", "loading", "failed: why", or "partly released"
 * (it loaded, then some of its chunks were released: only @held_bytes of
 * its @file_bytes are left, and it is reused by no one).
 */
const char *cli_load_state(int status, uint64_t held_bytes, uint64_t file_bytes, char *buf, size_t len);
int cli_partly_released(int status, uint64_t held_bytes, uint64_t file_bytes);
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A word getopt_long returned @c '?' (unknown option) or ':' (its value missing) for: says which; 2. */
int cli_option_error(const char *cmd, int c, char **argv);
const char *cli_s(uint64_t n);                                  /* "s" unless n is 1: "%u chunk%s" */
uint64_t cli_median_u64(uint64_t *v, size_t n);                 /* sorts @v in place; n > 0 */
/* Prints @o indented with floats to CLI_JSON_DIGITS significant digits; consumes @o; 0 or 1. */
#define CLI_JSON_DIGITS 6
int cli_json_print(json_t *o);
/* A progress bar on stderr: percent, bytes, GB/s and the time left. */
void cli_progress(uint64_t done, uint64_t total, uint64_t start_ns);

#endif

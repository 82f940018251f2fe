/* Helpers shared by aegaeon-cli's subcommands: device choice, errors, progress and JSON output. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "internal.h"

int cli_device_kind(const char *name, enum aeg_device_kind *kindp)
{
	const char *from = name != NULL ? "--device" : "$AEGAEON_DEVICE";
	enum aeg_device_kind kind;
	struct aeg_config cfg;
	int err;

	/*
	 * The configuration is read and checked even when --device or
	 * $AEGAEON_DEVICE chooses the backend: a broken file must not pass
	 * unnoticed because the key it would have set was given another way.
	 */
	err = aeg_config_load(&cfg, NULL);
	if (err)
		return cli_fail(err, "configuration");
	kind = cfg.device;
	if (name == NULL)
		name = getenv("AEGAEON_DEVICE");
	if (name != NULL && *name != '\0') {
		err = aeg_device_kind_parse(name, &kind);
		if (err) {
			/* A bad option is bad usage; a bad environment, like a bad file, a failure. */
			cli_fail(err, from);
			return from[0] == '-' ? 2 : 1;
		}
	}
	*kindp = kind;
	return 0;
}

int cli_open_device(const char *name, aeg_device_t **dev)
{
	enum aeg_device_kind kind;
	int err = cli_device_kind(name, &kind);

	if (err)
		return err;
	err = aeg_device_open(dev, kind);
	if (err)
		return cli_fail(err, aeg_device_kind_name(kind));
	return 0;
}

void cli_print_timings(void)
{
	struct aeg_span spans[AEG_SPANS_MAX];
	int lost, n = aeg_spans_take(spans, AEG_SPANS_MAX, &lost);

	for (int i = 0; i < n; i++)
		fprintf(stderr, "timing: %-16s %9.3f ms\n", spans[i].name, (double)spans[i].ns / 1e6);
	if (lost)
		fprintf(stderr, "timing: %d more not kept\n", lost);
}

/*
 * Whether @detail starts with @what: whole, or cut in its middle where the
 * detail was too long to keep (the library keeps a long detail's start and
 * end with "..." between, so the reason after a long path survives).
 */
static int names_what(const char *detail, const char *what)
{
	size_t n = strlen(what), k = 0;

	if (strncmp(detail, what, n) == 0 && (detail[n] == ':' || detail[n] == ' ' || (detail[n] == '/' && n > 0)))
		return 1;
	while (what[k] != '\0' && detail[k] == what[k])
		k++;
	if (k < 256 || what[k] == '\0')
		return 0;
	/* The cut's dots may match dots of the path just before it. */
	for (size_t j = k - 2; j <= k; j++)
		if (strncmp(detail + j, "...", 3) == 0)
			return 1;
	return 0;
}

const char *cli_shown(const char *text, char *buf, size_t len)
{
	snprintf(buf, len, "%s", text);
	aeg_scrub(buf);
	return buf;
}

int cli_fail(int err, const char *given)
{
	const char *detail = aeg_error_detail();
	char what[CLI_SHOWN_MAX];

	/* Compared with the detail, which shows a path's control bytes as '?' too. */
	cli_shown(given, what, sizeof(what));
	if (*detail == '\0')
		detail = aeg_strerror(err);
	/* Details often start with the file they are about, or one in the directory asked for: name it once. */
	if (names_what(detail, what))
		fprintf(stderr, "aegaeon-cli: %s\n", detail);
	else
		fprintf(stderr, "aegaeon-cli: %s: %s\n", what, detail);
	return 1;
}

int cli_option_error(const char *cmd, int c, char **argv)
{
	/* getopt_long leaves optind past the word it could not take (and past a missing value's option). */
	const char *word = argv[optind - 1];

	if (c == '?' && optopt != 0 && strncmp(word, "--", 2) != 0)
		return cli_usage_error(cmd, "unknown option '-%c'", optopt);
	if (c == ':')
		return cli_usage_error(cmd, "a value is missing after '%s'", word);
	return cli_usage_error(cmd, "unknown option '%s'", word);
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "aegaeon-cli %s: ", cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry 'aegaeon-cli %s --help'.\n", cmd);
	return 2;
}

void cli_json_string(FILE *out, const char *s)
{
	fputc('"', out);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c < 0x20)
			fprintf(out, "\\u%04x", c);
		else
			fputc(c, out);
	}
	fputc('"', out);
}

int cli_parse_int(const char *text, int lo, int hi, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

int cli_parse_seconds(const char *text, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(text, &end);
	if (errno || end == text || *end || !(v >= 0) || v > 86400.0 * 365)
		return -1;
	*out = v;
	return 0;
}

int cli_partly_released(int status, uint64_t held_bytes, uint64_t file_bytes)
{
	/* The agent counts the bytes a load still holds; a load that completed holds all of them until released. */
	return status == 0 && held_bytes < file_bytes;
}

const char *cli_load_state(int status, uint64_t held_bytes, uint64_t file_bytes, char *buf, size_t len)
{
	if (cli_partly_released(status, held_bytes, file_bytes))
		return "partly released";
	if (status == 0)
		return "loaded";
	if (status == AEG_EBUSY)
		return "loading";
	snprintf(buf, len, "failed: %s", aeg_strerror(status));
	return buf;
}

const char *cli_s(uint64_t n)
{
	return n == 1 ? "" : "s";
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;

	return a < b ? -1 : a > b;
}

uint64_t cli_median_u64(uint64_t *v, size_t n)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int cli_json_print(json_t *o)
{
	int rc;

	if (o == NULL) {
		fprintf(stderr, "aegaeon-cli: out of memory\n");
		return 1;
	}
	rc = json_dumpf(o, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(CLI_JSON_DIGITS));
	fputc('\n', stdout);
	json_decref(o);
	return rc ? 1 : 0;
}

/* "ETA 12 s", "ETA 3 min 05 s" from the speed so far; "ETA ?" before any byte. */
static void eta_text(uint64_t done, uint64_t total, uint64_t ns, char *buf, size_t len)
{
	double s;

	if (done == 0 || ns == 0) {
		snprintf(buf, len, "ETA ?");
		return;
	}
	s = (double)(total - done) * ((double)ns / (double)done) / 1e9;
	if (s < 60)
		snprintf(buf, len, "ETA %.0f s", s + 0.5);
	else if (s < 360000)
		snprintf(buf, len, "ETA %d min %02d s", (int)(s / 60), (int)s % 60);
	else
		snprintf(buf, len, "ETA > 100 h");
}

void cli_progress(uint64_t done, uint64_t total, uint64_t start_ns)
{
	char a[32], b[32], tail[48];
	int width = 30, fill = total ? (int)((uint64_t)width * done / total) : width;
	uint64_t ns = aeg_now_ns() - start_ns;

	if (done >= total)
		snprintf(tail, sizeof(tail), "in %.1f s", (double)ns / 1e9);
	else
		eta_text(done, total, ns, tail, sizeof(tail));
	/* Trailing blanks wipe a longer line drawn before. */
	fprintf(stderr, "\r[%.*s%*s] %3d%% %s / %s %.1f GB/s, %s   ", fill, "##############################",
		width - fill, "", total ? (int)(100 * done / total) : 100, aeg_size_format(done, a, sizeof(a)),
		aeg_size_format(total, b, sizeof(b)), ns ? (double)done / (double)ns : 0.0, tail);
}

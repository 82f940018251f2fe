/* Helpers shared by aegaeon-cli's subcommands: device choice and error reporting. */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"

int cli_open_device(const char *name, aeg_device_t **dev)
{
	enum aeg_device_kind kind;
	struct aeg_config cfg;
	int err;

	if (name == NULL)
		name = getenv("AEGAEON_DEVICE");
	if (name != NULL && *name != '\0') {
		err = aeg_device_kind_parse(name, &kind);
		if (err)
			return cli_fail(err, "device");
	} else {
		err = aeg_config_load(&cfg, NULL);
		if (err)
			return cli_fail(err, "configuration");
		kind = cfg.device;
	}
	err = aeg_device_open(dev, kind);
	if (err)
		return cli_fail(err, aeg_device_kind_name(kind));
	return 0;
}

int cli_fail(int err, const char *what)
{
	const char *detail = aeg_error_detail();

	fprintf(stderr, "aegaeon-cli: %s: %s\n", what, *detail ? detail : aeg_strerror(err));
	return 1;
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

const char *cli_load_state(int status, char *buf, size_t len)
{
	if (status == 0)
		return "loaded";
	if (status == AEG_EBUSY)
		return "loading";
	snprintf(buf, len, "failed: %s", aeg_strerror(status));
	return buf;
}

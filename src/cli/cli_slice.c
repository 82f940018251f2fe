/* aegaeon-cli's tensor-parallel slices: the --tp-* options of prefetch, and how listings show a rank's parts. */
#include "config.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include <aegaeon/aegaeon.h>

#include "cli.h"

/* The option's name, for messages. */
static const char *option_name(int c)
{
	switch (c) {
	case CLI_OPT_TP_RANK: return "--tp-rank";
	case CLI_OPT_TP_WORLD: return "--tp-world";
	case CLI_OPT_TP_PRESET: return "--tp-preset";
	case CLI_OPT_TP_RULE: return "--tp-rule";
	default: return "--tp-uneven";
	}
}

/* "PATTERN=DIM" or "PATTERN=whole": the last '=' ends the pattern. */
static int take_rule(const char *cmd, char *arg, struct cli_slice_args *a)
{
	char *eq = strrchr(arg, '=');
	struct aeg_slice_rule *r = &a->rules[a->slice.nrules];

	if (a->slice.nrules == AEG_SLICE_MAX_RULES)
		return cli_usage_error(cmd, "--tp-rule '%s': more than %d rules", arg, AEG_SLICE_MAX_RULES);
	if (eq == NULL || eq == arg)
		return cli_usage_error(cmd, "--tp-rule '%s': expected PATTERN=DIM or PATTERN=whole "
				       "(such as '*.o_proj.weight=1')", arg);
	if (strcmp(eq + 1, "whole") == 0)
		r->dim = AEG_SLICE_WHOLE;
	else if (cli_parse_int(eq + 1, AEG_SLICE_WHOLE, INT_MAX, &r->dim))
		return cli_usage_error(cmd, "--tp-rule '%s': dimension '%s': expected a number from 0 or 'whole'", arg,
				       eq + 1);
	/* The pattern is the argument's own bytes, up to the '='. */
	*eq = '\0';
	r->pattern = arg;
	a->slice.nrules++;
	return 0;
}

int cli_slice_option(const char *cmd, int c, char *arg, struct cli_slice_args *a)
{
	if (c != CLI_OPT_TP_RANK && c != CLI_OPT_TP_WORLD && a->other == NULL)
		a->other = option_name(c);
	switch (c) {
	case CLI_OPT_TP_RANK:
		a->rank_given = 1;
		return cli_parse_int(arg, 0, AEG_SLICE_MAX_WORLD - 1, &a->slice.rank) ?
		       cli_usage_error(cmd, "--tp-rank '%s': expected a rank 0..%d", arg, AEG_SLICE_MAX_WORLD - 1) : 0;
	case CLI_OPT_TP_WORLD:
		a->world_given = 1;
		return cli_parse_int(arg, 1, AEG_SLICE_MAX_WORLD, &a->slice.world) ?
		       cli_usage_error(cmd, "--tp-world '%s': expected a world size 1..%d", arg, AEG_SLICE_MAX_WORLD) : 0;
	case CLI_OPT_TP_PRESET:
		a->preset_given = 1;
		if (aeg_slice_preset_parse(arg, &a->slice.preset))
			return cli_usage_error(cmd, "--tp-preset: %s", aeg_error_detail());
		return 0;
	case CLI_OPT_TP_RULE:
		return take_rule(cmd, arg, a);
	default:        /* CLI_OPT_TP_UNEVEN */
		a->slice.flags |= AEG_SLICE_UNEVEN;
		return 0;
	}
}

int cli_slice_finish(const char *cmd, struct cli_slice_args *a, const struct aeg_slice **spec)
{
	*spec = NULL;
	if (!a->rank_given && !a->world_given && a->other == NULL)
		return 0;
	if (!a->rank_given || !a->world_given)
		return cli_usage_error(cmd, "%s needs %s: a slice is rank R of a world of W ranks",
				       a->rank_given ? "--tp-rank" : a->world_given ? "--tp-world" : a->other,
				       a->rank_given ? "--tp-world" : a->world_given ? "--tp-rank" :
				       "--tp-rank and --tp-world");
	if (!a->preset_given)
		a->slice.preset = AEG_SLICE_PRESET_MEGATRON;
	a->slice.rules = a->rules;
	if (aeg_slice_check(&a->slice))
		return cli_usage_error(cmd, "%s", aeg_error_detail());
	*spec = &a->slice;
	return 0;
}

/* "slice rank 1 of 2 (megatron preset, 2 rules, uneven)" */
static const char *slice_text(int rank, int world, enum aeg_slice_preset preset, unsigned flags, uint32_t rules,
			      char *buf, size_t len)
{
	char what[96] = "";
	size_t n = 0;

	if (preset != AEG_SLICE_PRESET_NONE)
		n += (size_t)snprintf(what, sizeof(what), "%s preset", aeg_slice_preset_name(preset));
	if (rules)
		n += (size_t)snprintf(what + n, sizeof(what) - n, "%s%u rule%s", n ? ", " : "", rules, cli_s(rules));
	if (n == 0)
		n += (size_t)snprintf(what, sizeof(what), "no rules: every tensor whole");
	if (flags & AEG_SLICE_UNEVEN)
		snprintf(what + n, sizeof(what) - n, ", uneven");
	snprintf(buf, len, "slice rank %d of %d (%s)", rank, world, what);
	return buf;
}

static const char *spec_text(const struct aeg_slice *s, char *buf, size_t len)
{
	return slice_text(s->rank, s->world, s->preset, s->flags, s->nrules, buf, len);
}

const char *cli_slice_suffix(int rank, int world, enum aeg_slice_preset preset, unsigned flags, uint32_t rules,
			     char *buf, size_t len)
{
	char text[160];

	snprintf(buf, len, "%s%s", world ? ", " : "", world ? slice_text(rank, world, preset, flags, rules, text,
									   sizeof(text)) : "");
	return buf;
}

json_t *cli_slice_json(const struct aeg_slice *s)
{
	json_t *rules = json_array();

	for (uint32_t i = 0; rules != NULL && i < s->nrules; i++)
		json_array_append_new(rules, json_pack("{s:s, s:o}", "pattern", s->rules[i].pattern, "dim",
						       s->rules[i].dim == AEG_SLICE_WHOLE ? json_string("whole") :
						       json_integer(s->rules[i].dim)));
	return json_pack("{s:i, s:i, s:s, s:b, s:o}", "rank", s->rank, "world", s->world,
			 "preset", aeg_slice_preset_name(s->preset), "uneven", (s->flags & AEG_SLICE_UNEVEN) != 0,
			 "rules", rules);
}

/* One part: where it lies in the file and in the chunks, its sliced shape, which indices it holds. */
static json_t *part_json(aeg_model_t *m, const struct aeg_tensor *t)
{
	json_t *shape = json_array(), *o;
	char ptr[32];

	for (int d = 0; shape != NULL && d < t->ndim; d++)
		json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
	o = json_pack("{s:s, s:s, s:o, s:I, s:s, s:I, s:i, s:i}", "name", t->name, "dtype", t->dtype, "shape", shape,
		      "size", (json_int_t)t->size, "file", aeg_model_file(m, t->file),
		      "file_offset", (json_int_t)t->file_offset, "first_chunk", (int)t->first_chunk,
		      "chunks", (int)t->chunks);
	if (o == NULL)
		return NULL;
	if (t->slice_dim == AEG_SLICE_WHOLE) {
		json_object_set_new(o, "slice_dim", json_null());
	} else {
		json_object_set_new(o, "slice_dim", json_integer(t->slice_dim));
		json_object_set_new(o, "slice_start", json_integer((json_int_t)t->slice_start));
		json_object_set_new(o, "slice_extent", json_integer((json_int_t)t->slice_extent));
	}
	if (t->device_ptr != NULL) {
		snprintf(ptr, sizeof(ptr), "0x%" PRIxPTR, (uintptr_t)t->device_ptr);
		json_object_set_new(o, "device_ptr", json_string(ptr));
	}
	return o;
}

int cli_slice_json_add(json_t *o, aeg_model_t *m)
{
	const struct aeg_slice *s = aeg_model_slice(m);
	const struct aeg_tensor *t;
	json_t *parts;
	uint32_t n;

	if (o == NULL || s == NULL)
		return o == NULL ? -1 : 0;
	parts = json_array();
	t = aeg_model_tensors(m, &n);
	for (uint32_t i = 0; parts != NULL && i < n; i++)
		json_array_append_new(parts, part_json(m, &t[i]));
	json_object_set_new(o, "slice", cli_slice_json(s));
	json_object_set_new(o, "parts", parts);
	return 0;
}

/* "[4, 10]" */
static const char *shape_text(const struct aeg_tensor *t, char *buf, size_t len)
{
	size_t n = (size_t)snprintf(buf, len, "[");

	for (int d = 0; d < t->ndim && n < len; d++)
		n += (size_t)snprintf(buf + n, len - n, "%s%" PRIu64, d ? ", " : "", t->shape[d]);
	if (n < len)
		snprintf(buf + n, len - n, "]");
	return buf;
}

/* "dim 1: 4..8 of 10", or "whole" */
static const char *part_text(const struct aeg_tensor *t, char *buf, size_t len)
{
	if (t->slice_dim == AEG_SLICE_WHOLE)
		snprintf(buf, len, "whole");
	else
		snprintf(buf, len, "dim %d: %" PRIu64 "..%" PRIu64 " of %" PRIu64, t->slice_dim, t->slice_start,
			 t->slice_start + t->shape[t->slice_dim], t->slice_extent);
	return buf;
}

/* How many of @m's tensors the slice splits (the others are whole), and how many there are. */
static uint32_t split_count(aeg_model_t *m, uint32_t *total)
{
	const struct aeg_tensor *t = aeg_model_tensors(m, total);
	uint32_t split = 0;

	for (uint32_t i = 0; i < *total; i++)
		split += t[i].slice_dim != AEG_SLICE_WHOLE;
	return split;
}

void cli_print_slice(aeg_model_t *m)
{
	const struct aeg_slice *s = aeg_model_slice(m);
	char text[160];
	uint32_t n, split;

	if (s == NULL)
		return;
	split = split_count(m, &n);
	printf("%s: %u of %u tensor%s split, %u whole\n", spec_text(s, text, sizeof(text)), split, n, cli_s(n),
	       n - split);
}

void cli_print_parts(aeg_model_t *m)
{
	char shape[96], part[80], name[CLI_SHOWN_MAX];
	const struct aeg_tensor *t;
	uint32_t n;

	if (aeg_model_slice(m) == NULL)
		return;
	cli_print_slice(m);
	printf("%6s %-6s %-20s %-26s %14s %12s  %s\n", "chunk", "dtype", "shape", "part", "file_offset", "size", "tensor");
	t = aeg_model_tensors(m, &n);
	for (uint32_t i = 0; i < n; i++)
		printf("%6u %-6s %-20s %-26s %14" PRIu64 " %12" PRIu64 "  %s\n", t[i].first_chunk, t[i].dtype,
		       shape_text(&t[i], shape, sizeof(shape)), part_text(&t[i], part, sizeof(part)), t[i].file_offset,
		       t[i].size, cli_shown(t[i].name, name, sizeof(name)));
}

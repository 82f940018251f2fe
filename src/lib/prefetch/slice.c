/* Tensor-parallel slices: specs, presets, and the plan of each tensor's part in the file and in a load. */
#include "config.h"

#include <fnmatch.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/error.h>
#include <aegaeon/slice.h>

#include "internal.h"
#include "slice_plan.h"

/* Megatron-LM's and vLLM's column- and row-parallel layers, by their Hugging Face names. */
static const struct aeg_slice_rule megatron[] = {
	{ "*.q_proj.weight", 0 }, { "*.k_proj.weight", 0 }, { "*.v_proj.weight", 0 },
	{ "*.q_proj.bias", 0 }, { "*.k_proj.bias", 0 }, { "*.v_proj.bias", 0 },
	{ "*.gate_proj.weight", 0 }, { "*.up_proj.weight", 0 },
	{ "*.experts.*.w1.weight", 0 }, { "*.experts.*.w3.weight", 0 },
	{ "*.dense_h_to_4h.weight", 0 }, { "*.dense_h_to_4h.bias", 0 },
	{ "*.fc1.weight", 0 }, { "*.fc1.bias", 0 },
	{ "*.o_proj.weight", 1 }, { "*.down_proj.weight", 1 }, { "*.experts.*.w2.weight", 1 },
	{ "*.dense_4h_to_h.weight", 1 }, { "*.fc2.weight", 1 }, { "*.out_proj.weight", 1 },
	{ "*.attention.dense.weight", 1 }, { "*.self_attention.dense.weight", 1 },
	{ "*embed_tokens.weight", 0 }, { "*embed_in.weight", 0 }, { "*word_embeddings.weight", 0 },
	{ "lm_head.weight", 0 }, { "*.lm_head.weight", 0 }, { "embed_out.weight", 0 },
};

AEG_EXPORT const char *aeg_slice_preset_name(enum aeg_slice_preset preset)
{
	switch (preset) {
	case AEG_SLICE_PRESET_NONE: return "none";
	case AEG_SLICE_PRESET_MEGATRON: return "megatron";
	}
	return "unknown";
}

AEG_EXPORT int aeg_slice_preset_parse(const char *name, enum aeg_slice_preset *preset)
{
	if (name == NULL || preset == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_slice_preset_parse: NULL argument");
	if (strcmp(name, "none") == 0)
		*preset = AEG_SLICE_PRESET_NONE;
	else if (strcmp(name, "megatron") == 0 || strcmp(name, "vllm") == 0)
		*preset = AEG_SLICE_PRESET_MEGATRON;
	else
		return aeg_fail(AEG_EINVAL, "slice preset \"%.64s\": expected none, megatron or vllm", name);
	return 0;
}

AEG_EXPORT int aeg_slice_check(const struct aeg_slice *s)
{
	if (s == NULL)
		return aeg_fail(AEG_EINVAL, "aeg_slice_check: NULL slice");
	if (s->world < 1 || s->world > AEG_SLICE_MAX_WORLD)
		return aeg_fail(AEG_EINVAL, "slice world size %d: must be 1..%d", s->world, AEG_SLICE_MAX_WORLD);
	if (s->rank < 0 || s->rank >= s->world)
		return aeg_fail(AEG_EINVAL, "slice rank %d: must be 0..%d for a world of %d", s->rank, s->world - 1,
				s->world);
	if (s->preset != AEG_SLICE_PRESET_NONE && s->preset != AEG_SLICE_PRESET_MEGATRON)
		return aeg_fail(AEG_EINVAL, "slice preset %d: expected none (0) or megatron (1)", (int)s->preset);
	if (s->flags & ~AEG_SLICE_UNEVEN)
		return aeg_fail(AEG_EINVAL, "slice flags 0x%x: unknown bits", s->flags);
	if (s->nrules > AEG_SLICE_MAX_RULES)
		return aeg_fail(AEG_EINVAL, "%" PRIu32 " slice rules: at most %d", s->nrules, AEG_SLICE_MAX_RULES);
	if (s->nrules && s->rules == NULL)
		return aeg_fail(AEG_EINVAL, "%" PRIu32 " slice rules but a NULL rule table", s->nrules);
	for (uint32_t i = 0; i < s->nrules; i++) {
		const struct aeg_slice_rule *r = &s->rules[i];

		if (r->pattern == NULL || r->pattern[0] == '\0')
			return aeg_fail(AEG_EINVAL, "slice rule %" PRIu32 ": empty pattern", i);
		if (strlen(r->pattern) >= AEG_SLICE_PATTERN_MAX)
			return aeg_fail(AEG_EINVAL, "slice rule %" PRIu32 ": pattern \"%.32s...\" of %zu bytes, at most %d", i,
					r->pattern, strlen(r->pattern), AEG_SLICE_PATTERN_MAX - 1);
		if (r->dim != AEG_SLICE_WHOLE && (r->dim < 0 || r->dim >= AEG_ST_MAX_DIMS))
			return aeg_fail(AEG_EINVAL, "slice rule %" PRIu32 " (\"%s\"): dim %d: must be 0..%d or %d (whole)", i,
					r->pattern, r->dim, AEG_ST_MAX_DIMS - 1, AEG_SLICE_WHOLE);
	}
	return 0;
}

AEG_EXPORT int aeg_slice_dim(const struct aeg_slice *s, const char *name, const char **pattern)
{
	if (pattern)
		*pattern = NULL;
	for (uint32_t i = 0; s != NULL && name != NULL && i < s->nrules; i++) {
		if (fnmatch(s->rules[i].pattern, name, 0) == 0) {
			if (pattern)
				*pattern = s->rules[i].pattern;
			return s->rules[i].dim;
		}
	}
	if (s == NULL || name == NULL || s->preset != AEG_SLICE_PRESET_MEGATRON)
		return AEG_SLICE_WHOLE;
	for (size_t i = 0; i < sizeof(megatron) / sizeof(megatron[0]); i++) {
		if (fnmatch(megatron[i].pattern, name, 0) == 0) {
			if (pattern)
				*pattern = megatron[i].pattern;
			return megatron[i].dim;
		}
	}
	return AEG_SLICE_WHOLE;
}

/* ------------------------------------------------------------ copies */

int slice_dup(const struct aeg_slice *s, struct aeg_slice **out)
{
	size_t bytes = sizeof(**out) + s->nrules * sizeof(struct aeg_slice_rule);
	struct aeg_slice_rule *rules;
	struct aeg_slice *c;
	char *text;

	for (uint32_t i = 0; i < s->nrules; i++)
		bytes += strlen(s->rules[i].pattern) + 1;
	c = malloc(bytes);
	if (c == NULL)
		return aeg_fail(AEG_ENOMEM, "slice spec: out of memory");
	*c = *s;
	rules = (struct aeg_slice_rule *)(c + 1);
	text = (char *)(rules + s->nrules);
	for (uint32_t i = 0; i < s->nrules; i++) {
		size_t n = strlen(s->rules[i].pattern) + 1;

		memcpy(text, s->rules[i].pattern, n);
		rules[i].pattern = text;
		rules[i].dim = s->rules[i].dim;
		text += n;
	}
	c->rules = s->nrules ? rules : NULL;
	*out = c;
	return 0;
}

void slice_free(struct aeg_slice *s)
{
	free(s);
}

int slice_equal(const struct aeg_slice *a, const struct aeg_slice *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	if (a->rank != b->rank || a->world != b->world || a->preset != b->preset || a->flags != b->flags ||
	    a->nrules != b->nrules)
		return 0;
	for (uint32_t i = 0; i < a->nrules; i++)
		if (a->rules[i].dim != b->rules[i].dim || strcmp(a->rules[i].pattern, b->rules[i].pattern) != 0)
			return 0;
	return 1;
}

void slice_describe(const struct aeg_slice *s, char *buf, size_t len)
{
	snprintf(buf, len, "rank %d of %d, preset %s, %" PRIu32 " rule%s%s", s->rank, s->world,
		 aeg_slice_preset_name(s->preset), s->nrules, s->nrules == 1 ? "" : "s",
		 s->flags & AEG_SLICE_UNEVEN ? ", uneven" : "");
}

/* -------------------------------------------------------------- plans */

static void shape_text(const struct aeg_st_tensor *t, char *buf, size_t len)
{
	size_t at = (size_t)snprintf(buf, len, "[");

	for (int i = 0; i < t->ndim && at < len; i++)
		at += (size_t)snprintf(buf + at, len - at, "%s%" PRIu64, i ? ", " : "", t->shape[i]);
	if (at < len)
		snprintf(buf + at, len - at, "]");
}

/* Rank @r's run of @n along a dim: the first index and how many, under @s's rule for uneven splits. */
static int split(const struct aeg_slice *s, const char *path, const struct aeg_st_tensor *t, int dim,
		 const char *pattern, uint64_t *start, uint64_t *count)
{
	uint64_t n = t->shape[dim], w = (uint64_t)s->world, block;
	char shape[256], q[AEG_NAME_SHOWN];

	if (n % w != 0 && !(s->flags & AEG_SLICE_UNEVEN)) {
		shape_text(t, shape, sizeof(shape));
		return aeg_fail(AEG_EINVAL, "%s: tensor \"%s\" of shape %s has %" PRIu64 " along dim %d, not a multiple "
				"of the %d ranks (rule \"%s\"); with AEG_SLICE_UNEVEN each rank takes %" PRIu64
				" and the last ones less", path, aeg_quote(t->name, q, sizeof(q)), shape, n, dim, s->world,
				pattern, (n + w - 1) / w);
	}
	block = (n + w - 1) / w;
	*start = block * (uint64_t)s->rank < n ? block * (uint64_t)s->rank : n;
	*count = n - *start < block ? n - *start : block;
	return 0;
}

/* The part of tensor @t that @s gives its rank, into @sp (its shape into @shape). */
static int plan_tensor(const struct aeg_slice *s, const struct aeg_st_header *hdr, const char *path,
		       const struct aeg_st_tensor *t, struct slice_span *sp, uint64_t *shape)
{
	const char *pattern;
	int dim = aeg_slice_dim(s, t->name, &pattern);
	uint64_t outer = 1, inner_bits = t->dtype_bits, start = 0, count = 0;
	char text[256], q[AEG_NAME_SHOWN];
	int err;

	memcpy(shape, t->shape, (size_t)t->ndim * sizeof(*shape));
	sp->shape = shape;
	sp->src = hdr->data_offset + t->begin;
	sp->dim = dim;
	sp->rows = 1;
	sp->width = sp->pitch = sp->bytes = t->end - t->begin;
	if (dim == AEG_SLICE_WHOLE)
		return 0;
	if (dim >= t->ndim) {
		shape_text(t, text, sizeof(text));
		return aeg_fail(AEG_EINVAL, "%s: tensor \"%s\" of shape %s has no dim %d (rule \"%s\" splits it along dim %d)",
				path, aeg_quote(t->name, q, sizeof(q)), text, dim, pattern, dim);
	}
	for (int i = 0; i < dim; i++)
		outer *= t->shape[i];
	for (int i = dim + 1; i < t->ndim; i++)
		inner_bits *= t->shape[i];
	if (inner_bits % 8 != 0) {
		shape_text(t, text, sizeof(text));
		return aeg_fail(AEG_EINVAL, "%s: tensor \"%s\" (%s, shape %s) cannot be split along dim %d: its parts would not start at whole bytes",
				path, aeg_quote(t->name, q, sizeof(q)), t->dtype, text, dim);
	}
	err = split(s, path, t, dim, pattern, &start, &count);
	if (err)
		return err;
	shape[dim] = count;
	sp->start = start;
	sp->extent = t->shape[dim];
	sp->src += start * (inner_bits / 8);
	sp->width = count * (inner_bits / 8);
	sp->pitch = t->shape[dim] * (inner_bits / 8);
	sp->rows = outer;
	if (sp->rows == 1 || sp->width == sp->pitch) {
		sp->width *= sp->rows;
		sp->pitch = sp->width;
		sp->rows = 1;
	}
	sp->bytes = sp->width * sp->rows;
	if (sp->bytes == 0)
		sp->rows = 1;
	return 0;
}

int slice_plan_make(const struct aeg_slice *s, const struct aeg_st_header *hdr, const char *path,
		    struct slice_plan *p)
{
	size_t dims = 0;
	uint64_t out;
	int err;

	memset(p, 0, sizeof(*p));
	err = aeg_slice_check(s);
	if (err)
		return err;
	for (size_t i = 0; i < hdr->count; i++)
		dims += (size_t)hdr->tensors[i].ndim;
	p->spans = calloc(hdr->count ? hdr->count : 1, sizeof(*p->spans));
	p->shapes = calloc(dims ? dims : 1, sizeof(*p->shapes));
	err = p->spans && p->shapes ? slice_dup(s, &p->spec) : aeg_fail(AEG_ENOMEM, "slice plan: out of memory");
	out = p->out_begin = hdr->data_offset;
	dims = 0;
	for (size_t i = 0; i < hdr->count && err == 0; i++) {
		err = plan_tensor(s, hdr, path, &hdr->tensors[i], &p->spans[i], p->shapes + dims);
		p->spans[i].out = out;
		out += p->spans[i].bytes;
		dims += (size_t)hdr->tensors[i].ndim;
	}
	p->count = hdr->count;
	p->out_end = out;
	if (err)
		slice_plan_free(p);
	return err;
}

void slice_plan_free(struct slice_plan *p)
{
	if (p == NULL)
		return;
	slice_free(p->spec);
	free(p->spans);
	free(p->shapes);
	memset(p, 0, sizeof(*p));
}

uint64_t slice_file_end(const struct slice_span *t)
{
	return t->bytes ? t->src + (t->rows - 1) * t->pitch + t->width : t->src;
}

/* The first span whose file bytes end after @at (count when none): file ends ascend. */
static size_t span_after_file(const struct slice_plan *p, uint64_t at)
{
	size_t lo = 0, hi = p->count;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (slice_file_end(&p->spans[mid]) <= at)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* The first span whose packed bytes end after @out (count when none). */
static size_t span_after_out(const struct slice_plan *p, uint64_t out)
{
	size_t lo = 0, hi = p->count;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (p->spans[mid].out + p->spans[mid].bytes <= out)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

uint64_t slice_out_of(const struct slice_plan *p, uint64_t at)
{
	size_t i = span_after_file(p, at);
	const struct slice_span *t;
	uint64_t row, col;

	if (i == p->count)
		return p->out_end;
	t = &p->spans[i];
	if (at <= t->src)
		return t->out;
	row = (at - t->src) / t->pitch;
	col = (at - t->src) % t->pitch;
	return t->out + row * t->width + (col < t->width ? col : t->width);
}

uint64_t slice_file_of(const struct slice_plan *p, uint64_t out)
{
	size_t i = span_after_out(p, out);
	const struct slice_span *t;
	uint64_t in;

	if (i == p->count)
		return p->count ? slice_file_end(&p->spans[p->count - 1]) : p->out_begin;
	t = &p->spans[i];
	in = out < t->out ? 0 : out - t->out;
	return t->src + in / t->width * t->pitch + in % t->width;
}

/* Packed bytes [lo, hi) of part @t (counted from its start): at most a row's tail, whole rows, a row's head. */
static int copy_part(aeg_stream_t *st, const struct slice_span *t, uint64_t lo, uint64_t hi, char *dst,
		     const char *host, uint64_t at)
{
	int err = 0;

	while (lo < hi && err == 0) {
		uint64_t row = lo / t->width, col = lo % t->width, n;
		const char *src = host + (t->src + row * t->pitch + col - at);

		if (col != 0 || hi - lo < t->width) {
			n = t->width - col < hi - lo ? t->width - col : hi - lo;
			err = aeg_memcpy_async(st, dst, src, n);
		} else if (t->rows == 1 || hi - lo < 2 * t->width) {
			n = t->width;
			err = aeg_memcpy_async(st, dst, src, n);
		} else {
			uint64_t rows = (hi - lo) / t->width;

			n = rows * t->width;
			err = aeg_memcpy2d_async(st, dst, t->width, src, t->pitch, t->width, rows);
		}
		dst += n;
		lo += n;
	}
	return err;
}

int slice_copy(aeg_stream_t *st, const struct slice_plan *p, uint64_t lo, uint64_t hi, char *dst,
	       const char *host, uint64_t at)
{
	for (size_t i = span_after_out(p, lo); i < p->count && lo < hi; i++) {
		const struct slice_span *t = &p->spans[i];
		uint64_t a = lo > t->out ? lo : t->out;
		uint64_t b = hi < t->out + t->bytes ? hi : t->out + t->bytes;
		int err;

		if (t->out >= hi)
			break;
		if (a >= b)
			continue;
		err = copy_part(st, t, a - t->out, b - t->out, dst + (a - lo), host, at);
		if (err)
			return err;
	}
	return 0;
}

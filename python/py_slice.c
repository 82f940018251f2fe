/* Tensor-parallel slices in Python: the tp_* arguments of the model loaders, and a loaded model's spec. */
#include "py_internal.h"

#include <limits.h>
#include <string.h>

/* An int argument in lo..hi (@limit says why, in messages); 0, or -1 with TypeError or ValueError. */
static int slice_int(PyObject *obj, const char *what, int lo, int hi, const char *limit, int *out)
{
	uint64_t v;

	if (pyaeg_u64(obj, what, 1, &v) < 0)
		return -1;
	if (v < (uint64_t)lo || v > (uint64_t)hi) {
		PyErr_Format(PyExc_ValueError, "%s %llu is out of range (%d..%d%s)", what, (unsigned long long)v, lo, hi,
			     limit);
		return -1;
	}
	*out = (int)v;
	return 0;
}

/* Rule @i's dim: an int from 0, or None or "whole" (as --tp-rule PATTERN=whole): the tensor whole. */
static int take_dim(PyObject *dim, Py_ssize_t i, int *out)
{
	char what[48];

	if (dim == Py_None)
		return 0;
	if (PyUnicode_Check(dim)) {
		if (PyUnicode_CompareWithASCIIString(dim, "whole") == 0)
			return 0;
		PyErr_Format(PyExc_ValueError, "tp_rules[%zd] dim %R: expected an int from 0, or None or 'whole' "
			     "for the tensor whole", i, dim);
		return -1;
	}
	snprintf(what, sizeof(what), "tp_rules[%zd] dim", i);
	return slice_int(dim, what, 0, INT_MAX, "; None: whole", out);
}

/* Rule @i's pattern (a str) and dim. */
static int take_rule_of(PyObject *pat, PyObject *dim, Py_ssize_t i, struct pyaeg_slice *ps)
{
	const char *text;
	Py_ssize_t len;

	if (!PyUnicode_Check(pat)) {
		PyErr_Format(PyExc_TypeError, "tp_rules[%zd]: the pattern must be a str, not %s", i, pyaeg_tname(pat));
		return -1;
	}
	text = PyUnicode_AsUTF8AndSize(pat, &len);
	if (text == NULL)
		return -1;
	if (len == 0 || strlen(text) != (size_t)len) {
		PyErr_Format(PyExc_ValueError, "tp_rules[%zd]: pattern %R is %s", i, pat,
			     len ? "cut by a NUL character" : "empty");
		return -1;
	}
	if (len >= AEG_SLICE_PATTERN_MAX) {
		PyErr_Format(PyExc_ValueError, "tp_rules[%zd]: pattern \"%.32s...\" of %zd bytes, at most %d", i, text,
			     len, AEG_SLICE_PATTERN_MAX - 1);
		return -1;
	}
	memcpy(ps->patterns[i], text, (size_t)len + 1);
	ps->rules[i].pattern = ps->patterns[i];
	ps->rules[i].dim = AEG_SLICE_WHOLE;
	return take_dim(dim, i, &ps->rules[i].dim);
}

/* Rule @i: a (pattern, dim) pair, a tuple or a list. */
static int take_rule(PyObject *item, Py_ssize_t i, struct pyaeg_slice *ps)
{
	PyObject *pat, *dim;
	int rc;

	if (!(PyTuple_Check(item) || PyList_Check(item)) || PySequence_Size(item) != 2) {
		PyErr_Format(PyExc_TypeError, "tp_rules[%zd] must be a (pattern, dim) pair, not %s", i, pyaeg_tname(item));
		return -1;
	}
	pat = PySequence_GetItem(item, 0);
	dim = PySequence_GetItem(item, 1);
	rc = pat && dim ? take_rule_of(pat, dim, i, ps) : -1;
	Py_XDECREF(pat);
	Py_XDECREF(dim);
	return rc;
}

/* tp_rules: a sequence of (pattern, dim) pairs or a dict {pattern: dim}, in order. */
static int take_rules(PyObject *rules, struct pyaeg_slice *ps)
{
	PyObject *list = NULL;
	Py_ssize_t n;
	int rc = 0;

	if (!PyUnicode_Check(rules) && !PyBytes_Check(rules))
		list = PyDict_Check(rules) ? PyDict_Items(rules) : PySequence_List(rules);
	if (list == NULL) {
		if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_TypeError))
			return -1;
		PyErr_Clear();
		PyErr_Format(PyExc_TypeError, "tp_rules must be a sequence of (pattern, dim) pairs or a dict, not %s",
			     pyaeg_tname(rules));
		return -1;
	}
	n = PyList_Size(list);
	if (n > AEG_SLICE_MAX_RULES) {
		PyErr_Format(PyExc_ValueError, "tp_rules: %zd rules, at most %d", n, AEG_SLICE_MAX_RULES);
		rc = -1;
	}
	for (Py_ssize_t i = 0; rc == 0 && i < n; i++)
		rc = take_rule(PyList_GetItem(list, i), i, ps);
	ps->spec.nrules = rc == 0 ? (uint32_t)n : 0;
	Py_DECREF(list);
	return rc;
}

static int given(PyObject *obj)
{
	return obj != NULL && obj != Py_None;
}

/* tp_rank and tp_world come together; the other tp_* need them. */
static int check_given(const struct pyaeg_slice_args *a)
{
	const char *other = given(a->preset) ? "tp_preset" : given(a->rules) ? "tp_rules" : "tp_uneven";

	if (given(a->rank) && given(a->world))
		return 0;
	if (given(a->rank) || given(a->world))
		PyErr_Format(PyExc_ValueError, "%s=%R needs %s: a slice is rank tp_rank of tp_world ranks",
			     given(a->rank) ? "tp_rank" : "tp_world", given(a->rank) ? a->rank : a->world,
			     given(a->rank) ? "tp_world" : "tp_rank");
	else
		PyErr_Format(PyExc_ValueError, "%s needs tp_rank and tp_world", other);
	return -1;
}

static int take_preset(PyObject *preset, enum aeg_slice_preset *out)
{
	const char *name;

	*out = AEG_SLICE_PRESET_MEGATRON;
	if (!given(preset))
		return 0;
	if (!PyUnicode_Check(preset)) {
		PyErr_Format(PyExc_TypeError, "tp_preset must be a str or None, not %s", pyaeg_tname(preset));
		return -1;
	}
	name = PyUnicode_AsUTF8AndSize(preset, NULL);
	if (name == NULL)
		return -1;
	if (aeg_slice_preset_parse(name, out) == 0)
		return 0;
	aeg_error_clear();
	PyErr_Format(PyExc_ValueError, "tp_preset %R: expected 'megatron', 'vllm' or 'none'", preset);
	return -1;
}

int pyaeg_slice_from_args(const struct pyaeg_slice_args *a, struct pyaeg_slice *ps, const struct aeg_slice **spec)
{
	char limit[48];

	*spec = NULL;
	memset(&ps->spec, 0, sizeof(ps->spec));
	if (!given(a->rank) && !given(a->world) && !given(a->preset) && !given(a->rules) && !a->uneven)
		return 0;
	if (check_given(a) < 0 || slice_int(a->world, "tp_world", 1, AEG_SLICE_MAX_WORLD, "", &ps->spec.world) < 0)
		return -1;
	snprintf(limit, sizeof(limit), " for tp_world %d", ps->spec.world);
	if (slice_int(a->rank, "tp_rank", 0, ps->spec.world - 1, limit, &ps->spec.rank) < 0 ||
	    take_preset(a->preset, &ps->spec.preset) < 0 || (given(a->rules) && take_rules(a->rules, ps) < 0))
		return -1;
	ps->spec.rules = ps->rules;
	ps->spec.flags = a->uneven ? AEG_SLICE_UNEVEN : 0;
	/* What only the library checks (a rule's dimension): AegaeonValueError with its detail. */
	if (aeg_slice_check(&ps->spec) != 0) {
		pyaeg_raise(AEG_EINVAL);
		return -1;
	}
	*spec = &ps->spec;
	return 0;
}

PyObject *pyaeg_slice_dict(const struct aeg_slice *s)
{
	PyObject *rules;

	if (s == NULL)
		Py_RETURN_NONE;
	rules = PyList_New(s->nrules);
	for (uint32_t i = 0; rules != NULL && i < s->nrules; i++) {
		PyObject *pair = s->rules[i].dim == AEG_SLICE_WHOLE ?
				 Py_BuildValue("(sO)", s->rules[i].pattern, Py_None) :
				 Py_BuildValue("(si)", s->rules[i].pattern, s->rules[i].dim);

		if (pair == NULL)
			Py_CLEAR(rules);
		else
			PyList_SetItem(rules, i, pair);
	}
	if (rules == NULL)
		return NULL;
	return Py_BuildValue("{s:i,s:i,s:s,s:N,s:O}", "rank", s->rank, "world", s->world,
			     "preset", aeg_slice_preset_name(s->preset), "rules", rules,
			     "uneven", s->flags & AEG_SLICE_UNEVEN ? Py_True : Py_False);
}

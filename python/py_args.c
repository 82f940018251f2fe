/* The aegaeon_native module's exceptions and the argument helpers its files share. */
#include "py_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

PyObject *pyaeg_error_type;
static PyObject *timeout_error_type;
static PyObject *value_error_type;

static PyObject *raise_text(int code, const char *text)
{
	PyObject *type, *exc, *args = NULL, *v;
	const char *name = aeg_errname(code);

	type = code == AEG_ETIMEDOUT ? timeout_error_type :
	       code == AEG_EINVAL || code == AEG_ERANGE ? value_error_type : pyaeg_error_type;
	/* errno-like codes give OSError's (errno, strerror); project codes only a message. */
	if (code < 0 && code > -4000)
		args = Py_BuildValue("(is)", -code, text);
	else
		args = Py_BuildValue("(s)", text);
	if (args == NULL)
		return NULL;
	exc = PyObject_CallObject(type, args);
	Py_DECREF(args);
	if (exc == NULL)
		return NULL;
	v = PyLong_FromLong(code);
	if (v == NULL || PyObject_SetAttrString(exc, "code", v) < 0)
		goto fail;
	Py_DECREF(v);
	v = PyUnicode_FromString(name);
	if (v == NULL || PyObject_SetAttrString(exc, "name", v) < 0)
		goto fail;
	Py_DECREF(v);
	PyErr_SetObject(type, exc);
	Py_DECREF(exc);
	return NULL;
fail:
	Py_XDECREF(v);
	Py_DECREF(exc);
	return NULL;
}

PyObject *pyaeg_raise(int code)
{
	const char *detail = aeg_error_detail();
	char text[1200];

	if (detail[0] != '\0')
		snprintf(text, sizeof(text), "%s: %s", aeg_strerror(code), detail);
	else
		snprintf(text, sizeof(text), "%s", aeg_strerror(code));
	return raise_text(code, text);
}

PyObject *pyaeg_raise_msg(int code, const char *fmt, ...)
{
	char text[1200];
	size_t len;
	va_list ap;

	len = (size_t)snprintf(text, sizeof(text), "%s: ", aeg_strerror(code));
	if (len >= sizeof(text))
		len = sizeof(text) - 1;
	va_start(ap, fmt);
	vsnprintf(text + len, sizeof(text) - len, fmt, ap);
	va_end(ap);
	aeg_scrub(text);        /* paths and names in it are shown as the library's details show them */
	return raise_text(code, text);
}

int pyaeg_users_busy(const struct pyaeg_users *u, const char *what)
{
	char text[512] = "", todo[256] = "";
	size_t len = 0, tlen = 0;

	if (u->views == 0 && u->calls == 0 && u->caches == 0)
		return 0;
	if (u->views > 0) {
		len += (size_t)snprintf(text + len, sizeof(text) - len, ", %zd DeviceArray view%s of its memory alive",
					u->views, u->views == 1 ? "" : "s");
		tlen += (size_t)snprintf(todo + tlen, sizeof(todo) - tlen, ", drop the views");
	}
	if (u->calls > 0) {
		len += (size_t)snprintf(text + len, sizeof(text) - len,
					", %zd of its calls running (in another thread, or calling back into Python)",
					u->calls);
		tlen += (size_t)snprintf(todo + tlen, sizeof(todo) - tlen, ", let the calls return");
	}
	if (u->caches > 0) {
		snprintf(text + len, sizeof(text) - len, ", %zd KVCache%s built on it", u->caches,
			 u->caches == 1 ? "" : "s");
		snprintf(todo + tlen, sizeof(todo) - tlen, ", close the KVCaches");
	}
	pyaeg_raise_msg(AEG_EBUSY, "%s is in use (%s): nothing was freed; %s, then close it (or let collection free it "
			"once they are gone)", what, text + 2, todo + 2);
	return -1;
}

/* -------------------------------------------------------- argument helpers */

const char *pyaeg_tname(PyObject *obj)
{
	static char buf[96];    /* the GIL serialises callers */
	PyObject *name = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), "__name__");
	const char *s = name != NULL ? PyUnicode_AsUTF8AndSize(name, NULL) : NULL;

	snprintf(buf, sizeof(buf), "%s", s != NULL ? s : "?");
	if (s == NULL)
		PyErr_Clear();
	Py_XDECREF(name);
	return buf;
}

/* An int, or an object that is one (numpy's integers: __index__), as a new reference; NULL with TypeError. */
static PyObject *as_int(PyObject *obj, const char *what)
{
	if (PyBool_Check(obj) || (!PyLong_Check(obj) && !PyIndex_Check(obj))) {
		PyErr_Format(PyExc_TypeError, "%s must be an int, not %s", what, pyaeg_tname(obj));
		return NULL;
	}
	return PyNumber_Index(obj);
}

int pyaeg_u64(PyObject *obj, const char *what, int allow_zero, uint64_t *out)
{
	unsigned long long v;
	PyObject *num = as_int(obj, what), *zero;
	int negative;

	if (num == NULL)
		return -1;
	zero = PyLong_FromLong(0);
	negative = zero == NULL ? -1 : PyObject_RichCompareBool(num, zero, Py_LT);
	Py_XDECREF(zero);
	if (negative != 0) {
		if (negative > 0)
			PyErr_Format(PyExc_ValueError, "%s must not be negative (got %R)", what, num);
		Py_DECREF(num);
		return -1;
	}
	v = PyLong_AsUnsignedLongLong(num);
	if (v == (unsigned long long)-1 && PyErr_Occurred()) {
		PyErr_Clear();
		PyErr_Format(PyExc_ValueError, "%s %R does not fit in 64 bits", what, num);
		Py_DECREF(num);
		return -1;
	}
	Py_DECREF(num);
	if (v == 0 && !allow_zero) {
		PyErr_Format(PyExc_ValueError, "%s must be greater than 0", what);
		return -1;
	}
	*out = v;
	return 0;
}

int pyaeg_gpu(PyObject *obj, int *gpu)
{
	uint64_t v;

	if (pyaeg_u64(obj, "gpu_id", 1, &v) < 0)
		return -1;
	if (v > 1023) {
		PyErr_Format(PyExc_ValueError, "gpu_id %llu is out of range (0..1023)", (unsigned long long)v);
		return -1;
	}
	*gpu = (int)v;
	return 0;
}

int pyaeg_timeout(PyObject *obj, double *seconds)
{
	double v;

	if (obj == NULL || obj == Py_None) {
		*seconds = -1;
		return 0;
	}
	if (!PyLong_Check(obj) && !PyFloat_Check(obj)) {
		PyErr_Format(PyExc_TypeError, "timeout must be a number of seconds or None, not %s",
			     pyaeg_tname(obj));
		return -1;
	}
	v = PyFloat_AsDouble(obj);
	if (v == -1.0 && PyErr_Occurred())
		return -1;
	if (isnan(v) || v < 0) {
		PyErr_Format(PyExc_ValueError, "timeout must be >= 0 seconds or None (got %R)", obj);
		return -1;
	}
	*seconds = v;
	return 0;
}

int pyaeg_handle(PyObject *obj, aeg_handle_t *handle)
{
	char *data;
	Py_ssize_t len;

	if (PyBytes_Check(obj)) {
		if (PyBytes_AsStringAndSize(obj, &data, &len) < 0)
			return -1;
	} else if (PyByteArray_Check(obj)) {
		data = PyByteArray_AsString(obj);
		len = PyByteArray_Size(obj);
	} else {
		PyErr_Format(PyExc_TypeError, "an event handle must be bytes, not %s", pyaeg_tname(obj));
		return -1;
	}
	if (len != AEG_HANDLE_BYTES) {
		PyErr_Format(PyExc_ValueError, "an event handle has %d bytes, not %zd", AEG_HANDLE_BYTES, len);
		return -1;
	}
	memcpy(handle->bytes, data, AEG_HANDLE_BYTES);
	return 0;
}

PyObject *pyaeg_handle_bytes(const aeg_handle_t *handle)
{
	return PyBytes_FromStringAndSize((const char *)handle->bytes, AEG_HANDLE_BYTES);
}

/*
 * @seq as a tuple or a list of our own (a new reference: @seq itself when it
 * is a tuple), or NULL with TypeError for what is no sequence of ints. A
 * caller's list is copied: an item's __index__ may change it (shorten it,
 * drop the item being converted) while the items are converted.
 */
static PyObject *int_sequence(PyObject *seq, const char *what)
{
	PyObject *fast;

	if (PyUnicode_Check(seq) || PyBytes_Check(seq) || PyLong_Check(seq)) {
		PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints, not %s", what, pyaeg_tname(seq));
		return NULL;
	}
	if (PyTuple_Check(seq)) {
		Py_INCREF(seq);
		return seq;
	}
	fast = PySequence_List(seq);
	if (fast == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
		PyErr_Clear();
		PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints, not %s", what, pyaeg_tname(seq));
	}
	return fast;
}

static Py_ssize_t seq_size(PyObject *fast)
{
	return PyList_Check(fast) ? PyList_Size(fast) : PyTuple_Size(fast);
}

static PyObject *seq_item(PyObject *fast, Py_ssize_t i)
{
	return PyList_Check(fast) ? PyList_GetItem(fast, i) : PyTuple_GetItem(fast, i);
}

/*
 * An engine passes thousands of ids a call: a plain int in range is taken
 * with one call (the checked way, pyaeg_u64, took twice as long: 16384 ids
 * cost 5% of a call of 8192 x 32 KiB on the H200); anything else goes the
 * checked way, which says what is wrong with it.
 */
static int one_id(PyObject *item, const char *what, Py_ssize_t i, uint32_t max, uint32_t *id)
{
	uint64_t v;
	long long quick;
	int overflow = 0;

	if (PyLong_CheckExact(item)) {
		quick = PyLong_AsLongLongAndOverflow(item, &overflow);
		if (!overflow && quick >= 0 && (unsigned long long)quick < max) {
			*id = (uint32_t)quick;
			return 0;
		}
		if (quick == -1 && PyErr_Occurred())
			return -1;
	}
	if (pyaeg_u64(item, what, 1, &v) < 0)
		return -1;
	if (v >= max) {
		PyErr_Format(PyExc_ValueError, "%s[%zd] = %llu is out of range (0..%u)", what, i, (unsigned long long)v,
			     max - 1);
		return -1;
	}
	*id = (uint32_t)v;
	return 0;
}

/* One integer of @size bytes at @p, signed or not: its magnitude, and whether it is negative. */
static uint64_t read_int(const unsigned char *p, unsigned size, int is_signed, int *negative)
{
	union { int8_t i8; uint8_t u8; int16_t i16; uint16_t u16; int32_t i32; uint32_t u32; int64_t i64; uint64_t u64; } v;
	int64_t sv;

	memcpy(&v, p, size);
	if (!is_signed) {
		*negative = 0;
		return size == 1 ? v.u8 : size == 2 ? v.u16 : size == 4 ? v.u32 : v.u64;
	}
	sv = size == 1 ? v.i8 : size == 2 ? v.i16 : size == 4 ? v.i32 : v.i64;
	*negative = sv < 0;
	return sv < 0 ? 0 : (uint64_t)sv;
}

/* @d[@key] (@index >= 0: item @index of the tuple there) as a C integer; -1 with TypeError. */
static int dict_int(PyObject *d, const char *key, int index, long long *v)
{
	PyObject *o = PyDict_GetItemString(d, key);

	if (o != NULL && index >= 0)
		o = PyTuple_Check(o) && PyTuple_Size(o) > index ? PyTuple_GetItem(o, index) : NULL;
	if (o == NULL || !PyLong_Check(o)) {
		PyErr_Format(PyExc_TypeError, "__array_interface__[\"%s\"] is missing or not what it should be", key);
		return -1;
	}
	*v = PyLong_AsLongLong(o);
	return *v == -1 && PyErr_Occurred() ? -1 : 0;
}

/*
 * Ids of an array that speaks numpy's array interface (a numpy array, or a
 * torch CPU tensor's .numpy()): read in place, a few microseconds for
 * thousands, where a list costs about 15 ns an id. 1-D arrays of 1, 2, 4 or
 * 8-byte integers in this machine's byte order, any stride. 1 when done,
 * 0 when @obj has no array interface (no exception), -1 with an exception.
 */
static int array_ids(PyObject *obj, const char *what, uint32_t max, uint32_t **idsp, size_t *np)
{
	PyObject *ai, *shape, *strides, *typestr, *mask;
	const char *ts;
	long long n, stride, addr;
	unsigned size;
	int is_signed, rc = -1;
	uint32_t *ids = NULL;

	if (PyLong_Check(obj) || PyList_Check(obj) || PyTuple_Check(obj))
		return 0;
	ai = PyObject_GetAttrString(obj, "__array_interface__");
	if (ai == NULL) {
		if (!PyErr_ExceptionMatches(PyExc_AttributeError))
			return -1;
		PyErr_Clear();
		return 0;
	}
	if (!PyDict_Check(ai)) {
		PyErr_Format(PyExc_TypeError, "%s: __array_interface__ of %s is not a dict", what, pyaeg_tname(obj));
		goto out;
	}
	shape = PyDict_GetItemString(ai, "shape");
	typestr = PyDict_GetItemString(ai, "typestr");
	strides = PyDict_GetItemString(ai, "strides");
	mask = PyDict_GetItemString(ai, "mask");
	ts = typestr != NULL && PyUnicode_Check(typestr) ? PyUnicode_AsUTF8AndSize(typestr, NULL) : NULL;
	if (shape == NULL || !PyTuple_Check(shape) || PyTuple_Size(shape) != 1) {
		PyErr_Format(PyExc_TypeError, "%s must be one-dimensional, not an array of shape %R", what,
			     shape != NULL ? shape : Py_None);
		goto out;
	}
	if (ts == NULL || strlen(ts) != 3 || (ts[1] != 'i' && ts[1] != 'u') ||
	    (ts[2] != '1' && ts[2] != '2' && ts[2] != '4' && ts[2] != '8') ||
	    !(ts[0] == '|' || ts[0] == '=' || ts[0] == (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>'))) {
		PyErr_Format(PyExc_TypeError, "%s must be an array of integers in this machine's byte order, not of %s",
			     what, ts != NULL ? ts : "an unknown type");
		goto out;
	}
	if (mask != NULL && mask != Py_None) {
		PyErr_Format(PyExc_TypeError, "%s: a masked array has no ids where it is masked", what);
		goto out;
	}
	size = (unsigned)(ts[2] - '0');
	is_signed = ts[1] == 'i';
	if (dict_int(ai, "shape", 0, &n) < 0 || dict_int(ai, "data", 0, &addr) < 0)
		goto out;
	stride = size;
	if (strides != NULL && strides != Py_None && dict_int(ai, "strides", 0, &stride) < 0)
		goto out;
	if (n < 0 || n > UINT32_MAX || (n > 0 && addr == 0)) {
		PyErr_Format(PyExc_ValueError, "%s: __array_interface__ of %s gives %lld items at address %p", what,
			     pyaeg_tname(obj), n, (void *)(uintptr_t)addr);
		goto out;
	}
	ids = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(*ids));
	if (ids == NULL) {
		PyErr_NoMemory();
		goto out;
	}
	/* numpy's usual ids, uint32 and int64 end to end: one comparison each. */
	if (stride == size && size == 4 && !is_signed) {
		const uint32_t *a = (const uint32_t *)(uintptr_t)addr;
		uint32_t worst = 0;

		for (long long i = 0; i < n; i++) {
			ids[i] = a[i];
			worst = a[i] > worst ? a[i] : worst;
		}
		if (worst < max)
			goto done;
	} else if (stride == size && size == 8 && is_signed) {
		const int64_t *a = (const int64_t *)(uintptr_t)addr;
		uint64_t worst = 0;

		for (long long i = 0; i < n; i++) {
			ids[i] = (uint32_t)a[i];
			worst |= (uint64_t)a[i] >= max ? 1 : 0;     /* a negative one is huge as unsigned */
		}
		if (worst == 0)
			goto done;
	}
	/* Any other layout, or an id out of range somewhere: one at a time, to say which. */
	for (long long i = 0; i < n; i++) {
		int negative;
		uint64_t v = read_int((const unsigned char *)(uintptr_t)addr + i * stride, size, is_signed, &negative);

		if (negative || v >= max) {
			if (negative)
				PyErr_Format(PyExc_ValueError, "%s[%lld] is negative", what, i);
			else
				PyErr_Format(PyExc_ValueError, "%s[%lld] = %llu is out of range (0..%u)", what, i,
					     (unsigned long long)v, max - 1);
			PyMem_Free(ids);
			ids = NULL;
			goto out;
		}
		ids[i] = (uint32_t)v;
	}
done:
	*idsp = ids;
	*np = (size_t)n;
	rc = 1;
out:
	Py_DECREF(ai);
	return rc;
}

/* Ids of a list, a tuple or another sequence of ints. */
static int list_ids(PyObject *seq, const char *what, uint32_t max, uint32_t **idsp, size_t *np)
{
	PyObject *fast = int_sequence(seq, what);
	uint32_t *ids = NULL;
	Py_ssize_t n;

	if (fast == NULL)
		return -1;
	n = seq_size(fast);
	ids = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(*ids));
	if (ids == NULL) {
		Py_DECREF(fast);
		PyErr_NoMemory();
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (one_id(seq_item(fast, i), what, i, max, &ids[i]) < 0)
			goto fail;
	}
	Py_DECREF(fast);
	*idsp = ids;
	*np = (size_t)n;
	return 0;
fail:
	Py_DECREF(fast);
	PyMem_Free(ids);
	return -1;
}

int pyaeg_id_list(PyObject *seq, const char *what, uint32_t max, uint32_t **idsp, size_t *np)
{
	int rc = array_ids(seq, what, max, idsp, np);

	if (rc != 0)
		return rc < 0 ? -1 : 0;
	return list_ids(seq, what, max, idsp, np);
}

int pyaeg_u64_list(PyObject *seq, const char *what, uint64_t **out, size_t *np)
{
	PyObject *fast = int_sequence(seq, what);
	uint64_t *v;
	Py_ssize_t n;

	if (fast == NULL)
		return -1;
	n = seq_size(fast);
	v = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(*v));
	if (v == NULL) {
		Py_DECREF(fast);
		PyErr_NoMemory();
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (pyaeg_u64(seq_item(fast, i), what, 1, &v[i]) < 0) {
			Py_DECREF(fast);
			PyMem_Free(v);
			return -1;
		}
	}
	Py_DECREF(fast);
	*out = v;
	*np = (size_t)n;
	return 0;
}

int pyaeg_dict_set(PyObject *dict, const char *key, PyObject *value)
{
	int rc;

	if (value == NULL)
		return -1;
	rc = PyDict_SetItemString(dict, key, value);
	Py_DECREF(value);
	return rc;
}

int pyaeg_path(PyObject *obj, PyObject **bytes)
{
	if (!PyUnicode_Check(obj) && !PyBytes_Check(obj) &&
	    !PyObject_HasAttrString(obj, "__fspath__")) {
		PyErr_Format(PyExc_TypeError, "filepath must be a str, bytes or os.PathLike, not %s",
			     pyaeg_tname(obj));
		return -1;
	}
	return PyUnicode_FSConverter(obj, bytes) ? 0 : -1;
}

static PyObject *new_error(PyObject *module, const char *name, const char *doc, PyObject *bases)
{
	char full[64];
	PyObject *type;

	snprintf(full, sizeof(full), "aegaeon_native.%s", name);
	type = PyErr_NewExceptionWithDoc(full, doc, bases, NULL);
	if (type == NULL)
		return NULL;
	Py_INCREF(type);
	if (PyModule_AddObject(module, name, type) < 0) {
		Py_DECREF(type);
		Py_DECREF(type);
		return NULL;
	}
	return type;
}

int pyaeg_errors_init(PyObject *m)
{
	PyObject *bases;

	pyaeg_error_type = new_error(m, "AegaeonError",
		"An aegaeon library error, an OSError. errno is the errno value for codes\n"
		"that have one (ENOSPC, ETIMEDOUT, ...), else None; code is the library's\n"
		"(negative) code and name its symbol (\"AEG_ENOSPC\", \"AEG_EDEVICE\");\n"
		"the message says what failed, which value and which limit.",
		PyExc_OSError);
	if (pyaeg_error_type == NULL)
		return -1;
	bases = Py_BuildValue("(OO)", pyaeg_error_type, PyExc_TimeoutError);
	timeout_error_type = bases ? new_error(m, "AegaeonTimeoutError",
		"A wait that ran out of time: an AegaeonError and a TimeoutError.", bases) : NULL;
	Py_XDECREF(bases);
	if (timeout_error_type == NULL)
		return -1;
	bases = Py_BuildValue("(OO)", pyaeg_error_type, PyExc_ValueError);
	value_error_type = bases ? new_error(m, "AegaeonValueError",
		"A value the library rejected (AEG_EINVAL, AEG_ERANGE): an AegaeonError and a ValueError.",
		bases) : NULL;
	Py_XDECREF(bases);
	if (value_error_type == NULL)
		return -1;
	return 0;
}

/* aegaeon_native.torch: the Python source python/aegaeon_native_torch.py, built into the extension. */
#include "py_internal.h"

/* The source's bytes, made at build time (Makefile.am), and a NUL. */
static const unsigned char source[] = {
#include "python/aegaeon_native_torch.inc"
	0
};

#define NAME "aegaeon_native.torch"
/* No file is there: linecache asks the module's __loader__ for the lines. */
#define FILENAME "aegaeon_native/torch.py"

/*
 * The submodule is made when aegaeon_native is imported and registered in
 * sys.modules, so `import aegaeon_native.torch` finds it although the
 * extension is no package; its functions import torch when called.
 */
int pyaeg_torch_init(PyObject *module)
{
	PyObject *sub, *dict, *code = NULL, *text, *file, *r;
	int rc = -1;

	sub = PyModule_New(NAME);
	if (sub == NULL)
		return -1;
	dict = PyModule_GetDict(sub);
	text = PyUnicode_FromString((const char *)source);
	file = PyUnicode_FromString(FILENAME);
	if (text == NULL || file == NULL || PyDict_SetItemString(dict, "_SOURCE", text) < 0 ||
	    PyDict_SetItemString(dict, "__file__", file) < 0 ||
	    PyDict_SetItemString(dict, "__builtins__", PyEval_GetBuiltins()) < 0)
		goto out;
	code = Py_CompileString((const char *)source, FILENAME, Py_file_input);
	if (code == NULL)
		goto out;
	r = PyEval_EvalCode(code, dict, dict);
	if (r == NULL)
		goto out;
	Py_DECREF(r);
	if (PyDict_SetItemString(PyImport_GetModuleDict(), NAME, sub) < 0)
		goto out;
	Py_INCREF(sub);
	if (PyModule_AddObject(module, "torch", sub) < 0) {
		Py_DECREF(sub);
		goto out;
	}
	rc = 0;
out:
	Py_XDECREF(code);
	Py_XDECREF(text);
	Py_XDECREF(file);
	Py_DECREF(sub);
	return rc;
}

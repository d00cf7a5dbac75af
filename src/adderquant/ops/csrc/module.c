/* The Python extension module holding the compiled kernels; their functions are called
 * through ctypes (adderquant/ops/_loader.py), so the module itself defines nothing. */
#include <Python.h>

static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&def); }

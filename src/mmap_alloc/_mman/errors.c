/*
 * The one error vocabulary: every failure of the operating system becomes
 * a Python exception here, naming the call that failed, and nothing here
 * runs Python code on EINTR (PyErr_SetFromErrno would run signal handlers).
 */
#include "mman.h"

#include <stdarg.h>

/* Raise type(args..., **kwargs) as built; returns NULL. */
static PyObject *
raise_built(PyObject *exc)
{
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* AllocError(message, errno=err, size=size), or MemoryError(message) before
 * exceptions.py registered the type. */
static PyObject *
raise_alloc_message(int err, Py_ssize_t size, PyObject *message)
{
    PyObject *exc = NULL, *args, *kwargs;

    if (message == NULL)
        return NULL;
    if (kernel.alloc_error == NULL) {
        exc = PyObject_CallFunctionObjArgs(PyExc_MemoryError, message, NULL);
        Py_DECREF(message);
        return raise_built(exc);
    }
    args = PyTuple_Pack(1, message);
    kwargs = Py_BuildValue("{s:i,s:n}", "errno", err, "size", size);
    if (args != NULL && kwargs != NULL)
        exc = PyObject_Call(kernel.alloc_error, args, kwargs);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_DECREF(message);
    return raise_built(exc);
}

PyObject *
raise_os_error(int err, const char *call)
{
    /* OSError's constructor picks the subclass (FileNotFoundError ...) */
    return raise_built(PyObject_CallFunction(PyExc_OSError, "iss", err, strerror(err), call));
}

PyObject *
raise_os_error_sized(int err, const char *call, Py_ssize_t size, const char *what)
{
    if (err == ENOMEM || err == EAGAIN)
        return raise_alloc_message(
            err, size,
            PyUnicode_FromFormat("cannot %s %zd bytes: %s (%s; the process may hold "
                                 "vm.max_map_count mappings)", what, size, strerror(err), call));
    return raise_built(PyObject_CallFunction(PyExc_OSError, "iN", err,
                                             PyUnicode_FromFormat("cannot %s %zd bytes: %s (%s)",
                                                                  what, size, strerror(err),
                                                                  call)));
}

PyObject *
raise_alloc_error(int err, Py_ssize_t size, const char *format, ...)
{
    va_list va;
    PyObject *message;

    va_start(va, format);
    message = PyUnicode_FromFormatV(format, va);
    va_end(va);
    return raise_alloc_message(err, size, message);
}

PyObject *
raise_wrong_type(PyObject *got, const char *format, ...)
{
    PyObject *expected, *name = NULL;
    va_list va;

    va_start(va, format);
    expected = PyUnicode_FromFormatV(format, va);
    va_end(va);
    if (expected != NULL)
        name = PyType_GetName(Py_TYPE(got));
    if (name != NULL)
        PyErr_Format(PyExc_TypeError, "%U, not %U", expected, name);
    Py_XDECREF(expected);
    Py_XDECREF(name);
    return NULL;
}

/*
 * Arguments: conversion with the library's messages (every integer through
 * __index__, converted before any check of state), and offset/length pairs
 * read as whole pages of a mapping.
 */
#include "mman.h"

int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max)
{
    if (nargs < min || nargs > max) {
        if (min == max)
            PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd argument(s) (%zd given)",
                         name, min, nargs);
        else
            PyErr_Format(PyExc_TypeError, "%s() takes from %zd to %zd arguments (%zd given)",
                         name, min, max, nargs);
        return -1;
    }
    return 0;
}

/* An integer argument as exact int (new reference): __index__ runs here. */
static PyObject *
as_index(PyObject *o, const char *name)
{
    PyObject *i;

    if (PyLong_CheckExact(o))
        return Py_NewRef(o);
    if (PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, not bool", name);
        return NULL;
    }
    i = PyNumber_Index(o);
    if (i == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        return raise_wrong_type(o, "%s must be an integer", name);
    }
    return i;
}

int
arg_ssize(PyObject *o, const char *name, Py_ssize_t *out)
{
    PyObject *i = as_index(o, name);
    Py_ssize_t v;

    if (i == NULL)
        return -1;
    v = PyLong_AsSsize_t(i);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s is out of range", name);
        }
        return -1;
    }
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative, got %zd", name, v);
        return -1;
    }
    *out = v;
    return 0;
}

int
arg_int(PyObject *o, const char *name, int *out)
{
    /* flags and choices: a bool is an int here */
    PyObject *i = PyLong_Check(o) ? Py_NewRef(o) : as_index(o, name);
    long v;

    if (i == NULL)
        return -1;
    v = PyLong_AsLong(i);
    Py_DECREF(i);
    if ((v == -1 && PyErr_Occurred()) || v < INT_MIN || v > INT_MAX) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s is out of range: %R", name, o);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int
arg_buffer(PyObject *o, const char *name, Py_buffer *view, int flags)
{
    if (PyObject_GetBuffer(o, view, flags) == 0)
        return 0;
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        raise_wrong_type(o, "%s must be a bytes-like object", name);
    }
    return -1;
}

int
arg_address(PyObject *o, void **out)
{
    void *p = PyLong_AsVoidPtr(o);

    if (p == NULL && PyErr_Occurred())
        return -1;
    *out = p;
    return 0;
}

int
convert_range_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                   const char *fname, PyObject **offset, PyObject **length, PyObject **extra,
                   const char *extra_name)
{
    int first = extra_name != NULL;
    /* positional: [first arg (extra, e.g. perms)] offset length; keywords by name */
    PyObject *slots[3] = {NULL, NULL, NULL};   /* extra, offset, length */
    static const char *names[3] = {NULL, "offset", "length"};
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    Py_ssize_t base = first ? 0 : 1;   /* slot of the first positional */

    if (nargs > 3 - base) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     fname, 3 - base, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        slots[base + i] = args[i];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GetItem(kwnames, k);
        Py_ssize_t slot = -1;
        for (Py_ssize_t j = base; j < 3; j++) {
            const char *name = j == 0 ? extra_name : names[j];
            if (name != NULL && PyUnicode_CompareWithASCIIString(key, name) == 0)
                slot = j;
        }
        if (slot < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname,
                         key);
            return -1;
        }
        if (slots[slot] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument %R", fname,
                         key);
            return -1;
        }
        slots[slot] = args[nargs + k];
    }
    if (first && slots[0] == NULL) {
        PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                     extra_name);
        return -1;
    }
    *offset = *length = NULL;
    if (extra != NULL)
        *extra = NULL;
    if (first) {
        *extra = as_index(slots[0], extra_name);
        if (*extra == NULL)
            goto fail;
    }
    *offset = slots[1] == NULL ? PyLong_FromLong(0) : as_index(slots[1], "offset");
    if (*offset == NULL)
        goto fail;
    *length = (slots[2] == NULL || slots[2] == Py_None) ? Py_NewRef(Py_None)
                                                          : as_index(slots[2], "length");
    if (*length == NULL)
        goto fail;
    return 0;
fail:
    if (extra != NULL)
        Py_CLEAR(*extra);
    Py_CLEAR(*offset);
    return -1;
}

int
page_range(const Mapping *m, PyObject *offset, PyObject *length, Py_ssize_t *start,
           Py_ssize_t *n)
{
    Py_ssize_t page = m->page, cap = m->capacity, s, len;

    s = PyLong_AsSsize_t(offset);
    if (s == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        s = -1;
    }
    if (s < 0 || s % page) {
        PyErr_Format(PyExc_ValueError,
                     "offset must be a non-negative multiple of the page size %zd, got %R",
                     page, offset);
        return -1;
    }
    if (s > cap) {
        PyErr_Format(PyExc_ValueError, "offset %zd lies outside the region (capacity %zd)", s,
                     cap);
        return -1;
    }
    if (length == Py_None) {
        *start = s;
        *n = cap - s;
        return 0;
    }
    len = PyLong_AsSsize_t(length);
    if (len == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "offset %zd + length %R lies outside the region "
                     "(capacity %zd)", s, length, cap);
        return -1;
    }
    if (len < 0) {
        PyErr_Format(PyExc_ValueError, "length must not be negative, got %zd", len);
        return -1;
    }
    if (len > cap - s) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + length %zd lies outside the region (capacity %zd)", s, len,
                     cap);
        return -1;
    }
    len = round_up(len, page);
    if (len > cap - s) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + length %zd lies outside the region (capacity %zd)", s, len,
                     cap);
        return -1;
    }
    *start = s;
    *n = len;
    return 0;
}

int
parse_data_offset(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname,
                  PyObject **data, PyObject **offset)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);

    *data = *offset = NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 2 arguments (%zd given)", fname, nargs);
        return -1;
    }
    if (nargs > 0)
        *data = args[0];
    if (nargs > 1)
        *offset = args[1];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GetItem(kwnames, k);
        PyObject **slot = PyUnicode_CompareWithASCIIString(key, "data") == 0     ? data
                          : PyUnicode_CompareWithASCIIString(key, "offset") == 0 ? offset
                                                                                 : NULL;
        if (slot == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname,
                         key);
            return -1;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument %R", fname, key);
            return -1;
        }
        *slot = args[nargs + k];
    }
    if (*data == NULL) {
        PyErr_Format(PyExc_TypeError, "%s() missing required argument 'data'", fname);
        return -1;
    }
    return 0;
}

int
list_append_new(PyObject *list, PyObject *item)
{
    int err = item == NULL || PyList_Append(list, item) < 0;

    Py_XDECREF(item);
    return err ? -1 : 0;
}

RegionObject *
region_range_arg(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname,
                 const char *method, RegionObject *(*kind)(PyObject *), Py_ssize_t *start,
                 Py_ssize_t *n)
{
    RegionObject *self;
    PyObject *offset, *length;

    if (nargs < 1) {
        PyErr_Format(PyExc_TypeError, "%s() needs a region", fname);
        return NULL;
    }
    if (convert_range_args(args + 1, nargs - 1, kwnames, method, &offset, &length, NULL, NULL)
        < 0)
        return NULL;
    self = kind(args[0]);
    if (self != NULL && page_range(&self->m, offset, length, start, n) < 0)
        self = NULL;
    Py_DECREF(offset);
    Py_DECREF(length);
    return self;
}

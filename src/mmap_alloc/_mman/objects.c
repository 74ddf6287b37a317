/*
 * What the kernel's object types share: the end of their deallocation, the
 * visit of their type, one getter for fields that need no computation but a
 * read (see "objects.c" in mman.h), and the head of the two tokens of a hold
 * (tokens.h).
 */
#include "mman.h"

void
kernel_dealloc(PyObject *self, inquiry release)
{
    PyTypeObject *tp = Py_TYPE(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    if (PyType_IS_GC(tp))
        PyObject_GC_UnTrack(self);
    (void)release(self);
    tp_free(self);
    Py_DECREF(tp);
}

int
kernel_visit(PyObject *self, PyObject *ref, visitproc visit, void *arg)
{
    Py_VISIT(ref);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

PyObject *
field_get(PyObject *self, void *closure)
{
    const FieldGetter *f = closure;
    const char *field = (const char *)self + f->offset;
    const Mapping *m = (const Mapping *)field;

    switch (f->kind) {
    case GET_BOOL:
        return PyBool_FromLong(*(const int *)field);
    case GET_SSIZE:
        return PyLong_FromSsize_t(*(const Py_ssize_t *)field);
    case GET_CLOSED:
        return PyBool_FromLong(m->data == NULL);
    case GET_BUSY:
        return PyLong_FromSsize_t(mapping_busy(m));
    case GET_EXPORTS:
        return PyLong_FromSsize_t(mapping_exports(m));
    case GET_PINS:
        return PyLong_FromSsize_t(mapping_pins(m));
    default:
        return PyLong_FromSsize_t(mapping_align(m));
    }
}

TokenObject *
token_new(PyTypeObject *type)
{
    TokenObject *t = PyObject_GC_New(TokenObject, type);

    if (t != NULL) {
        t->owner = NULL;
        t->m = NULL;
        t->hold = NULL;
    }
    return t;
}

void
token_release(TokenObject *t)
{
    if (t->hold != NULL) {
        mapping_unhold(t->m, t->hold);
        t->hold = NULL;
    }
    Py_CLEAR(t->owner);
}

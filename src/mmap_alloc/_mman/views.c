/*
 * View: the one exporter of the library's memory besides the owners' own
 * buffer slots: part of any mapping (Region.view, SecretBuffer.open,
 * CodeBlock.writer) or one pool object (ObjectPool.view). A view holds what
 * it covers for as long as it lives, and exposes nothing else:
 * memoryview.obj of a view cannot close, move or free the memory under it.
 */
#include "mman.h"

typedef struct {
    TOKEN_HEAD                  /* owner: the mapping's owner, or a pool; no hold for a pool */
    Py_ssize_t *counter;        /* pool memory: the slab's count of views */
    char *base;
    Py_ssize_t length;
    int writable;
    Py_ssize_t buffers;         /* Py_buffers given out and not released */
} ViewObject;


/* The end of both ways of making a view: v holds (or counts) its memory. */
static PyObject *
view_finish(ViewObject *v, PyObject *owner, char *base, Py_ssize_t length, int writable)
{
    PyObject *memory;

    v->owner = Py_NewRef(owner);
    v->buffers = 0;
    v->base = base;
    v->length = length;
    v->writable = writable;
    PyObject_GC_Track(v);
    memory = PyMemoryView_FromObject((PyObject *)v);
    Py_DECREF(v);
    return memory;
}

/* A view holding nothing yet: made before the checks, as its allocation
 * may start a collection whose finalizers change what they check. */
static ViewObject *
view_alloc(void)
{
    ViewObject *v = (ViewObject *)token_new(kernel.view_type);

    if (v != NULL)
        v->counter = NULL;
    return v;
}

PyObject *
view_new(PyObject *owner, Mapping *m, Py_ssize_t start, Py_ssize_t end, int writable)
{
    ViewObject *v = view_alloc();
    int access;

    if (v == NULL)
        return NULL;
    if (m->data == NULL) {
        PyErr_SetString(PyExc_ValueError, "the memory is closed");
        goto fail;
    }
    if (end > m->capacity) {
        PyErr_SetString(PyExc_ValueError, "the range lies outside the mapping");
        goto fail;
    }
    access = start < end ? rec_access_all(&m->rec, start, end) : PROT_RW;
    if (!(access & PROT_READ)) {
        PyErr_Format(PyExc_BufferError,
                     "bytes %zd to %zd of the region are not readable "
                     "(see region.protections())", start, end);
        goto fail;
    }
    writable = writable && (access & PROT_WRITE);
    v->hold = mapping_hold(m, start, end, writable ? HOLD_WRITE : HOLD_READ);
    if (v->hold == NULL)
        goto fail;
    v->m = m;
    return view_finish(v, owner, m->data + start, end - start, writable);
fail:
    Py_DECREF(v);
    return NULL;
}

PyObject *
view_counted(PyObject *owner, const void *key,
             int (*target)(PyObject *owner, const void *key, ViewTarget *t))
{
    ViewObject *v = view_alloc();
    ViewTarget t;

    if (v == NULL)
        return NULL;
    if (target(owner, key, &t) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    (*t.counter)++;
    v->counter = t.counter;
    return view_finish(v, owner, t.base, t.length, t.writable);
}

static int
view_getbuffer(ViewObject *v, Py_buffer *buffer, int flags)
{
    buffer->obj = NULL;
    if (v->owner == NULL) {
        PyErr_SetString(PyExc_BufferError, "the view was released");
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !v->writable) {
        PyErr_SetString(PyExc_BufferError, "the view is read-only");
        return -1;
    }
    if (PyBuffer_FillInfo(buffer, (PyObject *)v, v->base, v->length, !v->writable, flags) < 0)
        return -1;
    buffer->internal = v;   /* given back once: see buffer_release_once() */
    v->buffers++;
    return 0;
}

static void
view_releasebuffer(ViewObject *v, Py_buffer *buffer)
{
    if (buffer_release_once(buffer) != NULL)
        v->buffers--;
}

/* _view_exported(view) -> bool: whether a buffer of the view is still alive
 * after its memoryview was released (a slice, a ctypes object, an array
 * made from it). A module function: a view exposes nothing itself. */
PyObject *
view_exported(PyObject *module, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, kernel.view_type)) {
        PyErr_SetString(PyExc_TypeError, "_view_exported() takes a View");
        return NULL;
    }
    return PyBool_FromLong(((ViewObject *)arg)->buffers > 0);
}

ONE_REF_TRAVERSE(view, ViewObject, owner)

static int
view_teardown(PyObject *obj)
{
    ViewObject *v = (ViewObject *)obj;

    if (v->counter != NULL) {
        (*v->counter)--;
        v->counter = NULL;
    }
    token_release((TokenObject *)v);
    return 0;
}

KERNEL_DEALLOC(view_dealloc, view_teardown)

MADE_BY(view_type_new, "views are made by Region.view() and ObjectPool.view()")

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_BUFFER(view)

static PyType_Slot view_slots[] = {
    {Py_tp_doc, "Exports part of a region, or one pool object, and pins it while it lives."},
    {Py_tp_new, view_type_new},
    LIFE_SLOTS(view),
    BUFFER_SLOTS(view),
    {0, NULL},
};

PyType_Spec view_spec
    = KERNEL_SPEC("View", ViewObject, Py_TPFLAGS_HAVE_GC, view_slots);

/* A converted offset or length argument (an exact int) as a Py_ssize_t;
 * PY_SSIZE_T_MAX or PY_SSIZE_T_MIN beyond that range (they are refused
 * below as outside the region, or negative). */
static Py_ssize_t
clipped(PyObject *o)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);

    if (overflow)
        return overflow > 0 ? PY_SSIZE_T_MAX : PY_SSIZE_T_MIN;
    return (Py_ssize_t)v;
}

/* view(offset=0, length=None): bytes [offset, offset + length) of the region */
PyObject *
region_view(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *offset, *length, *result = NULL;
    Py_ssize_t start, n;

    if (convert_range_args(args, nargs, kwnames, "view", &offset, &length, NULL, NULL) < 0)
        return NULL;
    start = clipped(offset);
    n = length == Py_None ? -1 : clipped(length);
    if (start < 0)
        PyErr_Format(PyExc_ValueError, "offset must not be negative, got %R", offset);
    else if (length != Py_None && n < 0)
        PyErr_Format(PyExc_ValueError, "length must not be negative, got %R", length);
    else if (region_check_open(self) < 0)
        ;
    else if (start > self->m.size)
        PyErr_Format(PyExc_ValueError, "offset %R lies outside the region (size %zd)", offset,
                     self->m.size);
    else if (length != Py_None && n > self->m.size - start)
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + length %R lies outside the region (size %zd)", start, length,
                     self->m.size);
    else if (mapping_check_truncated(&self->m, start, length == Py_None ? self->m.size : start + n)
             == 0)
        result = view_new((PyObject *)self, &self->m, start,
                          length == Py_None ? self->m.size : start + n, 1);
    Py_DECREF(offset);
    Py_DECREF(length);
    return result;
}

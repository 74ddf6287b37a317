/*
 * A Region's size: realloc, grow and shrink in place (Region._resize, which
 * MapAlloc's methods call after their checks). Bytes a growth exposes are
 * zeroed first; the core (resize.c) grows in place, moves or drops the tail
 * and keeps the record. Shared and file regions are resized by their own
 * extension (shared_size.c).
 */
#include "mman.h"

#define MODE_REALLOC 0
#define MODE_GROW 1
#define MODE_SHRINK 2

static PyObject *
cannot_in_place(RegionObject *self, const char *what, Py_ssize_t newcap, int err)
{
    PyObject *type = kernel.cannot_realloc ? kernel.cannot_realloc : PyExc_OSError;
    PyErr_Format(type, "cannot %s the region at %p from %zd to %zd bytes in place: %s", what,
                 (void *)self->m.data, self->m.capacity, newcap, strerror(err));
    return NULL;
}

static PyObject *
shrink_in_place(RegionObject *self, Py_ssize_t new_size, Py_ssize_t newcap)
{
    int err;

    if (new_size > self->m.size) {
        PyErr_Format(PyExc_ValueError, "new_size=%zd is larger than the region's size %zd",
                     new_size, self->m.size);
        return NULL;
    }
    if (mapping_check_idle(&self->m, "shrink the region", "the region") < 0)
        return NULL;
    if (newcap < self->m.capacity && (err = mapping_drop_tail(&self->m, newcap)) != 0)
        return cannot_in_place(self, "shrink", newcap, err);
    self->m.size = new_size;
    Py_RETURN_NONE;
}

static PyObject *
grow_in_place(RegionObject *self, Py_ssize_t new_size, Py_ssize_t newcap)
{
    Py_ssize_t cap = self->m.capacity;
    int err;

    if (new_size < self->m.size) {
        PyErr_Format(PyExc_ValueError, "new_size=%zd is smaller than the region's size %zd",
                     new_size, self->m.size);
        return NULL;
    }
    if (mapping_zero(&self->m, self->m.size, new_size < cap ? new_size : cap, "the region") < 0)
        return NULL;
    if (newcap > cap && (err = mapping_grow_in_place(&self->m, newcap)) != 0)
        return cannot_in_place(self, "grow", newcap, err);
    self->m.size = new_size;
    Py_RETURN_NONE;
}

/* realloc: in place when the pages allow, else moved (mremap, or a copy
 * into pages mapped per spec) */
static PyObject *
realloc_region(RegionObject *self, Py_ssize_t new_size, Py_ssize_t newcap, const MapSpec *spec)
{
    Mapping *m = &self->m;
    Py_ssize_t size = m->size;

    if (newcap == m->capacity || (newcap < m->capacity && mapping_exports(m) > 0)) {
        if (new_size > size && mapping_zero(m, size, new_size, "the region") < 0)
            return NULL;
        m->size = new_size;
        Py_RETURN_NONE;
    }
    if (newcap < m->capacity) {
        /* a region shrunk while exported kept its capacity: it may grow within
         * it now, over bytes an export wrote past its size */
        if (mapping_check_idle(m, "shrink the region", "the region") < 0
            || (new_size > size && mapping_zero(m, size, new_size, "the region") < 0))
            return NULL;
        mapping_drop_tail(m, newcap);   /* refused (map count): the capacity stays */
        m->size = new_size;
        Py_RETURN_NONE;
    }
    if (mapping_exports(m) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot move the region: it has %zd exported buffer(s) and %zd bytes do not "
                     "fit in its capacity %zd", mapping_exports(m), new_size, m->capacity);
        return NULL;
    }
    if (mapping_check_idle(m, "move the region", "the region") < 0
        || mapping_zero(m, size, m->capacity, "the region") < 0)
        return NULL;
    if (mapping_grow_in_place(m, newcap) != 0) {
        const char *call;
        int err = mapping_move(m, newcap, spec, &self->backing, &call);
        if ((err == ENOMEM || err == EAGAIN) && kernel_trim_caches() > 0)
            err = mapping_move(m, newcap, spec, &self->backing, &call);
        if (err)
            return err > 0 ? raise_os_error(err, call) : NULL;
    }
    m->size = new_size;
    Py_RETURN_NONE;
}

/* _resize(new_size, mode[, mflags, advice, backing]): realloc (mode 0), grow in
 * place (1), shrink in place (2). For a realloc that must copy, mflags, advice
 * and backing say how to map the new pages instead of the region's own way. */
PyObject *
region_resize(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t new_size, newcap;
    int mode;
    MapSpec spec;

    if (nargs != 2 && check_nargs("_resize", nargs, 5, 5) < 0)
        return NULL;
    if (arg_ssize(args[0], "new_size", &new_size) < 0 || arg_int(args[1], "mode", &mode) < 0)
        return NULL;
    spec.mflags = self->m.mflags;
    spec.advice = self->m.advice;
    spec.backing = NULL;
    if (nargs == 5) {
        if (arg_int(args[2], "mflags", &spec.mflags) < 0
            || arg_int(args[3], "advice", &spec.advice) < 0)
            return NULL;
        spec.backing = args[4];
    }
    if (region_check_open(self) < 0)
        return NULL;
    if (self->m.fd >= 0) {
        PyErr_SetString(PyExc_ValueError, "a shared region is resized with resize()");
        return NULL;
    }
    if (new_size == 0 || new_size > PY_SSIZE_T_MAX - self->m.page)
        return raise_os_error(ENOMEM, "size");
    spec.page = self->m.page;
    newcap = round_up(new_size, self->m.page);
    if (mode == MODE_SHRINK)
        return shrink_in_place(self, new_size, newcap);
    if (mode == MODE_GROW)
        return grow_in_place(self, new_size, newcap);
    return realloc_region(self, new_size, newcap, &spec);
}

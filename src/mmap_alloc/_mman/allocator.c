/*
 * Allocator: the alloc/dealloc fast path of MapAlloc (allocator.py), which
 * subclasses it. alloc(size) with an exact int and no alignment maps pages
 * as the allocator's backing says (up to three attempts, best first, given
 * once by _configure) in one call; every other case, and a refusal by the
 * kernel, goes to the slow path given once (a Python function called as
 * slow(allocator, *args, **kwargs)), which holds the argument checks, the
 * other options and the error messages. dealloc(region) is complete here.
 */
#include "mman.h"

#define MAX_ATTEMPTS 3

typedef struct {
    PyObject_HEAD
    Py_ssize_t page;
    Py_ssize_t mask;
    Py_ssize_t max_size;
    int prot;
    int nattempts;
    MapSpec attempts[MAX_ATTEMPTS];   /* backing: strong references */
    PyTypeObject *region_type;        /* NULL until configured */
    PyObject *slow;
} AllocatorObject;

/* Map capacity bytes with the first attempt the kernel accepts; NULL with
 * the last refusal's OSError set. */
static PyObject *
allocator_map(AllocatorObject *self, Py_ssize_t size, Py_ssize_t capacity, Py_ssize_t align,
              char *address)
{
    PyObject *region = NULL;

    for (int k = 0; k < self->nattempts; k++) {
        const MapSpec *spec = &self->attempts[k];
        MapSpec aligned;
        if (align > spec->align) {
            aligned = *spec;
            aligned.align = align;
            spec = &aligned;
        }
        if (k > 0)
            PyErr_Clear();
        region = region_map(self->region_type, size, capacity, spec, (PyObject *)self, address);
        if (region != NULL)
            return region;
    }
    return region;
}

/* Whether alloc()'s arguments after the size leave the alignment out. */
static int
no_alignment(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);

    if (nargs + nkw == 1)
        return 1;
    if (nargs + nkw != 2 || args[1] != Py_None)
        return 0;
    return nkw == 0
           || PyUnicode_CompareWithASCIIString(PyTuple_GetItem(kwnames, 0), "align") == 0;
}

static PyObject *
allocator_alloc(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    PyObject *region;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);

    if (self->region_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "the allocator is not configured");
        return NULL;
    }
    if (nargs >= 1 && PyLong_CheckExact(args[0]) && no_alignment(args, nargs, kwnames)) {
        Py_ssize_t size = PyLong_AsSsize_t(args[0]);
        if (size > 0 && size <= self->max_size) {
            region = allocator_map(self, size, (size + self->mask) & ~self->mask, 0, NULL);
            if (region != NULL)
                return region;
        }
        PyErr_Clear();   /* the slow path says what went wrong */
    }
    /* everything else is the slow path's: slow(self, *args, **kwargs) */
    {
        PyObject *tuple = PyTuple_New(nargs + 1), *kwargs = NULL, *result = NULL;
        if (tuple == NULL)
            return NULL;
        PyTuple_SetItem(tuple, 0, Py_NewRef((PyObject *)self));
        for (Py_ssize_t k = 0; k < nargs; k++)
            PyTuple_SetItem(tuple, k + 1, Py_NewRef(args[k]));
        if (nkw > 0) {
            kwargs = PyDict_New();
            if (kwargs == NULL)
                goto done;
            for (Py_ssize_t k = 0; k < nkw; k++)
                if (PyDict_SetItem(kwargs, PyTuple_GetItem(kwnames, k), args[nargs + k]) < 0)
                    goto done;
        }
        result = PyObject_Call(self->slow, tuple, kwargs);
    done:
        Py_DECREF(tuple);
        Py_XDECREF(kwargs);
        return result;
    }
}

/* _map(size, capacity, align, address=None) -> Region: the attempts with an
 * alignment (OSError with errno when the kernel refuses them all); at address
 * exactly when given, never replacing a mapping (see region_map_at) */
static PyObject *
allocator_map_method(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, capacity, align;
    void *address = NULL;

    if (check_nargs("_map", nargs, 3, 4) < 0 || arg_ssize(args[0], "size", &size) < 0
        || arg_ssize(args[1], "capacity", &capacity) < 0
        || arg_ssize(args[2], "align", &align) < 0
        || (nargs > 3 && args[3] != Py_None && arg_address(args[3], &address) < 0))
        return NULL;
    if (self->region_type == NULL || size == 0 || size > capacity || capacity % self->page
        || (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad mapping parameters");
        return NULL;
    }
    return allocator_map(self, size, capacity, align, address);
}

static PyObject *
allocator_dealloc(AllocatorObject *self, PyObject *region)
{
    RegionObject *r = (RegionObject *)region;
    Mapping *m = &r->m;

    /* the common case in one go: a region of ours, open, idle, plain */
    if (Py_TYPE(region) == self->region_type && r->owner == (PyObject *)self && m->data != NULL
        && m->holds == NULL && mapping_busy(m) == 0 && (m->flags & ~MAPPING_COMMITTED) == 0
        && !mapping_unmap_is_slow(m)) {
        char *p = m->data;
        m->data = NULL;
        if (os_unmap(p, (size_t)m->capacity) == 0) {
            kernel.mapped_bytes -= m->capacity;
            trace_unmapped(p);
            if (kernel.ngraves)
                flush_graveyard();
            Py_RETURN_NONE;
        }
        m->data = p;   /* refused (vm.max_map_count): the general path says why */
    }
    if (!is_region(region)) {
        PyObject *name = PyType_GetName(Py_TYPE(region));
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "expected a Region, not %U", name);
            Py_DECREF(name);
        }
        return NULL;
    }
    return region_release((RegionObject *)region, (PyObject *)self);
}

static void
clear_attempts(AllocatorObject *self)
{
    for (int k = 0; k < self->nattempts; k++)
        Py_CLEAR(self->attempts[k].backing);
    self->nattempts = 0;
}

/* _configure(page, max_size, prot, populate, attempts, region_type, slow):
 * attempts is a sequence of (mflags, advice, align, backing), best first */
static PyObject *
allocator_configure(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t page, max_size, n;
    int prot, populate;
    MapSpec attempts[MAX_ATTEMPTS];
    PyObject *seq;

    if (check_nargs("_configure", nargs, 7, 7) < 0 || arg_ssize(args[0], "page", &page) < 0
        || arg_ssize(args[1], "max_size", &max_size) < 0 || arg_int(args[2], "prot", &prot) < 0
        || arg_int(args[3], "populate", &populate) < 0)
        return NULL;
    if (page <= 0 || (page & (page - 1)) || !PyType_Check(args[5])
        || !PyType_IsSubtype((PyTypeObject *)args[5], kernel.region_type) || !PyCallable_Check(args[6])) {
        PyErr_SetString(PyExc_ValueError, "bad allocator configuration");
        return NULL;
    }
    seq = PySequence_Tuple(args[4]);
    if (seq == NULL)
        return NULL;
    n = PyTuple_Size(seq);
    if (n < 1 || n > MAX_ATTEMPTS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "one to three mapping attempts");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyTuple_GetItem(seq, k);
        if (!PyTuple_Check(item) || PyTuple_Size(item) != 4
            || arg_int(PyTuple_GetItem(item, 0), "mflags", &attempts[k].mflags) < 0
            || arg_int(PyTuple_GetItem(item, 1), "advice", &attempts[k].advice) < 0
            || arg_ssize(PyTuple_GetItem(item, 2), "align", &attempts[k].align) < 0) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "an attempt is (mflags, advice, align, backing)");
            return NULL;
        }
        attempts[k].backing = PyTuple_GetItem(item, 3);
    }
    clear_attempts(self);
    for (Py_ssize_t k = 0; k < n; k++) {
        self->attempts[k] = attempts[k];
        self->attempts[k].prot = prot;
        self->attempts[k].populate = populate;
        self->attempts[k].page = page;
        Py_INCREF(self->attempts[k].backing);
    }
    self->nattempts = (int)n;
    Py_DECREF(seq);
    self->page = page;
    self->mask = page - 1;
    self->max_size = max_size;
    self->prot = prot;
    Py_XDECREF((PyObject *)self->region_type);
    self->region_type = (PyTypeObject *)Py_NewRef(args[5]);
    Py_XDECREF(self->slow);
    self->slow = Py_NewRef(args[6]);
    Py_RETURN_NONE;
}

static int
allocator_traverse(AllocatorObject *self, visitproc visit, void *arg)
{
    for (int k = 0; k < self->nattempts; k++)
        Py_VISIT(self->attempts[k].backing);
    Py_VISIT(self->region_type);
    Py_VISIT(self->slow);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static int
allocator_clear(AllocatorObject *self)
{
    clear_attempts(self);
    Py_CLEAR(self->region_type);
    Py_CLEAR(self->slow);
    return 0;
}

static void
allocator_dealloc_object(AllocatorObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    PyObject_GC_UnTrack(self);
    allocator_clear(self);
    tp_free(self);
    Py_DECREF(tp);
}

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FASTKW(allocator_alloc)
LOCKED_O(allocator_dealloc)
LOCKED_FAST(allocator_map_method)
LOCKED_FAST(allocator_configure)

static PyMethodDef allocator_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))LOCKED(allocator_alloc), METH_FASTCALL | METH_KEYWORDS,
     "alloc($self, /, size, align=None, *, near=None, within=2147483648)\n--\n\n"
     "A new region of at least size bytes (whole pages), zero-filled, page-aligned\n"
     "(or aligned to align, a power of two); with near, every byte of it lies less\n"
     "than within bytes from near."},
    {"dealloc", (PyCFunction)LOCKED(allocator_dealloc), METH_O,
     "dealloc($self, region, /)\n--\n\n"
     "Unmap the region. BufferError (nothing changed) while a buffer or function of it lives."},
    {"_map", (PyCFunction)(void (*)(void))LOCKED(allocator_map_method), METH_FASTCALL,
     "_map(size, capacity, align, address=None) -> Region: map with the configured\n"
     "attempts (at address exactly, never replacing a mapping, when given)."},
    {"_configure", (PyCFunction)(void (*)(void))LOCKED(allocator_configure), METH_FASTCALL,
     "_configure(page, max_size, prot, populate, attempts, region_type, slow)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef allocator_members[] = {
    {"_page", T_PYSSIZET, offsetof(AllocatorObject, page), READONLY, "The page size."},
    {"_mask", T_PYSSIZET, offsetof(AllocatorObject, mask), READONLY, "page - 1."},
    {"_max_size", T_PYSSIZET, offsetof(AllocatorObject, max_size), READONLY,
     "The largest size alloc() takes."},
    {"_prot", T_INT, offsetof(AllocatorObject, prot), READONLY, "PROT_* of new regions."},
    {NULL, 0, 0, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_DEALLOC(allocator_dealloc_object)

static PyType_Slot allocator_slots[] = {
    {Py_tp_doc, "The alloc/dealloc fast path of MapAlloc."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, LOCKED(allocator_dealloc_object)},
    {Py_tp_traverse, allocator_traverse},
    {Py_tp_clear, allocator_clear},
    {Py_tp_methods, allocator_methods},
    {Py_tp_members, allocator_members},
    {0, NULL},
};

PyType_Spec allocator_spec = {
    .name = "mmap_alloc._mman.Allocator",
    .basicsize = sizeof(AllocatorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = allocator_slots,
};

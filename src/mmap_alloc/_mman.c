/*
 * _mman: the system-call layer of mmap_alloc.
 *
 * This file makes system calls and returns plain values, or raises OSError
 * with errno. Every decision (sizes, alignment, which advice, which error a
 * user sees) is taken by the Python layer above it.
 *
 * Region owns one anonymous mapping and exports it through the buffer
 * protocol. Its invariants, which keep Python code from crashing the
 * interpreter:
 *   - data == NULL once closed; the pointer is cleared before munmap.
 *   - while exports > 0 (a memoryview, numpy array, ctypes object ...) the
 *     mapping is never unmapped, moved, shrunk, or stripped of READ/WRITE.
 *   - while busy > 0 (a system call on it runs without the GIL) it is never
 *     unmapped, moved or shrunk either.
 *   - pins (functions made by region.function()) count as exports, except
 *     that they do not stop READ or WRITE from being removed: code needs
 *     neither, and the Python layer keeps EXEC under them.
 *   - `prot` is the protection common to every page of the mapping; no
 *     buffer is exported without PROT_READ, only a read-only one without
 *     PROT_WRITE.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

typedef struct {
    PyTypeObject *region_type;
    PyTypeObject *allocator_type;
} module_state;

typedef struct {
    PyObject_HEAD
    char *data;            /* NULL once closed */
    Py_ssize_t size;       /* bytes the user asked for; the buffer length */
    Py_ssize_t capacity;   /* bytes mapped; what munmap is given */
    int prot;              /* protection common to all pages */
    int mixed;             /* pages differ in protection */
    Py_ssize_t exports;    /* live buffers, and pins */
    Py_ssize_t pins;       /* live functions made by region.function() */
    Py_ssize_t busy;       /* system calls running without the GIL */
    PyObject *owner;       /* the allocator that made it, or None */
    PyObject *weakreflist;
} RegionObject;

/* Mapping and unmapping this much or more may take long enough (populating
 * or freeing pages) to be worth releasing the GIL; smaller calls take about
 * as long as releasing and taking it back. */
#define SLOW_CALL_BYTES (1 << 20)

/* Bytes mapped by this module and not unmapped yet: every successful
 * mmap, munmap and mremap here adjusts it (the GIL is held when it does).
 * The test suite checks it returns to where it was; a new function that
 * maps or unmaps memory must adjust it too. */
static Py_ssize_t mapped_bytes = 0;

static Py_ssize_t
page_round(Py_ssize_t length)
{
    Py_ssize_t page = (Py_ssize_t)sysconf(_SC_PAGESIZE);
    return (length + page - 1) & ~(page - 1);
}

/* ------------------------------------------------------------------ */
/* argument helpers: the Python layer passes exact ints                */

static int
arg_ssize(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size or offset");
        return -1;
    }
    *out = v;
    return 0;
}

static int
arg_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "flag value out of range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int
arg_address(PyObject *o, void **out)
{
    void *p = PyLong_AsVoidPtr(o);
    if (p == NULL && PyErr_Occurred())
        return -1;
    *out = p;
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)",
                     name, expected, nargs);
        return -1;
    }
    return 0;
}

/* Call the Python method `name` of self with a vectorcall's arguments: the
 * C fast paths hand every case they do not take to a Python method. */
static PyObject *
call_python(PyObject *self, const char *name, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames)
{
    PyObject *method, *tuple = NULL, *kwargs = NULL, *result = NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);

    method = PyObject_GetAttrString(self, name);
    if (method == NULL)
        return NULL;
    tuple = PyTuple_New(nargs);
    if (tuple == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SetItem(tuple, i, args[i]);
    }
    if (nkw > 0) {
        kwargs = PyDict_New();
        if (kwargs == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < nkw; i++) {
            if (PyDict_SetItem(kwargs, PyTuple_GetItem(kwnames, i), args[nargs + i]) < 0)
                goto done;
        }
    }
    result = PyObject_Call(method, tuple, kwargs);
done:
    Py_DECREF(method);
    Py_XDECREF(tuple);
    Py_XDECREF(kwargs);
    return result;
}

/* ------------------------------------------------------------------ */
/* module functions on raw addresses (private: the Python layer only)  */

static PyObject *
mman_page_size(PyObject *module, PyObject *unused)
{
    return PyLong_FromLong(sysconf(_SC_PAGESIZE));
}

static PyObject *
mman_mapped_bytes(PyObject *module, PyObject *unused)
{
    return PyLong_FromSsize_t(mapped_bytes);
}

static PyObject *
mman_mmap(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t length;
    int prot, flags;
    void *p;

    if (check_nargs("mmap", nargs, 3) < 0 || arg_ssize(args[0], &length) < 0
        || arg_int(args[1], &prot) < 0 || arg_int(args[2], &flags) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    p = mmap(NULL, (size_t)length, prot, flags | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    Py_END_ALLOW_THREADS
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    mapped_bytes += page_round(length);
    return PyLong_FromVoidPtr(p);
}

static PyObject *
mman_munmap(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    void *p;
    Py_ssize_t length;
    int rc;

    if (check_nargs("munmap", nargs, 2) < 0 || arg_address(args[0], &p) < 0
        || arg_ssize(args[1], &length) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = munmap(p, (size_t)length);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    mapped_bytes -= page_round(length);
    Py_RETURN_NONE;
}

static PyObject *
mman_mprotect(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    void *p;
    Py_ssize_t length;
    int prot;

    if (check_nargs("mprotect", nargs, 3) < 0 || arg_address(args[0], &p) < 0
        || arg_ssize(args[1], &length) < 0 || arg_int(args[2], &prot) < 0)
        return NULL;
    if (mprotect(p, (size_t)length, prot) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
mman_madvise(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    void *p;
    Py_ssize_t length;
    int advice, rc;

    if (check_nargs("madvise", nargs, 3) < 0 || arg_address(args[0], &p) < 0
        || arg_ssize(args[1], &length) < 0 || arg_int(args[2], &advice) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = madvise(p, (size_t)length, advice);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* Region                                                              */

static module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

static int
region_check_open(RegionObject *self)
{
    if (self->data == NULL) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return -1;
    }
    return 0;
}

static int
region_check_idle(RegionObject *self, const char *what)
{
    if (self->exports > self->pins) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: the region has %zd exported buffer(s)",
                     what, self->exports - self->pins);
        return -1;
    }
    if (self->pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd function(s) made by region.function() run code in it",
                     what, self->pins);
        return -1;
    }
    if (self->busy > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: a system call on the region is in progress", what);
        return -1;
    }
    return 0;
}

/* offset and length must lie within the capacity */
static int
region_check_range(RegionObject *self, PyObject *const *args, Py_ssize_t *offset,
                   Py_ssize_t *length)
{
    if (arg_ssize(args[0], offset) < 0 || arg_ssize(args[1], length) < 0)
        return -1;
    if (*offset > self->capacity || *length > self->capacity - *offset) {
        PyErr_SetString(PyExc_ValueError, "range lies outside the region");
        return -1;
    }
    return 0;
}

static PyObject *
region_wrap(PyTypeObject *cls, char *data, Py_ssize_t size, Py_ssize_t capacity,
            int prot, PyObject *owner)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(cls, Py_tp_alloc);
    RegionObject *self = (RegionObject *)alloc(cls, 0);
    if (self == NULL)
        return NULL;
    self->data = data;
    self->size = size;
    self->capacity = capacity;
    self->prot = prot;
    self->mixed = 0;
    self->exports = 0;
    self->pins = 0;
    self->busy = 0;
    Py_INCREF(owner);
    self->owner = owner;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

/* Map `capacity` bytes and wrap them in a new region of type cls; NULL with
 * OSError set when the kernel refuses. */
static PyObject *
map_region(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity, int prot, int flags,
           PyObject *owner)
{
    void *p;
    PyObject *region;

    if (capacity >= SLOW_CALL_BYTES || (flags & (MAP_POPULATE | MAP_HUGETLB))) {
        Py_BEGIN_ALLOW_THREADS
        p = mmap(NULL, (size_t)capacity, prot, flags | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        Py_END_ALLOW_THREADS
    }
    else
        p = mmap(NULL, (size_t)capacity, prot, flags | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    region = region_wrap(cls, p, size, capacity, prot, owner);
    if (region == NULL)
        munmap(p, (size_t)capacity);
    else
        mapped_bytes += capacity;
    return region;
}

/* Region._map(size, capacity, prot, flags, owner): map and wrap in one step */
static PyObject *
region_map(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, capacity;
    int prot, flags;

    if (check_nargs("_map", nargs, 5) < 0 || arg_ssize(args[0], &size) < 0
        || arg_ssize(args[1], &capacity) < 0 || arg_int(args[2], &prot) < 0
        || arg_int(args[3], &flags) < 0)
        return NULL;
    if (size > capacity) {
        PyErr_SetString(PyExc_ValueError, "size exceeds capacity");
        return NULL;
    }
    return map_region((PyTypeObject *)cls, size, capacity, prot, flags, args[4]);
}

/* Region._adopt(address, size, capacity, prot, owner): own an existing mapping */
static PyObject *
region_adopt(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    void *p;
    Py_ssize_t size, capacity;
    int prot;

    if (check_nargs("_adopt", nargs, 5) < 0 || arg_address(args[0], &p) < 0
        || arg_ssize(args[1], &size) < 0 || arg_ssize(args[2], &capacity) < 0
        || arg_int(args[3], &prot) < 0)
        return NULL;
    if (p == NULL || size > capacity) {
        PyErr_SetString(PyExc_ValueError, "bad mapping");
        return NULL;
    }
    return region_wrap((PyTypeObject *)cls, p, size, capacity, prot, args[4]);
}

static PyObject *
region_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "regions are made by MapAlloc.alloc()");
    return NULL;
}

static PyObject *
region_close(RegionObject *self, PyObject *unused)
{
    char *p = self->data;
    int rc;

    if (p == NULL)
        Py_RETURN_NONE;
    if (region_check_idle(self, "close the region") < 0)
        return NULL;
    self->data = NULL;
    if (self->capacity >= SLOW_CALL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        rc = munmap(p, (size_t)self->capacity);
        Py_END_ALLOW_THREADS
    }
    else
        rc = munmap(p, (size_t)self->capacity);
    if (rc != 0) {
        /* e.g. ENOMEM at vm.max_map_count: the mapping is still there */
        self->data = p;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    mapped_bytes -= self->capacity;
    Py_RETURN_NONE;
}

/* _release(owner): close the region, which must belong to owner and be open;
 * the checks and the unmap in one call, for the allocator's dealloc path */
static PyObject *
region_release(RegionObject *self, PyObject *owner)
{
    if (self->owner != owner) {
        PyErr_SetString(PyExc_ValueError, "region was allocated by another allocator");
        return NULL;
    }
    if (self->data == NULL) {
        PyErr_SetString(PyExc_ValueError, "region was already freed");
        return NULL;
    }
    return region_close(self, NULL);
}

/* _resize(size, capacity, flags) -> address: mremap, or only the size when
 * the capacity stays. flags 0 keeps the address (fails with ENOMEM when the
 * neighbouring pages are taken); MREMAP_MAYMOVE may move it. */
static PyObject *
region_resize(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, capacity;
    int flags;
    void *p;

    if (check_nargs("_resize", nargs, 3) < 0 || arg_ssize(args[0], &size) < 0
        || arg_ssize(args[1], &capacity) < 0 || arg_int(args[2], &flags) < 0)
        return NULL;
    if (region_check_open(self) < 0)
        return NULL;
    if (size > capacity || capacity == 0) {
        PyErr_SetString(PyExc_ValueError, "bad size or capacity");
        return NULL;
    }
    if (capacity != self->capacity) {
        if (capacity < self->capacity || (flags & MREMAP_MAYMOVE)) {
            if (region_check_idle(self, capacity < self->capacity
                                  ? "shrink the region" : "move the region") < 0)
                return NULL;
        }
        else if (self->busy > 0) {
            PyErr_SetString(PyExc_BufferError,
                            "cannot grow the region: a system call on it is in progress");
            return NULL;
        }
        p = mremap(self->data, (size_t)self->capacity, (size_t)capacity, flags);
        if (p == MAP_FAILED)
            return PyErr_SetFromErrno(PyExc_OSError);
        mapped_bytes += capacity - self->capacity;
        self->data = p;
        self->capacity = capacity;
    }
    self->size = size;
    return PyLong_FromVoidPtr(self->data);
}

/* _swap(other): exchange the mappings of two idle regions */
static PyObject *
region_swap(RegionObject *self, PyObject *other)
{
    RegionObject *o;
    char *data;
    Py_ssize_t size, capacity;
    int prot, mixed;

    if (Py_TYPE(other) != Py_TYPE((PyObject *)self)) {
        PyErr_SetString(PyExc_TypeError, "_swap() needs another region");
        return NULL;
    }
    o = (RegionObject *)other;
    if (region_check_open(self) < 0 || region_check_open(o) < 0
        || region_check_idle(self, "move the region") < 0
        || region_check_idle(o, "move the region") < 0)
        return NULL;
    data = self->data; size = self->size; capacity = self->capacity;
    prot = self->prot; mixed = self->mixed;
    self->data = o->data; self->size = o->size; self->capacity = o->capacity;
    self->prot = o->prot; self->mixed = o->mixed;
    o->data = data; o->size = size; o->capacity = capacity; o->prot = prot; o->mixed = mixed;
    Py_RETURN_NONE;
}

/* _copy_from(source, length): copy the first length bytes of source to the
 * start of this region; the caller makes source readable and this writable. */
static PyObject *
region_copy_from(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RegionObject *src;
    Py_ssize_t length;

    if (check_nargs("_copy_from", nargs, 2) < 0 || arg_ssize(args[1], &length) < 0)
        return NULL;
    if (Py_TYPE(args[0]) != Py_TYPE((PyObject *)self)) {
        PyErr_SetString(PyExc_TypeError, "_copy_from() needs another region");
        return NULL;
    }
    src = (RegionObject *)args[0];
    if (region_check_open(self) < 0 || region_check_open(src) < 0)
        return NULL;
    if (length > self->capacity || length > src->capacity) {
        PyErr_SetString(PyExc_ValueError, "length exceeds a capacity");
        return NULL;
    }
    memcpy(self->data, src->data, (size_t)length);
    Py_RETURN_NONE;
}

/* _zero(offset, length, prot): zero bytes within pages whose protection is
 * prot; pages without write permission are made writable for the memset and
 * restored afterwards. */
static PyObject *
region_zero(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;
    int prot;
    char *start, *first, *last;
    long page = sysconf(_SC_PAGESIZE);

    if (check_nargs("_zero", nargs, 3) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0
        || arg_int(args[2], &prot) < 0)
        return NULL;
    if (length == 0)
        Py_RETURN_NONE;
    start = self->data + offset;
    first = (char *)((uintptr_t)start & ~(uintptr_t)(page - 1));
    last = (char *)(((uintptr_t)start + (uintptr_t)length + (uintptr_t)page - 1)
                    & ~(uintptr_t)(page - 1));
    if (!(prot & PROT_WRITE)) {
        if (mprotect(first, (size_t)(last - first), prot | PROT_READ | PROT_WRITE) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    memset(start, 0, (size_t)length);
    if (!(prot & PROT_WRITE)) {
        if (mprotect(first, (size_t)(last - first), prot) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* mprotect [offset, offset + length) to prot; common and mixed describe all
 * pages afterwards. -1 with an exception set (BufferError, OSError) on failure. */
static int
protect_range(RegionObject *self, Py_ssize_t offset, Py_ssize_t length, int prot, int common,
              int mixed)
{
    if ((self->prot & ~common & (PROT_READ | PROT_WRITE))
        && (self->exports > self->pins || self->busy > 0)
        && region_check_idle(self, "remove read or write permission") < 0)
        return -1;
    if (length > 0 && mprotect(self->data + offset, (size_t)length, prot) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->prot = common;
    self->mixed = mixed != 0;
    return 0;
}

/* The protection a whole-region fast path may set, or -1 when the call must
 * go to the Python layer (a mixed region, arguments other than one permission
 * value, EXEC removed under functions from region.function()). */
static int
whole_region_prot(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames, long prot)
{
#ifndef __linux__
    return -1;  /* elsewhere the Python layer maps requested to supported permissions */
#endif
    if (kwnames != NULL || self->data == NULL || self->mixed)
        return -1;
    if (nargs == 1) {
        if (!PyLong_Check(args[0]) || PyBool_Check(args[0]))
            return -1;
        prot = PyLong_AsLong(args[0]);
        if (prot == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
    }
    else if (nargs != 0)
        return -1;
    if (prot < 0 || prot > (PROT_READ | PROT_WRITE | PROT_EXEC))
        return -1;
    if (self->pins > 0 && (self->prot & ~prot & PROT_EXEC))
        return -1;
    return (int)prot;
}

/* protect(perms, offset=0, length=None): the whole-region case here, the rest
 * (ranges, mixed regions, errors) in Region._protect_pages() */
static PyObject *
region_protect_public(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    int prot = nargs == 1 ? whole_region_prot(self, args, nargs, kwnames, 0) : -1;

    if (prot >= 0 && protect_range(self, 0, self->capacity, prot, prot, 0) == 0)
        Py_RETURN_NONE;
    PyErr_Clear();
    return call_python((PyObject *)self, "_protect_pages", args, nargs, kwnames);
}

/* make_exec(offset=0, length=None): read/exec, then flush the instruction cache */
static PyObject *
region_make_exec(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    int prot = whole_region_prot(self, args, nargs, kwnames, PROT_READ | PROT_EXEC);

    if (nargs == 0 && prot >= 0
        && protect_range(self, 0, self->capacity, prot, prot, 0) == 0) {
        __builtin___clear_cache(self->data, self->data + self->capacity);
        Py_RETURN_NONE;
    }
    PyErr_Clear();
    return call_python((PyObject *)self, "_make_exec_pages", args, nargs, kwnames);
}

/* make_writable(offset=0, length=None): read/write, not executable */
static PyObject *
region_make_writable(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    int prot = whole_region_prot(self, args, nargs, kwnames, PROT_READ | PROT_WRITE);

    if (nargs == 0 && prot >= 0 && protect_range(self, 0, self->capacity, prot, prot, 0) == 0)
        Py_RETURN_NONE;
    PyErr_Clear();
    return call_python((PyObject *)self, "_make_writable_pages", args, nargs, kwnames);
}

/* _protect(offset, length, prot, common, mixed): mprotect a range; common is
 * the protection all pages share afterwards and mixed whether they differ,
 * both computed by the caller. */
static PyObject *
region_protect(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;
    int prot, common, mixed;

    if (check_nargs("_protect", nargs, 5) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0
        || arg_int(args[2], &prot) < 0 || arg_int(args[3], &common) < 0
        || arg_int(args[4], &mixed) < 0)
        return NULL;
    if (protect_range(self, offset, length, prot, common, mixed) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _pin(delta): 1 pins the region for a function made by region.function(),
 * -1 releases that pin. A pin counts as an export (no unmap, move, shrink)
 * but does not stop protect() from removing READ or WRITE. */
static PyObject *
region_pin(RegionObject *self, PyObject *arg)
{
    long delta = PyLong_AsLong(arg);

    if (delta == -1 && PyErr_Occurred())
        return NULL;
    if (delta == 1) {
        if (region_check_open(self) < 0)
            return NULL;
        self->pins++;
        self->exports++;
    }
    else if (delta == -1 && self->pins > 0) {
        self->pins--;
        self->exports--;
    }
    else {
        PyErr_SetString(PyExc_ValueError, "_pin() takes 1, or -1 on a pinned region");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* _advise(offset, length, advice): madvise without the GIL */
static PyObject *
region_advise(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;
    int advice, rc;
    char *p;

    if (check_nargs("_advise", nargs, 3) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0
        || arg_int(args[2], &advice) < 0)
        return NULL;
    p = self->data + offset;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = madvise(p, (size_t)length, advice);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* _mincore(offset, length) -> bytes: one byte per page, bit 0 = resident */
static PyObject *
region_mincore(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length, npages;
    long page = sysconf(_SC_PAGESIZE);
    PyObject *vec;
    unsigned char *out;
    char *p;
    int rc;

    if (check_nargs("_mincore", nargs, 2) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0)
        return NULL;
    npages = (length + page - 1) / page;
    vec = PyBytes_FromStringAndSize(NULL, npages);
    if (vec == NULL)
        return NULL;
    if (npages == 0)
        return vec;
    out = (unsigned char *)PyBytes_AsString(vec);
    p = self->data + offset;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = mincore(p, (size_t)length, out);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc != 0) {
        Py_DECREF(vec);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return vec;
}

/* _lock(offset, length, onfault) / _unlock(offset, length) */
static PyObject *
region_lock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;
    int onfault, rc;
    char *p;

    if (check_nargs("_lock", nargs, 3) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0
        || arg_int(args[2], &onfault) < 0)
        return NULL;
    p = self->data + offset;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
#ifdef MLOCK_ONFAULT
    rc = onfault ? mlock2(p, (size_t)length, MLOCK_ONFAULT) : mlock(p, (size_t)length);
#else
    rc = mlock(p, (size_t)length);
#endif
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
region_unlock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;

    if (check_nargs("_unlock", nargs, 2) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0)
        return NULL;
    if (munlock(self->data + offset, (size_t)length) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* _flush_icache(offset, length): make written code visible to instruction
 * fetch. A no-op on x86, where the caches are coherent. */
static PyObject *
region_flush_icache(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;

    if (check_nargs("_flush_icache", nargs, 2) < 0 || region_check_open(self) < 0
        || region_check_range(self, args, &offset, &length) < 0)
        return NULL;
    __builtin___clear_cache(self->data + offset, self->data + offset + length);
    Py_RETURN_NONE;
}

static PyObject *
region_get_address(RegionObject *self, void *closure)
{
    if (region_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->data);
}

static PyObject *
region_get_size(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->size);
}

static PyObject *
region_get_capacity(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->capacity);
}

static PyObject *
region_get_closed(RegionObject *self, void *closure)
{
    return PyBool_FromLong(self->data == NULL);
}

static PyObject *
region_get_prot(RegionObject *self, void *closure)
{
    return PyLong_FromLong(self->prot);
}

static PyObject *
region_get_mixed(RegionObject *self, void *closure)
{
    return PyBool_FromLong(self->mixed);
}

static PyObject *
region_get_exports(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->exports);
}

static PyObject *
region_get_pins(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->pins);
}

static PyObject *
region_get_owner(RegionObject *self, void *closure)
{
    Py_INCREF(self->owner);
    return self->owner;
}

static Py_ssize_t
region_length(RegionObject *self)
{
    return self->size;
}

static int
region_getbuffer(RegionObject *self, Py_buffer *view, int flags)
{
    if (region_check_open(self) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (!(self->prot & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError, "region is not readable");
        view->obj = NULL;
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !(self->prot & PROT_WRITE)) {
        PyErr_SetString(PyExc_BufferError, "region is not writable");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size,
                          !(self->prot & PROT_WRITE), flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
region_releasebuffer(RegionObject *self, Py_buffer *view)
{
    self->exports--;
}

static int
region_traverse(RegionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static int
region_clear(RegionObject *self)
{
    Py_CLEAR(self->owner);
    return 0;
}

static void
region_dealloc(RegionObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    char *p = self->data;

    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    self->data = NULL;
    if (p != NULL) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = munmap(p, (size_t)self->capacity);
        if (rc != 0)   /* cannot unmap (map count): at least give the memory back */
            madvise(p, (size_t)self->capacity, MADV_DONTNEED);
        Py_END_ALLOW_THREADS
        if (rc == 0)
            mapped_bytes -= self->capacity;
    }
    region_clear(self);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef region_methods[] = {
    {"_map", (PyCFunction)(void (*)(void))region_map, METH_FASTCALL | METH_CLASS,
     "_map(size, capacity, prot, flags, owner): map anonymous memory and own it."},
    {"_adopt", (PyCFunction)(void (*)(void))region_adopt, METH_FASTCALL | METH_CLASS,
     "_adopt(address, size, capacity, prot, owner): own an existing mapping."},
    {"close", (PyCFunction)region_close, METH_NOARGS,
     "Unmap the region. Closing a closed region does nothing."},
    {"_release", (PyCFunction)region_release, METH_O,
     "_release(owner): close the region, checking that owner made it and it is open."},
    {"_resize", (PyCFunction)(void (*)(void))region_resize, METH_FASTCALL,
     "_resize(size, capacity, flags) -> address: mremap the mapping."},
    {"_swap", (PyCFunction)region_swap, METH_O,
     "_swap(other): exchange the mappings of two idle regions."},
    {"_copy_from", (PyCFunction)(void (*)(void))region_copy_from, METH_FASTCALL,
     "_copy_from(source, length): copy bytes from another region."},
    {"_zero", (PyCFunction)(void (*)(void))region_zero, METH_FASTCALL,
     "_zero(offset, length, prot): zero bytes within pages of protection prot."},
    {"_protect", (PyCFunction)(void (*)(void))region_protect, METH_FASTCALL,
     "_protect(offset, length, prot, common, mixed): mprotect a range."},
    {"protect", (PyCFunction)(void (*)(void))region_protect_public,
     METH_FASTCALL | METH_KEYWORDS,
     "protect(perms, offset=0, length=None)\n\n"
     "Set the protection of whole pages [offset, offset + length); None: to the end.\n"
     "BufferError, changing nothing, if it would remove READ or WRITE while a buffer\n"
     "is exported, or EXEC while a function from function() lives."},
    {"make_exec", (PyCFunction)(void (*)(void))region_make_exec, METH_FASTCALL | METH_KEYWORDS,
     "make_exec(offset=0, length=None)\n\n"
     "Make the pages read/exec, then flush the instruction cache for them."},
    {"make_writable", (PyCFunction)(void (*)(void))region_make_writable,
     METH_FASTCALL | METH_KEYWORDS,
     "make_writable(offset=0, length=None)\n\nMake the pages read/write (not executable)."},
    {"_pin", (PyCFunction)region_pin, METH_O,
     "_pin(delta): 1 pins the region for a function, -1 releases the pin."},
    {"_advise", (PyCFunction)(void (*)(void))region_advise, METH_FASTCALL,
     "_advise(offset, length, advice): madvise a range."},
    {"_mincore", (PyCFunction)(void (*)(void))region_mincore, METH_FASTCALL,
     "_mincore(offset, length) -> bytes: residency, one byte per page."},
    {"_lock", (PyCFunction)(void (*)(void))region_lock, METH_FASTCALL,
     "_lock(offset, length, onfault): mlock a range."},
    {"_unlock", (PyCFunction)(void (*)(void))region_unlock, METH_FASTCALL,
     "_unlock(offset, length): munlock a range."},
    {"_flush_icache", (PyCFunction)(void (*)(void))region_flush_icache, METH_FASTCALL,
     "_flush_icache(offset, length): flush the instruction cache for a range."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef region_getset[] = {
    {"address", (getter)region_get_address, NULL,
     "Start address of the mapping, for interop (ctypes, cffi).", NULL},
    {"size", (getter)region_get_size, NULL, "Bytes asked for; the buffer length.", NULL},
    {"capacity", (getter)region_get_capacity, NULL, "Bytes mapped (whole pages).", NULL},
    {"closed", (getter)region_get_closed, NULL, "True once the region is unmapped.", NULL},
    {"_prot", (getter)region_get_prot, NULL, "Protection common to all pages.", NULL},
    {"_mixed", (getter)region_get_mixed, NULL, "True when pages differ in protection.", NULL},
    {"_exports", (getter)region_get_exports, NULL, "Number of live buffers.", NULL},
    {"_pins", (getter)region_get_pins, NULL, "Number of live functions.", NULL},
    {"_owner", (getter)region_get_owner, NULL, "The allocator that made the region.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef region_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(RegionObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot region_slots[] = {
    {Py_tp_doc, "One anonymous memory mapping, exported through the buffer protocol."},
    {Py_tp_new, region_new},
    {Py_tp_dealloc, region_dealloc},
    {Py_tp_traverse, region_traverse},
    {Py_tp_clear, region_clear},
    {Py_tp_methods, region_methods},
    {Py_tp_getset, region_getset},
    {Py_tp_members, region_members},
    {Py_sq_length, region_length},
    {Py_bf_getbuffer, region_getbuffer},
    {Py_bf_releasebuffer, region_releasebuffer},
    {0, NULL},
};

static PyType_Spec region_spec = {
    .name = "mmap_alloc._mman.Region",
    .basicsize = sizeof(RegionObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = region_slots,
};

/* ------------------------------------------------------------------ */
/* Allocator: the fast path of MapAlloc.alloc() and MapAlloc.dealloc()  */

/*
 * MapAlloc (allocator.py) subclasses this type. alloc(size) with an exact
 * int in range and no alignment, and dealloc(region) of a region of the
 * configured type, are done here; every other call (other argument types,
 * alignment, errors) goes to
 * the Python methods _alloc(size, align=None) and _dealloc(region), which
 * hold the policy and the error messages.
 */
typedef struct {
    PyObject_HEAD
    Py_ssize_t page;
    Py_ssize_t mask;
    Py_ssize_t max_size;
    int prot;
    int flags;
    PyTypeObject *region_type;  /* the type of the regions made; NULL until configured */
} AllocatorObject;

static PyObject *
allocator_alloc(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    if (self->region_type != NULL && nargs == 1 && kwnames == NULL
        && PyLong_CheckExact(args[0])) {
        Py_ssize_t size = PyLong_AsSsize_t(args[0]);
        if (size > 0 && size <= self->max_size) {
            PyObject *region = map_region(self->region_type, size,
                                          (size + self->mask) & ~self->mask, self->prot,
                                          self->flags, (PyObject *)self);
            if (region != NULL)
                return region;
        }
        PyErr_Clear();  /* overflow, or a refusal: _alloc() says what went wrong */
    }
    return call_python((PyObject *)self, "_alloc", args, nargs, kwnames);
}

static PyObject *
allocator_dealloc(AllocatorObject *self, PyObject *region)
{
    if (self->region_type != NULL && Py_TYPE(region) == self->region_type)
        return region_release((RegionObject *)region, (PyObject *)self);
    return call_python((PyObject *)self, "_dealloc", &region, 1, NULL);
}

/* _configure(page, max_size, prot, flags, region_type) */
static PyObject *
allocator_configure(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t page, max_size;
    int prot, flags;

    if (check_nargs("_configure", nargs, 5) < 0 || arg_ssize(args[0], &page) < 0
        || arg_ssize(args[1], &max_size) < 0 || arg_int(args[2], &prot) < 0
        || arg_int(args[3], &flags) < 0)
        return NULL;
    if (page <= 0 || (page & (page - 1)) || !PyType_Check(args[4])) {
        PyErr_SetString(PyExc_ValueError, "bad allocator configuration");
        return NULL;
    }
    self->page = page;
    self->mask = page - 1;
    self->max_size = max_size;
    self->prot = prot;
    self->flags = flags;
    {
        PyTypeObject *old = self->region_type;
        Py_INCREF(args[4]);
        self->region_type = (PyTypeObject *)args[4];
        Py_XDECREF((PyObject *)old);
    }
    Py_RETURN_NONE;
}

static int
allocator_traverse(AllocatorObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->region_type);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static int
allocator_clear(AllocatorObject *self)
{
    Py_CLEAR(self->region_type);
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

static PyMethodDef allocator_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))allocator_alloc, METH_FASTCALL | METH_KEYWORDS,
     "alloc(size, align=None) -> Region\n\n"
     "A new region of at least size bytes, zero-filled, page-aligned (or aligned\n"
     "to align, a power of two)."},
    {"dealloc", (PyCFunction)allocator_dealloc, METH_O,
     "dealloc(region)\n\n"
     "Unmap the region. BufferError while a buffer of it is exported."},
    {"_configure", (PyCFunction)(void (*)(void))allocator_configure, METH_FASTCALL,
     "_configure(page, max_size, prot, flags, region_type)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef allocator_members[] = {
    {"_page", T_PYSSIZET, offsetof(AllocatorObject, page), READONLY, "The page size."},
    {"_mask", T_PYSSIZET, offsetof(AllocatorObject, mask), READONLY, "page - 1."},
    {"_max_size", T_PYSSIZET, offsetof(AllocatorObject, max_size), READONLY,
     "The largest size alloc() takes."},
    {"_prot", T_INT, offsetof(AllocatorObject, prot), READONLY, "PROT_* of new regions."},
    {"_flags", T_INT, offsetof(AllocatorObject, flags), READONLY, "MAP_* of new regions."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot allocator_slots[] = {
    {Py_tp_doc, "The system-call fast path of MapAlloc."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, allocator_dealloc_object},
    {Py_tp_traverse, allocator_traverse},
    {Py_tp_clear, allocator_clear},
    {Py_tp_methods, allocator_methods},
    {Py_tp_members, allocator_members},
    {0, NULL},
};

static PyType_Spec allocator_spec = {
    .name = "mmap_alloc._mman.Allocator",
    .basicsize = sizeof(AllocatorObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = allocator_slots,
};

/* ------------------------------------------------------------------ */
/* module                                                              */

static PyMethodDef mman_methods[] = {
    {"page_size", mman_page_size, METH_NOARGS, "page_size() -> int"},
    {"mapped_bytes", mman_mapped_bytes, METH_NOARGS,
     "mapped_bytes() -> int: bytes this module has mapped and not unmapped"},
    {"mmap", (PyCFunction)(void (*)(void))mman_mmap, METH_FASTCALL,
     "mmap(length, prot, flags) -> address of a private anonymous mapping"},
    {"munmap", (PyCFunction)(void (*)(void))mman_munmap, METH_FASTCALL,
     "munmap(address, length)"},
    {"mprotect", (PyCFunction)(void (*)(void))mman_mprotect, METH_FASTCALL,
     "mprotect(address, length, prot)"},
    {"madvise", (PyCFunction)(void (*)(void))mman_madvise, METH_FASTCALL,
     "madvise(address, length, advice)"},
    {NULL, NULL, 0, NULL},
};

static int
add_constants(PyObject *m)
{
#define ADD(name) if (PyModule_AddIntConstant(m, #name, name) < 0) return -1
    ADD(PROT_NONE); ADD(PROT_READ); ADD(PROT_WRITE); ADD(PROT_EXEC);
    ADD(MAP_PRIVATE); ADD(MAP_ANONYMOUS); ADD(MAP_NORESERVE); ADD(MAP_FIXED);
#ifdef MAP_POPULATE
    ADD(MAP_POPULATE);
#endif
#ifdef MAP_HUGETLB
    ADD(MAP_HUGETLB);
#endif
#ifdef MAP_HUGE_SHIFT
    ADD(MAP_HUGE_SHIFT);
#endif
#ifdef MAP_FIXED_NOREPLACE
    ADD(MAP_FIXED_NOREPLACE);
#endif
    ADD(MADV_NORMAL); ADD(MADV_WILLNEED); ADD(MADV_DONTNEED);
#ifdef MADV_FREE
    ADD(MADV_FREE);
#endif
#ifdef MADV_HUGEPAGE
    ADD(MADV_HUGEPAGE); ADD(MADV_NOHUGEPAGE);
#endif
#ifdef MADV_DONTDUMP
    ADD(MADV_DONTDUMP); ADD(MADV_DODUMP);
#endif
#ifdef MADV_WIPEONFORK
    ADD(MADV_WIPEONFORK); ADD(MADV_KEEPONFORK);
#endif
#ifdef MADV_DONTFORK
    ADD(MADV_DONTFORK); ADD(MADV_DOFORK);
#endif
#ifdef MADV_POPULATE_READ
    ADD(MADV_POPULATE_READ); ADD(MADV_POPULATE_WRITE);
#endif
#ifdef MADV_COLLAPSE
    ADD(MADV_COLLAPSE);
#endif
    ADD(MREMAP_MAYMOVE);
#ifdef MREMAP_FIXED
    ADD(MREMAP_FIXED);
#endif
#undef ADD
    return 0;
}

static int
mman_exec(PyObject *m)
{
    module_state *st = get_state(m);

    st->region_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &region_spec, NULL);
    if (st->region_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "Region", (PyObject *)st->region_type) < 0)
        return -1;
    st->allocator_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &allocator_spec, NULL);
    if (st->allocator_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "Allocator", (PyObject *)st->allocator_type) < 0)
        return -1;
    return add_constants(m);
}

static int
mman_traverse(PyObject *m, visitproc visit, void *arg)
{
    Py_VISIT(get_state(m)->region_type);
    Py_VISIT(get_state(m)->allocator_type);
    return 0;
}

static int
mman_clear(PyObject *m)
{
    Py_CLEAR(get_state(m)->region_type);
    Py_CLEAR(get_state(m)->allocator_type);
    return 0;
}

static void
mman_free(void *m)
{
    mman_clear((PyObject *)m);
}

static PyModuleDef_Slot mman_slots[] = {
    {Py_mod_exec, mman_exec},
    {0, NULL},
};

static struct PyModuleDef mman_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmap_alloc._mman",
    .m_doc = "System calls for page-granular memory (private to mmap_alloc).",
    .m_size = sizeof(module_state),
    .m_methods = mman_methods,
    .m_slots = mman_slots,
    .m_traverse = mman_traverse,
    .m_clear = mman_clear,
    .m_free = mman_free,
};

PyMODINIT_FUNC
PyInit__mman(void)
{
    return PyModuleDef_Init(&mman_module);
}

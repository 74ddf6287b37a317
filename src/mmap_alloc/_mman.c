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
    PyTypeObject *pool_type;
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

/* Unmapping this much or more may take long enough (freeing the pages) to be
 * worth releasing the GIL; smaller calls take about as long as releasing it
 * and taking it back. A lazy mmap takes as long whatever its size: it keeps
 * the GIL unless it faults pages in (MAP_POPULATE) or reserves huge pages. */
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

    if (flags & (MAP_POPULATE | MAP_HUGETLB)) {  /* faults pages in, or reserves them */
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
 * prot (-1: the region's, which must be uniform); pages without write
 * permission are made writable for the memset and restored afterwards. */
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
    if (prot < 0) {  /* the region's own protection, read now: it may have just changed */
        if (self->mixed) {
            PyErr_SetString(PyExc_ValueError, "_zero() of a mixed region needs the protection");
            return NULL;
        }
        prot = self->prot;
    }
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

/* _protect(offset, length, prot, common, mixed[, expected]) -> bool: mprotect
 * a range; common is the protection all pages share afterwards and mixed
 * whether they differ, both computed by the caller from the state `expected`
 * (prot | mixed << 3); False, changing nothing, if the state is no longer that. */
static PyObject *
region_protect(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t offset, length;
    int prot, common, mixed, expected = -1;

    if (nargs != 6 && check_nargs("_protect", nargs, 5) < 0)
        return NULL;
    if (region_check_open(self) < 0 || region_check_range(self, args, &offset, &length) < 0
        || arg_int(args[2], &prot) < 0 || arg_int(args[3], &common) < 0
        || arg_int(args[4], &mixed) < 0 || (nargs == 6 && arg_int(args[5], &expected) < 0))
        return NULL;
    if (expected >= 0 && expected != (self->prot | self->mixed << 3))
        Py_RETURN_FALSE;  /* changed since the caller computed common and mixed */
    if (protect_range(self, offset, length, prot, common, mixed) < 0)
        return NULL;
    Py_RETURN_TRUE;
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
    if (!self->mixed && !(self->prot & PROT_READ))
        Py_RETURN_NONE;  /* cache maintenance by address needs read access (arm64) */
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
     "_protect(offset, length, prot, common, mixed[, expected]) -> bool: mprotect a range."},
    {"protect", (PyCFunction)(void (*)(void))region_protect_public,
     METH_FASTCALL | METH_KEYWORDS,
     "protect($self, /, perms, offset=0, length=None)\n--\n\n"
     "Set the protection of whole pages [offset, offset + length); None: to the end.\n"
     "BufferError, changing nothing, if it would remove READ or WRITE while a buffer\n"
     "is exported, or EXEC while a function from function() lives."},
    {"make_exec", (PyCFunction)(void (*)(void))region_make_exec, METH_FASTCALL | METH_KEYWORDS,
     "make_exec($self, /, offset=0, length=None)\n--\n\n"
     "Make the pages read/exec, then flush the instruction cache for them."},
    {"make_writable", (PyCFunction)(void (*)(void))region_make_writable,
     METH_FASTCALL | METH_KEYWORDS,
     "make_writable($self, /, offset=0, length=None)\n--\n\nMake the pages read/write (not executable)."},
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
/* Pool: the fast path of mmap_alloc.ObjectPool                        */
/*
 * Fixed-size objects carved from slabs (Regions). Per slab, one bit per
 * object (1 = free) in C memory, never in the slab itself: freed memory is
 * not touched, so a write through a stale pointer cannot corrupt the pool,
 * and pools of read-only or inaccessible memory work too.
 *
 * Every method runs with the GIL held and does not release it between
 * reading and changing the state, so the GIL is the lock of the fast path.
 * The slow paths call back into Python (ObjectPool._grow when no slab has a
 * free object, ObjectPool._release when more than keep_empty slabs are
 * empty); C state is consistent before every such call, and no Slab pointer
 * is kept across one (the callback may attach or detach slabs).
 */

typedef struct {
    char *base;            /* first object; the Region's data pointer */
    PyObject *region;      /* strong reference: the Region that owns the memory */
    uint32_t nfree;        /* free objects */
    uint32_t hint;         /* every bitmap word before this one is 0 (all in use) */
    uint32_t fresh;        /* objects from this index on were never handed out: zero */
    int prot;              /* the Region's protection when it became a slab */
    uint64_t bits[];       /* 1 = free; bits past the last object are 0 */
} Slab;

typedef struct {
    PyObject_HEAD
    Slab **slabs;          /* sorted by base */
    Py_ssize_t nslabs;
    Py_ssize_t cap;
    Slab *cur;             /* the slab alloc() takes from, or NULL */
    Slab *last;            /* the slab the last address was found in, or NULL */
    Py_ssize_t obj_size;
    Py_ssize_t stride;
    Py_ssize_t span;       /* per_slab * stride: the bytes of a slab that hold objects */
    int shift;             /* log2(stride) when stride is a power of two, else -1 */
    int configured;
    int closed;
    uint32_t per_slab;     /* objects per slab */
    uint32_t nwords;       /* bitmap words per slab */
    Py_ssize_t live;       /* objects handed out */
    Py_ssize_t nempty;     /* slabs with no live object */
    Py_ssize_t keep_empty; /* more empty slabs than this: call _release() */
} PoolObject;

/* addresses travel as unsigned long (LP64), the cheapest int conversion */
_Static_assert(sizeof(unsigned long) >= sizeof(uintptr_t), "unsigned long holds an address");

enum { LOC_OK = 0, LOC_FOREIGN, LOC_INSIDE };

static int
pool_check_open(PoolObject *self)
{
    if (self->closed || !self->configured) {
        PyErr_SetString(PyExc_ValueError, "pool is closed");
        return -1;
    }
    return 0;
}

/* An address argument as an integer. 0 on success, 1 for an integer that is
 * no address (negative, too large), -1 with an exception set. */
static inline int
pool_address_arg(PyObject *o, uintptr_t *out)
{
    unsigned long v;

    if (PyLong_CheckExact(o) || PyLong_Check(o)) {
        v = PyLong_AsUnsignedLong(o);
    }
    else {
        PyObject *i = PyNumber_Index(o);
        if (i == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyObject *name = PyType_GetName(Py_TYPE(o));
                if (name != NULL) {
                    PyErr_Format(PyExc_TypeError, "address must be an integer, not %U", name);
                    Py_DECREF(name);
                }
            }
            return -1;
        }
        v = PyLong_AsUnsignedLong(i);
        Py_DECREF(i);
    }
    if (v == (unsigned long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 1;
    }
    if (v > UINTPTR_MAX)
        return 1;
    *out = (uintptr_t)v;
    return 0;
}

/* The slab holding address a and the object's index in it. */
static inline int
pool_locate(PoolObject *self, uintptr_t a, Slab **slab, uint32_t *index)
{
    Slab *s = self->last;
    uintptr_t off;
    size_t idx;

    if (s == NULL || a - (uintptr_t)s->base >= (uintptr_t)self->span) {
        Py_ssize_t lo = 0, hi = self->nslabs;
        while (lo < hi) {   /* the first slab whose base is above a */
            Py_ssize_t mid = (lo + hi) >> 1;
            if ((uintptr_t)self->slabs[mid]->base <= a)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo == 0)
            return LOC_FOREIGN;
        s = self->slabs[lo - 1];
        if (a - (uintptr_t)s->base >= (uintptr_t)self->span)
            return LOC_FOREIGN;
        self->last = s;
    }
    off = a - (uintptr_t)s->base;
    *slab = s;
    if (self->shift >= 0) {
        idx = off >> self->shift;
        if (off & (((uintptr_t)1 << self->shift) - 1))
            return LOC_INSIDE;
    }
    else {
        idx = off / (uintptr_t)self->stride;
        if (idx * (uintptr_t)self->stride != off)
            return LOC_INSIDE;
    }
    *index = (uint32_t)idx;
    return LOC_OK;
}

static int
slab_is_free(Slab *s, uint32_t i)
{
    return (s->bits[i >> 6] >> (i & 63)) & 1;
}

/* Raise the ValueError for a bad address (code from pool_locate, or -1 for
 * an object that is not allocated). */
static void
pool_bad_address(PoolObject *self, PyObject *arg, uintptr_t a, int code, Slab *s, uint32_t i)
{
    if (code == LOC_INSIDE) {
        uintptr_t off = (a - (uintptr_t)s->base) % (uintptr_t)self->stride;
        PyErr_Format(PyExc_ValueError,
                     "address %p lies %zu bytes inside an object of this pool (which starts at %p)",
                     (void *)a, (size_t)off, (void *)(a - off));
    }
    else if (code == -1) {
        PyErr_Format(PyExc_ValueError,
                     "address %p is not allocated (freed already, or never handed out)",
                     (void *)a);
    }
    else if (arg != NULL && !PyLong_Check(arg)) {
        PyErr_Format(PyExc_ValueError, "%R is not an object of this pool", arg);
    }
    else if (arg != NULL && code == LOC_FOREIGN && a == 0) {
        PyErr_Format(PyExc_ValueError, "address %R is not an object of this pool", arg);
    }
    else {
        PyErr_Format(PyExc_ValueError, "address %p is not an object of this pool", (void *)a);
    }
}

/* Take a free object of slab s (s->nfree > 0); *used: whether it may have
 * been written since the slab was mapped or uncommitted. */
static uint32_t
slab_take(PoolObject *self, Slab *s, int *used)
{
    uint32_t w = s->hint;
    uint64_t word;
    uint32_t i;

    while (s->bits[w] == 0)
        w++;
    word = s->bits[w];
    s->bits[w] = word & (word - 1);
    s->hint = w;
    i = (w << 6) | (uint32_t)__builtin_ctzll(word);
    if (s->nfree == self->per_slab)
        self->nempty--;
    s->nfree--;
    *used = i < s->fresh;
    if (!*used)
        s->fresh = i + 1;
    self->live++;
    return i;
}

/* Give object i of slab s back (it is allocated). Returns 1 when the slab
 * became empty. */
static int
slab_give(PoolObject *self, Slab *s, uint32_t i)
{
    uint32_t w = i >> 6;

    s->bits[w] |= (uint64_t)1 << (i & 63);
    if (w < s->hint)
        s->hint = w;
    s->nfree++;
    self->live--;
    if (s->nfree == self->per_slab) {
        self->nempty++;
        return 1;
    }
    return 0;
}

/* Ask Python to release empty slabs, if there are more than keep_empty. */
static int
pool_maybe_release(PoolObject *self)
{
    PyObject *r;

    if (self->nempty <= self->keep_empty || self->closed)
        return 0;
    r = PyObject_CallMethod((PyObject *)self, "_release", NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A slab with a free object: the current one, else the first partly used
 * slab by address, else an empty one, else a new one from _grow(). */
static Slab *
pool_refill(PoolObject *self)
{
    for (;;) {
        Slab *empty = NULL;
        PyObject *r;
        Py_ssize_t k;

        if (pool_check_open(self) < 0)
            return NULL;
        if (self->cur != NULL && self->cur->nfree > 0)
            return self->cur;
        for (k = 0; k < self->nslabs; k++) {
            Slab *s = self->slabs[k];
            if (s->nfree == 0)
                continue;
            if (s->nfree < self->per_slab) {
                self->cur = s;
                return s;
            }
            if (empty == NULL)
                empty = s;
        }
        if (empty != NULL) {
            self->cur = empty;
            return empty;
        }
        r = PyObject_CallMethod((PyObject *)self, "_grow", NULL);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
}

/* Take one object; its address or 0 with an exception set. */
static uintptr_t
pool_take(PoolObject *self, Slab **slab, uint32_t *index, int *used)
{
    Slab *s = self->cur;

    if (s == NULL || s->nfree == 0) {
        s = pool_refill(self);
        if (s == NULL)
            return 0;
    }
    *index = slab_take(self, s, used);
    *slab = s;
    return (uintptr_t)s->base + (uintptr_t)*index * (uintptr_t)self->stride;
}

/* alloc and alloc_zeroed take METH_FASTCALL (not METH_NOARGS): CPython
 * specialises fast calls both through the type and as bound methods. */
static PyObject *
pool_alloc(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Slab *s;
    uint32_t i;
    int used;
    uintptr_t a;
    PyObject *r;

    if (nargs != 0 && check_nargs("alloc", nargs, 0) < 0)
        return NULL;
    a = pool_take(self, &s, &i, &used);
    if (a == 0)
        return NULL;
    r = PyLong_FromUnsignedLong((unsigned long)a);
    if (r == NULL)
        slab_give(self, s, i);
    return r;
}

static PyObject *
pool_alloc_zeroed(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Slab *s;
    uint32_t i;
    int used;
    uintptr_t a;
    RegionObject *region;
    PyObject *r;

    if (nargs != 0 && check_nargs("alloc_zeroed", nargs, 0) < 0)
        return NULL;
    a = pool_take(self, &s, &i, &used);
    if (a == 0)
        return NULL;
    region = (RegionObject *)s->region;
    if (used) {
        /* A used object: zero it, if the memory can be written at all (a pool
         * without WRITE cannot have been written through). The slab's Region
         * is reachable (memoryview.obj of a view): touch it only as it was. */
        if (region->data != s->base || region->capacity < self->span
            || region->prot != s->prot || region->mixed) {
            slab_give(self, s, i);
            PyErr_SetString(PyExc_ValueError,
                            "a slab's mapping was closed, moved or re-protected behind the "
                            "pool's back");
            return NULL;
        }
        if (s->prot & PROT_WRITE)
            memset((void *)a, 0, (size_t)self->obj_size);
    }
    r = PyLong_FromUnsignedLong((unsigned long)a);
    if (r == NULL)
        slab_give(self, s, i);
    return r;
}

static PyObject *
pool_free(PoolObject *self, PyObject *arg)
{
    uintptr_t a = 0;
    Slab *s = NULL;
    uint32_t i = 0;
    int code = pool_address_arg(arg, &a);

    if (code < 0)
        return NULL;
    if (pool_check_open(self) < 0)
        return NULL;
    if (code == 0)
        code = pool_locate(self, a, &s, &i);
    if (code == LOC_OK && slab_is_free(s, i))
        code = -1;
    if (code != LOC_OK) {
        pool_bad_address(self, arg, a, code, s, i);
        return NULL;
    }
    if (slab_give(self, s, i) && pool_maybe_release(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Take up to n free objects of slab s (s->nfree > 0), lowest first; their
 * addresses go to out. Returns how many. */
static Py_ssize_t
slab_take_many(PoolObject *self, Slab *s, uintptr_t *out, Py_ssize_t n)
{
    uint32_t want = (Py_ssize_t)s->nfree < n ? s->nfree : (uint32_t)n;
    uint32_t w = s->hint, got = 0, top = 0;
    uintptr_t base = (uintptr_t)s->base, stride = (uintptr_t)self->stride;

    if (s->nfree == self->per_slab)
        self->nempty--;
    while (got < want) {
        uint64_t word = s->bits[w];
        while (word != 0 && got < want) {
            top = (w << 6) | (uint32_t)__builtin_ctzll(word);
            word &= word - 1;
            out[got++] = base + (uintptr_t)top * stride;
        }
        s->bits[w] = word;
        if (word == 0 && w + 1 < self->nwords)
            w++;
    }
    s->hint = w;
    s->nfree -= got;
    self->live += got;
    if (top >= s->fresh)
        s->fresh = top + 1;
    return got;
}

/* Give back an object a failed call took, if it is still there (slabs may
 * have changed meanwhile). */
static void
pool_untake(PoolObject *self, uintptr_t a)
{
    Slab *s;
    uint32_t i;

    if (!self->closed && pool_locate(self, a, &s, &i) == LOC_OK && !slab_is_free(s, i))
        slab_give(self, s, i);
}

static PyObject *
pool_alloc_many(PoolObject *self, PyObject *arg)
{
    Py_ssize_t n, k = 0, j;
    PyObject *list;
    uintptr_t chunk[64];   /* taken, not yet in the list */
    Py_ssize_t taken = 0;

    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyObject *name = PyType_GetName(Py_TYPE(arg));
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "n must be an integer, not %U", name);
            Py_DECREF(name);
        }
        return NULL;
    }
    n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "n must not be negative, got %zd", n);
        return NULL;
    }
    if (pool_check_open(self) < 0)
        return NULL;
    list = PyList_New(n);
    if (list == NULL)
        return NULL;
    while (k < n) {
        Slab *s = self->cur;
        if (s == NULL || s->nfree == 0) {   /* may call _grow(): other threads may run */
            s = pool_refill(self);
            if (s == NULL)
                goto fail;
        }
        taken = slab_take_many(self, s, chunk, n - k < 64 ? n - k : 64);
        for (j = 0; j < taken; j++) {
            PyObject *item = PyLong_FromUnsignedLong((unsigned long)chunk[j]);
            if (item == NULL) {
                memmove(chunk, chunk + j, (size_t)(taken - j) * sizeof(uintptr_t));
                taken -= j;
                goto fail;
            }
            PyList_SetItem(list, k++, item);   /* steals; cannot fail here */
        }
        taken = 0;
    }
    return list;

fail:
    /* give back what this call took: the objects in the list and the chunk */
    {
        PyObject *exc_type, *exc_value, *exc_tb;

        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        for (j = 0; j < k; j++)
            pool_untake(self, (uintptr_t)PyLong_AsVoidPtr(PyList_GetItem(list, j)));
        for (j = 0; j < taken; j++)
            pool_untake(self, chunk[j]);
        Py_DECREF(list);
        if (pool_maybe_release(self) < 0)
            PyErr_Clear();
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    return NULL;
}

/* Give back the objects of word w of slab s whose bits are set in bits. */
static void
slab_give_word(PoolObject *self, Slab *s, uint32_t w, uint64_t bits, int *released)
{
    uint32_t c = (uint32_t)__builtin_popcountll(bits);

    s->bits[w] |= bits;
    if (w < s->hint)
        s->hint = w;
    s->nfree += c;
    self->live -= c;
    if (s->nfree == self->per_slab) {
        self->nempty++;
        *released = 1;
    }
}

/* Take back object i of slab s, which a failed free_many gave back. */
static void
slab_undo_give(PoolObject *self, Slab *s, uint32_t i)
{
    s->bits[i >> 6] &= ~((uint64_t)1 << (i & 63));
    if (s->nfree == self->per_slab)
        self->nempty--;
    s->nfree--;
    self->live++;
}

/* free_many of a list whose items are exact ints, in one pass that runs no
 * Python code. 1: done; 0: an item is not an exact int (nothing changed,
 * take the general path); -1: ValueError, nothing changed. */
static int
pool_free_exact_ints(PoolObject *self, PyObject *list, Py_ssize_t n, int *released)
{
    Slab *cs = NULL;          /* bits of word cw of slab cs wait in pending */
    uint32_t cw = 0;
    uint64_t pending = 0;
    Py_ssize_t k, j;
    int result = 1;

    for (k = 0; k < n; k++) {
        PyObject *item = PyList_GetItem(list, k);
        unsigned long a;
        Slab *s = NULL;
        uint32_t i = 0, w;
        uint64_t bit;
        int code;

        if (!PyLong_CheckExact(item)) {
            result = 0;
            break;
        }
        a = PyLong_AsUnsignedLong(item);
        if (a == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            pool_bad_address(self, item, 0, LOC_FOREIGN, NULL, 0);
            result = -1;
            break;
        }
        code = pool_locate(self, a, &s, &i);
        if (code != LOC_OK) {
            pool_bad_address(self, item, a, code, s, i);
            result = -1;
            break;
        }
        w = i >> 6;
        bit = (uint64_t)1 << (i & 63);
        if (s != cs || w != cw) {
            if (pending)
                slab_give_word(self, cs, cw, pending, released);
            cs = s;
            cw = w;
            pending = 0;
        }
        if ((s->bits[w] | pending) & bit) {   /* free, or twice in the list */
            pool_bad_address(self, item, a, -1, s, i);
            result = -1;
            break;
        }
        pending |= bit;
    }
    if (pending)
        slab_give_word(self, cs, cw, pending, released);
    if (result == 1)
        return 1;
    for (j = 0; j < k; j++) {   /* undo: items 0..k-1 were found and given back */
        Slab *s = NULL;
        uint32_t i = 0;
        pool_locate(self, PyLong_AsUnsignedLong(PyList_GetItem(list, j)), &s, &i);
        slab_undo_give(self, s, i);
    }
    return result;
}

static PyObject *
pool_free_many(PoolObject *self, PyObject *arg)
{
    PyObject *list;
    Py_ssize_t n, k, j;
    uintptr_t *addrs = NULL;
    int released = 0;

    if (pool_check_open(self) < 0)
        return NULL;
    /* A list is read in place: items are taken with bounds checks, and an
     * __index__ that changes the list cannot make this read freed memory. */
    if (PyList_CheckExact(arg)) {
        Py_INCREF(arg);
        list = arg;
    }
    else {
        list = PySequence_List(arg);
        if (list == NULL)
            return NULL;
    }
    n = PyList_Size(list);
    switch (pool_free_exact_ints(self, list, n, &released)) {
    case 1:
        Py_DECREF(list);
        if (released && pool_maybe_release(self) < 0)
            return NULL;
        Py_RETURN_NONE;
    case -1:
        Py_DECREF(list);
        return NULL;
    }
    /* the general path: convert every address first (__index__ may run
     * Python code: nothing is changed yet), then free them all or none */
    addrs = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(uintptr_t));
    if (addrs == NULL) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    for (k = 0; k < n; k++) {
        PyObject *item = PyList_GetItem(list, k);
        int code;

        if (item == NULL)
            goto fail;
        Py_INCREF(item);   /* an __index__ method may change the list */
        code = pool_address_arg(item, &addrs[k]);
        if (code > 0)
            pool_bad_address(self, item, 0, LOC_FOREIGN, NULL, 0);
        Py_DECREF(item);
        if (code != 0)
            goto fail;
    }
    if (pool_check_open(self) < 0)
        goto fail;
    for (k = 0; k < n; k++) {   /* no Python code runs in this loop */
        Slab *s = NULL;
        uint32_t i = 0;
        int code = pool_locate(self, addrs[k], &s, &i);

        if (code == LOC_OK && slab_is_free(s, i))
            code = -1;
        if (code != LOC_OK) {
            pool_bad_address(self, NULL, addrs[k], code, s, i);
            for (j = 0; j < k; j++) {   /* undo */
                pool_locate(self, addrs[j], &s, &i);
                slab_undo_give(self, s, i);
            }
            goto fail;
        }
        released |= slab_give(self, s, i);
    }
    PyMem_Free(addrs);
    Py_DECREF(list);
    if (released && pool_maybe_release(self) < 0)
        return NULL;
    Py_RETURN_NONE;

fail:
    PyMem_Free(addrs);
    Py_DECREF(list);
    return NULL;
}

static int
pool_contains(PoolObject *self, PyObject *arg)
{
    uintptr_t a;
    Slab *s;
    uint32_t i;
    int code;

    if (self->closed || !self->configured)
        return 0;
    code = pool_address_arg(arg, &a);
    if (code < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return code == 0 && pool_locate(self, a, &s, &i) == LOC_OK && !slab_is_free(s, i);
}

static Py_ssize_t
pool_length(PoolObject *self)
{
    return self->live;
}

/* _locate(address) -> (region, offset) of a live object */
static PyObject *
pool_locate_method(PoolObject *self, PyObject *arg)
{
    uintptr_t a = 0;
    Slab *s = NULL;
    uint32_t i = 0;
    int code = pool_address_arg(arg, &a);

    if (code < 0 || pool_check_open(self) < 0)
        return NULL;
    if (code == 0)
        code = pool_locate(self, a, &s, &i);
    if (code == LOC_OK && slab_is_free(s, i))
        code = -1;
    if (code != LOC_OK) {
        pool_bad_address(self, arg, a, code, s, i);
        return NULL;
    }
    return Py_BuildValue("(On)", s->region, (Py_ssize_t)i * self->stride);
}

/* _configure(obj_size, stride, per_slab, keep_empty) */
static PyObject *
pool_configure(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t obj_size, stride, per_slab, keep_empty;

    if (check_nargs("_configure", nargs, 4) < 0 || arg_ssize(args[0], &obj_size) < 0
        || arg_ssize(args[1], &stride) < 0 || arg_ssize(args[2], &per_slab) < 0
        || arg_ssize(args[3], &keep_empty) < 0)
        return NULL;
    if (self->configured) {
        PyErr_SetString(PyExc_RuntimeError, "pool is configured already");
        return NULL;
    }
    if (obj_size == 0 || stride < obj_size || per_slab == 0 || per_slab > UINT32_MAX - 64
        || per_slab > PY_SSIZE_T_MAX / stride) {
        PyErr_SetString(PyExc_ValueError, "bad pool layout");
        return NULL;
    }
    self->obj_size = obj_size;
    self->stride = stride;
    self->per_slab = (uint32_t)per_slab;
    self->nwords = (uint32_t)((per_slab + 63) / 64);
    self->span = per_slab * stride;
    self->shift = (stride & (stride - 1)) == 0 ? __builtin_ctzll((unsigned long long)stride) : -1;
    self->keep_empty = keep_empty;
    self->configured = 1;
    Py_RETURN_NONE;
}

static int
is_region(PyObject *o)
{
    return PyType_GetSlot(Py_TYPE(o), Py_bf_getbuffer) == (void *)region_getbuffer;
}

/* _attach(region, zeroed): add an idle region as an empty slab */
static PyObject *
pool_attach(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RegionObject *region;
    Slab *s;
    Py_ssize_t k, pos;
    int zeroed;
    uint32_t i;

    if (check_nargs("_attach", nargs, 2) < 0)
        return NULL;
    if (!is_region(args[0])) {
        PyErr_SetString(PyExc_TypeError, "_attach() needs a Region");
        return NULL;
    }
    zeroed = PyObject_IsTrue(args[1]);
    if (zeroed < 0 || pool_check_open(self) < 0)
        return NULL;
    region = (RegionObject *)args[0];
    if (region->data == NULL || region->capacity < self->span || region->mixed) {
        PyErr_SetString(PyExc_ValueError, "region is closed, too small or mixed for a slab");
        return NULL;
    }
    for (k = 0; k < self->nslabs; k++) {
        if (self->slabs[k]->region == (PyObject *)region) {
            PyErr_SetString(PyExc_ValueError, "region is a slab of this pool already");
            return NULL;
        }
    }
    if (self->nslabs == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 8;
        Slab **slabs = PyMem_Realloc(self->slabs, (size_t)cap * sizeof(Slab *));
        if (slabs == NULL)
            return PyErr_NoMemory();
        self->slabs = slabs;
        self->cap = cap;
    }
    s = PyMem_Calloc(1, sizeof(Slab) + (size_t)self->nwords * sizeof(uint64_t));
    if (s == NULL)
        return PyErr_NoMemory();
    s->base = region->data;
    Py_INCREF((PyObject *)region);
    s->region = (PyObject *)region;
    s->nfree = self->per_slab;
    s->hint = 0;
    s->fresh = zeroed ? 0 : self->per_slab;
    s->prot = region->prot;
    for (i = 0; i + 64 <= self->per_slab; i += 64)
        s->bits[i >> 6] = ~(uint64_t)0;
    if (i < self->per_slab)
        s->bits[i >> 6] = ((uint64_t)1 << (self->per_slab - i)) - 1;
    for (pos = self->nslabs; pos > 0 && self->slabs[pos - 1]->base > s->base; pos--)
        self->slabs[pos] = self->slabs[pos - 1];
    self->slabs[pos] = s;
    self->nslabs++;
    self->nempty++;
    Py_RETURN_NONE;
}

static PyObject *
pool_detach_at(PoolObject *self, Py_ssize_t k)
{
    Slab *s = self->slabs[k];
    PyObject *region = s->region;

    if (s->nfree == self->per_slab)
        self->nempty--;
    self->live -= self->per_slab - s->nfree;
    memmove(&self->slabs[k], &self->slabs[k + 1], (size_t)(self->nslabs - k - 1) * sizeof(Slab *));
    self->nslabs--;
    if (self->cur == s)
        self->cur = NULL;
    if (self->last == s)
        self->last = NULL;
    PyMem_Free(s);
    if (self->cap > 8 && self->nslabs < self->cap / 4) {   /* give the table back too */
        Slab **slabs = PyMem_Realloc(self->slabs, (size_t)(self->cap / 2) * sizeof(Slab *));
        if (slabs != NULL) {
            self->slabs = slabs;
            self->cap /= 2;
        }
    }
    return region;   /* the slab's reference */
}

/* _detach_empty() -> Region | None: take out an empty slab that no buffer
 * pins, while more than keep_empty slabs are empty. The highest one goes
 * first; the current slab last. */
static PyObject *
pool_detach_empty(PoolObject *self, PyObject *unused)
{
    Py_ssize_t k, pick = -1;

    if (self->closed || self->nempty <= self->keep_empty)
        Py_RETURN_NONE;
    for (k = self->nslabs - 1; k >= 0; k--) {
        Slab *s = self->slabs[k];
        RegionObject *region = (RegionObject *)s->region;
        if (s->nfree != self->per_slab || region->exports > 0 || region->busy > 0)
            continue;
        if (s != self->cur) {
            pick = k;
            break;
        }
        if (pick < 0)
            pick = k;
    }
    if (pick < 0)
        Py_RETURN_NONE;
    return pool_detach_at(self, pick);
}

/* _detach_all() -> list[Region]: close the pool, handing back its slabs;
 * BufferError (nothing changed) while a buffer of a slab is exported. */
static PyObject *
pool_detach_all(PoolObject *self, PyObject *unused)
{
    PyObject *list;
    Py_ssize_t k;

    for (k = 0; k < self->nslabs; k++) {
        RegionObject *region = (RegionObject *)self->slabs[k]->region;
        if (region->exports > 0) {
            PyErr_Format(PyExc_BufferError,
                         "cannot close the pool: a slab has %zd exported buffer(s)",
                         region->exports);
            return NULL;
        }
    }
    list = PyList_New(self->nslabs);
    if (list == NULL)
        return NULL;
    for (k = 0; k < self->nslabs; k++) {
        PyList_SetItem(list, k, self->slabs[k]->region);
        PyMem_Free(self->slabs[k]);
    }
    PyMem_Free(self->slabs);
    self->slabs = NULL;
    self->nslabs = self->cap = 0;
    self->cur = self->last = NULL;
    self->live = self->nempty = 0;
    self->closed = 1;
    return list;
}

/* _slabs() -> list[Region]: the attached slabs, by address */
static PyObject *
pool_slab_list(PoolObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(self->nslabs);
    Py_ssize_t k;

    if (list == NULL)
        return NULL;
    for (k = 0; k < self->nslabs; k++) {
        Py_INCREF(self->slabs[k]->region);
        PyList_SetItem(list, k, self->slabs[k]->region);
    }
    return list;
}

static PyObject *
pool_get_free(PoolObject *self, void *closure)
{
    Py_ssize_t k, n = 0;

    for (k = 0; k < self->nslabs; k++)
        n += self->slabs[k]->nfree;
    return PyLong_FromSsize_t(n);
}

static PyObject *
pool_get_closed(PoolObject *self, void *closure)
{
    return PyBool_FromLong(self->closed || !self->configured);
}

static PyObject *
pool_get_metadata(PoolObject *self, void *closure)
{
    size_t n = (size_t)self->cap * sizeof(Slab *)
               + (size_t)self->nslabs * (sizeof(Slab) + self->nwords * sizeof(uint64_t));
    return PyLong_FromSize_t(n);
}

static PyObject *
pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    PoolObject *self = (PoolObject *)alloc(type, 0);

    if (self == NULL)
        return NULL;
    self->shift = -1;
    return (PyObject *)self;
}

static int
pool_traverse(PoolObject *self, visitproc visit, void *arg)
{
    Py_ssize_t k;

    for (k = 0; k < self->nslabs; k++)
        Py_VISIT(self->slabs[k]->region);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static int
pool_clear(PoolObject *self)
{
    Slab **slabs = self->slabs;
    Py_ssize_t k, n = self->nslabs;

    self->slabs = NULL;
    self->nslabs = self->cap = 0;
    self->cur = self->last = NULL;
    self->live = self->nempty = 0;
    if (self->configured)
        self->closed = 1;
    for (k = 0; k < n; k++) {
        PyObject *region = slabs[k]->region;
        PyMem_Free(slabs[k]);
        Py_DECREF(region);
    }
    PyMem_Free(slabs);
    return 0;
}

static void
pool_dealloc(PoolObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    PyObject_GC_UnTrack(self);
    pool_clear(self);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef pool_methods[];

/* Pool._specialize(): give a subclass its own descriptors of the public
 * methods. CPython specialises a call of a C method only when the instance's
 * type is exactly the method's defining type; without this, every
 * pool.alloc() on an instance of a Python subclass takes the generic path,
 * about 20 ns slower. */
static PyObject *
pool_specialize(PyObject *cls, PyObject *unused)
{
    PyMethodDef *def;

    for (def = pool_methods; def->ml_name != NULL; def++) {
        PyObject *descr;
        int rc;

        if (def->ml_name[0] == '_')
            continue;
        descr = PyDescr_NewMethod((PyTypeObject *)cls, def);
        if (descr == NULL)
            return NULL;
        rc = PyObject_SetAttrString(cls, def->ml_name, descr);
        Py_DECREF(descr);
        if (rc < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef pool_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))pool_alloc, METH_FASTCALL,
     "alloc($self, /)\n--\n\nThe address of a free object (its contents are undefined)."},
    {"alloc_zeroed", (PyCFunction)(void (*)(void))pool_alloc_zeroed, METH_FASTCALL,
     "alloc_zeroed($self, /)\n--\n\nThe address of a free object whose bytes are zero."},
    {"free", (PyCFunction)pool_free, METH_O,
     "free($self, address, /)\n--\n\nGive an object back. ValueError (nothing changed) for an address\n"
     "that is not the start of a live object of this pool."},
    {"alloc_many", (PyCFunction)pool_alloc_many, METH_O,
     "alloc_many($self, n, /)\n--\n\nThe addresses of n free objects (all or none)."},
    {"free_many", (PyCFunction)pool_free_many, METH_O,
     "free_many($self, addresses, /)\n--\n\nGive objects back: all of them, or none and ValueError."},
    {"_locate", (PyCFunction)pool_locate_method, METH_O,
     "_locate(address) -> (region, offset) of a live object."},
    {"_configure", (PyCFunction)(void (*)(void))pool_configure, METH_FASTCALL,
     "_configure(obj_size, stride, per_slab, keep_empty)"},
    {"_attach", (PyCFunction)(void (*)(void))pool_attach, METH_FASTCALL,
     "_attach(region, zeroed): add an idle region as an empty slab."},
    {"_detach_empty", (PyCFunction)pool_detach_empty, METH_NOARGS,
     "_detach_empty() -> Region | None: take out an unpinned empty slab past keep_empty."},
    {"_detach_all", (PyCFunction)pool_detach_all, METH_NOARGS,
     "_detach_all() -> list[Region]: close the pool and hand back its slabs."},
    {"_slabs", (PyCFunction)pool_slab_list, METH_NOARGS,
     "_slabs() -> list[Region]: the attached slabs."},
    {"_specialize", (PyCFunction)pool_specialize, METH_NOARGS | METH_CLASS,
     "_specialize(): re-home the public methods on a subclass (a speed-up)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"closed", (getter)pool_get_closed, NULL, "True once the pool is closed.", NULL},
    {"_free", (getter)pool_get_free, NULL, "Free objects in the attached slabs.", NULL},
    {"_metadata", (getter)pool_get_metadata, NULL, "Bytes of C bookkeeping.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot pool_slots[] = {
    {Py_tp_doc, "The fast path of ObjectPool: slabs, free bitmaps, alloc and free."},
    {Py_tp_new, pool_new},
    {Py_tp_dealloc, pool_dealloc},
    {Py_tp_traverse, pool_traverse},
    {Py_tp_clear, pool_clear},
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {Py_sq_length, pool_length},
    {Py_sq_contains, pool_contains},
    {0, NULL},
};

static PyType_Spec pool_spec = {
    .name = "mmap_alloc._mman.Pool",
    .basicsize = sizeof(PoolObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = pool_slots,
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

/* Whether alloc()'s arguments after the size leave the alignment out: none,
 * or align=None given by position or by name. */
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
    if (self->region_type != NULL && nargs >= 1 && PyLong_CheckExact(args[0])
        && no_alignment(args, nargs, kwnames)) {
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
     "alloc($self, /, size, align=None)\n--\n\n"
     "A new region of at least size bytes, zero-filled, page-aligned (or aligned\n"
     "to align, a power of two)."},
    {"dealloc", (PyCFunction)allocator_dealloc, METH_O,
     "dealloc($self, region, /)\n--\n\n"
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
    st->pool_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &pool_spec, NULL);
    if (st->pool_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "Pool", (PyObject *)st->pool_type) < 0)
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
    Py_VISIT(get_state(m)->pool_type);
    Py_VISIT(get_state(m)->allocator_type);
    return 0;
}

static int
mman_clear(PyObject *m)
{
    Py_CLEAR(get_state(m)->region_type);
    Py_CLEAR(get_state(m)->pool_type);
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

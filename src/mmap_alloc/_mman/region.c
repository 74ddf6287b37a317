/*
 * Region: one mapping owned by one object. Its invariants, which keep Python
 * code from crashing the interpreter:
 *   - data == NULL once closed; the pointer is cleared before munmap;
 *   - rec (the protection record) says what every page allows, and every
 *     access made here is checked against it;
 *   - while a buffer is exported (memoryview, numpy array, ctypes object,
 *     a view), the pages it covers are never unmapped, moved, or stripped of
 *     the access the buffer needs; while pinned (functions from function())
 *     the region is never unmapped, moved, shrunk, re-zeroed, or stripped of
 *     EXEC; while busy (a call runs without the GIL) never unmapped or moved.
 */
#include "mman.h"

PyTypeObject *Region_Type = NULL;
PyTypeObject *Pin_Type = NULL;
PyTypeObject *View_Type = NULL;
PyTypeObject *Iter_Type = NULL;

/* ------------------------------------------------------------------ */
/* state                                                               */

int
is_region(PyObject *o)
{
    return Region_Type != NULL && PyObject_TypeCheck(o, Region_Type);
}

int
region_check_open(RegionObject *self)
{
    if (self->data == NULL) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return -1;
    }
    return 0;
}

void
region_busy_enter(RegionObject *self)
{
    if (self->busy_gen != fork_generation) {
        self->busy = 0;
        self->busy_gen = fork_generation;
    }
    self->busy++;
}

void
region_busy_leave(RegionObject *self)
{
    if (self->busy_gen == fork_generation && self->busy > 0)
        self->busy--;
}

int
region_check_idle(RegionObject *self, const char *what)
{
    if (self->nexports > 0) {
        PyErr_Format(PyExc_BufferError, "cannot %s: the region has %zd exported buffer(s)",
                     what, self->nexports);
        return -1;
    }
    if (self->pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: %zd function(s) made by region.function() run code in it",
                     what, self->pins);
        return -1;
    }
    if (region_busy(self) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: a system call on the region is in progress", what);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* regions advised MADV_DONTFORK: absent in a forked child             */

static RegionObject **dontfork = NULL;
static Py_ssize_t ndontfork = 0, cap_dontfork = 0;

int
region_track_dontfork(RegionObject *self)
{
    for (Py_ssize_t i = 0; i < ndontfork; i++)
        if (dontfork[i] == self)
            return 0;
    self->flags |= REGION_DONTFORK;
    if (ndontfork == cap_dontfork) {
        Py_ssize_t cap = cap_dontfork ? cap_dontfork * 2 : 8;
        RegionObject **d = PyMem_Realloc(dontfork, (size_t)cap * sizeof(*d));
        if (d == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        dontfork = d;
        cap_dontfork = cap;
    }
    dontfork[ndontfork++] = self;
    return 0;
}

static void
region_untrack_dontfork(RegionObject *self)
{
    for (Py_ssize_t i = 0; i < ndontfork; i++) {
        if (dontfork[i] == self) {
            dontfork[i] = dontfork[--ndontfork];
            return;
        }
    }
}

void
region_after_fork_in_child(void)
{
    /* The kernel left holes where MADV_DONTFORK pages were: map zero pages
     * there with the recorded protection, so that every buffer and pointer
     * the child inherited still points at memory. */
    for (Py_ssize_t i = 0; i < ndontfork; i++) {
        RegionObject *r = dontfork[i];
        if (r->data == NULL)
            continue;
        for (Py_ssize_t k = 0; k < r->rec.n; k++) {
            Run *run = &r->rec.runs[k];
            Py_ssize_t start = rec_start(&r->rec, k);
            if (!(run->flags & RUN_DONTFORK))
                continue;
            mmap(r->data + start, (size_t)(run->end - start), run->prot,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            run->flags &= (unsigned char)~RUN_DONTFORK;
        }
        rec_merge(&r->rec);
    }
    ndontfork = 0;
}

/* ------------------------------------------------------------------ */
/* creation and release                                                */

PyObject *
region_wrap(PyTypeObject *cls, char *data, Py_ssize_t size, Py_ssize_t capacity,
            const MapSpec *spec, PyObject *owner)
{
    /* the generic allocator zero-fills: only the fields that are not zero are set */
    RegionObject *self = (RegionObject *)PyType_GenericAlloc(cls, 0);

    if (self == NULL)
        return NULL;
    self->data = data;
    self->size = size;
    self->capacity = capacity;
    self->page = spec->page;
    self->align = spec->align;
    self->mflags = spec->mflags;
    self->advice = spec->advice;
    self->populate = spec->populate;
    self->fd = -1;
    self->rec.one.end = capacity;
    self->rec.one.prot = (unsigned char)spec->prot;
    self->rec.runs = &self->rec.one;
    self->rec.n = self->rec.cap = 1;
    self->busy_gen = fork_generation;
    self->owner = Py_NewRef(owner);
    self->backing = Py_NewRef(spec->backing ? spec->backing : Py_None);
    return (PyObject *)self;
}

/* Advise, prefault and wrap pages just mapped at p per spec; nothing left
 * mapped on failure. */
static PyObject *
region_adopt(PyTypeObject *cls, char *p, Py_ssize_t size, Py_ssize_t capacity,
             const MapSpec *spec, PyObject *owner, int populate)
{
    PyObject *region;

    if (spec->advice) {
        if (madvise(p, (size_t)capacity, spec->advice) != 0) {
            int err = errno;
            munmap(p, (size_t)capacity);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (populate) {   /* best effort, as MAP_POPULATE is */
            int advice = (spec->prot & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
            Py_BEGIN_ALLOW_THREADS
            madvise(p, (size_t)capacity, advice);
            Py_END_ALLOW_THREADS
        }
    }
    region = region_wrap(cls, p, size, capacity, spec, owner);
    if (region == NULL)
        munmap(p, (size_t)capacity);
    else {
        mapped_bytes += capacity;
        if (populate)
            ((RegionObject *)region)->flags |= REGION_COMMITTED;
    }
    return region;
}

/* Whether spec prefaults pages, and the mmap flags it maps them with
 * (advised pages are prefaulted after the advice: THP as huge pages). */
static int
spec_flags(const MapSpec *spec, int *populate)
{
    *populate = spec->populate && (spec->prot & PROT_RW);
    return spec->mflags | (*populate && !spec->advice ? MAP_POPULATE : 0);
}

PyObject *
region_map(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity, const MapSpec *spec,
           PyObject *owner)
{
    int populate, mflags = spec_flags(spec, &populate);
    int slow = populate && capacity >= SLOW_CALL_BYTES;
    Py_ssize_t natural = (spec->mflags & MAP_HUGETLB) ? spec->page : system_page;
    char *p;

    if (spec->align <= natural && !slow)   /* the common case: one mmap, with the GIL */
        p = mmap(NULL, (size_t)capacity, spec->prot, mflags | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    else
        p = map_aligned(capacity, spec->align, natural, spec->prot, mflags, -1, slow);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    return region_adopt(cls, p, size, capacity, spec, owner, populate);
}

PyObject *
region_map_at(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity, const MapSpec *spec,
              PyObject *owner, char *address)
{
    int populate, mflags = spec_flags(spec, &populate);
    char *p;

    if (address == NULL)
        return region_map(cls, size, capacity, spec, owner);
    if ((uintptr_t)address % (uintptr_t)spec->align) {
        errno = EINVAL;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    mflags |= MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE;
    if (populate && capacity >= SLOW_CALL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        p = mmap(address, (size_t)capacity, spec->prot, mflags, -1, 0);
        Py_END_ALLOW_THREADS
    }
    else
        p = mmap(address, (size_t)capacity, spec->prot, mflags, -1, 0);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (p != address) {
        /* a kernel before 4.17 took MAP_FIXED_NOREPLACE for a hint */
        munmap(p, (size_t)capacity);
        errno = EADDRNOTAVAIL;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return region_adopt(cls, p, size, capacity, spec, owner, populate);
}

/* Close the fd a shared region owns. */
static void
region_drop_fd(RegionObject *self)
{
    if (self->fd >= 0 && (self->flags & REGION_OWNS_FD))
        close(self->fd);
    self->fd = -1;
}

int
region_close_mapping(RegionObject *self)
{
    char *p = self->data;
    int rc;

    if (p == NULL)
        return 0;
    self->data = NULL;
    if (region_unmap_is_slow(self)) {
        Py_BEGIN_ALLOW_THREADS
        rc = munmap(p, (size_t)self->capacity);
        Py_END_ALLOW_THREADS
    }
    else
        rc = munmap(p, (size_t)self->capacity);
    if (rc != 0) {
        /* e.g. ENOMEM at vm.max_map_count: the mapping is still there, intact */
        int err = errno;
        self->data = p;
        raise_syscall_error(err, self->capacity, "unmap");
        return -1;
    }
    mapped_bytes -= self->capacity;
    if (self->flags & REGION_DONTFORK)
        region_untrack_dontfork(self);
    if (self->fd >= 0)
        region_drop_fd(self);
    return 0;
}

static PyObject *
region_close(RegionObject *self, PyObject *unused)
{
    if (self->data == NULL)
        Py_RETURN_NONE;
    if (self->flags & REGION_PRIVATE) {
        PyErr_SetString(PyExc_ValueError, "this region belongs to a library object");
        return NULL;
    }
    if (region_check_idle(self, "close the region") < 0 || region_close_mapping(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _release(owner): close a region owner made (dealloc's checks and unmap in one call) */
PyObject *
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

static PyObject *
region_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "regions are made by MapAlloc.alloc()");
    return NULL;
}

/* Region._map(size, capacity, prot, mflags, advice, populate, page, align, owner,
 * backing, address=None): map pages and own them, in one step (at address, a
 * multiple of align, when given: see region_map_at). OSError (errno) on refusal. */
static PyObject *
region_map_method(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, capacity;
    MapSpec spec;
    void *address = NULL;

    if (check_nargs("_map", nargs, 10, 11) < 0 || arg_ssize(args[0], "size", &size) < 0
        || arg_ssize(args[1], "capacity", &capacity) < 0 || arg_int(args[2], &spec.prot) < 0
        || arg_int(args[3], &spec.mflags) < 0 || arg_int(args[4], &spec.advice) < 0
        || arg_int(args[5], &spec.populate) < 0
        || arg_ssize(args[6], "page", &spec.page) < 0
        || arg_ssize(args[7], "align", &spec.align) < 0
        || (nargs > 10 && args[10] != Py_None && arg_address(args[10], &address) < 0))
        return NULL;
    if (size == 0 || size > capacity || spec.page <= 0 || (spec.page & (spec.page - 1))
        || capacity % spec.page || spec.align < spec.page || (spec.align & (spec.align - 1))
        || (spec.prot & ~PROT_ALL)) {
        PyErr_SetString(PyExc_ValueError, "bad mapping parameters");
        return NULL;
    }
    spec.backing = args[9];
    return region_map_at((PyTypeObject *)cls, size, capacity, &spec, args[8], address);
}

/* ------------------------------------------------------------------ */
/* exports                                                             */

Export *
region_export(RegionObject *self, Py_ssize_t start, Py_ssize_t end, int writable)
{
    Export *e = PyMem_Malloc(sizeof(Export));

    if (e == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    e->start = start;
    e->end = end;
    e->writable = writable;
    e->prev = NULL;
    e->next = self->exports;
    if (self->exports != NULL)
        self->exports->prev = e;
    self->exports = e;
    self->nexports++;
    return e;
}

void
region_unexport(RegionObject *self, Export *e)
{
    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        self->exports = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    self->nexports--;
    PyMem_Free(e);
}

int
region_exports_conflict(RegionObject *self, Py_ssize_t start, Py_ssize_t end, int prot)
{
    Py_ssize_t n = 0;

    for (Export *e = self->exports; e != NULL; e = e->next) {
        Py_ssize_t lo = e->start & ~(self->page - 1), hi = round_up(e->end, self->page);
        if (lo < end && start < hi && (!(prot & PROT_READ) || (e->writable && !(prot & PROT_WRITE))))
            n++;
    }
    if (n == 0)
        return 0;
    PyErr_Format(PyExc_BufferError,
                 "cannot remove read or write permission: %zd exported buffer(s) of the "
                 "region cover those pages", n);
    return 1;
}

static int
region_getbuffer(RegionObject *self, Py_buffer *view, int flags)
{
    int access;
    Export *e;

    view->obj = NULL;
    if (region_check_open(self) < 0)
        return -1;
    access = rec_access_all(&self->rec, 0, self->size);
    if (!(access & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError, "region is not readable");
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !(access & PROT_WRITE)) {
        PyErr_SetString(PyExc_BufferError, "region is not writable");
        return -1;
    }
    e = region_export(self, 0, self->size, (access & PROT_WRITE) != 0);
    if (e == NULL)
        return -1;
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size,
                          !(access & PROT_WRITE), flags) < 0) {
        region_unexport(self, e);
        return -1;
    }
    view->internal = e;
    return 0;
}

static void
region_releasebuffer(RegionObject *self, Py_buffer *view)
{
    if (view->internal != NULL)
        region_unexport(self, (Export *)view->internal);
}

/* ------------------------------------------------------------------ */
/* getters                                                             */

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

/* The protection all pages share, or -1 when they differ. */
static int
common_prot(RegionObject *self)
{
    int prot = self->rec.runs[0].prot;

    for (Py_ssize_t i = 1; i < self->rec.n; i++)
        if (self->rec.runs[i].prot != prot)
            return -1;
    return prot;
}

static PyObject *
region_get_prot(RegionObject *self, void *closure)
{
    if (region_check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(common_prot(self));
}

static PyObject *
region_get_mixed(RegionObject *self, void *closure)
{
    if (region_check_open(self) < 0)
        return NULL;
    return PyBool_FromLong(common_prot(self) < 0);
}

static PyObject *
region_get_exports(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->nexports);
}

static PyObject *
region_get_pins(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->pins);
}

static PyObject *
region_get_busy(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(region_busy(self));
}

static PyObject *
region_get_owner(RegionObject *self, void *closure)
{
    return Py_NewRef(self->owner);
}

static PyObject *
region_get_backing(RegionObject *self, void *closure)
{
    return Py_NewRef(self->backing);
}

static PyObject *
region_get_page(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->page);
}

static PyObject *
region_get_align(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->align);
}

/* _runs() -> list of (offset, length, prot, flags): the protection record */
PyObject *
region_runs(RegionObject *self, PyObject *unused)
{
    PyObject *list;

    if (region_check_open(self) < 0)
        return NULL;
    list = PyList_New(self->rec.n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->rec.n; i++) {
        Py_ssize_t start = rec_start(&self->rec, i);
        PyObject *item = Py_BuildValue("(nnii)", start, self->rec.runs[i].end - start,
                                       (int)self->rec.runs[i].prot,
                                       (int)self->rec.runs[i].flags);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SetItem(list, i, item);
    }
    return list;
}

/* _page_range(offset=0, length=None) -> (start, length): the whole pages an
 * offset/length pair of arguments means for this region (as protect() and
 * commit() read them) */
static PyObject *
region_page_range(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                  PyObject *kwnames)
{
    PyObject *offset, *length;
    Py_ssize_t start, n;
    int err;

    if (convert_range_args(args, nargs, kwnames, 0, "_page_range", &offset, &length, NULL,
                           NULL) < 0)
        return NULL;
    err = region_check_open(self) < 0 || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
        return NULL;
    return Py_BuildValue("(nn)", start, n);
}

/* ------------------------------------------------------------------ */
/* the type                                                            */

static int
region_traverse(RegionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->backing);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

static int
region_clear(RegionObject *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->backing);
    return 0;
}

static void
region_dealloc(RegionObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    char *p = self->data;

    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    self->data = NULL;
    if (p != NULL) {
        if (self->flags & REGION_DONTFORK)
            region_untrack_dontfork(self);
        unmap_or_bury(p, self->capacity, region_unmap_is_slow(self));
    }
    if (self->fd >= 0)
        region_drop_fd(self);
    if (self->rec.runs != &self->rec.one)
        rec_free(&self->rec);
    region_clear(self);
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

PyObject *region_release(RegionObject *self, PyObject *owner);

static PyMethodDef region_methods[] = {
    {"_map", (PyCFunction)(void (*)(void))region_map_method, METH_FASTCALL | METH_CLASS,
     "_map(size, capacity, prot, mflags, advice, populate, page, align, owner, backing,\n"
     "address=None)\nMap pages and own them (OSError with errno when the kernel refuses);\n"
     "at address: MAP_FIXED_NOREPLACE (EEXIST: taken; EADDRNOTAVAIL: placed elsewhere)."},
    {"close", (PyCFunction)region_close, METH_NOARGS,
     "close($self, /)\n--\n\nUnmap the region; closing a closed region does nothing.\n"
     "BufferError (nothing changed) while a buffer or function of it lives."},
    {"_release", (PyCFunction)region_release, METH_O,
     "_release(owner): close a region owner made (checks and unmap in one call)."},
    {"protect", (PyCFunction)(void (*)(void))region_protect, METH_FASTCALL | METH_KEYWORDS,
     "protect($self, /, perms, offset=0, length=None)\n--\n\n"
     "Set the protection of whole pages [offset, offset + length); None: to the end.\n"
     "BufferError, changing nothing, if it would remove access an exported buffer\n"
     "needs, or EXEC while a function from function() lives. All or nothing."},
    {"_check_protect", (PyCFunction)(void (*)(void))region_check_protect,
     METH_FASTCALL | METH_KEYWORDS,
     "_check_protect(perms, offset=0, length=None): raise what protect() would, changing nothing."},
    {"make_exec", (PyCFunction)(void (*)(void))region_make_exec, METH_FASTCALL | METH_KEYWORDS,
     "make_exec($self, /, offset=0, length=None)\n--\n\n"
     "Make the pages read/exec (not writable), then flush the instruction cache."},
    {"make_writable", (PyCFunction)(void (*)(void))region_make_writable,
     METH_FASTCALL | METH_KEYWORDS,
     "make_writable($self, /, offset=0, length=None)\n--\n\n"
     "Make the pages read/write (not executable)."},
    {"flush_icache", (PyCFunction)(void (*)(void))region_flush_icache,
     METH_FASTCALL | METH_KEYWORDS,
     "flush_icache($self, /, offset=0, length=None)\n--\n\n"
     "Make code written to the pages visible to instruction fetch (no-op on x86)."},
    {"view", (PyCFunction)(void (*)(void))region_view, METH_FASTCALL | METH_KEYWORDS,
     "view($self, /, offset=0, length=None)\n--\n\n"
     "A memoryview of bytes [offset, offset + length) of the region; it pins them.\n"
     "Read-only where a page lacks WRITE; BufferError where one lacks READ."},
    {"find", (PyCFunction)(void (*)(void))region_find, METH_FASTCALL,
     "find($self, sub, start=None, end=None, /)\n--\n\n"
     "The lowest index of sub (bytes-like, or a byte value), or -1; as bytes.find."},
    {"rfind", (PyCFunction)(void (*)(void))region_rfind, METH_FASTCALL,
     "rfind($self, sub, start=None, end=None, /)\n--\n\n"
     "The highest index of sub (bytes-like, or a byte value), or -1; as bytes.rfind."},
    {"_pin", (PyCFunction)region_pin, METH_O,
     "_pin(offset) -> Pin: pin the region for code at offset (which must be executable)."},
    {"_page_range", (PyCFunction)(void (*)(void))region_page_range,
     METH_FASTCALL | METH_KEYWORDS,
     "_page_range(offset=0, length=None) -> (start, length) of whole pages."},
    {"_runs", (PyCFunction)region_runs, METH_NOARGS,
     "_runs() -> [(offset, length, prot, flags)]: the protection record."},
    {"_resize", (PyCFunction)(void (*)(void))region_resize, METH_FASTCALL,
     "_resize(new_size, mode[, spec]): realloc (mode 0), grow (1) or shrink (2) in place."},
    {"_populate", (PyCFunction)(void (*)(void))region_populate, METH_FASTCALL | METH_KEYWORDS,
     "_populate(offset=0, length=None): fault pages in, as their protection allows."},
    {"_madvise", (PyCFunction)(void (*)(void))region_madvise, METH_FASTCALL | METH_KEYWORDS,
     "_madvise(advice, offset=0, length=None): madvise whole pages, with the rules\n"
     "of each advice (discarding advice is refused on pinned code)."},
    {"_mlock", (PyCFunction)(void (*)(void))region_mlock, METH_FASTCALL | METH_KEYWORDS,
     "_mlock(on_fault, offset=0, length=None): mlock or mlock2(MLOCK_ONFAULT)."},
    {"_munlock", (PyCFunction)(void (*)(void))region_munlock, METH_FASTCALL | METH_KEYWORDS,
     "_munlock(offset=0, length=None)"},
    {"_mincore", (PyCFunction)(void (*)(void))region_mincore, METH_FASTCALL | METH_KEYWORDS,
     "_mincore(offset=0, length=None) -> bytes: residency, one byte per page."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef region_getset[] = {
    {"address", (getter)region_get_address, NULL,
     "Start address of the mapping, for interop (ctypes, cffi).", NULL},
    {"size", (getter)region_get_size, NULL, "Bytes asked for: len(region).", NULL},
    {"capacity", (getter)region_get_capacity, NULL, "Bytes mapped (whole pages).", NULL},
    {"closed", (getter)region_get_closed, NULL, "True once the region is unmapped.", NULL},
    {"mixed", (getter)region_get_mixed, NULL, "Whether pages differ in protection.", NULL},
    {"_prot", (getter)region_get_prot, NULL, "Protection all pages share, or -1.", NULL},
    {"_exports", (getter)region_get_exports, NULL, "Live buffers.", NULL},
    {"_pins", (getter)region_get_pins, NULL, "Live functions (pins).", NULL},
    {"_busy", (getter)region_get_busy, NULL, "Calls running without the GIL.", NULL},
    {"_owner", (getter)region_get_owner, NULL, "The allocator that made it.", NULL},
    {"_backing", (getter)region_get_backing, NULL, "What backs it (recorded).", NULL},
    {"_page", (getter)region_get_page, NULL, "The granule of sizes and ranges.", NULL},
    {"_align", (getter)region_get_align, NULL, "The alignment kept across moves.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef region_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(RegionObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot region_slots[] = {
    {Py_tp_doc, "One mapping, its page protections, exports and pins."},
    {Py_tp_new, region_new},
    {Py_tp_dealloc, region_dealloc},
    {Py_tp_traverse, region_traverse},
    {Py_tp_clear, region_clear},
    {Py_tp_methods, region_methods},
    {Py_tp_getset, region_getset},
    {Py_tp_members, region_members},
    {Py_tp_iter, region_iter},
    {Py_sq_length, region_length},
    {Py_sq_contains, region_contains},
    {Py_mp_length, region_length},
    {Py_mp_subscript, region_subscript},
    {Py_mp_ass_subscript, region_ass_subscript},
    {Py_bf_getbuffer, region_getbuffer},
    {Py_bf_releasebuffer, region_releasebuffer},
    {0, NULL},
};

PyType_Spec region_spec = {
    .name = "mmap_alloc._mman.Region",
    .basicsize = sizeof(RegionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = region_slots,
};

/*
 * Region: an owner of one mapping (the core's Mapping, mapping.c), handed
 * to users by MapAlloc; SharedRegion and file regions are Regions too, with
 * a file under the mapping. This file: creation, close, the buffer protocol,
 * introspection, the type. Bytes-like access is bytes.c; protection and pins
 * protect.c; advice advise.c; views views.c; realloc, grow and shrink in
 * place region_size.c (over the core's resize.c).
 */
#include "mman.h"

int
region_check_open(RegionObject *self)
{
    if (self->m.data == NULL) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* creation and release                                                */

PyObject *
region_wrap(PyTypeObject *cls, char *data, Py_ssize_t size, Py_ssize_t capacity,
            const MapSpec *spec, PyObject *owner, int fd)
{
    /* zero-filled: the core sets what is not zero */
    RegionObject *self = region_alloc(cls);

    if (self == NULL)
        return NULL;
    mapping_init(&self->m, data, size, capacity, spec, fd);
    self->owner = Py_NewRef(owner);
    self->backing = Py_NewRef(spec->backing ? spec->backing : Py_None);
    return (PyObject *)self;
}

/* Map fresh anonymous pages per spec (at address exactly, never replacing a
 * mapping, when not NULL); advised and prefaulted as spec says. 0 or errno
 * (the step in *call), nothing left mapped. */
static int
map_anonymous(char **out, Py_ssize_t capacity, const MapSpec *spec, char *address,
                      const char **call)
{
    /* advised pages are prefaulted after the advice (THP: as huge pages) */
    int populate = spec->populate && (spec->prot & PROT_RW);
    int mflags = spec->mflags | (populate && !spec->advice ? MAP_POPULATE : 0);
    int slow = populate && capacity >= SLOW_CALL_BYTES, err;
    Py_ssize_t natural = (spec->mflags & MAP_HUGETLB) ? spec->page : kernel.page;
    void *p = NULL;

    *call = "mmap";
    if (address != NULL && (uintptr_t)address % (uintptr_t)spec->align)
        return EINVAL;
    if (slow)
        Py_BEGIN_ALLOW_THREADS
        err = address != NULL ? os_map(&p, address, (size_t)capacity, spec->prot,
                                       mflags | MAP_FIXED_NOREPLACE, -1, 0)
                              : os_map_aligned(&p, (size_t)capacity, (size_t)spec->align,
                                               (size_t)natural, spec->prot, mflags, -1, 0);
        Py_END_ALLOW_THREADS
    else if (address != NULL)
        err = os_map(&p, address, (size_t)capacity, spec->prot, mflags | MAP_FIXED_NOREPLACE, -1,
                     0);
    else if (spec->align <= natural)   /* the common case: one mmap, with the GIL */
        err = os_map(&p, NULL, (size_t)capacity, spec->prot, mflags, -1, 0);
    else
        err = os_map_aligned(&p, (size_t)capacity, (size_t)spec->align, (size_t)natural,
                             spec->prot, mflags, -1, 0);
    if (err)
        return err;
    if (spec->advice) {
        *call = "madvise";
        err = os_advise(p, (size_t)capacity, spec->advice);
        if (err) {
            os_unmap(p, (size_t)capacity);
            return err;
        }
        if (populate) {   /* best effort, as MAP_POPULATE is */
            int advice = (spec->prot & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
            Py_BEGIN_ALLOW_THREADS
            os_advise(p, (size_t)capacity, advice);
            Py_END_ALLOW_THREADS
        }
    }
    *out = p;
    return 0;
}

PyObject *
region_map(PyTypeObject *cls, Py_ssize_t size, Py_ssize_t capacity, const MapSpec *spec,
           PyObject *owner, char *address)
{
    const char *call;
    char *p;
    PyObject *region;
    int err = map_anonymous(&p, capacity, spec, address, &call);

    if ((err == ENOMEM || err == EAGAIN) && kernel_trim_caches() > 0)
        err = map_anonymous(&p, capacity, spec, address, &call);   /* the caches gave room */
    if (err)
        return raise_os_error(err, call);
    region = region_wrap(cls, p, size, capacity, spec, owner, -1);
    if (region == NULL) {
        os_unmap(p, (size_t)capacity);
        return NULL;
    }
    kernel.mapped_bytes += capacity;
    trace_mapped(p, capacity);
    if (spec->populate && (spec->prot & PROT_RW))
        ((RegionObject *)region)->m.flags |= MAPPING_COMMITTED;
    return region;
}

static PyObject *
region_close(RegionObject *self, PyObject *unused)
{
    int err;

    if (self->m.data == NULL)
        Py_RETURN_NONE;
    if (mapping_check_idle(&self->m, "close the region", "the region") < 0)
        return NULL;
    err = mapping_close(&self->m);
    if (err)
        return raise_os_error_sized(err, "munmap", self->m.capacity, "unmap");
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
    if (self->m.data == NULL) {
        PyErr_SetString(PyExc_ValueError, "region was already freed");
        return NULL;
    }
    return region_close(self, NULL);
}

/* ------------------------------------------------------------------ */
/* the with-statement                                                  */

/* A class attribute naming the region in messages (_noun: "region",
 * "shared region"; _closed_word: "closed", "freed"), else dflt. */
static PyObject *
word_of(RegionObject *self, const char *name, const char *dflt)
{
    PyObject *word = PyObject_GetAttrString((PyObject *)self, name);

    if (word != NULL && PyUnicode_Check(word))
        return word;
    Py_XDECREF(word);
    PyErr_Clear();
    return PyUnicode_FromString(dflt);
}

static PyObject *
region_enter(RegionObject *self, PyObject *unused)
{
    PyObject *noun, *word;

    if (self->m.data != NULL)
        return Py_NewRef((PyObject *)self);
    noun = word_of(self, "_noun", "region");
    word = word_of(self, "_closed_word", "closed");
    if (noun != NULL && word != NULL)
        PyErr_Format(PyExc_ValueError, "%U is %U", noun, word);
    Py_XDECREF(noun);
    Py_XDECREF(word);
    return NULL;
}

/* __exit__(exc_type, exc, tb): close the region. A refusal (BufferError: a
 * buffer still lives) after a clean block is raised as "the region was not
 * closed: ..."; after a failing block it is a note on the block's
 * exception, which propagates, and the region stays open (it is unmapped
 * when collected). A subclass's close() is the one called. */
static PyObject *
region_exit(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result, *type, *error, *tb, *noun = NULL, *word = NULL, *refused = NULL;
    PyObject *exc = nargs >= 2 ? args[1] : Py_None;

    if (check_nargs("__exit__", nargs, 3, 3) < 0)
        return NULL;
    if (Py_IS_TYPE((PyObject *)self, kernel.region_type))
        result = region_close(self, NULL);
    else   /* a subclass may close more than the mapping */
        result = PyObject_CallMethod((PyObject *)self, "close", NULL);
    if (result != NULL) {
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    if (!PyErr_ExceptionMatches(PyExc_BufferError))
        return NULL;
    PyErr_Fetch(&type, &error, &tb);
    PyErr_NormalizeException(&type, &error, &tb);
    noun = word_of(self, "_noun", "region");
    word = word_of(self, "_closed_word", "closed");
    if (noun != NULL && word != NULL)
        refused = PyUnicode_FromFormat("the %U was not %U: %S", noun, word, error);
    if (refused != NULL) {
        if (exc == Py_None) {
            PyObject *raised = PyObject_CallFunctionObjArgs(PyExc_BufferError, refused, NULL);
            if (raised != NULL) {
                PyException_SetCause(raised, NULL);   /* from None */
                PyErr_SetObject(PyExc_BufferError, raised);
                Py_DECREF(raised);
            }
        }
        else {
            PyObject *note = PyUnicode_FromFormat("and %U", refused);
            PyObject *done = note != NULL ? PyObject_CallMethod(exc, "add_note", "O", note)
                                          : NULL;
            Py_XDECREF(note);
            Py_XDECREF(done);
        }
    }
    Py_XDECREF(type);
    Py_XDECREF(error);
    Py_XDECREF(tb);
    Py_XDECREF(noun);
    Py_XDECREF(word);
    Py_XDECREF(refused);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

MADE_BY(region_new, "regions are made by MapAlloc.alloc()")

/* Region._map(size, capacity, prot, mflags, advice, populate, page, align, owner,
 * backing, address=None): map pages and own them, in one step (at address, a
 * multiple of align, exactly, never replacing a mapping). OSError on refusal
 * (EEXIST: the range is taken; EADDRNOTAVAIL: the kernel placed it elsewhere). */
static PyObject *
region_map_method(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, capacity;
    MapSpec spec;
    void *address = NULL;

    if (check_nargs("_map", nargs, 10, 11) < 0 || arg_ssize(args[0], "size", &size) < 0
        || arg_ssize(args[1], "capacity", &capacity) < 0
        || arg_int(args[2], "prot", &spec.prot) < 0
        || arg_int(args[3], "mflags", &spec.mflags) < 0
        || arg_int(args[4], "advice", &spec.advice) < 0
        || arg_int(args[5], "populate", &spec.populate) < 0
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
    return region_map((PyTypeObject *)cls, size, capacity, &spec, args[8], address);
}

/* ------------------------------------------------------------------ */
/* the buffer protocol                                                 */

static int
region_getbuffer(RegionObject *self, Py_buffer *view, int flags)
{
    int access;
    Hold *h;

    view->obj = NULL;
    if (region_check_open(self) < 0 || mapping_check_truncated(&self->m, 0, self->m.size) < 0)
        return -1;
    access = rec_access_all(&self->m.rec, 0, self->m.size);
    if (!(access & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError, "region is not readable");
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !(access & PROT_WRITE)) {
        PyErr_SetString(PyExc_BufferError, "region is not writable");
        return -1;
    }
    h = mapping_hold(&self->m, 0, self->m.size, (access & PROT_WRITE) ? HOLD_WRITE : HOLD_READ);
    if (h == NULL)
        return -1;
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->m.data, self->m.size,
                          !(access & PROT_WRITE), flags) < 0) {
        mapping_unhold(&self->m, h);
        return -1;
    }
    view->internal = h;
    return 0;
}

static void
region_releasebuffer(RegionObject *self, Py_buffer *view)
{
    Hold *h = buffer_release_once(view);

    if (h != NULL)
        mapping_unhold(&self->m, h);
}

/* ------------------------------------------------------------------ */
/* getters                                                             */

static PyObject *
region_get_address(RegionObject *self, void *closure)
{
    if (region_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->m.data);
}

/* The protection all pages share, or -1 when they differ. */
static int
common_prot(RegionObject *self)
{
    int prot = self->m.rec.runs[0].prot;

    for (Py_ssize_t i = 1; i < self->m.rec.n; i++)
        if (self->m.rec.runs[i].prot != prot)
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

/* _runs() -> list of (offset, length, prot, flags): the protection record,
 * as it was when the call began (building the list may start a collection,
 * whose callbacks may change the record or close the region) */
PyObject *
region_runs(RegionObject *self, PyObject *unused)
{
    Py_ssize_t n;
    Run *runs;
    PyObject *list;

    if (region_check_open(self) < 0)
        return NULL;
    n = self->m.rec.n;
    runs = PyMem_Malloc((size_t)n * sizeof(Run));
    if (runs == NULL)
        return PyErr_NoMemory();
    memcpy(runs, self->m.rec.runs, (size_t)n * sizeof(Run));
    list = PyList_New(0);
    for (Py_ssize_t i = 0, start = 0; list != NULL && i < n; start = runs[i++].end)
        if (list_append_new(list, Py_BuildValue("(nnii)", start, runs[i].end - start,
                                                (int)runs[i].prot, (int)runs[i].flags))
            < 0)
            Py_CLEAR(list);
    PyMem_Free(runs);
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

    if (convert_range_args(args, nargs, kwnames, "_page_range", &offset, &length, NULL, NULL) < 0)
        return NULL;
    err = region_check_open(self) < 0 || page_range(&self->m, offset, length, &start, &n) < 0;
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
    return kernel_visit((PyObject *)self, self->backing, visit, arg);
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

    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->m.data != NULL || self->m.fd >= 0 || self->m.flags
        || self->m.rec.runs != &self->m.rec.one)
        mapping_release(&self->m);   /* else dealloc() closed it, and nothing is left */
    if (self->m.x != NULL)
        mapping_free_extra(&self->m);
    region_clear(self);
    if (tp == kernel.region_type && kernel.nspare_regions < SPARE_REGIONS) {
        self->m.data = kernel.spare_regions;   /* kept: region_alloc takes it back */
        kernel.spare_regions = self;
        kernel.nspare_regions++;
    }
    else
        PyObject_GC_Del(self);
    Py_DECREF(tp);
}

void
region_free_spares(void)
{
    while (kernel.spare_regions != NULL) {
        RegionObject *self = kernel.spare_regions;
        kernel.spare_regions = self->m.data;
        kernel.nspare_regions--;
        PyObject_GC_Del(self);
    }
}

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(region_map_method)
LOCKED_O(region_close)
LOCKED_O(region_release)
LOCKED_FASTKW(region_protect)
LOCKED_FASTKW(region_check_protect)
LOCKED_FASTKW(region_make_exec)
LOCKED_FASTKW(region_make_writable)
LOCKED_FASTKW(region_flush_icache)
LOCKED_FASTKW(region_view)
LOCKED_FAST(region_find)
LOCKED_FAST(region_rfind)
LOCKED_O(region_pin_public)
LOCKED_O(region_pin)
LOCKED_FASTKW(region_page_range)
LOCKED_O(region_runs)
LOCKED_FAST(region_resize)
LOCKED_FASTKW(region_populate)
LOCKED_FASTKW(region_madvise)
LOCKED_FASTKW(region_mlock)
LOCKED_FASTKW(region_munlock)
LOCKED_FASTKW(region_mincore)
LOCKED_O(region_enter)
LOCKED_FAST(region_exit)

static PyMethodDef region_methods[] = {
    {"_map", (PyCFunction)(void (*)(void))LOCKED(region_map_method), METH_FASTCALL | METH_CLASS,
     "_map(size, capacity, prot, mflags, advice, populate, page, align, owner, backing,\n"
     "address=None)\nMap pages and own them (OSError with errno when the kernel refuses);\n"
     "at address: MAP_FIXED_NOREPLACE (EEXIST: taken; EADDRNOTAVAIL: placed elsewhere)."},
    METHOD_NOARGS("close", region_close,
        "close($self, /)\n--\n\nUnmap the region; closing a closed region does nothing.\n"
        "BufferError (nothing changed) while a buffer or function of it lives."),
    METHOD_NOARGS("__enter__", region_enter,
        "__enter__($self, /)\n--\n\nThe region itself; ValueError if it is closed."),
    METHOD_FAST("__exit__", region_exit,
        "__exit__($self, exc_type, exc, tb, /)\n--\n\n"
        "Close the region. A refusal (a buffer still lives) after a block that raised is a\n"
        "note on the block's exception, which propagates; after a clean block, a BufferError."),
    METHOD_O("_release", region_release,
        "_release(owner): close a region owner made (checks and unmap in one call)."),
    METHOD_FASTKW("protect", region_protect,
        "protect($self, /, perms, offset=0, length=None)\n--\n\n"
        "Set the protection of whole pages [offset, offset + length); None: to the end.\n"
        "BufferError, changing nothing, if it would remove access an exported buffer\n"
        "needs, or EXEC while a function from function() lives. All or nothing."),
    METHOD_FASTKW("_check_protect", region_check_protect,
        "_check_protect(perms, offset=0, length=None): raise what protect() would, changing "
        "nothing."),
    METHOD_FASTKW("make_exec", region_make_exec,
        "make_exec($self, /, offset=0, length=None)\n--\n\n"
        "Make the pages read/exec (not writable), then flush the instruction cache."),
    METHOD_FASTKW("make_writable", region_make_writable,
        "make_writable($self, /, offset=0, length=None)\n--\n\n"
        "Make the pages read/write (not executable)."),
    METHOD_FASTKW("flush_icache", region_flush_icache,
        "flush_icache($self, /, offset=0, length=None)\n--\n\n"
        "Make code written to the pages visible to instruction fetch (no-op on x86)."),
    METHOD_FASTKW("view", region_view,
        "view($self, /, offset=0, length=None)\n--\n\n"
        "A memoryview of bytes [offset, offset + length) of the region; it pins them.\n"
        "Read-only where a page lacks WRITE; BufferError where one lacks READ."),
    METHOD_FAST("find", region_find,
        "find($self, sub, start=None, end=None, /)\n--\n\n"
        "The lowest index of sub (bytes-like, or a byte value), or -1; as bytes.find."),
    METHOD_FAST("rfind", region_rfind,
        "rfind($self, sub, start=None, end=None, /)\n--\n\n"
        "The highest index of sub (bytes-like, or a byte value), or -1; as bytes.rfind."),
    METHOD_NOARGS("pin", region_pin_public,
        "pin($self, /)\n--\n\n"
        "A Pin that keeps the region mapped and in place while it lives, as an\n"
        "exported buffer does: close(), realloc() and protect() respect it. Give it\n"
        "as base= to consumers of region.address (pyarrow's foreign_buffer, numpy,\n"
        "ctypes)."),
    METHOD_O("_pin", region_pin,
        "_pin(offset) -> Pin: pin the region for code at offset (which must be executable)."),
    METHOD_FASTKW("_page_range", region_page_range,
        "_page_range(offset=0, length=None) -> (start, length) of whole pages."),
    METHOD_NOARGS("_runs", region_runs,
        "_runs() -> [(offset, length, prot, flags)]: the protection record."),
    METHOD_FAST("_resize", region_resize,
        "_resize(new_size, mode[, spec]): realloc (mode 0), grow (1) or shrink (2) in place."),
    METHOD_FASTKW("_populate", region_populate,
        "_populate(offset=0, length=None): fault pages in, as their protection allows."),
    METHOD_FASTKW("_madvise", region_madvise,
        "_madvise(advice, offset=0, length=None): madvise whole pages, with the rules\n"
        "of each advice (discarding advice is refused on pinned code)."),
    METHOD_FASTKW("_mlock", region_mlock,
        "_mlock(on_fault, offset=0, length=None): lock the pages now, or as they fault in."),
    METHOD_FASTKW("_munlock", region_munlock, "_munlock(offset=0, length=None)"),
    METHOD_FASTKW("_mincore", region_mincore,
        "_mincore(offset=0, length=None) -> bytes: residency, one byte per page."),
    {NULL, NULL, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_GET(region_get_address)
LOCKED_GET(region_get_mixed)
LOCKED_GET(region_get_prot)
LOCKED_GET(field_get)

static PyGetSetDef region_getset[] = {
    {"address", (getter)LOCKED(region_get_address), NULL,
     "Start address of the mapping, for interop (ctypes, cffi).", NULL},
    FIELD_GETSET("closed", RegionObject, m, GET_CLOSED, "True once the region is unmapped."),
    {"mixed", (getter)LOCKED(region_get_mixed), NULL, "Whether pages differ in protection.", NULL},
    {"_prot", (getter)LOCKED(region_get_prot), NULL, "Protection all pages share, or -1.", NULL},
    FIELD_GETSET("_busy", RegionObject, m, GET_BUSY, "Calls running without the GIL."),
    FIELD_GETSET("_exports", RegionObject, m, GET_EXPORTS, "Live buffers."),
    FIELD_GETSET("_pins", RegionObject, m, GET_PINS, "Live pins (functions, pin())."),
    FIELD_GETSET("_align", RegionObject, m, GET_ALIGN, "The alignment kept across moves."),
    {NULL, NULL, NULL, NULL, NULL},
};

#define MAPPING_MEMBER(name, field, doc) \
    {name, T_PYSSIZET, offsetof(RegionObject, m) + offsetof(Mapping, field), READONLY, doc}

static PyMemberDef region_members[] = {
    MAPPING_MEMBER("size", size, "Bytes asked for: len(region)."),
    MAPPING_MEMBER("capacity", capacity, "Bytes mapped (whole pages)."),
    {"_page", T_INT, offsetof(RegionObject, m) + offsetof(Mapping, page), READONLY,
     "The granule of sizes and ranges."},
    {"_owner", T_OBJECT, offsetof(RegionObject, owner), READONLY, "The allocator that made it."},
    {"_backing", T_OBJECT, offsetof(RegionObject, backing), READONLY, "What backs it (recorded)."},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(RegionObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_DEALLOC(region_dealloc)
LOCKED_INQUIRY(region_clear)
LOCKED_UNARY(region_iter)
LOCKED_LEN(region_length)
LOCKED_CONTAINS(region_contains)
LOCKED_BINARY(region_subscript)
LOCKED_ASS(region_ass_subscript)
LOCKED_BUFFER(region)

static PyType_Slot region_slots[] = {
    {Py_tp_doc, "One mapping, its page protections, exports and pins."},
    {Py_tp_new, region_new},
    GC_SLOTS(region),
    {Py_tp_methods, region_methods},
    {Py_tp_getset, region_getset},
    {Py_tp_members, region_members},
    {Py_tp_iter, LOCKED(region_iter)},
    {Py_sq_length, LOCKED(region_length)},
    {Py_sq_contains, LOCKED(region_contains)},
    {Py_mp_length, LOCKED(region_length)},
    {Py_mp_subscript, LOCKED(region_subscript)},
    {Py_mp_ass_subscript, LOCKED(region_ass_subscript)},
    BUFFER_SLOTS(region),
    {0, NULL},
};

/* region.py names it mmap_alloc.Region */
PyType_Spec region_spec
    = KERNEL_SPEC("Region", RegionObject, Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, region_slots);

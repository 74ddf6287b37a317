/*
 * Pool: the slabs and free bitmaps of mmap_alloc.ObjectPool (pool.py).
 *
 * A slab is a mapping the pool owns outright: it takes the pages of a fresh
 * Region from its slab source (a callable given once, called with no
 * arguments when every slab is full) and closes that Region in the same C
 * call, so no Python object can close, move or re-protect a slab. Per slab,
 * one bit per object (1 = free) in C memory, never in the slab: freed memory
 * is not touched, and pools of read-only or inaccessible memory work too.
 *
 * Everything runs under the kernel lock (the GIL in GIL builds). Python
 * code runs only inside the slab source call and in a collection that an
 * allocation starts (a view's, an error's); the state is consistent before
 * each, and no Slab pointer is kept across one. Empty slabs past keep_empty
 * go back to the kernel (pool_table.c): up to keep_spare stay mapped but
 * uncommitted for reuse, the rest are unmapped. A view of an object pins
 * its slab.
 */
#include "pool.h"

/* The ValueError for a bad address (code from pool_locate, or -1 for an
 * object that is not allocated). */
void
pool_bad_address(PoolObject *self, PyObject *arg, uintptr_t a, int code, Slab *s, uint32_t i)
{
    if (code == LOC_INSIDE) {
        uintptr_t off = (a - (uintptr_t)s->base) % (uintptr_t)self->stride;
        PyErr_Format(PyExc_ValueError,
                     "address %p lies %zu bytes inside an object of this pool (which starts at %p)",
                     (void *)a, (size_t)off, (void *)(a - off));
    }
    else if (code == -1)
        PyErr_Format(PyExc_ValueError,
                     "address %p is not allocated (freed already, or never handed out)",
                     (void *)a);
    else if (arg != NULL && !PyLong_Check(arg))
        PyErr_Format(PyExc_ValueError, "%R is not an object of this pool", arg);
    else if (arg != NULL && a == 0)
        PyErr_Format(PyExc_ValueError, "address %R is not an object of this pool", arg);
    else
        PyErr_Format(PyExc_ValueError, "address %p is not an object of this pool", (void *)a);
}

/* Take a free object of slab s (s->nfree > 0); *used: whether it may have
 * been written since the slab was mapped or uncommitted. */
static inline uint32_t
slab_take(PoolObject *self, Slab *s, int *used)
{
    uint32_t w = s->hint, i;
    uint64_t word;

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

static void
slab_reset(PoolObject *self, Slab *s, int zeroed)
{
    uint32_t i;

    s->nfree = self->per_slab;
    s->hint = 0;
    s->fresh = zeroed ? 0 : self->per_slab;
    for (i = 0; i + 64 <= self->per_slab; i += 64)
        s->bits[i >> 6] = ~(uint64_t)0;
    if (i < self->per_slab)
        s->bits[i >> 6] = ((uint64_t)1 << (self->per_slab - i)) - 1;
}

/* Why the pages of a region cannot be a slab, or NULL. The pool gives an
 * empty slab's pages back (MADV_DONTNEED) and takes them as zero again: they
 * must be private and anonymous, of one protection, with no state the
 * kernel keeps for them (locked pages refuse to be given back). */
static const char *
slab_refusal(PoolObject *self, const Mapping *m)
{
    if (m->capacity < self->span)
        return "it is smaller than a slab";
    if (m->fd >= 0)
        return "it maps a file";
    if (m->flags & (MAPPING_ADVISED | MAPPING_REGISTERED))
        return "it was locked or given advice the kernel keeps (region.lock(), "
               "region.advise()); the pool gives an empty slab's pages back to the kernel, "
               "which locked pages refuse";
    if (m->rec.n != 1 || m->rec.runs[0].flags)
        return "its pages differ in protection, or carry guard pages or fork or dump advice";
    return NULL;
}

/* Take the pages of a fresh Region as a new empty slab, in one step. */
static int
pool_adopt(PoolObject *self, PyObject *obj)
{
    const char *refusal;
    RegionObject *region;
    Slab *s;

    if (!is_region(obj)) {
        PyErr_SetString(PyExc_TypeError, "the slab source must return a Region");
        return -1;
    }
    region = (RegionObject *)obj;
    if (pool_reserve_table(self) < 0)
        return -1;
    s = PyMem_Calloc(1, sizeof(Slab) + (size_t)self->nwords * sizeof(uint64_t));
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (region_check_open(region) < 0
        || mapping_check_idle(&region->m, "use it as a slab", "the region") < 0) {
        PyMem_Free(s);
        return -1;
    }
    refusal = slab_refusal(self, &region->m);
    if (refusal != NULL) {
        PyMem_Free(s);
        PyErr_Format(PyExc_ValueError,
                     "the pool's allocator returned a region that cannot be a slab: %s", refusal);
        return -1;
    }
    s->base = region->m.data;
    s->capacity = region->m.capacity;
    s->prot = region->m.rec.runs[0].prot;
    slab_reset(self, s, 1);
    region->m.data = NULL;   /* the pages are the pool's now: the region is closed */
    pool_insert(self, s);
    return 0;
}

/* Add one empty slab: a spare, or the pages of a new region from the slab
 * source (Python code runs there: no Slab pointer is kept across it). */
int
pool_add_slab(PoolObject *self)
{
    PyObject *region;
    int rc;

    if (pool_check_open(self) < 0)
        return -1;
    if (self->nspares > 0) {
        Slab *s;
        if (pool_reserve_table(self) < 0)
            return -1;
        s = self->spares[--self->nspares];
        if (self->populate && (s->prot & PROT_RW))
            os_advise(s->base, (size_t)s->capacity,
                      (s->prot & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
        slab_reset(self, s, 1);
        pool_insert(self, s);
        return 0;
    }
    region = PyObject_CallNoArgs(self->source);
    if (region == NULL)
        return -1;
    if (self->closed) {
        Py_DECREF(region);   /* the region unmaps itself */
        PyErr_SetString(PyExc_ValueError, "pool is closed");
        return -1;
    }
    rc = pool_adopt(self, region);
    Py_DECREF(region);
    return rc;
}

/* The free objects outside the current slab. */
static inline Py_ssize_t
pool_free_outside_cur(PoolObject *self)
{
    return self->nslabs * (Py_ssize_t)self->per_slab - self->live
           - (self->cur != NULL ? (Py_ssize_t)self->cur->nfree : 0);
}

/* A slab with a free object: the current one, else the first partly used
 * one by address, else an empty one, else a new one. The search starts
 * past the slabs known full (scan_from) and stops when it has seen every
 * free object, so that a pool filling slab after slab, in whatever address
 * order the slabs come, does not look through all of them each time. */
static Slab *
pool_refill(PoolObject *self)
{
    for (;;) {
        Slab *found = NULL;
        Py_ssize_t k, first = -1, unseen;

        if (pool_check_open(self) < 0)
            return NULL;
        if (self->cur != NULL && self->cur->nfree > 0)
            return self->cur;
        unseen = pool_free_outside_cur(self);   /* cur is full: every free object */
        if (self->scan_from > self->nslabs || unseen != self->scan_mark)
            self->scan_from = 0;   /* an object was freed outside cur: look from the start */
        for (k = self->scan_from; k < self->nslabs && unseen > 0; k++) {
            Slab *s = self->slabs[k];
            if (s->nfree == 0)
                continue;
            if (first < 0)
                first = k;
            if (s->nfree < self->per_slab) {
                found = s;
                break;
            }
            if (found == NULL)
                found = s;
            unseen -= s->nfree;
        }
        if (found != NULL) {
            self->cur = found;
            self->scan_from = first;
            self->scan_mark = pool_free_outside_cur(self);
            return found;
        }
        self->scan_from = self->nslabs;   /* all full: the new slab's place lowers it */
        self->scan_mark = pool_free_outside_cur(self);
        if (pool_add_slab(self) < 0)
            return NULL;
    }
}

PyObject *
address_object(uintptr_t a)
{
    return PyLong_FromUnsignedLong((unsigned long)a);
}

/* The int of address a, object i of its slab: the one made last time when
 * it is still known (POOL_INTS), else a new one, remembered. An int's
 * deallocation runs no Python code. */
static inline PyObject *
pool_int(PoolObject *self, uintptr_t a, uint32_t i)
{
    PoolInt *known = &self->ints[i & (POOL_INTS - 1)];
    PyObject *r;

    if (known->value != NULL && known->address == a)
        return Py_NewRef(known->value);
    r = address_object(a);
    if (r != NULL) {
        known->address = a;
        REPLACE_REF(known->value, Py_NewRef(r));
    }
    return r;
}

static void
pool_forget_ints(PoolObject *self)
{
    for (int k = 0; k < POOL_INTS; k++)
        Py_CLEAR(self->ints[k].value);
}

/* alloc and alloc_zeroed take METH_FASTCALL: CPython specialises fast calls. */
static PyObject *
pool_alloc_impl(PoolObject *self, Py_ssize_t nargs, int zeroed)
{
    Slab *s = self->cur;
    uint32_t i;
    int used;
    uintptr_t a;
    PyObject *r;

    if (nargs != 0 && check_nargs(zeroed ? "alloc_zeroed" : "alloc", nargs, 0, 0) < 0)
        return NULL;
    if (s == NULL || s->nfree == 0 || self->closed) {
        s = pool_refill(self);
        if (s == NULL)
            return NULL;
    }
    i = slab_take(self, s, &used);
    a = (uintptr_t)s->base + (uintptr_t)i * (uintptr_t)self->stride;
    if (zeroed && used && (s->prot & PROT_WRITE))
        memset((void *)a, 0, (size_t)self->obj_size);
    r = pool_int(self, a, i);   /* an int: not GC-tracked, no collection can start */
    if (r == NULL)
        slab_give(self, s, i);
    return r;
}

static PyObject *
pool_alloc(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return pool_alloc_impl(self, nargs, 0);
}

static PyObject *
pool_alloc_zeroed(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return pool_alloc_impl(self, nargs, 1);
}

/* A live object of the pool: its address, slab and index in the slab. */
typedef struct {
    uintptr_t address;
    Slab *slab;
    uint32_t index;
} LiveObject;

/* An address argument converted: code as pool_address_arg returned it. */
typedef struct {
    PyObject *arg;
    uintptr_t address;
    int code;
} AddressArg;

/* The live object at a converted address; -1 with the ValueError for
 * anything else. Runs no Python code before it succeeds. */
static inline int
pool_find_live(PoolObject *self, const AddressArg *a, LiveObject *o)
{
    int code = a->code;

    if (pool_check_open(self) < 0)
        return -1;
    o->address = a->address;
    if (code == 0)
        code = pool_locate(self, o->address, &o->slab, &o->index);
    if (code == LOC_OK && slab_is_free(o->slab, o->index))
        code = -1;
    if (code != LOC_OK) {
        pool_bad_address(self, a->arg, o->address, code, o->slab, o->index);
        return -1;
    }
    return 0;
}

/* The live object arg names; -1 with the ValueError (or TypeError) for
 * anything else. */
static inline int
pool_live_object(PoolObject *self, PyObject *arg, LiveObject *o)
{
    AddressArg a = {arg, 0, 0};

    a.code = pool_address_arg(arg, &a.address);
    return a.code < 0 ? -1 : pool_find_live(self, &a, o);
}

static PyObject *
pool_free(PoolObject *self, PyObject *arg)
{
    LiveObject o = {0, NULL, 0};

    if (pool_live_object(self, arg, &o) < 0)
        return NULL;
    if (slab_give(self, o.slab, o.index) && self->nempty > self->keep_empty)
        pool_release(self);
    Py_RETURN_NONE;
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
    if (self->closed)
        return 0;
    return code == 0 && pool_locate(self, a, &s, &i) == LOC_OK && !slab_is_free(s, i);
}

static Py_ssize_t
pool_length(PoolObject *self)
{
    return self->live;
}

/* what view(address) exposes: the live object there, counted by its slab */
static int
pool_view_target(PyObject *owner, const void *key, ViewTarget *t)
{
    PoolObject *self = (PoolObject *)owner;
    LiveObject o = {0, NULL, 0};

    if (pool_find_live(self, key, &o) < 0)
        return -1;
    if (!(o.slab->prot & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError, "the pool's memory is not readable");
        return -1;
    }
    *t = (ViewTarget){(char *)o.address, self->obj_size, (o.slab->prot & PROT_WRITE) != 0,
                      &o.slab->exports};
    return 0;
}

/* view(address) -> memoryview of the live object at address; pins its slab */
static PyObject *
pool_view(PoolObject *self, PyObject *arg)
{
    AddressArg a = {arg, 0, 0};

    a.code = pool_address_arg(arg, &a.address);
    return a.code < 0 ? NULL : view_counted((PyObject *)self, &a, pool_view_target);
}

/* _configure(obj_size, stride, per_slab, keep_empty, keep_spare, populate, source) */
static PyObject *
pool_configure(PoolObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t obj_size, stride, per_slab, keep_empty, keep_spare;
    int populate;

    if (check_nargs("_configure", nargs, 7, 7) < 0
        || arg_ssize(args[0], "obj_size", &obj_size) < 0
        || arg_ssize(args[1], "stride", &stride) < 0
        || arg_ssize(args[2], "per_slab", &per_slab) < 0
        || arg_ssize(args[3], "keep_empty", &keep_empty) < 0
        || arg_ssize(args[4], "keep_spare", &keep_spare) < 0 || arg_int(args[5], "populate", &populate) < 0)
        return NULL;
    if (self->configured) {
        PyErr_SetString(PyExc_RuntimeError, "pool is configured already");
        return NULL;
    }
    if (obj_size == 0 || stride < obj_size || per_slab == 0 || per_slab > UINT32_MAX - 64
        || per_slab > PY_SSIZE_T_MAX / stride || !PyCallable_Check(args[6])) {
        PyErr_SetString(PyExc_ValueError, "bad pool layout");
        return NULL;
    }
    self->spares = PyMem_Malloc((size_t)(keep_spare > 0 ? keep_spare : 1) * sizeof(Slab *));
    if (self->spares == NULL)
        return PyErr_NoMemory();
    self->cap_spares = keep_spare;
    self->obj_size = obj_size;
    self->stride = stride;
    self->per_slab = (uint32_t)per_slab;
    self->nwords = (uint32_t)((per_slab + 63) / 64);
    self->span = per_slab * stride;
    self->shift = (stride & (stride - 1)) == 0 ? __builtin_ctzll((unsigned long long)stride) : -1;
    self->keep_empty = keep_empty;
    self->keep_spare = keep_spare;
    self->populate = populate;
    self->source = Py_NewRef(args[6]);
    self->configured = 1;
    Py_RETURN_NONE;
}

static Py_ssize_t
pool_exported(PoolObject *self)
{
    Py_ssize_t n = 0;

    for (Py_ssize_t k = 0; k < self->nslabs; k++)
        n += self->slabs[k]->exports;
    return n;
}

/* Unmap every slab. */
static void
pool_unmap_all(PoolObject *self)
{
    Slab **slabs = self->slabs, **spares = self->spares;
    Slab **table = slabs != NULL ? slabs - self->head : NULL;
    Py_ssize_t n = self->nslabs, m = self->nspares;

    self->slabs = NULL;
    self->spares = NULL;
    self->nslabs = self->cap = self->head = self->nspares = self->cap_spares = 0;
    self->scan_from = self->scan_mark = 0;
    self->cur = self->last = self->emptied = NULL;
    self->live = self->nempty = 0;
    for (Py_ssize_t k = 0; k < n; k++)
        slab_unmap(slabs[k]);
    for (Py_ssize_t k = 0; k < m; k++)
        slab_unmap(spares[k]);
    PyMem_Free(table);
    PyMem_Free(spares);
}

static PyObject *
pool_close(PoolObject *self, PyObject *unused)
{
    Py_ssize_t exported;

    if (self->closed || !self->configured) {
        self->closed = self->configured;
        Py_RETURN_NONE;
    }
    exported = pool_exported(self);
    if (exported > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close the pool: %zd view(s) of its objects are alive", exported);
        return NULL;
    }
    self->closed = 1;
    pool_unmap_all(self);
    pool_forget_ints(self);
    Py_RETURN_NONE;
}

static PyObject *
pool_get_closed(PoolObject *self, void *closure)
{
    return PyBool_FromLong(self->closed || !self->configured);
}

static PyObject *
pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    PoolObject *self = (PoolObject *)alloc(type, 0);

    if (self != NULL)
        self->shift = -1;
    return (PyObject *)self;
}

ONE_REF_TRAVERSE(pool, PoolObject, source)
/* Only Python references: the slabs stay until the pool is deallocated,
 * which no view can outlive (a view holds the pool). */
ONE_REF_CLEAR(pool, PoolObject, source)

static int
pool_teardown(PyObject *obj)
{
    PoolObject *self = (PoolObject *)obj;

    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs(obj);
    self->closed = 1;
    pool_unmap_all(self);
    pool_forget_ints(self);
    return pool_clear(obj);
}

KERNEL_DEALLOC(pool_dealloc, pool_teardown)

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(pool_alloc)
LOCKED_FAST(pool_alloc_zeroed)
LOCKED_O(pool_free)
LOCKED_O(pool_alloc_many)
LOCKED_O(pool_free_many)
LOCKED_O(pool_view)
LOCKED_O(pool_close)
LOCKED_FAST(pool_configure)
LOCKED_O(pool_stats)
LOCKED_O(pool_spans)

static PyMethodDef pool_methods[] = {
    METHOD_FAST("alloc", pool_alloc,
        "alloc($self, /)\n--\n\nThe address of a free object (its contents are undefined)."),
    METHOD_FAST("alloc_zeroed", pool_alloc_zeroed,
        "alloc_zeroed($self, /)\n--\n\nThe address of a free object whose bytes are zero."),
    METHOD_O("free", pool_free,
        "free($self, address, /)\n--\n\nGive an object back. ValueError (nothing changed) for an\n"
        "address that is not the start of a live object of this pool."),
    METHOD_O("alloc_many", pool_alloc_many,
        "alloc_many($self, n, /)\n--\n\nThe addresses of n free objects (all or none)."),
    METHOD_O("free_many", pool_free_many,
        "free_many($self, addresses, /)\n--\n\n"
        "Give objects back: all of them, or none and ValueError."),
    METHOD_O("view", pool_view,
        "view($self, address, /)\n--\n\n"
        "A memoryview of the live object at address (obj_size bytes);\n"
        "it keeps the object's slab mapped while it lives."),
    METHOD_NOARGS("close", pool_close,
        "close($self, /)\n--\n\nUnmap every slab; the addresses handed out become invalid.\n"
        "BufferError (nothing changed) while a view of an object lives."),
    METHOD_FAST("_configure", pool_configure,
        "_configure(obj_size, stride, per_slab, keep_empty, keep_spare, populate, source)"),
    METHOD_NOARGS("_stats", pool_stats,
        "_stats() -> (live, free, slabs, spares, mapped, metadata)"),
    METHOD_NOARGS("_spans", pool_spans, "_spans() -> [(address, capacity)] of every slab"),
    {NULL, NULL, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_GET(pool_get_closed)

static PyGetSetDef pool_getset[] = {
    {"closed", (getter)LOCKED(pool_get_closed), NULL, "True once the pool is closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef pool_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(PoolObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_INQUIRY(pool_clear)
LOCKED_LEN(pool_length)
LOCKED_CONTAINS(pool_contains)

static PyType_Slot pool_slots[] = {
    {Py_tp_doc, "The slabs and free bitmaps of ObjectPool."},
    {Py_tp_new, pool_new},
    GC_SLOTS(pool),
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {Py_tp_members, pool_members},
    {Py_sq_length, LOCKED(pool_length)},
    {Py_sq_contains, LOCKED(pool_contains)},
    {0, NULL},
};

PyType_Spec pool_spec
    = KERNEL_SPEC("Pool", PoolObject, Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, pool_slots);

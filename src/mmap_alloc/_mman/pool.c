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
 * Everything runs under the GIL, which is the lock. Python code runs only
 * inside the slab source call, and the state is consistent before it (no
 * Slab pointer is kept across it). Empty slabs past keep_empty go back to
 * the kernel here: up to keep_spare stay mapped but uncommitted for reuse,
 * the rest are unmapped. A view of an object pins its slab.
 */
#include "mman.h"

typedef struct {
    char *base;            /* first object: the start of the mapping */
    Py_ssize_t capacity;   /* bytes mapped; what munmap is given */
    Py_ssize_t exports;    /* live views of its objects */
    uint32_t nfree;        /* free objects */
    uint32_t hint;         /* every bitmap word before this one is 0 (all in use) */
    uint32_t fresh;        /* objects from this index on were never handed out: zero */
    int prot;
    uint64_t bits[];       /* 1 = free; bits past the last object are 0 */
} Slab;

typedef struct {
    PyObject_HEAD
    Slab **slabs;          /* in use, sorted by base */
    Py_ssize_t nslabs, cap;
    Slab **spares;         /* empty, uncommitted, kept for reuse */
    Py_ssize_t nspares, cap_spares;
    Slab *cur;             /* the slab alloc() takes from, or NULL */
    Slab *last;            /* the slab the last address was found in, or NULL */
    Py_ssize_t obj_size, stride;
    Py_ssize_t span;       /* per_slab * stride: the bytes of a slab that hold objects */
    int shift;             /* log2(stride) when stride is a power of two, else -1 */
    int configured, closed, populate;
    uint32_t per_slab, nwords;
    Py_ssize_t live;       /* objects handed out */
    Py_ssize_t nempty;     /* slabs in use with no live object */
    Py_ssize_t keep_empty, keep_spare;
    PyObject *source;      /* source() -> a fresh Region of at least span bytes */
    PyObject *weakreflist;
} PoolObject;

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

    if (PyLong_Check(o))
        v = PyLong_AsUnsignedLong(o);
    else {
        PyObject *i = PyNumber_Index(o);
        if (i == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyObject *name = PyType_GetName(Py_TYPE(o));
                PyErr_Clear();
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

/* The ValueError for a bad address (code from pool_locate, or -1 for an
 * object that is not allocated). */
static void
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
static uint32_t
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

/* Give object i of slab s back (it is allocated). 1 when the slab became empty. */
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

static void
slab_unmap(Slab *s)
{
    unmap_or_bury(s->base, s->capacity);
    PyMem_Free(s);
}

/* Insert an empty slab into the sorted table (room reserved by the caller). */
static void
pool_insert(PoolObject *self, Slab *s)
{
    Py_ssize_t pos;

    for (pos = self->nslabs; pos > 0 && self->slabs[pos - 1]->base > s->base; pos--)
        self->slabs[pos] = self->slabs[pos - 1];
    self->slabs[pos] = s;
    self->nslabs++;
    self->nempty++;
}

static int
pool_reserve_table(PoolObject *self)
{
    if (self->nslabs == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 8;
        Slab **slabs = PyMem_Realloc(self->slabs, (size_t)cap * sizeof(Slab *));
        if (slabs == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->slabs = slabs;
        self->cap = cap;
    }
    return 0;
}

/* Give empty slabs past keep_empty back: the first keep_spare of them stay
 * mapped but uncommitted (spares), the rest are unmapped. Never fails. */
static void
pool_release(PoolObject *self)
{
    while (self->nempty > self->keep_empty && !self->closed) {
        Slab *s = NULL;
        Py_ssize_t k;
        for (k = self->nslabs - 1; k >= 0; k--) {
            Slab *c = self->slabs[k];
            if (c->nfree == self->per_slab && c->exports == 0 && c != self->cur) {
                s = c;
                break;
            }
        }
        if (s == NULL)
            return;
        memmove(&self->slabs[k], &self->slabs[k + 1],
                (size_t)(self->nslabs - k - 1) * sizeof(Slab *));
        self->nslabs--;
        self->nempty--;
        if (self->last == s)
            self->last = NULL;
        if (self->nspares < self->keep_spare && self->nspares < self->cap_spares) {
            madvise(s->base, (size_t)s->capacity, MADV_DONTNEED);
            self->spares[self->nspares++] = s;
        }
        else
            slab_unmap(s);   /* releases the GIL for large slabs: state is consistent */
    }
}

/* Take the pages of a fresh Region as a new empty slab, in one step. */
static int
pool_adopt(PoolObject *self, PyObject *obj)
{
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
    if (region_check_open(region) < 0 || region_check_idle(region, "use it as a slab") < 0
        || region->capacity < self->span || region->rec.n != 1
        || (region->rec.runs[0].flags & (RUN_GUARD | RUN_DONTFORK))
        || (region->flags & (REGION_SHARED | REGION_PRIVATE))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "the slab source returned an unusable region");
        PyMem_Free(s);
        return -1;
    }
    s->base = region->data;
    s->capacity = region->capacity;
    s->prot = region->rec.runs[0].prot;
    slab_reset(self, s, 1);
    region->data = NULL;   /* the pages are the pool's now: the region is closed */
    pool_insert(self, s);
    return 0;
}

/* Add one empty slab: a spare, or the pages of a new region from the slab
 * source (Python code runs there: no Slab pointer is kept across it). */
static int
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
            madvise(s->base, (size_t)s->capacity,
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

/* A slab with a free object: the current one, else the first partly used
 * one by address, else an empty one, else a new one. */
static Slab *
pool_refill(PoolObject *self)
{
    for (;;) {
        Slab *empty = NULL;

        if (pool_check_open(self) < 0)
            return NULL;
        if (self->cur != NULL && self->cur->nfree > 0)
            return self->cur;
        for (Py_ssize_t k = 0; k < self->nslabs; k++) {
            Slab *s = self->slabs[k];
            if (s->nfree == 0)
                continue;
            if (s->nfree < self->per_slab)
                return self->cur = s;
            if (empty == NULL)
                empty = s;
        }
        if (empty != NULL)
            return self->cur = empty;
        if (pool_add_slab(self) < 0)
            return NULL;
    }
}

static PyObject *
address_object(uintptr_t a)
{
    return PyLong_FromUnsignedLong((unsigned long)a);
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
    r = address_object(a);   /* an int: not GC-tracked, no collection can start */
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

static PyObject *
pool_free(PoolObject *self, PyObject *arg)
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
    if (slab_give(self, s, i) && self->nempty > self->keep_empty)
        pool_release(self);
    Py_RETURN_NONE;
}

/* Take up to n free objects of slab s, lowest first, into out; how many. */
static Py_ssize_t
slab_take_many(PoolObject *self, Slab *s, uintptr_t *out, Py_ssize_t n)
{
    uint32_t want = (Py_ssize_t)s->nfree < n ? s->nfree : (uint32_t)n;
    uint32_t w = s->hint, got = 0, top = 0;
    uintptr_t base = (uintptr_t)s->base, stride = (uintptr_t)self->stride;

    if (want == 0)
        return 0;
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

static Py_ssize_t
pool_free_count(PoolObject *self)
{
    Py_ssize_t n = 0;

    for (Py_ssize_t k = 0; k < self->nslabs; k++)
        n += self->slabs[k]->nfree;
    return n;
}

/* alloc_many(n): n addresses, all or none. Slabs are added first (the slab
 * source may run Python code), then every object is taken in one pass that
 * runs none. */
static PyObject *
pool_alloc_many(PoolObject *self, PyObject *arg)
{
    Py_ssize_t n, k = 0;
    PyObject *list;

    if (arg_ssize(arg, "n", &n) < 0)
        return NULL;
    for (;;) {
        while (pool_check_open(self) == 0 && pool_free_count(self) < n)
            if (pool_add_slab(self) < 0)
                return NULL;
        if (PyErr_Occurred())
            return NULL;
        list = PyList_New(n);   /* may start a collection, whose finalizers may take objects */
        if (list == NULL)
            return NULL;
        if (pool_check_open(self) < 0) {
            Py_DECREF(list);
            return NULL;
        }
        if (pool_free_count(self) >= n)
            break;
        Py_DECREF(list);
    }
    /* from here no Python code runs: take n objects and fill the list */
    for (Py_ssize_t j = 0; j < self->nslabs && k < n; j++) {
        Slab *s = self->slabs[j];
        uintptr_t chunk[64];
        while (s->nfree > 0 && k < n) {
            Py_ssize_t got = slab_take_many(self, s, chunk, n - k < 64 ? n - k : 64);
            for (Py_ssize_t m = 0; m < got; m++) {
                PyObject *item = address_object(chunk[m]);
                if (item == NULL) {
                    /* out of memory: give back everything this call took */
                    for (Py_ssize_t q = m; q < got; q++) {
                        Slab *t;
                        uint32_t idx;
                        if (pool_locate(self, chunk[q], &t, &idx) == LOC_OK)
                            slab_give(self, t, idx);
                    }
                    for (Py_ssize_t q = 0; q < k; q++) {
                        Slab *t;
                        uint32_t idx;
                        uintptr_t a = (uintptr_t)PyLong_AsUnsignedLong(PyList_GetItem(list, q));
                        if (pool_locate(self, a, &t, &idx) == LOC_OK)
                            slab_give(self, t, idx);
                    }
                    Py_DECREF(list);
                    return NULL;
                }
                PyList_SetItem(list, k++, item);
            }
        }
    }
    return list;
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

/* free_many of a list of exact ints in one pass that runs no Python code.
 * 1: done; 0: an item is not an exact int (nothing changed); -1: ValueError,
 * nothing changed. */
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
    *released = 0;
    return result;
}

static PyObject *
pool_free_many(PoolObject *self, PyObject *arg)
{
    PyObject *list;
    Py_ssize_t n;
    uintptr_t *addrs = NULL;
    int released = 0;

    if (pool_check_open(self) < 0)
        return NULL;
    /* a list is read in place, with bounds checks: an __index__ that changes
     * the list cannot make this read freed memory */
    list = PyList_CheckExact(arg) ? Py_NewRef(arg) : PySequence_List(arg);
    if (list == NULL)
        return NULL;
    n = PyList_Size(list);
    switch (pool_free_exact_ints(self, list, n, &released)) {
    case 1:
        Py_DECREF(list);
        if (released && self->nempty > self->keep_empty)
            pool_release(self);
        Py_RETURN_NONE;
    case -1:
        Py_DECREF(list);
        return NULL;
    }
    /* the general path: convert every address first (__index__ may run
     * Python code, which may even close the pool), then free all or none */
    addrs = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(uintptr_t));
    if (addrs == NULL) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = k < PyList_Size(list) ? PyList_GetItem(list, k) : NULL;
        int code;
        if (item == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "the list changed size during free_many()");
            goto fail;
        }
        Py_INCREF(item);
        code = pool_address_arg(item, &addrs[k]);
        if (code > 0)
            pool_bad_address(self, item, 0, LOC_FOREIGN, NULL, 0);
        Py_DECREF(item);
        if (code != 0)
            goto fail;
    }
    if (pool_check_open(self) < 0)
        goto fail;
    for (Py_ssize_t k = 0; k < n; k++) {   /* no Python code runs in this loop */
        Slab *s = NULL;
        uint32_t i = 0;
        int code = pool_locate(self, addrs[k], &s, &i);
        if (code == LOC_OK && slab_is_free(s, i))
            code = -1;
        if (code != LOC_OK) {
            pool_bad_address(self, NULL, addrs[k], code, s, i);
            for (Py_ssize_t j = 0; j < k; j++) {   /* undo */
                pool_locate(self, addrs[j], &s, &i);
                slab_undo_give(self, s, i);
            }
            goto fail;
        }
        released |= slab_give(self, s, i);
    }
    PyMem_Free(addrs);
    Py_DECREF(list);
    if (released && self->nempty > self->keep_empty)
        pool_release(self);
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
    if (self->closed)
        return 0;
    return code == 0 && pool_locate(self, a, &s, &i) == LOC_OK && !slab_is_free(s, i);
}

static Py_ssize_t
pool_length(PoolObject *self)
{
    return self->live;
}

/* view(address) -> memoryview of the live object at address; pins its slab */
static PyObject *
pool_view(PoolObject *self, PyObject *arg)
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
    if (!(s->prot & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError, "the pool's memory is not readable");
        return NULL;
    }
    return view_new((PyObject *)self, NULL, (char *)a, 0, self->obj_size,
                    (s->prot & PROT_WRITE) != 0, &s->exports);
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
        || arg_ssize(args[4], "keep_spare", &keep_spare) < 0 || arg_int(args[5], &populate) < 0)
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
    Py_ssize_t n = self->nslabs, m = self->nspares;

    self->slabs = NULL;
    self->spares = NULL;
    self->nslabs = self->cap = self->nspares = self->cap_spares = 0;
    self->cur = self->last = NULL;
    self->live = self->nempty = 0;
    for (Py_ssize_t k = 0; k < n; k++)
        slab_unmap(slabs[k]);
    for (Py_ssize_t k = 0; k < m; k++)
        slab_unmap(spares[k]);
    PyMem_Free(slabs);
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
    Py_RETURN_NONE;
}

/* _stats() -> (live, free, slabs, spares, mapped, metadata) */
static PyObject *
pool_stats(PoolObject *self, PyObject *unused)
{
    Py_ssize_t mapped = 0, metadata;

    for (Py_ssize_t k = 0; k < self->nslabs; k++)
        mapped += self->slabs[k]->capacity;
    for (Py_ssize_t k = 0; k < self->nspares; k++)
        mapped += self->spares[k]->capacity;
    metadata = (Py_ssize_t)((size_t)(self->cap + self->cap_spares) * sizeof(Slab *)
                            + (size_t)(self->nslabs + self->nspares)
                                  * (sizeof(Slab) + self->nwords * sizeof(uint64_t)));
    return Py_BuildValue("(nnnnnn)", self->live, pool_free_count(self), self->nslabs,
                         self->nspares, mapped, metadata);
}

/* _spans() -> [(address, capacity)] of every slab, spares included */
static PyObject *
pool_spans(PoolObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(0);

    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < self->nslabs + self->nspares; k++) {
        Slab *s = k < self->nslabs ? self->slabs[k] : self->spares[k - self->nslabs];
        PyObject *item = Py_BuildValue("(Nn)", PyLong_FromVoidPtr(s->base), s->capacity);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
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

static int
pool_traverse(PoolObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->source);
    Py_VISIT(Py_TYPE((PyObject *)self));
    return 0;
}

/* Only Python references: the slabs stay until the pool is deallocated,
 * which no view can outlive (a view holds the pool). */
static int
pool_clear(PoolObject *self)
{
    Py_CLEAR(self->source);
    return 0;
}

static void
pool_dealloc(PoolObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    self->closed = 1;
    pool_unmap_all(self);
    pool_clear(self);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef pool_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))pool_alloc, METH_FASTCALL,
     "alloc($self, /)\n--\n\nThe address of a free object (its contents are undefined)."},
    {"alloc_zeroed", (PyCFunction)(void (*)(void))pool_alloc_zeroed, METH_FASTCALL,
     "alloc_zeroed($self, /)\n--\n\nThe address of a free object whose bytes are zero."},
    {"free", (PyCFunction)pool_free, METH_O,
     "free($self, address, /)\n--\n\nGive an object back. ValueError (nothing changed) for an\n"
     "address that is not the start of a live object of this pool."},
    {"alloc_many", (PyCFunction)pool_alloc_many, METH_O,
     "alloc_many($self, n, /)\n--\n\nThe addresses of n free objects (all or none)."},
    {"free_many", (PyCFunction)pool_free_many, METH_O,
     "free_many($self, addresses, /)\n--\n\nGive objects back: all of them, or none and ValueError."},
    {"view", (PyCFunction)pool_view, METH_O,
     "view($self, address, /)\n--\n\nA memoryview of the live object at address (obj_size bytes);\n"
     "it keeps the object's slab mapped while it lives."},
    {"close", (PyCFunction)pool_close, METH_NOARGS,
     "close($self, /)\n--\n\nUnmap every slab; the addresses handed out become invalid.\n"
     "BufferError (nothing changed) while a view of an object lives."},
    {"_configure", (PyCFunction)(void (*)(void))pool_configure, METH_FASTCALL,
     "_configure(obj_size, stride, per_slab, keep_empty, keep_spare, populate, source)"},
    {"_stats", (PyCFunction)pool_stats, METH_NOARGS,
     "_stats() -> (live, free, slabs, spares, mapped, metadata)"},
    {"_spans", (PyCFunction)pool_spans, METH_NOARGS,
     "_spans() -> [(address, capacity)] of every slab"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"closed", (getter)pool_get_closed, NULL, "True once the pool is closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef pool_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(PoolObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot pool_slots[] = {
    {Py_tp_doc, "The slabs and free bitmaps of ObjectPool."},
    {Py_tp_new, pool_new},
    {Py_tp_dealloc, pool_dealloc},
    {Py_tp_traverse, pool_traverse},
    {Py_tp_clear, pool_clear},
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {Py_tp_members, pool_members},
    {Py_sq_length, pool_length},
    {Py_sq_contains, pool_contains},
    {0, NULL},
};

PyType_Spec pool_spec = {
    .name = "mmap_alloc._mman.Pool",
    .basicsize = sizeof(PoolObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = pool_slots,
};

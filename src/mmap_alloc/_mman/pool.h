/*
 * The ObjectPool's C state, shared by pool.c (the type, slabs, single
 * objects, views) and pool_batch.c (alloc_many and free_many).
 */
#ifndef MMAP_ALLOC_POOL_H
#define MMAP_ALLOC_POOL_H

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

/* The int objects of addresses handed out lately, by object index: alloc()
 * of an address whose int is here returns that int again rather than make
 * one (a pool that frees and allocates in turn makes no int at all). The
 * ints are exact and immutable: sharing one is invisible to users. */
#define POOL_INTS 64

typedef struct {
    uintptr_t address;
    PyObject *value;       /* an exact int of address, or NULL */
} PoolInt;

typedef struct {
    PyObject_HEAD
    Slab **slabs;          /* in use, sorted by base: slots head.. of a table of cap */
    Py_ssize_t nslabs, cap, head;
    Slab **spares;         /* empty, uncommitted, kept for reuse */
    Py_ssize_t nspares, cap_spares;
    Slab *cur;             /* the slab alloc() takes from, or NULL */
    /* Every slab below index scan_from but cur was full when the free
     * objects outside cur were scan_mark (pool_refill): if they still are,
     * only allocations from cur came since, and the search for a slab with
     * room starts there. Inserts keep both; other changes reset scan_from. */
    Py_ssize_t scan_from, scan_mark;
    Slab *last;            /* the slab the last address was found in, or NULL */
    Slab *emptied;         /* the slab that last became empty, or NULL: released first */
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
    PoolInt ints[POOL_INTS];
} PoolObject;

_Static_assert(sizeof(unsigned long) >= sizeof(uintptr_t), "unsigned long holds an address");

enum { LOC_OK = 0, LOC_FOREIGN, LOC_INSIDE };

/* An address argument as an integer. 0 on success, 1 for an integer that is
 * no address (negative, too large), -1 with an exception set. */
static inline int
pool_address_arg(PyObject *o, uintptr_t *out)
{
    unsigned long v;

    if (PyLong_CheckExact(o) || PyLong_Check(o))
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

static inline int
slab_is_free(Slab *s, uint32_t i)
{
    return (s->bits[i >> 6] >> (i & 63)) & 1;
}

static inline int
pool_check_open(PoolObject *self)
{
    if (self->closed || !self->configured) {
        PyErr_SetString(PyExc_ValueError, "pool is closed");
        return -1;
    }
    return 0;
}

/* Give object i of slab s back (it is allocated). 1 when the slab became empty. */
static inline int
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
        self->emptied = s;
        return 1;
    }
    return 0;
}

void pool_bad_address(PoolObject *self, PyObject *arg, uintptr_t a, int code, Slab *s, uint32_t i);
void pool_release(PoolObject *self);
/* pool_table.c: the sorted table of slabs */
int pool_reserve_table(PoolObject *self);
void pool_insert(PoolObject *self, Slab *s);
void slab_unmap(Slab *s);
int pool_add_slab(PoolObject *self);
PyObject *address_object(uintptr_t a);
PyObject *pool_alloc_many(PoolObject *self, PyObject *arg);
PyObject *pool_free_many(PoolObject *self, PyObject *arg);
PyObject *pool_stats(PoolObject *self, PyObject *unused);
PyObject *pool_spans(PoolObject *self, PyObject *unused);

#endif

/*
 * The batch calls of ObjectPool: alloc_many (all or none, even when the slab
 * source runs Python code or a finalizer takes objects meanwhile) and
 * free_many (all or none: every address is converted and checked before any
 * is given back).
 */
#include "pool.h"

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

/* alloc_many(n): n addresses, all or none. Slabs are added first (the slab
 * source may run Python code), then every object is taken in one pass that
 * runs none. */
PyObject *
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

PyObject *
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


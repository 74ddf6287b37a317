/*
 * The batch calls of ObjectPool: alloc_many (all or none, even when the slab
 * source runs Python code or a finalizer takes objects meanwhile) and
 * free_many (all or none: every address is converted and checked before any
 * is given back); and what _stats() and _spans() report of the slabs.
 */
#include "pool.h"

#include <sys/resource.h>
#include <sys/sysinfo.h>

/* Take up to n free objects of slab s, lowest first, into out; how many. */
static Py_ssize_t
slab_take_many(PoolObject *self, Slab *s, uintptr_t *out, Py_ssize_t n)
{
    uint32_t want = (Py_ssize_t)s->nfree < n ? s->nfree : (uint32_t)n;
    uint32_t w = s->hint, got = 0, top = 0;
    uintptr_t base = (uintptr_t)s->base, stride = (uintptr_t)self->stride;

    if (want == 0)
        return 0;
    self->scan_from = 0;   /* the free objects outside cur change: pool_refill's hint goes */
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

/* ------------------------------------------------------------------ */
/* alloc_many: bounded up front, interruptible, and fair to other threads */

#define ALLOC_MANY_CHUNK (1 << 12)   /* objects taken between two pauses */

/* Bytes of memory each address of the result needs at least: its slot in the
 * list and the int object (an address above 2**30 takes two 30-bit digits). */
#define ADDRESS_BYTES (sizeof(PyObject *) + 32)

/* Free objects in the slabs in use: every slab holds per_slab objects. O(1),
 * so that a call adding a million slabs stays linear. */
static inline Py_ssize_t
pool_free_now(PoolObject *self)
{
    return self->nslabs * (Py_ssize_t)self->per_slab - self->live;
}

/* Refuse, before any work, an n that cannot succeed on this machine: the
 * slabs it needs beyond the free objects must fit in the address space
 * (RLIMIT_AS when set), and the addresses (with the slabs, for a pool whose
 * memory is committed) in memory and swap. 0, or -1 with AllocError. */
static int
alloc_many_bound(PoolObject *self, Py_ssize_t n)
{
    unsigned long long want = (unsigned long long)(n - pool_free_now(self));
    unsigned long long page = (unsigned long long)sysconf(_SC_PAGESIZE);
    unsigned long long slab = ((unsigned long long)self->span + page - 1) / page * page;
    unsigned long long slabs, space, used, bytes = 0, memory, mem_unit;
    struct rlimit limit;
    struct sysinfo info;
    const char *bound = "the address space";

    if (n <= pool_free_now(self) && (unsigned long long)n * ADDRESS_BYTES < (1ULL << 24))
        return 0;   /* the common case: no system call */
    slabs = n > pool_free_now(self) ? (want + self->per_slab - 1) / self->per_slab : 0;
    os_address_space(&space, &used);
    if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
        && limit.rlim_cur < space) {
        space = limit.rlim_cur;
        bound = "RLIMIT_AS, the address-space limit,";
    }
    space = space > used ? space - used : 0;   /* what the process maps takes part of it */
    if (__builtin_mul_overflow(slabs, slab, &bytes) || bytes > space) {
        raise_alloc_error(ENOMEM, n,
                          "alloc_many(%zd) cannot succeed: it needs %llu more slabs of %llu "
                          "bytes (%llu MiB) and %s has %llu MiB left; ask for fewer objects",
                          n, slabs, slab, slabs * (slab >> 10) >> 10, bound, space >> 20);
        return -1;
    }
    if (sysinfo(&info) < 0)
        return 0;   /* no figure to bound by: the kernel refuses later */
    mem_unit = info.mem_unit ? info.mem_unit : 1;
    memory = ((unsigned long long)info.totalram + info.totalswap) * mem_unit;
    want = (unsigned long long)n * ADDRESS_BYTES + (self->populate ? bytes : 0);
    if (want > memory) {
        raise_alloc_error(ENOMEM, n,
                          "alloc_many(%zd) cannot succeed: %s needs %llu MiB, more than this "
                          "machine's memory and swap (%llu MiB); ask for fewer objects",
                          n, self->populate ? "its list of addresses with the committed slabs"
                                            : "its list of addresses alone",
                          want >> 20, memory >> 20);
        return -1;
    }
    return 0;
}

/* Between two steps of a long alloc_many: let other threads run, then run
 * the signal handlers (Ctrl-C). The pool is consistent here: the objects
 * taken so far are live and only this call knows them.
 *
 * Releasing the GIL hands it over only when a waiting thread has asked for
 * it, and a waiter asks only after a whole switch interval in which the GIL
 * did not change hands; each release wakes it and starts that interval
 * again. Releases closer together than the switch interval would starve it
 * (measured: one wait of 0.43 s within a 0.59 s call that released every
 * 4.8 ms), so they are two switch intervals apart. */
typedef struct {
    long long period;   /* ns between two releases; 0 until the first pause */
    long long due;      /* the next release, in CLOCK_MONOTONIC ns */
} Pacer;

/* Twice sys.getswitchinterval(), read without running Python code, or twice
 * CPython's default of 5 ms where the function was replaced or fails. A
 * free-threaded build has no GIL to hand over and takes the default: there
 * the pauses let a collection stop the world, and another thread may replace
 * sys.getswitchinterval while this one holds a borrowed reference to it. */
static long long
release_period(void)
{
    double seconds = -1.0;
#ifndef Py_GIL_DISABLED
    PyObject *get = PySys_GetObject("getswitchinterval");   /* borrowed: the GIL keeps it */
    PyObject *value = get != NULL && PyCFunction_Check(get) ? PyObject_CallNoArgs(get) : NULL;

    seconds = value != NULL ? PyFloat_AsDouble(value) : -1.0;
    Py_XDECREF(value);
#endif
    if (!(seconds > 0.0 && seconds < 60.0)) {
        PyErr_Clear();
        seconds = 0.005;
    }
    return (long long)(2e9 * seconds);
}

static int
alloc_many_pause(Pacer *pacer)
{
    if (pacer->period == 0) {
        pacer->period = release_period();
        pacer->due = os_monotonic_ns() + pacer->period;
    } else if (os_monotonic_ns() >= pacer->due) {
        Py_BEGIN_ALLOW_THREADS
        Py_END_ALLOW_THREADS
        pacer->due = os_monotonic_ns() + pacer->period;
    }
    return PyErr_CheckSignals();
}

/* Take objects into list[*k..stop), lowest slab first, advancing *k; 0, or
 * -1 with MemoryError (the objects of the failing step are given back, those
 * before it are in list[0..*k)). No Python code runs here (ints are not
 * GC-tracked). */
static int
alloc_many_take(PoolObject *self, PyObject *list, Py_ssize_t *k, Py_ssize_t stop)
{
    for (Py_ssize_t j = 0; j < self->nslabs && *k < stop; j++) {
        Slab *s = self->slabs[j];
        uintptr_t chunk[64];
        while (s->nfree > 0 && *k < stop) {
            Py_ssize_t got = slab_take_many(self, s, chunk, stop - *k < 64 ? stop - *k : 64);
            for (Py_ssize_t m = 0; m < got; m++) {
                PyObject *item = address_object(chunk[m]);
                if (item == NULL) {
                    for (Py_ssize_t q = m; q < got; q++) {
                        Slab *t;
                        uint32_t idx;
                        if (pool_locate(self, chunk[q], &t, &idx) == LOC_OK)
                            slab_give(self, t, idx);
                    }
                    return -1;
                }
                PyList_SetItem(list, (*k)++, item);
            }
        }
    }
    return 0;
}

/* Give back the objects list[0..k) that are still live (the pool may have
 * closed meanwhile, or a caller freed one by a guessed address), then the
 * empty slabs the call added. */
static void
alloc_many_undo(PoolObject *self, PyObject *list, Py_ssize_t k)
{
    if (self->closed)
        return;
    self->scan_from = 0;   /* a slab below pool_refill's hint may have room now */
    for (Py_ssize_t q = 0; q < k; q++) {
        Slab *s;
        uint32_t i;
        uintptr_t a = (uintptr_t)PyLong_AsUnsignedLong(PyList_GetItem(list, q));
        if (pool_locate(self, a, &s, &i) == LOC_OK && !slab_is_free(s, i))
            slab_give(self, s, i);
    }
    if (self->nempty > self->keep_empty)
        pool_release(self);
}

/* alloc_many(n): n addresses, all or none. n is bounded first against what
 * the machine holds. Then, in rounds until the list is full: slabs are added
 * until enough objects are free (the slab source may run Python code), and
 * up to ALLOC_MANY_CHUNK objects are taken in a step that runs none. Between
 * two slabs and two chunks signals are checked and, now and then, other
 * threads run (alloc_many_pause), so a long call can be interrupted:
 * everything it took is given back, and the empty slabs it added are
 * released. The list is untracked by the collector while it has empty
 * slots, so no Python code can reach it before it is full. */
PyObject *
pool_alloc_many(PoolObject *self, PyObject *arg)
{
    Py_ssize_t n, k = 0;
    int added = 0;
    Pacer pacer = {0, 0};
    PyObject *list;

    if (arg_ssize(arg, "n", &n) < 0)
        return NULL;
    if (pool_check_open(self) < 0 || alloc_many_bound(self, n) < 0)
        return NULL;
    list = PyList_New(n);   /* may start a collection, whose finalizers may use the pool */
    if (list == NULL)
        return NULL;
    PyObject_GC_UnTrack(list);
    while (k < n) {
        if (pool_check_open(self) < 0)
            goto fail;
        if (pool_free_now(self) < n - k) {
            if ((added++ > 0 && alloc_many_pause(&pacer) < 0) || pool_add_slab(self) < 0)
                goto fail;
            continue;   /* Python code may have run: look again */
        }
        if (alloc_many_take(self, list, &k, n - k > ALLOC_MANY_CHUNK ? k + ALLOC_MANY_CHUNK : n)
            < 0)
            goto fail;
        if (k < n && alloc_many_pause(&pacer) < 0)
            goto fail;
    }
    PyObject_GC_Track(list);
    return list;
fail:
    alloc_many_undo(self, list, k);
    Py_DECREF(list);
    return NULL;
}

/* Give back the objects of word w of slab s whose bits are set in bits. */
static void
slab_give_word(PoolObject *self, Slab *s, uint32_t w, uint64_t bits, int *released)
{
    uint32_t c = (uint32_t)__builtin_popcountll(bits);

    self->scan_from = 0;   /* a slab below pool_refill's hint may have room now */
    s->bits[w] |= bits;
    if (w < s->hint)
        s->hint = w;
    s->nfree += c;
    self->live -= c;
    if (s->nfree == self->per_slab) {
        self->nempty++;
        self->emptied = s;
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
 * nothing changed. The error is raised after the undo: building it may
 * start a collection, whose finalizers may use the pool. */
static int
pool_free_exact_ints(PoolObject *self, PyObject *list, Py_ssize_t n, int *released)
{
    Slab *cs = NULL;          /* bits of word cw of slab cs wait in pending */
    uint32_t cw = 0;
    uint64_t pending = 0;
    Py_ssize_t k, j;
    PyObject *item = NULL;
    uintptr_t a = 0;
    Slab *s = NULL;
    uint32_t i = 0;
    int code = LOC_OK, result = 1;

    for (k = 0; k < n; k++) {
        long long v;
        int overflow;
        uint32_t w;
        uint64_t bit;

        item = PyList_GetItem(list, k);
        if (!PyLong_CheckExact(item)) {
            result = 0;
            break;
        }
        v = PyLong_AsLongLongAndOverflow(item, &overflow);   /* raises nothing for an int */
        a = overflow || v < 0 ? 0 : (uintptr_t)v;
        code = overflow || v < 0 ? LOC_FOREIGN : pool_locate(self, a, &s, &i);
        if (code != LOC_OK) {
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
            code = -1;
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
        Slab *t = NULL;
        uint32_t idx = 0;
        pool_locate(self, PyLong_AsUnsignedLong(PyList_GetItem(list, j)), &t, &idx);
        slab_undo_give(self, t, idx);
    }
    *released = 0;
    if (result < 0)
        pool_bad_address(self, item, a, code, s, i);
    return result;
}

PyObject *
pool_free_many(PoolObject *self, PyObject *arg)
{
    PyObject *list;
    Py_ssize_t n;
    uintptr_t *addrs = NULL;
    int released = 0;

    /* With the GIL a list is read in place, with bounds checks: an __index__
     * that changes it cannot make this read freed memory. Without a GIL any
     * other thread may change it meanwhile, so the kernel reads a copy. */
#ifdef Py_GIL_DISABLED
    list = PySequence_List(arg);
#else
    list = PyList_CheckExact(arg) ? Py_NewRef(arg) : PySequence_List(arg);
#endif
    if (list == NULL)
        return NULL;
    /* checked after the copy, which may run Python code (an iterator) */
    if (pool_check_open(self) < 0) {
        Py_DECREF(list);
        return NULL;
    }
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
    self->scan_from = 0;   /* a slab below pool_refill's hint may have room now */
    for (Py_ssize_t k = 0; k < n; k++) {   /* no Python code runs in this loop */
        Slab *s = NULL;
        uint32_t i = 0;
        int code = pool_locate(self, addrs[k], &s, &i);
        if (code == LOC_OK && slab_is_free(s, i))
            code = -1;
        if (code != LOC_OK) {
            for (Py_ssize_t j = 0; j < k; j++) {   /* undo, before the error is built */
                Slab *t = NULL;
                uint32_t idx = 0;
                pool_locate(self, addrs[j], &t, &idx);
                slab_undo_give(self, t, idx);
            }
            pool_bad_address(self, NULL, addrs[k], code, s, i);
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

/* ------------------------------------------------------------------ */
/* introspection                                                       */

/* _stats() -> (live, free, slabs, spares, mapped, metadata) */
PyObject *
pool_stats(PoolObject *self, PyObject *unused)
{
    Py_ssize_t mapped = 0, nfree = 0, metadata;

    for (Py_ssize_t k = 0; k < self->nslabs; k++) {
        mapped += self->slabs[k]->capacity;
        nfree += self->slabs[k]->nfree;
    }
    for (Py_ssize_t k = 0; k < self->nspares; k++)
        mapped += self->spares[k]->capacity;
    metadata = (Py_ssize_t)((size_t)(self->cap + self->cap_spares) * sizeof(Slab *)
                            + (size_t)(self->nslabs + self->nspares)
                                  * (sizeof(Slab) + self->nwords * sizeof(uint64_t)));
    return Py_BuildValue("(nnnnnn)", self->live, nfree, self->nslabs,
                         self->nspares, mapped, metadata);
}

/* _spans() -> [(address, capacity)] of every slab, spares included */
PyObject *
pool_spans(PoolObject *self, PyObject *unused)
{
    /* copied first: a collection the list starts may use the pool */
    typedef struct { char *base; Py_ssize_t capacity; } SlabSpan;
    Py_ssize_t n = self->nslabs + self->nspares;
    SlabSpan *spans = PyMem_Malloc((size_t)(n + 1) * sizeof(SlabSpan));
    PyObject *list;

    if (spans == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < n; k++) {
        Slab *s = k < self->nslabs ? self->slabs[k] : self->spares[k - self->nslabs];
        spans[k] = (SlabSpan){s->base, s->capacity};
    }
    list = PyList_New(0);
    for (Py_ssize_t k = 0; list != NULL && k < n; k++)
        if (list_append_new(list, Py_BuildValue("(Nn)", PyLong_FromVoidPtr(spans[k].base),
                                                spans[k].capacity))
            < 0)
            Py_CLEAR(list);
    PyMem_Free(spans);
    return list;
}

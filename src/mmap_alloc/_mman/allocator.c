/*
 * Allocator: the alloc/dealloc fast path of MapAlloc (allocator.py), which
 * subclasses it. alloc(size) with an exact int and no alignment maps pages
 * as the allocator's backing says (up to three attempts, best first, given
 * once by _configure) in one call; every other case, and a refusal by the
 * kernel, goes to the slow path given once (a Python function called as
 * slow(allocator, *args, **kwargs)), which holds the argument checks, the
 * other options and the error messages. dealloc(region) is complete here.
 *
 * The mapping cache (MapAlloc(cache=N), off by default): dealloc keeps a
 * freed mapping (cache.c) instead of unmapping it when its whole state is
 * the allocator's own: private anonymous pages of one of its attempts (not
 * hugetlb: a private huge page given back does not get its reservation
 * back), no run flags in the record (guards, fork and dump advice), no
 * state the record does not know (MAPPING_ADVISED: locks, access-pattern
 * and huge-page advice), nothing holding it. Its protection is set back to
 * the allocator's and its pages are given back (MADV_DONTNEED: private
 * anonymous pages read as zero again), so that alloc can hand it out as it
 * would a fresh mapping; a committing allocator faults it in again.
 */
#include "mman.h"

#define MAX_ATTEMPTS 3
#define MAX_CACHE (1 << 20)

typedef struct {
    PyObject_HEAD
    Py_ssize_t page;
    Py_ssize_t mask;
    Py_ssize_t max_size;
    int prot;
    int nattempts;
    MapSpec attempts[MAX_ATTEMPTS];   /* backing: strong references */
    Py_ssize_t min_size[MAX_ATTEMPTS];   /* an attempt maps capacities from this on */
    PyTypeObject *region_type;        /* NULL until configured */
    PyObject *slow;
    MappingCache cache;
} AllocatorObject;

/* ------------------------------------------------------------------ */
/* the cache's policy                                                  */

/* The attempt a fresh mapping of capacity bytes comes from first: the one
 * whose mappings the cache keeps and hands out for it. -1 when that is
 * hugetlb (never cached: a fresh one could be a hugetlb page, a cached one
 * never is). */
static int
cache_attempt(AllocatorObject *self, Py_ssize_t capacity)
{
    int k = 0;

    while (capacity < self->min_size[k])   /* the last attempt maps every size */
        k++;
    return (self->attempts[k].mflags & MAP_HUGETLB) ? -1 : k;
}

/* The attempt a region of ours was mapped by, if the cache may keep it
 * (see the head of this file: and it is what a fresh mapping of its
 * capacity would be); -1 otherwise. */
static int
cacheable_attempt(AllocatorObject *self, RegionObject *r)
{
    const Mapping *m = &r->m;
    const MapSpec *spec;
    int k;

    if (m->flags & ~MAPPING_COMMITTED || m->fd >= 0)
        return -1;
    for (Py_ssize_t i = 0; i < m->rec.n; i++)
        if (m->rec.runs[i].flags)
            return -1;
    k = cache_attempt(self, m->capacity);
    if (k < 0)
        return -1;
    spec = &self->attempts[k];
    if (spec->backing != r->backing || spec->mflags != m->mflags || spec->advice != m->advice
        || spec->page != m->page)
        return -1;
    return k;
}

/* Keep an open, idle region of ours in the cache, closing it: 1. 0 when
 * the cache does not take it (the region is as it was, its protection
 * perhaps set back to the allocator's, as recorded). Raises nothing and
 * runs no Python code, so the caller's check that the region is idle
 * still holds when it unmaps it instead. */
static int
cache_keep(AllocatorObject *self, RegionObject *r)
{
    Mapping *m = &r->m;
    Py_ssize_t capacity = m->capacity, align = mapping_align(m);
    int k = cacheable_attempt(self, r), err;
    CacheClass *cls;
    char *p;

    if (k < 0 || (cls = cache_room(&self->cache, capacity, align, k)) == NULL)
        return 0;
    if (!rec_uniform(&m->rec, 0, capacity, self->prot)) {
        if (mapping_protect(m, 0, capacity, self->prot) != 0)
            return 0;   /* the unmap that follows says what it must */
        cls = NULL;   /* the refusal of a split may have trimmed the caches */
    }
    p = m->data;
    m->data = NULL;   /* closed before its pages are given back */
    if (mapping_unmap_is_slow(m)) {
        Py_BEGIN_ALLOW_THREADS
        err = os_advise(p, (size_t)capacity, MADV_DONTNEED);
        Py_END_ALLOW_THREADS
        cls = NULL;   /* other threads used the cache meanwhile */
    }
    else
        err = os_advise(p, (size_t)capacity, MADV_DONTNEED);
    if (err) {
        m->data = p;
        return 0;
    }
    trace_unmapped(p);   /* its pages are the kernel's again */
    if (cls == NULL)
        cls = cache_room(&self->cache, capacity, align, k);
    if (cls != NULL)
        cache_push(&self->cache, cls, p);
    else   /* filled meanwhile */
        unmap_or_bury(p, capacity, 0);
    return 1;
}

/* A region over a mapping out of the cache, as fresh as a new one. */
static PyObject *
wrap_reused(AllocatorObject *self, char *p, Py_ssize_t size, Py_ssize_t capacity,
            const MapSpec *attempt, Py_ssize_t align)
{
    MapSpec spec = *attempt;   /* a collection region_alloc starts may configure self anew */
    int populate = spec.populate && (spec.prot & PROT_RW);
    PyObject *backing = Py_NewRef(spec.backing);
    RegionObject *region;

    spec.align = align;
    if (populate) {   /* best effort, as MAP_POPULATE is */
        int advice = (spec.prot & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
        if (capacity >= SLOW_CALL_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            os_advise(p, (size_t)capacity, advice);
            Py_END_ALLOW_THREADS
        }
        else
            os_advise(p, (size_t)capacity, advice);
    }
    region = region_alloc(self->region_type);
    if (region == NULL) {
        Py_DECREF(backing);
        unmap_or_bury(p, capacity, 0);
        return NULL;
    }
    mapping_init(&region->m, p, size, capacity, &spec, -1);
    region->owner = Py_NewRef((PyObject *)self);
    region->backing = backing;
    trace_mapped(p, capacity);
    if (populate)
        region->m.flags |= MAPPING_COMMITTED;
    return (PyObject *)region;
}

/* A mapping of capacity bytes from the cache, of the attempt a fresh one
 * would come from; NULL (no exception) on a miss. */
static PyObject *
cache_reuse(AllocatorObject *self, Py_ssize_t size, Py_ssize_t capacity, Py_ssize_t align)
{
    int k = cache_attempt(self, capacity);
    const MapSpec *spec;
    char *p;

    if (k < 0)
        return NULL;
    spec = &self->attempts[k];
    if (align < spec->align)
        align = spec->align;
    p = cache_take(&self->cache, capacity, align, k);
    if (p == NULL) {
        self->cache.misses++;
        return NULL;
    }
    self->cache.hits++;
    return wrap_reused(self, p, size, capacity, spec, align);
}

/* ------------------------------------------------------------------ */
/* alloc and dealloc                                                   */

/* Map capacity bytes with the first attempt the kernel accepts; NULL with
 * the last refusal's OSError set. */
static PyObject *
allocator_map(AllocatorObject *self, Py_ssize_t size, Py_ssize_t capacity, Py_ssize_t align,
              char *address)
{
    PyObject *region = NULL;
    int tried = 0;

    if (address == NULL && self->cache.max > 0) {
        region = cache_reuse(self, size, capacity, align);
        if (region != NULL || PyErr_Occurred())
            return region;
    }
    for (int k = 0; k < self->nattempts; k++) {
        /* a copy: mapping may release the GIL, and an error run Python code,
         * where self may be configured anew */
        MapSpec spec = self->attempts[k];
        if (capacity < self->min_size[k])
            continue;
        if (align > spec.align)
            spec.align = align;
        if (tried++)
            PyErr_Clear();
        Py_INCREF(spec.backing);
        region = region_map(self->region_type, size, capacity, &spec, (PyObject *)self, address);
        Py_DECREF(spec.backing);
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

/* alloc(size) in one flat step for the common case: the attempt that maps
 * this capacity is plain (no advice, no alignment past the base page, not
 * hugetlb, no prefault slow enough to release the GIL for): a mapping of
 * the cache, else one mmap; the Region object from region_alloc (most
 * often a dead one kept for reuse). NULL without an exception when the
 * case is not that one or the kernel refused: the general path then tries
 * everything and says what went wrong. */
static inline PyObject *
alloc_flat(AllocatorObject *self, Py_ssize_t size)
{
    Py_ssize_t capacity = (size + self->mask) & ~self->mask;
    MapSpec attempt;   /* a collection region_alloc starts may configure self anew */
    const MapSpec *spec = &attempt;
    PyObject *backing;
    RegionObject *region;
    int k = 0, populate, mflags;
    void *p;

    while (capacity < self->min_size[k])   /* the last attempt maps every size */
        k++;
    attempt = self->attempts[k];
    populate = spec->populate && (spec->prot & PROT_RW);
    if (spec->advice || spec->align > kernel.page || (spec->mflags & MAP_HUGETLB)
        || (populate && capacity >= SLOW_CALL_BYTES))
        return NULL;
    if (self->cache.max > 0) {
        char *kept = cache_take(&self->cache, capacity, spec->align, k);
        if (kept != NULL) {
            self->cache.hits++;
            return wrap_reused(self, kept, size, capacity, spec, spec->align);
        }
    }
    mflags = spec->mflags | (populate ? MAP_POPULATE : 0);
    if (os_map(&p, NULL, (size_t)capacity, spec->prot, mflags, -1, 0) != 0)
        return NULL;
    backing = Py_NewRef(spec->backing);
    region = region_alloc(self->region_type);
    if (region == NULL) {
        Py_DECREF(backing);
        os_unmap(p, (size_t)capacity);
        return NULL;
    }
    mapping_init(&region->m, p, size, capacity, spec, -1);
    region->owner = Py_NewRef((PyObject *)self);
    region->backing = backing;
    if (populate)
        region->m.flags |= MAPPING_COMMITTED;
    if (self->cache.max > 0)
        self->cache.misses++;
    kernel.mapped_bytes += capacity;
    trace_mapped(p, capacity);
    return (PyObject *)region;
}

static PyObject *
allocator_alloc(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    PyObject *region;
    Py_ssize_t nkw;

    if (self->region_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "the allocator is not configured");
        return NULL;
    }
    if (nargs == 1 && kwnames == NULL && PyLong_CheckExact(args[0])) {
        Py_ssize_t size = PyLong_AsSsize_t(args[0]);
        if (size > 0 && size <= self->max_size && (region = alloc_flat(self, size)) != NULL)
            return region;
        if (PyErr_Occurred())   /* too large for a Py_ssize_t, or no memory: the slow path */
            PyErr_Clear();
    }
    nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
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
allocator_dealloc_region(AllocatorObject *self, PyObject *region)
{
    RegionObject *r = (RegionObject *)region;
    Mapping *m = &r->m;

    /* the common case in one go: a region of ours, open, idle, plain */
    if (Py_TYPE(region) == self->region_type && r->owner == (PyObject *)self && m->data != NULL
        && mapping_idle(m) && (m->flags & ~MAPPING_COMMITTED) == 0) {
        char *p;
        if (self->cache.max > 0 && cache_keep(self, r))
            Py_RETURN_NONE;
        if (mapping_unmap_is_slow(m))
            goto general;
        p = m->data;
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
general:
    if (!is_region(region))
        return raise_wrong_type(region, "expected a Region");
    return region_release((RegionObject *)region, (PyObject *)self);
}

/* trim() -> int: unmap every mapping the cache holds; the bytes released */
static PyObject *
allocator_trim(AllocatorObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(cache_trim(&self->cache));
}

/* _cache_stats() -> (mappings, bytes, hits, misses) */
static PyObject *
allocator_cache_stats(AllocatorObject *self, PyObject *unused)
{
    return Py_BuildValue("(nnKK)", self->cache.mappings, self->cache.bytes, self->cache.hits,
                         self->cache.misses);
}

/* _cached() -> [(address, capacity, align, attempt)]: the mappings the cache holds */
static PyObject *
allocator_cached(AllocatorObject *self, PyObject *unused)
{
    return cache_list(&self->cache);
}

static void
clear_attempts(AllocatorObject *self)
{
    for (int k = 0; k < self->nattempts; k++)
        Py_CLEAR(self->attempts[k].backing);
    self->nattempts = 0;
}

/* _configure(page, max_size, prot, populate, attempts, region_type, slow, cache):
 * attempts is a sequence of (mflags, advice, align, backing, min_size), best
 * first (an attempt maps capacities of min_size and more; the last, all);
 * cache: mappings kept per class (0: none) */
static PyObject *
allocator_configure(AllocatorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t page, max_size, n, cache, min_size[MAX_ATTEMPTS];
    int prot, populate;
    MapSpec attempts[MAX_ATTEMPTS];
    PyObject *seq;

    if (check_nargs("_configure", nargs, 8, 8) < 0 || arg_ssize(args[0], "page", &page) < 0
        || arg_ssize(args[1], "max_size", &max_size) < 0 || arg_int(args[2], "prot", &prot) < 0
        || arg_int(args[3], "populate", &populate) < 0 || arg_ssize(args[7], "cache", &cache) < 0)
        return NULL;
    if (cache > MAX_CACHE) {
        PyErr_Format(PyExc_ValueError, "cache=%zd: at most %d mappings per class", cache,
                     MAX_CACHE);
        return NULL;
    }
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
        if (!PyTuple_Check(item) || PyTuple_Size(item) != 5
            || arg_int(PyTuple_GetItem(item, 0), "mflags", &attempts[k].mflags) < 0
            || arg_int(PyTuple_GetItem(item, 1), "advice", &attempts[k].advice) < 0
            || arg_ssize(PyTuple_GetItem(item, 2), "align", &attempts[k].align) < 0
            || arg_ssize(PyTuple_GetItem(item, 4), "min_size", &min_size[k]) < 0
            || (k == n - 1 && min_size[k] != 0)) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError,
                                "an attempt is (mflags, advice, align, backing, min_size); "
                                "the last maps every size");
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
        self->min_size[k] = min_size[k];
        Py_INCREF(self->attempts[k].backing);
    }
    cache_free(&self->cache);   /* the old classes and their mappings */
    self->cache.max = cache;
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
    return kernel_visit((PyObject *)self, self->slow, visit, arg);
}

static int
allocator_clear(PyObject *obj)
{
    AllocatorObject *self = (AllocatorObject *)obj;

    cache_free(&self->cache);   /* the allocator's end unmaps what it kept */
    clear_attempts(self);
    Py_CLEAR(self->region_type);
    Py_CLEAR(self->slow);
    return 0;
}

KERNEL_DEALLOC(allocator_dealloc, allocator_clear)

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FASTKW(allocator_alloc)
LOCKED_O(allocator_dealloc_region)
LOCKED_FAST(allocator_map_method)
LOCKED_FAST(allocator_configure)
LOCKED_O(allocator_trim)
LOCKED_O(allocator_cache_stats)
LOCKED_O(allocator_cached)

static PyMethodDef allocator_methods[] = {
    METHOD_FASTKW("alloc", allocator_alloc,
        "alloc($self, /, size, align=None, *, near=None, within=2147483648)\n--\n\n"
        "A new region of at least size bytes (whole pages), zero-filled, page-aligned\n"
        "(or aligned to align, a power of two); with near, every byte of it lies less\n"
        "than within bytes from near."),
    METHOD_O("dealloc", allocator_dealloc_region,
        "dealloc($self, region, /)\n--\n\n"
        "Unmap the region (with a cache: keep its mapping, pages given back, for the next\n"
        "alloc of its class). BufferError (nothing changed) while a buffer or function of it "
        "lives."),
    METHOD_NOARGS("trim", allocator_trim,
        "trim($self, /)\n--\n\n"
        "Unmap every mapping the cache holds; returns the bytes of address space released."),
    METHOD_NOARGS("_cache_stats", allocator_cache_stats,
        "_cache_stats() -> (mappings, bytes, hits, misses) of the mapping cache."),
    METHOD_NOARGS("_cached", allocator_cached,
        "_cached() -> [(address, capacity, align, attempt)]: the mappings the cache holds."),
    METHOD_FAST("_map", allocator_map_method,
        "_map(size, capacity, align, address=None) -> Region: map with the configured\n"
        "attempts (at address exactly, never replacing a mapping, when given)."),
    METHOD_FAST("_configure", allocator_configure,
        "_configure(page, max_size, prot, populate, attempts, region_type, slow, cache)"),
    {NULL, NULL, 0, NULL},
};

static PyMemberDef allocator_members[] = {
    {"_page", T_PYSSIZET, offsetof(AllocatorObject, page), READONLY, "The page size."},
    {"_mask", T_PYSSIZET, offsetof(AllocatorObject, mask), READONLY, "page - 1."},
    {"_max_size", T_PYSSIZET, offsetof(AllocatorObject, max_size), READONLY,
     "The largest size alloc() takes."},
    {"_prot", T_INT, offsetof(AllocatorObject, prot), READONLY, "PROT_* of new regions."},
    {"_cache", T_PYSSIZET, offsetof(AllocatorObject, cache) + offsetof(MappingCache, max),
     READONLY, "Mappings the cache keeps per class (0: no cache)."},
    {NULL, 0, 0, 0, NULL},
};

LOCKED_INQUIRY(allocator_clear)
static PyType_Slot allocator_slots[] = {
    {Py_tp_doc, "The alloc/dealloc fast path of MapAlloc."},
    {Py_tp_new, PyType_GenericNew},
    GC_SLOTS(allocator),
    {Py_tp_methods, allocator_methods},
    {Py_tp_members, allocator_members},
    {0, NULL},
};

PyType_Spec allocator_spec
    = KERNEL_SPEC("Allocator", AllocatorObject, Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, allocator_slots);

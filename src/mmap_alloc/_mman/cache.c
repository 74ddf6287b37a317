/*
 * The mapping cache of an allocator (pure data; the policy of what may go
 * in is allocator.c's): freed mappings kept, by exact class, for the next
 * allocation of that class instead of an munmap and an mmap.
 *
 *   a class      capacity, alignment and attempt (the backing; the
 *                permissions are the allocator's): mappings of one class
 *                are interchangeable;
 *   the table    open addressing over the classes seen, a power of two of
 *                slots, at most half of them used; a class is never removed
 *                (an emptied one keeps its slot and its array);
 *   a class's    up to `max` addresses, taken last in, first out (the pages
 *   stack        most recently freed are the likeliest to be in the TLB).
 *
 * Every cache that has held mappings is on a process-wide list until its
 * end, so that a refusal for lack of memory or of mappings
 * (vm.max_map_count) anywhere in the library can give them back before it
 * fails (kernel.trim_caches). Nothing here runs Python code or raises.
 */
#include "mman.h"

typedef struct CacheClass {
    Py_ssize_t capacity;    /* 0: a free slot */
    Py_ssize_t align;
    int attempt;
    int n;                  /* mappings held */
    char **maps;            /* room for `max`, made at the first put */
} CacheClass;

static size_t
class_hash(Py_ssize_t capacity, Py_ssize_t align, int attempt)
{
    size_t h = (size_t)capacity * 0x9E3779B97F4A7C15u;
    return (h ^ (h >> 29)) + (size_t)align * 31u + (size_t)attempt;
}

static CacheClass *
find_class(MappingCache *c, Py_ssize_t capacity, Py_ssize_t align, int attempt)
{
    CacheClass *cls = c->last;   /* most programs free and allocate one class in turn */
    size_t mask, i;

    if (cls != NULL && cls->capacity == capacity && cls->align == align && cls->attempt == attempt)
        return cls;
    if (c->table == NULL)
        return NULL;
    mask = (size_t)c->size - 1;
    for (i = class_hash(capacity, align, attempt) & mask;; i = (i + 1) & mask) {
        cls = &c->table[i];
        if (cls->capacity == 0)
            return NULL;
        if (cls->capacity == capacity && cls->align == align && cls->attempt == attempt)
            return c->last = cls;
    }
}

/* Room for one more class; 0, or -1 (no memory: nothing changed). */
static int
grow_table(MappingCache *c)
{
    Py_ssize_t size = c->size ? c->size * 2 : 8;
    CacheClass *table;

    if ((c->used + 1) * 2 <= c->size)
        return 0;
    table = PyMem_Calloc((size_t)size, sizeof(CacheClass));
    if (table == NULL)
        return -1;
    for (Py_ssize_t k = 0; k < c->size; k++) {
        CacheClass *old = &c->table[k];
        size_t i;
        if (old->capacity == 0)
            continue;
        i = class_hash(old->capacity, old->align, old->attempt) & (size_t)(size - 1);
        while (table[i].capacity != 0)
            i = (i + 1) & (size_t)(size - 1);
        table[i] = *old;
    }
    PyMem_Free(c->table);
    c->table = table;
    c->size = size;
    c->last = NULL;   /* it pointed into the old table */
    return 0;
}

/* kernel.trim_caches: trim every cache of the process. */
static Py_ssize_t
cache_trim_all(void)
{
    Py_ssize_t released = 0;

    if (kernel.trimming)   /* an unmap refused while trimming: the graveyard takes it */
        return 0;
    kernel.trimming = 1;
    for (MappingCache *c = kernel.caches; c != NULL; c = c->next)
        released += cache_trim(c);
    kernel.trimming = 0;
    return released;
}

static void
link_cache(MappingCache *c)
{
    if (c->linked)
        return;
    c->linked = 1;
    LIST_PUSH(kernel.caches, c);
    kernel.trim_caches = cache_trim_all;
}

static void
unlink_cache(MappingCache *c)
{
    if (!c->linked)
        return;
    LIST_UNLINK(kernel.caches, c);
    c->linked = 0;
}

char *
cache_take(MappingCache *c, Py_ssize_t capacity, Py_ssize_t align, int attempt)
{
    CacheClass *cls = find_class(c, capacity, align, attempt);
    char *p;

    if (cls == NULL || cls->n == 0)
        return NULL;
    p = cls->maps[--cls->n];
    c->mappings--;
    c->bytes -= capacity;
    return p;
}

CacheClass *
cache_room(MappingCache *c, Py_ssize_t capacity, Py_ssize_t align, int attempt)
{
    CacheClass *cls;

    if (c->max <= 0 || capacity <= 0)
        return NULL;
    cls = find_class(c, capacity, align, attempt);
    if (cls == NULL) {
        size_t i;
        if (grow_table(c) < 0)
            return NULL;
        i = class_hash(capacity, align, attempt) & (size_t)(c->size - 1);
        while (c->table[i].capacity != 0)
            i = (i + 1) & (size_t)(c->size - 1);
        cls = c->last = &c->table[i];
        cls->capacity = capacity;
        cls->align = align;
        cls->attempt = attempt;
        c->used++;
    }
    if (cls->n >= c->max)
        return NULL;
    if (cls->maps == NULL && (cls->maps = PyMem_Malloc((size_t)c->max * sizeof(char *))) == NULL)
        return NULL;
    return cls;
}

void
cache_push(MappingCache *c, CacheClass *cls, char *p)
{
    cls->maps[cls->n++] = p;
    c->mappings++;
    c->bytes += cls->capacity;
    if (!c->linked)
        link_cache(c);
}

Py_ssize_t
cache_trim(MappingCache *c)
{
    Py_ssize_t released = 0;

    for (Py_ssize_t k = 0; k < c->size; k++) {
        CacheClass *cls = &c->table[k];
        while (cls->n > 0) {
            /* out of the cache before the unmap: nothing can find it twice */
            char *p = cls->maps[--cls->n];
            c->mappings--;
            c->bytes -= cls->capacity;
            unmap_or_bury(p, cls->capacity, 0);
            released += cls->capacity;
        }
    }
    return released;
}

void
cache_free(MappingCache *c)
{
    cache_trim(c);
    unlink_cache(c);
    for (Py_ssize_t k = 0; k < c->size; k++)
        PyMem_Free(c->table[k].maps);
    PyMem_Free(c->table);
    c->table = NULL;
    c->last = NULL;
    c->size = c->used = 0;
}

PyObject *
cache_list(const MappingCache *c)
{
    /* copied first: a collection the list starts may use the cache */
    typedef struct { char *p; Py_ssize_t capacity, align; int attempt; } Kept;
    Kept *kept = PyMem_Malloc((size_t)(c->mappings + 1) * sizeof(Kept));
    Py_ssize_t n = 0;
    PyObject *list;

    if (kept == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < c->size; k++) {
        const CacheClass *cls = &c->table[k];
        for (int i = 0; i < cls->n && n < c->mappings; i++)
            kept[n++] = (Kept){cls->maps[i], cls->capacity, cls->align, cls->attempt};
    }
    list = PyList_New(0);
    for (Py_ssize_t j = 0; list != NULL && j < n; j++)
        if (list_append_new(list, Py_BuildValue("(Nnni)", PyLong_FromVoidPtr(kept[j].p),
                                                kept[j].capacity, kept[j].align,
                                                kept[j].attempt))
            < 0)
            Py_CLEAR(list);
    PyMem_Free(kept);
    return list;
}

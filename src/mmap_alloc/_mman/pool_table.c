/*
 * The pool's slab table: every slab in use, sorted by base address, in the
 * middle of an array with room at both ends, so that slabs mapped or given
 * back in rising or falling address order go in and out at O(1); and the
 * return of empty slabs to the kernel (pool.c has the rest of the pool).
 */
#include "pool.h"

void
slab_unmap(Slab *s)
{
    unmap_or_bury(s->base, s->capacity, s->capacity >= SLOW_CALL_BYTES);
    PyMem_Free(s);
}

/* The index of the first slab of the sorted table whose base is not below s's. */
static Py_ssize_t
slab_place(PoolObject *self, Slab *s)
{
    Py_ssize_t lo = 0, hi = self->nslabs;

    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (self->slabs[mid]->base < s->base)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Insert an empty slab into the sorted table (room reserved by the caller):
 * its place by binary search, then the shorter side moves one slot, so that
 * slabs mapped in rising or falling address order go in at O(1). */
void
pool_insert(PoolObject *self, Slab *s)
{
    Py_ssize_t lo = slab_place(self, s);

    if (lo < self->nslabs - lo) {
        memmove(self->slabs - 1, self->slabs, (size_t)lo * sizeof(Slab *));
        self->slabs--;
        self->head--;
    }
    else
        memmove(self->slabs + lo + 1, self->slabs + lo, (size_t)(self->nslabs - lo) * sizeof(Slab *));
    self->slabs[lo] = s;
    self->nslabs++;
    self->nempty++;
    if (lo < self->scan_from)
        self->scan_from = lo;
    self->scan_mark += s->nfree;
}

/* Room for one more slab at either end of the table: -1 with MemoryError. */
int
pool_reserve_table(PoolObject *self)
{
    Py_ssize_t n = self->nslabs, cap = self->cap > 0 ? self->cap : 8, head;
    Slab **table;

    if (self->head > 0 && self->head + n < self->cap)
        return 0;
    while (cap < 2 * (n + 2))
        cap *= 2;
    head = (cap - n) / 2;
    table = PyMem_Malloc((size_t)cap * sizeof(Slab *));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (self->slabs != NULL) {
        memcpy(table + head, self->slabs, (size_t)n * sizeof(Slab *));
        PyMem_Free(self->slabs - self->head);
    }
    self->slabs = table + head;
    self->head = head;
    self->cap = cap;
    return 0;
}

/* Give empty slabs past keep_empty back: the first keep_spare of them stay
 * mapped but uncommitted (spares), the rest are unmapped. Never fails. */
static int
slab_releasable(PoolObject *self, Slab *s)
{
    return s->nfree == self->per_slab && s->exports == 0 && s != self->cur;
}

/* The index of the slab that last became empty if it can go, else of the
 * highest that can; -1 if none. */
static Py_ssize_t
pool_releasable(PoolObject *self)
{
    Py_ssize_t k;

    if (self->emptied != NULL && slab_releasable(self, self->emptied)) {
        k = slab_place(self, self->emptied);
        if (k < self->nslabs && self->slabs[k] == self->emptied)
            return k;
    }
    for (k = self->nslabs - 1; k >= 0 && !slab_releasable(self, self->slabs[k]); k--)
        ;
    return k;
}

void
pool_release(PoolObject *self)
{
    while (self->nempty > self->keep_empty && !self->closed) {
        Py_ssize_t k = pool_releasable(self);
        Slab *s;

        if (k < 0)
            return;
        s = self->slabs[k];
        if (k < self->nslabs - k - 1) {   /* the shorter side moves, as in pool_insert */
            memmove(self->slabs + 1, self->slabs, (size_t)k * sizeof(Slab *));
            self->slabs++;
            self->head++;
        }
        else
            memmove(self->slabs + k, self->slabs + k + 1,
                    (size_t)(self->nslabs - k - 1) * sizeof(Slab *));
        self->nslabs--;
        self->scan_from = 0;
        self->nempty--;
        if (self->last == s)
            self->last = NULL;
        if (self->emptied == s)
            self->emptied = NULL;
        /* a spare is taken as zero again: only one whose pages the kernel took back */
        if (self->nspares < self->keep_spare && self->nspares < self->cap_spares
            && os_advise(s->base, (size_t)s->capacity, MADV_DONTNEED) == 0)
            self->spares[self->nspares++] = s;
        else
            slab_unmap(s);   /* releases the GIL for large slabs: state is consistent */
    }
}

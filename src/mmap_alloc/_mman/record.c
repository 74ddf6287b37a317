/*
 * The protection record of a mapping: the runs of pages that share PROT_*
 * bits and flags, in order. It is the authority for every access the library
 * makes (buffers, zeroing, copying, commit); /proc/self/maps is for tests and
 * introspection only. Pure data: nothing here calls Python or the kernel.
 */
#include "mman.h"

void
rec_free(PageRecord *rec)
{
    if (rec->runs != &rec->one && rec->runs != NULL)
        PyMem_Free(rec->runs);
    rec->runs = &rec->one;
    rec->n = 0;
    rec->cap = 1;
}

int
rec_room(PageRecord *rec, Py_ssize_t extra)
{
    Py_ssize_t need = rec->n + extra, cap;
    Run *runs;

    if (need <= rec->cap)
        return 0;
    if (need > INT_MAX / 2)
        return ENOMEM;
    cap = rec->cap < 4 ? 8 : (Py_ssize_t)rec->cap * 2;
    while (cap < need)
        cap *= 2;
    if (rec->runs == &rec->one) {
        runs = PyMem_Malloc((size_t)cap * sizeof(Run));
        if (runs != NULL)
            memcpy(runs, rec->runs, (size_t)rec->n * sizeof(Run));
    }
    else
        runs = PyMem_Realloc(rec->runs, (size_t)cap * sizeof(Run));
    if (runs == NULL)
        return ENOMEM;
    rec->runs = runs;
    rec->cap = (int)cap;
    return 0;
}

int
rec_reserve(PageRecord *rec, Py_ssize_t extra)
{
    if (rec_room(rec, extra) == 0)
        return 0;
    PyErr_NoMemory();
    return -1;
}

Py_ssize_t
rec_start(const PageRecord *rec, Py_ssize_t i)
{
    return i == 0 ? 0 : rec->runs[i - 1].end;
}

Py_ssize_t
rec_find(const PageRecord *rec, Py_ssize_t offset)
{
    Py_ssize_t lo = 0, hi = rec->n - 1;

    while (lo < hi) {   /* the first run whose end lies above offset */
        Py_ssize_t mid = (lo + hi) / 2;
        if (rec->runs[mid].end <= offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Split the run holding `at` so that a run starts there (no-op at an edge). */
static void
rec_split(PageRecord *rec, Py_ssize_t at)
{
    Py_ssize_t i;

    if (at <= 0 || at >= rec->runs[rec->n - 1].end)
        return;
    i = rec_find(rec, at);
    if (rec_start(rec, i) == at)
        return;
    memmove(&rec->runs[i + 1], &rec->runs[i], (size_t)(rec->n - i) * sizeof(Run));
    rec->runs[i].end = at;
    rec->n++;
}

/* Join neighbouring runs that are alike. */
void
rec_merge(PageRecord *rec)
{
    Py_ssize_t out = 0;

    for (Py_ssize_t i = 1; i < rec->n; i++) {
        if (rec->runs[i].prot == rec->runs[out].prot
            && rec->runs[i].flags == rec->runs[out].flags)
            rec->runs[out].end = rec->runs[i].end;
        else
            rec->runs[++out] = rec->runs[i];
    }
    rec->n = out + 1;
    if (rec->n == 1 && rec->runs != &rec->one) {
        rec->one = rec->runs[0];
        PyMem_Free(rec->runs);
        rec->runs = &rec->one;
        rec->cap = 1;
    }
}

void
rec_set(PageRecord *rec, Py_ssize_t start, Py_ssize_t end, int prot, int mask, int value)
{
    Py_ssize_t i;

    if (start >= end)
        return;
    if (rec->n == 1 && start == 0 && end >= rec->runs[0].end) {   /* the common case */
        if (prot >= 0)
            rec->runs[0].prot = (unsigned char)prot;
        rec->runs[0].flags = (unsigned char)((rec->runs[0].flags & ~mask) | (value & mask));
        return;
    }
    rec_split(rec, start);
    rec_split(rec, end);
    for (i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++) {
        if (prot >= 0)
            rec->runs[i].prot = (unsigned char)prot;
        rec->runs[i].flags = (unsigned char)((rec->runs[i].flags & ~mask) | (value & mask));
    }
    rec_merge(rec);
}

void
rec_truncate(PageRecord *rec, Py_ssize_t capacity)
{
    Py_ssize_t i = rec_find(rec, capacity - 1);

    rec->n = i + 1;
    rec->runs[i].end = capacity;
    rec_merge(rec);
}

void
rec_extend(PageRecord *rec, Py_ssize_t capacity, int prot, int flags)
{
    Run *last = &rec->runs[rec->n - 1];

    if (capacity <= last->end)
        return;
    if (last->prot == prot && last->flags == flags) {
        last->end = capacity;
        return;
    }
    rec->runs[rec->n].end = capacity;
    rec->runs[rec->n].prot = (unsigned char)prot;
    rec->runs[rec->n].flags = (unsigned char)flags;
    rec->n++;
}

int
run_access(const Run *run)
{
    return (run->flags & RUN_GUARD) ? 0 : run->prot;
}

int
rec_access_all(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end)
{
    int access = PROT_ALL;

    if (rec->n == 1)
        return run_access(&rec->runs[0]);
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++)
        access &= run_access(&rec->runs[i]);
    return access;
}

int
rec_access_any(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end)
{
    int access = 0;

    if (rec->n == 1)
        return run_access(&rec->runs[0]);
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++)
        access |= run_access(&rec->runs[i]);
    return access;
}

int
rec_uniform_runs(const PageRecord *rec, Py_ssize_t start, Py_ssize_t end, int prot)
{
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++)
        if (rec->runs[i].prot != prot)
            return 0;
    return 1;
}

/*
 * Advice and residency of a region: commit (populate), madvise with the
 * rules of each advice, mlock and munlock, mincore. Slow calls run without
 * the GIL while the mapping is marked busy (it cannot be unmapped or moved
 * meanwhile).
 */
#include "mman.h"

typedef struct {
    Py_ssize_t lo, hi;
    int advice;
} Piece;

/* madvise each piece (without the GIL when they are large); errno of the
 * first failure, or 0. */
static int
advise_pieces(Mapping *m, Piece *pieces, Py_ssize_t n, Py_ssize_t total)
{
    int err = 0;
    char *base = m->data;

    if (total < SLOW_CALL_BYTES) {
        for (Py_ssize_t k = 0; k < n && !err; k++)
            err = os_advise(base + pieces[k].lo, (size_t)(pieces[k].hi - pieces[k].lo),
                            pieces[k].advice);
        return err;
    }
    mapping_busy_enter(m);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n && !err; k++)
        err = os_advise(base + pieces[k].lo, (size_t)(pieces[k].hi - pieces[k].lo),
                        pieces[k].advice);
    Py_END_ALLOW_THREADS
    mapping_busy_leave(m);
    return err;
}

/* Convert [extra,] offset, length and resolve them to whole pages of an
 * open region: 0, or -1 with the exception set. */
static int
parse_range(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
            const char *fname, const char *extra_name, int *extra, Py_ssize_t *start,
            Py_ssize_t *n)
{
    PyObject *offset, *length, *extra_obj = NULL;
    int err;

    if (convert_range_args(args, nargs, kwnames, fname, &offset, &length,
                           extra_name ? &extra_obj : NULL, extra_name) < 0)
        return -1;
    err = (extra_name && arg_int(extra_obj, extra_name, extra) < 0)
          || region_check_open(self) < 0 || page_range(&self->m, offset, length, start, n) < 0
          || mapping_check_truncated(&self->m, *start, *start + *n) < 0;
    Py_XDECREF(extra_obj);
    Py_DECREF(offset);
    Py_DECREF(length);
    return err ? -1 : 0;
}

/* _populate(offset=0, length=None): fault in the pages of the range that their
 * protection allows to reach (POPULATE_WRITE for writable pages, POPULATE_READ
 * for read-only ones); ValueError if none of them can be reached. */
PyObject *
region_populate(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t start, n, count = 0, total = 0;
    PageRecord *rec = &self->m.rec;
    Piece *pieces;
    int err;

    if (parse_range(self, args, nargs, kwnames, "commit", NULL, NULL, &start, &n) < 0)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    pieces = PyMem_Malloc((size_t)rec->n * sizeof(Piece));
    if (pieces == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < start + n; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end;
        int access = run_access(&rec->runs[i]);
        if (!(access & PROT_RW))
            continue;
        pieces[count].lo = lo > start ? lo : start;
        pieces[count].hi = hi < start + n ? hi : start + n;
        pieces[count].advice = (access & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
        total += pieces[count].hi - pieces[count].lo;
        count++;
    }
    if (count == 0) {
        PyMem_Free(pieces);
        PyErr_SetString(PyExc_ValueError,
                        "cannot commit pages that are neither readable nor writable; "
                        "protect() them first");
        return NULL;
    }
    err = advise_pieces(&self->m, pieces, count, total);
    PyMem_Free(pieces);
    self->m.flags |= MAPPING_COMMITTED;
    if (err == EINVAL || err == EFAULT) {
        /* the pages changed under the call (another thread protected them) */
        PyErr_Format(PyExc_OSError,
                     "cannot commit %zd bytes: %s (madvise MADV_POPULATE_*); another thread "
                     "changed the protection of the pages meanwhile", total, strerror(err));
        return NULL;
    }
    if (err)
        return raise_os_error_sized(err, "madvise MADV_POPULATE_*", total, "commit");
    Py_RETURN_NONE;
}

static int
discards(int advice)
{
    return advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_PAGEOUT
           || advice == MADV_GUARD_INSTALL;
}

/* Advice whose pages the record must allow: populating needs the access it
 * faults in with. 0, or -1 with ValueError naming the first page. */
static int
check_populate(RegionObject *self, int advice, Py_ssize_t start, Py_ssize_t end)
{
    int need = advice == MADV_POPULATE_WRITE ? PROT_WRITE
               : advice == MADV_POPULATE_READ ? PROT_READ : 0;
    PageRecord *rec = &self->m.rec;

    if (!need)
        return 0;
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++) {
        if (!(run_access(&rec->runs[i]) & need)) {
            Py_ssize_t at = rec_start(rec, i) > start ? rec_start(rec, i) : start;
            PyErr_Format(PyExc_ValueError,
                         "cannot populate the pages for %s: the page at offset %zd is not %s "
                         "(see region.protections())", need == PROT_WRITE ? "writing" : "reading",
                         at, need == PROT_WRITE ? "writable" : "readable");
            return -1;
        }
    }
    return 0;
}

/* _madvise(advice, offset=0, length=None) */
PyObject *
region_madvise(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t start, n;
    int advice, err;
    Piece piece;

    if (parse_range(self, args, nargs, kwnames, "advise", "advice", &advice, &start, &n) < 0)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    if (discards(advice) && self->m.pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot discard pages of the region: %zd function(s) made by "
                     "region.function() run code in it (pinned code keeps its contents)",
                     self->m.pins);
        return NULL;
    }
    if (advice == MADV_GUARD_INSTALL && mapping_conflicts(&self->m, start, start + n, PROT_NONE)) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot install guard pages: exported buffers of the region cover "
                        "those pages");
        return NULL;
    }
    if (check_populate(self, advice, start, start + n) < 0)
        return NULL;
    piece.lo = start;
    piece.hi = start + n;
    piece.advice = advice;
    if (advice_run_flag(advice, &err))
        /* the record changes with it: no other thread may run in between */
        err = mapping_advise_flags(&self->m, start, start + n, advice);
    else
        err = advise_pieces(&self->m, &piece, 1, n);
    if (err == ENOMEM || err == EAGAIN)
        return raise_os_error_sized(err, "madvise", n, "advise");
    if (err)
        return raise_os_error(err, "madvise");
    Py_RETURN_NONE;
}

/* _mlock(on_fault, offset=0, length=None) */
PyObject *
region_mlock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t start, n;
    int on_fault, err;
    char *p;

    if (parse_range(self, args, nargs, kwnames, "lock", "on_fault", &on_fault, &start, &n) < 0)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    p = self->m.data + start;
    mapping_busy_enter(&self->m);
    Py_BEGIN_ALLOW_THREADS
    err = os_lock(p, (size_t)n, on_fault);
    Py_END_ALLOW_THREADS
    mapping_busy_leave(&self->m);
    if (err)
        return raise_os_error(err, on_fault ? "mlock2" : "mlock");
    Py_RETURN_NONE;
}

PyObject *
region_munlock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t start, n;
    int err;

    if (parse_range(self, args, nargs, kwnames, "unlock", NULL, NULL, &start, &n) < 0)
        return NULL;
    if (n > 0 && (err = os_unlock(self->m.data + start, (size_t)n)) != 0)
        return raise_os_error_sized(err, "munlock", n, "unlock");
    Py_RETURN_NONE;
}

/* _mincore(offset=0, length=None) -> bytes: one byte per base page, bit 0 = resident */
PyObject *
region_mincore(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *vec;
    Py_ssize_t start, n, npages;
    int err;
    char *p;

    if (parse_range(self, args, nargs, kwnames, "mincore", NULL, NULL, &start, &n) < 0)
        return NULL;
    npages = n / kernel.page;
    vec = PyBytes_FromStringAndSize(NULL, npages);
    if (vec == NULL || npages == 0)
        return vec;
    p = self->m.data + start;
    mapping_busy_enter(&self->m);
    Py_BEGIN_ALLOW_THREADS
    err = os_residency(p, (size_t)n, (unsigned char *)PyBytes_AsString(vec));
    Py_END_ALLOW_THREADS
    mapping_busy_leave(&self->m);
    if (err) {
        Py_DECREF(vec);
        return raise_os_error(err, "mincore");
    }
    return vec;
}

/*
 * Advice and residency: commit (populate), madvise with the rules of each
 * advice, mlock and munlock, mincore. Slow calls run without the GIL while
 * the region is marked busy (it cannot be unmapped or moved meanwhile).
 */
#include "mman.h"

typedef struct {
    Py_ssize_t lo, hi;
    int advice;
} Piece;

/* madvise each piece without the GIL; errno of the first failure, or 0. */
static int
advise_pieces(RegionObject *self, Piece *pieces, Py_ssize_t n, Py_ssize_t total)
{
    int err = 0;
    char *base = self->data;

    if (total < SLOW_CALL_BYTES) {
        for (Py_ssize_t k = 0; k < n && !err; k++)
            if (madvise(base + pieces[k].lo, (size_t)(pieces[k].hi - pieces[k].lo),
                        pieces[k].advice) != 0)
                err = errno;
        return err;
    }
    region_busy_enter(self);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n && !err; k++)
        if (madvise(base + pieces[k].lo, (size_t)(pieces[k].hi - pieces[k].lo),
                    pieces[k].advice) != 0)
            err = errno;
    Py_END_ALLOW_THREADS
    region_busy_leave(self);
    return err;
}

/* _populate(offset=0, length=None): fault in the pages of the range that their
 * protection allows to reach (POPULATE_WRITE for writable pages, POPULATE_READ
 * for read-only ones); ValueError if none of them can be reached. */
PyObject *
region_populate(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *offset, *length;
    Py_ssize_t start, n, count = 0, total = 0;
    PageRecord *rec = &self->rec;
    Piece *pieces = NULL;
    int err;

    if (convert_range_args(args, nargs, kwnames, 0, "commit", &offset, &length, NULL, NULL) < 0)
        return NULL;
    err = region_check_open(self) < 0 || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
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
    err = advise_pieces(self, pieces, count, total);
    PyMem_Free(pieces);
    self->flags |= REGION_COMMITTED;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static int
discards(int advice)
{
    return advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_PAGEOUT
           || advice == MADV_GUARD_INSTALL;
}

/* _madvise(advice, offset=0, length=None) */
PyObject *
region_madvise(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *advice_obj, *offset, *length;
    Py_ssize_t start, n;
    int advice, err, mask = 0, value = 0;
    Piece piece;

    if (convert_range_args(args, nargs, kwnames, 1, "advise", &offset, &length, &advice_obj,
                           "advice") < 0)
        return NULL;
    err = arg_int(advice_obj, &advice) < 0 || region_check_open(self) < 0
          || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(advice_obj);
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    if (discards(advice) && self->pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot discard pages of the region: %zd function(s) made by "
                     "region.function() run code in it (pinned code keeps its contents)",
                     self->pins);
        return NULL;
    }
    if (advice == MADV_GUARD_INSTALL && self->nexports > 0
        && region_exports_conflict(self, start, start + n, PROT_NONE))
        return NULL;
    if (advice == MADV_DONTFORK || advice == MADV_DOFORK) {
        mask = RUN_DONTFORK;
        value = advice == MADV_DONTFORK ? RUN_DONTFORK : 0;
    }
    else if (advice == MADV_GUARD_INSTALL || advice == MADV_GUARD_REMOVE) {
        mask = RUN_GUARD;
        value = advice == MADV_GUARD_INSTALL ? RUN_GUARD : 0;
    }
    if (mask && rec_reserve(&self->rec, 2) < 0)
        return NULL;
    if (advice == MADV_DONTFORK && region_track_dontfork(self) < 0)
        return NULL;
    piece.lo = start;
    piece.hi = start + n;
    piece.advice = advice;
    if (mask)   /* the record changes with it: no other thread may run in between */
        err = madvise(self->data + start, (size_t)n, advice) != 0 ? errno : 0;
    else
        err = advise_pieces(self, &piece, 1, n);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (mask)
        rec_set(&self->rec, start, start + n, -1, mask, value);
    Py_RETURN_NONE;
}

/* _mlock(on_fault, offset=0, length=None) */
PyObject *
region_mlock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *flag, *offset, *length;
    Py_ssize_t start, n;
    int on_fault, rc, err;
    char *p;

    if (convert_range_args(args, nargs, kwnames, 1, "lock", &offset, &length, &flag,
                           "on_fault") < 0)
        return NULL;
    err = arg_int(flag, &on_fault) < 0 || region_check_open(self) < 0
          || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(flag);
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    p = self->data + start;
    region_busy_enter(self);
    Py_BEGIN_ALLOW_THREADS
    rc = on_fault ? mlock2(p, (size_t)n, MLOCK_ONFAULT) : mlock(p, (size_t)n);
    Py_END_ALLOW_THREADS
    region_busy_leave(self);
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyObject *
region_munlock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *offset, *length;
    Py_ssize_t start, n;
    int err;

    if (convert_range_args(args, nargs, kwnames, 0, "unlock", &offset, &length, NULL, NULL) < 0)
        return NULL;
    err = region_check_open(self) < 0 || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
        return NULL;
    if (n > 0 && munlock(self->data + start, (size_t)n) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* _mincore(offset=0, length=None) -> bytes: one byte per base page, bit 0 = resident */
PyObject *
region_mincore(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *offset, *length, *vec;
    Py_ssize_t start, n, npages;
    int err, rc;
    char *p;

    if (convert_range_args(args, nargs, kwnames, 0, "mincore", &offset, &length, NULL, NULL) < 0)
        return NULL;
    err = region_check_open(self) < 0 || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
        return NULL;
    npages = n / system_page;
    vec = PyBytes_FromStringAndSize(NULL, npages);
    if (vec == NULL || npages == 0)
        return vec;
    p = self->data + start;
    region_busy_enter(self);
    Py_BEGIN_ALLOW_THREADS
    rc = mincore(p, (size_t)n, (unsigned char *)PyBytes_AsString(vec));
    Py_END_ALLOW_THREADS
    region_busy_leave(self);
    if (rc != 0) {
        Py_DECREF(vec);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return vec;
}

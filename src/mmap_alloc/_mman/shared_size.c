/*
 * The size of a shared region's file: resize (the file and the mapping
 * together, every new page backed first), refresh (what another process
 * did; a file region's too), discard (holes), and the peers of the file in
 * this process (the core's registry), which lose the pages the file loses.
 */
#include "shared.h"

/* Whether `bytes` of m's file past `beyond` bytes (both >= 0) are too many
 * to map: rounded up to m's page and alignment, the end would overflow a
 * Py_ssize_t. */
static int
too_large(const Mapping *m, Py_ssize_t beyond, Py_ssize_t bytes)
{
    Py_ssize_t unit = mapping_align(m) > m->page ? mapping_align(m) : m->page;

    return bytes > PY_SSIZE_T_MAX - unit - beyond;
}

/* ------------------------------------------------------------------ */
/* the peers: other regions of this process on the same file           */

static int
same_file(const Mapping *a, const OsFileInfo *file)
{
    OsFileInfo info;

    return a->fd >= 0 && (a->flags & MAPPING_SHARED) && os_file_info(a->fd, &info) == 0
           && info.dev == file->dev && info.ino == file->ino;
}

/* BufferError unless every other region of this process on self's file can
 * lose the pages past fend (whole pages of it after the file is cut to fewer
 * bytes) and none is busy (growing the file, without the GIL); 0 when so. */
static int
check_peers_can_shrink(RegionObject *self, Py_ssize_t fend)
{
    OsFileInfo file;
    int err = os_file_info(self->m.fd, &file);

    if (err) {
        raise_os_error(err, "fstat");
        return -1;
    }
    for (Mapping *r = kernel.registry; r != NULL; r = r->x->next) {
        if (r == &self->m || r->data == NULL || !same_file(r, &file) || mapping_offset(r) != 0)
            continue;   /* (a file region further in the file: the SIGBUS repair covers it) */
        if (mapping_busy(r) > 0 || round_up(fend, r->page) < r->capacity) {
            if (mapping_check_idle(r, "cut the file short under another region of this "
                                      "process that maps it (it must lose those pages)",
                                   "that region") < 0)
                return -1;
        }
    }
    return 0;
}

/* After the file was cut to tsize bytes: every other region of this process
 * on it loses the pages past the end (checked possible before), and its size
 * is at most the file's. */
static void
shrink_peers(RegionObject *self, Py_ssize_t tsize)
{
    OsFileInfo file;

    if (os_file_info(self->m.fd, &file) != 0 || tsize <= 0)
        return;
    for (Mapping *r = kernel.registry; r != NULL; r = r->x->next) {
        if (r == &self->m || r->data == NULL || !same_file(r, &file) || mapping_offset(r) != 0)
            continue;
        if (round_up(tsize, r->page) < r->capacity)
            mapping_drop_tail(r, round_up(tsize, r->page));
        if (r->size > tsize)
            r->size = tsize;
    }
}

/* ------------------------------------------------------------------ */
/* resize, refresh                                                     */

/* Map the file's pages up to newcap (> capacity): in place, or moved when
 * nothing holds the region where it is. 0, or -1 with an exception and the
 * mapping as it was. */
int
map_growth(RegionObject *self, Py_ssize_t newcap, const char *what)
{
    Mapping *m = &self->m;

    if (mapping_grow_in_place(m, newcap) == 0)
        return 0;
    if (mapping_exports(m) > 0 || mapping_pins(m) > 0 || mapping_busy(m) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot %s: the pages after the region are taken, and %zd exported "
                     "buffer(s), %zd function(s) or a call in progress keep it where it is",
                     what, mapping_exports(m), mapping_pins(m));
        return -1;
    }
    {
        const char *call;
        int err = mapping_move(m, newcap, NULL, NULL, &call);
        if (err)   /* the step shared.py words: the move */
            return err > 0 ? (raise_os_error(err, "mremap"), -1) : -1;
    }
    return 0;
}

/* The checks of _shared_resize, before anything changes. */
static int
check_resize(RegionObject *self, Py_ssize_t tsize, Py_ssize_t fsize, Py_ssize_t newcap,
             int seals, int writable)
{
    const char *step = NULL;
    int err = 0;

    if (!writable)
        step = "O_RDONLY", err = EACCES;
    else if ((seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) && tsize != fsize)
        step = "F_SEAL_WRITE", err = EPERM;
    else if (tsize < fsize && (seals & F_SEAL_SHRINK))
        step = "F_SEAL_SHRINK", err = EPERM;
    else if (tsize > fsize && (seals & F_SEAL_GROW))
        step = "F_SEAL_GROW", err = EPERM;
    if (err)
        return raise_os_error(err, step), -1;
    if ((tsize < fsize || newcap < self->m.capacity)
        && mapping_check_idle(&self->m, "shrink the region", "the region") < 0)
        return -1;
    if (tsize < fsize && check_peers_can_shrink(self, tsize) < 0)
        return -1;
    return 0;
}

/* _shared_resize(region, new_size): make the region new_size bytes and the
 * file end where it ends (offset + new_size bytes: whole pages for
 * hugetlb), every new page backed first; a file region's too. Nothing
 * changes on failure, but for one case: when the file grew and this process
 * then cannot map the growth (no address space), the file keeps its new
 * size (refresh() maps it later). Pages the SIGBUS repair replaced are the
 * file's again after it. */
PyObject *
shared_resize(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    RegionObject *self;
    Mapping *m;
    Py_ssize_t new_size, newcap, tsize, fsize, cap;
    int seals, writable, err, reserved = 0;

    if (check_nargs("_shared_resize", nargs, 2, 2) < 0
        || arg_ssize(args[1], "new_size", &new_size) < 0 || (self = shared_arg(args[0])) == NULL)
        return NULL;
    m = &self->m;
    if (new_size == 0) {
        PyErr_SetString(PyExc_ValueError, "new_size must be positive");
        return NULL;
    }
    if (too_large(m, mapping_offset(m), new_size))
        return raise_os_error(ENOMEM, "size");
    if (file_state(self, &fsize, &seals, &writable) < 0)
        return NULL;
    cap = m->capacity;
    newcap = round_up(new_size, m->page);
    tsize = mapping_offset(m) + (is_hugetlb(m) ? newcap : new_size);
    if (check_resize(self, tsize, fsize, newcap, seals, writable) < 0)
        return NULL;

    /* bytes past the end of the file in its last page may hold what was
     * written there: once the file grows over them they must read as zero */
    if (tsize > fsize) {
        Py_ssize_t fend = fsize > mapping_offset(m) ? fsize - mapping_offset(m) : 0;   /* in the region */
        Py_ssize_t lo = m->size > fend ? m->size : fend;
        Py_ssize_t hi = round_up(fend, kernel.page);
        hi = hi < tsize - mapping_offset(m) ? hi : tsize - mapping_offset(m);
        hi = hi < cap ? hi : cap;
        if (lo < hi && mapping_zero(m, lo, hi, "the region") < 0)
            return NULL;
    }
    /* held where it is: extend in place before the file grows, or change nothing */
    if (newcap > cap && (mapping_exports(m) > 0 || mapping_pins(m) > 0)) {
        if (mapping_grow_in_place(m, newcap) != 0) {
            PyErr_Format(PyExc_BufferError,
                         "cannot grow the region to %zd bytes: the pages after it are taken, "
                         "and %zd exported buffer(s) or %zd function(s) keep it where it is",
                         new_size, mapping_exports(m), mapping_pins(m));
            return NULL;
        }
        reserved = 1;
    }
    if (tsize > fsize) {
        Py_ssize_t now;
        err = back_range(m, m->fd, 0, fsize, tsize - fsize);
        /* without the GIL meanwhile: the file must still hold what we map */
        if (!err && (err = file_size(m->fd, &now)) == 0 && now < tsize)
            err = ESTALE;
        if (err) {
            if (reserved)
                mapping_drop_tail(m, cap);
            if (err == ESTALE) {
                PyErr_SetString(PyExc_BufferError,
                                "cannot grow the region: the file was cut short meanwhile (by "
                                "another region of it, or another process); refresh() it");
                return NULL;
            }
            return raise_os_error(err, "fallocate");
        }
    }
    else if (tsize < fsize) {
        /* nothing can touch the pages past the new end: idle, GIL held */
        if ((err = os_file_truncate(m->fd, tsize)) != 0)
            return raise_os_error(err, "ftruncate");
        shrink_peers(self, tsize);
    }
    if (newcap < cap)
        mapping_drop_tail(m, newcap);   /* refused (map count): the pages stay past size */
    if (newcap > cap && !reserved && map_growth(self, newcap, "map the grown file") < 0)
        return NULL;
    if (m->flags & MAPPING_REPAIRABLE) {   /* best effort: refresh() tries again */
        repair_lock(m);
        repair_restore(m, m->capacity);
        repair_unlock(m);
    }
    m->size = new_size;
    Py_RETURN_NONE;
}

PyObject *
file_refresh_region(RegionObject *self, Py_ssize_t limit)
{
    Mapping *m = &self->m;
    Py_ssize_t fsize, want, newcap;
    int err;

    if (mapping_busy(m) > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot refresh the region: a system call on it is in progress");
        return NULL;
    }
    if ((err = file_size(m->fd, &fsize)) != 0)
        return raise_os_error(err, "fstat");
    want = fsize > mapping_offset(m) ? fsize - mapping_offset(m) : 0;
    if (limit >= 0 && want > limit)
        want = limit;
    if (want == 0) {
        PyErr_Format(PyExc_ValueError,
                     "the file is %zd bytes now: it was cut short to %s (another process "
                     "truncated it); the region keeps reading zeros until it is closed", fsize,
                     mapping_offset(m) ? "before the region's offset" : "nothing");
        return NULL;
    }
    if (too_large(m, 0, want))
        return raise_os_error(ENOMEM, "size");
    newcap = round_up(want, m->page);
    /* the file again over repaired pages it holds now, in place: buffers and
     * arrays of them see the file from here on */
    repair_lock(m);
    err = repair_restore(m, newcap);
    repair_unlock(m);
    if (err)
        return raise_os_error(err, "mmap");
    if (newcap < m->capacity && mapping_exports(m) == 0 && mapping_pins(m) == 0)
        mapping_drop_tail(m, newcap);   /* refused (map count): the pages stay past size */
    else if (newcap > m->capacity && map_growth(self, newcap, "map the file's growth") < 0)
        return NULL;
    m->size = want;
    return PyLong_FromSsize_t(want);
}

/* _shared_refresh(region) -> int: map what another process did to the file's
 * size: its growth (in place, or moved when nothing holds the region), or,
 * without the shrink seal, its shrinking (the region must be idle). */
PyObject *
shared_refresh(PyObject *module, PyObject *region)
{
    RegionObject *self = shared_arg(region);
    Py_ssize_t fsize, newcap;
    int seals, writable, err;

    if (self != NULL && (self->m.flags & MAPPING_REPAIRABLE))
        return file_refresh_region(self, -1);   /* no shrink seal: the repair watches it */
    if (self == NULL || file_state(self, &fsize, &seals, &writable) < 0)
        return NULL;
    if (fsize == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "the file is empty: another process truncated it (it was not sealed "
                        "against shrinking); close the region");
        return NULL;
    }
    if (too_large(&self->m, 0, fsize))
        return raise_os_error(ENOMEM, "size");
    newcap = round_up(fsize, self->m.page);
    if (newcap > self->m.capacity) {
        if (map_growth(self, newcap, "map the file's growth") < 0)
            return NULL;
    }
    else if (newcap < self->m.capacity) {
        if (mapping_check_idle(&self->m, "unmap the pages the file lost", "the region") < 0)
            return NULL;
        if ((err = mapping_drop_tail(&self->m, newcap)) != 0)
            return raise_os_error(err, "munmap");
    }
    self->m.size = fsize;
    return PyLong_FromSsize_t(fsize);
}

/* _shared_discard(region, offset=0, length=None): punch a hole in the file
 * (FALLOC_FL_PUNCH_HOLE): the pages go back to the kernel and read as zero
 * in every process that maps them. */
PyObject *
shared_discard(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    RegionObject *self;
    Py_ssize_t start, n, fsize = 0, fend;
    int err;

    self = region_range_arg(args, nargs, kwnames, "_shared_discard", "discard", shared_arg,
                            &start, &n);
    if (self == NULL)
        return NULL;
    if (mapping_pins(&self->m) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot discard pages of the region: %zd function(s) made by "
                     "region.function() run code in it (pinned code keeps its contents)",
                     mapping_pins(&self->m));
        return NULL;
    }
    if (is_hugetlb(&self->m)) {
        PyErr_SetString(PyExc_ValueError,
                        "cannot discard pages of a hugetlb region: touching them again would "
                        "need free pages in the hugetlb pool, and an empty pool means SIGBUS");
        return NULL;
    }
    if ((err = file_size(self->m.fd, &fsize)) != 0)
        return raise_os_error(err, "fstat");
    fend = round_up(fsize, kernel.page);
    if (start + n > fend)
        n = fend - start;
    if (n <= 0)
        Py_RETURN_NONE;
    if ((err = back_range(&self->m, self->m.fd, 1, start, n)) != 0)
        return raise_os_error(err, "fallocate");
    Py_RETURN_NONE;
}


/*
 * Resizing: realloc (may move), grow and shrink in place, move by copy, and
 * the zeroing of bytes a grow exposes. Each call is one transition: it
 * checks exports, pins and busy counts, acts, and updates the record, and a
 * failure leaves the region as it was.
 */
#include "mman.h"

#include <fcntl.h>

#define MODE_REALLOC 0
#define MODE_GROW 1
#define MODE_SHRINK 2

static Py_ssize_t
natural_align(RegionObject *self)
{
    return (self->mflags & MAP_HUGETLB) ? self->page : system_page;
}

/* memset [lo, hi) (within one run of protection prot), raising the protection
 * for the time of the write if needed. */
static int
memset_run(RegionObject *self, Py_ssize_t lo, Py_ssize_t hi, int prot)
{
    Py_ssize_t plo, phi;

    if (prot & PROT_WRITE) {
        memset(self->data + lo, 0, (size_t)(hi - lo));
        return 0;
    }
    plo = lo & ~(system_page - 1);
    phi = round_up(hi, system_page);
    if (mprotect(self->data + plo, (size_t)(phi - plo), prot | PROT_RW) != 0) {
        raise_syscall_error(errno, phi - plo, "change the protection of");
        return -1;
    }
    memset(self->data + lo, 0, (size_t)(hi - lo));
    if (mprotect(self->data + plo, (size_t)(phi - plo), prot) != 0) {
        /* practically impossible (it merges mappings back): keep the record true */
        if (rec_reserve(&self->rec, 2) == 0)
            rec_set(&self->rec, plo, phi, prot | PROT_RW, 0, 0);
        else
            PyErr_Clear();
    }
    return 0;
}

/* memset [lo, hi), run by run; guard pages hold nothing and are skipped. */
static int
memset_range(RegionObject *self, Py_ssize_t lo, Py_ssize_t hi)
{
    PageRecord *rec = &self->rec;

    for (Py_ssize_t i = rec_find(rec, lo); i < rec->n && rec_start(rec, i) < hi; i++) {
        Py_ssize_t a = rec_start(rec, i), b = rec->runs[i].end;
        int prot = rec->runs[i].prot;
        a = a > lo ? a : lo;
        b = b < hi ? b : hi;
        if (rec->runs[i].flags & RUN_GUARD)
            continue;
        if (memset_run(self, a, b, prot) < 0)
            return -1;
    }
    return 0;
}

int
region_zero(RegionObject *self, Py_ssize_t start, Py_ssize_t end)
{
    Py_ssize_t page = self->page, full_start, full_end;

    if (start >= end)
        return 0;
    if (self->pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot re-zero bytes of the region: %zd function(s) made by "
                     "region.function() run code in it (pinned code keeps its contents)",
                     self->pins);
        return -1;
    }
    full_start = round_up(start, page);
    full_end = end & ~(page - 1);
    if (full_start >= full_end || (self->flags & REGION_SHARED))
        return memset_range(self, start, end);
    if (start < full_start && memset_range(self, start, full_start) < 0)
        return -1;
    /* whole pages go back to the kernel and read as zero (locked pages refuse) */
    if (madvise(self->data + full_start, (size_t)(full_end - full_start), MADV_DONTNEED) != 0
        && memset_range(self, full_start, full_end) < 0)
        return -1;
    if (full_end < end)
        return memset_range(self, full_end, end);
    return 0;
}

/* Pages added at [old, new) of the capacity: advise and prefault them as the
 * region's first pages were (best effort, as MAP_POPULATE is). */
static void
prepare_new_pages(RegionObject *self, Py_ssize_t old, Py_ssize_t new)
{
    if (new <= old)
        return;
    if (self->advice)
        madvise(self->data + old, (size_t)(new - old), self->advice);
    if (self->populate) {
        int prot = self->rec.runs[self->rec.n - 1].prot;
        if (prot & PROT_RW)
            madvise(self->data + old, (size_t)(new - old),
                    (prot & PROT_WRITE) ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
    }
}

/* Grow the mapping to newcap without moving it. 0 on success; -1 with errno
 * set (nothing changed) when the pages after it are taken or refused. */
static int
grow_mapping_in_place(RegionObject *self, Py_ssize_t newcap)
{
    Run *last = &self->rec.runs[self->rec.n - 1];
    Py_ssize_t delta = newcap - self->capacity;
    int err = 0;
    char *p;

    if (rec_reserve(&self->rec, 1) < 0) {
        PyErr_Clear();
        errno = ENOMEM;
        return -1;
    }
    last = &self->rec.runs[self->rec.n - 1];
    if (self->rec.n == 1 && !(self->flags & REGION_SHARED)) {
        p = mremap(self->data, (size_t)self->capacity, (size_t)newcap, 0);
        if (p != MAP_FAILED) {
            rec_extend(&self->rec, newcap, last->prot, last->flags & RUN_DONTFORK);
            goto grown;
        }
        err = errno;
        if (err == ENOMEM)
            return -1;   /* the next pages are taken (or the limits say no) */
    }
    if (self->flags & REGION_SHARED) {
        errno = err ? err : EINVAL;
        return -1;
    }
    /* several kernel mappings, or hugetlb: map the next pages themselves */
    p = mmap(self->data + self->capacity, (size_t)delta, last->prot,
             self->mflags | MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    if (p != self->data + self->capacity) {   /* a kernel that took it as a hint */
        munmap(p, (size_t)delta);
        errno = EEXIST;
        return -1;
    }
    rec_extend(&self->rec, newcap, last->prot, 0);
grown:
    mapped_bytes += delta;
    {
        Py_ssize_t old = self->capacity;
        self->capacity = newcap;
        prepare_new_pages(self, old, newcap);
    }
    return 0;
}

int
region_drop_tail(RegionObject *self, Py_ssize_t newcap)
{
    if (munmap(self->data + newcap, (size_t)(self->capacity - newcap)) != 0)
        return -1;
    mapped_bytes -= self->capacity - newcap;
    self->capacity = newcap;
    rec_truncate(&self->rec, newcap);
    return 0;
}

/* ---------------------------------------------------------------- copy */

/* Pages of [lo, hi) that hold data (present or swapped), from /proc/self/pagemap;
 * out[i] = 1 for a page with data. Without pagemap every page counts. */
static void
pages_with_data(char *base, Py_ssize_t lo, Py_ssize_t hi, unsigned char *out)
{
    Py_ssize_t n = (hi - lo) / system_page, done = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t entries[512];

    if (fd < 0) {
        memset(out, 1, (size_t)n);
        return;
    }
    while (done < n) {
        Py_ssize_t want = n - done < 512 ? n - done : 512;
        off_t at = (off_t)(((uintptr_t)(base + lo) / (uintptr_t)system_page + (uintptr_t)done)
                           * sizeof(uint64_t));
        ssize_t got = pread(fd, entries, (size_t)want * sizeof(uint64_t), at);
        if (got <= 0) {
            memset(out + done, 1, (size_t)(n - done));
            break;
        }
        for (Py_ssize_t k = 0; k < got / (ssize_t)sizeof(uint64_t); k++)
            out[done + k] = (entries[k] >> 62) != 0;   /* bit 63 present, 62 swapped */
        done += got / (Py_ssize_t)sizeof(uint64_t);
    }
    close(fd);
}

/* Copy the pages of [lo, hi) that hold data from src to dst. */
static int
copy_pages(char *dst, char *src, Py_ssize_t lo, Py_ssize_t hi)
{
    Py_ssize_t n = (hi - lo) / system_page;
    unsigned char *has = PyMem_Malloc((size_t)(n ? n : 1));

    if (has == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    pages_with_data(src, lo, hi, has);
    for (Py_ssize_t k = 0; k < n;) {
        Py_ssize_t j = k;
        if (!has[k]) {
            k++;
            continue;
        }
        while (j < n && has[j])
            j++;
        memcpy(dst + lo + k * system_page, src + lo + k * system_page,
               (size_t)((j - k) * system_page));
        k = j;
    }
    PyMem_Free(has);
    return 0;
}

/* Put back the protections a copy raised on the source runs [0, upto). */
static void
restore_source(RegionObject *self, Py_ssize_t upto)
{
    PageRecord *rec = &self->rec;

    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < upto; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end;
        if (!(rec->runs[i].prot & PROT_READ) && !(rec->runs[i].flags & RUN_GUARD))
            mprotect(self->data + lo, (size_t)((hi < upto ? hi : upto) - lo), rec->runs[i].prot);
    }
}

/* Move the region to a new mapping of newcap bytes by copying, for mappings
 * mremap cannot move (several kernel mappings, hugetlb). Pages that hold no
 * data are not touched, so a reservation stays uncommitted. */
static int
move_by_copy(RegionObject *self, Py_ssize_t newcap, int mflags, int advice, PyObject *backing)
{
    PageRecord *rec = &self->rec;
    Py_ssize_t natural = (mflags & MAP_HUGETLB) ? self->page : system_page;
    Py_ssize_t copy_end = round_up(self->size, system_page), raised = 0;
    char *target;
    int err;

    if (copy_end > newcap)
        copy_end = newcap;
    if (rec_reserve(rec, 1) < 0)
        return -1;
    target = map_aligned(newcap, self->align, natural, PROT_RW, mflags, -1,
                         (mflags & MAP_HUGETLB) != 0);
    if (target == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (advice && madvise(target, (size_t)newcap, advice) != 0)
        goto fail_errno;
    /* contents: run by run; unreadable pages become readable for the copy */
    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < copy_end; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end;
        hi = hi < copy_end ? hi : copy_end;
        if (rec->runs[i].flags & RUN_GUARD)
            continue;
        if (!(rec->runs[i].prot & PROT_READ)) {
            if (mprotect(self->data + lo, (size_t)(hi - lo), rec->runs[i].prot | PROT_READ) != 0)
                goto fail_errno;
            raised = hi;
        }
        if (copy_pages(target, self->data, lo, hi) < 0)
            goto fail;
    }
    /* protections and flags of the target, the last run stretched to newcap */
    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < newcap; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = i == rec->n - 1 ? newcap : rec->runs[i].end;
        Run *run = &rec->runs[i];
        hi = hi < newcap ? hi : newcap;
        if (run->prot != PROT_RW && mprotect(target + lo, (size_t)(hi - lo), run->prot) != 0)
            goto fail_errno;
        if ((run->flags & RUN_GUARD)
            && madvise(target + lo, (size_t)(hi - lo), MADV_GUARD_INSTALL) != 0)
            goto fail_errno;
        if ((run->flags & RUN_DONTFORK)
            && madvise(target + lo, (size_t)(hi - lo), MADV_DONTFORK) != 0)
            goto fail_errno;
    }
    /* commit: from here nothing can fail */
    {
        char *old = self->data;
        Py_ssize_t oldcap = self->capacity;
        Run *last = &rec->runs[rec->n - 1];
        mapped_bytes += newcap;
        self->data = target;
        if (newcap < oldcap)
            rec_truncate(rec, newcap);
        else
            rec_extend(rec, newcap, last->prot, last->flags);
        self->capacity = newcap;
        self->mflags = mflags;
        self->advice = advice;
        if (backing != NULL) {
            PyObject *previous = self->backing;
            self->backing = Py_NewRef(backing);
            Py_DECREF(previous);   /* a Backing member or None: no finalizer */
        }
        unmap_or_bury(old, oldcap, oldcap >= SLOW_CALL_BYTES);
        if (newcap > oldcap && self->populate)
            prepare_new_pages(self, oldcap, newcap);
    }
    return 0;

fail_errno:
    err = errno;
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
fail:
    restore_source(self, raised);
    munmap(target, (size_t)newcap);
    return -1;
}

/* Move (grow) the region to newcap bytes: mremap when one kernel mapping
 * holds it, else a copy. */
static int
move_region(RegionObject *self, Py_ssize_t newcap, int mflags, int advice, PyObject *backing)
{
    char *p, *hint = NULL;
    int err;

    if (self->rec.n == 1 && !(self->rec.runs[0].flags & RUN_GUARD) && mflags == self->mflags
        && rec_reserve(&self->rec, 1) == 0) {
        if (self->align > natural_align(self)) {
            /* keep the alignment: move into an aligned reservation */
            hint = map_aligned(newcap, self->align, system_page, PROT_NONE, MAP_NORESERVE, -1, 0);
            if (hint == MAP_FAILED) {
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            p = mremap(self->data, (size_t)self->capacity, (size_t)newcap,
                       MREMAP_MAYMOVE | MREMAP_FIXED, hint);
        }
        else
            p = mremap(self->data, (size_t)self->capacity, (size_t)newcap, MREMAP_MAYMOVE);
        if (p != MAP_FAILED) {
            Py_ssize_t old = self->capacity;
            Run *last = &self->rec.runs[0];
            mapped_bytes += newcap - old;
            self->data = p;
            self->capacity = newcap;
            rec_extend(&self->rec, newcap, last->prot, last->flags);
            prepare_new_pages(self, old, newcap);
            return 0;
        }
        err = errno;
        if (hint != NULL)
            munmap(hint, (size_t)newcap);
        if (err != EFAULT && err != EINVAL) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    else if (PyErr_Occurred())
        return -1;
    return move_by_copy(self, newcap, mflags, advice, backing);
}

static PyObject *
cannot_in_place(RegionObject *self, const char *what, Py_ssize_t newcap, int err)
{
    PyObject *type = CannotReallocInPlace_Type ? CannotReallocInPlace_Type : PyExc_OSError;
    PyErr_Format(type, "cannot %s the region at %p from %zd to %zd bytes in place: %s", what,
                 (void *)self->data, self->capacity, newcap, strerror(err));
    return NULL;
}

/* _resize(new_size, mode[, mflags, advice, backing]): realloc (mode 0), grow in
 * place (1), shrink in place (2). For a realloc that must copy, mflags, advice
 * and backing say how to map the new pages instead of the region's own way. */
PyObject *
region_resize(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t new_size, newcap, size;
    int mode, mflags, advice;
    PyObject *backing = NULL;

    if (nargs != 2 && check_nargs("_resize", nargs, 5, 5) < 0)
        return NULL;
    if (arg_ssize(args[0], "new_size", &new_size) < 0 || arg_int(args[1], &mode) < 0)
        return NULL;
    if (region_check_open(self) < 0)
        return NULL;
    mflags = self->mflags;
    advice = self->advice;
    if (nargs == 5) {
        if (arg_int(args[2], &mflags) < 0 || arg_int(args[3], &advice) < 0)
            return NULL;
        backing = args[4];
    }
    if (self->flags & REGION_SHARED) {
        PyErr_SetString(PyExc_ValueError, "a shared region is resized with resize()");
        return NULL;
    }
    if (new_size == 0 || new_size > PY_SSIZE_T_MAX - self->page) {
        errno = ENOMEM;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    size = self->size;
    newcap = round_up(new_size, self->page);

    if (mode == MODE_SHRINK) {
        if (new_size > size) {
            PyErr_Format(PyExc_ValueError, "new_size=%zd is larger than the region's size %zd",
                         new_size, size);
            return NULL;
        }
        if (region_check_idle(self, "shrink the region") < 0)
            return NULL;
        if (newcap < self->capacity && region_drop_tail(self, newcap) < 0)
            return cannot_in_place(self, "shrink", newcap, errno);
        self->size = new_size;
        Py_RETURN_NONE;
    }
    if (mode == MODE_GROW) {
        if (new_size < size) {
            PyErr_Format(PyExc_ValueError, "new_size=%zd is smaller than the region's size %zd",
                         new_size, size);
            return NULL;
        }
        if (region_zero(self, size, new_size < self->capacity ? new_size : self->capacity) < 0)
            return NULL;
        if (newcap > self->capacity && grow_mapping_in_place(self, newcap) < 0)
            return cannot_in_place(self, "grow", newcap, errno);
        self->size = new_size;
        Py_RETURN_NONE;
    }
    /* realloc */
    if (newcap == self->capacity || (newcap < self->capacity && self->nexports > 0)) {
        if (new_size > size && region_zero(self, size, new_size) < 0)
            return NULL;
        self->size = new_size;
        Py_RETURN_NONE;
    }
    if (newcap < self->capacity) {
        if (region_check_idle(self, "shrink the region") < 0)
            return NULL;
        if (region_drop_tail(self, newcap) < 0)
            errno = 0;   /* the kernel keeps the pages (map count): keep the capacity */
        self->size = new_size;
        Py_RETURN_NONE;
    }
    if (self->nexports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot move the region: it has %zd exported buffer(s) and %zd bytes do not "
                     "fit in its capacity %zd", self->nexports, new_size, self->capacity);
        return NULL;
    }
    if (region_check_idle(self, "move the region") < 0
        || region_zero(self, size, self->capacity) < 0)
        return NULL;
    if (grow_mapping_in_place(self, newcap) < 0 && move_region(self, newcap, mflags, advice,
                                                               backing) < 0)
        return NULL;
    self->size = new_size;
    Py_RETURN_NONE;
}

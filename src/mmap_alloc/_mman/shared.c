/*
 * SharedRegion's kernel: a memfd mapped MAP_SHARED, owned by a RegionObject
 * with REGION_SHARED | REGION_OWNS_FD, and every change of that mapping as
 * one C call: creation, attaching a file descriptor, resize, refresh (map
 * what another process grew), sealing, and discarding pages.
 *
 * The rules that keep it free of SIGBUS:
 *   - every page is backed (fallocate) before it is mapped, so running out of
 *     memory is an error of the call that asked for it, never a fault later;
 *   - a page wholly beyond the end of the file is never part of the region
 *     (the file shrinks before the mapping only while nothing can touch it:
 *     no export, pin or call without the GIL, and the GIL held throughout);
 *   - sealed against shrinking (the default), no other process can truncate
 *     the file under us.
 *
 * Errors of system calls are OSError(errno, strerror, step) where step names
 * the call ("memfd_create", "fallocate", "mmap", ...): shared.py reads it to
 * word the message. No Python code runs between a check and the act that
 * depends on it; the only GIL release is around fallocate and MADV_COLLAPSE
 * of large ranges, with the region marked busy, and everything that depends
 * on state another thread could change meanwhile is checked again after.
 */
#include "mman.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>

/* Linux ABI values the C library's headers may predate (manylinux). */
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x1U
#define MFD_ALLOW_SEALING 0x2U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x4U
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef F_DUPFD_CLOEXEC
#define F_DUPFD_CLOEXEC 1030
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
/* ------------------------------------------------------------------ */
/* helpers                                                             */

/* The region argument: an open shared region; NULL with an exception. */
static RegionObject *
shared_arg(PyObject *o)
{
    RegionObject *self;

    if (!is_region(o) || !(((RegionObject *)o)->flags & REGION_SHARED)) {
        PyErr_SetString(PyExc_TypeError, "expected a shared region");
        return NULL;
    }
    self = (RegionObject *)o;
    if (region_check_open(self) < 0)
        return NULL;
    return self;
}

static int
is_hugetlb(RegionObject *self)
{
    return self->page > system_page;
}

/* fallocate without the GIL for large ranges (self, if given, marked busy
 * meanwhile); 0 or the errno. */
static int
back_range(RegionObject *self, int fd, int mode, Py_ssize_t offset, Py_ssize_t length)
{
    int rc, err = 0;

    if (length < SLOW_CALL_BYTES) {
        rc = fallocate(fd, mode, (off_t)offset, (off_t)length);
        return rc == 0 ? 0 : errno;
    }
    if (self != NULL)
        region_busy_enter(self);
    Py_BEGIN_ALLOW_THREADS
    rc = fallocate(fd, mode, (off_t)offset, (off_t)length);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (self != NULL)
        region_busy_leave(self);
    return err;
}

/* Best effort: turn the backed pages of [p, p + length) into transparent huge
 * pages now (MADV_COLLAPSE, Linux 6.1); khugepaged may do it later anyway. */
static void
collapse(RegionObject *self, char *p, Py_ssize_t length)
{
    if (length < SLOW_CALL_BYTES) {
        madvise(p, (size_t)length, MADV_COLLAPSE);
        return;
    }
    if (self != NULL)
        region_busy_enter(self);
    Py_BEGIN_ALLOW_THREADS
    madvise(p, (size_t)length, MADV_COLLAPSE);
    Py_END_ALLOW_THREADS
    if (self != NULL)
        region_busy_leave(self);
}

/* Advise pages a grow added, as the region's first pages were. */
static void
advise_new_pages(RegionObject *self, Py_ssize_t old, Py_ssize_t new)
{
    if (new <= old || !self->advice)
        return;
    madvise(self->data + old, (size_t)(new - old), self->advice);
    if (self->advice == MADV_HUGEPAGE) {
        /* from the huge page the old end lies in: it may be whole now */
        Py_ssize_t from = old & ~(self->align - 1);
        collapse(self, self->data + from, new - from);
    }
}

static int
file_size(int fd, Py_ssize_t *size)
{
    struct stat st;

    if (fstat(fd, &st) != 0)
        return errno;
    *size = (Py_ssize_t)st.st_size;
    return 0;
}

/* mmap of the region's file. A mapping without PROT_WRITE goes through a
 * read-only open of the file when the kernel refuses it on the region's own
 * descriptor (kernels before 6.7 refuse any shared mapping of a descriptor
 * open for writing once the file is sealed against writing). */
static char *
map_file(RegionObject *self, char *addr, Py_ssize_t length, int prot, int flags, Py_ssize_t offset)
{
    char path[64];
    char *p = mmap(addr, (size_t)length, prot, flags, self->fd, (off_t)offset);
    int ro, err;

    if (p != MAP_FAILED || (prot & PROT_WRITE) || (errno != EPERM && errno != EACCES))
        return p;
    snprintf(path, sizeof path, "/proc/self/fd/%d", self->fd);
    ro = open(path, O_RDONLY | O_CLOEXEC);
    if (ro < 0)
        return MAP_FAILED;
    p = mmap(addr, (size_t)length, prot, flags, ro, (off_t)offset);
    err = errno;
    close(ro);
    errno = err;
    return p;
}

/* Apply the record's protection and flags to a fresh mapping of the file at
 * p (mapped with the protection of the first run, on [0, upto)); -1 with
 * errno set. prot_mask clears bits from every run (PROT_WRITE for a
 * read-only remap). */
static int
apply_record(RegionObject *self, char *p, Py_ssize_t upto, int first_prot, int prot_mask)
{
    PageRecord *rec = &self->rec;

    for (Py_ssize_t i = 0; i < rec->n && rec_start(rec, i) < upto; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end < upto ? rec->runs[i].end : upto;
        int prot = rec->runs[i].prot & ~prot_mask;
        if (prot != first_prot && mprotect(p + lo, (size_t)(hi - lo), prot) != 0)
            return -1;
        if ((rec->runs[i].flags & RUN_GUARD)
            && madvise(p + lo, (size_t)(hi - lo), MADV_GUARD_INSTALL) != 0)
            return -1;
        if ((rec->runs[i].flags & RUN_DONTFORK)
            && madvise(p + lo, (size_t)(hi - lo), MADV_DONTFORK) != 0)
            return -1;
    }
    return 0;
}

/* Extend the mapping to newcap where it is (mremap without moving, or a map
 * of the file's next pages next to it). 0, or -1 with errno set and nothing
 * changed. The record and capacity are not touched: the caller commits. */
static int
extend_in_place(RegionObject *self, Py_ssize_t newcap, int prot)
{
    Py_ssize_t cap = self->capacity;
    char *p;

    if (self->rec.n == 1) {
        p = mremap(self->data, (size_t)cap, (size_t)newcap, 0);
        if (p != MAP_FAILED)
            return 0;
        if (errno == ENOMEM)
            return -1;   /* the next pages are taken */
    }
    /* several kernel mappings (mixed protections), or a kernel that refuses
     * to mremap this mapping: map the file's next pages right after it */
    p = map_file(self, self->data + cap, newcap - cap, prot, MAP_SHARED | MAP_FIXED_NOREPLACE,
                 cap);
    if (p == MAP_FAILED)
        return -1;
    if (p != self->data + cap) {   /* a kernel that took it as a hint */
        munmap(p, (size_t)(newcap - cap));
        errno = EEXIST;
        return -1;
    }
    return 0;
}

/* Move the mapping to a new place of newcap bytes: mremap when one kernel
 * mapping holds it (page tables move, nothing is copied), else a new mapping
 * of the file with the record applied. 0, or -1 with errno set and nothing
 * changed; on success self->data is the new address (capacity still old). */
static int
move_mapping(RegionObject *self, Py_ssize_t newcap)
{
    Py_ssize_t cap = self->capacity;
    Py_ssize_t natural = is_hugetlb(self) ? self->page : system_page;
    int prot0 = self->rec.runs[0].prot, err;
    char *p, *hint;

    if (self->rec.n == 1 && !(self->rec.runs[0].flags & RUN_GUARD)) {
        if (self->align <= natural)
            p = mremap(self->data, (size_t)cap, (size_t)newcap, MREMAP_MAYMOVE);
        else {
            /* keep the alignment (THP): move into an aligned reservation */
            hint = map_aligned(newcap, self->align, system_page, PROT_NONE, MAP_NORESERVE, -1, 0);
            if (hint == MAP_FAILED)
                return -1;
            p = mremap(self->data, (size_t)cap, (size_t)newcap,
                       MREMAP_MAYMOVE | MREMAP_FIXED, hint);
            if (p == MAP_FAILED) {
                err = errno;
                munmap(hint, (size_t)newcap);
                errno = err;
            }
        }
        if (p != MAP_FAILED) {
            self->data = p;
            return 0;
        }
        if (errno != EFAULT && errno != EINVAL)
            return -1;
    }
    /* a new mapping of the whole file: the pages are the same pages */
    hint = map_aligned(newcap, self->align, natural, PROT_NONE, MAP_NORESERVE, -1, 0);
    if (hint == MAP_FAILED)
        return -1;
    p = map_file(self, hint, newcap, prot0, MAP_SHARED | MAP_FIXED, 0);
    if (p == MAP_FAILED) {
        err = errno;
        munmap(hint, (size_t)newcap);
        errno = err;
        return -1;
    }
    if (apply_record(self, p, cap, prot0, 0) != 0) {
        err = errno;
        munmap(p, (size_t)newcap);
        errno = err;
        return -1;
    }
    {
        int last = self->rec.runs[self->rec.n - 1].prot;
        if (last != prot0 && mprotect(p + cap, (size_t)(newcap - cap), last) != 0) {
            err = errno;
            munmap(p, (size_t)newcap);
            errno = err;
            return -1;
        }
    }
    /* the old mapping goes (the GIL held: nothing may see the region half
     * moved); mapped_bytes: + cap here, - cap in unmap_or_bury, and the
     * caller adds newcap - cap */
    {
        char *old = self->data;
        self->data = p;
        mapped_bytes += cap;
        unmap_or_bury(old, cap, 0);
    }
    return 0;
}

/* Commit a mapping grown (in place or moved) to newcap. Needs rec_reserve(1).
 * prot: what the new pages were mapped with. */
static void
commit_growth(RegionObject *self, Py_ssize_t newcap, int prot)
{
    Py_ssize_t old = self->capacity;
    Run *last = &self->rec.runs[self->rec.n - 1];

    /* another thread may have changed the last run's protection while the
     * GIL was released: the new pages follow the record, or the record them */
    if (last->prot != prot
        && mprotect(self->data + old, (size_t)(newcap - old), last->prot) == 0)
        prot = last->prot;
    /* a new mapping of the next pages lacks MADV_DONTFORK (an extended one has it) */
    if ((last->flags & RUN_DONTFORK)
        && madvise(self->data + old, (size_t)(newcap - old), MADV_DONTFORK) != 0)
        rec_extend(&self->rec, newcap, prot, 0);
    else
        rec_extend(&self->rec, newcap, prot, last->flags & RUN_DONTFORK);
    mapped_bytes += newcap - old;
    self->capacity = newcap;
    advise_new_pages(self, old, newcap);
}

/* Map the file's pages up to newcap (> capacity): in place, or moved when
 * nothing pins the region where it is. reserved: the mapping was extended in
 * place already (by the caller, before the file grew). 0, or -1 with an
 * exception and the mapping as it was. */
static int
map_growth(RegionObject *self, Py_ssize_t newcap, int reserved, int prot, const char *what)
{
    /* room in the record, now: another thread may have used what the caller
     * reserved while the GIL was released */
    if (rec_reserve(&self->rec, 1) < 0) {
        if (reserved)
            munmap(self->data + self->capacity, (size_t)(newcap - self->capacity));
        return -1;
    }
    if (!reserved && extend_in_place(self, newcap, prot) != 0) {
        if (self->nexports > 0 || self->pins > 0 || region_busy(self) > 0) {
            PyErr_Format(PyExc_BufferError,
                         "cannot %s: the pages after the region are taken, and %zd exported "
                         "buffer(s), %zd function(s) or a call in progress keep it where it is",
                         what, self->nexports, self->pins);
            return -1;
        }
        if (move_mapping(self, newcap) != 0) {
            raise_step_error(errno, "mremap");
            return -1;
        }
    }
    commit_growth(self, newcap, prot);
    return 0;
}

/* ------------------------------------------------------------------ */
/* creation                                                            */

static int
arg_region_class(PyObject *o, PyTypeObject **cls)
{
    if (!PyType_Check(o) || !PyType_IsSubtype((PyTypeObject *)o, Region_Type)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a subclass of Region");
        return -1;
    }
    *cls = (PyTypeObject *)o;
    return 0;
}

static int
check_granule(Py_ssize_t page, Py_ssize_t align)
{
    if (page < system_page || (page & (page - 1)) || align < page || (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad page size or alignment");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* the shared regions of this process, by file                         */

/* Every shared region this module made, by weak reference, with its file.
 * When one of them shrinks the file, the others of this process that map
 * pages past the new end lose those pages in the same call (or, if one of
 * them cannot, because a buffer or a call pins it, nothing happens): a
 * region of this process never keeps a page the file no longer has. */
typedef struct {
    PyObject *ref;   /* weak reference to the region, without callback */
    dev_t dev;
    ino_t ino;
} Member;

static Member *members = NULL;
static Py_ssize_t nmembers = 0, cap_members = 0;

/* The live region (borrowed) or NULL. The weak reference gives a strong
 * one (NULL or None once dead), dropped at once: that never frees it, since
 * the region was alive, so its owner holds it. PyWeakref_GetObject is gone
 * in 3.15; PyWeakref_GetRef is in the limited API from 3.13 only, before
 * that calling the reference does the same. */
static RegionObject *
member_region(Member *m)
{
    PyObject *o;

#if (defined(Py_LIMITED_API) ? Py_LIMITED_API + 0 : PY_VERSION_HEX) >= 0x030D0000
    if (PyWeakref_GetRef(m->ref, &o) < 0)
        o = NULL;
#else
    o = PyObject_CallNoArgs(m->ref);
#endif
    if (o == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(o);
    if (o == Py_None)
        return NULL;
    return ((RegionObject *)o)->data != NULL ? (RegionObject *)o : NULL;
}

/* Room for one more member, dropping the dead ones first (their weak
 * references have no callback: releasing them runs no Python code). */
static int
reserve_member(void)
{
    Py_ssize_t out = 0;

    for (Py_ssize_t i = 0; i < nmembers; i++) {
        if (member_region(&members[i]) != NULL)
            members[out++] = members[i];
        else
            Py_DECREF(members[i].ref);
    }
    nmembers = out;
    if (nmembers == cap_members) {
        Py_ssize_t cap = cap_members ? cap_members * 2 : 16;
        Member *m = PyMem_Realloc(members, (size_t)cap * sizeof(Member));
        if (m == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        members = m;
        cap_members = cap;
    }
    return 0;
}

/* Wrap a mapping of fd: the region owns both from here on (on failure, both
 * are released), and is a member. */
static PyObject *
wrap_shared(PyTypeObject *cls, char *p, int fd, Py_ssize_t size, Py_ssize_t capacity, int prot,
            Py_ssize_t page, Py_ssize_t align, int advice, PyObject *backing)
{
    MapSpec spec = {prot, MAP_SHARED, advice, 0, page, align, backing};
    PyObject *region, *ref;
    struct stat st;

    if (fstat(fd, &st) != 0) {
        int err = errno;
        munmap(p, (size_t)capacity);
        close(fd);
        return raise_step_error(err, "fstat");
    }
    if (reserve_member() < 0 || (region = region_wrap(cls, p, size, capacity, &spec, Py_None))
                                    == NULL) {
        munmap(p, (size_t)capacity);
        close(fd);
        return NULL;
    }
    ((RegionObject *)region)->fd = fd;
    /* every page is backed: unmapping a large one may take long (GIL released) */
    ((RegionObject *)region)->flags |= REGION_SHARED | REGION_OWNS_FD | REGION_COMMITTED;
    mapped_bytes += capacity;
    ref = PyWeakref_NewRef(region, NULL);
    if (ref == NULL) {
        Py_DECREF(region);   /* a fresh region: its deallocation unmaps and closes */
        return NULL;
    }
    members[nmembers].ref = ref;
    members[nmembers].dev = st.st_dev;
    members[nmembers].ino = st.st_ino;
    nmembers++;
    return region;
}

/* The other regions of this process that map the file of self past fend
 * (whole pages of it after the file is cut to fewer bytes): BufferError
 * unless each of them can lose those pages; 0 when they all can. */
static int
check_peers_can_shrink(RegionObject *self, Py_ssize_t fend)
{
    struct stat st;

    if (fstat(self->fd, &st) != 0) {
        raise_step_error(errno, "fstat");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nmembers; i++) {
        RegionObject *r = member_region(&members[i]);
        if (r == NULL || r == self || members[i].dev != st.st_dev || members[i].ino != st.st_ino)
            continue;
        if (round_up(fend, r->page) < r->capacity
            && region_check_idle(r, "cut the file short under another region of this process "
                                    "that maps it (it must lose those pages)") < 0)
            return -1;
    }
    return 0;
}

/* After the file was cut to tsize bytes: every other region of this process
 * on it loses the pages past the end (checked possible before), and its size
 * is at most the file's. */
static void
shrink_peers(RegionObject *self, Py_ssize_t tsize)
{
    struct stat st;

    if (fstat(self->fd, &st) != 0)
        return;
    for (Py_ssize_t i = 0; i < nmembers; i++) {
        RegionObject *r = member_region(&members[i]);
        if (r == NULL || r == self || members[i].dev != st.st_dev || members[i].ino != st.st_ino)
            continue;
        if (round_up(tsize, r->page) < r->capacity && tsize > 0)
            region_drop_tail(r, round_up(tsize, r->page));
        if (r->size > tsize && tsize > 0)
            r->size = tsize;
    }
}

/* _shared_create(cls, size, mfd_flags, name, seals, page, align, advice, backing)
 * A memfd of `size` bytes (whole pages for hugetlb), every page backed, sealed
 * with `seals`, mapped MAP_SHARED read/write at a multiple of align and
 * advised `advice` (MADV_HUGEPAGE: collapsed to huge pages where the kernel
 * can). */
static PyObject *
shared_create(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyTypeObject *cls;
    Py_ssize_t size, page, align, capacity, fsize;
    int mfd_flags, seals, advice, fd, err;
    const char *name;
    char *p;

    if (check_nargs("_shared_create", nargs, 9, 9) < 0 || arg_region_class(args[0], &cls) < 0
        || arg_ssize(args[1], "size", &size) < 0 || arg_int(args[2], &mfd_flags) < 0
        || arg_int(args[4], &seals) < 0 || arg_ssize(args[5], "page", &page) < 0
        || arg_ssize(args[6], "align", &align) < 0 || arg_int(args[7], &advice) < 0)
        return NULL;
    name = PyBytes_AsString(args[3]);   /* bytes: the name, encoded by the caller */
    if (name == NULL || check_granule(page, align) < 0)
        return NULL;
    if (size == 0) {
        PyErr_SetString(PyExc_ValueError, "size must be positive");
        return NULL;
    }
    if (size > PY_SSIZE_T_MAX - align)
        return raise_step_error(ENOMEM, "size");
    capacity = round_up(size, page);
    fsize = (mfd_flags & MFD_HUGETLB) ? capacity : size;

    fd = memfd_open(name, (unsigned int)mfd_flags);
    if (fd < 0)
        return raise_step_error(errno, "memfd_create");
    err = back_range(NULL, fd, 0, 0, fsize);
    if (err) {
        close(fd);
        return raise_step_error(err, "fallocate");
    }
    if (seals && fcntl(fd, F_ADD_SEALS, seals) != 0) {
        err = errno;
        close(fd);
        return raise_step_error(err, "F_ADD_SEALS");
    }
    p = map_aligned(capacity, align, (mfd_flags & MFD_HUGETLB) ? page : system_page, PROT_RW,
                    MAP_SHARED, fd, 0);   /* no MAP_POPULATE: quick at any size */
    if (p == MAP_FAILED) {
        err = errno;
        close(fd);
        return raise_step_error(err, "mmap");
    }
    if (advice) {
        if (madvise(p, (size_t)capacity, advice) != 0) {
            err = errno;
            munmap(p, (size_t)capacity);
            close(fd);
            return raise_step_error(err, "madvise");
        }
        if (advice == MADV_HUGEPAGE)
            collapse(NULL, p, capacity);
    }
    return wrap_shared(cls, p, fd, size, capacity, PROT_RW, page, align, advice, args[8]);
}

/* Whether fd is a memfd: F_GET_SEALS works (a file of shmem or hugetlbfs)
 * and no name leads to it (st_nlink 0), so no process can open it but
 * through a descriptor (a file of /dev/shm answers F_GET_SEALS too). -1 with
 * errno set. */
static int
check_memfd(int fd, int *seals, struct stat *st)
{
    *seals = fcntl(fd, F_GET_SEALS);
    if (*seals < 0 || fstat(fd, st) != 0)
        return -1;
    if (st->st_nlink != 0 || !S_ISREG(st->st_mode)) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}

/* _shared_attach(cls, fd, take, readonly, size_hint, align, advice, backing,
 * huge_backing) Map a memfd: fd itself when take (the region owns it from here on, even on
 * failure), else a duplicate (the caller keeps fd). readonly: through a new
 * O_RDONLY open of the file, so that the kernel refuses PROT_WRITE. The
 * region records huge_backing for a file of hugetlbfs (st_blksize: the huge
 * page size), else backing. */
static PyObject *
shared_attach(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyTypeObject *cls;
    Py_ssize_t hint, align, size, capacity, fsize, page, natural;
    int fd, take, readonly, advice, own, seals, err, prot;
    struct stat st;
    const char *step;
    char *p;

    if (check_nargs("_shared_attach", nargs, 9, 9) < 0 || arg_region_class(args[0], &cls) < 0
        || arg_int(args[1], &fd) < 0 || arg_int(args[2], &take) < 0
        || arg_int(args[3], &readonly) < 0 || arg_ssize(args[4], "size_hint", &hint) < 0
        || arg_ssize(args[5], "align", &align) < 0 || arg_int(args[6], &advice) < 0)
        return NULL;
    if (align < system_page || (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad alignment");
        return NULL;
    }
    if (fd < 0)
        return raise_step_error(EBADF, "fd");
    own = take ? fd : fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
        return raise_step_error(errno, "dup");
    step = "memfd";
    if (check_memfd(own, &seals, &st) != 0)
        goto fail;
    if (readonly) {
        char path[64];
        int ro;
        snprintf(path, sizeof path, "/proc/self/fd/%d", own);
        step = "open";
        ro = open(path, O_RDONLY | O_CLOEXEC);
        if (ro < 0)
            goto fail;
        close(own);
        own = ro;
    }
    else {
        int flags = fcntl(own, F_GETFL);
        step = "O_RDONLY";
        if (flags < 0)
            goto fail;
        if ((flags & O_ACCMODE) == O_RDONLY) {
            errno = EACCES;
            goto fail;
        }
        step = "F_SEAL_WRITE";
        if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) {
            errno = EPERM;
            goto fail;
        }
    }
    step = "fcntl";
    if (fcntl(own, F_SETFD, FD_CLOEXEC) != 0)   /* an inherited one may lack it */
        goto fail;
    step = "fstat";
    if (readonly && fstat(own, &st) != 0)   /* the same file: only to be sure */
        goto fail;
    fsize = (Py_ssize_t)st.st_size;
    page = (Py_ssize_t)st.st_blksize;
    if (page < system_page || (page & (page - 1)))
        page = system_page;
    step = "empty";
    if (fsize <= 0) {
        errno = EINVAL;
        goto fail;
    }
    step = "size";
    if (fsize > PY_SSIZE_T_MAX - (align > page ? align : page)) {
        errno = ENOMEM;
        goto fail;
    }
    capacity = round_up(fsize, page);
    size = hint > 0 && hint <= fsize ? hint : fsize;
    if (align < page)
        align = page;
    natural = page > system_page ? page : system_page;
    prot = readonly ? PROT_READ : PROT_RW;
    step = "mmap";
    p = map_aligned(capacity, align, natural, prot, MAP_SHARED, own, 0);   /* quick */
    if (p == MAP_FAILED)
        goto fail;
    if (advice && madvise(p, (size_t)capacity, advice) != 0)
        advice = 0;   /* best effort: the pages are the sender's anyway */
    return wrap_shared(cls, p, own, size, capacity, prot, page, align, advice,
                       page > system_page ? args[8] : args[7]);
fail:
    err = errno;
    close(own);
    return raise_step_error(err, step);
}

/* ------------------------------------------------------------------ */
/* resize, refresh                                                     */

/* The checks every change of the file makes: 0, or -1 with an exception. */
static int
file_state(RegionObject *self, Py_ssize_t *fsize, int *seals, int *writable)
{
    int err, flags;

    if (region_busy(self) > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot change the region: a system call on it is in progress");
        return -1;
    }
    err = file_size(self->fd, fsize);
    if (err) {
        raise_step_error(err, "fstat");
        return -1;
    }
    *seals = fcntl(self->fd, F_GET_SEALS);
    flags = fcntl(self->fd, F_GETFL);
    if (*seals < 0 || flags < 0) {
        raise_step_error(errno, "fcntl");
        return -1;
    }
    *writable = (flags & O_ACCMODE) != O_RDONLY;
    return 0;
}

/* _shared_resize(region, new_size): make the file new_size bytes (whole
 * pages for hugetlb) and the region new_size bytes, every new page backed
 * first. Nothing changes on failure, but for one case: when the file grew
 * and this process then cannot map the growth (no address space), the file
 * keeps its new size (refresh() maps it later). */
static PyObject *
shared_resize(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    RegionObject *self;
    Py_ssize_t new_size, newcap, tsize, fsize, cap;
    int seals, writable, err, reserved = 0, prot;

    if (check_nargs("_shared_resize", nargs, 2, 2) < 0
        || arg_ssize(args[1], "new_size", &new_size) < 0 || (self = shared_arg(args[0])) == NULL)
        return NULL;
    if (new_size == 0) {
        PyErr_SetString(PyExc_ValueError, "new_size must be positive");
        return NULL;
    }
    if (new_size > PY_SSIZE_T_MAX - (self->align > self->page ? self->align : self->page))
        return raise_step_error(ENOMEM, "size");
    if (file_state(self, &fsize, &seals, &writable) < 0)
        return NULL;
    cap = self->capacity;
    newcap = round_up(new_size, self->page);
    tsize = is_hugetlb(self) ? newcap : new_size;
    if (!writable)
        return raise_step_error(EACCES, "O_RDONLY");
    if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) && tsize != fsize)
        return raise_step_error(EPERM, "F_SEAL_WRITE");
    if (tsize < fsize && (seals & F_SEAL_SHRINK))
        return raise_step_error(EPERM, "F_SEAL_SHRINK");
    if (tsize > fsize && (seals & F_SEAL_GROW))
        return raise_step_error(EPERM, "F_SEAL_GROW");
    if ((tsize < fsize || newcap < cap) && region_check_idle(self, "shrink the region") < 0)
        return NULL;
    if (tsize < fsize && check_peers_can_shrink(self, tsize) < 0)
        return NULL;
    prot = self->rec.runs[self->rec.n - 1].prot;

    /* bytes past the end of the file in its last page may hold what was
     * written there: once the file grows over them they must read as zero */
    if (tsize > fsize) {
        Py_ssize_t lo = self->size > fsize ? self->size : fsize;
        Py_ssize_t hi = round_up(fsize, system_page);
        hi = hi < tsize ? hi : tsize;
        hi = hi < cap ? hi : cap;
        if (lo < hi && region_zero(self, lo, hi) < 0)
            return NULL;
    }
    /* pinned where it is: extend in place before the file grows, or change nothing */
    if (newcap > cap && (self->nexports > 0 || self->pins > 0)) {
        if (extend_in_place(self, newcap, prot) != 0) {
            PyErr_Format(PyExc_BufferError,
                         "cannot grow the region to %zd bytes: the pages after it are taken, "
                         "and %zd exported buffer(s) or %zd function(s) keep it where it is",
                         new_size, self->nexports, self->pins);
            return NULL;
        }
        reserved = 1;
    }
    if (tsize > fsize) {
        err = back_range(self, self->fd, 0, fsize, tsize - fsize);
        if (err) {
            if (reserved)
                munmap(self->data + cap, (size_t)(newcap - cap));
            return raise_step_error(err, "fallocate");
        }
    }
    else if (tsize < fsize) {
        /* nothing can touch the pages past the new end: idle, GIL held */
        if (ftruncate(self->fd, (off_t)tsize) != 0)
            return raise_step_error(errno, "ftruncate");
        shrink_peers(self, tsize);
    }
    if (newcap < cap && region_drop_tail(self, newcap) != 0)
        errno = 0;   /* the kernel keeps the pages (map count): they stay past size */
    if (newcap > cap && map_growth(self, newcap, reserved, prot, "map the grown file") < 0)
        return NULL;
    self->size = new_size;
    Py_RETURN_NONE;
}

/* _shared_refresh(region) -> int: map what another process did to the file's
 * size: its growth (in place, or moved when nothing pins the region), or,
 * without the shrink seal, its shrinking (the region must be idle). */
static PyObject *
shared_refresh(PyObject *module, PyObject *region)
{
    RegionObject *self = shared_arg(region);
    Py_ssize_t fsize, newcap;
    int seals, writable;

    if (self == NULL || file_state(self, &fsize, &seals, &writable) < 0)
        return NULL;
    if (fsize == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "the file is empty: another process truncated it (it was not sealed "
                        "against shrinking); close the region");
        return NULL;
    }
    if (fsize > PY_SSIZE_T_MAX - (self->align > self->page ? self->align : self->page))
        return raise_step_error(ENOMEM, "size");
    newcap = round_up(fsize, self->page);
    if (newcap > self->capacity) {
        if (map_growth(self, newcap, 0, self->rec.runs[self->rec.n - 1].prot,
                       "map the file's growth") < 0)
            return NULL;
    }
    else if (newcap < self->capacity) {
        if (region_check_idle(self, "unmap the pages the file lost") < 0)
            return NULL;
        if (region_drop_tail(self, newcap) != 0)
            return raise_step_error(errno, "munmap");
    }
    self->size = fsize;
    return PyLong_FromSsize_t(fsize);
}

/* ------------------------------------------------------------------ */
/* seals                                                               */

/* Map the file again over the region, in place, with prot_mask cleared from
 * every run, through fd. -1 with errno set (the region may then be half
 * remapped: the caller remaps again or records the truth). */
static int
remap_in_place(RegionObject *self, int fd, int prot_mask)
{
    int prot0 = self->rec.runs[0].prot & ~prot_mask;
    char *p = mmap(self->data, (size_t)self->capacity, prot0, MAP_SHARED | MAP_FIXED, fd, 0);

    if (p == MAP_FAILED)
        return -1;
    if (self->advice)   /* best effort, as when the pages were first mapped */
        madvise(self->data, (size_t)self->capacity, self->advice);
    return apply_record(self, self->data, self->capacity, prot0, prot_mask);
}

/* _shared_seal(region, seals): add F_SEAL_* seals. F_SEAL_WRITE needs every
 * shared mapping of the file to be unwritable (not only mprotected): this
 * region's mapping is made again, in place, through an O_RDONLY open of the
 * file, and the seal added; if the kernel refuses (another process maps it
 * writable: EBUSY), the writable mapping is put back. BufferError while a
 * writable buffer of the region is exported. */
static PyObject *
shared_seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    RegionObject *self;
    Py_ssize_t fsize;
    int add, seals, writable, ro, err;
    char path[64];

    if (check_nargs("_shared_seal", nargs, 2, 2) < 0 || arg_int(args[1], &add) < 0
        || (self = shared_arg(args[0])) == NULL || file_state(self, &fsize, &seals, &writable) < 0)
        return NULL;
    add &= ~seals;
    if (add == 0)
        Py_RETURN_NONE;
    if (seals & F_SEAL_SEAL)
        return raise_step_error(EPERM, "F_SEAL_SEAL");
    if (!(add & F_SEAL_WRITE) || !writable) {
        /* an O_RDONLY open maps nothing writable: nothing to remap */
        if (fcntl(self->fd, F_ADD_SEALS, add) != 0)
            return raise_step_error(errno, "F_ADD_SEALS");
        Py_RETURN_NONE;
    }
    for (Export *e = self->exports; e != NULL; e = e->next) {
        if (e->writable) {
            PyErr_Format(PyExc_BufferError,
                         "cannot seal the region against writing: it has %zd exported "
                         "buffer(s), some writable; release them first", self->nexports);
            return NULL;
        }
    }
    snprintf(path, sizeof path, "/proc/self/fd/%d", self->fd);
    ro = open(path, O_RDONLY | O_CLOEXEC);
    if (ro < 0)
        return raise_step_error(errno, "open");
    if (remap_in_place(self, ro, PROT_WRITE) != 0) {
        err = errno;
        close(ro);
        if (remap_in_place(self, self->fd, 0) != 0)
            goto record_readonly;
        return raise_step_error(err, "mmap");
    }
    close(ro);
    if (fcntl(self->fd, F_ADD_SEALS, add) != 0) {
        err = errno;
        if (remap_in_place(self, self->fd, 0) != 0)
            goto record_readonly;
        return raise_step_error(err, "F_ADD_SEALS");
    }
    for (Py_ssize_t i = 0; i < self->rec.n; i++)
        self->rec.runs[i].prot &= (unsigned char)~PROT_WRITE;
    rec_merge(&self->rec);
    Py_RETURN_NONE;

record_readonly:
    /* could not put the writable mapping back: the record says what is */
    err = errno;
    for (Py_ssize_t i = 0; i < self->rec.n; i++)
        self->rec.runs[i].prot &= (unsigned char)~PROT_WRITE;
    rec_merge(&self->rec);
    return raise_step_error(err, "mmap");
}

/* _shared_discard(region, offset=0, length=None): punch a hole in the file
 * (FALLOC_FL_PUNCH_HOLE): the pages go back to the kernel and read as zero
 * in every process that maps them. */
static PyObject *
shared_discard(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    RegionObject *self;
    PyObject *offset, *length;
    Py_ssize_t start, n, fsize = 0, fend;
    int err;

    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "_shared_discard() needs a region");
        return NULL;
    }
    if (convert_range_args(args + 1, nargs - 1, kwnames, 0, "discard", &offset, &length, NULL,
                           NULL) < 0)
        return NULL;
    self = shared_arg(args[0]);
    err = self == NULL || page_range(self, offset, length, &start, &n) < 0;
    Py_DECREF(offset);
    Py_DECREF(length);
    if (err)
        return NULL;
    if (self->pins > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot discard pages of the region: %zd function(s) made by "
                     "region.function() run code in it (pinned code keeps its contents)",
                     self->pins);
        return NULL;
    }
    if (is_hugetlb(self)) {
        PyErr_SetString(PyExc_ValueError,
                        "cannot discard pages of a hugetlb region: touching them again would "
                        "need free pages in the hugetlb pool, and an empty pool means SIGBUS");
        return NULL;
    }
    err = file_size(self->fd, &fsize);
    if (err)
        return raise_step_error(err, "fstat");
    fend = round_up(fsize, system_page);
    if (start + n > fend)
        n = fend - start;
    if (n <= 0)
        Py_RETURN_NONE;
    err = back_range(self, self->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, n);
    if (err)
        return raise_step_error(err, "fallocate");
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* the file descriptor                                                 */

static PyObject *
shared_fd(PyObject *module, PyObject *region)
{
    RegionObject *self = shared_arg(region);

    return self == NULL ? NULL : PyLong_FromLong(self->fd);
}

/* _shared_dup(region) -> int: a new descriptor (close-on-exec) of the file,
 * for the caller to own: what send() hands over, immune to the region being
 * closed meanwhile. */
static PyObject *
shared_dup(PyObject *module, PyObject *region)
{
    RegionObject *self = shared_arg(region);
    int fd;

    if (self == NULL)
        return NULL;
    fd = fcntl(self->fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return raise_step_error(errno, "dup");
    return PyLong_FromLong(fd);
}

static PyMethodDef shared_methods[] = {
    {"_shared_create", (PyCFunction)(void (*)(void))shared_create, METH_FASTCALL,
     "_shared_create(cls, size, mfd_flags, name, seals, page, align, advice, backing)\n"
     "A memfd region: every page backed, then mapped MAP_SHARED read/write."},
    {"_shared_attach", (PyCFunction)(void (*)(void))shared_attach, METH_FASTCALL,
     "_shared_attach(cls, fd, take, readonly, size_hint, align, advice, backing, huge_backing)\n"
     "Map a memfd (fd itself if take, else a duplicate)."},
    {"_shared_resize", (PyCFunction)(void (*)(void))shared_resize, METH_FASTCALL,
     "_shared_resize(region, new_size): resize the file and the mapping."},
    {"_shared_refresh", shared_refresh, METH_O,
     "_shared_refresh(region) -> int: map the file's size as it is now."},
    {"_shared_seal", (PyCFunction)(void (*)(void))shared_seal, METH_FASTCALL,
     "_shared_seal(region, seals): add F_SEAL_* seals (F_SEAL_WRITE remaps read-only)."},
    {"_shared_discard", (PyCFunction)(void (*)(void))shared_discard,
     METH_FASTCALL | METH_KEYWORDS,
     "_shared_discard(region, offset=0, length=None): punch a hole in the file."},
    {"_shared_fd", shared_fd, METH_O, "_shared_fd(region) -> int: the region's descriptor."},
    {"_shared_dup", shared_dup, METH_O,
     "_shared_dup(region) -> int: a new descriptor of the region's file, for the caller."},
    {NULL, NULL, 0, NULL},
};

int
shared_init(PyObject *module)
{
    if (PyModule_AddFunctions(module, shared_methods) < 0)
        return -1;
#define ADD(name) if (PyModule_AddIntConstant(module, #name, name) < 0) return -1
    ADD(MFD_CLOEXEC); ADD(MFD_ALLOW_SEALING); ADD(MFD_HUGETLB);
    ADD(F_SEAL_SEAL); ADD(F_SEAL_SHRINK); ADD(F_SEAL_GROW); ADD(F_SEAL_WRITE);
    ADD(F_SEAL_FUTURE_WRITE);
#undef ADD
    return 0;
}

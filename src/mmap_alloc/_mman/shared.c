/*
 * The shared extension of the mapping core: SharedRegion's kernel. A
 * SharedRegion is a Region whose mapping is MAP_SHARED of a memfd it owns
 * (m.fd, MAPPING_SHARED | MAPPING_OWNS_FD); this file holds what is the
 * file's: creation, attaching a descriptor, resize and refresh (through the
 * core's grow, move and shrink), seals, discarding pages, and the regions of
 * this process that map the same file (its peers: the core's registry).
 *
 * The rules that keep it free of SIGBUS:
 *   - every page is backed (fallocate) before it is mapped, so running out of
 *     memory is an error of the call that asked for it, never a fault later;
 *   - a page wholly beyond the end of the file is never part of the region
 *     (the file shrinks before the mapping only while nothing can touch it:
 *     no hold or call without the GIL on any region of this process that
 *     maps it, and the GIL held throughout);
 *   - sealed against shrinking (the default), no other process can truncate
 *     the file under us; without that seal (create(seal_shrink=False), a
 *     descriptor received with require_seal=False), the SIGBUS repair
 *     (repair.c) watches the mapping: pages past a new end read as zeros.
 *
 * Errors of system calls are OSError(errno, strerror, step) where step names
 * the call ("memfd_create", "fallocate", "mmap", ...): shared.py reads it to
 * word the message. The only GIL release is around fallocate of large
 * ranges and MADV_COLLAPSE, with the region marked busy, and everything that
 * depends on state another thread could change meanwhile is checked again
 * after (the file's size above all).
 */
#include "shared.h"

/* ------------------------------------------------------------------ */
/* helpers                                                             */

/* The region argument: an open shared region; NULL with an exception. */
RegionObject *
shared_arg(PyObject *o)
{
    RegionObject *self;

    if (!is_region(o) || !(((RegionObject *)o)->m.flags & MAPPING_SHARED)) {
        PyErr_SetString(PyExc_TypeError, "expected a shared region");
        return NULL;
    }
    self = (RegionObject *)o;
    if (region_check_open(self) < 0)
        return NULL;
    return self;
}

/* Allocate or punch file blocks (a punch gives pages back) without the GIL
 * for large ranges (m, if given, marked busy meanwhile); 0 or the errno. */
int
back_range(Mapping *m, int fd, int punch, Py_ssize_t offset, Py_ssize_t length)
{
    int err;

    if (length < SLOW_CALL_BYTES)
        return punch ? os_file_punch(fd, offset, length) : os_file_allocate(fd, offset, length);
    if (m != NULL && (err = mapping_busy_enter(m)) != 0)
        return err;
    Py_BEGIN_ALLOW_THREADS
    err = punch ? os_file_punch(fd, offset, length) : os_file_allocate(fd, offset, length);
    Py_END_ALLOW_THREADS
    if (m != NULL)
        mapping_busy_leave(m);
    return err;
}

int
file_size(int fd, Py_ssize_t *size)
{
    OsFileInfo info;
    int err = os_file_info(fd, &info);

    if (!err)
        *size = (Py_ssize_t)info.size;
    return err;
}

/* Wrap a mapping of fd: the region owns both from here on (on failure, both
 * are released), and joins the registry (its peers find it there). */
static PyObject *
wrap_shared(PyTypeObject *cls, char *p, int fd, Py_ssize_t size, Py_ssize_t capacity, int prot,
            Py_ssize_t page, Py_ssize_t align, int advice, PyObject *backing, int seals)
{
    MapSpec spec = {prot, MAP_SHARED, advice, 0, page, align, backing};
    RegionObject *region = (RegionObject *)region_wrap(cls, p, size, capacity, &spec, Py_None, fd);

    if (region == NULL) {
        os_unmap(p, (size_t)capacity);
        os_close(fd);
        return NULL;
    }
    /* every page is backed: unmapping a large one may take long (GIL released) */
    region->m.flags |= MAPPING_SHARED | MAPPING_OWNS_FD | MAPPING_COMMITTED;
    kernel.mapped_bytes += capacity;
    trace_mapped(p, capacity);
    if (mapping_register(&region->m) != 0) {   /* its peers find it there */
        Py_DECREF(region);   /* unmapped, the descriptor closed */
        return PyErr_NoMemory();
    }
    /* a file any holder may cut short: the SIGBUS repair watches it */
    if (!(seals & F_SEAL_SHRINK) && repair_publish(&region->m) < 0) {
        Py_DECREF(region);
        return NULL;
    }
    return (PyObject *)region;
}

static int
arg_region_class(PyObject *o, PyTypeObject **cls)
{
    if (!PyType_Check(o) || !PyType_IsSubtype((PyTypeObject *)o, kernel.region_type)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a subclass of Region");
        return -1;
    }
    *cls = (PyTypeObject *)o;
    return 0;
}

/* The checks every change of the file makes: 0, or -1 with an exception. */
int
file_state(RegionObject *self, Py_ssize_t *fsize, int *seals, int *writable)
{
    int err;

    if (mapping_busy(&self->m) > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot change the region: a system call on it is in progress");
        return -1;
    }
    if ((err = file_size(self->m.fd, fsize)) != 0)
        return raise_os_error(err, "fstat"), -1;
    if ((err = os_file_seals(self->m.fd, seals)) == EINVAL)
        *seals = err = 0;   /* a file system without seals (a file region's file) */
    if (err || (err = os_file_writable(self->m.fd, writable)) != 0)
        return raise_os_error(err, "fcntl"), -1;
    return 0;
}

/* ------------------------------------------------------------------ */
/* creation                                                            */

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
    const char *name, *call = "memfd_create";
    void *p;

    if (check_nargs("_shared_create", nargs, 9, 9) < 0 || arg_region_class(args[0], &cls) < 0
        || arg_ssize(args[1], "size", &size) < 0 || arg_int(args[2], "mfd_flags", &mfd_flags) < 0
        || arg_int(args[4], "seals", &seals) < 0 || arg_ssize(args[5], "page", &page) < 0
        || arg_ssize(args[6], "align", &align) < 0 || arg_int(args[7], "advice", &advice) < 0)
        return NULL;
    name = PyBytes_AsString(args[3]);   /* bytes: the name, encoded by the caller */
    if (name == NULL)
        return NULL;
    if (page < kernel.page || (page & (page - 1)) || align < page || (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad page size or alignment");
        return NULL;
    }
    if (size == 0) {
        PyErr_SetString(PyExc_ValueError, "size must be positive");
        return NULL;
    }
    if (size > PY_SSIZE_T_MAX - align)
        return raise_os_error(ENOMEM, "size");
    capacity = round_up(size, page);
    fsize = (mfd_flags & MFD_HUGETLB) ? capacity : size;
    if ((err = os_memfd(&fd, name, (unsigned int)mfd_flags)) != 0)
        return raise_os_error(err, call);
    call = "fallocate";
    err = back_range(NULL, fd, 0, 0, fsize);
    if (!err && seals) {
        call = "F_ADD_SEALS";
        err = os_file_add_seals(fd, seals);
    }
    if (!err) {
        call = "mmap";   /* no MAP_POPULATE: quick at any size */
        err = os_map_aligned(&p, (size_t)capacity, (size_t)align,
                             (size_t)((mfd_flags & MFD_HUGETLB) ? page : kernel.page), PROT_RW,
                             MAP_SHARED, fd, 0);
    }
    if (!err && advice) {
        call = "madvise";
        err = os_advise(p, (size_t)capacity, advice);
        if (err)
            os_unmap(p, (size_t)capacity);
        else if (advice == MADV_HUGEPAGE) {   /* best effort: khugepaged may do it later */
            Py_BEGIN_ALLOW_THREADS
            os_advise(p, (size_t)capacity, MADV_COLLAPSE);
            Py_END_ALLOW_THREADS
        }
    }
    if (err) {
        os_close(fd);
        return raise_os_error(err, call);
    }
    return wrap_shared(cls, p, fd, size, capacity, PROT_RW, page, align, advice, args[8], seals);
}

/* Whether fd is a memfd: F_GET_SEALS works (a file of shmem or hugetlbfs)
 * and no name leads to it (st_nlink 0), so no process can open it but
 * through a descriptor (a file of /dev/shm answers F_GET_SEALS too). 0 or
 * errno. */
static int
check_memfd(int fd, int *seals, OsFileInfo *info)
{
    int err = os_file_seals(fd, seals);

    if (!err)
        err = os_file_info(fd, info);
    if (!err && (info->nlink != 0 || !info->regular))
        err = EINVAL;
    return err;
}

/* Open fd's file for the region: read-only through a new O_RDONLY open (so
 * that the kernel refuses PROT_WRITE), or read/write on fd itself, which must
 * allow it. 0 or errno with *call the step. */
static int
open_for(int *own, int readonly, int seals, const char **call)
{
    int ro, writable, err;

    if (readonly) {
        *call = "open";
        if ((err = os_reopen_readonly(*own, &ro)) != 0)
            return err;
        os_close(*own);
        *own = ro;
        return 0;
    }
    *call = "O_RDONLY";
    if ((err = os_file_writable(*own, &writable)) != 0)
        return err;
    if (!writable)
        return EACCES;
    *call = "F_SEAL_WRITE";
    if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))
        return EPERM;
    return 0;
}

/* _shared_attach(cls, fd, take, readonly, size_hint, align, advice, backing,
 * huge_backing) Map a memfd: fd itself when take (the region owns it from
 * here on, even on failure), else a duplicate (the caller keeps fd).
 * readonly: through a new O_RDONLY open of the file, so that the kernel
 * refuses PROT_WRITE. The region records huge_backing for a file of
 * hugetlbfs (st_blksize: the huge page size), else backing. */
static PyObject *
shared_attach(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyTypeObject *cls;
    Py_ssize_t hint, align, size, capacity, fsize, page;
    int fd, take, readonly, advice, own, seals, err, prot;
    OsFileInfo info;
    const char *call = "dup";
    void *p;

    if (check_nargs("_shared_attach", nargs, 9, 9) < 0 || arg_region_class(args[0], &cls) < 0
        || arg_int(args[1], "fd", &fd) < 0 || arg_int(args[2], "take", &take) < 0
        || arg_int(args[3], "readonly", &readonly) < 0
        || arg_ssize(args[4], "size_hint", &hint) < 0 || arg_ssize(args[5], "align", &align) < 0
        || arg_int(args[6], "advice", &advice) < 0)
        return NULL;
    if (align < kernel.page || (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad alignment");
        return NULL;
    }
    if (fd < 0)
        return raise_os_error(EBADF, "fd");
    own = fd;
    if (!take && (err = os_dup(fd, &own)) != 0)
        return raise_os_error(err, call);
    call = "memfd";
    err = check_memfd(own, &seals, &info);
    if (!err)
        err = open_for(&own, readonly, seals, &call);
    if (!err) {
        call = "fcntl";   /* an inherited descriptor may lack close-on-exec */
        err = os_set_cloexec(own);
    }
    if (!err) {
        call = "fstat";   /* the same file: only to be sure */
        err = os_file_info(own, &info);
    }
    fsize = (Py_ssize_t)info.size;
    page = (Py_ssize_t)info.blksize;
    if (page < kernel.page || (page & (page - 1)))
        page = kernel.page;
    if (!err && fsize <= 0) {
        call = "empty";
        err = EINVAL;
    }
    if (!err && fsize > PY_SSIZE_T_MAX - (align > page ? align : page)) {
        call = "size";
        err = ENOMEM;
    }
    if (err) {
        os_close(own);
        return raise_os_error(err, call);
    }
    capacity = round_up(fsize, page);
    size = hint > 0 && hint <= fsize ? hint : fsize;
    if (align < page)
        align = page;
    prot = readonly ? PROT_READ : PROT_RW;
    err = os_map_aligned(&p, (size_t)capacity, (size_t)align,
                         (size_t)(page > kernel.page ? page : kernel.page), prot, MAP_SHARED, own,
                         0);
    if (err) {
        os_close(own);
        return raise_os_error(err, "mmap");
    }
    if (advice && os_advise(p, (size_t)capacity, advice) != 0)
        advice = 0;   /* best effort: the pages are the sender's anyway */
    return wrap_shared(cls, p, own, size, capacity, prot, page, align, advice,
                       page > kernel.page ? args[8] : args[7], seals);
}

/* ------------------------------------------------------------------ */
/* seals                                                               */

/* Map the file again over the region, in place, with prot_mask cleared from
 * every run, through fd; 0 or errno (the region may then be half remapped:
 * the caller remaps again or records the truth). */
static int
remap_in_place(RegionObject *self, int fd, int prot_mask)
{
    Mapping *m = &self->m;
    int prot0 = m->rec.runs[0].prot & ~prot_mask;
    void *p;
    int err = os_map(&p, m->data, (size_t)m->capacity, prot0, MAP_SHARED | MAP_FIXED, fd, 0);

    if (err)
        return err;
    if (m->advice)   /* best effort, as when the pages were first mapped */
        os_advise(m->data, (size_t)m->capacity, m->advice);
    return mapping_apply_record(m, m->data, m->capacity, prot0, prot_mask);
}

/* The record says WRITE is gone from every page (it is, in the kernel). */
static void
record_readonly(Mapping *m)
{
    for (Py_ssize_t i = 0; i < m->rec.n; i++)
        m->rec.runs[i].prot &= (unsigned char)~PROT_WRITE;
    rec_merge(&m->rec);
}

/* The end of a seal against writing: the file was mapped again over the
 * whole region, so no page is repaired any more (repair.c). */
static PyObject *
sealed(RegionObject *self, PyObject *result)
{
    if (self->m.flags & MAPPING_REPAIRABLE) {
        repair_remapped(&self->m);
        repair_unlock(&self->m);
    }
    return result;
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

    if (check_nargs("_shared_seal", nargs, 2, 2) < 0 || arg_int(args[1], "seals", &add) < 0
        || (self = shared_arg(args[0])) == NULL || file_state(self, &fsize, &seals, &writable) < 0)
        return NULL;
    add &= ~seals;
    if (add == 0)
        Py_RETURN_NONE;
    if (seals & F_SEAL_SEAL)
        return raise_os_error(EPERM, "F_SEAL_SEAL");
    if (!(add & F_SEAL_WRITE) || !writable) {
        /* an O_RDONLY open maps nothing writable: nothing to remap */
        if ((err = os_file_add_seals(self->m.fd, add)) != 0)
            return raise_os_error(err, "F_ADD_SEALS");
        Py_RETURN_NONE;
    }
    if (mapping_conflicts(&self->m, 0, self->m.capacity, PROT_READ) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot seal the region against writing: it has %zd exported "
                     "buffer(s), some writable; release them first", mapping_exports(&self->m));
        return NULL;
    }
    if ((err = os_reopen_readonly(self->m.fd, &ro)) != 0)
        return raise_os_error(err, "open");
    if (self->m.flags & MAPPING_REPAIRABLE)   /* the whole file is mapped again: no repair left */
        repair_lock(&self->m);
    err = remap_in_place(self, ro, PROT_WRITE);
    os_close(ro);
    if (!err && (err = os_file_add_seals(self->m.fd, add)) == 0) {
        record_readonly(&self->m);
        return sealed(self, Py_NewRef(Py_None));
    }
    if (remap_in_place(self, self->m.fd, 0) != 0) {
        /* could not put the writable mapping back: the record says what is */
        record_readonly(&self->m);
        return sealed(self, raise_os_error(err, "mmap"));
    }
    return sealed(self, raise_os_error(err, "F_ADD_SEALS"));
}

/* ------------------------------------------------------------------ */
/* the file descriptor                                                 */

static PyObject *
shared_fd(PyObject *module, PyObject *region)
{
    RegionObject *self = shared_arg(region);

    return self == NULL ? NULL : PyLong_FromLong(self->m.fd);
}

/* _shared_dup(region) -> int: a new descriptor (close-on-exec) of the file,
 * for the caller to own: what send() hands over, immune to the region being
 * closed meanwhile. */
static PyObject *
shared_dup(PyObject *module, PyObject *region)
{
    RegionObject *self = shared_arg(region);
    int fd, err;

    if (self == NULL)
        return NULL;
    if ((err = os_dup(self->m.fd, &fd)) != 0)
        return raise_os_error(err, "dup");
    return PyLong_FromLong(fd);
}

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(shared_create)
LOCKED_FAST(shared_attach)
LOCKED_FAST(shared_resize)
LOCKED_FAST(shared_seal)
LOCKED_FASTKW(shared_discard)
LOCKED_O(shared_refresh)
LOCKED_O(shared_fd)
LOCKED_O(shared_dup)

static PyMethodDef shared_methods[] = {
    METHOD_FAST("_shared_create", shared_create,
        "_shared_create(cls, size, mfd_flags, name, seals, page, align, advice, backing)\n"
        "A memfd region: every page backed, then mapped MAP_SHARED read/write."),
    METHOD_FAST("_shared_attach", shared_attach,
        "_shared_attach(cls, fd, take, readonly, size_hint, align, advice, backing, huge_backing)\n"
        "Map a memfd (fd itself if take, else a duplicate)."),
    METHOD_FAST("_shared_resize", shared_resize,
        "_shared_resize(region, new_size): resize the file and the mapping."),
    METHOD_O("_shared_refresh", shared_refresh,
        "_shared_refresh(region) -> int: map the file's size as it is now."),
    METHOD_FAST("_shared_seal", shared_seal,
        "_shared_seal(region, seals): add F_SEAL_* seals (F_SEAL_WRITE remaps read-only)."),
    METHOD_FASTKW("_shared_discard", shared_discard,
        "_shared_discard(region, offset=0, length=None): punch a hole in the file."),
    METHOD_O("_shared_fd", shared_fd, "_shared_fd(region) -> int: the region's descriptor."),
    METHOD_O("_shared_dup", shared_dup,
        "_shared_dup(region) -> int: a new descriptor of the region's file, for the caller."),
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

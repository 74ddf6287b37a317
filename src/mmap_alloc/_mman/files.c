/*
 * The file extension of the mapping core: FileRegion's kernel. A file region
 * is a Region whose mapping is of a file the Python side opened (files.py):
 * m.fd, owned and closed with it; m.x->offset, where the mapping starts in the
 * file. Modes "r", "r+" and "w+" map it MAP_SHARED (MAPPING_SHARED: writes
 * reach the file), "c" MAP_PRIVATE (copy-on-write: they stay here).
 *
 * Any process may truncate a file, so every file region is published to the
 * SIGBUS repair (repair.c) before it is returned: a touch past the file's
 * new end, through any exporter, reads zeros instead of killing the
 * process, and the region's own methods raise FileTruncatedError for those
 * pages until refresh() maps the file again. Resizing is the shared
 * region's (shared_size.c: the file first, every new page allocated, then
 * the mapping, through resize.c), and so is refresh, the file's size as it
 * is now (file_refresh_region, for file regions and for shared regions the
 * repair watches).
 *
 * Errors of system calls are OSError(errno, strerror, step), step naming
 * the call ("mmap", "msync", ...) or the check ("regular", "offset"):
 * files.py words the message.
 */
#include "shared.h"

/* The region argument: an open region of a file the repair watches. */
static RegionObject *
file_arg(PyObject *o)
{
    RegionObject *self;

    if (!is_region(o)) {
        PyErr_SetString(PyExc_TypeError, "expected a file region");
        return NULL;
    }
    self = (RegionObject *)o;
    if (region_check_open(self) < 0)
        return NULL;
    if (!(self->m.flags & MAPPING_REPAIRABLE)) {
        PyErr_SetString(PyExc_TypeError, "expected a file region");
        return NULL;
    }
    return self;
}

/* Make own (fd, or a duplicate of it) ready to map: close-on-exec, a regular
 * file whose pages of *page bytes offset starts on. 0, or errno with *call
 * the step. */
static int
check_file(int own, Py_ssize_t offset, size_t *page, const char **call)
{
    OsFileInfo info;
    int err;

    *call = "fcntl";   /* a descriptor the caller opened may be inheritable */
    if ((err = os_set_cloexec(own)) != 0)
        return err;
    *call = "fstat";
    if ((err = os_file_info(own, &info)) != 0)
        return err;
    *call = "regular";
    if (!info.regular)
        return ENODEV;
    *call = "fstatfs";
    if ((err = os_file_page(own, page)) != 0)
        return err;
    *call = "offset";
    return offset % (Py_ssize_t)*page ? EINVAL : 0;
}

/* _file_map(cls, fd, take, prot, shared, offset, length, backing, huge_backing)
 * Map length bytes of fd's file from offset (a multiple of its page) with
 * prot, MAP_SHARED or MAP_PRIVATE: fd itself when take (the region owns it
 * from here on, even on failure), else a duplicate (the caller keeps fd).
 * The region records huge_backing for a file of hugetlbfs, else backing. */
static PyObject *
file_map(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyTypeObject *cls;
    Py_ssize_t offset, length, capacity;
    int fd, take, prot, shared, own, err;
    const char *call = "dup";
    size_t page = (size_t)kernel.page;
    RegionObject *region;
    MapSpec spec;
    void *p;

    if (check_nargs("_file_map", nargs, 9, 9) < 0 || arg_int(args[1], "fd", &fd) < 0
        || arg_int(args[2], "take", &take) < 0 || arg_int(args[3], "prot", &prot) < 0
        || arg_int(args[4], "shared", &shared) < 0 || arg_ssize(args[5], "offset", &offset) < 0
        || arg_ssize(args[6], "length", &length) < 0)
        return NULL;
    if (!PyType_Check(args[0]) || !PyType_IsSubtype((PyTypeObject *)args[0], kernel.region_type)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a subclass of Region");
        return NULL;
    }
    cls = (PyTypeObject *)args[0];
    if (fd < 0)
        return raise_os_error(EBADF, "fd");
    own = fd;
    if (!take && (err = os_dup(fd, &own)) != 0)
        return raise_os_error(err, call);
    err = check_file(own, offset, &page, &call);
    if (!err && (length == 0 || length > PY_SSIZE_T_MAX - (Py_ssize_t)page)) {
        call = "length";
        err = EINVAL;
    }
    if (!err) {
        call = "mmap";
        capacity = round_up(length, (Py_ssize_t)page);
        err = os_map(&p, NULL, (size_t)capacity, prot, shared ? MAP_SHARED : MAP_PRIVATE, own,
                     (off_t)offset);
    }
    if (err) {
        os_close(own);
        return raise_os_error(err, call);
    }
    spec = (MapSpec){prot, shared ? MAP_SHARED : MAP_PRIVATE, 0, 0, (Py_ssize_t)page,
                     (Py_ssize_t)page, page > (size_t)kernel.page ? args[8] : args[7]};
    region = (RegionObject *)region_wrap(cls, p, length, capacity, &spec, Py_None, own);
    if (region == NULL) {
        os_unmap(p, (size_t)capacity);
        os_close(own);
        return NULL;
    }
    /* pages of a file in the page cache: unmapping a large mapping may take
     * long; they are the file's, not the process's memory (no tracemalloc) */
    region->m.flags |= MAPPING_OWNS_FD | MAPPING_COMMITTED | MAPPING_UNTRACED
                       | (shared ? MAPPING_SHARED : 0);
    kernel.mapped_bytes += capacity;
    if (mapping_extra(&region->m) == NULL) {   /* the offset's place */
        Py_DECREF(region);   /* unmaps and closes own */
        return NULL;
    }
    region->m.x->offset = offset;
    if (repair_publish(&region->m) < 0) {
        Py_DECREF(region);   /* unmaps and closes own */
        return NULL;
    }
    return (PyObject *)region;
}

/* _file_flush(region, offset=0, length=None): sync the whole pages (MS_SYNC)
 * of the range (nothing for a private mapping: its writes stay here), the
 * GIL released for large ranges; FileTruncatedError for repaired pages,
 * whose writes reached no file. */
static PyObject *
file_flush(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    RegionObject *self;
    Py_ssize_t start, n;
    int err;

    self = region_range_arg(args, nargs, kwnames, "_file_flush", "flush", file_arg, &start, &n);
    if (self == NULL || mapping_check_truncated(&self->m, start, start + n) < 0)
        return NULL;
    if (n == 0 || !(self->m.flags & MAPPING_SHARED))
        Py_RETURN_NONE;
    if (n < SLOW_CALL_BYTES)
        err = os_sync(self->m.data + start, (size_t)n, 0);
    else {
        if ((err = mapping_busy_enter(&self->m)) != 0)   /* no close or move meanwhile */
            return raise_os_error(err, "msync");
        Py_BEGIN_ALLOW_THREADS
        err = os_sync(self->m.data + start, (size_t)n, 0);
        Py_END_ALLOW_THREADS
        mapping_busy_leave(&self->m);
    }
    if (err)
        return raise_os_error(err, "msync");
    Py_RETURN_NONE;
}

/* _file_refresh(region, limit) -> int: the region's size from the file's
 * now (at most limit bytes, unless limit is -1): growth mapped (in place, or
 * moved when nothing holds the region), pages the file lost unmapped when
 * nothing holds them (else they stay, past the size), and the file mapped
 * again over repaired pages it holds now. */
static PyObject *
file_refresh(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    RegionObject *self;
    Py_ssize_t limit;

    if (check_nargs("_file_refresh", nargs, 2, 2) < 0)
        return NULL;
    if (args[1] == Py_None)
        limit = -1;
    else if (arg_ssize(args[1], "limit", &limit) < 0)
        return NULL;
    if ((self = file_arg(args[0])) == NULL)
        return NULL;
    return file_refresh_region(self, limit);
}

/* _file_repaired(region) -> int: the offset of the first page repaired since
 * the last refresh, or -1. */
static PyObject *
file_repaired(PyObject *module, PyObject *region)
{
    RegionObject *self = file_arg(region);

    return self == NULL ? NULL : PyLong_FromSsize_t(repair_first(&self->m));
}

/* _file_page(fd) -> int: the page a mapping of fd's file is made of. */
static PyObject *
file_page(PyObject *module, PyObject *arg)
{
    size_t page;
    int fd, err;

    if (arg_int(arg, "fd", &fd) < 0)
        return NULL;
    if ((err = os_file_page(fd, &page)) != 0)
        return raise_os_error(err, "fstatfs");
    return PyLong_FromSize_t(page);
}

/* _file_fd(region) -> int: the region's descriptor. */
static PyObject *
file_fd(PyObject *module, PyObject *region)
{
    RegionObject *self = file_arg(region);

    return self == NULL ? NULL : PyLong_FromLong(self->m.fd);
}

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(file_map)
LOCKED_FASTKW(file_flush)
LOCKED_FAST(shared_resize)
LOCKED_FAST(file_refresh)
LOCKED_O(file_repaired)
LOCKED_O(file_page)
LOCKED_O(file_fd)

static PyMethodDef file_methods[] = {
    METHOD_FAST("_file_map", file_map,
        "_file_map(cls, fd, take, prot, shared, offset, length, backing, huge_backing)\n"
        "Map part of a file (fd itself if take, else a duplicate); the SIGBUS repair watches it."),
    METHOD_FASTKW("_file_flush", file_flush,
        "_file_flush(region, offset=0, length=None): msync the pages of the range."),
    METHOD_FAST("_file_resize", shared_resize,
        "_file_resize(region, new_size): the file ends where the region does, new pages backed."),
    METHOD_FAST("_file_refresh", file_refresh,
        "_file_refresh(region, limit) -> int: map the file's size as it is now."),
    METHOD_O("_file_repaired", file_repaired,
        "_file_repaired(region) -> int: the first page repaired since the last refresh, or -1."),
    METHOD_O("_file_page", file_page,
        "_file_page(fd) -> int: the page size of mappings of fd's file."),
    METHOD_O("_file_fd", file_fd, "_file_fd(region) -> int: the region's descriptor."),
    {NULL, NULL, 0, NULL},
};

int
files_init(PyObject *module)
{
    return PyModule_AddFunctions(module, file_methods);
}

/*
 * The module: its types, constants, plain functions, and the one fork hook.
 */
#include "mman.h"

#include <dlfcn.h>
#include <pthread.h>

/* _register_errors(AllocError, CannotReallocInPlace[, FileTruncatedError]):
 * the types C raises */
static PyObject *
mman_register_errors(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("_register_errors", nargs, 2, 3) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (!PyType_Check(args[i]) && !(i == 2 && args[i] == Py_None)) {
            PyErr_SetString(PyExc_TypeError, "_register_errors() takes exception types");
            return NULL;
        }
    REPLACE_REF(kernel.alloc_error, Py_NewRef(args[0]));
    REPLACE_REF(kernel.cannot_realloc, Py_NewRef(args[1]));
    if (nargs > 2 && args[2] != Py_None)
        REPLACE_REF(kernel.file_truncated, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* module functions                                                    */

static PyObject *
mman_page_size(PyObject *module, PyObject *unused)
{
    return PyLong_FromSsize_t(kernel.page);
}

static PyObject *
mman_mapped_bytes(PyObject *module, PyObject *unused)
{
    if (kernel.ngraves)
        flush_graveyard();
    return PyLong_FromSsize_t(kernel.mapped_bytes);
}

/* mapping_count() -> int: the mappings of the process, read without heap
 * memory (it is asked at vm.max_map_count) */
static PyObject *
mman_mapping_count(PyObject *module, PyObject *unused)
{
    long count;
    int error = os_mapping_count(&count);

    if (error)
        return raise_os_error(error, "read(/proc/self/maps)");
    return PyLong_FromLong(count);
}

/* residency(address, length) -> bytes: which pages of any range are in memory
 * (mincore; no memory is touched) */
static PyObject *
mman_mincore(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    void *p;
    Py_ssize_t length, npages;
    PyObject *vec;
    int err;

    if (check_nargs("residency", nargs, 2, 2) < 0 || arg_address(args[0], &p) < 0
        || arg_ssize(args[1], "length", &length) < 0)
        return NULL;
    npages = (length + kernel.page - 1) / kernel.page;
    vec = PyBytes_FromStringAndSize(NULL, npages);
    if (vec == NULL || npages == 0)
        return vec;
    Py_BEGIN_ALLOW_THREADS
    err = os_residency(p, (size_t)length, (unsigned char *)PyBytes_AsString(vec));
    Py_END_ALLOW_THREADS
    if (err) {
        Py_DECREF(vec);
        return raise_os_error(err, "mincore");
    }
    return vec;
}

/* sync_core(): make code changes visible to instruction fetch on every thread
 * of the process (membarrier SYNC_CORE where the architecture needs it). */
static PyObject *
mman_sync_core(PyObject *module, PyObject *unused)
{
    int err = os_sync_core();

    if (err)
        return raise_os_error(err, "membarrier");
    Py_RETURN_NONE;
}

/* secret_memory_fd(flags) -> fd: a file of secret memory (pages removed
 * from the kernel's direct map); OSError (ENOSYS: kernel without it) */
static PyObject *
mman_secret_memory_fd(PyObject *module, PyObject *arg)
{
    int flags, fd, err;

    if (arg_int(arg, "flags", &flags) < 0)
        return NULL;
    err = os_memfd_secret(&fd, (unsigned int)flags);
    if (err)
        return raise_os_error(err, "memfd_secret");
    return PyLong_FromLong(fd);
}

PyObject *view_exported(PyObject *module, PyObject *arg);

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(mman_mincore)
LOCKED_FAST(mman_register_errors)
LOCKED_O(mman_page_size)
LOCKED_O(mman_mapped_bytes)
LOCKED_O(mman_mapping_count)
LOCKED_O(mman_secret_memory_fd)
LOCKED_O(mman_sync_core)
LOCKED_O(view_exported)

static PyMethodDef mman_methods[] = {
    METHOD_NOARGS("page_size", mman_page_size,
        "page_size($module, /)\n--\n\nThe kernel's base page size."),
    METHOD_NOARGS("mapped_bytes", mman_mapped_bytes,
        "mapped_bytes($module, /)\n--\n\nBytes this module has mapped and not unmapped yet."),
    METHOD_NOARGS("mapping_count", mman_mapping_count,
        "mapping_count($module, /)\n--\n\nHow many mappings the process holds (/proc/self/maps)."),
    METHOD_FAST("residency", mman_mincore,
        "residency($module, address, length, /)\n--\n\nOne byte per page; bit 0: resident."),
    METHOD_O("secret_memory_fd", mman_secret_memory_fd,
        "secret_memory_fd($module, flags, /)\n--\n\n"
        "A file descriptor of secret memory (Linux 5.14)."),
    METHOD_NOARGS("sync_core", mman_sync_core,
        "sync_core($module, /)\n--\n\nSerialise instruction fetch on every thread (arm64)."),
    METHOD_O("_view_exported", view_exported,
        "_view_exported($module, view, /)\n--\n\n"
        "Whether a buffer of the View is alive after its memoryview was released."),
    METHOD_FAST("_register_errors", mman_register_errors,
        "_register_errors($module, alloc_error, cannot_realloc, file_truncated=None, /)\n--\n\n"
        "The exception types the C layer raises."),
    {NULL, NULL, 0, NULL},
};

static int
add_constants(PyObject *m)
{
#define ADD(name) if (PyModule_AddIntConstant(m, #name, name) < 0) return -1
    ADD(PROT_NONE); ADD(PROT_READ); ADD(PROT_WRITE); ADD(PROT_EXEC);
    ADD(MAP_NORESERVE); ADD(MAP_POPULATE); ADD(MAP_HUGETLB); ADD(MAP_HUGE_SHIFT);
    ADD(MADV_NORMAL); ADD(MADV_RANDOM); ADD(MADV_SEQUENTIAL); ADD(MADV_WILLNEED);
    ADD(MADV_DONTNEED); ADD(MADV_FREE); ADD(MADV_COLD); ADD(MADV_PAGEOUT);
    ADD(MADV_HUGEPAGE); ADD(MADV_NOHUGEPAGE); ADD(MADV_COLLAPSE);
    ADD(MADV_DONTFORK); ADD(MADV_DOFORK); ADD(MADV_DONTDUMP); ADD(MADV_DODUMP);
    ADD(MADV_WIPEONFORK); ADD(MADV_KEEPONFORK);
    ADD(MADV_POPULATE_READ); ADD(MADV_POPULATE_WRITE);
    ADD(MADV_GUARD_INSTALL); ADD(MADV_GUARD_REMOVE);
#undef ADD
    if (PyModule_AddIntConstant(m, "TRACE_DOMAIN", (long)TRACE_DOMAIN) < 0)
        return -1;
    return 0;
}

/* Every type of the module, in kernel state: (field, spec, name). */
#define TYPES(X)                                         \
    X(region_type, region_spec, "Region")                \
    X(pin_type, pin_spec, "Pin")                         \
    X(view_type, view_spec, "View")                      \
    X(iter_type, iter_spec, "RegionIterator")            \
    X(pool_type, pool_spec, "Pool")                      \
    X(allocator_type, allocator_spec, "Allocator")

static int
mman_exec(PyObject *m)
{
    static int atfork_registered = 0;

    kernel.page = (Py_ssize_t)os_page_size();
#ifdef Py_GIL_DISABLED
    if (kernel.lock == NULL
        && (kernel.lock = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type)) == NULL)
        return -1;
#endif
    /* tracemalloc's C API is outside the limited API: found by name, and
     * nothing is reported where the interpreter lacks it */
    *(void **)&kernel.trace_track = dlsym(RTLD_DEFAULT, "PyTraceMalloc_Track");
    *(void **)&kernel.trace_untrack = dlsym(RTLD_DEFAULT, "PyTraceMalloc_Untrack");
    if (!atfork_registered) {
        /* the one fork hook: unmaps under way without the GIL end first;
         * in the child, counts held by threads that do not exist there are
         * stale (busy counts compare their generation), and pages advised
         * MADV_DONTFORK are mapped again (mapping.c) */
        if (pthread_atfork(before_fork, NULL, after_fork_in_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return -1;
        }
        atfork_registered = 1;
    }
#define MAKE(field, spec, name)                                                           \
    REPLACE_REF(kernel.field, (PyTypeObject *)PyType_FromModuleAndSpec(m, &spec, NULL));  \
    if (kernel.field == NULL || PyModule_AddObjectRef(m, name, (PyObject *)kernel.field) < 0) \
        return -1;
    TYPES(MAKE)
#undef MAKE
    if (secret_init(m) < 0 || shared_init(m) < 0 || codeheap_init(m) < 0 || files_init(m) < 0
        || repair_init(m) < 0)
        return -1;
    return add_constants(m);
}

/* The module holds the kernel's objects for the GC: the types, and the
 * exception types registered by exceptions.py. */
static int
mman_traverse(PyObject *m, visitproc visit, void *arg)
{
#define VISIT(field, spec, name) Py_VISIT(kernel.field);
    TYPES(VISIT)
#undef VISIT
    Py_VISIT(kernel.secret_type);
    Py_VISIT(kernel.opening_type);
    Py_VISIT(kernel.heap_type);
    Py_VISIT(kernel.block_type);
    Py_VISIT(kernel.alloc_error);
    Py_VISIT(kernel.cannot_realloc);
    Py_VISIT(kernel.memory_corruption);
    Py_VISIT(kernel.lock);
    Py_VISIT(kernel.file_truncated);
    return 0;
}

static void
mman_free(void *module)
{
    region_free_spares();
}

static PyModuleDef_Slot mman_slots[] = {
    {Py_mod_exec, mman_exec},
#ifdef Py_GIL_DISABLED
    /* every entry point runs under the kernel lock (kernel_lock.h) */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef mman_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmap_alloc._mman",
    .m_doc = "The safety kernel of mmap_alloc: mappings, page protections, exports, "
             "pins and pool slabs (private to mmap_alloc).",
    .m_size = 0,
    .m_methods = mman_methods,
    .m_slots = mman_slots,
    .m_traverse = mman_traverse,
    .m_free = mman_free,
};

PyMODINIT_FUNC
PyInit__mman(void)
{
    return PyModuleDef_Init(&mman_module);
}

/*
 * The module: its types, constants and plain functions, and the fork hook.
 */
#include "mman.h"

#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>

/* _register_errors(AllocError, CannotReallocInPlace): the types C raises */
static PyObject *
mman_register_errors(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("_register_errors", nargs, 2, 2) < 0)
        return NULL;
    if (!PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_register_errors() takes two exception types");
        return NULL;
    }
    Py_XDECREF(AllocError_Type);
    AllocError_Type = Py_NewRef(args[0]);
    Py_XDECREF(CannotReallocInPlace_Type);
    CannotReallocInPlace_Type = Py_NewRef(args[1]);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* module functions                                                    */

static PyObject *
mman_page_size(PyObject *module, PyObject *unused)
{
    return PyLong_FromSsize_t(system_page);
}

static PyObject *
mman_mapped_bytes(PyObject *module, PyObject *unused)
{
    if (ngraves)
        flush_graveyard();
    return PyLong_FromSsize_t(mapped_bytes);
}

/* mincore(address, length) -> bytes: residency of any range (no memory is touched) */
static PyObject *
mman_mincore(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    void *p;
    Py_ssize_t length, npages;
    PyObject *vec;
    int rc;

    if (check_nargs("mincore", nargs, 2, 2) < 0 || arg_address(args[0], &p) < 0
        || arg_ssize(args[1], "length", &length) < 0)
        return NULL;
    npages = (length + system_page - 1) / system_page;
    vec = PyBytes_FromStringAndSize(NULL, npages);
    if (vec == NULL || npages == 0)
        return vec;
    Py_BEGIN_ALLOW_THREADS
    rc = mincore(p, (size_t)length, (unsigned char *)PyBytes_AsString(vec));
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_DECREF(vec);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return vec;
}

/* sync_core(): make code changes visible to instruction fetch on every thread
 * of the process (membarrier SYNC_CORE where the architecture needs it). */
static int sync_core_registered = 0;

static PyObject *
mman_sync_core(PyObject *module, PyObject *unused)
{
#if defined(__aarch64__) || defined(__arm__) || defined(__riscv)
    /* MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE = 32, its registration 64 */
    if (!sync_core_registered) {
        if (syscall(SYS_membarrier, 64, 0, 0) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        sync_core_registered = 1;
    }
    if (syscall(SYS_membarrier, 32, 0, 0) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
#else
    (void)sync_core_registered;   /* x86: instruction fetch is coherent */
#endif
    Py_RETURN_NONE;
}

/* memfd_secret(flags) -> fd: a file of secret memory (pages removed from the
 * kernel's direct map); OSError (ENOSYS: kernel without it) */
static PyObject *
mman_memfd_secret(PyObject *module, PyObject *arg)
{
    int flags;
    long fd;

    if (arg_int(arg, &flags) < 0)
        return NULL;
#ifdef SYS_memfd_secret
    fd = syscall(SYS_memfd_secret, (unsigned int)flags);
#else
    fd = syscall(447, (unsigned int)flags);
#endif
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyMethodDef mman_methods[] = {
    {"page_size", mman_page_size, METH_NOARGS,
     "page_size($module, /)\n--\n\nThe kernel's base page size."},
    {"mapped_bytes", mman_mapped_bytes, METH_NOARGS,
     "mapped_bytes($module, /)\n--\n\nBytes this module has mapped and not unmapped yet."},
    {"mincore", (PyCFunction)(void (*)(void))mman_mincore, METH_FASTCALL,
     "mincore($module, address, length, /)\n--\n\nOne byte per page; bit 0: resident."},
    {"memfd_secret", mman_memfd_secret, METH_O,
     "memfd_secret($module, flags, /)\n--\n\nA file descriptor of secret memory (Linux 5.14)."},
    {"sync_core", mman_sync_core, METH_NOARGS,
     "sync_core($module, /)\n--\n\nSerialise instruction fetch on every thread (arm64)."},
    {"_register_errors", (PyCFunction)(void (*)(void))mman_register_errors, METH_FASTCALL,
     "_register_errors($module, alloc_error, cannot_realloc, /)\n--\n\n"
     "The exception types the C layer raises."},
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
    return 0;
}

/* ------------------------------------------------------------------ */
/* fork                                                                */

/* In a child: counts held by threads that do not exist there are stale
 * (busy counts compare their generation), and pages advised MADV_DONTFORK
 * are absent: map zero pages there so that no buffer points at a hole. */
static void
after_fork_in_child(void)
{
    fork_generation++;
    region_after_fork_in_child();
}

static int
mman_exec(PyObject *m)
{
    static int atfork_registered = 0;
    module_state *st = (module_state *)PyModule_GetState(m);
    long page = sysconf(_SC_PAGESIZE);

    if (page > 0)
        system_page = page;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return -1;
        }
        atfork_registered = 1;
    }
#define TYPE(field, spec, name, base)                                                   \
    st->field = (PyTypeObject *)PyType_FromModuleAndSpec(m, &spec, base);               \
    if (st->field == NULL || PyModule_AddObjectRef(m, name, (PyObject *)st->field) < 0) \
        return -1;
    TYPE(region_type, region_spec, "Region", NULL)
    TYPE(pin_type, pin_spec, "Pin", NULL)
    TYPE(view_type, view_spec, "View", NULL)
    TYPE(iter_type, iter_spec, "RegionIterator", NULL)
    TYPE(pool_type, pool_spec, "Pool", NULL)
    TYPE(allocator_type, allocator_spec, "Allocator", NULL)
#undef TYPE
    Region_Type = st->region_type;
    Pin_Type = st->pin_type;
    View_Type = st->view_type;
    Iter_Type = st->iter_type;
    if (secret_init(m) < 0 || shared_init(m) < 0 || codeheap_init(m) < 0)
        return -1;
    return add_constants(m);
}

static int
mman_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = (module_state *)PyModule_GetState(m);
    Py_VISIT(st->region_type);
    Py_VISIT(st->pin_type);
    Py_VISIT(st->view_type);
    Py_VISIT(st->iter_type);
    Py_VISIT(st->pool_type);
    Py_VISIT(st->allocator_type);
    return 0;
}

static int
mman_clear(PyObject *m)
{
    module_state *st = (module_state *)PyModule_GetState(m);
    Py_CLEAR(st->region_type);
    Py_CLEAR(st->pin_type);
    Py_CLEAR(st->view_type);
    Py_CLEAR(st->iter_type);
    Py_CLEAR(st->pool_type);
    Py_CLEAR(st->allocator_type);
    return 0;
}

static void
mman_free(void *m)
{
    mman_clear((PyObject *)m);
}

static PyModuleDef_Slot mman_slots[] = {
    {Py_mod_exec, mman_exec},
    {0, NULL},
};

static struct PyModuleDef mman_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmap_alloc._mman",
    .m_doc = "The safety kernel of mmap_alloc: mappings, page protections, exports, "
             "pins and pool slabs (private to mmap_alloc).",
    .m_size = sizeof(module_state),
    .m_methods = mman_methods,
    .m_slots = mman_slots,
    .m_traverse = mman_traverse,
    .m_clear = mman_clear,
    .m_free = mman_free,
};

PyMODINIT_FUNC
PyInit__mman(void)
{
    return PyModuleDef_Init(&mman_module);
}

/*
 * Module init, constants, plain system calls, errors, argument helpers,
 * aligned mapping, the fork generation and the unmap graveyard.
 */
#include "mman.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/syscall.h>

Py_ssize_t mapped_bytes = 0;
unsigned long fork_generation = 0;
Py_ssize_t system_page = 4096;
PyObject *AllocError_Type = NULL;
PyObject *CannotReallocInPlace_Type = NULL;

/* ------------------------------------------------------------------ */
/* errors                                                              */

static PyObject *
vformat(const char *format, va_list va)
{
    return PyUnicode_FromFormatV(format, va);
}

PyObject *
raise_alloc_error(int err, Py_ssize_t size, const char *format, ...)
{
    va_list va;
    PyObject *message, *type = AllocError_Type ? AllocError_Type : PyExc_MemoryError;
    PyObject *exc = NULL;

    va_start(va, format);
    message = vformat(format, va);
    va_end(va);
    if (message == NULL)
        return NULL;
    if (AllocError_Type != NULL) {
        PyObject *args = PyTuple_Pack(1, message);
        PyObject *kwargs = Py_BuildValue("{s:i,s:n}", "errno", err, "size", size);
        if (args != NULL && kwargs != NULL)
            exc = PyObject_Call(type, args, kwargs);
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
    }
    else
        exc = PyObject_CallFunctionObjArgs(type, message, NULL);
    Py_DECREF(message);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyObject *
raise_os_error(int err, const char *format, ...)
{
    va_list va;
    PyObject *message, *exc;

    va_start(va, format);
    message = vformat(format, va);
    va_end(va);
    if (message == NULL)
        return NULL;
    exc = PyObject_CallFunction(PyExc_OSError, "iO", err, message);
    Py_DECREF(message);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyObject *
raise_syscall_error(int err, Py_ssize_t size, const char *what)
{
    if (err == ENOMEM || err == EAGAIN)
        return raise_alloc_error(err, size,
                                 "cannot %s %zd bytes: %s (the process may hold "
                                 "vm.max_map_count mappings)", what, size, strerror(err));
    return raise_os_error(err, "cannot %s %zd bytes: %s", what, size, strerror(err));
}

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
/* arguments                                                           */

int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max)
{
    if (nargs < min || nargs > max) {
        if (min == max)
            PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd argument(s) (%zd given)",
                         name, min, nargs);
        else
            PyErr_Format(PyExc_TypeError, "%s() takes from %zd to %zd arguments (%zd given)",
                         name, min, max, nargs);
        return -1;
    }
    return 0;
}

/* An integer argument as exact int (new reference): __index__ runs here. */
static PyObject *
as_index(PyObject *o, const char *name)
{
    PyObject *i;

    if (PyLong_CheckExact(o))
        return Py_NewRef(o);
    if (PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, not bool", name);
        return NULL;
    }
    i = PyNumber_Index(o);
    if (i == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyObject *tname = PyType_GetName(Py_TYPE(o));
        PyErr_Clear();
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError, "%s must be an integer, not %U", name, tname);
            Py_DECREF(tname);
        }
    }
    return i;
}

int
arg_ssize(PyObject *o, const char *name, Py_ssize_t *out)
{
    PyObject *i = as_index(o, name);
    Py_ssize_t v;

    if (i == NULL)
        return -1;
    v = PyLong_AsSsize_t(i);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s is out of range", name);
        }
        return -1;
    }
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative, got %zd", name, v);
        return -1;
    }
    *out = v;
    return 0;
}

int
arg_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);

    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "flag value out of range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

int
arg_address(PyObject *o, void **out)
{
    void *p = PyLong_AsVoidPtr(o);

    if (p == NULL && PyErr_Occurred())
        return -1;
    *out = p;
    return 0;
}

int
convert_range_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                   Py_ssize_t first, const char *fname, PyObject **offset, PyObject **length,
                   PyObject **extra, const char *extra_name)
{
    /* positional: [first arg (extra, e.g. perms)] offset length; keywords by name */
    PyObject *slots[3] = {NULL, NULL, NULL};   /* extra, offset, length */
    static const char *names[3] = {NULL, "offset", "length"};
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    Py_ssize_t base = first ? 0 : 1;   /* slot of the first positional */

    if (nargs > 3 - base) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     fname, 3 - base, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        slots[base + i] = args[i];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GetItem(kwnames, k);
        Py_ssize_t slot = -1;
        for (Py_ssize_t j = base; j < 3; j++) {
            const char *name = j == 0 ? extra_name : names[j];
            if (name != NULL && PyUnicode_CompareWithASCIIString(key, name) == 0)
                slot = j;
        }
        if (slot < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname,
                         key);
            return -1;
        }
        if (slots[slot] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument %R", fname,
                         key);
            return -1;
        }
        slots[slot] = args[nargs + k];
    }
    if (first && slots[0] == NULL) {
        PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                     extra_name);
        return -1;
    }
    *offset = *length = NULL;
    if (extra != NULL)
        *extra = NULL;
    if (first) {
        *extra = as_index(slots[0], extra_name);
        if (*extra == NULL)
            goto fail;
    }
    *offset = slots[1] == NULL ? PyLong_FromLong(0) : as_index(slots[1], "offset");
    if (*offset == NULL)
        goto fail;
    *length = (slots[2] == NULL || slots[2] == Py_None) ? Py_NewRef(Py_None)
                                                          : as_index(slots[2], "length");
    if (*length == NULL)
        goto fail;
    return 0;
fail:
    if (extra != NULL)
        Py_CLEAR(*extra);
    Py_CLEAR(*offset);
    return -1;
}

int
page_range(RegionObject *self, PyObject *offset, PyObject *length, Py_ssize_t *start,
           Py_ssize_t *n)
{
    Py_ssize_t page = self->page, cap = self->capacity, s, len;

    s = PyLong_AsSsize_t(offset);
    if (s == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        s = -1;
    }
    if (s < 0 || s % page) {
        PyErr_Format(PyExc_ValueError,
                     "offset must be a non-negative multiple of the page size %zd, got %R",
                     page, offset);
        return -1;
    }
    if (s > cap) {
        PyErr_Format(PyExc_ValueError, "offset %zd lies outside the region (capacity %zd)", s,
                     cap);
        return -1;
    }
    if (length == Py_None) {
        *start = s;
        *n = cap - s;
        return 0;
    }
    len = PyLong_AsSsize_t(length);
    if (len == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "offset %zd + length %R lies outside the region "
                     "(capacity %zd)", s, length, cap);
        return -1;
    }
    if (len < 0) {
        PyErr_Format(PyExc_ValueError, "length must not be negative, got %zd", len);
        return -1;
    }
    if (len > cap - s) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + length %zd lies outside the region (capacity %zd)", s, len,
                     cap);
        return -1;
    }
    len = round_up(len, page);
    if (len > cap - s) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + length %zd lies outside the region (capacity %zd)", s, len,
                     cap);
        return -1;
    }
    *start = s;
    *n = len;
    return 0;
}

Py_ssize_t
round_up(Py_ssize_t n, Py_ssize_t page)
{
    return (n + page - 1) & ~(page - 1);
}

/* ------------------------------------------------------------------ */
/* mapping                                                             */

/* The graveyard: mappings the kernel refused to unmap (vm.max_map_count),
 * given back with MADV_DONTNEED and unmapped at the next chance. */
typedef struct { char *p; Py_ssize_t length; } Grave;
static Grave *graves = NULL;
static Py_ssize_t ngraves = 0, cap_graves = 0;

static void
flush_graveyard(void)
{
    Py_ssize_t out = 0;

    for (Py_ssize_t i = 0; i < ngraves; i++) {
        if (munmap(graves[i].p, (size_t)graves[i].length) == 0)
            mapped_bytes -= graves[i].length;
        else
            graves[out++] = graves[i];
    }
    ngraves = out;
}

void
unmap_or_bury(char *p, Py_ssize_t length)
{
    int rc;

    if (length >= SLOW_CALL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        rc = munmap(p, (size_t)length);
        Py_END_ALLOW_THREADS
    }
    else
        rc = munmap(p, (size_t)length);
    if (rc == 0) {
        mapped_bytes -= length;
        if (ngraves)
            flush_graveyard();
        return;
    }
    madvise(p, (size_t)length, MADV_DONTNEED);
    mprotect(p, (size_t)length, PROT_NONE);
    if (ngraves == cap_graves) {
        Py_ssize_t cap = cap_graves ? cap_graves * 2 : 16;
        Grave *g = PyMem_Realloc(graves, (size_t)cap * sizeof(Grave));
        if (g == NULL)
            return;   /* lost: the address space stays taken, the memory is given back */
        graves = g;
        cap_graves = cap;
    }
    graves[ngraves].p = p;
    graves[ngraves].length = length;
    ngraves++;
}

static char *
map_plain(Py_ssize_t length, int prot, int flags, int fd, char *hint, int release_gil)
{
    char *p;

    if (release_gil) {
        Py_BEGIN_ALLOW_THREADS
        p = mmap(hint, (size_t)length, prot, flags, fd, 0);
        Py_END_ALLOW_THREADS
    }
    else
        p = mmap(hint, (size_t)length, prot, flags, fd, 0);
    return p;
}

void *
map_aligned(Py_ssize_t length, Py_ssize_t align, Py_ssize_t natural, int prot, int mflags,
            int fd, int release_gil)
{
    int flags = mflags | (fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : 0);
    char *p, *q;
    Py_ssize_t span, front, back;

    if (align <= natural || length % align == 0) {
        /* the kernel aligns to `natural` (the page, or the huge page); recent
         * kernels also align mappings of whole huge pages: try that first */
        p = map_plain(length, prot, flags, fd, NULL, release_gil);
        if (p == MAP_FAILED || align <= natural || ((uintptr_t)p & (uintptr_t)(align - 1)) == 0)
            return p;
        munmap(p, (size_t)length);
    }
    if (length > PY_SSIZE_T_MAX - align) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    /* Reserve a span with room to align in, then map over its aligned part. */
    span = length + align;
    p = mmap(NULL, (size_t)span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return MAP_FAILED;
    front = (Py_ssize_t)(-(uintptr_t)p & (uintptr_t)(align - 1));
    back = span - front - length;
    q = map_plain(length, prot, flags | MAP_FIXED, fd, p + front, release_gil);
    if (q == MAP_FAILED) {
        int err = errno;
        munmap(p, (size_t)span);
        errno = err;
        return MAP_FAILED;
    }
    /* Trimming the excess removes whole mappings at the span's ends: it needs
     * no new kernel mapping, so vm.max_map_count cannot refuse it. */
    if (front)
        munmap(p, (size_t)front);
    if (back)
        munmap(p + front + length, (size_t)back);
    return p + front;
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
void region_after_fork_in_child(void);

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

/*
 * What every file of the kernel uses: the byte count of what is mapped, the
 * fork generation, the library's exception types and the errors built from
 * them, argument conversion and page ranges, aligned mapping, and the
 * graveyard of mappings the kernel refused to unmap.
 */
#include "mman.h"

#include <stdarg.h>
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

/* raise the exception instance exc (a new reference, or NULL with an error
 * set already); returns NULL */
static PyObject *
raise_instance(PyObject *exc)
{
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
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
    return raise_instance(exc);
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
    return raise_instance(exc);
}

PyObject *
raise_step_error(int err, const char *step)
{
    return raise_instance(PyObject_CallFunction(PyExc_OSError, "iss", err, strerror(err), step));
}

int
memfd_open(const char *name, unsigned int flags)
{
#ifdef SYS_memfd_create
    return (int)syscall(SYS_memfd_create, name, flags);
#else
    errno = ENOSYS;
    return -1;
#endif
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
Py_ssize_t ngraves = 0;
static Py_ssize_t cap_graves = 0;

void
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
unmap_or_bury(char *p, Py_ssize_t length, int release_gil)
{
    int rc;

    if (release_gil) {
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


/*
 * _limits: the system calls mmap_alloc makes, made from C loops.
 *
 * Each function runs one benchmark case's work `n` times with no Python in
 * between: the "C loop" reference the library is measured against (what
 * mmap_alloc adds on top of the kernel; not a lower bound for other ways of
 * doing the work). Used by `python -m mmap_alloc bench` only; not part of
 * the library's API. The calls go through the library's platform layer
 * (_mman/platform.h, compiled in), as the library's own do.
 */
/* Py_LIMITED_API (0x030B0000, abi3) comes from setup.py, for GIL builds only */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "../_mman/platform.h"

#define RW (PROT_READ | PROT_WRITE)

static int
parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, Py_ssize_t *out)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", expected, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = PyLong_AsSsize_t(args[i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* None, or OSError for the errno a loop stopped at */
static PyObject *
finish(int err)
{
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* A loop: a case's work a[0] times over its arguments a[1..]; 0, or the
 * errno it stopped at */
typedef int (*loop_fn)(const Py_ssize_t *a);

/* What every loop's function does: parse `expected` integer arguments (at
 * most 5; the ones not given are 0), run `loop` over them (the GIL let go
 * around it when `release_gil`), and say how it ended */
static PyObject *
run(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, loop_fn loop,
    int release_gil)
{
    Py_ssize_t a[5] = {0, 0, 0, 0, 0};
    int err;

    if (parse(args, nargs, expected, a) < 0)
        return NULL;
    if (release_gil) {
        Py_BEGIN_ALLOW_THREADS
        err = loop(a);
        Py_END_ALLOW_THREADS
    }
    else
        err = loop(a);
    return finish(err);
}

static void
touch(char *p, Py_ssize_t length, long page)
{
    for (Py_ssize_t off = 0; off < length; off += page)
        ((volatile char *)p)[off] = 1;
}

static int
map_unmap_loop(const Py_ssize_t *a)
{
    long page = sysconf(_SC_PAGESIZE);
    int err = 0;

    for (Py_ssize_t i = 0; i < a[0]; i++) {
        void *p;
        if ((err = os_map(&p, NULL, (size_t)a[1], RW, (int)a[2], -1, 0)) != 0)
            break;
        if (a[4] && (err = os_advise(p, (size_t)a[1], (int)a[4])) != 0) {
            os_unmap(p, (size_t)a[1]);
            break;
        }
        if (a[3])
            touch(p, a[1], page);
        os_unmap(p, (size_t)a[1]);
    }
    return err;
}

/* map_unmap(n, size, flags, touch_pages, advice=0): mmap + (madvise advice) +
 * (touch) + munmap, n times */
static PyObject *
map_unmap(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    return run(args, nargs, nargs == 5 ? 5 : 4, map_unmap_loop, 1);
}

/* map_one(size, flags, advice) -> address and unmap_one(address, size): one
 * mmap (+ madvise) and one munmap per call. A Python loop of the two is the
 * least any Python API over these calls can cost: two calls and an int per
 * pair, no object of its own. */
static PyObject *
map_one(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[3];
    PyObject *address;
    void *p;
    int err;

    if (parse(args, nargs, 3, a) < 0)
        return NULL;
    if ((err = os_map(&p, NULL, (size_t)a[0], RW, (int)a[1], -1, 0)) != 0)
        return finish(err);
    if ((a[2] && (err = os_advise(p, (size_t)a[0], (int)a[2])) != 0)
        || (address = PyLong_FromVoidPtr(p)) == NULL) {
        os_unmap(p, (size_t)a[0]);
        return err ? finish(err) : NULL;
    }
    return address;
}

static PyObject *
unmap_one(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[2];

    if (parse(args, nargs, 2, a) < 0)
        return NULL;
    return finish(os_unmap((void *)a[0], (size_t)a[1]));
}

static int
grow_by_doubling_loop(const Py_ssize_t *a)
{
    int err = 0;

    for (Py_ssize_t i = 0; i < a[0] && !err; i++) {
        Py_ssize_t size = a[1];
        void *p;
        if ((err = os_map(&p, NULL, (size_t)size, RW, 0, -1, 0)) != 0)
            break;
        memset(p, 1, (size_t)size);
        while (size < a[2]) {
            if ((err = os_move(&p, p, (size_t)size, (size_t)size * 2, NULL)) != 0)
                break;
            memset((char *)p + size, 1, (size_t)size);
            size *= 2;
        }
        os_unmap(p, (size_t)size);
    }
    return err;
}

/* grow_by_doubling(n, start, end): n times, map `start` bytes, fill them, and
 * double with mremap until `end`, filling each new half */
static PyObject *
grow_by_doubling(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    return run(args, nargs, 3, grow_by_doubling_loop, 1);
}

/* n = a[0] times over the range a[1], a[2]: call(first) then call(second),
 * where call is os_protect or os_advise (inlined: the pointer is constant) */
static inline int
range_pair_loop(const Py_ssize_t *a, int (*call)(void *, size_t, int), int first, int second)
{
    int err = 0;

    for (Py_ssize_t i = 0; i < a[0]; i++) {
        if ((err = call((void *)a[1], (size_t)a[2], first)) != 0
            || (err = call((void *)a[1], (size_t)a[2], second)) != 0)
            break;
    }
    return err;
}

static int
protect_flip_loop(const Py_ssize_t *a)
{
    return range_pair_loop(a, os_protect, PROT_READ | PROT_EXEC, RW);
}

/* protect_flip(n, address, length): mprotect read/exec then read/write, n times */
static PyObject *
protect_flip(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    return run(args, nargs, 3, protect_flip_loop, 0);
}

static int
commit_uncommit_loop(const Py_ssize_t *a)
{
    return range_pair_loop(a, os_advise, MADV_POPULATE_WRITE, MADV_DONTNEED);
}

/* commit_uncommit(n, address, length): MADV_POPULATE_WRITE then MADV_DONTNEED, n times */
static PyObject *
commit_uncommit(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    return run(args, nargs, 3, commit_uncommit_loop, 1);
}

/* random_reads(n, address, length, seed) -> sum: n reads of 8 bytes at random
 * 8-byte-aligned offsets (xorshift). Each offset depends on the value read
 * before it, so reads cannot overlap and every TLB miss costs its full walk. */
static PyObject *
random_reads(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[4];
    uint64_t x, sum = 0;

    if (parse(args, nargs, 4, a) < 0)
        return NULL;
    if (a[2] < 8) {
        PyErr_SetString(PyExc_ValueError, "length must be at least 8");
        return NULL;
    }
    x = (uint64_t)a[3] | 1;
    Py_BEGIN_ALLOW_THREADS
    {
        const uint64_t *base = (const uint64_t *)a[1];
        uint64_t words = (uint64_t)a[2] / 8;
        for (Py_ssize_t i = 0; i < a[0]; i++) {
            uint64_t value;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            value = base[(x ^ sum) % words];
            sum += value;
            x ^= value & 1;  /* dependent on the load, whatever the buffer holds */
            x |= 1;
        }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(sum);
}

static PyMethodDef limits_methods[] = {
    {"map_unmap", (PyCFunction)(void (*)(void))map_unmap, METH_FASTCALL,
     "map_unmap(n, size, flags, touch, advice=0): mmap + (madvise) + (touch each page) +\n"
     "munmap, n times"},
    {"map_one", (PyCFunction)(void (*)(void))map_one, METH_FASTCALL,
     "map_one(size, flags, advice) -> address: one mmap (+ madvise), for a Python loop"},
    {"unmap_one", (PyCFunction)(void (*)(void))unmap_one, METH_FASTCALL,
     "unmap_one(address, size): one munmap, for a Python loop"},
    {"grow_by_doubling", (PyCFunction)(void (*)(void))grow_by_doubling, METH_FASTCALL,
     "grow_by_doubling(n, start, end): grow a filled mapping by mremap doubling, n times"},
    {"protect_flip", (PyCFunction)(void (*)(void))protect_flip, METH_FASTCALL,
     "protect_flip(n, address, length): mprotect r-x then rw-, n times"},
    {"commit_uncommit", (PyCFunction)(void (*)(void))commit_uncommit, METH_FASTCALL,
     "commit_uncommit(n, address, length): MADV_POPULATE_WRITE + MADV_DONTNEED, n times"},
    {"random_reads", (PyCFunction)(void (*)(void))random_reads, METH_FASTCALL,
     "random_reads(n, address, length, seed) -> sum of n random 8-byte reads"},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot limits_slots[] = {
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},   /* stateless loops over the caller's memory */
#endif
    {0, NULL},
};

static struct PyModuleDef limits_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmap_alloc.bench._limits",
    .m_doc = "System calls from C loops: the floor benchmarks compare against.",
    .m_size = 0,
    .m_methods = limits_methods,
    .m_slots = limits_slots,
};

PyMODINIT_FUNC
PyInit__limits(void)
{
    return PyModuleDef_Init(&limits_module);
}

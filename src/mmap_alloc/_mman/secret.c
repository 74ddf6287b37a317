/*
 * SecretBuffer's kernel (issue: secret memory): the mapping, its guard pages,
 * the canary, the lock, the access state, the buffers exported, the wipe.
 *
 * Layout of one secret (P: the page size, n: bytes asked for):
 *
 *     base                                                   base + total
 *     | guard (P) |   secret pages (inner)          | guard (P) |
 *                 |  ...   | canary (16) | secret (n) |
 *                                        data       data + n
 *
 * The secret ends where the trailing guard begins: one byte past it faults.
 * The canary sits right before it and is checked when the buffer closes.
 * The secret pages are always a kernel mapping (VMA) of their own: their
 * flags (MADV_WIPEONFORK, mlock, secretmem) differ from the guards', so no
 * later change of their protection splits a mapping (and so none of them can
 * fail at vm.max_map_count).
 *
 * Backends and guards:
 *   anonymous, guard "madvise": mmap rw-, MADV_GUARD_INSTALL on both guard
 *       pages (one process_madvise call where the kernel takes it), then
 *       MADV_DONTDUMP (whole), MADV_WIPEONFORK (secret pages), mlock;
 *   anonymous, guard "mprotect": mmap ---, mprotect rw- of the secret pages,
 *       then the same advice and mlock;
 *   memfd_secret: mmap --- of the whole span, and the secretmem file mapped
 *       MAP_SHARED | MAP_FIXED over its middle (locked and never dumped by
 *       the kernel), MADV_DONTFORK: a forked child gets zero pages instead
 *       (mapped by the atfork handler below), never the parent's pages.
 *
 * Invariants (each change is one call that checks and acts with no Python
 * code in between):
 *   - base == NULL once closed, cleared before the wipe and the munmap;
 *   - access is the protection of the secret pages, always;
 *   - no buffer is exported at an access it does not have: nexports > 0
 *     keeps PROT_READ, nwritable > 0 keeps PROT_WRITE, and either refuses
 *     close (BufferError);
 *   - the canary is compared before the wipe; a mismatch aborts the process
 *     (abort mode) or is reported after the wipe and unmap (raise mode).
 */
#include "mman.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#define CANARY_SIZE 16

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef PIDFD_SELF_THREAD
#define PIDFD_SELF_THREAD -10000
#endif

enum { BACKEND_ANONYMOUS = 0, BACKEND_MEMFD_SECRET = 1 };
enum { GUARD_MPROTECT = 0, GUARD_MADVISE = 1 };
enum { LOCK_OFF = 0, LOCK_BEST_EFFORT = 1, LOCK_REQUIRED = 2 };

typedef struct SecretObject {
    PyObject_HEAD
    char *base;                 /* the whole mapping; NULL once closed */
    char *data;                 /* the first secret byte (base + P + inner - size) */
    Py_ssize_t size;            /* bytes of secret: len() */
    Py_ssize_t inner;           /* bytes of the secret pages */
    Py_ssize_t total;           /* bytes mapped: inner + two guard pages */
    Py_ssize_t nexports;        /* live buffers of the secret */
    Py_ssize_t nwritable;       /* of which writable */
    int access;                 /* PROT_NONE, PROT_READ or PROT_RW of the secret pages */
    int locked;                 /* the secret pages are locked (mlock, or secretmem) */
    int backend;                /* BACKEND_* */
    int guard;                  /* GUARD_* */
    int abort_on_corruption;    /* canary mismatch: abort() (1) or raise (0) */
    int forked;                 /* inherited over fork: zero pages, canary not checked */
    struct SecretObject *next, *prev;   /* the registry of open secrets */
    PyObject *weakreflist;
} SecretObject;

/* A buffer given by open(): one export of the secret for as long as it lives. */
typedef struct {
    PyObject_HEAD
    SecretObject *secret;       /* NULL until exported */
    int writable;
} SecretViewObject;

static PyTypeObject *Secret_Type = NULL;
static PyTypeObject *SecretView_Type = NULL;
static PyObject *MemoryCorruptionError_Type = NULL;

static unsigned char canary[CANARY_SIZE];
static int canary_ready = 0;
static int process_madvise_works = 1;   /* cleared at the first refusal */

/* Open secrets, for the atfork handler (changed only with the GIL held). */
static SecretObject registry = {.next = &registry, .prev = &registry};

static void
registry_add(SecretObject *s)
{
    s->next = &registry;
    s->prev = registry.prev;
    registry.prev->next = s;
    registry.prev = s;
}

static void
registry_remove(SecretObject *s)
{
    if (s->next == NULL)
        return;
    s->prev->next = s->next;
    s->next->prev = s->prev;
    s->next = s->prev = NULL;
}

/* ------------------------------------------------------------------ */
/* helpers                                                             */

static int
secret_check_open(SecretObject *self)
{
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "secret buffer is closed");
        return -1;
    }
    return 0;
}

static const char *
access_name(int access)
{
    return access == PROT_NONE ? "none" : access == PROT_READ ? "read" : "readwrite";
}

static char *
secret_pages(SecretObject *self)
{
    return self->base + system_page;
}

static int
fill_canary(void)
{
    size_t got = 0;

    if (canary_ready)
        return 0;
    while (got < CANARY_SIZE) {
        ssize_t n = getrandom(canary + got, CANARY_SIZE - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, "getrandom");
            return -1;
        }
        got += (size_t)n;
    }
    canary_ready = 1;
    return 0;
}

/* Whether the canary before data is intact (all 16 bytes read, no early exit). */
static int
canary_intact(const char *data)
{
    const volatile unsigned char *c = (const volatile unsigned char *)(data - CANARY_SIZE);
    unsigned char d = 0;

    for (int i = 0; i < CANARY_SIZE; i++)
        d |= (unsigned char)(c[i] ^ canary[i]);
    return d == 0;
}

/* 1 if the n bytes at a and b are equal; time depends on n only. */
static int
equal_ct(const volatile unsigned char *a, const volatile unsigned char *b, size_t n)
{
    unsigned char d = 0;

    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return (int)(1 & ((unsigned int)(d - 1) >> 8));
}

static void
wipe(char *p, size_t n)
{
    if (n >= SLOW_CALL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        explicit_bzero(p, n);
        Py_END_ALLOW_THREADS
    }
    else
        explicit_bzero(p, n);
}

static void
report_corruption_and_abort(void)
{
    static const char message[] =
        "mmap_alloc: the canary before a SecretBuffer was overwritten (a write out of "
        "bounds corrupted memory); aborting (on_corruption=\"abort\")\n";
    ssize_t unused = write(2, message, sizeof message - 1);
    (void)unused;
    abort();
}

static PyObject *
corruption_error(SecretObject *self)
{
    PyObject *type = MemoryCorruptionError_Type ? MemoryCorruptionError_Type
                                                 : PyExc_RuntimeError;
    PyErr_Format(type,
                 "the canary before the secret buffer (%zd bytes) was overwritten: a write "
                 "out of bounds corrupted memory; the buffer was wiped and closed",
                 self->size);
    return NULL;
}

/* Release a secret whose checks passed: unregister, check the canary, clear
 * the pointers, wipe, unmap. The secret pages must be writable. Returns 1
 * when the canary was overwritten (raise mode; abort mode never returns). */
static int
secret_release(SecretObject *self, int can_wipe)
{
    char *base = self->base, *data = self->data;
    int corrupt = 0;

    registry_remove(self);
    if (can_wipe && !self->forked && !canary_intact(data)) {
        if (self->abort_on_corruption)
            report_corruption_and_abort();
        corrupt = 1;
    }
    self->base = NULL;
    self->data = NULL;
    self->access = PROT_NONE;
    self->locked = 0;
    if (can_wipe)
        wipe(data - CANARY_SIZE, (size_t)(self->size + CANARY_SIZE));
    /* munmap releases the lock with the pages */
    unmap_or_bury(base, self->total, 0);   /* small, and the wipe touched it already */
    return corrupt;
}

/* ------------------------------------------------------------------ */
/* creation                                                            */

/* Install the two guard pages with MADV_GUARD_INSTALL: one process_madvise
 * call where the kernel takes advice for the calling process (6.13 and
 * PIDFD_SELF, 6.15), else one madvise per guard. */
static int
install_guards(char *base, Py_ssize_t total)
{
    char *trail = base + total - system_page;

    if (process_madvise_works) {
        struct iovec iov[2] = {{base, (size_t)system_page}, {trail, (size_t)system_page}};
        long done = syscall(SYS_process_madvise, PIDFD_SELF_THREAD, iov, 2,
                            MADV_GUARD_INSTALL, 0);
        if (done == 2 * system_page)
            return 0;
        process_madvise_works = 0;
    }
    if (madvise(base, (size_t)system_page, MADV_GUARD_INSTALL) != 0
        || madvise(trail, (size_t)system_page, MADV_GUARD_INSTALL) != 0)
        return -1;
    return 0;
}

/* Map and prepare an anonymous secret; sets *step on failure (errno set). */
static char *
map_anonymous(Py_ssize_t inner, Py_ssize_t total, int guard, int lock, int *locked,
              const char **step, int slow)
{
    char *base, *pages;
    int err;

    *step = "mmap";
    base = mmap(NULL, (size_t)total, guard == GUARD_MADVISE ? PROT_RW : PROT_NONE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    pages = base + system_page;
    if (guard == GUARD_MADVISE) {
        *step = "madvise(MADV_GUARD_INSTALL)";
        if (install_guards(base, total) != 0)
            goto fail;
    }
    else {
        *step = "mprotect";
        if (mprotect(pages, (size_t)inner, PROT_RW) != 0)
            goto fail;
    }
    *step = "madvise(MADV_DONTDUMP)";
    if (madvise(base, (size_t)total, MADV_DONTDUMP) != 0)
        goto fail;
    *step = "madvise(MADV_WIPEONFORK)";
    if (madvise(pages, (size_t)inner, MADV_WIPEONFORK) != 0)
        goto fail;
    *locked = 0;
    if (lock != LOCK_OFF) {
        int rc;
        if (slow) {
            Py_BEGIN_ALLOW_THREADS
            rc = mlock(pages, (size_t)inner);
            Py_END_ALLOW_THREADS
        }
        else
            rc = mlock(pages, (size_t)inner);
        if (rc == 0)
            *locked = 1;
        else if (lock == LOCK_REQUIRED) {
            *step = "mlock";
            goto fail;
        }
        else
            munlock(pages, (size_t)inner);   /* whatever part a failed mlock locked */
    }
    return base;
fail:
    err = errno;
    munmap(base, (size_t)total);
    errno = err;
    return NULL;
}

/* Map a secretmem file between two PROT_NONE guard pages. */
static char *
map_memfd_secret(Py_ssize_t inner, Py_ssize_t total, const char **step)
{
    char *base = NULL, *pages;
    long fd;
    int err;

    *step = "memfd_secret";
    fd = syscall(SYS_memfd_secret, (unsigned int)O_CLOEXEC);
    if (fd < 0)
        return NULL;
    *step = "ftruncate";
    if (ftruncate((int)fd, (off_t)inner) != 0)
        goto fail;
    *step = "mmap";
    base = mmap(NULL, (size_t)total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        base = NULL;
        goto fail;
    }
    *step = "mmap(memfd_secret)";
    pages = mmap(base + system_page, (size_t)inner, PROT_RW, MAP_SHARED | MAP_FIXED, (int)fd, 0);
    if (pages == MAP_FAILED)
        goto fail;
    close((int)fd);
    fd = -1;
    *step = "madvise(MADV_DONTFORK)";
    if (madvise(pages, (size_t)inner, MADV_DONTFORK) != 0)
        goto fail;
    return base;
fail:
    err = errno;
    if (base != NULL)
        munmap(base, (size_t)total);
    if (fd >= 0)
        close((int)fd);
    errno = err;
    return NULL;
}

/* _create(size, backend, guard, lock, abort): a secret buffer of cls, in one
 * call. OSError with the failed step as its filename when the kernel refuses
 * ("mlock": the lock, with lock=LOCK_REQUIRED; "mmap(memfd_secret)": the
 * secretmem pages, which count against RLIMIT_MEMLOCK). */
static PyObject *
secret_create(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, inner, total;
    int backend, guard, lock, abort_mode, locked = 0, slow;
    const char *step = "mmap";
    char *base;
    SecretObject *self;
    allocfunc alloc;

    if (check_nargs("_create", nargs, 5, 5) < 0 || arg_ssize(args[0], "size", &size) < 0
        || arg_int(args[1], &backend) < 0 || arg_int(args[2], &guard) < 0
        || arg_int(args[3], &lock) < 0 || arg_int(args[4], &abort_mode) < 0)
        return NULL;
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, Secret_Type)) {
        PyErr_SetString(PyExc_TypeError, "_create() makes secret buffers");
        return NULL;
    }
    if (size <= 0 || backend < 0 || backend > 1 || guard < 0 || guard > 1 || lock < 0
        || lock > 2) {
        PyErr_SetString(PyExc_ValueError, "bad secret buffer parameters");
        return NULL;
    }
    if (size > PY_SSIZE_T_MAX - CANARY_SIZE - 3 * system_page) {
        return raise_alloc_error(ENOMEM, size, "cannot map a secret buffer of %zd bytes: "
                                 "more than the address space holds", size);
    }
    if (fill_canary() < 0)
        return NULL;
    inner = round_up(size + CANARY_SIZE, system_page);
    total = inner + 2 * system_page;
    /* allocated before mapping: nothing to undo but the object if mapping fails */
    alloc = (allocfunc)PyType_GetSlot((PyTypeObject *)cls, Py_tp_alloc);
    self = (SecretObject *)alloc((PyTypeObject *)cls, 0);
    if (self == NULL)
        return NULL;
    slow = total >= SLOW_CALL_BYTES;
    if (backend == BACKEND_MEMFD_SECRET) {
        guard = GUARD_MPROTECT;
        base = map_memfd_secret(inner, total, &step);
        locked = 1;
    }
    else
        base = map_anonymous(inner, total, guard, lock, &locked, &step, slow);
    if (base == NULL) {
        int err = errno;
        Py_DECREF(self);
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, step);
    }
    mapped_bytes += total;
    self->base = base;
    self->size = size;
    self->inner = inner;
    self->total = total;
    self->data = base + system_page + inner - size;
    self->access = PROT_RW;
    self->locked = locked;
    self->backend = backend;
    self->guard = guard;
    self->abort_on_corruption = abort_mode != 0;
    memcpy(self->data - CANARY_SIZE, canary, CANARY_SIZE);
    registry_add(self);
    return (PyObject *)self;
}

static PyObject *
secret_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "secret buffers are made by SecretBuffer(size)");
    return NULL;
}

/* ------------------------------------------------------------------ */
/* access                                                              */

/* Set the protection of the secret pages, with the export rules; -1 + exception. */
static int
secret_set_access(SecretObject *self, int prot)
{
    if (secret_check_open(self) < 0)
        return -1;
    if (prot == self->access)
        return 0;
    if (!(prot & PROT_READ) && self->nexports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot make the secret buffer inaccessible: %zd buffer(s) of it are "
                     "exported", self->nexports);
        return -1;
    }
    if (!(prot & PROT_WRITE) && self->nwritable > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot make the secret buffer read-only: %zd writable buffer(s) of it "
                     "are exported", self->nwritable);
        return -1;
    }
    if (mprotect(secret_pages(self), (size_t)self->inner, prot) != 0) {
        raise_syscall_error(errno, self->inner, "change the protection of");
        return -1;
    }
    self->access = prot;
    return 0;
}

static PyObject *
secret_noaccess(SecretObject *self, PyObject *unused)
{
    if (secret_set_access(self, PROT_NONE) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
secret_readonly(SecretObject *self, PyObject *unused)
{
    if (secret_set_access(self, PROT_READ) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
secret_readwrite(SecretObject *self, PyObject *unused)
{
    if (secret_set_access(self, PROT_RW) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
access_arg(PyObject *arg, int *prot)
{
    if (arg_int(arg, prot) < 0)
        return -1;
    if (*prot != PROT_NONE && *prot != PROT_READ && *prot != PROT_RW) {
        PyErr_SetString(PyExc_ValueError, "access must be PROT_NONE, PROT_READ or PROT_RW");
        return -1;
    }
    return 0;
}

/* _restore(access): what open() does at the end of its block; nothing once closed */
static PyObject *
secret_restore(SecretObject *self, PyObject *arg)
{
    int prot;

    if (access_arg(arg, &prot) < 0)
        return NULL;
    if (self->base == NULL)
        Py_RETURN_NONE;
    if (secret_set_access(self, prot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* buffers                                                             */

static void
secret_unexport(SecretObject *self, int writable)
{
    self->nexports--;
    if (writable)
        self->nwritable--;
}

/* _open(write) -> (memoryview, previous access): raise the access the block
 * needs and export the secret, in one call. */
static PyObject *
secret_open(SecretObject *self, PyObject *arg)
{
    int write = PyObject_IsTrue(arg), previous, need;
    SecretViewObject *v;
    PyObject *memory, *result;

    if (write < 0)
        return NULL;
    /* allocated before the checks (not GC-tracked: no collection can start) */
    v = PyObject_New(SecretViewObject, SecretView_Type);
    if (v == NULL)
        return NULL;
    v->secret = NULL;
    v->writable = write;
    if (secret_check_open(self) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    previous = self->access;
    need = write ? PROT_RW : (previous | PROT_READ);
    if (need != previous && secret_set_access(self, need) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    v->secret = (SecretObject *)Py_NewRef((PyObject *)self);
    self->nexports++;
    if (write)
        self->nwritable++;
    /* from here on the state is recorded: a collection that runs Python code
     * sees the export */
    memory = PyMemoryView_FromObject((PyObject *)v);
    Py_DECREF(v);
    if (memory == NULL) {
        /* no view: take back the access raised for it, if nothing else changed it */
        if (self->base != NULL && self->access == need && need != previous) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (secret_set_access(self, previous) < 0)
                PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        return NULL;
    }
    result = Py_BuildValue("(Ni)", memory, previous);
    return result;
}

static int
secret_getbuffer(SecretObject *self, Py_buffer *view, int flags)
{
    int writable;

    view->obj = NULL;
    if (secret_check_open(self) < 0)
        return -1;
    if (!(self->access & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError,
                        "the secret buffer is not readable (access 'none'): use "
                        "buf.open() or buf.readonly()");
        return -1;
    }
    writable = (self->access & PROT_WRITE) != 0;
    if ((flags & PyBUF_WRITABLE) && !writable) {
        PyErr_SetString(PyExc_BufferError,
                        "the secret buffer is read-only (access 'read'): use "
                        "buf.open(write=True) or buf.readwrite()");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size, !writable, flags) < 0)
        return -1;
    view->internal = writable ? (void *)1 : NULL;
    self->nexports++;
    if (writable)
        self->nwritable++;
    return 0;
}

static void
secret_releasebuffer(SecretObject *self, Py_buffer *view)
{
    secret_unexport(self, view->internal != NULL);
}

static int
secret_view_getbuffer(SecretViewObject *v, Py_buffer *view, int flags)
{
    view->obj = NULL;
    if (v->secret == NULL || v->secret->base == NULL) {
        PyErr_SetString(PyExc_BufferError, "the secret buffer's view was released");
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !v->writable) {
        PyErr_SetString(PyExc_BufferError, "the view is read-only (open(write=False))");
        return -1;
    }
    return PyBuffer_FillInfo(view, (PyObject *)v, v->secret->data, v->secret->size,
                             !v->writable, flags);
}

static void
secret_view_dealloc(SecretViewObject *v)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)v);
    SecretObject *s = v->secret;

    if (s != NULL) {
        v->secret = NULL;
        secret_unexport(s, v->writable);
        Py_DECREF(s);   /* our own type: its dealloc runs no Python code */
    }
    PyObject_Free(v);
    Py_DECREF(tp);
}

static PyObject *
secret_view_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "secret views are made by SecretBuffer.open()");
    return NULL;
}

/* ------------------------------------------------------------------ */
/* contents                                                            */

/* write(data, offset=0): copy a bytes-like object in at offset */
static PyObject *
secret_write(SecretObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *data = NULL, *offset_obj = NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames), offset = 0;
    Py_buffer src;

    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "write() takes at most 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nargs > 0)
        data = args[0];
    if (nargs > 1)
        offset_obj = args[1];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GetItem(kwnames, k);
        PyObject **slot = PyUnicode_CompareWithASCIIString(key, "data") == 0     ? &data
                          : PyUnicode_CompareWithASCIIString(key, "offset") == 0 ? &offset_obj
                                                                                 : NULL;
        if (slot == NULL) {
            PyErr_Format(PyExc_TypeError, "write() got an unexpected keyword argument %R", key);
            return NULL;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "write() got multiple values for argument %R", key);
            return NULL;
        }
        *slot = args[nargs + k];
    }
    if (data == NULL) {
        PyErr_SetString(PyExc_TypeError, "write() missing required argument 'data'");
        return NULL;
    }
    /* arguments first (offset's __index__ may run Python code), then checks */
    if (PyObject_GetBuffer(data, &src, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyObject *tname = PyType_GetName(Py_TYPE(data));
            PyErr_Clear();
            if (tname != NULL) {
                PyErr_Format(PyExc_TypeError, "data must be a bytes-like object, not %U",
                             tname);
                Py_DECREF(tname);
            }
        }
        return NULL;
    }
    if (offset_obj != NULL && arg_ssize(offset_obj, "offset", &offset) < 0)
        goto fail;
    if (secret_check_open(self) < 0)
        goto fail;
    if (!(self->access & PROT_WRITE)) {
        PyErr_Format(PyExc_BufferError,
                     "the secret buffer is not writable (access '%s'): use "
                     "buf.open(write=True) or buf.readwrite()", access_name(self->access));
        goto fail;
    }
    if (offset > self->size || src.len > self->size - offset) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + %zd bytes of data lie outside the secret buffer (size %zd)",
                     offset, src.len, self->size);
        goto fail;
    }
    memmove(self->data + offset, src.buf, (size_t)src.len);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&src);
    return NULL;
}

/* compare(other) -> bool: equal contents, in time that depends on the length only */
static PyObject *
secret_compare(SecretObject *self, PyObject *other)
{
    Py_buffer b;
    int equal;

    if (PyObject_GetBuffer(other, &b, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyObject *tname = PyType_GetName(Py_TYPE(other));
            PyErr_Clear();
            if (tname != NULL) {
                PyErr_Format(PyExc_TypeError,
                             "compare() takes a bytes-like object or a SecretBuffer, not %U",
                             tname);
                Py_DECREF(tname);
            }
        }
        return NULL;
    }
    if (secret_check_open(self) < 0)
        goto fail;
    if (!(self->access & PROT_READ)) {
        PyErr_SetString(PyExc_BufferError,
                        "the secret buffer is not readable (access 'none'): use "
                        "buf.open() or buf.readonly()");
        goto fail;
    }
    /* lengths are not secret: unequal ones compare False at once */
    equal = b.len == self->size
            && equal_ct((const volatile unsigned char *)self->data,
                        (const volatile unsigned char *)b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyBool_FromLong(equal);
fail:
    PyBuffer_Release(&b);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* close                                                               */

static PyObject *
secret_close(SecretObject *self, PyObject *unused)
{
    if (self->base == NULL)
        Py_RETURN_NONE;
    if (self->nexports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close the secret buffer: %zd buffer(s) of it are exported",
                     self->nexports);
        return NULL;
    }
    /* the wipe writes: make the pages writable first (nothing changes if refused) */
    if (self->access != PROT_RW
        && mprotect(secret_pages(self), (size_t)self->inner, PROT_RW) != 0)
        return raise_syscall_error(errno, self->inner, "change the protection of");
    self->access = PROT_RW;
    if (secret_release(self, 1))
        return corruption_error(self);
    Py_RETURN_NONE;
}

static void
secret_dealloc(SecretObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->base != NULL) {
        /* (an mprotect refused here leaves the pages unwiped, but still unmapped) */
        int can_wipe = self->access == PROT_RW
                       || mprotect(secret_pages(self), (size_t)self->inner, PROT_RW) == 0;
        if (secret_release(self, can_wipe)) {
            /* raise mode: nobody to raise to; report it as unraisable */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            corruption_error(self);
            PyErr_WriteUnraisable((PyObject *)tp);
            PyErr_Restore(type, value, tb);
        }
    }
    tp_free(self);
    Py_DECREF(tp);
}

/* ------------------------------------------------------------------ */
/* fork                                                                */

/* In a forked child: anonymous secret pages read as zeros (MADV_WIPEONFORK);
 * secretmem pages are absent (MADV_DONTFORK) and get zero pages here, so that
 * every pointer and buffer the child inherited still points at memory. Locks
 * are not inherited. The canary went with the contents: it is not checked. */
static void
secret_after_fork_in_child(void)
{
    SecretObject *s = registry.next, *next;

    for (; s != &registry; s = next) {
        next = s->next;
        s->forked = 1;
        s->locked = 0;
        if (s->backend == BACKEND_MEMFD_SECRET) {
            char *pages = secret_pages(s);
            if (mmap(pages, (size_t)s->inner, s->access, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                     -1, 0) != MAP_FAILED) {
                madvise(pages, (size_t)s->inner, MADV_DONTDUMP);
                madvise(pages, (size_t)s->inner, MADV_WIPEONFORK);
            }
            else {
                /* no memory for the zero pages: the buffer is closed in the
                 * child (its API says so; nothing wipes or reads the hole) */
                registry_remove(s);
                munmap(s->base, (size_t)s->total);
                mapped_bytes -= s->total;
                s->base = NULL;
                s->data = NULL;
                s->access = PROT_NONE;
            }
        }
    }
}

/* ------------------------------------------------------------------ */
/* getters                                                             */

static PyObject *
secret_get_size(SecretObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->size);
}

static Py_ssize_t
secret_length(SecretObject *self)
{
    return self->size;
}

static PyObject *
secret_get_address(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->data);
}

static PyObject *
secret_get_access(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return PyUnicode_FromString(access_name(self->access));
}

static PyObject *
secret_get_prot(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->access);
}

static PyObject *
secret_get_locked(SecretObject *self, void *closure)
{
    return PyBool_FromLong(self->base != NULL && self->locked);
}

static PyObject *
secret_get_backend(SecretObject *self, void *closure)
{
    return PyUnicode_FromString(self->backend == BACKEND_MEMFD_SECRET ? "memfd_secret"
                                                                       : "anonymous");
}

static PyObject *
secret_get_guard(SecretObject *self, void *closure)
{
    return PyUnicode_FromString(self->guard == GUARD_MADVISE ? "madvise" : "mprotect");
}

static PyObject *
secret_get_closed(SecretObject *self, void *closure)
{
    return PyBool_FromLong(self->base == NULL);
}

static PyObject *
secret_get_exports(SecretObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->nexports);
}

static PyObject *
secret_get_forked(SecretObject *self, void *closure)
{
    return PyBool_FromLong(self->forked);
}

/* _mapping -> (base, total, pages, inner): where the guards and secret pages are */
static PyObject *
secret_get_mapping(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return Py_BuildValue("(NnNn)", PyLong_FromVoidPtr(self->base), self->total,
                         PyLong_FromVoidPtr(secret_pages(self)), self->inner);
}

/* _register(MemoryCorruptionError): the type raised in raise mode */
static PyObject *
secret_register(PyObject *module, PyObject *type)
{
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "_register_secret_errors() takes an exception type");
        return NULL;
    }
    Py_XDECREF(MemoryCorruptionError_Type);
    MemoryCorruptionError_Type = Py_NewRef(type);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* the types                                                           */

static PyMethodDef secret_methods[] = {
    {"_create", (PyCFunction)(void (*)(void))secret_create, METH_FASTCALL | METH_CLASS,
     "_create(size, backend, guard, lock, abort): map a secret buffer (OSError whose\n"
     "filename names the step the kernel refused)."},
    {"close", (PyCFunction)secret_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "Check the canary, wipe, unlock and unmap; closing a closed buffer does nothing.\n"
     "BufferError (nothing changed) while a buffer of it is exported."},
    {"noaccess", (PyCFunction)secret_noaccess, METH_NOARGS,
     "noaccess($self, /)\n--\n\nMake the secret pages inaccessible (PROT_NONE)."},
    {"readonly", (PyCFunction)secret_readonly, METH_NOARGS,
     "readonly($self, /)\n--\n\nMake the secret pages read-only."},
    {"readwrite", (PyCFunction)secret_readwrite, METH_NOARGS,
     "readwrite($self, /)\n--\n\nMake the secret pages readable and writable."},
    {"_open", (PyCFunction)secret_open, METH_O,
     "_open(write) -> (memoryview, previous access): open the pages and export them."},
    {"_restore", (PyCFunction)secret_restore, METH_O,
     "_restore(access): set the access back (nothing once closed)."},
    {"write", (PyCFunction)(void (*)(void))secret_write, METH_FASTCALL | METH_KEYWORDS,
     "write($self, /, data, offset=0)\n--\n\n"
     "Copy a bytes-like object into the secret at offset (no copy in between).\n"
     "Needs access 'readwrite'."},
    {"compare", (PyCFunction)secret_compare, METH_O,
     "compare($self, other, /)\n--\n\n"
     "Whether other (bytes-like, or a SecretBuffer) holds the same bytes, in time\n"
     "that depends on the length only. Needs read access."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef secret_getset[] = {
    {"size", (getter)secret_get_size, NULL, "Bytes of secret: len(buf).", NULL},
    {"address", (getter)secret_get_address, NULL,
     "Address of the first secret byte, for interop (ctypes, cffi).", NULL},
    {"access", (getter)secret_get_access, NULL,
     "What the secret pages allow: \"none\", \"read\" or \"readwrite\".", NULL},
    {"locked", (getter)secret_get_locked, NULL,
     "Whether the secret pages are locked in memory (never swapped).", NULL},
    {"backend", (getter)secret_get_backend, NULL,
     "Where the pages come from: \"memfd_secret\" or \"anonymous\".", NULL},
    {"guard", (getter)secret_get_guard, NULL,
     "How the guard pages are made: \"madvise\" (MADV_GUARD_INSTALL) or \"mprotect\".", NULL},
    {"closed", (getter)secret_get_closed, NULL, "True once the buffer is wiped and unmapped.",
     NULL},
    {"_prot", (getter)secret_get_prot, NULL, "The access as PROT_* bits.", NULL},
    {"_exports", (getter)secret_get_exports, NULL, "Live buffers.", NULL},
    {"_forked", (getter)secret_get_forked, NULL, "Inherited over fork (zero pages).", NULL},
    {"_mapping", (getter)secret_get_mapping, NULL,
     "(base, total, pages, inner): the mapping and its secret pages.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef secret_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(SecretObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot secret_slots[] = {
    {Py_tp_doc, "Secret memory: guard pages, a canary, locked, never dumped, wiped."},
    {Py_tp_new, secret_new},
    {Py_tp_dealloc, secret_dealloc},
    {Py_tp_methods, secret_methods},
    {Py_tp_getset, secret_getset},
    {Py_tp_members, secret_members},
    {Py_sq_length, secret_length},
    {Py_mp_length, secret_length},
    {Py_bf_getbuffer, secret_getbuffer},
    {Py_bf_releasebuffer, secret_releasebuffer},
    {0, NULL},
};

static PyType_Spec secret_spec = {
    .name = "mmap_alloc._mman.Secret",
    .basicsize = sizeof(SecretObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = secret_slots,
};

static PyType_Slot secret_view_slots[] = {
    {Py_tp_doc, "Exports a secret buffer for SecretBuffer.open()."},
    {Py_tp_new, secret_view_new},
    {Py_tp_dealloc, secret_view_dealloc},
    {Py_bf_getbuffer, secret_view_getbuffer},
    {0, NULL},
};

static PyType_Spec secret_view_spec = {
    .name = "mmap_alloc._mman.SecretView",
    .basicsize = sizeof(SecretViewObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = secret_view_slots,
};

static PyMethodDef secret_functions[] = {
    {"_register_secret_errors", secret_register, METH_O,
     "_register_secret_errors($module, memory_corruption_error, /)\n--\n\n"
     "The exception type a canary mismatch raises (on_corruption=\"raise\")."},
    {NULL, NULL, 0, NULL},
};

int
secret_init(PyObject *module)
{
    static int atfork_registered = 0;

    if (Secret_Type == NULL) {
        Secret_Type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &secret_spec, NULL);
        if (Secret_Type == NULL)
            return -1;
        SecretView_Type =
            (PyTypeObject *)PyType_FromModuleAndSpec(module, &secret_view_spec, NULL);
        if (SecretView_Type == NULL) {
            Py_CLEAR(Secret_Type);
            return -1;
        }
    }
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, secret_after_fork_in_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return -1;
        }
        atfork_registered = 1;
    }
    if (PyModule_AddObjectRef(module, "Secret", (PyObject *)Secret_Type) < 0
        || PyModule_AddObjectRef(module, "SecretView", (PyObject *)SecretView_Type) < 0
        || PyModule_AddFunctions(module, secret_functions) < 0)
        return -1;
    return 0;
}

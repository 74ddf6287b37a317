/*
 * The secret extension of the mapping core: SecretBuffer's kernel. What is
 * the core's (the mapping, its record, holds, the fork hook) is in
 * mapping.c; what is a secret's is here: the layout with its guard pages,
 * the canary, the lock, the access state and its open() blocks, the wipe.
 *
 * Layout of one secret (P: the page size, n: bytes asked for):
 *
 *     m.data                                               m.data + capacity
 *     | guard (P) |   secret pages (inner)          | guard (P) |
 *                 |  ...   | canary (16) | secret (n) |
 *                                        data       data + n
 *
 * The secret ends where the trailing guard begins: one byte past it faults.
 * The canary sits right before it and is checked when the buffer closes.
 * The record has three runs: guard, secret pages, guard; the secret pages
 * are always a kernel mapping (VMA) of their own, their flags differing from
 * the guards' (WIPEONFORK, mlock, secretmem), so no later change of their
 * protection splits a mapping (none can fail at vm.max_map_count).
 *
 * Backends and guards:
 *   anonymous, guard "madvise": mmap rw-, MADV_GUARD_INSTALL on both guard
 *       pages (one process_madvise call where the kernel takes it), then
 *       MADV_DONTDUMP (whole), MADV_WIPEONFORK (secret pages), mlock;
 *   anonymous, guard "mprotect": mmap ---, mprotect rw- of the secret pages,
 *       then the same advice and mlock;
 *   memfd_secret: mmap --- of the whole span, and the secretmem file mapped
 *       MAP_SHARED | MAP_FIXED over its middle (locked and never dumped by
 *       the kernel), MADV_DONTFORK: the core's fork hook maps zero pages
 *       there in a child, with the run's other advice (WIPEONFORK: recorded
 *       for both backends, since a child sees zero pages either way).
 *
 * Invariants, besides the core's:
 *   - the access is the protection of the secret pages (run 1), always;
 *   - the canary is compared before the wipe; a mismatch aborts the process
 *     (abort mode) or is reported after the wipe and unmap (raise mode);
 *   - in a forked child (m.gen is not the process's generation) the pages
 *     are zero, not locked, and the canary is not checked.
 */
#include "secret.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/random.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* canary, comparison, wipe                                            */

static int
fill_canary(void)
{
    size_t got = 0;

    if (kernel.canary_ready)
        return 0;
    while (got < CANARY_SIZE) {
        ssize_t n = getrandom(kernel.canary + got, CANARY_SIZE - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            raise_os_error(errno, "getrandom");
            return -1;
        }
        got += (size_t)n;
    }
    kernel.canary_ready = 1;
    return 0;
}

/* Whether the canary before data is intact (all 16 bytes read, no early exit). */
static int
canary_intact(const char *data)
{
    const volatile unsigned char *c = (const volatile unsigned char *)(data - CANARY_SIZE);
    unsigned char d = 0;

    for (int i = 0; i < CANARY_SIZE; i++)
        d |= (unsigned char)(c[i] ^ kernel.canary[i]);
    return d == 0;
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
corruption_error(Py_ssize_t size)
{
    PyObject *type = kernel.memory_corruption ? kernel.memory_corruption : PyExc_RuntimeError;
    PyErr_Format(type,
                 "the canary before the secret buffer (%zd bytes) was overwritten: a write "
                 "out of bounds corrupted memory; the buffer was wiped and closed", size);
    return NULL;
}

/* Release a secret whose checks passed: check the canary, wipe, unmap (the
 * core clears the pointer first). The secret pages must be writable when
 * can_wipe. Returns 1 when the canary was overwritten (raise mode; abort
 * mode never returns). */
static int
secret_release(SecretObject *self, int can_wipe)
{
    char *base = self->m.data, *data = base + data_offset(self);
    int corrupt = 0;

    if (can_wipe && !forked(self) && !canary_intact(data)) {
        if (self->abort_on_corruption)
            report_corruption_and_abort();
        corrupt = 1;
    }
    /* closed before the wipe, which releases the GIL for large secrets: no
     * other thread reaches the pages, nor closes them again, meanwhile */
    self->m.data = NULL;
    self->locked = 0;
    if (can_wipe)
        wipe(data - CANARY_SIZE, (size_t)(self->m.size + CANARY_SIZE));
    unmap_or_bury(base, self->m.capacity, 0);   /* releases the lock with the pages */
    mapping_release(&self->m);   /* the rest: the registry, the record */
    return corrupt;
}

/* ------------------------------------------------------------------ */
/* creation                                                            */

/* Map and prepare an anonymous secret; *call names the step that failed. */
static int
map_anonymous(SecretObject *s, Py_ssize_t total, int lock, const char **call)
{
    Py_ssize_t P = kernel.page, inner = total - 2 * P;
    int guard_madvise = s->guard == GUARD_MADVISE, err;
    MapSpec spec = {guard_madvise ? PROT_RW : PROT_NONE, 0, 0, 0, P, P, NULL};
    void *base;
    char *pages;

    *call = "mmap";
    err = os_map(&base, NULL, (size_t)total, spec.prot, 0, -1, 0);
    if (err)
        return err;
    mapping_init(&s->m, base, 0, total, &spec, -1);
    pages = (char *)base + P;
    if ((err = rec_room(&s->m.rec, 4)) != 0)
        goto fail;
    if (guard_madvise) {
        *call = "madvise MADV_GUARD_INSTALL";
        err = os_install_guards(base, (size_t)P, pages + inner, (size_t)P);
        if (err)
            goto fail;
        rec_set(&s->m.rec, 0, P, -1, RUN_GUARD, RUN_GUARD);
        rec_set(&s->m.rec, P + inner, total, -1, RUN_GUARD, RUN_GUARD);
    }
    else {
        *call = "mprotect";
        err = os_protect(pages, (size_t)inner, PROT_RW);
        if (err)
            goto fail;
        rec_set(&s->m.rec, P, P + inner, PROT_RW, 0, 0);
    }
    *call = "madvise MADV_DONTDUMP";
    if ((err = mapping_advise_flags(&s->m, 0, total, MADV_DONTDUMP)) != 0)
        goto fail;
    *call = "madvise MADV_WIPEONFORK";
    if ((err = mapping_advise_flags(&s->m, P, P + inner, MADV_WIPEONFORK)) != 0)
        goto fail;
    if (lock != LOCK_OFF) {
        if (inner >= SLOW_CALL_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            err = os_lock(pages, (size_t)inner, 0);
            Py_END_ALLOW_THREADS
        }
        else
            err = os_lock(pages, (size_t)inner, 0);
        s->locked = !err;
        if (err && lock == LOCK_REQUIRED) {
            *call = "mlock";
            goto fail;
        }
        if (err)
            os_unlock(pages, (size_t)inner);   /* whatever part a failed mlock locked */
    }
    return 0;
fail:
    os_unmap(base, (size_t)total);
    rec_free(&s->m.rec);
    s->m.data = NULL;
    return err;
}

/* Map a secretmem file between two PROT_NONE guard pages. */
static int
map_memfd_secret(SecretObject *s, Py_ssize_t total, const char **call)
{
    Py_ssize_t P = kernel.page, inner = total - 2 * P;
    MapSpec spec = {PROT_NONE, 0, 0, 0, P, P, NULL};
    void *base, *pages;
    int fd, err;

    *call = "memfd_secret";
    err = os_memfd_secret(&fd, O_CLOEXEC);
    if (err)
        return err;
    *call = "ftruncate";
    err = os_file_truncate(fd, inner);
    if (!err) {
        *call = "mmap";
        err = os_map(&base, NULL, (size_t)total, PROT_NONE, 0, -1, 0);
    }
    if (err) {
        os_close(fd);
        return err;
    }
    mapping_init(&s->m, base, 0, total, &spec, -1);
    *call = "mmap memfd_secret";
    err = os_map(&pages, (char *)base + P, (size_t)inner, PROT_RW, MAP_SHARED | MAP_FIXED, fd, 0);
    os_close(fd);   /* the mapping keeps the file */
    if (!err)
        err = rec_room(&s->m.rec, 4);
    if (!err) {
        rec_set(&s->m.rec, P, P + inner, PROT_RW, 0, 0);
        *call = "madvise MADV_DONTFORK";
        err = mapping_advise_flags(&s->m, P, P + inner, MADV_DONTFORK);
    }
    if (err) {
        os_unmap(base, (size_t)total);
        rec_free(&s->m.rec);
        s->m.data = NULL;
        return err;
    }
    /* never dumped by the kernel; zero pages in a child: see the file's head */
    mapping_advise_flags(&s->m, 0, total, MADV_DONTDUMP);
    rec_set(&s->m.rec, P, P + inner, -1, RUN_WIPEONFORK, RUN_WIPEONFORK);
    s->locked = 1;
    return 0;
}

/* _create(size, backend, guard, lock, abort): a secret buffer of cls, in one
 * call. OSError with the failed step as its filename when the kernel refuses
 * ("mlock": the lock, with lock=LOCK_REQUIRED; "mmap memfd_secret": the
 * secretmem pages, which count against RLIMIT_MEMLOCK). */
static PyObject *
secret_create(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size, total;
    int backend, guard, lock, abort_mode, err;
    const char *call = "mmap";
    SecretObject *self;
    allocfunc alloc;

    if (check_nargs("_create", nargs, 5, 5) < 0 || arg_ssize(args[0], "size", &size) < 0
        || arg_int(args[1], "backend", &backend) < 0 || arg_int(args[2], "guard", &guard) < 0
        || arg_int(args[3], "lock", &lock) < 0 || arg_int(args[4], "abort", &abort_mode) < 0)
        return NULL;
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, kernel.secret_type)) {
        PyErr_SetString(PyExc_TypeError, "_create() makes secret buffers");
        return NULL;
    }
    if (size <= 0 || backend < 0 || backend > 1 || guard < 0 || guard > 1 || lock < 0
        || lock > 2) {
        PyErr_SetString(PyExc_ValueError, "bad secret buffer parameters");
        return NULL;
    }
    if (size > PY_SSIZE_T_MAX - CANARY_SIZE - 3 * kernel.page)
        return raise_alloc_error(ENOMEM, size, "cannot map a secret buffer of %zd bytes: "
                                 "more than the address space holds", size);
    if (fill_canary() < 0)
        return NULL;
    total = round_up(size + CANARY_SIZE, kernel.page) + 2 * kernel.page;
    /* allocated before mapping: nothing to undo but the object if mapping fails */
    alloc = (allocfunc)PyType_GetSlot((PyTypeObject *)cls, Py_tp_alloc);
    self = (SecretObject *)alloc((PyTypeObject *)cls, 0);
    if (self == NULL)
        return NULL;
    self->backend = backend;
    self->guard = backend == BACKEND_MEMFD_SECRET ? GUARD_MPROTECT : guard;
    self->abort_on_corruption = abort_mode != 0;
    err = backend == BACKEND_MEMFD_SECRET ? map_memfd_secret(self, total, &call)
                                          : map_anonymous(self, total, lock, &call);
    if (err) {
        Py_DECREF(self);
        return raise_os_error(err, call);
    }
    kernel.mapped_bytes += total;
    trace_mapped(self->m.data, total);
    self->m.size = size;
    memcpy(self->m.data + data_offset(self) - CANARY_SIZE, kernel.canary, CANARY_SIZE);
    if (mapping_register(&self->m) != 0) {   /* the fork hook visits it (memfd_secret: zero pages) */
        Py_DECREF(self);   /* wiped and unmapped */
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

MADE_BY(secret_new, "secret buffers are made by SecretBuffer(size)")

/* ------------------------------------------------------------------ */
/* close                                                               */

static PyObject *
secret_close(SecretObject *self, PyObject *unused)
{
    Py_ssize_t size = self->m.size;

    if (self->m.data == NULL)
        Py_RETURN_NONE;
    if (mapping_exports(&self->m) > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close the secret buffer: %zd buffer(s) of it are exported",
                     mapping_exports(&self->m));
        return NULL;
    }
    /* the wipe writes: make the pages writable first (nothing changes if refused) */
    if (secret_set_access(self, PROT_RW) < 0)
        return NULL;
    if (secret_release(self, 1))
        return corruption_error(size);
    Py_RETURN_NONE;
}

static int
secret_teardown(PyObject *obj)
{
    SecretObject *self = (SecretObject *)obj;
    Py_ssize_t size = self->m.size;

    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->m.data != NULL) {
        /* (an mprotect refused here leaves the pages unwiped, but still unmapped) */
        int can_wipe = access_of(self) == PROT_RW
                       || os_protect(pages_of(self), (size_t)inner_of(self), PROT_RW) == 0;
        if (secret_release(self, can_wipe)) {
            /* raise mode: nobody to raise to; report it as unraisable */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            corruption_error(size);
            PyErr_WriteUnraisable((PyObject *)Py_TYPE(obj));
            PyErr_Restore(type, value, tb);
        }
    }
    else if (self->m.rec.runs != &self->m.rec.one)
        rec_free(&self->m.rec);
    mapping_free_extra(&self->m);
    return 0;
}

KERNEL_DEALLOC(secret_dealloc, secret_teardown)

/* ------------------------------------------------------------------ */
/* getters                                                             */

static Py_ssize_t
secret_length(SecretObject *self)
{
    return self->m.size;
}

static PyObject *
secret_get_address(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return PyLong_FromVoidPtr(self->m.data + data_offset(self));
}

static PyObject *
secret_get_access(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return PyUnicode_FromString(access_name(access_of(self)));
}

static PyObject *
secret_get_prot(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(access_of(self));
}

static PyObject *
secret_get_locked(SecretObject *self, void *closure)
{
    return PyBool_FromLong(self->m.data != NULL && self->locked && !forked(self));
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
secret_get_forked(SecretObject *self, void *closure)
{
    return PyBool_FromLong(forked(self));
}

/* _mapping -> (base, total, pages, inner): where the guards and secret pages are */
static PyObject *
secret_get_mapping(SecretObject *self, void *closure)
{
    if (secret_check_open(self) < 0)
        return NULL;
    return Py_BuildValue("(NnNn)", PyLong_FromVoidPtr(self->m.data), self->m.capacity,
                         PyLong_FromVoidPtr(pages_of(self)), inner_of(self));
}

/* _register(MemoryCorruptionError): the type raised in raise mode */
static PyObject *
secret_register(PyObject *module, PyObject *type)
{
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "_register_secret_errors() takes an exception type");
        return NULL;
    }
    REPLACE_REF(kernel.memory_corruption, Py_NewRef(type));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* the type                                                            */

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_FAST(secret_create)
LOCKED_O(secret_close)
LOCKED_O(secret_noaccess)
LOCKED_O(secret_readonly)
LOCKED_O(secret_readwrite)
LOCKED_O(secret_open)
LOCKED_FASTKW(secret_write)
LOCKED_O(secret_compare)

static PyMethodDef secret_methods[] = {
    {"_create", (PyCFunction)(void (*)(void))LOCKED(secret_create), METH_FASTCALL | METH_CLASS,
     "_create(size, backend, guard, lock, abort): map a secret buffer (OSError whose\n"
     "filename names the step the kernel refused)."},
    METHOD_NOARGS("close", secret_close,
        "close($self, /)\n--\n\n"
        "Check the canary, wipe, unlock and unmap; closing a closed buffer does nothing.\n"
        "BufferError (nothing changed) while a buffer of it is exported."),
    METHOD_NOARGS("noaccess", secret_noaccess,
        "noaccess($self, /)\n--\n\nMake the secret pages inaccessible (PROT_NONE)."),
    METHOD_NOARGS("readonly", secret_readonly,
        "readonly($self, /)\n--\n\nMake the secret pages read-only."),
    METHOD_NOARGS("readwrite", secret_readwrite,
        "readwrite($self, /)\n--\n\nMake the secret pages readable and writable."),
    METHOD_O("_open", secret_open,
        "_open(write) -> SecretOpening: open the pages and export them for a block."),
    METHOD_FASTKW("write", secret_write,
        "write($self, /, data, offset=0)\n--\n\n"
        "Copy a bytes-like object into the secret at offset (no copy in between).\n"
        "Needs access 'readwrite'."),
    METHOD_O("compare", secret_compare,
        "compare($self, other, /)\n--\n\n"
        "Whether other (bytes-like, or a SecretBuffer) holds the same bytes, in time\n"
        "that depends on the length only. Needs read access."),
    {NULL, NULL, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_GET(secret_get_address)
LOCKED_GET(secret_get_access)
LOCKED_GET(secret_get_locked)
LOCKED_GET(secret_get_backend)
LOCKED_GET(secret_get_guard)
LOCKED_GET(secret_get_prot)
LOCKED_GET(secret_get_forked)
LOCKED_GET(secret_get_mapping)
LOCKED_GET(field_get)

static PyGetSetDef secret_getset[] = {
    {"address", (getter)LOCKED(secret_get_address), NULL,
     "Address of the first secret byte, for interop (ctypes, cffi).", NULL},
    {"access", (getter)LOCKED(secret_get_access), NULL,
     "What the secret pages allow: \"none\", \"read\" or \"readwrite\".", NULL},
    {"locked", (getter)LOCKED(secret_get_locked), NULL,
     "Whether the secret pages are locked in memory (never swapped).", NULL},
    {"backend", (getter)LOCKED(secret_get_backend), NULL,
     "Where the pages come from: \"memfd_secret\" or \"anonymous\".", NULL},
    {"guard", (getter)LOCKED(secret_get_guard), NULL,
     "How the guard pages are made: \"madvise\" (MADV_GUARD_INSTALL) or \"mprotect\".", NULL},
    FIELD_GETSET("closed", SecretObject, m, GET_CLOSED, "True once the buffer is wiped and unmapped."),
    {"_prot", (getter)LOCKED(secret_get_prot), NULL, "The access as PROT_* bits.", NULL},
    {"_forked", (getter)LOCKED(secret_get_forked), NULL, "Inherited over fork (zero pages).", NULL},
    FIELD_GETSET("_exports", SecretObject, m, GET_EXPORTS, "Live buffers."),
    {"_mapping", (getter)LOCKED(secret_get_mapping), NULL,
     "(base, total, pages, inner): the mapping and its secret pages.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef secret_members[] = {
    {"size", T_PYSSIZET, offsetof(SecretObject, m) + offsetof(Mapping, size), READONLY,
     "Bytes of secret: len(buf)."},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(SecretObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_LEN(secret_length)
LOCKED_BUFFER(secret)

static PyType_Slot secret_slots[] = {
    {Py_tp_doc, "Secret memory: guard pages, a canary, locked, never dumped, wiped."},
    {Py_tp_new, secret_new},
    {Py_tp_dealloc, LOCKED(secret_dealloc)},
    {Py_tp_methods, secret_methods},
    {Py_tp_getset, secret_getset},
    {Py_tp_members, secret_members},
    {Py_sq_length, LOCKED(secret_length)},
    {Py_mp_length, LOCKED(secret_length)},
    BUFFER_SLOTS(secret),
    {0, NULL},
};

static PyType_Spec secret_spec
    = KERNEL_SPEC("Secret", SecretObject, Py_TPFLAGS_BASETYPE, secret_slots);

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_O(secret_register)

static PyMethodDef secret_functions[] = {
    METHOD_O("_register_secret_errors", secret_register,
        "_register_secret_errors($module, memory_corruption_error, /)\n--\n\n"
        "The exception type a canary mismatch raises (on_corruption=\"raise\")."),
    {NULL, NULL, 0, NULL},
};

int
secret_init(PyObject *module)
{
    REPLACE_REF(kernel.secret_type,
               (PyTypeObject *)PyType_FromModuleAndSpec(module, &secret_spec, NULL));
    if (kernel.secret_type == NULL
        || PyModule_AddObjectRef(module, "Secret", (PyObject *)kernel.secret_type) < 0)
        return -1;
    REPLACE_REF(kernel.opening_type,
               (PyTypeObject *)PyType_FromModuleAndSpec(module, &opening_spec, NULL));
    if (kernel.opening_type == NULL
        || PyModule_AddObjectRef(module, "SecretOpening", (PyObject *)kernel.opening_type) < 0
        || PyModule_AddFunctions(module, secret_functions) < 0)
        return -1;
    return 0;
}

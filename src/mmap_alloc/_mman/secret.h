/*
 * The secret extension's shared declarations (secret.c: making, closing
 * and the type; secret_access.c: the access state, open(), buffers and
 * contents). The layout and the invariants are at the head of secret.c.
 */
#ifndef MMAP_ALLOC_SECRET_H
#define MMAP_ALLOC_SECRET_H

#include "mman.h"

#define CANARY_SIZE 16

enum { BACKEND_ANONYMOUS = 0, BACKEND_MEMFD_SECRET = 1 };
enum { GUARD_MPROTECT = 0, GUARD_MADVISE = 1 };
enum { LOCK_OFF = 0, LOCK_BEST_EFFORT = 1, LOCK_REQUIRED = 2 };

typedef struct {
    PyObject_HEAD
    Mapping m;                  /* the whole span; m.size: bytes of secret */
    int locked;                 /* the secret pages were locked (mlock, or secretmem) */
    int backend;                /* BACKEND_* */
    int guard;                  /* GUARD_* */
    int abort_on_corruption;    /* canary mismatch: abort() (1) or raise (0) */
    int opens;                  /* open() blocks not ended yet (armed SecretOpenings) */
    int access_before;          /* the access before the first of them */
    PyObject *weakreflist;
} SecretObject;

/* ------------------------------------------------------------------ */
/* layout                                                              */

static inline Py_ssize_t
inner_of(const SecretObject *s)
{
    return s->m.capacity - 2 * kernel.page;
}

static inline char *
pages_of(const SecretObject *s)
{
    return s->m.data + kernel.page;
}

/* Offset of the first secret byte in the mapping. */
static inline Py_ssize_t
data_offset(const SecretObject *s)
{
    return s->m.capacity - kernel.page - s->m.size;
}

static inline int
access_of(const SecretObject *s)
{
    return s->m.rec.runs[1].prot;
}

static inline int
forked(const SecretObject *s)
{
    return s->m.gen != kernel.fork_generation;
}

static inline int
secret_check_open(SecretObject *self)
{
    if (self->m.data == NULL) {
        PyErr_SetString(PyExc_ValueError, "secret buffer is closed");
        return -1;
    }
    return 0;
}

static inline const char *
access_name(int access)
{
    return access == PROT_NONE ? "none" : access == PROT_READ ? "read" : "readwrite";
}

/* ------------------------------------------------------------------ */
/* secret_access.c                                                     */

/* Set the protection of the secret pages, with the export rules; -1 + exception. */
int secret_set_access(SecretObject *self, int prot);
PyObject *secret_noaccess(SecretObject *self, PyObject *unused);
PyObject *secret_readonly(SecretObject *self, PyObject *unused);
PyObject *secret_readwrite(SecretObject *self, PyObject *unused);
PyObject *secret_open(SecretObject *self, PyObject *arg);
/* The type of _open's token (secret_access.c). */
extern PyType_Spec opening_spec;
int secret_getbuffer(SecretObject *self, Py_buffer *view, int flags);
void secret_releasebuffer(SecretObject *self, Py_buffer *view);
PyObject *secret_write(SecretObject *self, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames);
PyObject *secret_compare(SecretObject *self, PyObject *other);

#endif

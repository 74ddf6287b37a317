/*
 * The access state of a secret and what goes through it: noaccess,
 * readonly, readwrite; open() blocks; the buffers exported (holds on the
 * core's mapping); write() and the constant-time compare().
 */
#include "secret.h"

/* 1 if the n bytes at a and b are equal; time depends on n only. */
static int
equal_ct(const volatile unsigned char *a, const volatile unsigned char *b, size_t n)
{
    unsigned char d = 0;

    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return (int)(1 & ((unsigned int)(d - 1) >> 8));
}

/* ------------------------------------------------------------------ */
/* access                                                              */

/* The secret is open and its access has the bits of need (PROT_READ,
 * PROT_WRITE): 0, or -1 with the error saying how to get them. */
static int
secret_check_access(SecretObject *self, int need)
{
    int access;

    if (secret_check_open(self) < 0)
        return -1;
    access = access_of(self);
    if ((need & PROT_READ) && !(access & PROT_READ))
        PyErr_Format(PyExc_BufferError,
                     "the secret buffer is not readable (access '%s'): use buf.open() or "
                     "buf.readonly()", access_name(access));
    else if ((need & PROT_WRITE) && !(access & PROT_WRITE))
        PyErr_Format(PyExc_BufferError,
                     "the secret buffer is not writable (access '%s'): use "
                     "buf.open(write=True) or buf.readwrite()", access_name(access));
    else
        return 0;
    return -1;
}

/* Set the protection of the secret pages, with the export rules; -1 + exception. */
int
secret_set_access(SecretObject *self, int prot)
{
    Py_ssize_t P = kernel.page, n;

    if (secret_check_open(self) < 0)
        return -1;
    if (prot == access_of(self))
        return 0;
    n = mapping_conflicts(&self->m, P, P + inner_of(self), prot);
    if (n > 0) {
        PyErr_Format(PyExc_BufferError,
                     !(prot & PROT_READ)
                         ? "cannot make the secret buffer inaccessible: %zd buffer(s) of it are "
                           "exported"
                         : "cannot make the secret buffer read-only: %zd writable buffer(s) of "
                           "it are exported", n);
        return -1;
    }
    return mapping_set_prot(&self->m, P, P + inner_of(self), prot);
}

static PyObject *
secret_access_method(SecretObject *self, int prot)
{
    if (secret_set_access(self, prot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
secret_noaccess(SecretObject *self, PyObject *unused)
{
    return secret_access_method(self, PROT_NONE);
}

PyObject *
secret_readonly(SecretObject *self, PyObject *unused)
{
    return secret_access_method(self, PROT_READ);
}

PyObject *
secret_readwrite(SecretObject *self, PyObject *unused)
{
    return secret_access_method(self, PROT_RW);
}

/* ------------------------------------------------------------------ */
/* buffers                                                             */

/* _open(write) -> (memoryview, previous access): raise the access the block
 * needs and export the secret, in one call. The first of nested blocks
 * remembers the access before it; the last to end restores it (_restore). */
PyObject *
secret_open(SecretObject *self, PyObject *arg)
{
    int write = PyObject_IsTrue(arg), previous, need;
    Py_ssize_t start;
    PyObject *memory;

    if (write < 0 || secret_check_open(self) < 0)
        return NULL;
    previous = access_of(self);
    need = write ? PROT_RW : (previous | PROT_READ);
    if (need != previous && secret_set_access(self, need) < 0)
        return NULL;
    start = data_offset(self);
    memory = view_new((PyObject *)self, &self->m, start, start + self->m.size, write);
    if (memory == NULL) {
        /* no view: take back the access raised for it, if nothing else changed it */
        if (self->m.data != NULL && access_of(self) == need && need != previous) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (secret_set_access(self, previous) < 0)
                PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        return NULL;
    }
    if (self->opens++ == 0)
        self->access_before = previous;
    return Py_BuildValue("(Ni)", memory, previous);
}

/* _restore(access): the end of an open() block: the last one to end sets
 * the access before the first back (access: what this block found, used
 * when no count was kept); nothing once closed. A refusal (a buffer made in
 * the block lives on) still ends the block. */
PyObject *
secret_restore(SecretObject *self, PyObject *arg)
{
    int prot;

    if (arg_int(arg, "access", &prot) < 0)
        return NULL;
    if (prot != PROT_NONE && prot != PROT_READ && prot != PROT_RW) {
        PyErr_SetString(PyExc_ValueError, "access must be PROT_NONE, PROT_READ or PROT_RW");
        return NULL;
    }
    if (self->m.data == NULL)
        Py_RETURN_NONE;
    if (self->opens > 0) {
        if (--self->opens > 0)
            Py_RETURN_NONE;
        prot = self->access_before;
    }
    if (secret_set_access(self, prot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

int
secret_getbuffer(SecretObject *self, Py_buffer *view, int flags)
{
    int writable;
    Py_ssize_t start;
    Hold *h;

    view->obj = NULL;
    if (secret_check_access(self, PROT_READ | (flags & PyBUF_WRITABLE ? PROT_WRITE : 0)) < 0)
        return -1;
    writable = (access_of(self) & PROT_WRITE) != 0;
    start = data_offset(self);
    h = mapping_hold(&self->m, start, start + self->m.size, writable ? HOLD_WRITE : HOLD_READ);
    if (h == NULL)
        return -1;
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->m.data + start, self->m.size, !writable,
                          flags) < 0) {
        mapping_unhold(&self->m, h);
        return -1;
    }
    view->internal = h;
    return 0;
}

void
secret_releasebuffer(SecretObject *self, Py_buffer *view)
{
    Hold *h = buffer_release_once(view);

    if (h != NULL)
        mapping_unhold(&self->m, h);
}

/* ------------------------------------------------------------------ */
/* contents                                                            */

/* write(data, offset=0): copy a bytes-like object in at offset */
PyObject *
secret_write(SecretObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *data, *offset_obj;
    Py_ssize_t offset = 0;
    Py_buffer src;

    /* arguments first (offset's __index__ may run Python code), then checks */
    if (parse_data_offset(args, nargs, kwnames, "write", &data, &offset_obj) < 0
        || arg_buffer(data, "data", &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (offset_obj != NULL && arg_ssize(offset_obj, "offset", &offset) < 0)
        goto fail;
    if (secret_check_access(self, PROT_WRITE) < 0)
        goto fail;
    if (offset > self->m.size || src.len > self->m.size - offset) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd + %zd bytes of data lie outside the secret buffer (size %zd)",
                     offset, src.len, self->m.size);
        goto fail;
    }
    memmove(self->m.data + data_offset(self) + offset, src.buf, (size_t)src.len);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&src);
    return NULL;
}

/* compare(other) -> bool: equal contents, in time that depends on the length only */
PyObject *
secret_compare(SecretObject *self, PyObject *other)
{
    Py_buffer b;
    int equal;

    if (PyObject_GetBuffer(other, &b, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            raise_wrong_type(other, "compare() takes a bytes-like object or a SecretBuffer");
        }
        return NULL;
    }
    if (secret_check_access(self, PROT_READ) < 0)
        goto fail;
    /* lengths are not secret: unequal ones compare False at once */
    equal = b.len == self->m.size
            && equal_ct((const volatile unsigned char *)self->m.data + data_offset(self),
                        (const volatile unsigned char *)b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyBool_FromLong(equal);
fail:
    PyBuffer_Release(&b);
    return NULL;
}


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

/* The token of an open() block (SecretOpening): armed (secret set) while
 * the block counts in its secret's opens. The block ends exactly once, by
 * release() or by the token's death (the frame that held it unwound after
 * an interrupt): no line of Python between _open and the end can lose it. */
typedef struct {
    PyObject_HEAD
    SecretObject *secret;       /* NULL once the block ended (or never began) */
    PyObject *view;             /* the block's memoryview */
    int previous;               /* the access the block found */
} OpeningObject;

/* _open(write) -> SecretOpening: raise the access the block needs and
 * export the secret, in one call. The first of nested blocks remembers the
 * access before it; the last to end restores it (opening_end). */
PyObject *
secret_open(SecretObject *self, PyObject *arg)
{
    int write = PyObject_IsTrue(arg), previous, need;
    Py_ssize_t start;
    PyObject *memory;
    OpeningObject *t;

    if (write < 0)
        return NULL;
    /* before the checks: an allocation may run the collector's finalizers */
    t = PyObject_New(OpeningObject, kernel.opening_type);
    if (t == NULL)
        return NULL;
    t->secret = NULL;
    t->view = NULL;
    t->previous = PROT_NONE;
    if (secret_check_open(self) < 0)
        goto fail;
    previous = access_of(self);
    need = write ? PROT_RW : (previous | PROT_READ);
    if (need != previous && secret_set_access(self, need) < 0)
        goto fail;
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
        goto fail;
    }
    if (self->opens++ == 0)
        self->access_before = previous;
    t->secret = (SecretObject *)Py_NewRef((PyObject *)self);
    t->view = memory;
    t->previous = previous;
    return (PyObject *)t;
fail:
    Py_DECREF(t);   /* not armed: its death changes nothing */
    return NULL;
}

/* The end of an open() block, once: its view released, its count given
 * back, and the last block to end sets the access before the first back
 * (nothing once the secret is closed). -1 with BufferError when that is
 * refused (a buffer made from the view lives on): the block has ended all
 * the same, and the access stays as it had it. */
static int
opening_end(OpeningObject *t)
{
    SecretObject *s = t->secret;
    PyObject *view = t->view, *r;
    int result = 0;

    if (s == NULL)
        return 0;
    t->secret = NULL;
    t->view = NULL;
    /* memoryview.release runs no Python code: the View's buffer goes back */
    r = PyObject_CallMethod(view, "release", NULL);
    if (r == NULL)
        PyErr_Clear();   /* a buffer of the memoryview lives on: the hold refuses below */
    Py_XDECREF(r);
    Py_DECREF(view);
    if (s->m.data != NULL && s->opens > 0 && --s->opens == 0)
        result = secret_set_access(s, s->access_before);
    Py_DECREF(s);
    return result;
}

/* release(): end the block (see opening_end); nothing once it has ended */
static PyObject *
opening_release(OpeningObject *t, PyObject *unused)
{
    if (opening_end(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
opening_get_view(OpeningObject *t, void *closure)
{
    if (t->view == NULL) {
        PyErr_SetString(PyExc_ValueError, "the open() block has ended");
        return NULL;
    }
    return Py_NewRef(t->view);
}

/* its death ends a block still open; a refusal has nobody to tell (the
 * access stays as the block had it, as a refused end of a block does) */
static int
opening_teardown(PyObject *obj)
{
    PyObject *type, *value, *tb;

    PyErr_Fetch(&type, &value, &tb);
    if (opening_end((OpeningObject *)obj) < 0)
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
    return 0;
}

KERNEL_DEALLOC(opening_dealloc, opening_teardown)

MADE_BY(opening_new, "open() blocks are made by SecretBuffer.open()")

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_O(opening_release)
LOCKED_GET(opening_get_view)

static PyMethodDef opening_methods[] = {
    METHOD_NOARGS("release", opening_release,
        "release($self, /)\n--\n\n"
        "End the block once: release the view, give its count back; the last block\n"
        "to end restores the access before the first. BufferError (the block ends,\n"
        "the access stays) while a buffer made from the view lives on."),
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef opening_getset[] = {
    {"view", (getter)LOCKED(opening_get_view), NULL,
     "The block's memoryview (ValueError once the block ended).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef opening_members[] = {
    {"previous", T_INT, offsetof(OpeningObject, previous), READONLY,
     "The access the block found (PROT_* bits)."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot opening_slots[] = {
    {Py_tp_doc, "An open() block of a secret buffer: ends once, by release() or its death."},
    {Py_tp_new, opening_new},
    {Py_tp_dealloc, LOCKED(opening_dealloc)},
    {Py_tp_methods, opening_methods},
    {Py_tp_getset, opening_getset},
    {Py_tp_members, opening_members},
    {0, NULL},
};

PyType_Spec opening_spec = KERNEL_SPEC("SecretOpening", OpeningObject, 0, opening_slots);

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


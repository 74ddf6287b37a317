/*
 * A region as a bytes-like object: len(), item and slice access with steps,
 * assignment, `in`, find/rfind and lazy iteration, each checked against the
 * protection record of the pages it touches (an unreadable page is a
 * BufferError, an unwritable one a TypeError), never through a memoryview.
 * On a mapping of a file the SIGBUS repair watches, each also raises
 * FileTruncatedError for pages repaired since the last refresh, checked
 * before the access and after it (the access may be what found them); the
 * fast paths leave those mappings to the full path, so anonymous memory pays
 * one flag test.
 */
#include "mman.h"

/* 0 if every page bytes [start, end) touch is readable; else BufferError
 * naming the first that is not, and -1. */
int
region_check_readable(RegionObject *self, Py_ssize_t start, Py_ssize_t end)
{
    PageRecord *rec = &self->m.rec;

    if (start >= end)
        return 0;
    if (rec->n == 1) {
        if (run_access(&rec->runs[0]) & PROT_READ)
            return 0;
        PyErr_Format(PyExc_BufferError, "region is not readable (its pages are %s)",
                     rec->runs[0].flags & RUN_GUARD ? "guard pages" : "not readable");
        return -1;
    }
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++) {
        if (!(run_access(&rec->runs[i]) & PROT_READ)) {
            Py_ssize_t at = rec_start(rec, i) > start ? rec_start(rec, i) : start;
            PyErr_Format(PyExc_BufferError,
                         "the region is not readable at offset %zd (see region.protections())",
                         at);
            return -1;
        }
    }
    return 0;
}

int
region_check_writable(RegionObject *self, Py_ssize_t start, Py_ssize_t end)
{
    PageRecord *rec = &self->m.rec;

    if (start >= end)
        return 0;
    if (rec->n == 1 && (run_access(&rec->runs[0]) & PROT_WRITE))
        return 0;
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++) {
        if (!(run_access(&rec->runs[i]) & PROT_WRITE)) {
            Py_ssize_t at = rec_start(rec, i) > start ? rec_start(rec, i) : start;
            PyErr_Format(PyExc_TypeError,
                         "cannot write to the region at offset %zd: its pages are %s", at,
                         (run_access(&rec->runs[i]) & PROT_READ) ? "read-only"
                                                                 : "not writable");
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* bytes-like access                                                   */

/* Whether the pages of a region all allow `need` (PROT_READ, PROT_WRITE)
 * and its record is one run (the common case): the fast paths test this and
 * nothing else, without a call. */
static inline int
uniform_allows(const RegionObject *self, int need)
{
    const Run *run = &self->m.rec.runs[0];

    return self->m.rec.n == 1 && !(run->flags & RUN_GUARD) && (run->prot & need);
}

/* The byte an exact int names on an open region whose pages all allow
 * `need` (a negative index counts from the end), or NULL with no exception:
 * the full path then decides, and raises the right error. */
static inline char *
fast_item(RegionObject *self, PyObject *key, int need)
{
    Py_ssize_t i = PyLong_AsSsize_t(key);

    if (i == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (i < 0)
        i += self->m.size;
    if (i < 0 || i >= self->m.size || self->m.data == NULL || !uniform_allows(self, need)
        || (self->m.flags & MAPPING_REPAIRABLE))
        return NULL;
    return self->m.data + i;
}

/* FileTruncatedError if the elements start + k * step (0 <= k < length)
 * touch pages the SIGBUS repair replaced; 0 when not (and always, without a
 * call, for anonymous memory). */
static inline int
check_truncated(RegionObject *self, Py_ssize_t start, Py_ssize_t step, Py_ssize_t length)
{
    Py_ssize_t lo, hi;

    if (!(self->m.flags & MAPPING_REPAIRABLE) || length <= 0)
        return 0;
    lo = step < 0 ? start + (length - 1) * step : start;
    hi = (step < 0 ? start : start + (length - 1) * step) + 1;
    return repair_check(&self->m, lo, hi);
}

Py_ssize_t
region_length(RegionObject *self)
{
    if (self->m.data == NULL) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return -1;
    }
    return self->m.size;
}

/* 0 if every element start + k * step (0 <= k < length) lies on a page that
 * allows `need` (PROT_READ or PROT_WRITE); else the error of the first page
 * that does not (BufferError for reading, TypeError for writing) and -1.
 * Only the pages the elements touch count: an extended slice may step over
 * a guard page. */
static int
check_pages(RegionObject *self, Py_ssize_t start, Py_ssize_t step, Py_ssize_t length, int need)
{
    PageRecord *rec = &self->m.rec;
    Py_ssize_t lo, hi, stride;

    if (step < 0) {   /* the same elements, walked upwards */
        lo = start + (length - 1) * step;
        stride = -step;
    }
    else {
        lo = start;
        stride = step;
    }
    hi = lo + (length - 1) * stride + 1;
    for (Py_ssize_t i = rec_find(rec, lo); i < rec->n && rec_start(rec, i) < hi; i++) {
        Py_ssize_t run_lo = rec_start(rec, i), first;
        if (run_access(&rec->runs[i]) & need)
            continue;
        /* the first element at or above run_lo */
        first = run_lo <= lo ? lo : lo + (run_lo - lo + stride - 1) / stride * stride;
        if (first < hi && first < rec->runs[i].end) {
            if (need == PROT_READ)
                region_check_readable(self, first, first + 1);
            else
                region_check_writable(self, first, first + 1);
            return -1;
        }
    }
    return 0;
}

/* check_pages without a call where the region's pages are alike */
static inline int
check_elements(RegionObject *self, Py_ssize_t start, Py_ssize_t step, Py_ssize_t length,
               int need)
{
    if (length <= 0 || uniform_allows(self, need))
        return 0;
    return check_pages(self, start, step, length, need);
}

/* key -> an index of the region's bytes (negative from the end), or -1 with
 * IndexError or TypeError set (as bytearray). Converts before it checks:
 * __index__ may run Python code, so the region is checked open after it. */
static int
index_of(RegionObject *self, PyObject *key, Py_ssize_t *i)
{
    Py_ssize_t v;

    if (PyLong_Check(key)) {
        v = PyLong_AsSsize_t(key);
        if (v == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
            PyErr_SetString(PyExc_IndexError, "cannot fit 'int' into an index-sized integer");
            return -1;
        }
    }
    else if (PyIndex_Check(key)) {
        v = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (v == -1 && PyErr_Occurred())
            return -1;
    }
    else {
        raise_wrong_type(key, "region indices must be integers or slices");
        return -1;
    }
    *i = v;
    return 0;
}

/* The converted index i as an offset within the open region, or -1 with
 * ValueError (closed) or IndexError set. */
static int
bound_index(RegionObject *self, Py_ssize_t *i)
{
    Py_ssize_t v = *i;

    if (region_check_open(self) < 0)
        return -1;
    if (v < 0)
        v += self->m.size;
    if (v < 0 || v >= self->m.size) {
        PyErr_SetString(PyExc_IndexError, "region index out of range");
        return -1;
    }
    *i = v;
    return 0;
}

static int
slice_of(RegionObject *self, PyObject *key, Py_ssize_t *start, Py_ssize_t *stop,
         Py_ssize_t *step, Py_ssize_t *length)
{
    if (PySlice_Unpack(key, start, stop, step) < 0)
        return -1;
    if (self->m.data == NULL) {
        region_check_open(self);   /* sets the ValueError */
        return -1;
    }
    *length = PySlice_AdjustIndices(self->m.size, start, stop, *step);
    return 0;
}

PyObject *
region_subscript(RegionObject *self, PyObject *key)
{
    Py_ssize_t i, start, stop, step, length;
    PyObject *result;
    char *out;

    if (PyLong_CheckExact(key)) {
        /* the fast path: an exact int on an open region whose pages are alike;
         * anything else takes the full path, which raises the right error */
        char *p = fast_item(self, key, PROT_READ);
        if (p != NULL)
            return PyLong_FromLong((unsigned char)*p);
    }
    if (!PySlice_Check(key)) {
        unsigned char byte;
        if (index_of(self, key, &i) < 0 || bound_index(self, &i) < 0
            || check_elements(self, i, 1, 1, PROT_READ) < 0 || check_truncated(self, i, 1, 1) < 0)
            return NULL;
        byte = (unsigned char)self->m.data[i];
        if (check_truncated(self, i, 1, 1) < 0)
            return NULL;
        return PyLong_FromLong(byte);
    }
    if (slice_of(self, key, &start, &stop, &step, &length) < 0)
        return NULL;
    if (length == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    if (check_elements(self, start, step, length, PROT_READ) < 0
        || check_truncated(self, start, step, length) < 0)
        return NULL;
    if (step == 1)
        result = PyBytes_FromStringAndSize(self->m.data + start, length);
    else {
        result = PyBytes_FromStringAndSize(NULL, length);
        if (result == NULL)
            return NULL;
        /* no Python code ran since the checks: a bytes object is not GC-tracked */
        out = PyBytes_AsString(result);
        for (Py_ssize_t k = 0, at = start; k < length; k++, at += step)
            out[k] = self->m.data[at];
    }
    if (result != NULL && check_truncated(self, start, step, length) < 0)
        Py_CLEAR(result);
    return result;
}

/* value -> one byte, as bytearray converts an item: __index__, then
 * ValueError("byte must be in range(0, 256)") */
static int
byte_value(PyObject *value, unsigned char *out)
{
    int overflow;
    long v = PyLong_AsLongAndOverflow(value, &overflow);

    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < 0 || v > 255) {
        PyErr_SetString(PyExc_ValueError, "byte must be in range(0, 256)");
        return -1;
    }
    *out = (unsigned char)v;
    return 0;
}

int
region_ass_subscript(RegionObject *self, PyObject *key, PyObject *value)
{
    Py_ssize_t i, start, stop, step, length;
    unsigned char byte;
    PyObject *data = NULL;
    Py_buffer buf;
    int rc = -1;

    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "region does not support item deletion");
        return -1;
    }
    if (PyLong_CheckExact(key) && PyLong_CheckExact(value)) {
        /* the fast path: exact ints, an open region whose pages are alike */
        long v = PyLong_AsLong(value);
        if (v == -1 && PyErr_Occurred())
            PyErr_Clear();   /* the full path below raises the right error */
        else if (v >= 0 && v <= 255) {
            char *p = fast_item(self, key, PROT_WRITE);
            if (p != NULL) {
                *p = (char)v;
                return 0;
            }
        }
    }
    if (!PySlice_Check(key)) {
        /* as bytearray: the index, then the value, then the bounds (both
         * conversions may run Python code, so every check comes after them) */
        if (index_of(self, key, &i) < 0 || byte_value(value, &byte) < 0
            || bound_index(self, &i) < 0 || check_elements(self, i, 1, 1, PROT_WRITE) < 0
            || check_truncated(self, i, 1, 1) < 0)
            return -1;
        self->m.data[i] = (char)byte;
        return check_truncated(self, i, 1, 1);
    }
    /* the bytes to write, converted before any check (an iterable runs Python code) */
    if (PyBytes_CheckExact(value) || PyObject_CheckBuffer(value)) {
        if (PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE) == 0)
            data = Py_NewRef(value);
        else if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();   /* not contiguous: a copy, as bytearray makes */
            data = PyByteArray_FromObject(value);
            if (data == NULL)
                return -1;
            if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
                Py_DECREF(data);
                return -1;
            }
        }
        else
            return -1;
    }
    else if (PyUnicode_Check(value) || PyNumber_Check(value)) {
        PyErr_SetString(PyExc_TypeError,
                        "can assign only bytes, buffers, or iterables of ints in range(0, 256)");
        return -1;
    }
    else {
        /* an iterable of ints, read as bytearray reads it */
        PyObject *items = PyObject_GetIter(value);
        if (items == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError, "can assign only bytes, buffers, or iterables "
                                                 "of ints in range(0, 256)");
            }
            return -1;
        }
        data = PyByteArray_FromObject(items);
        Py_DECREF(items);
        if (data == NULL)
            return -1;
        if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
            Py_DECREF(data);
            return -1;
        }
    }
    if (slice_of(self, key, &start, &stop, &step, &length) < 0)
        goto done;
    if (buf.len != length) {
        PyErr_Format(PyExc_ValueError,
                     "region slice assignment is wrong size: %zd byte(s) given for a slice "
                     "of %zd byte(s) (a region cannot change its length)", buf.len, length);
        goto done;
    }
    if (check_elements(self, start, step, length, PROT_WRITE) < 0
        || check_truncated(self, start, step, length) < 0)
        goto done;
    if (length == 0) {
        rc = 0;
        goto done;
    }
    if (step == 1)
        memmove(self->m.data + start, buf.buf, (size_t)length);
    else {
        const char *src = buf.buf;
        char *copy = NULL;
        if (src + length > self->m.data && src < self->m.data + self->m.capacity) {
            copy = PyMem_Malloc((size_t)length);   /* the source is the region itself */
            if (copy == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(copy, src, (size_t)length);
            src = copy;
        }
        for (Py_ssize_t k = 0, at = start; k < length; k++, at += step)
            self->m.data[at] = src[k];
        PyMem_Free(copy);
    }
    rc = check_truncated(self, start, step, length);
done:
    PyBuffer_Release(&buf);
    Py_DECREF(data);
    return rc;
}

/* A needle: one byte value, or a bytes-like object (its buffer held in buf). */
typedef struct {
    Py_buffer buf;
    unsigned char byte;
    int is_byte;
} Needle;

/* sub -> a needle, as bytes reads it. find/rfind (`what` names the argument
 * in the TypeError): a bytes-like object, else an int (or __index__) byte
 * value. `in` (what == NULL): an int or __index__ first, so an object with
 * both (a numpy integer) is a byte value there, else a bytes-like object. */
static int
needle_get(PyObject *sub, Needle *n, const char *what)
{
    n->is_byte = 0;
    if (what != NULL && PyObject_CheckBuffer(sub))
        return PyObject_GetBuffer(sub, &n->buf, PyBUF_SIMPLE);
    if (PyLong_Check(sub) || PyIndex_Check(sub)) {
        n->is_byte = 1;
        return byte_value(sub, &n->byte);
    }
    if (what != NULL) {
        PyObject *name = PyType_GetName(Py_TYPE(sub));
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "%s should be integer or bytes-like object, not '%U'",
                         what, name);
            Py_DECREF(name);
        }
        return -1;
    }
    return PyObject_GetBuffer(sub, &n->buf, PyBUF_SIMPLE);
}

static void
needle_release(Needle *n)
{
    if (!n->is_byte)
        PyBuffer_Release(&n->buf);
}

/* Find needle in data[start, end): its index, or -1. */
static Py_ssize_t
search(const char *data, Py_ssize_t start, Py_ssize_t end, const Needle *n, int reverse)
{
    const char *needle = n->is_byte ? (const char *)&n->byte : n->buf.buf;
    Py_ssize_t len = n->is_byte ? 1 : n->buf.len;
    const char *p;

    if (len > end - start)
        return -1;
    if (len == 0)
        return reverse ? end : start;
    if (!reverse) {
        if (len == 1)
            p = memchr(data + start, needle[0], (size_t)(end - start));
        else
            p = memmem(data + start, (size_t)(end - start), needle, (size_t)len);
        return p == NULL ? -1 : p - data;
    }
    for (Py_ssize_t last = end - len; last >= start;) {
        p = memrchr(data + start, needle[0], (size_t)(last - start + 1));
        if (p == NULL)
            return -1;
        if (memcmp(p, needle, (size_t)len) == 0)
            return p - data;
        last = (p - data) - 1;
    }
    return -1;
}

/* A start or end argument of find/rfind, as bytes.find reads it: None keeps the
 * default, an int (or __index__) is clipped; a bad one, in 3.15's words there. */
static int
find_index(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t v;

    if (o == Py_None)
        return 0;
    if (!PyLong_Check(o) && !PyIndex_Check(o)) {
        PyErr_SetString(PyExc_TypeError,
                        Py_Version >= 0x030F0000
                            ? "slice indices must be integers or have an __index__ method"
                            : "slice indices must be integers or None or have an __index__ method");
        return -1;
    }
    v = PyNumber_AsSsize_t(o, NULL);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* find/rfind(sub, start=None, end=None) as bytes.find: indices clipped, negatives from the end */
static PyObject *
region_find_impl(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, int reverse)
{
    Needle needle;
    Py_ssize_t start = 0, end = PY_SSIZE_T_MAX, found = -1, asked;
    PyObject *result = NULL;

    if (check_nargs(reverse ? "rfind" : "find", nargs, 1, 3) < 0)
        return NULL;
    /* convert everything first (as bytes.find: start, end, then the needle) */
    if ((nargs > 1 && find_index(args[1], &start) < 0)
        || (nargs > 2 && find_index(args[2], &end) < 0))
        return NULL;
    if (needle_get(args[0], &needle, "argument") < 0)
        return NULL;
    if (region_check_open(self) < 0)
        goto done;
    asked = start;
    PySlice_AdjustIndices(self->m.size, &start, &end, 1);
    if (asked <= self->m.size && start <= end) {   /* else absent, as for bytes */
        if (check_elements(self, start, 1, end - start, PROT_READ) < 0
            || check_truncated(self, start, 1, end - start) < 0)
            goto done;
        found = search(self->m.data, start, end, &needle, reverse);
        if (check_truncated(self, start, 1, end - start) < 0)
            goto done;
    }
    result = PyLong_FromSsize_t(found);
done:
    needle_release(&needle);
    return result;
}

PyObject *
region_find(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return region_find_impl(self, args, nargs, 0);
}

PyObject *
region_rfind(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return region_find_impl(self, args, nargs, 1);
}

int
region_contains(RegionObject *self, PyObject *sub)
{
    Needle needle;
    int rc = -1;

    if (needle_get(sub, &needle, NULL) < 0)
        return -1;
    if (region_check_open(self) == 0 && check_elements(self, 0, 1, self->m.size, PROT_READ) == 0
        && check_truncated(self, 0, 1, self->m.size) == 0) {
        rc = search(self->m.data, 0, self->m.size, &needle, 0) >= 0;
        if (check_truncated(self, 0, 1, self->m.size) < 0)
            rc = -1;
    }
    needle_release(&needle);
    return rc;
}

/* ------------------------------------------------------------------ */
/* iteration: one byte at a time, never a copy                         */

typedef struct {
    PyObject_HEAD
    RegionObject *region;   /* NULL once exhausted */
    Py_ssize_t index;
} IterObject;

PyObject *
region_iter(RegionObject *self)
{
    IterObject *it;

    if (region_check_open(self) < 0)
        return NULL;
    it = PyObject_GC_New(IterObject, kernel.iter_type);
    if (it == NULL)
        return NULL;
    it->region = (RegionObject *)Py_NewRef((PyObject *)self);
    it->index = 0;
    PyObject_GC_Track(it);
    return (PyObject *)it;
}

/* Each step checks the region as region[i] does: it may have been closed,
 * shrunk or protected since the last one. */
static PyObject *
iter_next(IterObject *it)
{
    RegionObject *r = it->region;
    Py_ssize_t i = it->index;
    unsigned char byte;

    if (r == NULL)
        return NULL;
    if (i < r->m.size && r->m.data != NULL && uniform_allows(r, PROT_READ)
        && !(r->m.flags & MAPPING_REPAIRABLE)) {
        it->index = i + 1;
        return PyLong_FromLong((unsigned char)r->m.data[i]);
    }
    if (region_check_open(r) < 0)
        return NULL;
    if (i >= r->m.size) {
        it->region = NULL;
        Py_DECREF(r);
        return NULL;
    }
    if (check_elements(r, i, 1, 1, PROT_READ) < 0 || check_truncated(r, i, 1, 1) < 0)
        return NULL;
    byte = (unsigned char)r->m.data[i];
    if (check_truncated(r, i, 1, 1) < 0)
        return NULL;
    it->index = i + 1;
    return PyLong_FromLong(byte);
}

static PyObject *
iter_length_hint(IterObject *it, PyObject *unused)
{
    RegionObject *r = it->region;
    Py_ssize_t left = r == NULL || r->m.data == NULL ? 0 : r->m.size - it->index;

    return PyLong_FromSsize_t(left > 0 ? left : 0);
}

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_O(iter_length_hint)

static PyMethodDef iter_methods[] = {
    METHOD_NOARGS("__length_hint__", iter_length_hint, "Bytes left to iterate over."),
    {NULL, NULL, 0, NULL},
};

ONE_REF_TRAVERSE(iter, IterObject, region)
ONE_REF_CLEAR(iter, IterObject, region)

KERNEL_DEALLOC(iter_dealloc, iter_clear)

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_UNARY(iter_next)
LOCKED_INQUIRY(iter_clear)

static PyType_Slot iter_slots[] = {
    {Py_tp_doc, "An iterator over a region's bytes as ints."},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, LOCKED(iter_next)},
    {Py_tp_methods, iter_methods},
    GC_SLOTS(iter),
    {0, NULL},
};

PyType_Spec iter_spec
    = KERNEL_SPEC("RegionIterator", IterObject, Py_TPFLAGS_HAVE_GC, iter_slots);


/*
 * Page protection of a region: protect, make_exec, make_writable,
 * flush_icache; and pins (the Pin token: a hold on a mapping that code or a
 * raw pointer needs). Each is one call: arguments converted first, then
 * checked against the record, exports and pins, then the protection and the
 * record changed together (mapping_set_prot).
 */
#include "mman.h"

/* The checks of one protect() call: BufferError when the change would take
 * EXEC from pinned code or access from an exported buffer. */
static int
check_range(RegionObject *self, Py_ssize_t start, Py_ssize_t n, int prot)
{
    Py_ssize_t end = start + n;

    if (n == 0 || rec_uniform(&self->m.rec, start, end, prot))
        return 0;
    if (mapping_pins(&self->m) > 0 && !(prot & PROT_EXEC)
        && (rec_access_any(&self->m.rec, start, end) & PROT_EXEC)) {
        PyErr_Format(PyExc_BufferError,
                     "cannot remove EXEC: %zd function(s) made by region.function() run code "
                     "in the region; delete them first", mapping_pins(&self->m));
        return -1;
    }
    if (mapping_exports(&self->m) > 0) {
        Py_ssize_t n = mapping_conflicts(&self->m, start, end, prot);
        if (n > 0) {
            PyErr_Format(PyExc_BufferError,
                         "cannot remove read or write permission: %zd exported buffer(s) or pin(s) of the "
                         "region cover those pages", n);
            return -1;
        }
    }
    return 0;
}

/* The checks and the change of one protect() call. */
static int
protect_range(RegionObject *self, Py_ssize_t start, Py_ssize_t n, int prot)
{
    if (n == 0 || rec_uniform(&self->m.rec, start, start + n, prot))
        return 0;
    if (check_range(self, start, n, prot) < 0)
        return -1;
    return mapping_set_prot(&self->m, start, start + n, prot);
}

/* Parse (perms, offset, length) or (offset, length) and resolve the range. */
static int
parse_protect(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              const char *fname, int *prot, Py_ssize_t *start, Py_ssize_t *n)
{
    PyObject *perms = NULL, *offset, *length;
    int rc = -1;

    /* the common call, protect(perms) / make_exec(): no conversion needed */
    if (kwnames == NULL && nargs == (prot == NULL ? 0 : 1)
        && (prot == NULL || PyLong_CheckExact(args[0]) || (PyLong_Check(args[0])
                                                          && !PyBool_Check(args[0])))) {
        if (prot != NULL) {
            long v = PyLong_AsLong(args[0]);
            if (v < 0 || v > PROT_ALL) {
                if (v == -1 && PyErr_Occurred())
                    PyErr_Clear();
                PyErr_Format(PyExc_ValueError,
                             "perms must combine Perm.READ, WRITE and EXEC, got %R", args[0]);
                return -1;
            }
            *prot = (int)v;
        }
        if (region_check_open(self) < 0
            || mapping_check_truncated(&self->m, 0, self->m.capacity) < 0)
            return -1;
        *start = 0;
        *n = self->m.capacity;
        return 0;
    }
    if (convert_range_args(args, nargs, kwnames, fname, &offset, &length,
                           prot != NULL ? &perms : NULL, prot != NULL ? "perms" : NULL) < 0)
        return -1;
    if (prot != NULL) {
        long v = PyLong_AsLong(perms);
        if (v < 0 || v > PROT_ALL) {
            if (v == -1 && PyErr_Occurred())
                PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "perms must combine Perm.READ, WRITE and EXEC, got %R",
                         perms);
            goto done;
        }
        *prot = (int)v;
    }
    if (region_check_open(self) < 0 || page_range(&self->m, offset, length, start, n) < 0
        || mapping_check_truncated(&self->m, *start, *start + *n) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(perms);
    Py_DECREF(offset);
    Py_DECREF(length);
    return rc;
}

/* _check_protect(perms, offset=0, length=None): raise what protect() would,
 * changing nothing */
PyObject *
region_check_protect(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    int prot;
    Py_ssize_t start, n;

    if (parse_protect(self, args, nargs, kwnames, "protect", &prot, &start, &n) < 0
        || check_range(self, start, n, prot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The common flip in one step: the whole of an open region whose record is
 * one plain run and which nothing holds (so nothing to check) goes to prot
 * with one mprotect: 1. 0 when it is not that case, or the kernel refused
 * (the general path then changes nothing and says why). */
static inline int
flip_whole(RegionObject *self, int prot)
{
    Mapping *m = &self->m;

    if (m->data == NULL || m->rec.n != 1 || m->rec.runs[0].flags || mapping_holds(m) != NULL)
        return 0;
    if (m->rec.runs[0].prot != prot) {
        if (os_protect(m->data, (size_t)m->capacity, prot) != 0)
            return 0;
        m->rec.runs[0].prot = (unsigned char)prot;
    }
    return 1;
}

PyObject *
region_protect(RegionObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int prot;
    Py_ssize_t start, n;

    if (parse_protect(self, args, nargs, kwnames, "protect", &prot, &start, &n) < 0)
        return NULL;
    if (start == 0 && n == self->m.capacity && flip_whole(self, prot))
        Py_RETURN_NONE;
    if (protect_range(self, start, n, prot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void
flush_readable(RegionObject *self, Py_ssize_t start, Py_ssize_t end)
{
    PageRecord *rec = &self->m.rec;

    /* cache maintenance by address needs read access (arm64) */
    for (Py_ssize_t i = rec_find(rec, start); i < rec->n && rec_start(rec, i) < end; i++) {
        Py_ssize_t lo = rec_start(rec, i), hi = rec->runs[i].end;
        lo = lo > start ? lo : start;
        hi = hi < end ? hi : end;
        if (run_access(&rec->runs[i]) & PROT_READ)
            os_flush_icache(self->m.data + lo, (size_t)(hi - lo));
    }
}

PyObject *
region_make_exec(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    Py_ssize_t start, n;

    if (nargs == 0 && kwnames == NULL && flip_whole(self, PROT_READ | PROT_EXEC)) {
        os_flush_icache(self->m.data, (size_t)self->m.capacity);
        Py_RETURN_NONE;
    }
    if (parse_protect(self, args, nargs, kwnames, "make_exec", NULL, &start, &n) < 0
        || protect_range(self, start, n, PROT_READ | PROT_EXEC) < 0)
        return NULL;
    flush_readable(self, start, start + n);
    Py_RETURN_NONE;
}

PyObject *
region_make_writable(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    Py_ssize_t start, n;

    if (nargs == 0 && kwnames == NULL && flip_whole(self, PROT_RW))
        Py_RETURN_NONE;
    if (parse_protect(self, args, nargs, kwnames, "make_writable", NULL, &start, &n) < 0
        || protect_range(self, start, n, PROT_RW) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
region_flush_icache(RegionObject *self, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    Py_ssize_t start, n;

    if (parse_protect(self, args, nargs, kwnames, "flush_icache", NULL, &start, &n) < 0)
        return NULL;
    flush_readable(self, start, start + n);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* pins                                                                */

typedef struct {
    TOKEN_HEAD
    char *address;
} PinObject;

PyObject *
pin_at(PyObject *owner, PyObject *arg,
       int (*target)(PyObject *owner, Py_ssize_t offset, PinTarget *t))
{
    Py_ssize_t offset = 0;
    PinObject *pin;
    PinTarget t;

    if (arg != NULL && arg_ssize(arg, "offset", &offset) < 0)
        return NULL;
    pin = (PinObject *)token_new(kernel.pin_type);   /* before the check */
    if (pin == NULL)
        return NULL;
    pin->address = NULL;
    if (target(owner, offset, &t) < 0
        || (pin->hold = mapping_hold(t.m, t.start, t.end, t.kind)) == NULL) {
        Py_DECREF(pin);
        return NULL;
    }
    pin->owner = Py_NewRef(owner);
    pin->m = t.m;
    pin->address = t.address;
    PyObject_GC_Track(pin);
    return (PyObject *)pin;
}

/* what _pin(offset) holds: the code at offset must be executable */
static int
region_code_target(PyObject *owner, Py_ssize_t offset, PinTarget *t)
{
    RegionObject *self = (RegionObject *)owner;
    int access;

    if (region_check_open(self) < 0)
        return -1;
    if (offset >= self->m.capacity) {
        PyErr_Format(PyExc_ValueError, "offset %zd lies outside the region (capacity %zd)",
                     offset, self->m.capacity);
        return -1;
    }
    access = run_access(&self->m.rec.runs[rec_find(&self->m.rec, offset)]);
    if (!(access & PROT_EXEC)) {
        PyErr_Format(PyExc_ValueError,
                     "the code at offset %zd is not executable (%c%c-): call make_exec() "
                     "or protect() first", offset, access & PROT_READ ? 'r' : '-',
                     access & PROT_WRITE ? 'w' : '-');
        return -1;
    }
    *t = (PinTarget){&self->m, 0, self->m.capacity, HOLD_PIN, self->m.data + offset};
    return 0;
}

/* _pin(offset) -> Pin: the code at offset must be executable; from now until
 * the Pin is deallocated, the region keeps its pages, contents and EXEC. */
PyObject *
region_pin(RegionObject *self, PyObject *arg)
{
    return pin_at((PyObject *)self, arg, region_code_target);
}

/* what pin() holds: the region's bytes, as a buffer of the access they have */
static int
region_bytes_target(PyObject *owner, Py_ssize_t offset, PinTarget *t)
{
    RegionObject *self = (RegionObject *)owner;
    int access;

    if (region_check_open(self) < 0 || mapping_check_truncated(&self->m, 0, self->m.size) < 0)
        return -1;
    access = rec_access_all(&self->m.rec, 0, self->m.size);
    *t = (PinTarget){&self->m, 0, self->m.size, (access & PROT_WRITE) ? HOLD_WRITE : HOLD_READ,
                     self->m.data};
    return 0;
}

/* pin() -> Pin: from now until the Pin is deallocated, the region stays
 * mapped and in place and keeps the access it has, as for an exported
 * buffer (close, dealloc, realloc, shrink and protect respect it): the base
 * object to give consumers of region.address. */
PyObject *
region_pin_public(RegionObject *self, PyObject *unused)
{
    return pin_at((PyObject *)self, NULL, region_bytes_target);
}

static PyObject *
pin_get_address(PinObject *pin, void *closure)
{
    return PyLong_FromVoidPtr(pin->address);
}

ONE_REF_TRAVERSE(pin, PinObject, owner)

static int
pin_teardown(PyObject *obj)
{
    token_release((TokenObject *)obj);   /* only a Pin's death unpins */
    return 0;
}

KERNEL_DEALLOC(pin_dealloc, pin_teardown)

MADE_BY(pin_new, "pins are made by Region.function() and CodeBlock.function(), "
                 "and by Region.pin()")

/* entry points: under the kernel lock in free-threaded builds (mman.h) */
LOCKED_GET(pin_get_address)

static PyGetSetDef pin_getset[] = {
    {"address", (getter)LOCKED(pin_get_address), NULL, "The address the pin holds (code, or the region).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot pin_slots[] = {
    {Py_tp_doc, "Keeps a region, or the code of a region or code block, mapped and in place "
                "while it lives; unpins when it dies."},
    {Py_tp_new, pin_new},
    {Py_tp_getset, pin_getset},
    LIFE_SLOTS(pin),
    {0, NULL},
};

PyType_Spec pin_spec
    = KERNEL_SPEC("Pin", PinObject, Py_TPFLAGS_HAVE_GC, pin_slots);

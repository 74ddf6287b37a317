/* objects.c: what the kernel's object types share (included by mman.h,
 * after the declarations it uses). */
#ifndef MMAP_ALLOC_OBJECTS_H
#define MMAP_ALLOC_OBJECTS_H

/* tp_dealloc of a kernel type: untrack a GC type, release what the object
 * holds (release: its tp_clear, or a function of that signature that also
 * frees what the object owns; the result is ignored), free it with the
 * type's tp_free, and drop the reference to its heap type that each
 * instance holds. */
void kernel_dealloc(PyObject *self, inquiry release);
/* What every tp_traverse visits: ref (NULL: nothing) and the object's type. */
int kernel_visit(PyObject *self, PyObject *ref, visitproc visit, void *arg);

/* tp_traverse (name##_traverse) of a type whose one reference, besides its
 * type, is self->field; ONE_REF_CLEAR its tp_clear (name##_clear). */
#define ONE_REF_TRAVERSE(name, type, field)                                      \
    static int name##_traverse(type *self, visitproc visit, void *arg)          \
    {                                                                            \
        return kernel_visit((PyObject *)self, (PyObject *)self->field, visit, arg); \
    }
#define ONE_REF_CLEAR(name, type, field)   \
    static int name##_clear(PyObject *self) \
    {                                       \
        Py_CLEAR(((type *)self)->field);    \
        return 0;                           \
    }

/* f, a kernel type's tp_dealloc: kernel_dealloc with the type's release
 * step, and its wrapper under the kernel lock. */
#define KERNEL_DEALLOC(f, release)             \
    static void f(PyObject *self)              \
    {                                          \
        kernel_dealloc(self, release);         \
    }                                          \
    LOCKED_DEALLOC(f)

/* f, the tp_new of a type only the kernel makes: a TypeError that says
 * what makes its objects. */
#define MADE_BY(f, message)                                                 \
    static PyObject *f(PyTypeObject *type, PyObject *args, PyObject *kwds) \
    {                                                                       \
        PyErr_SetString(PyExc_TypeError, message);                          \
        return NULL;                                                        \
    }

/* Slots every type table repeats, named after the type: its life (dealloc
 * under the kernel lock, traverse; GC_SLOTS adds clear, under the lock too:
 * the file defines LOCKED_INQUIRY(name##_clear)) and a buffer exporter's two
 * slots (LOCKED_BUFFER(name) defines their wrappers). */
#define LIFE_SLOTS(name) {Py_tp_dealloc, LOCKED(name##_dealloc)}, {Py_tp_traverse, name##_traverse}
#define GC_SLOTS(name) LIFE_SLOTS(name), {Py_tp_clear, LOCKED(name##_clear)}
#define LOCKED_BUFFER(name) LOCKED_GETBUF(name##_getbuffer) LOCKED_RELBUF(name##_releasebuffer)
#define BUFFER_SLOTS(name)                              \
    {Py_bf_getbuffer, LOCKED(name##_getbuffer)},        \
    {Py_bf_releasebuffer, LOCKED(name##_releasebuffer)}

/* A method table's entry for f, called under the kernel lock through the
 * wrapper the file defines with the LOCKED_ macro of its calling convention:
 * LOCKED_FAST(f) for METHOD_FAST, LOCKED_FASTKW(f) for METHOD_FASTKW, and
 * LOCKED_O(f) for METHOD_O and METHOD_NOARGS (which passes NULL as the
 * argument). */
#define METHOD_FAST(name, f, doc) {name, (PyCFunction)(void (*)(void))LOCKED(f), METH_FASTCALL, doc}
#define METHOD_FASTKW(name, f, doc) \
    {name, (PyCFunction)(void (*)(void))LOCKED(f), METH_FASTCALL | METH_KEYWORDS, doc}
#define METHOD_O(name, f, doc) {name, (PyCFunction)LOCKED(f), METH_O, doc}
#define METHOD_NOARGS(name, f, doc) {name, (PyCFunction)LOCKED(f), METH_NOARGS, doc}

/* The spec of mmap_alloc._mman.<qualname>, objects of struct `object`. */
#define KERNEL_SPEC(qualname, object, flags_, slots_)                             \
    {.name = "mmap_alloc._mman." qualname, .basicsize = sizeof(object),           \
     .flags = Py_TPFLAGS_DEFAULT | (flags_), .slots = (slots_)}

/* What field_get reads at offset in the object: an int as a bool, a
 * Py_ssize_t, or (the offset of a Mapping) whether it is closed, its busy
 * count, exports, pins or alignment. */
enum { GET_BOOL, GET_SSIZE, GET_CLOSED, GET_BUSY, GET_EXPORTS, GET_PINS, GET_ALIGN };
typedef struct {
    Py_ssize_t offset;
    int kind;
} FieldGetter;
/* The getter of a field that needs no computation, the FieldGetter its
 * closure: tables name it through LOCKED (each file: LOCKED_GET(field_get)),
 * so that it reads under the kernel lock what other calls write under it. */
PyObject *field_get(PyObject *self, void *closure);
#define FIELD_GETSET(name, type, field, kind, doc)           \
    {name, (getter)LOCKED(field_get), NULL, doc,               \
     (void *)&(const FieldGetter){offsetof(type, field), kind}}

#endif
